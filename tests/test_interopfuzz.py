"""
A short run of the differential interop fuzz (``tests/fuzz/interop.py``): stock Twisted PB
talking to itself is the oracle for pbroker as the server, as the client, as both in the
``pb`` dialect, and as both in the native dialect (judged by the oracle reshaped as
docs/native.rst says values arrive), over generated values, errors, references, caches, logins
and pipelines; and its native-only probes (large strings inside values, deep nesting, cycles).

It runs in a subprocess: the fuzz registers its copy classes in stock jelly's global
registry, which the rest of the suite must not see.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = Path(__file__).parent / "fuzz" / "interop.py"


def fuzz(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class InteropFuzzTests(SynchronousTestCase):
    def test_shortRun(self) -> None:
        """Every pairing gets what stock gets, but for documented differences."""
        run = fuzz("40", "7")
        self.assertEqual(run.returncode, 0, run.stdout[-4000:])
        self.assertIn("differences: 0", run.stdout)
        # (Each pairing ran the same scenarios: the oracle's count is the others'.)
        self.assertIn("'pbroker/pbroker': 102, 'native': 102", run.stdout)

    def test_nativeProbes(self) -> None:
        """Values only the native dialect carries arrive as docs/native.rst says."""
        run = fuzz("probes")
        self.assertEqual(run.returncode, 0, run.stdout[-4000:])
        self.assertIn("probe 'largest ints': as documented", run.stdout)
