"""
A 1 GiB transfer over real loopback TCP, streamed in the native dialect, in a child process
(``tests/transfer_peer.py``) whose peak memory is compared with that of a 16 MiB transfer:
the memory a transfer needs must not grow with its size. Small calls on the same connection
must keep being answered while it runs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transfer_peer.py")


class LargeTransferTests(TestCase):
    timeout = 240

    async def transfer(self, mebibytes: int) -> dict[str, Any]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [PEER, str(mebibytes)], env=dict(os.environ)
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        result: dict[str, Any] = json.loads(out.decode("utf-8").strip().splitlines()[-1])
        return result

    @defer.inlineCallbacks
    def test_oneGibibyteInBoundedMemory(self) -> Any:
        """1 GiB arrives whole, in the memory a 16 MiB transfer takes (within 64 MiB)."""
        small = yield defer.Deferred.fromCoroutine(self.transfer(16))
        large = yield defer.Deferred.fromCoroutine(self.transfer(1024))
        self.assertEqual(small["bytes"], 16 * 1024 * 1024)
        self.assertEqual(large["bytes"], 1024 * 1024 * 1024)
        self.assertLess(large["peakKiB"], small["peakKiB"] + 64 * 1024, (small, large))
        self.assertGreater(large["pings"], 0)
