"""verifier → drafter: ``wisp:verdict:<device>``. Applying a verdict twice is harmless: the
drafter applies it only when ``round`` and ``base_committed_len`` match the session."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from wisp.protocol.base import WireModel


class Verdict(WireModel):
    KIND = "verdict"
    kind: Literal["verdict"] = "verdict"
    request_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0)
    base_committed_len: int = Field(ge=1)
    drafted: int = Field(ge=0)
    accepted: int = Field(ge=0)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, max_length=257, description="Accepted draft tokens + the target's own.")
    batch_id: str = Field(min_length=1, max_length=128)
    verifier: str = Field(min_length=1, max_length=256)
    batch_size: int = Field(ge=1)
    verify_ms: float = Field(ge=0.0)
    queue_ms: float = Field(default=0.0, ge=0.0, description="Block sent → batch started.")
    cache_hit: bool = True
    decoded: int = Field(
        default=0, ge=0, le=256, description="Tokens the server made by itself after the "
        "round's own (a server run sends the tokens it made since its previous verdict).")
    server_rounds_left: int = Field(
        default=0, ge=0, le=1_000_000, description="Tokens the verifier will still decode for "
        "this session by itself (a server run, ``DraftBlock.server_rounds``): the drafter waits "
        "for their verdicts instead of publishing the next round. 0: the drafter plans it.")

    @model_validator(mode="after")
    def _consistent(self) -> Verdict:
        if self.accepted > self.drafted:
            raise ValueError(f"accepted {self.accepted} of only {self.drafted} drafted tokens")
        if len(self.tokens) != self.accepted + 1 + self.decoded:
            raise ValueError("tokens must be the accepted drafts, the target's own token and "
                             "the ones the server decoded")
        if (self.server_rounds_left or self.decoded) and self.drafted:
            raise ValueError("a server run's rounds are undrafted")
        return self
