"""One drafter serving many sessions drafts their rounds together (``DraftEngine.draft_many``)
and stays lossless: all four services in this process on a real Redis, tiny models, greedy,
in sled (fixed k) and wisp (learned stop rule, so rows of one batch stop at different lengths)
mode."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from wisp.data import mixed_prompts
from wisp.services.runner import connect, run_services
from wisp.settings import Settings

from tests.reference import greedy_reference, load_target

MAX_NEW = 16
SESSIONS = 8
TINY_CONTROLLER = Path(__file__).resolve().parents[2] / "docs" / "results" / "tiny-controller.json"
"""The controller trained for the tiny pair of ``make_tiny_pair(seed=0)`` (results.md §5)."""


@pytest.mark.parametrize("mode", ["sled", "wisp"])
async def test_one_drafter_many_sessions_batches_and_is_lossless(
    redis_url: str, namespace: str, tiny_pair: tuple[Path, Path], mode: str
) -> None:
    target, draft = tiny_pair
    extra = {"controller": TINY_CONTROLLER} if mode == "wisp" else {}
    settings = Settings(mode=mode, namespace=namespace, draft_model=str(draft),
                        target_model=str(target), draft_k=4, max_wait_ms=30, torch_threads=1,
                        **extra)
    prompts = [p.text for p in mixed_prompts(SESSIONS)]
    stop = asyncio.Event()
    got: dict[str, Any] = {}

    async def ready(services: list[Any]) -> None:
        from wisp.client import submit

        bus = await connect(settings, redis_url)
        try:
            got["drafter"] = drafter = next(s for s in services if s.role == "drafter")
            if mode == "wisp":  # the learned stop rule, not a fixed-k fallback
                assert type(drafter.policy).__name__ == "LearnedController"
                drafter.policy = got["spy"] = _SeesRoundTrip(drafter.policy)
            got["done"] = await asyncio.gather(*(
                submit(bus, p, max_new_tokens=MAX_NEW, ttft_slo_ms=60_000, tpot_slo_ms=60_000)
                for p in prompts))
        finally:
            await bus.redis.aclose()
            stop.set()

    await asyncio.wait_for(
        run_services(["estimator", "scheduler", "verifier", "drafter"], settings, redis_url,
                     on_ready=ready, stop=stop), timeout=300)
    ref = load_target(target)
    for done in got["done"]:
        assert done.token_ids == greedy_reference(ref, done.prompt_token_ids, MAX_NEW)
    assert sum(d.drafted_tokens for d in got["done"]) > 0
    # the verifier batches rounds of several sessions, so their verdicts come back together
    # and the drafter drafts those sessions' next rounds in one batched call
    assert got["drafter"].counters.get("batched_drafts", 0) >= 3, got["drafter"].counters
    if mode == "wisp":
        # the controller's goodput rule weighs each session's measured round trip (the time a
        # round spends outside drafting and verifying), not only the figure in its file
        trips = got["spy"].trips
        measured = [t for t in trips if t is not None]
        # every session drafts at least three rounds (16 tokens, at most 9 a round after its
        # undrafted first): the third is planned after a drafted verdict measured the trip
        assert len(measured) >= SESSIONS and all(t >= 0 for t in measured), trips
        assert max(measured) > 0, trips


class _SeesRoundTrip:
    """The drafter's policy, wrapped: records the round trip each plan is given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name = inner, inner.name
        self.trips: list[float | None] = []

    def plan(self, stats: Any, budget: int) -> Any:
        self.trips.append(stats.round_trip_ms)
        return self.inner.plan(stats, budget)
