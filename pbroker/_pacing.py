"""
The transport a broker writes through: it learns when the connection stops taking data, so
that pagers wait and a peer that stops reading is eventually dropped.

:class:`PacedTransport` wraps the real transport and registers itself on it as a streaming
producer. The real transport pauses it when its buffer fills and resumes it when the buffer
drains. While paused, the bytes written are counted; past the broker's
``limits.bufferedBytes`` the connection is aborted. Closing the connection through the
wrapper unregisters the producer first, since a TLS transport will not close while a producer
is registered on it. Everything else is delegated to the real transport, whose interfaces the
wrapper declares.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import directlyProvides, providedBy

__all__ = ["PacedTransport"]


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
        self.written = 0
        self._registered = False
        directlyProvides(self, providedBy(transport))
        registerProducer = getattr(transport, "registerProducer", None)
        if registerProducer is not None:
            registerProducer(self, True)
            self._registered = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        self._transport.write(data)
        self.written += len(data)
        if not self.paused:
            return
        self.bufferedWhilePaused += len(data)
        self._checkBuffered()

    def _checkBuffered(self) -> None:
        limit = self._broker.limits.bufferedBytes
        if self.bufferedWhilePaused > limit:
            self._log.warn(
                "Dropping a peer that stopped reading: {count} bytes wait for it (limit {limit})",
                count=self.bufferedWhilePaused,
                limit=limit,
            )
            self.paused = False
            self.abortConnection()

    def writeSequence(self, data: list[bytes]) -> None:
        writeSequence = getattr(self._transport, "writeSequence", None)
        if writeSequence is None:
            self._transport.write(b"".join(data))
        else:
            writeSequence(data)
        size = sum(len(chunk) for chunk in data)
        self.written += size
        if self.paused:
            self.bufferedWhilePaused += size
            self._checkBuffered()

    def _release(self) -> None:
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    def loseConnection(self) -> None:
        self._release()
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        self._release()
        abort = getattr(self._transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self._transport.loseConnection()

    # IPushProducer, for the real transport

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.bufferedWhilePaused = 0
        self._broker.transportResumed()

    def stopProducing(self) -> None:
        self._registered = False
        self._broker.pageProducers = []
