"""
pbroker and stock Twisted PB on one wire, both ways: a stock ``twisted.spread.pb`` client
calls a pbroker server, and a pbroker client calls a stock server. They speak PB's own
dialect (``pb``); two pbroker peers choose the native one (``pbroker2``).

Run it from the repository root (after installing pbroker)::

    python examples/interop.py

Moving PB code to pbroker is a change of imports: ``from twisted.spread import pb`` becomes
``from pbroker import pb``, and the classes, methods and wire stay the same.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.spread import pb as stock

from pbroker import pb


class Point(pb.Copyable, pb.RemoteCopy):
    """
    A copy that travels by value, under the name both sides register it with.
    """

    def __init__(self, x: int = 0, y: int = 0) -> None:
        self.x, self.y = x, y

    def getTypeToCopy(self) -> bytes:
        return b"examples.Point"


class StockPoint(stock.Copyable, stock.RemoteCopy):
    """
    The same, for stock Twisted (a program using stock PB would have its own).
    """

    def __init__(self, x: int = 0, y: int = 0) -> None:
        self.x, self.y = x, y

    def getTypeToCopy(self) -> bytes:
        return b"examples.Point"


pb.setUnjellyableForClass("examples.Point", Point)
stock.setUnjellyableForClass("examples.Point", StockPoint)  # type: ignore[no-untyped-call]


class PbrokerServer(pb.Root):
    def remote_move(self, point: Point, dx: int) -> Point:
        return Point(point.x + dx, point.y)


class StockServer(stock.Root):
    def remote_move(self, point: StockPoint, dx: int) -> StockPoint:
        return StockPoint(point.x + dx, point.y)


async def call(reactor: Any, serverFactory: Any, clientFactory: Any, point: Any) -> None:
    port = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
    reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)
    try:
        root = await clientFactory.getRootObject()
        moved = await root.callRemote("move", point, 2)
        dialect = getattr(root.broker, "currentDialect", b"pb").decode()
        print(
            f"{type(clientFactory).__module__.split('.')[0]} client -> "
            f"{type(serverFactory).__module__.split('.')[0]} server ({dialect}): "
            f"{type(moved).__name__}({moved.x}, {moved.y})"
        )
    finally:
        clientFactory.disconnect()
        await port.stopListening()


async def main(reactor: Any) -> None:
    # (Stock Twisted's pb module has no annotations.)
    stockClient = stock.PBClientFactory()  # type: ignore[no-untyped-call]
    stockServer = stock.PBServerFactory(StockServer())  # type: ignore[no-untyped-call]
    await call(reactor, pb.PBServerFactory(PbrokerServer()), stockClient, StockPoint(1, 5))
    await call(reactor, stockServer, pb.PBClientFactory(), Point(1, 5))
    await call(reactor, pb.PBServerFactory(PbrokerServer()), pb.PBClientFactory(), Point(1, 5))


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
