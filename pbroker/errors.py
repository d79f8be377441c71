"""
The exceptions pbroker raises, in one hierarchy.

Every error pbroker raises on purpose derives from :class:`PBrokerError`. The tree separates what
*this* side did wrong (tried to send a value the wire cannot carry) from what the *peer* did wrong
(sent bytes or expressions that are malformed, too large or not allowed), so that a caller can
fail one call in the first case and distrust the whole connection in the second::

    PBrokerError
    +-- BananaError                 the banana codec (compat name of twisted.spread.banana)
    |   +-- BananaEncodeError       a value this side tried to encode cannot be sent
    |   +-- BananaDecodeError       the bytes received are malformed or break a limit
    +-- InsecureJelly               an expression was refused by the security options
    |   +-- InvalidJelly            an expression is not well-formed jelly
    +-- JellyError                  a value this side tried to jelly cannot be represented
    +-- Error                       raise (a subclass of) it in a remote method to send it
    +-- RemoteError                 a remote failure re-raised locally (type, value, traceback)
    +-- ProtocolError               the peer broke the PB protocol
    |   +-- DeadReferenceError      a call through a broker that is already disconnected
    +-- PBConnectionLost            the connection dropped while a call was pending
    +-- LimitExceeded               a per-connection resource limit was reached
    +-- UnsupportedByPeer           the connection's dialect lacks a capability a call needs
    NoSuchMethod (an AttributeError) the remote object has no such method

``BananaError`` and ``InsecureJelly`` keep the names :mod:`twisted.spread` uses, and are
re-exported from :mod:`pbroker.banana` and :mod:`pbroker.jelly`; the broker's exceptions are
re-exported from :mod:`pbroker.pb` and :mod:`pbroker.flavors`. On the wire they travel under
Twisted's names (``twisted.spread.pb.Error``...), see :mod:`pbroker.failure`.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

__all__ = [
    "BananaDecodeError",
    "BananaEncodeError",
    "BananaError",
    "DeadReferenceError",
    "Error",
    "InsecureJelly",
    "InvalidJelly",
    "JellyError",
    "LimitExceeded",
    "NoSuchMethod",
    "PBConnectionLost",
    "PBrokerError",
    "ProtocolError",
    "RemoteError",
    "UnsupportedByPeer",
]


class PBrokerError(Exception):
    """
    The base class of every exception pbroker raises deliberately.
    """


class BananaError(PBrokerError):
    """
    The banana codec could not encode or decode an expression.

    Raised as one of the two subclasses; catch this class to handle both.
    """


class BananaEncodeError(BananaError, ValueError):
    """
    This side tried to encode a value banana cannot carry: an unsupported type, or a string,
    list or integer beyond the configured limits. Nothing was written.
    """


class BananaDecodeError(BananaError):
    """
    The bytes received are not valid banana, or break a configured limit (prefix length,
    string or list size, nesting depth, message size). The stream cannot be trusted after this.

    :ivar expressions: the expressions that the same ``feed()`` call completed before it met
        the error, in order, so that nothing received intact is lost.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.expressions: list[Any] = []


class InsecureJelly(PBrokerError):
    """
    An s-expression was refused while unjellying: its type, class or module is not allowed by
    the security options in force.
    """


class InvalidJelly(InsecureJelly):
    """
    An s-expression is not well-formed jelly: a tag with the wrong number or kind of fields, a
    dereference to an unknown id, an undecodable text value.

    It derives from :class:`InsecureJelly` so that one ``except InsecureJelly`` rejects every
    expression a peer should not have sent.
    """


class JellyError(PBrokerError, ValueError):
    """
    This side tried to jelly a value that jelly cannot represent, such as a timezone-aware
    datetime or a NaN decimal.
    """


class Error(PBrokerError):
    """
    An error a remote method raises on purpose, for the caller to see.

    Subclass it for your application's errors. If the security options allow the subclass (or
    it is :class:`~pbroker.jelly.Jellyable`), the exception itself is sent; otherwise the caller
    receives a copied failure that carries its type name, message and (if enabled) traceback.
    """


class RemoteError(PBrokerError):
    """
    A failure that happened on the peer, raised locally (inside ``inlineCallbacks`` or a
    coroutine awaiting a remote call). As in Twisted, its text (and only argument) is the
    remote exception's.

    :ivar remoteType: the fully qualified name of the exception class on the peer, as bytes.
    :ivar remoteTraceback: the peer's traceback, if it sent one.
    """

    def __init__(self, remoteType: bytes | str, value: str, remoteTraceback: str) -> None:
        super().__init__(value)
        self.remoteType = remoteType
        self.remoteTraceback = remoteTraceback


class ProtocolError(PBrokerError):
    """
    The peer broke the Perspective Broker protocol (a wrong version, an unknown request id).
    """


class DeadReferenceError(ProtocolError):
    """
    A call through a remote reference whose broker has already disconnected.
    """


class PBConnectionLost(PBrokerError):
    """
    The connection was lost before the answer to a call arrived.

    Its argument is a reason: text, or, as in stock PB, the Failure the connection was lost
    with (still ``args[0]``), which its text names.

    :ivar lastFailure: when a :class:`~pbroker.reconnect.ReconnectingClient` gives up, the
        Failure its last attempt failed with (``None`` if it timed out), so that a refused
        login (``lastFailure.check(UnauthorizedLogin)``) can be told from a network error.
    """

    lastFailure: Any = None

    def __str__(self) -> str:
        if len(self.args) == 1:
            reason = self.args[0]
            value = getattr(reason, "value", None)
            if isinstance(value, BaseException) and hasattr(reason, "getErrorMessage"):
                return (
                    f"the connection was lost: {type(value).__name__}: {reason.getErrorMessage()}"
                )
        return super().__str__()


class LimitExceeded(PBrokerError):
    """
    A per-connection resource limit (see :class:`pbroker.broker.BrokerLimits`) was reached:
    the call or value that would have gone beyond it is refused.
    """


class UnsupportedByPeer(PBrokerError):
    """
    A call needs a capability of pbroker's native dialect (streams, per-call context) but the
    connection speaks another (a stock Twisted peer, or a factory limited to ``pb``). The
    message names the capability and the dialect in use.
    """


class NoSuchMethod(AttributeError, PBrokerError):
    """
    The remote object has no method of that name (or the name is not one that may be called).
    """


def describe(value: Any, limit: int = 100) -> str:
    """
    A short, safe ``repr`` of a value for an error message.

    Values in error messages often come from a peer, so this never recurses more than a few
    levels into lists or tuples, never writes out integers of thousands of digits (which
    ``repr`` refuses), and cuts long results to about ``limit`` characters.
    """
    return _describe(value, 3, limit)


def _describe(value: Any, depth: int, limit: int) -> str:
    kind = type(value)
    if kind is list or kind is tuple:
        if depth == 0:
            return "[...]" if kind is list else "(...)"
        parts = [_describe(item, depth - 1, limit) for item in value[:8]]
        if len(value) > 8:
            parts.append(f"... {len(value) - 8} more")
        text = ", ".join(parts)
        text = f"[{text}]" if kind is list else f"({text})"
    elif kind is int:
        if value.bit_length() > 256:
            return f"<{value.bit_length()}-bit integer>"
        text = repr(value)
    elif kind is bytes or kind is str:
        text = repr(value[: limit + 1])
    elif kind is float or kind is bool or value is None:
        text = repr(value)
    else:
        text = f"<{kind.__module__}.{kind.__qualname__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checkedCount(name: str, value: Any) -> int:
    """
    ``value`` as an ``int``, if it is an integer (:func:`isInteger`) of at least 1; else
    TypeError or ValueError naming ``name``: the check of a limit or window argument.
    """
    if not isInteger(value):
        raise TypeError(f"{name} must be an integer, not {describe(value)}")
    checked = operator.index(value)
    if checked < 1:
        raise ValueError(f"{name} must be at least 1, not {describe(checked)}")
    return checked


def checkReactorTime(name: str, value: Any) -> None:
    """
    TypeError, naming the argument ``name``, unless ``value`` schedules calls as a reactor
    does (``callLater`` and ``seconds``, as ``twisted.internet.task.Clock`` has): an object,
    not a class. Checked when given, not when the first timeout or delay is set.
    """
    if (
        isinstance(value, type)
        or not callable(getattr(value, "callLater", None))
        or not callable(getattr(value, "seconds", None))
    ):
        raise TypeError(
            f"{name} must be a reactor (with callLater and seconds), not {describe(value)}"
        )


def isSeconds(value: Any) -> bool:
    """
    Whether ``value`` is a real number (a float, an int, a Fraction, a numpy float...) and
    not a bool: what argument checks take as a number of seconds.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def toSeconds(value: Any) -> float:
    """
    A number of seconds that :func:`isSeconds` took, as a float: infinity for one too
    large for a float (``10**400``), which waits as long.
    """
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def isInteger(value: Any) -> bool:
    """
    Whether ``value`` is an integer (an ``int``, an IntEnum, a numpy integer: anything with
    ``__index__``) and not a bool: what argument checks take as a count.
    """
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def cannotStop(deferred: Any) -> bool:
    """
    Whether cancelling ``deferred`` would only fail it while its work went on: it has not
    fired and has no canceller (``deferToThread``'s, a database query's). Read from
    Twisted's Deferred; should that change, every Deferred is taken as one that can stop.
    """
    return getattr(deferred, "_canceller", True) is None and not deferred.called
