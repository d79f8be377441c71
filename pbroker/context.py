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

from msgpack import ExtType

from pbroker._native import EXTENT_CYCLE, EXTENT_OVER, extent
from pbroker.errors import describe, isSeconds, toSeconds

__all__ = ["CallContext", "CallOptions", "current"]


@dataclass(frozen=True)
class CallOptions:
    """
    How one call is made.

    :ivar timeout: seconds after which the call is cancelled (``None``: no timeout).
    :ivar context: annotations for the remote method: a dict with text keys and plain values
        (None, booleans, numbers, text, bytes, lists and tuples, which arrive as lists, and
        dicts with text keys), checked here.
    :ivar reply: a dict the answer's annotations are written into, if given.
    :ivar ordered: whether the call keeps its place among this side's calls, as in stock PB
        (the default). ``False`` lets a small call reach the peer before calls made earlier
        that are still being sent, in the native dialect, where a large call is sent in
        fragments: for a call that should not wait behind a transfer, such as a status
        query. (A large call made so is sent after the large messages queued before it.)
    """

    timeout: float | None = None
    context: dict[str, Any] | None = None
    reply: dict[str, Any] | None = None
    ordered: bool = True

    def __post_init__(self) -> None:
        if self.timeout is not None:
            if not isSeconds(self.timeout):
                raise TypeError(f"a timeout must be a number of seconds, not {self.timeout!r}")
            if not self.timeout > 0:
                raise ValueError(f"a timeout must be positive, not {describe(self.timeout)}")
            object.__setattr__(self, "timeout", toSeconds(self.timeout))
        if self.context is not None:
            if not isinstance(self.context, dict):
                raise TypeError(f"a call context must be a dict, not {type(self.context).__name__}")
            for key in self.context:
                if type(key) is not str:
                    raise TypeError(f"call context keys must be text, not {key!r}")
            _checkAnnotations(self.context, "context")
        if self.reply is not None and not isinstance(self.reply, dict):
            raise TypeError(f"reply must be a dict to fill, not {type(self.reply).__name__}")
        if type(self.ordered) is not bool:
            raise TypeError(f"ordered must be True or False, not {self.ordered!r}")


#: How deep the lists and dicts of a call context may nest.
_CONTEXT_DEPTH = 32

#: How many items the lists and dicts of a call context (or reply) may hold in all, counting
#: one that appears more than once each time, as it is sent, and each character of a string.
_CONTEXT_ITEMS = 1_000_000


def _checkAnnotations(value: dict[Any, Any], path: str) -> None:
    """
    Refuse annotations (a context, or a reply) that cannot travel: see :func:`_checkPlain`.
    They are counted first, so that lists sharing their parts cannot make the check (or the
    packing) take time without end.
    """
    found = extent(value, _CONTEXT_ITEMS)
    if found == EXTENT_OVER:
        raise ValueError(
            f"{path} holds more than {_CONTEXT_ITEMS:,} items, each character of a string "
            "counting as one (a list or dict that appears more than once is counted, and "
            "sent, each time)"
        )
    if found == EXTENT_CYCLE:
        raise ValueError(f"{path} holds a list or dict inside itself, which cannot travel")
    # (EXTENT_KEYS is within the count too: a dict with a key that is not text, which the
    # check below refuses.)
    _checkPlain(value, path, 0)


def _checkPlain(value: Any, path: str, depth: int) -> None:
    """
    Refuse, before the call is sent, a context value that cannot travel as annotations:
    anything but None, booleans, numbers, text, bytes, and lists, tuples and dicts of them
    (dict keys text; tuples arrive as lists, bytearrays as bytes), or an integer beyond
    64 bits. ``path`` names the value in the message.
    """
    if value is None or isinstance(value, (float, str, bytes, bytearray)):
        return
    if isinstance(value, int):  # bool and IntEnum too
        if not -(2**63) <= value < 2**64:
            raise ValueError(
                f"{path} is an integer beyond 64 bits, which cannot travel: {describe(value)}"
            )
        return
    if depth >= _CONTEXT_DEPTH:
        raise ValueError(f"{path} nests more than {_CONTEXT_DEPTH} levels deep")
    if isinstance(value, (list, tuple)) and not isinstance(value, ExtType):
        for index, item in enumerate(value):
            _checkPlain(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key in value:  # (all of them first: a bad key is named before what it holds)
            if not isinstance(key, str):
                raise TypeError(f"the keys of {path} must be text, not {describe(key)}")
        for key, item in value.items():
            _checkPlain(item, f"{path}[{key!r}]", depth + 1)
        return
    raise TypeError(
        f"{path} is of type {type(value).__name__}; a call context holds None, booleans, "
        "numbers, text, bytes, and lists, tuples and dicts of them"
    )


def _checkReply(reply: Any) -> None:
    """
    Refuse the reply annotations a method set, before its answer is sent, as
    :class:`CallOptions` refuses a context: the answer cannot go without them, so its caller
    gets this error instead, naming the annotation, rather than msgpack's words.
    """
    if not isinstance(reply, dict):
        raise TypeError(f"a call's reply must be a dict, not {type(reply).__name__}")
    for key in reply:
        if type(key) is not str:
            raise TypeError(f"reply keys must be text, not {describe(key)}")
    _checkAnnotations(reply, "reply")


@dataclass
class CallContext:
    """
    What the remote method being run knows about its call.

    :ivar annotations: what the caller sent (empty if nothing).
    :ivar deadline: when the caller gives up, in seconds of this side's clock
        (``clock.seconds()``), or ``None``.
    :ivar requestID: the call's request id on its connection.
    :ivar broker: the connection the call came through.
    :ivar reply: annotations for the answer (native dialect only): the method may add to it
        the plain values the ``context`` of :class:`CallOptions` holds. They are checked when it
        answers: if one cannot travel, its caller gets the :exc:`TypeError` or
        :exc:`ValueError` that names it instead of the answer. An error carries none. A
        call made without options has no context: what is set here then goes nowhere,
        unchecked.
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
