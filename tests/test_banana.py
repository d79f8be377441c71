"""
Tests for pbroker.banana: golden vectors, incremental decoding, limits, errors, the protocol.
"""

from __future__ import annotations

import gc
import io
import random
import struct
import sys
import weakref
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.spread import banana as twistedBanana
from twisted.test import iosim
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from pbroker import _accelerator, banana, jelly
from pbroker.banana import Banana, Decoder, decode, encode
from pbroker.errors import BananaDecodeError, BananaEncodeError, BananaError


def h(text: str) -> bytes:
    """
    Bytes from spaced hex, as the wire specification writes them.
    """
    return bytes.fromhex(text)


# (value, its encoding in the 'none' dialect) from the wire specification, sections 1.1-1.2.
GOLDEN = [
    (0, "00 81"),
    (127, "7f 81"),
    (128, "00 01 81"),
    (300, "2c 02 81"),
    (4674, "42 24 81"),
    (2**31 - 1, "7f 7f 7f 7f 07 81"),
    (2**31, "00 00 00 00 08 85"),
    (-(2**31), "00 00 00 00 08 83"),
    (-(2**31) - 1, "01 00 00 00 08 86"),
    (-1, "01 83"),
    (2.5, "84 40 04 00 00 00 00 00 00"),
    ([], "00 80"),
    ([1, b"x"], "02 80 01 81 01 82 78"),
    ([b"pb", b"none"], "02 80 02 82 70 62 04 82 6e 6f 6e 65"),
    (b"pb", "02 82 70 62"),
]

# PB messages observed on the wire in the 'pb' dialect (specification 3.5 and 3.10).
PB_GOLDEN = [
    ([b"version", 6], "02 80 13 87 06 81"),
    (
        [b"message", 1, b"root", b"login", 1, [b"tuple", b"user"], [b"dictionary"]],
        "07 80 1a 87 01 81 04 82 72 6f 6f 74 14 87 01 81 02 80 0b 87 04 82 75 73 65 72 01 80 05 87",
    ),
    (
        [b"message", 7, 3, b"ping", 0, [b"tuple"], [b"dictionary"]],
        "07 80 1a 87 07 81 03 81 04 82 70 69 6e 67 00 81 01 80 0b 87 01 80 05 87",
    ),
    (
        [
            b"message",
            6,
            3,
            b"ping",
            1,
            [b"tuple", 5],
            [b"dictionary", [[b"unicode", b"k"], [b"unicode", b"kw"]]],
        ],
        "07 80 1a 87 06 81 03 81 04 82 70 69 6e 67 01 81 02 80 0b 87 05 81 02 80 05 87"
        " 02 80 02 80 07 82 75 6e 69 63 6f 64 65 01 82 6b 02 80 07 82 75 6e 69 63 6f 64 65"
        " 02 82 6b 77",
    ),
    ([b"answer", 2, [b"remote", 2]], "03 80 1b 87 02 81 02 80 10 87 02 81"),
    ([b"decref", 3], "02 80 1d 87 03 81"),
    (
        [b"cachemessage", 1, 4, b"setV", 1, [b"tuple", 7], [b"dictionary"]],
        "07 80 19 87 01 81 04 81 04 82 73 65 74 56 01 81 02 80 0b 87 07 81 01 80 05 87",
    ),
    ([b"answer", 9, b"list"], "03 80 1b 87 09 81 08 87"),
]


def feedBytewise(decoder: Decoder, stream: bytes) -> list[Any]:
    """
    Feed ``stream`` to ``decoder`` one byte at a time; every expression it returned, in order.
    """
    received: list[Any] = []
    for index in range(len(stream)):
        received += decoder.feed(stream[index : index + 1])
    return received


def _nested(depth: int) -> bytes:
    """
    The encoding of ``depth`` lists nested one inside the other around the integer 0.
    """
    return b"\x01\x80" * depth + b"\x00\x81"


class EncodeTests(SynchronousTestCase):
    def test_golden(self) -> None:
        """Every vector of the specification encodes to its bytes in the 'none' dialect."""
        for value, expected in GOLDEN:
            self.assertEqual(encode(value), h(expected), value)

    def test_goldenPb(self) -> None:
        """The PB messages of the specification encode to their observed bytes."""
        for value, expected in PB_GOLDEN:
            self.assertEqual(encode(value, b"pb"), h(expected), value)

    def test_vocabularyOnlyInPb(self) -> None:
        """Vocabulary symbols are VOCAB tokens in 'pb' and plain strings in 'none'."""
        for symbol, number in banana.PB_VOCABULARY.items():
            self.assertEqual(encode(symbol, b"pb"), bytes([number, 0x87]))
            self.assertEqual(encode(symbol), bytes([len(symbol), 0x82]) + symbol)
        self.assertEqual(len(banana.PB_VOCABULARY), 31)
        self.assertEqual(banana.PB_VOCABULARY[b"None"], 1)
        self.assertEqual(banana.PB_VOCABULARY[b"uncache"], 31)

    def test_tuplesAndSubclassesTravelAsBaseTypes(self) -> None:
        """Tuples encode as lists; bool and subclasses of int, bytes, list and float as their
        base."""

        class MyBytes(bytes):
            pass

        class MyFloat(float):
            pass

        class MyList(list[Any]):
            pass

        self.assertEqual(encode((1, 2)), encode([1, 2]))
        self.assertEqual(encode(True), encode(1))
        self.assertEqual(encode(False), encode(0))
        self.assertEqual(encode(MyBytes(b"ab")), encode(b"ab"))
        self.assertEqual(encode(MyList([1])), encode([1]))
        self.assertEqual(encode([MyFloat(1.5)], b"pb"), encode([1.5], b"pb"))
        self.assertIs(type(decode(encode(MyFloat(1.5)))), float)

    def test_unsupportedType(self) -> None:
        """Text, None and other objects cannot be sent; the error names the type."""
        for value in ["text", None, {1: 2}, object(), [1, [2, "x"]]]:
            with self.assertRaises(BananaEncodeError) as caught:
                encode(value)
            self.assertIn("Banana cannot send", str(caught.exception))
        with self.assertRaises(BananaEncodeError) as caught:
            encode("text")
        self.assertIn("builtins.str", str(caught.exception))

    def test_sizeLimitAtAndOver(self) -> None:
        """Strings and lists of exactly sizeLimit go out; one more is refused."""
        limit = banana.SIZE_LIMIT
        self.assertEqual(encode(b"x" * limit)[-limit:], b"x" * limit)
        self.assertTrue(encode([0] * limit).startswith(banana.encode(limit)[:-1] + b"\x80"))
        with self.assertRaises(BananaEncodeError) as caught:
            encode(b"x" * (limit + 1))
        self.assertIn("655361 bytes", str(caught.exception))
        with self.assertRaises(BananaEncodeError):
            encode([0] * (limit + 1))
        with self.assertRaises(BananaEncodeError):
            encode([b"abcd"], sizeLimit=3)
        self.assertEqual(encode([b"abc"], sizeLimit=3), h("01 80 03 82 61 62 63"))

    def test_integerRange(self) -> None:
        """Integers up to 2**448-1 in magnitude fit in 64 prefix bytes; larger are refused."""
        largest = 2**448 - 1
        self.assertEqual(decode(encode(largest)), largest)
        self.assertEqual(decode(encode(-largest)), -largest)
        for value in (largest + 1, -largest - 1):
            with self.assertRaises(BananaEncodeError) as caught:
                encode(value)
            self.assertIn("too large", str(caught.exception))
        self.assertEqual(encode(127, prefixLimit=1), h("7f 81"))
        with self.assertRaises(BananaEncodeError):
            encode(128, prefixLimit=1)
        with self.assertRaises(BananaEncodeError):
            encode(2**21, prefixLimit=3)

    def test_unknownDialect(self) -> None:
        """An unknown dialect name is a ValueError that lists the known ones."""
        with self.assertRaises(ValueError) as caught:
            encode(1, b"klingon")
        self.assertIn("b'pb'", str(caught.exception))
        with self.assertRaises(ValueError):
            Decoder(b"klingon")

    def test_encodedSplicedAsIs(self) -> None:
        """Encoded bytes are copied into the expression without a header."""
        inner = banana.Encoded(encode([1, 2]))
        self.assertEqual(encode([inner, 3]), encode([[1, 2], 3]))

    def test_tokens(self) -> None:
        """Tokens writes the same bytes as encode() and enforces the same limits."""
        tokens = banana.getTokens(b"pb")
        self.assertIs(tokens, banana.getTokens(b"pb"))
        edges = (len(tokens.smallInts) + d for d in (-1, 0, 1))
        for value in (0, 1, 5, 127, 128, *edges, 2**14, 2**21, 2**31, -1, -(2**40)):
            self.assertEqual(tokens.integer(value), encode(value))
        self.assertEqual(tokens.symbol(b"message"), encode(b"message", b"pb"))
        self.assertEqual(tokens.symbol(b"other"), encode(b"other", b"pb"))
        for size in (0, 127, 128, len(tokens.stringHeaders) - 1, len(tokens.stringHeaders)):
            self.assertEqual(tokens.symbol(b"x" * size), encode(b"x" * size, b"pb"))
        self.assertEqual(
            tokens.joinList([tokens.symbol(b"decref"), tokens.integer(3)]), h("02 80 1d 87 03 81")
        )
        small = banana.Tokens(b"none", sizeLimit=2, prefixLimit=1)
        self.assertEqual(small.listHeaders, [b"\x00\x80", b"\x01\x80", b"\x02\x80"])
        with self.assertRaises(BananaEncodeError):
            small.stringHeader(3)
        with self.assertRaises(BananaEncodeError):
            small.listHeader(3)
        with self.assertRaises(BananaEncodeError):
            small.integer(128)
        with self.assertRaises(BananaEncodeError):
            small.symbol(b"abc")
        self.assertEqual(len(small.smallInts), 128)

    def test_joinListPastTheCachedHeaders(self) -> None:
        """A list of more elements than the cached headers gets its header made, as encode
        makes it; past the size limit it is refused, saying so."""
        tokens = banana.Tokens(b"pb")
        elements = [tokens.integer(1)] * 300
        self.assertEqual(tokens.joinList(elements), encode([1] * 300, b"pb"))
        small = banana.Tokens(b"pb", sizeLimit=2)
        with self.assertRaises(BananaEncodeError) as caught:
            small.joinList(elements[:3])
        self.assertEqual(
            str(caught.exception), "list of 3 elements is too long to send (the size limit is 2)"
        )

    def test_headersOfExactlyTheLimit(self) -> None:
        """A list or a string of exactly ``sizeLimit`` elements is within the limit, past
        the headers kept ready too; one more is not."""
        for limit in (5, 100_000, banana.SIZE_LIMIT):
            tokens = banana.Tokens(b"none", sizeLimit=limit)
            for header, typeByte in ((tokens.listHeader, 0x80), (tokens.stringHeader, 0x82)):
                self.assertEqual(header(limit)[-1], typeByte)
                with self.assertRaises(banana.BananaEncodeError):
                    header(limit + 1)
        tokens = banana.Tokens(b"none", sizeLimit=100_000)
        ones = tokens.listHeader(100_000) + tokens.integer(1) * 100_000
        self.assertEqual(banana.decode(ones, sizeLimit=100_000), [1] * 100_000)

    def test_prefixLimitBelowOne(self) -> None:
        """A prefix limit below one is a mistake of the caller's: ValueError, naming it."""
        for make in (
            lambda: encode(1, prefixLimit=0),
            lambda: banana.Tokens(b"pb", prefixLimit=0),
        ):
            with self.assertRaises(ValueError) as caught:
                make()
            self.assertEqual(str(caught.exception), "prefixLimit must be at least 1, not 0")

    def test_limitsCheckedWhenEncoding(self) -> None:
        """The encoder's limits are checked as the decoder's are, naming the limit, rather
        than failing deep inside or blaming the data; a sizeLimit of None is the default,
        in getTokens and jelly.dumps as in encode."""
        for make, error, message in (
            (lambda: encode(b"abc", sizeLimit=-1), ValueError, "sizeLimit must be at least 1"),
            (lambda: encode(b"abc", sizeLimit=1.5), TypeError, "sizeLimit must be an integer"),
            (lambda: encode(1, prefixLimit="64"), TypeError, "prefixLimit must be an integer"),
            (lambda: jelly.dumps(1, sizeLimit=1.5), TypeError, "sizeLimit must be an integer"),
            (lambda: banana.setPrefixLimit("a"), TypeError, "the prefix limit must be an integer"),
            (lambda: banana.int2b128("a", print), TypeError, "non-negative integer, not str"),
            (lambda: Decoder().feed(b"", maxExpressions="1"), TypeError, "maxExpressions must"),
            (lambda: Decoder().feed(b"", maxExpressions=1.5), TypeError, "maxExpressions must"),
        ):
            with self.assertRaises(error) as caught:
                make()
            self.assertIn(message, str(caught.exception))
        self.assertEqual(jelly.dumps([1], sizeLimit=None), jelly.dumps([1]))
        self.assertIs(banana.getTokens(b"pb", None), banana.getTokens(b"pb"))
        # Integers as everywhere in pbroker: anything with __index__ (a numpy integer), but
        # not a bool.
        self.assertEqual(encode(b"abc", sizeLimit=_Index(3), prefixLimit=_Index(4)), encode(b"abc"))
        self.assertEqual(Decoder(sizeLimit=_Index(3)).sizeLimit, 3)
        for make in (lambda: Decoder(sizeLimit=True), lambda: encode(b"", sizeLimit=True)):
            with self.assertRaises(TypeError) as caught:
                make()
            self.assertEqual(str(caught.exception), "sizeLimit must be an integer, not True")


class IntegerPrefixTests(SynchronousTestCase):
    """
    Integers around the encoders' table and prefix-length boundaries, in both encoders.
    """

    def test_boundaries(self) -> None:
        """1, 2 and 3 prefix bytes, on either side of the cached table, as Twisted writes."""
        for value in (0, 127, 128, 1023, 1024, 1025, 16383, 16384, 2**21 - 1, 2**21, 2**31):
            data = encode(value)
            self.assertEqual(data, twistedBanana.encode(value))
            self.assertEqual(decode(data), value)
            self.assertEqual(jelly.dumps(value), data)

    def test_prefixLimit(self) -> None:
        """A value needing more prefix bytes than allowed is refused by both encoders."""
        for value, limit in ((200, 1), (20000, 2)):
            self.assertRaises(BananaEncodeError, encode, value, prefixLimit=limit)
            self.assertRaises(BananaEncodeError, jelly.dumps, value, prefixLimit=limit)
        self.assertEqual(encode(5000, prefixLimit=2), b"\x08'\x81")


class DecodeTests(SynchronousTestCase):
    def test_golden(self) -> None:
        """Every vector of the specification decodes to its value."""
        for value, encoded in GOLDEN:
            expected = [1, 2] if value == (1, 2) else value
            self.assertEqual(decode(h(encoded)), expected)
        for value, encoded in PB_GOLDEN:
            self.assertEqual(decode(h(encoded), b"pb"), value)

    def test_anyIntegerTypeAnyMagnitude(self) -> None:
        """Each integer type is accepted whatever the magnitude, as Twisted does."""
        self.assertEqual(decode(h("05 85")), 5)
        self.assertEqual(decode(h("05 86")), -5)
        self.assertEqual(decode(h("00 00 00 00 08 81")), 2**31)
        self.assertEqual(decode(h("00 83")), 0)
        self.assertEqual(decode(h("81")), 0)  # an empty prefix reads as zero

    def test_floatPrefixIgnored(self) -> None:
        """A prefix before FLOAT is ignored, as in Twisted."""
        self.assertEqual(decode(h("05 84") + struct.pack(">d", 1.5)), 1.5)

    def test_oneByteAtATime(self) -> None:
        """Feeding one byte at a time yields the same expressions as feeding all at once."""
        stream = b"".join(h(encoded) for _, encoded in PB_GOLDEN) * 2
        expected = Decoder(b"pb").feed(stream)
        self.assertEqual(len(expected), 2 * len(PB_GOLDEN))
        decoder = Decoder(b"pb")
        self.assertEqual(feedBytewise(decoder, stream), expected)
        self.assertFalse(decoder.midExpression)

    def test_randomSplits(self) -> None:
        """Any split of the stream into chunks yields the same expressions."""
        values: list[Any] = [
            [b"x" * 5000, [2**100, -3, 2.25, []], [[[[b""]]]]],
            [i * 7919 for i in range(300)],
            b"tail",
        ]
        stream = b"".join(encode(v, b"pb") for v in values)
        rng = random.Random(20261122)
        for _ in range(200):
            decoder = Decoder(b"pb")
            received: list[Any] = []
            position = 0
            while position < len(stream):
                size = rng.choice([1, 2, 3, 7, 64, 500, 4096])
                received += decoder.feed(stream[position : position + size])
                position += size
            self.assertEqual(received, values)

    def test_severalExpressionsInOneRead(self) -> None:
        """Several expressions in one read come out in order."""
        data = encode([1]) + encode(b"a") + encode(2.0) + encode([])
        self.assertEqual(Decoder().feed(data), [[1], b"a", 2.0, []])

    def test_maxExpressions(self) -> None:
        """maxExpressions stops early and keeps the rest for the next feed()."""
        data = encode([1]) + encode([2]) + encode([3])
        decoder = Decoder()
        self.assertEqual(decoder.feed(data, maxExpressions=1), [[1]])
        self.assertTrue(decoder.midExpression)
        self.assertEqual(decoder.buffered, len(data) - len(encode([1])))
        self.assertEqual(decoder.feed(maxExpressions=1), [[2]])
        self.assertEqual(decoder.feed(), [[3]])
        self.assertFalse(decoder.midExpression)

    def test_maxExpressionsMustBePositive(self) -> None:
        """Asking for fewer than one expression is a ValueError."""
        with self.assertRaises(ValueError):
            Decoder().feed(encode(1), maxExpressions=0)

    def test_dialectSwitchBetweenExpressions(self) -> None:
        """The dialect can change between two expressions that arrived in one read."""
        data = encode(b"pb") + encode([b"version", 6], b"pb")
        decoder = Decoder(b"none")
        self.assertEqual(decoder.feed(data, maxExpressions=1), [b"pb"])
        decoder.dialect = b"pb"
        self.assertEqual(decoder.dialect, b"pb")
        self.assertEqual(decoder.feed(), [[b"version", 6]])

    def test_largeStringTrickledIsLinear(self) -> None:
        """A 640 KiB string in 256-byte reads is decoded, each read buffered once."""
        payload = bytes(range(256)) * 2560
        data = encode([payload, 1])
        decoder = Decoder()
        received: list[Any] = []
        for position in range(0, len(data), 256):
            received += decoder.feed(data[position : position + 256])
            self.assertLessEqual(decoder.buffered, len(payload) + 8)
        self.assertEqual(received, [[payload, 1]])

    def test_readsAfterTheBufferIsCompacted(self) -> None:
        """Once most of a kept buffer over 64 KiB has been decoded, its decoded bytes are
        dropped and the decoding starts again at its front: what the next reads bring is
        decoded from the right place, wherever the reads are cut."""
        large = b"L" * 200_000
        data = banana.encode(large) + banana.encode([b"next", 7]) + banana.encode(3)
        for first in (10, 1000, 150_000):
            for last in (3, 9, len(data) - first - 1):
                decoder = banana.Decoder()
                middle = len(data) - last
                decoded = decoder.feed(data[:first])
                decoded += decoder.feed(data[first:middle])
                decoded += decoder.feed(data[middle:])
                self.assertEqual(decoded, [large, [b"next", 7], 3], (first, last))

    def test_decodeHelperStrict(self) -> None:
        """decode() wants exactly one complete expression."""
        with self.assertRaises(BananaDecodeError) as caught:
            decode(encode([1, 2])[:-1])
        self.assertIn("incomplete", str(caught.exception))
        with self.assertRaises(BananaDecodeError) as caught:
            decode(encode(1) + encode(2))
        self.assertIn("trailing", str(caught.exception))


class TextTests(SynchronousTestCase):
    """
    The ``text`` option: jelly's text, ``[b"unicode", <UTF-8 bytes>]``, decoded as a str.
    """

    def test_decodedAsStr(self) -> None:
        """Text nodes anywhere become str; without the option they stay lists."""
        sexp = [b"list", [b"unicode", "ünï".encode()], [b"unicode", b""], [b"unicode", b"x" * 127]]
        data = encode(sexp)
        self.assertEqual(Decoder(b"pb", text=True).feed(data), [[b"list", "ünï", "", "x" * 127]])
        self.assertEqual(Decoder(b"pb").feed(data), [sexp])

    def test_notAtTopLevel(self) -> None:
        """A whole expression is never taken for text: a PB message is a list."""
        data = encode([b"unicode", b"top"])
        self.assertEqual(Decoder(text=True).feed(data), [[b"unicode", b"top"]])
        self.assertEqual(Decoder(text=True).feed(memoryview(data)), [[b"unicode", b"top"]])

    def test_memoryview(self) -> None:
        """A memoryview is decoded the long way, as it is without the option."""
        data = memoryview(encode([[b"unicode", b"in"]]))
        self.assertEqual(Decoder(text=True).feed(data), [[[b"unicode", b"in"]]])

    def test_otherwiseTheList(self) -> None:
        """What is not short, valid text comes as the list it is."""
        for sexp in (
            [b"unicode", b"\xff"],  # not UTF-8
            [b"unicode", b"x" * 128],  # a two-byte length prefix
            [b"unicode", b"a", b"b"],
            [b"unicode", 5],
            [b"unicode", [b"x"]],
            [b"unicodes", b"a"],
            [b"unicod", b"a"],
        ):
            self.assertEqual(Decoder(text=True).feed(encode([sexp])), [[sexp]], repr(sexp))

    def test_splitsChangeNothing(self) -> None:
        """Texts are waited for whole: fed a byte at a time, the result is the same."""
        stream = encode([b"list", [b"unicode", b"abc"], [[b"unicode", b"d"], 2], [b"unicode"]])
        stream += encode([[b"unicode", b"\xfe"]]) + encode([[b"unicode", b"e"]])
        expected = Decoder(text=True).feed(stream)
        self.assertEqual(
            expected,
            [[b"list", "abc", ["d", 2], [b"unicode"]], [[b"unicode", b"\xfe"]], ["e"]],
        )
        decoder = Decoder(text=True)
        self.assertEqual(feedBytewise(decoder, stream), expected)
        self.assertFalse(decoder.midExpression)

    def test_limitsStillApply(self) -> None:
        """The message size and depth limits refuse what they refuse without the option."""
        data = encode([b"list", [b"unicode", b"x" * 50]])
        self.assertEqual(
            Decoder(text=True, messageSizeLimit=len(data)).feed(data), [[b"list", "x" * 50]]
        )
        for text in (False, True):
            with self.assertRaises(BananaDecodeError) as caught:
                Decoder(text=text, messageSizeLimit=len(data) - 1).feed(data)
            self.assertIn(f"message size limit of {len(data) - 1}", str(caught.exception))
            nested = encode([[[b"unicode", b"deep"]]])
            expected = "deep" if text else [b"unicode", b"deep"]
            self.assertEqual(Decoder(text=text, depthLimit=3).feed(nested), [[[expected]]])
            with self.assertRaises(BananaDecodeError) as caught:
                Decoder(text=text, depthLimit=2).feed(nested)
            self.assertIn("depth limit", str(caught.exception))

    def test_messageSizeLimitNotLate(self) -> None:
        """
        Waiting for the rest of a text, the decoder still refuses a tag over the message
        size limit as soon as the long way would, fed whole or byte by byte.
        """
        data = h("02 80 02 80 07 82")
        for text in (False, True):
            for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
                decoder = Decoder(text=text, messageSizeLimit=10)
                with self.assertRaises(BananaDecodeError) as caught:
                    for piece in pieces:
                        decoder.feed(piece)
                self.assertIn("message size limit of 10", str(caught.exception))

    def test_smallSizeLimitTurnsItOff(self) -> None:
        """Under a size limit of 255 the long way checks every string and list."""
        data = encode([[b"unicode", b"x" * 20]])
        self.assertEqual(Decoder(text=True, sizeLimit=254).feed(data), [[[b"unicode", b"x" * 20]]])
        self.assertEqual(Decoder(text=True, sizeLimit=255).feed(data), [["x" * 20]])
        with self.assertRaises(BananaDecodeError):
            Decoder(text=True, sizeLimit=10).feed(data)

    def test_protocolOption(self) -> None:
        """Banana leaves text as lists unless decodeText is set, as a Broker sets it."""
        from pbroker.broker import Broker

        self.assertFalse(Banana.decodeText)
        self.assertTrue(Broker.decodeText)


class DecodeErrorTests(SynchronousTestCase):
    def assertDecodeError(self, data: bytes, message: str, **options: Any) -> None:
        """
        Decoding ``data`` in one piece and byte by byte raises with ``message`` in its text.
        """
        with self.assertRaises(BananaDecodeError) as caught:
            Decoder(**options).feed(data)
        self.assertIn(message, str(caught.exception))
        decoder = Decoder(**options)
        with self.assertRaises(BananaDecodeError):
            for index in range(len(data)):
                decoder.feed(data[index : index + 1])

    def test_prefixLimit(self) -> None:
        """64 prefix bytes are accepted; a 65th is refused even before a type byte arrives."""
        self.assertEqual(decode(b"\x00" * 64 + b"\x81"), 0)
        self.assertDecodeError(b"\x00" * 65, "more than 64 prefix bytes")
        self.assertDecodeError(b"\x00" * 65 + b"\x81", "more than 64 prefix bytes")
        self.assertEqual(decode(b"\x01\x01\x81", prefixLimit=2), 129)
        self.assertDecodeError(b"\x01\x01\x01\x81", "more than 2 prefix", prefixLimit=2)
        self.assertDecodeError(b"\x01\x01\x81", "more than 1 prefix", prefixLimit=1)

    def test_prefixFloodRefusedAtOnce(self) -> None:
        """A megabyte of prefix bytes fails at byte 65, without scanning or buffering it all."""
        decoder = Decoder()
        with self.assertRaises(BananaDecodeError):
            decoder.feed(b"\x7f" * 1_000_000)
        with self.assertRaises(BananaDecodeError) as caught:
            decoder.feed(b"\x81")
        self.assertIn("earlier error", str(caught.exception))

    def test_sizeLimits(self) -> None:
        """Strings and lists at the size limit pass; one over fails before the body arrives."""
        limit = banana.SIZE_LIMIT
        self.assertEqual(len(decode(encode(b"y" * limit))), limit)
        self.assertEqual(len(decode(encode([0] * limit))), limit)
        self.assertDecodeError(encode(limit + 1)[:-1] + b"\x82", "string of 655361 bytes")
        self.assertDecodeError(encode(limit + 1)[:-1] + b"\x80", "list of 655361 elements")
        self.assertDecodeError(encode([b"abcd"]), "exceeds the size limit of 3", sizeLimit=3)

    def test_depthLimit(self) -> None:
        """Nesting up to depthLimit decodes; one level more fails, and 10,000 levels too."""
        self.assertEqual(decode(_nested(3), depthLimit=3), [[[0]]])
        self.assertDecodeError(_nested(4), "nested more than 3 deep", depthLimit=3)
        # An empty list is a level too.
        self.assertEqual(decode(h("01 80 01 80 00 80"), depthLimit=3), [[[]]])
        self.assertDecodeError(h("01 80 01 80 00 80"), "nested more than 2 deep", depthLimit=2)
        decode(_nested(banana.DEPTH_LIMIT))
        self.assertDecodeError(_nested(banana.DEPTH_LIMIT + 1), "nested more than 1000 deep")
        self.assertDecodeError(_nested(10_000), "depth limit")
        deep = decode(_nested(10_000), depthLimit=10_000)
        for _ in range(9_999):
            deep = deep[0]
        self.assertEqual(deep, [0])

    def test_messageSizeLimit(self) -> None:
        """An expression larger than messageSizeLimit fails; one at the limit passes."""
        data = encode([b"a" * 40, b"b" * 40])
        self.assertEqual(len(data), 86)
        self.assertEqual(decode(data, messageSizeLimit=86), [b"a" * 40, b"b" * 40])
        self.assertDecodeError(data, "message size limit of 85", messageSizeLimit=85)
        decoder = Decoder(messageSizeLimit=100)
        self.assertEqual(decoder.feed(data + data), [[b"a" * 40, b"b" * 40]] * 2)

    def test_messageSizeLimitWholeOrSplit(self) -> None:
        """The message size limit holds however the bytes are split, integers only too."""
        data = encode(list(range(20)))
        self.assertEqual(len(data), 42)
        self.assertDecodeError(data, "message size limit of 10", messageSizeLimit=10)
        self.assertDecodeError(encode(2**200), "message size limit of 10", messageSizeLimit=10)
        self.assertEqual(decode(data, messageSizeLimit=42), list(range(20)))

    def test_messageSizeLimitBoundsBuffering(self) -> None:
        """A growing expression is refused before it holds more than the limit."""
        decoder = Decoder(messageSizeLimit=1000)
        with self.assertRaises(BananaDecodeError):
            for _ in range(10_000):
                decoder.feed(b"\x0f\x80" + b"\x01\x81" * 14)
                self.assertLessEqual(decoder.buffered, 1000)

    def test_unknownTypeByte(self) -> None:
        """Type bytes beyond 0x87 are refused with the byte in the message."""
        for kind in range(0x88, 0x100):
            self.assertDecodeError(bytes([1, kind]), f"unknown banana type byte 0x{kind:02x}")

    def test_vocabInNone(self) -> None:
        """VOCAB is refused in the 'none' dialect, and unknown symbols in 'pb'."""
        self.assertDecodeError(h("08 87"), "received in the 'none' dialect")
        self.assertDecodeError(h("20 87"), "not in the 'pb' vocabulary", dialect=b"pb")
        self.assertDecodeError(h("00 87"), "not in the 'pb' vocabulary", dialect=b"pb")

    def test_expressionsBeforeErrorKept(self) -> None:
        """Expressions completed in the same read before the error travel on the error."""
        decoder = Decoder()
        with self.assertRaises(BananaDecodeError) as caught:
            decoder.feed(encode([1]) + encode(b"two") + h("01 80 05 99"))
        self.assertEqual(caught.exception.expressions, [[1], b"two"])
        self.assertIn("0x99", str(caught.exception))

    def test_truncatedIsNotAnError(self) -> None:
        """A truncated stream is just incomplete: nothing comes out, nothing fails."""
        data = encode([b"abc", 2.5, [1, 2]])
        for cut in range(len(data)):
            decoder = Decoder()
            self.assertEqual(decoder.feed(data[:cut]), [])
            self.assertEqual(decoder.midExpression, cut > 0)

    def test_badLimitArguments(self) -> None:
        """Limits below 1 are refused when the decoder is made."""
        for name in ("sizeLimit", "prefixLimit", "depthLimit", "messageSizeLimit"):
            with self.assertRaises(ValueError) as caught:
                Decoder(**{name: 0})
            self.assertIn(name, str(caught.exception))

    def test_limitsAreIntegers(self) -> None:
        """A limit that is not an int is refused when the decoder is made, with its name."""
        for name in ("sizeLimit", "prefixLimit", "depthLimit", "messageSizeLimit"):
            with self.assertRaises(TypeError) as caught:
                Decoder(**{name: float("inf")})
            self.assertIn(name, str(caught.exception))

    def test_hugeLimits(self) -> None:
        """Limits and bounds beyond 2**62 (the C scan's ceiling) act as in Python."""
        decoder = Decoder(sizeLimit=2**62, messageSizeLimit=2**63)
        self.assertEqual(decoder.feed(bytes(8) + b"\x40\x82"), [])
        self.assertTrue(decoder.midExpression)
        decoder = Decoder()
        self.assertEqual(decoder.feed(b"\x01\x81", maxExpressions=2**63), [1])
        self.assertEqual(decoder.feed(b"\x02\x81", maxExpressions=2**70), [2])

    def test_errorsAreBananaErrors(self) -> None:
        """Both error kinds derive from BananaError, the name twisted.spread uses."""
        self.assertTrue(issubclass(BananaDecodeError, BananaError))
        self.assertTrue(issubclass(BananaEncodeError, BananaError))
        self.assertIs(banana.BananaError, BananaError)


class _Collector(Banana):
    """
    A banana protocol that records what it receives and when it became ready.
    """

    def __init__(self, isClient: bool = True) -> None:
        super().__init__(isClient)
        self.received: list[Any] = []
        self.ready = 0

    def connectionReady(self) -> None:
        self.ready += 1

    def expressionReceived(self, expression: Any) -> None:
        self.received.append(expression)


class _TwistedCollector(twistedBanana.Banana):
    """
    Stock Twisted's banana protocol, recording what it receives.
    """

    def __init__(self, isClient: int = 1) -> None:
        super().__init__(isClient)
        self.received: list[Any] = []

    def expressionReceived(self, expression: Any) -> None:
        self.received.append(expression)


class ProtocolTests(SynchronousTestCase):
    def connected(self, protocol: Banana) -> StringTransport:
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport

    def test_serverOffersDialects(self) -> None:
        """On connection the server offers its dialects in the plain form."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        self.assertEqual(transport.value(), h("02 80 02 82 70 62 04 82 6e 6f 6e 65"))
        self.assertIsNone(server.currentDialect)

    def test_clientChoosesFirstKnown(self) -> None:
        """The client answers with the first offered dialect it knows, as a bare string."""
        client = _Collector()
        transport = self.connected(client)
        self.assertEqual(transport.value(), b"")
        client.dataReceived(encode([b"future", b"none", b"pb"]))
        self.assertEqual(transport.value(), encode(b"none"))
        self.assertEqual(client.currentDialect, b"none")
        self.assertEqual(client.ready, 1)

    def test_negotiationThroughSendEncoded(self) -> None:
        """The dialects offered and the one chosen go through sendEncoded, as in Twisted,
        so a subclass that overrides it (to count or record what it sends) sees them."""
        for module in (banana, twistedBanana):

            class Recording(module.Banana):  # type: ignore[name-defined, misc]
                def __init__(self, isClient: bool) -> None:
                    super().__init__(isClient)
                    self.sent: list[Any] = []

                def sendEncoded(self, expression: Any) -> None:
                    self.sent.append(expression)
                    super().sendEncoded(expression)

                def expressionReceived(self, expression: Any) -> None:
                    pass

            server = Recording(False)
            serverTransport = self.connected(server)
            client = Recording(True)
            self.connected(client)
            client.dataReceived(serverTransport.value())
            self.assertEqual(server.sent, [[b"pb", b"none"]], module)
            self.assertEqual(client.sent, [b"pb"], module)

    def test_negotiationAndFirstMessageInOneRead(self) -> None:
        """A dialect choice followed by a 'pb' message in the same read is decoded right."""
        server = _Collector(isClient=False)
        self.connected(server)
        server.dataReceived(encode(b"pb") + encode([b"version", 6], b"pb"))
        self.assertEqual(server.currentDialect, b"pb")
        self.assertEqual(server.received, [[b"version", 6]])
        self.assertEqual(server.ready, 1)

    def test_greetingInPieces(self) -> None:
        """A dialect offer that arrives a byte at a time is answered once whole, not before."""
        client = _Collector()
        transport = self.connected(client)
        offer = encode([b"none", b"pb"])
        for byte in offer[:-1]:
            client.dataReceived(bytes((byte,)))
        self.assertEqual((transport.value(), client.currentDialect), (b"", None))
        client.dataReceived(offer[-1:])
        self.assertEqual((transport.value(), client.currentDialect), (encode(b"none"), b"none"))

    def test_nothingDeliveredAfterADrop(self) -> None:
        """Once a handler drops the connection, the expressions left in the same read are not
        delivered; the connection is closed even by a transport without abortConnection."""

        class Closing:
            closed = 0

            def write(self, data: bytes) -> None:
                pass

            def loseConnection(self) -> None:
                self.closed += 1

        class Dropping(_Collector):
            def expressionReceived(self, expression: Any) -> None:
                super().expressionReceived(expression)
                self._fail("enough")

        server = Dropping(isClient=False)
        transport = Closing()
        server.makeConnection(transport)  # type: ignore[arg-type]
        with capturedLogs() as events:
            server.dataReceived(encode(b"none") + encode(1) + encode(2))
        self.assertEqual(server.received, [1])
        self.assertEqual(transport.closed, 1)
        self.assertEqual([event.get("why") for event in events], ["enough"])

    def test_setPrefixLimitBeforeConnecting(self) -> None:
        """The prefix limit may be set before the connection is made, and then applies; it
        must be at least 1."""
        protocol = _Collector()
        protocol.setPrefixLimit(2)
        self.assertRaises(ValueError, protocol.setPrefixLimit, 0)
        self.connected(protocol)
        self.assertEqual((protocol.prefixLimit, protocol._decoder.prefixLimit), (2, 2))

    def test_expressionReceivedMustBeImplemented(self) -> None:
        """The base protocol says which method a subclass must write."""
        with self.assertRaises(NotImplementedError) as caught:
            Banana().expressionReceived(1)
        self.assertEqual(str(caught.exception), "Banana must implement expressionReceived")

    def test_sendEncodedUsesDialect(self) -> None:
        """After negotiation sendEncoded writes in the chosen dialect."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"pb"))
        transport.clear()
        server.sendEncoded([b"version", 6])
        self.assertEqual(transport.value(), h("02 80 13 87 06 81"))

    def test_sendEncodedRefusesAndWritesNothing(self) -> None:
        """An unsendable value raises and leaves the transport untouched."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        transport.clear()
        with self.assertRaises(BananaEncodeError):
            server.sendEncoded([1, "text"])
        self.assertEqual(transport.value(), b"")

    def test_unknownChoiceDropsConnection(self) -> None:
        """A server aborts a connection whose client chose a dialect it did not offer."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        with capturedLogs() as events:
            server.dataReceived(encode(b"klingon"))
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(server.currentDialect)
        self.assertEqual(len(events), 1)
        self.assertIn("did not offer", events[0]["why"])
        self.assertIn("klingon", events[0]["why"])
        server.dataReceived(encode(b"pb"))
        self.assertIsNone(server.currentDialect)

    def test_noCommonDialectDropsConnection(self) -> None:
        """A client that knows none of the offered dialects disconnects."""
        client = _Collector()
        transport = self.connected(client)
        client.dataReceived(encode([b"future"]))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_garbageDropsConnection(self) -> None:
        """Malformed bytes abort the connection; no exception escapes dataReceived."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"pb") + encode([b"ok"], b"pb") + h("05 99"))
        self.assertEqual(server.received, [[b"ok"]])
        self.assertTrue(transport.disconnecting)
        server.dataReceived(encode([b"more"], b"pb"))
        self.assertEqual(server.received, [[b"ok"]])

    def test_garbageDuringNegotiation(self) -> None:
        """Bad bytes right after the dialect choice abort before anything is delivered."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"pb") + h("99"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(server.received, [])

    def test_applicationSendErrorPropagates(self) -> None:
        """An unsendable reply is the application's error: it propagates, the link stays."""

        class Replier(_Collector):
            def expressionReceived(self, expression: Any) -> None:
                self.sendEncoded(["text is not bytes"])

        server = Replier(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"pb"))
        with self.assertRaises(BananaEncodeError):
            server.dataReceived(encode([1], b"pb"))
        self.assertFalse(transport.disconnecting)

    def test_handlerErrorAfterGarbageStillDrops(self) -> None:
        """If a handler fails on an expression recovered before garbage, the link drops."""

        class Failing(_Collector):
            def expressionReceived(self, expression: Any) -> None:
                raise RuntimeError("handler bug")

        server = Failing(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"pb"))
        with self.assertRaises(RuntimeError):
            server.dataReceived(encode([1], b"pb") + h("99"))
        self.assertTrue(transport.disconnecting)

    def test_vocabBeforeNegotiation(self) -> None:
        """VOCAB tokens are refused until the 'pb' dialect has been chosen."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        server.dataReceived(h("13 87"))
        self.assertTrue(transport.disconnecting)

    def test_limitsApply(self) -> None:
        """The class attributes set the limits of each connection."""

        class Small(_Collector):
            sizeLimit = 10

        server = Small(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"none") + encode(b"x" * 11))
        self.assertTrue(transport.disconnecting)
        with self.assertRaises(BananaEncodeError):
            server.sendEncoded(b"x" * 11)

    def test_setPrefixLimit(self) -> None:
        """setPrefixLimit changes this connection's decoding and encoding limits."""
        server = _Collector(isClient=False)
        transport = self.connected(server)
        server.dataReceived(encode(b"none"))
        server.setPrefixLimit(2)
        with self.assertRaises(BananaEncodeError):
            server.sendEncoded(2**14)
        server.dataReceived(h("7f 7f 81"))
        self.assertEqual(server.received, [2**14 - 1])
        server.dataReceived(h("00 00 01 81"))
        self.assertTrue(transport.disconnecting)
        with self.assertRaises(ValueError):
            server.setPrefixLimit(0)

    def test_moduleSetPrefixLimit(self) -> None:
        """The module-level setPrefixLimit sets the default for new connections."""
        self.addCleanup(banana.setPrefixLimit, banana.PREFIX_LIMIT)
        banana.setPrefixLimit(3)
        server = _Collector(isClient=False)
        self.connected(server)
        self.assertEqual(server.prefixLimit, 3)
        with self.assertRaises(ValueError):
            banana.setPrefixLimit(0)

        class Strict(_Collector):
            prefixLimit = 2

        strict = Strict(isClient=False)
        self.connected(strict)
        self.assertEqual(strict.prefixLimit, 2)

    def test_publicSurface(self) -> None:
        """The names of twisted.spread.banana's public surface exist here."""
        for name in ("encode", "decode", "setPrefixLimit", "SIZE_LIMIT", "BananaError"):
            self.assertTrue(hasattr(banana, name), name)
        for name in banana.__all__:
            self.assertTrue(hasattr(banana, name), name)
        for name in (
            "knownDialects",
            "isClient",
            "sendEncoded",
            "expressionReceived",
            "connectionReady",
            "setPrefixLimit",
            "sizeLimit",
            "outgoingVocabulary",
            "incomingVocabulary",
        ):
            self.assertTrue(hasattr(Banana(), name), name)
        self.assertEqual(banana.SIZE_LIMIT, twistedBanana.SIZE_LIMIT)
        self.assertEqual(Banana.knownDialects, twistedBanana.Banana.knownDialects)
        self.assertEqual(Banana.outgoingVocabulary, twistedBanana.Banana.outgoingVocabulary)
        self.assertEqual(Banana.incomingVocabulary, twistedBanana.Banana.incomingVocabulary)


class TwistedInteropTests(SynchronousTestCase):
    """
    A pbroker Banana and a stock Twisted Banana, connected in memory, in both roles.
    """

    EXPRESSIONS: list[Any] = [
        [b"version", 6],
        [b"message", 1, b"root", b"login", 1, [b"tuple", b"user"], [b"dictionary"]],
        [1, -1, 2**31, -(2**31) - 1, 2**400, 1.25, b"", b"list", [[], [b"x" * 70000]]],
    ]

    def exchange(self, server: Any, client: Any) -> None:
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client)
        )
        self.assertEqual(server.currentDialect, b"pb")
        self.assertEqual(client.currentDialect, b"pb")
        for expression in self.EXPRESSIONS:
            server.sendEncoded(expression)
            client.sendEncoded(expression)
        pump.flush()
        self.assertEqual(server.received, self.EXPRESSIONS)
        self.assertEqual(client.received, self.EXPRESSIONS)

    def test_pbrokerServerTwistedClient(self) -> None:
        """A stock Twisted client negotiates 'pb' with a pbroker server and both exchange."""
        self.exchange(_Collector(isClient=False), _TwistedCollector(isClient=1))

    def test_twistedServerPbrokerClient(self) -> None:
        """A pbroker client negotiates 'pb' with a stock Twisted server and both exchange."""
        self.exchange(_TwistedCollector(isClient=0), _Collector(isClient=True))


class _PurePython:
    """
    Run a test class with the pure-Python scan, whether or not the C one is built.
    """

    def setUp(self) -> None:
        self.patch(banana, "_scan", banana._scanPython)  # type: ignore[attr-defined]
        super().setUp()  # type: ignore[misc]


class PureDecodeTests(_PurePython, DecodeTests):
    """DecodeTests with the pure-Python scan."""


class PureTextTests(_PurePython, TextTests):
    """TextTests with the pure-Python scan."""


class PureDecodeErrorTests(_PurePython, DecodeErrorTests):
    """DecodeErrorTests with the pure-Python scan."""


class AcceleratorTests(SynchronousTestCase):
    """
    Which scan is in use, and what the C one does with arguments banana.py never passes.
    """

    def test_choice(self) -> None:
        """The C scan is used when built, unless PBROKER_PURE_PYTHON is set."""
        self.patch(_accelerator.os, "environ", {"PBROKER_PURE_PYTHON": "1"})
        self.assertIsNone(_accelerator.load())
        self.assertIs(banana._loadScan(None), banana._scanPython)
        self.patch(_accelerator.os, "environ", {"PBROKER_PURE_PYTHON": ""})
        try:
            from pbroker import _speedups
        except ImportError:
            self.assertIsNone(_accelerator.load())
        else:
            self.assertIs(_accelerator.load(), _speedups)
            self.assertIs(banana._loadScan(_speedups), _speedups.scan)

    def test_sharedTokens(self) -> None:
        """getTokens gives one object per dialect and limits, however they are passed (the
        fused encoder keeps its C leaf writer on it)."""
        self.assertIs(
            banana.getTokens(b"pb", sizeLimit=100, prefixLimit=3), banana.getTokens(b"pb", 100, 3)
        )
        self.assertIs(banana.getTokens(), banana.getTokens(b"none", banana.SIZE_LIMIT))

    def test_hugeSizeLimit(self) -> None:
        """A sizeLimit beyond the C scan's ceiling is honoured exactly (in Python)."""
        decoder = Decoder(sizeLimit=2**70)
        self.assertEqual(decoder.feed(h("00 00 00 00 00 00 00 00 00 08 80")), [])
        self.assertTrue(decoder.midExpression)
        self.assertEqual(decoder._remaining, 2**66)

    def test_badArguments(self) -> None:
        """The C scan refuses wrong arguments with TypeError or ValueError, never a crash."""
        try:
            from pbroker._speedups import scan
        except ImportError:
            raise SkipTest("pbroker._speedups is not built") from None
        good: list[Any] = [b"\x01\x81", 0, 0, None, 10, 64, 10, None, False, None, 0, [], -1, []]
        self.assertEqual(scan(*good), (2, None, 0, 2, None))
        self.assertEqual(good[-1], [1])
        for index, bad, error in [
            (0, 5, TypeError),
            (1, 3, ValueError),
            (1, -1, ValueError),
            (3, [], TypeError),
            (9, (), TypeError),
            (11, None, TypeError),
            (13, (), TypeError),
        ]:
            arguments = list(good)
            arguments[index] = bad
            self.assertRaises(error, scan, *arguments)
        self.assertRaises(TypeError, scan, *good[:-1])
        # A malformed parents list is refused when the scan gets to it.
        arguments = list(good)
        arguments[0], arguments[9], arguments[10], arguments[11] = b"\x01\x81", [], 1, [5]
        self.assertRaises(TypeError, scan, *arguments)


class PlainArgumentTests(SynchronousTestCase):
    """
    What the C builder of plain expressions does with arguments the unjellier never passes.
    """

    def test_badArguments(self) -> None:
        """Wrong arguments raise TypeError; a node that is not a list is simply not plain."""
        if _accelerator.speedups is None:
            raise SkipTest("pbroker._speedups is not in use")
        plain = _accelerator.speedups.plain
        self.assertEqual(plain([b"list", 1], 1, None, None), [1])
        self.assertIs(plain((b"list", 1), 1, None, None), NotImplemented)
        self.assertRaises(TypeError, plain, [b"list"], 1, None)
        self.assertRaises(TypeError, plain, [b"list"], "1", None, None)
        self.assertRaises(TypeError, plain, [b"list"], 1, None, [])


class LeavesTests(SynchronousTestCase):
    """
    The C leaf writer the fused jelly encoder wraps its iterators in (its output is compared
    with the pure-Python encoder's by tests/test_fuzz.py EncoderFuzzTests).
    """

    def setUp(self) -> None:
        if _accelerator.speedups is None:
            raise SkipTest("pbroker._speedups is not in use")
        self.Leaves = _accelerator.speedups.Leaves
        self.pair = object()
        tokens = banana.getTokens(b"pb")
        self.leaves = self.Leaves(
            tokens.symbols, 0x200000, 0x400, b"U", b"N", b"T", b"F", self.pair
        )

    def test_runsAndRest(self) -> None:
        """Each run of leaves becomes one chunk, written before the item that ends it."""
        chunks: list[Any] = [b"start"]
        other = object()
        items = [1, "a", self.pair, b"list", None, other, True, False, 2.5, [3]]
        rest = list(self.leaves(items, chunks))
        self.assertEqual(rest, [other, [3]])
        self.assertEqual(
            chunks,
            [
                b"start",
                h("01 81") + b"U" + h("01 82") + b"a" + h("02 80 08 87") + b"N",
                b"T" + b"F" + h("84") + struct.pack(">d", 2.5),
            ],
        )

    def test_leftForPython(self) -> None:
        """What the fast path does not cover is passed on untouched, in order."""
        big, negative, long = 0x200000, -1, "x" * 0x400

        class Text(str):
            pass

        items = [big, negative, long, long.encode(), Text("t"), 2**70]
        chunks: list[Any] = []
        self.assertEqual(list(self.leaves(items, chunks)), items)
        self.assertEqual(chunks, [])

    def test_textEncodings(self) -> None:
        """Non-ASCII text goes out as UTF-8; a lone surrogate raises UnicodeEncodeError."""
        chunks: list[Any] = []
        self.assertEqual(list(self.leaves(["\u00e9", "list"], chunks)), [])
        self.assertEqual(chunks, [b"U" + h("02 82") + "\u00e9".encode() + b"U" + h("08 87")])
        self.assertRaises(UnicodeEncodeError, list, self.leaves(["\udc80"], []))

    def test_badArguments(self) -> None:
        """Wrong arguments raise TypeError or ValueError."""
        good: list[Any] = [{}, 10, 10, b"", b"", b"", b"", None]
        self.Leaves(*good)
        for index, bad, error in [
            (0, [], TypeError),
            (0, {"a": b""}, TypeError),
            (1, -1, ValueError),
            (2, 2**20, ValueError),
            (3, "", TypeError),
        ]:
            arguments = list(good)
            arguments[index] = bad
            self.assertRaises(error, self.Leaves, *arguments)
        self.assertRaises(TypeError, self.Leaves, *good, extra=1)
        self.assertRaises(TypeError, self.leaves, [1], ())
        self.assertRaises(TypeError, self.leaves, 5, [])
        self.assertRaises(TypeError, type(self.leaves([], [])))

    def test_noReferenceLeak(self) -> None:
        """Iterators come and go without leaving references to their type behind."""
        iteratorType = type(self.leaves([], []))
        gc.collect()  # (iterators other tests left in cycles)
        before = sys.getrefcount(iteratorType)
        for _ in range(100):
            list(self.leaves([[1]], []))
        gc.collect()
        self.assertEqual(sys.getrefcount(iteratorType), before)

    def test_reentrantSource(self) -> None:
        """A source that drives the same iterator from inside its next() cannot crash it."""
        calls = []

        class Source:
            def __iter__(self) -> Source:
                return self

            def __next__(self) -> int:
                calls.append(1)
                if len(calls) == 1:
                    for _ in iterator:
                        pass
                    return 1
                raise StopIteration

        iterator = self.leaves(Source(), [])
        self.assertEqual(list(iterator), [])

    def test_collectedInCycles(self) -> None:
        """A writer in a reference cycle (through its pair marker) is collected."""

        class Pair:
            leaves: Any = None

        pair = Pair()
        pair.leaves = self.Leaves({}, 1, 1, b"", b"", b"", b"", pair)
        gone = weakref.ref(pair)
        del pair
        gc.collect()
        self.assertIsNone(gone())

    def test_errorsFromTheSource(self) -> None:
        """An error raised by the iterable reaches the caller (the encoding fails whole)."""

        def source() -> Any:
            yield 1
            raise ZeroDivisionError()

        chunks: list[Any] = []
        self.assertRaises(ZeroDivisionError, list, self.leaves(source(), chunks))
        self.assertEqual(chunks, [])


class PrefixHelperTests(SynchronousTestCase):
    def test_sameAsTwisted(self) -> None:
        """int2b128, b1282int, HIGH_BIT_SET and the type bytes are Twisted's, for code that
        used them."""
        for value in (0, 1, 127, 128, 300, 2**64 + 5):
            ours: list[bytes] = []
            theirs: list[bytes] = []
            banana.int2b128(value, ours.append)
            twistedBanana.int2b128(value, theirs.append)
            self.assertEqual(ours, theirs)
            self.assertEqual(banana.b1282int(b"".join(ours)), value)
            self.assertEqual(twistedBanana.b1282int(b"".join(ours)), value)
        self.assertEqual(banana.HIGH_BIT_SET, twistedBanana.HIGH_BIT_SET)
        for name in ("LIST", "INT", "STRING", "NEG", "FLOAT", "LONGINT", "LONGNEG", "VOCAB"):
            self.assertEqual(getattr(banana, name), getattr(twistedBanana, name), name)
        with self.assertRaises(ValueError):
            banana.int2b128(-1, ours.append)

    def test_typeBytesWriteTokens(self) -> None:
        """The type bytes are one-byte strings, as in Twisted, so code that writes its own
        tokens with int2b128 and them writes what the codec decodes."""
        written = io.BytesIO()
        banana.int2b128(2, written.write)
        written.write(banana.LIST)
        banana.int2b128(5, written.write)
        written.write(banana.STRING)
        written.write(b"hello")
        banana.int2b128(7, written.write)
        written.write(banana.NEG)
        self.assertEqual(banana.decode(written.getvalue()), [b"hello", -7])


class _Index:
    """
    An integer that is not an int (as a numpy integer is): it has ``__index__``.
    """

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value
