"""
A client that stays connected: :class:`pbroker.reconnect.ReconnectingClient` logs in, and
when the server goes away it reconnects with backoff and logs in again; calls made meanwhile
wait for the next connection (within their timeout). Keepalive notices a peer that goes
silent without closing the connection.

Run it from the repository root (after installing pbroker)::

    python examples/reconnect.py

The server is restarted once, in the same process, while the client keeps calling.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IAddress
from zope.interface import implementer

from pbroker import pb
from pbroker.reconnect import ReconnectingClient


class User(pb.Avatar):
    def __init__(self, name: str, run: int) -> None:
        self.name = name
        self.run = run

    def perspective_whoAmI(self) -> str:
        return f"{self.name}, on server run {self.run}"


@implementer(IRealm)
class Realm:
    def __init__(self) -> None:
        self.run = 0  # which run of the server this is

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return pb.IPerspective, User(avatarId.decode(), self.run), lambda: None


class Server(pb.PBServerFactory):
    """
    A server that can be stopped and started again, as a restart would.
    """

    def __init__(self, reactor: Any) -> None:
        self.realm = Realm()
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        super().__init__(Portal(self.realm, [checker]))
        self.reactor = reactor
        self.port: Any = None
        self.brokers: list[pb.Broker] = []

    def buildProtocol(self, addr: IAddress | None) -> pb.Broker:
        broker = super().buildProtocol(addr)
        self.brokers.append(broker)
        return broker

    def start(self, portNumber: int = 0) -> int:
        self.realm.run += 1
        self.port = self.reactor.listenTCP(portNumber, self, interface="127.0.0.1")
        return self.port.getHost().port  # type: ignore[no-any-return]

    async def stop(self) -> None:
        await self.port.stopListening()
        for broker in self.brokers:
            if broker.transport is not None:
                broker.transport.loseConnection()
        self.brokers.clear()


async def main(reactor: Any) -> None:
    server = Server(reactor)
    portNumber = server.start()
    client = ReconnectingClient(
        f"tcp:127.0.0.1:{portNumber}",
        UsernamePassword(b"alice", b"secret"),
        onConnect=lambda avatar: print("client: logged in"),
        retryPolicy=lambda attempt: 0.2,  # the default backs off exponentially, from 1 s
        factory=pb.PBClientFactory(keepalive=pb.Keepalive(interval=10, timeout=30)),
    )
    client.startService()
    calls = client.withOptions(timeout=10)
    try:
        print("client:", await calls.callRemote("whoAmI"))

        await server.stop()
        print("server: stopped")
        # A call in flight when its connection drops fails with PBConnectionLost: it may or
        # may not have run, so it is not made again. One made once the client has seen the
        # connection close waits for the next connection, within its timeout.
        await task.deferLater(reactor, 0.1, lambda: None)
        waiting = calls.callRemote("whoAmI")
        await task.deferLater(reactor, 0.5, lambda: None)
        server.start(portNumber)
        print("server: started again")
        print("client:", await waiting)
    finally:
        await client.stopService()
        await server.stop()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
