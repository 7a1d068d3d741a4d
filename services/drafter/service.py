"""The drafter: the edge device's side of WISP.

It owns its users' sessions: opens them (``admission``: request checks, tokenising with the
target's chat template so draft and target see the same ids, admission control), drafts and
publishes each round (``rounds``), applies each verdict through the session's ``SpecSession``
(fenced by round and base length, so a duplicate or stale verdict is harmless), makes the new
state durable (the session store) before anything is shown or sent, streams committed tokens to
the client (``emitter``) and adopts the sessions of a drafter that died.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from wisp.bus import Bus, Entry, OutputStream, SessionStore
from wisp.cancels import RecentCancels
from wisp.cpus import format_cpus, pin_model_thread
from wisp.policy.controller import DraftLengthPolicy, FixedLength, default_policy
from wisp.policy.learned_estimator import PublishedModel, default_estimator
from wisp.policy.session import SpecSession
from wisp.policy.site import ServerCosts
from wisp.policy.slo import DraftJob, deadline_at, drafting_order
from wisp.protocol import (
    CancelRequest,
    DraftBlock,
    GenerateRequest,
    SessionState,
    SessionTerms,
    Verdict,
)
from wisp.service import Consumer, Service, now
from wisp.services.drafter.admission import (
    Admission,
    RequestRefused,
    check_prompt_ids,
    check_request,
    parse_costs,
)
from wisp.services.drafter.emitter import Emitter
from wisp.services.drafter.rounds import RoundDrafter
from wisp.services.drafter.session import ServedSession, SessionLost, record_of, spec_of
from wisp.settings import Mode, Settings

log = logging.getLogger(__name__)

REQUEST_GROUP = "drafters"
VERDICT_GROUP = "drafter"


class DrafterService(Service):
    role = "drafter"

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        name: str | None = None,
        *,
        policy: DraftLengthPolicy | None = None,
    ) -> None:
        super().__init__(settings, bus, name)
        # wisp mode: the shipped learned controller of the draft model (FixedLength fallback, logged)
        self.policy: DraftLengthPolicy = policy or default_policy(settings)
        # admission control predicts with the model the estimator service publishes (the same
        # one the scheduler batches with); until one is published, the one this target ships
        self.published_model = PublishedModel(default_estimator(settings))
        self.admission = Admission(settings, bus, self.published_model)
        self.sessions: dict[str, ServedSession] = {}
        self.store = SessionStore(bus, settings.output_ttl_s)
        self.output = OutputStream(bus, settings.output_ttl_s)
        self.tokenizer: Any = None
        self.engine: Any = None
        self.eos: frozenset[int] = frozenset()
        self.server_costs: ServerCosts | None = None
        """The server's costs the scheduler last published (adaptive site choice only)."""
        self.rounds = RoundDrafter(self, settings, bus, None, self._costs)
        self.emitter = Emitter(self, self.output, None)
        self.api_url: str | None = None
        """This device's own API (``device_api_loop``), once it listens."""
        self.cancelled = RecentCancels()
        """Recent cancels, from the cancel broadcast."""

    # ------------------------------------------------------------------ setup
    @property
    def speculative(self) -> bool:
        return self.settings.mode != Mode.centralized

    async def setup(self) -> None:
        from wisp import models, tokens

        s = self.settings
        if s.null_models:  # `wisp-cli bench --null-models`: the pipeline's own cost, no model
            from wisp.services.drafter.null_engine import null_drafter

            self.tokenizer, self.eos, self.engine = null_drafter(self.speculative)
        else:
            self.tokenizer = await self.in_worker(models.load_tokenizer, s.target_model, s)
            self.eos = frozenset(await self.in_worker(tokens.eos_token_ids, s.target_model, s))
        if self.speculative and self.engine is None:
            # llama.cpp on the packaged GGUF or torch (settings.draft_backend); same interface
            from wisp.services.drafter.llamacpp_engine import draft_backend, make_draft_engine

            if s.drafter_cpus:  # --isolate-cores: the devices' cores, apart from the verifier's
                cpus = await self.in_worker(pin_model_thread, s.drafter_cpus, draft_backend(s) == "torch")
                log.info("%s: model thread pinned to CPU(s) %s", self.name, format_cpus(cpus))

            self.engine = await self.in_worker(make_draft_engine, s, self.tokenizer)
            await self.in_worker(self._warm_up)
        self.rounds = RoundDrafter(self, s, self.bus, self.engine, self._costs)
        self.emitter = Emitter(self, self.output, self.tokenizer)

    def _warm_up(self) -> None:
        """One small draft so the first request does not pay for paging the weights in."""
        self.engine.draft("__warmup__", [1, 2, 3, 4], 1, 0.0, 1, None)
        self.engine.drop("__warmup__")

    def heartbeat_info(self) -> dict[str, Any]:
        info = {**super().heartbeat_info(), "sessions": len(self.sessions)}
        if self.api_url is not None:
            info["api_url"] = self.api_url
        return info

    def consumers(self) -> list[Consumer]:
        """Requests for any drafter (a shared group: one a dead drafter took is swept to a
        live one), requests for this device, and this device's verdicts, read together so
        their next rounds are drafted in one batched forward."""
        return [
            Consumer(self.keys.requests, REQUEST_GROUP, GenerateRequest, self.on_request, count=1,
                     reclaim=True),
            Consumer(self.keys.device_requests(self.name), REQUEST_GROUP, GenerateRequest,
                     self.on_request, count=1),
            Consumer(self.keys.verdict(self.name), VERDICT_GROUP, Verdict, batch=self.on_verdicts),
        ]

    def _costs(self) -> ServerCosts | None:
        return self.server_costs

    async def costs_loop(self) -> None:
        """The adaptive site choice's view of the server: the costs the scheduler publishes
        with its load snapshot (``wisp:load``, every 0.5 s), read once a second."""
        while not self.stopping.is_set():
            (raw,) = await self.bus.get_values(self.keys.load)
            self.server_costs = parse_costs(raw)
            await self._pause(1.0)

    def loops(self) -> list:
        loops = [self.adopt_loop, self.round_watch_loop, self.cancel_loop]
        if self.rounds.site is not None:
            loops.append(self.costs_loop)
        return [*loops, self.device_api_loop] if self.settings.device_api is True else loops

    async def device_api_loop(self) -> None:
        """Serve the OpenAI-compatible API for this device on loopback (``device_api_*``):
        every request runs here (``api_device``), so an application on the device talks to
        its drafter the way it would talk to Ollama, and no Redis credential leaves the
        drafter. A port already taken is logged and the drafter serves on without its API."""
        from wisp.services.gateway.service import GatewayService

        s = self.settings
        gw = GatewayService(s.model_copy(update={
            "api_host": s.device_api_host, "api_port": s.device_api_port, "api_device": self.name,
        }), self.bus, name=self.name)
        gw.stopping = self.stopping
        try:
            await gw.setup()
        except OSError as err:
            log.warning("%s; serving without this device's API (WISP_DEVICE_API_PORT chooses "
                        "another port, WISP_DEVICE_API=0 turns it off)", err)
            return
        self.api_url = gw.base_url
        log.info("this device's OpenAI-compatible API: %s", self.api_url)
        try:
            await gw.serve_loop()
        finally:
            await gw.teardown()

    # ------------------------------------------------------------------ requests
    async def on_request(self, entry: Entry[GenerateRequest]) -> None:
        """Open a session and publish its first round. A broker error propagates without the
        ack (the request is read again after the outage); everything else is answered."""
        req = entry.msg
        rid = req.request_id
        try:
            if rid in self.sessions:  # re-delivered after a failure: finish what it started
                sess = self.sessions[rid]
                # its opening save failed (the broker dropped the connection): write the record
                # and its terms now, or the scheduler would drop its rounds as belonging to no
                # session until the round timeout re-sent one
                if sess.opened or await self._write_opening(sess):
                    await self._continue(sess)
            elif not await self.store.known(rid):
                # cancelled before it reached a drafter, or while it was tokenised: never
                # opened, nothing drafted
                sess = None if rid in self.cancelled else await self._open(req, entry.added_ts(now()))
                if sess is None or rid in self.cancelled:
                    self.count("cancelled")
                    await self.emitter.error(rid, f"cancelled: {self.cancelled[rid].reason}",
                                             code="cancelled")
                    return
                self.sessions[rid] = sess
                if await self._write_opening(sess):
                    await self._continue(sess)
            elif not await self.store.exists(rid) and not (await self.output.progress(rid))[1]:
                # its terms outlived it but it never finished: the id was used before
                self.count("refused")
                await self.emitter.error(rid, f"request id {rid} was already used; submit with "
                                         "a new one")
            # else: served already, or being served by another drafter (delivered again)
        except SessionLost:
            self.sessions.pop(rid, None)  # another drafter took it first
        except RequestRefused as err:
            from wisp.telemetry import REQUESTS_REFUSED

            REQUESTS_REFUSED.labels(err.code).inc()
            self.count("refused")
            await self.emitter.error(rid, str(err), code=err.code)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise
        except Exception as err:  # a bug must not lose the request silently
            log.exception("request %s failed", rid)
            self.sessions.pop(rid, None)
            await self.emitter.error(rid, f"internal error: {err}", code="internal")

    def _tokenize(self, req: GenerateRequest) -> list[int]:
        """The prompt's ids with the target's tokenizer; a conversation (``messages``) is
        rendered whole with the target's chat template, the way ``encode_prompt`` renders a
        single user turn."""
        from wisp.tokens import encode_prompt

        if req.messages is None:
            return encode_prompt(self.tokenizer, req.prompt, chat_template=req.chat_template)
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestRefused("the target model has no chat template, so it cannot take a "
                                 "conversation: send a plain prompt (/v1/completions) instead")
        turns = [{"role": m.role, "content": m.content} for m in req.messages]
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _open(self, req: GenerateRequest, arrival_ts: float) -> ServedSession:
        s = self.settings
        check_request(req, s)
        ids = await self.in_worker(self._tokenize, req)
        check_prompt_ids(ids, req, s)
        ttft_slo = req.ttft_slo_ms or s.ttft_slo_ms
        tpot_slo = req.tpot_slo_ms or s.tpot_slo_ms
        if s.mode == Mode.wisp:
            why = await self.admission.refusal(len(ids), ttft_slo, tpot_slo)
            if why is not None:
                raise RequestRefused(why, code="overloaded")
        terms = SessionTerms(
            request_id=req.request_id, prompt_len=len(ids), max_new_tokens=req.max_new_tokens,
            temperature=req.temperature, seed=req.seed,
            mode="centralized" if req.speculation == "off" else s.mode.value,
            ttft_slo_ms=ttft_slo, tpot_slo_ms=tpot_slo, arrival_ts=arrival_ts)
        state = SessionState(request=req, device=self.name, prompt_token_ids=ids, started_ts=now(),
                             terms=terms)
        return ServedSession(req=req, state=state,
                             spec=SpecSession(len(ids), req.max_new_tokens, eos=self.eos))

    # ------------------------------------------------------------------ verdicts
    async def on_verdicts(self, entries: list[Entry[Verdict]]) -> None:
        """Apply every verdict read together first (their new states saved, and their tokens
        streamed, in one round trip), then draft all their next rounds in one batched call; the
        verdicts are acked (by the base) only after their rounds are published (one
        re-delivered after a crash re-publishes its round: applying a verdict is idempotent)."""
        pending: list[ServedSession] = []
        applied: list[tuple[ServedSession, SpecSession, Verdict]] = []
        for e in self._in_draft_order(entries):
            await self._apply(e, pending, applied)
        await self._follow_up(await self._save_applied(applied), pending)
        await self._next_rounds(pending)

    async def on_verdict(self, entry: Entry[Verdict], pending: list[ServedSession] | None = None) -> None:
        """Apply a verdict: save the new state, stream its tokens, then draft the next round,
        or, given ``pending``, add the session to it for the caller to draft in a batch."""
        applied: list[tuple[ServedSession, SpecSession, Verdict]] = []
        await self._apply(entry, pending, applied)
        await self._follow_up(await self._save_applied(applied), pending)

    async def _apply(self, entry: Entry[Verdict], pending: list[ServedSession] | None,
                     applied: list[tuple[ServedSession, SpecSession, Verdict]]) -> None:
        """Check a verdict against its session and add the state it leads to to ``applied``
        (saved by the caller). A verdict already applied (re-delivered after a failure) only
        gets its follow-up; an unknown or stale one is counted and dropped."""
        v = entry.msg
        sess = self.sessions.get(v.request_id)
        if sess is None or sess.finished:
            self.count("verdicts_unknown")
            return
        for i, (s, prev, _) in enumerate(applied):
            if s is not sess:
                continue
            # a second verdict of the session in this read: the next round of a server run is
            # applied on top of the first; the same verdict twice (a round verified twice) once
            if (v.round == prev.round and v.base_committed_len == prev.context_len
                    and not prev.done):
                prev.apply(v.tokens, v.drafted, v.accepted, now())
                applied[i] = (sess, prev, v)
            return
        sp = sess.spec
        if v.round == sp.round - 1 and sess.applied_base == v.base_committed_len:
            await self._continue(sess, pending)  # re-delivered after a failure: finish it
            return
        if v.round != sp.round or v.base_committed_len != len(sess.committed):
            self.count("verdicts_stale")
            return
        if self.settings.trace and v.drafted:
            await self._publish_trace(sess, v)  # before apply(): rows carry the pre-round EMA
        if v.drafted and sess.published_block is not None:  # round trip: controller, site choice
            outside_ms = (now() - sess.published_block.sent_ts) * 1000.0 - v.verify_ms
            sess.link.observe_round(v.drafted, v.accepted, outside_ms)
        elif sess.site.on_server:
            sess.site.server_tokens += len(v.tokens)
        new = sp.copy()
        new.apply(v.tokens, v.drafted, v.accepted, now())
        applied.append((sess, new, v))

    async def _save_applied(self, applied: list[tuple[ServedSession, SpecSession, Verdict]],
                            ) -> list[tuple[ServedSession, Verdict]]:
        """1. The new states become durable before anything is shown or sent: each session's
        record is saved (while it still names this drafter) with the committed tokens its
        client lacks streamed in the same atomic script, all in one round trip. A session
        adopted by another drafter is dropped here (logged, counted). Returns the saved ones."""
        if not applied:
            return []
        records = [(record_of(sess, sp, self.name, v.verify_ms), self.emitter.pending(sess, sp))
                   for sess, sp, v in applied]
        oks = await self.store.save_many_if_owner(
            [(st, p.event if p is not None else None) for st, p in records])
        saved = []
        for (sess, sp, v), (st, p), ok in zip(applied, records, oks, strict=True):
            if not ok:
                self.sessions.pop(sess.request_id, None)
                log.warning("%s", SessionLost(f"session {sess.request_id} was adopted by another "
                                              "drafter"))
                self.count("sessions_lost")
                continue
            sess.state, sess.spec, sess.saved_at = st, sp, now()
            if p is not None:
                self.emitter.sent(sess, p)
            saved.append((sess, v))
        return saved

    async def _follow_up(self, saved: list[tuple[ServedSession, Verdict]],
                         pending: list[ServedSession] | None) -> None:
        """2. The idempotent follow-up of each saved verdict (finish the session, or draft its
        next round), re-run if the verdict is delivered again after a failure."""
        for sess, v in saved:
            sess.applied_base = v.base_committed_len
            sess.server_left = v.server_rounds_left
            await self._continue(sess, pending)

    def _in_draft_order(self, entries: list[Entry[Verdict]]) -> list[Entry[Verdict]]:
        """wisp mode: the verdicts read together, in the order their sessions' next rounds should
        be drafted (``drafting_order``: sessions that can still meet their SLOs first, by
        deadline). It orders the verdicts' saves and token streams, and the rows of the batched
        draft: rows that stop at the same step are handed over, and published, in this order.
        sled and centralized keep arrival order. Every verdict of one session gets the same
        key, so their relative order is kept (stable sort)."""
        if str(self.settings.mode) != "wisp" or len(entries) < 2:
            return entries
        jobs: list[DraftJob] = []
        for i, e in enumerate(entries):
            sess = self.sessions.get(e.msg.request_id)
            if sess is None or sess.finished:
                jobs.append(DraftJob(str(i), -math.inf))  # nothing to draft: out of the way first
                continue
            sp = sess.spec
            gen = len(sp.generated)
            deadline = deadline_at(gen, sess.terms.arrival_ts, sess.ttft_slo_ms, sess.tpot_slo_ms,
                                   sp.first_token_ts)
            jobs.append(DraftJob(str(i), deadline, gen, sp.max_new, sess.tpot_slo_ms))
        return [entries[int(k)] for k in drafting_order(jobs, now())]

    # ------------------------------------------------------------------ the session's life
    async def _save(self, sess: ServedSession, adopt_from: SessionState | None = None,
                    spec: SpecSession | None = None, verify_ms: float = 0.0,
                    opening: bool = False) -> None:
        """Write the session record (the whole truth of the session): ``spec`` (by default the
        session's own) becomes the session's state once it is durable. Adopting (``adopt_from``:
        the record read), only if the record is still that one; otherwise only while it still
        names this drafter at this epoch (atomic check-and-set): a drafter whose session was
        adopted elsewhere raises ``SessionLost`` instead of emitting duplicates. (Applying
        verdicts saves through ``_save_applied``.)"""
        sp = spec or sess.spec
        st = record_of(sess, sp, self.name, verify_ms)
        if adopt_from is not None:
            if not await self.store.adopt(st, adopt_from):
                self.sessions.pop(sess.request_id, None)
                raise SessionLost(f"session {sess.request_id} was adopted or saved by another "
                                  "drafter first")
        elif not await self.store.save_if_owner(st, opening=opening):
            self.sessions.pop(sess.request_id, None)
            raise SessionLost(f"session {sess.request_id} was adopted by another drafter")
        sess.state, sess.spec, sess.saved_at = st, sp, now()
        sess.opened = True

    async def _continue(self, sess: ServedSession, pending: list[ServedSession] | None = None) -> None:
        """Bring the outside world up to the saved state: emit the committed tokens the client
        has not been sent, then publish this round's block once (or finish once). With
        ``pending``, the round is left to the caller's batched drafting instead. Nothing for a
        session that ended meanwhile (given up while this verdict was being saved)."""
        if sess.finished or self.sessions.get(sess.request_id) is not sess:
            return
        await self.emitter.catch_up(sess)
        if sess.spec.done:
            await self._finish(sess)
        elif sess.published_round != sess.spec.round:
            if sess.server_left > 0:  # the server makes this round by itself (a server run)
                self.rounds.server_continues(sess, sess.server_left)
            elif pending is None:
                await self._next_rounds([sess])
            elif all(x is not sess for x in pending):
                pending.append(sess)

    def _draft_len_policy(self, sess: ServedSession) -> DraftLengthPolicy:
        """The request's own choice (``speculation``: off or a fixed k) or this drafter's."""
        spec = sess.req.speculation
        if spec == "off":
            return FixedLength(0)
        if isinstance(spec, int):
            return FixedLength(spec)
        return self.policy

    async def _next_rounds(self, sessions: list[ServedSession]) -> None:
        """Draft these sessions' rounds (together) and publish each block."""
        plans = []
        for sess in sessions:
            policy = self._draft_len_policy(sess)
            plans.append(self.rounds.plan(sess, policy, own=policy is self.policy))
        await self.rounds.run(plans)

    async def _finish(self, sess: ServedSession) -> None:
        await self.emitter.done(sess)
        await self._drop(sess)
        self.count("finished")

    async def _drop(self, sess: ServedSession) -> None:
        """Forget a session that ended (done, or given up with an error event)."""
        rid = sess.request_id
        self.sessions.pop(rid, None)
        sess.finished = True
        await self.store.delete(rid)
        if self.engine is not None:
            await self.in_worker(self.engine.drop, rid)

    async def _publish_trace(self, sess: ServedSession, v: Verdict) -> None:
        from wisp.trace import trace_rows

        if len(sess.last_features) < v.drafted:  # e.g. a round drafted before this session was resumed
            self.count("trace_skipped")
            return
        rows = trace_rows(
            request_id=v.request_id, round=v.round, features=sess.last_features,
            recent_acceptance=sess.spec.stats.recent_acceptance, drafted=v.drafted,
            accepted=v.accepted, context_len=v.base_committed_len, device=self.name,
            mode=str(self.settings.mode),
        )
        for row in rows:
            await self.bus.publish(self.keys.trace, row, maxlen=1_000_000)
        self.count("trace_rows", len(rows))

    # ------------------------------------------------------------------ lost rounds
    async def round_watch_loop(self) -> None:
        """No request hangs on a lost round. A round whose verdict has not come
        ``round_timeout_s`` after its block was published (dead-lettered on the way, dropped in
        an upgrade, lost with Redis' last second of writes) is published again: verification
        is idempotent (only one verdict per round is ever applied; a seeded round verified twice
        gives the same one), and one the scheduler still holds is dropped as a duplicate. The
        record and terms are written again first, in case they were lost with the round. After
        ``round_resends`` re-sends the request ends with an error event rather than at the
        client's idle timeout."""
        s = self.settings
        while not self.stopping.is_set():
            await self._pause(min(1.0, s.round_timeout_s / 4))
            if not await self.current():  # a paused earlier life: these are not ours any more
                return
            t = now()
            overdue = [x for x in list(self.sessions.values())
                       if not x.finished and x.published_block is not None
                       and x.published_round == x.spec.round
                       and t - x.published_at > s.round_timeout_s]
            for sess in overdue:
                await self.resend(sess, sess.published_block)
            # a session whose verdict was saved but whose next step keeps failing (its verdict
            # dead-lettered after max_deliveries) has no round in flight to wait for
            stuck = [x for x in list(self.sessions.values())
                     if not x.finished and x.published_round != x.spec.round
                     and t - x.saved_at > s.round_timeout_s]
            for sess in stuck:
                if not sess.opened:  # its opening save failed and its request never came back
                    await self._open_late(sess)
                    continue
                await self._give_up(sess, f"its next round could not be started in "
                                    f"{s.round_timeout_s:.0f} s (see the drafter's log)")

    async def _open_late(self, sess: ServedSession) -> None:
        """A session held since its opening save failed in an outage, whose request was not
        read here again (another drafter reclaimed it during a long outage): if the request was
        opened elsewhere (a record naming another drafter, or terms left by a session that
        ended), it is not ours, and is forgotten without touching its record or its client's
        stream; otherwise it is opened now and served."""
        rid = sess.request_id
        answered = (await self.output.progress(rid))[1]  # refused or ended by another drafter
        if (answered or rid in self.cancelled
                or (await self.store.known(rid) and not await self.store.exists(rid))):
            self.sessions.pop(rid, None)  # opened and ended by another drafter
            self.count("sessions_opened_elsewhere")
            return
        try:
            opened = await self._write_opening(sess)
        except SessionLost:  # opened by another drafter, which serves it
            self.count("sessions_opened_elsewhere")
            return
        if opened:
            await self._continue(sess)

    async def _write_opening(self, sess: ServedSession) -> bool:
        """Write a new session's record and terms (``_save``, opening; ``SessionLost`` if
        another drafter holds it). False: the session was cancelled while they were written,
        so the record is deleted again and nothing is to be drafted."""
        await self._save(sess, opening=True)
        if sess.finished or self.sessions.get(sess.request_id) is not sess:
            await self.store.delete(sess.request_id)
            return False
        return True

    async def _give_up(self, sess: ServedSession, why: str) -> None:
        """End a session with an error event. It is forgotten and its record deleted first,
        so a verdict applied meanwhile can neither be saved (the record is gone) nor streamed
        after the error."""
        log.error("request %s: %s; giving up", sess.request_id, why)
        self.count("sessions_given_up")
        sess.finished = True
        await self._drop(sess)
        await self.emitter.error(sess.request_id, f"{why}; the request was stopped", code="internal")

    def _overdue(self, sess: ServedSession, block: DraftBlock | None) -> bool:
        """``sess`` is still ours, unfinished, and waiting for the verdict of ``block`` for
        longer than ``round_timeout_s`` (asked again right before acting: a verdict may have
        come while another session's re-send was being written)."""
        return (self.sessions.get(sess.request_id) is sess and not sess.finished
                and block is not None and sess.published_block is block
                and sess.published_round == sess.spec.round
                and now() - sess.published_at > self.settings.round_timeout_s)

    async def resend(self, sess: ServedSession, block: DraftBlock | None) -> None:
        """Publish the round in flight again, or give its request up with an error. The session
        record (and its terms) is written again first: a round lost with Redis' last second of
        writes may have taken them along, and a verifier needs the record, the scheduler the
        terms."""
        if not self._overdue(sess, block):
            return
        assert block is not None
        if sess.resends >= self.settings.round_resends:
            await self._give_up(sess, f"round {block.round} got no verdict in "
                                f"{(sess.resends + 1) * self.settings.round_timeout_s:.0f} s (are "
                                "the scheduler and a verifier running? `wisp-cli status`)")
            return
        sess.resends += 1
        sess.published_at = now()
        if not await self.store.save_if_owner(sess.state, opening=True):
            self.sessions.pop(sess.request_id, None)
            log.warning("%s", SessionLost(f"session {sess.request_id} was adopted by another "
                                          "drafter"))
            return
        sess.opened = True
        if sess.finished or sess.published_block is not block:  # its verdict came meanwhile
            return
        self.count("rounds_resent")
        log.warning("request %s: no verdict for round %d in %.0f s; publishing it again (%d of %d)",
                    sess.request_id, block.round, self.settings.round_timeout_s, sess.resends,
                    self.settings.round_resends)
        await self.bus.publish(self.keys.draft, block)

    # ------------------------------------------------------------------ cancels
    async def cancel_loop(self) -> None:
        """Follow the cancel broadcast (``wisp.cancels``): a request cancelled before it was
        opened or adopted here ends as soon as it is."""
        from wisp.cancels import follow_cancels

        await follow_cancels(self.bus, self.cancelled, self.on_cancel, self.stopping,
                             now_s=now(), block_ms=self.settings.block_ms, role="drafter")

    async def on_cancel(self, c: CancelRequest) -> None:
        """End the session if it is ours (``follow_cancels`` has remembered the cancel).
        Harmless for a request this drafter does not serve, one that finished, or one
        cancelled twice."""
        sess = self.sessions.get(c.request_id)
        if sess is None or sess.finished:
            self.count("cancels_ignored")
            return
        await self._cancel(sess, c)

    async def _cancel(self, sess: ServedSession, c: CancelRequest) -> None:
        """End a session the way a finished one ends (record deleted, terms kept as its
        tombstone, draft KV freed), so no round of it is drafted again: a verdict still in
        flight finds no session and is dropped. The client gets the last event after the
        record is gone, so nothing can be streamed after it: an ``ErrorEvent`` of code
        ``cancelled``, or (``finish="stop"``: the client's stop string appeared) a
        ``DoneEvent`` of what was committed, with its figures."""
        log.info("request %s cancelled (%s): %s", sess.request_id, c.finish, c.reason)
        self.count("cancelled")
        await self._drop(sess)
        if c.finish == "stop":
            await self.emitter.done(sess, finish_reason="stop")
        else:
            await self.emitter.error(sess.request_id, f"cancelled: {c.reason}", code="cancelled")

    # ------------------------------------------------------------------ adoption
    async def adopt_loop(self) -> None:
        """Resume sessions whose drafter is gone: our own after a restart (same name), and
        those of a drafter whose heartbeat expired (one adopter per session, by a lock)."""
        while not self.stopping.is_set():
            if not await self.current():  # a later life of this name adopts them, not this one
                return
            live = set(await self.bus.live("drafter")) | {self.name}
            async for st in self.store.all():
                rid = st.request.request_id
                if rid in self.sessions or (st.device in live and st.device != self.name):
                    continue
                if not await self.store.lock_adoption(rid, self.name):
                    continue
                try:
                    await self.resume(st)
                except SessionLost as err:  # another drafter adopted (or its owner saved) first
                    log.info("%s", err)
                except Exception:  # a broken session must not stop the others' adoption
                    log.exception("could not resume session %s", rid)
            await self._pause(self.settings.reclaim_interval_s)

    async def resume(self, read: SessionState) -> None:
        """Take over a session from its record: re-emit committed tokens the client never got,
        then re-draft the round that was in flight (its verdict went to the old drafter).
        The adoption comes first (a check-and-set against the record as read, at the next
        epoch), so the old owner can no longer move the session or its output while we read
        how far the client got."""
        rid = read.request.request_id
        st = read.model_copy(update={"epoch": read.epoch + 1})  # fences every earlier owner out
        sess = ServedSession(req=st.request, state=st, spec=spec_of(st, self.eos))
        self.sessions[rid] = sess
        try:
            await self._save(sess, adopt_from=read)  # now ours: verdicts of the next round come to us
        except BaseException:
            # not adopted (a broker error): forget it, so the adoption scan tries it again
            if self.sessions.get(rid) is sess:
                self.sessions.pop(rid, None)
            raise
        if rid in self.cancelled:  # cancelled while its drafter was gone: end it, draft nothing
            await self._cancel(sess, self.cancelled[rid])
            return
        emitted, done = await self.output.progress(rid)
        if done:
            await self._drop(sess)
            return
        emitted = min(emitted, len(st.generated))
        sess.text = self.tokenizer.decode(st.generated[:emitted], skip_special_tokens=True)
        sess.emitted = emitted
        log.info("resumed session %s at round %d (%d tokens committed, %d emitted)",
                 rid, st.round, len(st.generated), emitted)
        self.count("resumed")
        await self._continue(sess)  # re-emit what the client lacks, re-draft the open round
