"""any consumer → ``wisp:dead``: a message that could not be processed, with the reason.

Bounded like every message: the payload is an excerpt (``wisp.bus.dead_excerpt``), so the
stream's size is bounded by its entry cap times a few KiB."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel


class DeadLetter(WireModel):
    kind: Literal["dead"] = "dead"
    stream: str = Field(max_length=256)
    entry_id: str = Field(max_length=64)
    group: str = Field(max_length=128)
    consumer: str = Field(max_length=128)
    reason: str = Field(max_length=1_000)
    payload: str = Field(max_length=8_192, description="The entry's fields as JSON text: all of "
                         "it when short, else its first 4 KiB with its size and sha256.")
    ts: float
