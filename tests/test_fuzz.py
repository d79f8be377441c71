"""
Fuzz tests: bad input to the banana decoder and the unjellier fails only in documented ways.

Whatever bytes arrive, :class:`pbroker.banana.Decoder` may only return expressions or raise
:class:`~pbroker.errors.BananaError` (:class:`~pbroker.errors.BananaDecodeError`); whatever
expression arrives, :func:`pbroker.jelly.unjelly` may only return a value or raise
:class:`~pbroker.errors.InsecureJelly` (or :class:`~pbroker.errors.InvalidJelly`). Neither may
raise anything else (``IndexError``, ``RecursionError``, ``ValueError``...), hang, import a module
named by the input, or buffer more than its limits allow.

The generators are plain module-level functions taking a ``random.Random``, a count and a
:class:`FuzzRun` that collects the outcome, so that ``tests/fuzz/run.py`` can run them for as
long as one likes; the tests here run each with a fixed seed and a small count. A failure report
carries the offending input (banana bytes as hex, or the s-expression), shrunk when time allows,
and the traceback.

Never fuzz with :class:`~pbroker.jelly.DummySecurityOptions`: it imports whatever module the
input names.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import functools
import gc
import os
import signal
import sys
import threading
import time
import traceback
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from random import Random
from typing import Any

import msgpack
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pbroker import _accelerator, _native, _unjellier, banana, jelly
from pbroker._jellier import _jellyTokens
from pbroker.errors import (
    BananaDecodeError,
    BananaEncodeError,
    BananaError,
    InsecureJelly,
    InvalidJelly,
    JellyError,
)

DIALECTS = (b"none", b"pb")

#: How long one input may run before it counts as a hang, in the tests (seconds).
HANG_SECONDS = 1.0

_PBROKER_DIR = os.path.dirname(os.path.abspath(banana.__file__))


class Hang(BaseException):
    """
    One input ran past its deadline. A ``BaseException``, so that no ``except Exception`` in the
    code under test can swallow it.
    """


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """
    Raise :class:`Hang` inside the block if it runs longer than ``seconds`` (with ``SIGALRM``;
    where that is unavailable, or off the main thread, the block simply runs).
    """
    if (
        not seconds
        or not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class FuzzCopy:
    """
    A plain class that the ``instances`` taster allows to be rebuilt by name.
    """


def _instancesTaster() -> jelly.SecurityOptions:
    options = jelly.SecurityOptions()
    options.allowInstancesOf(FuzzCopy)
    return options


#: The security options every expression is unjellied with: the default (``globalSecurity``),
#: a fresh deny-by-default ``SecurityOptions()``, and one that also allows the ``instance``,
#: ``class`` and ``module`` tags and lookups in this module.
TASTERS: tuple[tuple[str, Any], ...] = (
    ("default", None),
    ("fresh", jelly.SecurityOptions()),
    ("instances", _instancesTaster()),
)

_FUZZ_MODULE = FuzzCopy.__module__.encode()

#: Modules that inputs name and that must never be imported because of it. Those already
#: imported when a check starts are left out of that check.
CANARY_MODULES = ("pbroker_fuzz_never_imported", "xml.dom.minidom", "colorsys", "tabnanny")

#: Dotted names that inputs put wherever jelly expects a class, module or function name.
NAMES = (
    b"os.system",
    b"os.path.join",
    b"os",
    b"builtins.eval",
    b"posixpath.join",
    b"collections.OrderedDict",
    b"xml.dom.minidom",
    b"xml.dom.minidom.parseString",
    b"colorsys.rgb_to_hsv",
    b"tabnanny.check",
    b"pbroker_fuzz_never_imported",
    b"pbroker_fuzz_never_imported.X",
    _FUZZ_MODULE,
    _FUZZ_MODULE + b".FuzzCopy",
    _FUZZ_MODULE + b".FuzzRun",
    _FUZZ_MODULE + b".sys",
    _FUZZ_MODULE + b".nothingHere",
    b".",
    b"a.",
    b".b",
    b"\xff.\xfe",
)

_TAGS = (
    b"None",
    b"boolean",
    b"unicode",
    b"list",
    b"tuple",
    b"set",
    b"frozenset",
    b"dictionary",
    b"reference",
    b"dereference",
    b"datetime",
    b"date",
    b"time",
    b"timedelta",
    b"decimal",
    b"unpersistable",
    b"persistent",
    b"class",
    b"module",
    b"function",
    b"method",
    b"instance",
    b"remote",
    b"cache",
)

_TIME_TAGS = (b"datetime", b"date", b"time", b"timedelta")

_WORDS = _TAGS + NAMES + (b"true", b"false", b"", b"x", b"\xff\xfe", b"2020 1 2 3 4 5 6")

#: Wire-encodable integers at and around the boundaries banana and jelly care about.
_EDGE_INTS = (
    0,
    1,
    -1,
    2,
    127,
    128,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**63,
    -(2**64),
    2**447,
    -(2**447),
)

#: Integers no banana peer can send with the default prefix limit, but that an in-process
#: s-expression can hold; their ``str()`` exceeds Python's integer string conversion limit.
_HUGE_INTS = (10**4400, -(10**4400))

_FLOATS = (0.0, -0.0, 1.5, -2.25, float("inf"), float("-inf"), float("nan"), 5e-324, 1e308)

_TIME_FIELDS = (
    b"",
    b"2020 1 2 3 4 5 6",
    b"2020 1 2",
    b"23 59 59 999999",
    b"1 2 3",
    b"2020 13 40",
    b"-1 -1 -1",
    b"0 0 0",
    b"99999999999999999999 1 1",
    b"1 2",
    b"1 2 3 4 5 6 7 8",
    b"1e3 2 3",
    b"1_0 1 1",
    b"\xd9\xa1 1 1",
    b"\xff\xfe 1 1",
    b"2020\x001 2",
    b" 1   2\t3 ",
)

#: Byte values that make random banana likely to parse a little before it goes wrong.
_BIASED_BYTES = (
    [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x7F] + list(range(0x80, 0x88)) * 3 + [0x88, 0xC0, 0xFF]
)


# ---------------------------------------------------------------------------------------------
# Outcomes


@dataclass
class Failure:
    """
    One unexpected outcome, with the input that caused it.
    """

    generator: str
    problem: str
    signature: tuple[str, ...]
    details: str
    data: bytes | None = None
    dialect: bytes = b"none"
    limits: dict[str, int] = field(default_factory=dict)
    sexp: Any = None
    hasSexp: bool = False
    originalSize: str = ""
    context: str = ""

    def describe(self, maxHex: int = 4096) -> str:
        """
        A report a developer can act on: what went wrong, the input, the traceback.
        """
        lines = [f"[{self.generator}] {self.problem}"]
        if self.context:
            lines.append(f"  run: {self.context}")
        if self.data is not None:
            text = compactHex(self.data)
            if len(text) > maxHex:
                text = text[:maxHex] + f"... ({len(self.data)} bytes in all)"
            lines.append(
                f"  banana input ({self.dialect.decode()} dialect, {len(self.data)} bytes, "
                f"limits {self.limits or 'default'}): {text}"
            )
        if self.hasSexp:
            lines.append(
                f"  s-expression (nesting depth {nestingDepth(self.sexp)}): {showSexp(self.sexp)}"
            )
            wire = _wireHex(self.sexp)
            if wire is not None:
                lines.append(f"  the s-expression as banana (none dialect): {wire}")
        if self.originalSize:
            lines.append(f"  shrunk from {self.originalSize}")
        lines.append("  " + self.details.rstrip().replace("\n", "\n  "))
        return "\n".join(lines)


@dataclass
class FuzzRun:
    """
    What the generators did: how many inputs, how they ended, and the failures found.

    :ivar maxFailures: generators stop once this many distinct failures are known.
    :ivar timeout: seconds one input may run before it counts as a hang.
    :ivar minimizeSeconds: time to spend shrinking each failing input.
    """

    maxFailures: int = 1
    timeout: float | None = HANG_SECONDS
    minimizeSeconds: float = 1.0
    minimizeTimeout: float = 0.25
    context: str = ""
    inputs: int = 0
    decodeOk: int = 0
    decodeErrors: int = 0
    expressions: int = 0
    unjellied: int = 0
    refused: int = 0
    duplicates: int = 0
    shrinkSeconds: float = 0.0
    limitErrors: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    signatures: set[tuple[str, ...]] = field(default_factory=set)

    @property
    def stopped(self) -> bool:
        return len(self.failures) >= self.maxFailures

    def record(self, failure: Failure, shrink: Callable[[Failure], Failure] | None) -> None:
        """
        Keep a failure unless one with the same signature is already known; shrink it first.
        """
        if failure.signature in self.signatures:
            self.duplicates += 1
            return
        self.signatures.add(failure.signature)
        failure.context = self.context
        if shrink is not None and self.minimizeSeconds > 0:
            started = time.monotonic()
            try:
                failure = shrink(failure)
            except Exception as e:  # the shrinker must never hide the failure it shrinks
                failure.details += f"\n(shrinking failed: {e!r})"
            failure.context = self.context
            self.shrinkSeconds += time.monotonic() - started
        self.failures.append(failure)

    def report(self) -> str:
        return "\n\n".join(failure.describe() for failure in self.failures)


def _signature(error: BaseException) -> tuple[str, ...]:
    """
    Where a failure comes from: the exception type and the innermost pbroker function.
    """
    where = "?"
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if os.path.dirname(os.path.abspath(code.co_filename)) == _PBROKER_DIR:
            where = f"{os.path.basename(code.co_filename)}:{code.co_name}"
        tb = tb.tb_next
    return (type(error).__name__, where)


def _formatError(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=-12))
    if len(text) > 6000:
        text = text[:2000] + "\n...\n" + text[-4000:]
    return text


def _invariantKey(problem: str) -> str:
    """
    A short name for a broken invariant (other than an exception), for failure signatures.
    """
    for key, name in (
        ("holds", "buffered too much"),
        ("took", "accepted too much"),
        ("ended", "never refused"),
        ("after an error", "input after an error"),
        ("pieces", "chunking"),
    ):
        if key in problem:
            return name
    return problem


def _limitKind(error: BaseException) -> str:
    message = str(error)
    for key, kind in (
        ("message size", "message size"),
        ("depth limit", "depth"),
        ("size limit", "size"),
        ("prefix", "prefix"),
        ("VOCAB", "vocab"),
        ("type byte", "type byte"),
    ):
        if key in message:
            return kind
    return "other"


# ---------------------------------------------------------------------------------------------
# Helpers for s-expressions that may be deep, huge or strange


def nestingDepth(sexp: Any) -> int:
    """
    How deeply lists nest in ``sexp`` (an atom is 0), without recursion.
    """
    deepest = 0
    stack = [(sexp, 1)]
    while stack:
        node, depth = stack.pop()
        if type(node) is list:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in node)
    return deepest


def showSexp(sexp: Any, limit: int = 600) -> str:
    """
    A bounded, recursion-safe ``repr`` of an s-expression for reports.
    """
    out: list[str] = []
    budget = [limit]

    def emit(text: str) -> None:
        budget[0] -= len(text)
        out.append(text)

    def show(node: Any, depth: int) -> None:
        if budget[0] <= 0:
            return
        if type(node) is list:
            if depth >= 12 and node:
                emit(f"<list nested {nestingDepth(node)} deep>")
                return
            emit("[")
            for index, child in enumerate(node):
                if budget[0] <= 0:
                    break
                if index:
                    emit(", ")
                show(child, depth + 1)
            emit("]")
        elif type(node) is int and node.bit_length() > 256:
            emit(f"<{node.bit_length()}-bit {'negative ' if node < 0 else ''}int>")
        else:
            emit(repr(node)[:120])

    show(sexp, 0)
    text = "".join(out)
    return text if budget[0] > 0 else text[:limit] + "..."


def compactHex(data: bytes, maxUnit: int = 16, minRepeat: int = 4) -> str:
    """
    ``data`` as hex, or, if it holds runs of a repeated unit, as a Python expression that
    rebuilds it: ``bytes.fromhex('0280') + bytes.fromhex('0180') * 997 + ...``.
    """
    if len(data) > 1 << 20:
        return data.hex()
    parts: list[tuple[bytes, int]] = []
    literal = bytearray()
    at = 0
    while at < len(data):
        best = (0, 0)
        for unit in range(1, maxUnit + 1):
            if at + unit * minRepeat > len(data):
                break
            pattern = data[at : at + unit]
            count = 1
            while data[at + count * unit : at + (count + 1) * unit] == pattern:
                count += 1
            if count >= minRepeat and count * unit > best[0] * best[1]:
                best = (unit, count)
        unit, count = best
        if unit:
            if literal:
                parts.append((bytes(literal), 1))
                literal.clear()
            parts.append((data[at : at + unit], count))
            at += unit * count
        else:
            literal.append(data[at])
            at += 1
    if literal:
        parts.append((bytes(literal), 1))
    if all(count == 1 for _, count in parts):
        return data.hex()
    return " + ".join(
        f"bytes.fromhex('{piece.hex()}')" + (f" * {count}" if count > 1 else "")
        for piece, count in parts
    )


def _wireHex(sexp: Any) -> str | None:
    try:
        data = banana.encode(sexp)
    except Exception:  # text, or an integer too big (or too long to print) for banana
        return None
    text = compactHex(data)
    return text if len(text) <= 2048 else f"{text[:2048]}... ({len(data)} bytes in all)"


def _paths(sexp: Any, limit: int = 3000) -> list[tuple[int, ...]]:
    """
    The index paths of the lists in ``sexp``, root first, breadth first, at most ``limit``.
    """
    paths: list[tuple[int, ...]] = []
    queue: list[tuple[tuple[int, ...], Any]] = [((), sexp)]
    while queue and len(paths) < limit:
        nextQueue: list[tuple[tuple[int, ...], Any]] = []
        for path, node in queue:
            if type(node) is list:
                paths.append(path)
                nextQueue.extend(((*path, index), child) for index, child in enumerate(node))
        queue = nextQueue
    return paths


def _get(sexp: Any, path: tuple[int, ...]) -> Any:
    for index in path:
        sexp = sexp[index]
    return sexp


def _replace(sexp: Any, path: tuple[int, ...], new: Any) -> Any:
    """
    A copy of ``sexp`` with the node at ``path`` replaced, copying only the lists on the path.
    """
    if not path:
        return new
    spine = [sexp]
    for index in path[:-1]:
        spine.append(spine[-1][index])
    for node, index in zip(reversed(spine), reversed(path), strict=True):
        node = list(node)
        node[index] = new
        new = node
    return new


# ---------------------------------------------------------------------------------------------
# Checking one input


def _unjellyFailure(
    generator: str, sexp: Any, timeout: float | None, run: FuzzRun | None
) -> Failure | None:
    """
    Unjelly ``sexp`` under every taster; the first unexpected outcome, if any.
    """
    for name, taster in TASTERS:
        try:
            with deadline(timeout), warnings.catch_warnings():
                # The deprecated "instance" tag warns; only exceptions matter here.
                warnings.simplefilter("ignore", DeprecationWarning)
                jelly.unjelly(sexp, taster)
        except InsecureJelly:
            if run is not None:
                run.refused += 1
        except (Exception, Hang) as e:
            what = "a hang" if isinstance(e, Hang) else f"{type(e).__name__}: {str(e)[:200]}"
            return Failure(
                generator,
                f"unjelly (taster {name!r}) raised {what}",
                ("unjelly", *_signature(e)),
                _formatError(e),
                sexp=sexp,
                hasSexp=True,
            )
        else:
            if run is not None:
                run.unjellied += 1
    return None


def _pieces(data: bytes, cuts: Iterable[int] | None) -> Iterator[bytes]:
    if cuts is None:
        yield data
        return
    start = 0
    for cut in cuts:
        yield data[start:cut]
        start = cut
    yield data[start:]


def _bufferBound(limits: dict[str, int]) -> int:
    """
    The most bytes a decoder may hold between calls: one element, its prefix and type byte.
    """
    size = limits.get("sizeLimit", banana.SIZE_LIMIT)
    prefix = limits.get("prefixLimit", banana.PREFIX_LIMIT)
    return max(size, 8) + prefix + 1


def _decodeAll(
    data: bytes, dialect: bytes, limits: dict[str, int], cuts: Iterable[int] | None
) -> tuple[list[Any], BananaError | None, str | None]:
    """
    Feed ``data`` to a fresh decoder in pieces: (expressions, the decode error, a violated
    invariant). Unexpected exceptions propagate.
    """
    decoder = banana.Decoder(dialect, **limits)
    bound = _bufferBound(limits)
    expressions: list[Any] = []
    for piece in _pieces(data, cuts):
        try:
            expressions.extend(decoder.feed(piece))
        except BananaError as e:
            try:
                decoder.feed(b"\x00\x81")
            except BananaError:
                pass
            else:
                return expressions, e, "the decoder accepted more input after an error"
            return expressions, e, None
        if decoder.buffered > bound:
            return (
                expressions,
                None,
                f"the decoder holds {decoder.buffered} bytes, more than one element "
                f"({bound} bytes) under limits {limits or 'default'}",
            )
    return expressions, None, None


def _encodeAll(expressions: list[Any]) -> list[list[tuple[str, Any]]]:
    """
    The expressions as lists of tokens, to compare: each leaf by its type and repr (0.0 and
    -0.0 differ, a NaN equals itself), each list by its length. Walked on a stack of its own
    (expressions nest deeper than repr goes), and text too: with the ``text`` limit the
    decoder gives ``str``, which banana.encode cannot send.
    """
    flattened = []
    for expression in expressions:
        tokens: list[tuple[str, Any]] = []
        stack = [expression]
        while stack:
            item = stack.pop()
            if type(item) is list:
                tokens.append(("list", len(item)))
                stack.extend(reversed(item))
            else:
                tokens.append((type(item).__name__, repr(item)))
        flattened.append(tokens)
    return flattened


def _bytesFailure(
    generator: str,
    data: bytes,
    dialect: bytes,
    limits: dict[str, int],
    cuts: list[int] | None,
    compare: bool,
    timeout: float | None,
    run: FuzzRun | None,
) -> Failure | None:
    """
    Decode ``data`` (fed as cut), unjelly every expression it yields; the first unexpected
    outcome, if any. With ``compare``, also check that feeding it one byte at a time gives the
    same expressions and the same verdict.
    """

    def failure(problem: str, signature: tuple[str, ...], details: str) -> Failure:
        return Failure(generator, problem, signature, details, data, dialect, dict(limits))

    try:
        with deadline(timeout):
            expressions, error, broken = _decodeAll(data, dialect, limits, cuts)
            if compare and broken is None:
                single, singleError, broken = _decodeAll(data, dialect, limits, range(1, len(data)))
                got, want = _encodeAll(expressions), _encodeAll(single)
                if (error is None) != (singleError is None) or got != want[: len(got)]:
                    broken = (
                        f"decoding in pieces cut at {cuts} gave {len(got)} expression(s) and "
                        f"{error!r}; one byte at a time gave {len(want)} and {singleError!r}"
                    )
                elif error is None and got != want:
                    broken = "one byte at a time gave other expressions than in pieces"
    except (Exception, Hang) as e:
        what = "a hang" if isinstance(e, Hang) else f"{type(e).__name__}: {str(e)[:200]}"
        return failure(f"the decoder raised {what}", ("decode", *_signature(e)), _formatError(e))
    if broken is not None:
        return failure(broken, ("decode", _invariantKey(broken)), broken)
    if run is not None:
        if error is None:
            run.decodeOk += 1
        else:
            run.decodeErrors += 1
            run.limitErrors[_limitKind(error)] += 1
        run.expressions += len(expressions)
    for expression in expressions:
        found = _unjellyFailure(generator, expression, timeout, run)
        if found is not None:
            found.data, found.dialect, found.limits = data, dialect, dict(limits)
            return found
    return None


def minimizeBytes(data: bytes, fails: Callable[[bytes], bool], seconds: float) -> bytes:
    """
    Delete runs of bytes from ``data`` while ``fails`` stays true, for at most ``seconds``.
    """
    stop = time.monotonic() + seconds
    size = max(len(data) // 2, 1)
    while time.monotonic() < stop:
        progressed = False
        start = 0
        while start < len(data) and time.monotonic() < stop:
            candidate = data[:start] + data[start + size :]
            if fails(candidate):
                data = candidate
                progressed = True
            else:
                start += size
        if not progressed:
            if size == 1:
                break
            size //= 2
    return data


def minimizeSexp(sexp: Any, fails: Callable[[Any], bool], seconds: float) -> Any:
    """
    Simplify ``sexp`` while ``fails`` stays true, for at most ``seconds``: put ``b""``, ``[]``
    or one of a list's child lists in its place, or drop one of its elements.
    """
    stop = time.monotonic() + seconds
    improved = True
    while improved and time.monotonic() < stop:
        improved = False
        for path in _paths(sexp):
            node = _get(sexp, path)
            candidates: list[Any] = [b"", []] if node else [b""]
            candidates += [child for child in node if type(child) is list]
            candidates += [node[:index] + node[index + 1 :] for index in range(len(node))]
            for candidate in candidates:
                if time.monotonic() >= stop:
                    return sexp
                trial = _replace(sexp, path, candidate)
                if fails(trial):
                    sexp = trial
                    improved = True
                    break
            if improved:
                break
    return sexp


def _shrinkSexpFailure(run: FuzzRun, failure: Failure, seconds: float) -> Failure:
    signature = failure.signature

    def fails(candidate: Any) -> bool:
        found = _unjellyFailure(failure.generator, candidate, run.minimizeTimeout, None)
        return found is not None and found.signature == signature

    original = nestingDepth(failure.sexp)
    smaller = minimizeSexp(failure.sexp, fails, seconds)
    if smaller is failure.sexp:
        return failure
    shrunk = _unjellyFailure(failure.generator, smaller, run.minimizeTimeout, None)
    if shrunk is None or shrunk.signature != signature:
        return failure
    shrunk.data, shrunk.dialect, shrunk.limits = failure.data, failure.dialect, failure.limits
    shrunk.originalSize = failure.originalSize or f"an s-expression nested {original} deep"
    return shrunk


def checkBytes(
    run: FuzzRun,
    generator: str,
    data: bytes,
    dialect: bytes = b"none",
    limits: dict[str, int] | None = None,
    cuts: list[int] | None = None,
    compare: bool = False,
) -> None:
    """
    Decode ``data`` fed in pieces (``cuts``: the offsets to cut at; ``None``: whole), unjelly
    every expression, and record in ``run`` how it went.
    """
    limits = limits or {}
    run.inputs += 1
    found = _bytesFailure(generator, data, dialect, limits, cuts, compare, run.timeout, run)
    if found is None:
        return

    def shrink(failure: Failure) -> Failure:
        stop = time.monotonic() + run.minimizeSeconds
        signature = failure.signature

        def attempt(candidate: bytes, bytewise: bool) -> Failure | None:
            candidateCuts = list(range(1, len(candidate))) if bytewise else None
            found = _bytesFailure(
                generator,
                candidate,
                dialect,
                limits,
                candidateCuts,
                compare,
                run.minimizeTimeout,
                None,
            )
            return found if found is not None and found.signature == signature else None

        # Shrink with the input whole if that fails the same way, else fed byte by byte.
        for bytewise in (False, True):
            if attempt(data, bytewise) is not None:
                break
        else:
            return failure  # it depends on how the bytes were cut; report it as found
        smaller = minimizeBytes(
            data, lambda c: attempt(c, bytewise) is not None, run.minimizeSeconds / 2
        )
        shrunk = attempt(smaller, bytewise) or failure
        if len(smaller) < len(data):
            shrunk.originalSize = f"{len(data)} bytes"
        if shrunk.hasSexp:
            shrunk = _shrinkSexpFailure(run, shrunk, max(0.0, stop - time.monotonic()))
        return shrunk

    run.record(found, shrink)


def checkSexp(run: FuzzRun, generator: str, sexp: Any) -> None:
    """
    Unjelly ``sexp`` under every taster and record in ``run`` how it went.
    """
    run.inputs += 1
    run.expressions += 1
    found = _unjellyFailure(generator, sexp, run.timeout, run)
    if found is not None:
        run.record(found, lambda f: _shrinkSexpFailure(run, f, run.minimizeSeconds))


def checkStream(
    run: FuzzRun,
    generator: str,
    stream: Iterable[bytes],
    dialect: bytes,
    limits: dict[str, int],
) -> None:
    """
    Feed a decoder an endless stream that never completes an expression, and check that it
    raises ``BananaDecodeError`` before it holds more than the limits allow: never more than
    one element buffered, and never more than ``messageSizeLimit`` plus one element fed.
    """
    run.inputs += 1
    decoder = banana.Decoder(dialect, **limits)
    bound = _bufferBound(limits)
    budget = limits.get("messageSizeLimit", 0) + bound
    fed = bytearray()
    problem = None
    error: BaseException | None = None
    try:
        with deadline(run.timeout):
            for piece in islice(stream, budget + 2):
                fed += piece
                decoder.feed(piece)
                if decoder.buffered > bound:
                    problem = f"the decoder holds {decoder.buffered} bytes, more than {bound}"
                    break
                if len(fed) > budget:
                    problem = f"the decoder took {len(fed)} bytes of one expression unharmed"
                    break
            else:
                problem = "the stream ended without a decoder error"
    except BananaDecodeError as e:
        run.decodeErrors += 1
        run.limitErrors[_limitKind(e)] += 1
        return
    except (Exception, Hang) as e:
        error = e
    if error is not None:
        what = "a hang" if isinstance(error, Hang) else f"{type(error).__name__}: {error}"
        found = Failure(
            generator,
            f"the decoder raised {what}",
            ("stream", *_signature(error)),
            _formatError(error),
            bytes(fed),
            dialect,
            dict(limits),
        )
    else:
        assert problem is not None
        found = Failure(
            generator,
            problem,
            ("stream", _invariantKey(problem)),
            f"limits {limits}, buffer bound {bound}, budget {budget}",
            bytes(fed),
            dialect,
            dict(limits),
        )
    run.record(found, None)


# ---------------------------------------------------------------------------------------------
# Input generators


def _prefix(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F)
        value >>= 7
        if not value:
            return bytes(out)


def randomAtom(rng: Random, wire: bool = True) -> Any:
    """
    A random atom: an integer, float or byte string (with ``wire=False``, also what only an
    in-process s-expression can hold: text, huge integers, ``None``).
    """
    kind = rng.randrange(12 if wire else 14)
    if kind == 0:
        return rng.randrange(-3, 300)
    if kind == 1:
        return rng.choice(_EDGE_INTS)
    if kind == 2:
        return rng.choice(_FLOATS)
    if kind <= 7:
        return rng.choice(_WORDS)
    if kind == 8:
        return rng.randbytes(rng.randrange(13))
    if kind == 9:
        return rng.choice(_TIME_FIELDS)
    if kind == 10:
        return rng.randrange(-(2**64), 2**64)
    if kind == 11:
        return rng.choice(NAMES)
    if kind == 12:
        return rng.choice(_HUGE_INTS)
    return rng.choice(["list", "unicode", "", None, True, ("tuple",)])


def _deepChain(rng: Random, depth: int) -> Any:
    tag = rng.choice([b"list", b"tuple", b"None", b"unpersistable", b"boolean"])
    node: Any = rng.choice([b"x", 1, []])
    for _ in range(depth):
        node = [tag, node] if tag in (b"list", b"tuple") else [node]
    return [tag, node] if tag not in (b"list", b"tuple") else node


def nastyNode(rng: Random, sub: Any, wire: bool = True) -> Any:
    """
    A malformed or hostile jelly expression, possibly built around ``sub``.
    """
    ref = rng.randint(1, 3)
    name = rng.choice(NAMES)
    kind = rng.randrange(49 if wire else 53)
    templates: list[Callable[[], Any]] = [
        lambda: [b"reference"],
        lambda: [b"reference", ref],
        lambda: [b"reference", randomAtom(rng, wire), sub],
        lambda: [b"reference", ref, sub],
        lambda: [b"reference", ref, sub, sub],
        lambda: [b"dereference"],
        lambda: [b"dereference", rng.randint(0, 4)],
        lambda: [b"dereference", rng.choice([b"1", 1.0, -1, 2**70])],
        lambda: [b"reference", ref, [rng.choice([b"tuple", b"set", b"frozenset"]), sub]],
        lambda: [b"reference", ref, [rng.choice(_TAGS[3:8]), [b"dereference", ref], sub]],
        lambda: [b"reference", ref, [b"dictionary", [[b"dereference", ref], sub]]],
        lambda: [b"reference", ref, [b"dictionary", [sub, [b"dereference", ref]]]],
        lambda: [b"tuple", [b"dereference", ref]],
        lambda: [b"list", [b"dereference", ref], [b"reference", ref, sub]],
        lambda: [b"dictionary", randomAtom(rng, wire)],
        lambda: [b"dictionary", [sub]],
        lambda: [b"dictionary", [sub, sub, sub]],
        lambda: [b"dictionary", []],
        lambda: [b"dictionary", [[b"list", sub], 1]],
        lambda: [b"dictionary", [[b"dictionary"], 1]],
        lambda: [b"dictionary", [[b"set", 1], 2]],
        lambda: [b"dictionary", [[b"tuple", [b"list"]], 2]],
        lambda: [b"set", [b"list"], sub],
        lambda: [b"frozenset", [b"set", sub]],
        lambda: [b"boolean", rng.choice([b"maybe", b"", 1, b"True", [b"boolean", b"true"]])],
        lambda: [b"boolean"],
        lambda: [b"None", sub],
        lambda: [rng.choice(_TIME_TAGS), rng.choice(_TIME_FIELDS)],
        lambda: [rng.choice(_TIME_TAGS), randomAtom(rng, wire)],
        lambda: [rng.choice(_TIME_TAGS)],
        lambda: [b"decimal", randomAtom(rng, wire), randomAtom(rng, wire)],
        lambda: [b"decimal", rng.choice(_EDGE_INTS), rng.choice(_EDGE_INTS)],
        lambda: [b"decimal", 1],
        lambda: [b"unicode", rng.choice([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", 5, [b"list"]])],
        lambda: [b"unicode"],
        lambda: [],
        lambda: [randomAtom(rng, wire)],
        lambda: [[b"list"], sub],
        lambda: [name, sub],
        lambda: [name],
        lambda: [rng.choice([b"class", b"module", b"function"]), name],
        lambda: [b"instance", [b"class", name], sub],
        lambda: [b"instance", sub, sub],
        lambda: [b"method", rng.choice([b"m", b"__init__"]), sub, [b"class", name]],
        lambda: [b"persistent", sub],
        lambda: [b"unpersistable", sub],
        lambda: [_FUZZ_MODULE + b".FuzzCopy", rng.choice([sub, [b"dictionary"]])],
        lambda: [b"os.system", b"echo fuzz"],
        lambda: _deepChain(rng, rng.choice([30, 990])),
        # Not reachable from the wire: text where bytes belong, unencodable integers, depth.
        lambda: [rng.choice(["list", "tuple", "None"]), sub],
        lambda: [rng.choice([b"decimal", b"None", b"boolean", b"dereference"]), *_HUGE_INTS],
        lambda: [b"class", name.decode("utf-8", "replace")],
        lambda: _deepChain(rng, 1200),
    ]
    return templates[kind]()


def randomSexp(rng: Random, depth: int = 3, wire: bool = True) -> Any:
    """
    A random s-expression, mostly jelly-shaped, often malformed.
    """
    if depth <= 0 or rng.random() < 0.3:
        return randomAtom(rng, wire)
    if rng.random() < 0.3:
        return nastyNode(rng, randomSexp(rng, depth - 1, wire), wire)
    tag = rng.choice(_TAGS) if rng.random() < 0.85 else randomAtom(rng, wire)
    return [tag] + [randomSexp(rng, depth - 1, wire) for _ in range(rng.randrange(4))]


def mutateBytes(rng: Random, data: bytes, others: tuple[bytes, ...] = ()) -> bytes:
    """
    ``data`` with one to four random byte-level edits: flips, overwrites, insertions,
    deletions, duplications, truncation, splices of another input.
    """
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        size = len(out)
        at = rng.randrange(size + 1)
        kind = rng.randrange(9)
        if kind == 0 and size:
            out[at % size] ^= 1 << rng.randrange(8)
        elif kind == 1 and size:
            out[at % size] = rng.randrange(256)
        elif kind == 2 and size:
            out[at % size] = rng.choice(_BIASED_BYTES)
        elif kind == 3:
            out[at:at] = rng.randbytes(rng.randint(1, 4))
        elif kind == 4:
            del out[at : at + rng.randint(1, 8)]
        elif kind == 5:
            end = min(size, at + rng.randint(1, 16))
            out[end:end] = out[at:end] * rng.randint(1, 3)
        elif kind == 6:
            del out[at:]
        elif kind == 7 and others:
            other = rng.choice(others)
            start = rng.randrange(len(other) + 1)
            out[at:at] = other[start : start + rng.randint(1, 24)]
        else:
            out[at:at] = bytes([rng.choice(_BIASED_BYTES)])
    return bytes(out)


def randomBytes(rng: Random) -> bytes:
    """
    Random input for the decoder: uniform bytes, bytes biased towards type bytes and small
    prefixes, encodings of random s-expressions, and those with noise added.
    """
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(48))
    if kind == 1:
        return bytes(rng.choice(_BIASED_BYTES) for _ in range(rng.randrange(1, 64)))
    dialect = rng.choice(DIALECTS)
    data = b"".join(banana.encode(randomSexp(rng, 3), dialect) for _ in range(rng.randint(1, 3)))
    return data if kind == 2 else mutateBytes(rng, data)


def randomLimits(rng: Random) -> dict[str, int]:
    """
    Decoder limits: the defaults half the time, otherwise some small ones.
    """
    if rng.random() < 0.5:
        return {}
    limits = {}
    if rng.random() < 0.5:
        limits["sizeLimit"] = rng.choice([1, 2, 8, 64, 1000])
    if rng.random() < 0.5:
        limits["prefixLimit"] = rng.choice([1, 2, 3, 8])
    if rng.random() < 0.5:
        limits["depthLimit"] = rng.choice([1, 2, 5, 50])
    if rng.random() < 0.3:
        limits["messageSizeLimit"] = rng.choice([1, 16, 100, 5000])
    if rng.random() < 0.5:
        limits["text"] = True  # jelly's text as str, which the same invariants hold for
    return limits


def randomCuts(rng: Random, size: int) -> list[int] | None:
    """
    Where to cut an input of ``size`` bytes into feeds: whole, one byte at a time, or random.
    """
    kind = rng.randrange(4)
    if kind == 0 or size < 2:
        return None
    if kind == 1:
        return list(range(1, size))
    return sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 8))))


def corpusValues() -> list[Any]:
    """
    Realistic values to jelly: atoms, text, dates, decimals, containers, shared and cyclic
    references, a class, a function, a module and an instance.
    """
    shared = [1, "two", b"three"]
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    selfDict: dict[str, Any] = {}
    selfDict["self"] = selfDict
    instance = FuzzCopy()
    instance.__dict__.update(name="copy", items=[1, 2], when=datetime.date(2024, 2, 29))
    return [
        None,
        True,
        False,
        0,
        -1,
        2**31 - 1,
        2**31,
        -(2**31) - 1,
        2**100,
        -(2**200),
        1.5,
        float("inf"),
        float("nan"),
        b"",
        b"bytes",
        b"reference",
        bytes(range(256)),
        "",
        "text",
        "\u00fcn\u00efc\u00f8d\u00e9 \u2603 \U0001d11e",
        [],
        [1, [2, [3, [4, []]]]],
        (),
        (1, "two", b"three", None, True),
        {"a": 1, 2: [3], (4, 5): {6}, None: frozenset({b"x"})},
        {1, 2, 3},
        frozenset({b"x", 1, (2, 3)}),
        datetime.datetime(2020, 1, 2, 3, 4, 5, 6),
        datetime.date(1999, 12, 31),
        datetime.time(23, 59, 59, 999999),
        datetime.timedelta(days=-1, seconds=5, microseconds=7),
        decimal.Decimal("-1.25"),
        decimal.Decimal("1E+30"),
        decimal.Decimal("0.000001"),
        [shared, shared, (shared, shared)],
        cyclic,
        selfDict,
        {"cyclic": cyclic, "shared": shared, "again": (shared,), "set": {(1, 2)}},
        {
            "users": [
                {
                    "name": "ann",
                    "id": 1,
                    "tags": {"a", "b"},
                    "joined": datetime.datetime(2021, 5, 6, 7, 8, 9),
                    "balance": decimal.Decimal("12.50"),
                },
                {"name": "bob", "id": 2, "tags": set(), "joined": None, "ratio": 0.25},
            ],
            "total": 2,
        },
        instance,
        [instance, instance],
        decimal.Decimal,
        os.path.join,
        decimal,
    ]


_CORPUS: list[Any] = []
_ENCODINGS: dict[bytes, tuple[bytes, ...]] = {}


def _corpus() -> list[Any]:
    if not _CORPUS:
        _CORPUS.extend(corpusValues())
    return _CORPUS


def corpusEncodings(dialect: bytes) -> tuple[bytes, ...]:
    """
    ``jelly.dumps`` of every corpus value in ``dialect``.
    """
    if dialect not in _ENCODINGS:
        _ENCODINGS[dialect] = tuple(jelly.dumps(value, dialect) for value in _corpus())
    return _ENCODINGS[dialect]


def mutateSexp(rng: Random, sexp: Any, wire: bool = True) -> Any:
    """
    ``sexp`` (which this changes in place) with one to three random edits: atoms or nasty
    expressions in place of sub-expressions, deletions, insertions, reference wrappers,
    dereferences, wrong tags. With ``wire=False`` the edits may put in what only an
    in-process s-expression can hold (text, huge integers).
    """
    holder = [sexp]
    slots: list[tuple[list[Any], int]] = []
    stack: list[list[Any]] = [holder]
    while stack and len(slots) < 500:
        node = stack.pop()
        for index, child in enumerate(node):
            slots.append((node, index))
            if type(child) is list:
                stack.append(child)
    for _ in range(rng.randint(1, 3)):
        parent, index = rng.choice(slots)
        if index >= len(parent):
            continue
        kind = rng.randrange(8)
        if kind == 0:
            parent[index] = randomAtom(rng, wire)
        elif kind == 1:
            parent[index] = nastyNode(rng, parent[index], wire)
        elif kind == 2 and parent is not holder:
            del parent[index]
        elif kind == 3:
            parent.insert(index, randomSexp(rng, 2, wire))
        elif kind == 4:
            parent[index] = [b"reference", rng.randint(1, 3), parent[index]]
        elif kind == 5:
            parent[index] = [b"dereference", rng.randint(0, 3)]
        elif kind == 6 and type(parent[index]) is list and parent[index]:
            parent[index][0] = rng.choice(_TAGS + NAMES)
        else:
            parent.insert(index, parent[index])
    return holder[0]


def fuzzRandomBytes(rng: Random, count: int, run: FuzzRun) -> None:
    """
    Random bytes (``randomBytes``), random limits and dialect, fed in random pieces and one
    byte at a time, which must agree; every expression is unjellied.
    """
    for _ in range(count):
        if run.stopped:
            return
        data = randomBytes(rng)
        limits = randomLimits(rng)
        checkBytes(
            run,
            "random-bytes",
            data,
            rng.choice(DIALECTS),
            limits,
            randomCuts(rng, len(data)),
            compare="messageSizeLimit" not in limits,
        )


def fuzzMutatedEncodings(rng: Random, count: int, run: FuzzRun) -> None:
    """
    ``jelly.dumps`` of realistic values with random byte edits, decoded (in pieces or one byte
    at a time) and unjellied.
    """
    for _ in range(count):
        if run.stopped:
            return
        dialect = rng.choice(DIALECTS)
        encodings = corpusEncodings(dialect)
        data = mutateBytes(rng, rng.choice(encodings), encodings)
        limits = randomLimits(rng) if rng.random() < 0.2 else {}
        checkBytes(run, "mutated-bytes", data, dialect, limits, randomCuts(rng, len(data)))


def fuzzMutatedExpressions(rng: Random, count: int, run: FuzzRun, wire: bool = True) -> None:
    """
    ``jelly.jelly`` of realistic values with random edits of the s-expression (and some
    random s-expressions), unjellied. With ``wire=True`` (the default) every expression is
    one banana can carry, so a peer could send it.
    """
    corpus = _corpus()
    generator = "mutated-sexp" if wire else "in-process-sexp"
    for _ in range(count):
        if run.stopped:
            return
        if rng.random() < 0.15:
            sexp = randomSexp(rng, 4, wire)
        else:
            sexp = mutateSexp(rng, jelly.jelly(rng.choice(corpus)), wire)
        checkSexp(run, generator, sexp)


def fuzzInProcessExpressions(rng: Random, count: int, run: FuzzRun) -> None:
    """
    Like ``fuzzMutatedExpressions``, with what only an in-process s-expression can hold: text
    in place of bytes, integers too big for banana (and for ``str()``), deeper nesting.
    """
    fuzzMutatedExpressions(rng, count, run, wire=False)


def endlessStream(rng: Random, dialect: bytes, sizeLimit: int) -> Iterator[bytes]:
    """
    Pieces of a banana stream whose first expression never ends (every prefix of it is valid
    banana): lists that ask for ``sizeLimit`` elements, strings of up to ``sizeLimit`` bytes
    trickled a few bytes at a time, numbers with padded prefixes, VOCAB tokens.
    """
    # How many elements each open list still needs; the top-level list first.
    stack = [sizeLimit]
    yield _prefix(sizeLimit) + b"\x80"
    while True:
        if all(remaining == 1 for remaining in stack) or rng.random() < 0.1:
            stack.append(sizeLimit)
            element = _prefix(sizeLimit) + b"\x80"
        else:
            kind = rng.randrange(6)
            if kind == 0:
                size = rng.randint(0, sizeLimit)
                yield _prefix(size) + b"\x82"
                body = rng.randbytes(size)
                while body:
                    step = rng.randint(1, 64)
                    yield body[:step]
                    body = body[step:]
                element = b""
            elif kind == 1:
                element = b"\x84" + rng.randbytes(8)
            elif kind == 2 and dialect == b"pb":
                element = _prefix(rng.randint(1, 31)) + b"\x87"
            elif kind == 3:
                element = b"\x00\x80"
            else:
                # At most three prefix bytes, the smallest prefix limit used here.
                padding = b"\x00" * rng.randrange(2)
                element = _prefix(rng.randrange(2**14)) + padding + rng.choice([b"\x81", b"\x83"])
            stack[-1] -= 1
            while stack[-1] == 0:
                stack.pop()
                stack[-1] -= 1
        while element:
            step = rng.randint(1, len(element))
            yield element[:step]
            element = element[step:]


def fuzzBufferLimits(rng: Random, count: int, run: FuzzRun) -> None:
    """
    Endless valid-prefix streams (``endlessStream``) and endless prefix bytes against small
    limits: the decoder must refuse each before it holds more than the limits allow.
    """
    for _ in range(count):
        if run.stopped:
            return
        dialect = rng.choice(DIALECTS)
        limits = {
            "sizeLimit": rng.choice([16, 100, 1000]),
            "messageSizeLimit": rng.choice([64, 1000, 5000]),
            "prefixLimit": rng.choice([3, 8, 64]),
            "depthLimit": rng.choice([3, 50, 1000]),
        }
        if rng.random() < 0.1:
            stream: Iterator[bytes] = iter(lambda: bytes([rng.randrange(0x80)]), None)
        else:
            stream = endlessStream(rng, dialect, limits["sizeLimit"])
        checkStream(run, "buffer-limits", stream, dialect, limits)


def decoderTrace(
    scan: Callable[..., Any],
    data: bytes,
    dialect: bytes,
    limits: dict[str, int],
    cuts: list[int] | None,
    wanted: int | None,
    pieces: Callable[[bytes], Any] = bytes,
) -> str:
    """
    Everything a decoder using ``scan`` shows for ``data`` fed in pieces: each feed's
    expressions (drained by further feeds when ``wanted`` bounds them), its buffered count
    and whether it is mid-expression, or the error and the expressions before it, as a repr
    (which tells str from bytes, -0.0 from 0.0, and shows nan).
    """
    saved = banana._scan
    banana._scan = scan
    try:
        decoder = banana.Decoder(dialect, **limits)
        trace: list[Any] = []
        for piece in _pieces(data, cuts):
            try:
                got = decoder.feed(pieces(piece), wanted)
                for _ in range(len(data) + 1):
                    if wanted is None or len(got) < wanted:
                        break
                    trace.append(("partial", got))
                    got = decoder.feed(b"", wanted)
                trace.append(("fed", got, decoder.buffered, decoder.midExpression))
            except BananaDecodeError as e:
                trace.append(("error", str(e), e.expressions))
                break
        return flatRepr(trace)
    finally:
        banana._scan = saved


def flatRepr(value: Any) -> str:
    """
    ``repr`` without recursion, for expressions nested deeper than ``repr`` can go.
    """
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Closer):
            out.append(item.text + ",")
        elif isinstance(item, (list, tuple)):
            isList = isinstance(item, list)
            out.append("[" if isList else "(")
            stack.append(_Closer("]" if isList else ")"))
            stack.extend(reversed(item))
        else:
            out.append(repr(item) + ",")
    return "".join(out)


@dataclass
class _Closer:
    text: str


def checkAccelerator(
    run: FuzzRun,
    data: bytes,
    dialect: bytes,
    limits: dict[str, int],
    cuts: list[int] | None,
    wanted: int | None,
    pieces: Callable[[bytes], Any] = bytes,
) -> None:
    """
    Record a failure if the C and Python scans trace ``data`` differently (fed as
    ``pieces``: bytes, bytearray or memoryview).
    """

    def differs(candidate: bytes, cuts: list[int] | None = None) -> bool:
        return decoderTrace(
            banana._scan, candidate, dialect, limits, cuts, wanted, pieces
        ) != decoderTrace(banana._scanPython, candidate, dialect, limits, cuts, wanted, pieces)

    if not differs(data, cuts):
        return
    # Shrink with whole feeds when they still differ, else report the pieces as they were.
    shrunk = data
    if cuts is not None and differs(data):
        cuts = None
    if cuts is None and run.minimizeSeconds > 0:
        shrunk = minimizeBytes(data, differs, run.minimizeSeconds)
    details = (
        f"{pieces.__name__} pieces cut at {cuts}, maxExpressions {wanted}\n"
        f"C:      {decoderTrace(banana._scan, shrunk, dialect, limits, cuts, wanted, pieces)}\n"
        f"Python: {decoderTrace(banana._scanPython, shrunk, dialect, limits, cuts, wanted, pieces)}"
    )
    run.record(
        Failure(
            generator="accelerator",
            problem="the C and Python scans disagree",
            signature=("accelerator", compactHex(shrunk)),
            details=details,
            data=shrunk,
            dialect=dialect,
            limits=limits,
            originalSize=f"{len(data)} bytes" if shrunk != data else "",
        ),
        None,
    )


def fuzzAccelerator(rng: Random, count: int, run: FuzzRun) -> None:
    """
    The C scan (``pbroker._speedups``) against the pure-Python one: random and mutated bytes,
    random limits, dialects, pieces and ``maxExpressions`` must give identical traces. Does
    nothing where the extension is not built.
    """
    if banana._scan is banana._scanPython:
        return
    for _ in range(count):
        if run.stopped:
            return
        dialect = rng.choice(DIALECTS)
        if rng.random() < 0.5:
            data = randomBytes(rng)
        else:
            encodings = corpusEncodings(dialect)
            data = rng.choice(encodings)
            if rng.random() < 0.7:
                data = mutateBytes(rng, data, encodings)
        limits: dict[str, Any] = randomLimits(rng)
        if rng.random() < 0.3:
            limits["text"] = True
        if rng.random() < 0.1:
            # Around the C scan's ceiling of 2**62.
            for name in ("sizeLimit", "messageSizeLimit", "prefixLimit", "depthLimit"):
                if rng.random() < 0.5:
                    limits[name] = rng.choice([2**62 - 1, 2**62, 2**62 + 1, 2**63, 2**70])
        cuts = randomCuts(rng, len(data))
        wanted = rng.choice([None, None, 1, 2, 2**63])
        pieces = rng.choice([bytes, bytes, bytearray, memoryview])
        run.inputs += 1
        checkAccelerator(run, data, dialect, limits, cuts, wanted, pieces)


#: Leaves at the edges of the encoders' fast paths: token tables, prefix lengths, type bytes.
_EDGE_INTEGERS = [0, 1, 0x7F, 0x80, 0x3FF, 0x400, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000]
_EDGE_INTEGERS += [2**31 - 1, 2**31, 2**63, 2**64, 2**448 - 1, 2**448]
_EDGE_INTEGERS += [-value for value in _EDGE_INTEGERS if value]
_EDGE_SIZES = [0, 1, 12, 13, 0x7F, 0x80, 0x3FF, 0x400, 0x401]


def randomLeaf(rng: Random) -> Any:
    """
    One leaf for the encoders: integers, floats, text and bytes at the edges of their fast
    paths, vocabulary words, None and booleans.
    """
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(_EDGE_INTEGERS) + rng.choice([0, 0, -1, 1])
    if kind == 1:
        return rng.choice([0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e308])
    if kind in (2, 3):
        size = rng.choice(_EDGE_SIZES)
        word = rng.choice([b"list", b"None", b"unicode", b"dictionary", b"x" * size])
        alphabet = rng.choice(["a", "\u00e9", "\u2603", "\U0001d11e", "\udc80"])
        text = rng.choice([word.decode(), alphabet * size, alphabet * (size // 4)])
        return text if kind == 2 else text.encode("utf-8", "surrogatepass")
    return rng.choice([None, True, False, 7, "b", b"c"])


def randomValue(rng: Random, depth: int = 4) -> Any:
    """
    A random value for the encoders: nested lists, tuples, dicts, sets and instances of
    ``FuzzCopy`` with random leaves, some containers shared and some cyclic.
    """
    made: list[Any] = []

    def build(level: int) -> Any:
        if made and rng.random() < 0.1:
            return rng.choice(made)  # shared, perhaps an ancestor: a cycle
        if level == 0 or rng.random() < 0.4:
            return randomLeaf(rng)
        kind = rng.randrange(6)
        size = rng.randrange(rng.choice([3, 8, 40]))
        if kind == 0:
            value: Any = []
            made.append(value)
            value.extend(build(level - 1) for _ in range(size))
        elif kind == 1:
            value = tuple(build(level - 1) for _ in range(size))
        elif kind == 2:
            value = {}
            made.append(value)
            for _ in range(size):
                key = randomLeaf(rng)
                if isinstance(key, float):
                    continue  # nan keys make the round trip ambiguous, not the encoding
                value[key] = build(level - 1)
        elif kind == 3:
            value = {randomLeaf(rng) for _ in range(size) if rng.random() < 0.5}
            value = value if rng.random() < 0.5 else frozenset(value)
        elif kind == 4:
            value = FuzzCopy()
            made.append(value)
            value.__dict__.update(field=build(level - 1), other=randomLeaf(rng))
        else:
            value = [randomLeaf(rng) for _ in range(size)]
        return value

    return build(depth)


def recordDisagreement(
    run: FuzzRun,
    generator: str,
    problem: str,
    first: tuple[str, str],
    second: tuple[str, str],
    **found: Any,
) -> None:
    """
    Record that two ways of doing the same thing gave different outcomes (each a name and a
    text); ``found`` holds the input's fields of :class:`Failure`.
    """
    (firstName, firstOutcome), (secondName, secondOutcome) = first, second
    run.record(
        Failure(
            generator=generator,
            problem=problem,
            signature=(generator, problem, firstOutcome[:40], secondOutcome[:40]),
            details=f"{firstName}: {firstOutcome[:3000]}\n{secondName}: {secondOutcome[:3000]}",
            **found,
        ),
        None,
    )


def _encodeOutcome(encode: Callable[[], bytes]) -> str:
    try:
        return repr(encode())
    except (JellyError, BananaEncodeError) as e:
        return f"{type(e).__name__}: {e}"


def fuzzEncoder(rng: Random, count: int, run: FuzzRun) -> None:
    """
    ``jelly.dumps`` (the fused encoder, with the C leaf writer where it is built, and without
    it) against ``banana.encode(jelly.jelly())``: random values, dialects and limits must give
    the same bytes or the same error.
    """
    for _ in range(count):
        if run.stopped:
            return
        value = randomValue(rng)
        dialect = rng.choice(DIALECTS)
        limits = {}
        if rng.random() < 0.3:
            limits["sizeLimit"] = rng.choice([13, 14, 0x7F, 0x80, 0x3FF, 0x400, 5000])
        if rng.random() < 0.3:
            limits["prefixLimit"] = rng.choice([1, 2, 3, 4, 9])
        run.inputs += 1
        expected = _encodeOutcome(
            lambda: banana.encode(jelly.jelly(value), dialect, **limits)  # noqa: B023
        )
        outcomes = {"fused": _encodeOutcome(lambda: jelly.dumps(value, dialect, **limits))}  # noqa: B023
        leafWriter = _jellyTokens(banana.getTokens(dialect, **limits))
        if leafWriter.leaves is not None:
            saved, leafWriter.leaves = leafWriter.leaves, None
            try:
                outcomes["fused, pure Python"] = _encodeOutcome(
                    lambda: jelly.dumps(value, dialect, **limits)  # noqa: B023
                )
            finally:
                leafWriter.leaves = saved
        # Where a value holds several faults, the fused encoder reports the first it writes
        # and encode(jelly()) the first jelly meets: both must fail, not necessarily alike.
        # With and without the C leaf writer, the fused encoder must fail alike.
        failed = not expected.startswith(("b'", 'b"'))
        fused = outcomes["fused"]
        problems = []
        if fused != expected and not (failed and not fused.startswith(("b'", 'b"'))):
            problems.append(("fused", fused, "encode(jelly())", expected))
        pure = outcomes.get("fused, pure Python", fused)
        if pure != fused:
            problems.append(("fused", fused, "fused, pure Python", pure))
        for name, outcome, otherName, other in problems:
            recordDisagreement(
                run,
                "encoder",
                f"the {name} encoder disagrees with {otherName}",
                (name, outcome),
                (otherName, other),
                dialect=dialect,
                limits=limits,
                sexp=showSexp(value),
                hasSexp=True,
            )


def canonical(value: Any) -> str:
    """
    A text that two unjellied values share only if they are alike: types, values (nan and
    -0.0 included), instance state, and which containers are the same object (shared and
    cyclic structure), without recursion.
    """
    seen: dict[int, int] = {}
    keep: list[Any] = []  # (so that no id is reused while this runs)
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Closer):
            out.append(item.text + ",")
            continue
        kind = type(item)
        if kind in (list, tuple, dict) or (
            hasattr(item, "__dict__")
            and not isinstance(item, (type, types.ModuleType))
            and not callable(item)
        ):
            if id(item) in seen:
                out.append(f"#{seen[id(item)]},")
                continue
            seen[id(item)] = len(seen)
            keep.append(item)
            out.append(f"{kind.__name__}(")
            stack.append(_Closer(")"))
            if kind is dict:
                children = [part for pair in item.items() for part in pair]
            elif kind in (list, tuple):
                children = list(item)
            else:
                children = [vars(item)]
            stack.extend(reversed(children))
        elif kind in (set, frozenset):
            # (Each element on its own: sharing across a set's elements is not compared.)
            out.append(f"{kind.__name__}{sorted(map(canonical, item))},")
        else:
            out.append(f"{kind.__name__}:{item!r},")
    return "".join(out)


class StatefulTaster:
    """
    Security options whose answers depend on how many questions came before, some of them an
    exception: the C builder must ask the same questions in the same order as the Python walk.
    """

    def __init__(self, seed: float) -> None:
        self.rng = Random(seed)
        self.asked: list[bytes] = []

    def isTypeAllowed(self, tag: bytes) -> bool:
        self.asked.append(tag)
        answer = self.rng.random()
        if answer < 0.1:
            raise InsecureJelly(f"refused {tag!r} as question {len(self.asked)}")
        return answer < 0.85

    def isModuleAllowed(self, name: Any) -> bool:
        return False

    def isClassAllowed(self, klass: Any) -> bool:
        return False


def _unjellyOutcome(sexp: Any, taster: Any) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return canonical(jelly.unjelly(sexp, taster=taster))
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def fuzzUnjellyAccelerator(rng: Random, count: int, run: FuzzRun) -> None:
    """
    The unjellier with the C builder of plain expressions (``pbroker._speedups.plain``)
    against the unjellier without it: jelly of random values, as they are, with text decoded
    as str by banana, and mutated, under every taster, must give the same value or the same
    error. Does nothing where the extension is not built.
    """
    if _unjellier._plain is None:
        return
    corpus = _corpus()
    for _ in range(count):
        if run.stopped:
            return
        source = randomValue(rng) if rng.random() < 0.7 else rng.choice(corpus)
        try:
            sexp = jelly.jelly(source)
        except JellyError:
            continue
        if rng.random() < 0.5:
            try:
                sexp = banana.Decoder(b"pb", text=True).feed(banana.encode([b"x", sexp], b"pb"))[0][
                    1
                ]
            except BananaError:
                continue
        if rng.random() < 0.5:
            sexp = mutateSexp(rng, sexp, True)
        run.inputs += 1
        seed = rng.random()
        for name, taster in (*TASTERS, ("stateful", StatefulTaster(seed))):
            withC = _unjellyOutcome(sexp, taster)
            other = StatefulTaster(seed) if name == "stateful" else taster
            saved, _unjellier._plain = _unjellier._plain, None
            try:
                without = _unjellyOutcome(sexp, other)
            finally:
                _unjellier._plain = saved
            if name == "stateful":
                withC += f" asked {taster.asked}"
                without += f" asked {other.asked}"
            if withC != without:
                recordDisagreement(
                    run,
                    "unjelly-accelerator",
                    f"unjelly with and without the C builder disagree ({name})",
                    ("with C", withC),
                    ("without C", without),
                    sexp=sexp,
                    hasSexp=True,
                )


# ---------------------------------------------------------------------------------------------
# Native records: the C extension's record() and envelope() against their Python twins

#: Integers at the edges of msgpack's forms.
_MSGPACK_INTEGERS = [0, 1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1]
_MSGPACK_INTEGERS += [2**63, 2**64 - 1, -1, -32, -33, -128, -129, -32_768, -32_769, -(2**31)]
_MSGPACK_INTEGERS += [-(2**31) - 1, -(2**63)]


def randomField(rng: Random) -> Any:
    """
    A field for a native message envelope: mostly of the kinds the C extension packs and
    reads (integers at the edges of msgpack's forms, byte strings and text at the edges of
    their headers, None, booleans, a Packed value), sometimes of others (which it leaves to
    Python).
    """
    kind = rng.randrange(10)
    if kind < 3:
        return rng.choice([*_MSGPACK_INTEGERS, rng.randrange(-(2**40), 2**40)])
    if kind < 5:
        size = rng.choice([0, 1, 31, 32, 255, 256, 65_535, 65_536, rng.randrange(40_000, 70_000)])
        return rng.randbytes(size)
    if kind == 5:
        return rng.choice(["", "é", "ü" * 16, "x" * 31, "x" * 32, "€" * 100, "y" * 70_000])
    if kind == 6:
        return rng.choice([None, True, False, {}])
    if kind == 7:
        return rng.choice([2**64, -(2**63) - 1, 1.5, {"k": 1}, [1, [2]], "\udc80"])
    return _native.Packed(*[rng.randbytes(rng.randrange(3000)) for _ in range(rng.randrange(1, 6))])


def _shape(fields: list[Any]) -> str:
    return repr([(type(f).__name__, getattr(f, "size", None) or _size(f)) for f in fields])


def _size(field: Any) -> int | None:
    return len(field) if isinstance(field, (bytes, str, list, dict)) else None


def wholeRecordInPython(message: list[Any]) -> bytes | None:
    """
    :func:`pbroker._native.wholeRecord` with the C extension's ``record()`` set aside.
    """
    saved, _native._record = _native._record, None
    try:
        return _native.wholeRecord(message)
    finally:
        _native._record = saved


def recordProblem(message: list[Any]) -> str | None:
    """
    What is wrong with the C record of ``message``, or ``None``: C must give the bytes
    :func:`pbroker._native.wholeRecord` gives in Python, or leave the message to it.
    """
    record = _accelerator.speedups.record  # type: ignore[union-attr]
    try:
        made = record(message, _native.Packed, _native.INLINE_LIMIT, _native.FRAGMENT_SIZE)
    except Exception as e:
        return f"record() raised {e!r}"
    if made is None:
        return None
    try:
        expected = wholeRecordInPython(message)
    except Exception as e:
        return f"record() packed what Python refuses ({e!r})"
    if made != expected:
        return "record() and Python packed different records"
    return None


def envelopeProblem(
    data: bytes, stop: int, large: int, valueFields: dict[bytes, int]
) -> str | None:
    """
    What is wrong with C's reading of the envelope in ``data[4:stop]``, or ``None``: it must
    be msgpack's, with a byte string of ``large`` bytes or more in a value field (by
    ``valueFields``) a view of ``data`` and any other field of msgpack's type; or it must be
    left to msgpack.
    """
    envelope = _accelerator.speedups.envelope  # type: ignore[union-attr]
    try:
        got = envelope(data, 4, stop, large, valueFields)
    except Exception as e:
        return f"envelope() raised {e!r}"
    try:
        expected = msgpack.unpackb(data[4:stop], raw=False, strict_map_key=True, use_list=True)
    except Exception:
        return None if got is None else "envelope() read what msgpack refuses"
    if got is None:
        return None
    if got != expected:
        return "envelope() and msgpack read different fields"
    mask = valueFields.get(got[0], 0) if got and type(got[0]) is bytes else 0
    for index, (item, want) in enumerate(zip(got, expected, strict=True)):
        if (
            type(want) is bytes
            and len(want) >= large
            and index
            and index < 64
            and mask >> index & 1
        ):
            if type(item) is not memoryview or item.obj is not data:
                return f"field {index} is not a view of the bytes read"
        elif type(item) is not type(want):
            return f"field {index} is a {type(item).__name__}, not a {type(want).__name__}"
    return None


def fuzzNativeRecords(rng: Random, count: int, run: FuzzRun) -> None:
    """
    The C extension's native record packer and envelope reader against Python's
    ``wholeRecord`` and msgpack: random messages, packed, then mutated and cut short (half the
    time where the bytes end, so that a read past them is past their memory, which
    ``.ci/sanitize`` sees). ``decodeOk`` counts the records C packed and the envelopes it
    read. Does nothing where the extension is not built.
    """
    if _native._record is None or _native._envelope is None:
        return
    commands = [*_native.VALUE_FIELDS, b"other", b"decref"]
    for _ in range(count):
        if run.stopped:
            return
        run.inputs += 1
        message = [randomField(rng) for _ in range(rng.randrange(0, 18))]
        problem = recordProblem(message)
        if problem is None:
            fields = [b"".join(f.parts) if type(f) is _native.Packed else f for f in message]
            if fields and rng.random() < 0.7:
                fields[0] = rng.choice(commands)
            try:
                data = bytearray(rng.randbytes(4) + msgpack.packb(fields, use_bin_type=True))
            except (OverflowError, UnicodeEncodeError, ValueError):
                continue  # an int over 64 bits, a lone surrogate: never sent
            for _ in range(rng.choice([0, 0, 1, 3])):
                data[rng.randrange(len(data))] = rng.randrange(256)
            stop = len(data) if rng.random() < 0.8 else rng.randrange(4, len(data) + 1)
            data = bytearray(data[:stop]) if rng.random() < 0.5 else data
            large = rng.choice([1, 100, _native._LARGE_BYTES])
            valueFields = rng.choice([_native.VALUE_FIELDS, {b"other": -1}])
            problem = envelopeProblem(bytes(data), stop, large, valueFields)
            if problem is not None:
                problem = f"{problem}: {bytes(data[:200]).hex()} (first 200 bytes), stop {stop}"
        else:
            problem = f"{problem}: {_shape(message)}"
        if problem is None:
            run.decodeOk += 1
            continue
        run.record(
            Failure(
                generator="native-records",
                problem=problem.split(":")[0],
                signature=("native-records", problem.split(":")[0]),
                details=problem,
            ),
            None,
        )


#: The generators, by name, with the batch size the runner uses for each.
GENERATORS: dict[str, tuple[Callable[[Random, int, FuzzRun], None], int]] = {
    "random-bytes": (fuzzRandomBytes, 200),
    "mutated-bytes": (fuzzMutatedEncodings, 200),
    "mutated-sexp": (fuzzMutatedExpressions, 200),
    "in-process-sexp": (fuzzInProcessExpressions, 200),
    "buffer-limits": (fuzzBufferLimits, 10),
    "accelerator": (fuzzAccelerator, 200),
    "encoder": (fuzzEncoder, 50),
    "unjelly-accelerator": (fuzzUnjellyAccelerator, 50),
    "native-records": (fuzzNativeRecords, 50),
}


def importedCanaries(before: Iterable[str]) -> list[str]:
    """
    The canary modules imported since ``before`` (a snapshot of ``sys.modules``) was taken.
    """
    already = set(before)
    return [name for name in CANARY_MODULES if name not in already and name in sys.modules]


def _deepList(depth: int) -> list[Any]:
    """
    ``[b"list", [b"list", ... [b"list"]]]``: a jellied list ``depth`` levels deep.
    """
    node: list[Any] = [b"list"]
    for _ in range(depth - 1):
        node = [b"list", node]
    return node


# ---------------------------------------------------------------------------------------------
# Tests


class FuzzTestCase(SynchronousTestCase):
    def fuzz(
        self, generator: Callable[[Random, int, FuzzRun], None], seed: int, count: int
    ) -> FuzzRun:
        run = FuzzRun(context=f"seed {seed}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generator(Random(seed), count, run)
        self.assertNoFailures(run)
        return run

    def assertNoFailures(self, run: FuzzRun) -> None:
        if run.failures:
            self.fail(f"{len(run.failures)} unexpected outcome(s):\n{run.report()}")


class DecoderFuzzTests(FuzzTestCase):
    """
    Random and mutated bytes through the decoder, then the unjellier.
    """

    def test_randomBytes(self) -> None:
        """Random bytes in random pieces raise only BananaError, and chunking changes nothing."""
        run = self.fuzz(fuzzRandomBytes, 1, 1200)
        self.assertEqual(run.inputs, 1200)
        self.assertGreater(run.decodeErrors, 500)
        self.assertGreater(run.decodeOk, 200)
        self.assertGreater(run.expressions, 500)
        self.assertGreater(run.refused, 500)
        self.assertGreater(run.unjellied, 500)
        # Every way of going wrong was met, each more than once.
        kinds = {"type byte", "vocab", "prefix", "size", "depth", "message size"}
        self.assertEqual({kind for kind, n in run.limitErrors.items() if n > 2} & kinds, kinds)

    def test_mutatedEncodings(self) -> None:
        """Byte-level edits of realistic jelly encodings raise only BananaError/InsecureJelly."""
        run = self.fuzz(fuzzMutatedEncodings, 2, 1500)
        self.assertEqual(run.inputs, 1500)
        self.assertGreater(run.decodeErrors, 300)
        self.assertGreater(run.decodeOk, 500)
        self.assertGreater(run.refused, 500)
        self.assertGreater(run.unjellied, 1000)

    def test_corpusRoundTrips(self) -> None:
        """Unmutated corpus encodings decode (whole or byte by byte) and unjelly cleanly."""
        run = FuzzRun()
        for dialect in DIALECTS:
            for data in corpusEncodings(dialect):
                checkBytes(run, "corpus", data, dialect, {}, None)
                checkBytes(run, "corpus", data, dialect, {}, list(range(1, len(data))))
        self.assertNoFailures(run)
        self.assertEqual(run.decodeErrors, 0)
        self.assertEqual(run.decodeOk, run.inputs)
        self.assertGreater(run.unjellied, run.refused)


class AcceleratorFuzzTests(FuzzTestCase):
    """
    The C scan decodes exactly as the pure-Python one.
    """

    def setUp(self) -> None:
        if banana._scan is banana._scanPython:
            raise SkipTest("pbroker._speedups is not in use (test_package checks why)")

    def test_agrees(self) -> None:
        """Random and mutated bytes, limits, pieces and maxExpressions: identical traces."""
        run = self.fuzz(fuzzAccelerator, 3, 4000)
        self.assertEqual(run.inputs, 4000)

    def test_traceShowsDifferences(self) -> None:
        """The trace the comparison rests on tells apart what the scans must agree on."""
        decode = functools.partial(decoderTrace, banana._scan, dialect=b"none", cuts=None)
        plain = decode(b"\x02\x80\x01\x82a\x01\x81", limits={}, wanted=None)
        self.assertIn("[b'a',1,],", plain)
        self.assertNotEqual(plain, decode(b"\x02\x80\x01\x82a\x01\x83", limits={}, wanted=None))
        self.assertIn(
            "exceeds the size limit", decode(b"\x05\x82", limits={"sizeLimit": 4}, wanted=None)
        )
        drained = decode(b"\x01\x81\x02\x81", limits={}, wanted=1)
        self.assertIn("partial", drained)
        self.assertIn("[2,]", drained)


class EncoderFuzzTests(FuzzTestCase):
    """
    The fused encoder (with and without the C leaf writer) writes what encode(jelly()) does.
    """

    def test_agrees(self) -> None:
        """Random values, dialects and limits: the same bytes or the same error."""
        run = self.fuzz(fuzzEncoder, 4, 400)
        self.assertEqual(run.inputs, 400)


class UnjellyAcceleratorFuzzTests(FuzzTestCase):
    """
    The unjellier gives the same values and errors with and without the C builder.
    """

    def setUp(self) -> None:
        if _unjellier._plain is None:
            raise SkipTest("pbroker._speedups is not in use (test_package checks why)")

    def test_agrees(self) -> None:
        """Jelly of random values, decoded with text and mutated, under every taster."""
        run = self.fuzz(fuzzUnjellyAccelerator, 5, 500)
        self.assertGreater(run.inputs, 350)

    def test_noHalfBuiltListForFinalizers(self) -> None:
        """A finalizer run by a collection in the middle of a build never meets a list whose
        items are not all there."""
        size = 3000
        seen = []

        class Snoop:
            def __init__(self) -> None:
                self.me = self

            def __del__(self) -> None:
                for found in gc.get_objects():
                    if type(found) is list and len(found) == size - 2:
                        seen.append(found[-1])

        taster = jelly.SecurityOptions()
        taster.allowBasicTypes()
        sexp = [b"list"] + [[b"list"] for _ in range(size - 2)]
        Snoop()
        value = jelly.unjelly(sexp, taster=taster)
        gc.collect()
        self.assertEqual(value, [[]] * (size - 2))
        self.assertTrue(all(item == [] for item in seen))

    def test_questionsAsInPython(self) -> None:
        """The security options are asked what the Python walk asks, when it asks: a taster
        that refuses every tag it was not told about gives the same outcome both ways."""

        class Strict:
            def isTypeAllowed(self, tag: bytes) -> bool:
                if tag not in (b"boolean", b"list"):
                    raise InsecureJelly(f"refused {tag!r}")
                return True

            def isModuleAllowed(self, name: Any) -> bool:
                return False

            def isClassAllowed(self, klass: Any) -> bool:
                return False

        for sexp in ([b"boolean", b"true"], [b"list", [b"boolean", b"true"]], [b"list", 1]):
            withC = _unjellyOutcome(sexp, Strict())
            self.patch(_unjellier, "_plain", None)
            self.assertEqual(withC, _unjellyOutcome(sexp, Strict()))
            self.patch(_unjellier, "_plain", _unjellier._accelerator.speedups.plain)

    def test_notPlainTriedOnce(self) -> None:
        """A node the C builder found not plain is not handed to it again one level down, so
        a deep chain above something else costs a walk, not a walk per level."""
        sexp: list[Any] = [b"list", [b"boolean", b"true"]]
        for _ in range(50):
            sexp = [b"list", sexp]
        calls = []
        plain = _unjellier._plain
        assert plain is not None

        def counting(*arguments: Any) -> Any:
            calls.append(1)
            return plain(*arguments)

        self.patch(_unjellier, "_plain", counting)
        value = jelly.unjelly(sexp)
        for _ in range(50):
            value = value[0]
        self.assertEqual(value, [True])
        self.assertLessEqual(len(calls), 3)

    def test_canonicalTellsApart(self) -> None:
        """The comparison sees types, nan, sharing and cycles."""
        shared = [1]
        cyclic: list[Any] = []
        cyclic.append(cyclic)
        self.assertNotEqual(canonical([shared, shared]), canonical([[1], [1]]))
        self.assertNotEqual(canonical((1,)), canonical([1]))
        self.assertNotEqual(canonical(b"a"), canonical("a"))
        self.assertNotEqual(canonical(0.0), canonical(-0.0))
        self.assertEqual(canonical(float("nan")), canonical(float("nan")))
        self.assertEqual(canonical(cyclic), "list(#0,),")


class NativeRecordFuzzTests(FuzzTestCase):
    """
    The C extension's record() and envelope() agree with their Python twins.
    """

    def setUp(self) -> None:
        if _native._record is None:
            raise SkipTest("pbroker._speedups is not in use (test_package checks why)")

    def test_agrees(self) -> None:
        """Random messages, packed, mutated and cut short: C gives what Python gives."""
        run = self.fuzz(fuzzNativeRecords, 7, 3000)
        self.assertEqual(run.inputs, 3000)
        self.assertGreater(run.decodeOk, 1000)

    def test_problemsSeen(self) -> None:
        """The checks tell a wrong record or a wrong reading apart from a right one."""
        message = [b"answer", 1, b"x" * 40]
        self.assertIsNone(recordProblem(message))
        data = b"\0\0\0\0" + msgpack.packb([b"answer", 1, b"x" * 40])
        self.assertIsNone(envelopeProblem(data, len(data), 10, _native.VALUE_FIELDS))
        # (Read with every field a copy, as msgpack reads it: no views.)
        self.patch(_accelerator.speedups, "envelope", lambda data, *args: msgpack.unpackb(data[4:]))
        self.assertIn(
            "not a view", envelopeProblem(data, len(data), 10, _native.VALUE_FIELDS) or ""
        )
        self.patch(_accelerator.speedups, "record", lambda *args: b"wrong")
        self.assertIn("different records", recordProblem(message) or "")
        self.patch(_accelerator.speedups, "envelope", lambda *args: [b"answer", 2, b"x" * 40])
        self.assertIn("different fields", envelopeProblem(data, len(data), 10, {}) or "")


class UnjellyFuzzTests(FuzzTestCase):
    """
    Mutated s-expressions through the unjellier.
    """

    def test_mutatedExpressions(self) -> None:
        """Edited jelly s-expressions raise only InsecureJelly and import nothing they name."""
        before = set(sys.modules)
        run = self.fuzz(fuzzMutatedExpressions, 3, 1500)
        self.assertEqual(importedCanaries(before), [])
        self.assertEqual(run.inputs, 1500)
        self.assertGreater(run.refused, 2000)
        self.assertGreater(run.unjellied, 800)

    def test_inProcessExpressions(self) -> None:
        """Expressions holding text, huge integers or deep nesting raise only InsecureJelly."""
        before = set(sys.modules)
        run = self.fuzz(fuzzInProcessExpressions, 4, 1200)
        self.assertEqual(importedCanaries(before), [])
        self.assertEqual(run.inputs, 1200)
        self.assertGreater(run.refused, 1800)
        self.assertGreater(run.unjellied, 600)

    def test_namesAreNeverImported(self) -> None:
        """Module, class and function names in an expression are refused, never imported."""
        before = set(sys.modules)
        unchecked = [name for name in CANARY_MODULES if name not in before]
        self.assertIn("pbroker_fuzz_never_imported", unchecked)
        run = FuzzRun()
        refusedBefore = 0
        for name in [n.encode() for n in unchecked] + [b"xml.dom.minidom.parseString"]:
            dotted = name + b".X"
            for sexp in (
                [name, [b"dictionary"]],
                [dotted, [b"dictionary"]],
                [b"class", dotted],
                [b"module", name],
                [b"function", dotted],
                [b"instance", [b"class", dotted], [b"dictionary"]],
                [b"method", b"m", [b"None"], [b"class", dotted]],
                [b"list", [b"tuple", [dotted, 1]]],
            ):
                checkSexp(run, "names", sexp)
                self.assertEqual(run.refused - refusedBefore, len(TASTERS), sexp)
                refusedBefore = run.refused
        self.assertNoFailures(run)
        self.assertEqual(run.unjellied, 0)
        self.assertEqual(importedCanaries(before), [])


class LimitTests(FuzzTestCase):
    """
    The decoder's limits hold against endless, deep and oversized input.
    """

    LIMITS = {"sizeLimit": 1000, "messageSizeLimit": 5000}

    def test_endlessStreams(self) -> None:
        """Endless valid-prefix streams are refused before the limits are exceeded."""
        run = self.fuzz(fuzzBufferLimits, 4, 60)
        self.assertEqual(run.decodeErrors, 60)
        self.assertGreater(run.limitErrors["message size"], 20)

    def test_specificStreams(self) -> None:
        """List headers, trickled strings, big headers and prefix runs are refused in bounds."""

        def repeat(piece: bytes, first: bytes = b"") -> Iterator[bytes]:
            if first:
                yield first
            while True:
                yield piece

        def trickledStrings() -> Iterator[bytes]:
            yield _prefix(1000) + b"\x80"
            while True:
                yield _prefix(1000) + b"\x82"
                for _ in range(1000):
                    yield b"s"

        wideList = _prefix(1000) + b"\x80"
        # Each stream is made afresh for each dialect: (stream factory, the limit it breaks).
        streams: dict[str, tuple[Callable[[], Iterator[bytes]], str]] = {
            "nested list headers": (lambda: repeat(b"\x01\x80"), "depth"),
            "wide list headers": (lambda: repeat(wideList), "depth"),
            "lists and strings": (
                lambda: repeat(wideList + _prefix(100) + b"\x82" + b"s" * 100),
                "message size",
            ),
            "floats in a wide list": (
                lambda: repeat(b"\x84" + bytes(8), wideList),
                "message size",
            ),
            "trickled strings": (trickledStrings, "message size"),
            "big string header": (lambda: repeat(b"s", _prefix(1001) + b"\x82"), "size"),
            "prefix run": (lambda: repeat(b"\x01"), "prefix"),
        }
        for dialect in DIALECTS:
            for name, (stream, kind) in streams.items():
                run = FuzzRun(context=name)
                checkStream(run, name, stream(), dialect, dict(self.LIMITS))
                self.assertNoFailures(run)
                self.assertEqual(dict(run.limitErrors), {kind: 1}, name)

    def test_bufferedNeverExceedsOneElement(self) -> None:
        """A string trickled byte by byte is held only up to its size limit, then refused."""
        decoder = banana.Decoder(b"none", **self.LIMITS)
        self.assertEqual(decoder.feed(_prefix(1000) + b"\x82"), [])
        for count in range(1, 1000):
            self.assertEqual(decoder.feed(b"x"), [])
            self.assertEqual(decoder.buffered, count + 3)
        self.assertEqual(decoder.feed(b"x"), [b"x" * 1000])
        self.assertEqual(decoder.buffered, 0)
        self.assertRaises(BananaDecodeError, decoder.feed, _prefix(1001) + b"\x82")

    def test_deepNesting(self) -> None:
        """10,000 nested lists break the default depth limit; with a higher one, all is well."""
        data = b"\x01\x80" * 10000 + b"\x00\x81"
        for cuts in (None, list(range(64, len(data), 64))):
            decoder = banana.Decoder()
            with self.assertRaises(BananaDecodeError) as caught:
                for piece in _pieces(data, cuts):
                    decoder.feed(piece)
            self.assertIn("depth limit", str(caught.exception))
            self.assertLessEqual(decoder.buffered, _bufferBound({}))

        [expression] = banana.Decoder(depthLimit=20000).feed(data)
        self.assertEqual(nestingDepth(expression), 10000)

        sexp = _deepList(10000)
        wire = banana.encode(sexp, b"pb")
        [decoded] = banana.Decoder(b"pb", depthLimit=20000).feed(wire)
        for source in (sexp, decoded):
            value = jelly.unjelly(source)
            depth = 0
            while value:
                self.assertEqual(len(value), 1)
                value = value[0]
                depth += 1
            self.assertEqual((depth, value), (9999, []))
        self.assertRaises(BananaDecodeError, banana.Decoder(b"pb").feed, wire)


class KnownReproducerTests(FuzzTestCase):
    """
    Minimal inputs the fuzzers found; each must fail only in the documented way.
    """

    def assertOnlyDocumentedErrors(self, data: bytes, dialect: bytes = b"none") -> None:
        run = FuzzRun(minimizeSeconds=0)
        checkBytes(run, "reproducer", data, dialect)
        self.assertNoFailures(run)
        self.assertEqual(run.decodeOk, 1)

    def test_selfReference(self) -> None:
        """A reference whose value is a dereference to itself is refused, not looped on."""
        # [b"reference", 1, [b"dereference", 1]]
        self.assertOnlyDocumentedErrors(bytes.fromhex("038004870181028003870181"), b"pb")

    def test_selfReferenceAfterDereference(self) -> None:
        """A self-referencing reference met after a dereference to it does not recurse away."""
        # [b"list", [b"dereference", 1], [b"reference", 1, [b"dereference", 1]]]
        data = bytes.fromhex("03800887028003870181038004870181028003870181")
        self.assertOnlyDocumentedErrors(data, b"pb")

    def test_mutualReferences(self) -> None:
        """Two references defined as each other are refused, not recursed on."""
        sexp = [
            b"list",
            [b"reference", 1, [b"dereference", 2]],
            [b"reference", 2, [b"dereference", 1]],
        ]
        self.assertOnlyDocumentedErrors(banana.encode(sexp, b"pb"), b"pb")

    def test_deepMalformedExpression(self) -> None:
        """A malformed expression nested to the decoder's depth limit raises InvalidJelly."""
        # [b"None", [[[...[]...]]]], 1000 lists deep: the error message repr()s it.
        self.assertOnlyDocumentedErrors(b"\x02\x80\x04\x82None" + b"\x01\x80" * 997 + b"\x00\x80")
        # [[[...[]...]]]: no tag at all.
        self.assertOnlyDocumentedErrors(b"\x01\x80" * 999 + b"\x00\x80")

    def test_equalDeepDictionaryKeys(self) -> None:
        """Two equal keys nested to the decoder's depth limit do not raise RecursionError."""
        key: Any = b"x"
        for _ in range(997):
            key = [b"tuple", key]
        self.assertOnlyDocumentedErrors(banana.encode([b"dictionary", [key, 1], [key, 2]]))
        self.assertOnlyDocumentedErrors(banana.encode([b"set", [b"tuple", key], [b"tuple", key]]))

    def test_decimalExponentOutOfRange(self) -> None:
        """A decimal exponent beyond what the decimal module allows raises InvalidJelly."""
        # [b"decimal", 1, 10**18]: 03800782646563696d616c01810000103b3a562d700d85 (none dialect)
        self.assertOnlyDocumentedErrors(banana.encode([b"decimal", 1, 10**18]))
        self.assertOnlyDocumentedErrors(banana.encode([b"decimal", 1, -(2**62)]))

    def test_hugeIntegerInMalformedExpression(self) -> None:
        """A malformed expression holding an integer too long for str() raises InvalidJelly."""
        for sexp in (
            [b"decimal", 10**4400, 0],
            [b"None", 10**4400],
            [b"boolean", 10**4400],
            [b"unicode", 10**4400],
            [b"dereference", 10**4400],
            [b"list", [b"reference", 10**4400, [b"list"]], [b"reference", 10**4400, [b"list"]]],
        ):
            run = FuzzRun(minimizeSeconds=0)
            checkSexp(run, "reproducer", sexp)
            self.assertNoFailures(run)

    def test_invalidJellyIsInsecureJelly(self) -> None:
        """The fuzzers accept InvalidJelly because it is an InsecureJelly."""
        self.assertTrue(issubclass(InvalidJelly, InsecureJelly))
        self.assertTrue(issubclass(BananaDecodeError, BananaError))
