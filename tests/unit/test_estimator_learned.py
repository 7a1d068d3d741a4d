"""The learned verify-time estimator as a pure object: fit on a synthetic CPU-like (non-monotone)
cost shape, JSON round trip, refusing bad models, positive predictions, online tracking of a
changed verifier speed; and the profile runner against a fake verifier."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from wisp.policy import learned_estimator as le
from wisp.policy.estimator import BatchShape, LinearEstimator
from wisp.profile import GridSpec, Profile, plan_grid, run_profile
from wisp.settings import Settings

FAST = le.FitConfig(n_trees=60, depth=3, learning_rate=0.15, seed=0)


def cpu_like_ms(shape: BatchShape) -> float:
    """A cost with the shape measured on the 2-core dev CPU: one query row runs matrix-vector
    kernels (cheap); 2-3 rows cost as much as 4-6 (GEMM with weight packing); then compute grows
    with the padded tokens; plus per-row and KV/attention terms."""
    b, l_max, p = shape.rounds, max(shape.new_tokens), max(shape.context_lens)
    m = b * l_max
    if m == 1:
        gemm = 340.0
    elif m <= 3:
        gemm = 1050.0
    elif m <= 6:
        gemm = 900.0 + 20.0 * (m - 4)
    else:
        gemm = 900.0 + 45.0 * (m - 6)
    return gemm + 12.0 * b + 0.05 * b * p + 0.002 * m * (p + l_max)


def synthetic_samples(seed: int = 0, noise: float = 0.03) -> list[tuple[BatchShape, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for b in (1, 2, 4, 8):
        for d in (0, 1, 2, 3, 4, 6, 8):
            for c in (32, 128, 384):
                s = BatchShape.of([d + 1] * b, [c] * b)
                out += [(s, cpu_like_ms(s) * math.exp(rng.normal(0, noise))) for _ in range(2)]
    for _ in range(16):
        b = int(rng.choice([2, 4, 8]))
        s = BatchShape.of([int(rng.choice([1, 2, 3, 5, 9])) for _ in range(b)],
                          [int(rng.integers(32, 385)) for _ in range(b)])
        out.append((s, cpu_like_ms(s) * math.exp(rng.normal(0, noise))))
    return out


@pytest.fixture(scope="module")
def fitted() -> tuple[le.LearnedEstimator, list, list]:
    train, test = le.split_by_shape(synthetic_samples(), 0.25, seed=1)
    est = le.fit(train, FAST, meta={"target_model": "synthetic"}, full_refit_every=0)
    return est, train, test


def test_non_monotone_cpu_shape_is_learned(fitted) -> None:
    est, train, test = fitted
    learned = le.error_summary(le.abs_pct_errors(est, test))
    linear = le.error_summary(le.abs_pct_errors(le.fit_linear(train), test))
    assert learned["n"] > 20
    assert learned["mape"] < 0.08, learned
    assert learned["mape"] < linear["mape"]
    # the shape itself: 1 token cheap, 2-3 tokens dearer than 4
    one, two, four = (est.predict(BatchShape.of([n], [128])) for n in (1, 2, 4))
    assert one < 0.6 * four < four < two


def test_predictions_positive_and_bounded_outside_the_profile(fitted) -> None:
    est, _, _ = fitted
    rng = np.random.default_rng(3)
    for _ in range(200):
        b = int(rng.integers(1, 33))
        s = BatchShape.of(rng.integers(1, 40, b).tolist(), rng.integers(0, 4000, b).tolist())
        ms = est.predict(s)
        assert math.isfinite(ms) and ms > 0
    assert est.predict(BatchShape.of([], [])) == 0.0
    # bigger than any profiled batch: grows, and not absurdly
    b8, b16 = (est.predict(BatchShape.of([5] * b, [200] * b)) for b in (8, 16))
    assert b16 > b8
    assert b16 / cpu_like_ms(BatchShape.of([5] * 16, [200] * 16)) == pytest.approx(1.0, abs=0.35)


def test_json_round_trip(fitted) -> None:
    est, _, test = fitted
    est2 = le.LearnedEstimator.from_json(est.to_json())
    shapes = [s for s, _ in test]
    assert np.array_equal(est2.predict_many(shapes), est.predict_many(shapes))
    assert [est2.predict(s) for s in shapes] == pytest.approx([est.predict(s) for s in shapes], rel=1e-9)
    assert est2.version == est.version and est2.model_id == est.model_id
    assert est2.meta["target_model"] == "synthetic" and len(est2.train) == len(est.train)
    assert isinstance(le.load_estimator(est.to_json()), le.LearnedEstimator)
    assert isinstance(le.load_estimator(LinearEstimator().to_json()), LinearEstimator)
    assert "pickle" not in est.to_json()


@pytest.mark.parametrize("mutate", [
    lambda o: o.update(kind="linear"),
    lambda o: o.update(schema=2),
    lambda o: o.update(features=o["features"][:-1]),
    lambda o: o.update(base_terms=["bias"]),
    lambda o: o.update(base_coef=[1.0, 2.0]),
    lambda o: o.update(level=-1.0),
    lambda o: o["residual"].update(feature=[[99, -1, -1]] * len(o["residual"]["feature"])),
    lambda o: o["residual"].update(value=[[float("nan")] * len(o["residual"]["value"][0])]
                                   * len(o["residual"]["value"])),
    lambda o: o["residual"].pop("threshold"),
])
def test_refuses_wrong_schema(fitted, mutate) -> None:
    obj = json.loads(fitted[0].to_json())
    mutate(obj)
    with pytest.raises(ValueError):
        le.LearnedEstimator.from_json(json.dumps(obj))


def test_refuses_non_models() -> None:
    for text in ("not json", "[1, 2]", json.dumps({"kind": "mystery", "schema": 1})):
        with pytest.raises(ValueError):
            le.load_estimator(text)


def _track(est: le.LearnedEstimator, factor: float, probes: list[BatchShape], stream: list,
           tol: float = 0.15) -> int:
    """Feed ``stream`` shapes measured at ``factor`` x the truth; return after how many samples
    every probe's prediction is within ``tol`` of ``factor`` x truth (and stays there)."""
    hit = None
    for i, s in enumerate(stream, 1):
        est.observe(s, factor * cpu_like_ms(s))
        ok = all(abs(est.predict(p) / (factor * cpu_like_ms(p)) - 1) <= tol for p in probes)
        if ok and hit is None:
            hit = i
        elif not ok:
            hit = None
    assert hit is not None, "never tracked the new speed"
    return hit


def test_refit_tracks_half_speed_within_bounded_batches(fitted) -> None:
    est = le.LearnedEstimator.from_json(fitted[0].to_json())
    est.refit_every, est.level_window = 4, 16
    bound = est.level_window // 2 + est.refit_every  # the documented worst case: 12
    rng = np.random.default_rng(5)
    stream = [BatchShape.of([int(rng.integers(1, 10))] * b, [int(rng.integers(32, 385))] * b)
              for b in rng.choice([1, 2, 4, 8], 80)]
    probes = [BatchShape.of([5] * 4, [128] * 4), BatchShape.of([1], [64]), BatchShape.of([3] * 8, [300] * 8)]
    v0 = est.version
    assert _track(est, 1.0, probes, stream[:20]) <= 4  # already right at full speed
    n_slow = _track(est, 2.0, probes, stream[20:60])  # the verifier now runs at half speed
    assert n_slow <= bound
    assert est.version > v0
    assert est.level == pytest.approx(2.0, rel=0.1)
    assert _track(est, 1.0, probes, stream[60:]) <= bound  # and back


def test_full_refit_blends_profile_and_window(fitted) -> None:
    """A serving shape the profile never had runs 1.5x slower than the profiled cost law, while
    profiled shapes keep theirs: one level cannot fit both, the (background) shape refit can."""
    est = le.LearnedEstimator.from_json(fitted[0].to_json())
    est.full_refit_every, est.fit_config = 48, le.FitConfig(n_trees=40, depth=3, seed=0)
    new = BatchShape.of([5] * 12, [256] * 12)
    old = BatchShape.of([4] * 2, [128] * 2)
    for _ in range(24):
        est.observe(new, 1.5 * cpu_like_ms(new))
        est.observe(old, cpu_like_ms(old))
    assert est._pending is not None  # fitting in the background; the old model still answers
    est.wait_for_refit(30)
    est.refit()
    assert est.predict(new) == pytest.approx(1.5 * cpu_like_ms(new), rel=0.12)
    assert est.predict(old) == pytest.approx(cpu_like_ms(old), rel=0.12)
    assert est.predict(BatchShape.of([1], [64])) > 0


def test_shape_refit_waits_for_its_interval_given_the_time(fitted) -> None:
    """With the time passed in, a shape refit is due every ``full_refit_every`` samples but not
    within ``min_full_refit_s`` of the last one, while the level keeps following every few
    batches; the interval and the sample count both survive the JSON round trip."""
    est = le.LearnedEstimator.from_json(fitted[0].to_json())
    est.full_refit_every, est.min_full_refit_s = 8, 12.5
    est.background_refit = False
    shape = BatchShape.of([3, 3], [128, 128])
    for i in range(32):  # 8 refits due by count within 3.2 s: one by time (at 100.7)
        est.observe(shape, 1.3 * cpu_like_ms(shape), now=100.0 + i * 0.1)
    refitted, level = est.shape_id, est.level
    assert refitted != fitted[0].shape_id
    for i in range(32, 64):  # twice as slow: the level follows, the shape model waits
        est.observe(shape, 2.6 * cpu_like_ms(shape), now=100.0 + i * 0.1)
    assert est.shape_id == refitted
    assert est.level == pytest.approx(2 * level, rel=0.05)
    for i in range(4):  # 12.5 s after the first shape refit
        est.observe(shape, 2.6 * cpu_like_ms(shape), now=113.3 + i * 0.1)
    assert est.shape_id != refitted
    again = le.LearnedEstimator.from_json(est.to_json())
    assert (again.min_full_refit_s, again.full_refit_every) == (12.5, 8)


def test_shape_refit_is_not_stopped_by_a_clock_that_went_back(fitted) -> None:
    est = le.LearnedEstimator.from_json(fitted[0].to_json())
    est.full_refit_every, est.background_refit = 4, False
    shape = BatchShape.of([2], [64])
    for t in (1000.0, 1000.1, 1000.2, 1000.3):
        est.observe(shape, cpu_like_ms(shape), now=t)
    first = est.shape_id
    for t in (10.0, 10.1, 10.2, 10.3):  # the wall clock stepped back by 990 s
        est.observe(shape, cpu_like_ms(shape), now=t)
    assert est.shape_id != first


def test_level_refit_keeps_the_shape_predictions(fitted) -> None:
    """A level refit rescales every prediction and walks no tree again: the per-shape cache holds
    no level, so it survives the refit (and a copy following the level shares it)."""
    est = le.LearnedEstimator.from_json(fitted[0].to_json())
    shape = BatchShape.of([5], [256])
    before, level = est.predict(shape), est.level
    for _ in range(est.refit_every):
        est.observe(shape, 2.0 * before)
    assert est.level != level and shape in est._cache
    assert est.predict(shape) == pytest.approx(before * est.level / level, rel=1e-9)
    follower = est.with_level(est.level * 2, est.version + 1)
    assert follower._cache is est._cache
    assert follower.predict(shape) == pytest.approx(2 * est.predict(shape), rel=1e-9)


def test_observe_ignores_garbage(fitted) -> None:
    est = le.LearnedEstimator.from_json(fitted[0].to_json())
    for ms in (float("nan"), -1.0, 0.0, float("inf")):
        est.observe(BatchShape.of([2], [10]), ms)
    est.observe(BatchShape.of([], []), 5.0)
    assert len(est.window) == 0


def test_default_estimator_picks_the_shipped_model_for_its_target() -> None:
    path = le.shipped_model_path("qwen-coder-1.5b", "cpu")
    assert path.is_file(), "the shipped model for the packaged target must be in the wheel"
    est = le.default_estimator(Settings(target_model="qwen-coder-1.5b", device="cpu"))
    assert isinstance(est, le.LearnedEstimator) and est.meta["target_model"] == "qwen-coder-1.5b"
    assert est.predict(BatchShape.of([5], [128])) > 0
    other = le.default_estimator(Settings(target_model="/tmp/some-tiny-model", device="cpu"))
    assert isinstance(other, LinearEstimator)
    gpu = le.default_estimator(Settings(target_model="qwen-coder-1.5b", device="cuda:0"))
    assert isinstance(gpu, LinearEstimator)
    explicit = le.default_estimator(Settings(target_model="/tmp/some-tiny-model", estimator_model=path))
    assert isinstance(explicit, le.LearnedEstimator)  # WISP_ESTIMATOR_MODEL wins


def test_published_model_is_followed_and_bad_bytes_keep_the_last_good_one() -> None:
    fallback = LinearEstimator()
    pub = le.PublishedModel(fallback)
    assert pub.current is fallback and not pub.update(None)
    learned = le.default_estimator(Settings(target_model="qwen-coder-1.5b", device="cpu"))
    assert pub.update(learned.to_json()) and isinstance(pub.current, le.LearnedEstimator)
    assert not pub.update(learned.to_json())  # unchanged bytes: not parsed again
    assert not pub.update(b"{not json") and isinstance(pub.current, le.LearnedEstimator)
    assert pub.error is not None and "not JSON" in pub.error


# ------------------------------------------------------------------------ profile runner
class FakeProbe:
    """A verifier whose sessions are lists of ids and whose time is ``cpu_like_ms``."""

    vocab_size = 1000

    def __init__(self) -> None:
        self.sessions: dict[str, list[int]] = {}
        self.prefilled = 0

    def verify(self, rows):
        got = []
        for sid, committed, draft in rows:
            have = self.sessions.get(sid, [])
            keep = 0
            while keep < min(len(have), len(committed) - 1) and have[keep] == committed[keep]:
                keep += 1
            hit = sid in self.sessions and keep == len(committed) - 1
            new = len(committed) - keep + len(draft)
            if not draft and keep == 0:
                self.prefilled += 1
            self.sessions[sid] = list(committed)
            got.append((new, keep, hit))
        ms = cpu_like_ms(BatchShape.of([n for n, _, _ in got], [c for _, c, _ in got]))
        return ms, 0.9 * ms, got

    def clone(self, src, dst):
        self.sessions[dst] = list(self.sessions[src])
        return True

    def drop(self, session_id):
        self.sessions.pop(session_id, None)


def test_plan_grid_prunes_the_slow_corner() -> None:
    spec = GridSpec((1, 2, 8), (0, 4, 8), (32, 128, 384), repeats=2, mixed=3, max_batch_tokens=40)
    plan = plan_grid(spec)
    grid = [p for p in plan if p.kind == "grid"]
    assert len([p for p in plan if p.kind == "mixed"]) == 3
    # 3x3 cells per context; 8x(8+1)=72 > 40 is skipped at the middle context only
    assert len(grid) == 2 * (9 + 8 + 9)
    assert not any(p.tokens > 40 and p.max_ctx == 128 for p in grid)
    ctx_order = [p.max_ctx for p in grid]
    assert ctx_order == sorted(ctx_order, reverse=True)  # longest contexts first


def test_run_profile_records_cache_hit_rounds() -> None:
    probe = FakeProbe()
    spec = GridSpec((1, 4), (0, 3), (16, 64), repeats=2, mixed=4, seed=2)
    ticks = []
    prof = run_profile(probe, spec, target_model="fake", hardware={"cpu": "x"},
                       progress=lambda d, t, _w: ticks.append((d, t)))
    assert ticks[-1][0] == ticks[-1][1] == len(prof.samples) == len(plan_grid(spec))
    assert prof.notes["cache_miss_batches"] == 0
    assert probe.prefilled == 1  # one master prefill; every row is a copy of it
    grid = [s for s in prof.samples if s.kind == "grid"]
    assert {(s.new_tokens[0], s.context_lens[0], len(s.new_tokens)) for s in grid} == {
        (d + 1, c, b) for b in (1, 4) for d in (0, 3) for c in (16, 64)}
    assert all(s.measured_ms == pytest.approx(cpu_like_ms(s.shape)) for s in prof.samples)
    assert [(p.new_tokens, p.context_lens) for p in prof.prefill] == [((65,), (0,))]
    again = Profile.from_obj(json.loads(json.dumps(prof.to_obj())))
    assert again.samples == prof.samples and again.hardware == {"cpu": "x"}
    with pytest.raises(ValueError):
        Profile.from_obj({"kind": "verifier-profile", "schema": 9, "samples": []})
