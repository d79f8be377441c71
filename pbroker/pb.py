"""
Perspective Broker: the factories and the public names of ``twisted.spread.pb``.

Porting an application means changing ``from twisted.spread import pb`` to
``from pbroker import pb``::

    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", 8789, factory)
    root = await factory.getRootObject()
    result = await root.callRemote("echo", "hello")
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IListeningPort,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.python.failure import Failure

from pbroker import banana as banana  # (pb.banana and pb.jelly, as in twisted.spread.pb)
from pbroker import jelly as jelly
from pbroker.broker import (
    MAX_BROKER_REFS,
    NATIVE_DIALECT,
    PB_VERSION,
    Broker,
    BrokerLimits,
    Keepalive,
)
from pbroker.errors import (
    DeadReferenceError,
    Error,
    NoSuchMethod,
    PBConnectionLost,
    ProtocolError,
    RemoteError,
)
from pbroker.failure import CopiedFailure, CopyableFailure, failure2Copyable
from pbroker.flavors import (
    Cacheable,
    Copyable,
    IPBRoot,
    Jellyable,
    Referenceable,
    RemoteCache,
    RemoteCacheObserver,
    RemoteCopy,
    Root,
    Serializable,
    Viewable,
    ViewPoint,
    setCopierForClass,
    setCopierForClassTree,
    setFactoryForClass,
)
from pbroker.jelly import (
    IJellyable,
    ISecurityOptions,
    IUnjellyable,
    UnjellyableRegistry,
    globalSecurity,
    setUnjellyableFactoryForClass,
    setUnjellyableForClass,
    setUnjellyableForClassTree,
    unjelly,
)
from pbroker.references import Local, RemoteMethod, RemoteReference
from pbroker.stream import RemoteStream

if TYPE_CHECKING:
    from twisted.cred.credentials import (
        Anonymous,
        IAnonymous,
        ICredentials,
        IUsernameHashedPassword,
    )
    from twisted.cred.portal import Portal

    from pbroker.cred import (
        AsReferenceable,
        Avatar,
        IPerspective,
        IUsernameMD5Password,
        LoginGuard,
        challenge,
        respond,
    )
    from pbroker.tls import CertificateLogin

__all__ = [
    "MAX_BROKER_REFS",
    "NATIVE_DIALECT",
    "PB_VERSION",
    "Anonymous",
    "AsReferenceable",
    "Avatar",
    "Broker",
    "BrokerLimits",
    "Cacheable",
    "CertificateLogin",
    "CopiedFailure",
    "Copyable",
    "CopyableFailure",
    "DeadReferenceError",
    "Error",
    "IAnonymous",
    "ICredentials",
    "IJellyable",
    "IPBRoot",
    "IPerspective",
    "ISecurityOptions",
    "IUnjellyable",
    "IUsernameHashedPassword",
    "IUsernameMD5Password",
    "Jellyable",
    "Keepalive",
    "Local",
    "LoginGuard",
    "NoSuchMethod",
    "PBClientFactory",
    "PBConnectionLost",
    "PBServerFactory",
    "Portal",
    "ProtocolError",
    "Referenceable",
    "RemoteCache",
    "RemoteCacheObserver",
    "RemoteCopy",
    "RemoteError",
    "RemoteMethod",
    "RemoteReference",
    "Root",
    "Serializable",
    "UnjellyableRegistry",
    "ViewPoint",
    "Viewable",
    "challenge",
    "connect",
    "failure2Copyable",
    "globalSecurity",
    "listen",
    "portno",
    "respond",
    "setCopierForClass",
    "setCopierForClassTree",
    "setFactoryForClass",
    "setUnjellyableFactoryForClass",
    "setUnjellyableForClass",
    "setUnjellyableForClassTree",
    "unjelly",
]

#: The port PB servers traditionally listen on, under Twisted's name.
portno = 8787


# The names this module takes from pbroker.cred and pbroker.tls, which are imported on first
# use of one of them: a server without a portal (and a client that does not log in) never
# needs twisted.cred, and the names each of these loads add to every process's memory.
_LAZY = {
    "AsReferenceable": "pbroker.cred",
    "Avatar": "pbroker.cred",
    "IPerspective": "pbroker.cred",
    "IUsernameMD5Password": "pbroker.cred",
    "LoginGuard": "pbroker.cred",
    "challenge": "pbroker.cred",
    "respond": "pbroker.cred",
    "CertificateLogin": "pbroker.tls",
    # twisted.cred's names, as twisted.spread.pb has them.
    "Anonymous": "twisted.cred.credentials",
    "IAnonymous": "twisted.cred.credentials",
    "ICredentials": "twisted.cred.credentials",
    "IUsernameHashedPassword": "twisted.cred.credentials",
    "Portal": "twisted.cred.portal",
}


if not TYPE_CHECKING:  # (type checkers see the names above: an unknown one is an error)

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _BrokerOptions:
    """
    The options a factory gives each broker it builds (see :class:`Broker`).
    """

    unsafeTracebacks: bool
    security: ISecurityOptions
    registry: UnjellyableRegistry | None
    limits: BrokerLimits
    dialects: list[bytes] | None
    keepalive: Keepalive | None
    clock: Any

    def _setOptions(
        self,
        unsafeTracebacks: bool,
        security: ISecurityOptions,
        registry: UnjellyableRegistry | None,
        limits: BrokerLimits | None,
        dialects: Sequence[bytes] | None,
        keepalive: Keepalive | None,
        clock: Any,
    ) -> None:
        # Checked now rather than per connection: a Broker checks them as it is built.
        listed = _listed(dialects)
        Broker(
            security=security,
            registry=registry,
            limits=limits,
            dialects=listed,
            keepalive=keepalive,
            clock=clock,
        )
        self.unsafeTracebacks = unsafeTracebacks
        self.security = security
        self.registry = registry
        self.limits = BrokerLimits() if limits is None else limits
        self.dialects = listed
        self.keepalive = keepalive
        self.clock = clock


class PBServerFactory(_BrokerOptions, protocol.ServerFactory):
    """
    Serves ``root`` to every client: an :class:`~pbroker.flavors.IPBRoot` (such as a
    :class:`~pbroker.flavors.Root`), or a :class:`~twisted.cred.portal.Portal`, in which case
    clients log in to an avatar.

    :param unsafeTracebacks: send the full traceback of a failure to the caller.
    :param security: security options for what the brokers send and receive.
    :param registry: the copy registry the brokers rebuild pass-by-copy values with.
    :param limits: what each client may make the server hold
        (:class:`~pbroker.broker.BrokerLimits`).
    :param loginGuard: with a portal, what slows down password guessing (a
        :class:`~pbroker.cred.LoginGuard` with its defaults if not given).
    :param legacyLogin: with a portal, whether the legacy MD5 login of stock Twisted clients
        is accepted; pbroker clients use the password login of :mod:`pbroker.passwords`.
        Either option with a root that is not a portal raises :class:`ValueError`: the
        factory takes no logins for such a root, so it could not apply them.
    :param dialects: the dialects offered, in order of preference; by default pbroker's
        native dialect, then ``pbroker1`` and ``pb`` (see :ref:`native`).
    :param keepalive: ping silent clients and drop dead ones
        (a :class:`~pbroker.broker.Keepalive`).
    :param clock: what schedules keepalive pings and call timeouts (the reactor by default),
        and with a portal the default login guard's delays.
    """

    protocol = Broker

    def __init__(
        self,
        root: Any,
        unsafeTracebacks: bool = False,
        security: ISecurityOptions = globalSecurity,
        registry: UnjellyableRegistry | None = None,
        limits: BrokerLimits | None = None,
        loginGuard: LoginGuard | None = None,
        legacyLogin: bool = True,
        *,
        dialects: Sequence[bytes] | None = None,
        keepalive: Keepalive | None = None,
        clock: Any = None,
    ) -> None:
        self._setOptions(unsafeTracebacks, security, registry, limits, dialects, keepalive, clock)
        if _isPortal(root):
            from pbroker.cred import LoginGuard, PortalRoot

            if loginGuard is None and clock is not None:
                loginGuard = LoginGuard(reactor=clock)
            root = PortalRoot(root, loginGuard, legacyLogin)
        elif loginGuard is not None or legacyLogin is not True:
            # Silently unguarded logins would be worse than a refusal here.
            raise ValueError(
                "loginGuard and legacyLogin apply only when the root is a Portal, "
                f"not {type(root).__name__}: give them to the root that takes the logins"
            )
        if not IPBRoot.providedBy(root):
            raise TypeError(
                "the root must provide IPBRoot (subclass pb.Root) or be a Portal, "
                f"not {type(root).__name__}"
            )
        self.root = root

    def buildProtocol(self, addr: IAddress | None) -> Broker:
        broker = _buildBroker(self, False)
        broker.setNameForLocal(b"root", self.root.rootObject(broker))
        return broker

    def clientConnectionMade(self, broker: Broker) -> None:
        """
        Called with each broker once its connection is ready.
        """


class PBClientFactory(_BrokerOptions, protocol.ClientFactory):
    """
    Connects to a PB server and hands out its root object.

    :param unsafeTracebacks: send the full traceback of a failure to the server.
    :param security: security options for what the broker sends and receives.
    :param registry: the copy registry the broker rebuilds pass-by-copy values with.
    :param limits: what the server may make the client hold
        (:class:`~pbroker.broker.BrokerLimits`).
    :param legacyLogin: whether :meth:`login` may fall back on the legacy MD5 exchange when
        the server does not offer pbroker's password login (stock Twisted servers do not).
    :param dialects: the dialects accepted (the first of them in the server's order is
        chosen); ``[b"pb"]`` makes the client speak plain PB even to a pbroker server (see
        :ref:`native`).
    :param keepalive: ping a silent server and drop a dead one
        (a :class:`~pbroker.broker.Keepalive`).
    :param clock: what schedules keepalive pings and call timeouts (the reactor by default).
    """

    protocol = Broker

    def __init__(
        self,
        unsafeTracebacks: bool = False,
        security: ISecurityOptions = globalSecurity,
        registry: UnjellyableRegistry | None = None,
        limits: BrokerLimits | None = None,
        legacyLogin: bool = True,
        *,
        dialects: Sequence[bytes] | None = None,
        keepalive: Keepalive | None = None,
        clock: Any = None,
    ) -> None:
        self._setOptions(unsafeTracebacks, security, registry, limits, dialects, keepalive, clock)
        if not isinstance(legacyLogin, bool):
            raise TypeError(f"legacyLogin must be True or False, not {legacyLogin!r}")
        self.legacyLogin = legacyLogin
        self._reset()

    def _reset(self) -> None:
        self.rootObjectRequests: list[Deferred[RemoteReference]] = []
        self._broker: Broker | None = None
        self._root: RemoteReference | None = None
        # The connection being made (its connector, from connectTCP), then its broker,
        # until it is ready or lost (see disconnect).
        self._connector: IConnector | None = None
        self._attempt: Deferred[Any] | None = None  # pb.connect's, through an endpoint
        self._connecting: Broker | None = None

    def buildProtocol(self, addr: IAddress | None) -> Broker:
        return _buildBroker(self, True)

    def startedConnecting(self, connector: IConnector) -> None:
        self._connector = connector

    def brokerConnecting(self, broker: Broker) -> None:
        """
        Called by a broker of this factory once it is connected, before its dialect is
        chosen: :meth:`disconnect` closes it even then.
        """
        self._connector = self._attempt = None
        self._connecting = broker

    def _failAll(self, reason: Failure) -> None:
        requests, self.rootObjectRequests = self.rootObjectRequests, []
        for deferred in requests:
            deferred.errback(reason)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self._connector = None
        self._failAll(reason)

    def clientConnectionLost(
        self, connector: IConnector, reason: Failure, reconnecting: bool = False
    ) -> None:
        if not reconnecting:
            self._broker = None
            self._root = None
        self._failAll(reason)

    def brokerDisconnected(self, broker: Broker, reason: Any) -> None:
        """
        Called by a broker of this factory when its connection is lost (also when it was made
        through an endpoint, which calls no connector callbacks): pending root requests fail.
        """
        if broker is self._broker:
            self._broker = None
            self._root = None
        if broker is self._connecting:
            self._connecting = None
        if self.rootObjectRequests:
            failure = reason if isinstance(reason, Failure) else Failure(PBConnectionLost(reason))
            self._failAll(failure)

    def clientConnectionMade(self, broker: Broker) -> None:
        """
        The connection is ready: hand its root object to whoever asked for it.
        """
        self._broker = broker
        if broker is self._connecting:
            self._connecting = None
        self._root = broker.remoteForName(b"root")
        requests, self.rootObjectRequests = self.rootObjectRequests, []
        for deferred in requests:
            deferred.callback(self._root)

    def getRootObject(self) -> Deferred[RemoteReference]:
        """
        A Deferred that fires with the server's root object once connected.
        """
        if self._broker is not None and not self._broker.disconnected:
            assert self._root is not None
            return succeed(self._root)
        deferred: Deferred[RemoteReference] = Deferred()
        self.rootObjectRequests.append(deferred)
        return deferred

    def login(self, credentials: Any, client: Any = None) -> Deferred[RemoteReference]:
        """
        Log in to the server's portal and return a Deferred of the avatar's reference.

        :param credentials: ``UsernamePassword`` (challenge-response), ``Anonymous()``, or
            :class:`~pbroker.tls.CertificateLogin` (the client certificate of a TLS
            connection; pbroker servers only).
        :param client: the "mind": an object the server may call back (usually a
            Referenceable), or ``None``.
        :returns: fails with ``twisted.cred.error.UnauthorizedLogin`` (as a copied failure)
            on bad credentials, or when the server cannot prove it knows the password; with
            :class:`~pbroker.errors.ProtocolError` when the server's password challenge is
            malformed or out of the bounds of :func:`pbroker.passwords.parseChallenge` (such
            as an iteration count above :data:`pbroker.passwords.MAX_ITERATIONS`), before any
            key is derived, and when any login's answer is not what a login gives (an avatar
            that is a plain value, a legacy challenge that is not ``(nonce, challenger)``).
        :raises TypeError: ``credentials`` is none of those, or its username or password is
            neither bytes nor str (at once, before connecting).
        :raises ValueError: its username or password is text UTF-8 cannot encode.
        """
        credentials = _checkedCredentials(credentials, read=True)
        return self.getRootObject().addCallback(self._loginOn, credentials, client)

    def _cbSendUsername(
        self, root: RemoteReference, username: bytes, password: bytes, client: Any
    ) -> Deferred[RemoteReference]:
        """
        Log in with a username and password on ``root``, the server's root object, as
        :meth:`login` does: a Deferred of the avatar's reference.

        Private in Twisted too, but what reconnecting PB clients (buildbot-worker's
        ``AutoLoginPBFactory`` and its many copies) call from ``clientConnectionMade`` with
        ``self._root`` to log in again on each new connection; kept so that they move over
        unchanged. New code uses :meth:`login`, or :class:`pbroker.reconnect.ReconnectingClient`.
        """
        from twisted.cred.credentials import UsernamePassword

        return self._loginOn(root, UsernamePassword(username, password), client)

    def _loginOn(
        self, root: RemoteReference, credentials: Any, client: Any
    ) -> Deferred[RemoteReference]:
        """
        :meth:`login` on ``root``, the server's root object.
        """
        import secrets
        from hmac import compare_digest

        from twisted.cred.credentials import IAnonymous
        from twisted.cred.error import UnauthorizedLogin

        from pbroker.cred import respond
        from pbroker.errors import describe

        def avatarOf(answer: Any) -> Any:
            # A reference, as a rule; a Copyable or Cacheable avatar arrives as its copy.
            if answer is None or isinstance(answer, _PLAIN_VALUES):
                raise ProtocolError(f"the server's avatar is a plain value: {describe(answer)}")
            if isinstance(answer, RemoteStream):
                answer.cancel()
                raise ProtocolError("the server's avatar is a stream")
            return answer

        if IAnonymous.providedBy(credentials):
            return _answered(root.callRemote("loginAnonymous", client)).addCallback(avatarOf)
        if _isCertificateLogin(credentials):
            return _answered(root.callRemote("loginCertificate", client)).addCallback(avatarOf)
        # The legacy login sends the username as it is given, as Twisted does: a server's
        # checker may keep text usernames. pbroker's password login sends UTF-8 bytes.
        givenUsername = credentials.username
        username = _bytes(givenUsername)
        password = _bytes(credentials.password)

        # Callbacks, not a coroutine: a coroutine would turn the server's copied failure
        # (UnauthorizedLogin) into a RemoteError on its way out.
        legacyOnly = "the server offers only the legacy MD5 login, which this client refuses"

        def start(root: RemoteReference) -> Deferred[Any]:
            if not root.broker.peerIsPbroker:
                # A stock Twisted server: it has only the legacy login.
                if not self.legacyLogin:
                    return fail(UnauthorizedLogin(legacyOnly))
                return legacy(root)
            clientNonce = secrets.token_bytes(24)
            return _answered(root.callRemote("passwordLogin", username, clientNonce)).addCallbacks(
                prove, fallBack, callbackArgs=(clientNonce,), errbackArgs=(root,)
            )

        def prove(answer: Any, clientNonce: bytes) -> Deferred[Any]:
            from pbroker import passwords

            # Checked before the key is derived: the server's iteration count sets how long
            # that takes.
            serverNonce, salt, iterations, prover = passwords.parseChallenge(answer)
            if not isinstance(prover, RemoteReference):
                raise ProtocolError(
                    f"the server's password prover is not a reference: {describe(prover)}"
                )
            message = passwords.authMessage(username, clientNonce, serverNonce, salt, iterations)
            derived = _offTheReactor(
                prover.broker,
                passwords.clientProofAndSignature,
                password,
                salt,
                iterations,
                message,
            )
            return derived.addCallback(sendProof, prover)

        def sendProof(derived: tuple[bytes, bytes], prover: RemoteReference) -> Deferred[Any]:
            if prover.broker.disconnected:
                raise PBConnectionLost("the connection was lost while the login key was derived")
            proof, expected = derived
            return _answered(prover.callRemote("prove", proof, client)).addCallback(
                checkServer, expected
            )

        def checkServer(answer: Any, expected: bytes) -> Any:
            if not isinstance(answer, (tuple, list)) or len(answer) != 2:
                raise ProtocolError(
                    f"the server's login answer is not (avatar, signature): {describe(answer)}"
                )
            avatar, signature = answer
            if not isinstance(signature, bytes) or not compare_digest(signature, expected):
                raise UnauthorizedLogin("the server could not prove it knows the password")
            return avatarOf(avatar)

        def fallBack(failure: Failure, root: RemoteReference) -> Any:
            # A pbroker server without a password file has only the legacy login.
            if failure.check(NoSuchMethod) is None:
                return failure
            if not self.legacyLogin:
                raise UnauthorizedLogin(legacyOnly)  # as against a stock server
            return legacy(root)

        def legacy(root: RemoteReference) -> Deferred[Any]:
            return _answered(root.callRemote("login", givenUsername)).addCallback(sendResponse)

        def sendResponse(answer: Any) -> Deferred[Any]:
            if not (
                isinstance(answer, (tuple, list))
                and len(answer) == 2
                and isinstance(answer[0], bytes)
                and isinstance(answer[1], RemoteReference)
            ):
                raise ProtocolError(
                    f"the server's login challenge is not (nonce, challenger): {describe(answer)}"
                )
            nonce, challenger = answer
            responded = challenger.callRemote("respond", respond(nonce, password), client)
            return _answered(responded).addCallback(avatarOf)

        return maybeDeferred(start, root)

    def disconnect(self) -> None:
        """
        Close the connection, if there is one, also one still choosing its dialect (whose
        root requests fail at once).
        """
        if self._broker is not None and self._broker.transport is not None:
            self._broker.transport.loseConnection()
        elif self._broker is None:
            connecting, self._connecting = self._connecting, None
            connector, self._connector = self._connector, None
            attempt, self._attempt = self._attempt, None
            self._failAll(Failure(PBConnectionLost("disconnected before connecting")))
            if connecting is not None and connecting.transport is not None:
                connecting.transport.loseConnection()
            elif connector is not None:
                from twisted.internet.error import NotConnectingError

                with contextlib.suppress(NotConnectingError):
                    connector.stopConnecting()  # connectTCP's, still connecting
            elif attempt is not None:
                attempt.cancel()  # an endpoint's, still connecting


def _buildBroker(factory: Any, isClient: bool) -> Broker:
    """
    A broker of ``factory``'s protocol class with the factory's options.
    """
    options = {
        "registry": factory.registry,
        "limits": factory.limits,
        "dialects": factory.dialects,
        "keepalive": factory.keepalive,
        "clock": factory.clock,
    }
    brokerClass = factory.protocol
    accepted = _keywordsOf(brokerClass)
    if accepted is None:
        broker: Broker = brokerClass(isClient=isClient, security=factory.security, **options)
    else:
        # A subclass written for stock PB, whose constructor takes isClient and security
        # only: the rest is set as soon as it is built.
        taken = {name: value for name, value in options.items() if name in accepted}
        broker = brokerClass(isClient=isClient, security=factory.security, **taken)
        # What the factory sets (not its defaults, which would undo the subclass's own).
        chosen = {
            name: value
            for name, value in options.items()
            if name not in accepted and value is not None and value != _DEFAULT_LIMITS
        }
        broker.configure(**chosen)
    broker.factory = factory
    return broker


def _listed(dialects: Any) -> Any:
    """
    ``dialects`` as a list if it is an iterable of names (an iterator would be used up by
    the first connection); as it is otherwise, for the broker to refuse.
    """
    if dialects is None or isinstance(dialects, (bytes, str)) or not hasattr(dialects, "__iter__"):
        return dialects
    return list(dialects)


_DEFAULT_LIMITS = BrokerLimits()

# Broker class -> the keywords its constructor takes (None: all of a Broker's).
_keywords: weakref.WeakKeyDictionary[type, frozenset[str] | None] = weakref.WeakKeyDictionary()


def _keywordsOf(brokerClass: Any) -> frozenset[str] | None:
    """
    The keyword arguments ``brokerClass`` takes, or ``None`` if it takes all a Broker does
    (it is Broker, or passes ``**kw`` on).
    """
    try:
        return _keywords[brokerClass]
    except (KeyError, TypeError):
        pass
    accepted: frozenset[str] | None = None
    if brokerClass.__init__ is not Broker.__init__:
        parameters = inspect.signature(brokerClass).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            accepted = frozenset(p.name for p in parameters)
    with contextlib.suppress(TypeError):
        _keywords[brokerClass] = accepted
    return accepted


def _isPortal(root: Any) -> bool:
    # A program that never imported twisted.cred.portal holds no Portal.
    portal = sys.modules.get("twisted.cred.portal")
    return portal is not None and isinstance(root, portal.Portal)


_MISSING: Final = object()


def _checkedCredentials(credentials: Any, read: bool) -> Any:
    """
    ``credentials`` as :meth:`PBClientFactory.login` takes them, or TypeError at once.

    :param read: read a username and password now, as Twisted does (a password property
        may ask the user), and return them as a ``UsernamePassword``; else only check that
        the object is one of the kinds a login takes (a reconnecting client reads them at
        each login).
    """
    from twisted.cred.credentials import IAnonymous, IUsernamePassword, UsernamePassword

    if IAnonymous.providedBy(credentials) or _isCertificateLogin(credentials):
        return credentials
    if not read:
        # Without reading a property, which may ask the user (at each login, later): what
        # it lacks, and what it holds as plain attributes, are checked.
        declared = IUsernamePassword.providedBy(credentials)
        dynamic = getattr(type(credentials), "__getattr__", None) is not None  # a proxy, say
        if isinstance(credentials, type) or not (
            declared
            or dynamic
            or all(
                inspect.getattr_static(credentials, name, _MISSING) is not _MISSING
                for name in ("username", "password")
            )
        ):
            raise _notCredentials(credentials)
        held = getattr(credentials, "__dict__", {})
        _checkTextOrBytes([(name, held[name]) for name in ("username", "password") if name in held])
        return credentials
    try:
        username, password = credentials.username, credentials.password
    except AttributeError as error:
        raise _notCredentials(credentials) from error
    _checkTextOrBytes([("username", username), ("password", password)])
    return UsernamePassword(username, password)


def _notCredentials(credentials: Any) -> TypeError:
    return TypeError(
        "credentials must be UsernamePassword(...), Anonymous() or "
        f"pb.CertificateLogin(), not a {type(credentials).__name__}"
    )


def _checkTextOrBytes(fields: list[tuple[str, Any]]) -> None:
    for name, value in fields:
        if not isinstance(value, (bytes, str)):
            raise TypeError(
                f"the credentials' {name} must be bytes or str, not {type(value).__name__}"
            )
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"the credentials' {name} is not text that UTF-8 can encode "
                    "(it holds a lone surrogate)"
                ) from None


def _isCertificateLogin(credentials: Any) -> bool:
    # Only a program that imported pbroker.tls can hold a CertificateLogin; others (most)
    # need not import it to find out.
    tls = sys.modules.get("pbroker.tls")
    return tls is not None and isinstance(credentials, tls.CertificateLogin)


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _offTheReactor(broker: Any, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """
    ``function(*args)`` in the reactor's thread pool while the reactor runs, so that it serves
    its other connections meanwhile (deriving a login key takes a good part of a second, and
    as much as a few seconds if the server asks for it); at once when it does not run, or
    when ``broker`` is connected in memory (as in tests, where only the reactor's turns would
    deliver a thread's result, and a pump does not turn it).
    """
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    if getattr(reactor, "running", False) and not _inMemory(broker):
        pool = reactor.getThreadPool()  # type: ignore[attr-defined]
        if not pool.joined:  # (a pool stopped for shutdown would never run it)
            return deferToThreadPool(reactor, pool, function, *args)  # type: ignore[arg-type]
    return maybeDeferred(function, *args)


# The modules the in-memory transports of tests come from: Twisted's (iosim,
# StringTransport) and pbroker's own (pbroker.testing).
_IN_MEMORY_MODULES = ("twisted.internet.testing", "pbroker.testing")
_IN_MEMORY_PACKAGE = "twisted.test."


def _inMemory(broker: Any) -> bool:
    """
    Whether ``broker``'s transport is (or is wrapped around, as pacing and TLS are) a test's
    in-memory transport, or one made from it.
    """
    transport = getattr(broker, "transport", None)
    for _ in range(4):  # pacing, TLS, the transport itself: a few layers at most
        if transport is None:
            return False
        if any(
            cls.__module__ in _IN_MEMORY_MODULES or cls.__module__.startswith(_IN_MEMORY_PACKAGE)
            for cls in type(transport).__mro__
        ):
            return True
        transport = getattr(transport, "_transport", None) or getattr(transport, "transport", None)
    return False


# What no login gives as an avatar.
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)


def _answered(deferred: Deferred[Any] | None) -> Deferred[Any]:
    # A call made without pbanswer=False always has a Deferred.
    assert deferred is not None
    return deferred


def listen(
    description: str | IStreamServerEndpoint, factory: PBServerFactory, reactor: Any = None
) -> Deferred[IListeningPort]:
    """
    Serve ``factory`` on an endpoint: a Twisted endpoint string (``"tcp:8789:..."``,
    ``"ssl:..."``, ``"unix:..."``) or an endpoint object (such as
    :func:`pbroker.tls.serverEndpoint` for mutual TLS).
    """
    if isinstance(factory, PBClientFactory) or not callable(
        getattr(factory, "buildProtocol", None)
    ):
        from pbroker.errors import describe

        raise TypeError(
            f"listen() serves a server factory (PBServerFactory), not {describe(factory)}"
        )
    endpoint: IStreamServerEndpoint
    if isinstance(description, str):
        from twisted.internet.endpoints import serverFromString  # loads OpenSSL: only if used

        endpoint = serverFromString(_reactor(reactor), description)
    else:
        endpoint = _endpoint(description, "listen", "'tcp:8789:interface=127.0.0.1'")
    listening: Deferred[IListeningPort] = endpoint.listen(factory)
    return listening


def connect(
    description: str | IStreamClientEndpoint, factory: PBClientFactory, reactor: Any = None
) -> Deferred[RemoteReference]:
    """
    Connect ``factory`` through an endpoint string (``"tcp:host:port"``,
    ``"tls:host:port:trustRoots=..."``, ``"unix:..."``) or object, and return a Deferred of
    the server's root object. A failed connection fails it (and ``getRootObject`` callers).
    """
    if not isinstance(factory, PBClientFactory):
        from pbroker.errors import describe

        raise TypeError(f"connect() needs a PBClientFactory, not {describe(factory)}")
    endpoint: IStreamClientEndpoint
    if isinstance(description, str):
        from twisted.internet.endpoints import clientFromString  # loads OpenSSL: only if used

        endpoint = clientFromString(_reactor(reactor), description)
    else:
        endpoint = _endpoint(description, "connect", "'tcp:127.0.0.1:8789'")
    root = factory.getRootObject()

    def failed(reason: Failure) -> None:
        factory.clientConnectionFailed(None, reason)  # type: ignore[arg-type]

    def settled(result: Any) -> Any:
        if factory._attempt is attempt:
            factory._attempt = None
        return result

    # Kept until it settles, for disconnect() to cancel.
    attempt = factory._attempt = endpoint.connect(factory)
    attempt.addBoth(settled).addErrback(failed)
    return root


def _endpoint(description: Any, method: str, example: str) -> Any:
    """
    ``description``, if it is an endpoint (it has ``method``); else TypeError.
    """
    if not callable(getattr(description, method, None)):
        from pbroker.errors import describe

        raise TypeError(
            f"the endpoint must be an endpoint string such as {example} or an endpoint "
            f"object, not {describe(description)}"
        )
    return description


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        return globalReactor
    return reactor
