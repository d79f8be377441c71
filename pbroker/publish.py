"""
Published objects: Cacheables whose state the receiver fetches once, and may keep on disk
between connections so that an unchanged object is not fetched again.

A :class:`Publishable` is sent as a small cache entry (its id, a timestamp and a view point);
the receiving :class:`RemotePublished` then asks for the full state through that view point,
unless it has a copy with the same timestamp saved from an earlier connection. Wait for the
state with :func:`whenReady` or :meth:`RemotePublished.callWhenActivated`.

Unlike ``twisted.spread.publish``, a :class:`RemotePublished` writes nothing to disk unless its
class (or instance) sets :attr:`RemotePublished.cacheDirectory`, and the file name is built
from the peer's strings with every character outside ``[A-Za-z0-9_.-]`` replaced, so a peer
cannot choose where the file goes.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from pbroker import banana, jelly
from pbroker.flavors import Cacheable, RemoteCache, ViewPoint

__all__ = ["Publishable", "RemotePublished", "whenReady"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class Publishable(Cacheable):
    """
    An object published to its peers. Implement :meth:`getStateToPublish` (or
    :meth:`getStateToPublishFor`), and call :meth:`republish` whenever the state changes so
    that saved copies are known to be stale.
    """

    def __init__(self, publishedID: Any) -> None:
        self.republish()
        self.publishedID = publishedID

    def republish(self) -> None:
        """
        Mark the state as changed (a new timestamp).
        """
        self.timestamp = time.time()

    def view_getStateToPublish(self, perspective: Any) -> Any:
        """
        What a :class:`RemotePublished` copy fetches to refresh itself: the state published to
        the calling ``perspective``.
        """
        return self.getStateToPublishFor(perspective)

    def getStateToPublishFor(self, perspective: Any) -> Any:
        """
        The state to publish to ``perspective``; by default :meth:`getStateToPublish`.
        """
        return self.getStateToPublish()

    def getStateToPublish(self) -> Any:
        """
        The state to publish. Override it.
        """
        raise NotImplementedError(f"{type(self).__name__}.getStateToPublishFor")

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        if perspective is not None:
            perspectiveName = str(getattr(perspective, "perspectiveName", "None"))
            service = getattr(perspective, "getService", None)
            serviceName = str(getattr(service(), "serviceName", "None")) if service else "None"
        else:
            perspectiveName = serviceName = "None"
        return {
            "remote": ViewPoint(perspective, self),
            "publishedID": self.publishedID,
            "perspective": perspectiveName,
            "service": serviceName,
            "timestamp": self.timestamp,
        }


# The largest string a saved state may hold (the file, unlike the wire, has no 640 KiB ceiling).
_FILE_SIZE_LIMIT = 2**31


class RemotePublished(RemoteCache):
    """
    The receiving side of a :class:`Publishable`. :meth:`activated` is called (and the
    :meth:`callWhenActivated` callbacks run) once the full state is here.
    """

    _log = Logger()

    #: A directory to keep published state in between connections; ``None``: keep nothing.
    cacheDirectory: str | None = None

    # Set from the state the publisher sends (see Publishable.getStateToCacheAndObserveFor).
    remote: Any
    publishedID: Any
    perspective: Any
    service: Any
    timestamp: Any

    isActivated = False
    _wasCleanWhenLoaded = False

    def getFileName(self, ext: str = "pub") -> str | None:
        """
        Where this object's state is saved, or ``None`` if nothing is saved.
        """
        if self.cacheDirectory is None:
            return None
        parts = (self.service, self.perspective, self.publishedID, ext)
        name = "-".join(_UNSAFE.sub("_", str(part)) for part in parts[:3]) + "." + parts[3]
        return os.path.join(self.cacheDirectory, name)

    def setCopyableState(self, state: Any) -> None:
        self.__dict__.update(state)
        self._activationListeners: list[Callable[[RemotePublished], object]] = []
        self._activationWaiters: list[defer.Deferred[Any]] = []
        saved = self._loadSaved()
        if saved is not None and saved.get("timestamp") == self.timestamp:
            self._wasCleanWhenLoaded = True
            self._cbGotUpdate(saved)
        else:
            self.remote.callRemote("getStateToPublish").addCallbacks(
                self._cbGotUpdate, self._fetchFailed
            )

    def _loadSaved(self) -> dict[str, Any] | None:
        fileName = self.getFileName()
        if fileName is None:
            return None
        try:
            with open(fileName, "rb") as dataFile:
                saved = jelly.loads(dataFile.read(), sizeLimit=_FILE_SIZE_LIMIT)
        except (OSError, banana.BananaError, jelly.InsecureJelly):
            return None
        return saved if isinstance(saved, dict) else None

    def _cbGotUpdate(self, newState: dict[str, Any]) -> None:
        self.__dict__.update(newState)
        self.isActivated = True
        listeners, self._activationListeners = self._activationListeners, []
        for listener in listeners:
            listener(self)
        waiters, self._activationWaiters = self._activationWaiters, []
        for waiter in waiters:
            waiter.callback(self)
        self.activated()
        fileName = self.getFileName()
        if fileName is not None:
            # Made before the file is opened, so that a state that cannot be saved leaves no
            # empty file behind; a file is not the wire, so PB's 640 KiB ceiling is not its.
            try:
                data = jelly.dumps(self._savedState(), sizeLimit=_FILE_SIZE_LIMIT)
            except (jelly.JellyError, banana.BananaError) as e:
                self._log.warn("Not saving {name}: {error}", name=fileName, error=str(e))
                return
            with open(fileName, "wb") as dataFile:
                dataFile.write(data)

    def _fetchFailed(self, failure: Any) -> None:
        # The state could not be fetched (the publisher failed, the connection went): what
        # waits for it through whenReady fails; callWhenActivated callbacks are not called.
        waiters, self._activationWaiters = self._activationWaiters, []
        if not waiters:
            self._log.failure("Could not fetch a published state", failure)
        for waiter in waiters:
            waiter.errback(failure)

    def _whenActivated(self) -> defer.Deferred[Any]:
        if self.isActivated:
            return defer.succeed(self)
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._activationWaiters.append(waiter)
        return waiter

    def _savedState(self) -> dict[str, Any]:
        transient = {"broker", "remote", "luid", "_activationListeners", "isActivated"}
        transient.add("_activationWaiters")
        return {k: v for k, v in self.__dict__.items() if k not in transient}

    def activated(self) -> None:
        """
        Called once the full state has arrived. Override it.
        """

    def callWhenActivated(self, callback: Callable[[RemotePublished], object]) -> None:
        """
        Call ``callback(self)`` once the full state is here (now, if it already is).
        """
        if self.isActivated:
            callback(self)
        else:
            self._activationListeners.append(callback)


def whenReady(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """
    Wrap the Deferred of a call that returns a :class:`Publishable` in one that fires with the
    :class:`RemotePublished` once its state has arrived.

    It fails if the call fails, or if the state cannot be fetched (the publisher failed, or
    the connection was lost).
    """
    ready: defer.Deferred[Any] = defer.Deferred()

    def called(published: Any) -> Any:
        published._whenActivated().addCallbacks(ready.callback, ready.errback)
        return published

    d.addCallbacks(called, lambda failure: ready.errback(failure))
    return ready
