"""A draft engine and tokenizer that load no model, for measuring the pipeline's own cost.

``wisp-cli bench --null-models`` runs the real four services over real Redis with these in place
of the draft model (and ``wisp.services.verifier.null_engine`` in place of the target), so a
round's time is what the services, the broker hops and the scheduling cost, with no forward in
it. The engine keeps ``DraftEngine``'s interface and contract (the stop rule is asked before each
token, sampling rounds carry an exact distribution per token), so the drafter service runs its
ordinary code path; it just answers at once with a fixed token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from wisp.services.drafter.engine import DraftCall, DraftOutput, StopFn
from wisp.specdec import SparseDist, TokenFeatures

__all__ = ["NULL_FEATURES", "NULL_TOKEN", "NullDraftEngine", "NullTokenizer", "null_drafter"]

NULL_TOKEN = 32
"""The token every null draft proposes (a byte id, inside any vocabulary)."""
NULL_FEATURES = TokenFeatures(top1_prob=0.95, entropy=0.2, margin=0.9, logit_spread=9.0)
"""A confident distribution: a learned controller keeps drafting, as on easy text."""


class NullTokenizer:
    """Stands in for the target's tokenizer: about one id per four bytes of text (the usual
    ratio, so prompts and session records keep realistic sizes on the wire), no chat template,
    and a short fixed text per generated id."""

    chat_template: str | None = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode()[::4])}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " x" * len(ids)


class NullDraftEngine:
    """``DraftEngine`` without a model: every round drafts ``max_k`` copies of ``NULL_TOKEN``
    (fewer when the stop rule says so), in microseconds; nothing is cached."""

    def draft(self, session_id: str, committed: Sequence[int], max_k: int, temperature: float,
              top_k: int, generator: torch.Generator | None, stop: StopFn | None = None) -> DraftOutput:
        """One round, with ``DraftEngine.draft``'s stop semantics (asked before each token)."""
        start = time.perf_counter()
        sampled = temperature > 0
        out = DraftOutput([], [] if sampled else None, [], 0.0, forward_passes=0, prefill_tokens=0)
        for i in range(max_k):
            out.forward_passes += 1
            if stop is not None and stop(i, NULL_FEATURES):
                out.stopped, out.stop_features = True, NULL_FEATURES
                break
            out.tokens.append(NULL_TOKEN)
            out.features.append(NULL_FEATURES)
            if out.dists is not None:
                out.dists.append(SparseDist((NULL_TOKEN,), (1.0,)))
        out.draft_ms = (time.perf_counter() - start) * 1000.0
        return out

    def draft_many(self, calls: Sequence[DraftCall], pad_token_id: int = 0,
                   on_done: Callable[[int, DraftOutput], None] | None = None) -> list[DraftOutput]:
        """Each call drafted alone (there is no forward to batch), handed over at once."""
        outputs = []
        for i, c in enumerate(calls):
            out = self.draft(c.session_id, c.committed, c.max_k, c.temperature, c.top_k, c.generator,
                             c.stop)
            if on_done is not None:
                on_done(i, out)
            outputs.append(out)
        return outputs

    def prefill(self, session_id: str, ids: Sequence[int]) -> float:
        """Nothing to cache; 0 ms."""
        return 0.0

    def drop(self, session_id: str) -> None:
        """Nothing is cached per session."""

    def sessions(self) -> dict[str, int]:
        return {}


def null_drafter(speculative: bool) -> tuple[NullTokenizer, frozenset[int], NullDraftEngine | None]:
    """What ``DrafterService.setup`` loads under ``settings.null_models``, in the shape it keeps
    them (tokenizer, EOS ids, engine): no EOS id, so every request runs to its
    ``max_new_tokens``; no engine in centralized mode, as with real models."""
    return NullTokenizer(), frozenset(), NullDraftEngine() if speculative else None
