"""The edge drafter's model runner: one draft model, one KV cache per session.

A round sends the *committed* ids (prompt + every verified token so far).  The engine keeps, per
session, a ``DynamicCache`` and the exact ids whose KV it holds, so it can reuse the longest common
prefix and roll back whatever the verifier rejected; no protocol-level bookkeeping of "what was
accepted" is needed here, the committed ids say it all.  This module is pure torch/transformers: no
I/O, no asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from wisp.kv import KVSession, SessionCache, padded_batch
from wisp.prefix import common_prefix_len
from wisp.specdec import SparseDist, TokenFeatures, batch_token_features, sample_draft, token_features

__all__ = ["DraftCall", "DraftEngine", "DraftOutput", "StopFn"]

StopFn = Callable[[int, TokenFeatures], bool]
"""``stop(i, features) -> True`` ends the draft *before* token ``i`` (0-based) is drafted."""


@dataclass
class DraftOutput:
    """What one drafting call produced.

    ``features[i]`` describes the distribution ``tokens[i]`` was drawn from (always one entry per
    token).  ``dists`` is ``None`` under greedy drafting, else one exact ``SparseDist`` per token.
    ``stopped`` is True when the ``stop`` callback (not ``max_k``) ended the draft; the features that
    made it stop are then in ``stop_features`` (useful for controller traces).
    ``forward_passes`` counts model calls (the prefill of uncached committed ids is one of them;
    ``prefill_tokens`` says how many ids it fed, 1 on a warm cache) and ``draft_ms`` is the wall
    time of the whole call, prefill included, since the user waits for both.
    """

    tokens: list[int]
    dists: list[SparseDist] | None
    features: list[TokenFeatures]
    draft_ms: float
    forward_passes: int
    stopped: bool = False
    stop_features: TokenFeatures | None = None
    prefill_tokens: int = 0


@dataclass
class DraftCall:
    """One session's round for :meth:`DraftEngine.draft_many` (the arguments of ``draft``)."""

    session_id: str
    committed: Sequence[int]
    max_k: int
    temperature: float = 0.0
    top_k: int = 0
    generator: torch.Generator | None = None
    stop: StopFn | None = None


class DraftEngine:
    """Runs a draft model for many sessions, reusing each session's KV cache across rounds.

    Sessions live in an LRU bounded by ``max_sessions``; an evicted (or unknown) session simply
    costs a prefill of its committed ids on its next round, so eviction never changes results.
    """

    def __init__(self, model: PreTrainedModel, max_sessions: int = 64) -> None:
        self._sessions = SessionCache(model.config, max_sessions)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.max_sessions = max_sessions
        self._device = next(model.parameters()).device

    # -- session bookkeeping ------------------------------------------------------------------

    def sessions(self) -> dict[str, int]:
        """Session id -> number of cached positions, least recently used first."""
        return self._sessions.lengths()

    def close(self) -> None:
        """Free every session's KV cache (the llama.cpp engine's ``close`` frees its native
        memory; callers close either kind the same way)."""
        for session_id in list(self._sessions.lengths()):
            self._sessions.drop(session_id)

    def drop(self, session_id: str) -> None:
        """Forget a session's cache (no-op when unknown)."""
        self._sessions.drop(session_id)

    # -- model ------------------------------------------------------------------------------

    def _forward(self, session: KVSession, ids: Sequence[int]) -> torch.Tensor:
        """Feed ``ids`` on top of the session cache; return the last position's logits ``[V]``."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self._device)
        start = len(session.ids)
        position_ids = torch.arange(start, start + len(ids), device=self._device).unsqueeze(0)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=session.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        session.ids.extend(int(t) for t in ids)
        return out.logits[0, -1]

    @torch.inference_mode()
    def prefill(self, session_id: str, ids: Sequence[int]) -> float:
        """Cache ``ids`` for a session ahead of its first draft (the background prefill after a
        draft-less prefill round); the next ``draft`` then feeds only what was committed since.
        Returns the ms it took."""
        start = time.perf_counter()
        if not ids:
            return 0.0
        session = self._sessions.session(session_id)
        keep = common_prefix_len(session.ids, ids)
        if keep == len(ids):
            return _ms(start)
        self._sessions.rewind(session, keep)
        try:
            self._forward(session, list(ids[keep:]))
        except BaseException:
            self.drop(session_id)
            raise
        return _ms(start)

    @torch.inference_mode()
    def draft(
        self,
        session_id: str,
        committed: Sequence[int],
        max_k: int,
        temperature: float,
        top_k: int,
        generator: torch.Generator | None,
        stop: StopFn | None = None,
    ) -> DraftOutput:
        """Draft up to ``max_k`` tokens after ``committed``.

        Stop semantics: before drafting token ``i`` the engine computes the features of the
        distribution token ``i`` would be drawn from and calls ``stop(i, features)``; ``True``
        ends the round *without* token ``i`` (so ``stop(0, ...) -> True`` yields an empty draft,
        i.e. a plain target decode step).  The callback never sees the sampled token, only the
        distribution, so its decision cannot bias the draft distribution ``q``; and no sample is
        drawn for a token that is not sent.

        Cache: the common prefix of the cached ids and ``committed`` is kept (capped so that the
        last committed token is always fed, as its logits are needed), the rest is cropped, and all
        uncached committed ids are fed in one forward (the prefill of a new session).  Drafted
        tokens stay in the cache; the next round's common-prefix check rolls back rejected ones.
        ``max_k == 0`` runs no forward and leaves the cache untouched.
        """
        start = time.perf_counter()
        call = DraftCall(session_id, committed, max_k, temperature, top_k, generator, stop)
        _check(call)
        if max_k == 0:
            return _empty(call, start)
        session = self._sessions.session(session_id)
        prefill = self._reuse(session, committed)
        out = _empty(call, start, prefill_tokens=len(prefill))
        try:
            logits = self._forward(session, prefill)
            for i in range(max_k):
                out.forward_passes += 1
                token = _next_token(out, call, i, token_features(logits), logits)
                if token is None:
                    break
                if i + 1 < max_k:
                    logits = self._forward(session, [token])
        except BaseException:
            # A forward that failed half-way may have grown some layers and not others: the
            # cache no longer matches ``session.ids``, so forget it rather than risk reuse.
            self.drop(session_id)
            raise
        out.draft_ms = _ms(start)
        return out

    def _reuse(self, session: KVSession, committed: Sequence[int]) -> list[int]:
        """Rewind the session to what ``committed`` can reuse; returns the ids still to feed."""
        return [int(t) for t in committed[self._sessions.reuse(session, committed):]]

    @torch.inference_mode()
    def draft_many(
        self,
        calls: Sequence[DraftCall],
        pad_token_id: int = 0,
        on_done: Callable[[int, DraftOutput], None] | None = None,
    ) -> list[DraftOutput]:
        """Draft the rounds of several sessions together: one batched forward per token step.

        Why: a drafter that hosts several sessions (an edge box serving several users, or the
        benchmark's simulated devices) would otherwise draft them one after another, so each
        session waited for every other session's drafting, which separate devices never do.  A
        batched step of a small model costs about as much as a single-row step, so every
        session's round is ready after roughly the time one device alone would take.

        Each call gets exactly what :meth:`draft` would give it (same stop semantics, same cache
        state afterwards; tokens equal up to float rounding of different matmul shapes).  A row
        leaves the batch as soon as it stops; its ``draft_ms`` is the wall time until then, and
        ``on_done(index, output)`` (called on this thread) hands it over at once, so a short
        round is sent without waiting for the batch's longest one.
        """
        start = time.perf_counter()
        if len({c.session_id for c in calls}) != len(calls):
            raise ValueError("a session appears twice in one draft_many call")
        for call in calls:
            _check(call)
        outputs: list[DraftOutput | None] = [None] * len(calls)

        def done(i: int, out: DraftOutput) -> None:
            outputs[i] = out
            if on_done is not None:
                on_done(i, out)

        todo = [i for i, c in enumerate(calls) if c.max_k > 0]
        for i, call in enumerate(calls):
            if call.max_k == 0:
                done(i, _empty(call, start))
        if len(todo) == 1:  # nothing to batch: the single-session path, no padding
            c = calls[todo[0]]
            done(todo[0], self.draft(c.session_id, c.committed, c.max_k, c.temperature, c.top_k,
                                     c.generator, c.stop))
        elif todo:
            rows = []
            for i in todo:
                session = self._sessions.session(calls[i].session_id)
                prefill = self._reuse(session, calls[i].committed)
                out = _empty(calls[i], start, prefill_tokens=len(prefill))
                rows.append(_Row(i, calls[i], session, out, cols=[], fed=prefill))
            try:
                self._draft_batch(rows, pad_token_id, start, done)
            except BaseException:
                for row in rows:  # caches may be half-grown: forget them (see ``draft``)
                    self.drop(row.call.session_id)
                raise
        return [o for o in outputs if o is not None]

    def _draft_batch(self, rows: list[_Row], pad_token_id: int, start: float,
                     done: Callable[[int, DraftOutput], None]) -> None:
        dev = self._device
        input_ids, mask, positions, cache, max_past = padded_batch(
            [(r.session.cache, len(r.session.ids), r.fed) for r in rows], pad_token_id, dev)
        for r in rows:
            r.cols = list(range(max_past, max_past + len(r.fed)))
        last = torch.tensor([[len(r.fed) - 1] for r in rows], device=dev)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=last).logits[:, -1]
        active = rows  # the batch's rows, in the order of its dimension 0
        while True:
            feats = batch_token_features(logits)
            feed: list[int | None] = []
            for j, row in enumerate(active):
                row.out.forward_passes += 1
                i = len(row.out.tokens)
                token = _next_token(row.out, row.call, i, feats[j], logits[j])
                feed.append(token if token is not None and i + 1 < row.call.max_k else None)
            for j, row in enumerate(active):
                if feed[j] is None:  # this row is done: its KV goes back to its session
                    self._store(row, cache, j)
                    row.out.draft_ms = _ms(start)
                    done(row.index, row.out)
            keep = [j for j, t in enumerate(feed) if t is not None]
            if not keep:
                return
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=dev)
                cache = DynamicCache(ddp_cache_data=[
                    (layer.keys.index_select(0, sel), layer.values.index_select(0, sel))
                    for layer in cache.layers])
                mask = mask.index_select(0, sel)
                active = [active[j] for j in keep]
            tokens = [feed[j] for j in keep]
            col = mask.shape[1]  # the cache column this step's tokens go to
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], 1)
            ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=dev)
            # a row's next position: its cached ids plus everything fed in this call
            pos = torch.tensor([[len(r.session.ids) + len(r.fed)] for r in active], device=dev)
            for row, t in zip(active, tokens, strict=True):
                row.cols.append(col)
                row.fed.append(int(t))  # type: ignore[arg-type]
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def _store(self, row: _Row, cache: DynamicCache, b: int) -> None:
        """Append row ``b``'s real new KV columns of the batched ``cache`` to its session."""
        row.session.extend(cache, b, torch.tensor(row.cols, device=self._device), row.fed)


@dataclass
class _Row:
    """A session being drafted inside ``draft_many``."""

    index: int
    call: DraftCall
    session: KVSession
    out: DraftOutput
    cols: list[int]
    """Cache columns of the batched forward that hold this row's real new KV."""
    fed: list[int]
    """The ids those columns hold (uncached committed ids, then fed drafted tokens)."""


def _check(call: DraftCall) -> None:
    if not call.committed:
        raise ValueError("committed must hold at least one token")
    if call.max_k < 0:
        raise ValueError("max_k must be >= 0")


def _empty(call: DraftCall, start: float, prefill_tokens: int = 0) -> DraftOutput:
    """A round's output before its first token (``dists`` is a list only when sampling)."""
    return DraftOutput([], [] if call.temperature > 0 else None, [], _ms(start),
                       forward_passes=0, prefill_tokens=prefill_tokens)


def _next_token(out: DraftOutput, call: DraftCall, i: int, feats: TokenFeatures,
                logits: torch.Tensor) -> int | None:
    """Token ``i`` of a round, drawn from ``logits`` and recorded in ``out``; None when the
    stop rule ends the round before it (also recorded). The one per-token step of ``draft``
    and ``draft_many``."""
    if call.stop is not None and call.stop(i, feats):
        out.stopped, out.stop_features = True, feats
        return None
    token, dist = sample_draft(logits, call.temperature, call.top_k, call.generator)
    out.tokens.append(token)
    out.features.append(feats)
    if out.dists is not None:
        assert dist is not None
        out.dists.append(dist)
    return token


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
