"""
Streams: a remote method may return (or a caller may pass) a sequence of values that crosses
the connection one item at a time, with back-pressure, instead of as one message.

On the sending side, any iterator (a generator, ``iter(...)``, ``map(...)``), async iterator
(an async generator) or :class:`Stream` becomes a stream when it is sent over a connection in
pbroker's native dialect. The receiver gets a :class:`RemoteStream`, which it reads with
``async for`` or with Deferreds::

    async for row in await root.callRemote("rows"):
        ...

    stream = await root.callRemote("rows")
    rows = await stream.collect()

Flow control is by credit: the receiver lets the sender have at most ``window`` items in
flight or unread, so a fast sender never makes a slow reader hold more than that. The reader
may stop early with :meth:`RemoteStream.cancel`, which closes the sender's generator. An
exception the source raises reaches the reader in order, after the items before it.

On a ``pb`` connection (a stock Twisted peer) streams cannot be sent: the call fails with
:class:`~pbroker.errors.UnsupportedByPeer`.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import types
from collections import deque
from collections.abc import Callable, Generator, Iterator
from typing import Any
from weakref import WeakValueDictionary

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pbroker.errors import PBConnectionLost, ProtocolError, describe, isInteger

__all__ = ["DEFAULT_WINDOW", "END", "RemoteStream", "Stream", "isStreamable"]

#: How many items a reader lets a sender have in flight or unread, by default.
DEFAULT_WINDOW = 16

# The Streams of this process not closed yet, by id (not by hash: a subclass may define
# __eq__, and so have none): a value refused when there are none has no Stream to close,
# and is not searched (see pbroker._streams.findStreams).
unclosedStreams: WeakValueDictionary[int, Stream] = WeakValueDictionary()

# Items an outgoing stream sends in one turn of the reactor before letting others run.
_ITEMS_PER_TURN = 64


# The types most values are: checked first, since the Iterator check below is slow.
_NEVER_STREAMS = frozenset(
    {int, float, str, bytes, bool, type(None), list, dict, tuple, set, frozenset}
)


class _End:
    def __repr__(self) -> str:
        return "pbroker.stream.END"


#: What :meth:`RemoteStream.next` gives once the stream has ended.
END: Any = _End()


def isStreamable(value: Any) -> bool:
    """
    Whether ``value`` is sent as a stream: an iterator or an async iterator (but not a
    container, a string, a file-like object or a PB flavour, such as a Referenceable or a
    Copyable, which are sent as what they are).
    """
    kind = type(value)
    if kind in _NEVER_STREAMS or hasattr(kind, "jellyFor"):
        return False
    if kind is types.GeneratorType or kind is types.AsyncGeneratorType or kind is Stream:
        return True
    if hasattr(kind, "__anext__"):
        return True
    return isinstance(value, Iterator) and not hasattr(value, "read")


class RemoteStream:
    """
    The reading end of a stream the peer sends.

    A reader that may stop before the end should close it: ``async with stream:``
    around the ``async for`` (or ``contextlib.aclosing(stream)``, or :meth:`cancel` in a
    ``finally``) cancels it however the block is left, where a stream still referred to
    (by a variable, or a traceback kept in a Failure) stays open until it is collected,
    its sender's generator suspended.

    :ivar streamID: the sender's id for the stream.
    :ivar window: the most items in flight or unread at once.
    """

    _log = Logger()

    def __init__(self, table: Any, streamID: int, window: int = DEFAULT_WINDOW) -> None:
        self._table = table
        self.streamID = streamID
        self.window = window
        self._items: deque[Any] = deque()
        # The size of each (as received), their sum (what the table bounds: see
        # BrokerLimits.streamBytes), and the size credit is given by: the largest item lately
        # (it decays by a quarter with each item, so one large item does not slow the rest).
        self._sizes: deque[int] = deque()
        self.unreadBytes = 0
        self._itemSize = 0
        # What the credit given and not used yet may bring, at that size (see _refill).
        self._promised = 0
        self._waiters: deque[Deferred[Any]] = deque()
        # Credit given to the sender and not yet used by an item.
        self._outstanding = 0
        self._finished: Failure | None = None
        self._state = "open"  # then "ended", "failed" or "cancelled"

    def __repr__(self) -> str:
        return f"<RemoteStream {self.streamID} {self._state}>"

    @property
    def buffered(self) -> int:
        """
        Items received and not yet read.
        """
        return len(self._items)

    # Reading

    def next(self) -> Deferred[Any]:
        """
        A Deferred of the next item, of :data:`END` once the stream has ended, or failing
        with the sender's error (or ``CancelledError`` after :meth:`cancel`).
        """
        if self._items:
            item = self._take()
            self._refill()
            return succeed(item)
        if self._state == "open":
            waiter: Deferred[Any] = Deferred(self._forgetWaiter)
            self._waiters.append(waiter)
            if len(self._waiters) == 1:
                # Someone waits for an item: kept until it comes, however the reader is held.
                self._table.keepReader(self)
            return waiter
        if self._state == "ended":
            return succeed(END)
        assert self._finished is not None
        return fail(self._finished)

    def _forgetWaiter(self, waiter: Deferred[Any]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            if not self._waiters:
                self._table.dropReader(self)

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> Any:
        item = await self.next()
        if item is END:
            raise StopAsyncIteration
        return item

    def collect(self) -> Deferred[list[Any]]:
        """
        A Deferred of every remaining item, as a list, once the stream ends; cancelling it
        cancels the stream.
        """
        items: list[Any] = []
        # Cancelling it cancels the stream (which fails it with CancelledError).
        done: Deferred[list[Any]] = Deferred(lambda _: self.cancel())

        def step(item: Any) -> None:
            while True:
                if item is END:
                    done.callback(items)
                    return
                items.append(item)
                if not self._items:
                    break
                item = self._take()
            self._refill()
            self.next().addCallbacks(step, done.errback)

        self.next().addCallbacks(step, done.errback)
        return done

    def cancel(self) -> None:
        """
        Stop reading: the sender is told to stop (its generator is closed), unread items are
        dropped, and pending :meth:`next` calls fail with ``CancelledError``. A stream whose
        end has arrived has its unread items dropped too (the sender has stopped already).
        """
        ended = self._state == "ended"
        if self._state != "open" and not (ended and self._items):
            return
        self._dropUnread()
        self._finish("cancelled", Failure(CancelledError("the stream was cancelled")))
        if not ended:
            self._table.cancel(self.streamID)

    def aclose(self) -> Deferred[None]:
        """
        :meth:`cancel` the stream unless it has ended, as ``contextlib.aclosing`` and code
        that closes async generators expect: a Deferred that has fired, so that it works
        awaited, yielded or returned from a callback alike.
        """
        self.cancel()
        return succeed(None)

    async def __aenter__(self) -> RemoteStream:
        return self

    async def __aexit__(self, *exceptionInfo: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        if getattr(self, "unreadBytes", 0) or getattr(self, "_promised", 0):
            with contextlib.suppress(Exception):
                self._table.collected(self.unreadBytes, self._promised)
        # A stream dropped unread would leave its sender waiting for credit.
        if getattr(self, "_state", None) == "open" and not getattr(
            self._table, "disconnected", True
        ):
            with contextlib.suppress(Exception):
                self._table.cancel(self.streamID)

    def _take(self) -> Any:
        size = self._sizes.popleft()
        self.unreadBytes -= size
        self._table.unread(self, -size)
        return self._items.popleft()

    def _dropUnread(self) -> None:
        self._items.clear()
        self._sizes.clear()
        held, self.unreadBytes = self.unreadBytes, 0
        if held:
            self._table.unread(self, -held)

    def _evict(self, failure: Failure) -> None:
        """
        Drop the unread items and fail: the connection holds too many bytes of unread items
        (see :meth:`pbroker._streams.StreamTable.admit`). A stream still open is stopped.
        """
        self._dropUnread()
        if self._state == "open":
            self._finish("failed", failure)
            self._table.cancel(self.streamID)
        else:
            self._state, self._finished = "failed", failure

    # Driven by the broker

    def _start(self) -> None:
        self._refill()

    def _refill(self) -> None:
        """
        Give the sender credit for more items, up to the window (items on their way or
        unread) and, by bytes, up to half of what ``streamBytes`` leaves once the other
        streams' unread items and credit are counted, in items the size of the largest
        lately (at least one item): streams read slowly share the room, and together stay
        within it. A stream's first credit is for two items (one, for a window of one),
        whose size sets that.
        """
        if self._state != "open":
            return
        used = self._outstanding + len(self._items)
        window = self.window
        if self._itemSize:
            table = self._table
            others = table.unreadBytes - self.unreadBytes + table.promisedBytes - self._promised
            room = max(0, table.streamBytes - others) // 2
            window = min(window, max(1, room // self._itemSize))
        else:
            window = min(window, 2)
        if used <= window // 2:
            grant = window - used
            self._outstanding += grant
            self._promise()
            self._table.grantCredit(self.streamID, grant)

    def _promise(self) -> None:
        """
        Count in the table what the credit not used yet may bring (nothing once closed).
        """
        promised = self._outstanding * self._itemSize if self._state == "open" else 0
        if promised != self._promised:
            self._table.promise(promised - self._promised)
            self._promised = promised

    def _itemReceived(self, item: Any, size: int) -> None:
        if self._state != "open":
            return
        if self._outstanding < 1:
            raise ProtocolError(f"the peer sent stream {self.streamID} an item beyond its credit")
        self._outstanding -= 1
        self._itemSize = max(size, self._itemSize * 3 // 4)
        self._promise()
        if self._waiters:
            waiter = self._waiters.popleft()
            if not self._waiters:
                self._table.dropReader(self)
            waiter.callback(item)
        else:
            if not self._table.admit(self, size):
                return  # this stream held the most unread: dropped, with its items
            self._items.append(item)
            self._sizes.append(size)
            self.unreadBytes += size
            self._table.unread(self, size)
        self._refill()

    def _ended(self) -> None:
        if self._state == "open":
            self._finish("ended", None)

    def _failed(self, failure: Failure) -> None:
        if self._state == "open":
            self._finish("failed", failure)

    def _connectionLost(self, reason: Any) -> None:
        if self._state == "open":
            self._finish("failed", Failure(PBConnectionLost(reason)))

    def _finish(self, state: str, failure: Failure | None) -> None:
        self._state = state
        self._finished = failure
        waiters, self._waiters = self._waiters, deque()
        if waiters:
            self._table.dropReader(self)
        self._promise()
        for waiter in waiters:
            if failure is None:
                waiter.callback(END)
            else:
                waiter.errback(failure)


def _snapshot(item: Any) -> Any:
    """
    ``item``, with a ``bytearray`` or a (contiguous) ``memoryview`` of changeable bytes
    copied, in its own type: what is sent later is what was written.
    """
    kind = type(item)
    if kind is bytearray:
        return bytearray(item)
    if kind is memoryview and item.c_contiguous and not (item.readonly and type(item.obj) is bytes):
        copy = memoryview(item.tobytes())
        if item.ndim == 1 and item.format == "B":
            return copy
        return copy.cast(item.format, item.shape)  # (C-contiguous: the same layout)
    return item


@implementer(IConsumer)
class Stream:
    """
    A stream the application writes to, for sources that push rather than being iterated:
    return it from a remote method (or pass it as an argument) and :meth:`write` items to it,
    then :meth:`finish` (or :meth:`fail`).

    :meth:`write` returns a Deferred that fires once the item fits in the buffer (at most
    ``bufferSize`` items wait to be sent); a writer that waits for it never runs ahead of the
    reader. It is also an :class:`~twisted.internet.interfaces.IConsumer`: a registered push
    producer is paused while the buffer is full and resumed when it drains.

    A :class:`Stream` is an async iterator, so it can be read locally with ``async for`` too.
    """

    def __init__(self, bufferSize: int = DEFAULT_WINDOW) -> None:
        if not isInteger(bufferSize):
            raise TypeError(f"bufferSize must be an integer, not {bufferSize!r}")
        bufferSize = operator.index(bufferSize)
        if bufferSize < 1:
            raise ValueError(f"bufferSize must be at least 1, not {describe(bufferSize)}")
        self.bufferSize = bufferSize
        self._items: deque[Any] = deque()
        self._readers: deque[Deferred[Any]] = deque()
        # Writes waiting for room, each with whether a push producer was registered when
        # it was made (its producer made it, and waits by being paused instead).
        self._writers: deque[tuple[Deferred[None], bool]] = deque()
        self._end: Failure | None = None
        self._closed = False
        #: Whether the reader stopped reading (cancelled): what is written is dropped.
        self.cancelled = False
        # Why sending the stream failed, if it did: writes then raise.
        self._failed: Failure | None = None
        self._producer: Any = None
        self._producerPaused = False
        # Whether anything read it yet (here, or a sender): see refusedStreams.
        self._read = False
        unclosedStreams[id(self)] = self

    def write(self, item: Any) -> Deferred[None]:  # type: ignore[override]
        """
        Add ``item`` to the stream. The Deferred fires when there is room for more. If the
        reader stops first, it fails with :class:`~twisted.internet.defer.CancelledError`
        (with why, if sending the stream failed); one made while a push producer is
        registered fires instead, as the producer is stopped (it waits by being paused, and
        ``IConsumer.write`` gives it nothing to wait on). Once the stream is
        :attr:`closed` by its reader (:attr:`cancelled`), the item is dropped and the
        Deferred fails with ``CancelledError``.

        A ``bytearray`` or a ``memoryview`` of changeable bytes is copied as it is now, as a
        call's arguments are: changing it afterwards does not change the item.

        :raises ValueError: the stream was already finished (or failed) by its writer.
        """
        item = _snapshot(item)
        if self._closed:
            if self.cancelled:
                # Not None at once: a writer that waits for room before each write would
                # spin for ever, never told that its reader is gone.
                return fail(CancelledError("the reader stopped reading this stream"))
            if self._failed is not None:
                raise ValueError(
                    f"write() on a stream that failed: {self._failed.getErrorMessage()}"
                )
            raise ValueError("write() on a finished stream")
        if self._readers:
            self._readers.popleft().callback(item)
        else:
            self._items.append(item)
        if len(self._items) < self.bufferSize:
            return succeed(None)
        if self._producer is not None and not self._producerPaused:
            self._producerPaused = True
            self._producer.pauseProducing()
        waiter: Deferred[None] = Deferred()
        self._writers.append((waiter, self._producer is not None))
        return waiter

    @property
    def closed(self) -> bool:
        """
        Whether the stream takes no more items: it was finished or failed by its writer,
        its reader stopped (:attr:`cancelled`: writes then fail with ``CancelledError``),
        or sending it failed (writes then raise ``ValueError`` saying why). A publisher
        drops such a stream from its subscribers.
        """
        return self._closed

    def finish(self) -> None:
        """
        End the stream once the items written so far are read.
        """
        self._close(None)

    def fail(self, reason: Failure | BaseException) -> None:
        """
        End the stream with an error, which the reader gets after the items written so far.
        """
        if not isinstance(reason, (Failure, BaseException)):
            raise TypeError(f"a stream fails with an exception or a Failure, not {reason!r}")
        self._close(reason if isinstance(reason, Failure) else Failure(reason))

    def _close(self, failure: Failure | None) -> None:
        if self._closed:
            return
        self._closed = True
        unclosedStreams.pop(id(self), None)
        self._end = failure
        if not self._items:
            self._flushReaders()

    def _flushReaders(self) -> None:
        readers, self._readers = self._readers, deque()
        for reader in readers:
            if self._end is None:
                reader.errback(StopAsyncIteration())
            else:
                reader.errback(self._end)

    # IConsumer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """
        Have ``producer`` (a push producer) paused while the buffer is full and resumed as
        the reader drains it.

        :raises ValueError: ``streaming`` is false (pull producers are not taken).
        """
        if not streaming:
            raise ValueError("a Stream takes push producers (streaming=True) only")
        methods = ("pauseProducing", "resumeProducing", "stopProducing")
        if not all(callable(getattr(producer, method, None)) for method in methods):
            raise TypeError(
                "a Stream takes a push producer (with pauseProducing, resumeProducing and "
                f"stopProducing), not {type(producer).__name__}"
            )
        if self._closed and (self.cancelled or self._failed is not None):
            producer.stopProducing()  # nobody will read what it produces
            return
        self._producer = producer

    def unregisterProducer(self) -> None:
        """
        Stop pausing and resuming the registered producer.
        """
        self._producer = None

    # Reading

    def __aiter__(self) -> Stream:
        return self

    def __anext__(self) -> Deferred[Any]:
        self._read = True
        if self._items:
            item = self._items.popleft()
            self._drained()
            return succeed(item)
        if self._closed:
            if self._end is None:
                return fail(StopAsyncIteration())
            return fail(self._end)
        reader: Deferred[Any] = Deferred(self._forgetReader)
        self._readers.append(reader)
        return reader

    def _forgetReader(self, reader: Deferred[Any]) -> None:
        # A read cancelled (a timeout, say): the next item goes to the next read, not to it.
        with contextlib.suppress(ValueError):
            self._readers.remove(reader)

    def _drained(self) -> None:
        if len(self._items) >= self.bufferSize:
            return
        writers, self._writers = self._writers, deque()
        for writer, _ in writers:
            writer.callback(None)
        if self._producer is not None and self._producerPaused:
            self._producerPaused = False
            self._producer.resumeProducing()
        if self._closed and not self._items:
            self._flushReaders()

    def close(self, failure: Failure | None = None) -> None:
        """
        Called when the reader cancels (or, with ``failure``, when sending the stream
        failed): the items are dropped and a registered producer is stopped. After a reader
        cancelled, writes are dropped (:attr:`cancelled`); after a failure they raise it.

        Writes waiting for room fail with ``CancelledError`` (or the failure), so that a
        writer waiting on them learns; those a push producer made fire instead (it is
        stopped, and never waits on them: failing them would log "Unhandled error in
        Deferred"). A reader here (``async for``) that waits for an item, or reads later,
        gets the same error, rather than waiting for ever or an end as if nothing was lost.
        """
        reason = failure or Failure(CancelledError("the reader stopped reading this stream"))
        if not self._closed:
            if failure is None:
                self.cancelled = True
            else:
                self._failed = failure
            self._end = reason
        elif self._items and self._end is None:
            self._end = reason  # finished, but what was still to be read is dropped
        self._closed = True
        unclosedStreams.pop(id(self), None)
        self._items.clear()
        self._flushReaders()
        writers, self._writers = self._writers, deque()
        for writer, produced in writers:
            if produced:
                writer.callback(None)
            else:
                writer.errback(reason)
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None


class OutgoingStream:
    """
    The sending end of a stream: pulls items from its source while the reader has given
    credit and the connection takes data.
    """

    _log = Logger()

    def __init__(self, table: Any, streamID: int, source: Any, perspective: Any = None) -> None:
        self._table = table
        self._perspective = perspective
        self.streamID = streamID
        self._source = source
        # The source's code runs in the context it was made in (a remote method's call
        # context, say), as a coroutine's does, however much later the reader asks.
        self._context = contextvars.copy_context()
        self._entered = False
        self._async = not isinstance(source, Iterator)
        self._credit = 0
        self._busy: Deferred[Any] | None = None
        self._done = False
        self._scheduled = False
        self._pumping = False

    def credit(self, count: int) -> None:
        self._credit += count
        self.pump()

    def pump(self) -> None:
        """
        Send items while there is credit, the connection takes data and the source has them
        ready; come back on the next reactor turn after a batch.

        An item that was ready at once (a Deferred that had already fired) is sent from
        within this loop, which then goes on: the loop is never re-entered, however much
        credit the reader gave.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            sent = 0
            while (
                self._credit > 0
                and not self._done
                and self._busy is None
                and self._table.canStream()
            ):
                if sent >= _ITEMS_PER_TURN:
                    if not self._scheduled:
                        self._scheduled = True
                        self._table.clock.callLater(0, self._again)
                    return
                sent += 1
                if self._async:
                    self._pull(self._nextAsync())
                    continue
                try:
                    item = self._inContext(next, self._source)
                except StopIteration:
                    self._finish()
                    return
                except Exception:
                    self._error(Failure())
                    return
                if isinstance(item, Deferred):
                    self._pull(item)
                else:
                    self._inContext(self._send, item)
            if self._credit > 0 and not self._done and self._busy is None:
                self._table.stalled(self)  # the connection takes no more for now
        finally:
            self._pumping = False

    def _inContext(self, function: Any, *args: Any) -> Any:
        """
        ``function(*args)`` in the source's context (also what the source's items run: the
        streams and hooks in them); directly if this stream is already in it.
        """
        if self._entered:
            return function(*args)
        self._entered = True
        try:
            return self._context.run(function, *args)
        finally:
            self._entered = False

    def _again(self) -> None:
        self._scheduled = False
        self.pump()

    def _nextAsync(self) -> Deferred[Any]:
        return _Awaiting(self._source.__anext__, self._inContext).result

    def _pull(self, pending: Deferred[Any]) -> None:
        self._busy = pending
        # An item a hook completes while the broker serialises a value is sent after it.
        self._table.afterSerializing(pending).addCallbacks(self._pulled, self._pullFailed)

    def _pulled(self, item: Any) -> None:
        self._busy = None
        if not self._done:
            self._inContext(self._send, item)
            self.pump()

    def _pullFailed(self, failure: Failure) -> None:
        self._busy = None
        if self._done:
            return
        if failure.check(StopAsyncIteration):
            self._finish()
        else:
            self._error(failure)

    def _send(self, item: Any) -> None:
        self._credit -= 1
        try:
            self._table.sendItem(self.streamID, item, self._perspective)
        except Exception:
            self._error(Failure())

    def _finish(self) -> None:
        self._done = True
        self._table.ended(self.streamID, None)

    def _error(self, failure: Failure) -> None:
        self._done = True
        self._close(failure)
        self._table.ended(self.streamID, failure)

    def cancel(self) -> None:
        """
        The reader stopped: close the source and end the stream.
        """
        if self._done:
            return
        self._stop()
        self._table.ended(self.streamID, None)

    def connectionLost(self, failure: Failure | None = None) -> None:
        """
        The stream will not be read: the connection is gone, or (``failure``) the value that
        carried it was not sent. A :class:`Stream` source is closed with ``failure``.
        """
        if not self._done:
            self._stop(failure)

    def _stop(self, failure: Failure | None = None) -> None:
        # A step the source is in the middle of (an async generator awaiting something) is
        # cancelled first: a running async generator cannot be closed.
        self._done = True
        if self._busy is not None:
            busy, self._busy = self._busy, None
            busy.addErrback(lambda _: None)
            try:
                busy.cancel()
            except Exception:
                # The canceller of what the source waits for raised: the application's
                # error, logged; the stream still stops (and its connection is unharmed).
                self._log.failure("Error cancelling what the source of a stopped stream waits for")
        self._close(failure)

    def _close(self, failure: Failure | None = None) -> None:
        self._inContext(self._closeSource, failure)

    def _closeSource(self, failure: Failure | None) -> None:
        """
        Close the source: the reader stopped, or (``failure``) the stream failed.
        """
        source = self._source
        try:
            if isinstance(source, types.GeneratorType):
                source.close()
            elif isinstance(source, types.AsyncGeneratorType):
                # One still running (its step was cancelled above) ends with that step.
                if not source.ag_running:
                    _Awaiting(source.aclose, self._inContext).result.addErrback(self._closeFailed)
            elif isinstance(source, Stream):
                source.close(failure)
            elif isinstance(source, RemoteStream):
                # A stream passed on (a method returned one it was given, or read from
                # another peer): its own sender stops too.
                source.cancel()
        except Exception:
            self._log.failure("Error closing the source of a cancelled stream")

    def _closeFailed(self, failure: Failure) -> None:
        self._log.failure("Error closing the source of a cancelled stream", failure)


def _stepsOf(awaitable: Any) -> Generator[Any, Any, Any]:
    """
    A generator through which ``awaitable`` runs: ``__await__`` may give any iterator, and
    only a generator takes ``send`` and ``throw``.
    """
    return (yield from awaitable.__await__())


class _Awaiting:
    """
    Awaits what ``start()`` returns (an async source's next item, or its closing), with
    ``start`` and each step of the awaitable run by ``runIn``: in the source's own context,
    as a sync generator's steps are. ``result`` fires with the outcome.

    ``Deferred.fromCoroutine`` would run each await in a fresh copy of the context, so what
    an async generator set there (a context variable, a token it resets later) would be lost
    between its items.
    """

    def __init__(self, start: Callable[[], Any], runIn: Callable[..., Any]) -> None:
        self._steps: Any = None
        self._runIn = runIn
        self._waitingOn: Deferred[Any] | None = None
        self.result: Deferred[Any] = Deferred(self._cancel)
        self._step(self._begin, start)

    def _begin(self, start: Callable[[], Any]) -> Any:
        try:
            awaitable = start()
        except StopIteration as e:
            # Not the end of the awaitable (which _step takes it for): a mistake for
            # StopAsyncIteration, an error, as in a coroutine.
            name = getattr(start, "__name__", repr(start))
            raise RuntimeError(f"{name}() raised StopIteration") from e
        if not hasattr(awaitable, "__await__"):
            name = getattr(start, "__name__", repr(start))
            raise TypeError(f"{name}() returned {awaitable!r}, which cannot be awaited")
        self._steps = _stepsOf(awaitable)
        return self._steps.send(None)

    def _step(self, how: Callable[..., Any], value: Any) -> None:
        while True:
            try:
                awaited = self._runIn(how, value)
            except StopIteration as stop:
                self._settle(stop.value)
                return
            except BaseException:
                self._settle(Failure())
                return
            if not isinstance(awaited, Deferred):
                # Not something Twisted's reactor can wait for: given back, as
                # Deferred.fromCoroutine does.
                how, value = self._steps.send, awaited
                continue
            fired: list[Any] = []
            awaited.addBoth(self._fired, fired)
            if not fired:
                fired.append(None)
                self._waitingOn = awaited
                return
            how, value = self._resumption(fired[0])

    def _fired(self, outcome: Any, fired: list[Any]) -> None:
        if fired:
            # Later: the awaitable goes on from here.
            self._waitingOn = None
            self._step(*self._resumption(outcome))
        else:
            fired.append(outcome)

    def _resumption(self, outcome: Any) -> tuple[Callable[..., Any], Any]:
        if isinstance(outcome, Failure):
            return outcome.throwExceptionIntoGenerator, self._steps
        return self._steps.send, outcome

    def _settle(self, outcome: Any) -> None:
        # A cancelled wait may end after its Deferred has failed with CancelledError.
        if not self.result.called:
            if isinstance(outcome, Failure):
                self.result.errback(outcome)
            else:
                self.result.callback(outcome)

    def _cancel(self, _: Deferred[Any]) -> None:
        if self._waitingOn is not None:
            self._waitingOn.cancel()
