"""The discrete-event core: a binary heap of (time, sequence, kind, a, b) on a virtual clock.

Events at the same time run in the order they were scheduled (the sequence number breaks ties),
so a run is a deterministic function of the scenario and the seed. Handlers are plain methods
of the simulation; the queue only orders them.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any


class EventQueue:
    __slots__ = ("heap", "_seq", "now", "popped")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.popped = 0

    def push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        if t < self.now:
            raise ValueError(f"event scheduled in the past ({t} < {self.now})")
        heapq.heappush(self.heap, (t, next(self._seq), kind, a, b))

    def pop(self) -> tuple[float, int, int, Any, Any]:
        ev = heapq.heappop(self.heap)
        self.now = ev[0]
        self.popped += 1
        return ev

    def peek_time(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def __len__(self) -> int:
        return len(self.heap)
