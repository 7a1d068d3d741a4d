"""Trace rows through the live system: in-process services with tiny models on a real Redis,
tracing on; rows land in ``wisp:trace`` with the right labels and pre-round acceptance."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from wisp.data import mixed_prompts
from wisp.protocol import TraceRow, decode
from wisp.services.runner import connect, run_services
from wisp.settings import Settings
from wisp.trace import record

ROLES = ["estimator", "scheduler", "verifier", "drafter"]
K = 5
MAX_NEW = 16


@pytest.fixture
def serial_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The drafter and the verifier load their models on two threads of one process here;
    serialise the loads so the test does not depend on from_pretrained being thread-safe."""
    from wisp import models

    lock = threading.Lock()
    real = models.load_model

    def load(name: str, settings: Settings):  # type: ignore[no-untyped-def]
        with lock:
            return real(name, settings)

    monkeypatch.setattr(models, "load_model", load)


async def test_trace_rows_land_with_correct_labels(
    redis_url: str, namespace: str, tiny_pair: tuple[Path, Path], serial_model_loads: None
) -> None:
    target, draft = tiny_pair
    settings = Settings(redis_url=redis_url, namespace=namespace, mode="sled", draft_k=K,
                        trace=True, draft_model=str(draft), target_model=str(target),
                        max_wait_ms=1, block_ms=50, torch_threads=1)
    prompts = mixed_prompts(3)
    stop = asyncio.Event()
    out: dict = {}

    async def ready(_services: list) -> None:
        bus = await connect(settings, redis_url)
        try:
            out["rows"], out["reqs"] = await record(bus, prompts, k=K, max_new_tokens=MAX_NEW)
            out["stream"] = await bus.redis.xrange(bus.keys.trace)
        except Exception as err:  # noqa: BLE001 - asserted below
            out["error"] = err
        finally:
            await bus.redis.aclose()
            stop.set()

    await asyncio.wait_for(run_services(ROLES, settings, redis_url, on_ready=ready, stop=stop), 180)
    assert "error" not in out, out.get("error")
    rows, reqs = out["rows"], out["reqs"]
    stream = [decode(TraceRow, fields[b"d"]) for _id, fields in out["stream"]]
    assert len(stream) == len(rows) > 0
    assert stream[0].KIND == "trace" and namespace.startswith("wisp-test-")

    by_round: dict[tuple[str, int], list[TraceRow]] = defaultdict(list)
    for r in stream:
        by_round[(r.request_id, r.round)].append(r)
    rejected_rounds = 0
    for req in reqs:
        mine = {rnd: sorted(rs, key=lambda x: x.position)
                for (rid, rnd), rs in by_round.items() if rid == req.request_id}
        assert mine, "every request drafted, so every request has rows"
        assert set(mine) <= set(range(req.rounds))
        drafted = accepted = 0
        ema = 1.0
        for rnd in sorted(mine):
            rs = mine[rnd]
            d, a = rs[0].drafted, rs[0].accepted
            assert all(x.drafted == d and x.accepted == a for x in rs)
            assert [x.position for x in rs] == list(range(min(a, d - 1) + 1))
            for x in rs:
                assert x.position <= x.accepted
                assert x.label == (1 if x.position == x.accepted else 0)
            rejected_rounds += a < d
            assert (a < d) == (rs[-1].label == 1)
            # the acceptance a row carries is the session's EMA *before* its round
            assert rs[0].recent_acceptance == pytest.approx(ema)
            ema = 0.7 * ema + 0.3 * a / d
            drafted += d
            accepted += a
        assert (drafted, accepted) == (req.drafted, req.accepted)
        assert len(req.token_ids) == MAX_NEW or req.finish_reason == "stop"
    assert rejected_rounds > 0  # tiny draft and target disagree often: labels 1 are exercised
