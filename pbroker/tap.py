"""
``twistd pbroker``: serve a broker, with useful embedded defaults.

With no options it listens on ``tcp:8789:interface=127.0.0.1`` and serves a login root that
also answers ``ping``, ``info`` and ``services``; clients may log in anonymously to an avatar
with the same methods. Options add listening endpoints (any Twisted endpoint string; ``ssl:``
for TLS), mutual TLS, logins (``--auth`` through :mod:`twisted.cred.strcred`, a pbroker
``--password-file``; anonymous login then only with ``--anonymous``), another root
(``--root``), and the usual ``--unsafe-tracebacks``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.cred.checkers import (
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IAnonymous, IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.cred.strcred import AuthOptionMixin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.python import usage
from zope.interface import implementer

import pbroker
from pbroker import pb, tls
from pbroker._keepalive import MIN_INTERVAL
from pbroker.broker import MIN_MESSAGE_SIZE
from pbroker.cred import PortalRoot, _PortalWrapper
from pbroker.passwords import PasswordFile, ScramChecker

__all__ = ["DEFAULT_LISTEN", "BrokerAvatar", "BrokerRealm", "BrokerRoot", "Options", "makeService"]

#: Where ``twistd pbroker`` listens without ``--listen``: loopback only.
DEFAULT_LISTEN = "tcp:8789:interface=127.0.0.1"


def _info(services: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "pbroker",
        "version": pbroker.__version__,
        "protocol": pb.PB_VERSION,
        "services": sorted(services),
    }


class _Introspection:
    """
    ``ping``, ``info`` and ``services``, for a root that has ``services``.
    """

    services: dict[str, Any]

    def remote_ping(self) -> str:
        """
        ``"pong"``: the broker is alive.
        """
        return "pong"

    def remote_info(self) -> dict[str, Any]:
        """
        The broker's name, version, protocol version and services.
        """
        return _info(self.services)

    def remote_services(self) -> list[str]:
        """
        The names of the services the broker serves.
        """
        return sorted(self.services)


class BrokerRoot(_Introspection, pb.Root):
    """
    A root object without login that says the broker is alive and what it serves (for
    ``--root pbroker.tap.BrokerRoot``).
    """

    def __init__(self, services: dict[str, Any] | None = None) -> None:
        self.services = {} if services is None else services


class BrokerAvatar(pb.Avatar):
    """
    What a logged-in client gets from the default realm: the same introspection, by name.
    """

    def __init__(self, name: str, services: dict[str, Any]) -> None:
        self.name = name
        self.services = services

    def perspective_ping(self) -> str:
        """
        ``"pong"``: the broker is alive.
        """
        return "pong"

    def perspective_info(self) -> dict[str, Any]:
        """
        What ``BrokerRoot.remote_info()`` says, and the logged-in ``user``.
        """
        return {**_info(self.services), "user": self.name}

    def perspective_services(self) -> list[str]:
        """
        The names of the services the broker serves.
        """
        return sorted(self.services)


@implementer(IRealm)
class BrokerRealm:
    """
    The default realm: every avatar id gets a :class:`BrokerAvatar`.
    """

    def __init__(self, services: dict[str, Any] | None = None) -> None:
        self.services = {} if services is None else services

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        """
        A :class:`BrokerAvatar` named after ``avatarId`` (``anonymous`` for an anonymous
        login), as a PB perspective.
        """
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("this realm only gives PB perspectives")
        if isinstance(avatarId, bytes):
            name = avatarId.decode("utf-8", "replace")
        elif isinstance(avatarId, str) and avatarId:
            name = avatarId
        else:
            name = "anonymous"
        return pb.IPerspective, BrokerAvatar(name, self.services), lambda: None


class IntrospectingPortalRoot(PortalRoot):
    """
    A login root that also answers ``ping``, ``info`` and ``services`` before login, so a
    client can check a broker without an account.
    """

    def __init__(self, portal: Portal, services: dict[str, Any], legacyLogin: bool = True) -> None:
        super().__init__(portal, legacyLogin=legacyLogin)
        self.services = services

    def rootObject(self, broker: Any) -> pb.Referenceable:
        return _IntrospectingLoginRoot(
            self.portal, broker, self.guard, self.services, self.legacyLogin
        )


class _IntrospectingLoginRoot(_Introspection, _PortalWrapper):
    def __init__(
        self,
        portal: Portal,
        broker: Any,
        guard: Any,
        services: dict[str, Any],
        legacyLogin: bool = True,
    ):
        super().__init__(portal, broker, guard, legacyLogin)
        self.services = services


def _number(option: str, kind: type) -> Any:
    """
    A coercer for a numeric option whose error names the option (Twisted's says only
    "Parameter type enforcement failed").
    """

    def coerce(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            wanted = "a whole number" if kind is int else "a number"
            raise usage.UsageError(f"{option} needs {wanted}, not {text!r}") from None

    return coerce


def _notAFile(path: str) -> str:
    """
    Why ``path`` cannot be read as a file, as an error says it.
    """
    if os.path.isdir(path):
        return "is a directory, not a file"
    if os.path.exists(path):
        return "is not a regular file"
    return "no such file"


class Options(usage.Options, AuthOptionMixin):
    """
    The command line of ``twistd pbroker``.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve a broker. With no options it listens on tcp:8789:interface=127.0.0.1 and "
        "serves a login root that also answers ping, info and services; clients may log in "
        "anonymously. The options above set endpoints, TLS, logins and another root."
    )
    supportedInterfaces = [IUsernamePassword, IUsernameHashedPassword, IAnonymous]
    optFlags = [
        ["anonymous", None, "Allow anonymous login."],
        ["unsafe-tracebacks", None, "Send full tracebacks of failures to callers."],
        ["no-legacy-login", None, "Refuse the legacy MD5 login of stock Twisted clients."],
    ]
    optParameters = [
        [
            "root",
            None,
            None,
            "Serve this instead: package.module.name of a pb.Root (or a "
            "callable returning one, or a Portal).",
        ],
        ["password-file", None, None, "A pbroker password file (python -m pbroker.passwords)."],
        [
            "tls-port",
            None,
            None,
            "Listen for TLS on this port (loopback); with --listen too, on both.",
            _number("--tls-port", int),
        ],
        [
            "tls-certificate",
            None,
            None,
            "The server's PEM certificate, for --tls-port (any chain after it is sent too).",
        ],
        ["tls-key", None, None, "The server's PEM private key, for --tls-port."],
        ["tls-client-ca", None, None, "Require client certificates from these CAs (PEM)."],
        [
            "keepalive",
            None,
            None,
            "Ping clients silent for this many seconds; drop them after three times as long.",
            _number("--keepalive", float),
        ],
        [
            "max-message-size",
            None,
            None,
            "The largest message (MiB) a client may send in pbroker's native dialect "
            "[default: 32].",
            _number("--max-message-size", float),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on an endpoint (repeatable), e.g. tcp:8789:interface=127.0.0.1 or ssl:...
        [default: tcp:8789:interface=127.0.0.1]
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        """
        Check everything the service will need, so that a mistake is a usage error at
        startup, not a traceback or a server that runs without part of what was asked.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        if self["tls-port"] is not None:
            if not (self["tls-certificate"] and self["tls-key"]):
                raise usage.UsageError("--tls-port needs --tls-certificate and --tls-key")
            if not 0 <= self["tls-port"] <= 65535:
                raise usage.UsageError(f"--tls-port {self['tls-port']}: not a port number")
        elif self["tls-certificate"] or self["tls-key"] or self["tls-client-ca"]:
            raise usage.UsageError("the --tls-* options need --tls-port")
        if not self["listen"] and self["tls-port"] is None:
            self["listen"] = [DEFAULT_LISTEN]
        # Every endpoint to listen on, parsed (and its files read) here, with the option it
        # was given as, for the error if it cannot be listened on.
        self["endpoints"] = []
        for description in self["listen"]:
            try:
                endpoint = serverFromString(reactor, description)
                self["endpoints"].append((f"--listen {description}", endpoint))
            except Exception as e:
                hint = ""
                if re.search(r"=[^:]*(?<!\\)::", description) and isinstance(e, TypeError):
                    # An IPv6 address (interface=::1) split at its colons.
                    hint = " (a colon in a value is written \\:, as in interface=\\:\\:1)"
                raise usage.UsageError(f"--listen {description}: {_reason(e)}{hint}") from None
        self["keepaliveSettings"] = None
        seconds = self["keepalive"]
        if seconds is not None:
            if not (math.isfinite(seconds) and seconds >= MIN_INTERVAL):
                raise usage.UsageError(
                    f"--keepalive needs a number of seconds, at least {MIN_INTERVAL}"
                )
            self["keepaliveSettings"] = pb.Keepalive(interval=seconds, timeout=3 * seconds)
        self["limits"] = None
        mebibytes = self["max-message-size"]
        if mebibytes is not None:
            size = mebibytes * 1024 * 1024
            if not (math.isfinite(size) and MIN_MESSAGE_SIZE <= size < 2**63):
                raise usage.UsageError(
                    f"--max-message-size needs a number of MiB, at least {MIN_MESSAGE_SIZE} "
                    "bytes and below 2**63 bytes (8 EiB)"
                )
            self["limits"] = pb.BrokerLimits(messageSize=int(size))
        if self["tls-port"] is not None:
            try:
                tlsEndpoint = tls.serverEndpoint(
                    reactor,
                    self["tls-port"],
                    self["tls-certificate"],
                    self["tls-key"],
                    clientCA=self["tls-client-ca"],
                )
            except Exception as e:
                raise usage.UsageError(f"cannot use the TLS files: {_reason(e)}") from None
            self["endpoints"].append((f"--tls-port {self['tls-port']}", tlsEndpoint))
        self._checkLogins()

    def _checkLogins(self) -> None:
        for name in ("password-file", "root"):
            if self[name] == "":
                # (An unset shell variable, say: taken as not given, it would serve the
                # embedded defaults, anonymous logins among them.)
                raise usage.UsageError(f"--{name} needs a value, not an empty one")
        checkers = self.get("credCheckers", [])
        for checker in checkers:
            if not set(checker.credentialInterfaces) & _PB_CREDENTIALS:
                names = ", ".join(i.__name__ for i in checker.credentialInterfaces)
                raise usage.UsageError(
                    f"--auth: {type(checker).__name__} checks {names} credentials, which no "
                    "PB login sends"
                )
            filename = getattr(checker, "filename", None)
            if isinstance(filename, str):
                where = self._whereRead(filename)
                reason = None
                if where is not None and not os.path.isfile(where):
                    reason = _notAFile(where)
                elif where is not None:
                    try:
                        with open(where, "rb"):
                            pass
                    except OSError as e:
                        reason = e.strerror or type(e).__name__
                if reason is not None:
                    raise usage.UsageError(
                        f"--auth: {reason}: {filename}"
                        + ("" if where == filename else f" (read from --rundir as {where})")
                    )
        accounts = [c for c in checkers if IUsernameHashedPassword in c.credentialInterfaces]
        if accounts and self["no-legacy-login"]:
            raise usage.UsageError(
                "--auth accounts log in only through the legacy MD5 login, which "
                "--no-legacy-login refuses: nobody could log in (use --password-file)"
            )
        self["rootObject"] = None
        if self["root"]:
            if checkers or self["password-file"] or self["anonymous"]:
                raise usage.UsageError(
                    "--root serves the application's own root: --auth, --password-file and "
                    "--anonymous do not apply to it"
                )
            root = _loadRoot(self["root"])
            if self["no-legacy-login"] and not isinstance(root, Portal):
                raise usage.UsageError("--no-legacy-login applies only when --root names a Portal")
            self["rootObject"] = root
        if self["password-file"]:
            if accounts:
                raise usage.UsageError(
                    "--password-file and --auth with accounts cannot be combined: pbroker "
                    "clients log in through the password file, so the --auth accounts "
                    "would work only from stock Twisted clients"
                )
            self._checkPasswordFile(self["password-file"])

    def _whereRead(self, path: str) -> str | None:
        """
        Where the server will read ``path`` from: twistd's ``--rundir`` (the current
        directory by default) for a relative path; ``None`` inside a ``--chroot``, which
        cannot be looked into from here.
        """
        parent = getattr(self, "parent", None)
        if parent is not None and parent.get("chroot"):
            return None
        rundir = (parent.get("rundir") if parent is not None else None) or "."
        return path if rundir == "." else os.path.join(rundir, path)

    def _checkPasswordFile(self, path: str) -> None:
        where = self._whereRead(path)
        if where is None:
            return
        if not os.path.isfile(where):
            raise usage.UsageError(
                f"--password-file {path}: {_notAFile(where)}"
                + ("" if where == path else f" (read from --rundir as {where})")
            )
        try:
            PasswordFile(where).verifierFor(b"pbroker-startup-check")
        except Exception as e:
            raise usage.UsageError(f"--password-file {path}: {_reason(e)}") from None

    @property
    def wantsLogin(self) -> bool:
        """
        Whether an option asks for logins to accounts (so that anonymous login needs
        ``--anonymous``).
        """
        return bool(
            self.get("credCheckers")
            or self["password-file"]
            or self["anonymous"]
            or self["tls-client-ca"]
        )


# What the PB logins offer a checker: the legacy exchange's challenger (a hashed password)
# and anonymous login (the password file and certificates have checkers of their own).
_PB_CREDENTIALS = {IUsernameHashedPassword, IAnonymous}


def _reason(error: Exception) -> str:
    """
    An exception as a line of a usage error.
    """
    if isinstance(error, CannotListenError) and isinstance(error.socketError, Exception):
        return _reason(error.socketError)  # "Address already in use", not the address again
    if isinstance(error, OSError) and error.filename is not None:
        # Of two paths (a symbolic link, as Twisted's lock files make), the second is
        # where it was to go.
        path = error.filename if error.filename2 is None else error.filename2
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return f"{error.strerror or type(error).__name__}: {path}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error.__cause__, StopIteration):
        # What Twisted's endpoint-string parser raises for a trailing backslash.
        return "it ends with a backslash that escapes nothing"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@implementer(ICredentialsChecker)
class _CommonNameChecker:
    """
    Logs a client in as the user its certificate's common name names: for
    ``--tls-client-ca``, whose CA issues certificates to the broker's users alone (TLS has
    verified the certificate before this sees it).
    """

    credentialInterfaces = (tls.IPeerCertificate,)

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        name = credentials.commonName
        if not name:
            return fail(UnauthorizedLogin("the client certificate names no user (common name)"))
        return succeed(name.encode("utf-8"))


def _eitherUsernames(checker: Any) -> Any:
    """
    strcred's ``memory:`` checker keeps text usernames; clients send them as bytes (pbroker's,
    and most stock ones) or as text (a stock client given a text username). Give it each
    user under both, with bytes passwords.
    """
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        users: dict[bytes | str, bytes] = {}
        for name, password in checker.users.items():
            if isinstance(password, str):
                password = password.encode("utf-8")
            users[name] = password
            try:
                other = name.decode("utf-8") if isinstance(name, bytes) else name.encode("utf-8")
            except UnicodeError:
                continue  # only ever sent as these bytes
            users.setdefault(other, password)
        checker.users = users  # type: ignore[assignment]  # (strcred keeps text keys too)
    return checker


@implementer(ICredentialsChecker)
class _FirstOf:
    """
    The checkers of one kind of credentials, tried in the order given until one accepts:
    so that several ``--auth`` options of one kind (``memory:``, ``file:``) all log their
    users in, where a Portal keeps only the last checker of each kind.
    """

    def __init__(self, interface: Any, checkers: list[Any]) -> None:
        self.credentialInterfaces = (interface,)
        self.checkers = checkers

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return self._tryFrom(0, credentials)

    def _tryFrom(self, index: int, credentials: Any) -> Deferred[Any]:
        attempt: Deferred[Any] = maybeDeferred(self.checkers[index].requestAvatarId, credentials)
        if index + 1 < len(self.checkers):

            def tryNext(failure: Any) -> Deferred[Any]:
                # A refusal ("not mine", or wrong password) passes to the next; any other
                # error (a database down) fails the login, closed.
                failure.trap(LoginFailed)
                return self._tryFrom(index + 1, credentials)

            attempt.addErrback(tryNext)
        return attempt


def _registerCheckers(portal: Portal, checkers: list[Any]) -> None:
    """
    Register ``checkers`` with ``portal``, those of a kind of credentials that another
    checks too combined into one that tries each in turn (see :class:`_FirstOf`).
    """
    byKind: dict[Any, list[Any]] = {}
    for checker in checkers:
        for interface in checker.credentialInterfaces:
            byKind.setdefault(interface, []).append(checker)
    for interface, ofKind in byKind.items():
        portal.registerChecker(
            ofKind[0] if len(ofKind) == 1 else _FirstOf(interface, ofKind), interface
        )


def _loadRoot(name: str) -> Any:
    """
    The object ``--root`` names: an IPBRoot or a Portal, or a callable that returns one.

    :raises usage.UsageError: the name cannot be imported or names something else.
    """
    from twisted.python.reflect import namedAny

    try:
        found = namedAny(name)  # type: ignore[no-untyped-call]
    except Exception as e:
        reason = str(e)
        top = name.split(".")[0]
        try:
            missing = bool(top) and importlib.util.find_spec(top) is None
        except (ImportError, ValueError):
            missing = False
        if missing:
            # namedAny says only "does not name an object"; the usual cause is a module in
            # the current directory, which twistd does not put on sys.path.
            reason = (
                f"no module {top!r} can be imported (twistd does not look in the current"
                " directory: add the module's directory to PYTHONPATH)"
            )
        raise usage.UsageError(f"cannot load --root {name}: {reason}") from None
    if not (pb.IPBRoot.providedBy(found) or isinstance(found, Portal)) and callable(found):
        try:
            found = found()
        except Exception as e:
            raise usage.UsageError(f"cannot load --root {name}: {_reason(e)}") from None
    if not (pb.IPBRoot.providedBy(found) or isinstance(found, Portal)):
        raise usage.UsageError(f"--root {name} is not a pb.Root, an IPBRoot or a Portal")
    return found


def makeService(options: Options) -> service.MultiService:
    """
    The service ``twistd pbroker`` runs: one listening service per endpoint.
    """
    services: dict[str, Any] = {}
    root: Any
    if options["rootObject"] is not None:
        root = options["rootObject"]
    else:
        checkers = [_eitherUsernames(checker) for checker in options.get("credCheckers", [])]
        if options["password-file"]:
            checkers.append(ScramChecker(PasswordFile(options["password-file"])))
        if options["tls-client-ca"]:
            checkers.append(_CommonNameChecker())
        if options["anonymous"] or not options.wantsLogin:
            # With no login option at all, anonymous login is the embedded default.
            checkers.append(AllowAnonymousAccess())
        portal = Portal(BrokerRealm(services))
        _registerCheckers(portal, checkers)
        root = IntrospectingPortalRoot(
            portal,
            services,
            legacyLogin=not options["no-legacy-login"],
        )
    # A Portal given with --root is wrapped by the factory, which takes --no-legacy-login.
    legacyLogin = not (isinstance(root, Portal) and options["no-legacy-login"])
    factory = pb.PBServerFactory(
        root,
        unsafeTracebacks=bool(options["unsafe-tracebacks"]),
        legacyLogin=legacyLogin,
        limits=options["limits"],
        keepalive=options["keepaliveSettings"],
    )
    top = service.MultiService()
    for option, endpoint in options["endpoints"]:
        _ListeningService(endpoint, factory, option).setServiceParent(top)  # type: ignore[no-untyped-call]
    _reportCannotListenOnOneLine()
    return top


class CannotListen(Exception):
    """
    ``twistd pbroker`` cannot listen on a port it was asked for (the message says which,
    and why). It stops twistd at startup.
    """


class _ListeningService(StreamServerEndpointService):
    """
    Listens on one endpoint; one that cannot be listened on stops twistd at startup, as
    ``strports.service`` does, instead of leaving it running without that port, with a
    :class:`CannotListen` that names the option.
    """

    def __init__(self, endpoint: Any, factory: Any, option: str) -> None:
        super().__init__(endpoint, factory)  # type: ignore[no-untyped-call]
        # (Not the service's name: a MultiService refuses two services of one name, and
        # the same --listen may be given twice.)
        self.option = option
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except Exception as e:
            raise CannotListen(f"cannot listen on {self.option}: {_reason(e)}") from None


def _reportCannotListenOnOneLine() -> None:
    """
    Have :class:`CannotListen`, which ends ``twistd -n`` at startup, reported on one line
    rather than with a traceback (twistd raises it on, after removing its pid file; a
    daemonising twistd reports it through its status pipe instead).
    """
    previous = sys.excepthook
    if getattr(previous, "reportsCannotListen", False):
        return

    def report(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
        if issubclass(kind, CannotListen):
            print(f"twistd pbroker: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    report.reportsCannotListen = True  # type: ignore[attr-defined]
    sys.excepthook = report
