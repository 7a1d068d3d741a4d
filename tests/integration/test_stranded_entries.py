"""No entry is stranded on a stream nobody sweeps. A per-device or per-verifier stream
(``wisp:verdict:<device>``, ``wisp:batch:<verifier>``) has one consumer and no sweeper, so an
entry its consumer handled but could not ack must come back to that consumer. Here Redis turns
read-only for a moment (a replica, as after a failover: every write, XREADGROUP and XACK included,
fails with READONLY, an error that is not a connection error): the handled entry's ack, which
rides on the next read, fails with it. Real Redis (a private server), a real ``Service`` running
one declared consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from wisp.bus import Bus, Entry, Keys, wait_for_redis
from wisp.protocol import GenerateRequest
from wisp.service import Consumer, Service
from wisp.services.runner import EmbeddedRedis
from wisp.settings import Settings


class Probe(Service):
    """One consumer on a private stream; records what it handled."""

    role = "probe"

    def __init__(self, settings: Settings, bus: Bus) -> None:
        super().__init__(settings, bus, "probe-1")
        self.seen: list[str] = []
        self.gate = asyncio.Event()
        """The handler returns only once the test opens it (so Redis can turn read-only while
        an entry is in hand)."""

    def consumers(self) -> list[Consumer]:
        return [Consumer(self.keys.verdict("dev"), "g", GenerateRequest, self.on_entry)]

    async def on_entry(self, e: Entry[GenerateRequest]) -> None:
        self.seen.append(e.msg.request_id)
        await self.gate.wait()


async def _until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_an_entry_handled_before_a_readonly_spell_is_acked_after_it() -> None:
    with EmbeddedRedis() as server:
        client = await wait_for_redis(server.url)
        admin = await wait_for_redis(server.url)
        bus = Bus(client, Keys("strand"))
        svc = Probe(Settings(block_ms=200, heartbeat_s=0.5), bus)
        task = asyncio.create_task(svc.run())
        stream = bus.keys.verdict("dev")
        try:
            await _until(lambda: _has_group(admin, stream))
            first = GenerateRequest(request_id="req-strand-1", prompt="a", submitted_ts=1.0)
            await bus.publish(stream, first)
            await _until(lambda: _true(svc.seen == ["req-strand-1"]))
            # Redis turns read-only while the entry is in hand; its ack, which rides on the
            # next read, fails with that read
            await admin.execute_command("REPLICAOF", "127.0.0.1", "1")
            svc.gate.set()
            await asyncio.sleep(1.0)  # reads fail with READONLY; the consumer loop restarts
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await _until(lambda: _pending(admin, stream, 0))
            assert svc.seen.count("req-strand-1") >= 1
            # and the consumer goes on with new entries
            await bus.publish(stream, GenerateRequest(request_id="req-strand-2", prompt="b",
                                                      submitted_ts=1.0))
            await _until(lambda: _true("req-strand-2" in svc.seen))
        finally:
            svc.stop()
            await asyncio.wait_for(task, 30)
            await client.aclose()
            await admin.aclose()


async def _true(value: bool) -> bool:
    return value


async def _has_group(r: Redis, stream: str) -> bool:
    try:
        return bool(await r.xinfo_groups(stream))
    except Exception:  # noqa: BLE001 - no stream yet
        return False


async def _pending(r: Redis, stream: str, n: int) -> bool:
    return int((await r.xpending(stream, "g"))["pending"]) == n
