"""The discrete-event simulator: determinism, event order, conservation, replay semantics,
timing models, a tiny sweep and the capacity/ratio arithmetic (no Redis, no torch models)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from wisp.policy.controller import DraftPlan, FixedLength, SessionSpecStats
from wisp.policy.estimator import BatchShape, LinearEstimator
from wisp.sim.engine import EventQueue
from wisp.sim.scenario import ScenarioError, list_scenarios, load_scenario
from wisp.sim.server import FastLinear, KvPool, RooflineModel, load_profile
from wisp.sim.simulator import Simulation, load_assets, simulate
from wisp.sim.sweep import SweepResult, run_sweep
from wisp.sim.workload import (
    AcceptanceBank,
    AcceptanceSeq,
    fixed_k_frontier,
    read_trace_rows,
    sequences_from_rows,
)
from wisp.specdec import TokenFeatures

SHORT = ["scenario.duration_s=30", "scenario.warmup_s=5", "scenario.drain_s=60"]


@pytest.fixture(scope="module")
def tiny():
    sc = load_scenario("tiny", SHORT)
    return sc, load_assets(sc)


# ---------------------------------------------------------------------- determinism
@pytest.mark.parametrize("mode", ["wisp", "sled", "centralized"])
def test_same_seed_same_summary(tiny, mode: str) -> None:
    sc, assets = tiny
    a = simulate(sc, mode, 12, assets=assets)
    b = simulate(sc, mode, 12, assets=load_assets(sc))  # assets rebuilt from scratch too
    assert a.summary == b.summary or json.dumps(a.summary, default=str) == json.dumps(b.summary, default=str)
    assert a.breakdown == b.breakdown
    assert [r.__dict__ for r in a.records] == [r.__dict__ for r in b.records]


def test_other_seed_other_run(tiny) -> None:
    sc, assets = tiny
    a = simulate(sc, "sled", 12, assets=assets, seed=1)
    b = simulate(sc, "sled", 12, assets=assets, seed=2)
    assert [r.ttft_ms for r in a.records] != [r.ttft_ms for r in b.records]


# ---------------------------------------------------------------------- event order
def test_event_queue_orders_by_time_then_insertion() -> None:
    q = EventQueue()
    rng = random.Random(0)
    times = [rng.choice([0.0, 1.0, 1.0, 2.5, 3.0]) for _ in range(200)]
    for i, t in enumerate(times):
        q.push(t, 0, i)
    out = [q.pop() for _ in range(len(times))]
    assert [e[0] for e in out] == sorted(times)
    for t in set(times):  # FIFO among equal times
        ids = [e[3] for e in out if e[0] == t]
        assert ids == sorted(ids)
    with pytest.raises(ValueError):
        q.push(q.now - 1.0, 0)


def test_simulation_clock_never_goes_back(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    sc, assets = tiny
    seen: list[float] = []
    orig = EventQueue.pop

    def pop(self):  # type: ignore[no-untyped-def]
        ev = orig(self)
        seen.append(ev[0])
        return ev

    monkeypatch.setattr(EventQueue, "pop", pop)
    simulate(sc, "wisp", 10, assets=assets)
    assert len(seen) > 100 and all(b >= a for a, b in zip(seen, seen[1:], strict=False))


# ---------------------------------------------------------------------- conservation
@pytest.mark.parametrize("mode", ["wisp", "sled", "centralized"])
def test_every_request_finishes_or_is_counted_failed(tiny, mode: str) -> None:
    sc, assets = tiny
    r = simulate(sc, mode, 16, assets=assets)
    info = r.info
    assert info["submitted_in_window"] == info["recorded"] == len(r.records) == r.summary["requests"]
    assert r.summary["requests"] > 20
    for rec in r.records:
        if rec.ok:
            assert rec.tokens >= 1 and rec.ttft_ms > 0 and rec.e2e_ms >= rec.ttft_ms
            assert rec.drafted >= rec.accepted
        else:
            assert math.isinf(rec.ttft_ms)


def test_overload_with_a_short_drain_counts_failures(tiny) -> None:
    sc, assets = tiny
    sc2 = load_scenario("tiny", [*SHORT, "scenario.drain_s=1", "server.kv_tokens=2000",
                                 "workload.think_s=0.5"])
    r = simulate(sc2, "sled", 64, assets=assets)
    assert r.info["submitted_in_window"] == len(r.records)
    assert r.summary["failed"] > 0 and r.info["kv_waits"] > 0
    assert r.summary["slo_attainment"] < 1.0


def test_admission_refusals_are_failed_records(tiny) -> None:
    sc, assets = tiny
    sc2 = load_scenario("tiny", [*SHORT, "slo.ttft_ms=5", "slo.tpot_ms=1"])
    r = simulate(sc2, "wisp", 16, assets=assets)
    assert r.info["refused"] > 0
    assert 0 < r.summary["failed"] <= r.info["refused"]  # refusals before the window are not recorded
    assert r.info["submitted_in_window"] == len(r.records)


# ---------------------------------------------------------------------- replay semantics
class _StopAt:
    """A draft policy that drafts up to k and stops before token ``at`` (records its calls)."""

    name = "stop-at"

    def __init__(self, k: int, at: int) -> None:
        self.k, self.at = k, at
        self.calls: list[tuple[int, TokenFeatures]] = []

    def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan:
        def stop(i: int, f: TokenFeatures) -> bool:
            self.calls.append((i, f))
            return i >= self.at

        return DraftPlan(max_k=max(0, min(self.k, budget)), stop=stop)


def _bank(pattern: list[bool]) -> AcceptanceBank:
    feats = [TokenFeatures(0.9 if m else 0.3, 0.5, 0.5, 5.0) for m in pattern]
    return AcceptanceBank([AcceptanceSeq(feats, list(pattern), "t")], "test")


def test_stop_callback_sees_replayed_features_and_ends_the_round(tiny) -> None:
    sc, assets = tiny
    pattern = [True, True, False, True] * 64
    a = replace(assets, bank=_bank(pattern))
    pol = _StopAt(k=6, at=3)
    sim = Simulation(sc, "sled", 1, assets=a, policy=pol)
    s_res = sim.run()
    # rounds draft at most 3 tokens (stopped before the 4th) and accept the leading run of
    # matches: on T T F T T T F T ... the first round accepts 2, every later one 3 (T T T)
    ok = [r for r in s_res.records if r.ok]
    assert ok and all(r.drafted <= 3 * r.rounds for r in ok)
    assert 2.5 < s_res.summary["mean_accepted_per_round"] <= 3.0
    # stop was asked for positions 0..3 of each round, with the ring's features
    assert {i for i, _ in pol.calls} == {0, 1, 2, 3}
    assert all(f in a.bank.features for _, f in pol.calls[:20])


def test_draft_time_counts_the_forward_of_a_stopped_token(tiny) -> None:
    sc, assets = tiny
    sc1 = load_scenario("tiny", [*SHORT, "devices.classes.fast.round_jitter_cv=0",
                                 "devices.classes.slow.round_jitter_cv=0",
                                 "devices.classes.fast.device_cv=0", "devices.classes.slow.device_cv=0",
                                 "devices.mix={ fast = 1.0 }"])
    a = replace(assets, bank=_bank([True] * 512))
    pol = _StopAt(k=6, at=3)
    sim = Simulation(sc1, "sled", 1, assets=a, policy=pol)
    res = sim.run()
    # rounds after the first: 3 drafted + the stopped token's forward = 4 passes at 12.5 ms
    per_round = res.breakdown["drafting_ms"]
    assert per_round == pytest.approx(4 * 1000.0 / 80.0, rel=0.25)


def test_acceptance_is_the_run_of_matches_from_the_round_start(tiny) -> None:
    sc, assets = tiny
    a = replace(assets, bank=_bank([True, False] * 512))
    res = simulate(sc, "sled", 1, assets=a)
    # k = 4 from a matching position: accept 1, then the correction; the next round starts on a
    # matching position again (pos advances by 2 on a period-2 pattern)
    assert res.summary["mean_accepted_per_round"] == pytest.approx(1.0)
    assert res.summary["acceptance_rate"] == pytest.approx(0.25, abs=0.01)  # budget-capped last rounds


def test_centralized_server_loop_has_no_per_token_round_trip(tiny) -> None:
    sc, assets = tiny
    rt = load_scenario("tiny", [*SHORT, "modes.centralized.loop='round_trip'"])
    loop = simulate(sc, "centralized", 4, assets=assets)
    trip = simulate(rt, "centralized", 4, assets=assets)
    assert loop.breakdown["network_ms"] < 1.0 < trip.breakdown["network_ms"]
    assert loop.summary["tpot_mean_ms"] < trip.summary["tpot_mean_ms"]
    assert loop.summary["acceptance_rate"] != loop.summary["acceptance_rate"]  # nan: nothing drafted


def test_fixed_k_frontier_of_the_synthetic_model_matches_the_reference(tiny) -> None:
    _, assets = tiny
    f = fixed_k_frontier(assets.bank, (1, 4))
    assert f[1][0] == pytest.approx(1.79, abs=0.08)
    assert f[4][0] == pytest.approx(3.35, abs=0.2)


# ---------------------------------------------------------------------- files
def _rows() -> list[dict]:
    """Trace rows of one request: prompt 10 tokens; round 0 accepts 2 of 4 (rows 0..2), round 1
    accepts all 4 (rows 0..3), round 2 accepts 0 (row 0)."""
    rows = []

    def add(rnd: int, ctx: int, drafted: int, accepted: int) -> None:
        for i in range(min(accepted, drafted - 1) + 1):
            rows.append({"request_id": "q1", "round": rnd, "position": i, "top1_prob": 0.5 + 0.01 * (ctx + i),
                         "entropy": 1.0, "margin": 0.2, "logit_spread": 4.0, "recent_acceptance": 1.0,
                         "drafted": drafted, "accepted": accepted, "label": int(i == accepted),
                         "context_len": ctx, "prompt_index": 0})

    add(0, 10, 4, 2)   # output positions 0,1 accepted, 2 rejected; commits 3
    add(1, 13, 4, 4)   # positions 3..6 accepted; commits 5 (bonus at 7)
    add(2, 18, 4, 0)   # position 8 rejected
    return rows


def test_trace_rows_rebuild_per_position_sequences(tmp_path: Path) -> None:
    p = tmp_path / "traces.jsonl"
    rows = _rows()
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n{\"x\": 1}\n")
    (tmp_path / "traces.meta.json").write_text(json.dumps(
        {"requests": [{"request_id": "q1", "prompt_token_ids": list(range(10)),
                       "token_ids": list(range(12))}]}))
    got, meta = read_trace_rows(p)
    assert len(got) == len(rows) and meta["requests"][0]["request_id"] == "q1"
    (seq,) = sequences_from_rows(got, meta)
    assert seq.match[:9] == [True, True, False, True, True, True, True, None or seq.match[7], False]
    assert seq.match[8] is False and seq.imputed >= 1  # the bonus position 7 is imputed
    assert seq.prompt_len == 10 and seq.output_len == 12
    assert seq.features[3].top1_prob == pytest.approx(0.5 + 0.01 * 13)
    # without context_len the positions come from the accepted counts
    (seq2,) = sequences_from_rows([{k: v for k, v in r.items() if k != "context_len"} for r in rows])
    assert seq2.match[:7] == seq.match[:7] and seq2.match[8] is False


def test_profile_loader_accepts_several_shapes(tmp_path: Path) -> None:
    rows = [{"new_tokens": [5, 3], "context_lens": [100, 40], "measured_ms": 50.0 + i} for i in range(10)]
    (tmp_path / "a.json").write_text(json.dumps({"hardware": {"cpu": "x"}, "samples": rows}))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    row = json.dumps({"shape": {"new": 4, "ctx": 9}, "rows": 2, "ms": 7})
    (tmp_path / "c.jsonl").write_text("\n".join(row for _ in range(5)) + "\nbroken\n")
    a = load_profile(tmp_path / "a.json")
    assert len(a.samples) == 10 and a.hardware == {"cpu": "x"}
    assert len(load_profile(tmp_path / "b.json").samples) == 10
    c = load_profile(tmp_path / "c.jsonl")
    assert c.samples[0].new_tokens == (4, 4) and c.samples[0].measured_ms == 7.0
    (tmp_path / "d.json").write_text(json.dumps({"samples": [{"foo": 1}]}))
    with pytest.raises(ScenarioError):
        load_profile(tmp_path / "d.json")


def test_fast_linear_is_the_linear_estimator(tiny) -> None:
    rng = random.Random(3)
    est = LinearEstimator(refit_every=4)
    fast = FastLinear(est)
    assert fast.exact
    for step in range(40):
        rows = rng.randint(1, 20)
        shape = BatchShape.of([rng.randint(1, 600) for _ in range(rows)],
                              [rng.randint(0, 3000) for _ in range(rows)])
        assert fast.predict(shape) == pytest.approx(est.predict(shape), rel=1e-9, abs=1e-9)
        fast.observe(shape, 10.0 + step)
    assert est.version > 0


def test_roofline_is_memory_bound_for_decode_and_compute_bound_for_prefill() -> None:
    sc = load_scenario("paper")
    m = RooflineModel(sc.server.roofline, 0.0)
    one = m.mean_ms([1], [500])
    assert 38 < one < 50  # ~43 ms: 65.6 GB of bf16 weights at ~1.6 TB/s
    assert m.mean_ms([1] * 32, [500] * 32) < 1.15 * one  # batching decode is almost free
    assert m.mean_ms([2048], [0]) > 10 * one  # a long prefill is compute bound


def test_kv_pool_is_first_come_first_served() -> None:
    kv = KvPool(100)
    assert kv.try_reserve(60)
    assert not kv.try_reserve(50)
    kv.waiting.extend(["a", "b"])
    assert not kv.try_reserve(10)  # nobody jumps the queue
    kv.release(60)
    assert kv.admit_waiting(lambda w: 50) == ["a", "b"]
    assert KvPool(0).try_reserve(10**9)


# ---------------------------------------------------------------------- scenarios
def test_packaged_scenarios_load() -> None:
    assert {"paper", "local", "tiny"} <= set(list_scenarios())
    for name in list_scenarios():
        assert load_scenario(name).name == name


def test_scenario_errors_name_the_offending_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[server]\nverifierz = 2\n")
    with pytest.raises(ScenarioError, match="server.verifierz"):
        load_scenario(p)
    with pytest.raises(ScenarioError, match="unknown setting"):
        load_scenario("tiny", ["server.nope=1"])
    with pytest.raises(ScenarioError, match="verifiers"):
        load_scenario("tiny", ["server.verifiers=0"])
    sc = load_scenario("tiny", ["server.verifiers=2", "devices.mix={ fast = 1.0 }"])
    assert sc.server.verifiers == 2 and sc.devices.mix == {"fast": 1.0}


def test_two_verifiers_share_the_load(tiny) -> None:
    sc, assets = tiny
    sc2 = load_scenario("tiny", [*SHORT, "server.verifiers=2"])
    one = simulate(sc, "sled", 32, assets=assets)
    two = simulate(sc2, "sled", 32, assets=assets)
    assert two.summary["tpot_mean_ms"] <= one.summary["tpot_mean_ms"] * 1.05
    assert two.verifier_utilisation < one.verifier_utilisation


def test_a_shared_drafter_host_drafts_queued_rounds_together(tiny) -> None:
    """One shared drafter host: FIFO (one round at a time) makes every device wait for the
    others' drafting; batched (drafter_batch) drafts the queued rounds together, as
    DraftEngine.draft_many does, so rounds wait less and TPOT drops; a costly batched step
    (growth) gives part of that back."""
    sc, assets = tiny
    host = [*SHORT, "devices.drafter_hosts=1"]
    fifo = simulate(load_scenario("tiny", [*host, "devices.drafter_batch=1"]), "sled", 8, assets=assets)
    batched = simulate(load_scenario("tiny", [*host, "devices.drafter_batch=64",
                                              "devices.drafter_batch_growth=0.05"]), "sled", 8,
                       assets=assets)
    costly = simulate(load_scenario("tiny", [*host, "devices.drafter_batch=64",
                                             "devices.drafter_batch_growth=0.5"]), "sled", 8,
                      assets=assets)
    assert batched.summary["tpot_mean_ms"] < 0.8 * fifo.summary["tpot_mean_ms"]
    assert batched.summary["tpot_mean_ms"] < costly.summary["tpot_mean_ms"]
    assert all(r.tokens > 0 for r in batched.records)
    with pytest.raises(ScenarioError, match="drafter_batch"):
        load_scenario("tiny", ["devices.drafter_batch=0"])


# ---------------------------------------------------------------------- sweep and capacity
def _fake(points: dict[str, dict[int, tuple[float, float]]]) -> SweepResult:
    sc = load_scenario("tiny")
    res = SweepResult(sc, {})
    for mode, pts in points.items():
        res.points[mode] = {n: {"devices": n, "slo_attainment": a, "goodput_tokens_per_s": g,
                                "wasted_draft_ms_per_request": 1.0, "verifier_utilisation": 0.5,
                                "tpot_mean_ms": 10.0} for n, (a, g) in pts.items()}
    return res


def test_capacity_and_ratios() -> None:
    res = _fake({
        "wisp": {10: (1.0, 100), 20: (0.95, 210), 40: (0.91, 400), 80: (0.5, 300), 160: (0.95, 50)},
        "sled": {10: (0.95, 90), 20: (0.6, 100), 40: (0.2, 80), 80: (0.0, 0), 160: (0.0, 0)},
        "centralized": {10: (1.0, 100), 20: (0.92, 200), 40: (0.5, 200), 80: (0.1, 50), 160: (0.0, 0)},
    })
    # the mean curve's first crossing of 90%, interpolated: 40 + 0.01 / 0.41 x 40 (the lucky
    # 160 past the knee does not count); one value per point: no interval
    cap = res.capacity("wisp")
    assert cap["mean"] == pytest.approx(40 + 40 * 0.01 / 0.41) == cap["lo"] == cap["hi"]
    assert res.capacity_point("wisp") == 40
    s = res.summary()
    assert s["modes"]["sled"]["capacity"]["mean"] == pytest.approx(10 + 10 * 0.05 / 0.35)
    assert s["modes"]["sled"]["capacity_point"] == 11
    central = 20 + 20 * 0.02 / 0.42
    assert s["capacity_ratio_vs_centralized"] == pytest.approx(cap["mean"] / central)
    assert s["capacity_ratio_vs_sled"] == pytest.approx(cap["mean"] / (10 + 10 * 0.05 / 0.35))
    assert s["goodput_ratio_devices"] == 40
    assert s["goodput_ratio_vs_centralized"] == pytest.approx(2.0)
    assert s["goodput_ratio_vs_sled"] == pytest.approx(5.0)
    assert s["meets_paper_targets"]["capacity_ratio_vs_sled"] is False
    zero = _fake({"wisp": {10: (0.95, 1)}, "sled": {10: (0.1, 1)}, "centralized": {10: (0.95, 1)}})
    assert zero.summary()["capacity_ratio_vs_sled"] == math.inf


def test_a_censored_capacity_makes_its_ratio_a_bound() -> None:
    # wisp never falls below 90% in the sweep: its capacity is >= 40, the ratio at least 40 / c
    res = _fake({"wisp": {20: (0.99, 1), 40: (0.95, 1)}, "centralized": {20: (0.95, 1), 40: (0.85, 1)},
                 "sled": {20: (0.99, 1), 40: (0.97, 1)}})
    s = res.summary()
    assert s["modes"]["wisp"]["capacity"]["censored"] == "above"
    assert s["capacity_ratio_vs_centralized"] == pytest.approx(40 / (20 + 20 * 0.05 / 0.10))
    assert s["capacity_ratio_vs_centralized_bound"] == "at_least"
    assert s["capacity_ratio_vs_sled"] is None  # both censored: unknown
    flipped = _fake({"wisp": {20: (0.95, 1), 40: (0.85, 1)}, "centralized": {20: (0.99, 1), 40: (0.95, 1)}})
    assert flipped.summary()["capacity_ratio_vs_centralized_bound"] == "at_most"


def test_tiny_sweep_writes_the_report(tmp_path: Path) -> None:
    from wisp.sim.report import write_report

    sc = load_scenario("tiny", SHORT)
    res = run_sweep(sc, ["wisp", "sled", "centralized"], [4, 24], refine=1, seeds=2)
    summary = res.summary()
    assert summary["seeds_per_point"] == 2
    assert all(p["seeds"] == 2 for m in summary["modes"].values() for p in m["points"])
    for mode in ("wisp", "sled", "centralized"):
        m = summary["modes"][mode]
        assert {"capacity", "goodput_tokens_per_s", "slo_attainment", "slo_attainment_ci",
                "goodput_tokens_per_s_ci", "verifier_utilisation",
                "mean_wasted_draft_ms_per_request"} <= set(m)
        assert {"mean", "lo", "hi"} <= set(m["capacity"])
        assert {"4", "24"} <= set(m["slo_attainment"])
        for p in m["points"]:  # the point is the seeds' mean, inside its interval
            assert len(p["slo_attainment_seeds"]) == 2
            assert p["slo_attainment"] == pytest.approx(sum(p["slo_attainment_seeds"]) / 2)
            lo, hi = p["slo_attainment_ci"]
            assert lo <= p["slo_attainment"] <= hi
    for k in ("capacity_ratio_vs_centralized", "capacity_ratio_vs_sled", "goodput_ratio_vs_centralized",
              "goodput_ratio_vs_sled"):
        assert k in summary
    files = write_report(summary, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["scenario"]["name"] == "tiny"
    for png in ("slo_attainment_vs_devices.png", "goodput_vs_devices.png", "round_time_breakdown.png"):
        assert (tmp_path / png).stat().st_size > 5000
    md = (tmp_path / "report.md").read_text()
    assert "| wisp |" in md and "round_time_breakdown.png" in md and files["report"].exists()


def test_fixed_length_is_the_sled_policy(tiny) -> None:
    sc, assets = tiny
    sim = Simulation(sc, "sled", 2, assets=assets)
    assert isinstance(sim.policy, FixedLength) and sim.policy.k == sc.modes.sled.draft_k


def _synthetic_trace_rows(bank: AcceptanceBank, k: int = 6) -> list[dict]:
    """Fixed-k trace rows (as the drafter publishes them) replayed from a bank."""
    rows = []
    for si, s in enumerate(bank.seqs[:8]):
        pos, rnd = 0, 0
        while pos + k < len(s):
            a = 0
            while a < k and s.match[pos + a]:
                a += 1
            for i in range(min(a, k - 1) + 1):
                f = s.features[pos + i]
                rows.append({"request_id": f"q{si}", "round": rnd, "position": i, "top1_prob": f.top1_prob,
                             "entropy": f.entropy, "margin": f.margin, "logit_spread": f.logit_spread,
                             "recent_acceptance": 0.8, "drafted": k, "accepted": a,
                             "label": int(i == a), "context_len": 100 + pos, "prompt_index": si})
            pos += a + 1
            rnd += 1
    return rows


class _SeesDraftSpeed:
    """Wraps a policy and records the measured draft speed each plan is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[float | None] = []
        self.trips: list[float | None] = []

    def plan(self, stats: Any, budget: int) -> Any:
        self.seen.append(stats.draft_ms_per_token)
        self.trips.append(stats.round_trip_ms)
        return self.inner.plan(stats, budget)


def test_a_learned_controller_drives_wisp_with_each_device_s_measured_speed(tiny) -> None:
    from wisp import controller_train as train
    from wisp.policy.controller import LearnedController

    sc, assets = tiny
    ctl, _ = train.train_controller(_synthetic_trace_rows(assets.bank), train.TrainConfig())
    assert isinstance(ctl, LearnedController)
    spy = _SeesDraftSpeed(ctl)
    sim = Simulation(sc, "wisp", 8, assets=assets, policy=spy)
    res = sim.run()
    # every session learns its device's draft speed from its own rounds (SpecSession.drafted),
    # as the drafter service does: after the first rounds, plans carry speeds in the range of
    # the devices' per-token times (jitter and shared-host batching widen it)
    speeds = [x for x in spy.seen if x is not None]
    assert len(speeds) > len(spy.seen) / 2
    lo, hi = min(d.draft_ms for d in sim.devs), max(d.draft_ms for d in sim.devs)
    assert lo / 3 < sorted(speeds)[len(speeds) // 2] < hi * 3
    # ... and its round trip (network and queues, ``LinkEstimate``), which the goodput rule
    # weighs, without the adaptive site choice: at least the devices' network round trip
    trips = [x for x in spy.trips if x is not None]
    assert len(trips) > len(spy.trips) / 2
    assert sorted(trips)[len(trips) // 2] >= min(d.rtt_ms for d in sim.devs) * 0.5
    assert res.summary["requests"] > 0 and res.summary["acceptance_rate"] > 0
    k = ctl.max_k
    sc_fixed = load_scenario("tiny", [*SHORT, "modes.wisp.controller='fixed'", f"modes.wisp.draft_k={k}"])
    fixed = simulate(sc_fixed, "wisp", 8, assets=assets)
    # the controller stops before likely rejections: a higher acceptance rate than always drafting max_k
    assert res.summary["acceptance_rate"] > fixed.summary["acceptance_rate"]


def test_the_simulators_estimator_refits_online_as_the_service_does(tiny) -> None:
    """The scheduler's estimator in the simulator starts from the profile fit and then learns
    from every simulated batch, as the estimator service does (it used to be fitted with
    ``refit_every = 10**9`` and stay frozen: version 1 after 1,168 batches)."""
    sc, assets = tiny
    sc = replace(sc, server=replace(sc.server, estimator=replace(sc.server.estimator, kind="linear",
                                                                 online_refit=True)))
    sim = Simulation(sc, "sled", 4, assets=assets)
    start = sim.estimator.version
    sim.run()
    assert sim.batches > 3 * LinearEstimator().refit_every
    assert sim.estimator.version > start + 1
