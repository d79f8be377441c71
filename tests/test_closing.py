"""
Closing a connection with loseConnection() while data still waits for the peer: the stall
timer still drops a peer that reads none of it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.testing import connectedServerAndClient
from tests.test_native import NativeRoot

MiB = 1024 * 1024


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
        clock = Clock()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), clock=clock, limits=self.limits),
            pb.PBClientFactory(clock=clock, limits=self.limits),
            clock=clock,
            bufferSize=3_000_000,
        )
        root = client.remoteForName("root")
        for size in (3 * MiB, 600_000, 600_000):
            root.callRemote("big", size)
        pump.pump()  # the server reads the calls; the client reads nothing from now on
        for _ in range(10):
            clock.advance(0)
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
        clock = Clock()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), clock=clock, limits=self.limits),
            pb.PBClientFactory(clock=clock, limits=self.limits),
            clock=clock,
            bufferSize=3_000_000,
        )
        root = client.remoteForName("root")
        answers = [root.callRemote("big", 3 * MiB)]
        pump.flush()
        for size in (3 * MiB, 600_000, 600_000):
            answers.append(root.callRemote("big", size).addErrback(lambda f: f.value))
        pump.pump()
        for _ in range(10):
            clock.advance(0)
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
