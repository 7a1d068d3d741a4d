"""The simulated server engines (``server.engine``): ragged rows with chunked prefill under a
per-forward token budget (vLLM-like) and padded rows with whole prefills (this project's HF
verifier); the engine's ``max_num_seqs`` capping every mode; and a small end-to-end run per
engine that is the same for the same seed."""

from __future__ import annotations

from typing import Any

import pytest
from wisp.sim.scenario import ScenarioError, load_scenario
from wisp.sim.server import EngineModel, RooflineModel
from wisp.sim.simulator import (
    K_DONE,
    K_TICK,
    K_TIMER,
    K_VERDICT,
    Session,
    Simulation,
    load_assets,
    simulate,
)

from tests.unit.sim_sessions import make_session, make_sim


def _serve(sim: Simulation, on_verdict: Any = None, until: float = 60.0) -> tuple[list[Any], list[Any]]:
    """Run the server's events only (ticks, timers, forwards); verdicts are collected, not sent
    to devices. Returns the forwards (rows fed, contexts, rounds finished, ms) and the verdicts
    (time, request)."""
    forwards: list[Any] = []
    verdicts: list[Any] = []
    while sim.q.heap:
        t, _, kind, a, b = sim.q.pop()
        if t > until:
            break
        if kind == K_DONE:
            _plan, done, _carried, new, ctx, ms, _t0 = b
            forwards.append((list(new), list(ctx), [s.rid for s in done], ms))
            sim._on_done(a, b, t)
        elif kind in (K_TICK, K_TIMER):
            if kind == K_TIMER and sim.timer_at is not None and t >= sim.timer_at:
                sim.timer_at = None
            sim._tick(t)
        elif kind == K_VERDICT:
            verdicts.append((t, a.rid))
            if on_verdict is not None:
                on_verdict(a, t)
    return forwards, verdicts


def _mixed_batch(sim: Simulation) -> tuple[Session, list[Session]]:
    """A 1,000-token prompt's first round and three sessions' verify rounds, at the server."""
    long = make_session(sim, 0, 1000)
    decs = [make_session(sim, i, 100, generated=20, running=True) for i in (1, 2, 3)]
    for s in (long, *decs):
        sim._on_round(s, 0.0)
    return long, decs


# ---------------------------------------------------------------------- the scenario field
def test_engine_is_validated_with_the_allowed_values() -> None:
    with pytest.raises(ScenarioError) as err:
        load_scenario("tiny", ["server.engine=turbo"])
    msg = str(err.value)
    assert "server.engine" in msg and "ragged" in msg and "padded" in msg and "\n" not in msg
    assert load_scenario("tiny").server.engine == "ragged"
    assert load_scenario("tiny", ["server.engine=padded"]).server.engine == "padded"


def test_paper_uses_vllms_defaults_for_an_a100_api_server() -> None:
    srv = load_scenario("paper").server
    assert (srv.engine, srv.max_num_batched_tokens, srv.max_num_seqs) == ("ragged", 2048, 256)
    assert (srv.kv_block_tokens, srv.kv_watermark) == (16, 0.01)


@pytest.mark.parametrize("mode", ["wisp", "sled", "centralized"])
def test_max_num_seqs_caps_every_mode_the_same_way(assets: Any, mode: str) -> None:
    sim = make_sim(assets, "server.max_num_seqs=3", mode=mode)
    assert sim.max_batch == 3 and sim.batch_policy.max_batch_size == 3
    if sim.admission is not None:
        assert sim.admission.max_batch_size == 3
    assert make_sim(assets, "server.max_num_seqs=0", mode=mode).max_batch == sim.mc.max_batch_size


# ---------------------------------------------------------------------- ragged: chunked prefill
def test_chunked_prefill_splits_a_long_prompt_over_forwards_under_the_budget(assets: Any) -> None:
    sim = make_sim(assets, "server.max_num_batched_tokens=256")
    long, decs = _mixed_batch(sim)
    forwards, verdicts = _serve(sim)
    assert all(sum(new) <= 256 for new, _, _, _ in forwards)
    # the verify rows go whole in the first forward, the prompt fills the rest and continues
    assert forwards[0][0] == [5, 5, 5, 241] and forwards[0][1] == [119, 119, 119, 0]
    assert sorted(forwards[0][2]) == ["t1", "t2", "t3"]
    assert [f[0] for f in forwards[1:]] == [[256], [256], [251]]
    assert [f[1] for f in forwards[1:]] == [[241], [497], [753]]  # each chunk on what is cached
    assert forwards[-1][2] == ["t0"] and sim.chunked_prefills == 1
    # the long round's verdict only after its last chunk, the others' after the first forward
    t_long = next(t for t, rid in verdicts if rid == "t0")
    assert all(t < t_long for t, rid in verdicts if rid != "t0")
    assert not sim.carry[0] and not any(s.on_gpu for s in (long, *decs))


def test_verify_rows_still_run_while_a_prefill_is_chunked(assets: Any) -> None:
    sim = make_sim(assets, "server.max_num_batched_tokens=256")
    long, decs = _mixed_batch(sim)
    again = {s.rid: 1 for s in decs}

    def next_round(s: Session, t: float) -> None:  # each decode session sends one more round
        if again.get(s.rid):
            again[s.rid] -= 1
            sim._commit(s, t)
            s.r_drafted = 4
            sim._on_round(s, t)

    forwards, _ = _serve(sim, next_round)
    # the next rounds come back (after the network) while the prompt is still being fed: they
    # join the next forward whole and first, and the prompt's chunk shrinks to what is left
    later = [f for f in forwards[1:] if len(f[0]) > 1]
    assert len(later) == 1
    new, ctx, done, _ = later[0]
    assert new == [5, 5, 5, 256 - 15] and ctx[:3] == [120, 120, 120] and ctx[3] > 0
    assert sorted(done) == ["t1", "t2", "t3"]
    assert all(sum(f[0]) <= 256 for f in forwards)
    assert sum(sum(f[0]) for f in forwards) == 3 * 5 * 2 + 1004
    assert forwards[-1][2] == ["t0"]


def test_without_a_budget_the_prefill_goes_whole(assets: Any) -> None:
    sim = make_sim(assets, "server.max_num_batched_tokens=0")
    _mixed_batch(sim)
    forwards, _ = _serve(sim)
    assert len(forwards) == 1 and forwards[0][0] == [5, 5, 5, 1004] and sim.chunked_prefills == 0


# ---------------------------------------------------------------------- padded
def test_padded_engine_prices_every_row_at_the_batch_maximum(assets: Any) -> None:
    padded = make_sim(assets, "server.engine=padded", "server.max_num_batched_tokens=256")
    _mixed_batch(padded)
    forwards, _ = _serve(padded)
    assert len(forwards) == 1  # no chunked prefill: the prompt is fed whole despite the budget
    new, ctx, done, ms = forwards[0]
    assert new == [5, 5, 5, 1004] and ctx == [119, 119, 119, 0] and len(done) == 4
    assert ms == pytest.approx(padded.model.mean_ms([1004] * 4, [119] * 4))

    ragged = make_sim(assets, "server.max_num_batched_tokens=0")
    _mixed_batch(ragged)
    (r_new, r_ctx, _, r_ms), = _serve(ragged)[0]
    assert r_ms == pytest.approx(ragged.model.mean_ms(r_new, r_ctx))
    assert ms > 2.0 * r_ms  # three decode rows padded to a 1,004-token prefill


def test_engine_model_shapes() -> None:
    new, ctx = [5, 3, 900], [400, 50, 0]
    assert EngineModel("ragged").priced(new, ctx) == (new, ctx)
    assert EngineModel("padded").priced(new, ctx) == ([900] * 3, [400] * 3)
    assert EngineModel("padded").priced([7], [3]) == ([7], [3])
    assert EngineModel("ragged", 100).chunks(40, [50, 30]) == [50, 10]
    assert EngineModel("ragged", 100).chunks(120, [50]) == [0]  # verify rows are never cut
    assert EngineModel("padded", 100).chunks(40, [50, 30]) == [50, 30]
    sc = load_scenario("tiny")
    model = RooflineModel(sc.server.roofline, 0.0)
    pad = EngineModel("padded").priced(new, ctx)
    assert model.mean_ms(*pad) > model.mean_ms(new, ctx)


# ---------------------------------------------------------------------- end to end
def _paper(*overrides: str) -> Any:
    try:
        sc = load_scenario("paper", ["scenario.duration_s=30", "scenario.warmup_s=5",
                                     "scenario.drain_s=60", *overrides])
        return sc, load_assets(sc)
    except ScenarioError as err:  # the ShareGPT lengths are a data package
        pytest.skip(f"paper scenario unavailable: {err}")


@pytest.mark.parametrize("engine", ["ragged", "padded"])
def test_a_small_paper_run_is_deterministic_per_engine(engine: str) -> None:
    sc, assets = _paper(f"server.engine={engine}", "server.kv_tokens=6000")
    a = simulate(sc, "sled", 6, assets=assets)
    b = simulate(sc, "sled", 6, assets=assets)
    assert a.info["engine"] == engine and a.summary["requests"] > 0
    assert [r.__dict__ for r in a.records] == [r.__dict__ for r in b.records]
    assert {k: v for k, v in a.info.items() if k != "wall_s"} == {k: v for k, v in b.info.items()
                                                                 if k != "wall_s"}
    assert a.info["kv_leaked_blocks"] == 0


def test_the_engines_differ_on_the_same_workload() -> None:
    sc, assets = _paper("server.engine=ragged")
    sc2, _ = _paper("server.engine=padded")
    ragged = simulate(sc, "sled", 6, assets=assets)
    padded = simulate(sc2, "sled", 6, assets=assets)
    assert ragged.info["submitted_in_window"] > 0
    assert padded.breakdown["verification_ms"] > ragged.breakdown["verification_ms"]
