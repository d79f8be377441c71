"""
Tests for ReconnectingClient: reconnection with backoff, login again, the onConnect hook, and
giving up clearly after maxRetries; in memory, on a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pbroker import context, pb
from pbroker.errors import PBConnectionLost
from pbroker.reconnect import ReconnectingClient, _AttemptFactory, _describe
from pbroker.testing import connectedServerAndClient
from tests.test_login import realmFor


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    Connects to a server factory in memory; can be switched off to refuse connections.
    """

    def __init__(self, serverFactory: Any, greet: bool = True) -> None:
        self.serverFactory = serverFactory
        self.greet = greet
        self.up = True
        self.connections: list[tuple[Any, Any, Any]] = []

    def connect(self, factory: Any) -> Any:
        if not self.up:
            return fail(ConnectionRefusedError("switched off"))
        connection = connectedServerAndClient(self.serverFactory, factory, greet=self.greet)
        self.connections.append(connection)
        return succeed(connection[1])

    def pump(self) -> None:
        for _server, _client, pump in self.connections:
            pump.flush()

    def drop(self) -> None:
        server, _client, _pump = self.connections[-1]
        server.transport.loseConnection()
        self.pump()


@implementer(IStreamClientEndpoint)
class DeafEndpoint(MemoryEndpoint):
    """
    Connects at once but fires its Deferred only on :meth:`deliver`, and ignores cancellation
    (its Deferred has no canceller), as some third-party endpoints do.
    """

    def __init__(self, serverFactory: Any) -> None:
        super().__init__(serverFactory)
        self.pending: list[tuple[Deferred[Any], Any]] = []
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Any:
        self.factories.append(factory)
        connection = connectedServerAndClient(self.serverFactory, factory)
        self.connections.append(connection)
        connecting: Deferred[Any] = Deferred()
        self.pending.append((connecting, connection[1]))
        return connecting

    def deliver(self) -> None:
        pending, self.pending = self.pending, []
        for connecting, broker in pending:
            connecting.callback(broker)  # dropped if cancelled, as Deferred does


class ReconnectingClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        guard = pb.LoginGuard(baseDelay=0, maxDelay=0)
        self.endpoint = MemoryEndpoint(
            pb.PBServerFactory(Portal(realmFor(pb), [checker]), loginGuard=guard)
        )
        self.clock = Clock()
        self.connected: list[Any] = []

    def client(
        self, password: bytes = b"secret", start: bool = True, **options: Any
    ) -> ReconnectingClient:
        options.setdefault("onConnect", self.connected.append)
        options.setdefault("retryPolicy", lambda attempt: 1.0)
        client = ReconnectingClient(
            self.endpoint,
            UsernamePassword(b"alice", password),
            reactor=self.clock,
            **options,
        )
        self.addCleanup(client.stopService)
        if start:
            client.startService()
            self.endpoint.pump()
        return client

    def openConnections(self) -> list[Any]:
        return [
            broker
            for _server, broker, _pump in self.endpoint.connections
            if not broker.disconnected
        ]

    def call(self, client: ReconnectingClient, name: str) -> Any:
        results: list[Any] = []
        client.callRemote(name).addBoth(results.append)
        self.endpoint.pump()
        self.assertEqual(len(results), 1)
        return results[0]

    def test_connectsAndLogsIn(self) -> None:
        """Started, it logs in, calls onConnect with the avatar, and calls go to it."""
        client = self.client()
        self.assertEqual(len(self.connected), 1)
        self.assertIs(self.successResultOf(client.whenReady()), self.connected[0])
        self.assertEqual(self.call(client, "name"), "alice")

    def test_reconnectsAndLogsInAgain(self) -> None:
        """After the connection drops it reconnects after the policy's delay and logs in."""
        client = self.client()
        self.endpoint.drop()
        self.assertIsNone(client.current)
        waiting = client.whenReady()
        self.assertNoResult(waiting)
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(len(self.connected), 2)
        self.assertIs(self.successResultOf(waiting), self.connected[1])
        self.assertEqual(self.call(client, "name"), "alice")

    def test_backoffGoesOnForAServerThatHangsUp(self) -> None:
        """A server that logs the client in and hangs up at once is not reconnected to ever
        faster: the backoff starts over only once a connection stays up longer than the
        delay before it."""
        client = self.client(retryPolicy=lambda attempt: float(attempt))
        delays = []
        for _ in range(4):
            self.endpoint.drop()  # as soon as it is logged in
            (retry,) = self.clock.getDelayedCalls()
            delays.append(retry.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
            self.endpoint.pump()
        self.assertEqual(delays, [1.0, 2.0, 3.0, 4.0])
        self.assertEqual(client.failedAttempts, 0)  # each login succeeded
        self.clock.advance(4.5)  # this one stays up longer than the 4 s before it
        self.endpoint.drop()
        (retry,) = self.clock.getDelayedCalls()
        self.assertEqual(retry.getTime() - self.clock.seconds(), 1.0)

    def test_retryFromAFailedCallWaitsForTheNextConnection(self) -> None:
        """A call made again as soon as the lost connection fails it (in its errback, before
        the broker's disconnect notifiers have run) waits for the next connection; it used
        to go to the dead broker and fail with DeadReferenceError."""
        client = self.client()
        retried: list[Any] = []

        def retry(failure: Failure) -> None:
            failure.trap(PBConnectionLost)
            client.callRemote("name").addBoth(retried.append)

        client.callRemote("name").addErrback(retry)  # sent; the answer never comes
        self.endpoint.drop()
        self.assertEqual(retried, [])
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(retried, ["alice"])

    def test_givesUpAfterMaxRetries(self) -> None:
        """With the broker gone, waiting callers fail clearly after maxRetries attempts."""
        client = self.client(maxRetries=2)
        self.endpoint.up = False
        self.endpoint.drop()
        waiting = client.callRemote("name")
        self.assertNoResult(waiting)
        for _ in range(3):
            self.clock.advance(1.0)
        failure = self.failureResultOf(waiting)
        self.assertTrue(failure.check(PBConnectionLost))
        self.assertIn("no connection to the broker", failure.getErrorMessage())

    def test_refusedLoginIsAFailedAttempt(self) -> None:
        """A refused login counts as a failed attempt; callers fail after maxRetries."""
        client = self.client(password=b"wrong", maxRetries=2)
        waiting = client.whenReady()
        for _ in range(3):
            self.clock.advance(1.0)
            self.endpoint.pump()
        self.assertTrue(self.failureResultOf(waiting).check(PBConnectionLost))
        self.assertEqual(self.connected, [])
        self.assertGreaterEqual(len(self.endpoint.connections), 2)

    def test_badMaxRetries(self) -> None:
        """maxRetries below 1 is refused."""
        with self.assertRaises(ValueError):
            ReconnectingClient(self.endpoint, maxRetries=0, reactor=self.clock)

    def test_documentedUsage(self) -> None:
        """The module docstring's pattern, await whenReady() then await callRemote(), works."""
        client = self.client(start=False)

        async def use() -> tuple[Any, Any]:
            avatar = await client.whenReady()
            return avatar, await client.callRemote("name")

        first = Deferred.fromCoroutine(use())
        client.startService()
        self.endpoint.pump()
        self.assertEqual(self.successResultOf(first), (self.connected[0], "alice"))
        self.endpoint.drop()
        second = Deferred.fromCoroutine(use())
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(self.successResultOf(second), (self.connected[1], "alice"))

    def test_refusedLoginClosesItsConnection(self) -> None:
        """A refused login closes its connection: only the logged-in one is ever left open."""
        client = self.client(password=b"wrong")
        for _ in range(3):
            self.clock.advance(1.0)
            self.endpoint.pump()
        self.assertEqual(len(self.endpoint.connections), 4)
        self.assertEqual(self.openConnections(), [])
        client.credentials = UsernamePassword(b"alice", b"secret")
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(len(self.connected), 1)
        self.assertEqual(len(self.openConnections()), 1)
        self.clock.advance(10.0)
        self.endpoint.pump()
        self.assertEqual(len(self.endpoint.connections), 5, "it connected again while logged in")

    def test_failingOnConnectIsAFailedAttempt(self) -> None:
        """An onConnect that fails fails the attempt: its connection is closed, and it retries."""
        calls: list[Any] = []

        def onConnect(avatar: Any) -> None:
            calls.append(avatar)
            if len(calls) == 1:
                raise RuntimeError("not yet")

        client = self.client(onConnect=onConnect)
        self.assertEqual(self.openConnections(), [])
        self.assertIsNone(client.current)
        self.assertEqual(client.failedAttempts, 1)
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertIs(self.successResultOf(client.whenReady()), calls[1])
        self.assertEqual(len(self.openConnections()), 1)

    def test_stopDuringLoginClosesTheConnection(self) -> None:
        """stopService() during the login closes its connection before its Deferred fires."""
        client = self.client(start=False)
        client.startService()  # connected; the login's messages have not moved yet
        _server, broker, _pump = self.endpoint.connections[0]
        stopped = client.stopService()
        self.endpoint.pump()
        self.successResultOf(stopped)
        self.assertTrue(broker.disconnected, "stopService() is done but the connection is open")
        self.assertEqual(self.connected, [])
        self.clock.advance(10.0)
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_dropDuringLogin(self) -> None:
        """A connection lost during the login raises nothing, and the client retries."""
        client = self.client(start=False)
        client.startService()
        server, _broker, _pump = self.endpoint.connections[0]
        server.transport.loseConnection()  # before the login's answer arrives
        self.endpoint.pump()  # a real reactor would log what this raises as unhandled
        waiting = client.whenReady()
        self.assertNoResult(waiting)
        self.assertEqual(client.failedAttempts, 1)
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertIs(self.successResultOf(waiting), self.connected[0])
        self.assertEqual(len(self.openConnections()), 1)

    def test_maxRetriesCountsForTheClient(self) -> None:
        """After maxRetries failed attempts in a row new calls fail at once, until a login."""
        client = self.client(maxRetries=2)
        self.endpoint.up = False
        self.endpoint.drop()
        for _ in range(2):
            self.clock.advance(1.0)
        failure = self.failureResultOf(client.callRemote("name"), PBConnectionLost)
        self.assertIn("after 2 failed attempts in a row", failure.getErrorMessage())
        self.assertIn("switched off", failure.getErrorMessage())
        self.assertEqual(client.failedAttempts, 2)
        self.endpoint.up = True  # it keeps trying; a successful login resets the count
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(client.failedAttempts, 0)
        self.assertEqual(self.call(client, "name"), "alice")

    def test_stopFailsCallers(self) -> None:
        """stopService() fails waiting callers, and later ones at once, until started again."""
        client = self.client()
        self.endpoint.up = False
        self.endpoint.drop()
        waiting = client.whenReady()
        self.successResultOf(client.stopService())
        for failed in [waiting, client.whenReady()]:
            failure = self.failureResultOf(failed, PBConnectionLost)
            self.assertIn("stopped", failure.getErrorMessage())
        self.endpoint.up = True
        client.startService()
        self.endpoint.pump()
        self.assertEqual(self.call(client, "name"), "alice")

    def test_restartWaitsForTheLastConnection(self) -> None:
        """Started again before its connection is closed, it connects once that one is gone."""
        client = self.client()
        stopped = client.stopService()
        client.startService()
        self.assertEqual(len(self.endpoint.connections), 1)
        self.endpoint.pump()  # the old connection closes
        self.successResultOf(stopped)
        self.clock.advance(0)
        self.endpoint.pump()
        self.assertEqual(len(self.endpoint.connections), 2)
        self.assertEqual(len(self.openConnections()), 1)
        self.assertEqual(self.call(client, "name"), "alice")

    def test_cancelWaiting(self) -> None:
        """A caller may cancel its wait; the others still get the avatar."""
        client = self.client(start=False)
        cancelled, waiting = client.whenReady(), client.whenReady()
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        client.startService()
        self.endpoint.pump()
        self.assertIs(self.successResultOf(waiting), self.connected[0])

    def test_stopInAWaitersCallbackFailsTheOthers(self) -> None:
        """A waiter that stops the client makes the callers still waiting fail, not succeed."""
        client = self.client(start=False)
        first, second = client.whenReady(), client.whenReady()
        first.addCallback(lambda _: client.stopService())
        client.startService()
        self.endpoint.pump()
        self.successResultOf(first)
        failure = self.failureResultOf(second, PBConnectionLost)
        self.assertIn("stopped", failure.getErrorMessage())

    def test_refusedLoginNamesTheReason(self) -> None:
        """Giving up after a refused login names the error's type (a copied failure's too)."""
        client = self.client(password=b"wrong", maxRetries=1, start=False)
        waiting = client.whenReady()
        client.startService()
        self.endpoint.pump()
        message = self.failureResultOf(waiting, PBConnectionLost).getErrorMessage()
        self.assertEqual(
            message, "no connection to the broker after 1 failed attempt: UnauthorizedLogin"
        )

    def test_refusedLoginToldFromANetworkError(self) -> None:
        """The error a client that gave up fails with holds its last attempt's Failure: a
        refused login can be told from a lost connection or a timeout (None)."""
        client = self.client(password=b"wrong", maxRetries=2)
        waiting = client.whenReady()
        for _ in range(3):
            self.clock.advance(1.0)
            self.endpoint.pump()
        error = self.failureResultOf(waiting, PBConnectionLost).value
        self.assertTrue(error.lastFailure.check(UnauthorizedLogin))
        hung = self.hungClient(maxRetries=1, attemptTimeout=10)
        waiting = hung.whenReady()
        self.clock.advance(11)
        self.assertIsNone(self.failureResultOf(waiting, PBConnectionLost).value.lastFailure)

    def test_describe(self) -> None:
        """A failure is described by its type's name and its message."""
        self.assertEqual(_describe(Failure(ValueError("bad"))), "ValueError: bad")
        self.assertEqual(_describe(Failure(CancelledError())), "CancelledError")

    def hungClient(self, **options: Any) -> ReconnectingClient:
        """A client of a server that accepts connections and never sends a byte."""
        self.endpoint = MemoryEndpoint(Factory.forProtocol(Protocol), greet=False)
        return self.client(**options)

    def test_attemptTimeout(self) -> None:
        """An attempt with no login within attemptTimeout fails and closes its connection."""
        client = self.hungClient(maxRetries=2, attemptTimeout=10)
        waiting = client.callRemote("name")
        self.clock.advance(9.5)
        self.endpoint.pump()
        self.assertNoResult(waiting)
        self.assertEqual((client.failedAttempts, len(self.openConnections())), (0, 1))
        self.clock.advance(0.5)
        self.endpoint.pump()
        self.assertEqual((client.failedAttempts, self.openConnections()), (1, []))
        self.clock.advance(1.0)  # the retry
        self.endpoint.pump()
        self.assertEqual(len(self.endpoint.connections), 2)
        self.clock.advance(10.0)
        self.endpoint.pump()
        message = self.failureResultOf(waiting, PBConnectionLost).getErrorMessage()
        self.assertIn("after 2 failed attempts", message)
        self.assertIn("took more than 10 seconds", message)
        self.assertEqual(self.openConnections(), [])

    def test_aFailingRetryPolicyDoesNotStopTheClient(self) -> None:
        """A retry policy that raises, or gives no number of seconds from 0 up, is logged at
        once and the default delay used: the client goes on reconnecting, and callers are
        answered once it is back."""
        given = iter([1.0, "soon", -1.0, float("nan"), None, 10**400, float("inf")])

        def policy(attempt: int) -> float:
            if attempt == 5:
                raise IndexError("no delay for attempt 5")
            return next(given)

        client = self.client(retryPolicy=policy)
        delays = []
        with capturedLogs() as logs:
            for _ in range(8):
                self.endpoint.drop()  # at once: the backoff does not start over
                (retry,) = self.clock.getDelayedCalls()
                delays.append(retry.getTime() - self.clock.seconds())
                self.clock.advance(delays[-1])
                self.endpoint.pump()
        default = backoffPolicy(jitter=lambda: 0)  # Twisted's; the client's adds up to 1 s
        self.assertEqual(delays[0], 1.0)
        for attempt, delay in enumerate(delays[1:], 2):
            self.assertTrue(default(attempt) <= delay < default(attempt) + 1, (attempt, delay))
        problems = [entry for entry in logs if "retryPolicy" in entry["log_format"]]
        self.assertEqual(len(problems), 7)
        self.assertIn("'soon'", formatEvent(problems[0]))
        self.assertIsInstance(problems[3]["log_failure"].value, IndexError)
        self.assertIn("gave None", formatEvent(problems[4]))
        self.assertIn("gave inf", formatEvent(problems[5]))  # 10**400 seconds: never
        self.assertIn("gave inf", formatEvent(problems[6]))
        self.assertEqual(len(self.flushLoggedErrors(IndexError)), 1)
        self.assertEqual(self.call(client, "name"), "alice")

    def test_aFalsyRetryPolicyIsUsed(self) -> None:
        """A policy object that is false (an empty container with __call__) is still the
        policy: only None means the default."""

        class Policy(list[float]):
            def __call__(self, attempt: int) -> float:
                return 7.0

        client = self.client(retryPolicy=Policy())
        self.endpoint.drop()
        (retry,) = self.clock.getDelayedCalls()
        self.assertEqual(retry.getTime() - self.clock.seconds(), 7.0)
        self.clock.advance(7.0)
        self.endpoint.pump()
        self.assertEqual(self.call(client, "name"), "alice")

    def test_attemptTimeoutByDefault(self) -> None:
        """Without attemptTimeout an attempt still fails, after 60 seconds; None waits."""
        client = self.hungClient()
        self.clock.advance(60.0)
        self.assertEqual(client.failedAttempts, 1)
        patient = self.hungClient(attemptTimeout=None)
        self.clock.advance(3600.0)
        self.assertEqual(patient.failedAttempts, 0)
        with self.assertRaises(ValueError):
            ReconnectingClient(self.endpoint, attemptTimeout=0, reactor=self.clock)

    def test_positionalArguments(self) -> None:
        """The arguments keep the positions they had before attemptTimeout was added."""
        policy = lambda attempt: 2.0  # noqa: E731
        client = ReconnectingClient(self.endpoint, None, None, None, 3, policy)
        self.assertEqual((client.maxRetries, client._retryPolicy), (3, policy))

    def test_attemptTimeoutWhileConnecting(self) -> None:
        """An endpoint that never connects is cancelled after attemptTimeout: a failed attempt."""
        cancelled: list[Any] = []

        @implementer(IStreamClientEndpoint)
        class Unreachable:
            def connect(self, factory: Any) -> Deferred[Any]:
                return Deferred(cancelled.append)

        client = ReconnectingClient(Unreachable(), attemptTimeout=5, reactor=self.clock)
        client.startService()
        self.addCleanup(client.stopService)
        self.clock.advance(5.0)
        self.assertEqual((len(cancelled), client.failedAttempts), (1, 1))

    def test_attemptTimeoutSparesOnConnect(self) -> None:
        """attemptTimeout stops counting at the login: a slow onConnect is the application's."""
        hook: Deferred[None] = Deferred()
        client = self.client(attemptTimeout=5, onConnect=lambda avatar: hook)
        self.clock.advance(30.0)
        hook.callback(None)
        self.assertEqual((client.failedAttempts, len(self.openConnections())), (0, 1))
        self.assertEqual(self.call(client, "name"), "alice")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def deafClient(self) -> ReconnectingClient:
        self.endpoint = DeafEndpoint(self.endpoint.serverFactory)
        return self.client()

    def test_stopWhileConnectingClosesALateConnection(self) -> None:
        """Stopped while an endpoint that ignores cancellation connects, it closes that one."""
        client = self.deafClient()
        stopped = client.stopService()
        self.endpoint.deliver()
        self.assertNoResult(stopped)  # it waits for that connection to close, as for any other
        self.endpoint.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.openConnections(), [])
        # Built after the attempt was given up, a connection is refused at once.
        self.assertIsNone(self.endpoint.factories[0].buildProtocol(None))

    def test_restartWhileConnectingKeepsOneConnection(self) -> None:
        """Stopped and started while such an endpoint connects, it still holds one connection."""
        client = self.deafClient()
        client.stopService()
        client.startService()
        self.assertEqual(len(self.endpoint.connections), 1)
        self.endpoint.deliver()
        self.endpoint.pump()  # the late connection closes
        self.clock.advance(0)  # then the new attempt starts
        self.endpoint.deliver()
        self.endpoint.pump()
        self.assertEqual(len(self.endpoint.connections), 2)
        self.assertEqual(len(self.openConnections()), 1)
        self.assertEqual(self.call(client, "name"), "alice")

    def test_rootObjectWithoutCredentials(self) -> None:
        """Without credentials (and without onConnect) it gets the server's root object."""

        class Root(pb.Root):
            def remote_name(self) -> str:
                return "root"

        self.endpoint = MemoryEndpoint(pb.PBServerFactory(Root()))
        client = ReconnectingClient(self.endpoint, reactor=self.clock)
        self.addCleanup(client.stopService)
        client.startService()
        self.endpoint.pump()
        root = self.successResultOf(client.whenReady())
        self.assertIsInstance(root, pb.RemoteReference)
        self.assertEqual(self.call(client, "name"), "root")

    def test_startingTwiceConnectsOnce(self) -> None:
        """startService() on a running client does nothing: still one connection."""
        client = self.client()
        client.startService()
        self.endpoint.pump()
        self.clock.advance(10.0)
        self.assertEqual(len(self.endpoint.connections), 1)
        self.assertEqual(len(self.connected), 1)
        self.assertEqual(self.call(client, "name"), "alice")

    def test_connectionLostAsItWasMade(self) -> None:
        """A connection the endpoint delivers already closed is a failed attempt that says
        so, and the client retries."""
        client = self.deafClient()
        waiting = client.whenReady()
        server, broker, _pump = self.endpoint.connections[0]
        server.transport.loseConnection()
        self.endpoint.pump()
        self.assertTrue(broker.disconnected)
        client.maxRetries = 1
        self.endpoint.deliver()
        self.assertEqual(client.failedAttempts, 1)
        failure = self.failureResultOf(waiting, PBConnectionLost)
        self.assertEqual(
            failure.getErrorMessage(),
            "no connection to the broker after 1 failed attempt: "
            "PBConnectionLost: the connection was lost as it was made",
        )
        self.clock.advance(1.0)
        self.endpoint.deliver()
        self.endpoint.pump()
        self.assertEqual(self.call(client, "name"), "alice")

    def test_stoppedByOnConnect(self) -> None:
        """An onConnect that stops the client: no avatar is made current, its connection
        closes, and it never connects again."""
        stopping: list[Deferred[None]] = []
        client = self.client(
            start=False, onConnect=lambda avatar: stopping.append(client.stopService())
        )
        waiting = client.whenReady()
        client.startService()
        self.endpoint.pump()
        (stopped,) = stopping
        self.successResultOf(stopped)
        self.assertIsNone(client.current)
        self.assertEqual(self.openConnections(), [])
        self.assertIn("stopped", self.failureResultOf(waiting, PBConnectionLost).getErrorMessage())
        self.clock.advance(10.0)
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_lostWhileOnConnectWaits(self) -> None:
        """A connection lost while onConnect's Deferred is pending cancels that Deferred and
        fails the attempt; the client retries and runs onConnect on the next connection."""
        pending: list[Deferred[None]] = []
        seen: list[Any] = []

        def onConnect(avatar: Any) -> Any:
            self.connected.append(avatar)
            if not pending:
                pending.append(Deferred())
                return pending[0].addErrback(lambda failure: seen.append(failure.type) or failure)
            return None

        client = self.client(onConnect=onConnect, maxRetries=1)
        self.assertEqual(seen, [])
        self.endpoint.drop()
        self.assertEqual(seen, [CancelledError])
        self.assertEqual(client.failedAttempts, 1)
        self.assertIsNone(client.current)
        failure = self.failureResultOf(client.whenReady(), PBConnectionLost)
        self.assertIn("the connection was lost while logging in", failure.getErrorMessage())
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(len(self.connected), 2)
        self.assertIs(self.successResultOf(client.whenReady()), self.connected[1])

    def test_lostSynchronouslyInOnConnect(self) -> None:
        """A connection that a transport reports lost during onConnect itself (before the
        attempt can be cancelled) fails the attempt once it returns: not made current."""

        def onConnect(avatar: Any) -> None:
            self.connected.append(avatar)
            if len(self.connected) == 1:
                avatar.broker.connectionLost(Failure(ConnectionRefusedError("gone")))

        client = self.client(onConnect=onConnect, maxRetries=1)
        self.assertIsNone(client.current)
        self.assertEqual(client.failedAttempts, 1)
        failure = self.failureResultOf(client.whenReady(), PBConnectionLost)
        self.assertIn("PBConnectionLost: the connection was lost", failure.getErrorMessage())
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertIs(self.successResultOf(client.whenReady()), self.connected[1])
        self.assertEqual(len(self.openConnections()), 1)

    def test_aFailedWaiterCancelsAnother(self) -> None:
        """A caller whose wait fails may cancel another one still waiting: that one fails
        with CancelledError, and the failing goes on without an AlreadyCalledError."""
        self.endpoint.up = False
        client = self.client(start=False, maxRetries=1)
        first, second, third = client.whenReady(), client.whenReady(), client.whenReady()
        failed: list[Failure] = []

        def cancelSecond(failure: Failure) -> None:
            failed.append(failure)
            second.cancel()

        first.addErrback(cancelSecond)
        client.startService()
        self.assertEqual([failure.type for failure in failed], [PBConnectionLost])
        self.failureResultOf(second, CancelledError)
        self.failureResultOf(third, PBConnectionLost)

    def test_attemptFactoryStartsAndStopsTheClientFactory(self) -> None:
        """The factory an attempt gives the endpoint starts and stops the client's factory."""
        factory = pb.PBClientFactory()
        attempt = _AttemptFactory(factory)
        attempt.doStart()
        self.assertEqual(factory.numPorts, 1)
        attempt.doStop()
        self.assertEqual(factory.numPorts, 0)


class Slow(pb.Root):
    """
    A root whose ``wait`` answers only when the test says, and whose ``tag`` answers with the
    call's context.
    """

    def __init__(self) -> None:
        self.waiting: list[Deferred[str]] = []
        self.cancelled: list[Deferred[str]] = []

    def remote_wait(self) -> Deferred[str]:
        waiting: Deferred[str] = Deferred(self.cancelled.append)
        self.waiting.append(waiting)
        return waiting

    def remote_tag(self) -> Any:
        call = context.current()
        call.reply["seen"] = call.annotations.get("tag")
        return "tagged"


class WithOptionsTests(SynchronousTestCase):
    """
    ReconnectingClient.withOptions: call options on whatever connection is ready, with a
    timeout that counts the wait for a connection too.
    """

    def setUp(self) -> None:
        self.root = Slow()
        self.endpoint = MemoryEndpoint(pb.PBServerFactory(self.root))
        self.clock = Clock()
        self.client = ReconnectingClient(
            self.endpoint, reactor=self.clock, retryPolicy=lambda attempt: 1.0
        )
        self.addCleanup(self.client.stopService)

    def start(self) -> None:
        self.client.startService()
        self.endpoint.pump()

    def test_optionsReachTheCall(self) -> None:
        """The context reaches the remote method and its reply annotations come back."""
        self.start()
        reply: dict[str, Any] = {}
        calling = self.client.withOptions(context={"tag": "t-1"}, reply=reply)
        result = calling.callRemote("tag")
        self.endpoint.pump()
        self.assertEqual(self.successResultOf(result), "tagged")
        self.assertEqual(reply, {"seen": "t-1"})

    def test_optionsWaitForAConnection(self) -> None:
        """Made while no connection is ready, the call goes, with its options, on the next."""
        reply: dict[str, Any] = {}
        result = self.client.withOptions(context={"tag": "t-2"}, reply=reply).callRemote("tag")
        self.assertNoResult(result)
        self.start()
        self.assertEqual(self.successResultOf(result), "tagged")
        self.assertEqual(reply, {"seen": "t-2"})

    def test_timeoutOnTheConnection(self) -> None:
        """A call with no answer in time fails with TimeoutError, on the client's reactor, and
        the server's Deferred is cancelled."""
        self.start()
        result = self.client.withOptions(timeout=5).callRemote("wait")
        self.endpoint.pump()
        self.assertEqual(len(self.root.waiting), 1)
        self.clock.advance(4.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        self.endpoint.pump()
        self.failureResultOf(result, TimeoutError)
        self.assertEqual(self.root.cancelled, self.root.waiting)

    def test_timeoutWhileNoConnection(self) -> None:
        """With the broker down, the call fails with TimeoutError when its time is up rather
        than waiting for ever, saying why; it no longer waits for a connection."""
        self.endpoint.up = False
        self.start()
        result = self.client.withOptions(timeout=5).callRemote("wait")
        self.clock.advance(4.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        failure = self.failureResultOf(result, TimeoutError)
        self.assertEqual(
            failure.getErrorMessage(),
            "the call to 'wait' had no answer within 5 seconds (no connection to the broker "
            "was ready)",
        )
        self.assertEqual(self.client._waiting, [])
        self.endpoint.up = True
        self.clock.advance(1.0)
        self.endpoint.pump()
        self.assertEqual(self.root.waiting, [])  # never sent

    def test_theWaitCountsTowardTheTimeout(self) -> None:
        """Time spent waiting for a connection is taken from the call's timeout."""
        self.endpoint.up = False
        self.start()
        result = self.client.withOptions(timeout=5).callRemote("wait")
        self.clock.advance(3.0)
        self.endpoint.up = True
        self.clock.advance(1.0)  # the next attempt, 4 s after the call
        self.endpoint.pump()
        self.assertEqual(len(self.root.waiting), 1)
        self.clock.advance(0.9)
        self.assertNoResult(result)
        self.clock.advance(0.1)
        failure = self.failureResultOf(result, TimeoutError)
        # The timeout the caller gave, not the second left when the call was sent.
        self.assertEqual(
            failure.getErrorMessage(), "the call to 'wait' had no answer within 5 seconds"
        )

    def test_badNameRefusedAtOnce(self) -> None:
        """A method name that is not text raises TypeError at once, as a reference's
        callRemote does, rather than after waiting for a connection (for ever, with the
        broker down and no maxRetries)."""
        self.endpoint.up = False
        self.start()
        for calling in (self.client, self.client.withOptions(timeout=5)):
            with self.assertRaises(TypeError) as raised:
                calling.callRemote(123)  # type: ignore[arg-type]
            self.assertEqual(str(raised.exception), "a remote method's name must be text, not 123")
        self.assertEqual(self.client._waiting, [])

    def test_readyJustAsTheTimeRunsOut(self) -> None:
        """A connection ready no earlier than the deadline does not get the call."""
        self.endpoint.up = False
        self.start()
        result = self.client.withOptions(timeout=1).callRemote("wait")
        self.endpoint.up = True
        # The retry and the timeout are due at the same moment; the retry was scheduled first.
        self.clock.advance(1.0)
        self.endpoint.pump()
        failure = self.failureResultOf(result, TimeoutError)
        self.assertIn("within 1 seconds", failure.getErrorMessage())
        self.assertEqual(self.root.waiting, [])

    def test_cancelWhileWaiting(self) -> None:
        """The caller may cancel while no connection is ready: CancelledError, and no timer
        is left behind."""
        self.endpoint.up = False
        self.start()
        result = self.client.withOptions(timeout=5).callRemote("wait")
        result.cancel()
        self.failureResultOf(result, CancelledError)
        self.assertEqual(self.client._waiting, [])
        self.assertEqual(
            [call.getTime() for call in self.clock.getDelayedCalls()], [1.0]
        )  # the retry only

    def test_givingUpStillFailsClearly(self) -> None:
        """With maxRetries reached before the timeout, the call fails as without options."""
        self.endpoint.up = False
        client = ReconnectingClient(
            self.endpoint, reactor=self.clock, retryPolicy=lambda attempt: 1.0, maxRetries=1
        )
        self.addCleanup(client.stopService)
        client.startService()
        result = client.withOptions(timeout=5).callRemote("wait")
        self.failureResultOf(result, PBConnectionLost)

    def test_optionsAreCheckedAtOnce(self) -> None:
        """Bad options are refused when given, as RemoteReference.withOptions refuses them."""
        with self.assertRaises(ValueError):
            self.client.withOptions(timeout=0)
        with self.assertRaises(TypeError):
            self.client.withOptions(ordered="no")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            self.client.withOptions(context=[("tag", 1)])  # type: ignore[arg-type]
