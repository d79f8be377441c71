"""
Jelly: Python object graphs as s-expressions, the serialisation under Perspective Broker.

:func:`jelly` turns a value into nested lists of bytes, ints and floats that
:mod:`pbroker.banana` can encode; :func:`unjelly` turns such an expression back into a value.
The format is Twisted PB's (see the wire specification, section 2): pbroker's output is byte for
byte what ``twisted.spread.jelly`` produces, and each side reads the other's.

Unjellying is deny by default. The default security options, :data:`globalSecurity`, accept
atoms, text, dates, decimals, containers and references, and rebuild an instance only if its
type tag is registered (:func:`setUnjellyableForClass` and friends) or its class and module
are explicitly allowed. Nothing is imported, and no name is looked up, for a tag that came in
unless the security options allow its module. Registries and security options can be passed per
call (and per broker), so two services in one process can accept different classes.

Differences from ``twisted.spread.jelly``, all deliberate:

* :func:`unjelly` defaults to :data:`globalSecurity`, not to options that allow everything;
  pass :class:`DummySecurityOptions` to unjelly trusted data the old way.
* Deep nesting never raises ``RecursionError``: both directions walk iteratively.
* Malformed expressions raise :class:`InvalidJelly` (a subclass of :class:`InsecureJelly`)
  with a message, not ``IndexError``, ``KeyError`` or ``AssertionError``.
* ``function``, ``module`` and ``method`` tags carry their names as bytes, so they can be sent.
* A timezone-aware datetime, a NaN or infinite decimal, or text that is not valid Unicode
  raises :class:`JellyError`.
* A reference that can never be resolved (a tuple containing itself, a dereference to an id
  never defined) raises :class:`InvalidJelly` instead of leaving placeholders in the result.
* The built-in tags (``list``, ``dictionary``, ``unicode``...) cannot be overridden by a
  registry entry.
* Because ``method`` names travel as bytes, a stock Twisted receiver cannot rebuild a method
  pbroker sent (it expects the text its own sender puts there, which banana cannot carry).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from zope.interface import Interface, classImplements

from pbroker._jellier import DictTypes, Jellier, Jellyable, getInstanceState
from pbroker._jellycore import (
    ALL_CHECKS,
    JELLYING_CHECKS,
    DummySecurityOptions,
    ISecurityOptions,
    None_atom,
    SecurityOptions,
    UnjellyableRegistry,
    Unpersistable,
    checkSecurity,
    class_atom,
    dereference_atom,
    dictionary_atom,
    frozenset_atom,
    function_atom,
    globalRegistry,
    globalSecurity,
    instance_atom,
    list_atom,
    module_atom,
    persistent_atom,
    qual,
    reference_atom,
    set_atom,
    toTag,
    tuple_atom,
    unpersistable_atom,
)
from pbroker._unjellier import Unjellier, Unjellyable, setInstanceState
from pbroker.banana import DEPTH_LIMIT, PREFIX_LIMIT, SIZE_LIMIT, decode, getTokens
from pbroker.errors import InsecureJelly, InvalidJelly, JellyError

__all__ = [
    "DictTypes",
    "DummySecurityOptions",
    "IJellyable",
    "ISecurityOptions",
    "IUnjellyable",
    "InsecureJelly",
    "InvalidJelly",
    "Jellier",
    "JellyError",
    "Jellyable",
    "None_atom",
    "SecurityOptions",
    "Unjellier",
    "Unjellyable",
    "UnjellyableRegistry",
    "Unpersistable",
    "class_atom",
    "dereference_atom",
    "dictionary_atom",
    "dumps",
    "frozenset_atom",
    "function_atom",
    "getInstanceState",
    "globalRegistry",
    "globalSecurity",
    "instance_atom",
    "jelly",
    "list_atom",
    "loads",
    "module_atom",
    "persistent_atom",
    "qual",
    "reference_atom",
    "setInstanceState",
    "setUnjellyableFactoryForClass",
    "setUnjellyableForClass",
    "setUnjellyableForClassTree",
    "set_atom",
    "tuple_atom",
    "unjelly",
    "unjellyableFactoryRegistry",
    "unjellyableRegistry",
    "unpersistable_atom",
]

#: The process-wide registry's tables, under Twisted's names: tag -> class, tag -> factory.
unjellyableRegistry = globalRegistry.classes
unjellyableFactoryRegistry = globalRegistry.factories

_ALLOW_ALL = DummySecurityOptions()


class IJellyable(Interface):
    """
    What jellies itself: :class:`Jellyable` and its subclasses provide it.
    """

    def jellyFor(jellier: Jellier) -> Any:
        """
        This object's s-expression, made with ``jellier`` (which keeps references and
        security for the value being jellied).
        """


class IUnjellyable(Interface):
    """
    What rebuilds itself from an s-expression: :class:`Unjellyable` and its subclasses
    provide it.
    """

    def unjellyFor(unjellier: Unjellier, jellyList: list[Any]) -> Any:
        """
        Fill this object in from ``jellyList``, the expression its tag heads, with
        ``unjellier``; the object that stands for the value.
        """


classImplements(Jellyable, IJellyable)
classImplements(Unjellyable, IUnjellyable)


def setUnjellyableForClass(classname: str | bytes | type, unjellyable: Any) -> None:
    """
    Rebuild values tagged ``classname`` with ``unjellyable``, process-wide.

    Call it once, next to the class definition, for every pass-by-copy type this process may
    receive: this is the allow-list of :data:`globalSecurity`. For a per-broker list, use
    :meth:`UnjellyableRegistry.setUnjellyableForClass` on a registry of your own.
    """
    globalRegistry.setUnjellyableForClass(classname, unjellyable)
    globalSecurity.allowTypes(toTag(classname))


def setUnjellyableFactoryForClass(
    classname: str | bytes | type, copyFactory: Callable[[Any], Any]
) -> None:
    """
    Rebuild values tagged ``classname`` by calling ``copyFactory(state)``, process-wide.
    """
    globalRegistry.setUnjellyableFactoryForClass(classname, copyFactory)
    globalSecurity.allowTypes(toTag(classname))


def setUnjellyableForClassTree(
    module: types.ModuleType, baseClass: type, prefix: str | None = None
) -> None:
    """
    Register, process-wide, every class in ``module`` derived from ``baseClass``, each under
    ``prefix.ClassName`` (the prefix defaults to the module's name; ``""`` means none).
    """
    globalSecurity.allowTypes(*globalRegistry.setUnjellyableForClassTree(module, baseClass, prefix))


def jelly(
    object: Any,
    taster: ISecurityOptions | None = None,
    persistentStore: Callable[[Any, Jellier], Any] | None = None,
    invoker: Any = None,
) -> Any:
    """
    Serialise ``object`` to an s-expression.

    :param taster: security options; an instance of a class they do not allow is sent as an
        ``unpersistable`` marker instead of its state. The default allows every class, as in
        Twisted: the sender decides what it sends.
    :param persistentStore: called as ``persistentStore(obj, jellier)`` for each instance; a
        result other than ``None`` is sent as ``[b"persistent", result]``.
    :param invoker: the broker on whose behalf this runs, visible to ``jellyFor`` methods.
    :raises JellyError: a value jelly cannot represent.
    :raises InsecureJelly: a custom taster refused a type.
    """
    _checkOptions(taster, persistentStore, "persistentStore", jellying=True)
    return Jellier(_ALLOW_ALL if taster is None else taster, persistentStore, invoker).jelly(object)


def unjelly(
    sexp: Any,
    taster: ISecurityOptions | None = None,
    persistentLoad: Callable[[Any, Unjellier], Any] | None = None,
    invoker: Any = None,
    registry: UnjellyableRegistry | None = None,
) -> Any:
    """
    Rebuild a value from an s-expression made by :func:`jelly` (here or in a Twisted peer).

    :param taster: security options; the default is :data:`globalSecurity`, which refuses
        every class that is neither registered nor explicitly allowed.
    :param persistentLoad: called as ``persistentLoad(data, unjellier)`` for each
        ``persistent`` expression; without it they arrive as :class:`Unpersistable`.
    :param invoker: the broker on whose behalf this runs, visible to ``unjellyFor`` methods.
    :param registry: the copy registry to use; the default is :data:`globalRegistry`.
    :raises InsecureJelly: a type, module or class the security options do not allow.
    :raises InvalidJelly: a malformed expression.
    """
    _checkOptions(taster, persistentLoad, "persistentLoad", registry, jellying=False)
    unjellier = Unjellier(
        globalSecurity if taster is None else taster, persistentLoad, invoker, registry
    )
    return unjellier.unjellyFull(sexp)


def dumps(
    object: Any,
    dialect: bytes = b"none",
    *,
    taster: ISecurityOptions | None = None,
    persistentStore: Callable[[Any, Jellier], Any] | None = None,
    invoker: Any = None,
    sizeLimit: int = SIZE_LIMIT,
    prefixLimit: int = PREFIX_LIMIT,
) -> bytes:
    """
    Jelly ``object`` and encode it as banana in one pass.

    The result is byte for byte ``banana.encode(jelly(object), dialect)``, made without
    building the s-expression in between, which makes it several times faster. The arguments
    are those of :func:`jelly` and :func:`pbroker.banana.encode`.

    :raises JellyError: a value jelly cannot represent.
    :raises BananaEncodeError: a string, list or integer beyond the banana limits.
    """
    _checkOptions(taster, persistentStore, "persistentStore", jellying=True)
    jellier = Jellier(_ALLOW_ALL if taster is None else taster, persistentStore, invoker)
    return jellier.encode(object, getTokens(dialect, sizeLimit, prefixLimit))


def _checkOptions(
    taster: Any, persistent: Any, persistentName: str, registry: Any = None, *, jellying: bool
) -> None:
    """
    TypeError, naming the argument, for options of the wrong kind: at the call, not when
    the first value that needs them is met.
    """
    if taster is not None:
        checkSecurity(taster, "taster", JELLYING_CHECKS if jellying else ALL_CHECKS)
    if persistent is not None and not callable(persistent):
        raise TypeError(f"{persistentName} must be callable (or None), not {persistent!r}")
    if registry is not None and not isinstance(registry, UnjellyableRegistry):
        raise TypeError(
            f"registry must be an UnjellyableRegistry (or None), not {type(registry).__name__}"
        )


def loads(
    data: bytes,
    dialect: bytes = b"none",
    *,
    taster: ISecurityOptions | None = None,
    persistentLoad: Callable[[Any, Unjellier], Any] | None = None,
    invoker: Any = None,
    registry: UnjellyableRegistry | None = None,
    sizeLimit: int = SIZE_LIMIT,
    prefixLimit: int = PREFIX_LIMIT,
    depthLimit: int = DEPTH_LIMIT,
    messageSizeLimit: int | None = None,
) -> Any:
    """
    Decode one banana expression from ``data`` and unjelly it: the inverse of :func:`dumps`.

    The arguments are those of :func:`unjelly` and :class:`pbroker.banana.Decoder`.

    :raises BananaDecodeError: ``data`` is not exactly one well-formed expression.
    :raises InsecureJelly: refused or malformed jelly (see :func:`unjelly`).
    """
    expression = decode(
        data,
        dialect,
        sizeLimit=sizeLimit,
        prefixLimit=prefixLimit,
        depthLimit=depthLimit,
        messageSizeLimit=messageSizeLimit,
    )
    return unjelly(expression, taster, persistentLoad, invoker, registry)
