"""KV-cache helpers shared by the draft and verifier engines.

Both engines keep one ``DynamicCache`` per session together with the exact ids whose KV it holds,
reuse the longest common prefix of those ids and a round's committed ids, roll back the rest, and
batch several sessions into one forward with the same padding scheme.  That logic lives here, once,
so the two engines cannot drift apart (a drifted rollback or padding rule would silently break
losslessness on one side only).  Pure torch/transformers: no I/O, no asyncio, nothing from
``services/``.

Padding scheme of a batched forward (row ``r``: ``P_r`` cached positions, ``L_r`` new ids;
``P = max P_r``, ``L = max L_r``)::

    past KV   [ 0 ... 0 | k_0 ... k_{P_r-1} ]     left-padded to P  (zeros, masked out)
    input ids                 [ x_0 ... x_{L_r-1} | pad ... pad ]   right-padded to L
    attention_mask [ 0 x (P-P_r) | 1 x P_r | 1 x L_r | 0 x (L-L_r) ]   shape (B, P + L)
    position_ids             [ P_r ... P_r+L_r-1 | P_r+L_r ... ]   true positions, per row

Left-padding the past puts every row's new ids at the same cache index ``P``, which is what the
cache/mask code assumes (one ``q_offset`` for the whole batch); right-padding the new ids keeps the
padding *after* every real query, so causality alone hides it from real tokens, and the 2-D mask
hides it from the left.  RoPE only sees ``position_ids``, so a row's padding does not shift its
positions.  No real query is ever fully masked (it sees itself), and pad queries always see at
least one real key, so no NaN can appear and leak into the KV.  Only a row's real columns are
copied back into its session cache (:meth:`KVSession.extend`).  Which attention implementations
make this exact is the verifier engine's concern (it refuses the others).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache, PreTrainedConfig

from wisp.prefix import reusable

__all__ = [
    "KVSession",
    "PaddedBatch",
    "SessionCache",
    "crop_to",
    "new_cache",
    "padded_batch",
]


def crop_to(cache: DynamicCache, length: int) -> None:
    """Shrink ``cache`` to its first ``length`` positions (in place).

    transformers 5 changed ``DynamicCache.crop``: its argument is now the *number of tokens to
    remove*, given as a non-positive integer (a positive one raises).  This helper keeps the
    "target length" semantics every caller here actually wants, and refuses a length the cache
    cannot be cropped to rather than guessing.
    """
    current = cache.get_seq_length()
    if length < 0 or length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        cache.crop(length - current)


def new_cache(config: PreTrainedConfig) -> DynamicCache:
    """An empty cache for a model with ``config``, refused when it cannot be rolled back exactly.

    Sliding-window-only or linear-attention (recurrent) layers cannot be cropped back to an
    earlier position; caching them would silently break losslessness on the first rejection.
    """
    cache = DynamicCache(config=config)
    if not cache.is_croppable:
        raise NotImplementedError(
            f"the cache layers of a {config.model_type!r} model cannot be rolled back exactly"
        )
    return cache


class PaddedBatch(NamedTuple):
    """One batched forward's inputs (see the module docstring); unpacks as a 5-tuple."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    past: DynamicCache
    max_past: int
    """Cache column where every row's first new id sits."""


def padded_batch(
    rows: Sequence[tuple[DynamicCache, int, Sequence[int]]], pad_token_id: int, device: torch.device
) -> PaddedBatch:
    """One batched forward's inputs for rows ``(cache, past, new_ids)`` of different lengths.

    ``cache`` is the row's batch-1 session cache holding ``past`` positions (it is only read; the
    batch gets its own left-padded copy, so a failed forward leaves the sessions intact).  The
    past KV is left-padded to ``max_past``, the new ids right-padded to the longest row; the 2-D
    mask hides both paddings and ``position_ids`` carries each row's true positions.
    """
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
    return PaddedBatch(input_ids, mask, positions, past, max_past)


@dataclass
class KVSession:
    """One session's batch-1 KV cache and the exact ids whose KV it holds (``len(ids)`` positions).

    Keeping the ids, not a count, is what lets a round's committed ids decide what to reuse: no
    protocol-level bookkeeping of "what was accepted" is needed.
    """

    cache: DynamicCache
    ids: list[int]

    def extend(
        self, batch: DynamicCache, row: int, cols: slice | torch.Tensor, ids: Sequence[int]
    ) -> None:
        """Append row ``row``'s KV at cache columns ``cols`` of a batched forward's cache, which
        hold ``ids``: how a row's real positions (and none of its padding) come back to its
        session after a :func:`padded_batch` forward."""
        for idx, layer in enumerate(batch.layers):
            self.cache.update(layer.keys[row : row + 1, :, cols], layer.values[row : row + 1, :, cols], idx)
        self.ids.extend(int(t) for t in ids)


class SessionCache:
    """Per-session KV caches in an LRU bounded by ``max_sessions``, with prefix reuse and rollback.

    Eviction never changes results: an evicted (or unknown) session simply starts empty and costs a
    recompute of its committed ids on its next round.  Both engines hold one of these.
    """

    def __init__(self, config: PreTrainedConfig, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        new_cache(config)  # fail fast on an architecture whose cache cannot be rolled back
        self.config = config
        self.max_sessions = max_sessions
        self._table: OrderedDict[str, KVSession] = OrderedDict()

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._table

    def __getitem__(self, session_id: str) -> KVSession:
        """A known session's entry, without marking it used (``KeyError`` when unknown)."""
        return self._table[session_id]

    def __len__(self) -> int:
        return len(self._table)

    def lengths(self) -> dict[str, int]:
        """Session id -> number of cached positions, least recently used first."""
        return {sid: len(s.ids) for sid, s in self._table.items()}

    def session(self, session_id: str) -> KVSession:
        """The session's entry, created empty when unknown (evicting the least recently used
        sessions to make room), and now the most recently used."""
        entry = self._table.get(session_id)
        if entry is None:
            while len(self._table) >= self.max_sessions:
                self._table.popitem(last=False)
            entry = KVSession(cache=new_cache(self.config), ids=[])
            self._table[session_id] = entry
        self._table.move_to_end(session_id)
        return entry

    def drop(self, session_id: str) -> None:
        """Forget a session's cache (no-op when unknown): after a failed forward its cache may no
        longer match its ids, and a forgotten session only costs a recompute."""
        self._table.pop(session_id, None)

    def clone(self, src: str, dst: str) -> bool:
        """Make ``dst`` a copy of ``src`` (cache and ids); False when ``src`` is unknown.

        For the verifier profiler: the KV *values* do not change a forward's timing, only its
        length does, so one real prefill can serve every row.  ``src`` ends most recently used,
        out of eviction's way."""
        if src not in self._table:
            return False
        source = self._table[src]
        target = self.session(dst)
        target.cache, target.ids = copy.deepcopy(source.cache), list(source.ids)
        if src in self._table:  # (evicted only when max_sessions == 1)
            self._table.move_to_end(src)
        return True

    def rewind(self, entry: KVSession, keep: int) -> None:
        """Cut a session's cache and ids back to their first ``keep`` positions."""
        if keep == 0:
            entry.cache = new_cache(self.config)
        else:
            crop_to(entry.cache, keep)
        del entry.ids[keep:]

    def reuse(self, entry: KVSession, committed: Sequence[int]) -> int:
        """Rewind a session to what ``committed`` can reuse and return that length.

        The common prefix of the cached ids and ``committed`` is kept, capped so that the last
        committed id is always fed again: its logits are the ones that predict the next token.
        The ids still to feed are ``committed[returned:]``.
        """
        keep = reusable(entry.ids, committed)
        self.rewind(entry, keep)
        return keep

    def reusable_of(self, session_id: str, committed: Sequence[int]) -> int:
        """What ``reuse`` would keep for ``session_id`` (0 for an unknown one), without
        rewinding anything or touching the LRU order."""
        entry = self._table.get(session_id)
        return 0 if entry is None else reusable(entry.ids, committed)
