"""
Faults of the application's making around cancellation and streams are contained: a
canceller that raises, a stream source whose cleanup fails, a stream passed on to another
reader, a window that cannot work. The error is logged (or raised where the mistake is
made), the connection stays up, and what the call or stream held is let go.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import context, pb
from pbroker.errors import LimitExceeded
from pbroker.stream import END, RemoteStream, Stream
from pbroker.testing import connectedServerAndClient
from tests.test_native import NativeTestCase

MiB = 1024 * 1024


def _raise(deferred: Deferred[Any]) -> None:
    raise RuntimeError("the application's canceller broke")


class Holder(pb.Copyable):
    def __init__(self, data: Any = None) -> None:
        self.data = data


class Methods(pb.Root):
    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []
        self.cancelled: list[Deferred[Any]] = []
        self.deadlines: list[float | None] = []

    def remote_badCanceller(self) -> Deferred[Any]:
        return Deferred(_raise)

    def remote_wait(self) -> Deferred[Any]:
        self.deadlines.append(context.current().deadline)
        waiting: Deferred[Any] = Deferred(self.cancelled.append)
        self.waiting.append(waiting)
        return waiting

    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_size(self, value: Any) -> int:
        return len(value)

    def remote_sizes(self, first: Any, second: Any = b"") -> int:
        return len(first) + len(second)


class CallCancellerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.methods = Methods()
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.methods, clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            clock=self.clock,
        )
        self.root = self.client.remoteForName("root")

    def test_raisingCancellerContained(self) -> None:
        """A method's Deferred whose canceller raises, cancelled by its caller's timeout:
        the error is logged, the call answered once (CancelledError, after the caller's
        TimeoutError: dropped), its entries on both sides go, and the connection with its
        other calls stays."""
        other = self.root.callRemote("wait")
        cancelled = self.root.withOptions(timeout=1).callRemote("badCanceller")
        self.pump.flush()
        self.clock.advance(1)
        self.failureResultOf(cancelled, TimeoutError)
        self.pump.flush()
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "the application's canceller broke")
        self.assertFalse(self.server.disconnected or self.client.disconnected)
        self.assertEqual(list(self.server._answering), [1])  # the other call, still waiting
        self.assertEqual(set(self.client._abandoned), set())
        self.assertNoResult(other)
        echo = self.root.callRemote("echo", 7)
        self.pump.flush()
        self.assertEqual(self.successResultOf(echo), 7)

    def test_deadlineOfACallMadeBeforeReady(self) -> None:
        """A call made before the dialect is chosen and sent 3 seconds later: the method's
        deadline is when its caller gives up (5 seconds after the call), and the caller's
        error names the 5 seconds it gave."""
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.methods, clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            greet=False,
            clock=self.clock,
        )
        call = self.client.remoteForName("root").withOptions(timeout=5).callRemote("wait")
        self.clock.advance(3)
        self.pump.flush()
        self.assertEqual(self.methods.deadlines, [5.0])
        self.clock.advance(1.9)
        self.assertNoResult(call)
        self.clock.advance(0.1)
        self.pump.flush()
        failure = self.failureResultOf(call, TimeoutError)
        self.assertEqual(
            failure.getErrorMessage(), "the call to 'wait' had no answer within 5 seconds"
        )
        self.assertEqual(self.methods.cancelled, self.methods.waiting)

    def test_timeoutNamedWhenTheCallSentTimesOutFirst(self) -> None:
        """The call sent once the dialect is chosen has the time left, whose timer may come
        due a hair before the caller's own (the time left is rounded): its error still
        names the timeout the caller gave."""
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.methods, clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            greet=False,
            clock=self.clock,
        )
        self.clock.advance(1 / 3)
        call = self.client.remoteForName("root").withOptions(timeout=2.3).callRemote("wait")
        self.clock.advance(1.1)
        self.pump.flush()
        self.clock.advance(1.2)
        self.pump.flush()
        failure = self.failureResultOf(call, TimeoutError)
        self.assertEqual(
            failure.getErrorMessage(), "the call to 'wait' had no answer within 2.3 seconds"
        )

    def test_callWhoseTimeIsUpAsTheDialectIsChosenIsNotSent(self) -> None:
        """A call made before the dialect is chosen whose timeout is reached in the same
        tick as the choice (its timer due, not yet run): it is not sent, with no time or
        a negative time left, and its timer then fails it naming the caller's timeout;
        the call made after it is sent, and the connection stays up."""
        # (A pump that leaves the clock alone: the choice comes before the timer runs.)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.methods, clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            greet=False,
        )
        root = self.client.remoteForName("root")
        late = root.withOptions(timeout=2).callRemote("wait")
        self.clock.rightNow += 2  # the time has come; the clock has not run the timer yet
        echo = root.callRemote("echo", 7)
        self.pump.flush()
        self.assertEqual(self.methods.waiting, [])  # never sent
        self.assertEqual(self.successResultOf(echo), 7)
        self.assertNoResult(late)
        self.clock.advance(0)
        failure = self.failureResultOf(late, TimeoutError)
        self.assertEqual(
            failure.getErrorMessage(), "the call to 'wait' had no answer within 2 seconds"
        )
        self.pump.flush()
        self.assertFalse(self.server.disconnected or self.client.disconnected)
        self.assertEqual(list(self.client._abandoned), [])


class Jobs(pb.Root):
    """
    Starts work whose Deferred has no canceller (as deferToThread's and a database query's
    have none): cancelling it could not stop the work.
    """

    def __init__(self) -> None:
        self.jobs: list[Deferred[Any]] = []

    def remote_work(self) -> Deferred[Any]:
        job: Deferred[Any] = Deferred()
        self.jobs.append(job)
        return job


class UncancellableWorkTests(SynchronousTestCase):
    def test_countedUntilItEnds(self) -> None:
        """A call the peer cancels whose Deferred cannot be cancelled: the caller gets its
        CancelledError at once, and the call counts against pendingCalls until the work
        ends, its outcome then dropped (a failure logged): cancelled calls cannot start
        work without end."""
        clock = Clock()
        jobs = Jobs()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(jobs, limits=pb.BrokerLimits(pendingCalls=3), clock=clock),
            pb.PBClientFactory(clock=clock),
            clock=clock,
        )
        root = client.remoteForName("root")
        calls = [root.callRemote("work") for _ in range(5)]
        with capturedLogs() as refusals:
            pump.flush()
        self.assertEqual(len(jobs.jobs), 3)
        for call in calls[3:]:
            self.failureResultOf(call).trap(LimitExceeded)
        self.assertEqual(len(refusals), 2)
        for call in calls[:3]:
            call.cancel()
            self.failureResultOf(call, CancelledError)
        pump.flush()
        self.assertEqual(set(client._abandoned), set())  # each was answered, once
        more = [root.callRemote("work") for _ in range(2)]
        with capturedLogs():
            pump.flush()
        self.assertEqual(len(jobs.jobs), 3)  # still counted: refused
        for call in more:
            self.failureResultOf(call).trap(LimitExceeded)
        jobs.jobs[0].callback("done")  # dropped: answered already
        jobs.jobs[1].errback(ValueError("late"))  # logged, as a one-way call's failure
        pump.flush()
        [logged] = self.flushLoggedErrors(ValueError)
        self.assertEqual(str(logged.value), "late")
        again = [root.callRemote("work") for _ in range(3)]
        with capturedLogs():
            pump.flush()
        self.assertEqual(len(jobs.jobs), 5)  # two slots free again
        self.failureResultOf(again[2]).trap(LimitExceeded)
        self.assertFalse(client.disconnected)

    def test_idOfACancelledCallStillInProgress(self) -> None:
        """A peer that reuses the id of a call it cancelled whose work goes on reuses the id
        of a call in progress: a protocol error, as for any call in progress."""
        clock = Clock()
        jobs = Jobs()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(jobs, clock=clock), pb.PBClientFactory(clock=clock), clock=clock
        )
        call = client.remoteForName("root").callRemote("work")
        pump.flush()
        call.cancel()
        self.failureResultOf(call, CancelledError)
        pump.flush()
        requestID = max(server._detached)
        client.waitingForAnswers[requestID] = Deferred()
        client.waitingForAnswers[requestID].addErrback(lambda _: None)
        client.sendCall(b"message", requestID, b"root", b"work", 1, b"\x90", b"\x80")
        with capturedLogs():
            pump.flush()
        self.assertTrue(server.disconnected)


def tracked(log: list[str], count: int = 10**6, size: int | None = None) -> Iterator[Any]:
    """
    ``count`` items (ints, or byte strings of ``size``), noting in ``log`` that the generator
    started and that it was closed.
    """
    log.append("started")
    try:
        for i in range(count):
            yield i if size is None else b"x" * size
    finally:
        log.append("closed")


class StreamCase(NativeTestCase):
    def pumpRounds(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            self.pump.pump()


class PassedOnStreamTests(StreamCase):
    """
    A stream a method passes on (it returns the RemoteStream it was given, or one it reads
    from another peer) stops at its source when its reader stops.
    """

    def test_readerCancelsThrough(self) -> None:
        """The caller's generator comes back to it through the server; cancelling the
        stream it reads cancels the server's reading end, and closes the generator."""
        kept: list[RemoteStream] = []

        def relay(stream: RemoteStream) -> RemoteStream:
            kept.append(stream)  # still referred to: not let go by being collected
            return stream

        self.rootObject.remote_relay = relay  # type: ignore[attr-defined]
        log: list[str] = []
        source = tracked(log)
        answer = self.call("relay", source)
        del source
        self.assertIsInstance(answer, RemoteStream)
        first: list[Any] = []
        answer.next().addBoth(first.append)
        self.pumpRounds()
        self.assertEqual(first, [0])
        answer.cancel()
        self.pumpRounds()
        self.assertEqual(repr(kept[0]), "<RemoteStream 1 cancelled>")
        self.assertEqual(self.server._streams.outgoing, {})
        self.assertEqual(self.client._streams.outgoing, {})
        self.assertEqual(self.server._streams.unreadBytes, 0)
        self.assertEqual(log, ["started", "closed"])

    def test_connectionLossStopsThrough(self) -> None:
        """Upstream server, relay, downstream caller: the downstream connection is lost,
        and the upstream generator is closed."""
        log: list[str] = []

        class Upstream(pb.Root):
            def remote_numbers(self) -> Iterator[int]:
                return tracked(log)

        kept: list[RemoteStream] = []

        class Relay(pb.Root):
            def __init__(self, upstream: Any) -> None:
                self.upstream = upstream

            async def remote_numbers(self) -> RemoteStream:
                stream = await self.upstream.callRemote("numbers")
                kept.append(stream)
                return stream  # type: ignore[no-any-return]

        upServer, upClient, upPump = connectedServerAndClient(
            pb.PBServerFactory(Upstream(), clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            clock=self.clock,
        )
        downServer, downClient, downPump = connectedServerAndClient(
            pb.PBServerFactory(Relay(upClient.remoteForName("root")), clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            clock=self.clock,
        )

        def flush() -> None:
            for _ in range(100):
                upPump.pump()
                downPump.pump()

        answers: list[Any] = []
        downClient.remoteForName("root").callRemote("numbers").addBoth(answers.append)
        flush()
        first: list[Any] = []
        answers[0].next().addBoth(first.append)
        flush()
        self.assertEqual(first, [0])
        downClient.transport.loseConnection()
        flush()
        self.assertTrue(downServer.disconnected)
        self.assertEqual(kept[0]._state, "cancelled")
        self.assertEqual(log, ["started", "closed"])
        self.assertEqual(upServer._streams.outgoing, {})


class CancelTests(StreamCase):
    def test_cancelAfterTheEnd(self) -> None:
        """Leaving ``async with`` after the end has arrived, items unread: they are dropped
        (no longer counted against streamBytes), and reading fails with CancelledError."""
        self.rootObject.remote_chunks = lambda: tracked([], count=6, size=4 * MiB)  # type: ignore[attr-defined]
        stream = self.call("chunks")
        self.pumpRounds(400)
        self.assertEqual(repr(stream), "<RemoteStream 1 ended>")
        self.assertEqual(stream.buffered, 6)
        seen: list[int] = []

        async def readOne() -> None:
            async with stream:
                async for chunk in stream:
                    seen.append(len(chunk))
                    break

        self.successResultOf(Deferred.fromCoroutine(readOne()))
        self.assertEqual(seen, [4 * MiB])
        self.assertEqual(stream.buffered, 0)
        self.assertEqual(self.client._streams.unreadBytes, 0)
        self.failureResultOf(stream.next(), CancelledError)

    def test_cancelAfterTheEndRead(self) -> None:
        """Once every item is read, cancelling changes nothing: the stream has ended."""
        self.rootObject.remote_chunks = lambda: tracked([], count=2)  # type: ignore[attr-defined]
        stream = self.call("chunks")
        items: list[Any] = []
        stream.collect().addCallback(items.extend)
        self.pumpRounds()
        self.assertEqual(items, [0, 1])
        stream.cancel()
        self.assertEqual(repr(stream), "<RemoteStream 1 ended>")
        self.assertIs(self.successResultOf(stream.next()), END)


class SourceCleanupTests(StreamCase):
    def test_asyncCleanupErrorLogged(self) -> None:
        """An error raised as a cancelled source cleans up is logged, for an async generator
        as for a generator, and the connection stays."""
        ran: list[str] = []

        async def asyncSource() -> AsyncIterator[int]:
            try:
                for i in range(10**6):
                    yield i
            finally:
                ran.append("async")
                raise RuntimeError("async cleanup failed")

        def syncSource() -> Iterator[int]:
            try:
                yield from range(10**6)
            finally:
                ran.append("sync")
                raise RuntimeError("sync cleanup failed")

        self.rootObject.remote_async = asyncSource  # type: ignore[attr-defined]
        self.rootObject.remote_sync = syncSource  # type: ignore[attr-defined]
        for name in ("sync", "async"):
            stream = self.call(name)
            self.pumpRounds()
            stream.cancel()
            self.pumpRounds()
        self.assertEqual(ran, ["sync", "async"])
        logged = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(
            sorted(str(f.value) for f in logged), ["async cleanup failed", "sync cleanup failed"]
        )
        self.assertFalse(self.server.disconnected)

    def waitingSource(self) -> tuple[list[str], RemoteStream]:
        """A stream whose source waits on a Deferred whose canceller raises."""
        log: list[str] = []

        async def source() -> AsyncIterator[int]:
            try:
                yield 0
                await Deferred(_raise)
                yield 1
            finally:
                log.append("closed")

        self.rootObject.remote_source = source  # type: ignore[attr-defined]
        stream = self.call("source")
        stream.next()
        self.pumpRounds()
        return log, stream

    def test_raisingCancellerOnCancel(self) -> None:
        """The reader cancels while the source waits: the canceller's error is logged, the
        stream is let go, and the connection stays."""
        _log, stream = self.waitingSource()
        stream.cancel()
        self.pumpRounds(50)
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "the application's canceller broke")
        self.assertEqual(self.server._streams.outgoing, {})
        self.assertFalse(self.server.disconnected)
        self.assertEqual(self.call("echo", 3), 3)

    def test_raisingCancellerOnConnectionLoss(self) -> None:
        """The connection is lost while the source waits: the canceller's error is logged,
        and the rest of the broker's teardown happens (disconnect notifiers, pending calls
        failed, streams dropped)."""
        _log, stream = self.waitingSource()  # (kept: dropped, it would be cancelled first)
        notified: list[bool] = []
        self.server.notifyOnDisconnect(lambda: notified.append(True))

        class Waiter(pb.Referenceable):
            def remote_wait(self) -> Deferred[None]:
                return Deferred()

        self.client.setNameForLocal("waiter", Waiter())
        pending: list[Any] = []
        self.server.remoteForName("waiter").callRemote("wait").addErrback(pending.append)
        self.pumpRounds(5)
        self.assertEqual(repr(stream), "<RemoteStream 1 open>")  # the source still waits
        self.server.transport.loseConnection()
        self.pumpRounds(50)
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "the application's canceller broke")
        self.assertEqual(notified, [True])
        self.assertEqual([f.type for f in pending], [pb.PBConnectionLost])
        self.assertEqual(self.server._streams.outgoing, {})


class WrittenItemTests(StreamCase):
    def test_changeableBytesCopiedWhenWritten(self) -> None:
        """A bytearray or a memoryview of one written to a Stream is sent as it was when
        written, as a call's argument is, though changed before it is sent."""

        def chunks() -> Stream:
            stream = Stream()
            buffer = bytearray(b"a" * 100)
            stream.write(buffer)
            stream.write(memoryview(buffer)[:10])
            buffer[:] = b"b" * 100  # changed after it was written, before it is sent
            stream.finish()
            return stream

        self.rootObject.remote_chunks = chunks  # type: ignore[attr-defined]
        stream = self.call("chunks")
        items: list[Any] = []
        stream.collect().addCallback(items.extend)
        self.pumpRounds()
        self.assertEqual(items, [b"a" * 100, b"a" * 10])

    def test_localReaderGetsTheSameType(self) -> None:
        """Read locally, the copy keeps the item's type and shape."""
        stream = Stream()
        buffer = bytearray(b"abcd")
        stream.write(buffer)
        stream.write(memoryview(buffer).cast("B", (2, 2)))
        buffer[:] = b"wxyz"
        stream.finish()
        first = self.successResultOf(stream.__anext__())
        second = self.successResultOf(stream.__anext__())
        self.assertEqual((type(first), first), (bytearray, bytearray(b"abcd")))
        self.assertEqual((second.shape, second.tolist()), ((2, 2), [[97, 98], [99, 100]]))


class PeerWithoutLimitTests(SynchronousTestCase):
    def test_refusalSaysWhoseLimit(self) -> None:
        """To a peer that announced no message limit, a value is bounded by its items by
        this side's own limit (one whose lists share their parts could expand without end,
        see docs/security.rst), and the refusal says that it is this side's limit."""
        clock = Clock()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Methods(), limits=pb.BrokerLimits(messageSize=None), clock=clock),
            pb.PBClientFactory(limits=pb.BrokerLimits(messageSize=MiB), clock=clock),
            clock=clock,
        )
        self.assertIsNone(client.peerMessageSize)
        root = client.remoteForName("root")
        alone: list[Any] = []
        root.callRemote("size", b"x" * (2 * MiB)).addBoth(alone.append)
        for _ in range(1000):
            if alone:
                break
            pump.pump()
        self.assertEqual(alone, [2 * MiB])  # a string alone cannot expand
        shared = [[b"x" * 1024] * 1024] * 2  # 2 MiB packed, from 1 KiB
        failure = self.failureResultOf(root.callRemote("size", shared), LimitExceeded)
        self.assertEqual(
            failure.getErrorMessage(),
            f"a value of more than {MiB} items is over the {MiB}-byte limit this side takes "
            "in a message (the peer announced none: a value sent is bounded by it too, by its "
            "items) (each item, and each character of a string, takes a byte at least; a list "
            "or other container that appears more than once in a value is sent each time)",
        )

    def test_jelliedObjectsSayWhoseLimit(self) -> None:
        """The same for objects that travel through jelly, counted as they are jellied."""
        clock = Clock()
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Holder, pb.RemoteCopy)
        _server, client, _pump = connectedServerAndClient(
            pb.PBServerFactory(
                Methods(), limits=pb.BrokerLimits(messageSize=None), registry=registry
            ),
            pb.PBClientFactory(limits=pb.BrokerLimits(messageSize=MiB), clock=clock),
            clock=clock,
        )
        holders = [Holder(b"x" * (600 * 1024)) for _ in range(3)]  # (the first goes free)
        failure = self.failureResultOf(
            client.remoteForName("root").callRemote("size", holders), LimitExceeded
        )
        self.assertIn(
            f"over the {MiB}-byte limit this side takes in a message (the peer announced none",
            failure.getErrorMessage(),
        )


class Giver(pb.Root):
    def __init__(self) -> None:
        self.answer: Any = None

    def remote_give(self) -> Any:
        answer, self.answer = self.answer, None
        return answer


class RefusedBeforeCopiedTests(SynchronousTestCase):
    """
    An answer too large for the caller that is a text, bytearray or memoryview is refused
    before it is encoded or copied, as a byte string is: sending it takes no memory in
    proportion to it.
    """

    def setUp(self) -> None:
        clock = Clock()
        self.giver = Giver()
        _server, client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.giver, clock=clock),
            pb.PBClientFactory(limits=pb.BrokerLimits(messageSize=MiB), clock=clock),
            clock=clock,
        )
        self.root = client.remoteForName("root")

    def peakWhileRefused(self, answer: Any) -> tuple[int, Failure]:
        """The memory traced at its peak while ``answer`` is refused, and the failure."""
        self.giver.answer = answer
        del answer
        results: list[Any] = []
        tracemalloc.start()
        try:
            self.root.callRemote("give").addBoth(results.append)
            for _ in range(100):
                if results:
                    break
                self.pump.pump()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        [failure] = results
        failure.trap(LimitExceeded)
        return peak, failure

    def test_text(self) -> None:
        peak, failure = self.peakWhileRefused("x" * (16 * MiB))
        self.assertLess(peak, 2 * MiB)
        self.assertIn(f"a str of {16 * MiB} characters is over the", failure.getErrorMessage())

    def test_bytearray(self) -> None:
        peak, failure = self.peakWhileRefused(bytearray(16 * MiB))
        self.assertLess(peak, 2 * MiB)
        self.assertIn(f"a bytearray of {16 * MiB} bytes is over the", failure.getErrorMessage())

    def test_memoryview(self) -> None:
        peak, failure = self.peakWhileRefused(memoryview(bytearray(16 * MiB)))
        self.assertLess(peak, 2 * MiB)
        self.assertIn(f"a memoryview of {16 * MiB} bytes is over the", failure.getErrorMessage())

    def test_callArgument(self) -> None:
        """A call's one bytearray argument over the peer's limit is refused before it is
        copied too."""
        _server, client, _pump = connectedServerAndClient(
            pb.PBServerFactory(Methods(), limits=pb.BrokerLimits(messageSize=MiB)),
            pb.PBClientFactory(),
        )
        data = bytearray(16 * MiB)
        tracemalloc.start()
        try:
            call = client.remoteForName("root").callRemote("size", data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        failure = self.failureResultOf(call, LimitExceeded)
        self.assertLess(peak, 2 * MiB)
        self.assertIn(f"a bytearray of {16 * MiB} bytes is over the", failure.getErrorMessage())

    def test_withinTheLimit(self) -> None:
        """Text and a bytearray just under the limit still go."""
        for answer in ("x" * (MiB - 100), bytearray(MiB - 100)):
            self.giver.answer = answer
            results: list[Any] = []
            self.root.callRemote("give").addBoth(results.append)
            for _ in range(100):
                if results:
                    break
                self.pump.pump()
            self.assertEqual(results, [bytes(answer) if type(answer) is bytearray else answer])


class ArgumentsAndKeywordsTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        _server, client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(
                Methods(), limits=pb.BrokerLimits(messageSize=16 * MiB), clock=clock
            ),
            pb.PBClientFactory(clock=clock),
            clock=clock,
        )
        self.root = client.remoteForName("root")

    def test_keywordsRefusedBeforePacked(self) -> None:
        """Arguments and keywords that each fit the peer's limit but together do not: the
        keywords are refused before they are packed, within what the arguments left."""
        args, keywords = "x" * (10 * MiB), "y" * (10 * MiB)
        results: list[Any] = []
        tracemalloc.start()
        try:
            self.root.callRemote("echo", args, kw=keywords).addBoth(results.append)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        [failure] = results
        failure.trap(LimitExceeded)
        self.assertLess(peak, 12 * MiB)  # the arguments' 10 MiB, not the keywords' as well
        self.assertRegex(
            failure.getErrorMessage(),
            r"^a call's arguments take 1048\d{4} bytes, and its keywords more than the \d+ left "
            r"of the 16777216-byte limit of a message to the peer$",
        )

    def test_togetherWithinTheLimit(self) -> None:
        results: list[Any] = []
        self.root.callRemote("sizes", "x" * (6 * MiB), second="y" * (6 * MiB)).addBoth(
            results.append
        )
        for _ in range(1000):
            if results:
                break
            self.pump.pump()
        self.assertEqual(results, [12 * MiB])


class StreamWindowTests(SynchronousTestCase):
    def test_checked(self) -> None:
        """Broker.streamWindow is an integer of at least 1, set on a broker or in a
        subclass; anything else is refused where it is set."""
        broker = pb.Broker()
        self.assertEqual(broker.streamWindow, 16)
        broker.streamWindow = 4
        self.assertEqual((broker.streamWindow, pb.Broker().streamWindow), (4, 16))
        for bad, error, message in (
            (0, ValueError, "Broker.streamWindow must be at least 1, not 0"),
            (-3, ValueError, "Broker.streamWindow must be at least 1, not -3"),
            (1.5, TypeError, "Broker.streamWindow must be an integer, not 1.5"),
            (True, TypeError, "Broker.streamWindow must be an integer, not True"),
        ):
            with self.assertRaises(error) as raised:
                broker.streamWindow = bad  # type: ignore[assignment]
            self.assertEqual(str(raised.exception), message)
        self.assertEqual(broker.streamWindow, 4)

        class Wide(pb.Broker):
            streamWindow = 64

        self.assertEqual(Wide().streamWindow, 64)
        with self.assertRaises(ValueError):

            class Shut(pb.Broker):
                streamWindow = 0


class NarrowWindowTests(StreamCase):
    def test_windowOfOne(self) -> None:
        """A reader with a window of one item gets the whole stream."""
        self.client.streamWindow = 1
        self.rootObject.remote_numbers = lambda: iter(range(5))  # type: ignore[attr-defined]
        stream = self.call("numbers")
        items: list[Any] = []
        stream.collect().addCallback(items.extend)
        self.pumpRounds()
        self.assertEqual(items, [0, 1, 2, 3, 4])
