"""client → drafter: ``wisp:req`` (any drafter) or ``wisp:req:<device>`` (one device)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from wisp.protocol.base import WireModel

MAX_SPECULATION = 64
"""Largest fixed draft length a request may ask for (``draft_k``'s bound): each drafted token
is a forward pass of the drafter's one model worker, shared by every session it serves."""
Speculation = Literal["auto", "off"] | Annotated[int, Field(ge=0, le=MAX_SPECULATION)]
MAX_MESSAGES = 256
"""Most turns one chat request may carry (the OpenAI API's ``messages``)."""
MAX_CHAT_CHARS = 1_000_000
"""Most characters of all turns of one chat request together (``prompt``'s own bound)."""


class ChatMessage(WireModel):
    """One turn of a conversation, rendered with the target's chat template by the drafter."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CHAT_CHARS)


class GenerateRequest(WireModel):
    """A user's prompt and how to decode it. Validation here is the first line of defence;
    the drafter checks what needs the tokenizer (context length) and answers with an error event."""

    KIND = "request"
    kind: Literal["request"] = "request"
    request_id: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    prompt: str = Field(min_length=1, max_length=1_000_000)
    chat_template: bool = True
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=MAX_MESSAGES,
        description="A whole conversation, tokenised with the target's chat template instead of "
        "``prompt`` as one user turn (``prompt`` then holds the last turn's text, for logs). "
        "None: ``prompt`` alone, as before.")
    max_new_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    ttft_slo_ms: float | None = Field(default=None, gt=0, le=86_400_000)
    tpot_slo_ms: float | None = Field(default=None, gt=0, le=86_400_000)
    speculation: Speculation = "auto"
    submitted_ts: float = Field(ge=0.0, le=1e10, description="Client wall clock (unix seconds) "
                                "at submit; informational: deadlines count from the arrival "
                                "Redis stamps on the request.")

    @model_validator(mode="after")
    def _messages_fit(self) -> GenerateRequest:
        if self.messages is not None:
            if not self.chat_template:
                raise ValueError("messages need the chat template (chat_template=true)")
            total = sum(len(m.content) for m in self.messages)
            if total > MAX_CHAT_CHARS:
                raise ValueError(f"messages hold {total} characters; the limit is {MAX_CHAT_CHARS}")
        return self
