"""wisp-cli bench: closed-loop devices against each mode through the same services; with
``--null-models``, the pipeline's own cost per round beside a bare Redis hop chain.

``bench_fresh`` (a fresh embedded system, a warm-up request, the load generator) is the one
code path of every benchmark that starts its own system; ``sim validate`` runs it too.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from wisp.bench import BenchConfig, BenchResult, run_bench, table_rows
from wisp.bus import Bus
from wisp.client import submit
from wisp.services.cli.common import (
    DraftBackendOpt,
    DraftKOpt,
    DraftOpt,
    IsolateOpt,
    TargetOpt,
    fail,
    fmt,
    isolate_cores,
    make_settings,
    output_path,
    preflight_models,
    preflight_prompts,
    print_table,
    quiet_logging,
    run_async,
    say,
)
from wisp.services.runner import ALL_ROLES, connected, free_port, with_services
from wisp.settings import Mode, Settings

T = TypeVar("T")
app = typer.Typer()

NULL_DEVICES = (1, 16, 64)
ONE_DEVICE_P99_MS = 5.0
"""Target: a round's pipeline overhead at one device, p99."""
RAW_CHAIN_FACTOR = 4.0
"""Target: at the most devices, the pipeline's p99 within this factor of the raw hop chain's."""


def parse_counts(text: str, flag: str = "--devices") -> list[int]:
    """``"2"`` or ``"1,16,64"``: device counts, 1..4096, in the order given (no repeats)."""
    try:
        counts = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give device counts like 2 or 1,16,64", param_hint=flag) from None
    if not counts or not all(1 <= n <= 4096 for n in counts):
        raise typer.BadParameter(f"{text!r}: device counts are 1..4096", param_hint=flag)
    return list(dict.fromkeys(counts))


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "centralized+hops": ("centralized", {"server_run_rounds": 0}),
    "centralized+runs": ("centralized", {"server_run_rounds": 32}),
    "wisp+adaptive": ("wisp", {"site": "adaptive"}),
}
"""Modes with one setting changed, to measure side by side with the mode itself:
``centralized+hops`` is centralized serving without server runs (every token a round trip
through the four services: the path before server runs were the default);
``centralized+runs`` names the default (server runs of 32) explicitly, whatever
``WISP_SERVER_RUN_ROUNDS`` says; ``wisp+adaptive`` is wisp with the adaptive site choice
(``WISP_SITE=adaptive``)."""


async def bench_fresh(
    settings: Settings, cfg: BenchConfig, mode: str,
    collect: Callable[[Bus, float, BenchResult], Awaitable[T]] | None = None,
) -> tuple[BenchResult, T | None]:
    """One benchmark on a fresh embedded system: one warm-up request (not measured), the
    closed-loop load, then ``collect(bus, t0, result)`` reads what else the caller needs from
    the streams before the system goes away (``t0``: unix time the measured part began)."""
    async with with_services(settings) as system:
        await submit(system.bus, cfg.prompts[0], max_new_tokens=4)
        t0 = time.time()
        res = await run_bench(system.bus, mode, cfg)
        extra = await collect(system.bus, t0, res) if collect is not None else None
    return res, extra


async def _bench_running(settings: Settings, url: str, cfg: BenchConfig, mode: str) -> BenchResult:
    """One benchmark against an already running system (its drafters must be in ``mode``)."""
    async with connected(settings, url) as bus:
        live = {i.get("mode") for i in (await bus.live("drafter")).values()}
        if not live:
            fail("no drafter is running on that Redis: start `wisp-cli up` or `wisp-cli serve drafter`")
        if live != {mode}:
            fail(f"the running drafters are in mode {sorted(live)}, not {mode!r}")
        return await run_bench(bus, mode, cfg)


@app.command()
def bench(
    mode: Annotated[str, typer.Option(
        "--mode", help="One mode or a comma list (e.g. wisp,sled,centralized; the variants "
        "centralized+hops, without server runs, and wisp+adaptive): each runs in turn "
        "through the same services on the same prompts, reported side by side.")] = "sled",
    devices: Annotated[str | None, typer.Option(
        help="Concurrent simulated devices, or a comma list of counts run in turn (default 2; "
        "with --null-models 1,16,64).")] = None,
    duration: Annotated[float | None, typer.Option(
        min=1.0, help="Seconds of load per mode and device count (default 60; with --null-models "
        "5).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    ttft_slo_ms: Annotated[float | None, typer.Option(min=1.0)] = None,
    tpot_slo_ms: Annotated[float | None, typer.Option(min=1.0)] = None,
    think_s: Annotated[float, typer.Option(min=0.0, help="Mean think time between requests.")] = 0.0,
    prompts: Annotated[int, typer.Option(min=1, help="Distinct prompts drawn from the packaged data.")] = 30,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    draft_k: DraftKOpt = None,
    draft_backend: DraftBackendOpt = None,
    isolate: IsolateOpt = False,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="Drive an already running system instead of starting one per mode.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where to write the JSON results (default out/bench.json; with --null-models "
        "out/null-overhead.json).")] = None,
    repeat: Annotated[int, typer.Option(
        min=1, max=50, help="Run the modes this many times, alternating (sled, wisp, sled, wisp ...), "
        "and add a row per mode pooling every run's requests: a machine whose speed drifts "
        "then favours no mode.")] = 1,
    null_models: Annotated[bool, typer.Option(
        "--null-models", help="The pipeline's own cost: the four services over Redis with engines "
        "that answer at once (no model loaded); per-round overhead p50/p99 at each device count "
        "beside a bare Redis chain of the same four hops, measured on the same server.")] = False,
) -> None:
    """Drive WISP with N closed-loop devices and print SLO attainment, goodput, TTFT/TPOT
    percentiles, acceptance and wasted drafting time (table + JSON)."""
    modes = [m.strip() for m in mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in {x.value for x in Mode} | set(VARIANTS)]
    if bad or not modes:
        raise typer.BadParameter(f"unknown mode(s) {bad}: use wisp, sled, centralized or "
                                 f"{', '.join(VARIANTS)}", param_hint="--mode")
    if redis_url and any(m in VARIANTS for m in modes):
        raise typer.BadParameter("a variant changes the services' settings; with --redis-url "
                                 "give the running system's mode", param_hint="--mode")
    if redis_url and len(modes) != 1:
        raise typer.BadParameter("with --redis-url the running system has one mode", param_hint="--mode")
    if null_models and redis_url:
        raise typer.BadParameter("--null-models starts its own system", param_hint="--redis-url")
    if null_models and len(modes) != 1:
        raise typer.BadParameter("--null-models measures one mode at a time", param_hint="--mode")
    if isolate and redis_url:
        raise typer.BadParameter("--isolate-cores pins the services this command starts; a running "
                                 "system's are pinned where it was started", param_hint="--redis-url")
    counts = parse_counts(devices) if devices else (list(NULL_DEVICES) if null_models else [2])
    quiet_logging()
    texts = tuple(p.text for p in preflight_prompts("mixed", prompts))
    if null_models:
        settings = null_settings(make_settings(mode=modes[0], null_models=True, draft_k=draft_k))
        path = output_path(out or Path("out/null-overhead.json"))
        null_overhead(settings, counts, duration or 5.0, max_new_tokens, texts, path)
        return
    for m in modes if not redis_url else []:  # every prerequisite before the first run
        preflight_models(make_settings(mode=VARIANTS.get(m, (m, {}))[0], draft_model=draft_model,
                                       target_model=target_model), ALL_ROLES)
    path = output_path(out or Path("out/bench.json"))
    seconds = duration or 60.0
    rows = []
    cores = {}
    if isolate:  # the same split for every run, announced once
        pinned = isolate_cores(make_settings(), True)
        cores = {"verifier_cpus": pinned.verifier_cpus, "drafter_cpus": pinned.drafter_cpus}
    for n in counts:
        cfg = BenchConfig(devices=n, duration_s=seconds, max_new_tokens=max_new_tokens,
                          ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, think_s=think_s, prompts=texts)
        pooled: dict[str, BenchResult] = {}
        for rep in range(repeat):
            for m in modes:
                base, update = VARIANTS.get(m, (m, {}))
                settings = make_settings(mode=base, draft_model=draft_model, target_model=target_model,
                                         draft_k=draft_k, draft_backend=draft_backend, redis_url=redis_url)
                settings = settings.model_copy(update=update)
                if isolate:
                    settings = settings.model_copy(update=dict(cores))
                tag = f" (run {rep + 1}/{repeat})" if repeat > 1 else ""
                say(f"[{m}] {n} devices x {seconds:.0f} s{tag} ...")
                if redis_url:
                    res = run_async(_bench_running(settings, redis_url, cfg, m))
                else:
                    res, _ = run_async(bench_fresh(settings, cfg, m))
                row = res.as_dict()
                say(_memory_line(row))
                if repeat > 1:
                    row["run"] = rep + 1
                    pooled[m] = pooled[m].merged(res) if m in pooled else res
                rows.append(row)
        rows += [{**res.as_dict(), "run": "all"} for res in pooled.values()]
    header, body = table_rows(rows, with_run=repeat > 1)
    print_table(f"wisp-cli bench: {','.join(map(str, counts))} devices, {seconds:.0f} s, "
                f"{max_new_tokens} new tokens", header, body)
    config = {**{k: v for k, v in cfg.__dict__.items() if k != "prompts"},
              "devices": counts[0] if len(counts) == 1 else counts, "repeat": repeat,
              "draft_backend": draft_backend or "auto", "cores": cores or None}
    path.write_text(json.dumps({"config": config, "results": rows}, indent=2))
    say(f"results written to {path}")


def _memory_line(row: dict[str, Any]) -> str:
    """Redis' memory over a run, in a line: where it started, peaked and ended, and whether it
    levelled off (``memory_growth``)."""
    series = [mb for _, mb in row.get("redis_used_memory_mb_series", [])]
    if not series:
        return "Redis memory: not sampled"
    growth = row.get("redis_memory_growth_last_half")
    trend = "too short to tell a plateau" if growth is None else f"{growth:+.1%} over the second half"
    return (f"Redis used_memory: {series[0]:.1f} MB at the start, peak {max(series):.1f} MB, "
            f"{series[-1]:.1f} MB at the end ({trend}); {row.get('wisp_keys_after')} WISP keys left")


# ---------------------------------------------------------------------- --null-models
NULL_DEFAULTS = {"max_wait_ms": 0.0, "stream_maxlen": 200_000}
"""What the null-model bench changes unless set (WISP_*): no deliberate batching hold (a wait
the scheduler chooses is policy, not the pipeline's cost), and streams long enough to read
every round of a run back."""


def null_settings(settings: Settings) -> Settings:
    """``settings`` with ``NULL_DEFAULTS`` for the fields the environment did not set."""
    return settings.model_copy(update={k: v for k, v in NULL_DEFAULTS.items()
                                       if k not in settings.model_fields_set})


def null_overhead(settings: Settings, counts: Sequence[int], duration: float, max_new_tokens: int,
                  texts: tuple[str, ...], out: Path) -> dict[str, Any]:
    """Measure, print and write the pipeline's per-round overhead with null engines at each
    device count, each next to the raw hop chain measured just before it on the same Redis."""
    result = run_async(_null_overhead(settings, counts, duration, max_new_tokens, texts))
    rows = result["results"]
    print_table(
        f"per-round pipeline overhead, null engines ({settings.mode}, k={settings.draft_k}, "
        f"{duration:.0f} s per count; load average {result['load_avg_before'][0]:.2f} before)",
        ["devices", "rounds", "pipeline p50 ms", "pipeline p99 ms", "raw 4-hop p50 ms",
         "raw 4-hop p99 ms", "p99 / raw", "target", "met"],
        [[str(r["devices"]), str(r["rounds"]), fmt(r["pipeline_p50_ms"]), fmt(r["pipeline_p99_ms"]),
          fmt(r["raw_chain_p50_ms"]), fmt(r["raw_chain_p99_ms"]), fmt(r["p99_vs_raw"]),
          r["target"] or "-", {True: "yes", False: "NO", None: "-"}[r["target_met"]]] for r in rows])
    seg = rows[-1]["segments_p50_ms"]
    say(f"where a round's time goes at {rows[-1]['devices']} devices (p50 ms): "
        + ", ".join(f"{k} {fmt(v)}" for k, v in seg.items()))
    out.write_text(json.dumps(result, indent=2))
    say(f"results written to {out}")
    return result


async def _null_overhead(settings: Settings, counts: Sequence[int], duration: float,
                         max_new_tokens: int, texts: tuple[str, ...]) -> dict[str, Any]:
    from wisp.bench import raw_hop_chain

    rows = []
    before = os.getloadavg()
    async with with_services(settings) as system:
        await submit(system.bus, texts[0], max_new_tokens=max_new_tokens)  # warm-up, not measured
        for n in counts:
            say(f"[raw chain] {n} devices x {duration:.0f} s ...")
            raw = await raw_hop_chain(system.url, f"{settings.namespace}:rawchain", devices=n,
                                      duration_s=duration)
            say(f"[null pipeline] {n} devices x {duration:.0f} s ...")
            cfg = BenchConfig(devices=n, duration_s=duration, max_new_tokens=max_new_tokens, prompts=texts)
            load = os.getloadavg()
            calls = await _command_calls(system.bus)
            t0 = time.time()
            res = await run_bench(system.bus, str(settings.mode), cfg)
            row = await _overhead_row(system.bus, system.services, t0, res, raw, load)
            after = await _command_calls(system.bus)
            per_round = {k: (after[k] - calls.get(k, 0)) / max(row["rounds"], 1) for k in after}
            row["redis_commands_per_round"] = round(sum(per_round.values()), 1)
            row["redis_commands_per_round_by_command"] = {
                k: round(v, 2) for k, v in sorted(per_round.items(), key=lambda kv: -kv[1]) if v >= 0.05}
            rows.append(row)
    last = rows[-1]
    for r in rows:
        if r["devices"] == 1:
            r["target"] = f"p99 <= {ONE_DEVICE_P99_MS:g} ms"
            r["target_met"] = r["pipeline_p99_ms"] <= ONE_DEVICE_P99_MS
        elif r is last:
            r["target"] = f"p99 <= {RAW_CHAIN_FACTOR:g}x raw"
            r["target_met"] = r["p99_vs_raw"] <= RAW_CHAIN_FACTOR
    return {
        "what": "per-round pipeline overhead with null engines: ms from the drafter publishing a "
                "round's block to it publishing the session's next block, minus engine time "
                "(the null engines' own, microseconds); raw chain: ms between two sends of one "
                "message through 4 bare XADD -> XREADGROUP -> XACK hops on the same Redis",
        "command": "wisp-cli " + " ".join(sys.argv[1:]),
        "config": {"mode": str(settings.mode), "draft_k": settings.draft_k, "duration_s": duration,
                   "max_new_tokens": max_new_tokens, "max_wait_ms": settings.max_wait_ms,
                   "max_batch_size": settings.max_batch_size, "hops": 4,
                   "redis": "embedded redis-server on 127.0.0.1, services in this process"},
        "cpu_count": os.cpu_count(),
        "load_avg_before": list(before),
        "load_avg_after": list(os.getloadavg()),
        "results": rows,
    }


async def _command_calls(bus: Bus) -> dict[str, int]:
    """Calls per Redis command so far on the server (INFO commandstats): the difference over a
    run, per round, says what a round costs the broker (the load generator's own calls and the
    services' idle polling included; the raw chain is 3 per hop)."""
    info = await bus.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def _overhead_row(bus: Bus, services: Sequence[Any], t0: float, res: BenchResult,
                        raw: list[float], load: tuple[float, float, float]) -> dict[str, Any]:
    """One device count's row: the pipeline's rounds read back from the streams since ``t0``."""
    from wisp.bench import round_overheads, round_segments, stream_messages
    from wisp.metrics import percentile
    from wisp.protocol import AnnotatedBlock, DraftBlock, Verdict, VerifyBatch

    keys = bus.keys
    blocks = await stream_messages(bus, keys.draft, DraftBlock, t0)
    annotated = await stream_messages(bus, keys.annotated, AnnotatedBlock, t0)
    batches: list[VerifyBatch] = []
    verdicts: list[Verdict] = []
    for s in services:
        if s.role == "verifier":
            batches += await stream_messages(bus, keys.batch(s.name), VerifyBatch, t0)
        if s.role == "drafter":
            verdicts += await stream_messages(bus, keys.verdict(s.name), Verdict, t0)
    per_round = round_overheads(blocks)
    segments = round_segments(blocks, annotated, batches, verdicts)
    p99, raw99 = percentile(per_round, 99), percentile(raw, 99)
    return {
        "devices": res.config.devices, "requests": len(res.done), "failed_requests": len(res.errors),
        "refused_requests": len(res.refusals),
        "rounds": len(per_round), "batches": len(batches),
        "mean_batch_size": sum(len(b.items) for b in batches) / len(batches) if batches else None,
        "pipeline_p50_ms": percentile(per_round, 50), "pipeline_p99_ms": p99,
        "pipeline_mean_ms": sum(per_round) / len(per_round) if per_round else None,
        "raw_chain_rounds": len(raw), "raw_chain_p50_ms": percentile(raw, 50), "raw_chain_p99_ms": raw99,
        "p99_vs_raw": p99 / raw99 if raw99 > 0 else None,
        "segments_p50_ms": {k: percentile(v, 50) for k, v in segments.items()},
        "segments_p99_ms": {k: percentile(v, 99) for k, v in segments.items()},
        "load_avg": list(load), "target": None, "target_met": None,
    }


# ---------------------------------------------------------------------- bench-api
API_BENCH_STARTUP_S = 60.0
"""How long the gateway process may take to answer /healthz (imports, Redis, the port)."""


@app.command("bench-api")
def bench_api(
    concurrency: Annotated[str, typer.Option(
        help="Concurrent streams, or a comma list of levels run in turn.")] = "1,32",
    requests: Annotated[int, typer.Option(
        min=1, help="Measured requests per path at each level.")] = 200,
    max_new_tokens: Annotated[int, typer.Option(min=2, help="Tokens per request (all of them: "
                                                "null engines never stop early).")] = 64,
    rounds: Annotated[int, typer.Option(
        min=1, max=50, help="ABBA pairs of phases per level (the paths alternate, so drift "
        "favours neither).")] = 2,
    mode: Annotated[str, typer.Option(help="wisp | sled | centralized.")] = "sled",
    draft_k: DraftKOpt = None,
    prompts: Annotated[int, typer.Option(min=1, help="Distinct prompts from the packaged data.")] = 30,
    gateway_in_process: Annotated[bool, typer.Option(
        "--gateway-in-process", help="Run the gateway in the services' process and event loop, "
        "as `wisp-cli up` does, instead of its own process (`wisp-cli serve gateway`, as in a "
        "cluster).")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Where to write the JSON results (default out/api-latency.json).")] = None,
) -> None:
    """The HTTP API's added latency: the same requests through the gateway (streamed
    /v1/completions) and straight on the bus (wisp.client.submit), side by side on one system
    with null engines; per request (e2e) and per token (TPOT, inter-token gaps), p50/p99, at
    each concurrency level (table + JSON)."""
    from wisp.bench_api import ApiBenchConfig, hardware

    if mode not in {x.value for x in Mode}:
        raise typer.BadParameter(f"unknown mode {mode!r}: use wisp, sled, centralized", param_hint="--mode")
    levels = parse_counts(concurrency, "--concurrency")
    quiet_logging()
    texts = tuple(p.text for p in preflight_prompts("mixed", prompts))
    path = output_path(out or Path("out/api-latency.json"))
    settings = null_settings(make_settings(mode=mode, null_models=True, draft_k=draft_k))
    key = "wisp-bench-" + secrets.token_hex(12)
    settings = settings.model_copy(update={
        "api_keys": key, "api_keys_file": None, "api_host": "127.0.0.1", "api_port": free_port(),
        # the bench sends hundreds of requests a minute on one key
        "api_rate_per_min": 1e9,
        "max_new_tokens_limit": max(settings.max_new_tokens_limit, max_new_tokens)})
    cfg = ApiBenchConfig(concurrency=tuple(levels), requests=requests, max_new_tokens=max_new_tokens,
                         prompts=texts, rounds=rounds)
    hw_before = hardware()
    t0 = time.time()
    result = run_async(_bench_api(settings, cfg, key, gateway_in_process))
    doc = {
        "what": "latency the OpenAI-compatible HTTP API (the gateway) adds over the Redis path "
                "(wisp.client.submit), same requests side by side on one system with null engines; "
                "client-side clocks; added = API minus Redis",
        "command": "wisp-cli " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "duration_s": round(time.time() - t0, 1),
        "config": {"concurrency": levels, "requests_per_path_per_level": requests,
                   "max_new_tokens": max_new_tokens, "rounds": rounds, "order": "ABBA phases",
                   "mode": str(settings.mode), "draft_k": settings.draft_k, "null_models": True,
                   "prompts": len(texts), "endpoint": "POST /v1/completions, stream: true",
                   "gateway": "in the services' process" if gateway_in_process
                   else "own process (wisp-cli serve gateway)",
                   "redis": "embedded redis-server on 127.0.0.1; services in the bench's process"},
        "hardware": {**hw_before, "load_avg_after": list(os.getloadavg())},
        **result,
    }
    _print_api_table(doc)
    path.write_text(json.dumps(doc, indent=2))
    say(f"results written to {path}")


def _print_api_table(doc: dict[str, Any]) -> None:
    hw = doc["hardware"]
    header = ["streams", "path", "ok/sent", "e2e p50", "e2e p99", "TTFT p50", "TTFT p99",
              "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "outside drafter p50"]
    body = []
    for r in doc["results"]:
        body.append([str(r["concurrency"]), r["path"], f"{r['ok']}/{r['requests']}",
                     *(fmt(r[f][s]) for f in ("e2e_ms", "ttft_ms", "tpot_ms", "itl_ms")
                       for s in ("p50", "p99")), fmt(r["outside_drafter_ms"]["p50"])])
        if r["path"] == "api":
            a = next(d for d in doc["added"] if d["concurrency"] == r["concurrency"])
            body.append([str(r["concurrency"]), "added (api - redis)", "",
                         *(fmt(a[f][s]) for f in ("e2e_ms", "ttft_ms", "tpot_ms", "itl_ms")
                           for s in ("p50", "p99")), fmt(a["outside_drafter_ms"]["p50"])])
    print_table(f"HTTP API vs Redis path, ms ({doc['config']['mode']}, null engines, "
                f"{doc['config']['max_new_tokens']} tokens; {hw['cpu_model']}, "
                f"{hw['os_cpu_count']} CPUs)", header, body)


async def _bench_api(settings: Settings, cfg: Any, key: str, in_process: bool) -> dict[str, Any]:
    """The services (and, ``in_process``, the gateway) on a fresh embedded Redis; otherwise
    the gateway as its own ``wisp-cli serve gateway`` process against it."""
    from wisp.bench_api import run_api_bench

    roles = [*ALL_ROLES, "gateway"] if in_process else list(ALL_ROLES)
    async with with_services(settings, roles) as system:
        await submit(system.bus, cfg.prompts[0], max_new_tokens=4)  # warm-up, not measured
        if in_process:
            base_url = next(s.base_url for s in system.services if s.role == "gateway")
            return await run_api_bench(system.bus, base_url, key, cfg, say)
        with tempfile.TemporaryDirectory(prefix="wisp-bench-api-") as tmp:
            log_path = Path(tmp) / "gateway.log"
            proc = _start_gateway(settings, system.url, log_path)
            try:
                base_url = f"http://127.0.0.1:{settings.api_port}/v1"
                await _wait_for_gateway(proc, base_url, log_path)
                return await run_api_bench(system.bus, base_url, key, cfg, say)
            finally:
                proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, 15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _start_gateway(settings: Settings, url: str, log_path: Path) -> subprocess.Popen[bytes]:
    """``wisp-cli serve gateway`` against the bench's Redis, with the bench's API settings and
    nothing else of this environment's WISP_ settings (a password meant for another Redis)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update({
        "WISP_REDIS_URL": url, "WISP_NAMESPACE": settings.namespace, "WISP_MODE": str(settings.mode),
        "WISP_TARGET_MODEL": settings.target_model, "WISP_DRAFT_MODEL": settings.draft_model,
        "WISP_NULL_MODELS": "true", "WISP_API_HOST": settings.api_host,
        "WISP_API_PORT": str(settings.api_port), "WISP_API_KEYS": settings.api_keys or "",
        "WISP_API_RATE_PER_MIN": str(settings.api_rate_per_min),
        "WISP_MAX_NEW_TOKENS_LIMIT": str(settings.max_new_tokens_limit),
    })
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "wisp.services.cli", "serve", "gateway"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


async def _wait_for_gateway(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    """Until the gateway answers ``GET /healthz`` (fail with its log if it exits or is slow)."""
    health = base_url.removesuffix("/v1") + "/healthz"
    host, port = "127.0.0.1", int(base_url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + API_BENCH_STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the gateway exited ({proc.returncode}): {_tail(log_path)}")
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {health.split(str(port), 1)[1]} HTTP/1.1\r\nHost: {host}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    fail(f"the gateway did not answer {health} within {API_BENCH_STARTUP_S:.0f} s: "
         f"{_tail(log_path)}")


def _tail(path: Path, chars: int = 1500) -> str:
    """The end of a log, for an error line (read once, at the failure)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
