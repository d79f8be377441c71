"""
A harder variant of tests/test_orderfuzz.py for the messages kept behind large calls that
wait for room (Broker._afterBlocked, _releaseBlocked): more and larger calls, little room
(small ``bufferedBytes``), more cache handles and references in values, more cancels and
timeouts, more calls made from inside methods. The same rules are checked.

``PBROKER_ORDERSTRESS_SEEDS=first:count`` runs other seeds (default: 0 to 100).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pbroker import pb
from pbroker.testing import connectedServerAndClient
from tests import test_orderfuzz as fuzz
from tests.test_orderfuzz import (
    Actor,
    ClientGauge,
    ClientGaugeCopy,
    KiB,
    MiB,
    PoolGauge,
    PoolGaugeCopy,
    Scenario,
    ServerGauge,
    ServerGaugeCopy,
    ServerRoot,
    Side,
)


def _seeds() -> range:
    spec = os.environ.get("PBROKER_ORDERSTRESS_SEEDS")
    if not spec:
        return range(100)
    first, _, count = spec.partition(":")
    return range(int(first), int(first) + int(count or 1))


class StressScenario(Scenario):
    def __init__(self, seed: int) -> None:  # (Scenario.__init__, other choices)
        from random import Random

        self.seed = seed
        self.rng = rng = Random(seed)
        self.plans = {}
        self.problems = []
        self.copies = []
        self.serverGauge = ServerGauge()
        self.clientGauge = ClientGauge()
        self.largeChance = rng.choice([0.3, 0.45, 0.6])
        self.extrasChance = rng.choice([0.3, 0.6, 0.8])
        self.loseAt = rng.randrange(250) if rng.random() < 0.08 else None
        self.lost = False
        self.closer = None
        self.madeBeforeClose = 0
        self.reactions = rng.choice([5, 20, 40])
        self.reactChance = rng.choice([0.2, 0.4])
        self.cancelWeight = rng.choice([2, 5, 8])
        self.bufferSize = rng.choice([None, 16 * KiB, 64 * KiB, 300 * KiB])
        self.clock = Clock()
        self.client = Side(self, "c")
        self.server = Side(self, "s")
        registry = pb.UnjellyableRegistry()
        registry.setUnjellyableForClass(ClientGauge, ClientGaugeCopy)
        registry.setUnjellyableForClass(ServerGauge, ServerGaugeCopy)
        registry.setUnjellyableForClass(PoolGauge, PoolGaugeCopy)
        self.buffered = [rng.choice([64 * KiB, 64 * KiB, 300 * KiB, MiB]) for _ in range(2)]
        self.serverBroker, self.clientBroker, self.pump = connectedServerAndClient(
            pb.PBServerFactory(
                ServerRoot(self.server),
                clock=self.clock,
                limits=pb.BrokerLimits(bufferedBytes=self.buffered[0], messageSize=4 * MiB),
                registry=registry,
            ),
            pb.PBClientFactory(
                clock=self.clock,
                limits=pb.BrokerLimits(bufferedBytes=self.buffered[1], messageSize=4 * MiB),
                registry=registry,
            ),
            clock=self.clock,
            bufferSize=self.bufferSize,
        )
        self.server.broker, self.client.broker = self.serverBroker, self.clientBroker
        fuzz._SIDES.clear()
        fuzz._SIDES[id(self.serverBroker)] = self.server
        fuzz._SIDES[id(self.clientBroker)] = self.client
        root = self.clientBroker.remoteForName("root")
        self.client.peer = root
        hello: list[Any] = []
        root.callRemote("hello", Actor(self.client), self.clientGauge).addBoth(hello.append)
        self.pump.flush()
        assert len(hello) == 1 and isinstance(hello[0], ServerGaugeCopy), hello
        self.copies.append(hello[0])
        (self.client.observer,) = self.clientGauge.observers
        self.client.watchKept(self.server)
        self.server.watchKept(self.client)
        (self.server.observer,) = self.serverGauge.observers

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

    def run(self) -> None:
        rng = self.rng
        budget = [rng.randrange(10, 40)]
        for count in range(rng.randrange(40, 250)):
            if count == self.loseAt:
                self.lost = True
                side = rng.choice([self.client, self.server])
                if rng.random() < 0.2:
                    side.broker.transport.abortConnection()
                else:
                    self.closer, self.madeBeforeClose = side, len(side.made)
                    side.broker.transport.loseConnection()
            self.step(budget)
        self.settle()
        self.check()


def runStress(seed: int) -> Scenario:
    from twisted.logger import capturedLogs, formatEvent

    scenario = StressScenario(seed)
    with capturedLogs() as events:
        scenario.run()
    for event in events:
        level = event.get("log_level")
        if event.get("log_failure") is not None or getattr(level, "name", "") in (
            "error",
            "critical",
        ):
            scenario.problems.append(f"logged: {formatEvent(event)[:300]}")
    return scenario


class OrderStressTests(SynchronousTestCase):
    def test_scenarios(self) -> None:
        failed = []
        for seed in _seeds():
            scenario = runStress(seed)
            if scenario.problems:
                failed.append(scenario.describe())
                if len(failed) >= 3:
                    break
        self.assertEqual(failed, [], "\n\n".join(failed))
