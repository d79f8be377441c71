"""
A large value in one call between two pbroker peers, while small calls keep being answered.

Run it from the repository root (after installing pbroker)::

    python examples/transfer.py            # 256 MiB
    python examples/transfer.py --mib 64

Stock PB refuses any message over 640 KiB; between pbroker peers a value up to
``BrokerLimits.messageSize`` (32 MiB by default, raised here on both sides) travels in paced
fragments. A call made with ``ordered=False`` does not wait behind the transfer: the status
calls below are answered while the large one is still being sent.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred, gatherResults

from pbroker import pb


class Store(pb.Root):
    def remote_store(self, data: bytes) -> tuple[int, bool]:
        return len(data), data.count(0x5A) == len(data)

    def remote_status(self) -> str:
        return "ok"


def peakMiB() -> float:
    # ru_maxrss: KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


async def client(root: pb.RemoteReference, reactor: Any, size: int) -> None:
    data = b"\x5a" * size
    before = peakMiB()
    started = time.perf_counter()
    transfer = root.callRemote("store", data)
    # Status calls while the transfer is under way, each answered ahead of it.
    answered: list[float] = []
    status = root.withOptions(ordered=False)

    async def poll() -> None:
        for _ in range(3):
            await task.deferLater(reactor, 0.01, lambda: None)
            await status.callRemote("status")
            answered.append(time.perf_counter() - started)

    _, (length, intact) = await gatherResults([ensureDeferred(poll()), transfer])
    elapsed = time.perf_counter() - started
    assert length == size and intact
    print(f"sent {size / 2**20:.0f} MiB in {elapsed:.2f} s ({size / elapsed / 1e6:.0f} MB/s)")
    print("status calls answered at", ", ".join(f"{t:.2f} s" for t in answered))
    # Client and server share this process. The caller's value was made before "before";
    # what the peak grew by is the server's copy of it: nothing else of its size is held
    # while it travels, on either side.
    print(f"peak memory grew by {peakMiB() - before:.0f} MiB (both sides)")


async def main(reactor: Any, size: int) -> None:
    limits = pb.BrokerLimits(messageSize=size + 2**20)
    serverFactory = pb.PBServerFactory(Store(), limits=limits)
    port = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
    factory = pb.PBClientFactory(limits=limits)
    reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
    try:
        root = await factory.getRootObject()
        await client(root, reactor, size)
    finally:
        factory.disconnect()
        await port.stopListening()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="the value's size, in MiB")
    size = parser.parse_args().mib * 2**20
    task.react(lambda reactor: ensureDeferred(main(reactor, size)))
