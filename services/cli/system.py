"""wisp-cli up / serve / submit / status / demo: run the services and talk to them."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from wisp.bus import redact
from wisp.services.cli.common import (
    SAMPLE_PROMPT,
    DraftBackendOpt,
    DraftKOpt,
    DraftOpt,
    IsolateOpt,
    ModeOpt,
    RedisUrl,
    TargetOpt,
    TorchDeviceOpt,
    Verbose,
    broker_url,
    fail,
    isolate_cores,
    make_settings,
    preflight_models,
    quiet_logging,
    run_async,
    say,
    setup_logging,
)
from wisp.services.runner import (
    ALL_ROLES,
    ROLES,
    EmbeddedRedis,
    clear_recorded_url,
    connected,
    record_url,
    recorded_api_url,
    run_services,
    with_services,
)
from wisp.settings import Mode

app = typer.Typer()

ApiHostOpt = Annotated[str | None, typer.Option(
    "--api-host", help="Bind address of the HTTP API (env WISP_API_HOST; default 127.0.0.1).")]
ApiPortOpt = Annotated[int | None, typer.Option(
    "--api-port", min=0, max=65535, help="Port of the HTTP API (env WISP_API_PORT; default 8000).")]


@app.command()
def up(
    redis_url: RedisUrl = None,
    mode: ModeOpt = None,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    torch_device: TorchDeviceOpt = None,
    draft_k: DraftKOpt = None,
    draft_backend: DraftBackendOpt = None,
    api_host: ApiHostOpt = None,
    api_port: ApiPortOpt = None,
    no_api: Annotated[bool, typer.Option("--no-api", help="Do not serve the HTTP API.")] = False,
    isolate: IsolateOpt = False,
    verbose: Verbose = False,
) -> None:
    """Start all four services and the OpenAI-compatible HTTP API (on 127.0.0.1:8000 unless
    --api-host/--api-port say otherwise; --no-api: none) in this process (embedded Redis unless a
    URL is given) and stay up until Ctrl-C. The URLs are recorded so `wisp-cli submit` and
    `wisp-cli status` find them with no flags."""
    setup_logging(verbose)
    settings = make_settings(redis_url=redis_url, mode=mode, draft_model=draft_model,
                             target_model=target_model, device=torch_device, draft_k=draft_k,
                             draft_backend=draft_backend, api_host=api_host, api_port=api_port)
    settings = isolate_cores(settings, isolate)
    roles = [*ALL_ROLES] if no_api else [*ALL_ROLES, "gateway"]
    preflight_models(settings, ALL_ROLES)
    if not no_api:
        _preflight_api_port(settings)
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis().start()
        url = embedded.url
        # the embedded server has no password: one meant for a real deployment must not be sent
        settings = settings.model_copy(update={"redis_password": None})

    async def ready(services: list[Any]) -> None:
        api_url = next((s.base_url for s in services if s.role == "gateway"), None)
        record_url(settings, url, api_url)
        print(f"WISP is up ({settings.mode} mode) on {redact(url)}", flush=True)
        if api_url is not None:
            print(f"  OpenAI-compatible API:         {api_url}", flush=True)
        print("  submit from another terminal:  wisp-cli submit \"PROMPT\"", flush=True)
        print("  stop with Ctrl-C", flush=True)

    print(f"starting {', '.join(roles)} on {redact(url)} (loading models...)", flush=True)
    try:
        run_async(run_services(roles, settings, url, on_ready=ready))
    except OSError as err:  # the API's port taken since the preflight
        fail(str(err))
    finally:
        clear_recorded_url(settings, url)
        if embedded is not None:
            embedded.cleanup()


def _preflight_api_port(settings: Any) -> None:
    """Refuse to start, before loading any model, when the API's address is taken."""
    import socket

    family = socket.AF_INET6 if ":" in settings.api_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.api_host, settings.api_port))
        except OSError as err:
            fail(f"the API cannot listen on {settings.api_host}:{settings.api_port}: "
                 f"{err.strerror} (choose another with --api-port, or run without it: --no-api)")


@app.command()
def serve(
    role: Annotated[str, typer.Argument(
        help="drafter | verifier | scheduler | estimator | gateway (the HTTP API)")],
    redis_url: RedisUrl = None,
    mode: ModeOpt = None,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    torch_device: TorchDeviceOpt = None,
    draft_k: DraftKOpt = None,
    draft_backend: DraftBackendOpt = None,
    name: Annotated[str | None,
                    typer.Option("--name", help="Consumer / device name (env WISP_NAME).")] = None,
    api_host: ApiHostOpt = None,
    api_port: ApiPortOpt = None,
    verbose: Verbose = False,
) -> None:
    """Run one service as its own process; start any number of drafters, verifiers and
    gateways against one Redis."""
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r} is not a service; choose one of {', '.join(ROLES)}",
                                 param_hint="ROLE")
    setup_logging(verbose)
    settings = make_settings(redis_url=redis_url, mode=mode, draft_model=draft_model,
                             target_model=target_model, device=torch_device, draft_k=draft_k,
                             draft_backend=draft_backend, name=name, api_host=api_host,
                             api_port=api_port)
    preflight_models(settings, [role])
    if role == "gateway":
        _preflight_api_port(settings)
    if role == "drafter" and settings.device_api is None:  # an edge device: its own API too
        settings = settings.model_copy(update={"device_api": True})
    try:
        run_async(run_services([role], settings, broker_url(settings, redis_url)))
    except OSError as err:  # the API's port taken since the preflight
        fail(str(err))


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
    url: Annotated[str | None, typer.Option(
        "--url", help="Base URL of WISP's OpenAI-compatible API (default: the one `wisp-cli up` "
        "serves, if it is running).")] = None,
    via_redis: Annotated[bool, typer.Option(
        "--via-redis", help="Submit straight to Redis (operators; needs Redis credentials) "
        "instead of through the API.")] = False,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="WISP_API_KEY", help="Bearer key for the API (env WISP_API_KEY).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
    timeout: Annotated[float, typer.Option(min=1.0, help="Give up after this many idle seconds.")] = 600.0,
) -> None:
    """Submit a prompt and stream the committed tokens as they are verified: through the HTTP
    API when one is known (--url, or the one `wisp-cli up` serves), else (or with --via-redis,
    or an explicit --redis-url) straight to Redis."""
    from wisp.client import RequestFailed
    from wisp.client import submit as do_submit
    from wisp.protocol import DoneEvent, TokenEvent

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
    tty = sys.stdout.isatty()

    def show(ev: Any) -> None:
        if not as_json and isinstance(ev, TokenEvent) and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

    api = None if (via_redis or redis_url) else (url or recorded_api_url(settings))
    if api is not None:
        from wisp.api_client import submit_http

        def text(piece: str) -> None:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()

        try:
            got = run_async(submit_http(
                api, prompt, chat_template=not no_chat_template, max_new_tokens=max_new_tokens,
                temperature=temperature, seed=seed, ttft_slo_ms=ttft_slo_ms,
                tpot_slo_ms=tpot_slo_ms, speculation=spec, device=device, api_key=api_key,
                idle_timeout_s=timeout, on_text=text))
        except RequestFailed as err:
            if not as_json and tty:
                sys.stdout.write("\n")
            fail(str(err))
        _report(got, as_json)
        return

    async def run() -> DoneEvent:
        async with connected(settings, broker_url(settings, redis_url), timeout_s=3.0) as bus:
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
            except ValueError as err:  # request validation (pydantic)
                fail(f"bad request: {err}")

    done = run_async(run())
    _report(done.model_dump(exclude={"version", "kind"}), as_json)


def _report(done: dict[str, Any], as_json: bool) -> None:
    """The end of `submit`, the same whichever path it took: one JSON object, or a newline
    after the streamed text and a summary line on stderr."""
    if as_json:
        print(json.dumps(done))
        return
    sys.stdout.write("\n")
    drafted, accepted = done["drafted_tokens"], done["accepted_tokens"]
    rate = accepted / drafted if drafted else float("nan")
    via = f" · via {done['via']}" if done.get("via") else ""
    print(f"[{len(done['token_ids'])} tokens · {done['mode']} · TTFT {done['ttft_ms']:.0f} ms · "
          f"TPOT {done['tpot_ms']:.0f} ms · {done['rounds']} rounds · acceptance {rate:.2f} · "
          f"{done['finish_reason']}{via}]", file=sys.stderr)


@app.command()
def status(
    redis_url: RedisUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Streams (length, each group's lag and pending entries) and live services. Exits
    non-zero when Redis cannot be reached."""
    from wisp.status import collect, render

    settings = make_settings()

    async def run() -> dict[str, Any]:
        async with connected(settings, broker_url(settings, redis_url), timeout_s=3.0) as bus:
            return await collect(bus)

    info = run_async(run())
    info["api_url"] = info.get("api_url") or recorded_api_url(settings)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render(info)


@app.command()
def demo(
    prompt: Annotated[str, typer.Argument(help="The prompt to answer.")] = SAMPLE_PROMPT,
    mode: ModeOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens at most (the sample "
                                                "prompt's answer ends well before).")] = 256,
    draft_model: DraftOpt = None,
    target_model: TargetOpt = None,
    draft_backend: DraftBackendOpt = None,
    isolate: IsolateOpt = False,
) -> None:
    """The main job on a fresh machine: prepare the packaged model pair, start all four
    services on an embedded Redis, answer a sample prompt with streaming output, stop. It shows
    the product: wisp mode (unless --mode or WISP_MODE says otherwise) with the llama.cpp
    drafter on the packaged 4-bit draft model."""
    from wisp.client import RequestFailed
    from wisp.client import submit as do_submit
    from wisp.models import REGISTRY, prepare
    from wisp.protocol import DoneEvent, TokenEvent

    quiet_logging()
    settings = make_settings(mode=mode, draft_model=draft_model, target_model=target_model,
                             draft_backend=draft_backend)
    if mode is None and "WISP_MODE" not in os.environ:
        settings = settings.model_copy(update={"mode": Mode.wisp})
    settings = isolate_cores(settings, isolate)
    wanted = [m for m in (settings.draft_model, settings.target_model) if m in REGISTRY]
    if wanted:
        try:
            prepare(sorted(set(wanted)), settings.model_cache, progress=say)
        except (ValueError, RuntimeError, OSError) as err:
            fail(str(err))
    preflight_models(settings, ALL_ROLES)

    def show(ev: Any) -> None:
        if isinstance(ev, TokenEvent) and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

    async def run() -> DoneEvent:
        async with with_services(settings) as system:
            say(f"embedded Redis on {system.url}; {', '.join(ALL_ROLES)} ready ({settings.mode} mode)")
            print(f"\n> {prompt}\n", flush=True)
            try:
                return await do_submit(system.bus, prompt, on_event=show, max_new_tokens=max_new_tokens)
            except RequestFailed as err:
                fail(str(err))

    d = run_async(run())
    rate = d.accepted_tokens / d.drafted_tokens if d.drafted_tokens else float("nan")
    print(f"\n\n[{len(d.token_ids)} tokens in {d.e2e_ms / 1000:.1f} s · TTFT {d.ttft_ms:.0f} ms · "
          f"TPOT {d.tpot_ms:.0f} ms · {d.rounds} rounds · acceptance {rate:.2f} · {d.mode} mode]")
