"""How the learned estimator is published and followed: the JSON the service writes after
every level refit (trees and profile dumped once, not per publication) is the same model as
``to_obj``; a reader follows a level refit from the small head without parsing the model, with
predictions equal to parsing it; anything else (no head, another shape model, a bad head) sends
the reader to the whole model."""

from __future__ import annotations

import json

import numpy as np
from wisp.policy import learned_estimator as le
from wisp.policy.estimator import BatchShape, LinearEstimator

from tests.unit.test_estimator_learned import FAST, cpu_like_ms, synthetic_samples

PROBES = [BatchShape.of([5] * 4, [128] * 4), BatchShape.of([1], [64]), BatchShape.of([2, 7], [40, 350])]


def _model(**kw: int) -> le.LearnedEstimator:
    return le.fit(synthetic_samples(), FAST, **kw)


def test_to_json_is_to_obj_and_follows_every_change() -> None:
    est = _model(full_refit_every=0, refit_every=4)
    assert json.loads(est.to_json()) == json.loads(json.dumps(est.to_obj()))
    for i in range(8):  # level refits: the cached trees and profile must not freeze the rest
        s = PROBES[i % len(PROBES)]
        est.observe(s, 2.0 * cpu_like_ms(s))
    est.meta["note"] = "changed"
    obj = json.loads(est.to_json())
    assert obj == json.loads(json.dumps(est.to_obj()))
    assert obj["version"] == est.version > 0 and obj["level"] == est.level
    assert obj["meta"]["note"] == "changed"
    back = le.LearnedEstimator.from_json(est.to_json())
    assert back.shape_id == est.shape_id
    assert all(back.predict(p) == est.predict(p) for p in PROBES)


def test_a_shape_refit_dumps_the_new_trees() -> None:
    est = _model(full_refit_every=8, refit_every=4)
    est.background_refit = False
    before = (est.shape_id, est.to_json())
    rng = np.random.default_rng(3)
    for _ in range(8):
        s = BatchShape.of([int(rng.integers(1, 9))] * 2, [int(rng.integers(32, 300))] * 2)
        est.observe(s, 1.5 * cpu_like_ms(s))
    assert est.shape_id != before[0]
    obj = json.loads(est.to_json())
    assert obj["residual"] == est.residual.to_obj() and obj["residual"] != json.loads(before[1])["residual"]


def test_reader_follows_level_refits_from_the_head() -> None:
    est = _model(full_refit_every=0, refit_every=4)
    assert est.to_json().startswith('{"head":{')
    pub = le.PublishedModel(LinearEstimator())
    assert pub.update(est.to_json())  # another model held: parsed whole
    first = pub.current
    assert isinstance(first, le.LearnedEstimator) and first.shape_id == est.shape_id
    for i in range(4):  # one level refit
        s = PROBES[i % len(PROBES)]
        est.observe(s, 3.0 * cpu_like_ms(s))
    calls = []
    real = le.load_estimator
    le.load_estimator = lambda raw: calls.append(raw) or real(raw)
    try:
        assert pub.update(est.to_json()) is True
        assert not pub.update(est.to_json())  # the same bytes again
    finally:
        le.load_estimator = real
    assert calls == []  # taken from the head: the model was not parsed again
    assert pub.current is not first and pub.current.version == est.version
    parsed = le.load_estimator(est.to_json())
    assert all(pub.current.predict(p) == parsed.predict(p) == est.predict(p) for p in PROBES)
    assert first.predict(PROBES[0]) != pub.current.predict(PROBES[0])  # the old copy is untouched


def test_another_shape_model_or_a_bad_head_is_parsed_whole() -> None:
    est = _model(full_refit_every=0)
    pub = le.PublishedModel(LinearEstimator())
    assert pub.update(est.to_json())
    other = _model(full_refit_every=0)
    other.model_id = est.model_id  # same model, another shape model: parsed whole
    assert pub.update(other.to_json()) and pub.current.shape_id == other.shape_id
    obj = json.loads(other.to_json())
    obj["head"]["level"] = obj["level"] = -1.0  # a bad level is refused, the last good model kept
    held = pub.current
    assert not pub.update(json.dumps(obj)) and pub.current is held and pub.error
    assert pub.update(est.to_json()) and pub.current.shape_id == est.shape_id and pub.error is None
