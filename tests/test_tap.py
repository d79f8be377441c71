"""
Tests for ``twistd pbroker``'s options and service (pbroker.tap), over loopback.
"""

from __future__ import annotations

import builtins
import io
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse as Memory
from twisted.cred.credentials import Anonymous, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import IResource

import pbroker
from pbroker import pb, tap
from pbroker.cred import PortalRoot
from pbroker.passwords import PasswordFile
from tests.test_tls import Authority

LOOPBACK = "tcp:0:interface=127.0.0.1"


class OptionsTests(SynchronousTestCase):
    def parse(self, *arguments: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(arguments))
        return options

    def test_defaults(self) -> None:
        """Without options: loopback port 8789, no login, tracebacks kept, legacy allowed."""
        options = self.parse()
        self.assertEqual(options["listen"], ["tcp:8789:interface=127.0.0.1"])
        self.assertFalse(options.wantsLogin)
        self.assertFalse(options["unsafe-tracebacks"])
        self.assertFalse(options["no-legacy-login"])

    def test_severalListen(self) -> None:
        """--listen repeats."""
        options = self.parse("--listen", "tcp:1:interface=127.0.0.1", "-l", "unix:/tmp/x")
        self.assertEqual(options["listen"], ["tcp:1:interface=127.0.0.1", "unix:/tmp/x"])

    def emptyPasswordFile(self) -> str:
        path = self.mktemp()
        Path(path).write_bytes(b"")
        return path

    def assertUsageError(self, expected: str, *arguments: str) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            self.parse(*arguments)
        self.assertIn(expected, str(raised.exception))

    def test_loginOptions(self) -> None:
        """--auth, --password-file and --anonymous each turn the root into a portal."""
        self.assertTrue(self.parse("--auth", "memory:alice:secret").wantsLogin)
        self.assertTrue(self.parse("--password-file", self.emptyPasswordFile()).wantsLogin)
        self.assertTrue(self.parse("--anonymous").wantsLogin)
        with self.assertRaises(usage.UsageError):
            self.parse("--auth", "no-such-kind:x")

    def test_passwordFileChecked(self) -> None:
        """A password file that is missing, a directory or unreadable as one is a usage error
        at startup, naming the problem."""
        missing = self.mktemp()
        self.assertUsageError(f"{missing}: no such file", "--password-file", missing)
        directory = self.mktemp()
        Path(directory).mkdir()
        self.assertUsageError(
            f"--password-file {directory}: is a directory, not a file", "--password-file", directory
        )
        self.assertUsageError(
            "--password-file /dev/null: is not a regular file", "--password-file", "/dev/null"
        )
        malformed = self.mktemp()
        Path(malformed).write_text("this is not a password line\n")
        self.assertUsageError(f"--password-file {malformed}: ", "--password-file", malformed)

    def test_emptyValuesRefused(self) -> None:
        """An empty --password-file or --root (an unset shell variable, say) is a usage error:
        taken as not given, it would serve the defaults, anonymous logins among them."""
        for option in ("--password-file", "--root"):
            self.assertUsageError(f"{option} needs a value, not an empty one", option, "")

    def test_passwordFileUnderRundir(self) -> None:
        """A relative --password-file is looked for where twistd will read it: under its
        --rundir."""
        rundir = self.mktemp()
        Path(rundir).mkdir()
        Path(rundir, "users").write_bytes(b"")
        options = tap.Options()
        options.parent = {"rundir": rundir, "chroot": None}  # as twistd's ServerOptions
        options.parseOptions(["--password-file", "users"])
        self.assertEqual(options["password-file"], "users")  # still read relative to rundir
        missing = tap.Options()
        missing.parent = {"rundir": rundir, "chroot": None}
        with self.assertRaises(usage.UsageError) as raised:
            missing.parseOptions(["--password-file", "other"])
        self.assertIn("read from --rundir", str(raised.exception))

    def test_filesInsideAChrootNotChecked(self) -> None:
        """Inside twistd's --chroot the --password-file and --auth file: paths cannot be
        looked into before twistd changes root: they are taken as given, not refused."""
        missing = self.mktemp()
        for arguments in (["--password-file", missing], ["--auth", f"file:{missing}"]):
            options = tap.Options()
            options.parent = {"rundir": ".", "chroot": self.mktemp()}  # as twistd's
            options.parseOptions(arguments)
            self.assertEqual(options["listen"], [tap.DEFAULT_LISTEN])
            self.assertTrue(options.wantsLogin)
        self.assertEqual(options["credCheckers"][0].filename, missing)

    def test_loginOptionsThatCannotWork(self) -> None:
        """Combinations that would leave some users unable to log in, or options that would
        be ignored, are refused."""
        path = self.emptyPasswordFile()
        self.assertUsageError(
            "cannot be combined", "--password-file", path, "--auth", "memory:bob:pw"
        )
        self.parse("--password-file", path, "--auth", "anonymous")  # no accounts: fine
        self.assertUsageError("which no PB login sends", "--auth", "unix")
        for extra in (["--auth", "memory:a:b"], ["--password-file", path], ["--anonymous"]):
            self.assertUsageError("do not apply", "--root", "pbroker.tap.BrokerRoot", *extra)
        self.assertUsageError(
            "only when --root names a Portal",
            "--root",
            "pbroker.tap.BrokerRoot",
            "--no-legacy-login",
        )

    def test_nonsenseValuesRefused(self) -> None:
        """Values that cannot work are usage errors at startup, not tracebacks."""
        self.assertUsageError("--listen bogus:1", "--listen", "bogus:1")
        self.assertUsageError("escapes nothing", "--listen", "tcp:8789\\")
        # An IPv6 address whose colons split the string: the hint says how to write them.
        self.assertUsageError(
            "(a colon in a value is written \\:, as in interface=\\:\\:1)",
            "--listen",
            "tcp:8789:interface=::1",
        )
        self.assertEqual(len(self.parse("--listen", "tcp:0:interface=\\:\\:1")["endpoints"]), 1)
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--listen", "tcp:port=abc:interface=127.0.0.1")
        self.assertNotIn("colon in a value", str(raised.exception))  # (no IPv6 there)
        self.assertUsageError("--keepalive", "--keepalive", "inf")
        self.assertUsageError("--keepalive", "--keepalive", "nan")
        self.assertUsageError("at least 0.001", "--keepalive", "1e-300")
        self.assertUsageError("--max-message-size", "--max-message-size", "inf")
        self.assertUsageError("at least 1024 bytes", "--max-message-size", "1e-9")
        self.assertUsageError("at least 1024 bytes", "--max-message-size", "0.0009")
        self.assertEqual(self.parse("--max-message-size", "0.001")["limits"].messageSize, 1048)
        # Past what a limit can be (2**63 bytes), or a float overflowing: a usage error too.
        for huge in ("9e15", "1e308"):
            self.assertUsageError("below 2**63 bytes", "--max-message-size", huge)
        self.assertUsageError(
            "not a port number", "--tls-port", "-5", "--tls-certificate", "c", "--tls-key", "k"
        )
        # Not a number: the error names the option.
        self.assertUsageError("--keepalive needs a number, not 'abc'", "--keepalive", "abc")
        self.assertUsageError(
            "--max-message-size needs a number, not 'x'", "--max-message-size", "x"
        )
        self.assertUsageError(
            "--tls-port needs a whole number, not '1.5'",
            "--tls-port",
            "1.5",
            "--tls-certificate",
            "c",
            "--tls-key",
            "k",
        )

    def test_keepaliveAndMessageSize(self) -> None:
        """--keepalive and --max-message-size reach the factory; nonsense is refused."""
        options = self.parse("--keepalive", "10", "--max-message-size", "64")
        service = tap.makeService(options)
        factory = next(iter(service)).factory
        self.assertEqual(factory.keepalive, pb.Keepalive(interval=10, timeout=30))
        self.assertEqual(factory.limits.messageSize, 64 * 1024 * 1024)
        for bad in (["--keepalive", "0"], ["--max-message-size", "-1"]):
            with self.assertRaises(usage.UsageError):
                self.parse(*bad)

    def test_rootPortalWithoutLegacyLogin(self) -> None:
        """--no-legacy-login reaches the factory's wrapper of a Portal named by --root; the
        default keeps the legacy login, and a root of another kind gets neither option."""
        for extra, legacy in (([], True), (["--no-legacy-login"], False)):
            options = self.parse("--root", "tests.test_tap.echoPortal", *extra)
            factory = next(iter(tap.makeService(options))).factory
            self.assertIsInstance(factory.root, PortalRoot)
            self.assertIs(factory.root.legacyLogin, legacy)
        options = self.parse("--root", "tests.test_tap.EchoRoot")
        self.assertIsInstance(next(iter(tap.makeService(options))).factory.root, EchoRoot)

    def test_tlsOptionsGoTogether(self) -> None:
        """--tls-port needs a certificate and key; the others need --tls-port."""
        with self.assertRaises(usage.UsageError):
            self.parse("--tls-port", "8790")
        with self.assertRaises(usage.UsageError):
            self.parse("--tls-certificate", "c.pem")
        authority = Authority(self.mktemp(), "ca")
        certificate, key = authority.issue("localhost")
        options = self.parse(
            "--tls-port", "8790", "--tls-certificate", certificate, "--tls-key", key
        )
        self.assertEqual(options["listen"], [])

    def test_tlsFilesChecked(self) -> None:
        """Missing or unusable TLS files are usage errors at startup, naming the file."""
        authority = Authority(self.mktemp(), "ca")
        certificate, key = authority.issue("localhost")
        missing = self.mktemp()
        for arguments in (
            ["--tls-certificate", missing, "--tls-key", key],
            ["--tls-certificate", certificate, "--tls-key", missing],
            ["--tls-certificate", certificate, "--tls-key", key, "--tls-client-ca", missing],
        ):
            self.assertUsageError(missing, "--tls-port", "8790", *arguments)
        # A file that holds no certificate, or no key, is named (rather than OpenSSL's list).
        garbage = self.mktemp()
        Path(garbage).write_text("not PEM\n")
        for arguments, named in (
            (["--tls-certificate", certificate, "--tls-key", certificate], f"in {certificate!r}"),
            (["--tls-certificate", garbage, "--tls-key", key], f"no certificate in {garbage!r}"),
            (
                ["--tls-certificate", certificate, "--tls-key", garbage],
                f"key that can be read in {garbage!r}",
            ),
        ):
            self.assertUsageError(named, "--tls-port", "8790", *arguments)


class ServiceTests(TestCase):
    timeout = 60

    async def start(self, *arguments: str) -> int:
        options = tap.Options()
        options.parseOptions(["--listen", LOOPBACK, *arguments])
        service = tap.makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        [listener] = list(service)
        port = await listener._waitingForPort
        return int(port.getHost().port)

    async def connect(self, port: int, module: Any = pb) -> Any:
        factory = module.PBClientFactory()
        connector = reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]

        def disconnect() -> defer.Deferred[None]:
            done: defer.Deferred[None] = defer.Deferred()
            broker = factory._broker
            if broker is None or broker.disconnected:
                connector.disconnect()
                return defer.succeed(None)
            broker.notifyOnDisconnect(lambda: done.callback(None))
            connector.disconnect()
            return done

        self.addCleanup(disconnect)
        await factory.getRootObject()
        return factory

    async def test_defaultRoot(self) -> None:
        """The default root answers ping and info, and lets a client log in anonymously."""
        factory = await self.connect(await self.start())
        root = await factory.getRootObject()
        self.assertEqual(await root.callRemote("ping"), "pong")
        info = await root.callRemote("info")
        self.assertEqual(info["version"], pbroker.__version__)
        self.assertEqual(info["protocol"], 6)
        self.assertEqual(await root.callRemote("services"), [])
        avatar = await factory.login(Anonymous())
        self.assertEqual((await avatar.callRemote("info"))["user"], "anonymous")
        self.assertEqual(await avatar.callRemote("services"), [])

    async def test_noAnonymousWithAccounts(self) -> None:
        """With accounts configured, anonymous login needs --anonymous."""
        factory = await self.connect(await self.start("--auth", "memory:alice:secret"))
        root = await factory.getRootObject()
        self.assertEqual(await root.callRemote("ping"), "pong")
        with self.assertRaises(pb.RemoteError):
            await factory.login(Anonymous())

    async def test_stockClientOfDefaultRoot(self) -> None:
        """A stock Twisted client calls the default root too."""
        factory = await self.connect(await self.start(), twistedPb)
        root = await factory.getRootObject()
        self.assertEqual(await root.callRemote("ping"), "pong")

    async def test_authMemory(self) -> None:
        """--auth memory: logs users in with the legacy exchange, from either kind of client,
        which may send the username as bytes or as text."""
        port = await self.start("--auth", "memory:alice:secret")
        for module in (pb, twistedPb):
            for username in (b"alice", "alice"):
                factory = await self.connect(port, module)
                avatar = await factory.login(UsernamePassword(username, b"secret"))
                self.assertEqual((await avatar.callRemote("info"))["user"], "alice")
        factory = await self.connect(port)
        with self.assertRaises(pb.RemoteError):
            await factory.login(UsernamePassword(b"alice", b"wrong"))

    async def test_authFile(self) -> None:
        """--auth file: logs in the users of a Twisted users file (its checker keeps bytes
        usernames already), from either kind of client."""
        path = self.mktemp()
        Path(path).write_bytes(b"alice:secret\n")
        port = await self.start("--auth", f"file:{path}")
        for module in (pb, twistedPb):
            factory = await self.connect(port, module)
            avatar = await factory.login(UsernamePassword(b"alice", b"secret"))
            self.assertEqual((await avatar.callRemote("info"))["user"], "alice")
        factory = await self.connect(port)
        with self.assertRaises(pb.RemoteError) as raised:
            await factory.login(UsernamePassword(b"alice", b"wrong"))
        self.assertEqual(raised.exception.remoteType, b"twisted.cred.error.UnauthorizedLogin")

    async def test_authRepeated(self) -> None:
        """Several --auth options of one kind all log their users in (a Portal keeps one
        checker per kind of credentials: each is tried in turn); a user none knows, or a
        wrong password, is refused."""
        path = self.mktemp()
        Path(path).write_bytes(b"carol:c\n")
        port = await self.start(
            "--auth", "memory:alice:a", "--auth", f"file:{path}", "--auth", "memory:bob:b"
        )
        for module in (pb, twistedPb):
            for name, password in (("alice", b"a"), ("bob", b"b"), ("carol", b"c")):
                factory = await self.connect(port, module)
                avatar = await factory.login(UsernamePassword(name.encode(), password))
                self.assertEqual((await avatar.callRemote("info"))["user"], name)
        for name, password in ((b"alice", b"b"), (b"dave", b"d")):
            factory = await self.connect(port)
            with self.assertRaises(pb.RemoteError) as raised:
                await factory.login(UsernamePassword(name, password))
            self.assertEqual(raised.exception.remoteType, b"twisted.cred.error.UnauthorizedLogin")

    def test_checkersOfOneKindInTurn(self) -> None:
        """The checkers of one kind are tried in turn past a refusal of any kind (one that
        does not handle the credentials too); another error fails the login."""

        class Refusing:
            credentialInterfaces = (IUsernamePassword,)

            def __init__(self, error: Exception) -> None:
                self.error = error

            def requestAvatarId(self, credentials: Any) -> Any:
                raise self.error

        good = Memory(alice=b"a")
        for first, outcome in [
            (Refusing(UnhandledCredentials("not mine")), b"alice"),
            (Refusing(UnauthorizedLogin("no")), b"alice"),
            (Refusing(ValueError("db down")), ValueError),
        ]:
            checker = tap._FirstOf(IUsernamePassword, [first, good])
            result = checker.requestAvatarId(UsernamePassword(b"alice", b"a"))
            if isinstance(outcome, bytes):
                self.assertEqual(self.successResultOf(result), outcome)
            else:
                self.failureResultOf(result, outcome)
        both = tap._FirstOf(IUsernamePassword, [Memory(bob=b"b"), good])
        self.failureResultOf(
            both.requestAvatarId(UsernamePassword(b"carol", b"c")), UnauthorizedLogin
        )

    async def test_passwordFileWithoutLegacy(self) -> None:
        """--password-file with --no-legacy-login: pbroker clients only."""
        path = self.mktemp()
        PasswordFile(path).setPassword("bob", b"pw", iterations=4096)
        port = await self.start("--password-file", path, "--no-legacy-login")
        factory = await self.connect(port)
        avatar = await factory.login(UsernamePassword(b"bob", b"pw"))
        self.assertEqual(await avatar.callRemote("ping"), "pong")
        stock = await self.connect(port, twistedPb)
        failure = None
        try:
            await stock.login(UsernamePassword(b"bob", b"pw"))
        except Exception as e:
            failure = e
        self.assertIsNotNone(failure)
        self.flushLoggedErrors(UnauthorizedLogin)

    async def test_brokerRootByName(self) -> None:
        """--root pbroker.tap.BrokerRoot serves introspection without any login."""
        factory = await self.connect(await self.start("--root", "pbroker.tap.BrokerRoot"))
        root = await factory.getRootObject()
        self.assertEqual(await root.callRemote("ping"), "pong")
        self.assertEqual((await root.callRemote("info"))["protocol"], 6)

    async def test_root(self) -> None:
        """--root serves an application's own root object, made by a callable."""
        port = await self.start("--root", "tests.test_tap.EchoRoot")
        factory = await self.connect(port)
        root = await factory.getRootObject()
        self.assertEqual(await root.callRemote("echo", 5), 5)

    def test_badRoot(self) -> None:
        """A --root that cannot be loaded, or is not a root, is a usage error when the
        options are parsed (twistd prints it as one, without a traceback)."""
        for name in ("tests.test_tap.NoSuchThing", "tests.test_tap.LOOPBACK"):
            options = tap.Options()
            with self.assertRaises(usage.UsageError):
                options.parseOptions(["--root", name])

    def test_noLegacyLoginWithAccountsRefused(self) -> None:
        """--auth accounts log in only through the legacy MD5 login: with --no-legacy-login
        nobody could use them, so the combination is a usage error, not a broker that
        refuses every login."""
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--auth", "memory:alice:secret", "--no-legacy-login"])
        self.assertIn("nobody could log in", str(raised.exception))

    def test_missingAuthFileRefused(self) -> None:
        """An --auth file: that does not exist is a usage error, not a warning and a broker
        that refuses every login."""
        missing = self.mktemp()
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--auth", f"file:{missing}"])
        self.assertIn(f"--auth: no such file: {missing}", str(raised.exception))
        directory = self.mktemp()
        Path(directory).mkdir()
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--auth", f"file:{directory}"])
        self.assertIn(f"--auth: is a directory, not a file: {directory}", str(raised.exception))
        # One that cannot be opened (as root, whom modes do not stop, the refusal is made).
        unreadable = self.mktemp()
        Path(unreadable).write_text("alice:secret\n")
        real = builtins.open

        def refusing(file: Any, *args: Any, **kw: Any) -> Any:
            if file == unreadable:
                raise PermissionError(13, "Permission denied", unreadable)
            return real(file, *args, **kw)

        self.patch(builtins, "open", refusing)
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--auth", f"file:{unreadable}"])
        self.assertIn(f"--auth: Permission denied: {unreadable}", str(raised.exception))

    def test_failingRootCallableIsAUsageError(self) -> None:
        """A --root callable that raises is a usage error naming it, not a traceback."""
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--root", "tests.test_tap.failingRoot"])
        self.assertIn("cannot load --root tests.test_tap.failingRoot", str(raised.exception))
        self.assertIn("boom", str(raised.exception))

    def test_rootModuleNotImportable(self) -> None:
        """A --root whose module cannot be imported says so, and where to put it, rather
        than that the name names no object (twistd does not look in the current
        directory)."""
        with self.assertRaises(usage.UsageError) as raised:
            tap.Options().parseOptions(["--root", "noSuchModuleHere.root"])
        self.assertIn("cannot load --root noSuchModuleHere.root", str(raised.exception))
        self.assertIn("no module 'noSuchModuleHere' can be imported", str(raised.exception))
        self.assertIn("PYTHONPATH", str(raised.exception))

    def test_tlsPortInUseStopsStartup(self) -> None:
        """A --tls-port that cannot be listened on stops the service from starting, as a
        busy --listen port does, instead of leaving it running without TLS."""
        busy = reactor.listenTCP(0, pb.PBServerFactory(pb.Root()), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(busy.stopListening)
        authority = Authority(self.mktemp(), "ca")
        certificate, key = authority.issue("localhost")
        options = tap.Options()
        options.parseOptions(
            [
                "--tls-port",
                str(busy.getHost().port),
                "--tls-certificate",
                certificate,
                "--tls-key",
                key,
            ]
        )
        service = tap.makeService(options)
        with self.assertRaises(tap.CannotListen) as raised:
            service.privilegedStartService()
        self.assertIn(f"cannot listen on --tls-port {busy.getHost().port}", str(raised.exception))
        self.assertIn("Address already in use", str(raised.exception))
        service.stopService()

    def test_sameListenTwice(self) -> None:
        """The same --listen given twice starts (two ports), as it did before."""
        options = tap.Options()
        options.parseOptions(["--listen", LOOPBACK, "--listen", LOOPBACK])
        service = tap.makeService(options)
        service.privilegedStartService()
        self.addCleanup(service.stopService)

    def test_cannotListenNamesThePath(self) -> None:
        """A UNIX socket in a directory that does not exist is named by its path (Twisted's
        lock file is a symbolic link, whose first path is a process id)."""
        missing = os.path.join(self.mktemp(), "sock")
        options = tap.Options()
        options.parseOptions(["--listen", f"unix:{missing}"])
        service = tap.makeService(options)
        with self.assertRaises(tap.CannotListen) as raised:
            service.privilegedStartService()
        self.assertIn(f"No such file or directory: {missing}.lock", str(raised.exception))
        service.stopService()

    def test_authFileReadFromTheRunDirectory(self) -> None:
        """An --auth file: path is checked where twistd will read it: in --rundir."""
        rundir = self.mktemp()
        os.makedirs(rundir)
        Path(rundir, "users.txt").write_bytes(b"alice:secret\n")
        options = tap.Options()
        options.parent = {"rundir": rundir}  # type: ignore[attr-defined]
        options.parseOptions(["--auth", "file:users.txt"])
        options = tap.Options()
        options.parent = {"rundir": self.mktemp()}  # type: ignore[attr-defined]
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["--auth", "file:users.txt"])
        self.assertIn("read from --rundir as", str(raised.exception))

    def test_cannotListenReportedOnOneLine(self) -> None:
        """twistd -n ends with the CannotListen it raises: it is reported on one line, not
        with a traceback; other errors are reported as before."""
        self.patch(sys, "excepthook", lambda *args: reported.append(args))
        reported: list[Any] = []
        options = tap.Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
        tap.makeService(options)
        hook = sys.excepthook
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        hook(tap.CannotListen, tap.CannotListen("cannot listen on --listen x: why"), None)
        self.assertEqual(err.getvalue(), "twistd pbroker: cannot listen on --listen x: why\n")
        error = ValueError("other")
        hook(ValueError, error, None)
        self.assertEqual(reported, [(ValueError, error, None)])
        tap.makeService(options)
        self.assertIs(sys.excepthook, hook)  # installed once

    async def test_anonymous(self) -> None:
        """--anonymous allows anonymous login."""
        factory = await self.connect(await self.start("--anonymous"))
        avatar = await factory.login(Anonymous())
        self.assertEqual((await avatar.callRemote("info"))["user"], "anonymous")


class RealmTests(SynchronousTestCase):
    def test_onlyPerspectives(self) -> None:
        """The default realm, used through a portal by something other than PB, says it
        only gives PB perspectives rather than giving an avatar of the wrong kind."""
        realm = tap.BrokerRealm({"clock": object()})
        with self.assertRaises(NotImplementedError) as raised:
            realm.requestAvatar(b"alice", None, IResource)
        self.assertEqual(str(raised.exception), "this realm only gives PB perspectives")
        interface, avatar, logout = realm.requestAvatar(b"alice", None, IResource, pb.IPerspective)
        self.assertIs(interface, pb.IPerspective)
        self.assertEqual(avatar.name, "alice")
        self.assertEqual(avatar.perspective_services(), ["clock"])
        self.assertIsNone(logout())


class EchoRoot(pb.Root):
    """
    An application root for --root.
    """

    def remote_echo(self, value: Any) -> Any:
        return value


def echoPortal() -> Portal:
    """
    A Portal for --root, whose realm and checkers the tests above do not use.
    """
    return Portal(tap.BrokerRealm({}), [])


class DocumentedCommandLineTests(SynchronousTestCase):
    def test_twistdPageCommandLines(self) -> None:
        """Every twistd command line on docs/twistd.rst parses with the plugin's options."""
        page = Path(__file__).parent.parent / "docs" / "twistd.rst"
        lines = [
            line.strip()
            for line in page.read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("twistd ") and " pbroker" in line
        ]
        self.assertGreaterEqual(len(lines), 3)
        for line in lines:
            words = shlex.split(line.split("#")[0])
            pluginArguments = words[words.index("pbroker") + 1 :]
            if "--password-file" in pluginArguments:
                # The page's path stands for a real password file: parsing reads it.
                stand = self.mktemp()
                Path(stand).write_bytes(b"")
                pluginArguments[pluginArguments.index("--password-file") + 1] = stand
            for index, argument in enumerate(pluginArguments):
                if argument.startswith("file:"):
                    # So does the path of an --auth file: users file.
                    users = self.mktemp()
                    Path(users).write_bytes(b"alice:secret\n")
                    pluginArguments[index] = f"file:{users}"
            options = tap.Options()
            options.parseOptions(pluginArguments)
            self.assertTrue(options["listen"] or options["tls-port"], line)


def failingRoot() -> None:
    """A --root callable that fails."""
    raise RuntimeError("boom")
