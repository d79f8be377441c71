"""
A client that stays connected: it reconnects with backoff, logs in again each time, and tells
the application about each new root or avatar.

Every PB application ends up writing this; :class:`ReconnectingClient` is a Twisted service
built on :class:`twisted.application.internet.ClientService`::

    client = ReconnectingClient("tcp:broker.example:8789", UsernamePassword(b"alice", b"pw"),
                                onConnect=lambda avatar: print("connected", avatar))
    client.startService()
    avatar = await client.whenReady()          # the current avatar (or root), waiting if needed
    result = await client.callRemote("whoAmI")

A connection that fails, or a login that is refused, counts as one failed attempt; the next
comes after the retry policy's delay (exponential backoff by default). With ``maxRetries``,
:meth:`~ReconnectingClient.whenReady` and :meth:`~ReconnectingClient.callRemote` fail with
:class:`~pbroker.errors.PBConnectionLost` once that many attempts in a row have failed,
instead of waiting for ever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure

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
        returns is waited for before the connection counts as ready.
    :param maxRetries: failed attempts in a row after which waiting callers fail; ``None``
        waits for ever.
    :param retryPolicy: seconds to wait before attempt ``n`` (``backoffPolicy()`` by default).
    :param factory: a :class:`~pbroker.pb.PBClientFactory` to use (for its security options,
        registry or limits); a new one by default.
    :param reactor: the reactor to connect and wait with.
    """

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
        target: IStreamClientEndpoint = (
            clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
        )
        if maxRetries is not None and maxRetries < 1:
            raise ValueError(f"maxRetries must be at least 1 (or None), not {maxRetries}")
        self.credentials = credentials
        self.client = client
        self.onConnect = onConnect
        self.maxRetries = maxRetries
        self.factory = PBClientFactory() if factory is None else factory
        #: The avatar (or root) of the current connection, or ``None`` between connections.
        self.current: RemoteReference | None = None
        self._service = ClientService(
            target,
            self.factory,
            retryPolicy=retryPolicy or backoffPolicy(),
            clock=reactor,
            prepareConnection=self._prepare,
        )

    def _prepare(self, broker: Any) -> Deferred[None]:
        # Runs for each new connection, before it counts as connected: log in (or take the
        # root), remember the result, and tell the application.
        ready = self.factory.getRootObject()
        if self.credentials is not None:
            ready.addCallback(lambda root: self.factory.login(self.credentials, self.client))

        def connected(reference: RemoteReference) -> Any:
            self.current = reference
            broker.notifyOnDisconnect(self._lost)
            if self.onConnect is not None:
                return self.onConnect(reference)
            return None

        # A refused login fails the Deferred, which makes ClientService drop this connection
        # and count a failed attempt.
        return ready.addCallback(connected).addCallback(lambda _: None)

    def _lost(self) -> None:
        self.current = None

    def whenReady(self) -> Deferred[RemoteReference]:
        """
        The avatar (or root) of the current connection, or of the next one.

        :returns: fails with :class:`~pbroker.errors.PBConnectionLost` after ``maxRetries``
            failed attempts in a row, or when the service stops.
        """
        waiting = self._service.whenConnected(failAfterFailures=self.maxRetries)

        def ready(_broker: Any) -> RemoteReference:
            if self.current is None:
                raise PBConnectionLost("the connection was lost again before it could be used")
            return self.current

        def gaveUp(failure: Failure) -> Failure:
            return Failure(PBConnectionLost(f"no connection to the broker: {failure.value}"))

        return waiting.addCallbacks(ready, gaveUp)

    def callRemote(self, _name: str | bytes, *args: Any, **kw: Any) -> Deferred[Any]:
        """
        Call ``_name`` on the current avatar (or root), waiting for a connection if there is
        none; fails as :meth:`whenReady` does when there will be none.
        """

        def call(reference: RemoteReference) -> Any:
            return reference.callRemote(_name, *args, **kw)

        return self.whenReady().addCallback(call)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.current = None
        stopped: Deferred[None] = self._service.stopService()
        return stopped
