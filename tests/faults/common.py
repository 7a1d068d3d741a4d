"""What the fault tests share: run a batch of greedy requests while a fault is injected, and
check every answer against the target's own greedy output and the tokens actually delivered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import redis
from wisp.bus import Bus, Keys, wait_for_redis
from wisp.client import submit
from wisp.protocol import TokenEvent

from tests.reference import greedy_reference, load_target

MAX_NEW = 32
FAST = {"reclaim_interval_s": 0.5, "reclaim_idle_ms": 1500, "heartbeat_ttl_s": 2.0,
        "heartbeat_s": 0.5, "max_wait_ms": 5, "batch_timeout_s": 5}
Result = tuple[list[int], list[int], list[int]]


def run_with_fault(url: str, ns: str, prompts: list[str], fault: Callable[[], None]) -> list[Result]:
    """Submit all prompts concurrently; call ``fault`` (blocking) while they run."""

    async def main() -> list[Result]:
        client = await wait_for_redis(url)
        bus = Bus(client, Keys(ns))

        async def one(p: str) -> Result:
            delivered: list[int] = []

            def on(ev: object) -> None:
                if isinstance(ev, TokenEvent):
                    delivered.extend(ev.token_ids)

            done = await submit(bus, p, on_event=on, max_new_tokens=MAX_NEW, idle_timeout_s=120)
            return delivered, done.token_ids, done.prompt_token_ids

        try:
            task = asyncio.gather(*(one(p) for p in prompts))
            await asyncio.to_thread(fault)
            return await task
        finally:
            await client.aclose()

    return asyncio.run(main())


def assert_lossless(results: list[Result], target: Path) -> None:
    ref = load_target(target)
    for delivered, done_ids, prompt_ids in results:
        want = greedy_reference(ref, prompt_ids, MAX_NEW)
        assert done_ids == want
        assert delivered == want


def wait_until(pred: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def heartbeats(r: redis.Redis, ns: str) -> dict[str, dict]:
    out = {}
    for key in r.scan_iter(match=f"{ns}:hb:*"):
        raw = r.get(key)
        if raw:
            info = json.loads(raw)
            out[info["name"]] = info
    return out


def committed_tokens(r: redis.Redis, ns: str) -> int:
    n = 0
    for key in r.scan_iter(match=f"{ns}:sess:*"):
        raw = r.get(key)
        if raw and raw.startswith(b"{"):
            n += len(json.loads(raw)["generated"])
    return n


