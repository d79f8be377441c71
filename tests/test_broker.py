"""
Tests for the broker core: calls, references and their counts, copies, failures, one-way
calls, disconnects and protocol errors; against pbroker and against stock Twisted PB peers.
"""

from __future__ import annotations

import datetime
import functools
import gc
import inspect
import io
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.spread import banana as twistedBanana
from twisted.spread import jelly as twistedJelly
from twisted.spread import pb as twistedPb
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pbroker import banana, jelly, pb, util
from pbroker import broker as brokerModule
from pbroker.cred import PortalRoot
from pbroker.errors import (
    BananaEncodeError,
    DeadReferenceError,
    InvalidJelly,
    LimitExceeded,
    PBConnectionLost,
    RemoteError,
    describe,
)
from pbroker.failure import errorText, loggable
from pbroker.stream import Stream
from pbroker.testing import connectedServerAndClient
from tests import interop_peer


def connect(serverFactory: Any, clientFactory: Any) -> tuple[Any, Any, iosim.IOPump]:
    """
    Connect two factories of any implementation in memory.
    """
    return connectedServerAndClient(serverFactory, clientFactory)


def rootFor(module: Any) -> Any:
    """
    A root object built from ``module`` (pbroker.pb or twisted.spread.pb), with the same
    remote methods either way, so tests can run against both implementations.
    """

    class Counter(module.Referenceable):
        def __init__(self) -> None:
            self.count = 0

        def remote_add(self, amount: int = 1) -> int:
            self.count += amount
            return self.count

    class TheRoot(module.Root):
        def __init__(self) -> None:
            self.counter = Counter()
            self.received: list[Any] = []
            self.pending: Deferred[Any] = Deferred()

        def remote_echo(self, *args: Any, **kw: Any) -> Any:
            return (args, kw) if kw else args[0] if len(args) == 1 else args

        def remote_counter(self) -> Any:
            return self.counter

        def remote_isCounter(self, value: Any) -> bool:
            return value is self.counter

        def remote_fail(self, message: str) -> None:
            raise ValueError(message)

        def remote_error(self, message: str) -> None:
            raise module.Error(message)

        def remote_record(self, value: Any) -> None:
            self.received.append(value)

        def remote_wait(self) -> Any:
            return self.pending

    return TheRoot()


# The values every pairing must carry unchanged (shared with the out-of-process tests).
VALUES = interop_peer.VALUES


class BrokerTestsMixin:
    """
    The same tests for every pairing; subclasses choose who is the server and the client.
    """

    serverModule: Any
    clientModule: Any
    #: Extra arguments for the client factory (a pbroker client's dialects).
    clientOptions: dict[str, Any] = {}

    def setUp(self) -> None:
        self.rootObject = rootFor(self.serverModule)
        self.server, self.client, self.pump = connect(
            self.serverModule.PBServerFactory(self.rootObject),
            self.clientModule.PBClientFactory(**self.clientOptions),
        )
        self.root = self.client.remoteForName("root")

    def call(self, target: Any, *args: Any, **kw: Any) -> Any:
        """
        Call a remote method, move the bytes, and return the result (or the Failure).
        """
        results: list[Any] = []
        target.callRemote(*args, **kw).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(len(results), 1)  # type: ignore[attr-defined]
        return results[0]

    def test_basicTypes(self) -> None:
        """Every basic type makes the round trip unchanged."""
        for value in VALUES:
            self.assertEqual(self.call(self.root, "echo", value), value)  # type: ignore[attr-defined]

    def test_keywordArguments(self) -> None:
        """Keyword arguments arrive as keywords."""
        result = self.call(self.root, "echo", 1, named="x")
        self.assertEqual(result, ((1,), {"named": "x"}))  # type: ignore[attr-defined]

    def test_referenceCalledAgain(self) -> None:
        """A returned Referenceable can be called; state lives on the server."""
        counter = self.call(self.root, "counter")
        self.assertEqual(self.call(counter, "add", 2), 2)  # type: ignore[attr-defined]
        self.assertEqual(self.call(counter, "add"), 3)  # type: ignore[attr-defined]

    def test_referenceSentBackIsOriginal(self) -> None:
        """A reference sent back to its owner arrives as the original object."""
        counter = self.call(self.root, "counter")
        self.assertIs(self.call(self.root, "isCounter", counter), True)  # type: ignore[attr-defined]

    def test_referenceCounting(self) -> None:
        """Each received reference is counted; dropping them all frees the export."""
        first = self.call(self.root, "counter")
        second = self.call(self.root, "counter")
        self.assertEqual(first.luid, second.luid)  # type: ignore[attr-defined]
        exported = self.server.localObjects[first.luid]
        self.assertEqual(exported.refcount, 2)  # type: ignore[attr-defined]
        del first
        gc.collect()
        self.pump.flush()
        self.assertEqual(exported.refcount, 1)  # type: ignore[attr-defined]
        del second
        gc.collect()
        self.pump.flush()
        self.assertEqual(list(self.server.localObjects), [b"root"])  # type: ignore[attr-defined]

    def test_remoteException(self) -> None:
        """An exception arrives as a failure carrying its type name and message."""
        failure = self.call(self.root, "fail", "bad thing")
        self.assertIsInstance(failure, Failure)  # type: ignore[attr-defined]
        self.assertTrue(failure.check(ValueError))  # type: ignore[attr-defined]
        self.assertEqual(failure.type, b"builtins.ValueError")  # type: ignore[attr-defined]
        self.assertEqual(failure.value, "bad thing")  # type: ignore[attr-defined]
        self.flushLoggedErrors(ValueError)  # type: ignore[attr-defined]

    def test_pbErrorUnderTwistedName(self) -> None:
        """A pb.Error travels as twisted.spread.pb.Error and traps as either class."""
        failure = self.call(self.root, "error", "refused")
        self.assertEqual(failure.type, b"twisted.spread.pb.Error")  # type: ignore[attr-defined]
        self.assertTrue(failure.check(self.clientModule.Error))  # type: ignore[attr-defined]
        self.assertEqual(failure.value, "refused")  # type: ignore[attr-defined]

    def test_noSuchMethod(self) -> None:
        """An unknown method fails with NoSuchMethod, trappable by the caller's class."""
        failure = self.call(self.root, "doesNotExist")
        self.assertEqual(failure.type, b"twisted.spread.flavors.NoSuchMethod")  # type: ignore[attr-defined]
        self.assertTrue(failure.check(self.clientModule.NoSuchMethod))  # type: ignore[attr-defined]
        self.flushLoggedErrors()  # type: ignore[attr-defined]

    def test_oneWayCall(self) -> None:
        """pbanswer=False sends the call and never an answer."""
        self.assertIsNone(self.root.callRemote("record", 5, pbanswer=False))  # type: ignore[attr-defined]
        self.pump.flush()
        self.assertEqual(self.rootObject.received, [5])  # type: ignore[attr-defined]
        self.assertEqual(self.client.waitingForAnswers, {})  # type: ignore[attr-defined]

    def test_deferredResult(self) -> None:
        """A Deferred result is answered when it fires."""
        results: list[Any] = []
        self.root.callRemote("wait").addBoth(results.append)
        self.pump.flush()
        self.assertEqual(results, [])  # type: ignore[attr-defined]
        self.rootObject.pending.callback("done")
        self.pump.flush()
        self.assertEqual(results, ["done"])  # type: ignore[attr-defined]

    def test_disconnectFailsPendingCalls(self) -> None:
        """Calls still waiting when the connection drops fail with PBConnectionLost."""
        results: list[Any] = []
        self.root.callRemote("wait").addBoth(results.append)
        self.pump.flush()
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(len(results), 1)  # type: ignore[attr-defined]
        self.assertTrue(results[0].check(self.clientModule.PBConnectionLost))  # type: ignore[attr-defined]


class ObjectGivenBackTestsMixin:
    """
    The caller's own object, handed back in an answer, by a pbroker server.
    """

    clientModule: Any
    server: Any
    client: Any
    pump: Any
    root: Any
    call: Callable[..., Any]

    def test_callersObjectGivenBack(self) -> None:
        """
        An answer that hands the caller's object back arrives as that object, although the
        server's reference to it is gone once the answer is packed: its decref waits for the
        answer. Stock Twisted PB sends the decref first, and the caller gets ``None``.
        """
        counter = self.clientModule.Referenceable()
        self.assertIs(self.call(self.root, "echo", counter), counter)  # type: ignore[attr-defined]
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.client.localObjects.get(1), None)  # type: ignore[attr-defined]
        self.assertEqual(self.server.importedReferences, 0)  # type: ignore[attr-defined]


class PbrokerToPbrokerTests(ObjectGivenBackTestsMixin, BrokerTestsMixin, SynchronousTestCase):
    serverModule = pb
    clientModule = pb


class PbrokerToPbrokerPbDialectTests(
    ObjectGivenBackTestsMixin, BrokerTestsMixin, SynchronousTestCase
):
    """
    Two pbroker peers held to PB's encoding (the ``pbroker1`` dialect).
    """

    serverModule = pb
    clientModule = pb
    clientOptions = {"dialects": [b"pbroker1", b"pb"]}

    def test_dialect(self) -> None:
        """The client chose PB's encoding."""
        self.assertEqual(self.client.currentDialect, b"pbroker1")
        self.assertFalse(self.client.isNative)


class PbrokerServerTwistedClientTests(
    ObjectGivenBackTestsMixin, BrokerTestsMixin, SynchronousTestCase
):
    serverModule = pb
    clientModule = twistedPb


class TwistedServerPbrokerClientTests(BrokerTestsMixin, SynchronousTestCase):
    serverModule = twistedPb
    clientModule = pb


class Point(pb.Copyable):
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


class RemotePoint(pb.RemoteCopy):
    pass


def pointStating(state: Any) -> Point:
    """
    A Point sent under Point's tag with ``state`` for its state (malformed, or empty).
    """

    class Stated(Point):
        def getTypeToCopy(self) -> bytes:
            return b"tests.test_broker.Point"

        def getStateToCopy(self) -> Any:
            return state

    return Stated(0, 0)


class CopyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = jelly.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(Point, RemotePoint)

        class PointRoot(pb.Root):
            def remote_point(self) -> Point:
                return Point(1, 2)

            def remote_norm(self, point: Any) -> int:
                return int(point.x + point.y)

        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(PointRoot(), registry=self.registry),
            pb.PBClientFactory(registry=self.registry),
        )
        self.root = self.client.remoteForName("root")

    def test_copyableArrivesAsRemoteCopy(self) -> None:
        """A Copyable arrives as the RemoteCopy registered for its tag, with its state."""
        results: list[Any] = []
        self.root.callRemote("point").addBoth(results.append)
        self.pump.flush()
        [point] = results
        self.assertIsInstance(point, RemotePoint)
        self.assertEqual((point.x, point.y), (1, 2))

    def test_copyableAsArgument(self) -> None:
        """A Copyable passed as an argument is copied to the server."""
        results: list[Any] = []
        self.root.callRemote("norm", Point(3, 4)).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(results, [7])

    def test_unregisteredCopyRefused(self) -> None:
        """Without a registered copier the receiver refuses the copy: the call fails."""
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(self.server.localObjectForID(b"root")), pb.PBClientFactory()
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("point").addBoth(results.append)
        pump.flush()
        self.assertTrue(results[0].check(jelly.InsecureJelly))

    def eachDialect(self, rootObject: Any) -> Iterator[tuple[list[bytes], Any, Any]]:
        """
        ``(dialects, client, pump)`` for a new connection to ``rootObject`` in each of
        ``pb`` and ``pbroker2``.
        """
        for dialects in ([b"pb"], [b"pbroker2"]):
            _server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(rootObject, registry=self.registry),
                pb.PBClientFactory(registry=self.registry, dialects=dialects),
            )
            yield dialects, client, pump

    def test_malformedCopyState(self) -> None:
        """A copy whose state (from the peer) cannot become a RemoteCopy's attributes fails
        the call with InvalidJelly naming the class and the fault, not a TypeError from
        inside; in both dialects, and the connection keeps serving."""
        rootObject = self.server.localObjectForID(b"root")
        cases = [
            ([1, 2], "a copy of tests.test_broker.RemotePoint needs a dictionary state, not list"),
            (
                {1: 2},
                "the state of a copy of tests.test_broker.RemotePoint has a key that is not text",
            ),
        ]
        for _dialects, client, pump in self.eachDialect(rootObject):
            root = client.remoteForName("root")
            for state, message in cases:
                rootObject.remote_malformed = lambda state=state: pointStating(state)
                results: list[Any] = []
                root.callRemote("malformed").addBoth(results.append)
                root.callRemote("point").addBoth(results.append)
                pump.flush()
                failure, point = results
                self.assertIs(failure.type, InvalidJelly)
                self.assertEqual(failure.getErrorMessage(), message)
                self.assertEqual((point.x, point.y), (1, 2))
            self.assertFalse(client.transport.disconnecting)

    def test_emptyCopyState(self) -> None:
        """A copy whose state is empty (``None``, as ``__getstate__`` gives for an object
        without attributes, or an empty list, text or zero) arrives with no attributes, as
        Twisted's RemoteCopy takes it; in both dialects."""
        rootObject = self.server.localObjectForID(b"root")
        for dialects, client, pump in self.eachDialect(rootObject):
            root = client.remoteForName("root")
            for state in (None, [], (), "", b"", 0, 0.0, False, {}):
                rootObject.remote_empty = lambda state=state: pointStating(state)
                results: list[Any] = []
                root.callRemote("empty").addBoth(results.append)
                pump.flush()
                [copy] = results
                self.assertIsInstance(copy, RemotePoint, f"{dialects} {state!r}")
                self.assertEqual(copy.__dict__, {})

    def test_withoutABroker(self) -> None:
        """Jellied without a broker (jelly.jelly), a Copyable or a Cacheable is its class
        name and attributes, as in Twisted, and unjellies as the registered copy; a
        Referenceable or a Viewable, which only a connection can carry, is unpersistable."""
        expression = jelly.jelly(Point(1, 2))
        self.assertEqual(
            expression,
            [
                b"tests.test_broker.Point",
                [b"dictionary", [[b"unicode", b"x"], 1], [[b"unicode", b"y"], 2]],
            ],
        )
        point = jelly.unjelly(expression, registry=self.registry)
        self.assertIsInstance(point, RemotePoint)
        self.assertEqual(vars(point), {"x": 1, "y": 2})
        gauge = Gauge()
        self.assertEqual(
            jelly.jelly(gauge),
            [
                b"tests.test_broker.Gauge",
                [
                    b"dictionary",
                    [[b"unicode", b"observers"], [b"list"]],
                    [[b"unicode", b"stopped"], 0],
                ],
            ],
        )
        self.assertEqual(
            jelly.jelly([pb.Referenceable(), pb.Viewable()]),
            [
                b"list",
                [b"unpersistable", b"a Referenceable can only be sent through a broker"],
                [b"unpersistable", b"a Viewable can only be sent through a broker"],
            ],
        )

    def test_callCancelledWhileItsAnswerIsUnjellied(self) -> None:
        """A call that application code cancels while its answer or error is unjellied (a
        copy's setCopyableState) fails with CancelledError alone: the answer, the error, or
        the refusal of the answer that follows the cancel, is dropped, and the connection
        stays."""
        calls: list[Deferred[Any]] = []

        class CancellingPoint(pb.RemoteCopy):
            def setCopyableState(self, state: Any) -> None:
                calls[-1].cancel()
                if state["x"] < 0:
                    raise ValueError("refused after the cancel")
                super().setCopyableState(state)

        class CancellingError(pb.RemoteCopy, pb.Error):
            def setCopyableState(self, state: Any) -> None:
                calls[-1].cancel()
                super().setCopyableState(state)

        class Root(pb.Root):
            def remote_point(self, x: int) -> Point:
                return Point(x, 2)

            def remote_error(self) -> None:
                raise RichError("failed")

        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(Point, CancellingPoint)
        registry.setUnjellyableForClass(RichError, CancellingError)
        for dialects in (None, [b"pb"]):
            server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(Root()), pb.PBClientFactory(registry=registry, dialects=dialects)
            )
            root = client.remoteForName("root")
            for args in (("point", 1), ("point", -1), ("error",)):
                calls.append(root.callRemote(*args))
                pump.flush()
                self.failureResultOf(calls[-1], CancelledError)
                self.assertEqual((client.waitingForAnswers, client._abandoned), ({}, set()))
                self.assertFalse(client.disconnected)
            unrelated: Deferred[Any] = Deferred()
            unrelated.addErrback(lambda _: None)
            calls.append(unrelated)  # what the next copy cancels: the call is answered
            results: list[Any] = []
            root.callRemote("point", 3).addBoth(results.append)
            pump.flush()
            self.assertEqual([(point.x, point.y) for point in results], [(3, 2)])
            self.assertFalse(server.disconnected)


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rootObject = rootFor(pb)
        self.factory = pb.PBServerFactory(self.rootObject)
        self.broker = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8789))
        self.transport = StringTransport()
        self.broker.makeConnection(self.transport)
        self.broker.dataReceived(banana.encode(b"pb"))
        self.transport.clear()

    def send(self, *message: Any) -> None:
        self.broker.dataReceived(banana.encode(list(message), b"pb"))

    def answer(self) -> Any:
        return banana.Decoder(b"pb").feed(self.transport.value())

    def test_versionMismatchDrops(self) -> None:
        """A version other than 6 drops the connection."""
        with capturedLogs() as events:
            self.send(b"version", 5)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("Version Incompatibility", str(events[0]["why"]))

    def test_invalidObjectId(self) -> None:
        """A call to an unknown object id fails with pb.Error('Invalid Object ID')."""
        self.send(b"message", 1, 99, b"echo", 1, [b"tuple", 1], [b"dictionary"])
        [message] = self.answer()
        self.assertEqual(message[:2], [b"error", 1])
        failure = jelly.unjelly(message[2], registry=self.broker.registry)
        self.assertEqual(failure.type, b"twisted.spread.pb.Error")
        self.assertEqual(failure.value, "Invalid Object ID")

    def test_unknownCommand(self) -> None:
        """An unknown command is answered with didNotUnderstand, and the link stays."""
        self.send(b"frobnicate", 1)
        self.assertEqual(self.answer(), [[b"didNotUnderstand", b"frobnicate"]])
        self.assertFalse(self.transport.disconnecting)

    def test_commandNotBytes(self) -> None:
        """A command that is not a string at all (a number, a list) makes the message
        malformed: the connection drops with a line saying so, as Twisted's does (its broker
        cannot decode it), rather than leaving the peer waiting for an answer."""
        for command in (7, [b"message"]):
            self.setUp()
            with capturedLogs() as events:
                self.send(command, 1)
            self.assertEqual(self.answer(), [])
            self.assertTrue(self.transport.disconnecting)
            self.assertIn(
                f"a PB message's command must be a byte string: [{describe(command)}, 1]",
                [str(e.get("why")) for e in events],
            )

    def test_decrefOfUnknownIdDrops(self) -> None:
        """A decref for an id never exported is a protocol error: the link drops."""
        self.send(b"decref", 42)
        self.assertTrue(self.transport.disconnecting)

    def test_answerToNoRequestDrops(self) -> None:
        """An answer to a request never made is a protocol error."""
        self.send(b"answer", 7, 1)
        self.assertTrue(self.transport.disconnecting)

    def test_wrongArityDrops(self) -> None:
        """A message with the wrong number of fields is a protocol error."""
        self.send(b"message", 1, b"root")
        self.assertTrue(self.transport.disconnecting)

    def test_nonListDrops(self) -> None:
        """Every PB message is a list."""
        self.broker.dataReceived(banana.encode(5, b"pb"))
        self.assertTrue(self.transport.disconnecting)

    def test_privateNamesNotCallable(self) -> None:
        """Names with a leading underscore or that are not identifiers are never looked up."""
        for name in (b"__init__", b"_private", b"a-b", b"x.y"):
            self.transport.clear()
            self.send(b"message", 1, b"root", name, 1, [b"tuple"], [b"dictionary"])
            [message] = self.answer()
            failure = jelly.unjelly(message[2], registry=self.broker.registry)
            self.assertEqual(failure.type, b"twisted.spread.flavors.NoSuchMethod")
        self.flushLoggedErrors()

    def test_bytesKeywordsAccepted(self) -> None:
        """Keyword names sent as bytes (by Python 2 peers) are decoded."""
        self.send(b"message", 1, b"root", b"echo", 1, [b"tuple", 1], [b"dictionary", [b"k", 2]])
        [message] = self.answer()
        self.assertEqual(jelly.unjelly(message[2]), ((1,), {"k": 2}))

    def test_referenceLimit(self) -> None:
        """Exporting more than MAX_BROKER_REFS objects fails with pb.Error; repeat offenders
        are disconnected."""
        for _ in range(pb.MAX_BROKER_REFS):
            self.broker.registerReference(pb.Referenceable())
        with self.assertRaises(pb.Error):
            self.broker.registerReference(pb.Referenceable())
        for _ in range(3):
            with self.assertRaises(pb.Error):
                self.broker.registerReference(pb.Referenceable())
        self.assertTrue(self.transport.disconnecting)


class CallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rootObject = rootFor(pb)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject), pb.PBClientFactory()
        )
        self.root = self.client.remoteForName("root")

    def test_referencesSort(self) -> None:
        """References through one broker sort by luid, as in Twisted (numbered before
        named); references through different brokers do not compare."""

        class Root(pb.Root):
            def remote_refs(self) -> list[pb.Referenceable]:
                return [pb.Referenceable() for _ in range(3)]

        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root()), pb.PBClientFactory()
        )
        results: list[Any] = []
        root = client.remoteForName("root")
        root.callRemote("refs").addBoth(results.append)
        pump.flush()
        refs = results[0]
        self.assertEqual([r.luid for r in sorted([root, *refs[::-1]])], [1, 2, 3, b"root"])
        self.assertTrue(refs[0] <= refs[0] < refs[1])
        with self.assertRaises(TypeError):
            _ = refs[0] < self.root

    def test_referenceOnlyOverItsConnection(self) -> None:
        """A reference given to a call on another connection fails that call with JellyError
        (stock PB asserts), in both dialects; both connections keep serving and the reference
        still works on its own; without a broker it jellies as unpersistable, as in Twisted."""
        answers: list[Any] = []
        self.root.callRemote("counter").addBoth(answers.append)
        self.pump.flush()
        [counter] = answers
        for dialects in ([b"pb"], [b"pbroker2"]):
            _server, other, otherPump = connectedServerAndClient(
                pb.PBServerFactory(rootFor(pb)), pb.PBClientFactory(dialects=dialects)
            )
            results: list[Any] = []
            otherRoot = other.remoteForName("root")
            otherRoot.callRemote("echo", [counter]).addBoth(results.append)
            otherPump.flush()
            [failure] = results
            self.assertIs(failure.type, jelly.JellyError)
            self.assertEqual(
                failure.getErrorMessage(),
                "a RemoteReference can only be sent over the connection it came from",
            )
            otherRoot.callRemote("echo", 2).addBoth(results.append)
            otherPump.flush()
            self.assertEqual(results[1:], [2])
            self.assertFalse(other.transport.disconnecting)
        counter.callRemote("add").addBoth(answers.append)
        self.pump.flush()
        self.assertEqual(answers[1:], [1])
        self.assertEqual(
            jelly.jelly(counter), [b"unpersistable", b"References cannot be serialized"]
        )

    def test_referenceComparisons(self) -> None:
        """A reference, or a remote method, equals only its own kind: against anything else
        it is unequal and does not order; equal remote methods hash alike."""
        self.assertNotEqual(self.root, b"root")
        self.assertFalse(self.root == 1)
        with self.assertRaises(TypeError):
            _ = self.root < 1
        self.assertEqual(repr(self.root), f"<RemoteReference b'root' at 0x{id(self.root):x}>")
        echo = self.root.remoteMethod("echo")
        self.assertNotEqual(echo, "echo")
        self.assertEqual(hash(echo), hash(self.root.remoteMethod("echo")))
        self.assertEqual(len({echo, self.root.remoteMethod("echo")}), 1)

    def test_notifyOnDisconnectNeedsACallable(self) -> None:
        """A callback that cannot be called is refused when given, not when the connection
        is lost, and is not registered."""
        with self.assertRaises(TypeError) as caught:
            self.root.notifyOnDisconnect(None)  # type: ignore[arg-type]
        self.assertEqual(str(caught.exception), "notifyOnDisconnect() needs a callable, not None")
        self.assertEqual(self.root.disconnectCallbacks, [])
        self.client.transport.loseConnection()
        self.pump.flush()

    def test_oneWayCallThatCannotBeSent(self) -> None:
        """A one-way call that cannot be sent raises why, having no Deferred to fail: a value
        that cannot be serialised, one over PB's ceiling in the pb dialect, a dead broker."""
        aware = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
        with self.assertRaises(jelly.JellyError):
            self.root.callRemote("record", aware, pbanswer=False)
        _server, client, _pump = connectedServerAndClient(
            pb.PBServerFactory(rootFor(pb)), pb.PBClientFactory(dialects=[b"pb"])
        )
        with self.assertRaises(banana.BananaEncodeError):
            client.remoteForName("root").callRemote("record", b"x" * 700_000, pbanswer=False)
        self.client.transport.loseConnection()
        self.pump.flush()
        with self.assertRaises(DeadReferenceError):
            self.root.callRemote("record", 1, pbanswer=False)

    def test_pagerWithPagesThatCannotBeSent(self) -> None:
        """A pager whose page cannot be sent (over PB's ceiling, in the pb dialect) fails at
        once, where it was started, and is dropped: the call that started it fails (stock
        PB raises there too), where it used to stall without a word."""
        from pbroker import util

        class Archive(pb.Root):
            def remote_download(self, collector: Any) -> None:
                util.StringPager(collector, b"a" * 1_400_000, 700_000)

        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Archive()), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        with capturedLogs():
            util.getAllPages(client.remoteForName("root"), "download").addBoth(results.append)
            pump.flush()
        self.assertIn("too long to send", str(results[0].value))
        self.assertEqual(server.pageProducers, [])
        self.flushLoggedErrors()

    def test_asyncMethodsAwaited(self) -> None:
        """An async def remote method is awaited; its result is the answer."""
        waiting: Deferred[int] = Deferred()

        class AsyncRoot(pb.Root):
            async def remote_double(self, value: int) -> int:
                return 2 * await waiting + value

        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(AsyncRoot()), pb.PBClientFactory()
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("double", 1).addBoth(results.append)
        pump.flush()
        self.assertEqual(results, [])
        waiting.callback(20)
        pump.flush()
        self.assertEqual(results, [41])

    def test_textTakesTheUnicodeCheck(self) -> None:
        """
        In the PB dialects text arrives decoded as str, and is still refused where the
        security options refuse unicode.
        """

        class NoText(jelly.SecurityOptions):
            def isTypeAllowed(self, typeName: str | bytes) -> bool:
                return typeName not in ("unicode", b"unicode") and super().isTypeAllowed(typeName)

        noText = NoText()
        noText.allowBasicTypes()
        for security in (jelly.globalSecurity, noText):
            root = rootFor(pb)
            _server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(root, security=security), pb.PBClientFactory(dialects=[b"pb"])
            )
            results: list[Any] = []
            remote = client.remoteForName("root")
            remote.callRemote("record", ["ü", ("text",)]).addBoth(results.append)
            remote.callRemote("record", b"bytes").addBoth(results.append)
            # An entry whose bytes are the same as text's still arrives as it was sent.
            remote.callRemote("record", {b"unicode": b"xy"}).addBoth(results.append)
            pump.flush()
            self.assertEqual(client.currentDialect, b"pb")
            if security is jelly.globalSecurity:
                self.assertEqual(results, [None, None, None])
                self.assertEqual(root.received, [["ü", ("text",)], b"bytes", {b"unicode": b"xy"}])
            else:
                self.assertTrue(results[0].check(jelly.InsecureJelly), results)
                self.assertEqual(results[1:], [None, None])
                self.assertEqual(root.received, [b"bytes", {b"unicode": b"xy"}])

    def test_callAfterDisconnectRaises(self) -> None:
        """A call through a dead broker raises DeadReferenceError at once, as Twisted's does
        (code written for PB catches it around the call); with options too."""
        self.client.transport.loseConnection()
        self.pump.flush()
        with self.assertRaises(DeadReferenceError) as caught:
            self.root.callRemote("echo", 1)
        self.assertEqual(str(caught.exception), "Calling Stale Broker")
        with self.assertRaises(DeadReferenceError):
            self.root.withOptions(timeout=5).callRemote("echo", 1)

    def test_notifyOnDisconnect(self) -> None:
        """Disconnect callbacks of a reference run once with the reference."""
        seen: list[Any] = []
        self.root.notifyOnDisconnect(seen.append)
        self.root.notifyOnDisconnect(lambda ref: seen.append("second"))

        def removed(ref: Any) -> None:
            seen.append("removed")

        self.root.notifyOnDisconnect(removed)
        self.root.dontNotifyOnDisconnect(removed)
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(seen, [self.root, "second"])

    def test_remoteMethod(self) -> None:
        """remoteMethod gives a callable bound to one remote method."""
        echo = self.root.remoteMethod("echo")
        results: list[Any] = []
        echo(9).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(results, [9])
        self.assertEqual(echo, self.root.remoteMethod("echo"))

    def test_copiedFailureText(self) -> None:
        """A failure from the peer reads as Twisted's does: its brief remote traceback, a
        line ending in a newline (twisted.web.distrib's error page embeds it), whether or
        not the peer sent its traceback."""
        text = "[Failure instance: Traceback from remote host -- builtins.ValueError: boom\n]"
        for module in (twistedPb, pb):
            for unsafe in (False, True):
                root = rootFor(module)
                _server, client, pump = connect(
                    module.PBServerFactory(root, unsafeTracebacks=unsafe), pb.PBClientFactory()
                )
                results: list[Any] = []
                client.remoteForName("root").callRemote("fail", "boom").addBoth(results.append)
                pump.flush()
                self.flushLoggedErrors(ValueError)
                self.assertEqual(str(results[0]), text, (module, unsafe))
                # What a stock client reads for the same failure.
                _server, stock, pump = connect(
                    module.PBServerFactory(root, unsafeTracebacks=unsafe),
                    twistedPb.PBClientFactory(),
                )
                results = []
                stock.remoteForName("root").callRemote("fail", "boom").addBoth(results.append)
                pump.flush()
                self.flushLoggedErrors(ValueError)
                self.assertEqual(str(results[0]), text, (module, unsafe, "stock client"))

    def test_remoteErrorInCoroutine(self) -> None:
        """Awaited in a coroutine, a remote failure raises RemoteError with type and value."""

        async def use() -> Any:
            try:
                await self.root.callRemote("fail", "oops")
            except RemoteError as e:
                return e.remoteType, str(e), e.args, e.remoteTraceback

        d = Deferred.fromCoroutine(use())
        self.pump.flush()
        self.flushLoggedErrors(ValueError)
        self.assertEqual(
            self.successResultOf(d),
            (b"builtins.ValueError", "oops", ("oops",), "Traceback unavailable\n"),
        )
        stock = twistedPb.RemoteError(b"builtins.ValueError", "oops", "tb")
        mine = RemoteError(b"builtins.ValueError", "oops", "tb")
        self.assertEqual((str(mine), mine.args), (str(stock), stock.args))

    def test_unsafeTracebacks(self) -> None:
        """With unsafeTracebacks the caller receives the remote traceback text."""
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(rootFor(pb), unsafeTracebacks=True), pb.PBClientFactory()
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("fail", "x").addBoth(results.append)
        pump.flush()
        self.flushLoggedErrors(ValueError)
        self.assertIn("remote_fail", results[0].traceback)

    def test_factoryGetRootObject(self) -> None:
        """getRootObject fires with the root once connected, now or later."""
        factory = pb.PBClientFactory()
        early = factory.getRootObject()
        _server, _client, _pump = connectedServerAndClient(pb.PBServerFactory(rootFor(pb)), factory)
        root = self.successResultOf(early)
        self.assertEqual(root.luid, b"root")
        self.assertIs(self.successResultOf(factory.getRootObject()), root)

    def test_factoryDisconnectBeforeReady(self) -> None:
        """disconnect() while the connection is still choosing its dialect fails the root
        requests and closes that connection, in either dialect, rather than leaving it up
        for a later getRootObject to take."""
        for dialects in (None, [b"pb"]):
            factory = pb.PBClientFactory(dialects=dialects)
            server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(rootFor(pb)), factory, greet=False
            )
            early = factory.getRootObject()
            factory.disconnect()
            self.failureResultOf(early, PBConnectionLost)
            pump.flush()
            self.assertTrue(client.disconnected)
            self.assertTrue(server.disconnected)
            self.assertNoResult(factory.getRootObject())

    def test_factoryDisconnectBeforeConnected(self) -> None:
        """disconnect() right after connectTCP, before the connection is made, stops the
        connector, as well as failing the root requests."""
        memory = MemoryReactorClock()
        factory = pb.PBClientFactory()
        memory.connectTCP("127.0.0.1", 8789, factory)
        early = factory.getRootObject()
        factory.disconnect()
        self.failureResultOf(early, PBConnectionLost)
        [connector] = memory.connectors
        self.assertTrue(connector.stoppedConnecting)

    def test_factoryDisconnectBeforeTheEndpointConnects(self) -> None:
        """disconnect() after pb.connect, before its endpoint has connected, cancels the
        endpoint's attempt (endpoints call no startedConnecting)."""
        cancelled: list[str] = []

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                return Deferred(lambda attempt: cancelled.append("cancelled"))

        factory = pb.PBClientFactory()
        root = pb.connect(Endpoint(), factory)  # type: ignore[arg-type]
        factory.disconnect()
        self.failureResultOf(root, PBConnectionLost)
        self.assertEqual(cancelled, ["cancelled"])
        self.assertIsNone(factory._attempt)
        # One that connected is not cancelled later: the connection is the factory's.
        connected: list[Deferred[Any]] = []

        class Connecting:
            def connect(self, factory: Any) -> Deferred[Any]:
                connected.append(Deferred(lambda attempt: cancelled.append("late")))
                return connected[-1]

        factory = pb.PBClientFactory()
        pb.connect(Connecting(), factory)  # type: ignore[arg-type]
        connected[0].callback(None)
        self.assertIsNone(factory._attempt)

    def test_factoryDisconnectBeforeReadyStockStyleSubclass(self) -> None:
        """A factory subclass whose buildProtocol builds its broker the stock way (not
        through PBClientFactory.buildProtocol) has a connection still choosing its dialect
        closed by disconnect() too: the broker tells its factory it is connecting."""

        class StockStyle(pb.PBClientFactory):
            def buildProtocol(self, addr: Any) -> pb.Broker:
                broker = self.protocol(isClient=True)
                broker.factory = self
                return broker

        factory = StockStyle()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(rootFor(pb)), factory, greet=False
        )
        factory.getRootObject().addErrback(lambda failure: None)
        factory.disconnect()
        pump.flush()
        self.assertTrue(client.disconnected)
        self.assertTrue(server.disconnected)

    def test_factoryConnectionFailed(self) -> None:
        """A failed connection fails every getRootObject caller with its reason, once; a
        connection lost while reconnecting fails them too but keeps the broker and root, as
        in Twisted."""
        factory = pb.PBClientFactory()
        waiting = [factory.getRootObject(), factory.getRootObject()]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # type: ignore[arg-type]
        for deferred in waiting:
            self.failureResultOf(deferred, ConnectionRefusedError)
        self.assertEqual(factory.rootObjectRequests, [])
        connected = self.client.factory
        root = connected._root
        pending = Deferred[Any]()
        connected.rootObjectRequests.append(pending)
        connected.clientConnectionLost(None, Failure(ConnectionDone()), reconnecting=True)
        self.failureResultOf(pending, ConnectionDone)
        self.assertIs(connected._broker, self.client)
        self.assertIs(connected._root, root)

    def test_connectThroughAFailingEndpoint(self) -> None:
        """pb.connect through an endpoint that cannot connect fails its Deferred, and the
        factory's getRootObject callers, with the endpoint's reason."""

        class Refusing:
            def connect(self, factory: Any) -> Deferred[Any]:
                return fail(ConnectionRefusedError("no one there"))

        factory = pb.PBClientFactory()
        early = factory.getRootObject()
        root = pb.connect(Refusing(), factory)  # type: ignore[arg-type]
        self.assertEqual(
            self.failureResultOf(root, ConnectionRefusedError).getErrorMessage(),
            "Connection was refused by other side: no one there.",
        )
        self.failureResultOf(early, ConnectionRefusedError)

    def test_listenAndConnectCheckTheirArguments(self) -> None:
        """pb.listen and pb.connect refuse, naming it, an endpoint that is neither a string
        nor an endpoint (bytes, say) and a factory of the wrong side, at the call."""
        memory = MemoryReactorClock()
        server, client = pb.PBServerFactory(self.rootObject), pb.PBClientFactory()
        for call, named in (
            (lambda: pb.listen(b"tcp:0", server, memory), "endpoint must be an endpoint string"),
            (lambda: pb.connect(b"tcp:h:1", client, memory), "endpoint must be an endpoint string"),
            (lambda: pb.listen("tcp:0", client, memory), "serves a server factory"),
            (lambda: pb.listen("tcp:0", None, memory), "serves a server factory"),
            (lambda: pb.connect("tcp:h:1", server, memory), "needs a PBClientFactory"),
        ):
            with self.assertRaises(TypeError) as caught:
                call()
            self.assertIn(named, str(caught.exception))
        self.assertEqual((memory.tcpServers, memory.tcpClients), ([], []))

    def test_listenAndConnectOnTheReactorGiven(self) -> None:
        """pb.listen and pb.connect with an endpoint string listen and connect through the
        reactor they are given, not the global one."""
        memory = MemoryReactorClock()
        listening = pb.listen(
            "tcp:8790:interface=127.0.0.1", pb.PBServerFactory(self.rootObject), memory
        )
        [(port, _factory, _backlog, interface)] = memory.tcpServers
        self.assertEqual((port, interface), (8790, "127.0.0.1"))
        self.assertEqual(self.successResultOf(listening).getHost().port, 8790)
        root = pb.connect("tcp:host=127.0.0.1:port=8790", pb.PBClientFactory(), memory)
        [(host, port, *_)] = memory.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8790))
        pump = iosim.ConnectionCompleter(memory).succeedOnce()
        assert pump is not None
        pump.flush()
        answers: list[Any] = []
        self.successResultOf(root).callRemote("echo", "through memory").addBoth(answers.append)
        pump.flush()
        self.assertEqual(answers, ["through memory"])

    def test_inMemoryLooksAFewLayersDeep(self) -> None:
        """Whether a broker is connected in memory is looked for through a few wrapping
        transports only: a transport that wraps itself ends the search (no endless loop),
        as does an in-memory transport under more wrappers than a broker ever has."""

        class Wrapping:
            def __init__(self, transport: Any) -> None:
                self.transport = transport

        class Broker:
            transport: Any = None

        broker = Broker()
        broker.transport = Wrapping(Wrapping(Wrapping(StringTransport())))
        self.assertTrue(pb._inMemory(broker))
        broker.transport = Wrapping(broker.transport)
        self.assertFalse(pb._inMemory(broker))
        loop = Wrapping(None)
        loop.transport = loop
        broker.transport = loop
        self.assertFalse(pb._inMemory(broker))

    def test_exportedObjectRepr(self) -> None:
        """The exporting side's entry for an object shows it and how many references the
        peer holds to it."""
        received: list[Any] = []
        for _ in range(2):
            self.root.callRemote("counter").addBoth(received.append)
        self.pump.flush()
        local = self.server.localObjects[received[0].luid]
        self.assertEqual(repr(local), f"<pbroker.Local {self.rootObject.counter!r} ref:2>")

    def test_twistedFailureCopiedFailureTrapsPbrokerNames(self) -> None:
        """A failure from stock Twisted traps with pbroker's class of the same role."""
        state = twistedPb.CopyableFailure(twistedPb.Error("no")).getStateToCopy()
        copied = jelly.unjelly(
            [b"twisted.spread.pb.CopyableFailure", twistedJelly.jelly(state)],
            registry=self.client.registry,
        )
        self.assertIs(copied.check(pb.Error), pb.Error)
        with self.assertRaises(RemoteError):
            copied.raiseException()

    def test_copiedFailureKeepsItsMethods(self) -> None:
        """A copied failure whose state names methods of Failure's (a hostile peer's) keeps
        them: only the keys a failure's state has are taken."""
        state = twistedPb.CopyableFailure(twistedPb.Error("no")).getStateToCopy()
        state.update(check=0, getErrorMessage=0, trap=0, raiseException=0, count="x")
        copied = jelly.unjelly(
            [b"twisted.spread.pb.CopyableFailure", twistedJelly.jelly(state)],
            registry=self.client.registry,
        )
        self.assertIs(copied.check(pb.Error), pb.Error)
        self.assertEqual(copied.getErrorMessage(), "no")
        self.assertEqual(copied.count, 0)
        with self.assertRaises(RemoteError):
            copied.raiseException()
        # And over a connection, from a peer whose error carries such a state.

        class Evil(Exception, pb.Copyable):
            def getTypeToCopy(self) -> bytes:
                return b"twisted.spread.pb.CopyableFailure"

            def getStateToCopy(self) -> Any:
                return state

        def evil() -> None:
            raise Evil()

        self.server.factory.root.remote_evil = evil
        results: list[Any] = []
        self.root.callRemote("evil").addBoth(results.append)
        self.pump.flush()
        self.flushLoggedErrors(Evil)
        self.assertIs(results[0].check(pb.Error), pb.Error)
        self.assertEqual(results[0].getErrorMessage(), "no")

    def test_rootMustBeIPBRoot(self) -> None:
        """A root that does not provide IPBRoot is refused when the factory is made."""
        with self.assertRaises(TypeError):
            pb.PBServerFactory(pb.Referenceable())

    def test_oneWayCallThatFailsLater(self) -> None:
        """A one-way call whose method's Deferred fails is logged; the caller is sent
        nothing, and the call stops counting as in progress."""
        self.root.callRemote("wait", pbanswer=False)
        self.pump.flush()
        self.assertEqual(self.server._oneWayPending, 1)
        with capturedLogs() as events:
            self.rootObject.pending.errback(ValueError("failed later"))
        self.assertEqual(self.server._oneWayPending, 0)
        [event] = [e for e in events if "log_failure" in e]
        self.assertEqual(event["log_format"], "A one-way remote call failed")
        self.assertEqual(str(event["log_failure"].value), "failed later")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertFalse(self.pump.pump())  # nothing was written for the caller
        self.assertEqual(self.client.waitingForAnswers, {})

    def test_largeReadsLeaveTheCollectorOff(self) -> None:
        """An application that turned the cyclic collector off finds it off after large
        reads (which pause it while they are decoded), in both directions."""
        self.addCleanup(gc.enable)
        gc.disable()
        results: list[Any] = []
        self.root.callRemote("echo", b"x" * 10_000).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(results, [b"x" * 10_000])
        self.assertFalse(gc.isenabled())

    def test_pendingCallsOnLostConnection(self) -> None:
        """The failure of a pending call says the connection was lost."""
        d = self.root.callRemote("wait")
        self.pump.flush()
        self.client.connectionLost(Failure(Exception("gone")))
        self.assertTrue(self.failureResultOf(d).check(PBConnectionLost))

    def test_callCancelledWhileTheOthersFail(self) -> None:
        """A pending call that the failure of another cancels, as the connection is lost,
        fails once, with CancelledError; the rest of the loss is handled (the disconnect
        notifiers run)."""
        first, second = self.root.callRemote("wait"), self.root.callRemote("wait")
        self.pump.flush()
        seen: list[Any] = []
        first.addErrback(lambda failure: (seen.append(failure.type), second.cancel()))
        second.addErrback(lambda failure: seen.append(failure.type))
        self.client.notifyOnDisconnect(lambda: seen.append("notified"))
        self.client.connectionLost(Failure(Exception("gone")))
        self.assertEqual(seen, [PBConnectionLost, CancelledError, "notified"])
        self.assertEqual(self.client.waitingForAnswers, {})


class CopiedFailureStateTests(SynchronousTestCase):
    """
    The state of a copied failure comes from any peer (a hostile one, an old stock Twisted
    one): each malformed state is refused with an error that names what is wrong.
    """

    def setUp(self) -> None:
        self.registry = jelly.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(b"twisted.spread.pb.CopyableFailure", pb.CopiedFailure)

    def copied(self, state: Any) -> Any:
        """
        The copied failure ``state`` (jellied as a stock Twisted peer would) becomes here.
        """
        return jelly.unjelly(
            [b"twisted.spread.pb.CopyableFailure", twistedJelly.jelly(state)],
            registry=self.registry,
        )

    def refused(self, state: Any) -> str:
        """
        The message of the InvalidJelly that refuses ``state``.
        """
        with self.assertRaises(InvalidJelly) as caught:
            self.copied(state)
        return str(caught.exception)

    def test_stateMustBeADictionary(self) -> None:
        """A state that is not a dictionary is refused, naming its type."""
        self.assertEqual(
            self.refused([b"type", b"value"]),
            "a copied failure needs a dictionary state, not <class 'list'>",
        )

    def test_typeAndValueAreRequired(self) -> None:
        """Without a type or a value there is nothing to report: refused, naming the key."""
        self.assertEqual(self.refused({"value": "v"}), "a copied failure has no 'type'")
        self.assertEqual(self.refused({"type": b"x.Y"}), "a copied failure has no 'value'")

    def test_wrongTypes(self) -> None:
        """Each checked key of the wrong type is refused, naming the key."""
        good = {"type": b"x.Y", "value": "v", "traceback": "tb", "parents": ["x.Y"]}
        for key, bad in [("type", 5), ("value", 3), ("traceback", None), ("parents", "x.Y")]:
            self.assertEqual(
                self.refused({**good, key: bad}), f"a copied failure's {key!r} has the wrong type"
            )

    def test_minimalState(self) -> None:
        """A state with only type and value (bytes keys and values, as a minimal peer sends)
        is completed: the parents are the type alone, the traceback is unavailable."""
        copied = self.copied({b"type": b"x.Y", b"value": b"caf\xc3\xa9 \xff"})
        self.assertEqual(copied.type, b"x.Y")
        self.assertEqual(copied.value, "caf\xe9 \ufffd")
        self.assertEqual(copied.parents, ["x.Y"])
        self.assertEqual(copied.traceback, "Traceback unavailable\n")
        self.assertEqual((copied.count, copied.captureVars, copied.tb), (0, False, None))
        self.assertEqual(copied.check("x.Y"), "x.Y")
        self.assertEqual(repr(copied), "<CopiedFailure x.Y: caf\xe9 \ufffd>")

    def test_raiseExceptionRaisesAnExceptionTheApplicationSet(self) -> None:
        """raiseException() raises RemoteError for the remote failure, but an exception the
        application put in ``value`` is raised as Failure.raiseException raises it, as with
        stock PB: buildbot's RemoteCommand.remoteComplete sets ``value`` and ``type`` to a
        RemoteException of its own and expects that raised."""
        copied = self.copied({"type": b"x.Y", "value": "v"})
        with self.assertRaises(RemoteError):
            copied.raiseException()

        class AppError(Exception):
            pass

        copied.value = AppError(f"{copied.type!r}: {copied.value}")
        copied.type = AppError
        with self.assertRaises(AppError) as caught:
            copied.raiseException()
        self.assertIs(caught.exception, copied.value)

    def test_relayMinimalFailure(self) -> None:
        """A server that passes on a failure from a peer that sent a minimal state gives its
        caller that failure, not an error from taking the failure's state."""
        back = rootFor(pb)

        class Minimal(Exception, pb.Copyable):
            def getTypeToCopy(self) -> bytes:
                return b"twisted.spread.pb.CopyableFailure"

            def getStateToCopy(self) -> Any:
                return {"type": b"x.Y", "value": "v"}

        def minimal() -> None:
            raise Minimal()

        back.remote_minimal = minimal
        _backServer, backClient, backPump = connectedServerAndClient(
            pb.PBServerFactory(back), pb.PBClientFactory()
        )
        front = rootFor(pb)
        front.remote_relay = lambda: backClient.remoteForName("root").callRemote("minimal")
        _frontServer, frontClient, frontPump = connectedServerAndClient(
            pb.PBServerFactory(front), pb.PBClientFactory()
        )
        results: list[Any] = []
        frontClient.remoteForName("root").callRemote("relay").addBoth(results.append)
        for _ in range(3):
            frontPump.flush()
            backPump.flush()
        self.flushLoggedErrors(Minimal)
        [failure] = results
        self.assertIsInstance(failure, pb.CopiedFailure)
        self.assertEqual((failure.type, failure.value), (b"x.Y", "v"))
        self.assertEqual(failure.parents, ["x.Y"])
        # The front server logged what it passed on, and nothing else.
        [relayed] = self.flushLoggedErrors()
        self.assertEqual((relayed.type, relayed.value, relayed.count), (b"x.Y", "v", 0))

    def test_checkByName(self) -> None:
        """check() takes a class or its name (text or bytes, as Twisted's takes names) and
        returns what it was given; an unmatched name gives None."""
        copied = self.copied({"type": b"builtins.ValueError", "value": "v"})
        copied.parents.append("builtins.Exception")
        self.assertEqual(copied.check("builtins.Exception"), "builtins.Exception")
        self.assertEqual(copied.check(b"builtins.ValueError"), b"builtins.ValueError")
        self.assertIs(copied.check("builtins.KeyError", ValueError), ValueError)
        self.assertIsNone(copied.check("builtins.KeyError", b"x.Y", KeyError))

    def test_printTraceback(self) -> None:
        """printTraceback writes the remote type and value, then the remote traceback when
        one was sent; with no file given, to the log as errors, as Twisted's Failure does."""
        copied = self.copied({"type": b"x.Y", "value": "v", "traceback": "Traceback: here\n"})
        with capturedLogs() as events:
            copied.printTraceback()
        self.assertEqual(
            [(event["log_io"], event["log_level"]) for event in events],
            [
                ("Traceback from remote host -- x.Y: v", LogLevel.error),
                ("Traceback: here", LogLevel.error),
            ],
        )
        brief = io.StringIO()
        self.copied({"type": b"x.Y", "value": "v"}).printBriefTraceback(brief)
        self.assertEqual(brief.getvalue(), "Traceback from remote host -- x.Y: v\n")

    def test_malformedFailureFromAPeer(self) -> None:
        """A peer whose error answer carries a malformed failure state fails that call with
        InvalidJelly naming the fault, in both dialects, and the connection keeps serving."""
        for dialects in ([b"pb"], [b"pbroker2"]):
            rootObject = rootFor(pb)

            class Malformed(Exception, pb.Copyable):
                def getTypeToCopy(self) -> bytes:
                    return b"twisted.spread.pb.CopyableFailure"

                def getStateToCopy(self) -> Any:
                    return {"type": b"x.Y", "value": 3}

            def malformed() -> None:
                raise Malformed()

            rootObject.remote_malformed = malformed
            server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(rootObject), pb.PBClientFactory(dialects=dialects)
            )
            root = client.remoteForName("root")
            results: list[Any] = []
            root.callRemote("malformed").addBoth(results.append)
            pump.flush()
            self.flushLoggedErrors(Malformed)
            [failure] = results
            self.assertIs(failure.type, InvalidJelly)
            self.assertEqual(
                failure.getErrorMessage(), "a copied failure's 'value' has the wrong type"
            )
            root.callRemote("echo", 7).addBoth(results.append)
            pump.flush()
            self.assertEqual(results[1:], [7])
            self.assertEqual(client.currentDialect, dialects[0])
            self.assertFalse(client.transport.disconnecting)
            self.assertFalse(server.transport.disconnecting)


class Gauge(pb.Cacheable):
    """
    A Cacheable that records who observes it.
    """

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.stopped = 0

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        self.observers.append(observer)
        return {"level": 1}

    def stoppedObserving(self, perspective: Any, observer: Any) -> None:
        self.stopped += 1


class RemoteGauge(pb.RemoteCache):
    pass


class RichError(pb.Error, pb.Copyable):
    """
    An error copied whole to the caller, with what it holds.
    """


class Trigger(pb.Copyable):
    """
    A copy whose state, when taken, completes another call's answer (as an application's
    "release the waiters" might).
    """

    def __init__(self, waiter: Deferred[Any], answer: Any) -> None:
        self.waiter = waiter
        self.answer = answer

    def getStateToCopy(self) -> Any:
        self.waiter.callback(self.answer)
        return {}


class RemoteTrigger(pb.RemoteCopy):
    pass


class FailingTrigger(Trigger):
    """
    A copy whose state, when taken, fails another call with its ``answer``, an exception.
    """

    def getStateToCopy(self) -> Any:
        self.waiter.errback(self.answer)
        return {}


class RemoteRichError(pb.RemoteCopy, pb.Error):
    pass


class Unserialisable(pb.Copyable):
    def getStateToCopy(self) -> Any:
        raise ValueError("no state to copy")


class UnsentRoot(pb.Root):
    """
    Methods whose results hold exported objects and cannot all be sent.
    """

    #: Over PB's 640 KiB string limit, and over the native limit the tests set.
    BIG = 700_000

    def __init__(self) -> None:
        self.counter = pb.Referenceable()
        self.gauge = Gauge()
        self.later: Deferred[Any] = Deferred()
        self.received: list[Any] = []

    def remote_counter(self) -> Any:
        return self.counter

    def remote_gauge(self) -> Any:
        return self.gauge

    def remote_tooLarge(self) -> Any:
        return [self.counter, self.gauge, b"x" * self.BIG]

    def remote_tooLargeLater(self) -> Any:
        return self.later

    def remote_unserialisable(self) -> Any:
        return [self.counter, self.gauge, Unserialisable()]

    def remote_record(self, value: Any) -> None:
        self.received.append(value)

    def remote_trigger(self) -> Any:
        return Trigger(self.later, [self.counter, self.gauge])

    def remote_gaugeAndTrigger(self) -> Any:
        return [self.gauge, Trigger(self.later, self.gauge)]

    def remote_sendGaugeAndTrigger(self, target: Any) -> Any:
        return target.callRemote("take", [self.gauge, Trigger(self.later, self.gauge)])

    def remote_gaugeAndFailingTrigger(self) -> Any:
        error = RichError("with a gauge")
        error.gauge = self.gauge  # type: ignore[attr-defined]
        return [self.gauge, FailingTrigger(self.later, error)]

    def remote_richError(self) -> None:
        error = RichError("too rich to send")
        error.parts = [self.counter, b"x" * self.BIG]  # type: ignore[attr-defined]
        raise error


class RootCallsMixin:
    """
    ``call()``: a call on the peer's root, the bytes moved, its result (or Failure).
    """

    root: Any
    pump: Any

    def call(self, *args: Any, **kw: Any) -> Any:
        results: list[Any] = []
        self.root.callRemote(*args, **kw).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(len(results), 1)  # type: ignore[attr-defined]
        return results[0]


class UnsentValueTestsMixin(RootCallsMixin):
    """
    Objects exported while a value is serialised are exported only if the value is sent: a
    value too large for the peer, one that fails half-way, or the unused result of a one-way
    call would otherwise leave them exported (and Cacheables observed) for as long as the
    connection lasts, since the peer can never release them.
    """

    clientOptions: dict[str, Any] = {}

    def setUp(self) -> None:
        self.rootObject = UnsentRoot()
        self.registry = pb.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.server, self.client, self.pump = connect(
            pb.PBServerFactory(self.rootObject),
            pb.PBClientFactory(registry=self.registry, **self.clientOptions),
        )
        self.pump.flush()
        # The native dialect's limit is 64 MiB: make the 700 KB values too large there too.
        self.server.peerMessageSize = self.client.peerMessageSize = 100_000
        self.root = self.client.remoteForName("root")

    def assertNothingExported(self, broker: Any) -> None:
        named = [b"root"] if broker is self.server and not broker.disconnected else []
        self.assertEqual(list(broker.localObjects), named)  # type: ignore[attr-defined]
        self.assertEqual(broker.luids, {})  # type: ignore[attr-defined]
        self.assertEqual(broker.remotelyCachedObjects, {})  # type: ignore[attr-defined]
        self.assertEqual(broker.remotelyCachedLUIDs, {})  # type: ignore[attr-defined]

    def assertFailsExportingNothing(self, method: str) -> None:
        """
        A call of ``method`` fails, and the server exports nothing for it.
        """
        failure = self.call(method)
        self.assertIsInstance(failure, Failure)  # type: ignore[attr-defined]
        self.flushLoggedErrors()  # type: ignore[attr-defined]
        self.assertNothingExported(self.server)

    def test_answerTooLarge(self) -> None:
        """An answer too large to send exports nothing, and stops the observing it began."""
        self.assertFailsExportingNothing("tooLarge")
        self.assertEqual(self.rootObject.gauge.stopped, 1)  # type: ignore[attr-defined]
        # What is sent later is exported as usual.
        self.assertIsInstance(self.call("counter"), pb.RemoteReference)  # type: ignore[attr-defined]
        self.assertEqual(len(self.server.luids), 1)  # type: ignore[attr-defined]

    def test_laterAnswerTooLarge(self) -> None:
        """The same for an answer that comes from a Deferred."""
        results: list[Any] = []
        self.root.callRemote("tooLargeLater").addBoth(results.append)
        self.pump.flush()
        root = self.rootObject
        root.later.callback([root.counter, root.gauge, b"x" * root.BIG])
        self.pump.flush()
        self.assertIsInstance(results[0], Failure)  # type: ignore[attr-defined]
        self.flushLoggedErrors()  # type: ignore[attr-defined]
        self.assertNothingExported(self.server)

    def test_unserialisableAnswer(self) -> None:
        """An answer that cannot be serialised leaves nothing exported that it met first."""
        self.assertFailsExportingNothing("unserialisable")
        self.assertEqual(self.rootObject.gauge.stopped, 1)  # type: ignore[attr-defined]

    def test_errorTooLarge(self) -> None:
        """An error too large to send exports nothing either."""
        self.assertFailsExportingNothing("richError")

    def test_answerSentFromAHook(self) -> None:
        """An answer completed and sent while another value is serialised is a message of
        its own: what it exported stays exported when the other value is not sent."""
        waiting: list[Any] = []
        self.root.callRemote("tooLargeLater").addBoth(waiting.append)
        self.pump.flush()
        self.root.callRemote("trigger", pbanswer=False)  # its result is not sent
        self.pump.flush()
        counter, gauge = waiting[0]
        self.assertEqual(len(self.server.luids), 1)
        self.assertEqual(self.rootObject.gauge.stopped, 0)
        self.assertIsInstance(gauge, RemoteGauge)
        del counter, gauge, waiting
        gc.collect()
        self.pump.flush()
        self.assertFalse(self.server.disconnected)
        self.assertNothingExported(self.server)
        self.assertEqual(self.rootObject.gauge.stopped, 1)

    def test_answerFromAHookNamesACopyAfterIt(self) -> None:
        """
        An answer that a hook completes while another value is serialised is serialised and
        sent after that value: a Cacheable whose first copy that value carries reaches the
        peer first, and the answer's handle on it is understood.
        """
        self.registry.setUnjellyableForClass(Trigger, RemoteTrigger)
        waiting: list[Any] = []
        self.root.callRemote("tooLargeLater").addBoth(waiting.append)
        self.pump.flush()
        gauge, _ = self.call("gaugeAndTrigger")
        self.assertIsInstance(gauge, RemoteGauge)
        (answer,) = waiting
        self.assertIsInstance(answer, RemoteGauge)
        self.assertIs(answer.__dict__, gauge.__dict__)  # the same copy, seen through two proxies
        self.assertFalse(self.client.disconnected)

    def test_answerFromAHookInACall(self) -> None:
        """
        The same for an answer that a hook completes while a call's arguments are serialised:
        it is sent after the call, which carries the first copy.
        """
        self.registry.setUnjellyableForClass(Trigger, RemoteTrigger)
        taken: list[Any] = []

        class Taker(pb.Referenceable):
            def remote_take(self, value: Any) -> None:
                taken.append(value)

        waiting: list[Any] = []
        self.root.callRemote("tooLargeLater").addBoth(waiting.append)
        self.pump.flush()
        self.assertIsNone(self.call("sendGaugeAndTrigger", Taker()))
        ((gauge, _),) = taken
        (answer,) = waiting
        self.assertIsInstance(answer, RemoteGauge)
        self.assertIs(answer.__dict__, gauge.__dict__)

    def test_errorFromAHookNamesACopyAfterIt(self) -> None:
        """
        The same for an error: the hook fails a call with an error that holds the Cacheable.
        """
        self.registry.setUnjellyableForClass(FailingTrigger, RemoteTrigger)
        self.registry.setUnjellyableForClass(RichError, RemoteRichError)
        waiting: list[Any] = []
        self.root.callRemote("tooLargeLater").addBoth(waiting.append)
        self.pump.flush()
        gauge, _ = self.call("gaugeAndFailingTrigger")
        self.assertIsInstance(gauge, RemoteGauge)
        (failure,) = waiting
        self.assertIsInstance(failure.value, RemoteRichError)
        self.assertIsInstance(failure.value.gauge, RemoteGauge)
        self.assertIs(failure.value.gauge.__dict__, gauge.__dict__)
        self.assertFalse(self.client.disconnected)

    def test_answerAfterDisconnect(self) -> None:
        """An answer that comes after the connection is lost exports nothing."""
        self.root.callRemote("tooLargeLater").addErrback(lambda _: None)
        self.pump.flush()
        self.client.transport.loseConnection()
        self.pump.flush()
        root = self.rootObject
        root.later.callback([root.counter, root.gauge])
        self.assertNothingExported(self.server)
        self.assertEqual(root.gauge.stopped, 1)

    def test_countsOfSentExportsKept(self) -> None:
        """An object the peer already holds keeps the count the peer knows: when the peer
        releases its reference and copy, they are released."""
        counter = self.call("counter")
        gauge = self.call("gauge")
        self.assertIsInstance(self.call("tooLarge"), Failure)  # type: ignore[attr-defined]
        self.flushLoggedErrors()  # type: ignore[attr-defined]
        self.assertEqual(self.server.localObjects[counter.luid].refcount, 1)  # type: ignore[attr-defined]
        (cached,) = self.server.remotelyCachedObjects.values()
        self.assertEqual(cached.refcount, 1)  # type: ignore[attr-defined]
        del counter, gauge
        gc.collect()
        self.pump.flush()
        self.assertNothingExported(self.server)

    def test_callTooLarge(self) -> None:
        """Arguments of a call too large to send export nothing."""
        mine = pb.Referenceable()
        tooLarge = (LimitExceeded, BananaEncodeError)  # native, pb dialect
        failure = self.call("record", [mine, b"x" * UnsentRoot.BIG])
        self.assertIsNotNone(failure.check(*tooLarge))  # type: ignore[attr-defined]
        self.assertNothingExported(self.client)
        with self.assertRaises(tooLarge):  # type: ignore[attr-defined]
            self.root.callRemote("record", [mine, b"x" * UnsentRoot.BIG], pbanswer=False)
        self.assertNothingExported(self.client)

    def test_oneWayResult(self) -> None:
        """The result of a one-way call is not sent, so what it holds is not exported."""
        self.root.callRemote("counter", pbanswer=False)
        self.root.callRemote("gauge", pbanswer=False)
        self.root.callRemote("tooLargeLater", pbanswer=False)
        self.pump.flush()
        self.rootObject.later.callback(self.rootObject.counter)
        self.pump.flush()
        self.assertNothingExported(self.server)
        self.assertEqual(self.rootObject.gauge.stopped, 1)  # type: ignore[attr-defined]


class NativeUnsentValueTests(UnsentValueTestsMixin, SynchronousTestCase):
    def test_streamItemTooLarge(self) -> None:
        """A stream item too large to send exports nothing."""
        root = self.rootObject
        root.remote_items = lambda: iter([[root.counter, b"x" * root.BIG]])  # type: ignore[attr-defined]
        stream = self.call("items")
        items: list[Any] = []
        stream.next().addBoth(items.append)
        self.pump.flush()
        self.assertIsInstance(items[0], Failure)
        self.flushLoggedErrors()
        self.assertNothingExported(self.server)

    def test_oneWayStream(self) -> None:
        """A stream a one-way call returns is not sent: its source is closed."""
        generator = (item for item in [1])
        self.rootObject.remote_items = lambda: generator  # type: ignore[attr-defined]
        self.root.callRemote("items", pbanswer=False)
        self.pump.flush()
        self.assertEqual(self.server._streams.outgoing, {})
        self.assertIsNone(generator.gi_frame)  # closed


class PbDialectUnsentValueTests(UnsentValueTestsMixin, SynchronousTestCase):
    clientOptions = {"dialects": [b"pbroker1", b"pb"]}


class Secret(pb.Copyable):
    """
    A copy no receiver in these tests registers, so unjellying it is refused.
    """

    def __init__(self, data: Any = None) -> None:
        self.data = data


class StockSecret(twistedPb.Copyable):
    """
    The same, sent by stock Twisted.
    """

    def __init__(self, data: Any = None) -> None:
        self.data = data


class StockGauge(twistedPb.Cacheable):
    """
    :class:`Gauge`, as a stock Twisted Cacheable.
    """

    def __init__(self) -> None:
        self.stopped = 0

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        return {"level": 1}

    def stoppedObserving(self, perspective: Any, observer: Any) -> None:
        self.stopped += 1


def unreadRootFor(module: Any) -> Any:
    """
    A root (of ``module``, pbroker.pb or twisted.spread.pb) that answers values the caller
    refuses to unjellying half-way, and keeps what it is sent.
    """
    stock = module is twistedPb

    class UnreadRoot(module.Root):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            self.counter = module.Referenceable()
            self.other = module.Referenceable()
            self.gauge = StockGauge() if stock else Gauge()
            self.received: list[Any] = []
            self.generator = closingItems([])

        def remote_refused(self) -> Any:
            # What comes after the refused copy is what used to stay exported.
            secret = StockSecret() if stock else Secret()
            return [self.other, secret, self.counter, self.gauge, [self.counter], self.other]

        def remote_refusedWithStream(self) -> Any:
            return [Secret(), self.generator, self.counter]

        def remote_record(self, *values: Any) -> None:
            self.received.extend(values)

    return UnreadRoot()


def closingItems(closed: list[bool]) -> Any:
    """
    A generator of two items that notes in ``closed`` when it is closed.
    """
    try:
        yield 1
        yield 2
    finally:
        closed.append(True)


class UnreadValueTestsMixin(RootCallsMixin):
    """
    A value this side refuses to unjellying half-way (a class it does not take) fails, and
    what the peer counted in the rest of it is released: its references, cache handles and
    streams would otherwise stay exported by the peer for as long as the connection lasts.
    Subclasses choose the peers; the receiver is always a pbroker broker.
    """

    serverModule: Any = pb
    clientModule: Any = pb
    clientOptions: dict[str, Any] = {}

    def setUp(self) -> None:
        self.rootObject = unreadRootFor(self.serverModule)
        options = dict(self.clientOptions)
        if self.clientModule is pb:
            registry = pb.UnjellyableRegistry()
            registry.setUnjellyableForClass(Gauge, RemoteGauge)
            registry.setUnjellyableForClass(b"tests.test_broker.StockGauge", RemoteGauge)
            options["registry"] = registry
        serverOptions = {}
        if self.serverModule is pb:
            registry = pb.UnjellyableRegistry()
            registry.setUnjellyableForClass(Gauge, RemoteGauge)
            registry.setUnjellyableForClass(b"tests.test_broker.StockGauge", RemoteGauge)
            serverOptions["registry"] = registry
        self.server, self.client, self.pump = connect(
            self.serverModule.PBServerFactory(self.rootObject, **serverOptions),
            self.clientModule.PBClientFactory(**options),
        )
        self.pump.flush()
        self.root = self.client.remoteForName("root")

    def release(self) -> None:
        """
        Let go of what arrived, and deliver what that says.
        """
        gc.collect()
        self.pump.flush()

    def assertExportsNothing(self, broker: Any) -> None:
        self.assertFalse(broker.disconnected)  # type: ignore[attr-defined]
        self.assertEqual(broker.luids, {})  # type: ignore[attr-defined]
        self.assertEqual(broker.remotelyCachedObjects, {})  # type: ignore[attr-defined]
        self.assertEqual(self.flushLoggedErrors(), [])  # type: ignore[attr-defined]


class RefusedAnswerTestsMixin(UnreadValueTestsMixin):
    """
    A pbroker client refuses an answer.
    """

    def test_refusedAnswerReleased(self) -> None:
        """
        An answer refused half-way leaves the server exporting nothing: the references and
        the cache after the refused copy are released (once each), the cache's observing
        stopped, and the uncache that follows is taken without complaint.
        """
        failure = self.call("refused")
        self.assertIsInstance(failure, Failure)  # type: ignore[attr-defined]
        self.assertIn("not allowed", str(failure.value))  # type: ignore[attr-defined]
        del failure  # its traceback holds what had arrived
        self.release()
        self.assertExportsNothing(self.server)
        self.assertEqual(self.rootObject.gauge.stopped, 1)  # type: ignore[attr-defined]
        self.assertEqual(self.client.locallyCachedObjects, {})  # type: ignore[attr-defined]
        self.assertEqual(self.client.importedReferences, 0)  # type: ignore[attr-defined]
        # The connection still serves, and counts what it sends afresh.
        self.assertEqual(self.call("record", 1), None)  # type: ignore[attr-defined]
        self.assertIsInstance(self.call("refused"), Failure)  # type: ignore[attr-defined]
        self.release()
        self.assertExportsNothing(self.server)


class RefusedArgumentsTestsMixin(UnreadValueTestsMixin):
    """
    A pbroker server refuses a call's arguments.
    """

    def secret(self, data: Any = None) -> Any:
        return StockSecret(data) if self.clientModule is twistedPb else Secret(data)

    def test_refusedArgumentsReleased(self) -> None:
        """
        Arguments refused half-way leave the caller exporting nothing.
        """
        module = self.clientModule
        first, second = module.Referenceable(), module.Referenceable()
        failure = self.call("record", first, self.secret(), second, [first], kw=second)
        self.assertIsInstance(failure, Failure)  # type: ignore[attr-defined]
        del first, second, failure
        self.release()
        self.assertExportsNothing(self.client)
        self.assertEqual(self.server.importedReferences, 0)  # type: ignore[attr-defined]

    def test_refusedArgumentsReleaseCaches(self) -> None:
        """
        A Cacheable in refused arguments, in the keywords too (a handle on the same copy,
        jellied apart), is released: its owner stops observing it.
        """
        gauge = StockGauge() if self.clientModule is twistedPb else Gauge()
        failure = self.call("record", self.secret(), gauge, kw=gauge)
        self.assertIsInstance(failure, Failure)  # type: ignore[attr-defined]
        del failure
        self.release()
        self.assertExportsNothing(self.client)
        self.assertEqual(gauge.stopped, 1)  # type: ignore[attr-defined]
        self.assertEqual(self.server.locallyCachedObjects, {})  # type: ignore[attr-defined]
        self.assertFalse(self.server._unreadCaches)  # type: ignore[attr-defined]

    def test_pairsAreNotReferences(self) -> None:
        """
        A dictionary entry that looks like a reference (``{b"remote": luid}``) in a refused
        value is not taken for one: the caller's real export of that luid stays.
        """
        kept = self.clientModule.Referenceable()
        self.assertIsNone(self.call("record", kept))  # type: ignore[attr-defined]
        (luid,) = self.client.luids.values()
        failure = self.call("record", self.secret({b"remote": luid, b"cached": luid}))
        self.assertIsInstance(failure, Failure)  # type: ignore[attr-defined]
        self.release()
        self.assertFalse(self.server.disconnected)  # type: ignore[attr-defined]
        self.assertEqual(list(self.client.luids.values()), [luid])  # type: ignore[attr-defined]
        self.assertEqual(self.client.localObjects[luid].refcount, 1)  # type: ignore[attr-defined]


class NativeUnreadValueTests(
    RefusedAnswerTestsMixin, RefusedArgumentsTestsMixin, SynchronousTestCase
):
    def test_refusedAnswerClosesItsStreams(self) -> None:
        """
        A stream after the refused part of an answer is cancelled: the server closes its
        source, and exports nothing else that came after it.
        """
        failure = self.call("refusedWithStream")
        self.assertIsInstance(failure, Failure)
        del failure
        self.release()
        self.assertEqual(self.server._streams.outgoing, {})
        state = inspect.getgeneratorstate(self.rootObject.generator)
        self.assertEqual(state, inspect.GEN_CLOSED)
        self.assertExportsNothing(self.server)

    def test_streamsOverTheLimitClosed(self) -> None:
        """
        Streams in arguments beyond the receiver's limit fail the call, and every one of
        them is released: those opened, the one refused and those after it.
        """
        self.server.limits = pb.BrokerLimits(pendingCalls=2)
        generators = [closingItems([]) for _ in range(4)]
        failure = self.call("record", *generators)
        self.assertIn("more than 2 streams", str(failure.value))
        del failure
        self.release()
        self.assertEqual(self.client._streams.outgoing, {})
        states = {inspect.getgeneratorstate(generator) for generator in generators}
        self.assertEqual(states, {inspect.GEN_CLOSED})


class PbDialectUnreadValueTests(
    RefusedAnswerTestsMixin, RefusedArgumentsTestsMixin, SynchronousTestCase
):
    clientOptions = {"dialects": [b"pbroker1", b"pb"]}


class StockClientUnreadValueTests(RefusedArgumentsTestsMixin, SynchronousTestCase):
    """
    A stock Twisted caller: the pbroker server's releases keep its counts right.
    """

    clientModule = twistedPb


class UnreadCopiesBoundTests(UnreadValueTestsMixin, SynchronousTestCase):
    """
    The first copies of the peer's Cacheables that arrived in values this side refused wait
    for their ``uncache`` in a set no larger than ``importedReferences``.
    """

    def setUp(self) -> None:
        self.rootObject = unreadRootFor(pb)
        registries = []
        for _ in range(2):
            registry = pb.UnjellyableRegistry()
            registry.setUnjellyableForClass(Gauge, RemoteGauge)
            registries.append(registry)
        serverFactory = pb.PBServerFactory(
            self.rootObject, registry=registries[0], limits=pb.BrokerLimits(importedReferences=2)
        )
        self.server, self.client, self.pump = connect(
            serverFactory, pb.PBClientFactory(registry=registries[1])
        )
        self.root = self.client.remoteForName("root")

    def test_pastTheBound(self) -> None:
        """Three refused calls, each with a copy of its own, the third with a reference
        after its copy: two copies are released, and the third, past the bound, is not
        waited for; the reference after it is released all the same."""
        gauges = [Gauge(), Gauge(), Gauge()]
        after = pb.Referenceable()
        failures: list[Any] = []
        for gauge, extra in ((gauges[0], ()), (gauges[1], ()), (gauges[2], (after,))):
            self.root.callRemote("record", Secret(), gauge, *extra).addBoth(failures.append)
        self.pump.flush()
        self.assertTrue(all(isinstance(f, Failure) for f in failures) and len(failures) == 3)
        del failures
        self.release()
        self.assertFalse(self.client.disconnected)
        self.assertEqual([gauge.stopped for gauge in gauges], [1, 1, 0])
        self.assertNotIn(after.processUniqueID(), self.client.luids)
        self.assertLessEqual(len(self.server._unreadCaches or ()), 2)
        self.flushLoggedErrors()


class NearerEndTests(SynchronousTestCase):
    def test_fromTheNearerEnd(self) -> None:
        """A call is looked for from the end of the queue whose request id is nearer its
        own (a cancel of the newest calls finds each at once, as one of the oldest does);
        with an entry that has no id (an answer) at either end, from the front."""
        nearerEnd = brokerModule._nearerEnd
        queue = [[requestID] for requestID in range(500, 601)]
        self.assertEqual(nearerEnd(queue, 0, 501), range(101))
        self.assertEqual(nearerEnd(queue, 0, 599), range(100, -1, -1))
        self.assertEqual(nearerEnd([[None], *queue], 0, 599), range(102))
        self.assertEqual(nearerEnd(queue[:1], 0, 500), range(1))


class StockServerUnreadValueTests(RefusedAnswerTestsMixin, SynchronousTestCase):
    """
    A stock Twisted server: the pbroker client's releases keep its counts right.
    """

    serverModule = twistedPb


class RelayedFailureTests(SynchronousTestCase):
    """
    A failure a server passes on from a call of its own (a relay) keeps the whole ancestry of
    the original error, for a pbroker or a stock caller, as stock PB keeps it.
    """

    def relayedFailure(self, backendPb: Any, callerPb: Any, unsafe: bool = False) -> Failure:
        class Backend(backendPb.Root):  # type: ignore[misc,name-defined]
            def remote_divide(self) -> float:
                return 1 / 0

        _backend, relayClient, backendPump = connectedServerAndClient(
            backendPb.PBServerFactory(Backend(), unsafeTracebacks=unsafe), pb.PBClientFactory()
        )
        backendRoot = relayClient.remoteForName("root")

        class Relay(pb.Root):
            def remote_relay(self) -> Any:
                return backendRoot.callRemote("divide")

        _relay, caller, callerPump = connectedServerAndClient(
            pb.PBServerFactory(Relay(), unsafeTracebacks=unsafe), callerPb.PBClientFactory()
        )
        results: list[Any] = []
        caller.remoteForName("root").callRemote("relay").addBoth(results.append)
        for _ in range(100):
            if results:
                break
            backendPump.pump()
            callerPump.pump()
        self.flushLoggedErrors(ZeroDivisionError)
        [failure] = results
        self.assertIsInstance(failure, Failure)
        return failure

    def test_ancestryKept(self) -> None:
        for backendPb in (pb, twistedPb):
            for callerPb in (pb, twistedPb):
                with self.subTest(backend=backendPb.__name__, caller=callerPb.__name__):
                    failure = self.relayedFailure(backendPb, callerPb)
                    self.assertTrue(failure.check(ZeroDivisionError))
                    self.assertTrue(failure.check(ArithmeticError))

    def test_relayedWithTracebacks(self) -> None:
        """A relay that sends tracebacks (unsafeTracebacks) passes on the original error and
        the traceback its own peer sent. (Stock PB cannot format a failure whose type is a
        name, and fails to send it: the caller got an AttributeError.)"""
        for backendPb in (pb, twistedPb):
            for callerPb in (pb, twistedPb):
                with self.subTest(backend=backendPb.__name__, caller=callerPb.__name__):
                    failure = self.relayedFailure(backendPb, callerPb, unsafe=True)
                    self.assertTrue(failure.check(ZeroDivisionError))
                    self.assertIn("remote_divide", failure.traceback)
                    self.assertIn("ZeroDivisionError", failure.traceback)

    def test_wrappedRelayedFailureFormats(self) -> None:
        """A failure received from a peer and wrapped in CopyableFailure by a relay (as the
        migration guide allows) formats as the remote error, as the CopiedFailure it wraps
        does: its repr and traceback do not raise, and the relay logs the remote error and
        the traceback its peer sent, not a failure to format it."""
        from pbroker.failure import CopyableFailure

        class Backend(pb.Root):
            def remote_divide(self) -> float:
                return 1 / 0

        _backend, relayClient, backendPump = connectedServerAndClient(
            pb.PBServerFactory(Backend(), unsafeTracebacks=True), pb.PBClientFactory()
        )
        backendRoot = relayClient.remoteForName("root")
        received: list[Failure] = []

        class Relay(pb.Root):
            def remote_relay(self) -> Deferred[Any]:
                def wrap(failure: Failure) -> Failure:
                    received.append(failure)
                    return CopyableFailure(failure)

                return backendRoot.callRemote("divide").addErrback(wrap)

        _relay, caller, callerPump = connectedServerAndClient(
            pb.PBServerFactory(Relay()), pb.PBClientFactory()
        )
        results: list[Any] = []
        with capturedLogs() as events:
            caller.remoteForName("root").callRemote("relay").addBoth(results.append)
            for _ in range(10):
                callerPump.pump()
                backendPump.pump()
        self.flushLoggedErrors()
        [failure] = results
        self.assertTrue(failure.check(ZeroDivisionError))
        wrapped = CopyableFailure(received[0])
        self.assertIn("ZeroDivisionError", repr(wrapped))
        text = wrapped.getTraceback()
        self.assertIn("Traceback from remote host -- builtins.ZeroDivisionError", text)
        self.assertIn("remote_divide", text)
        logged = [event["log_failure"] for event in events if event.get("log_failure") is not None]
        self.assertTrue(logged)
        for loggedFailure in logged:
            self.assertIn("ZeroDivisionError", loggedFailure.getTraceback())


class KeywordsBroker(pb.Broker):
    """A subclass that passes what it is given on, as many stock PB programs write it."""

    def __init__(self, **kw: Any) -> None:
        pb.Broker.__init__(self, **kw)
        self.madeBy = "kw"


class StockSignatureBroker(pb.Broker):
    """A subclass with stock PB's constructor signature."""

    def __init__(self, isClient: int = 1, security: Any = jelly.globalSecurity) -> None:
        pb.Broker.__init__(self, isClient, security)
        self.madeBy = "stock"


class BrokerSubclassTests(SynchronousTestCase):
    """
    A factory builds its protocol as stock PB does (``isClient`` and ``security`` by
    keyword), so Broker subclasses written for stock PB work, and still get the factory's
    other options.
    """

    def test_subclasses(self) -> None:
        limits = pb.BrokerLimits(messageSize=1024 * 1024)

        class Echo(pb.Root):
            def remote_echo(self, value: Any) -> Any:
                return value

        for brokerClass in (KeywordsBroker, StockSignatureBroker):
            serverFactory = pb.PBServerFactory(Echo(), limits=limits)
            serverFactory.protocol = brokerClass
            clientFactory = pb.PBClientFactory(limits=limits, dialects=[b"pb"])
            clientFactory.protocol = brokerClass
            server, client, pump = connectedServerAndClient(serverFactory, clientFactory)
            for broker, isClient in ((server, False), (client, True)):
                self.assertIsInstance(broker, brokerClass)
                self.assertEqual(broker.isClient, isClient)
                self.assertIs(broker.limits, limits)
            self.assertEqual(client.currentDialect, b"pb")
            results: list[Any] = []
            client.remoteForName("root").callRemote("echo", 7).addBoth(results.append)
            pump.flush()
            self.assertEqual(results, [7])

    def test_handlerSendingOverThePeersLimit(self) -> None:
        """A message a subclass handles by sending what is over the peer's limit drops the
        peer, with one line saying so, rather than raising out of dataReceived."""

        class Shouting(pb.Broker):
            def _shout(self, size: Any) -> None:
                self.sendCall(b"shouted", b"x" * size)

            messageHandlers = {**pb.Broker.messageHandlers, b"shout": (_shout, 1)}

        serverFactory = pb.PBServerFactory(rootFor(pb))
        serverFactory.protocol = Shouting
        server, client, pump = connectedServerAndClient(serverFactory, pb.PBClientFactory())
        client.sendCall(b"hello", {"messageSize": 1})  # floored to MIN_MESSAGE_SIZE
        client.sendCall(b"shout", 100)
        pump.flush()
        self.assertFalse(server.disconnected)
        with capturedLogs() as events:
            client.sendCall(b"shout", 5000)
            pump.flush()
        self.assertTrue(server.disconnected)
        self.assertIn(
            "the answer to a b'shout' message: a message of 5013 bytes is over the 1024-byte "
            "limit the peer accepts",
            [str(e.get("why")) for e in events],
        )


class StockStyleHandlerTests(SynchronousTestCase):
    """
    A Broker subclass written for Twisted adds messages with ``proto_<command>`` methods;
    pbroker handles them as Twisted does, and says when such a method can never be called.
    """

    def brokerClass(self, module: Any) -> Any:
        class Chatty(module.Broker):  # type: ignore[misc,name-defined]
            def connectionMade(self) -> None:
                super().connectionMade()
                self.heard: list[Any] = []

            def proto_shout(self, words: Any) -> None:
                self.heard.append(words)
                self.sendCall(b"echoed", words)

            def proto_echoed(self, words: Any) -> None:
                self.heard.append(("echoed", words))

        return Chatty

    def test_ownMessages(self) -> None:
        """proto_ methods handle messages of their own in both dialects, and with a stock
        peer that has the same methods on either side."""
        ours, theirs = self.brokerClass(pb), self.brokerClass(twistedPb)
        cases = [
            (ours, ours, [b"pb"]),
            (ours, ours, None),
            (ours, theirs, [b"pb"]),
            (theirs, ours, [b"pb"]),
        ]
        for serverClass, clientClass, dialects in cases:
            module = pb if serverClass is ours else twistedPb
            serverFactory = module.PBServerFactory(rootFor(module))
            serverFactory.protocol = serverClass
            if clientClass is ours:
                clientFactory: Any = pb.PBClientFactory(dialects=dialects)
            else:
                clientFactory = twistedPb.PBClientFactory()
            clientFactory.protocol = clientClass
            server, client, pump = connectedServerAndClient(serverFactory, clientFactory)
            client.sendCall(b"shout", b"hi")
            pump.flush()
            self.assertEqual((server.heard, client.heard), ([b"hi"], [("echoed", b"hi")]))

    def test_overriddenInASubclass(self) -> None:
        """The method is looked up on the broker, as Twisted does: a subclass's override of
        a proto_ method handles the message."""

        class Louder(self.brokerClass(pb)):  # type: ignore[misc]
            def proto_shout(self, words: Any) -> None:
                self.heard.append(words.upper())

        serverFactory = pb.PBServerFactory(rootFor(pb))
        serverFactory.protocol = Louder
        server, client, pump = connectedServerAndClient(serverFactory, pb.PBClientFactory())
        client.sendCall(b"shout", b"hi")
        pump.flush()
        self.assertEqual(server.heard, [b"HI"])

    def test_wrongFieldCount(self) -> None:
        """A message with more or fewer fields than the method takes drops the peer with a
        line saying so, rather than raising TypeError out of dataReceived."""
        for dialects in ([b"pb"], None):
            serverFactory = pb.PBServerFactory(rootFor(pb))
            serverFactory.protocol = self.brokerClass(pb)
            clientFactory = pb.PBClientFactory(dialects=dialects)
            server, client, pump = connectedServerAndClient(serverFactory, clientFactory)
            with capturedLogs() as events:
                client.sendCall(b"shout", b"hi", b"there")
                pump.flush()
            self.assertTrue(server.disconnected)
            self.assertEqual(server.heard, [])
            self.assertIn(
                "proto_shout() does not take a message of 2 fields: [b'hi', b'there']",
                [str(e.get("why")) for e in events],
            )

    def exchange(self, serverClass: Any, *message: Any) -> Any:
        """Send ``message`` from a pbroker client to a server of ``serverClass``, in each
        dialect; the server brokers."""
        servers = []
        for dialects in ([b"pb"], None):
            serverFactory = pb.PBServerFactory(rootFor(pb))
            serverFactory.protocol = serverClass
            clientFactory = pb.PBClientFactory(dialects=dialects)
            server, client, pump = connectedServerAndClient(serverFactory, clientFactory)
            with capturedLogs():
                client.sendCall(*message)
                pump.flush()
            servers.append(server)
        return servers

    def test_inherited(self) -> None:
        """A proto_ method from a mixin, or from a parent whose table the class replaced,
        handles its messages too (Twisted looks the method up at each message)."""

        class ShoutMixin:
            def proto_shout(self, words: Any) -> None:
                self.heard.append(words)  # type: ignore[attr-defined]

        class Mixed(ShoutMixin, self.brokerClass(pb)):  # type: ignore[misc]
            pass

        class Replaced(self.brokerClass(pb)):  # type: ignore[misc]
            messageHandlers = dict(pb.Broker.messageHandlers)

        for serverClass in (Mixed, Replaced):
            for server in self.exchange(serverClass, b"shout", b"hi"):
                self.assertEqual(server.heard, [b"hi"])

    def test_setOnTheBroker(self) -> None:
        """A handler set on the broker itself is found too, as Twisted looks it up at each
        message: any callable, hashable or not."""

        class Recorder:
            __hash__ = None  # type: ignore[assignment]

            def __init__(self) -> None:
                self.heard: list[Any] = []

            def __call__(self, words: Any) -> None:
                self.heard.append(words)

        class Late(pb.Broker):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.proto_shout = Recorder()

        for server in self.exchange(Late, b"shout", b"hi"):
            self.assertEqual(server.proto_shout.heard, [b"hi"])
        for server in self.exchange(Late, b"shout", b"hi", b"there"):
            self.assertTrue(server.disconnected)

    def test_madeUpByGetattr(self) -> None:
        """A subclass whose __getattr__ makes up a handler for any proto_ name gets them
        called, as on Twisted; the handlers made for those names are not kept, so a peer
        sending ever new commands does not make this side hold more."""

        class Anything(pb.Broker):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.heard: list[Any] = []

            def __getattr__(self, name: str) -> Any:
                if name.startswith("proto_"):
                    return lambda *fields: self.heard.append((name, fields))
                raise AttributeError(name)

        before = dict(brokerModule._STOCK_SIGNATURES)
        for number in range(50):
            for server in self.exchange(Anything, f"made{number}".encode(), b"hi"):
                self.assertEqual(server.heard, [(f"proto_made{number}", (b"hi",))])
        self.assertEqual(brokerModule._STOCK_SIGNATURES, before)

    def test_readOnce(self) -> None:
        """The proto_ attribute is read once a message, as Twisted reads it: a property
        runs once, and what it gives is what is called."""

        class ByProperty(pb.Broker):
            reads = 0

            @property
            def proto_shout(self) -> Any:
                self.reads += 1
                reads = self.reads
                return lambda words: None if reads == 1 else 1 / 0

        for server in self.exchange(ByProperty, b"shout", b"hi"):
            self.assertFalse(server.disconnected)
            self.assertEqual(server.reads, 1)

    def test_methodsMadePerBrokerNotKept(self) -> None:
        """A method made for one broker (a bound method of a function made for it) is not
        kept by the handler once that broker is gone."""

        class PerBroker(pb.Broker):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.heard: list[Any] = []

                def shout(broker: Any, words: Any) -> None:
                    broker.heard.append(words)

                self.proto_shout = types.MethodType(shout, self)

        class Named(pb.Broker):
            def proto_shout(self, words: Any) -> None:
                pass

        self.exchange(Named, b"shout", b"hi")  # (a class's own function is kept)
        for server in self.exchange(PerBroker, b"shout", b"hi"):
            self.assertEqual(server.heard, [b"hi"])
        kept = brokerModule._STOCK_SIGNATURES
        self.assertIn(Named.proto_shout, kept)
        self.assertEqual([function for function in kept if function.__name__ == "shout"], [], kept)

    def test_warnedAtTheClassInANew(self) -> None:
        """A Broker subclass made inside an ordinary class's __new__ (not a metaclass's) is
        warned about at its own class statement."""

        class Factory:
            def __new__(cls) -> Any:
                class Inner(pb.Broker):
                    def proto_answer(self, *fields: Any) -> None:
                        pass

                return Inner

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Factory()
        with open(__file__) as source:
            classLine = next(
                number
                for number, line in enumerate(source, 1)
                if line.lstrip().startswith("class Inner(")
            )
        self.assertEqual([(w.filename, w.lineno) for w in caught], [(__file__, classLine)])

    def test_switchedOff(self) -> None:
        """proto_x = None in a subclass switches x off, as on Twisted: the peer is told it
        was not understood, and the connection stays."""

        class Quiet(self.brokerClass(pb)):  # type: ignore[misc]
            proto_shout = None

        for server in self.exchange(Quiet, b"shout", b"hi"):
            self.assertEqual(server.heard, [])
            self.assertFalse(server.disconnected)

    def test_decorated(self) -> None:
        """The fields are checked against the method as it is, not against what a
        decorator says it wraps: a wrapper that supplies an argument itself is called."""

        def tagged(function: Any) -> Any:
            @functools.wraps(function)
            def wrapper(self: Any, *fields: Any) -> Any:
                return function(self, "tag", *fields)

            return wrapper

        class Tagged(self.brokerClass(pb)):  # type: ignore[misc]
            @tagged
            def proto_shout(self, tag: str, words: Any) -> None:
                self.heard.append((tag, words))

        for server in self.exchange(Tagged, b"shout", b"hi"):
            self.assertEqual(server.heard, [("tag", b"hi")])
            self.assertFalse(server.disconnected)

    def test_ownTableWins(self) -> None:
        """A command the class registers in messageHandlers itself keeps that handler."""
        called: list[Any] = []

        class Both(pb.Broker):
            def _shout(self, words: Any) -> None:
                called.append(("table", words))

            def proto_shout(self, words: Any) -> None:
                called.append(("proto", words))

            messageHandlers = {**pb.Broker.messageHandlers, b"shout": (_shout, 1)}

        serverFactory = pb.PBServerFactory(rootFor(pb))
        serverFactory.protocol = Both
        _, client, pump = connectedServerAndClient(serverFactory, pb.PBClientFactory())
        client.sendCall(b"shout", b"hi")
        pump.flush()
        self.assertEqual(called, [("table", b"hi")])

    def test_builtInMessagesWarn(self) -> None:
        """A proto_ method for a message pbroker handles itself, and an override of the
        stock decoder's gotItem or callExpressionReceived, is never called: defining one
        warns, at the class statement."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            class Intercepting(pb.Broker):
                def proto_message(self, *fields: Any) -> None:
                    pass

            class Items(banana.Banana):
                def gotItem(self, item: Any) -> None:
                    pass

            class BrokerItems(pb.Broker):
                def callExpressionReceived(self, expression: Any) -> None:
                    pass

            class AnswerMixin:
                def proto_answer(self, *fields: Any) -> None:
                    pass

            class FromAMixin(AnswerMixin, pb.Broker):
                pass

            class BelowIntercepting(Intercepting):  # (warned once, for Intercepting)
                pass

            class Meta(type):
                def __new__(*args: Any, **kw: Any) -> Any:  # (the metaclass is args[0])
                    return type.__new__(*args, **kw)

            class ByAMetaclass(pb.Broker, metaclass=Meta):
                def proto_decref(self, *fields: Any) -> None:
                    pass

        self.assertEqual(
            [(w.category, str(w.message), w.filename) for w in caught],
            [
                (
                    RuntimeWarning,
                    "StockStyleHandlerTests.test_builtInMessagesWarn.<locals>.Intercepting"
                    ".proto_message is never called: pbroker's Broker handles b'message' "
                    "messages itself (docs/differences.rst)",
                    __file__,
                ),
                (
                    RuntimeWarning,
                    "StockStyleHandlerTests.test_builtInMessagesWarn.<locals>.Items.gotItem is "
                    "never called: pbroker's Banana decodes with a Decoder and passes each "
                    "whole expression to expressionReceived (docs/differences.rst)",
                    __file__,
                ),
                (
                    RuntimeWarning,
                    "StockStyleHandlerTests.test_builtInMessagesWarn.<locals>.BrokerItems"
                    ".callExpressionReceived is never called: pbroker's Banana decodes with a "
                    "Decoder and passes each whole expression to expressionReceived "
                    "(docs/differences.rst)",
                    __file__,
                ),
                (
                    RuntimeWarning,
                    "StockStyleHandlerTests.test_builtInMessagesWarn.<locals>.FromAMixin"
                    ".proto_answer is never called: pbroker's Broker handles b'answer' "
                    "messages itself (docs/differences.rst)",
                    __file__,
                ),
                (
                    RuntimeWarning,
                    "StockStyleHandlerTests.test_builtInMessagesWarn.<locals>.ByAMetaclass"
                    ".proto_decref is never called: pbroker's Broker handles b'decref' "
                    "messages itself (docs/differences.rst)",
                    __file__,
                ),
            ],
        )
        with open(__file__) as source:
            classLine = next(
                number
                for number, line in enumerate(source, 1)
                if line.lstrip().startswith("class ByAMetaclass(")
            )
        self.assertEqual(caught[-1].lineno, classLine)  # (not the metaclass's __new__)
        self.assertEqual(Intercepting.messageHandlers, pb.Broker.messageHandlers)


class DisconnectNotifierScaleTests(SynchronousTestCase):
    def test_forgettingTheNewestFirst(self) -> None:
        """Forgetting notifiers newest first (as references are often let go) does not
        search the list for each: 2,000 comparisons for 1,000 notifiers, not half a
        million (stock Twisted's one search each) or twice that."""

        class Notifier:
            compared = 0

            def __call__(self) -> None:
                pass

            def __eq__(self, other: object) -> bool:
                Notifier.compared += 1
                return self is other

            __hash__ = object.__hash__

        broker = pb.Broker()
        notifiers = [Notifier() for _ in range(1000)]
        for notifier in notifiers:
            broker.notifyOnDisconnect(notifier)
        for order in (reversed(notifiers), iter(notifiers)):
            Notifier.compared = 0
            for notifier in order:
                broker.dontNotifyOnDisconnect(notifier)
            self.assertEqual(broker.disconnects, [])
            self.assertLessEqual(Notifier.compared, 2000)
            for notifier in notifiers:
                broker.notifyOnDisconnect(notifier)
        broker.dontNotifyOnDisconnect(Notifier())  # not given: nothing happens
        self.assertEqual(broker.disconnects, notifiers)


class ConfigureTests(SynchronousTestCase):
    def test_leavesWhatItIsNotGiven(self) -> None:
        """configure() sets the options it is given and leaves the others."""
        clock = Clock()
        limits = pb.BrokerLimits(pendingCalls=7)
        broker = pb.Broker(clock=clock, limits=limits)
        keepalive = pb.Keepalive(interval=1, timeout=3)
        broker.configure(keepalive=keepalive)
        self.assertIs(broker.clock, clock)
        self.assertIs(broker.limits, limits)
        self.assertIs(broker.keepalive, keepalive)
        broker.configure(limits=None, dialects=[b"pb"])
        self.assertEqual(broker.limits, pb.BrokerLimits())
        self.assertEqual(broker.knownDialects, [b"pb"])
        broker.configure(dialects=None)
        self.assertEqual(broker.knownDialects, pb.Broker.knownDialects)

    def test_subclassKeepsItsOwnUnlessTheFactorySets(self) -> None:
        """A stock-style subclass that sets limits in its constructor keeps them, unless the
        factory was given limits of its own."""
        own = pb.BrokerLimits(pendingCalls=5)

        class Limited(pb.Broker):
            def __init__(self, isClient: int = 1, security: Any = jelly.globalSecurity) -> None:
                pb.Broker.__init__(self, isClient, security)
                self.limits = own

        factory = pb.PBClientFactory()
        factory.protocol = Limited
        self.assertIs(factory.buildProtocol(None).limits, own)
        chosen = pb.BrokerLimits(pendingCalls=9)
        factory = pb.PBClientFactory(limits=chosen)
        factory.protocol = Limited
        self.assertIs(factory.buildProtocol(None).limits, chosen)

    def test_factoryOptionsCheckedAtOnce(self) -> None:
        """A clock, security options, registry or login guard of the wrong kind is refused
        when the factory is made, naming it, rather than failing on the wire later (a clock
        once a call with a timeout has been sent, say)."""
        portal = Portal(_NoRealm(), [])
        for make, named in (
            (lambda: pb.PBClientFactory(clock="not a clock"), "clock must be a reactor"),
            (lambda: pb.PBServerFactory(rootFor(pb), clock=5), "clock must be a reactor"),
            (lambda: pb.PBClientFactory(security=5), "security must be security options"),
            (lambda: pb.PBServerFactory(rootFor(pb), security=object()), "security must be"),
            (lambda: pb.PBClientFactory(registry={}), "registry must be an UnjellyableRegistry"),
            (lambda: pb.PBServerFactory(portal, loginGuard=5), "loginGuard must be a LoginGuard"),
            (lambda: pb.PBServerFactory(portal, legacyLogin=None), "legacyLogin must be True"),
            (lambda: pb.PBClientFactory(legacyLogin="no"), "legacyLogin must be True"),
            (lambda: pb.LoginGuard(reactor="x"), "reactor must be a reactor"),
            (lambda: pb.LoginGuard(baseDelay="1"), "baseDelay must be a number"),
            (lambda: pb.LoginGuard(maxDelay=float("nan")), "maxDelay must be a number"),
            (lambda: pb.LoginGuard(maxWaiting="5"), "maxWaiting must be a number"),
            # A class where an instance is wanted.
            (lambda: pb.PBClientFactory(clock=Clock), "clock must be a reactor"),
            (lambda: pb.PBClientFactory(security=jelly.SecurityOptions), "not the class Secur"),
        ):
            with self.assertRaises(TypeError) as caught:
                make()
            self.assertIn(named, str(caught.exception))
        # What they take: a Clock, the defaults, a registry, a guard.
        clock = Clock()
        pb.PBClientFactory(
            clock=clock, security=jelly.SecurityOptions(), registry=jelly.UnjellyableRegistry()
        )
        pb.PBServerFactory(portal, loginGuard=pb.LoginGuard(), clock=clock)
        # Counts it compares with, as before: a float, and inf for no limit.
        pb.LoginGuard(clock, maxFailuresPerConnection=float("inf"), maxAddresses=100.0)

    def test_loginOptionsWithoutPortalRefused(self) -> None:
        """A login guard, or a refusal of the legacy login, given with a root that is not a
        Portal would guard nothing (the factory takes no logins for it): refused at once,
        saying so, rather than leaving the server unguarded in silence."""
        portalRoot = PortalRoot(Portal(_NoRealm(), []))
        for root in (rootFor(pb), portalRoot):
            for options in ({"loginGuard": pb.LoginGuard()}, {"legacyLogin": False}):
                with self.assertRaises(ValueError) as caught:
                    pb.PBServerFactory(root, **options)
                self.assertIn("apply only when the root is a Portal", str(caught.exception))
                self.assertIn(type(root).__name__, str(caught.exception))
        # The defaults, with either root, and the options with a Portal, are taken.
        pb.PBServerFactory(rootFor(pb))
        pb.PBServerFactory(portalRoot, legacyLogin=True)
        pb.PBServerFactory(Portal(_NoRealm(), []), loginGuard=pb.LoginGuard(), legacyLogin=False)


@implementer(IRealm)
class _NoRealm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        raise NotImplementedError()


class DialectsValidationTests(SynchronousTestCase):
    def test_messages(self) -> None:
        """dialects= must be a list of known dialect names, as bytes: anything else is
        refused with a message that says so, naming what was given."""
        for bad, error, text in (
            (b"pb", TypeError, "must be a list of dialect names such as [b'pb'], not b'pb'"),
            ("pb", TypeError, "not 'pb'"),
            (["pb"], TypeError, "a dialect name is bytes, such as b'pb', not 'pb'"),
            ([7], TypeError, "not 7"),
            ([b"xx"], ValueError, "not [b'xx']"),
            ([], ValueError, "not []"),
        ):
            with self.assertRaises(error) as caught:
                pb.PBClientFactory(dialects=bad)
            self.assertIn(text, str(caught.exception))

    def test_iterator(self) -> None:
        """An iterator of names serves every connection, not just the check."""
        factory = pb.PBClientFactory(dialects=iter([b"pb"]))
        for _ in range(2):
            self.assertEqual(factory.buildProtocol(None).knownDialects, [b"pb"])


class ModuleSizeLimitTests(SynchronousTestCase):
    """
    ``banana.SIZE_LIMIT = n``, the way stock PB programs raise the 640 KiB limit, raises it
    for the connections made afterwards, against a stock peer raised the same way.
    """

    def test_raisedBothWays(self) -> None:
        size = 2 * 1024 * 1024
        self.patch(banana, "SIZE_LIMIT", size)
        self.patch(twistedBanana, "SIZE_LIMIT", size)

        class Echo(pb.Root):
            def remote_echo(self, value: Any) -> Any:
                return value

        class StockEcho(twistedPb.Root):
            def remote_echo(self, value: Any) -> Any:
                return value

        payload = b"x" * (1024 * 1024)
        for serverFactory, clientFactory in (
            (twistedPb.PBServerFactory(StockEcho()), pb.PBClientFactory()),
            (pb.PBServerFactory(Echo()), twistedPb.PBClientFactory()),
            (pb.PBServerFactory(Echo()), pb.PBClientFactory(dialects=[b"pb"])),
        ):
            _server, client, pump = connectedServerAndClient(serverFactory, clientFactory)
            results: list[Any] = []
            client.remoteForName("root").callRemote("echo", payload).addBoth(results.append)
            pump.flush()
            self.assertEqual(results, [payload])

    def test_moduleFunctions(self) -> None:
        """banana.encode() and decode() honour it too, as Twisted's do."""
        self.patch(banana, "SIZE_LIMIT", 1024 * 1024)
        data = b"x" * (700 * 1024)
        self.assertEqual(banana.decode(banana.encode(data)), data)
        self.patch(banana, "SIZE_LIMIT", 10)
        self.assertRaises(BananaEncodeError, banana.encode, b"x" * 11)
        self.assertRaises(BananaEncodeError, banana.encode, b"x" * 11, sizeLimit=None)
        eleven = banana.encode(b"x" * 11, sizeLimit=11)
        self.assertRaises(banana.BananaDecodeError, banana.decode, eleven, sizeLimit=None)
        self.assertRaises(banana.BananaDecodeError, banana.decode, eleven)

    def test_classLimitWins(self) -> None:
        """A class or instance that sets sizeLimit keeps it."""
        self.patch(banana, "SIZE_LIMIT", 10)

        class Small(pb.Broker):
            sizeLimit = 1000

        broker = Small()
        broker.makeConnection(StringTransport())
        self.assertEqual(broker.sizeLimit, 1000)
        plain = pb.Broker()
        plain.makeConnection(StringTransport())
        self.assertEqual(plain.sizeLimit, 10)


class Shapes:
    """A namespace class, with classes nested in it, as real programs have."""

    class Point(pb.Copyable):
        def __init__(self) -> None:
            self.x = 1

    class Denied(pb.Error):
        pass


class StockShapes:
    """The same, with stock PB's classes: they travel under the same names."""

    class Point(twistedPb.Copyable):
        def __init__(self) -> None:
            self.x = 1

    class Denied(twistedPb.Error):
        pass


class NestedClassTests(SynchronousTestCase):
    """
    A nested class travels under the name stock PB gives it (``module.Name``, as Twisted's
    ``reflect.qual`` makes it), so copies and failures of nested classes work between pbroker
    and stock peers.
    """

    def test_tagIsModuleAndName(self) -> None:
        self.assertEqual(Shapes.Point().getTypeToCopy(), f"{__name__}.Point".encode())
        self.assertEqual(Shapes.Point().getTypeToCopy(), StockShapes.Point().getTypeToCopy())

    def test_sameNameWarns(self) -> None:
        """Registering two classes of one module with the same name (nested in different
        classes) warns: they share a tag, and the second replaces the first. Registering a
        class again (a reload) does not."""
        registry = pb.UnjellyableRegistry()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            registry.setUnjellyableForClass(Shapes.Point, pb.RemoteCopy)
            registry.setUnjellyableForClass(Shapes.Point, pb.RemoteCopy)
            self.assertEqual(caught, [])
            registry.setUnjellyableForClass(StockShapes.Point, pb.RemoteCopy)
        [warning] = caught
        self.assertIn(
            f"{__name__}.Point now names StockShapes.Point instead of Shapes.Point",
            str(warning.message),
        )

    def test_stockPeers(self) -> None:
        class RemotePoint(pb.RemoteCopy):
            pass

        class StockRemotePoint(twistedPb.RemoteCopy):
            pass

        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Shapes.Point, RemotePoint)
        self.patch(twistedJelly, "unjellyableRegistry", dict(twistedJelly.unjellyableRegistry))
        twistedPb.setUnjellyableForClass(StockShapes.Point, StockRemotePoint)

        class Root(pb.Root):
            def remote_point(self) -> Any:
                return Shapes.Point()

            def remote_deny(self) -> None:
                raise Shapes.Denied("no")

        class StockRoot(twistedPb.Root):
            def remote_point(self) -> Any:
                return StockShapes.Point()

            def remote_deny(self) -> None:
                raise StockShapes.Denied("no")

        for serverFactory, clientFactory, remote, denied in (
            (
                twistedPb.PBServerFactory(StockRoot()),
                pb.PBClientFactory(registry=registry),
                RemotePoint,
                Shapes.Denied,
            ),
            (
                pb.PBServerFactory(Root()),
                twistedPb.PBClientFactory(),
                StockRemotePoint,
                StockShapes.Denied,
            ),
        ):
            _server, client, pump = connectedServerAndClient(serverFactory, clientFactory)
            root = client.remoteForName("root")
            results: list[Any] = []
            root.callRemote("point").addBoth(results.append)
            root.callRemote("deny").addBoth(results.append)
            pump.flush()
            point, failure = results
            self.assertIsInstance(point, remote)
            self.assertEqual(point.x, 1)
            self.assertIsInstance(failure, Failure)
            self.assertTrue(failure.check(denied), failure)


class OwnReferenceBackTests(SynchronousTestCase):
    """
    A stock server that sends back a reference to the client's own object without keeping
    it releases it before its answer goes: the object arrives as None, as it does for a
    stock client, and the rest of the answer arrives.
    """

    def test_releasedBeforeTheAnswer(self) -> None:
        class StockRoot(twistedPb.Root):
            def remote_wrap(self, obj: Any) -> Any:
                return {"obj": obj, "n": 1}

        _server, client, pump = connectedServerAndClient(
            twistedPb.PBServerFactory(StockRoot()), pb.PBClientFactory()
        )
        results: list[Any] = []
        with capturedLogs() as events:
            client.remoteForName("root").callRemote("wrap", pb.Referenceable()).addBoth(
                results.append
            )
            pump.flush()
        self.assertEqual(results, [{"obj": None, "n": 1}])
        self.assertTrue(any("already released" in str(e.get("log_format")) for e in events))

    def test_unknownFromAPbrokerPeer(self) -> None:
        """A pbroker peer never sends back what it released: an unknown id from it is the
        protocol error it was, not None."""
        _server, client, _pump = connectedServerAndClient(
            pb.PBServerFactory(pb.Root()), pb.PBClientFactory(dialects=[b"pbroker1"])
        )
        self.assertTrue(client.peerIsPbroker)
        with self.assertRaises(InvalidJelly) as caught:
            client.unserialize([b"local", 987654])
        self.assertIn("a local reference to an unknown id: 987654", str(caught.exception))


class BareBrokerTests(SynchronousTestCase):
    """
    Brokers built without a factory, and the broker's own API for notifiers and names.
    """

    def connectBare(self) -> tuple[Any, Any, iosim.IOPump]:
        """
        A server and a client Broker without factories, connected in memory and not yet
        greeted; the server exports a root under a name given as str.
        """
        server, client = pb.Broker(isClient=False), pb.Broker(isClient=True)
        server.setNameForLocal("root", rootFor(pb))
        serverAddress = IPv4Address("TCP", "127.0.0.1", 8789)
        clientAddress = IPv4Address("TCP", "127.0.0.1", 54321)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(server, True, serverAddress, clientAddress),
            client,
            iosim.FakeTransport(client, False, clientAddress, serverAddress),
            greet=False,
        )
        return server, client, pump

    def test_withoutFactories(self) -> None:
        """Brokers without factories negotiate and carry calls; a name given as str is
        the same as bytes."""
        server, client, pump = self.connectBare()
        pump.flush()
        self.assertEqual(server.currentDialect, pb.NATIVE_DIALECT)
        self.assertIs(server.localObjectForID("root"), server.localObjectForID(b"root"))
        results: list[Any] = []
        client.remoteForName("root").callRemote("echo", 5).addBoth(results.append)
        pump.flush()
        self.assertEqual(results, [5])

    def test_unconnectedBrokerRefusesAReference(self) -> None:
        """A broker with no connection that unjellies a reference over its limit (an
        application's own call) refuses it with LimitExceeded, and writes nothing: there
        is no peer to send its decref, or the release of the rest of the value, to."""
        broker = pb.Broker(limits=pb.BrokerLimits(importedReferences=1))
        held = broker.unserialize([b"remote", 1])
        self.assertIsInstance(held, pb.RemoteReference)
        with self.assertRaises(LimitExceeded) as raised:
            broker.unserialize([b"list", [b"remote", 2], [b"remote", 3]])
        self.assertEqual(str(raised.exception), "the peer sent more than 1 references")
        self.assertIsNone(broker.transport)
        self.assertEqual(broker.importedReferences, 1)
        self.assertEqual(broker._unreadCaches, None)

    def test_noneIsNotExported(self) -> None:
        """None cannot be exported under a name: nothing is exported."""
        broker = pb.Broker()
        with self.assertRaises(ValueError) as raised:
            broker.setNameForLocal(b"nothing", None)
        self.assertEqual(str(raised.exception), "cannot export None")
        self.assertEqual(broker.localObjects, {})

    def test_connectNotifiers(self) -> None:
        """Connect notifiers run once the connection is ready, in order; one that raises is
        logged and the others still run; one added once ready runs at once."""
        _server, client, pump = self.connectBare()
        seen: list[str] = []

        def failing() -> None:
            seen.append("failing")
            raise RuntimeError("notifier failed")

        client.notifyOnConnect(lambda: seen.append("first"))
        client.notifyOnConnect(failing)
        client.notifyOnConnect(lambda: seen.append("third"))
        self.assertEqual(seen, [])
        with capturedLogs() as events:
            pump.flush()
        self.assertEqual(seen, ["first", "failing", "third"])
        [event] = [e for e in events if "log_failure" in e]
        self.assertEqual(event["log_format"], "Error in a connect notifier")
        self.assertEqual(str(event["log_failure"].value), "notifier failed")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        client.notifyOnConnect(lambda: seen.append("late"))
        self.assertEqual(seen, ["first", "failing", "third", "late"])

    def test_notifiersMustBeCallable(self) -> None:
        """A notifier that is not callable is refused when it is given, connected or not."""
        broker = pb.Broker()
        for register in (broker.notifyOnConnect, broker.notifyOnDisconnect):
            with self.assertRaises(TypeError) as raised:
                register(None)  # type: ignore[arg-type]
            self.assertIn("needs a callable, not None", str(raised.exception))
        self.assertEqual((broker.connects, broker.disconnects), ([], []))

    def test_disconnectNotifiers(self) -> None:
        """Disconnect notifiers run once, in order, however often the loss is reported; one
        that raises is logged and the others still run."""
        _server, client, pump = self.connectBare()
        pump.flush()
        seen: list[str] = []

        def failing() -> None:
            seen.append("failing")
            raise RuntimeError("notifier failed")

        client.notifyOnDisconnect(failing)
        client.notifyOnDisconnect(lambda: seen.append("second"))
        with capturedLogs() as events:
            client.connectionLost(Failure(ConnectionDone()))
            client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(seen, ["failing", "second"])
        self.assertEqual(
            [e["log_format"] for e in events if "log_failure" in e],
            ["Error in a disconnect notifier"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(client.disconnected)

    def test_referenceDisconnectCallbacks(self) -> None:
        """A reference's disconnect callbacks all run, in either dialect: one that raises is
        logged and does not skip the cleanup of those after it."""
        self.inBothDialects(self.checkReferenceDisconnectCallbacks)

    def checkReferenceDisconnectCallbacks(self, dialects: list[bytes] | None) -> None:
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(rootFor(pb)), pb.PBClientFactory(dialects=dialects)
        )
        called = client.remoteForName("root").callRemote("counter")
        pump.flush()
        counter = self.successResultOf(called)
        seen: list[str] = []

        def failing(reference: Any) -> None:
            seen.append("failing")
            raise RuntimeError("callback failed")

        counter.notifyOnDisconnect(failing)
        counter.notifyOnDisconnect(lambda reference: seen.append("second"))
        with capturedLogs() as events:
            client.transport.loseConnection()
            pump.flush()
        self.assertEqual(seen, ["failing", "second"])
        [event] = [e for e in events if "log_failure" in e]
        self.assertIn("disconnect callback", event["log_format"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_raisingExportCleanup(self) -> None:
        """A cleanup an application keeps in ``localCleanup`` (stock's ``_localCleanup``)
        that raises when the peer releases the export is logged; the connection and its
        other calls go on, in either dialect."""
        self.inBothDialects(self.checkRaisingExportCleanup)

    def inBothDialects(self, check: Callable[[list[bytes] | None], None]) -> None:
        for dialects in (None, [b"pb"]):
            check(dialects)

    def checkRaisingExportCleanup(self, dialects: list[bytes] | None) -> None:
        root = rootFor(pb)
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(root), pb.PBClientFactory(dialects=dialects)
        )
        remoteRoot = client.remoteForName("root")
        called = remoteRoot.callRemote("counter")
        pump.flush()
        counter = self.successResultOf(called)
        cleaned: list[str] = []

        def cleanup() -> None:
            cleaned.append("cleanup")
            raise RuntimeError("cleanup failed")

        server.localCleanup[root.counter.processUniqueID()] = cleanup
        del counter
        gc.collect()
        with capturedLogs() as events:
            pump.flush()
        self.assertEqual(cleaned, ["cleanup"])
        self.assertEqual(
            [e["log_format"] for e in events if "log_failure" in e],
            ["Error in the cleanup of an export"],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(list(server.localObjects), [b"root"])
        called = remoteRoot.callRemote("echo", 7)
        pump.flush()
        self.assertEqual(self.successResultOf(called), 7)


def sharedLists(depth: int) -> list[Any]:
    """
    Lists that share their parts: ``depth`` levels of ``[v, v]`` over ``[1]``, a few
    hundred bytes in memory that stand for ``2**(depth + 1)`` lists when written out.
    """
    value: list[Any] = [1]
    for _ in range(depth):
        value = [value, value]
    return value


class SharedValueInErrorTests(SynchronousTestCase):
    """
    An exception raised with a value from the peer whose lists share their parts (jelly
    keeps the sharing, so it is cheap to send) stands for more items than can be written
    out: ``str()`` of it would take time and memory without end. pbroker describes it
    briefly instead, to the caller and in its log.
    """

    def test_describedToTheCallerAndInTheLog(self) -> None:
        class Root(pb.Root):
            def remote_lookup(self, key: Any) -> None:
                raise KeyError(key)

        for clientFactory in (pb.PBClientFactory(dialects=[b"pb"]), twistedPb.PBClientFactory()):
            with self.subTest(client=type(clientFactory).__module__):
                _server, client, pump = connectedServerAndClient(
                    pb.PBServerFactory(Root()), clientFactory
                )
                results: list[Any] = []
                with capturedLogs() as events:
                    root = client.remoteForName("root")
                    root.callRemote("lookup", sharedLists(21)).addBoth(results.append)
                    pump.flush()
                [failure] = results
                self.assertTrue(failure.check(KeyError))
                message = failure.getErrorMessage()
                self.assertIn("not written out", message)
                self.assertIn("more than 1,000,000 items", message)
                self.assertLess(len(message), 300)
                [event] = [e for e in events if "log_failure" in e]
                logged = event["log_failure"]
                self.assertTrue(logged.check(KeyError))
                text = logged.getTraceback()
                self.assertIn("remote_lookup", text)  # the traceback is the method's
                self.assertIn("KeyError: ([[[...], [...]], [[...], [...]]]) (not written", text)
                self.assertLess(len(text), 5000)
                self.flushLoggedErrors(KeyError)

    def test_unsafeTracebacks(self) -> None:
        """The traceback a server sends when it sends tracebacks ends with the description
        too, not str() of the exception."""

        class Root(pb.Root):
            def remote_lookup(self, key: Any) -> None:
                raise KeyError(key)

        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root(), unsafeTracebacks=True), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        with capturedLogs():
            client.remoteForName("root").callRemote("lookup", sharedLists(21)).addBoth(
                results.append
            )
            pump.flush()
        [failure] = results
        text = failure.getTraceback()
        self.assertIn("remote_lookup", text)
        self.assertIn("(not written out", text)
        self.assertLess(len(text), 5000)
        self.flushLoggedErrors(KeyError)

    def test_pagerFailure(self) -> None:
        """A pager that fails with such a value tells its collector, and the log, briefly."""

        class Failing(util.Pager):
            def __init__(self, collector: Any, key: Any) -> None:
                self.key = key
                super().__init__(collector)

            def nextPage(self) -> Any:
                self.pages = getattr(self, "pages", 0) + 1
                if self.pages < 3:
                    return b"page"
                raise LookupError("no page for", self.key)

        class Root(pb.Root):
            def remote_fetch(self, collector: Any, key: Any) -> None:
                Failing(collector, key)

        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root()), pb.PBClientFactory(dialects=[b"pb"])
        )
        results: list[Any] = []
        with capturedLogs() as events:
            root = client.remoteForName("root")
            util.getAllPages(root, "fetch", sharedLists(21)).addBoth(results.append)
            pump.flush()
        [failure] = results
        self.assertIn("(not written out", failure.getErrorMessage())
        self.assertLess(len(failure.getErrorMessage()), 300)
        [event] = [e for e in events if "log_failure" in e]
        self.assertLess(len(event["log_failure"].getTraceback()), 5000)
        self.flushLoggedErrors(LookupError)

    def test_errorText(self) -> None:
        """Only arguments holding containers that stand for too much are described: long
        strings, and containers within the bound, are written out as str() writes them."""
        cycle: list[Any] = [1]
        cycle.append(cycle)
        written = [
            ValueError("e" * 3_000_000),
            KeyError(b"k" * 3_000_000),
            ValueError([1, 2], {"a": (3,)}),
            KeyError(sharedLists(17)),  # 2**18 lists: within the bound
            ValueError(),
        ]
        for error in written:
            self.assertEqual(errorText(error), str(error))
        cases = [
            (KeyError(sharedLists(22)), "stand for more than 1,000,000 items"),  # 2**23 lists
            (ValueError("why", cycle), "hold themselves"),
        ]
        for error, why in cases:
            text = errorText(error)
            self.assertIn(f"(not written out: its lists and dicts {why}", text)
            self.assertLess(len(text), 300)
        self.assertTrue(errorText(ValueError("why", cycle)).startswith("('why', [1, [1, [...]]])"))
        # Nested deeper than repr goes (a peer's value may nest a thousand levels): described.
        shallow: Any = 1
        deep: Any = 1
        for level in range(1000):
            deep = [deep]
            if level < 99:
                shallow = [shallow]
        self.assertEqual(errorText(KeyError(shallow)), str(KeyError(shallow)))
        text = errorText(KeyError(deep))
        self.assertIn("(not written out: its lists and dicts hold themselves, or nest more", text)
        self.assertLess(len(text), 300)
        justOver: Any = 1
        for _ in range(101):
            justOver = [justOver]
        self.assertIn("nest more than 100 deep", errorText(KeyError(justOver)))

    def test_deeplyNestedErrorValue(self) -> None:
        """A method that raises KeyError(key) with a key the peer nested a thousand deep:
        the caller gets the KeyError, and the server logs it once."""
        deep: Any = 1
        for _ in range(1000):
            deep = [deep]

        class Root(pb.Root):
            def remote_boom(self, key: Any) -> None:
                raise KeyError(key)

        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(Root()), pb.PBClientFactory()
        )
        results: list[Any] = []
        with capturedLogs() as events:
            client.remoteForName("root").callRemote("boom", deep).addBoth(results.append)
            pump.flush()
        [failure] = results
        self.assertTrue(failure.check(KeyError), failure)
        self.assertEqual(len([e for e in events if e.get("log_failure") is not None]), 1)
        self.flushLoggedErrors(KeyError)

    def test_loggableKeepsTheFailure(self) -> None:
        """A failure with nothing too large is logged as it is; one with a value too large
        is logged as a copy of the same type and traceback, the original left alone."""
        try:
            raise ValueError(sharedLists(22))  # (str() of it would end, if slowly)
        except ValueError:
            large = Failure()
        try:
            raise ValueError("small")
        except ValueError:
            small = Failure()
        self.assertIs(loggable(small), small)
        copy = loggable(large)
        self.assertIsNot(copy, large)
        self.assertEqual((copy.type, copy.tb, copy.frames), (large.type, large.tb, large.frames))
        self.assertIn("ValueError: ([[[...], [...]], [[...], [...]]]) (not", copy.getTraceback())
        self.assertIsInstance(large.value.args[0], list)  # the application's error unchanged


class EarlyCallTests(SynchronousTestCase):
    """
    Calls and messages a broker sends before the dialect is chosen (from a ``Broker``
    subclass's ``connectionMade``, say) wait, and go in order, encoded in the chosen dialect.
    """

    def connectEarly(self, serverFactory: Any, clientFactory: Any) -> tuple[Any, Any, Any]:
        return connectedServerAndClient(serverFactory, clientFactory, greet=False)

    def test_serverCallsBeforeTheClientChose(self) -> None:
        """A server that calls the client at once is answered, in every dialect a pbroker
        client chooses, and by a stock client; the calls keep their order."""
        results: list[Any] = []

        class Eager(pb.Broker):
            def connectionMade(self) -> None:
                super().connectionMade()
                for value in ("first", "second"):
                    self.remoteForName("hello").callRemote("echo", value).addBoth(results.append)
                self.remoteForName("hello").callRemote("record", "one-way", pbanswer=False)

        for clientModule, dialects in [
            (pb, [b"pbroker2"]),
            (pb, [b"pbroker1"]),
            (pb, [b"pb"]),
            (twistedPb, None),
        ]:
            del results[:]
            hello = rootFor(clientModule)
            serverFactory = pb.PBServerFactory(pb.Root())
            serverFactory.protocol = Eager
            options = {} if dialects is None else {"dialects": dialects}
            clientFactory = clientModule.PBClientFactory(**options)
            server, client, pump = self.connectEarly(serverFactory, clientFactory)
            client.setNameForLocal(b"hello", hello)
            pump.flush()
            self.assertEqual(results, ["first", "second"], dialects)
            self.assertEqual(hello.received, ["one-way"])
            self.assertFalse(server.transport.disconnecting)
            self.assertFalse(client.transport.disconnecting)
            if dialects is not None:
                self.assertEqual(client.currentDialect, dialects[0])

    def test_clientCallsBeforeItChose(self) -> None:
        """A client that calls the server before it has chosen a dialect is answered;
        messages given whole wait too."""
        root = rootFor(pb)
        results: list[Any] = []

        class Eager(pb.Broker):
            def connectionMade(self) -> None:
                super().connectionMade()
                self.remoteForName("root").callRemote("echo", 1).addBoth(results.append)
                self.remoteForName("root").callRemote("record", 2, pbanswer=False)
                # (What was made after a one-way call waits and goes too.)
                self.remoteForName("root").callRemote("echo", 3).addBoth(results.append)
                self.sendCall(b"ping", 7)

        for dialects in ([b"pbroker2"], [b"pb"]):
            del results[:]
            del root.received[:]
            clientFactory = pb.PBClientFactory(dialects=dialects)
            clientFactory.protocol = Eager
            server, client, pump = self.connectEarly(pb.PBServerFactory(root), clientFactory)
            pump.flush()
            self.assertEqual(results, [1, 3])
            self.assertEqual(root.received, [2])
            self.assertEqual(client.currentDialect, dialects[0])
            self.assertFalse(server.transport.disconnecting)

    def test_cancelledBeforeReady(self) -> None:
        """A call cancelled before the connection was ready fails with CancelledError and
        is never sent; one cancelled after it went is abandoned as any call is."""
        root = rootFor(pb)
        _server, client, pump = self.connectEarly(pb.PBServerFactory(root), pb.PBClientFactory())
        target = client.remoteForName("root")
        first = target.callRemote("record", "never")
        second = target.callRemote("wait")
        kept = target.callRemote("echo", "kept")
        first.cancel()
        self.failureResultOf(first, CancelledError)
        pump.flush()
        self.assertEqual(root.received, [])
        self.assertEqual(self.successResultOf(kept), "kept")
        self.assertNoResult(second)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        pump.flush()
        self.assertEqual(client.waitingForAnswers, {})

    def test_lostBeforeReady(self) -> None:
        """Calls made before the connection was ready fail with PBConnectionLost if it is
        lost first; a stream argument is closed, not left open."""
        root = rootFor(pb)
        _server, client, pump = self.connectEarly(pb.PBServerFactory(root), pb.PBClientFactory())
        stream = Stream()
        call = client.remoteForName("root").callRemote("record", stream)
        client.transport.loseConnection()
        pump.flush()
        self.failureResultOf(call, PBConnectionLost)
        self.assertEqual(root.received, [])
        self.assertTrue(stream.closed)

    def test_unsendableMessageBeforeReady(self) -> None:
        """A message given whole before the connection was ready that cannot be encoded
        once it is is logged and dropped; the calls made after it still go and are
        answered (not left waiting for ever), and the root is still handed out."""
        root = rootFor(pb)
        for dialects in ([b"pbroker2"], [b"pb"]):
            clientFactory = pb.PBClientFactory(dialects=dialects)
            rootReference = clientFactory.getRootObject()
            _server, client, pump = self.connectEarly(pb.PBServerFactory(root), clientFactory)
            client.sendCall(b"bogus", object())
            call = client.remoteForName("root").callRemote("echo", "after")
            with capturedLogs() as events:
                pump.flush()
            self.assertEqual(self.successResultOf(call), "after")
            self.successResultOf(rootReference)
            self.assertIn(
                "A message sent before the connection was ready could not be sent",
                [event.get("log_format") for event in events],
            )
            self.flushLoggedErrors()

    def test_pagerBeforeReady(self) -> None:
        """A pager started before the connection was ready sends every page once it is (its
        first page waited: nothing else would have asked it for the next)."""
        for dialects in ([b"pbroker2"], [b"pb"]):
            pages: list[Any] = []

            class Eager(pb.Broker):
                def connectionMade(self) -> None:
                    super().connectionMade()
                    util.StringPager(self.remoteForName("collector"), b"x" * 100, chunkSize=10)

            serverFactory = pb.PBServerFactory(pb.Root())
            serverFactory.protocol = Eager
            server, client, pump = self.connectEarly(
                serverFactory, pb.PBClientFactory(dialects=dialects)
            )
            client.setNameForLocal(b"collector", util.CallbackPageCollector(pages.append))
            pump.flush()
            self.assertEqual(pages, [[b"x" * 10] * 10], dialects)
            self.assertEqual(server.pageProducers, [])

    def test_timeoutCountsTheWait(self) -> None:
        """A call's timeout counts from the call, also while it waits for the dialect: a
        peer that never chooses one does not keep it waiting past its timeout."""
        from twisted.internet.defer import TimeoutError
        from twisted.internet.protocol import Factory, Protocol

        clock = Clock()
        _server, client, pump = connectedServerAndClient(
            Factory.forProtocol(Protocol),
            pb.PBClientFactory(clock=clock),
            greet=False,
            clock=clock,
        )
        call = client.remoteForName("root").withOptions(timeout=5).callRemote("echo", 1)
        pump.flush()
        clock.advance(4)
        self.assertNoResult(call)
        clock.advance(1)
        failure = self.failureResultOf(call, TimeoutError)
        self.assertIn("'echo' had no answer within 5 seconds", failure.getErrorMessage())
        # One answered in time is not failed later.
        root = rootFor(pb)
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(root, clock=clock),
            pb.PBClientFactory(clock=clock),
            greet=False,
            clock=clock,
        )
        call = client.remoteForName("root").withOptions(timeout=5).callRemote("echo", 2)
        # One sent, then unanswered, times out as any call does, and is cancelled.
        waiting = client.remoteForName("root").withOptions(timeout=5).callRemote("wait")
        pump.flush()
        self.assertEqual(self.successResultOf(call), 2)
        self.assertEqual(len(client.waitingForAnswers), 1)
        clock.advance(5)
        self.assertIn(
            "'wait' had no answer", self.failureResultOf(waiting, TimeoutError).getErrorMessage()
        )
        self.assertEqual(client.waitingForAnswers, {})

    def test_negotiationThroughSendEncoded(self) -> None:
        """A Broker subclass that overrides sendEncoded sees the dialects offered and the one
        chosen, as with stock PB, though what it sends before the choice waits."""
        sent: list[Any] = []

        class Recording(pb.Broker):
            def sendEncoded(self, expression: Any) -> None:
                sent.append((self.isClient, expression))
                super().sendEncoded(expression)

        for factories in (
            (pb.PBServerFactory(rootFor(pb)), pb.PBClientFactory(dialects=[b"pb"])),
            (twistedPb.PBServerFactory(rootFor(twistedPb)), pb.PBClientFactory()),
        ):
            del sent[:]
            for factory in factories:
                if factory.__module__.startswith("pbroker"):
                    factory.protocol = Recording
            server, client, pump = self.connectEarly(*factories)
            client.remoteForName("root").callRemote("echo", 1)
            pump.flush()
            choice = next(expression for isClient, expression in sent if isClient)
            self.assertEqual(choice, b"pb")
            if isinstance(server, Recording):
                self.assertIn(b"pb", sent[0][1])


class OfferedLimitsTests(SynchronousTestCase):
    """
    A pbroker server's offer of dialects ends with the limits its hello will give, so a
    pbroker client knows them as it chooses and hands out the root then, as a stock client
    does (one pump); a stock client skips the entry as it skips any dialect it does not know.
    """

    def test_rootAfterOnePump(self) -> None:
        """The root is handed out once the client has read the offer, in both of pbroker's
        dialects, as stock PB hands it out."""
        for dialects in ([b"pbroker2"], [b"pbroker1"]):
            clientFactory = pb.PBClientFactory(dialects=dialects)
            roots: list[Any] = []
            clientFactory.getRootObject().addBoth(roots.append)
            _server, client, pump = connectedServerAndClient(
                pb.PBServerFactory(rootFor(pb)), clientFactory, greet=False
            )
            pump.pump()
            self.assertEqual(len(roots), 1, dialects)
            self.assertIsInstance(roots[0], pb.RemoteReference)
            self.assertEqual(client.currentDialect, dialects[0])

    def test_limitsKnownBeforeTheHello(self) -> None:
        """A call over the server's message limit, made before its hello arrived, fails
        with LimitExceeded and the connection stays, as after the hello."""
        limits = pb.BrokerLimits(messageSize=2048)
        clientFactory = pb.PBClientFactory()
        roots: list[Any] = []
        clientFactory.getRootObject().addBoth(roots.append)
        _server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(rootFor(pb), limits=limits), clientFactory, greet=False
        )
        pump.pump()
        [root] = roots
        self.assertEqual(client.peerMessageSize, 2048)
        failure = self.failureResultOf(root.callRemote("echo", b"x" * 4096))
        self.assertTrue(failure.check(LimitExceeded))
        answer = root.callRemote("echo", b"small")
        pump.flush()
        self.assertEqual(self.successResultOf(answer), b"small")
        self.assertFalse(client.transport.disconnecting)

    def test_offer(self) -> None:
        """The entry comes after the dialects: the server's message size (0: none) and the
        bytes of large calls it holds untaken."""
        broker = pb.Broker(isClient=False)
        self.assertEqual(
            broker._offer(),
            [b"pbroker2", b"pbroker1", b"pb", b"none", b"pbroker-limits:33554432:16777216"],
        )
        broker = pb.Broker(isClient=False, limits=pb.BrokerLimits(messageSize=None))
        self.assertEqual(broker._offer()[-1], b"pbroker-limits:0:16777216")
        self.assertEqual(pb.Broker(isClient=False, dialects=[b"pb"])._offer(), [b"pb"])

    def test_malformedOrMissingEntry(self) -> None:
        """A malformed entry is ignored, and so is a missing one (an earlier server): the
        client then hands out the root after the server's hello."""
        from pbroker.broker import _parseLimits

        self.assertEqual(_parseLimits(b"pbroker-limits:1024:5"), (1024, 5))
        self.assertEqual(_parseLimits(b"pbroker-limits:0:0"), (None, 0))
        # Fields a later version appends are ignored (docs/native.rst, "Later versions").
        self.assertEqual(_parseLimits(b"pbroker-limits:1024:5:7:new"), (1024, 5))
        for bad in (
            b"pbroker-limits:",
            b"pbroker-limits:1:",
            b"pbroker-limits:1:x:3",
            b"pbroker-limits:-1:2",
            b"pbroker-limits:1:x",
            b"pbroker-limits:\xd9\xa1:2",
            b"pbroker-limits:" + b"9" * 60 + b":1",
        ):
            self.assertIsNone(_parseLimits(bad), bad)

        class Earlier(pb.Broker):
            def _offer(self) -> list[bytes]:
                return list(self.knownDialects)

        serverFactory = pb.PBServerFactory(rootFor(pb))
        serverFactory.protocol = Earlier
        clientFactory = pb.PBClientFactory()
        roots: list[Any] = []
        clientFactory.getRootObject().addBoth(roots.append)
        _server, _client, pump = connectedServerAndClient(serverFactory, clientFactory, greet=False)
        pump.pump()
        self.assertEqual(roots, [])
        pump.flush()
        self.assertEqual(len(roots), 1)

    def test_pbroker1ChecksTheOfferedLimit(self) -> None:
        """In pbroker1 (PB's encoding between pbroker peers), where no hello is sent, the
        client checks its calls and its answers to the server against the limit the offer
        gave: over it, they fail with LimitExceeded instead of the server dropping the
        connection."""
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(rootFor(pb), limits=pb.BrokerLimits(messageSize=2048)),
            pb.PBClientFactory(dialects=[b"pbroker1"]),
        )
        self.assertEqual(client.currentDialect, b"pbroker1")
        root = client.remoteForName("root")
        failure = self.failureResultOf(root.callRemote("echo", b"x" * 4096))
        self.assertTrue(failure.check(LimitExceeded))
        self.assertIn("over the 2048-byte limit the peer accepts", failure.getErrorMessage())
        answer = root.callRemote("echo", b"x" * 1000)
        pump.flush()
        self.assertEqual(self.successResultOf(answer), b"x" * 1000)

        class Big(pb.Referenceable):
            def remote_big(self) -> bytes:
                return b"y" * 4096

        client.setNameForLocal(b"big", Big())
        results: list[Any] = []
        server.remoteForName(b"big").callRemote("big").addBoth(results.append)
        pump.flush()
        [refused] = results
        self.assertTrue(refused.check(LimitExceeded))
        self.assertFalse(client.transport.disconnecting)
        self.assertFalse(server.transport.disconnecting)
        self.flushLoggedErrors(LimitExceeded)
