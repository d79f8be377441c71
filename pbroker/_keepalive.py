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

__all__ = ["Keepalive", "KeepaliveTimer"]


@dataclass(frozen=True)
class Keepalive:
    """
    Dead-peer detection: when nothing has arrived for ``interval`` seconds the broker sends a
    ping; when nothing has arrived for ``timeout`` seconds (longer than ``interval``) the
    connection is closed and every pending call fails with
    :class:`~pbroker.errors.PBConnectionLost`. The time counts from the connection, so a
    peer that connects and never says anything is dropped too.

    A pbroker peer answers the ping; a stock Twisted peer is pinged with a call to an object
    that does not exist, whose error answer serves as well, so keepalive works in every
    dialect.
    """

    interval: float = 30.0
    timeout: float = 90.0

    def __post_init__(self) -> None:
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"the Keepalive {name} must be a number of seconds, not {value!r}")
        if not self.interval > 0 or not self.timeout > 0:
            raise ValueError("Keepalive interval and timeout must be positive")
        if self.timeout <= self.interval:
            # At the timeout the peer must have had time to answer a ping.
            raise ValueError("the Keepalive timeout must be longer than its interval")


class KeepaliveTimer:
    """
    Pings a silent peer every ``settings.interval`` seconds and calls ``dead(why)`` once
    nothing has been heard for ``settings.timeout`` seconds.

    :ivar pings: how many pings were sent.
    """

    def __init__(
        self,
        clock: Any,
        settings: Keepalive,
        ping: Callable[[], object],
        dead: Callable[[str], object],
    ) -> None:
        self._clock = clock
        self.settings = settings
        self._ping = ping
        self._dead = dead
        self._call: Any = None
        # Whether the reactor has been given a turn to read, once silence reached the timeout.
        self._rechecking = False
        self.lastHeard = 0.0
        self._lastPing = 0.0
        # When the first ping since the peer was last heard went, if one did.
        self._firstPing: float | None = None
        self.pings = 0

    def start(self) -> None:
        self.lastHeard = self._lastPing = self._clock.seconds()
        self._schedule()

    def heard(self) -> None:
        """
        Something arrived from the peer.
        """
        self.lastHeard = self._clock.seconds()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _unanswered(self) -> float | None:
        """
        When the first ping the peer has not answered (nothing heard since) went, if any.
        """
        first = self._firstPing
        return first if first is not None and first > self.lastHeard else None

    def _schedule(self) -> None:
        settings = self.settings
        due = max(self.lastHeard, self._lastPing) + settings.interval
        first = self._unanswered()
        if first is not None:
            due = min(due, max(self.lastHeard + settings.timeout, self._deadline(first)))
        self._call = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._tick)

    def _deadline(self, first: float) -> float:
        # A ping gets as long to be answered as the settings leave it normally: the time
        # from the first ping (interval) to the timeout.
        return first + self.settings.timeout - self.settings.interval

    def _tick(self) -> None:
        self._call = None
        settings = self.settings
        now = self._clock.seconds()
        silent = now - self.lastHeard
        first = self._unanswered()
        # Dead only once a ping went unanswered for as long as it normally would be: a
        # process busy past the timeout (the reactor blocked) pings first, and waits.
        if silent >= settings.timeout and first is not None and now >= self._deadline(first):
            if not self._rechecking:
                # What arrived while this process was busy (the reactor blocked past the
                # timeout, say) waits unread in the socket: let the reactor read it first.
                self._rechecking = True
                self._call = self._clock.callLater(0, self._tick)
                return
            self._dead(
                f"the peer sent nothing for {silent:g} seconds "
                f"(keepalive timeout {settings.timeout:g} s)"
            )
            return
        self._rechecking = False
        if now - max(self.lastHeard, self._lastPing) >= settings.interval:
            self.pings += 1
            self._lastPing = now
            if first is None:
                self._firstPing = now
            self._ping()
        self._schedule()
