"""What services read from plain keys (not streams) is validated like a stream message: the
scheduler's load snapshot (``wisp:load``, read by admission control in every drafter) and the
estimator's published model (``wisp:estimator:model``, read by the scheduler and the drafters).

Hypothesis writes arbitrary JSON-shaped values (NaN, infinities, strings for numbers, missing
fields, wrong nesting) and arbitrary bytes; the readers must never raise, and whatever they go
on with must predict finite, positive times. Before, a snapshot with ``"backlog_ms": null``
raised a TypeError inside the admission arithmetic, which failed the request being admitted
(and every one after it while the snapshot stayed), and a published head with a NaN level made
every prediction NaN."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wisp.policy import learned_estimator as le
from wisp.policy.estimator import BatchShape, LinearEstimator
from wisp.policy.slo import AdmissionController
from wisp.services.drafter.admission import parse_loads

NUMBERS = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**12, 10**12)
           | st.text(max_size=3) | st.none() | st.booleans())
JSONISH = st.recursive(NUMBERS, lambda c: st.lists(c, max_size=3)
                       | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8)
VERIFIER = st.fixed_dictionaries(
    {"name": st.text(max_size=4) | st.integers()},
    optional={"backlog_ms": NUMBERS, "sessions": NUMBERS, "speed": NUMBERS,
              "tightest_tpot_slo_ms": NUMBERS, "kind": st.just("verifier_load"),
              "version": st.just(2)})
SNAPSHOT = st.fixed_dictionaries(
    {"verifiers": st.lists(VERIFIER, max_size=3) | JSONISH},
    optional={"ts": NUMBERS, "scheduler": st.text(max_size=3), "kind": st.just("load"),
              "version": st.just(2) | NUMBERS})
SHAPES = [BatchShape.of([5], [100]), BatchShape.of([1, 4, 4], [16, 900, 3000])]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # Python's json writes NaN/Infinity


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(SNAPSHOT.map(_dumps), JSONISH.map(_dumps), st.binary(max_size=64)))
def test_any_load_snapshot_is_parsed_or_ignored_never_raised(raw: bytes) -> None:
    loads = parse_loads(raw)
    if loads is None:
        return
    decision = AdmissionController(LinearEstimator(), max_batch_size=16, draft_len=4).decide(
        loads, 10_000.0, 1_000.0, prompt_len=40)
    assert isinstance(decision.admit, bool) and isinstance(decision.reason, str)


def _learned() -> str:
    shapes = [BatchShape.of([k] * n, [c] * n) for k in (1, 5) for n in (1, 4) for c in (16, 256)]
    return le.fit([(s, 40.0) for s in shapes], le.FitConfig(n_trees=3)).to_json()


LEARNED = _learned()
HEAD = json.loads(LEARNED)["head"]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    # a head naming the held model with any level/version (the fast path), then junk
    st.fixed_dictionaries({"level": NUMBERS, "version": NUMBERS}).map(
        lambda h: b'{"head":' + _dumps({**HEAD, **h}) + b"," + LEARNED.encode()[len('{"head":'):]),
    JSONISH.map(_dumps), st.binary(max_size=64)))
def test_any_published_model_keeps_predictions_finite(raw: bytes) -> None:
    published = le.PublishedModel(LinearEstimator())
    assert published.update(LEARNED.encode())
    published.update(raw)  # never raises; keeps the last good model when raw is unusable
    for shape in SHAPES:
        ms = published.current.predict(shape)
        assert math.isfinite(ms) and ms > 0, (raw[:120], ms)
