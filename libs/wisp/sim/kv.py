"""Paged KV memory of a simulated verifier, in vLLM's terms: fixed-size blocks, admission above
a watermark, a FIFO wait queue, and the running sessions in admission order for preemption.

This is a plain, deterministic bookkeeping class: it decides nothing about time and holds no
policy of the services. The simulator (``wisp.sim.simulator``) tells it how many tokens a session
needs and acts on its answers (admit, wait, preempt the newest). The rules and their sources:

* **Blocks.** Capacity ``capacity_tokens`` is cut into ``capacity_tokens // block_tokens`` blocks;
  a session holding ``t`` tokens holds ``ceil(t / block_tokens)`` blocks. vLLM's default block is
  16 tokens (``vllm/config/cache.py``: ``CacheConfig.DEFAULT_BLOCK_SIZE = 16``, commit
  002f10e0cfa1373a19a0d2756598a34b700d20e5).
* **Watermark.** A waiting session is admitted only if ``free - need >= watermark_blocks``, with
  ``watermark_blocks = int(watermark x blocks)``, and can *never* be admitted if
  ``blocks - need < watermark_blocks``: vLLM's ``SelfAttnBlockSpaceManager.can_allocate``
  (``vllm/core/block_manager.py``, ``watermark: float = 0.01``, commit
  9a4b60a4c91d972116c01e818048ab8868542d62: "Use watermark to avoid frequent cache eviction").
  A running session grows without the watermark (``can_append_slots`` compares with the free
  blocks only).
* **Order.** ``held`` keeps the running sessions in admission order (a readmitted session is the
  newest again); the victim of a preemption is the newest one the caller may preempt, as vLLM
  V1's FCFS scheduler pops the last running request when a running one cannot get its blocks
  (``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``: ``preempted_req =
  self.running.pop()``; ``_preempt_request`` frees its blocks, sets ``num_computed_tokens = 0``
  and puts it back at the head of the waiting queue: recompute; commit
  b4622cf924bc72504aed99e486062d6633fde39e).

Unlimited capacity (``capacity_tokens <= 0``) admits and grows everything, and still counts the
blocks held, so the peak is the memory the run would have needed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

UNLIMITED_BLOCKS = 1 << 62

K = TypeVar("K", bound=Hashable)


class PagedKv(Generic[K]):
    """Block accounting for one KV pool of sessions ``K`` (see the module doc for the rules)."""

    def __init__(self, capacity_tokens: int, block_tokens: int = 16, watermark: float = 0.01) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        if not 0.0 <= watermark < 1.0:
            raise ValueError("watermark must be in [0, 1)")
        self.block_tokens = int(block_tokens)
        self.unlimited = capacity_tokens <= 0
        self.total = UNLIMITED_BLOCKS if self.unlimited else int(capacity_tokens) // self.block_tokens
        self.watermark_blocks = 0 if self.unlimited else int(watermark * self.total)
        self.free = self.total
        self.held: dict[K, int] = {}
        """Running sessions -> blocks they hold, in admission order (oldest first)."""
        self.waiting: deque[K] = deque()
        """Sessions waiting to be admitted, FIFO; a preempted one goes to the front."""
        self.peak_blocks = 0
        self.preemptions = 0

    # ------------------------------------------------------------------ arithmetic
    def blocks(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-max(0, int(tokens)) // self.block_tokens)

    @property
    def used_blocks(self) -> int:
        return self.total - self.free

    @property
    def peak_tokens(self) -> int:
        return self.peak_blocks * self.block_tokens

    def admissible_tokens(self) -> int:
        """Tokens a newcomer could be admitted with now (free blocks above the watermark)."""
        return max(0, self.free - self.watermark_blocks) * self.block_tokens

    # ------------------------------------------------------------------ admission
    def fits_ever(self, tokens: int) -> bool:
        """Whether a session needing ``tokens`` could be admitted into an empty pool (vLLM's
        ``AllocStatus.NEVER`` is the opposite)."""
        return self.total - self.blocks(tokens) >= self.watermark_blocks

    def can_admit(self, tokens: int) -> bool:
        """Whether ``tokens`` fit now while leaving the watermark free."""
        return self.free - self.blocks(tokens) >= self.watermark_blocks

    def admit(self, sid: K, tokens: int) -> None:
        """Allocate ``tokens``' blocks to a newly admitted (or readmitted) session, which becomes
        the newest running one. The caller checked ``can_admit``."""
        need = self.blocks(tokens)
        if sid in self.held:
            raise ValueError(f"{sid!r} already holds KV blocks")
        if need > self.free:
            raise ValueError(f"{need} blocks do not fit in {self.free} free")
        self.held[sid] = need
        self._take(need)

    # ------------------------------------------------------------------ running sessions
    def grow(self, sid: K, tokens: int) -> bool:
        """Hold at least ``tokens`` tokens' blocks; False (nothing changed) when the extra blocks
        are not free. A running session may use the watermark."""
        have = self.held[sid]
        extra = -(-tokens // self.block_tokens) - have  # blocks(tokens), inlined: once a round
        if extra <= 0:
            return True
        if extra > self.free:
            return False
        self.held[sid] = have + extra
        self._take(extra)
        return True

    def shrink(self, sid: K, tokens: int) -> None:
        """Keep only ``tokens`` tokens' blocks (a verdict discarded the rejected draft's slots)."""
        have = self.held[sid]
        keep = -(-tokens // self.block_tokens)
        if keep < have:
            self.held[sid] = keep
            self.free += have - keep

    def release(self, sid: K) -> int:
        """Free every block of ``sid`` (finished, failed or preempted); returns how many."""
        n = self.held.pop(sid, 0)
        self.free += n
        return n

    def newest_first(self) -> Iterator[K]:
        """Running sessions, the most recently admitted first (preemption order)."""
        return reversed(self.held)

    def _take(self, n: int) -> None:
        self.free -= n
        used = self.total - self.free
        if used > self.peak_blocks:
            self.peak_blocks = used
