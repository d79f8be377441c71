"""
Timeouts, cancellation and per-call context between two pbroker peers.

Run it from the repository root (after installing pbroker)::

    python examples/deadlines.py

A call with ``withOptions(timeout=...)`` fails with ``TimeoutError`` when the time is up, and
``Deferred.cancel()`` fails it with ``CancelledError``; either way the server is told, and the
Deferred its method returned is cancelled (here, a slow "query" that says so). Call options
travel beside the arguments, so a remote method may take arguments named ``timeout``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred

from pbroker import context, pb


class Database(pb.Root):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def remote_query(self, sql: str, seconds: float) -> Deferred[str]:
        call = context.current()
        tag = call.annotations.get("requestId", "-")

        def cancelled(deferred: Deferred[str]) -> None:
            print(f"server: {tag} cancelled, stopping the query")
            pending.cancel()

        result: Deferred[str] = Deferred(cancelled)
        pending = self.reactor.callLater(seconds, result.callback, f"rows for {sql!r}")
        call.reply["server"] = "db-1"
        if call.deadline is not None:
            left = call.deadline - self.reactor.seconds()
            print(f"server: {tag} has {left:.1f} s before its caller gives up")
        return result

    def remote_retry(self, timeout: int) -> str:
        # An argument named "timeout": call options never take a method's keyword names.
        return f"retry with timeout={timeout}"


async def client(root: pb.RemoteReference, reactor: Any) -> None:
    reply: dict[str, Any] = {}
    fast = root.withOptions(timeout=5, context={"requestId": "r-1"}, reply=reply)
    print("client:", await fast.callRemote("query", "select 1", 0.1), "answered by", reply)

    slow = root.withOptions(timeout=0.5, context={"requestId": "r-2"})
    try:
        await slow.callRemote("query", "select * from big", 60)
    except defer.TimeoutError as e:
        print("client: timed out:", e)

    call = root.withOptions(context={"requestId": "r-3"}).callRemote("query", "select 2", 60)
    reactor.callLater(0.2, call.cancel)
    try:
        await call
    except CancelledError:
        print("client: cancelled")

    print("client:", await root.callRemote("retry", timeout=3))


async def main(reactor: Any) -> None:
    port = reactor.listenTCP(0, pb.PBServerFactory(Database(reactor)), interface="127.0.0.1")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    try:
        root = await factory.getRootObject()
        await client(root, reactor)
        # Let the server's cancellations print before the connection closes.
        await task.deferLater(reactor, 0.1, lambda: None)
    finally:
        factory.disconnect()
        await port.stopListening()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
