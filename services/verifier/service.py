"""The verifier: the target model behind one batch stream (``wisp:batch:<name>``).

For each batch it finds every round's committed prefix (its own mirror of what it verified, or
the session record in Redis when it has never seen the session or lost it), checks the prefix
digest, runs ONE batched target forward through the engine, publishes a verdict per round to
its device, a timing sample for the estimator and scheduler, and only then acks the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

from wisp.bus import Bus, Entry, SessionStore, TermsCache
from wisp.cancels import RecentCancels
from wisp.cpus import format_cpus, pin_model_thread
from wisp.policy.server_run import ServerRun, ServerRuns, rides_along
from wisp.protocol import (
    CancelRequest,
    DraftBlock,
    SessionTerms,
    TimingSample,
    Verdict,
    VerifyBatch,
    WireModel,
    digest_ids,
)
from wisp.service import Consumer, Service, now
from wisp.settings import Settings
from wisp.specdec import SparseDist, round_generator

log = logging.getLogger(__name__)

GROUP = "verifier"
RUN_SWEEP_S = 2.0
"""How often the server runs are checked against their session records."""


class VerifierService(Service):
    role = "verifier"

    def __init__(self, settings: Settings, bus: Bus, name: str | None = None) -> None:
        super().__init__(settings, bus, name)
        self.engine: Any = None
        self.vocab_size = 0
        self.mirror: OrderedDict[str, list[int]] = OrderedDict()
        self.batches = 0
        self.slowdown_s = settings.fault_delay_ms / 1000.0
        """Extra seconds slept per batch: fault injection for tests of slow verifiers."""
        self.store = SessionStore(bus, settings.output_ttl_s)
        self.terms = TermsCache(self.store, size=4 * settings.kv_sessions)
        self.cancelled = RecentCancels()
        """Recent cancels: their rounds are not verified, their KV is freed."""
        self.runs = ServerRuns(settings.kv_sessions, emit_s=settings.server_run_emit_ms / 1000.0)
        """Sessions this verifier decodes by itself (``wisp.policy.server_run``)."""
        self.run_started = asyncio.Event()
        self.engine_lock = asyncio.Lock()
        """One forward at a time: a batch's and the server runs' own steps take turns (FIFO)."""

    async def setup(self) -> None:
        from wisp import models
        from wisp.services.verifier.engine import VerifierEngine

        s = self.settings
        if s.null_models:  # `wisp-cli bench --null-models`: the pipeline's own cost, no model
            from wisp.services.verifier.null_engine import null_verifier

            self.vocab_size, self.engine = null_verifier()
            return
        from wisp import tokens

        self.runs.eos = frozenset(await self.in_worker(tokens.eos_token_ids, s.target_model, s))
        if s.verifier_cpus:  # --isolate-cores: the server's cores, apart from the drafters'
            cpus = await self.in_worker(pin_model_thread, s.verifier_cpus, True)
            log.info("%s: model thread pinned to CPU(s) %s", self.name, format_cpus(cpus))
        model = await self.in_worker(models.load_model, s.target_model, s)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.engine = VerifierEngine(model, max_sessions=s.kv_sessions)
        await self.in_worker(self._warm_up)

    def _warm_up(self) -> None:
        """One small forward so the first real batch does not pay one-off costs."""
        from wisp.services.verifier.engine import VerifyItem

        self.engine.verify([VerifyItem("__warmup__", [1, 2, 3, 4], [5], None, 0.0, None)])
        self.engine.drop("__warmup__")

    def heartbeat_info(self) -> dict[str, Any]:
        return {**super().heartbeat_info(), "batches": self.batches, "server_runs": len(self.runs)}

    def consumers(self) -> list[Consumer]:
        """This verifier's own batch stream, one batch at a time, acked after its verdicts and
        timing sample are written."""
        return [Consumer(self.keys.batch(self.name), GROUP, VerifyBatch, self.on_batch, count=1)]

    def loops(self) -> list:
        return [self.cancel_loop, self.run_loop]

    async def cancel_loop(self) -> None:
        """Follow the cancel broadcast: a cancelled request's KV is freed now, not when the
        LRU evicts it, and its rounds still queued are not verified."""
        from wisp.cancels import follow_cancels

        await follow_cancels(self.bus, self.cancelled, self.on_cancel, self.stopping,
                             now_s=now(), block_ms=self.settings.block_ms, role="verifier")

    async def on_cancel(self, c: CancelRequest) -> None:
        self.mirror.pop(c.request_id, None)
        if self.runs.drop(c.request_id):
            self.count("server_runs_cancelled")
        if self.engine is None:
            return

        def free() -> bool:  # on the torch thread: the cache is the engine's, not the loop's
            held = c.request_id in self.engine.sessions()
            self.engine.drop(c.request_id)
            return held

        if await self.in_worker(free):
            self.count("kv_freed_on_cancel")

    # ------------------------------------------------------------------ one batch
    async def _committed(self, b: DraftBlock) -> list[int] | None:
        """The committed ids ``b`` builds on, or None when ``b`` is stale or unknown."""
        m = self.mirror.get(b.request_id)
        if m is not None and len(m) == b.base_committed_len and digest_ids(m) == b.committed_digest:
            self.mirror.move_to_end(b.request_id)
            return m
        state = await self.store.get(b.request_id)
        if state is None:
            return None
        c = state.committed
        if len(c) != b.base_committed_len or digest_ids(c) != b.committed_digest:
            return None
        if self.vocab_size and max(c) >= self.vocab_size:
            # a record naming ids this target does not have (a forged or foreign one): fed to
            # the model it would fail the whole batch, every other session in it included
            self.count("committed_out_of_vocab")
            log.warning("session %s: committed ids outside the target vocabulary", b.request_id)
            return None
        self._remember(b.request_id, c)
        return c

    def _remember(self, request_id: str, committed: list[int]) -> None:
        self.mirror[request_id] = committed
        self.mirror.move_to_end(request_id)
        while len(self.mirror) > self.settings.kv_sessions:
            self.mirror.popitem(last=False)

    def _valid(self, b: DraftBlock, terms: SessionTerms) -> str | None:
        """Why ``b`` cannot be verified, or None. The protocol already refused a malformed
        distribution (``WireDist``); what it cannot know is this target's vocabulary and the
        session's temperature."""
        v = self.vocab_size
        if terms.temperature > 0 and b.draft_tokens and b.draft_dists is None:
            return "sampling (temperature > 0) needs the draft distributions"
        if any(t >= v for t in b.draft_tokens):
            return "draft token id outside the target vocabulary"
        if any(t >= v for d in b.draft_dists or [] for t in d.token_ids):
            return "draft distribution names a token outside the vocabulary"
        return None

    async def on_batch(self, entry: Entry[VerifyBatch]) -> None:
        from wisp.services.verifier.engine import VerifyItem

        batch = entry.msg
        started = now()
        items: list[VerifyItem] = []
        blocks: list[DraftBlock] = []
        terms_of = await self.terms.get_many([ab.block.request_id for ab in batch.items])
        for ab in batch.items:
            b = ab.block
            if self.runs.drop(b.request_id):
                # a new round for a session this verifier is decoding by itself: its drafter
                # re-sent or re-planned it (a failover, a lost verdict); the new block wins
                self.count("server_runs_superseded")
            terms = terms_of.get(b.request_id)
            if terms is None:  # the session ended or expired
                self.count("stale_rounds")
                continue
            if b.request_id in self.cancelled:  # its client went away: nothing to verify for
                self.count("cancelled_rounds")
                continue
            why = self._valid(b, terms)
            if why is not None:
                await self.bus.dead_letter(
                    entry.stream, entry.entry_id, GROUP, self.name,
                    f"round {b.key}: {why}", {"d": ab.model_dump_json()},
                )
                continue
            committed = await self._committed(b)
            if committed is None:
                self.count("stale_rounds")
                continue
            gen = (
                # an undrafted round decodes as a server run's step does: runs on or off, the
                # same seed gives the same tokens
                round_generator(terms.seed, b.committed_digest,
                                "verify" if b.draft_tokens else "decode")
                if terms.temperature > 0 else None
            )
            dists = (
                [SparseDist(tuple(d.token_ids), tuple(d.probs)) for d in b.draft_dists]
                if b.draft_dists else None
            )
            items.append(VerifyItem(b.request_id, committed, list(b.draft_tokens), dists,
                                    terms.temperature, gen))
            blocks.append(b)
        async with self.engine_lock:
            await self._forward(items, blocks, terms_of, batch, started)

    async def run_loop(self) -> None:
        """Step the server runs while no batch is waiting: a resident session makes its next
        token at every forward, a batch's or one of its own (``wisp.policy.server_run``).
        Every ``RUN_SWEEP_S`` the runs whose session record is gone (the drafter ended it
        otherwise than by EOS or length: gave it up, or the request expired) are dropped, so a
        run never decodes for nobody until its last round."""
        swept = time.monotonic()
        while not self.stopping.is_set():
            if not self.runs:
                self.run_started.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.run_started.wait(), timeout=0.5)
                continue
            if time.monotonic() - swept > RUN_SWEEP_S:
                swept = time.monotonic()
                rids = [r.request_id for r in self.runs.due()]
                alive = await self.bus.exists_many([self.keys.session(r) for r in rids])
                for rid, ok in zip(rids, alive, strict=True):
                    if not ok and self.runs.drop(rid):
                        self.count("server_runs_orphaned")
            async with self.engine_lock:  # FIFO: a batch waiting for the engine goes first
                await self._forward([], [], {}, None, now())
            await asyncio.sleep(0)

    async def teardown(self) -> None:
        """Give the server runs back: one last step each, whose verdict (with every token
        not sent yet) says none are left, so each drafter plans its next round (for another
        verifier) at once instead of waiting ``round_timeout_s`` for a verdict that would
        never come."""
        if self.runs and self.engine is not None:
            with contextlib.suppress(Exception):
                async with self.engine_lock:
                    await self._forward([], [], {}, None, now(), hand_back=True)

    def _run_items(self, runs: list[ServerRun]) -> list[Any]:
        from wisp.services.verifier.engine import VerifyItem

        return [
            VerifyItem(r.request_id, r.committed, [], None, r.temperature,
                       # keyed by the prefix: a run re-started after a failover (an undrafted
                       # round again) draws alike
                       round_generator(r.seed, r.digest.hexdigest(), "decode")
                       if r.temperature > 0 else None)
            for r in runs
        ]

    def _verify(self, items: list[Any], run_items: list[Any]) -> tuple[list[Any], bool]:
        """On the model thread: verify the batch's items, with the runs' steps in the same
        forward when they ride along (``rides_along``: no prefill in the batch). Returns the
        results and whether the runs' steps were in them."""
        if run_items and not rides_along(self.engine.ids_to_feed(items)):
            return self.engine.verify(items), False
        return self.engine.verify(items + run_items), True

    async def _forward(self, items: list[Any], blocks: list[DraftBlock],
                       terms_of: dict[str, SessionTerms], batch: VerifyBatch | None,
                       started: float, hand_back: bool = False) -> None:
        """ONE target forward for the batch's rounds (``items``, ``blocks``; none for a step of
        the server runs alone) and a step of every server run (unless the batch holds a
        prefill: ``rides_along``), then every verdict and the timing sample in one round trip."""
        runs = []
        for r in self.runs.due():
            if r.request_id in self.cancelled:  # cancelled before its run started
                self.runs.drop(r.request_id)
            else:
                runs.append(r)
        measured_ms = 0.0
        results: list[Any] = []
        if items or runs:
            t0 = time.perf_counter()
            results, mixed = await self.in_worker(self._verify, items, self._run_items(runs))
            if not mixed:  # a prefill in the batch: the runs step at the next forward
                runs = []
                self.count("server_run_steps_deferred")
            if self.slowdown_s:
                await asyncio.sleep(self.slowdown_s)
            measured_ms = (time.perf_counter() - t0) * 1000.0
        if batch is None and not results:
            return
        batch_id = batch.batch_id if batch is not None else f"{self.name}:run:{self.batches}"
        t = now()
        out: list[tuple[str, WireModel]] = []
        for b, item, res in zip(blocks, items, results, strict=False):
            left = 0
            if b.server_rounds and not hand_back:
                terms = terms_of[b.request_id]
                left = self.runs.start(
                    request_id=b.request_id, device=b.device, committed=list(item.committed),
                    round=b.round, server_rounds=b.server_rounds, token=res.tokens[-1],
                    temperature=terms.temperature, seed=terms.seed, now=t)
                if left:
                    self.count("server_runs")
                    self.run_started.set()
            out.append((self.keys.verdict(b.device), self._verdict(
                b.request_id, b.round, b.base_committed_len, len(b.draft_tokens), res, batch_id,
                len(items) + len(runs), measured_ms, max(0.0, (started - b.sent_ts) * 1000.0), left)))
            self._remember(b.request_id, list(item.committed) + list(res.tokens))
        for run, res in zip(runs, results[len(items):], strict=True):
            em = self.runs.advance(run, res.tokens[-1], t, last=hand_back)
            if em is None:  # made, waiting to go with the next ones (at most emit_s)
                continue
            out.append((self.keys.verdict(em.device), Verdict(
                request_id=em.request_id, round=em.round, base_committed_len=em.base, drafted=0,
                accepted=0, tokens=list(em.tokens), decoded=len(em.tokens) - 1,
                batch_id=batch_id, verifier=self.name, batch_size=len(items) + len(runs),
                verify_ms=measured_ms, cache_hit=res.cache_hit, server_rounds_left=em.left)))
            self._remember(run.request_id, list(run.committed))
        if batch is None and not out:
            return  # a step of the runs alone whose tokens all wait: nothing to say yet
        sample = TimingSample(
            verifier=self.name,
            batch_id=batch_id,
            new_tokens=[r.new_tokens for r in results],
            context_lens=[r.context_len - r.new_tokens for r in results],
            draft_lens=[len(b.draft_tokens) for b in blocks] + [0] * len(runs),
            measured_ms=measured_ms,
            predicted_ms=batch.predicted_ms if batch is not None else 0.0,
            cache_misses=sum(0 if r.cache_hit else 1 for r in results),
            ts=t,
        )
        out.append((self.keys.stats, sample))
        ttl_ms = self.settings.pod_stream_ttl_s * 1000
        await self.bus.publish_many(out, expire_ms={s: ttl_ms for s, _ in out[:-1]})
        self.batches += 1
        self.count("rounds", len(items))
        if runs:
            self.count("server_run_steps", len(runs))
        _observe(blocks, results[:len(items)], measured_ms)

    def _verdict(self, request_id: str, rnd: int, base: int, drafted: int, res: Any,
                 batch_id: str, batch_size: int, verify_ms: float, queue_ms: float,
                 left: int) -> Verdict:
        return Verdict(
            request_id=request_id,
            round=rnd,
            base_committed_len=base,
            drafted=drafted,
            accepted=res.accepted,
            tokens=list(res.tokens),
            batch_id=batch_id,
            verifier=self.name,
            batch_size=batch_size,
            verify_ms=verify_ms,
            queue_ms=queue_ms,
            cache_hit=res.cache_hit,
            server_rounds_left=left,
        )


def _observe(blocks: list[DraftBlock], results: list[Any], measured_ms: float) -> None:
    """Export batch and speculation metrics (names follow vLLM's spec_decode family)."""
    from wisp.telemetry import (
        ACCEPTED_PER_POS,
        BATCH_SIZE,
        NUM_ACCEPTED,
        NUM_DRAFT_TOKENS,
        NUM_DRAFTS,
        VERIFY_SECONDS,
    )

    if not results:
        return
    BATCH_SIZE.observe(len(results))
    VERIFY_SECONDS.observe(measured_ms / 1000.0)
    NUM_DRAFTS.inc(len(results))
    NUM_DRAFT_TOKENS.inc(sum(len(b.draft_tokens) for b in blocks))
    NUM_ACCEPTED.inc(sum(r.accepted for r in results))
    for r in results:
        for pos in range(r.accepted):
            ACCEPTED_PER_POS.labels(str(pos)).inc()
