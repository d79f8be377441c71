"""
What both directions of jelly share: the tag atoms, security options, copy registries and the
``Unpersistable`` placeholder.

This module knows nothing about how values are walked; :mod:`pbroker._jellier` and
:mod:`pbroker._unjellier` do that, and :mod:`pbroker.jelly` is the public surface.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

__all__ = [
    "DummySecurityOptions",
    "ISecurityOptions",
    "SecurityOptions",
    "UnjellyableRegistry",
    "Unpersistable",
    "globalRegistry",
    "globalSecurity",
    "qual",
    "toTag",
]

None_atom = b"None"
class_atom = b"class"
module_atom = b"module"
function_atom = b"function"
dereference_atom = b"dereference"
persistent_atom = b"persistent"
reference_atom = b"reference"
dictionary_atom = b"dictionary"
list_atom = b"list"
set_atom = b"set"
tuple_atom = b"tuple"
instance_atom = b"instance"
frozenset_atom = b"frozenset"
unpersistable_atom = b"unpersistable"


def qual(cls: type) -> str:
    """
    The name a class travels under on the wire: ``module.Name``, as every PB peer names it
    (Twisted's ``reflect.qual``), also for a class nested in another.
    """
    return f"{cls.__module__}.{cls.__name__}"


def toTag(name: str | bytes | type) -> bytes:
    """
    Normalise a type tag given as text, bytes or a class to the bytes that travel on the wire.
    """
    if isinstance(name, type):
        name = qual(name)
    if isinstance(name, str):
        return name.encode("utf-8")
    if isinstance(name, bytes):
        return name
    raise TypeError(f"a type tag must be str, bytes or a class, not {type(name).__name__}")


class ISecurityOptions(Protocol):
    """
    What jelly asks of a security policy ("taster"). Names arrive as bytes.
    """

    def isModuleAllowed(self, moduleName: str | bytes) -> bool:
        """
        Whether instances and classes of the module ``moduleName`` may be unjellied.
        """
        ...

    def isClassAllowed(self, klass: type) -> bool:
        """
        Whether instances of ``klass`` may be jellied and unjellied.
        """
        ...

    def isTypeAllowed(self, typeName: str | bytes) -> bool:
        """
        Whether the jelly type tag ``typeName`` (``list``, ``instance``...) may be read.
        """
        ...


#: What jellying asks of security options (unjellying asks isModuleAllowed too).
JELLYING_CHECKS: Final = ("isTypeAllowed", "isClassAllowed")
ALL_CHECKS: Final = ("isTypeAllowed", "isClassAllowed", "isModuleAllowed")


def checkSecurity(options: Any, name: str, methods: tuple[str, ...] = ALL_CHECKS) -> None:
    """
    TypeError, naming the argument ``name``, unless ``options`` is an object with the
    ``methods`` of :class:`ISecurityOptions` that its use calls (at the call, not when the
    first value needs them).
    """
    if not all(_callableOn(options, method) for method in methods):
        raise TypeError(
            f"{name} must be security options such as jelly.SecurityOptions() (with "
            f"{', '.join(methods)}), not {describeKind(options)}"
        )


def _callableOn(options: Any, method: str) -> bool:
    # A class given for options works only if its methods need no instance (static or
    # class methods, as a namespace of checks may have).
    if not isinstance(options, type):
        return callable(getattr(options, method, None))
    found = inspect.getattr_static(options, method, None)
    return isinstance(found, (staticmethod, classmethod))


def describeKind(value: Any) -> str:
    # "the class X" for a class given where an instance is wanted, else its type's name.
    return f"the class {value.__name__}" if isinstance(value, type) else type(value).__name__


class DummySecurityOptions:
    """
    Security options that allow everything: every type, module and class.

    Only for data from a trusted source. With it, unjellying a name imports its module.
    """

    def isModuleAllowed(self, moduleName: str | bytes) -> bool:
        """
        Every module is allowed.
        """
        return True

    def isClassAllowed(self, klass: type) -> bool:
        """
        Every class is allowed.
        """
        return True

    def isTypeAllowed(self, typeName: str | bytes) -> bool:
        """
        Every type tag is allowed.
        """
        return True


class SecurityOptions:
    """
    A deny-by-default security policy for unjellying.

    A fresh instance allows only atoms and simple values (``None``, booleans, text, dates and
    times, decimals, sets). :meth:`allowBasicTypes` adds containers and references;
    :meth:`allowInstancesOf` allows particular classes to be rebuilt by name;
    :meth:`allowModules` lets names in a module be looked up.

    When jellying, a class that is not allowed is sent as an ``unpersistable`` marker instead
    of its state.
    """

    #: The container and reference tags :meth:`allowBasicTypes` adds.
    basicTypes = [
        "dictionary",
        "list",
        "tuple",
        "reference",
        "dereference",
        "unpersistable",
        "persistent",
        "long_int",
        "long",
        "dict",
    ]

    def __init__(self) -> None:
        self.allowedTypes: dict[bytes, bool] = dict.fromkeys(
            [
                b"None",
                b"bool",
                b"boolean",
                b"string",
                b"str",
                b"int",
                b"float",
                b"datetime",
                b"time",
                b"date",
                b"timedelta",
                b"NoneType",
                b"unicode",
                b"decimal",
                b"set",
                b"frozenset",
            ],
            True,
        )
        self.allowedModules: dict[bytes, bool] = {}
        self.allowedClasses: dict[type, bool] = {}

    def allowBasicTypes(self) -> None:
        """
        Allow lists, tuples, dictionaries, references and the unpersistable marker.
        """
        self.allowTypes(*self.basicTypes)

    def allowTypes(self, *types: str | bytes | type) -> None:
        """
        Allow type tags, given as text, bytes or classes (a class stands for its full name).
        """
        for typ in types:
            self.allowedTypes[toTag(typ)] = True

    def allowInstancesOf(self, *classes: type) -> None:
        """
        Allow instances of these classes to be rebuilt from their state.

        This also allows the basic types, the ``instance``, ``class`` and ``module`` tags, and
        lookups in each class's module.
        """
        self.allowBasicTypes()
        self.allowTypes("instance", "class", "classobj", "module")
        for klass in classes:
            if not isinstance(klass, type):
                raise TypeError(f"allowInstancesOf() takes classes, not {klass!r}")
            self.allowTypes(klass)
            self.allowModules(klass.__module__)
            self.allowedClasses[klass] = True

    def allowModules(self, *modules: str | bytes | types.ModuleType) -> None:
        """
        Allow names in these modules (given as names or module objects) to be looked up.
        """
        for module in modules:
            if isinstance(module, types.ModuleType):
                module = module.__name__
            self.allowedModules[toTag(module)] = True

    def isModuleAllowed(self, moduleName: str | bytes) -> bool:
        """
        Whether names may be looked up in the module called ``moduleName``.
        """
        return toTag(moduleName) in self.allowedModules

    def isClassAllowed(self, klass: type) -> bool:
        """
        Whether instances of ``klass`` may be jellied by state and rebuilt from it.
        """
        return klass in self.allowedClasses

    def isTypeAllowed(self, typeName: str | bytes) -> bool:
        """
        Whether the type tag ``typeName`` passes the first check.

        Dotted names always pass this check, as in Twisted; such a name is then accepted only if
        it is registered or its module and class are allowed.
        """
        tag = typeName if type(typeName) is bytes else toTag(typeName)
        return tag in self.allowedTypes or b"." in tag


class Unpersistable:
    """
    What arrives in place of a value the sender could not or would not serialise.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unpersistable({self.reason!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Unpersistable):
            return NotImplemented
        return self.reason == other.reason

    def __hash__(self) -> int:
        return hash(self.reason)


#: How a registered class or factory is called: see :class:`UnjellyableRegistry`.
Unjellier = Any
Factory = Callable[[Any], Any]


class UnjellyableRegistry:
    """
    A copy registry: which local class or factory rebuilds each pass-by-copy type tag.

    The process-wide :data:`globalRegistry` backs the module-level functions of
    :mod:`pbroker.jelly`; pass an instance of your own to ``unjelly(registry=...)`` (and, later,
    to a broker) to give one connection a different set of classes. A tag registered here is
    accepted by the unjellier whatever the security options say about it: registering is the
    explicit allow.
    """

    def __init__(self, parent: UnjellyableRegistry | None = None) -> None:
        #: Tag -> class. The class is created without ``__init__`` and its ``unjellyFor`` called.
        self.classes: dict[bytes, Any] = {}
        #: Tag -> factory, called with the unjellied state.
        self.factories: dict[bytes, Factory] = {}
        #: A registry consulted for tags this one does not have (a broker puts its own
        #: PB tags in front of the application's registry this way).
        self.parent = parent
        # Tag -> the class it was registered for, when a class was given (see _claim).
        self._claimed: dict[bytes, type] = {}

    def _claim(self, classname: str | bytes | type) -> bytes:
        """
        The tag of ``classname``; warn if it is a class whose tag another class, of another
        qualified name, claimed before (two nested classes ``A.State`` and ``B.State`` of
        one module both travel as ``module.State``, as in every PB peer).
        """
        tag = toTag(classname)
        if isinstance(classname, type):
            earlier = self._claimed.get(tag)
            if earlier is not None and earlier.__qualname__ != classname.__qualname__:
                warnings.warn(
                    f"{tag.decode('utf-8', 'replace')} now names {classname.__qualname__} "
                    f"instead of {earlier.__qualname__}: classes travel as module.Name, so "
                    "classes of one module need different names",
                    stacklevel=3,
                )
            self._claimed[tag] = classname
        return tag

    def _chain(self) -> Iterator[UnjellyableRegistry]:
        registry: UnjellyableRegistry | None = self
        while registry is not None:
            yield registry
            registry = registry.parent

    def classFor(self, tag: bytes) -> Any:
        """
        The class registered for ``tag`` here or in a parent, or ``None``.
        """
        return next((r.classes[tag] for r in self._chain() if tag in r.classes), None)

    def factoryFor(self, tag: bytes) -> Factory | None:
        """
        The factory registered for ``tag`` here or in a parent, or ``None``.
        """
        return next((r.factories[tag] for r in self._chain() if tag in r.factories), None)

    def __contains__(self, tag: object) -> bool:
        return isinstance(tag, bytes) and (
            self.classFor(tag) is not None or self.factoryFor(tag) is not None
        )

    def setUnjellyableForClass(self, classname: str | bytes | type, unjellyable: Any) -> None:
        """
        Rebuild values tagged ``classname`` with ``unjellyable``.

        ``unjellyable`` is normally a class with an ``unjellyFor(unjellier, jellyList)`` method
        (such as a ``RemoteCopy`` subclass); it is created without calling ``__init__``. A
        callable without that method is called as ``unjellyable(unjellier, jellyList)``.
        """
        if not callable(unjellyable):
            raise TypeError(f"the unjellyable for {classname!r} must be a class or callable")
        self.classes[self._claim(classname)] = unjellyable

    def setUnjellyableFactoryForClass(
        self, classname: str | bytes | type, factory: Factory
    ) -> None:
        """
        Rebuild values tagged ``classname`` by calling ``factory(state)``.
        """
        if not callable(factory):
            raise TypeError(f"the factory for {classname!r} must be callable")
        self.factories[self._claim(classname)] = factory

    def setUnjellyableForClassTree(
        self, module: types.ModuleType, baseClass: type, prefix: str | None = None
    ) -> list[bytes]:
        """
        Register every class in ``module`` that derives from ``baseClass``.

        Each is registered under ``prefix + "." + its name``; the prefix defaults to the
        module's name, and an empty prefix registers bare class names.

        :returns: the tags registered.
        :raises TypeError: ``module`` is not a module, or ``baseClass`` not a class.
        """
        if not isinstance(module, types.ModuleType):
            raise TypeError(f"setUnjellyableForClassTree takes a module, not {module!r}")
        if not isinstance(baseClass, type):
            raise TypeError(f"setUnjellyableForClassTree takes a base class, not {baseClass!r}")
        if prefix is None:
            prefix = module.__name__
        if prefix:
            prefix = prefix + "."
        registered = []
        for name in dir(module):
            candidate = getattr(module, name)
            if isinstance(candidate, type) and issubclass(candidate, baseClass):
                tag = toTag(prefix + name)
                self.classes[tag] = candidate
                registered.append(tag)
        return registered


#: The process-wide security options, allowing the basic types (as in Twisted).
globalSecurity = SecurityOptions()
globalSecurity.allowBasicTypes()

#: The process-wide copy registry.
globalRegistry = UnjellyableRegistry()


#: Ids a peer chooses (jelly references, its objects and caches) are below this, in absolute
#: value: Python hashes an int modulo it, so ids beyond it could be chosen to share one hash,
#: and a table of them would compare each id with all those before it (time in the square of
#: their number). Senders number them from 1.
ID_LIMIT = 2**61 - 1


def isPeerID(value: Any) -> bool:
    """
    Whether ``value`` can be the id of an object or cache the peer gave out: a positive
    integer below :data:`ID_LIMIT`.
    """
    return type(value) is int and 0 < value < ID_LIMIT
