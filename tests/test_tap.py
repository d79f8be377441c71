"""
Tests for ``twistd pbroker``'s options and service (pbroker.tap), over loopback.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from twisted.cred.credentials import Anonymous, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import SynchronousTestCase, TestCase

import pbroker
from pbroker import pb, tap
from pbroker.passwords import PasswordFile

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

    def test_loginOptions(self) -> None:
        """--auth, --password-file and --anonymous each turn the root into a portal."""
        self.assertTrue(self.parse("--auth", "memory:alice:secret").wantsLogin)
        self.assertTrue(self.parse("--password-file", "p").wantsLogin)
        self.assertTrue(self.parse("--anonymous").wantsLogin)
        with self.assertRaises(usage.UsageError):
            self.parse("--auth", "no-such-kind:x")

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

    def test_tlsOptionsGoTogether(self) -> None:
        """--tls-port needs a certificate and key; the others need --tls-port."""
        with self.assertRaises(usage.UsageError):
            self.parse("--tls-port", "8790")
        with self.assertRaises(usage.UsageError):
            self.parse("--tls-certificate", "c.pem")
        options = self.parse("--tls-port", "8790", "--tls-certificate", "c", "--tls-key", "k")
        self.assertEqual(options["listen"], [])


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
        """--auth memory: logs users in with the legacy exchange, from either kind of client."""
        port = await self.start("--auth", "memory:alice:secret")
        for module in (pb, twistedPb):
            factory = await self.connect(port, module)
            avatar = await factory.login(UsernamePassword(b"alice", b"secret"))
            self.assertEqual((await avatar.callRemote("info"))["user"], "alice")
        factory = await self.connect(port)
        with self.assertRaises(pb.RemoteError):
            await factory.login(UsernamePassword(b"alice", b"wrong"))

    async def test_passwordFileWithoutLegacy(self) -> None:
        """--password-file with --no-legacy-login: pbroker clients only."""
        path = self.mktemp()
        PasswordFile(path).setPassword("bob", b"pw", iterations=1000)
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
        """A --root that cannot be loaded, or is not a root, is a usage error."""
        for name in ("tests.test_tap.NoSuchThing", "tests.test_tap.LOOPBACK"):
            options = tap.Options()
            options.parseOptions(["--root", name])
            with self.assertRaises(usage.UsageError):
                tap.makeService(options)

    async def test_anonymous(self) -> None:
        """--anonymous allows anonymous login."""
        factory = await self.connect(await self.start("--anonymous"))
        avatar = await factory.login(Anonymous())
        self.assertEqual((await avatar.callRemote("info"))["user"], "anonymous")


class EchoRoot(pb.Root):
    """
    An application root for --root.
    """

    def remote_echo(self, value: Any) -> Any:
        return value


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
            options = tap.Options()
            options.parseOptions(pluginArguments)
            self.assertTrue(options["listen"] or options["tls-port"], line)
