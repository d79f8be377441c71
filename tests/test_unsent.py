"""
Large native calls cancelled before any of them is written: they are dropped unsent, and
what packing them counted is released, without stalling or breaking what waits behind them
(releases, streams, cache handles) or the pacing of the connection.
"""

from __future__ import annotations

import gc
import inspect
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.testing import connectedServerAndClient
from tests.test_broker import Gauge, RemoteGauge

MiB = 1024 * 1024
BIG = MiB * 3 // 2  # over half the 1 MiB window: a second one waits for the first's "taken"


class Child(pb.Referenceable):
    def remote_ping(self) -> int:
        return 1


class Root(pb.Root):
    def __init__(self) -> None:
        self.kept: Any = None
        self.child = Child()

    def remote_take(self, *args: Any) -> int:
        return len(args)

    def remote_keep(self, g: Any) -> None:
        self.kept = g

    def remote_release(self) -> None:
        self.kept = None

    def remote_child(self) -> Child:
        return self.child


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rootObject = Root()
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Gauge, RemoteGauge)
        limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB)
        # Unbounded fake transports: what the client writes waits there until pumped.
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock, limits=limits, registry=registry),
            pb.PBClientFactory(clock=self.clock, limits=limits),
            clock=self.clock,
        )
        self.root = self.client.remoteForName("root")

    def writeAll(self) -> None:
        """Let the client write its queued fragments (into the transport, not delivered)."""
        for _ in range(1000):
            if not self.client._largeOut or self.client._largeOut[0][3]:
                return
            self.clock.advance(0)
        self.fail("not written")

    def successResultOf_(self, d: Any) -> Any:
        self.pump.flush()
        return self.successResultOf(d)

    def firstWrittenSecondWaits(self, *secondArgs: Any) -> Any:
        first = self.root.callRemote("take", b"1" * BIG)
        self.writeAll()
        self.assertEqual(self.client._largeOut, [])  # all of first written, untaken
        second = self.root.callRemote("take", b"2" * BIG, *secondArgs)
        self.assertGreater(self.client._largeOut[0][3], 0)  # waits for room (unwritten)
        return first, second


class DroppedUnsentCallTests(Base):
    def test_whatWaitsBehindGoesOn(self) -> None:
        """Dropping the last large message queued lets what waited behind it (a decref)
        go."""
        before = len(self.server.localObjects)
        child = self.successResultOf_(self.root.callRemote("child"))
        self.assertEqual(len(self.server.localObjects), before + 1)
        first, second = self.firstWrittenSecondWaits()
        del child
        gc.collect()  # its decref waits behind the queued large call
        self.assertEqual(len(self.client._afterLarge), 1)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        for _ in range(50):
            self.pump.flush()
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(list(self.client._afterLarge), [])
        self.assertEqual(len(self.server.localObjects), before)  # the child is unexported

    def test_cancelledInEitherOrder(self) -> None:
        """Waiting calls cancelled newest first (the queue is searched from its nearer end)
        or oldest first are each dropped unsent: the peer runs only the call written."""
        ran: list[int] = []
        self.rootObject.remote_take = lambda *args: ran.append(len(args)) or len(args)  # type: ignore[method-assign]
        for order in (reversed, list):
            first = self.root.callRemote("take", b"1" * BIG)
            self.writeAll()
            waiting = [self.root.callRemote("take", b"w" * BIG, index) for index in range(5)]
            self.assertEqual(len(self.client._largeOut), 5)
            for call in order(waiting):
                call.cancel()
                self.failureResultOf(call, CancelledError)
            self.assertEqual(self.client._largeOut, [])
            self.assertEqual(self.successResultOf_(first), 1)
        self.assertEqual(ran, [1, 1])  # the two first calls, never a waiting one (two args)

    def test_streamsGoOn(self, cancel: bool = True) -> None:
        """Streams, which wait while anything waits behind large messages, go on once the
        last large call is dropped."""
        child = self.successResultOf_(self.root.callRemote("child"))
        _first, second = self.firstWrittenSecondWaits()
        del child
        gc.collect()
        if cancel:
            second.cancel()
            self.failureResultOf(second, CancelledError)
        got: list[Any] = []

        async def total(stream: Any) -> int:
            return sum([item async for item in stream])

        self.rootObject.remote_sum = total  # type: ignore[attr-defined]
        self.root.callRemote("sum", iter([1, 2, 3])).addBoth(got.append)
        for _ in range(50):
            self.pump.flush()
            self.clock.advance(1)
        self.assertEqual(got, [6])

    def test_streamsWithoutCancel(self) -> None:
        self.test_streamsGoOn(cancel=False)

    def test_callWithAFirstCopyNotDropped(self) -> None:
        """A call that carries the first copy of a Cacheable is sent (then cancelled) even if
        none of it was written: a later call queued behind it names the copy by handle."""
        gauge = Gauge()
        _first, second = self.firstWrittenSecondWaits(gauge)  # second: first copy of gauge
        third = self.root.callRemote("take", b"3" * BIG)  # keeps _largeOut non-empty
        later = self.root.callRemote("keep", gauge)  # a handle, waits in _afterLarge
        self.assertEqual(len(self.client._afterLarge), 1)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        with capturedLogs():
            for _ in range(50):
                self.pump.flush()
                self.clock.advance(1)
        self.assertEqual(self.successResultOf(third), 1)
        self.successResultOf(later)
        self.assertIsInstance(self.rootObject.kept, RemoteGauge)

    def test_lastHandleDroppedSendsUncache(self) -> None:
        """The peer releases its copy while a call naming it waits; dropping the call
        releases the last count, and the peer is told to forget the copy ("uncache")."""
        gauge = Gauge()
        self.successResultOf_(self.root.callRemote("keep", gauge))
        self.assertEqual(len(self.server.locallyCachedObjects), 1)
        server, client = self.pump.server, self.pump.client
        released = self.root.callRemote("release")
        releaseBytes = self.pump.clientIO.getOutBuffer()
        first = self.root.callRemote("take", b"1" * BIG)
        self.writeAll()
        firstBytes = self.pump.clientIO.getOutBuffer()
        second = self.root.callRemote("take", b"2" * BIG, gauge)  # a handle: count 2
        self.assertGreater(self.client._largeOut[0][3], 0)
        # Only "release" reaches the server; its answer and decache come back.
        server.dataReceived(releaseBytes)
        gc.collect()
        client.dataReceived(self.pump.serverIO.getOutBuffer())
        self.successResultOf(released)
        self.assertEqual(self.client.remotelyCachedObjects[1].refcount, 1)
        second.cancel()  # count 0: forgotten here
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.client.remotelyCachedObjects, {})
        server.dataReceived(firstBytes)
        self.pump.flush()
        self.successResultOf(first)
        self.assertEqual(self.server.locallyCachedObjects, {})

    def test_droppedCallClosesItsStreams(self) -> None:
        closed: list[bool] = []

        def source() -> Any:
            try:
                yield 1
            finally:
                closed.append(True)

        gen = source()
        _first, second = self.firstWrittenSecondWaits(gen)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(inspect.getgeneratorstate(gen), "GEN_CLOSED")
        self.assertEqual(self.client._streams.outgoing, {})
        self.pump.flush()
        self.assertFalse(self.client.disconnected or self.server.disconnected)

    def test_helloTakenValues(self) -> None:
        """Only a positive int in the hello's "taken" has this side hold back its calls, by
        the smaller of it and its own bufferedBytes; other values are ignored."""
        for value in (True, False, -5, 0, 1.5, "x", None, 2**62):
            self.client._untakenLimit = 0
            self.client._hello({"messageSize": 4 * MiB, "taken": value})
            expected = value == 2**62
            self.assertEqual(self.client._untakenLimit, MiB if expected else 0, value)
        self.assertEqual(self.client._untakenLimit, MiB)


class DroppedWhilePausedTests(SynchronousTestCase):
    def test_droppedCallsUncounted(self) -> None:
        """Calls queued behind a large message while the connection is paused, then dropped
        on cancel, no longer count as waiting for the peer: a caller that times out and
        retries does not get its slow peer dropped."""
        clock = Clock()
        limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB, stallTimeout=None)
        _server, client, _pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), clock=clock, limits=limits),
            pb.PBClientFactory(clock=clock, limits=limits),
            clock=clock,
            bufferSize=64 * 1024,
        )
        root = client.remoteForName("root")
        root.callRemote("take", b"0" * (3 * MiB)).addErrback(lambda _: None)
        self.assertTrue(client.transport.paused)
        with capturedLogs() as events:
            for _attempt in range(3):  # each: 3 MiB queued, then cancelled (dropped)
                d = root.callRemote("take", b"x" * (3 * MiB))
                d.cancel()
                self.failureResultOf(d, CancelledError)
                self.assertEqual(len(client._largeOut), 1)  # only the first one waits
        # Counted, the three would pass bufferedBytes plus the peer's messageSize (5 MiB).
        self.assertEqual(
            [e.get("log_format", "")[:30] for e in events if "Dropping" in e.get("log_format", "")],
            [],
        )
        self.assertLessEqual(client.transport.queuedWhilePaused, 3 * MiB)


class SharedExportTests(Base):
    def test_droppedCallExportSharedWithSentOne(self) -> None:
        """An export counted by both a sent call and a dropped one: one decref, not two."""
        child = Child()
        self.successResultOf_(self.root.callRemote("keep", child))
        first, second = self.firstWrittenSecondWaits(child)
        self.assertEqual(len(self.client.localObjects), 1)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(len(self.client.localObjects), 1)  # still held by the server
        self.pump.flush()
        self.successResultOf(first)
        got: list[Any] = []
        self.rootObject.kept.callRemote("ping").addBoth(got.append)
        self.pump.flush()
        self.assertEqual(got, [1])
        self.successResultOf_(self.root.callRemote("release"))
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.client.localObjects, {})
