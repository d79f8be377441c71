"""
Per-call options and context: a timeout, and annotations that travel with a call and its answer.

Options are given through :meth:`pbroker.references.RemoteReference.withOptions`, never as
keyword arguments of the call, so no keyword name of a remote method is taken::

    reply = {}
    result = await root.withOptions(
        timeout=5.0, context={"correlationId": "c-42", "caller": "billing"}, reply=reply
    ).callRemote("charge", account, amount)

The remote method reads what the caller sent, and may answer with annotations of its own::

    from pbroker import context

    def remote_charge(self, account, amount):
        call = context.current()
        log.info("charge {cid}", cid=call.annotations.get("correlationId"))
        call.reply["ledger"] = "L-7"

A timeout works on every connection: when it passes, the caller's Deferred fails with
:class:`twisted.internet.defer.TimeoutError` and, in the native dialect, the server is told,
so the Deferred its method returned is cancelled. Annotations need the native dialect; on a
``pb`` connection a call carrying them fails with :class:`~pbroker.errors.UnsupportedByPeer`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallContext", "CallOptions", "current"]


@dataclass(frozen=True)
class CallOptions:
    """
    How one call is made.

    :ivar timeout: seconds after which the call is cancelled (``None``: no timeout).
    :ivar context: annotations for the remote method: a dict with text keys and plain values
        (numbers, text, bytes, lists, dicts).
    :ivar reply: a dict the answer's annotations are written into, if given.
    """

    timeout: float | None = None
    context: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None:
            if type(self.timeout) not in (int, float):
                raise TypeError(f"a timeout must be a number of seconds, not {self.timeout!r}")
            if not self.timeout > 0:
                raise ValueError(f"a timeout must be positive, not {self.timeout}")
        if self.context is not None:
            if not isinstance(self.context, dict):
                raise TypeError(f"a call context must be a dict, not {type(self.context).__name__}")
            for key in self.context:
                if type(key) is not str:
                    raise TypeError(f"call context keys must be text, not {key!r}")
        if self.reply is not None and not isinstance(self.reply, dict):
            raise TypeError(f"reply must be a dict to fill, not {type(self.reply).__name__}")


@dataclass
class CallContext:
    """
    What the remote method being run knows about its call.

    :ivar annotations: what the caller sent (empty if nothing).
    :ivar deadline: when the caller gives up, in seconds of this side's clock
        (``clock.seconds()``), or ``None``.
    :ivar requestID: the call's request id on its connection.
    :ivar broker: the connection the call came through.
    :ivar reply: annotations for the answer; the method may add to it (native dialect only).
    """

    annotations: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    requestID: int | None = None
    broker: Any = None
    reply: dict[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "pbroker.context.current", default=None
)


def current() -> CallContext:
    """
    The context of the remote call being run (also inside an ``async def`` method, after an
    ``await``). Outside a remote call, an empty context.
    """
    found = _current.get()
    return CallContext() if found is None else found
