"""
Utilities around remote calls: paging large data through PB's size limits, and local objects
that behave like remote references (for tests and for code that works either way).

Paging is a convention, not part of the protocol (wire specification, section 3.9): a
:class:`Pager` sends its data in pieces with one-way ``gotPage`` calls to a collector the peer
passed, then an ``endedPaging`` call. Pages are sent as the transport asks for data, so a large
transfer neither blocks other calls nor fills memory with unsent bytes; they arrive in order,
and the end after the last, however large they are.

A pager that fails (its ``nextPage`` or its file raised, a page too large for the peer) sends
a one-way ``failedPaging(type, message)`` instead of the end: a pbroker collector fails its
collection with :class:`~pbroker.errors.RemoteError`. (A stock Twisted collector does not know
the call and logs it; its collection is never completed.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import IO, Any

from twisted.internet import defer, interfaces
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from pbroker.errors import PBConnectionLost, RemoteError, isInteger
from pbroker.failure import errorText
from pbroker.flavors import Referenceable
from pbroker.jelly import qual

_log = Logger()

__all__ = [
    "CallbackPageCollector",
    "FilePager",
    "LocalAsRemote",
    "LocalAsyncForwarder",
    "LocalMethod",
    "Pager",
    "StringPager",
    "getAllPages",
]


class LocalMethod:
    """
    One method of a :class:`LocalAsRemote`, callable like a remote method.
    """

    def __init__(self, local: Any, name: str) -> None:
        self.local = local
        self.name = name

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.local.callRemote(self.name, *args, **kw)


class LocalAsRemote:
    """
    A local object that answers ``callRemote`` like a remote reference: ``callRemote("x")``
    returns what ``sync_x`` returns (a Deferred, normally), or the result of ``async_x``
    wrapped in a Deferred (a failure if it raised).
    """

    #: Print the traceback of every failing ``async_`` method.
    reportAllTracebacks = True

    def callRemote(self, name: str, *args: Any, **kw: Any) -> Any:
        """
        Call ``sync_<name>`` (its result as it is) or ``async_<name>`` (its result in a
        Deferred, a failure as a failed Deferred), as a remote call would.
        """
        syncMethod = getattr(self, "sync_" + name, None)
        if syncMethod is not None:
            return syncMethod(*args, **kw)
        try:
            return defer.succeed(getattr(self, "async_" + name)(*args, **kw))
        except Exception:
            failure = Failure()
            if self.reportAllTracebacks:
                failure.printTraceback()
            return defer.fail(failure)

    def remoteMethod(self, name: str) -> LocalMethod:
        """
        The method ``name``, callable like a local function.
        """
        return LocalMethod(self, name)


class LocalAsyncForwarder:
    """
    Forwards ``callRemote`` to the methods of a local object that an interface declares.

    :param failWhenNotImplemented: fail a call to a method the interface does not declare
        (otherwise it succeeds with ``None``).
    """

    def __init__(
        self, forwarded: Any, interfaceClass: Any, failWhenNotImplemented: bool = False
    ) -> None:
        if not interfaceClass.providedBy(forwarded):
            raise TypeError(f"{forwarded!r} does not provide {interfaceClass!r}")
        self.forwarded = forwarded
        self.interfaceClass = interfaceClass
        self.failWhenNotImplemented = failWhenNotImplemented

    def callRemote(self, method: str, *args: Any, **kw: Any) -> Any:
        """
        Call ``method`` on the forwarded object if the interface declares it (a Deferred of the
        result); else fail with NotImplementedError, or give ``None`` if told not to fail.
        """
        if self.interfaceClass.queryDescriptionFor(method):
            return defer.maybeDeferred(getattr(self.forwarded, method), *args, **kw)
        if self.failWhenNotImplemented:
            return defer.fail(NotImplementedError(f"No Such Method in Interface: {method}"))
        return defer.succeed(None)


class Pager:
    """
    Sends pages to a remote collector (a reference to a :class:`CallbackPageCollector` or any
    Referenceable with ``remote_gotPage`` and ``remote_endedPaging``) while the connection
    takes data: the broker stops when its transport is full and goes on when it drains.
    Subclasses implement :meth:`nextPage` and call :meth:`stopPaging` after the
    last page.

    :param callback: called with ``args`` and ``kw`` once the last page is sent.
    """

    def __init__(
        self, collector: Any, callback: Callable[..., object] | None = None, *args: Any, **kw: Any
    ) -> None:
        if callback is not None and not callable(callback):
            # (Stock PB drops it in silence, and its "done" code never runs.)
            raise TypeError(f"a pager's callback must be callable (or None), not {callback!r}")
        self.callback = callback
        self.callbackArgs = args
        self.callbackKeyword = kw
        self._stillPaging = True
        self.collector = collector
        collector.broker.registerPageProducer(self)

    def stillPaging(self) -> bool:
        """
        Called by the broker after each page; ends the transfer once paging has stopped.
        """
        if not self._stillPaging:
            self.collector.callRemote("endedPaging", pbanswer=False)
            if self.callback is not None:
                self.callback(*self.callbackArgs, **self.callbackKeyword)
        return self._stillPaging

    def sendNextPage(self) -> None:
        """
        Called by the broker when the connection can take another page.
        """
        self.collector.callRemote("gotPage", self.nextPage(), pbanswer=False)

    def nextPage(self) -> Any:
        """
        The next page to send. Override it.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement nextPage()")

    def stopPaging(self) -> None:
        """
        Mark the page just returned as the last one.
        """
        self._stillPaging = False

    def pagingFailed(self, failure: Failure) -> None:
        """
        Called by the broker when it drops this pager (a page could not be made or sent):
        tell the collector, so that the peer is not left waiting for the end.
        """
        self._stillPaging = False
        value = failure.value
        with contextlib.suppress(Exception):  # the connection may be gone: nothing to tell
            self.collector.callRemote(
                "failedPaging",
                qual(type(value)),
                errorText(value) or type(value).__name__,
                pbanswer=False,
            )


class StringPager(Pager):
    """
    Sends a byte string in chunks of ``chunkSize`` bytes (8 KiB by default).
    """

    def __init__(
        self,
        collector: Any,
        st: bytes,
        chunkSize: int = 8192,
        callback: Callable[..., object] | None = None,
        *args: Any,
        **kw: Any,
    ) -> None:
        if not isInteger(chunkSize):
            raise TypeError(f"chunkSize must be an integer, not {chunkSize!r}")
        if chunkSize < 1:
            raise ValueError(f"chunkSize must be at least 1, not {chunkSize}")
        if not (
            callable(getattr(st, "__getitem__", None)) and callable(getattr(st, "__len__", None))
        ):
            # (Anything sliced as bytes are, as stock's: an mmap, say.)
            raise TypeError(f"a StringPager pages a byte string, not {type(st).__name__}")
        self.string = st
        self.pointer = 0
        self.chunkSize = chunkSize
        super().__init__(collector, callback, *args, **kw)

    def nextPage(self) -> bytes:
        page = self.string[self.pointer : self.pointer + self.chunkSize]
        self.pointer += self.chunkSize
        if self.pointer >= len(self.string):
            self.stopPaging()
        return page


@implementer(interfaces.IConsumer)
class FilePager(Pager):
    """
    Sends the contents of an open binary file in the chunks it is read in.
    """

    def __init__(
        self,
        collector: Any,
        fd: IO[bytes],
        callback: Callable[..., object] | None = None,
        *args: Any,
        **kw: Any,
    ) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None
        self._reading = True
        self._failed = False
        super().__init__(collector, callback, *args, **kw)
        try:
            self.startProducing(fd)
        except Exception:
            # Raised to whoever made the pager, as a first page that cannot be sent is; it
            # is not left registered on the broker.
            collector.broker.dropPageProducer(self, Failure(), raising=True)

    def startProducing(self, fd: IO[bytes]) -> None:
        """
        Start reading ``fd`` into pages.
        """
        self.deferred = FileSender().beginFileTransfer(fd, self)  # type: ignore[no-untyped-call]
        self.deferred.addBoth(self._doneReading)

    def _doneReading(self, result: Any) -> None:
        self._reading = False
        if self._failed:
            return  # stopped by pagingFailed: the collector has been told why
        if isinstance(result, Failure):
            # The file could not be read to its end: the collector must not take what was
            # read for all of it.
            self.chunks = []
            self.collector.broker.dropPageProducer(self, result)
            return
        if not self.chunks:
            self.stopPaging()
        self.collector.broker.sendPages()

    def pagingFailed(self, failure: Failure) -> None:
        self._failed = True
        super().pagingFailed(failure)
        producer, self.producer = self.producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.stopProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Take the file reader that writes pages here (started at once if it is a pull
        producer).
        """
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        """
        The file reader is done.
        """
        self.producer = None

    def write(self, data: bytes) -> None:
        """
        A page read from the file: queue it for the broker to send.
        """
        self.chunks.append(data)
        # A page is ready: the broker sends it if the connection takes data.
        self.collector.broker.sendPages()

    def sendNextPage(self) -> None:
        if not self.chunks:
            return
        page = self.chunks.pop(0)
        if self.producer is not None:
            self.producer.resumeProducing()
        self.collector.callRemote("gotPage", page, pbanswer=False)
        if not self.chunks and not self._reading:
            self.stopPaging()


class CallbackPageCollector(Referenceable):
    """
    Receives pages; calls ``callback(pages)`` with the list once paging ends, or
    ``errback`` with a :class:`~pbroker.errors.RemoteError` if the pager says it failed.
    """

    def __init__(
        self,
        callback: Callable[[list[Any]], object],
        errback: Callable[[Failure], object] | None = None,
    ) -> None:
        if not callable(callback):
            raise TypeError(f"CallbackPageCollector needs a callable, not {callback!r}")
        if errback is not None and not callable(errback):
            raise TypeError(f"errback must be callable (or None), not {errback!r}")
        self.pages: list[Any] = []
        self.callback = callback
        self.errback = errback
        self.done = False

    def remote_gotPage(self, page: Any) -> None:
        """
        One more page from the pager; none is taken once paging ended or failed (the list
        given to ``callback`` stays as it was given).
        """
        if not self.done:
            self.pages.append(page)

    def remote_endedPaging(self) -> None:
        """
        The pager is done: fire with every page received (once).
        """
        if not self.done:
            self.done = True
            self.callback(self.pages)

    def remote_failedPaging(self, errorType: Any, message: Any) -> None:
        """
        The pager failed (a pbroker pager says so): the pages received are not all.
        """
        if self.done:
            return
        self.done = True
        if self.errback is not None:
            error = RemoteError(str(errorType), f"the pager failed: {message}", "")
            self.errback(Failure(error))


def getAllPages(referenceable: Any, methodName: str, *args: Any, **kw: Any) -> defer.Deferred[Any]:
    """
    Call ``methodName`` on ``referenceable`` with a new collector as the first argument and
    return a Deferred of the list of every page the peer sends to it.

    Every page is kept in memory until the last: from a peer you do not trust to stop, page
    into a collector of your own (a :class:`~pbroker.flavors.Referenceable` with
    ``remote_gotPage`` and ``remote_endedPaging``) that bounds what it keeps.

    It fails if the call fails, with :class:`~pbroker.errors.RemoteError` if a pbroker pager
    says it failed, or with :class:`~pbroker.errors.PBConnectionLost` if the connection is
    lost before the last page. A call that fails after the last page is logged.
    """
    deferred: defer.Deferred[Any] = defer.Deferred()

    def completed(pages: list[Any]) -> None:
        if not deferred.called:  # (the call may have failed after its pager ended)
            deferred.callback(pages)

    def failed(failure: Failure) -> None:
        # The call itself failed, or its pager: no (more) pages will come.
        if not deferred.called:
            deferred.errback(failure)
        elif not failure.check(PBConnectionLost):
            # After its last page: the pages stand, and the failure is not lost.
            _log.failure("{method} failed after its last page", failure, method=methodName)

    collector = CallbackPageCollector(completed, failed)
    call = referenceable.callRemote(methodName, collector, *args, **kw)

    def lost(_reference: Any) -> None:
        failed(Failure(PBConnectionLost("the connection was lost before the last page")))

    def done(result: Any) -> Any:
        referenceable.dontNotifyOnDisconnect(lost)
        return result

    if call is not None:
        call.addErrback(failed)
    notify = getattr(referenceable, "notifyOnDisconnect", None)
    if notify is not None:  # (a local stand-in has no connection)
        notify(lost)
        deferred.addBoth(done)
    return deferred
