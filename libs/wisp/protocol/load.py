"""scheduler → drafters: ``wisp:load``, a plain key (not a stream) holding the active
scheduler's latest snapshot of every live verifier's load, which admission control reads.

Validated like a stream message: a snapshot that does not parse, or carries NaN, negative or
absurd numbers, is ignored by its readers (admission then admits, as with no scheduler) instead
of raising inside the admission arithmetic and failing the request."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel


class VerifierLoadWire(WireModel):
    """``wisp.policy.slo.VerifierLoad`` on the wire."""

    kind: Literal["verifier_load"] = "verifier_load"
    name: str = Field(min_length=1, max_length=128)
    backlog_ms: float = Field(ge=0.0, le=1e9)
    sessions: int = Field(default=0, ge=0, le=10_000_000)
    speed: float = Field(default=1.0, gt=0.0, le=1e6)
    tightest_tpot_slo_ms: float | None = Field(default=None, gt=0.0, le=86_400_000)
    kv_free_tokens: int | None = Field(default=None, ge=0, le=10**12)
    """KV cache tokens free (omitted on the wire while no verifier reports its KV: a reader of
    the previous version forbids unknown fields, so a scheduler must not send them for nothing)."""
    kv_waiting: int = Field(default=0, ge=0, le=10_000_000)

KV_FIELDS = ("kv_free_tokens", "kv_waiting")


class ServerCostsWire(WireModel):
    """``wisp.policy.site.ServerCosts`` on the wire: what a round costs the server at its current
    load, for the drafters' per-round choice between drafting and server-side decoding."""

    kind: Literal["server_costs"] = "server_costs"
    step_ms: float = Field(ge=0.0, le=1e7, allow_inf_nan=False)
    row_ms: float = Field(ge=0.0, le=1e7, allow_inf_nan=False)
    token_ms: float = Field(ge=0.0, le=1e7, allow_inf_nan=False)
    compute_bound: bool = False
    kv_bound: bool = False


class LoadSnapshot(WireModel):
    KIND = "load"
    kind: Literal["load"] = "load"
    ts: float = Field(ge=0.0, le=1e10)
    scheduler: str = Field(min_length=1, max_length=128)
    verifiers: list[VerifierLoadWire] = Field(max_length=65_536)
    costs: ServerCostsWire | None = None
    """The server's published costs (omitted until the scheduler has seen a forward)."""

    def encode(self) -> bytes:
        """JSON bytes, leaving out the KV fields of a verifier that reports none, so drafters of
        the previous protocol version (unknown fields forbidden) keep reading the snapshot."""
        data = self.model_dump(mode="json")
        if data.get("costs") is None:  # readers of the previous version forbid the field
            data.pop("costs", None)
        for v in data["verifiers"]:
            if v.get("kv_free_tokens") is None and not v.get("kv_waiting"):
                for k in KV_FIELDS:
                    v.pop(k, None)
        return json.dumps(data, separators=(",", ":")).encode()
