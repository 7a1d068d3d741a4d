"""scheduler → verifier: ``wisp:batch:<verifier>``. Plain data: which rounds, and why."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel
from wisp.protocol.draft import AnnotatedBlock


class VerifyBatch(WireModel):
    KIND = "batch"
    kind: Literal["batch"] = "batch"
    batch_id: str = Field(min_length=1, max_length=128)
    verifier: str = Field(min_length=1, max_length=256)
    items: list[AnnotatedBlock] = Field(min_length=1, max_length=1024)
    created_ts: float
    predicted_ms: float = Field(default=0.0, ge=0.0)
    policy: str = "fcfs"
    reasons: list[str] = Field(default_factory=list, max_length=1024)
