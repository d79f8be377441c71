"""
Tests of what a connection costs while idle: per-connection state that most connections never
use is made on first use, and still works once it is.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.spread import pb as stockpb
from twisted.trial.unittest import SynchronousTestCase

from pbroker import broker as brokerModule
from pbroker import pb
from pbroker.banana import Banana
from pbroker.stream import RemoteStream
from pbroker.testing import connectedServerAndClient


class Root(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_numbers(self, count: int) -> Iterator[int]:
        yield from range(count)

    def remote_never(self) -> Deferred[None]:
        return Deferred()

    def remote_child(self) -> pb.Referenceable:
        return pb.Referenceable()


def _connect(clock: Clock) -> tuple[Any, Any, Any]:
    """A server of :class:`Root` and a native client, connected in memory on ``clock``."""
    return connectedServerAndClient(
        pb.PBServerFactory(Root(), clock=clock), pb.PBClientFactory(clock=clock), clock=clock
    )


class LazyStreamTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.server, self.client, self.pump = _connect(self.clock)
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


class LazyQueuesTests(SynchronousTestCase):
    """
    The queues and tables of large messages, kept releases, cancelled calls and pagers are
    made by the first connection that needs them: the others share one empty, read-only
    stand-in for each.
    """

    def connect(self) -> tuple[Any, Any, Any]:
        return _connect(Clock())

    def call(self, client: Any, pump: Any, *arguments: Any) -> Deferred[Any]:
        deferred: Deferred[Any] = client.remoteForName("root").callRemote(*arguments)
        pump.flush()
        return deferred

    def assertUnmade(self, broker: Any) -> None:
        self.assertIs(broker._afterLarge, brokerModule._NOTHING_KEPT)
        self.assertIs(broker._afterBlocked, brokerModule._NOTHING_KEPT)
        for table in (broker._keptReleases, broker._untaken, broker._blockedKeys):
            self.assertIs(table, brokerModule._NO_ENTRIES)
        for members in (broker._abandoned, broker._pagesSent):
            self.assertIs(members, brokerModule._NO_MEMBERS)

    def test_noneMadeForPlainCalls(self) -> None:
        """Connecting and answering calls make none of them, on either side."""
        server, client, pump = self.connect()
        self.assertEqual(
            self.successResultOf(self.call(client, pump, "echo", [1, "two"])), [1, "two"]
        )
        self.assertUnmade(server)
        self.assertUnmade(client)

    def test_madeByTheConnectionThatNeedsIt(self) -> None:
        """
        A cancelled call and a large message make their own tables, which work as before;
        another connection's stay the shared empty ones, untouched.
        """
        server, client, pump = self.connect()
        other, otherClient, otherPump = self.connect()
        waiting = self.call(client, pump, "never")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(len(client._abandoned), 1)
        child = self.successResultOf(self.call(client, pump, "child"))
        large = b"x" * (3 * 1024 * 1024)
        answer = client.remoteForName("root").callRemote("echo", large)
        self.assertTrue(client._largeOut)
        # Released while the large call is written: its decref is kept behind that call.
        del child
        gc.collect()
        self.assertEqual(len(client._afterLarge), 1)
        self.assertEqual(len(client._keptReleases), 1)
        for _ in range(200):
            if answer.called:
                break
            pump.flush()
        self.assertEqual(self.successResultOf(answer), large)
        self.assertEqual((len(client._afterLarge), len(client._keptReleases)), (0, 0))
        self.assertEqual(len(server.localObjects), 1)  # the root only: the decref came
        self.assertUnmade(other)
        self.assertUnmade(otherClient)
        self.assertEqual(self.successResultOf(self.call(otherClient, otherPump, "echo", 2)), 2)

    def test_readOnly(self) -> None:
        """The shared stand-ins cannot be written to by mistake: that fails loudly."""
        with self.assertRaises(AttributeError):
            brokerModule._NOTHING_KEPT.append(1)
        with self.assertRaises(AttributeError):
            brokerModule._NO_MEMBERS.add(1)
        with self.assertRaises(TypeError):
            brokerModule._NO_ENTRIES[1] = 1
        self.assertEqual(
            (
                len(brokerModule._NOTHING_KEPT),
                len(brokerModule._NO_MEMBERS),
                len(brokerModule._NO_ENTRIES),
            ),
            (0, 0, 0),
        )


class BrokerFootprintTests(SynchronousTestCase):
    """
    What a server holds for each connection: a broker's own state is in slots, and a
    connection costs it no more than it costs stock Twisted PB.
    """

    def test_stateInSlots(self) -> None:
        """
        After negotiating and answering a call, a broker's instance dict holds only what the
        Banana layer sets (a new attribute of the broker belongs in ``Broker.__slots__``).
        """
        banana = Banana()
        banana.makeConnection(StringTransport())
        # (And the dialects a client was given, which stand in for the class's list.)
        allowed = set(vars(banana)) | {"factory", "messageSizeLimit", "depthLimit", "knownDialects"}
        for dialects in (None, [b"pb"]):
            clock = Clock()
            server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(Root(), clock=clock),
                pb.PBClientFactory(dialects=dialects, clock=clock),
                clock=clock,
            )
            answer = client.remoteForName("root").callRemote("echo", [1])
            pump.flush()
            self.assertEqual(self.successResultOf(answer), [1])
            for broker in (server, client):
                self.assertEqual(set(vars(broker)) - allowed, set(), dialects)

    def test_noMoreThanStock(self) -> None:
        """
        A connection from a stock client, with its client side and the in-memory transport,
        costs a pbroker server no more memory than it costs a stock one. Each is measured in
        a process of its own, as each would serve: in one process, what the first measured
        leaves behind (Python's lists of free objects, the key tables its instances share)
        changes what the second allocates.
        """
        costs = {kind: _costInChild(kind) for kind in ("pbroker", "stock")}
        self.assertLessEqual(costs["pbroker"], costs["stock"], f"bytes per connection: {costs}")


def connectionCost(kind: str, connections: int = 50) -> float:
    """
    The bytes allocated, and still held, per connection, by ``connections`` in-memory
    connections of stock clients to a server of ``kind`` (``pbroker`` or ``stock``) that
    each answered a call.
    """
    serverPB: Any = pb if kind == "pbroker" else stockpb

    class Echo(serverPB.Root):  # type: ignore[misc,name-defined]
        def remote_echo(self, value: Any) -> Any:
            return value

    factory = serverPB.PBServerFactory(Echo())
    held: list[Any] = []

    def connect() -> None:
        client = stockpb.PBClientFactory()
        server, clientBroker, pump = connectedServerAndClient(factory, client)
        roots: list[Any] = []
        client.getRootObject().addCallback(roots.append)
        pump.flush()
        answers: list[Any] = []
        roots[0].callRemote("echo", 1).addCallback(answers.append)
        pump.flush()
        if answers != [1]:
            raise AssertionError(f"no echo: {answers!r}")
        held.append((server, clientBroker, pump, client, roots))

    for _ in range(3):  # what every connection shares (caches, tables) is made first
        connect()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(connections):
            connect()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / connections
    finally:
        tracemalloc.stop()


# The checkout these tests are in, found as they are imported: trial runs them from a
# directory of its own, where a relative __file__ no longer leads here.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _costInChild(kind: str) -> float:
    """
    :func:`connectionCost` measured in a new Python process, with this one's import path.
    """
    code = (
        "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
        "from tests.test_memory import connectionCost; print(connectionCost(sys.argv[2]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps([_ROOT, *sys.path]), kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode:
        raise AssertionError(f"measuring {kind} failed:\n{done.stderr}")
    return float(done.stdout)
