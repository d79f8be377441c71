"""
The unjellying direction: an s-expression received from a peer becomes an object graph.

Deny by default: every tag is checked against the security options, a pass-by-copy tag is
rebuilt only by the class or factory registered for it, and a module is imported (or a name
looked up in it) only when the security options allow that module. Every malformed expression
raises :class:`~pbroker.errors.InvalidJelly` with a message naming what was wrong, never an
``IndexError`` or ``TypeError`` from deep inside.

The walk is iterative, so nesting depth costs memory, not stack. Cycles through objects still
being built are handled with placeholders (:class:`_Unresolved`) that are filled in once the
object exists; a cycle that can never close (a tuple containing itself) is refused.
"""

from __future__ import annotations

import datetime
import importlib
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

from pbroker import _accelerator
from pbroker._jellycore import (
    ID_LIMIT,
    ISecurityOptions,
    UnjellyableRegistry,
    Unpersistable,
    globalRegistry,
    qual,
)
from pbroker._native import HashBudget
from pbroker.errors import InsecureJelly, InvalidJelly, describe

if TYPE_CHECKING:
    import decimal

__all__ = ["Unjellier", "Unjellyable", "setInstanceState"]


class Unjellyable:
    """
    Inherit from me to control how instances are rebuilt from ``[tag, state]``.

    The registered class is created without ``__init__`` and :meth:`unjellyFor` is called on it.
    """

    def setStateFor(self, unjellier: Unjellier, state: Any) -> None:
        """
        Install the unjellied ``state``; by default it becomes ``__dict__``.
        """
        self.__dict__ = state

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        """
        Rebuild this object from ``jellyList`` (``[tag, state]``) and return it.
        """
        _checkArity(jellyList, 2)
        self.setStateFor(unjellier, unjellier.unjelly(jellyList[1]))
        return self


def setInstanceState(inst: Any, unjellier: Unjellier, jellyList: list[Any]) -> Any:
    """
    Rebuild ``inst`` the default way from ``[tag, state]``: ``__setstate__`` or ``__dict__``.
    A helper for ``unjellyFor`` implementations.
    """
    _checkArity(jellyList, 2)
    _setState(inst, unjellier.unjelly(jellyList[1]))
    return inst


def _setState(inst: Any, state: Any) -> None:
    setState = getattr(inst, "__setstate__", None)
    try:
        if setState is not None:
            setState(state)
        elif isinstance(state, dict):
            inst.__dict__ = state
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidJelly(f"cannot install the state sent for a {qual(type(inst))}: {e}") from e


def _checkArity(node: list[Any], size: int) -> None:
    if len(node) != size:
        raise InvalidJelly(
            f"a {_tagName(node)} expression needs {size - 1} field(s), not {len(node) - 1}: "
            f"{describe(node)}"
        )


def _tagName(node: list[Any]) -> str:
    tag = node[0] if node else b""
    return describe(tag.decode("utf-8", "replace") if isinstance(tag, bytes) else tag, 60)


def _textField(node: list[Any], position: int) -> str:
    field = node[position]
    if isinstance(field, bytes):
        try:
            return field.decode("utf-8")
        except UnicodeDecodeError:
            pass
    elif isinstance(field, str):
        return field  # an in-process expression from Twisted, which puts str here
    raise InvalidJelly(f"a {_tagName(node)} expression needs UTF-8 bytes, not {describe(field)}")


def _intField(node: list[Any], position: int) -> int:
    field = node[position]
    if type(field) is not int:
        raise InvalidJelly(f"a {_tagName(node)} expression needs an integer, not {describe(field)}")
    return field


def _referenceField(node: list[Any]) -> int:
    # (They key Unjellier.references: see ID_LIMIT.)
    reference = _intField(node, 1)
    if not -ID_LIMIT < reference < ID_LIMIT:
        raise InvalidJelly(f"a {_tagName(node)} id out of range: {describe(reference)}")
    return reference


class _Unresolved:
    """
    A value that is not known yet: a dereference to an object still being built, or a
    container holding one. Places that received it are recorded as ``(container, key)`` and
    filled in by :meth:`resolve`.
    """

    __slots__ = ("dependants", "description", "resolved", "value")

    def __init__(self, description: str) -> None:
        self.description = description
        self.dependants: list[tuple[Any, Any]] = []
        self.resolved = False
        self.value: Any = None

    def addDependant(self, container: Any, key: Any) -> None:
        # Follow forwards (a placeholder resolved to another unresolved value) iteratively;
        # resolve() keeps their chains free of loops.
        node = self
        while node.resolved and isinstance(node.value, _Unresolved):
            node = node.value
        end = node.value if node.resolved else node
        self._shorten(end)
        if end is node and not node.resolved:
            node.dependants.append((container, key))
        else:
            container[key] = end

    def _shorten(self, end: Any) -> None:
        """
        Point each resolved link from here on at ``end``, so that the chain is not walked
        again: a message of chained references costs in proportion to its size.
        """
        node: Any = self
        while isinstance(node, _Unresolved) and node.resolved and node.value is not end:
            node.value, node = end, node.value

    def resolve(self, value: Any) -> None:
        end = value
        while isinstance(end, _Unresolved) and end.resolved:
            end = end.value
        if end is self:
            raise InvalidJelly(f"a reference that only ever refers to itself: {self.description}")
        self.resolved = True
        self.value = end  # the end of the chain, not the next link: chains stay short
        dependants, self.dependants = self.dependants, []
        if isinstance(end, _Unresolved):
            # Handed on whole, the shorter list into the longer: a chain of references each
            # defined as the next moves each place a few times, not once per link.
            if len(end.dependants) < len(dependants):
                end.dependants, dependants = dependants, end.dependants
            end.dependants.extend(dependants)
            return
        for container, key in dependants:
            container[key] = end

    def final(self) -> Any:
        value: Any = self
        while isinstance(value, _Unresolved):
            if not value.resolved:
                raise InvalidJelly(f"unresolvable reference: {value.description}")
            value = value.value
        self._shorten(value)
        return value


class _PendingContainer(_Unresolved):
    """
    A tuple, set or frozenset with elements still unresolved; built once they all are.
    """

    __slots__ = ("factory", "items", "missing", "unjellier")

    def __init__(
        self,
        factory: Callable[[list[Any]], Any],
        items: list[Any],
        missing: int,
        unjellier: Unjellier,
    ):
        super().__init__(f"a {factory.__name__} containing an object still being built")
        self.factory = factory
        self.items = items
        self.missing = missing
        self.unjellier = unjellier

    def __setitem__(self, index: int, value: Any) -> None:
        self.items[index] = value
        self.missing -= 1
        if not self.missing:
            if self.factory is not tuple:
                self.unjellier._beforeHashing(self.items)
            self.resolve(_build(self.factory, self.items))


class _PendingPair:
    """
    A dictionary entry whose key or value is unresolved; inserted once both are known.

    ``ring`` is shared by the pending entries of one dictionary: the keys it holds by their
    hash, made when the first of them is inserted (see :meth:`HashBudget.spendKeys`).
    """

    __slots__ = ("dictionary", "missing", "order", "pair", "ring", "unjellier")

    def __init__(
        self,
        dictionary: dict[Any, Any],
        key: Any,
        value: Any,
        missing: int,
        unjellier: Unjellier,
        ring: list[Any],
    ) -> None:
        self.dictionary = dictionary
        self.pair = [key, value]
        self.missing = missing
        self.unjellier = unjellier
        self.ring = ring
        self.order: _KeyOrder | None = None

    def __setitem__(self, index: int, value: Any) -> None:
        self.pair[index] = value
        self.missing -= 1
        if not self.missing:
            self.unjellier._beforeHashing(self.pair[:1], self.ring, self.dictionary)
            _insert(self.dictionary, self.pair[0], self.pair[1])
            if self.order is not None:
                self.order.inserted()


class _KeyOrder:
    """
    The sender's order of a dictionary's keys, some of whose entries were inserted late
    (their key or value was unresolved): once the last is in, the dictionary is put back in
    that order, as stock PB keeps it. Until then it holds only its known entries (what a
    copy's ``setCopyableState`` sees: see docs/migration.rst).
    """

    __slots__ = ("dictionary", "keys", "unjellier", "waiting")

    def __init__(self, dictionary: dict[Any, Any], keys: list[Any], unjellier: Unjellier) -> None:
        self.dictionary = dictionary
        self.keys = keys  # a key, or the _PendingPair that holds it
        self.unjellier = unjellier
        self.waiting = 0

    def inserted(self) -> None:
        self.waiting -= 1
        if self.waiting:
            return
        keys = [key.pair[0] if type(key) is _PendingPair else key for key in self.keys]
        dictionary = self.dictionary
        if len(keys) != len(dictionary) or all(
            mine is theirs for mine, theirs in zip(dictionary, keys, strict=True)
        ):
            return  # in order already, or keys that were equal (rare: left as they are)
        # (The same key objects, all distinct: found by identity. Putting them back hashes
        # each once more, counted as the first time was.)
        self.unjellier._beforeHashing(keys)
        valueOf = {id(key): value for key, value in dictionary.items()}
        items = [(key, valueOf[id(key)]) for key in keys]
        dictionary.clear()
        dictionary.update(items)


class _PendingState:
    """
    An instance whose state is unresolved; its state is installed once known.
    """

    __slots__ = ("instance",)

    def __init__(self, instance: Any) -> None:
        self.instance = instance

    def __setitem__(self, index: int, state: Any) -> None:
        _setState(self.instance, state)


def _build(factory: Callable[[list[Any]], Any], items: list[Any]) -> Any:
    try:
        return factory(items)
    except (TypeError, RecursionError) as e:
        raise InvalidJelly(
            f"cannot build a {factory.__name__} from the elements sent: {e}"
        ) from None


def _insert(dictionary: dict[Any, Any], key: Any, value: Any) -> None:
    try:
        dictionary[key] = value
    except (TypeError, RecursionError) as e:
        raise InvalidJelly(f"unusable dictionary key {describe(key)}: {e}") from None


class _Frame:
    """
    A container being unjellied: its closer, an iterator over the expressions of the children
    still to visit, the values made so far, which of them are unresolved, and closer data.
    """

    __slots__ = ("children", "close", "extra", "pending", "values")

    def __init__(
        self,
        close: Callable[[Unjellier, _Frame], Any],
        children: list[Any],
        start: int = 0,
        extra: Any = None,
    ) -> None:
        self.close = close
        self.children: Iterator[Any] = islice(children, start, None) if start else iter(children)
        self.values: list[Any] = []
        self.pending: list[int] | None = None
        self.extra = extra


# Atoms that stand for themselves inside an expression (a flat tuple of them is taken at
# once). A str is jelly's text too, decoded by the banana decoder (see Decoder's text
# option) or put there by a caller in the same process: as a value it takes the security
# check of the list it stands for, in _walk. (Fields a handler reads itself, such as a
# module's name, take a str as they take bytes, as Twisted's in-process expressions have
# them; the module and class checks still apply.)
_FLAT = frozenset({int, float, bytes})


# The C unjellier of plain expressions (pbroker._speedups.plain), and the bit of each tag it
# takes in its mask of allowed tags.
_plain: Callable[[list[Any], int, Callable[[bytes], bool] | None, set[int] | None], Any] | None = (
    None if _accelerator.speedups is None else _accelerator.speedups.plain
)
_PLAIN_TAGS: dict[bytes, int] = {
    b"list": 1,
    b"tuple": 2,
    b"dictionary": 4,
    b"unicode": 8,
    b"None": 16,
}


def _textRefused() -> InsecureJelly:
    return InsecureJelly("type 'unicode' is not allowed by the security options")


class Unjellier:
    """
    The state of one top-level unjelly call: references made so far and ``postUnjelly`` hooks.

    Created by :func:`pbroker.jelly.unjelly`; an ``unjellyFor`` method receives it.

    :ivar invoker: the broker on whose behalf the call runs, or ``None``.
    :ivar taster: the security options in force.
    """

    def __init__(
        self,
        taster: ISecurityOptions,
        persistentLoad: Callable[[Any, Unjellier], Any] | None = None,
        invoker: Any = None,
        registry: UnjellyableRegistry | None = None,
        hashBudget: HashBudget | None = None,
    ) -> None:
        self.taster = taster
        self.persistentLoad = persistentLoad
        self.invoker = invoker
        self.registry = globalRegistry if registry is None else registry
        self.references: dict[int, Any] = {}
        self.postCallbacks: list[Callable[[], Any]] = []
        self._placeholders: list[_Unresolved] = []
        self._tagAllowed: dict[bytes, bool] = {}
        # The _PLAIN_TAGS bits of the tags already found allowed: the C builder is never the
        # reason the security options are asked about a tag.
        self._plainMask = 0
        # Whether a tuple or frozenset (or what may become one) was met again: from then on,
        # set elements and dictionary keys are counted before they are hashed
        # (_beforeHashing).
        self._sharesTuples = False
        self._hashBudget = hashBudget

    def unjellyFull(self, sexp: Any) -> Any:
        """
        Unjelly a whole top-level expression, check every reference was resolved, then run the
        ``postUnjelly`` hooks.
        """
        if type(sexp) is list and 0 < len(sexp) <= 9:
            # The arguments of most calls: a tuple of numbers or bytes, and no keywords.
            tag = sexp[0]
            if tag == b"tuple" and all(type(item) in _FLAT for item in sexp[1:]):
                if self._isAllowed(tag):
                    return tuple(sexp[1:])
            elif tag == b"dictionary" and len(sexp) == 1 and self._isAllowed(tag):
                return {}
        value = self.unjelly(sexp)
        if self._placeholders:
            for placeholder in self._placeholders:
                placeholder.final()
            if isinstance(value, _Unresolved):
                value = value.final()
        for callback in self.postCallbacks:
            callback()
        return value

    def unjelly(self, sexp: Any) -> Any:
        """
        Unjelly ``sexp`` within this call, sharing its references. Re-entrant from
        ``unjellyFor``.
        """
        if type(sexp) is not list:
            if type(sexp) is str and not self._isAllowed(b"unicode"):
                raise _textRefused()
            return sexp
        if _plain is not None and self._plainMask:
            # Only tags already asked about (none, in a fresh unjellier): here the Python walk
            # would ask about text, lists and dictionaries before the children's tags.
            value = _plain(sexp, self._plainMask, None, None)
            if value is not NotImplemented:
                return value
        try:
            opened = self._open(sexp)
            if type(opened) is not _Frame:
                return opened
            return self._walk(opened)
        except UnicodeDecodeError as e:
            raise InvalidJelly(f"text that is not valid UTF-8: {e}") from None

    def unjellyInto(self, obj: Any, loc: Any, jel: Any) -> Any:
        """
        Unjelly ``jel`` and store it at ``obj[loc]``, filling it in later if it is a reference to
        an object still being built.
        """
        value = self.unjelly(jel)
        if isinstance(value, _Unresolved):
            value.addDependant(obj, loc)
        obj[loc] = value
        return value

    def _walk(self, frame: _Frame) -> Any:
        """
        Unjelly a container and everything in it, depth first, without recursion.
        """
        stack: list[_Frame] = []
        unicodeAllowed = self._isAllowed(b"unicode")
        listAllowed = self._isAllowed(b"list")
        dictionaryAllowed = self._isAllowed(b"dictionary")
        open_ = self._open
        plain = _plain
        isAllowed = self._isAllowed
        failed: set[int] = set()  # (ids of nodes the C builder found not plain)
        while True:
            values = frame.values
            append = values.append
            descended = False
            for child in frame.children:
                if type(child) is not list:
                    if type(child) is str and not unicodeAllowed:
                        raise _textRefused()
                    append(child)
                    continue
                # With the C extension, a plain child (lists, tuples, dictionaries, text and
                # None, as far as allowed) is built whole in C; anything else comes back as
                # NotImplemented and is taken here.
                if plain is not None and id(child) not in failed:
                    result = plain(child, self._plainMask, isAllowed, failed)
                    if result is not NotImplemented:
                        append(result)
                        continue
                # The commonest tags are handled here, the rest (and every error) by _open.
                tag = child[0] if child else None
                if (
                    tag == b"unicode"
                    and unicodeAllowed
                    and len(child) == 2
                    and type(child[1]) is bytes
                ):
                    append(child[1].decode("utf-8"))
                    continue
                if tag == b"list" and listAllowed:
                    result = _Frame(_closeList, child, 1)
                elif tag == b"dictionary" and dictionaryAllowed:
                    result = _openDictionary(self, child)
                else:
                    result = open_(child)
                if type(result) is _Frame:
                    stack.append(frame)
                    frame = result
                    descended = True
                    break
                if isinstance(result, _Unresolved):
                    _notePending(frame)
                append(result)
            if descended:
                continue
            value = frame.close(self, frame)
            if not stack:
                return value
            frame = stack.pop()
            if isinstance(value, _Unresolved):
                _notePending(frame)
            frame.values.append(value)

    def _beforeHashing(
        self, values: Iterable[Any], ring: list[Any] | None = None, into: Any = None
    ) -> None:
        """
        Count what comparing those of ``values`` (the elements or keys of one container) that
        have the same hash may walk, and, once this value's tuples share their parts, what
        hashing them walks: see :class:`~pbroker._native.HashBudget`. ``ring`` and ``into``:
        for a key inserted alone into the dictionary ``into`` (see :class:`_PendingPair`).
        """
        budget = self._hashBudget
        if budget is None:
            budget = self._hashBudget = HashBudget()
        if ring is None:
            budget.spendKeys(values, None, self._sharesTuples)
            return
        if not ring:
            ring.append(budget.ringOf(into))
        budget.spendKeys(values, ring[0], self._sharesTuples)

    def _isAllowed(self, tag: bytes) -> bool:
        allowed = self._tagAllowed.get(tag)
        if allowed is None:
            registry = self.registry
            # The taster first: it is a dictionary lookup, the registry may be a chain.
            allowed = self._tagAllowed[tag] = bool(self.taster.isTypeAllowed(tag)) or (
                tag in registry
            )
            if allowed and tag in _PLAIN_TAGS:
                self._plainMask |= _PLAIN_TAGS[tag]
        return allowed

    def _open(self, node: list[Any]) -> Any:
        """
        Start unjellying one list expression: a finished value, or a :class:`_Frame` whose
        children still have to be visited.
        """
        if not node:
            raise InvalidJelly("an empty list is not a jelly expression")
        tag = node[0]
        if type(tag) is not bytes:
            raise InvalidJelly(f"a jelly expression must start with a bytes tag: {describe(node)}")
        if not self._isAllowed(tag):
            raise InsecureJelly(
                f"type {describe(tag.decode('utf-8', 'replace'))} is not allowed by the "
                "security options"
            )
        handler = _HANDLERS.get(tag)
        if handler is not None:
            return handler(self, node)
        registry = self.registry
        unjellyable: Any = registry.classFor(tag)
        if unjellyable is not None:
            blank = _createBlank(unjellyable) if isinstance(unjellyable, type) else None
            method = getattr(blank, "unjellyFor", unjellyable)
            return self._maybePostUnjelly(method(self, node))
        factory = registry.factoryFor(tag)
        if factory is not None:
            _checkArity(node, 2)
            return _Frame(_closeFactory, node, 1, factory)
        # The class first: a tag the security options refuse says so, whatever its shape.
        cls = self._lookupClass(tag)
        _checkArity(node, 2)
        return _Frame(_closeInstance, node, 1, cls)

    def _maybePostUnjelly(self, obj: Any) -> Any:
        postUnjelly = getattr(obj, "postUnjelly", None)
        if postUnjelly is not None:
            self.postCallbacks.append(postUnjelly)
        return obj

    def _lookupName(self, name: str, what: str, nested: bool = False) -> Any:
        """
        Find ``module.name`` for a tag, importing the module only if the security options
        allow it (the part before the last dot is what they are asked about, as in Twisted).

        :param nested: when that part is not a module, find ``name`` as a path of attributes
            in the longest part of it that is one, as Twisted does for a function (a method
            reached through its class, ``module.Class.method``).
        """
        moduleName, _, attribute = name.rpartition(".")
        if not moduleName:
            raise InsecureJelly(
                f"unknown jelly type {describe(name)}: not registered and not dotted"
            )
        if not self.taster.isModuleAllowed(moduleName):
            raise InsecureJelly(
                f"module {describe(moduleName)} is not allowed (in {what} {describe(name)})"
            )
        _checkModuleName(moduleName, f"{what} {describe(name)}")
        path = [attribute]
        while True:
            try:
                found = importlib.import_module(moduleName)
                break
            except ModuleNotFoundError as e:
                # The first missing module on the way, then look from its parent (shorter
                # each time round).
                missing = e.name or ""
                parent = missing.rpartition(".")[0]
                if nested and parent and f"{moduleName}.".startswith(f"{missing}."):
                    path[:0] = moduleName[len(parent) + 1 :].split(".")
                    moduleName = parent
                    continue
                error: ImportError = e
            except ImportError as e:
                error = e
            raise InvalidJelly(
                f"cannot import module {describe(moduleName)} for {what} {describe(name)}: {error}"
            ) from None
        for step in path:
            try:
                found = getattr(found, step)
            except AttributeError:
                raise InvalidJelly(
                    f"module {describe(moduleName)} has no {what} {describe('.'.join(path))}"
                ) from None
        return found

    def _lookupClass(self, tag: bytes | str) -> type:
        name = tag.decode("utf-8", "replace") if isinstance(tag, bytes) else tag
        cls = self._lookupName(name, "class")
        if not isinstance(cls, type):
            raise InvalidJelly(f"{describe(name)} does not name a class")
        if not self.taster.isClassAllowed(cls):
            raise InsecureJelly(f"class {describe(name)} is not allowed by the security options")
        return cls

    def _newPlaceholder(self, description: str) -> _Unresolved:
        placeholder = _Unresolved(description)
        self._placeholders.append(placeholder)
        return placeholder


def _notePending(frame: _Frame) -> None:
    if frame.pending is None:
        frame.pending = []
    frame.pending.append(len(frame.values))


# Leaf tags: the whole value is made at once.


def _unjellyNone(unjellier: Unjellier, node: list[Any]) -> None:
    _checkArity(node, 1)


def _unjellyUnicode(unjellier: Unjellier, node: list[Any]) -> str:
    _checkArity(node, 2)
    return _textField(node, 1)


def _unjellyBoolean(unjellier: Unjellier, node: list[Any]) -> bool:
    _checkArity(node, 2)
    if node[1] == b"true":
        return True
    if node[1] == b"false":
        return False
    raise InvalidJelly(f"a boolean is b'true' or b'false', not {describe(node[1])}")


def _timeFields(node: list[Any]) -> list[int]:
    _checkArity(node, 2)
    try:
        return [int(field) for field in _textField(node, 1).split()]
    except ValueError:
        raise InvalidJelly(f"malformed {_tagName(node)} fields: {describe(node[1])}") from None


def _makeTime(node: list[Any], build: Callable[..., Any], *fieldCounts: int) -> Any:
    fields = _timeFields(node)
    if len(fields) not in fieldCounts:
        raise InvalidJelly(
            f"a {_tagName(node)} needs {fieldCounts[-1]} fields: {describe(node[1])}"
        )
    try:
        return build(*fields)
    except (ValueError, OverflowError) as e:
        raise InvalidJelly(f"invalid {_tagName(node)} {describe(node[1])}: {e}") from None


def _unjellyDatetime(unjellier: Unjellier, node: list[Any]) -> datetime.datetime:
    return _makeTime(node, datetime.datetime, 3, 4, 5, 6, 7)  # type: ignore[no-any-return]


def _unjellyDate(unjellier: Unjellier, node: list[Any]) -> datetime.date:
    return _makeTime(node, datetime.date, 3)  # type: ignore[no-any-return]


def _unjellyTime(unjellier: Unjellier, node: list[Any]) -> datetime.time:
    return _makeTime(node, datetime.time, 1, 2, 3, 4)  # type: ignore[no-any-return]


def _timedelta(days: int, seconds: int, microseconds: int) -> datetime.timedelta:
    return datetime.timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _unjellyTimedelta(unjellier: Unjellier, node: list[Any]) -> datetime.timedelta:
    return _makeTime(node, _timedelta, 3)  # type: ignore[no-any-return]


def _unjellyDecimal(unjellier: Unjellier, node: list[Any]) -> decimal.Decimal:
    _checkArity(node, 3)
    unscaled = _intField(node, 1)
    exponent = _intField(node, 2)
    import decimal  # on first use: most peers never send a decimal

    try:
        digits = tuple(int(d) for d in str(abs(unscaled)))
        return decimal.Decimal((1 if unscaled < 0 else 0, digits, exponent))
    except (ValueError, ArithmeticError) as e:
        raise InvalidJelly(f"invalid decimal {describe(node)}: {e!r}") from None


def _unjellyUnpersistable(unjellier: Unjellier, node: list[Any]) -> Unpersistable:
    _checkArity(node, 2)
    reason = node[1]
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    elif not isinstance(reason, str):
        reason = describe(reason)
    return Unpersistable(f"Unpersistable data: {reason}")


def _unjellyDereference(unjellier: Unjellier, node: list[Any]) -> Any:
    _checkArity(node, 2)
    reference = _referenceField(node)
    references = unjellier.references
    value = references.get(reference, _MISSING)
    if value is _MISSING:
        value = references[reference] = unjellier._newPlaceholder(
            f"dereference {describe(reference)} to an id that is never defined"
        )
    if type(value) is tuple or type(value) is frozenset or isinstance(value, _Unresolved):
        # (A placeholder may stand for a tuple; a frozenset remembers its hash, but ``==``
        # goes through what it holds each time.)
        unjellier._sharesTuples = True
    if isinstance(value, _Unresolved) and value.resolved:
        # The end of its chain: an id defined as a dereference to an id defined as another
        # (a forward one) holds a link whose value may be a placeholder resolved since. A
        # hook (a copy's unjellyFor) must get the value, not a placeholder.
        end = value.value
        while isinstance(end, _Unresolved) and end.resolved:
            end = end.value
        value._shorten(end)
        value = end
    return value


def _unjellyClass(unjellier: Unjellier, node: list[Any]) -> type:
    _checkArity(node, 2)
    return unjellier._lookupClass(_textField(node, 1))


def _checkModuleName(name: str, what: str) -> None:
    """
    Refuse a module name import_module would take as relative (an empty component: raw
    TypeError), or whose NUL a finder may cut it at (the frozen ``os`` imported anew as
    ``"os\\x00"``).
    """
    if "" in name.split(".") or "\x00" in name:
        raise InvalidJelly(f"{describe(name)} is not a module name (in {what})")


def _unjellyModule(unjellier: Unjellier, node: list[Any]) -> types.ModuleType:
    _checkArity(node, 2)
    name = _textField(node, 1)
    if not unjellier.taster.isModuleAllowed(name):
        raise InsecureJelly(f"module {describe(name)} is not allowed by the security options")
    _checkModuleName(name, "a module tag")
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InvalidJelly(f"cannot import module {describe(name)}: {e}") from None


def _unjellyFunction(unjellier: Unjellier, node: list[Any]) -> Any:
    _checkArity(node, 2)
    name = _textField(node, 1)
    function = unjellier._lookupName(name, "function", nested=True)
    if not callable(function) or isinstance(function, type):
        raise InvalidJelly(f"{describe(name)} does not name a function")
    return function


def _unjellyPersistent(unjellier: Unjellier, node: list[Any]) -> Any:
    _checkArity(node, 2)
    if unjellier.persistentLoad is not None:
        return unjellier.persistentLoad(node[1], unjellier)
    return Unpersistable("Persistent callback not found")


# Container tags: a frame visits the children, then a closer builds the value.


def _openList(unjellier: Unjellier, node: list[Any]) -> _Frame:
    return _Frame(_closeList, node, 1)


def _openTuple(unjellier: Unjellier, node: list[Any]) -> _Frame:
    return _Frame(_closeImmutable, node, 1, tuple)


def _openSet(unjellier: Unjellier, node: list[Any]) -> _Frame:
    return _Frame(_closeImmutable, node, 1, set)


def _openFrozenset(unjellier: Unjellier, node: list[Any]) -> _Frame:
    return _Frame(_closeImmutable, node, 1, frozenset)


def _openDictionary(unjellier: Unjellier, node: list[Any]) -> _Frame:
    # Visit keys and values as one flat run of children; _closeDictionary pairs them up.
    pairs = node[1:]
    if not (set(map(type, pairs)) <= _LIST_TYPE and set(map(len, pairs)) <= _PAIR_SIZE):
        pairs = [_entry(pair) for pair in pairs]
    return _Frame(_closeDictionary, list(chain.from_iterable(pairs)))


def _entry(pair: Any) -> list[Any]:
    # An entry with the key b"unicode" and a short UTF-8 bytes value has the bytes of jelly's
    # text, and the banana decoder took it for text: it is given back as it came.
    if type(pair) is str:
        return [b"unicode", pair.encode("utf-8")]
    if type(pair) is not list or len(pair) != 2:
        raise InvalidJelly(f"a dictionary entry must be a [key, value] list: {describe(pair)}")
    return pair


def _openReference(unjellier: Unjellier, node: list[Any]) -> _Frame:
    _checkArity(node, 3)
    reference = _referenceField(node)
    return _Frame(_closeReference, node, 2, reference)


def _openInstance(unjellier: Unjellier, node: list[Any]) -> _Frame:
    warnings.warn(
        "the 'instance' jelly tag is deprecated; the peer should send [class name, state]",
        DeprecationWarning,
        stacklevel=2,
    )
    _checkArity(node, 3)
    return _Frame(_closeOldInstance, node, 1)


def _openMethod(unjellier: Unjellier, node: list[Any]) -> _Frame:
    _checkArity(node, 4)
    return _Frame(_closeMethod, node, 2, _textField(node, 1))


def _closeList(unjellier: Unjellier, frame: _Frame) -> list[Any]:
    values = frame.values
    if frame.pending:
        for index in frame.pending:
            values[index].addDependant(values, index)
    return values


def _closeImmutable(unjellier: Unjellier, frame: _Frame) -> Any:
    factory = frame.extra
    values = frame.values
    if not frame.pending:
        if factory is not tuple:
            unjellier._beforeHashing(values)
        return _build(factory, values)
    container = _PendingContainer(factory, values, len(frame.pending), unjellier)
    unjellier._placeholders.append(container)
    for index in frame.pending:
        values[index].addDependant(container, index)
    return container


def _closeDictionary(unjellier: Unjellier, frame: _Frame) -> dict[Any, Any]:
    values = frame.values
    result: dict[Any, Any] = {}
    if not frame.pending:
        unjellier._beforeHashing(values[::2])
        try:
            result.update(zip(values[::2], values[1::2], strict=True))
        except (TypeError, RecursionError):
            # Find the offending key again, one by one, to report it.
            for index in range(0, len(values), 2):
                _insert(result, values[index], values[index + 1])
        return result
    pending = set(frame.pending)
    known = [
        index
        for index in range(0, len(values), 2)
        if index not in pending and index + 1 not in pending
    ]
    # Only the entries inserted now: the others' keys are counted as each is inserted
    # (_PendingPair), and must not be counted twice.
    unjellier._beforeHashing([values[index] for index in known])
    for index in known:
        _insert(result, values[index], values[index + 1])
    ring: list[Any] = []  # (shared by its pending entries)
    entries: list[tuple[_PendingPair, int]] = []
    # The keys in the sender's order, a pending entry standing for its own: restored once
    # the last is inserted (see _KeyOrder).
    order: list[Any] = []
    keyOrder = _KeyOrder(result, order, unjellier)
    for index in range(0, len(values), 2):
        if index not in pending and index + 1 not in pending:
            order.append(values[index])
            continue  # (inserted above)
        entry = _PendingPair(result, values[index], values[index + 1], 0, unjellier, ring)
        entry.order = keyOrder
        for position in (index, index + 1):
            if position in pending:
                entry.missing += 1
        entries.append((entry, index))
        order.append(entry)
    keyOrder.waiting = len(entries)
    # Wired once every known entry is in: one whose placeholder resolved already (a forward
    # reference defined later in this dictionary) is inserted at once, and its key must be
    # weighed against all the others (the ring is made from the dictionary then).
    for entry, index in entries:
        for position in (index, index + 1):
            if position in pending:
                values[position].addDependant(entry, position - index)
    return result


def _closeReference(unjellier: Unjellier, frame: _Frame) -> Any:
    reference = frame.extra
    value = frame.values[0]
    references = unjellier.references
    known = references.get(reference, _MISSING)
    if known is _MISSING:
        references[reference] = value
    elif type(known) is _Unresolved and not known.resolved:
        # A dereference met this id before its definition finished: a cycle closes here.
        known.resolve(value)
        references[reference] = value
    else:
        raise InvalidJelly(f"reference id {describe(reference)} is defined twice")
    return value


def _closeInstance(unjellier: Unjellier, frame: _Frame) -> Any:
    cls = frame.extra
    return unjellier._maybePostUnjelly(_newInstance(cls, frame.values[0]))


def _closeOldInstance(unjellier: Unjellier, frame: _Frame) -> Any:
    cls, state = frame.values
    if not isinstance(cls, type):
        raise InvalidJelly(f"an instance expression needs a class, not {describe(cls)}")
    return unjellier._maybePostUnjelly(_newInstance(cls, state))


def _createBlank(cls: Any) -> Any:
    """
    A new instance of ``cls`` whose ``__init__`` has not run.
    """
    return cls.__new__(cls)


def _newInstance(cls: Any, state: Any) -> Any:
    instance = _createBlank(cls)
    if isinstance(state, _Unresolved):
        state.addDependant(_PendingState(instance), 0)
    else:
        _setState(instance, state)
    return instance


def _closeFactory(unjellier: Unjellier, frame: _Frame) -> Any:
    state = frame.values[0]
    if isinstance(state, _Unresolved):
        raise InvalidJelly("a factory-built copy cannot take part in a reference cycle")
    return unjellier._maybePostUnjelly(frame.extra(state))


def _closeMethod(unjellier: Unjellier, frame: _Frame) -> Any:
    name = frame.extra
    owner, cls = frame.values
    if not isinstance(cls, type):
        raise InsecureJelly("a method expression needs a class")
    if isinstance(owner, _Unresolved):
        raise InvalidJelly("a method bound to an object still being built is not supported")
    if name not in cls.__dict__:
        raise InvalidJelly(f"class {qual(cls)} has no method {describe(name)}")
    if owner is None:
        return getattr(cls, name)
    return types.MethodType(cls.__dict__[name], owner)


_MISSING: Any = object()
_LIST_TYPE = {list}
_PAIR_SIZE = {2}

_HANDLERS: dict[bytes, Callable[[Unjellier, list[Any]], Any]] = {
    b"None": _unjellyNone,
    b"unicode": _unjellyUnicode,
    b"boolean": _unjellyBoolean,
    b"datetime": _unjellyDatetime,
    b"date": _unjellyDate,
    b"time": _unjellyTime,
    b"timedelta": _unjellyTimedelta,
    b"decimal": _unjellyDecimal,
    b"unpersistable": _unjellyUnpersistable,
    b"dereference": _unjellyDereference,
    b"class": _unjellyClass,
    b"module": _unjellyModule,
    b"function": _unjellyFunction,
    b"persistent": _unjellyPersistent,
    b"list": _openList,
    b"tuple": _openTuple,
    b"set": _openSet,
    b"frozenset": _openFrozenset,
    b"dictionary": _openDictionary,
    b"reference": _openReference,
    b"instance": _openInstance,
    b"method": _openMethod,
}


# Tags whose fields hold no expression (atoms, and references by id), and the tags whose
# fields do not all hold one: where their expressions are.
_LEAVES = frozenset(
    {
        b"None",
        b"unicode",
        b"boolean",
        b"datetime",
        b"date",
        b"time",
        b"timedelta",
        b"decimal",
        b"unpersistable",
        b"dereference",
        b"class",
        b"module",
        b"function",
        b"persistent",
    }
)


def _pairValues(node: list[Any]) -> Iterator[Any]:
    for pair in islice(node, 1, None):
        if type(pair) is list:
            yield from pair


_FIELDS: dict[bytes, Callable[[list[Any]], Any]] = {
    b"dictionary": _pairValues,  # [tag, [key, value], ...]: the pairs are not expressions
    b"reference": lambda node: islice(node, 2, 3),  # [tag, id, value]
    b"method": lambda node: islice(node, 2, 4),  # [tag, name, self, class]
}


def expressionsIn(sexp: Any) -> Iterator[list[Any]]:
    """
    Every expression (a list with a bytes tag) in the jelly ``sexp``, itself included,
    without unjellying anything: for finding what a value refers to when it cannot be (or
    will not be) unjellied.

    The walk follows jelly's grammar, so that a dictionary's ``[key, value]`` pairs are not
    taken for expressions; under a tag it does not know (an instance, a copy, a cache) every
    list field is taken for one, as in ``[tag, state]``. Iterative: nesting costs memory.
    """
    pending = [sexp]
    while pending:
        node = pending.pop()
        if type(node) is not list or not node or type(node[0]) is not bytes:
            continue
        yield node
        tag = node[0]
        if tag in _LEAVES:
            continue
        fields = _FIELDS.get(tag)
        pending.extend(islice(node, 1, None) if fields is None else fields(node))
