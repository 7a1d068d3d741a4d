"""Whether the drafter takes a request: checks of the request itself (a bad prompt or limit is
refused with what to fix) and, in wisp mode, admission control against the system's load."""

from __future__ import annotations

import logging

from wisp.bus import Bus
from wisp.policy.learned_estimator import PublishedModel
from wisp.policy.site import ServerCosts
from wisp.policy.slo import AdmissionController, VerifierLoad
from wisp.protocol import GenerateRequest, LoadSnapshot, ProtocolError, decode
from wisp.settings import Settings

log = logging.getLogger(__name__)


class RequestRefused(ValueError):
    """A request the drafter will not serve; the message says what to fix. ``code`` is the
    error event's: ``bad_request`` (the request itself: fix it) or ``overloaded`` (admission
    control: the same request may be admitted later, so the HTTP API answers 503 with
    Retry-After rather than 400)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def check_request(req: GenerateRequest, s: Settings) -> None:
    """Refuse a request that no load could make servable (before tokenising it)."""
    if req.messages is not None:
        chars = sum(len(m.content) for m in req.messages)
        if not any(m.content.strip() for m in req.messages):
            raise RequestRefused("every message is empty or only whitespace: give some text")
    else:
        chars = len(req.prompt)
        if not req.prompt.strip():
            raise RequestRefused("the prompt is empty or only whitespace: give some text")
    if chars > s.max_prompt_chars:
        raise RequestRefused(
            f"the prompt has {chars} characters; the limit is {s.max_prompt_chars}:"
            " shorten it"
        )
    if req.max_new_tokens > s.max_new_tokens_limit:
        raise RequestRefused(
            f"max_new_tokens={req.max_new_tokens} is over this server's limit of "
            f"{s.max_new_tokens_limit}: lower --max-new-tokens"
        )


def check_prompt_ids(ids: list[int], req: GenerateRequest, s: Settings) -> None:
    """Refuse a prompt whose tokens leave no room for the answer."""
    if not ids:
        raise RequestRefused("the prompt tokenises to nothing: give some text")
    if len(ids) + req.max_new_tokens > s.context_limit:
        raise RequestRefused(
            f"the prompt is {len(ids)} tokens and max_new_tokens is {req.max_new_tokens}: "
            f"together over the context limit of {s.context_limit} tokens; shorten the "
            "prompt or lower --max-new-tokens"
        )


def parse_costs(raw: bytes | str | None) -> ServerCosts | None:
    """The server's costs in a ``wisp:load`` snapshot (the adaptive site choice's view of the
    server), or None when there are none yet or the snapshot does not validate (then the
    site choice drafts, as before any measurement)."""
    if not raw:
        return None
    try:
        c = decode(LoadSnapshot, raw).costs
    except ProtocolError as err:
        log.warning("ignoring the load snapshot: %s", err.reason)
        return None
    return None if c is None else ServerCosts(step_ms=c.step_ms, row_ms=c.row_ms, token_ms=c.token_ms,
                                              compute_bound=c.compute_bound, kv_bound=c.kv_bound)


def parse_loads(raw: bytes | str) -> list[VerifierLoad] | None:
    """The verifiers' loads in a ``wisp:load`` snapshot, or None (logged) when it does not
    validate: a malformed snapshot (NaN, a string for a number, a field missing) must not raise
    inside the admission arithmetic and fail every request; without a usable snapshot the
    drafter admits, as it does before the first scheduler publishes one."""
    try:
        snap = decode(LoadSnapshot, raw)
    except ProtocolError as err:
        log.warning("ignoring the load snapshot: %s", err.reason)
        return None
    return [VerifierLoad(name=v.name, backlog_ms=v.backlog_ms, sessions=v.sessions, speed=v.speed,
                         tightest_tpot_slo_ms=v.tightest_tpot_slo_ms, kv_free_tokens=v.kv_free_tokens,
                         kv_waiting=v.kv_waiting) for v in snap.verifiers]


class Admission:
    """Admission control (wisp mode): refuse, with the reason, a request whose SLO the system
    cannot meet at its current load (the scheduler's snapshot in ``wisp:load``), predicted with
    the verify-time model the estimator service publishes (the one the scheduler batches with)."""

    def __init__(self, settings: Settings, bus: Bus, published: PublishedModel) -> None:
        self.settings = settings
        self.bus = bus
        self.published = published

    async def refusal(self, prompt_len: int, ttft_slo_ms: float, tpot_slo_ms: float) -> str | None:
        """Why the request is refused, or None to admit it. Without a snapshot (no scheduler
        yet) the request is admitted."""
        keys = self.bus.keys
        raw, model = await self.bus.get_values(keys.load, keys.estimator_model)
        if raw is None:
            return None
        loads = parse_loads(raw)
        if loads is None:
            return None
        if not loads and any(i.get("ready") for i in (await self.bus.live("verifier")).values()):
            # the snapshot lags a verifier that just became ready (the scheduler registers it
            # on its next pass): admit rather than refuse the first requests after a start
            return None
        self.published.update(model)
        decision = AdmissionController(
            self.published.current, max_batch_size=self.settings.max_batch_size,
            draft_len=max(self.settings.draft_k, 1),
        ).decide(loads, ttft_slo_ms, tpot_slo_ms, prompt_len=prompt_len)
        return None if decision.admit else decision.reason
