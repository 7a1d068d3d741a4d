"""Server runs (``wisp.policy.server_run``) and how a session plans them
(``SpecSession.plan(server_run=...)``), and the protocol's bounds on them."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import Qwen2Config, Qwen2ForCausalLM
from wisp.bus import Bus
from wisp.policy.controller import FixedLength
from wisp.policy.server_run import RIDE_MAX_NEW, ServerRuns, rides_along
from wisp.policy.session import SpecSession
from wisp.policy.site import LinkEstimate, ServerCosts, SiteChooser, SiteState
from wisp.protocol import DraftBlock, Verdict, digest_ids
from wisp.services.verifier.engine import VerifierEngine, VerifyItem
from wisp.services.verifier.service import VerifierService
from wisp.settings import Settings

EOS = 9


def _start(runs: ServerRuns, rid: str = "r", rounds: int = 3, token: int = 5, rnd: int = 4,
           now: float = 0.0) -> int:
    return runs.start(request_id=rid, device="d", committed=[1, 2, 3], round=rnd,
                      server_rounds=rounds, token=token, temperature=0.0, seed=None, now=now)


def test_a_run_sends_what_it_made_at_most_emit_s_apart_then_ends() -> None:
    runs = ServerRuns(limit=4, eos=frozenset({EOS}), emit_s=0.05)
    assert _start(runs, rounds=5) == 5
    (run,) = runs.due()
    assert runs.advance(run, 7, now=0.01) is None  # waits for more
    assert runs.advance(run, 8, now=0.02) is None
    em = runs.advance(run, 10, now=0.06)  # 60 ms since the first round's verdict
    # round 5 (after the first round 4), built on the prompt + the first round's token
    assert em is not None and (em.round, em.base, em.tokens, em.left) == (5, 4, (7, 8, 10), 2)
    assert runs.advance(run, 7, now=0.07) is None
    em = runs.advance(run, 6, now=0.08)  # the last token: sent at once, 0 left, forgotten
    assert em is not None and (em.round, em.base, em.tokens, em.left) == (6, 7, (7, 6), 0)
    assert not runs


def test_an_eos_ends_the_run_at_once() -> None:
    runs = ServerRuns(limit=4, eos=frozenset({EOS}))
    assert _start(runs, token=EOS) == 0 and not runs  # the first round's token ended it
    assert _start(runs) == 3
    (run,) = runs.due()
    em = runs.advance(run, EOS, now=0.0)
    assert em is not None and em.tokens == (EOS,) and em.left == 0 and not runs


def test_no_run_beyond_the_limit_or_when_none_is_asked() -> None:
    runs = ServerRuns(limit=1)
    assert _start(runs, rounds=0) == 0
    assert _start(runs, "a") == 3
    assert _start(runs, "b") == 0 and "b" not in runs  # full: b's drafter plans its next round


def test_a_run_dropped_while_its_step_is_computed_sends_nothing() -> None:
    runs = ServerRuns(limit=4)
    _start(runs)
    (run,) = runs.due()
    assert runs.drop("r")  # cancelled, or a new round for the session arrived
    assert runs.advance(run, 7, now=1.0) is None and not runs
    _start(runs)
    (old,) = runs.due()
    _start(runs)  # the session's round re-sent: a new run replaces the old one
    assert runs.advance(old, 7, now=1.0) is None and len(runs) == 1


def test_a_stopping_verifier_sends_every_unsent_token_with_none_left() -> None:
    runs = ServerRuns(limit=4, emit_s=10.0)
    _start(runs, "a", rounds=9)
    (run,) = runs.due()
    assert runs.advance(run, 7, now=0.0) is None
    em = runs.advance(run, 8, now=0.0, last=True)
    assert em is not None and em.tokens == (7, 8) and em.left == 0 and not runs


def test_a_session_plans_a_server_run_only_for_undrafted_rounds_within_budget() -> None:
    s = SpecSession(prompt_len=10, max_new=20)
    assert s.plan(FixedLength(0), server_run=32).server_rounds == 19  # budget: 20 - 0 - 1
    assert s.plan(FixedLength(4), server_run=32).server_rounds == 0  # drafted: no run
    assert s.plan(FixedLength(0), server_run=0).server_rounds == 0  # runs off
    assert s.plan(FixedLength(4), can_draft=False, server_run=5).server_rounds == 5
    s.generated = [1] * 19
    assert s.plan(FixedLength(0), server_run=32).server_rounds == 0  # the last token


def _block(**kw: object) -> DraftBlock:
    ids = [1, 2, 3]
    base = dict(request_id="r", device="d", round=0, base_committed_len=3,
                committed_digest=digest_ids(ids), sent_ts=1.0)
    return DraftBlock.model_validate({**base, **kw})


def test_protocol_refuses_a_run_that_starts_with_drafts() -> None:
    assert _block(server_rounds=5).server_rounds == 5
    with pytest.raises(ValidationError, match="undrafted"):
        _block(server_rounds=5, draft_tokens=[4])
    with pytest.raises(ValidationError):
        _block(server_rounds=-1)
    v = dict(request_id="r", round=1, base_committed_len=3, accepted=0, tokens=[4],
             batch_id="b", verifier="v", batch_size=1, verify_ms=1.0)
    assert Verdict.model_validate({**v, "drafted": 0, "server_rounds_left": 3}).server_rounds_left == 3
    with pytest.raises(ValidationError, match="undrafted"):
        Verdict.model_validate({**v, "drafted": 2, "server_rounds_left": 3})
    chunk = Verdict.model_validate({**v, "drafted": 0, "tokens": [4, 5, 6], "decoded": 2})
    assert chunk.decoded == 2
    with pytest.raises(ValidationError, match="decoded"):  # a count that does not add up
        Verdict.model_validate({**v, "drafted": 0, "tokens": [4, 5, 6], "decoded": 1})
    with pytest.raises(ValidationError, match="undrafted"):
        Verdict.model_validate({**v, "drafted": 1, "accepted": 1, "tokens": [4, 5, 6], "decoded": 1})


def test_next_round_keeps_a_run_then_probes_the_device() -> None:
    """The site rule the drafter and the simulator share: a run lasts ``probe_every`` tokens
    (one cut short, e.g. handed back by a stopping verifier, goes on), then one probe round is
    drafted at max_k, then the session is judged again."""
    ch = SiteChooser(max_k=4, probe_every=3)
    st = SiteState()
    costs = ServerCosts(step_ms=10.0, row_ms=1.0, token_ms=0.5)
    slow = dict(draft_ms=500.0, link=LinkEstimate(rtt_ms=100.0), server=costs, tpot_slo_ms=1e6)
    assert ch.next_round(st, **slow).server_decode and st.on_server and ch.run_left(st) == 3
    st.server_tokens = 2
    assert ch.next_round(st, **slow).server_decode and ch.run_left(st) == 1
    st.server_tokens = 3
    probe = ch.next_round(st, **slow)
    assert not probe.server_decode and probe.k == 4 and not st.on_server
    assert ch.next_round(st, **slow).server_decode  # judged again: still slow
    fast = dict(slow, draft_ms=0.1, link=LinkEstimate(rtt_ms=0.1, accepted=9.0, judged=10.0))
    assert not ch.next_round(SiteState(), **fast).server_decode


def test_runs_ride_along_with_short_rows_but_not_with_a_prefill() -> None:
    # a padded engine pads every row to the longest: one-token steps beside a prefill would
    # each cost a prefill
    assert rides_along([])  # a step of the runs alone
    assert rides_along([5, 1, RIDE_MAX_NEW])  # speculative rounds
    assert not rides_along([5, RIDE_MAX_NEW + 1])
    assert not rides_along([200])  # a first round


async def test_the_verifier_steps_runs_beside_speculative_rounds_but_not_beside_a_prefill(
        bus: Bus) -> None:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    svc = VerifierService(Settings(), bus)
    svc.engine = VerifierEngine(model)
    prompt = [int(t) for t in torch.randint(0, 128, (40,))]
    svc.engine.verify([VerifyItem("run", prompt, [], None, 0.0, None),
                       VerifyItem("spec", prompt, [], None, 0.0, None)])
    run = [VerifyItem("run", prompt + [1], [], None, 0.0, None)]

    results, mixed = svc._verify([VerifyItem("new", prompt, [], None, 0.0, None)], run)
    assert not mixed and [r.session_id for r in results] == ["new"]  # a prefill: alone

    results, mixed = svc._verify([VerifyItem("spec", prompt + [1], [2, 3, 4], None, 0.0, None)], run)
    assert mixed and [r.session_id for r in results] == ["spec", "run"]
    assert results[1].new_tokens == 1  # the run's step cost one row of one id

    # a cache that diverged from the committed ids (a rollback, or a session whose record moved
    # on elsewhere) counts as the recompute it is, not as a short row
    diverged = prompt[:5] + [(t + 1) % 128 for t in prompt[5:]] + [1]
    results, mixed = svc._verify([VerifyItem("spec", diverged, [2], None, 0.0, None)], run)
    assert not mixed and [r.session_id for r in results] == ["spec"]


def test_the_engine_counts_the_ids_a_forward_feeds_as_the_forward_does() -> None:
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, attn_implementation="sdpa")).eval()
    engine = VerifierEngine(model)
    prompt = [int(t) for t in torch.randint(0, 128, (30,))]
    engine.verify([VerifyItem("a", prompt, [], None, 0.0, None),
                   VerifyItem("b", prompt, [], None, 0.0, None)])
    items = [VerifyItem("a", prompt + [7], [1, 2], None, 0.0, None),  # cached: 1 new + 2 drafted
             VerifyItem("b", prompt[:10] + [9] * 25, [3], None, 0.0, None),  # diverged at 10
             VerifyItem("c", prompt, [4, 5, 6], None, 0.0, None)]  # unknown: all of it
    before = engine.sessions()
    counted = engine.ids_to_feed(items)
    assert engine.sessions() == before  # counting touches no cache and no LRU order
    assert counted == [3, 26, 33]
    assert counted == [r.new_tokens for r in engine.verify(items)]
