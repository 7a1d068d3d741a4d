"""Tests of the acceptance rule: greedy cases and the losslessness of rejection sampling.

The sampling tests are statistical but deterministic (fixed seeds): a chi-square goodness-of-fit
test checks that the first emitted token, and the first two emitted tokens jointly, follow the
target distribution although the tokens were proposed from a different draft distribution; a
negative control shows the same harness rejects a wrong rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from wisp.specdec import (
    SparseDist,
    TokenFeatures,
    accept,
    accept_greedy,
    accept_sampling,
    batch_token_features,
    round_generator,
    sample_draft,
    token_features,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensor ops: intra-op threads only add overhead (and thrash on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


AcceptFn = Callable[
    [torch.Tensor, Sequence[int], Sequence[SparseDist], float, torch.Generator | None],
    tuple[int, int],
]


def _one_hot_logits(tokens: Sequence[int], vocab: int = 10) -> torch.Tensor:
    """Logit rows whose argmax is the given token (a strong, unambiguous preference)."""
    out = torch.zeros(len(tokens), vocab)
    for i, t in enumerate(tokens):
        out[i, t] = 5.0
    return out


# -- SparseDist / features / sample_draft ----------------------------------------------------


def test_sparse_dist_validation() -> None:
    SparseDist((1, 2), (0.25, 0.75))
    with pytest.raises(ValueError):
        SparseDist((1, 2), (1.0,))
    with pytest.raises(ValueError):
        SparseDist((1, 2), (0.5, 0.6))
    with pytest.raises(ValueError):
        SparseDist((1, 1), (0.5, 0.5))
    with pytest.raises(ValueError):
        SparseDist((), ())
    d = SparseDist((3, 0), (0.75, 0.25))
    assert d.prob_of(3) == 0.75 and d.prob_of(5) == 0.0
    assert torch.equal(d.dense(4), torch.tensor([0.25, 0.0, 0.0, 0.75], dtype=torch.float64))


def test_token_features() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    f = token_features(logits)
    assert isinstance(f, TokenFeatures)
    assert f.top1_prob == pytest.approx(0.5, abs=1e-6)
    assert f.margin == pytest.approx(0.2, abs=1e-6)
    expected_h = -(0.5 * np.log(0.5) + 0.3 * np.log(0.3) + 0.2 * np.log(0.2))
    assert f.entropy == pytest.approx(expected_h, abs=1e-5)
    assert f.logit_spread == pytest.approx(float(logits.max() - logits.mean()), abs=1e-6)
    # A (numerically) one-hot distribution: no NaN from 0 * log 0.
    sharp = token_features(torch.tensor([1000.0, 0.0, -1000.0]))
    assert sharp.top1_prob == pytest.approx(1.0) and sharp.entropy == pytest.approx(0.0, abs=1e-6)


def test_batch_token_features_match_a_float64_reference() -> None:
    """The batched (fast) formulas equal the textbook ones row by row, ties and -inf included."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=gen) * torch.tensor([0.1, 1, 3, 10, 30, 3])[:, None]
    logits[1, 7] = logits[1].max()  # a tie for the top: margin 0
    logits[2, :100] = -torch.inf  # masked tokens: probability 0, no nan
    got = batch_token_features(logits)
    assert [token_features(row) for row in logits] == got
    for row, f in zip(logits.double(), got, strict=True):
        p = torch.softmax(row, -1)
        top = torch.topk(p, 2).values
        h = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum()
        assert f.top1_prob == pytest.approx(float(top[0]), abs=1e-6)
        assert f.margin == pytest.approx(float(top[0] - top[1]), abs=1e-6)
        assert f.entropy == pytest.approx(float(h), abs=1e-4)
        finite = row[torch.isfinite(row)]
        if len(finite) == len(row):
            assert f.logit_spread == pytest.approx(float(row.max() - row.mean()), rel=1e-5)
    assert got[1].margin == 0.0
    with pytest.raises(ValueError):
        batch_token_features(torch.zeros(3))


def test_sample_draft_greedy_and_topk() -> None:
    logits = torch.tensor([0.1, 2.0, 1.0, -3.0, 0.5])
    assert sample_draft(logits, 0.0, 3, None) == (1, None)
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(5)
    for _ in range(4000):
        tok, dist = sample_draft(logits, 0.8, 3, gen)
        assert dist is not None and set(dist.token_ids) == {1, 2, 4}
        counts[tok] += 1
    q = torch.softmax(logits.double() / 0.8, -1).numpy()
    q[[0, 3]] = 0.0
    q /= q.sum()
    assert counts[[0, 3]].sum() == 0
    assert chisquare(counts[[1, 2, 4]], q[[1, 2, 4]] * counts.sum()).pvalue > 1e-3
    # The shipped dist is the exact distribution: renormalised top-k at temperature T.
    _, dist = sample_draft(logits, 0.8, 3, gen)
    assert dist is not None
    assert dist.dense(5).numpy() == pytest.approx(q, abs=1e-12)
    # top_k <= 0 means the whole vocabulary.
    _, full = sample_draft(logits, 1.0, 0, gen)
    assert full is not None and len(full.token_ids) == 5


# -- greedy -----------------------------------------------------------------------------------


def test_greedy_all_accepted_gives_bonus() -> None:
    assert accept_greedy(_one_hot_logits([3, 4, 5, 6]), [3, 4, 5]) == (3, 6)


def test_greedy_first_mismatch_gives_correction() -> None:
    assert accept_greedy(_one_hot_logits([3, 4, 5, 6]), [3, 9, 5]) == (1, 4)
    assert accept_greedy(_one_hot_logits([3, 4, 5, 6]), [7, 4, 5]) == (0, 3)


def test_greedy_no_draft_is_a_plain_decode_step() -> None:
    assert accept_greedy(_one_hot_logits([8]), []) == (0, 8)
    assert accept(_one_hot_logits([8]), [], None, 0.0, None) == (0, 8)


def test_shape_and_argument_checks() -> None:
    with pytest.raises(ValueError):
        accept_greedy(_one_hot_logits([1, 2]), [1, 2])  # needs n + 1 rows
    with pytest.raises(ValueError):
        accept(_one_hot_logits([1, 2]), [1], None, 1.0, None)  # sampling without dists
    with pytest.raises(ValueError):
        accept(_one_hot_logits([1]), [], None, -1.0, None)
    with pytest.raises(ValueError):  # drafted token outside its own dist
        accept_sampling(_one_hot_logits([1, 2]), [1], [SparseDist((2,), (1.0,))], 1.0, None)


def test_sampling_no_draft_samples_target() -> None:
    gen = torch.Generator().manual_seed(3)
    p = np.array([0.1, 0.6, 0.3])
    logits = torch.log(torch.from_numpy(p)).unsqueeze(0)
    counts = np.bincount([accept(logits, [], None, 1.0, gen)[1] for _ in range(3000)], minlength=3)
    assert chisquare(counts, p * counts.sum()).pvalue > 1e-3


def test_round_generator_is_keyed_by_seed_prefix_and_role() -> None:
    """The same (seed, committed prefix, role) draws alike whatever the request; any of the
    three changed draws otherwise; no seed draws fresh."""
    from wisp.protocol import digest_ids

    def draw(gen: torch.Generator | None) -> list[float]:
        return torch.rand(4, generator=gen).tolist()

    prefix = digest_ids([1, 2, 3])
    base = draw(round_generator(7, prefix, "verify"))
    assert base == draw(round_generator(7, digest_ids([1, 2, 3]), "verify"))
    assert base != draw(round_generator(7, digest_ids([1, 2, 3, 4]), "verify"))
    assert base != draw(round_generator(7, prefix, "draft"))
    assert base != draw(round_generator(7, prefix, "decode"))
    assert base != draw(round_generator(8, prefix, "verify"))
    assert draw(round_generator(None, prefix, "verify")) != draw(
        round_generator(None, prefix, "verify")
    )


def test_prefix_digest_grows_as_digest_ids() -> None:
    from wisp.prefix import PrefixDigest
    from wisp.protocol import digest_ids

    ids = [151644, 8948, 198, 0, 42, 7]
    d = PrefixDigest()
    assert d.hexdigest() == digest_ids([])
    for i, t in enumerate(ids):
        d.extend((t,))
        assert d.hexdigest() == digest_ids(ids[: i + 1])
    d2 = PrefixDigest(ids[:2])
    d2.extend(ids[2:])
    assert d2.hexdigest() == digest_ids(ids)
    assert digest_ids([1, 23]) != digest_ids([12, 3])


# -- sampling losslessness ------------------------------------------------------------------

VOCAB = 6
TEMP = 0.7
TOP_K = 4  # draft support smaller than the target's: the residual must cover the rest


@lru_cache(maxsize=1)
def _problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Target p0, target conditionals P1[x], draft q0, draft conditionals Q1[x] (fixed)."""
    rng = np.random.default_rng(1234)
    p0 = rng.dirichlet(np.full(VOCAB, 3.0))
    big_p1 = rng.dirichlet(np.full(VOCAB, 3.0), size=VOCAB)
    q0 = rng.dirichlet(np.full(VOCAB, 1.0))
    big_q1 = rng.dirichlet(np.full(VOCAB, 1.0), size=VOCAB)
    return p0, big_p1, q0, big_q1


def _as_logits(dist: np.ndarray) -> torch.Tensor:
    """Logits whose ``softmax(. / TEMP)`` is ``dist`` (so the temperature path is exercised)."""
    return torch.from_numpy(np.log(dist) * TEMP)


def _emit_two(rule: AcceptFn, n_draws: int, seed: int) -> np.ndarray:
    """Run speculative rounds with 2 drafted tokens; return the first two emitted tokens.

    The draft distributions are the exact ones ``sample_draft`` reports for each context (they do
    not depend on the draw), and the drafted tokens are drawn from them up front with numpy so
    that the loop only runs the rule under test.  A round that emits fewer than two tokens is
    followed by a one-token round on top of what it emitted, exactly as the next real round would.
    """
    p0, big_p1, q0, big_q1 = _problem()
    tp0 = _as_logits(p0)
    tp1 = [_as_logits(row) for row in big_p1]
    d0 = sample_draft(_as_logits(q0), TEMP, TOP_K, None)[1]
    d1 = [sample_draft(_as_logits(row), TEMP, TOP_K, None)[1] for row in big_q1]
    assert d0 is not None and all(d is not None for d in d1)
    cdf0 = np.cumsum(d0.dense(VOCAB).numpy())
    cdf1 = np.cumsum(np.stack([d.dense(VOCAB).numpy() for d in d1]), axis=1)

    def draw(cdf: np.ndarray, u: float) -> int:
        return min(int(np.searchsorted(cdf, u, side="right")), VOCAB - 1)

    rng = np.random.default_rng(seed)
    uniforms = rng.random((n_draws, 3))
    bonus = torch.zeros(VOCAB)  # the third token is never looked at
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((n_draws, 2), dtype=np.int64)
    for i in range(n_draws):
        x0 = draw(cdf0, uniforms[i, 0])
        x1 = draw(cdf1[x0], uniforms[i, 1])
        target = torch.stack([tp0, tp1[x0], bonus])
        n_acc, nxt = rule(target, [x0, x1], [d0, d1[x0]], TEMP, gen)
        emitted = [x0, x1][:n_acc] + [nxt]
        if len(emitted) < 2:
            y = draw(cdf1[emitted[0]], uniforms[i, 2])
            rows = torch.stack([tp1[emitted[0]], bonus])
            n2, nxt2 = rule(rows, [y], [d1[emitted[0]]], TEMP, gen)
            emitted += [y][:n2] + [nxt2]
        out[i] = emitted[:2]
    return out


def _gof_pvalues(pairs: np.ndarray) -> tuple[float, float]:
    """Chi-square p-values of (first token vs p0, first two tokens vs p0 x P1)."""
    p0, big_p1, _, _ = _problem()
    n = len(pairs)
    first = np.bincount(pairs[:, 0], minlength=VOCAB)
    joint = np.bincount(pairs[:, 0] * VOCAB + pairs[:, 1], minlength=VOCAB * VOCAB)
    expected_joint = (p0[:, None] * big_p1).reshape(-1)
    return (
        float(chisquare(first, p0 * n).pvalue),
        float(chisquare(joint, expected_joint * n).pvalue),
    )


def test_rejection_sampling_is_lossless() -> None:
    pairs = _emit_two(accept, n_draws=10_000, seed=2024)
    p_first, p_joint = _gof_pvalues(pairs)
    assert p_first > 1e-3, p_first
    assert p_joint > 1e-3, p_joint


def _accept_always(
    target: torch.Tensor,
    draft: Sequence[int],
    dists: Sequence[SparseDist],
    temperature: float,
    gen: torch.Generator | None,
) -> tuple[int, int]:
    return len(draft), accept(target[-1:], [], None, temperature, gen)[1]


def _resample_from_p(
    target: torch.Tensor,
    draft: Sequence[int],
    dists: Sequence[SparseDist],
    temperature: float,
    gen: torch.Generator | None,
) -> tuple[int, int]:
    """Subtly wrong: on rejection resample from p instead of normalise(max(0, p - q))."""
    p = torch.softmax(target.double() / temperature, -1)
    for i, (tok, dist) in enumerate(zip(draft, dists, strict=True)):
        if float(torch.rand((), dtype=torch.float64, generator=gen)) >= p[i, tok] / dist.prob_of(
            tok
        ):
            return i, int(torch.multinomial(p[i], 1, generator=gen))
    return len(draft), int(torch.multinomial(p[-1], 1, generator=gen))


@pytest.mark.parametrize("wrong_rule", [_accept_always, _resample_from_p])
def test_chi_square_detects_a_wrong_rule(wrong_rule: AcceptFn) -> None:
    pairs = _emit_two(wrong_rule, n_draws=3_000, seed=2024)
    p_first, p_joint = _gof_pvalues(pairs)
    assert min(p_first, p_joint) < 1e-9, (p_first, p_joint)
