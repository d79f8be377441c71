"""
Tests for pbroker.util (paging, local stand-ins for references) and pbroker.publish.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.spread import pb as twistedPb
from twisted.spread import util as twistedUtil
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface, implementer

from pbroker import jelly, pb, publish, util
from pbroker.errors import LimitExceeded, PBConnectionLost
from pbroker.testing import connectedServerAndClient
from tests.test_broker import connect

BIG = bytes(range(256)) * 4096  # 1 MiB: more than PB's 640 KiB string limit


def pagingRoot(module: Any, utilModule: Any) -> Any:
    class PagingRoot(module.Root):
        def remote_sendString(self, collector: Any, chunkSize: int) -> None:
            utilModule.StringPager(collector, BIG, chunkSize)

        def remote_sendFile(self, collector: Any) -> None:
            utilModule.FilePager(collector, io.BytesIO(BIG))

    return PagingRoot()


class PagingTestsMixin:
    serverModule: Any
    serverUtil: Any
    clientModule: Any
    clientUtil: Any
    clientOptions: dict[str, Any] = {}

    def setUp(self) -> None:
        self.server, self.client, self.pump = connect(
            self.serverModule.PBServerFactory(pagingRoot(self.serverModule, self.serverUtil)),
            self.clientModule.PBClientFactory(**self.clientOptions),
        )
        self.root = self.client.remoteForName("root")

    def collect(self, *args: Any) -> bytes:
        results: list[Any] = []
        self.clientUtil.getAllPages(self.root, *args).addBoth(results.append)
        for _ in range(10_000):
            if results:
                break
            self.pump.pump()
        self.assertEqual(len(results), 1)  # type: ignore[attr-defined]
        return b"".join(results[0])

    def test_stringPagerBeyondSizeLimit(self) -> None:
        """A megabyte travels in pages through a StringPager, whole and in order."""
        self.assertEqual(self.collect("sendString", 8192), BIG)  # type: ignore[attr-defined]

    def test_filePager(self) -> None:
        """A file travels in pages through a FilePager."""
        self.assertEqual(self.collect("sendFile"), BIG)  # type: ignore[attr-defined]


class PbrokerPagingTests(PagingTestsMixin, SynchronousTestCase):
    serverModule, serverUtil, clientModule, clientUtil = pb, util, pb, util


class PbrokerPbDialectPagingTests(PagingTestsMixin, SynchronousTestCase):
    serverModule, serverUtil, clientModule, clientUtil = pb, util, pb, util
    clientOptions = {"dialects": [b"pb"]}


class PbrokerServerTwistedClientPagingTests(PagingTestsMixin, SynchronousTestCase):
    serverModule, serverUtil, clientModule, clientUtil = pb, util, twistedPb, twistedUtil


class TwistedServerPbrokerClientPagingTests(PagingTestsMixin, SynchronousTestCase):
    serverModule, serverUtil, clientModule, clientUtil = twistedPb, twistedUtil, pb, util


class PagerTests(SynchronousTestCase):
    def test_chunkSizeMustBePositive(self) -> None:
        """A StringPager needs a positive chunk size."""
        with self.assertRaises(ValueError):
            util.StringPager(object(), b"x", chunkSize=0)

    def test_argumentsChecked(self) -> None:
        """A chunk size that is not an integer (or a callback given in its place), a string
        that is not one, and a callback that cannot be called are refused when the pager or
        collector is made, naming them, rather than at the first page or the end."""
        for make, message in (
            (lambda: util.StringPager(object(), b"x", 2.5), "chunkSize must be an integer"),
            (lambda: util.StringPager(object(), b"x", print), "chunkSize must be an integer"),
            (lambda: util.StringPager(object(), None), "pages a byte string, not NoneType"),
            (lambda: util.StringPager(object(), b"x", 8, "done"), "callback must be callable"),
            (lambda: util.FilePager(object(), io.BytesIO(), "done"), "callback must be callable"),
            (lambda: util.CallbackPageCollector(5), "needs a callable, not 5"),
            (lambda: util.CallbackPageCollector(print, 5), "errback must be callable"),
        ):
            with self.assertRaises(TypeError) as caught:
                make()
            self.assertIn(message, str(caught.exception))

    def test_callbackAfterLastPage(self) -> None:
        """The pager's callback runs with its arguments once the last page is sent."""
        done: list[Any] = []

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                util.StringPager(collector, b"abc", 1, done.append, "finished")

        _server, client, pump = connect(pb.PBServerFactory(MyRoot()), pb.PBClientFactory())
        pages: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(pages.append)
        for _ in range(100):
            pump.pump()
        self.assertEqual(pages, [[b"a", b"b", b"c"]])
        self.assertEqual(done, ["finished"])

    def test_nothingTakenAfterTheEnd(self) -> None:
        """Pages a peer sends after it ended paging are not taken: the list given stays as it
        was given, and a second end or a failure changes nothing."""

        class Hostile(pb.Root):
            def remote_send(self, collector: Any) -> None:
                collector.callRemote("gotPage", b"a")
                collector.callRemote("endedPaging")
                for page in (b"b", b"c"):
                    collector.callRemote("gotPage", page)
                collector.callRemote("endedPaging")
                collector.callRemote("failedPaging", "x", "y")

        _server, client, pump = connect(pb.PBServerFactory(Hostile()), pb.PBClientFactory())
        pages: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(pages.append)
        pump.flush()
        self.assertEqual(pages, [[b"a"]])

    def test_pagesWaitWhileTheConnectionIsFull(self) -> None:
        """No page is sent while the transport has paused the broker; they go on after."""
        done: list[Any] = []

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                # The connection fills as the method runs (a paused broker handles no more
                # of the peer's messages, so it cannot be paused before the call).
                server.transport.pauseProducing()
                self.pager = util.StringPager(collector, b"abcdef", 1, done.append, "done")

        root = MyRoot()
        server, client, pump = connect(pb.PBServerFactory(root), pb.PBClientFactory())
        pages: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(pages.append)
        pump.flush()
        self.assertEqual((pages, done), ([], []))
        self.assertEqual(root.pager.pointer, 0)
        server.transport.resumeProducing()
        pump.flush()
        self.assertEqual(pages, [[b"a", b"b", b"c", b"d", b"e", b"f"]])
        self.assertEqual(done, ["done"])

    def test_filePagerWhileTheConnectionIsFull(self) -> None:
        """A FilePager started on a full connection reads no further than one page ahead
        while it waits; once resumed, the file arrives whole and in order, then the end and
        the pager's callback."""
        data = bytes(range(256)) * 200  # 51,200 bytes: four reads
        done: list[Any] = []
        source = io.BytesIO(data)

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()
                self.pager = util.FilePager(collector, source, done.append, "done")

        server, client, pump = connect(pb.PBServerFactory(MyRoot()), pb.PBClientFactory())
        pages: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(pages.append)
        pump.flush()
        self.assertEqual((pages, done, source.tell()), ([], [], 16384))
        server.transport.resumeProducing()
        pump.flush()
        self.assertEqual([len(page) for page in pages[0]], [16384, 16384, 16384, 2048])
        self.assertEqual(b"".join(pages[0]), data)
        self.assertEqual(done, ["done"])
        self.assertEqual(server.pageProducers, [])

    def test_pagersStopWhenTheConnectionIsLost(self) -> None:
        """Lost while pagers wait for a full connection: the broker lets go of them, a
        FilePager stops reading its file (its reader's Deferred fires), nothing is logged
        and no pager's callback runs."""
        done: list[Any] = []
        source = io.BytesIO(bytes(200_000))

        class MyRoot(pb.Root):
            def remote_send(self, forFile: Any, forString: Any) -> None:
                server.transport.pauseProducing()
                self.filePager = util.FilePager(forFile, source, done.append, "file")
                self.stringPager = util.StringPager(forString, b"s" * 100, 1, done.append, "s")

        root = MyRoot()
        server, client, pump = connect(pb.PBServerFactory(root), pb.PBClientFactory())
        results: list[Any] = []
        collectors = [util.CallbackPageCollector(results.append, results.append) for _ in range(2)]
        client.remoteForName("root").callRemote("send", *collectors)
        pump.flush()
        self.assertEqual(len(server.pageProducers), 2)
        self.assertEqual(source.tell(), 16384)  # one page read ahead, waiting
        with capturedLogs() as events:
            server.transport.abortConnection()
            pump.flush()
        self.assertEqual(server.pageProducers, [])
        self.assertTrue(root.filePager.deferred.called)
        self.assertIsNone(root.filePager.producer)
        self.assertEqual(source.tell(), 16384)
        self.assertEqual(done, [])
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.error], [])
        self.assertEqual(results, [])  # the collectors never hear the end

    def test_filePagerPageRefusedAfterReading(self) -> None:
        """A FilePager whose last page cannot be sent (over the peer's message limit), once
        the file is read, tells the collector: the collection fails, the connection stays."""

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()
                self.pager = util.FilePager(collector, io.BytesIO(b"f" * 8000))

        limits = pb.BrokerLimits(messageSize=4096)
        server, client, pump = connect(
            pb.PBServerFactory(MyRoot()), pb.PBClientFactory(limits=limits)
        )
        results: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
        pump.flush()
        with capturedLogs() as events:
            server.transport.resumeProducing()
            pump.flush()
        self.assertTrue(any("A pager failed" in str(e.get("log_format")) for e in events))
        self.flushLoggedErrors()
        results[0].trap(pb.RemoteError)
        self.assertIn("the pager failed", results[0].getErrorMessage())
        self.assertEqual(server.pageProducers, [])
        self.assertFalse(server.disconnected)

    def test_pagerWithoutNextPage(self) -> None:
        """A Pager subclass that does not implement nextPage fails where it is made, naming
        itself, and is dropped."""

        class Bare(util.Pager):
            pass

        errors: list[str] = []

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                try:
                    Bare(collector)
                except NotImplementedError as e:
                    errors.append(str(e))
                    raise

        server, client, pump = connect(pb.PBServerFactory(MyRoot()), pb.PBClientFactory())
        results: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
        pump.flush()
        self.flushLoggedErrors(NotImplementedError)
        self.assertEqual(errors, ["Bare must implement nextPage()"])
        self.assertTrue(results[0].check(NotImplementedError))
        self.assertEqual(server.pageProducers, [])

    def test_collectorWithoutErrback(self) -> None:
        """A collector without an errback, told the pager failed, neither calls back nor
        takes later pages."""
        called: list[Any] = []
        collector = util.CallbackPageCollector(called.append)
        collector.remote_gotPage(b"a")
        collector.remote_failedPaging("builtins.OSError", "gone")
        collector.remote_gotPage(b"b")
        collector.remote_endedPaging()
        self.assertEqual((called, collector.pages, collector.done), ([], [b"a"], True))

    def test_unsendablePageAfterResume(self) -> None:
        """A page that cannot be sent once paging resumes (too large for the peer) stops
        that pager with a log line; it does not raise into the transport, and the
        connection stays."""

        class BigSecondPage(util.Pager):
            count = 0

            def nextPage(self) -> Any:
                self.count += 1
                if self.count == 2:
                    self.stopPaging()
                    return b"x" * 200_000  # over the client's message limit
                return b"page"

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()  # the pages wait
                self.pager = BigSecondPage(collector)

        root = MyRoot()
        limits = pb.BrokerLimits(messageSize=100_000)
        server, client, pump = connect(pb.PBServerFactory(root), pb.PBClientFactory(limits=limits))
        results: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
        pump.flush()
        with capturedLogs() as events:
            server.transport.resumeProducing()  # what the transport does as its buffer drains
            pump.flush()
        self.assertTrue(any("A pager failed" in str(e.get("log_format")) for e in events))
        self.flushLoggedErrors()
        self.assertEqual(server.pageProducers, [])
        self.assertFalse(server.disconnected)
        # The collector was told, so the collection fails instead of waiting for ever.
        results[0].trap(pb.RemoteError)
        self.assertIn("the pager failed", results[0].getErrorMessage())

    def collectFrom(self, pager: Any, **options: Any) -> tuple[Any, list[Any]]:
        """
        getAllPages from a root whose ``send`` starts ``pager(collector)``; the server and
        the outcome.
        """

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                self.pager = pager(collector)

        clock = Clock()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(MyRoot(), clock=clock),
            pb.PBClientFactory(clock=clock),
            clock=clock,
            **options,
        )
        results: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
        for _ in range(1000):
            if results:
                break
            pump.pump()
            clock.advance(0)
        return server, results

    def pagedThrough(
        self, pager: Any, dialects: list[bytes] | None
    ) -> tuple[Any, list[Any], list[Exception]]:
        """
        getAllPages from a root whose ``send`` starts ``pager(collector, broker)``, in the
        given dialects, through transports that push back past 64 KiB (so the pager's end
        comes from a later round, run by the transport's resume); the server, the outcome,
        and what escaped the brokers into the transport.
        """

        class MyRoot(pb.Root):
            def rootObject(self, broker: Any) -> Any:
                self.broker = broker
                return self

            def remote_send(self, collector: Any) -> None:
                pager(collector, self.broker)

        clock = Clock()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(MyRoot(), clock=clock),
            pb.PBClientFactory(clock=clock, dialects=dialects),
            clock=clock,
            bufferSize=64 * 1024,
        )
        results: list[Any] = []
        escaped: list[Exception] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
        for _ in range(1000):
            if results and not pump.clientIO.stream and not pump.serverIO.stream:
                break
            try:
                pump.pump()
            except Exception as e:
                escaped.append(e)
            clock.advance(0)
        return server, results, escaped

    def test_raisingPagerCallback(self) -> None:
        """A pager's callback that raises at the end is logged, in either dialect: it runs
        once, nothing escapes into the transport, the pager is let go, and the collector
        has every page."""
        for dialects in (None, [b"pb"]):
            calls: list[str] = []
            with capturedLogs() as events:
                server, results, escaped = self.pagedThrough(
                    functools.partial(_raisingPager, calls=calls), dialects
                )
            self.assertEqual((escaped, calls, server.pageProducers), ([], ["done"], []))
            self.assertEqual(b"".join(results[0]), BIG)
            self.assertEqual(
                [e["log_format"] for e in events if "log_failure" in e],
                ["Error at the end of a pager (in its callback?)"],
            )
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_pagerCallbackDroppingTheConnection(self) -> None:
        """A pager's callback that drops the connection (as an application may) leaves the
        broker's loop without an error, in either dialect."""
        for dialects in (None, [b"pb"]):
            with capturedLogs() as events:
                server, _results, escaped = self.pagedThrough(
                    lambda c, broker: util.StringPager(
                        c, BIG, 8192, broker.connectionLost, Failure(ConnectionDone())
                    ),
                    dialects,
                )
            self.assertEqual((escaped, server.pageProducers), ([], []))
            self.assertTrue(server.disconnected)
            self.assertEqual([e for e in events if "log_failure" in e], [])

    def test_stringPagerOfAnMmap(self) -> None:
        """A StringPager pages anything sliced as bytes are, as stock's does: an mmap."""
        with mmap.mmap(-1, len(BIG)) as mapped:
            mapped.write(BIG)
            _server, results, escaped = self.pagedThrough(
                lambda c, broker: util.StringPager(c, mapped, 65536), None
            )
        self.assertEqual((escaped, b"".join(results[0])), ([], BIG))

    def test_pagerCallbackDroppingTheConnectionBeforeAnother(self) -> None:
        """When one pager's callback drops the connection, the pagers after it in that round
        are not asked for pages on the lost connection (which would fail them, logged)."""

        def twoPagers(collector: Any, broker: Any) -> None:
            lost = Failure(ConnectionDone())
            util.StringPager(collector, BIG, 65536, broker.connectionLost, lost)
            util.StringPager(collector, BIG, 65536)

        with capturedLogs() as events:
            server, _results, escaped = self.pagedThrough(twoPagers, None)
        self.assertEqual((escaped, server.pageProducers), ([], []))
        self.assertTrue(server.disconnected)
        self.assertEqual([e["log_format"] for e in events if "log_failure" in e], [])

    def test_filePagerFailingAtOnce(self) -> None:
        """A FilePager whose file fails at its first read raises to the method that makes
        it, which fails, and is not left registered on the broker."""
        for dialects in (None, [b"pb"]):
            with capturedLogs():
                server, results, escaped = self.pagedThrough(
                    lambda c, broker: util.FilePager(c, _Unreadable()), dialects
                )
            self.assertEqual((escaped, server.pageProducers), ([], []))
            self.assertIsInstance(results[0], Failure)
            self.assertIn("disk gone", results[0].getErrorMessage())
            self.flushLoggedErrors(OSError)

    def test_largePagesKeepTheirOrder(self) -> None:
        """In the native dialect, pages too large for one record are sent in fragments: the
        small pages after them wait, and the end comes after the last, so the collector
        gets every page in order."""
        sizes = [3_000_000, 10, 20, 2_000_000, 30, 1_500_000]

        class Sizes(util.Pager):
            def __init__(self, collector: Any) -> None:
                self.index = 0
                super().__init__(collector)

            def nextPage(self) -> bytes:
                page = bytes([self.index]) * sizes[self.index]
                self.index += 1
                if self.index == len(sizes):
                    self.stopPaging()
                return page

        for bufferSize in (None, 64 * 1024):
            server, results = self.collectFrom(Sizes, bufferSize=bufferSize)
            self.assertTrue(server.isNative)
            self.assertEqual([(page[0], len(page)) for page in results[0]], list(enumerate(sizes)))
            self.assertEqual(server.pageProducers, [])

    def test_pagerThatRaises(self) -> None:
        """A pager whose nextPage raises mid-transfer tells the collector: the collection
        fails with RemoteError naming the error, and the connection stays."""

        class Failing(util.Pager):
            count = 0

            def nextPage(self) -> bytes:
                self.count += 1
                if self.count == 3:
                    raise RuntimeError("the source failed")
                return b"page"

        with capturedLogs():
            server, results = self.collectFrom(Failing, bufferSize=8)
        results[0].trap(pb.RemoteError)
        self.assertIn("the source failed", results[0].getErrorMessage())
        self.assertEqual(results[0].value.remoteType, "builtins.RuntimeError")
        self.assertFalse(server.disconnected)
        self.flushLoggedErrors(RuntimeError)

    def test_fileThatFailsToRead(self) -> None:
        """A FilePager whose file fails to read tells the collector why (not that the
        transfer ended), and stops reading."""

        class FailingFile(io.BytesIO):
            reads = 0

            def read(self, size: int | None = -1) -> bytes:
                self.reads += 1
                if self.reads == 3:
                    raise OSError("disk read error")
                return super().read(size)

        source = FailingFile(BIG)
        with capturedLogs():
            server, results = self.collectFrom(lambda c: util.FilePager(c, source), bufferSize=8)
        results[0].trap(pb.RemoteError)
        self.assertIn("disk read error", results[0].getErrorMessage())
        self.assertEqual(source.reads, 3)
        self.assertEqual(server.pageProducers, [])
        self.flushLoggedErrors(OSError)

    def fallingBack(self, makePager: Any, data: bytes) -> list[Any]:
        """
        getAllPages from a method that makes a pager with ``makePager(collector)`` and, if
        that raises LimitExceeded, sends ``data`` in 50 KB pages instead, to a client that
        takes messages up to 100 KB; what getAllPages gave.
        """

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> str:
                try:
                    makePager(collector)
                except LimitExceeded:
                    util.StringPager(collector, data, 50_000)
                    return "fell back"
                return "sent"

        limits = pb.BrokerLimits(messageSize=100_000)
        _server, client, pump = connect(
            pb.PBServerFactory(MyRoot()), pb.PBClientFactory(limits=limits)
        )
        results: list[Any] = []
        with capturedLogs():
            util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
            pump.flush()
        return results

    def test_firstPageRefusedThenSmallerPages(self) -> None:
        """A method that handles the error of a pager whose first page is too large, and
        falls back to smaller pages, gets its data through: the collector is not told of a
        failure its caller handled."""
        data = b"d" * 300_000
        results = self.fallingBack(
            lambda collector: util.StringPager(collector, data, 200_000), data
        )
        self.assertEqual(b"".join(results[0]), data)

    def test_laterPageRefusedWhileStarting(self) -> None:
        """A page after the first that cannot be sent, while the pager is being made, is the
        collector's business: getAllPages fails, instead of the method taking it for a first
        page refused and sending the data again."""

        class Uneven(util.Pager):
            sizes = [10_000, 200_000, 10_000]

            def nextPage(self) -> bytes:
                page = b"p" * self.sizes.pop(0)
                if not self.sizes:
                    self.stopPaging()
                return page

        results = self.fallingBack(Uneven, b"q" * 220_000)
        results[0].trap(pb.RemoteError)
        self.flushLoggedErrors()

    def test_callFailingAfterItsPagerEnded(self) -> None:
        """A method that starts a pager and then raises fails getAllPages with its error;
        the pager's end, arriving later, is not an error of its own."""

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()  # the error goes first, the pages wait
                util.StringPager(collector, b"abc", 1)
                raise ValueError("failed after starting the pager")

        server, client, pump = connect(pb.PBServerFactory(MyRoot()), pb.PBClientFactory())
        results: list[Any] = []
        with capturedLogs():
            util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
            pump.flush()
            self.assertTrue(results[0].check(ValueError))
            server.transport.resumeProducing()
            pump.flush()
        self.assertEqual(len(results), 1)
        self.assertEqual(self.flushLoggedErrors(defer.AlreadyCalledError), [])
        self.flushLoggedErrors(ValueError)

    def test_getAllPagesReportsLostConnection(self) -> None:
        """If the connection is lost after the call was answered but before the last page,
        getAllPages fails with PBConnectionLost instead of waiting for ever."""

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()  # the answer goes, the pages wait
                self.pager = util.StringPager(collector, b"abcdef", 1)

        server, client, pump = connect(pb.PBServerFactory(MyRoot()), pb.PBClientFactory())
        pages: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(pages.append)
        pump.flush()
        self.assertEqual(pages, [])
        client.transport.loseConnection()
        pump.flush()
        pages[0].trap(PBConnectionLost)

    def test_getAllPagesThroughCallOptions(self) -> None:
        """Through a reference with call options (``withOptions``), getAllPages watches the
        connection too: a loss before the last page fails it, in every dialect."""

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()  # the answer goes, the pages wait
                self.pager = util.StringPager(collector, b"abcdef", 1)

        for dialects in ([b"pbroker2"], [b"pb"]):
            server, client, pump = connect(
                pb.PBServerFactory(MyRoot()), pb.PBClientFactory(dialects=dialects)
            )
            pages: list[Any] = []
            options = client.remoteForName("root").withOptions(timeout=30)
            util.getAllPages(options, "send").addBoth(pages.append)
            pump.flush()
            self.assertEqual(pages, [])
            client.transport.loseConnection()
            pump.flush()
            pages[0].trap(PBConnectionLost)

    def test_getAllPagesThroughCallOptionsLeavesNoWatch(self) -> None:
        """Once getAllPages through a reference with call options has all its pages, it no
        longer watches the connection: nothing is left registered, call after call."""

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                self.pager = util.StringPager(collector, b"abcdef", 2)

        _server, client, pump = connect(pb.PBServerFactory(MyRoot()), pb.PBClientFactory())
        root = client.remoteForName("root")
        for _ in range(3):
            pages: list[Any] = []
            util.getAllPages(root.withOptions(timeout=30), "send").addBoth(pages.append)
            pump.flush()
            self.assertEqual(pages, [[b"ab", b"cd", b"ef"]])
        self.assertEqual(root.disconnectCallbacks, [])

    def test_noPageAfterTheConnectionIsLost(self) -> None:
        """A pager sending when this side closes the connection (its transport no longer
        stops it) is asked for no page, when it says it has one ready or when the transport
        says it drains."""

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                server.transport.pauseProducing()  # the answer goes, the pages wait
                self.pager = util.StringPager(collector, b"abcdef", 1)

        root = MyRoot()
        server, client, pump = connect(pb.PBServerFactory(root), pb.PBClientFactory())
        pages: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(pages.append)
        pump.flush()
        server.transport.loseConnection()
        pump.flush()
        self.assertTrue(server.disconnected)
        self.assertEqual(
            server.pageProducers, []
        )  # let go of (see test_pagersStopWhenTheConnectionIsLost)
        written = server.transport.written
        server.transport.resumeProducing()  # a drain reported late: the pump runs, sends none
        server.sendPages()  # what a pager does once it has a page ready
        self.assertEqual((root.pager.pointer, server.transport.written), (0, written))
        pages[0].trap(PBConnectionLost)

    def test_pagerStartedWhileALargeMessageIsSent(self) -> None:
        """A pager started while a large message is sent in fragments sends its first page
        only once that message is out: its pages follow it, in order."""
        large = b"L" * 3_000_000
        pointers: list[int] = []

        def startBehindALargePage(collector: Any) -> Any:
            collector.callRemote("gotPage", large, pbanswer=False)
            pager = util.StringPager(collector, b"abc", 1)
            pointers.append(pager.pointer)
            return pager

        server, results = self.collectFrom(startBehindALargePage)
        self.assertEqual(pointers, [0])  # nothing sent while the large page was queued
        self.assertEqual(results, [[large, b"a", b"b", b"c"]])
        self.assertEqual((server.pageProducers, server._pagesSent), ([], set()))

    def test_droppingAPager(self) -> None:
        """A pager dropped while its large page is being sent is forgotten, and told why;
        one dropped again once gone is told again, one without pagingFailed, or whose
        pagingFailed raises, is only logged: each drop logs why the pager stops."""
        stopped: list[Any] = []

        class LargeFirst(util.Pager):
            def nextPage(self) -> bytes:
                return b"p" * 1_000_000

            def pagingFailed(self, failure: Failure) -> None:
                stopped.append(failure.value)
                super().pagingFailed(failure)

        class MyRoot(pb.Root):
            def remote_send(self, collector: Any) -> None:
                self.pager = LargeFirst(collector)

        root = MyRoot()
        clock = Clock()
        server, client, pump = connectedServerAndClient(
            pb.PBServerFactory(root, clock=clock), pb.PBClientFactory(clock=clock), clock=clock
        )
        results: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "send").addBoth(results.append)
        pump.pump()
        pump.pump()
        self.assertTrue(server.sendingLarge)  # the first page, in fragments
        self.assertEqual(server._pagesSent, {root.pager})
        failure = Failure(OSError("the source failed"))
        with capturedLogs() as events:
            server.dropPageProducer(root.pager, failure)
            self.assertEqual((server.pageProducers, server._pagesSent), ([], set()))
            server.dropPageProducer(root.pager, failure)  # no longer registered
            self.assertEqual([str(value) for value in stopped], ["the source failed"] * 2)

            class Bare:
                """A pager of the broker's protocol alone: no pagingFailed."""

            class FailsToStop(Bare):
                def pagingFailed(self, failure: Failure) -> None:
                    raise RuntimeError("cannot stop")

            server.dropPageProducer(Bare(), failure)
            server.dropPageProducer(FailsToStop(), failure)
        self.assertEqual(
            [(event["log_format"], str(event["log_failure"].value)) for event in events],
            [("A pager failed; it stops", "the source failed")] * 3
            + [
                ("A pager failed to stop", "cannot stop"),
                ("A pager failed; it stops", "the source failed"),
            ],
        )
        self.flushLoggedErrors(OSError, RuntimeError)
        pump.flush()
        # The collector got the page being sent, then the news (a call: behind the page).
        self.assertFalse(server.sendingLarge)
        results[0].trap(pb.RemoteError)
        self.assertIn("the source failed", results[0].getErrorMessage())
        self.assertFalse(server.disconnected)

    def test_getAllPagesReportsCallFailure(self) -> None:
        """If the paging call itself fails, getAllPages fails with it."""
        _server, client, pump = connect(pb.PBServerFactory(pb.Root()), pb.PBClientFactory())
        results: list[Any] = []
        util.getAllPages(client.remoteForName("root"), "missing").addBoth(results.append)
        pump.flush()
        self.assertTrue(results[0].check(pb.NoSuchMethod))
        self.flushLoggedErrors()


class IThing(Interface):
    def double(value: int) -> int:  # type: ignore[misc]
        """Double it."""


@implementer(IThing)
class Thing:
    def double(self, value: int) -> int:
        return 2 * value

    def hidden(self) -> str:
        return "not in the interface"


class LocalStandInTests(SynchronousTestCase):
    def test_localAsRemote(self) -> None:
        """sync_ methods return as they are; async_ results and errors become Deferreds."""

        class Local(util.LocalAsRemote):
            reportAllTracebacks = False

            def sync_now(self) -> Any:
                return defer.succeed("now")

            def async_add(self, a: int, b: int) -> int:
                return a + b

            def async_fail(self) -> None:
                raise ValueError("no")

        local = Local()
        self.assertEqual(self.successResultOf(local.callRemote("now")), "now")
        self.assertEqual(self.successResultOf(local.remoteMethod("add")(1, 2)), 3)
        self.assertTrue(self.failureResultOf(local.callRemote("fail")).check(ValueError))
        self.assertTrue(self.failureResultOf(local.callRemote("missing")).check(AttributeError))

    def test_reportAllTracebacks(self) -> None:
        """By default a failing async_ method's traceback is logged as an error, and the
        Deferred fails with it."""

        class Local(util.LocalAsRemote):
            def async_fail(self) -> None:
                raise ValueError("logged")

        with capturedLogs() as events:
            failure = self.failureResultOf(Local().callRemote("fail"), ValueError)
        self.assertEqual(failure.getErrorMessage(), "logged")
        text = "".join(str(e.get("log_io", "")) for e in events)
        self.assertIn("ValueError: logged", text)

    def test_getAllPagesFromALocalStandIn(self) -> None:
        """getAllPages works on a local stand-in (no connection to watch, a sync_ method
        returning None): it fires with the pages; a failure of the call after the last
        page does not undo the pages, and is logged."""

        class Local(util.LocalAsRemote):
            def sync_send(self, collector: Any) -> None:
                collector.remote_gotPage(b"a")
                collector.remote_gotPage(b"b")
                collector.remote_endedPaging()

            def sync_sendThenFail(self, collector: Any) -> Any:
                self.sync_send(collector)
                return defer.fail(ValueError("after the pages"))

        self.assertEqual(self.successResultOf(util.getAllPages(Local(), "send")), [b"a", b"b"])
        with capturedLogs() as events:
            pages = self.successResultOf(util.getAllPages(Local(), "sendThenFail"))
        self.assertEqual(pages, [b"a", b"b"])
        [event] = events
        self.assertEqual(formatEvent(event), "sendThenFail failed after its last page")
        self.assertEqual(str(event["log_failure"].value), "after the pages")
        self.flushLoggedErrors(ValueError)

    def test_localAsyncForwarder(self) -> None:
        """Interface methods are forwarded; others succeed with None or fail, as asked."""
        forwarder = util.LocalAsyncForwarder(Thing(), IThing)
        self.assertEqual(self.successResultOf(forwarder.callRemote("double", 4)), 8)
        self.assertIsNone(self.successResultOf(forwarder.callRemote("hidden")))
        strict = util.LocalAsyncForwarder(Thing(), IThing, failWhenNotImplemented=True)
        self.assertTrue(
            self.failureResultOf(strict.callRemote("hidden")).check(NotImplementedError)
        )
        with self.assertRaises(TypeError):
            util.LocalAsyncForwarder(object(), IThing)


class Catalogue(publish.Publishable):
    def __init__(self, publishedID: str) -> None:
        super().__init__(publishedID)
        self.items = ["a", "b"]
        self.fetches = 0

    def getTypeToCopy(self) -> bytes:
        return b"tests.publish.Catalogue"

    def getStateToPublish(self) -> Any:
        self.fetches += 1
        return {"items": list(self.items)}


class RemoteCatalogue(publish.RemotePublished):
    pass


class PublishTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.catalogue = Catalogue("../../etc/passwd")
        self.registry = jelly.UnjellyableRegistry()
        self.registry.setUnjellyableForClass(b"tests.publish.Catalogue", RemoteCatalogue)

    def fetch(self) -> Any:
        catalogue = self.catalogue

        class PublishingRoot(pb.Root):
            def remote_catalogue(self) -> Any:
                return catalogue

        _server, client, pump = connect(
            pb.PBServerFactory(PublishingRoot()), pb.PBClientFactory(registry=self.registry)
        )
        results: list[Any] = []
        publish.whenReady(client.remoteForName("root").callRemote("catalogue")).addBoth(
            results.append
        )
        pump.flush()
        self.assertEqual(len(results), 1)
        return results[0]

    def test_stateFetchedWhenReady(self) -> None:
        """whenReady fires with the published object once its full state has arrived."""
        remote = self.fetch()
        self.assertIsInstance(remote, RemoteCatalogue)
        self.assertTrue(remote.isActivated)
        self.assertEqual(remote.items, ["a", "b"])
        self.assertEqual(self.catalogue.fetches, 1)

    def test_whenReadyFailsIfTheStateCannotBeFetched(self) -> None:
        """whenReady fails, rather than waiting for ever, when the publisher cannot give its
        state."""

        def broken(catalogue: Any) -> Any:
            raise ValueError("no state today")

        self.patch(Catalogue, "getStateToPublish", broken)
        with capturedLogs():
            failure = self.fetch()
        failure.trap(ValueError)
        self.flushLoggedErrors(ValueError)

    def test_nothingWrittenByDefault(self) -> None:
        """Without a cache directory nothing touches the disk."""
        remote = self.fetch()
        self.assertIsNone(remote.getFileName())

    def test_savedStateReusedAndNamesSanitised(self) -> None:
        """With a cache directory an unchanged object is not fetched twice, and a peer's
        strings cannot steer the file out of that directory."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(RemoteCatalogue, "cacheDirectory", directory)
        first = self.fetch()
        fileName = first.getFileName()
        self.assertEqual(os.path.dirname(fileName), directory)
        self.assertTrue(os.path.exists(fileName))
        self.assertNotIn("/", os.path.basename(fileName))
        second = self.fetch()
        self.assertEqual(second.items, ["a", "b"])
        self.assertEqual(self.catalogue.fetches, 1)
        self.catalogue.republish()
        self.fetch()
        self.assertEqual(self.catalogue.fetches, 2)

    def test_largeStateSaved(self) -> None:
        """A state over PB's 640 KiB (which the native dialect carries) is saved and reused:
        the file has no such ceiling."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.patch(RemoteCatalogue, "cacheDirectory", directory)
        self.catalogue.items = ["x" * 1_000_000]
        first = self.fetch()
        self.assertGreater(os.path.getsize(first.getFileName()), 1_000_000)
        self.assertEqual(self.fetch().items, ["x" * 1_000_000])
        self.assertEqual(self.catalogue.fetches, 1)


def _raisingPager(collector: Any, broker: Any, calls: list[str]) -> Any:
    # A pager of BIG whose callback notes it ran, then raises.
    def done() -> None:
        calls.append("done")
        raise RuntimeError("callback failed")

    return util.StringPager(collector, BIG, 8192, done)


class _Unreadable(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        raise OSError("disk gone")
