"""wisp-cli trace / controller: record speculation traces, train and evaluate the controller.

* ``wisp-cli trace record``: prompts through the live system (its own in-process system on an
  embedded Redis, sled mode, fixed k, tracing on; or ``--redis-url`` for a running system whose
  drafters trace), rows from ``wisp:trace`` -> JSONL (+ ``.meta.json``).
* ``wisp-cli controller train``: fit the rejection predictor on a trace, pick its threshold for a
  low false-stop rate, tune the stop rule by replaying the training prompts, write the JSON.
* ``wisp-cli controller eval``: fixed k vs the controller through the same greedy speculative
  loop on held-out prompts, with the real engines; table + JSON.
* ``wisp-cli controller show``: print a controller file's settings and stored evaluation.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from wisp.policy import controller as cost_defaults
from wisp.services.cli.common import (
    PromptSet,
    fail,
    fmt,
    make_settings,
    output_path,
    preflight_models,
    preflight_prompts,
    quiet_logging,
    require_file,
    run_async,
    say,
)
from wisp.services.runner import ALL_ROLES, connected, with_services
from wisp.settings import Settings

if TYPE_CHECKING:
    from wisp.policy.controller import LearnedController

trace_app = typer.Typer(help="Record (draft features, verdict) traces from the live system.",
                        no_args_is_help=True)
controller_app = typer.Typer(help="Train and evaluate the learned speculation controller.",
                             no_args_is_help=True)

# ====================================================================== trace record
@trace_app.command("record")
def trace_record(
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="How many prompts.")] = 60,
    offset: Annotated[int, typer.Option("--offset", min=0,
                                        help="First prompt index (keep eval prompts out).")] = 100,
    k: Annotated[int, typer.Option("--k", min=1, max=64,
                                   help="Fixed draft length while recording (large: covers late "
                                   "positions).")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    out: Annotated[Path, typer.Option("--out", help="Trace JSONL (a .meta.json is written "
                                      "beside it).")] = Path("out/traces.jsonl"),
    source: PromptSet = "mixed",
    draft_model: Annotated[str | None, typer.Option("--draft-model")] = None,
    target_model: Annotated[str | None, typer.Option("--target-model")] = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="Record from a running system (its drafters need WISP_TRACE=1) "
        "instead of starting one.")] = None,
) -> None:
    """Run prompts through the live system with a fixed draft length and tracing on, and write
    one row per judged drafted token (features, position, recent acceptance, label)."""
    from dataclasses import asdict

    quiet_logging()
    settings = make_settings(mode="sled", draft_k=k, trace=True, draft_model=draft_model,
                             target_model=target_model, max_wait_ms=1.0)
    items = preflight_prompts(source, prompts, offset)
    if redis_url is None:
        preflight_models(settings, ALL_ROLES)
    output_path(out)

    from wisp.trace import meta_path

    started = time.time()
    meta: dict[str, Any] = {
        "kind": "wisp.trace", "version": 1,
        "draft_model": settings.draft_model, "target_model": settings.target_model,
        "k": k, "max_new_tokens": max_new_tokens, "temperature": 0.0,
        "prompts": {"source": source, "offset": offset, "n": prompts},
        "system": "running system at --redis-url" if redis_url else "in-process (embedded Redis, sled mode)",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "complete": False, "rows": 0, "requests": [],
    }
    out.write_text("")

    def save(rows: list[dict[str, Any]], req: Any) -> None:
        """Append each finished request at once: an interrupted run leaves a usable trace."""
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        meta["rows"] += len(rows)
        meta["requests"].append(asdict(req))
        meta["prompts"]["n_done"] = len(meta["requests"])
        meta["wall_s"] = round(time.time() - started, 1)
        meta_path(out).write_text(json.dumps(meta, indent=1))

    _rows, reqs = run_async(_record(settings, items, k, max_new_tokens, offset, redis_url, save))
    meta["complete"] = True
    meta_path(out).write_text(json.dumps(meta, indent=1))
    drafted = sum(r.drafted for r in reqs)
    accepted = sum(r.accepted for r in reqs)
    rounds = sum(r.rounds for r in reqs)
    print(f"{meta['rows']} trace rows from {len(reqs)} requests ({rounds} rounds, acceptance "
          f"{accepted / max(drafted, 1):.2f}) -> {out} (+ {meta_path(out).name})")


async def _record(settings: Any, items: list[Any], k: int, max_new: int, offset: int,
                  redis_url: str | None, save: Callable[[list[dict[str, Any]], Any], None],
                  ) -> tuple[list[dict[str, Any]], list[Any]]:
    """Record on the running system at ``redis_url``, else on an in-process one of its own."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from wisp.trace import record

    stats = {"rows": 0, "drafted": 0, "accepted": 0}
    progress = Progress(TextColumn("[bold]trace[/bold] {task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), transient=False)

    async def run(bus: Any) -> tuple[list[dict[str, Any]], list[Any]]:
        with progress:
            task = progress.add_task("starting", total=len(items))

            def tick(_j: int, req: Any, got: list[Any], rows: list[dict[str, Any]]) -> None:
                save(rows, req)
                stats["rows"] += len(got)
                stats["drafted"] += req.drafted
                stats["accepted"] += req.accepted
                rate = stats["accepted"] / max(stats["drafted"], 1)
                progress.update(task, advance=1,
                                description=f"{stats['rows']} rows, acceptance {rate:.2f}")
                if not sys.stderr.isatty():
                    say(f"trace: {_j + 1}/{len(items)} prompts, {stats['rows']} rows, acceptance {rate:.2f}")

            try:
                return await record(bus, items, k=k, max_new_tokens=max_new, first_index=offset,
                                    on_request=tick)
            except RuntimeError as err:
                fail(str(err))

    if redis_url:
        async with connected(settings, redis_url) as bus:
            if not await bus.live("drafter"):
                fail("no drafter is running on that Redis: start `wisp-cli up` or `wisp-cli serve drafter`")
            return await run(bus)
    say(f"starting an in-process system (sled, k={k}, tracing on; loading "
        f"{settings.draft_model} + {settings.target_model}) ...")
    async with with_services(settings) as system:
        return await run(system.bus)


# ====================================================================== the greedy loop
def greedy_loop(
    draft: Any,
    verifier: Any,
    session_id: str,
    prompt_ids: list[int],
    policy: Any,
    max_new: int,
    eos: set[int] | frozenset[int] = frozenset(),
    draft_ms: float | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """One request through the greedy speculative loop with the real engines, exactly as the
    drafter service runs it (same plan/stop calls, budget, EOS/length cut, stats updates), but
    in-process: a ``DraftEngine`` drafts, a ``VerifierEngine`` verifies each round alone.

    ``draft_ms``: the draft speed (ms per forward) the session records instead of the one this
    engine measured; a cost-aware stop rule then decides as it would on a device of that speed
    (the in-process torch drafter stands in for the device's llama.cpp drafter, several times
    faster), and its rounds do not depend on how busy this machine was.

    Returns the generated ids and one record per round (drafted, accepted, committed, draft
    forward passes, stopped, the features of every drafted token, recent acceptance before it)."""
    from wisp.policy.session import SpecSession
    from wisp.services.verifier.engine import VerifyItem

    sess = SpecSession(len(prompt_ids), max_new, eos=frozenset(eos))
    rounds: list[dict[str, Any]] = []
    try:
        while not sess.done:
            committed = prompt_ids + sess.generated
            plan = sess.plan(policy)
            recent = sess.stats.recent_acceptance
            tokens: list[int] = []
            feats: list[tuple[float, ...]] = []
            passes, stopped, stop_feats, ms = 0, False, None, 0.0
            if plan.max_k > 0:
                out = draft.draft(session_id, committed, plan.max_k, 0.0, 1, None, plan.stop)
                tokens = list(out.tokens)
                feats = [f.as_tuple() for f in out.features[: len(tokens)]]
                passes, stopped, ms = out.forward_passes, out.stopped, out.draft_ms
                stop_feats = out.stop_features.as_tuple() if out.stop_features is not None else None
            sess.drafted(ms if draft_ms is None else draft_ms * passes, passes)
            res = verifier.verify([VerifyItem(session_id, committed, tokens, None, 0.0, None)])[0]
            start = len(sess.generated)
            applied = sess.apply([int(t) for t in res.tokens], len(tokens), res.accepted, 0.0)
            rounds.append({
                "start": start, "drafted": len(tokens), "accepted": res.accepted,
                "committed": len(applied.tokens), "passes": passes, "stopped": stopped,
                "recent_acceptance": recent, "features": feats, "stop_features": stop_feats,
            })
        return list(sess.generated), rounds
    finally:
        draft.drop(session_id)
        verifier.drop(session_id)


def totals_of(rounds_by_prompt: list[list[dict[str, Any]]], seqs: list[Any] | None = None) -> Any:
    """``LoopTotals`` of real rounds; with oracle sequences, stops are judged (false or not)."""
    from wisp.controller_train import LoopTotals

    tot = LoopTotals()
    for j, rounds in enumerate(rounds_by_prompt):
        seq = seqs[j] if seqs is not None else None
        for r in rounds:
            tot.add_round(r["drafted"], r["accepted"], r["committed"], r["passes"])
            if r["stopped"]:
                tot.stops += 1
                pos = r["start"] + r["drafted"]
                if seq is not None and r["accepted"] == r["drafted"] and pos < seq.length:
                    tot.judged_stops += 1
                    tot.false_stops += int(not seq.reject[pos])
    return tot


def judged_rows(rounds_by_prompt: list[list[dict[str, Any]]]) -> tuple[Any, Any]:
    """(raw inputs, labels) of every drafted token up to the first rejection (trace rows)."""
    import numpy as np

    raw, y = [], []
    for rounds in rounds_by_prompt:
        for r in rounds:
            for i in range(min(r["accepted"], r["drafted"] - 1) + 1 if r["drafted"] else 0):
                raw.append((*r["features"][i], float(i), r["recent_acceptance"]))
                y.append(int(i == r["accepted"]))
    return np.array(raw, dtype=float).reshape(-1, 6), np.array(y, dtype=int)


def target_greedy_check(target: Any, prompt_ids: list[int], out: list[int]) -> dict[str, Any]:
    """Is ``out`` the target's greedy continuation? One teacher-forced target forward: at every
    output position the target's argmax must be the output token. Mismatches are listed with
    the target's top-1 - top-2 logit gap there (a near-zero gap is a float near-tie)."""
    import torch

    if not out:
        return {"ok": True, "mismatches": []}
    ids = torch.tensor([prompt_ids + out[:-1]], dtype=torch.long)
    with torch.inference_mode():
        logits = target(input_ids=ids).logits[0, len(prompt_ids) - 1 :].float()
    top = torch.topk(logits, 2, dim=-1)
    arg = top.indices[:, 0].tolist()
    bad = [{"pos": t, "target": int(arg[t]), "got": int(out[t]),
            "gap": float(top.values[t, 0] - top.values[t, 1])}
           for t in range(len(out)) if int(arg[t]) != int(out[t])]
    return {"ok": not bad, "mismatches": bad}


# ====================================================================== controller train
def _oracle_cache_path(traces: Path) -> Path:
    from wisp.trace import meta_path

    return meta_path(traces).with_name(meta_path(traces).name.replace(".meta.json", ".oracle.json"))


def _oracle_for(requests: list[dict[str, Any]], draft_model: str, settings: Any, max_new: int,
                cache: Path | None) -> list[Any]:
    from dataclasses import asdict

    from wisp.controller_train import OracleSequence, oracle_sequences

    key = {"draft_model": draft_model, "requests": [r["request_id"] for r in requests]}
    if cache is not None and cache.exists():
        obj = json.loads(cache.read_text())
        if obj.get("key") == key:
            return [OracleSequence(**{**s, "raw4": [tuple(x) for x in s["raw4"]]}) for s in obj["seqs"]]
    from wisp.models import load_model

    say(f"teacher-forcing {draft_model} over {len(requests)} recorded outputs ...")
    model = load_model(draft_model, settings)
    seqs = oracle_sequences(model, requests, max_new)
    del model
    if cache is not None:
        cache.write_text(json.dumps({"key": key, "seqs": [asdict(s) for s in seqs]}))
    return seqs


@controller_app.command("train")
def controller_train(
    traces: Annotated[Path, typer.Argument(help="Trace JSONL from `wisp-cli trace record`.")],
    out: Annotated[Path, typer.Option("--out", help="Controller JSON to write.")] = Path(
        "out/controller.json"),
    kind: Annotated[str, typer.Option("--kind", help="logistic | mlp")] = "logistic",
    features: Annotated[str | None, typer.Option(
        "--features", help="Comma list of feature names (default: the raw six + log transforms).")] = None,
    max_false_stop: Annotated[float, typer.Option(
        "--max-false-stop", min=0.0, max=1.0,
        help="False-stop rate for the reported threshold (and the threshold without --tune).")] = 0.10,
    tune: Annotated[bool, typer.Option(
        "--tune/--no-tune", help="Tune max_k / thresholds / goodput rule by replaying the training "
        "prompts (needs the trace's .meta.json and the draft model).")] = True,
    c: Annotated[float, typer.Option("--c", min=1e-6, help="Inverse regularisation strength.")] = 1.0,
    draft_model: Annotated[str | None, typer.Option(
        "--draft-model", help="For replay (default: the trace's).")] = None,
    draft_ms: Annotated[float, typer.Option(
        "--draft-ms", min=0.0, help="Draft time per token (ms) for the goodput rule and the "
        "goodput objective, until a session has measured its own.")] = cost_defaults.DRAFT_MS,
    verify_base_ms: Annotated[float, typer.Option(
        "--verify-base-ms", min=0.0, help="Verify cost of a round: this plus --verify-token-ms per "
        "fed token (ms).")] = cost_defaults.VERIFY_COST[0],
    verify_token_ms: Annotated[float, typer.Option(
        "--verify-token-ms", min=0.0)] = cost_defaults.VERIFY_COST[1],
    round_trip_ms: Annotated[float, typer.Option(
        "--round-trip-ms", min=0.0, help="Time per round outside drafting and verifying (ms: "
        "network, queues), until a session has measured its own.")] = cost_defaults.ROUND_TRIP_MS,
    objective: Annotated[str, typer.Option(
        "--objective", help="balanced (widest margin over both targets) | max_round (most tokens "
        "per round within the targets) | goodput (most tokens per modeled second within the "
        "targets)")] = "balanced",
) -> None:
    """Fit the rejection predictor on a trace, evaluate it on held-out prompts of the trace,
    tune the stop rule, and write the controller JSON (weights + threshold + metadata)."""
    from wisp import controller_train as ct
    from wisp.controller_train import TrainConfig, train_controller
    from wisp.policy.controller import FEATURE_FUNCS, AffineVerifyCost
    from wisp.trace import read_traces

    if kind not in ("logistic", "mlp"):
        raise typer.BadParameter("use logistic or mlp", param_hint="--kind")
    feats = tuple(f.strip() for f in features.split(",")) if features else ct.DEFAULT_FEATURES
    bad = [f for f in feats if f not in FEATURE_FUNCS]
    if bad:
        raise typer.BadParameter(f"unknown feature(s) {bad}; known: {', '.join(FEATURE_FUNCS)}",
                                 param_hint="--features")
    require_file(traces, "the trace file", "wisp-cli trace record")
    output_path(out)
    try:
        ts = read_traces(traces)
    except (OSError, ValueError) as err:
        fail(str(err))
    if not ts.rows:
        fail(f"{traces} holds no trace rows; record some with `wisp-cli trace record`")
    meta = ts.meta
    if objective not in ct.OBJECTIVES:
        raise typer.BadParameter(f"use one of {', '.join(ct.OBJECTIVES)}", param_hint="--objective")
    cfg = TrainConfig(features=feats, kind=kind, c=c, max_false_stop=max_false_stop, objective=objective,
                      draft_ms_per_token=draft_ms, round_trip_ms=round_trip_ms,
                      verify_cost=AffineVerifyCost(verify_base_ms, verify_token_ms, 0.0))
    seqs = None
    if tune:
        if not ts.requests:
            fail(f"--tune needs {traces.stem}.meta.json with the recorded requests "
                     "(or pass --no-tune)")
        settings = make_settings()
        dm = draft_model or meta.get("draft_model") or settings.draft_model
        try:
            seqs = _oracle_for(ts.requests, dm, settings, int(meta.get("max_new_tokens", 64)),
                               _oracle_cache_path(traces))
        except (OSError, ValueError) as err:
            fail(f"cannot load the draft model for replay: {err}")
    import sklearn

    md = {
        "draft_model": meta.get("draft_model", draft_model), "target_model": meta.get("target_model"),
        "trained_on": {"trace": traces.name, "prompts": meta.get("prompts"),
                       "recorded_k": meta.get("k"), "max_new_tokens": meta.get("max_new_tokens"),
                       "temperature": meta.get("temperature", 0.0), "system": meta.get("system")},
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sklearn": sklearn.__version__,
        "command": "wisp-cli controller train " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "",
    }
    try:
        ctl, report = train_controller(ts.rows, cfg, seqs=seqs, metadata=md)
    except ValueError as err:
        fail(str(err))
    ctl.save(out)
    _print_train_report(report)
    print(f"controller written to {out}")


def _print_train_report(rep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 140))
    h = rep["heldout_split"]
    t = Table(title=f"predictor ({rep['kind']}, {rep['rows']} rows from {rep['prompts']} prompts, "
                    f"reject rate {rep['reject_rate']:.2f}); held-out prompts: {len(h['heldout_prompts'])}")
    for col in ("threshold", "AUC", "precision(reject)", "recall(reject)", "false-stop rate", "rows"):
        t.add_column(col, justify="right")
    for label, m in (("false-stop target", h["at_false_stop_target"]),
                     ("shipped", h["at_shipped_threshold"])):
        t.add_row(f"{label} {m['threshold']:.3f}",
                  *(fmt(m[k], "{:.3f}") for k in ("auc", "precision", "recall", "false_stop_rate")),
                  str(m["n"]))
    con.print(t)
    s = rep["stop"]
    print(f"stop rule: threshold={s['threshold']:.3f} max_k={s['max_k']} min_k={s['min_k']} "
          f"cum_threshold={s['cum_threshold']} goodput={s['goodput']}")
    tun = rep.get("tuning") or {}
    if tun:
        b, best = tun["baseline"], tun["best"]
        print(f"replay on training prompts: k=4 {b['committed_per_round']:.2f} tok/round, "
              f"{b['waste_per_committed']:.3f} waste/committed; controller "
              f"{best['committed_per_round']:.2f} tok/round, {best['waste_per_committed']:.3f} "
              f"waste/committed (waste cut {best['waste_cut']:.0%}, tokens/round "
              f"{best['round_change']:+.1%})")


# ====================================================================== controller eval
def _controller(path: Path | None, settings: Settings) -> tuple[Path, LearnedController]:
    """The controller file given, else the one shipped for the draft model, loaded; a missing or
    bad one is one line."""
    from wisp.policy.controller import load_controller, shipped_controller_path

    path = path or shipped_controller_path(settings.draft_model, settings.target_model)
    if path is None:
        fail(f"no controller shipped for {settings.draft_model!r}: pass one (make one with "
             "`wisp-cli controller train`)")
    try:
        return path, load_controller(path)
    except (OSError, ValueError) as err:
        fail(f"{path}: {err}")


def _training_range(ctl: Any) -> tuple[str, int, int] | None:
    p = ((ctl.metadata.get("trained_on") or {}).get("prompts")) or {}
    try:
        return str(p.get("source", "mixed")), int(p["offset"]), int(p["offset"]) + int(p["n"]) - 1
    except (KeyError, TypeError, ValueError):
        return None


@controller_app.command("eval")
def controller_eval(
    controller: Annotated[Path | None, typer.Option(
        "--controller", help="Controller JSON (default: the one shipped for the draft model).")] = None,
    prompts: Annotated[int, typer.Option("--prompts", min=1)] = 24,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
    source: PromptSet = "mixed",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    baseline_k: Annotated[int, typer.Option("--baseline-k", min=1, max=64)] = 4,
    draft_model: Annotated[str | None, typer.Option("--draft-model")] = None,
    target_model: Annotated[str | None, typer.Option("--target-model")] = None,
    out: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path("out/controller-eval.json"),
    allow_overlap: Annotated[bool, typer.Option(
        "--allow-overlap", help="Allow prompts the controller was trained on.")] = False,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch threads (0 = default).")] = 0,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Reuse prompts finished by an interrupted run (OUT.partial.jsonl).")] = False,
    draft_ms: Annotated[float | None, typer.Option(
        "--draft-ms", min=0.001, help="Draft speed (ms per forward) the controller's goodput rule "
        "is given (default: the controller's own figure, the device drafter's; --measured-draft-ms "
        "gives it this machine's torch drafter's measured speed instead).")] = None,
    measured_draft_ms: Annotated[bool, typer.Option(
        "--measured-draft-ms", help="Feed the rule the in-process torch drafter's measured speed.")] = False,
) -> None:
    """Fixed k vs the learned controller on held-out prompts, through the same greedy
    speculative loop (real DraftEngine + VerifierEngine): both outputs must equal each other and
    the target's greedy output. Prints predictor quality, committed tokens per verification
    round, wasted drafted tokens per committed token and draft passes per committed token."""
    from dataclasses import asdict

    from wisp.controller_train import classify_metrics, round_cost, simulate
    from wisp.policy.controller import FixedLength, drafting_rule

    quiet_logging()
    settings = make_settings(draft_model=draft_model, target_model=target_model)
    path, ctl = _controller(controller, settings)
    rng = _training_range(ctl)
    if rng is not None and not allow_overlap:
        src, lo, hi = rng
        if src == source and not (offset + prompts - 1 < lo or offset > hi):
            fail(f"prompts {offset}..{offset + prompts - 1} overlap the controller's training "
                 f"prompts {lo}..{hi} ({src}); evaluate on held-out prompts or pass --allow-overlap")
    # every prerequisite before the models load (minutes): the models, the prompts, the output
    # folder (the checkpoint is appended to after the first prompt)
    preflight_models(settings, ["drafter", "verifier"])
    items = preflight_prompts(source, prompts, offset)
    output_path(out)

    import torch
    from wisp import models, tokens

    if threads:
        torch.set_num_threads(threads)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from wisp.controller_train import OracleSequence, oracle_sequences
    from wisp.services.drafter.engine import DraftEngine
    from wisp.services.verifier.engine import VerifierEngine

    say(f"loading {settings.draft_model} + {settings.target_model} ...")
    tok = models.load_tokenizer(settings.target_model, settings)
    eos = set(tokens.eos_token_ids(settings.target_model, settings))
    dmodel = models.load_model(settings.draft_model, settings)
    tmodel = models.load_model(settings.target_model, settings)
    draft = DraftEngine(dmodel, max_sessions=4)
    verifier = VerifierEngine(tmodel, max_sessions=4)
    if measured_draft_ms and draft_ms is not None:
        raise typer.BadParameter("give --draft-ms or --measured-draft-ms, not both",
                                 param_hint="--draft-ms")
    fed_ms = None if measured_draft_ms else (ctl.draft_ms_per_token if draft_ms is None else draft_ms)
    if fed_ms is not None:  # the first drafted round too (no measurement has replaced it yet)
        ctl = ctl.replace(draft_ms_per_token=fed_ms)
    # the drafting rule alone: the prefill round (TTFT) would add a draft-less round per prompt
    policies = [(f"fixed k={baseline_k}", FixedLength(baseline_k)), ("controller", drafting_rule(ctl))]
    names = [n for n, _ in policies]
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in names}
    per_prompt: list[dict[str, Any]] = []
    seqs: list[Any] = []
    # every finished prompt is appended to a checkpoint, so a killed run can --resume
    ckpt = out.with_name(out.stem + ".partial.jsonl")
    ckpt_key = {"controller": hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16], "draft_ms": fed_ms,
                "max_new_tokens": max_new_tokens, "baseline_k": baseline_k, "source": source,
                "draft_model": settings.draft_model, "target_model": settings.target_model}
    done: dict[int, dict[str, Any]] = {}
    if resume and ckpt.exists():
        for line in ckpt.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("key") == ckpt_key:
                done[int(rec["prompt"]["prompt_index"])] = rec
        say(f"resuming: {len(done)} prompts already evaluated in {ckpt}")
    elif ckpt.exists():
        ckpt.unlink()
    started = time.time()
    progress = Progress(TextColumn("[bold]eval[/bold] {task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn())
    with progress:
        task = progress.add_task("", total=len(items))
        for j, item in enumerate(items):
            rec = done.get(offset + j)
            if rec is None:
                ids = tokens.encode_prompt(tok, item.text)
                outs, rounds_of = {}, {}
                for name, pol in policies:
                    gen, rounds = greedy_loop(draft, verifier, f"p{j}-{name}", ids, pol,
                                              max_new_tokens, eos, draft_ms=fed_ms)
                    outs[name], rounds_of[name] = gen, rounds
                same = all(outs[n] == outs[names[0]] for n in names)
                check = target_greedy_check(tmodel, ids, outs[names[0]])
                seq = oracle_sequences(dmodel, [{"prompt_token_ids": ids, "token_ids": outs[names[0]],
                                                 "prompt_index": offset + j}], max_new_tokens)[0]
                rec = {
                    "key": ckpt_key, "runs": rounds_of, "seq": asdict(seq),
                    "prompt": {
                        "prompt_index": offset + j, "source": item.source, "prompt_len": len(ids),
                        "generated": len(outs[names[0]]), "outputs_equal": same,
                        "target_greedy": check,
                        **{f"{n}:rounds": len(rounds_of[n]) for n in names},
                    },
                }
                with ckpt.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            for n in names:
                runs[n].append(rec["runs"][n])
            seqs.append(OracleSequence(**{**rec["seq"], "raw4": [tuple(x) for x in rec["seq"]["raw4"]]}))
            per_prompt.append(rec["prompt"])
            progress.update(task, advance=1, description=f"prompt {offset + j} ({item.source})")
            if not sys.stderr.isatty():
                print(f"eval: {j + 1}/{len(items)} prompts ({time.time() - started:.0f} s)",
                      file=sys.stderr, flush=True)
    wall = time.time() - started

    # ---------------------------------------------------------------- metrics
    results: dict[str, Any] = {}
    rcost = round_cost(ctl.verify_ms, ctl.draft_ms_per_token, ctl.round_trip_ms)
    for name, _ in policies:
        tot = totals_of(runs[name], seqs)
        tot.modeled_ms = sum(rcost(r["drafted"], r["passes"], pp["prompt_len"] + r["start"])
                             for rounds, pp in zip(runs[name], per_prompt, strict=True) for r in rounds)
        results[name] = tot.summary()
    base = results[policies[0][0]]
    mine = results["controller"]
    waste_cut = 1 - mine["waste_per_committed"] / base["waste_per_committed"]
    round_change = mine["committed_per_round"] / base["committed_per_round"] - 1
    raw_b, y_b = judged_rows(runs[policies[0][0]])
    raw_c, y_c = judged_rows(runs["controller"])
    from wisp.controller_train import predict_raw

    pred = {
        f"{policies[0][0]} rounds": classify_metrics(y_b, predict_raw(ctl.model, raw_b), ctl.threshold),
        "controller rounds": classify_metrics(y_c, predict_raw(ctl.model, raw_c), ctl.threshold),
    }
    replay = {f"fixed k={k}": simulate(FixedLength(k), seqs, rcost).summary() for k in range(1, 9)}
    replay["controller"] = simulate(ctl, seqs, rcost).summary()
    lossless = all(p["outputs_equal"] and p["target_greedy"]["ok"] for p in per_prompt)
    report = {
        "controller": str(path), "controller_metadata": ctl.metadata.get("trained_on"),
        "stop": {"threshold": ctl.threshold, "max_k": ctl.max_k, "min_k": ctl.min_k,
                 "cum_threshold": ctl.cum_threshold, "goodput": ctl.goodput},
        "cost": {"draft_ms_fed": fed_ms, "draft_ms_per_token": ctl.draft_ms_per_token,
                 "round_trip_ms": ctl.round_trip_ms,
                 "note": "committed_per_s: committed tokens per second of modeled round time "
                         "(round trip + verify cost + draft forwards at draft_ms_per_token), the "
                         "controller's own cost model; not measured time"},
        "prompts": {"source": source, "offset": offset, "n": prompts},
        "max_new_tokens": max_new_tokens, "draft_model": settings.draft_model,
        "target_model": settings.target_model,
        "results": results, "predictor": pred,
        "waste_cut_vs_baseline": waste_cut, "committed_per_round_change": round_change,
        "targets": {"waste_cut>=0.40": waste_cut >= 0.40, "round_change>=-0.10": round_change >= -0.10},
        "lossless": lossless, "replay_on_heldout": replay, "per_prompt": per_prompt,
        "wall_s": round(wall, 1),
    }
    out.write_text(json.dumps(report, indent=1))
    _print_eval(report, policies[0][0])
    say(f"results written to {out}")
    if not lossless:
        bad = [p["prompt_index"] for p in per_prompt
               if not (p["outputs_equal"] and p["target_greedy"]["ok"])]
        fail(f"NOT lossless on prompts {bad}: outputs differ between policies or from the "
                 f"target's greedy output (details in {out})")


def _print_eval(rep: dict[str, Any], base_name: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(Console().width, 140))
    p = rep["prompts"]
    t = Table(title=f"held-out {p['source']} prompts {p['offset']}..{p['offset'] + p['n'] - 1}, "
                    f"{rep['max_new_tokens']} new tokens, greedy (lossless: {rep['lossless']})")
    for col in ("policy", "rounds", "committed/round", "waste/committed", "draft passes/committed",
                "drafted/round", "acceptance", "stops (false/judged)", "modeled tok/s"):
        t.add_column(col, justify="right")
    for name, r in rep["results"].items():
        t.add_row(name, str(r["rounds"]), f"{r['committed_per_round']:.2f}",
                  f"{r['waste_per_committed']:.3f}", f"{r['draft_passes_per_committed']:.3f}",
                  f"{r['drafted_per_round']:.2f}", f"{r['acceptance']:.2f}",
                  f"{r['stops']} ({r['false_stops']}/{r['judged_stops']})",
                  fmt(r.get("committed_per_s"), "{:.2f}"))
    con.print(t)
    q = Table(title=f"predictor on the held-out rounds (threshold {rep['stop']['threshold']:.3f})")
    for col in ("rounds of", "tokens", "reject rate", "AUC", "precision(reject)", "recall(reject)",
                "false-stop rate"):
        q.add_column(col, justify="right")
    for name, m in rep["predictor"].items():
        q.add_row(name, str(m["n"]), *(fmt(m[k], "{:.3f}") for k in
                                       ("reject_rate", "auc", "precision", "recall", "false_stop_rate")))
    con.print(q)
    wc, rc = rep["waste_cut_vs_baseline"], rep["committed_per_round_change"]
    print(f"waste cut vs {base_name}: {wc:.1%} (target >= 40%: {'met' if wc >= 0.40 else 'NOT met'}); "
          f"committed/round change: {rc:+.1%} (target >= -10%: {'met' if rc >= -0.10 else 'NOT met'})")
    fr = rep["replay_on_heldout"]
    print("fixed-k frontier on the same outputs (replay): " + ", ".join(
        f"{k.split('=')[1]}: {v['committed_per_round']:.2f}/{v['waste_per_committed']:.2f}"
        for k, v in fr.items() if k.startswith("fixed")))


@controller_app.command("show")
def controller_show(
    path: Annotated[Path | None, typer.Argument(help="Controller JSON (default: the shipped one).")] = None,
    draft_model: Annotated[str | None, typer.Option("--draft-model")] = None,
) -> None:
    """Validate a controller file and print its stop rule, features and stored evaluation."""
    path, ctl = _controller(path, make_settings(draft_model=draft_model))
    d = ctl.to_dict()
    print(json.dumps({"path": str(path), "model": {k: d["model"][k] for k in ("kind", "features")},
                      "threshold": d["threshold"], "stop": d["stop"], "cost": d["cost"],
                      "metadata": {k: v for k, v in ctl.metadata.items() if k != "training"}},
                     indent=1))
    rep = ctl.metadata.get("training")
    if rep:
        _print_train_report(rep)
