"""
TLS for brokers: endpoints with certificate verification, and client certificates as login
credentials (mutual TLS).

Any Twisted endpoint string works with :func:`pbroker.pb.listen` and
:func:`pbroker.pb.connect`, so TLS is one string away::

    pb.listen("ssl:8789:interface=127.0.0.1:privateKey=server.key:certKey=server.pem", factory)
    pb.connect("tls:broker.example:8789:trustRoots=/etc/pbroker/ca", clientFactory)

The ``tls:`` client verifies the server's certificate against the CA certificates in
``trustRoots`` (a directory) and its name against the host name; :func:`clientEndpoint` does
the same with a CA file, and also refuses a certificate whose name cannot be checked at all
(no subjectAltName), which Twisted's check behind ``tls:`` lets through. Stock ``ssl:``
server strings cannot require client certificates; :func:`serverEndpoint` can (``clientCA``),
and then a client logs in with its certificate: ``factory.login(pb.CertificateLogin())``
reaches the avatar that a :class:`PeerCertificateChecker` maps the verified certificate to.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamServerEndpoint
from zope.interface import Attribute, implementer

from pbroker.errors import isInteger

__all__ = [
    "CertificateLogin",
    "IPeerCertificate",
    "PeerCertificate",
    "PeerCertificateChecker",
    "clientEndpoint",
    "serverEndpoint",
]


def _checkPort(port: Any, lowest: int) -> None:
    """
    TypeError or ValueError, naming ``port``, unless it is an integer from ``lowest`` to
    65535 (now, not when the endpoint listens or connects).
    """
    if not isInteger(port):
        raise TypeError(f"port must be an integer, not {port!r}")
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be from {lowest} to 65535, not {port}")


def _checkText(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be text (str), not {value!r}")


def _readPEM(path: str) -> bytes:
    with open(path, "rb") as pemFile:
        return pemFile.read()


def serverEndpoint(
    reactor: Any,
    port: int,
    certificate: str,
    privateKey: str,
    *,
    interface: str = "127.0.0.1",
    clientCA: str | None = None,
) -> IStreamServerEndpoint:
    """
    A TLS server endpoint.

    :param certificate: path of the server's PEM certificate (and any chain after it).
    :param privateKey: path of the server's PEM private key.
    :param interface: the address to listen on (loopback by default).
    :param clientCA: path of a PEM file of CA certificates; if given, every client must
        present a certificate signed by one of them, or the handshake fails.
    """
    # Imported here: OpenSSL is loaded only by programs that use TLS.
    from twisted.internet import ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint

    _checkPort(port, 0)  # 0: any free port
    _checkText(interface, "interface")
    serverCertificate, chain = _withChain(certificate, privateKey)
    verification: dict[str, Any] = {}
    if clientCA is not None:
        authorities = _loadAuthorities(clientCA)
        verification = {
            "verify": True,
            "requireCertificate": True,
            "caCerts": [authority.original for authority in authorities],
        }
    contextFactory = ssl.CertificateOptions(
        privateKey=serverCertificate.privateKey.original,
        certificate=serverCertificate.original,
        extraCertChain=chain,
        **verification,
    )
    return SSL4ServerEndpoint(reactor, port, contextFactory, interface=interface)


def clientEndpoint(
    reactor: Any,
    host: str | bytes,
    port: int,
    *,
    caFile: str | None = None,
    hostname: str | None = None,
    certificate: str | None = None,
    privateKey: str | None = None,
) -> Any:
    """
    A TLS client endpoint that verifies the server.

    :param host: where to connect (a name or an address).
    :param caFile: path of a PEM file of the CA certificates to trust (the platform's CAs if
        not given).
    :param hostname: the name the server's certificate must carry (``host`` if not given).
    :param certificate: path of this client's PEM certificate (and any chain after it),
        for mutual TLS.
    :param privateKey: path of this client's PEM private key (with ``certificate``).
    """
    # Imported here: OpenSSL is loaded only by programs that use TLS.
    from twisted.internet import ssl
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    if not isinstance(host, (str, bytes)):
        raise TypeError(f"host must be a name or address (str or bytes), not {host!r}")
    _checkPort(port, 1)
    if privateKey is not None and certificate is None:
        raise ValueError("a client private key needs its certificate (certificate=...)")
    trustRoot: Any = None
    if caFile is not None:
        authorities = _loadAuthorities(caFile)
        trustRoot = ssl.trustRootFromCertificates(authorities)
    clientCertificate = None
    extra: dict[str, Any] = {}
    if certificate is not None:
        if privateKey is None:
            raise ValueError("a client certificate needs its private key")
        clientCertificate, extra["extraCertChain"] = _withChain(certificate, privateKey)
    if not hostname:
        if isinstance(host, bytes):
            try:
                hostname = host.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError(
                    f"a bytes host must be ASCII (an IDNA name), not {host!r}: give a "
                    "non-ASCII name as str"
                ) from None
        else:
            hostname = host
    options = ssl.optionsForClientTLS(
        hostname,
        trustRoot=trustRoot,
        clientCertificate=clientCertificate,
        extraCertificateOptions=extra,
    )
    return wrapClientTLS(_NameChecked(options, hostname), HostnameEndpoint(reactor, host, port))


@implementer(IOpenSSLClientConnectionCreator)
class _NameChecked:
    """
    Twisted's client TLS options, with a check of the server's name that fails closed.

    Twisted's own check fails the handshake only on a name that does not match; when the
    check cannot be made at all (service-identity's ``CertificateError``: a certificate
    without a subjectAltName, or with a malformed one), it logs the error and accepts the
    certificate. A client certificate of the same CA (with no subjectAltName, as user
    certificates go) would then pass for the server.
    """

    def __init__(self, options: Any, hostname: str) -> None:
        from twisted.internet.abstract import isIPAddress, isIPv6Address

        self._options = options
        self._hostname = hostname
        self._isAddress = isIPAddress(hostname) or isIPv6Address(hostname)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL.SSL import VERIFY_FAIL_IF_NO_PEER_CERT, VERIFY_PEER
        from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
        from service_identity.pyopenssl import extract_patterns
        from twisted.python.failure import Failure

        connection = self._options.clientConnectionForTLS(tlsProtocol)
        identity = IPAddress_ID(self._hostname) if self._isAddress else DNS_ID(self._hostname)

        def verify(connection: Any, certificate: Any, error: int, depth: int, ok: int) -> bool:
            if depth or not ok:
                return bool(ok)  # (the chain: OpenSSL's verdict)
            try:
                verify_service_identity(extract_patterns(certificate), [identity], [])
            except Exception:
                # Any error: a name that does not match, or one that cannot be checked.
                tlsProtocol.failVerification(Failure())
                return False
            return True

        connection.set_verify(VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, verify)
        return connection


def _withChain(certificate: str, privateKey: str) -> tuple[Any, list[Any]]:
    """
    The certificate at the start of the PEM file ``certificate``, with the key in
    ``privateKey``, and the certificates after it (a "fullchain.pem"), sent with it so that
    a peer that trusts only the root can verify it. (loadPEM reads only the first.)
    """
    from twisted.internet import ssl

    certificates = _readPEM(certificate)
    if b"CERTIFICATE-----" not in certificates:  # (any label: X509, TRUSTED...)
        raise ValueError(f"no certificate in {certificate!r}")
    keyPEM = _readPEM(privateKey)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    encrypted = False
    try:
        load_pem_private_key(keyPEM, password=None)
    except TypeError:
        encrypted = True  # OpenSSL asks for its pass phrase (in a terminal), as it always did
    except ValueError:
        raise ValueError(f"no private key that can be read in {privateKey!r}") from None
    try:
        own = ssl.PrivateCertificate.loadPEM(certificates + b"\n" + keyPEM)
    except Exception as e:
        if not encrypted:
            raise ValueError(
                f"the certificate in {certificate!r} and the key in {privateKey!r} cannot be "
                f"used together: {_openSSLReason(e)}"
            ) from None
        raise ValueError(
            f"the private key in {privateKey!r} is encrypted, and could not be decrypted "
            "(no pass phrase given, or a wrong one)"
        ) from None
    chain = [_loadCertificate(pem, certificate).original for pem in _splitPEM(certificates)[1:]]
    return own, chain


def _loadAuthorities(path: str) -> list[Any]:
    """
    The CA certificates in a PEM file.

    :raises ValueError: the file holds none.
    """

    authorities = [_loadCertificate(pem, path) for pem in _splitPEM(_readPEM(path))]
    if not authorities:
        raise ValueError(f"no certificate in {path!r}")
    return authorities


def _loadCertificate(pem: bytes, path: str) -> Any:
    """
    The certificate ``pem`` read from the file ``path``, or ValueError naming the file.
    """
    from twisted.internet import ssl

    try:
        return ssl.Certificate.loadPEM(pem)
    except Exception as e:
        raise ValueError(f"a certificate in {path!r} cannot be read: {_openSSLReason(e)}") from None


def _openSSLReasons(error: BaseException) -> list[str]:
    """
    The reason strings of OpenSSL's ``error`` (the last of each (library, function,
    reason) tuple it holds), in order; none for another error.
    """
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry and entry[-1]]


def _openSSLReason(error: Exception) -> str:
    """
    What OpenSSL's ``error`` says, in a few words (its reason strings), not its tuples.
    """
    return "; ".join(_openSSLReasons(error)) or str(error) or type(error).__name__


def _splitPEM(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [part + marker for part in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in part]


class IPeerCertificate(ICredentials):
    """
    Credentials proven by the TLS handshake: the client's verified certificate.
    """

    fingerprint = Attribute("The SHA-256 fingerprint of the certificate, lowercase hex.")
    commonName = Attribute("The subject's common name, as text (or None).")


@implementer(IPeerCertificate)
class PeerCertificate:
    """
    The certificate a client presented (and TLS verified), as login credentials.
    """

    def __init__(self, der: bytes, commonName: str | None) -> None:
        self.fingerprint = hashlib.sha256(der).hexdigest()
        self.commonName = commonName

    @classmethod
    def fromTransport(cls, transport: Any) -> PeerCertificate | None:
        """
        The verified client certificate of a TLS transport, or ``None`` if there is none.
        """
        getPeerCertificate = getattr(transport, "getPeerCertificate", None)
        peer = getPeerCertificate() if getPeerCertificate is not None else None
        if peer is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding
        from cryptography.x509.oid import NameOID

        certificate = peer.to_cryptography()
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        # A subject with several common names has none here: tools differ on which one
        # counts (the first, the last), so a CA that checked one may have issued another.
        commonName = str(names[0].value) if len(names) == 1 else None
        return cls(certificate.public_bytes(Encoding.DER), commonName)


@implementer(ICredentialsChecker)
class PeerCertificateChecker:
    """
    Maps verified client certificates to avatar ids, by fingerprint or by common name.

    :param fingerprints: SHA-256 fingerprint (64 hex digits, any case, colons or spaces
        allowed, as ``openssl x509 -fingerprint -sha256`` prints it) -> avatar id; anything
        else raises :class:`ValueError` (a SHA-1 fingerprint, say, would never match).
    :param commonNames: subject common name -> avatar id; only safe when the CA given to
        :func:`serverEndpoint` issues certificates for your users alone.
    """

    credentialInterfaces = (IPeerCertificate,)

    def __init__(
        self,
        fingerprints: dict[str, bytes] | None = None,
        commonNames: dict[str, bytes] | None = None,
    ) -> None:
        self.fingerprints = {}
        for key, avatarId in (fingerprints or {}).items():
            text = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
            digits = "".join(text.replace(":", "").split()).lower()
            if len(digits) != 64 or digits.strip("0123456789abcdef"):
                raise ValueError(
                    f"not a SHA-256 fingerprint (64 hex digits): {key!r} (openssl x509 "
                    "-fingerprint prints SHA-1 unless given -sha256)"
                )
            self.fingerprints[digits] = avatarId
        self.commonNames = dict(commonNames or {})

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        """
        The avatar id the certificate's fingerprint, or else its common name, maps to; else
        :class:`~twisted.cred.error.UnauthorizedLogin`.
        """
        avatarId = self.fingerprints.get(credentials.fingerprint)
        if avatarId is None and credentials.commonName is not None:
            avatarId = self.commonNames.get(credentials.commonName)
        if avatarId is None:
            return fail(UnauthorizedLogin("no account for this client certificate"))
        return succeed(avatarId)


class CertificateLogin:
    """
    Give it to :meth:`pbroker.pb.PBClientFactory.login` to log in with the client certificate
    of the TLS connection.
    """
