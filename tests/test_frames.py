"""
The native dialect's frame decoder (:class:`pbroker._native.FrameDecoder`) against a
reference decoder written plainly from the record format in ``docs/native.rst``.

Random streams (whole records between the fragments of large messages, values packed by
hand and look-alikes, malformed payloads and records, size limits) are fed in random reads
(single bytes, empty reads, reads ending at or near record boundaries). After every read the
decoder must agree with the reference on the messages so far, on ``buffered`` and on
``midExpression``; at a fault both must fail, and the decoder must refuse further input.
The fragment size is shrunk so that small streams hold many fragments.
"""

from __future__ import annotations

import itertools
import struct
import subprocess
import sys
import tracemalloc
from random import Random
from typing import Any

import msgpack
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pbroker import _native
from pbroker.errors import BananaDecodeError

_header = struct.Struct(">I")


def header(kind: int, size: int) -> bytes:
    return _header.pack(kind << 30 | size)


class ReferenceError(Exception):
    pass


class Value(bytes):
    """A value after a reference message's envelope, as its packed bytes."""


def referenceAssemble(payload: bytes) -> Any:
    if len(payload) < 4:
        raise ReferenceError("shorter than the envelope length")
    (envelopeSize,) = _header.unpack_from(payload, 0)
    offset = 4 + envelopeSize
    if offset > len(payload):
        raise ReferenceError("shorter than the envelope")

    def value(code: int, data: bytes) -> Value:
        nonlocal offset
        if code != _native.VALUE or len(data) != 4:
            raise ReferenceError("an unknown extension")
        (length,) = _header.unpack(data)
        if offset + length > len(payload):
            raise ReferenceError("shorter than its values")
        offset += length
        return Value(payload[offset - length : offset])

    try:
        message = msgpack.unpackb(
            payload[4 : 4 + envelopeSize], raw=False, strict_map_key=False, ext_hook=value
        )
    except ReferenceError:
        raise
    except Exception as e:
        raise ReferenceError(f"malformed: {e}") from None
    if offset != len(payload):
        raise ReferenceError("bytes after the values")
    return message


def referenceParse(stream: bytes, limit: int | None) -> tuple[list[Any], bool, int, bool]:
    """
    The messages in ``stream``, whether it is faulty, and (if not) the bytes held towards
    unfinished messages (fragment headers already read aside) and whether there are any.
    """
    fragmentSize = _native.FRAGMENT_SIZE
    position, fragments, messages = 0, b"", []
    while True:
        left = len(stream) - position
        if left < 4:
            return messages, False, left + len(fragments), left + len(fragments) > 0
        (word,) = _header.unpack_from(stream, position)
        kind, size = word >> 30, word & (1 << 30) - 1
        try:
            if size > fragmentSize or kind == 3:
                raise ReferenceError("a bad record")
            if kind == _native.WHOLE:
                if limit is not None and size > limit:
                    raise ReferenceError("over the limit")
                if left - 4 < size:
                    return messages, False, left + len(fragments), True
                try:
                    messages.append(
                        msgpack.unpackb(
                            stream[position + 4 : position + 4 + size],
                            raw=False,
                            strict_map_key=False,
                        )
                    )
                except Exception:
                    raise ReferenceError("a malformed message") from None
                position += 4 + size
                continue
            if (kind == _native.MORE and size != fragmentSize) or size == 0:
                raise ReferenceError("a bad fragment size")
            if limit is not None and len(fragments) + size > limit:
                raise ReferenceError("over the limit")
            fragments += stream[position + 4 : position + 4 + min(size, left - 4)]
            if left - 4 < size:
                return messages, False, len(fragments), True
            position += 4 + size
            if kind == _native.LAST:
                messages.append(referenceAssemble(fragments))
                fragments = b""
        except ReferenceError:
            return messages, True, 0, False


def canonical(value: Any) -> Any:
    """
    A comparable form: a value after an envelope that is a byte string packed by hand as
    what it unpacks to, any other as its bytes (whether bytes or a view).
    """
    if isinstance(value, Value):
        raw = bytes(value)
        for lead, skip in ((b"\xc6", 1), (b"\x91\xc6", 2)):
            whole = (
                len(raw) >= skip + 4 and _header.unpack_from(raw, skip)[0] == len(raw) - skip - 4
            )
            if raw[:skip] == lead and whole:
                return ("unpacked", canonical(msgpack.unpackb(raw)))
        return raw
    if type(value) is _native.Unpacked:
        return ("unpacked", canonical(value.value))
    if type(value) is memoryview:
        assert value.readonly, "a value must be a read-only view"
        return bytes(value)
    if type(value) is list:
        return [canonical(item) for item in value]
    if type(value) is dict:
        return sorted(((canonical(k), canonical(v)) for k, v in value.items()), key=repr)
    return value


def randomValue(rng: Random) -> bytes:
    """The packed bytes of a value: by hand, look-alikes, msgpack, or junk."""
    body = rng.randbytes(rng.choice([0, 1, 5, 6, 30, 300]))
    length = _header.pack(len(body))
    return rng.choice(
        [
            b"\xc6" + length + body,
            b"\x91\xc6" + length + body,
            b"\xc6" + _header.pack(len(body) + 1) + body,
            b"\x92\xc6" + length + body + b"\x01",
            rng.randbytes(rng.randint(0, 6)),
            msgpack.packb(rng.choice([1, "x", [body], {"k": body}, body, None])),
        ]
    )


def randomStream(rng: Random) -> bytes:
    fragmentSize = _native.FRAGMENT_SIZE
    records = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.35:
            envelope = msgpack.packb([b"answer", 1, rng.randbytes(rng.randint(0, 5))])
            records.append(header(_native.WHOLE, len(envelope)) + envelope)
            continue
        values = [randomValue(rng) for _ in range(rng.randint(0, 3))]
        fields = [b"answer", rng.randint(0, 9), *map(_native.Packed, values)]
        payload = b"".join(_native.packMessage(fields)[0])
        if rng.random() < 0.1:  # malformed: cut, lengthened, or a bit flipped
            cut = bytearray(payload[: rng.randint(1, len(payload))] + rng.randbytes(2))
            cut[rng.randrange(len(cut))] ^= 1 << rng.randrange(8)
            payload = bytes(cut)
        pieces = [payload[i : i + fragmentSize] for i in range(0, len(payload), fragmentSize)]
        for index, piece in enumerate(pieces):
            kind = _native.LAST if index == len(pieces) - 1 else _native.MORE
            records.append(header(kind, len(piece)) + piece)
            while index < len(pieces) - 1 and rng.random() < 0.3:  # whole records between
                ping = msgpack.packb([b"ping", index])
                records.append(header(_native.WHOLE, len(ping)) + ping)
    if rng.random() < 0.05:
        records.append(rng.choice([header(3, 1) + b"x", header(_native.LAST, 0), b"\xff" * 5]))
    return b"".join(records)


def randomCuts(rng: Random, size: int) -> list[int]:
    fragment = _native.FRAGMENT_SIZE
    mode = rng.randrange(4)
    if mode == 0:
        cuts = sorted(rng.sample(range(size + 1), min(size + 1, rng.randint(0, 60))))
    elif mode == 1:
        cuts = list(range(0, size, rng.randint(1, 9)))
    else:  # near record boundaries
        cuts, position = [], 0
        while position < size:
            position += rng.choice([1, 3, 4, 5, fragment - 1, fragment, fragment + 4, fragment + 5])
            cuts.append(min(position, size))
    return [*cuts, size]


class FrameDecoderDifferentialTests(SynchronousTestCase):
    def check(self, seed: int, count: int) -> None:
        rng = Random(seed)
        for _ in range(count):
            stream = randomStream(rng)
            limit = rng.choice([None, None, 10_000, _native.FRAGMENT_SIZE, 300])
            decoder = _native.FrameDecoder(limit)
            got: list[Any] = []
            previous = 0
            for cut in randomCuts(rng, len(stream)):
                expected, faulty, buffered, mid = referenceParse(stream[:cut], limit)
                try:
                    got.extend(decoder.feed(stream[previous:cut]))
                except BananaDecodeError as e:
                    got.extend(e.expressions)
                    self.assertTrue(faulty, f"refused a good stream: {e} ({stream.hex()})")
                    self.assertRaises(BananaDecodeError, decoder.feed, b"")
                    break
                previous = cut
                self.assertFalse(faulty, f"took a faulty stream ({stream.hex()})")
                self.assertEqual((decoder.buffered, decoder.midExpression), (buffered, mid))
            self.assertEqual(canonical(got), canonical(expected), stream.hex())

    def test_smallFragments(self) -> None:
        """Fragments of 17 bytes: every message is many of them."""
        self.patch(_native, "FRAGMENT_SIZE", 17)
        self.patch(_native, "_SMALL", 8)
        self.check(1, 400)

    def test_keptReads(self) -> None:
        """Parts of reads kept as views of them, not copied (as large reads are)."""
        self.patch(_native, "FRAGMENT_SIZE", 64)
        self.patch(_native, "_SMALL", 32)
        self.patch(_native, "_SMALL_PART", 4)
        self.check(2, 400)

    def test_largerFragments(self) -> None:
        self.patch(_native, "FRAGMENT_SIZE", 4096)
        self.check(3, 200)


def givenBackStream(rng: Random, large: int) -> tuple[bytes, list[Any]]:
    """
    Fragmented messages with several values each, some byte strings of ``large`` bytes or
    more (joined by _joinParts, which gives the memory of pieces back), some smaller, in
    random bytes: a byte of a value read after its memory was given back would read as 0.
    """
    records, expected = [], []
    for _ in range(rng.randint(1, 3)):
        values = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.5:
                body = rng.randbytes(rng.randint(large, large * 3))
                value = b"\xc6" + _header.pack(len(body)) + body
                values.append(b"\x91" + value if rng.random() < 0.3 else value)
            else:
                values.append(
                    rng.choice(
                        [
                            b"\xc6" + _header.pack(300) + rng.randbytes(300),
                            msgpack.packb([rng.randbytes(rng.randint(0, 5000)), 1]),
                            msgpack.packb(rng.randbytes(rng.randint(0, 20))),
                        ]
                    )
                )
        payload = b"".join(_native.packMessage([b"call", 1, *map(_native.Packed, values)])[0])
        expected.append(referenceAssemble(payload))
        size = _native.FRAGMENT_SIZE
        pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
        for index, piece in enumerate(pieces):
            kind = _native.LAST if index == len(pieces) - 1 else _native.MORE
            records.append(header(kind, len(piece)) + piece)
    return b"".join(records), expected


class FrameDecoderGiveBackTests(SynchronousTestCase):
    """
    Values of GIVE_BACK bytes or more, joined by _joinParts (which, in C, gives back the
    pages of the pieces it joins), several in one message, the next often in the same piece
    as the one before it, read in random splits: every value decoded exactly.
    """

    def check(self, seed: int, count: int, large: int) -> None:
        self.patch(_native, "GIVE_BACK", large)
        joined = [0]
        join = _native._joinParts

        def counted(parts: list[Any]) -> bytes:
            joined[0] += 1
            return join(parts)

        self.patch(_native, "_joinParts", counted)
        rng = Random(seed)
        for _ in range(count):
            stream, expected = givenBackStream(rng, large)
            cuts = sorted(rng.sample(range(len(stream)), min(len(stream), rng.randint(0, 40))))
            if rng.random() < 0.5:  # reads of a record or more: kept as they are
                step = rng.choice([_native.FRAGMENT_SIZE + 4, 3 * _native.FRAGMENT_SIZE + 7])
                cuts = sorted({*cuts, *range(0, len(stream), step)})
            decoder = _native.FrameDecoder(None)
            got: list[Any] = []
            previous = 0
            for cut in [*cuts, len(stream)]:
                got.extend(decoder.feed(stream[previous:cut]))
                previous = cut
            self.assertEqual(canonical(got), canonical(expected))
        self.assertGreater(joined[0], 0)

    def test_pages(self) -> None:
        """Values of a few pages, in fragments of one page."""
        self.patch(_native, "FRAGMENT_SIZE", 4096)
        self.check(4, 60, 9000)

    def test_fullFragments(self) -> None:
        """Values of a few fragments of the usual size."""
        self.check(5, 15, 300_000)


# Decodes a 64 MiB value from the records of its message, read a record at a time or 1 MiB at
# a time (so each read holds four fragments, which the decoder copies out), and prints how much
# the process's peak resident memory grew from the start of the decoding, in multiples of the
# value's size, and whether the C speedups were loaded.
_PEAK_SCRIPT = """
import sys
from pbroker import _native
MiB = 1 << 20
# As in a process that has freed a buffer of some megabytes (a large read, say): glibc then
# keeps smaller blocks, the reads among them, in its heap, where freeing one gives nothing back.
warm = bytearray(16 * MiB)
del warm
size = 64 * MiB
codec = _native.ValueCodec(None, None, None, None, None, 10)
if sys.argv[2] == "alone":
    value = _native.Packed(_native.binHeader(size), b"v" * size)
elif sys.argv[2] == "bytes":  # in a value (spliced)
    value = codec.pack([b"name", {"blob": b"v" * size}])
else:  # text in a value (spliced)
    value = codec.pack([b"name", {"blob": "v" * size}])
records = _native.records([b"answer", 1, value])
del value
if sys.argv[1] == "records":  # a read for each record: kept as they are, not copied
    reads = records
else:  # four records in each read: copied out
    data = b"".join(records)
    reads = [data[i : i + MiB] for i in range(0, len(data), MiB)]
    del data
del records
decoder = _native.FrameDecoder(None)
def peak():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak starts again from here
start = peak()
out = []
for i in range(len(reads)):
    out += decoder.feed(reads[i])
    reads[i] = None
grew = (peak() - start) / size
if sys.argv[2] == "alone":
    assert len(out) == 1 and out[0][2].value == b"v" * size
else:
    assert type(out[0][2]) is _native.Spliced
    blob = codec.unpack(out[0][2])[1]["blob"]
    assert blob == (b"v" if sys.argv[2] == "bytes" else "v") * size
print(grew, _native._accelerator.speedups is not None)
"""


class FrameDecoderMemoryTests(SynchronousTestCase):
    def test_largeMessagePeak(self) -> None:
        """
        The value of a fragmented message is put together in about its size of memory: with
        the C speedups, each piece copied out of the reads is let go of (its pages given back)
        as soon as it is joined, so the peak grows by little more than the value, from the
        reads it is made from, however they came; without them, by the value once more (the
        pieces and the value), not twice (the pieces were copied again before being joined).
        So is a large byte string or ASCII text in a larger value, spliced out of it.
        (Linux: read from /proc.)
        """
        if not sys.platform.startswith("linux"):
            raise SkipTest("reads the peak resident memory from /proc")
        for reads, shape in itertools.product(("records", "chunks"), ("alone", "bytes", "text")):
            result = subprocess.run(
                [sys.executable, "-c", _PEAK_SCRIPT, reads, shape],
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            grew, speedups = result.stdout.split()
            # (With the C speedups, the first GIVE_BACK bytes, of reads kept as they are, are
            # given back only with the reads.)
            # (Without them, text is joined, then decoded: the pieces, the bytes, the text.)
            limit = 0.4 if speedups == "True" else 2.5 if shape == "text" else 1.5
            self.assertLess(float(grew), limit, (reads, shape))

    def test_tinyReads(self) -> None:
        """
        However small the reads, the pieces of a message take about its size in memory:
        a 300 KB value fed three bytes at a time peaks well under three times that.
        """
        value = b"t" * 300_000
        data = b"".join(_native.records([b"answer", 1, _native.Packed(value)]))
        decoder = _native.FrameDecoder(None)
        out: list[Any] = []
        tracemalloc.start()
        try:
            for start in range(0, len(data), 3):
                out.extend(decoder.feed(data[start : start + 3]))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual(len(out), 1)
        self.assertTrue(bytes(out[0][2]) == value)
        self.assertLess(peak, 3 * len(value))
