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


def test_null_models_bench_measures_the_pipeline_beside_the_raw_chain(tmp_path: Path) -> None:
    """`wisp-cli bench --null-models`: the four real services over real Redis with engines that
    answer at once; per-round overhead read back from the streams, next to the bare 4-hop chain
    measured in the same command (no model is prepared or loaded for this)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))  # no model in the cache
    out = tmp_path / "null.json"
    res = cli(["bench", "--null-models", "--devices", "1,4", "--duration", "2", "--out", str(out)],
              env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["devices"]: r for r in data["results"]}
    assert set(rows) == {1, 4} and data["config"]["hops"] == 4 and data["load_avg_before"]
    for r in rows.values():
        assert r["requests"] >= 1 and r["failed_requests"] == 0 and r["rounds"] >= 10
        assert 0 < r["pipeline_p50_ms"] <= r["pipeline_p99_ms"]
        assert 0 < r["raw_chain_p50_ms"] <= r["raw_chain_p99_ms"] and r["p99_vs_raw"] > 0
        assert set(r["segments_p50_ms"]) == {"drafter->estimator", "estimator->scheduler->batch",
                                             "batch->verifier", "verifier->drafter->next block"}
    assert rows[1]["target"] == "p99 <= 5 ms" and isinstance(rows[1]["target_met"], bool)
    assert rows[4]["target"] == "p99 <= 4x raw" and isinstance(rows[4]["target_met"], bool)
    assert "raw 4-hop p99 ms" in res.stdout  # the table
