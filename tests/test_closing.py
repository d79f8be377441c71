"""
Closing a connection with loseConnection() while data still waits for the peer: what was
sent, large native messages queued included, goes before the connection closes, and the
stall timer still drops a peer that reads none of it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
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
    ``pb`` dialect, which writes every message whole, does: once the real transport is
    closing, the pump that writes them a few fragments per reactor turn, and only while the
    connection takes data, would leave a message cut short, or never started.
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
        self.assertFalse(server.sendingLarge)
        pump.flush()
        self.assertEqual(len(self.successResultOf(answer)), 3 * MiB)
        self.assertTrue(server.disconnected)
        self.assertTrue(client.disconnected)

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
        """What is written at the close while the connection takes nothing counts as any
        write does then: a peer that reads none of it is dropped after stallTimeout,
        though only the message being sent was queued (which alone starts no timer)."""
        server, client, pump, clock = self.connect(NativeRoot(), 64 * 1024)
        client.remoteForName("root").callRemote("big", 6 * MiB).addErrback(lambda f: None)
        pump.pump()  # the server reads the call; the client reads nothing from now on
        for _ in range(10):
            clock.advance(0)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        self.assertIsNone(transport._stall)
        with capturedLogs() as logs:
            transport.loseConnection()
            clock.advance(31)
        self.assertIn(
            "Dropping a peer that stopped reading", " ".join(formatEvent(e) for e in logs)
        )
        self.assertTrue(transport.aborted)

    def test_droppedAtOnce(self) -> None:
        """Without a stallTimeout, a peer for which more than bufferedBytes comes to wait
        as the queue is written is dropped at once, and the connection is not then closed
        as well."""
        self.limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=None)
        server, client, pump, clock = self.connect(NativeRoot(), 64 * 1024)
        client.remoteForName("root").callRemote("big", 6 * MiB).addErrback(lambda f: None)
        pump.pump()
        for _ in range(10):
            clock.advance(0)
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        real = transport._transport
        closes: list[str] = []
        real.loseConnection = lambda: closes.append("lose")
        with capturedLogs() as logs:
            transport.loseConnection()
        self.assertIn(
            "Dropping a peer that stopped reading", " ".join(formatEvent(e) for e in logs)
        )
        self.assertTrue(transport.aborted)
        self.assertEqual(closes, [])
