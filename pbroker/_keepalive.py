"""
Dead-peer detection for one connection: when to ping, and when to give up.

:class:`KeepaliveTimer` knows nothing of the wire: the broker tells it when data arrives
(:meth:`~KeepaliveTimer.heard`) and gives it two callables, one that sends a ping and one that
drops the connection. One delayed call is pending at a time, scheduled for the next moment
something is due, so an idle connection costs one timer, not a tick per second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pbroker.errors import isSeconds, toSeconds

__all__ = ["Keepalive", "KeepaliveTimer"]


#: The shortest :class:`Keepalive` interval, in seconds.
MIN_INTERVAL = 0.001


@dataclass(frozen=True)
class Keepalive:
    """
    Dead-peer detection: when nothing has arrived for ``interval`` seconds the broker sends a
    ping, and another every ``interval`` seconds while the peer stays silent. When nothing
    has arrived for ``timeout`` seconds (longer than ``interval``) and the first of those
    pings has gone unanswered for ``timeout - interval`` seconds since it left, the
    connection is closed and every pending call fails with
    :class:`~pbroker.errors.PBConnectionLost`. On a responsive reactor both come to the
    same moment, ``timeout`` seconds after the peer was last heard; a process that was
    itself blocked pings first, and gives the peer that time to answer after the ping
    leaves. A peer that is taking a backlog this side sends (a large answer it reads
    slowly) counts as heard, as its answer to a ping waits behind it. The time counts from
    the connection, so a peer that connects and never says anything is dropped too.

    A pbroker peer answers the ping; a stock Twisted peer is pinged with a call to an object
    that does not exist, whose error answer serves as well, so keepalive works in every
    dialect.
    """

    interval: float = 30.0
    timeout: float = 90.0

    def __post_init__(self) -> None:
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not isSeconds(value):
                raise TypeError(f"the Keepalive {name} must be a number of seconds, not {value!r}")
            object.__setattr__(self, name, toSeconds(value))
        if not self.interval > 0 or not self.timeout > 0:
            raise ValueError("Keepalive interval and timeout must be positive")
        if self.interval < MIN_INTERVAL:
            # A shorter one pings on every turn of the reactor, flooding the peer.
            raise ValueError(
                f"the Keepalive interval must be at least {MIN_INTERVAL} seconds, "
                f"not {self.interval!r}"
            )
        if self.timeout <= self.interval:
            # At the timeout the peer must have had time to answer a ping.
            raise ValueError("the Keepalive timeout must be longer than its interval")


class KeepaliveTimer:
    """
    Pings a silent peer every ``settings.interval`` seconds and calls ``dead(why)`` once it
    is dead by the rule of :class:`Keepalive`.

    A peer that drains a backlog (``progress`` reports bytes waiting for it at one tick and
    more bytes taken at the next) counts as heard at that tick: its answer to a ping may
    wait behind a large answer it is still reading.

    :ivar pings: how many pings were sent.
    """

    def __init__(
        self,
        clock: Any,
        settings: Keepalive,
        ping: Callable[[], object],
        dead: Callable[[str], object],
        progress: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:
        self._clock = clock
        # How many bytes the peer has taken from us so far, and how many still wait for it
        # here (None: cannot tell); see _tick.
        self._progress = progress
        self._lastProgress: tuple[int, int] | None = None
        self.settings = settings
        self._ping = ping
        self._dead = dead
        self._call: Any = None
        # The call that notes when a ping actually left (see _left).
        self._leaving: Any = None
        # Whether the reactor has been given a turn to read, once the peer seemed dead.
        self._rechecking = False
        self._stopped = False
        self.lastHeard = 0.0
        self._lastPing = 0.0
        # When the first ping since the peer was last heard left, if one did.
        self._firstPing: float | None = None
        self.pings = 0

    def start(self) -> None:
        self._stopped = False
        self.lastHeard = self._lastPing = self._clock.seconds()
        self._schedule()

    def heard(self) -> None:
        """
        Something arrived from the peer.
        """
        self.lastHeard = self._clock.seconds()

    def stop(self) -> None:
        self._stopped = True
        for call in (self._call, self._leaving):
            if call is not None and call.active():
                call.cancel()
        self._call = self._leaving = None

    def _unanswered(self) -> float | None:
        """
        When the first ping the peer has not answered (nothing heard since) left, if any.
        """
        first = self._firstPing
        return first if first is not None and first > self.lastHeard else None

    def _nextPing(self) -> float:
        return max(self.lastHeard, self._lastPing) + self.settings.interval

    def _deadAt(self, first: float) -> float:
        """
        When the peer is dead if nothing comes, ``first`` being when the first unanswered
        ping left: ``timeout`` after it was last heard, and ``timeout - interval`` after
        that ping (the time an on-time ping gets to be answered).
        """
        settings = self.settings
        return max(self.lastHeard + settings.timeout, first + settings.timeout - settings.interval)

    def _schedule(self) -> None:
        due = self._nextPing()
        first = self._unanswered()
        if first is not None:
            due = min(due, self._deadAt(first))
        self._call = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._call = None
        now = self._clock.seconds()
        if self._progress is not None:
            progress, last = self._progress(), self._lastProgress
            if progress is not None and last is not None and last[1] > 0 and progress[0] > last[0]:
                # Bytes waited here for the peer at the last tick, and it has taken some
                # since: it reads, and its answers may only wait behind what it is still
                # reading (a large answer to a slow reader). (Bytes the kernel accepts while
                # nothing waits here say nothing of the peer: they may never be read.)
                self.lastHeard = now
            self._lastProgress = progress
        first = self._unanswered()
        # (The comparisons use the very sums _schedule waited for, so that rounding cannot
        # leave a tick that is due and does nothing, to be scheduled again at once.)
        if first is not None and now >= self._deadAt(first):
            if not self._rechecking:
                # What arrived while this process was busy (the reactor blocked past the
                # timeout, say) waits unread in the socket: let the reactor read it first.
                self._rechecking = True
                self._call = self._clock.callLater(0, self._tick)
                return
            silent = now - self.lastHeard
            self._dead(
                f"the peer sent nothing for {silent:g} seconds "
                f"(keepalive timeout {self.settings.timeout:g} s)"
            )
            return
        self._rechecking = False
        if now >= self._nextPing():
            self.pings += 1
            self._lastPing = now
            if first is None:
                self._firstPing = now
                # It leaves when the reactor next writes: after this turn, which may be a
                # long one (a blocked process). Its time to be answered counts from then.
                self._leaving = self._clock.callLater(0, self._left, now)
            self._ping()
            if self._stopped:
                return  # the ping found the connection gone
        self._schedule()

    def _left(self, queued: float) -> None:
        self._leaving = None
        if self._firstPing == queued:
            self._firstPing = self._clock.seconds()
