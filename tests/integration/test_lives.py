"""Two processes under one service name (a device's drafter restarted by its supervisor while the
old process was only paused): the later one claims what the earlier one left pending at once,
and the earlier one, when it runs again, stops before it handles anything. Real Redis, real
``Service`` shells in one event loop; the process-level version (SIGSTOP, restart, SIGCONT) is
``tests/faults/test_process_kills.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from wisp.bus import Bus, Entry, is_life_of
from wisp.protocol import GenerateRequest
from wisp.service import Consumer, Service, later_life
from wisp.settings import Settings


class Probe(Service):
    """One consumer on a per-device stream (no sweeper: ``reclaim`` is off, as for a drafter's
    verdicts); records what it handled."""

    role = "probe"

    def __init__(self, settings: Settings, bus: Bus) -> None:
        super().__init__(settings, bus, "probe-1")
        self.seen: list[str] = []

    def consumers(self) -> list[Consumer]:
        return [Consumer(self.keys.verdict("dev"), "g", GenerateRequest, self.on_entry)]

    async def on_entry(self, e: Entry[GenerateRequest]) -> None:
        self.seen.append(e.msg.request_id)


SETTINGS = Settings(block_ms=100, heartbeat_s=0.2, heartbeat_ttl_s=2.0, reclaim_interval_s=0.2,
                    reclaim_idle_ms=600_000)
"""Reclaiming by idle time is out of reach (10 minutes): only the claim of an earlier life's
entries can move them."""


async def _until(pred: Callable[[], Awaitable[bool] | bool], timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        got = pred()
        if await got if isinstance(got, Awaitable) else got:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


async def _take(bus: Bus, stream: str, consumer: str, n: int) -> None:
    """``consumer`` reads ``n`` entries of group "g" and holds them, un-acked (a life that died
    or was paused holding them)."""
    assert len(await bus.read(stream, "g", consumer, GenerateRequest, count=n)) == n


def _req(i: int) -> GenerateRequest:
    return GenerateRequest(request_id=f"req-life-{i:04d}", prompt="p", submitted_ts=1.0)


def test_lives_are_told_apart_by_start_then_token() -> None:
    a = {"instance": "aaaa", "started": 100.0}
    assert later_life({"instance": "bbbb", "started": 101.0}, a)
    assert not later_life({"instance": "bbbb", "started": 99.0}, a)
    assert later_life({"instance": "bbbb", "started": 100.0}, a)  # a tie: the token decides
    assert not later_life({"instance": "0000", "started": 100.0}, a)
    assert not later_life(a, a)
    assert not later_life({"ready": True}, a)  # a heartbeat of a process from before lives
    assert not later_life({"instance": 7, "started": "x"}, a)
    assert is_life_of("d1", "d1") and is_life_of("d1@ab12", "d1")
    assert not is_life_of("d10@ab12", "d1") and not is_life_of("d1@ab@12", "d1")


async def test_a_restart_claims_what_the_earlier_life_left_pending_at_once(bus: Bus) -> None:
    stream = bus.keys.verdict("dev")
    await bus.ensure_group(stream, "g")
    for i in range(3):
        await bus.publish(stream, _req(i))
    # an earlier life of probe-1 read them and died before acking (and one from before lives,
    # under the bare name); another service's consumer holds one that is not ours
    await _take(bus, stream, "probe-1@dead0001", 2)
    await _take(bus, stream, "probe-1", 1)
    await bus.publish(stream, _req(9))
    await _take(bus, stream, "probe-10@other", 1)

    svc = Probe(SETTINGS, bus)
    task = asyncio.create_task(svc.run())
    try:
        await _until(lambda: len(svc.seen) >= 3)
        assert sorted(svc.seen) == [_req(i).request_id for i in range(3)]
        assert svc.counters.get("claimed_from_earlier_life") == 3
        # the emptied earlier lives are reaped (after minutes idle in service; here at once),
        # the live one and another service's consumer holding an entry are not
        assert sorted(await bus.reap_departed(stream, "g", "probe", min_idle_ms=0)) == [
            "probe-1", "probe-1@dead0001"]
        names = {_s(c["name"]) for c in await bus.redis.xinfo_consumers(stream, "g")}
        assert names == {svc.consumer, "probe-10@other"}, names
    finally:
        svc.stop()
        await task


async def test_a_superseded_life_stops_before_handling_and_leaves_the_entry(bus: Bus) -> None:
    stream = bus.keys.verdict("dev")
    old = Probe(SETTINGS, bus)
    old_task = asyncio.create_task(old.run())
    await _until(lambda: old.ready and old._confirmed > 0)
    new = Probe(SETTINGS.model_copy(update={"reclaim_interval_s": 60.0}), bus)
    new.life["started"] = float(old.life["started"]) + 1.0
    # the old life "pauses": its confirmation goes stale, as after a SIGSTOP longer than half
    # the heartbeat TTL, and the later life starts meanwhile
    old._confirmed = -1e9
    await bus.heartbeat("probe", "probe-1", dict(new.life), ttl_s=30)
    await bus.publish(stream, _req(1))
    await asyncio.wait_for(old_task, 10)  # it read the entry, saw the later life, and stopped
    assert old.superseded and old.seen == []
    pending = await bus.redis.xpending_range(stream, "g", min="-", max="+", count=10)
    # read and left pending for the later life, or not read at all
    assert {_s(p["consumer"]) for p in pending} <= {old.consumer}
    hb = await bus.heartbeat_of("probe", "probe-1")
    assert hb is not None and hb["instance"] == new.life["instance"]  # not deleted on its way out

    new_task = asyncio.create_task(new.run())
    try:
        await _until(lambda: new.seen == [_req(1).request_id])
    finally:
        new.stop()
        await new_task


async def test_a_heartbeat_that_finds_a_later_life_is_undone(bus: Bus) -> None:
    old = Probe(SETTINGS, bus)
    later = {"instance": "ffffffff", "started": float(old.life["started"]) + 5.0}
    await bus.heartbeat("probe", "probe-1", {"ready": True, **later}, ttl_s=30)
    task = asyncio.create_task(old.run())
    await asyncio.wait_for(task, 10)
    assert old.superseded
    hb = await bus.heartbeat_of("probe", "probe-1")
    assert hb is not None and hb["instance"] == "ffffffff"


async def test_departed_consumers_of_a_shared_group_are_reaped(bus: Bus) -> None:
    """Consumers of services that are gone (no heartbeat of their name, nothing pending, idle)
    are deleted; a live one (its heartbeat is there), and a dead one still holding an entry
    (the sweeper reclaims it first), stay."""
    stream = bus.keys.requests
    await bus.ensure_group(stream, "g")
    for i in range(2):
        await bus.publish(stream, _req(i))
    await bus.redis.xgroup_createconsumer(stream, "g", "gone-pod@1")
    await bus.redis.xgroup_createconsumer(stream, "g", "alive-pod@2")
    await _take(bus, stream, "holding@3", 1)
    await bus.heartbeat("probe", "alive-pod", {"ready": True, "instance": "2", "started": 1.0},
                        ttl_s=30)
    await asyncio.sleep(0.15)
    assert await bus.reap_departed(stream, "g", "probe", min_idle_ms=100) == ["gone-pod@1"]
    names = {_s(c["name"]) for c in await bus.redis.xinfo_consumers(stream, "g")}
    assert names == {"alive-pod@2", "holding@3"}
    assert await bus.reap_departed(stream, "g", "probe", min_idle_ms=60_000) == []


async def test_a_life_never_claims_from_the_life_the_heartbeat_names(bus: Bus) -> None:
    """A process that has not yet learnt it was superseded (its confirmation is up to half a
    TTL old) must not take the later life's entries: the claim skips the consumer the
    heartbeat names, and takes only from lives before it."""
    stream = bus.keys.verdict("dev")
    await bus.ensure_group(stream, "g")
    for i in range(2):
        await bus.publish(stream, _req(i))
    await _take(bus, stream, "probe-1@later", 1)
    await _take(bus, stream, "probe-1@dead", 1)
    got = await bus.claim_earlier_lives(stream, "g", "probe-1@old", "probe-1", GenerateRequest,
                                        current="probe-1@later")
    assert [e.msg.request_id for e in got] == [_req(1).request_id]
    pending = await bus.redis.xpending_range(stream, "g", min="-", max="+", count=10)
    assert sorted(_s(p["consumer"]) for p in pending) == ["probe-1@later", "probe-1@old"]


async def test_a_superseded_scheduler_leaves_the_lease_to_its_successor(bus: Bus) -> None:
    """Leases are held by name, which every life of a scheduler shares: a superseded life on
    its way out must not release the lease the later life holds (a needless failover)."""
    from wisp.services.scheduler.service import LEASE, SchedulerService

    old = SchedulerService(Settings(), bus, name="sched-1")
    assert await bus.acquire_lease(LEASE, "sched-1", 30)  # the later life's, by name
    old._supersede({"instance": "later"})
    await old.teardown()
    assert await bus.redis.get(bus.keys.lease(LEASE)) == b"sched-1"
    await bus.redis.delete(bus.keys.lease(LEASE))
