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

from typing import Annotated, Literal

from pydantic import Field, model_validator

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


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
MAX_SESSION_TOKENS = 4_000_000
"""A session record's prompt + generated ids at most (a 1M-character prompt tokenizes to far
fewer; the bound keeps a forged record from costing its reader unbounded memory)."""


class SessionState(WireModel):
    """The durable record of one session (``wisp:sess:<request>``), written by its drafter and
    read back by a drafter that adopts it and by a verifier that lacks its KV cache. Bounded and
    checked for consistency like a stream message: a record that parses but cannot be true
    (more generated than allowed, more accepted than drafted, negative ids) is refused by its
    reader as unreadable instead of steering it."""

    kind: Literal["session"] = "session"
    request: GenerateRequest
    device: str = Field(min_length=1, max_length=256)
    prompt_token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_SESSION_TOKENS)
    generated: list[TokenId] = Field(default_factory=list, max_length=1_000_000)
    round: int = Field(default=0, ge=0, le=10_000_000)
    started_ts: float = Field(gt=0, le=1e10)
    first_token_ts: float | None = Field(default=None, gt=0, le=1e10)
    last_token_ts: float | None = Field(default=None, gt=0, le=1e10)
    terms: SessionTerms
    epoch: int = Field(default=0, ge=0, description="Bumped by every adoption: the fencing "
                       "token every save must match, so an earlier owner can no longer write.")
    rounds_done: int = Field(default=0, ge=0, le=10_000_000)
    drafted: int = Field(default=0, ge=0, le=10**12)
    accepted: int = Field(default=0, ge=0, le=10**12)
    recent_acceptance: float = Field(default=1.0, ge=0.0, le=1.0)
    draft_ms: float = Field(default=0.0, ge=0.0)
    draft_ms_per_token: float | None = Field(
        default=None, ge=0.0, description="The device's measured time per draft forward (EMA).")
    wasted_draft_ms: float = Field(default=0.0, ge=0.0)
    verify_ms: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> SessionState:
        if len(self.generated) > self.request.max_new_tokens:
            raise ValueError("more tokens generated than the request's max_new_tokens")
        if self.accepted > self.drafted:
            raise ValueError("more drafts accepted than drafted")
        if self.wasted_draft_ms > self.draft_ms + 1e-6:
            raise ValueError("more drafting wasted than spent")
        if self.last_token_ts is not None and self.first_token_ts is None:
            raise ValueError("a last token time without a first")
        return self

    @property
    def committed(self) -> list[int]:
        return self.prompt_token_ids + self.generated
