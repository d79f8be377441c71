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

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

from twisted.cred.error import LoginFailed
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from pbroker._jellier import Jellier, Jellyable
from pbroker._pacing import PacedTransport
from pbroker._unjellier import Unjellier
from pbroker.banana import DEPTH_LIMIT, Banana, getTokens
from pbroker.errors import (
    DeadReferenceError,
    Error,
    InsecureJelly,
    InvalidJelly,
    LimitExceeded,
    NoSuchMethod,
    PBConnectionLost,
    ProtocolError,
    describe,
)
from pbroker.failure import COPYABLE_FAILURE_TAG, CopiedFailure, CopyableFailure, failure2Copyable
from pbroker.flavors import RemoteCacheObserver
from pbroker.jelly import ISecurityOptions, UnjellyableRegistry, globalRegistry, globalSecurity
from pbroker.references import Local, RemoteReference

__all__ = ["MAX_BROKER_REFS", "PB_VERSION", "Broker", "BrokerLimits"]

#: The protocol version both sides must announce.
PB_VERSION = 6

#: The most objects one connection may export at once (and, separately, cache), by default.
MAX_BROKER_REFS = 1024

# After this many attempts to export beyond the limit the connection is closed.
_MAX_REFERENCE_VIOLATIONS = 3


@dataclass(frozen=True)
class BrokerLimits:
    """
    What one connection may make this side hold, so that a misbehaving peer costs bounded
    memory and work, and other connections keep being served.

    Going over a limit fails the call or value concerned with
    :class:`~pbroker.errors.LimitExceeded` (or :class:`~pbroker.errors.Error` for the
    reference counts, as in Twisted), except where the stream itself can no longer be trusted
    (a message too large or too deep), which closes the connection. Each is logged.

    :ivar messageSize: the most bytes one incoming message may take (``None``: no limit).
    :ivar nestingDepth: the deepest list nesting an incoming message may have.
    :ivar exportedReferences: objects this side exports to the peer by reference at once.
    :ivar cachedObjects: Cacheables the peer holds copies of at once.
    :ivar importedReferences: references to the peer's objects this side holds at once.
    :ivar pendingCalls: calls from the peer still being answered at once.
    :ivar bufferedBytes: bytes written for a peer after its connection stopped taking them
        (a reader that does not read); beyond this the connection is dropped.
    """

    messageSize: int | None = 32 * 1024 * 1024
    nestingDepth: int = DEPTH_LIMIT
    exportedReferences: int = MAX_BROKER_REFS
    cachedObjects: int = MAX_BROKER_REFS
    importedReferences: int = 16 * 1024
    pendingCalls: int = 1000
    bufferedBytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "nestingDepth",
            "exportedReferences",
            "cachedObjects",
            "importedReferences",
            "pendingCalls",
            "bufferedBytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"BrokerLimits.{name} must be at least 1")
        if self.messageSize is not None and self.messageSize < 1:
            raise ValueError("BrokerLimits.messageSize must be at least 1 (or None)")


def _unjellyLocal(unjellier: Unjellier, jellyList: list[Any]) -> Any:
    """
    ``[b"local", luid]``: one of our own objects, sent back to us; it arrives as itself.
    """
    if len(jellyList) != 2:
        raise InvalidJelly(f"a local reference needs one id: {describe(jellyList)}")
    found = unjellier.invoker.localObjectForID(jellyList[1])
    if found is None:
        raise InvalidJelly(f"a local reference to an unknown id: {describe(jellyList[1])}")
    return found


def _cacheID(jellyList: list[Any]) -> int:
    if len(jellyList) != 2 or type(jellyList[1]) is not int:
        raise InvalidJelly(f"a cache reference needs one integer id: {describe(jellyList)}")
    luid: int = jellyList[1]
    return luid


def _unjellyCached(unjellier: Unjellier, jellyList: list[Any]) -> Any:
    """
    ``[b"cached", luid]``: another handle on a copy of the peer's Cacheable we already hold.
    """
    cache = unjellier.invoker.locallyCachedObjects.get(_cacheID(jellyList))
    if cache is None:
        raise InvalidJelly(f"a reference to an unknown cache: {describe(jellyList)}")
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

    version = PB_VERSION
    #: pbroker's dialect first: a pbroker peer chooses it, a stock Twisted peer skips it.
    knownDialects = [b"pbroker1", b"pb", b"none"]
    #: Failures that are the caller's business (a refused login, a method that does not
    #: exist, a deliberate pb.Error): they are sent without logging a traceback here. Others
    #: are logged, as Twisted does.
    quietFailures: ClassVar[tuple[type[BaseException], ...]] = (
        Error,
        NoSuchMethod,
        LoginFailed,
        LimitExceeded,
        InsecureJelly,
    )
    #: The factory that made this broker (it supplies ``unsafeTracebacks``).
    factory: Any = None

    _log = Logger()

    def __init__(
        self,
        isClient: bool = True,
        security: ISecurityOptions | None = None,
        registry: UnjellyableRegistry | None = None,
        limits: BrokerLimits | None = None,
    ) -> None:
        super().__init__(isClient)
        self.limits = BrokerLimits() if limits is None else limits
        # The decoder's limits (read by Banana.connectionMade).
        self.messageSizeLimit = self.limits.messageSize
        self.depthLimit = self.limits.nestingDepth
        #: How many references to the peer's objects this side holds.
        self.importedReferences = 0
        # Request ids of the peer's calls whose answers are still being computed.
        self._answering: set[int] = set()
        self.security: ISecurityOptions = globalSecurity if security is None else security
        self.registry = _brokerRegistry(globalRegistry if registry is None else registry)
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

    # Connection life cycle

    @property
    def peerIsPbroker(self) -> bool:
        """
        Whether the peer chose (or offered and we chose) pbroker's dialect, so it understands
        pbroker's extensions (its password login, for one). ``False`` for stock Twisted peers.
        """
        return self.currentDialect == b"pbroker1"

    def connectionReady(self) -> None:
        self.sendCall(b"version", self.version)
        connects, self.connects = self.connects or [], None
        for notifier in connects:
            try:
                notifier()
            except Exception:
                self._log.failure("Error in a connect notifier")
        if self.factory is not None:
            self.factory.clientConnectionMade(self)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        if self.disconnected:
            return
        self.disconnected = True
        waiting, self.waitingForAnswers = self.waitingForAnswers, {}
        for deferred in waiting.values():
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

    def notifyOnConnect(self, notifier: Callable[[], object]) -> None:
        """
        Call ``notifier()`` once the connection is ready (now, if it already is).
        """
        if self.connects is None:
            notifier()
        else:
            self.connects.append(notifier)

    def notifyOnDisconnect(self, notifier: Callable[[], object]) -> None:
        """
        Call ``notifier()`` when the connection is lost.
        """
        if not callable(notifier):
            raise TypeError(f"notifyOnDisconnect() needs a callable, not {notifier!r}")
        self.disconnects.append(notifier)

    def dontNotifyOnDisconnect(self, notifier: Callable[[], object]) -> None:
        """
        Forget a notifier given to :meth:`notifyOnDisconnect` (no error if it was not).
        """
        if notifier in self.disconnects:
            self.disconnects.remove(notifier)

    # Sending

    def sendCall(self, *expression: Any) -> None:
        """
        Send one PB message, given as its elements.
        """
        self.sendEncoded(list(expression))

    def serialize(
        self,
        object: Any,
        perspective: Any = None,
        method: Any = None,
        args: Any = None,
        kw: Any = None,
    ) -> Any:
        """
        Jelly ``object`` for the peer, on behalf of ``perspective``. A Deferred (or a coroutine,
        which is awaited) gives a Deferred of the jellied result.
        """
        if inspect.iscoroutine(object):
            object = Deferred.fromCoroutine(object)
        if isinstance(object, Deferred):
            return object.addCallback(self.serialize, perspective, method, args, kw)
        self.serializingPerspective = perspective
        self.jellyMethod, self.jellyArgs, self.jellyKw = method, args, kw
        try:
            return Jellier(self.security, None, self).jelly(object)
        finally:
            self.serializingPerspective = None
            self.jellyMethod = self.jellyArgs = self.jellyKw = None

    def unserialize(self, sexp: Any, perspective: Any = None) -> Any:
        """
        Unjelly what the peer sent, on behalf of ``perspective``.
        """
        self.unserializingPerspective = perspective
        try:
            return Unjellier(self.security, None, self, self.registry).unjellyFull(sexp)
        finally:
            self.unserializingPerspective = None

    def newRequestID(self) -> int:
        self.currentRequestID += 1
        return self.currentRequestID

    def newLocalID(self) -> int:
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
    ) -> Deferred[Any] | None:
        """
        Send a call (``prefix`` is ``b""`` or ``b"cache"``) and return the Deferred of its
        answer, or ``None`` for a one-way call (``pbanswer=False``).
        """
        answerRequired = True
        if "pbanswer" in kw:
            kw = dict(kw)
            answerRequired = bool(kw.pop("pbanswer"))
        if self.disconnected:
            failure = Failure(DeadReferenceError("Calling Stale Broker"))
            return fail(failure) if answerRequired else None
        tokens = getTokens(self.currentDialect or b"none", self.sizeLimit, self.prefixLimit)
        self.serializingPerspective = perspective
        self.jellyMethod = message
        try:
            # Arguments and keywords are jellied separately, as every PB peer does.
            netArgs = Jellier(self.security, None, self).encode(args, tokens)
            netKw = Jellier(self.security, None, self).encode(kw, tokens)
            requestID = self.newRequestID()
            data = tokens.joinList(
                [
                    tokens.symbol(prefix + b"message"),
                    tokens.integer(requestID),
                    tokens.integer(objectID)
                    if isinstance(objectID, int)
                    else tokens.symbol(objectID),
                    tokens.symbol(message),
                    tokens.integer(1 if answerRequired else 0),
                    netArgs,
                    netKw,
                ]
            )
        except Exception:
            return fail() if answerRequired else None
        finally:
            self.serializingPerspective = None
            self.jellyMethod = None
        deferred: Deferred[Any] | None = None
        if answerRequired:
            deferred = self.waitingForAnswers[requestID] = Deferred()
        assert self.transport is not None
        self.transport.write(data)
        return deferred

    def importReference(self, luid: int) -> None:
        """
        Count one more reference to the peer's object ``luid`` (called as one arrives).

        :raises LimitExceeded: this side already holds as many as the limits allow. The peer
            is sent a decref for the refused reference, so its count stays right.
        """
        if self.importedReferences >= self.limits.importedReferences:
            self._log.warn(
                "Refusing a reference from the peer: it already gave {count}",
                count=self.importedReferences,
            )
            if not self.disconnected and self.transport is not None:
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
        self.importedReferences -= 1
        if not self._canSend:
            return
        self.sendCall(b"decref", objectID)

    # Paging: pagers send while the pacing transport says the connection takes data.

    def makeConnection(self, transport: Any) -> None:
        # Write through a pacing wrapper: it knows when the peer stops taking data.
        super().makeConnection(PacedTransport(transport, self))  # type: ignore[no-untyped-call]

    def registerPageProducer(self, pager: Any) -> None:
        """
        Have ``pager.sendNextPage()`` called while the connection takes data, until
        ``pager.stillPaging()`` is false.
        """
        self.pageProducers.append(pager)
        self.sendPages()

    def sendPages(self) -> None:
        """
        Send pages from the active pagers until the connection stops taking data, every pager
        is done, or none has a page ready (a pager calls this again when it has one).
        """
        transport = self.transport
        if self._sendingPages or not isinstance(transport, PacedTransport):
            return
        self._sendingPages = True
        try:
            progress = True
            while self.pageProducers and progress and not transport.paused:
                if self.disconnected:
                    break
                progress = False
                for pager in list(self.pageProducers):
                    written = transport.written
                    pager.sendNextPage()
                    progress = progress or transport.written != written
                    if not pager.stillPaging():
                        self.pageProducers.remove(pager)
                        progress = True
        finally:
            self._sendingPages = False

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
            return luid
        if len(self.luids) >= self.limits.exportedReferences:  # named objects do not count
            self._refuseOverLimit("reference")
        luid = self.newLocalID()
        self.localObjects[luid] = Local(object)
        self.luids[puid] = luid
        return luid

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
        return luid

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
        return luid

    def remotelyCachedForLUID(self, luid: int) -> Any:
        """
        Our Cacheable whose copy the peer knows as ``luid``.
        """
        return self.remotelyCachedObjects[luid].object

    def cacheLocally(self, cid: int, instance: Any) -> None:
        """
        Keep the copy of the peer's Cacheable ``cid``.
        """
        self.locallyCachedObjects[cid] = instance

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
        self.sendCall(b"decache", objectID)

    def _stopObserving(self, local: Local) -> None:
        cacheable = local.object
        try:
            cacheable.stoppedObserving(
                local.perspective, RemoteCacheObserver(self, cacheable, local.perspective)
            )
        except Exception:
            self._log.failure("Error in stoppedObserving")

    # Receiving

    def expressionReceived(self, expression: Any) -> None:
        if type(expression) is not list or not expression:
            self._fail(f"a PB message must be a non-empty list: {describe(expression)}")
            return
        command = expression[0]
        entry = self.messageHandlers.get(command) if type(command) is bytes else None
        if entry is None:
            self._log.info("Did not understand PB command {command}", command=describe(command))
            if type(command) is bytes:
                self.sendCall(b"didNotUnderstand", command)
            return
        handler, arity = entry
        if len(expression) - 1 != arity:
            self._fail(f"a {command.decode()!r} message has {arity} fields: {describe(expression)}")
            return
        try:
            handler(self, *expression[1:])
        except ProtocolError as e:
            self._fail(str(e))

    def _version(self, version: Any) -> None:
        if version != self.version:
            raise ProtocolError(f"Version Incompatibility: {self.version} {describe(version)}")

    def _didNotUnderstand(self, command: Any) -> None:
        self._log.warn("The peer did not understand {command}", command=describe(command))

    def _message(self, *fields: Any) -> None:
        self._receiveCall(self.localObjectForID, *fields)

    def _cacheMessage(self, *fields: Any) -> None:
        self._receiveCall(self.cachedLocallyAs, *fields)

    def _receiveCall(
        self,
        find: Callable[[Any], Any],
        requestID: Any,
        objectID: Any,
        message: Any,
        answerRequired: Any,
        netArgs: Any,
        netKw: Any,
    ) -> None:
        """
        Run a call the peer made (``find`` looks up its target: an exported object for
        ``message``, a cache copy for ``cachemessage``) and send its answer or error.
        """
        if type(requestID) is not int or type(message) is not bytes:
            raise ProtocolError(f"malformed message header: {describe([requestID, message])}")
        answerRequired = bool(answerRequired)
        if len(self._answering) >= self.limits.pendingCalls:
            self._log.warn(
                "Refusing a call: {count} calls from the peer are still in progress",
                count=len(self._answering),
            )
            if answerRequired:
                error = LimitExceeded(f"more than {self.limits.pendingCalls} calls in progress")
                self._sendError(CopyableFailure(error), requestID)
            return
        try:
            name = message.decode("utf-8")
            target = find(objectID) if type(objectID) in (int, bytes) else None
            if target is None:
                raise Error("Invalid Object ID")
            result = target.remoteMessageReceived(self, name, netArgs, netKw)
        except Error as e:
            if answerRequired:
                if isinstance(e, Jellyable) or self.security.isClassAllowed(e.__class__):
                    self._sendError(e, requestID)
                else:
                    self._sendError(CopyableFailure(e), requestID)
            return
        except (InsecureJelly, LimitExceeded) as e:
            # The peer sent what this side refuses to take: its mistake, one log line.
            self._log.warn(
                "Refused a call to {method}: {error}", method=describe(message), error=str(e)
            )
            if answerRequired:
                self._sendError(CopyableFailure(e), requestID)
            return
        except Exception:
            failure = CopyableFailure()
            if failure.check(*self.quietFailures) is None:
                self._log.failure("Peer will receive the following PB traceback", failure)
            if answerRequired:
                self._sendError(failure, requestID)
            return
        if not answerRequired:
            if isinstance(result, Deferred):
                result.addErrback(self._logOneWayFailure)
            return
        if isinstance(result, Deferred):
            self._answering.add(requestID)
            result.addCallbacks(
                self._sendAnswer,
                self._sendFailureOrError,
                callbackArgs=(requestID,),
                errbackArgs=(requestID,),
            )
        else:
            self._sendAnswer(result, requestID)

    def _logOneWayFailure(self, failure: Failure) -> None:
        self._log.failure("A one-way remote call failed", failure)

    def _sendAnswer(self, netResult: Any, requestID: int) -> None:
        self._answering.discard(requestID)
        if self.disconnected:
            return
        try:
            self.sendCall(b"answer", requestID, netResult)
        except Exception:
            # The result cannot be sent (too large, say): the caller gets that instead.
            self._sendFailureOrError(Failure(), requestID)

    def _sendFailureOrError(self, failure: Failure, requestID: int) -> None:
        if failure.check(*self.quietFailures) is None:
            self._log.failure("Peer will receive the following PB traceback", failure)
        self._sendError(failure, requestID)

    def _sendError(self, failure: Any, requestID: int) -> None:
        self._answering.discard(requestID)
        if self.disconnected:
            return
        if isinstance(failure, Failure):
            value = failure.value
            if isinstance(value, Jellyable) or self.security.isClassAllowed(value.__class__):
                failure = value
            elif not isinstance(failure, CopyableFailure):
                failure = failure2Copyable(failure, self._unsafeTracebacks())
        if isinstance(failure, CopyableFailure):
            failure.unsafeTracebacks = self._unsafeTracebacks()
        try:
            self.sendCall(b"error", requestID, self.serialize(failure))
        except Exception:
            self._log.failure("Could not send an error to the peer")
            self.sendCall(
                b"error",
                requestID,
                self.serialize(failure2Copyable(Failure(), self._unsafeTracebacks())),
            )

    def _unsafeTracebacks(self) -> bool:
        return bool(getattr(self.factory, "unsafeTracebacks", False))

    def _takeWaiting(self, requestID: Any) -> Deferred[Any]:
        deferred = self.waitingForAnswers.pop(requestID, None) if type(requestID) is int else None
        if deferred is None:
            raise ProtocolError(f"an answer to a request never made: {describe(requestID)}")
        return deferred

    def _answer(self, requestID: Any, netResult: Any) -> None:
        deferred = self._takeWaiting(requestID)
        try:
            result = self.unserialize(netResult)
        except Exception:  # refused or over a limit: this call fails, the link stays
            deferred.errback()
        else:
            deferred.callback(result)

    def _error(self, requestID: Any, netFailure: Any) -> None:
        deferred = self._takeWaiting(requestID)
        try:
            failure = self.unserialize(netFailure)
        except Exception:
            deferred.errback()
            return
        if isinstance(failure, Failure):
            deferred.errback(failure)
        elif isinstance(failure, BaseException):
            deferred.errback(Failure(failure))
        else:
            deferred.errback(
                Failure(Error(f"the peer sent a non-exception error: {describe(failure)}"))
            )

    def _decref(self, objectID: Any) -> None:
        local = self.localObjects.get(objectID) if type(objectID) is int else None
        if local is None:
            raise ProtocolError(f"decref of an unknown object id: {describe(objectID)}")
        if local.decref() == 0:
            del self.localObjects[objectID]
            puid = local.object.processUniqueID()
            self.luids.pop(puid, None)
            cleanup = self.localCleanup.pop(puid, None)
            if cleanup is not None:
                cleanup()

    def _decache(self, objectID: Any) -> None:
        local = self.remotelyCachedObjects.get(objectID) if type(objectID) is int else None
        if local is None:
            raise ProtocolError(f"decache of an unknown cache id: {describe(objectID)}")
        if local.decref() == 0:
            del self.remotelyCachedObjects[objectID]
            self.remotelyCachedLUIDs.pop(local.object.processUniqueID(), None)
            self._stopObserving(local)
            self.sendCall(b"uncache", objectID)

    def _uncache(self, objectID: Any) -> None:
        cache = self.locallyCachedObjects.pop(objectID, None) if type(objectID) is int else None
        if cache is None:
            raise ProtocolError(f"uncache of an unknown cache id: {describe(objectID)}")
        cache.broker = None

    #: command -> (handler, number of fields). Subclasses extend a copy for new messages.
    messageHandlers: ClassVar[dict[bytes, tuple[Handler, int]]] = {
        b"version": (_version, 1),
        b"didNotUnderstand": (_didNotUnderstand, 1),
        b"message": (_message, 6),
        b"cachemessage": (_cacheMessage, 6),
        b"decache": (_decache, 1),
        b"uncache": (_uncache, 1),
        b"answer": (_answer, 2),
        b"error": (_error, 2),
        b"decref": (_decref, 1),
    }
