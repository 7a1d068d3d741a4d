"""The stream bus against a real Redis: typed round trip, dead letters, restart recovery."""

from __future__ import annotations

import json

from wisp.bus import FIELD, Bus
from wisp.protocol import DeadLetter, GenerateRequest, decode


def _req(i: int) -> GenerateRequest:
    return GenerateRequest(request_id=f"req-{i:08d}", prompt=f"p{i}", submitted_ts=1.0)


async def test_publish_read_ack(bus: Bus) -> None:
    s = bus.keys.requests
    for i in range(3):
        await bus.publish(s, _req(i))
    got = await bus.read(s, "g", "c1", GenerateRequest, count=10, block_ms=10)
    got += await bus.read(s, "g", "c1", GenerateRequest, count=10, block_ms=10)
    assert [e.msg.request_id for e in got] == [f"req-{i:08d}" for i in range(3)]
    info = await bus.redis.xpending(s, "g")
    assert info["pending"] == 3  # nothing acked yet
    await bus.ack(s, "g", *[e.entry_id for e in got])
    assert (await bus.redis.xpending(s, "g"))["pending"] == 0


async def test_malformed_entries_are_dead_lettered_and_good_ones_flow(bus: Bus) -> None:
    s = bus.keys.requests
    await bus.redis.xadd(s, {FIELD: b"{not json"})
    await bus.redis.xadd(s, {FIELD: json.dumps({"version": 7, "kind": "request"})})
    await bus.redis.xadd(s, {b"other": b"x"})
    await bus.publish(s, _req(1))
    got = []
    for _ in range(3):
        got += await bus.read(s, "g", "c", GenerateRequest, count=10, block_ms=10)
    assert [e.msg.request_id for e in got] == ["req-00000001"]
    dead = [decode(DeadLetter, f[FIELD]) for _, f in await bus.redis.xrange(bus.keys.dead)]
    reasons = [d.reason for d in dead]
    assert len(dead) == 3
    assert any("undecodable" in r or "invalid" in r for r in reasons)
    assert any("unsupported protocol version 7" in r for r in reasons)
    assert any("missing payload" in r for r in reasons)
    assert all(d.stream == s and d.group == "g" for d in dead)
    # dead-lettered entries were acked: only the good one is pending
    assert (await bus.redis.xpending(s, "g"))["pending"] == 1


async def test_restarted_consumer_rereads_its_pending_entries(bus: Bus) -> None:
    s = bus.keys.draft
    await bus.publish(s, _req(5))
    first = await bus.read(s, "g", "worker", GenerateRequest, block_ms=10)
    first += await bus.read(s, "g", "worker", GenerateRequest, block_ms=10)
    assert len(first) == 1
    # the process dies before acking; a new Bus with the same consumer name starts up
    again = Bus(bus.redis, bus.keys)
    got = await again.read(s, "g", "worker", GenerateRequest, block_ms=10)
    assert [e.entry_id for e in got] == [first[0].entry_id]


async def test_group_recreated_after_stream_deleted(bus: Bus) -> None:
    s = bus.keys.stats
    await bus.publish(s, _req(1))
    assert len(await bus.read(s, "g", "c", GenerateRequest, block_ms=10)) == 1
    await bus.redis.delete(s)
    assert await bus.read(s, "g", "c", GenerateRequest, block_ms=10) == []  # NOGROUP recovered
    await bus.publish(s, _req(2))
    got = await bus.read(s, "g", "c", GenerateRequest, block_ms=10)
    assert [e.msg.request_id for e in got] == ["req-00000002"]


async def test_streams_are_trimmed(bus: Bus) -> None:
    small = Bus(bus.redis, bus.keys, maxlen=100)
    for i in range(1000):
        await small.publish(bus.keys.annotated, _req(i))
    assert await bus.redis.xlen(bus.keys.annotated) < 300


async def test_lease_has_one_holder(bus: Bus) -> None:
    assert await bus.acquire_lease("scheduler", "a", 5)
    assert not await bus.acquire_lease("scheduler", "b", 5)
    assert await bus.acquire_lease("scheduler", "a", 5)  # renew
    await bus.release_lease("scheduler", "a")
    assert await bus.acquire_lease("scheduler", "b", 5)


async def test_reclaim_takes_over_idle_entries_and_dead_letters_poison(bus: Bus) -> None:
    s = bus.keys.requests
    await bus.publish(s, _req(1))
    await bus.publish(s, _req(2))
    taken = await bus.read(s, "g", "dead-consumer", GenerateRequest, count=10, block_ms=10)
    assert len(taken) == 2  # read, never acked: its consumer died
    assert await bus.reclaim(s, "g", "rescuer", GenerateRequest, min_idle_ms=10_000) == []
    import asyncio

    await asyncio.sleep(0.05)
    got = await bus.reclaim(s, "g", "rescuer", GenerateRequest, min_idle_ms=20, max_deliveries=5)
    assert sorted(e.msg.request_id for e in got) == ["req-00000001", "req-00000002"]
    await bus.ack(s, "g", got[0].entry_id)
    # the other keeps failing: after max_deliveries it is dead-lettered, not cycled forever
    for _ in range(6):
        await asyncio.sleep(0.03)
        bus._cursors.clear()
        await bus.reclaim(s, "g", "rescuer", GenerateRequest, min_idle_ms=20, max_deliveries=3)
    assert (await bus.redis.xpending(s, "g"))["pending"] == 0
    dead = [decode(DeadLetter, f[FIELD]) for _, f in await bus.redis.xrange(bus.keys.dead)]
    assert len(dead) == 1 and "without being acked" in dead[0].reason
