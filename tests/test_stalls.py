"""
Telling a stalled peer from a slow or busy one: the timer that drops a peer which takes none
of this side's large calls (while this side's own calls wait behind them), and the pacing's
stall timer for a peer that stops reading.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.testing import connectedServerAndClient
from tests.test_closing import fillWithAnswers, nativePeers
from tests.test_keptreleases import stopTaking
from tests.test_native import NativeRoot, TakenLargeCallPeers

MiB = 1024 * 1024


class TakeTimerTests(TakenLargeCallPeers):
    """
    The timer that drops a peer which takes none of this side's large calls.
    """

    def test_busyServerSendingAnswersIsNotDropped(self) -> None:
        """A client that asked for many large answers, then pipelines large calls and
        small ones: the server handles none of them until its answers drain (it keeps
        the client's messages unhandled meanwhile), which on a slow link takes longer
        than stallTimeout. The server is reading and sending all along: it must not
        be dropped as one that "takes no calls"."""
        answers: list[Any] = []
        for _ in range(40):
            self.root.callRemote("big", 2 * MiB).addBoth(answers.append)
        self.pump.pump()
        self.clock.advance(0)
        results: list[Any] = []
        for _ in range(2):
            self.root.callRemote("echo", b"L" * (MiB * 3 // 2)).addBoth(results.append)
        for _ in range(40):
            self.root.callRemote("echo", b"s" * 40_000).addBoth(results.append)
        for _ in range(10_000):
            if len(results) == 42 or self.client.disconnected:
                break
            self.pump.pump()
            self.clock.advance(1)  # a slow link: a second per round trip of the pump
        self.assertFalse(self.client.disconnected)
        self.assertEqual(len(answers), 40)
        self.assertEqual(len(results), 42)

    def test_takeTimerArmedWhenCallsWereKeptBehindAnAnswer(self) -> None:
        """More than bufferedBytes of calls kept while the large message being sent is
        an answer (the large calls before them not yet counted as untaken): once those
        large calls are sent, a peer that never takes them is still dropped after
        stallTimeout, not kept for as long as the connection lasts."""
        stopTaking(self.server)

        class Big(pb.Referenceable):
            def remote_big(self, size: int) -> bytes:
                return b"A" * size

        self.rootObject.remote_hello = lambda ref: ref.callRemote("big", 3 * MiB)  # type: ignore
        self.root.callRemote("hello", Big())
        for _ in range(1000):
            if self.client.sendingLarge:
                break
            self.pump.pump()
        self.assertTrue(self.client.sendingLarge)  # its large answer
        results: list[Any] = []
        for _ in range(2):
            self.root.callRemote("echo", b"L" * (MiB * 3 // 2)).addBoth(results.append)
        for _ in range(40):
            self.root.callRemote("echo", b"s" * 40_000).addBoth(results.append)
        self.assertGreater(self.client._keptOwn, MiB)
        for _ in range(200):
            self.pump.pump()
            self.clock.advance(0)
        self.assertTrue(self.client._untaken)
        for _ in range(10):
            self.clock.advance(31)
            self.pump.pump()
        self.assertTrue(self.client.disconnected)
        self.assertIn("took none", self.client._lostReason or "")


class TakeTimerWithKeepaliveTests(SynchronousTestCase):
    """
    Keepalive's pings and pongs, a few bytes each, do not count as the connection moving.
    """

    def test_pingsDoNotKeepAPeerThatTakesNothing(self) -> None:
        """A peer that never takes a large call, but answers every ping, is dropped all the
        same (within three stallTimeouts), and the calls kept behind fail."""
        clock = Clock()
        limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB)
        keepalive = pb.Keepalive(interval=1, timeout=3)
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), clock=clock, limits=limits, keepalive=keepalive),
            pb.PBClientFactory(clock=clock, limits=limits, keepalive=keepalive),
            clock=clock,
            bufferSize=64 * 1024,
        )
        stopTaking(server)
        root = client.remoteForName("root")
        results: list[Any] = []
        for size in (MiB * 3 // 2, MiB * 3 // 2):  # the second waits for room
            root.callRemote("echo", b"L" * size).addBoth(results.append)
        for _ in range(40):
            root.callRemote("echo", b"s" * 40_000).addBoth(results.append)  # kept
        seconds = 0
        with capturedLogs() as logs:
            while not client.disconnected and seconds < 200:
                pump.pump()
                clock.advance(1)
                seconds += 1
        self.assertTrue(client.disconnected)
        self.assertLessEqual(seconds, 95)  # the timer starts once the calls are kept
        self.assertIn("took none of this side's large calls", formatEvent(logs[-1]))
        self.assertEqual(len(results), 42)
        for failure in results[1:]:
            failure.trap(pb.PBConnectionLost)


class HoldingTimerTests(SynchronousTestCase):
    """
    The pacing's stall timer, for answers waiting behind the one being sent.
    """

    def test_pauseWithinAFragmentWriteArmsTheStallTimer(self) -> None:
        """The connection fills within the write of a fragment of a large answer, with
        more than bufferedBytes of answers behind it: the stall timer starts, and a client
        that reads nothing more is dropped after stallTimeout (the fragment being written
        was subtracted twice from what waits, so the timer did not start and the server
        held the answers for as long as the connection lasted)."""
        limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB)
        server, client, pump, clock = nativePeers(limits, 3_000_000)
        fillWithAnswers(client, pump, clock)  # the client reads nothing from now on
        transport: Any = server.transport
        self.assertTrue(transport.paused)
        self.assertGreater(server.waitingForPeer(), MiB)
        clock.advance(31)
        self.assertTrue(transport._transport.disconnecting)
