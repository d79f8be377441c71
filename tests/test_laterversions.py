"""
pbroker2 between this version and a later one (docs/native.rst, "Later versions"): what a
later version may add (hello keys, offer entries and fields, context keys, flag bits,
fields after a notice's command, new commands) is ignored or refused as the rules say, and
a call a peer cannot take fails rather than wait for ever.

A later peer is played by today's broker sending what the later one would, or by a broker
whose message table lacks a command (a peer that does not know it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import _native, banana, pb
from pbroker.errors import LimitExceeded, PBConnectionLost
from pbroker.testing import connectedServerAndClient


class Echo(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value


def withoutCommand(command: bytes) -> type[pb.Broker]:
    """
    A broker that does not know ``command``: a peer of another version, or another
    implementation, without it.
    """
    table = {name: entry for name, entry in pb.Broker.messageHandlers.items() if name != command}
    return type("Without", (pb.Broker,), {"messageHandlers": table})


class Connected:
    """
    A server and a client broker in memory, the server's factory made with ``options``.
    """

    def __init__(self, protocol: type[pb.Broker] = pb.Broker, **options: Any) -> None:
        serverFactory = pb.PBServerFactory(Echo(), **options)
        serverFactory.protocol = protocol
        self.server, self.client, self.pump = connectedServerAndClient(
            serverFactory, pb.PBClientFactory()
        )
        self.root = self.client.remoteForName("root")

    def call(self, method: str, *args: Any, **options: Any) -> Any:
        target = self.root.withOptions(**options) if options else self.root
        deferred = target.callRemote(method, *args)
        self.pump.flush()
        return deferred


class HelloTests(SynchronousTestCase):
    def test_keyLeftOutSaysNothing(self) -> None:
        """A hello that leaves out ``messageSize`` (a later hello giving only what is new)
        does not make the server's limit "none": a call over it still fails at the caller,
        with the connection up, rather than go and have the server drop the connection."""
        peers = Connected(limits=pb.BrokerLimits(messageSize=4096))
        self.assertEqual(peers.client.peerMessageSize, 4096)
        peers.server.sendCall(b"hello", {"compression": ["later"]})
        peers.pump.flush()
        self.assertEqual(peers.client.peerMessageSize, 4096)
        self.failureResultOf(peers.call("echo", b"x" * 8000), LimitExceeded)
        self.assertEqual(self.successResultOf(peers.call("echo", 5)), 5)
        # (nil, given, still says "none".)
        peers.server.sendCall(b"hello", {"messageSize": None})
        peers.pump.flush()
        self.assertIsNone(peers.client.peerMessageSize)


class ContextCallTests(SynchronousTestCase):
    """
    A peer that does not know ``callctx`` (a call with a timeout or annotations: another
    implementation, or a broken one) answers ``didNotUnderstand``, naming the command only.
    """

    def test_connectionDropped(self) -> None:
        """Not understanding a message of the dialect itself, the peer cannot keep its side
        of the connection: it is dropped, saying why, and every call waiting fails with
        PBConnectionLost naming that, where a call used to wait for ever (and a large one
        to hold the bytes counted for it, so that the large calls after it waited too)."""
        peers = Connected(withoutCommand(b"callctx"))
        kept = pb.Referenceable()
        plain = peers.root.callRemote("echo", b"x" * 300_000)  # (large: counted until taken)
        with capturedLogs() as events:
            withContext = peers.root.withOptions(timeout=30).callRemote(
                "echo", b"y" * 300_000, kept
            )
            peers.pump.flush()
        self.assertTrue(peers.client.transport.disconnecting)
        why = "the peer does not understand b'callctx', a message of the b'pbroker2' dialect"
        self.assertIn(why, [event.get("why") for event in events])
        self.assertEqual(self.successResultOf(plain), b"x" * 300_000)
        peers.client.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(withContext, PBConnectionLost)
        self.assertIn(why, str(failure.value))
        # What the call held is let go with the connection.
        self.assertEqual(peers.client.localObjects, {})
        self.assertEqual(peers.client._untakenBytes, 0)

    def test_ownCommandsOnlyLogged(self) -> None:
        """A command that is not one of the dialect's (an application's own, through a
        broker subclass) not understood is a notice, logged, and the connection kept."""
        peers = Connected()
        with capturedLogs() as events:
            peers.server.sendCall(b"didNotUnderstand", b"applicationMessage")
            peers.pump.flush()
        self.assertFalse(peers.client.transport.disconnecting)
        self.assertIn("did not understand", str(events[0]["log_format"]))
        self.assertEqual(self.successResultOf(peers.call("echo", 3)), 3)


class NoticeTests(SynchronousTestCase):
    def test_fieldsAfterTheCommand(self) -> None:
        """A later version may name more in ``didNotUnderstand`` after the command: taken as
        the notice it is; one without the command drops the connection."""
        peers = Connected()
        with capturedLogs() as events:
            peers.server.sendCall(b"didNotUnderstand", b"later", 7, {"why": "new"})
            peers.pump.flush()
        self.assertFalse(peers.client.transport.disconnecting)
        self.assertIn("did not understand", str(events[0]["log_format"]))
        with capturedLogs():
            peers.server.sendCall(b"didNotUnderstand")
            peers.pump.flush()
        self.assertTrue(peers.client.transport.disconnecting)


class CallFieldTests(SynchronousTestCase):
    def test_answerBitsOfLaterVersions(self) -> None:
        """Only the bit of value 2 of a call's ``answer`` field asks for ``taken``; a bit a
        later version adds is ignored (no ``taken`` the caller did not ask for, which a
        peer of today's drops the connection over)."""
        peers = Connected()
        sent: list[Any] = []
        original = peers.server.sendCall

        def recording(*message: Any) -> Any:
            sent.append(message[0])
            return original(*message)

        peers.server.sendCall = recording  # type: ignore[method-assign]
        noArgs = _native.inline(peers.client._codec.pack([1]))
        for answer, taken in ((1 | 4, False), (1 | 2 | 4, True)):
            del sent[:]
            requestID = peers.client.newRequestID()
            deferred = peers.client.waitingForAnswers[requestID] = Deferred()
            peers.client.sendCall(
                b"message", requestID, b"root", b"echo", answer, noArgs, _native.EMPTY_MAP
            )
            with capturedLogs():
                peers.pump.flush()
            self.assertEqual(b"taken" in sent, taken, answer)
            if not taken:
                self.assertEqual(self.successResultOf(deferred), 1)
                self.assertFalse(peers.client.transport.disconnecting)
            else:
                # (This client did not count the call: today's peer drops the connection
                # over a taken it did not ask for, as the test above shows it need not get.)
                deferred.addErrback(lambda _: None)

    def test_contextWithoutAnnotations(self) -> None:
        """A call context that leaves ``annotations`` out (a later one carrying only keys
        of its own) has none; the call runs."""
        peers = Connected()
        requestID = peers.client.newRequestID()
        deferred = peers.client.waitingForAnswers[requestID] = Deferred()
        args = _native.inline(peers.client._codec.pack([5]))
        peers.client.sendCall(
            b"callctx", requestID, b"root", b"echo", 1, args, _native.EMPTY_MAP, {"later": 1}
        )
        peers.pump.flush()
        self.assertFalse(peers.server.transport.disconnecting)
        self.assertEqual(self.successResultOf(deferred), 5)


class OfferTests(SynchronousTestCase):
    def test_limitsWithMoreFields(self) -> None:
        """A ``pbroker-limits:`` entry with fields a later version appended still gives the
        limits (the client hands out the root at once), and an entry that is not of the
        form is passed over for a later one that is."""
        for entries in (
            [b"pbroker-limits:4096:1024:later"],
            [b"pbroker-limits:4096:1024:" + b"a-later-field:" * 8],
            [b"pbroker-limits:later", b"pbroker-limits:4096:1024"],
        ):
            client = pb.PBClientFactory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            transport = StringTransport()
            client.makeConnection(transport)
            client.dataReceived(banana.encode([b"pbroker3", b"pbroker2", b"pb", *entries]))
            self.assertEqual(client.currentDialect, b"pbroker2")
            self.assertEqual(client.peerMessageSize, 4096, entries)
            self.assertFalse(client._factoryWaitsForHello)
            client.connectionLost(Failure(ConnectionDone()))
