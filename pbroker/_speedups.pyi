# Types of the C extension built from _speedups.c (optional; see pbroker.banana._loadScan).
from collections.abc import Callable, Iterable, Iterator
from typing import Any

def scan(
    buffer: bytes | bytearray | memoryview,
    position: int,
    expressionStart: int,
    vocabulary: dict[int, bytes] | None,
    sizeLimit: int,
    prefixLimit: int,
    depthLimit: int,
    messageSizeLimit: int | None,
    text: bool,
    current: list[Any] | None,
    remaining: int,
    parents: list[tuple[list[Any], int]],
    wanted: int,
    results: list[Any],
) -> tuple[int, list[Any] | None, int, int, tuple[int, int] | None]: ...

class Leaves:
    def __init__(
        self,
        symbols: dict[bytes, bytes],
        fastIntLimit: int,
        headerCount: int,
        unicodePrefix: bytes,
        noneToken: bytes,
        trueToken: bytes,
        falseToken: bytes,
        pair: object,
    ) -> None: ...
    def __call__(self, iterable: Iterable[Any], chunks: list[Any]) -> LeafIterator: ...

class LeafIterator(Iterator[Any]):
    def __next__(self) -> Any: ...

def plain(
    node: list[Any], allowed: int, ask: Callable[[bytes], bool] | None, failed: set[int] | None
) -> Any: ...
def extent(value: Any, budget: int, maxDepth: int) -> int: ...
def plainKeys(keys: list[Any]) -> bool: ...
def keyedMap(
    fallback: Callable[[list[tuple[Any, Any]]], dict[Any, Any]], pairs: list[tuple[Any, Any]]
) -> dict[Any, Any]: ...
def weighTuple(
    value: tuple[Any, ...],
    weights: dict[int, tuple[int, bool, Any, int]],
    weighSet: Callable[[frozenset[Any]], tuple[int, bool]],
    atomWeight: Callable[[Any], int],
) -> tuple[int, bool, int]: ...
def envelope(
    data: bytes, start: int, stop: int, large: int, valueFields: dict[bytes, int]
) -> list[Any] | None: ...
def record(message: list[Any], packedType: type, inlineLimit: int, limit: int) -> bytes | None: ...
def joinParts(parts: list[Any]) -> bytes: ...
def joinText(parts: list[Any]) -> str | None: ...
