"""Closed-loop load generator: N simulated devices submit prompts back to back for a duration.

Each device is one concurrent client; it submits a prompt from the packaged datasets, waits for
the answer, thinks for ``think_s`` and submits the next. Every finished request becomes a
``RequestRecord``; ``metrics.summarize`` turns them into the table's numbers, so the benchmark,
the simulator and the CLI share one definition of TTFT, TPOT, attainment and goodput.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from wisp.bus import FIELD, Bus
from wisp.client import RequestFailed, submit
from wisp.metrics import RequestRecord, Summary, percentile, summarize
from wisp.protocol import (
    AnnotatedBlock,
    DoneEvent,
    DraftBlock,
    ProtocolError,
    TokenEvent,
    Verdict,
    VerifyBatch,
    decode,
)


@dataclass(frozen=True)
class BenchConfig:
    devices: int
    duration_s: float
    max_new_tokens: int = 64
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    think_s: float = 0.0
    seed: int = 0
    prompts: tuple[str, ...] = ()
    request_timeout_s: float = 600.0
    retry_s: float = 1.0
    """A device whose request was refused or failed waits this long before its next one (a
    client backs off; retrying at once would fill the table with refusals of one overload)."""


@dataclass
class BenchResult:
    mode: str
    config: BenchConfig
    records: list[RequestRecord] = field(default_factory=list)
    done: list[DoneEvent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Requests that failed (an error the system did not mean as a refusal, or no answer)."""
    refusals: list[str] = field(default_factory=list)
    """Requests the system declined (admission control, a full queue): counted apart from
    failures, and as SLO misses."""
    duration_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    stream_mismatches: int = 0
    """Requests whose streamed tokens differ from their final ids (lost or duplicated)."""

    def merged(self, other: BenchResult) -> BenchResult:
        """This run and ``other`` (same mode) as one: requests pooled, durations added, so
        rates are over the total time."""
        return BenchResult(
            mode=self.mode, config=self.config, records=self.records + other.records,
            done=self.done + other.done, errors=self.errors + other.errors,
            refusals=self.refusals + other.refusals,
            duration_s=self.duration_s + other.duration_s,
            stream_mismatches=self.stream_mismatches + other.stream_mismatches,
        )

    @property
    def summary(self) -> Summary:
        return summarize(self.records, self.duration_s)

    def as_dict(self) -> dict[str, Any]:
        s = self.summary.as_dict()
        drafted = sum(d.drafted_tokens for d in self.done)
        return {
            "mode": self.mode,
            "devices": self.config.devices,
            "duration_s": round(self.duration_s, 2),
            "max_new_tokens": self.config.max_new_tokens,
            **s,
            "drafted_tokens": drafted,
            "accepted_tokens": sum(d.accepted_tokens for d in self.done),
            "mean_tokens_per_request": (
                sum(len(d.token_ids) for d in self.done) / len(self.done) if self.done else 0.0
            ),
            "failed_requests": len(self.errors),
            "refused_requests": len(self.refusals),
            "stream_mismatches": self.stream_mismatches,
            "overhead_p50_ms": percentile([d.overhead_ms for d in self.done], 50),
            "overhead_p99_ms": percentile([d.overhead_ms for d in self.done], 99),
            "overhead_per_round_p99_ms": percentile(
                [d.overhead_ms / max(d.rounds, 1) for d in self.done], 99),
            **self.extra,
            "errors": self.errors[:20],
            "refusals": self.refusals[:20],
        }


def record_of(d: DoneEvent) -> RequestRecord:
    return RequestRecord(
        ttft_ms=d.ttft_ms, tpot_ms=d.tpot_ms, e2e_ms=d.e2e_ms, tokens=len(d.token_ids),
        ttft_slo_ms=d.ttft_slo_ms, tpot_slo_ms=d.tpot_slo_ms, drafted=d.drafted_tokens,
        accepted=d.accepted_tokens, rounds=d.rounds, wasted_draft_ms=d.wasted_draft_ms,
    )


async def redis_footprint(bus: Bus) -> dict[str, Any]:
    """Redis memory and WISP's key counts: a long run must keep these bounded."""
    mem = await bus.redis.info("memory")
    keys = streams = 0
    async for _ in bus.redis.scan_iter(match=bus.keys.all_pattern(), count=1000):
        keys += 1
    async for _ in bus.redis.scan_iter(match=bus.keys.all_pattern(), _type="stream", count=1000):
        streams += 1
    return {"redis_used_memory_mb": round(int(mem["used_memory"]) / 2**20, 2),
            "wisp_keys": keys, "wisp_streams": streams}


async def run_bench(
    bus: Bus,
    mode: str,
    cfg: BenchConfig,
    on_done: Callable[[DoneEvent], None] | None = None,
) -> BenchResult:
    """Drive the running system with ``cfg.devices`` closed-loop clients for ``cfg.duration_s``.
    Requests still running at the end are waited for (their records count; the duration is the
    wall time until the last one finished, so goodput is not inflated)."""
    if not cfg.prompts:
        raise ValueError("the benchmark needs prompts")
    result = BenchResult(mode=mode, config=cfg)
    rng = random.Random(cfg.seed)
    order = list(cfg.prompts)
    rng.shuffle(order)
    counter = 0
    start = time.monotonic()
    stop_at = start + cfg.duration_s

    async def device(i: int) -> None:
        nonlocal counter
        while time.monotonic() < stop_at:
            prompt = order[counter % len(order)]
            counter += 1
            delivered: list[int] = []

            def on(ev: object, delivered: list[int] = delivered) -> None:
                if isinstance(ev, TokenEvent):
                    delivered.extend(ev.token_ids)

            try:
                done = await submit(
                    bus, prompt, idle_timeout_s=cfg.request_timeout_s, check_drafters=False,
                    on_event=on,
                    max_new_tokens=cfg.max_new_tokens, ttft_slo_ms=cfg.ttft_slo_ms,
                    tpot_slo_ms=cfg.tpot_slo_ms,
                )
            except RequestFailed as err:
                (result.refusals if err.refused else result.errors).append(str(err))
                result.records.append(RequestRecord(
                    ttft_ms=float("inf"), tpot_ms=float("inf"), e2e_ms=float("inf"), tokens=0,
                    ttft_slo_ms=cfg.ttft_slo_ms or 0.0, tpot_slo_ms=cfg.tpot_slo_ms or 0.0, ok=False,
                ))
                if cfg.retry_s:
                    await asyncio.sleep(cfg.retry_s)
                continue
            result.done.append(done)
            result.records.append(record_of(done))
            if delivered != done.token_ids:  # the stream lost or repeated a token
                result.stream_mismatches += 1
            if on_done is not None:
                on_done(done)
            if cfg.think_s:
                await asyncio.sleep(rng.expovariate(1.0 / cfg.think_s))

    before = await redis_footprint(bus)
    series: list[tuple[float, float]] = []

    async def sample_memory() -> None:
        while True:
            mem = await bus.redis.info("memory")
            series.append((round(time.monotonic() - start, 1),
                           round(int(mem["used_memory"]) / 2**20, 2)))
            await asyncio.sleep(MEMORY_SAMPLE_S)

    sampler = asyncio.create_task(sample_memory())
    try:
        await asyncio.gather(*(device(i) for i in range(cfg.devices)))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    result.duration_s = time.monotonic() - start
    after = await redis_footprint(bus)
    result.extra.update({f"{k}_before": v for k, v in before.items()})
    result.extra.update({f"{k}_after": v for k, v in after.items()})
    result.extra["redis_used_memory_mb_series"] = series
    result.extra["redis_memory_growth_last_half"] = memory_growth(series)
    return result


MEMORY_SAMPLE_S = 2.0
"""How often a benchmark samples Redis' ``used_memory`` (the series is in its JSON)."""


def memory_growth(series: Sequence[tuple[float, float]]) -> float | None:
    """Relative growth of Redis' memory over the second half of a run (peak of the last quarter
    against the peak of the second quarter): near 0 when memory has reached a plateau, and a
    steady leak shows as a growth about as large as the first half's. None for a short run."""
    if len(series) < 8:
        return None
    n = len(series)
    q2 = max(mb for _, mb in series[n // 4: n // 2])
    q4 = max(mb for _, mb in series[3 * n // 4:])
    return (q4 - q2) / q2 if q2 > 0 else None


COLUMNS = (
    ("mode", "mode", "{}"),
    ("devices", "devices", "{}"),
    ("requests", "requests", "{}"),
    ("SLO att.", "slo_attainment", "{:.2f}"),
    ("goodput tok/s", "goodput_tokens_per_s", "{:.2f}"),
    ("thru tok/s", "throughput_tokens_per_s", "{:.2f}"),
    ("TTFT p50", "ttft_p50_ms", "{:.0f}"),
    ("TTFT p90", "ttft_p90_ms", "{:.0f}"),
    ("TTFT p99", "ttft_p99_ms", "{:.0f}"),
    ("TPOT p50", "tpot_p50_ms", "{:.0f}"),
    ("TPOT p90", "tpot_p90_ms", "{:.0f}"),
    ("TPOT p99", "tpot_p99_ms", "{:.0f}"),
    ("accept", "acceptance_rate", "{:.2f}"),
    ("acc/round", "mean_accepted_per_round", "{:.2f}"),
    ("waste ms/req", "wasted_draft_ms_per_request", "{:.0f}"),
    ("ovh p99 ms", "overhead_p99_ms", "{:.0f}"),
    ("refused", "refused_requests", "{}"),
    ("failed", "failed_requests", "{}"),
)


def table_rows(rows: list[dict[str, Any]], with_run: bool = False) -> tuple[list[str], list[list[str]]]:
    cols = COLUMNS[:1] + (("run", "run", "{}"),) + COLUMNS[1:] if with_run else COLUMNS
    header = [c[0] for c in cols]
    body = []
    for r in rows:
        line = []
        for _, key, fmt in cols:
            v = r.get(key)
            try:
                line.append(fmt.format(v))
            except (TypeError, ValueError):
                line.append(str(v))
        body.append(line)
    return header, body


# ---------------------------------------------------------------------- the pipeline's own cost
PIPELINE_HOPS = 4
"""Stream hops of one round: drafter -> estimator (``wisp:draft``) -> scheduler
(``wisp:annotated``) -> verifier (``wisp:batch:<v>``) -> drafter (``wisp:verdict:<d>``)."""

SEGMENTS = ("drafter->estimator", "estimator->scheduler->batch", "batch->verifier",
            "verifier->drafter->next block")
"""A round's period cut at the timestamps the messages carry (``DraftBlock.sent_ts``,
``AnnotatedBlock.annotated_ts``, ``VerifyBatch.created_ts``, the verifier's start
``sent_ts + Verdict.queue_ms``, the next block's ``sent_ts``); the four add up to the period."""

M = TypeVar("M", bound=BaseModel)


async def stream_messages(bus: Bus, stream: str, model: type[M], since: float = 0.0,
                          page: int = 5000) -> list[M]:
    """Every message of ``model`` in ``stream`` added since unix time ``since`` (XRANGE, paged;
    entries that do not parse are skipped: they are not the benchmark's)."""
    start = f"{int(since * 1000)}-0"
    out: list[M] = []
    while True:
        entries = await bus.redis.xrange(stream, min=start, max="+", count=page)
        for _eid, fields in entries:
            try:
                out.append(decode(model, fields.get(FIELD) or fields.get(FIELD.decode())))
            except ProtocolError:
                continue
        if len(entries) < page:
            return out
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))


def _first_of_each_round(blocks: Iterable[DraftBlock]) -> dict[tuple[str, int], DraftBlock]:
    """One block per (request, round): the first published (a re-published round after a
    failure would otherwise count twice)."""
    out: dict[tuple[str, int], DraftBlock] = {}
    for b in sorted(blocks, key=lambda b: b.sent_ts):
        out.setdefault((b.request_id, b.round), b)
    return out


def round_overheads(blocks: Iterable[DraftBlock],
                    verify_ms: Mapping[tuple[str, int], float] | None = None) -> list[float]:
    """Per-round pipeline overhead in ms, one value per round whose next round was published.

    A round's period runs from the drafter publishing its block (``sent_ts``) to the drafter
    publishing the session's next block: the four stream hops there and back, every service's
    handling, the scheduler's batching, and the drafter applying the verdict (saving the session,
    streaming the tokens). Engine time is taken out: the next round's drafting (its
    ``draft_ms``) and the round's verification (``verify_ms[(request, round)]``; leave it out for
    the null engines, whose verification is nothing, so the verifier service's own handling
    stays in the overhead). Both ends are stamped by the same drafter clock."""
    rounds = _first_of_each_round(blocks)
    out = []
    for (rid, r), a in rounds.items():
        b = rounds.get((rid, r + 1))
        if b is None:
            continue
        engine = b.draft_ms + (verify_ms or {}).get((rid, r), 0.0)
        out.append((b.sent_ts - a.sent_ts) * 1000.0 - engine)
    return out


def round_segments(blocks: Iterable[DraftBlock], annotated: Iterable[AnnotatedBlock],
                   batches: Iterable[VerifyBatch], verdicts: Iterable[Verdict]) -> dict[str, list[float]]:
    """Each round's period cut into ``SEGMENTS`` (ms), for the rounds every timestamp was found
    for: where the pipeline's time goes."""
    rounds = _first_of_each_round(blocks)
    ann = {(a.block.request_id, a.block.round): a.annotated_ts for a in annotated}
    made = {(i.block.request_id, i.block.round): b.created_ts for b in batches for i in b.items}
    queued = {(v.request_id, v.round): v.queue_ms for v in verdicts}
    out: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    for key, a in rounds.items():
        nxt = rounds.get((key[0], key[1] + 1))
        if nxt is None or key not in ann or key not in made or key not in queued:
            continue
        started = a.sent_ts + queued[key] / 1000.0
        cuts = (a.sent_ts, ann[key], made[key], started, nxt.sent_ts - nxt.draft_ms / 1000.0)
        for name, t0, t1 in zip(SEGMENTS, cuts[:-1], cuts[1:], strict=True):
            out[name].append((t1 - t0) * 1000.0)
    return out


async def raw_hop_chain(url: str, prefix: str, *, devices: int, duration_s: float,
                        hops: int = PIPELINE_HOPS, warmup_s: float = 0.5, payload_bytes: int = 600,
                        count: int = 64) -> list[float]:
    """The floor under a round: ``devices`` messages circulating through a ring of ``hops``
    bare Redis stream hops (each XADD -> XREADGROUP -> XACK, one consumer group and one
    connection per stage, as the services have), measured the way ``round_overheads`` measures
    the pipeline: ms between two sends of the same device's message. Stage 0 plays the drafter
    (it holds every device), the others relay; each publishes before it acks, as the services do.
    Keys are under ``prefix`` and deleted afterwards."""
    import redis.asyncio as aioredis

    streams = [f"{prefix}:hop{i}" for i in range(hops)]
    group = "g"
    clients = [aioredis.from_url(url) for _ in range(hops)]
    for s in streams:
        await clients[0].xgroup_create(s, group, id="0", mkstream=True)
    payload = b"x" * payload_bytes
    periods: list[float] = []
    last_sent: dict[bytes, float] = {}
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def send(r: aioredis.Redis, stream: str, dev: bytes) -> None:
        await r.xadd(stream, {b"i": dev, FIELD: payload}, maxlen=10_000, approximate=True)

    async def stage(i: int) -> None:
        r, src = clients[i], streams[i - 1]  # stage 0 reads the last stream: the ring closes
        dst = streams[i]
        while time.perf_counter() < stop_at:
            resp = await r.xreadgroup(group, f"c{i}", {src: ">"}, count=count, block=100)
            for _stream, entries in resp or []:
                for eid, fields in entries:
                    dev = fields[b"i"]
                    if i == 0:  # stamped before the send, as DraftBlock.sent_ts
                        now = time.perf_counter()
                        if now >= measure_from:
                            periods.append((now - last_sent[dev]) * 1000.0)
                        last_sent[dev] = now
                    await send(r, dst, dev)
                    await r.xack(src, group, eid)

    try:
        for d in range(devices):
            dev = str(d).encode()
            last_sent[dev] = time.perf_counter()
            await send(clients[0], streams[0], dev)
        await asyncio.gather(*(stage(i) for i in range(hops)))
    finally:
        await clients[0].delete(*streams)
        for c in clients:
            await c.aclose()
    return periods


def select_timings(estimator: Any, queue_sizes: Iterable[int], *, reps: int = 200,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Time ``SloAwarePolicy.select`` on random queues of each size, with every round's time
    alone taken from the estimator hop's annotation (made under ``estimator``'s own model) and
    without it (predicted in the policy, as when the annotation came from another model).

    Both arms run the same queues interleaved, so load on the machine hits them alike; the
    figures are per-selection medians and 90th percentiles in ms."""
    from wisp.policy.estimator import BatchShape
    from wisp.policy.scheduler import RoundInfo
    from wisp.policy.slo import SloAwarePolicy

    rng = random.Random(seed)
    policy = SloAwarePolicy()
    key = estimator.model_key
    rows = []
    for n in queue_sizes:
        times: dict[str, list[float]] = {"annotated": [], "predicted": []}
        for _ in range(reps):
            now = 1000.0
            queue = []
            for i in range(n):
                draft, ctx = rng.randint(0, 8), rng.randint(16, 2048)
                # predicted here once, so the policy's own predictions hit the estimator's cache
                # in both arms, as they do for a round that waits through several selections
                alone = estimator.predict(BatchShape.of([draft + 1], [ctx]))
                queue.append(RoundInfo(
                    key=f"r{i}", request_id=f"q{i}", round=rng.randint(0, 50), draft_len=draft,
                    context_len=ctx, arrival=now - rng.uniform(0, 0.2),
                    deadline=now + rng.uniform(-0.05, 0.6), predicted_ms=alone, predicted_by=key,
                    predicted_scale=estimator.model_scale,
                    expected_commit=1.0 + draft * rng.random(), generated_len=rng.randint(1, 100),
                    max_new_tokens=128, tpot_slo_ms=100.0))
            bare = [RoundInfo(**{**r.__dict__, "predicted_by": None}) for r in queue]
            policy.select(bare, "v", now, estimator)  # untimed: both arms then find warm caches
            arms = [("annotated", queue), ("predicted", bare)]
            for arm, q in arms if len(times["annotated"]) % 2 else arms[::-1]:
                t0 = time.perf_counter()
                policy.select(q, "v", now, estimator)
                times[arm].append((time.perf_counter() - t0) * 1000.0)
        a, p = times["annotated"], times["predicted"]
        rows.append({
            "queued": n, "reps": reps,
            "annotated_p50_ms": percentile(a, 50), "annotated_p90_ms": percentile(a, 90),
            "predicted_p50_ms": percentile(p, 50), "predicted_p90_ms": percentile(p, 90),
            "saved_p50": 1.0 - percentile(a, 50) / percentile(p, 50),
        })
    return rows
