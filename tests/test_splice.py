"""
Large byte strings inside larger values (an item of a list or dict, one of several arguments,
a keyword argument) on the native dialect: sent as they are, between the packed bytes around
them, and received each put together once from the pieces it came in, with the same bytes on
the wire as packing the value whole.
"""

from __future__ import annotations

import gc
import itertools
import random
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pbroker import _native, _streams, pb
from pbroker.errors import InvalidJelly
from pbroker.testing import connectedServerAndClient
from tests.test_native import _plainExtensions

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


def largeStrings(value: Any) -> list[bytes | str]:
    """
    The byte and text strings of ``value`` (in its plain containers) that are spliced, in
    order (the text as it arrives).
    """
    if type(value) is bytes or type(value) is str:
        return [value] if len(value) >= _native._LARGE_BYTES else []
    if type(value) in (list, tuple, set, frozenset):
        return [found for item in value for found in largeStrings(item)]
    if type(value) is dict:
        return [found for item in value.values() for found in largeStrings(item)]
    return []


def measuredRoundTrip(codec: _native.ValueCodec, value: Any) -> tuple[int, int, Any]:
    """
    The memory ``codec`` allocates at its peak to pack ``value``, then to read it back from
    the records of an answer carrying it (besides the records), and the value read.
    """
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        packed = codec.pack(value)
        sent = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
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
    return sent, peak, result


def packedWhole(codec: _native.ValueCodec, value: Any) -> bytes:
    """``value`` as ``codec`` packs it with no large byte string left out."""
    splicing = _native._SPLICE_FROM
    _native._SPLICE_FROM = sys.maxsize
    try:
        packed = codec.pack(value)
    finally:
        _native._SPLICE_FROM = splicing
    # (A list of one large string is packed by hand in parts whatever its size.)
    return packed.data if isinstance(packed, _native.Packed) else packed


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
    def test_extensionOfSixtyFourKiB(self) -> None:
        """A tuple inside a spliced value whose extension holds 65,535 bytes takes the
        16-bit length form; 65,536 and more the 32-bit one: the bytes are those of packing
        the value whole, and read back."""
        codec = plainCodec()
        for held in (65_535, 65_536, 65_537):
            # fixarray (1 byte) and bin 16 (3 bytes) around the string: ``held`` in all.
            value = [BIG, (b"t" * (held - 4),)]
            packed = codec.pack(value)
            self.assertIsInstance(packed, _native.Packed)
            self.assertEqual(packed.data, packedWhole(codec, value), held)
            self.assertEqual(codec.unpack(packed.data), value)

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
            # Each after the packed bytes before it; then those after the last, if any.
            self.assertIn(len(packed.parts), (2 * len(strings), 2 * len(strings) + 1))
            for part, string in zip(packed.parts[1::2], strings, strict=True):
                if type(string) is bytes:
                    self.assertIs(part, string)
                else:
                    self.assertTrue(part == string.encode(), "other text")
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

    def test_bytearrays(self) -> None:
        """
        A large bytearray, alone, as the one argument of a call, or in a large value, is sent
        as the bytes packing it gives, copied once when it is packed (as it is then: it may
        change before it is written), and arrives as bytes.
        """
        codec = plainCodec()
        alone = bytearray(b"a" * 40_000)
        inside = bytearray(BIG)
        for value in (alone, [alone], ["name", inside], {"b": (inside, 1)}):
            packed = codec.pack(value)
            assert isinstance(packed, _native.Packed), shapeOf(value)
            data = packed.data
            self.assertTrue(data == packedWhole(codec, value), "the bytes differ")
            alone[0] = inside[0] = ord("z")  # (changed after the call)
            self.assertTrue(packed.data == data, "not copied")
            arrived = plainCodec().unpack(received(packed))
            self.assertTrue(arrived == plainCodec().unpack(data), "the value changed")
            alone[0] = ord("a")
            inside[0] = BIG[0]

    def test_memoryviews(self) -> None:
        """
        A large memoryview, alone, as the one argument of a call, or in a large value, is
        sent as the bytes packing it gives: a view of them if they are a byte string's
        (which cannot change), else copied once when it is packed; it arrives as bytes. One
        whose bytes are not in one piece is refused, with a TypeError that says so (msgpack's
        BufferError said less), large or small.
        """
        codec = plainCodec()
        shared = bytearray(BIG)
        for view in (memoryview(BIG), memoryview(BIG).cast("I"), memoryview(shared)):
            for value in (view, [view], ["name", view], {"v": (view, 1)}):
                packed = codec.pack(value)
                assert isinstance(packed, _native.Packed), shapeOf(value)
                data = packed.data
                self.assertTrue(data == packedWhole(codec, value), "the bytes differ")
                (part,) = [each for each in packed.parts if len(each) == len(BIG)]
                if view.obj is BIG:
                    self.assertIsInstance(part, memoryview)
                    self.assertIs(part.obj, BIG)  # (not copied)
                else:
                    shared[0] = 1 - shared[0]  # (changed after the call)
                    self.assertTrue(packed.data == data, "not copied")
                arrived = plainCodec().unpack(received(packed))
                self.assertTrue(arrived == plainCodec().unpack(data), "the value changed")
        for scattered in (
            ["name", memoryview(BIG)[::2]],
            [memoryview(BIG)[::2]],
            memoryview(BIG)[::2],
            [(memoryview(b"abcdef")[::2],)],
        ):
            with self.assertRaises(TypeError) as caught:
                codec.pack(scattered)
            self.assertIn("a memoryview whose bytes are not in one piece", str(caught.exception))
            self.assertIn("send bytes(view)", str(caught.exception))

    def test_deeperThanMsgpackPacks(self) -> None:
        """
        A value with lists nested deeper than msgpack packs (1,024) beside a large string is
        packed whole, as jelly: the look gives up past _SPLICE_DEPTH rather than pack what
        it leaves there on its own, where msgpack's limit would count from a lower level.
        """
        for depth in (_native._SPLICE_DEPTH + 1, 1_000, 1_030):
            value = [BIG, nested(depth)]
            jellied: list[Any] = []
            packed = jellyingCodec(jellied).pack(value)
            self.assertTrue(packed == packedWhole(jellyingCodec([]), value), depth)
            self.assertEqual(len(jellied), 1 if depth > 1_000 else 0)

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
        self.assertEqual(len(arrived.values), 3)  # (BIG twice, and the text of 70,000)
        self.assertTrue(codec.unpack(arrived) == value)
        # Extensions that do not hold a document are stepped over, whatever their form.
        for size in (1, 2, 4, 8, 16, 50, 300, 70_000):
            other = msgpack.ExtType(_native.JELLY, b"j" * size)
            document = msgpack.packb([other, BIG, other], use_bin_type=True)
            edits = _native._largeBins(_native._Positions([memoryview(document)]))
            assert edits is not None
            ((start, stop, header, string),) = edits
            self.assertEqual(document[start:stop], document[start : start + 5] + BIG)
            self.assertEqual(string, (start + 5, stop, False))
            self.assertIsNone(header)

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
            ["t" * 30_000] * 70,  # (text too, from 32 KiB)
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

    def test_keysCountedAlike(self) -> None:
        """
        A KEYED value's tuple and frozenset keys are counted by the sender as the receiver
        counts them (each msgpack item in them, a tuple as two), not as one item: what is
        sent in parts is received in parts.
        """
        around = _native._SPLICE_AROUND
        codec = plainCodec()
        for size, within in ((around - 12, True), (around - 6, False), (around, False)):
            for key in (tuple(range(size)), frozenset(range(size)), ((tuple(range(size)),),)):
                value = {key: 1, "a": BIG}
                sent = type(codec.pack(value)) is _native.Packed
                arrived = type(received(packedWhole(codec, value))) is _native.Spliced
                self.assertEqual((sent, arrived), (within, within), (size, type(key)))

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
        data = msgpack.packb([value], default=_plainExtensions, strict_types=True)
        arrived = received(data)
        self.assertIn(type(arrived), (bytes, memoryview))
        with self.assertRaises(InvalidJelly) as caught:
            plainCodec().unpack(arrived)
        self.assertIn("nested more than", str(caught.exception))

    def test_keyedDeepTuples(self) -> None:
        """
        A KEYED value holding tuples as deeply nested as a sender sends them (KEYED is not a
        level of tuples, for the codec) is spliced by the receiver as it was by the sender;
        a KEYED extension in another, which the codec refuses, is not looked into.
        """
        codec = plainCodec()
        value: Any = [BIG]
        for _ in range(_native.EXTENSION_DEPTH):
            value = (value,)
        for keyed in ({1: value}, {1: 2, "a": [value]}):
            packed = codec.pack(keyed)
            self.assertIs(type(packed), _native.Packed)
            arrived = received(packed)
            self.assertIs(type(arrived), _native.Spliced)
            self.assertTrue(codec.unpack(arrived) == keyed)
        inner = msgpack.ExtType(_native.KEYED, msgpack.packb({1: BIG}, use_bin_type=True))
        data = msgpack.packb(
            msgpack.ExtType(_native.KEYED, msgpack.packb({2: inner}, use_bin_type=True))
        )
        arrived = received(data)
        self.assertIn(type(arrived), (bytes, memoryview))
        with self.assertRaises(InvalidJelly) as caught:
            codec.unpack(arrived)
        self.assertIn("KEYED extension inside another", str(caught.exception))

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
        sent, peak, result = measuredRoundTrip(codec, value)
        self.assertLess(sent, MiB)
        self.assertTrue(result == value)
        self.assertLess(peak, 1.5 * len(large))


class TextTests(SynchronousTestCase):
    def test_sentAndReceived(self) -> None:
        """
        Text of 32 KiB or more in a value of 1 MiB or more, or alone, is sent encoded once
        (not copied in and out of the packer besides) and arrives decoded from the pieces it
        came in: ASCII or not.
        """
        codec = plainCodec()
        for value in (
            ["name", "a" * (MiB + 1)],
            {"text": "é" * 40_000, "blob": BIG},
            "t" * (MiB + 7),  # alone
            ("ü" * MiB, 1),  # (a value's size is counted in characters)
        ):
            packed = codec.pack(value)
            assert isinstance(packed, _native.Packed), shapeOf(value)
            self.assertTrue(packed.data == packedWhole(codec, value), "the bytes differ")
            for step in (7, 65_536, None):
                arrived = received(packed, step)
                self.assertIs(type(arrived), _native.Spliced)
                self.assertTrue(codec.unpack(arrived) == value, "the value changed")

    def test_largeAsciiPutTogetherOnce(self) -> None:
        """
        Large ASCII text (from GIVE_BACK bytes) is put together straight from the pieces
        where the C extension is built, as large byte strings are; other text is joined,
        then decoded.
        """
        self.patch(_native, "GIVE_BACK", 64 * 1024)
        joined: list[int] = []
        ascii: list[bool] = []
        join = _native._joinParts
        joinText = _native._joinText

        def countedJoin(parts: list[Any]) -> bytes:
            joined.append(len(parts))
            return join(parts)

        def countedText(parts: list[Any]) -> str | None:
            text = joinText(parts)
            ascii.append(text is not None)
            return text

        self.patch(_native, "_joinParts", countedJoin)
        self.patch(_native, "_joinText", countedText)
        codec = plainCodec()
        for text in ("a" * (2 * MiB), "é" * MiB):
            arrived = received(codec.pack([1, text]), 65_536)
            self.assertTrue(codec.unpack(arrived) == [1, text])
        speedups = _native._accelerator.speedups is not None
        self.assertEqual(ascii, [speedups, False])
        self.assertEqual(len(joined), 1 if speedups else 2)  # (what joinText did not join)

    def test_joinText(self) -> None:
        """
        The C extension's joinText() joins ASCII parts into text, letting go of each; it
        leaves the parts alone and returns None if a byte is not ASCII.
        """
        speedups = _native._accelerator.speedups
        if speedups is None:
            raise SkipTest("the C extension is switched off (PBROKER_PURE_PYTHON)")
        parts: list[Any] = [memoryview(bytearray(b"ab" * 70_000)), b"cd", memoryview(b"xyz")[1:]]
        self.assertEqual(speedups.joinText(parts), "ab" * 70_000 + "cdyz")
        self.assertEqual(parts, [None, None, None])
        for other in ([b"ab", "é".encode()], [b"a" * 9 + b"\x80"], [b"\xff" * 16]):
            kept = list(other)
            self.assertIsNone(speedups.joinText(kept))
            self.assertEqual(kept, other)
        self.assertEqual(speedups.joinText([]), "")
        with self.assertRaises(TypeError):
            speedups.joinText((b"a",))  # type: ignore[arg-type]

    def test_invalidUtf8(self) -> None:
        """
        Large text that is not UTF-8 is refused when the value is unpacked, as msgpack
        refuses it (the rest of the message is read).
        """
        codec = plainCodec()
        bad = b"\xdb" + (40_000).to_bytes(4, "big") + b"ok" * 10_000 + b"\xff" + b"k" * 19_999
        data = b"\x92" + bad + b"\xc6" + len(BIG).to_bytes(4, "big") + BIG
        arrived = received(data)
        self.assertIs(type(arrived), _native.Spliced)
        with self.assertRaises(InvalidJelly) as spliced:
            codec.unpack(arrived)
        with self.assertRaises(InvalidJelly) as whole:
            codec.unpack(data)
        self.assertEqual(str(spliced.exception), str(whole.exception))
        self.assertIn("can't decode byte 0xff in position 20000", str(spliced.exception))

    def test_invalidUtf8LetGo(self) -> None:
        """
        A received value whose large text is not UTF-8 holds no memory once let go, without
        waiting for the garbage collector: the error kept for it does not keep the frame that
        decoded it (and the value's other strings, in a cycle through its traceback).
        """
        codec = plainCodec()
        bad = b"\xdb" + (40_000).to_bytes(4, "big") + b"\xff" * 40_000
        data = b"\x93" + bad + b"\xc6" + len(BIG).to_bytes(4, "big") + BIG + bad
        collecting = gc.isenabled()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            arrived = received(data, 65_536)
            self.assertIs(type(arrived), _native.Spliced)
            with self.assertRaises(InvalidJelly):
                codec.unpack(arrived)
            del arrived
            left = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            if collecting:
                gc.enable()
        self.assertLess(left, 64 * 1024)

    def test_surrogates(self) -> None:
        """
        Text with a lone surrogate (which UTF-8 cannot carry) is packed whole, as before:
        the value goes through jelly.
        """
        jellied: list[Any] = []
        value = ["\ud800" * 40_000, BIG]
        self.assertIs(type(jellyingCodec(jellied).pack(value)), bytes)
        self.assertEqual(jellied, [value])

    def test_memory(self) -> None:
        """
        Sending large text takes one copy (its UTF-8); receiving large ASCII text, with the C
        extension, one (the text itself) besides the records it came in (and the decoder's
        copies of those past GIVE_BACK, whose pages it gives back as it copies them).
        """
        if _native._accelerator.speedups is None:
            raise SkipTest("the C extension is switched off (PBROKER_PURE_PYTHON)")
        codec = plainCodec()
        text = "T" * (_native.GIVE_BACK + MiB)
        sent, peak, result = measuredRoundTrip(codec, ["name", text])
        self.assertLess(sent, 1.2 * len(text))
        self.assertTrue(result == ["name", text])
        self.assertLess(peak, 1.5 * len(text))


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

        done: list[Any] = []
        Deferred.fromCoroutine(read()).addBoth(done.append)
        for _ in range(10_000):
            if done:
                break
            self.pump.pump()
        self.assertEqual(done, [None])
        self.assertEqual([index for index, _ in items], [0, 1, 2])
        self.assertTrue(all(data == bytes([index]) * (2 * MiB) for index, data in items))


def nested(depth: int) -> Any:
    """0 in ``depth`` lists of one item."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# The differential fuzz: random values packed by pack() against _packValue() and received
# through a frame decoder against the value sent; then random damage to such documents,
# received through the splice against msgpack reading the same bytes joined.

#: The sizes the fuzz runs at: values from FUZZ_SPLICE_FROM bytes are spliced (the real
#: threshold, 1 MiB, would make each case take milliseconds more for nothing new).
FUZZ_SPLICE_FROM = 96 * 1024
#: Byte strings around _LARGE_BYTES and the bin 16 / bin 32 boundary, and larger.
FUZZ_LARGE = (32_767, 32_768, 32_769, 40_000, 65_535, 65_536, 65_537, 150_000)
FUZZ_SMALL = (0, 1, 15, 31, 32, 255, 256, 1_000)
FUZZ_INTS = (
    *(0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1),
    *(-1, -32, -33, -128, -129, -32_768, -32_769, -(2**31), -(2**31) - 1, -(2**63)),
)
FUZZ_FLOATS = (0.0, -0.0, 1.5, -2.25e300, float("inf"), float("-inf"), 5e-324)
FUZZ_TEXTS = (0, 1, 31, 32, 255, 256, 65_535, 65_536)
FUZZ_COUNTS = (0, 1, 2, 3, 15, 16, 17, 40)


class Blob(bytes):
    pass


class Text(str):
    pass


class Number(int):
    pass


class Listed(list):  # type: ignore[type-arg]
    pass


class Mapped(dict):  # type: ignore[type-arg]
    pass


class _Values:
    """
    Random values for the fuzz: lists and dicts, up to ``room`` bytes of strings in all.
    """

    def __init__(self, rng: random.Random, room: int) -> None:
        self.rng = rng
        self.room = room

    def large(self) -> bytes:
        rng = self.rng
        size = rng.choice(FUZZ_LARGE)
        self.room -= size
        head = rng.randbytes(61)  # (distinct strings, few of whose pages are zeros)
        return (head * (size // 61 + 1))[:size]

    def text(self) -> str:
        size = self.rng.choice(FUZZ_TEXTS)
        self.room -= size
        return ("é" if self.rng.random() < 0.3 else "t") * size

    def key(self) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05 and self.room > 0:
            return self.large()  # a large byte string as a key: packed with the rest
        if roll < 0.3:
            return rng.randbytes(rng.choice(FUZZ_SMALL[:6]))
        if roll < 0.35:
            return self.text()
        if roll < 0.38:
            return rng.choice((rng.randrange(-5, 10**6), (1, "t"), 2.5, None, True))  # KEYED
        return f"k{rng.randrange(10**6)}"

    def scalar(self, inner: int = 0) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            return rng.choice(FUZZ_INTS)
        if roll < 0.35:
            return rng.randrange(-(2**63), 2**64)
        if roll < 0.45:
            return rng.choice(FUZZ_FLOATS)
        if roll < 0.55:
            return rng.choice((None, True, False))
        if roll < 0.7:
            return rng.randbytes(rng.choice(FUZZ_SMALL))
        if roll < 0.8:
            return self.text()
        if roll < 0.85:
            return rng.choice((bytearray, memoryview))(rng.randbytes(rng.choice(FUZZ_SMALL)))
        if roll < 0.9 and inner < 3:  # (tuples in tuples: up to EXTENSION_DEPTH)
            return tuple(self.scalar(inner + 1) for _ in range(rng.choice(FUZZ_COUNTS[:5])))
        if roll < 0.95:
            kind = rng.choice((set, frozenset))
            return kind(rng.choice(FUZZ_INTS[:8]) for _ in range(rng.randrange(4)))
        return rng.choice(FUZZ_INTS)

    def special(self) -> Any:
        """
        Something packing sends through jelly (which a plain codec does not read back), or
        lists nested so deep that the value goes through jelly whole.
        """
        rng = self.rng
        if rng.random() < 0.3:
            return nested(rng.randrange(990, 1_070))
        return rng.choice(
            (
                lambda: Thing(),
                lambda: Blob(self.large()),
                lambda: Text("t"),
                lambda: Number(5),
                lambda: Listed([1]),
                lambda: Mapped(a=1),
                lambda: (Thing(),),
                lambda: 2**64 + rng.randrange(10),
            )
        )()

    def value(self, depth: int) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.2 and self.room > 0:
            return self.large()
        if roll < 0.45 and depth < 4:
            return [self.value(depth + 1) for _ in range(rng.choice(FUZZ_COUNTS))]
        if roll < 0.65 and depth < 4:
            return {self.key(): self.value(depth + 1) for _ in range(rng.choice(FUZZ_COUNTS))}
        if roll < 0.68 and self.room > 0:
            return (self.large(), self.scalar())  # in a tuple: packed with the rest
        return self.scalar()

    def plant(self, value: Any, item: Any) -> None:
        """Put ``item`` into a list or dict of ``value``, at a random place."""
        rng = self.rng
        while True:
            inner = list(value.values() if type(value) is dict else value)
            deeper = [each for each in inner if type(each) in (list, dict)]
            if not deeper or rng.random() < 0.3:
                break
            value = rng.choice(deeper)
        if type(value) is dict:
            value[f"planted{rng.randrange(10**6)}"] = item
        else:
            value.insert(rng.randrange(len(value) + 1), item)

    def top(self) -> list[Any] | dict[Any, Any]:
        """A list or dict of about ``room`` bytes (more, or fewer, at times)."""
        rng = self.rng
        items: list[Any] = []
        while self.room > 0 and len(items) < 60:
            items.append(self.value(1))
        if rng.random() < 0.5:
            return items
        return {self.key(): item for item in items}


def randomSplits(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at a few random places (some of them a few bytes apart)."""
    cuts = {rng.randrange(len(data) + 1) for _ in range(rng.randrange(12))}
    for cut in list(cuts)[:3]:
        cuts.update(cut + rng.randrange(1, 9) for _ in range(2))
    edges = [0, *sorted(cut for cut in cuts if 0 < cut < len(data)), len(data)]
    return [data[start:stop] for start, stop in itertools.pairwise(edges)]


def arrivedThrough(rng: random.Random, packed: bytes | _native.Packed) -> Any:
    """What a frame decoder makes of an answer carrying ``packed``, fed in random splits."""
    field = packed if isinstance(packed, _native.Packed) else _native.Packed(packed)
    data = b"".join(_native.records([b"answer", 1, field]))
    decoder = _native.FrameDecoder(None)
    out: list[Any] = []
    for chunk in randomSplits(rng, data):
        out.extend(decoder.feed(chunk))
    ((_, _, arrived),) = out
    return arrived


def fuzzCodec() -> _native.ValueCodec:
    """
    A codec that unpacks anything msgpack reads: a JELLY or STREAM extension as a marker.
    """
    return _native.ValueCodec(
        None,  # type: ignore[arg-type]
        lambda data: ("jellied", bytes(data)),
        lambda value: False,
        None,  # type: ignore[arg-type]
        lambda streamID: ("stream", streamID),
        10,
    )


def sameValues(first: Any, second: Any) -> bool:
    """Whether two unpacked values are equal (a NaN equal to itself)."""
    return bool(first == second) or repr(first) == repr(second)


def outcome(unpack: Callable[[], Any]) -> tuple[str, Any]:
    """What ``unpack()`` gives: ("value", it) or ("refused", the error's message)."""
    try:
        return ("value", unpack())
    except InvalidJelly as e:
        return ("refused", str(e))


class SpliceFuzzTests(SynchronousTestCase):
    """
    Differential fuzz of the splice (seeded: each run does the same).
    """

    #: Seeds of the random values (six values each, three with objects; more were run while
    #: exploring: see FINDINGS.md).
    seeds = range(16)
    #: Seeds of the damaged documents (twelve documents each).
    damageSeeds = range(12)

    def setUp(self) -> None:
        self.patch(_native, "_SPLICE_FROM", FUZZ_SPLICE_FROM)
        self.patch(_native, "_SPLICE_AROUND", 4096)
        self.giveBack = _native.GIVE_BACK

    def giveBackAt(self, seed: int) -> None:
        """
        For one seed in four, strings from 64 KiB on are joined as the largest are: from
        the decoder's own pieces past that offset, whose pages it gives back as it copies
        them (with the C extension, on Linux), pieces that the strings around may share.
        """
        self.patch(_native, "GIVE_BACK", 64 * 1024 if seed % 4 == 3 else self.giveBack)

    def test_sameBytesAndValue(self) -> None:
        """
        Random plain values pack into the bytes packing them whole gives, and arrive (fed in
        random splits to a frame decoder) as the value sent; large strings in reach of the
        splice are sent as parts of their own and arrive put together.
        """
        spliced = arrivedSpliced = 0
        for seed in self.seeds:
            rng = random.Random(seed)
            self.giveBackAt(seed)
            for _ in range(6):
                value = _Values(rng, rng.choice((20_000, 100_000, 300_000, 600_000))).top()
                codec = plainCodec()
                packed = codec.pack(value)
                data = packed.data if isinstance(packed, _native.Packed) else packed
                self.assertTrue(data == packedWhole(codec, value), f"seed {seed}: bytes differ")
                if isinstance(packed, _native.Packed) and len(packed.parts) > 1:
                    spliced += 1
                arrived = arrivedThrough(rng, packed)
                if type(arrived) is _native.Spliced:
                    arrivedSpliced += 1
                    self.assertEqual(arrived.size, len(data))
                    self.assertEqual(_streams._packedSize(arrived), len(data))
                self.assertTrue(sameValues(codec.unpack(arrived), value), f"seed {seed}")
        # (The path is taken often: for about half of them with these seeds.)
        self.assertGreater(spliced, len(self.seeds))
        self.assertGreater(arrivedSpliced, len(self.seeds))

    def test_objectsSameBytesAndEffects(self) -> None:
        """
        A value with objects that go through jelly packs into the same bytes as packing it
        whole, having jellied the same objects, once each time they appear (a splice given
        up half-way has had no effect).
        """
        spliced = 0
        for seed in self.seeds:
            rng = random.Random(seed)
            for _ in range(3):
                values = _Values(rng, rng.choice((100_000, 300_000)))
                value = values.top()
                for _ in range(rng.choice((1, 1, 2, 3))):
                    values.plant(value, values.special())
                jellied: list[Any] = []
                wholeJellied: list[Any] = []
                packed = jellyingCodec(jellied).pack(value)
                whole = packedWhole(jellyingCodec(wholeJellied), value)
                data = packed.data if isinstance(packed, _native.Packed) else packed
                self.assertTrue(data == whole, f"seed {seed}: bytes differ")
                self.assertEqual(list(map(id, jellied)), list(map(id, wholeJellied)))
                if isinstance(packed, _native.Packed) and len(packed.parts) > 1:
                    spliced += 1
        self.assertEqual(spliced, 0)  # (given up at the first object, or on the way to it)

    def test_largeContainers(self) -> None:
        """
        Lists and dicts of more than 15 and more than 65,535 items (with more items allowed
        around the large strings than the default) have the headers packing them whole
        gives them, and each large string (bin 16 or bin 32) arrives put together.
        """
        self.patch(_native, "_SPLICE_ITEMS", 1 << 18)
        self.patch(_native, "_SPLICE_AROUND", 1 << 18)
        rng = random.Random(0)
        blob = BIG[:150_000]
        for value in (
            [*range(65_534), blob],  # 65,535 items: array 16
            [*range(65_535), blob],  # array 32
            [*range(40_000), blob],
            {**{f"k{index}": index for index in range(65_534)}, "blob": blob},  # map 16
            {**{f"k{index}": index for index in range(65_535)}, "blob": blob},  # map 32
            [list(range(300)), blob, {f"k{index}": BIG[index:][:40_000] for index in range(16)}],
            {BIG[:33_000]: [blob, "t" * 70_000, BIG[:66_000]]},  # a large key, arrived apart
        ):
            codec = plainCodec()
            packed = codec.pack(value)
            assert isinstance(packed, _native.Packed)
            self.assertGreater(len(packed.parts), 1)
            self.assertTrue(packed.data == codec._packValue(value), "the bytes differ")
            arrived = arrivedThrough(rng, packed)
            self.assertIs(type(arrived), _native.Spliced)
            keys = [key for key in value if type(key) is bytes] if type(value) is dict else []
            self.assertEqual(len(arrived.values), len(keys + largeStrings(value)))
            self.assertTrue(codec.unpack(arrived) == value, "the value changed")

    def test_damagedDocuments(self) -> None:
        """
        A document damaged at random (bytes changed, put in, taken out, cut off or added; a
        large string's length or a count made wrong; a placeholder put in) is unpacked
        through the splice as msgpack unpacks its bytes joined: to equal values, or refused
        both ways.
        """
        seen: Counter[str] = Counter()
        for seed in self.damageSeeds:
            rng = random.Random(1_000_000 + seed)
            self.giveBackAt(seed)
            bases: list[_native.Packed] = []
            while len(bases) < 2:
                value = _Values(rng, rng.choice((200_000, 400_000))).top()
                packed = plainCodec().pack(value)
                if isinstance(packed, _native.Packed) and len(packed.parts) > 1:
                    bases.append(packed)
            for _ in range(12):
                base = rng.choice(bases)
                data = damaged(rng, base)
                codec = fuzzCodec()
                arrived = arrivedThrough(rng, data)
                seen[type(arrived).__name__] += 1
                viaSplice = outcome(lambda: codec.unpack(arrived))  # noqa: B023
                viaMsgpack = outcome(lambda: codec.unpack(data))  # noqa: B023
                seen[viaSplice[0]] += 1
                self.assertEqual(viaSplice[0], viaMsgpack[0], f"seed {seed}: {viaSplice[1]!r:.200}")
                if viaSplice[0] == "value":
                    self.assertTrue(sameValues(viaSplice[1], viaMsgpack[1]), f"seed {seed}")
        # Both outcomes, and damage the splice takes and damage it leaves to msgpack.
        self.assertGreater(seen["Spliced"], 0)
        self.assertGreater(seen["bytes"] + seen["memoryview"], 0)
        self.assertGreater(seen["value"], 0)
        self.assertGreater(seen["refused"], 0)


#: Type bytes the damage puts in: each form's first and last, 0xc1, the placeholder's type.
_FUZZ_TYPE_BYTES = (
    *(0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5),
    *(0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xD3, 0xD4, 0xD6, 0xD8, 0xD9, 0xDB, 0xDC),
    *(0xDD, 0xDE, 0xDF, 0xE0, 0xFF),
)


def damaged(rng: random.Random, packed: _native.Packed) -> bytes:
    """
    The bytes of ``packed`` (a spliced value) with one to three kinds of damage, mostly
    around its structure (the packed bytes between its large strings, and their headers).
    """
    data = bytearray(packed.data)
    # The packed bytes around the large strings (parts 0, 2, 4...), and where each large
    # string's header starts and the string ends.
    structure: list[tuple[int, int]] = []
    strings: list[tuple[int, int]] = []
    offset = 0
    for index, part in enumerate(packed.parts):
        if index % 2 == 0:
            structure.append((offset, len(part)))
            if index + 1 < len(packed.parts):
                size = len(packed.parts[index + 1])
                header = offset + len(part) - len(_native.binHeader(size))
                strings.append((header, offset + len(part) + size))
        offset += len(part)

    def place() -> int:
        if rng.random() < 0.9:
            start, size = rng.choice(structure)
            return min(start + rng.randrange(size), len(data) - 1)
        return rng.randrange(len(data))

    damages = rng.randint(1, 3)
    if rng.random() < 0.4:
        # First (where the strings still are): a large string's length made wrong, or the
        # string replaced by another item (a placeholder, ours or of another form, at times).
        damages -= 1
        header, stop = rng.choice(strings)
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[data[header]]
        if rng.random() < 0.5:
            length = int.from_bytes(data[header + 1 : header + 1 + width], "big")
            wrong = rng.choice((0, 1, length - 1, length + 1, length + 6, 2 ** (8 * width) - 1))
            data[header + 1 : header + 1 + width] = (wrong % 2 ** (8 * width)).to_bytes(
                width, "big"
            )
        else:
            data[header:stop] = rng.choice(
                (
                    b"\xd6\x7f\x00\x00\x00\x00",
                    b"\xd6\x7f\x00\x00\x00\x01",
                    b"\xc7\x04\x7f\x00\x00\x00\x00",
                    b"\xd4\x7f\x00",
                    b"\xc0",
                    b"\xc4\x03abc",
                    b"\xd4\x05\x07",  # a stream
                    b"\xd6\xff\x00\x00\x00\x01",  # a msgpack Timestamp
                )
            )
    for _ in range(damages):
        kind = rng.randrange(9)
        if kind == 0:  # a byte changed
            data[place()] = rng.randrange(256)
        elif kind == 1:  # a type byte put in place of another
            data[place()] = rng.choice(_FUZZ_TYPE_BYTES)
        elif kind == 2:  # bytes put in
            at = place()
            data[at:at] = rng.randbytes(rng.randint(1, 6))
        elif kind == 3:  # bytes taken out
            at = place()
            del data[at : at + rng.randint(1, 6)]
        elif kind == 4:  # cut off (inside a large string, at times)
            del data[rng.randrange(len(data) // 2, len(data)) :]
        elif kind == 5:  # bytes after the document
            data += rng.choice((b"\xc0", b"\x00", b"\xc1", rng.randbytes(rng.randint(1, 9))))
        elif kind == 6:  # an item replaced by a placeholder (ours, or of another form)
            at = place()
            data[at : at + 1] = rng.choice(
                (
                    b"\xd6\x7f\x00\x00\x00" + bytes([rng.randrange(3)]),
                    b"\xc7\x04\x7f\x00\x00\x00\x00",
                    b"\xd4\x7f\x00",
                    b"\xd6\x7f\xff\xff\xff\xff",
                )
            )
        elif kind == 7:  # a count made wrong (an array or map header's)
            at = place()
            byte = data[at]
            if 0x80 <= byte < 0xA0:
                data[at] = (byte & 0xF0) | rng.randrange(16)
            elif byte in (0xDC, 0xDE):
                data[at + 1 : at + 3] = rng.choice((b"\xff\xff", b"\x00\x00", b"\x00\x11"))
            elif byte in (0xDD, 0xDF):
                data[at + 1 : at + 5] = b"\xff\xff\xff\xff"
            else:
                data[at] = rng.choice((0x9F, 0x8F, 0xDD))
        else:  # wrapped, or made part of a larger document
            data[0:0] = rng.choice((b"\x91", b"\x92\xc0", b"\x81\xa1k"))
    if not data:
        data += b"\xc0"
    return bytes(data)


# The differential fuzz of what splicing reaches beyond lists and dicts: large byte strings and
# text in tuples, sets, frozensets and KEYED values, nested; text around 32 KiB in characters
# and in bytes, ASCII or not; and damage aimed at the headers of extensions and of text.

#: Large text: a character (of one to four bytes of UTF-8) and how many, around 32 KiB and
#: the str 16 / str 32 bound in characters and in bytes (some of it large only in bytes,
#: which the receiver splices and the sender does not).
FUZZ_LARGE_TEXT = (
    *(("t", 32_767), ("t", 32_768), ("t", 65_535), ("t", 65_536), ("t", 70_000)),
    *(("é", 16_383), ("é", 16_384), ("é", 32_767), ("é", 32_768), ("é", 32_769)),
    *(("€", 10_922), ("€", 10_923), ("€", 21_846), ("😀", 8_192), ("😀", 16_384)),
)
#: Bytes that are not UTF-8 (a stray continuation, a lead byte cut short, a surrogate, an
#: overlong form, past U+10FFFF, never used) and bytes that are, but not ASCII.
FUZZ_NOT_UTF8 = (b"\x80", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80")
FUZZ_NOT_ASCII = ("é".encode(), "€".encode(), "😀".encode(), b"\x7f")
#: Extension types the damage gives a header: the containers', JELLY, STREAM, VALUE, the
#: placeholder's, msgpack's Timestamp (-1), -128, and one unknown.
FUZZ_EXTENSION_TYPES = (1, 2, 3, 7, 4, 5, 6, 127, 0xFF, 0x80, 0x40)
#: The containers whose extensions hold a document (tuples, sets, frozensets, KEYED).
_FUZZ_DOCUMENTS = (1, 2, 3, 7)
#: The sizes of the floats' and integers' payloads, by type byte.
_FUZZ_FIXED_SIZES = dict(zip(range(0xCA, 0xD4), (4, 8, 1, 2, 4, 8, 1, 2, 4, 8), strict=True))


class _NestedValues(_Values):
    """
    Random values with large strings in tuples, sets, frozensets and KEYED values too.
    """

    def large(self) -> bytes:
        return super().large()

    def largeText(self) -> str:
        rng = self.rng
        character, count = rng.choice(FUZZ_LARGE_TEXT)
        self.room -= count * len(character.encode())
        if character == "t" and rng.random() < 0.3:
            # ASCII but for one character, anywhere (at times in the last piece it comes in).
            at = rng.choice((0, count - 1, rng.randrange(count)))
            other = rng.choice(("é", "€", "😀"))
            return "t" * at + other + "t" * (count - at - 1)
        head = "".join(chr(rng.randrange(32, 127)) for _ in range(37)) if character == "t" else ""
        return (head + character * count)[:count]

    def string(self) -> bytes | str:
        return self.largeText() if self.rng.random() < 0.45 else self.large()

    def scalarIn(self, extensions: int) -> Any:
        """A scalar (a tuple or set at times) in ``extensions`` tuples, sets and KEYED values."""
        value = self.scalar()
        while extensions > _native.EXTENSION_DEPTH - 4 and type(value) in _native._CONTAINERS:
            value = self.scalar()
        return value

    def hashable(self, extensions: int) -> Any:
        """A set's element or a KEYED dict's key in ``extensions``: large at times."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.35 and self.room > 0:
            return self.string()
        if roll < 0.5 and extensions < _native.EXTENSION_DEPTH:
            return tuple(self.hashable(extensions + 1) for _ in range(rng.randrange(4)))
        if roll < 0.6 and extensions < _native.EXTENSION_DEPTH:
            return frozenset(self.hashable(extensions + 1) for _ in range(rng.randrange(4)))
        return rng.choice((rng.choice(FUZZ_INTS), rng.randbytes(3), "k", 1.5, None, True))

    def nested(self, depth: int, extensions: int) -> Any:
        """
        An item ``depth`` containers deep, inside ``extensions`` tuples, sets and KEYED
        values (at most EXTENSION_DEPTH of them: a deeper value goes through jelly).
        """
        rng = self.rng
        roll = rng.random()
        if roll < 0.3 and self.room > 0:
            return self.string()
        if depth >= 5 or self.room <= 0 or roll < 0.45:
            return self.scalarIn(extensions) if rng.random() < 0.8 else self.text()
        count = rng.choice((0, 1, 2, 3, 5, 16, 17))
        if roll < 0.6 or extensions >= _native.EXTENSION_DEPTH:
            return [self.nested(depth + 1, extensions) for _ in range(count)]
        if roll < 0.75:
            return tuple(self.nested(depth + 1, extensions + 1) for _ in range(count))
        if roll < 0.85:
            kind = rng.choice((set, frozenset))
            return kind(self.hashable(extensions + 1) for _ in range(count))
        if roll < 0.92:  # a dict with keys other than strings: the value goes as KEYED
            return {
                self.hashable(extensions): self.nested(depth + 1, extensions) for _ in range(count)
            }
        return {self.keyIn(extensions): self.nested(depth + 1, extensions) for _ in range(count)}

    def keyIn(self, extensions: int) -> Any:
        """A dict's key (a tuple at times) in ``extensions`` tuples, sets and KEYED values."""
        key = self.key()
        return key if extensions < _native.EXTENSION_DEPTH or type(key) is not tuple else "k"

    def top(self) -> Any:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return self.largeText()  # text alone
        if roll < 0.15:
            # Tuples nested as deeply as they are sent, around a large string.
            value: Any = [self.string()]
            for _ in range(rng.randint(_native.EXTENSION_DEPTH - 2, _native.EXTENSION_DEPTH)):
                value = (self.scalarIn(8), value) if rng.random() < 0.5 else (value,)
            return value
        items = []
        while self.room > 0 and len(items) < 30:
            items.append(self.nested(1, 1 if roll < 0.45 else 0))
        if roll < 0.45:
            return tuple(items)
        if roll < 0.75:
            return items
        return {self.key(): item for item in items}


def _documentItems(data: bytes) -> list[tuple[int, int]]:
    """
    Where each item of a well-formed msgpack document starts, and at what depth of tuples,
    sets and KEYED values (whose payloads it looks into), read independently of the code
    under test.
    """
    found: list[tuple[int, int]] = []
    # (position, items left, the depth of extensions, where the extension's payload ends)
    stack = [[0, 1, 0, len(data)]]
    position = 0
    while stack:
        frame = stack[-1]
        if not frame[1]:
            stack.pop()
            continue
        frame[1] -= 1
        byte = data[position]
        found.append((position, frame[2]))
        if byte < 0x80 or byte >= 0xE0 or 0xC0 <= byte <= 0xC3:
            position += 1
        elif byte < 0x90:
            frame[1] += 2 * (byte & 0x0F)
            position += 1
        elif byte < 0xA0:
            frame[1] += byte & 0x0F
            position += 1
        elif byte < 0xC0:
            position += 1 + (byte & 0x1F)
        elif byte in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB):
            width = 1 << ((byte - 0xC4) % 3 if byte < 0xD0 else (byte - 0xD9))
            position += 1 + width + int.from_bytes(data[position + 1 : position + 1 + width], "big")
        elif byte in (0xDC, 0xDD, 0xDE, 0xDF):
            width = 2 if byte in (0xDC, 0xDE) else 4
            count = int.from_bytes(data[position + 1 : position + 1 + width], "big")
            frame[1] += count * (2 if byte >= 0xDE else 1)
            position += 1 + width
        elif 0xCA <= byte <= 0xD3:
            position += 1 + _FUZZ_FIXED_SIZES[byte]
        else:  # an extension
            if byte >= 0xD4:
                width, size = 0, 1 << (byte - 0xD4)
            else:
                width = 1 << (byte - 0xC7)
                size = int.from_bytes(data[position + 1 : position + 1 + width], "big")
            start = position + 2 + width
            if data[start - 1] in _FUZZ_DOCUMENTS:
                stack.append([start, 1, frame[2] + 1, start + size])
                position = start
            else:
                position = start + size
    return found


def headerDamaged(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """
    ``data`` (a well-formed document with large strings) with the header of an extension or
    of a string made other, or bytes of large text made not UTF-8 or not ASCII: what kind of
    damage, and the bytes.
    """
    items = _documentItems(data)
    extensions = [at for at, _ in items if 0xC7 <= data[at] <= 0xC9 or 0xD4 <= data[at] <= 0xD8]
    strings = [at for at, _ in items if data[at] in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6)]
    texts = [at for at in strings if data[at] in (0xDA, 0xDB)]  # (str 8 is never large)
    out = bytearray(data)
    roll = rng.random()
    if roll < 0.45 and extensions:
        at = rng.choice(extensions)
        byte = out[at]
        width = 1 << (byte - 0xC7) if byte <= 0xC9 else 0
        size = int.from_bytes(out[at + 1 : at + 1 + width], "big") if width else 1 << (byte - 0xD4)
        code = out[at + 1 + width]
        choice = rng.randrange(5)
        if choice == 0 and width:  # its length made wrong
            wrong = rng.choice((0, 1, size - 1, size + 1, size - 6, size + 6, 2 ** (8 * width) - 1))
            out[at + 1 : at + 1 + width] = (wrong % 2 ** (8 * width)).to_bytes(width, "big")
            return "extension length", bytes(out)
        if choice == 1:  # its type made another
            out[at + 1 + width] = rng.choice(FUZZ_EXTENSION_TYPES)
            return "extension type", bytes(out)
        if choice == 2:  # written in a wider form (a valid, if unusual, document)
            wider = rng.choice(
                [width for width in (1, 2, 4) if width > 0 and size >> (8 * width) == 0]
            )
            out[at : at + 1 + width] = bytes((0xC7 + wider.bit_length() - 1,)) + size.to_bytes(
                wider, "big"
            )
            return "extension widened", bytes(out)
        if choice == 3:  # the type of a fixext form with another size
            if width == 0:
                out[at] = rng.choice([form for form in range(0xD4, 0xD9) if form != byte])
            else:
                out[at] = rng.choice((0xC7, 0xC8, 0xC9, 0xD6, 0xD8))
            return "extension form", bytes(out)
        # The payload of a tuple, set or KEYED value given an item more, or one fewer.
        if code in _FUZZ_DOCUMENTS and width and rng.random() < 0.5:
            start = at + 2 + width
            out[start:start] = b"\xc0"
            out[at + 1 : at + 1 + width] = ((size + 1) % 2 ** (8 * width)).to_bytes(width, "big")
            return "extension payload", bytes(out)
        out[at : at + 1] = rng.choice((b"\xc0", b"\x91\xc0"))
        return "extension replaced", bytes(out)
    if roll < 0.75 and strings:
        at = rng.choice(strings)
        byte = out[at]
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[byte]
        size = int.from_bytes(out[at + 1 : at + 1 + width], "big")
        choice = rng.randrange(4)
        if choice == 0:  # its length made wrong
            wrong = rng.choice((0, 1, size - 1, size + 1, 32_767, 32_768, 2 ** (8 * width) - 1))
            out[at + 1 : at + 1 + width] = (wrong % 2 ** (8 * width)).to_bytes(width, "big")
            return "string length", bytes(out)
        if choice == 1:  # text made bytes, or bytes text
            out[at] = byte + 0x15 if byte < 0xD0 else byte - 0x15
            return "string kind", bytes(out)
        if choice == 2:  # written in the widest form
            form = 0xDB if byte >= 0xD9 else 0xC6
            out[at : at + 1 + width] = bytes((form,)) + size.to_bytes(4, "big")
            return "string widened", bytes(out)
        out[at] = rng.choice((0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6, 0xA5, 0xC1))
        return "string form", bytes(out)
    if texts:
        # Text made not UTF-8, or not ASCII (its length kept), at its start, its end or
        # anywhere (its pieces join and decode apart).
        at = rng.choice(texts)
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[out[at]]
        start = at + 1 + width
        size = int.from_bytes(out[at + 1 : start], "big")
        bad = rng.choice(FUZZ_NOT_UTF8 + FUZZ_NOT_ASCII)
        where = rng.choice((0, size - len(bad), rng.randrange(max(1, size - len(bad)))))
        out[start + where : start + where + len(bad)] = bad
        return "text bytes", bytes(out)
    out[0:0] = b"\x92" + msgpack.packb(msgpack.ExtType(_native.JELLY, b"j"))
    return "jelly put in front", bytes(out)


def reentrantCodec() -> tuple[_native.ValueCodec, list[Any]]:
    """
    A codec like fuzzCodec's whose JELLY hook unpacks other values meanwhile, as a hook may:
    a spliced one of its own (which must come out whole) and one that carries a placeholder
    (which must be refused). What the hook found, it adds to the list.
    """
    met: list[Any] = []
    own = [b"o" * 70_000, "p" * 40_000]
    ownArrived = received(_native.Packed(msgpack.packb(own, use_bin_type=True)))
    assert type(ownArrived) is _native.Spliced
    planted = msgpack.packb([msgpack.ExtType(_native._PLACEHOLDER, bytes(4))])

    def unjelly(data: bytes) -> Any:
        met.append(codec.unpack(ownArrived) == own)
        met.append(outcome(lambda: codec.unpack(planted))[0])
        return ("jellied", bytes(data))

    codec = _native.ValueCodec(
        None,  # type: ignore[arg-type]
        unjelly,
        lambda value: False,
        None,  # type: ignore[arg-type]
        lambda streamID: ("stream", streamID),
        10,
    )
    return codec, met


class NestedSpliceFuzzTests(SynchronousTestCase):
    """
    Differential fuzz of splicing in tuples, sets and KEYED values, and of large text (seeded:
    each run does the same).
    """

    #: Seeds of the random values (four values each; many more were run while exploring:
    #: see the review's FINDINGS.md).
    seeds = range(40)
    #: Seeds of the damaged headers (eight documents each).
    damageSeeds = range(60)

    def setUp(self) -> None:
        self.patch(_native, "_SPLICE_FROM", FUZZ_SPLICE_FROM)

    def around(self, seed: int) -> None:
        """
        Items allowed around the large strings: few for a seed in three, so that counting
        them (sender and receiver alike) decides; and for a seed in two, strings from 64 KiB
        on joined from the decoder's own pieces (ASCII text by joinText, with the C
        extension), whose pages are given back.
        """
        self.patch(_native, "_SPLICE_AROUND", (12, 40, 4096)[seed % 3])
        self.patch(_native, "GIVE_BACK", 64 * 1024 if seed % 2 else 16 * MiB)

    def test_sameBytesAndValue(self) -> None:
        """
        Random values with large strings in tuples, sets and KEYED values, and large text,
        pack into the bytes packing them whole gives, and arrive (fed in random splits) as
        the value sent; what the sender sends in parts, the receiver receives in parts.
        """
        seen: Counter[str] = Counter()
        for seed in self.seeds:
            rng = random.Random(2_000_000 + seed)
            self.around(seed)
            for _ in range(4):
                value = _NestedValues(rng, rng.choice((150_000, 300_000))).top()
                codec = plainCodec()
                packed = codec.pack(value)
                data = packed.data if isinstance(packed, _native.Packed) else packed
                self.assertTrue(data == packedWhole(codec, value), f"seed {seed}: bytes differ")
                sent = isinstance(packed, _native.Packed) and len(packed.parts) > 1
                arrived = arrivedThrough(rng, packed)
                if sent:
                    # (A list of one large byte string arrives as it, Unpacked.)
                    seen["sent"] += 1
                    where = f"seed {seed}: not received in parts"
                    self.assertIn(type(arrived), (_native.Spliced, _native.Unpacked), where)
                    if type(arrived) is _native.Spliced:
                        self.assertGreaterEqual(len(arrived.values), len(packed.parts) // 2)
                if type(arrived) is _native.Spliced:
                    seen["received"] += 1
                    seen["text"] += sum(type(each) is str for each in arrived.values)
                    document = arrived.document
                    seen["inExtension"] += any(
                        depth and document[at : at + 2] == b"\xd6\x7f"
                        for at, depth in _documentItems(document)
                    )
                self.assertTrue(sameValues(codec.unpack(arrived), value), f"seed {seed}")
        # (Each path is taken often with these seeds.)
        self.assertGreater(seen["sent"], len(self.seeds))
        self.assertGreater(seen["received"], seen["sent"] // 2)
        self.assertGreater(seen["text"], len(self.seeds))
        self.assertGreater(seen["inExtension"], len(self.seeds) // 2)

    def test_damagedHeaders(self) -> None:
        """
        A document whose extension or string headers are damaged (a length or type made
        wrong, a wider form, text that is not UTF-8) is unpacked through the splice as
        msgpack unpacks its bytes joined, with the same error if refused; a hook that
        unpacks other values meanwhile sees them as if alone.
        """
        seen: Counter[str] = Counter()
        for seed in self.damageSeeds:
            rng = random.Random(3_000_000 + seed)
            self.around(seed)
            bases: list[bytes] = []
            while len(bases) < 2:
                value = _NestedValues(rng, rng.choice((150_000, 300_000))).top()
                packed = plainCodec().pack(value)
                if isinstance(packed, _native.Packed) and len(packed.parts) > 1:
                    bases.append(packed.data)
            for _ in range(8):
                kind, data = headerDamaged(rng, rng.choice(bases))
                codec, met = reentrantCodec()
                arrived = arrivedThrough(rng, data)
                viaSplice = outcome(lambda: codec.unpack(arrived))  # noqa: B023
                metSpliced = list(met)
                viaMsgpack = outcome(lambda: codec.unpack(data))  # noqa: B023
                where = f"seed {seed}, {kind}: {viaSplice[1]!r:.200} / {viaMsgpack[1]!r:.200}"
                self.assertEqual(viaSplice[0], viaMsgpack[0], where)
                if viaSplice[0] == "value":
                    self.assertTrue(sameValues(viaSplice[1], viaMsgpack[1]), where)
                else:
                    self.assertEqual(viaSplice[1], viaMsgpack[1], where)
                self.assertEqual(metSpliced, met[len(metSpliced) :], where)
                self.assertTrue(all(each in (True, "refused") for each in met), where)
                seen[type(arrived).__name__] += 1
                seen[viaSplice[0]] += 1
                seen[kind] += 1
                seen["hooked"] += bool(met) and type(arrived) is _native.Spliced
        # Both outcomes, damage the splice takes and damage it leaves to msgpack, hooks run
        # while a spliced value is unpacked, and each kind of damage.
        for each in ("Spliced", "value", "refused", "hooked", "extension type", "text bytes"):
            self.assertGreater(seen[each], 0, each)
        self.assertGreater(seen["bytes"] + seen["memoryview"], 0)
