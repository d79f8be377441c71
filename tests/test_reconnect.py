"""
Tests for ReconnectingClient: reconnection with backoff, login again, the onConnect hook, and
giving up clearly after maxRetries; in memory, on a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pbroker import pb
from pbroker.errors import PBConnectionLost
from pbroker.reconnect import ReconnectingClient
from pbroker.testing import connectedServerAndClient
from tests.test_login import realmFor


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """
    Connects to a server factory in memory; can be switched off to refuse connections.
    """

    def __init__(self, serverFactory: Any) -> None:
        self.serverFactory = serverFactory
        self.up = True
        self.connections: list[tuple[Any, Any, Any]] = []

    def connect(self, factory: Any) -> Any:
        if not self.up:
            return fail(ConnectionRefusedError("switched off"))
        connection = connectedServerAndClient(self.serverFactory, factory)
        self.connections.append(connection)
        return succeed(connection[1])

    def pump(self) -> None:
        for _server, _client, pump in self.connections:
            pump.flush()

    def drop(self) -> None:
        server, _client, _pump = self.connections[-1]
        server.transport.loseConnection()
        self.pump()


class ReconnectingClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        guard = pb.LoginGuard(baseDelay=0, maxDelay=0)
        self.endpoint = MemoryEndpoint(
            pb.PBServerFactory(Portal(realmFor(pb), [checker]), loginGuard=guard)
        )
        self.clock = Clock()
        self.connected: list[Any] = []

    def client(self, password: bytes = b"secret", **options: Any) -> ReconnectingClient:
        client = ReconnectingClient(
            self.endpoint,
            UsernamePassword(b"alice", password),
            onConnect=self.connected.append,
            retryPolicy=lambda attempt: 1.0,
            reactor=self.clock,
            **options,
        )
        client.startService()
        self.addCleanup(client.stopService)
        self.endpoint.pump()
        return client

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
