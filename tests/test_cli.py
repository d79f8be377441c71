"""
Tests for the ``pbroker`` command line, run as ``python -m pbroker`` against brokers listening
on 127.0.0.1 in the test's reactor.
"""

from __future__ import annotations

import doctest
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pbroker import cli, pb
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
        self.assertOneLine(err, f"cannot connect to {address}: no answer within 0.5 seconds")
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


class AddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """pb:// gives a TCP endpoint string (default port 8789); others pass through."""
        self.assertEqual(cli.endpointFor("pb://example.org"), "tcp:host=example.org:port=8789")
        self.assertEqual(cli.endpointFor("pb://h:1234/"), "tcp:host=h:port=1234")
        self.assertEqual(cli.endpointFor("unix:/run/x.sock"), "unix:/run/x.sock")
        self.assertIsNotNone(cli.endpointFor("pbs://localhost:8790"))
        with self.assertRaises(cli.CommandError):
            cli.endpointFor("pb://:80")


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
