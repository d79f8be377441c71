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
cannot choose where the file goes. The publisher's cache entry and state never set the
receiver's settings and bookkeeping, its methods nor private attributes; a cache that cannot
be written is a warning; and :func:`whenReady` fails, rather than waiting for ever, whenever
the state will not arrive.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pbroker import banana, jelly
from pbroker._native import EXTENT_WITHIN, extent
from pbroker.errors import PBConnectionLost, ProtocolError, describe
from pbroker.flavors import Cacheable, RemoteCache, ViewPoint

__all__ = ["Publishable", "PublishedStateError", "RemotePublished", "whenReady"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")
# The longest file name made from a published object's names (most file systems take 255
# bytes, and the extension follows).
_NAME_LENGTH = 200


def _fileNamePart(text: str) -> str:
    """
    ``text`` as part of a file name: letters, digits, ``_`` and ``.`` as they are, anything
    else (``-`` too, which joins the parts) as ``%`` and the hex of its UTF-8 bytes, so that
    different names never share a file ("price list" and "price_list" did).
    """
    return _UNSAFE.sub(
        lambda match: "".join(
            f"%{byte:02X}" for byte in match.group().encode("utf-8", "surrogatepass")
        ),
        text,
    )


# The most items (as extent() counts them: each appearance) a part of a saved state's file
# name, or a timestamp compared, may stand for: str() and == go through each appearance of
# a list the publisher shares.
_NAME_ITEMS = 10_000


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

# The cache entry a publisher sends (Publishable.getStateToCacheAndObserveFor; stock Twisted
# sends the same five fields).
_ENTRY_FIELDS = frozenset({"remote", "publishedID", "perspective", "service", "timestamp"})
# The entry fields that a published (or saved) state may also carry; "remote" is the entry's only.
_PROTOCOL_FIELDS = _ENTRY_FIELDS - {"remote"}
# The receiver's own settings and bookkeeping, which nothing a publisher sends may set.
_RECEIVER_FIELDS = frozenset({"remote", "cacheDirectory", "isActivated", "broker", "luid"})


class PublishedStateError(ProtocolError):
    """
    A publisher sent what a :class:`RemotePublished` cannot use: a cache entry or a published
    state that is not a dictionary, or a cache entry without one of its fields.
    """


class RemotePublished(RemoteCache):
    """
    The receiving side of a :class:`Publishable`. :meth:`activated` is called (and the
    :meth:`callWhenActivated` callbacks run) once the full state is here.

    The cache entry and the published state become attributes, but never the receiver's
    settings and bookkeeping (:attr:`cacheDirectory`, ``isActivated``, ``broker``,
    ``luid``, ``remote``), a method or other descriptor its class defines, or a private name
    (``_x``): such names are ignored, with a warning. Plain class attributes (``title =
    "untitled"``) are defaults the publisher's values replace, as in Twisted: give a
    subclass's own settings private names (or make them properties), so that a publisher
    cannot set them.
    """

    _log = Logger()

    #: A directory to keep published state in between connections; ``None``: keep nothing.
    cacheDirectory: str | None = None

    # Set from the cache entry the publisher sends (see _ENTRY_FIELDS).
    remote: Any
    publishedID: Any
    perspective: Any
    service: Any
    timestamp: Any

    isActivated = False
    _wasCleanWhenLoaded = False
    # Why the state could not be fetched, once that has happened.
    _fetchFailure: Failure | None = None

    def getFileName(self, ext: str = "pub") -> str | None:
        """
        Where this object's state is saved, or ``None`` if nothing is saved.
        """
        if self.cacheDirectory is None:
            return None
        parts = (self.service, self.perspective, self.publishedID, ext)
        for part in parts[:3]:
            if extent(part, _NAME_ITEMS) != EXTENT_WITHIN:
                raise ValueError(
                    f"a published object named by {describe(part)}, which stands for more than "
                    f"{_NAME_ITEMS:,} items (or holds itself), has no file name"
                )
        name = "-".join(_fileNamePart(str(part)) for part in parts[:3])
        if len(name) > _NAME_LENGTH:
            # (Too long for a file system: the start, and a digest of the whole.)
            digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
            name = f"{name[: _NAME_LENGTH - 33]}-{digest}"
        return os.path.join(self.cacheDirectory, f"{name}.{parts[3]}")

    def setCopyableState(self, state: Any) -> None:
        self._activationListeners: list[Callable[[RemotePublished], object]] = []
        self._activationWaiters: list[defer.Deferred[Any]] = []
        try:
            entry = self._checkEntry(state)
        except PublishedStateError:
            self._fetchFailed(Failure())
            return
        self.__dict__.update(entry)
        saved = self._loadSaved()
        if saved is not None and _sameTimestamp(saved.get("timestamp"), self.timestamp):
            self._wasCleanWhenLoaded = True
            self._cbGotUpdate(saved, save=False)
        else:
            fetched = defer.maybeDeferred(self.remote.callRemote, "getStateToPublish")
            fetched.addCallbacks(self._cbGotUpdate, self._fetchFailed)

    def _checkEntry(self, state: Any) -> dict[str, Any]:
        """
        The fields of a publisher's cache entry, or :class:`PublishedStateError`.
        """
        if not isinstance(state, dict):
            raise PublishedStateError(
                f"a published object's cache entry must be a dictionary, not {describe(state)}"
            )
        entry = self._textKeys(state, "cache entry")
        if "remote" not in entry:
            raise PublishedStateError("a published object's cache entry lacks remote")
        remote = entry.pop("remote")
        if not callable(getattr(remote, "callRemote", None)):
            raise PublishedStateError(
                "the 'remote' of a published object's cache entry must be a reference, "
                f"not {describe(remote)}"
            )
        for name in _PROTOCOL_FIELDS:
            entry.setdefault(name, None)  # (a stock publisher sends them all)
        fields = self._publishedFields(entry, "cache entry", entry["publishedID"])
        fields["remote"] = remote
        return fields

    def _textKeys(self, state: dict[Any, Any], source: str) -> dict[str, Any]:
        """
        ``state`` with bytes keys (from Python 2 peers) decoded; other keys ignored.
        """
        fields: dict[str, Any] = {}
        ignored: list[Any] = []
        for key, value in state.items():
            if isinstance(key, bytes):
                key = key.decode("utf-8", "replace")
            if isinstance(key, str):
                fields[key] = value
            else:
                ignored.append(key)
        self._ignore(ignored, source, state.get("publishedID", self.__dict__.get("publishedID")))
        return fields

    def _ignore(self, names: Any, source: str, publishedID: Any) -> None:
        if names:
            self._log.warn(
                "Ignored {names} in the {source} of published object {publishedID}: "
                "a publisher cannot set them",
                names=describe(sorted(names, key=describe)),
                source=source,
                publishedID=describe(publishedID),
            )

    def _publishedFields(
        self, fields: dict[str, Any], source: str, publishedID: Any, warnPrivate: bool = True
    ) -> dict[str, Any]:
        """
        The ``fields`` a publisher may set; the others are dropped, with a warning (for
        private names, only if ``warnPrivate``).
        """
        refused = [name for name in fields if not self._isPublishedField(name)]
        self._ignore(
            [name for name in refused if warnPrivate or not name.startswith("_")],
            source,
            publishedID,
        )
        return {name: value for name, value in fields.items() if name not in refused}

    def _isPublishedField(self, name: str) -> bool:
        """
        Whether a publisher may set attribute ``name``: not one of the receiver's settings or
        bookkeeping, not private, and not a method or other descriptor of the class (a plain
        class attribute is a default, which it may replace).
        """
        if name in _PROTOCOL_FIELDS:
            return True
        if name in _RECEIVER_FIELDS or name.startswith("_"):
            return False
        for klass in type(self).__mro__:
            if name in vars(klass):
                value = vars(klass)[name]
                return not (callable(value) or hasattr(type(value), "__get__"))
        return True

    def _loadSaved(self) -> dict[str, Any] | None:
        try:
            fileName = self.getFileName()
            if fileName is None:
                return None
            # Read as the state arrived: with the connection's security options and
            # registry (a copy in the state is of a class they allow).
            broker = getattr(self, "broker", None)
            with open(fileName, "rb") as dataFile:
                saved = jelly.loads(
                    dataFile.read(),
                    sizeLimit=_FILE_SIZE_LIMIT,
                    taster=getattr(broker, "security", None),
                    registry=getattr(broker, "registry", None),
                )
        except jelly.InsecureJelly as e:
            # Saved, but not to be read back (a copy in it, of a class the security options
            # do not allow as itself): say why it is fetched each time.
            self._log.warn(
                "Not using the saved state of published object {publishedID} in {name}: "
                "{error}; it is fetched instead",
                publishedID=describe(self.publishedID),
                name=fileName,
                error=str(e),
            )
            return None
        except (OSError, ValueError, banana.BananaError):
            return None
        return saved if isinstance(saved, dict) else None

    def _cbGotUpdate(self, newState: Any, save: bool = True) -> None:
        if not isinstance(newState, dict):
            self._fetchFailed(
                Failure(
                    PublishedStateError(
                        f"the state of published object {describe(self.publishedID)} must be "
                        f"a dictionary, not {describe(newState)}"
                    )
                )
            )
            return
        fields = self._textKeys(newState, "published state")
        # A file saved by an earlier version may hold its private bookkeeping: not a
        # publisher's doing, so dropped without a warning.
        self.__dict__.update(
            self._publishedFields(fields, "published state", self.publishedID, warnPrivate=save)
        )
        self.isActivated = True
        listeners, self._activationListeners = self._activationListeners, []
        for listener in listeners:
            self._run(listener, self)
        waiters, self._activationWaiters = self._activationWaiters, []
        for waiter in waiters:
            waiter.callback(self)
        self._run(self.activated)
        if save:
            self._save()

    def _run(self, function: Callable[..., object], *args: Any) -> None:
        # One failing activation callback neither stops the others nor the saving.
        try:
            function(*args)
        except Exception:
            self._log.failure("Error in the activation callback {function!r}", function=function)

    def _save(self) -> None:
        """
        Save the state in :attr:`cacheDirectory`, if set; a state or file that cannot be
        written is logged as a warning.
        """
        fileName: str | None = None
        try:
            fileName = self.getFileName()
            if fileName is None:
                return
            # Made before the file is opened, so that a state that cannot be saved leaves no
            # empty file behind; a file is not the wire, so PB's 640 KiB ceiling is not its.
            data = jelly.dumps(self._savedState(), sizeLimit=_FILE_SIZE_LIMIT)
            with open(fileName, "wb") as dataFile:
                dataFile.write(data)
        except (OSError, ValueError, jelly.JellyError, banana.BananaError) as e:
            self._log.warn(
                "Not saving published object {publishedID} to {name}: {error}",
                publishedID=describe(self.publishedID),
                name=fileName,
                error=str(e),
            )

    def _fetchFailed(self, failure: Failure) -> None:
        # The state could not be fetched (the publisher failed, the connection went, the state
        # was not a dictionary): what waits for it through whenReady fails, now or later;
        # callWhenActivated callbacks are not called.
        self._fetchFailure = failure
        waiters, self._activationWaiters = self._activationWaiters, []
        if not waiters:
            if failure.check(PBConnectionLost):
                # A connection closed while the state was on its way: no one's error.
                self._log.info(
                    "A published state was not fetched: {reason}", reason=failure.getErrorMessage()
                )
            else:
                self._log.failure("Could not fetch a published state", failure)
        for waiter in waiters:
            waiter.errback(failure)

    def _whenActivated(self) -> defer.Deferred[Any]:
        if self.isActivated:
            return defer.succeed(self)
        if self._fetchFailure is not None:
            return defer.fail(self._fetchFailure)
        waiter: defer.Deferred[Any] = defer.Deferred()
        self.__dict__.setdefault("_activationWaiters", []).append(waiter)
        return waiter

    def _savedState(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if self._isPublishedField(k)}

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


def _sameTimestamp(saved: Any, timestamp: Any) -> bool:
    """
    Whether a saved state's timestamp is the publisher's (``time.time()`` for a stock
    publisher; a datetime or a version tuple will do). Compared only if both stand for
    ``_NAME_ITEMS`` items at most: ``==`` goes through each appearance of a list the
    publisher shares.
    """
    return (
        extent(saved, _NAME_ITEMS) == EXTENT_WITHIN
        and extent(timestamp, _NAME_ITEMS) == EXTENT_WITHIN
        and saved == timestamp
    )


def whenReady(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """
    Wrap the Deferred of a call that returns a :class:`Publishable` in one that fires with the
    :class:`RemotePublished` once its state has arrived.

    It fails if the call fails; with :class:`TypeError` if the call returns something else
    (``None``, say); and if the state cannot be fetched (the publisher failed, the connection
    was lost, or :class:`PublishedStateError`), even if that happened before.
    """
    if not isinstance(d, defer.Deferred):
        # (A one-way call, made with pbanswer=False, gives None.)
        raise TypeError(f"whenReady() takes the Deferred of a call, not {d!r}")
    ready: defer.Deferred[Any] = defer.Deferred()

    def called(published: Any) -> Any:
        if isinstance(published, RemotePublished):
            published._whenActivated().addCallbacks(ready.callback, ready.errback)
        else:
            ready.errback(
                TypeError(
                    "whenReady needs a call that returns a published object (a "
                    f"RemotePublished), not {describe(published)}"
                )
            )
        return published

    d.addCallbacks(called, lambda failure: ready.errback(failure))
    return ready
