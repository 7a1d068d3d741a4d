"""The chi-square cells of ``tests/e2e/sampling_stats.py`` (used by the sampling e2e test) on a
synthetic next-token distribution: cells partition the outcomes with exact probabilities and
expected counts >= 5, exact samples pass, and samples from a slightly wrong distribution fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.e2e.sampling_stats import OTHER, CellTree

VOCAB = 40
EOS = 3


def _conditional(sharpness: float, seed: int = 0):
    """prefix -> a peaked random next-token distribution (deterministic per prefix)."""

    def cond(prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, prefix)) & 0xFFFFFFFF)
        logits = torch.randn(VOCAB, generator=g, dtype=torch.float64) * sharpness
        return torch.softmax(logits, -1)

    return cond


def _sample(cond, n: int, depth: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq: list[int] = []
        while len(seq) < depth and (not seq or seq[-1] != EOS):
            p = cond(tuple(seq)).numpy()
            seq.append(int(rng.choice(VOCAB, p=p / p.sum())))
        out.append(seq)
    return out


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cells_partition_the_outcomes_with_enough_expected_count(depth: int) -> None:
    cond = _conditional(2.0)
    tree = CellTree(cond, depth, 2000, frozenset({EOS}))
    assert abs(sum(tree.probs.values()) - 1.0) < 1e-12
    assert min(tree.probs.values()) * 2000 >= 5.0 - 1e-9
    assert len(tree.probs) > 10  # not everything pooled into a handful of cells
    assert any(c[-1] == OTHER for c in tree.probs)
    for seq in _sample(cond, 300, depth, seed=1):
        assert tree.cell_of(seq) in tree.probs
    # the same cells under the same distribution have the same probabilities
    again = tree.probs_under(cond)
    assert all(abs(again[c] - p) < 1e-12 for c, p in tree.probs.items())


def test_exact_samples_pass_and_a_wrong_distribution_fails() -> None:
    right = _conditional(2.0)
    tree = CellTree(right, 2, 2000, frozenset({EOS}))
    p_ok = tree.pvalue(_sample(right, 2000, 2, seed=7))[0]
    assert p_ok > 1e-3, p_ok
    hotter = _conditional(2.0 / 1.25)  # the same logits at 1.25x the temperature
    p_bad = tree.pvalue(_sample(hotter, 2000, 2, seed=7))[0]
    assert p_bad < 1e-9, p_bad
    # and the power check of the e2e test: right samples against the wrong expectation
    p_wrong_expect = tree.pvalue(_sample(right, 2000, 2, seed=7), tree.probs_under(hotter))[0]
    assert p_wrong_expect < 1e-9, p_wrong_expect


def test_an_output_cut_short_without_eos_is_an_error() -> None:
    tree = CellTree(_conditional(2.0), 2, 2000, frozenset({EOS}))
    first = next(t for t in tree.kept[()] if (t,) in tree.kept)  # an expanded, non-EOS prefix
    with pytest.raises(ValueError, match="ended before"):
        tree.cell_of([first])
