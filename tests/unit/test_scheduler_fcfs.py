"""The FCFS batch policy and the scheduler core, on constructed queues (no Redis, no torch)."""

from __future__ import annotations

from wisp.policy.estimator import BatchShape, LinearEstimator
from wisp.policy.scheduler import FcfsPolicy, RoundInfo, SchedulerCore

from tests.unit.padded_cost import padded_cost


def rnd(req: str, arrival: float, round_: int = 0, k: int = 4, ctx: int = 100) -> RoundInfo:
    return RoundInfo(key=f"{req}:{round_}", request_id=req, round=round_, draft_len=k,
                     context_len=ctx, arrival=arrival, deadline=arrival + 1.0)


def core(max_batch: int = 4, max_wait_ms: float = 10.0, inflight: int = 1) -> SchedulerCore:
    return SchedulerCore(FcfsPolicy(max_batch, max_wait_ms), LinearEstimator(), inflight)


def test_fcfs_takes_oldest_first_up_to_max_batch() -> None:
    c = core(max_batch=3)
    c.set_verifiers(["v1"])
    for i, t in enumerate([5.0, 1.0, 3.0, 2.0, 4.0]):
        c.add(rnd(f"r{i}", t))
    out = c.tick(now=5.0)
    assert len(out.batches) == 1
    assert out.batches[0].keys == ("r1:0", "r3:0", "r2:0")
    assert out.batches[0].reasons == ("fcfs:full",)
    # the verifier is busy until its batch completes
    assert c.tick(now=6.0).batches == []
    c.complete(out.batches[0].batch_id)
    assert c.tick(now=6.0).batches[0].keys == ("r4:0", "r0:0")


def test_an_idle_verifier_waits_at_most_max_wait() -> None:
    c = core(max_batch=8, max_wait_ms=10.0)
    c.set_verifiers(["v1"])
    c.add(rnd("a", 100.0))
    out = c.tick(now=100.001)
    assert out.batches == [] and abs(out.wake_at - 100.010) < 1e-9
    out = c.tick(now=100.011)
    assert [b.keys for b in out.batches] == [("a:0",)]
    assert out.batches[0].reasons == ("fcfs:max-wait",)


def test_sessions_stick_to_their_verifier_and_spread_when_new() -> None:
    c = core(max_batch=1, max_wait_ms=0.0, inflight=10)
    c.set_verifiers(["v1", "v2"])
    c.add(rnd("a", 1.0))
    c.add(rnd("b", 1.0))
    first = {b.keys[0]: b.verifier for b in c.tick(2.0).batches}
    assert first["a:0"] != first["b:0"]  # least-loaded placement
    c.add(rnd("a", 3.0, round_=1))
    c.add(rnd("b", 3.0, round_=1))
    second = {b.keys[0]: b.verifier for b in c.tick(4.0).batches}
    assert second["a:1"] == first["a:0"] and second["b:1"] == first["b:0"]


def test_a_plan_whose_verifier_was_dropped_is_no_longer_to_be_sent() -> None:
    """One tick plans a batch per verifier; the shell sends them one by one, awaiting, and a
    verifier benched in between must not get its (now stale) plan: its rounds are queued."""
    c = core(max_batch=4, max_wait_ms=0.0)
    c.set_verifiers(["v1", "v2"])
    c.add(rnd("a", 1.0))
    c.add(rnd("b", 1.0))
    plans = {b.verifier: b for b in c.tick(2.0).batches}
    assert set(plans) == {"v1", "v2"} and all(c.is_inflight(b.batch_id) for b in plans.values())
    c.set_verifiers(["v1"])  # v2 benched while v1's batch was being sent
    assert c.is_inflight(plans["v1"].batch_id) and not c.is_inflight(plans["v2"].batch_id)
    assert set(c.queue) == set(plans["v2"].keys)
    c.complete(plans["v1"].batch_id)
    assert not c.is_inflight(plans["v1"].batch_id)
    assert [b.keys for b in c.tick(3.0).batches] == [plans["v2"].keys]


def test_vanished_verifier_rounds_are_requeued_and_sessions_move() -> None:
    c = core(max_batch=4, max_wait_ms=0.0)
    c.set_verifiers(["v1", "v2"])
    c.add(rnd("a", 1.0))
    plan = c.tick(2.0).batches[0]
    requeued = c.set_verifiers([v for v in ("v1", "v2") if v != plan.verifier])
    assert requeued == ["a:0"]
    again = c.tick(3.0).batches
    assert [b.keys for b in again] == [("a:0",)] and again[0].verifier != plan.verifier
    assert c.complete(plan.batch_id) is None  # a late completion of the dead batch is ignored


def test_newer_round_supersedes_older_and_duplicates_are_ignored() -> None:
    c = core(max_batch=4, max_wait_ms=1000.0)
    c.set_verifiers(["v1"])
    assert c.add(rnd("a", 1.0, round_=0)) == []
    assert c.add(rnd("a", 1.0, round_=0)) == []  # duplicate
    assert c.add(rnd("a", 2.0, round_=1)) == ["a:0"]
    assert c.add(rnd("a", 2.0, round_=0)) == ["a:0"]  # stale: refused
    assert list(c.queue) == ["a:1"]


def test_no_verifier_means_no_batch() -> None:
    c = core()
    c.add(rnd("a", 1.0))
    assert c.tick(10.0).batches == [] and c.busy


def test_linear_estimator_refits_to_measurements() -> None:
    est = LinearEstimator(refit_every=4)
    truth = lambda s: 30.0 + 8.0 * s.rounds + 1.5 * sum(s.new_tokens)  # noqa: E731
    shapes = [BatchShape.of([k + 1] * n, [64 * (i % 5 + 1)] * n)
              for i, (n, k) in enumerate((n, k) for n in range(1, 9) for k in range(0, 6))]
    for s in shapes:
        est.observe(s, truth(s))
    assert est.version > 0
    errs = [abs(est.predict(s) - truth(s)) / truth(s) for s in shapes]
    assert max(errs) < 0.05
    clone = LinearEstimator.from_json(est.to_json())
    assert clone.predict(shapes[7]) == est.predict(shapes[7])


def test_overdue_batches_are_requeued_once() -> None:
    c = core(max_batch=4, max_wait_ms=0.0)
    c.set_verifiers(["v1"])
    c.add(rnd("a", 1.0))
    plan = c.tick(1.0).batches[0]
    assert c.requeue_overdue(now=20.0, grace_s=30.0) == []
    assert c.requeue_overdue(now=40.0, grace_s=30.0) == ["a:0"]
    assert c.requeue_overdue(now=80.0, grace_s=30.0) == []
    again = c.tick(80.0).batches
    assert [b.keys for b in again] == [("a:0",)] and again[0].batch_id != plan.batch_id


def test_fcfs_does_not_pad_decode_rounds_to_a_prefill() -> None:
    """Padding-aware FCFS: a prefill (150 new ids) that arrived between two decode rounds is
    left for the next batch rather than padding both to 150; plain FCFS takes all three."""
    est = padded_cost()
    decode_a = rnd("a", 1.0, round_=3, k=4)
    prefill = RoundInfo(key="p:0", request_id="p", round=0, draft_len=0, context_len=0,
                        arrival=2.0, deadline=3.0, prefill_len=149)
    decode_b = rnd("b", 3.0, round_=5, k=4)
    assert prefill.new_tokens >= 150 and decode_a.new_tokens == 5
    sel, _ = FcfsPolicy(16, 0.0).select([decode_a, prefill, decode_b], "v1", 10.0, est)
    assert sel is not None and [r.key for r in sel.rounds] == ["a:3", "b:5"]
    assert "fcfs:padding" in sel.reasons
    sel, _ = FcfsPolicy(16, 0.0, padding_aware=False).select(
        [decode_a, prefill, decode_b], "v1", 10.0, est)
    assert sel is not None and [r.key for r in sel.rounds] == ["a:3", "p:0", "b:5"]
    # the prefill, oldest now, goes next on its own
    sel, _ = FcfsPolicy(16, 0.0).select([prefill], "v1", 10.0, est)
    assert sel is not None and [r.key for r in sel.rounds] == ["p:0"]


def test_a_left_out_prefill_goes_at_once_where_the_verifier_takes_two_batches() -> None:
    """With room for a second batch in flight, the rounds padding left out are dispatched in
    the next tick at the same time (the policy asks to be looked at again now)."""
    c = SchedulerCore(FcfsPolicy(16, 0.0), padded_cost(), max_inflight=2)
    c.set_verifiers(["v1"])
    c.add(rnd("a", 1.0, round_=3, k=4))
    c.add(RoundInfo(key="p:0", request_id="p", round=0, draft_len=0, context_len=0,
                    arrival=2.0, deadline=3.0, prefill_len=149))
    c.add(rnd("b", 3.0, round_=5, k=4))
    out = c.tick(now=10.0)
    assert [b.keys for b in out.batches] == [("a:3", "b:5")] and out.wake_at == 10.0
    out = c.tick(now=10.0)
    assert [b.keys for b in out.batches] == [("p:0",)] and out.wake_at is None
