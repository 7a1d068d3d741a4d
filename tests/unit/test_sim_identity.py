"""The simulator runs the services' own policy objects, not copies of them."""

from __future__ import annotations

import random

import pytest
import wisp.policy.controller as controller_mod
import wisp.policy.scheduler as scheduler_mod
import wisp.policy.slo as slo_mod
from wisp.policy.controller import SessionSpecStats
from wisp.services import cli_sim
from wisp.services.drafter import service as drafter_service
from wisp.services.scheduler import service as scheduler_service
from wisp.settings import Settings
from wisp.sim import hooks as sim_hooks
from wisp.sim import simulator as sim_mod
from wisp.sim.hooks import BlockView
from wisp.sim.scenario import load_scenario
from wisp.sim.simulator import Simulation, load_assets
from wisp.specdec import TokenFeatures


@pytest.fixture(scope="module")
def tiny():
    sc = load_scenario("tiny", ["scenario.duration_s=10", "scenario.warmup_s=1"])
    return sc, load_assets(sc)


def test_cli_hooks_are_the_services_functions() -> None:
    h = cli_sim.service_hooks()
    assert h.source == "services"
    assert h.round_deadline is scheduler_service.round_deadline
    assert h.scheduler_policy is scheduler_service.default_policy
    assert h.expected_commit is drafter_service.expected_commit


def test_simulator_imports_the_policy_modules_it_runs() -> None:
    assert sim_mod.SchedulerCore is scheduler_mod.SchedulerCore
    assert sim_mod.RoundInfo is scheduler_mod.RoundInfo
    assert sim_mod.AdmissionController is slo_mod.AdmissionController
    assert sim_mod.snapshot is slo_mod.snapshot
    assert sim_mod.SessionSpecStats is controller_mod.SessionSpecStats
    assert sim_mod.FixedLength is controller_mod.FixedLength


@pytest.mark.parametrize("mode", ["wisp", "sled", "centralized"])
def test_simulation_holds_the_services_objects(tiny, mode: str) -> None:
    sc, assets = tiny
    sim = Simulation(sc, mode, 4, assets=assets, hooks=cli_sim.service_hooks())
    mc = sc.mode(mode)
    s = Settings(mode=mode, draft_k=mc.draft_k, max_batch_size=mc.max_batch_size, max_wait_ms=mc.max_wait_ms)
    want = scheduler_service.default_policy(s)
    assert type(sim.core) is scheduler_mod.SchedulerCore
    assert type(sim.batch_policy) is type(want) and sim.batch_policy == want
    if mode == "wisp":
        assert isinstance(sim.batch_policy, slo_mod.SloAwarePolicy)
        assert type(sim.admission) is slo_mod.AdmissionController
    else:
        assert isinstance(sim.batch_policy, scheduler_mod.FcfsPolicy)
        assert sim.admission is None
    if mode == "centralized":
        assert sim.policy == controller_mod.FixedLength(0)
    else:  # the drafter's own default_policy for the mode
        expect = controller_mod.default_policy(s)
        assert type(sim.policy) is type(expect)
    res = sim.run()
    assert res.info["hooks"] == "services"


def test_mirrors_equal_the_services_functions() -> None:
    rng = random.Random(0)
    for _ in range(200):
        first = rng.choice([None, rng.uniform(0, 1e6)])
        v = BlockView(rng.randint(0, 500), rng.uniform(0, 1e6), rng.uniform(1, 1e4), rng.uniform(1, 1e3),
                      first)
        assert sim_hooks.mirror_round_deadline(v) == scheduler_service.round_deadline(v)
        feats = [TokenFeatures(rng.uniform(-0.1, 1.1), 1.0, 0.1, 3.0) for _ in range(rng.randint(0, 8))]
        assert sim_hooks.mirror_expected_commit(feats) == drafter_service.expected_commit(feats)  # type: ignore[arg-type]
    for mode in ("wisp", "sled", "centralized"):
        s = Settings(mode=mode, max_batch_size=7, max_wait_ms=3.0)
        assert sim_hooks.mirror_scheduler_policy(s) == scheduler_service.default_policy(s)


def test_session_stats_are_recorded_like_the_drafter() -> None:
    # the simulator calls SessionSpecStats.record(drafted, accepted) per verdict, as the drafter does
    a, b = SessionSpecStats(), SessionSpecStats()
    for d, acc in [(4, 2), (4, 4), (3, 0)]:
        a.record(d, acc)
        b.record(d, acc)
    assert a == b and a.rounds == 3 and a.accepted == 6
