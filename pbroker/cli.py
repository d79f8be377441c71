"""
The ``pbroker`` command-line client (also ``python -m pbroker``)::

    pbroker ping pb://127.0.0.1:8789
    pbroker info pb://127.0.0.1:8789 --json
    pbroker call pb://127.0.0.1:8789 echo '"hello"' '[1, 2]'
    pbroker --user alice call pb://broker.example:8789 whoAmI

The address is ``pb://host[:port]`` (TCP, port 8789 by default), ``pbs://host[:port]`` (TLS;
``--ca FILE`` to trust a CA file rather than the platform's), or any Twisted client endpoint
string (``unix:/run/pbroker.sock``). With ``--user`` the client logs in and calls the avatar;
the password comes from ``PBROKER_PASSWORD`` or a prompt, never from the command line.
Arguments to ``call`` are JSON values.

Exit codes: 0 success, 2 bad usage (including a bad address or JSON argument), 3 cannot
connect, 4 login refused, 5 the remote call failed. Errors are one line on stderr; ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import traceback
from typing import Any, NoReturn

from twisted.cred.credentials import UsernamePassword
from twisted.python.failure import Failure

__all__ = [
    "EXIT_CONNECTION",
    "EXIT_LOGIN",
    "EXIT_OK",
    "EXIT_REMOTE",
    "EXIT_USAGE",
    "endpointFor",
    "main",
]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_LOGIN = 4
EXIT_REMOTE = 5

DEFAULT_PORT = 8789


class CommandError(Exception):
    """
    A failure to report as one line, with its exit code.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def endpointFor(address: str, caFile: str | None = None) -> str | Any:
    """
    The client endpoint (string or object) for a command-line address.

    :raises CommandError: the address is not one of the accepted forms.
    """
    from twisted.internet import reactor

    from pbroker import tls

    if "://" not in address:
        if ":" not in address:
            raise CommandError(EXIT_USAGE, f"not an address: {address!r} (try pb://host:port)")
        return address
    scheme, _, rest = address.partition("://")
    rest = rest.rstrip("/")
    host, _, portText = rest.rpartition(":") if ":" in rest else (rest, "", "")
    host = host.strip("[]")
    if not host:
        raise CommandError(EXIT_USAGE, f"no host in {address!r}")
    try:
        port = int(portText) if portText else DEFAULT_PORT
    except ValueError:
        raise CommandError(EXIT_USAGE, f"bad port in {address!r}") from None
    if not 0 < port < 65536:
        raise CommandError(EXIT_USAGE, f"bad port in {address!r}")
    if scheme == "pb":
        return f"tcp:host={host}:port={port}"
    if scheme == "pbs":
        return tls.clientEndpoint(reactor, host, port, caFile=caFile)
    raise CommandError(EXIT_USAGE, f"unknown scheme {scheme!r} in {address!r} (pb or pbs)")


class _Parser(argparse.ArgumentParser):
    """
    argparse, with usage errors on one line like every other error.
    """

    def error(self, message: str) -> NoReturn:
        print(f"pbroker: {message} (pbroker --help shows the usage)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pbroker", description="Talk to a Perspective Broker (pbroker or Twisted PB)."
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--user", help="log in as this user (password: PBROKER_PASSWORD or prompt)")
    parser.add_argument("--ca", help="trust this CA file for pbs:// addresses")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds for the whole command (default 30)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping", help="check that the broker answers").add_argument("address")
    commands.add_parser("info", help="what the broker says about itself").add_argument("address")
    call = commands.add_parser("call", help="call a remote method")
    call.add_argument("address")
    call.add_argument("method")
    call.add_argument("arguments", nargs="*", help="JSON values")
    return parser


def _password(user: str) -> bytes:
    password = os.environ.get("PBROKER_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise CommandError(
                EXIT_USAGE, "no password: set PBROKER_PASSWORD or run in a terminal to be asked"
            )
        password = getpass.getpass(f"Password for {user}: ")
    return password.encode("utf-8")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"bytes": value.hex()}
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _human(value: Any) -> str:
    if isinstance(value, dict):
        return "\n".join(f"{k}: {_human(v)}" for k, v in value.items())
    if isinstance(value, str):
        return value
    return repr(value)


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


async def _run(reactor: Any, options: argparse.Namespace) -> Any:
    from twisted.internet.defer import CancelledError, Deferred

    from pbroker import pb

    arguments: list[Any] = []
    for index, text in enumerate(getattr(options, "arguments", []), start=1):
        try:
            arguments.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise CommandError(EXIT_USAGE, f"argument {index} is not valid JSON: {e}") from None
    endpoint = endpointFor(options.address, options.ca)
    password = _password(options.user) if options.user else None
    factory = pb.PBClientFactory()
    started = time.monotonic()

    async def within(step: Deferred[Any], code: int, what: str) -> Any:
        # Each step gets what is left of --timeout; its outcome, a Failure if it failed.
        left = max(0.0, started + options.timeout - time.monotonic())
        timer = reactor.callLater(left, step.cancel)
        outcome: list[Any] = []
        try:
            await step.addBoth(outcome.append)
        finally:
            if timer.active():
                timer.cancel()
        if isinstance(outcome[0], Failure) and outcome[0].check(CancelledError):
            raise CommandError(code, f"{what}: no answer within {options.timeout:g} seconds")
        return outcome[0]

    connected = await within(
        pb.connect(endpoint, factory, reactor),
        EXIT_CONNECTION,
        f"cannot connect to {options.address}",
    )
    if isinstance(connected, Failure):
        reason = connected.getErrorMessage() or type(connected.value).__name__
        message = f"cannot connect to {options.address}: {reason}"
        raise CommandError(EXIT_CONNECTION, message) from connected.value
    target = connected
    try:
        if options.user and password is not None:
            credentials = UsernamePassword(options.user.encode(), password)
            what = f"login refused for {options.user}"
            answer = await within(factory.login(credentials), EXIT_LOGIN, what)
            if isinstance(answer, Failure):
                raise CommandError(EXIT_LOGIN, f"{what}: {_remoteMessage(answer)}")
            target = answer
        method = options.method if options.command == "call" else options.command
        call: Deferred[Any] | None = target.callRemote(method, *arguments)
        assert call is not None  # answered calls always have a Deferred
        outcome = await within(call, EXIT_REMOTE, f"{method} failed")
        if isinstance(outcome, Failure):
            raise CommandError(EXIT_REMOTE, f"remote error: {_remoteMessage(outcome)}")
        return outcome, (time.monotonic() - started) * 1000
    finally:
        factory.disconnect()


def main(argv: list[str] | None = None) -> int:
    """
    Run the command line; return the exit code.
    """
    options = _parser().parse_args(argv)
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    outcome: list[Any] = []
    deferred = ensureDeferred(_run(reactor, options))
    deferred.addBoth(outcome.append)
    deferred.addBoth(lambda _: reactor.callLater(0, reactor.stop))
    reactor.run()
    result = outcome[0] if outcome else Failure(CommandError(EXIT_CONNECTION, "interrupted"))
    if isinstance(result, Failure):
        error = result.value
        if options.debug:
            traceback.print_exception(error, file=sys.stderr)
        if isinstance(error, CommandError):
            print(f"pbroker: {error}", file=sys.stderr)
            return error.code
        print(f"pbroker: unexpected error: {error!r}", file=sys.stderr)
        return 1
    value, milliseconds = result
    if options.json:
        print(json.dumps({"result": _jsonable(value), "ms": round(milliseconds, 1)}))
    elif options.command == "ping":
        print(f"{_human(value)} ({milliseconds:.1f} ms)")
    else:
        print(_human(value))
    return EXIT_OK
