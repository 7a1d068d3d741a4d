"""any consumer → ``wisp:dead``: a message that could not be processed, with the reason."""

from __future__ import annotations

from typing import Literal

from wisp.protocol.base import WireModel


class DeadLetter(WireModel):
    kind: Literal["dead"] = "dead"
    stream: str
    entry_id: str
    group: str
    consumer: str
    reason: str
    payload: str
    ts: float
