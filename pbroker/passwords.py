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
with the last three in base64; blank lines and lines that start with ``#`` are skipped. A
username is UTF-8 text without whitespace, control characters or ``:``, and does not start
with ``#`` (any other would not read back as written). Add or replace a user with::

    python -m pbroker.passwords add FILE USERNAME

which asks for the password (or reads it from the ``PBROKER_PASSWORD`` environment variable).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
import sys
import unicodedata
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import Attribute, implementer

from pbroker.errors import ProtocolError, describe

__all__ = [
    "DEFAULT_ITERATIONS",
    "MAX_ITERATIONS",
    "MAX_SALT_LENGTH",
    "MIN_ITERATIONS",
    "MIN_SALT_LENGTH",
    "IScramProof",
    "PasswordFile",
    "ScramChecker",
    "ScramVerifier",
    "authMessage",
    "checkUsername",
    "clientProof",
    "clientProofAndSignature",
    "expectedServerSignature",
    "parseChallenge",
    "serverSignature",
]

#: PBKDF2 iterations for new verifiers (OWASP's 2023 figure for PBKDF2-HMAC-SHA256).
DEFAULT_ITERATIONS = 600_000

#: The largest PBKDF2 iteration count a verifier may have and a pbroker client accepts from a
#: server: ten times :data:`DEFAULT_ITERATIONS`. The count a server announces (or anyone who
#: can change plain-TCP traffic) sets how long the client computes, a core busy and the login
#: waiting; this bounds that to a few seconds.
MAX_ITERATIONS = 10 * DEFAULT_ITERATIONS

#: The smallest PBKDF2 iteration count a verifier may have and a pbroker client accepts (the
#: floor RFC 5802 sets for SCRAM). The client's proof lets whoever saw it test password guesses
#: at the cost of this many iterations each; the floor stops a server, or anyone who can change
#: plain-TCP traffic, from asking for a proof that is cheap to attack.
MIN_ITERATIONS = 4096

#: The fewest bytes of salt a verifier may have and a client accepts (new salts have 16).
MIN_SALT_LENGTH = 8
#: The most bytes of salt a verifier may have and a client accepts.
MAX_SALT_LENGTH = 64

# Nonce lengths both sides accept (pbroker sends 24 bytes).
_MIN_NONCE_LENGTH = 16
_MAX_NONCE_LENGTH = 64

_SCHEME = "scram-sha256"
# The comment line that holds the secret decoys are made from (see PasswordFile.decoyBasis).
_SECRET_PREFIX = "# pbroker-decoy-secret: "


def _parseLine(path: str, number: int, line: str) -> tuple[str, ScramVerifier]:
    """
    ``ScramVerifier.fromLine(line)``, its error naming the file and the line.
    """
    try:
        return ScramVerifier.fromLine(line)
    except ValueError as e:
        raise ValueError(f"{path}, line {number}: {e}") from None


def _secretIn(line: str) -> bytes | None:
    """
    The decoy secret a password-file line holds, or ``None`` (another line, or a damaged one).
    """
    if not line.startswith(_SECRET_PREFIX):
        return None
    try:
        secret = base64.b64decode(line[len(_SECRET_PREFIX) :].strip(), validate=True)
    except ValueError:
        return None
    return secret if len(secret) >= 16 else None


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _saltedPassword(password: bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _checkSaltAndIterations(salt: bytes, iterations: int) -> None:
    if not MIN_SALT_LENGTH <= len(salt) <= MAX_SALT_LENGTH:
        raise ValueError(
            f"a salt must have {MIN_SALT_LENGTH} to {MAX_SALT_LENGTH} bytes, not {len(salt)}"
        )
    _checkIterations(iterations)


def _checkIterations(iterations: int) -> None:
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(
            f"iterations must be {MIN_ITERATIONS} to {MAX_ITERATIONS}, not {describe(iterations)}"
        )


def checkUsername(username: str) -> None:
    """
    Refuse a username the password file could not give back as written.

    :raises ValueError: (with a one-line message) the username is empty, is not valid UTF-8
        text, is longer than :data:`pbroker.cred.MAX_USERNAME` bytes (a login gives no
        longer one), starts with ``#`` (a comment), or holds whitespace, control characters
        or ``:``.
    """
    from pbroker.cred import MAX_USERNAME

    if not isinstance(username, str):
        raise TypeError(f"a username must be text (str), not {type(username).__name__}")
    try:
        encoded = username.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"a username must be valid UTF-8 text: {describe(username)}") from None
    if len(encoded) > MAX_USERNAME:
        raise ValueError(f"a username is at most {MAX_USERNAME} bytes, not {len(encoded)}")
    if (
        not username
        or username.startswith("#")
        or ":" in username
        or any(c.isspace() or unicodedata.category(c) == "Cc" for c in username)
    ):
        raise ValueError(
            "a username cannot be empty, start with '#', or hold whitespace, control "
            f"characters or ':': {username!r}"
        )


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
        cls, password: bytes | str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
    ) -> ScramVerifier:
        """
        Derive a verifier from a password, with a fresh random salt unless one is given.

        :param password: bytes, or text, which is taken as its UTF-8 bytes (as a login takes it).
        :raises ValueError: the iteration count or the salt's length is one that clients
            refuse (see :data:`MIN_ITERATIONS`, :data:`MAX_ITERATIONS`, :data:`MIN_SALT_LENGTH`).
        :raises TypeError: the password is neither bytes nor text.
        """
        if isinstance(password, str):
            try:
                password = password.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a password must be valid UTF-8 text") from None
        elif not isinstance(password, bytes):
            raise TypeError(f"a password must be bytes or str, not {type(password).__name__}")
        salt = secrets.token_bytes(16) if salt is None else salt
        _checkSaltAndIterations(salt, iterations)
        salted = _saltedPassword(password, salt, iterations)
        clientKey = _clientKey(salted)
        return cls(
            salt=salt,
            iterations=iterations,
            storedKey=hashlib.sha256(clientKey).digest(),
            serverKey=_serverKey(salted),
        )

    def toLine(self, username: str) -> str:
        """
        The password-file line for ``username``.

        :raises ValueError: the username would not read back as written (see
            :func:`checkUsername`).
        """
        checkUsername(username)
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


def parseChallenge(answer: object) -> tuple[bytes, bytes, int, object]:
    """
    Check the server's answer to ``passwordLogin`` before the client spends any work on it:
    ``(serverNonce, salt, iterations, prover)``, with a nonce of 16 to 64 bytes, a salt of
    :data:`MIN_SALT_LENGTH` to :data:`MAX_SALT_LENGTH` bytes and :data:`MIN_ITERATIONS` to
    :data:`MAX_ITERATIONS` iterations (the server chooses the count, and so how long the client
    computes and how cheaply its proof can be attacked). The prover is returned unchecked.

    :raises ProtocolError: the answer is malformed or out of bounds.
    """
    if not isinstance(answer, (tuple, list)) or len(answer) != 4:
        raise ProtocolError(
            "the server's password challenge is not (nonce, salt, iterations, prover): "
            + describe(answer)
        )
    serverNonce, salt, iterations, prover = answer
    if not isinstance(serverNonce, bytes) or not (
        _MIN_NONCE_LENGTH <= len(serverNonce) <= _MAX_NONCE_LENGTH
    ):
        raise ProtocolError(
            f"the server's nonce must be {_MIN_NONCE_LENGTH} to {_MAX_NONCE_LENGTH} bytes, "
            f"not {describe(serverNonce)}"
        )
    if not isinstance(salt, bytes) or not MIN_SALT_LENGTH <= len(salt) <= MAX_SALT_LENGTH:
        raise ProtocolError(
            f"the server's salt must be {MIN_SALT_LENGTH} to {MAX_SALT_LENGTH} bytes, "
            f"not {describe(salt)}"
        )
    if type(iterations) is not int or not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ProtocolError(
            "the server's iteration count must be an integer from "
            f"{MIN_ITERATIONS} to {MAX_ITERATIONS}, "
            f"not {describe(iterations)}"
        )
    return serverNonce, salt, iterations, prover


def _clientKey(salted: bytes) -> bytes:
    return _hmac(salted, b"Client Key")


def _serverKey(salted: bytes) -> bytes:
    return _hmac(salted, b"Server Key")


def _proof(salted: bytes, message: bytes) -> bytes:
    clientKey = _clientKey(salted)
    return _xor(clientKey, _hmac(hashlib.sha256(clientKey).digest(), message))


def clientProof(password: bytes, salt: bytes, iterations: int, message: bytes) -> bytes:
    """
    The client's proof that it knows the password, for the transcript ``message``.
    """
    return _proof(_saltedPassword(password, salt, iterations), message)


def clientProofAndSignature(
    password: bytes, salt: bytes, iterations: int, message: bytes
) -> tuple[bytes, bytes]:
    """
    ``(proof, expected)``: the client's proof (:func:`clientProof`) and the server signature
    it expects in return (:func:`~pbroker.passwords.expectedServerSignature`), from one PBKDF2
    derivation, the costly step.
    """
    salted = _saltedPassword(password, salt, iterations)
    return _proof(salted, message), serverSignature(_serverKey(salted), message)


def serverSignature(serverKey: bytes, message: bytes) -> bytes:
    """
    The server's proof that it knows the verifier, for the transcript ``message``.
    """
    return _hmac(serverKey, message)


def expectedServerSignature(password: bytes, salt: bytes, iterations: int, message: bytes) -> bytes:
    """
    What the client expects :func:`serverSignature` to be, computed from the password.
    """
    return serverSignature(_serverKey(_saltedPassword(password, salt, iterations)), message)


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

    _log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int, int] | None = None
        self._verifiers: dict[bytes, ScramVerifier] = {}
        self._decoyBasis: tuple[bytes, int] | None = None

    def verifierFor(self, username: bytes) -> ScramVerifier | None:
        """
        The verifier of ``username``, or ``None`` if there is no such user.
        """
        self._reloadIfChanged()
        return self._verifiers.get(username)

    def decoyBasis(self) -> tuple[bytes, int] | None:
        """
        ``(secret, iterations)`` to make the decoys of unknown users with (see
        :class:`ScramChecker`), or ``None`` for a file without users.

        The secret is the random one ``setPassword`` writes into the file (a comment line
        that older versions skip), so it stays the same across restarts and while users come
        and go. A file without one (written by hand, or by an older version, until a password
        is next set) gets one derived from every user's keys, which only someone who knows
        every user's password could work out. The iteration count is the one most users have.
        """
        self._reloadIfChanged()
        return self._decoyBasis

    def _reloadIfChanged(self) -> None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._verifiers, self._decoyBasis, self._stamp = {}, None, None
            return
        # (The inode too: the tool writes a new file each time, and a password set again
        # is a line of the same size, perhaps within the file system's timestamp tick.)
        stamp = (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)
        if stamp == self._stamp:
            return
        verifiers: dict[bytes, ScramVerifier] = {}
        secret = None
        with open(self.path, encoding="utf-8") as passwordFile:
            for number, line in enumerate(passwordFile, 1):
                if line.startswith(_SECRET_PREFIX):
                    found = _secretIn(line)
                    if found is None:
                        self._log.warn(
                            "A damaged decoy secret line in {path} is ignored (setting a "
                            "password replaces it)",
                            path=self.path,
                        )
                    secret = found or secret
                    continue
                if not line.strip() or line.startswith("#"):
                    continue
                username, verifier = _parseLine(self.path, number, line)
                verifiers[username.encode("utf-8")] = verifier
        for name, verifier in verifiers.items():
            try:
                _checkSaltAndIterations(verifier.salt, verifier.iterations)
            except ValueError as e:
                self._log.warn(
                    "User {user!r} in {path} cannot log in from a pbroker client: {reason}; "
                    "set the password again (python -m pbroker.passwords add)",
                    user=name.decode("utf-8", "replace"),
                    path=self.path,
                    reason=str(e),
                )
        basis = None
        if verifiers:
            if not secret:
                keys = b"".join(v.storedKey + v.serverKey for v in verifiers.values())
                secret = _hmac(keys, b"pbroker decoy secret")
            counts = Counter(verifier.iterations for verifier in verifiers.values())
            basis = secret, counts.most_common(1)[0][0]
        self._verifiers, self._decoyBasis, self._stamp = verifiers, basis, stamp

    def setPassword(
        self, username: str, password: bytes | str, iterations: int = DEFAULT_ITERATIONS
    ) -> None:
        """
        Add ``username`` (or replace its verifier, moving it to the end of the file); the file
        is written readable by its owner only (mode 0600), or by its group too if the file
        it replaces was (0640). The file it replaces keeps its owner and group where this
        process may give them (as root): a server that runs as its own user still reads a
        file that root updated.

        The new file is written to ``FILE.new`` and then moved over ``FILE``; a ``FILE.new``
        left behind (a stale file, or a symbolic link planted there) is removed first, never
        written through, whatever its mode.

        :raises ValueError: the username would not read back as written
            (:func:`checkUsername`), or the iteration count is out of bounds.
        """
        checkUsername(username)  # before the verifier, which takes a while to derive
        line = ScramVerifier.fromPassword(password, iterations).toLine(username)
        kept, _ = self._linesWithout(username)
        self._write([*kept, line])

    def removeUser(self, username: str) -> bool:
        """
        Remove ``username`` from the file (written as :meth:`setPassword` writes it);
        whether it was there. A file without the user is left as it is.

        :raises ValueError: the file is not a pbroker password file.
        """
        checkUsername(username)  # (not a blank line, a comment or the decoy secret's)
        if not os.path.exists(self.path):
            return False
        kept, found = self._linesWithout(username)
        if found:
            self._write(kept)
        return found

    def usernames(self) -> list[str]:
        """
        The users in the file, in its order (the ones whose lines can be read).
        """
        self._reloadIfChanged()
        return [username.decode("utf-8", "surrogateescape") for username in self._verifiers]

    def _linesWithout(self, username: str) -> tuple[list[str], bool]:
        """
        The file's lines without ``username``'s (none for a file that does not exist), and
        whether it had one.

        :raises ValueError: a line of another user is not a pbroker password line.
        """
        kept: list[str] = []
        found = False
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as passwordFile:
                lines = [existing.rstrip("\n") for existing in passwordFile]
            for number, existing in enumerate(lines, 1):
                if existing.strip().split(":", 1)[0] == username:  # (read as the server reads it)
                    found = True
                    continue  # replaced or removed, damaged or not
                if existing.strip() and not existing.startswith("#"):
                    # Not a pbroker password file (/etc/passwd, a Twisted users file...):
                    # refuse it rather than rewrite it.
                    _parseLine(self.path, number, existing)
                kept.append(existing)
        return kept, found

    def _write(self, kept: list[str]) -> None:
        """
        Replace the file with the lines ``kept`` (and the decoy secret, if they have none).
        """
        if not any(_secretIn(existing) for existing in kept):
            # The secret the decoys of unknown users come from (see decoyBasis); a damaged
            # secret line is replaced.
            kept = [existing for existing in kept if not existing.startswith(_SECRET_PREFIX)]
            kept.insert(0, _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode())
        previous = None
        with suppress(FileNotFoundError):
            previous = os.stat(self.path)
        temporary = self.path + ".new"
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        # O_EXCL: a file (or link) that appeared since the unlink makes this fail, not get
        # written; fchmod: the umask must not leave the mode below 0600 either.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        descriptor = os.open(temporary, flags, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as passwordFile:
                descriptor = passwordFile.fileno()
                mode = 0o600
                if previous is not None:
                    _keepOwner(descriptor, previous)
                    if os.fstat(descriptor).st_gid == previous.st_gid:
                        # Readable by the group only if it is still the file's group, not
                        # the one of whoever wrote it.
                        mode |= previous.st_mode & stat.S_IRGRP
                os.fchmod(descriptor, mode)
                passwordFile.write("\n".join(kept) + "\n")
                passwordFile.flush()
                os.fsync(passwordFile.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary)
            raise
        self._stamp = None


def _keepOwner(descriptor: int, previous: os.stat_result) -> None:
    """
    Give the file open as ``descriptor`` the owner and group of the one it replaces, as far
    as this process may: root keeps both; another user keeps the group if it is one of
    theirs, and the file is otherwise theirs, as any file they write is (the command says
    so).
    """
    try:
        os.fchown(descriptor, previous.st_uid, previous.st_gid)
    except PermissionError:
        with suppress(PermissionError):
            os.fchown(descriptor, -1, previous.st_gid)


@implementer(ICredentialsChecker)
class ScramChecker:
    """
    Checks pbroker password-login proofs against a source of verifiers (a
    :class:`PasswordFile`, or anything with ``verifierFor(username)``).

    Its ``verifierFor`` is also what the login exchange asks for a user's salt and iteration
    count. An unknown user gets a decoy that looks like a user of the source: a made-up salt
    that stays the same across restarts, and the iteration count most users have, so that the
    exchange does not tell who exists (except a user whose iteration count differs from most
    users'). The decoys come from the source's ``decoyBasis()`` (see
    :meth:`PasswordFile.decoyBasis`); a source without it, or without users, gets decoys
    from a secret of this checker and ``iterations``, which change at every restart.

    :raises ValueError: ``iterations`` is outside :data:`MIN_ITERATIONS` to
        :data:`MAX_ITERATIONS`.
    """

    credentialInterfaces = (IScramProof,)

    def __init__(self, verifiers: Any, iterations: int = DEFAULT_ITERATIONS) -> None:
        _checkIterations(iterations)  # a decoy clients refuse would give unknown users away
        self.verifiers = verifiers
        self.iterations = iterations
        self._secret = secrets.token_bytes(32)

    def verifierFor(self, username: bytes) -> tuple[ScramVerifier, bool]:
        """
        ``(verifier, known)``: the user's verifier, or a decoy for an unknown user.
        """
        verifier = self.verifiers.verifierFor(username)
        if verifier is not None:
            return verifier, True
        decoyBasis = getattr(self.verifiers, "decoyBasis", None)
        basis = decoyBasis() if decoyBasis is not None else None
        secret, iterations = (self._secret, self.iterations) if basis is None else basis
        decoy = ScramVerifier(
            salt=_hmac(secret, b"salt:" + username)[:16],
            iterations=iterations,
            storedKey=_hmac(secret, b"stored:" + username),
            serverKey=_hmac(secret, b"server:" + username),
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
    ``python -m pbroker.passwords add FILE USERNAME [--iterations N]``, ``remove FILE
    USERNAME`` or ``list FILE``.
    """
    # Imported here: only the command line needs it.
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pbroker.passwords", description="Manage a pbroker password file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user, or set a user's password")
    add.add_argument("file")
    add.add_argument("username")
    add.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("file")
    remove.add_argument("username")
    listing = commands.add_parser("list", help="list the users, one a line")
    listing.add_argument("file")
    options = parser.parse_args(argv)
    path = options.file
    unchanged = "" if options.command == "list" else "; nothing was changed"
    if os.path.exists(path) and not os.path.isfile(path):
        # A directory, a named pipe (whose read would wait for ever), a device (which a
        # new file would replace): none is a password file.
        print(f"{path} is not a regular file{unchanged}.", file=sys.stderr)
        return 1
    if options.command == "list":
        return _list(path)
    if options.command == "remove" and not os.path.exists(path):
        print(f"No such file: {path}{unchanged}.", file=sys.stderr)
        return 1
    try:
        checkUsername(options.username)
    except ValueError as e:
        print(f"{e}; nothing was changed.", file=sys.stderr)
        return 1
    owner = None
    with suppress(OSError):
        before = os.stat(options.file)
        owner = before.st_uid, before.st_gid
    if options.command == "remove":
        code = _remove(options.file, options.username)
    else:
        code = _add(options.file, options.username, options.iterations)
    if code == 0 and owner is not None:
        _warnIfGivenAway(options.file, owner)
    return code


def _add(path: str, username: str, iterations: int) -> int:
    import getpass

    try:
        _checkIterations(iterations)
    except ValueError as e:
        print(f"--{e}; nothing was changed.", file=sys.stderr)
        return 1
    password = os.environ.get("PBROKER_PASSWORD")
    if password is None:
        if sys.stdin is None or not sys.stdin.isatty():
            print(
                "No password: set PBROKER_PASSWORD or run in a terminal; nothing was changed.",
                file=sys.stderr,
            )
            return 1
        try:
            password = getpass.getpass(f"Password for {username}: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print("\nNo password given; nothing was changed.", file=sys.stderr)
            return 1
        if again != password:
            print("The passwords differ; nothing was changed.", file=sys.stderr)
            return 1
    if not password:
        print("An empty password is not allowed; nothing was changed.", file=sys.stderr)
        return 1
    try:
        # surrogateescape: bytes that are not UTF-8 (in the environment) are the password, as
        # the pbroker command sends them.
        PasswordFile(path).setPassword(
            username, password.encode("utf-8", "surrogateescape"), iterations
        )
    except (OSError, ValueError) as e:
        print(f"Could not update {path}: {e}", file=sys.stderr)
        return 1
    print(f"Set the password of {username} in {path}.")
    return 0


def _remove(path: str, username: str) -> int:
    try:
        removed = PasswordFile(path).removeUser(username)
    except (OSError, ValueError) as e:
        print(f"Could not update {path}: {e}", file=sys.stderr)
        return 1
    if not removed:
        print(f"{username} is not in {path}; nothing was changed.", file=sys.stderr)
        return 1
    print(f"Removed {username} from {path}.")
    return 0


def _list(path: str) -> int:
    if not os.path.exists(path):
        print(f"No such file: {path}", file=sys.stderr)
        return 1
    try:
        with open(path, "rb"):
            pass  # (unreadable: said here, where reading it for users would only log it)
        usernames = PasswordFile(path).usernames()
    except (OSError, ValueError) as e:
        print(f"Could not read {path}: {e}", file=sys.stderr)
        return 1
    for username in usernames:
        # (A file edited by hand may hold any characters: none reaches the terminal raw.)
        print(_printable(username))
    return 0


def _printable(username: str) -> str:
    """
    ``username`` as it may be printed: as it is if it is printable text, else its repr.
    """
    # (A lone surrogate, which the terminal could not show either, is not printable.)
    return username if username.isprintable() else repr(username)


def _warnIfGivenAway(path: str, owner: tuple[int, int]) -> None:
    """
    Say so if ``path`` no longer has ``owner`` (user and group) after being written anew.
    """
    with suppress(OSError):
        after = os.stat(path)
        if (after.st_uid, after.st_gid) != owner:
            print(
                f"Warning: {path} now belongs to user {after.st_uid} and group "
                f"{after.st_gid}, not {owner[0]} and {owner[1]} as before (only root may "
                "keep them): a server running as that user may no longer read it.",
                file=sys.stderr,
            )


if __name__ == "__main__":
    sys.exit(main())
