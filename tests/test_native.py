"""
Tests for pbroker's native dialect (``pbroker2``): negotiation, values, large messages and
limits, streams, cancellation and timeouts, per-call context and keepalive; all in memory
with a fake clock.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import enum
import fractions
import gc
import inspect
import itertools
import random
import sys
import tracemalloc
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

import msgpack
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.spread import pb as twistedPb
from twisted.test import iosim
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from pbroker import _accelerator, _native, _streams, banana, context, jelly, pb
from pbroker import broker as brokerModule
from pbroker._jellycore import ID_LIMIT
from pbroker._keepalive import KeepaliveTimer
from pbroker.broker import MIN_MESSAGE_SIZE
from pbroker.errors import (
    BananaDecodeError,
    InvalidJelly,
    JellyError,
    LimitExceeded,
    PBConnectionLost,
    UnsupportedByPeer,
)
from pbroker.stream import RemoteStream, Stream
from pbroker.testing import PacingFakeTransport, connectedServerAndClient
from tests.test_fuzz import wholeRecordInPython
from tests.test_keptreleases import stopTaking


class Thing(pb.Copyable):
    def __init__(self, name: str = "", parts: Any = None) -> None:
        self.name = name
        self.parts = parts


class RemoteThing(pb.RemoteCopy):
    pass


class Mirrored(pb.Copyable, pb.RemoteCopy):
    """
    A copy that both sides copy: one received can be sent on.
    """

    def __init__(self, text: str = "") -> None:
        self.text = text


class Counter(pb.Referenceable):
    def __init__(self) -> None:
        self.count = 0

    def remote_add(self, amount: int) -> int:
        self.count += amount
        return self.count


class Sizer(pb.Referenceable):
    def remote_size(self, data: bytes) -> int:
        return len(data)


class NativeRoot(pb.Root):
    def __init__(self) -> None:
        self.counter = Counter()
        self.pending: Deferred[Any] | None = None
        self.cancelled: list[bool] = []
        self.pulled = 0
        self.closed = False
        self.received: list[Any] = []
        self.contexts: list[context.CallContext] = []

    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_thing(self) -> Any:
        return {"t": Thing("n", (1, [2]))}

    def remote_counter(self) -> Counter:
        return self.counter

    def remote_big(self, size: int) -> bytes:
        return b"x" * size

    def remote_wait(self) -> Deferred[Any]:
        self.pending = Deferred(lambda _: self.cancelled.append(True))
        return self.pending

    def remote_numbers(self, count: int, failAt: int | None = None) -> Iterator[int]:
        def generate() -> Iterator[int]:
            try:
                for i in range(count):
                    if i == failAt:
                        raise ValueError(f"failed at {i}")
                    self.pulled += 1
                    yield i
            finally:
                self.closed = True

        return generate()

    def remote_asyncNumbers(self, count: int) -> AsyncIterator[int]:
        async def generate() -> AsyncIterator[int]:
            for i in range(count):
                await succeed(None)
                yield i * 10

        return generate()

    def remote_pushed(self) -> Stream:
        stream = Stream(bufferSize=2)
        self.stream = stream
        return stream

    async def remote_sum(self, stream: RemoteStream) -> int:
        total = 0
        async for item in stream:
            total += item
        return total

    def remote_annotated(self, value: Any, timeout: Any = None, context: Any = None) -> Any:
        call = pbContext()
        self.contexts.append(call)
        call.reply["seen"] = value
        return [value, timeout, context]

    async def remote_annotatedLater(self) -> Any:
        await succeed(None)
        return pbContext().annotations


def pbContext() -> context.CallContext:
    return context.current()


def closingSource(closed: list[bool]) -> Iterator[int]:
    """
    A generator of one item that notes in ``closed`` when it is closed.
    """
    try:
        yield 1
    finally:
        closed.append(True)


class NativeTestCase(SynchronousTestCase):
    clientOptions: dict[str, Any] = {}
    serverOptions: dict[str, Any] = {}
    bufferSize: int | None = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.rootObject = NativeRoot()
        self.registry = pb.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(Thing, RemoteThing)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock, **self.serverOptions),
            pb.PBClientFactory(registry=self.registry, clock=self.clock, **self.clientOptions),
            clock=self.clock,
            bufferSize=self.bufferSize,
        )
        self.root = self.client.remoteForName("root")

    def settle(self, results: list[Any], rounds: int = 10_000) -> None:
        for _ in range(rounds):
            if results:
                return
            self.pump.pump()
        self.fail("no result")

    def call(self, *args: Any, target: Any = None, **kw: Any) -> Any:
        results: list[Any] = []
        (target or self.root).callRemote(*args, **kw).addBoth(results.append)
        self.settle(results)
        return results[0]


def keptLargeCalls(test: Any, first: int, size: int) -> Callable[[], list[Any]]:
    """
    Make a large call of ``first`` bytes, then three of ``size``: one to a cached copy, one
    naming a cache handle (both wait behind the first), and a plain one; return what reads
    the order in which the server started them.
    """
    from tests.test_broker import Gauge, RemoteGauge

    arrived: list[Any] = []

    class RecordingGauge(RemoteGauge):
        def observe_write(self, data: bytes) -> None:
            arrived.append(("copy", len(data)))

    test.server.registry.setUnjellyableForClass(Gauge, RecordingGauge)
    held: list[Any] = []  # the server's copy, kept

    def write(data: bytes, *rest: Any) -> None:
        held.extend(rest)
        arrived.append(len(data))

    test.rootObject.remote_write = write
    gauge = Gauge()
    test.root.callRemote("write", b"", gauge)
    test.pump.flush()
    observer = gauge.observers[0]
    del arrived[:]
    test.root.callRemote("write", b"a" * first)
    observer.callRemote("write", b"b" * size)
    test.root.callRemote("write", b"c" * size, gauge)
    test.root.callRemote("write", b"d" * size)
    return lambda: arrived


class NegotiationTests(NativeTestCase):
    def test_nativeChosen(self) -> None:
        """Two pbroker peers speak the native dialect and learn each other's message limit."""
        self.assertEqual(
            (self.server.currentDialect, self.client.currentDialect), (b"pbroker2",) * 2
        )
        self.assertTrue(self.client.isNative)
        self.assertTrue(self.client.peerIsPbroker)
        self.assertEqual(self.client.peerMessageSize, self.server.limits.messageSize)

    def test_stockPeersGetPb(self) -> None:
        """A stock Twisted client or server gets pb, and calls still work."""
        for serverFactory, clientFactory in [
            (pb.PBServerFactory(NativeRoot()), twistedPb.PBClientFactory()),
            (twistedPb.PBServerFactory(twistedPb.Root()), pb.PBClientFactory()),
        ]:
            server, client, _ = connectedServerAndClient(serverFactory, clientFactory)
            self.assertEqual((server.currentDialect, client.currentDialect), (b"pb", b"pb"))

    def test_dialectsChecked(self) -> None:
        """An unknown dialect name is refused when the factory is made."""
        self.assertRaises(ValueError, pb.PBClientFactory, dialects=[b"pbroker9"])
        self.assertRaises(ValueError, pb.PBServerFactory, pb.Root(), dialects=[])

    def test_forcedPb(self) -> None:
        """A client limited to pb gets pb from a pbroker server."""
        _server, client, _ = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(dialects=[b"pb"])
        )
        self.assertEqual(client.currentDialect, b"pb")
        self.assertFalse(client.isNative)


class Unserializing(pb.Referenceable):
    """
    Unserialises its calls itself, as code that overrides ``remoteMessageReceived`` (or an
    ``IPerspective``'s ``perspectiveMessageReceived``) does.
    """

    def remoteMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        args = broker.unserialize(args)
        kw = broker.unserialize(kw)
        return broker.serialize((message, args, kw))


class ValueTests(NativeTestCase):
    def test_unserialisedArgumentsAreATuple(self) -> None:
        """A call's positional arguments, unserialised by a method of the target's own, are a
        tuple in every dialect, as jelly gives them; the lists in them stay lists."""
        large = b"L" * 40_000  # a value field the decoder reads in place
        for dialects in ([b"pbroker2"], [b"pbroker1"], [b"pb"]):
            target = Unserializing()
            server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(pb.Root()), pb.PBClientFactory(dialects=dialects)
            )
            self.assertEqual(client.currentDialect, dialects[0])
            server.setNameForLocal("unserializing", target)
            reference = client.remoteForName("unserializing")
            for args in [("here",), (), ([1], (2,)), (large,)]:
                results: list[Any] = []
                reference.callRemote("ANY", *args, bar=[3]).addBoth(results.append)
                pump.flush()
                self.assertEqual(results, [("ANY", args, {"bar": [3]})], dialects)
            self.assertIsNone(server._callArgs)

    def test_largeBytesPackedAsMsgpackDoes(self) -> None:
        """Large byte strings, alone or as the one argument of a call, are packed by hand to
        exactly the bytes msgpack writes; and they travel."""
        codec = self.server._codec
        assert codec is not None
        large = bytes(range(256)) * 1200
        medium = bytes(range(256)) * 240  # 61,440 bytes: a msgpack bin 16
        values = [[large], large, [large, 1], [b"small"], b"small", bytearray(b"ba")]
        values += [[medium], medium]
        for value in values:
            packed = codec.pack(value)
            alone = value[0] if type(value) is list and len(value) == 1 else value
            if alone is large or alone is medium:
                assert isinstance(packed, _native.Packed)
                self.assertIs(packed.parts[-1], alone)  # not copied
                packed = packed.data
            self.assertEqual(packed, msgpack.packb(value, use_bin_type=True))
        self.assertEqual(self.call("echo", large), large)

    def test_dictionariesOfOtherKeys(self) -> None:
        """A value with a dict whose keys are not all text or bytes travels in a KEYED
        extension (a msgpack map's keys are otherwise text or bytes only); one without such
        a dict is packed as msgpack alone."""
        codec = self.server._codec
        assert codec is not None
        part = [1, 2]
        for value in (
            {1: "a", (1, 2): [3], None: 0, 2.5: {"x": 1}, frozenset({-1}): b"f"},
            [{"a": 1}, ({"b": {True: 2}},), part, part],
        ):
            packed = codec.pack(value)
            assert isinstance(packed, bytes)
            keyed = msgpack.unpackb(packed)
            self.assertEqual(keyed.code, _native.KEYED)
            self.assertEqual(
                keyed.data, msgpack.packb(value, default=_plainExtensions, strict_types=True)
            )
            self.assertEqual(self.call("echo", value), value)
        plain = {"a": [{b"b": 1}], "c": (2, {"d": 3})}
        self.assertEqual(
            codec.pack(plain), msgpack.packb(plain, default=_plainExtensions, strict_types=True)
        )
        self.assertEqual(self.call("echo", plain), plain)

    def test_applicationErrorInACopy(self) -> None:
        """An error a RemoteCopy's setCopyableState raises reaches the caller as itself, as
        in the pb dialect, not as a malformed value."""

        class Fragile(pb.RemoteCopy):
            def setCopyableState(self, state: Any) -> None:
                raise KeyError("application bug")

        self.registry.setUnjellyableForClass(Thing, Fragile)
        failure = self.call("thing")
        self.assertIsInstance(failure, Failure)
        failure.trap(KeyError)

    def test_repeatedObjectsArriveTwice(self) -> None:
        """As docs/native.rst says: a copy that appears twice in one value arrives as two
        copies, where the pb dialect gives one copy twice; a reference arrives as equal
        references in both, as in Twisted."""
        thing = Thing()
        reference = pb.Referenceable()
        twice = [thing, thing, reference, reference]
        self.rootObject.remote_twice = lambda: twice  # type: ignore[attr-defined]
        copies = self.call("twice")
        self.assertIsInstance(copies[0], RemoteThing)
        self.assertIsNot(copies[0], copies[1])
        self.assertIsNot(copies[2], copies[3])
        self.assertEqual(copies[2], copies[3])
        self.assertEqual(copies[2].luid, copies[3].luid)
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject),
            pb.PBClientFactory(registry=self.registry, dialects=[b"pb"]),
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("twice").addBoth(results.append)
        pump.flush()
        pbCopies = results[0]
        self.assertIs(pbCopies[0], pbCopies[1])
        self.assertEqual(pbCopies[2], pbCopies[3])

    def test_mediumBytesInOneRecord(self) -> None:
        """
        A byte string between 32 KiB and 64 KiB, as the argument and as the answer, travels
        in one WHOLE record, its bytes written uncopied until the record is made.
        """
        data = bytes(range(256)) * 234  # 59,904 bytes
        writes: list[Any] = []

        def recording(write: Any) -> Any:
            return lambda chunk: (writes.append(chunk), write(chunk))[1]

        for broker in (self.client, self.server):
            transport = broker.transport._transport
            transport.write = recording(transport.write)
        self.assertEqual(self.call("echo", data), data)
        self.assertEqual(len(writes), 2)
        for record in writes:
            self.assertEqual(record[0] >> 6, _native.WHOLE)
            self.assertEqual(int.from_bytes(record[:4], "big"), len(record) - 4)
        call, answer = (msgpack.unpackb(record[4:]) for record in writes)
        self.assertEqual(msgpack.unpackb(call[5]), [data])
        self.assertEqual(msgpack.unpackb(answer[2]), data)

    def test_plainValues(self) -> None:
        """Every plain type keeps its type: tuples, lists, sets, text, bytes, big numbers."""
        values = [
            None,
            True,
            0,
            -(2**63),
            2**64 + 5,
            -(10**40),
            1.5,
            "text é",
            b"\x00bytes",
            [1, [2, (3, "x")]],
            (1, 2),
            (),
            {1, 2},
            frozenset({"a"}),
            {"k": [1.0], 2: b"v", (1, 2): None},
            [{1: {2: (3, {4})}}],
        ]
        for value in values:
            result = self.call("echo", value)
            self.assertEqual(result, value)
            self.assertIs(type(result), type(value))

    def test_objects(self) -> None:
        """References and copies travel through jelly inside the native value."""
        counter = self.call("counter")
        self.assertEqual(self.call("add", 5, target=counter), 5)
        self.assertEqual(self.call("echo", [counter])[0], counter)
        thing = self.call("thing")["t"]
        self.assertIsInstance(thing, RemoteThing)
        self.assertEqual((thing.name, thing.parts), ("n", (1, [2])))

    def test_cycle(self) -> None:
        """A list that contains itself arrives with the same shape."""
        value: list[Any] = [1]
        value.append(value)
        result = self.call("echo", value)
        self.assertIs(result[1], result)

    def test_sharedPlainContainersAreCopies(self) -> None:
        """The documented difference: a plain list met twice arrives as two equal lists."""
        shared = [1, 2]
        result = self.call("echo", [shared, shared])
        self.assertEqual(result, [[1, 2], [1, 2]])
        self.assertIsNot(result[0], result[1])

    def test_refusedInstance(self) -> None:
        """An instance that is not allowed is sent as unpersistable, as in the pb dialect."""

        class Unregistered:
            pass

        self.assertEqual(type(self.call("echo", Unregistered())).__name__, "Unpersistable")
        self.assertEqual(self.call("echo", 1), 1)

    def test_referenceInCycle(self) -> None:
        """A cyclic value holding a reference exports it once: no count is left behind."""
        counter = self.call("counter")
        value: list[Any] = [counter]
        value.append(value)
        result = self.call("echo", value)
        self.assertIs(result[1], result)
        self.assertEqual(result[0], counter)
        self.assertEqual(self.server.localObjects[counter.luid].refcount, 2)
        del counter, result, value
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.server.luids, {})


class LargeMessageTests(NativeTestCase):
    bufferSize = 64 * 1024
    serverOptions = {"limits": pb.BrokerLimits(messageSize=200 * 1024 * 1024)}
    clientOptions = {"limits": pb.BrokerLimits(messageSize=200 * 1024 * 1024)}

    def test_beyondPbCeiling(self) -> None:
        """Five megabytes travel both ways; PB's 640 KiB ceiling does not apply."""
        data = bytes(range(256)) * (5 * 4096)
        self.assertEqual(self.call("echo", data), data)

    def test_fragmentsWrittenWhole(self) -> None:
        """
        Each fragment of a large value goes to the transport as one bytes object, header
        included, so that a transport with an empty buffer need not join parts again.
        """
        data = bytes(range(256)) * 4096  # 1 MiB: four full fragments and a short last one
        writes: list[Any] = []
        sequences: list[Any] = []
        transport = self.client.transport._transport
        write, writeSequence = transport.write, transport.writeSequence
        transport.write = lambda chunk: (writes.append(chunk), write(chunk))[1]
        transport.writeSequence = lambda chunks: (sequences.append(chunks), writeSequence(chunks))
        self.assertEqual(self.call("echo", data), data)
        self.assertEqual(sequences, [])
        fragments = [w for w in writes if w[0] >> 6 in (_native.MORE, _native.LAST)]
        self.assertEqual({type(w) for w in fragments}, {bytes})
        more = _native.fragmentHeader(_native.MORE, _native.FRAGMENT_SIZE)
        self.assertEqual([w[:4] for w in fragments[:4]], [more] * 4)
        self.assertEqual({len(w) for w in fragments[:4]}, {_native.FRAGMENT_SIZE + 4})
        (last,) = fragments[4:]
        self.assertEqual(last[:4], _native.fragmentHeader(_native.LAST, len(last) - 4))

    def test_smallCallsKeepAnsweringDuringTransfer(self) -> None:
        """While 100 MB cross, small calls made meanwhile are answered before it ends."""
        big: list[Any] = []
        self.root.callRemote("big", 100 * 1024 * 1024).addBoth(big.append)
        small: list[Any] = []
        for i in range(5000):
            self.root.callRemote("echo", i).addBoth(small.append)
            self.pump.pump()
            self.pump.pump()
            if big:
                break
        self.assertEqual(len(big), 1)
        self.assertEqual(len(big[0]), 100 * 1024 * 1024)
        self.assertGreater(len(small), 50)
        self.assertEqual(small, list(range(len(small))))

    def test_callsKeepTheirOrder(self) -> None:
        """Calls reach the server in the order they were made, as in stock PB, though a
        large one is sent in fragments and small ones could go between them: a body
        written in parts, then finished (twisted.web.distrib's pattern), arrives whole.
        One-way calls, and calls to another object, keep their place too. A call made
        with ``ordered=False`` goes ahead."""
        arrived: list[Any] = []
        self.rootObject.remote_write = lambda data: arrived.append(len(data))  # type: ignore
        self.rootObject.remote_finish = lambda: arrived.append("finish")  # type: ignore
        counter = self.call("counter")
        results: list[Any] = []
        self.root.callRemote("write", b"x" * (640 * 1024)).addBoth(results.append)
        self.root.withOptions(ordered=False).callRemote("write", b"ahead")
        self.root.callRemote("write", b"y").addBoth(results.append)
        self.root.callRemote("write", b"x" * (300 * 1024)).addBoth(results.append)
        self.root.callRemote("write", b"zz", pbanswer=False)
        self.rootObject.counter.remote_add = lambda n: arrived.append(("add", n)) or n
        counter.callRemote("add", 1).addBoth(results.append)
        self.root.callRemote("finish").addBoth(results.append)
        self.assertTrue(self.client.sendingLarge)
        self.pump.flush()
        self.assertEqual(arrived, [5, 640 * 1024, 1, 300 * 1024, 2, ("add", 1), "finish"])
        self.assertEqual(results, [None, None, None, 1, None])

    def test_callsKeepTheirOrderBehindALargeAnswer(self) -> None:
        """The server's calls made while it sends a large answer keep their order among
        themselves; answers to small calls do not wait for the large answer."""
        arrived: list[int] = []

        class Sink(pb.Referenceable):
            def remote_write(self, data: bytes) -> None:
                arrived.append(len(data))

        held: list[Any] = []
        self.rootObject.remote_hold = held.append  # type: ignore[attr-defined]
        self.call("hold", Sink())
        big: list[Any] = []
        self.root.callRemote("big", 2 * 1024 * 1024).addBoth(big.append)
        self.pump.pump()  # the call reaches the server, which starts its large answer
        self.assertTrue(self.server.sendingLarge)
        for size in (1, 300 * 1024, 2):
            held[0].callRemote("write", b"w" * size)
        small: list[Any] = []
        self.root.callRemote("echo", 1).addBoth(small.append)
        for _ in range(1000):
            if small or big:
                break
            self.pump.pump()
        self.assertEqual((small, big), ([1], []))  # the small answer went ahead
        self.pump.flush()
        self.assertEqual(len(big[0]), 2 * 1024 * 1024)
        self.assertEqual(arrived, [1, 300 * 1024, 2])

    def test_whatGoesBetweenFragments(self) -> None:
        """As docs/native.rst says: a small answer goes between the fragments of a large
        answer, a stream's items wait behind it; a large call made with ``ordered=False``
        is sent after a large call made before it, a small one goes ahead."""
        events: list[Any] = []
        self.root.callRemote("big", 3 * 1024 * 1024).addCallback(lambda _: events.append("big"))
        self.pump.pump()
        self.assertTrue(self.server.sendingLarge)
        self.root.callRemote("echo", "small").addCallback(events.append)
        streams: list[Any] = []
        self.root.callRemote("numbers", 3).addCallback(streams.append)
        self.settle(streams)

        async def read() -> None:
            async for item in streams[0]:
                events.append(item)

        Deferred.fromCoroutine(read())
        self.pump.flush()
        self.assertEqual(events, ["small", "big", 0, 1, 2])
        arrived: list[Any] = []
        self.rootObject.remote_write = lambda data: arrived.append(len(data))  # type: ignore
        self.root.callRemote("write", b"a" * (3 * 1024 * 1024))
        self.root.withOptions(ordered=False).callRemote("write", b"b" * (300 * 1024))
        self.root.withOptions(ordered=False).callRemote("write", b"c")
        self.pump.flush()
        self.assertEqual(arrived, [1, 3 * 1024 * 1024, 300 * 1024])

    def test_largeCallsKeepTheirOrderBehindKeptOnes(self) -> None:
        """A large call that waits behind the large messages queued (one to a cached copy,
        or naming a cache handle) is not overtaken by a large call made after it, which
        would otherwise join the large messages first."""
        arrived = keptLargeCalls(self, 3 * 1024 * 1024, 600 * 1024)
        self.pump.flush()
        self.assertEqual(arrived(), [3 * 1024 * 1024, ("copy", 600 * 1024), 600 * 1024, 600 * 1024])

    def test_aCallBackArrivesBeforeTheAnswer(self) -> None:
        """A method that calls its caller back, then answers, while the server sends a
        large answer: the call arrives first, as in stock PB (calls wait only for large
        calls, not for large answers)."""
        events: list[Any] = []

        class Sink(pb.Referenceable):
            def remote_initial(self) -> None:
                events.append("initial")

        def subscribe(sink: Any) -> str:
            sink.callRemote("initial")
            return "ok"

        self.rootObject.remote_subscribe = subscribe  # type: ignore[attr-defined]
        self.root.callRemote("big", 4 * 1024 * 1024)
        for _ in range(1000):
            if self.server.sendingLarge:
                break
            self.pump.pump()
        self.assertTrue(self.server.sendingLarge)
        self.root.callRemote("subscribe", Sink()).addCallback(events.append)
        self.pump.flush()
        self.assertEqual(events, ["initial", "ok"])

    def test_anAnswerFollowsTheCallsItsMethodMade(self) -> None:
        """While this side sends a large call, a method that calls its caller back and then
        answers (or fails, or answers later) has its answer arrive after that call, which
        waits behind the large one, as in stock PB; the answer to a call whose method made
        none still goes between the fragments."""
        events: list[Any] = []
        size = 4 * 1024 * 1024

        class Sink(pb.Referenceable):
            def remote_big(self, data: bytes) -> None:
                events.append(len(data))

            def remote_initial(self, tag: str) -> None:
                events.append(tag)

        def subscribe(sink: Any) -> str:
            sink.callRemote("initial", "sync")
            return "answered"

        def refuse(sink: Any) -> None:
            sink.callRemote("initial", "error")
            raise ValueError("failed")

        later: list[tuple[Any, Deferred[str]]] = []

        def wait(sink: Any) -> Deferred[str]:
            later.append((sink, Deferred()))
            return later[-1][1]

        self.rootObject.remote_push = lambda sink: sink.callRemote("big", b"x" * size)  # type: ignore[attr-defined]
        self.rootObject.remote_subscribe = subscribe  # type: ignore[attr-defined]
        self.rootObject.remote_refuse = refuse  # type: ignore[attr-defined]
        self.rootObject.remote_wait = wait  # type: ignore[attr-defined]
        sink = Sink()
        self.root.callRemote("push", sink)
        for _ in range(1000):
            if self.server.sendingLarge:
                break
            self.pump.pump()
        self.assertTrue(self.server.sendingLarge)
        self.root.callRemote("echo", "unrelated").addCallback(events.append)
        self.root.callRemote("subscribe", sink).addCallback(events.append)
        self.root.callRemote("refuse", sink).addErrback(
            lambda failure: events.append(failure.getErrorMessage())
        )
        self.root.callRemote("wait", sink).addCallback(events.append)
        for _ in range(1000):
            if events:
                break
            self.pump.pump()
        self.assertEqual(events, ["unrelated"])  # before the large call has arrived
        waiting, answer = later[0]
        waiting.callRemote("initial", "deferred")
        answer.callback("later")
        self.pump.flush()
        self.assertEqual(
            events,
            ["unrelated", size, "sync", "answered", "error", "failed", "deferred", "later"],
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_anAnswerFollowsALargeCallItsMethodMade(self) -> None:
        """A method that makes a large call back and then answers has its answer arrive
        after the whole call, as in stock PB (not between the call's fragments)."""
        events: list[Any] = []

        class Sink(pb.Referenceable):
            def remote_big(self, data: bytes) -> None:
                events.append(len(data))

        def upload(sink: Any) -> str:
            sink.callRemote("big", b"x" * (3 * 1024 * 1024))
            return "uploaded"

        self.rootObject.remote_upload = upload  # type: ignore[attr-defined]
        self.root.callRemote("upload", Sink()).addCallback(events.append)
        self.pump.flush()
        self.assertEqual(events, [3 * 1024 * 1024, "uploaded"])

    def test_referenceDroppedWhileItsLargeCallIsSent(self) -> None:
        """
        A reference dropped while a large call made on it is still being sent does not
        release its object before the call arrives: the decref waits behind the call.
        """
        self.rootObject.remote_sizer = Sizer  # type: ignore[attr-defined]
        large = b"x" * (3 * 1024 * 1024)
        sizer = self.call("sizer")
        d = sizer.callRemote("size", large)
        self.assertTrue(self.client.sendingLarge)
        del sizer
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), len(large))
        # The decref arrived after the call, and released the object.
        self.assertEqual(
            [type(local.object) for local in self.server.localObjects.values()], [NativeRoot]
        )

    def test_referenceDroppedWhileALargeAnswerHoldingItIsSent(self) -> None:
        """
        A reference to the caller's object, sent back in a large answer and dropped at once
        by the server, reaches the caller as its own object: the decref does not overtake the
        answer.
        """

        def giveBack(counter: Any) -> list[Any]:
            return [counter, b"x" * (3 * 1024 * 1024)]

        self.rootObject.remote_giveBack = giveBack  # type: ignore[attr-defined]
        counter = Counter()
        answer = self.call("giveBack", counter)
        self.assertIs(answer[0], counter)
        self.assertEqual(len(answer[1]), 3 * 1024 * 1024)
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.client.localObjects, {})

    def test_cacheDroppedWhileALargeCallHoldingItIsSent(self) -> None:
        """
        A cached copy passed back to its owner in a large call, and dropped while that call
        is being sent, arrives as the owner's own Cacheable: the decache waits behind it.
        """
        from tests.test_broker import Gauge, RemoteGauge

        gauge = Gauge()
        self.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.rootObject.remote_gauge = lambda: gauge  # type: ignore[attr-defined]
        self.rootObject.remote_isGauge = lambda g, data: (  # type: ignore[attr-defined]
            g is gauge,
            len(data),
        )
        copy = self.call("gauge")
        self.assertIsInstance(copy, RemoteGauge)
        d = self.root.callRemote("isGauge", copy, b"x" * (3 * 1024 * 1024))
        self.assertTrue(self.client.sendingLarge)
        del copy
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), (True, 3 * 1024 * 1024))
        self.assertEqual(self.server.remotelyCachedObjects, {})
        self.assertEqual(gauge.stopped, 1)

    def test_copyDroppedWhileALargeCacheMessageIsSent(self) -> None:
        """
        A copy dropped while its owner sends it a large update still gets the update: the
        owner's uncache waits behind it.
        """
        from tests.test_broker import Gauge

        class RemoteGauge(pb.RemoteCache):
            def observe_update(self, data: bytes) -> int:
                return len(data)

        gauge = Gauge()
        self.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.rootObject.remote_gauge = lambda: gauge  # type: ignore[attr-defined]
        copy = self.call("gauge")
        self.assertIsInstance(copy, RemoteGauge)
        d = gauge.observers[0].callRemote("update", b"u" * (3 * 1024 * 1024))
        self.assertTrue(self.server.sendingLarge)
        del copy
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), 3 * 1024 * 1024)
        self.assertEqual(self.server.remotelyCachedObjects, {})
        self.assertEqual(self.client.locallyCachedObjects, {})

    def test_handleAfterALargeFirstCopy(self) -> None:
        """
        A small call or answer that names a Cacheable whose first copy is in a large call
        still being sent waits behind that call: a handle never arrives before its copy.
        """
        from tests.test_broker import Gauge, RemoteGauge

        gauge = Gauge()
        self.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        serverRegistry = self.server.registry
        serverRegistry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.rootObject.remote_take = lambda g, data=b"": (  # type: ignore[attr-defined]
            type(g).__name__,
            len(data),
        )
        large = self.root.callRemote("take", gauge, b"x" * (3 * 1024 * 1024))
        self.assertTrue(self.client.sendingLarge)
        small = self.root.callRemote("take", gauge)
        echoed = self.root.callRemote("echo", 1)
        self.pump.flush()
        self.assertEqual(self.successResultOf(large), ("RemoteGauge", 3 * 1024 * 1024))
        self.assertEqual(self.successResultOf(small), ("RemoteGauge", 0))
        self.assertEqual(self.successResultOf(echoed), 1)

    def test_answerWithAHandleAfterALargeFirstCopy(self) -> None:
        """
        An answer that names a Cacheable whose first copy is in a large answer still being
        sent waits behind it, with or without reply annotations.
        """
        from tests.test_broker import Gauge, RemoteGauge

        gauge = Gauge()
        self.registry.setUnjellyableForClass(Gauge, RemoteGauge)

        def annotated() -> Gauge:
            pbContext().reply["seen"] = True
            return gauge

        self.rootObject.remote_gaugeAndData = lambda: (  # type: ignore[attr-defined]
            gauge,
            b"x" * (3 * 1024 * 1024),
        )
        self.rootObject.remote_gauge = lambda: gauge  # type: ignore[attr-defined]
        self.rootObject.remote_annotated = annotated  # type: ignore[attr-defined]
        large = self.root.callRemote("gaugeAndData")
        self.pump.pump()
        self.assertTrue(self.server.sendingLarge)
        small = self.root.callRemote("gauge")
        reply: dict[str, Any] = {}
        annotatedCall = self.root.withOptions(context={"id": 1}, reply=reply).callRemote(
            "annotated"
        )
        self.pump.flush()
        copy, data = self.successResultOf(large)
        self.assertIsInstance(copy, RemoteGauge)
        self.assertEqual(len(data), 3 * 1024 * 1024)
        self.assertIsInstance(self.successResultOf(small), RemoteGauge)
        self.assertIsInstance(self.successResultOf(annotatedCall), RemoteGauge)
        self.assertEqual(reply, {"seen": True})

    def test_errorAndUpdateAfterALargeFirstCopy(self) -> None:
        """
        An error that names a Cacheable, and the owner's update to the copy, wait behind
        the large answer still being sent that holds the first copy.
        """
        from tests.test_broker import Gauge

        class RemoteGauge(pb.RemoteCache):
            level = 1

            def observe_level(self, level: int) -> None:
                self.level = level

        class GaugeError(pb.Error, pb.Copyable):
            pass

        class RemoteGaugeError(pb.RemoteCopy, pb.Error):
            pass

        gauge = Gauge()
        self.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.registry.setUnjellyableForClass(GaugeError, RemoteGaugeError)

        def fail() -> None:
            error = GaugeError("with a gauge")
            error.gauge = gauge  # type: ignore[attr-defined]
            raise error

        self.rootObject.remote_gaugeAndData = lambda: (  # type: ignore[attr-defined]
            gauge,
            b"x" * (3 * 1024 * 1024),
        )
        self.rootObject.remote_fail = fail  # type: ignore[attr-defined]
        large = self.root.callRemote("gaugeAndData")
        self.pump.pump()
        self.assertTrue(self.server.sendingLarge)
        failing = self.root.callRemote("fail")
        update = gauge.observers[0].callRemote("level", 2)
        self.pump.flush()
        copy, _ = self.successResultOf(large)
        self.assertIsNone(self.successResultOf(update))
        self.assertEqual(copy.level, 2)
        error = self.failureResultOf(failing).value
        self.assertIsInstance(error, RemoteGaugeError)
        self.assertIsInstance(error.gauge, RemoteGauge)

    def test_cancelOfACallBehindALargeFirstCopy(self) -> None:
        """
        A call that waits behind a large first copy (see above), cancelled before any of it
        is written, is never sent, and the cache handle it counted is released; one that
        is cancelled once written is cancelled on the server (the cancel waits behind it).
        """
        from tests.test_broker import Gauge, RemoteGauge

        gauge = Gauge()
        self.server.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        ran: list[str] = []
        cancelled: list[str] = []
        self.rootObject.remote_take = lambda g, data=b"": len(data)  # type: ignore[attr-defined]

        def hold(g: Any, name: str) -> Deferred[None]:
            ran.append(name)
            return Deferred(lambda _: cancelled.append(name))

        self.rootObject.remote_hold = hold  # type: ignore[attr-defined]
        large = self.root.callRemote("take", gauge, b"x" * (3 * 1024 * 1024))
        unsent = self.root.callRemote("hold", gauge, "unsent")
        sent = self.root.callRemote("hold", gauge, "sent")
        self.assertEqual(len(self.client._afterLarge), 2)
        unsent.cancel()
        self.failureResultOf(unsent, CancelledError)
        self.assertEqual(len(self.client._afterLarge), 1)
        self.pump.flush()
        sent.cancel()
        self.failureResultOf(sent, CancelledError)
        self.pump.flush()
        self.assertEqual(self.successResultOf(large), 3 * 1024 * 1024)
        self.assertEqual((ran, cancelled), (["sent"], ["sent"]))
        self.assertEqual(self.server._answering, {})
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.client.remotelyCachedObjects, {})

    def test_overPeerLimit(self) -> None:
        """A call bigger than the peer accepts fails at once with LimitExceeded."""
        self.client.peerMessageSize = 1024 * 1024
        failure = self.call("echo", b"x" * (2 * 1024 * 1024))
        self.assertIsInstance(failure, Failure)
        failure.trap(LimitExceeded)
        self.assertIn("limit the peer accepts", str(failure.value))
        self.assertEqual(self.call("echo", 1), 1)

    def test_answerOverPeerLimit(self) -> None:
        """An answer bigger than the caller accepts becomes an error for that call."""
        self.server.peerMessageSize = 1024 * 1024
        failure = self.call("big", 2 * 1024 * 1024)
        self.assertIsInstance(failure, Failure)
        self.assertIn("limit the peer accepts", str(failure.value))

    def test_errorOverPeerLimit(self) -> None:
        """An error bigger than the caller accepts, raised at once or later, or ending a
        stream, reaches the caller as a LimitExceeded that names it; the connection stays."""
        self.server.peerMessageSize = 100_000
        message = "e" * 200_000
        later: Deferred[Any] = Deferred()

        def failNow() -> None:
            raise ValueError(message)

        def failingStream() -> Iterator[int]:
            yield 1
            raise ValueError(message)

        self.rootObject.remote_failNow = failNow  # type: ignore[attr-defined]
        self.rootObject.remote_failLater = lambda: later  # type: ignore[attr-defined]
        self.rootObject.remote_failingStream = failingStream  # type: ignore[attr-defined]
        with capturedLogs() as events:
            failures = [self.call("failNow")]
            pending: list[Any] = []
            self.root.callRemote("failLater").addBoth(pending.append)
            self.pump.flush()
            later.errback(ValueError(message))
            self.settle(pending)
            failures.append(pending[0])
            stream = self.call("failingStream")
            items: list[Any] = []
            for _ in range(2):
                stream.next().addBoth(items.append)
            self.pump.flush()
            self.assertEqual(items[0], 1)
            failures.append(items[1])
        for failure in failures:
            self.assertIsInstance(failure, Failure)
            self.assertIsNotNone(failure.check(LimitExceeded), failure.type)
            self.assertIn("failed with ValueError, an error too large to send", str(failure.value))
        self.assertIn("the stream failed", str(failures[2].value))
        sendFailures = [e for e in events if "Could not send a" in str(e.get("log_format"))]
        self.assertEqual(len(sendFailures), 3)
        self.flushLoggedErrors(ValueError)
        self.assertFalse(self.client.disconnected)
        self.assertEqual(self.call("echo", 1), 1)

    def test_firstCallKnowsTheServersLimit(self) -> None:
        """The root reaches the application once the server's hello has said how large a
        message it accepts: a call made at once, larger than that, fails with
        LimitExceeded instead of having the server drop the connection."""
        factory = pb.PBClientFactory()
        results: list[Any] = []
        factory.getRootObject().addCallback(
            lambda root: root.callRemote("echo", b"x" * (2 * 1024 * 1024))
        ).addBoth(results.append)
        limits = pb.BrokerLimits(messageSize=1024 * 1024)
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), limits=limits), factory
        )
        pump.flush()
        self.assertEqual(client.peerMessageSize, 1024 * 1024)
        results[0].trap(LimitExceeded)
        self.assertFalse(server.disconnected)

    def test_receivedOverLimitDrops(self) -> None:
        """A peer that ignores the announced limit is dropped."""
        self.server._decoder.messageSizeLimit = 1024 * 1024
        with capturedLogs():
            failure = self.call("echo", b"x" * (2 * 1024 * 1024))
        failure.trap(PBConnectionLost)

    def test_pbDialectCeiling(self) -> None:
        """In the pb dialect PB's limit stands, and the call fails clearly."""
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("echo", b"x" * (1024 * 1024)).addBoth(
            results.append
        )
        pump.flush()
        self.assertIsInstance(results[0], Failure)


def _plainExtensions(value: Any) -> msgpack.ExtType:
    """
    A tuple, set or frozenset as the native codec packs it (for msgpack's ``default``).
    """
    code = {tuple: _native.TUPLE, set: _native.SET, frozenset: _native.FROZENSET}[type(value)]
    return msgpack.ExtType(
        code, msgpack.packb(list(value), default=_plainExtensions, strict_types=True)
    )


class FrameDecoderTests(SynchronousTestCase):
    def test_mapKeysTextPurePythonMsgpack(self) -> None:
        """msgpack's pure-Python unpacker words a refused map key differently ("<class 'int'>
        is not allowed for map key"): the refusal reads the same either way."""
        from msgpack import fallback

        with self.assertRaises(ValueError) as caught:
            fallback.unpackb(msgpack.packb({1: 2}), strict_map_key=True)
        self.assertEqual(
            _native._malformed(caught.exception),
            "a map key of type int (keys must be text or bytes)",
        )

    def test_mapKeysText(self) -> None:
        """A message whose envelope holds a map with a key that is not text or bytes is
        malformed: msgpack would build it unchecked (numbers can be chosen to collide)."""
        record = _native.records([b"answer", 1, {"a": 1, b"b": 2}])[0]
        self.assertEqual(_native.FrameDecoder(None).feed(record)[0][2], {"a": 1, b"b": 2})
        for message in ([b"answer", 1, {1: 2}], [b"answer", 2, [{"a": {2.5: 0}}]]):
            with self.assertRaises(BananaDecodeError) as caught:
                _native.FrameDecoder(None).feed(_native.records(message)[0])
            self.assertIn("a malformed pbroker2 message: a map key of type", str(caught.exception))

    def test_splitAnywhere(self) -> None:
        """Records split at every byte boundary decode to the same messages."""
        messages = [[b"answer", i, b"v" * i] for i in (1, 300_000, 5)]
        messages.append([b"answer", 6, _native.Packed(b"w" * 600_000), _native.Packed(b"z")])
        data = b"".join(b"".join(_native.records(m)) for m in messages)
        for step in (1, 7, 4096, len(data)):
            decoder = _native.FrameDecoder(None)
            out: list[Any] = []
            for start in range(0, len(data), step):
                out.extend(decoder.feed(data[start : start + step]))
            self.assertEqual([m[1] for m in out], [1, 300_000, 5, 6])
            self.assertEqual(bytes(out[1][2]), b"v" * 300_000)
            self.assertEqual((bytes(out[3][2]), bytes(out[3][3])), (b"w" * 600_000, b"z"))

    def test_wholeRecordsBetweenFragments(self) -> None:
        """
        Whole records between the fragments of a large message, with reads split anywhere
        (inside headers, inside fragments), decode in the order their last records came.
        """
        large = _native.records([b"answer", 1, _native.Packed(b"L" * 700_000)])
        small = [_native.records([b"answer", i, b"s" * i])[0] for i in (2, 3, 4)]
        data = b"".join([large[0], small[0], large[1], small[1], small[2], large[2]])
        for step in (3, 4, 5, 65_536, 100_003, len(data)):
            decoder = _native.FrameDecoder(800_000)
            out: list[Any] = []
            for start in range(0, len(data), step):
                out.extend(decoder.feed(data[start : start + step]))
            self.assertEqual([m[1] for m in out], [2, 3, 4, 1])
            self.assertEqual(bytes(out[3][2]), b"L" * 700_000)
            self.assertFalse(decoder.midExpression)
            self.assertEqual(decoder.buffered, 0)

    def test_largeMessage(self) -> None:
        """
        largeMessage is true from a MORE record's header to the message's LAST record, with
        whole records between them and reads split anywhere; never for a message of one
        record, WHOLE or LAST, and not after an error.
        """
        large = _native.records([b"answer", 1, _native.Packed(b"L" * 700_000)])
        single = _native.records([b"answer", 2, _native.Packed(b"S" * 100_000)])
        whole = _native.records([b"answer", 3, b"w" * 70_000])
        self.assertEqual((len(large), len(single), len(whole)), (3, 1, 1))
        data = b"".join([whole[0], large[0], whole[0], large[1], large[2], single[0], whole[0]])
        # Where the large message runs: from its first header to the end of its last record.
        first = len(whole[0])
        last = first + len(large[0]) + len(whole[0]) + len(large[1]) + len(large[2])
        for step in (3, 4096, 65_536, 100_003):
            decoder = _native.FrameDecoder(None)
            for start in range(0, len(data), step):
                end = min(start + step, len(data))
                decoder.feed(data[start:end])
                self.assertEqual(decoder.largeMessage, first + 4 <= end < last, (step, end))
        decoder = _native.FrameDecoder(None)
        decoder.feed(large[0][:100_000])
        self.assertTrue(decoder.largeMessage)
        with self.assertRaises(BananaDecodeError):
            decoder.feed(b"\xff" * 100_000 + large[0][100_000:] + b"\x40\x00\x00\x01")
        self.assertFalse(decoder.largeMessage)

    def test_largeBytesPutTogetherOnce(self) -> None:
        """
        A large byte string packed by hand (alone, or the one argument of a call) is put
        together from the pieces it came in as the value itself, equal to what msgpack reads.
        """
        codec = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        large = bytes(range(256)) * 1200
        for value in (large, [large]):
            packed = codec.pack(value)
            assert isinstance(packed, _native.Packed)
            data = b"".join(_native.records([b"answer", 1, packed, _native.Packed(b"\x80")]))
            for step in (5, 65_536, len(data)):
                decoder = _native.FrameDecoder(None)
                out: list[Any] = []
                for start in range(0, len(data), step):
                    out.extend(decoder.feed(data[start : start + step]))
                ((_, _, arrived, keywords),) = out
                self.assertIsInstance(arrived, _native.Unpacked)
                # (assertTrue: a diff of two large strings would take minutes to print)
                self.assertTrue(codec.unpack(arrived) == msgpack.unpackb(packed.data))
                self.assertEqual(type(codec.unpack(arrived)), type(value))
                self.assertEqual(codec.unpack(keywords), {})

    def test_randomSplits(self) -> None:
        """
        Messages with values of many sizes and kinds, whole records between their fragments,
        read in random pieces: every value arrives as it was sent.
        """
        rng = random.Random(6)
        codec = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        for _ in range(20):
            values: list[Any] = []
            for _ in range(rng.randint(1, 3)):
                size = rng.choice([0, 1, 1000, 70_000, 262_143, 262_144, 600_001])
                item = rng.randbytes(size)
                values.append(rng.choice([item, [item], [item, size], {"k": item}]))
            packed = [codec.pack(value) for value in values]
            fields = [p if isinstance(p, _native.Packed) else _native.Packed(p) for p in packed]
            large = _native.records([b"answer", 7, *fields])
            small = _native.records([b"answer", 8, b"s"])[0]
            records = [part for record in large for part in (record, small)]
            data = b"".join(records)
            cuts = sorted(rng.sample(range(1, len(data)), rng.randint(0, 40)))
            decoder = _native.FrameDecoder(None)
            out: list[Any] = []
            for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
                out.extend(decoder.feed(data[start:stop]))
            self.assertEqual([m[1] for m in out], [8] * (len(large) - 1) + [7, 8])
            arrived = out[-2][2:]
            unpacked = [codec.unpack(value) for value in arrived]
            self.assertTrue(unpacked == values, "a value arrived changed")  # no huge diff

    def test_noStreamsInLargeBytes(self) -> None:
        """
        A byte string packed by hand is known to hold no stream without being read (or
        joined into one piece); a value packed whole is still read.
        """
        codec = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        packed = codec.pack(b"x" * 300_000)
        assert isinstance(packed, _native.Packed)
        packed.parts = (packed.parts[0], None)  # type: ignore[assignment]  # never touched
        self.assertEqual(codec.streamsIn(packed), [])
        stream = msgpack.packb([msgpack.ExtType(_native.STREAM, msgpack.packb(7))])
        self.assertEqual(codec.streamsIn(_native.Packed(stream)), [7])

    def test_lookalikeValues(self) -> None:
        """
        A value that only starts like a large byte string packed by hand is read by msgpack
        as any other: whole, or refused as malformed.
        """
        codec = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        cases = [
            (b"\xc6\x00\x00\x00\x09abc", None),  # a length that does not match
            (b"\x91\xc6\x00\x00\x00\x01ab", None),
            (b"\x92\xc6\x00\x00\x00\x01a\x01", [b"a", 1]),  # two items
            (b"\xc6\x00\x00\x00\x00", b""),  # matches: an empty string
            (b"\xc6", None),  # shorter than a header
        ]
        for payload, expected in cases:
            data = b"".join(_native.records([b"answer", 1, _native.Packed(payload)]))
            ((_, _, arrived),) = _native.FrameDecoder(None).feed(data)
            if expected is None:
                self.assertRaises(InvalidJelly, codec.unpack, arrived)
            else:
                self.assertEqual(codec.unpack(arrived), expected)

    def test_insideFragment(self) -> None:
        """
        While the rest of a fragment is awaited, the decoder says it is mid-message and
        counts what it holds; a fault afterwards still stops it for good.
        """
        first, last = _native.records([b"x" * 300_000])
        decoder = _native.FrameDecoder(None)
        self.assertEqual(decoder.feed(first[:4]), [])  # a header alone
        self.assertTrue(decoder.midExpression)
        self.assertEqual(decoder.feed(first[4:1004]), [])
        self.assertEqual(decoder.buffered, 1000)
        self.assertEqual(decoder.feed(first[1004:] + last[:10]), [])
        self.assertEqual(decoder.buffered, len(first) - 4 + 6)
        self.assertEqual(decoder.feed(last[10:]), [[b"x" * 300_000]])
        self.assertFalse(decoder.midExpression)
        decoder.feed(first[:100])
        self.assertRaises(BananaDecodeError, decoder.feed, first[100:] + b"\xc0\x00\x00\x01x")
        self.assertEqual((decoder.buffered, decoder.midExpression), (0, False))  # all dropped
        self.assertRaises(BananaDecodeError, decoder.feed, b"")

    def test_oneSmallRecordPerRead(self) -> None:
        """
        Reads of exactly one small record (the shortcut) decode like any other, keep the
        decoder ready for a record split across reads, and still honour the size limit.
        """
        decoder = _native.FrameDecoder(100)
        small = _native.records([b"answer", 1, 2])[0]
        split = _native.records([b"answer", 3, b"x" * 50])[0]
        self.assertEqual(decoder.feed(small), [[b"answer", 1, 2]])
        self.assertEqual(decoder.feed(split[:10]), [])
        self.assertTrue(decoder.midExpression)
        self.assertEqual(
            decoder.feed(split[10:] + small), [[b"answer", 3, b"x" * 50], [b"answer", 1, 2]]
        )
        self.assertEqual(decoder.feed(small), [[b"answer", 1, 2]])
        self.assertFalse(decoder.midExpression)
        self.assertRaises(BananaDecodeError, decoder.feed, _native.records([b"y" * 200])[0])
        self.assertRaises(BananaDecodeError, decoder.feed, small)  # refused for good

    def test_valueFieldsChecked(self) -> None:
        """
        A table of value fields that does not map byte strings to int bits is refused when the
        decoder is made, not when the first large record arrives.
        """
        for table in ({"answer": 4}, {b"answer": "4"}, [(b"answer", 4)]):
            self.assertRaises(TypeError, _native.FrameDecoder, None, table)
        _native.FrameDecoder(None, {b"answer": 4})

    def test_oneLargeRecordPerRead(self) -> None:
        """
        A read of exactly one whole record larger than the small ones takes the shortcut
        too, read where it is: its value is bytes of its own, or, with the C extension, a
        view of the (immutable) bytes read; and a broken or oversized record is still refused.
        """
        message = [b"answer", 7, b"x" * 100_000]
        (record,) = _native.records(message)
        decoder = _native.FrameDecoder(None)
        ((command, requestID, value),) = decoder.feed(record)
        self.assertEqual([command, requestID, value], message)
        if _native._envelope is None:
            self.assertIs(type(value), bytes)
        else:
            self.assertIs(type(value), memoryview)
            self.assertIs(value.obj, record)
        self.assertFalse(decoder.midExpression)
        self.assertEqual(decoder.feed(record), [message])
        broken = record[:4] + b"\xc1" + record[5:]  # a type byte msgpack never uses
        self.assertRaises(BananaDecodeError, _native.FrameDecoder(None).feed, broken)
        self.assertRaises(BananaDecodeError, _native.FrameDecoder(50_000).feed, record)

    def test_malformed(self) -> None:
        """Garbage, oversized records and unknown kinds are refused for good."""
        for data in [
            b"\x00\x00\x00\x01\xc1",
            b"\x00\x10\x00\x00",
            b"\xc0\x00\x00\x01x",
        ]:
            decoder = _native.FrameDecoder(None)
            self.assertRaises(BananaDecodeError, decoder.feed, data)
            self.assertRaises(BananaDecodeError, decoder.feed, b"")

    def test_malformedFragmentedMessages(self) -> None:
        """A fragmented message whose envelope or values do not add up is refused."""
        header = _native.fragmentHeader
        envelope = _native.packMessage([b"answer", 1, _native.Packed(b"abc")])[0][0]
        for payload in [
            b"\x00\x00",  # shorter than the envelope length
            b"\x00\x00\x00\x09\x93",  # shorter than the envelope
            envelope,  # the value is missing
            envelope + b"abcd",  # a byte after the values
            envelope.replace(b"\xd6\x06", b"\xd6\x07"),  # an unknown extension type
        ]:
            decoder = _native.FrameDecoder(None)
            self.assertRaises(
                BananaDecodeError, decoder.feed, header(_native.LAST, len(payload)) + payload
            )
        decoder = _native.FrameDecoder(None)
        out = decoder.feed(header(_native.LAST, len(envelope) + 3) + envelope + b"abc")
        self.assertEqual(bytes(out[0][2]), b"abc")

    def test_smallFragmentsRefused(self) -> None:
        """A fragment that is not full (or an empty last one) is refused at once."""
        for record in [
            _native.fragmentHeader(_native.MORE, 1) + b"x",
            _native.fragmentHeader(_native.LAST, 0),
        ]:
            self.assertRaises(BananaDecodeError, _native.FrameDecoder(None).feed, record)

    def test_wholeRecordLimits(self) -> None:
        """A whole record over the limit, or over a record's size, is refused by its header."""
        record = _native.wholeRecord([b"x" * 1000])
        assert record is not None
        decoder = _native.FrameDecoder(500)
        with self.assertRaises(BananaDecodeError) as raised:
            decoder.feed(record[:4])  # the header alone is enough
        self.assertIn("over the limit of 500 bytes", str(raised.exception))
        decoder = _native.FrameDecoder(None)
        with self.assertRaises(BananaDecodeError) as raised:
            decoder.feed(_native.fragmentHeader(_native.WHOLE, _native.FRAGMENT_SIZE + 1))
        self.assertIn("records carry at most", str(raised.exception))
        # At the limit exactly, the record is taken.
        decoder = _native.FrameDecoder(len(record) - 4)
        self.assertEqual(decoder.feed(record), [[b"x" * 1000]])

    def test_limitBeforeBuffering(self) -> None:
        """A fragmented message over the limit is refused as soon as its size shows."""
        decoder = _native.FrameDecoder(300_000)
        records = _native.records([b"x" * 600_000])
        decoder.feed(records[0])
        self.assertRaises(BananaDecodeError, decoder.feed, records[1])


class CodecEdgeTests(SynchronousTestCase):
    """
    The codec's entry points given what they do not usually get: other bytes-like types,
    values that are not bytes, hand-packed values, malformed documents.
    """

    def test_keyedMapInC(self) -> None:
        """The C extension's keyedMap builds a KEYED value's map at once when its keys are
        text, byte strings, or ints and floats no more than NUMBER_GROUP of which share a
        hash, and hands any other to the fallback that checks them, as found the slow way."""
        from pbroker import _accelerator

        speedups = _accelerator.speedups
        if speedups is None:
            raise SkipTest("pbroker._speedups is not in use (test_package checks why)")
        fallen: list[Any] = []

        def fallback(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
            fallen.append(pairs)
            return {"fallback": len(pairs)}

        pool: list[Any] = ["a", b"b", 1, -1, -2, 2.5, 2**61, 5 + 2**64, True, None, (1,), 1.0]
        generator = random.Random(67)
        for _ in range(2000):
            pairs = [(generator.choice(pool), index) for index in range(generator.randrange(30))]
            numbers = [key for key, _ in pairs if type(key) in (int, float)]
            plain = all(type(key) in (str, bytes, int, float) for key, _ in pairs) and all(
                count <= _native.NUMBER_GROUP
                for count in collections.Counter(map(hash, numbers)).values()
            )
            fallen.clear()
            made = speedups.keyedMap(fallback, pairs)
            if plain:
                self.assertEqual(made, dict(pairs))
                self.assertEqual(fallen, [])
            else:
                self.assertEqual((made, fallen), ({"fallback": len(pairs)}, [pairs]))
        self.assertEqual(speedups.keyedMap(fallback, [(i, i) for i in range(100)])[99], 99)
        with self.assertRaises(TypeError):
            speedups.keyedMap(fallback, ((1, 2),))

    def test_hashingCountedAfterJelly(self) -> None:
        """The tuples of a set or KEYED map are counted before they are hashed only once the
        value had a JELLY extension (which may share them): msgpack's own tuples are hashed in
        time in proportion to their bytes. Their comparing is counted either way."""
        codec = _native.ValueCodec(None, jelly.loads, None, None, None, 10)  # type: ignore[arg-type]
        budget = _native.HashBudget(items=10, compared=3)
        codec.hashing = lambda: budget  # type: ignore[method-assign]
        tuples = [msgpack.ExtType(_native.TUPLE, msgpack.packb([i, i, i])) for i in range(5)]
        for kind, wrap in (
            (_native.SET, lambda items: msgpack.ExtType(_native.SET, msgpack.packb(items))),
            (
                _native.KEYED,
                lambda items: msgpack.ExtType(
                    _native.KEYED, msgpack.packb({item: 0 for item in items})
                ),
            ),
        ):
            self.assertEqual(len(codec.unpack(msgpack.packb(wrap(tuples)))), 5, kind)
            self.assertEqual(budget.left, 10)  # five tuples of weight 4: not counted
            jellied = msgpack.ExtType(_native.JELLY, jelly.dumps(1))
            with self.assertRaises(InvalidJelly):
                codec.unpack(msgpack.packb([jellied, wrap(tuples)]))
            budget.left = 10
        colliding = [msgpack.ExtType(_native.TUPLE, msgpack.packb([-1 - i])) for i in range(2)]
        budget.compared = 3  # (each key looked at added to it)
        with self.assertRaises(InvalidJelly):  # weights 2 each, and the cost of looking
            codec.unpack(msgpack.packb(msgpack.ExtType(_native.SET, msgpack.packb(colliding))))

    def test_reprs(self) -> None:
        """A packed value shows its size; a value already unpacked, its type."""
        self.assertEqual(repr(_native.Packed(b"ab", b"c")), "<Packed 3 bytes>")
        self.assertEqual(repr(_native.Unpacked([b"x"])), "<Unpacked list>")

    def test_feedAnyBytesLike(self) -> None:
        """The frame decoder takes a bytearray or memoryview as it takes bytes, and what it
        keeps of one is a copy: a buffer the caller reuses does not change the message."""
        record = b"".join(_native.records([b"answer", 1, msgpack.packb([5, b"abc"])]))
        expected = _native.FrameDecoder(None).feed(record)
        for kind in (bytearray, memoryview):
            self.assertEqual(_native.FrameDecoder(None).feed(kind(record)), expected)
        decoder = _native.FrameDecoder(None)
        reused = bytearray(record[:-2])
        self.assertEqual(decoder.feed(reused), [])
        reused[:] = b"\xff" * len(reused)
        self.assertEqual(decoder.feed(bytearray(record[-2:])), expected)

    def test_unpackRefusesWhatIsNotBytes(self) -> None:
        """A value that is not bytes (a peer's malformed message put a string where a
        packed value goes) is refused with InvalidJelly, naming it."""
        codec = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        with self.assertRaises(InvalidJelly) as caught:
            codec.unpack("text")
        self.assertEqual(str(caught.exception), "a pbroker2 value must be bytes, not 'text'")

    def test_noStreamsInWhatCannotHoldThem(self) -> None:
        """A byte string packed by hand (in parts) and a value that is not bytes name no
        streams and no jellied objects."""
        codec = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        self.assertEqual(codec.streamsIn(_native.Packed(b"\xc4\x01", b"x")), [])
        self.assertEqual(_native.extensionsIn("text"), ([], []))
        self.assertEqual(_native.extensionsIn(None), ([], []))

    def test_extensionDepthWithoutMeasuring(self) -> None:
        """A codec that does not measure values first (the default) still refuses tuples and
        sets nested deeper than its depthLimit, as they are unpacked, with the message a
        measuring codec gives; as deep as the limit arrives."""
        sender = _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]
        fits = sender.pack([((1,),)])  # a list: a level msgpack counts, not the codec
        deeper = sender.pack((((1,),),))
        assert isinstance(fits, bytes) and isinstance(deeper, bytes)
        for measure in (False, True):
            codec = _native.ValueCodec(
                None,  # type: ignore[arg-type]
                None,  # type: ignore[arg-type]
                None,  # type: ignore[arg-type]
                None,  # type: ignore[arg-type]
                None,  # type: ignore[arg-type]
                2,
                measureDepth=measure,
            )
            with self.assertRaises(InvalidJelly) as caught:
                codec.unpack(deeper)
            self.assertEqual(str(caught.exception), "a value nested more than 2 levels deep")
            self.assertEqual(codec._depth, 0)  # back at the top for the next value
            self.assertEqual(codec.unpack(sender.pack(((1,),))), ((1,),))
        self.assertEqual(
            _native.ValueCodec(None, None, None, None, None, 2).unpack(fits),  # type: ignore[arg-type]
            [((1,),)],
        )

    def test_depthOfSiblings(self) -> None:
        """deeperThan counts what follows an array (of n items) or a map (of n entries, 2n
        objects) as beside it, not inside it."""
        for value in ([[], [1]], [[1], [2], [3]], [{}, [1]], [{"k": 1}, [1]], [{"k": 1}, {}, [3]]):
            packed = msgpack.packb(value)
            self.assertFalse(_native.deeperThan(packed, 2), value)
            self.assertTrue(_native.deeperThan(packed, 1), value)
        self.assertTrue(_native.deeperThan(msgpack.packb([{"k": [1]}]), 2))

    def test_depthOfMalformedDocuments(self) -> None:
        """deeperThan judges a malformed document (the never-used type byte 0xc1, an
        extension cut before its type byte) by what came before the fault."""
        self.assertFalse(_native.deeperThan(bytes([0x91, 0xC1, 0, 0, 0]), 1))
        self.assertTrue(_native.deeperThan(bytes([0x91, 0x91, 0xC1, 0, 0]), 1))
        self.assertFalse(_native.deeperThan(bytes([0x91, 0xD4]), 1))
        self.assertTrue(_native.deeperThan(bytes([0x91, 0x91, 0xD4]), 1))


class LateFailureTests(NativeTestCase):
    def test_failureAfterDisconnectLoggedAsSuch(self) -> None:
        """A call that fails after its caller disconnected is logged as that, not as a
        traceback the peer will receive."""
        self.root.callRemote("wait").addErrback(lambda _: None)
        self.pump.flush()
        self.client.transport.loseConnection()
        self.pump.flush()
        pending = self.rootObject.pending
        assert pending is not None
        with capturedLogs() as events:
            pending.errback(ValueError("too late"))
        self.flushLoggedErrors(ValueError)
        formats = [str(e.get("log_format")) for e in events]
        self.assertIn("A call from a peer now disconnected failed", formats)
        self.assertFalse(any("Peer will receive" in f for f in formats))


class StreamTests(NativeTestCase):
    def test_oneSourceOneStream(self) -> None:
        """A source already being sent cannot be sent again, on any connection (two readers
        would share its items): the second call fails, saying so; the first stream is whole."""
        shared = Stream()
        self.rootObject.remote_shared = lambda: shared  # type: ignore[attr-defined]
        first = self.call("shared")
        self.assertIsInstance(first, RemoteStream)
        second = self.call("shared")
        self.flushLoggedErrors(ValueError)
        self.assertIsInstance(second, Failure)
        self.assertIn("already being sent as a stream", second.getErrorMessage())
        # Nor on another connection.
        _server, otherClient, otherPump = connectedServerAndClient(
            self.server.factory, pb.PBClientFactory()
        )
        third: list[Any] = []
        otherClient.remoteForName("root").callRemote("shared").addBoth(third.append)
        otherPump.flush()
        self.flushLoggedErrors(ValueError)
        self.assertIsInstance(third[0], Failure)
        self.assertIn("already being sent as a stream", third[0].getErrorMessage())
        shared.write(1)
        shared.finish()
        items: list[Any] = []
        first.collect().addBoth(items.append)
        self.settle(items)
        self.assertEqual(items, [[1]])
        # Once that stream has ended, the source may be sent again.
        again = self.call("shared")
        self.assertIsInstance(again, RemoteStream)

    def test_generatorResult(self) -> None:
        """A generator a method returns arrives as a stream, read whole by collect()."""
        stream = self.call("numbers", 100)
        self.assertIsInstance(stream, RemoteStream)
        results: list[Any] = []
        stream.collect().addBoth(results.append)
        self.settle(results)
        self.assertEqual(results[0], list(range(100)))
        self.assertEqual(self.client._streams.incoming, {})
        self.assertEqual(self.server._streams.outgoing, {})

    def test_asyncIteration(self) -> None:
        """An async generator's items are read with async for."""
        stream = self.call("asyncNumbers", 5)
        seen: list[Any] = []

        async def read() -> None:
            async for item in stream:
                seen.append(item)

        done: list[Any] = []
        Deferred.fromCoroutine(read()).addBoth(done.append)
        self.settle(done)
        self.assertEqual(done, [None])
        self.assertEqual(seen, [0, 10, 20, 30, 40])

    def test_wideWindowNoRecursion(self) -> None:
        """A reader's large window over a source whose items are ready at once: no recursion."""
        self.client.streamWindow = 2000
        stream = self.call("asyncNumbers", 3000)
        results: list[Any] = []
        stream.collect().addBoth(results.append)
        self.settle(results)
        self.assertEqual(results[0], [i * 10 for i in range(3000)])

    def test_backPressure(self) -> None:
        """A reader that does not read holds at most its window; reading lets more come."""
        stream = self.call("numbers", 10_000)
        for _ in range(50):
            self.pump.pump()
        window = self.client.streamWindow
        self.assertLessEqual(stream.buffered, window)
        self.assertLessEqual(self.rootObject.pulled, window)
        firsts: list[Any] = []
        for _ in range(window):
            stream.next().addCallback(firsts.append)
        self.pump.flush()
        self.assertEqual(firsts, list(range(window)))
        self.assertGreater(self.rootObject.pulled, window)
        self.assertLessEqual(self.rootObject.pulled, 2 * window)

    def test_cancelClosesGenerator(self) -> None:
        """Cancelling a stream closes the sender's generator and fails pending reads."""
        stream = self.call("numbers", 10_000)
        self.pump.flush()
        stream.cancel()
        pending = stream.next()
        self.pump.flush()
        self.assertTrue(self.rootObject.closed)
        self.failureResultOf(pending, CancelledError)
        self.assertEqual(self.server._streams.outgoing, {})
        self.assertEqual(self.client._streams.cancelled, set())
        self.assertEqual(self.call("echo", 1), 1)

    def test_errorInOrder(self) -> None:
        """An exception in the generator reaches the reader after the items before it."""
        stream = self.call("numbers", 10, 3)
        seen: list[Any] = []
        for _ in range(5):
            stream.next().addBoth(seen.append)
        self.pump.flush()
        self.assertEqual(seen[:3], [0, 1, 2])
        self.assertIsInstance(seen[3], Failure)
        self.assertIn("failed at 3", str(seen[3].value))
        self.assertIsInstance(seen[4], Failure)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_streamArgument(self) -> None:
        """A caller may send a stream: here a generator the server sums as it arrives."""
        self.assertEqual(self.call("sum", iter(range(1000))), sum(range(1000)))

    def test_pushedStream(self) -> None:
        """A Stream the method writes to, with writes held back while the buffer is full."""
        stream = self.call("pushed")
        source = self.rootObject.stream
        accepted = [source.write(i) for i in range(3)]
        self.assertNoResult(accepted[2])
        results: list[Any] = []
        stream.collect().addBoth(results.append)
        self.pump.flush()
        self.successResultOf(accepted[2])
        source.write(3)
        source.finish()
        self.settle(results)
        self.assertEqual(results[0], [0, 1, 2, 3])

    def test_connectionLostFailsStream(self) -> None:
        """A stream whose connection drops fails with PBConnectionLost."""
        stream = self.call("pushed")
        pending = stream.next()
        self.client.transport.loseConnection()
        self.pump.flush()
        self.failureResultOf(pending, PBConnectionLost)

    def test_pbDialectRefusesStreams(self) -> None:
        """On a pb connection a stream cannot be sent: UnsupportedByPeer names the dialect."""
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        root = client.remoteForName("root")
        root.callRemote("sum", iter([1])).addBoth(results.append)
        root.callRemote("numbers", 3).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(UnsupportedByPeer)), 1)
        for failure in results:
            self.assertIn("UnsupportedByPeer", str(failure.type) + str(failure.value))
            self.assertIn("'pb'", str(failure.value))
        results[0].trap(UnsupportedByPeer)


class CancellationTests(NativeTestCase):
    def test_cancelReachesServer(self) -> None:
        """Cancelling a pending call fails it with CancelledError and cancels the server's."""
        d = self.root.callRemote("wait")
        self.pump.flush()
        server = self.rootObject.pending
        assert server is not None
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.pump.flush()
        self.assertEqual(self.rootObject.cancelled, [True])
        self.assertEqual(self.client._abandoned, set())
        self.assertEqual(self.server._answering, {})
        self.assertEqual(self.call("echo", 2), 2)

    def test_cancelLargeCallWhileSent(self) -> None:
        """
        A call whose arguments are still being sent in fragments when its timeout passes,
        or when it is cancelled, is cancelled on the server all the same: the cancel does
        not overtake the call. Those that wait behind it (calls keep their order), none of
        them written yet, are never sent, and what they exported is released. A small call
        made to go ahead (``ordered=False``) and cancelled meanwhile is cancelled at once.
        """
        large = b"x" * (3 * 1024 * 1024)

        def take(data: bytes, *rest: Any) -> Deferred[Any]:
            ran.append(len(data))
            waiting: Deferred[Any] = Deferred(lambda _: cancelled.append(len(data)))
            return waiting

        ran: list[int] = []
        cancelled: list[int] = []
        self.rootObject.remote_take = take  # type: ignore[attr-defined]
        timed = self.root.withOptions(timeout=0.5).callRemote("take", large)
        d = self.root.callRemote("take", large, Counter())
        small = self.root.callRemote("take", b"s")
        ahead = self.root.withOptions(ordered=False).callRemote("take", b"a")
        self.assertTrue(self.client.sendingLarge)
        self.assertEqual(len(self.client.localObjects), 1)  # the Counter, exported by packing
        d.cancel()
        small.cancel()
        ahead.cancel()
        self.clock.advance(1)
        self.failureResultOf(d, CancelledError)
        self.failureResultOf(small, CancelledError)
        self.failureResultOf(ahead, CancelledError)
        self.failureResultOf(timed, TimeoutError)
        self.assertEqual(self.client.localObjects, {})
        self.pump.flush()
        self.assertEqual(sorted(ran), [1, len(large)])
        self.assertEqual(sorted(cancelled), [1, len(large)])
        self.assertEqual(self.server._answering, {})
        self.assertEqual(self.client._largeOut, [])

    def test_callCancelledHalfWritten(self) -> None:
        """A call cancelled while its fragments are being written is written whole all the
        same (the peer could not make sense of half a message), then cancelled there."""
        large = b"x" * (8 * 1024 * 1024)
        cancelled: list[int] = []
        self.rootObject.remote_take = lambda data: Deferred(  # type: ignore[attr-defined]
            lambda _: cancelled.append(len(data))
        )
        d = self.root.callRemote("take", large)
        self.assertTrue(self.client.sendingLarge)
        self.assertIsNone(self.client._largeOut[0][4])  # being written
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.pump.flush()
        self.assertEqual(cancelled, [len(large)])
        self.assertFalse(self.client.disconnected or self.server.disconnected)
        self.assertEqual(self.call("echo", 1), 1)

    def test_badArgumentsRefusedAtOnce(self) -> None:
        """A method name that is not text, or a timeout that is not a number of seconds, is
        refused where it is given, with a TypeError; nothing reaches the peer."""
        for name in (123, None, ["echo"]):
            with self.assertRaises(TypeError) as caught:
                self.root.callRemote(name)
            self.assertIn("a remote method's name must be text", str(caught.exception))
            with self.assertRaises(TypeError):
                self.root.withOptions(timeout=1).callRemote(name)
        for timeout in (True, "5", [1]):
            with self.assertRaises(TypeError) as caught:
                self.root.withOptions(timeout=timeout)
            self.assertIn("a timeout must be a number of seconds", str(caught.exception))
        self.assertRaises(ValueError, self.root.withOptions, timeout=0)
        self.pump.flush()
        self.assertFalse(self.server.disconnected)
        self.assertEqual(self.call("echo", 3), 3)

    def test_answerCrossesCancel(self) -> None:
        """An answer already on its way when the caller cancels is dropped quietly."""
        d = self.root.callRemote("wait")
        self.pump.flush()
        assert self.rootObject.pending is not None
        self.rootObject.pending.callback(5)
        d.cancel()
        self.pump.flush()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.client._abandoned, set())
        self.assertFalse(self.client.disconnected)

    def test_timeout(self) -> None:
        """A call with a timeout fails with TimeoutError when it passes; the server is told."""
        d = self.root.withOptions(timeout=5).callRemote("wait")
        self.pump.flush()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failure = self.failureResultOf(d, TimeoutError)
        self.assertEqual(str(failure.value), "the call to 'wait' had no answer within 5 seconds")
        self.pump.flush()
        self.assertEqual(self.rootObject.cancelled, [True])

    def test_cancelIsNotATimeout(self) -> None:
        """A call with a timeout that the caller cancels first fails with CancelledError."""
        d = self.root.withOptions(timeout=5).callRemote("wait")
        self.pump.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_timeoutNotReached(self) -> None:
        """A call answered in time is not disturbed by its timeout."""
        self.assertEqual(self.root.withOptions(timeout=5) and self.call("echo", 3), 3)
        d = self.root.withOptions(timeout=5).callRemote("echo", 4)
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), 4)
        self.clock.advance(10)

    def test_pbDialect(self) -> None:
        """On a pb connection cancel and timeout work locally; the late answer is dropped."""
        clock = Clock()
        root = NativeRoot()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(root), pb.PBClientFactory(dialects=[b"pb"], clock=clock)
        )
        ref = client.remoteForName("root")
        d = ref.withOptions(timeout=1).callRemote("wait")
        pump.flush()
        clock.advance(1)
        self.failureResultOf(d, TimeoutError)
        assert root.pending is not None
        root.pending.callback("late")
        pump.flush()
        self.assertFalse(client.disconnected)
        self.assertEqual(client._abandoned, set())

    def test_badOptions(self) -> None:
        """Options are checked when given."""
        self.assertRaises(ValueError, self.root.withOptions, timeout=0)
        self.assertRaises(TypeError, self.root.withOptions, context={1: 2})
        self.assertRaises(TypeError, self.root.withOptions, context=[("a", 1)])

    def test_contextValuesChecked(self) -> None:
        """A context value that cannot travel is refused when given, with a message naming
        it, rather than failing the call later with msgpack's words."""
        deep: Any = 1
        for _ in range(40):
            deep = [deep]
        for value, error, text in (
            (object(), TypeError, "context['v'] is of type object"),
            ({1, 2}, TypeError, "context['v'] is of type set"),
            (2**80, ValueError, "beyond 64 bits"),
            ([1, {"k": [object()]}], TypeError, "context['v'][1]['k'][0] is of type object"),
            ({2: "x"}, TypeError, "the keys of context['v'] must be text"),
            (deep, ValueError, "nests more than 32 levels deep"),
        ):
            with self.assertRaises(error) as caught:
                self.root.withOptions(context={"v": value})
            self.assertIn(text, str(caught.exception))

        class Level(enum.IntEnum):
            HIGH = 3

        sent = {"t": ("a", 1), "e": Level.HIGH, "a": bytearray(b"ab")}
        self.call("annotated", 1, target=self.root.withOptions(context=sent))
        self.assertEqual(
            self.rootObject.contexts[-1].annotations, {"t": ["a", 1], "e": 3, "a": b"ab"}
        )
        plain = {"n": None, "b": True, "i": -(2**63), "f": 1.5, "s": "t", "y": b"\x00"}
        self.assertEqual(
            self.call("annotated", 1, target=self.root.withOptions(context=plain)), [1, None, None]
        )
        self.assertEqual(self.rootObject.contexts[-1].annotations, plain)

    def test_timeoutOfAFloatSubclass(self) -> None:
        """A timeout may be any real number but a bool (a float subclass too)."""

        class Seconds(float):
            pass

        self.assertEqual(self.root.withOptions(timeout=Seconds(5)).options.timeout, 5)
        self.assertRaises(TypeError, self.root.withOptions, timeout=True)


class ContextTests(NativeTestCase):
    def test_annotationsBothWays(self) -> None:
        """The method reads the caller's annotations and deadline; its reply comes back."""
        reply: dict[str, Any] = {}
        ref = self.root.withOptions(
            timeout=30, context={"correlationId": "c-1", "caller": "tests"}, reply=reply
        )
        results: list[Any] = []
        ref.callRemote("annotated", 7).addBoth(results.append)
        self.settle(results)
        self.assertEqual(results[0], [7, None, None])
        call = self.rootObject.contexts[0]
        self.assertEqual(call.annotations, {"correlationId": "c-1", "caller": "tests"})
        self.assertEqual(call.deadline, self.clock.seconds() + 30)
        self.assertEqual(reply, {"seen": 7})

    def test_largeAnnotations(self) -> None:
        """Annotations that take a call's envelope past one record (FRAGMENT_SIZE), alone or
        after an argument small enough to be carried in the envelope, are sent in fragments
        and arrive whole; so do reply annotations as large after such a result."""
        blob = bytes(range(256)) * 1100  # 281,600 bytes: more than a record holds
        value = b"v" * 40_000  # packed apart, yet small enough for an envelope
        self.assertLess(_native.INLINE_LIMIT, len(blob))
        self.assertGreater(len(blob), _native.FRAGMENT_SIZE)

        def annotatedLarge(value: Any) -> Any:
            pbContext().reply["echo"] = pbContext().annotations["blob"]
            return value

        self.rootObject.remote_annotatedLarge = annotatedLarge  # type: ignore[attr-defined]
        whole: list[Any] = []

        def wholeRecord(message: list[Any], plain: bool = False) -> Any:
            record = _native.wholeRecord(message, plain)
            whole.append((message[0], record))
            return record

        self.patch(brokerModule, "wholeRecord", wholeRecord)
        for argument in (1, value):
            reply: dict[str, Any] = {}
            target = self.root.withOptions(context={"blob": blob}, reply=reply)
            del whole[:]
            result = self.call("annotatedLarge", argument, target=target)
            self.assertTrue(result == argument)
            self.assertTrue(reply == {"echo": blob})  # (no diff of large strings)
            # Neither the call nor its answer had a whole record: both went in fragments
            # (the server says it took the call in a message of its own).
            self.assertEqual(
                [(name, record) for name, record in whole if name != b"taken"],
                [(b"callctx", None), (b"answerctx", None)],
            )
        self.assertFalse(self.client.disconnected)

    def test_replyOfAFailedCall(self) -> None:
        """A call that fails gets no reply annotations (an error carries none), and this
        side keeps nothing for it."""

        def failing() -> None:
            pbContext().reply["seen"] = True
            raise pb.Error("refused")

        self.rootObject.remote_failing = failing  # type: ignore[attr-defined]
        reply: dict[str, Any] = {}
        failure = self.call("failing", target=self.root.withOptions(context={}, reply=reply))
        failure.trap(pb.Error)
        self.assertEqual(failure.getErrorMessage(), "refused")
        self.assertEqual(reply, {})
        self.assertEqual(self.client._replyTargets, {})
        self.assertEqual(self.server._callContexts, {})

    def test_replyAnnotationsChecked(self) -> None:
        """Reply annotations that cannot travel fail the call with the error a context like
        them gets when given, naming the annotation, whether the answer is small or goes in
        fragments and whether the method answers at once or later; the server logs one
        line, keeps nothing for the call, and the connection stays."""
        deep: Any = 1
        for _ in range(40):
            deep = [deep]

        def annotate(key: Any, value: Any) -> Callable[[context.CallContext], None]:
            return lambda call: call.reply.update({"fine": 1, key: value})

        def replace(call: context.CallContext) -> None:
            call.reply = ["fine"]  # type: ignore[assignment]

        cases: list[tuple[Callable[[context.CallContext], None], type[Exception], str]] = [
            (
                annotate("bad", object()),
                TypeError,
                "reply['bad'] is of type object; a call context",
            ),
            (
                annotate("bad", pb.Referenceable()),
                TypeError,
                "reply['bad'] is of type Referenceable",
            ),
            (annotate("bad", 2**80), ValueError, "reply['bad'] is an integer beyond 64 bits"),
            (annotate("bad", [{2: "x"}]), TypeError, "the keys of reply['bad'][0] must be text"),
            (annotate("bad", deep), ValueError, "nests more than 32 levels deep"),
            (annotate(2, "x"), TypeError, "reply keys must be text, not 2"),
            (replace, TypeError, "a call's reply must be a dict, not list"),
        ]
        gates: list[Deferred[None]] = []

        def badReply(case: int, size: int) -> list[Any]:
            cases[case][0](pbContext())
            return [self.rootObject.counter, b"x" * size]  # exports the counter

        async def badReplyLater(case: int, size: int) -> list[Any]:
            gate: Deferred[None] = Deferred()
            gates.append(gate)
            await gate
            return badReply(case, size)

        self.rootObject.remote_badReply = badReply  # type: ignore[attr-defined]
        self.rootObject.remote_badReplyLater = badReplyLater  # type: ignore[attr-defined]
        for case, (_, error, text) in enumerate(cases):
            for size in (10, 200_000):  # the larger goes in fragments
                for method in ("badReply", "badReplyLater"):
                    what = (text, size, method)
                    reply: dict[str, Any] = {}
                    results: list[Any] = []
                    with capturedLogs() as events:
                        target = self.root.withOptions(context={}, reply=reply)
                        target.callRemote(method, case, size).addBoth(results.append)
                        self.pump.flush()
                        if gates:
                            gates.pop().callback(None)
                        self.settle(results)
                    [failure] = results
                    self.assertIsInstance(failure, Failure, what)
                    self.assertEqual(failure.type, f"builtins.{error.__name__}".encode(), what)
                    self.assertIn(text, failure.getErrorMessage(), what)
                    [event] = [e for e in events if e["log_level"] != LogLevel.debug]
                    self.assertEqual(event["log_level"], LogLevel.error, what)
                    self.assertNotIn("log_failure", event, what)
                    self.assertIn(text, formatEvent(event), what)
                    self.assertEqual(reply, {}, what)
                    self.assertEqual(self.server.luids, {}, what)  # the counter released
                    self.assertEqual(
                        (self.server._answering, self.server._callContexts), ({}, {}), what
                    )
                    self.assertEqual(
                        (self.client.waitingForAnswers, self.client._replyTargets), ({}, {}), what
                    )
                    self.assertFalse(self.server._largeOut or self.server._afterLarge, what)
        self.assertFalse(self.client.disconnected)
        reply = {}
        ref = self.root.withOptions(context={}, reply=reply)
        self.assertEqual(self.call("annotated", 1, target=ref), [1, None, None])
        self.assertEqual(reply, {"seen": 1})

    def test_badReplyOfAFailedCall(self) -> None:
        """A method that fails after setting a reply annotation that cannot travel, at once
        or later, fails with its own error: an error carries no annotations."""

        def failing() -> None:
            pbContext().reply["bad"] = object()
            raise pb.Error("refused")

        async def failingLater() -> None:
            await succeed(None)
            failing()

        self.rootObject.remote_failing = failing  # type: ignore[attr-defined]
        self.rootObject.remote_failingLater = failingLater  # type: ignore[attr-defined]
        for method in ("failing", "failingLater"):
            reply: dict[str, Any] = {}
            with capturedLogs() as events:
                failure = self.call(method, target=self.root.withOptions(context={}, reply=reply))
            failure.trap(pb.Error)
            self.assertEqual(failure.getErrorMessage(), "refused")
            self.assertEqual([e for e in events if e["log_level"] != LogLevel.debug], [])
            self.assertEqual(reply, {})
            self.assertEqual((self.client._replyTargets, self.server._callContexts), ({}, {}))

    def test_oneWayCallWithAContext(self) -> None:
        """A one-way call carries its annotations and deadline to the method; nothing is
        kept for a reply that is never sent."""
        ref = self.root.withOptions(timeout=30, context={"k": "v"})
        self.assertIsNone(ref.callRemote("annotated", 4, pbanswer=False))
        self.pump.flush()
        [call] = self.rootObject.contexts
        self.assertEqual((call.annotations, call.deadline), ({"k": "v"}, self.clock.seconds() + 30))
        self.assertEqual(call.reply, {"seen": 4})  # the method's, which goes nowhere
        self.assertEqual(self.server._callContexts, {})
        self.assertEqual(self.client.waitingForAnswers, {})

    def test_keywordNamesStayFree(self) -> None:
        """Keywords named timeout or context reach the method as ordinary arguments."""
        result = self.call("annotated", 1, timeout=2, context=3)
        self.assertEqual(result, [1, 2, 3])
        self.assertEqual(self.rootObject.contexts[0].annotations, {})

    def test_asyncMethod(self) -> None:
        """An async method sees its context after an await."""
        ref = self.root.withOptions(context={"k": "v"})
        results: list[Any] = []
        ref.callRemote("annotatedLater").addBoth(results.append)
        self.settle(results)
        self.assertEqual(results[0], {"k": "v"})

    def test_streamingMethods(self) -> None:
        """A method whose body runs as its stream is read (a generator, an async generator,
        a generator an async method returns) sees the context of its call."""

        def rows() -> Iterator[Any]:
            yield pbContext().annotations.get("cid")

        async def asyncRows() -> AsyncIterator[Any]:
            await succeed(None)
            yield pbContext().annotations.get("cid")

        gates: list[Deferred[None]] = []

        async def later() -> Iterator[Any]:
            gate: Deferred[None] = Deferred()
            gates.append(gate)
            await gate  # fired from outside the call
            return rows()

        self.rootObject.remote_rows = rows  # type: ignore[attr-defined]
        self.rootObject.remote_asyncRows = asyncRows  # type: ignore[attr-defined]
        self.rootObject.remote_later = later  # type: ignore[attr-defined]
        ref = self.root.withOptions(context={"cid": "c-42"})
        for name in ("rows", "asyncRows", "later"):
            answers: list[Any] = []
            ref.callRemote(name).addBoth(answers.append)
            self.pump.flush()
            if gates:
                gates.pop().callback(None)
            self.settle(answers)
            items: list[Any] = []
            answers[0].collect().addBoth(items.append)
            self.settle(items)
            self.assertEqual(items, [["c-42"]], name)
        self.assertEqual(context.current().annotations, {})

    def test_streamsInStreamsAndClosing(self) -> None:
        """A stream sent as an item of another, and the source's cleanup when the reader
        cancels, run in the call's context too."""
        seen: dict[str, Any] = {}

        def inner() -> Iterator[int]:
            seen["inner"] = pbContext().annotations.get("cid")
            yield 1

        def outer() -> Iterator[Any]:
            try:
                yield inner()
                count = 0
                while True:
                    count += 1
                    yield count
            finally:
                seen["finally"] = pbContext().annotations.get("cid")

        self.rootObject.remote_outer = outer  # type: ignore[attr-defined]
        answers: list[Any] = []
        self.root.withOptions(context={"cid": "c-7"}).callRemote("outer").addBoth(answers.append)
        self.settle(answers)
        stream = answers[0]
        firsts: list[Any] = []
        stream.next().addBoth(firsts.append)
        self.settle(firsts)
        items: list[Any] = []
        firsts[0].collect().addBoth(items.append)
        self.settle(items)
        self.assertEqual(items, [[1]])
        stream.cancel()
        for _ in range(100):
            self.pump.pump()
        self.assertEqual(seen, {"inner": "c-7", "finally": "c-7"})

    def test_asyncSourceKeepsItsContext(self) -> None:
        """What an async generator sets in its context carries over from item to item and
        into its cleanup, as a sync generator's does: a token it made is reset later."""
        var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=0)
        seen: list[Any] = []

        def counting(cleanup: str) -> Any:
            async def source() -> AsyncIterator[int]:
                token = var.set(1)
                try:
                    for _ in range(3):
                        await succeed(None)
                        var.set(var.get() + 1)
                        yield var.get()
                finally:
                    var.reset(token)
                    seen.append((cleanup, var.get()))

            return source()

        self.rootObject.remote_counting = counting  # type: ignore[attr-defined]
        answers: list[Any] = []
        self.root.callRemote("counting", "ended").addBoth(answers.append)
        self.settle(answers)
        items: list[Any] = []
        answers[0].collect().addBoth(items.append)
        self.settle(items)
        self.assertEqual(items, [[2, 3, 4]])

        answers = []
        self.root.callRemote("counting", "cancelled").addBoth(answers.append)
        self.settle(answers)
        firsts: list[Any] = []
        answers[0].next().addBoth(firsts.append)
        self.settle(firsts)
        self.assertEqual(firsts, [2])
        answers[0].cancel()
        for _ in range(100):
            self.pump.pump()
        self.assertEqual(seen, [("ended", 0), ("cancelled", 0)])
        self.assertEqual(var.get(), 0)

    def test_asyncSourceAwaitingOddValues(self) -> None:
        """An async source that awaits what a Twisted coroutine may await (a value that is
        not a Deferred, given back; a Deferred that has already fired) streams its items."""

        class Handmade:
            def __await__(self) -> Any:
                given = yield "given back"
                fired = yield succeed(given + ", then fired")
                return fired

        class Plain:
            """An awaitable whose __await__ gives an iterator, not a generator: done at once,
            with None."""

            def __await__(self) -> Any:
                return iter(())

        class Source:
            left = 2

            def __aiter__(self) -> Source:
                return self

            def __anext__(self) -> Any:
                self.left -= 1
                if self.left < 0:
                    raise StopAsyncIteration
                return Plain() if self.left == 0 else self.handmade()

            async def handmade(self) -> str:
                result: str = await Handmade()
                return result

        self.rootObject.remote_odd = Source  # type: ignore[attr-defined]
        answers: list[Any] = []
        self.root.callRemote("odd").addBoth(answers.append)
        self.settle(answers)
        items: list[Any] = []
        answers[0].collect().addBoth(items.append)
        self.settle(items)
        self.assertEqual(items, [["given back, then fired", None]])

    def test_asyncSourceFailingAtOnce(self) -> None:
        """An async iterator whose __anext__ raises before returning an awaitable, or returns
        something that cannot be awaited, ends or fails its stream like any other."""

        class Source:
            def __init__(self, outcome: str) -> None:
                self.outcome = outcome

            def __aiter__(self) -> Source:
                return self

            def __anext__(self) -> Any:
                if self.outcome == "stop":
                    raise StopAsyncIteration
                if self.outcome == "fail":
                    raise ValueError("at once")
                if self.outcome == "slip":
                    raise StopIteration  # meant StopAsyncIteration: an error, not an end
                return 42

        self.rootObject.remote_source = Source  # type: ignore[attr-defined]
        outcomes: list[Any] = []
        for given in ("stop", "fail", "number", "slip"):
            answers: list[Any] = []
            self.root.callRemote("source", given).addBoth(answers.append)
            self.settle(answers)
            items: list[Any] = []
            answers[0].collect().addBoth(items.append)
            self.settle(items)
            outcomes.append(items[0] if isinstance(items[0], list) else items[0].getErrorMessage())
        self.flushLoggedErrors(ValueError, TypeError, RuntimeError)
        self.assertEqual(outcomes[:2], [[], "at once"])
        self.assertEqual(outcomes[2], "__anext__() returned 42, which cannot be awaited")
        self.assertEqual(outcomes[3], "__anext__() raised StopIteration")

    def test_outsideCall(self) -> None:
        """Outside a remote call the context is empty."""
        self.assertEqual(context.current().annotations, {})

    def test_pbDialect(self) -> None:
        """On a pb connection annotations cannot travel: UnsupportedByPeer."""
        _server, client, _pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(dialects=[b"pb"])
        )
        for options in ({"context": {"a": 1}}, {"reply": {}}):
            d = client.remoteForName("root").withOptions(**options).callRemote("echo", 1)
            failure = self.failureResultOf(d, UnsupportedByPeer)
            self.assertIn("call context", str(failure.value))

    def test_replyWithoutContext(self) -> None:
        """A reply asked for without a context or timeout gets the method's annotations too,
        checked as any reply is."""
        reply: dict[str, Any] = {}
        self.assertEqual(
            self.call("annotated", 5, target=self.root.withOptions(reply=reply)), [5, None, None]
        )
        self.assertEqual(reply, {"seen": 5})

        def bad() -> None:
            pbContext().reply["bad"] = object()

        self.rootObject.remote_bad = bad  # type: ignore[attr-defined]
        failure = self.call("bad", target=self.root.withOptions(reply={}))
        self.assertIn("reply['bad'] is of type object", failure.getErrorMessage())


class TurnClock(Clock):
    """
    A clock that runs, on each advance, only the calls due when it started, as a reactor's
    turn does: a call scheduled meanwhile for now waits for the next turn.
    """

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        due = [call for call in self.calls if call.getTime() <= self.rightNow]
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class KeepaliveTests(SynchronousTestCase):
    def connect(self, serverFactory: Any) -> Any:
        self.clock = Clock()
        server, client, pump = connectedServerAndClient(
            serverFactory,
            pb.PBClientFactory(clock=self.clock, keepalive=pb.Keepalive(interval=10, timeout=30)),
            clock=self.clock,
        )
        return server, client, pump

    def test_livePeerKept(self) -> None:
        """A quiet but live peer answers pings and the connection stays."""
        for serverFactory in (
            pb.PBServerFactory(NativeRoot()),
            twistedPb.PBServerFactory(twistedPb.Root()),
        ):
            _server, client, pump = self.connect(serverFactory)
            for _ in range(20):
                self.clock.advance(5)
                pump.flush()
            self.assertFalse(client.disconnected)
            self.assertGreater(client._keepaliveTimer.pings, 5)

    def test_silentPeerDropped(self) -> None:
        """A peer that stops answering is dropped within the timeout; calls fail."""
        _server, client, pump = self.connect(pb.PBServerFactory(NativeRoot()))
        d = client.remoteForName("root").callRemote("wait")
        pump.flush()
        start = self.clock.seconds()
        # From now on nothing reaches the client: the server is silent.
        pump.serverIO.getOutBuffer = lambda: b""  # type: ignore[method-assign]
        with capturedLogs():
            for _ in range(40):
                self.clock.advance(1)
                pump.flush()
                if client.disconnected:
                    break
        self.assertTrue(client.disconnected)
        self.assertLessEqual(self.clock.seconds() - start, 30)
        failure = self.failureResultOf(d, PBConnectionLost)
        self.assertIn("keepalive", str(failure.value))

    def test_peerHeardWhileItsMessagesWait(self) -> None:
        """A peer whose messages wait unhandled, as the connection takes none of this side's
        data, is heard all the same: it is not dropped as silent."""
        clock = Clock()
        server = pb.PBServerFactory(
            NativeRoot(), clock=clock, keepalive=pb.Keepalive(interval=1, timeout=3)
        ).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        serverTransport = StringTransport()
        server.makeConnection(serverTransport)
        client = pb.PBClientFactory(clock=clock).buildProtocol(IPv4Address("TCP", "127.0.0.1", 2))
        clientTransport = StringTransport()
        client.makeConnection(clientTransport)
        for _ in range(3):
            for transport, broker in ((clientTransport, server), (serverTransport, client)):
                data = transport.value()
                transport.clear()
                broker.dataReceived(data)
        self.assertTrue(server.isNative)
        server.transport.pauseProducing()
        with capturedLogs() as events:
            for count in range(10):
                client.sendCall(b"ping", count)
                server.dataReceived(clientTransport.value())
                clientTransport.clear()
                clock.advance(1)
        self.assertIsNotNone(server._backlog)  # the pings wait, unanswered
        self.assertFalse(serverTransport.disconnecting)
        self.assertEqual(events, [])
        server.connectionLost(Failure(ConnectionDone()))

    def test_silentFromTheStart(self) -> None:
        """A peer that connects and then says nothing, not even its choice of dialect, is
        dropped within the timeout too."""
        clock = Clock()
        server, _client, _pump = connectedServerAndClient(
            pb.PBServerFactory(
                NativeRoot(), clock=clock, keepalive=pb.Keepalive(interval=1, timeout=3)
            ),
            pb.PBClientFactory(clock=clock),
            greet=False,
            clock=clock,
        )
        with capturedLogs() as events:
            for _ in range(5):
                clock.advance(0.5)
            self.assertFalse(server.transport.disconnecting)
            clock.advance(0.5)
        self.assertTrue(server.transport.disconnecting)
        self.assertTrue(any("silent peer" in str(e.get("log_format")) for e in events))

    def timer(self, interval: float, timeout: float) -> tuple[Any, Any, list[float], list[str]]:
        clock = TurnClock()
        pinged: list[float] = []
        dead: list[str] = []
        timer = KeepaliveTimer(
            clock,
            pb.Keepalive(interval=interval, timeout=timeout),
            lambda: pinged.append(clock.seconds()),
            dead.append,
        )
        return clock, timer, pinged, dead

    @staticmethod
    def turn(clock: Any, seconds: float) -> None:
        """Wait ``seconds``, then the reactor's next turn at once (as a reactor runs them)."""
        clock.advance(seconds)
        clock.advance(0)

    def test_onTime(self) -> None:
        """On time, a silent peer is pinged every interval and dropped ``timeout`` after it
        was last heard."""
        clock, timer, pinged, dead = self.timer(1, 3)
        timer.start()
        for _ in range(2):
            self.turn(clock, 1)
        self.assertEqual((pinged, dead), ([1, 2], []))
        self.turn(clock, 1)
        self.assertEqual(len(dead), 1)
        self.assertIn("sent nothing for 3 seconds", dead[0])

    def test_readBeforeGivingUp(self) -> None:
        """The peer seeming dead gives the reactor one more turn to read what may wait
        unread, before it is taken as dead."""
        clock, timer, _pinged, dead = self.timer(1, 3)
        timer.start()
        for _ in range(2):
            self.turn(clock, 1)
        clock.advance(1)  # at the timeout: one more turn first
        self.assertEqual(dead, [])
        timer.heard()  # that turn reads what the peer sent
        clock.advance(0)
        self.assertEqual(dead, [])
        for _ in range(2):
            self.turn(clock, 1)  # then the peer is silent: dead 3 s on
        self.assertEqual(dead, [])
        self.turn(clock, 1)
        self.assertEqual(len(dead), 1)
        self.assertIn("sent nothing for 3 seconds", dead[0])

    def test_busyPastTheTimeoutPingsFirst(self) -> None:
        """A process blocked past the timeout on a quiet connection, with no ping sent, pings
        now and gives the peer its usual time to answer, instead of dropping it unasked."""
        clock, timer, pinged, dead = self.timer(1, 3)
        timer.start()
        self.turn(clock, 5)  # blocked: the tick due at 1 runs at 5
        self.assertEqual((pinged, dead), ([5], []))
        self.turn(clock, 1)
        clock.advance(0.5)
        timer.heard()  # the answer
        self.turn(clock, 0.5)
        self.assertEqual(dead, [])
        for _ in range(2):
            self.turn(clock, 1)
        self.assertEqual(dead, [])
        self.turn(clock, 1)
        self.assertEqual(len(dead), 1)  # silent again: pinged, and dropped in time

    def test_blockedAfterAPing(self) -> None:
        """A ping's time to be answered counts from when it leaves: a process blocked in the
        turn that wrote it gives the peer its whole time after the block."""
        clock, timer, _pinged, dead = self.timer(1, 2)
        timer.start()
        clock.advance(1)  # the ping is written...
        clock.advance(1.3)  # ...and the process is blocked before it leaves
        clock.advance(0)
        self.assertEqual(dead, [])
        self.turn(clock, 0.9)
        self.assertEqual(dead, [])
        timer.heard()  # the answer, within the second the ping had
        for _ in range(10):
            self.turn(clock, 0.5)
            if dead:
                break
        self.assertEqual(len(dead), 1)  # silent from then on: dropped

    def test_aPeerDrainingABacklogIsAlive(self) -> None:
        """A peer that takes what waits for it (a large answer it reads slowly) is alive,
        though its answer to a ping waits behind it; one that takes nothing is dropped, and
        bytes sent while nothing waited (the kernel takes them, read or not) prove nothing."""
        for draining, dropped in ((True, False), (False, True)):
            clock = TurnClock()
            dead: list[str] = []
            state = {"taken": 0, "waiting": 10_000_000}
            timer = KeepaliveTimer(
                clock,
                pb.Keepalive(interval=1, timeout=3),
                lambda: None,
                dead.append,
                partial(lambda state: (state["taken"], state["waiting"]), state),
            )
            timer.start()
            for _ in range(20):
                if draining:
                    state["taken"] += 100_000
                    state["waiting"] -= 100_000
                self.turn(clock, 1)
            self.assertEqual(bool(dead), dropped, draining)
        clock = TurnClock()
        dead = []
        sent = {"taken": 0}
        timer = KeepaliveTimer(
            clock,
            pb.Keepalive(interval=1, timeout=3),
            lambda: sent.update(taken=sent["taken"] + 50),  # the kernel takes each ping
            dead.append,
            lambda: (sent["taken"], 0),
        )
        timer.start()
        for _ in range(5):
            self.turn(clock, 1)
        self.assertEqual(len(dead), 1)

    def test_stoppedByItsPing(self) -> None:
        """A ping that finds the connection gone (and stops the timer) leaves no timer."""
        clock = TurnClock()
        timer = KeepaliveTimer(
            clock, pb.Keepalive(interval=1, timeout=3), lambda: timer.stop(), lambda _: None
        )
        timer.start()
        self.turn(clock, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noTickDueAgainAtOnce(self) -> None:
        """Rounding never leaves a tick that is due and does nothing, to be scheduled again
        for the same moment (which spun for ever)."""
        for start in (10.7, 0.3, 1e6 + 0.1, 7.123456789):
            clock, timer, _pinged, _dead = self.timer(0.1, 0.3)
            clock.rightNow = start
            timer.start()
            for _ in range(30):
                self.turn(clock, 0.1)
                timer.heard()
                call = timer._call
                self.assertGreater(call.getTime(), clock.seconds(), start)

    def test_validation(self) -> None:
        """A timeout no longer than the interval (the peer would have no time to answer a
        ping), a value that is not positive, or not a number, is refused; so is a factory's
        keepalive that is not a Keepalive."""
        self.assertRaises(ValueError, pb.Keepalive, interval=10, timeout=5)
        self.assertRaises(ValueError, pb.Keepalive, interval=10, timeout=10)
        self.assertRaises(ValueError, pb.Keepalive, interval=0)
        # An interval that would ping on every reactor turn.
        with self.assertRaises(ValueError) as caught:
            pb.Keepalive(interval=1e-300, timeout=1)
        self.assertIn("at least 0.001 seconds, not 1e-300", str(caught.exception))
        self.assertEqual(pb.Keepalive(interval=0.001, timeout=1).interval, 0.001)
        self.assertRaises(TypeError, pb.Keepalive, interval="10")
        self.assertRaises(TypeError, pb.Keepalive, timeout=True)
        for factory in (pb.PBClientFactory, lambda **kw: pb.PBServerFactory(pb.Root(), **kw)):
            with self.assertRaises(TypeError) as caught:
                factory(keepalive=30)
            self.assertIn("keepalive must be a Keepalive", str(caught.exception))


class HostileNativePeerTests(NativeTestCase):
    """
    A peer that breaks the native dialect's rules is dropped, with one log line; one that
    merely races (a cancel for a call already answered) is not.
    """

    def assertDropped(self, *message: Any) -> None:
        with capturedLogs() as events:
            self.client.sendCall(*message)
            self.pump.flush()
        self.assertTrue(self.server.disconnected, message)
        self.assertTrue(any("Dropping" in str(e.get("log_format")) for e in events), events)

    def test_commandAsText(self) -> None:
        """A command sent as msgpack text, not bin, is not understood, and the peer is told
        so with the command as it sent it (it was lost without a word); the connection
        stays. A command that is not a string at all drops the peer."""
        with capturedLogs() as events:
            self.client.sendCall("frobnicate", 1)
            self.pump.flush()
        self.assertFalse(self.server.disconnected)
        self.assertIn(
            ("The peer did not understand {command}", "'frobnicate'"),
            [(e.get("log_format"), e.get("command")) for e in events],
        )
        self.assertDropped(7, 1)

    def test_longCommandAsText(self) -> None:
        """A text command longer than any command is not echoed back (it could be over
        the peer's limit): the peer is dropped, as for such a bin command."""
        self.assertDropped("x" * 300, 1)

    def test_badCredit(self) -> None:
        """Credit must be a positive count for a stream."""
        self.assertDropped(b"credit", 1, -5)

    def test_itemForUnknownStream(self) -> None:
        """An item for a stream never opened."""
        self.assertDropped(b"item", 99, b"\x01")

    def test_endForUnknownStream(self) -> None:
        """The end of a stream never opened."""
        self.assertDropped(b"end", 99)

    def test_unhashableIDs(self) -> None:
        """Ids that are lists, not integers, drop the peer cleanly (no TypeError escapes)."""
        self.assertDropped(b"end", [1])

    def test_unhashableAnswerID(self) -> None:
        """The same for an answer."""
        self.assertDropped(b"answer", [1], b"\x01")

    def test_malformedHello(self) -> None:
        """A hello that is not a dict."""
        self.assertDropped(b"hello", [1, 2])

    def test_helloWithAMessageSizeOfAnotherType(self) -> None:
        """A hello whose messageSize is not an integer (nor nil) leaves the limit this side
        knew; the connection stays."""
        self.client.sendCall(b"hello", {"messageSize": 4096})
        self.pump.flush()
        self.assertEqual(self.server.peerMessageSize, 4096)
        self.client.sendCall(b"hello", {"messageSize": "8192"})
        self.pump.flush()
        self.assertEqual(self.server.peerMessageSize, 4096)
        self.assertFalse(self.server.disconnected)

    def test_malformedContext(self) -> None:
        """A call whose context is not a dict of annotations."""
        self.assertDropped(b"callctx", 1, b"root", b"echo", 1, b"\x91\x01", b"\x80", "x")

    def test_intactMessageBeforeGarbage(self) -> None:
        """A call that arrives whole in the same small read as garbage after it still runs;
        then the peer is dropped."""
        call = [b"message", 1, b"root", b"wait", 1, b"\x90", b"\x80"]
        data = _native.records(call)[0] + b"\x00\x00\x00\x01\xc1"
        self.assertLess(len(data), 4096)
        with capturedLogs() as events:
            self.client.transport.write(data)
            self.pump.flush()
        self.assertIsNotNone(self.rootObject.pending)
        self.assertTrue(self.server.disconnected)
        self.assertTrue(any("Dropping" in str(e.get("log_format")) for e in events), events)

    def test_malformedArguments(self) -> None:
        """Arguments that are not an array, or keywords that are not a map of names (even an
        empty array), are refused with InvalidJelly (the peer's mistake, logged in one line),
        which the caller gets as the error."""
        received = self.rootObject.remoteMessageReceived
        self.assertEqual(received(self.server, "echo", b"\x91\x07", b"\x80"), b"\x07")
        for args, kw, text in [
            (b"\x91\x07", b"\x90", "keyword arguments must arrive as a dictionary"),
            (
                b"\x91\x07",
                msgpack.packb(msgpack.ExtType(_native.JELLY, jelly.dumps({1: 2}))),
                "keyword names must be text",
            ),
            (b"\x07", b"\x80", "positional arguments must arrive as a tuple"),
            (
                b"\x91\x07",
                msgpack.packb(msgpack.ExtType(_native.JELLY, jelly.dumps({b"\xff": 2}))),
                "a keyword name must be UTF-8, not b'\\xff'",
            ),
        ]:
            with self.assertRaises(InvalidJelly) as caught:
                received(self.server, "echo", args, kw)
            self.assertIn(text, str(caught.exception))
        # A map's keys are text or bytes only (a pbroker sender jellies other dicts).
        with self.assertRaises(InvalidJelly) as refused:
            received(self.server, "echo", b"\x91\x07", b"\x81\x01\x02")
        self.assertIn(
            "a malformed pbroker2 value: a map key of type int (keys must be text or bytes)",
            str(refused.exception),
        )

    def echoPacked(self, args: list[Any]) -> Failure:
        """
        Call ``echo`` with ``args`` packed as they are (extensions made by hand), and return
        the failure the call gets.
        """
        requestID = self.client.newRequestID()
        answer = self.client.waitingForAnswers[requestID] = Deferred()
        with capturedLogs():
            self.client.sendCall(
                b"message", requestID, b"root", b"echo", 1, msgpack.packb(args), b"\x80"
            )
            self.pump.flush()
        return self.failureResultOf(answer)

    def test_refusedValues(self) -> None:
        """A call whose arguments hold a malformed extension (a stream named twice, a tuple
        without an array, a stream id that is not an integer from 1 to 2**61 - 2, an unknown
        type) fails with an
        InvalidJelly that says which; the streams it named are stopped, the peer kept."""
        stream = partial(msgpack.ExtType, _native.STREAM)
        cases = [
            (
                [stream(msgpack.packb(5)), stream(msgpack.packb(5))],
                "the peer sent stream 5 twice",
                {5},
            ),
            ([msgpack.ExtType(_native.TUPLE, msgpack.packb(5))], "must hold an array: 5", set()),
            (
                [stream(msgpack.packb("x"))],
                f"a stream id must be an integer from 1 to {ID_LIMIT - 1}: 'x'",
                set(),
            ),
            # Ids that would share a hash with others: -1 and -2, 1 and 2**61.
            ([stream(msgpack.packb(-1))], "must be an integer from 1 to", set()),
            ([stream(msgpack.packb(2**61))], "must be an integer from 1 to", set()),
            ([stream(msgpack.packb(ID_LIMIT))], "must be an integer from 1 to", set()),
            (
                [stream(msgpack.packb(7)), msgpack.ExtType(9, b"")],
                "an unknown pbroker2 extension type: 9",
                {7},
            ),
        ]
        for args, text, stopped in cases:
            self.server._streams.cancelled.clear()
            failure = self.echoPacked([args])
            self.assertEqual(failure.type, b"pbroker.errors.InvalidJelly")
            self.assertIn(text, failure.getErrorMessage())
            self.assertFalse(self.server.disconnected)
            self.assertEqual(dict(self.server._streams.incoming), {})
            self.assertEqual(self.server._streams.cancelled, stopped)
        self.assertEqual(self.call("echo", 3), 3)

    def test_collidingSetElementsRefused(self) -> None:
        """A set extension of many distinct tuples of one hash (-1 and -2 hash alike) is
        refused before it is built, as is the same number as keys of a dict sent as jelly;
        the connection stays."""
        count = 4096  # (the old code builds them, in a quarter of a second)
        keys = [[-1 - ((index >> bit) & 1) for bit in range(12)] for index in range(count)]
        tuples = [msgpack.ExtType(_native.TUPLE, msgpack.packb(key)) for key in keys]
        for kind in (_native.SET, _native.FROZENSET):
            failure = self.echoPacked([msgpack.ExtType(kind, msgpack.packb(tuples))])
            self.assertEqual(failure.type, b"pbroker.errors.InvalidJelly")
            self.assertIn("keys with the same hash that take more than", str(failure.value))
        jellied = msgpack.ExtType(_native.JELLY, jelly.dumps({tuple(key): 1 for key in keys}))
        keyed = msgpack.ExtType(
            _native.KEYED, msgpack.packb({key: 1 for key in tuples}, strict_types=True)
        )
        for value in (jellied, keyed):
            failure = self.echoPacked([value])
            self.assertIn("keys with the same hash that take more than", str(failure.value))
        self.assertFalse(self.server.disconnected)
        natural = set(itertools.product((-1, -2, 0), repeat=5))  # up to 32 of one hash
        self.assertEqual(self.call("echo", natural), natural)

    def test_flatFrozensetsOfOneHash(self) -> None:
        """Frozensets of atoms of distinct hashes that collide as ordinary data does (edges
        of a path graph: frozenset({1421, 1422}) and frozenset({2621, 2622}) hash alike) are
        taken as map keys and set elements."""
        edges = {frozenset({i, i + 1}): i for i in range(3000)}
        self.assertEqual(self.call("echo", edges), edges)
        self.assertEqual(self.call("echo", set(edges)), set(edges))
        tagged = {(frozenset({"a"}), -1): 1, (frozenset({"a"}), -2): 2}
        self.assertEqual(self.call("echo", tagged), tagged)

    def test_keyedValues(self) -> None:
        """A KEYED extension holds a whole value whose maps' keys may be of any kind (each
        map's keys are checked before it is built), not another KEYED one; stream ids and
        nesting are found inside it."""

        def keyed(value: Any) -> msgpack.ExtType:
            return msgpack.ExtType(_native.KEYED, msgpack.packb(value, strict_types=True))

        tupleKey = msgpack.ExtType(_native.TUPLE, msgpack.packb([1, 2]))
        self.assertEqual(
            self.call("echo", {(1, 2): {3: [4.5]}, None: 0}), {(1, 2): {3: [4.5]}, None: 0}
        )
        failure = self.echoPacked([keyed({tupleKey: keyed({1: 2})})])
        self.assertIn("a pbroker2 KEYED extension inside another", str(failure.value))
        # Maps with other keys outside a KEYED one are malformed, in a tuple inside it taken.
        inner = msgpack.ExtType(_native.TUPLE, msgpack.packb([{5: 6}]))
        self.assertIn("a map key of type int", str(self.echoPacked([[inner]]).value))
        received = self.rootObject.remoteMessageReceived
        self.assertEqual(
            received(self.server, "echo", msgpack.packb([keyed([inner])]), b"\x80"),
            msgpack.packb(keyed([msgpack.ExtType(_native.TUPLE, msgpack.packb([{5: 6}]))])),
        )
        stream = msgpack.ExtType(_native.STREAM, msgpack.packb(5))
        self.assertEqual(_native.extensionsIn(msgpack.packb(keyed({1: [stream]}))), ([], [5]))
        # (Looked for without building maps, whatever their keys.)
        self.assertEqual(_native.extensionsIn(msgpack.packb({2.5: [stream], 1: 0})), ([], [5]))
        self.assertTrue(_native.deeperThan(msgpack.packb(keyed({1: [[2]]})), 2))
        self.assertFalse(_native.deeperThan(msgpack.packb(keyed({1: [[2]]})), 3))
        self.assertFalse(self.server.disconnected)

    def test_sharedTuplesHashed(self) -> None:
        """Tuples that share their parts (jelly keeps them shared) as a dict key or set
        element: hashing walks each appearance, so past a bound the value is refused before
        anything is hashed, whichever JELLY extension of the value brings them; sharing
        within the bound is taken."""

        def shared(depth: int) -> tuple[Any, ...]:
            value: tuple[Any, ...] = (1,)
            for _ in range(depth):
                value = (value, value)
            return value

        def jellied(value: Any) -> msgpack.ExtType:
            return msgpack.ExtType(_native.JELLY, jelly.dumps(value))

        def setOf(*items: Any) -> msgpack.ExtType:
            return msgpack.ExtType(_native.SET, msgpack.packb(list(items)))

        # (Jelly made by hand: a set of such a tuple, made here, would be hashed here.)
        refused = [
            setOf(jellied(shared(24))),
            # each within the bound, more than it together: the bound is the message's (sets
            # made by the extensions' own unjelly: two tuples that stand for more than their
            # bytes, as map keys, are refused sooner, see test_sharedTuplesCompared)
            [
                msgpack.ExtType(
                    _native.JELLY, banana.encode([b"set", jelly.jelly(shared(21))], b"none")
                )
                for _ in range(3)
            ],
            msgpack.ExtType(
                _native.JELLY, banana.encode([b"set", jelly.jelly(shared(24))], b"none")
            ),  # hashed by the unjelly of the extension itself
        ]
        for value in refused:
            failure = self.echoPacked([value])
            self.assertEqual(failure.type, b"pbroker.errors.InvalidJelly")
            self.assertIn("stand for more than 16,000,000 items when hashed", str(failure.value))
            self.assertFalse(self.server.disconnected)
        # Never hashed as a map key: a map's keys are text or bytes only.
        failure = self.echoPacked([{jellied(shared(24)): 1}])
        self.assertIn("a map key of type tuple", str(failure.value))
        part = shared(10)
        taken = {(part, 1): 1, (part, 2): 2, (1, part): {part}}
        self.assertEqual(self.call("echo", taken), taken)

    def test_sharedTuplesCompared(self) -> None:
        """Frozensets that share their parts, given by two JELLY extensions, are compared in
        a SET extension (``==`` walks each appearance through frozensets, which remember
        their hash): two of one hash are refused, and a map's keys are text or bytes only.
        One is taken, as a key of a dict sent as jelly."""

        def nested(depth: int) -> frozenset[Any]:
            # (hashed in linear time: a frozenset remembers its hash; compared in 2**depth)
            value: frozenset[Any] = frozenset([0])
            for _ in range(depth):
                value = frozenset([(value, 0), (value, 1)])
            return value

        def jellied(value: Any) -> bytes:
            return msgpack.packb(msgpack.ExtType(_native.JELLY, jelly.dumps(value)))

        def setOf(*packed: bytes) -> bytes:
            data = msgpack.packb([0] * len(packed))[: -len(packed)] + b"".join(packed)
            return msgpack.packb(msgpack.ExtType(_native.SET, data))

        # (Packed by hand: the two extensions are equal bytes, a dict here would keep one.)
        heavy = jellied(nested(20))  # (the old code gets through it, slowly)
        for args, text in (
            (b"\x91\x82" + heavy + b"\x01" + heavy + b"\x02", "a map key of type frozenset"),
            (b"\x91" + setOf(heavy, heavy), "of one hash of which two hold frozensets"),
        ):
            requestID = self.client.newRequestID()
            answer = self.client.waitingForAnswers[requestID] = Deferred()
            with capturedLogs():
                self.client.sendCall(b"message", requestID, b"root", b"echo", 1, args, b"\x80")
                self.pump.flush()
            failure = self.failureResultOf(answer)
            self.assertEqual(failure.type, b"pbroker.errors.InvalidJelly")
            self.assertIn(text, str(failure.value))
            self.assertFalse(self.server.disconnected)
        taken = {nested(10): 1, (1, 2): nested(3)}  # (assertEqual compares them)
        self.assertEqual(self.call("echo", taken), taken)

    def test_streamsOpenedOutOfOrder(self) -> None:
        """Streams a peer names out of order (as it may when a value naming one waits behind
        a large message) are each read; the highest id seen stays the highest."""
        kept: list[RemoteStream] = []
        self.rootObject.remote_keep = kept.append  # type: ignore[attr-defined]
        table = self.server._streams
        for streamID in (5, 3):
            self.client.sendCall(
                b"message",
                self.client.newRequestID(),
                b"root",
                b"keep",
                0,
                msgpack.packb([msgpack.ExtType(_native.STREAM, msgpack.packb(streamID))]),
                b"\x80",
            )
            self.pump.flush()
            self.assertEqual(table._highestIncoming, 5)
        self.assertEqual([reader.streamID for reader in kept], [5, 3])
        for streamID in (3, 5):
            self.client.sendCall(b"item", streamID, msgpack.packb(streamID * 10))
            self.client.sendCall(b"end", streamID)
        self.pump.flush()
        self.assertEqual([self.successResultOf(reader.collect()) for reader in kept], [[50], [30]])
        self.assertEqual(dict(table.incoming), {})
        self.assertFalse(self.server.disconnected)

    def test_itemBeyondCredit(self) -> None:
        """A sender that ignores the reader's credit is dropped."""
        stream = self.call("pushed")
        self.pump.flush()
        for _ in range(self.client.streamWindow):
            self.server.sendCall(b"item", stream.streamID, b"\x01")
        with capturedLogs():
            self.server.sendCall(b"item", stream.streamID, b"\x01")
            self.pump.flush()
        self.assertTrue(self.client.disconnected)

    def test_staleCancel(self) -> None:
        """A cancel for a call already answered (or never made) is ignored."""
        self.client.sendCall(b"cancel", 12345)
        self.pump.flush()
        self.assertFalse(self.server.disconnected)
        self.assertEqual(self.call("echo", 1), 1)

    def test_refusedItem(self) -> None:
        """A malformed item fails that stream only (InvalidJelly), and the sender is told."""
        stream = self.call("pushed")
        self.pump.flush()
        # A JELLY extension whose banana is one lone prefix byte.
        self.server.sendCall(b"item", stream.streamID, b"\xd4\x04\x00")
        pending = stream.next()
        self.pump.flush()
        self.assertFalse(self.client.disconnected)
        self.failureResultOf(pending, InvalidJelly)
        self.assertEqual(self.server._streams.outgoing, {})


class Chain(pb.Copyable):
    """
    A copy whose state, when taken, makes a call holding the next one in lists 1,000 deep.
    """

    def __init__(self, root: Any, n: int) -> None:
        self.root = root
        self.n = n

    @classmethod
    def nested(cls, root: Any, n: int) -> Any:
        value: Any = cls(root, n)
        for _ in range(1000):
            value = [value]
        return value

    def getStateToCopy(self) -> Any:
        if self.n:
            self.root.callRemote("take", Chain.nested(self.root, self.n - 1), pbanswer=False)
        return {"n": self.n}


class Cursor:
    """
    A value that is also its own iterator.
    """

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.position = 0

    def __iter__(self) -> Cursor:
        return self

    def __next__(self) -> Any:
        if self.position >= len(self.rows):
            raise StopIteration
        self.position += 1
        return self.rows[self.position - 1]


class Holder(pb.Copyable):
    """
    A copy holding ``content``.
    """

    def __init__(self, content: Any) -> None:
        self.content = content


class DeepExtensionTests(NativeTestCase):
    """
    Tuples and sets travel as msgpack extensions, each read by a nested call of msgpack's C
    decoder; two hundred levels used to crash the process. They nest at most
    EXTENSION_DEPTH deep on the wire: a deeper value travels as jelly, a deeper one
    received is refused.
    """

    def deepTuples(self, depth: int) -> bytes:
        """A call's arguments holding tuples nested ``depth`` deep, packed by hand."""
        inner = msgpack.packb([1])
        for _ in range(depth - 1):
            inner = msgpack.packb([msgpack.ExtType(_native.TUPLE, inner)])
        return bytes(msgpack.packb([msgpack.ExtType(_native.TUPLE, inner)]))

    def test_deepValuesRoundTrip(self) -> None:
        """Tuples (and sets) nested deeper than EXTENSION_DEPTH keep their shape, as jelly."""
        for depth in (_native.EXTENSION_DEPTH, _native.EXTENSION_DEPTH + 1, 500):
            value: Any = 1
            for _ in range(depth):
                value = (value, frozenset({depth}))
            self.assertEqual(self.call("echo", value), value)

    def test_deepExtensionsRefused(self) -> None:
        """A value whose extensions nest deeper than RECEIVED_EXTENSION_DEPTH, the sender's
        EXTENSION_DEPTH (each level is decoded from its own copy of what it holds), is refused
        (InvalidJelly, the call fails), and so is scanning it for what to release: the
        process does not crash."""
        depth = _native.RECEIVED_EXTENSION_DEPTH
        self.assertEqual(depth, _native.EXTENSION_DEPTH)
        self.assertEqual(self.server._codec.unpack(self.deepTuples(depth))[0], self.nested(depth))
        for deep in (depth + 1, 300, 3000):
            with self.assertRaises(InvalidJelly) as caught:
                self.server._codec.unpack(self.deepTuples(deep))
            self.assertIn(f"nested more than {depth} deep", str(caught.exception))
            self.assertEqual(_native.extensionsIn(self.deepTuples(deep)), ([], []))
        results: list[Any] = []
        message = [b"message", 1, b"root", b"echo", 1, self.deepTuples(300), _native.EMPTY_MAP]
        with capturedLogs():
            self.client.waitingForAnswers[1] = Deferred().addBoth(results.append)
            self.client.transport.write(_native.records(message)[0])
            self.pump.flush()
        self.assertIn("nested more than", str(results[0].value))
        self.assertFalse(self.server.disconnected)

    def nested(self, depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = (value,)
        return value

    def test_hooksPackingInsideHooks(self) -> None:
        """Each value a hook packs while another is packed counts as a level: a chain of
        copies whose state, when taken, makes a call with lists 1,000 deep holding the next
        one does not crash the process. The calls past EXTENSION_DEPTH travel as jelly,
        which the receiver refuses (lists 1,000 deep and a copy exceed its nesting limit)."""
        received: list[Any] = []
        self.rootObject.remote_take = received.append  # type: ignore[attr-defined]
        self.server.registry.setUnjellyableForClass(Chain, pb.RemoteCopy)
        with capturedLogs():
            self.root.callRemote("take", Chain.nested(self.root, 20), pbanswer=False)
            self.pump.flush()
        self.assertEqual(len(received), _native.EXTENSION_DEPTH + 1)
        self.assertEqual(self.server._codec._depth, 0)
        self.assertEqual(self.client._codec._depth, 0)

    def test_refusalsLeaveNoTrace(self) -> None:
        """Values refused, or sent as jelly, for nesting too deeply change nothing for the
        values after them: tuples and streams still travel as extensions."""
        deep = self.nested(_native.EXTENSION_DEPTH + 5)
        codec = self.server._codec
        for _ in range(2 * _native.EXTENSION_DEPTH):
            self.assertEqual(self.call("echo", deep), deep)
            with self.assertRaises(InvalidJelly):
                codec.unpack(self.deepTuples(_native.RECEIVED_EXTENSION_DEPTH + 1))
        self.assertEqual(self.call("echo", ((1, 2),)), ((1, 2),))
        self.assertEqual(
            codec.pack((1,)), msgpack.packb(msgpack.ExtType(_native.TUPLE, b"\x91\x01"))
        )
        stream, label = self.call("echo", (iter([1, 2]), "label"))
        self.assertEqual(label, "label")
        self.assertIsInstance(stream, RemoteStream)

    def test_deepListsInsideTuples(self) -> None:
        """Lists as deep as msgpack takes, inside tuples as deep as the wire takes, travel
        (and are answered) without crashing; with one tuple more the value travels as jelly
        (within the nesting limit, 1,000 levels in all)."""
        for tuples, lists in ((_native.EXTENSION_DEPTH, 1000), (_native.EXTENSION_DEPTH + 1, 100)):
            value: Any = 1
            for _ in range(tuples):
                for _ in range(lists):
                    value = [value]
                value = (value,)
            answer = self.call("echo", value)
            # Unwrapped level by level: comparing it whole would recurse too deeply.
            shape = []
            while type(answer) in (list, tuple) and len(answer) == 1:
                shape.append(type(answer))
                answer = answer[0]
            self.assertEqual((answer, shape), (1, ([tuple] + [list] * lists) * tuples))

    def test_allowedIteratorsCopied(self) -> None:
        """An iterator of a class the security options allow, inside a copy, is copied by
        its state, as in the pb dialect: only streams jelly has no form for are refused."""
        security = jelly.SecurityOptions()
        security.allowInstancesOf(Cursor)
        root = NativeRoot()
        received: list[Any] = []
        root.remote_take = received.append  # type: ignore[attr-defined]
        factory = pb.PBServerFactory(root, security=security)
        _server, client, pump = connectedServerAndClient(
            factory, pb.PBClientFactory(security=security)
        )
        _server.registry.setUnjellyableForClass(Holder, pb.RemoteCopy)
        self.assertTrue(client.isNative)
        client.remoteForName("root").callRemote("take", Holder(Cursor([1, 2])), pbanswer=False)
        pump.flush()
        (holder,) = received
        self.assertEqual(list(holder.content), [1, 2])

    def test_iteratorsWithoutStateRefusedUnderAllowAll(self) -> None:
        """Even when the security options allow every class, a generator, a C iterator or
        a Stream inside a copy is refused at the sender (JellyError): jelly would send a
        meaningless state."""
        factory = pb.PBClientFactory(security=jelly.DummySecurityOptions())
        _server, client, pump = connectedServerAndClient(pb.PBServerFactory(NativeRoot()), factory)
        root = client.remoteForName("root")
        for content in ((i for i in [1]), map(str, [1]), Stream()):
            results: list[Any] = []
            root.callRemote("echo", Holder(content)).addBoth(results.append)
            pump.flush()
            self.assertTrue(results[0].check(JellyError), content)

    def test_streamsWhereJellyCannotCarryThem(self) -> None:
        """A stream inside a copy, or in a value sent as jelly for nesting too deeply,
        fails the call with JellyError, rather than arriving as an Unpersistable."""
        deep: Any = iter([1])
        for _ in range(_native.EXTENSION_DEPTH + 1):
            deep = (deep,)
        for value in (deep, Holder(iter([1]))):
            failure = self.call("echo", value)
            self.assertIsInstance(failure, Failure)
            self.assertTrue(failure.check(JellyError))
            self.assertIn("stream (list_iterator)", str(failure.value))

    def test_scanFindsWithinTheDepth(self) -> None:
        """extensionsIn finds streams and jelly in tuples nested up to EXTENSION_DEPTH, and
        stops at its limit."""
        inner = msgpack.packb([msgpack.ExtType(_native.STREAM, msgpack.packb(7))])
        for _ in range(_native.EXTENSION_DEPTH):
            inner = msgpack.packb([msgpack.ExtType(_native.TUPLE, inner)])
        self.assertEqual(_native.extensionsIn(inner), ([], [7]))
        many = msgpack.packb([msgpack.ExtType(_native.STREAM, msgpack.packb(i)) for i in range(50)])
        self.assertEqual(len(_native.extensionsIn(many, 10)[1]), 10)


MiB = 1024 * 1024
MiB = 1024 * 1024


class LargeAnswersToANonReaderTests(SynchronousTestCase):
    """
    Large answers (sent in fragments) that wait for a peer that does not read count
    against ``bufferedBytes``, with room for one message as large as the peer accepts.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(
                NativeRoot(), clock=self.clock, limits=pb.BrokerLimits(bufferedBytes=1024 * 1024)
            ),
            pb.PBClientFactory(clock=self.clock, limits=pb.BrokerLimits(messageSize=MiB * 4)),
            clock=self.clock,
            bufferSize=64 * 1024,
        )
        self.root = self.client.remoteForName("root")

    def callWithoutReading(self, size: int) -> list[Any]:
        answers: list[Any] = []
        self.root.callRemote("big", size).addBoth(answers.append)
        # Only the client's bytes move: the client does not read the server's.
        self.pump.serverIO.bufferReceived(self.pump.clientIO.getOutBuffer())
        self.clock.advance(0)
        return answers

    def later(self, count: int) -> list[Deferred[Any]]:
        """
        ``count`` calls to a method whose answers come later, handled: their Deferreds.
        """
        later: list[Deferred[Any]] = []
        self.server.factory.root.remote_later = lambda: later.append(Deferred()) or later[-1]
        results = [self.root.callRemote("later") for _ in range(count)]
        self.pump.flush()
        self.assertEqual(len(later), count)
        self.results = results
        return later

    def test_dropped(self) -> None:
        """Answers that come while the peer does not read, queued behind the first, count
        until they pass bufferedBytes plus the client's message limit (1 + 4 MiB here);
        if the peer still takes nothing stallTimeout seconds later, it is dropped, with a
        log line."""
        later = self.later(5)
        timeout = pb.BrokerLimits().stallTimeout
        assert timeout is not None
        with capturedLogs() as events:
            for deferred in later[:4]:  # the first is sent; 3 x 1.5 MiB = 4.5 MiB wait
                deferred.callback(b"x" * (MiB * 3 // 2))
            later[4].callback(b"x" * (MiB * 3 // 2))
            self.clock.advance(timeout - 1)
            self.assertFalse(self.server.transport.disconnecting)
            self.clock.advance(1)
        self.assertTrue(self.server.transport.disconnecting)
        self.assertTrue(any("stopped reading" in str(e.get("log_format")) for e in events))

    def test_answersThatComeAtOnceReachAReader(self) -> None:
        """Ten 1.5 MiB answers that all come at once (from Deferreds: 15 MiB, over
        bufferedBytes plus the client's limit) reach a reader that reads."""
        later = self.later(10)
        for deferred in later:
            deferred.callback(b"x" * (MiB * 3 // 2))
        results: list[Any] = []
        for result in self.results:
            result.addBoth(results.append)
        for _ in range(10_000):
            if len(results) == 10:
                break
            self.pump.pump()
            self.clock.advance(1)
        self.assertEqual([len(result) for result in results], [MiB * 3 // 2] * 10)
        self.assertFalse(self.server.disconnected)

    def test_manyLargeAnswersAskedAtOnce(self) -> None:
        """Ten 3 MiB answers asked for at once (30 MiB, far over bufferedBytes) all reach a
        reader that reads: the calls after the first wait, unhandled, while the connection
        is full or an answer waits behind the one being sent."""
        results: list[Any] = []
        for _ in range(10):
            self.root.callRemote("big", 3 * MiB).addBoth(results.append)
        mostQueued = 0
        for _ in range(10_000):
            if len(results) == 10:
                break
            self.pump.pump()
            self.clock.advance(0)
            mostQueued = max(mostQueued, len(self.server._largeOut))
        self.assertEqual([len(result) for result in results], [3 * MiB] * 10)
        self.assertFalse(self.server.disconnected)
        self.assertEqual(mostQueued, 2)

    def test_readerThatReadsKept(self) -> None:
        """With the default limits, a reader that reads gets two large answers asked for at
        once, the second (20 MB) larger than bufferedBytes but within messageSize."""
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(), bufferSize=64 * 1024
        )
        results: list[Any] = []
        for size in (1_000_000, 20_000_000):
            client.remoteForName("root").callRemote("big", size).addBoth(results.append)
        for _ in range(1000):
            if len(results) == 2:
                break
            pump.pump()
        self.assertEqual([len(r) for r in results], [1_000_000, 20_000_000])
        self.assertFalse(server.disconnected)

    def test_oneAtATimeNotCounted(self) -> None:
        """A large answer alone in the queue is not counted, however large: a reader that
        takes its time gets it."""
        answers = self.callWithoutReading(3 * 1024 * 1024)
        self.assertFalse(self.server.transport.disconnecting)
        self.pump.flush()
        self.assertEqual([len(answer) for answer in answers], [3 * 1024 * 1024])

    def test_bytesForThePeerCounted(self) -> None:
        """The bytes left of the large answers queued (not of this side's own calls) are
        kept as a running count, the one _queueFull reads, which matches the queue at each
        step and is 0 once all is sent."""
        later = self.later(4)
        server = self.server
        for deferred in later:
            deferred.callback(b"x" * (MiB * 3 // 2))
            # The server's own large calls, between the answers: not counted.
            server.remoteForName("root").callRemote("echo", b"y" * MiB).addErrback(lambda _: None)
            self.assertEqual(server._largeOutForPeer, self.forPeer(server))
        self.assertGreater(server._largeOutForPeer, 0)
        results: list[Any] = []
        for result in self.results:
            result.addBoth(results.append)
        for _ in range(10_000):
            if len(results) == 4 and not server._largeOut:
                break
            self.pump.pump()
            self.clock.advance(0)
            self.assertEqual(server._largeOutForPeer, self.forPeer(server))
        self.assertEqual([len(result) for result in results], [MiB * 3 // 2] * 4)
        self.assertEqual(server._largeOutForPeer, 0)

    @staticmethod
    def forPeer(broker: Any) -> int:
        return sum(entry[1] for entry in broker._largeOut if entry[2] is None)

    def test_ownCallsDoNotHoldBackThePeer(self) -> None:
        """Large calls this side queued itself do not count as answers waiting: while its
        connection takes data, it goes on handling the peer's messages (its answers)."""
        limits = pb.BrokerLimits(bufferedBytes=MiB)
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), clock=self.clock, limits=limits),
            pb.PBClientFactory(clock=self.clock, limits=limits),
            clock=self.clock,
            bufferSize=64 * 1024,
        )
        results: list[Any] = []
        root = client.remoteForName("root")
        for _ in range(10):
            root.callRemote("echo", b"y" * (MiB * 3 // 2)).addBoth(results.append)
        self.assertFalse(client._queueFull())
        heldBack = 0
        for _ in range(10_000):
            if len(results) == 10:
                break
            pump.pump()
            self.clock.advance(0)
            if client._backlog is not None and not client.transport.paused:
                heldBack += 1
        self.assertEqual([len(result) for result in results], [MiB * 3 // 2] * 10)
        self.assertEqual(heldBack, 0)
        self.assertFalse(server.disconnected)


class TakenLargeCallPeers(SynchronousTestCase):
    """
    Two native peers with a 1 MiB ``bufferedBytes``: room for one large call not yet taken.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB)
        self.rootObject = NativeRoot()
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock, limits=self.limits),
            pb.PBClientFactory(clock=self.clock, limits=self.limits),
            clock=self.clock,
            bufferSize=64 * 1024,
        )
        self.root = self.client.remoteForName("root")


class TakenLargeCallTests(TakenLargeCallPeers):
    """
    A pbroker peer says when it takes (starts handling) a large call; the large calls it has
    not taken add up to at most ``bufferedBytes`` (one is always sent), and the others wait.
    """

    def settle(self, done: Callable[[], bool]) -> None:
        for _ in range(100_000):
            if done():
                return
            self.pump.pump()
            self.clock.advance(0)
            self.assertLessEqual(self.client._untakenBytes, 2 * MiB)
        self.fail("not done")

    def test_aPeerThatTakesNothingIsDropped(self) -> None:
        """A peer that reads everything but never takes a large call would make this side
        keep every call made after it (calls keep their order): once more than
        bufferedBytes of them wait, and it takes none for stallTimeout seconds while the
        connection has nothing more to move, it is dropped, and the calls fail."""
        stopTaking(self.server)
        results: list[Any] = []
        for size in (MiB * 3 // 2, MiB * 3 // 2):  # the second waits for room
            self.root.callRemote("echo", b"L" * size).addBoth(results.append)
        for _ in range(40):
            self.root.callRemote("echo", b"s" * 40_000).addBoth(results.append)  # kept
        for _ in range(200):
            self.pump.pump()
            self.clock.advance(0)
        self.assertEqual(len(results), 1)  # the first was answered
        self.assertGreater(self.client._keptOwn, MiB)
        with capturedLogs() as logs:
            # The timer started as the calls were kept, before the first call was written:
            # the connection moved since, so it starts again.
            self.clock.advance(31)
            self.assertFalse(self.client.disconnected)
            self.clock.advance(29)
            self.assertFalse(self.client.disconnected)
            self.clock.advance(2)
            self.pump.flush()
        self.assertTrue(self.client.disconnected)
        self.assertIn("took none of this side's large calls", formatEvent(logs[-1]))
        self.assertEqual(len(results), 42)
        for failure in results[1:]:
            failure.trap(pb.PBConnectionLost)
        self.assertIn("took none", failure.getErrorMessage())

    def test_aSlowTakerIsNotDropped(self) -> None:
        """The same calls to a peer that takes the large ones, however late, all go: the
        timer starts again after each."""
        results: list[Any] = []
        for size in (MiB * 3 // 2, MiB * 3 // 2, MiB * 3 // 2):
            self.root.callRemote("echo", b"L" * size).addBoth(results.append)
        for _ in range(40):
            self.root.callRemote("echo", b"s" * 40_000).addBoth(results.append)
        for _ in range(100_000):
            if len(results) == 43:
                break
            self.pump.pump()
            self.clock.advance(20)  # a slow peer: each turn takes 20 seconds
        self.assertEqual(len(results), 43)
        self.assertFalse(self.client.disconnected)
        self.assertEqual(
            sorted(len(result) for result in results), [40_000] * 40 + [MiB * 3 // 2] * 3
        )

    def test_largeCallsKeepTheirOrderBehindKeptOnes(self) -> None:
        """Large calls that wait behind large messages keep their place among large calls
        that wait for room: a large call made after them does not start first."""
        arrived = keptLargeCalls(self, 900 * 1024, 900 * 1024)
        self.settle(lambda: len(arrived()) == 4)
        self.assertEqual(arrived(), [900 * 1024, ("copy", 900 * 1024), 900 * 1024, 900 * 1024])

    def test_droppedWaitingCallLetsTheNextOneStart(self) -> None:
        """A waiting call that is cancelled before any of it is written lets the call behind
        it start, if that one fits the room left, without waiting for the peer."""
        KiB = 1024
        first = self.root.callRemote("echo", b"a" * (300 * KiB))
        second = self.root.callRemote("echo", b"b" * (900 * KiB))  # over the room left
        third = self.root.callRemote("echo", b"c" * (300 * KiB))  # fits, waits behind it
        self.moveClientBytes()  # the first is sent; the others wait for room
        self.assertEqual(list(self.client._untaken), [1])
        self.assertEqual([entry[2] for entry in self.client._largeOut], [2, 3])
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.moveClientBytes()
        self.assertEqual(list(self.client._untaken), [1, 3])
        self.settle(lambda: first.called and third.called)
        self.assertEqual(len(self.successResultOf(third)), 300 * KiB)
        self.assertEqual(len(self.successResultOf(first)), 300 * KiB)

    def blockedFromNowOn(self) -> list[Any]:
        """
        The entries put in ``_afterBlocked`` from now on (see Broker._blockEntry), in turn.
        """
        blocked: list[Any] = []
        blockEntry = brokerModule.Broker._blockEntry

        def counting(broker: Any, entry: Any) -> None:
            blocked.append(entry)
            blockEntry(broker, entry)

        self.patch(brokerModule.Broker, "_blockEntry", counting)
        return blocked

    def test_cancelledKeptCallsLeaveTheOthersWaiting(self) -> None:
        """Calls kept behind a large call that waits for room, cancelled one at a time (as
        they time out, say), are each dropped without those still waiting being checked
        over again (which made cancelling n of them cost n squared); the others still wait
        for the large call, and go after it."""
        KiB = 1024
        started: list[Any] = []
        self.rootObject.remote_take = lambda tag, data=b"": started.append(tag)  # type: ignore
        self.root.callRemote("take", "first", b"a" * (900 * KiB))
        self.root.callRemote("take", "second", b"b" * (900 * KiB))  # waits for room
        self.moveClientBytes()
        kept = [self.root.callRemote("take", tag) for tag in range(100)]
        self.clock.advance(0)
        self.assertEqual(len(self.client._afterBlocked), 100)
        checked = self.blockedFromNowOn()
        for call in kept[:-1]:
            call.cancel()
            self.failureResultOf(call, CancelledError)
            self.clock.advance(0)
        self.assertEqual((len(self.client._afterBlocked), len(checked)), (1, 0))
        self.settle(lambda: len(started) == 3)
        self.assertEqual(started, ["first", "second", 99])
        self.assertEqual((self.client._keptOwn, self.client._keptForPeer), (0, 0))

    def test_callsThatWaitInTurnAreNotCheckedOverAgain(self, count: int = 300) -> None:
        """
        Large calls each followed by a small one, all in order, more than the peer's room
        holds: as each large call is written, only the messages up to the next large call
        go, and the others still waiting are neither checked over again nor walked (each
        made ``count`` such pairs cost ``count`` squared steps: entries blocked again, and
        the ``id`` calls the broker makes).
        """
        KiB = 1024
        started: list[Any] = []
        self.rootObject.remote_take = lambda tag, data=b"": started.append(tag)  # type: ignore
        checked = self.blockedFromNowOn()
        ids = [0]

        def countingID(obj: object) -> int:
            ids[0] += 1
            return id(obj)

        brokerModule.id = countingID  # type: ignore[attr-defined]
        self.addCleanup(delattr, brokerModule, "id")
        expected: list[Any] = []
        for index in range(count):
            self.root.callRemote("take", ("large", index), b"x" * (200 * KiB))
            self.root.callRemote("take", ("small", index))
            expected += [("large", index), ("small", index)]
        self.settle(lambda: len(started) == 2 * count)
        self.assertEqual(started, expected)
        self.assertLessEqual(len(checked), 3 * count)
        self.assertLessEqual(ids[0], 20 * count)
        self.assertEqual((self.client._keptOwn, self.client._keptForPeer), (0, 0))
        self.assertFalse(self.client._afterBlocked)

    def test_callsToOneObjectEachReleasedAreNotWalkedEachTime(self, count: int = 200) -> None:
        """
        Large calls to one of the peer's objects, each followed by a release of it, all
        waiting for room: as each starts or is written, the calls still waiting are not
        walked again, neither to find what they provide nor which may start (each made
        ``count`` such calls cost ``count`` squared steps, counted here by the items the
        broker's ``enumerate`` and ``_Waiting.add`` see).
        """
        KiB = 1024
        limits = pb.BrokerLimits(bufferedBytes=64 * KiB, messageSize=4 * MiB)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock, limits=limits),
            pb.PBClientFactory(clock=self.clock, limits=limits),
            clock=self.clock,
            bufferSize=64 * KiB,
        )  # (room for one call of 100 KiB at a time)
        self.root = self.client.remoteForName("root")
        sizer = Sizer()
        self.rootObject.remote_sizer = lambda: sizer  # type: ignore[attr-defined]
        references: list[Any] = []
        for _ in range(count + 1):
            self.root.callRemote("sizer").addCallback(references.append)
        self.pump.flush()
        target = references.pop()
        steps = [0]

        def countingEnumerate(items: Any) -> Any:
            for item in enumerate(items):
                steps[0] += 1
                yield item

        brokerModule.enumerate = countingEnumerate  # type: ignore[attr-defined]
        self.addCleanup(delattr, brokerModule, "enumerate")
        add = brokerModule._Waiting.add

        def countingAdd(waiting: Any, *args: Any) -> None:
            steps[0] += 1
            add(waiting, *args)

        self.patch(brokerModule._Waiting, "add", countingAdd)
        sizes: list[int] = []
        for _ in range(count):
            target.callRemote("size", b"x" * (100 * KiB)).addCallback(sizes.append)
            references.pop()  # released: its decref waits behind the call
        self.settle(lambda: len(sizes) == count)
        self.assertEqual(sizes, [100 * KiB] * count)
        self.assertLessEqual(steps[0], 20 * count)
        self.assertEqual((self.client._keptOwn, self.client._keptForPeer), (0, 0))
        self.assertFalse(self.client._afterBlocked or self.client._keptReleases)

    def test_cancelsOldestFirstDoNotWalkWhatWasLetGo(self, count: int = 300) -> None:
        """
        Large calls each followed by a small one, kept behind a call that waits for room,
        the large ones cancelled oldest first before the pump runs again: what each cancel
        lets go (the small call behind it, and the next large call) comes after all that
        was let go before it, and joins it without a merge of all of it (which cost
        ``count`` squared steps, counted here by the broker's ordering of entries).
        """
        KiB = 1024
        started: list[Any] = []
        self.rootObject.remote_take = lambda tag, data=b"": started.append(tag)  # type: ignore
        calls = []
        self.root.callRemote("take", "first", b"x" * (1024 * KiB))
        for index in range(count):
            calls.append(self.root.callRemote("take", ("large", index), b"x" * (200 * KiB)))
            self.root.callRemote("take", ("small", index))
        self.settle(lambda: len(self.client._afterBlocked) >= 2 * count - 3)
        orders = [0]
        keptOrder = brokerModule._keptOrder

        def counting(entry: Any) -> Any:
            orders[0] += 1
            return keptOrder(entry)

        self.patch(brokerModule, "_keptOrder", counting)
        for call in calls:
            call.addErrback(lambda failure: failure.trap(CancelledError))
            call.cancel()
        self.assertLessEqual(orders[0], 20 * count)
        expected = ["first", *(("small", index) for index in range(count))]
        self.settle(lambda: len(started) == count + 1)
        self.assertEqual(started, expected)
        self.assertEqual((self.client._keptOwn, self.client._keptForPeer), (0, 0))
        self.assertFalse(self.client._afterBlocked)

    def test_releasesBehindCallsLetGoAheadStayInPlace(self, count: int = 60) -> None:
        """
        Large calls to one of the peer's objects, each followed by a release of it (a
        reference to it dropped), all kept behind a call that waits for room: as each call
        is written, the next call goes ahead, and the release behind that call, which needs
        it, stays where it waits; it is not let go too, only to wait again out of its
        place (which cost a walk of all that waits, and a sort of what needs the object,
        for each call).
        """
        KiB = 1024
        got: list[Any] = []

        class Target(pb.Referenceable):
            def remote_take(self, tag: Any, data: bytes = b"") -> None:
                got.append(tag)

        target = Target()
        self.rootObject.remote_get = lambda: target  # type: ignore[attr-defined]
        refs: list[Any] = []
        for _ in range(count + 1):
            self.root.callRemote("get").addCallback(refs.append)
        self.pump.flush()
        self.assertEqual(len(refs), count + 1)
        remote = refs.pop()
        checked: list[Any] = []
        outOfOrder: list[Any] = []
        blockEntry = brokerModule.Broker._blockEntry

        def counting(broker: Any, entry: Any) -> None:
            checked.append(entry)
            blocked = broker._afterBlocked
            if blocked and brokerModule._keptOrder(blocked[-1]) > brokerModule._keptOrder(entry):
                outOfOrder.append(entry)
            blockEntry(broker, entry)

        self.patch(brokerModule.Broker, "_blockEntry", counting)
        remote.callRemote("take", "first", b"x" * (1024 * KiB))  # being written
        remote.callRemote("take", "small")  # kept: the calls after it are kept too
        expected: list[Any] = ["first", "small"]
        for index in range(count):
            remote.callRemote("take", index, b"x" * (200 * KiB))
            refs.pop()  # its decref is kept behind the call
            expected.append(index)
        self.settle(lambda: len(got) == count + 2)
        self.assertEqual(got, expected)
        self.assertEqual(outOfOrder, [])
        self.assertLessEqual(len(checked), 2 * count + 2)
        self.pump.flush()
        self.assertFalse(self.client._keptReleases)  # every decref was sent
        self.assertEqual((self.client._keptOwn, self.client._keptForPeer), (0, 0))
        self.assertFalse(self.client._afterBlocked)
        self.assertFalse(self.client._afterLarge)

    def moveClientBytes(self) -> None:
        """
        Deliver what the client writes, as it writes it, and nothing the server writes (so
        no "taken" reaches the client).
        """
        for _ in range(100):
            data = self.pump.clientIO.getOutBuffer()
            if data:
                self.pump.serverIO.bufferReceived(data)
            self.clock.advance(0)

    def test_peersPipeliningAtEachOther(self) -> None:
        """Two peers that each pipeline 15 MiB of large calls at the other (three times
        bufferedBytes plus messageSize) both get every answer: neither overflows and drops
        the other."""
        self.pipelineBothWays(self.limits, self.limits, 10)

    def pipelineBothWays(
        self, serverLimits: pb.BrokerLimits, clientLimits: pb.BrokerLimits, count: int
    ) -> None:
        """
        Have the server and the client each pipeline ``count`` calls of 1.5 MiB at the other,
        and check that all are answered and neither side drops the other.
        """

        # Both ends drain as TCP does: slowly, resuming their producer once empty, and taking
        # up to 4 MiB (the kernel's buffers) before pausing it.
        class Drain(SlowDrain):
            chunk = 256 * 1024

        serverAddress = IPv4Address("TCP", "127.0.0.1", 8789)
        clientAddress = IPv4Address("TCP", "127.0.0.1", 54321)
        self.server = pb.PBServerFactory(
            self.rootObject, clock=self.clock, limits=serverLimits
        ).buildProtocol(clientAddress)
        self.client = pb.PBClientFactory(clock=self.clock, limits=clientLimits).buildProtocol(
            serverAddress
        )
        self.pump = iosim.connect(
            self.server,
            Drain(self.server, True, serverAddress, clientAddress, bufferSize=4 * MiB),
            self.client,
            Drain(self.client, False, clientAddress, serverAddress, bufferSize=4 * MiB),
            greet=True,
            clock=self.clock,
        )
        self.root = self.client.remoteForName("root")
        theirs: list[Any] = []
        mine: list[Any] = []

        def hello(ref: Any) -> None:
            for _ in range(count):
                ref.callRemote("size", b"s" * (MiB * 3 // 2)).addBoth(theirs.append)

        self.rootObject.remote_hello = hello  # type: ignore[attr-defined]
        self.root.callRemote("hello", Sizer())
        for _ in range(count):
            self.root.callRemote("echo", b"c" * (MiB * 3 // 2)).addBoth(mine.append)
        self.settle(lambda: len(mine) == len(theirs) == count)
        self.assertEqual(theirs, [MiB * 3 // 2] * count)
        self.assertEqual([len(answer) for answer in mine], [MiB * 3 // 2] * count)
        self.assertFalse(self.client.disconnected or self.server.disconnected)
        self.assertEqual((self.client._untakenBytes, self.server._untakenBytes), (0, 0))

    def test_callsWaitForRoom(self) -> None:
        """Large calls, one-way ones too, wait while those not taken would pass
        bufferedBytes, and keep their order, and so does a small call made after them;
        answers, and small calls made to go ahead (``ordered=False``), do not wait."""
        taken: list[int] = []
        self.rootObject.remote_take = lambda data: taken.append(len(data))  # type: ignore
        results: list[Any] = []
        for size in (600_000, 300_000, 700_000):
            self.root.callRemote("take", b"x" * size).addBoth(results.append)
        self.root.callRemote("take", b"y" * 400_000, pbanswer=False)
        self.root.callRemote("take", b"z" * 10)
        self.root.withOptions(ordered=False).callRemote("take", b"w" * 5)
        big: list[Any] = []
        self.root.withOptions(ordered=False).callRemote("big", 2 * MiB).addBoth(big.append)
        self.assertTrue(self.client._untakenBytes < MiB)
        self.settle(lambda: len(results) == 3 and len(big) == 1 and len(taken) == 6)
        self.assertEqual(taken, [5, 600_000, 300_000, 700_000, 400_000, 10])
        self.assertEqual(len(big[0]), 2 * MiB)
        self.pump.flush()  # the last "taken"
        self.assertEqual(self.client._untaken, {})

    def test_earlierCallWaitsForALaterOne(self) -> None:
        """A large call whose answer waits for a later large call is answered: calls are
        taken as they are handled, not when they are answered."""
        gate: Deferred[int] = Deferred()
        self.rootObject.remote_waitForGate = lambda data: gate  # type: ignore[attr-defined]
        self.rootObject.remote_open = lambda data: gate.callback(len(data))  # type: ignore
        first = self.root.callRemote("waitForGate", b"a" * (MiB * 3 // 2))
        second = self.root.callRemote("open", b"b" * (MiB * 3 // 2))
        self.settle(lambda: first.called and second.called)
        self.assertEqual(self.successResultOf(first), MiB * 3 // 2)
        self.assertIsNone(self.successResultOf(second))

    def test_waitingCallThatTimesOutIsNotSent(self) -> None:
        """A call that waits for the peer to take an earlier one and times out meanwhile is
        never sent: the peer does not run a call its caller gave up on."""
        taken: list[int] = []
        self.rootObject.remote_take = lambda data: taken.append(len(data))  # type: ignore
        first = self.root.callRemote("take", b"1" * (MiB * 3 // 2))
        second = self.root.withOptions(timeout=1).callRemote("take", b"2" * (MiB * 3 // 2))
        self.assertGreater(self.client._largeOut[1][3], 0)  # waits for room
        self.clock.advance(1)
        self.failureResultOf(second, TimeoutError)
        self.settle(lambda: first.called)
        self.pump.flush()
        self.assertEqual(taken, [MiB * 3 // 2])
        self.assertEqual((self.client._largeOut, self.client._untaken), ([], {}))

    def test_peerThatDoesNotTake(self) -> None:
        """A peer whose hello does not offer "taken" (an earlier pbroker) is not asked:
        nothing waits for room, and it never gets a "taken" it would not understand."""
        self.client._untakenLimit = 0
        sent: list[Any] = []
        sendCall = self.server.sendCall
        self.server.sendCall = lambda *message: (sent.append(message[0]), sendCall(*message))[1]
        results: list[Any] = []
        for _ in range(3):
            self.root.callRemote("echo", b"x" * (MiB * 3 // 2)).addBoth(results.append)
        self.assertEqual(self.client._untakenBytes, 0)
        self.settle(lambda: len(results) == 3)
        self.assertEqual([len(result) for result in results], [MiB * 3 // 2] * 3)
        self.assertNotIn(b"taken", sent)

    def test_peerWithASmallerBufferedBytes(self) -> None:
        """Each side holds back its large calls by the smaller of the two bufferedBytes
        (the hello says each side's): a server that keeps less than its client is not
        overflowed, nor is the client by the server."""
        limits = pb.BrokerLimits(bufferedBytes=16 * MiB, messageSize=4 * MiB)
        self.pipelineBothWays(self.limits, limits, 20)
        self.assertEqual((self.client._untakenLimit, self.server._untakenLimit), (MiB, MiB))
        self.pipelineBothWays(limits, self.limits, 20)

    def test_afterLargeForgottenOnConnectionLost(self) -> None:
        """What waits behind large messages is dropped with the connection."""
        from tests.test_broker import Gauge, RemoteGauge

        gauge = Gauge()
        self.server.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.rootObject.remote_take = lambda g, data: len(data)  # type: ignore[attr-defined]
        first = self.root.callRemote("take", gauge, b"x" * (3 * MiB))
        behind = self.root.callRemote("take", gauge, b"y" * (3 * MiB))
        self.assertEqual(len(self.client._afterLarge), 1)
        self.client.transport.abortConnection()  # (loseConnection() sends what waits)
        self.pump.flush()
        self.failureResultOf(first, PBConnectionLost)
        self.failureResultOf(behind, PBConnectionLost)
        self.assertEqual((list(self.client._afterLarge), self.client._largeOut), ([], []))

    def test_connectionLostForgetsUntaken(self) -> None:
        """Calls not taken are forgotten when the connection is lost; they fail."""
        results: list[Any] = []
        for _ in range(2):
            self.root.callRemote("echo", b"x" * (MiB * 3 // 2)).addBoth(results.append)
        self.assertGreater(self.client._untakenBytes, 0)
        self.client.transport.abortConnection()  # (loseConnection() sends what waits)
        self.pump.flush()
        self.assertEqual(len(results), 2)
        for failure in results:
            failure.trap(PBConnectionLost)
        self.assertEqual((self.client._untaken, self.client._untakenBytes), ({}, 0))

    def test_takenForACallNotSent(self) -> None:
        """A "taken" for a call that does not wait for one is a protocol error: the peer is
        dropped."""
        with capturedLogs():
            self.server.sendCall(b"taken", 999)
            self.pump.flush()
        self.assertTrue(self.client.disconnected)


class SlowDrain(PacingFakeTransport):
    """
    A pacing fake transport whose peer reads ``chunk`` bytes per pump, and that resumes its
    producer only once all it holds is taken, as Twisted's TCP transports do.
    """

    chunk = 16 * 1024

    def getOutBuffer(self) -> Any:
        if not self.stream:
            return None
        data = b"".join(self.stream)
        out, rest = data[: self.chunk], data[self.chunk :]
        self.stream = [rest] if rest else []
        self.waiting = len(rest)
        if not rest and self.producerPaused:
            self.producerPaused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return out


class SlowReaderTests(SynchronousTestCase):
    def test_slowReaderKept(self) -> None:
        """A reader that reads steadily, if too slowly to drain what waits for it within
        stallTimeout, keeps its connection: what it took since the timer started counts."""
        taken: list[int] = []

        class Sink(pb.Referenceable):
            def remote_take(self, data: bytes) -> None:
                taken.append(len(data))

        class Root(pb.Root):
            def remote_burst(self, sink: Any, count: int) -> None:
                for _ in range(count):
                    sink.callRemote("take", b"x" * 8000)

        clock = Clock()
        limits = pb.BrokerLimits(bufferedBytes=256 * 1024, stallTimeout=5.0)
        server = pb.PBServerFactory(Root(), clock=clock, limits=limits).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 54321)
        )
        client = pb.PBClientFactory(clock=clock).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 8789)
        )
        serverAddress = IPv4Address("TCP", "127.0.0.1", 8789)
        clientAddress = IPv4Address("TCP", "127.0.0.1", 54321)
        pump = iosim.connect(
            server,
            SlowDrain(server, True, serverAddress, clientAddress, bufferSize=64 * 1024),
            client,
            PacingFakeTransport(client, False, clientAddress, serverAddress, bufferSize=64 * 1024),
            greet=True,
            clock=clock,
        )
        client.remoteForName("root").callRemote("burst", Sink(), 200)
        with capturedLogs() as events:
            for _ in range(400):  # 16 KiB per 0.1 s: 1.6 MB in about 10 s, over 5 s
                clock.advance(0.1)
                pump.pump()
                if len(taken) == 200 or server.disconnected:
                    break
        self.assertEqual(len(taken), 200)
        self.assertFalse(server.disconnected)
        self.assertFalse(any("stopped reading" in str(e.get("log_format")) for e in events))


class MessagesBeforeALossTests(SynchronousTestCase):
    """
    Messages that wait while the connection is full are handled if the connection is lost
    before it drains: they arrived.
    """

    def test_lastMessageHandled(self) -> None:
        """A client that asks for a large answer, sends a last one-way message and closes
        without reading further: the server handles the message."""
        seen: list[str] = []

        class Root(NativeRoot):
            def remote_bye(self, note: str) -> None:
                seen.append(note)

        clock = Clock()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), clock=clock),
            pb.PBClientFactory(clock=clock),
            clock=clock,
            bufferSize=64 * 1024,
        )
        root = client.remoteForName("root")
        root.callRemote("big", 8 * MiB).addErrback(lambda _: None)
        pump.serverIO.bufferReceived(pump.clientIO.getOutBuffer())
        self.assertTrue(server.transport.paused)
        root.callRemote("bye", "saved my work", pbanswer=False)
        pump.serverIO.bufferReceived(pump.clientIO.getOutBuffer())
        self.assertEqual(seen, [])  # it waits: the connection is full
        pump.serverIO.disconnecting = True
        pump.serverIO.reportDisconnect()  # lost before it drained
        self.assertTrue(server.disconnected)
        self.assertEqual(seen, ["saved my work"])


class NestingDepthTests(SynchronousTestCase):
    """
    ``BrokerLimits.nestingDepth`` bounds how deeply a native value nests: msgpack's lists
    and dicts, the tuples and sets around them, together.
    """

    def setUp(self) -> None:
        limits = pb.BrokerLimits(nestingDepth=6)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), limits=limits), pb.PBClientFactory()
        )
        self.root = self.client.remoteForName("root")

    def echo(self, value: Any) -> Any:
        results: list[Any] = []
        with capturedLogs():
            self.root.callRemote("echo", value).addBoth(results.append)
            self.pump.flush()
        return results[0]

    def nested(self, depth: int, wrap: Any = lambda inner: [inner]) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = wrap(value)
        return value

    def test_deepValueRefused(self) -> None:
        """Lists, dicts and tuples nested deeper than the limit fail that call with
        InvalidJelly; the connection stays."""
        # The arguments are a list themselves: a value 5 deep is 6 levels.
        self.assertEqual(self.echo(self.nested(5)), self.nested(5))
        mixed = self.nested(
            5, lambda inner: {"k": (inner,)} if type(inner) is not dict else [inner]
        )
        for value in (self.nested(6), self.nested(6, lambda inner: {"k": inner}), mixed):
            failure = self.echo(value)
            self.assertIsInstance(failure, Failure)
            self.assertIn("nested more than 6 levels deep", str(failure.value))
        self.assertFalse(self.server.disconnected)
        self.assertEqual(self.echo(3), 3)

    def test_deeperThan(self) -> None:
        """deeperThan reads how deeply a document nests without building it, tuples' and
        sets' arrays included, and never fails on malformed or cut bytes."""
        codec = self.server._codec
        assert codec is not None
        for value, depth in (
            (1, 0),
            ([], 1),
            ([1, [2, {"a": [3]}]], 4),
            ({"a": b"[[["}, 1),
            ([(1, (2, [3]))], 4),
            ({frozenset({(1,)})}, 3),
        ):
            data = codec.pack(value)
            assert isinstance(data, bytes)
            for limit in range(6):
                self.assertEqual(_native.deeperThan(data, limit), depth > limit, (value, limit))
        deep = msgpack.packb(self.nested(1000), use_bin_type=True)
        self.assertTrue(_native.deeperThan(deep, 20))
        for cut in range(len(deep)):
            self.assertFalse(_native.deeperThan(deep[:cut], 1000))
        self.assertTrue(_native.deeperThan(b"\xdd\xff\xff\xff\xff" * 3, 2))
        self.assertFalse(_native.deeperThan(b"\xc7\xff\x01\x91" + b"\x91" * 5, 9))


class RecordingProducer:
    """
    A push producer that records what it is told, in ``events``.
    """

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class LocalStreamTests(SynchronousTestCase):
    """
    :class:`Stream` on its own: a buffer with back-pressure for writers and push producers.
    """

    def test_pushProducerPausedAndResumed(self) -> None:
        """A registered push producer is paused when the buffer fills and resumed as it drains."""
        producer = RecordingProducer()
        events = producer.events
        stream = Stream(bufferSize=2)
        stream.registerProducer(producer, True)
        stream.write(1)
        self.assertEqual(events, [])
        stream.write(2)
        self.assertEqual(events, ["pause"])
        self.assertEqual(self.successResultOf(stream.__anext__()), 1)
        self.assertEqual(events, ["pause", "resume"])
        stream.close()
        self.assertEqual(events, ["pause", "resume", "stop"])

    def test_unregisteredProducerIsLeftAlone(self) -> None:
        """Once unregistered, a producer is no longer paused, resumed or stopped."""
        producer = RecordingProducer()
        stream = Stream(bufferSize=1)
        stream.registerProducer(producer, True)
        stream.unregisterProducer()
        stream.write(1)
        self.assertEqual(self.successResultOf(stream.__anext__()), 1)
        stream.close()
        self.assertEqual(producer.events, [])

    def test_writeAfterTheReaderStopped(self) -> None:
        """Writes to a stream whose reader stopped are dropped, not refused: a publisher
        writing to many subscribers goes on, and can see which ones left (cancelled)."""
        stream = Stream(bufferSize=1)
        self.assertFalse(stream.cancelled)
        waiting = stream.write(1)
        self.assertNoResult(waiting)
        stream.close()  # the reader cancelled
        self.failureResultOf(waiting, CancelledError)
        self.assertTrue(stream.cancelled)
        self.assertTrue(stream.closed)
        # Not refused (a publisher goes on with its other readers), but failed: a writer
        # that waits for room before each write learns that its reader is gone.
        self.failureResultOf(stream.write(2), CancelledError)
        stream.finish()  # nothing to finish: no error either
        producer = RecordingProducer()
        stream.registerProducer(producer, True)
        self.assertEqual(producer.events, ["stop"])  # nobody will read what it would produce

    def test_closeEndsAWaitingRead(self) -> None:
        """A read waiting here when the stream is closed (its remote reader cancelled, or
        sending it failed) fails as a later read does, rather than waiting for ever."""
        stream = Stream()
        waiting = stream.__anext__()
        stream.close()
        self.failureResultOf(waiting, CancelledError)
        self.failureResultOf(stream.__anext__(), CancelledError)
        failed = Stream()
        waiting = failed.__anext__()
        failed.close(Failure(ValueError("the connection was lost")))
        self.failureResultOf(waiting, ValueError)
        self.failureResultOf(failed.__anext__(), ValueError)

    def test_closeAfterFinishWithItemsUnread(self) -> None:
        """A finished stream closed before its items were read ends with the error: the
        reader is not told it got everything."""
        stream = Stream()
        stream.write(1)
        stream.finish()
        stream.close()
        self.failureResultOf(stream.__anext__(), CancelledError)
        read = Stream()
        read.finish()
        read.close()  # nothing was dropped: the end stays clean
        self.failureResultOf(read.__anext__(), StopAsyncIteration)

    def test_aCancelledReadTakesNoItem(self) -> None:
        """A read cancelled while it waits (a timeout, say) is forgotten: the next item
        goes to the next read."""
        stream = Stream()
        abandoned = stream.__anext__()
        abandoned.cancel()
        self.failureResultOf(abandoned, CancelledError)
        stream.write(1)
        self.assertEqual(self.successResultOf(stream.__anext__()), 1)

    def test_writeAfterFinishRefused(self) -> None:
        """Writing after finish() is the writer's mistake: ValueError."""
        stream = Stream()
        stream.finish()
        self.assertFalse(stream.cancelled)
        with self.assertRaises(ValueError):
            stream.write(1)

    def test_pullProducersRefused(self) -> None:
        """Only push producers can drive a Stream."""
        self.assertRaises(ValueError, Stream().registerProducer, object(), False)

    def test_finishAfterItems(self) -> None:
        """Items written before finish() are read, then the stream ends; fail() ends it so."""
        stream = Stream()
        stream.write("a")
        stream.finish()
        self.assertEqual(self.successResultOf(stream.__anext__()), "a")
        self.failureResultOf(stream.__anext__(), StopAsyncIteration)
        self.assertRaises(ValueError, stream.write, "late")
        failing = Stream()
        failing.fail(ValueError("broken"))
        self.failureResultOf(failing.__anext__(), ValueError)


class WholeRecordTests(SynchronousTestCase):
    def test_packedValueSpliced(self) -> None:
        """
        A Packed value in a message's envelope gives the bytes msgpack gives for the message
        with the value as bytes, wherever the value is and whatever its size's header.
        """
        for size in (0, 255, 256, 8192, 65_535 - 3):
            value = bytes(range(256)) * (size // 256) + b"v" * (size % 256)
            packed = _native.Packed(_native.binHeader(len(value)), value)
            for message in (
                [b"answer", 5, packed],
                [b"message", 6, b"root", b"echo", 1, packed, b"\x80"],
                [packed, {"k": [1, 2]}],
            ):
                record = _native.wholeRecord(message)
                plain = [b"".join(f.parts) if f is packed else f for f in message]
                envelope = msgpack.packb(plain, use_bin_type=True)
                self.assertEqual(record, len(envelope).to_bytes(4, "big") + envelope)

    def test_fragmentedInstead(self) -> None:
        """
        A message with a value over INLINE_LIMIT, two Packed values, 16 fields or more, or an
        envelope over FRAGMENT_SIZE has no WHOLE record: it goes in fragments.
        """
        small = _native.Packed(b"\xc4\x01", b"s")
        large = _native.Packed(b"x" * (_native.INLINE_LIMIT + 1))
        for message in (
            [b"answer", 1, large],
            [b"answer", 1, small, small],
            [*range(15), small],
            [b"x" * _native.FRAGMENT_SIZE, small],
        ):
            self.assertIsNone(_native.wholeRecord(message))
        self.assertIsNotNone(_native.wholeRecord([*range(14), small]))


class JoinPartsTests(SynchronousTestCase):
    """
    The C extension's joinParts() joins the parts of a large byte string as b"".join does,
    letting go of each once copied, and of no byte outside them.
    """

    def setUp(self) -> None:
        if _accelerator.speedups is None:
            raise SkipTest("pbroker._speedups is not in use (test_package checks why)")
        self.joinParts = _accelerator.speedups.joinParts

    def test_joined(self) -> None:
        """Bytes, bytearrays and views of either, joined in order; the list then holds
        None only (so the last view of a piece frees it)."""
        piece = bytearray(b"a" * 10_000 + b"b" * 20_000 + b"c" * 10_000)
        parts: list[Any] = [b"head", memoryview(piece)[10_000:30_000], bytearray(b"ba"), b""]
        self.assertEqual(self.joinParts(parts), b"head" + b"b" * 20_000 + b"ba")
        self.assertEqual(parts, [None] * 4)
        self.assertEqual(self.joinParts([]), b"")

    def test_nothingOutsideThePartsTouched(self) -> None:
        """A writable part's memory given back is only whole pages inside it: the bytes of
        its piece before and after it are as they were."""
        piece = bytearray(b"a" * 10_000 + b"b" * 70_000 + b"c" * 10_000)
        self.assertEqual(self.joinParts([memoryview(piece)[10_000:80_000]]), b"b" * 70_000)
        self.assertEqual(piece[:10_000], b"a" * 10_000)
        self.assertEqual(piece[80_000:], b"c" * 10_000)
        shared = b"r" * 70_000  # read-only (a read someone else may hold): never touched
        self.assertEqual(self.joinParts([memoryview(shared)[1:]]), shared[1:])
        self.assertEqual(shared, b"r" * 70_000)

    def test_refused(self) -> None:
        """Not a list, or a part that is not a buffer: TypeError, and nothing let go of."""
        with self.assertRaises(TypeError):
            self.joinParts((b"a", b"b"))  # type: ignore[arg-type]
        parts: list[Any] = [b"a", "text"]
        with self.assertRaises(TypeError):
            self.joinParts(parts)
        self.assertEqual(parts, [b"a", "text"])


class RecordAcceleratorTests(SynchronousTestCase):
    """
    The C extension's record() and envelope() give what wholeRecord's Python and msgpack
    give, or leave the message to them.
    """

    def setUp(self) -> None:
        if _native._record is None or _native._envelope is None:
            raise SkipTest("pbroker._speedups is not in use (test_package checks why)")

    def inPython(self, message: list[Any]) -> Any:
        try:
            return wholeRecordInPython(message)
        except Exception as e:
            return type(e)

    def test_usualMessagesInC(self) -> None:
        """
        The usual messages (calls and answers, with a large value or a small one, releases) are
        packed in C, to the bytes Python packs (tests/test_fuzz.py holds the two to each other
        on random messages).
        """
        record = _accelerator.speedups.record
        value = b"v" * 60_000
        for message in [
            [
                b"message",
                7,
                b"root",
                b"echo",
                1,
                _native.Packed(b"\x91\xc5\xea\x60", value),
                b"\x80",
            ],
            [b"answer", 2**40, _native.Packed(b"\xc5\xea\x60", value)],
            [b"answer", 9, b"\x05"],
            [b"decref", -3],
        ]:
            made = record(message, _native.Packed, _native.INLINE_LIMIT, _native.FRAGMENT_SIZE)
            self.assertIsNotNone(made)
            self.assertEqual(made, self.inPython(message))

    def test_envelopeArguments(self) -> None:
        """
        envelope() reads bytes only, within them, and is given the table of value fields.
        """
        envelope = _accelerator.speedups.envelope
        data = b"\0\0\0\0\x91\x01"
        self.assertEqual(envelope(data, 4, 6, 1, {}), [1])
        self.assertRaises(TypeError, envelope, bytearray(data), 4, 6, 1, {})
        self.assertRaises(TypeError, envelope, data, 4, 6, 1, [])
        self.assertRaises(ValueError, envelope, data, 4, 7, 1, {})
        self.assertRaises(ValueError, envelope, data, 5, 4, 1, {})
        self.assertRaises(TypeError, envelope, data, 4, 6)
        many = b"\0\0\0\0" + msgpack.packb([b"message", *range(69), b"z" * 40_000])
        self.assertEqual(envelope(many, 4, len(many), 10, {b"message": -1})[-1], b"z" * 40_000)

    def test_onlyValuesAreViews(self) -> None:
        """
        In a call with a large method name and a large argument, only the argument is a view:
        the name, and the fields of a command that carries no values, are bytes as before.
        """
        name = b"n" * 40_000
        args = msgpack.packb([b"a" * 40_000])
        (record,) = _native.records([b"message", 1, 0, name, 1, args, b"\x80"])
        ((_, _, _, gotName, _, gotArgs, _),) = _native.FrameDecoder(None).feed(record)
        self.assertIs(type(gotName), bytes)
        self.assertIs(type(gotArgs), memoryview)
        (record,) = _native.records([b"custom", 1, name])
        ((_, _, gotName),) = _native.FrameDecoder(None).feed(record)
        self.assertIs(type(gotName), bytes)

    def test_envelopeHostileSizes(self) -> None:
        """
        A peer's envelope whose last field claims more bytes than are left (a byte string or
        text of up to 4 GiB, an integer cut short) or whose array claims more fields, at the
        very end of the bytes read: left to msgpack, nothing read past the end (a missing
        check here copies gigabytes from beyond the buffer, or crashes).
        """
        envelope = _accelerator.speedups.envelope
        tails = [b"\xc4\xff", b"\xc5\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff"]
        tails += [b"\xd9\xff", b"\xda\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdb\x7f\xff\xff\xff"]
        tails += [b"\xbf", b"\xc4", b"\xc5\x01", b"\xc6\x00\x01", b"\xd9", b"\xda\x01", b"\xdb"]
        tails += [b"\xcc", b"\xcd\x01", b"\xce\x01\x02\x03", b"\xcf", b"\xd0", b"\xd3\x01"]
        # (A field of 600 bytes before the tail puts the end of the bytes read at the end of
        # memory of their own, where .ci/sanitize sees a read a byte past it.)
        padding = b"\xc5\x02\x58" + b"p" * 600
        prefixes = [b"\x91", b"\x93\xc4\x06answer\x07", b"\xdc\x00\x01", b"\xdc\xff\xff"]
        prefixes += [b"\x92" + padding, b"\xdc\x00\x02" + padding]
        for prefix in prefixes:
            for tail in [b"", *tails]:
                data = b"\0\0\0\0" + prefix + tail
                got = envelope(data, 4, len(data), 1, {b"answer": -1})
                self.assertIsNone(got, (prefix, tail))
        data = b"\0\0\0\0\x92\xc4\x06answer\xc6\x00\x00\x00\x02xy"
        for stop in range(4, len(data)):
            self.assertIsNone(envelope(data, 4, stop, 1, {b"answer": -1}), stop)
        self.assertEqual(envelope(data, 4, len(data), 1, {b"answer": -1}), [b"answer", b"xy"])

    def test_envelopeViewEdges(self) -> None:
        """
        A byte string is a view from exactly ``large`` bytes on, and only in the first 64
        fields (the bits of a mask); a larger one past them is bytes.
        """
        envelope = _accelerator.speedups.envelope
        for size, kind in [(99, bytes), (100, memoryview), (101, memoryview)]:
            data = b"\0\0\0\0" + msgpack.packb([b"answer", 1, b"x" * size])
            (_, _, value) = envelope(data, 4, len(data), 100, _native.VALUE_FIELDS)
            self.assertIs(type(value), kind, size)
        data = b"\0\0\0\0" + msgpack.packb([b"many", *[b"y" * 100] * 69])
        got = envelope(data, 4, len(data), 100, {b"many": -1})
        self.assertEqual([type(field) for field in got], [bytes] + [memoryview] * 63 + [bytes] * 6)

    def test_recordLeavesPackedSubclass(self) -> None:
        """
        A subclass of Packed is not a value record() splices (Python refuses it too).
        """

        class Sub(_native.Packed):
            pass

        message = [b"answer", 1, Sub(b"\x01")]
        record = _accelerator.speedups.record
        self.assertIsNone(record(message, _native.Packed, _native.INLINE_LIMIT, 1 << 18))
        self.assertEqual(self.inPython(message), TypeError)

    def test_recordWhilePythonCodeChangesTheMessage(self) -> None:
        """
        A part of a Packed value whose buffer Python code makes (``__buffer__``, Python 3.12
        on) may change the message while record() packs it: the record is that of the fields
        as they were, never written past its end (it was sized with the field before the
        change, then written with the field after: a heap overflow) nor read past the list's.
        Before Python 3.12 such a part is no buffer: record() refuses it with the TypeError
        Python's packing raises.
        """
        record = _accelerator.speedups.record
        for change in ["grow", "shrink"]:
            message: list[Any] = [b"answer", 7, None]

            class Sneaky:
                def __init__(self, message: list[Any], change: str) -> None:
                    self.message, self.change = message, change

                def __buffer__(self, flags: int) -> memoryview:
                    if self.change == "grow":
                        self.message[0] = b"A" * 300_000
                        self.message[1] = "x" * 70_000
                    else:
                        self.message.clear()
                    gc.collect()
                    return memoryview(b"v" * 10)

            value = _native.Packed(b"\xc4\x0a")
            value.parts = (b"\xc4\x0a", Sneaky(message, change))
            message[2] = value
            if sys.version_info < (3, 12):
                self.assertIs(self.inPython(message), TypeError)
                self.assertRaises(
                    TypeError,
                    record,
                    message,
                    _native.Packed,
                    _native.INLINE_LIMIT,
                    _native.FRAGMENT_SIZE,
                )
                self.assertEqual(message[:2], [b"answer", 7])  # no Python code ran
                continue
            made = record(message, _native.Packed, _native.INLINE_LIMIT, _native.FRAGMENT_SIZE)
            envelope = msgpack.packb([b"answer", 7, b"\xc4\x0a" + b"v" * 10])
            self.assertEqual(made, _native._packHeader(len(envelope)) + envelope, change)


class LargeValuesReadInPlaceTests(NativeTestCase):
    def test_methodsGetBytes(self) -> None:
        """
        A large byte string read in place reaches the method, and comes back, as bytes.
        """
        for size in (32 * 1024, 60_000, 100_000):
            value = random.Random(size).randbytes(size)
            result = self.call("echo", value)
            self.assertIs(type(result), bytes)
            self.assertEqual(result, value)
            self.assertIs(type(self.call("echo", [value])[0]), bytes)

    def test_largeMethodNameAsBefore(self) -> None:
        """
        A call to a method with a large name fails as it does when msgpack reads it.
        """
        name = "m" * 40_000
        first = self.call(name, b"a" * 40_000)
        self.patch(_native, "_envelope", None)
        second = self.call(name, b"a" * 40_000)
        self.assertIsInstance(first, Failure)
        self.assertEqual(first.getErrorMessage(), second.getErrorMessage())


class WholeRecordOfAnySequenceTests(NativeTestCase):
    def test_tupleOrListSubclass(self) -> None:
        """
        A message that is a tuple (Twisted's Broker.sendCall hands sendEncoded its fields as
        one) or a list subclass is packed as msgpack packs it, as before the C extension
        packed records: the extension leaves what is not a list to Python, never raises.
        """

        class Fields(list):  # type: ignore[type-arg]
            pass

        expected = b"\0\0\0\x0a\x92\xc4\x06decref\x05"
        self.assertEqual(_native.wholeRecord([b"decref", 5]), expected)
        for message in [(b"decref", 5), Fields([b"decref", 5])]:
            self.assertEqual(_native.wholeRecord(message), expected)  # type: ignore[arg-type]
        self.client.sendEncoded((b"didNotUnderstand", b"nothing"))
        self.assertEqual(self.call("echo", 5), 5)
        self.assertFalse(self.client.disconnected)


class ReentrancyTests(SynchronousTestCase):
    def test_nestedPackingDuringCollection(self) -> None:
        """
        A message packed while another is (a __del__ run by the collector sends a decref)
        leaves both intact.
        """
        nested: list[Any] = []

        class Dropped:
            def __del__(self) -> None:
                nested.append(_native.wholeRecord([b"decref", 7]))

        def makeGarbage() -> None:
            dropped = Dropped()
            dropped.cycle = dropped  # type: ignore[attr-defined]

        message = [b"answer", 5, _native.Packed(b"x" * 100_000)]
        gc.collect()
        makeGarbage()
        threshold = gc.get_threshold()
        gc.set_threshold(1)
        try:
            parts, fragmented = _native.packMessage(message)
        finally:
            gc.set_threshold(*threshold)
        gc.collect()
        self.assertEqual(len(nested), 1)
        decoder = _native.FrameDecoder(None)
        payload = b"".join(parts)
        out = decoder.feed(nested[0] + _native.fragmentHeader(_native.LAST, len(payload)) + payload)
        self.assertEqual(out[0], [b"decref", 7])
        self.assertEqual(out[1][:2], [b"answer", 5])
        self.assertEqual(bytes(out[1][2]), b"x" * 100_000)
        self.assertTrue(fragmented)

    def test_packedValuesLetGo(self) -> None:
        """
        Once a message with a large value is packed, and its parts sent and dropped, the
        shared packer holds nothing of it: the value is freed, not kept until the next
        message with a large value (a 100 MB answer stayed in memory after its connection
        closed).
        """
        large = b"x" * 100_000
        before = sys.getrefcount(large)
        parts, fragmented = _native.packMessage([b"answer", 5, _native.Packed(b"h", large)])
        self.assertTrue(fragmented)
        self.assertIs(parts[-1], large)
        del parts
        self.assertEqual(sys.getrefcount(large), before)

    def test_packedValuesLetGoOnError(self) -> None:
        """
        A message that cannot be packed leaves none of its large values with the packer.
        """
        large = b"x" * 100_000
        before = sys.getrefcount(large)
        with self.assertRaises(TypeError):
            _native.packMessage([_native.Packed(b"h", large), object()])
        self.assertEqual(sys.getrefcount(large), before)


class StopSign(pb.Copyable):
    pass


class RemoteStopSign(pb.RemoteCopy):
    """
    Calls ``arrived`` as it is unjellied: application code that runs while a stream's item
    is decoded.
    """

    arrived: Callable[[], None] = staticmethod(lambda: None)

    def setCopyableState(self, state: dict[str, Any]) -> None:
        type(self).arrived()


class StreamLifecycleTests(NativeTestCase):
    """
    Streams are released however a call ends: dropped unread, answered after a cancel,
    refused on the way out; and large items keep their place.
    """

    def test_droppedUnreadStreamIsCancelled(self) -> None:
        """A stream the caller drops without reading closes the sender's generator."""
        stream = self.call("numbers", 10_000)
        self.pump.flush()
        del stream
        gc.collect()
        self.pump.flush()
        self.assertTrue(self.rootObject.closed)
        self.assertEqual(self.server._streams.outgoing, {})

    def test_readerWaitedOnIsKept(self) -> None:
        """A reader only a pending next() or collect() refers to (a chain of callbacks no
        one holds) is kept until its items come: a collection does not cancel it."""
        collected: list[Any] = []
        self.root.callRemote("numbers", 100).addCallback(lambda s: s.collect()).addBoth(
            collected.append
        )
        nexts: list[Any] = []
        self.root.callRemote("numbers", 3).addCallback(lambda s: s.next()).addBoth(nexts.append)
        for _ in range(3):
            self.pump.pump()
        gc.collect()
        self.pump.flush()
        self.assertEqual(collected, [list(range(100))])
        self.assertEqual(nexts, [0])
        self.assertEqual(self.client._streams._waitedOn, {})

    def test_asyncWithClosesTheStream(self) -> None:
        """A reader that leaves ``async with stream:`` early (a break, an exception) has the
        stream cancelled there, although a variable still refers to it: the sender's
        generator is closed. contextlib.aclosing does the same through aclose()."""
        for close in (lambda stream: stream, contextlib.aclosing):
            self.rootObject.closed = False
            stream = self.call("numbers", 10_000)
            seen: list[int] = []

            async def read(stream: Any, close: Any, seen: list[int]) -> None:
                async with close(stream):
                    async for item in stream:
                        seen.append(item)
                        if item == 2:
                            raise ValueError("enough")

            done: list[Any] = []
            Deferred.fromCoroutine(read(stream, close, seen)).addBoth(done.append)
            self.pump.flush()
            self.assertEqual(seen, [0, 1, 2])
            self.assertTrue(done[0].check(ValueError))
            self.assertTrue(self.rootObject.closed)
            self.assertEqual(repr(stream), f"<RemoteStream {stream.streamID} cancelled>")
        self.assertEqual(self.server._streams.outgoing, {})
        ended = self.call("numbers", 2)
        collected = ended.collect()
        self.pump.flush()
        self.assertEqual(self.successResultOf(collected), [0, 1])
        self.successResultOf(ended.aclose())  # ended: nothing to do
        self.assertEqual(repr(ended), f"<RemoteStream {ended.streamID} ended>")

    def test_cancelledCollectCancelsTheStream(self) -> None:
        """Cancelling collect() cancels the stream: the sender's generator is closed and no
        reader is kept."""
        stream = self.call("numbers", 10_000)
        collecting = stream.collect()
        del stream
        for _ in range(3):
            self.pump.pump()
        collecting.cancel()
        self.failureResultOf(collecting, CancelledError)
        self.pump.flush()
        self.assertTrue(self.rootObject.closed)
        self.assertEqual(self.server._streams.outgoing, {})
        self.assertEqual(self.client._streams._waitedOn, {})

    def test_lateAnswerReleased(self) -> None:
        """An answer that arrives after its call was cancelled is released, not leaked."""
        d = self.root.callRemote("wait")
        self.pump.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        assert self.rootObject.pending is not None
        self.rootObject.pending.callback(self.rootObject.counter)  # crosses the cancel
        self.pump.flush()
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.server.luids, {})
        self.assertEqual(self.client._abandoned, set())

    def test_itemsAfterCancelReleased(self) -> None:
        """References in stream items that arrive after the reader cancelled are released,
        not left exported on the sender."""

        def references() -> Iterator[pb.Referenceable]:
            return (pb.Referenceable() for _ in range(100))

        self.rootObject.remote_references = references  # type: ignore[attr-defined]
        for _ in range(3):
            stream = self.call("references")
            self.pump.pump()  # the reader's credit reaches the sender, whose items set out
            stream.cancel()
            self.pump.flush()
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.server.luids, {})

    def test_errorAfterCancelDropped(self) -> None:
        """A stream error that crosses the reader's cancel is dropped: the reader stays
        cancelled, the stream is forgotten on both sides, the connection stays; references
        in the error's value are released, not left exported on the sender."""
        stream = self.call("pushed")
        self.pump.flush()
        stream.cancel()  # its streamcancel is on its way...
        self.rootObject.stream.close(Failure(ValueError("broken")))  # ...as this is sent
        self.assertIn(stream.streamID, self.client._streams.cancelled)
        with capturedLogs() as events:
            self.pump.flush()
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        self.assertEqual(self.client._streams.cancelled, set())
        self.assertEqual(repr(stream), f"<RemoteStream {stream.streamID} cancelled>")
        self.assertEqual(self.server._streams.outgoing, {})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # the sender's log
        # A peer whose error value holds a reference (a copy's state may): the sender
        # ends its stream with that error, as the cancel crosses it.
        stream = self.call("pushed")
        self.pump.flush()
        stream.cancel()
        self.server._streams.drop([stream.streamID])
        self.server.sendCall(b"streamerror", stream.streamID, self.server.serialize(Counter()))
        self.assertEqual(len(self.server.luids), 1)
        self.pump.flush()
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.server.luids, {})
        self.assertEqual(self.client._streams.cancelled, set())
        self.assertFalse(self.client.disconnected)
        self.assertEqual(self.call("echo", 3), 3)

    def test_asyncSourceThatYieldsWhenCancelled(self) -> None:
        """An async source that, stopped while it awaits, catches the CancelledError and
        yields one more item: the item is dropped, not sent, and the source is closed."""
        closed: list[bool] = []

        async def stubborn() -> AsyncIterator[int]:
            try:
                yield 1
                await Deferred()
            except CancelledError:
                yield 99
            finally:
                closed.append(True)

        self.rootObject.remote_stubborn = stubborn  # type: ignore[attr-defined]
        sent: list[Any] = []
        table = self.server._streams
        sendItem = table.sendItem
        table.sendItem = lambda *args: (sent.append(args[1]), sendItem(*args))[1]  # type: ignore[method-assign]
        stream = self.call("stubborn")
        self.pump.flush()
        self.assertEqual(self.successResultOf(stream.next()), 1)
        stream.cancel()
        with capturedLogs() as events:
            self.pump.flush()
        self.assertEqual((sent, closed, events), ([1], [True], []))
        self.assertEqual(table.outgoing, {})
        self.assertEqual(self.call("echo", 3), 3)

    def test_asyncSourceThatCleansUpWhenCancelled(self) -> None:
        """An async source that, stopped while it awaits, awaits its own clean-up before it
        ends with the CancelledError: its end, once the clean-up is done, is dropped (its
        step was already cancelled), nothing is sent or logged, and its finally runs."""
        closed: list[bool] = []
        cleanup: Deferred[None] = Deferred()

        async def careful() -> AsyncIterator[int]:
            try:
                yield 1
                await Deferred()
            except CancelledError:
                await cleanup
                raise
            finally:
                closed.append(True)

        self.rootObject.remote_careful = careful  # type: ignore[attr-defined]
        stream = self.call("careful")
        self.pump.flush()
        self.assertEqual(self.successResultOf(stream.next()), 1)
        stream.cancel()
        with capturedLogs() as events:
            self.pump.flush()
            self.assertEqual(closed, [])  # still cleaning up
            self.assertEqual(self.server._streams.outgoing, {})
            cleanup.callback(None)
            self.pump.flush()
        self.assertEqual((closed, events), ([True], []))
        self.assertEqual(self.call("echo", 3), 3)

    def test_readerCancelledWhileItsItemIsDecoded(self) -> None:
        """Application code run while an item is decoded (a RemoteCopy's setCopyableState)
        cancels the stream, and may then raise: the item is dropped, not kept in a stream
        that is cancelled, nothing of it counts as unread, the stream is cancelled once
        (not failed by the error), the sender stopped, and the connection kept."""

        def raiseAfter(stream: RemoteStream) -> None:
            stream.cancel()
            raise ValueError("seen enough")

        self.registry.setUnjellyableForClass(StopSign, RemoteStopSign)
        self.addCleanup(setattr, RemoteStopSign, "arrived", RemoteStopSign.arrived)
        for hook in (RemoteStream.cancel, raiseAfter):
            self.rootObject.remote_signs = lambda: iter([1, StopSign(), 2])  # type: ignore[attr-defined]
            stream = self.call("signs")
            RemoteStopSign.arrived = staticmethod(partial(hook, stream))  # type: ignore[method-assign]
            table = self.client._streams
            sent: list[Any] = []

            def sendCall(*message: Any, sent: list[Any] = sent) -> None:
                sent.append(message)
                pb.Broker.sendCall(self.client, *message)

            self.patch(self.client, "sendCall", sendCall)
            with capturedLogs() as events:
                self.pump.flush()
            self.assertEqual(repr(stream), f"<RemoteStream {stream.streamID} cancelled>")
            self.failureResultOf(stream.next(), CancelledError)
            self.assertEqual((stream.buffered, table.unreadBytes, table.promisedBytes), (0, 0, 0))
            self.assertEqual(
                [m for m in sent if m[0] == b"streamcancel"], [(b"streamcancel", stream.streamID)]
            )
            self.assertEqual([e for e in events if e.get("log_level").name != "debug"], [])
            self.assertEqual(self.server._streams.outgoing, {})
        self.assertEqual(self.call("echo", 3), 3)

    def test_connectionLostClosesAwaitingAsyncGenerator(self) -> None:
        """An async generator being streamed, awaiting something when the connection drops,
        is closed: the step it is in is cancelled, and its finally runs."""
        closed: list[bool] = []
        gate: Deferred[None] = Deferred()

        async def gated() -> AsyncIterator[int]:
            try:
                yield 1
                await gate
                yield 2
            finally:
                closed.append(True)

        self.rootObject.remote_gated = gated  # type: ignore[attr-defined]
        stream = self.call("gated")
        first: list[Any] = []
        stream.next().addBoth(first.append)
        stream.next().addErrback(lambda _: None)
        self.pump.flush()
        self.assertEqual(first, [1])
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(closed, [True])
        self.assertTrue(gate.called)  # cancelled

    def test_readersUsedAsTheConnectionGoes(self) -> None:
        """A reader whose error handler, as the connection goes, reads another stream and
        cancels a third (``async with a, b, c`` does): the read gets a buffered item, the
        cancelled one fails with CancelledError, and nothing is sent on the lost connection
        (no credit for the item read, no streamcancel); the read one then fails with
        PBConnectionLost after its other items."""
        first = self.call("pushed")  # nothing written to it: a read waits
        read = self.call("pushed")
        for item in range(20):
            self.rootObject.stream.write(item).addErrback(lambda _: None)
        cancelled = self.call("numbers", 100)
        self.pump.flush()
        self.assertEqual((first.buffered, read.buffered, cancelled.buffered), (0, 16, 16))
        # Half the window read: the next read gives credit again.
        self.assertEqual([self.successResultOf(read.next()) for _ in range(7)], [*range(7)])
        seen: list[Any] = []

        def lost(failure: Failure) -> None:
            seen.append(failure.type)
            read.next().addBoth(seen.append)
            cancelled.cancel()

        first.next().addErrback(lost)
        sent: list[Any] = []
        self.client.sendEncoded = sent.append  # type: ignore[method-assign]
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(seen, [PBConnectionLost, 7])
        self.assertEqual(sent, [])
        self.failureResultOf(cancelled.next(), CancelledError)
        self.assertEqual(repr(cancelled), f"<RemoteStream {cancelled.streamID} cancelled>")
        self.assertEqual([self.successResultOf(read.next()) for _ in range(8)], [*range(8, 16)])
        self.failureResultOf(read.next(), PBConnectionLost)
        self.assertEqual(self.client._streams.cancelled, set())

    def test_argumentStreamLostWithItsCallerLogsNoTraceback(self) -> None:
        """A method reading an argument stream fails with PBConnectionLost when its caller's
        connection drops: one line says so, no traceback is logged as an error."""
        outcome: list[Any] = []

        def consume(stream: Any) -> Deferred[Any]:
            return stream.collect().addErrback(lambda f: outcome.append(f) or f)

        self.rootObject.remote_consume = consume  # type: ignore[attr-defined]
        source = Stream()
        source.write(1)
        self.root.callRemote("consume", source).addErrback(lambda _: None)
        self.pump.flush()
        with capturedLogs() as events:
            self.client.transport.loseConnection()
            self.pump.flush()
        self.assertTrue(outcome[0].check(PBConnectionLost))
        self.assertEqual(self.flushLoggedErrors(PBConnectionLost), [])
        lines = [event["log_format"] for event in events]
        self.assertIn("A call from a peer now disconnected failed: {error}", lines)

    def test_generatorAnsweredAfterDisconnectClosed(self) -> None:
        """A method whose Deferred fires with a generator after the caller's connection is
        gone has the generator closed, not kept in the dead connection's table."""
        self.root.callRemote("wait").addErrback(lambda _: None)
        self.pump.flush()
        self.client.transport.loseConnection()
        self.pump.flush()
        generator = self.rootObject.remote_numbers(3)
        next(generator)  # started, so that closing it runs its finally
        assert self.rootObject.pending is not None
        self.rootObject.pending.callback(generator)
        self.assertTrue(self.rootObject.closed)
        self.assertEqual(self.server._streams.outgoing, {})

    def test_callRefusedUnreadReleasesItsArguments(self) -> None:
        """
        A call the server refuses before it reads the arguments (too many calls in
        progress, an unknown object) still releases the streams and references in them:
        the caller's generator is closed before it ran, and its object no longer exported.
        """
        self.server.limits = pb.BrokerLimits(pendingCalls=1)
        self.root.callRemote("wait")
        self.pump.flush()
        generators = [closingSource([]), closingSource([])]
        with capturedLogs():
            busy = self.call("echo", generators[0], pb.Referenceable())
        assert self.rootObject.pending is not None
        self.rootObject.pending.callback(None)
        unknown = self.call("echo", generators[1], target=self.client.remoteForName("nosuch"))
        self.assertIn("calls in progress", str(busy.value))
        self.assertIn("Invalid Object ID", str(unknown.value))
        self.pump.flush()
        self.assertEqual(
            [inspect.getgeneratorstate(g) for g in generators], [inspect.GEN_CLOSED] * 2
        )
        self.assertEqual(self.client._streams.outgoing, {})
        self.assertEqual(self.client.luids, {})

    def test_refusedCallClosesItsStreams(self) -> None:
        """A call that cannot be sent (too large) closes the stream it carried."""
        closed: list[bool] = []
        source = partial(closingSource, closed)

        self.client.peerMessageSize = 1024 * 1024
        generator = source()
        next(generator)  # started, so that closing it runs its finally
        failure = self.call("sum", generator, b"x" * (2 * 1024 * 1024))
        failure.trap(LimitExceeded)
        self.assertEqual(self.client._streams.outgoing, {})
        self.assertEqual(closed, [True])

    def test_largeItemsKeepTheirOrder(self) -> None:
        """Items larger than a fragment, small ones and the final error arrive in order."""

        def mixed() -> Iterator[Any]:
            yield b"L" * (3 * _native.FRAGMENT_SIZE)
            yield 5
            raise ValueError("after the items")

        self.rootObject.remote_mixed = mixed  # type: ignore[attr-defined]
        stream = self.call("mixed")
        seen: list[Any] = []
        for _ in range(3):
            stream.next().addBoth(seen.append)
        self.pump.flush()
        self.assertEqual(len(seen[0]), 3 * _native.FRAGMENT_SIZE)
        self.assertEqual(seen[1], 5)
        self.assertIn("after the items", str(seen[2].value))
        self.assertFalse(self.client.disconnected)
        self.flushLoggedErrors(ValueError)

    def test_writersToleratedAfterCancel(self) -> None:
        """Writers waiting on a Stream whose reader cancels get CancelledError."""
        stream = self.call("pushed")
        source = self.rootObject.stream
        waiting = [source.write(i) for i in range(40)]
        self.pump.flush()  # the reader takes its window's worth; later writers wait
        self.assertNoResult(waiting[-1])
        outcomes: list[Any] = []
        for writer in waiting:
            writer.addBoth(outcomes.append)
        stream.cancel()
        self.pump.flush()
        self.assertEqual(len(outcomes), len(waiting))
        self.assertTrue(outcomes[-1].check(CancelledError))

    def test_publisherAsDocumented(self) -> None:
        """The publisher of the docs (it drops closed streams and does not wait on its
        writes) logs nothing when a reader stops while writes wait for room, and forgets
        that reader."""
        stream = self.call("pushed")
        subscribers = [self.rootObject.stream]

        def publish(event: int) -> None:
            subscribers[:] = [s for s in subscribers if not s.closed]
            for subscriber in subscribers:
                subscriber.write(event).addErrback(lambda failure: None)

        for event in range(40):
            publish(event)
        read: list[Any] = []
        for _ in range(3):
            stream.next().addCallback(read.append)
        self.pump.flush()
        stream.cancel()
        self.pump.flush()
        publish(40)
        self.assertEqual((read, subscribers), ([0, 1, 2], []))
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_producerWritesFireWhenTheReaderCancels(self) -> None:
        """The writes a registered push producer made while the buffer was full fire when
        the reader cancels, as the producer is stopped: it never waits on them, and failed
        they would be logged as unhandled errors."""
        stream = self.call("pushed")
        source = self.rootObject.stream
        producer = RecordingProducer()
        events = producer.events
        source.registerProducer(producer, True)
        for i in range(40):
            source.write(i)  # as a producer writes: the Deferred ignored
        self.assertEqual(events, ["pause"])
        stream.cancel()
        self.pump.flush()
        self.assertEqual(events, ["pause", "stop"])
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_tinyMessageLimitFloored(self) -> None:
        """A hello announcing a tiny limit does not stop this side from answering."""
        self.server.sendCall(b"hello", {"messageSize": 1})
        self.pump.flush()
        self.assertEqual(self.client.peerMessageSize, MIN_MESSAGE_SIZE)
        self.assertEqual(self.call("echo", 1), 1)

    def test_smallMessageLimitsKept(self) -> None:
        """A limit as small as BrokerLimits allows is honoured by the sender: a larger call,
        or answer, fails with LimitExceeded and the connection stays; a smaller limit is
        refused when the limits are made."""
        for small in (MIN_MESSAGE_SIZE, 4096):
            limits = pb.BrokerLimits(messageSize=small)
            for serverLimits, clientLimits in ((limits, None), (None, limits)):
                _server, client, pump = connectedServerAndClient(
                    pb.PBServerFactory(NativeRoot(), limits=serverLimits),
                    pb.PBClientFactory(limits=clientLimits),
                )
                results: list[Any] = []
                client.remoteForName("root").callRemote("echo", b"x" * 10_000).addBoth(
                    results.append
                )
                client.remoteForName("root").callRemote("echo", 1).addBoth(results.append)
                pump.flush()
                self.assertTrue(results[0].check(LimitExceeded), results[0])
                self.assertIn(f"over the {small}-byte limit", results[0].getErrorMessage())
                self.assertEqual(results[1:], [1])
                self.assertFalse(client.disconnected)
        # An error too large is replaced by a short one that fits, however long its class
        # name: the caller learns how its call ended and the connection stays.
        longName = type("E" + "x" * 900, (Exception,), {})

        def failing() -> None:
            raise longName("x" * 5000)

        self.rootObject.remote_failing = failing  # type: ignore[attr-defined]
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject),
            pb.PBClientFactory(limits=pb.BrokerLimits(messageSize=MIN_MESSAGE_SIZE)),
        )
        results: list[Any] = []
        with capturedLogs():
            client.remoteForName("root").callRemote("failing").addBoth(results.append)
            pump.flush()
        self.flushLoggedErrors(longName)
        self.assertIn("an error too large to send", results[0].getErrorMessage())
        self.assertFalse(client.disconnected)
        with self.assertRaises(ValueError) as caught:
            pb.BrokerLimits(messageSize=MIN_MESSAGE_SIZE - 1)
        self.assertIn("at least 1024 (or None), not 1023", str(caught.exception))


class IteratingCursor(pb.Referenceable):
    """A Referenceable that is also an iterator over its rows."""

    def __init__(self) -> None:
        self.rows = iter(range(3))

    def __iter__(self) -> IteratingCursor:
        return self

    def __next__(self) -> int:
        return next(self.rows)

    def remote_fetch(self) -> int | None:
        return next(self.rows, None)


class IteratingPage(Cursor, pb.Copyable):
    """A Copyable that is also an iterator over its items."""

    def __init__(self) -> None:
        super().__init__([1, 2])


class RemoteIteratingPage(pb.RemoteCopy):
    pass


class UnreadStreamBytesTests(NativeTestCase):
    """
    What the peer's streams make this side hold unread is bounded in bytes
    (``BrokerLimits.streamBytes``), however large their items and however many streams.
    """

    serverOptions = {"limits": pb.BrokerLimits(streamBytes=1024 * 1024)}

    def setUp(self) -> None:
        super().setUp()
        self.kept: list[Any] = []
        self.rootObject.remote_keep = lambda *streams: self.kept.extend(streams)  # type: ignore[attr-defined]
        self.closed: list[int] = []

    def chunks(self, number: int, size: int) -> Iterator[bytes]:
        try:
            while True:
                yield bytes([number % 256]) * size
        finally:
            self.closed.append(number)

    def test_unreadStreamsAreBounded(self) -> None:
        """Streams of large items sent to a method that keeps them and never reads them:
        past streamBytes the streams holding the most unread fail with LimitExceeded and
        are stopped (their generators closed); the connection stays, and what the server
        holds stays under the limit plus one item."""
        table = self.server._streams
        limit = self.server.limits.streamBytes
        streams = [self.chunks(number, 300_000) for number in range(8)]
        self.assertIsNone(self.call("keep", *streams))
        for _ in range(100):
            self.pump.pump()
            self.assertLessEqual(table.unreadBytes, limit)
        self.assertEqual(len(self.kept), 8)
        failed = []
        for reader in self.kept:
            results: list[Any] = []
            for _ in range(reader.buffered + 1):  # its items, then its error (or a wait)
                reader.next().addBoth(results.append)
            if results and isinstance(results[-1], Failure):
                self.assertTrue(results[-1].check(LimitExceeded))
                self.assertIn("BrokerLimits.streamBytes", results[-1].getErrorMessage())
                failed.append(reader.streamID)
        self.assertTrue(failed)
        self.pump.flush()
        # The senders were stopped (the client numbers its streams from 1, in order).
        self.assertEqual(sorted(number + 1 for number in self.closed), sorted(failed))
        self.assertFalse(self.client.disconnected)
        self.assertEqual(self.call("echo", 3), 3)

    def test_creditByItemSize(self) -> None:
        """A stream's first credit is for two items; then credit goes by the size of its
        items: a reader that does not read holds at most about half of streamBytes of
        large items, and its window of small ones."""
        limit = self.server.limits.streamBytes
        self.assertIsNone(self.call("keep", self.chunks(0, 100_000)))
        self.pump.flush()
        (large,) = self.kept
        self.assertGreaterEqual(large.buffered, 2)  # one in flight while one is read
        self.assertLess(large.buffered, self.server.streamWindow)
        self.assertLessEqual(large.unreadBytes, limit // 2)
        self.assertEqual(self.closed, [])  # not failed: it stays under the limit
        self.assertIsNone(self.call("keep", iter(range(1000))))
        self.pump.flush()
        self.assertEqual(self.kept[1].buffered, self.server.streamWindow)

    def test_aLargeItemDoesNotSlowTheRest(self) -> None:
        """Credit goes by the items lately: after one large item, small ones soon get the
        whole window again."""

        def items() -> Iterator[Any]:
            yield b"x" * 400_000
            yield from range(1000)

        self.assertIsNone(self.call("keep", items()))
        self.pump.flush()
        (stream,) = self.kept
        for _ in range(60):
            self.successResultOf(stream.next())
            self.pump.flush()
        self.assertGreater(stream.buffered, self.server.streamWindow // 2)  # not one by one

    def test_slowReadersShareTheRoom(self) -> None:
        """Streams whose items are a sixteenth of streamBytes, not read yet: each gets
        credit from the room the others leave, and none fails."""
        streams = [self.chunks(number, 65_536 - 64) for number in range(4)]
        self.assertIsNone(self.call("keep", *streams))
        for _ in range(50):
            self.pump.pump()
        self.assertEqual(self.closed, [])
        self.assertTrue(all(reader.buffered >= 2 for reader in self.kept))
        self.assertLessEqual(self.server._streams.unreadBytes, self.server.limits.streamBytes)

    def test_aDroppedReaderLeavesTheTable(self) -> None:
        """A reader cancelled (or failed for the limit) no longer counts among those
        holding unread items."""
        self.assertIsNone(self.call("keep", self.chunks(0, 1000)))
        self.pump.flush()
        (reader,) = self.kept
        self.assertIn(reader, set(self.server._streams._holding or ()))
        reader.cancel()
        self.assertNotIn(reader, set(self.server._streams._holding or ()))
        self.assertEqual(self.server._streams.unreadBytes, 0)

    def test_readingFreesTheBytes(self) -> None:
        """What is read no longer counts; a reader collected unread no longer counts."""
        table = self.server._streams
        self.assertIsNone(self.call("keep", self.chunks(0, 100_000), self.chunks(1, 100_000)))
        self.pump.flush()
        held = table.unreadBytes
        self.assertGreater(held, 0)
        first, second = self.kept
        self.successResultOf(first.next())
        self.assertEqual(table.unreadBytes, held - 100_064)
        first.cancel()
        self.kept.remove(first)
        del first
        self.assertEqual(table.unreadBytes, second.unreadBytes)
        self.kept.clear()
        del second
        gc.collect()
        self.assertEqual(table.unreadBytes, 0)
        self.pump.flush()
        self.assertEqual(sorted(self.closed), [0, 1])

    def test_aStreamThatOutgrowsTheLimitItself(self) -> None:
        """An item that would take the unread bytes past streamBytes, on the stream that
        holds the most already, fails that very stream: the item is dropped with the rest."""

        def items() -> Iterator[bytes]:
            try:
                yield b"s" * 1000
                yield b"L" * (1024 * 1024)
                yield b"never"
            finally:
                self.closed.append(0)

        self.assertIsNone(self.call("keep", items()))
        self.pump.flush()
        (reader,) = self.kept
        failure = self.failureResultOf(reader.next(), LimitExceeded)
        self.assertEqual(
            failure.getErrorMessage(),
            "more than 1048576 bytes of stream items were received and not read "
            "(BrokerLimits.streamBytes): stream 1, which held 1067 of them, was dropped",
        )
        self.assertEqual((reader.buffered, self.server._streams.unreadBytes), (0, 0))
        self.assertEqual(self.closed, [0])
        self.assertFalse(self.client.disconnected)

    def test_aLargeItemInAListCounts(self) -> None:
        """An item that is a list of one large byte string (which arrives put together, not
        packed) counts at the size of its string: one past streamBytes fails its stream as
        a bare string does, and a smaller one is held at its size."""

        def items(size: int) -> Iterator[list[bytes]]:
            try:
                yield [b"s" * 1000]
                yield [b"L" * size]
                yield [b"never"]
            finally:
                self.closed.append(size)

        table = self.server._streams
        self.assertIsNone(self.call("keep", items(100_000)))
        self.pump.flush()
        (reader,) = self.kept
        # All held, each with 64 bytes besides: the small items packed (1,004 and 8 bytes),
        # the large one at the size of its string.
        self.assertEqual(reader.buffered, 3)
        self.assertEqual((reader.unreadBytes, table.unreadBytes), (1068 + 100_064 + 72,) * 2)
        self.assertEqual(self.successResultOf(reader.next()), [b"s" * 1000])
        self.assertTrue(self.successResultOf(reader.next()) == [b"L" * 100_000])
        self.assertEqual(table.unreadBytes, 72)
        self.assertEqual(self.successResultOf(reader.next()), [b"never"])
        self.assertEqual(table.unreadBytes, 0)
        reader.cancel()
        self.pump.flush()
        self.kept.clear()
        self.assertIsNone(self.call("keep", items(1024 * 1024)))
        self.pump.flush()
        (reader,) = self.kept
        failure = self.failureResultOf(reader.next(), LimitExceeded)
        self.assertIn("stream 2, which held 1068 of them, was dropped", failure.getErrorMessage())
        self.assertEqual((reader.buffered, table.unreadBytes), (0, 0))
        self.assertEqual(self.closed, [100_000, 1024 * 1024])
        self.assertFalse(self.client.disconnected)

    def test_anEndedStreamHoldingTheMost(self) -> None:
        """A stream that has ended but whose items are unread is the one dropped when it
        holds the most: reading it then fails with LimitExceeded, the other keeps its item."""

        def once() -> Iterator[bytes]:
            yield b"a" * 600_000

        later = Stream()
        self.assertIsNone(self.call("keep", once(), later))
        self.pump.flush()
        ended, open = self.kept
        self.assertEqual((ended.buffered, repr(ended)), (1, "<RemoteStream 1 ended>"))
        later.write(b"b" * 600_000)
        self.pump.flush()
        failure = self.failureResultOf(ended.next(), LimitExceeded)
        self.assertIn("stream 1, which held 600064 of them", failure.getErrorMessage())
        self.assertEqual(repr(ended), "<RemoteStream 1 failed>")
        self.assertEqual(self.successResultOf(open.next()), b"b" * 600_000)

    def test_aSourceThatFailsToClose(self) -> None:
        """A generator that raises as it is closed (its reader cancelled) is logged; the
        stream is gone all the same and the connection stays."""

        def items() -> Iterator[int]:
            try:
                yield from range(100)
            finally:
                raise RuntimeError("cannot close")

        self.assertIsNone(self.call("keep", items()))
        self.pump.flush()
        with capturedLogs() as events:
            self.kept[0].cancel()
            self.pump.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn(
            "Error closing the source of a cancelled stream",
            [event.get("log_format") for event in events],
        )
        self.assertEqual(self.client._streams.outgoing, {})
        self.assertEqual(self.call("echo", 3), 3)

    def test_aCancelledReadLosesNoItem(self) -> None:
        """A read cancelled while it waits fails with CancelledError and no longer holds the
        reader; the item that comes next goes to the next read, the stream still open."""
        later = Stream()
        self.assertIsNone(self.call("keep", later))
        self.pump.flush()
        (reader,) = self.kept
        first, second = reader.next(), reader.next()
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertIn(reader.streamID, self.server._streams._waitedOn)  # second still waits
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertNotIn(reader.streamID, self.server._streams._waitedOn)
        later.write(1)
        self.pump.flush()
        self.assertEqual((reader.buffered, repr(reader)), (1, "<RemoteStream 1 open>"))
        self.assertEqual(self.successResultOf(reader.next()), 1)

    def test_limitChecked(self) -> None:
        """streamBytes is a count, at least 1."""
        self.assertRaises(ValueError, pb.BrokerLimits, streamBytes=0)
        self.assertRaises(TypeError, pb.BrokerLimits, streamBytes=1.5)


class SenderLimitTests(NativeTestCase):
    """
    What a side sends is bounded by what the peer accepts, not by what this side accepts:
    values that go through jelly (copies, errors) as well as plain ones.
    """

    clientOptions = {"limits": pb.BrokerLimits(messageSize=256 * 1024)}

    def test_jelliedLargerThanOwnLimit(self) -> None:
        """A jellied value (here nested too deep for msgpack's extensions) larger than the
        sender's own limit, within the peer's, is sent."""
        value: Any = b"x" * 512 * 1024
        for _ in range(_native.EXTENSION_DEPTH + 2):
            value = (value,)
        self.rootObject.remote_keep = self.rootObject.received.append  # type: ignore[attr-defined]
        self.assertIsNone(self.call("keep", value))
        self.assertEqual(self.rootObject.received, [value])

    def test_failedStreamTellsItsWriter(self) -> None:
        """A pushed stream that fails on the sending side (an item over the peer's limit) is
        not taken as cancelled by its reader: the writer's next write says why it failed."""
        stream = self.call("pushed")
        self.assertIsInstance(stream, RemoteStream)
        source = self.rootObject.stream
        source.write(b"x" * 300 * 1024)
        items: list[Any] = []
        stream.collect().addBoth(items.append)
        self.settle(items)
        self.flushLoggedErrors(LimitExceeded)
        self.assertIsInstance(items[0], Failure)
        self.assertFalse(source.cancelled)
        with self.assertRaises(ValueError) as caught:
            source.write(b"more")
        self.assertIn("write() on a stream that failed", str(caught.exception))
        self.assertIn("limit", str(caught.exception))


class RefusedStreamTests(NativeTestCase):
    """
    A :class:`Stream` the broker refuses to send (over the limit of streams, or to a peer
    that cannot take streams) is closed with why: it will never be read, and a publisher
    that keeps its streams forgets it (``closed``) rather than buffer for it without end.
    """

    serverOptions = {"limits": pb.BrokerLimits(pendingCalls=1)}

    def assertRefused(self, stream: Stream, error: type[Exception]) -> None:
        self.assertTrue(stream.closed)
        self.assertFalse(stream.cancelled)
        with self.assertRaises(ValueError) as caught:
            stream.write(1)
        self.assertIn("write() on a stream that failed", str(caught.exception))
        self.flushLoggedErrors(error)

    def test_overTheLimitOfStreams(self) -> None:
        first = self.call("pushed")
        self.assertIsInstance(first, RemoteStream)
        kept = self.rootObject.stream
        refused = self.call("pushed")
        self.assertIn("streams are being sent", refused.getErrorMessage())
        self.assertRefused(self.rootObject.stream, LimitExceeded)
        self.assertFalse(kept.closed)  # the one being sent goes on

    def test_toAPeerThatCannotTakeStreams(self) -> None:
        root = NativeRoot()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(root), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("pushed").addBoth(results.append)
        pump.flush()
        self.assertIn("stream", results[0].getErrorMessage())
        self.assertRefused(root.stream, UnsupportedByPeer)
        mine = Stream()
        with self.assertRaises(UnsupportedByPeer):
            client.remoteForName("root").callRemote("sum", mine, pbanswer=False)
        self.assertRefused(mine, UnsupportedByPeer)

    def test_inACopyOfAValueRefusedOnAPBConnection(self) -> None:
        """On a pb connection a Stream in a copy is closed when a later part of the value
        fails, as it is when the value is sent (it would travel as an Unpersistable)."""

        class Failing(pb.Copyable):
            def getStateToCopy(self) -> Any:
                raise ZeroDivisionError()

        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(dialects=[b"pb"])
        )
        inCall, inAnswer = Thing(), Thing()
        inCall.stream, inAnswer.stream = Stream(), Stream()  # type: ignore[attr-defined]
        results: list[Any] = []
        client.remoteForName("root").callRemote("sum", inCall, Failing()).addBoth(results.append)
        pump.flush()
        self.assertTrue(results[0].check(ZeroDivisionError))
        self.assertRefused(inCall.stream, ZeroDivisionError)  # type: ignore[attr-defined]
        with self.assertRaises(ZeroDivisionError):
            server.serialize([inAnswer, Failing()])
        self.assertRefused(inAnswer.stream, ZeroDivisionError)  # type: ignore[attr-defined]

    def test_aStreamBeingSentIsLeftAlone(self) -> None:
        """A refusal does not close a Stream that is being sent already (asked for again,
        by a pb-dialect peer, or inside a copy): its reader gets every item."""
        shared = Stream()
        thing = Thing()
        thing.stream = shared  # type: ignore[attr-defined]
        self.rootObject.remote_shared = lambda: shared  # type: ignore[attr-defined]
        self.rootObject.remote_sharedInACopy = lambda: thing  # type: ignore[attr-defined]
        reader = self.call("shared")
        self.assertIsInstance(reader, RemoteStream)
        self.assertTrue(self.call("shared").check(ValueError))  # already being sent
        self.assertTrue(self.call("sharedInACopy").check(JellyError))
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("shared").addBoth(results.append)
        pump.flush()
        self.assertIn("stream", results[0].getErrorMessage())
        self.assertFalse(shared.closed)
        for item in range(5):
            shared.write(item)
        shared.finish()
        items: list[Any] = []
        reader.collect().addBoth(items.append)
        self.settle(items)
        self.assertEqual(items, [[0, 1, 2, 3, 4]])
        self.flushLoggedErrors(JellyError, ValueError, UnsupportedByPeer)

    def test_aStreamReadHereIsLeftAlone(self) -> None:
        """Nor a Stream this side reads (async for) when it is refused, busy with an item
        or waiting for the next: its reader gets every item and the end."""
        shared = Stream()
        self.rootObject.remote_shared = lambda: shared  # type: ignore[attr-defined]
        got: list[Any] = []
        busy: Deferred[None] = Deferred()

        async def read() -> None:
            async for item in shared:
                got.append(item)
                if item == 0:
                    await busy  # busy with an item, not waiting for the next, when refused

        shared.write(0)
        reading = Deferred.fromCoroutine(read())
        self.assertEqual((got, shared._readers), ([0], deque()))
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject), pb.PBClientFactory(dialects=[b"pb"])
        )
        client.remoteForName("root").callRemote("shared").addErrback(lambda _: None)
        pump.flush()
        self.assertFalse(shared.closed)
        busy.callback(None)
        shared.write(1)
        shared.write(2)
        shared.finish()
        self.successResultOf(reading)
        self.assertEqual(got, [0, 1, 2])
        self.flushLoggedErrors(UnsupportedByPeer)

    def test_insideACopy(self) -> None:
        stream = Stream()
        thing = Thing()
        thing.stream = stream  # type: ignore[attr-defined]
        failure = self.call("echo", thing)
        self.assertTrue(failure.check(JellyError))
        self.assertRefused(stream, JellyError)

    def test_everyStreamOfARefusedAnswer(self) -> None:
        """All the Streams of an answer refused for its second are closed with why: the
        first, which was being sent, and the third, which packing never reached."""
        streams = [Stream(), Stream(), Stream()]
        self.rootObject.remote_three = lambda: streams  # type: ignore[attr-defined]
        failure = self.call("three")
        self.assertIn("streams are being sent", failure.getErrorMessage())
        for stream in streams:
            self.assertRefused(stream, LimitExceeded)
        self.assertEqual(self.server._streams.outgoing, {})

    def test_streamsAroundARefusedPart(self) -> None:
        """A call whose arguments fail half-way (a copy's hook raises) closes with that
        error each Stream in them, before and after the part refused, at any depth."""
        streams = [Stream(), Stream(), Stream()]
        failing = Thing()
        failing.getStateToCopy = lambda: 1 / 0  # type: ignore[method-assign]
        failure = self.call("echo", [streams[0], failing, {"later": (streams[1],)}], streams[2])
        self.assertTrue(failure.check(ZeroDivisionError))
        for stream in streams:
            self.assertRefused(stream, ZeroDivisionError)
        self.assertEqual(self.client._streams.outgoing, {})

    def test_streamsOfAValueOverTheLimit(self) -> None:
        """A value refused for its size before any of it is packed closes its Streams."""
        self.client.peerMessageSize = 1024 * 1024
        stream = Stream()
        failure = self.call("echo", [b"x" * (2 * 1024 * 1024), [stream]])
        self.assertTrue(failure.check(LimitExceeded))
        self.assertRefused(stream, LimitExceeded)

    def test_answerWithABadReply(self) -> None:
        """An answer not sent because of its method's reply annotations closes the Streams
        in it with that error."""
        stream = Stream()

        def badReply() -> list[Stream]:
            pbContext().reply["bad"] = object()
            return [stream]

        self.rootObject.remote_badReply = badReply  # type: ignore[attr-defined]
        with capturedLogs():
            failure = self.call("badReply", target=self.root.withOptions(context={}, reply={}))
        self.assertIn("reply['bad'] is of type object", failure.getErrorMessage())
        self.assertRefused(stream, TypeError)
        self.assertEqual(self.server._streams.outgoing, {})

    def test_findStreams(self) -> None:
        """The search for a refused value's Streams looks into each container once, so a
        value of shared parts costs its distinct containers, and at most its budget."""
        stream = Stream()
        shared: Any = [stream, {"k": (1, frozenset({2}))}]
        for _ in range(100):
            shared = [shared, shared]
        self.assertEqual(_streams.findStreams([shared]), [stream])
        self.assertEqual(_streams.findStreams([[*range(10), stream]], budget=5), [])
        self.assertEqual(_streams.findStreams([[*range(10), stream]], budget=12), [stream])

    def test_nestedInAValueToAPbPeer(self) -> None:
        """To a pb-dialect peer a Stream inside a list travels as an Unpersistable, as stock
        PB sends what it cannot copy; it will never be read, so it is closed with why."""
        root = NativeRoot()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(root), pb.PBClientFactory(dialects=[b"pb"])
        )
        answered = Stream()
        root.remote_nested = lambda: [answered]  # type: ignore[attr-defined]
        results: list[Any] = []
        client.remoteForName("root").callRemote("nested").addBoth(results.append)
        argument = Stream()
        client.remoteForName("root").callRemote("echo", {"s": argument}).addBoth(results.append)
        pump.flush()
        self.assertEqual(
            [type(results[0][0]).__name__, type(results[1]["s"]).__name__],
            ["Unpersistable", "Unpersistable"],
        )
        self.assertRefused(answered, UnsupportedByPeer)
        self.assertRefused(argument, UnsupportedByPeer)


@implementer(IPushProducer)
class FailingProducer(RecordingProducer):
    """A push producer whose stopProducing raises."""

    def stopProducing(self) -> None:
        super().stopProducing()
        raise RuntimeError("stopProducing failed")


class RefusedStreamEdgeTests(NativeTestCase):
    """
    Closing the Streams of a value not sent, at its edges: the application's code that
    closing runs, values that fail oddly, the order of the search.
    """

    def pbClient(self) -> tuple[Any, iosim.IOPump]:
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot()), pb.PBClientFactory(dialects=[b"pb"])
        )
        return client.remoteForName("root"), pump

    def test_producerThatRaises(self) -> None:
        """A call refused half-way fails its Deferred (callRemote does not raise), and a
        pb call holding a Stream in a list is still sent, when closing a Stream runs a
        producer whose stopProducing raises; that is logged."""
        stream = Stream()
        stream.registerProducer(FailingProducer(), True)
        failing = Thing()
        failing.getStateToCopy = lambda: 1 / 0  # type: ignore[method-assign]
        failure = self.failureResultOf(self.root.callRemote("echo", [failing, stream]))
        self.assertTrue(failure.check(ZeroDivisionError))
        stream = Stream()
        stream.registerProducer(FailingProducer(), True)
        root, pump = self.pbClient()
        results: list[Any] = []
        root.callRemote("echo", [stream, 1]).addBoth(results.append)
        pump.flush()
        self.assertEqual(type(results[0][0]).__name__, "Unpersistable")
        self.assertTrue(stream.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_deadProxy(self) -> None:
        """The search for Streams runs none of the value's code: a dead weak proxy in
        refused arguments fails the call's Deferred, as before."""

        class Gone:
            pass

        gone = Gone()
        proxy = weakref.proxy(gone)
        del gone
        self.failureResultOf(self.root.callRemote("echo", [proxy]))

    def test_writerChangesTheValueBeingJellied(self) -> None:
        """A publisher that forgets a stream when a write fails (its errback removes it
        from its list) while that list is jellied for a pb peer: the Streams are closed
        once the value is jellied, so the message stays well-formed and later calls are
        answered."""
        root, pump = self.pbClient()
        subscribers: list[Any] = []
        for _ in range(2):
            stream = Stream(bufferSize=2)
            stream.write("first")
            stream.write("waiting").addErrback(lambda _, s=stream: subscribers.remove(s))
            subscribers.append(stream)
        results: list[Any] = []
        root.callRemote("echo", subscribers).addBoth(results.append)
        pump.flush()
        root.callRemote("echo", 5).addBoth(results.append)
        pump.flush()
        self.assertEqual([len(results[0]), results[1]], [2, 5])
        self.assertEqual(subscribers, [])

    def test_callMadeWhileClosing(self) -> None:
        """A call the closing makes (a write's errback) goes after the call carrying the
        Stream, with its own request id."""
        root, pump = self.pbClient()
        other: list[Any] = []
        stream = Stream(bufferSize=2)
        stream.write("first")
        stream.write("waiting").addErrback(
            lambda _: root.callRemote("echo", 7).addBoth(other.append)
        )
        results: list[Any] = []
        root.callRemote("echo", [stream, "x"]).addBoth(results.append)
        pump.flush()
        self.assertEqual(other, [7])
        self.assertEqual([type(results[0][0]).__name__, results[0][1]], ["Unpersistable", "x"])
        self.assertTrue(stream.closed)

    def test_streamInAnItemOverTheLimit(self) -> None:
        """A Stream inside a stream's item that packs but whose message is over the peer's
        limit is closed with why (as an answer's are), not taken as cancelled."""
        reader = self.call("pushed")
        self.assertIsInstance(reader, RemoteStream)
        self.server.peerMessageSize = limit = 1024 * 1024  # (the pack's own bound stays)
        inner = Stream()
        self.rootObject.stream.write([inner, b"x" * (limit - 8)])
        items: list[Any] = []
        reader.collect().addBoth(items.append)
        self.settle(items)
        self.flushLoggedErrors(LimitExceeded)
        self.assertTrue(inner.closed)
        self.assertFalse(inner.cancelled)

    def test_callOnALostConnection(self) -> None:
        """A call through a broker already disconnected closes the Streams in it with
        DeadReferenceError: they will never be sent."""
        self.client.connectionLost(Failure(ConnectionDone()))
        stream = Stream()
        with self.assertRaises(pb.DeadReferenceError):
            self.root.callRemote("echo", [stream])
        self.assertTrue(stream.closed)
        self.assertFalse(stream.cancelled)

    def test_interruptedWhileSerializing(self) -> None:
        """A KeyboardInterrupt while a call's arguments are serialised goes on up, and the
        stream the arguments registered before it is forgotten and closed."""
        interrupting = Thing()

        def interrupt() -> None:
            raise KeyboardInterrupt()

        interrupting.getStateToCopy = interrupt  # type: ignore[method-assign]
        closed: list[bool] = []
        generator = closingSource(closed)
        next(generator)  # started, so that closing it runs its finally
        with self.assertRaises(KeyboardInterrupt):
            self.root.callRemote("echo", [generator, interrupting])
        self.assertEqual(self.client._streams.outgoing, {})
        self.assertEqual(closed, [True])

    def test_unclosedStreams(self) -> None:
        """The Streams not closed are known, so a refused value is searched only while
        some exist."""
        from pbroker.stream import unclosedStreams

        finished, failed, cancelled = Stream(), Stream(), Stream()
        self.assertTrue({finished, failed, cancelled} <= set(unclosedStreams.values()))
        finished.finish()
        failed.fail(ValueError())
        cancelled.close()
        self.assertFalse({finished, failed, cancelled} & set(unclosedStreams.values()))

    def test_unhashableStream(self) -> None:
        """A Stream of a class that defines __eq__ (and so is unhashable) is made and closed
        as any other: the Streams not closed are known by id, not by hash."""
        from pbroker.stream import unclosedStreams

        class Compared(Stream):
            def __eq__(self, other: object) -> bool:
                return self is other

        stream = Compared()
        self.assertIs(unclosedStreams[id(stream)], stream)
        stream.close()
        self.assertNotIn(id(stream), unclosedStreams)

    def test_firstItemsSearched(self) -> None:
        """The search looks at a value's first items, in order: a Stream first in a call's
        arguments is closed when a later argument makes the call too large."""
        stream = Stream()
        self.assertEqual(_streams.findStreams([[stream], list(range(10))], budget=5), [stream])
        self.client.peerMessageSize = 1024 * 1024
        self.client._setItemLimit()  # as a peer that takes 1 MiB messages would have it
        failure = self.call("echo", [[stream], list(range(2_000_000))])
        self.assertTrue(failure.check(LimitExceeded))
        self.assertTrue(stream.closed)
        self.assertFalse(stream.cancelled)


class ServerLimitTests(NativeTestCase):
    serverOptions = {"limits": pb.BrokerLimits(messageSize=256 * 1024)}

    def test_errorLargerThanOwnLimit(self) -> None:
        """An error larger than the sender's own limit, within the peer's, is sent."""

        def fail() -> None:
            raise ValueError("e" * 512 * 1024)

        self.rootObject.remote_fail = fail  # type: ignore[attr-defined]
        failure = self.call("fail")
        self.flushLoggedErrors(ValueError)
        self.assertTrue(failure.check(ValueError), failure.getErrorMessage()[:200])
        self.assertTrue(failure.getErrorMessage() == "e" * 512 * 1024)


class FlavouredIteratorTests(NativeTestCase):
    """
    A PB flavour that happens to be an iterator is sent as what its flavour says, in either
    dialect, as stock PB sends it: a stream is only what has no other form.
    """

    def setUp(self) -> None:
        super().setUp()
        self.registry.setUnjellyableForClass(IteratingPage, RemoteIteratingPage)
        self.rootObject.remote_cursor = IteratingCursor  # type: ignore[attr-defined]
        self.rootObject.remote_page = IteratingPage  # type: ignore[attr-defined]

    def test_referenceable(self) -> None:
        """An iterating Referenceable arrives as a RemoteReference that can be called."""
        cursor = self.call("cursor")
        self.assertIsInstance(cursor, pb.RemoteReference)
        self.assertEqual(self.call("fetch", target=cursor), 0)

    def test_copyable(self) -> None:
        """An iterating Copyable arrives as its copy."""
        page = self.call("page")
        self.assertIsInstance(page, RemoteIteratingPage)
        self.assertEqual(page.rows, [1, 2])

    def test_asArgument(self) -> None:
        """As an argument too: the server gets a reference, not a stream, and the reference
        it sends back is the caller's own object."""
        cursor = IteratingCursor()
        self.assertIs(self.call("echo", cursor), cursor)


class FlavouredIteratorPBDialectTests(FlavouredIteratorTests):
    clientOptions = {"dialects": [b"pb"]}

    def test_pbDialect(self) -> None:
        self.assertEqual(self.client.currentDialect, b"pb")

    def test_allowedIteratorCopied(self) -> None:
        """An iterator of a class of its own that the security options allow is copied in
        the pb dialect, as stock PB copies it (the native dialect sends it as a stream)."""
        security = jelly.SecurityOptions()
        security.allowInstancesOf(Cursor)
        self.client.security = self.server.security = security
        copied = self.call("echo", Cursor([1, 0]))
        self.assertIsInstance(copied, Cursor)
        self.assertEqual(list(copied), [1, 0])


class ArgumentCheckTests(SynchronousTestCase):
    """
    The constructors and methods of the native features refuse wrong types at once, with a
    message naming the argument, not later with a comparison error from deep inside.
    """

    def assertRefused(self, error: type[Exception], text: str, call: Callable[[], Any]) -> None:
        with self.assertRaises(error) as caught:
            call()
        self.assertIn(text, str(caught.exception))

    def test_limits(self) -> None:
        self.assertRefused(
            TypeError,
            "messageSize must be an integer (or None), not '1'",
            lambda: pb.BrokerLimits(messageSize="1"),  # type: ignore[arg-type]
        )
        self.assertRefused(
            TypeError,
            "messageSize must be an integer (or None), not True",
            lambda: pb.BrokerLimits(messageSize=True),
        )
        self.assertRefused(
            TypeError,
            "pendingCalls must be an integer, not None",
            lambda: pb.BrokerLimits(pendingCalls=None),  # type: ignore[arg-type]
        )
        for factory in (pb.PBClientFactory, lambda **kw: pb.PBServerFactory(pb.Root(), **kw)):
            self.assertRefused(
                TypeError, "limits must be a BrokerLimits", partial(factory, limits={})
            )

    def test_integersOfOtherTypes(self) -> None:
        """Counts may be any integer (an IntEnum here, a numpy integer), not a bool; seconds
        any real number, a float subclass too."""

        class Size(enum.IntEnum):
            SMALL = 5

        class Seconds(float):
            pass

        class Index:
            """An integer of another library (a numpy integer): it has __index__ only."""

            def __index__(self) -> int:
                return 5

        for count in (Size.SMALL, Index()):
            limits = pb.BrokerLimits(pendingCalls=count, bufferedBytes=count)  # type: ignore[arg-type]
            # Stored as ints: they go on to the wire and to checks that take ints only.
            self.assertIs(type(limits.pendingCalls), int)
            self.assertIs(type(limits.bufferedBytes), int)
            stream = Stream(bufferSize=count)  # type: ignore[arg-type]
            self.assertIs(type(stream.bufferSize), int)

        class Mebibyte:
            def __index__(self) -> int:
                return 1 << 20

        limits = pb.BrokerLimits(messageSize=Mebibyte(), nestingDepth=Index())  # type: ignore[arg-type]
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(NativeRoot(), limits=limits), pb.PBClientFactory(limits=limits)
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("echo", [1]).addBoth(results.append)
        pump.flush()
        self.assertEqual(results, [[1]])
        keepalive = pb.Keepalive(interval=Seconds(1), timeout=fractions.Fraction(3))
        self.assertEqual((keepalive.interval, keepalive.timeout), (1.0, 3.0))
        self.assertIs(type(keepalive.timeout), float)
        stall = pb.BrokerLimits(stallTimeout=fractions.Fraction(1, 2)).stallTimeout
        self.assertEqual((stall, type(stall)), (0.5, float))
        refused = partial(pb.BrokerLimits, pendingCalls=True)
        self.assertRefused(TypeError, "pendingCalls must be an integer", refused)

    def test_callOptionsReply(self) -> None:
        """A reply that is not a dict to fill is refused when the options are made, naming
        its type; a dict is taken as it is."""
        self.assertRefused(
            TypeError,
            "reply must be a dict to fill, not list",
            partial(context.CallOptions, reply=[]),
        )
        reply: dict[str, Any] = {}
        self.assertIs(context.CallOptions(reply=reply).reply, reply)

    def test_callOptionsOrdered(self) -> None:
        """``ordered`` must be True or False (a truthy value is not taken for True); calls
        are ordered by default."""
        for value in (1, "no", None):
            self.assertRefused(
                TypeError,
                f"ordered must be True or False, not {value!r}",
                partial(context.CallOptions, ordered=value),
            )
        self.assertTrue(context.CallOptions().ordered)
        self.assertFalse(context.CallOptions(ordered=False).ordered)

    def test_secondsTooLargeForAFloat(self) -> None:
        """A number of seconds too large for a float waits for ever, as infinity does,
        rather than failing with OverflowError."""
        from pbroker.reconnect import ReconnectingClient

        huge = 10**400
        inf = float("inf")
        self.assertEqual(pb.Keepalive(interval=1, timeout=huge).timeout, inf)
        self.assertEqual(pb.BrokerLimits(stallTimeout=huge).stallTimeout, inf)
        self.assertEqual(context.CallOptions(timeout=huge).timeout, inf)
        client = ReconnectingClient("tcp:127.0.0.1:1", attemptTimeout=huge, reactor=Clock())
        self.assertEqual(client.attemptTimeout, inf)
        self.assertRefused(ValueError, "must be positive", partial(pb.Keepalive, 1, -huge))
        hugest = 10**5000  # too long for str(): the message must not try
        self.assertRefused(
            ValueError, "a timeout must be positive", partial(context.CallOptions, -hugest)
        )
        refused = partial(ReconnectingClient, "tcp:127.0.0.1:1", attemptTimeout=-hugest)
        self.assertRefused(ValueError, "attemptTimeout must be above 0", refused)
        refused = partial(ReconnectingClient, "tcp:127.0.0.1:1", maxRetries=-hugest)
        self.assertRefused(ValueError, "maxRetries must be at least 1", refused)
        self.assertRefused(ValueError, "bufferSize must be at least 1", partial(Stream, -hugest))
        refused = partial(context.CallOptions, context={"k": hugest})
        self.assertRefused(ValueError, "an integer beyond 64 bits", refused)
        from pbroker import banana, passwords

        for refused, text in (
            (partial(banana.Decoder, sizeLimit=-hugest), "sizeLimit must be at least 1"),
            (partial(banana.Decoder, messageSizeLimit=-hugest), "messageSizeLimit must be"),
            (partial(banana.setPrefixLimit, -hugest), "the prefix limit must be"),
            (partial(banana.int2b128, -hugest, list.append), "a banana prefix is"),
            (partial(passwords._checkIterations, hugest), "iterations must be"),
        ):
            self.assertRefused(ValueError, text, refused)

    def test_stream(self) -> None:
        self.assertRefused(
            TypeError,
            "bufferSize must be an integer, not 'a'",
            lambda: Stream(bufferSize="a"),  # type: ignore[arg-type]
        )
        self.assertRefused(
            TypeError,
            "fails with an exception or a Failure, not 'str'",
            lambda: Stream().fail("str"),  # type: ignore[arg-type]
        )
        for notAProducer in (object(), None):
            self.assertRefused(
                TypeError,
                "a Stream takes a push producer (with pauseProducing, resumeProducing and "
                f"stopProducing), not {type(notAProducer).__name__}",
                partial(Stream().registerProducer, notAProducer, True),
            )

    def test_reconnectingClient(self) -> None:
        from pbroker.reconnect import ReconnectingClient

        endpoint = "tcp:127.0.0.1:1"
        clock = Clock()
        for kw, error, text in (
            ({"maxRetries": "3"}, TypeError, "maxRetries must be an integer (or None), not '3'"),
            ({"attemptTimeout": "5"}, TypeError, "attemptTimeout must be a number of seconds"),
            ({"onConnect": 5}, TypeError, "onConnect must be callable (or None), not 5"),
            ({"retryPolicy": 5}, TypeError, "retryPolicy must be callable (or None), not 5"),
            # Credentials and a factory that no attempt could ever use: refused now, rather
            # than retried for ever.
            ({"credentials": "alice"}, TypeError, "credentials must be UsernamePassword"),
            ({"credentials": ("alice", b"pw")}, TypeError, "credentials must be Username"),
            (
                {"credentials": UsernamePassword(b"alice", None)},
                TypeError,
                "the credentials' password must be bytes or str, not NoneType",
            ),
            (
                {"factory": pb.PBServerFactory(pb.Root())},
                TypeError,
                "factory must be a pb.PBClientFactory (or None)",
            ),
        ):
            self.assertRefused(
                error, text, partial(ReconnectingClient, endpoint, reactor=clock, **kw)
            )
        self.assertRefused(
            TypeError,
            "reactor must be a reactor (with callLater and seconds), not 'x'",
            lambda: ReconnectingClient(endpoint, reactor="x"),
        )
        # A password property is not read until a login needs it.
        asked: list[str] = []

        class Asking:
            username = b"alice"

            @property
            def password(self) -> bytes:
                asked.append("password")
                return b"pw"

        ReconnectingClient(endpoint, Asking(), reactor=clock)  # as stock's login takes it

        class Proxy:
            # Credentials whose fields come from __getattr__ (a proxy, a config wrapper).
            def __getattr__(self, name: str) -> bytes:
                if name in ("username", "password"):
                    asked.append(name)
                    return b"x"
                raise AttributeError(name)

        ReconnectingClient(endpoint, Proxy(), reactor=clock)
        ReconnectingClient(endpoint, implementer(IUsernamePassword)(Asking)(), reactor=clock)
        self.assertRefused(
            TypeError,
            "credentials must be UsernamePassword(...), Anonymous() or pb.CertificateLogin(), "
            "not a type",
            lambda: ReconnectingClient(endpoint, Asking, reactor=clock),
        )
        self.assertEqual(asked, [])
        self.assertRefused(
            TypeError,
            "endpoint must be an endpoint string such as 'tcp:host:8789'",
            lambda: ReconnectingClient(42, reactor=clock),  # type: ignore[arg-type]
        )


def sharedLists(depth: int) -> list[Any]:
    """
    ``depth`` lists, each holding the next one twice: 2 ** depth appearances of the last,
    in a few hundred bytes of memory.
    """
    value: list[Any] = [1]
    for _ in range(depth):
        value = [value, value]
    return value


def shapeOf(value: Any) -> list[int]:
    """
    For each level of ``sharedLists``: whether its two items are the same list (1) or equal
    copies (2); walked level by level, never whole.
    """
    shape = []
    while len(value) == 2:
        shape.append(1 if value[0] is value[1] else 2)
        value = value[0]
    return shape


class SharedPartsTests(NativeTestCase):
    """
    Values whose lists share their parts: packed once per appearance, they are counted
    before they are packed, so that a small value cannot stand for more than a message may
    hold (see pbroker._native.extent).
    """

    clientOptions = {"limits": pb.BrokerLimits(messageSize=4096)}

    def setUp(self) -> None:
        super().setUp()
        self.rootObject.remote_shared = sharedLists  # type: ignore[attr-defined]
        self.rootObject.remote_second = lambda pair: pair[1]  # type: ignore[attr-defined]

    def test_refusedBeforePacking(self) -> None:
        """An answer that would be packed in more items than the caller takes bytes fails
        with LimitExceeded saying so, counted before anything is packed; the connection
        stays, and one within the limit travels (a copy per appearance)."""
        with capturedLogs():
            failure = self.call("shared", 12)
        self.assertTrue(failure.check(LimitExceeded))
        self.assertIn(
            "a value of more than 4096 items is over the 4096-byte limit of a message to the peer",
            failure.getErrorMessage(),
        )
        self.assertEqual(shapeOf(self.call("shared", 5)), [2] * 5)
        self.assertFalse(self.server.disconnected)

    def test_refusedWithoutWalkingItAll(self) -> None:
        """Lists sharing their parts 100 levels deep (2 ** 100 appearances) are refused at
        once: each is counted once, the count of one seen before added, not walked again."""
        with capturedLogs():
            failure = self.call("shared", 100)
        self.assertTrue(failure.check(LimitExceeded))
        self.assertEqual(self.call("echo", 3), 3)

    def test_sharedValueFromThePeer(self) -> None:
        """A peer can send a value whose lists share their parts, jellied (here, as a cycle
        comes first in it, which makes the sender jelly it whole): a method that returns part
        of it has its answer refused, not packed without end; the connection stays."""
        cycle: list[Any] = []
        cycle.append(cycle)
        with capturedLogs():
            failure = self.call("second", [cycle, sharedLists(60)])
        self.assertTrue(failure.check(LimitExceeded))
        self.assertEqual(self.call("echo", 3), 3)

    def test_sharedStringRefused(self) -> None:
        """Lists that share their parts and hold a long string stand for as many copies of it
        as appearances: a few thousand items, but the string's length each time. The answer
        is refused before msgpack packs any of it (it packed 100 MB here, and with 20 levels
        more than memory holds); the connection stays."""
        packed: list[Any] = []
        codec = self.server._codec
        self.patch(codec, "_plainPacker", RecordingPacker(codec._plainPacker, packed))
        cycle: list[Any] = []
        cycle.append(cycle)
        shared: list[Any] = ["x" * 100_000]
        for _ in range(10):  # 3,071 items: within the 4,096 the client takes
            shared = [shared, shared]
        with capturedLogs():
            failure = self.call("second", [cycle, shared])
        self.assertTrue(failure.check(LimitExceeded))
        self.assertEqual([value for value in packed if type(value) is list], [])
        self.assertEqual(self.call("echo", 3), 3)

    def test_sharedCopyRefused(self) -> None:
        """A copy that appears many times (lists sharing their parts) is jellied each time, its
        whole state: a copy the peer sent, of a class both sides copy, and a method that returns
        it. The jellied states count against the limit as they are made: the answer is refused
        after a few of them (it took 100 MB here, and without end at 20 levels)."""
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Mirrored, Mirrored)
        self.registry.setUnjellyableForClass(Mirrored, Mirrored)
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock, registry=registry),
            pb.PBClientFactory(
                registry=self.registry,
                clock=self.clock,
                limits=pb.BrokerLimits(messageSize=4096),
            ),
            clock=self.clock,
        )
        jellied: list[type] = []
        jelly = server._codec._jelly
        server._codec._jelly = lambda value: jellied.append(type(value)) or jelly(value)
        cycle: list[Any] = []
        cycle.append(cycle)
        shared: list[Any] = [Mirrored("x" * 100_000)]
        for _ in range(10):  # 3,071 items: within the 4,096 the client takes
            shared = [shared, shared]
        results: list[Any] = []
        client.remoteForName("root").callRemote("second", [cycle, shared]).addBoth(results.append)
        with capturedLogs():
            for _ in range(10_000):
                if results:
                    break
                pump.pump()
        self.assertTrue(results[0].check(LimitExceeded), results[0])
        self.assertEqual(jellied.count(Mirrored), 2)  # the first is not counted: one more

    def test_cycleJellied(self) -> None:
        """A value whose lists hold themselves is jellied at once, keeping its shape, rather
        than packed round the cycle until msgpack gives up."""
        packed: list[Any] = []
        codec = self.server._codec
        self.patch(codec, "_plainPacker", RecordingPacker(codec._plainPacker, packed))
        cycle: list[Any] = [list(range(100))]
        cycle.append(cycle)
        result = self.call("second", [1, cycle])
        self.assertIs(result[1], result)
        self.assertEqual(result[0], list(range(100)))
        self.assertEqual(packed, [])  # the answer never went to msgpack's plain pass

    def test_limitFromThisSide(self) -> None:
        """To a peer that takes messages of any size, a value is bounded by what this side
        takes; with no limit on either side, by nothing."""
        codec = self.server._codec
        self.assertEqual(codec.itemLimit, 4096)
        self.server.peerMessageSize = None
        self.server._setItemLimit()
        self.assertEqual(codec.itemLimit, self.server.limits.messageSize)
        self.server.limits = pb.BrokerLimits(messageSize=None)
        self.server._setItemLimit()
        self.assertIsNone(codec.itemLimit)
        self.assertEqual(shapeOf(self.call("shared", 3)), [2] * 3)

    def test_sharedAnnotationsRefused(self) -> None:
        """Annotations whose lists share their parts are refused when they are made, with
        the count, in time that does not grow with the appearances."""
        with self.assertRaises(ValueError) as raised:
            context.CallOptions(context={"x": sharedLists(60)})
        self.assertEqual(
            str(raised.exception),
            "context holds more than 1,000,000 items, each character of a string counting as "
            "one (a list or dict that appears more than once is counted, and sent, each time)",
        )
        text: list[Any] = ["x" * 10_000]
        for _ in range(8):  # 767 items, but 256 copies of the string
            text = [text, text]
        with self.assertRaises(ValueError):
            context.CallOptions(context={"x": text})
        cycle: list[Any] = []
        cycle.append(cycle)
        with self.assertRaises(ValueError) as raised:
            context.CallOptions(context={"x": cycle})
        self.assertEqual(
            str(raised.exception), "context holds a list or dict inside itself, which cannot travel"
        )


class RecordingPacker:
    """
    A msgpack packer that notes each value it packs.
    """

    def __init__(self, packer: Any, packed: list[Any]) -> None:
        self._packer = packer
        self._packed = packed

    def pack(self, value: Any) -> bytes:
        self._packed.append(value)
        return self._packer.pack(value)  # type: ignore[no-any-return]


class ExtentTests(SynchronousTestCase):
    """
    pbroker._native.extent, and its twins in C and in Python.
    """

    def twins(self) -> list[Callable[[Any, int, int], int]]:
        from pbroker import _accelerator

        found = [_native._extentPython]
        if _accelerator.speedups is not None:
            found.append(_accelerator.speedups.extent)
        return found

    def test_counts(self) -> None:
        """Each item of a list, tuple, set or frozenset counts, a dict's keys and values,
        the value itself, and a container each time it appears; and each character or byte
        of a string (str, bytes or bytearray) in them, each time."""
        inner = [1, 2]
        cases = [
            (5, 1),
            ([], 1),
            ([1, 2, 3], 4),
            ({"a": 1, "b": [1, 2]}, 7 + 2),
            ((1, (2, 3)), 5),
            ({1, (2, 3)}, 5),
            (frozenset({frozenset({1})}), 3),
            ([inner, inner, [inner]], 11),
            (["abc", b"de", ""], 4 + 5),
            ([bytearray(b"fgh"), (bytearray(),)], 3 + 3 + 1),
            ([memoryview(b"abcdefgh").cast("I")], 2 + 8),  # its bytes
            ({"key": "\u20ac" * 3}, 3 + 6),
            ([[inner, "xyz"]] * 2, 3 + 2 * (2 + 2 + 3)),
        ]
        for extent in self.twins():
            for value, items in cases:
                self.assertEqual(extent(value, items, 100), _native.EXTENT_WITHIN, (value, items))
                self.assertEqual(extent(value, items - 1, 100), _native.EXTENT_OVER, (value, items))

    def test_dictionaryKeys(self) -> None:
        """A value within the budget with a dict whose keys are not all exactly str or
        bytes is EXTENT_KEYS (it goes in a KEYED extension); over the budget, or with a
        cycle, it is that."""

        class Text(str):
            pass

        for extent in self.twins():
            for value in (
                {(1, 2): [3]},
                [1, {"a": 1, 2: 3}],
                {frozenset({"ab"}): ("cd",)},
                {Text("a"): 1},
                {None: 1},
                ([{"a": {1.5: 0}}],),
                {"a": [{"b": 1}, {True: 2}]},
            ):
                self.assertEqual(extent(value, 100, 100), _native.EXTENT_KEYS, value)
            self.assertEqual(extent({b"k": 1, "s": {"t": 2}}, 100, 100), _native.EXTENT_WITHIN)
            # The list, its two items, the dict's two, the string's three
            self.assertEqual(extent([{1: 2}, "abc"], 7, 100), _native.EXTENT_OVER)
            self.assertEqual(extent([{1: 2}, "abc"], 8, 100), _native.EXTENT_KEYS)
            cycle: list[Any] = [{1: 2}]
            cycle.append(cycle)
            self.assertEqual(extent(cycle, 100, 100), _native.EXTENT_CYCLE)

    def test_countsRememberedWithinBounds(self) -> None:
        """Many shared containers: the walk remembers the count of each, in less memory than
        the containers take themselves (the C twin's table: 32 bytes a container at most, as
        it grows; a list takes 56 at least), and the verdict is the same."""
        pairs: list[Any] = []
        for index in range(70_000):
            shared = [index]
            pairs += [shared, shared]
        total = 1 + len(pairs) + len(pairs)  # the list, its items, and one in each
        for extent in self.twins():
            tracemalloc.start()
            try:
                self.assertEqual(extent(pairs, total, 10), _native.EXTENT_WITHIN)
                self.assertEqual(extent(pairs, total - 1, 10), _native.EXTENT_OVER)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            if extent is not _native._extentPython:
                # 70,000 in 262,144 slots of 16 bytes, and the 131,072 it grew from.
                self.assertLessEqual(peak, 6 * 2**20 + 2**16)
                self.assertLess(peak, 70_000 * 100)

    def test_deepCyclesAndSharedParts(self) -> None:
        """Deeper than the frames the walk starts with (32), where the C twin finds the
        containers it is inside by address: a container inside itself at any depth is a
        cycle, and one met again beside its first place or after the walk left it is not."""
        for depth in (31, 32, 33, 40, 64, 65, 200, 1000):
            top: list[Any] = []
            path = [top]
            for _ in range(depth):
                path.append([])
                path[-2].append(path[-1])
            for at in (0, depth // 2, depth - 1):
                path[-1].append(path[at])
                for extent in self.twins():
                    self.assertEqual(extent(top, 10**6, 2000), _native.EXTENT_CYCLE, (depth, at))
                path[-1].pop()
                sibling: list[Any] = [1]
                path[at].append(sibling)
                path[-1].append(sibling)  # the same one again, beside or below, no cycle
                for extent in self.twins():
                    total = 1 + depth + 2 * 2  # the value, the path, the sibling twice
                    self.assertEqual(extent(top, total, 2000), _native.EXTENT_WITHIN, (depth, at))
                    self.assertEqual(extent(top, total - 1, 2000), _native.EXTENT_OVER)
                path[-1].pop()
                path[at].pop()

    def test_cyclesAndDepth(self) -> None:
        """A container inside itself, or containers nested deeper than maxDepth, end the
        walk; subclasses and other objects are items, not walked."""
        cycle: list[Any] = [1]
        cycle.append({"again": (cycle,)})

        class Listish(list[Any]):
            pass

        nested: Any = 1
        for _ in range(10):
            nested = [nested]
        for extent in self.twins():
            self.assertEqual(extent(cycle, 1000, 100), _native.EXTENT_CYCLE)
            self.assertEqual(extent(nested, 1000, 10), _native.EXTENT_WITHIN)
            self.assertEqual(extent(nested, 1000, 9), _native.EXTENT_CYCLE)
            self.assertEqual(extent([Listish(range(100))], 2, 100), _native.EXTENT_WITHIN)
            self.assertEqual(extent(sharedLists(200), 10**9, 300), _native.EXTENT_OVER)
            total = 3 * 2**20 - 1  # the value, and 3 * 2**k - 2 items inside level k
            self.assertEqual(extent(sharedLists(20), total, 300), _native.EXTENT_WITHIN)
            self.assertEqual(extent(sharedLists(20), total - 1, 300), _native.EXTENT_OVER)
            self.assertEqual(extent([5], 0, 1), _native.EXTENT_OVER)
            self.assertEqual(extent([5], 2**200, 1), _native.EXTENT_WITHIN)
            for budget, depth in ((-1, 5), (5, 0)):
                with self.assertRaises(ValueError):
                    extent([], budget, depth)
            for budget, depth in ((1.0, 5), (5, 5.0), ("5", 5)):
                with self.assertRaises(TypeError):
                    extent([], budget, depth)  # type: ignore[arg-type]

    def test_finaliserDuringTheWalk(self) -> None:
        """Before Python 3.12, allocating a set's iterator may run a garbage collection, and
        so a finaliser: one that takes the list being walked out of the value does not free
        it under the C walk (which crashed the process)."""
        from pbroker import _accelerator

        value: list[Any] = [[{1}, [[1, 2, 3]] * 50, "x"]]
        ran: list[bool] = []

        class Trap:
            def __init__(self) -> None:
                self.me = self

            def __del__(self) -> None:
                ran.append(True)
                value[0] = None

        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        for extent in self.twins():
            value[0] = [{1}, [[1, 2, 3]] * 50, "x"]
            Trap()  # garbage in a cycle, with a finaliser
            gc.set_threshold(1)
            try:
                verdict = extent(value, 10**6, 100)
            finally:
                gc.set_threshold(*thresholds)
            self.assertIn(verdict, (_native.EXTENT_WITHIN, _native.EXTENT_OVER))
            gc.collect()
        self.assertTrue(ran or _accelerator.speedups is None)

    def test_twinsAgree(self) -> None:
        """The C walk and the Python one give the same verdict on random values with shared
        parts, cycles and every kind of container, at every budget and depth tried."""
        from pbroker import _accelerator

        if _accelerator.speedups is None:
            return  # one twin only: nothing to compare (test_counts checks it)
        python, c = _native._extentPython, _accelerator.speedups.extent
        generator = random.Random(1729)
        for _ in range(400):
            value = randomGraph(generator)
            for budget in (0, 1, 3, 10, 30, 100, 10_000):
                for depth in (1, 2, 4, 50):
                    self.assertEqual(
                        python(value, budget, depth), c(value, budget, depth), (budget, depth)
                    )


def naiveExtent(value: Any, budget: int, maxDepth: int) -> int:
    """
    What extent() finds, found the slow way: every appearance walked (no memory of
    containers seen before), recursively. For small values only.
    """
    containers = (list, dict, tuple, set, frozenset)
    left = budget - 1
    path: list[int] = []
    keys: list[Any] = []  # the dicts met with keys other than strings

    class Over(Exception):
        pass

    class Cycle(Exception):
        pass

    def walk(item: Any) -> None:
        nonlocal left
        kind = type(item)
        if kind is str or kind is bytes or kind is bytearray or kind is memoryview:
            left -= item.nbytes if kind is memoryview else len(item)
            if left < 0:
                raise Over()
            return
        if kind not in containers:
            return
        if id(item) in path:
            raise Cycle()
        if len(path) >= maxDepth:
            raise Cycle()
        if kind is dict:
            left -= 2 * len(item)
            inner = [part for pair in item.items() for part in pair]
        else:
            left -= len(item)
            inner = list(item)
        if left < 0:
            raise Over()
        if kind is dict and any(type(key) is not str and type(key) is not bytes for key in item):
            keys.append(item)
        path.append(id(item))
        for part in inner:
            walk(part)
        path.pop()

    if budget == 0:
        return _native.EXTENT_OVER
    if type(value) not in containers:
        return _native.EXTENT_WITHIN
    try:
        walk(value)
    except Over:
        return _native.EXTENT_OVER
    except Cycle:
        return _native.EXTENT_CYCLE
    return _native.EXTENT_KEYS if keys else _native.EXTENT_WITHIN


class ExtentDifferentialTests(SynchronousTestCase):
    """
    extent()'s twins against each other and against a walk without memory, on random
    values whose parts are shared at different depths and hold strings.
    """

    def test_twinsAndOracleAgree(self) -> None:
        """Both twins give the verdict of a walk that visits every appearance, at budgets
        around the value's exact count and at every depth up to its own; where the oracle
        finds the value too deep only at a container's second appearance (the twins add the
        count remembered from its first), they agree with each other and go on (to say
        within, over, or that a dictionary's keys are not strings)."""
        from pbroker import _accelerator

        twins = [_native._extentPython]
        if _accelerator.speedups is not None:
            twins.append(_accelerator.speedups.extent)
        generator = random.Random(4099)
        for _ in range(1500):
            value = randomGraph(generator)
            budgets = [0, 1, 2, 5, 10**6]
            if naiveExtent(value, 10**6, 10**6) == _native.EXTENT_WITHIN:
                low, high = 1, 10**6  # the exact count, found by bisection
                while low < high:
                    middle = (low + high) // 2
                    if naiveExtent(value, middle, 10**6) == _native.EXTENT_WITHIN:
                        high = middle
                    else:
                        low = middle + 1
                budgets += [low - 1, low, low + 1]
            for budget in budgets:
                for depth in range(1, 9):
                    verdicts = {twin(value, max(budget, 0), depth) for twin in twins}
                    self.assertEqual(len(verdicts), 1, (value, budget, depth))
                    oracle = naiveExtent(value, max(budget, 0), depth)
                    (verdict,) = verdicts
                    if verdict != oracle:
                        self.assertIn(
                            (verdict, oracle), [(0, 2), (1, 2), (3, 2)], (value, budget, depth)
                        )


def randomGraph(generator: random.Random) -> Any:
    """
    A small value of containers, strings and leaves in which containers are shared at
    random depths (a list may also be appended to, closing a cycle).
    """
    made: list[Any] = []
    hashable: list[Any] = [1, "a", b"bc", "", "\u20ac\u20ac", None]

    def leaf() -> Any:
        return generator.choice([1, 2.5, None, "", "s" * generator.randrange(6), b"b" * 3])

    def pick(level: int) -> Any:
        roll = generator.random()
        if made and roll < 0.35:
            return generator.choice(made)
        if level > 4 or roll < 0.6:
            return leaf()
        return build(level + 1)

    def build(level: int) -> Any:
        kind = generator.choice(["list", "list", "dict", "tuple", "set", "frozenset"])
        size = generator.randrange(4)
        if kind == "tuple":
            items = tuple(pick(level) for _ in range(size))
            made.append(items)
            with contextlib.suppress(TypeError):
                hash(items)
                hashable.append(items)
            return items
        if kind in ("set", "frozenset"):
            members = {generator.choice(hashable) for _ in range(size)}
            group = set(members) if kind == "set" else frozenset(members)
            if kind == "frozenset":
                hashable.append(group)
            made.append(group)
            return group
        container: Any = [] if kind == "list" else {}
        made.append(container)
        for index in range(size):
            item = pick(level)
            if kind == "list":
                container.append(item)
            else:
                key = generator.choice(hashable) if generator.random() < 0.3 else f"k{index}"
                container[key] = item
        if generator.random() < 0.05:
            target = generator.choice(made)
            if type(target) is list:
                target.append(container)  # may close a cycle
        return container

    return build(0)


class ManyStreamsTests(SynchronousTestCase):
    """
    When the connection takes data again (a large item has gone), only the streams that
    stopped with credit left are woken, each in turn, not every open stream.
    """

    def pumpsPerItem(self, streamCount: int) -> float:
        """Read ``streamCount`` streams of two 70 KB items each (sent as large messages, one
        at a time), counting the OutgoingStream.pump calls per item sent."""

        class Source(pb.Root):
            def remote_items(self) -> Iterator[bytes]:
                return (b"x" * 70_000 for _ in range(2))

        limits = pb.BrokerLimits(streamBytes=1 << 30, bufferedBytes=1 << 30)
        clock = Clock()
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Source(), limits=limits, clock=clock),
            pb.PBClientFactory(limits=limits, clock=clock),
            clock=clock,
            bufferSize=64 * 1024,  # the server's transport pauses it while items wait
        )
        client.streamWindow = 2
        streams: list[Any] = []
        for _ in range(streamCount):
            client.remoteForName("root").callRemote("items").addCallback(streams.append)
        for _ in range(50):
            pump.pump()
            clock.advance(0)
        self.assertEqual(len(streams), streamCount)
        pumps = [0]
        original = _streams.OutgoingStream.pump

        def counted(sender: Any) -> None:
            pumps[0] += 1
            original(sender)

        self.patch(_streams.OutgoingStream, "pump", counted)
        results: list[Any] = []

        async def read(stream: RemoteStream) -> list[Any]:
            return [item async for item in stream]

        for stream in streams:
            Deferred.fromCoroutine(read(stream)).addCallback(results.append)
        for _ in range(10_000):
            if len(results) == streamCount:
                break
            pump.pump()  # one step at a time, so that the transport pauses and resumes
            clock.advance(0)
        self.assertEqual([len(items) for items in results], [2] * streamCount)
        return pumps[0] / (2 * streamCount)

    def test_workPerItemDoesNotGrowWithStreams(self) -> None:
        """With 60 streams open, an item costs a few stream pumps, as with 5 (0.5 per item
        with 5, 1.5 with 60 or 240): every open stream was pumped after each large item,
        about 24 per item with 60."""
        few, many = self.pumpsPerItem(5), self.pumpsPerItem(60)
        self.assertLessEqual(few, 1)
        self.assertLessEqual(many, 4, (few, many))


class CancelKeptCallsScaleTests(SynchronousTestCase):
    """
    A call kept behind a large message (a slow reader) and then cancelled, or timed out, is
    found where it waits by its serial, not by walking the calls kept before it.
    """

    def test_cancelledFromTheMiddle(self) -> None:
        """2,000 small calls kept behind large ones, every other one cancelled from the
        middle outwards: the kept entries read are a few dozen per cancel (the walk read
        about half a million), the large messages queued are not read at all, and the others
        reach the server in order."""

        class CountingDeque(deque):  # type: ignore[type-arg]
            reads = 0

            def __getitem__(self, index: Any) -> Any:
                CountingDeque.reads += 1
                return super().__getitem__(index)

            def __iter__(self) -> Iterator[Any]:
                for item in super().__iter__():
                    CountingDeque.reads += 1
                    yield item

            def __reversed__(self) -> Iterator[Any]:
                for item in super().__reversed__():
                    CountingDeque.reads += 1
                    yield item

        class CountingList(list):  # type: ignore[type-arg]
            reads = 0

            def __getitem__(self, index: Any) -> Any:
                CountingList.reads += 1
                return super().__getitem__(index)

        received: list[int] = []

        class Root(pb.Root):
            def remote_up(self, value: bytes) -> int:
                return len(value)

            def remote_small(self, number: int) -> int:
                received.append(number)
                return number

        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root()), pb.PBClientFactory(), bufferSize=64 * 1024
        )
        root = client.remoteForName("root")
        large = [root.callRemote("up", b"y" * 300_000) for _ in range(20)]
        count = 2000
        calls = [root.callRemote("small", number) for number in range(count)]
        self.assertEqual(len(client._afterLarge), count)  # all kept behind the large calls
        self.assertEqual(len(client._largeOut), 20)
        client._afterLarge = CountingDeque(client._afterLarge)
        client._largeOut = CountingList(client._largeOut)
        middle = count // 2
        order = sorted(range(1, count, 2), key=lambda number: abs(number - middle))
        for number in order:
            calls[number].cancel()
        self.assertLessEqual(CountingDeque.reads, 40 * len(order), CountingDeque.reads)
        self.assertEqual(CountingList.reads, 0)
        for number in order:
            self.failureResultOf(calls[number], CancelledError)
        pump.flush()
        self.assertEqual([self.successResultOf(call) for call in large], [300_000] * 20)
        self.assertEqual(received, list(range(0, count, 2)))
        self.assertEqual([self.successResultOf(call) for call in calls[::2]], received)
        self.assertEqual(client._keptCalls, {})
