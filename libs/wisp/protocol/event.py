"""drafter → client: ``wisp:out:<request_id>``. Only committed (verified) tokens appear here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from wisp.protocol.base import WireModel


class TokenEvent(WireModel):
    kind: Literal["token"] = "token"
    request_id: str = Field(min_length=1, max_length=128)
    index: int = Field(ge=0, description="Position of token_ids[0] among the generated ids.")
    token_ids: list[int]
    text: str
    ts: float


class DoneEvent(WireModel):
    kind: Literal["done"] = "done"
    request_id: str = Field(min_length=1, max_length=128)
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    mode: str
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    rounds: int
    drafted_tokens: int
    accepted_tokens: int
    draft_ms_total: float = 0.0
    wasted_draft_ms: float = 0.0
    verify_ms_total: float = Field(default=0.0, description="Sum of the verify time of the "
                                   "batches that carried this request's rounds.")
    overhead_ms: float = Field(default=0.0, description="e2e minus drafting minus verification: "
                               "broker hops, queueing and scheduling.")
    ttft_slo_ms: float
    tpot_slo_ms: float
    device: str


class ErrorEvent(WireModel):
    kind: Literal["error"] = "error"
    request_id: str = Field(min_length=1, max_length=128)
    error: str = Field(description="One line that says what went wrong and what to fix.")
    code: str = "bad_request"


OutputEvent = Annotated[TokenEvent | DoneEvent | ErrorEvent, Field(discriminator="kind")]
OUTPUT_ADAPTER: TypeAdapter[TokenEvent | DoneEvent | ErrorEvent] = TypeAdapter(OutputEvent)
