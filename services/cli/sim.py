"""wisp-cli sim: the trace-driven discrete-event simulator (run, sweep, validate).

The simulator (``wisp.sim``) drives the services' own policy objects (``wisp.policy``: the
speculation session, the controller, the batch policy, the deadlines) on a virtual clock, so a
simulated round is formed, prioritised and batched exactly as the real services do it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from wisp.services.cli.bench import bench_fresh
from wisp.services.cli.common import (
    fail,
    fmt,
    make_settings,
    output_dir,
    output_path,
    preflight_models,
    preflight_prompts,
    run_async,
    say,
)
from wisp.services.runner import ALL_ROLES

sim_app = typer.Typer(
    help="Simulate WISP / SLED / centralized serving at scale on a virtual clock, with the "
    "services' own policies (docs/simulator.md).",
    no_args_is_help=True,
)

ScenarioOpt = Annotated[str, typer.Option(
    "--scenario", help="A packaged scenario name (paper, local, tiny ...) or a .toml path.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a scenario value, e.g. --set server.verifiers=2 (repeatable).")]


def _load(scenario: str, overrides: list[str] | None, seed: int | None = None,
          duration: float | None = None) -> Any:
    from wisp.sim.scenario import ScenarioError, load_scenario

    ov = list(overrides or [])
    if seed is not None:
        ov.append(f"scenario.seed={seed}")
    if duration is not None:
        ov.append(f"scenario.duration_s={duration}")
    try:
        return load_scenario(scenario, ov)
    except ScenarioError as err:
        fail(str(err))


def _quiet_logs() -> None:
    import logging

    logging.getLogger("wisp").setLevel(logging.ERROR)


def _parse_modes(modes: str) -> list[str]:
    from wisp.sim.scenario import MODES

    out = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in out if m not in MODES]
    if bad or not out:
        raise typer.BadParameter(f"unknown mode(s) {bad}: use {', '.join(MODES)}", param_hint="--modes")
    return out


def _parse_counts(devices: str | None) -> list[int] | None:
    if not devices:
        return None
    try:
        out = sorted({int(x) for x in devices.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"{devices!r}: give device counts like 10,20,50",
                                 param_hint="--devices") from None
    if not out or out[0] < 1:
        raise typer.BadParameter("device counts must be >= 1", param_hint="--devices")
    return out


# ---------------------------------------------------------------------- run
@sim_app.command("run")
def run(
    mode: Annotated[str, typer.Option("--mode", help="wisp | sled | centralized")] = "wisp",
    devices: Annotated[int, typer.Option("--devices", min=1, max=1_000_000, help="Edge devices.")] = 100,
    scenario: ScenarioOpt = "paper",
    seed: Annotated[int | None, typer.Option(min=0, help="Override the scenario's seed.")] = None,
    duration: Annotated[float | None, typer.Option(min=1.0, help="Simulated seconds measured.")] = None,
    overrides: SetOpt = None,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON result here.")] = None,
    records: Annotated[bool, typer.Option(help="Include per-request records in the JSON.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the JSON.")] = False,
) -> None:
    """Simulate one mode at one device count; prints a table and the JSON result."""
    from wisp.sim.report import clean_json
    from wisp.sim.scenario import MODES, ScenarioError
    from wisp.sim.simulator import simulate

    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r}: use {', '.join(MODES)}", param_hint="--mode")
    _quiet_logs()
    sc = _load(scenario, overrides, seed, duration)
    if out is not None:
        output_path(out)
    try:
        res = simulate(sc, mode, devices)
    except ScenarioError as err:
        fail(str(err))
    data = clean_json(res.as_dict(records=records))
    data["scenario"] = {"name": sc.name, "path": sc.source_path, "digest": sc.digest()}
    text = json.dumps(data, indent=1)
    if out is not None:
        out.write_text(text)
    if not as_json:
        _print_run_table(data, sc)
    print(text)


def _print_run_table(d: dict[str, Any], sc: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"wisp-cli sim run: {d['mode']}, {d['devices']} devices, scenario {sc.name}, "
                    f"{sc.scenario.duration_s:.0f} s simulated")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("requests (failed)", f"{d['requests']} ({d['failed']})"),
        ("SLO attainment", fmt(d["slo_attainment"], "{:.3f}")),
        ("goodput tok/s", fmt(d["goodput_tokens_per_s"], "{:.1f}")),
        ("throughput tok/s", fmt(d["throughput_tokens_per_s"], "{:.1f}")),
        ("TTFT p50 / p90 ms", f"{fmt(d['ttft_p50_ms'], '{:.0f}')} / {fmt(d['ttft_p90_ms'], '{:.0f}')}"),
        ("TPOT mean / p90 ms", f"{fmt(d['tpot_mean_ms'], '{:.1f}')} / {fmt(d['tpot_p90_ms'], '{:.1f}')}"),
        ("acceptance rate", fmt(d["acceptance_rate"], "{:.3f}")),
        ("accepted / round", fmt(d["mean_accepted_per_round"], "{:.2f}")),
        ("wasted drafting ms / request", fmt(d["wasted_draft_ms_per_request"], "{:.0f}")),
        ("verifier utilisation", fmt(d["verifier_utilisation"], "{:.3f}")),
        ("round: drafting / network / queue / verify ms",
         " / ".join(fmt(d["breakdown"][k], "{:.1f}") for k in
                    ("drafting_ms", "network_ms", "queueing_ms", "verification_ms"))),
        ("refused (admission)", str(d["info"]["refused"])),
        ("draft policy", str(d["info"]["draft_policy"])),
        ("batch policy", str(d["info"]["batch_policy"])),
        ("events / wall s", f"{d['info']['events']} / {d['info']['wall_s']:.2f}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console(stderr=False).print(t)


# ---------------------------------------------------------------------- sweep
@sim_app.command("sweep")
def sweep(
    out: Annotated[Path, typer.Option(help="Folder for summary.json, the plots and report.md.")],
    modes: Annotated[str, typer.Option(help="Comma list of modes.")] = "wisp,sled,centralized",
    scenario: ScenarioOpt = "paper",
    devices: Annotated[str | None, typer.Option(
        help="Comma list of device counts (default: the scenario's sweep.devices).")] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    duration: Annotated[float | None, typer.Option(min=1.0, help="Simulated seconds per point.")] = None,
    refine: Annotated[int, typer.Option(min=0, max=8, help="Bisection steps around each capacity.")] = 2,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    seeds: Annotated[int, typer.Option(
        min=1, max=32, help="Seeds per point (the scenario's seed and the next ones): attainment and "
        "goodput are their mean with a 95% interval, capacity has one too (2 is the least that gives "
        "an interval; 1 is a smoke run).")] = 5,
    overrides: SetOpt = None,
) -> None:
    """Sweep device counts for each mode; write summary.json, PNG plots and report.md.
    Capacity is the mean attainment curve's crossing of 90%, with a 95% interval."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from wisp.sim.report import write_report
    from wisp.sim.scenario import ScenarioError
    from wisp.sim.simulator import load_assets
    from wisp.sim.sweep import run_sweep

    mode_list = _parse_modes(modes)
    counts = _parse_counts(devices)
    _quiet_logs()
    sc = _load(scenario, overrides, seed, duration)
    output_dir(out)
    command = "wisp-cli sim " + " ".join(sys.argv[sys.argv.index("sweep"):]) if "sweep" in sys.argv else ""
    try:
        assets = load_assets(sc)
    except ScenarioError as err:
        fail(str(err))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}")) as progress:
        task = progress.add_task(f"sim sweep {sc.name}", total=0, last="")

        def planned(n: int) -> None:
            progress.update(task, total=(progress.tasks[0].total or 0) + n)

        def done(mode: str, n: int, p: dict[str, Any]) -> None:
            line = (f"{mode} @ {n}: attainment {fmt(p['slo_attainment'], '{:.2f}')}, "
                    f"goodput {fmt(p['goodput_tokens_per_s'], '{:.0f}')} tok/s")
            progress.update(task, advance=1, last=line)
            if not progress.console.is_terminal:  # a log file gets one line per point (long sweeps)
                print(f"sim sweep: {line} ({p.get('seeds', 1)} seeds)", file=sys.stderr, flush=True)

        res = run_sweep(sc, mode_list, counts, assets=assets, jobs=jobs,
                        refine=refine, seeds=seeds, on_point=done, on_plan=planned, command=command)
    summary = res.summary()
    files = write_report(summary, out)
    _print_sweep_table(summary)
    for k, p in files.items():
        print(f"{k}: {p}", file=sys.stderr)


def _print_sweep_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"capacity and goodput ({summary['scenario']['name']})")
    from wisp.sim.report import capacity_text

    for c in ("mode", "capacity (devices) [95%]", "goodput at WISP's capacity", "mean waste ms/req",
              "mean util"):
        t.add_column(c, justify="right")
    gd = summary.get("goodput_ratio_devices")
    for mode, m in summary["modes"].items():
        g = m["goodput_tokens_per_s"].get(str(gd)) if gd else None
        t.add_row(mode, capacity_text(m["capacity"], "{:.1f}"), fmt(g, "{:.1f}"),
                  fmt(m["mean_wasted_draft_ms_per_request"], "{:.0f}"),
                  fmt(m["mean_verifier_utilisation"], "{:.2f}"))
    Console().print(t)
    r = Table(title="ratios (paper targets)")
    for c in ("ratio", "measured", "paper", "meets"):
        r.add_column(c, justify="right")
    for k, v in summary["paper_targets"].items():
        r.add_row(k, fmt(summary.get(k), "{:.2f}"), f"{v}",
                  "yes" if summary["meets_paper_targets"].get(k) else "no")
    Console().print(r)


# ---------------------------------------------------------------------- grid
def _grid_list(value: str, flag: str, conv: Any, what: str) -> list[Any]:
    """A comma list of ``flag`` converted by ``conv``; a bad item is a one-line error naming it."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise typer.BadParameter(f"give {what}", param_hint=flag)
    out: list[Any] = []
    for x in items:
        try:
            v = conv(x)
        except ValueError as err:
            raise typer.BadParameter(f"{x!r}: {err or ''} give {what}".replace(":  ", ": "),
                                     param_hint=flag) from None
        if v not in out:
            out.append(v)
    return out


def _kv_value(x: str) -> int:
    v = int(x)
    if v < 0:
        raise ValueError("a KV budget is >= 0 tokens (0 = unlimited);")
    return v


def _acceptance_value(x: str) -> float:
    v = float(x)
    if not 0.0 <= v < 1.0:
        raise ValueError("a target rate is in [0, 1) (0 = as recorded);")
    return v


def _choice(choices: tuple[str, ...]) -> Any:
    def conv(x: str) -> str:
        if x not in choices:
            raise ValueError(f"not one of {', '.join(choices)};")
        return x
    return conv


@sim_app.command("grid")
def grid(
    out: Annotated[Path, typer.Option(help="Folder for grid.json (written after every cell), grid.png "
                                      "(heatmap of WISP's capacity ratio) and report.md.")],
    quick: Annotated[bool, typer.Option(
        "--quick", help="A test-sized grid: KV 30000, the paper mix, acceptance as recorded, the ragged "
        "engine, 2 seeds, a 40 s window after 10 s warm-up, a coarse search (well under a minute). "
        "Other flags still override it.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep the cells an earlier run finished in --out (same scenario, seeds, "
        "duration, modes and search) and run only the others.")] = False,
    scenario: ScenarioOpt = "paper",
    overrides: SetOpt = None,
    kv: Annotated[str | None, typer.Option(
        "--kv", help="Comma list of KV budgets (server.kv_tokens, tokens per verifier; 0 = unlimited). "
        "Default 30000,50000,100000.")] = None,
    mixes: Annotated[str | None, typer.Option(
        "--mixes", help="Comma list of device mixes (devices.mix): slow = raspberry_pi_5 + phone, paper "
        "= the paper's four classes in equal shares, fast = jetson_agx_orin (300 draft tok/s). "
        "Default slow,paper,fast.")] = None,
    acceptance: Annotated[str | None, typer.Option(
        "--acceptance", help="Comma list of acceptance.target_rate values: 0 = the recorded verdicts, a "
        "rate in (0, 1) below the recorded one scales them down. Default 0,0.6.")] = None,
    engines: Annotated[str | None, typer.Option(
        "--engines", help="Comma list of verifier engines (server.engine): ragged, padded. Default "
        "both.")] = None,
    modes: Annotated[str | None, typer.Option(
        "--modes", help="Comma list of modes: wisp, sled, centralized, sled+prefill (sled with WISP's "
        "prefill round, an ablation), wisp+adaptive (WISP choosing per round between drafting and "
        "server-side decoding; about 3x the simulation time). Default the first four; the ratio is "
        "wisp over the better of centralized and sled (wisp+adaptive gets its own).")] = None,
    seeds: Annotated[int | None, typer.Option(
        min=1, max=32, help="Seeds per point (the scenario's seed and the next ones). Default 5.")] = None,
    duration: Annotated[float | None, typer.Option(
        min=1.0, help="Simulated window per run in seconds (scenario.duration_s). Default 300.")] = None,
    jobs: Annotated[int, typer.Option(
        min=1, max=64, help="Worker processes; each seed of a point is one task.")] = 2,
) -> None:
    """Sensitivity grid of capacity: for every (KV budget x device mix x acceptance x engine)
    cell and every mode, search the device count where mean SLO attainment over seeds crosses 90%
    (analytic guess, geometric bracketing, bisection; 95% interval), compare goodput at the better
    baseline's capacity, and give WISP's capacity ratio over max(centralized, sled) with its
    conservative range, the roofline bound of that ratio and the cell's regime (D device-, K KV-,
    C compute-, M memory-bound). Writes DIR/grid.json, DIR/grid.png, DIR/report.md
    (docs/sim-grid.md)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from wisp.sim.grid import (
        ENGINES,
        GRID_MODES,
        MIXES,
        GridError,
        GridParams,
        check_axes,
        run_grid,
        write_grid_report,
    )
    from wisp.sim.scenario import ScenarioError

    params = GridParams.quick_form() if quick else GridParams()
    if kv is not None:
        params.kv = _grid_list(kv, "--kv", _kv_value, "KV budgets in tokens like 30000,50000")
    if mixes is not None:
        params.mixes = _grid_list(mixes, "--mixes", _choice(tuple(MIXES)),
                                  f"mixes among {', '.join(MIXES)}")
    if acceptance is not None:
        params.acceptance = _grid_list(acceptance, "--acceptance", _acceptance_value,
                                       "rates like 0,0.6")
    if engines is not None:
        params.engines = _grid_list(engines, "--engines", _choice(ENGINES),
                                    f"engines among {', '.join(ENGINES)}")
    if modes is not None:
        params.modes = _grid_list(modes, "--modes", _choice(GRID_MODES),
                                  f"modes among {', '.join(GRID_MODES)}")
    if seeds is not None:
        params.seeds = seeds
    if duration is not None:
        params.duration_s = duration
    params.jobs = jobs
    params.overrides = list(overrides or [])
    _quiet_logs()
    sc = _load(scenario, overrides)
    try:
        check_axes(sc, params)
    except GridError as err:
        fail(str(err))
    for note in params.skipped:
        say(f"sim grid: skipped {note}")
    output_dir(out)
    command = "wisp-cli sim " + " ".join(sys.argv[sys.argv.index("grid"):]) if "grid" in sys.argv else ""
    cells = params.cells()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[last]}"),
                  console=Console(stderr=True)) as progress:  # stdout stays for the results
        task = progress.add_task(f"sim grid: {len(cells)} cell(s)", total=0, last="")
        log = not progress.console.is_terminal
        index = {c.key: i for i, c in enumerate(cells)}

        def planned(n: int) -> None:
            progress.update(task, total=(progress.tasks[0].total or 0) + n)

        def point(cell: Any, mode: str, n: int, p: dict[str, Any]) -> None:
            line = (f"cell {index[cell.key] + 1}/{len(cells)} {mode} @ {n}: attainment "
                    f"{fmt(p['slo_attainment'], '{:.3f}')}")
            progress.update(task, advance=1, last=line)
            if log:
                print(f"sim grid: {line} ({p.get('seeds', 1)} seeds)", file=sys.stderr, flush=True)

        def cell_done(cell: Any, res: dict[str, Any], skipped: bool) -> None:
            what = "skipped (finished in an earlier run)" if skipped else f"done in {res.get('wall_s')} s"
            progress.console.print(f"sim grid: cell {index[cell.key] + 1}/{len(cells)} {cell.key} {what}: "
                                   f"ratio {fmt(res.get('ratio_vs_best_baseline'))}, "
                                   f"regime {res.get('regime')}", soft_wrap=True)

        try:
            doc = run_grid(sc, params, out, command=command, resume=resume, on_point=point,
                           on_plan=planned, on_cell=cell_done)
        except (GridError, ScenarioError) as err:
            fail(str(err))
    files = write_grid_report(doc, out)
    _print_grid_table(doc)
    for k, p in files.items():
        print(f"{k}: {p}", file=sys.stderr)


def _print_grid_table(doc: dict[str, Any]) -> None:
    from wisp.services.cli.common import print_table
    from wisp.sim.report import capacity_text

    modes = doc["parameters"]["modes"]
    rows = [[str(c["kv_tokens"]), c["device_mix"], f"{c['acceptance']:g}", c["engine"],
             *(capacity_text(c["capacity"].get(m), "{:.1f}") for m in modes),
             fmt(c.get("ratio_vs_best_baseline")), fmt(c["bound"].get("ratio")), str(c["regime"])]
            for c in doc["cells"]]
    print_table(f"capacity grid ({doc.get('scenario_name')}): devices at 90% SLO attainment [95%]",
                ["KV", "mix", "acceptance", "engine", *modes, "ratio", "bound", "regime"], rows,
                left=("mix", "engine"))


# ---------------------------------------------------------------------- validate
@sim_app.command("validate")
def validate(
    scenario: ScenarioOpt = "local",
    devices: Annotated[str, typer.Option(help="Comma list of device counts.")] = "2,4,8",
    mode: Annotated[str, typer.Option("--mode", help="Mode of the real runs.")] = "sled",
    bench_json: Annotated[list[Path] | None, typer.Option(
        "--bench-json", help="Use these bench results (from `wisp-cli bench --out`, or this command's "
        "own bench-N.json) instead of running the real system; repeatable.")] = None,
    duration: Annotated[float, typer.Option(min=5.0, help="Seconds of real load per device count.")] = 180.0,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    prompts: Annotated[int, typer.Option(min=1, help="Distinct prompts (as `wisp-cli bench`).")] = 30,
    ttft_slo_ms: Annotated[float | None, typer.Option(min=1.0)] = None,
    tpot_slo_ms: Annotated[float | None, typer.Option(min=1.0)] = None,
    draft_model: Annotated[str | None, typer.Option(help="Draft model of the real runs.")] = None,
    target_model: Annotated[str | None, typer.Option(help="Target model of the real runs.")] = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Agreement bound (relative TPOT error, "
                                             "absolute attainment difference).")] = 0.15,
    seeds: Annotated[int, typer.Option(min=1, max=20, help="Simulator seeds averaged per point.")] = 3,
    timings: Annotated[str, typer.Option(
        help="run: the verifier batch timings and drafter speed measured during each real run "
        "(same machine, same load); scenario: the scenario's profile and draft speed.")] = "run",
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(
        help="Folder for the bench and comparison JSON.")] = Path("out/validate"),
) -> None:
    """Sim-to-real check: run `wisp-cli bench` on this machine at each device count (or read its
    JSON), simulate the same load with the scenario's measured profile and traces, and compare
    mean TPOT and SLO attainment. Exits 1 when a point disagrees by more than the tolerance."""
    from wisp.sim.scenario import ScenarioError
    from wisp.sim.validate import BenchRun, compare, load_bench_json, render_validation

    counts = _parse_counts(devices) or [2, 4, 8]
    if timings not in ("run", "scenario"):
        raise typer.BadParameter(f"{timings!r}: use run or scenario", param_hint="--timings")
    if mode not in ("wisp", "sled", "centralized"):
        raise typer.BadParameter(f"{mode!r}: use wisp, sled or centralized", param_hint="--mode")
    _quiet_logs()
    sc = _load(scenario, overrides)
    runs: dict[int, BenchRun] = {}
    for p in bench_json or []:
        try:
            for r in load_bench_json(p, mode):
                runs[r.devices] = r
        except (OSError, ValueError) as err:
            fail(f"{p}: {err}")
    if any(n not in runs for n in counts):  # real runs ahead: every prerequisite first
        preflight_prompts("mixed", prompts)
        preflight_models(make_settings(mode=mode, draft_model=draft_model, target_model=target_model),
                         ALL_ROLES)
    output_dir(out)
    for n in counts:
        if n in runs:
            continue
        say(f"[real] {mode}: {n} devices x {duration:.0f} s ...")
        runs[n] = run_real_bench(mode, n, duration, max_new_tokens=max_new_tokens, prompts=prompts,
                                 ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms,
                                 draft_model=draft_model, target_model=target_model,
                                 out=out / f"bench-{mode}-{n}.json")
    try:
        report = compare(sc, mode, [runs[n] for n in counts if n in runs],
                         tolerance=tolerance, seeds=seeds, timings=timings)
    except ScenarioError as err:
        fail(str(err))
    (out / "validate.json").write_text(json.dumps(report, indent=1))
    text = render_validation(report)
    (out / "validate.md").write_text(text)
    print(text)
    print(f"written: {out / 'validate.json'}, {out / 'validate.md'}", file=sys.stderr)
    if not report["agree"]:
        fail(f"simulator and real system disagree by more than {tolerance:.0%} (see {out / 'validate.md'})")


def run_real_bench(mode: str, devices: int, duration: float, *, max_new_tokens: int = 64,
                   prompts: int = 30, ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None,
                   draft_model: str | None = None, target_model: str | None = None,
                   out: Path | None = None, settings_overrides: dict[str, Any] | None = None,
                   trace: bool = True) -> Any:
    """Run ``wisp-cli bench``'s own code path (a fresh embedded system, the same prompts) and
    write its JSON plus what the simulator needs: per-request records, the request shapes
    (prompt and output token counts) and the mean TPOT."""
    import logging

    from wisp.bench import BenchConfig, record_of
    from wisp.sim.validate import load_bench_json

    logging.getLogger().setLevel(logging.WARNING)
    texts = tuple(p.text for p in preflight_prompts("mixed", prompts))
    cfg = BenchConfig(devices=devices, duration_s=duration, max_new_tokens=max_new_tokens,
                      ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, think_s=0.0, prompts=texts)
    settings = make_settings(mode=mode, draft_model=draft_model, target_model=target_model,
                             trace=trace or None, **(settings_overrides or {}))
    preflight_models(settings, ALL_ROLES)
    path = output_path(out or Path(f"out/validate/bench-{mode}-{devices}.json"))
    res, collected = run_async(bench_fresh(settings, cfg, mode, _collect))
    assert collected is not None
    timings, trace_rows = collected
    ok = [record_of(d) for d in res.done]
    data = {
        "config": {k: v for k, v in cfg.__dict__.items() if k != "prompts"},
        "results": [res.as_dict()],
        "records": [r.__dict__ for r in res.records],
        "shapes": [[len(d.prompt_token_ids), len(d.token_ids)] for d in res.done],
        "tpot_mean_ms": (sum(r.tpot_ms for r in ok) / len(ok)) if ok else None,
        "draft_ms_per_drafted_token": (
            sum(d.draft_ms_total for d in res.done) / max(1, sum(d.drafted_tokens for d in res.done))),
        "settings": {"draft_model": settings.draft_model, "target_model": settings.target_model,
                     "device": settings.device},
        # this machine's component timings measured during the run: every verified batch
        # (shape and wall time, from the verifier's timing stream) and the drafter's speed
        "timings": timings,
        "drafter": drafter_fit(res.done),
        "hardware": _hardware(settings),
        # the served requests and their (features, verdict) trace rows: the simulator replays
        # exactly these requests (prompt and output lengths, per-position acceptance)
        "requests": [{"request_id": d.request_id, "prompt_len": len(d.prompt_token_ids),
                      "output_len": len(d.token_ids), "drafted": d.drafted_tokens,
                      "accepted": d.accepted_tokens} for d in res.done],
        "trace_rows": trace_rows,
    }
    path.write_text(json.dumps(data, indent=1, default=str))
    return load_bench_json(path, mode)[0]


async def _collect(bus: Any, t0: float, res: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What the simulator replays besides the requests, read from the streams after the run:
    the verifier's timing sample of every batch of the measured part and, with tracing on, the
    drafter's trace rows of the measured requests."""
    from wisp.bench import stream_messages
    from wisp.protocol import TimingSample
    from wisp.protocol.trace import TraceRow

    samples = [{"new_tokens": ts.new_tokens, "context_lens": ts.context_lens,
                "measured_ms": ts.measured_ms, "predicted_ms": ts.predicted_ms,
                "cache_misses": ts.cache_misses}
               for ts in await stream_messages(bus, bus.keys.stats, TimingSample, t0)
               if ts.ts >= t0 and ts.new_tokens]
    mine = {d.request_id for d in res.done}
    rows = [row.model_dump(exclude={"version", "kind"})
            for row in await stream_messages(bus, bus.keys.trace, TraceRow, t0) if row.request_id in mine]
    return samples, rows


def drafter_fit(done: list[Any]) -> dict[str, Any] | None:
    """The drafter's speed during the run: least squares of each request's total drafting time
    on its prompt length (the first round's prefill) and its draft forwards (drafted tokens; with
    a fixed k every round drafts exactly its tokens)."""
    import numpy as np

    rows = [(len(d.prompt_token_ids), d.drafted_tokens, d.draft_ms_total) for d in done
            if d.drafted_tokens > 0 and d.draft_ms_total > 0]
    if len(rows) < 3:
        return None
    x = np.array([[p, k] for p, k, _ in rows], dtype=float)
    y = np.array([ms for _, _, ms in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    per_prompt, per_pass = float(coef[0]), float(coef[1])
    if per_pass <= 0:
        per_pass = float(y.sum() / x[:, 1].sum())
    per_prompt = max(per_prompt, 1e-3)
    return {"ms_per_forward": per_pass, "draft_tokens_per_s": 1000.0 / per_pass,
            "prefill_tokens_per_s": 1000.0 / per_prompt, "requests": len(rows)}


@sim_app.command("scenarios")
def scenarios() -> None:
    """List the packaged scenarios."""
    from wisp.sim.scenario import list_scenarios, load_scenario

    for name in list_scenarios():
        sc = load_scenario(name)
        print(f"{name:12s} {sc.scenario.description}")


# ---------------------------------------------------------------------- calibration
def measure_drafter(draft_model: str, settings: Any, prompt_lens: tuple[int, ...] = (32, 128, 384),
                    k: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Time the real ``DraftEngine`` on this machine: ms per draft forward (warm cache) and
    prompt-prefill tokens/s (cold cache), on random token ids."""
    import random
    import time

    from wisp import models
    from wisp.services.drafter.engine import DraftEngine

    model = models.load_model(draft_model, settings)
    eng = DraftEngine(model, max_sessions=64)
    vocab = int(model.config.vocab_size)
    rng = random.Random(0)
    eng.draft("__warm__", [1, 2, 3, 4], 2, 0.0, 1, None)
    eng.drop("__warm__")
    per_pass: list[float] = []
    prefill: list[float] = []
    for rep in range(repeats):
        for n in prompt_lens:
            sid = f"m{rep}-{n}"
            ids = [rng.randrange(vocab) for _ in range(n)]
            t0 = time.perf_counter()
            cold = eng.draft(sid, ids, k, 0.0, 1, None)
            cold_ms = (time.perf_counter() - t0) * 1000.0
            warm = eng.draft(sid, ids + cold.tokens[:2], k, 0.0, 1, None)
            tok_ms = warm.draft_ms / max(1, warm.forward_passes)
            per_pass.append(tok_ms)
            prefill_ms = max(cold_ms - (cold.forward_passes - 1) * tok_ms, tok_ms)  # at least one forward
            prefill.append(n / (prefill_ms / 1000.0))
            eng.drop(sid)
    per_pass.sort()
    prefill.sort()
    med = per_pass[len(per_pass) // 2]
    return {"draft_model": draft_model, "ms_per_forward": med, "draft_tokens_per_s": 1000.0 / med,
            "prefill_tokens_per_s": prefill[len(prefill) // 2], "samples": len(per_pass),
            "hardware": _hardware(settings)}


def measure_verifier(target_model: str, settings: Any, batches: int = 60,
                     max_rows: int = 8, max_ctx: int = 512) -> dict[str, Any]:
    """A verifier profile measured with the real ``VerifierEngine`` (the fallback when no
    ``wisp-cli profile verifier`` output exists): random batches of 1..max_rows rounds with
    1..9 new tokens on warm caches of 16..max_ctx tokens, plus the cold first rounds that
    prefill them. Same sample format (new_tokens, context_lens, measured_ms) and hardware."""
    import random
    import time

    from wisp import models
    from wisp.services.verifier.engine import VerifierEngine, VerifyItem

    model = models.load_model(target_model, settings)
    eng = VerifierEngine(model, max_sessions=4 * max_rows + 8)
    vocab = int(model.config.vocab_size)
    rng = random.Random(1)
    samples: list[dict[str, Any]] = []

    def run(items: list[Any]) -> None:
        t0 = time.perf_counter()
        res = eng.verify(items)
        ms = (time.perf_counter() - t0) * 1000.0
        samples.append({"new_tokens": [r.new_tokens for r in res],
                        "context_lens": [r.context_len - r.new_tokens for r in res], "measured_ms": ms})

    eng.verify([VerifyItem("__warm__", [1, 2, 3], [4], None, 0.0, None)])
    for b in range(batches):
        rows = rng.choice([1, 1, 2, 3, 4, 6, max_rows])
        sess = []
        for r in range(rows):
            ctx = [rng.randrange(vocab) for _ in range(rng.randint(16, max_ctx))]
            sess.append((f"b{b}r{r}", ctx))
        run([VerifyItem(sid, ids, [rng.randrange(vocab)], None, 0.0, None) for sid, ids in sess])  # cold
        items = []
        for sid, ids in sess:
            k = rng.randint(0, 8)
            # the cached prefix is ids (+ what was accepted): feed one committed id + k drafts
            draft = [rng.randrange(vocab) for _ in range(k)]
            items.append(VerifyItem(sid, ids + [rng.randrange(vocab)], draft, None, 0.0, None))
        run(items)
    return {"source": "wisp-cli sim calibrate (VerifierEngine timings)", "target_model": target_model,
            "hardware": _hardware(settings), "samples": samples}


def measure_contention(draft_model: str, target_model: str, settings: Any,
                       seconds: float = 20.0) -> dict[str, Any]:
    """How much drafting and verifying slow each other down when they run at the same time in
    one process (as in `wisp-cli bench`/`up`: each service has its own torch worker thread):
    the draft forward time and a 4-round verify batch time, each alone and while the other runs
    in a second thread. ``contention`` is the mean of the two slowdowns."""
    import random
    import threading
    import time

    from wisp import models
    from wisp.services.drafter.engine import DraftEngine
    from wisp.services.verifier.engine import VerifierEngine, VerifyItem

    deng = DraftEngine(models.load_model(draft_model, settings))
    veng = VerifierEngine(models.load_model(target_model, settings), max_sessions=64)
    rng = random.Random(2)
    vocab = 1000
    ids = [[rng.randrange(vocab) for _ in range(128)] for _ in range(4)]
    for i, x in enumerate(ids):
        veng.verify([VerifyItem(f"v{i}", x, [1], None, 0.0, None)])
    deng.draft("d", ids[0], 2, 0.0, 1, None)

    def draft_once() -> float:
        out = deng.draft("d", ids[0] + [7], 4, 0.0, 1, None)
        return out.draft_ms / max(1, out.forward_passes)

    def verify_once() -> float:
        t0 = time.perf_counter()
        veng.verify([VerifyItem(f"v{i}", x + [9], [3, 4, 5, 6], None, 0.0, None)
                     for i, x in enumerate(ids)])
        return (time.perf_counter() - t0) * 1000.0

    def timed(fn: Any, budget: float) -> float:
        xs = []
        end = time.perf_counter() + budget
        while time.perf_counter() < end or len(xs) < 3:
            xs.append(fn())
        xs.sort()
        return xs[len(xs) // 2]

    def under_load(fn: Any, other: Any, budget: float) -> float:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                other()

        th = threading.Thread(target=loop, daemon=True)
        th.start()
        try:
            time.sleep(0.2)
            return timed(fn, budget)
        finally:
            stop.set()
            th.join()

    q = seconds / 4
    d0, v0 = timed(draft_once, q), timed(verify_once, q)
    d1, v1 = under_load(draft_once, verify_once, q), under_load(verify_once, draft_once, q)
    return {"draft_ms_alone": d0, "draft_ms_with_verify": d1, "verify_ms_alone": v0,
            "verify_ms_with_draft": v1, "contention": ((d1 / d0) + (v1 / v0)) / 2,
            "hardware": _hardware(settings)}


def _hardware(settings: Any) -> dict[str, Any]:
    import os
    import platform

    import torch
    from wisp import models

    hw: dict[str, Any] = {"device": settings.device, "cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__,
                          "linear": models.linear_kernels(settings)}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                hw["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if str(settings.device).startswith("cuda") and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name()
    return hw


@sim_app.command("calibrate")
def calibrate(
    out: Annotated[Path, typer.Option(
        help="Folder for drafter.json (and profile.json).")] = Path("out/calibrate"),
    draft_model: Annotated[str | None, typer.Option(help="Draft model (default: the settings').")] = None,
    target_model: Annotated[str | None, typer.Option(help="Target model (default: the settings').")] = None,
    verifier: Annotated[bool, typer.Option(help="Also measure a verifier profile (a fallback for "
                                           "`wisp-cli profile verifier`).")] = False,
    batches: Annotated[int, typer.Option(min=4, help="Verifier batches to time.")] = 60,
    contention: Annotated[bool, typer.Option(help="Also measure the drafting/verifying slowdown "
                                             "when both share this CPU (loads both models).")] = False,
) -> None:
    """Measure this machine's drafting speed (ms per draft forward, prefill tokens/s) with the
    real DraftEngine, for the `local` scenario's device class; optionally a verifier profile."""
    s = make_settings(draft_model=draft_model, target_model=target_model)
    preflight_models(s, ["drafter", "verifier"] if verifier or contention else ["drafter"])
    output_dir(out)
    d = measure_drafter(s.draft_model, s)
    (out / "drafter.json").write_text(json.dumps(d, indent=1))
    print(f"drafter {s.draft_model}: {d['ms_per_forward']:.1f} ms per forward "
          f"({d['draft_tokens_per_s']:.2f} tok/s), prefill {d['prefill_tokens_per_s']:.0f} tok/s")
    if contention:
        c = measure_contention(s.draft_model, s.target_model, s)
        (out / "contention.json").write_text(json.dumps(c, indent=1))
        print(f"contention: draft {c['draft_ms_alone']:.0f} -> {c['draft_ms_with_verify']:.0f} ms, "
              f"verify {c['verify_ms_alone']:.0f} -> {c['verify_ms_with_draft']:.0f} ms: "
              f"factor {c['contention']:.2f}")
    if verifier:
        prof = measure_verifier(s.target_model, s, batches=batches)
        (out / "profile.json").write_text(json.dumps(prof, indent=1))
        print(f"verifier profile: {len(prof['samples'])} batches -> {out / 'profile.json'}")
