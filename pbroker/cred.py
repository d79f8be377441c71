"""
Logging in to a :class:`twisted.cred.portal.Portal` through a broker, as Twisted PB does.

A server factory given a portal offers a login root (:class:`PortalRoot`) instead of an
application root. A client logs in with the PB challenge-response exchange (wire
specification, section 3.8)::

    root.login(username)                 -> (challenge, challenger)
    challenger.respond(response, mind)   -> the avatar
    root.loginAnonymous(mind)            -> the avatar

``response`` is ``MD5(MD5(password) + challenge)``. The avatar arrives as a reference whose
calls run ``perspective_*`` methods. The realm's logout callback runs exactly once: when the
client drops its last reference to the avatar, or when the connection is lost.

This legacy exchange is kept for stock Twisted peers; it makes the server keep plaintext (or
MD5) passwords, so deploy it over TLS. A :class:`LoginGuard` slows down guessing: failures are
answered late, and a connection that keeps failing is closed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import Anonymous, IUsernameHashedPassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer, providedBy

from pbroker.errors import (
    LimitExceeded,
    NoSuchMethod,
    checkReactorTime,
    describe,
    isSeconds,
)
from pbroker.flavors import (
    IPBRoot,
    Jellyable,
    Referenceable,
    Viewable,
    ViewPoint,
    _positional,
    findRemoteMethod,
    textKeywords,
)

__all__ = [
    "MAX_USERNAME",
    "NO_PASSWORD_ACCOUNTS",
    "AsReferenceable",
    "Avatar",
    "IPerspective",
    "IUsernameMD5Password",
    "LoginGuard",
    "NoCheckerFor",
    "PortalRoot",
    "challenge",
    "respond",
]

#: The longest username, in bytes (UTF-8), a login may give: a login started with a longer
#: one is refused before anything is kept for it.
MAX_USERNAME = 1024


def respond(challenge: bytes, password: bytes) -> bytes:
    """
    The answer to a login challenge: ``MD5(MD5(password) + challenge)``.
    """
    hashed = hashlib.md5(password).digest()
    return hashlib.md5(hashed + challenge).digest()


def _checkLength(username: bytes | str) -> None:
    size = len(username) if isinstance(username, bytes) else len(username.encode("utf-8"))
    if size > MAX_USERNAME:
        raise UnauthorizedLogin(f"a username is at most {MAX_USERNAME} bytes, not {size}")


def challenge() -> bytes:
    """
    A fresh login challenge: 16 random bytes.
    """
    return secrets.token_bytes(16)


class IUsernameMD5Password(IUsernameHashedPassword):
    """
    Credentials a checker can verify against a plaintext password or its MD5 digest.
    """

    username = Attribute("The username, as bytes.")

    def checkPassword(password: bytes) -> bool:
        """
        Whether ``password`` (plaintext) is the one the client proved it knows.
        """

    def checkMD5Password(password: bytes) -> bool:
        """
        Whether ``password`` (an MD5 digest) is the one the client proved it knows.
        """


class IPerspective(Interface):
    """
    An avatar a PB client logs in to: remote calls on it run ``perspective_*`` methods.
    """

    def perspectiveMessageReceived(broker: Any, message: str, args: Any, kwargs: Any) -> Any:
        """
        Run the ``perspective_`` method a peer called and return its serialised result.
        """


@implementer(IPerspective)
class Avatar:
    """
    A simple avatar: remote calls run ``perspective_*`` methods with their normal arguments,
    and values returned are serialised on behalf of this perspective (so a
    :class:`~pbroker.flavors.Viewable` becomes a view for it).
    """

    def perspectiveMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        """
        Run the ``perspective_`` method the peer called, on behalf of this avatar, and return its
        serialised result.
        """
        args, kw = broker.unserializeCall(args, kw, self)
        args, kw = _positional(args), textKeywords(kw)
        method = findRemoteMethod(self, "perspective_", message)
        return broker.serialize(method(*args, **kw), self, method, args, kw)


class AsReferenceable(Referenceable):
    """
    A Referenceable whose calls go to ``object.<messageType>MessageReceived``: how an avatar
    that is not itself Referenceable is sent.
    """

    def __init__(self, object: Any, messageType: str = "remote") -> None:
        self.object = object
        self._receive: Callable[..., Any] = getattr(object, messageType + "MessageReceived")

    def remoteMessageReceived(self, broker: Any, message: str, args: Any, kw: Any) -> Any:
        return self._receive(broker, message, args, kw)


#: Why a password login is refused by a server whose portal takes none that PB sends.
NO_PASSWORD_ACCOUNTS = "no checker of this server's portal takes a password login over PB"


class NoCheckerFor(UnhandledCredentials, UnauthorizedLogin):
    """
    A login no checker of the portal takes. An ``UnhandledCredentials``, as a stock PB
    server's portal answers it (a client may trap that, to fall back to another login),
    and an ``UnauthorizedLogin``, as every other refusal is; its message says why in words,
    where the portal's names the server's interfaces.
    """


#: The most doublings of LoginGuard's delay counted: far past any maxDelay a guard is given.
_MOST_DOUBLINGS = 1000


class LoginGuard:
    """
    Slows down password guessing: the password attempts from one peer address are checked one
    at a time, a failure is answered late (later the more the address has failed recently)
    and holds back the address's next password attempt until then, and a connection that
    keeps failing is closed without checking what it still sent. Anonymous and certificate
    logins, which have no secret to guess, are not held back. Every attempt is logged with its
    username, peer and outcome, never its secret.

    An IPv6 peer's address counts as its /64 network, which one site may pick any address
    in; the failures of all the /64s of a /48 (one site's, often) also count, one for every
    16, for each of them, so that a site guessing from many /64s is slowed down too (its
    /64s still take turns each on their own: a /48 may be a provider's, shared by unrelated
    customers). The price of the per-address order: users who share an address with a
    guesser (behind one NAT or proxy, on UNIX sockets, which have no address, or in one
    IPv6 /64) wait for its delays too.

    A success is answered at once but does not clear the address's failures (an anonymous
    login would otherwise reset the delays between guesses): they are forgotten
    ``forgetAfter`` seconds after the last one. One guard serves all the connections of a
    server factory, and remembers at most ``maxAddresses`` failing addresses.

    :param reactor: the clock the delays run on (the global reactor by default).
    :param baseDelay: seconds before the first failure from an address is answered; each
        further recent failure doubles it, up to ``maxDelay``.
    :param maxFailuresPerConnection: failures after which the connection is closed.
    :param forgetAfter: seconds after which an address's failures are forgotten (their
        record is let go at the next failure from any address).
    :param maxAddresses: failing addresses remembered at once; beyond, the oldest go first.
    :param checkTimeout: seconds a check (the portal's checker) may hold the address's turn:
        past them the address's next attempts are checked meanwhile, while this one waits on
        for its checker, as on stock Twisted. (The realm, which runs once the turn has
        passed on, is not timed; but for a portal guarded whole, with a ``login`` of its
        own, the check is that whole login.)
    :param maxWaiting: attempts with a secret that may wait at once for one address; more
        are refused at once.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        baseDelay: float = 0.5,
        maxDelay: float = 8.0,
        maxFailuresPerConnection: int = 5,
        forgetAfter: float = 600.0,
        maxAddresses: int = 100_000,
        checkTimeout: float = 60.0,
        maxWaiting: int = 100,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        else:
            checkReactorTime("reactor", reactor)
        for name, value in (
            ("baseDelay", baseDelay),
            ("maxDelay", maxDelay),
            ("forgetAfter", forgetAfter),
            ("checkTimeout", checkTimeout),
            # Counts compared with, so inf is "no limit".
            ("maxFailuresPerConnection", maxFailuresPerConnection),
            ("maxAddresses", maxAddresses),
            ("maxWaiting", maxWaiting),
        ):
            if not isSeconds(value) or value != value:
                raise TypeError(f"LoginGuard's {name} must be a number, not {value!r}")
        if baseDelay < 0 or maxDelay < baseDelay or maxFailuresPerConnection < 1:
            raise ValueError("LoginGuard needs 0 <= baseDelay <= maxDelay and at least 1 failure")
        if forgetAfter < 0 or maxAddresses < 1 or not checkTimeout > 0 or maxWaiting < 1:
            raise ValueError(
                "LoginGuard needs forgetAfter >= 0, maxAddresses >= 1, checkTimeout > 0 "
                "and maxWaiting >= 1"
            )
        self.reactor = reactor
        self.baseDelay = baseDelay
        self.maxDelay = maxDelay
        self.maxFailuresPerConnection = maxFailuresPerConnection
        self.forgetAfter = forgetAfter
        self.maxAddresses = maxAddresses
        self.checkTimeout = checkTimeout
        self.maxWaiting = maxWaiting
        # address -> (recent failures, time of the last one), oldest failure first (an
        # OrderedDict: taking from its front costs the same however many went before)
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # address -> its guessable attempts (present while one is checked or waiting)
        self._queues: dict[str, _AddressQueue] = {}

    def _recentFailures(self, address: str) -> int:
        count, last = self._failures.get(address, (0, 0.0))
        if count and self.reactor.seconds() - last > self.forgetAfter:
            del self._failures[address]
            return 0
        return count

    def _forgetExpired(self, now: float) -> None:
        # Records that no longer count go, oldest first (the dict is ordered by last
        # failure), so that the addresses that once failed are not all held until as many
        # others have failed (maxAddresses): each is looked at once, as it goes.
        failures = self._failures
        forgetAfter = self.forgetAfter
        while failures:
            address, (_, last) = next(iter(failures.items()))
            if now - last <= forgetAfter:
                return
            del failures[address]

    def _recordFailure(self, address: str) -> None:
        count = self._recentFailures(address) + 1
        failures = self._failures
        now = self.reactor.seconds()
        failures[address] = (count, now)
        failures.move_to_end(address)  # the dict stays ordered by last failure
        self._forgetExpired(now)
        # Over the limit, the oldest go, one at a time.
        while len(failures) > self.maxAddresses:
            failures.popitem(last=False)

    def delayFor(self, address: str) -> float:
        """
        How long the next failure from ``address`` is held back, in seconds.
        """
        # (The exponent is bounded: past about 1,000 failures the power would not fit in a
        # float, and the failure's answer would never be sent. A product too large for a
        # float is inf, which maxDelay caps.)
        key = _addressKey(address)
        count = self._recentFailures(key)
        site = _siteKey(key)
        if site is not None:
            # Each /64 of a site counts on its own, and the site's, shared, more slowly.
            count = max(count, self._recentFailures(site) // _SITE_SHARE)
        count = min(count, _MOST_DOUBLINGS)
        return float(min(self.maxDelay, self.baseDelay * 2.0**count))

    def attempt(
        self,
        broker: Any,
        username: bytes | str,
        login: Callable[[], Deferred[Any]],
        guessable: bool = True,
        *,
        then: Callable[[Any], Any] | None = None,
    ) -> Deferred[Any]:
        """
        Check one login attempt (``login`` starts the check): log it, answer a failure after
        the delay, and close a connection that has failed too often. A ``guessable`` attempt
        (one with a secret) waits for the guessable attempts from the same address before
        it; others (anonymous, certificate logins) are checked at once.

        ``then``, if given, is called with what the check gave (the portal's realm, with the
        avatar id its checker found) once the check has passed, outside the address's turn
        and its ``checkTimeout``: the application's work there (a whole attach, in buildbot) may
        take as long as it does, while the address's next attempt is checked. Its failure
        counts as the attempt's.

        Cancelling the returned Deferred abandons the attempt: it is not checked if it is
        still waiting; a check already running is not cancelled (whether the work it awaits,
        in a thread or a database, would stop cannot be known), but runs to its end, holding
        the address's turn: a failure counts as any other, and a login that completes is
        logged out at once. No check holds the turn longer than ``checkTimeout`` (a failure's
        delay, after it, holds it too).
        """
        shown = _peerHost(broker)  # (in the log)
        # Guesses take turns per address (for IPv6, per /64: a /48 is often shared by a
        # provider's unrelated customers, whom one guesser must not keep from logging in;
        # its failures count for the whole /48, see delayFor).
        address = _addressKey(shown)
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        name = describe(username)  # for the log, cut short
        started: list[Deferred[Any]] = []
        abandoned: list[bool] = []
        queue = self._queues.get(address) if guessable else None
        holdsTurn: list[bool] = []  # (while this attempt is the address's one being checked)

        def passTurn() -> None:
            if holdsTurn:
                holdsTurn.clear()
                assert queue is not None
                queue.busy = False
                self._advance(address, queue)

        def cancel(_: Deferred[Any]) -> None:
            abandoned.append(True)
            if started:
                # A check already running is left to end, holding the address's turn: the
                # work it awaits (a thread, a database) may not stop with it, even where its
                # Deferred can be cancelled (an async checker's stops only its own await),
                # and the address's next check would start while it runs. Its failure then
                # counts as any other (see failed).
                return
            if queue is not None and check in queue.waiting:
                queue.waiting.remove(check)
                self._log.info(
                    "Login abandoned by {peer} for {user} before it was checked",
                    user=name,
                    peer=shown,
                )

        answer: Deferred[Any] = Deferred(cancel)

        def done(result: Any, close: bool = False) -> None:
            try:
                if abandoned:  # cancelled (it fails with CancelledError): no one takes it
                    try:
                        _logOutUnwanted(result)
                    except Exception:
                        self._log.failure("The logout of an abandoned login failed")
                elif isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
                if close and broker.transport is not None:
                    self._log.warn(
                        "Closing the connection from {peer} after {count} failed logins",
                        peer=shown,
                        count=broker.loginFailures,
                    )
                    # Let the error reach the peer first.
                    self.reactor.callLater(0, broker.transport.loseConnection)
            finally:
                # Whatever happened above (a logout that raised), the next attempt may go.
                passTurn()

        def succeeded(result: Any) -> None:
            self._log.info("Login succeeded for {user} from {peer}", user=name, peer=shown)
            done(result)

        def failed(failure: Failure) -> None:
            # (Also for a check its caller gave up on, which ran to its end: the portal may
            # have given the realm the caller's mind, which could tell it of a right guess,
            # so a wrong one counts and is delayed as any other, else giving up on each
            # guess would make guessing free.)
            try:
                kind = getattr(failure.type, "__name__", describe(failure.type))
                message = failure.getErrorMessage()
                self._log.warn(
                    "Login failed for {user} from {peer}: {reason}{abandoned}",
                    user=name,
                    peer=shown,
                    reason=f"{kind}: {message}" if message else kind,
                    abandoned=" (abandoned by the peer as it was checked)" if abandoned else "",
                )
                delay = self.delayFor(address)
                self._recordFailure(address)
                site = _siteKey(address)
                if site is not None:
                    self._recordFailure(site)
                broker.loginFailures = getattr(broker, "loginFailures", 0) + 1
                close = broker.loginFailures == self.maxFailuresPerConnection
            except Exception:
                # Answered all the same, and the address's turn passed on: a failure left
                # unanswered here would hold up every later password login from the address.
                # Failing closed: the longest delay, and the connection counts it.
                self._log.failure("Could not count a failed login from {peer}", peer=shown)
                broker.loginFailures = getattr(broker, "loginFailures", 0) + 1
                close = broker.loginFailures >= self.maxFailuresPerConnection
                try:
                    self.reactor.callLater(self.maxDelay, done, failure, close)
                except Exception:
                    self._log.failure("Could not delay a failed login from {peer}", peer=shown)
                    done(failure, close)
                return
            if delay <= 0:
                done(failure, close)
            else:
                self.reactor.callLater(delay, done, failure, close)

        def checked(identity: Any) -> None:
            # The secret is checked: the realm's work is the application's, and does not
            # hold up the address's next attempt.
            passTurn()
            assert then is not None
            maybeDeferred(then, identity).addCallbacks(succeeded, failed)

        def check() -> None:
            if queue is not None:
                holdsTurn.append(True)
            if getattr(broker, "loginFailures", 0) >= self.maxFailuresPerConnection or getattr(
                broker, "disconnected", False
            ):
                # Sent before the connection was condemned (or lost): not checked at all.
                done(Failure(UnauthorizedLogin("too many failed logins on this connection")))
                return
            deferred = maybeDeferred(login)
            started.append(deferred)
            if holdsTurn:
                # A checker that never answers must not hold up the address's logins for
                # ever; its own login waits on for it, as on stock Twisted (a server busy
                # starting up may take long to check, and the password be right). (Started
                # whatever deferred.called says: a fired Deferred may still wait, paused, on
                # one a callback returned. One that has ended stops it at once.)
                overdue = self.reactor.callLater(self.checkTimeout, passOn)
                deferred.addBoth(_stopping, overdue)
            deferred.addCallbacks(succeeded if then is None else checked, failed)

        def passOn() -> None:
            self._log.warn(
                "The check of a login for {user} from {peer} has taken more than {timeout:g} "
                "seconds: the address's next logins are checked meanwhile",
                user=name,
                peer=shown,
                timeout=self.checkTimeout,
            )
            passTurn()

        if not guessable:
            check()
            return answer
        if queue is None:
            queue = self._queues[address] = _AddressQueue()
        elif len(queue.waiting) >= self.maxWaiting:
            self._log.warn("Refusing a login from {peer}: too many are waiting", peer=shown)
            return fail(UnauthorizedLogin("too many logins are waiting from this address"))
        queue.waiting.append(check)
        self._advance(address, queue)
        return answer

    def _advance(self, address: str, queue: _AddressQueue) -> None:
        """
        Start the address's next waiting attempt if none is being checked. Checks that finish
        at once (most checkers answer synchronously) come back here while the loop runs: the
        loop, not recursion, starts the next one, however many wait.
        """
        if queue.looping:
            return
        queue.looping = True
        try:
            while not queue.busy and queue.waiting:
                queue.busy = True
                queue.waiting.popleft()()
        finally:
            queue.looping = False
        if not queue.busy and not queue.waiting and self._queues.get(address) is queue:
            del self._queues[address]


class _AddressQueue:
    """
    The guessable login attempts from one address: the one being checked (``busy``) and
    those waiting for it.
    """

    def __init__(self) -> None:
        self.waiting: deque[Callable[[], None]] = deque()
        self.busy = False
        self.looping = False


def _logOutUnwanted(result: Any) -> None:
    """
    Log out the avatar of a login whose caller gave up before it completed.
    """
    if isinstance(result, tuple) and len(result) == 3 and callable(result[2]):
        result[2]()


def _stopping(result: Any, timer: Any) -> Any:
    """
    ``result``, passed on, once ``timer`` is stopped if it has not run.
    """
    if timer.active():
        timer.cancel()
    return result


def _peerHost(broker: Any) -> str:
    """
    The peer's address as logged: its host for IP connections; for other transports (UNIX
    sockets, in-memory) the kind of address, as they cannot be told apart.
    """
    transport = getattr(broker, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    if host is not None:
        return str(host)
    return type(peer).__name__


#: The failures of an IPv6 site (a /48) that count as one for each of its /64 networks.
_SITE_SHARE = 16


def _siteKey(key: str) -> str | None:
    """
    For the key of an IPv6 /64 network, that of its /48, which one site is often given
    (its /64s are then its own to pick from); else ``None``.
    """
    if "/" not in key:
        return None
    try:
        network = ipaddress.IPv6Network(key)
    except ValueError:
        return None
    return str(network.supernet(new_prefix=48))


def _addressKey(host: str) -> str:
    """
    What the failures of ``host`` are counted against: an IPv6 address's /64 network (one
    site's, which picks any address in it at will), an IPv4 address mapped into IPv6 as
    that address; any other as it is.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # (without a zone)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return host


def _guardedLogin(
    guard: LoginGuard,
    broker: Any,
    username: bytes | str,
    portal: Portal,
    credentials: Any,
    mind: Any,
    guessable: bool = True,
) -> Deferred[Any]:
    """
    ``portal.login(credentials, mind, IPerspective)`` through ``guard``: its checker is
    the guarded check, its realm what follows (see :meth:`LoginGuard.attempt`). A portal
    with a ``login`` of its own (its class's, or one set on it) is guarded whole, as what it
    does is unknown.
    """
    if getattr(portal.login, "__func__", None) is not Portal.login:  # (on its class or itself)
        return guard.attempt(
            broker, username, lambda: portal.login(credentials, mind, IPerspective), guessable
        )

    def check() -> Deferred[Any]:
        # The checker Portal.login would ask: the first registered for an interface the
        # credentials provide.
        for interface, checker in portal.checkers.items():
            if interface.providedBy(credentials):
                return maybeDeferred(checker.requestAvatarId, credentials)
        provided = ", ".join(f"{i.__module__}.{i.__name__}" for i in providedBy(credentials))
        return fail(UnhandledCredentials(f"No checker for {provided}"))

    def realm(avatarId: Any) -> Any:
        return portal.realm.requestAvatar(avatarId, mind, IPerspective)

    return guard.attempt(broker, username, check, guessable, then=realm)


def _avatarForPeer(broker: Any, result: tuple[Any, Any, Callable[[], object]]) -> Any:
    """
    Make a portal's login result sendable, and arrange for its logout to run exactly once:
    on the peer's last decref of the avatar or on disconnection, whichever comes first.

    :raises LimitExceeded: the connection already holds ``limits.exportedReferences``
        logins not logged out; this one is logged out at once.
    """
    _interface, avatar, logout = result
    if isinstance(avatar, Viewable):
        # Sent as the ViewPoint it would become (for no perspective, as stock PB sends it):
        # its logouts are kept under the id of what the peer holds and releases.
        avatar = ViewPoint(None, avatar)
    elif not isinstance(avatar, Jellyable):
        avatar = AsReferenceable(avatar, "perspective")
    limit = broker.limits.exportedReferences
    if getattr(broker, "loginsHeld", 0) >= limit:
        try:
            logout()
        except Exception:
            # Logged, as any logout that fails: the peer is told it is over the limit, not
            # what the realm's error says of the server.
            _Logouts._log.failure("The logout of a login over the limit failed")
        raise LimitExceeded(f"more than {limit} logins at once on this connection")
    puid = avatar.processUniqueID()
    logouts = broker.localCleanup.get(puid)
    broker.loginsHeld = getattr(broker, "loginsHeld", 0) + 1
    if isinstance(logouts, _Logouts):
        logouts.pending.append(logout)
    else:
        # The first login on this connection that gave this avatar (a realm may give one
        # object to many logins): its logouts run together, at the peer's last release.
        logouts = broker.localCleanup[puid] = _Logouts(broker, puid)
        logouts.pending.append(logout)
        broker.notifyOnDisconnect(logouts)  # (at once if the connection is gone)
    return avatar


class _Logouts:
    """
    The logouts of the logins on one connection that gave one avatar, each run once: when
    the peer releases the avatar for the last time, or the connection is lost.
    """

    _log = Logger()

    def __init__(self, broker: Any, puid: Any) -> None:
        self.broker = broker
        self.puid = puid
        self.pending: list[Callable[[], object]] = []

    def __call__(self) -> None:
        broker = self.broker
        # Forgotten by the other trigger: a peer that logs in and out again and again on
        # one connection leaves nothing behind.
        broker.dontNotifyOnDisconnect(self)
        if broker.localCleanup.get(self.puid) is self:
            del broker.localCleanup[self.puid]
        pending, self.pending = self.pending, []
        broker.loginsHeld -= len(pending)
        for logout in pending:
            try:
                logout()
            except Exception:
                self._log.failure("A realm's logout failed")


@implementer(IPBRoot)
class PortalRoot:
    """
    The root a server factory offers for a portal: each broker gets a wrapper of the portal
    of its own.

    :param guard: the :class:`LoginGuard` that watches every attempt (a new one by default).
    """

    def __init__(
        self, portal: Portal, guard: LoginGuard | None = None, legacyLogin: bool = True
    ) -> None:
        if guard is not None and not isinstance(guard, LoginGuard):
            raise TypeError(f"loginGuard must be a LoginGuard (or None), not {describe(guard)}")
        if not isinstance(legacyLogin, bool):
            raise TypeError(f"legacyLogin must be True or False, not {describe(legacyLogin)}")
        self.portal = portal
        self.guard = LoginGuard() if guard is None else guard
        self.legacyLogin = legacyLogin

    def rootObject(self, broker: Any) -> Referenceable:
        """
        The login root the peer on ``broker`` sees.
        """
        return _PortalWrapper(self.portal, broker, self.guard, self.legacyLogin)


class _PortalWrapper(Referenceable):
    """
    The login root one peer sees.
    """

    _log = Logger()

    def __init__(
        self, portal: Portal, broker: Any, guard: LoginGuard, legacyLogin: bool = True
    ) -> None:
        self.portal = portal
        self.broker = broker
        self.guard = guard
        self.legacyLogin = legacyLogin
        # Whether a refused legacy login was logged: once per connection, as a peer may
        # ask again and again, at no cost to it.
        self._refusalLogged = False

    def remote_passwordLogin(
        self, username: bytes, clientNonce: bytes
    ) -> tuple[bytes, bytes, int, Referenceable]:
        """
        Start pbroker's password login (see :mod:`pbroker.passwords`): the server's nonce, the
        user's salt and iteration count, and the object to send the proof to.
        """
        # pbroker.passwords is imported on the first password login, not with every server.
        from pbroker.passwords import IScramProof, authMessage

        checker = self.portal.checkers.get(IScramProof)
        if checker is None or not hasattr(checker, "verifierFor"):
            raise NoSuchMethod("this server offers no pbroker password login")
        if not isinstance(username, bytes) or not isinstance(clientNonce, bytes):
            raise UnauthorizedLogin("the username and nonce must be bytes")
        _checkLength(username)
        if not 16 <= len(clientNonce) <= 64:
            raise UnauthorizedLogin("the client nonce must be 16 to 64 bytes")
        try:
            verifier, _known = checker.verifierFor(username)
        except Exception:
            # A password file that became unreadable, say: the operator's business, not
            # the peer's (whose error would otherwise name the server's files).
            self._log.failure("Cannot look up {user} for a password login", user=describe(username))
            raise UnauthorizedLogin("the server cannot check passwords now") from None
        serverNonce = secrets.token_bytes(24)
        message = authMessage(
            username, clientNonce, serverNonce, verifier.salt, verifier.iterations
        )
        challenger = _PasswordProver(
            self.portal, self.broker, self.guard, username, message, verifier.serverKey
        )
        return serverNonce, verifier.salt, verifier.iterations, challenger

    def remote_login(self, username: bytes | str) -> tuple[bytes, Referenceable]:
        """
        Start a username/password login: a challenge, and the object to respond to.
        """
        if not self.legacyLogin:
            self._logLegacyRefusal(username, "it is turned off")
            raise UnauthorizedLogin(
                "this server does not accept the legacy MD5 login (stock Twisted clients, "
                "and accounts outside its password file)"
            )
        # Kept as sent (bytes or text), as Twisted keeps it: the portal's checker decides.
        if not isinstance(username, (bytes, str)):
            raise UnauthorizedLogin("the username must be bytes or text")
        _checkLength(username)
        nonce = challenge()
        challenger = _PortalAuthChallenger(self.portal, self.broker, username, nonce, self.guard)
        checkers = getattr(self.portal, "checkers", None)
        if isinstance(checkers, dict) and not any(i.providedBy(challenger) for i in checkers):
            # The portal could only answer the response with UnhandledCredentials, which
            # names interfaces of the server's: say what is missing, before a challenge.
            from pbroker.passwords import IScramProof

            self._logLegacyRefusal(username, "no checker of the portal takes it")
            if IScramProof in checkers:
                raise NoCheckerFor(
                    "this server has no accounts for the legacy MD5 login (of stock Twisted "
                    "clients, and pbroker clients limited to the pb dialect)"
                )
            raise NoCheckerFor(NO_PASSWORD_ACCOUNTS)
        return nonce, challenger

    def _logLegacyRefusal(self, username: bytes | str, why: str) -> None:
        """
        Log a refused legacy login, the first of the connection only (a peer asking again
        and again, with long names, would flood the log).
        """
        if not self._refusalLogged:
            self._refusalLogged = True
            self._log.info(
                "Refused the legacy MD5 login of {user} from {peer}: {why} "
                "(later attempts on this connection are not logged)",
                user=describe(username),
                peer=_peerHost(self.broker),
                why=why,
            )

    def remote_loginCertificate(self, mind: Any) -> Deferred[Any]:
        """
        Log in with the client certificate the TLS handshake verified (a pbroker extension).
        """
        from pbroker.tls import PeerCertificate

        credentials = PeerCertificate.fromTransport(self.broker.transport)

        if credentials is None:
            deferred = self.guard.attempt(
                self.broker,
                b"<certificate ?>",
                lambda: fail(UnauthorizedLogin("the connection has no client certificate")),
                guessable=False,
            )
        else:
            name = f"<certificate {credentials.commonName or '?'}>".encode()
            deferred = _guardedLogin(
                self.guard, self.broker, name, self.portal, credentials, mind, guessable=False
            )
        return deferred.addCallback(lambda result: _avatarForPeer(self.broker, result))

    def remote_loginAnonymous(self, mind: Any) -> Deferred[Any]:
        """
        Log in without credentials, if the portal has a checker for anonymous logins.
        """
        deferred = _guardedLogin(
            self.guard, self.broker, b"<anonymous>", self.portal, Anonymous(), mind, guessable=False
        )
        return deferred.addCallback(lambda result: _avatarForPeer(self.broker, result))


@implementer(IUsernameHashedPassword, IUsernameMD5Password)
class _PortalAuthChallenger(Referenceable):
    """
    One login attempt: holds the challenge, checks the response once.
    """

    def __init__(
        self,
        portal: Portal,
        broker: Any,
        username: bytes | str,
        nonce: bytes,
        guard: LoginGuard,
    ) -> None:
        self.portal = portal
        self.broker = broker
        self.username = username
        self.challenge = nonce
        self.guard = guard
        self.response: bytes | None = None

    def remote_respond(self, response: bytes, mind: Any) -> Deferred[Any]:
        if self.response is not None:
            raise UnauthorizedLogin("a login challenge can be answered only once")
        if not isinstance(response, bytes):
            raise UnauthorizedLogin("the response must be bytes")
        self.response = response
        deferred = _guardedLogin(self.guard, self.broker, self.username, self.portal, self, mind)
        return deferred.addCallback(lambda result: _avatarForPeer(self.broker, result))

    def checkPassword(self, password: bytes) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        return self.checkMD5Password(hashlib.md5(password).digest())

    def checkMD5Password(self, md5Password: bytes) -> bool:
        expected = hashlib.md5(md5Password + self.challenge).digest()
        return self.response is not None and hmac.compare_digest(self.response, expected)


class _PasswordProver(Referenceable):
    """
    One pbroker password login: checks the client's proof once, then proves the server's
    knowledge of the verifier in return.
    """

    def __init__(
        self,
        portal: Portal,
        broker: Any,
        guard: LoginGuard,
        username: bytes,
        message: bytes,
        serverKey: bytes,
    ) -> None:
        self.portal = portal
        self.broker = broker
        self.guard = guard
        self.username = username
        self.message = message
        self.serverKey = serverKey
        self.used = False

    def remote_prove(self, proof: bytes, mind: Any) -> Deferred[Any]:
        if self.used:
            raise UnauthorizedLogin("a login challenge can be answered only once")
        self.used = True
        if not isinstance(proof, bytes):
            raise UnauthorizedLogin("the proof must be bytes")
        from pbroker.passwords import ScramProof, serverSignature

        credentials = ScramProof(self.username, self.message, proof)
        login = _guardedLogin(
            self.guard, self.broker, self.username, self.portal, credentials, mind
        )

        def proven(result: Any) -> tuple[Any, bytes]:
            avatar = _avatarForPeer(self.broker, result)
            return avatar, serverSignature(self.serverKey, self.message)

        return login.addCallback(proven)
