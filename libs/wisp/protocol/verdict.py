"""verifier → drafter: ``wisp:verdict:<device>``. Applying a verdict twice is harmless: the
drafter applies it only when ``round`` and ``base_committed_len`` match the session."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel


class Verdict(WireModel):
    KIND = "verdict"
    kind: Literal["verdict"] = "verdict"
    request_id: str
    round: int = Field(ge=0)
    base_committed_len: int = Field(ge=1)
    drafted: int = Field(ge=0)
    accepted: int = Field(ge=0)
    tokens: list[int] = Field(min_length=1, description="Accepted draft tokens + the target's own.")
    batch_id: str
    verifier: str
    batch_size: int = Field(ge=1)
    verify_ms: float = Field(ge=0.0)
    queue_ms: float = Field(default=0.0, ge=0.0, description="Block sent → batch started.")
    cache_hit: bool = True
