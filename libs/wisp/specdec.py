"""Speculative decoding primitives: draft sampling, draft features and the acceptance rule.

Everything here is a pure function of its inputs (plus an explicit ``torch.Generator``), so the
drafter and the verifier can live in different processes and a recomputed round gives the same
result.  The acceptance rule is the lossless one of Leviathan et al. / Chen et al.:

* greedy (temperature 0): accept the longest prefix of the draft that equals the target's argmax,
  then emit the target's argmax at the first mismatch (the *correction*) or after the last drafted
  token (the *bonus*);
* sampling: accept drafted token ``x`` with probability ``min(1, p(x) / q(x))``; on the first
  rejection emit a sample from ``normalise(max(0, p - q))``; when every drafted token passes, emit
  a bonus sample from the target's last row.  The emitted sequence is then distributed exactly as
  the target's own samples.

``q`` must be the *exact* distribution the drafted token was drawn from.  The drafter samples from
the renormalised top-k of ``softmax(logits / T)``, so that distribution is small and is shipped
verbatim as a :class:`SparseDist`; the verifier never has to guess it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wisp.features import TokenFeatures
from wisp.protocol.draft import PROB_SUM_TOLERANCE

__all__ = [
    "SparseDist",
    "TokenFeatures",
    "accept",
    "accept_greedy",
    "accept_sampling",
    "round_generator",
    "sample_draft",
    "token_features",
]

_PROB_SUM_TOL = PROB_SUM_TOLERANCE  # the wire's own check (WireDist), so what passes it is usable


@dataclass(frozen=True)
class SparseDist:
    """The exact (sparse) distribution one drafted token was sampled from.

    Tokens absent from ``token_ids`` have probability zero.  Being exact matters: the rejection
    rule divides by ``q(x)``, so an approximated ``q`` makes the output distribution drift.
    """

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.probs):
            raise ValueError(
                f"token_ids and probs differ in length ({len(self.token_ids)} vs {len(self.probs)})"
            )
        if not self.token_ids:
            raise ValueError("a SparseDist needs at least one token")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("token_ids must be unique")
        if any(t < 0 for t in self.token_ids):
            raise ValueError("token ids must be non-negative")
        if any(not (p >= 0.0) or math.isinf(p) for p in self.probs):  # also rejects NaN
            raise ValueError("probs must be finite and non-negative")
        total = math.fsum(self.probs)
        if abs(total - 1.0) > _PROB_SUM_TOL:
            raise ValueError(f"probs must sum to 1 (got {total!r})")

    def prob_of(self, token_id: int) -> float:
        """``q(token_id)``; zero for a token outside the support."""
        try:
            return self.probs[self.token_ids.index(token_id)]
        except ValueError:
            return 0.0

    def dense(self, vocab_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The distribution as a dense ``[vocab_size]`` tensor (zeros off the support)."""
        if max(self.token_ids) >= vocab_size:
            raise ValueError(f"token id {max(self.token_ids)} outside vocab of {vocab_size}")
        out = torch.zeros(vocab_size, dtype=dtype)
        out[torch.tensor(self.token_ids, dtype=torch.long)] = torch.tensor(self.probs, dtype=dtype)
        return out


def _check_vector(logits: torch.Tensor) -> None:
    if logits.ndim != 1 or logits.numel() == 0:
        raise ValueError(f"expected non-empty 1-D logits, got shape {tuple(logits.shape)}")


def token_features(logits: torch.Tensor) -> TokenFeatures:
    """Controller features of one next-token distribution (``logits``: ``[V]``)."""
    _check_vector(logits)
    return batch_token_features(logits[None])[0]


def batch_token_features(logits: torch.Tensor) -> list[TokenFeatures]:
    """``token_features`` of every row of ``logits`` (``[B, V]``) in one set of tensor ops:
    the batched drafter's per-step cost on a 150k vocabulary is dominated by these reductions,
    so doing them row by row would cost more than the batched forward itself."""
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"expected non-empty [B, V] logits, got shape {tuple(logits.shape)}")
    x = logits.detach().to(torch.float32)
    # Written for speed on a 150k vocabulary (topk, log_softmax and boolean masks each cost
    # several times a plain pass there): with xs = x - max and e = exp(xs), Z = sum(e),
    # p = e / Z and entropy = log Z - sum(e * xs) / Z.  Clamping xs at -1e4 keeps -inf logits
    # from turning 0 * -inf into nan (exp(-1e4) is exactly 0, as their probability is).
    best, idx = x.max(dim=-1, keepdim=True)
    xs = (x - best).clamp_(min=-1e4)
    e = xs.exp()
    z = e.sum(dim=-1)
    entropy = z.log() - (e * xs).sum(dim=-1) / z
    # max - mean from the clamped xs (before the scatter below writes -inf into it): the same
    # figure for real logits, finite where a -inf logit (a masked token) made x's mean -inf
    spread = -xs.mean(dim=-1)
    second = xs.scatter_(1, idx, -torch.inf).amax(dim=-1)  # ties keep the other maximum
    top1 = 1.0 / z
    top2 = second.exp() / z
    rows = torch.stack([top1, entropy, top1 - top2, spread], dim=1).tolist()
    return [TokenFeatures(top1_prob=a, entropy=b, margin=c, logit_spread=d) for a, b, c, d in rows]


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), dtype=torch.float64, generator=generator))


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One categorical draw from (unnormalised, non-negative) ``probs`` by inverse CDF.

    Used instead of ``torch.multinomial``, which costs ~4 ms on a 150k vocabulary on CPU versus
    ~0.2 ms here.  A zero-probability index is never returned: it would need
    ``cdf[i - 1] <= u < cdf[i] == cdf[i - 1]``.
    """
    cdf = torch.cumsum(probs, dim=0)
    u = torch.rand((), dtype=cdf.dtype, generator=generator) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


def sample_draft(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    generator: torch.Generator | None,
) -> tuple[int, SparseDist | None]:
    """Draw one draft token and return it with the exact distribution it came from.

    ``temperature == 0`` is greedy: the argmax and ``None`` (no distribution is needed, the
    verifier then uses the greedy rule).  Otherwise the token is drawn from the renormalised top-k
    of ``softmax(logits / temperature)`` computed in float64; ``top_k <= 0`` (or ``>= V``) means
    the full vocabulary, which makes the shipped ``SparseDist`` as large as the vocabulary.
    """
    _check_vector(logits)
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(torch.argmax(logits)), None
    scaled = logits.detach().to(torch.float64) / temperature
    vocab = scaled.numel()
    if 0 < top_k < vocab:
        values, ids = torch.topk(scaled, k=top_k)
    else:
        values, ids = torch.sort(scaled, descending=True)
    probs = torch.softmax(values, dim=-1)
    choice = _sample(probs, generator)
    dist = SparseDist(token_ids=tuple(ids.tolist()), probs=tuple(probs.tolist()))
    return int(ids[choice]), dist


def _check_rows(target_logits: torch.Tensor, n_draft: int) -> None:
    if target_logits.ndim != 2 or target_logits.shape[0] != n_draft + 1:
        raise ValueError(
            f"target_logits must be [n+1, V] = [{n_draft + 1}, V], got {tuple(target_logits.shape)}"
        )


def accept_greedy(target_logits: torch.Tensor, draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: ``(n_accepted, next_token)``.

    Row ``i`` of ``target_logits`` is the target's prediction for draft position ``i``; row ``n``
    predicts the token after the last drafted one.  ``next_token`` is the correction at the first
    mismatch, or the bonus token when all ``n`` drafted tokens match.  ``n == 0`` is one plain
    greedy decode step.
    """
    _check_rows(target_logits, len(draft))
    argmax = torch.argmax(target_logits, dim=-1).tolist()
    n_accepted = 0
    for drafted, wanted in zip(draft, argmax, strict=False):
        if int(drafted) != wanted:
            break
        n_accepted += 1
    return n_accepted, int(argmax[n_accepted])


def accept_sampling(
    target_logits: torch.Tensor,
    draft: Sequence[int],
    dists: Sequence[SparseDist],
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling: ``(n_accepted, next_token)``.

    ``p_i = softmax(target_logits[i] / T)`` in float64.  Drafted token ``x_i`` (drawn from
    ``dists[i]``) is accepted iff ``u < p_i(x_i) / q_i(x_i)`` with ``u ~ U[0, 1)``, i.e. with
    probability ``min(1, p/q)``.  On the first rejection the next token is drawn from
    ``normalise(max(0, p_i - q_i))``; if all pass it is drawn from ``p_n``.  Randomness is consumed
    in a fixed order (one uniform per examined token, then one categorical draw), so the same
    generator state gives the same result.
    """
    if temperature <= 0:
        raise ValueError("accept_sampling needs temperature > 0; use accept_greedy for T = 0")
    _check_rows(target_logits, len(draft))
    if len(dists) != len(draft):
        raise ValueError(f"{len(draft)} drafted tokens but {len(dists)} distributions")
    p = torch.softmax(target_logits.detach().to(torch.float64) / temperature, dim=-1)
    vocab = p.shape[-1]
    tokens = [int(t) for t in draft]
    p_drafted = p[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
    for i, (token, dist, p_x) in enumerate(zip(tokens, dists, p_drafted, strict=True)):
        q_x = dist.prob_of(token)
        if q_x <= 0.0:
            raise ValueError(f"drafted token {token} at position {i} has q = 0 in its dist")
        if _uniform(generator) < p_x / q_x:
            continue
        residual = torch.clamp(p[i] - dist.dense(vocab), min=0.0)
        total = float(residual.sum())
        # A rejection implies p(x) < q(x), hence sum(max(0, p - q)) > 0 in exact arithmetic; the
        # fallback to p only guards against an all-underflow residual.
        return i, _sample(residual / total if total > 0.0 else p[i], generator)
    return len(draft), _sample(p[len(draft)], generator)


def accept(
    target_logits: torch.Tensor,
    draft: Sequence[int],
    dists: Sequence[SparseDist] | None,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Dispatch to :func:`accept_greedy` (``temperature == 0``) or :func:`accept_sampling`.

    ``dists`` is ignored under greedy decoding and required (one per drafted token) otherwise;
    ``None`` is accepted for an empty draft, which is one plain decode step.
    """
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return accept_greedy(target_logits, draft)
    if dists is None:
        if draft:
            raise ValueError("sampling verification needs the draft distributions")
        dists = ()
    return accept_sampling(target_logits, draft, dists, temperature, generator)


def round_generator(seed: int | None, prefix: str, role: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, prefix, role)``, where ``prefix`` is the digest of
    the committed ids the round builds on (``wisp.protocol.digest_ids``) and ``role`` the draws'
    use: ``draft`` (the drafter's proposals), ``verify`` (the acceptance test and correction of
    a drafted round), ``decode`` (the next token of an undrafted round or a server run's step).

    Deriving the seed from the round's content (instead of carrying generator state across
    rounds) makes a re-run of a round — after a crash, a redelivery or a stale cache — reproduce
    exactly the same draws, and keeps the drafter's and the verifier's streams (``role``)
    independent. It is keyed by what was generated, not by the request or a round number (a
    server run's verdicts, and so the rounds after it, are numbered by timing): two requests
    with the same seed and prompt draw alike, so the same seed gives the same output (as an API
    user expects of ``seed``), up to a draw on an inverse-CDF boundary that float rounding in
    another batch moves; a server run and a round trip per token decode alike. Within a request
    every round's prefix is longer than the last, so no two rounds share draws. Lossless: the
    ``verify`` draws do not depend on the drafted tokens, and a verdict is never chosen by its
    content (only one per round is applied, the first). ``seed is None`` means "not
    reproducible": the seed comes from ``os.urandom``.
    """
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
        return gen
    key = f"{int(seed)}\x1f{prefix}\x1f{role}".encode()
    digest = hashlib.sha256(key).digest()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen
