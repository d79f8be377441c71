"""
TLS over real loopback sockets, with certificates generated here: verification of the server
by the client (CA and host name), and mutual TLS where the client certificate logs in.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.credentials import IAnonymous
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, reactor
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from pbroker import pb, tls


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


class Authority:
    """
    A certificate authority that writes PEM files for itself and what it issues.
    """

    def __init__(self, directory: str, name: str, parent: Authority | None = None) -> None:
        """
        A root CA, or with ``parent`` an intermediate one that ``parent`` certifies.
        """
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name) if parent is None else parent.certificate.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key if parent is None else parent.key, hashes.SHA256())
        )
        # A directory holding just this CA's certificate, for tls: trustRoots=.
        self.trustRoots = os.path.join(directory, f"{name}-roots")
        os.makedirs(self.trustRoots)
        self.pem = self._write(f"{name}-roots/ca.pem", self._certificatePEM(self.certificate))

    @staticmethod
    def _certificatePEM(certificate: x509.Certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as pemFile:
            pemFile.write(data)
        return path

    def issue(self, commonName: str, hostNames: tuple[str, ...] = ()) -> tuple[str, str]:
        """
        Issue a certificate; return the paths of its PEM certificate and key.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(commonName))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if hostNames:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(host) for host in hostNames]),
                critical=False,
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        keyPEM = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            self._write(f"{commonName}.pem", self._certificatePEM(certificate)),
            self._write(f"{commonName}.key", keyPEM),
        )


class Echo(pb.Root):
    def remote_echo(self, value: Any) -> Any:
        return value


class User(pb.Avatar):
    def __init__(self, name: str) -> None:
        self.name = name

    def perspective_whoAmI(self) -> str:
        return self.name


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return pb.IPerspective, User(avatarId.decode()), lambda: None


class TLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.authority = Authority(self.directory, "ca")
        self.stranger = Authority(self.directory, "stranger")
        self.serverCert, self.serverKey = self.authority.issue("localhost", ("localhost",))

    async def listen(self, description: Any, root: Any) -> int:
        address = await self.listenAddress(description, root)
        return int(address.port)

    async def listenAddress(self, description: Any, root: Any) -> Any:
        test = self

        class Factory(pb.PBServerFactory):
            def clientConnectionMade(self, broker: Any) -> None:
                test.waitForClose(broker)

        port = await pb.listen(description, Factory(root))
        self.addCleanup(port.stopListening)
        return port.getHost()

    def waitForClose(self, broker: Any) -> None:
        """
        Have the test end only once this broker's connection is closed (it is closed then).
        """
        closed: defer.Deferred[None] = defer.Deferred()
        broker.notifyOnDisconnect(lambda: closed.callback(None))

        def close() -> defer.Deferred[None]:
            if broker.transport is not None and not broker.disconnected:
                broker.transport.loseConnection()
            return closed

        self.addCleanup(close)

    async def connect(self, description: str) -> tuple[Any, pb.PBClientFactory]:
        factory = pb.PBClientFactory()
        root = await pb.connect(description, factory)
        self.waitForClose(root.broker)
        return root, factory

    def clientString(
        self, port: int, host: str = "localhost", roots: str = "", extra: str = ""
    ) -> str:
        roots = roots or self.authority.trustRoots
        return f"tls:{host}:{port}:trustRoots={roots}:endpoint=tcp\\:127.0.0.1\\:{port}{extra}"

    async def assertRefused(self, description: Any) -> None:
        factory = pb.PBClientFactory()
        try:
            await pb.connect(description, factory)
        except Exception:
            return
        self.fail(f"connecting with {description!r} should have failed")

    async def test_verifiedCall(self) -> None:
        """A client that verifies the server's CA and name calls through TLS."""
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.serverKey}:certKey={self.serverCert}",
            Echo(),
        )
        root, _ = await self.connect(self.clientString(port))
        self.assertEqual(await root.callRemote("echo", "over TLS"), "over TLS")

    async def test_wrongAuthorityRefused(self) -> None:
        """A client that trusts another CA refuses the server."""
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.serverKey}:certKey={self.serverCert}",
            Echo(),
        )
        await self.assertRefused(self.clientString(port, roots=self.stranger.trustRoots))

    async def test_wrongHostNameRefused(self) -> None:
        """A client that expects another host name refuses the server."""
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.serverKey}:certKey={self.serverCert}",
            Echo(),
        )
        await self.assertRefused(self.clientString(port, host="elsewhere.example"))

    async def test_caFileEndpoint(self) -> None:
        """clientEndpoint verifies against a CA file: the right CA and name pass, others not."""
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.serverKey}:certKey={self.serverCert}",
            Echo(),
        )
        good = tls.clientEndpoint(
            reactor, "127.0.0.1", port, caFile=self.authority.pem, hostname="localhost"
        )
        factory = pb.PBClientFactory()
        root = await pb.connect(good, factory)
        self.waitForClose(root.broker)
        self.assertEqual(await root.callRemote("echo", 1), 1)
        for caFile, hostname in ((self.stranger.pem, "localhost"), (self.authority.pem, "x.test")):
            endpoint = tls.clientEndpoint(
                reactor, "127.0.0.1", port, caFile=caFile, hostname=hostname
            )
            await self.assertRefused(endpoint)

    async def test_nameThatCannotBeCheckedRefused(self) -> None:
        """clientEndpoint (and so ``pbs://`` on the command line) refuses a certificate of
        the right CA whose name cannot be checked at all: a user's certificate with no
        subjectAltName (which Twisted's own check lets through, logging the error, so that
        any user of the CA could pass for the server), one whose only name is a wildcard
        too wide to use, and, reached by address, one with the address as a DNS name."""
        for commonName, hostNames, hostname in (
            ("alice", (), "localhost"),
            ("wide", ("*.example",), "localhost"),
            ("addressAsName", ("127.0.0.1",), None),
        ):
            certificate, key = self.authority.issue(commonName, hostNames)
            port = await self.listen(
                f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}", Echo()
            )
            endpoint = tls.clientEndpoint(
                reactor, "127.0.0.1", port, caFile=self.authority.pem, hostname=hostname
            )
            with capturedLogs():
                await self.assertRefused(endpoint)
        self.flushLoggedErrors()
        # The same CA's server certificate, with its name, still passes.
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.serverKey}:certKey={self.serverCert}",
            Echo(),
        )
        endpoint = tls.clientEndpoint(
            reactor, "127.0.0.1", port, caFile=self.authority.pem, hostname="localhost"
        )
        root = await pb.connect(endpoint, pb.PBClientFactory())
        self.waitForClose(root.broker)
        self.assertEqual(await root.callRemote("echo", 2), 2)

    async def test_unixSocket(self) -> None:
        """A unix: endpoint string works like the others."""
        path = os.path.abspath(self.mktemp())
        await self.listenAddress(f"unix:{path}", Echo())
        root, _ = await self.connect(f"unix:{path}")
        self.assertEqual(await root.callRemote("echo", "local"), "local")

    async def mutualServer(self) -> int:
        checker = tls.PeerCertificateChecker(commonNames={"alice": b"alice"})
        endpoint = tls.serverEndpoint(
            reactor, 0, self.serverCert, self.serverKey, clientCA=self.authority.pem
        )
        return await self.listen(endpoint, Portal(Realm(), [checker]))

    def fullChain(self) -> tuple[str, str]:
        """
        A server certificate from an intermediate CA, in one file with that CA's certificate
        after it (a "fullchain.pem"); the paths of that file and of the key.
        """
        middle = Authority(self.directory, "middle", parent=self.authority)
        certificate, key = middle.issue("localhost", ("localhost",))
        return self.joined("fullchain.pem", certificate, middle.pem), key

    def joined(self, name: str, *paths: str) -> str:
        """
        The path of a new file ``name`` holding the PEM files at ``paths``, in order.
        """
        joined = os.path.join(self.directory, name)
        with open(joined, "wb") as joinedFile:
            for path in paths:
                with open(path, "rb") as part:
                    joinedFile.write(part.read())
        return joined

    async def test_chainSent(self) -> None:
        """serverEndpoint sends the certificates after the server's own in its file: a
        client that trusts only the root CA verifies a server certified by an intermediate
        one, with or without client certificates."""
        chain, key = self.fullChain()
        port = await self.listen(tls.serverEndpoint(reactor, 0, chain, key), Echo())
        root, _ = await self.connect(self.clientString(port))
        self.assertEqual(await root.callRemote("echo", "chained"), "chained")
        checker = tls.PeerCertificateChecker(commonNames={"alice": b"alice"})
        endpoint = tls.serverEndpoint(reactor, 0, chain, key, clientCA=self.authority.pem)
        port = await self.listen(endpoint, Portal(Realm(), [checker]))
        certificate, clientKey = self.authority.issue("alice")
        _, factory = await self.connect(
            self.clientString(port, extra=f":certificate={certificate}:privateKey={clientKey}")
        )
        avatar = await factory.login(pb.CertificateLogin())
        self.assertEqual(await avatar.callRemote("whoAmI"), "alice")

    async def test_clientChainSent(self) -> None:
        """clientEndpoint sends the certificates after the client's own in its file: a
        client certified by an intermediate CA logs in to a server that trusts only the
        root."""
        port = await self.mutualServer()
        middle = Authority(self.directory, "middle", parent=self.authority)
        certificate, key = middle.issue("alice")
        chain = self.joined("alice-fullchain.pem", certificate, middle.pem)
        self.assertEqual(await self.certificateLogin(port, chain, key), "alice")

    async def test_clientCertificateLogsIn(self) -> None:
        """With mutual TLS the client certificate logs in to the avatar it maps to."""
        port = await self.mutualServer()
        certificate, key = self.authority.issue("alice")
        _, factory = await self.connect(
            self.clientString(port, extra=f":certificate={certificate}:privateKey={key}")
        )
        avatar = await factory.login(pb.CertificateLogin())
        self.assertEqual(await avatar.callRemote("whoAmI"), "alice")

    async def test_clientEndpointCertificateLogsIn(self) -> None:
        """clientEndpoint with a certificate and its key presents them: the certificate
        logs in to the avatar it maps to."""
        port = await self.mutualServer()
        certificate, key = self.authority.issue("alice")
        self.assertEqual(await self.certificateLogin(port, certificate, key), "alice")

    async def certificateLogin(self, port: int, certificate: str, key: str) -> str:
        """
        Connect with clientEndpoint and the client certificate at ``certificate``, log in
        with it: whom the server says it is.
        """
        endpoint = tls.clientEndpoint(
            reactor,
            "127.0.0.1",
            port,
            caFile=self.authority.pem,
            hostname="localhost",
            certificate=certificate,
            privateKey=key,
        )
        factory = pb.PBClientFactory()
        root = await pb.connect(endpoint, factory)
        self.waitForClose(root.broker)
        avatar = await factory.login(pb.CertificateLogin())
        return str(await avatar.callRemote("whoAmI"))

    async def test_twistdClientCertificateLogsIn(self) -> None:
        """
        ``twistd pbroker --tls-client-ca`` lets a client log in with its certificate, as the
        user its common name names; anonymous login then needs --anonymous.
        """
        from pbroker import tap

        options = tap.Options()
        tlsFiles = ["--tls-certificate", self.serverCert, "--tls-key", self.serverKey]
        options.parseOptions(["--tls-port", "0", *tlsFiles, "--tls-client-ca", self.authority.pem])
        (listening,) = tap.makeService(options)
        portal = listening.factory.root.portal
        checker = portal.checkers[tls.IPeerCertificate]
        self.assertEqual(
            await checker.requestAvatarId(tls.PeerCertificate(b"der", "alice")), b"alice"
        )
        with self.assertRaises(UnauthorizedLogin):
            await checker.requestAvatarId(tls.PeerCertificate(b"der", None))
        self.assertNotIn(IAnonymous, portal.checkers)

    async def test_unmappedCertificateRefused(self) -> None:
        """A valid certificate with no account is refused at login."""
        port = await self.mutualServer()
        certificate, key = self.authority.issue("mallory")
        _, factory = await self.connect(
            self.clientString(port, extra=f":certificate={certificate}:privateKey={key}")
        )
        with self.assertRaises(pb.RemoteError) as caught:
            await factory.login(pb.CertificateLogin())
        self.assertIn(b"UnauthorizedLogin", caught.exception.remoteType)

    async def test_clientWithoutCertificateRefused(self) -> None:
        """A client without a certificate does not get through the handshake."""
        port = await self.mutualServer()
        await self.assertRefused(self.clientString(port))

    async def test_certificateFromAnotherAuthorityRefused(self) -> None:
        """A client certificate from an untrusted CA does not get through the handshake."""
        port = await self.mutualServer()
        certificate, key = self.stranger.issue("alice")
        await self.assertRefused(
            self.clientString(port, extra=f":certificate={certificate}:privateKey={key}")
        )


class CheckerTests(TestCase):
    def test_fingerprintsNormalised(self) -> None:
        """Fingerprints match whatever their case and colons."""
        credentials = tls.PeerCertificate(b"der bytes", None)
        spaced = ":".join(credentials.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
        checker = tls.PeerCertificateChecker(fingerprints={spaced: b"bob"})
        self.assertEqual(self.successResultOf(checker.requestAvatarId(credentials)), b"bob")
        self.failureResultOf(tls.PeerCertificateChecker().requestAvatarId(credentials))

    def test_fingerprintsThatCannotMatchRefused(self) -> None:
        """A fingerprint that is not 64 hex digits (a SHA-1 one, as openssl prints by
        default; a typo) could never match: refused when the checker is made, saying so."""
        sha256 = tls.PeerCertificate(b"der bytes", None).fingerprint
        for bad in (sha256[:40], sha256 + "0", sha256[:-1] + "g", "not one"):
            with self.assertRaises(ValueError) as caught:
                tls.PeerCertificateChecker(fingerprints={bad: b"bob"})
            self.assertIn("not a SHA-256 fingerprint", str(caught.exception))
        asBytes = tls.PeerCertificateChecker(fingerprints={sha256.upper().encode(): b"bob"})
        self.assertEqual(asBytes.fingerprints, {sha256: b"bob"})
        spaced = " ".join(sha256[i : i + 2] for i in range(0, 64, 2))
        checker = tls.PeerCertificateChecker(fingerprints={spaced: b"bob"})
        credentials = tls.PeerCertificate(b"der bytes", None)
        self.assertEqual(self.successResultOf(checker.requestAvatarId(credentials)), b"bob")

    def test_damagedFilesNamed(self) -> None:
        """A damaged PEM certificate, in a CA file or a chain, or one that does not go with
        its key, is refused naming the file, with OpenSSL's reason in words."""
        directory = self.mktemp()
        os.makedirs(directory)
        authority = Authority(directory, "ca")
        certificate, key = authority.issue("localhost", ("localhost",))
        otherCertificate, _ = authority.issue("other", ("other",))
        damaged = os.path.join(directory, "damaged.pem")
        with open(damaged, "w") as file:
            file.write("-----BEGIN CERTIFICATE-----\nnot base 64!\n-----END CERTIFICATE-----\n")
        chained = os.path.join(directory, "chained.pem")
        with open(chained, "wb") as file:
            file.write(Path(certificate).read_bytes() + Path(damaged).read_bytes())
        for make, named in (
            (lambda: tls.clientEndpoint(reactor, "h", 1, caFile=damaged), damaged),
            (lambda: tls.serverEndpoint(reactor, 0, certificate, key, clientCA=damaged), damaged),
            (lambda: tls.serverEndpoint(reactor, 0, chained, key), chained),
            (lambda: tls.serverEndpoint(reactor, 0, otherCertificate, key), otherCertificate),
        ):
            with self.assertRaises(ValueError) as caught:
                make()
            self.assertIn(repr(named), str(caught.exception))
            self.assertNotIn("[(", str(caught.exception))  # (not OpenSSL's tuples)

    def test_severalCommonNamesAreNone(self) -> None:
        """A client certificate whose subject has two common names has none for the
        checker (tools differ on which counts), so no common name maps it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
                x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )

        class Transport:
            def getPeerCertificate(self) -> Any:
                from OpenSSL.crypto import X509

                return X509.from_cryptography(certificate)

        credentials = tls.PeerCertificate.fromTransport(Transport())
        assert credentials is not None
        self.assertIsNone(credentials.commonName)
        checker = tls.PeerCertificateChecker(commonNames={"alice": b"alice", "mallory": b"m"})
        self.failureResultOf(checker.requestAvatarId(credentials), UnauthorizedLogin)

    def test_serverEndpointNeedsAuthorities(self) -> None:
        """A clientCA file without certificates is refused."""
        empty = self.mktemp()
        with open(empty, "wb") as f:
            f.write(b"no certificates here")
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = Authority(directory, "ca").issue("localhost", ("localhost",))
        with self.assertRaises(ValueError):
            tls.serverEndpoint(reactor, 0, certificate, key, clientCA=empty)

    def test_clientEndpointArguments(self) -> None:
        """A certificate without its key, or an empty CA file, is refused."""
        directory = self.mktemp()
        os.makedirs(directory)
        authority = Authority(directory, "ca")
        certificate, _key = authority.issue("alice")
        with self.assertRaises(ValueError):
            tls.clientEndpoint(reactor, "localhost", 1, certificate=certificate)
        empty = os.path.join(directory, "empty.pem")
        with open(empty, "wb") as f:
            f.write(b"")
        with self.assertRaises(ValueError):
            tls.clientEndpoint(reactor, "localhost", 1, caFile=empty)

    def test_endpointPortsAndNamesChecked(self) -> None:
        """A port that is not an integer from 0 (server) or 1 (client) to 65535, a host or
        interface that is not text, or a client key without its certificate, is refused
        at the call, naming it, rather than when the endpoint listens or connects."""
        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = Authority(directory, "ca").issue("localhost", ("localhost",))
        for call, error, named in (
            (lambda: tls.serverEndpoint(reactor, "8789", certificate, key), TypeError, "port"),
            (lambda: tls.serverEndpoint(reactor, None, certificate, key), TypeError, "port"),
            (lambda: tls.serverEndpoint(reactor, 70000, certificate, key), ValueError, "port"),
            (lambda: tls.serverEndpoint(reactor, -1, certificate, key), ValueError, "port"),
            (
                lambda: tls.serverEndpoint(reactor, 0, certificate, key, interface=5),
                TypeError,
                "interface must be text (str), not 5",
            ),
            (lambda: tls.clientEndpoint(reactor, "localhost", 0), ValueError, "port"),
            (lambda: tls.clientEndpoint(reactor, "localhost", "1"), TypeError, "port"),
            (
                lambda: tls.clientEndpoint(reactor, None, 1),
                TypeError,
                "host must be a name or address (str or bytes), not None",
            ),
            (
                lambda: tls.clientEndpoint(reactor, "localhost", 1, privateKey=key),
                ValueError,
                "a client private key needs its certificate",
            ),
        ):
            with self.assertRaises(error) as caught:
                call()
            self.assertIn(named, str(caught.exception))
        tls.serverEndpoint(reactor, 0, certificate, key)  # any free port
        tls.clientEndpoint(reactor, "localhost", 65535)
        tls.clientEndpoint(reactor, b"127.0.0.1", 1, hostname="localhost")
        tls.clientEndpoint(reactor, b"localhost", 1)
        tls.clientEndpoint(reactor, "localhost", 1, hostname="")  # the host's name, as before
        with self.assertRaises(ValueError) as caught:
            tls.clientEndpoint(reactor, "caf\u00e9".encode(), 1)
        self.assertIn("a bytes host must be ASCII (an IDNA name)", str(caught.exception))

    def test_keyAndCertificateForms(self) -> None:
        """An encrypted key is taken as before (OpenSSL asks for its pass phrase in a
        terminal); refused without one, the error says so. A certificate under the old
        'X509 CERTIFICATE' label is a certificate."""
        from cryptography.hazmat.primitives import serialization

        directory = self.mktemp()
        os.makedirs(directory)
        certificate, key = Authority(directory, "ca").issue("localhost", ("localhost",))
        loaded = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        encrypted = os.path.join(directory, "encrypted.key")
        Path(encrypted).write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        with self.assertRaises(ValueError) as caught:
            tls.serverEndpoint(reactor, 0, certificate, encrypted)
        self.assertIn("is encrypted, and could not be decrypted", str(caught.exception))
        old = os.path.join(directory, "old.pem")
        text = Path(certificate).read_text()
        Path(old).write_text(text.replace(" CERTIFICATE-----", " X509 CERTIFICATE-----"))
        tls.serverEndpoint(reactor, 0, old, key)

    def test_noCertificateOnPlainTransport(self) -> None:
        """A transport without TLS has no peer certificate."""
        self.assertIsNone(tls.PeerCertificate.fromTransport(object()))
