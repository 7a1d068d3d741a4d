"""wisp-cli drafter speed: how fast each draft backend drafts on this machine.

Why a command of its own: the draft speed decides whether speculation pays on a given box (the
drafter's per-token cost against the target's decode step), and issue 13 asks for it measured,
llama.cpp on the packaged GGUF against torch fp32 on the converted weights, for 1, 4 and 16
sessions drafting together (a host that drafts for several sessions batches their rounds).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from wisp.services.cli.common import fail, make_settings, output_path, quiet_logging, say

drafter_app = typer.Typer(help="Measure the draft model's speed.", no_args_is_help=True)

BACKENDS = ("llamacpp", "torch")


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        fail(f"{flag}: expected positive integers, got {text!r}")
    return values


def _engine(backend: str, settings: Any, threads: int, sessions: int) -> Any:
    from wisp import models

    if backend == "llamacpp":
        from wisp.services.drafter.llamacpp_engine import LlamaCppDraftEngine

        return LlamaCppDraftEngine(models.draft_gguf(settings.draft_model, settings.model_cache),
                                   max_sessions=max(sessions, 1), kv_tokens=16384, n_threads=threads)
    import torch
    from wisp.services.drafter.engine import DraftEngine

    torch.set_num_threads(threads)
    return DraftEngine(models.load_model(settings.draft_model, settings), max_sessions=max(sessions, 1))


def measure(engine: Any, prompt_ids: list[int], sessions: int, tokens: int, reps: int) -> dict[str, float]:
    """Greedy drafting of ``tokens`` tokens for ``sessions`` sessions at once, after a warm
    prefill (only the draft steps are timed, as in a round after the first); ``reps`` repeats,
    median. Returns ms per step and per drafted token."""
    from wisp.services.drafter.engine import DraftCall

    # distinct prompts (the last id varies), so sessions do not draft identical rows
    prompts = [prompt_ids[:-1] + [prompt_ids[-1] + i] for i in range(sessions)]
    for i, ids in enumerate(prompts):
        engine.prefill(f"s{i}", ids)
    times = []
    for _ in range(reps):
        calls = [DraftCall(f"s{i}", ids, tokens) for i, ids in enumerate(prompts)]
        start = time.perf_counter()
        outs = engine.draft_many(calls)
        times.append((time.perf_counter() - start) * 1000.0)
        assert all(len(o.tokens) == tokens for o in outs)
    ms = statistics.median(times)
    return {"ms_per_step": ms / tokens, "ms_per_token": ms / (tokens * sessions),
            "tokens_per_s": tokens * sessions / (ms / 1000.0)}


@drafter_app.command("speed")
def speed(
    backends: Annotated[str, typer.Option(help="Comma-separated: llamacpp, torch.")] = "llamacpp,torch",
    sessions: Annotated[str, typer.Option(help="Sessions drafting together.")] = "1,4,16",
    tokens: Annotated[int, typer.Option(min=1, max=64, help="Tokens drafted per session.")] = 8,
    reps: Annotated[int, typer.Option(min=1, help="Repeats per point (median).")] = 3,
    threads: Annotated[int, typer.Option(min=0, help="Threads per backend (0: all cores).")] = 0,
    draft_model: Annotated[str | None, typer.Option(help="Packaged alias (env WISP_DRAFT_MODEL).")] = None,
    out: Annotated[Path, typer.Option(help="JSON results.")] = Path("out/drafter_speed.json"),
) -> None:
    """Draft speed of the draft model, llama.cpp (GGUF as shipped) vs torch fp32, for several
    sessions drafting together; prints a table and writes JSON."""
    from wisp.models import REGISTRY, ModelLoadError, linear_kernels

    quiet_logging()
    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    if not chosen or any(b not in BACKENDS for b in chosen):
        fail(f"--backends: choose from {', '.join(BACKENDS)}, got {backends!r}")
    counts = _parse_ints(sessions, "--sessions")
    settings = make_settings(draft_model=draft_model)
    if settings.draft_model not in REGISTRY:
        fail(f"{settings.draft_model!r} is not a packaged alias (the GGUF comes from the package)")
    _preflight(chosen, settings)  # one line, before any "loading" line
    output_path(out)
    n_threads = threads or os.cpu_count() or 1
    prompt = list(range(1000, 1064))  # 64 ordinary ids: a warm prompt of typical length
    rows: list[dict[str, Any]] = []
    for backend in chosen:
        say(f"{backend}: loading {settings.draft_model}")
        try:
            engine = _engine(backend, settings, n_threads, max(counts))
        except (ModelLoadError, FileNotFoundError) as err:
            fail(str(err))
        measure(engine, prompt, 1, 2, 1)  # warm-up: page the weights in
        for n in counts:
            say(f"{backend}: {n} session(s)")
            rows.append({"backend": backend, "sessions": n,
                         **measure(engine, prompt, n, tokens, reps)})
        engine.close()
        del engine
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "draft_model": settings.draft_model,
              "threads": n_threads, "tokens": tokens, "reps": reps, "cpu": platform.processor() or
              platform.machine(), "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
              "torch_linear": linear_kernels(settings), "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'backend':10s} {'sessions':>8s} {'ms/step':>9s} {'ms/token':>9s} {'tokens/s':>9s}")
    for r in rows:
        print(f"{r['backend']:10s} {r['sessions']:8d} {r['ms_per_step']:9.1f} {r['ms_per_token']:9.1f} "
              f"{r['tokens_per_s']:9.1f}")
    print(f"({settings.draft_model}, {n_threads} thread(s), {tokens} tokens per session, median of "
          f"{reps}; load average {result['load_avg_1m']:.1f}; JSON: {out})")


def _preflight(backends: list[str], settings: Any) -> None:
    """Refuse in one line, before anything loads, when a chosen backend's weights are missing."""
    from wisp.models import ModelNotPreparedError, draft_gguf, is_prepared

    if "llamacpp" in backends:
        try:
            draft_gguf(settings.draft_model, settings.model_cache)
        except ModelNotPreparedError as err:
            fail(str(err))
    if "torch" in backends and not is_prepared(settings.draft_model, settings.model_cache):
        fail(f"{settings.draft_model!r} is not prepared in {settings.model_cache}; run "
             f"`wisp-cli models prepare {settings.draft_model}`")
