"""
A stock Twisted PB peer for the interoperability tests, run in a separate process.

Run as a script it uses only ``twisted.spread`` (never pbroker); it listens or connects on
127.0.0.1:

    python tests/interop_peer.py server      # prints "PORT <n>", serves until stdin closes
    python tests/interop_peer.py client N    # runs the scenarios against 127.0.0.1:N, prints
                                             # "OK <name>" per scenario, exits 0 if all passed

:func:`build` defines the scenario classes and the scenarios themselves on either
implementation, so tests/test_interop.py runs the very same code on pbroker's side.
"""

from __future__ import annotations

import gc
import sys
import types
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor, stdio
from twisted.internet.protocol import Protocol
from zope.interface import implementer

POINT_TAG = b"interop.Point"
GAUGE_TAG = b"interop.Gauge"
BLANK_TAG = b"interop.Blank"
BIG = bytes(range(256)) * 4096  # 1 MiB, beyond PB's 640 KiB string limit
VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -(2**40),
    2**100,
    1.5,
    b"bytes",
    "text \u00e9",
    "tuple",
    [1, (2, 3)],
    {"k": {4, 5}, 6: frozenset([7])},
]


def build(pb: Any, util: Any) -> Any:
    """
    The scenario classes, built on ``pb``/``util`` (twisted.spread's or pbroker's): the two
    sides of a test use the same definitions and tags, each on its own implementation.
    """

    class Point(pb.Copyable):
        def __init__(self, x: int, y: int) -> None:
            self.x = x
            self.y = y

        def getTypeToCopy(self) -> bytes:
            return POINT_TAG

    class RemotePoint(pb.RemoteCopy):
        pass

    class Blank(pb.Copyable):
        """A copy with no state: ``None``, as ``__getstate__`` gives for no attributes."""

        def getTypeToCopy(self) -> bytes:
            return BLANK_TAG

        def getStateToCopy(self) -> Any:
            return None

    class RemoteBlank(pb.RemoteCopy):
        pass

    class Gauge(pb.Cacheable):
        def __init__(self) -> None:
            self.value = 1
            self.observers: list[Any] = []

        def getTypeToCopy(self) -> bytes:
            return GAUGE_TAG

        def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
            self.observers.append(observer)
            return {"value": self.value}

        def stoppedObserving(self, perspective: Any, observer: Any) -> None:
            if observer in self.observers:
                self.observers.remove(observer)

        def set(self, value: int) -> None:
            self.value = value
            for observer in self.observers:
                observer.callRemote("setValue", value)

    class RemoteGauge(pb.RemoteCache):
        def observe_setValue(self, value: int) -> None:
            self.value = value

    class Counter(pb.Referenceable):
        def __init__(self) -> None:
            self.count = 0

        def remote_add(self, amount: int) -> int:
            self.count += amount
            return self.count

    class Board(pb.Viewable):
        def view_whoAmI(self, perspective: Any) -> str:
            return str(perspective.name)

    class User(pb.Avatar):
        def __init__(self, name: str, state: dict[str, Any]) -> None:
            self.name = name
            self.state = state

        def perspective_echo(self, value: Any) -> Any:
            return value

        def perspective_counter(self) -> Any:
            return self.state["counter"]

        def perspective_point(self) -> Any:
            return Point(3, 4)

        def perspective_norm(self, point: Any) -> int:
            return int(point.x + point.y)

        def perspective_blank(self) -> Any:
            return Blank()

        def perspective_isBlank(self, value: Any) -> bool:
            return isinstance(value, RemoteBlank) and not vars(value)

        def perspective_gauge(self) -> Any:
            return self.state["gauge"]

        def perspective_setGauge(self, value: int) -> None:
            self.state["gauge"].set(value)

        def perspective_board(self) -> Any:
            return self.state["board"]

        def perspective_fail(self, message: str) -> None:
            raise ValueError(message)

        def perspective_record(self, value: Any) -> None:
            self.state["recorded"].append(value)

        def perspective_recorded(self) -> list[Any]:
            return list(self.state["recorded"])

        def perspective_pages(self, collector: Any) -> None:
            util.StringPager(collector, BIG)

    @implementer(IRealm)
    class Realm:
        def __init__(self) -> None:
            self.state: dict[str, Any] = {
                "counter": Counter(),
                "gauge": Gauge(),
                "board": Board(),
                "recorded": [],
            }

        def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
            return pb.IPerspective, User(avatarId.decode(), self.state), lambda: None

    def portal() -> Portal:
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        return Portal(Realm(), [checker])

    async def scenarios(factory: Any, report: Any) -> None:
        """
        Log in through ``factory`` (already connecting) and run every scenario, calling
        ``report(name)`` after each one that passed; raise AssertionError on the first failure.
        """

        def check(condition: bool, name: str) -> None:
            if not condition:
                raise AssertionError(f"scenario failed: {name}")
            report(name)

        try:
            await factory.login(UsernamePassword(b"alice", b"wrong"))
        except Exception as e:
            # Awaited, a remote failure is raised as RemoteError, which names the remote type.
            remoteType = getattr(e, "remoteType", b"")
            check(
                isinstance(e, UnauthorizedLogin) or b"UnauthorizedLogin" in remoteType,
                "wrong password refused",
            )
        else:
            check(False, "wrong password refused")
        avatar = await factory.login(UsernamePassword(b"alice", b"secret"))
        check(True, "login")
        for value in VALUES:
            check(await avatar.callRemote("echo", value) == value, f"echo {value!r}")
        counter = await avatar.callRemote("counter")
        await counter.callRemote("add", 2)
        check(await counter.callRemote("add", 3) == 5, "referenceable called again")
        point = await avatar.callRemote("point")
        check(isinstance(point, RemotePoint) and (point.x, point.y) == (3, 4), "copy received")
        check(await avatar.callRemote("norm", Point(5, 6)) == 11, "copy sent")
        blank = await avatar.callRemote("blank")
        check(isinstance(blank, RemoteBlank) and not vars(blank), "copy without state received")
        check(await avatar.callRemote("isBlank", Blank()), "copy without state sent")
        gauge = await avatar.callRemote("gauge")
        check(isinstance(gauge, RemoteGauge) and gauge.value == 1, "cacheable received")
        await avatar.callRemote("setGauge", 9)
        await avatar.callRemote("echo", None)  # the update was sent before this answer
        check(gauge.value == 9, "cacheable updated")
        board = await avatar.callRemote("board")
        check(await board.callRemote("whoAmI") == "alice", "viewable")
        # Wrapped: a Failure returned by an errback would continue the errback chain.
        [failure] = await avatar.callRemote("fail", "boom").addCallbacks(list, lambda f: [f])
        check(failure.check(ValueError) is not None and failure.value == "boom", "exception")
        check(failure.type == b"builtins.ValueError", "exception type name")
        avatar.callRemote("record", "one-way", pbanswer=False)
        check("one-way" in await avatar.callRemote("recorded"), "one-way call")
        # More calls in flight than a pbroker peer answers in one write.
        pipelined = await defer.gatherResults([avatar.callRemote("echo", i) for i in range(200)])
        check(pipelined == list(range(200)), "200 calls pipelined")
        pages = await util.getAllPages(avatar, "pages")
        check(b"".join(pages) == BIG, "pager larger than 640 KiB")
        del counter, point, blank, gauge, board
        gc.collect()

    return types.SimpleNamespace(
        Point=Point,
        RemotePoint=RemotePoint,
        RemoteBlank=RemoteBlank,
        Gauge=Gauge,
        RemoteGauge=RemoteGauge,
        portal=portal,
        scenarios=scenarios,
    )


class _StopOnEOF(Protocol):
    def connectionLost(self, reason: Any = None) -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def stock() -> Any:
    """
    The scenario classes on stock Twisted, with their copy classes registered globally.
    """
    from twisted.spread import pb, util

    classes = build(pb, util)
    pb.setUnjellyableForClass(POINT_TAG, classes.RemotePoint)
    pb.setUnjellyableForClass(GAUGE_TAG, classes.RemoteGauge)
    pb.setUnjellyableForClass(BLANK_TAG, classes.RemoteBlank)
    return classes


def serve() -> None:
    from twisted.spread import pb

    factory = pb.PBServerFactory(stock().portal())
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"PORT {port.getHost().port}", flush=True)
    stdio.StandardIO(_StopOnEOF())
    reactor.callLater(120, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def runClient(port: int) -> int:
    from twisted.spread import pb

    classes = stock()
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
    outcome: list[Any] = []

    def report(name: str) -> None:
        print(f"OK {name}", flush=True)

    d = defer.ensureDeferred(classes.scenarios(factory, report))
    d.addBoth(outcome.append)
    d.addBoth(lambda _: factory.disconnect())
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.callLater(60, reactor.stop)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if outcome == [None]:
        return 0
    print(f"FAILED {outcome[0] if outcome else 'timeout'}", flush=True)
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["server"]:
        serve()
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 3:
        sys.exit(runClient(int(sys.argv[2])))
    else:
        sys.exit("usage: interop_peer.py server | client PORT")
