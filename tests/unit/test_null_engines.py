"""The null engines keep the real engines' contract (so the services run their ordinary path
under `wisp-cli bench --null-models`), and the per-round overhead is read correctly from the
timestamps the messages carry."""

from __future__ import annotations

import pytest
from wisp.bench import SEGMENTS, round_overheads, round_segments
from wisp.protocol import AnnotatedBlock, DraftBlock, Verdict, VerifyBatch, digest_ids
from wisp.services.drafter.engine import DraftCall
from wisp.services.drafter.null_engine import NULL_TOKEN, NullTokenizer, null_drafter
from wisp.services.verifier.engine import VerifyItem
from wisp.services.verifier.null_engine import NULL_NEXT_TOKEN, NULL_VOCAB_SIZE, null_verifier
from wisp.specdec import TokenFeatures
from wisp.tokens import encode_prompt


def test_null_drafter_drafts_k_tokens_at_once_and_honours_the_stop_rule() -> None:
    tok, eos, engine = null_drafter(speculative=True)
    assert engine is not None and eos == frozenset()
    assert null_drafter(speculative=False)[2] is None  # centralized: no draft engine, as with models
    seen: list[int] = []

    def stop(i: int, f: TokenFeatures) -> bool:
        seen.append(i)
        return i == 2

    handed: list[int] = []
    outs = engine.draft_many([DraftCall("a", [1, 2], 4), DraftCall("b", [1], 5, stop=stop),
                              DraftCall("c", [3], 3, temperature=0.7, top_k=8)],
                             on_done=lambda i, _out: handed.append(i))
    assert handed == [0, 1, 2]
    assert outs[0].tokens == [NULL_TOKEN] * 4 and outs[0].dists is None and len(outs[0].features) == 4
    assert outs[1].tokens == [NULL_TOKEN] * 2 and outs[1].stopped and seen == [0, 1, 2]
    assert outs[2].dists is not None and all(d.prob_of(NULL_TOKEN) == 1.0 for d in outs[2].dists)
    assert all(o.draft_ms < 50 for o in outs)
    assert engine.prefill("a", [1, 2, 3]) == 0.0
    engine.drop("a")


def test_null_tokenizer_keeps_prompt_sizes_realistic() -> None:
    ids = encode_prompt(NullTokenizer(), "x" * 400)
    assert len(ids) == 100 and all(0 <= t < NULL_VOCAB_SIZE for t in ids)
    assert NullTokenizer().decode([1, 2, 3]) == " x x x"


def test_null_verifier_accepts_every_draft_and_adds_one_token() -> None:
    vocab, engine = null_verifier()
    assert vocab == NULL_VOCAB_SIZE > max(NULL_TOKEN, NULL_NEXT_TOKEN)
    res = engine.verify([VerifyItem("a", [1, 2, 3], [7, 7], None, 0.0, None),
                         VerifyItem("b", [1], [], None, 0.0, None)])
    assert [r.accepted for r in res] == [2, 0]
    assert res[0].tokens == [7, 7, NULL_NEXT_TOKEN] and res[1].tokens == [NULL_NEXT_TOKEN]
    assert res[0].new_tokens == 3 and res[0].context_len == 5 and res[0].cache_hit


# ---------------------------------------------------------------------- reading a round's time
def _block(rid: str, rnd: int, sent: float, draft_ms: float = 0.0) -> DraftBlock:
    return DraftBlock(request_id=rid, device="d", round=rnd, base_committed_len=3 + rnd,
                      committed_digest=digest_ids([rnd]), sent_ts=sent, draft_ms=draft_ms)


def test_round_overhead_is_block_to_next_block_minus_engine_time() -> None:
    blocks = [_block("r", 0, 10.000), _block("r", 1, 10.010, draft_ms=2.0), _block("r", 2, 10.013),
              _block("s", 5, 11.0), _block("r", 1, 10.5)]  # a re-published round: first one counts
    got = sorted(round_overheads(blocks))
    assert got == pytest.approx([3.0, 8.0])  # 10 ms - 2 ms drafting; 3 ms; "s" has no next round
    assert round_overheads(blocks, {("r", 0): 5.0}) == pytest.approx([3.0, 3.0])


def test_round_segments_add_up_to_the_period() -> None:
    b0, b1 = _block("r", 0, 100.000), _block("r", 1, 100.020, draft_ms=1.0)
    ann = AnnotatedBlock(block=b0, predicted_verify_ms=1.0, model_key="m", annotated_ts=100.002)
    batch = VerifyBatch(batch_id="b", verifier="v", items=[ann], created_ts=100.005)
    verdict = Verdict(request_id="r", round=0, base_committed_len=3, drafted=0, accepted=0, tokens=[1],
                      batch_id="b", verifier="v", batch_size=1, verify_ms=0.1, queue_ms=6.0)
    seg = round_segments([b0, b1], [ann], [batch], [verdict])
    assert list(seg) == list(SEGMENTS)
    assert [v[0] for v in seg.values()] == pytest.approx([2.0, 3.0, 1.0, 13.0])
    assert sum(v[0] for v in seg.values()) == pytest.approx(round_overheads([b0, b1])[0])
