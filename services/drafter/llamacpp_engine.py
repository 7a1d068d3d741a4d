"""The edge drafter's llama.cpp runner: the packaged GGUF draft model, as edge devices run it.

Same interface and semantics as the torch :class:`~wisp.services.drafter.engine.DraftEngine`
(``sessions``, ``drop``, ``prefill``, ``draft``, ``draft_many``, the same ``DraftOutput``), so the
drafter service does not know which one it holds. Why it exists: the packaged weights are Q4
GGUF; torch has to dequantise them to fp32 and drafts the 0.5B at about 141 ms per token on this
CPU, llama.cpp runs the GGUF as shipped at about 59 ms (issue 13), and a real edge device would
run llama.cpp anyway.

KV cache: one llama.cpp context whose unified KV cache (``kv_tokens`` cells) is shared by up to
``max_sessions`` sequences, one sequence id per session, recycled least-recently-used. Each
session remembers the ids whose KV its sequence holds; a round keeps the common prefix with its
committed ids (capped so the last committed id is always fed: its logits are needed) and removes
the sequence's positions past it (``llama_memory_seq_rm``) — that is the roll-back after a
verdict. When the cache has no room the least recently used other sessions are evicted (their
next round re-prefills; results never change).

Batching: :meth:`draft_many` decodes every session's uncached committed ids together, then one
token per still-drafting session per step, all in one ``llama_batch`` with per-token sequence
ids; no padding is needed, so a row gives what drafting it alone gives.

The controller's features and the sampling are the shared functions of ``wisp.specdec`` applied
to a zero-copy torch view of llama.cpp's logits (vectorised over the vocabulary and the batch,
no Python loop over tokens): the controller then reads exactly the features it was trained on,
and the sparse ``q`` is built exactly as the torch drafter builds it (top-k, float64), with the
request's seeded ``torch.Generator``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from wisp.cpus import parse_cpus
from wisp.prefix import common_prefix_len
from wisp.services.drafter.engine import DraftCall, DraftOutput, StopFn, _check, _empty, _ms, _next_token
from wisp.services.drafter.llamacpp_binding import KVFullError, LlamaCppError, LlamaModel
from wisp.settings import Settings
from wisp.specdec import batch_token_features

__all__ = ["LlamaCppDraftEngine", "VocabMismatchError", "check_vocab", "draft_backend",
           "make_draft_engine"]

VOCAB_SAMPLE_TEXT = (
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "Explain KV caches in two sentences. Größe, naïve café — 你好，世界! 🙂 x += 0x1F; // done"
)
"""Code, prose, accents, CJK and an emoji: text whose tokenization differs between vocabularies."""


class VocabMismatchError(LlamaCppError):
    """The draft GGUF's token ids do not mean what the target tokenizer's ids mean."""


@dataclass
class _Seq:
    """A session's llama.cpp sequence and the ids whose KV it holds (positions 0..len-1)."""

    seq_id: int
    ids: list[int] = field(default_factory=list)


@dataclass
class _Row:
    """A session being drafted inside ``draft_many``."""

    index: int
    call: DraftCall
    seq: _Seq
    out: DraftOutput
    fed: list[int]


class LlamaCppDraftEngine:
    """Drafts with a GGUF model through llama.cpp for many sessions (see the module doc)."""

    def __init__(self, gguf: str | Path, max_sessions: int = 64, kv_tokens: int = 16384,
                 n_threads: int = 0, n_batch: int = 512) -> None:
        threads = n_threads or torch.get_num_threads() or os.cpu_count() or 1
        self.model = LlamaModel(gguf, n_ctx=kv_tokens, n_seq=max_sessions, n_threads=threads,
                                n_batch=n_batch)
        self.max_sessions = self.model.n_seq
        self._sessions: OrderedDict[str, _Seq] = OrderedDict()
        self._free = list(range(self.max_sessions - 1, -1, -1))  # pop() hands out 0 first

    # -- session bookkeeping ------------------------------------------------------------------
    def sessions(self) -> dict[str, int]:
        """Session id -> number of cached positions, least recently used first."""
        return {sid: len(s.ids) for sid, s in self._sessions.items()}

    def drop(self, session_id: str) -> None:
        """Forget a session's cache and free its sequence (no-op when unknown)."""
        seq = self._sessions.pop(session_id, None)
        if seq is not None:
            self.model.seq_rm(seq.seq_id, 0)
            self._free.append(seq.seq_id)

    def close(self) -> None:
        """Free llama.cpp's memory now rather than at garbage collection."""
        self._sessions.clear()
        self.model.close()

    def _session(self, session_id: str, busy: set[str]) -> _Seq:
        """The session's sequence (most recently used now); a new one takes a free sequence id,
        evicting the least recently used session outside ``busy`` when none is free."""
        seq = self._sessions.get(session_id)
        if seq is not None:
            self._sessions.move_to_end(session_id)
            return seq
        if not self._free and not self._evict_one(busy):
            raise LlamaCppError(f"more than {self.max_sessions} sessions in one draft call")
        seq = _Seq(self._free.pop())
        self._sessions[session_id] = seq
        return seq

    def _evict_one(self, busy: set[str]) -> bool:
        for sid in self._sessions:
            if sid not in busy:
                self.drop(sid)
                return True
        return False

    def _rewind(self, seq: _Seq, keep: int) -> None:
        """Cut the sequence back to its first ``keep`` positions."""
        if keep < len(seq.ids):
            if not self.model.seq_rm(seq.seq_id, keep):  # memory that cannot cut part-way
                self.model.seq_rm(seq.seq_id, 0)
                keep = 0
            del seq.ids[keep:]

    # -- decoding -------------------------------------------------------------------------------
    def _decode(self, feeds: Sequence[tuple[_Seq, Sequence[int]]], busy: set[str]) -> np.ndarray:
        """Feed each sequence its ids after its cached ones; the logits after each feed's last id
        (``[len(feeds), V]``). Splits into ``n_batch``-sized decodes and evicts other sessions
        when the KV cache is full."""
        entries = [(int(t), len(seq.ids) + j, seq.seq_id, j == len(ids) - 1)
                   for seq, ids in feeds for j, t in enumerate(ids)]
        parts = []
        for lo in range(0, len(entries), self.model.n_batch):
            chunk = entries[lo:lo + self.model.n_batch]
            while True:
                try:
                    parts.append(self.model.decode(chunk))
                    break
                except KVFullError:
                    if not self._evict_one(busy):
                        raise LlamaCppError(
                            f"the draft KV cache ({self.model.n_ctx} tokens) cannot hold these "
                            f"{len(feeds)} session(s); raise kv_tokens") from None
        for seq, ids in feeds:
            seq.ids.extend(int(t) for t in ids)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def prefill(self, session_id: str, ids: Sequence[int]) -> float:
        """Cache ``ids`` for a session ahead of its first draft (see ``DraftEngine.prefill``).
        Returns the ms it took."""
        start = time.perf_counter()
        if not ids:
            return 0.0
        seq = self._session(session_id, {session_id})
        keep = common_prefix_len(seq.ids, ids)
        if keep == len(ids):
            return _ms(start)
        self._rewind(seq, keep)
        try:
            self._decode([(seq, list(ids[len(seq.ids):]))], {session_id})
        except BaseException:
            self.drop(session_id)
            raise
        return _ms(start)

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
        """Draft up to ``max_k`` tokens after ``committed``; the semantics of
        ``DraftEngine.draft`` (stop rule before each token, cache reuse and roll-back)."""
        call = DraftCall(session_id, committed, max_k, temperature, top_k, generator, stop)
        return self.draft_many([call])[0]

    def draft_many(
        self,
        calls: Sequence[DraftCall],
        pad_token_id: int = 0,
        on_done: Callable[[int, DraftOutput], None] | None = None,
    ) -> list[DraftOutput]:
        """Draft the rounds of several sessions together: one ``llama_batch`` per token step.

        Each call gets what :meth:`draft` alone would give it; a row leaves the batch when it
        stops and ``on_done(index, output)`` hands it over at once (see
        ``DraftEngine.draft_many``). ``pad_token_id`` is unused: llama.cpp batches need no
        padding (each token carries its own sequence id and position).
        """
        del pad_token_id
        start = time.perf_counter()
        if len({c.session_id for c in calls}) != len(calls):
            raise ValueError("a session appears twice in one draft_many call")
        for call in calls:
            _check(call)
        if len(calls) > self.max_sessions:
            raise ValueError(f"{len(calls)} sessions in one call; this engine holds {self.max_sessions}")
        outputs: list[DraftOutput | None] = [None] * len(calls)

        def done(i: int, out: DraftOutput) -> None:
            outputs[i] = out
            if on_done is not None:
                on_done(i, out)

        busy = {c.session_id for c in calls if c.max_k > 0}
        rows: list[_Row] = []
        for i, call in enumerate(calls):
            if call.max_k == 0:
                done(i, _empty(call, start))
                continue
            seq = self._session(call.session_id, busy)
            keep = min(common_prefix_len(seq.ids, call.committed), len(call.committed) - 1)
            self._rewind(seq, keep)
            fed = [int(t) for t in call.committed[len(seq.ids):]]
            rows.append(_Row(i, call, seq, _empty(call, start, prefill_tokens=len(fed)), fed))
        if rows:
            try:
                self._draft_rows(rows, busy, start, done)
            except BaseException:
                for row in rows:  # a failed decode may have left KV the bookkeeping lacks
                    self.drop(row.call.session_id)
                raise
        return [o for o in outputs if o is not None]

    def _draft_rows(self, rows: list[_Row], busy: set[str], start: float,
                    done: Callable[[int, DraftOutput], None]) -> None:
        logits = self._decode([(r.seq, r.fed) for r in rows], busy)
        active = rows
        while True:
            view = torch.from_numpy(logits)
            feats = batch_token_features(view)
            feed: list[int | None] = []
            for j, row in enumerate(active):
                row.out.forward_passes += 1
                i = len(row.out.tokens)
                token = _next_token(row.out, row.call, i, feats[j], view[j])
                feed.append(token if token is not None and i + 1 < row.call.max_k else None)
            for j, row in enumerate(active):
                if feed[j] is None:
                    row.out.draft_ms = _ms(start)
                    done(row.index, row.out)
            nxt = [(row, [t]) for row, t in zip(active, feed, strict=True) if t is not None]
            if not nxt:
                return
            active = [row for row, _ in nxt]
            logits = self._decode([(row.seq, ids) for row, ids in nxt], busy)


# ------------------------------------------------------------------------------ start-up checks
def check_vocab(model: LlamaModel, tokenizer: Any, prompt: str = VOCAB_SAMPLE_TEXT,
                samples: int = 512) -> None:
    """Refuse a draft GGUF whose ids do not mean the target tokenizer's ids.

    The drafter encodes prompts with the target's tokenizer and both models exchange raw ids, so
    a draft model with another vocabulary would draft garbage (lossless still, since the target
    decides, but useless). Checked: the tokenizer fits in the GGUF's vocabulary, ``prompt``
    tokenizes to the same ids both ways, and an evenly spread sample of ids (plus the special
    ones) has the same token text. Raises :class:`VocabMismatchError` with one line."""
    size = len(tokenizer)
    name = model.path.name
    if size > model.n_vocab:
        raise VocabMismatchError(f"draft GGUF {name} has {model.n_vocab} tokens, the target "
                                 f"tokenizer {size}: not the target's vocabulary")
    want = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    got = model.tokenize(prompt)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                  min(len(got), len(want)))
        raise VocabMismatchError(f"draft GGUF {name} tokenizes the sample prompt differently from "
                                 f"the target tokenizer (first difference at token {at})")
    step = max(1, size // samples)
    ids = sorted(set(range(0, size, step)) | set(getattr(tokenizer, "all_special_ids", []) or []))
    texts = tokenizer.convert_ids_to_tokens(ids)
    for i, text in zip(ids, texts, strict=True):
        mine = model.token_text(i)
        if text is not None and mine != text:
            raise VocabMismatchError(f"draft GGUF {name} token {i} is {mine!r}, the target "
                                     f"tokenizer's is {text!r}: not the target's vocabulary")


# ------------------------------------------------------------------------------ choosing a backend
def draft_backend(settings: Settings) -> str:
    """``llamacpp`` or ``torch`` for this drafter. ``auto``: llama.cpp for a registered alias that
    ships a GGUF (the packaged draft models) on CPU; torch for paths and hub ids (the tiny random
    test models) and for GPU edges, where torch is the faster runner."""
    from wisp.models import REGISTRY

    choice = settings.draft_backend
    if choice != "auto":
        return choice
    if settings.draft_model in REGISTRY and settings.device.startswith("cpu"):
        return "llamacpp"
    return "torch"


def make_draft_engine(settings: Settings, tokenizer: Any) -> Any:
    """The draft engine the settings ask for, loaded (and, for llama.cpp, its vocabulary checked
    against the target ``tokenizer``). Blocking: call it on the model thread."""
    from wisp import models

    if draft_backend(settings) == "torch":
        from wisp.services.drafter.engine import DraftEngine

        return DraftEngine(models.load_model(settings.draft_model, settings),
                           max_sessions=settings.draft_sessions)
    gguf = models.draft_gguf(settings.draft_model, settings.model_cache)
    threads = settings.torch_threads or len(parse_cpus(settings.drafter_cpus))  # 0: all cores
    engine = LlamaCppDraftEngine(gguf, max_sessions=min(settings.draft_sessions, 256), n_threads=threads)
    try:
        check_vocab(engine.model, tokenizer)
    except BaseException:
        engine.close()
        raise
    return engine
