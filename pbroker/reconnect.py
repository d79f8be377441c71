"""
A client that stays connected: it reconnects with backoff, logs in again each time, and tells
the application about each new root or avatar.

Every PB application ends up writing this; :class:`ReconnectingClient` is a Twisted service::

    client = ReconnectingClient("tcp:broker.example:8789", UsernamePassword(b"alice", b"pw"),
                                onConnect=lambda avatar: print("connected", avatar))
    client.startService()
    # ... then, in a coroutine:
    avatar = await client.whenReady()          # the current avatar (or root), waiting if needed
    result = await client.callRemote("whoAmI")
    # with call options; the timeout counts any wait for a connection too:
    result = await client.withOptions(timeout=5).callRemote("whoAmI")

The client holds at most one connection at a time: a new attempt starts only once the last
connection is closed. Each of these counts as one failed attempt: a connection that fails, a
login that is refused, an attempt not connected and logged in within ``attemptTimeout`` seconds
(60 by default: a peer that accepts the connection but never answers), an ``onConnect`` that
fails. That connection is closed and the next attempt comes after the retry policy's delay
(exponential backoff by default). The backoff starts over once a connection has stayed up
longer than the delay before it, so a server that logs the client in and hangs up at once is
not reconnected to ever faster. With ``maxRetries``,
:meth:`~ReconnectingClient.whenReady` and :meth:`~ReconnectingClient.callRemote` fail with
:class:`~pbroker.errors.PBConnectionLost` once that many attempts in a row have failed, instead
of waiting for ever: callers already waiting then, and new callers at once until a login
succeeds again (the client keeps trying in the background). The error's ``lastFailure`` is the
Failure the last attempt failed with, so that a refused login
(``lastFailure.check(UnauthorizedLogin)``) can be told from a network error.

This module owns the retry loop and the login on each connection; the broker and the login
exchange are :mod:`pbroker.pb`'s.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pbroker.broker import Broker, _timedOut, _timeoutError, _timeoutNamed
from pbroker.context import CallOptions
from pbroker.errors import (
    PBConnectionLost,
    checkReactorTime,
    describe,
    isInteger,
    isSeconds,
    toSeconds,
)
from pbroker.flavors import _methodName
from pbroker.pb import PBClientFactory, _checkedCredentials
from pbroker.references import CallingWithOptions, RemoteReference

__all__ = ["ReconnectingCalls", "ReconnectingClient"]


#: Twisted's backoff, as ClientService uses it: the delay before each retry.
_defaultPolicy = backoffPolicy()


class ReconnectingClient(Service):
    """
    Keeps one logged-in connection to a broker (see the module docstring).

    :param endpoint: a client endpoint string or object.
    :param credentials: what to log in with each time (``UsernamePassword``, ``Anonymous()``,
        ``pb.CertificateLogin()``), or ``None`` to use the root object.
    :param client: the "mind" given at each login.
    :param onConnect: called with each new avatar (or root) once it is ready; a Deferred it
        returns is waited for before the connection counts as ready (so it should use the
        avatar it is given, not wait for :meth:`whenReady`). If it fails, the attempt fails.
    :param maxRetries: failed attempts in a row after which callers fail; ``None`` waits for
        ever.
    :param retryPolicy: seconds to wait before attempt ``n`` (``backoffPolicy()`` by default).
        Should it raise, or give anything but a finite number of seconds from 0 up, the
        failure is logged and the default policy's delay is used for that attempt.
    :param factory: a :class:`~pbroker.pb.PBClientFactory` to use (for its security options,
        registry or limits), for this client only; a new one by default.
    :param reactor: the reactor to connect and wait with (and, with the client's own
        factory, to time calls and pings with).
    :param attemptTimeout: seconds an attempt may take to connect, get the root and log in
        (``onConnect`` is not counted) before its connection is closed and it counts as
        failed; ``None`` for no limit.
    """

    _log = Logger()

    def __init__(
        self,
        endpoint: str | IStreamClientEndpoint,
        credentials: Any = None,
        client: Any = None,
        onConnect: Callable[[RemoteReference], object] | None = None,
        maxRetries: int | None = None,
        retryPolicy: Callable[[int], float] | None = None,
        factory: PBClientFactory | None = None,
        reactor: Any = None,
        attemptTimeout: float | None = 60.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        else:
            checkReactorTime("reactor", reactor)
        if factory is not None and not isinstance(factory, PBClientFactory):
            raise TypeError(
                f"factory must be a pb.PBClientFactory (or None), not {describe(factory)}"
            )
        if credentials is not None:
            _checkedCredentials(credentials, read=False)
        if maxRetries is not None:
            if not isInteger(maxRetries):
                raise TypeError(f"maxRetries must be an integer (or None), not {maxRetries!r}")
            if maxRetries < 1:
                raise ValueError(
                    f"maxRetries must be at least 1 (or None), not {describe(maxRetries)}"
                )
            maxRetries = operator.index(maxRetries)
        if attemptTimeout is not None:
            if not isSeconds(attemptTimeout):
                raise TypeError(
                    f"attemptTimeout must be a number of seconds (or None), not {attemptTimeout!r}"
                )
            if not attemptTimeout > 0:
                raise ValueError(
                    f"attemptTimeout must be above 0 (or None), not {describe(attemptTimeout)}"
                )
            attemptTimeout = toSeconds(attemptTimeout)
        if retryPolicy is not None and not callable(retryPolicy):
            raise TypeError(f"retryPolicy must be callable (or None), not {retryPolicy!r}")
        if onConnect is not None and not callable(onConnect):
            raise TypeError(f"onConnect must be callable (or None), not {onConnect!r}")
        if not isinstance(endpoint, str) and not callable(getattr(endpoint, "connect", None)):
            raise TypeError(
                "endpoint must be an endpoint string such as 'tcp:host:8789' or an "
                f"IStreamClientEndpoint, not {endpoint!r}"
            )
        self._endpoint: IStreamClientEndpoint = (
            clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        )
        self._clock = reactor
        self._retryPolicy = _defaultPolicy if retryPolicy is None else retryPolicy
        self.credentials = credentials
        self.client = client
        self.onConnect = onConnect
        self.maxRetries = maxRetries
        self.attemptTimeout = attemptTimeout
        # Its call timeouts and keepalive run on this client's reactor too.
        self.factory = PBClientFactory(clock=reactor) if factory is None else factory
        #: The avatar (or root) of the ready connection, or ``None`` between connections.
        self.current: RemoteReference | None = None
        #: Attempts that failed in a row; a successful login resets it.
        self.failedAttempts = 0
        self._lastFailure = ""
        self._lastAttemptFailure: Failure | None = None
        # Retries scheduled since a connection last stayed up longer than the delay before
        # it: the retry policy's argument.
        self._retries = 0
        self._lastDelay = 0.0
        # When the current connection became ready (clock seconds).
        self._readyAt = 0.0
        # The connection logging in, logged in or closing: at most one at a time.
        self._broker: Broker | None = None
        # Connecting and logging in, until the connection is ready or the attempt fails.
        self._attempt: Deferred[RemoteReference] | None = None
        self._retry: IDelayedCall | None = None
        self._stopped = False
        self._waiting: list[Deferred[RemoteReference]] = []
        self._stopWaiting: list[Deferred[None]] = []

    def whenReady(self) -> Deferred[RemoteReference]:
        """
        The avatar (or root) of the ready connection, or of the next one.

        :returns: fails with :class:`~pbroker.errors.PBConnectionLost` once ``maxRetries``
            attempts in a row have failed, or when the service is stopped.
        """
        current = self.current
        if current is not None:
            if not current.broker.disconnected:
                return succeed(current)
            # Lost, and failing its pending calls before its disconnect notifiers (our
            # _lost) run: a caller retrying at once waits for the next connection.
            self._lost(current.broker)
        if self._stopped:
            return fail(PBConnectionLost("the reconnecting client is stopped"))
        if self._gaveUp():
            return fail(self._gaveUpError())
        waiting: Deferred[RemoteReference] = Deferred(self._forget)
        self._waiting.append(waiting)
        return waiting

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Deferred[Any]:
        """
        Call ``_name`` on the current avatar (or root), waiting for a connection if there is
        none; fails as :meth:`whenReady` does when there will be none.

        :raises TypeError: ``_name`` is not text (at once, as a reference's would).
        """
        _methodName(_name)

        def call(reference: RemoteReference) -> Any:
            return reference.callRemote(_name, *args, **kw)

        return self.whenReady().addCallback(call)

    def withOptions(
        self,
        timeout: float | None = None,
        context: dict[str, Any] | None = None,
        reply: dict[str, Any] | None = None,
        ordered: bool = True,
    ) -> ReconnectingCalls:
        """
        This client with call options: ``client.withOptions(timeout=5).callRemote(...)``.

        The options are those of :meth:`RemoteReference.withOptions
        <pbroker.references.RemoteReference.withOptions>`, checked here. The timeout counts
        from the call and includes any wait for a connection: a call made while the client
        is reconnecting fails with :class:`twisted.internet.defer.TimeoutError` if it has no
        answer within ``timeout`` seconds, whether or not a connection came in time.
        """
        return ReconnectingCalls(self, CallOptions(timeout, context, reply, ordered))

    def startService(self) -> None:
        """
        Start connecting (once a connection left from an earlier run is closed).
        """
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        self._stopped = False
        self.failedAttempts = 0
        self._retries = 0
        if self._broker is None:
            self._connect()
        # Otherwise the connection of the last run is still closing; _lost connects after it.

    def stopService(self) -> Deferred[None]:
        """
        Stop trying, close the connection, and fail the callers still waiting.

        :returns: fires once the connection is closed.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        self.current = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._attempt is not None:
            # Stops a connection attempt, or fails the login (which closes its connection).
            self._attempt.cancel()
        stopped: Deferred[None] = succeed(None)
        if self._broker is not None:
            stopped = Deferred()
            self._stopWaiting.append(stopped)
            if self._broker.transport is not None:
                self._broker.transport.loseConnection()
        self._failWaiting(PBConnectionLost("the reconnecting client was stopped"))
        return stopped

    def _connect(self) -> None:
        self._retry = None
        if self._broker is not None:
            return  # the last connection is still closing; _lost connects once it is gone
        factory = _AttemptFactory(self.factory)
        timer: list[IDelayedCall] = []

        def timedOut() -> None:
            timer.clear()
            factory.timedOut = True
            attempt.cancel()

        def stopTimer(result: object = None) -> object:
            if timer:
                timer.pop().cancel()
            return result

        # The endpoint fires with the protocol the factory built: a Broker.
        connecting: Deferred[Any] = self._endpoint.connect(factory)
        if self.attemptTimeout is not None:
            timer.append(self._clock.callLater(self.attemptTimeout, timedOut))
        attempt = connecting.addCallback(self._logIn, stopTimer)
        self._attempt = attempt
        attempt.addBoth(stopTimer)
        attempt.addCallbacks(self._ready, self._attemptFailed, errbackArgs=(factory,))

    def _logIn(self, broker: Broker, loggedIn: Callable[[], object]) -> Deferred[RemoteReference]:
        if broker.disconnected:
            raise PBConnectionLost("the connection was lost as it was made")
        self._broker = broker
        broker.notifyOnDisconnect(lambda: self._lost(broker))
        if self.credentials is None:
            loggingIn = self.factory.getRootObject()
        else:
            loggingIn = self.factory.login(self.credentials, self.client)

        def connected(reference: RemoteReference) -> Any:
            loggedIn()  # onConnect is the application's: attemptTimeout does not bound it
            if self.onConnect is None:
                return reference
            return maybeDeferred(self.onConnect, reference).addCallback(lambda _: reference)

        return loggingIn.addCallback(connected)

    def _ready(self, reference: RemoteReference) -> None:
        self._attempt = None
        if not self.running:
            return  # stopped by onConnect itself; stopService closed the connection
        if self._broker is None or self._broker.disconnected:
            self._attemptFailed(Failure(PBConnectionLost("the connection was lost")))
            return
        self.current = reference
        self.failedAttempts = 0
        # The backoff goes on until this connection proves it stays (see _lost): a server
        # that logs the client in and hangs up at once is not retried ever faster.
        self._readyAt = self._clock.seconds()
        # Last, with the client consistent: a waiter may call (or stop) it at once. One at a
        # time from the list itself: once one stops the client (or loses the connection) the
        # others are failed by stopService (or wait for the next connection).
        while self._waiting and self.current is reference:
            self._waiting.pop(0).callback(reference)

    def _attemptFailed(self, failure: Failure, factory: _AttemptFactory | None = None) -> None:
        self._attempt = None
        broker = self._broker
        self._lastAttemptFailure = None if factory is not None and factory.timedOut else failure
        if factory is not None and factory.timedOut:
            self._lastFailure = (
                f"connecting and logging in took more than {self.attemptTimeout:g} seconds"
            )
        elif (
            broker is not None
            and broker.disconnected
            and failure.check(CancelledError, PBConnectionLost)
        ):
            self._lastFailure = "the connection was lost while logging in"
        else:
            self._lastFailure = _describe(failure)
        if broker is not None and not broker.disconnected:
            # Nothing on this connection is worth waiting for, and the next attempt waits until
            # it is gone.
            _abort(broker)
        if factory is not None:
            self._closeLate(factory)
        if not self.running:
            return
        self.failedAttempts += 1
        if self._gaveUp():
            self._failWaiting(self._gaveUpError())
        self._scheduleRetry(self._lastFailure)

    def _closeLate(self, factory: _AttemptFactory) -> None:
        """
        Close what a failed attempt's endpoint connected anyway: one that ignores cancellation
        delivers its connection to no one.
        """
        factory.abandoned = True
        for broker in factory.brokers:
            if broker is self._broker or broker.disconnected or broker.transport is None:
                continue
            if self._broker is None:
                # Ours until it is closed: a new attempt (or stopService) waits for it.
                self._broker = broker
                broker.notifyOnDisconnect(partial(self._lost, broker))
            _abort(broker)

    def _lost(self, broker: Broker) -> None:
        if broker is not self._broker:
            return
        wasReady, self.current = self.current is not None, None
        attempt = self._attempt
        if attempt is not None:
            # Lost while logging in, or in onConnect: the attempt fails and schedules a retry.
            attempt.cancel()
        self._broker = None
        if attempt is None and self.running and self._retry is None:
            if wasReady:
                if self._clock.seconds() - self._readyAt > self._lastDelay:
                    self._retries = 0  # it stayed up longer than the delay before it
                self._scheduleRetry("the connection was lost")
            else:
                # An attempt was waiting for this connection to close; it starts once the
                # broker has finished with this one.
                self._retry = self._clock.callLater(0, self._connect)
        stopWaiting, self._stopWaiting = self._stopWaiting, []
        for deferred in stopWaiting:
            deferred.callback(None)

    def _scheduleRetry(self, reason: str) -> None:
        self._retries += 1
        delay = self._lastDelay = self._delay(self._retries)
        self._log.info(
            "No connection to {endpoint} ({reason}); retrying in {delay} seconds",
            endpoint=self._endpoint,
            reason=reason,
            delay=delay,
        )
        self._retry = self._clock.callLater(delay, self._connect)

    def _delay(self, attempt: int) -> float:
        """
        The retry policy's delay before ``attempt``; the default policy's, logged, if it
        failed or gave no finite number of seconds from 0 up: a mistake in it must not stop
        the client from reconnecting (callers would wait for ever) nor go unseen.
        """
        try:
            delay = self._retryPolicy(attempt)
            seconds = toSeconds(delay) if isSeconds(delay) else None
        except Exception:
            self._log.failure(
                "retryPolicy({attempt}) failed; using the default delay", attempt=attempt
            )
            return _defaultPolicy(attempt)
        if seconds is None or not 0 <= seconds < float("inf"):
            self._log.error(
                "retryPolicy({attempt}) gave {delay}, not a finite number of seconds from 0 "
                "up; using the default delay",
                attempt=attempt,
                delay=describe(delay) if seconds is None else seconds,
            )
            return _defaultPolicy(attempt)
        return seconds

    def _gaveUp(self) -> bool:
        return self.maxRetries is not None and self.failedAttempts >= self.maxRetries

    def _gaveUpError(self) -> PBConnectionLost:
        if self.failedAttempts == 1:
            error = PBConnectionLost(
                f"no connection to the broker after 1 failed attempt: {self._lastFailure}"
            )
        else:
            error = PBConnectionLost(
                f"no connection to the broker after {self.failedAttempts} failed attempts in "
                f"a row; the last: {self._lastFailure}"
            )
        error.lastFailure = self._lastAttemptFailure
        return error

    def _forget(self, waiting: Deferred[RemoteReference]) -> None:
        if waiting in self._waiting:
            self._waiting.remove(waiting)

    def _failWaiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            if not deferred.called:
                deferred.errback(Failure(error))


class ReconnectingCalls:
    """
    A :class:`ReconnectingClient` with call options (see
    :meth:`ReconnectingClient.withOptions`).
    """

    def __init__(self, client: ReconnectingClient, options: CallOptions) -> None:
        self.client = client
        self.options = options

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Deferred[Any]:
        """
        Call ``_name`` on the current avatar (or root) with these options, waiting for a
        connection if there is none, as :meth:`ReconnectingClient.callRemote` does.
        """
        _methodName(_name)
        options = self.options
        clock = self.client._clock
        started = clock.seconds()
        waiting = self.client.whenReady()
        limit = options.timeout
        if limit is not None and not waiting.called:
            # Cancelling the wait (the timeout, or the caller) takes it out of the waiting list.
            waiting.addTimeout(
                limit,
                clock,
                partial(
                    _timedOut, _callName(_name), why=" (no connection to the broker was ready)"
                ),
            )

        def call(reference: RemoteReference) -> Any:
            callOptions = options
            if limit is not None:
                left = limit - (clock.seconds() - started)
                if not left > 0:
                    raise _timeoutError(
                        _callName(_name), limit, " (the connection was ready only then)"
                    )
                callOptions = replace(options, timeout=left)
                sent = CallingWithOptions(reference, callOptions).callRemote(_name, *args, **kw)
                if sent is not None:  # (a one-way call has none)
                    sent.addErrback(_timeoutNamed, _callName(_name), limit)
                return sent
            return CallingWithOptions(reference, callOptions).callRemote(_name, *args, **kw)

        return waiting.addCallback(call)


def _callName(name: object) -> str:
    """
    The name of the method called, as a timeout's error gives it.
    """
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


@implementer(IProtocolFactory)
class _AttemptFactory:
    """
    The factory one attempt gives the endpoint: it builds the client factory's brokers and
    remembers them, so that a connection made after the attempt failed can be closed; once
    the attempt has failed it builds none.
    """

    def __init__(self, factory: PBClientFactory) -> None:
        self.factory = factory
        self.brokers: list[Broker] = []
        self.abandoned = False
        self.timedOut = False

    def buildProtocol(self, addr: IAddress) -> Broker | None:
        if self.abandoned:
            return None  # the transport closes the connection
        broker = self.factory.buildProtocol(addr)
        self.brokers.append(broker)
        return broker

    def doStart(self) -> None:
        self.factory.doStart()  # type: ignore[no-untyped-call]

    def doStop(self) -> None:
        self.factory.doStop()  # type: ignore[no-untyped-call]


def _abort(broker: Broker) -> None:
    transport = broker.transport
    if transport is not None:
        getattr(transport, "abortConnection", transport.loseConnection)()


def _describe(failure: Failure) -> str:
    """
    The type and message of ``failure``, such as ``UnauthorizedLogin: bad password`` (a
    copied failure's type is the remote class's dotted name, in bytes).
    """
    kind = failure.type
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    name = kind if isinstance(kind, str) else getattr(kind, "__name__", repr(kind))
    name = name.rpartition(".")[2]
    message = failure.getErrorMessage()
    return f"{name}: {message}" if message else name
