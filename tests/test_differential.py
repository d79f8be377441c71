"""
Differential tests: stock twisted.spread.banana and jelly are the oracle.

For generated values, pbroker's s-expressions and bytes must equal Twisted's, and each side must
decode the other's output to an equal value.
"""

from __future__ import annotations

import datetime
import decimal
import io
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.spread import banana as twistedBanana
from twisted.spread import jelly as twistedJelly
from twisted.trial.unittest import SynchronousTestCase

from pbroker import banana, jelly

LARGEST = 2**448 - 1

integers = st.one_of(
    st.integers(-300, 300),
    st.integers(-(2**40), 2**40),
    st.sampled_from([2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63, LARGEST, -LARGEST]),
    st.integers(-LARGEST, LARGEST),
)
floats = st.floats(allow_nan=False)
vocabularyBytes = st.sampled_from(sorted(banana.PB_VOCABULARY))
byteStrings = st.one_of(st.binary(max_size=40), vocabularyBytes)
texts = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=30),
    vocabularyBytes.map(bytes.decode),  # text whose UTF-8 is a vocabulary symbol
)
naiveDatetimes = st.datetimes(timezones=st.none())
decimals = st.decimals(allow_nan=False, allow_infinity=False, places=None).filter(
    lambda d: not (d.is_zero() and d.is_signed())  # -0 cannot be represented (spec 2.1)
)

# Atoms that are hashable and compare equal to themselves after a round trip.
hashableAtoms = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    floats,
    byteStrings,
    texts,
    naiveDatetimes,
    st.dates(),
    st.times(timezones=st.none()),
    st.timedeltas(),
    decimals,
)
hashables = st.recursive(
    hashableAtoms,
    lambda children: st.one_of(
        st.tuples(children, children), st.frozensets(hashableAtoms, max_size=4)
    ),
    max_leaves=6,
)
values = st.recursive(
    hashableAtoms,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.lists(children, max_size=6).map(tuple),
        st.dictionaries(hashables, children, max_size=5),
        st.sets(hashables, max_size=5),
        st.frozensets(hashables, max_size=5),
    ),
    max_leaves=30,
)


@st.composite
def sharedStructures(draw: st.DrawFn) -> Any:
    """
    A value in which some containers appear several times, and maybe one cycle.
    """
    pool = draw(st.lists(st.lists(hashableAtoms, max_size=3), min_size=1, max_size=4))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=10))
    outer: list[Any] = [pool[i] for i in picks]
    if draw(st.booleans()):
        outer.append({"again": pool[picks[0]], "tuple": (pool[picks[-1]],)})
    if draw(st.booleans()):
        pool[0].append(outer)  # close a cycle through the first pooled list
    return outer


expressions = st.recursive(
    st.one_of(integers, floats, byteStrings),
    lambda children: st.lists(children, max_size=6),
    max_leaves=40,
)


def twistedEncode(expression: Any, dialect: bytes) -> bytes:
    """
    What a stock Twisted Banana protocol writes for ``expression`` in ``dialect``.
    """
    protocol = twistedBanana.Banana(isClient=1)
    protocol.connectionMade()
    protocol._selectDialect(dialect)
    out = io.BytesIO()
    protocol.transport = out
    protocol.sendEncoded(expression)
    return out.getvalue()


def twistedDecode(data: bytes, dialect: bytes) -> list[Any]:
    """
    Every expression a stock Twisted Banana protocol reads from ``data`` in ``dialect``.
    """
    protocol = twistedBanana.Banana(isClient=1)
    protocol.connectionMade()
    protocol._selectDialect(dialect)
    received: list[Any] = []
    protocol.expressionReceived = received.append
    protocol.dataReceived(data)
    return received


def sameFloats(a: Any, b: Any) -> bool:
    """
    Equality that also holds between -0.0 and -0.0 only (not 0.0), for float atoms.
    """
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and a == b
    return bool(a == b)


class BananaDifferentialTests(SynchronousTestCase):
    @given(expressions, st.sampled_from([b"none", b"pb"]))
    def test_sameBytes(self, expression: Any, dialect: bytes) -> None:
        """pbroker encodes every expression to the bytes Twisted writes, in both dialects."""
        self.assertEqual(banana.encode(expression, dialect), twistedEncode(expression, dialect))

    @given(expressions, st.sampled_from([b"none", b"pb"]))
    def test_crossDecode(self, expression: Any, dialect: bytes) -> None:
        """Each side decodes the other's bytes to the same expression."""
        ours = banana.encode(expression, dialect)
        theirs = twistedEncode(expression, dialect)
        self.assertEqual(banana.Decoder(dialect).feed(theirs), [expression])
        self.assertEqual(twistedDecode(ours, dialect), [expression])

    @given(st.lists(expressions, min_size=1, max_size=4), st.data())
    def test_randomSplits(self, stream: list[Any], data: st.DataObject) -> None:
        """Any split of a stream of expressions decodes to the same expressions."""
        encoded = b"".join(banana.encode(e, b"pb") for e in stream)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=12)))
        decoder = banana.Decoder(b"pb")
        received: list[Any] = []
        start = 0
        for cut in [*cuts, len(encoded)]:
            received += decoder.feed(encoded[start:cut])
            start = cut
        self.assertEqual(received, stream)


class JellyDifferentialTests(SynchronousTestCase):
    @given(values)
    def test_sameExpression(self, value: Any) -> None:
        """pbroker's jelly equals Twisted's for every value."""
        self.assertEqual(jelly.jelly(value), twistedJelly.jelly(value))

    @given(values, st.sampled_from([b"none", b"pb"]))
    def test_sameBytes(self, value: Any, dialect: bytes) -> None:
        """dumps() writes the bytes Twisted writes for the jellied value."""
        self.assertEqual(
            jelly.dumps(value, dialect), twistedEncode(twistedJelly.jelly(value), dialect)
        )

    @given(values, st.sampled_from([b"none", b"pb"]))
    def test_crossDecode(self, value: Any, dialect: bytes) -> None:
        """Twisted reads pbroker's bytes as the value, and pbroker reads Twisted's."""
        ours = jelly.dumps(value, dialect)
        theirs = twistedEncode(twistedJelly.jelly(value), dialect)
        [theirExpression] = twistedDecode(ours, dialect)
        self.assertEqual(twistedJelly.unjelly(theirExpression, twistedJelly.globalSecurity), value)
        self.assertEqual(jelly.loads(theirs, dialect), value)
        self.assertEqual(jelly.unjelly(twistedJelly.jelly(value)), value)

    @given(sharedStructures())
    def test_sharedAndCyclic(self, value: Any) -> None:
        """Shared and cyclic structures get the same references as in Twisted, and keep them."""
        sexp = jelly.jelly(value)
        self.assertEqual(sexp, twistedJelly.jelly(value))
        self.assertEqual(jelly.dumps(value, b"pb"), twistedEncode(sexp, b"pb"))
        ours = jelly.unjelly(sexp)
        theirs = twistedJelly.unjelly(sexp)
        self.assertEqual(_shape(ours), _shape(theirs))

    @given(st.floats(allow_nan=True))
    def test_floatsBitForBit(self, value: float) -> None:
        """Every float, NaN and -0.0 included, travels bit for bit."""
        data = jelly.dumps(value)
        self.assertEqual(data, twistedBanana.encode(twistedJelly.jelly(value)))
        back = jelly.loads(data)
        if math.isnan(value):
            self.assertTrue(math.isnan(back))
        else:
            self.assertTrue(sameFloats(back, value))

    def test_timesAndDecimalsAtTheEdges(self) -> None:
        """Extreme dates, times and decimals match Twisted and come back equal."""
        for value in [
            datetime.datetime.min,
            datetime.datetime.max,
            datetime.time.max,
            datetime.timedelta.min,
            datetime.timedelta.max,
            decimal.Decimal("1E-999999"),
            decimal.Decimal("-123456789012345678901234567890.5"),
        ]:
            self.assertEqual(jelly.jelly(value), twistedJelly.jelly(value))
            self.assertEqual(jelly.loads(jelly.dumps(value)), value)


def _shape(value: Any, seen: dict[int, int] | None = None) -> Any:
    """
    A comparable picture of a graph: containers numbered in order of first visit, so that two
    graphs have the same shape exactly when they share and cycle in the same places.
    """
    seen = {} if seen is None else seen
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        if id(value) in seen:
            return ("seen", seen[id(value)])
        seen[id(value)] = len(seen)
        if isinstance(value, dict):
            items = [(_shape(k, seen), _shape(v, seen)) for k, v in value.items()]
            return (type(value).__name__, items)
        if isinstance(value, (set, frozenset)):
            return (type(value).__name__, sorted(repr(v) for v in value))
        return (type(value).__name__, [_shape(v, seen) for v in value])
    return ("atom", repr(value))
