"""
End to end, as a user would: a fresh virtualenv with the project installed the way the README
says, ``twistd -n pbroker`` on a free loopback port, a login and a call from the ``pbroker``
command line and from a stock ``twisted.spread.pb`` client, then SIGTERM and a clean exit.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Twistd(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class EndToEndTests(TestCase):
    timeout = 600

    async def command(self, executable: str, *arguments: str, env: dict[str, str]) -> str:
        out, err, code = await getProcessOutputAndValue(executable, arguments, env=env)
        report = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, f"{executable} {' '.join(arguments)} failed:\n{report}")
        return report

    async def waitForPort(self, port: int) -> None:
        for _ in range(200):  # at most about 20 seconds
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                await task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"twistd pbroker never listened on port {port}")

    async def test_installServeCallStop(self) -> None:
        """Install, serve, log in and call from the CLI and a stock client, stop on SIGTERM."""
        venv = os.path.abspath(self.mktemp())
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        await self.command(sys.executable, "-m", "venv", venv, env=environment)
        python = os.path.join(venv, "bin", "python")
        # The README's install command: a regular install, which puts the twistd plugin in place.
        await self.command(python, "-m", "pip", "install", "-q", ROOT, env=environment)

        port = freePort()
        twistd = _Twistd()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            twistd,
            os.path.join(venv, "bin", "twistd"),
            [
                "twistd",
                "-n",
                "--pidfile=",
                "pbroker",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--auth",
                "memory:alice:secret",
            ],
            env=environment,
            path=venv,
        )

        def stopIfRunning() -> Any:
            if process.pid is not None:
                process.signalProcess("KILL")
                return twistd.ended
            return None

        self.addCleanup(stopIfRunning)
        await self.waitForPort(port)

        cli = os.path.join(venv, "bin", "pbroker")
        output = await self.command(
            cli,
            "--user",
            "alice",
            "call",
            f"pb://127.0.0.1:{port}",
            "ping",
            env={**environment, "PBROKER_PASSWORD": "secret"},
        )
        self.assertEqual(output.strip(), "pong")

        factory = twistedPb.PBClientFactory()
        connector = reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
        avatar = await factory.login(UsernamePassword(b"alice", b"secret"))
        self.assertEqual(await avatar.callRemote("ping"), "pong")
        info = await avatar.callRemote("info")
        self.assertEqual(info["user"], "alice")
        lost: defer.Deferred[None] = defer.Deferred()
        avatar.broker.notifyOnDisconnect(lambda: lost.callback(None))

        process.signalProcess(signal.SIGTERM)
        reason = await twistd.ended
        await lost  # the client was told: its connection closed
        connector.disconnect()
        # twistd shuts down in order, then re-raises SIGTERM so that its exit status says
        # why it stopped: a clean stop is that signal (or status 0), after the whole
        # shutdown sequence, with no traceback.
        log = twistd.output.decode("utf-8", "replace")
        cleanStatus = isinstance(reason, error.ProcessDone) or (
            isinstance(reason, error.ProcessTerminated) and reason.signal == signal.SIGTERM
        )
        self.assertTrue(cleanStatus, f"{reason!r}\n{log}")
        for line in (
            "Received SIGTERM",
            "Stopping factory",
            "Main loop terminated",
            "Server Shut Down",
        ):
            self.assertIn(line, log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
