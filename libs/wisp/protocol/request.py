"""client → drafter: ``wisp:req`` (any drafter) or ``wisp:req:<device>`` (one device)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from wisp.protocol.base import WireModel

MAX_SPECULATION = 64
"""Largest fixed draft length a request may ask for (``draft_k``'s bound): each drafted token
is a forward pass of the drafter's one model worker, shared by every session it serves."""
Speculation = Literal["auto", "off"] | Annotated[int, Field(ge=0, le=MAX_SPECULATION)]


class GenerateRequest(WireModel):
    """A user's prompt and how to decode it. Validation here is the first line of defence;
    the drafter checks what needs the tokenizer (context length) and answers with an error event."""

    KIND = "request"
    kind: Literal["request"] = "request"
    request_id: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    prompt: str = Field(min_length=1, max_length=1_000_000)
    chat_template: bool = True
    max_new_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    ttft_slo_ms: float | None = Field(default=None, gt=0, le=86_400_000)
    tpot_slo_ms: float | None = Field(default=None, gt=0, le=86_400_000)
    speculation: Speculation = "auto"
    submitted_ts: float = Field(ge=0.0, le=1e10, description="Client wall clock (unix seconds) "
                                "at submit; informational: deadlines count from the arrival "
                                "Redis stamps on the request.")
