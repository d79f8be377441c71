"""
The caller's side of remote objects: :class:`RemoteReference` and :class:`RemoteMethod`,
and :class:`Local`, the broker's record of an object it exports.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import total_ordering
from typing import TYPE_CHECKING, Any, Literal, overload

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pbroker._jellier import Jellier
from pbroker._jellycore import isPeerID
from pbroker._unjellier import Unjellier
from pbroker.context import CallOptions
from pbroker.errors import InvalidJelly, JellyError
from pbroker.flavors import Serializable, _methodName

if TYPE_CHECKING:  # (the broker, a layer above, makes references: named for types only)
    from pbroker.broker import Broker

_log = Logger()

__all__ = ["CallingWithOptions", "Local", "RemoteMethod", "RemoteReference"]


class Local:
    """
    An object this side exports, with the number of references the peer holds to it.
    """

    def __init__(self, object: Any, perspective: Any = None) -> None:
        self.object = object
        self.perspective = perspective
        self.refcount = 1

    def __repr__(self) -> str:
        return f"<pbroker.Local {self.object!r} ref:{self.refcount}>"

    def incref(self) -> int:
        """
        Count one more reference the peer holds; the new count.
        """
        self.refcount += 1
        return self.refcount

    def decref(self) -> int:
        """
        Count one reference fewer; the new count (at 0 the object is no longer exported).
        """
        self.refcount -= 1
        return self.refcount


@total_ordering
class RemoteReference(Serializable):
    """
    A reference to an object on the other side of a broker (a Referenceable, a ViewPoint or
    an avatar). Calls are asynchronous: :meth:`callRemote` returns a Deferred.

    When the reference is garbage-collected the owner is told (one ``decref`` per reference
    received), except for the root reference, which is not counted.

    :ivar broker: the broker the reference came through.
    :ivar luid: the owner's id for the object (``b"root"`` for the root object).
    """

    def __init__(
        self, perspective: Any, broker: Broker, luid: int | bytes, doRefCount: bool
    ) -> None:
        self.luid = luid
        self.broker = broker
        self.doRefCount = doRefCount
        self.perspective = perspective
        self.disconnectCallbacks: list[Callable[[RemoteReference], object]] = []

    @overload
    def callRemote(
        self, _name: str | bytes, *args: Any, pbanswer: Literal[False], **kw: Any
    ) -> None: ...

    @overload
    def callRemote(
        self, _name: str | bytes, *args: Any, pbanswer: Literal[True] = ..., **kw: Any
    ) -> Deferred[Any]: ...

    @overload
    def callRemote(
        self, _name: str | bytes, *args: Any, pbanswer: bool, **kw: Any
    ) -> Deferred[Any] | None: ...

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Deferred[Any] | None:
        """
        Call the remote method ``_name`` with ``args`` and ``kw``.

        :returns: a Deferred that fires with the result, or fails with the remote failure; or
            ``None`` for a one-way call made with ``pbanswer=False``.
        :raises ~pbroker.errors.DeadReferenceError: the broker is already disconnected (raised
            at once, as Twisted raises it).
        :raises Exception: a one-way call that cannot be sent (too large, not serialisable)
            raises why, having no Deferred to fail.
        """
        result: Deferred[Any] | None = self.broker._sendMessage(
            b"", self.perspective, self.luid, _methodName(_name), args, kw
        )
        return result

    def withOptions(
        self,
        timeout: float | None = None,
        context: dict[str, Any] | None = None,
        reply: dict[str, Any] | None = None,
        ordered: bool = True,
    ) -> CallingWithOptions:
        """
        This reference with call options: ``ref.withOptions(timeout=5).callRemote(...)``.

        :param timeout: seconds after which the call fails with
            :class:`twisted.internet.defer.TimeoutError` (and is cancelled on the peer, in the
            native dialect).
        :param context: annotations the remote method reads with
            :func:`pbroker.context.current` (native dialect only).
        :param reply: a dict to receive the annotations the remote method answers with.
        :param ordered: ``False`` lets a small call reach the peer before large calls made
            earlier that are still being sent (native dialect only); by default calls keep
            the order they were made in.

        See :mod:`pbroker.context`. Options never take a keyword name from the remote method.
        """
        return CallingWithOptions(self, CallOptions(timeout, context, reply, ordered))

    def remoteMethod(self, key: str) -> RemoteMethod:
        """
        A callable that calls the remote method ``key``.
        """
        return RemoteMethod(self, key)

    def notifyOnDisconnect(self, callback: Callable[[RemoteReference], object]) -> None:
        """
        Call ``callback(self)`` when the broker disconnects (at once, if it already has).
        """
        if not callable(callback):
            raise TypeError(f"notifyOnDisconnect() needs a callable, not {callback!r}")
        self.disconnectCallbacks.append(callback)
        if len(self.disconnectCallbacks) == 1:
            self.broker.notifyOnDisconnect(self._disconnected)

    def dontNotifyOnDisconnect(self, callback: Callable[[RemoteReference], object]) -> None:
        """
        Forget a callback given to :meth:`notifyOnDisconnect` (no error if it was not).
        """
        if callback in self.disconnectCallbacks:
            self.disconnectCallbacks.remove(callback)
            if not self.disconnectCallbacks:
                self.broker.dontNotifyOnDisconnect(self._disconnected)

    def _disconnected(self) -> None:
        # Each runs, and each failure is logged, as the broker does for its own notifiers:
        # one raising callback must not skip the cleanup of the others.
        callbacks, self.disconnectCallbacks = self.disconnectCallbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                _log.failure(
                    "Error in a reference's disconnect callback {callback!r}", callback=callback
                )

    def jellyFor(self, jellier: Jellier) -> Any:
        # Sent back to its owner, a reference arrives there as the original object.
        if jellier.invoker is None:
            return jellier.unpersistable("References cannot be serialized")
        if jellier.invoker is not self.broker:
            raise JellyError("a RemoteReference can only be sent over the connection it came from")
        self.broker.keepUntilSent(self)  # its decref must not overtake the value naming it
        return [b"local", self.luid]

    def unjellyFor(self, unjellier: Unjellier, jellyList: list[Any]) -> RemoteReference:
        """
        Become the reference a ``[b"remote", luid]`` expression names, counting it on the
        broker that received it.
        """
        if len(jellyList) != 2 or not isPeerID(jellyList[1]):
            raise InvalidJelly(
                "a remote reference needs one integer id from 1 below 2**61 - 1: "
                f"{jellyList!r:.100}"
            )
        broker = unjellier.invoker
        broker.importReference(jellyList[1])
        self.__init__(broker.unserializingPerspective, broker, jellyList[1], True)  # type: ignore[misc]
        return self

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RemoteReference):
            return self.broker is other.broker and self.luid == other.luid
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.luid)

    def __lt__(self, other: object) -> bool:
        # References through one broker sort by luid (numbered ones before named ones), as
        # in Twisted; others do not compare. (functools.total_ordering adds the rest.)
        if not isinstance(other, RemoteReference) or other.broker is not self.broker:
            return NotImplemented
        return (type(self.luid) is bytes, self.luid) < (type(other.luid) is bytes, other.luid)

    def __repr__(self) -> str:
        return f"<RemoteReference {self.luid!r} at 0x{id(self):x}>"

    def __del__(self) -> None:
        broker = getattr(self, "broker", None)
        if getattr(self, "doRefCount", False) and broker is not None:
            broker.sendDecRef(self.luid)


class CallingWithOptions:
    """
    A remote reference with call options (see :meth:`RemoteReference.withOptions`).
    """

    def __init__(self, reference: RemoteReference, options: CallOptions) -> None:
        self.reference = reference
        self.options = options

    @overload
    def callRemote(
        self, _name: str | bytes, *args: Any, pbanswer: Literal[False], **kw: Any
    ) -> None: ...

    @overload
    def callRemote(
        self, _name: str | bytes, *args: Any, pbanswer: Literal[True] = ..., **kw: Any
    ) -> Deferred[Any]: ...

    @overload
    def callRemote(
        self, _name: str | bytes, *args: Any, pbanswer: bool, **kw: Any
    ) -> Deferred[Any] | None: ...

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Deferred[Any] | None:
        """
        Call the remote method ``_name`` as :meth:`RemoteReference.callRemote` does, with
        these options.
        """
        ref = self.reference
        result: Deferred[Any] | None = ref.broker._sendMessage(
            b"", ref.perspective, ref.luid, _methodName(_name), args, kw, self.options
        )
        return result

    def notifyOnDisconnect(self, callback: Callable[[RemoteReference], object]) -> None:
        """
        The reference's :meth:`RemoteReference.notifyOnDisconnect`: what watches the
        connection (:func:`pbroker.util.getAllPages`, say) watches it through the options too.
        """
        self.reference.notifyOnDisconnect(callback)

    def dontNotifyOnDisconnect(self, callback: Callable[[RemoteReference], object]) -> None:
        """
        The reference's :meth:`RemoteReference.dontNotifyOnDisconnect`.
        """
        self.reference.dontNotifyOnDisconnect(callback)


class RemoteMethod:
    """
    One remote method, callable like a local one: ``RemoteMethod(ref, "add")(1, 2)``.
    """

    def __init__(self, obj: RemoteReference, name: str) -> None:
        self.obj = obj
        self.name = name

    @overload
    def __call__(self, *args: Any, pbanswer: Literal[False], **kw: Any) -> None: ...

    @overload
    def __call__(self, *args: Any, pbanswer: Literal[True] = ..., **kw: Any) -> Deferred[Any]: ...

    @overload
    def __call__(self, *args: Any, pbanswer: bool, **kw: Any) -> Deferred[Any] | None: ...

    def __call__(self, *args: Any, **kw: Any) -> Deferred[Any] | None:
        result: Deferred[Any] | None = self.obj.callRemote(self.name, *args, **kw)
        return result

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RemoteMethod):
            return self.obj == other.obj and self.name == other.name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.obj, self.name))
