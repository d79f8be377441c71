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
    Build a broker from each factory and connect them in memory.

    :param greet: move the dialect negotiation and version messages before returning, so the
        brokers are ready for calls.
    :returns: ``(serverBroker, clientBroker, pump)``; call ``pump.flush()`` to deliver what
        either side wrote.
    """
    serverBroker = serverFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8789))
    clientBroker = clientFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8789))
    pump = iosim.connect(
        serverBroker,
        iosim.makeFakeServer(serverBroker),
        clientBroker,
        iosim.makeFakeClient(clientBroker),
        greet=greet,
    )
    return serverBroker, clientBroker, pump
