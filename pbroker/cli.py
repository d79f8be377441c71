"""
The ``pbroker`` command-line client (also ``python -m pbroker``)::

    pbroker ping pb://127.0.0.1:8789
    pbroker --json info pb://127.0.0.1:8789
    pbroker call pb://127.0.0.1:8789 echo '"hello"' '[1, 2]'
    pbroker --user alice call pb://broker.example:8789 whoAmI

The address is ``pb://host[:port]`` (TCP, port 8789 by default; ``pb://[::1]:8789`` for an
IPv6 address), ``pbs://host[:port]`` (TLS; ``--ca FILE`` to trust a CA file rather than the
platform's), or any Twisted client endpoint string (``unix:/run/pbroker.sock``). With
``--user`` the client logs in and calls the avatar; the password comes from
``PBROKER_PASSWORD`` or a prompt, never from the command line. Arguments to ``call`` are JSON
values.

A method that answers with a stream has its items printed as they arrive, one a line (with
``--json``, ``{"item": ...}`` lines, then ``{"items": N, "ms": ...}``); streams inside a result
(a list, a tuple...) are read to their end and shown as lists. ``--timeout`` bounds the
reading too.

Exit codes: 0 success, 2 bad usage (including a bad address, ``--ca`` file, ``--timeout`` or
JSON argument), 3 cannot connect, 4 login refused, 5 the remote call failed. Errors are one
line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import ipaddress
import json
import math
import os
import sys
import time
import traceback
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from twisted.cred.credentials import UsernamePassword
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.internet.interfaces import IStreamClientEndpoint

__all__ = [
    "EXIT_CONNECTION",
    "EXIT_LOGIN",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_REMOTE",
    "EXIT_USAGE",
    "endpointFor",
    "main",
]

# The exit codes of main() (docs/cli.rst has what leads to each).
#: Success.
EXIT_OK = 0
#: Bad usage: an unknown command, a bad address or argument, no password available.
EXIT_USAGE = 2
#: No connection, the connection lost before the call was made, or the command interrupted.
EXIT_CONNECTION = 3
#: The login was refused.
EXIT_LOGIN = 4
#: The remote call failed, its stream failed, or its result is too large to show.
EXIT_REMOTE = 5
#: The output could not be written.
EXIT_OUTPUT = 6

DEFAULT_PORT = 8789


class CommandError(Exception):
    """
    A failure to report as one line, with its exit code; ``failure``, the remote failure it
    reports, if any (``--debug`` prints its traceback, the one the peer sent).
    """

    def __init__(self, code: int, message: str, failure: Failure | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.failure = failure


def endpointFor(
    address: str, caFile: str | None = None, *, reactor: Any = None
) -> str | IStreamClientEndpoint:
    """
    The client endpoint (string or object) for a command-line address.

    ``pb://HOST[:PORT]`` gives a ``tcp:`` endpoint string, ``pbs://HOST[:PORT]`` a TLS endpoint
    that trusts ``caFile`` (or the platform's CAs); an IPv6 address goes in brackets
    (``pb://[::1]:8789``). Anything else is parsed as a Twisted client endpoint string.

    :raises CommandError: (exit code 2) the address is not one of these forms, or ``caFile``
        cannot be read or is given for an address that is not ``pbs://``.
    """
    if reactor is None:
        from twisted.internet import reactor
    if "://" not in address:
        if ":" not in address:
            raise CommandError(EXIT_USAGE, f"not an address: {address!r} (try pb://host:port)")
        if caFile is not None:
            raise CommandError(EXIT_USAGE, "--ca is for pbs:// addresses only")
        return _parsedEndpoint(reactor, address)
    scheme, _, rest = address.partition("://")
    scheme = scheme.lower()
    if scheme not in ("pb", "pbs"):
        raise CommandError(EXIT_USAGE, f"unknown scheme {scheme!r} in {address!r} (pb or pbs)")
    host, port = _hostAndPort(address, rest.rstrip("/"))
    if scheme == "pb":
        if caFile is not None:
            raise CommandError(EXIT_USAGE, "--ca is for pbs:// addresses only")
        return f"tcp:host={_escaped(host)}:port={port}"
    return _tlsEndpoint(reactor, host, port, caFile)


def _hostAndPort(address: str, rest: str) -> tuple[str, int]:
    """
    The host and port of ``HOST[:PORT]`` or ``[IPV6][:PORT]``.
    """
    if rest.startswith("["):
        host, bracket, after = rest[1:].partition("]")
        if not bracket:
            raise CommandError(EXIT_USAGE, f"no ']' after the IPv6 address in {address!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise CommandError(EXIT_USAGE, f"bad IPv6 address in {address!r}") from None
        if after and not after.startswith(":"):
            raise CommandError(EXIT_USAGE, f"bad port in {address!r}")
        portText = after[1:]
    else:
        host, _, portText = rest.partition(":")
        if ":" in portText:
            raise CommandError(
                EXIT_USAGE,
                f"an IPv6 address goes in brackets (pb://[ADDRESS]:PORT), not {address!r}",
            )
        if not host:
            raise CommandError(EXIT_USAGE, f"no host in {address!r}")
        # Host names and IPv4 addresses: anything else (a path, user@, spaces) is a mistake.
        if not all(character.isalnum() or character in "-._" for character in host):
            raise CommandError(EXIT_USAGE, f"bad host name in {address!r}")
    if not portText:
        if rest.endswith(":"):
            raise CommandError(EXIT_USAGE, f"no port after ':' in {address!r}")
        return host, DEFAULT_PORT
    # Only ASCII digits: int() would also take " 80", "+80" and other scripts' digits.
    if not (portText.isascii() and portText.isdigit() and 0 < int(portText) < 65536):
        raise CommandError(EXIT_USAGE, f"bad port in {address!r}")
    return host, int(portText)


def _escaped(text: str) -> str:
    """
    ``text`` as a value in an endpoint string, where ``:``, ``=`` and ``\\`` are special.
    """
    return "".join("\\" + character if character in ":=\\" else character for character in text)


def _parsedEndpoint(reactor: Any, description: str) -> IStreamClientEndpoint:
    """
    The endpoint of a Twisted client endpoint string.
    """
    from twisted.internet.endpoints import clientFromString

    if description.split(":", 1)[0].lower() == "ssl":
        # Twisted's ssl: client checks no certificate (nor, with caCertsDir, the name): a
        # password would go to whoever answers.
        raise CommandError(
            EXIT_USAGE,
            f"an ssl: address checks neither the server's certificate nor its name: "
            f"{description!r} (use pbs://host:port, with --ca FILE for a private CA)",
        )
    try:
        endpoint: IStreamClientEndpoint = clientFromString(reactor, description)
    except Exception as e:
        # Endpoint parsers raise what they like for a bad string: ValueError for an unknown
        # type, TypeError for a missing argument, OSError for a missing file, RuntimeError
        # from a StopIteration for a trailing backslash.
        reason = str(e) or type(e).__name__
        if isinstance(e.__cause__, StopIteration):
            reason = "it ends with a backslash that escapes nothing"
        message = f"bad address {description!r}: {reason} (try pb://host:port)"
        raise CommandError(EXIT_USAGE, message) from e
    return endpoint


def _tlsEndpoint(reactor: Any, host: str, port: int, caFile: str | None) -> IStreamClientEndpoint:
    """
    A TLS endpoint to ``host``, trusting the CA certificates in ``caFile``.
    """
    from OpenSSL.crypto import Error as OpenSSLError

    from pbroker import tls

    try:
        endpoint: IStreamClientEndpoint = tls.clientEndpoint(reactor, host, port, caFile=caFile)
    except OSError as e:
        reason = e.strerror or str(e)
        raise CommandError(EXIT_USAGE, f"cannot read the CA file {caFile!r}: {reason}") from e
    except (ValueError, OpenSSLError) as e:
        raise CommandError(EXIT_USAGE, f"bad CA file {caFile!r}: {e}") from e
    return endpoint


class _Parser(argparse.ArgumentParser):
    """
    argparse, with usage errors on one line like every other error.
    """

    def error(self, message: str) -> NoReturn:
        # (argparse names a list that may be empty among what is missing: not so here.)
        if "required:" in message:
            message = message.replace(", arguments", "")
        print(f"pbroker: {_oneLine(message)} (pbroker --help shows the usage)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _seconds(text: str) -> float:
    """
    A ``--timeout``: a finite number of seconds, more than zero.
    """
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds above 0: {text!r}")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pbroker",
        description="Talk to a Perspective Broker (pbroker or Twisted PB).",
        epilog="Options go before the command: pbroker --json ping pb://127.0.0.1:8789",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--user", help="log in as this user (password: PBROKER_PASSWORD or prompt)")
    parser.add_argument("--ca", help="trust this CA file for pbs:// addresses")
    parser.add_argument(
        "--timeout", type=_seconds, default=30.0, help="seconds for the whole command (default 30)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    # (Each command's own --help points to the options, which go before it.)
    before = "--json, --timeout, --user, --ca and --debug go before the command (pbroker --help)"
    commands.add_parser("ping", help="check that the broker answers", epilog=before).add_argument(
        "address"
    )
    commands.add_parser(
        "info", help="what the broker says about itself", epilog=before
    ).add_argument("address")
    call = commands.add_parser("call", help="call a remote method", epilog=before)
    call.add_argument("address")
    call.add_argument("method")
    call.add_argument("arguments", nargs="*", help="JSON values")
    return parser


def _password(user: str) -> bytes:
    password = os.environ.get("PBROKER_PASSWORD")
    if password is None:
        if sys.stdin is None or not sys.stdin.isatty():  # (None: standard input closed)
            raise CommandError(
                EXIT_USAGE, "no password: set PBROKER_PASSWORD or run in a terminal to be asked"
            )
        try:
            password = getpass.getpass(f"Password for {user}: ")
        except (EOFError, KeyboardInterrupt):
            # Ctrl-D or Ctrl-C at the prompt. getpass leaves the prompt's line unfinished:
            # end it on a terminal, so that the error is a line of its own.
            if sys.stderr.isatty():
                print(file=sys.stderr)
            raise CommandError(EXIT_USAGE, "no password given") from None
    # surrogateescape: bytes that are not UTF-8 (in the environment) are sent as they are.
    return password.encode("utf-8", "surrogateescape")


def _jsonArguments(texts: list[str]) -> list[Any]:
    """
    The values of JSON command-line arguments.

    :raises CommandError: (exit code 2) one is not JSON, or cannot be sent.
    """
    values = []
    for index, text in enumerate(texts, start=1):
        try:
            value = json.loads(text)
            # Text with a lone surrogate (from an escape, or bytes on the command line that
            # are not UTF-8) cannot be sent: find it now rather than in the call.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except RecursionError:
            raise CommandError(EXIT_USAGE, f"argument {index} is nested too deeply") from None
        except json.JSONDecodeError as e:
            raise CommandError(EXIT_USAGE, f"argument {index} is not valid JSON: {e}") from None
        except UnicodeEncodeError:
            message = f"argument {index} holds text that is not valid Unicode"
            raise CommandError(EXIT_USAGE, message) from None
        except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
            raise CommandError(EXIT_USAGE, f"argument {index} is not usable: {e}") from None
        values.append(value)
    return values


#: The most parts (containers and the items in them) a result is shown with, a part counted
#: each time it is shown: a value made of shared parts can stand for far more than it holds.
MAX_SHOWN = 1_000_000


class _Shown:
    """
    Counts the parts of a result as they are shown, and knows the containers being shown,
    so that one holding itself is shown as ``...`` rather than for ever.
    """

    def __init__(self, limit: int = MAX_SHOWN) -> None:
        self.left = limit
        self.inside: set[int] = set()

    def count(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise CommandError(
                EXIT_REMOTE, f"the result is too large to show: over {MAX_SHOWN:,} parts"
            )

    def jsonable(self, value: Any) -> Any:
        self.count()
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return {"bytes": value.hex()}
        if isinstance(value, float) and not math.isfinite(value):
            return {"float": repr(value)}  # (JSON has no NaN or Infinity)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return repr(value)
        if id(value) in self.inside:
            return "..."  # it holds itself
        self.inside.add(id(value))
        try:
            if isinstance(value, dict):
                return {str(self.jsonable(k)): self.jsonable(v) for k, v in value.items()}
            return [self.jsonable(item) for item in value]
        finally:
            self.inside.discard(id(value))

    def size(self, value: Any) -> None:
        """
        Count ``value``'s parts as ``repr`` would show them (it shows a container holding
        itself as ``[...]`` or ``{...}``).
        """
        self.count()
        if isinstance(value, (dict, list, tuple, set, frozenset)) and id(value) not in self.inside:
            self.inside.add(id(value))
            try:
                for item in value.items() if isinstance(value, dict) else value:
                    self.size(item)
            finally:
                self.inside.discard(id(value))

    def sizeAlone(self, value: Any) -> None:
        """
        Count ``value``'s parts as ``repr`` or ``str`` will show it on its own: from the
        start, holding itself only where it holds itself. (They have no bound on what shared
        parts stand for.)
        """
        inside, self.inside = self.inside, set()
        try:
            self.size(value)
        finally:
            self.inside = inside

    def key(self, key: Any) -> str:
        """
        A dict key as ``human`` shows it (``str``), once its size is known to be within
        bounds: a tuple key may share its parts too.
        """
        if not isinstance(key, str):
            self.sizeAlone(key)
        return str(key)

    def human(self, value: Any) -> str:
        """
        A dict as ``key: value`` lines (a dict in it the same way), text as it is, anything
        else as its ``repr``, once its size is known to be within bounds.
        """
        if isinstance(value, dict) and id(value) not in self.inside:
            self.count()
            self.inside.add(id(value))
            try:
                return "\n".join(f"{self.key(k)}: {self.human(v)}" for k, v in value.items())
            finally:
                self.inside.discard(id(value))
        if isinstance(value, str):
            self.count()
            return value
        self.sizeAlone(value)
        return repr(value)


def _jsonable(value: Any) -> Any:
    return _Shown().jsonable(value)


def _human(value: Any) -> str:
    return _Shown().human(value)


#: What a server that takes no password logins says (pbroker.cred.NO_PASSWORD_ACCOUNTS, and
#: what servers before it said).
_NO_PASSWORD_LOGINS = (
    "no checker of this server's portal takes a password login over PB",
    "this server has no accounts to log in to with a password",
)


def _remoteMessage(failure: Failure) -> str:
    # A copied failure holds the remote class name (bytes) and message (text).
    remoteType: Any = failure.type
    if isinstance(remoteType, bytes):
        name = remoteType.decode("utf-8", "replace")
    elif isinstance(remoteType, type):
        name = remoteType.__name__
    else:
        name = str(remoteType)
    value = failure.value
    return f"{name}: {value}" if str(value) else name


class StreamRead:
    """
    What :func:`_run` gives for a call answered with a stream, whose items it has printed.

    :ivar count: the items printed.
    """

    def __init__(self, count: int) -> None:
        self.count = count


def _output(options: argparse.Namespace, value: Any, milliseconds: float) -> str:
    """
    The text that shows a result (for a stream read to its end, what follows its items).
    """
    # A received value nests at most about a thousand deep (the decoders' limits) and
    # _jsonable takes two frames a level: make room for that.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 4096)
    try:
        if isinstance(value, StreamRead):
            if options.json:
                return json.dumps({"items": value.count, "ms": round(milliseconds, 1)})
            return ""
        if options.json:
            return json.dumps({"result": _jsonable(value), "ms": round(milliseconds, 1)})
        if options.command == "ping":
            return f"{_human(value)} ({milliseconds:.1f} ms)"
        return _human(value)
    finally:
        sys.setrecursionlimit(limit)


def _itemOutput(options: argparse.Namespace, item: Any) -> str:
    """
    The line that shows one item of a stream: as JSON, or text as it is and anything else
    as its ``repr``.
    """
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 4096)
    try:
        if options.json:
            return json.dumps({"item": _jsonable(item)})
        if isinstance(item, str):
            return item
        _Shown().sizeAlone(item)
        return repr(item)
    finally:
        sys.setrecursionlimit(limit)


def _streamsIn(value: Any) -> list[Any]:
    """
    The remote streams in a result (in its lists, tuples, sets and dicts), each once, looked
    for among its first :data:`MAX_SHOWN` parts (more cannot be shown anyway).
    """
    from pbroker.stream import RemoteStream

    found: dict[int, Any] = {}
    seen: set[int] = set()
    pending = [value]
    left = MAX_SHOWN
    while pending and left > 0:
        item = pending.pop()
        left -= 1
        if isinstance(item, RemoteStream):
            found.setdefault(id(item), item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)) and id(item) not in seen:
            seen.add(id(item))
            pending.extend(item.items() if isinstance(item, dict) else item)
    return list(found.values())


def _withStreamsRead(value: Any, read: dict[int, list[Any]]) -> Any:
    """
    ``value`` with each remote stream in it replaced by the items ``read`` from it: a list,
    or a tuple where it must be hashable (in a set, or a dict's key). A container that
    holds itself keeps doing so.
    """
    from pbroker.stream import RemoteStream

    made: dict[int, Any] = {}

    def rebuilt(item: Any, hashable: bool = False) -> Any:
        if isinstance(item, RemoteStream):
            items = read.get(id(item), [])
            return tuple(items) if hashable else items
        if not isinstance(item, (list, tuple, set, frozenset, dict)):
            return item
        if id(item) in made:
            return made[id(item)]
        if isinstance(item, list):
            copy: Any = []
            made[id(item)] = copy
            copy.extend(rebuilt(each) for each in item)
            return copy
        if isinstance(item, dict):
            mapping: dict[Any, Any] = {}
            made[id(item)] = mapping
            for key, each in item.items():
                mapping[rebuilt(key, True)] = rebuilt(each)
            return mapping
        # Tuples and sets cannot hold themselves but through a list or dict, built above.
        items = [rebuilt(each, isinstance(item, (set, frozenset))) for each in item]
        return type(item)(items) if type(item) in (tuple, set, frozenset) else tuple(items)

    return rebuilt(value)


async def _run(reactor: Any, options: argparse.Namespace) -> Any:
    from twisted.internet.defer import CancelledError, Deferred
    from twisted.internet.error import ConnectionLost

    from pbroker import pb
    from pbroker.stream import END, RemoteStream

    arguments = _jsonArguments(getattr(options, "arguments", []))
    method = options.method if options.command == "call" else options.command
    if not method.isprintable():
        raise CommandError(EXIT_USAGE, f"bad method name {method!r}")
    endpoint = endpointFor(options.address, options.ca, reactor=reactor)
    password = _password(options.user) if options.user else None
    factory = pb.PBClientFactory()
    started = time.monotonic()
    deadline = reactor.seconds() + options.timeout

    async def within(
        step: Deferred[Any], code: int, what: str, late: str = "no answer", hint: str = ""
    ) -> Any:
        # Each step gets what is left of --timeout; its outcome, a Failure if it failed.
        # (Counted on the reactor's clock, which a test may drive.)
        left = max(0.0, deadline - reactor.seconds())
        timer = reactor.callLater(left, step.cancel)
        outcome: list[Any] = []
        try:
            await step.addBoth(outcome.append)
        finally:
            if timer.active():
                timer.cancel()
        if isinstance(outcome[0], Failure) and outcome[0].check(CancelledError):
            raise CommandError(code, f"{what}: {late} within {options.timeout:g} seconds{hint}")
        return outcome[0]

    itemsRead = 0

    async def read(stream: RemoteStream, shown: Callable[[Any], None] | None) -> list[Any]:
        # The stream's items to its end: each passed to shown as it comes, if given (and
        # not kept), else kept and returned; at most MAX_SHOWN kept, of all streams. (A
        # stream left unread is stopped by the disconnection that ends every command.)
        nonlocal itemsRead
        items: list[Any] = []
        while True:
            item = await within(stream.next(), EXIT_REMOTE, method, "the stream did not end")
            if isinstance(item, Failure):
                after = f"{itemsRead} item" + ("" if itemsRead == 1 else "s")
                raise CommandError(
                    EXIT_REMOTE,
                    f"remote error in a stream, after {after}: {_remoteMessage(item)}",
                    item,
                )
            if item is END:
                return items
            itemsRead += 1
            if shown is not None:
                shown(item)
                continue
            if itemsRead > MAX_SHOWN:
                raise CommandError(
                    EXIT_REMOTE, f"the result is too large to show: over {MAX_SHOWN:,} stream items"
                )
            items.append(item)

    connected = await within(
        pb.connect(endpoint, factory, reactor),
        EXIT_CONNECTION,
        f"cannot connect to {options.address}",
        # (A TLS port takes the connection, then waits for a TLS hello that never comes.)
        hint=" (if it is a TLS port, use pbs://)" if options.address.startswith("pb://") else "",
    )
    if isinstance(connected, Failure):
        reason = _tlsReason(connected) or connected.getErrorMessage()
        message = f"cannot connect to {options.address}: {reason or type(connected.value).__name__}"
        if options.address.startswith("pbs://") and connected.check(ConnectionLost):
            # (A plain PB port drops the TLS hello it cannot read: the client may see that
            # before, or instead of, the TLS error.)
            message += " (if it is a plain port, use pb://)"
        raise CommandError(EXIT_CONNECTION, message) from connected.value
    target = connected
    try:
        if options.user and password is not None:
            user = options.user.encode("utf-8", "surrogateescape")
            credentials = UsernamePassword(user, password)
            what = f"login refused for {options.user}"
            # (Not answered in time is not refused: the timeout says which it was.)
            answer = await within(
                factory.login(credentials), EXIT_LOGIN, f"login as {options.user}"
            )
            if isinstance(answer, Failure):
                if answer.check("twisted.spread.flavors.NoSuchMethod") and "remote_login" in str(
                    answer.value
                ):
                    # Its root is not a portal's: say so, rather than name the missing method.
                    raise CommandError(
                        EXIT_LOGIN, f"{what}: {options.address} takes no logins (leave out --user)"
                    )
                message = _remoteMessage(answer)
                if (
                    answer.check("twisted.cred.error.UnhandledCredentials")
                    and not answer.check("pbroker.cred.NoCheckerFor")
                ) or any(said in message for said in _NO_PASSWORD_LOGINS):
                    # No checker for passwords (a stock server names its interfaces, which
                    # tell a user nothing).
                    raise CommandError(
                        EXIT_LOGIN,
                        f"{what}: {options.address} takes no password logins (no checker "
                        "of its portal takes one)",
                        answer,
                    )
                raise CommandError(EXIT_LOGIN, f"{what}: {message}", answer)
            target = answer
        try:
            call: Deferred[Any] | None = target.callRemote(method, *arguments)
        except pb.DeadReferenceError:
            # Lost between the login (or the connection) and the call.
            raise CommandError(
                EXIT_CONNECTION, f"the connection to {options.address} was lost"
            ) from None
        assert call is not None  # answered calls always have a Deferred
        outcome = await within(call, EXIT_REMOTE, f"{method} failed")
        if isinstance(outcome, Failure):
            raise CommandError(EXIT_REMOTE, f"remote error: {_remoteMessage(outcome)}", outcome)
        if isinstance(outcome, RemoteStream):
            # Printed as they come (the stream may be long, or endless until --timeout).
            await read(outcome, lambda item: _printItem(_itemOutput(options, item)))
            outcome = StreamRead(itemsRead)
        else:
            streams = _streamsIn(outcome)
            if streams:
                # Read one after the other: a sender feeds each as its reader gives credit.
                items = {id(stream): await read(stream, None) for stream in streams}
                outcome = _withStreamsRead(outcome, items)
        return outcome, (time.monotonic() - started) * 1000
    finally:
        factory.disconnect()


#: What a failed TLS handshake's reason (OpenSSL's words) most likely means, as a hint.
_TLS_HINTS = {
    "wrong version number": "is it a plain port? use pb://",
    "certificate verify failed": "the server's certificate is not trusted: use --ca FILE",
    "certificate required": "the server asks for a client certificate",
}


def _tlsReason(failure: Failure) -> str | None:
    """
    A failed TLS handshake's reason in words, with a hint, rather than OpenSSL's list of
    (library, function, reason) tuples; ``None`` for another failure.
    """
    if failure.check("service_identity.exceptions.VerificationError"):
        return "TLS: the server's certificate does not name this host (or address)"
    if failure.check("service_identity.exceptions.CertificateError"):
        said = failure.getErrorMessage()
        if "subjectAltName" in said:  # (none at all)
            return (
                "TLS: the server's certificate names no host this can be checked against "
                f"({said}): server certificates need a subjectAltName"
            )
        return (
            "TLS: the server's certificate has a subjectAltName that cannot be checked "
            f"({said}): an address goes in as IP:, not DNS:, and a wildcard covers one label "
            "under a domain"
        )
    if not failure.check("OpenSSL.SSL.Error"):
        return None
    from pbroker.tls import _openSSLReasons

    reasons = [] if failure.value is None else _openSSLReasons(failure.value)
    if not reasons:
        return None
    reason = f"TLS handshake failed: {reasons[-1]}"
    hint = next((words for said, words in _TLS_HINTS.items() if said in reasons[-1]), None)
    return f"{reason} ({hint})" if hint else reason


def _printItem(text: str) -> None:
    """
    Print a result, or a stream's item as it comes. A reader that left (a broken pipe) ends
    the command quietly (see :func:`main`); another failure to write is an error of its own.
    """
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise
    except OSError as error:
        raise CommandError(
            EXIT_OUTPUT, f"cannot write the output: {error.strerror or error}"
        ) from None


#: Unicode categories escaped in an error line: controls (a newline, an escape), line and
#: paragraph separators, and surrogates; and these format characters, which reorder text.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def _oneLine(text: str) -> str:
    """
    ``text`` with its line breaks and other control characters escaped: an error is one line,
    and what a server (or the user) put in it must not drive the terminal. Other text, such
    as non-breaking spaces or an emoji's joiners, is kept.
    """
    if text.isprintable():
        return text
    return "".join(
        repr(c)[1:-1]
        if c in _BIDI_CONTROLS or unicodedata.category(c) in _ESCAPED_CATEGORIES
        else c
        for c in text
    )


def _report(message: str) -> None:
    print(f"pbroker: {_oneLine(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """
    Run the command line; return the exit code.
    """
    parser = _parser()
    options = parser.parse_args(argv)
    if options.user is not None and not options.user.strip():
        parser.error("--user needs a user name")  # rather than not logging in at all
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.error import ReactorNotRunning

    reactor: Any = _reactor  # the module's type says little before Twisted 26
    outcome: list[Any] = []
    interrupted: list[bool] = []
    # A shutdown before the command is done is not its own (Ctrl-C, SIGTERM): the reactor
    # drops the connection as it stops, which must not be reported as the server's doing.
    trigger = reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: None if outcome else interrupted.append(True)
    )

    def stop() -> None:
        # (Unless a signal stopped it in the same turn.)
        with contextlib.suppress(ReactorNotRunning):
            reactor.stop()

    deferred = ensureDeferred(_run(reactor, options))
    deferred.addBoth(outcome.append)
    deferred.addBoth(lambda _: reactor.callLater(0, stop))
    reactor.run()
    with contextlib.suppress(Exception):
        reactor.removeSystemEventTrigger(trigger)
    if interrupted or not outcome:
        outcome[:] = [Failure(CommandError(EXIT_CONNECTION, "interrupted"))]
    result = outcome[0]
    if isinstance(result, Failure):
        error = result.value
        if options.debug:
            remote = error.failure if isinstance(error, CommandError) else None
            if remote is not None:
                # The traceback the peer sent (with unsafeTracebacks, or from a stock peer),
                # not that of this command's own reporting.
                print(remote.getTraceback(), file=sys.stderr, end="")
            else:
                traceback.print_exception(error, file=sys.stderr)
        if isinstance(error, CommandError):
            _report(str(error))
            return error.code
        if isinstance(error, OSError) and error.errno == errno.EPIPE:
            return _readerLeft()
        _report(f"unexpected error: {error!r}")
        return 1
    value, milliseconds = result
    try:
        text = _output(options, value, milliseconds)
    except CommandError as error:
        _report(str(error))
        return error.code
    if text:  # (nothing follows a stream's items, but with --json)
        try:
            _printItem(text)
        except BrokenPipeError:
            return _readerLeft()
        except CommandError as error:
            _report(str(error))
            return error.code
    return EXIT_OK


def _readerLeft() -> int:
    """
    What the output was piped to stopped reading (``| head``): end quietly, as other
    commands do, with the exit code of a broken pipe.
    """
    # (Python's advice: point standard output at nothing, so that exiting flushes nowhere.
    # A replaced sys.stdout may have no descriptor: then there is nothing to point.)
    with contextlib.suppress(OSError, AttributeError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    return EXIT_OUTPUT
