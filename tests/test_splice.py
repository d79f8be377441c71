"""
Large byte strings inside larger values (an item of a list or dict, one of several arguments,
a keyword argument) on the native dialect: sent as they are, between the packed bytes around
them, and received each put together once from the pieces it came in, with the same bytes on
the wire as packing the value whole.
"""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import msgpack
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pbroker import _native, _streams, pb
from pbroker.errors import InvalidJelly
from pbroker.testing import connectedServerAndClient

MiB = 1024 * 1024


class Thing(pb.Copyable):
    pass


class Root(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value

    def remote_echoAll(self, *args: Any, **kw: Any) -> Any:
        return [list(args), kw]

    def remote_items(self, count: int, size: int) -> Iterator[Any]:
        return ([index, bytes([index]) * size] for index in range(count))


def plainCodec() -> _native.ValueCodec:
    """A codec for plain data (no jelly): what the frame decoder's values are read with."""
    return _native.ValueCodec(None, None, None, None, None, 10)  # type: ignore[arg-type]


def jellyingCodec(jellied: list[Any]) -> _native.ValueCodec:
    """A codec that jellies objects into ``b"j"``, adding each to ``jellied``."""

    def jelly(value: Any) -> bytes:
        jellied.append(value)
        return b"j"

    return _native.ValueCodec(
        jelly,
        None,  # type: ignore[arg-type]
        lambda value: False,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        10,
    )


def received(packed: bytes | _native.Packed, step: int | None = None) -> Any:
    """
    What a frame decoder makes of an answer carrying ``packed``, fed ``step`` bytes at a time
    (all at once if ``None``): the value field as it arrives, before it is unpacked.
    """
    field = packed if isinstance(packed, _native.Packed) else _native.Packed(packed)
    data = b"".join(_native.records([b"answer", 1, field]))
    step = step or len(data)
    decoder = _native.FrameDecoder(None)
    out: list[Any] = []
    for start in range(0, len(data), step):
        out.extend(decoder.feed(data[start : start + step]))
    ((_, _, arrived),) = out
    return arrived


def largeStrings(value: Any) -> list[bytes]:
    """The byte strings of ``value`` (in its plain containers) that are spliced, in order."""
    if type(value) is bytes:
        return [value] if len(value) >= _native._LARGE_BYTES else []
    if type(value) in (list, tuple, set, frozenset):
        return [found for item in value for found in largeStrings(item)]
    if type(value) is dict:
        return [found for item in value.values() for found in largeStrings(item)]
    return []


def packedWhole(codec: _native.ValueCodec, value: Any) -> bytes:
    """``value`` as ``codec`` packs it with no large byte string left out."""
    splicing = _native._SPLICE_FROM
    _native._SPLICE_FROM = sys.maxsize
    try:
        packed = codec.pack(value)
    finally:
        _native._SPLICE_FROM = splicing
    assert isinstance(packed, bytes)
    return packed


def plainExtensions(value: Any) -> msgpack.ExtType:
    """A tuple, set or frozenset as the native codec packs it (for msgpack's ``default``)."""
    code = {tuple: _native.TUPLE, set: _native.SET, frozenset: _native.FROZENSET}[type(value)]
    return msgpack.ExtType(
        code, msgpack.packb(list(value), default=plainExtensions, strict_types=True)
    )


def shapeOf(value: Any) -> Any:
    """``value`` with each byte or text string replaced by its type and length."""
    if isinstance(value, (bytes, str)):
        return f"{type(value).__name__}[{len(value)}]"
    if isinstance(value, (list, tuple, set)):
        return [shapeOf(item) for item in list(value)[:20]]
    if isinstance(value, dict):
        return {key: shapeOf(item) for key, item in list(value.items())[:20]}
    return value


# Values of more than _SPLICE_FROM bytes with large byte strings at different places.
BIG = bytes(range(256)) * 4100  # 1,049,600 bytes
MEDIUM = b"m" * 70_000  # a bin 32, under _SPLICE_FROM alone
SHAPES: list[Any] = [
    [b"name", BIG],
    {"data": BIG},
    {"name": "n", "blob": BIG, "size": len(BIG)},
    [BIG, BIG, 3],
    [[b"a", [BIG]], {"x": MEDIUM, "y": {"z": BIG}}, (1, 2), {1, 2}, "text", None, 2.5],
    [MEDIUM] * 20,  # array 16, under _SPLICE_FROM for each item
    {f"k{i}": (MEDIUM if i % 3 else i) for i in range(30)},  # map 16
    [b"s" * 100, b"t" * 300, BIG, "u" * 40, "v" * 300, "w" * 70_000, -1, -200, 2**40, True],
    ("name", BIG),  # an answer of a tuple
    [(1, (BIG, [MEDIUM])), {b"k" * 40_000, BIG}, frozenset({BIG}), ((),)],
    {"rows": [(index, MEDIUM) for index in range(20)]},  # tuples in ext 32
    [(b"q" * 40_000,), BIG, {"k": (b"r" * 40_000, 1)}],  # tuples in ext 16
    {"keyed": {1: BIG}},  # a KEYED value: its maps' keys are checked
]


class SendTests(SynchronousTestCase):
    def test_sameBytesAsPackedWhole(self) -> None:
        """
        A list or dict of more than _SPLICE_FROM bytes with large byte strings in it is
        packed into the same bytes as packing it whole, with each large string a part of its
        own, not copied.
        """
        codec = plainCodec()
        for value in SHAPES:
            packed = codec.pack(value)
            assert isinstance(packed, _native.Packed), shapeOf(value)
            strings = largeStrings(value)
            parts = [part for part in packed.parts if any(part is each for each in strings)]
            self.assertEqual(len(parts), len(strings))
            # (Each after the packed bytes before it; then those after the last, if any.)
            self.assertIn(len(packed.parts), (2 * len(strings), 2 * len(strings) + 1))
            for part, string in zip(parts, strings, strict=True):
                self.assertIs(part, string)
            self.assertEqual(packed.size, len(packed.data))
            self.assertTrue(packed.data == packedWhole(codec, value), "the bytes differ")

    def test_packedWhole(self) -> None:
        """
        A value is packed whole, as before, when it is small, has no large byte string, has
        too many items around it, or holds a container that is not plain data.
        """
        jellied: list[Any] = []
        codec = jellyingCodec(jellied)

        class Listed(list):  # type: ignore[type-arg]
            pass

        for value in (
            [b"name", MEDIUM],
            [b"x" * 30_000] * 40,  # over _SPLICE_FROM, in strings under _LARGE_BYTES
            [*range(_native._SPLICE_AROUND), BIG],
            [BIG, *range(_native._SPLICE_AROUND + 1)],
            [BIG, Listed([1])],
        ):
            self.assertIs(type(codec.pack(value)), bytes, shapeOf(value))
        self.assertEqual(jellied, [[1]])  # the list subclass, jellied once

    def test_objectsPackedWhole(self) -> None:
        """
        A value with an object that goes through jelly is packed whole, with the object
        jellied once: the look for large strings, which stops at it, has no effect.
        """
        jellied: list[Any] = []
        codec = jellyingCodec(jellied)
        thing = Thing()
        packed = codec.pack([BIG, thing])
        self.assertIsInstance(packed, bytes)
        self.assertEqual(jellied, [thing])


class ReceiveTests(SynchronousTestCase):
    def test_putTogetherOnce(self) -> None:
        """
        A received value of more than _SPLICE_FROM bytes arrives with its large byte strings
        put together (each once, from the pieces it came in) and the rest of its document
        around them: it unpacks to the value sent, however it was read.
        """
        codec = plainCodec()
        for value in SHAPES:
            packed = codec.pack(value)
            for step in (7, 65_536, None):
                arrived = received(packed, step)
                self.assertTrue(type(arrived) is _native.Spliced, shapeOf(value))
                self.assertEqual(arrived.size, packed.size)  # type: ignore[union-attr]
                self.assertTrue(arrived.values == largeStrings(value), "other strings")
                self.assertTrue(codec.unpack(arrived) == value, "the value changed")

    def test_anySender(self) -> None:
        """
        The receiver looks for large strings whoever packed the value: one packed whole
        (in one part) is put together the same way.
        """
        codec = plainCodec()
        value = {"a": [BIG, 1], "b": b"x" * 40_000}
        arrived = received(msgpack.packb(value, use_bin_type=True))
        self.assertIs(type(arrived), _native.Spliced)
        self.assertEqual(len(arrived.values), 2)
        self.assertTrue(codec.unpack(arrived) == value)
        # Extensions that do not hold a document are stepped over, whatever their form.
        for size in (1, 2, 4, 8, 16, 50, 300, 70_000):
            other = msgpack.ExtType(_native.JELLY, b"j" * size)
            document = msgpack.packb([other, BIG, other], use_bin_type=True)
            edits = _native._largeBins(_native._Positions([memoryview(document)]))
            assert edits is not None
            ((start, stop, header, string),) = edits
            self.assertEqual(document[start:stop], document[start : start + 5] + BIG)
            self.assertEqual(string, (start + 5, stop))
            self.assertIsNone(header)

    def test_extensionForms(self) -> None:
        """
        The look through a document steps into extensions of each form (fixext 1 to 16,
        ext 8, 16 and 32) that hold documents, and over the others.
        """
        codec = plainCodec()
        tuples = [(), (1,), (1, 2, 3), (1, 2, 3, 4, 5, 6, 7), tuple(range(15)), tuple(range(50))]
        tuples += [("w" * 300,), ("w" * 70_000,)]
        lengths = []
        for item in tuples:
            lengths.append(len(msgpack.packb(list(item))))
        self.assertEqual(lengths[:5], [1, 2, 4, 8, 16])  # the fixext forms
        value = [*tuples, BIG, (BIG,), 4.5, -(2**63)]
        arrived = received(codec.pack(value), 65_536)
        self.assertIs(type(arrived), _native.Spliced)
        self.assertEqual(len(arrived.values), 2)
        self.assertTrue(codec.unpack(arrived) == value)

    def test_notSpliced(self) -> None:
        """
        A value too small, with too many items around its large strings, or without one,
        arrives as its bytes, and unpacks as before.
        """
        codec = plainCodec()
        for value in (
            [b"name", MEDIUM],
            [*range(_native._SPLICE_AROUND), BIG],
            [BIG, *range(_native._SPLICE_AROUND + 1)],
            ["t" * (2 * MiB)],
        ):
            arrived = received(msgpack.packb(value, use_bin_type=True), 65_536)
            self.assertIn(type(arrived), (bytes, memoryview))
            self.assertTrue(codec.unpack(arrived) == value)

    def test_itemsAround(self) -> None:
        """
        A value is looked through if at most _SPLICE_AROUND items come up to its first large
        string (itself included), up to each next one, and after the last, and at most
        _SPLICE_ITEMS in all; the sender and the receiver count them alike (each msgpack
        item, a tuple as two: its extension and its array), so that what one sends in parts
        the other receives in parts.
        """
        around = _native._SPLICE_AROUND
        self.patch(_native, "_SPLICE_ITEMS", 4 * around)
        codec = plainCodec()
        cases: list[tuple[Any, bool]] = []
        for count in (around - 1, around, around + 1):
            within = count <= around
            cases += [
                ([*range(count - 2), BIG], within),  # the list counts too
                ([BIG, *range(count)], within),
                ([BIG, *range(count - 1), BIG], within),
                ([*range(count - 4), (BIG,)], within),
                ([*([BIG, *range(around - 1)] * 3), BIG, *range(count - 2)], within),  # in all
            ]
        for pairs, within in ((around // 2 - 2, True), (around // 2 - 1, False)):
            # A map counts its keys; a KEYED value its extension and its map.
            cases.append(({**{f"k{i}": i for i in range(pairs)}, "a": BIG}, within))
            cases.append(({**{i + 2: i for i in range(pairs)}, 1: BIG}, within))
        for last, within in (([], True), ([0], False)):  # 256 and 257 items
            cases.append(({**{i + 2: i for i in range(around // 2 - 3)}, 0: last, 1: BIG}, within))
        for value, within in cases:
            self.assertIs(type(codec.pack(value)) is _native.Packed, within, shapeOf(value))
            arrived = received(packedWhole(codec, value))
            self.assertIs(type(arrived) is _native.Spliced, within, shapeOf(value))

    def test_deepExtensions(self) -> None:
        """
        Tuples nested deeper than a receiver accepts are not looked into: the value is packed
        whole (jellied, as any so deep) and refused whole.
        """
        value: Any = [BIG]
        for _ in range(_native.RECEIVED_EXTENSION_DEPTH + 1):
            value = (value,)
        jellied: list[Any] = []
        self.assertIs(type(jellyingCodec(jellied).pack([value])), bytes)
        self.assertEqual(len(jellied), 1)
        data = msgpack.packb([value], default=plainExtensions, strict_types=True)
        arrived = received(data)
        self.assertIn(type(arrived), (bytes, memoryview))
        with self.assertRaises(InvalidJelly) as caught:
            plainCodec().unpack(arrived)
        self.assertIn("nested more than", str(caught.exception))

    def test_placeholderRefused(self) -> None:
        """
        The extension type that stands for a spliced string in the document is refused in
        what the peer sends, as any unknown type: at the top, in a tuple, in a KEYED value.
        """
        codec = plainCodec()
        placeholder = msgpack.ExtType(_native._PLACEHOLDER, b"\x00\x00\x00\x00")
        inTuple = msgpack.ExtType(_native.TUPLE, msgpack.packb([placeholder]))
        inKeyed = msgpack.ExtType(_native.KEYED, msgpack.packb({1: [placeholder]}))
        for value in ([BIG, placeholder], [BIG, inTuple], [(BIG,), inKeyed]):
            arrived = received(msgpack.packb(value, use_bin_type=True))
            with self.assertRaises(InvalidJelly) as caught:
                codec.unpack(arrived)
            self.assertIn("unknown pbroker2 extension type: 127", str(caught.exception))

    def test_malformed(self) -> None:
        """
        A large document that is not well-formed is not spliced: msgpack reads it, and says
        what is wrong, as before.
        """
        codec = plainCodec()
        whole = msgpack.packb([b"n", BIG], use_bin_type=True)
        for data, expected in (
            (whole + b"\xc0", "extra data"),
            (whole[:-1] + b"\x92\x01", "extra data"),
            (b"\x93" + whole[1:], "incomplete"),
            (b"\x92\xc1" + whole[2:], "a malformed pbroker2 value"),
        ):
            arrived = received(data)
            self.assertIn(type(arrived), (bytes, memoryview))
            with self.assertRaises(InvalidJelly) as caught:
                codec.unpack(arrived)
            self.assertIn(expected, str(caught.exception))

    def test_extensionsFound(self) -> None:
        """
        What a spliced value refers to (streams, jelly) is found in its document without
        unpacking it, as a value not unpacked is released.
        """
        value = [BIG, msgpack.ExtType(_native.STREAM, msgpack.packb(5))]
        arrived = received(msgpack.packb(value, use_bin_type=True))
        self.assertIs(type(arrived), _native.Spliced)
        self.assertEqual(_native.extensionsIn(arrived), ([], [5]))
        self.assertEqual(_streams._packedSize(arrived), arrived.size)

    def test_memory(self) -> None:
        """
        Sending a value with a large string in it takes no copy of the string, and receiving
        it one (the string itself) besides the records it came in, where it took two: the
        value's document joined from them, then the string msgpack copies out of it.
        """
        codec = plainCodec()
        large = b"L" * (8 * MiB)
        value = [b"name", {"blob": large}]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            packed = codec.pack(value)
            sent = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        self.assertLess(sent, MiB)
        field = packed if isinstance(packed, _native.Packed) else _native.Packed(packed)
        records = _native.records([b"answer", 1, field])
        del packed, field
        decoder = _native.FrameDecoder(None)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            out: list[Any] = []
            while records:
                out.extend(decoder.feed(records.pop(0)))
            result = codec.unpack(out[0][2])
            del out
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        self.assertTrue(result == value)
        self.assertLess(peak, 1.5 * len(large))


class EndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), clock=clock),
            pb.PBClientFactory(clock=clock),
            clock=clock,
        )
        self.root = self.client.remoteForName("root")

    def call(self, *args: Any, **kw: Any) -> Any:
        results: list[Any] = []
        self.root.callRemote(*args, **kw).addBoth(results.append)
        for _ in range(10_000):
            if results:
                break
            self.pump.pump()
        (result,) = results
        return result

    def test_argumentsAndAnswers(self) -> None:
        """
        Large strings among several arguments, in keyword arguments and in answers travel
        whole, both ways.
        """
        self.assertTrue(
            self.call("echoAll", b"name", BIG, data=BIG) == [[b"name", BIG], {"data": BIG}]
        )
        for value in SHAPES:
            self.assertTrue(self.call("echo", value) == value, "the value changed")

    def test_streamItems(self) -> None:
        """
        Stream items with large strings in them are counted against the stream's credit by
        the bytes they took, and arrive whole.
        """
        stream = self.call("items", 3, 2 * MiB)
        items: list[Any] = []

        async def read() -> None:
            async for item in stream:
                items.append(item)

        from twisted.internet.defer import Deferred

        done: list[Any] = []
        Deferred.fromCoroutine(read()).addBoth(done.append)
        for _ in range(10_000):
            if done:
                break
            self.pump.pump()
        self.assertEqual(done, [None])
        self.assertEqual([index for index, _ in items], [0, 1, 2])
        self.assertTrue(all(data == bytes([index]) * (2 * MiB) for index, data in items))
