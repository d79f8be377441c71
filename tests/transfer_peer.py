"""
A large streamed transfer over real loopback TCP, in its own process so that its peak memory
can be measured alone: ``python tests/transfer_peer.py MEBIBYTES``.

A pbroker server streams MEBIBYTES chunks of 1 MiB from a generator; a pbroker client in the
same process reads them with ``async for`` and, meanwhile, keeps making small calls on the same
connection. It prints one JSON line: bytes received, small calls answered during the
transfer, seconds, and the process's peak resident memory in KiB.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from pbroker import pb

CHUNK = 1024 * 1024


class Source(pb.Root):
    def remote_download(self, chunks: int) -> Iterator[bytes]:
        for i in range(chunks):
            # A fresh chunk each time, as a file read would give.
            yield bytes([i % 256]) * CHUNK

    def remote_ping(self, value: int) -> int:
        return value


async def main(reactor: Any, chunks: int) -> None:
    port = reactor.listenTCP(0, pb.PBServerFactory(Source()), interface="127.0.0.1")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    root = await factory.getRootObject()
    assert root.broker.isNative
    started = time.perf_counter()
    stream = await root.callRemote("download", chunks)
    received = 0
    pings = 0
    streaming = True

    async def pinger() -> None:
        nonlocal pings
        while streaming and pings < 100_000:
            await root.callRemote("ping", pings)
            pings += 1

    pinging = Deferred.fromCoroutine(pinger())
    index = 0
    async for chunk in stream:
        if len(chunk) != CHUNK or chunk[0] != index % 256:
            raise AssertionError(f"chunk {index} is wrong")
        received += len(chunk)
        index += 1
    streaming = False
    await pinging
    elapsed = time.perf_counter() - started
    factory.disconnect()
    await port.stopListening()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"bytes": received, "pings": pings, "seconds": elapsed, "peakKiB": peak}))


if __name__ == "__main__":
    chunks = int(sys.argv[1])
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, chunks)))
