"""Sweep device counts for several modes and condense the runs into ``summary.json``.

Every point is run with several seeds (5 by default): its attainment and goodput are the mean
over seeds with a 95% t-interval. Capacity is the first crossing of the mean attainment curve
with the 90% target, linearly interpolated between swept counts, with the 95% interval where
the per-point band crosses the target (``wisp.sim.stats`` says why this interval). ``refine``
bisects between the swept counts that bracket each mode's mean crossing. Goodput ratios are
taken at WISP's capacity point (the largest whole device count under its mean crossing; every
mode is run there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from wisp.metrics import ATTAINMENT_TARGET
from wisp.sim.scenario import Scenario
from wisp.sim.simulator import Assets, SimResult, load_assets, simulate
from wisp.sim.stats import INTERVAL_METHOD, capacity_interval, mean_ci, ratio_range

PAPER_TARGETS = {
    "capacity_ratio_vs_centralized": 2.1,
    "capacity_ratio_vs_sled": 4.1,
    "goodput_ratio_vs_centralized": 1.94,
    "goodput_ratio_vs_sled": 3.7,
}
"""The WISP paper's headline numbers (Li et al., arXiv 2601.11652, abstract)."""

POINT_KEYS = (
    "requests", "failed", "slo_attainment", "goodput_tokens_per_s", "goodput_requests_per_s",
    "throughput_tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "ttft_mean_ms",
    "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "tpot_mean_ms", "acceptance_rate",
    "mean_accepted_per_round", "wasted_draft_ms_per_request",
)
INTERVAL_KEYS = ("slo_attainment", "goodput_tokens_per_s")
"""Per-point figures given as the mean over seeds with a 95% interval (``KEY_ci``) and the
per-seed values (``KEY_seeds``); the other figures are computed on the pooled records."""
DEFAULT_SEEDS = 5


def point_of(r: SimResult) -> dict[str, Any]:
    d = r.as_dict()
    out = {"devices": r.devices, **{k: d.get(k) for k in POINT_KEYS},
           "verifier_utilisation": r.verifier_utilisation, "breakdown": r.breakdown}
    info = r.info
    for k in ("refused", "kv_waits", "kv_peak_tokens", "mean_batch_rounds", "estimator_mape",
              "draft_policy", "attainment_by_class", "batch_policy", "wall_s", "events"):
        out[k] = info.get(k)
    out["seeds"] = 1
    return out


def _with_intervals(out: dict[str, Any], results: Sequence[SimResult]) -> dict[str, Any]:
    """Attainment and goodput as the seeds' mean, its 95% t-interval and the per-seed values:
    the capacity crossing and its interval are computed from exactly these."""
    for k in INTERVAL_KEYS:
        vals = [r.summary.get(k) for r in results]
        m, lo, hi = mean_ci(vals, (0.0, 1.0) if k == "slo_attainment" else (0.0, math.inf))
        out[k] = m
        out[f"{k}_ci"] = [lo, hi]
        out[f"{k}_seeds"] = vals
    out["seed_list"] = [r.seed for r in results]
    return out


def pooled_point(results: Sequence[SimResult]) -> dict[str, Any]:
    """One point from runs of the same (mode, devices) with different seeds: attainment and
    goodput as the mean over seeds with a 95% interval (``_with_intervals``); the other metrics
    (percentiles, acceptance, waste) of the pooled request records over the pooled measured time
    (``summarize``), breakdown weighted by rounds, the rest averaged."""
    if len(results) == 1:
        return _with_intervals(point_of(results[0]), results)
    from wisp.metrics import summarize

    recs = [rec for r in results for rec in r.records]
    dur = sum(_duration(r) for r in results)
    summ = summarize(recs, dur).as_dict()
    ok = [x for x in recs if x.ok]
    summ["tpot_mean_ms"] = sum(x.tpot_ms for x in ok) / len(ok) if ok else float("nan")
    summ["ttft_mean_ms"] = sum(x.ttft_ms for x in ok) / len(ok) if ok else float("nan")
    out = point_of(results[0])
    out.update({k: summ.get(k) for k in POINT_KEYS})
    rounds = sum(r.breakdown["rounds"] for r in results)
    out["breakdown"] = {"rounds": rounds, **{
        k: sum(r.breakdown[k] * r.breakdown["rounds"] for r in results) / max(rounds, 1)
        for k in ("drafting_ms", "network_ms", "queueing_ms", "verification_ms")}}
    n = len(results)
    out["verifier_utilisation"] = sum(r.verifier_utilisation for r in results) / n
    for k in ("refused", "kv_waits", "events"):
        out[k] = sum(int(r.info.get(k) or 0) for r in results)
    for k in ("mean_batch_rounds", "estimator_mape", "wall_s", "kv_peak_tokens"):
        vals = [float(r.info[k]) for r in results if r.info.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    classes: dict[str, list[float]] = {}
    for r in results:
        for c, v in (r.info.get("attainment_by_class") or {}).items():
            classes.setdefault(c, []).append(v)
    out["attainment_by_class"] = {c: sum(v) / len(v) for c, v in classes.items()}
    out["seeds"] = n
    return _with_intervals(out, results)


def _duration(r: SimResult) -> float:
    return float(r.info.get("duration_s") or 0.0)


@dataclass
class SweepResult:
    scenario: Scenario
    points: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    assets: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    command: str = ""
    seeds: int = 1

    def capacity(self, mode: str) -> dict[str, Any]:
        """``mode``'s capacity {mean, lo, hi, ...} (``wisp.sim.stats.capacity_interval``)."""
        pts = self.points.get(mode, {})
        ns = sorted(pts)
        return capacity_interval(ns, [pts[n].get("slo_attainment_seeds", [pts[n]["slo_attainment"]])
                                      for n in ns], ATTAINMENT_TARGET)

    def capacity_point(self, mode: str) -> int | None:
        """The whole device count at ``mode``'s capacity, where goodput is compared: the largest
        count under the mean crossing; the largest swept count when the sweep ended above the
        target; None when the mean attainment is below it at the first count."""
        cap = self.capacity(mode)
        st = cap["status"]["mean"]
        if st == "crossed":
            return max(1, math.floor(cap["mean"]))
        if st == "above":
            return int(cap["swept"][1])
        return None

    def summary(self) -> dict[str, Any]:
        modes_out: dict[str, Any] = {}
        for mode, pts in self.points.items():
            ns = sorted(pts)
            cp = self.capacity_point(mode)
            modes_out[mode] = {
                "capacity": self.capacity(mode),
                "capacity_point": cp,
                "devices": ns,
                "goodput_tokens_per_s": {str(n): pts[n]["goodput_tokens_per_s"] for n in ns},
                "goodput_tokens_per_s_ci": {str(n): pts[n].get("goodput_tokens_per_s_ci") for n in ns},
                "slo_attainment": {str(n): pts[n]["slo_attainment"] for n in ns},
                "slo_attainment_ci": {str(n): pts[n].get("slo_attainment_ci") for n in ns},
                "wasted_draft_ms_per_request": {str(n): pts[n]["wasted_draft_ms_per_request"] for n in ns},
                "verifier_utilisation": {str(n): pts[n]["verifier_utilisation"] for n in ns},
                "tpot_mean_ms": {str(n): pts[n]["tpot_mean_ms"] for n in ns},
                "mean_wasted_draft_ms_per_request": _mean(
                    [pts[n]["wasted_draft_ms_per_request"] for n in ns]),
                "mean_verifier_utilisation": _mean([pts[n]["verifier_utilisation"] for n in ns]),
                "peak_goodput_tokens_per_s": max((pts[n]["goodput_tokens_per_s"] for n in ns), default=None),
                "peak_goodput_devices": max(ns, key=lambda n: pts[n]["goodput_tokens_per_s"]) if ns else None,
                "at_capacity": pts.get(cp) if cp else None,
                "points": [pts[n] for n in ns],
            }
        ratios = self.ratios()
        sc = self.scenario
        return {
            "scenario": {"name": sc.name, "path": sc.source_path, "digest": sc.digest(),
                         "description": sc.scenario.description, "seed": sc.scenario.seed,
                         "duration_s": sc.scenario.duration_s, "warmup_s": sc.scenario.warmup_s,
                         "slo": {"ttft_ms": sc.slo.ttft_ms, "tpot_ms": sc.slo.tpot_ms},
                         "config": sc.as_dict()},
            "command": self.command,
            "seeds_per_point": self.seeds,
            "seeds": [sc.scenario.seed + i for i in range(self.seeds)],
            "interval_method": INTERVAL_METHOD,
            "attainment_target": ATTAINMENT_TARGET,
            "assets": self.assets,
            "modes": modes_out,
            **ratios,
            "paper_targets": PAPER_TARGETS,
            "meets_paper_targets": {k: (ratios[k] is not None and ratios[k] >= v)
                                    for k, v in PAPER_TARGETS.items()},
            "wall_s": round(self.wall_s, 2),
        }

    def ratios(self) -> dict[str, Any]:
        """Capacity ratios of the mean crossings (a censored capacity counts as its bound: the
        largest swept count, or 0 below the sweep), each with a conservative range from the
        two intervals (``ratio_range``); goodput ratios at WISP's capacity point; peak goodput
        ratios over the swept points."""
        has_w = "wisp" in self.points
        cw = self.capacity_point("wisp") if has_w else None
        capw = self.capacity("wisp") if has_w else None
        out: dict[str, Any] = {"goodput_ratio_devices": cw}
        peak = {m: max((p["goodput_tokens_per_s"] for p in pts.values()), default=None)
                for m, pts in self.points.items()}
        for other in ("centralized", "sled"):
            out[f"peak_goodput_ratio_vs_{other}"] = _ratio(peak.get("wisp"), peak.get(other))
        for other in ("centralized", "sled"):
            both = other in self.points and capw is not None
            capo = self.capacity(other) if both else None
            ratio, bound = _cap_ratio(capw, capo) if capw is not None and capo is not None else (None, None)
            out[f"capacity_ratio_vs_{other}"] = ratio
            out[f"capacity_ratio_vs_{other}_bound"] = bound
            out[f"capacity_ratio_vs_{other}_range"] = (
                ratio_range(capw, capo) if capw is not None and capo is not None else None)
            gw = self.points.get("wisp", {}).get(cw, {}).get("goodput_tokens_per_s") if cw else None
            go = self.points.get(other, {}).get(cw, {}).get("goodput_tokens_per_s") if cw else None
            out[f"goodput_ratio_vs_{other}"] = _ratio(gw, go)
        return out


def _cap_ratio(w: dict[str, Any], o: dict[str, Any]) -> tuple[float | None, str | None]:
    """WISP's capacity over another mode's, and whether that is a bound: ``at_least`` when
    WISP's sweep ended above the target (its capacity is at least the largest swept count),
    ``at_most`` when the other's did; None (unknown) when both did."""
    ws, os_ = w["status"]["mean"], o["status"]["mean"]
    if "empty" in (ws, os_) or (ws == "above" and os_ == "above"):
        return None, None
    r = _ratio(_cap_value(w), _cap_value(o))
    if ws == "above" and os_ != "below":
        return r, "at_least"
    if os_ == "above" and ws != "below":
        return r, "at_most"
    return r, None


def _cap_value(cap: dict[str, Any]) -> float:
    """A capacity as one number: the mean crossing; the largest swept count if the sweep ended
    above the target (a lower bound); 0 below the sweep."""
    st = cap["status"]["mean"]
    if st == "crossed":
        return float(cap["mean"])
    if st == "above" and cap.get("swept"):
        return float(cap["swept"][1])
    return 0.0


def _mean(xs: Sequence[Any]) -> float | None:
    v = [float(x) for x in xs if x is not None and x == x and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if not (a == a and b == b):
        return None
    if b <= 0:
        return math.inf if a > 0 else None
    return a / b


# ---------------------------------------------------------------------- running
_WORKER: dict[str, Any] = {}


def _init_worker(sc: Scenario) -> None:
    _WORKER["sc"] = sc
    _WORKER["assets"] = load_assets(sc)


def _run_point(mode: str, n: int, seeds: int = 1) -> tuple[str, int, dict[str, Any]]:
    sc = _WORKER["sc"]
    rs = [simulate(sc, mode, n, assets=_WORKER["assets"],
                   seed=sc.scenario.seed + i) for i in range(seeds)]
    return mode, n, pooled_point(rs)


def run_sweep(
    sc: Scenario,
    modes: Sequence[str] | None = None,
    devices: Sequence[int] | None = None,
    *,
    assets: Assets | None = None,
    jobs: int = 1,
    refine: int = 0,
    seeds: int = DEFAULT_SEEDS,
    on_point: Callable[[str, int, dict[str, Any]], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    command: str = "",
) -> SweepResult:
    """Run every (mode, device count), then ``refine`` bisection steps per mode around its
    capacity, then WISP's capacity point for every mode (for the goodput ratios)."""
    t0 = time.perf_counter()
    modes = list(modes or sc.sweep.modes)
    devices = sorted({int(n) for n in (devices or sc.sweep.devices)})
    assets = assets or load_assets(sc)
    res = SweepResult(sc, {m: {} for m in modes}, assets.describe(), command=command,
                      seeds=seeds)
    pool = None
    if jobs > 1:
        pool = ProcessPoolExecutor(jobs, initializer=_init_worker, initargs=(sc,))

    def run_many(tasks: list[tuple[str, int]]) -> None:
        tasks = [(m, n) for m, n in tasks if n not in res.points[m]]
        if on_plan is not None:
            on_plan(len(tasks))
        if pool is None:
            for m, n in tasks:
                p = pooled_point([simulate(sc, m, n, assets=assets, seed=sc.scenario.seed + i)
                                  for i in range(seeds)])
                res.points[m][n] = p
                if on_point:
                    on_point(m, n, p)
        else:
            futs = [pool.submit(_run_point, m, n, seeds) for m, n in tasks]
            for f in futs:
                m, n, p = f.result()
                res.points[m][n] = p
                if on_point:
                    on_point(m, n, p)

    try:
        run_many([(m, n) for n in devices for m in modes])
        for _ in range(max(0, refine)):
            extra = []
            for m in modes:
                lo, hi = _bracket(res, m)
                if lo is not None and hi is not None and hi - lo > 1:
                    extra.append((m, (lo + hi) // 2))
            if not extra:
                break
            run_many(extra)
        if "wisp" in modes:
            cw = res.capacity_point("wisp")
            if cw:
                run_many([(m, cw) for m in modes])
    finally:
        if pool is not None:
            pool.shutdown()
    res.wall_s = time.perf_counter() - t0
    return res


def _bracket(res: SweepResult, mode: str) -> tuple[int | None, int | None]:
    """The swept counts around ``mode``'s mean crossing: (last count at or above the target,
    first below it); (0, first count) when the first is already below; (None, None) when the
    sweep never fell below the target."""
    pts = res.points[mode]
    ns = sorted(pts)
    cap = res.capacity(mode)
    st = cap["status"]["mean"]
    if st == "below":
        return (0, ns[0]) if ns and ns[0] > 1 else (None, None)
    if st == "above":
        return None, None
    x = float(cap["mean"])
    lo = max(n for n in ns if n <= x)
    hi = min(n for n in ns if n > x)
    return lo, hi
