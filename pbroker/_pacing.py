"""
The transport a broker writes through: it learns when the connection stops taking data, so
that pagers wait and a peer that stops reading is eventually dropped.

:class:`PacedTransport` wraps the real transport and registers itself on it as a streaming
producer. The real transport pauses it when its buffer fills and resumes it when the buffer
drains. While paused, the bytes written are counted; past the broker's
``limits.bufferedBytes`` the connection is aborted if the real transport sends none of
what it holds for ``limits.stallTimeout`` seconds (a reader that reads, however slowly,
keeps it). Closing the connection through the wrapper writes what the broker still queues (the
rest of large messages) as the connection takes it, then unregisters the producer, since a TLS
transport will not close while a producer is registered on it, and closes the real transport;
a stall timer running then goes on running, so that a peer that reads none of what the closing
connection still holds is dropped, not held for ever. Everything else is delegated to the real
transport, whose interfaces the wrapper declares.

While the broker handles the messages of one read it may :meth:`~PacedTransport.hold` the
small writes their answers make and :meth:`~PacedTransport.release` them as one: a write to a
Twisted transport costs several calls, which a hundred pipelined answers would pay a hundred
times. Held bytes go out as soon as they reach :data:`HOLD_LIMIT`, so pacing still sees them.
The broker sends what handling a read wrote as soon as it is done, with
:meth:`~PacedTransport.flush`, and every so often in a long run of messages, so that the peer
starts on the first answers while this side works on the rest.
"""

from __future__ import annotations

import array
import socket
import sys
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy

try:
    import fcntl
    import termios
except ImportError:  # (not on Windows)
    _OUTQ: int | None = None
else:
    # SIOCOUTQ, which Linux gives sockets the number of a terminal's TIOCOUTQ.
    _OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None

__all__ = ["HOLD_LIMIT", "LARGE_CHUNK", "PacedTransport"]

#: Held writes are passed on once they add up to this many bytes (and a write this large is
#: never held), so the real transport's buffer limit still pauses a broker that writes a lot.
HOLD_LIMIT = 64 * 1024

#: A file descriptor transport (TCP, UNIX) sends up to this many bytes per reactor turn, where
#: Twisted sends 128 KiB, and reads up to this many at a time while a large message arrives,
#: where Twisted reads 64 KiB. A 4 MB echo over loopback takes about two thirds of the time.
LARGE_CHUNK = 1024 * 1024


def _pendingIn(transport: Any) -> int | None:
    """
    How many bytes ``transport`` holds, not yet sent: read from Twisted's file descriptor
    transports (and TLS over one), or asked of a transport with ``pendingBytes()``;
    ``None`` if it cannot tell.
    """
    if isinstance(transport, FileDescriptor):
        try:
            pending: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        except AttributeError:
            return None
        return pending
    pendingBytes = getattr(transport, "pendingBytes", None)
    if pendingBytes is not None:
        return int(pendingBytes())
    inner = getattr(transport, "transport", None)  # TLS: its encrypted bytes wait there
    if isinstance(inner, FileDescriptor):
        below = _pendingIn(inner)
        return None if below is None else below + _heldByTLS(transport)
    return None


#: The socket families whose send queue the kernel counts in bytes (TCP's).
_BYTE_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})


def _kernelUnsent(transport: Any, bytesOnly: bool = False) -> int | None:
    """
    How many bytes the kernel holds in the send queue of the socket under ``transport``
    (a TCP or UNIX transport, or TLS over one): on TCP, not yet acknowledged by the peer,
    which, once its receive buffer is full, acknowledges only as fast as it reads. ``None``
    where the system cannot tell (not Linux, no socket, or the socket is gone), and, with
    ``bytesOnly``, for a UNIX socket, whose count is the memory its packets take (768 for a
    message of 10 bytes), which tells whether the peer reads but not how much.

    The stall timer counts this besides what Twisted holds: the kernel's send buffer can
    take megabytes, and Twisted's transport is told it may send more only once a good
    part of that has drained, so a reader that takes a few kilobytes a second would show
    no progress in Twisted's buffer for longer than ``stallTimeout``.
    """
    if _OUTQ is None:
        return None
    sock = getattr(transport, "socket", None)
    if sock is None:
        sock = getattr(getattr(transport, "transport", None), "socket", None)  # TLS
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        return None
    if bytesOnly and getattr(sock, "family", None) not in _BYTE_FAMILIES:
        return None
    count = array.array("i", [0])
    try:
        fcntl.ioctl(fileno(), _OUTQ, count, True)
    except (OSError, ValueError):
        return None
    return count[0]


#: What the kernel's send queue must hold to count as waiting for the peer in
#: :meth:`PacedTransport.progress` (see :func:`_kernelUnsent`): the megabytes of a large
#: answer's end that a slow reader takes from it, not a few small messages in flight (pings,
#: which a hung peer's kernel still acknowledges while its receive buffer has room).
_KERNEL_BACKLOG = 64 * 1024


def _heldByTLS(transport: Any) -> int:
    """
    How many bytes Twisted's TLS transport ``transport`` holds before encrypting them: small
    writes it gathers until the reactor's next turn (up to 64 KB) and writes made before the
    handshake ends. Without them, bytes written just before a stalled peer's timer started
    would seem to arrive in the TCP transport's buffer from nowhere, cancelling out as much
    of what the peer read meanwhile. Counted as written: encryption adds about 0.2% to
    what goes on to TCP, which a reader's progress must exceed.
    """
    held = 0
    gathered = getattr(getattr(transport, "_aggregator", None), "_buffer", None)
    for chunks in (gathered, getattr(transport, "_appSendBuffer", None)):
        if isinstance(chunks, list):
            held += sum(map(len, chunks))
    return held


def _idle(real: Any) -> bool:
    """
    Whether the file descriptor transport ``real`` has nothing buffered and no TLS started
    on it (TCP's startTLS: its bytes must be encrypted), so that bytes may go straight to its
    socket. Read from Twisted's attributes; should they change, never.
    """
    return not getattr(real, "TLS", False) and _pendingIn(real) == 0


class PacedTransport:
    """
    A transport wrapper that paces a broker's writes (see the module docstring).
    """

    _log = Logger()

    def __init__(self, transport: Any, broker: Any) -> None:
        self._transport = transport
        self._broker = broker
        self.paused = False
        self.bufferedWhilePaused = 0
        # Bytes of large messages queued behind another while paused (see queued).
        self.queuedWhilePaused = 0
        # Bytes of messages for the peer the broker keeps, last said while paused (see
        # kept), and of its own it kept while paused (see keptOwn).
        self.keptWhilePaused = 0
        self.ownKeptWhilePaused = 0
        self.written = 0
        #: Whether abortConnection() was called: nothing more is sent.
        self.aborted = False
        #: Whether loseConnection() was called: what the broker queued is being written.
        self.closing = False
        #: Whether the real transport was then closed, all of it written.
        self.closed = False
        self._registered = False
        # The timer that drops the peer if it stays paused with too much waiting (see _over).
        self._stall: Any = None
        self._held: list[bytes] | None = None
        self._heldSize = 0
        directlyProvides(self, providedBy(transport))
        # The real transport's own read size, while no large message arrives (see readLarge).
        self._readSize: int | None = None
        if isinstance(transport, FileDescriptor):
            self._readSize = transport.bufferSize
            transport.SEND_LIMIT = max(transport.SEND_LIMIT, LARGE_CHUNK)
        registerProducer = getattr(transport, "registerProducer", None)
        if registerProducer is not None:
            registerProducer(self, True)
            self._registered = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        size = len(data)
        self.written += size
        held = self._held
        if held is not None:
            if size < HOLD_LIMIT:
                held.append(data)
                self._heldSize += size
                if self._heldSize >= HOLD_LIMIT:
                    self._passHeld()
                return
            if held:
                self._passHeld()
        # _pass(data), inline: this is the path of every write that is not held. A write
        # counts as waiting for the peer only if the transport was paused before it: the
        # write that fills the connection (Twisted pauses the producer within it) was taken.
        paused = self.paused
        self._transport.write(data)
        if paused:
            self.bufferedWhilePaused += size
            self._checkBuffered()

    def _pass(self, data: bytes) -> None:
        paused = self.paused
        self._transport.write(data)
        if not paused:
            return
        self.bufferedWhilePaused += len(data)
        self._checkBuffered()

    def _passHeld(self) -> None:
        held = self._held
        if held:
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            self._heldSize = 0
            self._pass(data)

    def flush(self) -> None:
        """
        Pass on what is held, and have the real transport send what it buffers now rather
        than when the reactor next polls.

        Twisted's TCP and UNIX transports (file descriptors) send what they are given only
        on the reactor's next turn, once it has polled the socket again: a turn each side of
        every round trip would spend on that alone, and the answers to a long run of
        pipelined calls would all wait for the end of the run. Held bytes the transport
        would only buffer (it has nothing buffered) are sent straight away, without
        registering the socket for writing and unregistering it again once they are sent.
        Other transports (TLS, test fakes) are only passed the held bytes. Nothing is sent
        early while the transport is paused, closing or half-closed, or has another
        producer: the reactor keeps those cases.
        """
        # (Any: FileDescriptor's methods are not annotated.)
        real: Any = self._transport if isinstance(self._transport, FileDescriptor) else None
        if (
            real is None
            or real.producer is not self
            or self.paused
            or not real.connected
            or real.disconnecting
            or getattr(real, "_writeDisconnecting", False)
        ):
            self._passHeld()
            return
        held = self._held
        if held and _idle(real):
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            self._heldSize = 0
            sent = real.writeSomeData(data)
            if isinstance(sent, int) and sent == len(data):
                return
            # The rest (or, after an error, all of it) goes the transport's way, below.
            real.write(data[sent:] if isinstance(sent, int) and sent > 0 else data)
        else:
            self._passHeld()
        if _pendingIn(real) == 0:
            # Nothing to send (the messages handled wrote nothing, or it all went above).
            # Not even an empty send: on a connection the peer reset it fails, and the
            # handling below would stop reading a transport not registered as a writer,
            # which no reactor then polls, so its loss would never be reported.
            return
        # What the reactor does when the socket is writable. (Bytes wait in the transport:
        # it is registered as a writer.)
        failed = real.doWrite()
        if failed:
            # The send failed, and took the socket's error with it. The transport is
            # still registered as a writer; once it no longer reads, the reactor's next
            # poll reports the connection lost, not closed cleanly by the peer.
            real.stopReading()

    def readLarge(self, large: bool) -> None:
        """
        Have a file descriptor transport read up to :data:`LARGE_CHUNK` bytes at a time while
        ``large`` (a large message is arriving), and its own amount otherwise.

        Twisted reads at most 64 KiB per reactor turn, so a large message costs a turn per
        64 KiB. A larger read is not worth it for small messages: each read allocates its
        whole size, and for a 60 KB message that doubled the system time.
        """
        if self._readSize is not None:
            self._transport.bufferSize = LARGE_CHUNK if large else self._readSize

    def hold(self) -> bool:
        """
        Keep small writes until :meth:`release`; whether this call started holding (a
        nested call does not, and its caller must not release).
        """
        if self._held is not None:
            return False
        self._held = []
        self._heldSize = 0
        return True

    def release(self) -> None:
        """
        Write what was held, and stop holding.
        """
        self._passHeld()
        self._held = None

    def queued(self, size: int, allowance: int) -> None:
        """
        Count ``size`` bytes the broker keeps to write later (a large message waiting behind
        another) if the transport is paused: they wait for the peer too. Past the broker's
        ``limits.bufferedBytes`` and ``allowance`` more (the largest message the peer
        accepts, so that any one such message can always wait) the connection is dropped.
        """
        if self.paused:
            self.queuedWhilePaused += size
            self._check(self.queuedWhilePaused, allowance)
            self._checkHolding()

    def kept(self, total: int, allowance: int) -> None:
        """
        The broker keeps ``total`` bytes of messages for the peer to write later, behind
        large messages: while the transport is paused, they wait for the peer as written
        ones do. Past the broker's ``limits.bufferedBytes`` and ``allowance`` more (the
        message just kept: any one message may wait), the peer is dropped as one with that
        much written for it is: at once while the broker overflows, else if its connection
        stays full ``limits.stallTimeout`` seconds. (While the connection takes data, the
        peer reads: what is kept goes as the large messages before it do.)
        """
        if self.paused:
            self.keptWhilePaused = total
            self._check(total, allowance)
            self._checkHolding()

    def keptOwn(self, size: int) -> None:
        """
        The broker keeps ``size`` bytes of a message of its own (not an answer) to write
        later, behind large messages: counted as a write is, only if the transport is
        paused, until it resumes. Past the broker's ``limits.bufferedBytes`` and ``size``
        more (any one message may wait), the peer is dropped as it is when that much is
        written for it. (What was kept while the connection took data waits for the large
        messages before it, not for the peer: a reader of a long answer is not dropped at
        a moment of a full connection for what this side kept meanwhile.)
        """
        if self.paused:
            self.ownKeptWhilePaused += size
            self._check(self.ownKeptWhilePaused, size)

    def overflowed(self) -> None:
        """
        The broker handles the peer's messages after all (it sent too much while its
        connection took nothing): if more than ``limits.bufferedBytes`` waits for it already
        (the stall timer runs), it is dropped now, as one is whose overflow came first.
        """
        if self._stall is not None:
            over = self._overLimit()
            if over is not None:  # (else what was over no longer waits: the timer decides)
                self._dropNonReader(*over)

    def _checkHolding(self) -> None:
        """
        Start the stall timer if more than ``limits.bufferedBytes`` of messages for the peer
        wait behind the one being sent while the connection takes nothing, though they are
        within what may wait (answers made before it filled, say): a peer that takes none
        of it for ``stallTimeout`` seconds stopped reading, and may not hold it for ever.
        """
        timeout = self._broker.limits.stallTimeout
        if (
            self._stall is None
            and timeout is not None
            and self._broker.waitingForPeer() > self._broker.limits.bufferedBytes
        ):
            self._armStallTimer(timeout, self._broker.limits.bufferedBytes)

    def _checkBuffered(self) -> None:
        self._check(self.bufferedWhilePaused, 0)

    def _check(self, count: int, allowance: int) -> None:
        """
        :meth:`_over` if ``count`` bytes waiting for the peer are more than the broker's
        ``limits.bufferedBytes`` and ``allowance``.
        """
        limit = self._broker.limits.bufferedBytes + allowance
        if count > limit:
            self._over(count, limit)

    def _over(self, count: int, limit: int) -> None:
        """
        More than ``limit`` bytes wait for a peer whose connection takes no data: drop it
        unless it takes some within ``limits.stallTimeout`` seconds. A reader that asked for
        many answers at once and reads them keeps its connection; one that stopped reading
        is dropped. While the broker handles the peer's messages although the connection is
        full (it sent too much meanwhile: ``overflowing``), the peer is dropped at once.
        """
        timeout = self._broker.limits.stallTimeout
        if timeout is None and self.closed:
            # The real transport is closed and writes what it holds; nothing resumes this
            # one, so ``paused`` is as the close left it, and an answer made since (handed
            # over unpaced) says nothing of the peer. Without stallTimeout the connection
            # waits for the peer, as it did while closing.
            return
        if timeout is None or self._broker.overflowing:
            self._dropNonReader(count, limit)
        elif self._stall is None:
            self._armStallTimer(timeout, limit)

    def _armStallTimer(self, timeout: float, limit: int) -> None:
        transport = self._transport
        mark = (self.written, _pendingIn(transport), _kernelUnsent(transport))
        self._stall = self._broker.clock.callLater(timeout, self._stalled, timeout, limit, mark)

    def _stalled(
        self, timeout: float, limit: int, mark: tuple[int, int | None, int | None]
    ) -> None:
        """
        ``timeout`` seconds after more than ``limit`` bytes waited: drop the peer unless the
        connection drained (it resumed this producer) or the peer took some of what waits
        for it since ``mark`` (bytes written then, held by the real transport then, and by
        the kernel then where it says, see :func:`_kernelUnsent`), or nothing waits over its
        limit now.
        """
        self._stall = None
        if not (self.paused or self.closed):
            return
        if getattr(self._broker, "disconnected", False):
            return
        transport = self._transport
        pending = _pendingIn(transport)
        written, pendingThen, kernelThen = mark
        kernel = _kernelUnsent(transport)
        if kernel is not None and kernelThen is not None and pending is not None:
            pending += kernel
            if pendingThen is not None:
                pendingThen += kernelThen
        if (
            pending is not None
            and pendingThen is not None
            and pendingThen + (self.written - written) - pending > 0
        ):
            self._armStallTimer(timeout, limit)  # a slow reader, but a reader
            return
        if self.closed:
            # The real transport is closed: it holds what it has still to send (an answer
            # made since, say), and ``paused`` is as the close left it. Nothing sent since
            # the mark: the peer takes none of it.
            if pending:
                self._dropNonReader(pending, 0)
            return
        over = self._overLimit()
        if over is None and self.closing and not self.closed:
            queued = self._broker.queuedBytes()
            if queued:
                # What a closing connection still has to write for a peer that took none
                # of it: the connection would never close.
                over = queued, 0
        if over is None:
            waiting = self._broker.waitingForPeer()
            if waiting <= self._broker.limits.bufferedBytes:
                return  # what was over the limit no longer waits (kept, cancelled unsent)
            over = waiting, self._broker.limits.bufferedBytes
        self._dropNonReader(*over)

    def _overLimit(self) -> tuple[int, int] | None:
        """
        A count of what waits for the peer, since the transport paused, that is over its
        limit, and that limit; ``None`` if none is: written or kept bytes over
        ``limits.bufferedBytes``, or large messages queued over that and the largest
        message the peer accepts (see :meth:`queued`). Each against its own: the timer may
        have been armed by another.
        """
        buffered: int = self._broker.limits.bufferedBytes
        allowance: int = getattr(self._broker, "peerMessageSize", None) or 0
        for count, limit in (
            (self.bufferedWhilePaused, buffered),
            (self.keptWhilePaused, buffered),
            (self.ownKeptWhilePaused, buffered),
            (self.queuedWhilePaused, buffered + allowance),
        ):
            if count > limit:
                return count, limit
        return None

    def progress(self) -> tuple[int, int] | None:
        """
        How many of the bytes written through this wrapper the real transport has sent
        (and, on TCP where the kernel says, the kernel has sent on, see
        :func:`_kernelUnsent`), and how many wait in the real transport or here, or
        ``None`` if the real transport cannot tell.

        While bytes wait here, the kernel's send buffer is full, and what it sends on is what
        the peer reads: a slow reader of a large answer is seen taking it, although the
        megabytes of that buffer tell the real transport nothing for longer. What the kernel
        holds counts as waiting too once it is a backlog (see :data:`_KERNEL_BACKLOG`): the
        end of a large answer, all handed to the kernel, waits for the peer as well.
        """
        transport = self._transport
        pending = _pendingIn(transport)
        if pending is None:
            return None
        waiting = pending + self._heldSize
        # (In bytes only: the take timer counts how much moved.)
        kernel = _kernelUnsent(transport, bytesOnly=True) or 0
        sent = self.written - waiting - kernel
        if kernel >= _KERNEL_BACKLOG:
            # The rest of a large answer, all handed to the kernel: the peer reads it as
            # slowly as before (its pong waits behind it), though nothing waits here.
            waiting += kernel
        return sent, waiting

    def stopStallTimer(self) -> None:
        """
        Forget a pending drop (the connection is gone, or took data).
        """
        stall, self._stall = self._stall, None
        if stall is not None and stall.active():
            stall.cancel()

    def _dropNonReader(self, count: int, limit: int) -> None:
        # (What a closing connection still has to write has no limit of its own: "limit 0"
        # read as a misconfigured one.)
        if limit == 0 and self.closing:
            why = "the connection is closing; it took none for stallTimeout"
        else:
            why = f"limit {limit}"
        self._log.warn(
            "Dropping a peer that stopped reading: {count} bytes wait for it ({why})",
            count=count,
            limit=limit,
            why=why,
        )
        self.paused = False
        # What the peer sent meanwhile is not handled as the connection goes (as it is
        # when a peer closes): this peer misbehaved.
        self._broker.discardBacklog()
        self.abortConnection()

    def writeSequence(self, data: list[bytes]) -> None:
        self._passHeld()
        paused = self.paused  # (see write)
        writeSequence = getattr(self._transport, "writeSequence", None)
        if writeSequence is None:
            self._transport.write(b"".join(data))
        else:
            writeSequence(data)
        size = sum(len(chunk) for chunk in data)
        self.written += size
        if paused:
            self.bufferedWhilePaused += size
            self._checkBuffered()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    def loseConnection(self) -> None:
        """
        Close the connection once what was written, and what the broker queued to write (the
        rest of its large messages, see ``Broker.writeQueued``), is sent.

        What the broker queued goes as the connection takes it, as it would have if the
        connection stayed open, so that closing takes no more memory than sending does; the
        real transport is closed once all of it is written. Meanwhile nothing the peer
        sends is handled. A peer that takes none of it for ``limits.stallTimeout`` seconds
        is dropped (``stallTimeout=None``: the connection waits for it). When the real
        transport is closed while it still holds some, a stall timer watches it (or the one
        running goes on), though that transport no longer pauses or resumes this producer:
        a peer that stops reading what it holds (an answer made since included) is dropped
        as it would be if the connection stayed open, rather than held for ever (the
        connection closes once it has read it all).
        """
        if self.closing or self.aborted:
            return
        self.closing = True
        self._passHeld()
        self._closeOnceWritten()

    def _closeOnceWritten(self) -> None:
        """
        Write what the broker queued while the connection takes data, and close the real
        transport once all of it is written (:meth:`resumeProducing` comes back until then).
        """
        writeQueued = getattr(self._broker, "writeQueued", None)
        if writeQueued is not None:
            written = writeQueued()
            if self.aborted:
                return  # the peer was dropped meanwhile: more waits than it may hold
            self._passHeld()  # (the last fragment of a message may have been held)
            if not written and not getattr(self._broker, "disconnected", False):
                if self.paused:
                    # The closing connection is full: the peer takes the rest, or is dropped.
                    self._watchClosing()
                return
        self.closed = True
        self._unregister()
        self._transport.loseConnection()
        if not getattr(self._broker, "disconnected", False) and _pendingIn(self._transport):
            # It sends what it holds; a peer that takes none of it (or of an answer made
            # since, written after it) for stallTimeout seconds is dropped, rather than
            # keeping the connection and that memory for as long as it stays up.
            self._watchClosing()

    def _watchClosing(self) -> None:
        """
        Start the stall timer for what the closing connection still has to send (it has no
        limit of its own), unless one runs or there is no ``limits.stallTimeout``.
        """
        timeout = self._broker.limits.stallTimeout
        if timeout is not None and self._stall is None:
            self._armStallTimer(timeout, 0)

    def abortConnection(self) -> None:
        self.aborted = True
        self._held = None  # aborting discards what was not sent, held or buffered
        self.stopStallTimer()
        self._unregister()
        abort = getattr(self._transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self._transport.loseConnection()

    # IPushProducer, for the real transport

    def pauseProducing(self) -> None:
        self.paused = True
        self._checkHolding()

    def resumeProducing(self) -> None:
        self.paused = False
        self.bufferedWhilePaused = self.queuedWhilePaused = 0
        self.keptWhilePaused = self.ownKeptWhilePaused = 0
        self.stopStallTimer()
        if self.closing:
            self._closeOnceWritten()
            return
        self._broker.transportResumed()

    def stopProducing(self) -> None:
        self.stopStallTimer()
        self._registered = False
        self._broker.pageProducers = []
