"""
Review tests for the progressive close (PacedTransport.loseConnection / Broker.writeQueued).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb, util
from pbroker.stream import Stream
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

