"""The benchmark tells a refusal from a failure: a request that admission control declines
(wisp mode, an SLO no verifier can meet) is counted in ``refused_requests`` and as an SLO miss,
not in ``failed_requests``, which is kept for requests the system took and did not answer
(before, every refusal was reported as a failure, so wisp looked broken under overload).
Real services with the null engines on an embedded Redis."""

from __future__ import annotations

import asyncio

from wisp.bench import BenchConfig, run_bench
from wisp.services.runner import with_services
from wisp.settings import Settings


async def test_refusals_are_counted_apart_from_failures() -> None:
    settings = Settings(null_models=True, mode="wisp", max_wait_ms=0.0)
    async with with_services(settings) as system:
        await asyncio.sleep(1.5)  # the scheduler's load snapshot, which admission reads
        cfg = BenchConfig(devices=2, duration_s=3.0, max_new_tokens=8, ttft_slo_ms=0.01,
                          tpot_slo_ms=0.01, prompts=("x " * 30,), retry_s=0.1)
        res = (await run_bench(system.bus, "wisp", cfg)).as_dict()
    assert res["refused_requests"] > 0, res
    assert res["failed_requests"] == 0, res["errors"]
    assert all("time to first token" in r or "overloaded" in r or "SLO" in r
               for r in res["refusals"]), res["refusals"]
    assert res["slo_attainment"] == 0.0
