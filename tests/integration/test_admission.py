"""Admission control in the drafter against a real Redis: the load snapshot the scheduler
publishes (`wisp:load`) decides, except right after a start, when the snapshot does not yet list
a verifier that is already live and ready."""

from __future__ import annotations

from wisp.bus import Bus
from wisp.policy import learned_estimator as le
from wisp.policy.controller import FixedLength
from wisp.policy.estimator import BatchShape
from wisp.protocol import LoadSnapshot, VerifierLoadWire
from wisp.services.drafter.service import DrafterService
from wisp.settings import Settings


def _drafter(bus: Bus) -> DrafterService:
    settings = Settings(mode="wisp", namespace=bus.keys.ns)
    return DrafterService(settings, bus, name="adm-drafter", policy=FixedLength(4))


async def test_no_snapshot_admits(bus: Bus) -> None:
    assert await _drafter(bus).admission.refusal(40, 10_000, 1_000) is None


async def test_empty_snapshot_refuses_only_when_no_verifier_is_ready(bus: Bus) -> None:
    d = _drafter(bus)
    await bus.redis.set(bus.keys.load, LoadSnapshot(ts=0, scheduler="s", verifiers=[]).encode())
    reason = await d.admission.refusal(40, 10_000, 1_000)
    assert reason is not None and "no live verifier" in reason
    # a verifier that is live but not ready (still loading its model) does not count
    await bus.heartbeat("verifier", "v-loading", {"ready": False}, ttl_s=30)
    assert await d.admission.refusal(40, 10_000, 1_000) is not None
    # a ready verifier the scheduler has not registered yet: the snapshot lags, admit
    await bus.heartbeat("verifier", "v-ready", {"ready": True}, ttl_s=30)
    assert await d.admission.refusal(40, 10_000, 1_000) is None


def _published(ms: float) -> str:
    """A learned verify-time model, as the estimator service publishes it, that predicts about
    ``ms`` for every batch."""
    shapes = [BatchShape.of([k] * n, [c] * n) for k in (1, 3, 5) for n in (1, 2, 4, 8) for c in (16, 256)]
    return le.fit([(s, ms) for s in shapes], le.FitConfig(n_trees=5)).to_json()


async def _one_idle_verifier(bus: Bus) -> None:
    await bus.redis.set(bus.keys.load, LoadSnapshot(ts=0, scheduler="s", verifiers=[
        VerifierLoadWire(name="v1", backlog_ms=0.0, sessions=0, speed=1.0)]).encode())


async def test_admission_predicts_with_the_published_model(bus: Bus) -> None:
    """The published model decides: a model that says every batch takes a minute refuses a
    request with a 10 s TTFT SLO, one that says 50 ms admits it. (The drafter once failed to
    load the published model, swallowed the error and admitted with an untrained estimator:
    this refusal is what that bug lost.)"""
    d = _drafter(bus)
    await _one_idle_verifier(bus)
    await bus.redis.set(bus.keys.estimator_model, _published(60_000.0))
    reason = await d.admission.refusal(40, 10_000, 100_000)
    assert reason is not None and "time to first token" in reason, reason
    assert isinstance(d.published_model.current, le.LearnedEstimator)
    await bus.redis.set(bus.keys.estimator_model, _published(50.0))
    assert await d.admission.refusal(40, 10_000, 100_000) is None


async def test_a_corrupt_published_model_keeps_the_last_good_one(bus: Bus) -> None:
    d = _drafter(bus)
    await _one_idle_verifier(bus)
    await bus.redis.set(bus.keys.estimator_model, _published(60_000.0))
    assert await d.admission.refusal(40, 10_000, 100_000) is not None
    await bus.redis.set(bus.keys.estimator_model, b'{"kind": "learned", "schema": 99}')
    assert await d.admission.refusal(40, 10_000, 100_000) is not None  # still the slow model
    assert d.published_model.error is not None
