"""
Publish and subscribe with pushed streams: a remote method returns a
:class:`pbroker.stream.Stream`, the server writes events to every subscriber's stream as they
happen, and a subscriber that stops reading (it cancels, or its connection goes) is dropped.

Run it from the repository root (after installing pbroker)::

    python examples/events.py

Two subscribers connect; the first leaves after three events, the second after five; the
server notices each leaving at its next event and stops writing to it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred, gatherResults

from pbroker import pb
from pbroker.stream import Stream


class Events(pb.Root):
    def __init__(self) -> None:
        self.subscribers: list[Stream] = []
        self.published = 0

    def remote_subscribe(self) -> Stream:
        stream = Stream()
        self.subscribers.append(stream)
        return stream

    def publish(self) -> None:
        self.published += 1
        # A subscriber whose reader stopped is closed: drop it.
        for stream in self.subscribers:
            if stream.closed:
                print("server: a subscriber left")
        self.subscribers = [s for s in self.subscribers if not s.closed]
        for stream in self.subscribers:
            # Not waited on: a reader that stops while the write waits for room fails it.
            stream.write({"event": self.published}).addErrback(lambda failure: None)


async def subscriber(name: str, root: pb.RemoteReference, count: int) -> None:
    stream = await root.callRemote("subscribe")
    async with stream:  # leaving the block cancels the stream
        async for event in stream:
            print(f"{name}: event {event['event']}")
            if event["event"] >= count:
                break


async def main(reactor: Any) -> None:
    events = Events()
    port = reactor.listenTCP(0, pb.PBServerFactory(events), interface="127.0.0.1")
    factories = [pb.PBClientFactory(), pb.PBClientFactory()]
    roots = []
    for factory in factories:
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        roots.append(await factory.getRootObject())
    reading = gatherResults(
        [
            ensureDeferred(subscriber("first", roots[0], 3)),
            ensureDeferred(subscriber("second", roots[1], 5)),
        ]
    )
    # Wait until both have subscribed, then publish an event every 50 ms until both left
    # (for 5 seconds at most).
    for _ in range(500):
        if len(events.subscribers) == 2:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    ticker = task.LoopingCall(events.publish)
    ticker.clock = reactor
    ticker.start(0.05)
    try:
        await reading
        for _ in range(100):
            if not events.subscribers:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
    finally:
        ticker.stop()
        for factory in factories:
            factory.disconnect()
        await port.stopListening()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
