"""
Tests for pbroker.errors: the hierarchy and the safe description of values in messages.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import banana, errors
from pbroker.errors import describe


class HierarchyTests(SynchronousTestCase):
    def test_everythingIsAPBrokerError(self) -> None:
        """Every exception class in errors derives from PBrokerError."""
        for name in errors.__all__:
            self.assertTrue(issubclass(getattr(errors, name), errors.PBrokerError), name)

    def test_sidesAreSeparate(self) -> None:
        """What this side did wrong and what the peer did wrong are different classes."""
        self.assertFalse(issubclass(errors.BananaEncodeError, errors.BananaDecodeError))
        self.assertFalse(issubclass(errors.JellyError, errors.InsecureJelly))
        self.assertTrue(issubclass(errors.InvalidJelly, errors.InsecureJelly))

    def test_decodeErrorCarriesExpressions(self) -> None:
        """A BananaDecodeError starts with no recovered expressions."""
        self.assertEqual(errors.BananaDecodeError("x").expressions, [])


class DescribeTests(SynchronousTestCase):
    def test_atoms(self) -> None:
        """Atoms are shown as repr() shows them."""
        for value in (1, -5, 2.5, None, True, b"ab", "cd"):
            self.assertEqual(describe(value), repr(value))

    def test_deepNestingIsCut(self) -> None:
        """A list nested 100,000 deep is described without recursing into it."""
        deep: Any = []
        for _ in range(100_000):
            deep = [deep]
        self.assertEqual(describe(deep), "[[[[...]]]]")

    def test_hugeIntegers(self) -> None:
        """An integer too long for str() is described by its size."""
        self.assertEqual(describe(10**5000), "<16610-bit integer>")
        self.assertEqual(describe(2**255), repr(2**255))

    def test_longValuesAreCut(self) -> None:
        """Long strings and lists are shortened to the limit."""
        self.assertEqual(len(describe(b"x" * 10_000)), 100)
        self.assertTrue(describe(b"x" * 10_000).endswith("..."))
        self.assertIn("... 92 more", describe(list(range(100)), 1000))
        self.assertEqual(describe((1, 2)), "(1, 2)")

    def test_otherObjects(self) -> None:
        """Other objects are named by type, so no user repr() runs."""

        class Loud:
            def __repr__(self) -> str:
                raise AssertionError("repr must not be called")

        self.assertIn("Loud object", describe(Loud()))

    def test_usedInCodecMessages(self) -> None:
        """Codec errors about huge or deep values stay short and do not fail themselves."""
        with self.assertRaises(errors.BananaEncodeError) as caught:
            banana.encode(10**4400)
        self.assertIn("-bit integer> is too large to send", str(caught.exception))
        deep: Any = {}
        for _ in range(10_000):
            deep = {"k": deep}
        with self.assertRaises(errors.BananaEncodeError) as caught:
            banana.encode([deep])
        self.assertIn("builtins.dict", str(caught.exception))


class ConnectionLostTests(SynchronousTestCase):
    def test_namesTheFailure(self) -> None:
        """Given the Failure the connection was lost with (as stock PB gives it, and keeps it
        as its argument), the text names what happened, not the Failure's repr."""
        reason = Failure(ConnectionDone())
        lost = errors.PBConnectionLost(reason)
        self.assertIs(lost.args[0], reason)
        self.assertEqual(
            str(lost), "the connection was lost: ConnectionDone: Connection was closed cleanly."
        )

    def test_reasonThatIsNotAnException(self) -> None:
        """Given a Failure-like reason whose value is not an exception, or an exception
        alone, the text is the argument's, as any exception's."""

        class Odd:
            value = "not an exception"

            def getErrorMessage(self) -> str:
                return "unused"

        odd = Odd()
        self.assertEqual(str(errors.PBConnectionLost(odd)), str(odd))
        self.assertEqual(str(errors.PBConnectionLost(ConnectionDone())), str(ConnectionDone()))
        self.assertEqual(str(errors.PBConnectionLost()), "")
        self.assertEqual(str(errors.PBConnectionLost("a", "b")), "('a', 'b')")

    def test_text(self) -> None:
        """Given text, the text."""
        self.assertEqual(str(errors.PBConnectionLost("gone")), "gone")
