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

from typing import Any

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.cred.checkers import (
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IAnonymous, IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.cred.strcred import AuthOptionMixin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python import usage
from zope.interface import implementer

import pbroker
from pbroker import pb, tls
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
        What :meth:`BrokerRoot.remote_info` says, and the logged-in ``user``.
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
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else "anonymous"
        return pb.IPerspective, BrokerAvatar(name, self.services), lambda: None


class IntrospectingPortalRoot(PortalRoot):
    """
    A login root that also answers ``ping``, ``info`` and ``services`` before login, so a
    client can check a broker without an account.
    """

    def __init__(self, portal: Portal, services: dict[str, Any]) -> None:
        super().__init__(portal)
        self.services = services

    def rootObject(self, broker: Any) -> pb.Referenceable:
        return _IntrospectingLoginRoot(self.portal, broker, self.guard, self.services)


class _IntrospectingLoginRoot(_Introspection, _PortalWrapper):
    def __init__(self, portal: Portal, broker: Any, guard: Any, services: dict[str, Any]):
        super().__init__(portal, broker, guard)
        self.services = services


class Options(usage.Options, AuthOptionMixin):
    """
    The command line of ``twistd pbroker``.
    """

    synopsis = "[options]"
    longdesc = __doc__
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
        ["tls-port", None, None, "Also listen for TLS on this port (loopback).", int],
        ["tls-certificate", None, None, "The server's PEM certificate, for --tls-port."],
        ["tls-key", None, None, "The server's PEM private key, for --tls-port."],
        ["tls-client-ca", None, None, "Require client certificates from these CAs (PEM)."],
        [
            "keepalive",
            None,
            None,
            "Ping clients silent for this many seconds; drop them after three times as long.",
            float,
        ],
        [
            "max-message-size",
            None,
            None,
            "The largest message (MiB) a client may send in pbroker's native dialect "
            "[default: 32].",
            float,
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
        if self["tls-port"] is not None:
            if not (self["tls-certificate"] and self["tls-key"]):
                raise usage.UsageError("--tls-port needs --tls-certificate and --tls-key")
        elif self["tls-certificate"] or self["tls-key"] or self["tls-client-ca"]:
            raise usage.UsageError("the --tls-* options need --tls-port")
        if not self["listen"] and self["tls-port"] is None:
            self["listen"] = [DEFAULT_LISTEN]
        if self["keepalive"] is not None and not self["keepalive"] > 0:
            raise usage.UsageError("--keepalive needs a positive number of seconds")
        if self["max-message-size"] is not None and not self["max-message-size"] > 0:
            raise usage.UsageError("--max-message-size needs a positive number of MiB")

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


def _bytesUsernames(checker: Any) -> Any:
    """
    strcred's ``memory:`` checker keeps text usernames; PB sends them as bytes, so they would
    never match. Give it bytes keys (and passwords).
    """
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            (k.encode("utf-8") if isinstance(k, str) else k): (
                v.encode("utf-8") if isinstance(v, str) else v
            )
            for k, v in checker.users.items()
        }
    return checker


def _loadRoot(name: str) -> Any:
    """
    The object ``--root`` names: an IPBRoot or a Portal, or a callable that returns one.

    :raises usage.UsageError: the name cannot be imported or names something else.
    """
    from twisted.python.reflect import namedAny

    try:
        found = namedAny(name)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise usage.UsageError(f"cannot load --root {name}: {e}") from None
    if not (pb.IPBRoot.providedBy(found) or isinstance(found, Portal)) and callable(found):
        found = found()
    if not (pb.IPBRoot.providedBy(found) or isinstance(found, Portal)):
        raise usage.UsageError(f"--root {name} is not a pb.Root, an IPBRoot or a Portal")
    return found


def makeService(options: Options) -> service.MultiService:
    """
    The service ``twistd pbroker`` runs: one listening service per endpoint.
    """
    from twisted.internet import reactor

    services: dict[str, Any] = {}
    root: Any
    if options["root"]:
        root = _loadRoot(options["root"])
    else:
        checkers = [_bytesUsernames(checker) for checker in options.get("credCheckers", [])]
        if options["password-file"]:
            checkers.append(ScramChecker(PasswordFile(options["password-file"])))
        if options["tls-client-ca"]:
            checkers.append(_CommonNameChecker())
        if options["anonymous"] or not options.wantsLogin:
            # With no login option at all, anonymous login is the embedded default.
            checkers.append(AllowAnonymousAccess())
        root = IntrospectingPortalRoot(Portal(BrokerRealm(services), checkers), services)
    keepalive = None
    if options["keepalive"] is not None:
        keepalive = pb.Keepalive(interval=options["keepalive"], timeout=3 * options["keepalive"])
    limits = None
    if options["max-message-size"] is not None:
        limits = pb.BrokerLimits(messageSize=int(options["max-message-size"] * 1024 * 1024))
    factory = pb.PBServerFactory(
        root,
        unsafeTracebacks=bool(options["unsafe-tracebacks"]),
        legacyLogin=not options["no-legacy-login"],
        limits=limits,
        keepalive=keepalive,
    )
    top = service.MultiService()
    for description in options["listen"]:
        strports.service(description, factory).setServiceParent(top)
    if options["tls-port"] is not None:
        endpoint = tls.serverEndpoint(
            reactor,
            options["tls-port"],
            options["tls-certificate"],
            options["tls-key"],
            clientCA=options["tls-client-ca"],
        )
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top
