"""
The jellying direction: an object graph becomes an s-expression of lists, bytes and numbers.

The walk is iterative: containers are visited depth first through an explicit stack, so any
nesting depth works without recursion, and atoms inside a container are handled inline. The
output is byte-for-byte what Twisted 26.10 produces for the same graph (reference ids are given
out in the order objects are met a second time), except where Twisted is buggy: the names in
``function``, ``module`` and ``method`` tags are sent as bytes, which banana can carry.

Objects that jelly themselves (:class:`Jellyable`) take part through the same public hooks
Twisted gives them: ``jellier.prepare``, ``jellier.preserve``, ``jellier.jelly``,
``jellier.unpersistable`` and ``jellier.invoker``.
"""

from __future__ import annotations

import datetime
import functools
import struct
import types
from collections.abc import Callable, Iterator
from itertools import chain, repeat
from typing import TYPE_CHECKING, Any

from pbroker import _accelerator
from pbroker._jellycore import DummySecurityOptions, ISecurityOptions, SecurityOptions, qual
from pbroker.banana import Tokens, encode, getTokens
from pbroker.errors import InsecureJelly, JellyError

if TYPE_CHECKING:
    import decimal

__all__ = ["Jellier", "Jellyable", "getInstanceState"]

#: Exact types jellied as dictionaries (other mappings travel as instances, as in Twisted).
DictTypes = (dict,)

# Types the inline fast path handles; it is used only when the security options allow all.
_FAST_TYPES: tuple[type, ...] = (int, bytes, float, str, type(None), bool)

_PERMISSIVE_TASTERS = (DummySecurityOptions, SecurityOptions)

# The length of b"unpersistable", the longest tag the bytes walk writes.
_LONGEST_TAG = 13

_UNICODE = b"unicode"
_NONE = b"None"
_FLOAT = b"\x84"
_packFloat = struct.Struct(">d").pack


class Jellyable:
    """
    Inherit from me to control how instances are jellied.

    By default an instance is sent as ``[<full class name>, <jellied getStateFor()>]``; override
    :meth:`getStateFor` to choose the state, or :meth:`jellyFor` to choose the whole expression.
    """

    def getStateFor(self, jellier: Jellier) -> Any:
        """
        The state to send for this object; by default its ``__dict__``.
        """
        return self.__dict__

    def jellyFor(self, jellier: Jellier) -> Any:
        """
        The s-expression for this object. Shared and cyclic references to it keep working as
        long as the expression is made between ``jellier.prepare(self)`` and
        ``jellier.preserve(self, sexp)``.
        """
        sexp = jellier.prepare(self)
        sexp.extend([qual(type(self)).encode("utf-8"), jellier.jelly(self.getStateFor(jellier))])
        return jellier.preserve(self, sexp)


def getInstanceState(inst: object, jellier: Jellier) -> Any:
    """
    Jelly ``inst`` the default way, from ``__getstate__()`` or ``__dict__``; a helper for
    ``jellyFor`` implementations.
    """
    sexp = jellier.prepare(inst)
    sexp.extend([qual(type(inst)).encode("utf-8"), jellier.jelly(_stateOf(inst))])
    return jellier.preserve(inst, sexp)


def _stateOf(inst: object) -> Any:
    getState = getattr(inst, "__getstate__", None)
    if getState is not None:
        return getState()
    return inst.__dict__


class _Descend:
    """
    A container met by the s-expression walk: its expression so far and the children still to
    jelly into it.
    """

    __slots__ = ("isDict", "items", "obj", "sexp")

    def __init__(self, obj: object, sexp: list[Any], items: Iterator[Any], isDict: bool) -> None:
        self.obj = obj
        self.sexp = sexp
        self.items = items
        self.isDict = isDict


# Returned by Jellier._leaf for values jellied as containers, which each walker opens its way.
_CONTAINER: Any = object()
# Marks the start of a dictionary entry in the flattened stream the bytes walker reads.
_PAIR: Any = object()

_CONTAINER_TAGS: dict[type, bytes] = {
    list: b"list",
    tuple: b"tuple",
    dict: b"dictionary",
    set: b"set",
    frozenset: b"frozenset",
}


class _JellyTokens:
    """
    The banana tokens the bytes walker writes, for one :class:`~pbroker.banana.Tokens`.
    """

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        # With a size limit below the longest tag (13 bytes) these constants cannot be made;
        # the bytes walk is then not used, and the long way checks every string as it goes.
        self.usable = tokens.sizeLimit >= _LONGEST_TAG
        symbol = tokens.symbol if self.usable else getTokens(tokens.dialect).symbol
        self.unicodePrefix = b"\x02\x80" + symbol(_UNICODE)
        self.none = b"\x01\x80" + symbol(_NONE)
        self.true = b"\x02\x80" + symbol(b"boolean") + symbol(b"true")
        self.false = b"\x02\x80" + symbol(b"boolean") + symbol(b"false")
        self.tags = {kind: symbol(tag) for kind, tag in _CONTAINER_TAGS.items()}
        self.reference = b"\x03\x80" + symbol(b"reference")
        self.dereference = b"\x02\x80" + symbol(b"dereference")
        self.persistent = b"\x02\x80" + symbol(b"persistent")
        self.unpersistable = b"\x02\x80" + symbol(b"unpersistable")
        # The C leaf writer, when the extension is in use: it takes the common leaves off the
        # bytes walk (see _emit).
        self.leaves: Callable[[Iterator[Any], list[Any]], Iterator[Any]] | None = None
        if _accelerator.speedups is not None:
            self.leaves = _accelerator.speedups.Leaves(
                tokens.symbols,
                tokens.fastIntLimit,
                len(tokens.stringHeaders),
                self.unicodePrefix,
                self.none,
                self.true,
                self.false,
                _PAIR,
            )
        # What the bytes walk keeps in locals, unpacked in one step.
        self.hot = (
            tokens,
            tokens.symbols,
            tokens.smallInts,
            len(tokens.smallInts),
            tokens.fastIntLimit,
            tokens.stringHeaders,
            len(tokens.stringHeaders),
            self.unicodePrefix,
            self.none,
            self.tags,
        )


def _encodeWithin(tokens: Tokens, expression: Any) -> bytes:
    """
    The banana bytes of ``expression`` in ``tokens``' dialect, within its size and prefix
    limits.
    """
    return encode(
        expression, tokens.dialect, sizeLimit=tokens.sizeLimit, prefixLimit=tokens.prefixLimit
    )


@functools.lru_cache(maxsize=32)
def _jellyTokens(tokens: Tokens) -> _JellyTokens:
    return _JellyTokens(tokens)


class Jellier:
    """
    The state of one top-level jelly call: the objects met so far and the references made.

    Created by :func:`pbroker.jelly.jelly`; a ``jellyFor`` method receives it.

    :ivar invoker: the broker on whose behalf the call runs, or ``None``.
    :ivar taster: the security options in force.
    """

    def __init__(
        self,
        taster: ISecurityOptions,
        persistentStore: Callable[[Any, Jellier], Any] | None = None,
        invoker: Any = None,
    ) -> None:
        self.taster = taster
        self.persistentStore = persistentStore
        self.invoker = invoker
        # id -> what was emitted for an object met once: its expression (a list) in the
        # s-expression walk, or the index of its header chunk in the bytes walk.
        self.preserved: dict[int, Any] = {}
        # id -> the dereference expression of an object that has been given a reference id.
        self.cooked: dict[int, list[Any]] = {}
        # Keeps every object met alive for the whole call, so that no id() is reused.
        self.cooker: dict[int, object] = {}
        self._nextReference = 1
        self._typeAllowed: dict[type, bool] = {}
        # The stock policies allow every type here (a qualified type name is always dotted),
        # so only a custom taster is asked about types.
        self._allTypesAllowed = type(taster) in _PERMISSIVE_TASTERS
        self._fast = self._allTypesAllowed or all(map(self._isTypeAllowed, _FAST_TYPES))
        # The chunks and tokens of a bytes walk in progress.
        self._chunks: list[Any] = []
        self._tokens: _JellyTokens | None = None
        self._hasExpressions = False

    def _isTypeAllowed(self, kind: type) -> bool:
        allowed = self._typeAllowed.get(kind)
        if allowed is None:
            allowed = self._typeAllowed[kind] = bool(
                self.taster.isTypeAllowed(qual(kind).encode("utf-8"))
            )
        return allowed

    def prepare(self, obj: object) -> list[Any]:
        """
        Note that ``obj`` is being jellied and return a fresh list to build its expression in.
        """
        self.preserved[id(obj)] = []
        self.cooker[id(obj)] = obj
        return []

    def preserve(self, obj: object, sexp: list[Any]) -> list[Any]:
        """
        Record ``sexp`` as the finished expression of ``obj`` and return what to emit for it:
        ``sexp`` itself, or, if ``obj`` was referenced while being built, the reference wrapper.
        """
        key = id(obj)
        if key in self.cooked:
            wrapper: list[Any] = self.preserved[key]
            wrapper[2] = sexp
            return wrapper
        self.preserved[key] = sexp
        return sexp

    def _cook(self, obj: object) -> list[Any]:
        # Turn what was already emitted for obj into [reference, id, <it>], so the earlier
        # occurrence defines the id that this and later occurrences dereference.
        key = id(obj)
        emitted = self.preserved[key]
        reference = self._nextReference
        self._nextReference += 1
        if type(emitted) is int:
            assert self._tokens is not None
            chunks = self._chunks
            wrapper = self._tokens.reference + self._tokens.tokens.integer(reference)
            chunks[emitted] = wrapper + chunks[emitted]
        else:
            emitted[:] = [b"reference", reference, list(emitted)]
        dereference = self.cooked[key] = [b"dereference", reference]
        return dereference

    def _checkMutable(self, obj: object) -> list[Any] | None:
        key = id(obj)
        dereference = self.cooked.get(key)
        if dereference is not None:
            return dereference
        if key in self.preserved:
            return self._cook(obj)
        return None

    def unpersistable(self, reason: str | bytes, sexp: list[Any] | None = None) -> list[Any]:
        """
        Append (or return) an ``unpersistable`` marker carrying ``reason``.
        """
        if sexp is None:
            sexp = []
        sexp.append(b"unpersistable")
        sexp.append(reason.encode("utf-8") if isinstance(reason, str) else reason)
        return sexp

    def jelly(self, obj: object) -> Any:
        """
        Jelly ``obj`` within this call, sharing its references. Re-entrant from ``jellyFor``.
        """
        holder: list[Any] = []
        try:
            self._walk(iter((obj,)), holder)
        except UnicodeEncodeError as e:
            raise JellyError(f"text that is not valid Unicode cannot be jellied: {e}") from None
        return holder[0]

    def encode(self, obj: object, tokens: Tokens) -> bytes:
        """
        Jelly ``obj`` straight into banana bytes: the same bytes as
        ``banana.encode(self.jelly(obj), ...)`` for the dialect and limits of ``tokens``, made
        without building the s-expression first.

        :raises BananaEncodeError: a string, list or integer beyond the limits.
        """
        jellyTokens = _jellyTokens(tokens)
        if not self._fast or self._tokens is not None or not jellyTokens.usable:
            # A custom taster that refuses basic types, a nested call, or a tiny size limit:
            # take the long way.
            return _encodeWithin(tokens, self.jelly(obj))
        self._tokens = jellyTokens
        chunks = self._chunks
        try:
            self._emit(iter((obj,)))
        except UnicodeEncodeError as e:
            raise JellyError(f"text that is not valid Unicode cannot be jellied: {e}") from None
        finally:
            self._tokens = None
            self._chunks = []
            hasExpressions, self._hasExpressions = self._hasExpressions, False
        if not hasExpressions:
            return b"".join(chunks)
        # Expressions made by jellyFor hooks are encoded last: a later reference to something
        # inside them may still rewrite them in place.
        return b"".join(
            chunk if type(chunk) is bytes else _encodeWithin(tokens, chunk) for chunk in chunks
        )

    def _walk(self, items: Iterator[Any], out: list[Any]) -> None:
        """
        Jelly every item of ``items`` into ``out``, descending into containers iteratively.
        """
        fast = self._fast
        leaf = self._leaf
        stack: list[tuple[Iterator[Any], list[Any], object, list[Any] | None, int, bool]] = []
        # The frame being filled: its items, its expression, the object to preserve when it is
        # done (None for the pairs of a dictionary), where it sits in its parent, dict or not.
        obj: object = None
        parent: list[Any] | None = None
        index = 0
        isDict = False
        while True:
            append = out.append
            descend: _Descend | None = None
            if isDict:
                for key, value in items:
                    if fast:
                        keyKind = type(key)
                        if keyKind is str:
                            jellied: Any = [_UNICODE, key.encode("utf-8")]
                        elif keyKind is int or keyKind is bytes:
                            jellied = key
                        else:
                            jellied = None
                        if jellied is not None:
                            valueKind = type(value)
                            if valueKind is int or valueKind is float or valueKind is bytes:
                                append([jellied, value])
                                continue
                            if valueKind is str:
                                append([jellied, [_UNICODE, value.encode("utf-8")]])
                                continue
                            if value is None:
                                append([jellied, [_NONE]])
                                continue
                            pair = [jellied]
                            append(pair)
                            descend = _Descend(None, pair, iter((value,)), False)
                            break
                    pair = []
                    append(pair)
                    descend = _Descend(None, pair, iter((key, value)), False)
                    break
            else:
                for item in items:
                    if fast:
                        kind = type(item)
                        if kind is int or kind is bytes or kind is float:
                            append(item)
                            continue
                        if kind is str:
                            append([_UNICODE, item.encode("utf-8")])
                            continue
                        if item is None:
                            append([_NONE])
                            continue
                        # An exact container type needs none of _leaf's checks.
                        result = _CONTAINER if kind in _CONTAINER_TAGS else leaf(item)
                    else:
                        result = leaf(item)
                    if result is _CONTAINER:
                        result = self._openExpression(item)
                        if type(result) is _Descend:
                            descend = result
                            break
                    append(result)
            if descend is None:
                # This frame is finished.
                if obj is not None:
                    final = self.preserve(obj, out)
                    if final is not out:
                        assert parent is not None
                        parent[index] = final
                if not stack:
                    return
                items, out, obj, parent, index, isDict = stack.pop()
                continue
            stack.append((items, out, obj, parent, index, isDict))
            parent = out
            index = len(out)
            if descend.obj is not None:
                append(descend.sexp)
            obj = descend.obj
            out = descend.sexp
            items = descend.items
            isDict = descend.isDict

    def _emit(self, items: Iterator[Any]) -> None:
        """
        Jelly every item of ``items`` as banana tokens into the chunk list, iteratively.
        Only used when the security options allow every basic type.
        """
        assert self._tokens is not None
        jellyTokens = self._tokens
        (
            tokens,
            symbols,
            smallInts,
            smallCount,
            fastIntLimit,
            stringHeaders,
            headerCount,
            unicodePrefix,
            noneToken,
            containerTags,
        ) = jellyTokens.hot
        chunks = self._chunks
        append = chunks.append
        leaf = self._leaf
        # With the C extension, every iterator is wrapped in a leaf writer that writes the
        # common leaves itself and passes on only the rest, which this loop then handles as
        # it handles everything without it.
        leaves = jellyTokens.leaves
        if leaves is not None:
            items = leaves(items, chunks)
        stack: list[Iterator[Any]] = []
        while True:
            for item in items:
                kind = type(item)
                if kind is int:
                    if 0 <= item < smallCount:
                        append(smallInts[item])
                    elif 0 < item < fastIntLimit:
                        if item < 0x4000:
                            append(bytes((item & 0x7F, item >> 7, 0x81)))
                        else:
                            append(bytes((item & 0x7F, (item >> 7) & 0x7F, item >> 14, 0x81)))
                    else:
                        append(tokens.integer(item))
                elif kind is str:
                    data = item.encode("utf-8")
                    # Twisted sends any string equal to a vocabulary symbol as its token,
                    # the bytes of text included.
                    token = symbols.get(data)
                    if token is not None:
                        append(unicodePrefix + token)
                        continue
                    size = len(data)
                    if size < headerCount:
                        append(unicodePrefix + stringHeaders[size])
                    else:
                        append(unicodePrefix + tokens.stringHeader(size))
                    append(data)
                elif kind is bytes:
                    token = symbols.get(item)
                    if token is not None:
                        append(token)
                    else:
                        size = len(item)
                        append(
                            stringHeaders[size] if size < headerCount else tokens.stringHeader(size)
                        )
                        append(item)
                elif item is _PAIR:
                    append(b"\x02\x80")
                elif kind is float:
                    append(_FLOAT + _packFloat(item))
                elif item is None:
                    append(noneToken)
                elif kind is bool:
                    append(jellyTokens.true if item else jellyTokens.false)
                else:
                    # An exact container type needs none of _leaf's checks.
                    result = _CONTAINER if kind in containerTags else leaf(item)
                    if result is _CONTAINER:
                        children = self._openChunks(item)
                        if children is not None:
                            stack.append(items)
                            items = children if leaves is None else leaves(children, chunks)
                            break
                    elif type(result) is list:
                        append(result)  # encoded at the end, see encode()
                        self._hasExpressions = True
                    else:
                        append(_encodeWithin(tokens, result))
            else:
                if not stack:
                    return
                items = stack.pop()

    def _leaf(self, obj: Any) -> Any:
        """
        Jelly one value in Twisted's order of checks, or return ``_CONTAINER`` for a value that
        is sent as a container (a list, tuple, dict, set, frozenset or instance).
        """
        if isinstance(obj, Jellyable):
            reference = self._checkMutable(obj)
            if reference is not None:
                return reference
            return obj.jellyFor(self)
        kind = type(obj)
        if not self._allTypesAllowed and not self._isTypeAllowed(kind):
            raise InsecureJelly(f"type {qual(kind)} is not allowed by the security options")
        if kind is bytes or kind is int or kind is float:
            return obj
        if isinstance(obj, types.MethodType):
            owner = obj.__self__
            return [
                b"method",
                obj.__func__.__name__.encode("utf-8"),
                self.jelly(owner),
                self.jelly(owner.__class__),
            ]
        if kind is str:
            return [_UNICODE, obj.encode("utf-8")]
        if obj is None:
            return [_NONE]
        if isinstance(obj, types.FunctionType):
            return [b"function", f"{obj.__module__}.{obj.__qualname__}".encode()]
        if isinstance(obj, types.ModuleType):
            return [b"module", obj.__name__.encode("utf-8")]
        if kind is bool:
            return [b"boolean", b"true" if obj else b"false"]
        if kind is datetime.datetime:
            if obj.tzinfo:
                raise JellyError(f"a timezone-aware datetime cannot be jellied: {obj!r}")
            fields: tuple[int, ...] = (
                obj.year,
                obj.month,
                obj.day,
                obj.hour,
                obj.minute,
                obj.second,
                obj.microsecond,
            )
            return [b"datetime", _joinFields(fields)]
        if kind is datetime.time:
            if obj.tzinfo:
                raise JellyError(f"a timezone-aware time cannot be jellied: {obj!r}")
            return [b"time", _joinFields((obj.hour, obj.minute, obj.second, obj.microsecond))]
        if kind is datetime.date:
            return [b"date", _joinFields((obj.year, obj.month, obj.day))]
        if kind is datetime.timedelta:
            return [b"timedelta", _joinFields((obj.days, obj.seconds, obj.microseconds))]
        if issubclass(kind, type):
            return [b"class", qual(obj).encode("utf-8")]
        if kind.__name__ == "Decimal" and kind is _decimalType():
            return _jellyDecimal(obj)
        return _CONTAINER

    def _instanceState(self, obj: Any) -> tuple[str, Any]:
        """
        How an instance is sent: ``("persistent", id)``, ``("state", state)`` or
        ``("unpersistable", reason)``.
        """
        if self.persistentStore is not None:
            persistent = self.persistentStore(obj, self)
            if persistent is not None:
                return "persistent", persistent
        if self.taster.isClassAllowed(obj.__class__):
            return "state", _stateOf(obj)
        return "unpersistable", f"instance of class {qual(obj.__class__)} deemed insecure"

    def _openExpression(self, obj: Any) -> Any:
        """
        Start the expression of a container for the s-expression walk: a finished expression
        (a dereference, or an instance sent without its state), or a :class:`_Descend`.
        """
        reference = self._checkMutable(obj)
        if reference is not None:
            return reference
        sexp = self.prepare(obj)
        kind = type(obj)
        tag = _CONTAINER_TAGS.get(kind)
        if tag is not None:
            sexp.append(tag)
            if kind is dict:
                return _Descend(obj, sexp, iter(obj.items()), True)
            return _Descend(obj, sexp, iter(obj), False)
        how, what = self._instanceState(obj)
        if how == "state":
            sexp.append(qual(obj.__class__).encode("utf-8"))
            return _Descend(obj, sexp, iter((what,)), False)
        if how == "persistent":
            sexp.extend([b"persistent", what])
        else:
            self.unpersistable(what, sexp)
        return self.preserve(obj, sexp)

    def _openChunks(self, obj: Any) -> Iterator[Any] | None:
        """
        Start the tokens of a container for the bytes walk; return the children still to
        write, or ``None`` if the container was written whole.
        """
        assert self._tokens is not None
        jellyTokens = self._tokens
        tokens = jellyTokens.tokens
        chunks = self._chunks
        key = id(obj)
        reference = self.cooked.get(key)
        if reference is None and key in self.preserved:
            reference = self._cook(obj)
        if reference is not None:
            chunks.append(jellyTokens.dereference + tokens.integer(reference[1]))
            return None
        self.preserved[key] = len(chunks)
        self.cooker[key] = obj
        kind = type(obj)
        tag = jellyTokens.tags.get(kind)
        if tag is not None:
            size = len(obj) + 1
            listHeaders = tokens.listHeaders
            if size < len(listHeaders):
                chunks.append(listHeaders[size] + tag)
            else:
                chunks.append(tokens.listHeader(size) + tag)
            if kind is dict:
                mapping: dict[Any, Any] = obj
                return chain.from_iterable(zip(repeat(_PAIR), mapping.keys(), mapping.values()))
            children: Iterator[Any] = iter(obj)
            return children
        how, what = self._instanceState(obj)
        if how == "state":
            chunks.append(b"\x02\x80" + tokens.symbol(qual(obj.__class__).encode("utf-8")))
            return iter((what,))
        if how == "persistent":
            chunks.append(jellyTokens.persistent)
            if type(what) is list:
                chunks.append(what)
                self._hasExpressions = True
            else:
                chunks.append(_encodeWithin(tokens, what))
        else:
            chunks.append(jellyTokens.unpersistable + tokens.symbol(what.encode("utf-8")))
        return None


def _joinFields(fields: tuple[int, ...]) -> bytes:
    return " ".join(map(str, fields)).encode("ascii")


def _decimalType() -> type:
    # decimal is imported only when a value of a class named Decimal is met: most programs
    # never send one, and the module costs a server ~130 KiB to import.
    import decimal

    return decimal.Decimal


def _jellyDecimal(value: decimal.Decimal) -> list[Any]:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise JellyError(f"a NaN or infinite decimal cannot be jellied: {value!r}")
    unscaled = 0
    for digit in digits:
        unscaled = unscaled * 10 + digit
    return [b"decimal", -unscaled if sign else unscaled, exponent]
