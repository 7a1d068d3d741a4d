"""Exact sampling distributions of a causal LM and a goodness-of-fit test of observed outputs.

``CellTree`` turns "the first N generated tokens" into a small set of chi-square cells whose exact
probabilities come from the model itself: it walks the tree of prefixes, keeps a child only when
its expected count is at least ``min_expected``, and pools the rest of a node's mass into one
"other" cell of that node (folding its smallest kept children into it until that cell, too, is big
enough). Every cell therefore has an expected count >= ``min_expected`` and the cells partition
all outcomes, so a plain chi-square goodness-of-fit test applies.

Semantics follow the system (``libs/wisp/specdec.py``): the target's sampling distribution is
``softmax(logits / T)`` over the full vocabulary (there is no target top-k; only the draft is
truncated to its top-k, which the rejection rule corrects), and generation stops at an EOS id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import chisquare

Prefix = tuple[int, ...]
OTHER = -1
"""The token slot of a node's pooled cell: ``prefix + (OTHER,)``."""

Conditional = Callable[[Prefix], torch.Tensor]
"""prefix of generated ids -> next-token distribution (float64, sums to 1)."""


def model_conditional(model: Any, prompt_ids: Sequence[int], temperature: float,
                      top_k: int = 0) -> Conditional:
    """``softmax(logits / T)`` of ``model`` after ``prompt_ids + prefix`` (cached per prefix),
    restricted to the top ``top_k`` logits and renormalised when ``top_k > 0`` (the draft's
    sampling rule, ``specdec.sample_draft``)."""
    memo: dict[Prefix, torch.Tensor] = {}

    def cond(prefix: Prefix) -> torch.Tensor:
        if prefix not in memo:
            ids = torch.tensor([[*prompt_ids, *prefix]])
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            scaled = logits.double() / temperature
            if top_k > 0:
                values, idx = torch.topk(scaled, top_k)
                scaled = torch.full_like(scaled, -torch.inf).scatter(0, idx, values)
            memo[prefix] = torch.softmax(scaled, -1)
        return memo[prefix]

    return cond


@dataclass
class CellTree:
    """Chi-square cells over the first ``depth`` generated tokens (see the module doc)."""

    cond: Conditional
    depth: int
    n: int
    eos: frozenset[int]
    min_expected: float = 5.0
    kept: dict[Prefix, list[int]] = field(default_factory=dict)
    """internal node -> its expanded children (tokens)."""
    probs: dict[Prefix, float] = field(default_factory=dict)
    """cell -> exact probability under ``cond``."""

    def __post_init__(self) -> None:
        self._build((), 1.0)
        total = sum(self.probs.values())
        assert abs(total - 1.0) < 1e-9, total
        assert min(self.probs.values()) * self.n >= self.min_expected - 1e-9

    def _leaf(self, prefix: Prefix) -> bool:
        return len(prefix) == self.depth or (bool(prefix) and prefix[-1] in self.eos)

    def _build(self, prefix: Prefix, mass: float) -> None:
        if self._leaf(prefix):
            self.probs[prefix] = mass
            return
        p = self.cond(prefix)
        need = self.min_expected / self.n
        big = torch.nonzero(p * mass >= need).flatten().tolist()
        kids = sorted(big, key=lambda t: -float(p[t]))
        rest = mass * (1.0 - sum(float(p[t]) for t in kids))
        while kids and rest < need:  # fold the smallest kept children into the pooled cell
            rest += mass * float(p[kids.pop()])
        if not kids:  # everything pooled: this node is one cell
            self.probs[prefix] = mass
            return
        self.kept[prefix] = kids
        if rest > 0:
            self.probs[(*prefix, OTHER)] = rest
        for t in kids:
            self._build((*prefix, t), mass * float(p[t]))

    def cell_of(self, generated: Sequence[int]) -> Prefix:
        """The cell an output (its first ``depth`` tokens, cut at EOS) falls in."""
        seq = list(generated[: self.depth])
        prefix: Prefix = ()
        for t in seq:
            if prefix not in self.kept:
                return prefix  # a collapsed node (or a leaf): one cell
            if t not in self.kept[prefix]:
                return (*prefix, OTHER)
            prefix = (*prefix, t)
            if t in self.eos:
                break
        if prefix in self.kept:
            raise ValueError(f"output {list(generated)} ended before {self.depth} tokens without EOS")
        return prefix

    def probs_under(self, cond: Conditional) -> dict[Prefix, float]:
        """This tree's cells' probabilities under another distribution ``cond`` (for power
        checks: the same cells, the wrong expectation)."""
        out: dict[Prefix, float] = {}

        def walk(prefix: Prefix, mass: float) -> None:
            if prefix not in self.kept:
                out[prefix] = mass
                return
            p = cond(prefix)
            kids = self.kept[prefix]
            if (*prefix, OTHER) in self.probs:
                out[(*prefix, OTHER)] = mass * max(0.0, 1.0 - sum(float(p[t]) for t in kids))
            for t in kids:
                walk((*prefix, t), mass * float(p[t]))

        walk((), 1.0)
        assert set(out) == set(self.probs)
        return out

    def counts(self, outputs: Sequence[Sequence[int]]) -> Counter[Prefix]:
        return Counter(self.cell_of(o) for o in outputs)

    def pvalue(self, outputs: Sequence[Sequence[int]],
               probs: dict[Prefix, float] | None = None) -> tuple[float, float, int]:
        """Chi-square goodness of fit of ``outputs`` to ``probs`` (default: this tree's own):
        ``(p_value, statistic, degrees_of_freedom)``."""
        probs = probs or self.probs
        got = self.counts(outputs)
        cells = sorted(probs)
        n = len(outputs)
        obs = [got.get(c, 0) for c in cells]
        floor = 1e-12  # an impossible cell that was observed: a huge statistic, not a nan
        raw = [max(probs[c], floor) for c in cells]
        exp = [n * x / sum(raw) for x in raw]
        res = chisquare(obs, exp)
        return float(res.pvalue), float(res.statistic), len(cells) - 1
