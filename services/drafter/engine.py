"""The edge drafter's model runner: one draft model, one KV cache per session.

A round sends the *committed* ids (prompt + every verified token so far).  The engine keeps, per
session, a ``DynamicCache`` and the exact ids whose KV it holds, so it can reuse the longest common
prefix and roll back whatever the verifier rejected; no protocol-level bookkeeping of "what was
accepted" is needed here, the committed ids say it all.  This module is pure torch/transformers: no
I/O, no asyncio.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from wisp.specdec import SparseDist, TokenFeatures, batch_token_features, sample_draft, token_features

__all__ = ["DraftCall", "DraftEngine", "DraftOutput", "StopFn", "common_prefix_len", "padded_batch"]

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


@dataclass
class _Session:
    cache: DynamicCache
    ids: list[int]


def padded_batch(
    rows: Sequence[tuple[DynamicCache, int, Sequence[int]]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache, int]:
    """One batched forward's inputs for rows ``(cache, past, new_ids)`` of different lengths:
    ``(input_ids, attention_mask, position_ids, past, max_past)``.

    The past KV is left-padded to ``max_past`` (so every row's new tokens sit at the same cache
    index), the new ids right-padded to the longest row; the 2-D mask hides both paddings and
    ``position_ids`` carries each row's true positions.  The verifier's module docstring gives
    the scheme and why it is exact; the drafter's batched drafting uses the same one."""
    batch = len(rows)
    max_past = max(past for _, past, _ in rows)
    max_new = max(len(new) for _, _, new in rows)
    input_ids = torch.full((batch, max_new), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, max_past + max_new), dtype=torch.long, device=device)
    positions = torch.empty((batch, max_new), dtype=torch.long, device=device)
    for b, (_, past_len, new) in enumerate(rows):
        n = len(new)
        input_ids[b, :n] = torch.tensor(list(new), dtype=torch.long, device=device)
        mask[b, max_past - past_len : max_past + n] = 1
        positions[b] = torch.arange(past_len, past_len + max_new, device=device)
    past = DynamicCache()
    if max_past > 0:
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        ref = next(cache for cache, past_len, _ in rows if past_len > 0)
        for idx, ref_layer in enumerate(ref.layers):
            _, heads, _, dim = ref_layer.keys.shape
            keys = ref_layer.keys.new_zeros((batch, heads, max_past, dim))
            values = ref_layer.values.new_zeros((batch, heads, max_past, ref_layer.values.shape[-1]))
            for b, (cache, past_len, _) in enumerate(rows):
                if past_len > 0:
                    layer = cache.layers[idx]
                    keys[b, :, max_past - past_len :] = layer.keys[0]
                    values[b, :, max_past - past_len :] = layer.values[0]
            layers.append((keys, values))
        past = DynamicCache(ddp_cache_data=layers)
    return input_ids, mask, positions, past, max_past


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Shrink ``cache`` to its first ``length`` positions (in place).

    transformers 5 changed ``DynamicCache.crop``: its argument is now the *number of tokens to
    remove*, given as a non-positive integer (a positive one raises).  This helper keeps the
    "target length" semantics every caller here actually wants.
    """
    current = cache.get_seq_length()
    if length < 0 or length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)


def _new_cache(model: PreTrainedModel) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    if not cache.is_croppable:
        # Sliding-window / linear-attention layers cannot be rolled back exactly, which would
        # silently break losslessness.
        raise NotImplementedError("the draft model's cache layers cannot be rolled back exactly")
    return cache


class DraftEngine:
    """Runs a draft model for many sessions, reusing each session's KV cache across rounds.

    Sessions live in an LRU bounded by ``max_sessions``; an evicted (or unknown) session simply
    costs a prefill of its committed ids on its next round, so eviction never changes results.
    """

    def __init__(self, model: PreTrainedModel, max_sessions: int = 64) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        model.eval()
        model.requires_grad_(False)
        _new_cache(model)  # fail fast on an uncroppable architecture
        self.model = model
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._device = next(model.parameters()).device

    # -- session bookkeeping ------------------------------------------------------------------

    def sessions(self) -> dict[str, int]:
        """Session id -> number of cached positions, least recently used first."""
        return {sid: len(s.ids) for sid, s in self._sessions.items()}

    def drop(self, session_id: str) -> None:
        """Forget a session's cache (no-op when unknown)."""
        self._sessions.pop(session_id, None)

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
            session = _Session(cache=_new_cache(self.model), ids=[])
            self._sessions[session_id] = session
        self._sessions.move_to_end(session_id)
        return session

    # -- model ------------------------------------------------------------------------------

    def _rewind(self, session: _Session, keep: int) -> None:
        """Cut the session's cache and ids back to their first ``keep`` positions."""
        if keep == 0:
            session.cache = _new_cache(self.model)
        else:
            _crop_to(session.cache, keep)
        del session.ids[keep:]

    def _forward(self, session: _Session, ids: Sequence[int]) -> torch.Tensor:
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
        session = self._session(session_id)
        keep = common_prefix_len(session.ids, ids)
        if keep == len(ids):
            return _ms(start)
        self._rewind(session, keep)
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
        if not committed:
            raise ValueError("committed must hold at least one token")
        if max_k < 0:
            raise ValueError("max_k must be >= 0")
        sampling = temperature > 0
        tokens: list[int] = []
        dists: list[SparseDist] | None = [] if sampling else None
        features: list[TokenFeatures] = []
        if max_k == 0:
            return DraftOutput(tokens, dists, features, _ms(start), forward_passes=0)

        session = self._session(session_id)
        keep = min(common_prefix_len(session.ids, committed), len(committed) - 1)
        self._rewind(session, keep)
        prefill = list(committed[keep:])
        passes = 0
        stopped = False
        stop_features: TokenFeatures | None = None
        try:
            logits = self._forward(session, prefill)
            passes += 1
            for i in range(max_k):
                feats = token_features(logits)
                if stop is not None and stop(i, feats):
                    stopped, stop_features = True, feats
                    break
                token, dist = sample_draft(logits, temperature, top_k, generator)
                tokens.append(token)
                features.append(feats)
                if dists is not None:
                    assert dist is not None
                    dists.append(dist)
                if i + 1 < max_k:
                    logits = self._forward(session, [token])
                    passes += 1
        except BaseException:
            # A forward that failed half-way may have grown some layers and not others: the
            # cache no longer matches ``session.ids``, so forget it rather than risk reuse.
            self.drop(session_id)
            raise
        return DraftOutput(
            tokens=tokens,
            dists=dists,
            features=features,
            draft_ms=_ms(start),
            forward_passes=passes,
            stopped=stopped,
            stop_features=stop_features,
            prefill_tokens=len(prefill),
        )

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
        outputs: list[DraftOutput | None] = [None] * len(calls)
        todo: list[_Row] = []
        for i, call in enumerate(calls):
            if not call.committed:
                raise ValueError("committed must hold at least one token")
            if call.max_k < 0:
                raise ValueError("max_k must be >= 0")
            if call.max_k == 0:
                dists: list[SparseDist] | None = [] if call.temperature > 0 else None
                outputs[i] = DraftOutput([], dists, [], _ms(start), forward_passes=0)
                if on_done is not None:
                    on_done(i, outputs[i])
                continue
            session = self._session(call.session_id)
            keep = min(common_prefix_len(session.ids, call.committed), len(call.committed) - 1)
            self._rewind(session, keep)
            prefill = [int(t) for t in call.committed[keep:]]
            out = DraftOutput([], [] if call.temperature > 0 else None, [], 0.0,
                              forward_passes=0, prefill_tokens=len(prefill))
            todo.append(_Row(i, call, session, out, cols=[], fed=prefill))
        if len(todo) == 1:  # nothing to batch: the single-session path, no padding
            row = todo[0]
            c = row.call
            outputs[row.index] = self.draft(c.session_id, c.committed, c.max_k, c.temperature,
                                            c.top_k, c.generator, c.stop)
            if on_done is not None:
                on_done(row.index, outputs[row.index])
        elif todo:
            try:
                self._draft_batch(todo, pad_token_id, start, on_done)
            except BaseException:
                for row in todo:  # caches may be half-grown: forget them (see ``draft``)
                    self.drop(row.call.session_id)
                raise
            for row in todo:
                outputs[row.index] = row.out
        return [o for o in outputs if o is not None]

    def _draft_batch(self, rows: list[_Row], pad_token_id: int, start: float,
                     on_done: Callable[[int, DraftOutput], None] | None) -> None:
        dev = self._device
        input_ids, mask, positions, past, max_past = padded_batch(
            [(r.session.cache, len(r.session.ids), r.fed) for r in rows], pad_token_id, dev)
        width = input_ids.shape[1]
        for r in rows:
            r.cols = list(range(max_past, max_past + len(r.fed)))
        last = torch.tensor([[len(r.fed) - 1] for r in rows], device=dev)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=past, use_cache=True, logits_to_keep=last).logits[:, -1]
        cache = past
        next_pos = [len(r.session.ids) + len(r.fed) for r in rows]
        active = list(range(len(rows)))  # indices into ``rows`` of the batch's rows, in order
        while active:
            feed: dict[int, int] = {}
            step_feats = batch_token_features(logits)
            for j, ri in enumerate(active):
                row = rows[ri]
                row.out.forward_passes += 1
                i = len(row.out.tokens)
                feats = step_feats[j]
                if row.call.stop is not None and row.call.stop(i, feats):
                    row.out.stopped, row.out.stop_features = True, feats
                    continue
                token, dist = sample_draft(logits[j], row.call.temperature, row.call.top_k,
                                           row.call.generator)
                row.out.tokens.append(token)
                row.out.features.append(feats)
                if row.out.dists is not None:
                    assert dist is not None
                    row.out.dists.append(dist)
                if i + 1 < row.call.max_k:
                    feed[ri] = token
            for ri in active:
                if ri not in feed:  # this row is done: its KV goes back to its session
                    self._store(rows[ri], cache, active.index(ri))
                    rows[ri].out.draft_ms = _ms(start)
                    if on_done is not None:
                        on_done(rows[ri].index, rows[ri].out)
            if not feed:
                break
            keep_rows = [j for j, ri in enumerate(active) if ri in feed]
            if len(keep_rows) < len(active):
                sel = torch.tensor(keep_rows, device=dev)
                cache = DynamicCache(ddp_cache_data=[
                    (layer.keys.index_select(0, sel), layer.values.index_select(0, sel))
                    for layer in cache.layers])
                mask = mask.index_select(0, sel)
                active = [active[j] for j in keep_rows]
            col = width + max_past
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=dev)], 1)
            ids = torch.tensor([[feed[ri]] for ri in active], dtype=torch.long, device=dev)
            pos = torch.tensor([[next_pos[ri]] for ri in active], dtype=torch.long, device=dev)
            for ri in active:
                rows[ri].cols.append(col)
                rows[ri].fed.append(feed[ri])
                next_pos[ri] += 1
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            width += 1

    def _store(self, row: _Row, cache: DynamicCache, b: int) -> None:
        """Append row ``b``'s real new KV columns of the batched ``cache`` to its session."""
        cols = torch.tensor(row.cols, device=self._device)
        for idx, layer in enumerate(cache.layers):
            row.session.cache.update(layer.keys[b : b + 1].index_select(2, cols),
                                     layer.values[b : b + 1].index_select(2, cols), idx)
        row.session.ids.extend(row.fed)


@dataclass
class _Row:
    """A session being drafted inside ``draft_many``."""

    index: int
    call: DraftCall
    session: _Session
    out: DraftOutput
    cols: list[int]
    """Cache columns of the batched forward that hold this row's real new KV."""
    fed: list[int]
    """The ids those columns hold (uncached committed ids, then fed drafted tokens)."""


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
