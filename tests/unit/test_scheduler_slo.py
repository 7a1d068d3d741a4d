"""The SLO-aware batch policy, heterogeneous verifiers and admission control, on constructed
queues with a hand-set linear estimator (no Redis, no torch; a virtual clock)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from wisp.policy.estimator import BatchShape, LinearEstimator
from wisp.policy.scheduler import FcfsPolicy, RoundInfo, SchedulerCore
from wisp.policy.slo import (
    AdmissionController,
    SloAwarePolicy,
    VerifierLoad,
    expected_tokens,
    snapshot,
)

from tests.unit.padded_cost import padded_cost

NOW = 100.0


def est(bias: float = 10.0, per_round: float = 0.0, per_token: float = 2.0, per_ctx: float = 0.0
        ) -> LinearEstimator:
    """predict = bias + per_round x rounds + per_token x sum(draft_len + 1) + per_ctx x sum(ctx)."""
    return LinearEstimator(coef=[bias, per_round, per_token, 0, 0, per_ctx, 0, 0, 0])


def rnd(req: str, deadline_ms: float, k: int = 4, ctx: int = 0, commit: float = 1.0,
        arrival: float = NOW, round_: int = 0) -> RoundInfo:
    """A round due ``deadline_ms`` after NOW (negative: already overdue)."""
    return RoundInfo(key=req if round_ == 0 else f"{req}:{round_}", request_id=req, round=round_,
                     draft_len=k, context_len=ctx, arrival=arrival,
                     deadline=NOW + deadline_ms / 1000.0, expected_commit=commit)


def keys(sel) -> list[str]:
    return [r.key for r in sel.rounds]


# ---------------------------------------------------------------------- batch formation
def test_urgent_rounds_go_first_by_earliest_deadline() -> None:
    e = est()  # 10 + 2 x tokens: a k=4 round alone takes 20 ms
    queue = [
        rnd("dense", 5000, k=1, commit=2.0),   # the densest, but in no hurry
        rnd("u_late_dl", 60),                  # slack 40 ms
        rnd("relaxed", 4000),
        rnd("u_early_dl", 50),                 # slack 30 ms
    ]
    pol = SloAwarePolicy(max_batch_size=3, urgency_ms=45.0, urgency_batches=0.0)
    sel, wake = pol.select(queue, "v1", NOW, e)
    assert wake is None
    assert keys(sel) == ["u_early_dl", "u_late_dl", "dense"]
    assert sel.reasons == ["urgent", "urgent", "density"]
    assert sel.predicted_ms == pytest.approx(10 + 2 * (5 + 5 + 2))
    assert sel.late == []


def test_urgency_horizon_defaults_to_one_next_batch() -> None:
    e = est()
    # T_ref = the next batch (EDF: soon + dense) = 10 + 2 x 7 = 24 ms; soon's slack is 60 - 20 = 40 ms
    queue = [rnd("dense", 5000, k=1, commit=3.0), rnd("soon", 60), rnd("x", 5000)]
    sel, _ = SloAwarePolicy(max_batch_size=2).select(queue, "v1", NOW, e)
    assert keys(sel) == ["dense", "soon"] and sel.reasons == ["density", "density"]
    for pol in (SloAwarePolicy(max_batch_size=2, urgency_ms=20.0),     # 20 + 24 > 40
                SloAwarePolicy(max_batch_size=2, urgency_batches=2.0)):  # 2 x 24 > 40
        sel, _ = pol.select(queue, "v1", NOW, e)
        assert keys(sel) == ["soon", "dense"] and sel.reasons == ["urgent", "density"]


def test_density_fill_uses_marginal_verify_time() -> None:
    e = est(bias=10.0, per_token=1.0, per_ctx=0.1)
    queue = [
        rnd("x", 9000, k=4, ctx=100, commit=4.0),  # marginal 5 + 10 = 15 ms  -> 0.27 tok/ms
        rnd("z", 9000, k=6, ctx=400, commit=5.0),  # marginal 7 + 40 = 47 ms  -> 0.11 tok/ms
        rnd("y", 9000, k=2, ctx=20, commit=2.5),   # marginal 3 + 2 = 5 ms    -> 0.50 tok/ms
    ]
    sel, _ = SloAwarePolicy(max_batch_size=2).select(queue, "v1", NOW, e)
    assert keys(sel) == ["y", "x"] and sel.reasons == ["density", "density"]
    assert sel.predicted_ms == pytest.approx(10 + 8 + 12)
    sel3, _ = SloAwarePolicy(max_batch_size=3).select(queue, "v1", NOW, e)
    assert keys(sel3) == ["y", "x", "z"]


def test_unset_expected_commit_defaults_to_acceptance_times_draft() -> None:
    e = est(bias=10.0, per_round=2.0, per_token=1.0)
    long_, short = rnd("long", 9000, k=6), rnd("short", 9000, k=0)  # expected_commit unset (1.0)
    assert expected_tokens(long_) == pytest.approx(1 + 0.62 * 6)
    assert expected_tokens(short) == 1.0
    # 4.72 tokens / 9 ms beats 1 token / 3 ms; taken literally (1 token each) it does not
    sel, _ = SloAwarePolicy(max_batch_size=1).select([short, long_], "v1", NOW, e)
    assert keys(sel) == ["long"]
    sel, _ = SloAwarePolicy(max_batch_size=1, default_acceptance=None).select([short, long_], "v1", NOW, e)
    assert keys(sel) == ["short"]


def test_a_round_that_would_break_a_tight_deadline_waits_while_a_cheap_one_joins() -> None:
    e = est()
    tight = rnd("tight", 40)                        # alone 20 ms, due in 40 ms: urgent
    big = rnd("big", 9000, k=12, commit=12.0)       # densest (12 tok / 26 ms) but +26 ms -> 46 > 40
    cheap = rnd("cheap", 9000, k=1, commit=1.6)     # +4 ms -> 24 <= 40
    c = SchedulerCore(SloAwarePolicy(max_batch_size=4), e)
    c.set_verifiers(["v1"])
    for r in (tight, big, cheap):
        c.add(r)
    out = c.tick(NOW)
    assert [b.keys for b in out.batches] == [("tight", "cheap")]
    assert out.batches[0].reasons == ("urgent", "density")
    assert out.batches[0].predicted_ms == pytest.approx(24.0)
    assert list(c.queue) == ["big"]
    assert c.tick(NOW + 0.001).batches == []  # one batch in flight at a time
    c.complete(out.batches[0].batch_id)
    again = c.tick(NOW + 0.025).batches
    assert [b.keys for b in again] == [("big",)] and again[0].reasons == ("density",)


def test_late_rounds_go_first_by_default_most_overdue_first() -> None:
    """The TPOT SLO is a per-request mean: a late round is its request falling behind, so it is
    served at once; on-time rounds join when the batch still meets their own deadlines."""
    e = est()
    overdue = rnd("overdue", -50)           # due 50 ms ago
    hopeless = rnd("hopeless", 15)          # 15 ms left but needs 20 alone
    ontime = rnd("ontime", 500)
    tight = rnd("tight", 25)                # on time alone (20 ms), not behind two late rounds
    c = SchedulerCore(SloAwarePolicy(max_batch_size=4), e)
    c.set_verifiers(["v1"])
    for r in (ontime, tight, hopeless, overdue):
        c.add(r)
    out = c.tick(NOW)
    plan = out.batches[0]
    assert plan.keys == ("overdue", "hopeless", "ontime")
    assert plan.reasons == ("late-best-effort", "late-best-effort", "density")
    assert plan.late == ("overdue", "hopeless")
    c.complete(plan.batch_id)
    assert [b.keys for b in c.tick(NOW + 0.001).batches] == [("tight",)]


def progress(r: RoundInfo, generated: int, max_new: int = 64, tpot_ms: float = 100.0) -> RoundInfo:
    """``r`` with its request's progress known (what the scheduler service reads off the block)."""
    from dataclasses import replace

    return replace(r, generated_len=generated, max_new_tokens=max_new, tpot_slo_ms=tpot_ms)


def test_a_request_that_can_no_longer_attain_is_served_after_those_that_can() -> None:
    """Late but recoverable rounds go first (catch-up); rounds of requests that have lost their
    SLO (a first round past its TTFT deadline, or further behind than the tokens left can make
    up) go after every round that can still attain, best effort, so they stop dragging others
    down under overload."""
    e = est()  # alone: 20 ms
    pol = SloAwarePolicy(max_batch_size=3, catchup=0.5)
    behind = progress(rnd("behind", -100), generated=10)     # 120 ms late, 53 tokens left
    lost = progress(rnd("lost", -3000), generated=54)        # 3020 ms late, 9 tokens left
    ttft_missed = progress(rnd("ttft_missed", 5), generated=0)  # first round: 15 ms late
    ontime1 = progress(rnd("ontime1", 500), generated=5)
    ontime2 = progress(rnd("ontime2", 600), generated=5)
    assert pol.is_lost(behind, 120.0) is False              # 120 <= 0.5 x 100 x 53
    assert pol.is_lost(lost, 3020.0) is True                # 3020 > 0.5 x 100 x 9
    assert pol.is_lost(ttft_missed, 15.0) is True
    assert pol.is_lost(rnd("unknown", -3000), 3020.0) is False  # progress unknown: never lost
    assert SloAwarePolicy(catchup=None).is_lost(lost, 3020.0) is False
    sel, _ = pol.select([lost, ontime2, ttft_missed, behind, ontime1], "v1", NOW, e)
    assert keys(sel) == ["behind", "ontime1", "ontime2"]
    assert sel.reasons == ["late-best-effort", "density", "density"]
    # with room to spare, the lost rounds ride along (work conserving), most overdue first
    sel, _ = SloAwarePolicy(max_batch_size=8).select([lost, ontime1, ttft_missed, behind], "v1", NOW, e)
    assert keys(sel) == ["behind", "ontime1", "lost", "ttft_missed"]
    assert sel.reasons[2:] == ["lost-best-effort", "lost-best-effort"]
    assert sel.late == ["behind", "lost", "ttft_missed"]
    # a lost round is still served: alone in the queue, or by the starvation guard
    sel, _ = pol.select([lost], "v1", NOW, e)
    assert keys(sel) == ["lost"] and sel.reasons == ["lost-best-effort"]
    aged = progress(rnd("aged_lost", -3000, arrival=NOW - 6.0), generated=54)
    fresh = [progress(rnd(f"on{i}", 900), generated=5) for i in range(3)]
    sel, _ = pol.select([*fresh, aged], "v1", NOW, e)
    assert keys(sel)[0] == "aged_lost" and sel.reasons[0] == "aged"


def test_late_rounds_ride_along_best_effort_and_are_reported() -> None:
    e = est()
    overdue = rnd("overdue", -50)           # due 50 ms ago
    hopeless = rnd("hopeless", 15)          # 15 ms left but needs 20 alone
    ontime = rnd("ontime", 500)
    c = SchedulerCore(SloAwarePolicy(max_batch_size=4, late_first=False), e)
    c.set_verifiers(["v1"])
    for r in (ontime, hopeless, overdue):
        c.add(r)
    out = c.tick(NOW)
    plan = out.batches[0]
    assert plan.keys == ("ontime", "overdue", "hopeless")  # late ones most overdue first
    assert plan.reasons == ("density", "late-best-effort", "late-best-effort")
    assert plan.late == ("overdue", "hopeless") and out.late == ["overdue", "hopeless"]
    assert c.late_dispatched == 2


def test_a_late_round_never_endangers_an_on_time_member_but_is_served_when_idle() -> None:
    e = est()
    pol = SloAwarePolicy(max_batch_size=4, late_first=False)
    c = SchedulerCore(pol, e)
    c.set_verifiers(["v1"])
    c.add(rnd("tight", 25))   # alone 20 ms; with the late round 30 ms > 25
    c.add(rnd("late", -10))
    first = c.tick(NOW).batches
    assert [b.keys for b in first] == [("tight",)] and first[0].late == ()
    c.complete(first[0].batch_id)
    second = c.tick(NOW + 0.02).batches  # nothing on time waits: the late round fills the verifier
    assert [b.keys for b in second] == [("late",)]
    assert second[0].reasons == ("late-best-effort",) and second[0].late == ("late",)


def test_caps_on_batch_size_and_new_tokens() -> None:
    e = est()
    queue = [rnd(f"r{i}", 9000 + i) for i in range(6)]  # 5 new tokens each
    sel, _ = SloAwarePolicy(max_batch_size=4, max_new_tokens=12).select(queue, "v1", NOW, e)
    assert keys(sel) == ["r0", "r1"]
    sel, _ = SloAwarePolicy(max_batch_size=4).select(queue, "v1", NOW, e)
    assert keys(sel) == ["r0", "r1", "r2", "r3"]
    huge = rnd("huge", 9000, k=30)  # 31 tokens, over the cap: served alone rather than never
    sel, _ = SloAwarePolicy(max_batch_size=4, max_new_tokens=12).select([huge], "v1", NOW, e)
    assert keys(sel) == ["huge"]


def _run(pol: SloAwarePolicy, arrivals, ticks: int, watch: str):
    """Drive a one-verifier core on a virtual clock: before each tick ``arrivals(i, t)`` adds
    rounds; every batch completes after its predicted time. Returns (tick, time, reason) when
    ``watch`` is dispatched, else None."""
    c = SchedulerCore(pol, est())
    c.set_verifiers(["v1"])
    t = NOW
    for i in range(ticks):
        for r in arrivals(i, t):
            c.add(r)
        out = c.tick(t)
        assert len(out.batches) == 1, "work-conserving: a non-empty queue gives a batch"
        plan = out.batches[0]
        if watch in plan.keys:
            return i, t, plan.reasons[plan.keys.index(watch)]
        c.complete(plan.batch_id)
        t += plan.predicted_ms / 1000.0
    return None


def _dense(i: int, t: float, n: int = 3) -> list[RoundInfo]:
    """``n`` fresh dense rounds per tick (more than a batch of 2 can take: an overload)."""
    return [RoundInfo(key=f"d{i}.{j}", request_id=f"d{i}.{j}", round=0, draft_len=2, context_len=0,
                      arrival=t, deadline=t + 1.0, expected_commit=3.0) for j in range(n)]


def test_a_low_density_round_is_not_starved_by_a_stream_of_dense_ones() -> None:
    def arrivals(i: int, t: float) -> list[RoundInfo]:
        extra = [RoundInfo(key="w", request_id="w", round=0, draft_len=8, context_len=0, arrival=t,
                           deadline=t + 0.5, expected_commit=1.5)] if i == 0 else []
        return _dense(i, t) + extra

    served = _run(SloAwarePolicy(max_batch_size=2), arrivals, ticks=60, watch="w")
    assert served is not None
    tick, t, reason = served
    assert reason == "urgent" and tick >= 5   # deferred for denser work at first ...
    assert t - NOW <= 0.5 - 0.028             # ... yet served in time (alone it takes 28 ms)


def test_a_late_round_under_sustained_overload_is_served_by_the_starvation_guard() -> None:
    def arrivals(i: int, t: float) -> list[RoundInfo]:
        extra = [RoundInfo(key="w", request_id="w", round=0, draft_len=8, context_len=0, arrival=t,
                           deadline=t - 0.001)] if i == 0 else []
        return _dense(i, t) + extra

    late_last = {"max_batch_size": 2, "late_first": False}
    assert _run(SloAwarePolicy(**late_last, starvation_ms=None), arrivals, 60, "w") is None
    served = _run(SloAwarePolicy(**late_last, starvation_ms=200.0), arrivals, 60, "w")
    assert served is not None
    _, t, reason = served
    assert reason == "aged" and 0.2 <= t - NOW <= 0.2 + 0.05  # within the guard plus one batch
    # by default a late round is served in the very first batch
    assert _run(SloAwarePolicy(max_batch_size=2, starvation_ms=None), arrivals, 60, "w")[:1] == (0,)


def test_work_conserving_and_feasible_on_random_queues() -> None:
    e = est(bias=8.0, per_round=1.0, per_token=1.5, per_ctx=0.02)
    rng = random.Random(7)
    for _ in range(150):
        queue = [rnd(f"q{j}", rng.uniform(-100, 400), k=rng.randint(0, 8), ctx=rng.randint(0, 600),
                     commit=rng.choice([1.0, rng.uniform(1, 6)]),
                     arrival=NOW - rng.uniform(0, 0.3)) for j in range(rng.randint(1, 25))]
        pol = SloAwarePolicy(max_batch_size=rng.randint(1, 8), max_new_tokens=rng.choice([None, 20]))
        sel, wake = pol.select(queue, "v1", NOW, e)
        assert sel is not None and sel.rounds and wake is None
        assert len(sel.rounds) <= pol.max_batch_size and len(sel.reasons) == len(sel.rounds)
        assert sel.predicted_ms == pytest.approx(e.predict(BatchShape.of(
            [r.new_tokens for r in sel.rounds], [r.context_len for r in sel.rounds])))
        for r, why in zip(sel.rounds, sel.reasons, strict=True):
            on_time = r.key not in sel.late
            assert why != "late-best-effort" or not on_time
            if on_time:  # every on-time member is predicted to make its deadline
                assert NOW + sel.predicted_ms / 1000.0 <= r.deadline + 1e-12


def test_same_inputs_give_the_same_plan() -> None:
    e = est(bias=8.0, per_round=1.0, per_token=1.5, per_ctx=0.02)
    rng = random.Random(3)
    queue = [rnd(f"q{j}", rng.uniform(-50, 300), k=rng.randint(0, 8), ctx=rng.randint(0, 600))
             for j in range(30)]
    shuffled = list(queue)
    random.Random(4).shuffle(shuffled)
    a, _ = SloAwarePolicy(max_batch_size=6).select(queue, "v1", NOW, e)
    b, _ = SloAwarePolicy(max_batch_size=6).select(shuffled, "v1", NOW, e)
    assert (keys(a), a.reasons, a.late, a.predicted_ms) == (keys(b), b.reasons, b.late, b.predicted_ms)

    def plans(order: list[RoundInfo]) -> list[tuple]:
        c = SchedulerCore(SloAwarePolicy(max_batch_size=4), e)
        c.set_verifiers(["v2", "v1"])
        for r in order:
            c.add(r)
        return [(p.verifier, p.keys, p.reasons, p.late) for p in c.tick(NOW).batches]

    assert plans(queue) == plans(list(queue)) and len(plans(queue)) == 2


# ---------------------------------------------------------------------- heterogeneous verifiers
def test_a_slow_verifier_gets_less_new_work_and_its_times_scale() -> None:
    e = est()
    c = SchedulerCore(SloAwarePolicy(max_batch_size=16), e)
    c.set_verifier_speed("slow", 0.25)  # four times slower; set before it is live
    c.set_verifiers(["fast", "slow"])
    for i in range(8):
        c.add(rnd(f"s{i}", 9000))
    out = c.tick(NOW)
    placed = c.sessions_per_verifier()
    # a k=4 round costs 10 ms + 10 per round on "fast", 80 ms alone on "slow": the 8th goes slow
    assert placed == {"fast": 7, "slow": 1}
    by_v = {p.verifier: p for p in out.batches}
    assert by_v["fast"].predicted_ms == pytest.approx(10 + 10 * 7)
    assert by_v["slow"].predicted_ms == pytest.approx(4 * 20)
    shape = BatchShape.of([5, 3], [10, 20])
    assert c.estimator_of("slow").predict(shape) == pytest.approx(4 * e.predict(shape))
    # affinity wins over speed for a running session
    c.complete(by_v["slow"].batch_id)
    c.add(rnd("s7", 9000, round_=1))
    assert [p.verifier for p in c.tick(NOW + 0.1).batches] == ["slow"]


def test_new_sessions_go_to_the_least_predicted_backlog_not_the_fewest_sessions() -> None:
    e = est()
    c = SchedulerCore(FcfsPolicy(max_batch_size=16, max_wait_ms=0.0), e)
    c.set_verifiers(["v1", "v2"])
    c.affinity.update({"a": "v1", "b": "v2", "c": "v2"})
    c.add(rnd("a", 9000, k=60))                   # one session, but a 132 ms batch in flight
    c.add(rnd("b", 9000, k=1))
    c.add(rnd("c", 9000, k=1))
    c.tick(NOW)                                   # v1 runs a (132 ms), v2 runs b+c (18 ms)
    c.add(rnd("new", 9000))
    plan = c.tick(NOW + 0.02).batches
    assert c.affinity["new"] == "v2" and c.backlog_ms("v1", NOW + 0.02) == pytest.approx(112.0)
    assert plan == []  # v2 still busy; the round waits for it rather than joining v1's backlog


def test_per_verifier_estimators() -> None:
    base, slow = est(), est(bias=40.0, per_token=8.0)
    c = SchedulerCore(SloAwarePolicy(), base, estimator_for=lambda n: slow if n == "gpu-old" else None)
    c.set_verifiers(["gpu-old", "gpu-new"])
    assert c.estimator_of("gpu-new") is base and c.estimator_of("gpu-old") is slow
    c.add(rnd("a", 9000))
    assert [(p.verifier, p.predicted_ms) for p in c.tick(NOW).batches] == [("gpu-new", 20.0)]
    with pytest.raises(ValueError):
        c.set_verifier_speed("gpu-new", 0.0)


# ---------------------------------------------------------------------- admission control
def test_admission_refuses_when_ttft_cannot_be_met() -> None:
    ac = AdmissionController(est(), context_len=0)
    a = ac.decide([VerifierLoad("v1", backlog_ms=5380.0, sessions=0)], ttft_slo_ms=2000, tpot_slo_ms=500)
    assert not a.admit and a.verifier == "v1" and a.predicted_ttft_ms == pytest.approx(5400.0)
    assert a.reason == ("predicted time to first token 5400 ms exceeds the 2000 ms SLO at the current "
                        "load; retry later or relax --ttft-slo-ms")
    ok = ac.decide([VerifierLoad("v1", backlog_ms=100.0)], ttft_slo_ms=2000, tpot_slo_ms=500)
    assert ok.admit and ok.predicted_ttft_ms == pytest.approx(120.0) and "<= 2000 ms" in ok.reason


def test_admission_refuses_when_tpot_cannot_be_met_and_protects_running_sessions() -> None:
    ac = AdmissionController(est(), max_batch_size=8, draft_len=4, acceptance=0.5)
    # 20 sessions + 1 -> 3 batches of 8 rounds (90 ms) per cycle = 270 ms for 3 tokens -> 90 ms
    busy = VerifierLoad("v1", backlog_ms=0.0, sessions=20)
    a = ac.decide([busy], ttft_slo_ms=10_000, tpot_slo_ms=50)
    assert not a.admit and a.predicted_tpot_ms == pytest.approx(90.0)
    assert "time per output token 90 ms exceeds the 50 ms SLO with 21 sessions on verifier v1" in a.reason
    assert "--tpot-slo-ms" in a.reason
    assert ac.decide([busy], ttft_slo_ms=10_000, tpot_slo_ms=100).admit
    protected = VerifierLoad("v1", backlog_ms=0.0, sessions=20, tightest_tpot_slo_ms=60.0)
    p = ac.decide([protected], ttft_slo_ms=10_000, tpot_slo_ms=100)
    assert not p.admit and "tightest 60 ms TPOT SLO" in p.reason


def test_admission_picks_a_verifier_that_fits_and_honours_caps() -> None:
    ac = AdmissionController(est(), max_sessions_per_verifier=4)
    loads = [VerifierLoad("a", backlog_ms=900.0, sessions=1), VerifierLoad("b", backlog_ms=50.0, sessions=4),
             VerifierLoad("c", backlog_ms=300.0, sessions=2, speed=0.5)]
    a = ac.decide(loads, ttft_slo_ms=1000, tpot_slo_ms=1000)
    assert a.admit and a.verifier == "c"   # b is fastest but full
    full = ac.decide([loads[1]], ttft_slo_ms=1000, tpot_slo_ms=1000)
    assert not full.admit and "already serves 4 sessions (the cap is 4)" in full.reason
    none = ac.decide([], ttft_slo_ms=1000, tpot_slo_ms=1000)
    assert not none.admit and "no live verifier" in none.reason


def test_snapshot_reads_the_core_load() -> None:
    e = est()
    c = SchedulerCore(SloAwarePolicy(), e)
    c.set_verifier_speed("v2", 0.5)
    c.set_verifiers(["v1", "v2"])
    c.add(rnd("a", 9000))
    c.tick(NOW)                       # a: 20 ms in flight on v1
    c.add(rnd("b", 9000))             # queued, but not placed (and so on no verifier) until a tick
    loads = snapshot(c, NOW + 0.005, tpot_slo_of=lambda s: {"a": 80.0}.get(s))
    assert [(v.name, v.sessions, v.speed) for v in loads] == [("v1", 1, 1.0), ("v2", 0, 0.5)]
    assert loads[0].backlog_ms == pytest.approx(15.0) and loads[0].tightest_tpot_slo_ms == 80.0
    assert loads[1].backlog_ms == 0.0


def test_density_window_bounds_the_work_without_changing_a_clear_ranking() -> None:
    e = est(bias=10.0, per_token=1.0, per_ctx=0.1)
    queue = [rnd(f"c{i}", 9000, k=2, ctx=40 * i, commit=3.0) for i in range(12)]  # cheaper = denser
    exact, _ = SloAwarePolicy(max_batch_size=4, density_window=None).select(queue, "v1", NOW, e)
    windowed, _ = SloAwarePolicy(max_batch_size=4, density_window=2).select(queue, "v1", NOW, e)
    assert keys(exact) == keys(windowed) == ["c0", "c1", "c2", "c3"]
    with pytest.raises(ValueError):
        SloAwarePolicy(density_window=0)


def test_hold_waits_for_company_unless_full_late_or_due() -> None:
    """``max_wait_ms``: an idle verifier's batch waits up to the hold after the oldest arrival
    (a CPU forward's fixed cost makes tiny batches expensive), never past a round's deadline."""
    e = est()  # 20 ms alone
    pol = SloAwarePolicy(max_batch_size=3, max_wait_ms=2.0)
    early = [rnd("a", 500), rnd("b", 600, arrival=NOW + 0.0005)]
    sel, wake = pol.select(early, "v1", NOW + 0.001, e)
    assert sel is None and wake == pytest.approx(NOW + 0.002)
    sel, wake = pol.select(early, "v1", NOW + 0.002, e)  # the hold is over
    assert keys(sel) == ["a", "b"] and wake is None
    full = [*early, rnd("c", 700)]
    assert keys(pol.select(full, "v1", NOW + 0.001, e)[0]) == ["a", "b", "c"]
    with_late = [*early, rnd("late", -5)]
    assert pol.select(with_late, "v1", NOW + 0.001, e)[0] is not None
    due_soon = [rnd("soon", 21.5)]  # slack 1.5 ms < the 2 ms hold
    assert keys(pol.select(due_soon, "v1", NOW + 0.0001, e)[0]) == ["soon"]
    assert SloAwarePolicy(max_batch_size=3).select(early, "v1", NOW + 0.001, e)[1] is None


def test_round_deadlines_count_tpot_from_the_first_token() -> None:
    """The TPOT SLO is the mean gap after the first token, so once the first token's time is
    known later rounds are due one TPOT per token after it: a request whose first token came
    early must not spend its unused TTFT budget on later tokens."""
    from wisp.protocol import AnnotatedBlock, DraftBlock, SessionTerms
    from wisp.services.scheduler.service import round_info

    terms = SessionTerms(request_id="r", prompt_len=10, max_new_tokens=64, ttft_slo_ms=2000.0,
                         tpot_slo_ms=100.0, arrival_ts=1000.0)

    def round_deadline(b: DraftBlock) -> float:  # as the scheduler service reads a round
        ab = AnnotatedBlock(block=b, predicted_verify_ms=1.0, model_key="m", annotated_ts=0.0)
        return round_info(ab, terms, 1000.0).deadline

    def block(generated: int, first: float | None) -> DraftBlock:
        return DraftBlock(request_id="r", device="d", round=1, base_committed_len=10 + generated,
                          committed_digest="0" * 16, sent_ts=1000.0, generated_len=generated,
                          first_token_ts=first)

    assert round_deadline(block(0, None)) == pytest.approx(1002.0)           # the TTFT SLO
    assert round_deadline(block(5, None)) == pytest.approx(1002.5)           # not known yet
    assert round_deadline(block(5, 1000.4)) == pytest.approx(1000.9)         # 0.4 s + 5 x 0.1 s


def test_drafting_order_puts_sessions_that_can_still_attain_first() -> None:
    from wisp.policy.slo import DraftJob, drafting_order

    jobs = [
        DraftJob("lost", NOW - 3.0, generated_len=54, max_new_tokens=64, tpot_slo_ms=100.0),
        DraftJob("relaxed", NOW + 0.5, generated_len=5, max_new_tokens=64, tpot_slo_ms=100.0),
        DraftJob("behind", NOW - 0.1, generated_len=10, max_new_tokens=64, tpot_slo_ms=100.0),
        DraftJob("soon", NOW + 0.05, generated_len=5, max_new_tokens=64, tpot_slo_ms=100.0),
        DraftJob("unknown", NOW - 9.0),  # progress unknown: never judged lost
        DraftJob("lost2", NOW - 2.0, generated_len=60, max_new_tokens=64, tpot_slo_ms=100.0),
    ]
    assert drafting_order(jobs, NOW) == ["unknown", "behind", "soon", "relaxed", "lost", "lost2"]
    assert drafting_order(jobs, NOW, catchup=None)[:3] == ["unknown", "lost", "lost2"]  # plain EDF
    same = [DraftJob("a", NOW), DraftJob("b", NOW), DraftJob("c", NOW)]
    assert drafting_order(same, NOW) == ["a", "b", "c"]  # stable


def test_a_rounds_annotation_stands_for_a_prediction_only_under_the_model_that_made_it() -> None:
    """The estimator hop predicts each round's time alone; the batch policy uses that figure
    instead of predicting again, but only when the scheduler holds the very model that made it
    (a model published since must not be judged by the old one's figures)."""
    from wisp.policy.scheduler import ScaledEstimator
    from wisp.policy.slo import alone_ms

    est = LinearEstimator()
    own = est.predict(BatchShape.of([5], [100]))
    r = RoundInfo(key="a", request_id="a", round=0, draft_len=4, context_len=100, arrival=NOW,
                  deadline=NOW + 0.3, predicted_ms=400.0, predicted_by=est.model_key)
    assert alone_ms(r, est) == 400.0  # the annotation, not a new prediction
    assert alone_ms(r, ScaledEstimator(est, 2.0)) == 800.0  # on a verifier half as fast
    # the annotation makes the round late under its model: the policy serves it as late
    sel, _ = SloAwarePolicy().select([r], "v1", NOW, est)
    assert sel is not None and sel.late == ["a"]
    # another model (a refit since): predicted again, and the round is on time
    other = LinearEstimator(coef=[c * 1.01 for c in est.coef])
    assert other.model_key != est.model_key
    assert alone_ms(r, other) == pytest.approx(own * 1.01)
    sel, _ = SloAwarePolicy().select([r], "v1", NOW, other)
    assert sel is not None and sel.late == []
    assert alone_ms(replace(r, predicted_by=None), est) == pytest.approx(own)
    # a refit of the same object changes its key too (the key is cached per fit)
    refit = LinearEstimator(refit_every=2)
    before = refit.model_key
    for n in (10, 20, 30, 40):
        refit.observe(BatchShape.of([n], [100]), 3.0 * n)
    assert refit.version > 0 and refit.model_key != before


def test_a_level_refit_since_the_annotation_rescales_it() -> None:
    """A learned model's online refits move only its level every few batches (the published
    model the scheduler follows lags the estimator's by up to a second): the same shape model's
    annotation is rescaled, not thrown away; a new shape model's is predicted again."""
    from wisp.policy.learned_estimator import BASE_TERMS, LearnedEstimator
    from wisp.policy.slo import alone_ms

    est = LearnedEstimator([1.0] * len(BASE_TERMS))
    r = RoundInfo(key="a", request_id="a", round=0, draft_len=4, context_len=100, arrival=NOW,
                  deadline=NOW + 1.0, predicted_ms=40.0, predicted_by=est.model_key,
                  predicted_scale=est.model_scale)
    assert alone_ms(r, est) == pytest.approx(40.0)
    assert alone_ms(r, est.with_level(2.5 * est.level, est.version + 1)) == pytest.approx(100.0)
    other = LearnedEstimator([1.0] * len(BASE_TERMS))  # another shape model (its own id)
    assert other.model_key != est.model_key
    assert alone_ms(r, other) == pytest.approx(other.predict(BatchShape.of([5], [100])))


def test_an_urgent_prefill_is_not_padded_with_decode_rounds() -> None:
    """A prefill (150 new ids) due first and two decode rounds with loose deadlines: the deadline
    check alone lets the decode rounds join (each then costs a prefill: 3.3 s for the three); the
    padding-aware policy verifies the prefill alone and asks to be looked at again at once, and
    the decode rounds then go together."""
    e = padded_cost()
    prefill = RoundInfo(key="p", request_id="p", round=0, draft_len=0, context_len=0,
                        arrival=NOW, deadline=NOW + 4.5, prefill_len=149)
    a = rnd("a", 9000, k=4, ctx=100, round_=3)
    b = rnd("b", 9000, k=4, ctx=100, round_=5)
    assert prefill.new_tokens >= 150
    loose = SloAwarePolicy(max_batch_size=16, padding_aware=False)
    sel, wake = loose.select([a, prefill, b], "v1", NOW, e)
    assert sel is not None and set(keys(sel)) == {"p", "a:3", "b:5"} and wake is None
    pol = SloAwarePolicy(max_batch_size=16)
    sel, wake = pol.select([a, prefill, b], "v1", NOW, e)
    assert sel is not None and keys(sel) == ["p"] and wake == NOW
    assert sel.predicted_ms == pytest.approx(e.predict(BatchShape.of([prefill.new_tokens], [0])))
    sel, wake = pol.select([a, b], "v1", NOW, e)
    assert sel is not None and keys(sel) == ["a:3", "b:5"] and wake is None


def test_a_padded_out_prefill_goes_at_once_where_the_verifier_takes_two_batches() -> None:
    c = SchedulerCore(SloAwarePolicy(max_batch_size=16), padded_cost(), max_inflight=2)
    c.set_verifiers(["v1"])
    c.add(rnd("a", 9000, k=4, ctx=100, round_=3))
    c.add(RoundInfo(key="p", request_id="p", round=0, draft_len=0, context_len=0,
                    arrival=NOW, deadline=NOW + 4.5, prefill_len=149))
    c.add(rnd("b", 9000, k=4, ctx=100, round_=5))
    out = c.tick(now=NOW)
    assert [bp.keys for bp in out.batches] == [("p",)] and out.wake_at == NOW
    out = c.tick(now=NOW)
    assert sorted(out.batches[0].keys) == ["a:3", "b:5"] and out.wake_at is None


def test_an_aged_prefill_is_not_kept_out_for_good_by_late_decode_rounds() -> None:
    """The starvation guard under the padding rule: a prefill queued for a minute, lost, while a
    late decode round arrives before every batch. Were late rounds admitted before aged ones,
    the prefill would be refused beside each of them, batch after batch."""
    c = SchedulerCore(SloAwarePolicy(max_batch_size=16), padded_cost(), max_inflight=1)
    c.set_verifiers(["v1"])
    c.add(RoundInfo(key="p", request_id="p", round=0, draft_len=0, context_len=0,
                    arrival=NOW - 60, deadline=NOW - 55, prefill_len=149, generated_len=0,
                    max_new_tokens=100, tpot_slo_ms=100))
    served_at, t = None, NOW
    for i in range(10):
        c.add(rnd(f"d{i}", -200, k=4, ctx=100, round_=1))  # late, not lost
        out = c.tick(t)
        for bp in out.batches:
            if "p" in bp.keys and served_at is None:
                served_at = i
                assert bp.keys == ("p",) and bp.reasons[0] == "aged"
            c.complete(bp.batch_id)
        t += 0.3
    assert served_at == 0
