"""A paced consumer (``Consumer.pace_s``) reads what arrived while it waited in one read, and
loses nothing: real Redis, a real ``Service`` running one declared batch consumer."""

from __future__ import annotations

import asyncio
import time

from wisp.bus import Bus, Entry
from wisp.protocol import GenerateRequest
from wisp.service import Consumer, Service
from wisp.settings import Settings


class Paced(Service):
    role = "probe"

    def __init__(self, settings: Settings, bus: Bus, pace_s: float) -> None:
        super().__init__(settings, bus, "paced-1")
        self.pace_s = pace_s
        self.reads: list[list[str]] = []

    def consumers(self) -> list[Consumer]:
        return [Consumer(self.keys.stats, "g", GenerateRequest, batch=self.on_entries,
                         pace_s=self.pace_s)]

    async def on_entries(self, entries: list[Entry[GenerateRequest]]) -> None:
        self.reads.append([e.msg.request_id for e in entries])


async def _reads_for(bus: Bus, pace_s: float) -> list[list[str]]:
    """One entry, then (once it was read) 19 more published 10 ms apart: a consumer paced longer
    than they take reads them together; an unpaced one reads them as they come."""
    svc = Paced(Settings(block_ms=200, heartbeat_s=0.5), bus, pace_s)
    task = asyncio.create_task(svc.run())
    try:
        for _ in range(200):
            if svc.ready:
                break
            await asyncio.sleep(0.05)
        ids = [f"paced-{int(pace_s * 1000):04d}-{i:04d}" for i in range(20)]

        async def publish(rid: str) -> None:
            await bus.publish(bus.keys.stats, GenerateRequest(request_id=rid, prompt="a",
                                                              submitted_ts=1.0))

        await publish(ids[0])
        for _ in range(200):
            if svc.reads:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        for rid in ids[1:]:
            await publish(rid)
            await asyncio.sleep(0.01)
        span = time.monotonic() - started
        for _ in range(400):
            if sum(len(r) for r in svc.reads) >= len(ids):
                break
            await asyncio.sleep(0.05)
        assert [rid for r in svc.reads for rid in r] == ids  # every entry, once, in order
        if pace_s:
            assert span < pace_s, f"publishing took {span:.2f} s, longer than the pause"
        return svc.reads
    finally:
        svc.stop()
        await asyncio.wait_for(task, 30)


async def test_a_paced_consumer_reads_in_batches_and_loses_nothing(bus: Bus) -> None:
    # what came during the pause (19 entries over ~0.2 s, well inside 3 s) is one read
    assert len(await _reads_for(bus, 3.0)) == 2
    # the same stream unpaced: a read per entry or so (so the count above is the pacing's)
    assert len(await _reads_for(bus, 0.0)) > 2
