"""Admission control in the drafter against a real Redis: the load snapshot the scheduler
publishes (`wisp:load`) decides, except right after a start, when the snapshot does not yet list
a verifier that is already live and ready."""

from __future__ import annotations

import json

from wisp.bus import Bus
from wisp.policy.controller import FixedLength
from wisp.services.drafter.service import DrafterService
from wisp.settings import Settings


def _drafter(bus: Bus) -> DrafterService:
    settings = Settings(mode="wisp", namespace=bus.keys.ns)
    return DrafterService(settings, bus, name="adm-drafter", policy=FixedLength(4))


async def test_no_snapshot_admits(bus: Bus) -> None:
    assert await _drafter(bus)._refusal(40, 10_000, 1_000) is None


async def test_empty_snapshot_refuses_only_when_no_verifier_is_ready(bus: Bus) -> None:
    d = _drafter(bus)
    await bus.redis.set(bus.keys.load, json.dumps({"ts": 0, "scheduler": "s", "verifiers": []}))
    reason = await d._refusal(40, 10_000, 1_000)
    assert reason is not None and "no live verifier" in reason
    # a verifier that is live but not ready (still loading its model) does not count
    await bus.heartbeat("verifier", "v-loading", {"ready": False}, ttl_s=30)
    assert await d._refusal(40, 10_000, 1_000) is not None
    # a ready verifier the scheduler has not registered yet: the snapshot lags, admit
    await bus.heartbeat("verifier", "v-ready", {"ready": True}, ttl_s=30)
    assert await d._refusal(40, 10_000, 1_000) is None
