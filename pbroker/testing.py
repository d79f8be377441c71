"""
Helpers for testing PB code without sockets.

:func:`connectedServerAndClient` joins a server factory and a client factory in memory, with
Twisted's ``iosim`` fake transports, and returns the two brokers and a pump that moves bytes
between them::

    server, client, pump = connectedServerAndClient(PBServerFactory(MyRoot()), PBClientFactory())
    d = client.remoteForName("root").callRemote("echo", 5)
    pump.flush()
    assert self.successResultOf(d) == 5
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.test import iosim

from pbroker.broker import Broker

__all__ = ["connectedServerAndClient"]


def connectedServerAndClient(
    serverFactory: Any, clientFactory: Any, greet: bool = True
) -> tuple[Broker, Broker, iosim.IOPump]:
    """
    Build a broker from each factory and connect them in memory (stock Twisted PB factories
    work too), as 127.0.0.1:54321 connecting to 127.0.0.1:8789.

    :param greet: move the dialect negotiation and version messages before returning, so the
        brokers are ready for calls.
    :returns: ``(serverBroker, clientBroker, pump)``; call ``pump.flush()`` to deliver what
        either side wrote.
    """
    # Loopback addresses, as a real connection would have: per-address logic sees them.
    serverAddress = IPv4Address("TCP", "127.0.0.1", 8789)
    clientAddress = IPv4Address("TCP", "127.0.0.1", 54321)
    serverBroker = serverFactory.buildProtocol(clientAddress)
    clientBroker = clientFactory.buildProtocol(serverAddress)
    pump = iosim.connect(
        serverBroker,
        iosim.FakeTransport(serverBroker, True, serverAddress, clientAddress),
        clientBroker,
        iosim.FakeTransport(clientBroker, False, clientAddress, serverAddress),
        greet=greet,
    )
    return serverBroker, clientBroker, pump
