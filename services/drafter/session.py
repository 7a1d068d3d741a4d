"""A session as the drafter serves it: its saved record, its speculation state and what only
the serving drafter tracks (what the client was sent, which round was published)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from wisp.policy.controller import SessionSpecStats
from wisp.policy.session import SpecSession
from wisp.policy.site import LinkEstimate, SiteState
from wisp.protocol import DraftBlock, GenerateRequest, SessionState, SessionTerms, WireFeatures


class SessionLost(RuntimeError):
    """Another drafter adopted this session (we were presumed dead); stop serving it."""


@dataclass
class ServedSession:
    """A served session: its persisted record, its speculation state (``SpecSession``, the
    object the simulator and the trainers run too) and what only this drafter tracks."""

    req: GenerateRequest
    state: SessionState
    """The record as last saved (request, prompt ids, SLOs, mode; the rest comes from ``spec``)."""
    spec: SpecSession
    text: str = ""
    """The detokenised text sent to the client so far."""
    last_features: list[WireFeatures] = field(default_factory=list)
    """Draft features of the round in flight (for trace rows)."""
    finished: bool = False
    opened: bool = False
    """Its record (and terms) have been written: False from the moment the drafter holds a new
    session until its opening save goes through (a request read again after that save failed
    in an outage writes it before anything else)."""
    emitted: int = 0
    """Generated tokens sent to the client's stream."""
    published_round: int = -1
    """The round whose block was published (a round is published once)."""
    published_block: DraftBlock | None = None
    """That block, to publish again if its verdict never comes (``round_timeout_s``)."""
    published_at: float = 0.0
    """When it was (last) published (unix s)."""
    resends: int = 0
    """Times the round in flight was published again."""
    saved_at: float = field(default_factory=time.time)
    """When its record was last saved (unix s): a session with no round in flight for long
    after that is stuck (``round_watch_loop``)."""
    applied_base: int = -1
    """base_committed_len of the last verdict applied (to recognise its re-delivery)."""
    link: LinkEstimate = field(default_factory=LinkEstimate)
    """Its measured round trip and per-token acceptance (the adaptive site choice)."""
    site: SiteState = field(default_factory=SiteState)
    """Drafted here, or in a server run (the adaptive site choice)."""
    server_left: int = 0
    """Rounds the verifier said it will still make by itself (a server run): the drafter waits
    for their verdicts instead of publishing (``Verdict.server_rounds_left``)."""

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def terms(self) -> SessionTerms:
        return self.state.terms

    @property
    def ttft_slo_ms(self) -> float:
        return self.state.terms.ttft_slo_ms

    @property
    def tpot_slo_ms(self) -> float:
        return self.state.terms.tpot_slo_ms

    @property
    def committed(self) -> list[int]:
        return self.state.prompt_token_ids + self.spec.generated


def spec_of(st: SessionState, eos: frozenset[int]) -> SpecSession:
    """A session's speculation state from its saved record (a resumed session goes on where
    the record stands)."""
    stats = SessionSpecStats(rounds=st.rounds_done, drafted=st.drafted, accepted=st.accepted,
                             recent_acceptance=st.recent_acceptance,
                             draft_ms_per_token=st.draft_ms_per_token)
    max_new = st.request.max_new_tokens
    return SpecSession(len(st.prompt_token_ids), max_new, eos=eos, generated=list(st.generated),
                       round=st.round, stats=stats, draft_ms=st.draft_ms, wasted_ms=st.wasted_draft_ms,
                       first_token_ts=st.first_token_ts, last_token_ts=st.last_token_ts)


def record_of(sess: ServedSession, spec: SpecSession, device: str, verify_ms: float = 0.0) -> SessionState:
    """The record that makes ``spec`` durable for ``sess``, owned by ``device``."""
    stats = spec.stats
    return sess.state.model_copy(update={
        "device": device, "generated": list(spec.generated), "round": spec.round,
        "first_token_ts": spec.first_token_ts, "last_token_ts": spec.last_token_ts,
        "rounds_done": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted,
        "recent_acceptance": stats.recent_acceptance, "draft_ms_per_token": stats.draft_ms_per_token,
        "draft_ms": spec.draft_ms, "wasted_draft_ms": spec.wasted_ms,
        "verify_ms": sess.state.verify_ms + verify_ms,
    })
