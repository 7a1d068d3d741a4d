"""What every service shell shares: a heartbeat, a stop signal, declared consumers that survive
bad input and broker hiccups, and one worker thread for torch work.

A service is a thin shell: it declares the streams it consumes (``consumers()``: stream, group,
message type, handler, leader-only, ack and reclaim policy) and this base runs them, the way
docket's worker runs declared tasks: one read loop per consumer (its own pending entries first,
then new ones), acking after the handler returned, a sweeper that reclaims entries a dead
consumer of a shared group left behind, and an attempt cap: an entry whose handler failed
``max_deliveries`` times goes to the dead-letter stream with the error, instead of blocking its
stream or cycling for ever. Before this base existed every service hand-wrote the same read loop
(seven copies) and only some of them had a sweeper.

Each process is one *life* of its service name (an instance token and a start time in its
heartbeat; its consumer name is ``<name>@<instance>``). A later process of the same name takes
over: it claims what the earlier one left pending, and the earlier one, should it run again
(it was only paused: SIGSTOP, a VM migration, a long GC), stops before acting on anything it
read (``current``). Without this a device's drafter restarted while the old process was
paused shared its streams with a ghost that dropped its verdicts and took its sessions back.

Torch work runs on a single dedicated thread so the event loop keeps moving messages (and a
model is never entered by two threads at once). That thread has a watchdog (``live``): a model
call that has made no progress for longer than ``watchdog_bound_s`` while work waits on it makes
the process's liveness probe fail, because a wedged model thread (a deadlocked kernel, a hung
device) leaves the event loop answering probes while the service does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wisp.bus import Bus, Entry, consumer_of
from wisp.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


REAP_EVERY = 12
"""Sweeper passes between two reaps of departed consumers (``Bus.reap_departed``: a list of
every consumer of the group, so not at every pass): a minute at the default 5 s interval."""
REAP_IDLE_MS = 300_000
"""A consumer is reaped only after this long idle (or 10 x ``reclaim_idle_ms`` if longer): the
reap is not atomic, and only a process paused that long could read in its window."""

Handler = Callable[[Entry[Any]], Awaitable[None]]
BatchHandler = Callable[[list[Entry[Any]]], Awaitable[None]]


@dataclass(frozen=True)
class Consumer:
    """One stream a service consumes, declared; ``Service`` runs it.

    Exactly one of ``handler`` (one entry at a time) and ``batch`` (every entry of one read
    together, e.g. the drafter drafting the next rounds of all verdicts it read in one batched
    forward) is given."""

    stream: str
    group: str
    model: type[BaseModel]
    handler: Handler | None = None
    batch: BatchHandler | None = None
    count: int = 64
    """Entries per read."""
    start: str = "0"
    """Where a new group starts ("$": only entries written after it was created)."""
    leader_only: bool = False
    """Read only while this service holds its role's lease (the active scheduler)."""
    ack: bool = True
    """Ack each entry once its handler returned. False: the handler acks when its output is
    written (the scheduler acks a round only after the batch holding it was sent)."""
    reclaim: bool = False
    """A group shared by several consumers: sweep entries idle in a dead consumer's pending
    list to this one (XAUTOCLAIM), through the same handler."""
    pace_s: float = 0.0
    """Seconds to wait after a read that returned fewer than ``count`` entries (what was
    handled is acked first): what arrives meanwhile is read and handled together. For a stream
    no request waits on (the estimator learning from batch timings): fewer wake-ups, reads and
    acks than one per verified batch. A full read is not followed by a pause, so a backlog
    drains at full speed."""

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.batch is None):
            raise ValueError(f"consumer of {self.stream}: give exactly one of handler and batch")


class Service:
    """Base of the drafter, verifier, scheduler and estimator shells."""

    role: str = "service"
    watchdog_s: float | None = None
    """Bound of the model thread's watchdog (``live``); None: the drain timeout
    (``WISP_DRAIN_TIMEOUT_S``), see ``watchdog_bound_s``."""

    def __init__(self, settings: Settings, bus: Bus, name: str | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.keys = bus.keys
        self.name = name or settings.instance_name(self.role)
        self.stopping = asyncio.Event()
        self.ready = False
        self._pool: ThreadPoolExecutor | None = None
        self.counters: dict[str, float] = {}
        self.leader = True
        """Whether this instance holds its role's lease (services with a single active
        instance, the scheduler, manage it; leader-only consumers read only while it is set)."""
        self._failures: dict[tuple[str, str], int] = {}
        self._worker_calls = 0
        """Calls handed to the worker thread and not finished (running or queued)."""
        self._worker_progress = time.monotonic()
        """When the worker thread last reported progress (a call started or ended, or the
        call in hand called ``report_progress``). Written from that thread: a float
        assignment, atomic in CPython."""
        self._set_up = False
        """``setup`` finished: the watchdog judges the model thread only from then on (a model
        load may take many minutes; the startup probe, not liveness, covers it)."""
        self.life = {"instance": secrets.token_hex(4), "started": time.time()}
        """This process's identity under its name: a later process of the same name (a restart
        while this one was paused, or an operator starting it twice) supersedes this one."""
        self.consumer = consumer_of(self.name, str(self.life["instance"]))
        """This life's consumer name in every group it reads."""
        self.superseded = False
        self._confirmed = -1e9
        """``time.monotonic()`` when this life last confirmed it is its name's current one."""

    # ------------------------------------------------------------------ helpers
    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run torch work on this service's single worker thread (fed to the watchdog: the
        call's start and end count as progress)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-torch")

        def call() -> T:
            self.report_progress()
            try:
                return fn(*args)
            finally:
                self.report_progress()

        if self._worker_calls == 0:
            # work starts waiting now: an idle thread's last progress (long ago) must not count
            # against a call the thread has not picked up yet (it failed a liveness probe in
            # the moment between this line and the call's own start)
            self._worker_progress = time.monotonic()
        self._worker_calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, call)
        finally:
            self._worker_calls -= 1

    def report_progress(self) -> None:
        """Tell the watchdog the model thread is moving. Callable from that thread: a long
        call (a chunked prefill, a warm-up loop) calls it between steps."""
        self._worker_progress = time.monotonic()

    @property
    def watchdog_bound_s(self) -> float:
        """How long the model thread may go without progress while work waits on it (0: no
        watchdog). By default the drain timeout: the call in hand has to finish within it
        for a drain to be clean, so one running longer is stuck, not slow; the liveness
        probe's own failure threshold (4 x 15 s in the manifests) comes on top."""
        if self.settings.watchdog_s is not None:  # the operator's WISP_WATCHDOG_S
            return self.settings.watchdog_s
        if self.watchdog_s is not None:
            return self.watchdog_s
        return self.settings.drain_timeout_s

    def live(self) -> tuple[bool, dict[str, Any]]:
        """The liveness verdict of this service: false when its model thread has work and has
        not reported progress for longer than ``watchdog_bound_s`` (after setup)."""
        bound = self.watchdog_bound_s
        if not self._set_up or self._worker_calls == 0 or bound <= 0:
            return True, {}
        stalled = time.monotonic() - self._worker_progress
        if stalled <= bound:
            return True, {}
        return False, {"model_thread": f"{self.name}: no progress for {stalled:.0f} s with "
                                       f"{self._worker_calls} call(s) waiting (bound {bound:g} s)"}

    def count(self, name: str, by: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + by

    def heartbeat_info(self) -> dict[str, Any]:
        """Extra fields of this service's heartbeat (shown by `wisp-cli status`)."""
        return {"mode": str(self.settings.mode), "ready": self.ready}

    # ------------------------------------------------------------------ lifecycle
    async def setup(self) -> None:
        """Load models, create groups. Runs before the loops start."""

    def consumers(self) -> list[Consumer]:
        """The streams this service consumes (asked once, after ``setup``)."""
        return []

    def loops(self) -> list[Callable[[], Awaitable[None]]]:
        """Loops that are not stream consumers (leases, timers, scans); each is restarted after
        a transient error."""
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
        self._set_up = True
        consumers = self.consumers()
        for c in consumers:
            await self.bus.ensure_group(c.stream, c.group, start=c.start)
        self._consumers = consumers
        self.ready = True
        hb = asyncio.create_task(self._heartbeat(), name=f"{self.name}:hb")
        runs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            (f"consume:{c.stream}", self._consume_loop(c)) for c in consumers
        ]
        runs += [(loop.__name__, loop) for loop in [*self.loops(), self._sweep_loop]]
        loops = [
            asyncio.create_task(self._guard(loop, what), name=f"{self.name}:{what}")
            for what, loop in runs
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
            if not self.superseded:  # a superseded life's heartbeat key is its successor's
                with contextlib.suppress(Exception):
                    await self.bus.clear_heartbeat(self.role, self.name)
            await self.teardown()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    _consumers: list[Consumer] = []

    def _consume_loop(self, c: Consumer) -> Callable[[], Awaitable[None]]:
        async def consume() -> None:
            # entries handled (their output written) but not acked yet: the ack goes out with
            # the next read, in its round trip (a round of the pipeline passes through four
            # consumers, so this saves four round trips of the shared event loop per round)
            acks: list[str] = []
            try:
                while not self.stopping.is_set():
                    if c.leader_only and not self.leader:
                        await self._flush_acks(c, acks)
                        await self._pause(0.1)
                        continue
                    entries = await self.bus.read(c.stream, c.group, self.consumer, c.model,
                                                  count=c.count, block_ms=self.settings.block_ms,
                                                  ack=acks)
                    acks.clear()
                    if entries and not await self.current():
                        return  # left pending, un-acked: the current life claims them
                    if entries:
                        await self.deliver(c, entries, acks)
                        if c.pace_s > 0 and len(entries) < c.count:
                            # acked before the pause: a handled entry must not wait there,
                            # pending, for a sweeper or the next life to deliver it again
                            await self._flush_acks(c, acks)
                            await self._pause(c.pace_s)
            finally:
                # stopping (or a failure): what was handled is acked now; if the broker is
                # gone the entries stay pending and are handled again (handlers are idempotent)
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    await self._flush_acks(c, acks)

        return consume

    async def _flush_acks(self, c: Consumer, acks: list[str]) -> None:
        if acks:
            await self.bus.ack(c.stream, c.group, *acks)
            acks.clear()

    async def deliver(self, c: Consumer, entries: list[Entry[Any]],
                      acks: list[str] | None = None) -> None:
        """Hand ``entries`` to ``c``'s handler and ack each handled one (if ``c.ack``): at once,
        or, given ``acks``, by adding its id there for the caller to ack (with its next read).
        A broker error propagates (the entries stay pending and are read again after the
        outage). Any other failure leaves the entry pending, to be read again; one that failed
        ``max_deliveries`` times is dead-lettered with the error. A failed batch is retried one
        entry at a time, so one poisoned entry does not hold back the others."""
        if c.batch is not None:
            try:
                await c.batch(entries)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise
            except Exception as err:
                if len(entries) == 1:
                    await self._failed(c, entries[0], err)
                else:
                    for e in entries:
                        await self.deliver(c, [e], acks)
                return
            if c.ack:
                await self._ack(c, [e.entry_id for e in entries], acks)
            for e in entries:
                self._failures.pop((e.stream, e.entry_id), None)
            return
        assert c.handler is not None
        for e in entries:
            try:
                await c.handler(e)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise
            except Exception as err:
                await self._failed(c, e, err)
                continue
            if c.ack:
                await self._ack(c, [e.entry_id], acks)
            self._failures.pop((e.stream, e.entry_id), None)

    async def _ack(self, c: Consumer, ids: list[str], acks: list[str] | None) -> None:
        if acks is None:
            await self.bus.ack(c.stream, c.group, *ids)
        else:
            acks.extend(ids)

    async def _failed(self, c: Consumer, e: Entry[Any], err: Exception) -> None:
        key = (e.stream, e.entry_id)
        n = self._failures.get(key, 0) + 1
        self.count("handler_errors")
        if n >= self.settings.max_deliveries:
            self._failures.pop(key, None)
            log.error("%s: %s %s failed %d times, dead-lettering it: %r", self.name, e.stream,
                      e.entry_id, n, err)
            await self.bus.dead_letter(e.stream, e.entry_id, c.group, self.name,
                                       f"handler failed {n} times: {err!r}"[:1000],
                                       {"d": e.msg.model_dump_json()})
            await self.bus.ack(c.stream, c.group, e.entry_id)
            return
        self._failures[key] = n
        log.exception("%s: handling %s %s failed (attempt %d of %d)", self.name, e.stream,
                      e.entry_id, n, self.settings.max_deliveries)
        self.bus.reread_pending(c.stream, c.group, self.consumer)
        await self._pause(min(0.1 * 2 ** (n - 1), 5.0))

    async def current(self) -> bool:
        """Whether this process is still the current life of its name; checked before this
        life acts on what it read (a consumer's entries, an adoption pass). Confirmed by every
        heartbeat; after a gap of half the heartbeat TTL (the process was paused, or its loop
        blocked) it asks Redis first, so a process that wakes from a pause during which a later
        one of its name took over stops before it handles or acks anything (what it read stays
        pending for that later life, which claims it). A process is superseded for good."""
        if not self.superseded and (time.monotonic() - self._confirmed
                                    > self.settings.heartbeat_ttl_s / 2):
            await self._read_heartbeat()
        return not self.superseded

    async def _read_heartbeat(self) -> dict[str, Any] | None:
        """The name's heartbeat, read from Redis (None: none); supersedes this life if it is a
        later one's, else confirms this life."""
        info = await self.bus.heartbeat_of(self.role, self.name)
        if info is not None and later_life(info, self.life):
            self._supersede(info)
        else:
            self._confirmed = time.monotonic()
        return info

    def _supersede(self, by: dict[str, Any]) -> None:
        if not self.superseded:
            log.error("%s: another %s process started under the name %r (instance %s) and took "
                      "over; this one (instance %s) stops", self.name, self.role, self.name,
                      by.get("instance"), self.life["instance"])
            self.count("superseded")
        self.superseded = True
        self.stop()

    async def _pause(self, s: float) -> None:
        """Sleep ``s`` seconds, or less when the service is stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), s)

    async def _sweep_loop(self) -> None:
        """Reclaim entries idle longer than ``reclaim_idle_ms`` in each shared group (their
        consumer died or hung) and deliver them to the same handler; one sweeper per group at a
        time through a lease; an entry delivered more than ``max_deliveries`` times is
        dead-lettered instead (``Bus.reclaim``). Leader-only consumers are swept only by the
        leader (asked each pass: a standby starts sweeping when it takes over).

        Before that, on every stream (shared or not), what an earlier life of this name left
        pending is claimed at once (``Bus.claim_earlier_lives``): a process restarted under its
        name (a device's drafter, a pod's container) resumes its own streams without waiting
        for the idle time, and so does one that superseded a paused earlier life."""
        s = self.settings
        claimed_at_start: set[tuple[str, str]] = set()
        passes = 0
        while not self.stopping.is_set():
            # read afresh each pass: claiming must never take a later life's entries
            now_current = await self._current_consumer()
            if self.superseded:
                return
            reap = passes % REAP_EVERY == 0
            reap_idle_ms = max(REAP_IDLE_MS, 10 * s.reclaim_idle_ms)
            for c in self._consumers:
                active = not c.leader_only or self.leader
                if active and (not c.reclaim or (c.stream, c.group) not in claimed_at_start):
                    # an earlier life of this name (restarted, or paused and superseded) left
                    # these: on this service's own streams at every pass, on a shared group
                    # once at start (after that its idle sweep below covers them)
                    for e in await self.bus.claim_earlier_lives(
                            c.stream, c.group, self.consumer, self.name, c.model, now_current,
                            max_deliveries=s.max_deliveries):
                        self.count("claimed_from_earlier_life")
                        await self.deliver(c, [e])
                    if c.reclaim:
                        claimed_at_start.add((c.stream, c.group))
                if not c.reclaim:  # a stream of this service's own: few consumers, no lease
                    if reap and active:
                        gone = await self.bus.reap_departed(c.stream, c.group, self.role,
                                                            reap_idle_ms)
                        self.count("consumers_reaped", len(gone))
                    continue
                if not active:
                    continue
                lease = f"sweep:{c.stream}:{c.group}"
                if not await self.bus.acquire_lease(lease, self.name, 3 * s.reclaim_interval_s):
                    continue
                entries = await self.bus.reclaim(
                    c.stream, c.group, self.consumer, c.model, s.reclaim_idle_ms,
                    max_deliveries=s.max_deliveries, others_only=not c.ack,
                )
                for e in entries:
                    self.count("reclaimed")
                    await self.deliver(c, [e])
                if reap:  # departed services' consumers, by the group's one sweeper
                    gone = await self.bus.reap_departed(c.stream, c.group, self.role, reap_idle_ms)
                    self.count("consumers_reaped", len(gone))
            passes += 1
            await self._pause(s.reclaim_interval_s)

    async def _current_consumer(self) -> str | None:
        """The consumer of the life the name's heartbeat names now, read from Redis (None:
        no heartbeat, or one from before lives); supersedes this life if that one is later."""
        info = await self._read_heartbeat()
        if info is None or self.superseded:
            return None
        inst = info.get("instance")
        return consumer_of(self.name, inst) if isinstance(inst, str) else None

    async def _guard(self, loop: Callable[[], Awaitable[None]], what: str) -> None:
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
                log.exception("%s: %s failed; restarting it", self.name, what)
                self.count("loop_errors")
                # any other broker error (READONLY after a failover, OOM, MISCONF) may have cost
                # the acks that ride on the next read: re-read our own pending entries first,
                # or they would sit un-acked on a stream no sweeper covers (a device's verdicts,
                # a verifier's batches) for ever
                self.bus.after_outage()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _heartbeat(self) -> None:
        ttl = self.settings.heartbeat_ttl_s
        while not self.stopping.is_set():
            try:
                prev = await self.bus.heartbeat(self.role, self.name,
                                                {**self.heartbeat_info(), **self.life}, ttl)
                if prev is not None and later_life(prev, self.life):
                    # a later process of this name took over while this one was paused: undo
                    # this write (its heartbeat is the name's) and stop
                    await self.bus.put_back_heartbeat(self.role, self.name, prev, ttl)
                    self._supersede(prev)
                    return
                self._confirmed = time.monotonic()
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                log.warning("%s: heartbeat failed: %s", self.name, err)
            except Exception:  # e.g. a refused command: the heartbeat must go on regardless
                log.exception("%s: heartbeat failed", self.name)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_s)


def later_life(other: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether heartbeat ``other`` is of a later process of the same name than life ``mine``
    (later start; the instance token breaks a tie). A heartbeat without a life (written by a
    process from before lives) never supersedes."""
    inst, started = other.get("instance"), other.get("started")
    if not isinstance(inst, str) or not isinstance(started, int | float):
        return False
    if inst == mine["instance"]:
        return False
    return (float(started), inst) > (float(mine["started"]), str(mine["instance"]))


def now() -> float:
    """Wall clock shared with other processes (unix seconds)."""
    return time.time()
