"""
Tests for the ``pbroker`` command line, run as ``python -m pbroker`` against brokers listening
on 127.0.0.1 in the test's reactor.
"""

from __future__ import annotations

import argparse
import datetime
import doctest
import getpass
import io
import ipaddress
import json
import os
import shlex
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import twisted.internet
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.checkers import (
    AllowAnonymousAccess,
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.portal import Portal
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import UNIXClientEndpoint, clientFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.spread import jelly as twistedJelly
from twisted.spread import pb as twistedPb
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from pbroker import cli, jelly, pb, tls
from pbroker.cred import NO_PASSWORD_ACCOUNTS
from pbroker.passwords import MIN_ITERATIONS, PasswordFile, ScramChecker
from pbroker.stream import RemoteStream
from pbroker.tap import BrokerRealm


class Service(pb.Root):
    def remote_echo(self, *values: Any) -> Any:
        return list(values)

    def remote_fail(self, message: str) -> None:
        raise ValueError(message)

    def remote_ping(self) -> str:
        return "pong"

    def remote_info(self) -> dict[str, Any]:
        return {"name": "test", "bytes": b"\xff"}

    def remote_hang(self) -> Deferred[None]:
        return Deferred()


class CommandLineTests(TestCase):
    timeout = 60

    async def serve(self, root: Any) -> int:
        port = await pb.listen("tcp:0:interface=127.0.0.1", pb.PBServerFactory(root))
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def command(self, *arguments: str, password: str | None = None) -> tuple[int, str, str]:
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        if password is not None:
            environment["PBROKER_PASSWORD"] = password
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "pbroker", *arguments], env=environment
        )
        return code, out.decode(), err.decode()

    def assertOneLine(self, text: str, fragment: str) -> None:
        self.assertEqual(len(text.strip().splitlines()), 1, text)
        self.assertIn(fragment, text)
        self.assertTrue(text.startswith("pbroker: "), text)

    async def test_pingInfoCall(self) -> None:
        """ping, info and call print their results, and --json prints JSON."""
        port = await self.serve(Service())
        address = f"pb://127.0.0.1:{port}"
        code, out, _ = await self.command("ping", address)
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("pong ("))
        code, out, _ = await self.command("--json", "info", address)
        self.assertEqual(json.loads(out)["result"], {"name": "test", "bytes": {"bytes": "ff"}})
        code, out, _ = await self.command(
            "--json", "call", address, "echo", '"a"', "[1, 2]", "null"
        )
        self.assertEqual((code, json.loads(out)["result"]), (0, ["a", [1, 2], None]))
        code, out, _ = await self.command("call", f"tcp:127.0.0.1:{port}", "echo", "3")
        self.assertEqual((code, out.strip()), (0, "[3]"))

    async def test_interruptedWhileCalling(self) -> None:
        """Ctrl-C (SIGINT) or SIGTERM while a call waits says "interrupted" and exits 3: the
        reactor drops the connection as it stops, which is not the server's doing."""
        for signal in ("INT", "TERM"):
            called: Deferred[None] = Deferred()
            port = await self.serve(_Hanging(called))
            ended = _Ended()
            process = reactor.spawnProcess(
                ended,
                sys.executable,
                [sys.executable, "-m", "pbroker", "call", f"pb://127.0.0.1:{port}", "hang"],
                env=dict(os.environ),
            )
            await called
            process.signalProcess(signal)
            code = await ended.ended
            self.assertEqual((code, ended.err.decode()), (3, "pbroker: interrupted\n"), signal)

    async def test_tlsHandshakeFailuresSaidInWords(self) -> None:
        """A TLS handshake that fails is said in words with a hint, not as OpenSSL's list of
        tuples: pbs:// to a plain port, and a server whose CA is not trusted."""
        from tests.test_tls import Authority

        directory = self.mktemp()
        os.makedirs(directory)
        authority = Authority(directory, "ca")
        plain = await self.serve(Service())
        code, _out, err = await self.command(
            "--timeout", "10", "--ca", authority.pem, "ping", f"pbs://127.0.0.1:{plain}"
        )
        self.assertEqual(code, cli.EXIT_CONNECTION)
        # (Either words: a plain port may drop the TLS hello before the client reads its
        # reply as TLS.)
        self.assertOneLine(err, "use pb://)")
        self.assertNotIn("[('SSL routines'", err)
        certificate, key = authority.issue("localhost", ("localhost",))
        listening = await pb.listen(
            tls.serverEndpoint(reactor, 0, certificate, key), pb.PBServerFactory(Service())
        )
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        other = Authority(os.path.join(directory, "other"), "other")
        code, _out, err = await self.command(
            "--timeout", "10", "--ca", other.pem, "ping", f"pbs://localhost:{port}"
        )
        self.assertEqual(code, cli.EXIT_CONNECTION)
        self.assertOneLine(
            err, "certificate verify failed (the server's certificate is not trusted"
        )
        code, _out, err = await self.command(
            "--timeout", "10", "--ca", authority.pem, "ping", f"pbs://127.0.0.1:{port}"
        )
        self.assertEqual(code, cli.EXIT_CONNECTION)
        self.assertOneLine(err, "the server's certificate does not name this host (or address)")
        # Certificates whose name cannot be checked are refused, saying which: one with no
        # subjectAltName, and one whose subjectAltName cannot be read (an address as a DNS
        # name).
        for name, hostNames, host, said, notSaid in (
            ("bare", (), "localhost", "server certificates need a subjectAltName", None),
            (
                "misnamed",
                ("127.0.0.1",),
                "127.0.0.1",
                "an address goes in as IP:, not DNS:",
                "need a subjectAltName",
            ),
        ):
            certificate, key = authority.issue(name, hostNames)
            listening = await pb.listen(
                tls.serverEndpoint(reactor, 0, certificate, key), pb.PBServerFactory(Service())
            )
            self.addCleanup(listening.stopListening)
            address = f"pbs://{host}:{listening.getHost().port}"
            code, _out, err = await self.command(
                "--timeout", "10", "--ca", authority.pem, "ping", address
            )
            self.assertEqual(code, cli.EXIT_CONNECTION)
            self.assertOneLine(err, said)
            if notSaid is not None:
                self.assertNotIn(notSaid, err)

    async def test_remoteError(self) -> None:
        """A remote exception exits 5 with one line naming it; --debug adds a traceback."""
        port = await self.serve(Service())
        code, out, err = await self.command("call", f"pb://127.0.0.1:{port}", "fail", '"boom"')
        self.assertEqual(code, cli.EXIT_REMOTE)
        self.assertOneLine(err, "remote error: builtins.ValueError: boom")
        self.assertEqual(out, "")
        code, _, err = await self.command("--debug", "call", f"pb://127.0.0.1:{port}", "nope")
        self.assertEqual(code, cli.EXIT_REMOTE)
        self.assertIn("Traceback", err)
        self.flushLoggedErrors(ValueError)

    async def test_badArguments(self) -> None:
        """A bad address or a bad JSON argument exits 2 with one line."""
        port = await self.serve(Service())
        code, _, err = await self.command("call", f"pb://127.0.0.1:{port}", "echo", "{not json")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertOneLine(err, "argument 1 is not valid JSON")
        for address, message in (
            ("nowhere", "not an address"),
            ("ftp://host", "unknown scheme"),
            ("pb://host:99999", "bad port"),
        ):
            code, _, err = await self.command("ping", address)
            self.assertEqual(code, cli.EXIT_USAGE, err)
            self.assertOneLine(err, message)

    async def test_refusedConnection(self) -> None:
        """Nothing listening: exit 3, one line."""
        code, _, err = await self.command("ping", "pb://127.0.0.1:1")
        self.assertEqual(code, cli.EXIT_CONNECTION)
        self.assertOneLine(err, "cannot connect to pb://127.0.0.1:1")

    async def test_timeout(self) -> None:
        """--timeout bounds the whole command: a server that accepts and never speaks, or a
        call never answered, exits with one line that says so."""
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        address = f"pb://127.0.0.1:{silent.getHost().port}"
        code, _, err = await self.command("--timeout", "0.5", "ping", address)
        self.assertEqual(code, cli.EXIT_CONNECTION)
        self.assertOneLine(
            err,
            f"cannot connect to {address}: no answer within 0.5 seconds (if it is a TLS port, "
            "use pbs://)",
        )
        port = await self.serve(Service())
        code, _, err = await self.command(
            "--timeout", "0.5", "call", f"pb://127.0.0.1:{port}", "hang"
        )
        self.assertEqual(code, cli.EXIT_REMOTE)
        self.assertOneLine(err, "hang failed: no answer within 0.5 seconds")

    async def test_usageErrors(self) -> None:
        """An unknown command or a missing argument is one line too, and exits 2."""
        for arguments in (["bogus"], ["call", "pb://127.0.0.1:1"], ["--timeout"]):
            code, _, err = await self.command(*arguments)
            self.assertEqual(code, cli.EXIT_USAGE, err)
            self.assertOneLine(err, "pbroker --help shows the usage")

    async def test_ipv6(self) -> None:
        """pb://[::1]:PORT and pbs://[::1]:PORT (with --ca) reach a broker on ::1."""
        port = await pb.listen("tcp6:0:interface=\\:\\:1", pb.PBServerFactory(Service()))
        self.addCleanup(port.stopListening)
        code, out, err = await self.command("ping", f"pb://[::1]:{port.getHost().port}")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("pong ("), out)
        certificate, key = selfSignedCertificate(self.mktemp(), "::1")
        endpoint = tls.serverEndpoint(reactor, 0, certificate, key, interface="::1")
        tlsPort = await pb.listen(endpoint, pb.PBServerFactory(Service()))
        self.addCleanup(tlsPort.stopListening)
        address = f"pbs://[::1]:{tlsPort.getHost().port}"
        code, out, err = await self.command("--ca", certificate, "ping", address)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("pong ("), out)

    async def test_badInputsAreUsageErrors(self) -> None:
        """Bad addresses, a missing --ca file, a bad --timeout and a JSON argument nested too
        deeply exit 2 with one line, before connecting."""
        missing = os.path.abspath(self.mktemp())
        cases = [
            (["ping", "localhost:1"], "bad address 'localhost:1'"),
            (["ping", "tcp:nonsense"], "bad address 'tcp:nonsense'"),
            (["ping", "pb://::1:8789"], "an IPv6 address goes in brackets"),
            (["--ca", missing, "ping", "pbs://127.0.0.1:1"], f"CA file {missing!r}"),
            (["--timeout", "nan", "ping", "pb://127.0.0.1:1"], "'nan'"),
            (["--timeout", "-1", "ping", "pb://127.0.0.1:1"], "'-1'"),
            (["call", "pb://127.0.0.1:1", "echo", "[" * 100000], "nested too deeply"),
            (["--user", "", "ping", "pb://127.0.0.1:1"], "--user needs a user name"),
        ]
        results = await gatherResults([ensureDeferred(self.command(*a)) for a, _ in cases])
        for (arguments, fragment), (code, out, err) in zip(cases, results, strict=True):
            self.assertEqual((code, out), (cli.EXIT_USAGE, ""), (arguments[:3], err))
            self.assertOneLine(err, fragment)

    async def test_login(self) -> None:
        """--user logs in with PBROKER_PASSWORD; a wrong password exits 4; no password and no
        terminal is a usage error."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        port = await self.serve(Portal(BrokerRealm(), [checker]))
        address = f"pb://127.0.0.1:{port}"
        code, out, err = await self.command(
            "--user", "alice", "--json", "info", address, password="secret"
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["result"]["user"], "alice")
        code, _, err = await self.command("--user", "alice", "ping", address, password="wrong")
        self.assertEqual(code, cli.EXIT_LOGIN)
        self.assertOneLine(err, "login refused for alice")
        code, _, err = await self.command("--user", "alice", "ping", address)
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertOneLine(err, "no password")

    async def test_loginWithBytes(self) -> None:
        """A user name and a password that are not UTF-8 are sent as the bytes given."""
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"b\xff", b"p\xff")
        port = await self.serve(Portal(BrokerRealm(), [checker]))
        user = b"b\xff".decode("utf-8", "surrogateescape")  # as Python shows argv and environ
        password = b"p\xff".decode("utf-8", "surrogateescape")
        address = f"pb://127.0.0.1:{port}"
        code, out, err = await self.command("--user", user, "ping", address, password=password)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("pong ("), out)


def selfSignedCertificate(directory: str, address: str) -> tuple[str, str]:
    """
    Write a self-signed certificate for an IP address and its key; return their paths.
    """
    os.makedirs(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certificatePath = os.path.join(directory, "server.pem")
    keyPath = os.path.join(directory, "server.key")
    Path(certificatePath).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyPEM = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    Path(keyPath).write_bytes(keyPEM)
    return certificatePath, keyPath


@implementer(ICredentialsChecker)
class _NeverAnswers:
    # (What pbroker's password login, and the legacy one, take.)
    credentialInterfaces = InMemoryUsernamePasswordDatabaseDontUse.credentialInterfaces

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred()


class _Hanging(pb.Root):
    def __init__(self, called: Deferred[None]) -> None:
        self.called = called

    def remote_hang(self) -> Deferred[None]:
        self.called.callback(None)
        return Deferred()


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.err = b""
        self.ended: Deferred[int] = Deferred()

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


class AddressTests(SynchronousTestCase):
    def assertUsageError(self, address: str, fragment: str, caFile: str | None = None) -> None:
        with self.assertRaises(cli.CommandError) as caught:
            cli.endpointFor(address, caFile, reactor=reactor)
        self.assertEqual(caught.exception.code, cli.EXIT_USAGE)
        self.assertIn(fragment, str(caught.exception))

    def test_forms(self) -> None:
        """pb:// gives a TCP endpoint string (default port 8789); others are parsed."""
        self.assertEqual(cli.endpointFor("pb://example.org"), "tcp:host=example.org:port=8789")
        self.assertEqual(cli.endpointFor("pb://h:1234/"), "tcp:host=h:port=1234")
        self.assertEqual(cli.endpointFor("PB://h:65535"), "tcp:host=h:port=65535")
        self.assertIsInstance(cli.endpointFor("unix:/run/x.sock"), UNIXClientEndpoint)
        self.assertIsNotNone(cli.endpointFor("pbs://localhost:8790"))
        self.assertUsageError("pb://:80", "no host")

    def test_ipv6(self) -> None:
        """An IPv6 address in brackets has its colons escaped in the endpoint string."""
        for address, port in (("pb://[::1]:1234", 1234), ("pb://[::1]", 8789)):
            description = cli.endpointFor(address)
            self.assertEqual(description, f"tcp:host=\\:\\:1:port={port}")
            assert isinstance(description, str)
            endpoint = clientFromString(reactor, description)
            self.assertEqual((endpoint._host, endpoint._port), ("::1", port))
        self.assertIsNotNone(cli.endpointFor("pbs://[::1]"))

    def test_badIPv6(self) -> None:
        """An IPv6 address without brackets, or a bad one in them, is a usage error."""
        self.assertUsageError("pb://::1:8789", "an IPv6 address goes in brackets")
        self.assertUsageError("pbs://::1", "an IPv6 address goes in brackets")
        self.assertUsageError("pb://[::1:8789", "no ']'")
        self.assertUsageError("pb://[example.org]:1", "bad IPv6 address")
        # Twisted's ssl: client checks no certificate: a password would go to anyone.
        for insecure in ("ssl:host=127.0.0.1:port=8790", "SSL:127.0.0.1:8790:caCertsDir=ca"):
            self.assertUsageError(insecure, "checks neither the server's certificate nor its name")
        self.assertUsageError("pb://[::1]8789", "bad port")

    def test_badHostsAndPorts(self) -> None:
        """Only ASCII digits make a port, and a host is a name or an address."""
        for port in (" 80", "+80", "\u0668\u0660", "0x10", "0", "65536", "80/x"):
            self.assertUsageError(f"pb://h:{port}", "bad port")
        for host in ("a b", "user@h", "h/x", "h\\", "h=1"):
            self.assertUsageError(f"pb://{host}:80", "bad host name")
        # A ':' with no port after it (pb://$HOST:$PORT with PORT unset) is not the default.
        for address in ("pb://127.0.0.1:", "pbs://h:", "pb://[::1]:"):
            self.assertUsageError(address, f"no port after ':' in {address!r}")

    def test_badEndpointStrings(self) -> None:
        """An endpoint string its parser refuses is a usage error naming it."""
        for address in ("localhost:8789", "tcp:nonsense", "tcp:h:p", "tcp:h\\", ":"):
            self.assertUsageError(address, f"bad address {address!r}")
        self.assertUsageError("tcp:h:80\\", "ends with a backslash that escapes nothing")

    def test_caFile(self) -> None:
        """A --ca file that cannot be read or holds no certificate is a usage error naming it;
        so is --ca with an address that is not pbs://."""
        missing = self.mktemp()
        self.assertUsageError("pbs://h", f"cannot read the CA file {missing!r}", missing)
        empty = self.mktemp()
        Path(empty).write_text("hello")
        self.assertUsageError("pbs://h", f"bad CA file {empty!r}", empty)
        garbage = self.mktemp()
        Path(garbage).write_text("-----BEGIN CERTIFICATE-----\n!\n-----END CERTIFICATE-----\n")
        self.assertUsageError("pbs://h", f"bad CA file {garbage!r}", garbage)
        for address in ("pb://h", "tcp:h:1"):
            self.assertUsageError(address, "--ca is for pbs:// addresses only", empty)


class OptionTests(SynchronousTestCase):
    def test_timeout(self) -> None:
        """--timeout takes a finite number of seconds above 0; others are usage errors."""
        self.assertEqual(cli._parser().parse_args(["--timeout", "0.5", "ping", "x"]).timeout, 0.5)
        for text in ("nan", "inf", "-inf", "-1", "0", "soon"):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            with self.assertRaises(SystemExit) as caught:
                cli._parser().parse_args([f"--timeout={text}", "ping", "x"])
            self.assertEqual(caught.exception.code, cli.EXIT_USAGE)
            self.assertIn("argument --timeout: not a", stderr.getvalue())
            self.assertIn(repr(text), stderr.getvalue())

    def test_jsonArguments(self) -> None:
        """JSON arguments that are too deep, too long a number, or hold text that is not
        Unicode are usage errors; others are their values."""
        self.assertEqual(cli._jsonArguments(['"a"', "[1, {}]"]), ["a", [1, {}]])
        [deep] = cli._jsonArguments(["[" * 300 + "]" * 300])
        for _ in range(299):
            deep = deep[0]
        self.assertEqual(deep, [])
        for text, fragment in (
            ("[" * 100000, "argument 2 is nested too deeply"),
            ("[" * 100000 + "]" * 100000, "argument 2 is nested too deeply"),
            ("1" * 5000, "argument 2 is not usable"),
            ('"\\ud800"', "argument 2 holds text that is not valid Unicode"),
            ('"\udcff"', "argument 2 holds text that is not valid Unicode"),
            ("{not json", "argument 2 is not valid JSON"),
        ):
            with self.assertRaises(cli.CommandError) as caught:
                cli._jsonArguments(["1", text])
            self.assertEqual(caught.exception.code, cli.EXIT_USAGE)
            self.assertIn(fragment, str(caught.exception))

    def test_methodName(self) -> None:
        """A method name that is not printable text is a usage error, before connecting."""
        options = argparse.Namespace(
            command="call", method="\udcff", arguments=[], address="pb://127.0.0.1:1"
        )
        failure = self.failureResultOf(ensureDeferred(cli._run(None, options)), cli.CommandError)
        self.assertEqual(failure.value.code, cli.EXIT_USAGE)
        self.assertIn("bad method name", str(failure.value))

    def test_bytesFromTheEnvironment(self) -> None:
        """A password that is not UTF-8 in the environment is sent as its bytes."""
        self.patch(os, "environ", {"PBROKER_PASSWORD": b"\xffs".decode("utf-8", "surrogateescape")})
        self.assertEqual(cli._password("alice"), b"\xffs")

    def test_deepResult(self) -> None:
        """A result nested as deeply as a broker delivers prints, as JSON too."""
        value: list[Any] = []
        for _ in range(1000):
            value = [value]
        for asJSON in (True, False):
            options = argparse.Namespace(json=asJSON, command="call")
            self.assertIn("[" * 1001, cli._output(options, value, 1.0))


class OutputTests(SynchronousTestCase):
    def test_withStreamsRead(self) -> None:
        """Each stream in a result is replaced by its items: a list, or a tuple where it must
        be hashable; containers that hold themselves still do; other values are kept."""
        first, second = RemoteStream(None, 1), RemoteStream(None, 2)
        loop: list[Any] = [first]
        loop.append(loop)
        value = {"a": (first, 1), second: {frozenset({second})}, "loop": loop}
        self.assertEqual(cli._streamsIn(value), [first, second])
        shown = cli._withStreamsRead(value, {id(first): [1, 2], id(second): ["x"]})
        self.assertEqual(shown["a"], ([1, 2], 1))
        self.assertEqual(shown[("x",)], {frozenset({("x",)})})
        self.assertEqual(shown["loop"][0], [1, 2])
        self.assertIs(shown["loop"][1], shown["loop"])
        self.assertEqual(cli._streamsIn([1, "a", (2,)]), [])

    def test_sharedPartsBounded(self) -> None:
        """A result whose shared parts stand for more than MAX_SHOWN parts (a few hundred
        bytes can describe 2**40) is refused with one line, not expanded for ever."""
        value: Any = ["leaf"]
        for _ in range(40):
            value = [value, value]
        holding: dict[str, Any] = {}
        holding.update(self=holding, parts=value)  # shown by repr as the value of "self"
        for shown in (value, holding):
            for asJSON in (False, True):
                options = cli._parser().parse_args(["--json"] * asJSON + ["info", "pb://h:1"])
                with self.assertRaises(cli.CommandError) as caught:
                    cli._output(options, shown, 1.0)
                self.assertEqual(caught.exception.code, cli.EXIT_REMOTE)
                self.assertIn("too large to show", str(caught.exception))

    def test_remoteMessage(self) -> None:
        """A copied failure is named by its remote type, sent as bytes or (by some peers)
        as text, with its message if it has one; a local failure by its class."""
        registry = jelly.UnjellyableRegistry()
        registry.setUnjellyableForClass(b"twisted.spread.pb.CopyableFailure", pb.CopiedFailure)
        for remoteType in (b"x.Y", "x.Y"):
            for value, shown in (("why", "x.Y: why"), ("", "x.Y")):
                state = twistedJelly.jelly({"type": remoteType, "value": value})
                copied = jelly.unjelly(
                    [b"twisted.spread.pb.CopyableFailure", state], registry=registry
                )
                self.assertEqual(cli._remoteMessage(copied), shown)
        self.assertEqual(cli._remoteMessage(Failure(KeyError())), "KeyError")

    def test_containersHoldingThemselves(self) -> None:
        """A list or dict that holds itself is shown with an ellipsis, as repr shows it."""
        loop: list[Any] = [1]
        loop.append(loop)
        cycle: dict[str, Any] = {"name": "x"}
        cycle["self"] = cycle
        plain = cli._parser().parse_args(["info", "pb://h:1"])
        asJSON = cli._parser().parse_args(["--json", "info", "pb://h:1"])
        self.assertEqual(cli._output(plain, loop, 1.0), "[1, [...]]")
        self.assertIn('"result": [1, "..."]', cli._output(asJSON, loop, 1.0))
        self.assertEqual(
            cli._output(plain, cycle, 1.0), "name: x\nself: {'name': 'x', 'self': {...}}"
        )
        self.assertIn('"self": "..."', cli._output(asJSON, cycle, 1.0))


class CommandReactor(MemoryReactorClock):
    """
    The reactor ``cli.main`` runs in a test: ``run`` connects the command's connections in
    memory to what listens on it (refusing the others), moves their data and the clock
    along (a tenth of a second a turn) until the command stops it, for at most 200 turns.
    With ``interrupted``, it returns at once, as a Ctrl-C makes a real one do.
    """

    def __init__(self, interrupted: bool = False) -> None:
        super().__init__()
        self.interrupted = interrupted
        self.pumps: list[iosim.IOPump] = []

    def flush(self) -> None:
        """
        Deliver what the command wrote as it stopped (a real reactor's kernel would).
        """
        for pump in self.pumps:
            pump.flush()

    def run(self) -> None:
        self.running = True
        if self.interrupted:
            return
        completer = iosim.ConnectionCompleter(self)
        pumps = self.pumps
        for _ in range(200):
            pump = completer.succeedOnce()
            if pump is not None:
                pumps.append(pump)
            elif self.tcpClients:
                completer.failOnce(Failure(ConnectionRefusedError()))
            for each in pumps:
                each.flush()
            self.advance(0.1)
            if not self.running:
                return
        raise AssertionError("the command did not stop the reactor in 200 turns")


class InProcessService(Service):
    def remote_many(self) -> list[int]:
        return list(range(cli.MAX_SHOWN))

    def remote_reference(self) -> pb.Referenceable:
        return pb.Referenceable()

    def remote_texts(self) -> list[bytes]:
        return [b"caf\xc3\xa9", b"\xff"]

    def remote_multiline(self) -> None:
        raise ValueError("first line\nsecond line\x1b[31m")

    def remote_notANumber(self) -> list[float]:
        return [float("nan"), float("inf"), -float("inf"), 1.5]

    def remote_count(self, n: int) -> Any:
        return iter(range(n))


class DroppingService(pb.Root):
    """
    Drops the connection when ``drop`` is called.
    """

    def rootObject(self, broker: Any) -> Any:
        self.broker = broker
        return self

    def remote_drop(self) -> Deferred[None]:
        self.broker.transport.loseConnection()
        return Deferred()


class StockService(twistedPb.Root):
    def remote_fail(self, message: str) -> None:
        raise ValueError(message)


class StreamingService(pb.Root):
    """
    Methods that answer with streams; ``closed`` names the sources closed.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.closed: list[str] = []

    def remote_count(self, n: int) -> Iterator[dict[str, int]]:
        return ({"n": i} for i in range(n))

    def remote_broken(self) -> Iterator[int]:
        yield 1
        raise ValueError("broken source")

    async def remote_endless(self) -> AsyncIterator[int]:
        try:
            n = 0
            while True:
                await task.deferLater(self.clock, 0.2, lambda: None)
                yield n
                n += 1
        finally:
            self.closed.append("endless")

    def remote_pair(self, n: int = 3) -> tuple[Iterator[int], str]:
        return (i for i in range(n)), "label"

    def remote_nested(self) -> dict[str, Any]:
        return {"first": iter([b"a", b"b"]), "more": [iter([1]), iter([])]}


class InProcessTests(SynchronousTestCase):
    """
    ``cli.main`` run in the test's process, on a :class:`CommandReactor`: what it prints and
    the exit code it returns.
    """

    address = "pb://127.0.0.1:8789"

    def main(
        self,
        *arguments: str,
        root: Any = None,
        interrupted: bool = False,
        dialects: list[bytes] | None = None,
        stock: bool = False,
    ) -> tuple[int, str, str]:
        commandReactor = CommandReactor(interrupted)
        if isinstance(root, twistedPb.Root) or stock:
            commandReactor.listenTCP(8789, twistedPb.PBServerFactory(root), interface="127.0.0.1")
        elif root is not None:
            # (Failed logins are answered after a delay, on the reactor given.)
            options: dict[str, Any] = {} if dialects is None else {"dialects": dialects}
            if isinstance(root, Portal):
                options["loginGuard"] = pb.LoginGuard(reactor=commandReactor)
            factory = pb.PBServerFactory(root, clock=commandReactor, **options)
            pb.listen("tcp:8789:interface=127.0.0.1", factory, commandReactor)
        self.patch(twisted.internet, "reactor", commandReactor)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(arguments))
        return code, out.getvalue(), err.getvalue()

    def test_loginNotAnsweredInTime(self) -> None:
        """A login the server does not answer within --timeout says so, exit 4, without
        calling it refused (the password may be right and the server slow); a call without
        its method names only the method as missing (its JSON arguments are optional)."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "secret"})
        portal = Portal(BrokerRealm(), [_NeverAnswers()])
        code, _out, err = self.main(
            "--timeout", "2", "--user", "alice", "ping", self.address, root=portal
        )
        self.assertEqual(
            (code, err), (cli.EXIT_LOGIN, "pbroker: login as alice: no answer within 2 seconds\n")
        )
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit):
            cli.main(["call", self.address])
        self.assertIn("arguments are required: method (pbroker", sys.stderr.getvalue())
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit):
            cli.main(["call"])
        self.assertIn("arguments are required: address, method (pbroker", sys.stderr.getvalue())

    def test_closedStandardInputIsNoPassword(self) -> None:
        """--user with standard input closed (sys.stdin is None: cron, some service managers)
        and no PBROKER_PASSWORD is a usage error, as with no terminal."""
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        self.patch(os, "environ", environment)
        self.patch(sys, "stdin", None)
        code, _out, err = self.main("--user", "alice", "ping", self.address, root=Service())
        self.assertEqual(
            (code, err),
            (
                cli.EXIT_USAGE,
                "pbroker: no password: set PBROKER_PASSWORD or run in a terminal to be asked\n",
            ),
        )

    def test_errorsAreOneLine(self) -> None:
        """A server's error message with line breaks and terminal escapes, and the user's
        own input holding a newline, are shown escaped, on one line."""
        code, _out, err = self.main("call", self.address, "multiline", root=InProcessService())
        self.flushLoggedErrors(ValueError)
        self.assertEqual(code, cli.EXIT_REMOTE)
        self.assertEqual(
            err,
            "pbroker: remote error: builtins.ValueError: first line\\nsecond line\\x1b[31m\n",
        )
        code, _out, err = self.main("ping", "tcp:host=127.0.0.1:port=x\ny")
        self.assertEqual(code, cli.EXIT_USAGE)
        self.assertEqual(err.count("\n"), 1, err)

    def test_oneLineKeepsText(self) -> None:
        """Error lines escape controls, line separators and bidirectional overrides, and
        keep other text: accents, CJK, non-breaking and ideographic spaces, emoji joiners."""
        kept = "caf\u00e9 \u6f22\u5b57 a\u00a0b c\u3000d \U0001f469\u200d\U0001f4bb"
        self.assertEqual(cli._oneLine(kept), kept)
        self.assertEqual(
            cli._oneLine("a\nb\x1b[31m\u2028c\u202ed"), "a\\nb\\x1b[31m\\u2028c\\u202ed"
        )
        # argparse's own errors too (an unknown command holding a newline).
        self.patch(sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit):
            cli.main(["pi\nng", self.address])
        self.assertEqual(sys.stderr.getvalue().count("\n"), 1, sys.stderr.getvalue())

    def test_readerLeftWithoutADescriptor(self) -> None:
        """A reader that left, with a sys.stdout that has no file descriptor (replaced by an
        application), still ends with exit 6."""

        class Gone:
            # (Only write and flush: no fileno at all.)
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

            def flush(self) -> None:
                pass

        commandReactor = CommandReactor()
        pb.listen(
            "tcp:8789:interface=127.0.0.1",
            pb.PBServerFactory(InProcessService(), clock=commandReactor),
            commandReactor,
        )
        self.patch(twisted.internet, "reactor", commandReactor)
        self.patch(sys, "stdout", Gone())
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(cli.main(["call", self.address, "echo", "1"]), cli.EXIT_OUTPUT)

    def test_jsonHasNoNaN(self) -> None:
        """--json prints JSON: floats JSON has no form for go as {"float": ...}."""
        code, out, _err = self.main(
            "--json", "call", self.address, "notANumber", root=InProcessService()
        )

        def refused(token: str) -> Any:
            raise ValueError(f"not JSON: {token}")

        self.assertEqual(code, cli.EXIT_OK)
        self.assertEqual(
            json.loads(out, parse_constant=refused)["result"],
            [{"float": "nan"}, {"float": "inf"}, {"float": "-inf"}, 1.5],
        )

    def test_readerLeft(self) -> None:
        """Output piped to a reader that left (| head) ends quietly with exit 6, for a result
        and for a stream's items; another failure to write says so in one line."""

        class Gone(io.StringIO):
            def write(self, text: str) -> int:
                raise BrokenPipeError(32, "Broken pipe")

        class Full(io.StringIO):
            def write(self, text: str) -> int:
                raise OSError(28, "No space left on device")

        self.patch(os, "dup2", lambda *descriptors: None)  # (no real standard output here)
        for arguments in (
            ("call", self.address, "echo", "1"),
            ("call", self.address, "count", "5"),
        ):
            for output, said in (
                (Gone(), ""),
                (Full(), "pbroker: cannot write the output: No space left on device\n"),
            ):
                commandReactor = CommandReactor()
                factory = pb.PBServerFactory(InProcessService(), clock=commandReactor)
                pb.listen("tcp:8789:interface=127.0.0.1", factory, commandReactor)
                self.patch(twisted.internet, "reactor", commandReactor)
                err = io.StringIO()
                self.patch(sys, "stdout", output)
                self.patch(sys, "stderr", err)
                code = cli.main(list(arguments))
                self.assertEqual((code, err.getvalue()), (cli.EXIT_OUTPUT, said), arguments)

    def withoutPassword(self, typed: Callable[[str], str]) -> list[str]:
        """No PBROKER_PASSWORD, standard input a terminal, and ``typed`` for getpass; the
        prompts it is called with."""
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        self.patch(os, "environ", environment)
        self.patch(sys, "stdin", Terminal())
        prompts: list[str] = []

        def getpassword(prompt: str) -> str:
            prompts.append(prompt)
            return typed(prompt)

        self.patch(getpass, "getpass", getpassword)
        return prompts

    def loginRoot(self) -> Portal:
        return Portal(BrokerRealm(), [InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")])

    def test_pingAndCall(self) -> None:
        """ping prints pong and the time taken; call prints the result, as JSON with
        --json."""
        code, out, err = self.main("ping", self.address, root=Service())
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertRegex(out, r"^pong \(\d+\.\d ms\)\n$")
        code, out, err = self.main(
            "--json", "call", self.address, "echo", '"a"', "[1]", root=Service()
        )
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertEqual(json.loads(out)["result"], ["a", [1]])

    def test_resultsShownAsJSON(self) -> None:
        """Bytes that are UTF-8 are shown as text, others as hex; a reference as its repr."""
        root = InProcessService()
        code, out, err = self.main("--json", "call", self.address, "texts", root=root)
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertEqual(json.loads(out)["result"], ["café", {"bytes": "ff"}])
        code, out, err = self.main("--json", "call", self.address, "reference", root=root)
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertRegex(json.loads(out)["result"], r"^<RemoteReference 1 at 0x[0-9a-f]+>$")

    def test_resultTooLargeToShow(self) -> None:
        """A result of more than MAX_SHOWN parts exits 5 with one line and prints nothing."""
        code, out, err = self.main("call", self.address, "many", root=InProcessService())
        self.assertEqual((code, out), (cli.EXIT_REMOTE, ""))
        self.assertEqual(err, "pbroker: the result is too large to show: over 1,000,000 parts\n")

    def test_remoteError(self) -> None:
        """A remote exception exits 5 with one line naming it."""
        code, out, err = self.main("call", self.address, "fail", '"boom"', root=Service())
        self.assertEqual((code, out), (cli.EXIT_REMOTE, ""))
        self.assertEqual(err, "pbroker: remote error: builtins.ValueError: boom\n")
        self.flushLoggedErrors(ValueError)

    def test_failedWithoutAnException(self) -> None:
        """A call failed by the connection's loss, or by a stock Twisted server's exception,
        is named in the line as well."""
        code, out, err = self.main("call", self.address, "drop", root=DroppingService())
        self.assertEqual((code, out), (cli.EXIT_REMOTE, ""))
        self.assertEqual(
            err,
            "pbroker: remote error: PBConnectionLost: the connection was lost: ConnectionDone: "
            "Connection was closed cleanly: Connection done.\n",
        )
        code, out, err = self.main("call", self.address, "fail", '"boom"', root=StockService())
        self.assertEqual((code, out), (cli.EXIT_REMOTE, ""))
        self.assertEqual(err, "pbroker: remote error: builtins.ValueError: boom\n")
        self.flushLoggedErrors(ValueError)

    def streaming(self, *arguments: str) -> tuple[int, str, str, StreamingService]:
        """
        Run the command against a :class:`StreamingService` on the command's reactor.
        """
        commandReactor = CommandReactor()
        root = StreamingService(commandReactor)
        pb.listen("tcp:8789:interface=127.0.0.1", pb.PBServerFactory(root), commandReactor)
        self.patch(twisted.internet, "reactor", commandReactor)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(arguments))
        commandReactor.flush()
        return code, out.getvalue(), err.getvalue(), root

    def test_debugShowsTheRemoteTraceback(self) -> None:
        """--debug with a remote error prints the traceback the server sent (with
        unsafeTracebacks), not the command's own."""
        commandReactor = CommandReactor()
        factory = pb.PBServerFactory(Service(), unsafeTracebacks=True)
        pb.listen("tcp:8789:interface=127.0.0.1", factory, commandReactor)
        self.patch(twisted.internet, "reactor", commandReactor)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(["--debug", "call", self.address, "fail", '"boom"'])
        self.flushLoggedErrors(ValueError)
        self.assertEqual((code, out.getvalue()), (cli.EXIT_REMOTE, ""))
        text = err.getvalue()
        self.assertIn("remote_fail", text)  # the server's frame
        self.assertIn("ValueError: boom", text)
        self.assertNotIn("pbroker/cli.py", text)  # not the command's own
        self.assertTrue(text.endswith("pbroker: remote error: builtins.ValueError: boom\n"))

    def test_streamPrinted(self) -> None:
        """A method that answers with a stream has its items printed a line each (with
        --json, a JSON object each, then one with their count and the time taken)."""
        code, out, err, _ = self.streaming("call", self.address, "count", "3")
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertEqual(out, "{'n': 0}\n{'n': 1}\n{'n': 2}\n")
        code, out, err, _ = self.streaming("--json", "call", self.address, "count", "2")
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(lines[:2], [{"item": {"n": 0}}, {"item": {"n": 1}}])
        self.assertEqual((len(lines), lines[2]["items"]), (3, 2))
        self.assertIsInstance(lines[2]["ms"], float)
        code, out, err, _ = self.streaming("call", self.address, "count", "0")
        self.assertEqual((code, out, err), (cli.EXIT_OK, "", ""))

    def test_streamFails(self) -> None:
        """A stream that fails exits 5 after the items before the error, which is named."""
        code, out, err, _ = self.streaming("call", self.address, "broken")
        self.assertEqual((code, out), (cli.EXIT_REMOTE, "1\n"))
        self.assertEqual(
            err,
            "pbroker: remote error in a stream, after 1 item: builtins.ValueError: broken source\n",
        )
        self.flushLoggedErrors(ValueError)

    def test_streamTimeout(self) -> None:
        """A stream that has not ended within --timeout exits 5, saying so, and is cancelled:
        the server's generator is closed."""
        code, out, err, root = self.streaming("--timeout", "1", "call", self.address, "endless")
        self.assertEqual(code, cli.EXIT_REMOTE)
        self.assertEqual(err, "pbroker: endless: the stream did not end within 1 seconds\n")
        self.assertEqual(out, "0\n1\n2\n3\n")
        self.assertEqual(root.closed, ["endless"])

    def test_streamsInAResult(self) -> None:
        """Streams inside a result are read to their end and shown as lists."""
        code, out, err, _ = self.streaming("call", self.address, "pair")
        self.assertEqual((code, out, err), (cli.EXIT_OK, "([0, 1, 2], 'label')\n", ""))
        code, out, err, _ = self.streaming("--json", "call", self.address, "nested")
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertEqual(json.loads(out)["result"], {"first": ["a", "b"], "more": [[1], []]})

    def test_streamItemsTooManyToShow(self) -> None:
        """The items of streams inside a result count against MAX_SHOWN as they are read:
        past it, the command exits 5, saying so."""
        self.patch(cli, "MAX_SHOWN", 3)
        code, out, err, _ = self.streaming("call", self.address, "pair", "3")
        self.assertEqual((code, out, err), (cli.EXIT_OK, "([0, 1, 2], 'label')\n", ""))
        code, out, err, _ = self.streaming("call", self.address, "pair", "4")
        self.assertEqual((code, out), (cli.EXIT_REMOTE, ""))
        self.assertEqual(err, "pbroker: the result is too large to show: over 3 stream items\n")

    def test_timeout(self) -> None:
        """A call never answered within --timeout exits 5, saying so."""
        code, out, err = self.main("--timeout", "0.5", "call", self.address, "hang", root=Service())
        self.assertEqual((code, out), (cli.EXIT_REMOTE, ""))
        self.assertEqual(err, "pbroker: hang failed: no answer within 0.5 seconds\n")

    def test_usageErrors(self) -> None:
        """An address that is not one, an unknown scheme and an empty --user exit 2 with one
        line, before connecting (argparse's errors exit through SystemExit)."""
        for address, message in (
            ("nowhere", "not an address: 'nowhere' (try pb://host:port)"),
            ("ftp://h", "unknown scheme 'ftp' in 'ftp://h' (pb or pbs)"),
        ):
            code, out, err = self.main("ping", address)
            self.assertEqual((code, out, err), (cli.EXIT_USAGE, "", f"pbroker: {message}\n"))
        with self.assertRaises(SystemExit) as exited:
            self.main("--user", " ", "ping", self.address)
        self.assertEqual(exited.exception.code, cli.EXIT_USAGE)
        self.assertEqual(
            sys.stderr.getvalue(),
            "pbroker: --user needs a user name (pbroker --help shows the usage)\n",
        )

    def test_refused(self) -> None:
        """Nothing listening: exit 3, one line with the reason."""
        code, out, err = self.main("ping", self.address)
        self.assertEqual((code, out), (cli.EXIT_CONNECTION, ""))
        self.assertEqual(
            err,
            f"pbroker: cannot connect to {self.address}: Connection was refused by other side.\n",
        )

    def test_interrupted(self) -> None:
        """A reactor stopped before the command is done (Ctrl-C) exits 3, saying so."""
        code, out, err = self.main("ping", self.address, root=Service(), interrupted=True)
        self.assertEqual((code, out, err), (cli.EXIT_CONNECTION, "", "pbroker: interrupted\n"))

    def test_lostBeforeTheCall(self) -> None:
        """A connection lost after connecting (or logging in) and before the call is made
        exits 3, saying so in one line: not an unexpected DeadReferenceError."""
        original = pb.RemoteReference.callRemote

        def lost(reference: Any, name: Any, *args: Any, **kw: Any) -> Any:
            if name == "echo":
                raise pb.DeadReferenceError("Calling Stale Broker")
            return original(reference, name, *args, **kw)

        self.patch(pb.RemoteReference, "callRemote", lost)
        code, out, err = self.main("call", self.address, "echo", "1", root=Service())
        self.assertEqual((code, out), (cli.EXIT_CONNECTION, ""))
        self.assertEqual(err, f"pbroker: the connection to {self.address} was lost\n")

    def test_unexpectedError(self) -> None:
        """An error the command does not foresee is still one line, exit 1; --debug adds
        its traceback."""

        async def failing(reactor: Any, options: Any) -> None:
            raise RuntimeError("unforeseen")

        self.patch(cli, "_run", failing)
        code, out, err = self.main("ping", self.address)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "pbroker: unexpected error: RuntimeError('unforeseen')\n")
        code, out, err = self.main("--debug", "ping", self.address)
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("Traceback (most recent call last):\n"), err)
        self.assertTrue(err.endswith("pbroker: unexpected error: RuntimeError('unforeseen')\n"))

    def test_passwordPrompt(self) -> None:
        """Without PBROKER_PASSWORD, in a terminal, the password is asked for."""
        prompts = self.withoutPassword(lambda prompt: "secret")
        code, out, err = self.main(
            "--json", "--user", "alice", "info", self.address, root=self.loginRoot()
        )
        self.assertEqual((code, err), (cli.EXIT_OK, ""))
        self.assertEqual(json.loads(out)["result"]["user"], "alice")
        self.assertEqual(prompts, ["Password for alice: "])

    def test_passwordPromptEndedOrInterrupted(self) -> None:
        """End of input (Ctrl-D) or Ctrl-C at the prompt is no password: a usage error on
        one line, exit 2, without connecting."""
        for raised in (EOFError, KeyboardInterrupt):

            def typed(prompt: str, raised: type[BaseException] = raised) -> str:
                raise raised()

            self.withoutPassword(typed)
            code, out, err = self.main(
                "--user", "alice", "ping", self.address, root=self.loginRoot()
            )
            self.assertEqual((code, out, err), (cli.EXIT_USAGE, "", "pbroker: no password given\n"))

    def test_noPasswordAndNoTerminal(self) -> None:
        """No PBROKER_PASSWORD and no terminal to ask in: exit 2, one line saying so."""
        self.withoutPassword(lambda prompt: "never asked")
        self.patch(sys, "stdin", io.StringIO())
        code, out, err = self.main("--user", "alice", "ping", self.address, root=self.loginRoot())
        self.assertEqual((code, out), (cli.EXIT_USAGE, ""))
        self.assertEqual(
            err, "pbroker: no password: set PBROKER_PASSWORD or run in a terminal to be asked\n"
        )

    def test_promptLineEndedOnATerminal(self) -> None:
        """On a terminal, the error after an ended prompt starts on a line of its own
        (getpass leaves the prompt's line unfinished)."""

        def ended(prompt: str) -> str:
            raise EOFError()

        self.withoutPassword(ended)
        err = Terminal()
        self.patch(sys, "stderr", err)
        with self.assertRaises(cli.CommandError) as raised:
            cli._password("alice")
        self.assertEqual((raised.exception.code, str(raised.exception)), (2, "no password given"))
        self.assertEqual(err.getvalue(), "\n")

    def test_loginRefused(self) -> None:
        """A wrong password exits 4 with one line naming the refusal."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "wrong"})
        code, out, err = self.main("--user", "alice", "ping", self.address, root=self.loginRoot())
        self.assertEqual((code, out), (cli.EXIT_LOGIN, ""))
        self.assertEqual(
            err,
            "pbroker: login refused for alice: twisted.cred.error.UnauthorizedLogin\n",
        )

    def test_loginToARootWithoutLogins(self) -> None:
        """--user against a server whose root takes no logins exits 4 with one line saying
        so, not naming the method it lacks."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "secret"})
        for root in (Service(), StockService()):
            code, out, err = self.main("--user", "alice", "ping", self.address, root=root)
            self.assertEqual((code, out), (cli.EXIT_LOGIN, ""))
            self.assertEqual(
                err,
                "pbroker: login refused for alice: pb://127.0.0.1:8789 takes no logins "
                "(leave out --user)\n",
            )
        self.flushLoggedErrors()  # (a stock server logs the call it could not answer)

    def test_loginToAccountsOnlyPbrokerLoginReaches(self) -> None:
        """--user against a server whose accounts are all in a password file, where only
        the legacy MD5 login is left (a server that offers only the pb dialect): the
        server's own words, not that it takes no password logins."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "secret"})
        path = self.mktemp()
        PasswordFile(path).setPassword("alice", b"secret", MIN_ITERATIONS)
        portal = Portal(BrokerRealm(), [ScramChecker(PasswordFile(path), MIN_ITERATIONS)])
        code, out, err = self.main(
            "--user", "alice", "ping", self.address, root=portal, dialects=[b"pb"]
        )
        self.assertEqual((code, out), (cli.EXIT_LOGIN, ""))
        self.assertEqual(
            err,
            "pbroker: login refused for alice: pbroker.cred.NoCheckerFor: this server has no "
            "accounts for the legacy MD5 login (of stock Twisted clients, and pbroker clients "
            "limited to the pb dialect)\n",
        )

    def test_loginToAStockPortalWithoutAccounts(self) -> None:
        """--user against a stock server whose portal checks no passwords, which answers
        UnhandledCredentials naming its interfaces: the command says it takes no password
        logins."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "secret"})
        portal = Portal(BrokerRealm(), [AllowAnonymousAccess()])
        code, out, err = self.main("--user", "alice", "ping", self.address, root=portal, stock=True)
        self.assertEqual((code, out), (cli.EXIT_LOGIN, ""))
        self.assertEqual(
            err,
            "pbroker: login refused for alice: pb://127.0.0.1:8789 takes no password logins "
            "(no checker of its portal takes one)\n",
        )
        self.flushLoggedErrors()

    def test_noPasswordLoginsSaidAsTheServerSays(self) -> None:
        """What the command recognises as "takes no password logins" is what the server
        says (and what servers before it said)."""
        self.assertEqual(cli._NO_PASSWORD_LOGINS[0], NO_PASSWORD_ACCOUNTS)

    def test_loginToAPortalWithoutAccounts(self) -> None:
        """--user against a broker whose portal checks no passwords (anonymous logins only)
        exits 4 saying that it takes no password logins, not listing credential
        interfaces."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "secret"})
        portal = Portal(BrokerRealm(), [AllowAnonymousAccess()])
        code, out, err = self.main("--user", "alice", "ping", self.address, root=portal)
        self.assertEqual((code, out), (cli.EXIT_LOGIN, ""))
        self.assertEqual(
            err,
            "pbroker: login refused for alice: pb://127.0.0.1:8789 takes no password logins "
            "(no checker of its portal takes one)\n",
        )


class Terminal(io.StringIO):
    """Standard input that is a terminal."""

    def isatty(self) -> bool:
        return True


class TranscriptTests(TestCase):
    """
    The transcript in docs/cli.rst, run against the service it describes.
    """

    timeout = 120

    async def test_transcript(self) -> None:
        """Each command of the page prints what the page shows (``...`` for what varies)."""
        from pbroker import tap

        options = tap.Options()
        options.parseOptions(
            ["--listen", "tcp:0:interface=127.0.0.1", "--auth", "memory:alice:secret"]
        )
        service = tap.makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        [listener] = list(service)
        port = str((await listener._waitingForPort).getHost().port)
        page = (Path(__file__).parent.parent / "docs" / "cli.rst").read_text(encoding="utf-8")
        checker = doctest.OutputChecker()
        ran = 0
        for command, expected in transcript(page):
            words = shlex.split(command.replace("8789", port))
            environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
            while "=" in words[0]:
                name, _, value = words.pop(0).partition("=")
                environment[name] = value
            self.assertEqual(words[0], "pbroker")
            out, err, _code = await getProcessOutputAndValue(
                sys.executable, ["-m", "pbroker", *words[1:]], env=environment
            )
            got = (out + err).decode()
            self.assertTrue(
                checker.check_output(expected, got, doctest.ELLIPSIS),
                f"$ {command}\nexpected:\n{expected}got:\n{got}",
            )
            ran += 1
        self.assertGreaterEqual(ran, 6)


def transcript(page: str) -> list[tuple[str, str]]:
    """
    The ``$ command`` lines of the page's console block, each with the output shown after it.
    """
    steps: list[tuple[str, str]] = []
    for line in page.splitlines():
        stripped = line.strip()
        if stripped.startswith("$ "):
            steps.append((stripped[2:], ""))
        elif steps and line.startswith("    ") and stripped:
            command, expected = steps[-1]
            steps[-1] = (command, expected + stripped + "\n")
        elif steps and not stripped:
            continue
        elif steps and not line.startswith("    "):
            break
    return steps
