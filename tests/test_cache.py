"""
Tests for Cacheable / RemoteCache: one copy per connection, updates through observers,
decache and uncache, against pbroker and stock Twisted peers in both roles.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.logger import capturedLogs
from twisted.spread import jelly as twistedJelly
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import SynchronousTestCase

from pbroker import jelly, pb
from pbroker._unjellier import Unjellier
from pbroker.errors import LimitExceeded
from pbroker.jelly import qual
from tests.test_broker import connect

TAG = b"tests.cache.Gauge"


def cacheableFor(module: Any) -> Any:
    class Gauge(module.Cacheable):
        def __init__(self) -> None:
            self.value = 0
            self.observers: list[Any] = []
            self.stopped: list[Any] = []

        def getTypeToCopy(self) -> bytes:
            return TAG

        def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
            self.observers.append(observer)
            return {"value": self.value}

        def stoppedObserving(self, perspective: Any, observer: Any) -> None:
            self.observers.remove(observer)
            self.stopped.append(observer)

        def set(self, value: int) -> None:
            self.value = value
            for observer in self.observers:
                observer.callRemote("setValue", value)

    return Gauge()


def remoteCacheFor(module: Any) -> Any:
    class RemoteGauge(module.RemoteCache):
        def __init__(self) -> None:
            # Run (without arguments) on each copy received, before its state is set.
            self.history: list[int] = []

        def setCopyableState(self, state: dict[str, Any]) -> None:
            self.__dict__.update(state)

        def observe_setValue(self, value: int) -> None:
            self.history.append(self.value)
            self.value = value

        def observe_goodbye(self, word: str) -> str:
            farewells.append(word)
            return word

    farewells: list[str] = []
    RemoteGauge.farewells = farewells  # type: ignore[attr-defined]
    return RemoteGauge


def rootWith(module: Any, gauge: Any) -> Any:
    class GaugeRoot(module.Root):
        def remote_gauge(self) -> Any:
            return gauge

        def remote_isGauge(self, value: Any) -> bool:
            return value is gauge

    return GaugeRoot()


class CallsRoot:
    """
    ``call``: the result of a call to the root, after the pump moved everything.
    """

    root: Any
    pump: Any

    def call(self, *args: Any) -> Any:
        results: list[Any] = []
        self.root.callRemote(*args).addBoth(results.append)
        self.pump.flush()
        return results[0]


class CacheTestsMixin(CallsRoot):
    serverModule: Any
    clientModule: Any
    clientOptions: dict[str, Any] = {}

    def setUp(self) -> None:
        self.gauge = cacheableFor(self.serverModule)
        remoteClass = remoteCacheFor(self.clientModule)
        registry = None
        if self.clientModule is pb:
            registry = jelly.UnjellyableRegistry()
            registry.setUnjellyableForClass(TAG, remoteClass)
            factory = pb.PBClientFactory(registry=registry, **self.clientOptions)
        else:
            saved = dict(twistedJelly.unjellyableRegistry)
            self.addCleanup(  # type: ignore[attr-defined]
                lambda: (
                    twistedJelly.unjellyableRegistry.clear(),
                    twistedJelly.unjellyableRegistry.update(saved),
                )
            )
            twistedJelly.setUnjellyableForClass(TAG, remoteClass)
            factory = twistedPb.PBClientFactory()
        self.farewells = remoteClass.farewells
        self.server, self.client, self.pump = connect(
            self.serverModule.PBServerFactory(rootWith(self.serverModule, self.gauge)), factory
        )
        self.root = self.client.remoteForName("root")

    def test_copyAndUpdates(self) -> None:
        """The copy gets the state, then every update the owner sends through its observer."""
        self.gauge.value = 3
        copy = self.call("gauge")
        self.assertEqual(copy.value, 3)  # type: ignore[attr-defined]
        self.gauge.set(7)
        self.pump.flush()
        self.assertEqual(copy.value, 7)  # type: ignore[attr-defined]
        self.assertEqual(copy.history, [3])  # type: ignore[attr-defined]

    def test_oneCopyPerConnection(self) -> None:
        """Sending it again gives another handle on the same state, and one observer."""
        first = self.call("gauge")
        second = self.call("gauge")
        self.assertEqual(len(self.gauge.observers), 1)  # type: ignore[attr-defined]
        self.gauge.set(9)
        self.pump.flush()
        self.assertEqual((first.value, second.value), (9, 9))  # type: ignore[attr-defined]

    def test_sentBackIsOriginal(self) -> None:
        """A copy sent back to the owner arrives as the Cacheable itself."""
        copy = self.call("gauge")
        self.assertIs(self.call("isGauge", copy), True)  # type: ignore[attr-defined]

    def test_lastHandleGoneStopsObserving(self) -> None:
        """When every handle is gone the owner stops observing and the copy is dropped."""
        first = self.call("gauge")
        second = self.call("gauge")
        del first
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.gauge.stopped, [])  # type: ignore[attr-defined]
        del second
        gc.collect()
        self.pump.flush()
        self.assertEqual(len(self.gauge.stopped), 1)  # type: ignore[attr-defined]
        self.assertEqual(self.gauge.observers, [])  # type: ignore[attr-defined]
        self.assertEqual(self.client.locallyCachedObjects, {})  # type: ignore[attr-defined]
        self.assertEqual(self.server.remotelyCachedObjects, {})  # type: ignore[attr-defined]

    def test_lastCallFromStoppedObserving(self) -> None:
        """While stoppedObserving runs, its observer still reaches the copy the peer dropped
        (it holds it until told the owner let go), so the owner can send a last call, as in
        Twisted; once it returns, calls through that observer fail. (Stock Twisted's
        remote methods of an observer cannot send their text name.)"""
        answers: list[Any] = []
        kept: list[Any] = []
        ours = self.serverModule is pb  # type: ignore[attr-defined]

        def stoppedObserving(perspective: Any, observer: Any) -> None:
            observer.callRemote("goodbye", "bye").addBoth(answers.append)
            if ours:
                observer.remoteMethod("goodbye")("again").addBoth(answers.append)
            else:
                observer.callRemote("goodbye", "again").addBoth(answers.append)
            kept.append(observer)

        self.gauge.stoppedObserving = stoppedObserving  # type: ignore[attr-defined]
        copy = self.call("gauge")
        del copy
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.farewells, ["bye", "again"])  # type: ignore[attr-defined]
        self.assertEqual(answers, ["bye", "again"])  # type: ignore[attr-defined]
        self.assertEqual(self.client.locallyCachedObjects, {})  # type: ignore[attr-defined]
        self.assertEqual(self.server.remotelyCachedObjects, {})  # type: ignore[attr-defined]
        if not ours:
            return
        [observer] = kept
        late: list[Any] = []
        observer.callRemote("goodbye", "late").addErrback(late.append)
        self.pump.flush()
        self.assertEqual(self.farewells, ["bye", "again"])  # type: ignore[attr-defined]
        [failure] = late
        self.assertEqual(failure.getErrorMessage(), "the copy this observer reached is gone")

    def test_lastCallThroughAStoredObserver(self) -> None:
        """While stoppedObserving runs, the observer the owner kept from
        getStateToCacheAndObserveFor (equal to the one it is given, not the same object)
        reaches the dropped copy too, as in Twisted."""
        answers: list[Any] = []
        gauge = self.gauge

        def stoppedObserving(perspective: Any, observer: Any) -> None:
            for stored in gauge.observers:
                self.assertIsNot(stored, observer)
                stored.callRemote("goodbye", "stored").addBoth(answers.append)
            gauge.observers.remove(observer)

        gauge.stoppedObserving = stoppedObserving  # type: ignore[attr-defined]
        copy = self.call("gauge")
        del copy
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.farewells, ["stored"])  # type: ignore[attr-defined]
        self.assertEqual(answers, ["stored"])
        self.assertEqual(self.client.locallyCachedObjects, {})  # type: ignore[attr-defined]

    def test_disconnectStopsObserving(self) -> None:
        """Losing the connection stops every observation."""
        copy = self.call("gauge")
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(len(self.gauge.stopped), 1)  # type: ignore[attr-defined]
        del copy


class PbrokerCacheTests(CacheTestsMixin, SynchronousTestCase):
    serverModule = pb
    clientModule = pb


class PbrokerPbDialectCacheTests(CacheTestsMixin, SynchronousTestCase):
    serverModule = pb
    clientModule = pb
    clientOptions = {"dialects": [b"pb"]}


class PbrokerServerTwistedClientCacheTests(CacheTestsMixin, SynchronousTestCase):
    serverModule = pb
    clientModule = twistedPb


class TwistedServerPbrokerClientCacheTests(CacheTestsMixin, SynchronousTestCase):
    serverModule = twistedPb
    clientModule = pb


class CopyLimitTests(SynchronousTestCase):
    def test_copiesBounded(self) -> None:
        """Copies of the peer's Cacheables count against importedReferences: a value with
        more is refused with LimitExceeded, its copies released (their owner stops being
        observed), and the connection stays; in both dialects."""
        gauges = [cacheableFor(pb) for _ in range(5)]

        class Root(pb.Root):
            def remote_gauges(self, count: int) -> Any:
                return gauges[:count]

        for dialects in (None, [b"pb"]):
            registry = jelly.UnjellyableRegistry()
            registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
            server, client, pump = connect(
                pb.PBServerFactory(Root()),
                pb.PBClientFactory(
                    registry=registry,
                    dialects=dialects,
                    limits=pb.BrokerLimits(importedReferences=3),
                ),
            )
            results: list[Any] = []
            with capturedLogs():
                client.remoteForName("root").callRemote("gauges", 5).addBoth(results.append)
                pump.flush()
                client.remoteForName("root").callRemote("gauges", 3).addBoth(results.append)
                pump.flush()
            self.assertTrue(results[0].check(LimitExceeded), results[0])
            self.assertIn("more than 3 cache copies", results[0].getErrorMessage())
            self.assertEqual(len(results[1]), 3)
            self.assertEqual(len(client.locallyCachedObjects), 3)
            del results[:]
            gc.collect()
            pump.flush()
            self.assertEqual(server.remotelyCachedObjects, {}, dialects)
            self.assertEqual(client.locallyCachedObjects, {}, dialects)

    def test_refusedCopyReleasedOnce(self) -> None:
        """A copy refused over the limit is released once: by the refusal, not again when
        it is collected (which made an honest owner drop the connection over a decache of
        an id it no longer knew); the copy held is still observed."""
        gauges = [cacheableFor(pb) for _ in range(2)]

        class Root(pb.Root):
            def remote_gauge(self, index: int) -> Any:
                return gauges[index]

        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
        server, client, pump = connect(
            pb.PBServerFactory(Root()),
            pb.PBClientFactory(registry=registry, limits=pb.BrokerLimits(importedReferences=1)),
        )
        root = client.remoteForName("root")
        results: list[Any] = []
        with capturedLogs():
            root.callRemote("gauge", 0).addBoth(results.append)
            root.callRemote("gauge", 1).addBoth(results.append)
            pump.flush()
            held, refused = results
            self.assertTrue(refused.check(LimitExceeded), refused)
            del results, refused
            gc.collect()
            pump.flush()
        self.assertFalse(server.transport.disconnecting)
        self.assertEqual(len(server.remotelyCachedObjects), 1)
        self.assertIs(next(iter(client.locallyCachedObjects.values())).__dict__, held.__dict__)


class UnregisteredCacheTests(SynchronousTestCase):
    def test_refusedClearly(self) -> None:
        """A cacheable the client has no RemoteCache for is refused as the security options
        refuse any class, in both dialects, not as a malformed expression."""

        class Root(pb.Root):
            def remote_cache(self) -> Any:
                cacheable = pb.Cacheable()
                return [cacheable, cacheable]

        for dialects in (None, [b"pb"]):
            _server, client, pump = connect(
                pb.PBServerFactory(Root()), pb.PBClientFactory(dialects=dialects)
            )
            results: list[Any] = []
            client.remoteForName("root").callRemote("cache").addBoth(results.append)
            pump.flush()
            results[0].trap(jelly.InsecureJelly)
            self.assertIn("module 'pbroker.flavors' is not allowed", str(results[0].value))

    def test_stateFailingOnceDoesNotStick(self) -> None:
        """A cacheable whose state cannot be made once (the call fails) is not taken for
        sent: the next send gives the peer its copy, in both dialects."""

        class Flaky(pb.Cacheable):
            failures = 1

            def getTypeToCopy(self) -> bytes:
                return TAG

            def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
                if self.failures:
                    self.failures -= 1
                    raise ValueError("not yet")
                return {"value": 5}

        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
        for dialects in (None, [b"pb"]):
            flaky = Flaky()
            server, client, pump = connect(
                pb.PBServerFactory(rootWith(pb, flaky)),
                pb.PBClientFactory(registry=registry, dialects=dialects),
            )
            results: list[Any] = []
            with capturedLogs():
                for _ in range(2):
                    client.remoteForName("root").callRemote("gauge").addBoth(results.append)
                    pump.flush()
            results[0].trap(ValueError)
            self.assertEqual(results[1].value, 5)
            self.assertEqual(len(server.remotelyCachedObjects), 1)
        self.flushLoggedErrors(ValueError)


class CacheEdgeTests(SynchronousTestCase):
    def connectGauges(self, gauges: list[Any], **limits: Any) -> tuple[Any, Any, Any]:
        """
        A pbroker pair whose server's root gives ``gauges[:count]`` (``remote_gauges``).
        """

        class Root(pb.Root):
            def remote_gauges(self, count: int) -> Any:
                return gauges[:count]

        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
        return connect(
            pb.PBServerFactory(Root(), limits=pb.BrokerLimits(**limits)),
            pb.PBClientFactory(registry=registry),
        )

    def test_cachedObjectsLimit(self) -> None:
        """A value with more Cacheables than the peer may hold copies of fails the call with
        pb.Error, and none of its Cacheables stays counted as copied or observed."""
        gauges = [cacheableFor(pb) for _ in range(3)]
        server, client, pump = self.connectGauges(gauges, cachedObjects=2)
        results: list[Any] = []
        client.remoteForName("root").callRemote("gauges", 3).addBoth(results.append)
        pump.flush()
        results[0].trap(pb.Error)
        self.assertEqual(results[0].getErrorMessage(), "Maximum PB cache count exceeded.")
        self.assertEqual((server.remotelyCachedObjects, server.remotelyCachedLUIDs), ({}, {}))
        self.assertFalse(server.disconnected)
        client.remoteForName("root").callRemote("gauges", 2).addBoth(results.append)
        pump.flush()
        self.assertEqual([copy.value for copy in results[1]], [0, 0])
        luids = sorted(server.remotelyCachedObjects)
        self.assertEqual([server.remotelyCachedForLUID(luid) for luid in luids], gauges[:2])

    def test_handleCountedByTheApplication(self) -> None:
        """cachedRemotelyAs with incref, called by the application (outside any value being
        sent, as Twisted's Broker allows), counts one more handle: the peer's decache of its
        only handle leaves the Cacheable copied and observed. A Cacheable the peer holds no
        copy of is not counted."""
        gauges = [cacheableFor(pb)]
        server, client, pump = self.connectGauges(gauges)
        results: list[Any] = []
        client.remoteForName("root").callRemote("gauges", 1).addBoth(results.append)
        pump.flush()
        luid = server.cachedRemotelyAs(gauges[0])
        self.assertEqual(server.remotelyCachedObjects[luid].refcount, 1)
        self.assertEqual(server.cachedRemotelyAs(gauges[0], incref=True), luid)
        self.assertEqual(server.remotelyCachedObjects[luid].refcount, 2)
        del results[:]
        gc.collect()
        pump.flush()  # the client's decache of its only handle
        self.assertEqual(server.remotelyCachedObjects[luid].refcount, 1)
        self.assertEqual(gauges[0].stopped, [])
        self.assertEqual(list(client.locallyCachedObjects), [luid])  # no uncache came
        self.assertIsNone(server.cachedRemotelyAs(cacheableFor(pb), incref=True))

    def test_stoppedObservingFails(self) -> None:
        """A Cacheable whose stoppedObserving raises is logged, and forgotten all the same:
        when the peer lets go of its copy (the connection stays), and when the connection
        is lost."""

        def failing(perspective: Any, observer: Any) -> None:
            raise RuntimeError("cannot stop")

        gauges = [cacheableFor(pb) for _ in range(2)]
        for gauge in gauges:
            gauge.stoppedObserving = failing
        server, client, pump = self.connectGauges(gauges)
        results: list[Any] = []
        client.remoteForName("root").callRemote("gauges", 1).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(server.remotelyCachedObjects), 1)
        with capturedLogs() as events:
            del results[:]
            gc.collect()
            pump.flush()
        self.assertEqual(server.remotelyCachedObjects, {})
        self.assertFalse(server.disconnected)
        self.assertEqual(
            [e["log_format"] for e in events if "log_failure" in e], ["Error in stoppedObserving"]
        )
        client.remoteForName("root").callRemote("gauges", 2).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(server.remotelyCachedObjects), 2)
        with capturedLogs() as events:
            server.connectionLost(None)
        self.assertEqual(server.remotelyCachedObjects, {})
        self.assertEqual(
            [e["log_format"] for e in events if "log_failure" in e],
            ["Error in stoppedObserving"] * 2,
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)


class ObserverTests(CallsRoot, SynchronousTestCase):
    """
    A pbroker owner's observers and a pbroker client's copies, at their edges.
    """

    def setUp(self) -> None:
        self.gauge = cacheableFor(pb)
        self.registry = jelly.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
        self.rootObject = rootWith(pb, self.gauge)
        self.server, self.client, self.pump = connect(
            pb.PBServerFactory(self.rootObject), pb.PBClientFactory(registry=self.registry)
        )
        self.root = self.client.remoteForName("root")

    def test_observerMethods(self) -> None:
        """An observer takes a method name as text or bytes, and gives a remote method
        callable like a function; a name of another type is refused at once."""
        copy = self.call("gauge")
        [observer] = self.gauge.observers
        observer.callRemote(b"setValue", 4)
        self.pump.flush()
        setValue = observer.remoteMethod("setValue")
        setValue(5)
        self.pump.flush()
        self.assertEqual((copy.value, copy.history), (5, [0, 4]))
        with self.assertRaises(TypeError) as caught:
            observer.callRemote(5)
        self.assertEqual(str(caught.exception), "a remote method's name must be text, not 5")

    def test_observerIdentity(self) -> None:
        """Observers of one copy for one perspective are equal and hash alike; an observer
        equals nothing else; its repr names the cacheable."""
        self.call("gauge")
        [observer] = self.gauge.observers
        same = pb.RemoteCacheObserver(self.server, self.gauge, None)
        self.assertEqual(observer, same)
        self.assertEqual(hash(observer), hash(same))
        self.assertNotEqual(observer, pb.RemoteCacheObserver(self.client, self.gauge, None))
        self.assertNotEqual(observer, self.gauge)
        self.assertEqual(repr(observer), f"<RemoteCacheObserver {self.gauge!r} for None>")

    def test_observerOfACopyGone(self) -> None:
        """An observer kept after the peer dropped its copy fails its calls with
        ProtocolError through the Deferred (a one-way call raises it), sending nothing."""
        copy = self.call("gauge")
        [observer] = self.gauge.observers
        del copy
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.gauge.stopped, [observer])
        written = self.server.transport._transport.stream
        del written[:]
        failure = self.failureResultOf(observer.callRemote("setValue", 1), pb.ProtocolError)
        self.assertEqual(failure.getErrorMessage(), "the copy this observer reached is gone")
        # A one-way call has no Deferred: it raises, as one that cannot be sent does.
        with self.assertRaises(pb.ProtocolError):
            observer.callRemote("setValue", 1, pbanswer=False)
        with self.assertRaises(pb.ProtocolError):
            observer.remoteMethod("setValue")(1, pbanswer=False)
        self.assertEqual(written, [])

    def test_copyOnlyBackOverItsConnection(self) -> None:
        """A copy given to a call on another connection fails that call with JellyError, in
        both dialects; jellied without a broker it is its class name and attributes."""
        copy = self.call("gauge")
        for dialects in ([b"pb"], [b"pbroker2"]):
            _server, other, otherPump = connect(
                pb.PBServerFactory(rootWith(pb, cacheableFor(pb))),
                pb.PBClientFactory(dialects=dialects),
            )
            results: list[Any] = []
            other.remoteForName("root").callRemote("isGauge", copy).addBoth(results.append)
            otherPump.flush()
            [failure] = results
            self.assertIs(failure.type, jelly.JellyError)
            self.assertEqual(
                failure.getErrorMessage(),
                "a RemoteCache can only be sent back over the connection it came from",
            )
        self.assertIs(self.call("isGauge", copy), True)
        # As in Twisted, its attributes, the connection among them (jelly is not for copies).
        # The broker stands in as a persistent id: its internals are not this test's subject,
        # and before Python 3.11 one of them (the decoder's bytearray buffer, which has neither
        # __getstate__ nor __dict__ there) makes jelly raise AttributeError, in Twisted's too.
        sexp = jelly.jelly(
            copy,
            persistentStore=lambda obj, jellier: b"broker" if obj is copy.broker else None,
        )
        self.assertEqual(sexp[0], qual(type(copy)).encode())
        self.assertIn([[b"unicode", b"broker"], [b"persistent", b"broker"]], sexp[1][1:])
        unjellied = jelly.unjelly(
            [TAG, [b"dictionary", [[b"unicode", b"value"], 3]]], registry=self.registry
        )
        self.assertEqual((type(unjellied), unjellied.value), (type(copy), 3))

    def test_malformedCacheable(self) -> None:
        """A cacheable from the peer without [tag, id, state] fails the call with
        InvalidJelly quoting it, in both dialects; the connection keeps serving."""

        class NotACacheable(pb.Copyable):
            def getTypeToCopy(self) -> bytes:
                return TAG

            def getStateToCopy(self) -> Any:
                return 5

        self.rootObject.remote_malformed = NotACacheable
        for dialects in ([b"pb"], [b"pbroker2"]):
            _server, client, pump = connect(
                pb.PBServerFactory(self.rootObject),
                pb.PBClientFactory(registry=self.registry, dialects=dialects),
            )
            results: list[Any] = []
            root = client.remoteForName("root")
            root.callRemote("malformed").addBoth(results.append)
            root.callRemote("gauge").addBoth(results.append)
            pump.flush()
            failure, copy = results
            self.assertIs(failure.type, jelly.InvalidJelly)
            self.assertEqual(
                failure.getErrorMessage(),
                "a cacheable needs [tag, id, state], an integer id from 1 below 2**61 - 1: "
                f"{[TAG, 5]!r}",
            )
            self.assertEqual(copy.value, 0)
            self.assertEqual(len(client.locallyCachedObjects), 1)
            # An id a table of them could not hold without colliding (see ID_LIMIT).
            for ident in (0, 2**61 - 1, 5 * (2**61 - 1)):
                unjellier = Unjellier(client.security, None, client, self.registry)
                with self.assertRaises(jelly.InvalidJelly):
                    unjellier.unjellyFull([TAG, ident, [b"dictionary"]])
            self.assertEqual(len(client.locallyCachedObjects), 1)


class Unregistered(pb.Copyable):
    """A copy no client registers: refused (InsecureJelly) where it is met."""


class StockUnregistered(twistedPb.Copyable):
    """The same, from a stock Twisted server."""


class RefusedValueCachesTests(SynchronousTestCase):
    """
    A value the receiver refuses part way through hands back the first copies of Cacheables
    in its unread part: as many as the receiver would have kept (importedReferences), so
    that the owner stops observing each, whatever its own cachedObjects.
    """

    def registry(self) -> Any:
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
        return registry

    def refused(self, server: Any, client: Any, pump: Any) -> None:
        """Have the client ask for the gauges, refuse them, and let go of all it got."""
        results: list[Any] = []
        with capturedLogs():
            client.remoteForName("root").callRemote("gauges").addBoth(results.append)
            pump.flush()
        results[0].trap(jelly.InsecureJelly)
        del results[:]
        gc.collect()
        pump.flush()

    def test_moreCopiesThanTheReceiversCachedObjects(self) -> None:
        gauges = [cacheableFor(pb) for _ in range(2000)]

        class Root(pb.Root):
            def remote_gauges(self) -> Any:
                return [Unregistered(), *gauges]

        for dialects in ([b"pbroker2"], [b"pb"]):
            for gauge in gauges:
                del gauge.stopped[:]
            server, client, pump = connect(
                pb.PBServerFactory(Root(), limits=pb.BrokerLimits(cachedObjects=5000)),
                pb.PBClientFactory(registry=self.registry(), dialects=dialects),
            )
            self.refused(server, client, pump)
            self.assertEqual(client.locallyCachedObjects, {})
            self.assertEqual(server.remotelyCachedObjects, {}, dialects)
            self.assertEqual([gauge for gauge in gauges if not gauge.stopped], [])

    def test_stockOwner(self) -> None:
        """A stock Twisted owner may send 1025 first copies in one value (it refuses more):
        all are handed back."""
        gauges = [cacheableFor(twistedPb) for _ in range(1025)]

        class Root(twistedPb.Root):
            def remote_gauges(self) -> Any:
                return [StockUnregistered(), *gauges]

        server, client, pump = connect(
            twistedPb.PBServerFactory(Root()), pb.PBClientFactory(registry=self.registry())
        )
        self.refused(server, client, pump)
        self.assertEqual(len(server.remotelyCachedObjects), 0)


class ObserverOnALostConnectionTests(SynchronousTestCase):
    def test_deadReference(self) -> None:
        """A call through a cache observer once the connection is lost (in the
        stoppedObserving the loss runs, and after) raises DeadReferenceError, as a call
        through any reference on it does, and as stock PB does."""
        gauge = cacheableFor(pb)
        raised: list[Exception] = []
        observers: list[Any] = []

        def stoppedObserving(perspective: Any, observer: Any) -> None:
            observers.append(observer)
            try:
                observer.callRemote("setValue", 1)
            except Exception as e:
                raised.append(e)

        gauge.stoppedObserving = stoppedObserving
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(TAG, remoteCacheFor(pb))
        _server, client, pump = connect(
            pb.PBServerFactory(rootWith(pb, gauge)), pb.PBClientFactory(registry=registry)
        )
        results: list[Any] = []
        client.remoteForName("root").callRemote("gauge").addBoth(results.append)
        pump.flush()
        client.transport.loseConnection()
        pump.flush()
        [error] = raised
        self.assertIsInstance(error, pb.DeadReferenceError)
        with self.assertRaises(pb.DeadReferenceError):
            observers[0].callRemote("setValue", 2)
