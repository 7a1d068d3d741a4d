"""`wisp-cli bench` runs each mode through the same services on the same prompts and writes
the table's numbers as JSON (tiny models, a few seconds per mode)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.harness import cli


def test_bench_two_modes_side_by_side(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    target, draft = tiny_pair
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "bench.json"
    res = cli(["bench", "--mode", "sled,centralized", "--devices", "3", "--duration", "6",
               "--max-new-tokens", "8", "--tpot-slo-ms", "5000", "--ttft-slo-ms", "20000",
               "--target-model", str(target), "--draft-model", str(draft), "--prompts", "6",
               "--out", str(out)], env, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["mode"]: r for r in data["results"]}
    assert set(rows) == {"sled", "centralized"}
    for mode, r in rows.items():
        assert r["requests"] >= 3 and r["failed_requests"] == 0 and r["stream_mismatches"] == 0
        assert 0.0 <= r["slo_attainment"] <= 1.0
        assert r["throughput_tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
        assert r["goodput_tokens_per_s"] <= r["throughput_tokens_per_s"] + 1e-9
        for key in ("tpot_p90_ms", "ttft_p99_ms", "acceptance_rate", "wasted_draft_ms_per_request",
                    "overhead_p99_ms", "redis_used_memory_mb_after"):
            assert key in r, (mode, key)
    assert rows["sled"]["drafted_tokens"] > 0 and rows["centralized"]["drafted_tokens"] == 0
    assert "centralized" in res.stdout and "sled" in res.stdout  # the table
