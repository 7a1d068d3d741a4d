"""Plots (matplotlib, Agg) and a self-contained markdown report of a sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MODE_STYLE = {
    "wisp": {"color": "#1b7837", "marker": "o", "label": "WISP"},
    "sled": {"color": "#762a83", "marker": "s", "label": "SLED"},
    "centralized": {"color": "#2166ac", "marker": "^", "label": "Centralized"},
}
PARTS = (("drafting_ms", "drafting", "#a6dba0"), ("network_ms", "network", "#c2a5cf"),
         ("queueing_ms", "queueing", "#f4a582"), ("verification_ms", "verification", "#92c5de"))


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def breakdown_devices(summary: dict[str, Any]) -> int | None:
    want = summary["scenario"]["config"]["sweep"].get("breakdown_devices") or 0
    if want:
        return int(want)
    cap = summary["modes"].get("wisp", {}).get("capacity_point")
    if cap:
        return int(cap)
    devs = sorted({n for m in summary["modes"].values() for n in m["devices"]})
    return devs[0] if devs else None


def capacity_text(cap: dict[str, Any] | None, fmt: str = "{:.0f}") -> str:
    """A capacity {mean, lo, hi} as text: ``83 [78, 88]``; a bound outside the sweep as
    ``>= 250`` or ``< 10``."""
    if not cap:
        return "n/a"
    swept = cap.get("swept") or [None, None]
    st = cap.get("status", {})

    def one(key: str) -> str:
        v = cap.get(key)
        if v is not None:
            return fmt.format(v)
        if st.get(key) == "above":
            return f">= {swept[1]}"
        return f"< {swept[0]}"

    if st.get("mean") == "empty":
        return "n/a (no request in the window)"
    if cap.get("seeds", 0) <= 1:
        return one("mean") + " (1 seed, no interval)"
    return f"{one('mean')} [{one('lo')}, {one('hi')}]"


def _band(m: dict[str, Any], key: str, xs: list[int]) -> tuple[list[float], list[float]] | None:
    ci = m.get(f"{key}_ci") or {}
    lo, hi = [], []
    for n in xs:
        c = ci.get(str(n))
        if not c or c[0] is None or c[1] is None:
            return None
        lo.append(float(c[0]))
        hi.append(float(c[1]))
    return lo, hi


def write_plots(summary: dict[str, Any], out: Path) -> list[Path]:
    """Attainment and goodput vs devices (the seeds' mean, with the 95% band shaded, and each
    mode's capacity interval as a shaded span on the attainment plot), and the round-time
    breakdown at WISP's capacity."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    name = summary["scenario"]["name"]
    target = summary.get("attainment_target", 0.9)

    for key, fname, ylabel in (
        ("slo_attainment", "slo_attainment_vs_devices.png", "SLO attainment"),
        ("goodput_tokens_per_s", "goodput_vs_devices.png", "goodput (tokens/s of SLO-meeting requests)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for mode, m in summary["modes"].items():
            st = MODE_STYLE.get(mode, {"label": mode})
            xs = sorted(int(n) for n in m[key])
            ys = [m[key][str(n)] for n in xs]
            ax.plot(xs, ys, color=st.get("color"), marker=st.get("marker"), label=st["label"])
            band = _band(m, key, xs)
            if band is not None:
                ax.fill_between(xs, band[0], band[1], color=st.get("color"), alpha=0.18, lw=0)
            cap = m.get("capacity") or {}
            if key == "slo_attainment" and cap.get("mean") is not None:
                ax.axvline(cap["mean"], color=st.get("color"), lw=0.8, ls=":")
                lo = cap.get("lo") if cap.get("lo") is not None else min(xs)
                hi = cap.get("hi") if cap.get("hi") is not None else max(xs)
                ax.axvspan(lo, hi, ymin=0.0, ymax=0.04, color=st.get("color"), alpha=0.5, lw=0)
        if key == "slo_attainment":
            ax.axhline(target, color="grey", lw=1, ls="--", label=f"{target:.0%} target")
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("concurrent edge devices")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs devices ({name})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    n = breakdown_devices(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    modes = list(summary["modes"])
    for ax, per_token in zip(axes, (False, True), strict=True):
        bottoms = [0.0] * len(modes)
        for part, label, color in PARTS:
            vals = []
            for mode in modes:
                pt = _point(summary["modes"][mode], n)
                b = (pt or {}).get("breakdown", {})
                v = float(b.get(part, 0.0) or 0.0)
                if per_token:
                    acc = (pt or {}).get("mean_accepted_per_round")
                    commit = 1.0 + (acc if acc is not None and acc == acc else 0.0)
                    v /= commit
                vals.append(v)
            ax.bar([MODE_STYLE.get(m, {"label": m})["label"] for m in modes], vals, bottom=bottoms,
                   color=color, label=label)
            bottoms = [a + b for a, b in zip(bottoms, vals, strict=True)]
        ax.set_ylabel("ms per committed token" if per_token else "ms per round")
        ax.set_title(("per committed token" if per_token else "per round") + f" at {n} devices")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Where a round's time goes ({name})")
    fig.tight_layout()
    p = out / "round_time_breakdown.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


def _point(m: dict[str, Any], n: int | None) -> dict[str, Any] | None:
    if n is None:
        return None
    for p in m["points"]:
        if p["devices"] == n:
            return p
    return None


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None:
        return "n/a"
    try:
        fv = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(fv):
        return "n/a"
    if math.isinf(fv):
        return "inf"
    return fmt.format(fv)


def render_report(summary: dict[str, Any], plots: list[Path] | None = None) -> str:
    sc = summary["scenario"]
    cfg = sc["config"]
    lines = [f"# Simulated comparison: WISP vs SLED vs centralized ({sc['name']})", ""]
    if sc.get("description"):
        lines += [sc["description"], ""]
    lines += [
        f"- Command: `{summary.get('command') or 'n/a'}`",
        f"- Scenario: `{sc['path']}` (digest `{sc['digest']}`), seed {sc['seed']}, "
        f"{_f(sc['duration_s'], '{:.0f}')} s measured after {_f(sc['warmup_s'], '{:.0f}')} s warm-up, "
        f"{summary.get('seeds_per_point', 1)} seed(s) per point "
        f"(seeds {', '.join(str(x) for x in summary.get('seeds') or [])})",
        f"- SLOs: TTFT <= {_f(sc['slo']['ttft_ms'], '{:.0f}')} ms and TPOT <= "
        f"{_f(sc['slo']['tpot_ms'], '{:.0f}')} ms; capacity = the first crossing of the mean SLO "
        f"attainment curve with {summary.get('attainment_target', 0.9):.0%} (interpolated), "
        f"shown as mean [95% interval]",
        f"- Intervals: {summary.get('interval_method', 'n/a')}",
        f"- Acceptance: {_assets_line(summary)}",
        f"- Verify time: {summary['assets'].get('timing', {}).get('name')} model "
        f"({json.dumps(summary['assets'].get('timing', {}).get('hardware', {}))})",
        "- Policies: the services' own objects (imported, not copied); draft policy per mode: "
        + ", ".join(f"{m}: {mm['points'][0].get('draft_policy') if mm['points'] else 'n/a'}"
                    for m, mm in summary["modes"].items()),
        f"- Sweep wall time: {_f(summary.get('wall_s'), '{:.0f}')} s",
        "",
        "## Headline",
        "",
        "| | measured | paper | meets |",
        "|---|---:|---:|:---:|",
    ]
    for k, target in summary["paper_targets"].items():
        v = summary.get(k)
        meets = "yes" if summary["meets_paper_targets"].get(k) else "no"
        lines.append(f"| {k} | {_f(v)} | {target} | {meets} |")
    lines += ["", f"Goodput ratios are taken at WISP's capacity point "
              f"({summary.get('goodput_ratio_devices') or 'n/a'} devices). Peak goodput (the best swept "
              f"point of each mode) ratios: WISP/centralized "
              f"{_f(summary.get('peak_goodput_ratio_vs_centralized'))}, WISP/SLED "
              f"{_f(summary.get('peak_goodput_ratio_vs_sled'))}.", ""]
    ranges = [f"{k[: -len('_range')]} {_f(summary[k][0])} to {_f(summary[k][1])}"
              for k in ("capacity_ratio_vs_centralized_range", "capacity_ratio_vs_sled_range")
              if summary.get(k) and any(v is not None for v in summary[k])]
    bounds = [f"{k} is {summary.get(k + '_bound', '').replace('_', ' ')} {_f(summary.get(k))}"
              for k in ("capacity_ratio_vs_centralized", "capacity_ratio_vs_sled")
              if summary.get(k + "_bound")]
    if bounds:
        lines += ["A capacity ratio with a censored capacity is a bound: " + "; ".join(bounds) + ".", ""]
    if ranges:
        lines += ["Capacity ratio ranges (each end from the two capacity intervals' opposite ends; "
                  "conservative): " + "; ".join(ranges) + ".", ""]
    lines += ["| mode | capacity (devices, mean [95% interval]) | goodput at WISP's capacity (tok/s) | "
              "peak goodput (tok/s @ devices) | mean wasted drafting ms/request | "
              "mean verifier utilisation |",
              "|---|---:|---:|---:|---:|---:|"]
    gd = summary.get("goodput_ratio_devices")
    for mode, m in summary["modes"].items():
        g = m["goodput_tokens_per_s"].get(str(gd)) if gd else None
        cap = capacity_text(m.get("capacity"), "{:.1f}")
        peak = f"{_f(m.get('peak_goodput_tokens_per_s'), '{:.1f}')} @ {m.get('peak_goodput_devices')}"
        lines.append(f"| {mode} | {cap} | {_f(g, '{:.1f}')} | {peak} | "
                     f"{_f(m['mean_wasted_draft_ms_per_request'], '{:.0f}')} | "
                     f"{_f(m['mean_verifier_utilisation'], '{:.2f}')} |")
    lines += ["", "## Per device count", "",
              "| mode | devices | seeds | requests | SLO att. [95%] | goodput tok/s [95%] | "
              "TTFT p90 ms | TPOT mean ms | TPOT p90 ms | accept | waste ms/req | util | refused | "
              "batch rows | est. MAPE |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, m in summary["modes"].items():
        for p in m["points"]:
            lines.append(
                f"| {mode} | {p['devices']} | {p.get('seeds', 1)} | {p['requests']} | "
                f"{_with_ci(p, 'slo_attainment', '{:.3f}')} | "
                f"{_with_ci(p, 'goodput_tokens_per_s', '{:.1f}')} | {_f(p['ttft_p90_ms'], '{:.0f}')} | "
                f"{_f(p['tpot_mean_ms'], '{:.0f}')} | {_f(p['tpot_p90_ms'], '{:.0f}')} | "
                f"{_f(p['acceptance_rate'])} | {_f(p['wasted_draft_ms_per_request'], '{:.0f}')} | "
                f"{_f(p['verifier_utilisation'])} | {p.get('refused', 0)} | "
                f"{_f(p.get('mean_batch_rounds'), '{:.1f}')} | {_f(p.get('estimator_mape'))} |")
    n = breakdown_devices(summary)
    lines += ["", f"## Where a round's time goes ({n} devices)", "",
              "| mode | drafting ms | network ms | queueing ms | verification ms | committed tokens/round |",
              "|---|---:|---:|---:|---:|---:|"]
    for mode, m in summary["modes"].items():
        p = _point(m, n)
        if p is None:
            continue
        b = p["breakdown"]
        acc = p.get("mean_accepted_per_round")
        commit = 1.0 + (acc if acc is not None and acc == acc else 0.0)
        lines.append(f"| {mode} | {_f(b['drafting_ms'], '{:.1f}')} | {_f(b['network_ms'], '{:.1f}')} | "
                     f"{_f(b['queueing_ms'], '{:.1f}')} | {_f(b['verification_ms'], '{:.1f}')} | "
                     f"{_f(commit)} |")
    classes = sorted({c for m in summary["modes"].values() for p in m["points"]
                      for c in (p.get("attainment_by_class") or {})})
    if classes and n is not None:
        lines += ["", f"## SLO attainment by device class ({n} devices)", "",
                  "| mode | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for mode, m in summary["modes"].items():
            p = _point(m, n)
            if p is None:
                continue
            by = p.get("attainment_by_class") or {}
            lines.append(f"| {mode} | " + " | ".join(_f(by.get(c)) for c in classes) + " |")
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines.append(f"![{p.stem}]({p.name})")
            lines.append("")
    notes = summary["assets"].get("notes") or []
    lines += ["", "## Setting", "",
              f"- Devices: {', '.join(f'{k} {v:g}' for k, v in cfg['devices']['mix'].items())}"
              " (tokens/s: " + ", ".join(f"{k} {c['draft_tokens_per_s']:g}"
                                         for k, c in cfg['devices']['classes'].items()) + ")",
              f"- Users: {cfg['workload']['users']}, think time {cfg['workload']['think_s']:g} s; "
              f"workload {summary['assets'].get('workload')}; "
              f"max_new_tokens {cfg['workload']['max_new_tokens']}",
              f"- Server: {cfg['server']['verifiers']} verifier(s), KV capacity "
              f"{cfg['server']['kv_tokens'] or 'unlimited'} tokens each, timing {cfg['server']['timing']}",
              "- Modes: " + "; ".join(
                  f"{m}: k={c['draft_k']}, batch<={c['max_batch_size']}, admission={c['admission']}"
                  + (f", loop={c['loop']}" if m == "centralized" else "")
                  for m, c in cfg["modes"].items()),
              ]
    for note in notes:
        lines.append(f"- Note: {note}")
    lines.append("")
    return "\n".join(lines)


def _with_ci(p: dict[str, Any], key: str, fmt: str) -> str:
    ci = p.get(f"{key}_ci")
    if not ci or p.get("seeds", 1) <= 1 or ci[0] is None or ci[1] is None:
        return _f(p.get(key), fmt)
    return f"{_f(p.get(key), fmt)} [{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"


def _assets_line(summary: dict[str, Any]) -> str:
    a = summary["assets"].get("acceptance", {})
    src = a.get("source")
    if src == "traces":
        return (f"replayed traces `{a.get('path')}` ({a.get('sequences')} requests, {a.get('positions')} "
                f"positions, draft/target match rate {a.get('match_rate')})")
    return f"synthetic model (match rate {a.get('match_rate')}; no recorded traces)"


def write_report(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    sp = out / "summary.json"
    sp.write_text(json.dumps(clean_json(summary), indent=1, default=_json_default))
    plots = write_plots(summary, out)
    rp = out / "report.md"
    rp.write_text(render_report(summary, plots))
    return {"summary": sp, "report": rp, **{p.stem: p for p in plots}}


def clean_json(o: Any) -> Any:
    """``o`` with NaN and infinities replaced by None (strict JSON)."""
    if isinstance(o, float):
        return None if (math.isnan(o) or math.isinf(o)) else o
    if isinstance(o, dict):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean_json(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return None
    return str(o)
