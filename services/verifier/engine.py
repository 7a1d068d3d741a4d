"""The verifier's model runner: one target model, per-session KV caches, batched verification.

Each round to verify names the committed ids it builds on and the tokens drafted after them.  The
engine reuses the longest common prefix of a session's cached ids and its committed ids (so a stale
or evicted cache only costs a recompute, never a wrong answer), then verifies *all* rounds of a
batch in ONE target forward and applies the lossless acceptance rule of :mod:`wisp.specdec`.

The batched forward uses the padding scheme of :mod:`wisp.kv` (past KV left-padded, new tokens
right-padded, a 2-D mask and explicit per-row positions; that module says why it is exact); a row's
new tokens are its uncached committed ids followed by its draft.

Attention implementation: this was checked against transformers 5.23's ``masking_utils``.  For
``sdpa`` and ``eager`` the 2-D padding mask is AND-ed with the causal mask evaluated at
``q_idx + past_len`` vs ``kv_idx``; masked keys get ``-inf`` (sdpa, boolean mask) or the dtype
minimum (eager), i.e. exactly zero weight, so padded batching is exact up to float rounding from
different matmul shapes (tests: logits within 1e-4 of the unbatched path).  Other backends are
refused (flash/flex handle padding through different code paths that were not validated here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from wisp.kv import KVSession, SessionCache, padded_batch
from wisp.specdec import SparseDist, accept

__all__ = ["SUPPORTED_ATTN_IMPLEMENTATIONS", "VerifierEngine", "VerifyItem", "VerifyResult"]

SUPPORTED_ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")


@dataclass
class VerifyItem:
    """One round to verify: ``draft`` proposed after ``committed`` (prompt + generated ids)."""

    session_id: str
    committed: Sequence[int]
    draft: list[int]
    dists: list[SparseDist] | None
    temperature: float
    generator: torch.Generator | None


@dataclass
class VerifyResult:
    """Outcome of one round.

    ``tokens`` = the accepted draft tokens followed by the target's next token (correction or
    bonus), i.e. what to append to ``committed``.  ``cache_hit`` is True when the session's cache
    already held every committed id but the last one (nothing had to be recomputed);
    ``new_tokens`` counts the tokens this row fed to the forward (recomputed committed ids + draft),
    ``context_len`` the row's total attended length (cached + new).  ``logits`` holds the ``n+1``
    target rows used for acceptance (float32, CPU) when ``verify(..., return_logits=True)``.
    """

    session_id: str
    accepted: int
    tokens: list[int]
    cache_hit: bool
    new_tokens: int
    context_len: int
    logits: torch.Tensor | None = None


@dataclass
class _Row:
    item: VerifyItem
    session: KVSession
    past: int  # cached positions reused
    new_ids: list[int]  # uncached committed ids + draft
    cache_hit: bool

    @property
    def uncached(self) -> int:
        return len(self.new_ids) - len(self.item.draft)


class VerifierEngine:
    """Verifies batches of speculative rounds with one target forward per batch.

    Sessions live in an LRU bounded by ``max_sessions``; eviction only costs a recompute of the
    evicted session's committed ids on its next round.  ``last_forward_ms`` is the wall time of the
    latest batched forward (for the verification-time estimator).
    """

    def __init__(
        self, model: PreTrainedModel, max_sessions: int = 64, pad_token_id: int = 0
    ) -> None:
        attn = getattr(model.config, "_attn_implementation", None)
        if attn not in SUPPORTED_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation {attn!r} is not validated for padded batching; load the "
                f"model with attn_implementation in {SUPPORTED_ATTN_IMPLEMENTATIONS}"
            )
        self._sessions = SessionCache(model.config, max_sessions)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.max_sessions = max_sessions
        self.pad_token_id = pad_token_id
        self.last_forward_ms = 0.0
        self._device = next(model.parameters()).device

    # -- session bookkeeping ------------------------------------------------------------------

    def sessions(self) -> dict[str, int]:
        """Session id -> number of cached positions, least recently used first."""
        return self._sessions.lengths()

    def drop(self, session_id: str) -> None:
        """Forget a session's cache (no-op when unknown)."""
        self._sessions.drop(session_id)

    def clone_session(self, src: str, dst: str) -> bool:
        """Make session ``dst`` a copy of ``src`` (cache and ids); False when ``src`` is unknown.
        The verifier profiler uses it so one real prefill serves every row of its grid."""
        return self._sessions.clone(src, dst)

    # -- verification -------------------------------------------------------------------------

    @staticmethod
    def _validate(items: Sequence[VerifyItem]) -> None:
        seen: set[str] = set()
        for item in items:
            if item.session_id in seen:
                raise ValueError(f"session {item.session_id!r} appears twice in one batch")
            seen.add(item.session_id)
            if not item.committed:
                raise ValueError(f"session {item.session_id!r}: committed is empty")
            if item.temperature < 0:
                raise ValueError(f"session {item.session_id!r}: negative temperature")
            if item.temperature > 0 and item.draft:
                if item.dists is None or len(item.dists) != len(item.draft):
                    raise ValueError(
                        f"session {item.session_id!r}: sampling needs one dist per drafted token"
                    )
                # Checked here, not only in ``accept``, so a bad item fails before the forward.
                if any(d.prob_of(int(t)) <= 0 for t, d in zip(item.draft, item.dists, strict=True)):
                    raise ValueError(
                        f"session {item.session_id!r}: a drafted token has q = 0 in its dist"
                    )

    def ids_to_feed(self, items: Sequence[VerifyItem]) -> list[int]:
        """How many ids ``verify`` would feed for each item (its uncached committed ids plus
        its draft), from the same reuse rule as the forward (the common prefix of the cached
        and committed ids, the last committed id always fed), without touching any cache: a
        cache that diverged from the committed ids (a rollback, a session that moved) counts
        as the recompute it is. The verifier decides from this whether the server runs' steps
        may ride in a batch (``rides_along``)."""
        return [len(item.committed) - self._sessions.reusable_of(item.session_id, item.committed)
                + len(item.draft) for item in items]

    def _prepare(self, item: VerifyItem) -> _Row:
        """Rewind the session's cache to what ``item.committed`` can reuse."""
        had_session = item.session_id in self._sessions
        session = self._sessions.session(item.session_id)
        committed = [int(t) for t in item.committed]
        # The last committed token is always fed: its logits row predicts draft[0].
        keep = self._sessions.reuse(session, committed)
        return _Row(
            item=item,
            session=session,
            past=keep,
            new_ids=committed[keep:] + [int(t) for t in item.draft],
            cache_hit=had_session and keep == len(committed) - 1,
        )

    @torch.inference_mode()
    def verify(
        self, items: list[VerifyItem], *, return_logits: bool = False
    ) -> list[VerifyResult]:
        """Verify every item in one batched target forward; results are in ``items`` order.

        After the forward each session's cache holds exactly ``committed + accepted`` (the next
        token's KV is not computed yet: it is the first uncached id of the following round).
        Two items of the same session in one batch are refused (the second builds on the first).
        """
        if not items:
            return []
        self._validate(items)
        rows = [self._prepare(item) for item in items]
        input_ids, mask, positions, past, max_past = padded_batch(
            [(r.session.cache, r.past, r.new_ids) for r in rows], self.pad_token_id, self._device)
        # Only the n+1 logit rows per item that acceptance reads go through the LM head: a
        # prefill row would otherwise materialise [prompt_len, vocab] logits.  Row b keeps input
        # positions first_b .. first_b + max_n (clamped; the surplus is ignored), where first_b
        # is its last uncached committed token, whose logits predict draft[0].
        max_n = max(len(r.item.draft) for r in rows)
        offsets = torch.arange(max_n + 1, device=self._device)
        firsts = torch.tensor([r.uncached - 1 for r in rows], device=self._device)
        keep = torch.clamp(firsts[:, None] + offsets[None, :], max=input_ids.shape[1] - 1)
        start = time.perf_counter()
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=keep,
        )
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # kernels are async: time the work, not launch
        self.last_forward_ms = (time.perf_counter() - start) * 1000.0
        logits = out.logits
        results: list[VerifyResult] = []
        for b, row in enumerate(rows):
            item, n = row.item, len(row.item.draft)
            row_logits = logits[b, : n + 1].float()
            accepted, nxt = accept(
                row_logits, item.draft, item.dists, item.temperature, item.generator
            )
            keep_new = row.uncached + accepted  # committed ids + accepted draft tokens
            row.session.extend(past, b, slice(max_past, max_past + keep_new), row.new_ids[:keep_new])
            results.append(
                VerifyResult(
                    session_id=item.session_id,
                    accepted=accepted,
                    tokens=[int(t) for t in item.draft[:accepted]] + [nxt],
                    cache_hit=row.cache_hit,
                    new_tokens=len(row.new_ids),
                    context_len=row.past + len(row.new_ids),
                    logits=row_logits.detach().cpu().clone() if return_logits else None,
                )
            )
        return results
