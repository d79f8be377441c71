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

The client holds at most one connection at a time: a new attempt starts only once the last
connection is closed. A connection that fails, or a login that is refused (or an ``onConnect``
that fails), counts as one failed attempt: that connection is closed and the next attempt comes
after the retry policy's delay (exponential backoff by default). With ``maxRetries``,
:meth:`~ReconnectingClient.whenReady` and :meth:`~ReconnectingClient.callRemote` fail with
:class:`~pbroker.errors.PBConnectionLost` once that many attempts in a row have failed, instead
of waiting for ever: callers already waiting then, and new callers at once until a login
succeeds again (the client keeps trying in the background).

This module owns the retry loop and the login on each connection; the broker and the login
exchange are :mod:`pbroker.pb`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from pbroker.broker import Broker
from pbroker.errors import PBConnectionLost
from pbroker.pb import PBClientFactory
from pbroker.references import RemoteReference

__all__ = ["ReconnectingClient"]


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
    :param factory: a :class:`~pbroker.pb.PBClientFactory` to use (for its security options,
        registry or limits), for this client only; a new one by default.
    :param reactor: the reactor to connect and wait with.
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
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        if maxRetries is not None and maxRetries < 1:
            raise ValueError(f"maxRetries must be at least 1 (or None), not {maxRetries}")
        self._endpoint: IStreamClientEndpoint = (
            clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        )
        self._clock = reactor
        self._retryPolicy = retryPolicy or backoffPolicy()
        self.credentials = credentials
        self.client = client
        self.onConnect = onConnect
        self.maxRetries = maxRetries
        self.factory = PBClientFactory() if factory is None else factory
        #: The avatar (or root) of the ready connection, or ``None`` between connections.
        self.current: RemoteReference | None = None
        #: Attempts that failed in a row; a successful login resets it.
        self.failedAttempts = 0
        self._lastFailure = ""
        # Retries scheduled since the last successful login: the retry policy's argument.
        self._retries = 0
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
        if self.current is not None:
            return succeed(self.current)
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
        """

        def call(reference: RemoteReference) -> Any:
            return reference.callRemote(_name, *args, **kw)

        return self.whenReady().addCallback(call)

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
        # The endpoint fires with the protocol the factory built: a Broker.
        connecting: Deferred[Any] = self._endpoint.connect(self.factory)
        attempt = connecting.addCallback(self._logIn)
        self._attempt = attempt
        attempt.addCallbacks(self._ready, self._attemptFailed)

    def _logIn(self, broker: Broker) -> Deferred[RemoteReference]:
        if broker.disconnected:
            raise PBConnectionLost("the connection was lost as it was made")
        self._broker = broker
        broker.notifyOnDisconnect(lambda: self._lost(broker))
        if self.credentials is None:
            loggedIn = self.factory.getRootObject()
        else:
            loggedIn = self.factory.login(self.credentials, self.client)

        def connected(reference: RemoteReference) -> Any:
            if self.onConnect is None:
                return reference
            return maybeDeferred(self.onConnect, reference).addCallback(lambda _: reference)

        return loggedIn.addCallback(connected)

    def _ready(self, reference: RemoteReference) -> None:
        self._attempt = None
        if not self.running:
            return  # stopped by onConnect itself; stopService closed the connection
        if self._broker is None or self._broker.disconnected:
            self._attemptFailed(Failure(PBConnectionLost("the connection was lost")))
            return
        self.current = reference
        self.failedAttempts = 0
        self._retries = 0
        # Last, with the client consistent: a waiter may call (or stop) it at once.
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            if not deferred.called:  # a caller may cancel another's wait from its callback
                deferred.callback(reference)

    def _attemptFailed(self, failure: Failure) -> None:
        self._attempt = None
        broker = self._broker
        if broker is not None and broker.disconnected:
            if failure.check(CancelledError, PBConnectionLost):
                self._lastFailure = "the connection was lost while logging in"
            else:
                self._lastFailure = _describe(failure)
        else:
            self._lastFailure = _describe(failure)
            if broker is not None and broker.transport is not None:
                # Nothing on this connection is worth waiting for, and the next attempt waits
                # until it is gone.
                transport = broker.transport
                getattr(transport, "abortConnection", transport.loseConnection)()
        if not self.running:
            return
        self.failedAttempts += 1
        if self._gaveUp():
            self._failWaiting(self._gaveUpError())
        self._scheduleRetry(self._lastFailure)

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
        delay = self._retryPolicy(self._retries)
        self._log.info(
            "No connection to {endpoint} ({reason}); retrying in {delay} seconds",
            endpoint=self._endpoint,
            reason=reason,
            delay=delay,
        )
        self._retry = self._clock.callLater(delay, self._connect)

    def _gaveUp(self) -> bool:
        return self.maxRetries is not None and self.failedAttempts >= self.maxRetries

    def _gaveUpError(self) -> PBConnectionLost:
        return PBConnectionLost(
            f"no connection to the broker after {self.failedAttempts} failed attempts in a "
            f"row; the last: {self._lastFailure}"
        )

    def _forget(self, waiting: Deferred[RemoteReference]) -> None:
        if waiting in self._waiting:
            self._waiting.remove(waiting)

    def _failWaiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for deferred in waiting:
            if not deferred.called:
                deferred.errback(Failure(error))


def _describe(failure: Failure) -> str:
    message = failure.getErrorMessage()
    return message if message else repr(failure.value)
