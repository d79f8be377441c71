"""
Keepalive and the message size limit between two pbroker peers.

Run it from the repository root (after installing pbroker)::

    python examples/limits.py

The server takes messages of up to 1 MiB (``BrokerLimits(messageSize=...)``) and tells the
client so when they connect: a call over it fails at once at the caller with
``LimitExceeded``, nothing is sent, and the connection goes on. The client pings a silent
server (``Keepalive``): here the server's process hangs (it stops reading, as a stopped or
wedged process would), the client notices within the keepalive's timeout, closes the
connection, and its pending call fails with ``PBConnectionLost`` rather than waiting for ever.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IPushProducer

from pbroker import pb
from pbroker.errors import LimitExceeded, PBConnectionLost


class Service(pb.Root):
    def rootObject(self, broker: pb.Broker) -> Service:
        self.broker = broker  # (one client here)
        return self

    def remote_store(self, data: bytes) -> int:
        return len(data)

    def remote_hang(self) -> Deferred[None]:
        # A hung process: it reads nothing more (so it answers no ping) and never answers.
        IPushProducer(self.broker.transport).pauseProducing()
        return Deferred()


async def main(reactor: Any) -> None:
    limits = pb.BrokerLimits(messageSize=1024 * 1024)
    port = reactor.listenTCP(0, pb.PBServerFactory(Service(), limits=limits), interface="127.0.0.1")
    factory = pb.PBClientFactory(keepalive=pb.Keepalive(interval=0.2, timeout=0.6))
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    try:
        root = await factory.getRootObject()
        print("stored", await root.callRemote("store", b"x" * 500_000), "bytes")
        try:
            await root.callRemote("store", b"x" * 2_000_000)
        except LimitExceeded as e:
            print("refused before sending:", e)
        print("the connection goes on: stored", await root.callRemote("store", b"ok"), "bytes")

        started = reactor.seconds()
        try:
            await root.callRemote("hang")
        except PBConnectionLost:
            waited = reactor.seconds() - started
            print(
                f"the server went silent; the call failed with PBConnectionLost in under 2 s: "
                f"{waited < 2}"
            )
    finally:
        factory.disconnect()
        await port.stopListening()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
