"""
Tests of the transport wrapper a broker writes through: the answers to the messages of one
read leave in one write, and holding them changes nothing that pacing and closing promise.
"""

from __future__ import annotations

from typing import Any

import msgpack
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pbroker import _native, banana, pb
from pbroker._pacing import HOLD_LIMIT, PacedTransport
from pbroker.broker import NATIVE_DIALECT


class CountingTransport(StringTransport):
    """
    A string transport that remembers each write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Root(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value


class FakeBroker:
    def __init__(self) -> None:
        self.limits = pb.BrokerLimits()
        self.resumed = 0

    def transportResumed(self) -> None:
        self.resumed += 1


class PacedTransportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.real = CountingTransport()
        self.paced = PacedTransport(self.real, FakeBroker())

    def test_heldWritesLeaveAsOne(self) -> None:
        """Writes made while holding reach the transport once, joined, on release."""
        self.assertTrue(self.paced.hold())
        self.assertFalse(self.paced.hold())  # nested: the outer holder releases
        for chunk in (b"a", b"bc", b"def"):
            self.paced.write(chunk)
        self.assertEqual(self.real.writes, [])
        self.assertEqual(self.paced.written, 6)
        self.paced.release()
        self.assertEqual(self.real.writes, [b"abcdef"])
        self.paced.write(b"g")  # no longer holding
        self.assertEqual(self.real.writes, [b"abcdef", b"g"])

    def test_heldUpToTheLimit(self) -> None:
        """Held bytes are passed on when they reach HOLD_LIMIT, and a large write is never
        held (what was held before it goes first)."""
        self.paced.hold()
        half = b"x" * (HOLD_LIMIT // 2)
        self.paced.write(half)
        self.paced.write(half)
        self.assertEqual(self.real.writes, [half + half])
        self.paced.write(b"y")
        large = b"z" * HOLD_LIMIT
        self.paced.write(large)
        self.assertEqual(self.real.writes, [half + half, b"y", large])
        self.paced.release()
        self.assertEqual(len(self.real.writes), 3)

    def test_closingWhileHolding(self) -> None:
        """loseConnection() sends what was held first; abortConnection() discards it, as it
        discards what the transport still buffers."""
        self.paced.hold()
        self.paced.write(b"kept")
        self.paced.loseConnection()
        self.assertEqual(self.real.value(), b"kept")
        self.assertTrue(self.real.disconnecting)

        real = CountingTransport()
        paced = PacedTransport(real, FakeBroker())
        paced.hold()
        paced.write(b"dropped")
        paced.abortConnection()
        paced.release()
        self.assertEqual(real.writes, [])

    def test_writeSequenceKeepsOrder(self) -> None:
        """A sequence written while holding goes after what was held."""
        self.paced.hold()
        self.paced.write(b"1")
        self.paced.writeSequence([b"2", b"3"])
        self.paced.write(b"4")
        self.paced.release()
        self.assertEqual(self.real.value(), b"1234")

    def test_pausedAccountingOnRelease(self) -> None:
        """Bytes held while the transport is paused count against bufferedBytes when they
        are passed on."""
        self.paced.pauseProducing()
        self.paced.hold()
        self.paced.write(b"x" * 100)
        self.assertEqual(self.paced.bufferedWhilePaused, 0)
        self.paced.release()
        self.assertEqual(self.paced.bufferedWhilePaused, 100)


class OneWritePerReadTests(SynchronousTestCase):
    """
    A broker that receives several calls in one read answers them in one write, in order,
    in either dialect.
    """

    def connect(self, dialect: bytes) -> tuple[Any, CountingTransport]:
        factory = pb.PBServerFactory(Root())
        broker = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = CountingTransport()
        broker.makeConnection(transport)
        broker.dataReceived(banana.encode(dialect))
        transport.writes.clear()
        transport.clear()
        return broker, transport

    def test_pbDialect(self) -> None:
        broker, transport = self.connect(b"pb")
        calls = b"".join(
            banana.encode(
                [b"message", i, b"root", b"echo", 1, [b"tuple", i * 10], [b"dictionary"]], b"pb"
            )
            for i in (1, 2, 3)
        )
        broker.dataReceived(calls)
        self.assertEqual(len(transport.writes), 1)
        answers = banana.Decoder(b"pb").feed(transport.value())
        self.assertEqual(answers, [[b"answer", i, i * 10] for i in (1, 2, 3)])

    def test_nativeDialect(self) -> None:
        broker, transport = self.connect(NATIVE_DIALECT)
        calls = b"".join(
            _native.records(
                [b"message", i, b"root", b"echo", 1, msgpack.packb([i * 10]), _native.EMPTY_MAP]
            )[0]
            for i in (1, 2, 3)
        )
        broker.dataReceived(calls)
        self.assertEqual(len(transport.writes), 1)
        answers = _native.FrameDecoder(None).feed(transport.value())
        self.assertEqual(
            [(kind, i, msgpack.unpackb(value)) for kind, i, value in answers],
            [(b"answer", i, i * 10) for i in (1, 2, 3)],
        )

    def test_oneCallOneWrite(self) -> None:
        """A read with one call is answered as before: one write."""
        broker, transport = self.connect(NATIVE_DIALECT)
        call = [b"message", 1, b"root", b"echo", 1, msgpack.packb([5]), _native.EMPTY_MAP]
        broker.dataReceived(_native.records(call)[0])
        self.assertEqual(len(transport.writes), 1)
