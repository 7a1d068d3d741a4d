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
from wisp.specdec import SparseDist, TokenFeatures, sample_draft, token_features

__all__ = ["DraftEngine", "DraftOutput", "StopFn", "common_prefix_len"]

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
class _Session:
    cache: DynamicCache
    ids: list[int]


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


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
