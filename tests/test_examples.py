"""
The programs in ``examples/`` run, over loopback TCP, and print what their docstrings say.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Each program exits by itself in about a second; this only bounds a hang.
_TIMEOUT = 120


def run(name: str, *arguments: str) -> list[str]:
    """
    Run the example ``name`` to its end; the lines it printed.
    """
    finished = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *arguments],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
    )
    if finished.returncode != 0 or finished.stderr:
        raise AssertionError(
            f"{name} exited with {finished.returncode}:\n{finished.stdout}\n{finished.stderr}"
        )
    return finished.stdout.splitlines()


class ExampleTests(TestCase):
    def test_interop(self) -> None:
        self.assertEqual(
            run("interop.py"),
            [
                "twisted client -> pbroker server (pb): StockPoint(3, 5)",
                "pbroker client -> twisted server (pb): Point(3, 5)",
                "pbroker client -> pbroker server (pbroker2): Point(3, 5)",
            ],
        )

    def test_limits(self) -> None:
        self.assertEqual(
            run("limits.py"),
            [
                "stored 500000 bytes",
                "refused before sending: a message of 2000044 bytes is over the 1048576-byte "
                "limit the peer accepts",
                "the connection goes on: stored 2 bytes",
                "the server went silent; the call failed with PBConnectionLost in under 2 s: True",
            ],
        )

    def test_streams(self) -> None:
        self.assertEqual(
            run("streams.py"),
            [
                "dialect: pbroker2",
                "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]",
                "read tick 0",
                "read tick 1",
                "read tick 2",
                "closed on the server: ['ticks(1000)']",
                "stored bytes: 8000000",
            ],
        )

    def test_events(self) -> None:
        lines = run("events.py")
        self.assertEqual(
            [line for line in lines if line.startswith("first: ")],
            [f"first: event {n}" for n in (1, 2, 3)],
        )
        self.assertEqual(
            [line for line in lines if line.startswith("second: ")],
            [f"second: event {n}" for n in (1, 2, 3, 4, 5)],
        )
        # Each leaving is noticed once, after the subscriber's last event.
        left = [i for i, line in enumerate(lines) if line == "server: a subscriber left"]
        self.assertEqual(len(left), 2, lines)
        self.assertGreater(left[0], lines.index("first: event 3"))
        self.assertGreater(left[1], lines.index("second: event 5"))
        self.assertEqual(len(lines), 10, lines)

    def test_deadlines(self) -> None:
        lines = run("deadlines.py")
        self.assertEqual(
            lines[:2],
            [
                "server: r-1 has 5.0 s before its caller gives up",
                "client: rows for 'select 1' answered by {'server': 'db-1'}",
            ],
        )
        # The server hears of the timeout and the cancellation after the client does.
        self.assertEqual(
            sorted(lines[2:]),
            sorted(
                [
                    "server: r-2 has 0.5 s before its caller gives up",
                    "client: timed out: the call to 'query' had no answer within 0.5 seconds",
                    "server: r-2 cancelled, stopping the query",
                    "client: cancelled",
                    "server: r-3 cancelled, stopping the query",
                    "client: retry with timeout=3",
                ]
            ),
        )
        self.assertLess(
            lines.index("client: cancelled"), lines.index("client: retry with timeout=3")
        )

    def test_transfer(self) -> None:
        lines = run("transfer.py", "--mib", "8")
        self.assertEqual(len(lines), 3, lines)
        self.assertRegex(lines[0], r"^sent 8 MiB in [0-9.]+ s \([0-9]+ MB/s\)$")
        self.assertRegex(lines[1], r"^status calls answered at [0-9.]+ s, [0-9.]+ s, [0-9.]+ s$")
        self.assertRegex(lines[2], r"^peak memory grew by [0-9]+ MiB \(both sides\)$")

    def test_reconnect(self) -> None:
        self.assertEqual(
            run("reconnect.py"),
            [
                "client: logged in",
                "client: alice, on server run 1",
                "server: stopped",
                "server: started again",
                "client: logged in",
                "client: alice, on server run 2",
            ],
        )
