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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wisp.bus import Bus
from wisp.client import RequestFailed, submit
from wisp.metrics import RequestRecord, Summary, percentile, summarize
from wisp.protocol import DoneEvent, TokenEvent


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
            "stream_mismatches": self.stream_mismatches,
            "overhead_p50_ms": percentile([d.overhead_ms for d in self.done], 50),
            "overhead_p99_ms": percentile([d.overhead_ms for d in self.done], 99),
            "overhead_per_round_p99_ms": percentile(
                [d.overhead_ms / max(d.rounds, 1) for d in self.done], 99),
            **self.extra,
            "errors": self.errors[:20],
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
                result.errors.append(str(err))
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
    await asyncio.gather(*(device(i) for i in range(cfg.devices)))
    result.duration_s = time.monotonic() - start
    after = await redis_footprint(bus)
    result.extra.update({f"{k}_before": v for k, v in before.items()})
    result.extra.update({f"{k}_after": v for k, v in after.items()})
    return result


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
