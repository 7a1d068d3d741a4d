"""Session state kept in Redis (``wisp:sess:<request_id>``), written by the drafter after each
applied verdict, before it emits the committed tokens and publishes the next block. It is the
whole truth of a session: a verifier that lacks the KV cache recomputes it from the committed
prefix, and a restarted or replacement drafter resumes the session from it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel
from wisp.protocol.request import GenerateRequest


class SessionState(WireModel):
    kind: Literal["session"] = "session"
    request: GenerateRequest
    device: str
    prompt_token_ids: list[int]
    generated: list[int] = Field(default_factory=list)
    round: int = 0
    started_ts: float
    first_token_ts: float | None = None
    last_token_ts: float | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    mode: str = "sled"
    rounds_done: int = 0
    drafted: int = 0
    accepted: int = 0
    recent_acceptance: float = 1.0
    draft_ms: float = 0.0
    draft_ms_per_token: float | None = Field(
        default=None, ge=0.0, description="The device's measured time per draft forward (EMA).")
    wasted_draft_ms: float = 0.0
    verify_ms: float = 0.0

    @property
    def committed(self) -> list[int]:
        return self.prompt_token_ids + self.generated
