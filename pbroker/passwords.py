"""
Password verifiers and the file that holds them, for pbroker's own password login.

pbroker peers log in with a mutual challenge-response in the style of SCRAM-SHA-256
(RFC 7677): the server stores, per user, only a random salt, an iteration count and two keys
derived from the password with PBKDF2-HMAC-SHA256 (a *verifier*), never the password or an
unsalted hash of it. Both sides send fresh nonces, so a recorded exchange cannot be replayed,
and the server proves in turn that it knows the verifier, so a server that does not cannot
fake a successful login. Stock Twisted peers keep using the legacy MD5 exchange
(:mod:`pbroker.cred`), which a server can switch off.

The file has one line per user, ``name:scram-sha256:iterations:salt:storedKey:serverKey``
with the last three in base64. Add or replace a user with::

    python -m pbroker.passwords add FILE USERNAME

which asks for the password (or reads it from the ``PBROKER_PASSWORD`` environment variable).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, implementer

__all__ = [
    "DEFAULT_ITERATIONS",
    "IScramProof",
    "PasswordFile",
    "ScramChecker",
    "ScramVerifier",
    "authMessage",
    "clientProof",
    "serverSignature",
]

#: PBKDF2 iterations for new verifiers (OWASP's 2023 figure for PBKDF2-HMAC-SHA256).
DEFAULT_ITERATIONS = 600_000

_SCHEME = "scram-sha256"


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _saltedPassword(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


@dataclass(frozen=True)
class ScramVerifier:
    """
    What the server keeps for one user: enough to check a login, not to log in.
    """

    salt: bytes
    iterations: int
    storedKey: bytes
    serverKey: bytes

    @classmethod
    def fromPassword(
        cls, password: bytes, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
    ) -> ScramVerifier:
        """
        Derive a verifier from a password, with a fresh random salt unless one is given.
        """
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, not {iterations}")
        salt = secrets.token_bytes(16) if salt is None else salt
        salted = _saltedPassword(password, salt, iterations)
        clientKey = _hmac(salted, b"Client Key")
        return cls(
            salt=salt,
            iterations=iterations,
            storedKey=hashlib.sha256(clientKey).digest(),
            serverKey=_hmac(salted, b"Server Key"),
        )

    def toLine(self, username: str) -> str:
        """
        The password-file line for ``username``.
        """
        if not username or ":" in username or "\n" in username:
            raise ValueError(f"a username cannot be empty or hold ':' or newlines: {username!r}")
        fields = [self.salt, self.storedKey, self.serverKey]
        encoded = [base64.b64encode(field).decode("ascii") for field in fields]
        return ":".join([username, _SCHEME, str(self.iterations), *encoded])

    @classmethod
    def fromLine(cls, line: str) -> tuple[str, ScramVerifier]:
        """
        Parse one password-file line into ``(username, verifier)``.

        :raises ValueError: the line is not a verifier line.
        """
        parts = line.strip().split(":")
        if len(parts) != 6 or parts[1] != _SCHEME:
            raise ValueError("not a pbroker password line")
        username, _, iterations, salt, storedKey, serverKey = parts
        return username, cls(
            salt=base64.b64decode(salt, validate=True),
            iterations=int(iterations),
            storedKey=base64.b64decode(storedKey, validate=True),
            serverKey=base64.b64decode(serverKey, validate=True),
        )


def authMessage(
    username: bytes, clientNonce: bytes, serverNonce: bytes, salt: bytes, iterations: int
) -> bytes:
    """
    The transcript both sides sign: every field, length-prefixed so none can run into another.
    """
    fields = [
        b"pbroker-scram-sha256",
        username,
        clientNonce,
        serverNonce,
        salt,
        str(iterations).encode(),
    ]
    return b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def clientProof(password: bytes, salt: bytes, iterations: int, message: bytes) -> bytes:
    """
    The client's proof that it knows the password, for the transcript ``message``.
    """
    salted = _saltedPassword(password, salt, iterations)
    clientKey = _hmac(salted, b"Client Key")
    signature = _hmac(hashlib.sha256(clientKey).digest(), message)
    return _xor(clientKey, signature)


def serverSignature(serverKey: bytes, message: bytes) -> bytes:
    """
    The server's proof that it knows the verifier, for the transcript ``message``.
    """
    return _hmac(serverKey, message)


def expectedServerSignature(password: bytes, salt: bytes, iterations: int, message: bytes) -> bytes:
    """
    What the client expects :func:`serverSignature` to be, computed from the password.
    """
    serverKey = _hmac(_saltedPassword(password, salt, iterations), b"Server Key")
    return serverSignature(serverKey, message)


class IScramProof(ICredentials):
    """
    A login proof from the pbroker password exchange.
    """

    username = Attribute("The username, as bytes.")

    def checkVerifier(verifier: ScramVerifier) -> bool:
        """
        Whether the proof was made with the password ``verifier`` was derived from.
        """


@implementer(IScramProof)
class ScramProof:
    """
    The client's proof for one exchange, checked against a stored verifier.
    """

    def __init__(self, username: bytes, message: bytes, proof: bytes) -> None:
        self.username = username
        self.message = message
        self.proof = proof

    def checkVerifier(self, verifier: ScramVerifier) -> bool:
        if len(self.proof) != len(verifier.storedKey):
            return False
        clientKey = _xor(self.proof, _hmac(verifier.storedKey, self.message))
        return hmac.compare_digest(hashlib.sha256(clientKey).digest(), verifier.storedKey)


class PasswordFile:
    """
    Verifiers read from a password file, re-read whenever the file changes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._verifiers: dict[bytes, ScramVerifier] = {}

    def verifierFor(self, username: bytes) -> ScramVerifier | None:
        """
        The verifier of ``username``, or ``None`` if there is no such user.
        """
        self._reloadIfChanged()
        return self._verifiers.get(username)

    def _reloadIfChanged(self) -> None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._verifiers, self._stamp = {}, None
            return
        stamp = (status.st_mtime, status.st_size)
        if stamp == self._stamp:
            return
        verifiers: dict[bytes, ScramVerifier] = {}
        with open(self.path, encoding="utf-8") as passwordFile:
            for line in passwordFile:
                if not line.strip() or line.startswith("#"):
                    continue
                username, verifier = ScramVerifier.fromLine(line)
                verifiers[username.encode("utf-8")] = verifier
        self._verifiers, self._stamp = verifiers, stamp

    def setPassword(
        self, username: str, password: bytes, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """
        Add ``username`` (or replace its verifier); the file is written readable by its owner
        only.
        """
        line = ScramVerifier.fromPassword(password, iterations).toLine(username)
        kept: list[str] = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as passwordFile:
                kept = [
                    existing.rstrip("\n")
                    for existing in passwordFile
                    if existing.split(":", 1)[0] != username
                ]
        temporary = self.path + ".new"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as passwordFile:
            passwordFile.write("\n".join([*kept, line]) + "\n")
        os.replace(temporary, self.path)
        self._stamp = None


@implementer(ICredentialsChecker)
class ScramChecker:
    """
    Checks pbroker password-login proofs against a source of verifiers (a
    :class:`PasswordFile`, or anything with ``verifierFor(username)``).

    Its ``verifierFor`` is also what the login exchange asks for a user's salt and iteration
    count; an unknown user gets a made-up salt, so the exchange does not reveal who exists.
    """

    credentialInterfaces = (IScramProof,)

    def __init__(self, verifiers: Any, iterations: int = DEFAULT_ITERATIONS) -> None:
        self.verifiers = verifiers
        self.iterations = iterations
        self._secret = secrets.token_bytes(32)

    def verifierFor(self, username: bytes) -> tuple[ScramVerifier, bool]:
        """
        ``(verifier, known)``: the user's verifier, or a decoy with a stable fake salt.
        """
        verifier = self.verifiers.verifierFor(username)
        if verifier is not None:
            return verifier, True
        decoy = ScramVerifier(
            salt=_hmac(self._secret, b"salt:" + username)[:16],
            iterations=self.iterations,
            storedKey=_hmac(self._secret, b"stored:" + username),
            serverKey=_hmac(self._secret, b"server:" + username),
        )
        return decoy, False

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        """
        The username, if the client's proof matches the user's verifier; else
        :class:`~twisted.cred.error.UnauthorizedLogin` (an unknown user is refused the same way).
        """
        verifier, known = self.verifierFor(credentials.username)
        if known and credentials.checkVerifier(verifier):
            return succeed(credentials.username)
        return fail(UnauthorizedLogin("bad username or password"))


def main(argv: list[str] | None = None) -> int:
    """
    ``python -m pbroker.passwords add FILE USERNAME [--iterations N]``.
    """
    # Imported here: only the command line needs them.
    import argparse
    import getpass

    parser = argparse.ArgumentParser(
        prog="python -m pbroker.passwords", description="Manage a pbroker password file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user, or set a user's password")
    add.add_argument("file")
    add.add_argument("username")
    add.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    options = parser.parse_args(argv)
    password = os.environ.get("PBROKER_PASSWORD")
    if password is None:
        password = getpass.getpass(f"Password for {options.username}: ")
        if getpass.getpass("Again: ") != password:
            print("The passwords differ; nothing was changed.", file=sys.stderr)
            return 1
    if not password:
        print("An empty password is not allowed; nothing was changed.", file=sys.stderr)
        return 1
    try:
        PasswordFile(options.file).setPassword(
            options.username, password.encode("utf-8"), options.iterations
        )
    except (OSError, ValueError) as e:
        print(f"Could not update {options.file}: {e}", file=sys.stderr)
        return 1
    print(f"Set the password of {options.username} in {options.file}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
