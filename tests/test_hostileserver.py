"""
A client facing a server it cannot trust: whatever the server sends, the client's calls and
logins end (never a hang), nothing escapes ``dataReceived``, what it holds stays bounded,
and what it logs about the server stays bounded too.

Most tests play the server by hand: a client broker made by a ``PBClientFactory`` writes to
a ``StringTransport``, and the test feeds it the bytes a server would send.
"""

from __future__ import annotations

import gc
import struct
from typing import Any

import msgpack
from twisted.cred.credentials import Anonymous
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import _native, banana, flavors, jelly, pb
from pbroker import broker as brokerModule
from pbroker.errors import InvalidJelly, PBConnectionLost, ProtocolError
from pbroker.testing import connectedServerAndClient

#: A pbroker server's offer, as the wire docs give it.
LIMITED_OFFER = [b"pbroker2", b"pbroker1", b"pb", b"none", b"pbroker-limits:33554432:16777216"]
#: The offer of a pbroker server from before the offer carried its limits.
EARLIER_OFFER = [b"pbroker2", b"pbroker1", b"pb", b"none"]


class PlayedServer:
    """
    A client broker whose server is the test: :meth:`send` writes a message to it in the
    dialect chosen, :meth:`feed` raw bytes.
    """

    def __init__(self, offer: list[bytes] | None, **options: Any) -> None:
        self.clock = Clock()
        self.factory = pb.PBClientFactory(clock=self.clock, **options)
        self.root = self.factory.getRootObject()
        self.broker = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8789))
        self.transport = StringTransport()
        self.broker.makeConnection(self.transport)
        if offer is not None:
            self.feed(banana.encode(offer))

    def feed(self, data: bytes) -> None:
        self.broker.dataReceived(data)

    def send(self, *message: Any) -> None:
        if self.broker.currentDialect == pb.NATIVE_DIALECT:
            for record in _native.records(list(message)):
                self.feed(record)
        else:
            self.feed(banana.encode(list(message), self.broker.currentDialect))

    @property
    def dropped(self) -> bool:
        return bool(self.transport.disconnecting)

    def end(self) -> None:
        """
        Lose the connection (if the client has not dropped it), and let the Deferreds the
        test did not look at fail unseen.
        """
        for waiting in list(self.broker.waitingForAnswers.values()):
            waiting.addErrback(lambda _: None)
        if not self.broker.disconnected:
            self.broker.connectionLost(Failure(ConnectionDone()))
        self.root.addErrback(lambda _: None)


def dropLines(events: list[dict[str, Any]]) -> list[str]:
    return [
        str(event.get("why")) for event in events if "Dropping" in str(event.get("log_format", ""))
    ]


def fragmented(envelope: list[Any], outOfLine: list[bytes]) -> bytes:
    """
    One ``LAST`` record of a message whose envelope holds, where ``outOfLine`` items go, the
    extension 6 that says how long each is (docs/native.rst, "The records").
    """
    packedEnvelope = msgpack.packb(envelope, use_bin_type=True)
    payload = struct.pack(">I", len(packedEnvelope)) + packedEnvelope + b"".join(outOfLine)
    return _native.fragmentHeader(_native.LAST, len(payload)) + payload


def outOfLine(raw: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(6, struct.pack(">I", len(raw)))


class OutOfLineCommandTests(SynchronousTestCase):
    """
    Only a message's values may be carried out of line in a fragmented message.
    """

    def test_refused(self) -> None:
        """A command carried out of line (which the client got as a view of its read when
        that read was large, and then failed to describe with a field count it did not
        expect, letting AttributeError out of dataReceived) drops the connection with one
        line, whatever its field count, and the calls waiting fail."""
        bulk = msgpack.packb(b"v" * 100_000, use_bin_type=True)
        for fields, raws in (
            ([outOfLine(b"answer"), outOfLine(bulk)], [b"answer", bulk]),  # too few fields
            ([outOfLine(b"answer"), 1, outOfLine(bulk)], [b"answer", bulk]),  # as many as needed
        ):
            server = PlayedServer(LIMITED_OFFER)
            self.addCleanup(server.end)
            called = server.broker.remoteForName("root").callRemote("echo")
            with capturedLogs() as events:
                server.feed(fragmented(fields, raws))
            self.assertTrue(server.dropped)
            self.assertEqual(
                dropLines(events), ["a pbroker2 message whose command is carried out of line"]
            )
            server.broker.connectionLost(Failure(ConnectionDone()))
            self.failureResultOf(called, PBConnectionLost)

    def test_valuesOutOfLineTaken(self) -> None:
        """Values carried out of line, with the command in the envelope, are taken."""
        server = PlayedServer(LIMITED_OFFER)
        self.addCleanup(server.end)
        called = server.broker.remoteForName("root").callRemote("echo")
        value = msgpack.packb(b"v" * 100_000, use_bin_type=True)
        server.feed(fragmented([b"answer", 1, outOfLine(value)], [value]))
        self.assertFalse(server.dropped)
        self.assertEqual(self.successResultOf(called), b"v" * 100_000)


class EarlierServerHelloTests(SynchronousTestCase):
    """
    A client of a server whose offer does not give its limits waits for the server's hello
    before handing out the root; a server need not send one.
    """

    def test_rootAfterHello(self) -> None:
        """The root comes with the hello, and not with the version before it."""
        server = PlayedServer(EARLIER_OFFER)
        self.addCleanup(server.end)
        server.send(b"version", 6)
        self.assertNoResult(server.root)
        server.send(b"hello", {"messageSize": 1 << 20, "taken": 1 << 20})
        self.successResultOf(server.root)
        self.assertEqual(server.broker.peerMessageSize, 1 << 20)

    def test_rootWithoutHello(self) -> None:
        """A server sends its version and hello before anything else: when another message
        comes first (here a pong, which a server that kept the client waiting for ever
        answered each keepalive ping with), no hello will come, and the root and a login
        are handed out then, not never."""
        server = PlayedServer(EARLIER_OFFER, keepalive=pb.Keepalive(interval=5, timeout=15))
        self.addCleanup(server.end)
        login = server.factory.login(Anonymous())
        server.send(b"version", 6)
        server.clock.advance(6)
        self.assertNoResult(server.root)
        server.send(b"pong", 1)
        self.successResultOf(server.root)
        self.assertFalse(server.dropped)
        # The login's first call went to the server: the login waits for its answer.
        self.assertIn(b"loginAnonymous", server.transport.value())
        self.assertNoResult(login)
        login.addErrback(lambda _: None)

    def test_serverMessagesAfterTheOffer(self) -> None:
        """Messages that came in the read of the offer itself end the wait too."""
        server = PlayedServer(None)
        self.addCleanup(server.end)
        server.feed(banana.encode(EARLIER_OFFER) + _native.records([b"pong", 1])[0])
        self.successResultOf(server.root)
        self.assertFalse(server.dropped)


class StockPingTests(SynchronousTestCase):
    """
    Keepalive to a stock peer (the ``pb`` dialect) pings with a call, whose error answer is
    the pong.
    """

    def test_oneUnansweredPing(self) -> None:
        """A server that talks, so is never dropped as silent, but never answers the pings
        has one ping call wait at a time, not one more every interval."""
        server = PlayedServer([b"pb", b"none"], keepalive=pb.Keepalive(interval=5, timeout=15))
        self.addCleanup(server.end)
        for _ in range(50):
            server.clock.advance(6)
            server.send(b"version", 6)  # heard from: not silent
        self.assertFalse(server.dropped)
        self.assertEqual(len(server.broker.waitingForAnswers), 1)
        self.assertEqual(server.transport.value().count(b"pbroker.keepalive"), 1)
        # Once it is answered, the next interval pings again.
        (requestID,) = server.broker.waitingForAnswers
        server.send(b"error", requestID, b"no such object")
        self.assertEqual(server.broker.waitingForAnswers, {})
        server.clock.advance(6)
        self.assertEqual(len(server.broker.waitingForAnswers), 1)
        self.assertEqual(server.transport.value().count(b"pbroker.keepalive"), 2)


class NegotiationTests(SynchronousTestCase):
    """
    The dialect negotiation is a short list of names one way and one name the other: no
    larger or deeper expression is held while it goes on.
    """

    def test_largeOfferRefused(self) -> None:
        """An offer over 4 KiB is refused as soon as that much has come, where the client
        used to hold as much as a whole message (32 MiB of nested lists: about 1 GiB)."""
        offer = banana.encode([b"dialect%d" % number for number in range(50_000)])
        server = PlayedServer(None)
        self.addCleanup(server.end)
        with capturedLogs() as events:
            server.feed(offer[:5000])
        self.assertTrue(server.dropped)
        (why,) = dropLines(events)
        self.assertEqual(
            why,
            "in the dialect negotiation: expression exceeds the message size limit of 4096 bytes",
        )
        server.broker.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(server.root, ConnectionDone)  # (the loss, as the transport said)

    def test_deepOfferRefused(self) -> None:
        """An offer is a list of names: one with lists in lists is refused."""
        server = PlayedServer(None)
        self.addCleanup(server.end)
        with capturedLogs() as events:
            server.feed(banana.encode([[[b"pb"]], b"pb"]))
        self.assertTrue(server.dropped)
        self.assertIn("in the dialect negotiation: lists nested", dropLines(events)[0])

    def test_limitsOfTheConnectionAfterwards(self) -> None:
        """Once the dialect is chosen, messages are held to the connection's limits again:
        a stock server's answer of 600 KiB is taken."""
        server = PlayedServer([b"pb", b"none"])
        self.addCleanup(server.end)
        called = server.broker.remoteForName("root").callRemote("echo")
        server.send(b"answer", 1, b"x" * (600 * 1024))
        self.assertEqual(self.successResultOf(called), b"x" * (600 * 1024))
        self.assertEqual(server.broker._decoder.messageSizeLimit, pb.BrokerLimits().messageSize)

    def test_largeChoiceRefused(self) -> None:
        """A server holds no more of a client's choice than of an offer."""
        factory = pb.PBServerFactory(pb.Root())
        server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        server.makeConnection(transport)
        with capturedLogs() as events:
            server.dataReceived(banana.encode(b"p" * 5000)[:4200])
        self.assertTrue(transport.disconnecting)
        self.assertIn("in the dialect negotiation", dropLines(events)[0])
        server.connectionLost(Failure(ConnectionDone()))


class NoticesTests(SynchronousTestCase):
    """
    What the server sends that the client logs a line about counts toward
    ``REFUSALS_LOGGED``, as refusals do.
    """

    def setUp(self) -> None:
        self.patch(brokerModule, "REFUSALS_LOGGED", 5)

    def assertCapped(self, events: list[dict[str, Any]], notice: str) -> None:
        formats = [str(event.get("log_format")) for event in events]
        self.assertEqual(sum(notice in text for text in formats), 5)
        self.assertEqual(sum("are not logged on this connection" in t for t in formats), 1)
        self.assertEqual(len(formats), 6)

    def test_didNotUnderstand(self) -> None:
        """A server's didNotUnderstand, sent over and over."""
        for offer in (LIMITED_OFFER, [b"pb", b"none"]):
            server = PlayedServer(offer)
            self.addCleanup(server.end)
            with capturedLogs() as events:
                for number in range(40):
                    server.send(b"didNotUnderstand", b"command%d" % number)
            self.assertFalse(server.dropped)
            self.assertCapped(events, "did not understand")

    def test_releasedObjectSentBack(self) -> None:
        """A stock server's answer naming, over and over, an object of the client's it has
        released (each arrives as None, as on stock PB)."""
        server = PlayedServer([b"pb", b"none"])
        self.addCleanup(server.end)
        called = server.broker.remoteForName("root").callRemote("echo")
        with capturedLogs() as events:
            server.send(b"answer", 1, [b"list"] + [[b"local", 7]] * 40)
        self.assertEqual(self.successResultOf(called), [None] * 40)
        self.assertCapped(events, "already released")


class StreamOut(pb.Root):
    def __init__(self) -> None:
        self.closed = False

    def remote_loginAnonymous(self, mind: Any) -> Any:
        try:
            yield "not an avatar"
            yield "nor this"
        finally:
            self.closed = True


class LoginAnswerTests(SynchronousTestCase):
    def test_streamIsNoAvatar(self) -> None:
        """A login answered with a stream fails with ProtocolError, as one answered with a
        plain value does, and the stream is cancelled (the server's generator closed):
        the application no longer gets a RemoteStream for an avatar."""
        root = StreamOut()
        factory = pb.PBClientFactory()
        _server, _client, pump = connectedServerAndClient(pb.PBServerFactory(root), factory)
        login = factory.login(Anonymous())
        pump.flush()
        failure = self.failureResultOf(login, ProtocolError)
        self.assertEqual(str(failure.value), "the server's avatar is a stream")
        self.assertTrue(root.closed)


class Shared(flavors.RemoteCache):
    pass


class FirstCopyTests(SynchronousTestCase):
    def test_sentTwice(self) -> None:
        """An owner sends a Cacheable's first copy once, and names it ``cached`` after. A
        second first copy under the same id would replace the copy the client keeps (the
        application's first handles cut off from the owner's messages) and is refused;
        the first copy stays the one the owner's messages reach."""
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(b"owner.Shared", Shared)
        server = PlayedServer(LIMITED_OFFER, registry=registry)
        self.addCleanup(server.end)
        root = server.broker.remoteForName("root")
        first, second = root.callRemote("get"), root.callRemote("get")

        def firstCopy(state: int) -> Any:
            sexp = [b"owner.Shared", 5, [b"dictionary", [[b"unicode", b"n"], state]]]
            return msgpack.packb(msgpack.ExtType(4, banana.encode(sexp, b"none")))

        server.send(b"answer", 1, firstCopy(1))
        server.send(b"answer", 2, firstCopy(2))
        kept = self.successResultOf(first)
        failure = self.failureResultOf(second, InvalidJelly)
        self.assertEqual(str(failure.value), "a second first copy of the peer's cache 5")
        self.assertFalse(server.dropped)
        self.assertEqual(kept.n, 1)
        self.assertEqual(server.broker.locallyCachedObjects[5].n, 1)
        # The owner counted a handle for the refused copy: released, as for any value
        # refused (one decache), while the copy kept still counts, also once the refused
        # copy is collected (it used to send a second decache then, which made its owner
        # let go of the copy kept).
        self.assertEqual(server.transport.value().count(b"decache"), 1)
        del failure, second
        gc.collect()
        self.assertEqual(server.transport.value().count(b"decache"), 1)
        self.assertEqual((kept.n, server.broker.locallyCachedObjects[5].n), (1, 1))
