"""
Hostile peers: each attack is refused as configured, and a well-behaved client of the same
server keeps being served.
"""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
from typing import Any

import msgpack
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import _native, banana, jelly, pb
from pbroker import broker as brokerModule
from pbroker.errors import LimitExceeded
from pbroker.testing import connectedServerAndClient


class Service(pb.Root):
    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []

    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_count(self, *values: Any) -> int:
        return len(values)

    def remote_newObject(self) -> pb.Referenceable:
        return pb.Referenceable()

    def remote_wait(self) -> Deferred[Any]:
        deferred: Deferred[Any] = Deferred()
        self.waiting.append(deferred)
        return deferred


LIMITS = pb.BrokerLimits(
    bufferedBytes=5500,
    messageSize=4096,
    nestingDepth=20,
    exportedReferences=5,
    importedReferences=5,
    pendingCalls=3,
)


class HostilePeerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = Service()
        self.clock = Clock()
        self.factory = pb.PBServerFactory(self.service, limits=LIMITS, clock=self.clock)
        # The attacker speaks raw PB over a string transport.
        self.hostile = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.hostile.makeConnection(self.transport)
        self.hostile.dataReceived(banana.encode(b"pb"))
        self.transport.clear()
        self.nextRequest = 0

    def attack(self, *message: Any) -> None:
        self.hostile.dataReceived(banana.encode(list(message), b"pb"))

    def call(self, method: bytes, *args: Any) -> int:
        self.nextRequest += 1
        self.attack(
            b"message", self.nextRequest, b"root", method, 1, [b"tuple", *args], [b"dictionary"]
        )
        return self.nextRequest

    def replies(self) -> list[Any]:
        return banana.Decoder(b"pb", sizeLimit=10**7).feed(self.transport.value())

    def errorFor(self, requestID: int) -> Any:
        for reply in self.replies():
            if reply[:2] == [b"error", requestID]:
                return jelly.unjelly(reply[2], registry=self.hostile.registry)
        self.fail(f"no error for request {requestID}")

    def pausedPeerDroppedAtOnce(self) -> tuple[Any, StringTransport]:
        """
        Another hostile connection, with ``stallTimeout=None``, whose transport has paused
        its broker; the broker and the string transport under it.
        """
        hostile = pb.PBServerFactory(
            self.service, limits=dataclasses.replace(LIMITS, stallTimeout=None)
        ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        hostile.makeConnection(transport)
        hostile.dataReceived(banana.encode(b"pb"))
        hostile.transport.pauseProducing()
        return hostile, transport

    def assertOthersServed(self) -> None:
        """A well-behaved client of the same factory gets its answers."""
        _server, client, pump = connectedServerAndClient(self.factory, pb.PBClientFactory())
        results: list[Any] = []
        client.remoteForName("root").callRemote("echo", "still here").addBoth(results.append)
        pump.flush()
        self.assertEqual(results, ["still here"])

    def test_oversizedMessage(self) -> None:
        """A message over the size limit closes that connection, with a log line."""
        with capturedLogs() as events:
            self.call(b"echo", b"x" * 5000)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(any("message size limit" in str(e.get("why")) for e in events))
        self.assertOthersServed()

    def test_nothingKeptAfterTheConnectionFailed(self) -> None:
        """What a peer sends after its garbage failed the connection, while the connection
        takes no data, is neither handled nor kept for later."""
        with capturedLogs():
            self.hostile.dataReceived(b"\xff" * 70)  # an unknown type byte: dropped
        self.assertTrue(self.transport.disconnecting)
        self.hostile.transport.pauseProducing()
        written = len(self.transport.value())
        self.call(b"echo", 1)
        self.assertEqual((self.hostile._backlog, self.hostile._backlogData), (None, []))
        self.assertEqual(self.hostile._backlogSize, 0)
        self.assertEqual(len(self.transport.value()), written)

    def test_deepNesting(self) -> None:
        """A message nested deeper than the limit closes that connection."""
        deep: Any = 1
        for _ in range(25):
            deep = [b"list", deep]
        with capturedLogs():
            self.call(b"echo", deep)
        self.assertTrue(self.transport.disconnecting)
        self.assertOthersServed()

    def test_referenceFlood(self) -> None:
        """
        References beyond the import limit fail the call; every reference in the call is
        handed back (decref), the ones after the refused one too.
        """
        flood = [[b"remote", luid] for luid in range(1, 11)]
        with capturedLogs():
            requestID = self.call(b"count", *flood)
        failure = self.errorFor(requestID)
        self.assertEqual(failure.type, b"pbroker.errors.LimitExceeded")
        self.assertIn("more than 5 references", failure.value)
        gc.collect()
        decrefs = [reply for reply in self.replies() if reply[0] == b"decref"]
        self.assertEqual(sorted(reply[1] for reply in decrefs), list(range(1, 11)))
        self.assertEqual(self.hostile.importedReferences, 0)
        self.assertFalse(self.transport.disconnecting)
        self.assertOthersServed()

    def test_refusedValueReleasesOnlyWhatWasCounted(self) -> None:
        """
        A refused call hands back the references after the refused part, and nothing the
        peer never counted: no decache for a cache this side never had, none for a
        malformed reference, none for a dictionary entry shaped like a reference.
        """
        with capturedLogs():
            self.call(
                b"count",
                [b"no.such.Class", [b"remote", 7]],
                [b"remote", 8],
                [b"cached", 99],
                [b"remote", b"not an id"],
                [b"remote", 2**70],
                [b"remote", 0],
                [b"dictionary", [b"remote", 9]],
            )
        released = [reply for reply in self.replies() if reply[0] in (b"decref", b"decache")]
        self.assertEqual(sorted(released), [[b"decref", 7], [b"decref", 8]])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertOthersServed()

    def test_refusedValueReleasesWithinTheLimits(self) -> None:
        """A refused value does not make this side release more references than it would
        have taken (importedReferences): a flood gets no flood of decrefs back."""
        flood = [[b"remote", luid] for luid in range(1, 301)]
        with capturedLogs():
            self.call(b"count", [b"no.such.Class", 1], *flood)
        decrefs = [reply for reply in self.replies() if reply[0] == b"decref"]
        self.assertEqual(len(decrefs), LIMITS.importedReferences)
        self.assertFalse(self.transport.disconnecting)

    def test_exportFlood(self) -> None:
        """A peer that collects references without releasing them is refused, then dropped."""
        with capturedLogs():
            requests = [self.call(b"newObject") for _ in range(5 + 4)]
        self.assertEqual(len(self.hostile.luids), 5)
        failure = self.errorFor(requests[5])
        self.assertIn("Maximum PB reference count exceeded", failure.value)
        self.assertTrue(self.transport.disconnecting)
        self.flushLoggedErrors()
        self.assertOthersServed()

    def test_callFlood(self) -> None:
        """Calls beyond the number in progress allowed fail at once; answered ones free room."""
        with capturedLogs():
            requests = [self.call(b"wait") for _ in range(5)]
        self.assertEqual(len(self.service.waiting), 3)
        failure = self.errorFor(requests[3])
        self.assertTrue(failure.check(LimitExceeded))
        self.assertIn("more than 3 calls in progress", failure.value)
        self.service.waiting[0].callback("done")
        self.call(b"wait")
        self.assertEqual(len(self.service.waiting), 4)
        self.assertFalse(self.transport.disconnecting)
        self.assertOthersServed()

    def test_oneWayCallFlood(self) -> None:
        """One-way calls whose methods have not finished count as calls in progress: past
        the limit they are not run, and one finishing frees room."""
        with capturedLogs():
            for requestID in range(1, 6):
                self.attack(b"message", requestID, b"root", b"wait", 0, [b"tuple"], [b"dictionary"])
            self.assertEqual(len(self.service.waiting), 3)
            failure = self.errorFor(self.call(b"wait"))
        self.assertIn("more than 3 calls in progress", failure.value)
        self.service.waiting[0].callback("done")
        self.call(b"wait")
        self.assertEqual(len(self.service.waiting), 4)
        self.assertFalse(self.transport.disconnecting)

    def test_oneWayCallsWaitingOnAnotherDeferred(self) -> None:
        """A one-way call whose Deferred has fired but waits on another one (a callback that
        returned a Deferred) counts too."""
        inner: list[Deferred[Any]] = []

        def chained() -> Deferred[Any]:
            inner.append(Deferred())
            return succeed(None).addCallback(lambda _: inner[-1])

        self.service.remote_chained = chained  # type: ignore[attr-defined]
        with capturedLogs():
            for requestID in range(1, 6):
                self.attack(
                    b"message", requestID, b"root", b"chained", 0, [b"tuple"], [b"dictionary"]
                )
        self.assertEqual(len(inner), 3)
        inner[0].callback(None)
        self.attack(b"message", 9, b"root", b"chained", 0, [b"tuple"], [b"dictionary"])
        self.assertEqual(len(inner), 4)

    def test_requestIDReused(self) -> None:
        """A call reusing the id of one still in progress drops the peer: the first call's
        answer could not be told from the second's."""
        self.call(b"wait")
        with capturedLogs() as events:
            self.attack(b"message", 1, b"root", b"wait", 1, [b"tuple"], [b"dictionary"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.service.waiting), 1)
        reason = "reused the id 1 of a call still in progress"
        self.assertTrue(any(reason in str(e) for e in events))

    def test_methodNameNotUTF8(self) -> None:
        """A method name that is not UTF-8 fails its call quietly, not with a traceback."""
        with capturedLogs() as events:
            self.nextRequest += 1
            self.attack(
                b"message", self.nextRequest, b"root", b"\xff\xfe", 1, [b"tuple"], [b"dictionary"]
            )
        failure = self.errorFor(self.nextRequest)
        self.assertIn("a method name must be UTF-8", str(failure.value))
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        self.assertFalse(self.transport.disconnecting)

    def test_malformedRemoteReference(self) -> None:
        """A reference expression without exactly one integer id fails its call with
        InvalidJelly quoting it; nothing is imported and the connection stays."""
        for bad in (
            [b"remote"],
            [b"remote", b"x"],
            [b"remote", 1, 2],
            [b"remote", 0],
            [b"remote", 3 * (2**61 - 1)],  # (ids of one hash: see ID_LIMIT)
        ):
            with capturedLogs():
                failure = self.errorFor(self.call(b"count", bad))
            self.assertEqual(failure.type, b"pbroker.errors.InvalidJelly")
            self.assertEqual(
                failure.value,
                f"a remote reference needs one integer id from 1 below 2**61 - 1: {bad!r:.100}",
            )
        self.assertEqual(self.hostile.importedReferences, 0)
        self.assertFalse(self.transport.disconnecting)
        self.assertOthersServed()

    def test_messagesWaitWhileTheConnectionIsFull(self) -> None:
        """While the connection does not take data, the peer's messages wait unhandled; once
        it does they are handled in order, and the count of what waits starts again."""
        paced = self.hostile.transport
        paced.pauseProducing()  # what the real transport does when its buffer is full
        requests = [self.call(b"echo", b"x" * 1000) for _ in range(3)]
        self.assertEqual(self.replies(), [])
        paced.resumeProducing()
        answers = [reply for reply in self.replies() if reply[0] == b"answer"]
        self.assertEqual([reply[1] for reply in answers], requests)
        self.assertEqual(self.hostile._backlogSize, 0)

    def test_peerThatSendsButNeverReads(self) -> None:
        """A peer that sends more than bufferedBytes plus messageSize while its connection
        takes no data has its messages handled after all, and is dropped (with a log line)
        as soon as more than bufferedBytes of answers wait for it; under that nothing
        happens."""
        paced = self.hostile.transport
        paced.pauseProducing()
        callSize = len(
            banana.encode(
                [b"message", 1, b"root", b"echo", 1, [b"tuple", b"x" * 1000], [b"dictionary"]],
                b"pb",
            )
        )
        fits = (LIMITS.bufferedBytes + (LIMITS.messageSize or 0)) // callSize
        with capturedLogs() as events:
            for _ in range(fits):
                self.call(b"echo", b"x" * 1000)
            self.assertFalse(self.transport.disconnecting)
            self.assertEqual(self.replies(), [])
            self.call(b"echo", b"x" * 1000)
        self.assertTrue(self.hostile.overflowing)
        self.assertTrue(self.transport.disconnecting)
        answers = [reply for reply in self.replies() if reply[0] == b"answer"]
        self.assertEqual(len(answers), fits + 1)
        self.assertTrue(any("stopped reading" in str(e.get("log_format")) for e in events))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertOthersServed()

    def test_overflowEndsWhenTheConnectionDrains(self) -> None:
        """Messages handled because too many waited do not make the next pause drop the
        peer at once: once the connection drains, answers wait for stallTimeout again."""
        paced = self.hostile.transport
        paced.pauseProducing()
        with capturedLogs():
            while not self.hostile.overflowing:
                self.attack(b"pong", 1)  # cheap to handle, no answer
        self.assertFalse(self.transport.disconnecting)
        paced.resumeProducing()
        self.assertFalse(self.hostile.overflowing)
        for _ in range(3):
            self.call(b"wait")
        paced.pauseProducing()
        for deferred in self.service.waiting:
            deferred.callback(b"x" * 2000)
        self.assertFalse(self.transport.disconnecting)

    def test_messagesBeforeGarbageHandled(self) -> None:
        """The messages that arrived intact before malformed input are all handled before
        the connection is dropped, even if the connection fills while they are."""
        handled: list[int] = []

        def note(n: int) -> None:
            handled.append(n)
            self.hostile.transport.pauseProducing()  # the connection fills

        self.service.remote_note = note  # type: ignore[attr-defined]
        calls = [
            banana.encode(
                [b"message", n, b"root", b"note", 1, [b"tuple", n], [b"dictionary"]], b"pb"
            )
            for n in (1, 2, 3)
        ]
        with capturedLogs():
            self.hostile.dataReceived(b"".join(calls) + b"\x01\x99")  # an unknown type byte
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(handled, [1, 2, 3])

    def test_droppedPeersWaitingCallsNotRun(self) -> None:
        """The calls of a peer dropped for not reading, waiting while the connection was
        full, are not run as the connection goes."""
        hostile, transport = self.pausedPeerDroppedAtOnce()
        for n in (1, 2):
            call = [b"message", n, b"root", b"wait", 1, [b"tuple"], [b"dictionary"]]
            hostile.dataReceived(banana.encode(call, b"pb"))
        with capturedLogs():
            hostile.transport.write(b"x" * 6000)  # over bufferedBytes: dropped
        self.assertTrue(transport.disconnecting)
        hostile.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.service.waiting, [])

    def test_droppedWhileOverflowingRunsNoMore(self) -> None:
        """A peer dropped while its waiting messages are handled after all (it sent too
        much) has none of the rest run."""
        ran: list[bool] = []
        self.service.remote_note = lambda: ran.append(transport.disconnecting)  # type: ignore[attr-defined]
        limits = dataclasses.replace(LIMITS, bufferedBytes=100_000, messageSize=70_000)
        hostile = pb.PBServerFactory(self.service, limits=limits, clock=self.clock).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 1)
        )
        transport = StringTransport()
        hostile.makeConnection(transport)
        hostile.dataReceived(banana.encode(b"pb"))
        hostile.transport.pauseProducing()
        with capturedLogs():
            for n in range(1, 40):
                if transport.disconnecting:
                    break
                hostile.dataReceived(
                    banana.encode(
                        [
                            b"message",
                            n,
                            b"root",
                            b"echo",
                            1,
                            [b"tuple", b"x" * 10_000],
                            [b"dictionary"],
                        ],
                        b"pb",
                    )
                    + banana.encode(
                        [b"message", 0, b"root", b"note", 0, [b"tuple"], [b"dictionary"]], b"pb"
                    )
                )
        self.assertTrue(hostile.overflowing)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(ran)
        self.assertNotIn(True, ran)

    def test_answersForAReaderThatNeverReads(self) -> None:
        """Answers that come while the connection takes no data (to calls handled before)
        count against bufferedBytes: past it, the peer is dropped if its connection still
        takes nothing stallTimeout seconds later."""
        for _ in range(3):
            self.call(b"wait")
        paced = self.hostile.transport
        paced.pauseProducing()
        timeout = pb.BrokerLimits().stallTimeout
        assert timeout is not None
        with capturedLogs() as events:
            self.service.waiting[0].callback(b"x" * 2000)
            self.service.waiting[1].callback(b"x" * 2000)
            self.service.waiting[2].callback(b"x" * 2000)  # 6000 bytes wait, over 5500
            self.clock.advance(timeout - 1)
            self.assertFalse(self.transport.disconnecting)
            self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(any("stopped reading" in str(e.get("log_format")) for e in events))

    def test_overflowWithTooMuchWaitingDropsAtOnce(self) -> None:
        """A peer for which more than bufferedBytes already waits (the stall timer runs),
        and which then sends too much anyway, one-way calls that write nothing, is dropped
        as it overflows, without waiting for stallTimeout."""
        for _ in range(3):
            self.call(b"wait")
        self.hostile.transport.pauseProducing()
        with capturedLogs() as events:
            for waiting in self.service.waiting:
                waiting.callback(b"x" * 2000)  # 6000 bytes wait, over 5500
            self.assertFalse(self.transport.disconnecting)
            for _ in range(100):
                if self.transport.disconnecting:
                    break
                self.attack(
                    b"message", 0, b"root", b"count", 0, [b"tuple"] + [1] * 50, [b"dictionary"]
                )
        self.assertTrue(self.hostile.overflowing)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.clock.seconds(), 0)
        self.assertTrue(any("stopped reading" in str(e.get("log_format")) for e in events))

    def test_answersForAReaderThatReads(self) -> None:
        """A peer whose connection takes data again before stallTimeout is kept, however
        much waited for it."""
        for _ in range(3):
            self.call(b"wait")
        paced = self.hostile.transport
        paced.pauseProducing()
        for deferred in self.service.waiting:
            deferred.callback(b"x" * 2000)
        self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        paced.resumeProducing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1000)
        self.assertFalse(self.transport.disconnecting)

    def test_stallTimeoutNone(self) -> None:
        """With stallTimeout None, a peer is dropped as soon as more than bufferedBytes
        waits for it."""
        hostile, transport = self.pausedPeerDroppedAtOnce()
        with capturedLogs():
            hostile.transport.write(b"x" * 5000)
            self.assertFalse(transport.disconnecting)
            hostile.transport.write(b"x" * 1000)
        self.assertTrue(transport.disconnecting)

    def test_limitsAreValidated(self) -> None:
        """Limits below 1 are refused when the limits are made."""
        for name in ("nestingDepth", "pendingCalls", "messageSize", "bufferedBytes"):
            with self.assertRaises(ValueError):
                pb.BrokerLimits(**{name: 0})

    def test_limitsAreBoundedAbove(self) -> None:
        """Limits past what the hello can carry (2**63 - 1, msgpack's largest integer) are
        refused when the limits are made, naming the limit; the largest connects, in either
        dialect."""
        for name in ("messageSize", "bufferedBytes", "pendingCalls", "streamBytes"):
            with self.assertRaises(ValueError) as raised:
                pb.BrokerLimits(**{name: 2**64})
            self.assertIn(f"BrokerLimits.{name} must be at most 2**63 - 1", str(raised.exception))
        largest = pb.BrokerLimits(messageSize=2**63 - 1, bufferedBytes=2**63 - 1)
        for dialects in (None, [b"pb"]):
            _server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(Service(), limits=largest),
                pb.PBClientFactory(limits=largest, dialects=dialects),
            )
            answer = client.remoteForName("root").callRemote("echo", 5)
            pump.flush()
            self.assertEqual(self.successResultOf(answer), 5)

    def test_stallTimeoutValidated(self) -> None:
        """stallTimeout is seconds (0 or more) or None; anything else is refused, with a
        message naming it."""
        for bad in (-1, float("nan")):
            with self.assertRaises(ValueError) as raised:
                pb.BrokerLimits(stallTimeout=bad)
            self.assertIn("stallTimeout must be at least 0", str(raised.exception))
        for wrong in ("30", True):
            with self.assertRaises(TypeError) as typed:
                pb.BrokerLimits(stallTimeout=wrong)  # type: ignore[arg-type]
            self.assertIn("stallTimeout must be a number of seconds", str(typed.exception))
        self.assertEqual(pb.BrokerLimits(stallTimeout=0).stallTimeout, 0)
        self.assertIsNone(pb.BrokerLimits(stallTimeout=None).stallTimeout)

    def test_messageSizeNone(self) -> None:
        """messageSize None means no limit, and the other limits are still checked."""
        self.assertIsNone(pb.BrokerLimits(messageSize=None).messageSize)
        with self.assertRaises(ValueError):
            pb.BrokerLimits(messageSize=None, pendingCalls=0)

    def refusedArgument(self, argument: Any) -> str:
        """
        Call echo with ``argument``: the error's text, once it is checked that the call
        failed with InvalidJelly and the connection stays.
        """
        with capturedLogs():
            requestID = self.call(b"echo", argument)
        failure = self.errorFor(requestID)
        self.assertEqual(failure.type, b"pbroker.errors.InvalidJelly")
        self.assertFalse(self.transport.disconnecting)
        return str(failure.value)

    def test_malformedOwnObjectReferences(self) -> None:
        """A reference back to this side's object or Cacheable that is malformed or names
        nothing fails the call with InvalidJelly; the connection stays."""
        self.assertEqual(
            self.refusedArgument([b"local"]), "a local reference needs one id: [b'local']"
        )
        self.assertEqual(
            self.refusedArgument([b"cached", b"x"]),
            "a cache reference needs one integer id from 1 below 2**61 - 1: [b'cached', b'x']",
        )
        self.assertIn(
            "a cache reference needs one integer id",
            self.refusedArgument([b"cached", 2**61 - 1]),
        )
        self.assertEqual(
            self.refusedArgument([b"lcache", 99]),
            "a reference to an unknown cacheable: [b'lcache', 99]",
        )
        self.assertOthersServed()

    def test_objectIDOfAnotherType(self) -> None:
        """A call to an object id that is neither a number nor a name fails as a call to an
        unknown object does; the connection stays."""
        self.attack(b"message", 1, [b"list"], b"echo", 1, [b"tuple", 1], [b"dictionary"])
        failure = self.errorFor(1)
        self.assertEqual(failure.type, b"twisted.spread.pb.Error")
        self.assertEqual(failure.value, "Invalid Object ID")
        self.assertFalse(self.transport.disconnecting)

    def test_oneWayCallToAnUnknownObject(self) -> None:
        """A one-way call to an unknown object gets no answer, is logged in one line (no
        caller will see it), and the connection goes on."""
        with capturedLogs() as events:
            self.attack(b"message", 1, b"nothing", b"echo", 0, [b"tuple", 1], [b"dictionary"])
        self.assertEqual(self.replies(), [])
        self.assertEqual(
            [formatEvent(event) for event in events],
            ["A one-way remote call failed: Error: Invalid Object ID"],
        )
        requestID = self.call(b"echo", 5)
        self.assertEqual(self.replies(), [[b"answer", requestID, 5]])

    def test_malformedMessageHeader(self) -> None:
        """A call whose request id is not a number drops the connection, saying why."""
        with capturedLogs() as events:
            self.attack(b"message", b"x", b"root", b"echo", 1, [b"tuple", 1], [b"dictionary"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.replies(), [])
        self.assertIn(
            "malformed message header: [b'x', b'echo']", [str(e.get("why")) for e in events]
        )

    def test_requestIDsThatCouldShareAHash(self) -> None:
        """
        A call whose request id is negative or 2**61 - 1 or more (such ids can share a hash:
        -1 and -2 do, as do 1 and 2**61) drops the connection, as a malformed header does;
        0 and 2**61 - 2 are ids like any other.
        """
        for requestID in (0, 2**61 - 2):
            self.attack(b"message", requestID, b"root", b"echo", 1, [b"tuple", 1], [b"dictionary"])
            self.assertEqual(self.replies()[-1], [b"answer", requestID, 1])
        for requestID in (-1, 2**61 - 1, 2**61):
            self.setUp()
            with capturedLogs() as events:
                self.attack(
                    b"message", requestID, b"root", b"echo", 1, [b"tuple", 1], [b"dictionary"]
                )
            self.assertTrue(self.transport.disconnecting)
            self.assertEqual(self.replies(), [])
            self.assertIn(
                f"malformed message header: [{requestID}, b'echo']",
                [str(e.get("why")) for e in events],
            )

    def test_didNotUnderstandIsLogged(self) -> None:
        """The peer saying it did not understand a message is logged; the connection stays."""
        with capturedLogs() as events:
            self.attack(b"didNotUnderstand", b"frobnicate")
        self.assertEqual(
            [(e["log_format"], e["command"]) for e in events],
            [("The peer did not understand {command}", "b'frobnicate'")],
        )
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.replies(), [])

    def test_uncacheOfAnUnknownCopy(self) -> None:
        """An uncache of a copy this side never held drops the connection, saying why."""
        with capturedLogs() as events:
            self.attack(b"uncache", 77)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("uncache of an unknown cache id: 77", [str(e.get("why")) for e in events])

    def callToThePeer(self) -> Deferred[Any]:
        """
        A call this side makes to the hostile peer's root (request id 1), written out.
        """
        called = self.hostile.remoteForName("root").callRemote("anything")
        self.assertEqual(self.replies()[0][:4], [b"message", 1, b"root", b"anything"])
        self.transport.clear()
        return called

    def test_errorThatIsNotAnException(self) -> None:
        """An error answer whose value is no exception fails the call with pb.Error naming
        it; the connection stays."""
        called = self.callToThePeer()
        self.attack(b"error", 1, 5)
        failure = self.failureResultOf(called, pb.Error)
        self.assertEqual(str(failure.value), "the peer sent a non-exception error: 5")
        self.assertFalse(self.transport.disconnecting)

    def test_errorThatCannotBeRead(self) -> None:
        """An error answer this side refuses to unjelly fails the call with why; the
        connection stays."""
        called = self.callToThePeer()
        self.attack(b"error", 1, [b"some.unknown.Class", 1])
        failure = self.failureResultOf(called, jelly.InsecureJelly)
        self.assertIn("some.unknown.Class", str(failure.value))
        self.assertFalse(self.transport.disconnecting)

    def test_tooManyCancelledCalls(self) -> None:
        """
        Past the number of cancelled calls remembered one by one, a late answer to any call
        this side made is still taken quietly; one to a call never made still drops the
        peer.
        """
        self.patch(brokerModule, "_MAX_ABANDONED", 1)
        root = self.hostile.remoteForName("root")
        calls = [root.callRemote("slow") for _ in range(3)]
        for call in calls[:2]:
            call.cancel()
            self.failureResultOf(call, CancelledError)
        self.assertEqual(self.hostile._abandoned, {1})
        self.attack(b"answer", 2, 5)  # not remembered, yet made and cancelled
        self.attack(b"answer", 1, 5)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.hostile._abandoned, set())
        self.attack(b"answer", 3, 7)
        self.assertEqual(self.successResultOf(calls[2]), 7)
        with capturedLogs() as events:
            self.attack(b"answer", 4, 5)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("an answer to a request never made: 4", [str(e.get("why")) for e in events])


class HandDriven(SynchronousTestCase):
    """
    A server broker and a native client broker over fake transports whose bytes the test
    moves by hand, so that it decides when each side reads.
    """

    def connectPeers(
        self,
        root: Any,
        limits: pb.BrokerLimits,
        registry: pb.UnjellyableRegistry | None = None,
        clientLimits: pb.BrokerLimits | None = None,
        serverRegistry: pb.UnjellyableRegistry | None = None,
    ) -> None:
        self.clock = getattr(self, "clock", None) or Clock()
        factory = pb.PBServerFactory(root, limits=limits, clock=self.clock, registry=serverRegistry)
        self.server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.serverTransport = StringTransport()
        self.server.makeConnection(self.serverTransport)
        # The client may export many objects: the server's limits are under test.
        clientLimits = clientLimits or pb.BrokerLimits(exportedReferences=100_000)
        self.client = pb.PBClientFactory(
            clock=self.clock, limits=clientLimits, registry=registry
        ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 8789))
        self.clientTransport = StringTransport()
        self.client.makeConnection(self.clientTransport)
        for _ in range(5):
            self.toServer()
            self.toClient()
        self.assertTrue(self.server.isNative)
        self.root = self.client.remoteForName("root")
        # Ended while their fake transports are open: a copy collected later, in a cycle
        # with one, would write its release to a closed one.
        for broker in (self.client, self.server):
            self.addCleanup(self.disconnect, broker)

    @staticmethod
    def disconnect(broker: Any) -> None:
        if broker.disconnected:
            return
        for waiting in broker.waitingForAnswers.values():
            waiting.addErrback(lambda _: None)  # calls the test left unanswered
        broker.connectionLost(Failure(ConnectionDone()))

    def toServer(self) -> None:
        data = self.clientTransport.value()
        self.clientTransport.clear()
        if data:
            self.server.dataReceived(data)

    def toClient(self) -> None:
        data = self.serverTransport.value()
        self.serverTransport.clear()
        if data:
            self.client.dataReceived(data)


class NativeHostilePeerTests(HandDriven):
    """
    Hostile peers in the native dialect, driven through a client broker whose bytes the test
    moves by hand, so that it decides when the client reads.
    """

    def setUp(self) -> None:
        self.service = Service()
        self.service.remote_big = lambda size=3_000_000: b"x" * size  # type: ignore[attr-defined]
        self.service.remote_drop = lambda reference: None  # type: ignore[attr-defined]
        self.connectPeers(self.service, pb.BrokerLimits(bufferedBytes=8192, messageSize=8192))

    def test_keptReleasesGoOnceTheAnswerIsOut(self) -> None:
        """A reader that reads the large answer to the end gets the releases kept behind it,
        and its later calls are answered: nothing is lost or stuck."""
        answers: list[Any] = []
        self.root.callRemote("big").addBoth(answers.append)
        self.toServer()
        for _ in range(80):
            self.root.callRemote("drop", pb.Referenceable(), pbanswer=False)
            self.toServer()
        self.root.callRemote("echo", "after").addBoth(answers.append)
        self.toServer()
        for _ in range(20):
            self.clock.advance(0)
            self.toClient()
            self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)
        # (The 80 releases kept count past bufferedBytes: the echo waited for the answer.)
        self.assertEqual(sorted(map(len, answers)), [5, 3_000_000])
        self.assertEqual(list(self.server._afterLarge), [])
        self.assertEqual(self.client.luids, {})  # every reference released

    def test_keptReleasesDoNotStallLargeCalls(self) -> None:
        """A well-behaved client that keeps many releases behind its own large calls gets
        its uploads answered, and sends the releases after them."""

        class Thing(pb.Referenceable):
            pass

        class Root(pb.Root):
            def remote_refs(self, count: int) -> list[Thing]:
                return [Thing() for _ in range(count)]

            def remote_upload(self, data: bytes) -> int:
                return len(data)

        clock = Clock()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), clock=clock),
            pb.PBClientFactory(clock=clock, limits=pb.BrokerLimits(bufferedBytes=65536)),
            clock=clock,
            bufferSize=64 * 1024,
        )
        root = client.remoteForName("root")
        got: list[Any] = []
        root.callRemote("refs", 1000).addCallback(got.append)
        pump.flush()
        results: list[Any] = []
        for _ in range(3):
            root.callRemote("upload", b"u" * 1_000_000).addBoth(results.append)
        got.clear()  # 1000 decrefs kept behind the uploads
        gc.collect()
        self.assertGreater(len(client._afterLarge), 900)
        for _ in range(200):
            pump.pump()
            clock.advance(1)
        self.assertEqual(results, [1_000_000] * 3)
        self.assertEqual(list(client._afterLarge), [])
        self.assertFalse(client.overflowing)

    def test_overflowWhileTheQueueWasFullEnds(self) -> None:
        """A peer whose messages were handled after all while large answers filled the
        queue (the connection taking data) is treated as any other once they have gone: at
        a later moment of a full connection its few calls wait, rather than getting it
        dropped at once."""
        for _ in range(3):  # more than bufferedBytes of large answers behind the first
            self.root.callRemote("big")
        self.toServer()
        with capturedLogs():
            for _ in range(400):  # small calls: they wait, then overflow
                self.root.callRemote("echo", "x" * 50)
                self.toServer()
        self.assertTrue(self.server.overflowing)
        for _ in range(50):  # the reader reads everything
            self.clock.advance(0)
            self.toClient()
            self.toServer()
        self.assertEqual(self.server._largeOut, [])
        self.assertFalse(self.server.overflowing)
        self.server.transport.pauseProducing()  # a moment later the connection is full
        for _ in range(100):  # fewer bytes than bufferedBytes + messageSize: they wait
            self.root.callRemote("echo", "y" * 100)
            self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)
        self.server.transport.resumeProducing()
        self.assertFalse(self.serverTransport.disconnecting)

    def test_streamsNeverEnded(self) -> None:
        """A peer that sends streams the server drops unread, and never ends them when told
        to stop, cannot make the server remember ever more of them: at most
        importedReferences. Past that each is still told to stop, and a late message for
        one is dropped; a message for a stream the peer never opened is still an error."""
        self.service.remote_drop = lambda streams: None  # type: ignore[attr-defined]
        limit = 2000
        self.server.limits = dataclasses.replace(self.server.limits, importedReferences=limit)
        nextID = 1
        with capturedLogs():
            for requestID in range(1, 51):
                handles = [
                    msgpack.ExtType(_native.STREAM, msgpack.packb(nextID + n)) for n in range(100)
                ]
                nextID += 100
                self.client.sendCall(
                    b"message", requestID, b"root", b"drop", 1, msgpack.packb([handles]), b"\x80"
                )
                self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)
        self.assertEqual(len(self.server._streams.cancelled), limit)
        # Every one was told to stop, those past the limit too.
        sent = _native.FrameDecoder(None).feed(self.serverTransport.value())
        told = [message[1] for message in sent if message[0] == b"streamcancel"]
        self.assertEqual(sorted(told), list(range(1, nextID)))
        # A late message for one past the limit is dropped, the connection kept.
        with capturedLogs():
            self.client.sendCall(b"item", nextID - 1, msgpack.packb("late"))
            self.client.sendCall(b"end", nextID - 1)
            self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)
        self.assertEqual(len(self.server._streams.cancelled), limit)
        # One for a stream the peer never opened is still a protocol error.
        with capturedLogs():
            self.client.sendCall(b"end", nextID)
            self.toServer()
        self.assertTrue(self.serverTransport.disconnecting)

    def test_refusedStreamPastTheCap(self) -> None:
        """A well-behaved client, once the server has stopped as many of its streams as it
        remembers: a stream in a value the server refuses (a class it does not take) is
        stopped without being opened, and the client's end for it is dropped, not taken for
        a message about a stream that never was."""

        class Unknown(pb.Copyable):
            pass

        self.service.remote_drop = lambda *values: None  # type: ignore[attr-defined]
        self.server.limits = dataclasses.replace(self.server.limits, importedReferences=2)
        answers: list[Any] = []
        for _ in range(2):  # stopped, their ends not read yet: the cap is reached
            self.root.callRemote("drop", iter(range(3))).addBoth(answers.append)
            self.toServer()
            gc.collect()
        self.assertEqual(len(self.server._streams.cancelled), 2)
        with capturedLogs():
            self.root.callRemote("drop", Unknown(), iter(range(3))).addBoth(answers.append)
            self.toServer()
            for _ in range(5):
                self.toClient()
                self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)
        self.assertEqual(answers[:2], [None, None])
        self.assertIsInstance(answers[2], Failure)
        self.assertEqual(self.client._streams.outgoing, {})  # every sender was stopped
        after = self.root.callRemote("echo", "after")
        self.toServer()
        self.toClient()
        self.assertEqual(self.successResultOf(after), "after")

    def test_cancelledStreamsEndedBehindAnUpload(self) -> None:
        """A well-behaved client whose stream ends wait behind a large call it is sending
        (they keep their order) while its later calls go ahead is not refused: the streams
        the server stopped do not count against pendingCalls."""

        class Root(pb.Root):
            def remote_upload(self, data: bytes) -> int:
                return len(data)

            def remote_maybe(self, stream: Any) -> str:
                stream.cancel()
                return "skipped"

        clock = Clock()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), clock=clock, limits=pb.BrokerLimits(pendingCalls=4)),
            pb.PBClientFactory(clock=clock),
            clock=clock,
            bufferSize=64 * 1024,
        )
        root = client.remoteForName("root")
        results: list[Any] = []
        root.callRemote("upload", b"u" * 8_000_000).addBoth(results.append)
        for _ in range(20):  # more than twice pendingCalls
            root.callRemote("maybe", iter(range(3))).addBoth(results.append)
            for _ in range(3):
                pump.pump()
        for _ in range(400):
            pump.pump()
        self.assertEqual(sorted(results, key=str), [8_000_000] + ["skipped"] * 20)

    def test_pingsCarryIntegers(self) -> None:
        """A ping carrying anything but an integer drops the peer, with a line saying why:
        echoed back, a large one would be over the peer's own limit."""
        self.client.sendCall(b"hello", {"messageSize": 1})
        self.client.sendCall(b"ping", 7)
        self.toServer()
        self.assertIn(b"pong", self.serverTransport.value())
        with capturedLogs() as events:
            self.client.sendCall(b"ping", b"p" * 2000)
            self.toServer()
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertTrue(any("a ping must carry an integer" in str(e) for e in events))

    def test_longUnknownCommand(self) -> None:
        """An unknown command too long to be any peer's is not echoed back: the peer is
        dropped. A short one is answered with didNotUnderstand, as PB does."""
        self.client.sendCall(b"hello", {"messageSize": 1})
        with capturedLogs():
            self.client.sendCall(b"nosuch")
            self.toServer()
            self.assertIn(b"didNotUnderstand", self.serverTransport.value())
            self.assertFalse(self.serverTransport.disconnecting)
            self.client.sendCall(b"n" * 2000)
            self.toServer()
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertNotIn(b"n" * 2000, self.serverTransport.value())


class AllowListTests(SynchronousTestCase):
    def test_twoServersAcceptDifferentClasses(self) -> None:
        """Two servers in one process, each with its own registry, accept different copies."""

        class Apple(pb.Copyable):
            def getTypeToCopy(self) -> bytes:
                return b"fruit.Apple"

        class Pear(pb.Copyable):
            def getTypeToCopy(self) -> bytes:
                return b"fruit.Pear"

        class Receiver(pb.Root):
            def remote_take(self, fruit: Any) -> str:
                return type(fruit).__name__

        class RemoteApple(pb.RemoteCopy):
            pass

        class RemotePear(pb.RemoteCopy):
            pass

        apples, pears = jelly.UnjellyableRegistry(), jelly.UnjellyableRegistry()
        apples.setUnjellyableForClass(b"fruit.Apple", RemoteApple)
        pears.setUnjellyableForClass(b"fruit.Pear", RemotePear)
        outcomes: dict[tuple[str, str], Any] = {}
        for serverName, registry in (("apples", apples), ("pears", pears)):
            factory = pb.PBServerFactory(Receiver(), registry=registry)
            for fruit in (Apple(), Pear()):
                _server, client, pump = connectedServerAndClient(factory, pb.PBClientFactory())
                results: list[Any] = []
                client.remoteForName("root").callRemote("take", fruit).addBoth(results.append)
                pump.flush()
                outcomes[serverName, type(fruit).__name__] = results[0]
        self.assertEqual(outcomes["apples", "Apple"], "RemoteApple")
        self.assertEqual(outcomes["pears", "Pear"], "RemotePear")
        self.assertTrue(outcomes["apples", "Pear"].check(jelly.InsecureJelly))
        self.assertTrue(outcomes["pears", "Apple"].check(jelly.InsecureJelly))
        self.assertNotIn(b"fruit.Apple", jelly.globalRegistry)
        self.flushLoggedErrors()


class TrickledBacklogTests(HandDriven):
    def test_tinyReadsHeldAsTheirBytes(self) -> None:
        """
        While the connection takes no data, what the peer sends waits unhandled, up to its
        bound; sent in reads of a byte or two it is held in shared pieces, in about its own
        bytes, not an object for each read (40 times as much), and all of it is handled once
        the connection drains.
        """
        self.connectPeers(Service(), pb.BrokerLimits(bufferedBytes=1 << 20, messageSize=1 << 20))
        self.server.transport.pauseProducing()  # the peer stopped reading
        data = _native.records([b"pong", 1])[0] * 25_000  # 300,000 bytes, within the bound
        echo = _native.records([b"message", 1, b"root", b"echo", 1, b"\x91\x07", b"\x80"])[0]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for start in range(0, len(data), 2):
                self.server.dataReceived(data[start : start + 2])
            for start in range(len(echo)):
                self.server.dataReceived(echo[start : start + 1])
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertFalse(self.server.overflowing)
        self.assertEqual(self.server._backlogSize, len(data) + len(echo))
        self.assertLess(held, 1.5 * len(data))
        self.serverTransport.clear()
        self.server.transport.resumeProducing()
        self.assertEqual(self.server._backlogSize, 0)
        answers = []
        self.client.waitingForAnswers[1] = Deferred()
        self.client.waitingForAnswers[1].addBoth(answers.append)
        self.toClient()
        self.assertEqual(answers, [7])


class MalformedCallTests(HandDriven):
    def test_oneLineEach(self) -> None:
        """A call whose arguments are not a list, or whose keywords are not a map of names,
        is the peer's malformed message: refused in one log line each, as other malformed
        values are, not with a traceback; the caller gets the error and the connection
        stays."""
        self.connectPeers(Service(), pb.BrokerLimits())
        answers: dict[int, list[Any]] = {}
        for requestID, args, kw in (
            (1, msgpack.packb(5), b"\x80"),
            (2, msgpack.packb([1]), msgpack.packb([1])),
        ):
            answers[requestID] = []
            waiting = self.client.waitingForAnswers[requestID] = Deferred()
            waiting.addBoth(answers[requestID].append)
            self.client.sendCall(b"message", requestID, b"root", b"echo", 1, args, kw)
        with capturedLogs() as events:
            self.toServer()
        self.toClient()
        self.assertFalse(self.serverTransport.disconnecting)
        self.assertEqual([e.get("log_failure") for e in events], [None, None])
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "Refused a call to b'echo': positional arguments must arrive as a tuple, not int",
                "Refused a call to b'echo': keyword arguments must arrive as a dictionary, not "
                "list",
            ],
        )
        for requestID in (1, 2):
            [failure] = answers[requestID]
            self.assertIn("must arrive as a", failure.getErrorMessage())


class RefusalFloodTests(HandDriven):
    def test_refusalsLoggedUpToABound(self) -> None:
        """Refusals of what the peer sent (an unknown command, a call past pendingCalls) are
        logged a line each up to REFUSALS_LOGGED a connection, then once that more are not,
        and their count when it ends: a peer repeating them cannot fill the log."""
        self.patch(brokerModule, "REFUSALS_LOGGED", 3)
        self.connectPeers(Service(), pb.BrokerLimits(pendingCalls=1))
        self.root.callRemote("wait")  # takes the one call in progress allowed
        self.toServer()
        with capturedLogs() as events:
            for _ in range(5):
                self.client.sendCall(b"z")
            for _ in range(5):  # each past pendingCalls
                self.root.callRemote("echo", 1).addErrback(lambda _: None)
            self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Did not understand PB command b'z'"] * 3
            + [
                "More refusals of what the peer sent are not logged on this connection: "
                "their count is, when it ends"
            ],
        )
        with capturedLogs() as events:
            self.disconnect(self.server)
        self.assertIn(
            "7 more refusals of what the peer sent were not logged",  # of both kinds
            [formatEvent(e) for e in events],
        )


class Noting(pb.Root):
    """
    Notes the numbers it is called with; on those in ``pauseOn``, the connection fills.
    """

    def __init__(self) -> None:
        self.noted: list[int] = []
        self.pauseOn: set[int] = set()
        self.server: Any = None

    def remote_note(self, n: int, padding: bytes = b"") -> int:
        self.noted.append(n)
        if n in self.pauseOn:
            self.server.transport.pauseProducing()
        return n


class BacklogOrderTests(HandDriven):
    def test_pausedAgainWhileHandled(self) -> None:
        """What waited while the connection took no data, in small reads kept in shared
        pieces and large reads kept as they came, is handled in the order it came, also
        when the connection fills again part way through (the rest waits again, in order)."""
        noting = Noting()
        self.connectPeers(noting, pb.BrokerLimits())
        noting.server = self.server
        noting.pauseOn = {7, 19}
        self.server.transport.pauseProducing()
        for n in range(1, 31):
            # Every fifth a large read of its own, the others in reads of 1 to 3 bytes.
            padding = b"p" * 40_000 if n % 5 == 0 else b""
            self.root.callRemote("note", n, padding)
            data = self.clientTransport.value()
            self.clientTransport.clear()
            if padding:
                self.server.dataReceived(data)
            else:
                for start in range(0, len(data), 1 + n % 3):
                    self.server.dataReceived(data[start : start + 1 + n % 3])
        self.assertEqual(noting.noted, [])
        pieces = [type(chunk) for chunk in self.server._backlogData]
        self.assertIn(bytes, pieces)  # the large reads
        self.assertIn(bytearray, pieces)  # the small ones, shared
        self.assertLess(len(pieces), 20)
        for expected in (list(range(1, 8)), list(range(1, 20)), list(range(1, 31))):
            self.server.transport.resumeProducing()
            self.assertEqual(noting.noted, expected)
        self.assertEqual(self.server._backlogSize, 0)
