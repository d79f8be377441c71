"""
Banana: the s-expression codec under Perspective Broker, byte-compatible with Twisted PB 6.

The codec is sans-IO. :func:`encode` turns an expression (nested lists of ``bytes``, ``int`` and
``float``) into bytes; a :class:`Decoder` is fed bytes in chunks of any size and returns each
expression once it is complete. Neither touches a transport, a reactor or a clock, and every
limit is a constructor argument.

The decoder is iterative and linear in its input however the bytes are split: it keeps one
``bytearray`` and a read index, and when data runs short it rewinds only to the start of the
current *element* (never to the start of the message), so a 640 KiB string arriving in 256-byte
chunks costs no more than one arriving whole. Declared sizes are checked before a body is
buffered, and nesting depth is bounded without recursion.

:class:`Banana` is the thin Twisted ``Protocol`` adapter with the public surface of
``twisted.spread.banana.Banana``: it negotiates the dialect (see the wire specification, section
1.5) and hands complete expressions to :meth:`Banana.expressionReceived`. It is the only part of
this module that imports from Twisted, and it does so only for the ``Protocol`` base class.
"""

from __future__ import annotations

import functools
import inspect
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Final

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from pbroker import _accelerator
from pbroker.errors import (
    BananaDecodeError,
    BananaEncodeError,
    BananaError,
    checkedCount,
    describe,
)

__all__ = [
    "DEPTH_LIMIT",
    "DIALECTS",
    "FLOAT",
    "HIGH_BIT_SET",
    "INT",
    "LIST",
    "LONGINT",
    "LONGNEG",
    "NEG",
    "PB_VOCABULARY",
    "PREFIX_LIMIT",
    "SIZE_LIMIT",
    "STRING",
    "VOCAB",
    "Banana",
    "BananaDecodeError",
    "BananaEncodeError",
    "BananaError",
    "Decoder",
    "Encoded",
    "Expression",
    "Tokens",
    "b1282int",
    "decode",
    "encode",
    "getTokens",
    "int2b128",
    "setPrefixLimit",
]

#: A banana expression: bytes, int, float, or a (possibly nested) list of expressions.
#: ``tuple`` is accepted wherever ``list`` is when encoding; decoding always yields lists.
Expression = bytes | int | float | list[Any] | tuple[Any, ...]

#: The largest string (in bytes) or list (in elements) PB peers send or accept: 640 KiB.
#: As with Twisted, a program may raise it (``banana.SIZE_LIMIT = n``): connections made
#: afterwards use the new value, unless their class or instance sets ``sizeLimit``.
SIZE_LIMIT = 640 * 1024
# What SIZE_LIMIT is unless a program changes it, as stock PB programs do (see connectionMade).
_SIZE_LIMIT = SIZE_LIMIT

#: The default number of prefix bytes allowed before a type byte.
PREFIX_LIMIT: Final = 64

#: The default bound on list nesting in a decoded expression. Stock Twisted cannot itself
#: jelly or unjelly structures this deep, so no stock peer sends them.
DEPTH_LIMIT: Final = 1000

# What the dialect negotiation may take: an offer is a short list of names, a choice one
# name; no larger or deeper expression is held while one is awaited (see connectionMade).
_NEGOTIATION_SIZE: Final = 4096
_NEGOTIATION_DEPTH: Final = 2

# The type bytes (specification 1.1), as ints for building tokens.
_LIST: Final = 0x80
_INT: Final = 0x81
_STRING: Final = 0x82

#: The type bytes as one-byte strings, as Twisted names them, for code that writes tokens
#: itself (``int2b128(size, write); write(STRING); write(data)``).
LIST: Final = b"\x80"
INT: Final = b"\x81"
STRING: Final = b"\x82"
NEG: Final = b"\x83"
FLOAT: Final = b"\x84"
LONGINT: Final = b"\x85"
LONGNEG: Final = b"\x86"
VOCAB: Final = b"\x87"

_INT32_MAX: Final = 2**31 - 1

#: The fixed symbol table of the ``pb`` dialect: symbol -> number (wire specification 1.6).
PB_VOCABULARY: Final[dict[bytes, int]] = {
    symbol: number
    for number, symbol in enumerate(
        [
            b"None",
            b"class",
            b"dereference",
            b"reference",
            b"dictionary",
            b"function",
            b"instance",
            b"list",
            b"module",
            b"persistent",
            b"tuple",
            b"unpersistable",
            b"copy",
            b"cache",
            b"cached",
            b"remote",
            b"local",
            b"lcache",
            b"version",
            b"login",
            b"password",
            b"challenge",
            b"logged_in",
            b"not_logged_in",
            b"cachemessage",
            b"message",
            b"answer",
            b"error",
            b"decref",
            b"decache",
            b"uncache",
        ],
        start=1,
    )
}

#: The dialects this codec speaks, each mapped to its vocabulary (``None``: no VOCAB tokens).
DIALECTS: Final[dict[bytes, dict[bytes, int] | None]] = {
    b"pb": PB_VOCABULARY,
    b"none": None,
    # pbroker's own dialect, offered by pbroker servers before b"pb": stock Twisted clients skip
    # it, pbroker clients choose it and so learn that the peer has pbroker's extensions. Its
    # encoding is that of b"pb" for now; the version in the name lets it evolve.
    b"pbroker1": PB_VOCABULARY,
}


def _base128(value: int) -> bytes:
    """
    Write a non-negative integer as a banana prefix: base 128, least significant group first.
    """
    if value < 0x80:
        return bytes((value,))
    groups = bytearray()
    while value:
        groups.append(value & 0x7F)
        value >>= 7
    return bytes(groups)


#: The first byte value that is a token's type byte rather than a prefix byte.
HIGH_BIT_SET = b"\x80"


def int2b128(integer: int, stream: Callable[[bytes], object]) -> None:
    """
    Write a non-negative integer as a banana prefix to ``stream`` (a callable taking bytes),
    one byte per call, as Twisted's function of the same name does.

    :raises ValueError: ``integer`` is negative.
    """
    if not isinstance(integer, int):
        raise TypeError(f"a banana prefix is a non-negative integer, not {type(integer).__name__}")
    if integer < 0:
        raise ValueError(f"a banana prefix is a non-negative integer, not {describe(integer)}")
    for group in _base128(integer):
        stream(bytes((group,)))


def b1282int(st: bytes) -> int:
    """
    The integer a banana prefix (base 128, least significant group first) stands for.
    """
    value = 0
    for position, group in enumerate(st):
        value += group << (7 * position)
    return value


def _intToken(value: int) -> bytes:
    """
    Encode an integer with the type byte Twisted chooses for its range (specification 1.2).
    """
    if value >= 0:
        return _base128(value) + (b"\x81" if value <= _INT32_MAX else b"\x85")
    return _base128(-value) + (b"\x83" if value >= -(2**31) else b"\x86")


def _header(size: int, kind: int) -> bytes:
    """
    The header of a string (``kind`` STRING) or list (LIST) of ``size`` bytes or elements.
    """
    if size < 0x80:
        return bytes((size, kind))
    if size < 0x4000:
        return bytes((size & 0x7F, size >> 7, kind))
    return _base128(size) + bytes((kind,))


# Small non-negative integers and short lengths are by far the most common tokens; a table of
# their encodings turns the hot path of the encoder into one list index. Each entry is a
# bytes object (48 bytes in memory), so the list header table stops at 256: the elements of a
# longer list cost far more to encode than its header costs to build.
_CACHED: Final = 0x400
_HEADERS: Final = 0x400
_LIST_CACHED: Final = 0x100
_INT_TOKENS: Final = [_intToken(i) for i in range(_CACHED)]
_STRING_HEADERS: Final = [_header(i, _STRING) for i in range(_HEADERS)]
_LIST_HEADERS: Final = [_header(i, _LIST) for i in range(_LIST_CACHED)]


def _prefix(table: list[bytes], length: int) -> list[bytes]:
    # The first ``length`` entries of a shared table: the table itself (not a copy) when the
    # limits allow all of it, as the default limits do.
    return table if length >= len(table) else table[:length]


# The token a vocabulary symbol is sent as, per dialect.
_OUTGOING_TOKENS: Final[dict[bytes, dict[bytes, bytes]]] = {
    name: {}
    if vocabulary is None
    else {symbol: _base128(number) + b"\x87" for symbol, number in vocabulary.items()}
    for name, vocabulary in DIALECTS.items()
}

# The symbol each VOCAB number stands for, per dialect (None: VOCAB is not allowed).
_INCOMING_SYMBOLS: Final[dict[bytes, dict[int, bytes] | None]] = {
    name: None if vocabulary is None else {number: symbol for symbol, number in vocabulary.items()}
    for name, vocabulary in DIALECTS.items()
}

_packFloat = struct.Struct(">d").pack
_unpackFloat = struct.Struct(">d").unpack_from
# What follows a LIST token of two elements when they are jelly's text: the STRING "unicode".
_TEXT_TAG = b"\x07\x82unicode"
_BYTES_TYPES = frozenset({bytes, bytearray})


@functools.lru_cache(maxsize=16)
def _integerBounds(prefixLimit: int) -> tuple[int, int]:
    """
    The largest magnitude a prefix limit allows, and the bound below which a non-negative
    integer takes at most three prefix bytes and so needs no range check. (Cached: the check
    runs for each new value only.)
    """
    largest = 2 ** (7 * checkedCount("prefixLimit", prefixLimit)) - 1
    return largest, min(0x200000, largest + 1)


def _unknownDialect(dialect: bytes) -> str:
    known = ", ".join(repr(name) for name in DIALECTS)
    return f"unknown banana dialect {dialect!r}; known dialects: {known}"


def _checkDialect(dialect: bytes) -> None:
    if dialect not in DIALECTS:
        raise ValueError(_unknownDialect(dialect))


class Encoded(bytes):
    """
    Bytes that already hold one encoded banana element; :func:`encode` copies them in as they
    are. Encoders that write part of a message themselves (the fused jelly encoder, the broker)
    use it to splice that part into an expression.
    """

    __slots__ = ()


class Tokens:
    """
    The banana tokens of one dialect under given limits, for encoders that write tokens
    directly instead of building an expression first.

    :ivar symbols: byte string -> the token it is sent as (VOCAB in ``pb``, else nothing).
    :ivar smallInts: the tokens of the integers ``0 .. len(smallInts) - 1``, in order.
    :ivar stringHeaders: the headers of strings of ``0 .. len(stringHeaders) - 1`` bytes.
    :ivar listHeaders: the headers of lists of ``0 .. len(listHeaders) - 1`` elements.
    """

    def __init__(
        self,
        dialect: bytes = b"none",
        *,
        sizeLimit: int = SIZE_LIMIT,
        prefixLimit: int = PREFIX_LIMIT,
    ) -> None:
        _checkDialect(dialect)
        sizeLimit = checkedCount("sizeLimit", sizeLimit)
        self.dialect = dialect
        self.sizeLimit = sizeLimit
        self.prefixLimit = prefixLimit = checkedCount("prefixLimit", prefixLimit)
        self.symbols = _OUTGOING_TOKENS[dialect]
        self._largest, fastIntLimit = _integerBounds(prefixLimit)
        #: Non-negative integers below this take at most three prefix bytes.
        self.fastIntLimit = fastIntLimit
        self.smallInts = _prefix(_INT_TOKENS, fastIntLimit)
        self.stringHeaders = _prefix(_STRING_HEADERS, sizeLimit + 1)
        self.listHeaders = _prefix(_LIST_HEADERS, sizeLimit + 1)

    def integer(self, value: int) -> bytes:
        """
        The token of an integer.

        :raises BananaEncodeError: beyond what the prefix limit can carry.
        """
        if 0 <= value < len(self.smallInts):
            return self.smallInts[value]
        if not -self._largest <= value <= self._largest:
            raise BananaEncodeError(_integerError(value, self.prefixLimit))
        return _intToken(value)

    def stringHeader(self, size: int) -> bytes:
        """
        The header of a string of ``size`` bytes.

        :raises BananaEncodeError: ``size`` is beyond the size limit.
        """
        if size > self.sizeLimit:
            raise BananaEncodeError(_stringError(size, self.sizeLimit))
        return _header(size, _STRING)

    def listHeader(self, size: int) -> bytes:
        """
        The header of a list of ``size`` elements.

        :raises BananaEncodeError: ``size`` is beyond the size limit.
        """
        if size > self.sizeLimit:
            raise BananaEncodeError(_listError(size, self.sizeLimit))
        return _header(size, _LIST)

    def joinList(self, elements: list[bytes]) -> bytes:
        """
        The encoding of a list whose elements are already encoded (by the other methods here,
        or by :func:`encode`): a header and the elements, joined.

        :raises BananaEncodeError: too many elements for the size limit.
        """
        size = len(elements)
        if size < len(self.listHeaders):
            return self.listHeaders[size] + b"".join(elements)
        return self.listHeader(size) + b"".join(elements)

    def symbol(self, value: bytes) -> bytes:
        """
        The whole encoding of a byte string: its VOCAB token if it has one, else a string.
        """
        token = self.symbols.get(value)
        if token is not None:
            return token
        size = len(value)
        if size < len(self.stringHeaders):
            return self.stringHeaders[size] + value
        return self.stringHeader(size) + value


def getTokens(
    dialect: bytes = b"none", sizeLimit: int | None = SIZE_LIMIT, prefixLimit: int = PREFIX_LIMIT
) -> Tokens:
    """
    The shared :class:`Tokens` for a dialect and limits (they are immutable, so one serves all),
    the same object however the arguments are passed. A ``sizeLimit`` of ``None`` is
    :data:`SIZE_LIMIT` as it is when called, as in :func:`encode`.
    """
    return _sharedTokens(dialect, SIZE_LIMIT if sizeLimit is None else sizeLimit, prefixLimit)


@functools.lru_cache(maxsize=32)
def _sharedTokens(dialect: bytes, sizeLimit: int, prefixLimit: int) -> Tokens:
    return Tokens(dialect, sizeLimit=sizeLimit, prefixLimit=prefixLimit)


def _integerError(value: int, prefixLimit: int) -> str:
    return (
        f"integer {describe(value)} is too large to send: the prefix limit of {prefixLimit} bytes "
        f"allows magnitudes up to 2**{7 * prefixLimit}-1"
    )


def _stringError(size: int, sizeLimit: int) -> str:
    return f"byte string of {size} bytes is too long to send (the size limit is {sizeLimit})"


def _listError(size: int, sizeLimit: int) -> str:
    return f"list of {size} elements is too long to send (the size limit is {sizeLimit})"


def encode(
    expression: Expression,
    dialect: bytes = b"none",
    *,
    sizeLimit: int | None = None,
    prefixLimit: int = PREFIX_LIMIT,
) -> bytes:
    """
    Encode one expression as banana bytes.

    :param expression: bytes, int (``bool`` included), float, or a list or tuple of expressions,
        nested to any depth.
    :param dialect: ``b"none"`` (the default, like :func:`twisted.spread.banana.encode`) or
        ``b"pb"``, which sends every byte string found in the PB vocabulary as a VOCAB token.
    :param sizeLimit: the largest string (bytes) or list (elements) that may be sent; by
        default :data:`SIZE_LIMIT` as it is when called.
    :param prefixLimit: the largest prefix, in bytes; it bounds integer magnitudes to
        ``2 ** (7 * prefixLimit) - 1``.
    :raises BananaEncodeError: a value of another type, or one beyond the limits. Nothing is
        returned in that case, so nothing partial can reach the wire.
    """
    if sizeLimit is None:
        sizeLimit = SIZE_LIMIT
    elif type(sizeLimit) is not int or sizeLimit < 1:
        sizeLimit = checkedCount("sizeLimit", sizeLimit)
    vocabulary = _OUTGOING_TOKENS.get(dialect)
    if vocabulary is None:
        raise ValueError(_unknownDialect(dialect))
    largest, fastIntLimit = _integerBounds(prefixLimit)
    cached = _CACHED
    intTokens = _INT_TOKENS
    out: list[bytes] = []
    append = out.append
    parents: list[Iterator[Any]] = []
    items: Iterator[Any] = iter((expression,))
    while True:
        for item in items:
            kind = type(item)
            if kind is int:
                if 0 <= item < fastIntLimit:
                    if item < cached:
                        append(intTokens[item])
                    elif item < 0x4000:
                        append(bytes((item & 0x7F, item >> 7, _INT)))
                    else:
                        append(bytes((item & 0x7F, (item >> 7) & 0x7F, item >> 14, _INT)))
                else:
                    if not -largest <= item <= largest:
                        raise BananaEncodeError(_integerError(item, prefixLimit))
                    append(_intToken(item))
            elif kind is bytes:
                token = vocabulary.get(item)
                if token is not None:
                    append(token)
                    continue
                size = len(item)
                if size > sizeLimit:
                    raise BananaEncodeError(_stringError(size, sizeLimit))
                append(_STRING_HEADERS[size] if size < _HEADERS else _header(size, _STRING))
                append(item)
            elif kind is list or kind is tuple:
                size = len(item)
                if size > sizeLimit:
                    raise BananaEncodeError(_listError(size, sizeLimit))
                append(_LIST_HEADERS[size] if size < _LIST_CACHED else _header(size, _LIST))
                parents.append(items)
                items = iter(item)
                break
            elif kind is float:
                append(b"\x84" + _packFloat(item))
            else:
                # Subclasses (bool, IntEnum, a bytes or list subclass) travel as their base
                # type, as they do with Twisted; anything else is refused.
                if kind is Encoded:
                    append(item)
                    continue
                if isinstance(item, int):
                    parents.append(items)
                    items = iter((int(item),))
                elif isinstance(item, bytes):
                    parents.append(items)
                    items = iter((bytes(item),))
                elif isinstance(item, (list, tuple)):
                    parents.append(items)
                    items = iter((list(item),))
                elif isinstance(item, float):
                    append(b"\x84" + _packFloat(item))
                    continue
                else:
                    raise BananaEncodeError(
                        f"Banana cannot send {kind.__module__}.{kind.__qualname__} "
                        f"objects: {describe(item)}"
                    )
                break
        else:
            if not parents:
                break
            items = parents.pop()
    return b"".join(out)


class Decoder:
    """
    An incremental banana decoder.

    Feed it bytes as they arrive with :meth:`feed`; it returns the expressions completed by
    those bytes, keeping any partial expression for the next call::

        decoder = Decoder(dialect=b"pb")
        for expression in decoder.feed(data):
            ...

    Every limit is checked before the data it guards is buffered. Once a limit is broken or
    malformed bytes are seen, the decoder raises :class:`~pbroker.errors.BananaDecodeError`
    and refuses any further input: a stream that has gone wrong once cannot be resynchronised.

    :param dialect: ``b"none"`` or ``b"pb"``; it decides whether VOCAB tokens are accepted.
        It may be changed between expressions through :attr:`dialect`.
    :param sizeLimit: the largest string (bytes) or list (elements) accepted.
    :param prefixLimit: the most prefix bytes accepted before a type byte.
    :param depthLimit: the deepest list nesting accepted; the top-level list is depth 1.
    :param messageSizeLimit: if not ``None``, the most bytes one top-level expression may take.
        It is checked whenever a list starts or ends, a string starts, an expression completes
        and :meth:`feed` returns, so an expression is refused before more than this (plus one
        element) is held, however the bytes are split.
    :param text: decode jelly's text, a list of the string ``unicode`` and UTF-8 bytes, as a
        ``str`` in its place (when it is short and valid), sparing the unjellier a list. A
        broker turns it on; its unjellier takes such a ``str`` as that list, security check
        included. It may be changed between expressions through its ``text`` attribute.
    """

    def __init__(
        self,
        dialect: bytes = b"none",
        *,
        sizeLimit: int = SIZE_LIMIT,
        prefixLimit: int = PREFIX_LIMIT,
        depthLimit: int = DEPTH_LIMIT,
        messageSizeLimit: int | None = None,
        text: bool = False,
    ) -> None:
        _checkDialect(dialect)
        sizeLimit = checkedCount("sizeLimit", sizeLimit)
        prefixLimit = checkedCount("prefixLimit", prefixLimit)
        depthLimit = checkedCount("depthLimit", depthLimit)
        if messageSizeLimit is not None:
            messageSizeLimit = checkedCount("messageSizeLimit", messageSizeLimit)
        self._dialect = dialect
        self._vocabulary = _incomingVocabulary(dialect)
        self.sizeLimit = sizeLimit
        self.prefixLimit = prefixLimit
        self.depthLimit = depthLimit
        self.messageSizeLimit = messageSizeLimit
        self._buffer = bytearray()
        self._position = 0
        # The list being filled, how many elements it still lacks, and its unfinished parents.
        self._current: list[Any] | None = None
        self._remaining = 0
        self._parents: list[tuple[list[Any], int]] = []
        # Bytes of the unfinished expression consumed by earlier calls to feed().
        self._consumed = 0
        self._failure: str | None = None
        self.text = text

    @property
    def dialect(self) -> bytes:
        """
        The dialect the next expressions are decoded in. Change it only between expressions.
        """
        return self._dialect

    @dialect.setter
    def dialect(self, dialect: bytes) -> None:
        _checkDialect(dialect)
        self._dialect = dialect
        self._vocabulary = _incomingVocabulary(dialect)

    @property
    def buffered(self) -> int:
        """
        How many bytes have been received but not yet consumed into an expression.
        """
        return len(self._buffer) - self._position

    def takeBuffered(self) -> bytes:
        """
        Remove and return the bytes received after the last complete expression, for a
        protocol that stops speaking banana there (pbroker's native dialect).

        :raises BananaDecodeError: an expression is only partly decoded.
        """
        if self._current is not None:
            raise BananaDecodeError("the stream changed format in the middle of an expression")
        rest = bytes(self._buffer[self._position :])
        self._buffer = bytearray()
        self._position = 0
        return rest

    @property
    def midExpression(self) -> bool:
        """
        Whether a partially received expression is pending.
        """
        return self._current is not None or len(self._buffer) > self._position

    def feed(self, data: bytes = b"", maxExpressions: int | None = None) -> list[Any]:
        """
        Add ``data`` to the stream and return every expression it completes, in order.

        :param maxExpressions: stop after this many expressions and keep the rest of the data
            buffered; a later ``feed()`` (with or without new data) continues from there. The
            dialect negotiation uses this to switch dialects between two expressions.
        :raises BananaDecodeError: the bytes are malformed or break a limit. The expressions
            completed before the error are on its ``expressions`` attribute.
        """
        if self._failure is not None:
            raise BananaDecodeError(f"decoder stopped after an earlier error: {self._failure}")
        if maxExpressions is not None:
            maxExpressions = checkedCount("maxExpressions", maxExpressions)
        results: list[Any] = []
        try:
            self._parse(data, maxExpressions, results)
            return results
        except BananaDecodeError as e:
            e.expressions = results
            self._failure = str(e)
            self._buffer = bytearray()
            self._current = None
            self._parents = []
            raise

    def _parse(self, data: bytes, maxExpressions: int | None, results: list[Any]) -> None:
        stored = self._buffer
        position = self._position
        buffer: bytes | bytearray
        if position == len(stored):
            # Nothing left over: parse the caller's bytes in place, without copying them.
            buffer = data
            position = 0
        else:
            if data:
                stored += data
            buffer = stored
        sizeLimit = self.sizeLimit
        end = len(buffer)
        # A text (up to 127 bytes) is waited for whole, so it must stay under what a decoder may
        # hold (one element of sizeLimit) and pass every size check: a smaller limit turns
        # texts off. Text is not looked for in a memoryview, which has no startswith().
        text = self.text and sizeLimit >= 0xFF and type(buffer) in _BYTES_TYPES
        # (position - self._consumed: where the unfinished expression started in this buffer.
        # The C scan clamps limits at 2**62; a larger sizeLimit is honoured exactly in Python.)
        scan = _scan if sizeLimit <= _SCAN_CEILING else _scanPython
        position, current, remaining, expressionStart, error = scan(
            buffer,
            position,
            position - self._consumed,
            self._vocabulary,
            sizeLimit,
            self.prefixLimit,
            self.depthLimit,
            self.messageSizeLimit,
            text,
            self._current,
            self._remaining,
            self._parents,
            -1 if maxExpressions is None else maxExpressions,
            results,
        )
        if error is not None:
            raise BananaDecodeError(self._describe(*error))
        messageSizeLimit = self.messageSizeLimit
        if current is not None:
            if messageSizeLimit is not None and position - expressionStart > messageSizeLimit:
                raise BananaDecodeError(_messageError(messageSizeLimit))
            self._consumed = position - expressionStart
        else:
            self._consumed = 0
        self._current = current
        self._remaining = remaining
        # Keep what is left for the next call. Consumed bytes are dropped lazily (all of them
        # once the buffer is used up, otherwise when they make up most of it), so the copying
        # stays linear in the input however it is split.
        if buffer is stored:
            if position == end:
                stored.clear()
                position = 0
            elif position > 65536 and position * 2 > end:
                del stored[:position]
                position = 0
        else:
            stored.clear()
            stored += memoryview(buffer)[position:]
            position = 0
        self._position = position

    def _describe(self, error: int, value: int) -> str:
        """
        The message of a scan error: an ``_ERROR_*`` code and the number it is about.
        """
        if error == _ERROR_PREFIX:
            return _prefixError(self.prefixLimit)
        if error == _ERROR_MESSAGE_SIZE:
            return _messageError(self.messageSizeLimit or 0)
        if error == _ERROR_STRING_SIZE:
            return f"string of {value} bytes exceeds the size limit of {self.sizeLimit}"
        if error == _ERROR_LIST_SIZE:
            return f"list of {value} elements exceeds the size limit of {self.sizeLimit}"
        if error == _ERROR_DEPTH:
            return f"lists nested more than {self.depthLimit} deep exceed the depth limit"
        if error == _ERROR_NO_VOCABULARY:
            return (
                f"VOCAB token {value} received in the {self._dialect.decode()!r} "
                "dialect, which has no vocabulary"
            )
        if error == _ERROR_NOT_IN_VOCABULARY:
            return f"VOCAB token {value} is not in the {self._dialect.decode()!r} vocabulary"
        return f"unknown banana type byte 0x{value:02x}"


# What a scan reports when the bytes break a rule (the C accelerator uses the same numbers).
_ERROR_PREFIX: Final = 1
_ERROR_NO_VOCABULARY: Final = 2
_ERROR_NOT_IN_VOCABULARY: Final = 3
_ERROR_STRING_SIZE: Final = 4
_ERROR_MESSAGE_SIZE: Final = 5
_ERROR_LIST_SIZE: Final = 6
_ERROR_DEPTH: Final = 7
_ERROR_TYPE_BYTE: Final = 8
# The largest sizeLimit the C scan takes as it is.
_SCAN_CEILING: Final = 1 << 62

#: The state a scan returns: position, open list, its missing elements, expression start, and
#: an error (code, value) or None.
_ScanResult = tuple[int, "list[Any] | None", int, int, "tuple[int, int] | None"]


def _scanPython(
    buffer: bytes | bytearray,
    position: int,
    expressionStart: int,
    vocabulary: dict[int, bytes] | None,
    sizeLimit: int,
    prefixLimit: int,
    depthLimit: int,
    messageSizeLimit: int | None,
    text: bool,
    current: list[Any] | None,
    remaining: int,
    parents: list[tuple[list[Any], int]],
    wanted: int,
    results: list[Any],
) -> _ScanResult:
    """
    Decode tokens from ``buffer[position:]`` into the open lists and ``results``, stopping
    where the data runs short, after ``wanted`` expressions (-1: no bound) or at an error.

    This is the codec's hot loop in pure Python: locals only, type bytes as literals, and a
    fast path for the one-byte prefix nearly every token has. ``pbroker._speedups.scan``
    does the same in C; :data:`_scan` is whichever is in use.
    """
    end = len(buffer)
    sliceIsBytes = type(buffer) is bytes
    item: Any

    while position < end:
        start = position
        kind = buffer[position]
        position += 1
        if kind < 0x80:
            value = kind
            if position == end:
                position = start
                break
            kind = buffer[position]
            position += 1
            if kind < 0x80:
                # A prefix of two bytes or more: the slow path, bounded by prefixLimit.
                value |= kind << 7
                shift = 14
                while position != end:
                    kind = buffer[position]
                    position += 1
                    if kind >= 0x80:
                        break
                    if position - start > prefixLimit:
                        return position, current, remaining, expressionStart, (_ERROR_PREFIX, 0)
                    value |= kind << shift
                    shift += 7
                else:
                    if position - start > prefixLimit:
                        return position, current, remaining, expressionStart, (_ERROR_PREFIX, 0)
                    position = start
                    break  # the type byte has not arrived yet
                if position - start > prefixLimit + 1:
                    return position, current, remaining, expressionStart, (_ERROR_PREFIX, 0)
        else:
            value = 0

        if kind == 0x81:  # INT
            item = value
        elif kind == 0x87:  # VOCAB
            if vocabulary is None:
                return position, current, remaining, expressionStart, (_ERROR_NO_VOCABULARY, value)
            item = vocabulary.get(value)
            if item is None:
                error = (_ERROR_NOT_IN_VOCABULARY, value)
                return position, current, remaining, expressionStart, error
        elif kind == 0x82:  # STRING
            if value > sizeLimit:
                return position, current, remaining, expressionStart, (_ERROR_STRING_SIZE, value)
            if (
                messageSizeLimit is not None
                and position + value - expressionStart > messageSizeLimit
            ):
                return position, current, remaining, expressionStart, (_ERROR_MESSAGE_SIZE, 0)
            if end - position < value:
                position = start
                break
            if sliceIsBytes:
                item = buffer[position : position + value]
            else:
                item = bytes(buffer[position : position + value])
            position += value
        elif kind == 0x80:  # LIST
            if value > sizeLimit:
                return position, current, remaining, expressionStart, (_ERROR_LIST_SIZE, value)
            if messageSizeLimit is not None and position - expressionStart > messageSizeLimit:
                return position, current, remaining, expressionStart, (_ERROR_MESSAGE_SIZE, 0)
            if current is not None and len(parents) + 2 > depthLimit:
                return position, current, remaining, expressionStart, (_ERROR_DEPTH, 0)
            decoded = None
            if value == 2 and text and current is not None:
                # [b"unicode", <bytes>] (jelly's text) becomes a str when its length has a
                # one-byte prefix and it is valid UTF-8; otherwise the list is opened as any
                # other. Text is looked for inside expressions only (a PB message is a list,
                # whatever it holds), and is waited for whole: how the bytes are split changes
                # nothing.
                textStart = position + 9
                if end - textStart >= 2:
                    # (The first byte, the tag's length, spares most pairs the call.)
                    if buffer[position] == 7 and buffer.startswith(_TEXT_TAG, position):
                        size = buffer[textStart]
                        textEnd = textStart + 2 + size
                        if (
                            size < 0x80
                            and buffer[textStart + 1] == 0x82
                            and (
                                messageSizeLimit is None
                                or textEnd - expressionStart <= messageSizeLimit
                            )
                        ):
                            if textEnd > end:
                                position = start
                                break
                            try:
                                decoded = str(buffer[textStart + 2 : textEnd], "utf-8")
                            except UnicodeDecodeError:
                                decoded = None  # the unjellier reports it
                elif (
                    _TEXT_TAG.startswith(buffer[position:textStart])
                    and (textStart >= end or buffer[textStart] < 0x80)
                    # (Where the tag itself breaks the message size limit, the long way says
                    # so as soon as its header has come.)
                    and (
                        messageSizeLimit is None or textStart - expressionStart <= messageSizeLimit
                    )
                ):
                    position = start
                    break  # too little has come to tell
            if decoded is not None:
                item = decoded
                position = textEnd
            elif value:
                if current is not None:
                    parents.append((current, remaining))
                current = []
                remaining = value
                continue
            else:
                item = []
        elif kind == 0x83 or kind == 0x86:  # NEG, LONGNEG
            item = -value
        elif kind == 0x85:  # LONGINT
            item = value
        elif kind == 0x84:  # FLOAT; a prefix before it means nothing, as in Twisted
            if end - position < 8:
                position = start
                break
            item = _unpackFloat(buffer, position)[0]
            position += 8
        else:
            return position, current, remaining, expressionStart, (_ERROR_TYPE_BYTE, kind)

        # Place the finished element, closing every list it completes.
        if current is not None:
            current.append(item)
            remaining -= 1
            if remaining:
                continue
            if messageSizeLimit is not None and position - expressionStart > messageSizeLimit:
                return position, current, remaining, expressionStart, (_ERROR_MESSAGE_SIZE, 0)
            while parents:
                item = current
                current, remaining = parents.pop()
                current.append(item)
                remaining -= 1
                if remaining:
                    break
            else:
                item = current
                current = None
            if current is not None:
                continue
        elif messageSizeLimit is not None and position - expressionStart > messageSizeLimit:
            return position, current, remaining, expressionStart, (_ERROR_MESSAGE_SIZE, 0)
        results.append(item)
        expressionStart = position
        if len(results) == wanted:
            break

    return position, current, remaining, expressionStart, None


def _loadScan(speedups: ModuleType | None) -> Callable[..., _ScanResult]:
    """
    The C scan when ``pbroker._speedups`` is in use (see :mod:`pbroker._accelerator`), else
    the pure-Python one. Both decode the same bytes to the same expressions and errors.
    """
    return _scanPython if speedups is None else speedups.scan


_scan = _loadScan(_accelerator.speedups)


def _incomingVocabulary(dialect: bytes) -> dict[int, bytes] | None:
    return _INCOMING_SYMBOLS[dialect]


def _prefixError(prefixLimit: int) -> str:
    return f"more than {prefixLimit} prefix bytes before a type byte exceed the prefix limit"


def _messageError(messageSizeLimit: int) -> str:
    return f"expression exceeds the message size limit of {messageSizeLimit} bytes"


def decode(data: bytes, dialect: bytes = b"none", **limits: Any) -> Any:
    """
    Decode exactly one complete expression from ``data``.

    :param limits: keyword limits passed to :class:`Decoder` (``sizeLimit`` by default
        :data:`SIZE_LIMIT` as it is when called).
    :raises BananaDecodeError: ``data`` is malformed, breaks a limit, is incomplete, or holds
        more than one expression.
    """
    if limits.get("sizeLimit") is None:
        limits["sizeLimit"] = SIZE_LIMIT
    decoder = Decoder(dialect, **limits)
    expressions = decoder.feed(data, maxExpressions=1)
    if not expressions:
        raise BananaDecodeError(f"incomplete banana expression ({len(data)} bytes)")
    if decoder.midExpression:
        raise BananaDecodeError(f"{decoder.buffered} bytes of trailing data after the expression")
    return expressions[0]


_defaultPrefixLimit = PREFIX_LIMIT


def setPrefixLimit(limit: int) -> None:
    """
    Set the prefix limit of :class:`Banana` protocols that connect after this call (those
    whose instance or class sets no limit of its own).

    A compatibility convenience for ``twisted.spread.banana.setPrefixLimit``; prefer
    :meth:`Banana.setPrefixLimit` or the ``prefixLimit`` argument of :class:`Decoder`.
    """
    global _defaultPrefixLimit
    _defaultPrefixLimit = checkedCount("the prefix limit", limit)


def _warnNeverCalled(cls: type, name: str, why: str) -> None:
    """
    Warn that subclass ``cls`` defines ``name``, a hook of Twisted's that pbroker never calls,
    where the class is defined (past the ``__init_subclass__`` frames that found it, and a
    metaclass's ``__new__`` that made it).
    """
    level, frame = 2, sys._getframe(1)
    while frame is not None and _makingTheClass(frame):
        level += 1
        frame = frame.f_back  # type: ignore[assignment]
    warnings.warn(f"{cls.__qualname__}.{name} is never called: {why}", RuntimeWarning, level)


def _makingTheClass(frame: Any) -> bool:
    # Whether ``frame`` is one of those that make a class: an __init_subclass__, or the
    # __new__ of a metaclass (whose first argument is itself a class of classes).
    code = frame.f_code
    if code.co_name == "__init_subclass__":
        return True
    if code.co_name != "__new__" or not code.co_varnames:
        return False
    first = frame.f_locals.get(code.co_varnames[0])
    if not code.co_argcount and code.co_flags & inspect.CO_VARARGS:
        first = first[0] if first else None  # (a __new__(*args, **kw))
    return isinstance(first, type) and issubclass(first, type)


class Banana(Protocol):
    """
    The banana protocol: dialect negotiation, then a stream of expressions both ways.

    Subclass it and override :meth:`expressionReceived` (and optionally
    :meth:`connectionReady`, called once the dialect is chosen); send with :meth:`sendEncoded`.
    The side that accepted the connection (``isClient=False``) offers :attr:`knownDialects`; the
    client picks the first of them it knows.

    Malformed or oversized input is logged and the connection is aborted; nothing further is
    read from it.
    """

    #: The dialects this side offers (server) or accepts (client), in order of preference.
    knownDialects: list[bytes] = [b"pb", b"none"]
    #: The largest string (bytes) or list (elements) sent or accepted.
    sizeLimit: int = _SIZE_LIMIT
    #: The most prefix bytes accepted; set it with :meth:`setPrefixLimit`.
    prefixLimit: int = PREFIX_LIMIT
    #: The deepest list nesting accepted.
    depthLimit: int = DEPTH_LIMIT
    #: The most bytes one incoming expression may take (``None``: no limit beyond the others).
    messageSizeLimit: int | None = None
    #: Whether jelly's text arrives as ``str`` (see the ``text`` option of
    #: :class:`~pbroker.banana.Decoder`).
    decodeText: bool = False

    #: The ``pb`` dialect's symbol table, under the names Twisted gives it.
    outgoingVocabulary: dict[bytes, int] = dict(PB_VOCABULARY)
    incomingVocabulary: dict[int, bytes] = {n: s for s, n in PB_VOCABULARY.items()}

    _log = Logger()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Twisted's decoder calls these for each token and expression; pbroker's Decoder
        # has no such steps, and a port that overrides them must not be left silently unused.
        for name in ("gotItem", "callExpressionReceived"):
            if name in cls.__dict__:
                _warnNeverCalled(
                    cls,
                    name,
                    "pbroker's Banana decodes with a Decoder and passes each whole "
                    "expression to expressionReceived (docs/differences.rst)",
                )

    def __init__(self, isClient: bool = True) -> None:
        self.isClient = bool(isClient)
        #: The negotiated dialect, or ``None`` until negotiation ends.
        self.currentDialect: bytes | None = None
        # A banana Decoder, or another with its feed() contract once a dialect replaces it.
        self._decoder: Any = None

    def setPrefixLimit(self, limit: int) -> None:
        """
        Set the prefix limit for this connection, for both decoding and encoding.
        """
        limit = checkedCount("the prefix limit", limit)
        self.prefixLimit = limit
        if self._decoder is not None:
            self._decoder.prefixLimit = limit

    def connectionMade(self) -> None:
        self.currentDialect = None
        # The module-wide default applies unless this instance or its class chose a limit.
        if "prefixLimit" not in self.__dict__ and type(self).prefixLimit == PREFIX_LIMIT:
            self.prefixLimit = _defaultPrefixLimit
        # So does SIZE_LIMIT, which stock PB programs raise with banana.SIZE_LIMIT = n.
        if "sizeLimit" not in self.__dict__ and type(self).sizeLimit == _SIZE_LIMIT:
            self.sizeLimit = SIZE_LIMIT
        limit = self.messageSizeLimit
        self._decoder = Decoder(
            b"none",
            sizeLimit=self.sizeLimit,
            prefixLimit=self.prefixLimit,
            depthLimit=min(self.depthLimit, _NEGOTIATION_DEPTH),
            messageSizeLimit=_NEGOTIATION_SIZE if limit is None else min(limit, _NEGOTIATION_SIZE),
            text=self.decodeText,
        )
        if not self.isClient:
            self._sendNegotiation(self._offer())

    def connectionReady(self) -> None:
        """
        Called once the dialect is chosen; the place to start sending expressions.
        """

    def expressionReceived(self, expression: Any) -> None:
        """
        Called with each complete expression after the dialect is chosen. Override it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement expressionReceived")

    def _offer(self) -> list[bytes]:
        # What a server offers: its dialects (a subclass may add entries a client skips).
        return list(self.knownDialects)

    def _sawOffer(self, offered: list[Any]) -> None:
        # A client's look at the whole offer, before it answers (a subclass's hook).
        pass

    def _sendNegotiation(self, expression: Expression) -> None:
        # The dialects offered, or the one chosen (in plain banana): through sendEncoded, as
        # in Twisted, which a subclass may override to watch what it sends.
        self.sendEncoded(expression)

    def sendEncoded(self, expression: Expression) -> None:
        """
        Encode ``expression`` in the current dialect and write it to the transport.

        :raises BananaEncodeError: the expression cannot be sent; nothing was written.
        """
        data = self._encoded(expression)
        assert self.transport is not None, "sendEncoded() called before connectionMade()"
        self.transport.write(data)

    def _encoded(self, expression: Expression) -> bytes:
        # ``expression`` in the current dialect, within this protocol's limits.
        return encode(
            expression,
            self.currentDialect or b"none",
            sizeLimit=self.sizeLimit,
            prefixLimit=self.prefixLimit,
        )

    def dataReceived(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            return  # the connection already failed, or connectionMade() was never called
        try:
            while self.currentDialect is None:
                expressions = decoder.feed(data, maxExpressions=1)
                data = b""
                if not expressions:
                    return
                self._negotiate(expressions[0])
                if self._decoder is None:
                    return
                if self._decoder is not decoder:
                    # The chosen dialect has its own decoder; it gets what followed the choice.
                    data = decoder.takeBuffered()
                    decoder = self._decoder
            self._deliver(decoder.feed(data))
        except BananaDecodeError as e:
            self._malformed(e)

    def _malformed(self, error: BananaDecodeError) -> None:
        # The peer sent garbage. Expressions that arrived intact before it are still
        # delivered; the connection is dropped whatever their handlers do. (An error the
        # application makes while sending, BananaEncodeError, is its own: it propagates.)
        try:
            if self.currentDialect is not None:
                self._deliver(error.expressions)
        finally:
            why = str(error)
            self._fail(
                why if self.currentDialect is not None else f"in the dialect negotiation: {why}"
            )

    def _deliver(self, expressions: list[Any]) -> None:
        for expression in expressions:
            if self._decoder is None:
                return  # the connection was dropped while handling an expression
            self.expressionReceived(expression)

    def connectionLost(self, reason: Any = None) -> None:
        self._decoder = None

    def _negotiate(self, expression: Any) -> None:
        if self.isClient:
            offered = expression if isinstance(expression, list) else []
            for dialect in offered:
                if isinstance(dialect, bytes) and dialect in self.knownDialects:
                    self._sawOffer(offered)
                    self._sendNegotiation(dialect)
                    self._selectDialect(dialect)
                    return
            self._fail(f"the server offered no dialect this client knows: {describe(expression)}")
        elif isinstance(expression, bytes) and expression in self.knownDialects:
            self._selectDialect(expression)
        else:
            self._fail(
                f"the client chose a dialect this server did not offer: {describe(expression)}"
            )

    def _selectDialect(self, dialect: bytes) -> None:
        self.currentDialect = dialect
        decoder = self._decoder
        assert decoder is not None
        decoder.dialect = dialect
        decoder.depthLimit = self.depthLimit
        decoder.messageSizeLimit = self.messageSizeLimit
        self.connectionReady()

    def _fail(self, why: str) -> None:
        """
        Give up on a connection whose stream can no longer be trusted.
        """
        self._log.warn("Dropping banana connection: {why}", why=why)
        self._decoder = None
        transport = self.transport
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()
