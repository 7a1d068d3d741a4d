"""A paced consumer (``Consumer.pace_s``) reads what arrived while it waited in one read, and
loses nothing: real Redis, a real ``Service`` running one declared batch consumer."""

from __future__ import annotations

import asyncio

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
    svc = Paced(Settings(block_ms=200, heartbeat_s=0.5), bus, pace_s)
    task = asyncio.create_task(svc.run())
    try:
        for _ in range(200):
            if svc.ready:
                break
            await asyncio.sleep(0.05)
        ids = [f"paced-{int(pace_s * 1000):04d}-{i:04d}" for i in range(20)]
        for rid in ids:  # one entry every 10 ms, for 200 ms
            await bus.publish(bus.keys.stats, GenerateRequest(request_id=rid, prompt="a",
                                                              submitted_ts=1.0))
            await asyncio.sleep(0.01)
        for _ in range(200):
            if sum(len(r) for r in svc.reads) >= len(ids):
                break
            await asyncio.sleep(0.05)
        assert [rid for r in svc.reads for rid in r] == ids  # every entry, once, in order
        return svc.reads
    finally:
        svc.stop()
        await asyncio.wait_for(task, 30)


async def test_a_paced_consumer_reads_in_batches_and_loses_nothing(bus: Bus) -> None:
    paced = await _reads_for(bus, 0.1)
    assert len(paced) <= 5, paced  # 200 ms of entries: about one read per 100 ms
    # the same stream unpaced: about a read per entry (so the bound above is the pacing's)
    assert len(await _reads_for(bus, 0.0)) > 5
