"""
Answers and errors that a hook completes while another value is serialised wait for that
value, and are sent once it is sent or dropped, on every path: a value that fails half-way,
a one-way call, a stream's item or error, a call's arguments, a lost connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.testing import connectedServerAndClient
from tests.test_broker import FailingTrigger, RemoteTrigger, Trigger, Unserialisable


class TriggeringError(pb.Error, pb.Copyable):
    """
    An error copied to the peer whose state, when taken, completes another call.
    """

    def __init__(self, waiter: Deferred[Any] | None = None) -> None:
        super().__init__("triggering")
        self.waiter = waiter

    def getStateToCopy(self) -> Any:
        assert self.waiter is not None
        self.waiter.callback(1)
        return {"message": "triggering"}


class RemoteTriggeringError(pb.RemoteCopy, pb.Error):
    pass


class Canceller(pb.Copyable):
    """
    A copy whose state, when taken, completes another call's answer and then cancels that
    call (an application giving up on it), while the answer waits for this value.
    """

    def __init__(self, waiter: Deferred[Any]) -> None:
        self.waiter = waiter

    def getStateToCopy(self) -> Any:
        self.waiter.callback(1)
        self.waiter.cancel()
        return {}


class Taker(pb.Referenceable):
    def __init__(self) -> None:
        self.taken: list[Any] = []

    def remote_take(self, *values: Any) -> None:
        self.taken.append(values)


class KeepingRoot(pb.Root):
    """
    A root that keeps the reference its client gives it (``target``), to call it back.
    """

    target: Any = None

    def remote_keep(self, target: Any) -> None:
        self.target = target


class Root(KeepingRoot):
    def __init__(self) -> None:
        self.later: Deferred[Any] = Deferred()
        self.other: Deferred[Any] = Deferred()

    def remote_waitLater(self) -> Any:
        return self.later

    def remote_waitOther(self) -> Any:
        return self.other

    def remote_waitOtherOneWay(self) -> Any:
        return self.other

    def remote_cancelLater(self) -> Any:
        return [Canceller(self.later)]

    def remote_failOtherThenAnswerLater(self) -> Any:
        # The hooks fail the one-way waitOtherOneWay, then complete waitLater's answer.
        return [FailingTrigger(self.other, ValueError("one-way failed")), Trigger(self.later, 1)]

    def remote_triggerThenFail(self) -> Any:
        # The hook completes waitLater's answer, then the value fails to serialise.
        return [Trigger(self.later, 1), Unserialisable()]

    def remote_streamWithHookError(self) -> Iterator[int]:
        later = self.later

        def generate() -> Iterator[int]:
            yield 0
            raise TriggeringError(later)

        return generate()

    def remote_streamWithBadItem(self) -> Iterator[Any]:
        later = self.later

        def generate() -> Iterator[Any]:
            yield [Trigger(later, 1), Unserialisable()]

        return generate()


class ConnectedTestCase(SynchronousTestCase):
    """
    A server and a client connected in memory, with one fake clock.
    """

    def connect(self, rootObject: Any, copies: dict[type, type]) -> None:
        """
        Serve ``rootObject``, to a client that takes each class in ``copies`` as the class
        it maps to; ``self.root`` is the server's root.
        """
        self.clock = Clock()
        self.rootObject = rootObject
        registry = pb.UnjellyableRegistry()
        for copyable, copy in copies.items():
            registry.setUnjellyableForClass(copyable, copy)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(rootObject, clock=self.clock),
            pb.PBClientFactory(registry=registry, clock=self.clock),
            clock=self.clock,
        )
        self.root = self.client.remoteForName("root")

    def giveTaker(self) -> Taker:
        """
        Give the server's root (a :class:`KeepingRoot`) a :class:`Taker` of the client's to
        call back; that taker.
        """
        taker = Taker()
        self.root.callRemote("keep", taker)
        self.pump.flush()
        return taker


class PostponedAnswerTests(ConnectedTestCase):
    """
    Each test has the server's ``waitLater`` call pending, completes it from a hook, and
    checks that its answer is sent at once (nothing left postponed) and arrives.
    """

    def setUp(self) -> None:
        self.connect(
            Root(),
            {
                Trigger: RemoteTrigger,
                FailingTrigger: RemoteTrigger,
                Canceller: RemoteTrigger,
                TriggeringError: RemoteTriggeringError,
            },
        )
        self.waiting: list[Any] = []
        self.root.callRemote("waitLater").addBoth(self.waiting.append)
        self.pump.flush()

    def settle(self) -> None:
        for _ in range(50):
            self.pump.flush()
            self.clock.advance(0)

    def test_callWhoseArgumentsFail(self) -> None:
        """A call whose arguments fail to serialise after a hook in them completed an
        answer: the answer is sent as the call fails."""
        self.giveTaker()
        self.settle()
        target = self.rootObject.target
        d = target.callRemote("take", Trigger(self.rootObject.later, 1), Unserialisable())
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.server._postponed, [])
        # Nothing is left on the reactor for it either (trial would call that unclean).
        pending = [call.func for call in self.clock.getDelayedCalls()]
        self.assertNotIn(self.server._sendPostponedLater, pending)
        self.settle()
        self.assertEqual(self.waiting, [1])

    def test_oneWayCallWhoseResultFails(self) -> None:
        """A one-way call whose result fails to serialise after a hook in it completed an
        answer: the answer is sent when the result is dropped."""
        self.server._sendPostponedLater = lambda: None  # type: ignore[method-assign]
        self.root.callRemote("triggerThenFail", pbanswer=False)
        self.settle()
        self.flushLoggedErrors(ValueError)
        self.assertEqual(self.waiting, [1])

    def test_streamErrorWhoseHookCompletesAnAnswer(self) -> None:
        """A stream's error whose state completes another call: the answer is sent after
        the stream's error."""
        self.server._sendPostponedLater = lambda: None  # type: ignore[method-assign]
        results: list[Any] = []
        self.root.callRemote("streamWithHookError").addBoth(results.append)
        self.settle()
        (stream,) = results
        items: list[Any] = []
        for _ in range(2):
            stream.next().addBoth(items.append)
        self.settle()
        self.flushLoggedErrors()
        self.assertEqual(items[0], 0)
        self.assertIsInstance(items[1], Failure)
        self.assertEqual(self.waiting, [1])

    def test_streamItemFails(self) -> None:
        """A stream item that fails to serialise after a hook in it completed an answer:
        the answer is sent as the stream fails."""
        self.server._sendPostponedLater = lambda: None  # type: ignore[method-assign]
        results: list[Any] = []
        self.root.callRemote("streamWithBadItem").addBoth(results.append)
        self.settle()
        (stream,) = results
        items: list[Any] = []
        stream.next().addBoth(items.append)
        self.settle()
        self.flushLoggedErrors()
        self.assertIsInstance(items[0], Failure)
        self.assertEqual(self.waiting, [1])

    def test_answerCancelledWhilePostponed(self) -> None:
        """A call whose answer a hook completes, then cancels while that answer waits for
        the value being serialised, is answered once, with its CancelledError; the value
        is sent, and nothing is left waiting."""
        values: list[Any] = []
        self.root.callRemote("cancelLater").addBoth(values.append)
        self.settle()
        [[copy]] = values
        self.assertIsInstance(copy, RemoteTrigger)
        [failure] = self.waiting
        self.assertTrue(failure.check("twisted.internet.defer.CancelledError"))
        self.assertEqual((self.server._postponed, self.server._answering), ([], {}))
        self.assertEqual(self.client.waitingForAnswers, {})
        self.assertFalse(self.server.disconnected)

    def test_oneWayCallFailingBeforeAPostponedAnswer(self) -> None:
        """A one-way call a hook fails, and an answer the next hook completes, both wait
        for the value: the failure is logged, then the answer is sent."""
        self.root.callRemote("waitOtherOneWay", pbanswer=False)
        self.settle()
        values: list[Any] = []
        with capturedLogs() as events:
            self.root.callRemote("failOtherThenAnswerLater").addBoth(values.append)
            self.settle()
        [failed] = [event for event in events if "log_failure" in event]
        self.assertEqual(failed["log_format"], "A one-way remote call failed")
        self.assertEqual(str(failed["log_failure"].value), "one-way failed")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.waiting, [1])
        self.assertEqual([type(copy) for copy in values[0]], [RemoteTrigger, RemoteTrigger])
        self.assertEqual((self.server._postponed, self.server._oneWayPending), ([], 0))

    def test_missedPathStillSentNextTurn(self) -> None:
        """Should a path that drops a value not send what waited for it, the reactor's
        next turn does."""
        self.server._postpone(3).addCallback(self.waiting.append)
        self.assertEqual(self.waiting, [])
        self.clock.advance(0)
        self.assertEqual(self.waiting, [3])

    def test_nothingPostponedAfterDisconnect(self) -> None:
        """After the connection is lost, a late answer's hook does not hold another
        answer back for good: that answer's chain runs to its end."""
        self.root.callRemote("waitOther").addErrback(lambda _: None)
        self.settle()
        self.client.transport.loseConnection()
        self.settle()
        self.assertTrue(self.server.disconnected)
        chain: list[Any] = []
        self.rootObject.later.addBoth(chain.append)  # after the answer's own callbacks
        self.rootObject.other.callback(Trigger(self.rootObject.later, b"answer"))
        self.assertEqual(self.server._postponed, [])
        self.assertEqual(len(chain), 1)


class Gauge(pb.Cacheable):
    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        return {"level": 1}


class RemoteGauge(pb.RemoteCache):
    pass


class Releaser(pb.Copyable):
    """
    A copy whose state, when taken, fires each of ``waiters`` with ``value``.
    """

    def __init__(self, waiters: list[Deferred[Any]], value: Any) -> None:
        self.waiters = waiters
        self.value = value

    def getStateToCopy(self) -> Any:
        for waiter in self.waiters:
            waiter.callback(self.value)
        return {}


class Snapshot(pb.Copyable):
    """
    A copy whose state, when taken, makes calls with a dict it changes after each.
    """

    def __init__(self, target: Any) -> None:
        self.target = target
        self.record = {"step": 0}

    def getStateToCopy(self) -> Any:
        for step in (1, 2, 3):
            self.record["step"] = step
            self.target.callRemote("take", self.record)
        return {}


class HookTests(ConnectedTestCase):
    """
    Hooks that complete many answers, a stream's item, or make calls.
    """

    def setUp(self) -> None:
        self.gauge = Gauge()
        self.waiters: list[Deferred[Any]] = []
        self.value: Any = None
        self.pending: Deferred[Any] = Deferred()
        outer = self

        class HookRoot(KeepingRoot):
            def remote_wait(self) -> Deferred[Any]:
                outer.waiters.append(Deferred())
                return outer.waiters[-1]

            def remote_value(self) -> Any:
                return outer.value

            def remote_stream(self) -> Any:
                return iter([outer.pending])

        self.connect(
            HookRoot(),
            {
                Gauge: RemoteGauge,
                Releaser: RemoteTrigger,
                Snapshot: RemoteTrigger,
                Trigger: RemoteTrigger,
            },
        )
        self.taker = self.giveTaker()

    def test_manyAnswersFromAHook(self) -> None:
        """A hook that completes 300 waiting calls: each is answered (the postponed
        answers are sent one after the other, not each from inside the last)."""
        answers: list[Any] = []
        for index in range(300):
            self.root.callRemote("wait").addCallback(lambda _, index=index: answers.append(index))
        self.pump.flush()
        self.value = Releaser(self.waiters, 1)
        results: list[Any] = []
        self.root.callRemote("value").addBoth(results.append)
        for _ in range(20):
            self.pump.flush()
        self.assertIsInstance(results[0], RemoteTrigger)
        self.assertEqual(answers, list(range(300)))

    def test_streamItemFromAHook(self) -> None:
        """A stream's item that a hook completes (the Deferred its source yielded) is sent
        after the value being serialised, whose first copy of a Cacheable it names."""
        streams: list[Any] = []
        self.root.callRemote("stream").addBoth(streams.append)
        self.pump.flush()
        (stream,) = streams
        items: list[Any] = []
        stream.next().addBoth(items.append)
        self.pump.flush()
        self.value = [self.gauge, Trigger(self.pending, self.gauge)]
        values: list[Any] = []
        self.root.callRemote("value").addBoth(values.append)
        for _ in range(20):
            self.pump.flush()
        self.assertFalse(self.client.disconnected)
        ((gauge, _),) = values
        (item,) = items
        self.assertIsInstance(item, RemoteGauge)
        self.assertIs(item.__dict__, gauge.__dict__)

    def test_callFromAHookTakesItsArgumentsAtOnce(self) -> None:
        """A call a hook makes is sent at once, with its arguments as they are then, as
        any call is (and as in Twisted PB), not after the value being serialised."""
        self.value = Snapshot(self.rootObject.target)
        self.root.callRemote("value")
        for _ in range(20):
            self.pump.flush()
        self.assertEqual([value["step"] for (value,) in self.taker.taken], [1, 2, 3])


class LargeCaller(pb.Copyable):
    """
    A copy whose state, when taken, makes a large call (one the broker fragments).
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def getStateToCopy(self) -> Any:
        self.target.callRemote("take", b"x" * 300_000)
        return {}


class StreamPumpedMidSerialisationTests(ConnectedTestCase):
    def setUp(self) -> None:
        self.gauge = Gauge()
        self.later: Deferred[Any] = Deferred()
        outer = self

        class StreamingRoot(KeepingRoot):
            def remote_waitLater(self) -> Any:
                return outer.later

            def remote_stream(self) -> Iterator[Any]:
                # The first credit is for two items; then _ITEMS_PER_TURN (64) go in a turn,
                # and the rest waits for the next.
                yield from range(66)
                yield outer.gauge

        self.connect(StreamingRoot(), {Gauge: RemoteGauge, LargeCaller: RemoteTrigger})
        self.taker = self.giveTaker()

    def test_streamNotPumpedFromAHooksLargeCall(self) -> None:
        """A large call a hook makes does not pump a stream waiting for the next reactor
        turn: its item would name a Cacheable whose first copy is in the value still being
        serialised, and reach the peer first. The call goes on the next turn."""
        self.client.streamWindow = 200
        answers: list[Any] = []
        self.root.callRemote("waitLater").addBoth(answers.append)
        streams: list[Any] = []
        self.root.callRemote("stream").addBoth(streams.append)
        # The first two items (a stream's first credit), then 64 more in one turn; the next
        # turn not run.
        self.pump.flush(advanceClock=False)
        (stream,) = streams
        self.assertEqual(stream.buffered, 66)
        # The server's method answers (from a timer, say): its value's hook makes a large call.
        self.later.callback([self.gauge, LargeCaller(self.rootObject.target)])
        for _ in range(20):
            self.pump.flush()
        self.assertFalse(self.client.disconnected)
        ((gauge, _),) = answers
        items = [self.successResultOf(stream.next()) for _ in range(67)]
        self.assertIsInstance(items[66], RemoteGauge)
        self.assertIs(items[66].__dict__, gauge.__dict__)
        self.assertEqual(self.taker.taken, [(b"x" * 300_000,)])
