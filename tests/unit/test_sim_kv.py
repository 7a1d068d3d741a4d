"""The simulator's paged KV memory (``wisp.sim.kv.PagedKv``) and how the simulator uses it:
blocks allocated as tokens grow, the admission watermark, FIFO waiting, recompute preemption
of the newest session (withdrawn from the scheduler, priced as a prefill when it comes back),
sessions that can never fit, and no block leaked by a run. Also the scheduler's ``withdraw``
and ``round_terms(cached=False)``, which the preemption needs."""

from __future__ import annotations

from typing import Any

import pytest
from wisp.policy.estimator import LinearEstimator, round_shape
from wisp.policy.scheduler import FcfsPolicy, RoundInfo, SchedulerCore, round_terms
from wisp.sim.kv import PagedKv
from wisp.sim.scenario import load_scenario
from wisp.sim.simulator import (
    K_DONE,
    KV_EVICTED,
    KV_RUNNING,
    KV_WAITING,
    Simulation,
)

from tests.unit.sim_sessions import SHORT, make_session, make_sim, put_running


# ---------------------------------------------------------------------- PagedKv
def test_blocks_are_allocated_as_tokens_grow_and_freed_when_they_shrink() -> None:
    kv: PagedKv[str] = PagedKv(160, block_tokens=16, watermark=0.0)
    assert kv.total == 10 and kv.free == 10
    kv.admit("a", 20)  # 2 blocks
    assert kv.held["a"] == 2 and kv.free == 8
    assert kv.grow("a", 32) and kv.held["a"] == 2  # still inside the second block
    assert kv.grow("a", 33) and kv.held["a"] == 3
    kv.shrink("a", 17)
    assert kv.held["a"] == 2 and kv.free == 8
    assert not kv.grow("a", 16 * 11)  # more than the pool: refused, nothing changed
    assert kv.held["a"] == 2 and kv.free == 8
    assert kv.peak_tokens == 3 * 16
    assert kv.release("a") == 2 and kv.free == 10 and not kv.held


def test_the_watermark_holds_back_new_sessions_not_running_ones() -> None:
    kv: PagedKv[str] = PagedKv(1600, block_tokens=16, watermark=0.1)
    assert kv.total == 100 and kv.watermark_blocks == 10
    assert kv.fits_ever(90 * 16) and not kv.fits_ever(90 * 16 + 1)  # vLLM's AllocStatus.NEVER
    kv.admit("a", 80 * 16)
    assert kv.can_admit(10 * 16)  # leaves exactly the watermark free
    assert not kv.can_admit(10 * 16 + 1)
    assert kv.admissible_tokens() == 10 * 16
    assert kv.grow("a", 95 * 16)  # a running session may use the watermark
    assert kv.free == 5 and kv.admissible_tokens() == 0


def test_newest_first_is_the_reverse_admission_order() -> None:
    kv: PagedKv[str] = PagedKv(0)  # unlimited still keeps the order and the peak
    for sid in "abc":
        kv.admit(sid, 10)
    assert list(kv.newest_first()) == ["c", "b", "a"]
    kv.release("a")
    kv.admit("a", 10)  # readmitted: the newest again
    assert list(kv.newest_first()) == ["a", "c", "b"]
    assert kv.unlimited and kv.peak_tokens == 3 * 16


# ---------------------------------------------------------------------- the scheduler's side
def test_withdraw_takes_a_queued_round_back_and_it_can_be_added_again() -> None:
    core = SchedulerCore(FcfsPolicy(max_batch_size=4, max_wait_ms=0.0), LinearEstimator())
    core.set_verifiers(["v0"])
    r = RoundInfo(key="r1:3", request_id="r1", round=3, draft_len=4, context_len=99, arrival=0.0,
                  deadline=1.0)
    core.add(r)
    assert core.withdraw("r1:3") == r and not core.queue
    assert core.withdraw("r1:3") is None and core.withdraw("nobody") is None
    core.add(r)  # the same round comes back (readmitted after a preemption)
    out = core.tick(0.0)
    assert out.batches and out.batches[0].keys == ("r1:3",)
    assert core.withdraw("r1:3") is None  # in a batch: not withdrawable


def test_round_terms_prices_an_uncached_round_as_the_prefill_of_its_context() -> None:
    assert round_terms(4, 300, 50, cached=False) == {"draft_len": 4, "context_len": 0, "prefill_len": 299}
    assert round_terms(4, 300, 50) == {"draft_len": 4, "context_len": 299, "prefill_len": 0}
    assert round_terms(4, 300, 0) == round_terms(4, 300, 0, cached=False)  # a first round anyway
    assert round_shape(4, 300, 50) == (5, 299)  # unchanged default


# ---------------------------------------------------------------------- the simulator's use
def test_new_sessions_wait_first_come_first_served(assets: Any) -> None:
    # 20 blocks of 16 tokens, no watermark
    sim = make_sim(assets, "server.kv_tokens=320", "server.kv_watermark=0")
    a = make_session(sim, 1, 150)   # 154 tokens: 10 blocks
    b = make_session(sim, 2, 90)    # 94 tokens: 6 blocks
    c = make_session(sim, 3, 150)   # needs 10, only 4 free: waits
    d = make_session(sim, 4, 20)    # 24 tokens, 2 blocks would fit, but c is first
    for s in (a, b, c, d):
        sim._on_round(s, 0.0)
    assert [s.kv_state for s in (a, b, c, d)] == [KV_RUNNING, KV_RUNNING, KV_WAITING, KV_WAITING]
    assert list(sim.kv.waiting) == [c, d] and sim.kv_waits == 2
    assert set(sim.core.queue) == {a.key, b.key}
    sim._finish(a, 1.0, 1.0)  # frees 10 blocks: c, then d, enter
    assert list(sim.kv.held) == [b, c, d] and not sim.kv.waiting
    assert {c.key, d.key} <= set(sim.core.queue)


def test_the_newest_session_is_preempted_and_recomputes_its_context(assets: Any) -> None:
    sim = make_sim(assets, "server.kv_tokens=320", "server.kv_watermark=0")
    a = make_session(sim, 1, 100, generated=20)   # context 120: 8 blocks
    b = make_session(sim, 2, 40, generated=8)     # 48: 3 blocks
    c = make_session(sim, 3, 60, generated=30)    # 90: 6 blocks
    for s in (a, b, c):
        put_running(sim, s)
    sim._on_round(c, 0.0)  # c's round (94 tokens, still 6 blocks) is queued in the scheduler
    assert c.key in sim.core.queue and sim.kv.free == 3
    a.r_drafted = 60       # a's next round needs 180 tokens: 12 blocks, 4 more than it holds
    sim._on_round(a, 0.0)
    # the newest (c) is preempted: its queued round is withdrawn, it waits at the front
    assert sim.kv.preemptions == 1 and c.key not in sim.core.queue
    assert c.kv_state == KV_WAITING and list(sim.kv.waiting) == [c] and c not in sim.kv.held
    assert c.recompute and a.key in sim.core.queue and sim.kv.held[a] == 12
    sim._finish(b, 0.1, 0.1)  # b's 3 blocks + the 5 free: c (6 blocks) is readmitted
    assert c.kv_state == KV_RUNNING and c.key in sim.core.queue
    info = sim.core.queue[c.key]
    assert (info.context_len, info.prefill_len) == (0, 60 + 30 - 1)  # priced as a prefill
    sim._tick(0.1)  # one batch: a's verify round and c's recompute
    rec = next(e[4] for e in sim.q.heap if e[2] == K_DONE)
    rows = sorted(zip(rec[3], rec[4], strict=True))
    assert rows == [(61, 119), (60 + 30 + 4, 0)]  # c feeds prompt + generated + draft on nothing


def test_a_round_on_the_verifier_is_never_preempted(assets: Any) -> None:
    sim = make_sim(assets, "server.kv_tokens=320", "server.kv_watermark=0")
    a = make_session(sim, 1, 100, generated=20)
    b = make_session(sim, 2, 40, generated=8)
    c = make_session(sim, 3, 60, generated=30)
    for s in (a, b, c):
        put_running(sim, s)
    c.on_gpu = True  # c's round is in a batch on the verifier: b is the newest it may preempt
    a.r_drafted = 60
    sim._on_round(a, 0.0)
    assert b.recompute and c.kv_state == KV_RUNNING
    assert b.kv_state == KV_EVICTED  # its round was away: it queues when the round arrives
    assert not sim.kv.waiting
    sim._on_round(b, 0.2)
    assert list(sim.kv.waiting) == [b]


def test_a_session_preempts_itself_when_it_is_the_newest(assets: Any) -> None:
    sim = make_sim(assets, "server.kv_tokens=320", "server.kv_watermark=0")
    a = make_session(sim, 1, 100, generated=20)
    b = make_session(sim, 2, 150, generated=10)
    put_running(sim, a)
    put_running(sim, b)  # 8 + 10 blocks of 20
    b.r_drafted = 60  # b needs 14 blocks: a is older, so b itself goes
    sim._on_round(b, 0.0)
    assert b.kv_state == KV_WAITING and list(sim.kv.waiting) == [b] and a.kv_state == KV_RUNNING
    assert sim.kv.preemptions == 1 and b.key not in sim.core.queue


def test_a_session_that_can_never_fit_fails_instead_of_blocking_the_queue(assets: Any) -> None:
    sim = make_sim(assets, "server.kv_tokens=320", "server.kv_watermark=0")
    big = make_session(sim, 1, 400)
    big.in_window = True
    sim.open_in_window = 1
    small = make_session(sim, 2, 20)
    sim._on_round(big, 0.0)
    sim._on_round(small, 0.0)
    assert sim.kv_failed == 1 and big not in sim.active
    assert len(sim.records) == 1 and not sim.records[0].ok
    assert small.kv_state == KV_RUNNING


def test_admission_control_reads_the_kv_memory(assets: Any) -> None:
    sim = make_sim(assets, "server.kv_tokens=320", "server.kv_watermark=0", mode="wisp")
    a = make_session(sim, 1, 300)  # 304 tokens: 19 of the 20 blocks
    sim._on_round(a, 0.0)
    loads = sim._load_snapshot(0.0)
    assert [(v.kv_free_tokens, v.kv_waiting) for v in loads] == [(16, 0)]
    sim._on_round(make_session(sim, 2, 50), 0.1)  # needs 4 blocks: waits
    assert sim._load_snapshot(0.2) == loads  # as stale as the service's snapshot
    loads = sim._load_snapshot(1.0)
    assert [(v.kv_free_tokens, v.kv_waiting) for v in loads] == [(16, 1)]
    refused = sim.admission.decide(loads, sim.ttft_slo, sim.tpot_slo, prompt_len=5)
    assert not refused.admit and "KV" in refused.reason
    unlimited = make_sim(assets, mode="wisp")
    assert [v.kv_free_tokens for v in unlimited._load_snapshot(0.0)] == [None]


def test_serving_frees_the_rejected_draft_and_the_finished_session(assets: Any) -> None:
    sim = make_sim(assets, "server.kv_tokens=3200", "server.kv_watermark=0")
    s = make_session(sim, 1, 100, generated=20, drafted=40)  # 160 tokens: 10 blocks
    put_running(sim, s)
    s.r_accepted = 3
    sim._on_round(s, 0.0)
    assert sim.kv.held[s] == 10
    for _ in range(4):
        t, _, kind, a, b = sim.q.pop()
        if kind == K_DONE:
            sim._on_done(a, b, t)
            break
        sim._tick(t)
    assert sim.kv.held[s] == 8  # 124 tokens kept: 100 + 20 + 3 accepted + 1
    sim._finish(s, 1.0, 1.0)
    assert sim.kv.used_blocks == 0 and not sim.kv.held


@pytest.mark.parametrize("mode", ["wisp", "sled", "centralized"])
def test_no_block_leaks_through_preemptions(assets: Any, mode: str) -> None:
    sc = load_scenario("tiny", [*SHORT, "server.kv_tokens=1600", "workload.think_s=1",
                                "server.max_num_batched_tokens=128"])
    sim = Simulation(sc, mode, 24, assets=assets)
    r = sim.run()
    kv = sim.kv
    assert r.info["kv_preemptions"] > 0 and r.info["chunked_prefills"] > 0
    assert r.info["kv_leaked_blocks"] == 0
    assert sum(kv.held.values()) == kv.used_blocks
    assert all(s in sim.active for s in kv.held)
    for s in list(sim.active):
        kv.release(s)
    assert kv.free == kv.total
    assert r.info["submitted_in_window"] == len(r.records)


def test_a_run_never_holds_more_than_the_pool(assets: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sc = load_scenario("tiny", [*SHORT, "server.kv_tokens=1600", "workload.think_s=1"])
    sim = Simulation(sc, "sled", 16, assets=assets)
    kv = sim.kv
    take = kv._take
    most = [0]

    def checked_take(n: int) -> None:  # every allocation: what the sessions hold fits the pool
        take(n)
        held = sum(kv.held.values())
        assert held == kv.used_blocks <= kv.total
        most[0] = max(most[0], held)

    monkeypatch.setattr(kv, "_take", checked_take)
    r = sim.run()
    assert r.info["kv_blocks"] == 100 and r.info["kv_waits"] > 0
    assert most[0] * 16 == r.info["kv_peak_tokens"] and 1500 < r.info["kv_peak_tokens"] <= 1600
