"""verifier → estimator and scheduler: ``wisp:stats``. One sample per verified batch: its
composition and measured time (the estimator refits on these; the scheduler learns the verifier
is free again)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wisp.protocol.base import WireModel


class TimingSample(WireModel):
    KIND = "timing"
    kind: Literal["timing"] = "timing"
    verifier: str = Field(min_length=1, max_length=256)
    batch_id: str = Field(min_length=1, max_length=128)
    new_tokens: list[Annotated[int, Field(ge=0)]] = Field(
        max_length=1024, description="Tokens fed per round (uncached committed + draft).")
    context_lens: list[Annotated[int, Field(ge=0)]] = Field(
        max_length=1024, description="Cached context per round before the forward.")
    draft_lens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1024)
    measured_ms: float = Field(ge=0.0)
    predicted_ms: float = Field(default=0.0, ge=0.0)
    cache_misses: int = Field(default=0, ge=0)
    ts: float
