"""Session state kept in Redis.

``SessionState`` (``wisp:sess:<request_id>``) is written by the drafter after each applied
verdict, before it emits the committed tokens and publishes the next block. It is the whole
truth of a session: a verifier that lacks the KV cache recomputes it from the committed prefix,
and a restarted or replacement drafter resumes the session from it.

``SessionTerms`` (``wisp:terms:<request_id>``) are the few constants every round of a session
shares (SLOs, arrival, sampling, length cap): written once when the session opens, read once
per session by the scheduler and the verifier (and again by a replacement after a failover), so
a draft block carries only what changes from round to round.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel
from wisp.protocol.request import GenerateRequest

ServingMode = Literal["wisp", "sled", "centralized"]


class SessionTerms(WireModel):
    """What every round of one session shares and never changes."""

    KIND = "terms"
    kind: Literal["terms"] = "terms"
    request_id: str = Field(min_length=1, max_length=128)
    prompt_len: int = Field(ge=1, le=10_000_000)
    max_new_tokens: int = Field(ge=1, le=1_000_000)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    mode: ServingMode = "sled"
    ttft_slo_ms: float = Field(gt=0, le=86_400_000)
    tpot_slo_ms: float = Field(gt=0, le=86_400_000)
    arrival_ts: float = Field(
        gt=0, description="When the request reached WISP (unix s), stamped by the service from "
        "the request's stream entry id (Redis' clock), never the client's own claim: deadlines "
        "and earliest-deadline-first order count from it.")


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
    terms: SessionTerms
    epoch: int = Field(default=0, ge=0, description="Bumped by every adoption: the fencing "
                       "token every save must match, so an earlier owner can no longer write.")
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
