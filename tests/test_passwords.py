"""
Tests for pbroker's password login (salted verifiers, mutual proof, no replay), the password
file and its command, and how it coexists with the legacy MD5 login of stock Twisted peers.
"""

from __future__ import annotations

import errno
import getpass
import io
import os
import runpy
import stat
import sys
import threading
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.spread import pb as twistedPb
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from pbroker import passwords, pb
from pbroker.cred import MAX_USERNAME, NO_PASSWORD_ACCOUNTS
from pbroker.errors import ProtocolError
from pbroker.passwords import MAX_ITERATIONS, PasswordFile, ScramChecker, ScramVerifier
from pbroker.testing import connectedServerAndClient
from tests.test_broker import connect
from tests.test_login import realmFor

ITERATIONS = passwords.MIN_ITERATIONS  # fast for tests; real files use DEFAULT_ITERATIONS


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
        users = [line for line in content.splitlines() if not line.startswith(b"#")]
        self.assertEqual(len(users), 2)
        for secret in (b"first secret", b"second secret", b"bob secret"):
            self.assertNotIn(secret, content)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_groupReadKept(self) -> None:
        """A file its group may read (0640, as a server's group is given it) stays so when
        a password is set; one others may read too loses that; a private one stays so."""
        passwordFile = PasswordFile(self.path)
        passwordFile.setPassword("alice", b"pw", ITERATIONS)
        for before, after in ((0o640, 0o640), (0o644, 0o640), (0o604, 0o600), (0o600, 0o600)):
            os.chmod(self.path, before)
            passwordFile.setPassword("alice", b"pw", ITERATIONS)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), after)

    def test_ownerAndGroupKept(self) -> None:
        """Setting a password as root keeps the file's owner and group, so that a server
        running as its own user still reads it (the file is written anew, and was root's)."""
        if os.geteuid() != 0:
            raise SkipTest("only root can give the file another owner to keep")
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        os.chown(self.path, 65534, 65534)
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "bob's"})
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            code = passwords.main(["add", self.path, "bob", "--iterations", str(ITERATIONS)])
        self.assertEqual(code, 0)
        self.assertEqual(err.getvalue(), "")
        status = os.stat(self.path)
        self.assertEqual((status.st_uid, status.st_gid), (65534, 65534))
        self.assertEqual(stat.S_IMODE(status.st_mode), 0o600)
        self.assertIsNotNone(PasswordFile(self.path).verifierFor(b"bob"))

    def test_groupReadOnlyForTheSameGroup(self) -> None:
        """Where the group cannot be kept (written by a user outside it), the new file is
        not readable by the writer's group: the group read bit is kept only with the
        group."""
        if os.geteuid() != 0:
            raise SkipTest("only root can make a file of another group to replace")
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        os.chown(self.path, 65534, 65534)
        os.chmod(self.path, 0o640)

        def refused(descriptor: int, uid: int, gid: int) -> None:
            raise PermissionError("Operation not permitted")

        self.patch(os, "fchown", refused)
        PasswordFile(self.path).setPassword("bob", b"pw", ITERATIONS)
        status = os.stat(self.path)
        self.assertEqual((status.st_gid, stat.S_IMODE(status.st_mode)), (0, 0o600))

    def test_groupKeptWithoutTheOwner(self) -> None:
        """A writer who cannot keep the owner but may keep the group (one of theirs)
        keeps the group, and its read bit."""
        if os.geteuid() != 0:
            raise SkipTest("only root can make a file of another owner to replace")
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        os.chown(self.path, 65534, 65533)
        os.chmod(self.path, 0o640)
        real = os.fchown

        def onlyTheGroup(descriptor: int, uid: int, gid: int) -> None:
            if uid != -1:
                raise PermissionError("Operation not permitted")
            real(descriptor, uid, gid)

        self.patch(os, "fchown", onlyTheGroup)
        PasswordFile(self.path).setPassword("bob", b"pw", ITERATIONS)
        status = os.stat(self.path)
        self.assertEqual(
            (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)), (0, 65533, 0o640)
        )

    def test_ownerNotKeptSaid(self) -> None:
        """Where the owner cannot be kept (a user other than root), the command says whose
        the file now is, and that a server running as its former owner may not read it."""
        if os.geteuid() != 0:
            raise SkipTest("only root can make a file of another owner to replace")
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        os.chown(self.path, 65534, 65534)

        def refused(descriptor: int, uid: int, gid: int) -> None:
            raise PermissionError("Operation not permitted")

        self.patch(os, "fchown", refused)
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "bob's"})
        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            code = passwords.main(["add", self.path, "bob", "--iterations", str(ITERATIONS)])
        self.assertEqual(code, 0)
        self.assertEqual(
            err.getvalue(),
            f"Warning: {self.path} now belongs to user 0 and group 0, not 65534 and 65534 as "
            "before (only root may keep them): a server running as that user may no longer "
            "read it.\n",
        )

    def test_reloadsWhenChanged(self) -> None:
        """A running server sees users added to the file afterwards."""
        reader = PasswordFile(self.path)
        self.assertIsNone(reader.verifierFor(b"carol"))
        PasswordFile(self.path).setPassword("carol", b"pw", ITERATIONS)
        self.assertIsNotNone(reader.verifierFor(b"carol"))

    def test_passwordSetAgainWithinATimestampTickSeen(self) -> None:
        """A password set again is a line of the same size; written within the file
        system's timestamp tick (seconds on some), the file has the same size and time: a
        running server still sees the change (the old password stops working)."""
        PasswordFile(self.path).setPassword("alice", b"compromised", ITERATIONS)
        reader = PasswordFile(self.path)
        old = reader.verifierFor(b"alice")
        before = os.stat(self.path)
        PasswordFile(self.path).setPassword("alice", b"changed-now", ITERATIONS)
        os.utime(self.path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
        self.assertEqual(os.stat(self.path).st_size, before.st_size)
        self.assertEqual(
            reader.verifierFor(b"alice"),
            PasswordFile(self.path).verifierFor(b"alice"),
        )
        self.assertNotEqual(reader.verifierFor(b"alice"), old)

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

    def test_removeAndList(self) -> None:
        """The remove command takes a user out (a running server no longer knows it) and
        keeps the file's mode; list shows the users in the file's order; each says what is
        wrong, with exit status 1, for a user or a file that is not there and for a file
        that is not a password file."""
        reader = PasswordFile(self.path)
        for username in ("alice", "bob", "carol"):
            PasswordFile(self.path).setPassword(username, b"pw", ITERATIONS)
        os.chmod(self.path, 0o640)
        self.assertIsNotNone(reader.verifierFor(b"bob"))

        def run(*arguments: str) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                code = passwords.main(list(arguments))
            return code, out.getvalue(), err.getvalue()

        self.assertEqual(run("list", self.path), (0, "alice\nbob\ncarol\n", ""))
        self.assertEqual(
            run("remove", self.path, "bob"), (0, f"Removed bob from {self.path}.\n", "")
        )
        self.assertIsNone(reader.verifierFor(b"bob"))
        self.assertIsNotNone(reader.verifierFor(b"carol"))
        self.assertEqual(reader.usernames(), ["alice", "carol"])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)
        self.assertEqual(
            run("remove", self.path, "bob"),
            (1, "", f"bob is not in {self.path}; nothing was changed.\n"),
        )
        missing = self.mktemp()
        self.assertEqual(
            run("remove", missing, "bob"),
            (1, "", f"No such file: {missing}; nothing was changed.\n"),
        )
        self.assertFalse(os.path.exists(missing))
        self.assertEqual(run("list", missing), (1, "", f"No such file: {missing}\n"))
        # Not a regular file: a named pipe (whose read would wait for ever) or a directory
        # (or a device, which add would replace) is refused by each command, untouched.
        pipe = self.mktemp()
        os.mkfifo(pipe)
        directory = self.mktemp()
        os.mkdir(directory)
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "pw"})
        for path in (pipe, directory):
            for arguments in (("list", path), ("remove", path, "bob"), ("add", path, "bob")):
                code, out, err = run(*arguments)
                self.assertEqual((code, out), (1, ""))
                self.assertIn(f"{path} is not a regular file", err)
            self.assertFalse(os.path.isfile(path))
        other = self.mktemp()
        with open(other, "w") as otherFile:
            otherFile.write("root:x:0:0:root:/root:/bin/bash\n")
        code, out, err = run("list", other)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(
            err, f"Could not read {other}: {other}, line 1: not a pbroker password line\n"
        )

    def test_removeReadsLinesAsTheServerDoes(self) -> None:
        """A line the server reads as a user's (one indented by hand: the server strips
        it) is the one remove takes out; an absent user leaves the file untouched."""
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        PasswordFile(self.path).setPassword("bob", b"pw", ITERATIONS)
        text = Path(self.path).read_text()
        Path(self.path).write_text(text.replace("\nalice:", "\n  alice:"))
        reader = PasswordFile(self.path)
        self.assertIsNotNone(reader.verifierFor(b"alice"))
        before = os.stat(self.path)
        self.assertFalse(PasswordFile(self.path).removeUser("carol"))
        after = os.stat(self.path)
        self.assertEqual((after.st_ino, after.st_mtime_ns), (before.st_ino, before.st_mtime_ns))
        self.assertTrue(PasswordFile(self.path).removeUser("alice"))
        self.assertIsNone(reader.verifierFor(b"alice"))
        self.assertEqual(reader.usernames(), ["bob"])

    def test_removeRefusesWhatIsNotAUsername(self) -> None:
        """remove checks its username as add does: an empty one (which would match blank
        lines) or the decoy secret's comment (whose removal would give the file a new
        secret, changing every unknown user's decoy) is refused, and nothing changes."""
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        with open(self.path, "a") as passwordFile:
            passwordFile.write("\n")
        before = Path(self.path).read_text()
        secret = next(line for line in before.splitlines() if line.startswith("#"))
        for name in ("", secret.split(":", 1)[0], "a b"):
            with self.assertRaises(ValueError):
                PasswordFile(self.path).removeUser(name)
            err = io.StringIO()
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                self.assertEqual(passwords.main(["remove", self.path, name]), 1)
            self.assertIn("nothing was changed", err.getvalue())
        self.assertEqual(Path(self.path).read_text(), before)

    def test_listShowsNoControlCharacters(self) -> None:
        """A username written into the file by hand with a control character is listed
        as its repr, not printed raw to the terminal."""
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        text = Path(self.path).read_text()
        Path(self.path).write_text(text.replace("\nalice:", "\nal\x1b[2Jice:"))
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(passwords.main(["list", self.path]), 0)
        self.assertEqual(out.getvalue(), "'al\\x1b[2Jice'\n")
        self.assertEqual(passwords._printable("caf\u00e9"), "caf\u00e9")
        self.assertEqual(passwords._printable("bad\udcff"), "'bad\\udcff'")

    def test_commandPasswordNotUTF8(self) -> None:
        """A PBROKER_PASSWORD that is not UTF-8 is set as its bytes, as the pbroker command
        sends it, not refused with an encoding error blamed on the file."""
        password = b"p\xff".decode("utf-8", "surrogateescape")  # as Python shows environ
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": password})
        with redirect_stdout(io.StringIO()):
            code = passwords.main(["add", self.path, "dave", "--iterations", str(ITERATIONS)])
        self.assertEqual(code, 0)
        verifier = PasswordFile(self.path).verifierFor(b"dave")
        self.assertEqual(verifier, ScramVerifier.fromPassword(b"p\xff", ITERATIONS, verifier.salt))

    def test_commandRefusesEmptyAndMismatch(self) -> None:
        """An empty password, or two different typings, change nothing."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": ""})
        with redirect_stderr(io.StringIO()):
            self.assertEqual(passwords.main(["add", self.path, "erin"]), 1)
        typed = iter(["one", "two"])
        self.patch(getpass, "getpass", lambda prompt: next(typed))
        self.assertIn("The passwords differ", self.addWithoutPassword(Terminal()))

    def addWithoutPassword(self, stdin: Any) -> str:
        """Run the add command with no PBROKER_PASSWORD and ``stdin``; check that it fails
        and changes nothing; what it printed on standard error."""
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        self.patch(os, "environ", environment)
        self.patch(sys, "stdin", stdin)
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(passwords.main(["add", self.path, "erin"]), 1)
        self.assertFalse(os.path.exists(self.path))
        return err.getvalue()

    def test_commandAsksTwice(self) -> None:
        """Without PBROKER_PASSWORD, in a terminal, the password is asked twice and set when
        both typings agree."""
        prompts: list[str] = []
        typed = iter(["typed pw", "typed pw"])

        def getpassword(prompt: str) -> str:
            prompts.append(prompt)
            return next(typed)

        self.patch(getpass, "getpass", getpassword)
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        self.patch(os, "environ", environment)
        self.patch(sys, "stdin", Terminal())
        out = io.StringIO()
        with redirect_stdout(out):
            code = passwords.main(["add", self.path, "erin", "--iterations", str(ITERATIONS)])
        self.assertEqual(code, 0)
        self.assertEqual(prompts, ["Password for erin: ", "Again: "])
        self.assertEqual(out.getvalue(), f"Set the password of erin in {self.path}.\n")
        verifier = PasswordFile(self.path).verifierFor(b"erin")
        self.assertEqual(
            verifier, ScramVerifier.fromPassword(b"typed pw", ITERATIONS, verifier.salt)
        )

    def test_commandPromptEndedOrInterrupted(self) -> None:
        """End of input (Ctrl-D) or Ctrl-C at the prompt changes nothing and says so on a line
        of its own (the prompt's line is left unfinished), not with a traceback."""
        for raised in (EOFError, KeyboardInterrupt):

            def getpassword(prompt: str, raised: type[BaseException] = raised) -> str:
                raise raised()

            self.patch(getpass, "getpass", getpassword)
            err = self.addWithoutPassword(Terminal())
            self.assertEqual(err, "\nNo password given; nothing was changed.\n")

    def test_commandEmptyTypedPassword(self) -> None:
        """An empty password typed twice is refused like an empty PBROKER_PASSWORD."""
        self.patch(getpass, "getpass", lambda prompt: "")
        err = self.addWithoutPassword(Terminal())
        self.assertEqual(err, "An empty password is not allowed; nothing was changed.\n")

    def test_runAsAModule(self) -> None:
        """python -m pbroker.passwords runs the command and exits with its code."""
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "module pw"})
        arguments = ["add", self.path, "frank", "--iterations", str(ITERATIONS)]
        self.patch(sys, "argv", ["python -m pbroker.passwords", *arguments])
        out = io.StringIO()
        with redirect_stdout(out), warnings.catch_warnings():
            # runpy warns that the module is imported already: it is, by this test.
            warnings.simplefilter("ignore", RuntimeWarning)
            with self.assertRaises(SystemExit) as exited:
                runpy.run_module("pbroker.passwords", run_name="__main__")
        self.assertEqual(exited.exception.code, 0)
        self.assertEqual(out.getvalue(), f"Set the password of frank in {self.path}.\n")
        self.assertIsNotNone(PasswordFile(self.path).verifierFor(b"frank"))

    def test_commentsAndBlankLines(self) -> None:
        """Comments and blank lines an administrator adds are skipped when the file is read,
        and kept when a password is set."""
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        with open(self.path, "a") as f:
            f.write("\n# bob left on 1 May\n   \n")
        reader = PasswordFile(self.path)
        alice = reader.verifierFor(b"alice")
        self.assertEqual(alice, ScramVerifier.fromPassword(b"pw", ITERATIONS, alice.salt))
        self.assertIsNone(reader.verifierFor(b"# bob left on 1 May"))
        PasswordFile(self.path).setPassword("carol", b"pw", ITERATIONS)
        with open(self.path) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines[2:5], ["", "# bob left on 1 May", "   "])
        self.assertEqual([line.split(":")[0] for line in lines[1::4]], ["alice", "carol"])
        self.assertIsNotNone(reader.verifierFor(b"carol"))

    def test_commandWithoutPasswordOrTerminal(self) -> None:
        """No PBROKER_PASSWORD and no terminal to ask on: one line saying so, not getpass's
        EOFError."""
        err = self.addWithoutPassword(io.StringIO(""))
        self.assertIn("set PBROKER_PASSWORD or run in a terminal", err)

    def test_damagedLineOfTheUserRepaired(self) -> None:
        """Setting the password of a user whose own line is damaged replaces that line (the
        way to repair it), where another damaged line refuses the file."""
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        PasswordFile(self.path).setPassword("bob", b"pw", ITERATIONS)
        with open(self.path) as f:
            lines = f.read().splitlines()
        lines = [line + "!" if line.startswith("alice:") else line for line in lines]
        Path(self.path).write_text("\n".join(lines) + "\n")
        PasswordFile(self.path).setPassword("alice", b"new", ITERATIONS)
        reader = PasswordFile(self.path)
        self.assertEqual(
            reader.verifierFor(b"alice"),
            ScramVerifier.fromPassword(b"new", ITERATIONS, reader.verifierFor(b"alice").salt),
        )

    def test_commandWithoutStandardInput(self) -> None:
        """Standard input closed (None) is no terminal either."""
        self.assertIn("run in a terminal", self.addWithoutPassword(None))

    def test_otherFilesRefused(self) -> None:
        """A file that is not a pbroker password file (/etc/passwd, a Twisted users file) is
        refused and left as it was, not rewritten; a damaged line is named by number."""
        with open(self.path, "w") as f:
            f.write("root:x:0:0:root:/root:/bin/bash\nalice:secret\n")
        os.chmod(self.path, 0o644)
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "pw"})
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(passwords.main(["add", self.path, "bob"]), 1)
        self.assertIn(f"{self.path}, line 1: not a pbroker password line", err.getvalue())
        with open(self.path) as f:
            self.assertEqual(f.read(), "root:x:0:0:root:/root:/bin/bash\nalice:secret\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o644)
        with self.assertRaises(ValueError) as caught:
            PasswordFile(self.path).verifierFor(b"alice")
        self.assertIn("line 1: not a pbroker password line", str(caught.exception))


class Terminal(io.StringIO):
    """Standard input that is a terminal."""

    def isatty(self) -> bool:
        return True


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

    def test_longUsernamesRefusedAtOnce(self) -> None:
        """A username over MAX_USERNAME bytes is refused by both logins' first step, before
        the server keeps anything for it; a failed login's log line cuts a long one short."""
        serverFactory = self.server()
        server, client, pump = connect(serverFactory, pb.PBClientFactory())
        root = client.remoteForName("root")
        long = b"u" * (MAX_USERNAME + 1)
        exported = dict(server.luids)
        results: list[Any] = []
        root.callRemote("passwordLogin", long, b"n" * 24).addBoth(results.append)
        root.callRemote("login", long).addBoth(results.append)
        pump.flush()
        for failure in results:
            self.assertTrue(failure.check(UnauthorizedLogin))
            self.assertIn(f"at most {MAX_USERNAME} bytes", failure.getErrorMessage())
        self.assertEqual(server.luids, exported)
        with capturedLogs() as events:
            failed = pb.PBClientFactory()
            _server, _client, pump = connect(serverFactory, failed)
            failed.login(UsernamePassword(b"u" * MAX_USERNAME, b"x")).addBoth(results.append)
            pump.flush()
        (line,) = [e for e in events if "Login failed" in str(e.get("log_format"))]
        self.assertLess(len(str(line["user"])), 200)
        with self.assertRaises(ValueError):
            ScramVerifier.fromPassword(b"pw", ITERATIONS).toLine("u" * (MAX_USERNAME + 1))

    def answerTo(self, pump: Any, target: Any, *args: Any) -> Any:
        """
        What ``target.callRemote(*args)`` fires with, once ``pump`` has carried it.
        """
        results: list[Any] = []
        target.callRemote(*args).addBoth(results.append)
        pump.flush()
        return results[0]

    def test_malformedPasswordLogin(self) -> None:
        """The password login's first step takes bytes and a client nonce of 16 to 64 bytes
        (both ends accepted); a proof that is not bytes is refused and uses up the prover."""
        factory = pb.PBClientFactory()
        _server, client, pump = connect(self.server(), factory)
        root = client.remoteForName("root")

        def call(target: Any, *args: Any) -> Any:
            return self.answerTo(pump, target, *args)

        def refusal(target: Any, *args: Any) -> str:
            failure = call(target, *args)
            self.assertTrue(failure.check(UnauthorizedLogin), failure)
            return str(failure.getErrorMessage())

        bytesOnly = "the username and nonce must be bytes"
        self.assertEqual(refusal(root, "passwordLogin", "alice", b"n" * 24), bytesOnly)
        self.assertEqual(refusal(root, "passwordLogin", b"alice", "n" * 24), bytesOnly)
        sizes = "the client nonce must be 16 to 64 bytes"
        self.assertEqual(refusal(root, "passwordLogin", b"alice", b"n" * 15), sizes)
        self.assertEqual(refusal(root, "passwordLogin", b"alice", b"n" * 65), sizes)
        for size in (16, 64):
            serverNonce, _salt, iterations, _prover = call(
                root, "passwordLogin", b"alice", b"n" * size
            )
            self.assertEqual((len(serverNonce), iterations), (24, ITERATIONS))
        *_, prover = call(root, "passwordLogin", b"alice", b"n" * 24)
        self.assertEqual(refusal(prover, "prove", "text", None), "the proof must be bytes")
        self.assertEqual(
            refusal(prover, "prove", b"p" * 32, None), "a login challenge can be answered only once"
        )

    def test_recordedProofCannotBeReplayed(self) -> None:
        """A proof that once logged in is useless against a fresh challenge."""
        factory = pb.PBClientFactory()
        _server, client, pump = connect(self.server(), factory)
        root = client.remoteForName("root")

        def call(target: Any, *args: Any) -> Any:
            return self.answerTo(pump, target, *args)

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
        with capturedLogs() as events:
            failure = self.login(
                self.server(legacyLogin=False), twistedPb.PBClientFactory(), b"legacy secret"
            )
        self.assertTrue(failure.check(UnauthorizedLogin))
        self.assertIn("does not accept the legacy MD5 login", failure.getErrorMessage())
        # Every login attempt is logged, this one too.
        formats = [str(event.get("log_format")) for event in events]
        self.assertTrue(any("Refused the legacy MD5 login" in f for f in formats), formats)

    def test_legacyLoginWithoutLegacyAccounts(self) -> None:
        """A server whose accounts are all in its password file has none for the legacy
        login: a stock client, or a pbroker client limited to the pb dialect, is told so
        before a challenge (the portal would answer with UnhandledCredentials, naming the
        server's interfaces), once in the log per connection."""
        self.checkers = self.checkers[:1]
        for clientFactory in (twistedPb.PBClientFactory(), pb.PBClientFactory(dialects=[b"pb"])):
            with capturedLogs() as events:
                failure = self.login(self.server(), clientFactory, b"scram secret")
            self.assertTrue(failure.check(UnauthorizedLogin), failure)
            self.assertTrue(failure.check(UnhandledCredentials), failure)  # as from stock PB
            self.assertEqual(
                failure.getErrorMessage(),
                "this server has no accounts for the legacy MD5 login (of stock Twisted "
                "clients, and pbroker clients limited to the pb dialect)",
            )
            refusals = [
                formatEvent(event)
                for event in events
                if "Refused the legacy" in str(event.get("log_format"))
            ]
            self.assertEqual(len(refusals), 1, refusals)
            self.assertRegex(
                refusals[0],
                r"^Refused the legacy MD5 login of b?'alice' from \S+: no checker of the "
                r"portal takes it \(later attempts on this connection are not logged\)$",
            )
        avatar = self.login(self.server(), pb.PBClientFactory(), b"scram secret")
        self.assertEqual(self.name(avatar), "alice")
        self.checkers = [AllowAnonymousAccess()]  # no passwords at all
        for clientFactory in (twistedPb.PBClientFactory(), pb.PBClientFactory()):
            with capturedLogs():
                failure = self.login(self.server(), clientFactory, b"scram secret")
            self.assertTrue(failure.check(UnauthorizedLogin), failure)
            self.assertTrue(failure.check(UnhandledCredentials), failure)  # as from stock PB
            self.assertEqual(failure.getErrorMessage(), NO_PASSWORD_ACCOUNTS)

    def test_refusedLegacyLoginsLoggedOncePerConnection(self) -> None:
        """A peer asking for the refused legacy login again and again, with long names, is
        logged once per connection, its name cut short: no flood of log text."""
        server, client, pump = connectedServerAndClient(
            self.server(legacyLogin=False), twistedPb.PBClientFactory()
        )
        root = client.remoteForName("root")
        with capturedLogs() as events:
            for _ in range(50):
                root.callRemote("login", b"x" * 100_000).addErrback(lambda _: None)
            pump.flush()
        refusals = [e for e in events if "Refused the legacy" in str(e.get("log_format"))]
        self.assertEqual(len(refusals), 1)
        self.assertLess(len(refusals[0]["user"]), 1000)
        self.assertFalse(server.disconnected)

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


#: Stands for the hostile server's prover in a challenge of HostileServerTests.
PROVER = object()


class KeyDerivedOffTheReactorTests(TestCase):
    """
    While the reactor runs, a client connected through a socket derives its login key in
    the reactor's thread pool: PBKDF2 takes a good part of a second, in which the reactor
    would serve no one.
    """

    def setUp(self) -> None:
        path = self.mktemp()
        PasswordFile(path).setPassword("alice", b"scram secret", ITERATIONS)
        portal = Portal(realmFor(pb), [ScramChecker(PasswordFile(path), ITERATIONS)])
        self.serverFactory = pb.PBServerFactory(
            portal, loginGuard=pb.LoginGuard(baseDelay=0, maxDelay=0)
        )
        self.threads: list[threading.Thread] = []
        self.started, self.release = threading.Event(), threading.Event()
        self.addCleanup(self.release.set)  # never leave a pool's thread waiting
        derive = passwords.clientProofAndSignature

        def slowDerive(*args: Any) -> Any:
            self.threads.append(threading.current_thread())
            self.started.set()
            self.release.wait(10)
            return derive(*args)

        self.patch(passwords, "clientProofAndSignature", slowDerive)

    def loginOverTCP(self) -> tuple[pb.PBClientFactory, list[Any]]:
        port = reactor.listenTCP(0, self.serverFactory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = pb.PBClientFactory()
        reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        self.addCleanup(client.disconnect)
        outcome: list[Any] = []
        client.login(UsernamePassword(b"alice", b"scram secret")).addBoth(outcome.append)
        return client, outcome

    async def waitFor(self, condition: Any) -> None:
        for _ in range(1000):  # at most ten seconds
            if condition():
                return
            await task.deferLater(reactor, 0.01)
        self.fail("waited ten seconds")

    async def test_reactorServesWhileTheKeyIsDerived(self) -> None:
        """The derivation runs off the reactor's thread, and the reactor turns meanwhile;
        the login then completes."""
        _client, outcome = self.loginOverTCP()
        await self.waitFor(self.started.is_set)
        turns = 0
        for _ in range(3):  # the derivation still blocked: the reactor turns all the same
            await task.deferLater(reactor, 0)
            turns += 1
        self.assertEqual((turns, outcome), (3, []))
        self.release.set()
        await self.waitFor(lambda: outcome)
        self.assertEqual(await outcome[0].callRemote("name"), "alice")
        self.assertIsNot(self.threads[0], threading.main_thread())

    async def test_connectionLostWhileDeriving(self) -> None:
        """A connection lost while the key is derived fails the login with PBConnectionLost."""
        client, outcome = self.loginOverTCP()
        await self.waitFor(self.started.is_set)
        client.disconnect()
        await self.waitFor(lambda: client._broker is None or client._broker.disconnected)
        self.release.set()
        await self.waitFor(lambda: outcome)
        self.assertTrue(outcome[0].check(pb.PBConnectionLost))

    async def test_stoppedPoolDerivesInPlace(self) -> None:
        """A thread pool already stopped (the reactor shutting down) would never run the
        derivation: it runs in place instead."""
        from twisted.python.threadpool import ThreadPool

        stopped = ThreadPool()
        stopped.start()
        stopped.stop()
        self.patch(reactor, "getThreadPool", lambda: stopped)
        self.release.set()
        _client, outcome = self.loginOverTCP()
        await self.waitFor(lambda: outcome)
        self.assertEqual(self.threads, [threading.main_thread()])
        self.assertEqual(await outcome[0].callRemote("name"), "alice")

    async def test_inMemoryWhileTheReactorRuns(self) -> None:
        """In memory the key is derived at once, even while the reactor runs (a pump does
        not turn the reactor that would deliver a thread's result)."""
        await task.deferLater(reactor, 0)  # the reactor runs
        self.release.set()
        factory = pb.PBClientFactory()
        _server, client, pump = connect(self.serverFactory, factory)
        outcome: list[Any] = []
        factory.login(UsernamePassword(b"alice", b"scram secret")).addBoth(outcome.append)
        pump.flush()
        self.assertEqual(len(outcome), 1)
        self.assertEqual(self.threads, [threading.main_thread()])
        # So is a transport a test makes from one of Twisted's (here, a subclass).
        client.transport._transport.__class__ = type(
            "OwnFakeTransport", (type(client.transport._transport),), {}
        )
        self.assertTrue(pb._inMemory(client))


class HostileServerTests(SynchronousTestCase):
    """
    A server (or whoever can change plain-TCP traffic) chooses the salt and iteration count
    the client derives its key with: the client checks them before it spends any work.
    """

    def setUp(self) -> None:
        self.derivations: list[int] = []
        derive = passwords._saltedPassword

        def counting(password: bytes, salt: bytes, iterations: int) -> bytes:
            self.derivations.append(iterations)
            # Counts above ITERATIONS are only checked for, not computed: tests stay fast.
            return derive(password, salt, min(iterations, ITERATIONS))

        self.patch(passwords, "_saltedPassword", counting)

    def login(self, challenge: Any, proved: Any = None) -> Any:
        """
        The outcome of a login to a server that answers ``challenge`` to ``passwordLogin``
        (``challenge(nonce)`` if callable) and ``proved`` to ``prove``.
        """

        class Prover(pb.Referenceable):
            def remote_prove(self, proof: bytes, mind: Any) -> Any:
                return proved

        class Hostile(pb.Root):
            def remote_passwordLogin(self, username: bytes, nonce: bytes) -> Any:
                answer = challenge(nonce) if callable(challenge) else challenge
                if not isinstance(answer, tuple):
                    return answer
                return tuple(Prover() if item is PROVER else item for item in answer)

        factory = pb.PBClientFactory()
        _server, _client, pump = connect(pb.PBServerFactory(Hostile()), factory)
        results: list[Any] = []
        factory.login(UsernamePassword(b"alice", b"pw")).addBoth(results.append)
        pump.flush()
        self.assertEqual(len(results), 1)
        return results[0]

    def assertRefused(self, outcome: Any, *fragments: str) -> None:
        self.assertIsInstance(outcome, Failure)
        outcome.trap(ProtocolError)
        for fragment in fragments:
            self.assertIn(fragment, outcome.getErrorMessage())

    def test_iterationCountBounded(self) -> None:
        """MAX_ITERATIONS is derived with; one more fails the login before any derivation."""
        limit = passwords.MAX_ITERATIONS
        outcome = self.login((b"n" * 24, b"s" * 16, limit + 1, PROVER), (None, b""))
        self.assertRefused(outcome, "iteration count", str(limit + 1))
        self.assertEqual(self.derivations, [])
        outcome = self.login((b"n" * 24, b"s" * 16, limit, PROVER), (pb.Referenceable(), b""))
        self.assertTrue(outcome.check(UnauthorizedLogin))  # derived, then not proven
        self.assertEqual(self.derivations, [limit])

    def test_malformedChallenges(self) -> None:
        """A malformed challenge fails the login with ProtocolError, nothing derived."""
        nonce, salt = b"n" * 24, b"s" * 16
        cases: list[tuple[Any, str]] = [
            ("not a tuple", "is not (nonce, salt, iterations, prover)"),
            ([1, 2], "is not (nonce, salt, iterations, prover)"),
            ((nonce, salt, ITERATIONS, PROVER, 5), "is not (nonce, salt, iterations"),
            ((nonce, salt, "many", PROVER), "iteration count"),
            ((nonce, salt, 2.5, PROVER), "iteration count"),
            ((nonce, salt, True, PROVER), "iteration count"),
            ((nonce, salt, 0, PROVER), "iteration count"),
            ((nonce, salt, -5, PROVER), "iteration count"),
            ((nonce, salt, passwords.MIN_ITERATIONS - 1, PROVER), "from 4096 to 6000000, not 4095"),
            ((nonce, 12345, ITERATIONS, PROVER), "salt"),
            ((nonce, "s" * 16, ITERATIONS, PROVER), "salt"),
            ((nonce, b"s" * (passwords.MIN_SALT_LENGTH - 1), ITERATIONS, PROVER), "salt"),
            ((nonce, b"s" * (passwords.MAX_SALT_LENGTH + 1), ITERATIONS, PROVER), "salt"),
            ((b"n" * 15, salt, ITERATIONS, PROVER), "nonce"),
            ((b"n" * 65, salt, ITERATIONS, PROVER), "nonce"),
            ((None, salt, ITERATIONS, PROVER), "nonce"),
            ((nonce, salt, ITERATIONS, 5), "prover is not a reference"),
        ]
        for challenge, fragment in cases:
            self.assertRefused(self.login(challenge), fragment)
        self.assertEqual(self.derivations, [])

    def test_saltBoundsAccepted(self) -> None:
        """Salts of MIN_SALT_LENGTH and MAX_SALT_LENGTH bytes are derived with."""
        for length in (passwords.MIN_SALT_LENGTH, passwords.MAX_SALT_LENGTH):
            challenge = (b"n" * 16, b"s" * length, ITERATIONS, PROVER)
            outcome = self.login(challenge, (pb.Referenceable(), b""))
            self.assertTrue(outcome.check(UnauthorizedLogin))
        self.assertEqual(self.derivations, [ITERATIONS, ITERATIONS])

    def test_malformedLoginAnswer(self) -> None:
        """An answer to the proof that is not (avatar, signature) fails with ProtocolError;
        so does a proven signature that comes with a plain value for an avatar."""
        challenge = (b"n" * 24, b"s" * 16, ITERATIONS, PROVER)
        for answer in ["not a tuple", (pb.Referenceable(),), (None, b"x", 3)]:
            self.assertRefused(self.login(challenge, answer), "not (avatar, signature)")

        def proving(nonce: bytes) -> Any:
            message = passwords.authMessage(b"alice", nonce, b"n" * 24, b"s" * 16, ITERATIONS)
            signature = passwords.expectedServerSignature(b"pw", b"s" * 16, ITERATIONS, message)
            proved[:] = [5, signature]
            return challenge

        proved: list[Any] = []
        self.assertRefused(self.login(proving, proved), "avatar is a plain value")

    def test_keyDerivedOnce(self) -> None:
        """A password login derives the client's salted password once, not once per key."""
        path = self.mktemp()
        PasswordFile(path).setPassword("alice", b"pw", ITERATIONS)
        del self.derivations[:]
        portal = Portal(realmFor(pb), [ScramChecker(PasswordFile(path), ITERATIONS)])
        server = pb.PBServerFactory(portal, loginGuard=pb.LoginGuard(baseDelay=0, maxDelay=0))
        factory = pb.PBClientFactory()
        _server, _client, pump = connect(server, factory)
        results: list[Any] = []
        factory.login(UsernamePassword(b"alice", b"pw")).addBoth(results.append)
        pump.flush()
        self.assertIsInstance(results[0], pb.RemoteReference)
        self.assertEqual(self.derivations, [ITERATIONS])

    def test_clientProofAndSignature(self) -> None:
        """The one-derivation helper agrees with clientProof and expectedServerSignature."""
        message = passwords.authMessage(b"u", b"c" * 24, b"s" * 24, b"salt" * 4, ITERATIONS)
        self.assertEqual(
            passwords.clientProofAndSignature(b"pw", b"salt" * 4, ITERATIONS, message),
            (
                passwords.clientProof(b"pw", b"salt" * 4, ITERATIONS, message),
                passwords.expectedServerSignature(b"pw", b"salt" * 4, ITERATIONS, message),
            ),
        )


class DecoyTests(SynchronousTestCase):
    """
    An unknown user's salt and iteration count look like a user's of the same file.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        passwordFile = PasswordFile(self.path)
        passwordFile.setPassword("alice", b"a", ITERATIONS)
        passwordFile.setPassword("bob", b"b", ITERATIONS)
        passwordFile.setPassword("carol", b"c", 2 * ITERATIONS)

    def decoy(self, username: bytes, path: str | None = None) -> ScramVerifier:
        """
        The decoy a freshly started server (a new checker and file) offers ``username``.
        """
        checker = ScramChecker(PasswordFile(path or self.path))
        verifier, known = checker.verifierFor(username)
        self.assertFalse(known)
        return verifier

    def test_iterationsOfMostUsers(self) -> None:
        """A decoy has the iteration count most users in the file have, not the checker's."""
        self.assertEqual(self.decoy(b"mallory").iterations, ITERATIONS)
        empty = self.mktemp()
        self.assertEqual(
            ScramChecker(PasswordFile(empty), 3 * ITERATIONS).verifierFor(b"x")[0].iterations,
            3 * ITERATIONS,
        )

    def test_saltStableAcrossRestarts(self) -> None:
        """A decoy's salt is the same after a restart, like a real user's, and as long."""
        first = self.decoy(b"mallory")
        self.assertEqual(self.decoy(b"mallory"), first)
        self.assertEqual(len(first.salt), len(PasswordFile(self.path).verifierFor(b"alice").salt))
        self.assertNotEqual(self.decoy(b"trent").salt, first.salt)
        # Adding users and changing others' passwords keep it.
        PasswordFile(self.path).setPassword("dave", b"d", ITERATIONS)
        PasswordFile(self.path).setPassword("bob", b"new", ITERATIONS)
        self.assertEqual(self.decoy(b"mallory").salt, first.salt)

    def test_firstUserCannotWorkOutDecoys(self) -> None:
        """The decoys come from the file's own random secret, not from a user's keys (which
        that user can work out from the password): changing alice's password, even to the
        same, leaves them; and the same users with another secret give others."""
        first = self.decoy(b"mallory")
        PasswordFile(self.path).setPassword("alice", b"a", ITERATIONS)
        self.assertEqual(self.decoy(b"mallory").salt, first.salt)
        with open(self.path, encoding="utf-8") as passwordFile:
            lines = passwordFile.read().splitlines()
        other = self.mktemp()
        otherSecret = "# pbroker-decoy-secret: " + "YW5vdGhlciBzZWNyZXQgb2YgMzIgYnl0ZXMuLi4uLi4="
        with open(other, "w", encoding="utf-8") as passwordFile:
            passwordFile.write(
                "\n".join(otherSecret if line.startswith("#") else line for line in lines) + "\n"
            )
        self.assertNotEqual(self.decoy(b"mallory", other).salt, first.salt)

    def test_damagedSecretReplaced(self) -> None:
        """A damaged secret line is reported when the file is read, and replaced when a
        password is next set."""
        with open(self.path, encoding="utf-8") as passwordFile:
            users = [line for line in passwordFile if not line.startswith("#")]
        with open(self.path, "w", encoding="utf-8") as passwordFile:
            passwordFile.writelines(["# pbroker-decoy-secret: not*base64\n", *users])
        with capturedLogs() as events:
            PasswordFile(self.path).verifierFor(b"alice")
        self.assertTrue(any("damaged decoy secret" in e["log_format"] for e in events))
        PasswordFile(self.path).setPassword("dave", b"d", ITERATIONS)
        with open(self.path, encoding="utf-8") as passwordFile:
            secretLines = [line for line in passwordFile if line.startswith("# pbroker-decoy")]
        self.assertEqual(len(secretLines), 1)
        self.assertNotIn("not*base64", secretLines[0])
        with capturedLogs() as events:
            PasswordFile(self.path).verifierFor(b"alice")
        self.assertEqual(events, [])

    def test_fileWithoutSecret(self) -> None:
        """A file without a secret line (an older version's) still gets stable decoys, from
        every user's keys."""
        with open(self.path, encoding="utf-8") as passwordFile:
            users = [line for line in passwordFile if not line.startswith("#")]
        older = self.mktemp()
        with open(older, "w", encoding="utf-8") as passwordFile:
            passwordFile.writelines(users)
        first = self.decoy(b"mallory", older)
        self.assertEqual(self.decoy(b"mallory", older), first)

    def test_verifiersClientsRefuseAreReported(self) -> None:
        """A user whose stored verifier is outside what clients accept (written by an
        older version) is named in a warning when the file is read."""
        verifier = ScramVerifier.fromPassword(b"pw", ITERATIONS)
        with open(self.path, "a", encoding="utf-8") as passwordFile:
            for name, iterations in [("olduser", MAX_ITERATIONS + 1), ("weakuser", 1000)]:
                line = verifier.toLine(name).split(":")
                line[2] = str(iterations)
                passwordFile.write(":".join(line) + "\n")
        with capturedLogs() as events:
            PasswordFile(self.path).verifierFor(b"alice")
        warnings = [e for e in events if "cannot log in from a pbroker client" in e["log_format"]]
        self.assertEqual([w["user"] for w in warnings], ["olduser", "weakuser"])
        self.assertIn("not 1000", warnings[1]["reason"])

    def test_saltUnpredictable(self) -> None:
        """The salt comes from the file's secret keys: the same users with other passwords
        (or salts) give other decoys."""
        other = self.mktemp()
        for username in ("alice", "bob", "carol"):
            PasswordFile(other).setPassword(username, b"a", ITERATIONS)
        self.assertNotEqual(self.decoy(b"mallory", other).salt, self.decoy(b"mallory").salt)


class PasswordFileWritingTests(SynchronousTestCase):
    """
    What ``setPassword`` (and the add command) write, and what they refuse.
    """

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.temporary = self.path + ".new"

    def test_staleTemporaryFile(self) -> None:
        """A FILE.new left behind with a loose mode does not make the file readable by all."""
        with open(self.temporary, "w") as stale:
            stale.write("stale")
        os.chmod(self.temporary, 0o666)
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertIsNotNone(PasswordFile(self.path).verifierFor(b"alice"))
        self.assertFalse(os.path.lexists(self.temporary))

    def test_umaskCannotLoosenOrTighten(self) -> None:
        """The file is 0600 whatever the umask."""
        for mask in (0o000, 0o277):
            previous = os.umask(mask)
            try:
                PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
            finally:
                os.umask(previous)
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_symlinkNotFollowed(self) -> None:
        """A symbolic link planted at FILE.new is removed, not written through."""
        victim = self.mktemp()
        with open(victim, "w") as f:
            f.write("precious\n")
        os.symlink(victim, self.temporary)
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        with open(victim) as f:
            self.assertEqual(f.read(), "precious\n")
        self.assertFalse(os.path.islink(self.path))
        self.assertFalse(os.path.lexists(self.temporary))
        self.assertIsNotNone(PasswordFile(self.path).verifierFor(b"alice"))

    def test_replaceFails(self) -> None:
        """When the new file cannot be moved over the old one (a bind-mounted file gives
        EBUSY), the old file is left as it was, FILE.new is removed, and the command says
        so in one line."""
        PasswordFile(self.path).setPassword("alice", b"pw", ITERATIONS)
        with open(self.path, "rb") as f:
            before = f.read()

        def busy(source: str, destination: str) -> None:
            raise OSError(errno.EBUSY, "Device or resource busy")

        self.patch(os, "replace", busy)
        with self.assertRaises(OSError) as raised:
            PasswordFile(self.path).setPassword("bob", b"pw", ITERATIONS)
        self.assertEqual(raised.exception.errno, errno.EBUSY)
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "pw"})
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(passwords.main(["add", self.path, "bob"]), 1)
        self.assertEqual(
            err.getvalue(), f"Could not update {self.path}: [Errno 16] Device or resource busy\n"
        )
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertFalse(os.path.lexists(self.temporary))

    def test_usernamesThatWouldNotReadBack(self) -> None:
        """Usernames the file would not give back as written are refused, in one line,
        before a password is asked for."""
        names = ["#bob", " carol", "carol ", "a b", "a\tb", "a\rb", "a\x00b", "a\x85b"]
        names += ["a\u2028b", "a:b", "", "\udcff"]
        self.patch(getpass, "getpass", lambda prompt: self.fail("asked for a password"))
        environment = {k: v for k, v in os.environ.items() if k != "PBROKER_PASSWORD"}
        self.patch(os, "environ", environment)
        for name in names:
            with self.assertRaises(ValueError):
                PasswordFile(self.path).setPassword(name, b"pw", ITERATIONS)
            errors = io.StringIO()
            with redirect_stderr(errors):
                self.assertEqual(passwords.main(["add", self.path, name]), 1)
            self.assertEqual(errors.getvalue().count("\n"), 1, errors.getvalue())
            self.assertIn(repr(name), errors.getvalue())
        self.assertFalse(os.path.exists(self.path))

    def test_argumentsOfTheWrongType(self) -> None:
        """A username that is not text, or a password that is neither bytes nor text, is
        refused naming it, before a verifier is derived; a text password is taken as its
        UTF-8 bytes, as a login takes it."""
        passwordFile = PasswordFile(self.path)
        derive = ScramVerifier.fromPassword
        self.patch(
            ScramVerifier, "fromPassword", lambda *a, **k: self.fail("derived a verifier first")
        )
        with self.assertRaises(ValueError):
            passwordFile.setPassword("a b", b"pw", ITERATIONS)
        self.patch(ScramVerifier, "fromPassword", derive)
        for call, message in (
            (lambda: passwordFile.setPassword(b"alice", b"pw", ITERATIONS), "not bytes"),
            (lambda: passwordFile.removeUser(b"alice"), "a username must be text (str)"),
            (lambda: passwords.checkUsername(None), "a username must be text (str)"),
            (lambda: passwordFile.setPassword("alice", None, ITERATIONS), "bytes or str"),
            (lambda: ScramVerifier.fromPassword(5, ITERATIONS), "a password must be bytes or str"),
        ):
            with self.assertRaises(TypeError) as caught:
                call()
            self.assertIn(message, str(caught.exception))
        self.assertFalse(os.path.exists(self.path))
        salt = b"s" * 16
        self.assertEqual(
            ScramVerifier.fromPassword("pässword", ITERATIONS, salt),
            ScramVerifier.fromPassword("pässword".encode(), ITERATIONS, salt),
        )

    def test_usernamesReadBack(self) -> None:
        """Every username that is accepted reads back as written."""
        names = ["bob#", "ünïcødé", "a.b@c-d_e", "Ω", "x" * 200]
        for name in names:
            PasswordFile(self.path).setPassword(name, b"pw", ITERATIONS)
        passwordFile = PasswordFile(self.path)
        for name in names:
            self.assertIsNotNone(passwordFile.verifierFor(name.encode("utf-8")), name)

    def test_checkerDecoyIterationsBounded(self) -> None:
        """A checker is not made with a decoy iteration count clients would refuse."""
        for iterations in (passwords.MIN_ITERATIONS - 1, passwords.MAX_ITERATIONS + 1):
            with self.assertRaises(ValueError):
                ScramChecker(PasswordFile(self.path), iterations)

    def test_iterationsAndSaltBounded(self) -> None:
        """Verifiers that clients would refuse are not made (at each limit + 1)."""
        for iterations in (passwords.MIN_ITERATIONS - 1, passwords.MAX_ITERATIONS + 1):
            with self.assertRaises(ValueError):
                ScramVerifier.fromPassword(b"pw", iterations)
        for length in (passwords.MIN_SALT_LENGTH - 1, passwords.MAX_SALT_LENGTH + 1):
            with self.assertRaises(ValueError):
                ScramVerifier.fromPassword(b"pw", ITERATIONS, b"s" * length)
        limit = passwords.MIN_SALT_LENGTH
        self.assertEqual(
            len(ScramVerifier.fromPassword(b"pw", ITERATIONS, b"s" * limit).salt), limit
        )
        errors = io.StringIO()
        self.patch(os, "environ", {**os.environ, "PBROKER_PASSWORD": "pw"})
        for iterations in (passwords.MIN_ITERATIONS - 1, passwords.MAX_ITERATIONS + 1):
            arguments = ["add", self.path, "alice", "--iterations", str(iterations)]
            with redirect_stderr(errors):
                self.assertEqual(passwords.main(arguments), 1)
            self.assertIn(
                f"--iterations must be 4096 to 6000000, not {iterations}", errors.getvalue()
            )
        self.assertFalse(os.path.exists(self.path))


@implementer(IRealm)
class _AttachingRealm:
    """
    A realm whose avatars come when the test says, as an application's whole attach (a
    buildbot worker's: calls to the worker, database writes) may take a while.
    """

    def __init__(self) -> None:
        self.asked: list[Any] = []  # (avatar id, the Deferred of its avatar)
        self.realm = realmFor(pb)

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        attached: Deferred[Any] = Deferred()
        self.asked.append((avatarId, attached))
        return attached.addCallback(lambda _: self.realm.requestAvatar(avatarId, mind, *interfaces))

    def attach(self, index: int) -> None:
        self.asked[index][1].callback(None)


class RealmOutsideTheTurnTests(SynchronousTestCase):
    """
    The login guard takes the password attempts from one address in turn, but the turn is
    the check of the secret (the portal's checker): the realm that follows is the
    application's, and runs for as long as it does, side by side with the address's next
    logins, as on stock Twisted.
    """

    def setUp(self) -> None:
        path = self.mktemp()
        PasswordFile(path).setPassword("alice", b"secret", ITERATIONS)
        PasswordFile(path).setPassword("bob", b"secret", ITERATIONS)
        self.attaching = _AttachingRealm()
        self.clock = task.Clock()
        self.guard = pb.LoginGuard(reactor=self.clock)
        self.portal = Portal(
            self.attaching,
            [
                ScramChecker(PasswordFile(path), ITERATIONS),
                InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret", bob=b"secret"),
            ],
        )

    def login(self, clientModule: Any, name: bytes, portal: Any = None) -> list[Any]:
        factory = clientModule.PBClientFactory()
        server = pb.PBServerFactory(portal or self.portal, loginGuard=self.guard)
        _server, _client, pump = connect(server, factory)
        self.pumps.append(pump)
        results: list[Any] = []
        factory.login(UsernamePassword(name, b"secret")).addBoth(results.append)
        pump.flush()
        return results

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()

    def test_realmsSideBySide(self) -> None:
        """Two workers' logins from one address, from a pbroker and from a stock client
        (pbroker's password login and the legacy one): the second is checked and reaches
        the realm while the first's attach still runs."""
        self.pumps: list[Any] = []
        first = self.login(pb, b"alice")
        second = self.login(twistedPb, b"bob")
        self.assertEqual([name for name, _ in self.attaching.asked], [b"alice", b"bob"])
        self.assertEqual((first, second), ([], []))
        self.attaching.attach(1)
        self.flush()
        self.assertEqual(len(second), 1)
        self.assertEqual(first, [])
        self.attaching.attach(0)
        self.flush()
        self.assertIsInstance(first[0], pb.RemoteReference)

    def test_slowRealmNotTimedOut(self) -> None:
        """An attach that takes longer than the guard's checkTimeout (which bounds the check
        of the secret) completes: the login is not refused as too slow."""
        self.pumps = []
        results = self.login(pb, b"alice")
        self.clock.advance(self.guard.checkTimeout * 3)
        self.flush()
        self.assertEqual(results, [])
        self.attaching.attach(0)
        self.flush()
        self.assertIsInstance(results[0], pb.RemoteReference)

    def test_realmFailureCounts(self) -> None:
        """A realm that fails fails the login as before: counted for the address, and
        answered after its delay."""
        self.pumps = []
        results = self.login(pb, b"alice")
        with capturedLogs():
            self.attaching.asked[0][1].errback(UnauthorizedLogin("no such worker"))
            self.flush()
            self.assertEqual(results, [])
            self.clock.advance(self.guard.baseDelay)
            self.flush()
        results[0].trap(UnauthorizedLogin)
        self.assertEqual(self.guard.delayFor("127.0.0.1"), 2 * self.guard.baseDelay)

    def test_loginSetOnThePortal(self) -> None:
        """A ``login`` set on the portal itself (a wrapper that refuses some logins, a test
        double) is called, as one its class defines is: the guard does not go round it."""
        asked: list[Any] = []

        def refuseAll(credentials: Any, mind: Any, *interfaces: Any) -> Any:
            asked.append(credentials)
            raise UnauthorizedLogin("refused by the portal's own login")

        self.portal.login = refuseAll  # type: ignore[method-assign]
        self.pumps = []
        with capturedLogs():
            results = self.login(pb, b"alice")
            self.clock.advance(self.guard.maxDelay)
            self.flush()
        self.assertEqual(len(asked), 1)
        results[0].trap(UnauthorizedLogin)
        self.assertEqual(self.attaching.asked, [])

    def test_portalOfItsOwn(self) -> None:
        """A portal whose class logs in its own way is guarded whole, as what its login
        does cannot be split: the address's next login waits for it."""

        class OwnPortal(Portal):
            def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Any:
                return super().login(credentials, mind, *interfaces)

        own = OwnPortal(self.attaching, self.portal.checkers.values())
        self.pumps = []
        self.login(pb, b"alice", own)
        self.login(pb, b"bob", own)
        self.assertEqual([name for name, _ in self.attaching.asked], [b"alice"])
        self.attaching.attach(0)
        self.flush()
        self.assertEqual([name for name, _ in self.attaching.asked], [b"alice", b"bob"])
        self.attaching.attach(1)
        self.flush()
