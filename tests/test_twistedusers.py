"""
Twisted's own users of PB, run on pbroker: ``twisted.web.distrib`` (a web server that
serves resources published by other processes over PB) and ``twisted.words.service``
(PB chat clients), with their own tests, unchanged but for the interface they listen on.

The tests are copied from the installed Twisted into a temporary package and run by trial
in a subprocess in which ``twisted.spread`` and its modules *are* pbroker's (set in
``sys.modules`` before anything imports them), so Twisted's distrib and words modules use
pbroker without a change to their text. Both ends of each connection are pbroker, so they
speak the native dialect, where large calls are sent in fragments: distrib writes a body
in calls of up to 640 KiB and then finishes it without waiting between them, which works
only because calls keep their order.

Left out: distrib's test_connectionLost, which counts the ``NoSuchMethod`` the server logs,
and pbroker does not log a failure that is the caller's business (docs/migration.rst).
"""

from __future__ import annotations

import re
from pathlib import Path

import twisted
from twisted.trial.unittest import TestCase

from tests.test_twistedsuite import scratchPackage, trial

TWISTED = Path(twisted.__file__).parent
PACKAGE = "twistedusers"

#: The test modules, and the tests of each not expected to pass.
MODULES = {
    "web/test/test_distrib.py": {"DistribTests.test_connectionLost"},
    "words/test/test_service.py": set(),
}

#: Runs trial with pbroker in the place of twisted.spread, after checking it is.
RUNNER = """
import sys

import pbroker
from pbroker import banana, flavors, interfaces, jelly, pb, publish, util

assert "twisted.spread" not in sys.modules, "twisted.spread was imported before the swap"
sys.modules["twisted.spread"] = pbroker
for module in (banana, flavors, interfaces, jelly, pb, publish, util):
    sys.modules["twisted.spread." + module.__name__.rsplit(".", 1)[1]] = module

import twisted
from twisted.web import distrib
from twisted.words import service

twisted.spread = pbroker
assert distrib.pb is pb and service.pb is pb, "Twisted's modules do not use pbroker"

from twisted.scripts.trial import run

sys.argv[0] = "trial"
run()
"""


def rewrite(source: str) -> str:
    """
    A Twisted test module's text, listening on 127.0.0.1 where it listened on every
    interface.
    """
    return re.sub(
        r"reactor\.listenTCP\(0, ([\w.]+)\)",
        r'reactor.listenTCP(0, \1, interface="127.0.0.1")',
        source,
    )


class TwistedUsersTests(TestCase):
    timeout = 300

    def test_twistedUsersPass(self) -> None:
        """Twisted's distrib and words tests pass with pbroker as twisted.spread."""
        directory = scratchPackage(self, PACKAGE)
        (directory / "swaprun.py").write_text(RUNNER)
        names = []
        for path in MODULES:
            text = rewrite((TWISTED / path).read_text(encoding="utf-8"))
            self.assertNotRegex(text, r"listenTCP\(0, [\w.]+\)")
            name = Path(path).stem
            (directory / PACKAGE / f"{name}.py").write_text(text, encoding="utf-8")
            names.append(f"{PACKAGE}.{name}")
        output = trial(directory, *names, runner=("swaprun.py",))
        outcomes = dict(re.findall(rf"^{PACKAGE}\.\w+\.([\w.]+) \.\.\. (\S+)$", output, flags=re.M))
        expectedFailures = set().union(*MODULES.values())
        self.assertGreater(len(outcomes), 30, output[-3000:])
        unexpected = {
            test: outcome
            for test, outcome in outcomes.items()
            if (outcome == "[OK]") == (test in expectedFailures)
        }
        self.assertEqual(unexpected, {}, output[-6000:])
        # The large writes are there, and pass.
        self.assertEqual(outcomes.get("DistribTests.test_largeWrite"), "[OK]")
