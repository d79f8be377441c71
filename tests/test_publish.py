"""
Tests for pbroker.publish: what a publisher may set on the receiving copy, how whenReady
fails, and saving to a cache directory that cannot be written.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.cred.credentials import Anonymous
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.spread import pb as twistedPb
from twisted.spread import publish as twistedPublish
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pbroker import jelly, pb, publish
from pbroker.testing import connectedServerAndClient

TAG = b"tests.test_publish.Catalogue"


class Catalogue(publish.Publishable):
    """
    A pbroker publisher; ``entryExtras`` are added to its cache entry.
    """

    def __init__(self, publishedID: Any, state: Any = None, entryExtras: Any = None) -> None:
        super().__init__(publishedID)
        self.state = {"items": ["a", "b"]} if state is None else state
        self.entryExtras = entryExtras or {}
        self.fetches = 0

    def getTypeToCopy(self) -> bytes:
        return TAG

    def getStateToPublish(self) -> Any:
        self.fetches += 1
        if isinstance(self.state, Exception):
            raise self.state
        return self.state

    def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
        entry = super().getStateToCacheAndObserveFor(perspective, observer)
        entry.update(self.entryExtras)
        return entry


class StockCatalogue(twistedPublish.Publishable):
    """
    A stock Twisted publisher.
    """

    def __init__(self, publishedID: Any, state: Any) -> None:
        twistedPublish.Publishable.__init__(self, publishedID)
        self.state = state
        self.fetches = 0

    def getTypeToCopy(self) -> bytes:
        return TAG

    def getStateToPublish(self) -> Any:
        self.fetches += 1
        return self.state


class RemoteCatalogue(publish.RemotePublished):
    def __init__(self) -> None:
        self.items: list[Any] = []  # a published field's default

    def summary(self) -> str:
        return ",".join(self.items)


def shopFor(module: Any, published: Any) -> Any:
    class Shop(module.Root):
        def remote_catalogue(self) -> Any:
            return published

        def remote_listing(self) -> Any:
            return {"catalogue": published}

        def remote_find(self) -> None:
            return None

    return Shop()


class PublishTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = jelly.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(TAG, RemoteCatalogue)

    def connect(self, published: Any, stock: bool = False) -> tuple[Any, Any]:
        """
        A client connected to a server (a stock one if ``stock``) publishing ``published``.
        """
        module = twistedPb if stock else pb
        _server, client, pump = connectedServerAndClient(
            module.PBServerFactory(shopFor(module, published)),
            pb.PBClientFactory(registry=self.registry),
        )
        return client.remoteForName("root"), pump

    def call(self, published: Any, method: str = "catalogue", stock: bool = False) -> Any:
        """
        What ``whenReady`` gives for a call of ``method`` (a result or a Failure).
        """
        root, pump = self.connect(published, stock)
        results: list[Any] = []
        publish.whenReady(root.callRemote(method)).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(results), 1, "whenReady never fired")
        return results[0]

    def cacheIn(self, directory: str) -> None:
        self.patch(RemoteCatalogue, "cacheDirectory", directory)


class PeerCannotSetMachineryTests(PublishTestCase):
    """
    A publisher's cache entry and state set published fields, never the receiver's own
    settings or machinery.
    """

    def test_entryCannotChooseCacheDirectory(self) -> None:
        """A cacheDirectory in the cache entry is ignored (with a warning): nothing is
        written where the publisher asked."""
        target = self.mktemp()
        os.makedirs(target)
        published = Catalogue("x", entryExtras={"cacheDirectory": target, "isActivated": True})
        with capturedLogs() as events:
            remote = self.call(published)
        self.assertIsInstance(remote, RemoteCatalogue)
        self.assertIsNone(remote.cacheDirectory)
        self.assertIsNone(remote.getFileName())
        self.assertEqual(os.listdir(target), [])
        self.assertEqual(remote.items, ["a", "b"])
        self.assertEqual(published.fetches, 1)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("cacheDirectory", warnings[0]["names"])

    def test_stateCannotSetMachinery(self) -> None:
        """Names the class defines, private names and ``remote`` in a published state are
        ignored; the rest (and the protocol's fields) are installed."""
        target = self.mktemp()
        os.makedirs(target)
        hostile = {
            "cacheDirectory": target,
            "isActivated": False,
            "remote": "not a reference",
            "broker": None,
            "luid": 7,
            "_activationWaiters": None,
            "_fetchFailure": "x",
            "activated": "not callable",
            "getFileName": "x",
            "summary": "x",
            "__class__": "x",
        }
        state = {"items": ["tea"], "timestamp": 5.0, **hostile}
        with capturedLogs() as events:
            remote = self.call(Catalogue("x", state=state))
        self.assertIsInstance(remote, RemoteCatalogue)
        self.assertEqual(remote.items, ["tea"])
        self.assertEqual(remote.timestamp, 5.0)
        self.assertTrue(remote.isActivated)
        self.assertIsNone(remote.getFileName())
        self.assertEqual(os.listdir(target), [])
        self.assertEqual(remote.summary(), "tea")
        self.assertIsNotNone(remote.broker)
        self.assertTrue(callable(remote.remote.callRemote))
        for name, value in hostile.items():
            self.assertNotEqual(vars(remote).get(name, self), value, name)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("cacheDirectory", warnings[0]["names"])

    def test_stockPublisher(self) -> None:
        """A stock Twisted publisher's entry and state are accepted, and saved and reused
        where the receiver asks; a cacheDirectory in its state is ignored."""
        target = self.mktemp()
        os.makedirs(target)
        directory = self.mktemp()
        os.makedirs(directory)
        self.cacheIn(directory)
        published = StockCatalogue("spring", {"items": ["tea", "cake"], "cacheDirectory": target})
        with capturedLogs():
            first = self.call(published, stock=True)
        self.assertIsInstance(first, RemoteCatalogue)
        self.assertEqual(first.items, ["tea", "cake"])
        self.assertEqual(first.publishedID, "spring")
        self.assertEqual(first.timestamp, published.timestamp)
        self.assertEqual(first.cacheDirectory, directory)
        self.assertEqual(os.listdir(target), [])
        self.assertEqual(os.listdir(directory), ["None-None-spring.pub"])
        second = self.call(published, stock=True)
        self.assertEqual(second.items, ["tea", "cake"])
        self.assertTrue(second._wasCleanWhenLoaded)
        self.assertEqual(published.fetches, 1)


class ClassDefaultsTests(PublishTestCase):
    """
    Plain class attributes are defaults a publisher's values replace, as in Twisted.
    """

    def setUp(self) -> None:
        super().setUp()

        class Titled(RemoteCatalogue):
            title = "untitled"
            count = 0

        self.registry.setUnjellyableForClass(TAG, Titled)

    def test_stockPublisherReplacesClassDefaults(self) -> None:
        """A stock publisher's state sets fields the receiving class gives defaults."""
        remote = self.call(StockCatalogue("x", {"title": "Spring", "count": 42}), stock=True)
        self.assertEqual((remote.title, remote.count), ("Spring", 42))

    def test_entryExtras(self) -> None:
        """Fields a publisher adds to its cache entry are set, as in Twisted, except the
        receiver's own."""
        with capturedLogs() as events:
            remote = self.call(
                Catalogue("x", entryExtras={"title": "Summer", "cacheDirectory": "/tmp"})
            )
        self.assertEqual(remote.title, "Summer")
        self.assertIsNone(remote.cacheDirectory)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)


class WhenReadyFailsTests(PublishTestCase):
    """
    whenReady fails, with a precise error, whenever the state will not arrive.
    """

    def test_callReturnsNone(self) -> None:
        """A call that returns None (not found) fails whenReady with TypeError."""
        failure = self.call(Catalogue("x"), method="find")
        failure.trap(TypeError)
        self.assertIn("not None", failure.getErrorMessage())

    def test_connectionClosedWhileFetching(self) -> None:
        """A connection closed while a copy no one waits on (through whenReady) fetches its
        state is noted as information, not logged as a failure with a traceback; a copy
        someone waits on fails them, as before."""
        root, pump = self.connect(Catalogue("x", state=defer.Deferred()))
        got: list[Any] = []
        root.callRemote("catalogue").addBoth(got.append)
        pump.flush()
        self.assertIsInstance(got[0], RemoteCatalogue)
        with capturedLogs() as events:
            root.broker.transport.loseConnection()
            pump.flush()
        self.assertEqual([e for e in events if "log_failure" in e], [])
        [event] = [e for e in events if e["log_format"].startswith("A published state")]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertIn("not fetched", formatEvent(event))
        root, pump = self.connect(Catalogue("x", state=defer.Deferred()))
        waiting: list[Any] = []
        publish.whenReady(root.callRemote("catalogue")).addBoth(waiting.append)
        pump.flush()
        root.broker.transport.loseConnection()
        pump.flush()
        waiting[0].trap(pb.PBConnectionLost)

    def test_notADeferred(self) -> None:
        """whenReady given what is not a call's Deferred (the None of a one-way call, say)
        raises TypeError at once, naming it."""
        with self.assertRaises(TypeError) as caught:
            publish.whenReady(None)  # type: ignore[arg-type]
        self.assertEqual(
            str(caught.exception), "whenReady() takes the Deferred of a call, not None"
        )

    def test_stateNotADict(self) -> None:
        """A published state that is not a dictionary fails whenReady with
        PublishedStateError, not an unhandled error."""
        failure = self.call(Catalogue("x", state=["not", "a", "dict"]))
        failure.trap(publish.PublishedStateError)
        self.assertIn("['not', 'a', 'dict']", failure.getErrorMessage())

    def test_entryNotADict(self) -> None:
        """A cache entry that is not a dictionary fails whenReady with PublishedStateError."""

        class Broken(Catalogue):
            def getStateToCacheAndObserveFor(self, perspective: Any, observer: Any) -> Any:
                return ["entry"]

        with capturedLogs():
            failure = self.call(Broken("x"))
        self.flushLoggedErrors(publish.PublishedStateError)
        failure.trap(publish.PublishedStateError)
        self.assertIn("cache entry", failure.getErrorMessage())

    def test_entryWithoutRemote(self) -> None:
        """A cache entry without a field fails whenReady with PublishedStateError naming it."""
        published = Catalogue("x")
        self.patch(
            Catalogue,
            "getStateToCacheAndObserveFor",
            lambda self, perspective, observer: {"publishedID": "x", "timestamp": 1.0},
        )
        with capturedLogs():
            failure = self.call(published)
        self.flushLoggedErrors(publish.PublishedStateError)
        failure.trap(publish.PublishedStateError)
        self.assertIn("remote", failure.getErrorMessage())

    def test_remoteNotAReference(self) -> None:
        """A cache entry whose remote is not a reference fails whenReady with
        PublishedStateError naming what it is."""
        self.patch(
            Catalogue,
            "getStateToCacheAndObserveFor",
            lambda self, perspective, observer: {"remote": 5, "publishedID": "x"},
        )
        with capturedLogs():
            failure = self.call(Catalogue("x"))
        self.flushLoggedErrors(publish.PublishedStateError)
        failure.trap(publish.PublishedStateError)
        self.assertEqual(
            failure.getErrorMessage(),
            "the 'remote' of a published object's cache entry must be a reference, not 5",
        )

    def test_publisherWithoutState(self) -> None:
        """A Publishable that does not override getStateToPublish fails whenReady with the
        NotImplementedError its publisher raised."""

        class Bare(publish.Publishable):
            def getTypeToCopy(self) -> bytes:
                return TAG

        with capturedLogs():
            failure = self.call(Bare("x"))
        self.flushLoggedErrors(NotImplementedError)
        self.assertTrue(failure.check(NotImplementedError))
        self.assertEqual(failure.getErrorMessage(), "Bare.getStateToPublishFor")

    def test_askedAfterTheFetchFailed(self) -> None:
        """whenReady asked after the state fetch failed fails with that error."""
        root, pump = self.connect(Catalogue("x", state=ValueError("not now")))
        listings: list[Any] = []
        root.callRemote("listing").addCallback(listings.append)
        with capturedLogs():
            pump.flush()
        self.flushLoggedErrors(ValueError)
        remote = listings[0]["catalogue"]
        failures: list[Any] = []
        publish.whenReady(defer.succeed(remote)).addErrback(failures.append)
        self.assertEqual(len(failures), 1)
        failures[0].trap(ValueError)
        self.assertIn("not now", failures[0].getErrorMessage())


class ActivationTests(PublishTestCase):
    """
    What a receiver learns once the full state is here.
    """

    def test_listenersCalledOnceActivated(self) -> None:
        """callWhenActivated before the state arrives calls back once it has, in order; one
        that raises is logged and the others still run; after, it calls back at once."""
        root, pump = self.connect(Catalogue("x"))
        listings: list[Any] = []
        root.callRemote("listing").addCallback(listings.append)
        root.callRemote("listing").addCallback(listings.append)
        # The first answer arrives; the state is fetched by a call of its own.
        called: list[Any] = []

        def failing(remote: Any) -> None:
            called.append("failing")
            raise RuntimeError("listener failed")

        pump.pump()
        pump.pump()
        remote = listings[0]["catalogue"]
        self.assertFalse(remote.isActivated)
        remote.callWhenActivated(lambda r: called.append(("first", r.items)))
        remote.callWhenActivated(failing)
        remote.callWhenActivated(lambda r: called.append(("last", r is remote)))
        with capturedLogs() as events:
            pump.flush()
        self.assertEqual(called, [("first", ["a", "b"]), "failing", ("last", True)])
        self.assertTrue(
            any("Error in the activation callback" in e.get("log_format", "") for e in events)
        )
        self.assertEqual(
            [f.getErrorMessage() for f in self.flushLoggedErrors(RuntimeError)],
            ["listener failed"],
        )
        remote.callWhenActivated(lambda r: called.append("now"))
        self.assertEqual(called[-1], "now")

    def test_stateKeysOfOtherPeers(self) -> None:
        """A published state's bytes keys (a Python 2 publisher's) are decoded; keys that
        are not text are ignored with a warning naming them."""
        with capturedLogs() as events:
            remote = self.call(Catalogue("x", state={b"items": ["c"], 5: "five"}))
        self.assertEqual(remote.items, ["c"])
        [warning] = [e for e in events if "Ignored" in e.get("log_format", "")]
        self.assertEqual((warning["names"], warning["source"]), ("[5]", "published state"))


class ChatService:
    serviceName = "chat"


class OldStyleAvatar(pb.Avatar):
    """
    An avatar of the old perspective API (a perspectiveName and a getService).
    """

    perspectiveName = "alice"

    def __init__(self, published: Any) -> None:
        self.published = published

    def getService(self) -> ChatService:
        return ChatService()

    def perspective_catalogue(self) -> Any:
        return self.published


class PerspectiveCatalogue(Catalogue):
    """
    A publisher that records who its state is published to.
    """

    def getStateToPublishFor(self, perspective: Any) -> Any:
        self.publishedTo = perspective
        return super().getStateToPublishFor(perspective)


class PublishedToAvatarTests(PublishTestCase):
    """
    A publisher sent from an avatar: its cache entry names the perspective and service where
    the avatar has the old perspective API, and its state is fetched for that avatar.
    """

    def callAvatar(self, avatar: Any) -> Any:
        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                return pb.IPerspective, avatar, lambda: None

        clientFactory = pb.PBClientFactory(registry=self.registry)
        _server, _client, pump = connectedServerAndClient(
            pb.PBServerFactory(Portal(Realm(), [AllowAnonymousAccess()])), clientFactory
        )
        results: list[Any] = []
        clientFactory.login(Anonymous()).addCallback(
            lambda perspective: publish.whenReady(perspective.callRemote("catalogue"))
        ).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(results), 1, "whenReady never fired")
        return results[0]

    def test_oldPerspectiveAPI(self) -> None:
        """The entry names the avatar's perspectiveName and its service's serviceName, and
        the state is saved under them."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.cacheIn(directory)
        published = PerspectiveCatalogue("spring")
        avatar = OldStyleAvatar(published)
        remote = self.callAvatar(avatar)
        self.assertEqual((remote.perspective, remote.service), ("alice", "chat"))
        self.assertEqual(remote.items, ["a", "b"])
        self.assertIs(published.publishedTo, avatar)
        self.assertEqual(os.listdir(directory), ["chat-alice-spring.pub"])

    def test_avatarWithoutThem(self) -> None:
        """An avatar without perspectiveName or getService is named "None", as no avatar
        is (stock Twisted fails to send the publisher at all)."""

        class Avatar(pb.Avatar):
            def perspective_catalogue(self) -> Any:
                return published

        published = PerspectiveCatalogue("spring")
        avatar = Avatar()
        remote = self.callAvatar(avatar)
        self.assertEqual((remote.perspective, remote.service), ("None", "None"))
        self.assertIs(published.publishedTo, avatar)


class UnwritableCacheTests(PublishTestCase):
    """
    A cache that cannot be written is one warning; the object still works.
    """

    def assertOneWarning(self, published: Any, directory: str) -> None:
        self.cacheIn(directory)
        with capturedLogs() as events:
            remote = self.call(published)
        self.assertIsInstance(remote, RemoteCatalogue)
        self.assertEqual(remote.items, ["a", "b"])
        self.assertEqual([e for e in events if "log_failure" in e], [])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn(os.path.basename(remote.getFileName()), warnings[0]["error"])

    def test_missingDirectory(self) -> None:
        """A cacheDirectory that does not exist."""
        self.assertOneWarning(Catalogue("x"), self.mktemp())

    def test_nameTooLong(self) -> None:
        """A publishedID too long for a file name is saved under its start and a digest of
        the whole, and read back."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.cacheIn(directory)
        published = Catalogue("x" * 300)
        with capturedLogs() as events:
            self.assertEqual(self.call(published).items, ["a", "b"])
            self.assertEqual(self.call(published).items, ["a", "b"])
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])
        self.assertEqual(published.fetches, 1)
        [name] = os.listdir(directory)
        self.assertTrue(name.startswith("None-None-xxx"), name)
        self.assertLessEqual(len(name), 204)

    def test_loadedStateNotRewritten(self) -> None:
        """A state loaded from the cache is not written again."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.cacheIn(directory)
        published = Catalogue("x")
        fileName = self.call(published).getFileName()
        os.utime(fileName, ns=(0, 0))
        self.assertEqual(self.call(published).items, ["a", "b"])
        self.assertEqual(published.fetches, 1)
        self.assertEqual(os.stat(fileName).st_mtime_ns, 0)


class SharedPartsFromThePublisherTests(PublishTestCase):
    """
    A publisher's id or timestamp whose lists share their parts (jelly keeps them shared):
    ``str()`` and ``==`` go through each appearance, so a saved state's file is neither
    named with ``str()`` of such an id nor checked with ``==`` on such a timestamp.
    """

    def sharedLists(self, depth: int) -> list[Any]:
        value: list[Any] = [1]
        for _ in range(depth):
            value = [value, value]
        return value

    def test_sharedID(self) -> None:
        self.cacheIn(self.mktemp())
        os.mkdir(RemoteCatalogue.cacheDirectory)  # type: ignore[arg-type]
        with capturedLogs() as events:
            remote = self.call(Catalogue(self.sharedLists(20)))
        self.assertEqual(remote.items, ["a", "b"])
        self.assertEqual(os.listdir(RemoteCatalogue.cacheDirectory), [])  # type: ignore[arg-type]
        [warning] = [e for e in events if "has no file name" in str(e.get("error"))]
        self.assertLess(len(warning["error"]), 300)

    def test_sharedTimestamp(self) -> None:
        self.cacheIn(self.mktemp())
        os.mkdir(RemoteCatalogue.cacheDirectory)  # type: ignore[arg-type]
        for _ in range(2):  # saved, then checked against what is saved
            published = Catalogue("c")
            published.timestamp = self.sharedLists(20)  # type: ignore[assignment]
            remote = self.call(published)
            self.assertEqual(remote.items, ["a", "b"])
            self.assertEqual(published.fetches, 1)

    def test_timestampOfAnotherType(self) -> None:
        """A publisher's own timestamp of another type than time.time()'s (a version
        tuple) still lets a saved state be used."""
        self.cacheIn(self.mktemp())
        os.mkdir(RemoteCatalogue.cacheDirectory)  # type: ignore[arg-type]
        published = Catalogue("v")
        published.timestamp = (2, 1)  # type: ignore[assignment]
        self.call(published)
        second = self.call(published)
        self.assertEqual(second.items, ["a", "b"])
        self.assertTrue(second._wasCleanWhenLoaded)
        self.assertEqual(published.fetches, 1)


class Point(pb.Copyable):
    def __init__(self, x: int = 0) -> None:
        self.x = x


class SavedFileTests(PublishTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.cacheIn(self.directory)

    def test_distinctNamesDistinctFiles(self) -> None:
        """Published objects whose names differ only in characters a file name cannot hold
        are saved apart (names used to share a file: "price list" and "price_list"), and
        an object saved under equal timestamps is not given another's state."""
        first = Catalogue("price list", state={"items": ["first"]})
        second = Catalogue("price_list", state={"items": ["second"]})
        first.timestamp = second.timestamp = 1  # version 1 of each
        self.assertEqual(self.call(first).items, ["first"])
        copy = self.call(second)
        self.assertEqual(
            (copy.publishedID, copy.items, second.fetches), ("price_list", ["second"], 1)
        )
        self.assertEqual(
            sorted(os.listdir(self.directory)),
            ["None-None-price%20list.pub", "None-None-price_list.pub"],
        )
        named = []
        for names in (("s", "p-q", "r"), ("s", "p", "q-r")):  # the joining "-" is escaped too
            remote = RemoteCatalogue()
            remote.service, remote.perspective, remote.publishedID = names
            remote.cacheDirectory = self.directory
            named.append(remote.getFileName())
        self.assertNotEqual(named[0], named[1])
        remote = RemoteCatalogue()
        remote.service, remote.perspective, remote.publishedID = None, None, "x" * 1000
        remote.cacheDirectory = self.directory
        name = os.path.basename(remote.getFileName() or "")
        self.assertLessEqual(len(name), 204)  # long names end in a digest
        remote.publishedID = "x" * 999 + "y"
        self.assertNotEqual(os.path.basename(remote.getFileName() or ""), name)

    def test_savedStateNotReadBackIsSaid(self) -> None:
        """A saved state that cannot be read back (a copy in it, of a class the security
        options do not allow as itself) is fetched again, with a warning that says why."""
        self.registry.setUnjellyableForClass(Point, pb.RemoteCopy)
        catalogue = Catalogue("points", state={"items": [Point(3)]})
        self.call(catalogue)
        with capturedLogs() as events:
            again = self.call(catalogue)
        self.assertEqual((again.items[0].x, catalogue.fetches), (3, 2))
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn(
            "Not using the saved state of published object 'points'", formatEvent(warning)
        )
