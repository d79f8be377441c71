"""
Tests of what a connection costs while idle: per-connection state that most connections never
use is made on first use, and still works once it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.stream import RemoteStream
from pbroker.testing import connectedServerAndClient


class Root(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_numbers(self, count: int) -> Iterator[int]:
        yield from range(count)


class LazyStreamTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), clock=self.clock),
            pb.PBClientFactory(clock=self.clock),
            clock=self.clock,
        )
        self.assertTrue(self.client.isNative)

    def call(self, *arguments: Any) -> Any:
        results: list[Any] = []
        self.client.remoteForName("root").callRemote(*arguments).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(len(results), 1)
        return results[0]

    def test_noStreamTablesUntilAStreamArrives(self) -> None:
        """Calls without streams make neither side's tables of incoming streams."""
        self.assertEqual(self.call("echo", [1, "two"]), [1, "two"])
        for broker in (self.server, self.client):
            self.assertIsNone(broker._streams._incoming)
            self.assertIsNone(broker._streams._cancelled)
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertIsNone(self.client._streams._incoming)

    def test_streamAfterwards(self) -> None:
        """The first stream the peer sends makes the table, and is read to its end."""
        reader = self.call("numbers", 3)
        self.assertIsInstance(reader, RemoteStream)
        self.assertIsNotNone(self.client._streams._incoming)
        items: list[Any] = []
        reader.collect().addCallback(items.extend)
        for _ in range(20):
            self.pump.flush()
        self.assertEqual(items, [0, 1, 2])
        self.assertEqual(len(self.client._streams.incoming), 0)
