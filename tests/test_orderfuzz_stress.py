"""
A harder variant of tests/test_orderfuzz.py for the messages kept behind large calls that
wait for room (Broker._afterBlocked, _releaseBlocked): more and larger calls, little room
(small ``bufferedBytes``), more cache handles and references in values, more cancels and
timeouts, more calls made from inside methods. The same rules are checked, and so is what a
broker keeps of those calls (Broker._largeWaiting), through both fuzzes.

``PBROKER_ORDERSTRESS_SEEDS=first:count`` runs other seeds (default: 0 to 100).
"""

from __future__ import annotations

from random import Random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from pbroker import broker as brokerModule
from pbroker.broker import Broker
from tests.test_orderfuzz import KiB, MiB, Scenario, failedScenarios, runScenario, seedsFrom


class StressScenario(Scenario):
    largeChances = (0.3, 0.45, 0.6)
    extrasChances = (0.3, 0.6, 0.8)
    loseChance, loseWithin = 0.08, 250
    reactionCounts = (5, 20, 40)
    reactChances = (0.2, 0.4)
    bufferSizes = (None, 16 * KiB, 64 * KiB, 300 * KiB)
    bufferedSizes = (64 * KiB, 64 * KiB, 300 * KiB, MiB)
    budgets, stepCounts = (10, 40), (40, 250)

    def chooseMore(self, rng: Random) -> None:
        self.cancelWeight = rng.choice([2, 5, 8])

    def size(self) -> int:
        rng = self.rng
        if rng.random() < self.largeChance:
            if rng.random() < 0.85:
                return rng.randrange(70 * KiB, 400 * KiB)
            return rng.randrange(400 * KiB, 2 * MiB)
        return rng.choice([0, 1, 10, 100, 1000, 20_000])

    def plan(self, depth: int, oneway: bool) -> Any:
        plan = super().plan(depth, oneway)
        rng = self.rng
        if plan.extras and rng.random() < 0.5:
            plan.extras = ["gauge"] * len(plan.extras)
        return plan

    def step(self, budget: list[int]) -> None:
        rng = self.rng
        sides = (self.client, self.server)
        choice = rng.choices(
            ["call", "fire", "cancel", "pump", "some", "turn", "advance", "drop", "burst"],
            [6, 3, self.cancelWeight, 3, 4, 3, 2, 1, 1],
        )[0]
        if choice == "burst" and budget[0] > 0:
            side = rng.choice(sides)
            for _ in range(rng.randrange(2, 8)):
                budget[0] -= 1
                side.call(self.spec(1))
        elif choice == "cancel":
            side = rng.choice(sides)
            waiting = side.outstanding()
            if waiting:
                how = rng.choice(["random", "newest", "oldest", "many"])
                if how == "random":
                    side.cancelOne()
                else:
                    picked = waiting[::-1] if how == "newest" else waiting
                    if how != "many":
                        picked = picked[: rng.randrange(1, 4)]
                    else:
                        picked = rng.sample(waiting, min(len(waiting), rng.randrange(2, 6)))
                    for record in picked:
                        if not record.outcomes and record.deferred is not None:
                            record.cancelled = True
                            record.deferred.cancel()
        else:
            super().step(budget)


class OrderStressTests(SynchronousTestCase):
    def test_scenarios(self) -> None:
        failed = failedScenarios(seedsFrom("PBROKER_ORDERSTRESS_SEEDS", 100), StressScenario)
        self.assertEqual(failed, [], "\n\n".join(failed))


def walkedWaiting(broker: Any) -> tuple[Any, Any, dict[Any, int], list[int]]:
    """
    What a walk of ``broker._largeOut`` says of its large calls that wait for room (see
    Broker._Waiting): the first one's serial, the first other large message's, for each
    key the smallest serial of the waiting calls that provide it, and the serials of the
    calls that keep their order.
    """
    first = firstOther = None
    provided: dict[Any, int] = {}
    ordered = []
    for large in broker._largeOut:
        serial = large[5]
        keys = large[6]
        if large[2] is not None and (keys is None or brokerModule._IN_ORDER in keys[1]):
            ordered.append(serial)
        if large[3] and large[6] is not None:
            first = serial if first is None else min(first, serial)
            for key in large[6][1]:
                provided[key] = min(provided.get(key, serial), serial)
        else:
            firstOther = serial if firstOther is None else min(firstOther, serial)
    return first, firstOther, provided, sorted(ordered)


class WaitingIndexTests(SynchronousTestCase):
    def test_keptUpToDate(self) -> None:
        """
        What a broker keeps of its large calls that wait for room, up to date as they are
        queued, start and go (so that a flush does not walk them all), is what a walk of
        them says, wherever it is read, through the scenarios of both fuzzes.
        """
        checked: list[int] = []
        mismatches: list[Any] = []
        for name in ("_flushAfterLarge", "_releaseBlocked", "_mustWait", "_orderedCallUnsent"):
            original = getattr(Broker, name)

            def checking(broker: Any, *args: Any, _original: Any = original) -> Any:
                index = broker._largeWaiting
                kept = (index.first, index.firstOther, index.provided, index.ordered)
                checked.append(1)
                if kept != walkedWaiting(broker):
                    mismatches.append((kept, walkedWaiting(broker)))
                return _original(broker, *args)

            self.patch(Broker, name, checking)
        for seed in range(40):
            runScenario(seed)
            runScenario(seed, StressScenario)
        self.assertGreater(len(checked), 1000)
        self.assertEqual(mismatches[:3], [])
        # The index every broker has before its first large message, shared: never changed.
        empty = brokerModule._NO_WAITING
        self.assertEqual(
            (empty.first, empty.firstOther, empty.provided, empty.ordered, empty._calls),
            (None, None, {}, [], []),
        )
