"""
Tests for pbroker's password login (salted verifiers, mutual proof, no replay), the password
file and its command, and how it coexists with the legacy MD5 login of stock Twisted peers.
"""

from __future__ import annotations

import getpass
import io
import os
import stat
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import SynchronousTestCase

from pbroker import passwords, pb
from pbroker.passwords import PasswordFile, ScramChecker, ScramVerifier
from tests.test_broker import connect
from tests.test_login import realmFor

ITERATIONS = 1000  # fast for tests; real files use DEFAULT_ITERATIONS


class VerifierTests(SynchronousTestCase):
    def test_lineRoundTrip(self) -> None:
        """A verifier survives its password-file line."""
        verifier = ScramVerifier.fromPassword(b"pw", ITERATIONS)
        username, parsed = ScramVerifier.fromLine(verifier.toLine("alice"))
        self.assertEqual((username, parsed), ("alice", verifier))

    def test_saltedAndFresh(self) -> None:
        """Two verifiers of one password differ (random salts) and hold no password."""
        first = ScramVerifier.fromPassword(b"hunter2", ITERATIONS)
        second = ScramVerifier.fromPassword(b"hunter2", ITERATIONS)
        self.assertNotEqual(first.salt, second.salt)
        self.assertNotEqual(first.storedKey, second.storedKey)
        self.assertNotIn(b"hunter2", first.toLine("u").encode())

    def test_badInput(self) -> None:
        """Bad usernames, iteration counts and lines are refused."""
        verifier = ScramVerifier.fromPassword(b"pw", ITERATIONS)
        for name in ("", "a:b", "a\nb"):
            with self.assertRaises(ValueError):
                verifier.toLine(name)
        with self.assertRaises(ValueError):
            ScramVerifier.fromPassword(b"pw", 0)
        with self.assertRaises(ValueError):
            ScramVerifier.fromLine("alice:md5:1:x:y:z")

    def test_proofChecks(self) -> None:
        """A proof made with the password checks; one made with another does not."""
        verifier = ScramVerifier.fromPassword(b"pw", ITERATIONS)
        message = passwords.authMessage(b"u", b"c" * 24, b"s" * 24, verifier.salt, ITERATIONS)
        good = passwords.clientProof(b"pw", verifier.salt, ITERATIONS, message)
        bad = passwords.clientProof(b"other", verifier.salt, ITERATIONS, message)
        self.assertTrue(passwords.ScramProof(b"u", message, good).checkVerifier(verifier))
        self.assertFalse(passwords.ScramProof(b"u", message, bad).checkVerifier(verifier))
        self.assertFalse(passwords.ScramProof(b"u", message, b"short").checkVerifier(verifier))
        self.assertEqual(
            passwords.serverSignature(verifier.serverKey, message),
            passwords.expectedServerSignature(b"pw", verifier.salt, ITERATIONS, message),
        )


class PasswordFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()

    def test_setAndReplace(self) -> None:
        """Users are added and replaced; the file is private and holds no plaintext."""
        passwordFile = PasswordFile(self.path)
        self.assertIsNone(passwordFile.verifierFor(b"alice"))
        passwordFile.setPassword("alice", b"first secret", ITERATIONS)
        passwordFile.setPassword("bob", b"bob secret", ITERATIONS)
        before = passwordFile.verifierFor(b"alice")
        passwordFile.setPassword("alice", b"second secret", ITERATIONS)
        after = PasswordFile(self.path).verifierFor(b"alice")
        self.assertIsNotNone(before)
        self.assertNotEqual(before, after)
        self.assertIsNotNone(PasswordFile(self.path).verifierFor(b"bob"))
        with open(self.path, "rb") as f:
            content = f.read()
        self.assertEqual(content.count(b"\n"), 2)
        for secret in (b"first secret", b"second secret", b"bob secret"):
            self.assertNotIn(secret, content)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_reloadsWhenChanged(self) -> None:
        """A running server sees users added to the file afterwards."""
        reader = PasswordFile(self.path)
        self.assertIsNone(reader.verifierFor(b"carol"))
        PasswordFile(self.path).setPassword("carol", b"pw", ITERATIONS)
        self.assertIsNotNone(reader.verifierFor(b"carol"))

    def test_command(self) -> None:
        """The add command takes the password from PBROKER_PASSWORD and writes the file."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "from env"})
        out = io.StringIO()
        with redirect_stdout(out):
            code = passwords.main(["add", self.path, "dave", "--iterations", str(ITERATIONS)])
        self.assertEqual(code, 0)
        self.assertIn("dave", out.getvalue())
        verifier = PasswordFile(self.path).verifierFor(b"dave")
        self.assertEqual(
            verifier, ScramVerifier.fromPassword(b"from env", ITERATIONS, verifier.salt)
        )

    def test_commandRefusesEmptyAndMismatch(self) -> None:
        """An empty password, or two different typings, change nothing."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": ""})
        with redirect_stderr(io.StringIO()):
            self.assertEqual(passwords.main(["add", self.path, "erin"]), 1)
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        self.patch(os, "environ", environment)
        typed = iter(["one", "two"])
        self.patch(getpass, "getpass", lambda prompt: next(typed))
        with redirect_stderr(io.StringIO()):
            self.assertEqual(passwords.main(["add", self.path, "erin"]), 1)
        self.assertFalse(os.path.exists(self.path))


class PasswordLoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        PasswordFile(self.path).setPassword("alice", b"scram secret", ITERATIONS)
        self.realm = realmFor(pb)
        self.checkers: list[Any] = [
            ScramChecker(PasswordFile(self.path), ITERATIONS),
            InMemoryUsernamePasswordDatabaseDontUse(alice=b"legacy secret"),
        ]

    def server(self, legacyLogin: bool = True) -> pb.PBServerFactory:
        return pb.PBServerFactory(
            Portal(self.realm, self.checkers),
            loginGuard=pb.LoginGuard(baseDelay=0, maxDelay=0),
            legacyLogin=legacyLogin,
        )

    def login(self, serverFactory: Any, clientFactory: Any, password: bytes) -> Any:
        _server, _client, pump = connect(serverFactory, clientFactory)
        results: list[Any] = []
        clientFactory.login(UsernamePassword(b"alice", password)).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(results), 1)
        self.pump = pump
        return results[0]

    def name(self, avatar: Any) -> Any:
        results: list[Any] = []
        avatar.callRemote("name").addBoth(results.append)
        self.pump.flush()
        return results[0]

    def test_pbrokerClientUsesPasswordLogin(self) -> None:
        """A pbroker client logs in with the verifier-based exchange, not the legacy one."""
        avatar = self.login(self.server(), pb.PBClientFactory(), b"scram secret")
        self.assertEqual(self.name(avatar), "alice")
        failure = self.login(self.server(), pb.PBClientFactory(), b"legacy secret")
        self.assertTrue(failure.check(UnauthorizedLogin))

    def test_wrongPasswordAndUnknownUser(self) -> None:
        """A wrong password and an unknown user fail alike."""
        failure = self.login(self.server(), pb.PBClientFactory(), b"wrong")
        self.assertTrue(failure.check(UnauthorizedLogin))
        factory = pb.PBClientFactory()
        _server, _client, pump = connect(self.server(), factory)
        results: list[Any] = []
        factory.login(UsernamePassword(b"mallory", b"x")).addBoth(results.append)
        pump.flush()
        self.assertTrue(results[0].check(UnauthorizedLogin))

    def test_recordedProofCannotBeReplayed(self) -> None:
        """A proof that once logged in is useless against a fresh challenge."""
        factory = pb.PBClientFactory()
        _server, client, pump = connect(self.server(), factory)
        root = client.remoteForName("root")

        def call(target: Any, *args: Any) -> Any:
            results: list[Any] = []
            target.callRemote(*args).addBoth(results.append)
            pump.flush()
            return results[0]

        clientNonce = b"n" * 24
        serverNonce, salt, iterations, prover = call(root, "passwordLogin", b"alice", clientNonce)
        message = passwords.authMessage(b"alice", clientNonce, serverNonce, salt, iterations)
        proof = passwords.clientProof(b"scram secret", salt, iterations, message)
        avatar, _signature = call(prover, "prove", proof, None)
        self.assertEqual(call(avatar, "name"), "alice")
        _nonce, _salt, _iterations, secondProver = call(
            root, "passwordLogin", b"alice", clientNonce
        )
        self.assertTrue(call(secondProver, "prove", proof, None).check(UnauthorizedLogin))
        self.assertTrue(call(prover, "prove", proof, None).check(UnauthorizedLogin))

    def test_serverMustProveItself(self) -> None:
        """A server that does not know the verifier cannot make the client accept a login."""

        class Impostor(pb.Root):
            def remote_passwordLogin(self, username: bytes, nonce: bytes) -> Any:
                return b"s" * 24, b"salt" * 4, ITERATIONS, Prover()

        class Prover(pb.Referenceable):
            def remote_prove(self, proof: bytes, mind: Any) -> Any:
                return pb.Referenceable(), b"\0" * 32

        failure = self.login(pb.PBServerFactory(Impostor()), pb.PBClientFactory(), b"scram secret")
        self.assertTrue(failure.check(UnauthorizedLogin))
        self.assertIn("could not prove", failure.getErrorMessage())

    def test_stockClientUsesLegacyLogin(self) -> None:
        """A stock Twisted client logs in with the legacy exchange unless it is disabled."""
        avatar = self.login(self.server(), twistedPb.PBClientFactory(), b"legacy secret")
        self.assertEqual(self.name(avatar), "alice")
        failure = self.login(
            self.server(legacyLogin=False), twistedPb.PBClientFactory(), b"legacy secret"
        )
        self.assertTrue(failure.check(UnauthorizedLogin))

    def test_pbrokerClientFallsBackOnStockServer(self) -> None:
        """Against a stock Twisted server a pbroker client uses the legacy login, if allowed."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"legacy secret")
        stock = twistedPb.PBServerFactory(Portal(realmFor(twistedPb), [checker]))
        avatar = self.login(stock, pb.PBClientFactory(), b"legacy secret")
        self.assertEqual(self.name(avatar), "alice")
        strict = pb.PBClientFactory(legacyLogin=False)
        stock = twistedPb.PBServerFactory(Portal(realmFor(twistedPb), [checker]))
        failure = self.login(stock, strict, b"legacy secret")
        self.assertTrue(failure.check(UnauthorizedLogin))
        self.assertIn("only the legacy MD5 login", failure.getErrorMessage())

    def test_pbrokerServerWithoutPasswordFile(self) -> None:
        """A pbroker server with only a legacy checker still logs pbroker clients in."""
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"legacy secret")
        server = pb.PBServerFactory(
            Portal(self.realm, [checker]), loginGuard=pb.LoginGuard(baseDelay=0, maxDelay=0)
        )
        avatar = self.login(server, pb.PBClientFactory(), b"legacy secret")
        self.assertEqual(self.name(avatar), "alice")
        # A client that refuses the legacy login is refused as a stock server refuses it.
        failure = self.login(server, pb.PBClientFactory(legacyLogin=False), b"legacy secret")
        self.assertTrue(failure.check(UnauthorizedLogin))
        self.assertIn("only the legacy MD5 login", failure.getErrorMessage())

    def test_dialectTellsPbrokerPeers(self) -> None:
        """Two pbroker peers agree on pbroker's dialect; a stock peer on both sides gets pb."""
        pairs = [
            (pb.PBServerFactory(pb.Root()), pb.PBClientFactory(), b"pbroker2"),
            (
                pb.PBServerFactory(pb.Root()),
                pb.PBClientFactory(dialects=[b"pbroker1", b"pb"]),
                b"pbroker1",
            ),
            (pb.PBServerFactory(pb.Root()), twistedPb.PBClientFactory(), b"pb"),
            (twistedPb.PBServerFactory(twistedPb.Root()), pb.PBClientFactory(), b"pb"),
        ]
        for serverFactory, clientFactory, dialect in pairs:
            server, client, _pump = connect(serverFactory, clientFactory)
            self.assertEqual((server.currentDialect, client.currentDialect), (dialect, dialect))
