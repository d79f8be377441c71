"""
The flavors of remotely usable objects: the base classes applications subclass.

A value sent through a broker travels according to its flavor:

* :class:`Referenceable` (and :class:`Root`): by reference; the peer gets a
  :class:`~pbroker.references.RemoteReference` and its calls run ``remote_*`` methods here.
* :class:`Viewable`: by reference through a :class:`ViewPoint`, whose calls run ``view_*``
  methods with the caller's perspective as first argument.
* :class:`Copyable`: by copy; the peer rebuilds it with the :class:`RemoteCopy` subclass
  registered for its type tag.

This module holds no wire code. The hooks it calls on the broker it is serialised through
(``registerReference``, ``serialize``, ``unserialize``, ``serializingPerspective``) are the
broker's contract, reached as ``jellier.invoker`` / ``unjellier.invoker``.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface, implementer

from pbroker._jellier import Jellier, Jellyable, getInstanceState
from pbroker._unjellier import Unjellier, Unjellyable, setInstanceState
from pbroker.errors import NoSuchMethod
from pbroker.jelly import (
    setUnjellyableFactoryForClass,
    setUnjellyableForClass,
    setUnjellyableForClassTree,
)

__all__ = [
    "Copyable",
    "IPBRoot",
    "Jellyable",
    "NoSuchMethod",
    "Referenceable",
    "RemoteCopy",
    "Root",
    "Serializable",
    "Unjellyable",
    "ViewPoint",
    "Viewable",
    "findRemoteMethod",
    "setCopierForClass",
    "setCopierForClassTree",
    "setFactoryForClass",
    "textKeywords",
]

#: Twisted's names for the copy-registry functions: a RemoteCopy class is a "copier".
setCopierForClass = setUnjellyableForClass
setFactoryForClass = setUnjellyableFactoryForClass
setCopierForClassTree = setUnjellyableForClassTree


class IPBRoot(Interface):
    """
    A factory of root objects: what a broker offers its peer under the name ``root``.
    """

    def rootObject(broker: Any) -> Any:
        """
        The root object for this broker (a :class:`Referenceable`).
        """


def findRemoteMethod(obj: object, prefix: str, name: str) -> Any:
    """
    The method ``prefix + name`` of ``obj`` that a peer asked to call.

    Only plain identifiers that do not start with an underscore are looked up, so a peer can
    never reach ``remote___init__`` or a private helper by crafting the name.

    :raises NoSuchMethod: no such callable, or a name that may not be called.
    """
    if not name.isidentifier() or name.startswith("_"):
        raise NoSuchMethod(f"No such method: {prefix}{name!r:.100} is not a callable name")
    method = getattr(obj, prefix + name, None)
    if method is None or not callable(method):
        raise NoSuchMethod(f"No such method: {prefix}{name}")
    return method


def textKeywords(keywords: Any) -> dict[str, Any]:
    """
    Keyword arguments as received, with bytes keys (sent by Python 2 peers) decoded as UTF-8.

    :raises NoSuchMethod: never; :raises TypeError: the keywords are not a dict of names.
    """
    if not isinstance(keywords, dict):
        raise TypeError(f"keyword arguments must arrive as a dictionary, not {type(keywords)}")
    if all(type(key) is str for key in keywords):
        return keywords
    decoded: dict[str, Any] = {}
    for key, value in keywords.items():
        if isinstance(key, bytes):
            key = key.decode("utf-8")
        if not isinstance(key, str):
            raise TypeError(f"keyword names must be text, not {type(key).__name__}")
        decoded[key] = value
    return decoded


def _positional(args: Any) -> tuple[Any, ...]:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    raise TypeError(f"positional arguments must arrive as a tuple, not {type(args).__name__}")


class Serializable(Jellyable):
    """
    The base of every flavor: something a broker knows how to send.
    """

    def processUniqueID(self) -> Any:
        """
        An id for this object within the process; two objects with the same id are sent as
        the same remote reference. Override it for proxies of one underlying object.
        """
        return id(self)


class Referenceable(Serializable):
    """
    Sent by reference: the peer receives a remote reference, and its ``callRemote("name")``
    runs ``remote_name`` here. The result may be a value, a Deferred, or a coroutine (from an
    ``async def`` method), which is awaited.
    """

    #: The perspective this object serialises its results for, if any.
    perspective: Any = None

    def remoteMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        """
        Run the ``remote_`` method a peer called and return its serialised result.
        """
        args = _positional(broker.unserialize(args))
        kw = textKeywords(broker.unserialize(kw))
        method = findRemoteMethod(self, "remote_", message)
        return broker.serialize(method(*args, **kw), self.perspective)

    def jellyFor(self, jellier: Jellier) -> Any:
        if jellier.invoker is None:
            return jellier.unpersistable("a Referenceable can only be sent through a broker")
        return [b"remote", jellier.invoker.registerReference(self)]


@implementer(IPBRoot)
class Root(Referenceable):
    """
    A root object: offered to every peer under the name ``root``. Override
    :meth:`rootObject` to give each connection an object of its own.
    """

    def rootObject(self, broker: Any) -> Any:
        return self


class ViewPoint(Referenceable):
    """
    A reference to ``object`` on behalf of ``perspective``: the peer's calls run
    ``object.view_name(perspective, *args, **kw)``, so the object knows who is calling.
    """

    def __init__(self, perspective: Any, object: Any) -> None:
        self.perspective = perspective
        self.object = object

    def processUniqueID(self) -> Any:
        # One reference per (perspective, object) pair.
        return (id(self.perspective), id(self.object))

    def remoteMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        args = _positional(broker.unserialize(args, self.perspective))
        kw = textKeywords(broker.unserialize(kw, self.perspective))
        method = findRemoteMethod(self.object, "view_", message)
        result = method(self.perspective, *args, **kw)
        return broker.serialize(result, self.perspective, method, args, kw)


class Viewable(Serializable):
    """
    Sent as a :class:`ViewPoint` for the perspective it is being sent to.
    """

    def jellyFor(self, jellier: Jellier) -> Any:
        if jellier.invoker is None:
            return jellier.unpersistable("a Viewable can only be sent through a broker")
        return ViewPoint(jellier.invoker.serializingPerspective, self).jellyFor(jellier)


class Copyable(Serializable):
    """
    Sent by copy: a type tag and a state, from which the peer rebuilds the object with the
    :class:`RemoteCopy` class registered for the tag. Both can depend on the perspective the
    copy is made for.
    """

    def getStateToCopy(self) -> Any:
        """
        The state to send; by default ``__dict__``.
        """
        return self.__dict__

    def getStateToCopyFor(self, perspective: Any) -> Any:
        """
        The state to send to ``perspective``; by default :meth:`getStateToCopy`.
        """
        return self.getStateToCopy()

    def getTypeToCopy(self) -> bytes:
        """
        The type tag to send; by default the fully qualified class name.
        """
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}".encode()

    def getTypeToCopyFor(self, perspective: Any) -> bytes:
        """
        The type tag to send to ``perspective``; by default :meth:`getTypeToCopy`.
        """
        return self.getTypeToCopy()

    def jellyFor(self, jellier: Jellier) -> Any:
        if jellier.invoker is None:
            return getInstanceState(self, jellier)
        perspective = jellier.invoker.serializingPerspective
        tag = self.getTypeToCopyFor(perspective)
        state = self.getStateToCopyFor(perspective)
        sexp = jellier.prepare(self)
        sexp.extend([tag, jellier.jelly(state)])
        return jellier.preserve(self, sexp)


class RemoteCopy(Unjellyable):
    """
    The receiving side of a :class:`Copyable`: register a subclass for the copyable's tag
    (:func:`setCopierForClass`). It is created without calling ``__init__``, then
    :meth:`setCopyableState` installs the state.
    """

    def setCopyableState(self, state: Any) -> None:
        """
        Install the received state; by default it becomes ``__dict__`` (text keys).
        """
        if isinstance(state, dict):
            state = textKeywords(state)
        self.__dict__ = state

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        if unjellier.invoker is None:
            return setInstanceState(self, unjellier, jellyList)
        self.setCopyableState(unjellier.unjelly(jellyList[1]))
        return self
