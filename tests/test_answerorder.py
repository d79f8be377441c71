"""
The native dialect's answers and errors follow the calls their methods made (485bd6b): a
method that calls its caller back while this side sends a large call (or with a large call)
and then answers has its call arrive first, as in stock PB; what is kept that way is sent,
counted back and failed as anything kept behind large messages is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import context, pb
from tests.test_broker import Gauge
from tests.test_keptreleases import gaugePeers, stopTaking

MiB = 1024 * 1024
BIG = MiB * 3 // 2  # over half the 1 MiB window: a second one waits for the first's "taken"
# A large call still being written after two turns of the reactor (1 MiB each).
LARGE = 3 * MiB


class LevelGauge(Gauge):
    """A Cacheable of the client's whose server copy records the updates it gets."""


class RemoteLevelGauge(pb.RemoteCache):
    def setCopyableState(self, state: Any) -> None:
        super().setCopyableState(state)

    def observe_level(self, level: Any) -> None:
        Root.events.append(("level", level))


class Root(pb.Root):
    """The server: it records, in order, the calls the client makes to it."""

    events: list[Any] = []

    def __init__(self) -> None:
        self.helper: Any = None
        self.copies: list[Any] = []

    def remote_setHelper(self, helper: Any, *copies: Any) -> None:
        self.helper = helper
        self.copies.extend(copies)

    def remote_note(self, tag: Any, *rest: Any) -> None:
        Root.events.append(tag)

    def remote_take(self, data: bytes) -> int:
        Root.events.append(("take", len(data)))
        return len(data)


class Helper(pb.Referenceable):
    """The client's object the server calls: its methods call the server back first."""

    def __init__(self, test: AnswerOrderTests) -> None:
        self.test = test
        self.later: list[Deferred[Any]] = []
        self.failed: list[Failure] = []

    def back(self, tag: str, **options: Any) -> Any:
        root = self.test.root
        if options:
            root = root.withOptions(**options)
        return root.callRemote("note", tag).addErrback(self.failed.append)

    def remote_sync(self) -> str:
        self.back("cb")
        return "answered"

    def remote_raises(self) -> None:
        self.back("cb")
        raise pb.Error("refused")

    def remote_later(self) -> Deferred[Any]:
        self.later.append(Deferred())
        return self.later[-1]

    def remote_reply(self) -> str:
        self.back("cb")
        context.current().reply["ledger"] = "L-7"
        return "answered"

    def remote_badReply(self) -> str:
        self.back("cb")
        context.current().reply[1] = "not text"  # refused: the caller gets an error
        return "answered"

    def remote_handle(self) -> Any:
        self.back("cb")
        return self.test.gauge  # the server holds a copy: named by handle

    def remote_toCopy(self) -> str:
        self.test.gauge.observers[0].callRemote("level", 1)
        return "answered"

    def remote_large(self) -> str:
        self.test.root.callRemote("take", b"l" * BIG)
        return "answered"

    def remote_unordered(self) -> str:
        self.test.root.withOptions(ordered=False).callRemote("note", "ahead")
        return "answered"

    def remote_none(self) -> str:
        return "answered"

    def remote_bigAnswer(self) -> bytes:
        self.back("cb")
        return b"a" * (300 * 1024)


class AnswerOrderPeers(SynchronousTestCase):
    """
    The client is the side that sends large calls; the server calls the client's helper,
    whose methods call the server back and answer. The server records what arrives, in order.
    """

    #: If set, the transports push back past this many bytes (see connectedServerAndClient).
    bufferSize: int | None = None

    def setUp(self) -> None:
        Root.events = []
        self.clock = Clock()
        self.rootObject = Root()
        self.server, self.client, self.pump = gaugePeers(
            self.rootObject,
            self.clock,
            bufferSize=self.bufferSize,
            levelGauges=(LevelGauge, RemoteLevelGauge),
        )
        self.root = self.client.remoteForName("root")
        self.helper = Helper(self)
        self.gauge = LevelGauge()
        self.root.callRemote("setHelper", self.helper, self.gauge)
        self.pump.flush()
        self.assertIsNotNone(self.rootObject.helper)
        self.events = Root.events

    def ask(self, method: str) -> Deferred[Any]:
        """The server calls the helper's ``method``; its answer or error is recorded."""
        d = self.rootObject.helper.callRemote(method)
        d.addCallbacks(
            self.events.append,
            lambda failure: self.events.append(("error", failure.getErrorMessage())),
        )
        return d

    def largeCallOut(self) -> Deferred[Any]:
        """A large call of the client's, being sent (the rest of it queued)."""
        call = self.root.callRemote("take", b"x" * LARGE)
        self.assertTrue(self.client.sendingLarge)
        return call

    def deliver(self) -> None:
        """Move what either side wrote, without a turn of the reactor (which would write
        the rest of the large call)."""
        self.pump.pump(advanceClock=False)

    def drain(self, rounds: int = 100) -> None:
        for _ in range(rounds):
            self.pump.flush()
            self.clock.advance(1)

    def assertNothingKept(self) -> None:
        client = self.client
        self.assertEqual(
            (client._keptForPeer, client._keptOwn, len(client._afterLarge), client._largeOut),
            (0, 0, 0, []),
        )

    def orderOf(self, method: str) -> list[Any]:
        self.largeCallOut()
        self.ask(method)
        self.deliver()
        self.assertTrue(self.client.sendingLarge)
        self.drain()
        self.assertNothingKept()
        return self.events


class AnswerOrderTests(AnswerOrderPeers):
    """
    Answers and errors arrive after the calls their methods made.
    """

    def test_sync(self) -> None:
        self.assertEqual(self.orderOf("sync"), [("take", LARGE), "cb", "answered"])

    def test_raises(self) -> None:
        self.assertEqual(self.orderOf("raises"), [("take", LARGE), "cb", ("error", "refused")])

    def test_deferred(self) -> None:
        for outcome in ("answer", "error"):
            del self.events[:]
            self.largeCallOut()
            self.ask("later")
            self.deliver()
            self.helper.back("cb")
            waiting = self.helper.later.pop()
            if outcome == "answer":
                waiting.callback("answered")
            else:
                waiting.errback(Failure(pb.Error("refused")))
            self.drain()
            expected = "answered" if outcome == "answer" else ("error", "refused")
            self.assertEqual(self.events, [("take", LARGE), "cb", expected])
            self.assertNothingKept()

    def test_reply(self) -> None:
        """An answer with reply annotations (answerctx) follows the call back."""
        self.largeCallOut()
        reply: dict[str, Any] = {}
        d = self.rootObject.helper.withOptions(reply=reply).callRemote("reply")
        d.addCallback(lambda result: self.events.append((result, dict(reply))))
        self.deliver()
        self.drain()
        self.assertEqual(self.events, [("take", LARGE), "cb", ("answered", {"ledger": "L-7"})])

    def test_refusedReply(self) -> None:
        """The error sent instead of an answer whose reply annotations cannot travel
        follows the call its method made back, as the answer would have."""
        self.largeCallOut()
        d = self.rootObject.helper.withOptions(reply={}).callRemote("badReply")
        d.addErrback(lambda failure: self.events.append(("error", failure.getErrorMessage())))
        with capturedLogs():
            self.deliver()
            self.drain()
        self.assertEqual(
            self.events, [("take", LARGE), "cb", ("error", "reply keys must be text, not 1")]
        )
        self.assertNothingKept()

    def test_handle(self) -> None:
        """An answer naming a cache handle follows the call back too."""
        order = self.orderOf("handle")
        self.assertEqual(order[:2], [("take", LARGE), "cb"])
        self.assertIsInstance(order[2], RemoteLevelGauge)

    def test_callToACopy(self) -> None:
        """A call to the server's copy of a Cacheable (an observer's update) comes before
        the answer of the method that made it."""
        self.assertEqual(self.orderOf("toCopy"), [("take", LARGE), ("level", 1), "answered"])

    def test_largeCall(self) -> None:
        """A large call the method makes, taken-tracked, queued behind another: all of it
        arrives before the answer."""
        self.assertEqual(self.orderOf("large"), [("take", LARGE), ("take", BIG), "answered"])

    def test_noCall(self) -> None:
        """An answer whose method made no call goes between the fragments."""
        self.assertEqual(self.orderOf("none"), ["answered", ("take", LARGE)])

    def test_unordered(self) -> None:
        """A call made with ordered=False makes no answer wait (docs/native.rst)."""
        self.assertEqual(self.orderOf("unordered"), ["ahead", "answered", ("take", LARGE)])

    def test_unorderedLargeAfterAnOrderedOne(self) -> None:
        """A large call made with ordered=False, after an ordered call back that is out by
        then: the answer does not wait for the large one (a call made with ordered=False
        makes no answer wait), though the call back was kept when it was made."""
        self.largeCallOut()
        self.ask("later")
        self.deliver()
        self.helper.back("cb")  # kept behind the large call
        self.drain()
        self.assertEqual(self.events, [("take", LARGE), "cb"])
        self.assertNothingKept()
        self.root.withOptions(ordered=False).callRemote("take", b"u" * BIG)
        self.assertTrue(self.client.sendingLarge)  # being written
        self.helper.later[0].callback("answered")
        self.drain()
        self.assertEqual(self.events, [("take", LARGE), "cb", "answered", ("take", BIG)])

    def test_connectionLostWhileKept(self) -> None:
        """Lost while an answer waits behind the calls its method made: nothing stays
        counted, and every Deferred fires."""
        large = self.largeCallOut()
        asked = self.ask("sync")
        deferred = self.ask("later")
        self.deliver()
        self.assertGreater(self.client._keptForPeer, 0)
        self.helper.back("cb2")
        self.helper.later[0].callback("late")
        self.client.connectionLost(Failure(ConnectionDone()))
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertNothingKept()
        self.failureResultOf(large, pb.PBConnectionLost)
        self.assertTrue(asked.called and deferred.called)

    def test_cancelledCallBack(self) -> None:
        """The call back cancelled (or timed out) while kept: the answer still goes."""
        self.largeCallOut()
        self.helper.remote_timed = lambda: (  # type: ignore[attr-defined]
            self.helper.back("cb", timeout=0.5),
            "answered",
        )[1]
        self.ask("timed")
        self.deliver()
        self.assertGreater(self.client._keptForPeer, 0)
        self.clock.advance(1)  # the call back times out, unsent
        self.drain()
        self.assertEqual(self.events, [("take", LARGE), "answered"])
        self.assertNothingKept()

    def test_neverTakenBoundsKeptAnswers(self) -> None:
        """A peer that reads but never takes this side's large calls, and keeps calling a
        method that calls it back and answers with 300 KiB: the answers kept behind the
        call waiting for room count as the calls kept there do, and the peer is dropped
        ("took none") once more than bufferedBytes of them wait for stallTimeout, not let
        make this side keep answers for as long as it calls. (Before, the large answers
        went ahead of the waiting call, and were bounded as any large answer is.)"""
        stopTaking(self.server)
        self.largeCallOut()
        for _ in range(100):
            if not self.client._largeOut:
                break
            self.clock.advance(0)
        waiting = self.root.callRemote("take", b"2" * BIG)  # waits for room, never given
        self.assertGreater(self.client._largeOut[0][3], 0)
        asked: list[Any] = []
        made = most = 0
        with capturedLogs():
            for _ in range(200):
                if self.client.disconnected:
                    break
                self.rootObject.helper.callRemote("bigAnswer").addBoth(asked.append)
                made += 1
                self.pump.flush()
                self.clock.advance(1)
                most = max(most, self.client._keptForPeer)
        self.assertTrue(self.client.disconnected)
        self.assertIn("took none", self.client._lostReason or "")
        # At most bufferedBytes, and what came during stallTimeout (30 answers).
        self.assertLess(most, MiB + 31 * 310 * 1024)
        self.failureResultOf(waiting, pb.PBConnectionLost)
        self.pump.flush()
        self.assertNothingKept()
        self.assertEqual(len(asked), made)  # each of the server's calls has its result

    def test_peerCancelsWhileItsAnswerIsKept(self) -> None:
        """The server gives up on (times out) its call while the answer waits behind the
        call back: the answer, already on its way, arrives late and is dropped there; the
        connection stays, nothing stays counted."""
        self.largeCallOut()
        asked = self.rootObject.helper.withOptions(timeout=1).callRemote("sync")
        self.deliver()
        self.assertGreater(self.client._keptForPeer, 0)
        self.clock.advance(2)  # the server's call times out: it sends a cancel
        self.failureResultOf(asked, TimeoutError)
        self.drain()
        self.assertEqual(self.events, [("take", LARGE), "cb"])
        self.assertFalse(self.client.disconnected or self.server.disconnected)
        self.assertNothingKept()
        self.assertEqual(self.server._abandoned, set())  # the late answer was seen

    def test_afterAWaitingCallIsCancelled(self) -> None:
        """A call back and its answer wait for a large call that waits for room; that call
        is cancelled unsent, and what waited for it goes back in order (_unblockKept): an
        answer made then still finds the call back unsent, and follows it."""
        self.largeCallOut()
        waiting = self.root.callRemote("take", b"y" * BIG)
        self.ask("later")
        self.ask("sync")
        self.deliver()  # the server's calls reach the client; nothing reaches the server
        client = self.client
        for _ in range(10):
            if len(client._largeOut) > 1:
                client._pumpLarge()  # the rest of the first large call, not delivered
        self.assertEqual(len(client._largeOut), 1)  # the call waiting for room
        self.assertEqual(len(client._afterBlocked), 2)  # the call back, and its answer
        waiting.cancel()
        self.failureResultOf(waiting)
        self.assertEqual((len(client._afterBlocked), len(client._afterLarge)), (0, 2))
        self.helper.later[0].callback("later")
        self.assertEqual(len(client._afterLarge), 3)  # kept: the call back is not out yet
        self.drain()
        self.assertEqual(self.events, [("take", LARGE), "cb", "answered", "later"])
        self.assertNothingKept()


class PacedAnswerOrderTests(AnswerOrderPeers):
    """
    The same over transports that push back (64 KiB), where what is kept for the peer makes
    its messages wait once more than bufferedBytes waits (_queueFull).
    """

    bufferSize = 64 * 1024

    def test_keptAnswersFillTheQueue(self) -> None:
        """Twenty answers of 300 KiB kept behind the calls back, which wait behind a large
        call: past bufferedBytes the server's calls wait unhandled; all of it is sent in
        the end, each answer after its call back, and nothing stays counted."""
        self.largeCallOut()
        for _ in range(20):
            self.ask("bigAnswer")
        self.deliver()
        waited = False
        for _ in range(2000):
            waited = waited or self.client._backlog is not None
            if len(self.events) == 41:
                break
            self.pump.pump()
            self.clock.advance(0)
        self.assertTrue(waited)
        self.assertEqual(self.events[0], ("take", LARGE))
        self.assertEqual(self.events[1:], ["cb", b"a" * (300 * 1024)] * 20)
        self.drain()
        self.assertNothingKept()
        self.assertFalse(self.client.disconnected)
