"""The learned speculation controller: JSON format and validation, stop-rule semantics,
training on synthetic traces, replay, trace rows, and losslessness of the greedy loop with the
controller on tiny models."""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from wisp.controller_train import (
    OracleSequence,
    TrainConfig,
    classify_metrics,
    fit_risk_model,
    predict_raw,
    simulate,
    threshold_for_false_stop,
    train_controller,
)
from wisp.policy.controller import (
    AffineVerifyCost,
    ControllerFormatError,
    DraftPlan,
    FixedLength,
    LearnedController,
    RiskModel,
    SessionSpecStats,
    default_policy,
    load_controller,
    shipped_controller_path,
)
from wisp.protocol import TraceRow
from wisp.settings import Settings
from wisp.specdec import TokenFeatures
from wisp.trace import trace_rows


def feats(top1: float) -> TokenFeatures:
    return TokenFeatures(top1_prob=top1, entropy=1.0 - top1, margin=top1 / 2, logit_spread=5.0)


def top1_model(slope: float = -10.0, center: float = 0.5) -> RiskModel:
    """risk = sigmoid(slope * (top1 - center)): confident tokens are safe."""
    return RiskModel(features=("top1_prob",), mean=(center,), scale=(1.0,), coef=(slope,),
                     intercept=0.0)


def run_plan(plan: DraftPlan, top1s: list[float]) -> int:
    """How many tokens the engine would draft: it asks stop(i) before token i < max_k."""
    n = 0
    for i in range(plan.max_k):
        if plan.stop is not None and plan.stop(i, feats(top1s[i] if i < len(top1s) else top1s[-1])):
            break
        n += 1
    return n


# ---------------------------------------------------------------------- JSON format
def test_json_round_trip_keeps_weights_rule_and_metadata(tmp_path: Path) -> None:
    model = RiskModel(
        features=("top1_prob", "log1m_top1", "position", "recent_acceptance"),
        mean=(0.5, -1.0, 2.0, 0.7), scale=(0.2, 1.5, 2.0, 0.1), coef=(-1.0, 0.5, 0.3, -0.2),
        intercept=-0.4, position_cap=7,
    )
    ctl = LearnedController(model, 0.42, max_k=10, min_k=2, cum_threshold=0.7, goodput=True,
                            verify_ms=AffineVerifyCost(600, 12, 0.01), draft_ms_per_token=120,
                            metadata={"draft_model": "x", "trained_on": {"prompts": [100, 159]}})
    path = tmp_path / "c.json"
    ctl.save(path)
    back = load_controller(path)
    assert back.to_dict() == ctl.to_dict()
    for pos in range(12):
        f = feats(0.1 + 0.07 * pos)
        assert back.model.risk(f, pos, 0.6) == ctl.model.risk(f, pos, 0.6)
    assert back.verify_ms(5, 100) == pytest.approx(600 + 60 + 1.0)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "wisp.controller" and doc["schema_version"] == 1
    assert doc["metadata"]["draft_model"] == "x"


def test_mlp_round_trip_and_inference_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3))
    b = rng.normal(size=5)
    coef = rng.normal(size=5)
    model = RiskModel(features=("top1_prob", "entropy", "position"), mean=(0, 0, 0),
                      scale=(1, 1, 1), coef=tuple(coef), intercept=0.1, kind="mlp",
                      hidden=((tuple(tuple(r) for r in w), tuple(b)),))
    x = np.array([0.3, 0.7, 2.0])
    want = 1 / (1 + math.exp(-(np.maximum(0, w @ x + b) @ coef + 0.1)))
    f = TokenFeatures(0.3, 0.7, 0.1, 1.0)
    assert model.risk(f, 2, 1.0) == pytest.approx(want, rel=1e-12)
    ctl = LearnedController(model, 0.5)
    back = LearnedController.from_json(ctl.to_json())
    assert back.model.risk(f, 2, 1.0) == pytest.approx(want, rel=1e-12)


def _doc() -> dict:
    return LearnedController(top1_model(), 0.5).to_dict()


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.update(schema="something.else"), "not a WISP controller"),
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.update(extra=1), "unknown controller field"),
    (lambda d: d["model"].update(features=["top1_prob; import os"]), "unknown feature"),
    (lambda d: d["model"].update(coef=[1.0, 2.0]), "coef has"),
    (lambda d: d["model"].update(mean=[]), "equally long"),
    (lambda d: d["model"].update(scale=[0.0]), "scale"),
    (lambda d: d["model"].update(kind="forest"), "kind"),
    (lambda d: d["model"].update(intercept=float("nan")), "finite"),
    (lambda d: d.update(threshold=1.5), "threshold"),
    (lambda d: d["stop"].update(min_k=5, max_k=3), "min_k"),
    (lambda d: d["cost"].update(verify={"kind": "python", "code": "1"}), "cost kind"),
    (lambda d: d["cost"].update(round_trip_ms=-1.0), "round_trip_ms"),
    (lambda d: d["cost"].update(round_trip=50.0), "unknown cost field"),
    (lambda d: d["stop"].update(goodput_rule=True), "unknown stop field"),
    (lambda d: d.pop("model"), "model must be an object"),
])
def test_invalid_documents_are_refused(mutate, msg: str) -> None:
    doc = _doc()
    mutate(doc)
    with pytest.raises(ControllerFormatError, match=msg):
        LearnedController.from_json(json.dumps(doc))


def test_pickle_and_non_json_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(pickle.dumps(_doc()))
    with pytest.raises(ControllerFormatError, match="pickle"):
        load_controller(path)
    path.write_bytes(pickle.dumps(_doc(), protocol=0))
    with pytest.raises(ControllerFormatError):
        load_controller(path)
    with pytest.raises(ControllerFormatError, match="not JSON"):
        LearnedController.from_json("{nope")
    with pytest.raises(ControllerFormatError, match="one JSON object"):
        LearnedController.from_json("[1, 2]")


# ---------------------------------------------------------------------- the stop rule
def test_risk_threshold_stops_at_first_risky_token() -> None:
    ctl = LearnedController(top1_model(), 0.5, max_k=8, min_k=1, goodput=False)
    plan = ctl.plan(SessionSpecStats(), budget=100)
    assert plan.max_k == 8
    # tokens 0-2 confident, token 3 risky (top1 0.3 -> risk 0.88), token 4 confident again
    assert run_plan(plan, [0.9, 0.9, 0.9, 0.3, 0.9, 0.9, 0.9, 0.9]) == 3
    # all confident: drafts to max_k
    assert run_plan(ctl.plan(SessionSpecStats(), 100), [0.95] * 8) == 8


def test_min_k_max_k_and_budget() -> None:
    ctl = LearnedController(top1_model(), 0.5, max_k=10, min_k=2, goodput=False)
    # never stops before min_k even when every token is risky
    assert run_plan(ctl.plan(SessionSpecStats(), 100), [0.05] * 10) == 2
    # budget caps max_k (and min_k)
    assert ctl.plan(SessionSpecStats(), 3).max_k == 3
    assert run_plan(ctl.plan(SessionSpecStats(), 1), [0.05]) == 1
    assert ctl.plan(SessionSpecStats(), 0) == DraftPlan(max_k=0)
    assert ctl.plan(SessionSpecStats(), -2).max_k == 0
    # min_k = 0 may send an empty draft
    ctl0 = LearnedController(top1_model(), 0.5, max_k=4, min_k=0, goodput=False)
    assert run_plan(ctl0.plan(SessionSpecStats(), 100), [0.05] * 4) == 0


def test_cumulative_threshold() -> None:
    # every token has risk ~0.27 (below the per-token threshold 0.5); the chance that some
    # token so far is rejected passes 0.6 at the third token: 1 - 0.73^3 = 0.61
    ctl = LearnedController(top1_model(), 0.5, max_k=8, min_k=1, cum_threshold=0.6, goodput=False)
    r = ctl.model.risk(feats(0.6), 0, 1.0)
    assert 0.2 < r < 0.3
    n = run_plan(ctl.plan(SessionSpecStats(), 100), [0.6] * 8)
    k = next(i for i in range(1, 9) if 1 - (1 - r) ** (i + 1) > 0.6)
    assert n == k


def test_goodput_rule_follows_the_costs() -> None:
    # risk 0.27 per token (below the risk threshold of 0.9): only the goodput rule can stop
    ps = [0.6] * 12

    def drafted(verify_ms: float, draft_ms: float) -> int:
        ctl = LearnedController(top1_model(), 0.9, max_k=12, min_k=1, goodput=True,
                                verify_ms=AffineVerifyCost(verify_ms, 0, 0),
                                draft_ms_per_token=draft_ms)
        return run_plan(ctl.plan(SessionSpecStats(), 100), ps)

    expensive_verify = drafted(1000, 10)
    cheap_verify = drafted(50, 100)
    assert cheap_verify < expensive_verify
    assert cheap_verify >= 1
    # free drafting: every token adds expected tokens at no cost -> draft to max_k
    assert drafted(1000, 0) == 12
    # the rule is exactly "stop when E(n+1)/cost(n+1) < E(n)/cost(n)"
    ctl = LearnedController(top1_model(), 0.9, verify_ms=AffineVerifyCost(200, 0, 0),
                            draft_ms_per_token=100)
    p = 1 - ctl.model.risk(feats(0.6), 0, 1.0)
    for n in range(1, 6):
        e_n = 1 + sum(p ** (j + 1) for j in range(n))
        e_next = e_n + p ** (n + 1)
        want = (e_next / (200 + (n + 1) * 100)) / (e_n / (200 + n * 100)) - 1
        assert ctl.goodput_gain([p] * (n + 1), 0) == pytest.approx(want)


def test_a_longer_round_trip_drafts_longer_rounds() -> None:
    """What every round pays whatever its length (network, queues: the session's measured round
    trip) makes one more drafted token pay more: the goodput rule drafts longer behind a slow
    link or a busy server, and the session's measured figure overrides the file's default."""
    ps = [0.6] * 16  # risk ~0.27 per token, under the 0.9 threshold: only the goodput rule stops
    ctl = LearnedController(top1_model(), 0.9, max_k=16, min_k=1, goodput=True,
                            verify_ms=AffineVerifyCost(210, 14, 0), draft_ms_per_token=45.0,
                            round_trip_ms=0.0)

    def drafted(trip: float | None) -> int:
        return run_plan(ctl.plan(SessionSpecStats(round_trip_ms=trip), 100), ps)

    near, far = drafted(0.0), drafted(2000.0)
    assert 1 <= near < far
    assert drafted(None) == near  # unmeasured: the controller's own default (0 here)
    for bad in (float("inf"), float("nan"), -5.0):  # not a measurement: the file's figure
        assert drafted(bad) == near
    assert run_plan(ctl.replace(round_trip_ms=2000.0).plan(SessionSpecStats(), 100), ps) == far
    # the rule is "stop when E(n+1)/cost(n+1) < E(n)/cost(n)" with the round trip in both costs
    p = 1 - ctl.model.risk(feats(0.6), 0, 1.0)
    for n in range(1, 6):
        e_n = 1 + sum(p ** (j + 1) for j in range(n))
        e_next = e_n + p ** (n + 1)
        cost = (lambda m: 500 + 210 + 14 * (m + 1) + 45 * m)  # noqa: E731
        want = (e_next / cost(n + 1)) / (e_n / cost(n)) - 1
        assert ctl.goodput_gain([p] * (n + 1), 0, round_trip_ms=500.0) == pytest.approx(want)
    back = LearnedController.from_json(ctl.replace(round_trip_ms=80.0).to_json())
    assert back.round_trip_ms == 80.0


def test_estimator_as_cost_and_determinism() -> None:
    from wisp.policy.estimator import LinearEstimator

    est = LinearEstimator(coef=[700.0, 0, 10.0, 0, 0, 0, 0, 0, 0])
    ctl = LearnedController(top1_model(), 0.5, max_k=10, verify_ms=est)
    assert ctl.verify_ms(5, 100) == pytest.approx(750.0)
    back = LearnedController.from_json(ctl.to_json())
    assert back.verify_ms(5, 100) == pytest.approx(750.0)
    rng = random.Random(1)
    seq = [rng.random() for _ in range(10)]
    runs = {run_plan(ctl.plan(SessionSpecStats(recent_acceptance=0.5), 50), seq) for _ in range(5)}
    assert len(runs) == 1
    # a re-asked position replaces its estimate instead of stacking
    plan = ctl.plan(SessionSpecStats(), 50)
    assert [plan.stop(0, feats(0.9)) for _ in range(3)] == [False] * 3


def test_fixed_length_unchanged() -> None:
    assert FixedLength(4).plan(SessionSpecStats(), 2) == DraftPlan(max_k=2)
    assert FixedLength(4).plan(SessionSpecStats(), 10) == DraftPlan(max_k=4)
    s = SessionSpecStats()
    s.record(4, 2)
    assert s.recent_acceptance == pytest.approx(0.7 + 0.3 * 0.5)
    assert s.context_len == 0


# ---------------------------------------------------------------------- training
def _synthetic_rows(n_prompts: int = 40, per: int = 60, seed: int = 0) -> list[dict]:
    """Rows whose true rejection risk is sigmoid(3 - 8 * top1 + 0.2 * position)."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for j in range(per):
            top1 = rng.random()
            pos = rng.randrange(8)
            risk = 1 / (1 + math.exp(-(3 - 8 * top1 + 0.2 * pos)))
            lab = int(rng.random() < risk)
            rows.append({"request_id": f"r{p}", "prompt_index": p, "round": j, "position": pos,
                         "top1_prob": top1, "entropy": rng.random() * 3, "margin": top1 * rng.random(),
                         "logit_spread": 10 * rng.random(), "recent_acceptance": rng.random(),
                         "drafted": 8, "accepted": pos + 1 - lab, "label": lab})
    return rows


def test_training_recovers_a_known_relation() -> None:
    rows = _synthetic_rows()
    from wisp.controller_train import labels, raw_rows

    raw, y = raw_rows(rows), labels(rows)
    model = fit_risk_model(raw, y, ("top1_prob", "position", "entropy"))
    # coefficients in original units: coef / scale
    per_unit = [c / s for c, s in zip(model.coef, model.scale, strict=True)]
    assert per_unit[0] == pytest.approx(-8, rel=0.25)
    assert per_unit[1] == pytest.approx(0.2, abs=0.12)
    assert abs(per_unit[2]) < 0.25  # noise feature
    risk = predict_raw(model, raw)
    true = np.array([1 / (1 + math.exp(-(3 - 8 * r[0] + 0.2 * r[4]))) for r in raw])
    assert np.corrcoef(risk, true)[0, 1] > 0.98
    t = threshold_for_false_stop(y, risk, 0.05)
    m = classify_metrics(y, risk, t)
    assert m["false_stop_rate"] <= 0.05 and m["recall"] > 0.3 and m["auc"] > 0.85


def test_train_controller_reports_heldout_and_ships_valid_json(tmp_path: Path) -> None:
    rows = _synthetic_rows(n_prompts=20, per=40)
    ctl, rep = train_controller(rows, TrainConfig(features=("top1_prob", "position")),
                                metadata={"draft_model": "d"})
    h = rep["heldout_split"]
    assert h["heldout_rows"] > 0 and 0 < len(h["heldout_prompts"]) < 20
    assert h["train_rows"] + h["heldout_rows"] == len(rows)
    assert h["at_false_stop_target"]["false_stop_rate"] <= 0.2
    assert h["at_shipped_threshold"]["auc"] > 0.8
    ctl.save(tmp_path / "c.json")
    back = load_controller(tmp_path / "c.json")
    assert back.metadata["draft_model"] == "d" and "training" in back.metadata
    assert back.model.position_cap == 7


def test_mlp_kind_trains() -> None:
    rows = _synthetic_rows(n_prompts=10, per=40)
    from wisp.controller_train import labels, raw_rows

    m = fit_risk_model(raw_rows(rows), labels(rows), ("top1_prob", "position"), kind="mlp", hidden=4)
    assert m.kind == "mlp" and len(m.hidden[0][1]) == 4
    LearnedController.from_json(LearnedController(m, 0.5).to_json())


# ---------------------------------------------------------------------- replay
def test_simulate_counts_rounds_like_the_loop() -> None:
    # 10 output tokens; the draft is wrong at output positions 2 and 7
    seq = OracleSequence(prompt_index=0, prompt_len=5, raw4=[(0.9, 0.1, 0.8, 5.0)] * 11,
                         reject=[t in (2, 7) for t in range(10)], max_new=10)
    tot = simulate(FixedLength(4), [seq]).summary()
    # round 1 at g=0: drafts 0-3, accepts 2, commits 3 (g=3); round 2 at g=3: drafts 3-6,
    # accepts 4, commits 5 (bonus at 7, g=8); round 3 at g=8: budget 10-8-1 = 1, drafts 8,
    # accepts 1, commits 2 (g=10)
    assert (tot["rounds"], tot["drafted"], tot["accepted"], tot["committed"]) == (3, 9, 7, 10)
    assert tot["waste_per_committed"] == pytest.approx(2 / 10)
    # an oracle controller (risk high exactly where the draft is wrong) wastes nothing
    risky = [(0.1 if r else 0.95, 0.1, 0.5, 5.0) for r in seq.reject] + [(0.9, 0.1, 0.5, 5.0)]
    seq2 = OracleSequence(0, 5, risky, seq.reject, 10)
    ctl = LearnedController(top1_model(), 0.5, max_k=8, min_k=0, goodput=False)
    t2 = simulate(ctl, [seq2]).summary()
    assert t2["drafted"] == t2["accepted"] and t2["committed"] == 10
    assert t2["judged_stops"] == t2["stops"] == 2 and t2["false_stops"] == 0


def test_goodput_objective_picks_the_most_tokens_per_modeled_second() -> None:
    """``tune_stop_rule(objective="goodput")`` models each replayed round's time (round trip,
    verify, draft forwards) and picks, among points within the waste and tokens-per-round
    targets, the one with the most committed tokens per modeled second; with drafting nearly free
    against a round's fixed cost that is a longer-drafting point than the balanced pick."""
    from wisp.controller_train import StopParams, round_cost, tune_stop_rule

    rng = random.Random(3)
    seqs = []
    for i in range(12):
        reject = [rng.random() < 0.2 for _ in range(60)]
        # the draft knows when it is wrong, roughly: low top-1 where it will be rejected
        raw4 = [((0.3 if r else 0.9) + rng.uniform(-0.25, 0.08), 0.5, 0.3, 4.0) for r in reject]
        seqs.append(OracleSequence(i, 10, [*raw4, (0.9, 0.5, 0.3, 4.0)], reject, 60))
    folds = [(top1_model(), seqs[:6]), (top1_model(), seqs[6:])]
    grid = [StopParams(t, k, 1, None, False) for t in (0.05, 0.2, 0.5) for k in (4, 8, 16)]
    cost = AffineVerifyCost(210, 14, 0)
    common = dict(baseline_k=4, cost=cost, draft_ms=5.0, round_trip_ms=1000.0)
    best, results, base = tune_stop_rule(folds, grid, objective="goodput", **common)
    ok = [r for r in results if r["slack"] >= 0.05]
    assert ok and StopParams(**max(ok, key=lambda r: r["committed_per_s"])["params"]) == best
    # the modeled time is the round cost summed over the replayed rounds
    k4 = simulate(FixedLength(4), seqs, round_cost(cost, 5.0, 1000.0))
    assert base["committed_per_s"] == pytest.approx(k4.committed * 1000.0 / k4.modeled_ms)
    assert k4.modeled_ms == pytest.approx(
        sum(1000.0 + 210 + 14 * 5 + 4 * 5.0 for _ in range(k4.rounds)), rel=0.05)
    balanced, _, _ = tune_stop_rule(folds, grid, objective="balanced", **common)
    pick = {StopParams(**r["params"]): r for r in results}
    assert pick[best]["committed_per_round"] > pick[balanced]["committed_per_round"]
    with pytest.raises(ValueError, match="objective"):
        tune_stop_rule(folds, grid, objective="fastest", **common)


# ---------------------------------------------------------------------- trace rows
def test_trace_rows_labels() -> None:
    f = [feats(0.5)] * 6
    rows = trace_rows(request_id="r1", round=3, features=f, recent_acceptance=0.8, drafted=6,
                      accepted=2)
    assert [(r.position, r.label) for r in rows] == [(0, 0), (1, 0), (2, 1)]
    assert all(r.recent_acceptance == 0.8 and r.drafted == 6 and r.accepted == 2 for r in rows)
    full = trace_rows(request_id="r1", round=0, features=f, recent_acceptance=1.0, drafted=6,
                      accepted=6)
    assert [r.label for r in full] == [0] * 6
    assert trace_rows(request_id="r", round=0, features=[], recent_acceptance=1, drafted=0,
                      accepted=0) == []
    with pytest.raises(ValueError):
        TraceRow(request_id="r", round=0, position=3, top1_prob=1, entropy=0, margin=1,
                 logit_spread=1, recent_acceptance=1, drafted=6, accepted=2, label=0)
    with pytest.raises(ValueError):
        TraceRow(request_id="r", round=0, position=1, top1_prob=1, entropy=0, margin=1,
                 logit_spread=1, recent_acceptance=1, drafted=6, accepted=2, label=1)


# ---------------------------------------------------------------------- the drafter's default
def test_default_policy_by_mode(caplog: pytest.LogCaptureFixture) -> None:
    assert default_policy(Settings(mode="sled", draft_k=5)) == FixedLength(5)
    with caplog.at_level(logging.WARNING, logger="wisp.policy.controller"):
        pol = default_policy(Settings(mode="wisp", draft_model="/no/such/draft", draft_k=3))
    assert pol == FixedLength(3)
    assert "no learned speculation controller" in caplog.text


def test_shipped_qwen_controller_loads() -> None:
    path = shipped_controller_path("qwen-coder-0.5b", "qwen-coder-1.5b")
    assert path is not None, "the Qwen pair's controller must ship in wisp/assets"
    ctl = load_controller(path)
    assert ctl.metadata["draft_model"] == "qwen-coder-0.5b"
    assert isinstance(default_policy(Settings(mode="wisp")), LearnedController)


# ---------------------------------------------------------------------- lossless on tiny models
def test_greedy_loop_with_controller_is_lossless(tiny_pair: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM
    from wisp.services.cli.controller import greedy_loop
    from wisp.services.drafter.engine import DraftEngine
    from wisp.services.verifier.engine import VerifierEngine

    from tests.reference import greedy_reference

    torch.set_num_threads(1)
    target_dir, draft_dir = tiny_pair
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
    de, ve = DraftEngine(draft), VerifierEngine(target)
    # a controller that really stops at varying places: risky below top1 0.004 on these models
    model = RiskModel(features=("top1_prob", "position"), mean=(0.004, 0.0), scale=(0.001, 1.0),
                      coef=(-3.0, 0.8), intercept=0.0)
    ctl = LearnedController(model, 0.5, max_k=7, min_k=1, goodput=False)
    stopped_rounds = 0
    for j, prompt in enumerate(([151644, 872, 198, 785, 11], [9707, 11, 1879, 0, 3555, 13])):
        want = greedy_reference(target, prompt, 16)
        fixed, _ = greedy_loop(de, ve, f"f{j}", list(prompt), FixedLength(4), 16)
        learned, rounds = greedy_loop(de, ve, f"c{j}", list(prompt), ctl, 16)
        assert fixed == want
        assert learned == want
        stopped_rounds += sum(r["stopped"] for r in rounds)
        assert {r["drafted"] for r in rounds} - {0}
    assert stopped_rounds > 0


# ---------------------------------------------------------------------- prefill round
def test_prefill_round_sends_round_zero_undrafted(tmp_path: Path) -> None:
    ctl = LearnedController(top1_model(), 0.5, max_k=6, min_k=1, goodput=False, prefill_round=True)
    assert ctl.plan(SessionSpecStats(), budget=100) == DraftPlan(max_k=0, prefill=True)
    later = SessionSpecStats()
    later.record(0, 0)  # the prefill round's verdict arrived
    plan = ctl.plan(later, budget=100)
    assert plan.max_k == 6 and run_plan(plan, [0.9] * 6) == 6
    # it survives JSON, and the default (and the drafting rule judged alone) has none
    path = tmp_path / "c.json"
    ctl.save(path)
    assert load_controller(path).prefill_round is True
    from wisp.policy.controller import drafting_rule

    assert drafting_rule(ctl).plan(SessionSpecStats(), 100).max_k == 6
    assert LearnedController(top1_model(), 0.5).prefill_round is False


def test_default_policy_turns_the_prefill_round_on_by_setting() -> None:
    on = default_policy(Settings(mode="wisp"))
    off = default_policy(Settings(mode="wisp", prefill_round=False))
    assert isinstance(on, LearnedController) and on.prefill_round is True
    assert isinstance(off, LearnedController) and off.prefill_round is False
    assert on.plan(SessionSpecStats(), 100).max_k == 0
    assert off.plan(SessionSpecStats(), 100).max_k > 0


def test_wisp_controller_setting_names_the_controller(tmp_path) -> None:
    """WISP_CONTROLLER: a controller of your own wins over the shipped one; one that does not
    load is an error that names the file, not a silent fixed-k fallback."""
    import shutil

    import pytest
    from wisp.policy.controller import LearnedController, assets_dir, default_policy
    from wisp.settings import Settings

    shipped = sorted(assets_dir().glob("controller-*.json"))[0]
    mine = tmp_path / "mine.json"
    shutil.copy(shipped, mine)
    pol = default_policy(Settings(mode="wisp", draft_model="some/other-draft", controller=mine))
    assert isinstance(pol, LearnedController)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        default_policy(Settings(mode="wisp", controller=bad))
    assert type(default_policy(Settings(mode="sled", controller=mine))).__name__ == "FixedLength"
