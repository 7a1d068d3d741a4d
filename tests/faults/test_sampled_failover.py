"""Same seed, same output: for another request, and across a drafter failover, when sampling.

A seeded, sampled request (temperature 0.5, 32 new tokens, the tiny pair: acceptance is well
inside (0, 1) there, so rounds accept some drafted tokens and reject others) runs once normally
on drafter d1; then a second request with another request id and the same prompt and seed runs
with d1 killed (SIGKILL) mid-request, so that d2 adopts the session and re-drafts the round in
flight. Randomness is derived from (seed, the committed prefix, round, role)
(``specdec.round_generator``), not from the request, so both must produce the same tokens, token
for token, and the client must receive each exactly once. (Keyed by the request id, as it was
before, the second request sampled other tokens from its first draw on.)

It can fail: ``WISP_TEST_SABOTAGE=seed-by-process`` makes the drafter's randomness depend on its
process (``tests/sabotage.py``), and the resumed run then differs from the normal one.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from wisp.client import new_request_id

from tests import sabotage
from tests.faults.common import FAST
from tests.harness import Cluster, clean_namespace
from tests.reference import greedy_reference, load_target, mass_between

PROMPT = "Write a haiku about Redis streams."
TEMPERATURE = 0.5
MAX_NEW = 32
SEED = 20240607
KILL_AFTER = 6
"""Kill d1 once its session has committed at least this many tokens (and fewer than MAX_NEW)."""


def _submit(url: str, ns: str, request_id: str, seed: int) -> tuple[list[int], Any]:
    """One request on device d1; returns (tokens delivered to the client, DoneEvent)."""
    from wisp.bus import Bus, Keys, wait_for_redis
    from wisp.client import submit
    from wisp.protocol import TokenEvent

    async def main() -> tuple[list[int], Any]:
        client = await wait_for_redis(url)
        delivered: list[int] = []

        def on(ev: object) -> None:
            if isinstance(ev, TokenEvent):
                delivered.extend(ev.token_ids)

        try:
            done = await submit(Bus(client, Keys(ns)), PROMPT, device="d1", on_event=on,
                                request_id=request_id, seed=seed, temperature=TEMPERATURE,
                                max_new_tokens=MAX_NEW, chat_template=False, idle_timeout_s=90,
                                ttft_slo_ms=600_000, tpot_slo_ms=600_000)
        finally:
            await client.aclose()
        return delivered, done

    return asyncio.run(main())


def _session(r: redis.Redis, ns: str, request_id: str) -> dict[str, Any] | None:
    raw = r.get(f"{ns}:sess:{request_id}")
    return json.loads(raw) if raw and raw.startswith(b"{") else None


def test_sampled_request_survives_drafter_failover_with_the_same_output(
    redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sabotaged = sabotage.install(tmp_path / "sabotage", monkeypatch)
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    # the verifier sleeps after each batch, so 32 tokens take a few seconds: time to kill d1
    c = Cluster(redis_url, ns, tmp_path, settings={
        "mode": "sled", "target_model": target, "draft_model": draft, "draft_k": 4,
        "fault_delay_ms": 150, **FAST})
    r = redis.Redis.from_url(redis_url)
    rid = new_request_id()
    killed_at: list[int] = []

    def kill_d1_mid_request() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            st = _session(r, ns, rid)
            if st and st["device"] == "d1" and KILL_AFTER <= len(st["generated"]) < MAX_NEW:
                c.kill("d1", signal.SIGKILL)
                killed_at.append(len(st["generated"]))
                return
            time.sleep(0.01)
        raise AssertionError("d1 never got mid-way through the request")

    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                               ("drafter", "d1"), ("drafter", "d2")):
                c.start(role, name)
            c.wait_ready(["e", "s", "v", "d1", "d2"])
            # 1. normally, on d1
            normal_delivered, normal = _submit(redis_url, ns, rid, SEED)
            # 2. another request (a new id) with the same prompt and seed
            _, again = _submit(redis_url, ns, new_request_id(), SEED)
            # 3. and another, with d1 killed mid-way: d2 adopts it
            rid = new_request_id()
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(_submit, redis_url, ns, rid, SEED)
                kill_d1_mid_request()
                failover_delivered, failover = running.result(timeout=180)
            d2_log = c.log("d2")
    finally:
        r.close()
        clean_namespace(redis_url, ns)
    print(f"\nsabotage={sabotaged} killed d1 after {killed_at} of {MAX_NEW} tokens; "
          f"normal: {normal.accepted_tokens}/{normal.drafted_tokens} accepted, "
          f"failover: {failover.accepted_tokens}/{failover.drafted_tokens} accepted, "
          f"device {failover.device}\nnormal   {normal.token_ids}\nfailover {failover.token_ids}")
    # the fault really happened mid-request and d2 finished the session
    assert killed_at and 0 < killed_at[0] < MAX_NEW
    assert "resumed session" in d2_log
    assert normal.device == "d1" and failover.device == "d2"
    # sampling really happened: drafts were both accepted and rejected, and the answer is not
    # the greedy one
    assert 0 < normal.accepted_tokens < normal.drafted_tokens
    assert normal.token_ids != greedy_reference(load_target(target), normal.prompt_token_ids,
                                                MAX_NEW)
    assert len(normal.token_ids) == MAX_NEW and normal.finish_reason == "length"
    # every token reached the client exactly once, in order
    assert normal_delivered == normal.token_ids
    assert failover_delivered == failover.token_ids
    # same seed and prompt, same output, token for token, in another request and across the
    # failover, up to a draw that fell on an inverse-CDF
    # boundary: the survivor recomputes the prefix in one forward where the first drafter's
    # verifier used its cache, and float rounding can move such a draw to a neighbouring id (a
    # CI run: 18880 -> 18878 at index 27). A wrong sampler lands anywhere in a near-uniform
    # vocabulary, with real mass between the two ids.
    for other, what in ((again, "another request with the same prompt and seed"),
                        (failover, "the same prompt and seed in another request, with a "
                                   "drafter failover,")):
        _same_draws(target, normal, other, what)


def _same_draws(target: Path, normal: Any, other: Any, what: str) -> None:
    """``other`` sampled ``normal``'s tokens, up to a draw on an inverse-CDF boundary."""
    a, b = other.token_ids, normal.token_ids
    if a != b:
        first = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        between = mass_between(load_target(target), list(normal.prompt_token_ids) + b[:first],
                               a[first], b[first], TEMPERATURE)
        assert between < 1e-3, (
            f"{what} sampled another output at index "
            f"{first} ({b[first]} -> {a[first]}, {between:.3g} of mass between)")
