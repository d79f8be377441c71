"""
Codec benchmark: pbroker's banana + jelly against stock ``twisted.spread``, same data, one run.

Run it from the repository root after installing the project::

    python bench/codec.py            # the default: 7 repetitions, best time of each
    python bench/codec.py --repeat 15

For each workload it times "encode" (jelly, then banana-encode) and "decode" (banana-decode,
then unjelly) on both implementations, checks that both produce the same bytes and values, and
prints the times and the ratio Twisted / pbroker (above 1: pbroker is faster).

Workloads:

a. ``ints``:    a list of 100,000 integers (0 .. 99,999)
b. ``records``: 1,000 records ``{"name": str, "value": float, "tags": [str, str], "id": int}``
c. ``bytes``:   one 60 KB bytes value
d. ``calls``:   2,000 PB call messages ``[message, id, b"root", b"ping", 1, args, kwargs]`` in the
   ``pb`` dialect with small args and kwargs; decoded from one stream fed in 64 KiB reads, as a
   connection would receive them.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.spread import banana as twistedBanana
from twisted.spread import jelly as twistedJelly

from pbroker import banana, jelly

_READ_SIZE = 65536


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass


class _CollectingTransport:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


def _twistedPbBanana(transport: Any) -> twistedBanana.Banana:
    protocol = twistedBanana.Banana(isClient=1)
    protocol.connectionMade()
    protocol._selectDialect(b"pb")
    protocol.transport = transport
    return protocol


def _callMessages(count: int) -> list[tuple[int, tuple[Any, ...], dict[str, Any]]]:
    return [(i, (f"user{i}", i, 2.5), {"flag": True, "tag": "x"}) for i in range(count)]


def _workloads() -> dict[str, Any]:
    return {
        "ints": list(range(100_000)),
        "records": [
            {"name": f"item{i}", "value": i * 1.5, "tags": [f"t{i}", "common"], "id": i}
            for i in range(1000)
        ],
        "bytes": b"\xab" * 60_000,
    }


def _best(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def _valueCases(repeat: int) -> list[tuple[str, float, float, float, float]]:
    rows = []
    for name, value in _workloads().items():
        ours = jelly.dumps(value)
        theirs = twistedBanana.encode(twistedJelly.jelly(value))
        assert ours == theirs, f"{name}: pbroker and Twisted bytes differ"
        assert jelly.loads(ours) == twistedJelly.unjelly(twistedBanana.decode(ours)) == value
        oursEncode = _best(lambda value=value: jelly.dumps(value), repeat)
        theirsEncode = _best(
            lambda value=value: twistedBanana.encode(twistedJelly.jelly(value)), repeat
        )
        oursDecode = _best(lambda data=ours: jelly.loads(data), repeat)
        theirsDecode = _best(
            lambda data=ours: twistedJelly.unjelly(twistedBanana.decode(data)), repeat
        )
        rows.append((name, oursEncode, theirsEncode, oursDecode, theirsDecode))
    return rows


def _callCase(repeat: int) -> tuple[str, float, float, float, float]:
    messages = _callMessages(2000)
    tokens = banana.getTokens(b"pb")
    message = tokens.symbol(b"message")
    root = tokens.symbol(b"root")
    ping = tokens.symbol(b"ping")
    one = tokens.integer(1)

    def oursEncode() -> list[bytes]:
        return [
            tokens.joinList(
                [
                    message,
                    tokens.integer(requestId),
                    root,
                    ping,
                    one,
                    jelly.dumps(args, b"pb"),
                    jelly.dumps(kwargs, b"pb"),
                ]
            )
            for requestId, args, kwargs in messages
        ]

    def theirsEncode() -> list[bytes]:
        transport = _CollectingTransport()
        protocol = _twistedPbBanana(transport)
        for requestId, args, kwargs in messages:
            protocol.sendEncoded(
                [
                    b"message",
                    requestId,
                    b"root",
                    b"ping",
                    1,
                    twistedJelly.jelly(args),
                    twistedJelly.jelly(kwargs),
                ]
            )
        return transport.chunks

    stream = b"".join(oursEncode())
    assert stream == b"".join(theirsEncode()), "calls: pbroker and Twisted bytes differ"
    reads = [stream[i : i + _READ_SIZE] for i in range(0, len(stream), _READ_SIZE)]

    def oursDecode() -> list[Any]:
        decoder = banana.Decoder(b"pb")
        received = []
        for data in reads:
            for expression in decoder.feed(data):
                received.append((jelly.unjelly(expression[5]), jelly.unjelly(expression[6])))
        return received

    def theirsDecode() -> list[Any]:
        protocol = _twistedPbBanana(_NullTransport())
        received = []

        def expressionReceived(expression: Any) -> None:
            received.append(
                (
                    twistedJelly.unjelly(expression[5], twistedJelly.globalSecurity),
                    twistedJelly.unjelly(expression[6], twistedJelly.globalSecurity),
                )
            )

        protocol.expressionReceived = expressionReceived
        for data in reads:
            protocol.dataReceived(data)
        return received

    expected = [(args, kwargs) for _, args, kwargs in messages]
    assert oursDecode() == theirsDecode() == expected
    return (
        "calls",
        _best(oursEncode, repeat),
        _best(theirsEncode, repeat),
        _best(oursDecode, repeat),
        _best(theirsDecode, repeat),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (best kept)")
    options = parser.parse_args(argv)
    rows = [*_valueCases(options.repeat), _callCase(options.repeat)]
    print(f"{'workload':<10} {'direction':<9} {'pbroker':>11} {'twisted':>11} {'ratio':>8}")
    for name, oursEncode, theirsEncode, oursDecode, theirsDecode in rows:
        for direction, ours, theirs in (
            ("encode", oursEncode, theirsEncode),
            ("decode", oursDecode, theirsDecode),
        ):
            print(
                f"{name:<10} {direction:<9} {ours * 1e3:>9.3f}ms {theirs * 1e3:>9.3f}ms "
                f"{theirs / ours:>7.1f}x"
            )


if __name__ == "__main__":
    main()
