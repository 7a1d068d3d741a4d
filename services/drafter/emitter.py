"""What the client sees of a session: committed tokens as text deltas, then one final event
with the request's figures (TTFT, TPOT, speculation statistics), on its output stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wisp.bus import OutputStream
from wisp.policy.session import SpecSession
from wisp.protocol import DoneEvent, ErrorEvent, TokenEvent
from wisp.service import Service, now
from wisp.services.drafter.session import ServedSession


@dataclass(frozen=True)
class PendingTokens:
    """A token event about to be written, and what the session will have sent once it is."""

    event: TokenEvent
    text: str
    """The detokenised text sent so far, this event's delta included."""
    emitted: int
    """Generated tokens sent, this event's included."""


class Emitter:
    """Writes a drafter's sessions' output streams (``tokenizer`` detokenises)."""

    def __init__(self, service: Service, output: OutputStream, tokenizer: Any) -> None:
        self.service = service
        self.output = output
        self.tokenizer = tokenizer

    async def catch_up(self, sess: ServedSession) -> None:
        """Send the committed tokens the client has not been sent."""
        pending = self.pending(sess, sess.spec)
        if pending is not None:
            await self.output.emit(sess.request_id, pending.event)
            self.sent(sess, pending)

    def pending(self, sess: ServedSession, sp: SpecSession) -> PendingTokens | None:
        """The event that brings the client up to ``sp`` (None: nothing new), not sent yet:
        the drafter writes it together with the session record that holds those tokens, then
        calls ``sent``. The text delta waits while the text ends in a partial character (a
        multi-byte character split across tokens), unless the session is over."""
        generated = sp.generated
        if sess.emitted >= len(generated):
            return None
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        delta, new_text = "", sess.text
        if not text.endswith("\ufffd") or sp.done:
            delta, new_text = text[len(sess.text):], text
        rid = sess.request_id
        event = TokenEvent(request_id=rid, index=sess.emitted, token_ids=generated[sess.emitted:],
                           text=delta, ts=sp.last_token_ts or now())
        return PendingTokens(event, new_text, len(generated))

    def sent(self, sess: ServedSession, pending: PendingTokens) -> None:
        """``pending`` is in the output stream: the client has been sent it."""
        sess.text, sess.emitted = pending.text, pending.emitted
        self.service.count("events")

    async def done(self, sess: ServedSession, finish_reason: str | None = None) -> DoneEvent:
        """The final event: the whole output and the request's figures. ``finish_reason``:
        the session's own unless given (``stop``: a client's stop string ended it early)."""
        st, sp = sess.state, sess.spec
        rid = sess.request_id
        t0 = sess.terms.arrival_ts  # not the client's own claim (it could make these anything)
        first = sp.first_token_ts or now()
        last = sp.last_token_ts or first
        n = len(sp.generated)
        done = DoneEvent(
            request_id=rid,
            text=self.tokenizer.decode(sp.generated, skip_special_tokens=True),
            token_ids=list(sp.generated),
            prompt_token_ids=st.prompt_token_ids,
            finish_reason="stop" if (finish_reason or sp.finish) == "stop" else "length",
            mode=st.terms.mode,
            ttft_ms=(first - t0) * 1000.0,
            tpot_ms=((last - first) / (n - 1) * 1000.0) if n > 1 else 0.0,
            e2e_ms=(last - t0) * 1000.0,
            rounds=sp.stats.rounds,
            drafted_tokens=sp.stats.drafted,
            accepted_tokens=sp.stats.accepted,
            draft_ms_total=sp.draft_ms,
            wasted_draft_ms=sp.wasted_ms,
            verify_ms_total=st.verify_ms,
            overhead_ms=max(0.0, (last - t0) * 1000.0 - sp.draft_ms - st.verify_ms),
            ttft_slo_ms=sess.ttft_slo_ms,
            tpot_slo_ms=sess.tpot_slo_ms,
            device=self.service.name,
        )
        await self._emit(rid, done)
        _observe_done(done)
        return done

    async def error(self, request_id: str, error: str, code: str = "bad_request") -> None:
        await self._emit(request_id, ErrorEvent(request_id=request_id, error=error, code=code))

    async def _emit(self, request_id: str, event: TokenEvent | DoneEvent | ErrorEvent) -> None:
        await self.output.emit(request_id, event)
        self.service.count("events")


def _observe_done(done: DoneEvent) -> None:
    from wisp.telemetry import REQUESTS_FINISHED, SLO_ATTAINED, TPOT_SECONDS, TTFT_SECONDS

    TTFT_SECONDS.observe(done.ttft_ms / 1000.0)
    if len(done.token_ids) > 1:
        TPOT_SECONDS.observe(done.tpot_ms / 1000.0)
    REQUESTS_FINISHED.inc()
    if done.ttft_ms <= done.ttft_slo_ms and done.tpot_ms <= done.tpot_slo_ms:
        SLO_ATTAINED.inc()
