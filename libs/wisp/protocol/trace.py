"""drafter → trace recorder: ``wisp:trace`` (only when ``Settings.trace`` is on).

One row per drafted token of a verified round, up to and including the first rejected one
(tokens after it were never judged by the target on their own merit, so they carry no label).
``label`` is 1 when the target rejected this token, 0 when it accepted it; so in a round with
``accepted = a`` the rows are positions ``0 .. min(a, drafted - 1)`` and only position ``a`` (when
``a < drafted``) has label 1. These rows are the training data of the learned speculation
controller (``wisp.controller_train``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from wisp.protocol.base import WireModel


class TraceRow(WireModel):
    KIND = "trace"
    kind: Literal["trace"] = "trace"
    request_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0)
    position: int = Field(ge=0, description="0-based index of the token within its round.")
    top1_prob: float
    entropy: float
    margin: float
    logit_spread: float
    recent_acceptance: float = Field(description="The session's EMA acceptance before the round.")
    drafted: int = Field(ge=1, description="Tokens drafted in the round.")
    accepted: int = Field(ge=0, description="Tokens of the round the target accepted.")
    label: Literal[0, 1] = Field(description="1 = the target rejected this token, 0 = accepted.")
    context_len: int = Field(default=0, ge=0, description="Committed ids the round built on.")
    device: str = ""
    mode: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> TraceRow:
        if self.accepted > self.drafted:
            raise ValueError("accepted exceeds drafted")
        if self.position >= self.drafted or self.position > self.accepted:
            raise ValueError("a trace row lies after the first rejected token")
        if self.label != int(self.position == self.accepted):
            raise ValueError("label must be 1 exactly at position == accepted")
        return self
