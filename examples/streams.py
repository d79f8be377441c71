"""
Streams between two pbroker peers: a remote method that returns a generator or an async
generator, read with ``async for``; a reader that stops early; a stream passed as an argument.

Run it from the repository root (after installing pbroker)::

    python examples/streams.py

It starts a server on a free loopback port and a client in the same process, prints what the
client reads, and exits. Split ``Library`` and ``client()`` into two programs to run them on
two machines: nothing else changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from pbroker import pb


class Library(pb.Root):
    def __init__(self) -> None:
        self.closed: list[str] = []

    def remote_squares(self, count: int) -> Iterator[int]:
        # A generator: its items are sent as the reader gives credit for them.
        return (n * n for n in range(count))

    async def _ticks(self, count: int, clock: Any) -> AsyncIterator[str]:
        try:
            for n in range(count):
                await task.deferLater(clock, 0.01, lambda: None)  # a slow source
                yield f"tick {n}"
        finally:
            # Runs when the stream ends, and when its reader cancels it.
            self.closed.append(f"ticks({count})")

    def remote_ticks(self, count: int) -> AsyncIterator[str]:
        from twisted.internet import reactor

        return self._ticks(count, reactor)

    async def remote_store(self, chunks: Any) -> int:
        # An argument that was a generator at the caller arrives as a RemoteStream.
        total = 0
        async for chunk in chunks:
            total += len(chunk)
        return total

    def remote_closedSources(self) -> list[str]:
        return self.closed


async def client(root: pb.RemoteReference) -> None:
    squares = await root.callRemote("squares", 10)
    print("squares:", [n async for n in squares])

    # A reader that may stop early reads inside "async with": leaving the block cancels
    # the stream, and the server's generator is closed (its finally block runs).
    ticks = await root.callRemote("ticks", 1000)
    async with ticks:
        async for tick in ticks:
            print("read", tick)
            if tick == "tick 2":
                break
    print("closed on the server:", await root.callRemote("closedSources"))

    # Streaming an argument: the server reads the chunks as they come.
    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b"x" * 1_000_000

    print("stored bytes:", await root.callRemote("store", chunks()))


async def main(reactor: Any) -> None:
    port = reactor.listenTCP(0, pb.PBServerFactory(Library()), interface="127.0.0.1")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    try:
        root = await factory.getRootObject()
        dialect = root.broker.currentDialect  # (None only before the dialect is chosen)
        assert dialect is not None
        print("dialect:", dialect.decode())
        await client(root)
    finally:
        factory.disconnect()
        await port.stopListening()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
