"""The drafter: the edge device's side of WISP.

It owns its users' sessions: tokenises the prompt (with the target's chat template, so draft and
target see the same ids), drafts each round with its own KV cache, publishes the block, applies
the verdict (fenced by round and base length, so a duplicate or stale verdict is harmless),
streams committed tokens to the client and decides when a request is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from wisp.bus import Bus, Entry, OutputStream, SessionStore
from wisp.policy.controller import DraftLengthPolicy, FixedLength, SessionSpecStats, default_policy
from wisp.policy.learned_estimator import PublishedModel, default_estimator
from wisp.policy.session import SpecSession, expected_commit
from wisp.policy.slo import DraftJob, deadline_at, drafting_order
from wisp.protocol import (
    DoneEvent,
    DraftBlock,
    ErrorEvent,
    GenerateRequest,
    SessionState,
    TokenEvent,
    Verdict,
    WireDist,
    WireFeatures,
    WireModel,
    digest_ids,
)
from wisp.service import Consumer, Service, now
from wisp.settings import Mode, Settings
from wisp.specdec import round_generator

log = logging.getLogger(__name__)

REQUEST_GROUP = "drafters"
VERDICT_GROUP = "drafter"


class RequestRefused(ValueError):
    """A request the drafter will not serve; the message says what to fix."""


class SessionLost(RuntimeError):
    """Another drafter adopted this session (we were presumed dead); stop serving it."""




@dataclass
class _Session:
    """A served session: its persisted record, its speculation state (``SpecSession``, the
    object the simulator and the trainers run too) and what only this drafter tracks."""

    req: GenerateRequest
    state: SessionState
    """The record as last saved (request, prompt ids, SLOs, mode; the rest comes from ``spec``)."""
    spec: SpecSession
    text: str = ""
    last_features: list[WireFeatures] = field(default_factory=list)  # for trace rows
    finished: bool = False
    emitted: int = 0
    """Generated tokens sent to the client's stream."""
    published_round: int = -1
    """The round whose block was published (a round is published once)."""
    applied_base: int = -1
    """base_committed_len of the last verdict applied (to recognise its re-delivery)."""

    @property
    def ttft_slo_ms(self) -> float:
        return self.state.ttft_slo_ms or 0.0

    @property
    def tpot_slo_ms(self) -> float:
        return self.state.tpot_slo_ms or 0.0

    @property
    def committed(self) -> list[int]:
        return self.state.prompt_token_ids + self.spec.generated


@dataclass
class _RoundPlan:
    """A round about to be drafted: the session, the ids it builds on, the engine call."""

    sess: _Session
    committed: list[int]
    call: Any
    prefill: bool
    """A draft-less first round whose draft-model prefill runs in the background."""


def spec_of(st: SessionState, eos: frozenset[int]) -> SpecSession:
    """A session's speculation state from its saved record (a resumed session goes on where
    the record stands)."""
    stats = SessionSpecStats(rounds=st.rounds_done, drafted=st.drafted, accepted=st.accepted,
                             recent_acceptance=st.recent_acceptance,
                             draft_ms_per_token=st.draft_ms_per_token)
    return SpecSession(len(st.prompt_token_ids), st.request.max_new_tokens, eos=eos,
                       generated=list(st.generated), round=st.round, stats=stats, draft_ms=st.draft_ms,
                       wasted_ms=st.wasted_draft_ms, first_token_ts=st.first_token_ts,
                       last_token_ts=st.last_token_ts, finish=finish_of(st.generated,
                                                                       st.request.max_new_tokens, eos))


def finish_of(generated: list[int], max_new: int, eos: frozenset[int]) -> str | None:
    """Why a saved session is over (None: it is not)."""
    if generated and generated[-1] in eos:
        return "stop"
    if len(generated) >= max_new:
        return "length"
    return None


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
        self.sessions: dict[str, _Session] = {}
        self.store = SessionStore(bus, settings.output_ttl_s)
        self.output = OutputStream(bus, settings.output_ttl_s)
        self.tokenizer: Any = None
        self.engine: Any = None
        self.eos: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ setup
    @property
    def speculative(self) -> bool:
        return self.settings.mode != Mode.centralized

    async def setup(self) -> None:
        from wisp import models, tokens

        s = self.settings
        self.tokenizer = await self.in_worker(models.load_tokenizer, s.target_model, s)
        self.eos = frozenset(await self.in_worker(tokens.eos_token_ids, s.target_model, s))
        if self.speculative:
            from wisp.services.drafter.engine import DraftEngine

            model = await self.in_worker(models.load_model, s.draft_model, s)
            self.engine = DraftEngine(model, max_sessions=s.draft_sessions)
            await self.in_worker(self._warm_up)

    def _warm_up(self) -> None:
        """One small draft so the first request does not pay for paging the weights in."""
        self.engine.draft("__warmup__", [1, 2, 3, 4], 1, 0.0, 1, None)
        self.engine.drop("__warmup__")

    def heartbeat_info(self) -> dict[str, Any]:
        return {**super().heartbeat_info(), "sessions": len(self.sessions)}

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

    def loops(self) -> list:
        return [self.adopt_loop]

    # ------------------------------------------------------------------ resume
    async def adopt_loop(self) -> None:
        """Resume sessions whose drafter is gone: our own after a restart (same name), and
        those of a drafter whose heartbeat expired (one adopter per session, by a lock)."""
        while not self.stopping.is_set():
            live = set(await self.bus.live("drafter")) | {self.name}
            async for st in self.store.all():
                rid = st.request.request_id
                if rid in self.sessions or (st.device in live and st.device != self.name):
                    continue
                if not await self.store.lock_adoption(rid, self.name):
                    continue
                try:
                    await self.resume(st)
                except Exception:  # a broken session must not stop the others' adoption
                    log.exception("could not resume session %s", rid)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.reclaim_interval_s)

    async def resume(self, st: SessionState) -> None:
        """Take over a session from its record: re-emit committed tokens the client never got,
        then re-draft the round that was in flight (its verdict went to the old drafter)."""
        rid = st.request.request_id
        emitted, done = await self.output.progress(rid)
        if done:
            await self.store.delete(rid)
            return
        st = st.model_copy(update={"ttft_slo_ms": st.ttft_slo_ms or self.settings.ttft_slo_ms,
                                   "tpot_slo_ms": st.tpot_slo_ms or self.settings.tpot_slo_ms})
        sess = _Session(req=st.request, state=st, spec=spec_of(st, self.eos))
        sess.text = self.tokenizer.decode(st.generated[:emitted], skip_special_tokens=True)
        sess.emitted = emitted
        self.sessions[rid] = sess
        await self._save(sess, adopt=True)  # now ours: verdicts of the next round come to us
        log.info("resumed session %s at round %d (%d tokens committed, %d emitted)",
                 rid, st.round, len(st.generated), emitted)
        self.count("resumed")
        await self._continue(sess)  # re-emit what the client lacks, re-draft the open round

    # ------------------------------------------------------------------ verdicts
    async def on_verdicts(self, entries: list[Entry[Verdict]]) -> None:
        """Apply every verdict read together first, then draft all their next rounds in one
        batched call; the verdicts are acked (by the base) only after their rounds are
        published (one re-delivered after a crash re-publishes its round: ``on_verdict`` is
        idempotent)."""
        pending: list[_Session] = []
        for e in self._in_draft_order(entries):
            try:
                await self.on_verdict(e, pending)
            except SessionLost as err:
                log.warning("%s", err)
                self.count("sessions_lost")
        await self._next_rounds(pending)

    def _in_draft_order(self, entries: list[Entry[Verdict]]) -> list[Entry[Verdict]]:
        """wisp mode: the verdicts read together, in the order their sessions' next rounds should
        be drafted (``drafting_order``: sessions that can still meet their SLOs first, by
        deadline). It orders the verdicts' saves and token streams, and the rows of the batched
        draft: rows that stop at the same step are handed over, and published, in this order.
        (It was written when the drafter drafted one session at a time, and was then the queue
        in front of it; batched drafting left it this smaller role.) sled and centralized keep
        arrival order. Every verdict of one session gets the same key, so their relative order
        is kept (stable sort)."""
        if str(self.settings.mode) != "wisp" or len(entries) < 2:
            return entries
        t = now()
        jobs: list[DraftJob] = []
        for i, e in enumerate(entries):
            sess = self.sessions.get(e.msg.request_id)
            if sess is None or sess.finished:
                jobs.append(DraftJob(str(i), -math.inf))  # nothing to draft: out of the way first
                continue
            sp = sess.spec
            gen = len(sp.generated)
            deadline = deadline_at(gen, sess.req.submitted_ts, sess.ttft_slo_ms, sess.tpot_slo_ms,
                                   sp.first_token_ts)
            jobs.append(DraftJob(str(i), deadline, gen, sp.max_new, sess.tpot_slo_ms))
        return [entries[int(k)] for k in drafting_order(jobs, t)]

    # ------------------------------------------------------------------ requests
    async def on_request(self, entry: Entry[GenerateRequest]) -> None:
        """Open a session and publish its first round. A broker error propagates without the
        ack (the request is read again after the outage); everything else is answered."""
        req = entry.msg
        rid = req.request_id
        try:
            if rid in self.sessions:  # re-delivered after a failure: finish what it started
                await self._continue(self.sessions[rid])
            elif not await self.store.exists(rid):
                sess = await self._open(req)
                self.sessions[rid] = sess
                await self._save(sess)
                await self._continue(sess)
            # else: another drafter serves it already (the request was redelivered)
        except SessionLost:
            self.sessions.pop(rid, None)  # another drafter took it first
        except RequestRefused as err:
            from wisp.telemetry import REQUESTS_REFUSED

            REQUESTS_REFUSED.labels("bad_request").inc()
            self.count("refused")
            await self._emit(rid, ErrorEvent(request_id=rid, error=str(err)))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise
        except Exception as err:  # a bug must not lose the request silently
            log.exception("request %s failed", rid)
            self.sessions.pop(rid, None)
            await self._emit(rid, ErrorEvent(request_id=rid, error=f"internal error: {err}",
                                             code="internal"))

    def _tokenize(self, req: GenerateRequest) -> list[int]:
        from wisp.tokens import encode_prompt

        return encode_prompt(self.tokenizer, req.prompt, chat_template=req.chat_template)

    async def _open(self, req: GenerateRequest) -> _Session:
        s = self.settings
        if not req.prompt.strip():
            raise RequestRefused("the prompt is empty or only whitespace: give some text")
        if len(req.prompt) > s.max_prompt_chars:
            raise RequestRefused(
                f"the prompt has {len(req.prompt)} characters; the limit is {s.max_prompt_chars}:"
                " shorten it"
            )
        if req.max_new_tokens > s.max_new_tokens_limit:
            raise RequestRefused(
                f"max_new_tokens={req.max_new_tokens} is over this server's limit of "
                f"{s.max_new_tokens_limit}: lower --max-new-tokens"
            )
        ids = await self.in_worker(self._tokenize, req)
        if not ids:
            raise RequestRefused("the prompt tokenises to nothing: give some text")
        if len(ids) + req.max_new_tokens > s.context_limit:
            raise RequestRefused(
                f"the prompt is {len(ids)} tokens and max_new_tokens is {req.max_new_tokens}: "
                f"together over the context limit of {s.context_limit} tokens; shorten the "
                "prompt or lower --max-new-tokens"
            )
        ttft_slo = req.ttft_slo_ms or s.ttft_slo_ms
        tpot_slo = req.tpot_slo_ms or s.tpot_slo_ms
        if s.mode == Mode.wisp:
            why = await self._refusal(len(ids), ttft_slo, tpot_slo)
            if why is not None:
                raise RequestRefused(why)
        state = SessionState(
            request=req, device=self.name, prompt_token_ids=ids, started_ts=now(),
            ttft_slo_ms=ttft_slo, tpot_slo_ms=tpot_slo, mode=self._mode_of(req),
        )
        return _Session(req=req, state=state, spec=SpecSession(len(ids), req.max_new_tokens, eos=self.eos))

    async def _refusal(self, prompt_len: int, ttft_slo_ms: float, tpot_slo_ms: float) -> str | None:
        """Admission control (wisp mode): refuse, with the reason, a request whose SLO the
        system cannot meet at its current load (the scheduler's snapshot in `wisp:load`).
        Without a snapshot (no scheduler yet) the request is admitted."""
        import json

        from wisp.policy.slo import AdmissionController, VerifierLoad

        raw, model = await self.bus.get_values(self.keys.load, self.keys.estimator_model)
        if raw is None:
            return None
        try:
            loads = [VerifierLoad(**v) for v in json.loads(raw)["verifiers"]]
        except (ValueError, KeyError, TypeError):
            return None
        if not loads and any(i.get("ready") for i in (await self.bus.live("verifier")).values()):
            # the snapshot lags a verifier that just became ready (the scheduler registers it
            # on its next pass): admit rather than refuse the first requests after a start
            return None
        self.published_model.update(model)
        decision = AdmissionController(
            self.published_model.current, max_batch_size=self.settings.max_batch_size,
            draft_len=max(self.settings.draft_k, 1),
        ).decide(loads, ttft_slo_ms, tpot_slo_ms, prompt_len=prompt_len)
        return None if decision.admit else decision.reason

    # ------------------------------------------------------------------ rounds
    def _draft_len_policy(self, sess: _Session) -> DraftLengthPolicy:
        spec = sess.req.speculation
        if not self.speculative or spec == "off":
            return FixedLength(0)
        if isinstance(spec, int):
            return FixedLength(spec)
        return self.policy

    def _mode_of(self, req: GenerateRequest) -> str:
        return "centralized" if req.speculation == "off" else str(self.settings.mode)

    async def _save(self, sess: _Session, adopt: bool = False, spec: SpecSession | None = None,
                    verify_ms: float = 0.0) -> None:
        """Write the session record (the whole truth of the session) to Redis: ``spec`` (by
        default the session's own) becomes the session's state once it is durable. Unless
        adopting, only while the record still names this drafter (atomic check-and-set): a
        drafter whose session was adopted elsewhere raises ``SessionLost`` instead of emitting
        duplicates."""
        sp = spec or sess.spec
        stats = sp.stats
        st = sess.state.model_copy(update={
            "device": self.name, "generated": list(sp.generated), "round": sp.round,
            "first_token_ts": sp.first_token_ts, "last_token_ts": sp.last_token_ts,
            "rounds_done": stats.rounds, "drafted": stats.drafted, "accepted": stats.accepted,
            "recent_acceptance": stats.recent_acceptance, "draft_ms_per_token": stats.draft_ms_per_token,
            "draft_ms": sp.draft_ms, "wasted_draft_ms": sp.wasted_ms,
            "verify_ms": sess.state.verify_ms + verify_ms,
        })
        if adopt:
            await self.store.adopt(st)
        elif not await self.store.save_if_owner(st):
            self.sessions.pop(st.request.request_id, None)
            raise SessionLost(f"session {st.request.request_id} was adopted by another drafter")
        sess.state, sess.spec = st, sp

    def _plan(self, sess: _Session) -> _RoundPlan:
        """This round's drafting call (``call`` is None when nothing is to be drafted)."""
        committed = sess.committed
        plan = sess.spec.plan(self._draft_len_policy(sess), can_draft=self.engine is not None)
        call = None
        if plan.max_k > 0:
            from wisp.services.drafter.engine import DraftCall  # torch: only where drafting happens

            req = sess.req
            gen = (round_generator(req.seed, req.request_id, plan.round, "draft")
                   if req.temperature > 0 else None)
            call = DraftCall(req.request_id, committed, plan.max_k, req.temperature,
                             self.settings.draft_top_k, gen, plan.stop)
        return _RoundPlan(sess, committed, call, plan.prefill)

    async def _next_round(self, sess: _Session) -> None:
        """Draft this round and publish its block (the session record is already saved)."""
        await self._next_rounds([sess])

    async def _next_rounds(self, sessions: list[_Session]) -> None:
        """Draft these sessions' rounds, together (one batched forward per token step, see
        ``DraftEngine.draft_many``) when there are several, and publish each block."""
        plans = [self._plan(sess) for sess in sessions]
        drafting = [p for p in plans if p.call is not None]
        for p in plans:  # nothing to draft (prefill rounds, centralized): send at once
            if p.call is None:
                await self._publish_round(p, None)
        if not drafting:
            return
        # each round is published the moment its row of the batch stops (the engine hands it
        # over from its thread), not when the batch's longest round is done; None, queued
        # after every hand-over, says the call has returned (or failed)
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()

        def run() -> None:
            try:
                self.engine.draft_many([p.call for p in drafting], 0,
                                       lambda i, out: loop.call_soon_threadsafe(ready.put_nowait, (i, out)))
            finally:
                loop.call_soon_threadsafe(ready.put_nowait, None)

        work = asyncio.ensure_future(self.in_worker(run))
        if len(drafting) > 1:
            self.count("batched_drafts")
        while (item := await ready.get()) is not None:
            await self._publish_round(drafting[item[0]], item[1])
        await work  # re-raise a failure of the batch

    async def _publish_round(self, p: _RoundPlan, out: Any) -> None:
        sess, committed = p.sess, p.committed
        sp = sess.spec
        tokens: list[int] = []
        dists: list[WireDist] | None = None
        feats: list[WireFeatures] = []
        draft_ms, passes = 0.0, 0
        if out is not None:
            tokens = list(out.tokens)
            draft_ms, passes = out.draft_ms, out.forward_passes
            if out.dists is not None:
                dists = [WireDist(token_ids=list(d.token_ids), probs=list(d.probs)) for d in out.dists]
            feats = [
                WireFeatures(
                    top1_prob=f.top1_prob, entropy=f.entropy, margin=f.margin,
                    logit_spread=f.logit_spread,
                )
                for f in out.features[: len(tokens)]
            ]
        sp.drafted(draft_ms, passes)
        sess.last_features = feats
        block = DraftBlock(
            request_id=sess.req.request_id,
            device=self.name,
            round=sp.round,
            base_committed_len=len(committed),
            prompt_len=sp.prompt_len,
            committed_digest=digest_ids(committed),
            draft_tokens=tokens,
            draft_dists=dists,
            features=feats,
            temperature=sess.req.temperature,
            seed=sess.req.seed,
            mode=str(self.settings.mode),
            draft_ms=draft_ms,
            request_ts=sess.req.submitted_ts,
            sent_ts=now(),
            ttft_slo_ms=sess.ttft_slo_ms,
            tpot_slo_ms=sess.tpot_slo_ms,
            generated_len=len(sp.generated),
            max_new_tokens=sp.max_new,
            first_token_ts=sp.first_token_ts,
            expected_commit=expected_commit(f.top1_prob for f in feats),
        )
        await self.bus.publish(self.keys.draft, block)
        sess.published_round = sp.round
        self.count("blocks")
        if p.prefill:
            # a prefill round: the server's prefill makes the first token while we prefill the
            # draft model here (queued on the one torch worker, so the next draft waits for it)
            task = asyncio.ensure_future(self.in_worker(self.engine.prefill, sess.req.request_id, committed))
            task.add_done_callback(_log_failure)

    async def on_verdict(self, entry: Entry[Verdict], pending: list[_Session] | None = None) -> None:
        """Apply a verdict: save the new state, stream its tokens, then draft the next round,
        or, given ``pending``, add the session to it for the caller to draft in a batch."""
        v = entry.msg
        sess = self.sessions.get(v.request_id)
        if sess is None or sess.finished:
            self.count("verdicts_unknown")
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
        # 1. the new state becomes durable before anything is shown or sent
        new = sp.copy()
        new.apply(v.tokens, v.drafted, v.accepted, now())
        await self._save(sess, spec=new, verify_ms=v.verify_ms)
        sess.applied_base = v.base_committed_len
        # 2. idempotent follow-up, re-run if this verdict is delivered again after a failure
        await self._continue(sess, pending)

    async def _continue(self, sess: _Session, pending: list[_Session] | None = None) -> None:
        """Bring the outside world up to the saved state: emit the committed tokens the client
        has not been sent, then publish this round's block once (or finish once). With
        ``pending``, the round is left to the caller's batched drafting instead."""
        sp = sess.spec
        rid = sess.req.request_id
        generated = sp.generated
        if sess.emitted < len(generated):
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            delta = ""
            if not text.endswith("\ufffd") or sp.done:
                delta, sess.text = text[len(sess.text):], text
            await self._emit(rid, TokenEvent(request_id=rid, index=sess.emitted,
                                             token_ids=generated[sess.emitted:], text=delta,
                                             ts=sp.last_token_ts or now()))
            sess.emitted = len(generated)
        if sp.finish is not None:
            await self._finish(sess, sp.finish, self.tokenizer.decode(generated, skip_special_tokens=True))
        elif sess.published_round != sp.round:
            if pending is None:
                await self._next_round(sess)
            elif all(x is not sess for x in pending):
                pending.append(sess)

    async def _publish_trace(self, sess: _Session, v: Verdict) -> None:
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

    async def _finish(self, sess: _Session, reason: str, text: str) -> None:
        st, sp = sess.state, sess.spec
        rid = sess.req.request_id
        t0 = sess.req.submitted_ts
        first = sp.first_token_ts or now()
        last = sp.last_token_ts or first
        n = len(sp.generated)
        done = DoneEvent(
            request_id=rid,
            text=text,
            token_ids=list(sp.generated),
            prompt_token_ids=st.prompt_token_ids,
            finish_reason=reason,  # type: ignore[arg-type]
            mode=st.mode,
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
            device=self.name,
        )
        await self._emit(rid, done)
        _observe_done(done)
        await self.store.delete(rid)
        self.sessions.pop(rid, None)
        sess.finished = True
        if self.engine is not None:
            await self.in_worker(self.engine.drop, rid)
        self.count("finished")

    async def _emit(self, request_id: str, event: WireModel) -> None:
        await self.output.emit(request_id, event)
        self.count("events")


def _log_failure(task: asyncio.Future) -> None:
    """A background prefill that failed only costs the next draft a prefill; say so."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("background draft prefill failed: %r", task.exception())


def _observe_done(done: DoneEvent) -> None:
    from wisp.telemetry import REQUESTS_FINISHED, SLO_ATTAINED, TPOT_SECONDS, TTFT_SECONDS

    TTFT_SECONDS.observe(done.ttft_ms / 1000.0)
    if len(done.token_ids) > 1:
        TPOT_SECONDS.observe(done.tpot_ms / 1000.0)
    REQUESTS_FINISHED.inc()
    if done.ttft_ms <= done.ttft_slo_ms and done.tpot_ms <= done.tpot_slo_ms:
        SLO_ATTAINED.inc()
