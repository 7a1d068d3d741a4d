"""What the HTTP API (the gateway) adds to a request's latency, against the Redis path.

The same requests (same prompts, lengths, greedy) go through both client paths of one running
system: ``wisp.client.submit`` straight on the bus (what ``wisp-cli submit --via-redis`` and the
gateway itself do), and ``POST /v1/completions`` with ``stream: true`` through the gateway. With
null engines (``WISP_NULL_MODELS``) a round costs only the pipeline, so the difference is the
gateway's own cost and not drowned in model time.

Why phases in ABBA order rather than two runs: a machine's speed drifts (other processes, CPU
boost, Redis' memory), and whichever path ran second would carry the drift. Each concurrency
level runs ``rounds`` pairs of phases, path order A B B A ..., so drift lands on both paths
alike; in each phase every one of the ``concurrency`` streams uses the same path, so the gateway
really carries that many concurrent streams. Phase j of each path uses the same prompts.

Per request (client clocks, ``time.perf_counter``): e2e (send to the last event: ``[DONE]`` /
``DoneEvent``), TTFT (first text), TPOT = (e2e - TTFT) / (tokens - 1) as vLLM's serving
benchmark defines it, and the gaps between successive text events (ITL). The added latency
per request is the API's e2e percentile minus the Redis path's, per token the same for TPOT;
also per request, the time outside the drafter's own view (client e2e minus the drafter's
``e2e_ms``), which cancels most of the pipeline's variance.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import platform
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from wisp.bus import Bus
from wisp.client import submit
from wisp.metrics import percentile
from wisp.protocol import TokenEvent

PATHS = ("redis", "api")


@dataclass
class Sample:
    """One request through one path."""

    path: str
    concurrency: int
    phase: int
    ok: bool
    error: str | None = None
    e2e_ms: float = 0.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    tokens: int = 0
    server_e2e_ms: float | None = None
    """The drafter's own e2e (from its arrival to the last token), as the final event says."""
    gaps_ms: list[float] = field(default_factory=list)
    """Between successive text events (inter-token latency; one event may carry several tokens)."""


@dataclass(frozen=True)
class ApiBenchConfig:
    concurrency: tuple[int, ...]
    requests: int
    """Measured requests per path and concurrency level."""
    max_new_tokens: int
    prompts: tuple[str, ...]
    rounds: int = 2
    """ABBA pairs of phases per concurrency level (each path gets ``rounds`` phases)."""
    warmup: int | None = None
    """Unmeasured requests per path before each level (default: the concurrency)."""


def _timings(ok_times: Sequence[float], t0: float, end: float, tokens: int) -> dict[str, Any]:
    """e2e, TTFT, TPOT and gaps from the arrival times of the text events."""
    e2e = (end - t0) * 1000.0
    ttft = (ok_times[0] - t0) * 1000.0 if ok_times else None
    tpot = (e2e - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(ok_times)]
    return {"e2e_ms": e2e, "ttft_ms": ttft, "tpot_ms": tpot, "gaps_ms": gaps}


async def redis_request(bus: Bus, prompt: str, max_new_tokens: int, concurrency: int,
                        phase: int) -> Sample:
    """One request straight on the bus, as ``wisp.client.submit`` sends it (no live-drafter
    check: the bare path the gateway itself takes, so only HTTP is the difference)."""
    times: list[float] = []

    def on_event(ev: Any) -> None:
        if isinstance(ev, TokenEvent) and ev.text:
            times.append(time.perf_counter())

    t0 = time.perf_counter()
    try:
        done = await submit(bus, prompt, on_event=on_event, check_drafters=False, idle_timeout_s=120.0,
                            max_new_tokens=max_new_tokens, temperature=0.0, chat_template=False)
    except Exception as err:  # noqa: BLE001 - a failed request is a row, not the end of the run
        return Sample("redis", concurrency, phase, ok=False, error=f"{type(err).__name__}: {err}")
    end = time.perf_counter()
    return Sample("redis", concurrency, phase, ok=True, tokens=len(done.token_ids),
                  server_e2e_ms=done.e2e_ms, **_timings(times, t0, end, len(done.token_ids)))


async def api_request(client: Any, base_url: str, key: str, model: str, prompt: str,
                      max_new_tokens: int, concurrency: int, phase: int) -> Sample:
    """One streamed ``POST /v1/completions`` (the same request: plain-text prompt, greedy),
    read to ``data: [DONE]``; tokens from the final ``usage``."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    times: list[float] = []
    tokens, server_e2e, error = 0, None, None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{base_url}/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return Sample("api", concurrency, phase, ok=False,
                              error=f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    error = str(obj["error"].get("message"))
                    continue
                choices = obj.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(now)
                if obj.get("usage"):
                    tokens = int(obj["usage"]["completion_tokens"])
                if obj.get("wisp"):
                    server_e2e = float(obj["wisp"]["e2e_ms"])
    except Exception as err:  # noqa: BLE001 - a failed request is a row, not the end of the run
        return Sample("api", concurrency, phase, ok=False, error=f"{type(err).__name__}: {err}")
    end = time.perf_counter()
    if error is not None or tokens == 0:
        return Sample("api", concurrency, phase, ok=False, error=error or "no usage in the stream")
    return Sample("api", concurrency, phase, ok=True, tokens=tokens, server_e2e_ms=server_e2e,
                  **_timings(times, t0, end, tokens))


async def _phase(one: Callable[[str], Awaitable[Sample]], prompts: Sequence[str], n: int,
                 concurrency: int, offset: int) -> list[Sample]:
    """``n`` requests by ``concurrency`` closed-loop streams (each sends its next request when
    its last one ended), prompts ``offset, offset + 1, ...``."""
    counter = itertools.count()
    out: list[Sample] = []

    async def stream() -> None:
        while (i := next(counter)) < n:
            out.append(await one(prompts[(offset + i) % len(prompts)]))

    await asyncio.gather(*(stream() for _ in range(min(concurrency, n))))
    return out


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": percentile(values, 50), "p99": percentile(values, 99),
            "mean": sum(values) / len(values)}


def summarise(samples: Sequence[Sample], concurrency: int, path: str, wall_s: float) -> dict[str, Any]:
    """One row: a path at one concurrency level."""
    mine = [s for s in samples if s.concurrency == concurrency and s.path == path]
    ok = [s for s in mine if s.ok]
    outside = [s.e2e_ms - s.server_e2e_ms for s in ok if s.server_e2e_ms is not None]
    return {
        "path": path, "concurrency": concurrency, "requests": len(mine), "ok": len(ok),
        "failed": len(mine) - len(ok), "errors": sorted({s.error for s in mine if s.error})[:5],
        "tokens": sum(s.tokens for s in ok),
        "tokens_per_s": sum(s.tokens for s in ok) / wall_s if wall_s > 0 else None,
        "e2e_ms": _dist([s.e2e_ms for s in ok]),
        "ttft_ms": _dist([s.ttft_ms for s in ok if s.ttft_ms is not None]),
        "tpot_ms": _dist([s.tpot_ms for s in ok if s.tpot_ms is not None]),
        "itl_ms": _dist([g for s in ok for g in s.gaps_ms]),
        "server_e2e_ms": _dist([s.server_e2e_ms for s in ok if s.server_e2e_ms is not None]),
        "outside_drafter_ms": _dist(outside),
    }


def added(api: dict[str, Any], redis: dict[str, Any]) -> dict[str, Any]:
    """API minus Redis, per figure and statistic (ms)."""
    out: dict[str, Any] = {"concurrency": api["concurrency"]}
    for fig in ("e2e_ms", "ttft_ms", "tpot_ms", "itl_ms", "outside_drafter_ms"):
        out[fig] = {k: (api[fig][k] - redis[fig][k]
                        if api[fig][k] is not None and redis[fig][k] is not None else None)
                    for k in ("p50", "p99", "mean")}
    return out


async def run_api_bench(bus: Bus, base_url: str, key: str, cfg: ApiBenchConfig,
                        say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Both paths at every concurrency level on the running system behind ``bus`` and
    ``base_url`` (the gateway's ``.../v1``); returns the rows, the differences and every
    sample's figures."""
    import httpx2 as httpx  # the HTTP client the openai SDK itself uses (a dependency)

    limits = httpx.Limits(max_connections=max(cfg.concurrency) + 4,
                          max_keepalive_connections=max(cfg.concurrency) + 4)
    samples: list[Sample] = []
    walls: dict[tuple[int, str], float] = {}
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        resp = await client.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"})
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
        for c in cfg.concurrency:
            def one(path: str, phase: int, c: int = c) -> Callable[[str], Awaitable[Sample]]:
                if path == "redis":
                    return lambda p: redis_request(bus, p, cfg.max_new_tokens, c, phase)
                return lambda p: api_request(client, base_url, key, model, p, cfg.max_new_tokens, c, phase)

            warm = cfg.warmup if cfg.warmup is not None else c
            for path in PATHS:  # connections opened, caches and the gateway's code paths warm
                await _phase(one(path, -1), cfg.prompts, warm, c, 0)
            per_phase = [cfg.requests // cfg.rounds + (1 if j < cfg.requests % cfg.rounds else 0)
                         for j in range(cfg.rounds)]
            offset = 0
            for j, n in enumerate(per_phase):
                order = PATHS if j % 2 == 0 else PATHS[::-1]  # A B, B A, A B ...
                for path in order:
                    say(f"[{path}] {c} concurrent streams, phase {j + 1}/{cfg.rounds}: {n} requests")
                    t = time.perf_counter()
                    samples += await _phase(one(path, j), cfg.prompts, n, c, offset)
                    walls[(c, path)] = walls.get((c, path), 0.0) + time.perf_counter() - t
                offset += n
    rows = [summarise(samples, c, p, walls.get((c, p), 0.0)) for c in cfg.concurrency for p in PATHS]
    diffs = [added(next(r for r in rows if r["concurrency"] == c and r["path"] == "api"),
                   next(r for r in rows if r["concurrency"] == c and r["path"] == "redis"))
             for c in cfg.concurrency]
    return {"model": model, "results": rows, "added": diffs,
            "samples": [{k: v for k, v in asdict(s).items() if k != "gaps_ms"} for s in samples]}


def hardware() -> dict[str, Any]:
    """The machine the numbers come from: CPU model and count (/proc/cpuinfo), OS, Python."""
    model, logical, cores = None, 0, set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = None
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "processor":
                    logical += 1
                elif k == "model name" and model is None:
                    model = v
                elif k == "physical id":
                    phys = v
                elif k == "core id":
                    cores.add((phys, v))
    except OSError:
        pass
    return {"cpu_model": model or platform.processor() or None, "cpus_in_cpuinfo": logical or None,
            "physical_cores": len(cores) or None, "os_cpu_count": os.cpu_count(),
            "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg": list(os.getloadavg())}
