"""``wisp:load`` carries the KV fields admission control reads, and only when a verifier reports
them: a drafter of the previous protocol version forbids unknown fields and must keep reading
the scheduler's snapshot during a rolling upgrade."""

from __future__ import annotations

import json

from wisp.policy.estimator import LinearEstimator
from wisp.policy.scheduler import FcfsPolicy, SchedulerCore
from wisp.policy.slo import VerifierLoad, snapshot
from wisp.protocol.load import LoadSnapshot, VerifierLoadWire
from wisp.services.drafter.admission import parse_loads


def test_the_schedulers_own_snapshot_goes_on_the_wire() -> None:
    # the scheduler service builds the wire snapshot from ``snapshot(core)`` exactly like this;
    # a field added to VerifierLoad but not to the wire model once crashed its housekeeping
    core = SchedulerCore(FcfsPolicy(max_batch_size=4, max_wait_ms=0.0), LinearEstimator())
    core.set_verifiers(["v0", "v1"])
    wire = [VerifierLoadWire(**vars(x)) for x in snapshot(core, 1.0)]
    raw = LoadSnapshot(ts=1.0, scheduler="s", verifiers=wire).encode()
    for v in json.loads(raw)["verifiers"]:
        assert "kv_free_tokens" not in v and "kv_waiting" not in v
    assert [v.name for v in parse_loads(raw) or []] == ["v0", "v1"]


def test_reported_kv_reaches_admission() -> None:
    load = VerifierLoad(name="v", backlog_ms=3.0, kv_free_tokens=100, kv_waiting=2)
    raw = LoadSnapshot(ts=1.0, scheduler="s", verifiers=[VerifierLoadWire(**vars(load))]).encode()
    assert parse_loads(raw) == [load]
