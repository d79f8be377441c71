"""
Closing a connection with loseConnection() while data still waits for the peer: what was
sent, large native messages queued included, goes before the connection closes, and the
stall timer still drops a peer that reads none of it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb, util
from pbroker._native import FRAGMENT_SIZE
from pbroker.testing import connectedServerAndClient
from tests.test_keptreleases import stopTaking
from tests.test_native import NativeRoot

MiB = 1024 * 1024


def nativePeers(
    limits: pb.BrokerLimits, bufferSize: int, root: Any = None
) -> tuple[Any, Any, Any, Clock]:
    """
    A server serving ``root`` (a NativeRoot by default) and a client, both with ``limits``,
    connected in memory through transports that take ``bufferSize`` bytes, on a new clock.
    """
    clock = Clock()
    server, client, pump = connectedServerAndClient(
        pb.PBServerFactory(NativeRoot() if root is None else root, clock=clock, limits=limits),
        pb.PBClientFactory(clock=clock, limits=limits),
        clock=clock,
        bufferSize=bufferSize,
    )
    return server, client, pump, clock


def fillWithAnswers(client: Any, pump: Any, clock: Clock) -> list[Deferred[Any]]:
    """
    Ask the server's NativeRoot for large answers (3 MiB, then two of 600,000 bytes), let the
    server read the calls and write what the connection takes, and return their Deferreds:
    with a transport that takes 3,000,000 bytes, the connection is then full (the client
    reads nothing more until pumped) and more than 1 MiB waits behind the answer being sent.
    """
    root = client.remoteForName("root")
    answers = [root.callRemote("big", size) for size in (3 * MiB, 600_000, 600_000)]
    pump.pump()
    for _ in range(10):
        clock.advance(0)
    return answers


def unreadAnswer(client: Any, pump: Any, clock: Clock) -> Deferred[Any]:
    """
    Ask the server's NativeRoot for an answer of 6 MiB and let the server read the call and
    write what the connection takes: with a transport that takes 64 KiB, the connection is
    then full (the client reads nothing more until pumped), the answer being sent.
    """
    answer = client.remoteForName("root").callRemote("big", 6 * MiB)
    pump.pump()
    for _ in range(10):
        clock.advance(0)
    return answer


class LaterRoot(pb.Root):
    """
    A root whose ``later`` answers when the test says, with strings of 500,000 bytes (the
    ``pb`` dialect's strings are at most 640 KiB), and whose ``big`` answers at once.
    """

    def __init__(self) -> None:
        self.later: list[Deferred[Any]] = []

    def remote_big(self, count: int) -> list[bytes]:
        return [b"x" * 500_000] * count

    def remote_later(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.later.append(d)
        return d


class StallTimerAfterLoseConnectionTests(SynchronousTestCase):
    """
    A stall timer running when the broker's transport is closed with loseConnection() goes on
    running: the real transport no longer pauses or resumes the broker, and sends what it
    holds before it closes, so a peer that reads none of it would otherwise keep the
    connection (and its broker, pending calls and avatar) for ever.
    """

    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB, stallTimeout=30)

    def assertDroppedAfterStall(self, server: Any, clock: Clock) -> None:
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        self.assertIsNotNone(transport._stall)  # the stall timer runs
        with capturedLogs() as logs:
            transport.loseConnection()
            clock.advance(31)  # the client reads nothing
        self.assertIn(
            "Dropping a peer that stopped reading", " ".join(formatEvent(e) for e in logs)
        )
        self.assertIsNone(transport._stall)

    def test_native(self) -> None:
        """More than bufferedBytes of large answers wait behind the one being sent, the
        connection full (the stall timer runs), when the server closes the connection."""
        server, client, pump, clock = nativePeers(self.limits, 3_000_000)
        fillWithAnswers(client, pump, clock)  # the client reads nothing from now on
        self.assertDroppedAfterStall(server, clock)

    def test_pb(self) -> None:
        """More than bufferedBytes of answers written after the connection filled (the
        stall timer runs), when the server closes the connection."""
        clock = Clock()
        rootObject = LaterRoot()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(rootObject, clock=clock, limits=self.limits),
            pb.PBClientFactory(clock=clock, dialects=[b"pb"]),
            clock=clock,
            bufferSize=64 * 1024,
        )
        root = client.remoteForName("root")
        for _ in range(3):
            root.callRemote("later")
        root.callRemote("big", 2)
        pump.pump()  # the server reads the calls; the client reads nothing from now on
        self.assertEqual(len(rootObject.later), 3)
        for d in rootObject.later:
            d.callback([b"y" * 500_000])
        self.assertDroppedAfterStall(server, clock)

    def test_readerNotDropped(self) -> None:
        """A client that reads what the closing connection holds gets it all, and the
        connection then closes as asked: the timer that went on running drops no one."""
        server, client, pump, clock = nativePeers(self.limits, 3_000_000)
        root = client.remoteForName("root")
        answers = [root.callRemote("big", 3 * MiB)]
        pump.flush()
        for answer in fillWithAnswers(client, pump, clock):
            answers.append(answer.addErrback(lambda f: f.value))
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        with capturedLogs() as logs:
            transport.loseConnection()
            pump.flush()
            clock.advance(31)
        self.assertEqual(
            [e for e in logs if "Dropping" in formatEvent(e)], [], "the reader was dropped"
        )
        self.assertTrue(server.disconnected)
        self.assertEqual(len(self.successResultOf(answers[0])), 3 * MiB)


class Taker(pb.Root):
    """
    A root that records the size of what its ``take`` is given (a small value as it is).
    """

    def __init__(self) -> None:
        self.taken: list[Any] = []

    def remote_take(self, data: Any) -> None:
        self.taken.append(len(data) if isinstance(data, bytes) else data)


class QueuedOnLoseConnectionTests(SynchronousTestCase):
    """
    loseConnection() sends the large native messages queued (the rest of the one being sent,
    those behind it, and what is kept behind them) before the connection closes, as the
    ``pb`` dialect, which writes every message whole, does, and as the connection takes
    them: the real transport is closed once they are all written.
    """

    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=30)

    def connect(self, root: Any, bufferSize: int) -> tuple[Any, Any, Any, Clock]:
        return nativePeers(self.limits, bufferSize, root)

    def test_answerBeingSent(self) -> None:
        """The server closes the connection right after its method answered with a large
        value: the client gets the whole answer, then the connection closes."""
        server, client, pump, _ = self.connect(NativeRoot(), 64 * 1024)
        answer = client.remoteForName("root").callRemote("big", 3 * MiB)
        pump.pump()  # the server reads the call; its answer is queued, partly written
        self.assertTrue(server.sendingLarge)
        server.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertFalse(server.sendingLarge)
        self.assertEqual(len(self.successResultOf(answer)), 3 * MiB)
        self.assertTrue(server.disconnected)
        self.assertTrue(client.disconnected)

    def test_writtenAsTaken(self) -> None:
        """What is queued at the close is written as the connection takes it, as it would
        be if the connection stayed open: the transport never holds much more than its
        buffer and one fragment (handing it all over at once took twice its size again),
        and the real transport is closed only once it is all written."""
        server, client, pump, clock = self.connect(NativeRoot(), 64 * 1024)
        answer = client.remoteForName("root").callRemote("big", 7 * MiB)
        pump.pump()
        transport: Any = server.transport
        real = transport._transport
        self.assertTrue(server.sendingLarge)
        transport.loseConnection()
        bound = 64 * 1024 + FRAGMENT_SIZE + 64
        most = real.pendingBytes()
        turns = 0
        while not server.disconnected and turns < 1000:
            self.assertEqual(real.disconnecting, not server.sendingLarge)
            pump.pump()
            clock.advance(0)
            most = max(most, real.pendingBytes())
            turns += 1
        self.assertTrue(server.disconnected)
        self.assertLessEqual(most, bound)
        self.assertGreater(turns, 20)  # it took many turns, not one
        self.assertEqual(len(self.successResultOf(answer)), 7 * MiB)

    def test_nothingHandledWhileClosing(self) -> None:
        """Once the server closes the connection, calls that arrive while it writes what
        is queued are not handled (a closing transport reads nothing more): their callers
        get PBConnectionLost once the connection closes."""
        root = NativeRoot()
        server, client, pump, _ = self.connect(root, 64 * 1024)
        remote = client.remoteForName("root")
        answer = remote.callRemote("big", 3 * MiB)
        pump.pump()
        server.transport.loseConnection()  # type: ignore[union-attr]
        late = remote.callRemote("wait")
        pump.flush()
        self.assertEqual(len(self.successResultOf(answer)), 3 * MiB)
        self.failureResultOf(late, pb.PBConnectionLost)
        self.assertIsNone(root.pending)  # remote_wait never ran
        self.assertTrue(server.disconnected)

    def test_answeredAfterClose(self) -> None:
        """A large answer made after the closing connection has handed over everything
        queued (its real transport is closing) is handed over too, whole, as a write to a
        closing transport is in the ``pb`` dialect: a TCP transport sends what it is given
        before it closes. (iosim's transports drop it, so this test looks at
        what the real transport is given.)"""
        root = NativeRoot()
        server, client, pump, clock = self.connect(root, 64 * 1024)
        later = client.remoteForName("root").callRemote("wait")
        later.addErrback(lambda f: f.trap(pb.PBConnectionLost))
        pump.flush()
        assert root.pending is not None
        transport: Any = server.transport
        transport.loseConnection()
        self.assertTrue(transport.closed)  # nothing was queued
        given: list[int] = []
        real = transport._transport
        real.write = lambda data: given.append(len(data))
        root.pending.callback(b"y" * (3 * MiB))
        # A bounded amount per reactor turn (the real transport no longer paces the broker,
        # and would join all it holds into one string at once), all of it in the end.
        self.assertTrue(server.sendingLarge)
        self.assertLessEqual(sum(given), 5 * FRAGMENT_SIZE)
        clock.advance(0)
        self.assertFalse(server.sendingLarge)
        self.assertGreater(sum(given), 3 * MiB)

    def test_answeredWhileClosing(self) -> None:
        """A large answer made while the closing connection is full (a method that answered
        later) is written after what was queued, before the connection closes."""
        root = NativeRoot()
        server, client, pump, _ = self.connect(root, 64 * 1024)
        remote = client.remoteForName("root")
        later = remote.callRemote("wait")
        answer = remote.callRemote("big", 3 * MiB)
        pump.pump()
        assert root.pending is not None
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        transport.loseConnection()
        root.pending.callback(b"y" * (2 * MiB))
        self.assertFalse(transport.closed)
        pump.flush()
        self.assertEqual(len(self.successResultOf(answer)), 3 * MiB)
        self.assertEqual(self.successResultOf(later), b"y" * (2 * MiB))
        self.assertTrue(server.disconnected)

    def test_answersWaitingWhilePaused(self) -> None:
        """The server closes the connection while it is full, with large answers queued
        (the transport no longer resumes the broker once it is closing): the client that
        reads on gets them all."""
        server, client, pump, clock = self.connect(NativeRoot(), 3_000_000)
        answers = fillWithAnswers(client, pump, clock)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        self.assertEqual(len(server._largeOut), 3)
        transport.loseConnection()
        pump.flush()
        self.assertEqual(
            [len(self.successResultOf(d)) for d in answers], [3 * MiB, 600_000, 600_000]
        )
        self.assertTrue(server.disconnected)

    def test_callsThenClientCloses(self) -> None:
        """A client that makes large calls and closes the connection at once (one-way
        uploads, say) has them all arrive, in order with the small call made after them,
        those waiting for the server to take earlier ones (which it never says) too."""
        taker = Taker()
        server, client, pump, _ = self.connect(taker, 64 * 1024)
        stopTaking(server)
        root = client.remoteForName("root")
        results: list[Any] = []
        for value in (b"a" * (MiB * 3 // 2), b"b" * (MiB * 3 // 2), "small"):
            root.callRemote("take", value).addBoth(results.append)
        self.assertTrue(client._largeOut[1][3])  # the second waits for room
        client.transport.loseConnection()  # type: ignore[union-attr]
        pump.flush()
        self.assertEqual(taker.taken, [MiB * 3 // 2, MiB * 3 // 2, "small"])
        self.assertTrue(server.disconnected)
        self.assertEqual(len(results), 3)  # answered or failed, none left pending

    def test_nonReaderDropped(self) -> None:
        """A peer that takes none of what the closing connection still has to write is
        dropped after stallTimeout, though only the message being sent was queued (which
        alone starts no timer while the connection stays open)."""
        server, client, pump, clock = self.connect(NativeRoot(), 64 * 1024)
        unreadAnswer(client, pump, clock).addErrback(lambda f: None)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        self.assertIsNone(transport._stall)
        with capturedLogs() as logs:
            transport.loseConnection()
            clock.advance(31)
        text = " ".join(formatEvent(e) for e in logs)
        self.assertIn("Dropping a peer that stopped reading", text)
        self.assertIn("the connection is closing", text)
        self.assertNotIn("limit 0", text)
        self.assertTrue(transport.aborted)

    def test_waitsWithoutStallTimeout(self) -> None:
        """Without a stallTimeout, the closing connection waits for a peer that takes
        nothing (what is queued waited for it before the close too): it is neither dropped
        nor closed, and gets it all once it reads."""
        self.limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=None)
        server, client, pump, clock = self.connect(NativeRoot(), 64 * 1024)
        answer = unreadAnswer(client, pump, clock)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        with capturedLogs() as logs:
            transport.loseConnection()
            clock.advance(3600)
        self.assertEqual([e for e in logs if "Dropping" in formatEvent(e)], [])
        self.assertFalse(transport.aborted)
        self.assertFalse(transport.closed)
        pump.flush()
        self.assertEqual(len(self.successResultOf(answer)), 6 * MiB)
        self.assertTrue(server.disconnected)

    def test_slowReaderNotDropped(self) -> None:
        """A peer that takes what the closing connection holds, however slowly (a little
        every stallTimeout minus one second), is not dropped."""
        server, client, pump, clock = self.connect(NativeRoot(), 64 * 1024)
        answer = client.remoteForName("root").callRemote("big", 2 * MiB)
        pump.pump()
        transport: Any = server.transport
        with capturedLogs() as logs:
            transport.loseConnection()
            turns = 0
            while not server.disconnected and turns < 1000:
                clock.advance(29)
                pump.pump()
                turns += 1
        self.assertEqual([e for e in logs if "Dropping" in formatEvent(e)], [])
        self.assertEqual(len(self.successResultOf(answer)), 2 * MiB)


def givenToTransport(server: Any) -> list[int]:
    """
    The sizes of what ``server``'s paced transport gives its real transport from now on.
    """
    transport: Any = server.transport
    given: list[int] = []
    real = transport._transport
    original = real.write
    real.write = lambda data: (given.append(len(data)), original(data))
    return given


class CollectingRoot(NativeRoot):
    """A NativeRoot that keeps the page collectors it is given, and whose ``later`` answers
    when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.collectors: list[Any] = []
        self.later: list[Deferred[Any]] = []

    def remote_collect(self, collector: Any) -> None:
        self.collectors.append(collector)

    def remote_later(self, data: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.later.append(d)
        return d


class AfterCloseTests(SynchronousTestCase):
    """
    Once the closing transport has handed everything over it is no longer paused or resumed:
    pagers and streams send nothing more (they would send all at once, unpaced).
    """

    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=30)

    def test_pagerAfterClose(self) -> None:
        """A pager started once the connection is closing sends nothing (docs: 'streams
        and pagers send nothing more'); it used to put every page in the real transport at
        once, unpaced (the wrapper is no longer paused or resumed)."""
        root = CollectingRoot()
        server, client, pump, _ = nativePeers(self.limits, 64 * 1024, root)
        pages: list[Any] = []
        collector = util.CallbackPageCollector(pages.append)
        client.remoteForName("root").callRemote("collect", collector)
        pump.flush()
        transport: Any = server.transport
        transport.loseConnection()
        self.assertTrue(transport.closed)
        given = givenToTransport(server)
        util.StringPager(root.collectors[0], b"p" * (4 * MiB), chunkSize=64 * 1024)
        self.assertLess(sum(given), 256 * 1024)

    def test_streamAfterClose(self) -> None:
        """A stream with credit sends nothing more once the connection is closing (an item
        already being pulled when it closed goes, as a late answer does): it used to send
        all its credit allowed, unpaced."""
        root = CollectingRoot()
        server, client, pump, clock = nativePeers(self.limits, 64 * 1024, root)
        remote = client.remoteForName("root").callRemote("pushed")
        pump.flush()
        stream = self.successResultOf(remote)
        stream.next()
        pump.flush()
        transport: Any = server.transport
        transport.loseConnection()
        self.assertTrue(transport.closed)
        given = givenToTransport(server)
        root.stream.write(b"s" * (2 * MiB))
        root.stream.write(b"s" * (2 * MiB))
        clock.advance(0)
        self.assertLess(sum(given), 2 * MiB + 256 * 1024)


class LateAnswerWithoutStallTimeoutTests(SynchronousTestCase):
    """
    With ``stallTimeout=None`` a connection whose close finished while it was full (so the
    wrapper stays paused: nothing resumes it any more) is not dropped for an answer made
    after the close: a peer that reads gets it, and what the real transport held before.
    """

    def test_lateAnswerAfterCloseWhileFull(self) -> None:
        limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=None)
        root = NativeRoot()
        server, client, pump, clock = nativePeers(limits, 64 * 1024, root)
        remote = client.remoteForName("root")
        late = remote.callRemote("wait")
        big = remote.callRemote("big", 3 * MiB + 200_000)
        pump.pump()
        clock.advance(0)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        transport.loseConnection()
        for _ in range(200):  # the client reads what it is given
            if transport.closed:
                break
            pump.clientIO.bufferReceived(pump.serverIO.getOutBuffer())
            clock.advance(0)
        self.assertTrue((transport.closed, transport.paused), (True, True))
        assert root.pending is not None
        given = givenToTransport(server)
        with capturedLogs() as logs:
            root.pending.callback(b"y" * (2 * MiB))
            for _ in range(10):
                clock.advance(0)
        self.assertFalse(transport.aborted)
        self.assertEqual([formatEvent(event) for event in logs], [])
        self.assertGreater(sum(given), 2 * MiB)  # the late answer, handed over
        pump.flush()
        self.assertEqual(len(self.successResultOf(big)), 3 * MiB + 200_000)
        # (The in-memory transport drops what is written after its close, so the late
        # answer does not arrive here; a TCP connection delivers it.)
        self.failureResultOf(late, pb.PBConnectionLost)


class LateAnswerStallTests(SynchronousTestCase):
    """
    Once a closing connection has been handed all it had to write, and the real transport
    is closed, a stall timer still watches what that transport holds (an answer made since
    included): a peer that takes none of it for ``stallTimeout`` seconds is dropped, and a
    peer that reads is not.
    """

    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=30)

    def closedWithALateAnswer(self) -> tuple[Any, Any, Any, Any]:
        root = NativeRoot()
        server, client, pump, clock = nativePeers(self.limits, 64 * 1024, root)
        remote = client.remoteForName("root")
        late = remote.callRemote("wait")
        big = remote.callRemote("big", 3 * MiB)
        pump.pump()
        clock.advance(0)
        transport: Any = server.transport
        transport.loseConnection()
        for _ in range(200):  # the client reads what it is given until the close
            if transport.closed:
                break
            pump.clientIO.bufferReceived(pump.serverIO.getOutBuffer())
            clock.advance(0)
        self.assertTrue(transport.closed)
        # A TCP transport takes writes while it drains after its close (the in-memory one
        # drops them): as TCP does.
        transport._transport.disconnecting = False
        assert root.pending is not None
        root.pending.callback(b"y" * (2 * MiB))  # the method answers after the close
        for _ in range(10):
            clock.advance(0)
        self.assertGreater(transport._transport.pendingBytes(), 2 * MiB)
        return transport, pump, clock, (late, big)

    def test_nonReaderDropped(self) -> None:
        """A peer that reads none of the late answer is dropped after stallTimeout: the
        connection and the answer's memory were kept for as long as it stayed up."""
        transport, _, clock, calls = self.closedWithALateAnswer()
        for call in calls:
            call.addErrback(lambda _: None)
        with capturedLogs() as logs:
            clock.advance(29)
            self.assertFalse(transport.aborted)
            clock.advance(2)
        self.assertTrue(transport.aborted)
        self.assertIn("stopped reading", formatEvent(logs[-1]))
        self.assertIn("the connection is closing", formatEvent(logs[-1]))

    def test_slowReaderKept(self) -> None:
        """A peer that reads, however slowly, is not dropped."""
        transport, pump, clock, _ = self.closedWithALateAnswer()
        real = transport._transport
        received = 0
        for _ in range(4):
            clock.advance(20)
            held = b"".join(real.stream)  # the peer takes 256 KiB every 20 seconds
            real.stream[:] = [held[256 * 1024 :]]
            received += len(held[: 256 * 1024])
            pump.clientIO.bufferReceived(held[: 256 * 1024])
        clock.advance(20)
        self.assertFalse(transport.aborted)
        self.assertEqual(received, 4 * 256 * 1024)


class OverflowThenCloseTests(SynchronousTestCase):
    """
    Closing ends an overflow: the peer's messages are no longer handled.
    """

    limits = pb.BrokerLimits(bufferedBytes=256 * 1024, messageSize=MiB, stallTimeout=30)

    def test_overflowForgottenAtClose(self) -> None:
        """A peer that sent too much while the connection was full (the broker handled its
        messages after all: overflowing) and then reads what the closing connection writes
        is not dropped at once for late answers written while the connection is full: its
        messages are no longer handled, and a resume used to end the overflow."""
        root = CollectingRoot()
        server, client, pump, clock = nativePeers(self.limits, 64 * 1024, root)
        remote = client.remoteForName("root")
        big = remote.callRemote("big", 900_000)
        pump.pump()
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        lates = [remote.callRemote("later", b"d" * 60_000) for _ in range(30)]
        for _ in range(40):  # the client sends; it reads nothing
            data = pump.clientIO.getOutBuffer()
            if data:
                pump.serverIO.bufferReceived(data)
            clock.advance(0)
            if server.overflowing:
                break
        self.assertTrue(server.overflowing)
        self.assertTrue(transport.paused)
        with capturedLogs() as logs:
            transport.loseConnection()
            self.assertFalse(transport.closed)
            pump.pump()  # the client reads: the server resumes, writes more, fills again
            self.assertTrue(transport.paused)
            for d in root.later:
                d.callback(b"a" * 100_000)
            self.assertFalse(transport.aborted, "a reader was dropped at once")
            pump.flush()
        self.assertEqual([e for e in logs if "Dropping" in formatEvent(e)], [])
        self.assertEqual(len(self.successResultOf(big)), 900_000)
        for d in lates:
            d.addErrback(lambda f: None)


class CloseAfterLossTests(SynchronousTestCase):
    """
    loseConnection() once the connection is lost starts nothing.
    """

    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB, stallTimeout=30)

    def test_loseConnectionInDisconnectNotifier(self) -> None:
        """loseConnection() once the connection is lost (a disconnect notifier that closes
        the transport, say) while it was full arms no stall timer: it used to leave one
        that kept the broker stallTimeout seconds and then warned it was dropping a peer
        that stopped reading, long gone."""
        server, client, pump, clock = nativePeers(self.limits, 3_000_000)
        for d in fillWithAnswers(client, pump, clock):
            d.addErrback(lambda f: None)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        self.assertIsNotNone(transport._stall)
        server.notifyOnDisconnect(lambda: server.transport.loseConnection())
        with capturedLogs() as logs:
            server.connectionLost(Failure(ConnectionLost("reset")))
            stall = transport._stall
            clock.advance(31)
        self.assertIsNone(stall)
        self.assertEqual([formatEvent(e) for e in logs if "Dropping" in formatEvent(e)], [])
