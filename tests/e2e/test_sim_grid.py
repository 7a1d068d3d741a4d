"""`wisp-cli sim grid --quick` as a real process: one cell of the capacity grid (4 modes, 2 seeds,
a 60 s window), its grid.json schema, the heatmap and report, and `--resume` skipping the cell
it finished; a bad flag value is one line saying what to fix."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.harness import cli

MODES = ("wisp", "sled", "centralized", "sled+prefill")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.timeout(600)
def test_quick_grid_writes_its_outputs_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    t0 = time.monotonic()
    res = cli(["sim", "grid", "--quick", "--out", str(out)], _env(), timeout=500)
    first_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "grid.json").read_text())
    assert doc["command"].startswith("wisp-cli sim grid") and "--quick" in doc["command"]
    assert doc["scenario"]["scenario"]["name"] == "paper"
    assert doc["scenario"]["scenario"]["duration_s"] == 40.0  # the quick window reached the scenario
    p = doc["parameters"]
    assert p["seeds"] == 2 and p["quick"] is True and p["kv_tokens"] == [30000]
    assert set(p) >= {"device_mixes", "acceptance", "engines", "modes", "duration_s", "search", "jobs"}
    (cell,) = doc["cells"]
    assert {"kv_tokens", "device_mix", "acceptance", "engine", "capacity", "goodput_at_baseline_capacity",
            "ratio_vs_best_baseline", "ratio_range", "regime", "bound"} <= set(cell)
    assert (cell["kv_tokens"], cell["device_mix"], cell["acceptance"]) == (30000, "paper", 0.0)
    assert set(cell["capacity"]) == set(MODES)
    for m in MODES:
        cap = cell["capacity"][m]
        assert {"mean", "lo", "hi"} <= set(cap)
        # each mode's search bracketed its crossing: a capacity well inside the evaluated counts
        assert cap["status"]["mean"] == "crossed" and 5 < cap["mean"] < 500, (m, cap)
        assert cap["evaluated"] >= 2
        assert all(len(pt["slo_attainment_seeds"]) == 2 for pt in cell["points"][m])
    best = cell["goodput_at_baseline_capacity"]
    assert best["baseline"] in ("centralized", "sled") and best["devices"] >= 1
    assert all(best[m]["mean"] > 0 for m in MODES)  # every mode was run at that count
    wisp, base = cell["capacity"]["wisp"]["mean"], cell["capacity"][best["baseline"]]["mean"]
    assert cell["ratio_vs_best_baseline"] == pytest.approx(wisp / base)
    assert base >= cell["capacity"]["sled" if best["baseline"] == "centralized" else "centralized"]["mean"]
    assert len(cell["ratio_range"]) == 2
    assert cell["regime"] in ("device", "kv", "compute", "memory")
    assert cell["bound"]["ratio"] > 0 and cell["bound"]["tau"] > 1
    report = (out / "report.md").read_text()
    assert "grid.png" in report and "wisp-cli sim grid" in report and "| 30000 | paper |" in report
    assert (out / "grid.png").stat().st_size > 1000
    assert first_s < 300  # "well under a minute" on an idle machine; shared CI cores are slower

    # --resume: the finished cell is kept as it was, nothing is simulated again
    t1 = time.monotonic()
    again = cli(["sim", "grid", "--quick", "--out", str(out), "--resume"], _env(), timeout=300)
    resumed_s = time.monotonic() - t1
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped (finished in an earlier run)" in again.stderr
    doc2 = json.loads((out / "grid.json").read_text())
    assert doc2["cells"] == doc["cells"]
    assert resumed_s < first_s

    # another run's parameters cannot be resumed into this folder
    other = cli(["sim", "grid", "--quick", "--seeds", "3", "--out", str(out), "--resume"], _env(),
                timeout=120)
    assert other.returncode == 1 and "other settings" in other.stderr


def test_bad_grid_flags_are_one_line_errors(tmp_path: Path) -> None:
    for args, says in ((["--kv", "30k"], "--kv"), (["--mixes", "medium"], "slow, paper, fast"),
                       (["--acceptance", "1.5"], "[0, 1)"), (["--modes", "wisp,eagle"], "sled+prefill")):
        res = cli(["sim", "grid", "--quick", "--out", str(tmp_path / "g"), *args], _env(), timeout=120)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode != 0 and len(lines) == 1 and says in lines[0], res.stderr
