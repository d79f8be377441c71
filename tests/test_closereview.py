"""
Review tests for the progressive close (PacedTransport.loseConnection / Broker.writeQueued).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb, util
from tests.test_closing import nativePeers
from tests.test_native import NativeRoot

MiB = 1024 * 1024


class Root(NativeRoot):
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
    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=8 * MiB, stallTimeout=30)

    def givenAfterClose(self, server: Any) -> list[int]:
        transport: Any = server.transport
        given: list[int] = []
        real = transport._transport
        original = real.write
        real.write = lambda data: (given.append(len(data)), original(data))
        return given

    def test_pagerAfterClose(self) -> None:
        """A pager started once the connection is closing sends nothing (docs: 'streams
        and pagers send nothing more'); it used to put every page in the real transport at
        once, unpaced (the wrapper is no longer paused or resumed)."""
        root = Root()
        server, client, pump, _ = nativePeers(self.limits, 64 * 1024, root)
        pages: list[Any] = []
        collector = util.CallbackPageCollector(pages.append)
        client.remoteForName("root").callRemote("collect", collector)
        pump.flush()
        transport: Any = server.transport
        transport.loseConnection()
        self.assertTrue(transport.closed)
        given = self.givenAfterClose(server)
        util.StringPager(root.collectors[0], b"p" * (4 * MiB), chunkSize=64 * 1024)
        self.assertLess(sum(given), 256 * 1024)

    def test_streamAfterClose(self) -> None:
        """A stream with credit sends nothing more once the connection is closing (an item
        already being pulled when it closed goes, as a late answer does): it used to send
        all its credit allowed, unpaced."""
        root = Root()
        server, client, pump, clock = nativePeers(self.limits, 64 * 1024, root)
        remote = client.remoteForName("root").callRemote("pushed")
        pump.flush()
        stream = self.successResultOf(remote)
        stream.next()
        pump.flush()
        transport: Any = server.transport
        transport.loseConnection()
        self.assertTrue(transport.closed)
        given = self.givenAfterClose(server)
        root.stream.write(b"s" * (2 * MiB))
        root.stream.write(b"s" * (2 * MiB))
        clock.advance(0)
        self.assertLess(sum(given), 2 * MiB + 256 * 1024)


class OverflowThenCloseTests(SynchronousTestCase):
    limits = pb.BrokerLimits(bufferedBytes=256 * 1024, messageSize=MiB, stallTimeout=30)

    def test_overflowForgottenAtClose(self) -> None:
        """A peer that sent too much while the connection was full (the broker handled its
        messages after all: overflowing) and then reads what the closing connection writes
        is not dropped at once for late answers written while the connection is full: its
        messages are no longer handled, and a resume used to end the overflow."""
        root = Root()
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
    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB, stallTimeout=30)

    def test_loseConnectionInDisconnectNotifier(self) -> None:
        """loseConnection() once the connection is lost (a disconnect notifier that closes
        the transport, say) while it was full arms no stall timer: it used to leave one
        that kept the broker stallTimeout seconds and then warned it was dropping a peer
        that stopped reading, long gone."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        from tests.test_closing import fillWithAnswers

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
