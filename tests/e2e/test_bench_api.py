"""`wisp-cli bench-api`: the same requests through the HTTP API (a gateway process) and the
Redis path on one system with null engines, written as JSON. Tiny settings, shape only: no
timing is asserted (the figures depend on the machine)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.harness import cli

FIGURES = ("e2e_ms", "ttft_ms", "tpot_ms", "itl_ms", "server_e2e_ms", "outside_drafter_ms")


def test_bench_api_serves_every_request_through_both_paths(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))  # no model needed
    out = tmp_path / "api.json"
    res = cli(["bench-api", "--concurrency", "1,3", "--requests", "4", "--max-new-tokens", "6",
               "--prompts", "4", "--out", str(out)], env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["config"]["concurrency"] == [1, 3] and data["config"]["null_models"] is True
    assert data["hardware"]["os_cpu_count"] >= 1 and data["command"].startswith("wisp-cli bench-api")
    rows = {(r["concurrency"], r["path"]): r for r in data["results"]}
    assert set(rows) == {(c, p) for c in (1, 3) for p in ("redis", "api")}
    for key, r in rows.items():
        assert r["requests"] == r["ok"] == 4 and r["failed"] == 0, (key, r["errors"])
        assert r["tokens"] == 4 * 6, key  # null engines run every request to max_new_tokens
        for fig in FIGURES:
            assert set(r[fig]) == {"p50", "p99", "mean"}, (key, fig)
        assert r["e2e_ms"]["p50"] > 0 and r["server_e2e_ms"]["p50"] is not None
    assert [a["concurrency"] for a in data["added"]] == [1, 3]
    for a in data["added"]:
        assert all(a[fig]["p50"] is not None for fig in ("e2e_ms", "tpot_ms")), a
    samples = data["samples"]
    assert len(samples) == 16 and all(s["ok"] and s["phase"] in (0, 1) for s in samples)
    assert "added (api - redis)" in res.stdout  # the table
