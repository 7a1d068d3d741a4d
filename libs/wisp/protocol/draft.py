"""drafter → estimator (``wisp:draft``) and estimator → scheduler (``wisp:annotated``).

A block is one speculation round of one session. ``round`` and ``base_committed_len`` fence it:
a block whose base no longer matches the session is stale and is never verified into output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import Field, model_validator

from wisp.prefix import PrefixDigest
from wisp.protocol.base import WireModel


def digest_ids(ids: Sequence[int]) -> str:
    """Short content hash of a token prefix: lets a verifier check that the prefix it holds is
    the one a round builds on (equal lengths are not enough once sampling is involved), and
    keys the seeded samplers (``wisp.specdec.round_generator``)."""
    return PrefixDigest(ids).hexdigest()


MAX_SERVER_ROUNDS = 1_000_000
"""Most rounds a server run may cover (a request's ``max_new_tokens`` bound)."""

PROB_SUM_TOLERANCE = 1e-4
"""How far a sparse distribution's probabilities may sum from 1. Real ones are computed in
float64 (within ~1e-12); the slack absorbs a float32 producer or a lossy encoding. Rejection
sampling (``wisp.specdec.SparseDist``) checks the same bound: a looser wire check let
distributions 1e-4..1e-3 off through, to raise inside the verifier for ever."""


class WireDist(WireModel):
    """The exact sparse distribution a drafted token was sampled from (temperature > 0). A
    poisoned one (negative or NaN probabilities, a token named twice, mass far from 1) is
    refused here: it used to pass the verifier's checks and raise inside rejection sampling,
    so its batch was retried for ever."""

    token_ids: list[Annotated[int, Field(ge=0)]] = Field(max_length=4096)
    probs: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(max_length=4096)

    @model_validator(mode="after")
    def _a_distribution(self) -> WireDist:
        if len(self.token_ids) != len(self.probs) or not self.token_ids:
            raise ValueError("token_ids and probs must be non-empty and of equal length")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError("a token appears twice in the distribution")
        if abs(math.fsum(self.probs) - 1.0) > PROB_SUM_TOLERANCE:
            raise ValueError(f"probabilities sum to {math.fsum(self.probs):.6f}, not 1")
        return self


class WireFeatures(WireModel):
    """Draft-side statistics of one drafted token (what the speculation controller reads)."""

    top1_prob: float
    entropy: float
    margin: float
    logit_spread: float


class DraftBlock(WireModel):
    """One round of one session: what changes from round to round. The session's constants
    (SLOs, arrival, sampling, length cap) are its ``SessionTerms``, written once when it opens."""

    KIND = "draft"
    kind: Literal["draft"] = "draft"
    request_id: str = Field(min_length=1, max_length=128)
    device: str = Field(min_length=1, max_length=256, description="Drafter that gets the verdict.")
    round: int = Field(ge=0)
    base_committed_len: int = Field(ge=1, description="Prompt + generated ids this round builds on.")
    committed_digest: str = Field(min_length=16, max_length=16)
    draft_tokens: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=256)
    draft_dists: list[WireDist] | None = Field(default=None, max_length=256)
    features: list[WireFeatures] = Field(default_factory=list, max_length=256)
    draft_ms: float = Field(default=0.0, ge=0.0)
    sent_ts: float = Field(description="When this block was published (unix s).")
    generated_len: int = Field(default=0, ge=0)
    expected_commit: float | None = Field(
        default=None, ge=0.0, description="Drafter's estimate of tokens this round commits.")
    first_token_ts: float | None = Field(
        default=None, description="When the request's first token was committed (unix s); None "
        "before it. The TPOT SLO is a mean from this moment, so later deadlines count from it.")
    server_rounds: int = Field(
        default=0, ge=0, le=MAX_SERVER_ROUNDS, description="A server run: after this undrafted "
        "round the verifier goes on decoding the session itself for up to this many more tokens "
        "(one per forward of its continuous batch), sending what it made every few tens of ms "
        "as verdicts, with no drafter round trip in between (centralized serving, or a session "
        "the controller hands to the server).")

    @model_validator(mode="after")
    def _consistent(self) -> DraftBlock:
        if self.server_rounds and self.draft_tokens:
            raise ValueError("a server run (server_rounds > 0) starts with an undrafted round")
        if self.generated_len >= self.base_committed_len:
            raise ValueError("generated_len must be below base_committed_len (a prompt is never empty)")
        if self.draft_dists is not None and len(self.draft_dists) != len(self.draft_tokens):
            raise ValueError("draft_dists must have one entry per draft token")
        for t, d in zip(self.draft_tokens, self.draft_dists or [], strict=False):
            if t not in d.token_ids:
                raise ValueError("a draft token has no probability under its own distribution")
        return self

    @property
    def key(self) -> str:
        """Identity of this round; a duplicate block has the same key. The device is part of
        it: a session resumed on another drafter re-drafts its round, and that block must not
        be taken for a duplicate of the one whose verdict went to the dead drafter."""
        return f"{self.request_id}:{self.round}:{self.base_committed_len}:{self.device}"


class AnnotatedBlock(WireModel):
    KIND = "annotated"
    kind: Literal["annotated"] = "annotated"
    block: DraftBlock
    predicted_verify_ms: float = Field(ge=0.0, description="Predicted cost of verifying it alone.")
    model_key: str = Field(max_length=256, description="The verify-time model that predicted it "
                           "(the scheduler uses the prediction only under that same model).")
    model_scale: float = Field(default=1.0, gt=0.0, allow_inf_nan=False,
                               description="That model's scale (a learned model's level) then.")
    annotated_ts: float
