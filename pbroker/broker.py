"""
The Perspective Broker protocol: one :class:`Broker` per connection, speaking PB version 6.

A broker turns the expressions banana delivers into calls on local objects and answers to
calls it made, through an explicit table of message handlers (:attr:`Broker.messageHandlers`,
which subclasses extend for new message types). It owns the per-connection tables: the
objects it exports (with the peer's reference counts), the calls waiting for answers, and the
request and object id counters. Values cross it through jelly with the broker as invoker, so
flavors reach it through ``jellier.invoker``.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import contextvars
import functools
import gc
import heapq
import inspect
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import CoroutineType, MappingProxyType, MethodType
from typing import Any, ClassVar, Final, NoReturn, cast

import msgpack
from twisted.cred.error import LoginFailed
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

from pbroker import context as _context
from pbroker._jellier import Jellier, Jellyable
from pbroker._jellycore import ID_LIMIT, checkSecurity, isPeerID
from pbroker._keepalive import Keepalive, KeepaliveTimer
from pbroker._native import (
    EMPTY_MAP,
    EXTENSION_DEPTH,
    FRAGMENT_SIZE,
    LAST,
    LIMIT_OF_THE_PEER,
    MORE,
    VALUE_FIELDS,
    FrameDecoder,
    Packed,
    ValueCodec,
    extensionsIn,
    fragmentHeader,
    inline,
    notInOnePiece,
    packMessage,
    wholeRecord,
)
from pbroker._pacing import PacedTransport
from pbroker._streams import StreamTable, findStreams, refusedStreams
from pbroker._unjellier import Unjellier, expressionsIn
from pbroker.banana import DEPTH_LIMIT, Banana, Decoder, Encoded, _warnNeverCalled, getTokens
from pbroker.errors import (
    BananaDecodeError,
    DeadReferenceError,
    Error,
    InsecureJelly,
    InvalidJelly,
    JellyError,
    LimitExceeded,
    NoSuchMethod,
    PBConnectionLost,
    ProtocolError,
    UnsupportedByPeer,
    cannotStop,
    checkedCount,
    checkReactorTime,
    describe,
    isInteger,
    isSeconds,
    toSeconds,
)
from pbroker.failure import (
    COPYABLE_FAILURE_TAG,
    CopiedFailure,
    CopyableFailure,
    failure2Copyable,
    loggable,
)
from pbroker.flavors import RemoteCache, RemoteCacheObserver
from pbroker.jelly import ISecurityOptions, UnjellyableRegistry, globalRegistry, globalSecurity
from pbroker.references import Local, RemoteReference
from pbroker.stream import DEFAULT_WINDOW, RemoteStream, Stream, isStreamable, unclosedStreams

__all__ = [
    "MAX_BROKER_REFS",
    "MIN_MESSAGE_SIZE",
    "NATIVE_DIALECT",
    "PB_VERSION",
    "REFUSALS_LOGGED",
    "Broker",
    "BrokerLimits",
    "Keepalive",
]

#: The protocol version both sides must announce.
PB_VERSION = 6

#: The most objects one connection may export at once (and, separately, cache), by default.
MAX_BROKER_REFS = 1024

# After this many attempts to export beyond the limit the connection is closed.
_MAX_REFERENCE_VIOLATIONS = 3

#: pbroker's native dialect: PB's messages, msgpack values, fragmented records (see
#: ``pbroker._native``). The number is its version.
NATIVE_DIALECT = b"pbroker2"
# An entry a server adds to its offer of dialects (after them: a client that does not know it
# skips it, as it skips any name it does not know): the limits its hello will give,
# ``pbroker-limits:<messageSize, 0 for none>:<taken>``, so that a pbroker client knows them
# as it chooses and hands out the root then, as a stock client does.
_LIMITS_OFFER = b"pbroker-limits:"

# Bytes of fragments of large messages written in one reactor turn before others get a turn.
_LARGE_BYTES_PER_TURN = 4 * FRAGMENT_SIZE
#: Bytes a connection must move (either way) in ``stallTimeout`` for a peer that takes none
#: of this side's large calls to count as slow, not stalled (see Broker._checkTakes): more
#: than keepalive's pings and pongs.
_TAKE_MOVEMENT = 64 * 1024

# What a message kept behind large messages costs in memory besides its bytes (its entry in
# Broker._afterLarge and its bytes object's header, about 130 bytes), counted with them (see
# Broker._keep).
_KEPT_OVERHEAD = 128
# What a release kept there costs (its entry, its _Release, its place in _keptReleases: about
# 200 bytes measured), counted as kept for the peer.
_KEPT_RELEASE = 200

# The object a keepalive ping calls on a stock Twisted peer: it is never exported.
_PING_OBJECT = b"pbroker.keepalive"

#: How many refusals of what the peer sent are logged on one connection (a call to a method
#: that does not exist, a message it does not know...), with the notices of what it sent
#: (its ``didNotUnderstand``...); after them, one line says that more are not.
REFUSALS_LOGGED = 100

# Reads of at least this many bytes (or reads that complete a message begun earlier) are
# decoded with the cyclic garbage collector paused.
_LARGE_READ = 4096
# Reads smaller than this that wait unhandled (see Broker._keepForLater) are copied into
# shared pieces of about this size.
_SMALL_READ = 16 * 1024
_KEPT_PIECE = 64 * 1024
# In a long run of messages from one read, the answers held so far are sent after every this
# many (see Broker._deliver). Measured with 100 to 900 calls in flight on loopback, 50 gave
# 1.5-1.7x the calls per second of one write per read; 20 and 32 gave a little less.
_FLUSH_EVERY = 50
# Values the native codec packs without hooks, and small enough to stay in the envelope.
_SCALARS = frozenset({int, float, bool, type(None)})
# Results that are certainly not Deferreds or coroutines, tested by type first: Deferred is
# an abc.ABC (Awaitable), so isinstance() on it is a Python-level check, slow on a hot path.
_PLAIN = _SCALARS | {bytes, str, list, dict, tuple, set, frozenset}
# Values the codecs encode without calling any hook: serialising them registers nothing.
_HOOKLESS = _SCALARS | {bytes, str}
# The values the native dialect decodes itself (not through jelly), by the jelly tag of the
# security options that rules them in the pb dialect (see Broker._checkKinds).
_KIND_TAGS = (
    (list, b"list"),
    (dict, b"dictionary"),
    (tuple, b"tuple"),
    (set, b"set"),
    (frozenset, b"frozenset"),
    (str, b"unicode"),
    (type(None), b"None"),
    (bool, b"boolean"),
)
_NESTED = frozenset({list, tuple, set, frozenset, dict})
# Past this many members, _checkKinds looks at the set of their kinds, not at each.
_MANY_MEMBERS = 16
# (Shared by the brokers whose options refuse none of them: never changed, only replaced.)
_NO_KINDS: dict[type, bytes] = {}


def _checkKinds(value: Any, refused: dict[type, bytes]) -> None:
    """
    Refuse a value the native codec decoded that holds a kind of value the security
    options refuse (a list, a dict...), as the pb dialect refuses its jelly tag. Values
    within it that came through jelly (copies) were checked by their unjellier.

    :raises InsecureJelly: the first refused kind found.
    """
    _refuseKinds((type(value),), refused)
    stack = [value] if type(value) in _NESTED else []
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        for members in (item.keys(), item.values()) if type(item) is dict else (item,):
            if len(members) > _MANY_MEMBERS:
                # The kinds of many members at once: a list of numbers is one look.
                kinds = set(map(type, members))
                _refuseKinds(kinds, refused)
                if not kinds.isdisjoint(_NESTED):
                    stack.extend(member for member in members if type(member) in _NESTED)
                continue
            for member in members:
                kind = type(member)
                if kind in refused:
                    _refuseKinds((kind,), refused)
                if kind in _NESTED:
                    stack.append(member)


def _refuseKinds(kinds: Iterable[type], refused: dict[type, bytes]) -> None:
    for kind in kinds:
        tag = refused.get(kind)
        if tag is not None:
            raise InsecureJelly(
                f"type {describe(tag.decode())} is not allowed by the security options"
            )


# What serialize() gives that is not a Deferred.
_SERIALIZED = frozenset({bytes, Encoded, Packed})
# What a registration made while serialising counted (see Broker._unregister).
_EXPORT, _CACHE, _STREAM = 0, 1, 2
#: A reference to the peer's object, kept until the value naming it is sent (see
#: Broker.keepUntilSent); not a count.
_KEPT = 4
#: A handle on a cache copy, named while large messages wait to be written (one may hold the
#: first copy): the value waits behind them (see Broker._behindLarge). Not a count.
_BEHIND = 5
#: A first copy of a Cacheable made while serialising: a call holding one is not dropped
#: unsent (later messages may name it by handle). Not a count.
_FIRST = 6

# What a queued message needs to arrive before it, and what it provides to those after it
# (see Broker._keysOf), as (kind, id): the first copy of one of this side's Cacheables (by
# luid), a message naming one the peer holds a copy of, a message naming one of the peer's
# objects (a reference or a copy, by its luid there), a stream of this side's, a call of
# this side's (by request id), a call to one of the peer's copies of this side's
# Cacheables (by luid: such calls, an observer's updates, keep their order), or any call
# that keeps its place among this side's calls (the default: see CallOptions.ordered).
_FIRST_KEY, _OURS, _THEIRS, _STREAM_KEY, _CALL, _TO_COPY, _ORDER = 0, 1, 2, 3, 4, 5, 6
_IN_ORDER = (_ORDER, None)
_KeySet = frozenset[tuple[int, Any]]
# (needs, provides)
_Keys = tuple[_KeySet, _KeySet]
_NOTHING: _KeySet = frozenset()


def _needing(key: tuple[int, Any]) -> _Keys:
    """
    The keys of a message that needs ``key`` and provides nothing (an uncache, a cancel).
    """
    return frozenset({key}), _NOTHING


#: A first copy of a Cacheable, as counted in a received value (see Broker._countedIn).
_NEW_CACHE = 3


def _jelliedAsStream(object: Any, taster: Any) -> bool:
    """
    Whether jelly must refuse ``object`` as a stream: it has no other form. An iterator of a
    class of its own, with its state in its ``__dict__``, that the security options
    (``taster``) allow is copied, as stock PB copies it.
    """
    return isStreamable(object) and not (
        taster.isClassAllowed(type(object))
        and hasattr(object, "__dict__")
        and not isinstance(object, (Stream, RemoteStream))
    )


def _refuseStreams(object: Any, jellier: Any) -> None:
    """
    Refuse a stream met while a native value is jellied (inside a copy, or in a value whose
    tuples and sets nest too deeply): jelly has no form for it, and it would arrive as an
    Unpersistable, or as a meaningless state. (An iterator of a class of its own, with the
    state in its ``__dict__``, that the security options allow is copied, as in the ``pb``
    dialect.)
    """
    if _jelliedAsStream(object, jellier.taster):
        raise refusedStreams(
            JellyError(
                f"a stream ({type(object).__name__}) can be sent as a value, or in lists, dicts, "
                f"tuples and sets nested at most {EXTENSION_DEPTH} deep, not inside a copy or "
                "a value nested deeper"
            ),
            object,
        )


class _NativeJellier(Jellier):
    """
    Jelly inside a native value (an object's state, or a value sent whole through jelly):
    a ``bytearray`` or ``memoryview`` goes as ``bytes``, as it does anywhere else in a native
    value, where jelly in the ``pb`` dialect sends an unpersistable marker.
    """

    def _leaf(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytearray:
            return bytes(obj)
        if kind is memoryview:
            if not obj.c_contiguous:
                raise notInOnePiece()
            return obj.tobytes()
        if kind is msgpack.Timestamp:
            # As it arrives anywhere else in a native value: an int of nanoseconds.
            return obj.to_unix_nano()
        return super()._leaf(obj)


class _UnpersistableStreams:
    """
    A ``persistentStore`` for jelly in a ``pb`` dialect that notes each
    :class:`~pbroker.stream.Stream` met: it travels as an ``Unpersistable``, as stock PB
    sends what it cannot copy, and will never be read, so its writer (a publisher that keeps
    its streams) must learn so. They are closed once the value is jellied (:meth:`close`),
    not during the walk: closing runs the application's code (a waiting write's errback, a
    producer's ``stopProducing``), which could change a container being jellied.
    """

    __slots__ = ("streams",)

    def __init__(self) -> None:
        self.streams: list[Stream] = []

    def __call__(self, object: Any, jellier: Any) -> None:
        if isinstance(object, Stream) and not jellier.taster.isClassAllowed(type(object)):
            self.streams.append(object)

    def close(self, broker: Any) -> None:
        if self.streams:
            streams, self.streams = self.streams, []
            refusedStreams(broker._unsupported("sending a stream (a Stream)"), *streams)


# An option Broker.configure was not given.
_UNSET: Any = object()


def _parseLimits(entry: bytes) -> tuple[int | None, int] | None:
    """
    ``(messageSize, taken)`` from a ``pbroker-limits:`` entry of a server's offer, ``None``
    if it is malformed (the client then waits for the hello, as from an earlier server).
    """
    # (Fields a later version appends are ignored; a number of more than 20 digits is none
    # the offer would give, and not worth converting.)
    fields = entry[len(_LIMITS_OFFER) :].split(b":", 2)[:2]
    if len(fields) != 2 or not all(field.isdigit() and len(field) <= 20 for field in fields):
        return None
    size, taken = int(fields[0]), int(fields[1])
    return (size or None, taken)


def _checkDialects(dialects: Any) -> list[bytes]:
    """
    The dialects a broker offers or accepts, in order of preference: ``dialects``, checked.
    """
    known = list(Broker.knownDialects)
    if isinstance(dialects, (bytes, str)) or not hasattr(dialects, "__iter__"):
        raise TypeError(
            f"dialects must be a list of dialect names such as [b'pb'], not {dialects!r}"
        )
    chosen = list(dialects)
    for dialect in chosen:
        if type(dialect) is not bytes:
            raise TypeError(f"a dialect name is bytes, such as b'pb', not {dialect!r}")
    unknown = [dialect for dialect in chosen if dialect not in known]
    if unknown or not chosen:
        raise ValueError(f"dialects must be taken from {known}, not {chosen!r}")
    return chosen


def _timedOut(message: bytes | str, result: Any, timeout: float, why: str = "") -> Any:
    """
    A call's timeout cancelled it: a :class:`~twisted.internet.defer.TimeoutError` that says
    which call and after how long, and ``why`` if given (``onTimeoutCancel`` of
    ``Deferred.addTimeout``).
    """
    if isinstance(result, Failure) and result.check(CancelledError):
        raise _timeoutError(message, timeout, why)
    return result


def _timeoutError(message: bytes | str, timeout: float, why: str = "") -> DeferredTimeoutError:
    """
    The error of the call to ``message`` that had no answer within ``timeout`` seconds.
    """
    name = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return DeferredTimeoutError(
        f"the call to {name!r} had no answer within {timeout:g} seconds{why}"
    )


def _timeoutNamed(failure: Failure, message: bytes | str, timeout: float) -> Failure:
    """
    A call sent with the time left of a timeout given earlier (before the connection was
    ready) timed out: its error names the timeout the caller gave, not what was left. (Only
    this side's own TimeoutError: a remote error is another type.)
    """
    if type(failure.value) is DeferredTimeoutError:
        raise _timeoutError(message, timeout)
    return failure


#: The smallest ``messageSize`` of :class:`BrokerLimits`: what a peer announces below it is taken as
#: this much, since every message limit must leave room for pings and for the short error
#: that says a larger message could not be sent.
MIN_MESSAGE_SIZE = 1024

# The longest unknown command echoed back in didNotUnderstand (PB's are under 20 bytes).
_MAX_COMMAND_SIZE = 256

# Cancelled calls whose late answers are still expected (pb dialect), at most.
_MAX_ABANDONED = 10_000


@dataclass(frozen=True)
class BrokerLimits:
    """
    What one connection may make this side hold, so that a misbehaving peer costs bounded
    memory and work, and other connections keep being served.

    Going over a limit fails the call or value concerned with
    :class:`~pbroker.errors.LimitExceeded` (or :class:`~pbroker.errors.Error` for the
    reference counts, as in Twisted), except where the stream itself can no longer be trusted
    (a message too large or too deep), which closes the connection. Each is logged. Each
    limit is an integer from 1 to ``2**63 - 1`` (the peer is told some of them).

    :ivar messageSize: the most bytes one incoming message may take, at least
        :data:`MIN_MESSAGE_SIZE` (``None``: no limit).
    :ivar nestingDepth: the deepest list nesting an incoming message may have (in the
        native dialect, each value's: see docs/security.rst).
    :ivar exportedReferences: objects this side exports to the peer by reference at once.
    :ivar cachedObjects: Cacheables the peer holds copies of at once.
    :ivar importedReferences: references to the peer's objects this side holds at once; and,
        counted apart, copies of the peer's Cacheables this side keeps, and the peer's streams
        this side stopped reading that the peer has not ended yet (one past that is told
        to stop but not remembered; from then on a message for any stream the peer opened
        before and this side does not know is dropped rather than taken for an error).
    :ivar pendingCalls: calls from the peer still being answered at once (a one-way call
        until its method's Deferred fires; a call reusing the id of one in progress drops the
        peer); also the most streams the peer may send this side at once (in the native
        dialect), and the most this side may send it.
    :ivar bufferedBytes: bytes written for a peer after its connection stopped taking them
        (a reader that does not read); beyond this the connection is dropped if it sends
        none of it in ``stallTimeout`` seconds. The peer's messages that arrive
        meanwhile wait unhandled, up to this plus ``messageSize`` bytes, beyond which it is
        dropped at once. Large native calls that this side sent and a pbroker peer has not
        started handling yet add up to at most this or the peer's, the smaller (one is
        always sent); the others wait.
    :ivar stallTimeout: how long a peer with more than ``bufferedBytes`` waiting for it may
        go on taking nothing (``None``: it is dropped as soon as that much waits).
    :ivar streamBytes: bytes of items of the peer's streams (native dialect) received and
        not yet read, at once, as packed; an item past this makes the stream holding the
        most of them fail with ``LimitExceeded``, its unread items dropped (one item always
        fits). Each stream is also given credit for at most half the room left, by the size
        of its largest items lately.
    """

    messageSize: int | None = 32 * 1024 * 1024
    nestingDepth: int = DEPTH_LIMIT
    exportedReferences: int = MAX_BROKER_REFS
    cachedObjects: int = MAX_BROKER_REFS
    importedReferences: int = 16 * 1024
    pendingCalls: int = 1000
    bufferedBytes: int = 16 * 1024 * 1024
    stallTimeout: float | None = 30.0
    streamBytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "nestingDepth",
            "exportedReferences",
            "cachedObjects",
            "importedReferences",
            "pendingCalls",
            "bufferedBytes",
            "streamBytes",
        ):
            _checkCount(self, name, getattr(self, name))
            if getattr(self, name) < 1:
                raise ValueError(f"BrokerLimits.{name} must be at least 1")
        if self.messageSize is not None:
            _checkCount(self, "messageSize", self.messageSize, " (or None)")
            if self.messageSize < MIN_MESSAGE_SIZE:
                raise ValueError(
                    f"BrokerLimits.messageSize must be at least {MIN_MESSAGE_SIZE} (or None), "
                    f"not {describe(self.messageSize)}"
                )
        if self.stallTimeout is not None:
            if not isSeconds(self.stallTimeout):
                raise TypeError(
                    "BrokerLimits.stallTimeout must be a number of seconds or None, not "
                    f"{type(self.stallTimeout).__name__}"
                )
            if not self.stallTimeout >= 0:
                raise ValueError("BrokerLimits.stallTimeout must be at least 0 (or None)")
            object.__setattr__(self, "stallTimeout", toSeconds(self.stallTimeout))


_LARGEST_LIMIT: Final = 2**63 - 1


def _checkCount(limits: Any, name: str, value: Any, alternative: str = "") -> None:
    """
    Check that the limit ``name`` is an integer, and store it as an ``int`` (a numpy
    integer would go on to the wire, and to checks that take ints only).
    """
    if not isInteger(value):
        raise TypeError(f"BrokerLimits.{name} must be an integer{alternative}, not {value!r}")
    checked = operator.index(value)
    if checked > _LARGEST_LIMIT:
        # Limits are told to the peer as msgpack integers, which stop there.
        raise ValueError(
            f"BrokerLimits.{name} must be at most 2**63 - 1{alternative}, not {describe(checked)}"
        )
    object.__setattr__(limits, name, checked)


def _checkedWindow(window: Any) -> int:
    """
    A :attr:`Broker.streamWindow`: an integer, at least 1 (a reader that gave no credit
    would never get an item; the peer takes a credit of 0 for a protocol error).
    """
    return checkedCount("Broker.streamWindow", window)


def _unjellyLocal(unjellier: Unjellier, jellyList: list[Any]) -> Any:
    """
    ``[b"local", luid]``: one of our own objects, sent back to us; it arrives as itself.
    """
    if len(jellyList) != 2:
        raise InvalidJelly(f"a local reference needs one id: {describe(jellyList)}")
    broker = unjellier.invoker
    found = broker.localObjectForID(jellyList[1])
    if found is None and broker.peerIsPbroker:
        # A pbroker peer releases what it sends back only after sending it.
        raise InvalidJelly(f"a local reference to an unknown id: {describe(jellyList[1])}")
    if found is None:
        # A stock peer that sends one of our objects back without keeping it releases it
        # before its answer goes: the object arrives as None, as it does in stock PB.
        broker._logRefusal(
            broker._log.info,
            "The peer sent back our object {luid}, which it had already released: it "
            "arrives as None",
            luid=describe(jellyList[1]),
        )
    return found


def _cacheID(jellyList: list[Any]) -> int:
    if len(jellyList) != 2 or not isPeerID(jellyList[1]):
        raise InvalidJelly(
            f"a cache reference needs one integer id from 1 below 2**61 - 1: {describe(jellyList)}"
        )
    luid: int = jellyList[1]
    return luid


def _unjellyCached(unjellier: Unjellier, jellyList: list[Any]) -> Any:
    """
    ``[b"cached", luid]``: another handle on a copy of the peer's Cacheable we already hold.
    """
    broker = unjellier.invoker
    luid = _cacheID(jellyList)
    cache = broker.locallyCachedObjects.get(luid)
    if cache is None:
        raise InvalidJelly(f"a reference to an unknown cache: {describe(jellyList)}")
    if broker._arrivals is not None:
        broker._arrivals.append((luid, _CACHE))
    return cache._borgify()


def _unjellyLocalCache(unjellier: Unjellier, jellyList: list[Any]) -> Any:
    """
    ``[b"lcache", luid]``: a copy of one of our Cacheables, sent back; it arrives as itself.
    """
    local = unjellier.invoker.remotelyCachedObjects.get(_cacheID(jellyList))
    if local is None:
        raise InvalidJelly(f"a reference to an unknown cacheable: {describe(jellyList)}")
    return local.object


def _brokerRegistry(parent: UnjellyableRegistry) -> UnjellyableRegistry:
    """
    The tags every broker reads, in front of the application's copy registry.
    """
    registry = UnjellyableRegistry(parent)
    registry.setUnjellyableForClass(b"remote", RemoteReference)
    registry.setUnjellyableForClass(b"local", _unjellyLocal)
    registry.setUnjellyableForClass(COPYABLE_FAILURE_TAG, CopiedFailure)
    registry.setUnjellyableForClass(b"cached", _unjellyCached)
    registry.setUnjellyableForClass(b"lcache", _unjellyLocalCache)
    return registry


Handler = Callable[..., None]


# The signature of each class's function that handles stock-style proto_ messages (see
# _handleStock): the function's own, not what functools.wraps says it wraps. Only a class's
# own functions are kept (they are few); other callables, a method made for one broker or
# what a __getattr__ makes up for any name a peer sends, are looked at each time.
_STOCK_SIGNATURES: dict[Any, inspect.Signature | None] = {}


def _handleStock(name: str, method: Any, broker: Broker, *fields: Any) -> None:
    """
    Give a message's fields to ``method``, the broker's ``name`` (``proto_<command>``, read
    once, by the caller, as Twisted reads it), if they fit its signature.
    """
    function = None
    if type(method) is MethodType and method.__func__ is getattr(type(broker), name, None):
        function = method.__func__
    if function is not None and function in _STOCK_SIGNATURES:
        signature = _STOCK_SIGNATURES[function]
    else:
        try:
            signature = inspect.signature(method, follow_wrapped=False)
        except (TypeError, ValueError):
            signature = None  # none to check against: its call says
        if function is not None:
            _STOCK_SIGNATURES[function] = signature
    if signature is not None:
        try:
            signature.bind(*fields)
        except TypeError:
            raise ProtocolError(
                f"{name}() does not take a message of {len(fields)} fields: "
                f"{describe(list(fields))}"
            ) from None
    method(*fields)


@functools.lru_cache(maxsize=16)
def _noKeywords(tokens: Any) -> bytes:
    """
    The banana bytes of the jelly of ``{}`` (the keywords of most calls) for ``tokens``.
    """
    return Jellier(globalSecurity, None, None).encode({}, tokens)


def _nearerEnd(queue: Sequence[Any], field: int, requestID: int) -> range:
    """
    The indices of ``queue`` to look for the call ``requestID`` in (``entry[field]`` is an
    entry's request id, or None): from the end whose id is nearer. Request ids grow along
    the queue, but for entries moved ahead of calls that wait (and answers, which have
    none), so a caller that cancels its calls newest first finds each at once, as one that
    cancels them oldest first does.
    """
    size = len(queue)
    if size > 1:
        first, last = queue[0][field], queue[-1][field]
        if type(first) is int and type(last) is int and last - requestID < requestID - first:
            return range(size - 1, -1, -1)
    return range(size)


def _addSorted(table: dict[Any, list[Any]], key: Any, value: Any) -> list[Any]:
    """
    Put ``value`` in ``table[key]``, a sorted list (made if missing); return that list.
    """
    values = table.get(key)
    if values is None:
        values = table[key] = [value]
    else:
        bisect.insort(values, value)
    return values


def _removeSorted(table: dict[Any, list[Any]], key: Any, value: Any) -> list[Any] | None:
    """
    Take one ``value`` out of ``table[key]``, a sorted list holding it; return what is left,
    or ``None`` if nothing is (the key is then gone).
    """
    values = table[key]
    del values[bisect.bisect_left(values, value)]
    if values:
        return values
    del table[key]
    return None


def _waitsForRoom(large: list[Any]) -> bool:
    """
    Whether the entry ``large`` of Broker._largeOut is a call that waits for room and whose
    keys are known (see Broker._startableLarge).
    """
    return bool(large[3]) and large[6] is not None


def _orderedCall(large: list[Any]) -> bool:
    """
    Whether the entry ``large`` of Broker._largeOut is a call of this side's that keeps its
    order. (A call that may wait for room has its keys: one made with ``ordered=False``
    makes no answer wait. Others are taken as ordered.)
    """
    keys = large[6]
    return large[2] is not None and (keys is None or _IN_ORDER in keys[1])


class _Waiting:
    """
    The large messages of Broker._largeOut, kept up to date as they are queued (``add``),
    start (``start``) and go (``remove``), so that a flush or an answer does not walk them
    all. Of the calls that wait for room (see Broker._flushAfterLarge): the first one's
    serial, and for each key one of them provides, the smallest serial of those that do;
    the serial of the first other large message (``firstOther``), and whether there is one
    (``others``); and the serials of this side's calls that keep their order (``ordered``,
    see Broker._orderedCallUnsent).
    """

    __slots__ = ("_byKey", "_calls", "first", "firstOther", "ordered", "others", "provided")

    def __init__(self) -> None:
        self.first: int | None = None
        self.firstOther: int | None = None
        self.provided: dict[tuple[int, Any], int] = {}
        self.ordered: list[int] = []
        self.others: list[int] = []
        self._calls: list[int] = []
        self._byKey: dict[tuple[int, Any], list[int]] = {}

    def add(self, large: list[Any]) -> None:
        serial = large[5]
        if _waitsForRoom(large):
            self._addCall(serial, large[6][1])
        else:
            self._addOther(serial)
        if _orderedCall(large):
            bisect.insort(self.ordered, serial)

    def start(self, large: list[Any]) -> None:
        """
        ``large`` no longer waits for room (called before it is marked so): what follows
        waits for it as for any large message.
        """
        if _waitsForRoom(large):
            self._removeCall(large[5], large[6][1])
            self._addOther(large[5])

    def remove(self, large: list[Any]) -> None:
        serial = large[5]
        if _waitsForRoom(large):
            self._removeCall(serial, large[6][1])
        else:
            others = self.others
            del others[bisect.bisect_left(others, serial)]
            self.firstOther = others[0] if others else None
        if _orderedCall(large):
            ordered = self.ordered
            del ordered[bisect.bisect_left(ordered, serial)]

    def _addCall(self, serial: int, provides: _KeySet) -> None:
        bisect.insort(self._calls, serial)
        self.first = self._calls[0]
        for key in provides:
            self.provided[key] = _addSorted(self._byKey, key, serial)[0]

    def _removeCall(self, serial: int, provides: _KeySet) -> None:
        calls = self._calls
        del calls[bisect.bisect_left(calls, serial)]
        self.first = calls[0] if calls else None
        for key in provides:
            left = _removeSorted(self._byKey, key, serial)
            if left:
                self.provided[key] = left[0]
            else:
                del self.provided[key]

    def _addOther(self, serial: int) -> None:
        bisect.insort(self.others, serial)
        self.firstOther = self.others[0]


#: What no large message queued gives (never changed).
_NO_WAITING = _Waiting()


def _keptOrder(entry: _KeptEntry) -> tuple[int, bool]:
    """
    Where an entry of Broker._afterLarge stands among the others: by serial, a release
    before the message of its serial (queued after it, see Broker._keepRelease).
    """
    return entry[3], entry[0] is not None


class _Early:
    """
    A message sent before the connection could carry it (see Broker._sendWhenReady): a call
    (``deferred`` is its answer's, ``None`` for a one-way call), or a message given whole
    (``expression``).
    """

    __slots__ = ("call", "deferred", "expression", "made", "sent")

    def __init__(
        self,
        call: tuple[Any, ...] | None,
        deferred: Deferred[Any] | None = None,
        expression: Any = None,
        made: float = 0.0,
    ) -> None:
        self.call = call
        self.deferred = deferred
        self.expression = expression
        # When it was made (the broker's clock): a call's timeout counts from then.
        self.made = made
        # The Deferred of the call once it was sent (so cancelling reaches it).
        self.sent: Deferred[Any] | None = None


class _Payload:
    """
    A native message to be written in fragments, in parts (as opposed to bytes, written as
    they are).
    """

    __slots__ = ("parts", "size", "taken")

    def __init__(self, parts: list[bytes | memoryview], size: int, taken: bool = False) -> None:
        self.parts = parts
        self.size = size
        #: A call that asks the peer to say when it takes it (see Broker._startableLarge).
        self.taken = taken


class _Release:
    """
    The ``decref`` or ``decache`` messages for one of the peer's objects kept behind large
    messages (see :meth:`Broker._keepRelease`): ``count`` of them, sent together.
    """

    __slots__ = ("command", "count", "objectID", "serial")

    def __init__(self, command: bytes, objectID: Any, serial: int) -> None:
        self.command = command
        self.objectID = objectID
        self.count = 1
        #: Broker._queueSerial when it was kept: it waits for the large messages up to that
        #: one, and releases asked for while it is unchanged join this one.
        self.serial = serial


# What a connection's queues and tables that only some connections use are until one is
# needed: empty, and shared, as a deque costs about 760 bytes, a set 216 and a dict 64 at
# once, which each of many idle connections would pay for nothing. Reading one is reading an
# empty container; writing to one fails loudly (AttributeError, TypeError), so each write
# makes its own first (see Broker._keepEntry, _blockEntry, _keepRelease, registerPageProducer).
_NOTHING_KEPT: collections.deque[Any] = cast("collections.deque[Any]", ())
_NO_MEMBERS: set[Any] = cast("set[Any]", frozenset())
_NO_ENTRIES: dict[Any, Any] = cast("dict[Any, Any]", MappingProxyType({}))

# An entry of Broker._afterLarge (see there).
_KeptEntry = tuple[bytes | _Payload | None, int | None, Any, int, int, int, _Keys | None]


class Broker(Banana):
    """
    A Perspective Broker connection.

    :param isClient: whether this side initiated the connection.
    :param security: the security options for what is sent and received; the default is
        :data:`pbroker.jelly.globalSecurity`.
    :param registry: the copy registry for what is received; the default is
        :data:`pbroker.jelly.globalRegistry`.
    :param limits: what the peer may make this side hold (see :class:`BrokerLimits`).
    """

    # A server holds one broker per connection: its state lives in slots, a few hundred bytes
    # less each than in a dict of that many keys. (What is not listed goes in the instance's
    # dict as usual, and a subclass may add attributes of its own.)
    __slots__ = (
        "_abandoned",
        "_abandonedOverflow",
        "_afterBlocked",
        "_afterLarge",
        "_answering",
        "_arrivals",
        "_backlog",
        "_backlogData",
        "_backlogSize",
        "_bananaLimited",
        "_beforeReady",
        "_blockedKeys",
        "_blockedNeeds",
        "_blockedUnknown",
        "_callArgs",
        "_callContexts",
        "_clock",
        "_closing",
        "_codec",
        "_detached",
        "_emptiedReleases",
        "_factoryWaitsForHello",
        "_failing",
        "_farewell",
        "_handlingBacklog",
        "_jellySizeLimit",
        "_keepaliveTimer",
        "_keptCalls",
        "_keptForPeer",
        "_keptOwn",
        "_keptReleases",
        "_largeBlocked",
        "_largeOut",
        "_largeOutForPeer",
        "_largeScheduled",
        "_largeWaiting",
        "_lastOrderedCall",
        "_lastRegistered",
        "_losing",
        "_lostReason",
        "_offeredLimits",
        "_oneWayPending",
        "_pagesSent",
        "_pingUnanswered",
        "_postponed",
        "_postponedTimer",
        "_pumpingLarge",
        "_queueSerial",
        "_receivedBytes",
        "_refusals",
        "_refusedKinds",
        "_registrations",
        "_replyTargets",
        "_sendingPages",
        "_sendingPostponed",
        "_streams",
        "_takeTimer",
        "_takenCount",
        "_tokens",
        "_unreadCaches",
        "_untaken",
        "_untakenBytes",
        "_untakenLimit",
        "connects",
        "currentLocalID",
        "currentRequestID",
        "disconnected",
        "disconnects",
        "importedReferences",
        "jellyArgs",
        "jellyKw",
        "jellyMethod",
        "keepalive",
        "limits",
        "localCleanup",
        "localObjects",
        "locallyCachedObjects",
        "luids",
        "maxBrokerRefsViolations",
        "overflowing",
        "pageProducers",
        "peerMessageSize",
        "registry",
        "remotelyCachedLUIDs",
        "remotelyCachedObjects",
        "security",
        "serializingPerspective",
        "unserializingPerspective",
        "waitingForAnswers",
    )

    version = PB_VERSION
    #: pbroker's dialects first: a pbroker peer chooses the native one, a stock Twisted peer
    #: skips both. ``pbroker1`` is PB's encoding between pbroker peers (it marks the peer as
    #: one, for the password login).
    knownDialects = [NATIVE_DIALECT, b"pbroker1", b"pb", b"none"]
    # (See streamWindow.)
    _streamWindow = DEFAULT_WINDOW
    #: Failures that are the caller's business (a refused login, a method that does not
    #: exist, a deliberate pb.Error): they are sent without logging a traceback here. Others
    #: are logged, as Twisted does.
    quietFailures: ClassVar[tuple[type[BaseException], ...]] = (
        Error,
        NoSuchMethod,
        LoginFailed,
        LimitExceeded,
        InsecureJelly,
        CancelledError,
    )
    #: The factory that made this broker (it supplies ``unsafeTracebacks``).
    factory: Any = None
    # Everything the peer sends in the PB dialects is unjellied by this broker's Unjellier,
    # which takes the text the decoder makes as the jelly it stands for.
    decodeText = True

    _log = Logger()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        window = cls.__dict__.get("streamWindow")
        if window is not None and not isinstance(window, property):
            # A subclass's own window (streamWindow = 64): checked now, where it is set, and
            # kept behind the property, which checks what is set later.
            cls._streamWindow = _checkedWindow(window)
            delattr(cls, "streamWindow")
        # Twisted's broker handles a message "x" with a method proto_x, which a subclass
        # written for it may define for messages of its own (see _stockHandler); the
        # messages pbroker handles itself have no such methods to override.
        for name in dir(cls):  # (inherited too: from a mixin, say)
            if name.startswith("proto_"):
                command = name[len("proto_") :].encode("utf-8", "surrogatepass")
                owner = next(k for k in cls.__mro__ if name in k.__dict__)
                if command in _BUILT_IN_COMMANDS and (
                    owner is cls or not issubclass(owner, Broker)  # (else warned there)
                ):
                    _warnNeverCalled(
                        cls,
                        name,
                        f"pbroker's Broker handles {describe(command)} messages itself "
                        f"(docs/differences.rst)",
                    )

    @property
    def streamWindow(self) -> int:
        """
        How many items a stream this side reads may have in flight or unread (16 by
        default): an integer, at least 1; set it on a broker, or in a subclass.
        """
        return self._streamWindow

    @streamWindow.setter
    def streamWindow(self, window: int) -> None:
        self._streamWindow = _checkedWindow(window)

    def __init__(
        self,
        isClient: bool = True,
        security: ISecurityOptions | None = None,
        registry: UnjellyableRegistry | None = None,
        limits: BrokerLimits | None = None,
        *,
        dialects: Sequence[bytes] | None = None,
        clock: Any = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        super().__init__(isClient)
        self.configure(registry, limits, dialects=dialects, clock=clock, keepalive=keepalive)
        #: How many references to the peer's objects this side holds.
        self.importedReferences = 0
        # Request ids of the peer's calls whose answers are still being computed.
        self._answering: dict[int, Deferred[Any]] = {}
        # One-way calls from the peer whose methods' Deferreds have not fired yet: they count
        # against limits.pendingCalls too.
        self._oneWayPending = 0
        # Refusals of what the peer sent, logged or not (see _logRefusal).
        self._refusals = 0
        # The peer's calls it cancelled whose Deferreds could not be (see _cancel).
        self._detached: set[int] = _NO_MEMBERS
        self.security: ISecurityOptions = globalSecurity if security is None else security
        checkSecurity(self.security, "security")
        self.disconnected = False
        self.disconnects: list[Callable[[], object]] = []
        self.connects: list[Callable[[], object]] | None = []
        #: luid (or name) -> the exported object's record.
        self.localObjects: dict[int | bytes, Local] = {}
        #: processUniqueID() -> luid, so one object is exported under one id.
        self.luids: dict[Any, int] = {}
        #: processUniqueID() -> what to run when the peer drops its last reference to it
        #: (a logged-in avatar's logout).
        self.localCleanup: dict[Any, Callable[[], object]] = {}
        #: luid -> our Cacheables the peer holds copies of (with its count of handles).
        self.remotelyCachedObjects: dict[int, Local] = {}
        #: processUniqueID() -> luid of our Cacheables the peer holds copies of.
        self.remotelyCachedLUIDs: dict[Any, int] = {}
        #: luid -> the peer's Cacheables we hold copies of.
        self.locallyCachedObjects: dict[int, Any] = {}
        #: Pagers (pbroker.util) sending pages while the connection takes data.
        self.pageProducers: list[Any] = []
        # Pagers whose page was sent but not yet followed by stillPaging() (it waits for the
        # page, if that is being sent in fragments).
        self._pagesSent: set[Any] = _NO_MEMBERS
        self._sendingPages = False
        #: request id -> the Deferred waiting for its answer.
        self.waitingForAnswers: dict[int, Deferred[Any]] = {}
        self.currentRequestID = 0
        self.currentLocalID = 0
        self.maxBrokerRefsViolations = 0
        self.serializingPerspective: Any = None
        self.unserializingPerspective: Any = None
        self.jellyMethod: Any = None
        self.jellyArgs: Any = None
        self.jellyKw: Any = None
        # The native dialect's value codec (None in the banana dialects).
        self._codec: ValueCodec | None = None
        # Large native messages waiting to be written, as [parts left, bytes left, the
        # request id of a call (else None), its size while it waits for room (else 0), what
        # packing a call counted until its first fragment is written (else None), its serial
        # (see _queueSerial), what a call that may wait for room needs and provides (see
        # _keysOf; else None)].
        self._largeOut: list[list[Any]] = []
        # Its calls that wait for room and the others, by what they provide (see _Waiting).
        self._largeWaiting: _Waiting = _NO_WAITING
        # The bytes left of the messages in it that are not this side's calls (answers, errors,
        # stream items), for _queueFull.
        self._largeOutForPeer = 0
        self._largeScheduled = False
        self._pumpingLarge = False
        # Whether the connection is being closed (see writeQueued): what the peer sends is
        # no longer handled, and what is queued is written as the connection takes it.
        self._closing = False
        # The most bytes of large calls the peer may hold untaken (the smaller of our
        # bufferedBytes and its), if it says when it takes (starts handling) a call that asks
        # (its hello said so; else 0), and the sizes of those sent and not yet taken.
        self._untakenLimit = 0
        self._untaken: dict[int, int] = _NO_ENTRIES
        self._untakenBytes = 0
        # Whether the calls first in _largeOut wait for room and nothing else can go (the
        # last _startableLarge found so): set until something changes that (a message that
        # does not wait is queued, a call is taken or dropped), so that a long queue of
        # waiting calls is not walked again on every pump.
        self._largeBlocked = False
        # Messages waiting for the large messages queued before them (streams', releases,
        # and what names a cache handle), with the request id of a call and what packing it
        # counted (else None, None), their serial, what they count in _keptForPeer and in
        # _keptOwn, and what they need and provide (see _keysOf); or (None, None, a
        # _Release, its serial, its cost, 0, its keys).
        self._afterLarge: collections.deque[_KeptEntry] = _NOTHING_KEPT
        # Those of them that need what a large call waiting for room provides (see
        # _startableLarge, _keysOf), or what one already here provides, in order: they wait
        # for that call to be written, where the others go ahead of it (see
        # _flushAfterLarge). For each key, where the ones that provide it stand (see
        # _keptOrder, sorted) and the ones that need it (by id, in order); how many are
        # unknown (they wait for every such call).
        self._afterBlocked: collections.deque[_KeptEntry] = _NOTHING_KEPT
        self._blockedKeys: dict[tuple[int, Any], list[tuple[int, bool]]] = _NO_ENTRIES
        self._blockedNeeds: dict[tuple[int, Any], dict[int, _KeptEntry]] = _NO_ENTRIES
        self._blockedUnknown = 0
        # What is kept there for the peer counts (see _queueFull): answers, errors and
        # uncaches at their size and _KEPT_OVERHEAD (see _keep), release entries split from
        # an object's first at _KEPT_RELEASE (see _keepRelease).
        self._keptForPeer = 0
        # What is kept there of this side's own (calls to the peer's copies and naming
        # cache handles, cancels, stream items and ends), counted as _keptForPeer is: they
        # too wait for the peer, but do not make its messages wait (see _keep).
        self._keptOwn = 0
        # How many messages were put in either queue so far: each has its number as its
        # serial, and waits in _afterLarge for the large messages of smaller serials only.
        self._queueSerial = 0
        # The serial of the last ordered call of this side's that was kept, or queued as a
        # large message: an answer waits behind such a call made after its request arrived
        # (see _orderedCallUnsent).
        self._lastOrderedCall = 0
        # The _Releases kept in _afterLarge for each (command, object id), in order; how many
        # of its releases were emptied (an uncache came first) and still take a place (see
        # _keepRelease).
        self._keptReleases: dict[tuple[bytes, Any], collections.deque[_Release]] = _NO_ENTRIES
        self._emptiedReleases = 0
        # Request id -> serial of the calls waiting for an answer kept in _afterLarge or
        # _afterBlocked (both ordered by serial): a cancelled one is found there by bisection,
        # not by walking what was kept before it (see _dropUnsentCall). A hint: checked.
        self._keptCalls: dict[int, int] = _NO_ENTRIES
        # Whether the messages the peer sent before the connection was lost are handled now
        # (see _handleBacklogOnLoss): none of them waits.
        self._losing = False
        # What the peer sent while the connection did not take this side's data (see
        # _keepForLater): None when nothing waits, else the messages of a read left unhandled
        # (decoded), followed by the reads that came after (raw), which add up to
        # _backlogSize bytes.
        self._backlog: list[Any] | None = None
        self._backlogData: list[bytes | bytearray] = []
        self._backlogSize = 0
        self._handlingBacklog = False
        #: Whether the peer's messages are handled although the connection is full, as it
        #: sent too much meanwhile (see _keepForLater), until the connection drains (or the
        #: queue of large messages for the peer is no longer full: _endOverflow).
        self.overflowing = False
        # Set while the messages before malformed input are handled (see _malformed).
        self._failing = False
        #: The largest message the peer accepts (it says so in its hello), if known.
        self.peerMessageSize: int | None = BrokerLimits.messageSize
        # Whether the factory is told of the connection when the peer's hello comes (a
        # native client: see connectionReady).
        self._factoryWaitsForHello = False
        # Whether a keepalive ping sent as a call (to a stock peer) waits for its answer.
        self._pingUnanswered = False
        # The limits a server's offer of dialects gave (messageSize, taken), if it did.
        self._offeredLimits: tuple[int | None, int] | None = None
        # In pbroker1 (PB's encoding), whether this client checks its messages against the
        # peerMessageSize the server's offer gave (not in pb: no stock peer says one).
        self._bananaLimited = False
        # What this side sent before it could (see _sendWhenReady): a list from
        # connectionMade until the dialect is chosen, else None.
        self._beforeReady: list[_Early] | None = None
        # (cacheable, id) of the copy the peer dropped while its stoppedObserving runs: the
        # copy any observer of it still reaches (see cachedRemotelyAs).
        self._farewell: tuple[Any, int] | None = None
        # Calls this side cancelled whose answers may still arrive.
        self._abandoned: set[int] = _NO_MEMBERS
        self._abandonedOverflow = False
        # Request id -> the dict a call's reply annotations go to.
        self._replyTargets: dict[int, dict[str, Any]] = {}
        # Request id -> the context of a call from the peer that carried one.
        self._callContexts: dict[int, _context.CallContext] = {}
        # The positional arguments of the call being run, as sent: unserialised, they are a
        # tuple in either dialect (the native codec gives a list).
        self._callArgs: Any = None
        # In the native dialect, the kinds of values its codec decodes that the security
        # options refuse (type -> jelly tag; most often none), see _checkKinds.
        self._refusedKinds: dict[type, bytes] = _NO_KINDS
        # Request ids of the peer's calls it cancelled, whose errors are still to be sent.
        self._streams = StreamTable(self)
        # (id, _EXPORT/_CACHE/_STREAM) of each export, cache handle and stream counted while
        # a value is serialised, so that they can be undone if it is never sent, and
        # (reference, _KEPT) of each of the peer's objects it names; else None.
        self._registrations: list[tuple[Any, int]] | None = None
        # The same for what the peer counted in a value being unserialised (its references,
        # cache handles and streams, as they arrive), so that what does not arrive because
        # the value fails half-way can be released; else None.
        self._arrivals: list[tuple[int, int]] | None = None
        # Caches this side released unread (see _releaseUnread), whose uncache is to come.
        self._unreadCaches: set[int] | None = None
        # The last serialised value that counted any, with them (see _takeRegistrations).
        self._lastRegistered: tuple[Any, list[tuple[Any, int]]] | None = None
        # Answers, errors and stream items that came while a value was serialised (a hook
        # completed them), each a Deferred to fire with its result once that value is sent
        # (see _postpone).
        self._postponed: list[tuple[Deferred[Any], Any]] = []
        # The reactor's call of _sendPostponedLater while any wait (see _postpone).
        self._postponedTimer: Any = None
        self._sendingPostponed = False
        self._keepaliveTimer: KeepaliveTimer | None = None
        # The timer that drops a peer which takes none of this side's large calls while
        # more than bufferedBytes of this side's own messages wait behind them (see
        # _checkTakes), and how many "taken" it has sent.
        self._takeTimer: Any = None
        self._takenCount = 0
        # Bytes the peer sent so far: a peer still sending (the answers this side asked for
        # before its large calls, which it handles first) is busy, not one that takes none.
        self._receivedBytes = 0
        self._lostReason: str | None = None

    # Connection life cycle

    @property
    def peerIsPbroker(self) -> bool:
        """
        Whether the peer chose (or offered and we chose) one of pbroker's dialects, so it
        understands pbroker's extensions (its password login, for one). ``False`` for stock
        Twisted peers.
        """
        return self.currentDialect in (NATIVE_DIALECT, b"pbroker1")

    @property
    def isNative(self) -> bool:
        """
        Whether the connection speaks pbroker's native dialect (streams, per-call context,
        no 640 KiB ceiling).
        """
        return self._codec is not None

    @property
    def _localCleanup(self) -> dict[Any, Callable[[], object]]:
        """
        Stock PB's name for :attr:`localCleanup`, which code written for it reads.
        """
        return self.localCleanup

    def configure(
        self,
        registry: UnjellyableRegistry | None = _UNSET,
        limits: BrokerLimits | None = _UNSET,
        *,
        dialects: Sequence[bytes] | None = _UNSET,
        clock: Any = _UNSET,
        keepalive: Keepalive | None = _UNSET,
    ) -> None:
        """
        Set the options a factory gives its brokers (see :class:`Broker`), before the
        connection is made; those not given are left as they are (``None``: the default).
        The factories call it for a Broker subclass whose constructor takes only stock PB's
        ``isClient`` and ``security``.
        """
        if dialects is not _UNSET:
            if dialects is None:
                self.__dict__.pop("knownDialects", None)  # the class's own
            else:
                self.knownDialects = _checkDialects(dialects)
        if keepalive is not _UNSET:
            if keepalive is not None and not isinstance(keepalive, Keepalive):
                raise TypeError(
                    "keepalive must be a Keepalive, such as Keepalive(interval=30, timeout=90), "
                    f"not {keepalive!r}"
                )
            self.keepalive = keepalive
        if clock is not _UNSET:
            if clock is not None:
                checkReactorTime("clock", clock)
            self._clock = clock
        if limits is not _UNSET:
            if limits is not None and not isinstance(limits, BrokerLimits):
                raise TypeError(
                    f"limits must be a BrokerLimits, such as BrokerLimits(messageSize=...), "
                    f"not {limits!r}"
                )
            self.limits = BrokerLimits() if limits is None else limits
            # The decoder's limits (read by Banana.connectionMade).
            self.messageSizeLimit = self.limits.messageSize
            self.depthLimit = self.limits.nestingDepth
        if registry is not _UNSET:
            if registry is not None and not isinstance(registry, UnjellyableRegistry):
                raise TypeError(
                    "registry must be an UnjellyableRegistry, such as jelly.UnjellyableRegistry() "
                    f"with setUnjellyableForClass calls, not {describe(registry)}"
                )
            self.registry = _brokerRegistry(globalRegistry if registry is None else registry)

    @property
    def clock(self) -> Any:
        """
        What schedules timeouts and keepalive pings (the reactor unless one was given).
        """
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def _offer(self) -> list[bytes]:
        offer = list(self.knownDialects)
        if NATIVE_DIALECT in offer or b"pbroker1" in offer:
            size = self.limits.messageSize or 0
            offer.append(b"%s%d:%d" % (_LIMITS_OFFER, size, self.limits.bufferedBytes))
        return offer

    def _sawOffer(self, offered: list[Any]) -> None:
        for entry in offered:
            if isinstance(entry, bytes) and entry.startswith(_LIMITS_OFFER):
                self._offeredLimits = _parseLimits(entry)
                if self._offeredLimits is not None:
                    return

    def _setPeerLimits(self, size: Any, taken: Any) -> None:
        """
        Take the limits the peer gave (in its hello, or its offer of dialects): the largest
        message it accepts (``None``: any), and the bytes of large calls it holds untaken.
        A value of another type is left out.
        """
        if size is None or type(size) is int:
            # Below a floor, even this side's answers and pings would be refused.
            self.peerMessageSize = None if size is None else max(size, MIN_MESSAGE_SIZE)
            self._setItemLimit()
        if type(taken) is int and taken > 0:
            self._untakenLimit = min(taken, self.limits.bufferedBytes)

    def _selectDialect(self, dialect: bytes) -> None:
        if self._offeredLimits is not None and dialect in (NATIVE_DIALECT, b"pbroker1"):
            self._setPeerLimits(*self._offeredLimits)
            self._bananaLimited = dialect == b"pbroker1"
        if dialect != NATIVE_DIALECT:
            super()._selectDialect(dialect)
            return
        size = self.limits.messageSize
        # Jellied values are encoded without a bound of their own: what is sent is bounded by
        # the limit the peer accepts (see _checkPeerLimit), what arrives by this side's.
        self._tokens = getTokens(b"none", 2**62, self.prefixLimit)
        self._jellySizeLimit = size or 2**62
        self._codec = ValueCodec(
            self._jellyNative,
            self._unjellyNative,
            self._sentAsStream,
            self._registerStream,
            self._openStream,
            self.limits.nestingDepth,
            # At the default, msgpack's own bound (MSGPACK_DEPTH) is taken as close enough.
            measureDepth=self.limits.nestingDepth < DEPTH_LIMIT,
        )
        self._setItemLimit()
        security, registry = self.security, self.registry
        self._refusedKinds = {
            kind: tag
            for kind, tag in _KIND_TAGS
            if not (security.isTypeAllowed(tag) or tag in registry)
        } or _NO_KINDS
        self._decoder = FrameDecoder(size, self.valueFields)
        self.currentDialect = dialect
        self.connectionReady()

    def connectionReady(self) -> None:
        early, self._beforeReady = self._beforeReady, None
        self.sendCall(b"version", self.version)
        if self.isNative:
            # "taken": this side says when it takes a large call that asks, and asks; it holds
            # up to this many bytes of such calls untaken (see _startableLarge).
            self.sendCall(
                b"hello",
                {"messageSize": self.limits.messageSize, "taken": self.limits.bufferedBytes},
            )
        if early is not None:
            self._sendEarly(early)
            if self.pageProducers:
                # A pager started before now had its first page kept, and nothing written:
                # nothing else would ask it for the next.
                self.sendPages()
        connects, self.connects = self.connects or [], None
        for notifier in connects:
            try:
                notifier()
            except Exception:
                self._log.failure("Error in a connect notifier")
        if self.factory is not None:
            if self.isClient and self.isNative and self._offeredLimits is None:
                # A server whose offer did not say how large a message it accepts (an
                # earlier pbroker): the application gets the root once its hello (which
                # comes after the client's choice of dialect) has said so. A call made
                # earlier, larger than that, would have the server drop the connection
                # instead of failing with LimitExceeded.
                self._factoryWaitsForHello = True
            else:
                self.factory.clientConnectionMade(self)

    def connectionLost(self, reason: Any = None) -> None:
        if self._backlog is not None and not self.disconnected:
            self._handleBacklogOnLoss()
        super().connectionLost(reason)
        if self.disconnected:
            return
        self.disconnected = True
        if self._refusals > REFUSALS_LOGGED:
            self._log.warn(
                "{count} more refusals of what the peer sent were not logged",
                count=self._refusals - REFUSALS_LOGGED,
            )
        if self._keepaliveTimer is not None:
            self._keepaliveTimer.stop()
        takeTimer, self._takeTimer = self._takeTimer, None
        if takeTimer is not None and takeTimer.active():
            takeTimer.cancel()
        if self._beforeReady is not None:
            self._dropEarly(self._lostReason or reason)
        transport: Any = self.transport
        if type(transport) is PacedTransport:
            transport.stopStallTimer()
        if self._lostReason is not None:
            reason = self._lostReason
        self._largeOut = []
        self._largeWaiting = _NO_WAITING
        self._largeOutForPeer = 0
        # An object with decrefs kept unsent still counted as held.
        self.importedReferences -= sum(
            1 for command, _ in self._keptReleases if command == b"decref"
        )
        self._afterLarge = self._afterBlocked = _NOTHING_KEPT
        self._blockedKeys = self._blockedNeeds = _NO_ENTRIES
        self._blockedUnknown = 0
        self._keptForPeer = self._keptOwn = 0
        self._keptReleases = _NO_ENTRIES
        self._emptiedReleases = 0
        self._keptCalls = _NO_ENTRIES
        self._untaken = _NO_ENTRIES
        self._untakenBytes = 0
        self._largeBlocked = False
        self.discardBacklog()
        self._lastRegistered = None
        self._replyTargets = {}
        self._streams.connectionLost(reason)
        self._stopPagers(reason)
        waiting, self.waitingForAnswers = self.waitingForAnswers, {}
        for deferred in waiting.values():
            # One cancelled by an earlier one's errback has failed already.
            if not deferred.called:
                deferred.errback(Failure(PBConnectionLost(reason)))
        cached, self.remotelyCachedObjects = self.remotelyCachedObjects, {}
        self.remotelyCachedLUIDs = {}
        for local in cached.values():
            self._stopObserving(local)
        self.locallyCachedObjects = {}
        notifiers, self.disconnects = self.disconnects, []
        for notifier in notifiers:
            try:
                notifier()
            except Exception:
                self._log.failure("Error in a disconnect notifier")
        self.localObjects = {}
        self.luids = {}
        # Endpoints do not tell a client factory its connection is gone; the broker does.
        brokerDisconnected = getattr(self.factory, "brokerDisconnected", None)
        if brokerDisconnected is not None:
            brokerDisconnected(self, reason)
        self._sendPostponed()  # their answers are dropped, what they export let go

    def notifyOnConnect(self, notifier: Callable[[], object]) -> None:
        """
        Call ``notifier()`` once the connection is ready (now, if it already is).
        """
        if not callable(notifier):
            # Checked now, as notifyOnDisconnect does: found only once the connection is
            # ready, it would be a logged "not callable" far from the mistake.
            raise TypeError(f"notifyOnConnect() needs a callable, not {notifier!r}")
        if self.connects is None:
            notifier()
        else:
            self.connects.append(notifier)

    def notifyOnDisconnect(self, notifier: Callable[[], object]) -> None:
        """
        Call ``notifier()`` when the connection is lost (at once, if it already is).
        """
        if not callable(notifier):
            raise TypeError(f"notifyOnDisconnect() needs a callable, not {notifier!r}")
        if self.disconnected:
            notifier()
            return
        self.disconnects.append(notifier)

    def dontNotifyOnDisconnect(self, notifier: Callable[[], object]) -> None:
        """
        Forget a notifier given to :meth:`notifyOnDisconnect` (no error if it was not).
        """
        notifiers = self.disconnects
        if notifiers and notifiers[-1] == notifier:
            # The newest, as references let go in the reverse of their order often are: no
            # search of what may be thousands (equal notifiers are alike, whichever goes).
            notifiers.pop()
        else:
            with contextlib.suppress(ValueError):  # (one search, not two)
                notifiers.remove(notifier)

    # Sending

    def sendCall(self, *expression: Any) -> None:
        """
        Send one PB message, given as its elements.
        """
        self.sendEncoded(list(expression))

    def sendEncoded(self, expression: Any) -> None:
        if self._beforeReady is not None and not self.disconnected:
            self._sendWhenReady(None, expression=expression)
            return
        if self._codec is None:
            if not self._bananaLimited:
                super().sendEncoded(expression)
                return
            data = self._encoded(expression)
            self._checkPeerLimit(len(data))
            assert self.transport is not None, "sendEncoded() called before connectionMade()"
            self.transport.write(data)
            return
        self._writePayload(self._nativePayload(expression))

    def _nativePayload(
        self, expression: list[Any], plain: bool = False, call: bool = False
    ) -> bytes | _Payload:
        """
        A native message ready to be written: one whole record (bytes) for most messages,
        else the parts of a fragmented one. ``plain``: no field is :class:`Packed`.
        ``call``: the message is a call; fragmented, it asks a peer that can to say when it
        takes it (bit 2 of its answer field), and counts against the room for such calls.

        :raises LimitExceeded: the message is larger than the peer accepts.
        """
        record = wholeRecord(expression, plain)
        if record is not None:
            limit = self.peerMessageSize  # _checkPeerLimit, inline on the common path
            if limit is not None and len(record) - 4 > limit:
                self._checkPeerLimit(len(record) - 4)
            return record
        # Large values, or a large envelope: the fragmented form (see pbroker._native).
        taken = call and self._untakenLimit > 0
        if taken:
            expression[4] |= 2
        parts, _ = packMessage(expression)
        size = sum(len(part) for part in parts)
        self._checkPeerLimit(size)
        return _Payload(parts, size, taken)

    def _setItemLimit(self) -> None:
        """
        Bound the items of a value packed for the peer (see ValueCodec.pack) by the bytes it
        takes in a message; to a peer that takes any size, by what this side takes. Only if
        neither has a limit is a value packed however many items it expands to.
        """
        codec = self._codec
        if codec is not None:
            limit = codec.stringLimit = self.peerMessageSize
            if limit is None:
                # (A value that shares its parts could expand to more than memory holds.)
                codec.itemLimit = self.limits.messageSize
                codec.limitSaid = (
                    "this side takes in a message (the peer announced none: a value sent is "
                    "bounded by it too, by its items)"
                )
            else:
                codec.itemLimit = limit
                codec.limitSaid = LIMIT_OF_THE_PEER

    def _checkPeerLimit(self, size: int) -> None:
        limit = self.peerMessageSize
        if limit is not None and size > limit:
            raise LimitExceeded(
                f"a message of {size} bytes is over the {limit}-byte limit the peer accepts"
            )

    def _writePayload(
        self,
        payload: bytes | _Payload,
        requestID: int | None = None,
        counted: Any = None,
        serial: int | None = None,
        keys: _Keys | None = None,
    ) -> None:
        """
        Write what :meth:`_nativePayload` (or the banana encoder) made: bytes at once, the
        parts of a fragmented message through the large-message queue (``requestID``: the
        message is that call, which needs and provides ``keys``, see :meth:`_keysOf`;
        ``serial``: the one it had in ``_afterLarge``, else a new one).
        """
        assert self.transport is not None, "sendEncoded() called before connectionMade()"
        transport: Any = self.transport
        if isinstance(payload, bytes):
            transport.write(payload)
            return
        allowance = self.peerMessageSize
        if self._largeOut and type(transport) is PacedTransport and allowance is not None:
            # It waits behind another large message, held for the peer as written bytes are
            # (with room for one message as large as the peer accepts, besides the one being
            # sent: a reader that reads gets any message the limits allow).
            transport.queued(payload.size, allowance)
        entry = [
            [memoryview(part) for part in payload.parts],
            payload.size,
            requestID,
            payload.size if payload.taken else 0,
            counted,
            self._nextSerial() if serial is None else serial,
            keys if payload.taken else None,
        ]
        self._largeOut.append(entry)
        if self._largeWaiting is _NO_WAITING:
            self._largeWaiting = _Waiting()
        self._largeWaiting.add(entry)
        if requestID is None:
            self._largeOutForPeer += payload.size
        if not payload.taken:
            self._largeBlocked = False  # it need not wait
        self._pumpLarge()

    def _pumpLarge(self) -> None:
        """
        Write the fragments of large messages while the connection takes data, a bounded
        amount per reactor turn, so that other messages (written whole, at once) get between
        them. When the queue is empty, stream messages held behind it go out, and streams
        with credit send more (their large items join the queue and this loop goes on: it
        does not recurse).
        """
        if self._registrations is not None and not self.disconnected:
            # A large call a hook made while a value is serialised: what this loop lets go
            # (streams, the peer's waiting messages, pagers) would overtake that value. (A
            # pump the reactor runs comes from no serialisation: this one is a direct call.)
            self._schedulePump()
            return
        self._largeScheduled = False
        if self._pumpingLarge:
            return  # the running loop will see what was added
        if self._closing:
            # Only what is queued goes, as the closing transport asks (writeQueued); once it
            # has handed the connection to the real transport, what was queued since (a
            # method that closed its connection, then answered), a bounded amount per turn:
            # the real transport no longer paces the broker, and would join all of it into
            # one string at once.
            transport: Any = self.transport
            if type(transport) is PacedTransport and transport.closed:
                self.writeQueued(untilFull=False, budget=_LARGE_BYTES_PER_TURN)
            return
        self._pumpingLarge = True
        try:
            budget = _LARGE_BYTES_PER_TURN
            while not self.disconnected and self.transport is not None:
                if self._afterLarge:
                    self._flushAfterLarge()
                if self.overflowing:
                    self._endOverflow()
                if self._backlog is not None:
                    # The peer's messages waited for the queue to shrink; it may have.
                    self._handleBacklog()
                if not self._largeOut:
                    self._streams.pump()
                    if not self._largeOut and self.pageProducers:
                        self.sendPages()  # pagers wait for large messages (see _sendPages)
                    if not self._largeOut:
                        return
                transport = self.transport
                if isinstance(transport, PacedTransport) and transport.paused:
                    return  # resumeProducing() calls transportResumed(), which comes back
                if budget <= 0:
                    self._schedulePump()
                    return
                if self._largeOut[0][3] and not self._startableLarge():
                    return  # calls that wait for the peer to take earlier ones: _taken resumes
                budget -= self._writeFragment()
        finally:
            self._pumpingLarge = False

    def _startableLarge(self) -> bool:
        """
        Put first the large message to send next, and count it if it is a call that asks to
        be told when taken; ``False`` if only such calls wait, and there is no room for them.

        The peer keeps the messages it gets while its answers wait for this side, up to its
        ``bufferedBytes`` plus ``messageSize``. Two peers that each pipelined many large
        calls at the other would both overflow that and drop each other; so such calls
        that the peer has not taken (started handling) add up to at most the smaller of the
        two sides' ``bufferedBytes`` (one is always sent). Other large messages go ahead of
        calls that wait; those keep their order. What waits behind large messages
        (releases, cancels, stream items, cache handles) waits for such a call only if it
        needs what the call provides (see :meth:`_flushAfterLarge`).
        """
        if self._largeBlocked:
            return False
        queue = self._largeOut
        untaken = self._untakenBytes
        blocked = False
        # (Whether a message that does not wait for room may be queued after the calls
        # that do: if not, the first of those that cannot start is as far as to look.)
        others = bool(self._largeWaiting.others)
        for index, entry in enumerate(queue):
            size = entry[3]
            if size:
                if blocked or (untaken and untaken + size > self._untakenLimit):
                    blocked = True  # and the calls after it wait too: calls keep their order
                    if not others:
                        break
                    continue
                self._startUntaken(entry)
            if index:
                queue.insert(0, queue.pop(index))
            return True
        self._largeBlocked = True
        return False

    def _startUntaken(self, entry: list[Any]) -> None:
        """
        Count the large call ``entry`` as sent and not yet taken by the peer: it no longer
        waits for room (see :meth:`_startableLarge`).
        """
        self._largeWaiting.start(entry)
        size = entry[3]
        entry[3] = 0
        if self._untaken is _NO_ENTRIES:
            self._untaken = {}
        self._untaken[entry[2]] = size
        self._untakenBytes += size
        # Calls kept while no call was untaken (behind a large answer, say, or between a
        # taken and the next call) started no timer.
        self._startTakeTimer()

    def writeQueued(self, untilFull: bool = True, budget: int | None = None) -> bool:
        """
        The connection is being closed (the paced transport's ``loseConnection()``): write, in
        order, every large message queued and what waits behind them, for as long as the
        connection takes data (``untilFull``; else all of it, once the transport no longer
        paces the broker, ``budget`` bytes of fragments per reactor turn if given). Return
        whether all of it is written: if not, the transport calls again each time the
        connection drains, and closes it once it is.

        From the first call on, what the peer sends is no longer handled (as a transport
        that is closing reads nothing more), large calls no longer wait for the peer to take
        earlier ones (it is not heard), and streams and pagers send nothing more. A message
        already sent in part would otherwise be cut short, and one not started yet dropped,
        where the ``pb`` dialect, which writes each message whole, sends them all; and
        handing all of it to the transport at once would take up to twice its size again in
        memory until sent.
        """
        if not self._closing:
            self._closing = True
            # The peer's messages are no longer handled: an overflow (handling them though
            # the connection is full) is over, and no resume would end it any more
            # (transportResumed is not called while closing): else a reader would be dropped
            # at once, not after stallTimeout, for late answers written while it is full.
            self.overflowing = False
            takeTimer, self._takeTimer = self._takeTimer, None
            if takeTimer is not None and takeTimer.active():
                takeTimer.cancel()
        transport: Any = self.transport
        if self.disconnected or type(transport) is not PacedTransport:
            return not self.disconnected
        if not (self._largeOut or self._afterLarge or self._afterBlocked):
            return True
        pumping, self._pumpingLarge = self._pumpingLarge, True  # no pump from _writePayload
        try:
            for entry in self._largeOut:
                if entry[3]:
                    self._startUntaken(entry)
            self._largeBlocked = False
            self._unblockKept(None)  # nothing waits for room any more
            while not self.disconnected and not transport.aborted:
                if self._afterLarge:
                    self._flushAfterLarge()
                queue = self._largeOut
                if not queue:
                    if self._afterBlocked:
                        self._unblockKept(None)
                    if not self._afterLarge:
                        return True
                    continue
                if untilFull and transport.paused:
                    return False  # resumeProducing() comes back
                if budget is not None and budget <= 0:
                    self._schedulePump()  # which comes back
                    return False
                if queue[0][3]:  # a call kept behind a large message, queued just now
                    self._startUntaken(queue[0])
                written = self._writeFragment()
                if budget is not None:
                    budget -= written
            return False
        finally:
            self._pumpingLarge = pumping

    def queuedBytes(self) -> int:
        """
        Bytes of messages queued to be written later: the rest of the large messages and
        what waits behind them.
        """
        large: int = sum(entry[1] for entry in self._largeOut)
        return large + self._keptForPeer + self._keptOwn

    def _taken(self, requestID: Any) -> None:
        """
        The peer started handling our large call ``requestID``: room for more.
        """
        size = (
            self._untaken.pop(requestID, None) if type(requestID) is int and self._untaken else None
        )
        if size is None:
            raise ProtocolError(f"taken for a call not waiting for it: {describe(requestID)}")
        self._untakenBytes -= size
        self._largeBlocked = False
        self._takenCount += 1
        if self._largeOut:
            self._schedulePump()

    def _schedulePump(self) -> None:
        """
        Have :meth:`_pumpLarge` run on the reactor's next turn (once, however often asked).
        """
        if not self._largeScheduled:
            self._largeScheduled = True
            self.clock.callLater(0, self._pumpLarge)

    def _writeFragment(self) -> int:
        """
        Write the next fragment of the first large message; return its size.
        """
        assert self.transport is not None
        entry = self._largeOut[0]
        entry[4] = None  # being written: no longer dropped if cancelled
        parts, remaining = entry[0], entry[1]
        # Up to FRAGMENT_SIZE bytes from the front of the parts; all but the last are full.
        pieces = []
        need = FRAGMENT_SIZE
        while need and parts:
            head = parts[0]
            if len(head) <= need:
                pieces.append(head)
                parts.pop(0)
                need -= len(head)
            else:
                pieces.append(head[:need])
                parts[0] = head[need:]
                need = 0
        size = FRAGMENT_SIZE - need
        remaining -= size
        last = remaining <= 0
        if entry[2] is None:
            self._largeOutForPeer -= size
        # Counted before the write: a transport that fills pauses its producer within it, and
        # the pacing then reads what waits (see waitingForPeer), which must not count this
        # fragment twice over.
        entry[1] = remaining
        # One bytes object, header included: a transport whose buffer is empty sends it as it
        # is, where a sequence of parts would be copied into one first.
        self.transport.write(b"".join([fragmentHeader(LAST if last else MORE, size), *pieces]))
        if last:
            self._largeWaiting.remove(self._largeOut.pop(0))
            if entry[6] is not None and self._afterBlocked:
                self._unblockKept(entry[6][1])  # what needed it may go
        return size

    def _sendBehindLarge(
        self, *expression: Any, forPeer: bool = False, keys: _Keys | None = None
    ) -> None:
        """
        Send a message after any large message already queued: a stream's, so that a
        stream's items and its end keep their order however large the items are, the
        cancel of a call still being sent, so that it does not arrive before the call, or
        what names a cache handle or a copy.

        ``forPeer``: the message answers the peer (an answer, an error, an uncache), which
        :meth:`_keep` counts so that a peer that leaves a large answer unread while it asks
        for answers that have to wait behind it cannot make this side keep them without end.
        ``keys``: what it needs and provides (see :meth:`_keysOf`); ``None``: unknown, so it
        waits for every large message queued before it.
        """
        if self._largeOut or self._afterLarge:
            # Packed now, so that a message too large for the peer fails here, not later.
            payload = self._nativePayload(list(expression))
            kept, own = self._keep(payload, forPeer)
            self._keepEntry((payload, None, None, self._nextSerial(), kept, own, keys))
        else:
            self.sendCall(*expression)

    def _keepEntry(self, entry: _KeptEntry) -> None:
        """
        Keep ``entry`` in ``_afterLarge``, and have the pump see on the next turn whether it
        may go (see :meth:`_flushAfterLarge`): if only large calls that wait for the peer to
        take earlier ones are queued, nothing else would.
        """
        self._keptQueue().append(entry)
        self._schedulePump()

    def _keptQueue(self) -> collections.deque[_KeptEntry]:
        """
        ``_afterLarge``, made first if this connection has not kept anything yet.
        """
        if self._afterLarge is _NOTHING_KEPT:
            self._afterLarge = collections.deque()
        return self._afterLarge

    @staticmethod
    def _keysOf(
        registrations: list[tuple[Any, int]] | None,
        needs: Iterable[tuple[int, Any]] = (),
        provides: Iterable[tuple[int, Any]] = (),
    ) -> _Keys | None:
        """
        What a message needs to have arrived before it, and what it provides to those after
        it (see :meth:`_flushAfterLarge`), besides ``needs`` and ``provides``: a handle it
        names on a copy the peer holds needs that copy's first copy, and a first copy
        provides it; a copy's handle it names, one of the peer's objects it names, and a
        stream it carries, are provided (to the uncache, the release, the stream's items
        and end that must not overtake it). Exports need nothing: a reference arrives in any
        order. ``None`` if a peer's object it names has no luid (which does not happen).
        """
        needed = set(needs)
        provided = set(provides)
        if registrations:
            for item, kind in registrations:
                if kind == _CACHE:
                    provided.add((_OURS, item))
                elif kind == _BEHIND:
                    needed.add((_FIRST_KEY, item))
                elif kind == _FIRST:
                    provided.add((_FIRST_KEY, item))
                elif kind == _STREAM:
                    provided.add((_STREAM_KEY, item))
                elif kind == _KEPT:
                    luid = getattr(item, "luid", None)
                    if luid is None:
                        return None
                    provided.add((_THEIRS, luid))
        return frozenset(needed), frozenset(provided)

    def _keep(self, payload: bytes | _Payload, forPeer: bool) -> tuple[int, int]:
        """
        Count a message about to be kept in ``_afterLarge`` until it is sent, and return
        what it costs (its size and ``_KEPT_OVERHEAD``) in ``_keptForPeer`` and in
        ``_keptOwn``, as its entry there holds them.

        A message for the peer (``forPeer``) counts in ``_keptForPeer``, as large messages
        for the peer count (see :meth:`_queueFull`): past ``limits.bufferedBytes`` the
        peer's messages wait, unhandled, and a peer that sent too much meanwhile is dropped
        if its connection takes nothing (see PacedTransport.kept). This side's own count in
        ``_keptOwn``, and do not make the peer's messages wait: neither do its own written
        calls. Kept while the connection takes no data, they count as written ones do (see
        PacedTransport.keptOwn): a peer that stops reading while this side keeps calling
        its copies (an observer's updates) behind a large message is dropped, not kept
        for without end.
        """
        size = payload.size if isinstance(payload, _Payload) else len(payload)
        cost = size + _KEPT_OVERHEAD
        transport: Any = self.transport
        if forPeer:
            self._keptForPeer += cost
            if type(transport) is PacedTransport:
                transport.kept(self._keptForPeer, cost)
            self._startTakeTimer()
            return cost, 0
        self._keptOwn += cost
        if type(transport) is PacedTransport:
            transport.keptOwn(cost)
        self._startTakeTimer()
        return 0, cost

    def _holdingBehindUntaken(self) -> bool:
        """
        Whether more than ``limits.bufferedBytes`` of messages are kept while large calls
        wait for the peer to take them (see :meth:`_checkTakes`): this side's own, and
        those for the peer (answers that follow the calls their methods made, which wait
        with those calls: they do not make the peer's messages wait then, see
        :meth:`_queueFull`, and would otherwise be kept for as long as the peer calls).
        """
        return bool(self._untaken) and self._keptOwn + self._keptForPeer > self.limits.bufferedBytes

    def _startTakeTimer(self) -> None:
        if self._takeTimer is None and not self._closing and self._holdingBehindUntaken():
            self._armTakeTimer()

    def _sent(self) -> int:
        """
        Bytes this side's transport has sent so far, where it can tell (else handed to it).
        """
        transport: Any = self.transport
        if type(transport) is not PacedTransport:
            return 0
        progress = transport.progress()
        return transport.written if progress is None else progress[0]

    def _armTakeTimer(self) -> None:
        timeout = self.limits.stallTimeout
        self._takeTimer = self.clock.callLater(
            0 if timeout is None else timeout,
            self._checkTakes,
            self._takenCount,
            self._sent() + self._receivedBytes,
        )

    def _checkTakes(self, takenThen: int, movedThen: int) -> None:
        """
        ``limits.stallTimeout`` seconds after more than ``limits.bufferedBytes`` of
        messages (this side's calls, which keep their order, and the answers that follow
        them) came to wait behind large calls the peer has not taken: drop a peer that has
        taken none since, while the connection moved less than ``_TAKE_MOVEMENT`` bytes
        either way (sent to it, received from it). Such a peer reads, but would make this
        side keep every call it makes, and every answer after one, for ever; a
        slow link still takes what was written, and a busy peer still sends (keepalive's
        pings and pongs, a few bytes each, are not movement).
        """
        self._takeTimer = None
        if self.disconnected or not self._holdingBehindUntaken():
            return
        moved = self._sent() + self._receivedBytes - movedThen
        if self._takenCount != takenThen or moved >= _TAKE_MOVEMENT:
            # It took some, or the connection moved either way (a peer sending the answers
            # asked for before those calls handles them after): a peer, if slow.
            self._armTakeTimer()
            return
        timeout = self.limits.stallTimeout
        self._lostReason = (
            "the peer took none of this side's large calls "
            + ("" if timeout is None else f"for {timeout} seconds ")
            + f"while {self._keptOwn + self._keptForPeer} bytes of messages waited behind them"
        )
        self._fail(self._lostReason)

    def _behindLarge(self, registrations: list[tuple[Any, int]] | None) -> bool:
        """
        Whether a value serialised with ``registrations`` must wait behind the large messages
        queued: it names a cache handle, whose first copy may be in one of them (a handle
        that arrived first would be refused).
        """
        if not registrations or not (self._largeOut or self._afterLarge):
            return False
        return any(kind == _BEHIND for _, kind in registrations)

    def _sendRelease(self, command: bytes, objectID: Any) -> None:
        """
        Send a ``decref`` or ``decache`` this side's code asked for (a reference or a handle
        on a copy was garbage collected): behind any large message being sent, which may name
        the object it releases (as the target of a call, in an argument or in an answer), so
        that the peer does not forget the object before that message arrives.

        A decref's object counts in ``importedReferences`` until it is sent, as the peer
        counts it (see :meth:`_keepRelease`).
        """
        if self._largeOut or self._afterLarge:
            self._keepRelease(command, objectID)
            return
        if command == b"decref":
            self.importedReferences -= 1
        self.sendCall(command, objectID)

    def _keepRelease(self, command: bytes, objectID: Any) -> None:
        """
        Keep a release until the large messages queued before it are out.

        Releases of one object asked for while no other message was queued meanwhile (kept
        or large) join one entry, sent together where the first was asked for: no message
        that could name the object comes between. So a peer that sends one object over and
        over while it leaves a large answer unread makes this side keep one entry (or one
        per other message kept meanwhile, which are bounded themselves). An object with
        decrefs kept still counts once in ``importedReferences`` until the last is sent, as
        the peer counts it: a peer that sends new objects meanwhile is refused more once
        the limit is reached, and their decrefs are written at once (see
        :meth:`importReference`), counted as waiting for the peer as any write is.
        """
        key = (command, objectID)
        kept = self._keptReleases.get(key)
        cost = 0
        if kept is not None:
            if command == b"decref":
                self.importedReferences -= 1  # its object counts once, for all its decrefs
            last = kept[-1]
            if last.serial == self._queueSerial:
                last.count += 1
                return
            # Another entry for the object, split from the last by a message queued since:
            # counted as kept for the peer (what it costs), so that these are bounded as
            # those messages are (see _queueFull). An object's first entry is not: objects
            # are bounded by importedReferences, and this side's own releases of many
            # objects do not make a peer that reads wait.
            cost = _KEPT_RELEASE
            self._keptForPeer += cost
        else:
            if self._keptReleases is _NO_ENTRIES:
                self._keptReleases = {}
            kept = self._keptReleases[key] = collections.deque()
        serial = self._queueSerial
        release = _Release(command, objectID, serial)
        kept.append(release)
        # It waits for the large messages up to the last one queued (serial + 1 > theirs).
        # After what names the object, and the releases of it kept before (in order).
        named = frozenset({(_THEIRS, objectID)})
        self._keepEntry((None, None, release, serial + 1, cost, 0, (named, named)))

    def _emptyKeptDecache(self, objectID: Any) -> None:
        """
        Forget the decaches kept for the peer's copy ``objectID``, which it uncached: it
        would not know the id any more. (A peer does so only before it got them all, which a
        well-behaved peer never does.) Emptied entries are dropped once they are half the
        queue, so that a peer doing it over and over does not make it grow.
        """
        kept = self._keptReleases.pop((b"decache", objectID), None) if self._keptReleases else None
        if kept is None:
            return
        for release in kept:
            release.count = 0
        self._emptiedReleases += len(kept)
        if self._emptiedReleases * 2 > len(self._afterLarge) + len(self._afterBlocked):
            # What waited for an entry about to be dropped must not stay waiting: it all goes
            # back, in order, for the pump to see again.
            self._unblockKept(None)
            after = self._afterLarge
            remaining: list[_KeptEntry] = []
            for entry in after:
                if entry[0] is None and not entry[2].count:
                    self._keptForPeer -= entry[4]
                else:
                    remaining.append(entry)
            after.clear()
            after.extend(remaining)
            self._emptiedReleases = 0

    def _mustWait(self, entry: _KeptEntry, waiting: _Waiting) -> bool:
        """
        Whether ``entry`` must wait for one of the calls ``waiting`` for room queued before
        it (it needs what one provides), or behind what waits for one already (see
        :meth:`_flushAfterLarge`).
        """
        serial, keys = entry[3], entry[6]
        if keys is None or self._blockedUnknown:
            first = waiting.first
            return bool(self._afterBlocked) or (first is not None and first < serial)
        needs = keys[0]
        if not needs:
            return False
        blockedBy = self._blockedKeys
        if blockedBy and not needs.isdisjoint(blockedBy):
            order = _keptOrder(entry)
            for key in needs:
                before = blockedBy.get(key)
                if before and before[0] < order:
                    return True
        provided = waiting.provided
        for key in needs:
            by = provided.get(key)
            if by is not None and by < serial:
                return True
        return False

    def _blockEntry(self, entry: _KeptEntry) -> None:
        """
        Keep ``entry`` in ``_afterBlocked``, in order (see :meth:`_keptOrder`), and count
        what it needs and provides.
        """
        blocked = self._afterBlocked
        if blocked is _NOTHING_KEPT:
            blocked = self._afterBlocked = collections.deque()
            self._blockedKeys, self._blockedNeeds = {}, {}
        order = _keptOrder(entry)
        inOrder = not blocked or _keptOrder(blocked[-1]) <= order
        if inOrder:
            blocked.append(entry)
        else:
            # One let go ahead of others still here (see _releaseBlocked) that must wait
            # after all (for a call that was behind it in _afterLarge): back in its place.
            entries = list(blocked)
            entries.insert(bisect.bisect_right(entries, order, key=_keptOrder), entry)
            blocked.clear()
            blocked.extend(entries)
        keys = entry[6]
        if keys is None:
            self._blockedUnknown += 1
            return
        needs, provides = keys
        for key in provides:
            _addSorted(self._blockedKeys, key, order)
        waiters = self._blockedNeeds
        for key in needs:
            needing = waiters.setdefault(key, {})
            needing[id(entry)] = entry
            if not inOrder and len(needing) > 1:
                waiters[key] = {id(kept): kept for kept in sorted(needing.values(), key=_keptOrder)}

    def _unblockEntry(self, entry: _KeptEntry) -> None:
        """
        Uncount ``entry``, taken out of ``_afterBlocked``.
        """
        keys = entry[6]
        if keys is None:
            self._blockedUnknown -= 1
            return
        needs, provides = keys
        order = _keptOrder(entry)
        for key in provides:
            _removeSorted(self._blockedKeys, key, order)
        waiters = self._blockedNeeds
        for key in needs:
            needing = waiters[key]
            del needing[id(entry)]
            if not needing:
                del waiters[key]

    def _unblockKept(self, provided: _KeySet | None) -> None:
        """
        A call that waited for room, or a message kept in ``_afterBlocked``, was written or
        dropped, and ``provided`` that (``None``: unknown): send (through ``_afterLarge``,
        in order) what waited in ``_afterBlocked`` and no longer must.

        Only what needed one of those keys is looked at, and what needed what that
        provides in turn (see :meth:`_releaseBlocked`), so that many calls waiting that
        each let one kept message go do not each walk all that waits. If the keys are
        unknown, or something kept is, all of it goes back, in order (``_afterBlocked`` and
        ``_afterLarge`` are each ordered), for the pump to see again: an entry is only ever
        checked against what came before it. (A kept call cancelled there comes with what
        it provides; a decache emptied there, or a kept entry whose keys are unknown, comes
        with ``None``, so that what waited for it is not left waiting.)
        """
        blocked = self._afterBlocked
        if not blocked:
            return
        if provided is not None and not self._blockedUnknown:
            released = self._releaseBlocked(provided)
            if not released:
                return
            if len(released) < len(blocked):
                released.sort(key=_keptOrder)
                # What goes is most often the first of what waits (the messages up to the
                # next call that waits, as each is written): taken from the front, the rest
                # not walked; else the rest are kept, in order.
                front = 0
                for entry in released:
                    if blocked[0] is not entry:
                        break
                    blocked.popleft()
                    front += 1
                if front < len(released):
                    gone = {id(entry) for entry in released[front:]}
                    remaining = [entry for entry in blocked if id(entry) not in gone]
                    blocked.clear()
                    blocked.extend(remaining)
                after = self._keptQueue()
                if not after or _keptOrder(released[0]) > _keptOrder(after[-1]):
                    after.extend(released)  # (all after what is there)
                elif _keptOrder(released[-1]) < _keptOrder(after[0]):
                    after.extendleft(reversed(released))  # (all before what is there)
                else:
                    merged = list(heapq.merge(released, after, key=_keptOrder))
                    after.clear()  # (in place: _flushAfterLarge may be walking it)
                    after.extend(merged)
                self._schedulePump()
                return
        merged = list(heapq.merge(blocked, self._afterLarge, key=_keptOrder))
        after = self._keptQueue()
        after.clear()  # (in place: _flushAfterLarge may be walking it)
        after.extend(merged)
        self._afterBlocked = _NOTHING_KEPT
        self._blockedKeys = self._blockedNeeds = _NO_ENTRIES
        self._blockedUnknown = 0
        self._schedulePump()

    def _releaseBlocked(self, provided: _KeySet) -> list[_KeptEntry]:
        """
        Take out of ``_afterBlocked`` (uncounted, in no particular order) the entries that
        no longer wait now that what provided the keys ``provided`` is gone from before
        them, and those that then no longer wait for those; leave the rest there.

        An entry waits while a call waiting for room queued before it, or an entry kept
        before it here, provides a key it needs (as :meth:`_mustWait` checks). Only
        entries that need a key freed are looked at, each key's in order, and no further
        than the first that a call waiting for room keeps (those after it are kept too),
        or than the first that provides the key itself (those after it wait for it, unless
        it goes too, and then its key is looked at again): a chain of ordered calls costs
        what goes, not what stays. What needs a large call that goes, and may wait for room
        once written, stays until that call is written or dropped.
        """
        waiters = self._blockedNeeds
        if not any(key in waiters for key in provided):
            return []
        waitingBy = self._largeWaiting.provided
        blockedBy = self._blockedKeys
        released: list[_KeptEntry] = []
        # What the large calls let go here that may wait for room once written provide
        # (where the first that does stands): what needs one of them stays, as if it were
        # still here (else it would go, only to wait again, out of its place, once that
        # call is written and waits).
        held: dict[tuple[int, Any], tuple[int, bool]] = {}
        heap: list[tuple[tuple[int, bool], int, _KeptEntry]] = []
        pending: set[int] = set()
        tieBreak = itertools.count()

        def lookAt(key: tuple[int, Any]) -> None:
            needing = waiters.get(key)
            if not needing:
                return
            limit = waitingBy.get(key)
            for entry in needing.values():
                if limit is not None and limit < entry[3]:
                    return  # (it and those after it wait for that call)
                if id(entry) not in pending:
                    pending.add(id(entry))
                    heapq.heappush(heap, (_keptOrder(entry), next(tieBreak), entry))
                keys = entry[6]
                assert keys is not None  # (only entries whose keys are known are indexed)
                if key in keys[1]:
                    return  # (those after it wait for it, unless it goes)

        for key in provided:
            lookAt(key)
        while heap:
            order, _, entry = heapq.heappop(heap)
            pending.discard(id(entry))
            serial = entry[3]
            keys = entry[6]
            assert keys is not None
            needs, provides = keys
            if (
                any(waitingBy.get(key, serial) < serial for key in needs)
                or any((before := blockedBy.get(key)) and before[0] < order for key in needs)
                or (held and any((by := held.get(key)) and by < order for key in needs))
            ):
                continue
            self._unblockEntry(entry)
            released.append(entry)
            payload = entry[0]
            if isinstance(payload, _Payload) and payload.taken:
                # A large call that may wait for room once written, and what needs it would
                # be blocked again: that stays here, and is looked at when the call is
                # written (or dropped), whether it was reached through this call's keys or
                # another's. (Other large messages are written as they come, and what
                # follows them in _afterLarge waits for them there.)
                for key in provides:
                    if key not in held or order < held[key]:
                        held[key] = order
                continue
            for key in provides:
                lookAt(key)
        return released

    def _nextSerial(self) -> int:
        self._queueSerial += 1
        return self._queueSerial

    def _flushAfterLarge(self) -> None:
        """
        Send what waits in ``_afterLarge`` for large messages that are all out now: each
        waits for those queued before it only (messages of smaller serials).

        Except large calls that wait for the peer to take earlier ones (see
        :meth:`_startableLarge`): a peer that never takes them would make what waits behind
        them grow without end. A message goes ahead of such a call unless it needs what the
        call provides (see :meth:`_keysOf`): the first copy of a handle it names, the call
        naming an object it releases, a stream's start, the call it cancels. Those that do
        wait in ``_afterBlocked`` until the call is written (or dropped), and so does what
        needs what one of them provides, so that they keep their order.
        """
        after = self._afterLarge
        while after and not self.disconnected:
            entry = after[0]
            # The calls waiting for room that what follows may pass, and the first other
            # large message, which it waits for (one written here counts at once).
            waiting = self._largeWaiting
            first = waiting.firstOther
            if first is not None and first < entry[3]:
                return
            after.popleft()
            if (waiting.first is not None or self._afterBlocked) and self._mustWait(entry, waiting):
                self._blockEntry(entry)
                continue
            payload, requestID, counted, serial, kept, own, keys = entry
            self._keptForPeer -= kept
            self._keptOwn -= own
            if payload is not None:
                if requestID is not None and self._keptCalls:
                    self._keptCalls.pop(requestID, None)
                self._writePayload(payload, requestID, counted, serial, keys)
                continue
            release: _Release = counted
            if not release.count:
                self._emptiedReleases -= 1
                continue
            key = (release.command, release.objectID)
            releases = self._keptReleases[key]
            releases.popleft()  # (this one: the first kept of its object's)
            if not releases:
                del self._keptReleases[key]
                if release.command == b"decref":
                    self.importedReferences -= 1  # its object's last kept decref
            message = self._nativePayload([release.command, release.objectID])
            for _ in range(release.count):
                self._writePayload(message)

    @property
    def sendingLarge(self) -> bool:
        """
        Whether fragments of a large message are still waiting to be written.
        """
        return bool(self._largeOut)

    def serialize(
        self,
        object: Any,
        perspective: Any = None,
        method: Any = None,
        args: Any = None,
        kw: Any = None,
    ) -> Any:
        """
        Encode ``object`` for the peer, on behalf of ``perspective``: banana bytes of its jelly
        in the PB dialects, msgpack bytes in the native one; either is sent as it is. A
        Deferred (or a coroutine, which is awaited) gives a Deferred of the encoded result.
        """
        codec = self._codec
        kind = type(object)
        if kind in _HOOKLESS:  # no hook can run: none of the bookkeeping below
            if codec is not None:
                return codec.pack(object) if kind in _SCALARS else inline(codec.pack(object))
            if kind is int:
                tokens = getTokens(self.currentDialect or b"none", self.sizeLimit, self.prefixLimit)
                if 0 <= object < len(tokens.smallInts):
                    return Encoded(tokens.smallInts[object])  # a common answer, without a walk
        if kind not in _PLAIN and isinstance(object, (CoroutineType, Deferred)):
            if isinstance(object, CoroutineType):
                object = Deferred.fromCoroutine(object)
            # What a hook completes while another value is serialised waits for that value.
            # The result is serialised in the context the Deferred was made in (a remote
            # method's call context, which the streams in the result keep).
            return object.addBoth(self._afterSerializing).addCallback(
                self._serializeIn, contextvars.copy_context(), perspective, method, args, kw
            )
        self.serializingPerspective = perspective
        self.jellyMethod, self.jellyArgs, self.jellyKw = method, args, kw
        # A value an application serialised and never sent is let go here at the latest.
        self._lastRegistered = None
        # Each value has its own journal: one serialised by a hook while another is (an
        # answer a getStateToCopy completes, say) is a message of its own.
        outer = self._registrations
        registrations: list[tuple[Any, int]] = []
        self._registrations = registrations
        result: Any
        unpersistable = None
        try:
            if codec is not None:
                result = inline(codec.pack(object))
            elif _jelliedAsStream(object, self.security):
                raise refusedStreams(
                    self._unsupported("sending a stream (an iterator or async iterator)"), object
                )
            else:
                # Jellied straight to banana bytes (the fused encoder), spliced into the message.
                tokens = getTokens(self.currentDialect or b"none", self.sizeLimit, self.prefixLimit)
                # (Only if there is a Stream to meet: none, in most processes.)
                unpersistable = _UnpersistableStreams() if unclosedStreams else None
                result = Encoded(Jellier(self.security, unpersistable, self).encode(object, tokens))
        except BaseException as e:
            # Exported half-way: nothing is sent. (The Streams jelly noted, in a copy say,
            # are closed with the error too, as they would have been had it succeeded.)
            noted = () if unpersistable is None else unpersistable.streams
            self._refuseValue(registrations, e, object, *noted)
            raise
        finally:
            self._registrations = outer
            self.serializingPerspective = None
            self.jellyMethod = self.jellyArgs = self.jellyKw = None
        if unpersistable is not None:
            unpersistable.close(self)
        if registrations:
            self._lastRegistered = (result, registrations)
        return result

    def _postpone(self, result: Any) -> Deferred[Any]:
        """
        A Deferred of ``result`` (an answer's value, a stream's item, or a Failure), fired
        when the value being serialised is sent (or dropped): :meth:`_sendPostponed`.

        A hook (a Copyable's ``getStateToCopy``, say) may complete another call while a value
        is serialised. Serialised and sent at once, that answer would reach the peer first,
        though it may name a Cacheable whose first copy is in the value being serialised, a
        handle the peer would refuse as unknown. (Calls a hook makes are sent at once, as in
        PB: their arguments are taken when they are made.)
        """
        waiting: Deferred[Any] = Deferred()
        self._postponed.append((waiting, result))
        if self._postponedTimer is None:
            # Each path that sends or drops a value sends what waited for it; should one
            # be missed, nothing waits longer than the reactor's next turn.
            self._postponedTimer = self.clock.callLater(0, self._sendPostponedLater)
        return waiting

    def _sendPostponedLater(self) -> None:
        self._postponedTimer = None
        self._sendPostponed()

    def _serializeIn(self, result: Any, context: contextvars.Context, *how: Any) -> Any:
        return context.run(self.serialize, result, *how)

    def _afterSerializing(self, result: Any) -> Any:
        """
        ``result`` (a value or a Failure), or, if it came while a value is serialised, a
        Deferred of it for once that value is sent (see _postpone): for an answer or a
        stream's item, which may name what that value sends first. Added with ``addBoth``.
        """
        if self._registrations is None or self.disconnected:
            return result
        return self._postpone(result)

    def _sendPostponed(self) -> None:
        """
        Serialise and send (or fail) what :meth:`_postpone` held, in the order it came, unless
        a value is still being serialised.
        """
        if self._sendingPostponed:
            return  # the loop below goes on with what sending one of them postponed
        postponed = self._postponed
        self._sendingPostponed = True
        try:
            while postponed and (self._registrations is None or self.disconnected):
                waiting, result = postponed.pop(0)
                if waiting.called:
                    continue  # cancelled meanwhile: the chain went on with the cancel
                if isinstance(result, Failure):
                    waiting.errback(result)
                else:
                    waiting.callback(result)
        finally:
            self._sendingPostponed = False
        timer = self._postponedTimer
        if not postponed and timer is not None:
            self._postponedTimer = None  # nothing left for it: no call left on the reactor
            if timer.active():
                timer.cancel()

    def _takeRegistrations(self, netValue: Any) -> list[tuple[Any, int]] | None:
        """
        The exports and cache handles that :meth:`serialize` counted for ``netValue`` (the
        value it returned last), for :meth:`_unregister` if the value cannot be sent.
        """
        last = self._lastRegistered
        if last is None or last[0] is not netValue:
            return None
        self._lastRegistered = None
        return last[1]

    def _refuseValue(
        self, registrations: list[tuple[Any, int]], error: BaseException, *values: Any
    ) -> None:
        """
        Undo what serialising ``values`` registered before it failed with ``error``, and
        close with ``error`` every :class:`~pbroker.stream.Stream` in them that nothing else
        uses: those packing reached, and those after the part refused. None of them will be
        sent, and a publisher that keeps its streams must learn so.
        """
        if not isinstance(error, Exception):  # KeyboardInterrupt, say: only undo
            self._unregister(registrations)
            return
        self._unregister(registrations, Failure(error))
        refusedStreams(error, *findStreams(values))

    def _unregisterUnsent(self, netValue: Any) -> None:
        """
        Undo what serialising ``netValue`` exported (and close the streams it made): it will
        not be sent.
        """
        self._unregister(self._takeRegistrations(netValue))

    def _unregister(
        self, registrations: list[tuple[Any, int]] | None, failure: Failure | None = None
    ) -> None:
        """
        Undo the exports and cache handles counted for a value the peer never received: the
        peer cannot release them, so objects would stay exported (and Cacheables observed)
        for as long as the connection lasts. Its streams are closed, with ``failure`` (why
        the value was not sent) if given.
        """
        if not registrations:
            return
        for luid, kind in reversed(registrations):
            if kind == _EXPORT:
                local = self.localObjects.get(luid)
                if local is not None:
                    self._releaseLocal(luid, local)
            elif kind == _CACHE:
                local = self.remotelyCachedObjects.get(luid)
                if local is not None and local.decref() == 0:
                    del self.remotelyCachedObjects[luid]
                    self.remotelyCachedLUIDs.pop(local.object.processUniqueID(), None)
                    self._stopObserving(local)
                    if (luid, _FIRST) not in registrations and self._canSend:
                        # The peer holds a copy. (Behind any large message to the copy.)
                        keys = _needing((_OURS, luid))
                        self._sendBehindLarge(b"uncache", luid, forPeer=True, keys=keys)
            elif kind == _STREAM:
                self._streams.drop([luid], failure)

    def _streamKeys(self, streamID: int, registrations: Any = None) -> _Keys | None:
        """
        What a message of the stream ``streamID`` needs and provides (see :meth:`_keysOf`):
        the stream (its items and end keep their order, after the message that carried
        it), and what packing an item or error registered (``registrations``).
        """
        stream = ((_STREAM_KEY, streamID),)
        return self._keysOf(registrations, stream, stream)

    def _registerStream(self, source: Any) -> int:
        """
        Send ``source`` as a new stream (for the native codec); its id.
        """
        streamID = self._streams.register(source)
        if self._registrations is not None:
            self._registrations.append((streamID, _STREAM))
        return streamID

    def unserialize(self, sexp: Any, perspective: Any = None) -> Any:
        """
        Unjelly what the peer sent, on behalf of ``perspective``.

        If that fails half-way (a class the security options refuse, a limit), what the peer
        counted in the rest of the value is released: its references, cache handles and
        streams would otherwise stay exported for the peer for the life of the connection.
        """
        codec = self._codec
        refused = self._refusedKinds
        if codec is not None and sexp == EMPTY_MAP and not refused:
            return {}  # the keywords of most calls
        outer = self._arrivals
        arrivals: list[tuple[int, int]] = []
        self._arrivals = arrivals
        try:
            if codec is not None and perspective is None and self.unserializingPerspective is None:
                value = codec.unpack(sexp)  # the common case, without the bookkeeping below
            else:
                self.unserializingPerspective = perspective
                try:
                    if codec is None:
                        return Unjellier(self.security, None, self, self.registry).unjellyFull(sexp)
                    value = codec.unpack(sexp)
                finally:
                    self.unserializingPerspective = None
            if sexp is self._callArgs and type(value) is list:
                value = tuple(value)  # a call's positional arguments, as jelly gives them
            if refused:
                _checkKinds(value, refused)
            return value
        except BaseException:
            self._releaseUnread(sexp, arrivals)
            raise
        finally:
            self._arrivals = outer

    def unserializeCall(self, netArgs: Any, netKw: Any, perspective: Any = None) -> tuple[Any, Any]:
        """
        Unserialise a call's positional and keyword arguments (see :meth:`unserialize`);
        if the positional ones fail, the keywords are dropped (releasing what the peer
        counted in them).
        """
        try:
            args = self.unserialize(netArgs, perspective)
        except BaseException:
            self._dropLateValue(netKw)
            raise
        return args, self.unserialize(netKw, perspective)

    def _releaseUnread(self, netValue: Any, arrived: list[tuple[int, int]]) -> None:
        """
        Release what the peer counted for this side in ``netValue`` (sent, not unserialised)
        beyond what ``arrived`` lists: a decref for each reference, a decache for each cache
        handle, a cancel for each stream. ``netValue`` is only scanned: nothing in it is
        unjellied, no class looked up, no code run.

        A value cannot make this side release more of each kind than its limits let it
        hold (``importedReferences`` of the peer's references, as many copies of its
        Cacheables, which ``cacheLocally`` keeps to that limit too, and ``pendingCalls``
        streams): a value with more was never going to be taken, and a hostile peer does
        not get a flood of messages or tables that grow for nothing. Never raises.
        """
        if not self._canSend:
            return  # nothing to release on a connection that is gone
        limits = self.limits
        # The most there can be to release, and so to look for.
        enough = 2 * limits.importedReferences + 2 * limits.pendingCalls
        try:
            self._release(self._countedIn(netValue, len(arrived) + enough), arrived)
        except Exception:
            self._log.failure("Could not release what an unread value held")

    def _release(self, counted: list[tuple[int, int]], arrived: list[tuple[int, int]]) -> None:
        limits = self.limits
        budget = {
            _EXPORT: limits.importedReferences,
            _CACHE: limits.importedReferences,  # (the copies cacheLocally keeps at most)
            _STREAM: limits.pendingCalls,
        }
        unmatched = collections.Counter(arrived)
        newCaches = {luid for luid, kind in counted if kind == _NEW_CACHE}
        for luid, kind in counted:
            if kind == _NEW_CACHE:
                kind = _CACHE
            if unmatched[luid, kind]:
                unmatched[luid, kind] -= 1
                continue
            if budget[kind] <= 0:
                continue
            budget[kind] -= 1
            # Releases of what arrived unread go at once, ahead of the large messages being
            # sent: a message of this side's that names the object keeps a reference of its
            # own until it is written (keepUntilSent), which the peer still counts.
            if kind == _EXPORT:
                self.sendCall(b"decref", luid)
            elif kind == _CACHE:
                unread = self._unreadCaches
                if luid in self.locallyCachedObjects or (unread is not None and luid in unread):
                    pass  # a copy this side holds, or one it released unread already
                elif luid in newCaches:
                    # Its owner will uncache what this side never kept.
                    if unread is None:
                        unread = self._unreadCaches = set()
                    if len(unread) >= limits.importedReferences:
                        continue
                    unread.add(luid)
                else:
                    continue  # not a cache of the peer's: its mistake, nothing to release
                self.sendCall(b"decache", luid)
            else:
                streams = self._streams
                if luid in streams.incoming or luid in streams.cancelled:
                    continue  # open (a stream sent twice), or cancelled already
                streams.cancel(luid)  # (which keeps at most importedReferences cancelled)

    def _countedIn(self, netValue: Any, enough: int) -> list[tuple[int, int]]:
        """
        (id, kind) of each reference (_EXPORT), cache handle (_CACHE, or _NEW_CACHE for a
        first copy) and stream (_STREAM) the peer counted for this side in ``netValue``: the
        first ``enough`` found (the search stops there).
        """
        return list(itertools.islice(self._counted(netValue, enough), enough))

    def _counted(self, netValue: Any, enough: int) -> Iterator[tuple[int, int]]:
        if self._codec is None:
            expressions: Iterable[Any] = [netValue]
        else:
            jellies, streams = extensionsIn(netValue, enough)
            yield from ((streamID, _STREAM) for streamID in streams if isPeerID(streamID))
            expressions = self._nativeExpressions(jellies)
        classFor = self.registry.classFor
        for expression in expressions:
            for node in expressionsIn(expression):
                tag, fields = node[0], len(node) - 1
                if fields == 1 and isPeerID(node[1]):
                    if tag == b"remote":
                        yield node[1], _EXPORT
                    elif tag == b"cached":
                        yield node[1], _CACHE
                elif fields == 2 and isPeerID(node[1]):
                    cls = classFor(tag)
                    if isinstance(cls, type) and issubclass(cls, RemoteCache):
                        yield node[1], _NEW_CACHE

    def _nativeExpressions(self, jellies: list[bytes]) -> Iterator[Any]:
        for data in jellies:
            with contextlib.suppress(InvalidJelly):  # malformed: nothing to find in it
                yield self._nativeExpression(data)

    def _sentAsStream(self, object: Any) -> bool:
        """
        Whether the native codec sends ``object`` as a stream: an iterator or async iterator,
        unless it is one of a class of its own that the security options allow, which is
        copied, as in the ``pb`` dialect and by stock PB.
        """
        return _jelliedAsStream(object, self.security)

    def _jellyNative(self, object: Any) -> bytes:
        return _NativeJellier(self.security, _refuseStreams, self).encode(object, self._tokens)

    def _unjellyNative(self, data: bytes) -> Any:
        expression = self._nativeExpression(data)
        assert self._codec is not None
        unjellier = Unjellier(self.security, None, self, self.registry, self._codec.hashing())
        return unjellier.unjellyFull(expression)

    def _nativeExpression(self, data: bytes) -> Any:
        """
        The jelly expression in the banana bytes of a native ``JELLY`` extension.
        """
        decoder = Decoder(
            b"none",
            sizeLimit=self._jellySizeLimit,
            prefixLimit=self.prefixLimit,
            depthLimit=self.limits.nestingDepth,
        )
        try:
            expressions = decoder.feed(data)
        except BananaDecodeError as e:
            raise InvalidJelly(f"a malformed jellied value: {e}") from None
        if len(expressions) != 1 or decoder.buffered:
            raise InvalidJelly("a jellied value must hold exactly one expression")
        return expressions[0]

    def _openStream(self, streamID: int) -> Any:
        reader = self._streams.open(streamID)
        if self._arrivals is not None:
            # Only once open: one refused (over the limit) is released with the rest.
            self._arrivals.append((streamID, _STREAM))
        return reader

    def _unsupported(self, what: str) -> UnsupportedByPeer:
        dialect = (self.currentDialect or b"none").decode("ascii", "replace")
        return UnsupportedByPeer(
            f"{what} needs pbroker's native dialect ({NATIVE_DIALECT.decode()}), "
            f"but this connection speaks {dialect!r}"
        )

    def newRequestID(self) -> int:
        """
        A request id this side has not used on this connection.
        """
        self.currentRequestID += 1
        return self.currentRequestID

    def newLocalID(self) -> int:
        """
        An id for an object this side exports, not used on this connection before.
        """
        self.currentLocalID += 1
        return self.currentLocalID

    def _sendMessage(
        self,
        prefix: bytes,
        perspective: Any,
        objectID: int | bytes,
        message: bytes,
        args: tuple[Any, ...],
        kw: dict[str, Any],
        options: _context.CallOptions | None = None,
    ) -> Deferred[Any] | None:
        """
        Send a call (``prefix`` is ``b""`` or ``b"cache"``) and return the Deferred of its
        answer, or ``None`` for a one-way call (``pbanswer=False``). Cancelling the Deferred
        abandons the call (and, in the native dialect, cancels it on the peer).

        :raises DeadReferenceError: the connection is already lost (as in Twisted).
        :raises Exception: why a one-way call could not be sent (a value too large or that
            cannot be serialised): it has no Deferred to fail.
        """
        if self._beforeReady is not None and not self.disconnected:
            # Sent once the dialect is chosen (pbanswer still in the keywords, for then).
            call = (prefix, perspective, objectID, message, args, kw, options)
            return self._sendWhenReady(call, bool(kw.get("pbanswer", True)))
        answerRequired = True
        if "pbanswer" in kw:
            kw = dict(kw)
            answerRequired = bool(kw.pop("pbanswer"))
        if self.disconnected:
            # Raised, as Twisted raises it: code written for PB catches it around the call.
            stale = DeadReferenceError("Calling Stale Broker")
            refusedStreams(stale, *findStreams((*args, *kw.values())))  # never to be sent
            raise stale
        annotations = None if options is None else options.context
        if annotations is None and options is not None and options.reply is not None:
            annotations = {}  # the answer's annotations are asked for: the call has a context
        timeout = None if options is None else options.timeout
        self.serializingPerspective = perspective
        self.jellyMethod = message
        data: bytes | _Payload
        outer = self._registrations
        registrations: list[tuple[Any, int]] = []
        self._registrations = registrations
        try:
            if self._codec is not None:
                data = self._nativeCall(
                    prefix, objectID, message, answerRequired, args, kw, annotations, timeout
                )
            else:
                if annotations is not None:
                    raise self._unsupported("a call context")
                data = self._bananaCall(prefix, objectID, message, answerRequired, args, kw)
            requestID = self.currentRequestID
        except Exception as e:
            failure = Failure()
            self._refuseValue(registrations, e, *args, *kw.values())
            self._registrations = outer
            if self._postponed:
                self._sendPostponed()  # what a hook completed before the arguments failed
            if not answerRequired:
                raise
            return fail(failure)
        except BaseException as e:  # KeyboardInterrupt, say: what was registered is undone
            self._refuseValue(registrations, e)
            raise
        finally:
            self._registrations = outer
            self.serializingPerspective = None
            self.jellyMethod = None
        deferred: Deferred[Any] | None = None
        if answerRequired:
            deferred = self.waitingForAnswers[requestID] = Deferred(
                lambda _: self._cancelCall(requestID)
            )
            if options is not None and options.reply is not None:
                self._replyTargets[requestID] = options.reply
        transport = self.transport
        ordered = options is None or options.ordered
        if (self._largeOut or self._afterLarge) and (
            prefix
            or (registrations and self._behindLarge(registrations))
            or (ordered and (self._keptOwn or (type(data) is bytes and self._largeCallOut())))
        ):
            # Calls keep their order, as in stock PB (unless told otherwise): a small one
            # waits for the large calls queued before it (not for large answers: a method
            # that calls its caller back, then answers, has its call arrive first). A large
            # one joins them, and large calls keep their order there; but while messages
            # of this side's are kept (_keptOwn: a large call to a copy, or one naming a
            # cache handle, say, joins the large messages only once those before it are
            # out), a call is kept behind them, else it would overtake them. So is a call
            # that names a cache handle, or is sent to a copy, whose first copy may be in a
            # large message (see _behindLarge).
            kept, own = self._keep(data, False)
            keys = self._callKeys(registrations, prefix, objectID, requestID, ordered)
            serial = self._nextSerial()
            if answerRequired:  # (it may be cancelled, or time out)
                if self._keptCalls is _NO_ENTRIES:
                    self._keptCalls = {}
                self._keptCalls[requestID] = serial
            self._keepEntry((data, requestID, registrations, serial, kept, own, keys))
            if ordered:
                self._lastOrderedCall = self._queueSerial
        elif type(data) is bytes and transport is not None:
            transport.write(data)  # _writePayload's common case, a call fewer
        elif isinstance(data, _Payload) and data.taken:
            keys = self._callKeys(registrations, prefix, objectID, requestID, ordered)
            self._writePayload(data, requestID, registrations, None, keys)
            if ordered:
                self._lastOrderedCall = self._queueSerial
        else:
            self._writePayload(data, requestID, registrations)
            if ordered and isinstance(data, _Payload):
                self._lastOrderedCall = self._queueSerial
        if deferred is not None and timeout is not None:
            deferred.addTimeout(timeout, self.clock, functools.partial(_timedOut, message))
        if self._postponed:
            self._sendPostponed()
        return deferred

    def _orderedCallUnsent(self, since: int) -> bool:
        """
        Whether an ordered call of this side's queued after serial ``since`` (made after a
        request of the peer's arrived, so perhaps by its method) is not written yet: kept
        behind large messages, or a large call not all written. The answer to that request
        then waits behind it, as in stock PB, where a method that calls its caller back
        and then answers has its call arrive first.
        """
        ordered = self._largeWaiting.ordered  # (the large ones, see _orderedCall)
        if ordered and ordered[-1] > since:
            return True
        for after in (self._afterLarge, self._afterBlocked):
            for entry in reversed(after):
                if entry[3] <= since:
                    break
                keys = entry[6]
                if entry[1] is not None and (keys is None or _IN_ORDER in keys[1]):
                    return True
        return False

    def _largeCallOut(self) -> bool:
        """
        Whether a large call of this side's is queued (being sent, or waiting to be).
        """
        return any(entry[2] is not None for entry in self._largeOut)

    def _callKeys(
        self,
        registrations: list[tuple[Any, int]],
        prefix: bytes,
        objectID: Any,
        requestID: int,
        ordered: bool,
    ) -> _Keys | None:
        """
        What a call needs and provides (see :meth:`_keysOf`): besides what its arguments
        name, itself (for its cancel), and its target: one of the peer's objects (for its
        release), or (``b"cache"``) the peer's copy of a Cacheable of this side's, which
        needs that copy's first copy and the calls to the copy made before it (an
        observer's updates arrive in order), and comes before its uncache. A call that
        keeps its order (``ordered``) needs the ordered calls made before it, and provides
        itself to those after it.
        """
        order = (_IN_ORDER,) if ordered else ()
        if prefix:
            toCopy = (_TO_COPY, objectID)
            return self._keysOf(
                registrations,
                ((_FIRST_KEY, objectID), toCopy, *order),
                ((_OURS, objectID), toCopy, (_CALL, requestID), *order),
            )
        return self._keysOf(registrations, order, ((_THEIRS, objectID), (_CALL, requestID), *order))

    def _bananaCall(
        self,
        prefix: bytes,
        objectID: int | bytes,
        message: bytes,
        answerRequired: bool,
        args: tuple[Any, ...],
        kw: dict[str, Any],
    ) -> bytes:
        if (any(map(isStreamable, args)) or any(map(isStreamable, kw.values()))) and any(
            _jelliedAsStream(arg, self.security) for arg in (*args, *kw.values())
        ):
            raise refusedStreams(
                self._unsupported("sending a stream (an iterator or async iterator)"),
                *args,
                *kw.values(),
            )
        tokens = getTokens(self.currentDialect or b"none", self.sizeLimit, self.prefixLimit)
        # Arguments and keywords are jellied separately, as every PB peer does.
        unpersistable = _UnpersistableStreams() if unclosedStreams else None
        try:
            netArgs = Jellier(self.security, unpersistable, self).encode(args, tokens)
            netKw = (
                Jellier(self.security, unpersistable, self).encode(kw, tokens)
                if kw
                else _noKeywords(tokens)
            )
        except Exception as e:
            # Those noted before the failure (in a copy, say) are closed with it, as the
            # call's others are (see _refuseValue), not left open.
            if unpersistable is not None:
                refusedStreams(e, *unpersistable.streams)
            raise
        # (Before the request id is taken: closing runs the application's code, which may
        # make a call of its own.)
        if unpersistable is not None:
            unpersistable.close(self)
        data = tokens.joinList(
            [
                tokens.symbol(prefix + b"message"),
                tokens.integer(self.newRequestID()),
                tokens.integer(objectID) if isinstance(objectID, int) else tokens.symbol(objectID),
                tokens.symbol(message),
                tokens.integer(1 if answerRequired else 0),
                netArgs,
                netKw,
            ]
        )
        if self._bananaLimited:
            self._checkPeerLimit(len(data))  # (in pbroker1 the server would drop the connection)
        return data

    def _nativeCall(
        self,
        prefix: bytes,
        objectID: int | bytes,
        message: bytes,
        answerRequired: bool,
        args: tuple[Any, ...],
        kw: dict[str, Any],
        annotations: dict[str, Any] | None,
        timeout: float | None,
    ) -> bytes | _Payload:
        codec = self._codec
        assert codec is not None
        netArgs = inline(codec.pack(list(args)))
        netKw = self._packKeywords(codec, kw, netArgs) if kw else EMPTY_MAP
        requestID = self.newRequestID()
        answer = 1 if answerRequired else 0
        fields = [prefix + b"message", requestID, objectID, message, answer, netArgs, netKw]
        if annotations is not None or timeout is not None:
            context: dict[str, Any] = {"annotations": annotations or {}}
            if timeout is not None:
                context["timeout"] = timeout
            fields[0] = prefix + b"callctx"
            fields.append(context)
        return self._nativePayload(fields, type(netArgs) is bytes and type(netKw) is bytes, True)

    def _packKeywords(self, codec: ValueCodec, kw: dict[str, Any], netArgs: Any) -> Any:
        """
        A call's keywords packed within what its arguments left of the peer's limit: keywords
        that could not fit with them are refused before they are packed, not after.
        """
        limit, peer = codec.itemLimit, self.peerMessageSize
        if limit is None or peer is None:
            return inline(codec.pack(kw))
        used = len(netArgs) if type(netArgs) is bytes else netArgs.size
        codec.itemLimit = max(0, limit - used)
        try:
            return inline(codec.pack(kw))
        except LimitExceeded:
            raise LimitExceeded(
                f"a call's arguments take {used} bytes, and its keywords more than the "
                f"{max(0, limit - used)} left of the {peer}-byte limit of a message to the peer"
            ) from None
        finally:
            codec.itemLimit = limit

    def _cancelCall(self, requestID: int) -> None:
        """
        The caller cancelled (or timed out) a call: stop waiting for it, and ask the peer to
        cancel it where the dialect allows.
        """
        if self.waitingForAnswers.pop(requestID, None) is None:
            return
        self._replyTargets.pop(requestID, None)
        queued = self._dropUnsentCall(requestID) if self._largeOut or self._afterLarge else None
        if queued:
            self._schedulePump()  # what waited behind it may go now
            return  # none of it was sent: the peer has nothing to cancel, nor to answer
        if self._abandoned is _NO_MEMBERS:
            self._abandoned = set()
        if len(self._abandoned) < _MAX_ABANDONED:
            self._abandoned.add(requestID)
        else:
            self._abandonedOverflow = True
        if self.isNative and self._canSend:
            if queued is not None:
                # The call is still being sent: the cancel must not overtake it.
                self._sendBehindLarge(b"cancel", requestID, keys=_needing((_CALL, requestID)))
            else:
                self.sendCall(b"cancel", requestID)

    def _dropUnsentCall(self, requestID: int) -> bool | None:
        """
        Forget the call ``requestID`` if it waits in the large-message queues and none of it
        was written yet (it waits behind other large messages, or for the peer to take
        earlier calls), undoing what packing it counted (exports, cache handles, streams).

        :returns: whether it did; ``None`` if the call is not queued (it was sent).
        """
        serial = self._keptCalls.pop(requestID, None) if self._keptCalls else None
        if serial is not None:
            # Kept, not a large message: found by its serial in the kept queues, without
            # walking the large messages (a kept call is written before it joins them).
            for after in (self._afterLarge, self._afterBlocked):
                # (Bisected: a deque is indexed from its nearer end, a block at a time.)
                index = bisect.bisect_left(after, (serial, True), key=_keptOrder)
                if index < len(after) and after[index][1] == requestID:
                    return self._dropKept(after, index, after[index])
        queue = self._largeOut
        for index in _nearerEnd(queue, 2, requestID):
            entry = queue[index]
            if entry[2] == requestID:
                if entry[4] is None or any(kind == _FIRST for _, kind in entry[4]):
                    return False  # being written, or holds a first copy later ones may name
                del queue[index]
                self._largeWaiting.remove(entry)
                self._largeBlocked = False  # the call behind it may fit
                transport: Any = self.transport
                if type(transport) is PacedTransport and transport.paused and index:
                    # Uncount what queued() counted for it (an upper bound: reset on resume).
                    transport.queuedWhilePaused = max(0, transport.queuedWhilePaused - entry[1])
                if self._afterBlocked and (entry[3] or entry[6] is not None):
                    # (A call that waited for room, or one that could: what needs a large
                    # call let go ahead of it waits for it too, see _releaseBlocked.)
                    self._unblockKept(None if entry[6] is None else entry[6][1])
                # Only now (as for a kept call, below): what waited for the call is back in
                # _afterLarge, or still waits for another call queued. Releasing what the
                # call counted may send an uncache, or run application code that calls
                # (stoppedObserving, an export's cleanup), and with neither queue holding
                # anything they would be written at once, ahead of the calls that waited.
                self._unregister(entry[4])
                return True
        for after in (self._afterLarge, self._afterBlocked):
            order = _nearerEnd(after, 1, requestID)
            # (Walked, not indexed: indexing a deque away from its ends costs its length.)
            entries = reversed(after) if order.step < 0 else after
            for index, kept in zip(order, entries, strict=True):
                if kept[1] == requestID:
                    return self._dropKept(after, index, kept)
        return None

    def _dropKept(self, after: collections.deque[_KeptEntry], index: int, kept: _KeptEntry) -> bool:
        """
        Forget the call ``kept``, at ``index`` in ``after`` (``_afterLarge`` or
        ``_afterBlocked``), for :meth:`_dropUnsentCall`; or not, if it holds a first copy.
        """
        _payload, _waiting, counted, _serial, _kept, own, _keys = kept
        if counted and any(kind == _FIRST for _, kind in counted):
            return False
        del after[index]
        blocked = after is self._afterBlocked
        if blocked:
            self._unblockEntry(kept)
        if blocked or (isinstance(_payload, _Payload) and _payload.taken):
            # What waited for it must not stay (a large call let go ahead of what needs it
            # too, see _releaseBlocked); but what needs only what a call waiting before all of
            # them provides still waits, and is not walked again (many calls kept behind a
            # call waiting for room, each timing out, would walk all the others each).
            self._unblockKept(None if _keys is None else _keys[1])
        self._keptOwn -= own
        transport: Any = self.transport
        if type(transport) is PacedTransport and transport.paused:
            # Uncount what keptOwn() counted for it (an upper bound, as above).
            transport.ownKeptWhilePaused = max(0, transport.ownKeptWhilePaused - own)
        self._unregister(counted)
        return True

    def importReference(self, luid: int) -> None:
        """
        Count one more reference to the peer's object ``luid`` (called as one arrives).

        :raises LimitExceeded: this side already holds as many as the limits allow. The peer
            is sent a decref for the refused reference, so its count stays right.
        """
        if self._arrivals is not None:
            # Counted as arrived even if refused below: the refusal sends its decref.
            self._arrivals.append((luid, _EXPORT))
        if self.importedReferences >= self.limits.importedReferences:
            self._log.warn(
                "Refusing a reference from the peer: it already gave {count}",
                count=self.importedReferences,
            )
            if not self.disconnected and self.transport is not None:
                # At once, even ahead of large messages being sent: see _release.
                self.sendCall(b"decref", luid)
            raise LimitExceeded(
                f"the peer sent more than {self.limits.importedReferences} references"
            )
        self.importedReferences += 1

    @property
    def _canSend(self) -> bool:
        # Reference-count messages are dropped once the connection is gone or not yet ready.
        return not self.disconnected and self.transport is not None and bool(self.currentDialect)

    def sendDecRef(self, objectID: int | bytes) -> None:
        """
        Tell the peer one reference to its object ``objectID`` is gone.
        """
        if not self._canSend:
            self.importedReferences -= 1
            return
        self._sendRelease(b"decref", objectID)

    # Paging: pagers send while the pacing transport says the connection takes data.

    def makeConnection(self, transport: Any) -> None:
        # Write through a pacing wrapper: it knows when the peer stops taking data.
        super().makeConnection(PacedTransport(transport, self))  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        self._beforeReady = []
        # A client factory learns of the connection before its dialect is chosen (to close
        # it on disconnect()), however its buildProtocol made this broker.
        brokerConnecting = getattr(self.factory, "brokerConnecting", None)
        if self.isClient and brokerConnecting is not None:
            brokerConnecting(self)
        super().connectionMade()
        # From now, not from the choice of dialect: a peer that connects and then says
        # nothing is dropped too (no ping can be sent to it before the choice).
        self._startKeepalive()

    def _sendNegotiation(self, expression: Any) -> None:
        # Through sendEncoded (a subclass may watch it), but sent now: not kept, as what is
        # sent before the choice is.
        early, self._beforeReady = self._beforeReady, None
        try:
            self.sendEncoded(expression)
        finally:
            self._beforeReady = early

    def _sendWhenReady(
        self, call: tuple[Any, ...] | None, answerRequired: bool = True, expression: Any = None
    ) -> Deferred[Any] | None:
        """
        Keep a message sent before the dialect is chosen, to send once it is (encoded in it):
        a call's arguments to :meth:`_sendMessage` (the Deferred of its answer returned, or
        ``None`` for a one-way call), else an ``expression`` for :meth:`sendEncoded`.
        """
        assert self._beforeReady is not None
        early = self._beforeReady

        def cancel(_: Deferred[Any]) -> None:
            if entry.sent is not None:
                entry.sent.cancel()
            elif entry in early:
                early.remove(entry)  # never to be sent (the Deferred fails CancelledError)

        deferred: Deferred[Any] | None = None
        if call is not None and answerRequired:
            deferred = Deferred(cancel)
            options = call[6]
            if options is not None and options.timeout is not None:
                # Counted from the call, as for any call, not from when it can be sent: a
                # peer that never chooses a dialect does not keep it waiting past it. (The
                # call sent is given the time left, see _sendEarly.)
                deferred.addTimeout(
                    options.timeout, self.clock, functools.partial(_timedOut, call[3])
                )
        entry = _Early(call, deferred, expression, self.clock.seconds())
        early.append(entry)
        return deferred

    def _sendEarly(self, early: list[_Early]) -> None:
        """
        Send, in order, what was sent before the connection was ready.
        """
        entries = early[:]
        del early[:]
        for entry in entries:
            if entry.call is None:
                # Raised here, its error would skip the entries after it (their Deferreds
                # never fired) and the rest of connectionReady: whoever sent it is gone.
                try:
                    self.sendEncoded(entry.expression)
                except Exception:
                    self._log.failure(
                        "A message sent before the connection was ready could not be sent"
                    )
                continue
            deferred = entry.deferred
            if deferred is not None and deferred.called:
                continue  # cancelled meanwhile (by a callback of one sent before it)
            call = entry.call
            options = call[6]
            if options is not None and options.timeout is not None:
                # The peer is told the time left, so that the method's deadline is the
                # caller's: the timeout counts from the call (see _sendWhenReady).
                left = options.timeout - (self.clock.seconds() - entry.made)
                if not left > 0:
                    continue  # its timer is due now, and fails it
                call = (*call[:6], replace(options, timeout=left))
            if deferred is None:
                try:
                    self._sendMessage(*call)
                except Exception:
                    self._log.failure("A one-way call made before the connection was ready")
                continue
            sent = self._sendMessage(*call)
            assert sent is not None
            entry.sent = sent
            if call is not entry.call:  # sent with the time left
                sent.addErrback(_timeoutNamed, call[3], options.timeout)
            sent.chainDeferred(deferred)

    def _dropEarly(self, reason: Any) -> None:
        """
        Fail what was sent before the connection was ready and never went: the connection was
        lost first.
        """
        early, self._beforeReady = self._beforeReady, None
        for entry in early or ():
            if entry.call is None:
                continue
            lost = PBConnectionLost(reason)
            _, _, _, _, args, kw, _ = entry.call
            refusedStreams(lost, *findStreams((*args, *kw.values())))  # never to be sent
            if entry.deferred is not None and not entry.deferred.called:
                entry.deferred.errback(Failure(lost))

    def registerPageProducer(self, pager: Any) -> None:
        """
        Have ``pager.sendNextPage()`` called while the connection takes data, until
        ``pager.stillPaging()`` is false.

        :raises Exception: why a page sent at once could not be (the pager is dropped).
        """
        if self._pagesSent is _NO_MEMBERS:
            self._pagesSent = set()
        self.pageProducers.append(pager)
        self._sendPages(first=pager)

    def sendPages(self) -> None:
        """
        Send pages from the active pagers until the connection stops taking data, every pager
        is done, or none has a page ready (a pager calls this again when it has one). A pager
        whose page cannot be sent (too large for the peer, say) is dropped, and why logged.
        """
        self._sendPages()

    def _sendPages(self, first: Any = None) -> None:
        """
        The loop of :meth:`sendPages`. The error of ``first``'s first page, if it is sent
        here, is raised (to whoever is making that pager); every other pager's is its
        collector's business (see :meth:`dropPageProducer`).
        """
        transport = self.transport
        if self._sendingPages or self._closing or not isinstance(transport, PacedTransport):
            # Closing (see writeQueued): pagers send nothing more. (Once the closing transport
            # has handed everything over it no longer pauses the broker: every page would go
            # at once, unpaced.)
            return
        self._sendingPages = True
        try:
            progress = True
            while self.pageProducers and progress and not transport.paused:
                if self.disconnected:
                    break
                progress = False
                for pager in list(self.pageProducers):
                    waited = pager in self._pagesSent  # its page went out in an earlier round
                    if not waited:
                        if self._largeOut:
                            # A page (or another large message) is being sent in fragments:
                            # a small page would overtake it. _pumpLarge comes back.
                            return
                        written = transport.written
                        try:
                            pager.sendNextPage()
                        except Exception:
                            self.dropPageProducer(pager, Failure(), raising=pager is first)
                            progress = True
                            continue
                        if pager is first:
                            first = None  # its later pages fail to its collector
                        progress = progress or transport.written != written
                        self._pagesSent.add(pager)
                    if self._largeOut:
                        return  # the end, if this was the last page, waits for the page
                    self._pagesSent.discard(pager)
                    progress = progress or waited
                    try:
                        ended = not pager.stillPaging()  # runs its callback at the end
                    except Exception:
                        # Its pages are all sent: what failed is the application's ending.
                        self._log.failure("Error at the end of a pager (in its callback?)")
                        ended = True
                    if ended:
                        if pager in self.pageProducers:  # (unless the callback disconnected)
                            self.pageProducers.remove(pager)
                        progress = True
                    if self.disconnected:
                        return
        finally:
            self._sendingPages = False

    def _stopPagers(self, reason: Any) -> None:
        """
        The connection is lost: let go of the pagers still sending, and stop them (a
        :class:`~pbroker.util.FilePager` stops reading its file), without a log line each:
        the loss is the news. A pager's callback is not called, its transfer not finished.
        """
        pagers, self.pageProducers = self.pageProducers, []
        self._pagesSent = _NO_MEMBERS
        for pager in pagers:
            self._stopPager(pager, Failure(PBConnectionLost(reason)))

    def _stopPager(self, pager: Any, failure: Failure) -> None:
        """
        Tell ``pager`` it stops, with ``failure`` (see :meth:`pbroker.util.Pager.pagingFailed`).
        """
        pagingFailed = getattr(pager, "pagingFailed", None)
        if pagingFailed is not None:
            try:
                pagingFailed(failure)
            except Exception:
                self._log.failure("A pager failed to stop")

    def dropPageProducer(self, pager: Any, failure: Failure, raising: bool = False) -> None:
        """
        Stop ``pager``, which failed (``failure``). With ``raising``, the failure is raised to
        whoever started the pager, who may handle it (with smaller pages, say); otherwise it
        is logged and the pager tells its collector (see
        :meth:`pbroker.util.Pager.pagingFailed`).
        """
        if pager in self.pageProducers:
            self.pageProducers.remove(pager)
        if pager in self._pagesSent:
            self._pagesSent.discard(pager)
        if raising:
            failure.raiseException()
        self._stopPager(pager, failure)
        # Resumed by the transport, or a file read: the reactor's business is not the pager's.
        self._logFailure("A pager failed; it stops", failure)

    def transportResumed(self) -> None:
        """
        The connection takes data again: what the peer sent meanwhile is handled first, then
        large messages, streams and pagers go on.
        """
        self.overflowing = False
        self._pumpLarge()  # which handles the backlog first, and lets streams with credit go on
        self.sendPages()

    # Streams (native dialect): the bookkeeping is pbroker._streams.StreamTable's

    def _canStream(self) -> bool:
        # Nothing is pulled from a stream's source while large messages wait: memory stays
        # bounded by what is on its way, and items keep their order.
        # Nor once the connection is closing (see writeQueued): its transport no longer
        # pauses the broker once handed the last of what was queued, and the items would go
        # to it unpaced, all at once.
        transport = self.transport
        if (
            self.disconnected
            or self._closing
            or transport is None
            or self._largeOut
            or self._afterLarge
        ):
            return False
        return not (isinstance(transport, PacedTransport) and transport.paused)

    def _logFailure(self, message: str, failure: Failure) -> None:
        """
        Log ``failure``, a remote call's or a stream's: its exception may hold a value from
        the peer, which is described rather than written out if it is too large (see
        :func:`~pbroker.failure.loggable`).
        """
        self._log.failure(message, loggable(failure))

    def _dropStreamsIn(self, netValue: Any, failure: Failure | None = None) -> None:
        """
        Forget the streams a packed value that could not be sent refers to (closed with
        ``failure``, why, if given).
        """
        if self._codec is not None:
            self._streams.drop(self._codec.streamsIn(netValue), failure)

    def _credit(self, streamID: Any, count: Any) -> None:
        self._streams.credit(streamID, count)

    def _streamCancel(self, streamID: Any) -> None:
        self._streams.streamCancel(streamID)

    def _item(self, streamID: Any, data: Any) -> None:
        self._streams.item(streamID, data)

    def _end(self, streamID: Any) -> None:
        self._streams.end(streamID)

    def _streamError(self, streamID: Any, data: Any) -> None:
        self._streams.streamError(streamID, data)

    # Keepalive

    def _startKeepalive(self) -> None:
        if self.keepalive is not None:
            self._keepaliveTimer = KeepaliveTimer(
                self.clock, self.keepalive, self._sendPing, self._peerIsDead, self._sendProgress
            )
            self._keepaliveTimer.start()

    def _sendProgress(self) -> tuple[int, int] | None:
        """
        How many bytes the peer has taken so far, and how many wait for it (see
        :meth:`PacedTransport.progress`), or ``None`` if the transport cannot tell.
        """
        transport: Any = self.transport
        if type(transport) is not PacedTransport:
            return None
        return transport.progress()

    def _peerIsDead(self, why: str) -> None:
        if self.disconnected or self.transport is None:
            return
        self._lostReason = why
        self._log.warn("Dropping a silent peer: {why}", why=why)
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _sendPing(self) -> None:
        if self.disconnected or self.transport is None or not self.currentDialect:
            return
        if self.isNative or self.peerIsPbroker:
            assert self._keepaliveTimer is not None
            self.sendCall(b"ping", self._keepaliveTimer.pings)
            return
        # A stock Twisted peer has no ping, but answers any call; one to an object that does
        # not exist costs it a lookup and no log line, and its error answer is the pong.
        # One at a time: a peer that talks (else it would be dropped as silent) but does not
        # answer would have this side keep a call for every ping.
        if self._pingUnanswered:
            return
        pinged = self._sendMessage(b"", None, _PING_OBJECT, b"ping", (), {})
        if pinged is not None:
            self._pingUnanswered = True
            pinged.addBoth(self._pingAnswered)

    def _pingAnswered(self, _: Any) -> None:
        self._pingUnanswered = False

    def dataReceived(self, data: bytes) -> None:
        """
        Handle what the peer sent, then send what that wrote (answers, and calls their
        callbacks made) at once, in one write, rather than on the reactor's next turn: one
        reactor turn fewer on each side of every round trip (see PacedTransport.flush).

        While the connection does not take this side's data, what the peer sends waits,
        unhandled (see ``_keepForLater``).
        """
        self._receivedBytes += len(data)
        if self._closing:
            # This side closes the connection (see writeQueued): as a transport that is
            # closing reads nothing more, nothing more is handled. (Read and dropped rather
            # than left unread: the peer's own close is noticed, and a socket closed with
            # bytes unread is reset, which may cost the peer what it had not read yet.)
            if self._keepaliveTimer is not None:
                self._keepaliveTimer.heard()
            return
        transport: Any = self.transport
        if type(transport) is not PacedTransport:
            self._handleData(data)
            return
        # (_peerWaits is false unless one of the first two holds: a cheap test first.)
        if self._backlog is not None or (
            (transport.paused or self._largeOut) and self._peerWaits(transport)
        ):
            self._keepForLater(data)
            return
        written = transport.written
        holding = transport.hold()
        try:
            self._handleData(data)
            if transport.written != written:
                transport.flush()
        finally:
            if holding:
                transport.release()

    def _handleData(self, data: bytes) -> None:
        if self._keepaliveTimer is not None:
            self._keepaliveTimer.heard()
        decoder = self._decoder
        if decoder is None:
            return  # the connection already failed, or connectionMade() was never called
        if len(data) >= _LARGE_READ or decoder.midExpression:
            # Decoding a large message makes many containers at once, and the cyclic
            # collector would run over and over while it does (half the decoding time for a
            # list of a thousand records). Those objects are new and alive; collect after.
            collecting = gc.isenabled()
            if collecting:
                gc.disable()
            try:
                if self._codec is not None:
                    self._feedNative(decoder, data)
                else:
                    super().dataReceived(data)
            finally:
                if collecting:
                    gc.enable()
            decoder = self._decoder
            transport: Any = self.transport
            if type(decoder) is FrameDecoder and type(transport) is PacedTransport:
                transport.readLarge(decoder.largeMessage)
        elif self._codec is not None:
            self._feedNative(decoder, data)
        else:
            super().dataReceived(data)

    def _feedNative(self, decoder: Any, data: bytes) -> None:
        """
        Decode and handle what the peer sent in the native dialect: Banana.dataReceived's
        work without its negotiation step (the dialect is chosen) and a call fewer per
        message.
        """
        try:
            expressions = decoder.feed(data)
        except BananaDecodeError as e:
            self._malformed(e)
            return
        if len(expressions) == 1:
            if self._factoryWaitsForHello:
                self._noHelloBefore(expressions)
            self.expressionReceived(expressions[0])
        else:
            self._deliver(expressions)

    def _noHelloBefore(self, expressions: list[Any]) -> None:
        """
        While the factory waits for the server's hello: a server sends its ``version`` and
        ``hello`` before any other message, so if another comes first, none will come (a
        peer need not send one), and the factory is told of the connection now, the
        server's limits unknown.
        """
        for expression in expressions:
            command = expression[0] if type(expression) is list and expression else None
            if command == b"hello":
                return
            if command != b"version":
                self._factoryWaitsForHello = False
                if self.factory is not None:
                    self.factory.clientConnectionMade(self)
                return

    def _deliver(self, expressions: list[Any]) -> None:
        # The answers to the messages of one read leave in one write (dataReceived holds
        # them), or in one per _FLUSH_EVERY messages, sent at once: the peer works on the
        # first answers of a long run (pipelined calls) while this side works on the rest.
        # Once the connection stops taking data, the rest wait (see _keepForLater).
        if self._factoryWaitsForHello:
            self._noHelloBefore(expressions)
        transport: Any = self.transport
        if type(transport) is not PacedTransport:
            super()._deliver(expressions)
            return
        for index, expression in enumerate(expressions):
            if self._decoder is None:
                return  # the connection was dropped while handling an expression
            if (transport.paused or self._largeOut) and self._peerWaits(transport):
                self._backlog = expressions[index:]
                return
            if index and not index % _FLUSH_EVERY:
                transport.flush()
            self.expressionReceived(expression)

    def _malformed(self, error: BananaDecodeError) -> None:
        # What arrived intact before the garbage is handled, whether or not the connection
        # takes data: it is dropped right after.
        self._failing = True
        try:
            super()._malformed(error)
        finally:
            self._failing = False

    def _peerWaits(self, transport: PacedTransport) -> bool:
        """
        Whether the peer's messages wait, unhandled: the connection takes no data, or more
        than ``limits.bufferedBytes`` of messages made for the peer wait behind the large
        message being sent (native dialect, see :meth:`_queueFull`); unless they are
        handled after all (overflowing, or before malformed input).
        """
        if self.overflowing or self._failing or self._losing:
            return False
        return transport.paused or self._queueFull()

    def _endOverflow(self) -> None:
        """
        End an overflow that began while large messages for the peer filled the queue, the
        connection taking data, once they no longer do (one that began while the connection
        took none ends when it resumes): else the peer's messages would never wait again,
        and a later moment of a full connection would drop it at once.
        """
        transport: Any = self.transport
        if type(transport) is PacedTransport and not transport.paused and not self._queueFull():
            self.overflowing = False

    def _queueFull(self) -> bool:
        """
        Whether more than ``limits.bufferedBytes`` of messages made for the peer wait behind
        the large message being sent: large ones (answers, errors, stream items: not this
        side's own calls), and those kept behind large messages (``_keptForPeer``).

        Kept ones count only while no large call waits for the peer to take earlier ones:
        some may wait for that call (see :meth:`_flushAfterLarge`), which the peer's
        ``taken`` lets go, and the peer's messages must be handled for it to arrive.
        """
        return self.waitingForPeer() > self.limits.bufferedBytes

    def waitingForPeer(self) -> int:
        """
        Bytes of messages made for the peer that wait behind the large message being sent
        (past ``limits.bufferedBytes`` of them, the peer's messages wait, unhandled).
        """
        queue = self._largeOut
        waiting = 0
        if queue:
            head = queue[0]
            waiting = self._largeOutForPeer - (head[1] if head[2] is None else 0)
        if self._keptForPeer and not any(entry[3] for entry in queue):
            waiting += self._keptForPeer
        return waiting

    def _keepForLater(self, data: bytes) -> None:
        """
        Keep what the peer sent while the connection does not take this side's data (or
        more than ``limits.bufferedBytes`` of large messages wait behind the one being sent),
        to be handled once it does (:meth:`_handleBacklog`).

        Handling it now would only add answers to those waiting: a peer that asks for many
        large answers at once gets them as it reads them, rather than all at once into
        memory. What waits is bounded: past ``limits.bufferedBytes`` plus the largest
        message this side accepts (``limits.messageSize``) it is handled after all, until
        the connection drains, and the peer is dropped as soon as more than
        ``limits.bufferedBytes`` waits for it (a peer that sends but does not read).
        """
        if self._keepaliveTimer is not None:
            self._keepaliveTimer.heard()
        if self._decoder is None:
            return  # the connection already failed
        if self._backlog is None:
            self._backlog = []
        kept = self._backlogData
        if len(data) < _SMALL_READ:
            # Small reads go into shared pieces: a peer that trickles its bytes in tiny reads
            # would otherwise make this side hold an object for each, 40 times their bytes.
            if kept and type(kept[-1]) is bytearray and len(kept[-1]) < _KEPT_PIECE:
                kept[-1] += data
            else:
                kept.append(bytearray(data))
        else:
            kept.append(data)
        self._backlogSize += len(data)
        if self._backlogSize > self.limits.bufferedBytes + (self.limits.messageSize or 0):
            # The peer sent too much while the connection was full: handle it after all, and
            # drop the peer as soon as more than bufferedBytes waits for it (see _pacing),
            # now if that much waits already.
            self.overflowing = True
            transport: Any = self.transport
            if type(transport) is PacedTransport:
                transport.overflowed()
            self._handleBacklog()

    def discardBacklog(self) -> None:
        """
        Handle nothing more the peer sent, waiting or not (a backlog being handled stops
        too): it is being dropped for misbehaving.
        """
        self._backlog, self._backlogData, self._backlogSize = None, [], 0
        self._decoder = None

    def _handleBacklogOnLoss(self) -> None:
        """
        Handle what the peer sent before the connection was lost and still waits: it
        arrived, and a peer that sent a last message and closed expects it handled. What
        that writes goes nowhere, and nothing is sent any more, so nothing waits for that.
        """
        transport: Any = self.transport
        if type(transport) is not PacedTransport:
            return
        transport.paused = False
        self._largeOut = []
        self._largeWaiting = _NO_WAITING
        self._largeOutForPeer = 0
        self._losing = True  # nothing waits for the peer any more: it is all handled
        try:
            self._handleBacklog()
        except Exception:
            self._log.failure("Handling the messages that arrived before the connection was lost")
        finally:
            self._losing = False

    def _handleBacklog(self) -> None:
        """
        Handle what the peer sent while the connection did not take data, in order, for as
        long as it takes data (:meth:`_pumpLarge` calls this, and goes on with large
        messages, streams and pagers).
        """
        transport: Any = self.transport
        if (
            self._backlog is None
            or self._handlingBacklog
            or self._decoder is None
            or type(transport) is not PacedTransport
        ):
            return
        if self._peerWaits(transport):
            return  # transportResumed() or _pumpLarge() comes back
        written = transport.written
        holding = transport.hold()
        self._handlingBacklog = True
        try:
            expressions, self._backlog = self._backlog, None
            chunks, self._backlogData, self._backlogSize = self._backlogData, [], 0
            self._deliver(expressions)
            for index, chunk in enumerate(chunks):
                if self._decoder is None:
                    return
                if self._backlog is not None or self._peerWaits(transport):
                    # Paused again: the rest waits, behind what _deliver kept.
                    if self._backlog is None:
                        self._backlog = []
                    self._backlogData = chunks[index:]
                    self._backlogSize = sum(len(rest) for rest in self._backlogData)
                    break
                self._handleData(chunk if type(chunk) is bytes else bytes(chunk))
            if transport.written != written:
                transport.flush()
        finally:
            self._handlingBacklog = False
            if holding:
                transport.release()

    def _ping(self, count: Any) -> None:
        if type(count) is not int:
            # Echoed back: only what this side's own pings carry.
            raise ProtocolError(f"a ping must carry an integer: {describe(count)}")
        self.sendCall(b"pong", count)

    def _pong(self, count: Any) -> None:
        pass  # arriving was the point: dataReceived noted the time

    # Exported objects

    def registerReference(self, object: Any) -> int:
        """
        Export ``object`` (or count one more reference to it) and return its luid.

        :raises Error: the connection already exports as many objects as its limits allow.
        """
        puid = object.processUniqueID()
        luid = self.luids.get(puid)
        if luid is not None:
            self.localObjects[luid].incref()
        else:
            if len(self.luids) >= self.limits.exportedReferences:  # named objects do not count
                self._refuseOverLimit("reference")
            luid = self.newLocalID()
            self.localObjects[luid] = Local(object)
            self.luids[puid] = luid
        if self._registrations is not None:
            self._registrations.append((luid, _EXPORT))
        return luid

    def keepUntilSent(self, reference: Any) -> None:
        """
        Keep ``reference``, the peer's object (a RemoteReference or a cache copy) named in the
        value being serialised, until that value has been written.

        Its release (a ``decref`` or ``decache``) is sent when it is garbage collected, which
        may happen between the packing of the value and its writing: a remote method's
        arguments are freed once its result is packed, before the answer is sent. Sent then,
        the release would overtake the answer, and the peer would forget the object the
        answer hands back to it.
        """
        if self._registrations is not None:
            self._registrations.append((reference, _KEPT))

    def _refuseOverLimit(self, what: str) -> NoReturn:
        """
        Refuse one more exported reference or cached object (Twisted's messages); after
        repeated refusals, drop the connection.
        """
        self.maxBrokerRefsViolations += 1
        if self.maxBrokerRefsViolations > _MAX_REFERENCE_VIOLATIONS:
            self._fail(f"the peer keeps exceeding the {what} limit")
            raise Error(f"Maximum PB {what} count exceeded.  Goodbye.")
        raise Error(f"Maximum PB {what} count exceeded.")

    def localObjectForID(self, luid: int | bytes | str) -> Any:
        """
        The exported object with this luid (or name), or ``None``.
        """
        if isinstance(luid, str):
            luid = luid.encode("utf-8")
        local = self.localObjects.get(luid)
        return None if local is None else local.object

    def setNameForLocal(self, name: bytes | str, object: Any) -> None:
        """
        Export ``object`` under a fixed name (``b"root"``), outside reference counting.
        """
        if isinstance(name, str):
            name = name.encode("utf-8")
        if object is None:
            raise ValueError("cannot export None")
        self.localObjects[name] = Local(object)

    def remoteForName(self, name: bytes | str) -> RemoteReference:
        """
        A reference to the peer's object exported under ``name``; it is not counted.
        """
        if isinstance(name, str):
            name = name.encode("utf-8")
        return RemoteReference(None, self, name, False)

    # Cached objects

    def cachedRemotelyAs(self, instance: Any, incref: bool = False) -> int | None:
        """
        The luid the peer knows ``instance`` (a Cacheable) by, counting one more handle if
        ``incref``; ``None`` if the peer holds no copy.
        """
        luid = self.remotelyCachedLUIDs.get(instance.processUniqueID())
        if luid is not None and incref:
            self.remotelyCachedObjects[luid].incref()
            if self._registrations is not None:
                self._registrations.append((luid, _CACHE))
                if self._largeOut or self._afterLarge:
                    self._registrations.append((luid, _BEHIND))
        return luid

    def _farewellID(self, instance: Any) -> int | None:
        """
        The id of the copy of ``instance`` the peer dropped, while its stoppedObserving runs
        (the peer holds the copy until the uncache sent after it); else ``None``.
        """
        farewell = self._farewell
        if farewell is not None and farewell[0] is instance:
            return farewell[1]
        return None

    def cacheRemotely(self, instance: Any) -> int:
        """
        Record that the peer is getting a copy of ``instance`` and return its new luid.

        :raises Error: the peer already holds as many cached objects as the limits allow.
        """
        if len(self.remotelyCachedObjects) >= self.limits.cachedObjects:
            self._refuseOverLimit("cache")
        luid = self.newLocalID()
        self.remotelyCachedLUIDs[instance.processUniqueID()] = luid
        self.remotelyCachedObjects[luid] = Local(instance, self.serializingPerspective)
        if self._registrations is not None:
            self._registrations.append((luid, _CACHE))
            self._registrations.append((luid, _FIRST))
        return luid

    def forgetRemoteCache(self, luid: int) -> None:
        """
        Undo :meth:`cacheRemotely` for a copy that was never sent (making its state failed).
        """
        local = self.remotelyCachedObjects.pop(luid, None)
        if local is not None:
            self.remotelyCachedLUIDs.pop(local.object.processUniqueID(), None)

    def remotelyCachedForLUID(self, luid: int) -> Any:
        """
        Our Cacheable whose copy the peer knows as ``luid``.
        """
        return self.remotelyCachedObjects[luid].object

    def cacheLocally(self, cid: int, instance: Any) -> None:
        """
        Keep the copy of the peer's Cacheable ``cid``.

        :raises LimitExceeded: this side already keeps ``limits.importedReferences`` copies;
            the value naming this one is refused, which releases it (its owner is sent a
            ``decache``).
        :raises ~pbroker.errors.InvalidJelly: this side keeps a copy of ``cid`` already (an
            owner sends the first copy once, and names it ``cached`` after); the value is
            refused, and the copy kept stays the one the owner's messages reach.
        """
        if cid in self.locallyCachedObjects:
            raise InvalidJelly(f"a second first copy of the peer's cache {cid}")
        limit = self.limits.importedReferences
        if len(self.locallyCachedObjects) >= limit:
            self._log.warn(
                "Refusing a cache copy from the peer: this side already keeps {count}",
                count=len(self.locallyCachedObjects),
            )
            raise LimitExceeded(f"the peer sent more than {limit} cache copies")
        self.locallyCachedObjects[cid] = instance
        if self._arrivals is not None:
            self._arrivals.append((cid, _CACHE))

    def cachedLocallyAs(self, cid: Any) -> Any:
        """
        Our copy of the peer's Cacheable ``cid``, or ``None``.
        """
        return self.locallyCachedObjects.get(cid) if type(cid) is int else None

    def decCacheRef(self, objectID: int) -> None:
        """
        Tell the peer one handle on our copy of its Cacheable ``objectID`` is gone.
        """
        if not self._canSend:
            return
        self._sendRelease(b"decache", objectID)

    def _stopObserving(self, local: Local, farewellID: int | None = None) -> None:
        """
        Tell a Cacheable its copy is going. With ``farewellID`` (the peer still holds the
        copy until the ``uncache`` sent after this) its observers (the one it is given, or
        one it kept) reach the copy until it returns, so it can send a last call, as in
        Twisted.
        """
        cacheable = local.object
        observer = RemoteCacheObserver(self, cacheable, local.perspective)
        outer = self._farewell
        if farewellID is not None:
            # Any observer of it, not only the one given: the one the owner kept from
            # getStateToCacheAndObserveFor too, as in Twisted.
            self._farewell = (cacheable, farewellID)
        try:
            cacheable.stoppedObserving(local.perspective, observer)
        except Exception:
            self._log.failure("Error in stoppedObserving")
        finally:
            self._farewell = outer

    # Receiving

    def expressionReceived(self, expression: Any) -> None:
        if type(expression) is not list or not expression:
            self._fail(f"a PB message must be a non-empty list: {describe(expression)}")
            return
        command = expression[0]
        try:
            entry = self.messageHandlers[command]  # (keys are bytes)
        except (KeyError, TypeError):  # unknown, or not even hashable
            if type(command) is not bytes and (type(command) is not str or self._codec is None):
                # Not a command at all (a number, a list...): the message is malformed, as
                # Twisted's broker finds too (it cannot decode it).
                self._fail(f"a PB message's command must be a byte string: {describe(expression)}")
                return
            size = (
                len(command)
                if type(command) is bytes
                else len(str(command).encode("utf-8", "surrogatepass"))
            )
            if size > _MAX_COMMAND_SIZE:
                # Not a command any peer has: not echoed back, it could be over the limit.
                self._fail(f"an unknown command of {size} bytes")
                return
            stock = self._stockHandler(command)
            if stock is None:
                self._logRefusal(
                    self._log.info,
                    "Did not understand PB command {command}",
                    command=describe(command),
                )
                # (A native peer that sent its command as msgpack text, not bin, is told so
                # too, with the command as it sent it.)
                self.sendCall(b"didNotUnderstand", command)
                return
            entry = stock
        handler, arity = entry
        if len(expression) - 1 != arity and arity >= 0:
            self._fail(f"a {describe(command)} message has {arity} fields: {describe(expression)}")
            return
        try:
            handler(self, *expression[1:])
        except ProtocolError as e:
            self._fail(str(e))
        except LimitExceeded as e:
            # What the message made this side send is over the peer's limit, where a call's
            # answer would have become an error: the peer's doing.
            self._fail(f"the answer to a {describe(command)} message: {e}")

    def _stockHandler(self, command: Any) -> tuple[Handler, int] | None:
        """
        The handler of ``command``, a message not in :attr:`messageHandlers`, if this
        broker has a method ``proto_<command>`` for it, as Twisted's broker looks for one
        (defined, inherited or set on the broker; ``proto_x = None`` switches ``x`` off).
        """
        if type(command) is not bytes:
            return None
        try:
            name = "proto_" + command.decode("utf-8")
        except UnicodeDecodeError:
            return None
        method = getattr(self, name, None)
        if not callable(method):
            return None
        return functools.partial(_handleStock, name, method), -1

    def _version(self, version: Any) -> None:
        if version != self.version:
            raise ProtocolError(f"Version Incompatibility: {self.version} {describe(version)}")

    def _didNotUnderstand(self, *fields: Any) -> None:
        # (Fields after the command are a later version's, and ignored.)
        if not fields:
            raise ProtocolError("a didNotUnderstand message without the command")
        command = fields[0]
        if type(command) is bytes and command in _BUILT_IN_COMMANDS:
            # A message of the dialect itself (a call with a timeout or annotations, to a
            # peer without callctx, say): a peer that cannot take it cannot keep its side of
            # the connection. Its calls would wait for ever, and what they hold stay held.
            self._lostReason = (
                f"the peer does not understand {describe(command)}, a message of the "
                f"{describe(self.currentDialect)} dialect"
            )
            self._fail(self._lostReason)
            return
        self._logRefusal(
            self._log.warn, "The peer did not understand {command}", command=describe(command)
        )

    def _cacheMessage(self, *fields: Any) -> None:
        self._message(*fields, cache=True)

    def _callContext(self, requestID: int, wire: Any) -> _context.CallContext:
        # (Keys a later version adds are ignored; no annotations is none.)
        annotations = wire.get("annotations", {}) if type(wire) is dict else None
        timeout = wire.get("timeout") if type(wire) is dict else None
        if type(annotations) is not dict or not (
            timeout is None or (type(timeout) in (int, float) and timeout > 0)
        ):
            raise ProtocolError(f"a malformed call context: {describe(wire)}")
        deadline = None if timeout is None else self.clock.seconds() + timeout
        return _context.CallContext(annotations, deadline, requestID, self)

    def _message(
        self,
        requestID: Any,
        objectID: Any,
        message: Any,
        answerRequired: Any,
        netArgs: Any,
        netKw: Any,
        context: Any = None,
        *,
        cache: bool = False,
    ) -> None:
        """
        Run a call the peer made (on an exported object, or with ``cache`` on a cache copy, for
        ``cachemessage``; ``context`` comes with ``callctx``) and send its answer or error.
        """
        # (A request id keys tables: beyond ID_LIMIT, or negative, ids could share a hash.)
        if not (type(requestID) is int and 0 <= requestID < ID_LIMIT) or type(message) is not bytes:
            raise ProtocolError(f"malformed message header: {describe([requestID, message])}")
        if type(answerRequired) is int and answerRequired > 1 and self._codec is not None:
            if answerRequired & 2:
                # A large call whose caller counts it until we take it (see _startableLarge).
                self.sendCall(b"taken", requestID)
            answerRequired &= 1  # (bits of later versions' are ignored: see docs/native.rst)
        answerRequired = bool(answerRequired)
        if answerRequired and (requestID in self._answering or requestID in self._detached):
            raise ProtocolError(f"the peer reused the id {requestID} of a call still in progress")
        inProgress = len(self._answering) + self._oneWayPending
        if inProgress >= self.limits.pendingCalls:
            self._logRefusal(
                self._log.warn,
                "Refusing a call: {count} calls from the peer are still in progress",
                count=inProgress,
            )
            self._dropLateValue(netArgs)  # releasing the references and streams in them
            self._dropLateValue(netKw)
            if answerRequired:
                error = LimitExceeded(f"more than {self.limits.pendingCalls} calls in progress")
                self._sendError(CopyableFailure(error), requestID)
            return
        token = None
        # Calls the method makes from now on come before its answer (see _orderedCallUnsent).
        since = self._queueSerial
        if context is not None:
            callContext = self._callContext(requestID, context)
            if answerRequired:
                self._callContexts[requestID] = callContext
            token = _context._current.set(callContext)
        try:
            try:
                name = message.decode("utf-8")
            except UnicodeDecodeError:
                self._dropLateValue(netArgs)  # as below
                self._dropLateValue(netKw)
                raise Error(f"a method name must be UTF-8, not {describe(message)}") from None
            if context is not None and self._refusedKinds:
                try:
                    # The annotations are refused as the arguments would be.
                    _checkKinds(callContext.annotations, self._refusedKinds)
                except InsecureJelly:
                    self._dropLateValue(netArgs)  # as below
                    self._dropLateValue(netKw)
                    raise
            if type(objectID) not in (int, bytes):
                target = None
            elif cache:
                target = self.cachedLocallyAs(objectID)
            else:
                target = self.localObjectForID(objectID)
            if target is None:
                self._dropLateValue(netArgs)  # as above
                self._dropLateValue(netKw)
                raise Error("Invalid Object ID")
            self._callArgs = netArgs
            result = target.remoteMessageReceived(self, name, netArgs, netKw)
        except Error as e:
            if not answerRequired:
                # No caller will see it (a quiet failure is the caller's business): logged,
                # as a one-way call whose Deferred fails is, and as stock PB logs it.
                self._logOneWayFailure(Failure())  # (and what a hook completed goes)
            elif isinstance(e, Jellyable) or self.security.isClassAllowed(e.__class__):
                self._sendError(e, requestID, since)
            else:
                self._sendError(CopyableFailure(e), requestID, since)
            return
        except (InsecureJelly, LimitExceeded) as e:
            # The peer sent what this side refuses to take: its mistake, one log line.
            self._logRefusal(
                self._log.warn,
                "Refused a call to {method}: {error}",
                method=describe(message),
                error=str(e),
            )
            if answerRequired:
                self._sendError(CopyableFailure(e), requestID, since)
            else:
                self._sendPostponed()
            return
        except Exception:
            failure = CopyableFailure()
            if not answerRequired:
                self._logOneWayFailure(failure)  # nothing goes to the peer
                return
            if failure.check(*self.quietFailures) is None:
                self._logFailure("Peer will receive the following PB traceback", failure)
            self._sendError(failure, requestID, since)
            return
        finally:
            self._callArgs = None
            if token is not None:
                _context._current.reset(token)
        if not answerRequired:
            # The result is not sent: what serialising it exported is not exported.
            if type(result) not in _SERIALIZED and isinstance(result, Deferred):
                # Counted until it fires: at once if it has its result, or later if it
                # has one but waits on another Deferred.
                self._oneWayPending += 1
                result.addBoth(self._oneWayDone)
                result.addCallbacks(self._dropResult, self._logOneWayFailure)
            else:
                self._dropResult(result)
            return
        if type(result) not in _SERIALIZED and isinstance(result, Deferred):
            self._answering[requestID] = result
            result.addCallbacks(
                self._sendAnswer,
                self._sendFailureOrError,
                callbackArgs=(requestID, since),
                errbackArgs=(requestID, since),
            )
        else:
            self._sendAnswer(result, requestID, since)

    def _cancel(self, requestID: Any) -> None:
        """
        The peer gave up on its call ``requestID``: cancel the Deferred its method returned.
        The peer still gets one error (or the answer, if it was already on its way).
        """
        pending = self._answering.get(requestID) if type(requestID) is int else None
        if pending is None:
            return
        if cannotStop(pending):
            # A Deferred without a canceller (deferToThread's, a database query's) would
            # only fail now, its work going on unseen: a peer could start work without end,
            # call after cancelled call. The peer gets its CancelledError now, and the call
            # counts against pendingCalls, as a one-way call's does, until the work ends.
            if self._detached is _NO_MEMBERS:
                self._detached = set()
            self._detached.add(requestID)
            self._oneWayPending += 1
            self._sendError(CopyableFailure(CancelledError()), requestID)
            return
        try:
            pending.cancel()
        except Exception:
            # The method's canceller raised: the application's error, logged as a method's
            # would be, and the peer still gets its one error (Deferred.cancel() fails the
            # Deferred only after a canceller that returns).
            self._logFailure("The canceller of a call the peer cancelled failed", Failure())
            if not pending.called:
                pending.errback(Failure(CancelledError()))

    def _dropResult(self, netResult: Any) -> None:
        """
        Let go of the serialised result of a one-way call, which is not sent.
        """
        self._unregisterUnsent(netResult)
        if self._postponed:
            self._sendPostponed()

    def _logRefusal(self, log: Callable[..., None], format: str, **fields: Any) -> None:
        """
        Log, in one line, a refusal of what the peer sent (a call it may not make, a command
        it does not know): the first :data:`REFUSALS_LOGGED` of a connection, then that more
        go unlogged, and their count when it ends. A peer repeating a refused message must
        not fill the log.
        """
        self._refusals += 1
        if self._refusals <= REFUSALS_LOGGED:
            log(format, **fields)
        elif self._refusals == REFUSALS_LOGGED + 1:
            self._log.warn(
                "More refusals of what the peer sent are not logged on this connection: "
                "their count is, when it ends"
            )

    def _endDetached(self, requestID: int) -> None:
        """
        A call the peer cancelled whose Deferred could not be cancelled has ended (see
        _cancel): it no longer counts against pendingCalls.
        """
        self._detached.discard(requestID)
        self._oneWayPending -= 1

    def _oneWayDone(self, result: Any) -> Any:
        self._oneWayPending -= 1
        return result

    def _logOneWayFailure(self, failure: Failure) -> None:
        """
        Log the failure of a one-way call, which no caller will see: the caller's business
        (a pb.Error, a method or object that does not exist) in one line, anything else with
        its traceback.
        """
        if failure.check(*self.quietFailures) is not None:
            kind = failure.type.__name__ if isinstance(failure.type, type) else str(failure.type)
            self._logRefusal(
                self._log.warn,
                "A one-way remote call failed: {error}",
                error=f"{kind}: {failure.getErrorMessage()}",
            )
        else:
            self._logFailure("A one-way remote call failed", failure)
        if self._postponed:
            self._sendPostponed()

    def _sendAnswer(self, netResult: Any, requestID: int, since: int | None = None) -> None:
        """
        Send the answer to the peer's call ``requestID``; behind the ordered calls this side
        queued after serial ``since`` (when the call arrived) that are not written yet.
        """
        if self._detached and requestID in self._detached:
            self._endDetached(requestID)
            self._dropResult(netResult)  # (answered already: cancelled)
            return
        self._answering.pop(requestID, None)
        callContext = self._callContexts.pop(requestID, None)
        registrations = None if self._lastRegistered is None else self._takeRegistrations(netResult)
        if self.disconnected:
            # Made after the connection was lost, so in tables already emptied.
            self._unregister(registrations)
            self._dropStreamsIn(netResult)
            return
        # Reply annotations travel in the native dialect only.
        reply = callContext.reply if callContext is not None and self.isNative else None
        if reply:
            try:
                _context._checkReply(reply)
            except (TypeError, ValueError) as e:
                # The method's mistake, found once it has answered: its caller gets the error
                # a context like this gets, and the log one line (a traceback would show only
                # this check, not the method).
                self._log.error(
                    "Not sending the answer to call {requestID}: {error}",
                    requestID=requestID,
                    error=str(e),
                )
                refusal = CopyableFailure(e)
                self._unregister(registrations, refusal)
                self._dropStreamsIn(netResult, refusal)
                self._sendError(refusal, requestID, since)  # where the answer would go
                return
        needs = self._answerNeeds(since)
        try:
            if reply:
                if needs or self._behindLarge(registrations):
                    self._sendBehindLarge(
                        b"answerctx",
                        requestID,
                        netResult,
                        reply,
                        forPeer=True,
                        keys=self._keysOf(registrations, needs),
                    )
                else:
                    self.sendCall(b"answerctx", requestID, netResult, reply)
            elif needs or self._behindLarge(registrations):
                keys = self._keysOf(registrations, needs)
                self._sendBehindLarge(b"answer", requestID, netResult, forPeer=True, keys=keys)
            elif self._codec is not None:  # sendCall's work, without its two steps
                self._writePayload(
                    self._nativePayload([b"answer", requestID, netResult], type(netResult) is bytes)
                )
            else:
                self.sendCall(b"answer", requestID, netResult)
        except Exception:
            # The result cannot be sent (too large, say): the caller gets that instead.
            failure = Failure()
            self._unregister(registrations, failure)
            self._dropStreamsIn(netResult, failure)
            self._sendFailureOrError(failure, requestID, since)
        if self._postponed:
            self._sendPostponed()

    def _answerNeeds(self, since: int | None) -> tuple[tuple[int, Any], ...]:
        """
        What the answer to a call that arrived at serial ``since`` needs (see
        :meth:`_orderedCallUnsent`): the ordered calls before it, if one made since is not
        written yet.
        """
        if since is not None and self._lastOrderedCall > since and self._orderedCallUnsent(since):
            return (_IN_ORDER,)
        return ()

    def _sendFailureOrError(
        self, failure: Failure, requestID: int, since: int | None = None
    ) -> None:
        if self._detached and requestID in self._detached:
            self._endDetached(requestID)
            self._logOneWayFailure(failure)  # (answered already: cancelled)
            return
        if failure.check(*self.quietFailures) is None:
            if self.disconnected and failure.check(PBConnectionLost):
                # It failed because the connection was lost (an argument stream it read, a
                # call it made back): that is the news, not a traceback.
                self._log.info(
                    "A call from a peer now disconnected failed: {error}",
                    error=failure.getErrorMessage(),
                )
            elif self.disconnected:
                # Nobody will receive it: say so, rather than that the peer will.
                self._logFailure("A call from a peer now disconnected failed", failure)
            else:
                self._logFailure("Peer will receive the following PB traceback", failure)
        self._sendError(failure, requestID, since)

    def _sendError(self, failure: Any, requestID: int, since: int | None = None) -> None:
        self._answering.pop(requestID, None)
        self._callContexts.pop(requestID, None)
        if self.disconnected:
            return
        self._sendFailure(self.sendCall, b"error", requestID, failure, self._answerNeeds(since))

    def _sendFailure(
        self,
        send: Callable[..., None],
        command: bytes,
        key: int,
        failure: Any,
        needs: tuple[tuple[int, Any], ...] = (),
    ) -> None:
        """
        Send ``failure`` in a ``command`` message about ``key`` (a call's error, a stream's)
        with ``send``; if it is larger than the peer accepts, a :class:`LimitExceeded` that
        says so goes instead, so that the peer learns how its call or stream ended and the
        connection stays up.
        """
        netFailure = self._serializeFailure(failure)
        registrations = self._takeRegistrations(netFailure)
        if send == self._sendBehindLarge:  # a stream's error, after its items
            send = functools.partial(send, keys=self._streamKeys(key, registrations))
        elif send == self.sendCall and (needs or self._behindLarge(registrations)):
            # It names a cache handle (see _behindLarge), or follows a call this side made
            # since the peer's call arrived (see _orderedCallUnsent); an error for that call.
            keys = self._keysOf(registrations, needs)
            send = functools.partial(self._sendBehindLarge, forPeer=True, keys=keys)
        try:
            send(command, key, netFailure)
        except LimitExceeded as e:
            self._unregister(registrations)
            value = failure.value if isinstance(failure, Failure) else failure
            name = type(value).__name__
            if len(name) > 100:
                name = name[:100] + "..."  # what goes instead must fit the peer's limit
            self._log.warn(
                "Could not send a {name} error to the peer: {error}", name=name, error=str(e)
            )
            what = "stream" if command == b"streamerror" else "call"
            instead = LimitExceeded(
                f"the {what} failed with {name}, an error too large to send: {e}"
            )
            send(command, key, self._serializeFailure(Failure(instead)))
        if self._postponed:
            self._sendPostponed()  # what a hook in the error completed goes after it

    def _serializeFailure(self, failure: Any) -> Any:
        """
        What is sent for an error: the exception itself if it may be copied, else a copy of
        the failure (with its traceback only if the factory allows unsafe tracebacks).
        """
        if isinstance(failure, Failure):
            value = failure.value
            if isinstance(value, Jellyable) or self.security.isClassAllowed(value.__class__):
                failure = value
            elif not isinstance(failure, CopyableFailure):
                failure = failure2Copyable(failure, self._unsafeTracebacks())
        if isinstance(failure, CopyableFailure):
            failure.unsafeTracebacks = self._unsafeTracebacks()
        try:
            return self.serialize(failure)
        except Exception:
            self._log.failure("Could not send an error to the peer")
            return self.serialize(failure2Copyable(Failure(), self._unsafeTracebacks()))

    def _unserializeFailure(self, netFailure: Any) -> Failure:
        try:
            failure = self.unserialize(netFailure)
        except Exception:
            return Failure()
        if isinstance(failure, Failure):
            return failure
        if isinstance(failure, BaseException):
            return Failure(failure)
        return Failure(Error(f"the peer sent a non-exception error: {describe(failure)}"))

    def _unsafeTracebacks(self) -> bool:
        return bool(getattr(self.factory, "unsafeTracebacks", False))

    def _lateAnswer(self, requestID: Any) -> None:
        """
        An answer (or error) came for ``requestID`` and no call waits for it: fine for a call
        this side cancelled, a protocol error otherwise.
        """
        if type(requestID) is int:
            if requestID in self._abandoned:
                self._abandoned.discard(requestID)
                return  # the answer to a call this side cancelled
            if self._abandonedOverflow and 0 < requestID <= self.currentRequestID:
                return  # too many were cancelled to remember each one
        raise ProtocolError(f"an answer to a request never made: {describe(requestID)}")

    def _answer(self, requestID: Any, netResult: Any) -> None:
        deferred = self.waitingForAnswers.pop(requestID, None) if type(requestID) is int else None
        if deferred is None:
            self._lateAnswer(requestID)
        if self._replyTargets:
            self._replyTargets.pop(requestID, None)
        if deferred is None:
            self._dropLateValue(netResult)
            return
        try:
            result = self.unserialize(netResult)
        except Exception:  # refused or over a limit: this call fails, the link stays
            if not deferred.called:
                deferred.errback()
        else:
            # Application code run by unjellying (a copy's setCopyableState) may have
            # cancelled the call: its caller has its CancelledError, the answer is dropped.
            if not deferred.called:
                deferred.callback(result)

    def _answerWithContext(self, requestID: Any, netResult: Any, reply: Any) -> None:
        target = self._replyTargets.get(requestID) if type(requestID) is int else None
        if target is not None and type(reply) is dict:
            if self._refusedKinds:
                try:
                    _checkKinds(reply, self._refusedKinds)
                except InsecureJelly:
                    # Refused as the answer's value would be: the call fails with it.
                    deferred = self.waitingForAnswers.pop(requestID, None)
                    self._replyTargets.pop(requestID, None)
                    self._dropLateValue(netResult)
                    if deferred is not None and not deferred.called:
                        deferred.errback()
                    return
            target.update(reply)
        self._answer(requestID, netResult)

    def _error(self, requestID: Any, netFailure: Any) -> None:
        deferred = self.waitingForAnswers.pop(requestID, None) if type(requestID) is int else None
        if deferred is None:
            self._lateAnswer(requestID)
        if self._replyTargets:
            self._replyTargets.pop(requestID, None)
        if deferred is not None:
            failure = self._unserializeFailure(netFailure)
            if not deferred.called:  # else cancelled while unjellied, as in _answer
                deferred.errback(failure)
        else:
            self._dropLateValue(netFailure)

    def _dropLateValue(self, netValue: Any) -> None:
        """
        A value this side will not use (the answer to a call it gave up on, the arguments of
        a call it refused): decoded all the same, then dropped, so that the references in it
        are counted and released, its streams cancelled, and a first copy of a cache kept
        for the handles on it that may follow. (If it cannot be decoded, unserialize
        releases what it holds.)
        """
        with contextlib.suppress(Exception):
            self.unserialize(netValue)

    def _hello(self, capabilities: Any) -> None:
        if type(capabilities) is not dict:
            raise ProtocolError(f"a malformed hello: {describe(capabilities)}")
        # A key left out says nothing (a later hello may give only what is new).
        self._setPeerLimits(
            capabilities.get("messageSize", _UNSET), capabilities.get("taken", _UNSET)
        )
        if self._factoryWaitsForHello:
            self._factoryWaitsForHello = False
            if self.factory is not None:
                self.factory.clientConnectionMade(self)

    def _decref(self, objectID: Any) -> None:
        local = self.localObjects.get(objectID) if type(objectID) is int else None
        if local is None:
            raise ProtocolError(f"decref of an unknown object id: {describe(objectID)}")
        self._releaseLocal(objectID, local)

    def _releaseLocal(self, luid: int, local: Local) -> None:
        """
        Count one reference fewer to the export ``luid``; at none, stop exporting it.
        """
        if local.decref() == 0:
            del self.localObjects[luid]
            puid = local.object.processUniqueID()
            self.luids.pop(puid, None)
            cleanup = self.localCleanup.pop(puid, None)
            if cleanup is not None:
                # The application's: a raising one is logged, not let out of dataReceived
                # (or out of a release loop, leaving the rest exported).
                try:
                    cleanup()
                except Exception:
                    self._log.failure("Error in the cleanup of an export")

    def _decache(self, objectID: Any) -> None:
        local = self.remotelyCachedObjects.get(objectID) if type(objectID) is int else None
        if local is None:
            raise ProtocolError(f"decache of an unknown cache id: {describe(objectID)}")
        if local.decref() == 0:
            del self.remotelyCachedObjects[objectID]
            self.remotelyCachedLUIDs.pop(local.object.processUniqueID(), None)
            self._stopObserving(local, farewellID=objectID)
            # Behind any large cache message to the copy still being sent.
            keys = _needing((_OURS, objectID))
            self._sendBehindLarge(b"uncache", objectID, forPeer=True, keys=keys)

    def _uncache(self, objectID: Any) -> None:
        cache = self.locallyCachedObjects.pop(objectID, None) if type(objectID) is int else None
        if cache is None:
            if self._unreadCaches is not None and objectID in self._unreadCaches:
                self._unreadCaches.discard(objectID)
                return  # a first copy this side released unread
            raise ProtocolError(f"uncache of an unknown cache id: {describe(objectID)}")
        cache.broker = None
        if self._keptReleases:
            self._emptyKeptDecache(objectID)

    #: command -> (handler, number of fields, or -1 for any number: the handler checks).
    #: Subclasses extend a copy for new messages, or define stock-style ``proto_<command>``
    #: methods, which handle the messages not in the table.
    messageHandlers: ClassVar[dict[bytes, tuple[Handler, int]]] = {
        b"version": (_version, 1),
        b"didNotUnderstand": (_didNotUnderstand, -1),
        b"message": (_message, 6),
        b"cachemessage": (_cacheMessage, 6),
        b"decache": (_decache, 1),
        b"uncache": (_uncache, 1),
        b"answer": (_answer, 2),
        b"error": (_error, 2),
        b"decref": (_decref, 1),
        # pbroker's own messages (a stock Twisted peer never receives them, except ping)
        b"hello": (_hello, 1),
        b"callctx": (_message, 7),
        b"cachecallctx": (_cacheMessage, 7),
        b"answerctx": (_answerWithContext, 3),
        b"taken": (_taken, 1),
        b"cancel": (_cancel, 1),
        b"ping": (_ping, 1),
        b"pong": (_pong, 1),
        b"credit": (_credit, 2),
        b"item": (_item, 2),
        b"end": (_end, 1),
        b"streamerror": (_streamError, 2),
        b"streamcancel": (_streamCancel, 1),
    }
    #: command -> a bit for each of its fields that is a value the handler unserialises: in the
    #: native dialect such a field, if large, is handed over as a memoryview of the bytes read
    #: rather than a copy (a subclass's handler of one of these commands gets that too).
    #: Subclasses whose new messages carry values may extend a copy.
    valueFields: ClassVar[dict[bytes, int]] = VALUE_FIELDS


# The messages Broker handles itself (a subclass's proto_ method for one is never called),
# which a peer that does not understand cannot keep its side of the connection without.
_BUILT_IN_COMMANDS: Final = frozenset(Broker.messageHandlers)
