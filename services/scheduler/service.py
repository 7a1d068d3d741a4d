"""The scheduler: turns annotated rounds into verification batches.

A thin shell around ``SchedulerCore``: it feeds the core the rounds it reads, verifier liveness
(heartbeats) and batch completions (timing samples), executes the plans the core returns by
publishing each batch to its verifier's stream, and acks a round's entry only after its batch
was written. Only the holder of the scheduler lease forms batches, so replicas run as
active/standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from wisp.bus import Bus, Entry, SessionStore, TermsCache
from wisp.policy.estimator import BatchShape, VerifyTimeEstimator
from wisp.policy.health import VerifierHealth
from wisp.policy.learned_estimator import PublishedModel, default_estimator
from wisp.policy.scheduler import BatchPolicy, RoundInfo, SchedulerCore, round_terms
from wisp.policy.site import CostTracker
from wisp.policy.slo import batch_policy, deadline_at
from wisp.protocol import (
    AnnotatedBlock,
    LoadSnapshot,
    ServerCostsWire,
    SessionTerms,
    TimingSample,
    VerifierLoadWire,
    VerifyBatch,
)
from wisp.service import Consumer, Service, now
from wisp.settings import Settings

log = logging.getLogger(__name__)

GROUP = "scheduler"
LEASE = "scheduler"


def round_info(ab: AnnotatedBlock, terms: SessionTerms, arrival: float) -> RoundInfo:
    """What the batch policy knows of one round: its block, its session's terms."""
    b = ab.block
    return RoundInfo(
        key=b.key,
        request_id=b.request_id,
        round=b.round,
        **round_terms(len(b.draft_tokens), b.base_committed_len, b.generated_len),
        arrival=arrival,
        deadline=deadline_at(b.generated_len, terms.arrival_ts, terms.ttft_slo_ms,
                             terms.tpot_slo_ms, b.first_token_ts),
        predicted_ms=ab.predicted_verify_ms,
        predicted_by=ab.model_key,
        predicted_scale=ab.model_scale,
        expected_commit=b.expected_commit if b.expected_commit is not None else 1.0,
        generated_len=b.generated_len,
        max_new_tokens=terms.max_new_tokens,
        tpot_slo_ms=terms.tpot_slo_ms,
    )


class SchedulerService(Service):
    role = "scheduler"

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        name: str | None = None,
        *,
        policy: BatchPolicy | None = None,
        estimator: VerifyTimeEstimator | None = None,
    ) -> None:
        super().__init__(settings, bus, name)
        s = settings
        self.estimator = estimator or default_estimator(settings)
        self.reload_estimator = estimator is None
        """Follow the model the estimator service publishes (not when one was handed in)."""
        self.published_model = PublishedModel(self.estimator)
        self.core = SchedulerCore(
            policy or batch_policy(s),
            self.estimator,
            max_inflight=s.max_inflight_batches,
            id_prefix=f"{self.consumer}-",  # per life: a restart does not reuse batch ids
        )
        self.blocks: dict[str, AnnotatedBlock] = {}
        self.entry_ids: dict[str, str] = {}
        self.wake = asyncio.Event()
        self.leader = False  # until the lease is ours (lease_loop)
        self.batches_sent = 0
        self.terms = TermsCache(SessionStore(bus, s.output_ttl_s))
        self.costs = CostTracker()
        """The server's costs it publishes on ``wisp:load`` (``wisp.policy.site``)."""
        self.health = VerifierHealth(degraded_ratio=s.slow_verifier_ratio,
                                     cooldown_s=s.slow_verifier_cooldown_s)
        self._benched: list[str] = []

    def heartbeat_info(self) -> dict[str, Any]:
        return {
            **super().heartbeat_info(), "leader": self.leader, "queued": len(self.core.queue),
            "batches": self.batches_sent,
        }

    def consumers(self) -> list[Consumer]:
        """Rounds and batch completions, read (and swept from a dead scheduler) by the active
        scheduler only. A round's entry is acked only once the batch holding it was written
        (``_dispatch``), so a scheduler that dies holding rounds in memory loses none. The
        completions group is shared: a standby reading it would steal completions of batches
        only the leader knows about (the leader would re-queue them and verify them twice)."""
        return [
            Consumer(self.keys.annotated, GROUP, AnnotatedBlock, self.take, leader_only=True,
                     ack=False, reclaim=True),
            Consumer(self.keys.stats, GROUP, TimingSample, batch=self.on_stats_batch, start="$",
                     leader_only=True, reclaim=True),
        ]

    def loops(self) -> list:
        loops = [self.lease_loop, self.verifiers_loop, self.tick_loop, self.housekeeping_loop]
        return [*loops, self.model_loop] if self.reload_estimator else loops

    async def teardown(self) -> None:
        if self.superseded:  # the lease (held by name) is the later life's now
            return
        with contextlib.suppress(Exception):
            await self.bus.release_lease(LEASE, self.name)

    # ------------------------------------------------------------------ loops
    async def lease_loop(self) -> None:
        ttl = self.settings.heartbeat_ttl_s
        while not self.stopping.is_set():
            if not await self.current():  # a later life of this name holds the lease
                self.leader = False
                return
            was = self.leader
            self.leader = await self.bus.acquire_lease(LEASE, self.name, ttl)
            if self.leader != was:
                log.info("%s is %s", self.name, "the active scheduler" if self.leader else "standby")
            await self._pause(ttl / 3)

    async def take(self, e: Entry[AnnotatedBlock]) -> None:
        """Queue one annotated round (from the group or reclaimed from a dead scheduler). Its
        entry stays pending until the batch holding it is written. The same entry delivered
        again while we hold it (our pending list re-read after an outage or a failed handler,
        or swept back to us) is left pending: acking it would lose the round if we died before
        sending it. Another entry of a round we hold (re-published by its drafter) is acked:
        the held entry, or the written batch, keeps the round."""
        terms = await self.terms.get(e.msg.block.request_id)
        if terms is None:  # the session ended or expired: there is nothing to verify it into
            self.count("rounds_without_session")
            await self.bus.ack(e.stream, GROUP, e.entry_id)
            return
        info = round_info(e.msg, terms, now())
        # the policy takes the round's time alone from the annotation only under the same model
        self.count("annotated_by_current_model" if e.msg.model_key == self.estimator.model_key
                   else "annotated_by_other_model")
        if info.key in self.blocks:
            if self.entry_ids.get(info.key) != e.entry_id:
                await self.bus.ack(e.stream, GROUP, e.entry_id)
            return
        self.blocks[info.key] = e.msg
        self.entry_ids[info.key] = e.entry_id
        for old in self.core.add(info):
            await self._forget(old)
        self.wake.set()

    async def on_stats_batch(self, entries: list[Entry[TimingSample]]) -> None:
        for e in entries:
            self.on_stats(e)
        self.wake.set()

    def on_stats(self, e: Entry[TimingSample]) -> None:
        s = e.msg
        self.costs.observe(s.new_tokens, s.context_lens, s.measured_ms)
        plan = self.core.complete(s.batch_id)
        if plan is not None:
            for key in plan.keys:
                self.blocks.pop(key, None)
            # the shared (unscaled) model, so speeds don't feed back; a batch with KV-cache
            # misses (a session that just moved here) re-ran a prefix prefill the estimator does
            # not model, so it says nothing about the verifier's speed (counting it benched the
            # healthy verifier that took over a benched one's sessions)
            if s.new_tokens and not s.cache_misses:
                shape = BatchShape.of(s.new_tokens, s.context_lens)
                self.health.observe(s.verifier, self.estimator.predict(shape), s.measured_ms)

    async def verifiers_loop(self) -> None:
        while not self.stopping.is_set():
            live = await self.bus.live("verifier")
            ready = sorted(n for n, info in live.items() if info.get("ready"))
            usable = self.health.usable(ready, now())
            speeds = self.health.speeds(ready)
            for name, speed in speeds.items():
                self.core.set_verifier_speed(name, max(speed, 1e-3))
            benched = sorted(set(ready) - set(usable))
            if benched != self._benched:  # log changes, not every pass
                if benched:
                    log.warning("verifiers benched as too slow: %s (relative speeds %s)", benched,
                                {n: round(v, 3) for n, v in sorted(speeds.items())})
                else:
                    log.info("no verifier is benched")
                self._benched = benched
            requeued = self.core.set_verifiers(usable)
            if requeued:
                log.warning("re-queued %d rounds from vanished verifiers", len(requeued))
                self.wake.set()
            await self._pause(min(0.5, self.settings.heartbeat_s))

    async def tick_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            timeout = 0.05
            if self.leader and not await self.current():  # woke superseded: send nothing
                return
            if self.leader:
                lost = self.core.requeue_overdue(now(), grace_s=self.settings.batch_timeout_s)
                if lost:
                    log.warning("re-queued %d rounds of overdue batches", len(lost))
                out = self.core.tick(now())
                for plan in out.batches:
                    # sending awaits: the verifiers loop may bench this plan's verifier (and
                    # re-queue its rounds) while an earlier plan of this tick is being sent
                    if not self.core.is_inflight(plan.batch_id):
                        self.count("plans_dropped")
                        continue
                    await self._dispatch(plan)
                if out.wake_at is not None:
                    timeout = max(0.0, min(timeout, out.wake_at - now()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def model_loop(self) -> None:
        """Reload the verify-time model whenever the estimator service publishes a new one
        (``wisp:estimator:model``, polled every second; a bad one is logged and skipped)."""
        while not self.stopping.is_set():
            raw, = await self.bus.get_values(self.keys.estimator_model)
            if self.published_model.update(raw):
                self.estimator = self.core.estimator = self.published_model.current
                self.wake.set()
            await self._pause(1.0)

    async def housekeeping_loop(self) -> None:
        """Forget finished sessions (the drafter deletes a session's record when it ends) and
        publish the load snapshot that admission control reads (`wisp:load`)."""
        from wisp.policy.slo import snapshot

        while not self.stopping.is_set():
            if self.leader:
                active = {r.request_id for r in self.core.queue.values()}
                active |= {r.request_id for r in self.core.inflight_rounds.values()}
                idle = [rid for rid in self.core.affinity if rid not in active]
                if idle:
                    alive_list = await self.bus.exists_many([self.keys.session(r) for r in idle])
                    for rid, alive in zip(idle, alive_list, strict=True):
                        if not alive:
                            self.core.finish_request(rid)
                            self.terms.forget(rid)
                loads = [VerifierLoadWire(**vars(x))
                         for x in snapshot(self.core, now(), self._tpot_slo_of)]
                costs = self.costs.costs(now(), self._predict_rows, verifiers=max(len(loads), 1))
                await self.bus.set_value(
                    self.keys.load,
                    LoadSnapshot(ts=now(), scheduler=self.name, verifiers=loads,
                                 costs=ServerCostsWire(**vars(costs)) if costs else None).encode(),
                    ttl_ms=int(self.settings.heartbeat_ttl_s * 1000),
                )
            await self._pause(0.5)

    def _predict_rows(self, new: Sequence[int], ctx: Sequence[int]) -> float:
        return self.estimator.predict(BatchShape.of(new, ctx))

    def _tpot_slo_of(self, request_id: str) -> float | None:
        terms = self.terms.cached(request_id)
        return None if terms is None else terms.tpot_slo_ms

    # ------------------------------------------------------------------ helpers
    async def _dispatch(self, plan: Any) -> None:
        batch = VerifyBatch(
            batch_id=plan.batch_id,
            verifier=plan.verifier,
            items=[self.blocks[k] for k in plan.keys],
            created_ts=now(),
            predicted_ms=plan.predicted_ms,
            policy=plan.policy,
            reasons=list(plan.reasons),
        )
        ids = [self.entry_ids[k] for k in plan.keys if k in self.entry_ids]
        # the batch, then the acks of the rounds it holds, in one round trip (if it fails, the
        # entries stay ours and pending)
        stream = self.keys.batch(plan.verifier)
        await self.bus.publish_many([(stream, batch)], ack=(self.keys.annotated, GROUP, ids),
                                    expire_ms={stream: self.settings.pod_stream_ttl_s * 1000})
        for k in plan.keys:
            self.entry_ids.pop(k, None)
        self.batches_sent += 1
        self.count("rounds_dispatched", len(plan.keys))

    async def _forget(self, key: str) -> None:
        """Drop a superseded round: ack it without verifying."""
        self.blocks.pop(key, None)
        eid = self.entry_ids.pop(key, None)
        if eid is not None:
            await self.bus.ack(self.keys.annotated, GROUP, eid)
