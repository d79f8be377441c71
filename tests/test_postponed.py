"""
Answers and errors that a hook completes while another value is serialised wait for that
value, and are sent once it is sent or dropped, on every path: a value that fails half-way,
a one-way call, a stream's item or error, a call's arguments, a lost connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import _native, pb
from pbroker.testing import connectedServerAndClient
from tests.test_broker import RemoteTrigger, Trigger, Unserialisable


class TriggeringError(pb.Error, pb.Copyable):
    """
    An error copied to the peer whose state, when taken, completes another call.
    """

    def __init__(self, waiter: Deferred[Any] | None = None) -> None:
        super().__init__("triggering")
        self.waiter = waiter

    def getStateToCopy(self) -> Any:
        assert self.waiter is not None
        self.waiter.callback(1)
        return {"message": "triggering"}


class RemoteTriggeringError(pb.RemoteCopy, pb.Error):
    pass


class Taker(pb.Referenceable):
    def __init__(self) -> None:
        self.taken: list[Any] = []

    def remote_take(self, *values: Any) -> None:
        self.taken.append(values)


class Root(pb.Root):
    def __init__(self) -> None:
        self.later: Deferred[Any] = Deferred()
        self.other: Deferred[Any] = Deferred()
        self.target: Any = None

    def remote_waitLater(self) -> Any:
        return self.later

    def remote_waitOther(self) -> Any:
        return self.other

    def remote_keep(self, target: Any) -> None:
        self.target = target

    def remote_triggerThenFail(self) -> Any:
        # The hook completes waitLater's answer, then the value fails to serialise.
        return [Trigger(self.later, 1), Unserialisable()]

    def remote_streamWithHookError(self) -> Iterator[int]:
        later = self.later

        def generate() -> Iterator[int]:
            yield 0
            raise TriggeringError(later)

        return generate()

    def remote_streamWithBadItem(self) -> Iterator[Any]:
        later = self.later

        def generate() -> Iterator[Any]:
            yield [Trigger(later, 1), Unserialisable()]

        return generate()


class PostponedAnswerTests(SynchronousTestCase):
    """
    Each test has the server's ``waitLater`` call pending, completes it from a hook, and
    checks that its answer is sent at once (nothing left postponed) and arrives.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.rootObject = Root()
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Trigger, RemoteTrigger)
        registry.setUnjellyableForClass(TriggeringError, RemoteTriggeringError)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock),
            pb.PBClientFactory(registry=registry, clock=self.clock),
            clock=self.clock,
        )
        self.root = self.client.remoteForName("root")
        self.waiting: list[Any] = []
        self.root.callRemote("waitLater").addBoth(self.waiting.append)
        self.pump.flush()

    def settle(self) -> None:
        for _ in range(50):
            self.pump.flush()
            self.clock.advance(0)

    def test_callWhoseArgumentsFail(self) -> None:
        """A call whose arguments fail to serialise after a hook in them completed an
        answer: the answer is sent as the call fails."""
        taker = Taker()
        self.root.callRemote("keep", taker)
        self.settle()
        target = self.rootObject.target
        d = target.callRemote("take", Trigger(self.rootObject.later, 1), Unserialisable())
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.server._postponed, [])
        self.settle()
        self.assertEqual(self.waiting, [1])

    def test_oneWayCallWhoseResultFails(self) -> None:
        """A one-way call whose result fails to serialise after a hook in it completed an
        answer: the answer is sent when the result is dropped."""
        self.server._sendPostponedLater = lambda: None  # type: ignore[method-assign]
        self.root.callRemote("triggerThenFail", pbanswer=False)
        self.settle()
        self.flushLoggedErrors(ValueError)
        self.assertEqual(self.waiting, [1])

    def test_streamErrorWhoseHookCompletesAnAnswer(self) -> None:
        """A stream's error whose state completes another call: the answer is sent after
        the stream's error."""
        self.server._sendPostponedLater = lambda: None  # type: ignore[method-assign]
        results: list[Any] = []
        self.root.callRemote("streamWithHookError").addBoth(results.append)
        self.settle()
        (stream,) = results
        items: list[Any] = []
        for _ in range(2):
            stream.next().addBoth(items.append)
        self.settle()
        self.flushLoggedErrors()
        self.assertEqual(items[0], 0)
        self.assertIsInstance(items[1], Failure)
        self.assertEqual(self.waiting, [1])

    def test_streamItemFails(self) -> None:
        """A stream item that fails to serialise after a hook in it completed an answer:
        the answer is sent as the stream fails."""
        self.server._sendPostponedLater = lambda: None  # type: ignore[method-assign]
        results: list[Any] = []
        self.root.callRemote("streamWithBadItem").addBoth(results.append)
        self.settle()
        (stream,) = results
        items: list[Any] = []
        stream.next().addBoth(items.append)
        self.settle()
        self.flushLoggedErrors()
        self.assertIsInstance(items[0], Failure)
        self.assertEqual(self.waiting, [1])

    def test_missedPathStillSentNextTurn(self) -> None:
        """Should a path that drops a value not send what waited for it, the reactor's
        next turn does."""
        self.server._postpone(3).addCallback(self.waiting.append)
        self.assertEqual(self.waiting, [])
        self.clock.advance(0)
        self.assertEqual(self.waiting, [3])

    def test_nothingPostponedAfterDisconnect(self) -> None:
        """After the connection is lost, a late answer's hook does not hold another
        answer back for good: that answer's chain runs to its end."""
        self.root.callRemote("waitOther").addErrback(lambda _: None)
        self.settle()
        self.client.transport.loseConnection()
        self.settle()
        self.assertTrue(self.server.disconnected)
        chain: list[Any] = []
        self.rootObject.later.addBoth(chain.append)  # after the answer's own callbacks
        self.rootObject.other.callback(Trigger(self.rootObject.later, b"answer"))
        self.assertEqual(self.server._postponed, [])
        self.assertEqual(len(chain), 1)


class Gauge(pb.Cacheable):
    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        return {"level": 1}


class RemoteGauge(pb.RemoteCache):
    pass


class Caller(pb.Copyable):
    """
    A copy whose state, when taken, makes a call (one-way if ``oneWay``) naming ``value``.
    """

    def __init__(self, target: Any, value: Any, oneWay: bool = False) -> None:
        self.target = target
        self.value = value
        self.oneWay = oneWay
        self.calls: list[Any] = []

    def getStateToCopy(self) -> Any:
        if self.oneWay:
            self.calls.append(self.target.callRemote("take", self.value, pbanswer=False))
        else:
            self.calls.append(self.target.callRemote("take", self.value))
        return {}


class CallFromAHookTests(SynchronousTestCase):
    """
    A call a hook makes while a value is serialised is sent after that value: a Cacheable
    whose first copy the value carries is known to the peer when the call names it.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.gauge = Gauge()
        gauge = self.gauge

        class CallingRoot(pb.Root):
            target: Any = None
            caller: Any = None

            def remote_keep(self, target: Any) -> None:
                self.target = target

            def remote_gaugeAndCaller(self, oneWay: bool = False) -> Any:
                self.caller = Caller(self.target, gauge, oneWay)
                return [gauge, self.caller]

        self.rootObject = CallingRoot()
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Gauge, RemoteGauge)
        registry.setUnjellyableForClass(Caller, RemoteTrigger)
        self.server, self.client, self.pump = connectedServerAndClient(
            pb.PBServerFactory(self.rootObject, clock=self.clock),
            pb.PBClientFactory(registry=registry, clock=self.clock),
            clock=self.clock,
        )
        self.root = self.client.remoteForName("root")
        self.taker = Taker()
        self.root.callRemote("keep", self.taker)
        self.pump.flush()

    def test_callNamesACopyAfterIt(self) -> None:
        """The call arrives after the answer that carries the first copy, and is
        answered."""
        results: list[Any] = []
        self.root.callRemote("gaugeAndCaller").addBoth(results.append)
        self.pump.flush()
        self.assertFalse(self.client.disconnected)
        ((gauge, _),) = results
        ((taken,),) = self.taker.taken
        self.assertIsInstance(taken, RemoteGauge)
        self.assertIs(taken.__dict__, gauge.__dict__)
        (call,) = self.rootObject.caller.calls
        self.assertIsNone(self.successResultOf(call))

    def test_oneWayCall(self) -> None:
        """The same for a one-way call, which returns None at once."""
        self.root.callRemote("gaugeAndCaller", True)
        self.pump.flush()
        ((taken,),) = self.taker.taken
        self.assertIsInstance(taken, RemoteGauge)
        self.assertEqual(self.rootObject.caller.calls, [None])
        self.assertEqual(self.server.waitingForAnswers, {})

    def test_cancelledBeforeSent(self) -> None:
        """A call cancelled before the value it waits for is sent is never sent."""

        class Canceller(pb.Copyable):
            def getStateToCopy(inner) -> Any:
                call = self.rootObject.target.callRemote("take", 1)
                call.cancel()
                inner.call = call
                return {}

        canceller = Canceller()
        self.rootObject.remote_cancelling = lambda: canceller  # type: ignore[attr-defined]
        self.client.factory.registry.setUnjellyableForClass(Canceller, RemoteTrigger)
        results: list[Any] = []
        self.root.callRemote("cancelling").addBoth(results.append)
        self.pump.flush()
        self.assertIsInstance(results[0], RemoteTrigger)
        self.failureResultOf(canceller.call, CancelledError)
        self.assertEqual(self.taker.taken, [])

    def test_streamArgumentFromDeepInAValue(self) -> None:
        """A hook deep inside nested tuples (deeper than the codec packs as extensions)
        can still send a stream in a call: the call is packed on its own, not inside the
        value, where it would have to travel as jelly, which carries no streams."""
        sums: list[Any] = []

        async def total(stream: Any) -> None:
            sums.append(sum([item async for item in stream]))

        self.taker.remote_take = total  # type: ignore[method-assign]

        class Streamer(pb.Copyable):
            def getStateToCopy(inner) -> Any:
                inner.call = self.rootObject.target.callRemote("take", iter([1, 2, 3]))
                return {}

        streamer = Streamer()
        value: Any = streamer
        for _ in range(_native.EXTENSION_DEPTH + 2):
            value = (value,)
        self.rootObject.remote_deep = lambda: value  # type: ignore[attr-defined]
        self.client.factory.registry.setUnjellyableForClass(Streamer, RemoteTrigger)
        results: list[Any] = []
        self.root.callRemote("deep").addBoth(results.append)
        for _ in range(20):
            self.pump.flush()
        self.assertNotIsInstance(results[0], Failure)
        self.assertEqual(sums, [6])
        self.assertIsNone(self.successResultOf(streamer.call))

    def test_streamArgumentFromDeepInArguments(self) -> None:
        """The same for a hook deep inside a call's arguments."""
        sums: list[Any] = []

        async def total(stream: Any) -> None:
            sums.append(sum([item async for item in stream]))

        self.rootObject.remote_total = total  # type: ignore[attr-defined]
        self.rootObject.remote_ignore = lambda value: None  # type: ignore[attr-defined]
        root = self.root

        class Streamer(pb.Copyable):
            def getStateToCopy(inner) -> Any:
                inner.call = root.callRemote("total", iter([1, 2, 3]))
                return {}

        streamer = Streamer()
        value: Any = streamer
        for _ in range(_native.EXTENSION_DEPTH + 2):
            value = (value,)
        self.server.registry.setUnjellyableForClass(Streamer, RemoteTrigger)
        results: list[Any] = []
        self.root.callRemote("ignore", value).addBoth(results.append)
        for _ in range(20):
            self.pump.flush()
        self.assertEqual(results, [None])
        self.assertEqual(sums, [6])
        self.assertIsNone(self.successResultOf(streamer.call))
