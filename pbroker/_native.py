"""
The wire of pbroker's native dialect (``pbroker2``): framing and values, sans-IO.

After banana's dialect negotiation picks ``pbroker2``, each side writes *records*::

    header: 4 bytes, big-endian   kind (top 2 bits) | length of the payload (30 bits)
    payload: `length` bytes

A message is one msgpack array (the same fields a PB message has). A message of up to
:data:`FRAGMENT_SIZE` bytes with all its values inside travels as one ``WHOLE`` record; a
larger one, or one with values carried after the array (every value of more than 64 KiB,
and some smaller ones: see ``docs/native.rst``), is cut into ``MORE`` records of exactly
:data:`FRAGMENT_SIZE` bytes ending with a ``LAST`` one (a single ``LAST`` at least), whose
joined payload starts with the array's length. Only one message is fragmented at a time in
each direction, and whole records may come between its fragments, which is what lets small
calls keep answering while a large value crosses.

Values inside a message (arguments, results, failures) are msgpack documents of their own,
carried as msgpack ``bin``. Plain data maps onto msgpack directly; what msgpack has no type
for travels as an extension:

=====  =============  ===============================================================
code   name           payload
=====  =============  ===============================================================
1      ``TUPLE``      a msgpack array of the items
2      ``SET``        a msgpack array of the items
3      ``FROZENSET``  a msgpack array of the items
4      ``JELLY``      banana (``none`` dialect) of the object's jelly s-expression
5      ``STREAM``     a msgpack integer: the sender's stream id
6      ``VALUE``      in a fragmented message's array only: the length (4 bytes, big-endian)
                      of the value that stands there, carried after the array
7      ``KEYED``      a whole value (a msgpack document) whose maps' keys may be anything
=====  =============  ===============================================================

A msgpack map's keys are text or byte strings, whose hashes Python randomises, unless the
value is wrapped in ``KEYED``: its receiver then checks the keys of each map before it builds
it (keys chosen to collide would make building it take time in proportion to the square of
their number; see :class:`HashBudget`), which costs about a microsecond a map. ``KEYED`` is
not nested in itself.

Everything jelly carries that is not plain data (references, copies, caches, failures,
big integers, instances allowed by the security options) goes through ``JELLY``, so the
security options and copy registries rule it exactly as on a ``pb`` connection.

One semantic difference from jelly, documented for users in ``docs/native.rst``: plain
containers (``list``, ``dict``, ``tuple``, ``set``) are sent by value, so a list that appears
twice in one value arrives as two equal lists; each object that goes through ``JELLY`` is
jellied on its own, so a copy that appears twice arrives as two copies as well. A value whose
plain containers form a cycle (or nest deeper than msgpack allows) is sent whole through
``JELLY`` and keeps its shape.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import operator
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, TypeVar

import msgpack

from pbroker import _accelerator
from pbroker._jellycore import ID_LIMIT, isPeerID
from pbroker.errors import (
    BananaDecodeError,
    InvalidJelly,
    LimitExceeded,
    PBrokerError,
    describe,
)

_Packed = TypeVar("_Packed")

__all__ = [
    "EXTENSION_DEPTH",
    "FRAGMENT_SIZE",
    "FROZENSET",
    "JELLY",
    "KEYED",
    "LAST",
    "MORE",
    "RECEIVED_EXTENSION_DEPTH",
    "SET",
    "STREAM",
    "TUPLE",
    "WHOLE",
    "FrameDecoder",
    "HashBudget",
    "Packed",
    "ValueCodec",
    "extensionsIn",
    "inline",
    "packMessage",
    "records",
    "wholeRecord",
]

TUPLE, SET, FROZENSET, JELLY, STREAM = 1, 2, 3, 4, 5
#: (6 is VALUE, in a message's envelope.)
KEYED = 7

#: Record kinds (the top two bits of a header).
WHOLE, MORE, LAST = 0, 1, 2

#: The largest payload of one record; larger messages are fragmented.
FRAGMENT_SIZE = 256 * 1024

_LENGTH_MASK = (1 << 30) - 1
# A read holding exactly one whole record takes a shortcut (FrameDecoder.feed); up to this
# size its payload is sliced off (a copy), above it viewed.
_SMALL = 4096
unpackb = msgpack.unpackb
#: How the values pbroker decodes take msgpack's timestamp extension (-1), which msgpack reads
#: itself, past any hook: as an int of nanoseconds (a kind of value the security options do not
#: rule), never as a ``msgpack.Timestamp`` (a class no option allows, that no stock peer sends).
_TIMESTAMP_AS_INT = 2

# The buffer the shared packers start with (msgpack's default is 256 KiB), the buffer each
# connection's packer starts with (it grows when a value needs more), and the largest a
# packer is allowed to keep after a value.
_BUFFER = 4096
_CONNECTION_BUFFER = 256
_KEEP = 256 * 1024
# Byte strings from this size on are packed by hand (a msgpack bin header, then the bytes) and
# kept as they are until the record that carries them is written: one copy in all, where the
# packer would copy them in and out of its buffer, and the envelope's packer in and out of
# its own, then the record's header would be joined to the envelope. Below it the packers'
# warm buffers measured faster (at 16 KiB, even for an answer; slower for a call).
_LARGE_BYTES = 32 * 1024
_BIN8 = b"\xc4"
_BIN16 = b"\xc5"
_BIN32 = b"\xc6"
_ARRAY_OF_ONE = b"\x91"
_ONE_BIN32 = _ARRAY_OF_ONE + _BIN32
# Parts of reads smaller than this are copied into a shared piece, not kept as they came.
_SMALL_PART = 16 * 1024
_header = struct.Struct(">I")
_packHeader = _header.pack
_unpackHeader = _header.unpack_from
_packShort = struct.Struct(">H").pack
# The one-byte headers of msgpack arrays of fewer than 16 items.
_ARRAY_HEADERS = [bytes((0x90 | count,)) for count in range(16)]

#: The extension type that stands, in a message's envelope, for a value sent after it.
VALUE = 6


class Packed:
    """
    A value already packed (arguments, a result, a failure): a message carries it after its
    envelope rather than inside it, so large values are not copied into the envelope.

    The packed bytes may come in parts (a header, then a large byte string as it is), so
    that they are not copied into one piece either.
    """

    __slots__ = ("parts", "size")

    def __init__(self, *parts: bytes | memoryview) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))

    @property
    def data(self) -> bytes:
        """
        The packed bytes in one piece.
        """
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"<Packed {self.size} bytes>"


#: What ValueCodec.limitSaid says of the peer's limit (see Broker._setItemLimit).
LIMIT_OF_THE_PEER = "of a message to the peer"


class _MessagePacker:
    """
    Packs message envelopes, setting :class:`Packed` values aside.
    """

    def __init__(self) -> None:
        self._values: list[bytes | memoryview] = []
        self._packer = msgpack.Packer(
            default=self._default, use_bin_type=True, autoreset=True, buf_size=_BUFFER
        )

    def _default(self, obj: Any) -> Any:
        if type(obj) is Packed:
            self._values.extend(obj.parts)
            return msgpack.ExtType(VALUE, _packHeader(obj.size))
        raise TypeError(f"a message cannot hold {type(obj).__name__} values")

    def pack(self, message: list[Any]) -> list[bytes | memoryview]:
        # The values are let go once packed: the shared packer would otherwise keep the last
        # message's large values (an answer of 100 MB, say) alive until the next such message.
        values = self._values
        try:
            envelope: bytes = self._packer.pack(message)
            return [_packHeader(len(envelope)) + envelope, *values]
        finally:
            values.clear()


class _SharedPacker(Generic[_Packed]):
    """
    A packer all connections share, for one message at a time.

    A message may be packed while another is being packed: the collector can run a
    RemoteReference's ``__del__`` (which sends a decref) in the middle of any allocation. The
    flag sends such a nested message through ``fresh`` (a new packer) instead, so the shared
    one's buffer is never written into twice.
    """

    __slots__ = ("_busy", "_fresh", "_shared")

    def __init__(
        self, shared: Callable[[list[Any]], _Packed], fresh: Callable[[list[Any]], _Packed]
    ) -> None:
        self._shared = shared
        self._fresh = fresh
        self._busy = False

    def pack(self, message: list[Any]) -> _Packed:
        if self._busy:
            return self._fresh(message)
        self._busy = True
        try:
            return self._shared(message)
        finally:
            self._busy = False


def _freshEnvelope(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def _freshParts(message: list[Any]) -> list[bytes | memoryview]:
    return _MessagePacker().pack(message)


#: Packs a message without :class:`Packed` values.
_packEnvelope = _SharedPacker[bytes](
    msgpack.Packer(use_bin_type=True, autoreset=True, buf_size=_BUFFER).pack, _freshEnvelope
).pack
#: Packs a message with :class:`Packed` values: its parts.
_packParts = _SharedPacker[list[bytes | memoryview]](_MessagePacker().pack, _freshParts).pack


#: Packed values up to this size travel inside the envelope, as msgpack ``bin``.
INLINE_LIMIT = 64 * 1024


def packMessage(message: list[Any]) -> tuple[list[bytes | memoryview], bool]:
    """
    The payload of one message as parts to be written one after the other, and whether it
    must be sent in fragments.

    A message without :class:`Packed` values is its envelope alone (a msgpack array of its
    fields); it is sent in one ``WHOLE`` record if it fits. Otherwise the payload is the
    length of the envelope (4 bytes), the envelope, then the :class:`Packed` values the
    envelope refers to, in order, and it is sent in fragments (``MORE`` records, then one
    ``LAST``), however small.
    """
    if any(type(field) is Packed for field in message):
        return _packParts(message), True
    envelope = _packEnvelope(message)
    if len(envelope) <= FRAGMENT_SIZE:
        return [envelope], False
    return [_packHeader(len(envelope)), envelope], True


#: Packs the usual messages in C: their records are what wholeRecord makes in Python.
_record: Callable[[list[Any], type, int, int], bytes | None] | None = (
    None if _accelerator.speedups is None else _accelerator.speedups.record
)


def wholeRecord(message: list[Any], plain: bool = False) -> bytes | None:
    """
    The ``WHOLE`` record (header and envelope) of a message that fits in one, or ``None``.

    A :class:`Packed` value of up to :data:`INLINE_LIMIT` bytes is carried in the envelope,
    as msgpack ``bin``; a message with a larger one does not fit (see :func:`packMessage`).

    :param plain: the caller knows that no field is :class:`Packed` (no need to look).
    """
    if _record is not None:
        record = _record(message, Packed, INLINE_LIMIT, FRAGMENT_SIZE)
        if record is not None:
            return record
    if not plain:
        kinds = list(map(type, message))
        if Packed in kinds:
            return _splicedRecord(message, kinds)
    envelope = _packEnvelope(message)
    size = len(envelope)
    if size > FRAGMENT_SIZE:
        return None
    return _packHeader(size) + envelope


def _splicedRecord(message: list[Any], kinds: list[type]) -> bytes | None:
    """
    The ``WHOLE`` record of a message with a :class:`Packed` value, which the envelope
    carries as msgpack ``bin``: the same bytes as packing the message with the value as
    bytes, but the value's parts are copied once, into the record, where they would go in
    and out of two packers' buffers. ``None`` (the message goes in fragments) if the value
    is over :data:`INLINE_LIMIT`, the record over :data:`FRAGMENT_SIZE`, or the message has
    more than one such value or 16 fields or more.

    :param kinds: the type of each field.
    """
    index = kinds.index(Packed)
    value = message[index]
    count = len(message)
    if value.size > INLINE_LIMIT or count > 15 or Packed in kinds[index + 1 :]:
        return None
    # The fields around the value, packed as lists of fewer than 16 items: each list's
    # header is one byte, replaced by the envelope's own (before) or dropped (after).
    before = memoryview(_packEnvelope(message[:index]))[1:]
    lead = binHeader(value.size)
    size = 1 + len(before) + len(lead) + value.size
    if index + 1 == count:  # an answer's value is its last field
        if size > FRAGMENT_SIZE:
            return None
        return b"".join([_packHeader(size), _ARRAY_HEADERS[count], before, lead, *value.parts])
    after = memoryview(_packEnvelope(message[index + 1 :]))[1:]
    size += len(after)
    if size > FRAGMENT_SIZE:
        return None
    return b"".join([_packHeader(size), _ARRAY_HEADERS[count], before, lead, *value.parts, after])


def binHeader(size: int) -> bytes:
    """
    The msgpack header of a ``bin`` of ``size`` bytes, in the smallest form, as msgpack
    writes it.
    """
    if size < 0x100:
        return _BIN8 + bytes((size,))
    if size < 0x10000:
        return _BIN16 + _packShort(size)
    return _BIN32 + _packHeader(size)


def _textHeader(size: int) -> bytes:
    """
    The msgpack header of a ``str`` of ``size`` bytes (of UTF-8), in the smallest form, as
    msgpack writes it.
    """
    if size < 32:
        return bytes((0xA0 | size,))
    if size < 0x100:
        return bytes((0xD9, size))
    if size < 0x10000:
        return b"\xda" + _packShort(size)
    return b"\xdb" + _packHeader(size)


def _arrayHeader(count: int) -> bytes:
    """
    The msgpack header of an array of ``count`` items, in the smallest form.
    """
    if count < 16:
        return _ARRAY_HEADERS[count]
    if count < 0x10000:
        return b"\xdc" + _packShort(count)
    return b"\xdd" + _packHeader(count)


def _extensionHeader(code: int, size: int) -> bytes:
    """
    The msgpack header of an extension of type ``code`` holding ``size`` bytes, in the
    smallest form, as msgpack writes it.
    """
    fixed = _FIXED_EXTENSIONS.get(size)
    if fixed is not None:
        return bytes((fixed, code))
    if size < 0x100:
        return bytes((0xC7, size, code))
    if size < 0x10000:
        return b"\xc8" + _packShort(size) + bytes((code,))
    return b"\xc9" + _packHeader(size) + bytes((code,))


# The fixext forms, by the size of their payload.
_FIXED_EXTENSIONS = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _mapHeader(count: int) -> bytes:
    """
    The msgpack header of a map of ``count`` entries, in the smallest form.
    """
    if count < 16:
        return bytes((0x80 | count,))
    if count < 0x10000:
        return b"\xde" + _packShort(count)
    return b"\xdf" + _packHeader(count)


#: The packed form of an empty dict (no keyword arguments).
EMPTY_MAP = b"\x80"


def inline(data: bytes | Packed) -> bytes | Packed:
    """
    A packed value as a message carries it: inline if small, else after the envelope.
    """
    if isinstance(data, Packed) or len(data) <= INLINE_LIMIT:
        return data
    return Packed(data)


def records(message: list[Any]) -> list[bytes]:
    """
    The records that carry ``message``: one ``WHOLE`` record, or fragments of at most
    :data:`FRAGMENT_SIZE`. (The broker writes fragments lazily; this is for tests.)
    """
    parts, fragmented = packMessage(message)
    payload = b"".join(parts)
    size = len(payload)
    if not fragmented:
        return [_packHeader(size) + payload]
    out = []
    view = memoryview(payload)
    for start in range(0, size, FRAGMENT_SIZE):
        chunk = view[start : start + FRAGMENT_SIZE]
        kind = LAST if start + FRAGMENT_SIZE >= size else MORE
        out.append(_packHeader(kind << 30 | len(chunk)) + bytes(chunk))
    return out


def fragmentHeader(kind: int, size: int) -> bytes:
    """
    The header of one record of ``kind`` carrying ``size`` bytes.
    """
    return _packHeader(kind << 30 | size)


#: For each message that carries values, a bit for each field that is one (packed bytes, which
#: the broker unpacks with :meth:`ValueCodec.unpack`): in a whole record, such a field of
#: ``_LARGE_BYTES`` or more is read as a view of the record, not copied once more before it is
#: unpacked (see :class:`FrameDecoder`).
VALUE_FIELDS: dict[bytes, int] = {
    **dict.fromkeys([b"message", b"cachemessage", b"callctx", b"cachecallctx"], 1 << 5 | 1 << 6),
    **dict.fromkeys([b"answer", b"answerctx", b"error", b"item", b"streamerror"], 1 << 2),
}

#: A message's payload past this many bytes is copied out of the reads (see
#: FrameDecoder._keep), and a byte string this large is joined by :data:`_joinParts`, so that
#: receiving a larger one takes about its size in memory, not twice that: the pieces'
#: memory is given back as the value is joined from them.
GIVE_BACK = 16 * 1024 * 1024

#: Joins the parts of a large byte string of a fragmented message, letting go of each (and,
#: in C, of the memory of each piece the decoder copied) once copied.
_joinParts: Callable[[list[Any]], bytes] = (
    b"".join if _accelerator.speedups is None else _accelerator.speedups.joinParts
)


def _noText(parts: list[Any]) -> str | None:
    return None


def _joinFor(size: int) -> Callable[[list[Any]], bytes]:
    """
    How to join the parts of a large byte string of ``size`` bytes: with :data:`_joinParts`
    (which gives back their memory) from :data:`GIVE_BACK` bytes on (memory given back is
    faulted in again when reused, which cost a stream of 4 MB messages a tenth of its speed).
    """
    return _joinParts if size >= GIVE_BACK else b"".join


#: Joins the parts of a large ASCII string of text as _joinParts joins bytes (None if a byte
#: is not ASCII, or without the C extension: the caller joins, then decodes).
_joinText: Callable[[list[Any]], str | None] = (
    _noText if _accelerator.speedups is None else _accelerator.speedups.joinText
)

#: Reads a whole record's envelope of the usual shape (see VALUE_FIELDS), or says ``None``:
#: msgpack reads it.
_envelope: Callable[[bytes, int, int, int, dict[bytes, int]], list[Any] | None] | None = (
    None if _accelerator.speedups is None else _accelerator.speedups.envelope
)


class FrameDecoder:
    """
    Turns the bytes of a ``pbroker2`` stream into message envelopes (lists).

    It shares :class:`pbroker.banana.Decoder`'s contract, so the banana protocol drives it the
    same way: :meth:`feed` returns the messages completed, and raises
    :class:`~pbroker.errors.BananaDecodeError` (with the messages completed before the fault on
    ``expressions``) when the stream is malformed or a message is larger than
    ``messageSizeLimit``; it then refuses further input.
    """

    def __init__(
        self, messageSizeLimit: int | None, valueFields: dict[bytes, int] = VALUE_FIELDS
    ) -> None:
        self.messageSizeLimit = messageSizeLimit
        if type(valueFields) is not dict or not all(
            type(command) is bytes and type(bits) is int for command, bits in valueFields.items()
        ):
            raise TypeError(f"valueFields must map bytes to int bits, not {valueFields!r:.80}")
        self._valueFields = valueFields
        self._buffer = bytearray()
        self._position = 0
        # The payload of the message being reassembled, as the pieces it came in (views of
        # the reads, not copies: see _keep), and its size so far.
        self._pieces: list[bytes | bytearray | memoryview] = []
        self._fragmented = 0
        # Bytes of a fragment still to come after its header (they go straight into
        # _pieces, not through _buffer), and whether that fragment is the message's last.
        self._pending = 0
        self._pendingLast = False
        self._failure: str | None = None

    @property
    def buffered(self) -> int:
        """
        Bytes received but not yet part of a completed message (the headers of fragments
        already taken in are not counted).
        """
        return len(self._buffer) - self._position + self._fragmented

    @property
    def largeMessage(self) -> bool:
        """
        Whether a message larger than one record is arriving (the broker reads it in larger
        chunks): a MORE record is being taken in, or one was (every MORE record is full).
        """
        return self._fragmented >= FRAGMENT_SIZE or (self._pending > 0 and not self._pendingLast)

    @property
    def midExpression(self) -> bool:
        """
        Whether part of a message has arrived.
        """
        return len(self._buffer) > self._position or self._fragmented > 0 or self._pending > 0

    def feed(self, data: bytes = b"") -> list[Any]:
        if self._failure is not None:
            raise BananaDecodeError(f"decoder stopped after an earlier error: {self._failure}")
        if type(data) is not bytes:
            data = bytes(data)  # kept by reference (see _keep): it must not change
        size = len(data) - 4
        if 0 <= size <= FRAGMENT_SIZE and not self._buffer and not self._fragmented:
            # The common case, one whole record and nothing before it, without the general
            # loop. (A header that says otherwise goes the long way, to its error.)
            (header,) = _unpackHeader(data, 0)
            if (
                header == size
                and not self._pending
                and (self.messageSizeLimit is None or size <= self.messageSizeLimit)
            ):
                if size >= _LARGE_BYTES and _envelope is not None:
                    message = _envelope(data, 4, size + 4, _LARGE_BYTES, self._valueFields)
                    if message is not None:
                        return [message]
                try:
                    return [
                        unpackb(
                            data[4:] if size <= _SMALL else memoryview(data)[4:],
                            raw=False,
                            strict_map_key=True,
                            use_list=True,
                            ext_hook=_noExtension,
                            timestamp=_TIMESTAMP_AS_INT,
                        )
                    ]
                except Exception:
                    pass  # the long way reports it
        results: list[Any] = []
        try:
            self._parse(data, results)
        except BananaDecodeError as e:
            e.expressions = results
            self._failure = str(e)
            self._buffer = bytearray()
            self._position = 0
            self._pieces = []
            self._fragmented = 0
            self._pending = 0
            self._pendingLast = False
            raise
        return results

    def _parse(self, data: bytes | memoryview, results: list[Any]) -> None:
        if self._pending:
            # The rest of a fragment, however it is split.
            take = min(self._pending, len(data))
            self._keep(data, 0, take)
            self._fragmented += take
            self._pending -= take
            if self._pending:
                return
            if self._pendingLast:
                results.append(self._completed())
            if take == len(data):
                return
            data = memoryview(data)[take:]
        stored = self._buffer
        buffer: bytes | bytearray | memoryview
        if self._position:
            del stored[: self._position]
            self._position = 0
        if stored:
            stored += data
            buffer = stored
        else:
            buffer = data  # nothing left over: parse the caller's bytes where they are
        end = len(buffer)
        position = 0
        limit = self.messageSizeLimit
        view = memoryview(buffer)
        # A header this small is a WHOLE record (kind 0) of a size this side accepts.
        wholeLimit = FRAGMENT_SIZE if limit is None or limit > FRAGMENT_SIZE else limit
        try:
            while end - position >= 4:
                (header,) = _unpackHeader(buffer, position)
                if header <= wholeLimit:  # the common case, ahead of the checks below
                    start = position + 4
                    stop = start + header
                    if stop > end:
                        break
                    if header >= _LARGE_BYTES and type(buffer) is bytes and _envelope is not None:
                        message = _envelope(buffer, start, stop, _LARGE_BYTES, self._valueFields)
                        if message is not None:
                            results.append(message)
                            position = stop
                            continue
                    try:
                        message = unpackb(
                            view[start:stop],
                            raw=False,
                            strict_map_key=True,
                            use_list=True,
                            ext_hook=_noExtension,
                            timestamp=_TIMESTAMP_AS_INT,
                        )
                    except Exception as e:
                        raise BananaDecodeError(
                            f"a malformed pbroker2 message: {_malformed(e)}"
                        ) from None
                    results.append(message)
                    position = stop
                    continue
                kind = header >> 30
                size = header & _LENGTH_MASK
                if size > FRAGMENT_SIZE:
                    raise BananaDecodeError(
                        f"a pbroker2 record of {size} bytes; records carry at most "
                        f"{FRAGMENT_SIZE} bytes"
                    )
                if kind == WHOLE:  # not taken above: it is over the limit
                    assert limit is not None
                    raise BananaDecodeError(_tooLarge(size, limit))
                if kind in (MORE, LAST):
                    if (kind == MORE and size != FRAGMENT_SIZE) or size == 0:
                        # Every fragment but the last is full: a peer cannot make this side
                        # hold many small pieces (or count nothing against the limit).
                        raise BananaDecodeError(
                            f"a pbroker2 fragment of {size} bytes (all but the last carry "
                            f"{FRAGMENT_SIZE}, the last at least one)"
                        )
                    total = self._fragmented + size
                    if limit is not None and total > limit:
                        raise BananaDecodeError(_tooLarge(total, limit))
                    available = min(size, end - position - 4)
                    start = position + 4
                    self._keep(buffer, start, start + available, copy=buffer is stored)
                    self._fragmented += available
                    position += 4 + available
                    if available < size:
                        # The rest follows in later reads (see the top of this method).
                        self._pending = size - available
                        self._pendingLast = kind == LAST
                        break
                    if kind == LAST:
                        results.append(self._completed())
                else:
                    raise BananaDecodeError(f"an unknown pbroker2 record kind: {kind}")
        finally:
            view.release()
            if buffer is stored:
                self._position = position
            elif position < end:
                stored += memoryview(data)[position:]

    def _keep(
        self, data: bytes | bytearray | memoryview, start: int, stop: int, copy: bool = False
    ) -> None:
        """
        Add ``data[start:stop]`` to the message's payload. A large part of a read is kept
        as it is (the read, or a view of it), so that its bytes are copied only when the
        message is put together. A small part, a small share of a large read, or a part of
        bytes that will change (``copy``) is copied into a piece of its own, which the
        small parts that follow join: however small the reads, the pieces stay few and
        large, and the memory they take close to the payload's size. So is every part past
        the first :data:`GIVE_BACK` bytes of the payload: a piece of the decoder's own gives
        its memory back as a large value is joined from it (see :data:`_joinParts`), where a
        read (which others may hold) keeps its memory until the whole value is made.
        """
        size = stop - start
        if size <= 0:
            return
        pieces = self._pieces
        if copy or size < _SMALL_PART or size * 2 < len(data) or self._fragmented >= GIVE_BACK:
            last = pieces[-1] if pieces else None
            if type(last) is bytearray and len(last) < _SMALL_PART:
                last += memoryview(data)[start:stop]
            else:
                pieces.append(bytearray(memoryview(data)[start:stop]))
        elif size == len(data):
            pieces.append(data)
        else:
            pieces.append(memoryview(data)[start:stop])

    def _completed(self) -> Any:
        """
        The message whose last fragment has arrived.
        """
        pieces, size = self._pieces, self._fragmented
        # (Pieces copied into bytearrays are not copied again into bytes here: that took the
        # payload's size twice over at once, on top of the value joined from them. They no
        # longer change, and _value copies what would be a view of one out of it.)
        self._pieces = []
        self._fragmented = 0
        return _assemble(pieces, size)


def _noExtension(code: int, data: bytes) -> Any:
    """
    Refuse an extension in the envelope of a whole record, which has none (its values are
    ``bin``; a fragmented message's refer to what follows it, see :func:`_assemble`): an
    ``ExtType`` must not reach a call's annotations.
    """
    raise BananaDecodeError(f"an unknown extension type {code} in a message envelope")


def _tooLarge(size: int, limit: int) -> str:
    return f"a pbroker2 message of at least {size} bytes is over the limit of {limit} bytes"


class Unpacked:
    """
    A value of a received message that the frame decoder has already unpacked: a large byte
    string, alone or as the one item of a list, as :meth:`ValueCodec.pack` packs it by hand.
    Putting it together from the pieces it came in is its only copy.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<Unpacked {type(self.value).__name__}>"


class _Reader:
    """
    Reads a payload held as pieces, front to back.
    """

    def __init__(self, pieces: list[bytes | bytearray | memoryview], size: int) -> None:
        self._pieces: list[memoryview | None] = [memoryview(piece) for piece in pieces]
        self._index = 0
        self._offset = 0  # into the current piece
        self.left = size

    def take(self, count: int) -> list[memoryview]:
        """
        The next ``count`` bytes (at most what is left), as views of the pieces.
        """
        count = min(count, self.left)
        self.left -= count
        parts = []
        while count:
            piece = self._pieces[self._index]
            assert piece is not None
            start = self._offset
            available = len(piece) - start
            if available <= count:
                parts.append(piece[start:] if start else piece)
                self._pieces[self._index] = None  # (read once: its last view frees it)
                self._index += 1
                self._offset = 0
                count -= available
            else:
                parts.append(piece[start : start + count])
                self._offset = start + count
                count = 0
        return parts


def _lead(parts: list[memoryview], count: int) -> bytes:
    """
    The first ``count`` bytes of ``parts`` (fewer if there are not that many).
    """
    lead = b""
    for part in parts:
        lead += part[: count - len(lead)]
        if len(lead) == count:
            break
    return lead


def _drop(parts: list[memoryview], count: int) -> list[memoryview]:
    """
    ``parts`` without their first ``count`` bytes.
    """
    while count:
        first = parts[0]
        if len(first) <= count:
            count -= len(first)
            parts = parts[1:]
        else:
            parts = [first[count:], *parts[1:]]
            count = 0
    return parts


def _value(parts: list[memoryview], length: int) -> bytes | memoryview | Unpacked | Spliced:
    """
    One value after a message's envelope: its msgpack bytes; for a large byte string
    packed by hand (alone, or the one item of a list), the string itself; for a large value
    with large byte strings in its containers, a :class:`Spliced`.
    """
    lead = _lead(parts, 6)
    # A large byte string is joined by _joinParts, which lets go of each part (and, in C,
    # of its memory) once copied: the pieces and the value do not take its size twice.
    join = _joinFor(length)
    if length >= 5 and lead[:1] == _BIN32 and _unpackHeader(lead, 1)[0] == length - 5:
        rest = _drop(parts, 5)
        parts.clear()
        return Unpacked(join(rest))
    if length >= 6 and lead[:2] == _ONE_BIN32 and _unpackHeader(lead, 2)[0] == length - 6:
        rest = _drop(parts, 6)
        parts.clear()
        return Unpacked([join(rest)])
    if length >= _SPLICE_FROM:
        spliced = _spliced(parts, length)
        if spliced is not None:
            return spliced
    if len(parts) != 1:
        return b"".join(parts)
    # Not a view of a bytearray piece: values must not be views of bytes that can change
    # (nor unhashable as such).
    part = parts[0]
    return part if part.readonly else bytes(part)


class Spliced:
    """
    A value of a received message whose large strings (bytes, and text: decoded, or the error
    that refuses it) the frame decoder has already put together, each from the pieces it came
    in, and the rest of whose msgpack document it has copied out around them, with a
    :data:`_PLACEHOLDER` extension where each was: :meth:`ValueCodec.unpack` puts them back
    in their places.
    """

    __slots__ = ("document", "size", "values")

    def __init__(
        self, document: bytes, values: list[bytes | str | UnicodeDecodeError], size: int
    ) -> None:
        self.document = document
        self.values = values
        self.size = size

    def __repr__(self) -> str:
        return f"<Spliced {len(self.values)} strings in {self.size} bytes>"


#: A value of this many bytes or more is looked through for large strings, to send (and
#: receive) each as it is rather than copied in and out of a packed document with the rest.
_SPLICE_FROM = 1024 * 1024
#: The most items a value may hold up to its first large string, between two and after the
#: last, to be looked through (each is read by a Python loop, which costs a few tenths of
#: a microsecond: a large value of many small items is not worth looking through, and goes
#: whole through msgpack, as any other).
_SPLICE_AROUND = 256
#: The most items a value may hold in all, to be looked through.
_SPLICE_ITEMS = 65536
#: How deeply containers are looked into for large strings, to send.
_SPLICE_DEPTH = 32
#: The extension type that stands for a large string in a :class:`Spliced` document: it
#: never travels (a value that carries it is not spliced, and the codec refuses it as unknown).
_PLACEHOLDER = 127


def _holdsLargeStrings(value: Any) -> bool:
    """
    Whether a byte or text string of :data:`_LARGE_BYTES` or more is among the first
    :data:`_SPLICE_AROUND` items of ``value``'s lists, dicts, tuples and sets, in the order
    they are packed (a quick look, before packing it in parts: most large values are many
    small items).
    """
    pending = [value]
    budget = _SPLICE_AROUND
    while pending and budget > 0:
        item = pending.pop()
        budget -= 1
        kind = type(item)
        if _stringSize(item) >= _LARGE_BYTES:
            return True
        if kind is list or kind is tuple:
            pending.extend(reversed(item[:budget]))
        elif kind is dict:
            pending.extend(reversed(list(itertools.islice(item.values(), budget))))
        elif kind is set or kind is frozenset:
            pending.extend(reversed(list(itertools.islice(item, budget))))
    return False


# The types sent as msgpack bin.
_BYTE_STRINGS: Final = frozenset({bytes, bytearray, memoryview})


def _stringSize(item: Any) -> int:
    """
    The bytes of a byte string, bytearray or memoryview, or the characters of a text (its
    UTF-8 bytes at least); -1 for anything else.
    """
    kind = type(item)
    if kind is bytes or kind is str or kind is bytearray:
        return len(item)
    if kind is memoryview:
        return item.nbytes  # type: ignore[no-any-return]
    return -1


def _largePart(item: Any, text: bool) -> tuple[bytes, bytes | memoryview] | None:
    """
    The msgpack header and the bytes of a large string (of :data:`_LARGE_BYTES` or more) to
    be sent as a part of its own: a byte string as it is, a bytearray copied as it is now (it
    may change before it is written), a memoryview as :func:`_viewPart` gives it, and, if
    ``text``, a text encoded (a surrogate raises UnicodeEncodeError). ``None`` for anything
    else, or a view whose bytes are not in one piece.
    """
    if _stringSize(item) < _LARGE_BYTES:
        return None
    kind = type(item)
    if kind is bytes:
        return binHeader(len(item)), item
    if kind is bytearray:
        return binHeader(len(item)), bytes(item)
    if kind is memoryview:
        part = _viewPart(item)
        return None if part is None else (binHeader(item.nbytes), part)
    if text:
        data = item.encode("utf-8")
        return _textHeader(len(data)), data
    return None


def notInOnePiece(why: str = "") -> TypeError:
    """
    The error for a memoryview whose bytes are not in one piece, which no dialect sends
    (``why``: what found it, after the first words).
    """
    return TypeError(
        f"a memoryview whose bytes are not in one piece cannot be sent{why}: send "
        "bytes(view), or view.tobytes()"
    )


def _viewPart(view: memoryview) -> memoryview | bytes | None:
    """
    The bytes of a memoryview, as a part of a packed value: a view of them if they are a
    byte string's (which cannot change before they are written), else a copy of them as they
    are now; ``None`` if they are not in one piece (msgpack refuses such a view).
    """
    if not view.c_contiguous:
        return None
    if view.readonly and type(view.obj) is bytes:
        return view.cast("B") if view.ndim != 1 or view.format != "B" else view
    return view.tobytes()


def _placeholder(index: int) -> bytes:
    return b"\xd6\x7f" + _packHeader(index)  # fixext 4, type _PLACEHOLDER


class _Positions:
    """
    Reads a payload held as parts by position, without joining them.
    """

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.starts: list[int] = []
        total = 0
        for part in parts:
            self.starts.append(total)
            total += len(part)
        self.size = total
        # The part read last, and where it starts and ends.
        self._part = parts[0] if parts else memoryview(b"")
        self._start = 0
        self._end = len(self._part)

    def read(self, position: int, count: int) -> bytes | memoryview:
        """
        ``count`` bytes from ``position`` (fewer at the end): a view, if they are in the part
        read last (as they mostly are), else a copy.
        """
        offset = position - self._start
        if offset >= 0 and position + count <= self._end:
            return self._part[offset : offset + count]
        stop = min(position + count, self.size)
        index = bisect.bisect_right(self.starts, position) - 1
        if 0 <= index < len(self.parts) and stop <= self.starts[index] + len(self.parts[index]):
            self._part = self.parts[index]
            self._start = self.starts[index]
            self._end = self._start + len(self._part)
            return self._part[position - self._start : stop - self._start]
        return b"".join(self.views(position, stop))

    def views(self, start: int, stop: int) -> list[memoryview]:
        """
        The bytes from ``start`` to ``stop``, as views of the parts.
        """
        views = []
        index = bisect.bisect_right(self.starts, start) - 1
        parts = self.parts
        starts = self.starts
        while start < stop:
            part = parts[index]
            offset = start - starts[index]
            take = min(len(part) - offset, stop - start)
            views.append(part[offset : offset + take] if take < len(part) else part)
            start += take
            index += 1
        return views


class _Document:
    """
    A tuple's, set's or ``KEYED`` extension met by :func:`_largeBins`: where its header and
    payload are, and how much smaller the payload gets as its large strings are left out.
    """

    __slots__ = ("edit", "end", "header", "shrunk", "width")

    def __init__(self, header: int, width: int, end: int, edit: list[Any]) -> None:
        self.header = header
        self.width = width
        self.end = end
        self.edit = edit
        self.shrunk = 0


def _largeBins(payload: _Positions) -> list[list[Any]] | None:
    """
    The edits that leave the large strings (``bin`` or ``str`` of :data:`_LARGE_BYTES` bytes
    or more) out of a msgpack document, in order: ``[start, stop, None, (begin, end, text)]``
    for a string whose header starts at ``start``, whose bytes are ``begin`` to ``end``
    (= ``stop``), and which is text (``str``) or not, and
    ``[start, stop, header, None]`` for the new header (same form, shorter length) of a tuple,
    set or ``KEYED`` extension that holds some, whose payloads are looked into as documents
    of their own.

    ``None`` if it has no large string, more than :data:`_SPLICE_AROUND` items before the
    first, between two or after the last, more than :data:`_SPLICE_ITEMS` in all, tuples and
    sets nested deeper than :data:`RECEIVED_EXTENSION_DEPTH` or a ``KEYED`` extension in
    another (which the codec refuses), a :data:`_PLACEHOLDER` extension anywhere it looks, or
    is not well-formed (msgpack then says what is wrong with it).
    """
    end = payload.size
    read = payload.read
    edits: list[list[Any]] = []
    strings = 0
    position = 0
    # Per open document: the items still to read in it (in all its arrays and maps), the
    # extension it is the payload of (None for the value itself), how many tuples and sets
    # it is in (the codec refuses more than RECEIVED_EXTENSION_DEPTH; a KEYED extension is
    # not one of them), and whether it is in a KEYED one (the codec refuses a second).
    stack: list[list[Any]] = [[1, None, 0, False]]
    budget = _SPLICE_AROUND
    total = _SPLICE_ITEMS
    while stack:
        frame = stack[-1]
        if not frame[0]:
            stack.pop()
            document = frame[1]
            if document is not None:
                if position != document.end:
                    return None  # its payload is not one document
                if document.shrunk:
                    head = read(document.header, 1 + document.width + 1)
                    length = int.from_bytes(head[1:-1], "big") - document.shrunk
                    document.edit[2] = (
                        bytes(head[:1]) + length.to_bytes(document.width, "big") + bytes(head[-1:])
                    )
            continue
        if position >= end or not budget or not total:
            return None
        frame[0] -= 1
        budget -= 1
        total -= 1
        head = read(position, 10)
        byte = head[0]
        if byte < 0x80 or byte >= 0xE0:  # positive and negative fixint
            position += 1
        elif byte < 0x90:  # fixmap
            frame[0] += 2 * (byte & 0x0F)
            position += 1
        elif byte < 0xA0:  # fixarray
            frame[0] += byte & 0x0F
            position += 1
        elif byte < 0xC0:  # fixstr
            position += 1 + (byte & 0x1F)
        else:
            form = _FORMS.get(byte)
            if form is None:
                return None  # 0xc1, never used
            width, skip, perItem = form
            if len(head) < 1 + width:
                return None
            length = int.from_bytes(head[1 : 1 + width], "big") if width else 0
            start = position + 1 + width
            if perItem:
                frame[0] += perItem * length
                position = start
            elif byte in _EXTENSION_FORMS:
                if len(head) < 2 + width:
                    return None
                code = head[1 + width]
                if code == _PLACEHOLDER:
                    return None
                stop = start + (skip if byte >= 0xD4 else 1 + length)
                if code in _DOCUMENTS:
                    keyed = code == KEYED
                    levels = frame[2] + (not keyed)
                    if levels > RECEIVED_EXTENSION_DEPTH or (keyed and frame[3]):
                        return None
                    edit = [position, start + 1, None, None]
                    edits.append(edit)
                    document = _Document(position, width, stop, edit)
                    stack.append([1, document, levels, keyed or frame[3]])
                    position = start + 1
                else:
                    position = stop
            else:
                stop = start + skip + length
                if length >= _LARGE_BYTES and (0xC4 <= byte <= 0xC6 or 0xD9 <= byte <= 0xDB):
                    edits.append([position, stop, None, (start, stop, byte >= 0xD9)])
                    strings += 1
                    budget = _SPLICE_AROUND
                    shrunk = stop - position - len(_placeholder(0))
                    for each in stack:
                        if each[1] is not None:
                            each[1].shrunk += shrunk
                position = stop
    if position != end or not strings:
        return None
    return [edit for edit in edits if edit[2] is not None or edit[3] is not None]


def _spliced(parts: list[memoryview], length: int) -> Spliced | None:
    """
    A large value's large byte strings, each put together from the parts it is in, and the
    rest of its document copied out around them (see :class:`Spliced`); ``None`` if it has
    none that can be (see :func:`_largeBins`).

    Each string is joined as :func:`_value` joins one alone, so that it, the parts and the
    document do not take its size two or three times.
    """
    payload = _Positions(parts)
    edits = _largeBins(payload)
    if edits is None:
        return None
    views = payload.views
    document: list[memoryview | bytes] = []
    strings: list[list[memoryview] | None] = []
    texts: list[bool] = []
    done = 0
    for start, stop, header, string in edits:
        document += views(done, start)
        if string is None:
            document.append(header)
        else:
            document.append(_placeholder(len(strings)))
            strings.append(views(string[0], string[1]))
            texts.append(string[2])
        done = stop
    document += views(done, length)
    parts.clear()  # the views hold them, and let go of each once the strings after it are made
    del payload, edits
    copied = b"".join(document)
    del document
    values: list[bytes | str | UnicodeDecodeError] = []
    for index, string in enumerate(strings):
        assert string is not None
        strings[index] = None
        size = sum(map(len, string))
        join = _joinFor(size)
        if texts[index]:
            # (ASCII, in C, is put together once, as _joinFor would join bytes.)
            text = _joinText(string) if join is _joinParts else None
            if text is None:
                data = join(string)
                try:
                    text = str(data, "utf-8")
                except UnicodeDecodeError as e:
                    # Refused when the value is unpacked, as msgpack would refuse it. (Kept
                    # without its traceback, whose frame, this one, holds ``values``: in a
                    # cycle, the value's strings would outlive it until the collector ran.)
                    values.append(e.with_traceback(None))
                    continue
                finally:
                    del data
            values.append(text)
        else:
            values.append(join(string))
        del string
    return Spliced(copied, values, length)


def _assemble(pieces: list[bytes | bytearray | memoryview], size: int) -> Any:
    """
    The fields of a fragmented message, from the pieces of its payload: the length of its
    envelope, the envelope, then the values it refers to (see :func:`packMessage`).
    """
    reader = _Reader(pieces, size)
    pieces.clear()  # the reader's views hold them, and let go of each once it is read
    if size < 4:
        raise BananaDecodeError("a pbroker2 message shorter than its envelope length")
    (envelopeSize,) = _unpackHeader(b"".join(reader.take(4)), 0)
    if reader.left < envelopeSize:
        raise BananaDecodeError("a pbroker2 message shorter than its envelope")
    # (Copied: a view would hold the piece it is in while the values after it are joined.)
    envelope = b"".join(reader.take(envelopeSize))

    def value(code: int, data: bytes) -> Any:
        if code != VALUE or len(data) != 4:
            raise BananaDecodeError(f"an unknown extension type {code} in a message envelope")
        (length,) = _unpackHeader(data, 0)
        if length > reader.left:
            raise BananaDecodeError("a pbroker2 message shorter than its values")
        return _value(reader.take(length), length)

    try:
        message = msgpack.unpackb(
            envelope,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=value,
            timestamp=_TIMESTAMP_AS_INT,
        )
    except BananaDecodeError:
        raise
    except Exception as e:
        raise BananaDecodeError(f"a malformed pbroker2 message: {_malformed(e)}") from None
    if reader.left:
        raise BananaDecodeError("a pbroker2 message with bytes after its values")
    # Only values go out of line: a command that did would come out as bytes or as a view
    # of the read, depending on how the message was cut into records.
    kind = envelope[0] if envelope else 0
    first = 3 if kind == 0xDC else 5 if kind == 0xDD else 1 if 0x91 <= kind <= 0x9F else 0
    if first and len(envelope) > first and envelope[first] in _EXTENSION_FORMS:
        raise BananaDecodeError("a pbroker2 message whose command is carried out of line")
    return message


_PLAIN_SEQUENCES: dict[type, int] = {tuple: TUPLE, set: SET, frozenset: FROZENSET}
_REBUILD: dict[int, Callable[[list[Any]], Any]] = {TUPLE: tuple, SET: set, FROZENSET: frozenset}
_first = operator.itemgetter(0)

# The extensions whose payload is a msgpack document.
_DOCUMENTS = frozenset({*_REBUILD, KEYED})

#: How deeply msgpack itself nests arrays and maps, packing or unpacking.
MSGPACK_DEPTH = 1024

#: The deepest tuples and sets nest in a value sent. Each is an extension holding a msgpack
#: document of its own, written (and read) by a nested call of msgpack's C code, which
#: recurses on the C stack: an encoder goes up to 1,024 lists deep in each document, and
#: twenty-four levels of that crashed the process. A value that nests deeper is sent through
#: ``JELLY`` whole, which nests without bound (in memory, not on the stack).
EXTENSION_DEPTH = 8

#: The deepest tuples and sets may nest in a value received: what a sender sends. Each level
#: is decoded from a copy msgpack makes of what it holds, all alive at once, so a value nested
#: 32 deep (as earlier versions accepted) took some 36 times its size; and a decoder takes
#: some 30 KiB of C stack per level (two hundred crashed the process).
RECEIVED_EXTENSION_DEPTH = EXTENSION_DEPTH

# The bytes after each msgpack type byte from 0xc0 on that are not payload: (the width of a
# length that follows, or 0; a fixed size to skip besides; items: 0, or 1 per array entry
# and 2 per map entry). Type bytes below 0xc0 are fixed forms, decoded in deeperThan.
_FORMS: dict[int, tuple[int, int, int]] = {
    0xC0: (0, 0, 0),  # nil
    0xC2: (0, 0, 0),  # false
    0xC3: (0, 0, 0),  # true
    0xC4: (1, 0, 0),  # bin 8, 16, 32
    0xC5: (2, 0, 0),
    0xC6: (4, 0, 0),
    0xC7: (1, 1, 0),  # ext 8, 16, 32 (the type byte besides)
    0xC8: (2, 1, 0),
    0xC9: (4, 1, 0),
    0xCA: (0, 4, 0),  # float 32, 64
    0xCB: (0, 8, 0),
    0xCC: (0, 1, 0),  # uint 8..64
    0xCD: (0, 2, 0),
    0xCE: (0, 4, 0),
    0xCF: (0, 8, 0),
    0xD0: (0, 1, 0),  # int 8..64
    0xD1: (0, 2, 0),
    0xD2: (0, 4, 0),
    0xD3: (0, 8, 0),
    0xD4: (0, 2, 0),  # fixext 1..16 (the type byte besides)
    0xD5: (0, 3, 0),
    0xD6: (0, 5, 0),
    0xD7: (0, 9, 0),
    0xD8: (0, 17, 0),
    0xD9: (1, 0, 0),  # str 8, 16, 32
    0xDA: (2, 0, 0),
    0xDB: (4, 0, 0),
    0xDC: (2, 0, 1),  # array 16, 32
    0xDD: (4, 0, 1),
    0xDE: (2, 0, 2),  # map 16, 32
    0xDF: (4, 0, 2),
}
# The type bytes of extensions: ext 8, 16, 32 and fixext 1..16.
_EXTENSION_FORMS = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


def deeperThan(data: bytes | memoryview, limit: int) -> bool:
    """
    Whether arrays and maps nest more than ``limit`` deep in the msgpack document ``data``
    (``[]`` and ``[1]`` are one deep), counting the arrays that tuples and sets carry in
    their extensions as they come; read without building anything, and stopped as soon as
    the answer is known. Other extensions and ``bin`` payloads are not looked into.
    Malformed data is judged by what was read before the fault (msgpack then reports it).
    """
    end = len(data)
    if end <= limit:
        return False  # each level takes a byte at least
    position = 0
    # Per open level: the items still to read in it, and whether it is an array or map
    # (else the payload of a tuple's or set's extension, one document, not a level).
    left = [1]
    counted = [False]
    depth = 0
    while left and position < end:
        left[-1] -= 1
        byte = data[position]
        position += 1
        items = 0
        if byte < 0x80 or byte >= 0xE0:  # positive and negative fixint
            pass
        elif byte < 0x90:  # fixmap
            items = 2 * (byte & 0x0F) + 1
        elif byte < 0xA0:  # fixarray
            items = (byte & 0x0F) + 1
        elif byte < 0xC0:  # fixstr
            position += byte & 0x1F
        else:
            form = _FORMS.get(byte)
            if form is None:
                return False  # 0xc1, never used
            width, skip, perItem = form
            length = int.from_bytes(data[position : position + width], "big") if width else 0
            position += width
            if perItem:
                items = perItem * length + 1
            elif byte in _EXTENSION_FORMS:
                # An extension: its type byte, then its payload.
                code = data[position] if position < end else -1
                position += 1
                if byte >= 0xD4:
                    length = skip - 1
                if code in _DOCUMENTS:
                    left.append(1)  # the payload: one document, read in place
                    counted.append(False)
                    continue
                position += length
            else:
                position += skip + length
        if items:
            left.append(items - 1)  # (+1 and -1: a container counts even when empty)
            counted.append(True)
            depth += 1
            if depth > limit:
                return True
        while left and not left[-1]:
            left.pop()
            if counted.pop():
                depth -= 1
    return False


_STRICT_KEYS = " is not allowed for map key when strict_map_key=True"
_STRICT_KEYS_FALLBACK = " is not allowed for map key"


def _malformed(error: Exception) -> str:
    """
    What msgpack's ``error`` says is wrong with a document, in a few words.
    """
    text = str(error)
    kind = None
    if text.endswith(_STRICT_KEYS):
        kind = text[: -len(_STRICT_KEYS)]
    elif text.endswith(_STRICT_KEYS_FALLBACK):
        # (msgpack's pure-Python unpacker, MSGPACK_PUREPYTHON: "<class 'int'> is not ...")
        kind = text[: -len(_STRICT_KEYS_FALLBACK)]
        if kind.startswith("<class '") and kind.endswith("'>"):
            kind = kind[8:-2]
    if kind is not None:
        # Maps are read with text and byte string keys only: Python randomises their hashes,
        # so that they cannot be chosen to collide (other keys arrive as jelly, checked).
        return f"a map key of type {kind} (keys must be text or bytes)"
    return describe(text)


class _Raised(Exception):
    """
    Carries an error raised while a value's jelly was unjellied out through msgpack.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


# How deeply extent() lets containers nest: deeper than packing goes (tuples and sets each
# hold a document of their own, EXTENSION_DEPTH of them, in which lists and dicts nest 1,025
# deep), so that a value packing takes is not taken from it; one that nests deeper is jellied
# (see ValueCodec.pack), as packing would end up doing.
_WALK_DEPTH: Final = (EXTENSION_DEPTH + 1) * (MSGPACK_DEPTH + 2)

# extent() counts no further (so that its counts fit in a C Py_ssize_t).
_MAX_BUDGET: Final = sys.maxsize // 4

# What extent() finds.
EXTENT_WITHIN: Final = 0
EXTENT_OVER: Final = 1
EXTENT_CYCLE: Final = 2
EXTENT_KEYS: Final = 3

_CONTAINERS: Final = frozenset({list, dict, tuple, set, frozenset})
# What extent() looks at: the containers, and the strings whose lengths it counts.
_WALKED: Final = _CONTAINERS | {str, bytes, bytearray, memoryview}


def _extentPython(value: Any, budget: int, maxDepth: int) -> int:
    """
    :func:`extent` in Python (the C extension's ``extent`` is its twin: the same steps).
    """
    budget, maxDepth = operator.index(budget), operator.index(maxDepth)  # as C takes them
    if budget < 0 or maxDepth < 1:
        raise ValueError("extent() needs a budget >= 0 and a maxDepth >= 1")
    if budget == 0:
        return EXTENT_OVER
    budget = min(budget, _MAX_BUDGET)  # as the C twin clamps it
    containers = _CONTAINERS
    walked = _WALKED
    if type(value) not in containers:
        return EXTENT_WITHIN
    left = budget - 1  # the value itself
    counted: dict[int, int] = {}  # the items inside each container walked, by id
    onPath: set[int] = set()
    # For each container entered: the container, its id, its containers not entered yet
    # (the next one last), and the items counted inside it so far (in a list, to add to).
    frames: list[tuple[Any, int, list[Any], list[int]]] = [(None, 0, [value], [0])]
    container: Any = None
    keys = False  # whether a dictionary with a key that is not a string was met
    while frames:
        entered, ident, waiting, inside = frames[-1]
        if not waiting:  # done with it: its count goes to its parent, and is remembered
            frames.pop()
            if frames:
                frames[-1][3][0] += inside[0]
                onPath.discard(ident)
                # If it may appear again: held by more than its parent (here, besides, by
                # ``entered`` and getrefcount's argument), as the C twin judges it.
                container = None
                if sys.getrefcount(entered) > 3:
                    counted[ident] = inside[0]
            continue
        container = waiting.pop()
        kind = type(container)
        if kind is str or kind is bytes or kind is bytearray or kind is memoryview:
            # Packed each time it appears, in its length at least.
            length = container.nbytes if kind is memoryview else len(container)
            left -= length
            if left < 0:
                return EXTENT_OVER
            inside[0] += length
            continue
        ident = id(container)
        if ident in onPath:
            return EXTENT_CYCLE
        known = counted.get(ident)
        if known is not None:  # walked before, here or elsewhere in the value
            left -= known
            inside[0] += known
            if left < 0:
                return EXTENT_OVER
            continue
        if len(frames) > maxDepth:
            return EXTENT_CYCLE
        # Its items count as it is entered: a dictionary's keys and values. Strings are
        # walked too, for their lengths, in turn (as the C twin meets them).
        if kind is dict:
            size = 2 * len(container)
            inner = [item for pair in container.items() for item in pair if type(item) in walked]
        else:
            size = len(container)
            inner = [item for item in container if type(item) in walked]
        left -= size
        if left < 0:
            return EXTENT_OVER
        if kind is dict and not keys:
            for key in container:
                if type(key) is not str and type(key) is not bytes:
                    keys = True
                    break
        onPath.add(ident)
        inner.reverse()
        frames.append((container, ident, inner, [size]))
    return EXTENT_KEYS if keys else EXTENT_WITHIN


#: The most items hashing the set elements and dictionary keys of one received value may walk
#: once its tuples share their parts (see :class:`HashBudget`).
HASHED_ITEMS: Final = 16_000_000

#: The most items comparing the set elements and dictionary keys of one received value that
#: have the same hash may walk (see :class:`HashBudget`): Python compares each with ``==``
#: against those of its hash already in the container as it inserts it.
COMPARED_ITEMS: Final = 4_000_000

#: What each key looked at adds to what comparing may count (COMPARED_ITEMS to start with): a
#: large value may hold keys of one hash in proportion (a dict keyed by (name, -1) and
#: (name, -2) for each of 200,000 names, say), and checking it still takes time in proportion
#: to its size.
KEY_ALLOWANCE: Final = 8

#: How many numbers (exactly ints and floats) of one hash a container may hold without their
#: comparing being counted: each is compared with at most that many, cheaply (by its size),
#: and ordinary data has a few (-1 and -2 hash alike). The C extension's twin is the same.
NUMBER_GROUP: Final = 16

#: What looking at a key of a hash that repeats in its container counts besides (see
#: :meth:`HashBudget.spendKeys`): it is weighed in Python, some hundreds of nanoseconds, where
#: an item compared takes some nanoseconds.
JOIN_COST: Final = 32


class HashBudget:
    """
    What hashing, and comparing, the set elements and dictionary keys of one received value
    may cost. (In the native dialect, one budget serves a whole value, across its
    extensions: a call's arguments, its keyword arguments, or an answer.)

    Python hashes a tuple by hashing each of its items, each time the tuple is hashed, and
    remembers nothing: a value whose tuples share their parts (jelly keeps them shared) takes
    a few hundred bytes and walks more items than any machine can when it is used as a set
    element or a dictionary key. Before such a value is hashed, :meth:`spend` counts the
    items hashing it walks, by its *weight* (:meth:`_weigh`): each appearance of a tuple, with
    its items, a number (hashed digit by digit each time) or a string by its size, and one
    for anything else (frozensets remember their hash; a list ends the walk with
    ``TypeError``). The weight of each tuple is remembered, so counting takes time in
    proportion to the distinct tuples.

    Inserting a key into a set or dictionary compares it with ``==`` against each key of the
    same hash already there, and Python does not randomise the hashes of numbers and tuples:
    a peer can send many distinct keys of one hash (tuples of ``-1`` and ``-2``, which hash
    alike), and building the container then takes time in proportion to the square of their
    number. :meth:`spendKeys` looks at the keys of each container before it is built. Keys
    of distinct hashes, the usual case, cost one ``hash()`` each; text and byte strings
    (whose hashes Python randomises) nothing, and up to :data:`NUMBER_GROUP` numbers of one
    hash in a container that C builds unchecked. Other keys of one hash are *compared*:
    each with each of its hash before it, at most the weight of the two (:meth:`_weigh`:
    the items of each appearance of its tuples, numbers and strings by their size), and
    :data:`JOIN_COST` for looking at it in Python. All of a value's may count
    :data:`COMPARED_ITEMS` items, and :data:`KEY_ALLOWANCE` more for each key looked at.
    Of the keys of one hash in one container, at most one may hold a frozenset (but for a
    flat one, see :meth:`_weighSet`): ``==`` on two frozensets looks each element of one
    up in the other, comparing it in turn with those of its hash, so keys of one hash
    nested in frozensets would multiply. With that, every ``==`` compares something with a
    key that holds no frozenset (or a flat one), and walks no more than that key's items.
    """

    __slots__ = ("_items", "_weights", "charged", "compared", "left")

    def __init__(self, items: int = HASHED_ITEMS, compared: int = COMPARED_ITEMS) -> None:
        self.left = self._items = items
        #: What comparing keys of one hash may still count (see KEY_ALLOWANCE), and what it
        #: counted so far.
        self.compared = compared
        self.charged = 0
        # id -> (weight, whether it holds a frozenset, the tuple or frozenset, kept so that its
        # id is not reused, its hash weight)
        self._weights: dict[int, tuple[int, bool, Any, int]] = {}

    def spend(self, value: Any) -> None:
        """
        Count what hashing ``value`` walks.

        :raises InvalidJelly: the values counted so far walk more than the budget's items.
        """
        if type(value) is not tuple:
            return
        self.left -= self._hashWeight(value)
        if self.left < 0:
            raise InvalidJelly(
                f"set elements or dictionary keys whose tuples share their parts stand for "
                f"more than {self._items:,} items when hashed (each appearance counts)"
            )

    def spendKeys(
        self, values: Iterable[Any], ring: dict[int, list[Any]] | None = None, shared: bool = True
    ) -> None:
        """
        Count what inserting ``values``, the elements or keys of one container, into it costs:
        hashing them (:meth:`spend`), unless ``shared`` is false (the value shares no tuple,
        so that hashing walks what its bytes hold), and comparing those of one hash.
        ``ring``: the keys of the same container met before (by :meth:`ringOf`), for one whose
        keys arrive a few at a time.

        :raises InvalidJelly: either is over its bound, or two keys of one hash hold
            frozensets.
        """
        if type(values) is not list:
            values = list(values)
        self.compared += KEY_ALLOWANCE * len(values)
        if ring is None and _plainKeys is not None and _plainKeys(values):
            return  # (in C: text, byte strings, numbers few of one hash, the usual case)
        kinds = set(map(type, values))
        if kinds <= _RANDOMISED:
            return  # (no key, or text and byte strings only)
        compared = values
        if str in kinds or bytes in kinds:
            compared = [value for value in values if type(value) not in _RANDOMISED]
        if shared and tuple in kinds:
            for value in compared:
                if type(value) is tuple:
                    self.spend(value)
        if ring is None and len(compared) < 2:
            return
        try:
            hashes = list(map(hash, compared))
        except (TypeError, RecursionError):
            # The container refuses one itself, once it has inserted those before it.
            compared, hashes = _hashable(compared)
        if ring is not None:
            for value, key in zip(compared, hashes, strict=True):
                self._join(ring, value, key, True)
            return
        if len(set(hashes)) == len(hashes):
            return  # (the common case: no two of one hash)
        # Only the keys whose hash repeats: one alone in its hash is never compared.
        groups: dict[int, list[Any]] = {}
        if len(hashes) > 16:
            counts = Counter(hashes)
            for value, key in zip(compared, hashes, strict=True):
                if counts[key] > 1:
                    groups.setdefault(key, []).append(value)
        else:
            for value, key in zip(compared, hashes, strict=True):
                groups.setdefault(key, []).append(value)
        # Numbers of one hash go free only where C inserts them unchecked (see plainKeys):
        # a container of text, byte strings and numbers, no more than NUMBER_GROUP of one
        # hash. Anywhere else each key of a repeated hash is looked at here, in Python, and
        # counted (a map {None: 0, -1: 0, -2: 0} is).
        if kinds <= _PLAIN and all(len(group) <= NUMBER_GROUP for group in groups.values()):
            return
        for group in groups.values():
            if len(group) > 1:
                self._charge(group)

    def _charge(self, group: list[Any]) -> None:
        """
        Count what inserting ``group``, keys of one hash in one container, compares: each
        with each before it, at most the weight of the two, and :data:`JOIN_COST` for looking
        at each after the first here.
        """
        first = group[0]
        weigh = self._weigh
        before = 0  # the weight of those before
        holds = False
        charge = 0
        left = self.compared
        for count, value in enumerate(group):
            weight, adds = weigh(value)
            if adds and holds and value is not first:
                raise _twoFrozensets()
            holds = holds or adds
            if count:
                charge += count * weight + before + JOIN_COST
            if charge > left:
                raise _overCompared()
            before += weight
        self.compared = left - charge
        self.charged += charge

    def ringOf(self, keys: Iterable[Any]) -> dict[int, list[Any]]:
        """
        The ring :meth:`spendKeys` takes for a container that already holds ``keys``.
        """
        ring: dict[int, list[Any]] = {}
        for key in keys:
            if type(key) not in _RANDOMISED:
                self._join(ring, key, hash(key), False)
        return ring

    def _join(self, ring: dict[int, list[Any]], value: Any, key: int, compare: bool) -> None:
        """
        Put ``value``, whose hash is ``key``, in ``ring``, and count what comparing it with
        those of its hash there walks (if ``compare``).
        """
        group = ring.get(key)
        if group is None:
            # (Weighed only if another of its hash comes.)
            ring[key] = [value, 1, -1, False, type(value) in _NUMBERS, 0]
            return
        first, count, weight, holds, numbers, owed = group
        if weight < 0:
            weight, holds = self._weigh(first)
        added, adds = self._weigh(value)
        if adds and holds and value is not first:
            raise _twoFrozensets()
        # Compared with each before it: at most the weight of the two, each time.
        numbers = numbers and type(value) in _NUMBERS
        increment = count * added + weight + JOIN_COST
        if compare:
            # A key inserted alone is never inserted by C: it is counted, with what those of
            # its hash already in the container were let off.
            self.compared -= owed + increment
            self.charged += owed + increment
            owed = 0
            if self.compared < 0:
                raise _overCompared()
        elif numbers and count < NUMBER_GROUP:
            owed += increment  # (let off if C inserted them: see spendKeys)
        else:
            owed = 0
        group[1:] = count + 1, weight + added, holds or adds, numbers, owed

    def _weigh(self, value: Any) -> tuple[int, bool]:
        """
        The items comparing ``value`` with ``==`` against a key that holds no frozenset may
        walk (each appearance of a tuple with its items, a number or string by its size, a
        frozenset by :meth:`_weighSet`), and whether it holds a frozenset; remembered for
        each tuple and frozenset.
        """
        if type(value) is tuple:
            weight, holds, _ = self._weighTuple(value)
            return weight, holds
        if type(value) is frozenset:
            return self._weighSet(value)
        return _atomWeight(value), False

    def _hashWeight(self, value: tuple[Any, ...]) -> int:
        """
        The items hashing the tuple ``value`` walks: as :meth:`_weigh`, but a frozenset is
        one (it remembers its hash).
        """
        return self._weighTuple(value)[2]

    def _weighTuple(self, value: tuple[Any, ...]) -> tuple[int, bool, int]:
        """
        :meth:`_weigh` for a tuple, with :meth:`_hashWeight`. (The C extension's twin
        weighs an item in a few nanoseconds, where this takes some fifty.)
        """
        weights = self._weights
        if _weighTupleC is not None:
            return _weighTupleC(value, weights, self._weighSet, _atomWeight)
        known = weights.get(id(value))
        if known is not None:
            return known[0], known[1], known[3]
        # Each frame: a tuple, an iterator over its items, its weight, whether it holds a
        # frozenset, and its hash weight, so far.
        frames: list[list[Any]] = [[value, iter(value), 1, False, 1]]
        while True:
            frame = frames[-1]
            for item in frame[1]:
                if type(item) is tuple:
                    known = weights.get(id(item))
                    if known is None:
                        frames.append([item, iter(item), 1, False, 1])
                        break
                    frame[2] += known[0]
                    frame[3] = frame[3] or known[1]
                    frame[4] += known[3]
                elif type(item) is frozenset:
                    weight, holds = self._weighSet(item)
                    frame[2] += weight
                    frame[3] = frame[3] or holds
                    frame[4] += 1
                else:
                    weight = _atomWeight(item)
                    frame[2] += weight
                    frame[4] += weight
            else:
                frames.pop()
                entered, _, weight, holds, hashed = frame
                weights[id(entered)] = (weight, holds, entered, hashed)
                if not frames:
                    return weight, holds, hashed
                frames[-1][2] += weight
                frames[-1][3] = frames[-1][3] or holds
                frames[-1][4] += hashed

    def _weighSet(self, value: frozenset[Any]) -> tuple[int, bool]:
        """
        :meth:`_weigh` for a frozenset. One of atoms (no tuple or frozenset) of distinct
        hashes is *flat*: ``==`` with another frozenset of its size looks each element of
        one up in the other, where an element meets at most one of its hash (of the flat
        one's, or the one element it is), so that comparing it walks no more than the
        elements' weights; it weighs them, and does not count as holding a frozenset. Any
        other weighs one, and holds a frozenset.
        """
        weights = self._weights
        known = weights.get(id(value))
        if known is not None:
            return known[0], known[1]
        weight, holds = 1, True
        if not any(type(item) is tuple or type(item) is frozenset for item in value):
            try:
                distinct = len(set(map(hash, value))) == len(value)
            except Exception:
                distinct = False
            if distinct:
                weight, holds = 1 + sum(map(_atomWeight, value)), False
        weights[id(value)] = (weight, holds, value, 1)
        return weight, holds


def _twoFrozensets() -> InvalidJelly:
    return InvalidJelly(
        "set elements or dictionary keys of one hash of which two hold frozensets "
        "(comparing them could take without bound)"
    )


def _overCompared() -> InvalidJelly:
    return InvalidJelly(
        f"set elements or dictionary keys with the same hash that take more than "
        f"{COMPARED_ITEMS:,} items, and {KEY_ALLOWANCE} for each key, to compare (keys chosen "
        "to collide?)"
    )


_plainKeys: Callable[[list[Any]], bool] | None = (
    None if _accelerator.speedups is None else _accelerator.speedups.plainKeys
)

_weighTupleC: (
    Callable[
        [
            tuple[Any, ...],
            dict[int, tuple[int, bool, Any, int]],
            Callable[[frozenset[Any]], tuple[int, bool]],
            Callable[[Any], int],
        ],
        tuple[int, bool, int],
    ]
    | None
) = None if _accelerator.speedups is None else _accelerator.speedups.weighTuple

_NUMBERS = frozenset({int, float})

# The keys C inserts unchecked, numbers if few of one hash (see spendKeys).
_PLAIN = frozenset({str, bytes, int, float})

# The keys whose hashes Python randomises (unless PYTHONHASHSEED says otherwise): they cannot
# be chosen to collide.
_RANDOMISED = frozenset({str, bytes})


def _atomWeight(value: Any) -> int:
    """
    What ``==`` may walk comparing ``value`` (not a tuple) with a value of the same hash: a
    number or string by its size, anything else one.
    """
    kind = type(value)
    if kind is int:
        bits: int = value.bit_length()
        return 1 + (bits >> 8)
    if kind is str or kind is bytes:
        return 1 + (len(value) >> 6)
    if kind is float or kind is bool or value is None:
        return 1
    try:  # a decimal, say, compared digit by digit
        weight = 1 + (sys.getsizeof(value) >> 6)
    except Exception:
        return 1
    if kind.__module__ == "decimal":
        # Compared with a float or an int, a Decimal converts it to a Decimal first, each
        # time: up to a few microseconds (a float near 2**-1074 has 751 digits).
        weight += _DECIMAL_WEIGHT
    return weight


#: What a Decimal weighs besides its size (see _atomWeight).
_DECIMAL_WEIGHT: Final = 256


def _hashable(values: list[Any]) -> tuple[list[Any], list[int]]:
    """
    The values that can be hashed, and their hashes.
    """
    kept: list[Any] = []
    hashes: list[int] = []
    for value in values:
        try:
            hashes.append(hash(value))
        except (TypeError, RecursionError):
            continue
        kept.append(value)
    return kept, hashes


def extent(value: Any, budget: int, maxDepth: int = _WALK_DEPTH) -> int:
    """
    Whether the native codec would pack ``value`` in ``budget`` items or fewer: it counts the
    items of the plain containers (lists, dicts with their keys, tuples, sets and frozensets,
    of exactly those types) as packing does, a container each time it appears, and the
    length of each string and byte string in them (``str``, ``bytes``, ``bytearray`` and the
    bytes of a ``memoryview``: it takes that many bytes at least, each time it appears),
    without packing anything and without running any code of the value's. A container that
    appears again is not walked again: the walk takes time in proportion to the distinct
    containers at most, or to ``budget``.

    :data:`EXTENT_WITHIN` if so, :data:`EXTENT_OVER` if not, :data:`EXTENT_CYCLE` if a
    container holds itself or they nest more than ``maxDepth`` deep (packing would give up
    and jelly the value). :data:`EXTENT_KEYS` instead of within if a dictionary has a key
    that is not a string or byte string (``str`` or ``bytes``): the value is then sent in a
    ``KEYED`` extension, whose maps are read checked.

    Lists that share their parts are packed once per appearance: a value of a few hundred
    bytes can stand for more items than any message holds, or a string of a few kilobytes for
    more bytes than memory holds.
    """
    if _accelerator.speedups is not None:
        return _accelerator.speedups.extent(value, budget, maxDepth)  # type: ignore[no-any-return]
    return _extentPython(value, budget, maxDepth)


class ValueCodec:
    """
    Packs and unpacks values for one connection.

    :param jelly: turns an object that is not plain data into banana bytes of its jelly (it
        may have effects: exporting a reference, for one).
    :param unjelly: the reverse, for what arrives in a ``JELLY`` extension.
    :param stream: registers an outgoing stream (an iterator) and returns its id, or raises.
    :param isStream: whether an object is to be sent as a stream.
    :param openStream: makes the receiving end of the peer's stream ``id``.
    :param depthLimit: how deeply extensions may nest in a received value.
    :param measureDepth: measure how deeply each received value nests, and refuse one deeper
        than ``depthLimit`` (msgpack's own arrays and maps are otherwise bounded only by
        :data:`MSGPACK_DEPTH`).

    :ivar itemLimit: the most items a value sent may be packed in (see :func:`extent`; each
        character or byte of a string counts as one), or ``None``: the bytes the peer takes
        in a message, since each item takes one at least.
        A value over it is refused before it is packed.
    :ivar limitSaid: whose limit ``itemLimit`` is, as the refusal says it (after "limit").
    :ivar stringLimit: the bytes the peer takes in a message, if it said: a text, bytearray
        or memoryview sent alone over it is refused before it is encoded or copied.
    """

    def __init__(
        self,
        jelly: Callable[[Any], bytes],
        unjelly: Callable[[bytes], Any],
        isStream: Callable[[Any], bool],
        stream: Callable[[Any], int],
        openStream: Callable[[int], Any],
        depthLimit: int,
        measureDepth: bool = False,
    ) -> None:
        self._jelly = jelly
        self._unjelly = unjelly
        self._isStream = isStream
        self._stream = stream
        self._openStream = openStream
        self.depthLimit = depthLimit
        self._measureDepth = measureDepth and depthLimit < MSGPACK_DEPTH
        # The msgpack document being packed or unpacked, as a level: 0 for a value, one more
        # for each tuple or set in it, and one more for a value a hook (run to jelly or
        # unjelly an object) packs or unpacks meanwhile. It bounds what msgpack's C code
        # holds on the stack.
        self._depth = 0
        self._special = False
        self._packing = False
        # What hashing may still cost in the value being unpacked (see hashing()).
        self._hashBudget: HashBudget | None = None
        # Whether a KEYED extension is being unpacked: its maps are built checked.
        self._keyedMaps = False
        # Whether the value being unpacked had a JELLY extension so far.
        self._jellyMet = False
        # The large strings of the value being unpacked, if it is Spliced.
        self._splicedStrings: list[bytes | str | UnicodeDecodeError] | None = None
        self._plainPacker = self._newPacker()
        self.itemLimit: int | None = None
        self.limitSaid = LIMIT_OF_THE_PEER
        self.stringLimit: int | None = None
        # The bytes the objects jellied in the value being packed may still take, if bounded,
        # and whether one was jellied yet (the first is not counted: see _full).
        self._jellyLeft: int | None = None
        self._jelliedAny = False
        speedups = _accelerator.speedups
        self._extent: Callable[[Any, int, int], int] = (
            _extentPython if speedups is None else speedups.extent
        )
        # A KEYED value's maps: in C at once if their keys are text, byte strings, or numbers
        # few of one hash (the usual case, for which _checkedMap counts nothing).
        self._mapHook: Callable[[list[tuple[Any, Any]]], dict[Any, Any]] = (
            self._checkedMap
            if speedups is None
            else functools.partial(speedups.keyedMap, self._checkedMap)
        )

    # Sending

    def pack(self, value: Any) -> bytes | Packed:
        """
        The msgpack bytes of ``value``: a large byte string (alone, or as the one item of a
        list) comes back as a :class:`Packed` of a header and the string itself, uncopied (a
        bytearray, copied once); so do those in a larger value (see :meth:`_packSpliced`).

        A first pass, with no effects, packs plain data and walks the whole value. Only if it
        met something else is the value packed again with the hooks that export references
        and jelly instances; if it met a cycle (or nesting deeper than msgpack goes) the value
        is jellied whole instead. Either way nothing is registered twice or half-way.

        Before either, the plain containers are counted (see :func:`extent`): one that would
        be packed in more than ``itemLimit`` items raises
        :class:`~pbroker.errors.LimitExceeded`, having taken no more time and memory than
        that count. (Lists that share their parts could otherwise be packed in more bytes
        than memory holds.) A value with a dict whose keys are not all text or byte strings
        goes in a ``KEYED`` extension (see :class:`HashBudget`).
        """
        kind = type(value)
        # (The type looked at first: most values are small, and packed for every call. Text
        # alone is looked at below: from _SPLICE_FROM on.)
        if kind in _BYTE_STRINGS:
            if kind is not bytes:
                self._checkString(value)  # before it is copied
            large = _largePart(value, False)
            if large is not None:
                return Packed(*large)
        elif kind is list and len(value) == 1 and type(value[0]) in _BYTE_STRINGS:
            if type(value[0]) is not bytes:
                self._checkString(value[0])
            large = _largePart(value[0], False)  # the one argument of a call
            if large is not None:
                header, part = large
                return Packed(_ARRAY_OF_ONE + header, part)
        limit = self.itemLimit
        if kind in _CONTAINERS:
            # (Walked without a limit too: for a dictionary's keys, and a cycle.)
            budget = _MAX_BUDGET if limit is None else limit
            # Counted within _SPLICE_FROM items first: most values are, and a larger one is
            # counted again against the limit, then looked through for large byte strings.
            verdict = self._extent(value, min(budget, _SPLICE_FROM), _WALK_DEPTH)
            sizeable = verdict == EXTENT_OVER and budget > _SPLICE_FROM
            if sizeable:
                verdict = self._extent(value, budget, _WALK_DEPTH)
            if verdict == EXTENT_OVER:
                raise LimitExceeded(
                    f"a value of more than {budget} items is over the {budget}-byte limit "
                    f"{self.limitSaid} (each item, and each character of a string, takes a "
                    "byte at least; a list or other container that appears more than once in a "
                    "value is sent each time)"
                )
            if verdict == EXTENT_CYCLE:
                return self._jellied(value)  # as the first pass would, having gone round
            if sizeable:
                spliced = self._packSpliced(value, verdict == EXTENT_KEYS)
                if spliced is not None:
                    return spliced
            if verdict == EXTENT_KEYS:
                # Maps with other keys than strings are read checked, in a KEYED value only.
                return msgpack.packb(msgpack.ExtType(KEYED, self._packValue(value)))  # type: ignore[no-any-return]
        elif kind is str and len(value) >= _SPLICE_FROM:
            self._checkString(value)  # before it is encoded
            spliced = self._packSpliced(value, False)
            if spliced is not None:
                return spliced
        return self._packValue(value)

    def _checkString(self, string: Any) -> None:
        """
        Refuse a text, bytearray or memoryview sent alone that is over the peer's limit
        before it is encoded or copied (a byte string is neither: the message's own check
        refuses it). Each character of a text takes a byte at least.
        """
        limit = self.stringLimit
        if limit is not None:
            size = _stringSize(string)
            if size > limit:
                units = "characters" if type(string) is str else "bytes"
                raise LimitExceeded(
                    f"a {type(string).__name__} of {size} {units} is over the {limit}-byte "
                    f"limit {LIMIT_OF_THE_PEER}"
                )

    def _packSpliced(self, value: Any, keyed: bool) -> Packed | None:
        """
        ``value`` packed as :meth:`_packValue` packs it, but with its large byte strings left
        out of the packed bytes: each is a part of its own, between those packed around it,
        so that it is not copied in and out of the packer's buffer (and a value of one 100 MB
        string does not take 200 MB more to send). Its lists, dicts, tuples and sets are
        looked into. ``None`` if it holds no large byte string, more items around them than
        the receiver looks through (see :func:`_largeBins`), or something other than plain
        data (packing it has effects): it is then packed whole.

        :param keyed: wrap it in a ``KEYED`` extension (a dict in it has other keys than text
            and byte strings).
        """
        if self._packing or self._depth or not _holdsLargeStrings(value):
            return None
        packer = self._plainPacker
        segments: list[bytes | memoryview] = [b""]  # (the KEYED header, if any)
        strings: set[int] = set()  # the indices of the large strings in segments
        # Items are counted as the receiver counts them (see _largeBins): each msgpack item,
        # an extension and the array it holds as two.
        budget = _SPLICE_AROUND
        total = _SPLICE_ITEMS

        def count(items: int) -> None:
            nonlocal budget, total
            budget -= items
            total -= items
            if budget < 0 or total < 0:
                raise _Enough()

        def leaf(item: Any) -> None:
            # (A tuple or frozenset, only as a KEYED value's key, is items of its own.)
            count(_itemsIn(item) if type(item) in _PLAIN_SEQUENCES else 1)
            self._special = False
            segments.append(packer.pack(item))
            if self._special:
                raise _Enough()

        def walk(item: Any, depth: int) -> None:
            nonlocal budget
            if depth > _SPLICE_DEPTH:
                raise _Enough()
            kind = type(item)
            # (A surrogate in a text raises, and the value is packed whole: jellied; a view
            # not in one piece is a leaf, which msgpack refuses.)
            large = _largePart(item, True)
            if large is not None:
                count(1)
                budget = _SPLICE_AROUND
                segments.append(large[0])
                strings.add(len(segments))
                segments.append(large[1])
            elif kind is list:
                count(1)
                segments.append(_arrayHeader(len(item)))
                for each in item:
                    walk(each, depth + 1)
            elif kind is dict:
                count(1)
                segments.append(_mapHeader(len(item)))
                for key, each in item.items():
                    leaf(key)
                    walk(each, depth + 1)
            elif kind in _PLAIN_SEQUENCES:
                # An extension holding a document of the items, as _packNested packs it.
                count(2)
                level = self._depth + 1
                if level > self.depthLimit or level > EXTENSION_DEPTH:
                    raise _Enough()  # packed whole: jellied
                self._depth = level
                try:
                    header = len(segments)
                    segments.append(b"")
                    segments.append(_arrayHeader(len(item)))
                    for each in item:
                        walk(each, depth + 1)
                    size = sum(map(len, segments[header + 1 :]))
                    segments[header] = _extensionHeader(_PLAIN_SEQUENCES[kind], size)
                finally:
                    self._depth = level - 1
            else:
                leaf(item)

        self._packing = True
        try:
            if keyed:
                count(1)
            walk(value, 0)
        except (_Enough, ValueError, RecursionError, BufferError):
            return None  # packed whole (which deals with cycles, depth and objects)
        finally:
            self._packing = False
            self._depth = 0
            self._plainPacker = self._newPacker()
        if not strings:
            return None
        if keyed:
            segments[0] = _extensionHeader(KEYED, sum(map(len, segments)))
        parts: list[bytes | memoryview] = []
        run: list[bytes | memoryview] = []
        for index, segment in enumerate(segments):
            if index in strings:
                parts.append(b"".join(run))
                parts.append(segment)
                run.clear()
            else:
                run.append(segment)
        if run:
            parts.append(b"".join(run))
        return Packed(*parts)

    def _packValue(self, value: Any) -> bytes:
        """
        ``value`` packed (see :meth:`pack`), once counted.
        """
        if self._depth > EXTENSION_DEPTH:
            # Packed from a hook, inside documents already that deep: jelly, off the C stack.
            return self._jellied(value)
        self._special = False
        try:
            if self._packing:  # re-entered from a hook: the shared packer is busy
                packed = self._packWith(value, self._plainOnly)
            else:
                self._packing = True
                try:
                    packed = self._plainPacker.pack(value)
                    if len(packed) > _KEEP:
                        # A packer keeps the buffer its largest value needed; let it go.
                        self._plainPacker = self._newPacker()
                finally:
                    self._packing = False
        except (ValueError, RecursionError):
            # Plain containers in a cycle, or deeper than msgpack goes: jelly keeps the shape.
            return self._jellied(value)
        except BufferError as e:
            # (msgpack reads a memoryview's bytes in one piece, as they lie in memory.)
            raise notInOnePiece(f" ({e})") from None
        if not self._special:
            return packed
        # The objects are jellied each time they appear (as a list is packed): their jelly
        # counts against the limit as it is made (see _full).
        outer = self._jellyLeft, self._jelliedAny
        self._jellyLeft, self._jelliedAny = self.itemLimit, False
        try:
            return self._packWith(value, self._full)
        finally:
            self._jellyLeft, self._jelliedAny = outer

    def _jellied(self, value: Any) -> bytes:
        return msgpack.packb(msgpack.ExtType(JELLY, self._hooked(self._jelly, value)))  # type: ignore[no-any-return]

    def _hooked(self, convert: Callable[[Any], Any], value: Any) -> Any:
        """
        ``convert(value)`` (jelly or unjelly), whose hooks may pack or unpack another value:
        one level deeper than the document being packed or unpacked.
        """
        level = self._depth + 1
        self._depth = level
        try:
            return convert(value)
        finally:
            self._depth = level - 1

    def _newPacker(self) -> Any:
        return msgpack.Packer(
            default=self._plainOnly,
            use_bin_type=True,
            strict_types=True,
            autoreset=True,
            buf_size=_CONNECTION_BUFFER,
        )

    def _packWith(self, value: Any, default: Callable[[Any], Any]) -> bytes:
        return msgpack.packb(  # type: ignore[no-any-return]
            value, default=default, use_bin_type=True, strict_types=True
        )

    def _packNested(self, items: Any, code: int, default: Callable[[Any], Any]) -> Any:
        level = self._depth + 1
        if level > self.depthLimit or level > EXTENSION_DEPTH:
            raise ValueError("nested too deeply")  # sent through JELLY (see pack)
        self._depth = level
        try:
            data = msgpack.packb(list(items), default=default, use_bin_type=True, strict_types=True)
        finally:
            self._depth = level - 1
        return msgpack.ExtType(code, data)

    def _plainOnly(self, obj: Any) -> Any:
        code = _PLAIN_SEQUENCES.get(type(obj))
        if code is not None:
            return self._packNested(obj, code, self._plainOnly)
        self._special = True
        return None  # a stand-in: this pass only looks

    def _full(self, obj: Any) -> Any:
        code = _PLAIN_SEQUENCES.get(type(obj))
        if code is not None:
            return self._packNested(obj, code, self._full)
        if self._isStream(obj):
            return msgpack.ExtType(STREAM, msgpack.packb(self._stream(obj)))
        jellied = self._hooked(self._jelly, obj)
        left = self._jellyLeft
        if left is not None:
            # An object in lists that share their parts is jellied once per appearance: a
            # copy of a large state, a thousand times, say (extent() counts it as one item).
            # The first is let through however large, as a value jellied whole is (the
            # message's own check refuses it if need be, as before).
            if self._jelliedAny:
                left -= len(jellied)
            self._jelliedAny = True
            if left < 0:
                raise LimitExceeded(
                    f"a value whose objects take more than {self.itemLimit} bytes jellied is "
                    f"over the {self.itemLimit}-byte limit {self.limitSaid} (an object "
                    "that appears more than once in a value is sent each time)"
                )
            self._jellyLeft = left
        return msgpack.ExtType(JELLY, jellied)

    # Receiving

    def unpack(self, data: Any) -> Any:
        """
        The value packed in ``data``.

        :raises InvalidJelly: ``data`` is not a well-formed value.
        """
        kind = type(data)
        if kind is Unpacked:
            return data.value
        strings = None
        if kind is Spliced:
            strings = data.values
            data = data.document
        elif kind is not bytes and kind is not memoryview:
            raise InvalidJelly(f"a pbroker2 value must be bytes, not {describe(data)}")
        if self._measureDepth and deeperThan(data, self.depthLimit):
            raise InvalidJelly(f"a value nested more than {self.depthLimit} levels deep")
        # (A hook may unpack another value meanwhile.)
        outer, self._hashBudget = self._hashBudget, None
        outerKeyed, self._keyedMaps = self._keyedMaps, False
        outerJelly, self._jellyMet = self._jellyMet, False
        outerStrings, self._splicedStrings = self._splicedStrings, strings
        try:
            return msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=self._extension,
                timestamp=_TIMESTAMP_AS_INT,
            )
        except _Raised as e:
            raise e.error from None  # an application's error, or the security options'
        except PBrokerError:
            raise  # refused by a limit: the broker's business
        except Exception as e:
            raise InvalidJelly(f"a malformed pbroker2 value: {_malformed(e)}") from None
        finally:
            self._hashBudget = outer
            self._keyedMaps = outerKeyed
            self._jellyMet = outerJelly
            self._splicedStrings = outerStrings

    def _document(self, data: bytes) -> Any:
        """
        The msgpack document an extension holds. Its maps' keys are text or byte strings,
        unless it is in a ``KEYED`` value: then each map is built once its keys are checked.
        """
        if self._keyedMaps:
            return msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=False,
                object_pairs_hook=self._mapHook,
                use_list=True,
                ext_hook=self._extension,
                timestamp=_TIMESTAMP_AS_INT,
            )
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=self._extension,
            timestamp=_TIMESTAMP_AS_INT,
        )

    def _checkedMap(self, pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        """
        A map of a ``KEYED`` value, built once its keys are checked (see :class:`HashBudget`).
        """
        self.hashing().spendKeys(list(map(_first, pairs)), None, self._jellyMet)
        return dict(pairs)

    def hashing(self) -> HashBudget:
        """
        What hashing may still cost in the value being unpacked, for all the ``JELLY``
        extensions in it: their tuples may share their parts, and a tuple one gives may be a
        set element or dictionary key here (see :class:`HashBudget`).
        """
        if self._hashBudget is None:
            self._hashBudget = HashBudget()
        return self._hashBudget

    def streamsIn(self, data: Any) -> list[int]:
        """
        The ids of the streams a packed value (bytes, or :class:`Packed`) refers to, found
        without unpacking anything else (for a value that could not be sent after all).
        """
        if type(data) is Packed:
            if len(data.parts) > 1:
                return []  # byte strings packed by hand, in plain data (see pack): no streams
            data = data.data
        return extensionsIn(data)[1]

    def _extension(self, code: int, data: bytes) -> Any:
        rebuild = _REBUILD.get(code)
        if rebuild is not None:
            level = self._depth + 1
            if level > self.depthLimit:
                raise InvalidJelly(f"a value nested more than {self.depthLimit} levels deep")
            if level > RECEIVED_EXTENSION_DEPTH:
                raise InvalidJelly(
                    f"tuples or sets nested more than {RECEIVED_EXTENSION_DEPTH} deep (a pbroker "
                    "sender sends a deeper value as jelly)"
                )
            self._depth = level
            try:
                items = self._document(data)
            finally:
                self._depth = level - 1
            if type(items) is not list:
                raise InvalidJelly(f"a pbroker2 sequence must hold an array: {describe(items)}")
            if code != TUPLE and (_plainKeys is None or not _plainKeys(items)):
                # Hashed and compared as the set is built (see HashBudget).
                self.hashing().spendKeys(items, None, self._jellyMet)
            return rebuild(items)
        if code == KEYED:
            if self._keyedMaps:
                raise InvalidJelly("a pbroker2 KEYED extension inside another")
            self._keyedMaps = True
            try:
                return self._document(data)
            finally:
                self._keyedMaps = False
        if code == JELLY:
            # Only jelly shares tuples: those of a value without it are hashed in time in
            # proportion to its bytes, and not counted (see HashBudget.spendKeys).
            self._jellyMet = True
            try:
                value = self._hooked(self._unjelly, data)
            except Exception as e:
                # Raised by the jelly it carries (a setCopyableState, the security options):
                # kept apart from msgpack's own errors, which mean a malformed value.
                raise _Raised(e) from e
            return value
        if code == STREAM:
            streamID = msgpack.unpackb(data)
            if not isPeerID(streamID):
                # (Stream ids key tables: beyond ID_LIMIT, or negative, ids could share a hash.)
                raise InvalidJelly(
                    f"a stream id must be an integer from 1 to {ID_LIMIT - 1}: {describe(streamID)}"
                )
            return self._openStream(streamID)
        strings = self._splicedStrings
        if code == _PLACEHOLDER and strings is not None:
            # (Only where _largeBins put it: it refuses a value that carries one.)
            string = strings[_unpackHeader(data)[0]]
            if type(string) is UnicodeDecodeError:
                raise InvalidJelly(f"a malformed pbroker2 value: {_malformed(string)}")
            return string
        raise InvalidJelly(f"an unknown pbroker2 extension type: {code}")


class _Enough(Exception):
    pass


def _itemsIn(key: Any) -> int:
    """
    The msgpack items a dict's key takes as :func:`_largeBins` counts them: a tuple or
    frozenset two (its extension and its array) and those it holds (counted up to a little
    past :data:`_SPLICE_ITEMS`: more is too many already).
    """
    pending = [key]
    items = 0
    while pending and items <= _SPLICE_ITEMS:
        item = pending.pop()
        items += 1
        if type(item) in _PLAIN_SEQUENCES:
            items += 1
            pending.extend(item)
    return items


def _noMap(pairs: list[tuple[Any, Any]]) -> None:
    return None


def extensionsIn(data: Any, limit: int | None = None) -> tuple[list[bytes], list[int]]:
    """
    The ``JELLY`` payloads and the stream ids in a packed value, found without unpacking
    anything else: what a value that is not (or cannot be) unpacked refers to. As much as can
    be found: a malformed value yields what came before the fault, tuples and sets nested
    deeper than :data:`RECEIVED_EXTENSION_DEPTH` are not looked into, and the search stops once it
    found ``limit`` of the two together. Iterative, as deep nesting would otherwise take the
    C stack.
    """
    jellies: list[bytes] = []
    streams: list[int] = []
    if type(data) is Spliced:
        data = data.document  # (without the byte strings, which hold no extensions)
    if type(data) not in (bytes, memoryview):
        return jellies, streams
    nested: list[bytes] = []  # the payloads of the tuples and sets in one document

    def hook(code: int, payload: bytes) -> Any:
        if code in _DOCUMENTS:
            nested.append(payload)
        elif code == JELLY:
            jellies.append(payload)
        elif code == STREAM:
            with contextlib.suppress(Exception):
                streams.append(msgpack.unpackb(payload))
        if limit is not None and len(jellies) + len(streams) >= limit:
            raise _Enough()
        return None

    pending: list[tuple[Any, int]] = [(data, 0)]
    while pending:
        document, depth = pending.pop()
        nested.clear()
        try:
            # (Maps are not built: their keys may be anything, and only extensions matter.)
            msgpack.unpackb(
                document,
                raw=False,
                strict_map_key=False,
                object_pairs_hook=_noMap,
                ext_hook=hook,
            )
        except _Enough:
            break
        except Exception:
            pass  # malformed: what came before the fault was found
        if depth < RECEIVED_EXTENSION_DEPTH:
            pending.extend((payload, depth + 1) for payload in nested)
    return jellies, streams
