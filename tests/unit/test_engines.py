"""Exactness tests of the draft and verifier engines on tiny random Qwen2 models.

The properties that make speculative decoding lossless in this system are checked end to end:
one padded batched target forward equals verifying each round alone (and an uncached reference
forward); the drafter + verifier loop reproduces ``generate(do_sample=False)`` token for token
for several k, including k = 0; cache rollback after a rejection and LRU eviction + recompute
change nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from wisp.kv import crop_to
from wisp.prefix import common_prefix_len
from wisp.protocol import digest_ids
from wisp.services.drafter.engine import DraftCall, DraftEngine
from wisp.services.verifier.engine import VerifierEngine, VerifyItem, VerifyResult
from wisp.specdec import SparseDist, TokenFeatures, round_generator

VOCAB = 128
NEW_TOKENS = 24


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add overhead (and thrash on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(attn: str) -> Qwen2Config:
    # A large init std spreads the logits, so greedy argmaxes are far from ties and float
    # rounding differences between code paths cannot flip a token.
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )


def _target(attn: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(_config(attn)).eval()


@pytest.fixture(scope="module")
def target() -> Qwen2ForCausalLM:
    return _target()


@pytest.fixture(scope="module")
def drafter_model(target: Qwen2ForCausalLM) -> Qwen2ForCausalLM:
    """The target plus weight noise: agrees often, not always (so rounds see rejections)."""
    model = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.03 * param.std())
    return model.eval()


def _prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=gen).tolist()


PROMPTS = [_prompt(4, 10), _prompt(9, 11), _prompt(21, 12)]


@torch.no_grad()
def _reference_logits(model: Qwen2ForCausalLM, ids: Sequence[int]) -> torch.Tensor:
    """Uncached, unpadded, batch-1 forward over the whole sequence: ``[len(ids), V]``."""
    return model(torch.tensor([list(ids)])).logits[0]


def _greedy_continuation(model: Qwen2ForCausalLM, ids: Sequence[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(_reference_logits(model, seq)[-1].argmax()))
    return seq[len(ids) :]


@torch.no_grad()
def _generate(model: Qwen2ForCausalLM, prompt: Sequence[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _toy_dists(draft: Sequence[int]) -> list[SparseDist]:
    """A valid draft distribution per token (the token plus two others)."""
    return [
        SparseDist((t, (t + 1) % VOCAB, (t + 2) % VOCAB), (0.5, 0.3, 0.2)) for t in draft
    ]


def _item(
    sid: str,
    committed: Sequence[int],
    draft: Sequence[int],
    sample: bool = False,
    round_: int = 0,
) -> VerifyItem:
    return VerifyItem(
        session_id=sid,
        committed=list(committed),
        draft=list(draft),
        dists=_toy_dists(draft) if sample else None,
        temperature=0.9 if sample else 0.0,
        generator=round_generator(5, f"{sid}/{round_}", "verify") if sample else None,
    )


def _same(a: VerifyResult, b: VerifyResult) -> None:
    assert (a.accepted, a.tokens, a.new_tokens, a.context_len, a.cache_hit) == (
        b.accepted,
        b.tokens,
        b.new_tokens,
        b.context_len,
        b.cache_hit,
    )
    assert a.logits is not None and b.logits is not None
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)


def _mutated_draft(model: Qwen2ForCausalLM, committed: Sequence[int], n: int, bad: int) -> list[int]:
    """The target's own greedy continuation, with position ``bad`` corrupted (if < n)."""
    draft = _greedy_continuation(model, committed, n)
    if bad < n:
        draft[bad] = (draft[bad] + 7) % VOCAB
    return draft


# -- (a) batching is exact --------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_verify_equals_each_alone_and_reference(attn: str) -> None:
    model = _target(attn)
    batched, alone = VerifierEngine(model), VerifierEngine(model)
    ctx = {"a": _prompt(5, 1), "b": _prompt(17, 2), "c": _prompt(33, 3)}

    def run(items: list[VerifyItem], fresh_items: list[VerifyItem]) -> list[VerifyResult]:
        together = batched.verify(items, return_logits=True)
        one_by_one = [alone.verify([it], return_logits=True)[0] for it in fresh_items]
        for t, o, it in zip(together, one_by_one, items, strict=True):
            _same(t, o)
            ref = _reference_logits(model, list(it.committed) + it.draft)
            n = len(it.draft)
            torch.testing.assert_close(t.logits, ref[len(it.committed) - 1 :][: n + 1], atol=1e-4,
                                       rtol=0)
        assert batched.sessions() == alone.sessions()
        return together

    def items_for(spec: dict[str, tuple[int, int, bool]], round_: int) -> list[VerifyItem]:
        return [
            _item(sid, ctx[sid], _mutated_draft(model, ctx[sid], n, bad), sample, round_)
            for sid, (n, bad, sample) in spec.items()
        ]

    # Round 1: three misses, draft lengths 3 / 0 / 4, one sampled row.
    spec1 = {"a": (3, 1, False), "b": (0, 0, False), "c": (4, 9, True)}
    res1 = run(items_for(spec1, 0), items_for(spec1, 0))
    assert [r.cache_hit for r in res1] == [False, False, False]
    assert res1[0].accepted == 1 and res1[1].accepted == 0
    for r in res1:
        ctx[r.session_id] = ctx[r.session_id] + r.tokens

    # Round 2: full hits for a and c, a partial hit for b (its history diverges at 10), a new d.
    ctx["b"] = ctx["b"][:10] + _prompt(6, 4)
    ctx["d"] = _prompt(12, 5)
    spec2 = {"a": (4, 9, False), "b": (2, 0, False), "c": (1, 9, True), "d": (2, 1, False)}
    res2 = run(items_for(spec2, 1), items_for(spec2, 1))
    assert [r.cache_hit for r in res2] == [True, False, True, False]
    assert res2[0].new_tokens == 1 + 4 and res2[0].accepted == 4  # bonus path
    assert res2[1].context_len == len(ctx["b"]) + 2
    assert res2[1].new_tokens == len(ctx["b"]) - 10 + 2  # recomputed from the common prefix

    # The split-back caches match the unbatched ones.
    for sid in ctx:
        bc, ac = batched._sessions[sid].cache, alone._sessions[sid].cache
        for lb, la in zip(bc.layers, ac.layers, strict=True):
            torch.testing.assert_close(lb.keys, la.keys, atol=1e-4, rtol=0)
            torch.testing.assert_close(lb.values, la.values, atol=1e-4, rtol=0)


def test_verify_rejects_bad_batches(target: Qwen2ForCausalLM) -> None:
    engine = VerifierEngine(target)
    with pytest.raises(ValueError):
        engine.verify([_item("x", [1, 2], []), _item("x", [1, 2], [])])
    with pytest.raises(ValueError):
        engine.verify([VerifyItem("x", [1, 2], [3], None, 0.8, None)])
    with pytest.raises(ValueError):
        engine.verify([_item("x", [], [])])
    with pytest.raises(ValueError):  # a drafted token its own dist gives q = 0
        engine.verify([VerifyItem("x", [1, 2], [3], [SparseDist((4,), (1.0,))], 0.8, None)])
    assert engine.sessions() == {}  # refused before touching any cache
    assert engine.verify([]) == []


# -- (b)-(e) the full loop ---------------------------------------------------------------------


def _speculative_generate(
    drafter: DraftEngine,
    verifier: VerifierEngine,
    prompts: Sequence[Sequence[int]],
    k: int,
    n_new: int,
    interleave: bool = False,
) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy drafter + verifier loop over all prompts; one verify batch per round.

    ``interleave`` verifies the sessions one at a time instead (for LRU tests).
    """
    committed = {f"s{i}": list(p) for i, p in enumerate(prompts)}
    goal = {sid: len(ids) + n_new for sid, ids in committed.items()}
    stats = {"drafted": 0, "accepted": 0, "rounds": 0, "hits": 0}
    while any(len(committed[s]) < goal[s] for s in committed):
        items = []
        for sid, ids in committed.items():
            if len(ids) >= goal[sid]:
                continue
            out = drafter.draft(sid, ids, k, 0.0, 0, None)
            assert out.dists is None and len(out.tokens) == len(out.features) <= k
            stats["drafted"] += len(out.tokens)
            items.append(_item(sid, ids, out.tokens))
        batches = [[it] for it in items] if interleave else [items]
        for batch in batches:
            for res in verifier.verify(batch):
                committed[res.session_id] += res.tokens
                stats["accepted"] += res.accepted
                stats["hits"] += res.cache_hit
                stats["rounds"] += 1
    outs = [committed[f"s{i}"][len(p) : len(p) + n_new] for i, p in enumerate(prompts)]
    return outs, stats


@pytest.fixture(scope="module")
def expected(target: Qwen2ForCausalLM) -> list[list[int]]:
    return [_generate(target, p, NEW_TOKENS) for p in PROMPTS]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_loop_reproduces_generate(
    target: Qwen2ForCausalLM,
    drafter_model: Qwen2ForCausalLM,
    expected: list[list[int]],
    k: int,
) -> None:
    outs, stats = _speculative_generate(
        DraftEngine(drafter_model), VerifierEngine(target), PROMPTS, k, NEW_TOKENS
    )
    assert outs == expected
    # The run must exercise both acceptance and rejection (hence cache rollback) to mean much.
    assert 0.3 * stats["drafted"] < stats["accepted"] < stats["drafted"], stats
    assert stats["hits"] >= stats["rounds"] - 2 * len(PROMPTS), stats


def test_k0_is_plain_greedy_decode(
    target: Qwen2ForCausalLM, drafter_model: Qwen2ForCausalLM, expected: list[list[int]]
) -> None:
    drafter = DraftEngine(drafter_model)
    out = drafter.draft("s", PROMPTS[0], 0, 0.0, 0, None)
    assert out.tokens == [] and out.forward_passes == 0 and drafter.sessions() == {}
    outs, stats = _speculative_generate(drafter, VerifierEngine(target), PROMPTS, 0, NEW_TOKENS)
    assert outs == expected
    assert stats["drafted"] == 0 and stats["rounds"] == NEW_TOKENS * len(PROMPTS)


def test_lru_eviction_then_recompute_is_exact(
    target: Qwen2ForCausalLM, drafter_model: Qwen2ForCausalLM, expected: list[list[int]]
) -> None:
    drafter = DraftEngine(drafter_model, max_sessions=1)
    verifier = VerifierEngine(target, max_sessions=1)
    outs, stats = _speculative_generate(
        drafter, verifier, PROMPTS, 3, NEW_TOKENS, interleave=True
    )
    assert outs == expected
    # Sessions evict each other every round (hits only once a single session is left running).
    assert stats["rounds"] - stats["hits"] > 3 * len(PROMPTS), stats
    assert len(drafter.sessions()) == 1 and len(verifier.sessions()) == 1
    for engine in (verifier, drafter):
        (last,) = engine.sessions()
        engine.drop(last)
        engine.drop("never-seen")  # dropping an unknown session is a no-op
    assert verifier.sessions() == {} and drafter.sessions() == {}


def test_sampling_loop_is_reproducible_and_batch_invariant(
    target: Qwen2ForCausalLM, drafter_model: Qwen2ForCausalLM
) -> None:
    """Per-round generators make a sampled run repeatable, batched or one session at a time."""

    def run(interleave: bool) -> list[list[int]]:
        drafter, verifier = DraftEngine(drafter_model), VerifierEngine(target)
        committed = {f"s{i}": list(p) for i, p in enumerate(PROMPTS)}
        for _round in range(6):
            items = []
            for sid, ids in committed.items():
                prefix = digest_ids(ids)  # as the services key their samplers
                gen = round_generator(11, prefix, "draft")
                out = drafter.draft(sid, ids, 3, 0.9, 8, gen)
                assert out.dists is not None
                items.append(
                    VerifyItem(sid, list(ids), out.tokens, out.dists, 0.9,
                               round_generator(11, prefix, "verify"))
                )
            batches = [[it] for it in items] if interleave else [items]
            for batch in batches:
                for res in verifier.verify(batch):
                    committed[res.session_id] += res.tokens
        return list(committed.values())

    first = run(interleave=False)
    assert first == run(interleave=False) == run(interleave=True)
    # every round committed at least its correction token, and some drafts were accepted
    grown = [len(ids) - len(p) for ids, p in zip(first, PROMPTS, strict=True)]
    assert min(grown) >= 6 and sum(grown) > 6 * len(PROMPTS), grown


def _stop_at(n: int):  # noqa: ANN202 - a StopFn
    return lambda i, _feats: i >= n


@pytest.mark.parametrize("sample", [False, True])
def test_draft_many_equals_drafting_each_session_alone(
    drafter_model: Qwen2ForCausalLM, sample: bool
) -> None:
    """Batched drafting gives every session what drafting it alone gives (tokens, features,
    dists, stop decisions, forward passes) and leaves the same caches, over rounds with cold
    and warm caches, rejections (rollback), different lengths, a stop rule and max_k 0 / 1."""
    one, many = DraftEngine(drafter_model), DraftEngine(drafter_model)
    committed = {f"s{i}": list(p) for i, p in enumerate(PROMPTS + [_prompt(2, 13)])}
    temp, top_k = (0.9, 8) if sample else (0.0, 0)
    passes = 0
    for round_ in range(5):
        calls = []
        for j, (sid, ids) in enumerate(committed.items()):
            max_k = [4, 3, 0 if round_ == 1 else 5, 1][j]
            stop = _stop_at(2) if sid == "s1" and round_ % 2 else None
            calls.append((sid, ids, max_k, stop))

        def gen(sid: str, tag: str) -> torch.Generator | None:
            return round_generator(7, f"{sid}/{round_}", tag) if sample else None  # noqa: B023

        alone = [one.draft(sid, ids, k, temp, top_k, gen(sid, "d"), stop)
                 for sid, ids, k, stop in calls]
        handed: dict[int, object] = {}
        together = many.draft_many(
            [DraftCall(sid, ids, k, temp, top_k, gen(sid, "d"), stop) for sid, ids, k, stop in calls],
            on_done=handed.__setitem__)
        # every round is handed over once, the moment it is finished (fewest passes first)
        assert sorted(handed) == list(range(len(calls)))
        assert all(handed[i] is out for i, out in enumerate(together))
        passes_in_order = [together[i].forward_passes for i in handed]
        assert passes_in_order == sorted(passes_in_order)
        for a, b, (sid, _ids, k, _stop) in zip(alone, together, calls, strict=True):
            assert b.tokens == a.tokens and len(b.tokens) <= k, sid
            assert (b.stopped, b.forward_passes, b.prefill_tokens) == (
                a.stopped, a.forward_passes, a.prefill_tokens), sid
            for fa, fb in zip(a.features, b.features, strict=True):
                assert fb.top1_prob == pytest.approx(fa.top1_prob, abs=1e-4)
                assert fb.entropy == pytest.approx(fa.entropy, abs=1e-3)
            assert (a.dists is None) == (b.dists is None) == (not sample)
            for da, db in zip(a.dists or [], b.dists or [], strict=True):
                assert da.token_ids == db.token_ids
                assert db.probs == pytest.approx(da.probs, abs=1e-4)
            passes += b.forward_passes
        assert many.sessions() == one.sessions()
        # "verify": keep half of each draft, then a token of our own (a rejection: rollback)
        for (sid, ids, _k, _stop), out in zip(calls, alone, strict=True):
            kept = out.tokens[: len(out.tokens) // 2]
            committed[sid] = ids + kept + [(sum(ids) + round_) % VOCAB]
    assert passes > 20
    # and the next round from the batched engine's caches equals a cold start
    ids = committed["s2"]
    cold = DraftEngine(drafter_model).draft("s2", ids, 3, 0.0, 0, None)
    warm = many.draft_many([DraftCall("s2", ids, 3), DraftCall("s0", committed["s0"], 2)])[0]
    assert warm.tokens == cold.tokens and warm.prefill_tokens < cold.prefill_tokens


def test_draft_many_refuses_a_session_twice(drafter_model: Qwen2ForCausalLM) -> None:
    engine = DraftEngine(drafter_model)
    with pytest.raises(ValueError, match="twice"):
        engine.draft_many([DraftCall("s", PROMPTS[0], 2), DraftCall("s", PROMPTS[1], 2)])
    assert engine.draft_many([]) == []


# -- (d) rollback, explicitly -------------------------------------------------------------------


def test_verifier_rollback_after_rejection(target: Qwen2ForCausalLM) -> None:
    engine = VerifierEngine(target)
    committed = _prompt(11, 20)
    first = engine.verify([_item("s", committed, _mutated_draft(target, committed, 4, 2))])[0]
    assert first.accepted == 2
    assert engine.sessions() == {"s": len(committed) + 2}  # committed + accepted, no more
    committed = committed + first.tokens
    nxt = _mutated_draft(target, committed, 3, 1)
    warm = engine.verify([_item("s", committed, nxt)], return_logits=True)[0]
    cold = VerifierEngine(target).verify([_item("s", committed, nxt)], return_logits=True)[0]
    assert warm.cache_hit and not cold.cache_hit
    assert (warm.accepted, warm.tokens) == (cold.accepted, cold.tokens)
    assert warm.logits is not None and cold.logits is not None
    torch.testing.assert_close(warm.logits, cold.logits, atol=1e-4, rtol=0)


def test_drafter_rollback_matches_fresh_engine(drafter_model: Qwen2ForCausalLM) -> None:
    engine = DraftEngine(drafter_model)
    committed = _prompt(9, 30)
    first = engine.draft("s", committed, 4, 0.0, 0, None)
    assert len(first.tokens) == 4 and first.forward_passes == 4
    assert engine.sessions() == {"s": len(committed) + 3}  # the last draft token is never fed
    # The verifier kept one token and corrected the second.
    committed = committed + first.tokens[:1] + [(first.tokens[1] + 1) % VOCAB]
    warm = engine.draft("s", committed, 4, 0.0, 0, None)
    cold = DraftEngine(drafter_model).draft("s", committed, 4, 0.0, 0, None)
    assert warm.tokens == cold.tokens
    assert warm.prefill_tokens == 1 and cold.prefill_tokens == len(committed)
    for fw, fc in zip(warm.features, cold.features, strict=True):
        assert fw.as_tuple() == pytest.approx(fc.as_tuple(), abs=1e-4)


def test_background_prefill_then_draft_matches_a_cold_draft(drafter_model: Qwen2ForCausalLM) -> None:
    """The prefill round: the drafter caches the prompt while the server makes the first token;
    the next draft feeds only what was committed since and drafts exactly what a cold one does."""
    engine = DraftEngine(drafter_model)
    prompt = _prompt(11, 50)
    engine.prefill("s", prompt)
    assert engine.sessions() == {"s": len(prompt)}
    engine.prefill("s", prompt)  # idempotent
    assert engine.sessions() == {"s": len(prompt)}
    committed = prompt + [(prompt[-1] + 7) % VOCAB]  # the target's first token
    warm = engine.draft("s", committed, 4, 0.0, 0, None)
    cold = DraftEngine(drafter_model).draft("s", committed, 4, 0.0, 0, None)
    assert warm.prefill_tokens == 1 and warm.tokens == cold.tokens


# -- drafter specifics --------------------------------------------------------------------------


def test_stop_callback_excludes_the_token_it_stops_at(drafter_model: Qwen2ForCausalLM) -> None:
    engine = DraftEngine(drafter_model)
    committed = _prompt(7, 40)
    full = DraftEngine(drafter_model).draft("s", committed, 5, 0.0, 0, None)
    seen: list[tuple[int, TokenFeatures]] = []

    def stop(i: int, feats: TokenFeatures) -> bool:
        seen.append((i, feats))
        return i == 2

    out = engine.draft("s", committed, 5, 0.0, 0, None, stop=stop)
    assert out.tokens == full.tokens[:2] and out.stopped
    assert [i for i, _ in seen] == [0, 1, 2]
    assert out.stop_features is seen[-1][1] and out.features == [f for _, f in seen[:2]]
    assert out.forward_passes == 3  # prefill + the two drafted tokens fed
    assert engine.draft("t", committed, 5, 0.0, 0, None, stop=lambda i, f: True).tokens == []


def test_sampled_draft_is_reproducible_and_carries_exact_dists(
    drafter_model: Qwen2ForCausalLM,
) -> None:
    committed = _prompt(8, 50)

    def run() -> tuple[list[int], list[SparseDist] | None]:
        engine = DraftEngine(drafter_model)
        out = engine.draft("s", committed, 4, 0.8, 10, round_generator(3, "r", "draft"))
        return out.tokens, out.dists

    tokens, dists = run()
    assert (tokens, dists) == run()
    assert dists is not None and len(dists) == len(tokens) == 4
    for tok, dist in zip(tokens, dists, strict=True):
        assert len(dist.token_ids) == 10 and dist.prob_of(tok) > 0


def test_crop_to_and_common_prefix(target: Qwen2ForCausalLM) -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([], [1]) == 0
    engine = DraftEngine(target)
    engine.draft("s", _prompt(10, 60), 1, 0.0, 0, None)
    cache = engine._sessions["s"].cache
    assert cache.get_seq_length() == 10
    crop_to(cache, 6)
    assert cache.get_seq_length() == 6 and cache.layers[0].keys.shape[-2] == 6
    with pytest.raises(ValueError):
        crop_to(cache, 7)
