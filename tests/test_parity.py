"""
The native dialect and the ``pb`` dialect treat the same application code alike where the
documentation says they do: iterators of allowed classes are copied, one-way calls that fail
are logged however they fail, method names that cannot be called or sent get messages that
say so, and a copy whose state refers to itself gets that state as documented.
"""

from __future__ import annotations

from typing import Any

import msgpack
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.spread import jelly as twistedJelly
from twisted.trial.unittest import SynchronousTestCase

from pbroker import context, jelly, pb
from pbroker.errors import BananaEncodeError, InsecureJelly
from pbroker.stream import RemoteStream
from pbroker.testing import connectedServerAndClient
from tests.test_native import Cursor

# Each test runs in both dialects: None is the native one (two pbroker peers choose it).
DIALECTS = (None, [b"pb"])


def connect(root: Any, dialects: list[bytes] | None, **options: Any) -> tuple[Any, Any, Any]:
    client = pb.PBClientFactory(**options, **({} if dialects is None else {"dialects": dialects}))
    server, broker, pump = connectedServerAndClient(pb.PBServerFactory(root, **options), client)
    pump.flush()
    return server, broker, pump


def answer(broker: Any, pump: Any, name: Any, *args: Any) -> Any:
    results: list[Any] = []
    broker.remoteForName("root").callRemote(name, *args).addBoth(results.append)
    pump.flush()
    return results[0]


class Cursors(pb.Root):
    def remote_take(self, value: Any) -> Any:
        return [type(value).__name__, getattr(value, "rows", None)]

    def remote_give(self) -> Any:
        return Cursor([1, 2])

    def remote_giveUnallowed(self) -> Any:
        return iter([1, 2])


class AllowedIteratorTests(SynchronousTestCase):
    def test_copiedInEveryDialect(self) -> None:
        """An iterator of a class the security options allow is copied by its state, as an
        argument and as an answer, in the native dialect as in the pb dialect."""
        for dialects in DIALECTS:
            security = jelly.SecurityOptions()
            security.allowInstancesOf(Cursor)
            _server, broker, pump = connect(Cursors(), dialects, security=security)
            self.assertEqual(answer(broker, pump, "take", Cursor([1, 2])), ["Cursor", [1, 2]])
            given = answer(broker, pump, "give")
            self.assertIsInstance(given, Cursor, dialects)
            self.assertEqual(list(given), [1, 2])

    def test_otherIteratorsStream(self) -> None:
        """Between pbroker peers, an iterator of a class not allowed is still a stream."""
        _server, broker, pump = connect(Cursors(), None)
        stream = answer(broker, pump, "giveUnallowed")
        self.assertIsInstance(stream, RemoteStream)
        items: list[Any] = []
        stream.collect().addCallback(items.extend)
        pump.flush()
        self.assertEqual(items, [1, 2])


class OneWay(pb.Root):
    def remote_error(self) -> None:
        raise pb.Error("deliberate, at once")

    def remote_failedDeferred(self) -> Any:
        return defer.fail(pb.Error("deliberate, later"))

    def remote_bug(self) -> None:
        raise ValueError("a bug")


class OneWayTests(SynchronousTestCase):
    def oneWay(self, name: str, dialects: list[bytes] | None) -> list[str]:
        _server, broker, pump = connect(OneWay(), dialects)
        with capturedLogs() as events:
            broker.remoteForName("root").callRemote(name, pbanswer=False)
            pump.flush()
        self.flushLoggedErrors()
        # (A failure logged with its traceback is marked with its type.)
        return [
            formatEvent(event)
            + (f" [{event['log_failure'].type.__name__}]" if "log_failure" in event else "")
            for event in events
        ]

    def test_everyFailureLogged(self) -> None:
        """A one-way call that fails is logged once, whether its method raised or its
        Deferred failed: the caller's business in one line, a bug with its traceback."""
        for dialects in DIALECTS:
            for name, logged in (
                ("error", ["A one-way remote call failed: Error: deliberate, at once"]),
                ("failedDeferred", ["A one-way remote call failed: Error: deliberate, later"]),
                (
                    "missing",
                    ["A one-way remote call failed: NoSuchMethod: No such method: remote_missing"],
                ),
            ):
                self.assertEqual(self.oneWay(name, dialects), logged, dialects)
            self.assertEqual(
                self.oneWay("bug", dialects), ["A one-way remote call failed [ValueError]"]
            )

    def test_answeredCallsUnchanged(self) -> None:
        """A call with an answer still logs none of the caller's business, and a bug as what
        the peer will receive."""
        for dialects in DIALECTS:
            _server, broker, pump = connect(OneWay(), dialects)
            with capturedLogs() as events:
                for name in ("error", "missing", "bug"):
                    self.assertIsInstance(answer(broker, pump, name), Failure)
            self.flushLoggedErrors(ValueError)
            logged = [formatEvent(event) for event in events]
            self.assertEqual(len(logged), 1, logged)
            self.assertTrue(logged[0].startswith("Peer will receive the following PB traceback"))


class Keeper(pb.Root):
    def __init__(self) -> None:
        self.received: list[Any] = []

    def remote_keep(self, value: Any) -> int:
        self.received.append(value)
        return 0


class Holder(pb.Copyable):
    def __init__(self, data: Any = None) -> None:
        self.data = data


class BytesLikeTests(SynchronousTestCase):
    """
    In the native dialect a bytearray or memoryview arrives as bytes however the value
    travels: also inside a value sent whole through jelly (a cycle, tuples nested more than
    8 deep) and in a copy's state; in the pb dialect jelly sends an unpersistable marker,
    as stock PB does.
    """

    def keep(self, value: Any, dialects: list[bytes] | None = None, **options: Any) -> Any:
        keeper = Keeper()
        _server, broker, pump = connect(keeper, dialects, **options)
        result = answer(broker, pump, "keep", value)
        if isinstance(result, Failure):
            return result
        [received] = keeper.received
        return received

    def test_throughJelly(self) -> None:
        cyclic: list[Any] = [bytearray(b"abc"), memoryview(b"xyz")]
        cyclic.append(cyclic)
        received = self.keep(cyclic)
        self.assertIs(received[2], received)  # sent whole through jelly: the cycle kept
        self.assertEqual(received[:2], [b"abc", b"xyz"])
        self.assertEqual([type(item) for item in received[:2]], [bytes, bytes])
        deep: Any = (bytearray(b"abc"),)
        for _ in range(9):
            deep = (deep,)
        received = self.keep(deep)
        for _ in range(9):
            (received,) = received
        self.assertEqual(received, (b"abc",))

    def test_inACopysState(self) -> None:
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(Holder, pb.RemoteCopy)
        self.assertEqual(self.keep(Holder(bytearray(b"abc")), registry=registry).data, b"abc")
        unpersistable = self.keep(Holder(bytearray(b"abc")), [b"pb"], registry=registry).data
        self.assertIsInstance(unpersistable, jelly.Unpersistable)

    def test_viewNotInOnePieceRefused(self) -> None:
        """A memoryview whose bytes are not in one piece is refused with the TypeError that
        says what to send instead, in a value sent through jelly as in any other."""
        for value in ([memoryview(b"abcdef")[::2]], [memoryview(b"abcdef")[::2], None]):
            if value[-1] is None:
                value[-1] = value  # a cycle: sent through jelly
            failure = self.keep(value)
            self.assertIsInstance(failure, Failure)
            failure.trap(TypeError)
            self.assertIn("send bytes(view), or view.tobytes()", failure.getErrorMessage())


class Echo(pb.Root):
    def remote_echo(self, value: Any = None) -> Any:
        return value


class MethodNameTests(SynchronousTestCase):
    def test_uncallableName(self) -> None:
        """A name that may not be called is named in the error as it was looked up."""
        for dialects in DIALECTS:
            _server, broker, pump = connect(Echo(), dialects)
            for name, shown in (
                ("echo.x", "remote_echo.x"),
                ("_echo", "remote__echo"),
                ("", "remote_"),
                ("echo\x00", "'remote_echo\\x00'"),
            ):
                failure = answer(broker, pump, name)
                self.assertEqual(
                    failure.getErrorMessage(),
                    f"No such method: {shown} (not a name that may be called)",
                )

    def test_surrogateInName(self) -> None:
        """A method name holding a lone surrogate cannot be sent: ValueError at once, saying
        that the name is the problem."""
        for dialects in DIALECTS:
            _server, broker, _pump = connect(Echo(), dialects)
            with self.assertRaises(ValueError) as raised:
                broker.remoteForName("root").callRemote("echo\udc80", 1)
            self.assertEqual(
                str(raised.exception),
                "a remote method's name must be valid Unicode text, not 'echo\\udc80' (it holds "
                "a lone surrogate)",
            )


class Selfish(pb.Copyable):
    def getStateToCopy(self) -> Any:
        return {"name": "x", "me": self}


class RemoteSelfish(pb.RemoteCopy):
    def setCopyableState(self, state: Any) -> None:
        self.keysSet = sorted(state)
        self.state = state
        self.__dict__.update(state)

    def postUnjelly(self) -> None:
        self.keysAfter = sorted(self.state)


class SelfReferenceTests(SynchronousTestCase):
    def test_stateReferringToTheCopy(self) -> None:
        """As docs/migration.rst says: setCopyableState gets the state without the entry that
        refers to the copy being built; it is in the same dict by postUnjelly."""
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(Selfish, RemoteSelfish)

        class Root(pb.Root):
            def remote_selfish(self) -> Any:
                return Selfish()

        for dialects in DIALECTS:
            _server, broker, pump = connectedServerAndClient(
                pb.PBServerFactory(Root()),
                pb.PBClientFactory(
                    registry=registry, **({} if dialects is None else {"dialects": dialects})
                ),
            )
            copy = answer(broker, pump, "selfish")
            self.assertEqual((copy.keysSet, copy.keysAfter), (["name"], ["me", "name"]))
            self.assertIs(copy.state["me"], copy)


class KeyOrderTests(SynchronousTestCase):
    def test_entriesReferringBackKeepTheirPlace(self) -> None:
        """A dictionary whose values refer back to what is still being built (itself, or a
        list holding it) keeps the sender's key order, as stock PB keeps it, in each dialect
        and from stock's jelly."""
        for which, expected in (("self", ["a", "b", "c", "d"]), ("cycle", ["a", "b"])):
            made = _referringBack(which)
            received = [jelly.unjelly(twistedJelly.jelly(made), jelly.DummySecurityOptions())]
            for dialects in DIALECTS:
                _server, broker, pump = connectedServerAndClient(
                    pb.PBServerFactory(_ReferringBack()),
                    pb.PBClientFactory(**({} if dialects is None else {"dialects": dialects})),
                )
                received.append(answer(broker, pump, "value", which))
            for value in received:
                d = value if which == "self" else value[0]
                self.assertEqual(list(d), expected, (which, value))
                self.assertIs(d["a"], value)


def _referringBack(which: str) -> Any:
    if which == "self":
        d: dict[str, Any] = {"a": None, "b": 2, "c": None, "d": 4}
        d["a"] = d["c"] = d
        return d
    outer: list[Any] = []
    outer.append({"a": outer, "b": 2})
    return outer


class _ReferringBack(pb.Root):
    def remote_value(self, which: str) -> Any:
        return _referringBack(which)


class KindOf(pb.Root):
    def remote_kind(self, value: Any) -> bytes:
        return type(value).__name__.encode()

    def remote_text(self) -> str:
        return "text"


class SecurityOptionsTests(SynchronousTestCase):
    def options(self, *allowed: str) -> jelly.SecurityOptions:
        options = jelly.SecurityOptions()
        options.allowTypes(*allowed)
        return options

    def refused(self, broker: Any, pump: Any, name: str, *args: Any) -> str:
        """
        Call ``name``, which the server refuses; the error's message.
        """
        with capturedLogs() as events:
            failure = answer(broker, pump, name, *args)
        self.assertIsInstance(failure, Failure, repr(args))
        self.assertTrue(failure.check(InsecureJelly), failure)
        self.assertIn("Refused a call to {method}: {error}", [e["log_format"] for e in events])
        return str(failure.getErrorMessage())

    def test_containersRuledAlike(self) -> None:
        """Options that refuse a kind of container refuse it in the native dialect too,
        where the codec builds it without jelly, anywhere in a call's arguments: the server
        refuses the call with InsecureJelly, as in the pb dialect; what they allow passes.
        (A call's arguments are a tuple and its keywords a dictionary in both.)"""
        for dialects in DIALECTS:
            options = self.options("tuple", "dictionary")  # no lists
            _server, broker, pump = connect(KindOf(), dialects, security=options)
            for value in ([1, 2], (1, [2]), {"a": [1]}, {frozenset({"x"}): (1, [])}):
                self.assertEqual(
                    self.refused(broker, pump, "kind", value),
                    "type 'list' is not allowed by the security options",
                )
            for value, kind in (((1, 2), b"tuple"), ({"a": (1,)}, b"dict"), ({1, 2}, b"set")):
                self.assertEqual(answer(broker, pump, "kind", value), kind)

    def test_textRuledAlike(self) -> None:
        """Options that refuse text refuse it in the native dialect too, in a call's
        arguments and in an answer."""
        for dialects in DIALECTS:
            options = self.options("tuple", "dictionary", "list")
            options.allowedTypes.pop(b"unicode")
            _server, broker, pump = connect(KindOf(), dialects, security=options)
            self.assertEqual(
                self.refused(broker, pump, "kind", ["text"]),
                "type 'unicode' is not allowed by the security options",
            )
            self.assertEqual(answer(broker, pump, "kind", [b"bytes"]), b"list")
            failure = answer(broker, pump, "text")
            self.assertTrue(failure.check(InsecureJelly), failure)

    def test_noneAndBooleansRuledAlike(self) -> None:
        """Options that refuse None or booleans (their jelly tags) refuse them in the
        native dialect too."""
        for dialects in DIALECTS:
            for tag, value, shown in ((b"None", None, "None"), (b"boolean", True, "boolean")):
                options = self.options("tuple", "dictionary", "list")
                options.allowedTypes.pop(tag)
                _server, broker, pump = connect(KindOf(), dialects, security=options)
                self.assertEqual(
                    self.refused(broker, pump, "kind", [1, value]),
                    f"type {shown!r} is not allowed by the security options",
                )

    def test_refusedWhereverTheyAre(self) -> None:
        """A refused kind is found in a dictionary's keys and in a set as well as in
        lists; options refusing dictionaries refuse every call, whose keywords are one
        (as in the pb dialect)."""
        for dialects in DIALECTS:
            options = self.options("tuple", "dictionary")
            options.allowedTypes.pop(b"unicode")
            _server, broker, pump = connect(KindOf(), dialects, security=options)
            many = dict.fromkeys(range(20), 1)
            for value in (
                {("x",): 1},
                {b"a", "b"},
                (*range(30), ("x",)),  # (containers of many members are looked at at once)
                (*range(30), "x"),
                {**many, 20: (1, ("x",))},
                {**many, ("x",): 1},
            ):
                self.assertEqual(
                    self.refused(broker, pump, "kind", value),
                    "type 'unicode' is not allowed by the security options",
                )
            self.assertEqual(answer(broker, pump, "kind", (*range(30), (b"x",))), b"tuple")
            options = self.options("tuple", "list")
            _server, broker, pump = connect(KindOf(), dialects, security=options)
            self.assertEqual(
                self.refused(broker, pump, "kind", 1),
                "type 'dictionary' is not allowed by the security options",
            )


class Annotated(pb.Root):
    def remote_annotations(self, *ignored: Any) -> bytes:
        return repr(sorted(context.current().annotations)).encode()

    def remote_replying(self) -> bytes:
        context.current().reply["tags"] = ["a"]
        return b"answered"

    def remote_replyingWithAReference(self) -> Any:
        context.current().reply["tags"] = ["a"]
        return pb.Referenceable()

    def remote_cycle(self) -> Any:
        cycle: list[Any] = [(1,)]
        cycle.append(cycle)
        return cycle


class AnnotationKindsTests(SynchronousTestCase):
    def test_callAnnotationsRuledByTheOptions(self) -> None:
        """A call's annotations (native dialect only) are refused as its arguments
        would be when they hold a kind the options refuse, and so are the reply
        annotations of its answer: the call fails with InsecureJelly."""
        options = jelly.SecurityOptions()
        options.allowTypes("tuple", "dictionary")  # no lists
        _server, broker, pump = connect(Annotated(), None, security=options)
        root = broker.remoteForName("root")
        results: list[Any] = []
        with capturedLogs() as events:
            root.withOptions(context={"x": [1, 2]}).callRemote("annotations").addBoth(
                results.append
            )
            pump.flush()
        [failure] = results
        self.assertTrue(failure.check(InsecureJelly), failure)
        self.assertIn("Refused a call to {method}: {error}", [e["log_format"] for e in events])
        answer = root.withOptions(context={"x": {"y": 1}}).callRemote("annotations")
        pump.flush()
        self.assertEqual(self.successResultOf(answer), b"['x']")
        reply: dict[str, Any] = {}
        replied = root.withOptions(reply=reply).callRemote("replying")
        pump.flush()
        failure = self.failureResultOf(replied, InsecureJelly)
        self.assertEqual(
            failure.getErrorMessage(), "type 'list' is not allowed by the security options"
        )
        self.assertEqual(reply, {})
        self.assertEqual(broker._replyTargets, {})

    def test_refusedAnnotationsReleaseWhatTheCallHeld(self) -> None:
        """A call refused for its annotations lets go of the references in its
        arguments, and an answer refused for its reply annotations of the reference it
        answered with: neither side keeps an object exported for nothing."""
        options = jelly.SecurityOptions()
        options.allowTypes("tuple", "dictionary")  # no lists
        server, broker, pump = connect(Annotated(), None, security=options)
        root = broker.remoteForName("root")
        exported = dict(broker.localObjects)
        with capturedLogs():
            refused = root.withOptions(context={"x": [1]}).callRemote(
                "annotations", pb.Referenceable()
            )
            pump.flush()
        self.failureResultOf(refused, InsecureJelly)
        self.assertEqual(broker.localObjects, exported)
        served = dict(server.localObjects)
        refused = root.withOptions(reply={}).callRemote("replyingWithAReference")
        pump.flush()
        self.failureResultOf(refused, InsecureJelly)
        self.assertEqual(server.localObjects, served)

    def test_cyclesChecked(self) -> None:
        """A value with a cycle (sent through jelly) is checked once per container: it
        arrives, and a refused kind in it is found."""
        options = jelly.SecurityOptions()
        options.allowBasicTypes()
        options.allowedTypes.pop(b"frozenset")
        _server, broker, pump = connect(Annotated(), None, security=options)
        answer = broker.remoteForName("root").callRemote("cycle")
        pump.flush()
        cycle = self.successResultOf(answer)
        self.assertIs(cycle[1], cycle)


class Kinds(pb.Root):
    def remote_kinds(self, values: Any, keywords: Any = None) -> list[Any]:
        return [[type(value).__name__, value] for value in values] + [
            [type(keywords).__name__, keywords]
        ]

    def remote_annotated(self) -> list[Any]:
        at = context.current().annotations["at"]
        return [type(at).__name__, at]


def callAnnotated(broker: Any, annotations: dict[str, Any]) -> defer.Deferred[Any]:
    """
    Call the root's ``annotated`` with ``annotations``, sent by hand (bypassing the
    caller's own checks); the Deferred of its answer.
    """
    answer: defer.Deferred[Any] = defer.Deferred()
    broker.waitingForAnswers[999] = answer
    context = {"annotations": annotations}
    broker.sendCall(b"callctx", 999, b"root", b"annotated", 1, msgpack.packb([]), b"\x80", context)
    return answer


class MsgpackTimestampTests(SynchronousTestCase):
    def test_noTimestampReachesAMethod(self) -> None:
        """msgpack's timestamp extension, which msgpack decodes itself past the codec's
        hook, never gives a method a msgpack.Timestamp (a class no security option
        allows, that no stock peer sends): in the native dialect it arrives as an int of
        nanoseconds, in a value or in a call's annotations; the pb dialect sends an
        Unpersistable in its place."""
        stamp = msgpack.Timestamp(1, 5)
        for dialects, shown in ((None, ["int", 1_000_000_005]), ([b"pb"], ["Unpersistable"])):
            _server, broker, pump = connect(Kinds(), dialects)
            with capturedLogs():
                result = answer(broker, pump, "kinds", (stamp, [stamp]), {"at": stamp})
            self.assertEqual(result[0][0], shown[0], dialects)
            if dialects is None:
                self.assertEqual(
                    result,
                    [
                        ["int", 1_000_000_005],
                        ["list", [1_000_000_005]],
                        ["dict", {"at": 1_000_000_005}],
                    ],
                )
                # (A pbroker caller refuses to send one in annotations: sent by hand.)
                annotated = callAnnotated(broker, {"at": stamp})
                pump.flush()
                self.assertEqual(self.successResultOf(annotated), ["int", 1_000_000_005])

    def test_timestampInWhatJellyCarries(self) -> None:
        """Where a native value goes through jelly (a copy's state, a value whose plain
        containers form a cycle, tuples nested more than 8 deep), a msgpack.Timestamp
        arrives as an int of nanoseconds too, as everywhere else, not as an Unpersistable."""
        stamp, nanoseconds = msgpack.Timestamp(3, 500), 3_000_000_500
        cycle: list[Any] = [stamp]
        cycle.append(cycle)
        deep: Any = stamp
        for _ in range(10):
            deep = (deep,)
        _server, broker, pump = connect(Kinds(), None)
        result = answer(broker, pump, "kinds", [cycle, deep])
        self.assertIs(result[0][1][1], result[0][1])  # the cycle kept its shape
        self.assertEqual(result[0][1][0], nanoseconds)
        inner = result[1][1]
        for _ in range(10):
            inner = inner[0]
        self.assertEqual(inner, nanoseconds)
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(_Stamped, _RemoteStamped)
        _server, broker, pump = connect(_StampedRoot(), None, registry=registry)
        self.assertEqual(answer(broker, pump, "stamped").at, nanoseconds)

    def test_integersAsLargeAsJellySends(self) -> None:
        """Integers below 2**448 travel in either dialect; a larger one fails the call with
        BananaEncodeError, as in the pb dialect (docs/native.rst)."""
        for dialects in DIALECTS:
            _server, broker, pump = connect(Kinds(), dialects)
            self.assertEqual(answer(broker, pump, "kinds", [2**448 - 1])[0], ["int", 2**448 - 1])
            refused = broker.remoteForName("root").callRemote("kinds", [2**448])
            self.failureResultOf(refused, BananaEncodeError)

    def test_extensionInAnEnvelopeIsMalformed(self) -> None:
        """An extension where a whole record's envelope has none (in a call's annotations,
        or in an answer's reply annotations) is a malformed message: the connection is
        dropped, as for any other, and no msgpack.ExtType reaches a method or a reply."""
        for sender in ("client", "server"):
            server, broker, pump = connect(Kinds(), None)
            reply: dict[str, Any] = {}
            if sender == "server":
                waiting = broker.waitingForAnswers[999] = defer.Deferred()
                broker._replyTargets[999] = reply
                server.sendCall(
                    b"answerctx", 999, msgpack.packb(1), {"at": msgpack.ExtType(7, b"q")}
                )
            else:
                waiting = callAnnotated(broker, {"at": msgpack.ExtType(42, b"xyz")})
            with capturedLogs() as events:
                pump.flush()
            self.failureResultOf(waiting, pb.PBConnectionLost)
            self.assertEqual(reply, {})
            self.assertTrue(
                any("unknown extension type" in formatEvent(e) for e in events),
                [formatEvent(e) for e in events],
            )

    def test_callerSendsNoExtensionInAnnotations(self) -> None:
        """A pbroker caller refuses an ExtType in a call's annotations before it is sent,
        as it refuses any value that is not plain."""
        _server, broker, _pump = connect(Kinds(), None)
        root = broker.remoteForName("root")
        with self.assertRaises(TypeError) as raised:
            root.withOptions(context={"at": msgpack.ExtType(42, b"xyz")}).callRemote("annotated")
        self.assertIn("context['at'] is of type ExtType", str(raised.exception))


class _Stamped(pb.Copyable):
    def getStateToCopy(self) -> Any:
        return {"at": msgpack.Timestamp(3, 500)}


class _RemoteStamped(pb.RemoteCopy):
    pass


class _StampedRoot(pb.Root):
    def remote_stamped(self) -> Any:
        return _Stamped()
