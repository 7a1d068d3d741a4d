"""What every service shell shares: a heartbeat, a stop signal, consumer loops that survive bad
input and broker hiccups, and one worker thread for torch work.

A service is a thin shell: read a stream, call a policy or an engine, write a stream, ack.
Torch work runs on a single dedicated thread so the event loop keeps moving messages (and a
model is never entered by two threads at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wisp.bus import Bus, Entry
from wisp.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Sweep:
    stream: str
    group: str
    model: type[BaseModel]
    handler: Callable[[Entry[Any]], Awaitable[None]]


class Service:
    """Base of the drafter, verifier, scheduler and estimator shells."""

    role: str = "service"

    def __init__(self, settings: Settings, bus: Bus, name: str | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.keys = bus.keys
        self.name = name or settings.instance_name(self.role)
        self.stopping = asyncio.Event()
        self.ready = False
        self._pool: ThreadPoolExecutor | None = None
        self.counters: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run torch work on this service's single worker thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-torch")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def count(self, name: str, by: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + by

    def heartbeat_info(self) -> dict[str, Any]:
        """Extra fields of this service's heartbeat (shown by `wisp-cli status`)."""
        return {"mode": str(self.settings.mode), "ready": self.ready}

    # ------------------------------------------------------------------ lifecycle
    async def setup(self) -> None:
        """Load models, create groups. Runs before the loops start."""

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        """The consumer loops of this service; each is restarted after a transient error."""
        return []

    async def teardown(self) -> None:
        """Release resources after the loops stopped."""

    def stop(self) -> None:
        """Begin a graceful stop: not ready any more (so k8s stops routing), loops end after
        the message in hand."""
        self.ready = False
        self.stopping.set()

    async def run(self) -> None:
        """Set up, then run heartbeat + loops until ``stop()``."""
        await self.setup()
        self.ready = True
        hb = asyncio.create_task(self._heartbeat(), name=f"{self.name}:hb")
        loops = [
            asyncio.create_task(self._guard(loop), name=f"{self.name}:{loop.__name__}")
            for loop in [*self.loops(), self._sweep_loop]  # sweeps() is asked each pass: it may change
        ]
        try:
            await self.stopping.wait()
        finally:
            # drain: every loop checks `stopping` between messages, so the message in hand is
            # finished, written and acked; only a loop still busy after the timeout is cancelled
            if loops:
                _, late = await asyncio.wait(loops, timeout=self.settings.drain_timeout_s)
                for t in late:
                    t.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            hb.cancel()
            await asyncio.gather(hb, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.bus.clear_heartbeat(self.role, self.name)
            await self.teardown()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def sweeps(self) -> list[Sweep]:
        """Shared consumer groups whose stuck entries this service reclaims (XAUTOCLAIM), with
        the handler that processes a reclaimed entry (it must ack it)."""
        return []

    async def _sweep_loop(self) -> None:
        """Reclaim entries idle longer than ``reclaim_idle_ms`` in each shared group (their
        consumer died or hung); one sweeper per group at a time through a lease; an entry
        delivered more than ``max_deliveries`` times is dead-lettered instead."""
        s = self.settings
        while not self.stopping.is_set():
            for sw in self.sweeps():
                lease = f"sweep:{sw.stream}:{sw.group}"
                if not await self.bus.acquire_lease(lease, self.name, 3 * s.reclaim_interval_s):
                    continue
                entries = await self.bus.reclaim(
                    sw.stream, sw.group, self.name, sw.model, s.reclaim_idle_ms,
                    max_deliveries=s.max_deliveries,
                )
                for e in entries:
                    self.count("reclaimed")
                    await sw.handler(e)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), s.reclaim_interval_s)

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Keep a consumer loop alive: broker outages back off and retry; a bug in handling
        one message is logged and the loop goes on (the message stays pending for reclaim)."""
        delay = 0.1
        while not self.stopping.is_set():
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                log.warning("%s: broker unavailable (%s); retrying in %.1fs", self.name, err, delay)
                self.bus.after_outage()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("%s: %s failed; restarting it", self.name, loop.__name__)
                self.count("loop_errors")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.bus.heartbeat(
                    self.role, self.name, self.heartbeat_info(), self.settings.heartbeat_ttl_s
                )
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                log.warning("%s: heartbeat failed: %s", self.name, err)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_s)


def now() -> float:
    """Wall clock shared with other processes (unix seconds)."""
    return time.time()
