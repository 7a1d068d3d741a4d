"""The round drafter: turns sessions' planned rounds into published draft blocks.

Several sessions' rounds are drafted together (one batched forward per token step,
``DraftEngine.draft_many``) on the service's torch thread; each round is published the moment
its row of the batch stops (the engine hands it over from its thread), not when the batch's
longest round is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from wisp.bus import Bus
from wisp.policy.controller import DraftLengthPolicy
from wisp.policy.session import RoundPlan as SessionRoundPlan
from wisp.policy.session import expected_commit
from wisp.policy.site import ServerCosts, SiteChooser
from wisp.protocol import DraftBlock, WireDist, WireFeatures, digest_ids
from wisp.service import Service, now
from wisp.services.drafter.session import ServedSession
from wisp.settings import Mode, Settings
from wisp.specdec import round_generator

log = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    """A round about to be drafted: the session, the ids it builds on, the engine call."""

    sess: ServedSession
    committed: list[int]
    digest: str
    """``digest_ids(committed)``: the block's ``committed_digest`` and the sampler's key."""
    call: Any
    """The engine's ``DraftCall`` (None: nothing to draft; the round goes out at once)."""
    prefill: bool
    """A draft-less first round whose draft-model prefill runs in the background."""
    server_rounds: int = 0
    """An undrafted round that hands this many more rounds to the server (a server run)."""


class RoundDrafter:
    """Plans, drafts and publishes rounds for one drafter service (``engine`` None: this
    drafter never drafts, as in centralized serving)."""

    def __init__(self, service: Service, settings: Settings, bus: Bus, engine: Any,
                 costs: Callable[[], ServerCosts | None] = lambda: None) -> None:
        self.service = service
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.costs = costs
        """The server's costs as the scheduler last published them (None: not yet)."""
        self.site = (SiteChooser(max_k=max(settings.draft_k, 1),
                                 hysteresis=settings.site_hysteresis)
                     if settings.mode == Mode.wisp and settings.site == "adaptive" else None)
        """Per round: draft, or let the server decode (``settings.site``)."""

    def plan(self, sess: ServedSession, policy: DraftLengthPolicy, *, own: bool = True) -> RoundPlan:
        """This round's drafting call, as ``sess.spec`` plans it with ``policy`` (``own``: the
        drafter's policy, not one the request asked for, which the site choice may override)."""
        committed = sess.committed
        digest = digest_ids(committed)
        can_draft = self.engine is not None
        plan = sess.spec.plan(policy, can_draft=can_draft, server_run=self.server_run(sess),
                              round_trip_ms=sess.link.rtt_ms)
        if own and can_draft and self.site is not None and plan.max_k > 0 and sess.spec.round > 0:
            plan = self._site(sess, plan)
        call = None
        if plan.max_k > 0:
            from wisp.services.drafter.engine import DraftCall  # torch: only where drafting happens

            req = sess.req
            gen = (round_generator(req.seed, digest, "draft")
                   if req.temperature > 0 else None)
            call = DraftCall(req.request_id, committed, plan.max_k, req.temperature,
                             self.settings.draft_top_k, gen, plan.stop)
        return RoundPlan(sess, committed, digest, call, plan.prefill, plan.server_rounds)

    def _site(self, sess: ServedSession, plan: SessionRoundPlan) -> SessionRoundPlan:
        """The adaptive site choice (``SiteChooser.next_round``, as the simulator's
        ``modes.wisp.site = "adaptive"``): draft, capped at the best k, or a server run of
        what is left of ``probe_every`` tokens; after the run a probe round is drafted."""
        assert self.site is not None
        sp, was = sess.spec, sess.site.on_server
        choice = self.site.next_round(sess.site, draft_ms=sp.stats.draft_ms_per_token,
                                      link=sess.link, server=self.costs(),
                                      tpot_slo_ms=sess.tpot_slo_ms)
        if choice.server_decode:
            if not was:
                self.service.count("site_to_server")
            run = min(self.site.run_left(sess.site), sp.budget)
            return replace(plan, max_k=0, stop=None, server_rounds=run)
        if was:
            self.service.count("site_probes")
        return replace(plan, max_k=min(plan.max_k, choice.k))

    def server_run(self, sess: ServedSession) -> int:
        """Rounds an undrafted round of ``sess`` hands to the server: all that are left where
        nothing drafts (centralized serving, or the request asked for speculation off), else
        ``server_run_rounds`` before the controller is asked again. 0 turns server runs off."""
        n = self.settings.server_run_rounds
        if n and (self.engine is None or sess.req.speculation == "off"):
            return sess.spec.max_new
        return n

    async def run(self, plans: list[RoundPlan]) -> None:
        """Draft these rounds, together when there are several, and publish each block."""
        drafting = [p for p in plans if p.call is not None]
        undrafted = [(p, None) for p in plans if p.call is None]
        if undrafted:  # nothing to draft (prefill rounds, centralized): send at once
            await self.publish(undrafted)
        if not drafting:
            return
        # None, queued after every hand-over, says the call has returned (or failed)
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()

        def run() -> None:
            try:
                self.engine.draft_many([p.call for p in drafting], 0,
                                       lambda i, out: loop.call_soon_threadsafe(ready.put_nowait, (i, out)))
            finally:
                loop.call_soon_threadsafe(ready.put_nowait, None)

        work = asyncio.ensure_future(self.service.in_worker(run))
        if len(drafting) > 1:
            self.service.count("batched_drafts")
        finished = False
        while not finished and (item := await ready.get()) is not None:
            # rows that stopped while we were publishing are sent together (one round trip);
            # none waits for a row still drafting
            done = [item]
            while not ready.empty():
                nxt = ready.get_nowait()
                if nxt is None:
                    finished = True
                    break
                done.append(nxt)
            await self.publish([(drafting[i], out) for i, out in done])
        await work  # re-raise a failure of the batch
        for p in drafting:  # ended (cancelled) while drafting: free the cache the draft refilled
            if p.sess.finished:
                await self.service.in_worker(self.engine.drop, p.sess.request_id)

    async def publish(self, rounds: list[tuple[RoundPlan, Any]]) -> None:
        """Record each round's drafting (``out``: the engine's output, None when nothing was
        drafted) in its session and publish the rounds' blocks in one round trip. A round
        whose session ended while it was drafted (cancelled) is not sent."""
        rounds = [(p, out) for p, out in rounds if not p.sess.finished]
        if not rounds:
            return
        delay_ms = self.settings.fault_draft_delay_ms
        if delay_ms and any(out is not None for _, out in rounds):  # a slow device (tests)
            extra = [delay_ms * out.forward_passes if out is not None else 0.0 for _, out in rounds]
            await asyncio.sleep(max(extra) / 1000.0)
            for (_, out), ms in zip(rounds, extra, strict=True):
                if out is not None:
                    out.draft_ms += ms
        blocks = [self._block(p, out) for p, out in rounds]
        if len(blocks) == 1:
            await self.bus.publish(self.bus.keys.draft, blocks[0])
        else:
            await self.bus.publish_many([(self.bus.keys.draft, b) for b in blocks])
        for p, b in zip(rounds, blocks, strict=True):
            self._published(p[0], b)

    def _block(self, p: RoundPlan, out: Any) -> DraftBlock:
        """Record the round's drafting in its session; the block that carries it."""
        sess, sp = p.sess, p.sess.spec
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
                WireFeatures(top1_prob=f.top1_prob, entropy=f.entropy, margin=f.margin,
                             logit_spread=f.logit_spread)
                for f in out.features[: len(tokens)]
            ]
        sp.drafted(draft_ms, passes)
        sess.last_features = feats
        return DraftBlock(
            request_id=sess.request_id,
            device=self.service.name,
            round=sp.round,
            base_committed_len=len(p.committed),
            committed_digest=p.digest,
            draft_tokens=tokens,
            draft_dists=dists,
            features=feats,
            draft_ms=draft_ms,
            sent_ts=now(),
            generated_len=len(sp.generated),
            first_token_ts=sp.first_token_ts,
            expected_commit=expected_commit(f.top1_prob for f in feats),
            server_rounds=p.server_rounds if not tokens else 0,
        )

    def server_continues(self, sess: ServedSession, left: int) -> None:
        """The verifier makes ``sess``'s current round by itself (it said ``left`` rounds of a
        server run remain): nothing is published. The round counts as in flight from now, as
        the undrafted block that asks for the rest of the run, so a verdict that never comes
        (the verifier died) is re-sent as that block after ``round_timeout_s``."""
        committed, sp = sess.committed, sess.spec
        block = DraftBlock(
            request_id=sess.request_id, device=self.service.name, round=sp.round,
            base_committed_len=len(committed), committed_digest=digest_ids(committed),
            sent_ts=now(), generated_len=len(sp.generated), first_token_ts=sp.first_token_ts,
            expected_commit=1.0, server_rounds=min(left - 1, sp.budget),
        )
        sp.drafted(0.0, 0)
        sess.last_features = []
        sess.published_round = sp.round
        sess.published_block, sess.published_at, sess.resends = block, now(), 0

    def _published(self, p: RoundPlan, block: DraftBlock) -> None:
        """The round's block is in the stream."""
        sess, req = p.sess, p.sess.req
        sess.published_round = sess.spec.round
        sess.published_block, sess.published_at, sess.resends = block, now(), 0
        self.service.count("blocks")
        if p.prefill:
            # a prefill round: the server's prefill makes the first token while we prefill the
            # draft model here (queued on the one torch worker, so the next draft waits for it)
            task = asyncio.ensure_future(self.service.in_worker(self.engine.prefill, req.request_id,
                                                                p.committed))
            task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future) -> None:
    """A background prefill that failed only costs the next draft a prefill; say so."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("background draft prefill failed: %r", task.exception())
