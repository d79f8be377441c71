"""
The streams of one native-dialect connection: which the peer reads from us, which we read
from the peer, and the messages that move them (``credit``, ``item``, ``end``,
``streamerror``, ``streamcancel``).

A :class:`StreamTable` belongs to a broker. It owns the two tables and the stream ids, and
talks to the connection only through the small surface :class:`Connection` describes, so the
broker keeps the framing and the table keeps the bookkeeping. The ends themselves
(:class:`~pbroker.stream.RemoteStream`, :class:`~pbroker.stream.OutgoingStream`) call back
into the table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import chain, islice
from typing import Any, Protocol
from weakref import WeakSet, WeakValueDictionary

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from pbroker._native import Spliced, Unpacked
from pbroker.errors import InvalidJelly, LimitExceeded, ProtocolError, describe
from pbroker.stream import OutgoingStream, RemoteStream, Stream, unclosedStreams

__all__ = ["Connection", "StreamTable"]


class Connection(Protocol):
    """
    What a :class:`StreamTable` needs of its broker.
    """

    disconnected: bool
    limits: Any
    serializingPerspective: Any
    streamWindow: int
    _postponed: list[Any]

    @property
    def clock(self) -> Any: ...

    @property
    def quietFailures(self) -> tuple[type[BaseException], ...]: ...

    @property
    def _canSend(self) -> bool: ...

    def _canStream(self) -> bool: ...

    def sendCall(self, *expression: Any) -> None: ...

    def _sendBehindLarge(self, *expression: Any, keys: Any = None) -> None: ...

    def _streamKeys(self, streamID: int, registrations: Any = None) -> Any: ...

    def serialize(self, object: Any, perspective: Any = None) -> Any: ...

    def _takeRegistrations(self, netValue: Any) -> list[tuple[Any, int]] | None: ...

    def _unregister(
        self, registrations: list[tuple[Any, int]] | None, failure: Failure | None = None
    ) -> None: ...

    def _sendPostponed(self) -> None: ...

    def _afterSerializing(self, result: Any) -> Any: ...

    def unserialize(self, sexp: Any, perspective: Any = None) -> Any: ...

    def _serializeFailure(self, failure: Any) -> Any: ...

    def _unserializeFailure(self, netFailure: Any) -> Failure: ...

    def _dropLateValue(self, netValue: Any) -> None: ...

    def _sendFailure(
        self, send: Callable[..., None], command: bytes, key: int, failure: Any
    ) -> None: ...

    def _logFailure(self, message: str, failure: Failure) -> None: ...


_log = Logger()

# The stream each source is being sent as, by the source's id, in this process: a sender
# keeps its source alive, so the id names that source until the sender is gone.
_feeding: WeakValueDictionary[int, OutgoingStream] = WeakValueDictionary()


def _beingSent(source: Any) -> bool:
    """
    Whether ``source`` feeds a stream being sent, on any connection.
    """
    sender = _feeding.get(id(source))
    return sender is not None and sender._source is source and not sender._done


def refusedStreams(error: Exception, *values: Any) -> Exception:
    """
    ``error``, after closing with it each :class:`Stream` among ``values`` that it refuses
    to send and that nothing else uses: it will never be sent, and its writer (a publisher
    that keeps its streams) must learn so, as when sending one fails (see
    :attr:`Stream.closed`). One already closed, being sent, or read by anything yet (here,
    or by a sender) is left as it is.
    """
    for value in values:
        if (
            isinstance(value, Stream)
            and not value.closed
            and not value._read
            and not _beingSent(value)
        ):
            try:
                value.close(Failure(error))
            except Exception:
                # (Its push producer's stopProducing raised.) The refusal goes on: the
                # caller's error, and the other streams, are what matter here.
                _log.failure("Error closing a refused stream")
    return error


# The most items findStreams looks at: a value refused for its size costs this at most.
_SEARCHED_ITEMS = 1_000_000

# The containers the native codec sends streams in.
_SEARCHED_CONTAINERS = frozenset({list, tuple, set, frozenset, dict})


def findStreams(values: Iterable[Any], budget: int = _SEARCHED_ITEMS) -> list[Stream]:
    """
    The :class:`Stream` objects among ``values`` and in the lists, tuples, sets and dicts in
    them, each container looked into once, ``budget`` items at most: those of a value refused
    before packing reached them, which :func:`refusedStreams` closes.
    """
    found: list[Stream] = []
    if not unclosedStreams:
        return found  # none to find: a large value is not walked for nothing
    seen: set[int] = set()
    # A stack walked in order (each container's items pushed reversed): the first items
    # of the value are the ones looked at.
    pending = list(islice(values, budget))
    budget -= len(pending)
    pending.reverse()
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind in _SEARCHED_CONTAINERS:
            if budget > 0 and id(value) not in seen:
                seen.add(id(value))
                items = chain.from_iterable(value.items()) if kind is dict else value
                more = list(islice(items, budget))
                budget -= len(more)
                more.reverse()
                pending.extend(more)
        elif issubclass(kind, Stream):  # by type: no __class__ of the application's is run
            found.append(value)
    return found


# What an unread item costs besides its packed bytes (its place in the reader's queues, and
# an object at least), counted with them: many small items are bounded as few large ones.
_ITEM_OVERHEAD = 64


def _unreadBytesOf(reader: RemoteStream) -> int:
    return reader.unreadBytes


def _packedSize(data: Any) -> int:
    """
    The bytes a received value took: packed, or with the large byte strings the frame
    decoder already put together (alone, the one item of a list, or spliced).
    """
    kind = type(data)
    if kind is bytes or kind is memoryview:
        return len(data)
    if kind is Spliced:
        size: int = data.size
        return size
    if kind is Unpacked:
        value = data.value
        if type(value) is list and value:
            value = value[0]
        if isinstance(value, (bytes, bytearray, memoryview)):
            return len(value)
    return 0


class StreamTable:
    """
    The streams of one connection (see the module docstring).

    :ivar currentStreamID: the id of the last stream this side sent.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.currentStreamID = 0
        #: Our streams the peer reads, by id.
        self.outgoing: dict[int, OutgoingStream] = {}
        # Those that stopped with credit left because the connection took no more (see
        # stalled): the only ones pump() wakes, in the order they stopped.
        self._stalled: OrderedDict[int, OutgoingStream] | None = None
        # The tables of the peer's streams are made when it first sends one: most connections
        # never do, and the two cost ~1 KiB each time a connection is made.
        self._incoming: WeakValueDictionary[int, RemoteStream] | None = None
        self._cancelled: set[int] | None = None
        # Whether a stream was stopped past the cap of cancelled ones (see cancel), and the
        # highest id of the peer's streams opened so far.
        self._cancelledOverflow = False
        self._highestIncoming = 0
        # Readers someone waits on (a next() or collect() pending): held, so that a reader
        # only they refer to is not collected (and cancelled) before its items come.
        self._waitedOn: dict[int, RemoteStream] = {}
        #: Bytes of items of the peer's streams received and not read yet (see admit), and
        #: the readers holding them (ended ones too).
        self.unreadBytes = 0
        self._holding: WeakSet[RemoteStream] | None = None
        #: What the readers' credit not used yet may bring, at their items' sizes.
        self.promisedBytes = 0

    @property
    def incoming(self) -> WeakValueDictionary[int, RemoteStream]:
        """
        The peer's streams we read, by the peer's id; held weakly, so that a reader dropped
        unread is collected, and its __del__ cancels it.
        """
        if self._incoming is None:
            self._incoming = WeakValueDictionary()
        return self._incoming

    @property
    def cancelled(self) -> set[int]:
        """
        The peer's streams we cancelled whose last message has not arrived yet.
        """
        if self._cancelled is None:
            self._cancelled = set()
        return self._cancelled

    # What the ends call

    @property
    def clock(self) -> Any:
        return self._connection.clock

    @property
    def disconnected(self) -> bool:
        return self._connection.disconnected

    def canStream(self) -> bool:
        return self._connection._canStream()

    def keepReader(self, reader: RemoteStream) -> None:
        self._waitedOn[reader.streamID] = reader

    def dropReader(self, reader: RemoteStream) -> None:
        self._waitedOn.pop(reader.streamID, None)

    @property
    def streamBytes(self) -> int:
        return int(self._connection.limits.streamBytes)

    def promise(self, delta: int) -> None:
        """
        A reader's credit not used yet may bring ``delta`` more bytes (see
        RemoteStream._refill).
        """
        self.promisedBytes += delta

    def unread(self, reader: RemoteStream, delta: int) -> None:
        """
        ``reader`` now holds ``delta`` more bytes of unread items (fewer, if negative), as
        its ``unreadBytes`` already says.
        """
        self.unreadBytes += delta
        held = reader.unreadBytes
        if held == delta > 0:  # it held none
            if self._holding is None:
                self._holding = WeakSet()
            self._holding.add(reader)
        elif held <= 0 and self._holding is not None:
            self._holding.discard(reader)

    def collected(self, size: int, promised: int) -> None:
        """
        A reader holding ``size`` bytes of unread items, and credit for ``promised`` more,
        was collected (it leaves ``_holding`` by itself).
        """
        self.unreadBytes -= size
        self.promisedBytes -= promised

    def admit(self, reader: RemoteStream, size: int) -> bool:
        """
        Make room for an item of ``size`` bytes that ``reader`` is to keep unread: while
        the unread items of the peer's streams would pass ``limits.streamBytes`` (and any
        are held), the stream holding the most fails with ``LimitExceeded``, its unread
        items dropped, and is stopped. So what a peer that sends streams nobody reads (to a
        method that keeps its arguments, say) makes this side hold is bounded, whatever its
        items' sizes and however many streams it sends. ``False`` if that was ``reader``:
        the item is dropped too.
        """
        limit = self.streamBytes
        while self.unreadBytes and self.unreadBytes + size > limit and self._holding:
            victim = max(self._holding, key=_unreadBytesOf)
            if not victim.unreadBytes:
                break  # (does not happen: the readers held hold some)
            error = LimitExceeded(
                f"more than {limit} bytes of stream items were received and not read "
                f"(BrokerLimits.streamBytes): stream {victim.streamID}, which held "
                f"{victim.unreadBytes} of them, was dropped"
            )
            victim._evict(Failure(error))
            if victim is reader:
                return False
        return True

    def grantCredit(self, streamID: int, count: int) -> None:
        if self._connection._canSend:
            self._connection.sendCall(b"credit", streamID, count)

    def cancel(self, streamID: int) -> None:
        """
        Stop reading the peer's stream ``streamID`` (the reader cancelled, failed, or was
        dropped unread and collected).
        """
        self.incoming.pop(streamID, None)
        # (One in a value refused as it arrived is stopped without being opened.)
        if streamID > self._highestIncoming:
            self._highestIncoming = streamID
        if streamID in self.cancelled or not self._connection._canSend:
            return
        if len(self.cancelled) >= self._connection.limits.importedReferences:
            # A peer that does not end what this side stops (a well-behaved one ends each
            # soon, its end sent behind any large message it is sending: thousands can
            # wait behind a long upload): this stream is told to stop all the same, but not
            # remembered. From now on a message for a stream the peer opened earlier and
            # this side does not know is taken for one of these, and dropped (as a late
            # answer is once too many calls were cancelled to remember).
            self._cancelledOverflow = True
        else:
            self.cancelled.add(streamID)
        self._connection.sendCall(b"streamcancel", streamID)

    def afterSerializing(self, pending: Deferred[Any]) -> Deferred[Any]:
        """
        ``pending`` (an item on its way), held back if it fires while the broker serialises
        a value: the item may name what that value sends first.
        """
        return pending.addBoth(self._connection._afterSerializing)

    def sendItem(self, streamID: int, item: Any, perspective: Any) -> None:
        connection = self._connection
        try:
            netItem = connection.serialize(item, perspective)
            registrations = connection._takeRegistrations(netItem)
            try:
                keys = connection._streamKeys(streamID, registrations)
                connection._sendBehindLarge(b"item", streamID, netItem, keys=keys)
            except Exception:
                # Not sent: it exports nothing, and its streams are closed with why.
                connection._unregister(registrations, Failure())
                raise
        finally:
            if connection._postponed:
                connection._sendPostponed()  # what a hook in the item completed goes after it

    def ended(self, streamID: int, failure: Failure | None) -> None:
        connection = self._connection
        if self.outgoing.pop(streamID, None) is None or not connection._canSend:
            return
        if failure is None:
            connection._sendBehindLarge(b"end", streamID, keys=connection._streamKeys(streamID))
            return
        if failure.check(*connection.quietFailures) is None:
            connection._logFailure("Peer will receive the following stream error", failure)
        connection._sendFailure(connection._sendBehindLarge, b"streamerror", streamID, failure)

    # What the codec calls

    def register(self, source: Any) -> int:
        """
        Send ``source`` (an iterator, async iterator or Stream) as a new stream; its id.
        """
        if _beingSent(source):
            # Two readers, on this connection or another, would each get some of its items.
            raise ValueError(
                f"this {type(source).__name__} is already being sent as a stream: one "
                "source feeds one stream"
            )
        limit = self._connection.limits.pendingCalls
        if len(self.outgoing) >= limit:
            error = LimitExceeded(f"more than {limit} streams are being sent")
            raise refusedStreams(error, source)
        self.currentStreamID += 1
        streamID = self.currentStreamID
        sender = OutgoingStream(self, streamID, source, self._connection.serializingPerspective)
        self.outgoing[streamID] = _feeding[id(source)] = sender
        return streamID

    def open(self, streamID: int) -> RemoteStream:
        """
        The reading end of the peer's stream ``streamID``, which a value just named.
        """
        if streamID in self.incoming or streamID in self.cancelled:
            raise InvalidJelly(f"the peer sent stream {streamID} twice")
        limit = self._connection.limits.pendingCalls
        if len(self.incoming) >= limit:
            raise LimitExceeded(f"the peer sent more than {limit} streams")
        reader = self.incoming[streamID] = RemoteStream(
            self, streamID, self._connection.streamWindow
        )
        if streamID > self._highestIncoming:
            self._highestIncoming = streamID
        reader._start()
        return reader

    # What the broker calls

    def stalled(self, sender: OutgoingStream) -> None:
        """
        ``sender`` has credit left, but stopped because the connection takes no more data:
        :meth:`pump` wakes it. (A stream with no credit waits for the reader's, and one whose
        source is busy for its item; each wakes itself.)
        """
        if self._stalled is None:
            self._stalled = OrderedDict()
        self._stalled.setdefault(sender.streamID, sender)

    def pump(self) -> None:
        """
        Let the streams that stopped with credit left send again (the connection takes data
        again), each in turn: the work is theirs, however many other streams are open.
        """
        stalled = self._stalled
        if not stalled:
            return
        outgoing = self.outgoing
        # Each once at most: one that stops again goes behind the others. Once the
        # connection takes no more (a large item was sent), the rest keep their turn.
        for _ in range(len(stalled)):
            if not stalled or not self.canStream():
                return
            streamID, sender = stalled.popitem(last=False)
            if outgoing.get(streamID) is sender:
                sender.pump()

    def drop(self, streamIDs: list[int], failure: Failure | None = None) -> None:
        """
        Forget these streams of ours, closing their sources: with ``failure``, why the value
        that carried them was not sent.
        """
        for streamID in streamIDs:
            sender = self.outgoing.pop(streamID, None)
            if sender is not None:
                sender.connectionLost(failure)

    def connectionLost(self, reason: Any) -> None:
        self._stalled = None
        outgoing, self.outgoing = self.outgoing, {}
        for sender in outgoing.values():
            sender.connectionLost()
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            for reader in list(incoming.values()):
                reader._connectionLost(reason)

    # The peer's messages

    def credit(self, streamID: Any, count: Any) -> None:
        if type(streamID) is not int or type(count) is not int or count < 1:
            raise ProtocolError(f"malformed stream credit: {describe([streamID, count])}")
        sender = self.outgoing.get(streamID)
        if sender is not None:  # else it ended while the credit was on its way
            sender.credit(count)

    def streamCancel(self, streamID: Any) -> None:
        sender = self.outgoing.get(streamID) if type(streamID) is int else None
        if sender is not None:
            sender.cancel()

    def _reader(self, streamID: Any) -> RemoteStream | None:
        if type(streamID) is not int:
            raise ProtocolError(f"a malformed stream id: {describe(streamID)}")
        reader = self.incoming.get(streamID)
        if (
            reader is None
            and streamID not in self.cancelled
            and not (self._cancelledOverflow and 0 < streamID <= self._highestIncoming)
        ):
            raise ProtocolError(f"a message for an unknown stream: {describe(streamID)}")
        return reader

    def item(self, streamID: Any, data: Any) -> None:
        reader = self._reader(streamID)
        if reader is None:
            # Sent before our cancel reached the peer: dropped, but decoded all the same, so
            # that the references in it are released.
            self._connection._dropLateValue(data)
            return
        try:
            item = self._connection.unserialize(data)
        except Exception:
            # Refused or malformed: this stream fails (and stops), the connection stays.
            reader._failed(Failure())
            self.cancel(streamID)
            return
        reader._itemReceived(item, _packedSize(data) + _ITEM_OVERHEAD)

    def end(self, streamID: Any) -> None:
        reader = self._reader(streamID)
        self.incoming.pop(streamID, None)
        self.cancelled.discard(streamID)
        if reader is not None:
            reader._ended()

    def streamError(self, streamID: Any, data: Any) -> None:
        reader = self._reader(streamID)
        self.incoming.pop(streamID, None)
        self.cancelled.discard(streamID)
        if reader is not None:
            reader._failed(self._connection._unserializeFailure(data))
        else:
            self._connection._dropLateValue(data)
