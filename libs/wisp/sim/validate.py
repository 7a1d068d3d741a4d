"""Sim-to-real check: the simulator against ``wisp-cli bench`` on this machine.

For each real run (N closed-loop devices for D seconds through the real services) the
simulator replays the same load (N devices, think time, SLOs, max_new_tokens, and, when the run
recorded them, the prompt and output lengths of the requests it served) with the scenario's
measured verifier profile and recorded acceptance traces, averaged over a few seeds, and the
two are compared on mean TPOT (relative error) and SLO attainment (absolute difference).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.sim.scenario import Scenario, with_overrides
from wisp.sim.simulator import load_assets, simulate
from wisp.sim.workload import RequestShape


@dataclass
class BenchRun:
    devices: int
    duration_s: float
    max_new_tokens: int
    think_s: float
    ttft_slo_ms: float
    tpot_slo_ms: float
    slo_attainment: float
    tpot_mean_ms: float | None
    tpot_p50_ms: float | None
    requests: int
    acceptance_rate: float | None = None
    shapes: list[tuple[int, int]] = field(default_factory=list)
    path: str = ""
    mode: str = "sled"
    timings: list[dict[str, Any]] = field(default_factory=list)
    """The verifier's batch timings measured during the run (shape + wall ms)."""
    drafter: dict[str, Any] | None = None
    """The drafter's speed measured during the run (``drafter_fit``)."""
    hardware: dict[str, Any] = field(default_factory=dict)
    requests_info: list[dict[str, Any]] = field(default_factory=list)
    """The served requests: request_id, prompt_len, output_len."""
    trace_rows: list[dict[str, Any]] = field(default_factory=list)
    """The drafter's (features, verdict) rows of those requests (tracing on during the run)."""
    tpots: list[float] = field(default_factory=list)
    """Per-request TPOT of the requests that finished."""

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("shapes", "timings", "requests_info", "trace_rows", "tpots"):
            d[k] = len(d[k])
        return d

    def replay_bank(self) -> tuple[Any, list[RequestShape]] | None:
        """The run's own requests as an acceptance bank plus one request shape per sequence
        (exact prompt and output lengths), or None without trace rows."""
        if not self.trace_rows or not self.requests_info:
            return None
        from wisp.sim.workload import AcceptanceBank, sequences_from_rows

        meta = {"requests": [{"request_id": r["request_id"], "prompt_token_ids": [0] * int(r["prompt_len"]),
                              "token_ids": [0] * int(r["output_len"])} for r in self.requests_info]}
        seqs = sequences_from_rows(self.trace_rows, meta)
        if not seqs:
            return None
        bank = AcceptanceBank(seqs, "traces", f"{self.path} (the run's own trace rows)")
        shapes = [RequestShape(int(q.prompt_len or 1), int(q.output_len or len(q) + 1), seq=i)
                  for i, q in enumerate(seqs)]
        return bank, shapes


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def load_bench_json(path: str | Path, mode: str | None = None) -> list[BenchRun]:
    """Bench runs from a ``wisp-cli bench --out`` file (one row per mode) or from this
    module's own extended bench JSON (which adds records, request shapes and mean TPOT)."""
    p = Path(path)
    obj = json.loads(p.read_text())
    if not isinstance(obj, dict) or "results" not in obj:
        raise ValueError("not a wisp-cli bench JSON (no 'results')")
    cfg = obj.get("config", {})
    out = []
    for row in obj["results"]:
        if mode is not None and row.get("mode") != mode:
            continue
        recs = obj.get("records") or []
        ok = [r for r in recs if r.get("ok", True) and r.get("tpot_ms") is not None]
        tpot_mean = _num(obj.get("tpot_mean_ms", row.get("tpot_mean_ms")))
        if tpot_mean is None and ok:
            tpot_mean = sum(float(r["tpot_ms"]) for r in ok) / len(ok)
        ttft_slo = _num(cfg.get("ttft_slo_ms")) or (_num(recs[0].get("ttft_slo_ms")) if recs else None)
        tpot_slo = _num(cfg.get("tpot_slo_ms")) or (_num(recs[0].get("tpot_slo_ms")) if recs else None)
        if ttft_slo is None or tpot_slo is None:
            from wisp.settings import Settings

            s = Settings()
            ttft_slo = ttft_slo or s.ttft_slo_ms
            tpot_slo = tpot_slo or s.tpot_slo_ms
        out.append(BenchRun(
            devices=int(row.get("devices", cfg.get("devices", 0))),
            duration_s=float(cfg.get("duration_s", row.get("duration_s", 60.0))),
            max_new_tokens=int(cfg.get("max_new_tokens", row.get("max_new_tokens", 64))),
            think_s=float(cfg.get("think_s", 0.0)),
            ttft_slo_ms=float(ttft_slo), tpot_slo_ms=float(tpot_slo),
            slo_attainment=float(row["slo_attainment"]),
            tpot_mean_ms=tpot_mean,
            tpot_p50_ms=_num(row.get("tpot_p50_ms")),
            requests=int(row.get("requests", 0)),
            acceptance_rate=_num(row.get("acceptance_rate")),
            shapes=[(int(a), int(b)) for a, b in obj.get("shapes", [])],
            path=str(p),
            mode=str(row.get("mode", mode or "sled")),
            timings=list(obj.get("timings") or []),
            drafter=obj.get("drafter"),
            hardware=dict(obj.get("hardware") or {}),
            requests_info=list(obj.get("requests") or []),
            trace_rows=list(obj.get("trace_rows") or []),
            tpots=[float(r["tpot_ms"]) for r in ok],
        ))
    if not out:
        raise ValueError(f"no {mode or ''} results in the file")
    return out


def scenario_for(sc: Scenario, run: BenchRun) -> Scenario:
    """The scenario replaying ``run``'s load."""
    return with_overrides(sc, [
        f"scenario.duration_s={run.duration_s}",
        "scenario.warmup_s=0",
        f"scenario.drain_s={max(600.0, 10 * run.duration_s)}",
        "workload.users='closed'",
        f"workload.think_s={run.think_s}",
        "workload.stagger_s=0",
        f"workload.max_new_tokens={run.max_new_tokens}",
        f"slo.ttft_ms={run.ttft_slo_ms}",
        f"slo.tpot_ms={run.tpot_slo_ms}",
    ]).validate()


def _finite(v: Any) -> bool:
    return v is not None and v == v and math.isfinite(v)


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return abs(a - b) / abs(b)


def run_timing_overrides(run: BenchRun, drafter_class: str = "drafter") -> list[str]:
    """Scenario overrides that make the simulator use the component timings measured during
    ``run``: its verifier batches as the profile (written beside the run's JSON) and its
    drafter's speed. Contention is then already inside both measurements."""
    out: list[str] = []
    if len(run.timings) >= 8 and run.path:
        prof = Path(run.path).with_suffix(".profile.json")
        prof.write_text(json.dumps({"kind": "verifier-profile", "schema": 1,
                                    "source": f"timing stream of the real run {Path(run.path).name}",
                                    "hardware": run.hardware, "samples": run.timings}))
        out += ["server.timing='profile'", f"server.profile={json.dumps(str(prof))}", "server.contention=1.0"]
    if run.drafter:
        d = run.drafter
        out += [f"devices.classes.{drafter_class}.draft_tokens_per_s={float(d['draft_tokens_per_s']):.4f}",
                f"devices.classes.{drafter_class}.prefill_tokens_per_s={float(d['prefill_tokens_per_s']):.4f}"]
    return out


def _cdf_check(real: list[float], sim: list[float]) -> dict[str, Any] | None:
    """Share of requests with TPOT <= the real run's quartiles, real vs simulated: the SLO
    attainment curve at three TPOT SLOs that cut the real distribution in quarters."""
    if len(real) < 4 or not sim:
        return None
    r = sorted(real)
    out = []
    for q in (0.25, 0.5, 0.75):
        thr = r[min(len(r) - 1, int(q * len(r)))]
        fr = sum(x <= thr for x in real) / len(real)
        fs = sum(x <= thr for x in sim) / len(sim)
        out.append({"tpot_slo_ms": thr, "real": fr, "sim": fs, "diff": abs(fr - fs)})
    return {"points": out, "max_diff": max(p["diff"] for p in out)}


def compare(sc: Scenario, mode: str, runs: list[BenchRun], *,
            tolerance: float = 0.15, seeds: int = 3, timings: str = "run",
            replay_requests: bool = True) -> dict[str, Any]:
    """``timings = "run"``: component timings measured during each real run (its verifier
    batches and drafter speed); ``"scenario"``: the scenario's own profile and draft speed."""
    points = []
    assets = None
    for run in runs:
        scr = scenario_for(sc, run)
        used = "scenario"
        if timings == "run":
            ov = run_timing_overrides(run, next(iter(scr.devices.mix)))
            if ov:
                scr = with_overrides(scr, ov).validate()
                used = "run"
                assets = None
        if assets is None:
            assets = load_assets(scr)
        a = assets
        from dataclasses import replace

        replay = run.replay_bank() if replay_requests else None
        workload = "scenario"
        if replay is not None:
            bank, shapes = replay
            src = f"the real run's {len(shapes)} requests, replayed with their own traces"
            a = replace(assets, bank=bank, shapes=shapes, shapes_source=src)
            workload = "run requests + their traces"
        elif run.shapes:
            a = replace(assets, shapes=[RequestShape(min(p, scr.workload.max_prompt_tokens),
                                                     max(1, min(o, run.max_new_tokens)))
                                        for p, o in run.shapes],
                        shapes_source=f"the real run's {len(run.shapes)} requests")
            workload = "run request lengths"
        sims = [simulate(scr, mode, run.devices, assets=a, seed=scr.scenario.seed + i)
                for i in range(seeds)]
        tpots = [r.summary["tpot_mean_ms"] for r in sims if _finite(r.summary["tpot_mean_ms"])]
        atts = [r.summary["slo_attainment"] for r in sims if _finite(r.summary["slo_attainment"])]
        sim_tpot = sum(tpots) / len(tpots) if tpots else None
        sim_att = sum(atts) / len(atts) if atts else None
        stat = "mean"
        real_tpot = run.tpot_mean_ms
        if real_tpot is None and run.tpot_p50_ms is not None:  # a plain `wisp-cli bench` JSON
            stat, real_tpot = "p50", run.tpot_p50_ms
            p50s = [r.summary["tpot_p50_ms"] for r in sims if _finite(r.summary["tpot_p50_ms"])]
            sim_tpot = sum(p50s) / len(p50s) if p50s else None
        tpot_err = _rel(sim_tpot, real_tpot)
        att_diff = abs(sim_att - run.slo_attainment) if sim_att is not None else None
        ok = tpot_err is not None and tpot_err <= tolerance and att_diff is not None and att_diff <= tolerance
        points.append({
            "devices": run.devices,
            "real": run.as_dict(),
            "sim": {
                "tpot_mean_ms": sim_tpot if stat == "mean" else None,
                "tpot_p50_ms": sim_tpot if stat == "p50" else None, "slo_attainment": sim_att,
                "requests": sum(r.summary["requests"] for r in sims) / len(sims),
                "acceptance_rate": sum(r.summary["acceptance_rate"] for r in sims) / len(sims),
                "ttft_mean_ms": sum(r.summary["ttft_mean_ms"] for r in sims) / len(sims),
                "breakdown": sims[0].breakdown,
                "seeds": seeds,
                "draft_policy": sims[0].info["draft_policy"],
            },
            "timings": used,
            "workload": workload,
            "tpot_cdf": _cdf_check(run.tpots, [x for r in sims for x in
                                              (rec.tpot_ms for rec in r.records if rec.ok)]),
            "timing_model": a.model.describe(),
            "tpot_statistic": stat,
            "tpot_rel_error": tpot_err,
            "attainment_abs_diff": att_diff,
            "agree": ok,
        })
    return {
        "scenario": {"name": sc.name, "path": sc.source_path, "digest": sc.digest()},
        "mode": mode,
        "tolerance": tolerance,
        "assets": assets.describe() if assets else {},
        "points": points,
        "agree": bool(points) and all(p["agree"] for p in points),
    }


def _f(v: Any, fmt: str) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if math.isnan(f) else fmt.format(f)


def render_validation(rep: dict[str, Any]) -> str:
    lines = [f"# Sim-to-real validation ({rep['mode']} mode, scenario {rep['scenario']['name']})", "",
             f"Agreement bound: mean TPOT within {rep['tolerance']:.0%} (relative) and SLO attainment "
             f"within {rep['tolerance']:.2f} (absolute).", "",
             "| devices | real requests | real TPOT mean ms | sim TPOT mean ms | TPOT error | "
             "real attainment | sim attainment | attainment diff | real accept | sim accept | agree |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for p in rep["points"]:
        r, s = p["real"], p["sim"]
        lines.append(
            f"| {p['devices']} | {r['requests']} | {_f(r['tpot_mean_ms'] or r['tpot_p50_ms'], '{:.0f}')} | "
            f"{_f(s['tpot_mean_ms'] or s['tpot_p50_ms'], '{:.0f}')} | {_f(p['tpot_rel_error'], '{:.1%}')} | "
            f"{_f(r['slo_attainment'], '{:.2f}')} | {_f(s['slo_attainment'], '{:.2f}')} | "
            f"{_f(p['attainment_abs_diff'], '{:.2f}')} | {_f(r['acceptance_rate'], '{:.2f}')} | "
            f"{_f(s['acceptance_rate'], '{:.2f}')} | {'yes' if p['agree'] else 'no'} |")
    lines += ["", "TPOT distribution check (share of requests with TPOT <= the real run's quartiles):", "",
              "| devices | SLO = real p25 | real / sim | SLO = real p50 | real / sim | SLO = real p75 | "
              "real / sim |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in rep["points"]:
        c = p.get("tpot_cdf")
        if not c:
            continue
        cells = [f"{_f(x['tpot_slo_ms'], '{:.0f}')} ms | {_f(x['real'], '{:.2f}')} / {_f(x['sim'], '{:.2f}')}"
                 for x in c["points"]]
        lines.append(f"| {p['devices']} | " + " | ".join(cells) + " |")
    a = rep.get("assets", {})
    lines += ["", "- Per point: " + "; ".join(f"{p['devices']} devices: timings from {p.get('timings')}, "
                                               f"workload {p.get('workload')}" for p in rep["points"]),
              f"- Timing: {json.dumps(a.get('timing', {}))}",
              f"- Acceptance: {json.dumps(a.get('acceptance', {}))}",
              f"- Overall: {'agree' if rep['agree'] else 'DISAGREE'}", ""]
    return "\n".join(lines)
