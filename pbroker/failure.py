"""
Failures that cross the wire: :class:`CopyableFailure` is sent, :class:`CopiedFailure` arrives.

A failure travels as ``[b"twisted.spread.pb.CopyableFailure", state]`` whatever the sender, so
pbroker and stock Twisted peers read each other's. The names in it are Twisted's: pbroker's own
exception classes are sent under the names of their ``twisted.spread`` counterparts
(:func:`wireName`), and :meth:`CopiedFailure.check` and ``trap()`` match a pbroker class
against either name, so ``failure.trap(pb.NoSuchMethod)`` works whichever peer raised it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TextIO

from twisted.python.failure import Failure

from pbroker._native import EXTENT_OVER, EXTENT_WITHIN, extent
from pbroker.errors import (
    BananaError,
    DeadReferenceError,
    Error,
    InsecureJelly,
    InvalidJelly,
    NoSuchMethod,
    PBConnectionLost,
    ProtocolError,
    RemoteError,
    describe,
)
from pbroker.flavors import Copyable, RemoteCopy
from pbroker.jelly import qual

__all__ = [
    "COPYABLE_FAILURE_TAG",
    "CopiedFailure",
    "CopyableFailure",
    "errorText",
    "failure2Copyable",
    "loggable",
    "wireName",
]

#: The type tag of a failure on the wire.
COPYABLE_FAILURE_TAG = b"twisted.spread.pb.CopyableFailure"

# pbroker's classes that have a twisted.spread counterpart, and the name they travel under.
_TWISTED_NAMES: dict[type, str] = {
    Error: "twisted.spread.pb.Error",
    RemoteError: "twisted.spread.pb.RemoteError",
    ProtocolError: "twisted.spread.pb.ProtocolError",
    DeadReferenceError: "twisted.spread.pb.DeadReferenceError",
    PBConnectionLost: "twisted.spread.pb.PBConnectionLost",
    NoSuchMethod: "twisted.spread.flavors.NoSuchMethod",
    InsecureJelly: "twisted.spread.jelly.InsecureJelly",
    BananaError: "twisted.spread.banana.BananaError",
}

_STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "type": (bytes, str),
    "value": (str, bytes),
    "traceback": (str, bytes),
    "parents": list,
}


# The keys of a copied failure's state kept: what CopyableFailure and stock Twisted send
# (frames, stack and tb are replaced; unsafeTracebacks is the sender's business).
_STATE_KEYS = frozenset(_STATE_TYPES) | {"count", "captureVars"}


def wireName(cls: type) -> str:
    """
    The name a class travels under: Twisted's for pbroker's PB exceptions, else its own.
    """
    return _TWISTED_NAMES.get(cls) or qual(cls)


#: The most items an exception's arguments may stand for (as :func:`~pbroker._native.extent`
#: counts them: a container each time it appears, a string by its length) for pbroker to
#: write the exception out with ``str()`` when it sends or logs it.
_FORMATTED_ITEMS = 1_000_000

_CONTAINERS = (list, tuple, dict, set, frozenset)


# Arguments nested deeper than this are described, not written out: repr recurses once a
# level, and a value from the peer may nest as deep as a message may (a thousand levels).
_FORMATTED_DEPTH = 100


def _describedArgs(value: object) -> str | None:
    """
    A short description of ``value``'s arguments if they hold lists or dicts that stand for
    more than ``_FORMATTED_ITEMS`` items (or hold themselves, or nest more deeply than a
    native message may), else ``None``.

    A value from a peer whose lists share their parts takes little memory and stands for
    more items than memory holds: ``repr`` writes each appearance, so an exception raised
    with it as an argument (``raise KeyError(key)``) would take time without end to write
    out. Arguments that hold no container are written out as they are, however long.
    """
    args = getattr(value, "args", None)
    if type(args) is not tuple or not any(isinstance(arg, _CONTAINERS) for arg in args):
        return None
    found = extent(args, _FORMATTED_ITEMS, _FORMATTED_DEPTH)
    if found == EXTENT_WITHIN:
        return None
    if found == EXTENT_OVER:
        why = f"stand for more than {_FORMATTED_ITEMS:,} items, counting each appearance"
    else:
        why = f"hold themselves, or nest more than {_FORMATTED_DEPTH} deep"
    return f"{describe(args)} (not written out: its lists and dicts {why})"


def errorText(value: object) -> str:
    """
    ``str(value)``, the text of an exception sent to a peer, unless its arguments stand for
    too many items to write out (see :func:`loggable`): a short description of them then.
    """
    described = _describedArgs(value)
    return str(value) if described is None else described


class _Described(Exception):
    """
    Stands in for an exception too large to write out, in a failure that is logged.
    """


def loggable(failure: Failure) -> Failure:
    """
    ``failure``, or a copy to log in its place if its exception's arguments hold lists or
    dicts that stand for more than a million items (a value from the peer whose lists share
    their parts, say): the copy has the same type and traceback, and writes a short
    description of the arguments where the exception's ``str()`` would take time without
    end.
    """
    described = _describedArgs(failure.value)
    if described is None:
        return failure
    copy = Failure.__new__(type(failure))
    copy.__dict__.update(failure.__dict__)
    copy.value = _Described(described)
    return copy


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _printRemote(file: TextIO | None, remoteType: Any, message: str, traceback: Any) -> None:
    """
    Write a failure received from a peer: its remote type and message, as Twisted writes
    them, then the traceback text the peer sent, if it sent one (``traceback``, if a str),
    which current Twisted leaves out.
    """
    if file is None:
        # Where Twisted's Failure.printTraceback writes: the log, as errors (under twistd,
        # standard error goes nowhere).
        from twisted.python import log

        write: Callable[[str], object] = log.logerr.write
    else:
        write = file.write
    write(f"Traceback from remote host -- {_text(remoteType)}: {message}\n")
    if isinstance(traceback, str) and traceback and traceback != "Traceback unavailable\n":
        write(traceback)


class CopyableFailure(Failure, Copyable):
    """
    A :class:`~twisted.python.failure.Failure` that can be sent to a peer.

    Its state carries every key a stock Twisted receiver needs (``type``, ``value``,
    ``traceback``, ``parents``, ``frames``, ``stack``, ``tb``, ``count``, ``captureVars``,
    ``unsafeTracebacks``, ``pickled``) and nothing about the local stack: the traceback text
    is sent only when :attr:`unsafeTracebacks` is set.
    """

    #: Whether the formatted traceback is sent to the peer.
    unsafeTracebacks = False

    def getStateToCopy(self) -> dict[str, Any]:
        failureType = self.type
        if isinstance(failureType, type):
            typeName = wireName(failureType).encode("utf-8")
            parents = [wireName(cls) for cls in inspect.getmro(failureType)]
        else:  # a failure received from a peer and passed on
            typeName = failureType if isinstance(failureType, bytes) else str(failureType).encode()
            parents = [_text(parent) for parent in self.parents]
        if not self.unsafeTracebacks:
            traceback = "Traceback unavailable\n"
        elif isinstance(failureType, type):
            # (Its last line is str() of the exception: described if too large, as logged.)
            traceback = loggable(self).getTraceback()
        else:
            # Passed on: the traceback the peer sent, if it sent one (Failure cannot format
            # a type that is a name; stock Twisted fails to send such a failure at all).
            remote = self.__dict__.get("traceback")
            traceback = remote if isinstance(remote, str) else "Traceback unavailable\n"
        return {
            "type": typeName,
            "value": errorText(self.value),
            "traceback": traceback,
            "parents": parents,
            "frames": [],
            "stack": [],
            "tb": None,
            "count": self.count,
            "captureVars": bool(self.captureVars),
            "unsafeTracebacks": bool(self.unsafeTracebacks),
            "pickled": 1,
        }

    def getTypeToCopy(self) -> bytes:
        return COPYABLE_FAILURE_TAG

    def printTraceback(
        self, file: TextIO | None = None, elideFrameworkCode: int = 0, detail: str = "default"
    ) -> None:
        failureType = self.type
        if isinstance(failureType, type):
            super().printTraceback(file, elideFrameworkCode, detail)  # type: ignore[no-untyped-call]
            return
        # A failure received from a peer and passed on (wrapped by a relay): Failure cannot
        # format a type that is a name. As CopiedFailure writes it, but for the traceback in
        # a brief one.
        remote = None if detail == "brief" else self.__dict__.get("traceback")
        _printRemote(file, failureType, self.getErrorMessage(), remote)

    def __repr__(self) -> str:
        if isinstance(self.type, type):
            return super().__repr__()
        return f"<CopyableFailure {_text(self.type)}: {self.getErrorMessage()}>"


class CopiedFailure(RemoteCopy, Failure):
    """
    A failure received from a peer: ``type`` is the remote class name (bytes), ``value`` the
    remote ``str()`` of the exception, ``traceback`` the remote traceback text if it was sent.
    """

    def setCopyableState(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise InvalidJelly(f"a copied failure needs a dictionary state, not {type(state)}")
        # Only the keys a failure's state has: another (a "check" from a hostile peer) would
        # become an attribute hiding a method of Failure's.
        state = {_text(k): v for k, v in state.items() if _text(k) in _STATE_KEYS}
        for key, expected in _STATE_TYPES.items():
            if key not in state:
                if key == "parents":
                    state["parents"] = [_text(state.get("type", b"builtins.Exception"))]
                    continue
                if key == "traceback":
                    state["traceback"] = "Traceback unavailable\n"
                    continue
                raise InvalidJelly(f"a copied failure has no {key!r}")
            if not isinstance(state[key], expected):
                raise InvalidJelly(f"a copied failure's {key!r} has the wrong type")
        # parents and frames are properties of Failure, backed by these attributes.
        state["_parents"] = [_text(name) for name in state.pop("parents")]
        state["_frames"] = []
        state.pop("frames", None)
        state.pop("stack", None)
        state["value"] = _text(state["value"])
        state["traceback"] = _text(state["traceback"])
        state["tb"] = None
        # Failure has no class default for count: passing this failure on reads it.
        if type(state.get("count")) is not int:
            state["count"] = 0
        state["captureVars"] = bool(state.get("captureVars", False))
        state["pickled"] = 1
        self.__dict__ = state

    def __setstate__(self, state: Any) -> None:
        """
        Install a state unjellied without a broker (``jelly.unjelly``), with the same checks
        as one that arrives over a connection.
        """
        self.setCopyableState(state)

    def check(self, *errorTypes: Any) -> Any:
        """
        The first of ``errorTypes`` the remote failure is an instance of, judged by name: a
        class matches by its own name or, for pbroker's PB exceptions, Twisted's.
        """
        parents = self.parents
        for errorType in errorTypes:
            if isinstance(errorType, type):
                if wireName(errorType) in parents or qual(errorType) in parents:
                    return errorType
            elif _text(errorType) in parents:
                return errorType
        return None

    def _remote(self) -> tuple[bytes | str, str, str]:
        # type and value hold the remote name and message, not a class and an exception.
        state: dict[str, Any] = self.__dict__
        return state["type"], state["value"], state["traceback"]

    def raiseException(self) -> Any:
        """
        Raise :class:`~pbroker.errors.RemoteError`: the remote exception class does not exist
        here, only its name. An exception the application put in ``value`` (buildbot's
        ``RemoteCommand`` replaces ``value`` and ``type`` with a ``RemoteException``) is
        raised itself, as Failure's raiseException (which stock PB's CopiedFailure keeps)
        raises it. A peer cannot set one: the state's value is always text.
        """
        value = self.__dict__.get("value")
        if isinstance(value, BaseException):
            raise value.with_traceback(self.tb)
        raise RemoteError(*self._remote())

    def throwExceptionIntoGenerator(self, g: Any) -> Any:
        return g.throw(RemoteError(*self._remote()))

    def getErrorMessage(self) -> str:
        return str(self.value)

    def printTraceback(
        self, file: TextIO | None = None, elideFrameworkCode: int = 0, detail: str = "default"
    ) -> None:
        _printRemote(file, *self._remote())

    printBriefTraceback = printTraceback
    printDetailedTraceback = printTraceback

    def __repr__(self) -> str:
        return f"<CopiedFailure {_text(self.type)}: {self.value}>"

    def __str__(self) -> str:
        # Twisted's text for a failure, with its brief traceback: the remote type and value,
        # and the end of that line (pages and logs that embed it match stock's).
        remote = f"{_text(self.type)}: {self.value}"
        return f"[Failure instance: Traceback from remote host -- {remote}\n]"


def failure2Copyable(fail: Failure, unsafeTracebacks: bool = False) -> CopyableFailure:
    """
    A :class:`CopyableFailure` with the contents of ``fail``, ready to send.
    """
    copyable = CopyableFailure.__new__(CopyableFailure)
    # Failure's own __setstate__ puts each key where its properties read it (parents).
    copyable.__setstate__(fail.__getstate__())
    copyable.unsafeTracebacks = unsafeTracebacks
    return copyable
