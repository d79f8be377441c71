"""
The flavors of remotely usable objects: the base classes applications subclass.

A value sent through a broker travels according to its flavor:

* :class:`Referenceable` (and :class:`Root`): by reference; the peer gets a
  :class:`~pbroker.references.RemoteReference` and its calls run ``remote_*`` methods here.
* :class:`Viewable`: by reference through a :class:`ViewPoint`, whose calls run ``view_*``
  methods with the caller's perspective as first argument.
* :class:`Copyable`: by copy; the peer rebuilds it with the :class:`RemoteCopy` subclass
  registered for its type tag.
* :class:`Cacheable`: copied once per connection into a :class:`RemoteCache`, then kept up to
  date: the owner calls ``observe_*`` methods on the copies through a
  :class:`RemoteCacheObserver`.

This module holds no wire code. The hooks it calls on the broker it is serialised through
(``registerReference``, ``serialize``, ``unserialize``, ``serializingPerspective``) are the
broker's contract, reached as ``jellier.invoker`` / ``unjellier.invoker``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from zope.interface import Interface, implementer

from pbroker._jellier import Jellier, Jellyable, getInstanceState
from pbroker._jellycore import isPeerID, qual
from pbroker._unjellier import Unjellier, Unjellyable, setInstanceState
from pbroker.errors import DeadReferenceError, InvalidJelly, JellyError, NoSuchMethod, ProtocolError
from pbroker.jelly import (
    setUnjellyableFactoryForClass,
    setUnjellyableForClass,
    setUnjellyableForClassTree,
    unjellyableRegistry,
)

__all__ = [
    "Cacheable",
    "Copyable",
    "IPBRoot",
    "Jellyable",
    "NoSuchMethod",
    "Referenceable",
    "RemoteCache",
    "RemoteCacheMethod",
    "RemoteCacheObserver",
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
    "unjellyableRegistry",
]

#: The tags of the PB flavours on the wire (see docs/wire.rst), under Twisted's names.
copy_atom = b"copy"
cache_atom = b"cache"
cached_atom = b"cached"
remote_atom = b"remote"

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
        wanted = prefix + name
        # (Shown as it is if it can be, else quoted: a name from the peer may hold anything.)
        shown = wanted if wanted.isprintable() and len(wanted) <= 100 else f"{wanted!r:.100}"
        raise NoSuchMethod(f"No such method: {shown} (not a name that may be called)")
    method = getattr(obj, prefix + name, None)
    if method is None or not callable(method):
        raise NoSuchMethod(f"No such method: {prefix}{name}")
    return method


def textKeywords(keywords: Any) -> dict[str, Any]:
    """
    Keyword arguments as received, with bytes keys (sent by Python 2 peers) decoded as UTF-8.

    :raises ~pbroker.errors.InvalidJelly: the keywords are not a dict of names (the peer's
        mistake: its call is refused in one log line, not as the method's error).
    """
    if not isinstance(keywords, dict):
        raise InvalidJelly(
            f"keyword arguments must arrive as a dictionary, not {type(keywords).__name__}"
        )
    if not keywords:
        return keywords
    if all(type(key) is str for key in keywords):
        return keywords
    decoded: dict[str, Any] = {}
    for key, value in keywords.items():
        if isinstance(key, bytes):
            try:
                key = key.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidJelly(f"a keyword name must be UTF-8, not {key!r:.100}") from None
        if not isinstance(key, str):
            raise InvalidJelly(f"keyword names must be text, not {type(key).__name__}")
        decoded[key] = value
    return decoded


def _positional(args: Any) -> tuple[Any, ...]:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):  # (a subclass's own; a broker unserialises them as a tuple)
        return tuple(args)
    raise InvalidJelly(f"positional arguments must arrive as a tuple, not {type(args).__name__}")


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
        args, kw = broker.unserializeCall(args, kw)
        args, kw = _positional(args), textKeywords(kw)
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
        """
        This object itself, for every connection.
        """
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
        args, kw = broker.unserializeCall(args, kw, self.perspective)
        args, kw = _positional(args), textKeywords(kw)
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
        The type tag to send; by default the class's name as every PB peer gives it,
        ``module.Name`` (also for a class nested in another).
        """
        return qual(type(self)).encode()

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


# The types whose empty values a copy takes as "no attributes", as Twisted takes any false
# state; others (an application's class with its own ``__bool__``) are not asked.
_EMPTIABLE = (list, tuple, set, frozenset, str, bytes, int, float)


class RemoteCopy(Unjellyable):
    """
    The receiving side of a :class:`Copyable`: register a subclass for the copyable's tag
    (:func:`setCopierForClass`). It is created without calling ``__init__``, then
    :meth:`setCopyableState` installs the state.
    """

    def setCopyableState(self, state: Any) -> None:
        """
        Install the received state; by default it becomes ``__dict__`` (text keys). An empty
        state (``None``, which ``__getstate__`` gives for an object without attributes, or an
        empty list, string or zero) leaves no attributes, as in Twisted.

        :raises ~pbroker.errors.InvalidJelly: the state is not a dictionary with text keys
            (the peer's fault).
        """
        if state is None or (isinstance(state, _EMPTIABLE) and not state):
            state = {}
        elif not isinstance(state, dict):
            raise InvalidJelly(
                f"a copy of {qual(type(self))} needs a dictionary state, not {type(state).__name__}"
            )
        try:
            state = textKeywords(state)
        except InvalidJelly:
            raise InvalidJelly(
                f"the state of a copy of {qual(type(self))} has a key that is not text"
            ) from None
        self.__dict__ = state

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        if unjellier.invoker is None:
            return setInstanceState(self, unjellier, jellyList)
        self.setCopyableState(unjellier.unjelly(jellyList[1]))
        return self


class Cacheable(Copyable):
    """
    Copied once per connection, then kept up to date by its owner.

    The first time it is sent over a connection the peer gets a copy (its registered
    :class:`RemoteCache` class) and this object gets an observer for it, through
    :meth:`getStateToCacheAndObserveFor`. Calls on the observer run ``observe_*`` methods of
    the copy. Later sends over the same connection refer to the same copy. When the peer drops
    its last copy, or the connection is lost, :meth:`stoppedObserving` is called.
    """

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: RemoteCacheObserver) -> Any:
        """
        The state to send to a new copy, and the observer that reaches it; by default
        :meth:`~pbroker.flavors.Copyable.getStateToCopyFor`. Keep the observer to send updates.
        """
        return self.getStateToCopyFor(perspective)

    def stoppedObserving(self, perspective: Any, observer: RemoteCacheObserver) -> None:
        """
        The copy reached by ``observer`` is going; stop sending it updates. While this runs
        (when the peer dropped its copy) ``observer``, or an equal one kept from
        :meth:`getStateToCacheAndObserveFor`, can still send the copy a last call, as in
        Twisted; after it returns, calls through it fail.
        """

    def jellyFor(self, jellier: Jellier) -> Any:
        broker = jellier.invoker
        if broker is None:
            return getInstanceState(self, jellier)
        luid = broker.cachedRemotelyAs(self, incref=True)
        if luid is not None:
            return [b"cached", luid]
        luid = broker.cacheRemotely(self)
        perspective = broker.serializingPerspective
        try:
            tag = self.getTypeToCopyFor(perspective)
            observer = RemoteCacheObserver(broker, self, perspective)
            state = self.getStateToCacheAndObserveFor(perspective, observer)
            sexp = jellier.prepare(self)
            sexp.extend([tag, luid, jellier.jelly(state)])
        except BaseException:
            # Nothing was sent: a later send must not take the copy for the peer's.
            broker.forgetRemoteCache(luid)
            raise
        return jellier.preserve(self, sexp)


class RemoteCache(RemoteCopy, Serializable):
    """
    The peer's copy of a :class:`Cacheable`: register a subclass for the cacheable's tag. Its
    ``observe_*`` methods are called by the owner to update it.

    Every receipt of the cacheable yields another handle sharing one state, and each handle,
    when garbage-collected, tells the owner (a ``decache``), so the owner knows when the last
    one is gone.
    """

    broker: Any = None
    luid: Any = None

    def remoteMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        """
        Run the ``observe_`` method the cache's owner called on this copy, and return its
        serialised result.
        """
        args, kw = broker.unserializeCall(args, kw)
        args, kw = _positional(args), textKeywords(kw)
        method = findRemoteMethod(self, "observe_", message)
        return broker.serialize(method(*args, **kw), None, method, args, kw)

    def jellyFor(self, jellier: Jellier) -> Any:
        if jellier.invoker is None:
            return getInstanceState(self, jellier)
        if jellier.invoker is not self.broker:
            raise JellyError("a RemoteCache can only be sent back over the connection it came from")
        self.broker.keepUntilSent(self)  # its decache must not overtake the value naming it
        return [b"lcache", self.luid]

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> Any:
        broker = unjellier.invoker
        if broker is None:
            return setInstanceState(self, unjellier, jellyList)
        if len(jellyList) != 3 or not isPeerID(jellyList[1]):
            raise InvalidJelly(
                "a cacheable needs [tag, id, state], an integer id from 1 below 2**61 - 1: "
                f"{jellyList!r:.100}"
            )
        luid = jellyList[1]
        # This first instance holds the shared state; callers get handles ("borgs") on it.
        # (Its broker is set once the copy is kept: one refused must not release it again
        # when collected, the refusal having released what the peer counted.)
        broker.cacheLocally(luid, self)
        self.broker = broker
        self.luid = luid
        handle = self._borgify()
        # As in Twisted: __init__ (without arguments) runs on each received cache, before its
        # state is set, so that what a subclass sets up there exists.
        handle.__init__()  # type: ignore[misc]
        handle.setCopyableState(unjellier.unjelly(jellyList[2]))
        # setCopyableState may have replaced __dict__: share whatever it installed.
        self.__dict__ = handle.__dict__
        self.broker = broker
        self.luid = luid
        return handle

    def _borgify(self) -> RemoteCache:
        """
        Another handle on this cache: a new instance sharing this one's ``__dict__``.
        """
        handle: RemoteCache = type(self).__new__(type(self))
        handle.__dict__ = self.__dict__
        return handle

    def __del__(self) -> None:
        # Each handle tells the owner it is gone. The first instance, kept in the broker's
        # table, only dies after the owner's uncache has cleared the shared broker.
        broker = self.__dict__.get("broker")
        if broker is not None:
            broker.decCacheRef(self.luid)


def _methodName(name: object) -> bytes:
    """
    The wire form of a remote method's name (what callRemote is given), or TypeError for
    what cannot be one.
    """
    if isinstance(name, str):
        try:
            return name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"a remote method's name must be valid Unicode text, not {name!r:.100} (it holds "
                "a lone surrogate)"
            ) from None
    if isinstance(name, bytes):
        return name
    raise TypeError(f"a remote method's name must be text, not {name!r}")


class RemoteCacheObserver:
    """
    How a :class:`Cacheable`'s owner reaches one peer's copy: ``callRemote("name", ...)`` runs
    ``observe_name`` there.
    """

    def __init__(self, broker: Any, cached: Cacheable, perspective: Any) -> None:
        self.broker = broker
        self.cached = cached
        self.perspective = perspective

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Any:
        """
        Call ``observe_<_name>`` on the copy; a Deferred of the result, as with references.
        """
        name = _methodName(_name)
        if self.broker.disconnected:
            # As a call through any reference on a lost connection, and as stock PB: what
            # code written for it traps (in stoppedObserving too, which the loss runs).
            raise DeadReferenceError("Calling Stale Broker")
        cacheID = self.broker.cachedRemotelyAs(self.cached)
        if cacheID is None:
            # A copy the peer dropped still reaches it while stoppedObserving runs.
            cacheID = self.broker._farewellID(self.cached)
            if cacheID is None:
                gone = ProtocolError("the copy this observer reached is gone")
                if not kw.get("pbanswer", True):
                    raise gone  # a one-way call has no Deferred to fail (see pb.rst)
                return fail(gone)
        return self.broker._sendMessage(b"cache", self.perspective, cacheID, name, args, kw)

    def remoteMethod(self, key: str) -> RemoteCacheMethod:
        """
        The ``observe_<key>`` method of the copy, callable like a local function.
        """
        return RemoteCacheMethod(key, self.broker, self.cached, self.perspective)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RemoteCacheObserver):
            return (self.broker, self.perspective, self.cached) == (
                other.broker,
                other.perspective,
                other.cached,
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self.broker), id(self.perspective), id(self.cached)))

    def __repr__(self) -> str:
        return f"<RemoteCacheObserver {self.cached!r} for {self.perspective!r}>"


class RemoteCacheMethod:
    """
    One ``observe_`` method of a peer's copy, callable like a local function.
    """

    def __init__(self, name: str, broker: Any, cached: Cacheable, perspective: Any) -> None:
        self.name = name
        self.observer = RemoteCacheObserver(broker, cached, perspective)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.observer.callRemote(self.name, *args, **kw)
