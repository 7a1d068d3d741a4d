"""wisp-cli profile / estimator: profile the verifier, fit and evaluate the verify-time model.

* ``wisp-cli profile verifier``: load the real target through ``VerifierEngine`` and time batched
  verification (cache-hit rounds, as in serving) over a grid of batch shapes -> profile JSON.
* ``wisp-cli estimator fit``: fit the learned estimator on a profile (held-out MAPE reported) ->
  model JSON.
* ``wisp-cli estimator eval``: MAPE / p90 on held-out measured batches, learned vs the linear
  baseline; a table, and JSON with ``--json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from wisp.services.cli.common import fail, make_settings, output_path, preflight_models, require_file

profile_app = typer.Typer(help="Measure the real verifier over a grid of batch shapes.",
                          no_args_is_help=True)
estimator_app = typer.Typer(help="Fit and evaluate the verification-time estimator.",
                            no_args_is_help=True)


def _ints(text: str, flag: str, low: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}",
                                 param_hint=flag) from None
    if not vals or min(vals) < low:
        raise typer.BadParameter(f"expected integers >= {low}, got {text!r}", param_hint=flag)
    return vals


# ====================================================================== profile verifier
class EngineProbe:
    """``wisp.profile.Probe`` over a real ``VerifierEngine``: wall time of ``engine.verify`` (what
    the verifier service reports as ``measured_ms``) and the engine's own forward time."""

    def __init__(self, engine: Any, vocab_size: int) -> None:
        self.engine = engine
        self.vocab_size = vocab_size

    def verify(self, rows: Sequence[tuple[str, Sequence[int], Sequence[int]]]) -> tuple[float, float, list]:
        from wisp.services.verifier.engine import VerifyItem

        items = [VerifyItem(sid, list(c), list(d), None, 0.0, None) for sid, c, d in rows]
        t0 = time.perf_counter()
        res = self.engine.verify(items)
        wall = (time.perf_counter() - t0) * 1000.0
        return wall, float(self.engine.last_forward_ms), [
            (r.new_tokens, r.context_len - r.new_tokens, r.cache_hit) for r in res]

    def clone(self, src: str, dst: str) -> bool:
        """Copy a prefilled session (the KV *values* do not change the timing, only its length
        does, so one real prefill serves every row)."""
        return self.engine.clone_session(src, dst)

    def drop(self, session_id: str) -> None:
        self.engine.drop(session_id)


@profile_app.command("verifier")
def profile_verifier(
    out: Annotated[Path, typer.Option("--out", help="Profile JSON to write.")],
    target_model: Annotated[str | None, typer.Option(
        "--target-model", help="Alias, local path or hub id (default: WISP_TARGET_MODEL, "
        "qwen-coder-1.5b).")] = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Rounds per batch.")] = "1,2,4,8",
    draft_tokens: Annotated[str, typer.Option(
        "--draft-tokens", help="Drafted tokens per round (each row feeds 1 + this).")] = "0,1,2,3,4,6,8",
    contexts: Annotated[str, typer.Option(
        "--contexts", help="Cached context per row (prefilled before timing).")] = "32,128,384",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Measurements per grid cell.")] = 3,
    mixed: Annotated[int, typer.Option(
        "--mixed", min=0, help="Extra batches whose rows differ in draft length and context.")] = 16,
    max_batch_tokens: Annotated[int, typer.Option(
        "--max-batch-tokens", min=1, help="Cells with more padded tokens (batch x (draft+1)) are "
        "measured at the smallest and largest context only.")] = 40,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    torch_device: Annotated[str | None, typer.Option("--torch-device", help="cpu, cuda ...")] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads (0 = default).")] = 0,
    max_contention: Annotated[float, typer.Option(
        "--max-contention", min=0.0, max=1.0, help="When other processes used more than this "
        "share of the CPU while a batch ran, wait for a quiet machine and measure it again "
        "(1 = never).")] = 0.25,
    retries: Annotated[int, typer.Option(
        "--retries", min=0, help="Re-measurements per contended batch (the last is kept).")] = 2,
    max_wait_s: Annotated[float, typer.Option(
        "--max-wait-s", min=0.0, help="Total time to spend waiting for a quiet machine.")] = 900.0,
) -> None:
    """Time ONE batched verify per grid shape on the real target (cache-hit rounds: every row's
    session holds its context before timing) and write the samples with the hardware."""
    from wisp.profile import GridSpec, hardware_info, plan_grid, run_profile

    try:
        spec = GridSpec(_ints(batch_sizes, "--batch-sizes", 1), _ints(draft_tokens, "--draft-tokens", 0),
                        _ints(contexts, "--contexts", 1), repeats, mixed, max_batch_tokens, seed)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    settings = make_settings(target_model=target_model, device=torch_device,
                             torch_threads=threads or None)
    preflight_models(settings, ["verifier"])
    output_path(out)
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from wisp import models
    from wisp.services.verifier.engine import VerifierEngine

    console = Console(stderr=True)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    plan = plan_grid(spec)
    console.print(f"profiling {settings.target_model} on {settings.device}: {len(plan)} batches "
                  f"({spec.repeats} repeats per cell, {spec.mixed} mixed)")
    t0 = time.monotonic()
    model = models.load_model(settings.target_model, settings)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    engine = VerifierEngine(model, max_sessions=max(64, max(spec.batch_sizes) + 2))
    console.print(f"model loaded in {time.monotonic() - t0:.1f} s")
    hw = hardware_info(settings.device, str(next(model.parameters()).dtype).removeprefix("torch."),
                       torch.get_num_threads())
    # the linear kernels change a CPU profile about 2x (``WISP_CPU_LINEAR``): say which ran
    hw["linear"] = models.linear_kernels(settings)
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[last]}"), console=console) as bar:
        task = bar.add_task("verify batches", total=len(plan), last="")

        every = max(1, len(plan) // 20)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, last=what)
            if not console.is_terminal and (done % every == 0 or done == total):
                console.print(f"{done}/{total} batches, {time.monotonic() - t0:.0f} s: {what}")

        prof = run_profile(EngineProbe(engine, vocab), spec, target_model=settings.target_model,
                           hardware=hw, progress=progress, log=lambda m: console.print(m),
                           max_contention=max_contention if max_contention < 1 else None,
                           retries=retries, max_wait_s=max_wait_s)
    prof.save(out)
    ms = [s.measured_ms for s in prof.samples]
    n = prof.notes
    console.print(f"{len(prof.samples)} batches in {prof.duration_s:.0f} s (verify {min(ms):.0f}-"
                  f"{max(ms):.0f} ms); load average before/after {n['load_avg_before']} / "
                  f"{n['load_avg_after']}; others used {n['mean_contention']:.0%} of the CPU on "
                  f"average; {n['retried_batches']} re-measured after {n['waited_s']:.0f} s of waiting, "
                  f"{n['contended_samples']} still contended")
    print(str(out))


# ====================================================================== estimator fit / eval
def _load_profile(path: Path) -> Any:
    from wisp.profile import Profile

    require_file(path, "the profile", "wisp-cli profile verifier --out PATH")
    try:
        return Profile.load(path)
    except (OSError, ValueError) as err:
        fail(f"cannot read profile {path}: {err}")


MaxContention = Annotated[float | None, typer.Option(
    "--max-contention", min=0.0, max=1.0, help="Use only batches measured while other processes "
    "used at most this share of the CPU (default: all).")]


def _pairs(prof: Any, max_contention: float | None) -> list:
    pairs = prof.pairs(max_contention=max_contention)
    if len(pairs) < 8:
        fail(f"only {len(pairs)} usable batches in the profile (--max-contention too strict?)")
    return pairs


def _profile_id(prof: Any) -> str:
    h = hashlib.sha256()
    for s in prof.samples:
        h.update(f"{s.new_tokens}{s.context_lens}{s.measured_ms:.3f};".encode())
    return h.hexdigest()[:16]


@estimator_app.command("fit")
def estimator_fit(
    profile: Annotated[Path, typer.Argument(help="Profile JSON (`wisp-cli profile verifier`).")],
    out: Annotated[Path, typer.Option("--out", help="Model JSON to write.")],
    heldout: Annotated[float, typer.Option(
        "--heldout", min=0.0, max=0.9, help="Fraction of batch *shapes* held out for the error "
        "report.")] = 0.25,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split and the trees.")] = 0,
    all_samples: Annotated[bool, typer.Option(
        "--all", help="Write a model fitted on every sample (for deployment); the held-out error "
        "is still measured on a split fit first.")] = False,
    trees: Annotated[int, typer.Option("--trees", min=0, help="Boosted trees (0 = base only).")] = 200,
    max_contention: MaxContention = None,
    depth: Annotated[int, typer.Option("--depth", min=1, max=8)] = 3,
) -> None:
    """Fit the learned estimator (non-negative base x boosted correction) on a profile and
    report its held-out error."""
    from wisp.policy import learned_estimator as le

    prof = _load_profile(profile)
    pairs = _pairs(prof, max_contention)
    output_path(out)
    cfg = le.FitConfig(n_trees=trees, depth=depth, seed=seed)
    train, test = le.split_by_shape(pairs, heldout, seed) if heldout > 0 else (pairs, [])
    meta = {"target_model": prof.target_model, "hardware": prof.hardware,
            "profile": {"path": str(profile), "id": _profile_id(prof), "created": prof.created,
                        "samples": len(pairs), "load_avg": prof.notes.get("load_avg_before"),
                        "max_contention": max_contention}}
    split = {"heldout": heldout, "seed": seed}
    try:
        est = le.fit(train, cfg, meta={**meta, "split": split})
    except ValueError as err:
        fail(str(err))
    report = {"heldout": le.error_summary(le.abs_pct_errors(est, test)),
              "train": le.error_summary(le.abs_pct_errors(est, train)),
              "linear_heldout": le.error_summary(le.abs_pct_errors(le.fit_linear(train), test)),
              "noise_floor": le.noise_floor(pairs)}
    if all_samples:
        est = le.fit(pairs, cfg, meta={**meta, "split": None})
    est.meta["eval"] = report
    est.save(out)
    h = report["heldout"]
    print(f"fitted on {est.meta['n_train']} batches ({'all' if all_samples else 'train split'}); "
          f"held-out MAPE {h['mape']:.1%} p90 {h['p90']:.1%} over {h['n']} batches "
          f"(linear {report['linear_heldout']['mape']:.1%}; noise floor {report['noise_floor']:.1%})",
          file=sys.stderr)
    print(str(out))


def _by_group(samples: list, errs: Any, key: Any) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for (s, _), e in zip(samples, errs, strict=True):
        out.setdefault(key(s), []).append(float(e))
    return out


@estimator_app.command("reuse")
def estimator_reuse(
    queued: Annotated[str, typer.Option("--queued", help="Queue sizes, comma-separated.")] = "16,64,256",
    reps: Annotated[int, typer.Option("--reps", min=10, help="Selections timed per size and arm.")] = 200,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path("out/estimator-reuse.json"),
) -> None:
    """How long the scheduler's batch selection takes when each round's time alone comes from
    the estimator hop's annotation, beside predicting it in the scheduler (the shipped model of
    the configured target, else the linear one): the measurement behind using the annotation."""
    from wisp.bench import select_timings
    from wisp.policy.learned_estimator import default_estimator
    from wisp.profile import hardware_info, load_average
    from wisp.services.cli.common import fmt, print_table, say

    sizes = [int(x) for x in queued.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("give queue sizes of at least 1, e.g. 16,64,256", param_hint="--queued")
    path = output_path(out)
    settings = make_settings()
    est = default_estimator(settings)
    before = load_average()
    rows = select_timings(est, sizes, reps=reps, seed=seed)
    print_table(
        f"SloAwarePolicy.select, {type(est).__name__} ({reps} selections per cell; "
        f"load average {before[0]:.2f})",
        ["queued", "annotation p50 ms", "p90", "predicted p50 ms", "p90", "saved (p50)"],
        [[str(r["queued"]), fmt(r["annotated_p50_ms"]), fmt(r["annotated_p90_ms"]),
          fmt(r["predicted_p50_ms"]), fmt(r["predicted_p90_ms"]), f"{r['saved_p50']:.0%}"]
         for r in rows])
    path.write_text(json.dumps({"estimator": type(est).__name__, "model_key": est.model_key,
                                "hardware": hardware_info(), "load_avg_before": before,
                                "results": rows}, indent=2))
    say(f"results written to {path}")


@estimator_app.command("eval")
def estimator_eval(
    profile: Annotated[Path, typer.Argument(help="Profile or held-out profile JSON.")],
    model: Annotated[Path | None, typer.Option(
        "--model", help="Model JSON. Fitted on this same profile: its held-out split is used; "
        "fitted elsewhere: every sample is held out. Omitted: grouped k-fold on the profile.")] = None,
    folds: Annotated[int, typer.Option("--folds", min=2, help="k of the k-fold (no --model).")] = 5,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_contention: MaxContention = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the JSON here.")] = None,
) -> None:
    """MAPE and p90 absolute percentage error of the learned estimator on measured batches it was
    not fitted on, beside the linear baseline and the measurement noise floor."""
    import numpy as np
    from wisp.policy import learned_estimator as le

    prof = _load_profile(profile)
    pairs = _pairs(prof, max_contention)
    if json_out is not None:
        output_path(json_out)
    result: dict[str, Any] = {"profile": str(profile), "profile_samples": len(pairs),
                              "max_contention": max_contention, "hardware": prof.hardware,
                              "load_avg": prof.notes.get("load_avg_before"),
                              "mean_contention": prof.notes.get("mean_contention")}
    if model is not None:
        require_file(model, "the estimator model", "wisp-cli estimator fit PROFILE --out PATH")
        try:
            est = le.load_estimator(model.read_text())
        except (OSError, ValueError) as err:
            fail(f"cannot read model {model}: {err}")
        meta = est.meta if isinstance(est, le.LearnedEstimator) else {}  # a linear model has none
        same = (meta.get("profile") or {}).get("id") == _profile_id(prof)
        split = meta.get("split")
        if same and split:
            # rebuild the exact split the model was fitted with, then keep its held-out part
            # (only the batches passing this --max-contention, if given)
            fitted_on = _pairs(prof, (meta.get("profile") or {}).get("max_contention"))
            train, test = le.split_by_shape(fitted_on, split["heldout"], split["seed"])
            if max_contention is not None:
                keep = {(s.new_tokens, s.context_lens, ms) for s, ms in pairs}
                test = [(s, ms) for s, ms in test if (s.new_tokens, s.context_lens, ms) in keep]
            method = (f"held-out split of the fitting profile ({split['heldout']:.0%} of shapes, "
                      f"seed {split['seed']})")
        elif same:
            train, test = pairs, pairs
            method = "IN-SAMPLE (the model was fitted on all of this profile; pass a separate profile)"
        else:
            train, test = [], pairs
            method = "separate profile (every batch held out)"
        errs = le.abs_pct_errors(est, test)
        lin = le.abs_pct_errors(le.fit_linear(train), test) if train else np.zeros(0)
        result["model"] = str(model)
    else:
        rng = np.random.default_rng(seed)
        keys = sorted({(s.new_tokens, s.context_lens) for s, _ in pairs})
        fold_of = {k: int(f) for k, f in zip(keys, rng.permutation(len(keys)) % folds, strict=True)}
        test, err_l, lin_l = [], [], []
        for f in range(folds):
            tr = [p for p in pairs if fold_of[(p[0].new_tokens, p[0].context_lens)] != f]
            te = [p for p in pairs if fold_of[(p[0].new_tokens, p[0].context_lens)] == f]
            if not te or len(tr) < 8:
                continue
            est = le.fit(tr, le.FitConfig(seed=seed))
            err_l.append(le.abs_pct_errors(est, te))
            lin_l.append(le.abs_pct_errors(le.fit_linear(tr), te))
            test += te
        errs = np.concatenate(err_l) if err_l else np.zeros(0)
        lin = np.concatenate(lin_l) if lin_l else np.zeros(0)
        method = f"{folds}-fold cross-validation grouped by batch shape (seed {seed})"
    result["method"] = method
    result["learned"] = le.error_summary(errs)
    result["linear"] = le.error_summary(lin)
    result["noise_floor"] = le.noise_floor(pairs)
    kinds = {s.shape: s.kind for s in prof.samples}
    result["by_kind"] = {k: le.error_summary(np.array(v))
                         for k, v in _by_group(test, errs, lambda s: kinds.get(s, "?")).items()}
    result["by_rounds"] = {k: le.error_summary(np.array(v)) for k, v in sorted(
        _by_group(test, errs, lambda s: f"{s.rounds:02d}").items())}
    text = json.dumps(result, indent=2, default=float)
    if json_out is not None:
        json_out.write_text(text + "\n")
    if as_json:
        print(text)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"verify-time estimator: {method}")
    for col in ("model", "batches", "MAPE", "p50", "p90", "max"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def row(name: str, s: dict[str, Any]) -> None:
        t.add_row(name, str(s["n"]), f"{s['mape']:.1%}", f"{s['p50']:.1%}", f"{s['p90']:.1%}",
                  f"{s['max']:.1%}")

    row("learned", result["learned"])
    if result["linear"]["n"]:
        row("linear (baseline)", result["linear"])
    for k, s in result["by_kind"].items():
        row(f"  learned, {k} batches", s)
    for k, s in result["by_rounds"].items():
        row(f"  learned, {int(k)} rounds", s)
    Console().print(t)
    print(f"noise floor (each batch vs its shape's median repeat): {result['noise_floor']:.1%}; "
          f"load average when profiled: {result['load_avg']}")
