"""
Tests of the transport wrapper a broker writes through: the answers to the messages of one
read leave in one write, and holding them changes nothing that pacing and closing promise.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

import msgpack
from twisted.internet import defer, main, reactor, task
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols import policies
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pbroker import _native, _pacing, banana, pb
from pbroker._keepalive import Keepalive, KeepaliveTimer
from pbroker._pacing import HOLD_LIMIT, LARGE_CHUNK, PacedTransport, _pendingIn
from pbroker.broker import _FLUSH_EVERY, NATIVE_DIALECT
from tests.test_closing import nativePeers, unreadAnswer


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


class SocketTransport(FileDescriptor):
    """
    A Twisted file descriptor transport over a fake socket: like TCP's, it buffers what is
    written until its ``doWrite`` runs, and the reactor (a MemoryReactor) records whether it
    is registered as a writer.

    :ivar sent: what each ``doWrite`` sent, in order.
    :ivar failure: what the socket's send returns instead of a count, if set.
    """

    def __init__(self) -> None:
        self.memoryReactor = MemoryReactor()
        super().__init__(self.memoryReactor)
        self.connected = 1
        self.sent: list[bytes] = []
        self.failure: Exception | None = None
        #: The most one send takes, if set.
        self.limit: int | None = None
        #: How many times the transport registered as a writer.
        self.registrations = 0
        self.startReading()

    def startWriting(self) -> None:
        self.registrations += 1
        super().startWriting()

    def writeSomeData(self, data: bytes) -> int | Exception:
        if self.failure is not None:
            return self.failure
        taken = bytes(data[: self.limit])
        self.sent.append(taken)
        return len(taken)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8789)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 1)

    def buffered(self) -> bytes:
        return bytes(self.dataBuffer[self.offset :]) + b"".join(self._tempDataBuffer)

    def isWriter(self) -> bool:
        return self in self.memoryReactor.getWriters()

    def isReader(self) -> bool:
        return self in self.memoryReactor.getReaders()


class Root(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value


def serveOn(transport: Any, dialect: bytes) -> Any:
    """
    A server broker (its root echoes) connected on ``transport``, the client having chosen
    ``dialect``.
    """
    broker = pb.PBServerFactory(Root()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    broker.makeConnection(transport)
    broker.dataReceived(banana.encode(dialect))
    return broker


class FakeBroker:
    overflowing = False

    def __init__(self) -> None:
        self.limits = pb.BrokerLimits()
        self.resumed = 0
        self.discarded = 0

    def discardBacklog(self) -> None:
        self.discarded += 1

    def waitingForPeer(self) -> int:
        return 0  # no large message waits

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

    def test_theWriteThatFillsTheConnectionIsTaken(self) -> None:
        """A write during which the real transport pauses its producer (it filled the
        connection, as Twisted's file descriptors do within write) was taken: it does not
        count against bufferedBytes; the writes after it, while paused, do. Also through
        hold/release and writeSequence."""
        paced = self.paced
        original = self.real.write

        def pausingWrite(data: bytes) -> None:
            original(data)
            paced.pauseProducing()

        def pausingWriteSequence(data: list[bytes]) -> None:
            pausingWrite(b"".join(data))

        self.real.write = pausingWrite  # type: ignore[method-assign]
        self.real.writeSequence = pausingWriteSequence  # type: ignore[method-assign]
        paced.write(b"x" * 300)
        self.assertEqual(paced.bufferedWhilePaused, 0)
        paced.write(b"y" * 20)
        self.assertEqual(paced.bufferedWhilePaused, 20)
        for send in (
            lambda: paced.writeSequence([b"a" * 7, b"b" * 3]),
            lambda: (paced.hold(), paced.write(b"c" * 10), paced.release()),
        ):
            paced.resumeProducing()
            send()
            self.assertEqual(paced.bufferedWhilePaused, 0)
            send()
            self.assertEqual(paced.bufferedWhilePaused, 10)


class FlushTests(SynchronousTestCase):
    """
    flush() passes on what is held and, on a Twisted file descriptor transport, has it sent
    at once, unless the reactor must see to it.
    """

    def setUp(self) -> None:
        self.real = SocketTransport()
        self.paced = PacedTransport(self.real, FakeBroker())

    def test_sentAtOnce(self) -> None:
        """Held bytes are sent by flush(), and the transport stops waiting to write."""
        self.paced.hold()
        self.paced.write(b"first")
        self.paced.flush()
        self.assertEqual(self.real.sent, [b"first"])
        self.assertFalse(self.real.isWriter())
        self.paced.write(b"second")
        self.paced.release()
        self.assertEqual(self.real.sent, [b"first"])  # the reactor sends the rest, as usual
        self.assertEqual(self.real.buffered(), b"second")
        self.assertTrue(self.real.isWriter())

    def test_idleTransportNeverRegistered(self) -> None:
        """Held bytes a transport with nothing buffered would only buffer go straight to its
        socket: it never registers as a writer (and unregisters again)."""
        self.paced.hold()
        self.paced.write(b"one ")
        self.paced.write(b"two")
        self.paced.flush()
        self.assertEqual(self.real.sent, [b"one two"])
        self.assertEqual(self.real.registrations, 0)
        self.paced.release()

    def test_partlySent(self) -> None:
        """What the socket does not take at once is buffered and sent the transport's way,
        in order."""
        self.real.limit = 3
        self.paced.hold()
        self.paced.write(b"abcdefgh")
        self.paced.flush()
        self.assertEqual(self.real.sent, [b"abc", b"def"])  # at once, then by doWrite
        self.assertEqual(self.real.buffered(), b"gh")
        self.assertTrue(self.real.isWriter())  # the reactor sends the rest
        self.paced.release()

    def test_behindBufferedBytes(self) -> None:
        """Held bytes never overtake bytes the transport still buffers."""
        self.real.write(b"earlier ")
        self.paced.hold()
        self.paced.write(b"held")
        self.paced.flush()
        self.assertEqual(self.real.sent, [b"earlier held"])
        self.paced.release()

    def test_startedTLS(self) -> None:
        """On a transport with TLS started (TCP's startTLS), bytes go through its write,
        which encrypts them; never straight to the socket."""
        self.real.TLS = True  # type: ignore[attr-defined]
        self.paced.hold()
        self.paced.write(b"secret")
        self.paced.flush()
        self.assertEqual(self.real.registrations, 1)
        self.paced.release()

    def test_pausedOrClosing(self) -> None:
        """While the transport is paused, or closing, flush() only passes the bytes on."""
        self.paced.pauseProducing()
        self.paced.hold()
        self.paced.write(b"paused")
        self.paced.flush()
        self.assertEqual((self.real.sent, self.real.buffered()), ([], b"paused"))
        self.assertEqual(self.paced.bufferedWhilePaused, 6)
        self.paced.release()

        for state in ("disconnecting", "connected"):
            real = SocketTransport()
            paced = PacedTransport(real, FakeBroker())
            paced.write(b"closing")  # not held: in the transport's buffer
            setattr(real, state, not getattr(real, state))
            paced.flush()
            self.assertEqual((real.sent, real.buffered()), ([], b"closing"))

    def test_failedSendLeftToTheReactor(self) -> None:
        """A send that fails raises nothing in flush(): the transport stays registered as a
        writer and stops reading, so the reactor reports the connection lost (see
        ResetPeerTests for the real thing)."""
        self.real.failure = main.CONNECTION_LOST
        self.paced.hold()
        self.paced.write(b"lost")
        self.paced.flush()
        self.assertEqual(self.real.sent, [])
        self.assertTrue(self.real.isWriter())
        self.assertFalse(self.real.isReader())

    def test_failedSendOfNothingLeftToTheReactor(self) -> None:
        """A flush() with nothing held or buffered (the messages of a read answered nothing)
        leaves the transport as the reactor watches it, even if a send would fail now (the
        peer reset the connection): a transport that neither reads nor writes is never
        polled again, and its connection would never be reported lost."""
        self.real.failure = main.CONNECTION_LOST
        self.paced.hold()
        self.paced.flush()
        self.assertTrue(self.real.isReader() or self.real.isWriter())
        self.paced.release()

    def test_halfClosed(self) -> None:
        """After loseWriteConnection() the reactor sends what is buffered, then half-closes;
        flush() does not (writes after the half-close would be dropped)."""
        self.real.loseWriteConnection()
        self.paced.hold()
        self.paced.write(b"before")
        self.paced.flush()
        self.paced.write(b"after")
        self.paced.release()
        self.assertEqual((self.real.sent, self.real.buffered()), ([], b"beforeafter"))

    def test_otherProducer(self) -> None:
        """Once another producer is registered on the real transport, flush() leaves the
        sending to the reactor, which alone may resume that producer."""

        class Producer:
            resumed = 0

            def resumeProducing(self) -> None:
                self.resumed += 1

            def pauseProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        producer = Producer()
        self.real.unregisterProducer()
        self.real.registerProducer(producer, False)  # a pull producer: resumed at once
        self.paced.hold()
        self.paced.write(b"data")
        self.paced.flush()
        self.assertEqual((self.real.sent, self.real.buffered()), ([], b"data"))
        self.assertEqual(producer.resumed, 1)

    def test_otherTransports(self) -> None:
        """A transport that is not a file descriptor is passed the held bytes."""
        real = CountingTransport()
        paced = PacedTransport(real, FakeBroker())
        paced.hold()
        paced.write(b"a")
        paced.write(b"b")
        paced.flush()
        self.assertEqual(real.writes, [b"ab"])
        paced.write(b"c")
        paced.release()
        self.assertEqual(real.writes, [b"ab", b"c"])


class LargeChunkTests(SynchronousTestCase):
    """
    A file descriptor transport sends up to LARGE_CHUNK bytes per turn, and reads that much
    at a time while the broker says a large message arrives.
    """

    def test_sendLimit(self) -> None:
        real = SocketTransport()
        self.assertLess(real.SEND_LIMIT, LARGE_CHUNK)
        PacedTransport(real, FakeBroker())
        self.assertEqual(real.SEND_LIMIT, LARGE_CHUNK)
        self.assertLess(SocketTransport().SEND_LIMIT, LARGE_CHUNK)  # per transport

    def test_readLarge(self) -> None:
        real = SocketTransport()
        usual = real.bufferSize
        paced = PacedTransport(real, FakeBroker())
        paced.readLarge(True)
        self.assertEqual(real.bufferSize, LARGE_CHUNK)
        paced.readLarge(False)
        self.assertEqual(real.bufferSize, usual)

    def test_otherTransports(self) -> None:
        """A transport that is not a file descriptor is left as it is."""
        real = CountingTransport()
        paced = PacedTransport(real, FakeBroker())
        paced.readLarge(True)
        self.assertFalse(hasattr(real, "bufferSize") or hasattr(real, "SEND_LIMIT"))

    def test_brokerReadsLargeMessagesInLargeChunks(self) -> None:
        """The broker raises the read size from a large message's first record to its last,
        whole records between them keep it, and a small message does not change it."""
        real = SocketTransport()
        usual = real.bufferSize
        broker = serveOn(real, NATIVE_DIALECT)
        call = [b"message", 1, b"root", b"echo", 0, _native.Packed(b"x" * 600_000), b"\x80"]
        fragments = _native.records(call)
        small = _native.records([b"message", 2, b"root", b"echo", 0, b"\x91\x01", b"\x80"])[0]
        self.assertEqual(len(fragments), 3)
        sizes = []
        for data in (small, fragments[0][:5000], fragments[0][5000:], small, fragments[1]):
            broker.dataReceived(data)
            sizes.append(real.bufferSize)
        broker.dataReceived(fragments[2])
        sizes.append(real.bufferSize)
        self.assertEqual(sizes, [usual] + [LARGE_CHUNK] * 4 + [usual])


class OneWritePerReadTests(SynchronousTestCase):
    """
    A broker that receives several calls in one read answers them in one write, in order,
    in either dialect.
    """

    def connect(self, dialect: bytes) -> tuple[Any, CountingTransport]:
        transport = CountingTransport()
        broker = serveOn(transport, dialect)
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


class LongRunTests(SynchronousTestCase):
    """
    What handling a read writes is sent before dataReceived returns; a read with more than
    _FLUSH_EVERY calls is answered in writes of _FLUSH_EVERY answers, each sent as soon as it
    is made, in order, in either dialect.
    """

    count = 2 * _FLUSH_EVERY + 20

    def connect(self, dialect: bytes) -> tuple[Any, SocketTransport]:
        transport = SocketTransport()
        broker = serveOn(transport, dialect)  # the offer leaves with what the choice writes
        self.assertEqual(transport.buffered(), b"")
        transport.sent.clear()
        return broker, transport

    def nativeCall(self, i: int, answer: int = 1) -> bytes:
        call = [b"message", i, b"root", b"echo", answer, msgpack.packb([i]), _native.EMPTY_MAP]
        return _native.records(call)[0]

    def nativeAnswers(self, data: bytes) -> list[int]:
        answers = _native.FrameDecoder(None).feed(data)
        self.assertEqual({kind for kind, _, _ in answers}, {b"answer"})
        self.assertEqual([i for _, i, _ in answers], [msgpack.unpackb(v) for _, _, v in answers])
        return [i for _, i, _ in answers]

    def test_oneCall(self) -> None:
        """The answer to a read with one call is sent at once, not on the reactor's turn."""
        broker, transport = self.connect(NATIVE_DIALECT)
        broker.dataReceived(self.nativeCall(7))
        self.assertEqual([self.nativeAnswers(chunk) for chunk in transport.sent], [[7]])
        self.assertFalse(transport.isWriter())

    def test_nothingWritten(self) -> None:
        """A read that writes nothing (a one-way call) sends nothing."""
        broker, transport = self.connect(NATIVE_DIALECT)
        broker.dataReceived(self.nativeCall(7, answer=0))
        self.assertEqual(transport.sent, [])

    def test_nativeDialect(self) -> None:
        broker, transport = self.connect(NATIVE_DIALECT)
        broker.dataReceived(b"".join(self.nativeCall(i) for i in range(1, self.count + 1)))
        every = _FLUSH_EVERY
        self.assertEqual(
            [self.nativeAnswers(chunk) for chunk in transport.sent],
            [
                list(range(1, every + 1)),
                list(range(every + 1, 2 * every + 1)),
                list(range(2 * every + 1, self.count + 1)),
            ],
        )
        self.assertEqual(transport.buffered(), b"")
        self.assertFalse(transport.isWriter())

    def test_pbDialect(self) -> None:
        broker, transport = self.connect(b"pb")
        calls = b"".join(
            banana.encode(
                [b"message", i, b"root", b"echo", 1, [b"tuple", i], [b"dictionary"]], b"pb"
            )
            for i in range(1, self.count + 1)
        )
        broker.dataReceived(calls)
        answers = banana.Decoder(b"pb").feed(b"".join(transport.sent))
        self.assertEqual(answers, [[b"answer", i, i] for i in range(1, self.count + 1)])
        self.assertEqual(
            [len(banana.Decoder(b"pb").feed(chunk)) for chunk in transport.sent],
            [_FLUSH_EVERY, _FLUSH_EVERY, 20],
        )
        self.assertEqual(transport.buffered(), b"")

    def test_droppedMidRun(self) -> None:
        """A malformed message in the run drops the connection: the answers already sent
        stay sent, those held are discarded, and nothing after it runs."""
        broker, transport = self.connect(NATIVE_DIALECT)
        bad = _native.records([b"message", 1, 2])[0]  # a message with too few fields
        calls = [self.nativeCall(i) for i in range(1, self.count + 1)]
        calls[_FLUSH_EVERY + 9] = bad
        broker.dataReceived(b"".join(calls))
        self.assertEqual(
            [self.nativeAnswers(chunk) for chunk in transport.sent],
            [list(range(1, _FLUSH_EVERY + 1))],
        )
        self.assertEqual(transport.buffered(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class LoopbackPipeliningTests(TestCase):
    """
    Over a real loopback connection, where answers are sent as they are made, many calls in
    flight all get their own answers, in either dialect.
    """

    timeout = 60

    async def pipeline(self, dialect: bytes) -> None:
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, pb.PBServerFactory(Root()), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        factory = pb.PBClientFactory(dialects=[dialect])
        connector = reactor.connectTCP(  # type: ignore[attr-defined]
            "127.0.0.1", listening.getHost().port, factory
        )
        self.addCleanup(connector.disconnect)
        root = await factory.getRootObject()
        # 400 at once, then 2,000 more with 150 in flight, each answer starting the next call.
        burst = await defer.gatherResults([root.callRemote("echo", i) for i in range(400)])
        self.assertEqual(burst, list(range(400)))
        answers: dict[int, Any] = {}
        done: defer.Deferred[None] = defer.Deferred()
        issued = [0]

        def launch() -> None:
            i = issued[0]
            issued[0] += 1
            root.callRemote("echo", [i, str(i)]).addCallbacks(answered, done.errback, (i,))

        def answered(value: Any, i: int) -> None:
            answers[i] = value
            if issued[0] < 2000:
                launch()
            elif len(answers) == 2000 and not done.called:
                done.callback(None)

        for _ in range(150):
            launch()
        await done
        self.assertEqual(answers, {i: [i, str(i)] for i in range(2000)})

    async def test_native(self) -> None:
        await self.pipeline(NATIVE_DIALECT)

    async def test_pb(self) -> None:
        await self.pipeline(b"pb")


class ResetPeerTests(TestCase):
    """
    Over a real loopback connection, a send that flush() makes and that fails because the
    peer reset the connection is reported as the connection lost, as the reactor reports it
    when it makes the send itself.
    """

    timeout = 30

    async def test_resetReportedAsLost(self) -> None:
        made: defer.Deferred[Any] = defer.Deferred()
        lost: defer.Deferred[list[Any]] = defer.Deferred()

        class Answering(Protocol):
            def connectionMade(self) -> None:
                self.paced = PacedTransport(self.transport, FakeBroker())
                made.callback(None)

            def dataReceived(self, data: bytes) -> None:
                self.paced.write(b"answer")
                self.paced.flush()

            def connectionLost(self, reason: Any = None) -> None:
                lost.callback([reason])  # (a Failure passed alone would errback)

        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Factory.forProtocol(Answering), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        peer = socket.create_connection(("127.0.0.1", listening.getHost().port))
        self.addCleanup(peer.close)
        await made
        # The call and the reset arrive together: the server reads the call, and its answer
        # meets the reset.
        peer.sendall(b"call")
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        [reason] = await lost
        self.assertIsInstance(reason.value, ConnectionLost)


def _dropCalls(count: int) -> bytes:
    """
    ``count`` one-way calls of the root's ``drop``, in the ``pb`` dialect, as one read.
    """
    return b"".join(
        banana.encode(
            [b"message", i + 1, b"root", b"drop", 0, [b"tuple", i], [b"dictionary"]], b"pb"
        )
        for i in range(count)
    )


class OneWayCallsThenResetTests(TestCase):
    """
    A peer that sends more one-way calls in one read than the broker handles between two
    flushes, and then resets the connection: the flush in the middle of the read, with
    nothing to send, must not leave the transport unwatched by the reactor, or the server
    would never learn that the connection is gone (a leaked connection and broker).
    """

    timeout = 30

    def test_fakeSocket(self) -> None:
        """On a file descriptor transport whose send fails, the broker that handled the
        calls still has its transport watched by the reactor."""
        handled: list[int] = []

        class Dropping(pb.Root):
            def remote_drop(self, value: int) -> None:
                handled.append(value)

        real = SocketTransport()
        broker = pb.PBServerFactory(Dropping()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        broker.makeConnection(real)
        broker.dataReceived(banana.encode(b"pb"))
        real.failure = main.CONNECTION_LOST  # the peer reset the connection
        count = _FLUSH_EVERY + 10
        broker.dataReceived(_dropCalls(count))
        self.assertEqual(handled, list(range(count)))
        self.assertTrue(real.isReader() or real.isWriter())
        broker.connectionLost(Failure(ConnectionLost()))

    async def test_loopback(self) -> None:
        """Over a real loopback connection, the server is told the connection is lost."""
        count = _FLUSH_EVERY + 10
        allHandled: defer.Deferred[None] = defer.Deferred()
        lost: defer.Deferred[None] = defer.Deferred()
        brokers: list[Any] = []

        class Dropping(pb.Root):
            handled = 0

            def remote_drop(self, value: int) -> None:
                Dropping.handled += 1
                if Dropping.handled == count:
                    allHandled.callback(None)

        class Tracking(pb.PBServerFactory):
            def clientConnectionMade(self, broker: Any) -> None:
                super().clientConnectionMade(broker)
                brokers.append(broker)
                broker.notifyOnDisconnect(lambda: lost.callback(None))

        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Tracking(Dropping()), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        peer = socket.create_connection(("127.0.0.1", listening.getHost().port))
        self.addCleanup(peer.close)

        async def received() -> bytes:
            for _ in range(1000):  # 10 s at most
                await task.deferLater(reactor, 0.01, lambda: None)
                try:
                    return peer.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            raise AssertionError("the server sent nothing")

        await received()  # the server's offer of dialects
        peer.sendall(banana.encode(b"pb"))
        await received()  # its version message: it took the choice, and reads messages
        # The calls and the reset arrive together: the server reads the calls, and the
        # flush between them meets the reset.
        peer.sendall(_dropCalls(count))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        await allHandled
        [broker] = brokers
        real = broker.transport._transport
        watched = reactor.getReaders() + reactor.getWriters()  # type: ignore[attr-defined]
        self.assertIn(real, watched)
        await lost


class PendingTests(SynchronousTestCase):
    """
    _pendingIn reads how much a transport holds unsent, which tells a slow reader from a
    stalled one.
    """

    def test_fileDescriptor(self) -> None:
        """A file descriptor transport's buffers, both of them, minus what it sent."""
        real = SocketTransport()
        real.limit = 3
        real.write(b"abcde")
        real.write(b"fg")
        self.assertEqual(_pendingIn(real), 7)
        real.doWrite()
        self.assertEqual(_pendingIn(real), 4)

    def test_TLS(self) -> None:
        """Twisted's TLS over a file descriptor transport: the encrypted bytes under it, and
        the bytes it holds before encrypting them (small writes gathered until the reactor's
        next turn, writes made before the handshake ends). Missing those made a slow reader
        seem to take nothing, and dropped it."""
        clock = Clock()
        factory = TLSMemoryBIOFactory(
            CertificateOptions(), True, Factory.forProtocol(Protocol), clock=clock
        )
        tls = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8789))
        real = SocketTransport()
        tls.makeConnection(real)
        hello = _pendingIn(real)
        assert hello is not None
        self.assertGreater(hello, 0)  # the ClientHello, encrypted bytes waiting in TCP's buffer
        self.assertEqual(_pendingIn(tls), hello)
        tls.write(b"x" * 1000)  # gathered until the reactor's next turn
        self.assertEqual(_pendingIn(tls), hello + 1000)
        clock.advance(0)  # passed on, to wait for the handshake
        self.assertEqual(_pendingIn(tls), hello + 1000)
        tls.write(b"y" * 500)
        self.assertEqual(_pendingIn(tls), hello + 1500)
        real.doWrite()  # the ClientHello is sent
        self.assertEqual(_pendingIn(tls), 1500)

    def test_progress(self) -> None:
        """PacedTransport.progress: bytes the real transport sent, and bytes that wait (in
        it, or held); None if it cannot tell."""
        real = SocketTransport()
        real.limit = 3
        paced = PacedTransport(real, None)
        paced.write(b"abcde")
        self.assertEqual(paced.progress(), (0, 5))
        real.doWrite()
        self.assertEqual(paced.progress(), (3, 2))
        paced.hold()
        paced.write(b"fg")
        self.assertEqual(paced.progress(), (3, 4))
        paced.writeSequence([b"h", b"i"])
        self.assertEqual(paced.progress(), (3, 6))
        self.assertIsNone(PacedTransport(StringTransport(), None).progress())

    def test_protocolWrapper(self) -> None:
        """A protocol wrapper over a file descriptor transport (twisted.protocols.policies'
        ProtocolWrapper, as a user's own layer may be) holds nothing itself: what waits
        is what the file descriptor holds."""
        real = SocketTransport()
        real.limit = 2
        wrapper = policies.ProtocolWrapper(
            policies.WrappingFactory(Factory.forProtocol(Protocol)), Protocol()
        )
        wrapper.makeConnection(real)
        wrapper.write(b"abcde")
        self.assertEqual(_pendingIn(wrapper), 5)
        real.doWrite()
        self.assertEqual(_pendingIn(wrapper), 3)

    def test_fileDescriptorOfAnotherMake(self) -> None:
        """A file descriptor transport without Twisted's buffers (a subclass that keeps its
        own) cannot tell: None, as for any other transport, and the wrapper's progress too."""

        class OwnBuffer(FileDescriptor):
            def __init__(self) -> None:  # keeps its own buffer: FileDescriptor's is never made
                self.chunks: list[bytes] = []

        self.assertIsNone(_pendingIn(OwnBuffer()))
        self.assertIsNone(PacedTransport(OwnBuffer(), None).progress())

    def test_unknown(self) -> None:
        """A transport that cannot tell: None (a paused peer is then taken as stalled)."""
        self.assertIsNone(_pendingIn(StringTransport()))


class KernelQueueTests(SynchronousTestCase):
    """
    The stall timer counts what the kernel still holds in the socket's send queue: its
    send buffer can take megabytes, and Twisted's transport may send more only once a good
    part of that has drained, so a reader taking a few kilobytes a second showed no progress
    in Twisted's buffer for longer than stallTimeout, and was dropped.
    """

    def test_socketQueue(self) -> None:
        """On Linux, the bytes a socket's kernel send queue holds, of a transport's socket or
        of the socket of the transport under it (TLS); None without a socket, for a closed
        one, and on other systems."""
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        a.setblocking(False)
        for _ in range(10):
            a.send(b"x" * 5_000)
        direct = type("Direct", (), {"socket": a})()
        under = type("Under", (), {"transport": direct})()
        if not sys.platform.startswith("linux"):
            self.assertIsNone(_pacing._kernelUnsent(direct))
            a.close()
            return
        queued = _pacing._kernelUnsent(direct)
        assert queued is not None
        self.assertGreaterEqual(queued, 50_000)
        self.assertEqual(_pacing._kernelUnsent(under), queued)
        taken = 0
        while taken < 30_000:
            taken += len(b.recv(30_000 - taken))
        after = _pacing._kernelUnsent(direct)
        assert after is not None
        self.assertLess(after, queued)
        self.assertIsNone(_pacing._kernelUnsent(StringTransport()))
        # A UNIX socket counts the memory its packets take, not bytes: not for bytesOnly.
        self.assertIsNone(_pacing._kernelUnsent(direct, bytesOnly=True))
        a.close()
        self.assertIsNone(_pacing._kernelUnsent(direct))

    def test_tcpQueueInBytes(self) -> None:
        """A TCP socket's queue is counted in bytes: bytesOnly gives it too (Linux)."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        direct = type("Direct", (), {"socket": client})()
        if not sys.platform.startswith("linux"):
            self.assertIsNone(_pacing._kernelUnsent(direct, bytesOnly=True))
            return
        self.assertEqual(_pacing._kernelUnsent(direct, bytesOnly=True), 0)

    def test_progress(self) -> None:
        """progress() counts as sent only what the kernel has sent on too, where it says:
        keepalive then sees a slow reader of a large answer taking it (while bytes wait in
        the transport, the kernel's send buffer is full, and it sends only what the peer
        reads)."""
        real = SocketTransport()
        real.limit = 3
        paced = PacedTransport(real, None)
        paced.write(b"abcde")
        real.doWrite()
        self.patch(_pacing, "_kernelUnsent", lambda transport, bytesOnly=False: 2)
        self.assertEqual(paced.progress(), (1, 2))
        self.patch(_pacing, "_kernelUnsent", lambda transport, bytesOnly=False: None)
        self.assertEqual(paced.progress(), (3, 2))

    def test_readerSeenInTheKernel(self) -> None:
        """A peer whose connection's transport sends nothing more for stallTimeout, while
        the kernel's send queue shrinks (it reads, slowly), is not dropped; once the queue
        stops shrinking, it is."""
        limits = pb.BrokerLimits(bufferedBytes=1024 * 1024, messageSize=8 * 1024 * 1024)
        server, client, pump, clock = nativePeers(limits, 64 * 1024)
        unreadAnswer(client, pump, clock).addErrback(lambda f: None)
        transport: Any = server.transport
        self.assertTrue(server.sendingLarge)
        self.assertTrue(transport.paused)
        queue = [900_000]
        self.patch(_pacing, "_kernelUnsent", lambda real, bytesOnly=False: queue[0])
        transport.loseConnection()  # the closing connection waits: the stall timer runs
        queue[0] = 880_000  # the peer takes 20,000 bytes
        clock.advance(31)
        self.assertFalse(transport.aborted)
        clock.advance(31)  # it took nothing more
        self.assertTrue(transport.aborted)


class BareTransport:
    """
    A transport with only what ITransport asks for (write, loseConnection, the addresses):
    no producer registration, no writeSequence, no abortConnection, as a user's own
    wrapper may be. What one side writes waits in ``written`` until :func:`deliver`.
    """

    def __init__(self, host: int, peer: int) -> None:
        self.written: list[bytes] = []
        self.lost = False
        self._host = IPv4Address("TCP", "127.0.0.1", host)
        self._peer = IPv4Address("TCP", "127.0.0.1", peer)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:
        self.lost = True

    def getHost(self) -> IPv4Address:
        return self._host

    def getPeer(self) -> IPv4Address:
        return self._peer


class BareTransportTests(SynchronousTestCase):
    """
    A broker works over a transport that lacks what pacing uses when it is there (producer
    registration, writeSequence, abortConnection, a count of what waits): it is never
    paused, and it is closed with loseConnection.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = pb.PBServerFactory(Root(), clock=self.clock).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 1)
        )
        self.client = pb.PBClientFactory(clock=self.clock).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 8789)
        )
        self.serverTransport = BareTransport(8789, 1)
        self.clientTransport = BareTransport(1, 8789)
        self.server.makeConnection(self.serverTransport)
        self.client.makeConnection(self.clientTransport)
        self.deliver()

    def deliver(self) -> None:
        """
        Move what each side wrote to the other until neither writes; close both sides once
        either asked to.
        """
        for _ in range(1000):
            self.clock.advance(0)
            moved = False
            for transport, receiver in (
                (self.serverTransport, self.client),
                (self.clientTransport, self.server),
            ):
                data, transport.written = b"".join(transport.written), []
                if data and not receiver.disconnected:
                    moved = True
                    receiver.dataReceived(data)
            if self.serverTransport.lost or self.clientTransport.lost:
                for broker in (self.server, self.client):
                    if not broker.disconnected:
                        broker.connectionLost(Failure(ConnectionLost()))
                return
            if not moved:
                return
        self.fail("the brokers kept writing")

    def test_callsAndLargeAnswers(self) -> None:
        """The native dialect is chosen; calls are answered, a large one (sent in parts)
        whole; the wrapper never registered with the transport, and never pauses."""
        paced = self.server.transport
        self.assertIsInstance(paced, PacedTransport)
        self.assertFalse(paced._registered)
        self.assertEqual(self.client.currentDialect, NATIVE_DIALECT)
        root = self.client.remoteForName("root")
        small = root.callRemote("echo", [1, "two"])
        large = root.callRemote("echo", b"x" * (3 * 1024 * 1024))
        self.deliver()
        self.assertEqual(self.successResultOf(small), [1, "two"])
        self.assertEqual(self.successResultOf(large), b"x" * (3 * 1024 * 1024))
        self.assertFalse(paced.paused)
        self.assertIsNone(paced.progress())  # it cannot tell what waits

    def test_writeSequence(self) -> None:
        """writeSequence through the wrapper (as an application may use a broker's
        transport) writes the parts joined, in order after what was held, and counts them."""
        paced = self.server.transport
        written = paced.written
        paced.hold()
        paced.write(b"a")
        paced.writeSequence([b"b", b"cd"])
        paced.release()
        self.assertEqual(self.serverTransport.written, [b"a", b"bcd"])
        self.assertEqual(paced.written, written + 4)
        self.serverTransport.written = []

    def test_closing(self) -> None:
        """Closing uses loseConnection (no producer to unregister); so does dropping a peer,
        as the transport has no abortConnection."""
        self.server.transport.loseConnection()
        self.assertTrue(self.serverTransport.lost)
        self.deliver()
        self.assertTrue(self.server.disconnected and self.client.disconnected)
        self.assertFalse(self.clientTransport.lost)
        self.client.transport.abortConnection()
        self.assertTrue(self.clientTransport.lost)


class KernelBacklogKeepaliveTests(SynchronousTestCase):
    """
    Keepalive hears a slow reader of a large answer while the rest of it waits in the
    kernel's send queue only (Twisted's transport has handed it all over): the peer's pong
    waits behind megabytes it reads a few kilobytes a second. A few bytes the kernel holds
    (a ping in flight) are no backlog: a hung peer whose kernel acknowledges them is not heard.
    """

    def timer(self, queue: list[int]) -> tuple[Clock, list[str]]:
        real = SocketTransport()
        paced = PacedTransport(real, None)
        for _ in range(50):  # (under the transport's buffer size: it never pauses)
            paced.write(b"x" * 60_000)
            real.doWrite()  # the kernel took all of it
        self.assertEqual(_pendingIn(real), 0)
        self.patch(_pacing, "_kernelUnsent", lambda transport, bytesOnly=False: queue[0])
        clock = Clock()
        dead: list[str] = []
        timer = KeepaliveTimer(clock, Keepalive(1, 3), lambda: None, dead.append, paced.progress)
        timer.start()
        self.addCleanup(timer.stop)
        return clock, dead

    def test_readerOfTheKernelQueue(self) -> None:
        """A peer taking 2 KB a second of the 2.9 MB the kernel holds is heard; once it
        stops, it is dropped after the timeout."""
        queue = [2_900_000]
        clock, dead = self.timer(queue)
        for _ in range(30):
            queue[0] -= 2_000  # the peer reads 2 KB a second
            clock.advance(1)
        self.assertEqual(dead, [])
        for _ in range(3):  # it stopped reading
            clock.advance(1)
        self.assertEqual(len(dead), 1)

    def test_pingInFlight(self) -> None:
        """(Bytes that were already sent, of pings, acknowledged one tick later.)"""
        queue = [0]
        clock, dead = self.timer(queue)
        for second in range(10):
            queue[0] = 40 if second % 2 else 0
            clock.advance(1)
        self.assertEqual(len(dead), 1)
