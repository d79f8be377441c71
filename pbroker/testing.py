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

__all__ = ["PacingFakeTransport", "connectedServerAndClient"]


class PacingFakeTransport(iosim.FakeTransport):
    """
    An ``iosim`` fake transport that applies back-pressure as a TCP transport does: a
    streaming producer registered on it is paused when more than ``bufferSize`` bytes wait
    to be moved, and resumed when the pump takes them.
    """

    def __init__(self, *args: Any, bufferSize: int = 64 * 1024, **kw: Any) -> None:
        super().__init__(*args, **kw)  # type: ignore[no-untyped-call]
        self.bufferSize = bufferSize
        self.waiting = 0
        self.producerPaused = False

    def write(self, data: bytes) -> None:
        """
        Buffer ``data`` as the fake does, and pause a streaming producer once more than
        ``bufferSize`` bytes wait, as a real transport would.
        """
        super().write(data)  # type: ignore[no-untyped-call]
        self.waiting += len(data)
        if (
            self.producer is not None
            and self.streamingProducer
            and not self.producerPaused
            and self.waiting > self.bufferSize
        ):
            self.producerPaused = True
            self.producer.pauseProducing()

    def pendingBytes(self) -> int:
        """
        The bytes written and not yet taken by the pump (what a broker's pacing reads to
        tell a slow reader from a stalled one).
        """
        return sum(len(chunk) for chunk in self.stream)

    def getOutBuffer(self) -> Any:
        data = super().getOutBuffer()  # type: ignore[no-untyped-call]
        self.waiting = 0
        if self.producerPaused:
            self.producerPaused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data


def connectedServerAndClient(
    serverFactory: Any,
    clientFactory: Any,
    greet: bool = True,
    clock: Any = None,
    bufferSize: int | None = None,
) -> tuple[Broker, Broker, iosim.IOPump]:
    """
    Build a broker from each factory and connect them in memory (stock Twisted PB factories
    work too), as 127.0.0.1:54321 connecting to 127.0.0.1:8789.

    :param greet: move the dialect negotiation and version messages before returning, so the
        brokers are ready for calls.
    :param clock: a :class:`twisted.internet.task.Clock` that each pump advances by zero
        seconds, so calls the brokers schedule for "now" run (give the factories the same
        clock).
    :param bufferSize: if given, the transports pause a streaming producer (a broker's
        pacing) when more than this many bytes wait, as TCP transports do
        (:class:`PacingFakeTransport`); otherwise they never push back.
    :returns: ``(serverBroker, clientBroker, pump)``; call ``pump.flush()`` to deliver what
        either side wrote.
    """
    # Loopback addresses, as a real connection would have: per-address logic sees them.
    serverAddress = IPv4Address("TCP", "127.0.0.1", 8789)
    clientAddress = IPv4Address("TCP", "127.0.0.1", 54321)
    serverBroker = serverFactory.buildProtocol(clientAddress)
    clientBroker = clientFactory.buildProtocol(serverAddress)
    if bufferSize is None:
        serverTransport = iosim.FakeTransport(serverBroker, True, serverAddress, clientAddress)
        clientTransport = iosim.FakeTransport(clientBroker, False, clientAddress, serverAddress)
    else:
        serverTransport = PacingFakeTransport(
            serverBroker, True, serverAddress, clientAddress, bufferSize=bufferSize
        )
        clientTransport = PacingFakeTransport(
            clientBroker, False, clientAddress, serverAddress, bufferSize=bufferSize
        )
    pump = iosim.connect(
        serverBroker,
        serverTransport,
        clientBroker,
        clientTransport,
        greet=greet,
        clock=clock,
    )
    return serverBroker, clientBroker, pump
