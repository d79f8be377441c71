"""
Releases (``decref``, ``decache``) and answers kept behind large native messages: what is
kept stays bounded whatever the peer sends, nothing kept overtakes a message that names its
object, and everything kept is sent once the large messages are out.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.testing import connectedServerAndClient
from tests.test_broker import Gauge, RemoteGauge
from tests.test_hostile import HandDriven

MiB = 1024 * 1024
BIG = MiB * 3 // 2  # over half the 1 MiB window: a second one waits for the first's "taken"


def gaugePeers(
    rootObject: Any,
    clock: Clock,
    clientLimits: pb.BrokerLimits | None = None,
    bufferSize: int | None = None,
    levelGauges: tuple[type, type] | None = None,
) -> tuple[Any, Any, Any]:
    """
    A server serving ``rootObject`` and a client, connected in memory on ``clock``, that
    copy the test gauges (``levelGauges``: the level gauge and its copy's class, this
    module's by default); the server's limits are 1 MiB buffered and 4 MiB messages, the
    client's ``clientLimits`` (the same by default).
    """
    registry = pb.UnjellyableRegistry()
    registry.setUnjellyableForClass(Gauge, RemoteGauge)
    registry.setUnjellyableForClass(*(levelGauges or (LevelGauge, RemoteLevelGauge)))
    limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB)
    return connectedServerAndClient(
        pb.PBServerFactory(rootObject, clock=clock, limits=limits, registry=registry),
        pb.PBClientFactory(clock=clock, limits=clientLimits or limits, registry=registry),
        clock=clock,
        bufferSize=bufferSize,
    )


def stopTaking(server: Any) -> None:
    """``server`` no longer says when it takes a large call (as a hostile peer might)."""
    send = server.sendCall

    def sendCall(*expression: Any) -> None:
        if expression[0] != b"taken":
            send(*expression)

    server.sendCall = sendCall


class Child(pb.Referenceable):
    def remote_ping(self, *args: Any) -> int:
        return len(args)

    def remote_take(self, *args: Any) -> int:
        return len(args)


class Unknown(pb.Copyable):
    """A class the server does not take."""


class Helper(pb.Referenceable):
    """A client's object the server calls back: its answer names a cache handle."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge

    def remote_gauge(self) -> list[Any]:
        return [self.gauge, b"h" * (MiB + MiB // 4)]


class LevelGauge(Gauge):
    """A Cacheable whose observer the client calls (an observer's updates)."""


class RemoteLevelGauge(pb.RemoteCache):
    levels: list[Any]

    def setCopyableState(self, state: Any) -> None:
        super().setCopyableState(state)
        self.levels = []

    def observe_level(self, level: Any) -> None:
        self.levels.append(level)


class Root(pb.Root):
    def __init__(self) -> None:
        self.child = Child()
        self.gauge = Gauge()
        self.kept: Any = None

    def remote_take(self, *args: Any) -> int:
        return len(args)

    def remote_child(self) -> Child:
        return self.child

    def remote_newChild(self) -> Child:
        return Child()

    def remote_gauge(self) -> Gauge:
        return self.gauge

    def remote_newGauge(self) -> Gauge:
        return Gauge()

    def remote_keep(self, value: Any) -> None:
        self.kept = value

    def remote_ask(self, helper: Any) -> Any:
        return helper.callRemote("gauge").addCallback(len)

    def remote_hold(self, *references: Any) -> None:
        self.held = list(references)

    def remote_bigGauge(self, size: int) -> list[Any]:
        return [self.gauge, b"h" * size]

    def remote_echo(self, value: Any) -> Any:
        return value


class ClientKeepsReleasesTests(SynchronousTestCase):
    """
    A client whose large calls wait for the server to take them keeps its releases behind
    them: the server's calls are made, answered and released as it would have otherwise.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.rootObject = Root()
        self.connect(pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB))

    def connect(self, clientLimits: pb.BrokerLimits) -> None:
        # Unbounded fake transports: what the client writes waits there until pumped.
        self.server, self.client, self.pump = gaugePeers(self.rootObject, self.clock, clientLimits)
        self.root = self.client.remoteForName("root")

    def answer(self, name: str, *args: Any) -> Any:
        d = self.root.callRemote(name, *args)
        self.pump.flush()
        return self.successResultOf(d)

    def queueLarge(self) -> list[Any]:
        """
        Two large calls: the first written (and not yet delivered), the second waiting in
        the client's queue for the server to take the first.
        """
        calls = [self.root.callRemote("take", b"1" * BIG)]
        for _ in range(1000):
            if not self.client._largeOut:
                break
            self.clock.advance(0)
        calls.append(self.root.callRemote("take", b"2" * BIG))
        self.assertGreater(self.client._largeOut[0][3], 0)  # waits for room
        return calls

    def drain(self) -> None:
        for _ in range(100):
            self.pump.flush()
            self.clock.advance(1)

    def test_releasesOfOneObjectJoin(self) -> None:
        """References to one object released while large calls wait keep one entry, and
        one imported reference for all; every decref is sent once the calls are out."""
        references = [self.answer("child") for _ in range(200)]
        self.assertEqual(self.client.importedReferences, 200)
        calls = self.queueLarge()
        del references[:]
        gc.collect()
        self.assertEqual(len(self.client._afterLarge), 1)
        self.assertEqual(self.client.importedReferences, 1)  # held by the kept entry
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(list(self.client._afterLarge), [])
        self.assertEqual(self.client.importedReferences, 0)
        self.assertEqual(self.client._keptReleases, {})
        # The server got all 200 decrefs: the child is no longer exported.
        self.assertNotIn(self.rootObject.child.processUniqueID(), self.server.luids)

    def releaseAfterACall(self, *args: Any) -> int:
        """
        Release one of two references to the server's child while large calls wait, call
        the child with ``args``, release the other: the last decref must follow the call.
        The number of entries kept then.
        """
        first, second = self.answer("child"), self.answer("child")
        calls = self.queueLarge()
        del first
        gc.collect()  # one decref kept, behind the large calls
        pinged = second.callRemote("ping", *args)  # queued after that decref
        del second
        gc.collect()  # the last reference: its decref must follow the call
        kept = len(self.client._afterLarge)
        self.drain()
        self.assertEqual(self.successResultOf(pinged), len(args))
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertNotIn(self.rootObject.child.processUniqueID(), self.server.luids)
        self.assertEqual(self.client.importedReferences, 0)
        return kept

    def test_aCallKeptAfterAReleaseIsNotOvertaken(self) -> None:
        """A release of an object asked for after a call to it was kept behind the large
        messages goes after that call, not with the releases kept before it."""
        gauge = Gauge()
        self.answer("keep", gauge)  # the server holds a copy: later calls name it by handle
        self.assertEqual(self.releaseAfterACall(gauge), 3)  # decref, call, decref

    def test_aLargeCallToAnObjectIsNotOvertakenByItsRelease(self) -> None:
        """A release asked for after a large call to its object was queued goes after the
        call, which waits for the server to take earlier ones; the release asked for before
        it goes ahead of the waiting calls (none of them names the object then)."""
        self.assertEqual(self.releaseAfterACall(b"p" * BIG), 1)  # the last decref only

    def test_anUncacheOnCancellingFollowsTheUpdatesKeptBehindTheCall(self) -> None:
        """A large call naming a copy by handle waits for room, an update to the copy
        kept behind it; the server drops its copy meanwhile (the call's handle still counts).
        Cancelling the call unsent releases the last handle: the uncache follows the
        update, which arrives. (Found by tests/test_orderfuzz.py, seed 17061: the uncache
        was written while the update still waited in _afterBlocked with no large message
        queued, so the server had forgotten the copy when the update came: Invalid Object
        ID.)"""
        gauge = LevelGauge()
        self.answer("keep", gauge)  # the server holds a copy: count 1
        levels = self.rootObject.kept.levels
        first = self.writeOneLarge()
        large = self.root.callRemote("take", b"c" * BIG, gauge)  # a handle: count 2
        self.clock.advance(0)
        self.assertGreater(self.client._largeOut[-1][3], 0)  # it waits for room
        update = gauge.observers[0].callRemote("level", 1)
        self.clock.advance(0)
        self.assertEqual(len(self.client._afterBlocked), 1)  # the update, behind that call
        self.rootObject.kept = None
        gc.collect()  # the server's decache: count 1 (the waiting call's handle)
        self.pump.clientIO.bufferReceived(self.pump.serverIO.getOutBuffer())
        self.assertEqual(len(self.client.remotelyCachedObjects), 1)
        large.cancel()  # unsent: its handle is released, the last one
        self.failureResultOf(large, CancelledError)
        self.drain()
        self.assertIsNone(self.successResultOf(update))
        self.assertEqual(levels, [1])
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(
            (self.client.remotelyCachedObjects, self.server.locallyCachedObjects), ({}, {})
        )
        self.assertEqual(self.kept(), (0, 0, 0))

    def test_aCallFromStoppedObservingOnCancellingKeepsItsPlace(self) -> None:
        """As above, with a call kept behind the waiting call: the Cacheable's
        stoppedObserving, run as the cancel releases the last handle, makes a call; it
        arrives after the call made before it, not ahead of it."""
        ran: list[Any] = []
        self.rootObject.remote_note = ran.append  # type: ignore[attr-defined]
        gauge = Gauge()
        gauge.stoppedObserving = lambda *_: self.root.callRemote(  # type: ignore[method-assign]
            "note", "farewell"
        )
        self.answer("keep", gauge)
        self.writeOneLarge()
        large = self.root.callRemote("take", b"c" * BIG, gauge)
        self.clock.advance(0)
        self.root.callRemote("note", "before")  # kept behind the waiting call
        self.clock.advance(0)
        self.assertEqual(len(self.client._afterBlocked), 1)
        self.rootObject.kept = None
        gc.collect()
        self.pump.clientIO.bufferReceived(self.pump.serverIO.getOutBuffer())
        large.cancel()
        self.failureResultOf(large, CancelledError)
        self.drain()
        self.assertEqual(ran, ["before", "farewell"])
        self.assertEqual(self.kept(), (0, 0, 0))

    def test_aCancelKeptBehindItsLargeCallFollowsIt(self) -> None:
        """A large call kept behind others, then cancelled, is followed by its cancel, even
        once the call has joined the large messages being sent."""
        cancelled: list[bool] = []
        self.rootObject.remote_slow = lambda *args: Deferred(  # type: ignore[attr-defined]
            lambda _: cancelled.append(True)
        )
        gauge = Gauge()
        self.answer("keep", gauge)  # the server holds a copy: later calls name it by handle
        calls = self.queueLarge()
        # A handle: it waits behind the large calls; a first copy: not dropped unsent.
        call = self.root.callRemote("slow", gauge, Gauge(), b"s" * BIG)
        self.assertEqual(len(self.client._afterLarge), 1)
        call.cancel()
        self.failureResultOf(call, CancelledError)
        self.assertEqual(len(self.client._afterLarge), 2)  # its cancel, behind it
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(cancelled, [True])

    def test_keptAnswersBehindAWaitingCallDoNotStopTaken(self) -> None:
        """Answers kept behind a large call that waits for the peer to take earlier ones
        do not make the peer's messages wait: its "taken" lets that call go."""
        mine = Gauge()
        self.answer("keep", mine)  # the server holds a copy: the helper's answer names it
        calls = self.queueLarge()
        calls.append(self.root.callRemote("take", b"3" * BIG))  # waits for the second
        asked = self.root.callRemote("ask", Helper(mine))  # its answer: kept, 1.25 MiB
        self.drain()
        self.assertEqual(self.successResultOf(asked), 2)
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1, 1])
        self.assertEqual((self.client._keptForPeer, list(self.client._afterLarge)), (0, []))

    def kept(self) -> tuple[int, int, int]:
        """What the client keeps behind large calls: entries, for the server, of its own."""
        client = self.client
        entries = len(client._afterLarge) + len(client._afterBlocked)
        return entries, client._keptForPeer, client._keptOwn

    def test_updatesKeepTheirPlaceBehindACallThatIsNeverTaken(self) -> None:
        """An observer's updates to a copy the server already holds are calls, and keep
        their place behind a large call that waits for the server to take an earlier one,
        as in stock PB; a call made to go ahead (``ordered=False``) does not wait."""
        stopTaking(self.server)
        gauge = LevelGauge()
        self.answer("keep", gauge)
        observer = gauge.observers[0]
        calls = self.queueLarge()
        for level in range(1000):
            observer.callRemote("level", level)
        ahead = self.root.withOptions(ordered=False).callRemote("take", b"a")
        self.drain()
        self.assertEqual(self.successResultOf(ahead), 1)
        self.assertEqual(self.rootObject.kept.levels, [])
        self.assertEqual(self.kept()[:2], (1000, 0))  # the client's own, none for the server
        self.assertEqual(self.successResultOf(calls[0]), 1)
        self.assertNoResult(calls[1])  # still waiting: the server never took the first
        self.assertGreater(self.client._largeOut[0][3], 0)

    def test_answersGoAheadOfACallThatIsNeverTaken(self) -> None:
        """Answers that name a cache handle go ahead of a large call that waits for the
        server to take an earlier one, unless the handle's first copy is in it."""
        stopTaking(self.server)
        mine = Gauge()
        helper = Helper(mine)
        helper.remote_small = lambda: [mine]  # type: ignore[attr-defined]
        self.answer("keep", [mine, helper])  # the server holds a copy and the helper
        calls = self.queueLarge()
        answers = [self.rootObject.kept[1].callRemote("small") for _ in range(200)]
        self.drain()
        self.assertEqual([len(self.successResultOf(answer)) for answer in answers], [1] * 200)
        self.assertEqual(self.kept(), (0, 0, 0))
        self.assertNoResult(calls[1])

    def test_aCallGoesAheadOfACallThatOnlyNamesItsCopy(self) -> None:
        """A call made to go ahead (``ordered=False``) that names a copy the server holds
        goes ahead of a waiting large call that names that copy too (to the same object as
        the waiting call): only its first copy, or a release of what the call names, would
        have to wait for it. Updates to the copy are calls that keep their place."""
        stopTaking(self.server)
        known = LevelGauge()
        self.answer("hold", known)
        calls = self.queueLarge()
        calls.append(self.root.callRemote("keep", [known, b"3" * BIG]))  # waits; names it
        # Small, kept behind the large calls as it names the handle; then goes ahead.
        calls.append(self.root.withOptions(ordered=False).callRemote("take", known))
        self.assertEqual(len(self.client._afterLarge), 2)  # (the two that name the handle)
        updates = [known.observers[0].callRemote("level", level) for level in range(100)]
        for _ in range(20):  # (within stallTimeout: see below)
            self.pump.flush()
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(calls[3]), 1)
        self.assertEqual(self.rootObject.held[0].levels, [])
        self.assertEqual(self.kept()[:2], (101, 0))  # the updates, and that large call
        self.assertNoResult(calls[2])
        # Over bufferedBytes of the client's own calls wait, and the server takes none:
        # it is dropped (a peer that takes no calls), and the calls fail.
        with capturedLogs():
            self.drain()
        self.assertTrue(self.client.disconnected)
        for call in [calls[1], calls[2], *updates]:
            self.failureResultOf(call, pb.PBConnectionLost)
        self.assertEqual(self.kept(), (0, 0, 0))

    def writeOneLarge(self) -> Any:
        """A large call written, not yet delivered: the next large calls wait for "taken"."""
        call = self.root.callRemote("take", b"0" * BIG)
        for _ in range(50):
            self.clock.advance(0)
        return call

    def test_aReleaseBehindACancelledCallIsSent(self) -> None:
        """A decref that waited behind a kept call to its object is sent once that call is
        cancelled unsent, not kept for ever."""
        child = self.answer("child")
        calls = [self.writeOneLarge()]
        copy = Gauge()
        calls.append(self.root.callRemote("take", b"1" * BIG, copy))  # its first copy: waits
        kept = child.callRemote("ping", copy)  # needs that first copy: waits for that call
        self.clock.advance(0)
        del child
        gc.collect()  # the decref: waits behind the kept call, which names the child
        self.clock.advance(0)
        self.assertEqual(len(self.client._afterBlocked), 2)
        kept.cancel()
        self.failureResultOf(kept, CancelledError)
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 2])
        self.assertEqual(self.kept(), (0, 0, 0))
        self.assertEqual(self.client.importedReferences, 0)
        self.assertNotIn(self.rootObject.child.processUniqueID(), self.server.luids)

    def test_aReleaseBehindACancelledLargeCallIsSent(self) -> None:
        """A decref that waited behind a large call to its object, itself waiting for the
        server to take an earlier one, is sent once that call is cancelled unsent."""
        ran: list[int] = []

        class Recording(Child):
            def remote_take(self, *args: Any) -> int:
                ran.append(len(args))
                return len(args)

        self.rootObject.remote_newChild = Recording  # type: ignore[method-assign]
        child = self.answer("newChild")
        first = self.writeOneLarge()
        large = child.callRemote("take", b"c" * BIG)  # waits for "taken"; names the child
        del child
        gc.collect()  # its decref: must follow that call
        self.clock.advance(0)
        self.assertEqual(len(self.client._afterBlocked), 1)
        large.cancel()
        self.failureResultOf(large, CancelledError)
        self.assertEqual(len(self.client._afterBlocked), 0)
        self.drain()
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(self.kept(), (0, 0, 0))
        self.assertEqual(self.client.importedReferences, 0)
        self.assertEqual(self.server.luids, {})  # the decref came
        self.assertEqual(ran, [])  # the call never did

    def test_cancellingOneOfManyKeptCalls(self) -> None:
        """Cancelling a kept call found past another one drops it alone: the others are
        sent, and the server never runs it."""
        gauge = Gauge()
        self.answer("keep", gauge)  # the server holds a copy: later calls name it by handle
        ran: list[Any] = []
        self.rootObject.remote_note = lambda _, tag: ran.append(tag)  # type: ignore[attr-defined]
        calls = self.queueLarge()
        kept = [self.root.callRemote("note", gauge, tag) for tag in ("a", "b", "c")]
        self.assertEqual(len(self.client._afterLarge), 3)
        kept[1].cancel()
        self.failureResultOf(kept[1], CancelledError)
        self.assertEqual(len(self.client._afterLarge), 2)
        self.drain()
        self.assertEqual(ran, ["a", "c"])
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(self.kept(), (0, 0, 0))
        self.assertEqual(self.client.waitingForAnswers, {})

    def test_aReleaseDoesNotOvertakeACallKeptAgain(self) -> None:
        """A kept large call that goes ahead only to wait for "taken" again stays ahead of
        what came after it: the decref of the object a later call names follows that call."""
        child = self.answer("newChild")
        calls = [self.writeOneLarge()]
        first, second = Gauge(), Gauge()
        calls.append(self.root.callRemote("take", first, b"c" * BIG))  # waits
        calls.append(child.callRemote("take", first, second, b"l" * BIG))  # kept: needs first
        calls.append(child.callRemote("ping", second))  # kept: needs second
        calls.append(child.callRemote("take", b"w" * BIG))  # waits
        del child
        gc.collect()  # its decref: after every call to it
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 2, 3, 1, 1])
        self.assertEqual(self.kept(), (0, 0, 0))
        self.assertEqual(self.server.luids, {})

    def test_updatesKeepTheirOrderBehindALargeOne(self) -> None:
        """An observer's small updates made after a large one that waits for "taken" follow
        it: updates to one copy arrive in order."""
        known = LevelGauge()
        self.answer("hold", known)
        calls = self.queueLarge()
        observer = known.observers[0]
        observer.callRemote("level", b"L" * BIG)
        for level in range(20):
            observer.callRemote("level", level)
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(self.rootObject.held[0].levels, [b"L" * BIG, *range(20)])
        self.assertEqual(self.kept(), (0, 0, 0))

    def test_anUpdateWaitsForTheCallWithItsFirstCopy(self) -> None:
        """An update to a copy whose first copy is in a large call waiting to be taken
        waits for that call, and so does what names what the update names: the server
        gets each copy before a message naming it. (An update to a copy the server holds
        already waits too, as calls keep their order.)"""
        known = LevelGauge()
        self.answer("hold", known)  # the server holds a copy, in no waiting call
        calls = self.queueLarge()
        second = LevelGauge()
        calls.append(self.root.callRemote("keep", [second, b"3" * BIG]))  # waits too
        third = LevelGauge()
        second.observers[0].callRemote("level", third)  # third's first copy: waits
        third.observers[0].callRemote("level", 7)  # names third: waits behind it
        known.observers[0].callRemote("level", 1)  # keeps its place
        self.assertEqual(len(self.client._afterLarge), 3)
        self.clock.advance(0)
        self.assertEqual((len(self.client._afterLarge), len(self.client._afterBlocked)), (0, 3))
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1, None])
        copy = self.rootObject.kept[0]
        self.assertEqual(len(copy.levels), 1)
        self.assertIsInstance(copy.levels[0], RemoteLevelGauge)
        self.assertEqual(copy.levels[0].levels, [7])
        self.assertEqual(self.rootObject.held[0].levels, [1])
        self.assertEqual(self.kept(), (0, 0, 0))

    def test_decachesOfOneCopyJoin(self) -> None:
        """Handles on one cache copy released while large calls wait keep one entry; the
        server gets every decache, and uncaches its copy."""
        handles = [self.answer("gauge") for _ in range(50)]
        calls = self.queueLarge()
        del handles[:]
        gc.collect()
        self.assertEqual(len(self.client._afterLarge), 1)
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(self.server.remotelyCachedObjects, {})  # every handle released
        self.assertEqual(self.client.locallyCachedObjects, {})  # and uncached
        self.assertEqual(self.rootObject.gauge.stopped, 1)

    def test_decachesForgottenOnAnEarlyUncache(self) -> None:
        """A peer that uncaches copies before it got their kept decaches is sent none of
        them, and the emptied entries do not stay in the queue."""
        handles = [self.answer("newGauge") for _ in range(10)]
        luids = [handle.luid for handle in handles]
        calls = self.queueLarge()
        del handles[:]
        gc.collect()
        self.assertEqual(len(self.client._afterLarge), 10)
        for luid in luids:
            self.client.expressionReceived([b"uncache", luid])
        self.assertEqual((len(self.client._afterLarge), self.client._keptReleases), (0, {}))
        self.assertEqual(self.client._emptiedReleases, 0)
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(len(self.server.remotelyCachedObjects), 10)  # no decache came

    def test_everyKeptDecacheOfACopyIsEmptied(self) -> None:
        """An early uncache empties all the decaches kept for the copy, also those kept in
        more than one entry (another message was kept between them)."""
        mine = Gauge()
        self.answer("keep", mine)  # the server holds a copy of it
        first, second = self.answer("gauge"), self.answer("gauge")
        luid = first.luid
        calls = self.queueLarge()
        del first
        gc.collect()
        self.root.callRemote("keep", mine)  # names a handle: kept between the two decaches
        del second
        gc.collect()
        self.assertEqual(len(self.client._afterLarge), 3)
        self.client.expressionReceived([b"uncache", luid])
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(self.server.remotelyCachedObjects[luid].refcount, 2)  # none came

    def test_emptiedEntriesAreSkipped(self) -> None:
        """An emptied entry still queued sends nothing; the others are sent."""
        kept = [self.answer("newGauge") for _ in range(3)]
        calls = self.queueLarge()
        forgotten = kept.pop(0).luid
        gc.collect()
        kept.clear()
        gc.collect()
        self.assertEqual(len(self.client._afterLarge), 3)
        self.client.expressionReceived([b"uncache", forgotten])
        self.assertEqual(len(self.client._afterLarge), 3)  # under half emptied: kept
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(list(self.server.remotelyCachedObjects), [forgotten])
        self.assertEqual(self.client._emptiedReleases, 0)

    def test_anUncacheWhileOtherReleasesAreKept(self) -> None:
        """The server's uncache of a copy whose decache was sent, arriving while other
        releases are kept, forgets the copy and leaves those releases kept, to be sent
        once the large calls are out."""
        gauge = self.answer("newGauge")
        luid = gauge.luid
        child = self.answer("newChild")
        del gauge
        gc.collect()  # its decache: written at once, nothing large is queued yet
        calls = self.queueLarge()
        del child
        gc.collect()  # its decref: kept behind the large calls
        kept = dict(self.client._keptReleases)
        self.assertEqual([command for command, _ in kept], [b"decref"])
        self.pump.flush(advanceClock=False)  # the uncache (and "taken") arrive; no pump runs
        self.assertNotIn(luid, self.client.locallyCachedObjects)
        self.assertEqual(self.client._keptReleases, kept)
        self.assertEqual(len(self.client._afterLarge), 1)
        self.drain()
        self.assertEqual([self.successResultOf(call) for call in calls], [1, 1])
        self.assertEqual(self.kept(), (0, 0, 0))
        self.assertEqual(self.client._keptReleases, {})
        self.assertEqual((self.server.luids, self.server.remotelyCachedObjects), ({}, {}))
        self.assertFalse(self.client.disconnected)

    def test_keptDecrefsForgottenOnConnectionLost(self) -> None:
        """Kept releases are dropped with the connection, and the references their decrefs
        held are no longer counted."""
        references = [self.answer("newChild") for _ in range(3)]
        calls = self.queueLarge()
        references.clear()
        gc.collect()
        self.assertEqual(self.client.importedReferences, 3)
        self.client.transport.abortConnection()  # (loseConnection() sends what waits)
        self.pump.flush()
        self.assertEqual((list(self.client._afterLarge), self.client._keptReleases), ([], {}))
        self.assertEqual(self.client.importedReferences, 0)
        self.failureResultOf(calls[1], pb.PBConnectionLost)  # (the first was delivered)


class KeptWhileABacklogIsHandledTests(HandDriven):
    """
    What is kept while the client handles the server's messages that waited, in the turn
    the pump finds only calls that wait for the server to take earlier ones, is sent.
    """

    def test_answersKeptWhileHandlingTheBacklogGo(self) -> None:
        """The server calls the client back for a large answer and forty that name a
        handle, and takes the client's first large call, all read in one go: every call
        both ways is answered (the answers kept meanwhile did not stay kept for ever)."""
        asked, results = self.callBackWhileALargeCallWaits(taking=True)
        self.assertEqual(results, [None, 1, 1])
        self.assertEqual([d.called for d in asked], [True] * 41)
        self.assertEqual((list(self.client._afterLarge), self.client._keptForPeer), ([], 0))

    def test_answersKeptWhileHandlingTheBacklogGoWithoutTaken(self) -> None:
        """The same with a server that never says it takes a large call: the client's
        second large call waits for ever, and the answers kept meanwhile go all the same."""
        asked, results = self.callBackWhileALargeCallWaits(taking=False)
        self.assertEqual(results, [None, 1])
        self.assertEqual([d.called for d in asked], [True] * 41)
        self.assertEqual((list(self.client._afterLarge), self.client._keptForPeer), ([], 0))
        self.assertTrue(self.client._largeOut)  # the second large call, still waiting

    def callBackWhileALargeCallWaits(self, taking: bool) -> tuple[list[Any], list[Any]]:
        self.clock = Clock()
        limits = pb.BrokerLimits(bufferedBytes=MiB, messageSize=4 * MiB)
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Gauge, RemoteGauge)
        rootObject = Root()
        asked: list[Any] = []
        rootObject.remote_trigger = lambda helper: asked.extend(  # type: ignore[attr-defined]
            helper.callRemote(name) for name in ["big"] + ["mid"] * 40
        )
        self.connectPeers(rootObject, limits, registry, limits, registry)
        if not taking:
            send = self.server.sendCall
            self.server.sendCall = lambda *expression: (  # type: ignore[method-assign]
                None if expression[0] == b"taken" else send(*expression)
            )
        mine = Gauge()
        helper = Helper(mine)
        helper.remote_big = lambda: b"b" * BIG  # type: ignore[attr-defined]
        helper.remote_mid = lambda: [mine, b"m" * 60_000]  # type: ignore[attr-defined]
        self.root.callRemote("keep", [mine, helper])
        self.settle(200)
        results: list[Any] = []
        self.root.callRemote("trigger", helper).addBoth(results.append)
        for data in (b"1", b"2"):
            self.root.callRemote("take", data * BIG).addBoth(results.append)
        for _ in range(20):
            self.clock.advance(0)  # the first large call written; the second waits
        self.toServer()  # the server calls the helper back, and takes the first call
        self.toClient()  # the client reads all of that in one go
        self.settle(500)
        return asked, results

    def settle(self, turns: int) -> None:
        for _ in range(turns):
            self.clock.advance(0)
            self.toServer()
            self.toClient()


class NativeFloodTests(HandDriven):
    """
    A hostile client leaves a large answer unread and floods the server, driven through a
    client broker whose bytes the test moves by hand.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.rootObject = Root()
        self.rootObject.remote_big = lambda: b"x" * 3_000_000  # type: ignore[attr-defined]
        self.rootObject.remote_drop = lambda *references: None  # type: ignore[attr-defined]
        self.connect(pb.BrokerLimits(bufferedBytes=8192, messageSize=8192, importedReferences=16))

    def connect(self, limits: pb.BrokerLimits) -> None:
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Gauge, RemoteGauge)
        self.connectPeers(self.rootObject, limits, registry)

    def exchange(self, rounds: int = 100) -> None:
        """Both sides read what the other wrote, turn after turn."""
        for _ in range(rounds):
            self.clock.advance(0)
            self.toClient()
            self.toServer()

    def unreadBigAnswer(self) -> None:
        self.root.callRemote("big")
        self.toServer()
        self.assertTrue(self.server._largeOut)
        self.server.transport.pauseProducing()  # the client reads none of it
        self.serverTransport.clear()

    def test_aPeerThatStopsReadingIsDroppedWithinTheAllowance(self) -> None:
        """Answers made before the connection filled, more than bufferedBytes waiting
        behind the one being sent but within what may wait, get a peer that takes none of
        them for stallTimeout seconds dropped: it cannot make the server hold them for
        ever. One that drains its connection in time is not."""
        self.root.callRemote("big")
        self.root.callRemote("big")
        self.toServer()  # both answered: one being sent, one behind it
        self.assertGreater(self.server.waitingForPeer(), 8192)
        transport = self.server.transport
        transport.pauseProducing()  # the client reads none of it
        self.assertIsNotNone(transport._stall)
        transport.resumeProducing()  # it read: the timer is off
        self.assertIsNone(transport._stall)
        self.root.callRemote("big")
        self.toServer()  # answered behind the one now being sent
        self.assertGreater(self.server.waitingForPeer(), 8192)
        transport.pauseProducing()
        self.serverTransport.clear()
        with capturedLogs() as logs:
            self.clock.advance(29)
            self.assertFalse(self.serverTransport.disconnecting)
            self.clock.advance(2)
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertIn("stopped reading", logs[-1]["log_format"])
        self.assertEqual(logs[-1]["limit"], 8192)
        self.assertEqual(logs[-1]["count"], self.server.waitingForPeer())

    def test_oneObjectOverAndOver(self) -> None:
        """One object sent in thousands of one-way calls keeps one release."""
        thing = pb.Referenceable()
        self.unreadBigAnswer()
        for _ in range(50):
            for _ in range(40):
                self.root.callRemote("drop", thing, pbanswer=False)
            self.toServer()
        self.assertEqual(len(self.server._afterLarge), 1)
        self.assertEqual(self.server.importedReferences, 1)
        self.assertFalse(self.serverTransport.disconnecting)

    def test_newObjectsOverAndOver(self) -> None:
        """New objects in one-way calls: the server keeps at most its importedReferences
        decrefs, and a peer that goes on is dropped."""
        self.unreadBigAnswer()
        with capturedLogs():
            for _ in range(2000):
                if self.serverTransport.disconnecting:
                    break
                self.root.callRemote("drop", pb.Referenceable(), pbanswer=False)
                self.toServer()
        self.assertLessEqual(len(self.server._afterLarge), 16)
        self.assertTrue(self.serverTransport.disconnecting)

    def test_newObjectsPastTheLimitAreRefused(self) -> None:
        """Past importedReferences kept decrefs, a new reference is refused and its decref
        written at once; once the client reads, every reference is released."""
        self.root.callRemote("big")
        self.toServer()  # (only the answer's first fragments are written)
        for _ in range(16):
            self.root.callRemote("drop", pb.Referenceable(), pbanswer=False)
        self.toServer()
        self.assertEqual(len(self.server._afterLarge), 16)
        self.assertEqual(self.server.importedReferences, 16)
        before = len(self.serverTransport.value())
        with capturedLogs() as logs:
            self.root.callRemote("drop", pb.Referenceable(), pbanswer=False)
            self.toServer()
        self.assertIn(b"decref", self.serverTransport.value()[before:])  # written at once
        self.assertEqual(len(self.server._afterLarge), 16)
        self.assertIn("Refusing a reference", logs[0]["log_format"])
        self.exchange(20)
        self.assertFalse(self.serverTransport.disconnecting)
        self.assertEqual(self.server.importedReferences, 0)
        self.assertEqual(list(self.server._afterLarge), [])
        self.assertEqual(self.client.luids, {})  # every reference released, the refused too

    def test_answersKeptCountAsWaiting(self) -> None:
        """Answers kept behind an unread large answer (they name a cache handle) count as
        waiting for the peer: one that asks for more and more of them is dropped."""
        self.holdGauge()
        self.unreadBigAnswer()
        with capturedLogs() as logs:
            for _ in range(3000):
                if self.serverTransport.disconnecting:
                    break
                self.root.callRemote("gauge")
                self.toServer()
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertLess(len(self.server._afterLarge), 1000)
        self.assertIn("stopped reading", logs[-1]["log_format"])

    def test_unreadReferencesReleasedAtOnce(self) -> None:
        """References in a value the server refuses half-way, never unjellied, are released
        at once rather than kept: a peer sending such values keeps nothing growing."""
        self.root.callRemote("big")
        self.toServer()
        before = len(self.serverTransport.value())
        with capturedLogs():
            for _ in range(20):
                self.root.callRemote("drop", Unknown(), pb.Referenceable(), pbanswer=False)
            self.toServer()
        self.assertEqual(list(self.server._afterLarge), [])
        self.assertEqual(self.serverTransport.value()[before:].count(b"decref"), 20)
        self.exchange(20)
        self.assertEqual(self.client.luids, {})

    def test_keptGoesOnceTheLargeMessagesBeforeItAreOut(self) -> None:
        """What waits behind large messages goes once those queued before it are out, not
        after large messages queued later too (a reader that keeps asking for large answers
        would otherwise never get it)."""
        answers: list[Any] = []
        self.root.callRemote("big").addCallback(answers.append)
        self.toServer()
        self.root.callRemote("drop", pb.Referenceable(), pbanswer=False)
        self.toServer()
        self.assertEqual(len(self.server._afterLarge), 1)  # its decref waits
        self.root.callRemote("big").addCallback(answers.append)
        self.toServer()
        self.assertEqual(len(self.server._largeOut), 2)
        self.clock.advance(0)  # the server writes both answers, and the decref
        data = self.serverTransport.value()
        self.serverTransport.clear()
        for start in range(0, len(data), 65536):  # the client reads a piece at a time
            self.client.dataReceived(data[start : start + 65536])
            if not self.client.luids:
                break
        self.assertEqual(self.client.luids, {})  # the decref came
        self.assertEqual(len(answers), 1)  # between the two answers
        self.client.dataReceived(data[start + 65536 :])
        self.assertEqual([len(answer) for answer in answers], [3_000_000] * 2)

    def holdGauge(self) -> None:
        """The client takes a copy of the server's gauge: answers naming it are kept behind
        large messages being sent."""
        handles: list[Any] = []
        self.root.callRemote("gauge").addCallback(handles.append)
        for _ in range(3):
            self.toServer()
            self.toClient()
        self.assertEqual(len(handles), 1)
        self.handles = handles
        self.addCleanup(handles.clear)  # its decache written while the fake transport is open

    def test_keptAnswersMakeThePeerWait(self) -> None:
        """Past bufferedBytes of answers kept behind a large answer, the peer's messages
        wait, unhandled, also once the connection took data again; once it reads, every
        call is answered."""
        self.holdGauge()
        answers: list[Any] = []
        self.root.callRemote("big").addCallback(answers.append)
        self.toServer()
        self.server.transport.pauseProducing()
        for _ in range(300):
            self.root.callRemote("gauge").addCallback(answers.append)
        self.toServer()  # waits: the connection takes no data
        self.assertIsNotNone(self.server._backlog)
        self.server.transport.resumeProducing()  # it took some: the calls are handled ...
        self.assertGreater(len(self.server._afterLarge), 10)
        self.assertLess(len(self.server._afterLarge), 100)  # ... until too much is kept
        self.assertIsNotNone(self.server._backlog)
        self.assertLessEqual(self.server._keptForPeer, 8192 + 200)
        self.exchange()
        self.assertEqual(len(answers), 301)
        self.assertEqual((self.server._keptForPeer, list(self.server._afterLarge)), (0, []))
        self.assertFalse(self.serverTransport.disconnecting)

    def test_oneObjectBetweenKeptAnswersIsNotRefused(self) -> None:
        """One object sent over and over between answers kept behind a large answer counts
        once in importedReferences, however many entries its decrefs take: a well-behaved
        peer is not refused it."""
        self.connect(pb.BrokerLimits(importedReferences=100))
        self.holdGauge()
        listener = pb.Referenceable()
        answers: list[Any] = []
        self.root.callRemote("big").addCallback(answers.append)
        self.toServer()
        with capturedLogs() as logs:
            for _ in range(150):
                self.root.callRemote("drop", listener, pbanswer=False)
                self.root.callRemote("gauge").addCallback(answers.append)
                self.toServer()
            self.assertGreater(len(self.server._afterLarge), 200)
            self.assertEqual(self.server.importedReferences, 1)
            self.exchange()
        self.assertEqual([log["log_format"] for log in logs if "Refusing" in log["log_format"]], [])
        self.assertEqual(len(answers), 151)
        self.assertEqual(self.server.importedReferences, 0)
        self.assertEqual(self.client.luids, {})

    def test_releasesSplitByKeptAnswersAreBounded(self) -> None:
        """Releases of the same objects split into new entries by the answers kept between
        them count as kept for the peer: past bufferedBytes, its messages wait."""
        self.connect(pb.BrokerLimits(bufferedBytes=8192, messageSize=8192))
        self.holdGauge()
        self.root.callRemote("big")
        self.toServer()
        listeners = [pb.Referenceable() for _ in range(20)]
        for _ in range(40):  # (the kept answers alone stay under bufferedBytes)
            self.root.callRemote("drop", *listeners, pbanswer=False)
            self.root.callRemote("gauge")  # kept: the next releases start new entries
            self.toServer()
        self.assertLess(len(self.server._afterLarge), 100)
        self.assertIsNotNone(self.server._backlog)  # the rest waits
        self.assertLessEqual(self.server._keptForPeer, 8192 + 4400)

    def test_whatWaitedIsHandledOnLoss(self) -> None:
        """A peer's messages that waited behind answers kept for it are handled when the
        connection is lost: it sent them before it closed."""
        self.holdGauge()
        self.root.callRemote("big")
        self.toServer()
        for _ in range(100):
            self.root.callRemote("gauge")  # kept behind the answer: its last message waits
        self.root.callRemote("keep", "last", pbanswer=False)
        self.toServer()
        self.assertIsNotNone(self.server._backlog)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.rootObject.kept, "last")
        self.assertEqual(self.server._keptForPeer, 0)

    def test_keptPastTheLimitDropsOnlyAPeerNotReading(self) -> None:
        """Too much kept for the peer drops it only while its connection takes no data:
        while it does, the peer reads, and what is kept goes as the large messages before
        it do."""
        transport = self.server.transport
        self.server.overflowing = True
        transport.kept(10_000_000, 0)
        self.assertFalse(self.serverTransport.disconnecting)
        transport.pauseProducing()
        with capturedLogs() as logs:
            transport.kept(10_000_000, 0)
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertIn("stopped reading", logs[-1]["log_format"])

    def test_whatWaitedBehindKeptLargeAnswersIsHandledOnLoss(self) -> None:
        """Also when large answers are kept (which join the large messages as the others
        go), what the peer sent before the connection was lost is handled."""
        self.connect(pb.BrokerLimits(bufferedBytes=4 * MiB, messageSize=8192))
        self.holdGauge()
        self.root.callRemote("big")
        self.toServer()
        for size in (1_500_000, 4_500_000):
            self.root.callRemote("bigGauge", size)  # names a handle: kept, large
            self.toServer()
        self.root.callRemote("keep", "last", pbanswer=False)
        self.toServer()
        self.assertIsNotNone(self.server._backlog)  # it waits
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.rootObject.kept, "last")

    def test_ownReleasesDoNotMakeAReaderWait(self) -> None:
        """This side's own releases of many objects, kept behind a large answer, do not
        make the peer's messages wait: a reader pipelining calls is not pushed into an
        overflow, and so not dropped at a moment of a full connection."""
        self.connect(pb.BrokerLimits(bufferedBytes=8192, messageSize=8192))
        answers: list[Any] = []
        self.root.callRemote("hold", *[pb.Referenceable() for _ in range(50)])
        self.toServer()
        self.root.callRemote("big").addCallback(answers.append)
        self.toServer()
        self.toClient()  # the client reads what was written so far
        del self.rootObject.held
        gc.collect()  # the server's code lets the references go: 50 decrefs kept
        self.assertEqual(len(self.server._afterLarge), 50)
        self.assertEqual(self.server._keptForPeer, 0)
        with capturedLogs():
            for _ in range(20):  # 20 KB of pipelined calls, read as they come
                self.root.callRemote("echo", "x" * 1000).addCallback(answers.append)
                self.toServer()
            self.assertFalse(self.server.overflowing)
            self.toClient()
            self.server.transport.pauseProducing()  # a moment of a full connection
            for _ in range(10):
                self.root.callRemote("echo", "y" * 1000).addCallback(answers.append)
                self.toServer()
        self.assertFalse(self.serverTransport.disconnecting)

    def observeMany(self, count: int, size: int = 100) -> list[Deferred[Any]]:
        """This side's code calls the client's copy of the gauge ``count`` times, until the
        client is dropped: the calls wait behind the large answer being sent."""
        observer = self.rootObject.gauge.observers[0]
        calls = []
        for _ in range(count):
            if self.serverTransport.disconnecting:
                break
            calls.append(observer.callRemote("level", "l" * size))
        return calls

    def test_ownCallsKeptForAPeerNotReadingDropIt(self) -> None:
        """This side's own calls kept behind a large message count as waiting for the peer,
        as written ones do: past bufferedBytes while its connection takes nothing, a peer
        that reads none of them is dropped after stallTimeout."""
        self.holdGauge()
        self.unreadBigAnswer()
        calls = self.observeMany(100)
        self.assertEqual(len(calls), 100)
        self.assertGreater(self.server._keptOwn, 8192)
        self.assertIsNotNone(self.server.transport._stall)
        with capturedLogs() as logs:
            self.clock.advance(30)
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertIn("stopped reading", logs[-1]["log_format"])
        self.assertEqual(logs[-1]["count"], self.server._keptOwn)  # what waits, said

    def test_ownCallsKeptWhileOverflowingDropAtOnce(self) -> None:
        """While the peer's messages are handled although its connection takes nothing (it
        sent too much meanwhile), past bufferedBytes of this side's kept calls drop it at
        once, as written ones would: nothing grows meanwhile."""
        self.holdGauge()
        self.unreadBigAnswer()
        self.server.overflowing = True
        with capturedLogs() as logs:
            calls = self.observeMany(10_000)
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertLess(len(calls), 100)
        self.assertIn("stopped reading", logs[-1]["log_format"])

    def test_ownCallsKeptGoAsTheyWaitForNothing(self) -> None:
        """A reader gets this side's kept calls once the large answer is out, and nothing is
        counted any more; a kept call cancelled before it is sent is uncounted too."""
        self.holdGauge()
        answers: list[Any] = []
        self.root.callRemote("big").addCallback(answers.append)
        self.toServer()
        calls = self.observeMany(50)
        kept = self.server._keptOwn
        calls[-1].cancel()
        self.failureResultOf(calls[-1], CancelledError)
        self.assertEqual(self.server._keptOwn, kept * 49 // 50)  # all 50 are the same size
        self.exchange()
        self.assertEqual(len(answers), 1)
        self.assertEqual((self.server._keptOwn, list(self.server._afterLarge)), (0, []))
        for call in calls[:-1]:
            self.failureResultOf(call)  # the client's copy has no observe_level
        self.assertFalse(self.serverTransport.disconnecting)

    def test_ownCallsKeptWhileTheReaderReadsDoNotDropIt(self) -> None:
        """This side's calls kept while the connection took data count only once it takes
        none, as written ones do: a reader of a long answer, at a moment of a full
        connection while it overflows, is not dropped for what this side's code kept
        before."""
        self.holdGauge()
        self.root.callRemote("big")
        self.toServer()
        self.observeMany(100)  # 22 KB kept while the connection takes data
        self.server.transport.pauseProducing()  # a moment of a full connection ...
        self.server.overflowing = True  # ... while the client sent too much
        with capturedLogs():
            self.observeMany(1)
        self.assertFalse(self.serverTransport.disconnecting)

    def test_ownCallsCancelledUnsentNoLongerCount(self) -> None:
        """A kept call cancelled before it is sent no longer counts as waiting for the
        peer."""
        self.holdGauge()
        self.unreadBigAnswer()
        for _ in range(2):
            calls = self.observeMany(25)  # about 5.7 KB each time: two are over 8 KB
            self.assertIsNone(self.server.transport._stall)
            for call in calls:
                call.cancel()
                self.failureResultOf(call, CancelledError)
        self.assertEqual((self.server._keptOwn, self.server.transport.ownKeptWhilePaused), (0, 0))

    def test_stallForgottenOnceWhatWaitedIsCancelled(self) -> None:
        """A peer is not dropped for kept calls that were cancelled unsent before
        stallTimeout passed: nothing over the limit waits for it any more."""
        self.holdGauge()
        self.unreadBigAnswer()
        calls = self.observeMany(100)
        self.assertIsNotNone(self.server.transport._stall)
        for call in calls:
            call.cancel()
            self.failureResultOf(call, CancelledError)
        self.clock.advance(30)
        self.assertFalse(self.serverTransport.disconnecting)
        self.observeMany(100)  # over the limit again: armed again
        self.assertIsNotNone(self.server.transport._stall)

    def largeCallsArmTheStallTimer(self) -> tuple[Any, list[Deferred[Any]]]:
        """Two large calls of the server's to a client object, queued behind an answer the
        client does not read: 34 MB, over the 32 MiB (and bufferedBytes) they may take,
        which arms the stall timer. The client object's reference, and the calls."""
        self.root.callRemote("hold", Child())
        for _ in range(3):
            self.toServer()
            self.toClient()
        child = self.rootObject.held[0]
        self.unreadBigAnswer()
        calls = [child.callRemote("ping", b"x" * 17_000_000) for _ in range(2)]
        self.assertIsNotNone(self.server.transport._stall)
        return child, calls

    def test_stallTimerChecksEachCountAgainstItsOwnLimit(self) -> None:
        """A stall timer armed by large calls queued behind the answer (whose limit allows
        the largest message the peer accepts) that are then cancelled still drops a peer
        that reads nothing while more than bufferedBytes was written for it meanwhile."""
        child, large = self.largeCallsArmTheStallTimer()
        ahead = child.withOptions(ordered=False)
        small = [ahead.callRemote("ping", b"s" * 100) for _ in range(200)]  # 26 KB written
        for call in large + small:
            call.addErrback(lambda _: None)
        for call in large:
            call.cancel()
        with capturedLogs() as logs:
            self.clock.advance(31)
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertIn("stopped reading", logs[-1]["log_format"])
        # The count over its limit, and that limit (not the one the timer was armed with).
        self.assertEqual(logs[-1]["limit"], 8192)
        self.assertEqual(logs[-1]["count"], self.server.transport.bufferedWhilePaused)

    def overflowWhileTheStallTimerRuns(self, cancel: bool) -> list[Any]:
        """Large calls of the server's, queued behind its unread answer, arm the stall
        timer (``cancel``: and are cancelled unsent); then the client sends too much while
        the connection is full. The drops logged."""
        _child, calls = self.largeCallsArmTheStallTimer()
        for call in calls:
            call.addErrback(lambda _: None)
            if cancel:
                call.cancel()
        with capturedLogs() as logs:
            for _ in range(40):  # one-way calls: 20 KB
                self.root.callRemote("keep", "k" * 500, pbanswer=False)
                self.toServer()
        self.assertTrue(self.server.overflowing)
        return [log for log in logs if "stopped reading" in log["log_format"]]

    def test_overflowDropsWhileSomethingIsOverItsLimit(self) -> None:
        """A peer that overflows while the stall timer runs is dropped at once, and the log
        says what is over which limit."""
        drops = self.overflowWhileTheStallTimerRuns(cancel=False)
        self.assertTrue(self.serverTransport.disconnecting)
        self.assertEqual([(log["count"], log["limit"]) for log in drops], [(34000076, 33562624)])

    def test_overflowSparesAPeerOnceNothingIsOver(self) -> None:
        """Not once the large calls that armed the timer were cancelled unsent: nothing
        waits over its limit then."""
        self.assertEqual(self.overflowWhileTheStallTimerRuns(cancel=True), [])
        self.assertFalse(self.serverTransport.disconnecting)

    def test_ownCallsCountOnlyUntilTheConnectionTakesData(self) -> None:
        """What this side kept while the connection took no data stops counting once it
        takes some: counted again from nothing at the next moment it is full."""
        self.holdGauge()
        self.unreadBigAnswer()
        self.observeMany(30)  # about 6.8 KB
        self.server.transport.resumeProducing()  # the client read some of the answer
        self.assertTrue(self.server._largeOut)  # (not all: the calls are still kept)
        self.server.transport.pauseProducing()
        self.observeMany(30)
        self.assertIsNone(self.server.transport._stall)
        self.assertEqual(len(self.server._afterLarge), 60)
