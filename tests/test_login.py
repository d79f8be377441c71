"""
Tests for logging in through a portal: challenge-response, anonymous login, avatars,
viewables, logout, against pbroker and stock Twisted peers in both roles.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.cred.checkers import (
    ANONYMOUS,
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import Anonymous, IAnonymous, UsernamePassword
from twisted.cred.credentials import IUsernameHashedPassword as IUsernameHashedPasswordInterface
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from pbroker import pb
from pbroker.errors import InvalidJelly, ProtocolError
from pbroker.testing import connectedServerAndClient
from tests.test_broker import connect


def realmFor(module: Any) -> Any:
    """
    A realm whose avatars are built from ``module`` (pbroker.pb or twisted.spread.pb).
    """

    class Board(module.Viewable):
        def view_whoAmI(self, perspective: Any) -> str:
            return str(perspective.name)

    class User(module.Avatar):
        def __init__(self, name: str, board: Any) -> None:
            self.name = name
            self.board = board

        def perspective_name(self) -> str:
            return self.name

        def perspective_board(self) -> Any:
            return self.board

        def perspective_callMind(self) -> Any:
            return self.mind.callRemote("hello", self.name)

    @implementer(IRealm)
    class Realm:
        def __init__(self) -> None:
            self.board = Board()
            self.loggedOut: list[str] = []

        def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
            name = avatarId.decode() if isinstance(avatarId, bytes) else avatarId or "anonymous"
            user = User(name, self.board)
            user.mind = mind  # type: ignore[attr-defined]
            return module.IPerspective, user, lambda: self.loggedOut.append(name)

    return Realm()


class Mind(pb.Referenceable):
    def remote_hello(self, name: str) -> str:
        return f"hello {name}"


class TwistedMind(twistedPb.Referenceable):
    def remote_hello(self, name: str) -> str:
        return f"hello {name}"


class LoginTestsMixin:
    serverModule: Any
    clientModule: Any

    def setUp(self) -> None:
        self.realm = realmFor(self.serverModule)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        checker.addUser("carol", b"secret")  # a text username (the checker keeps it so)
        portal = Portal(self.realm, [checker, AllowAnonymousAccess()])
        self.clientFactory = self.clientModule.PBClientFactory()
        if self.serverModule is pb:
            # Failed logins answered at once here; LoginGuardTests cover the delays.
            guard = pb.LoginGuard(baseDelay=0, maxDelay=0)
            serverFactory = pb.PBServerFactory(portal, loginGuard=guard)
        else:
            serverFactory = self.serverModule.PBServerFactory(portal)
        self.server, self.client, self.pump = connect(serverFactory, self.clientFactory)

    def resolve(self, deferred: Any) -> Any:
        results: list[Any] = []
        deferred.addBoth(results.append)
        self.pump.flush()
        self.assertEqual(len(results), 1)  # type: ignore[attr-defined]
        return results[0]

    def mind(self) -> Any:
        return Mind() if self.clientModule is pb else TwistedMind()

    def test_textUsername(self) -> None:
        """A text username is sent and checked as text, as Twisted does it: the user a
        checker keeps under a text name logs in, in every pairing with a stock peer too."""
        avatar = self.resolve(self.clientFactory.login(UsernamePassword("carol", b"secret")))
        self.assertEqual(self.resolve(avatar.callRemote("name")), "carol")  # type: ignore[attr-defined]

    def test_passwordLogin(self) -> None:
        """The right password logs in to an avatar whose perspective_ methods can be called."""
        avatar = self.resolve(self.clientFactory.login(UsernamePassword(b"alice", b"secret")))
        self.assertEqual(self.resolve(avatar.callRemote("name")), "alice")  # type: ignore[attr-defined]

    def test_loginOnTheRoot(self) -> None:
        """``_cbSendUsername(root, username, password, mind)``, private in Twisted too, logs
        in on the root object as reconnecting PB clients do (buildbot-worker's
        AutoLoginPBFactory, from clientConnectionMade with ``_root``)."""
        root = self.resolve(self.clientFactory.getRootObject())
        self.assertIs(root, self.clientFactory._root)
        login = self.clientFactory._cbSendUsername(root, b"alice", b"secret", self.mind())
        avatar = self.resolve(login)
        self.assertEqual(self.resolve(avatar.callRemote("callMind")), "hello alice")  # type: ignore[attr-defined]
        wrong = self.resolve(self.clientFactory._cbSendUsername(root, b"alice", b"x", None))
        self.assertTrue(wrong.check(UnauthorizedLogin))  # type: ignore[attr-defined]
        self.flushLoggedErrors(UnauthorizedLogin)  # type: ignore[attr-defined]

    def test_wrongPassword(self) -> None:
        """A wrong password fails with UnauthorizedLogin, under Twisted's name."""
        failure = self.resolve(self.clientFactory.login(UsernamePassword(b"alice", b"wrong")))
        self.assertTrue(failure.check(UnauthorizedLogin))  # type: ignore[attr-defined]
        self.assertEqual(failure.type, b"twisted.cred.error.UnauthorizedLogin")  # type: ignore[attr-defined]
        self.flushLoggedErrors(UnauthorizedLogin)  # type: ignore[attr-defined]

    def test_unknownUser(self) -> None:
        """An unknown user fails like a wrong password."""
        failure = self.resolve(self.clientFactory.login(UsernamePassword(b"mallory", b"x")))
        self.assertTrue(failure.check(UnauthorizedLogin))  # type: ignore[attr-defined]
        self.flushLoggedErrors(UnauthorizedLogin)  # type: ignore[attr-defined]

    def test_anonymousLogin(self) -> None:
        """Anonymous login works when the portal allows it."""
        avatar = self.resolve(self.clientFactory.login(Anonymous()))
        self.assertEqual(self.resolve(avatar.callRemote("name")), "anonymous")  # type: ignore[attr-defined]

    def test_viewable(self) -> None:
        """A Viewable returned by an avatar runs view_ methods with that avatar."""
        avatar = self.resolve(self.clientFactory.login(UsernamePassword(b"alice", b"secret")))
        board = self.resolve(avatar.callRemote("board"))
        self.assertEqual(self.resolve(board.callRemote("whoAmI")), "alice")  # type: ignore[attr-defined]

    def test_mindCalledBack(self) -> None:
        """The mind given at login is a reference the server can call."""
        login = self.clientFactory.login(UsernamePassword(b"alice", b"secret"), self.mind())
        avatar = self.resolve(login)
        self.assertEqual(self.resolve(avatar.callRemote("callMind")), "hello alice")  # type: ignore[attr-defined]

    def test_logoutOnDisconnect(self) -> None:
        """The realm's logout runs once when the connection drops."""
        avatar = self.resolve(self.clientFactory.login(UsernamePassword(b"alice", b"secret")))
        self.assertEqual(self.realm.loggedOut, [])  # type: ignore[attr-defined]
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.realm.loggedOut, ["alice"])  # type: ignore[attr-defined]
        del avatar
        gc.collect()
        self.assertEqual(self.realm.loggedOut, ["alice"])  # type: ignore[attr-defined]

    def test_logoutOnLastDecref(self) -> None:
        """The realm's logout runs once when the client drops its last avatar reference."""
        avatar = self.resolve(self.clientFactory.login(UsernamePassword(b"alice", b"secret")))
        del avatar
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.realm.loggedOut, ["alice"])  # type: ignore[attr-defined]
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(self.realm.loggedOut, ["alice"])  # type: ignore[attr-defined]


class PbrokerLoginTests(LoginTestsMixin, SynchronousTestCase):
    serverModule = pb
    clientModule = pb

    def test_credentialsChecked(self) -> None:
        """What cannot be logged in with is refused at once, with TypeError, as stock PB
        refuses it at once (with an AttributeError)."""
        with self.assertRaises(TypeError) as caught:
            self.clientFactory.login(None)
        self.assertIn("credentials must be UsernamePassword", str(caught.exception))

        class Credentials:
            def __init__(self) -> None:
                self.user, self.secret = "alice", "hunter2"

            def __repr__(self) -> str:
                return f"Credentials({self.user!r}, {self.secret!r})"

        with self.assertRaises(TypeError) as caught:
            self.clientFactory.login(Credentials())
        self.assertIn("not a Credentials", str(caught.exception))
        self.assertNotIn("hunter2", str(caught.exception))  # its repr may hold the password

    def test_usernameAndPasswordChecked(self) -> None:
        """A username or password that is neither bytes nor str, or text UTF-8 cannot
        encode, is refused at once, naming which (rather than failing after a round trip
        with hashlib's words)."""
        for credentials, error, named in (
            (UsernamePassword(b"alice", None), TypeError, "password must be bytes or str"),
            (UsernamePassword(5, b"pw"), TypeError, "username must be bytes or str"),
            (UsernamePassword(b"alice", "\ud800"), ValueError, "password is not text"),
        ):
            with self.assertRaises(error) as caught:
                self.clientFactory.login(credentials)  # type: ignore[arg-type]
            self.assertIn(named, str(caught.exception))

    def test_passwordReadOnce(self) -> None:
        """The password is read once, when login() is called, as Twisted reads it: a
        property that asks the user (or a keyring) asks once."""
        asked: list[bool] = []

        class Prompting:
            username = b"alice"

            @property
            def password(self) -> bytes:
                asked.append(True)
                return b"secret"

        login = self.clientFactory.login(Prompting())
        self.assertEqual(asked, [True])
        avatar = self.resolve(login)
        self.assertEqual(self.resolve(avatar.callRemote("name")), "alice")
        self.assertEqual(asked, [True])

    def test_repeatedLoginsLeaveNothing(self) -> None:
        """Logging in and dropping the avatar again and again on one connection leaves
        nothing behind on the server: each logout forgets its disconnect notifier (in
        ``localCleanup``, which stock PB's name ``_localCleanup`` reads too)."""
        before = len(self.server.disconnects)
        for _ in range(5):
            avatar = self.resolve(self.clientFactory.login(Anonymous()))
            del avatar
            gc.collect()
            self.pump.flush()
        self.assertEqual(self.realm.loggedOut, ["anonymous"] * 5)
        self.assertEqual(len(self.server.disconnects), before)
        self.assertEqual(self.server.localCleanup, {})
        self.assertIs(self.server._localCleanup, self.server.localCleanup)  # stock's name
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertEqual(len(self.realm.loggedOut), 5)


class PbrokerServerTwistedClientLoginTests(LoginTestsMixin, SynchronousTestCase):
    serverModule = pb
    clientModule = twistedPb


class TwistedServerPbrokerClientLoginTests(LoginTestsMixin, SynchronousTestCase):
    serverModule = twistedPb
    clientModule = pb


class LogoutOnceTests(SynchronousTestCase):
    """
    The realm's logout runs exactly once per login, in the cases where that takes care.
    """

    def setUp(self) -> None:
        self.loggedOut: list[int] = []
        self.avatar = pb.Avatar()  # the same avatar for every login
        self.waiting: list[Any] = []
        test = self

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                number = len(test.loggedOut) + len(test.waiting)
                test.waiting.append(number)
                return pb.IPerspective, test.avatar, lambda: test.loggedOut.append(number)

        self.portal = Portal(Realm(), [AllowAnonymousAccess()])
        self.clientFactory = pb.PBClientFactory()
        self.server, self.client, self.pump = connect(
            pb.PBServerFactory(self.portal), self.clientFactory
        )

    def login(self) -> Any:
        results: list[Any] = []
        self.clientFactory.login(Anonymous()).addBoth(results.append)
        self.pump.flush()
        return results[0]

    def test_sameAvatarTwice(self) -> None:
        """Two logins that get the same avatar are two references, each logged out when
        the client drops it, as in Twisted."""
        first, second = self.login(), self.login()
        self.assertNotEqual(first, second)
        del first
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.loggedOut, [0])
        del second
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.loggedOut, [0, 1])

    def test_sharedReferenceableAvatar(self) -> None:
        """Logins that get one Referenceable avatar (a realm may give one object to many)
        each have their logout run once, when the client has released the avatar for the
        last time; they leave one disconnect notifier, and at most exportedReferences of
        them are held at once: the next is refused, and logged out at once."""
        shared = pb.Referenceable()
        loggedOut: list[int] = []

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                number = len(self.numbers)
                self.numbers.append(number)
                return pb.IPerspective, shared, lambda: loggedOut.append(number)

            numbers: list[int] = []

        factory = pb.PBServerFactory(
            Portal(Realm(), [AllowAnonymousAccess()]),
            limits=pb.BrokerLimits(exportedReferences=3),
        )
        clientFactory = pb.PBClientFactory()
        server, _client, pump = connect(factory, clientFactory)
        results: list[Any] = []
        for _ in range(4):
            clientFactory.login(Anonymous()).addBoth(results.append)
        pump.flush()
        avatars = results[:3]
        self.assertTrue(all(isinstance(a, pb.RemoteReference) for a in avatars))
        self.assertIn("more than 3 logins at once", results[3].getErrorMessage())
        self.assertEqual(loggedOut, [3])
        self.assertEqual(server.disconnects.count(server.localCleanup[shared.processUniqueID()]), 1)
        del results[:], avatars
        gc.collect()
        pump.flush()
        self.assertEqual(sorted(loggedOut), [0, 1, 2, 3])
        self.assertEqual((server.localCleanup, server.loginsHeld), ({}, 0))
        self.assertNotIn(shared.processUniqueID(), server.luids)

    def test_viewableAvatarLoggedOutOnRelease(self) -> None:
        """A Viewable avatar (sent as a ViewPoint) is logged out when the client releases
        it, as any avatar is, not only when the connection ends; its logins held go back
        to none; its view_ methods get no perspective, as from stock PB."""
        loggedOut: list[int] = []

        class Board(pb.Viewable):
            def view_who(self, perspective: Any) -> str:
                return repr(perspective)

        board = Board()

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                return pb.IPerspective, board, lambda: loggedOut.append(1)

        for dialects in (None, [b"pb"]):
            del loggedOut[:]
            clientFactory = pb.PBClientFactory(dialects=dialects)
            server, _client, pump = connect(
                pb.PBServerFactory(Portal(Realm(), [AllowAnonymousAccess()])), clientFactory
            )
            results: list[Any] = []
            clientFactory.login(Anonymous()).addBoth(results.append)
            pump.flush()
            [avatar] = results
            who = avatar.callRemote("who")
            pump.flush()
            self.assertEqual(self.successResultOf(who), "None")
            self.assertEqual(server.loginsHeld, 1)
            del results[:], avatar
            gc.collect()
            pump.flush()
            self.assertEqual(loggedOut, [1])
            self.assertEqual((server.localCleanup, server.loginsHeld), ({}, 0))

    def test_failingLogoutOverTheLimitNotSent(self) -> None:
        """A login over the limit is logged out at once; a logout that raises then is
        logged, and the peer is told it is over the limit, not what the realm's error says
        (which could name the server's internals)."""

        def logout() -> None:
            raise RuntimeError("cannot reach db at 10.1.2.3 as admin")

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                return pb.IPerspective, pb.Avatar(), logout

        clientFactory = pb.PBClientFactory()
        _server, _client, pump = connect(
            pb.PBServerFactory(
                Portal(Realm(), [AllowAnonymousAccess()]),
                limits=pb.BrokerLimits(exportedReferences=2),
            ),
            clientFactory,
        )
        results: list[Any] = []
        with capturedLogs() as events:
            for _ in range(3):
                clientFactory.login(Anonymous()).addBoth(results.append)
            pump.flush()
        refused = results[2]
        self.assertIsInstance(refused, Failure)
        self.assertEqual(refused.getErrorMessage(), "more than 2 logins at once on this connection")
        self.assertIn(
            "The logout of a login over the limit failed", [e.get("log_format") for e in events]
        )
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(logged.value), "cannot reach db at 10.1.2.3 as admin")

    def test_loginCompletingAfterDisconnect(self) -> None:
        """A login the checker answers after the client has gone is logged out at once."""
        answer: Deferred[Any] = Deferred()

        @implementer(ICredentialsChecker)
        class Slow:
            credentialInterfaces = (IAnonymous,)

            def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
                return answer

        self.portal.checkers[IAnonymous] = Slow()
        self.clientFactory.login(Anonymous()).addErrback(lambda _: None)
        self.pump.flush()
        self.client.transport.loseConnection()
        self.pump.flush()
        answer.callback(ANONYMOUS)
        self.assertEqual(self.loggedOut, [0])

    def test_notifyAfterDisconnect(self) -> None:
        """notifyOnDisconnect on a connection already lost calls back at once."""
        root = self.client.remoteForName("root")
        self.client.transport.loseConnection()
        self.pump.flush()
        called: list[Any] = []
        self.client.notifyOnDisconnect(lambda: called.append("broker"))
        root.notifyOnDisconnect(lambda reference: called.append(reference))
        self.assertEqual(called, ["broker", root])


class LogoutFailureTests(SynchronousTestCase):
    def test_failingLogoutDoesNotStopTheOthers(self) -> None:
        """A realm's logout that raises is logged; the other logins' logouts of the same
        avatar still run when the connection is lost."""
        loggedOut: list[int] = []
        avatar = pb.Avatar()
        count: list[int] = []

        def logoutFor(number: int) -> Any:
            def logout() -> None:
                loggedOut.append(number)
                if number == 0:
                    raise RuntimeError("the realm failed to log out")

            return logout

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                count.append(1)
                return pb.IPerspective, avatar, logoutFor(len(count) - 1)

        clientFactory = pb.PBClientFactory()
        server, client, pump = connect(
            pb.PBServerFactory(Portal(Realm(), [AllowAnonymousAccess()])), clientFactory
        )
        avatars: list[Any] = []
        for _ in range(2):
            clientFactory.login(Anonymous()).addBoth(avatars.append)
            pump.flush()
        self.assertEqual(loggedOut, [])
        with capturedLogs() as events:
            client.transport.loseConnection()
            pump.flush()
        self.assertEqual(sorted(loggedOut), [0, 1])
        self.assertTrue(any(e.get("log_format") == "A realm's logout failed" for e in events))
        [logged] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(logged.getErrorMessage(), "the realm failed to log out")
        self.assertEqual(server.loginsHeld, 0)


class _AsSent:
    """
    What an avatar reads of a broker, giving a call's arguments back as they were sent.
    """

    def unserializeCall(self, args: Any, kw: Any, perspective: Any) -> tuple[Any, Any]:
        return args, kw

    def serialize(self, value: Any, *rest: Any) -> Any:
        return value


class AvatarArgumentTests(SynchronousTestCase):
    def test_positionalArgumentsMustBeATuple(self) -> None:
        """A perspective_ call whose positional arguments arrived as something other than
        a sequence of them is refused with InvalidJelly, as a call to any other object is,
        not spread into arguments (a text "ab" as two of them)."""

        class User(pb.Avatar):
            def perspective_pair(self, first: Any = None, second: Any = None) -> Any:
                return first, second

        user = User()
        self.assertEqual(user.perspectiveMessageReceived(_AsSent(), "pair", (1, 2), {}), (1, 2))
        self.assertEqual(user.perspectiveMessageReceived(_AsSent(), "pair", [1, 2], {}), (1, 2))
        for args in ("ab", 5, {"a": 1}):
            with self.assertRaises(InvalidJelly) as raised:
                user.perspectiveMessageReceived(_AsSent(), "pair", args, {})
            self.assertEqual(
                str(raised.exception),
                f"positional arguments must arrive as a tuple, not {type(args).__name__}",
            )


class MalformedLoginTests(SynchronousTestCase):
    """
    A client's login messages of the wrong types are refused with UnauthorizedLogin naming
    what is wrong, before anything is checked or kept.
    """

    def setUp(self) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"alice", "text secret")  # a text password, as a realm may hold
        checker.addUser("carol", b"secret")  # a text username, as strcred's memory: keeps
        self.clientFactory = pb.PBClientFactory()
        self.server, self.client, self.pump = connect(
            pb.PBServerFactory(
                Portal(realmFor(pb), [checker]), loginGuard=pb.LoginGuard(baseDelay=0, maxDelay=0)
            ),
            self.clientFactory,
        )
        self.root = self.client.remoteForName("root")

    def call(self, target: Any, *args: Any) -> Any:
        results: list[Any] = []
        target.callRemote(*args).addBoth(results.append)
        self.pump.flush()
        return results[0]

    def refusal(self, target: Any, *args: Any) -> str:
        failure = self.call(target, *args)
        self.assertTrue(failure.check(UnauthorizedLogin), failure)
        return str(failure.getErrorMessage())

    def test_textPasswordInTheChecker(self) -> None:
        """A checker holding the password as text checks a legacy login's response as
        if it were UTF-8 bytes."""
        results: list[Any] = []
        self.clientFactory.login(UsernamePassword(b"alice", b"text secret")).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(self.call(results[0], "name"), "alice")

    def test_legacyLogin(self) -> None:
        """The legacy login keeps a username as it was sent, bytes or text, for the checker
        to look up, as Twisted does; another type, or a response that is not bytes, is
        refused; that refusal does not use up the challenge."""
        self.assertEqual(self.refusal(self.root, "login", 5), "the username must be bytes or text")
        nonce, challenger = self.call(self.root, "login", b"alice")
        self.assertEqual(
            self.refusal(challenger, "respond", "not bytes", None), "the response must be bytes"
        )
        avatar = self.call(challenger, "respond", pb.respond(nonce, b"text secret"), None)
        self.assertEqual(self.call(avatar, "name"), "alice")
        nonce, challenger = self.call(self.root, "login", "carol")
        avatar = self.call(challenger, "respond", pb.respond(nonce, b"secret"), None)
        self.assertEqual(self.call(avatar, "name"), "carol")
        nonce, challenger = self.call(self.root, "login", "alice")  # not kept under text
        self.refusal(challenger, "respond", pb.respond(nonce, b"text secret"), None)
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_certificateLoginWithoutCertificate(self) -> None:
        """A certificate login on a connection without a client certificate is refused."""
        self.assertEqual(
            self.refusal(self.root, "loginCertificate", None),
            "the connection has no client certificate",
        )
        self.flushLoggedErrors(UnauthorizedLogin)


class HostileServerLoginTests(SynchronousTestCase):
    """
    A server whose login answers are not what a login gives makes login() fail with
    ProtocolError: the client never takes a non-reference for an avatar.
    """

    def login(self, root: pb.Root, credentials: Any) -> Any:
        factory = pb.PBClientFactory()
        _server, _client, pump = connectedServerAndClient(pb.PBServerFactory(root), factory)
        results: list[Any] = []
        factory.login(credentials).addBoth(results.append)
        pump.flush()
        return results[0]

    def test_answersChecked(self) -> None:
        class Hostile(pb.Root):
            challenge: Any = None

            def remote_loginAnonymous(self, mind: Any) -> int:
                return 42

            def remote_login(self, username: bytes) -> Any:
                return self.challenge

        result = self.login(Hostile(), Anonymous())
        self.assertTrue(result.check(ProtocolError), result)
        self.assertIn("avatar is a plain value: 42", result.getErrorMessage())
        for challenge in (b"just bytes", (1, 2), ("nonce", "not a reference")):
            root = Hostile()
            root.challenge = challenge
            result = self.login(root, UsernamePassword(b"alice", b"pw"))
            self.assertTrue(result.check(ProtocolError), (challenge, result))
            self.assertIn("is not (nonce, challenger)", result.getErrorMessage())

    def test_copiedAvatarAccepted(self) -> None:
        """A realm's avatar that is a Copyable arrives as its copy, and the login succeeds,
        as with stock PB."""

        class Card(pb.Copyable):
            def getStateToCopy(self) -> Any:
                return {"holder": "anonymous"}

        class CardCopy(pb.RemoteCopy):
            pass

        @implementer(IRealm)
        class Realm:
            def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
                return pb.IPerspective, Card(), lambda: None

        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(Card, CardCopy)
        factory = pb.PBClientFactory(registry=registry)
        serverFactory = pb.PBServerFactory(Portal(Realm(), [AllowAnonymousAccess()]))
        _server, _client, pump = connectedServerAndClient(serverFactory, factory)
        results: list[Any] = []
        factory.login(Anonymous()).addBoth(results.append)
        pump.flush()
        self.assertIsInstance(results[0], CardCopy)
        self.assertEqual(results[0].holder, "anonymous")

    def test_legacyAvatarChecked(self) -> None:
        class Challenger(pb.Referenceable):
            def remote_respond(self, response: bytes, mind: Any) -> str:
                return "not an avatar"

        class Hostile(pb.Root):
            def remote_login(self, username: bytes) -> Any:
                return (b"nonce", Challenger())

        result = self.login(Hostile(), UsernamePassword(b"alice", b"pw"))
        self.assertTrue(result.check(ProtocolError), result)
        self.assertIn("avatar is a plain value", result.getErrorMessage())


class ChallengeTests(SynchronousTestCase):
    def test_respondMatchesTwisted(self) -> None:
        """respond() computes what stock Twisted computes."""
        nonce = pb.challenge()
        self.assertEqual(len(nonce), 16)
        self.assertNotEqual(nonce, pb.challenge())
        self.assertEqual(pb.respond(nonce, b"pw"), twistedPb.respond(nonce, b"pw"))

    def test_challengeAnsweredOnce(self) -> None:
        """A challenger refuses a second response, even a right one."""
        realm = realmFor(pb)
        portal = Portal(realm, [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")])
        factory = pb.PBClientFactory()
        guard = pb.LoginGuard(baseDelay=0, maxDelay=0)
        _server, client, pump = connect(pb.PBServerFactory(portal, loginGuard=guard), factory)
        results: list[Any] = []
        client.remoteForName("root").callRemote("login", b"alice").addBoth(results.append)
        pump.flush()
        [(nonce, challenger)] = results
        first = challenger.callRemote("respond", pb.respond(nonce, b"wrong"), None)
        second = challenger.callRemote("respond", pb.respond(nonce, b"secret"), None)
        pump.flush()
        self.assertTrue(self.failureResultOf(first).check(UnauthorizedLogin))
        self.assertTrue(self.failureResultOf(second).check(UnauthorizedLogin))
        self.flushLoggedErrors(UnauthorizedLogin)


class LoginGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.guard = pb.LoginGuard(
            reactor=self.clock, baseDelay=1.0, maxDelay=4.0, maxFailuresPerConnection=3
        )
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        self.factory = pb.PBServerFactory(Portal(realmFor(pb), [checker]), loginGuard=self.guard)

    def login(self, password: bytes, advance: float = 10.0) -> tuple[Any, Any, Any]:
        clientFactory = pb.PBClientFactory()
        _server, client, pump = connect(self.factory, clientFactory)
        results: list[Any] = []
        clientFactory.login(UsernamePassword(b"alice", password)).addBoth(results.append)
        pump.flush()
        if advance:
            self.clock.advance(advance)
            pump.flush()
        return results, client, pump

    def test_failuresAnsweredLaterAndLater(self) -> None:
        """Each recent failure from an address doubles the delay, up to the maximum."""
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 1.0)
        with capturedLogs() as events:
            results, _client, pump = self.login(b"wrong", advance=0)
            self.assertEqual(results, [])
            self.clock.advance(0.9)
            pump.flush()
            self.assertEqual(results, [])
            self.clock.advance(0.1)
            pump.flush()
            self.assertTrue(results[0].check(UnauthorizedLogin))
            self.assertEqual(self.guard.delayFor("127.0.0.1"), 2.0)
            self.login(b"wrong")
            self.assertEqual(self.guard.delayFor("127.0.0.1"), 4.0)
            self.login(b"wrong")
            self.assertEqual(self.guard.delayFor("127.0.0.1"), 4.0)
        text = " ".join(repr(event) for event in events)
        self.assertIn("Login failed", text)
        self.assertIn("alice", text)
        self.assertNotIn("wrong", text)
        reasons = {e["reason"] for e in events if "reason" in e}
        self.assertEqual(reasons, {"UnauthorizedLogin"})
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_factoryClockDrivesTheDefaultGuard(self) -> None:
        """A server factory given a clock and no guard makes its default guard run its
        delays on that clock, not on the reactor."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        factory = pb.PBServerFactory(Portal(realmFor(pb), [checker]), clock=self.clock)
        self.assertIs(factory.root.guard.reactor, self.clock)
        clientFactory = pb.PBClientFactory()
        _server, _client, pump = connect(factory, clientFactory)
        results: list[Any] = []
        clientFactory.login(UsernamePassword(b"alice", b"wrong")).addBoth(results.append)
        pump.flush()
        self.assertEqual(results, [])
        self.clock.advance(0.5)
        pump.flush()
        self.assertTrue(results[0].check(UnauthorizedLogin))
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_successNotDelayedAndForgivesNothing(self) -> None:
        """A successful login is answered at once, and leaves the address's failures: an
        anonymous (or the attacker's own) login in between guesses does not reset the
        delays."""
        self.login(b"wrong")
        results, _client, _pump = self.login(b"secret", advance=0)
        self.assertEqual(len(results), 1)
        self.assertNotIsInstance(results[0], Failure)
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 2.0)
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_manyFailuresDoNotLockTheAddressOut(self) -> None:
        """Past a thousand recent failures from an address (certificate logins, which fail
        at once, count too) the delay stays the maximum, and the address's password logins
        are still answered: the power of two once overflowed, the failure was never
        answered and the address's turn never passed on."""
        guard = pb.LoginGuard(reactor=self.clock, maxFailuresPerConnection=2000)
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        factory = pb.PBServerFactory(Portal(realmFor(pb), [checker]), loginGuard=guard)
        with capturedLogs():
            failed = []
            for _ in range(2):  # (a connection takes at most 1,000 calls in progress)
                _server, client, pump = connect(factory, pb.PBClientFactory())
                root = client.remoteForName("root")
                failed += [root.callRemote("loginCertificate", None) for _ in range(515)]
                pump.flush()
                self.clock.advance(guard.maxDelay)
                pump.flush()
            for attempt in failed:
                self.failureResultOf(attempt, UnauthorizedLogin)
            self.assertEqual(guard.delayFor("127.0.0.1"), guard.maxDelay)
            self.factory = factory
            wrong, _client, _pump = self.login(b"wrong")
            right, _client, _pump = self.login(b"secret")
        self.assertTrue(wrong[0].check(UnauthorizedLogin))
        self.assertIsInstance(right[0], pb.RemoteReference)
        self.assertEqual(self.flushLoggedErrors(OverflowError), [])
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_answeredWhenAFailureCannotBeCounted(self) -> None:
        """A failure whose counting raises (a guard subclass's bug) is still answered, with
        the error logged, and the address's next password login is checked; failing
        closed: after the longest delay, and counted against the connection, which is
        closed after as many failures as any other."""

        class BrokenGuard(pb.LoginGuard):
            def delayFor(self, address: str) -> float:
                raise RuntimeError("the guard's own bug")

        guard = BrokenGuard(reactor=self.clock, maxDelay=4.0, maxFailuresPerConnection=2)
        self.factory = pb.PBServerFactory(
            Portal(realmFor(pb), [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")]),
            loginGuard=guard,
        )
        with capturedLogs():
            wrong, _client, pump = self.login(b"wrong", advance=3.9)
            self.assertEqual(wrong, [])
            self.clock.advance(0.1)
            pump.flush()
            right, _client, _pump = self.login(b"secret", advance=0)
            clientFactory = pb.PBClientFactory()
            _server, client, pump = connect(self.factory, clientFactory)
            for _ in range(2):
                failed: list[Any] = []
                clientFactory.login(UsernamePassword(b"alice", b"wrong")).addBoth(failed.append)
                pump.flush()
                self.clock.advance(4.0)
                pump.flush()
                self.assertTrue(failed[0].check(UnauthorizedLogin))
        self.assertTrue(wrong[0].check(UnauthorizedLogin))
        self.assertIsInstance(right[0], pb.RemoteReference)
        self.assertTrue(client.disconnected)
        self.assertEqual(
            {str(e.value) for e in self.flushLoggedErrors(RuntimeError)}, {"the guard's own bug"}
        )

    def pipelinedGuesses(self, passwords: list[bytes]) -> tuple[Any, Any, list[Any]]:
        """
        Ask for a challenge per password at once, then send every response at once, as a
        hostile client can; the server, the pump, and the outcomes.
        """
        clientFactory = pb.PBClientFactory()
        server, client, pump = connect(self.factory, clientFactory)
        root = client.remoteForName("root")
        challenges: list[Any] = []
        for _ in passwords:
            root.callRemote("login", b"alice").addCallback(challenges.append)
        pump.flush()
        outcomes: list[Any] = []
        for password, (nonce, challenger) in zip(passwords, challenges, strict=True):
            response = pb.respond(nonce, password)
            challenger.callRemote("respond", response, None).addBoth(outcomes.append)
        pump.flush()
        return server, pump, outcomes

    def test_pipelinedGuessesCheckedOneAtATime(self) -> None:
        """Guesses sent all at once are checked one at a time, each after the delay of the
        failure before it; once the connection has failed too often, the rest (the right
        password among them) are refused unchecked, and the connection closed."""
        checked: list[bytes] = []
        checker = self.factory.root.portal.checkers[IUsernameHashedPasswordInterface]
        original = checker.requestAvatarId

        def counting(credentials: Any) -> Any:
            checked.append(credentials.username)
            return original(credentials)

        checker.requestAvatarId = counting
        with capturedLogs():
            server, pump, outcomes = self.pipelinedGuesses([b"wrong"] * 3 + [b"secret"])
            self.assertEqual((len(checked), outcomes), (1, []))
            self.clock.advance(1.0)  # the first failure's delay
            pump.flush()
            self.assertEqual((len(checked), len(outcomes)), (2, 1))
            self.clock.advance(2.0)
            pump.flush()
            self.assertEqual((len(checked), len(outcomes)), (3, 2))
            self.clock.advance(4.0)
            pump.flush()
        self.assertEqual(len(checked), 3)  # the right password was never checked
        self.assertEqual(len(outcomes), 4)
        self.assertTrue(all(isinstance(o, Failure) for o in outcomes))
        self.assertIn("too many failed logins", outcomes[3].getErrorMessage())
        self.assertTrue(server.disconnected)
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_addressesShareTheWait(self) -> None:
        """A second connection from the same address waits for the first's failure."""
        with capturedLogs():
            first, _client, _pump = self.login(b"wrong", advance=0)
            second, _client, pump = self.login(b"secret", advance=0)
            self.assertEqual((first, second), ([], []))
            self.clock.advance(1.0)
            pump.flush()
        self.assertNotIsInstance(second[0], Failure)
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_checkTimeout(self) -> None:
        """A check that takes longer than checkTimeout holds the address's turn no longer:
        the next attempt is checked meanwhile (logged), and the slow one waits on for its
        checker, as on stock Twisted, where it used to fail as unauthorized (a server busy
        starting up refused logins whose password was right)."""
        guard = pb.LoginGuard(reactor=self.clock, baseDelay=0, maxDelay=0, checkTimeout=5)
        broker = _FakeBroker("10.0.0.1")
        slow: Deferred[Any] = Deferred()
        results: list[Any] = []
        guard.attempt(broker, b"alice", lambda: slow).addBoth(results.append)
        guard.attempt(broker, b"bob", lambda: "bob").addBoth(results.append)
        with capturedLogs() as events:
            self.clock.advance(4.9)
            self.assertEqual(results, [])
            self.clock.advance(0.1)
        self.assertEqual(results, ["bob"])
        self.assertIn("has taken more than 5 seconds", formatEvent(events[0]))
        self.clock.advance(3600)
        slow.callback("alice")
        self.assertEqual(results, ["bob", "alice"])
        self.assertEqual(guard._queues, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_checkWaitingOnAnotherDeferred(self) -> None:
        """A check whose Deferred has fired but waits, paused, on one a callback returned
        (a quick checker followed by a realm that answers late, in a portal guarded whole)
        passes the address's turn on past checkTimeout too."""
        guard = pb.LoginGuard(reactor=self.clock, baseDelay=0, maxDelay=0, checkTimeout=5)
        broker = _FakeBroker("10.0.0.1")
        late: Deferred[Any] = Deferred()
        results: list[Any] = []
        with capturedLogs():
            guard.attempt(
                broker, b"alice", lambda: succeed(None).addCallback(lambda _: late)
            ).addBoth(results.append)
            guard.attempt(broker, b"bob", lambda: "bob").addBoth(results.append)
            self.clock.advance(5)
        self.assertEqual(results, ["bob"])
        late.callback("alice")
        self.assertEqual(results, ["bob", "alice"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_quickCheckLeavesNoTimer(self) -> None:
        """A check that answers within checkTimeout, or at once, leaves no timer behind."""
        guard = pb.LoginGuard(reactor=self.clock, checkTimeout=5)
        checking: Deferred[Any] = Deferred()
        results: list[Any] = []
        with capturedLogs():
            guard.attempt(_FakeBroker("10.0.0.1"), b"a", lambda: checking).addBoth(results.append)
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            checking.callback("a")
            guard.attempt(_FakeBroker("10.0.0.1"), b"b", lambda: "b").addBoth(results.append)
        self.assertEqual(results, ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def failOnce(self, guard: Any, host: str = "10.0.0.1") -> None:
        guard.attempt(_FakeBroker(host), b"x", lambda: fail(UnauthorizedLogin())).addErrback(
            lambda _: None
        )

    def behindAFailure(self, maxWaiting: int, count: int) -> list[Any]:
        """
        ``count`` attempts (each checked at once when its turn comes) sent behind a failure
        from the same address, to a guard with ``maxWaiting``; what each got, as it comes.
        """
        guard = pb.LoginGuard(reactor=self.clock, maxWaiting=maxWaiting)
        self.failOnce(guard)
        results: list[Any] = []
        for _ in range(count):
            guard.attempt(_FakeBroker("10.0.0.1"), b"bob", lambda: "avatar").addBoth(results.append)
        return results

    def test_manyWaitingChecksDoNotRecurse(self) -> None:
        """Hundreds of attempts waiting behind a failure, each checked at once when its turn
        comes, are all answered: the queue is drained by a loop, not by recursion."""
        with capturedLogs():
            answered = self.behindAFailure(2000, 1500)
            self.clock.advance(1)
        self.assertEqual(answered, ["avatar"] * 1500)

    def test_waitingBounded(self) -> None:
        """Beyond maxWaiting, an attempt with a secret is refused at once."""
        with capturedLogs():
            results = self.behindAFailure(2, 3)
            self.assertEqual(len(results), 1)
            results[0].trap(UnauthorizedLogin)
            self.assertIn("too many logins are waiting", results[0].getErrorMessage())
            self.clock.advance(1)
        self.assertEqual(results[1:], ["avatar", "avatar"])

    def test_anonymousNotHeldBack(self) -> None:
        """Logins without a secret do not wait for a guesser at the same address."""
        self.failOnce(self.guard, "127.0.0.1")
        results: list[Any] = []
        self.guard.attempt(
            _FakeBroker("127.0.0.1"), b"<anonymous>", lambda: "avatar", guessable=False
        ).addBoth(results.append)
        self.assertEqual(results, ["avatar"])
        self.clock.advance(10)

    def test_boundsTaken(self) -> None:
        """Each bound LoginGuard documents is taken at its edge (no delay, forgetting at
        once, one failure, one address, one waiting), and refused past it."""
        edge = pb.LoginGuard(
            reactor=self.clock,
            baseDelay=0,
            maxDelay=0,
            maxFailuresPerConnection=1,
            forgetAfter=0,
            maxAddresses=1,
            maxWaiting=1,
        )
        self.assertEqual((edge.forgetAfter, edge.maxDelay, edge.maxWaiting), (0, 0, 1))
        for past in (
            {"forgetAfter": -0.5},
            {"baseDelay": -1},
            {"baseDelay": 2, "maxDelay": 1},
            {"maxFailuresPerConnection": 0},
            {"maxAddresses": 0},
            {"maxWaiting": 0},
            {"checkTimeout": 0},
        ):
            with self.assertRaises(ValueError, msg=past):
                pb.LoginGuard(reactor=self.clock, **past)

    def test_turnPassedOnceAtTheRealm(self) -> None:
        """The address's turn passes on when the check (``login``) has passed, while what
        follows (``then``, the realm) runs; its end does not pass on the turn of the
        attempt being checked by then."""
        attaching: Deferred[Any] = Deferred()
        checking: Deferred[Any] = Deferred()
        started: list[str] = []
        results: list[Any] = []

        def attempt(name: str, check: Any, then: Any = None) -> None:
            def login() -> Any:
                started.append(name)
                return check

            self.guard.attempt(_FakeBroker("127.0.0.1"), name.encode(), login, then=then)

        checkingAlice: Deferred[Any] = Deferred()
        self.guard.attempt(
            _FakeBroker("127.0.0.1"), b"alice", lambda: checkingAlice, then=lambda _: attaching
        ).addBoth(results.append)
        attempt("bob", checking)
        attempt("carol", "carol")
        self.assertEqual(started, [])  # both wait for alice's check
        checkingAlice.callback("alice")
        self.assertEqual(started, ["bob"])  # alice's realm runs, bob is checked
        attaching.callback("alice's avatar")
        self.assertEqual(results, ["alice's avatar"])
        self.assertEqual(started, ["bob"])  # carol still waits for bob's check
        checking.callback("bob")
        self.assertEqual(started, ["bob", "carol"])
        self.assertEqual(self.guard._queues, {})

    def test_cancelWhileWaiting(self) -> None:
        """An attempt its caller gives up on while it waits is never checked."""
        self.failOnce(self.guard, "127.0.0.1")
        checked: list[bool] = []
        waiting = self.guard.attempt(_FakeBroker("127.0.0.1"), b"bob", lambda: checked.append(True))
        waiting.addErrback(lambda f: f.trap(CancelledError))
        waiting.cancel()
        self.clock.advance(10)
        self.assertEqual(checked, [])
        self.assertEqual(self.guard._queues, {})

    def test_cancelWhileChecking(self) -> None:
        """Cancelling an attempt being checked fails it with CancelledError at once, but
        leaves its check running (its canceller is not called: whether the work it awaits
        would stop cannot be known): the address's next attempt waits for it to end, and a
        failure then counts, delayed as any other."""
        cancelled: list[bool] = []
        slow: Deferred[Any] = Deferred(lambda _: cancelled.append(True))
        first = self.guard.attempt(_FakeBroker("127.0.0.1"), b"bob", lambda: slow)
        results: list[Any] = []
        self.guard.attempt(_FakeBroker("127.0.0.1"), b"carol", lambda: "avatar").addBoth(
            results.append
        )
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual((cancelled, results), ([], []))
        with capturedLogs():
            slow.errback(UnauthorizedLogin())
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 2.0)  # counted
        self.assertEqual(results, [])
        self.clock.advance(1.0)
        self.assertEqual(results, ["avatar"])

    def test_cancelledAsyncCheckAwaitingAThread(self) -> None:
        """An async checker awaiting work that would go on if cancelled (a thread): a peer
        that cancels every attempt cannot start that work for many at once; each waits
        for the one before to end."""
        jobs: list[Deferred[Any]] = []

        async def check() -> Any:
            job: Deferred[Any] = Deferred()  # no canceller: the thread's work goes on
            jobs.append(job)
            return await job

        broker = _FakeBroker("127.0.0.1")
        attempts = [
            self.guard.attempt(broker, b"bob", lambda: Deferred.fromCoroutine(check()))
            for _ in range(3)
        ]
        for attempt in attempts:
            attempt.cancel()
            self.failureResultOf(attempt, CancelledError)
        self.assertEqual(len(jobs), 1)
        with capturedLogs():
            jobs[0].errback(UnauthorizedLogin())
        self.clock.advance(1.0)
        self.assertEqual(len(jobs), 1)  # the others were given up while they waited
        self.assertEqual(self.guard._queues, {})
        self.assertEqual(getattr(broker, "loginFailures", 0), 1)

    def test_cancelWhileAnUnstoppableCheckRuns(self) -> None:
        """A check whose Deferred has no canceller (in a thread, a database) is not
        cancelled with its attempt: the caller gets CancelledError at once, and the
        address's next attempt waits until the check ends (else a peer could run any number
        of checks at once, cancelling each); a failure then counts, delayed as any other
        (the realm may have been given the caller's mind, which a right guess could reach:
        cancelling each guess must not make guessing free)."""
        checks: list[Deferred[Any]] = []

        def unstoppable() -> Deferred[Any]:
            checks.append(Deferred())
            return checks[-1]

        first = self.guard.attempt(_FakeBroker("127.0.0.1"), b"bob", unstoppable)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        second = self.guard.attempt(_FakeBroker("127.0.0.1"), b"carol", unstoppable)
        self.assertEqual(len(checks), 1)  # waits for the first check to end
        with capturedLogs() as events:
            checks[0].errback(UnauthorizedLogin())
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "Login failed for 'bob' from 127.0.0.1: UnauthorizedLogin "
                "(abandoned by the peer as it was checked)"
            ],
        )
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 2.0)  # a failure counted
        self.assertEqual(len(checks), 1)  # the next waits out the failure's delay
        self.clock.advance(1.0)
        self.assertEqual(len(checks), 2)  # now the second goes
        second.cancel()
        self.failureResultOf(second, CancelledError)
        with capturedLogs() as events:
            waiting = self.guard.attempt(_FakeBroker("127.0.0.1"), b"dave", unstoppable)
            waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Login abandoned by 127.0.0.1 for 'dave' before it was checked"],
        )
        checks[1].callback(("interface", "avatar", lambda: None))
        self.assertEqual(self.guard._queues, {})

    def test_queueGoesOnAfterALogoutRaises(self) -> None:
        """A check whose attempt was given up that still succeeds is logged out; if that
        logout raises, the address's next attempt is still checked."""

        def logout() -> None:
            raise RuntimeError("logout failed")

        running: Deferred[Any] = Deferred()
        attempt = self.guard.attempt(_FakeBroker("127.0.0.1"), b"bob", lambda: running)
        results: list[Any] = []
        self.guard.attempt(_FakeBroker("127.0.0.1"), b"carol", lambda: "avatar").addBoth(
            results.append
        )
        attempt.addErrback(lambda _: None)
        attempt.cancel()
        self.assertEqual(results, [])
        with capturedLogs() as events:
            running.callback(("interface", "avatar", logout))
        self.assertEqual(results, ["avatar"])
        self.assertTrue(any("logout of an abandoned login" in e["log_format"] for e in events))
        self.flushLoggedErrors(RuntimeError)

    def test_peersWithoutAHost(self) -> None:
        """Peers whose address has no host (UNIX sockets) are one address to the guard,
        named by the address type: a failure from one delays the next."""
        broker = _FakeBroker("127.0.0.1")
        broker.transport = StringTransport(peerAddress=UNIXAddress(b"/tmp/socket"))
        with capturedLogs() as events:
            failure = self.guard.attempt(broker, b"bob", lambda: fail(UnauthorizedLogin()))
            failure.addErrback(lambda _: None)
            self.clock.advance(10)
        self.assertEqual(self.guard.delayFor("UNIXAddress"), 2.0)
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 1.0)
        self.assertEqual([e["peer"] for e in events if "peer" in e], ["UNIXAddress"])

    def test_ipv6CountedByNetwork(self) -> None:
        """IPv6 peers are counted by their /64 network (a site picks any address in it at
        will), logged by their own address; an IPv4 address mapped into IPv6 counts as
        that IPv4 address."""
        failures = [
            ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
            ("fe80::1%eth0", "fe80::/64"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
        ]
        with capturedLogs() as events:
            for host, _counted in failures:
                broker = _FakeBroker("127.0.0.1")
                broker.transport = StringTransport(peerAddress=IPv6Address("TCP", host, 1234))
                failure = self.guard.attempt(broker, b"bob", lambda: fail(UnauthorizedLogin()))
                failure.addErrback(lambda _: None)
                self.clock.advance(10)
        self.assertEqual(self.guard.delayFor("2001:db8:1:2::/64"), 4.0)
        self.assertEqual(self.guard.delayFor("2001:db8:1:2:abcd::5"), 4.0)  # same network
        self.assertEqual(self.guard.delayFor("2001:db8:1:3::1"), 1.0)  # another one
        self.assertEqual(self.guard.delayFor("fe80::/64"), 2.0)
        self.assertEqual(self.guard.delayFor("192.0.2.7"), 2.0)
        self.assertEqual([e["peer"] for e in events if "peer" in e], [host for host, _ in failures])

    def test_ipv6SiteSharesItsFailures(self) -> None:
        """Failures from many /64 networks of one /48 (a site that picks a new network for
        each guess) raise the delay of every /64 in it, one doubling for every 16; another
        /48 is not affected."""
        with capturedLogs():
            for number in range(32):
                broker = _FakeBroker("127.0.0.1")
                host = f"2001:db8:7:{number << 8:x}::1"  # (each /64 in a /56 of its own)
                broker.transport = StringTransport(peerAddress=IPv6Address("TCP", host, 1234))
                failure = self.guard.attempt(broker, b"bob", lambda: fail(UnauthorizedLogin()))
                failure.addErrback(lambda _: None)
                self.clock.advance(10)
                if number == 15:
                    self.assertEqual(self.guard.delayFor("2001:db8:7:ff::1"), 2.0)
        self.assertEqual(self.guard.delayFor("2001:db8:7:ff::1"), 4.0)  # a fresh /64 of it
        self.assertEqual(self.guard.delayFor("2001:db8:7:100::9"), 4.0)
        self.assertEqual(self.guard.delayFor("2001:db8:8::1"), 1.0)  # another site
        self.assertEqual(self.guard.delayFor("192.0.2.1"), 1.0)

    def test_ipv6NetworksTakeTheirOwnTurns(self) -> None:
        """The password attempts of each /64 take their own turns, even within one /48
        (which may be a provider's, shared by unrelated customers: one guessing must not
        keep the others from logging in); a /64's own attempts wait for each other."""
        checks: list[Deferred[Any]] = []

        def slow() -> Deferred[Any]:
            checks.append(Deferred())
            return checks[-1]

        def fromHost(host: str) -> Any:
            broker = _FakeBroker("127.0.0.1")
            broker.transport = StringTransport(peerAddress=IPv6Address("TCP", host, 1234))
            return broker

        for number in range(3):
            self.guard.attempt(fromHost(f"2001:db8:7:{number}::1"), b"bob", slow)
        self.assertEqual(len(checks), 3)
        self.guard.attempt(fromHost("2001:db8:7:0::2"), b"bob", slow)  # the first /64's
        self.assertEqual(len(checks), 3)
        checks[0].callback(("interface", "avatar", lambda: None))
        self.assertEqual(len(checks), 4)

    def test_failingAddressesBounded(self) -> None:
        """At most maxAddresses failing addresses are remembered: stale ones go first, then
        the oldest."""
        guard = pb.LoginGuard(reactor=self.clock, baseDelay=1, maxDelay=8, maxAddresses=3)

        def failFrom(host: str) -> None:
            failure = guard.attempt(_FakeBroker(host), b"x", lambda: fail(UnauthorizedLogin()))
            failure.addErrback(lambda _: None)
            self.clock.advance(10)

        with capturedLogs():
            for host in ["10.0.0.1", "10.0.0.2", "10.0.0.3"]:
                failFrom(host)
            failFrom("10.0.0.1")  # failing again makes it the newest
            failFrom("10.0.0.4")
        self.assertEqual(guard.delayFor("10.0.0.2"), 1.0)  # the oldest, forgotten
        self.assertEqual(guard.delayFor("10.0.0.1"), 4.0)
        self.assertEqual(guard.delayFor("10.0.0.3"), 2.0)
        self.assertEqual(guard.delayFor("10.0.0.4"), 2.0)

    def test_expiredRecordsLetGo(self) -> None:
        """The record of an address whose failures no longer count is let go at the next
        failure from anywhere, not held until maxAddresses others have failed."""
        guard = pb.LoginGuard(reactor=self.clock, baseDelay=0, maxDelay=0, forgetAfter=600)

        def failFrom(host: str) -> None:
            failure = guard.attempt(_FakeBroker(host), b"x", lambda: fail(UnauthorizedLogin()))
            failure.addErrback(lambda _: None)

        with capturedLogs():
            for number in range(300):
                failFrom(f"10.0.{number // 256}.{number % 256}")
            self.assertEqual(len(guard._failures), 300)
            self.clock.advance(300)
            failFrom("10.1.0.1")  # the others still count
            self.assertEqual(len(guard._failures), 301)
            self.clock.advance(301)
            failFrom("10.1.0.2")  # the first 300 no longer do
            self.assertEqual(list(guard._failures), ["10.1.0.1", "10.1.0.2"])

    def test_failuresForgotten(self) -> None:
        """Failures older than forgetAfter no longer count."""
        self.login(b"wrong")
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 2.0)
        self.clock.advance(self.guard.forgetAfter + 1)
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 1.0)
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_connectionClosedAfterTooManyFailures(self) -> None:
        """A connection that keeps failing is closed after its last error is sent."""
        clientFactory = pb.PBClientFactory()
        server, _client, pump = connect(self.factory, clientFactory)
        results: list[Any] = []
        for _ in range(3):
            clientFactory.login(UsernamePassword(b"alice", b"wrong")).addBoth(results.append)
            pump.flush()
            self.clock.advance(10)
            pump.flush()
        self.assertEqual(len(results), 3)
        self.assertTrue(all(r.check(UnauthorizedLogin) for r in results))
        self.assertTrue(server.disconnected)
        self.flushLoggedErrors(UnauthorizedLogin)

    def test_badArguments(self) -> None:
        """A guard with inconsistent settings is refused."""
        with self.assertRaises(ValueError):
            pb.LoginGuard(baseDelay=5, maxDelay=1)
        with self.assertRaises(ValueError):
            pb.LoginGuard(maxFailuresPerConnection=0)
        with self.assertRaises(ValueError):
            pb.LoginGuard(maxAddresses=0)
        with self.assertRaises(ValueError):
            pb.LoginGuard(checkTimeout=0)
        with self.assertRaises(ValueError):
            pb.LoginGuard(maxWaiting=0)


@implementer(ICredentialsChecker)
class _BrokenPasswordChecker:
    """
    A password-login checker whose store cannot be read (a password file that became a
    directory, say).
    """

    def __init__(self) -> None:
        from pbroker.passwords import IScramProof

        self.credentialInterfaces = (IScramProof,)

    def verifierFor(self, username: bytes) -> Any:
        raise IsADirectoryError(21, "Is a directory", "/etc/secret/place")

    def requestAvatarId(self, credentials: Any) -> Any:
        return fail(UnauthorizedLogin())


@implementer(ICredentialsChecker)
class _UnstoppableChecker:
    """
    Answers later through a Deferred without a canceller, as a checker in a thread or a
    database does; ``pending`` holds each check's Deferred, whether its password is right,
    and the username.
    """

    credentialInterfaces = (IUsernameHashedPasswordInterface,)

    def __init__(self, password: bytes) -> None:
        self.password = password
        self.pending: list[tuple[Deferred[Any], bool, bytes]] = []

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self.pending.append(
            (answer, credentials.checkPassword(self.password), credentials.username)
        )
        return answer


class _GreetedMind(pb.Referenceable):
    def __init__(self) -> None:
        self.greeted = 0

    def remote_attached(self) -> None:
        self.greeted += 1


@implementer(IRealm)
class _GreetingRealm:
    """
    Calls the client's mind as it logs in (as Buildbot's realm does).
    """

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        mind.callRemote("attached")
        return pb.IPerspective, pb.Avatar(), lambda: None


class AbandonedGuessTests(SynchronousTestCase):
    def test_guessesCancelledAsTheyAreCheckedCount(self) -> None:
        """A client that cancels each password response (native dialect) while an
        uncancellable checker runs: each wrong guess still counts, is delayed, and the
        connection is closed after five, so that the right guess is never checked and the
        realm never reaches the client's mind with it."""
        clock = Clock()
        guard = pb.LoginGuard(reactor=clock)
        checker = _UnstoppableChecker(b"secret")
        factory = pb.PBServerFactory(Portal(_GreetingRealm(), [checker]), loginGuard=guard)
        _server, client, pump = connectedServerAndClient(factory, pb.PBClientFactory())
        self.assertTrue(client.isNative)
        root = client.remoteForName("root")
        mind = _GreetedMind()
        checked = []
        with capturedLogs():
            for guess in [b"a", b"b", b"c", b"d", b"e", b"f", b"secret"]:
                if client.disconnected:
                    break
                challenge = root.callRemote("login", b"alice")
                pump.flush()
                nonce, challenger = self.successResultOf(challenge)
                outcome = challenger.callRemote("respond", pb.respond(nonce, guess), mind)
                pump.flush()
                outcome.cancel()
                self.failureResultOf(outcome, CancelledError)
                pump.flush()
                if not checker.pending:
                    continue
                answer, right, username = checker.pending.pop()
                checked.append(guess)
                if right:
                    answer.callback(username)
                else:
                    answer.errback(UnauthorizedLogin("bad password"))
                clock.advance(guard.maxDelay)
                pump.flush()
        self.assertEqual(checked, [b"a", b"b", b"c", b"d", b"e"])
        self.assertTrue(client.disconnected)
        self.assertEqual(guard.delayFor("127.0.0.1"), guard.maxDelay)
        self.assertEqual(mind.greeted, 0)
        self.flushLoggedErrors(UnauthorizedLogin)


class BrokenPasswordStoreTests(SynchronousTestCase):
    def test_errorNotSentToThePeer(self) -> None:
        """A checker that fails to look a user up refuses the login without telling the
        peer why (which could name the server's files), and logs the error."""
        portal = Portal(realmFor(pb), [_BrokenPasswordChecker()])
        clientFactory = pb.PBClientFactory()
        _server, _client, pump = connect(
            pb.PBServerFactory(portal, loginGuard=pb.LoginGuard(baseDelay=0, maxDelay=0)),
            clientFactory,
        )
        results: list[Any] = []
        with capturedLogs() as events:
            clientFactory.login(UsernamePassword(b"alice", b"pw")).addBoth(results.append)
            pump.flush()
        self.assertIsInstance(results[0], Failure)
        self.assertTrue(results[0].check(UnauthorizedLogin))
        self.assertNotIn("/etc/secret/place", results[0].getErrorMessage())
        self.assertIn("cannot check passwords now", results[0].getErrorMessage())
        self.assertTrue(any("Cannot look up" in str(e.get("log_format")) for e in events))
        self.flushLoggedErrors(IsADirectoryError, UnauthorizedLogin)


class _FakeBroker:
    """
    What a LoginGuard reads of a broker: its peer's address.
    """

    disconnected = False

    def __init__(self, host: str) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
