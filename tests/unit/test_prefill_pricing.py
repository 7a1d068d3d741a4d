"""A session's first round is a prefill of its prompt: the estimator hop, the scheduler service,
the batch policy and admission control all price it that way, from one rule (``round_shape``).
(They once priced it as ``draft + 1`` tokens on a prompt-long cached context: a 2,000-token
prompt looked as cheap as a decode step.)"""

from __future__ import annotations

import time

import pytest
from wisp.policy.estimator import BatchShape, LinearEstimator, round_shape
from wisp.policy.scheduler import RoundInfo, SchedulerCore, pack_batches, round_terms
from wisp.policy.slo import AdmissionController, SloAwarePolicy, VerifierLoad
from wisp.protocol.draft import AnnotatedBlock, DraftBlock
from wisp.protocol.session import SessionTerms
from wisp.services.estimator.service import block_shape
from wisp.services.scheduler.service import round_info

# 1 ms per token fed, nothing for cached context: a prefill costs its prompt
PER_TOKEN = LinearEstimator(coef=[1.0, 0, 1.0, 0, 0, 0, 0, 0, 0])


def block(committed: int, generated: int, draft: int) -> DraftBlock:
    return DraftBlock(request_id="r", device="d", round=0 if generated == 0 else 3,
                      base_committed_len=committed, committed_digest="0" * 16,
                      draft_tokens=[5] * draft, sent_ts=time.time(), generated_len=generated)


def test_round_shape_first_round_is_a_prefill_later_ones_are_not() -> None:
    assert round_shape(4, 2000, 0) == (2004, 0)
    assert round_shape(4, 2010, 10) == (5, 2009)
    assert round_shape(0, 300, 0) == (300, 0)  # a draft-less prefill round


def test_round_terms_feed_roundinfo_the_same_shape() -> None:
    for d, c, g in [(4, 2000, 0), (4, 2010, 10), (0, 7, 0), (8, 9, 1)]:
        r = RoundInfo(key="k", request_id="r", round=0, arrival=0.0, deadline=1.0, **round_terms(d, c, g))
        assert (r.new_tokens, r.context_len) == round_shape(d, c, g)


def test_estimator_hop_and_scheduler_price_a_first_round_as_its_prompt() -> None:
    first, later = block(2000, 0, 4), block(2010, 10, 4)
    assert block_shape(first) == BatchShape.of([2004], [0])
    assert block_shape(later) == BatchShape.of([5], [2009])
    assert PER_TOKEN.predict(block_shape(first)) > 100 * PER_TOKEN.predict(block_shape(later))
    terms = SessionTerms(request_id="r", prompt_len=2000, max_new_tokens=64, ttft_slo_ms=1000.0,
                         tpot_slo_ms=100.0, arrival_ts=time.time())
    ab = AnnotatedBlock(block=first, predicted_verify_ms=1.0, model_key="m", annotated_ts=time.time())
    info = round_info(ab, terms, 0.0)
    assert (info.new_tokens, info.context_len, info.draft_len) == (2004, 0, 4)


def test_admission_prices_the_newcomer_prefill() -> None:
    ac = AdmissionController(PER_TOKEN, max_batch_size=8, draft_len=4)
    load = [VerifierLoad(name="v", backlog_ms=0.0)]
    short = ac.decide(load, 10_000.0, 10_000.0, prompt_len=10)
    long = ac.decide(load, 10_000.0, 10_000.0, prompt_len=5000)
    assert long.predicted_ttft_ms is not None and short.predicted_ttft_ms is not None
    assert long.predicted_ttft_ms - short.predicted_ttft_ms > 4000  # 1 ms per prompt token
    refused = ac.decide(load, 2000.0, 10_000.0, prompt_len=5000)
    assert not refused.admit and "first token" in refused.reason


def test_admission_refuses_while_sessions_wait_for_kv() -> None:
    ac = AdmissionController(PER_TOKEN, max_batch_size=8, draft_len=4)
    slo = (10_000.0, 10_000.0)
    roomy = VerifierLoad(name="v", backlog_ms=0.0, kv_free_tokens=5000)
    assert ac.decide([roomy], *slo, prompt_len=100).admit
    waiting = ac.decide([VerifierLoad(name="v", backlog_ms=0.0, kv_free_tokens=5000, kv_waiting=2)], *slo,
                        prompt_len=100)
    assert not waiting.admit and "KV" in waiting.reason
    full = ac.decide([VerifierLoad(name="v", backlog_ms=0.0, kv_free_tokens=50)], *slo, prompt_len=100)
    assert not full.admit and "KV" in full.reason
    # a verifier that does not report KV is judged as before
    assert ac.decide([VerifierLoad(name="v", backlog_ms=0.0)], *slo, prompt_len=100).admit


PADDED = LinearEstimator(coef=[100.0, 0, 0, 0, 10.0, 0, 0, 0, 0])
"""100 ms per forward plus 10 ms per padded token position (rounds x longest row): an engine
that pads every row to the longest, like the HF verifier."""


def test_a_queue_is_priced_packed_as_a_padding_aware_scheduler_would() -> None:
    prefill, decode = (154, 0), (5, 256)
    batches = pack_batches(PADDED, [decode, prefill, decode, decode, decode], max_batch_size=16)
    assert [(b.rounds, max(b.new_tokens)) for b in batches] == [(1, 154), (4, 5)]
    # one padded batch of all five would be 100 + 5 x 154 x 10 = 7800 ms; packed: 1640 + 300
    assert sum(PADDED.predict(b) for b in batches) == pytest.approx(1640.0 + 300.0)
    assert [b.rounds for b in pack_batches(PADDED, [decode] * 20, max_batch_size=8)] == [8, 8, 4]
    # without padding a shared forward is always cheaper: one batch
    assert [b.rounds for b in pack_batches(PER_TOKEN, [decode, prefill], 16)] == [2]


def test_admission_prices_the_newcomer_prefill_alone_beside_running_sessions() -> None:
    ac = AdmissionController(PADDED, max_batch_size=16, draft_len=4, context_len=256)
    a = ac.decide([VerifierLoad(name="v", backlog_ms=0.0, sessions=4)], 15_000.0, 10_000.0,
                  prompt_len=150)
    # 100 + 154 x 10 alone; priced beside 4 decode rounds it was 100 + 5 x 154 x 10 = 7800
    assert a.admit and a.predicted_ttft_ms == pytest.approx(1640.0)


def test_the_backlog_prices_a_queued_prefill_apart_from_the_decode_rounds() -> None:
    core = SchedulerCore(SloAwarePolicy(max_batch_size=16), PADDED)
    core.set_verifiers(["v"])
    now = time.time()
    for i in range(4):
        core.affinity[f"s{i}"] = "v"
        core.queue[f"s{i}:3"] = RoundInfo(key=f"s{i}:3", request_id=f"s{i}", round=3, arrival=now,
                                         deadline=now + 10, **round_terms(4, 256, 10))
    core.affinity["new"] = "v"
    core.queue["new:0"] = RoundInfo(key="new:0", request_id="new", round=0, arrival=now,
                                    deadline=now + 10, **round_terms(4, 150, 0))
    assert core.backlog_ms("v", now) == pytest.approx(1640.0 + 300.0)
