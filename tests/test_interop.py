"""
Interoperability over real loopback sockets with a stock Twisted PB peer in another process.

Both directions run the same scenarios (tests/interop_peer.py): login with a right and a wrong
password, every basic type, a Referenceable called again, a Copyable each way (one without
state too), a Cacheable observed and updated, a Viewable, a remote exception with its type
name, a one-way call, 200 calls pipelined and a Pager transfer larger than 640 KiB.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from pbroker import jelly, pb, util
from tests import interop_peer

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interop_peer.py")


def pbrokerClasses() -> tuple[Any, jelly.UnjellyableRegistry]:
    """
    The scenario classes on pbroker, and a registry for their copies (not the global one).
    """
    classes = interop_peer.build(pb, util)
    registry = jelly.UnjellyableRegistry()
    registry.setUnjellyableForClass(interop_peer.POINT_TAG, classes.RemotePoint)
    registry.setUnjellyableForClass(interop_peer.GAUGE_TAG, classes.RemoteGauge)
    registry.setUnjellyableForClass(interop_peer.BLANK_TAG, classes.RemoteBlank)
    return classes, registry


def peerEnvironment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(PEER)), environment.get("PYTHONPATH", "")]
    )
    return environment


class _PeerServer(protocol.ProcessProtocol):
    """
    Runs the stock server; ``port`` fires with its port, ``ended`` when the process exits.
    """

    def __init__(self) -> None:
        self.port: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.port.called and b"\n" in self.output:
            line = self.output.split(b"\n", 1)[0]
            if line.startswith(b"PORT "):
                self.port.callback(int(line.split()[1]))
            else:
                self.port.errback(RuntimeError(f"unexpected peer output: {line!r}"))

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(f"the peer exited early: {self.output!r}"))
        self.ended.callback(None)


class InteropTests(TestCase):
    timeout = 120

    async def test_pbrokerClientStockServer(self) -> None:
        """A pbroker client runs every scenario against a stock Twisted server process."""
        peer = _PeerServer()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            peer, sys.executable, [sys.executable, PEER, "server"], env=peerEnvironment()
        )

        def stopPeer() -> defer.Deferred[None]:
            with contextlib.suppress(error.ProcessExitedAlready):
                process.closeStdin()
            return peer.ended

        self.addCleanup(stopPeer)
        port = await peer.port
        classes, registry = pbrokerClasses()
        factory = pb.PBClientFactory(registry=registry)
        connector = reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
        self.addCleanup(connector.disconnect)
        passed: list[str] = []
        await defer.ensureDeferred(classes.scenarios(factory, passed.append))
        self.assertIn("pager larger than 640 KiB", passed)
        self.assertEqual(len(passed), 15 + len(interop_peer.VALUES))

    async def test_stockClientPbrokerServer(self) -> None:
        """A stock Twisted client process runs every scenario against a pbroker server."""
        classes, registry = pbrokerClasses()
        factory = pb.PBServerFactory(classes.portal(), registry=registry)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [PEER, "client", str(listening.getHost().port)],
            env=peerEnvironment(),
        )
        report = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, report)
        self.assertIn("OK pager larger than 640 KiB", report)
        self.assertEqual(report.count("OK "), 15 + len(interop_peer.VALUES), report)
        self.flushLoggedErrors(ValueError, UnauthorizedLogin)
