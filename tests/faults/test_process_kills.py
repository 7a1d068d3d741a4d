"""Process faults that earlier fault tests do not cover, with real processes and a real Redis
(tiny models): a verifier outage longer than the reclaim time followed by kill -9 of the active
scheduler, a drafter paused (SIGSTOP) past its heartbeat TTL and woken after another drafter
adopted its sessions, and kill -9 of Redis itself with AOF ``appendfsync everysec``.

Every request is bounded (``run_bounded``): a request that never answers fails the test with its
id and the service logs instead of hanging CI, and every raw output stream is read back, so a
token index emitted twice with different tokens is caught even though the client library would
hide it. Outputs are compared with the target's own greedy ids."""

from __future__ import annotations

import contextlib
import json
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis
from wisp.data import mixed_prompts

from tests.faults.common import (
    DONE,
    ERROR,
    FAST,
    LOST,
    MAX_NEW,
    Outcome,
    PrivateRedis,
    all_logs,
    answered_late,
    committed_tokens,
    heartbeats,
    longest_stall,
    lossless_failures,
    pause,
    restart,
    run_bounded,
    sessions_by_device,
    stream_conflicts,
    summarize,
    unpause,
    unpause_all,
    wait_restarted,
    wait_until,
)
from tests.harness import Cluster, clean_namespace

BOUND_S = 120.0
"""Every request must have answered (done or a clear error) this long after it was submitted."""
RECOVERY_S = 60.0
"""...and this long after the fault was over: below the drafter's last-resort round re-send
(``WISP_ROUND_TIMEOUT_S``, 90 s), so a round the servers lost fails the test even when that
re-send saves its request (as a 90 s stall)."""
AOF_BOUND_S = 150.0
"""Redis kill -9: a round written in the second the AOF had not synced is lost by design, and
the drafter's re-send after ``WISP_ROUND_TIMEOUT_S`` (15 s in that test) is the designed
recovery, so the bound leaves room for it on a loaded machine."""


def _evidence(c: Cluster, names: list[str], outcomes: list[Outcome], r: redis.Redis, ns: str,
              failures: list[str]) -> str:
    """What a failing run leaves to look at: the failures, the dead letters and log tails."""
    dead = []
    for _i, f in r.xrange(f"{ns}:dead"):
        with contextlib.suppress(ValueError, KeyError):
            d = json.loads(f[b"d"])
            dead.append(f"{d['stream'].removeprefix(ns + ':')} {d['entry_id']} ({d['consumer']}): "
                        f"{d['reason'][:160]}")
    tails = "\n".join(f"--- {n} ---\n{_signal(all_logs(c, n))[-2500:]}" for n in names)
    return (f"{summarize(outcomes)}\n" + "\n".join(failures) + f"\ndead letters ({len(dead)}): "
            f"{dead[:10]}\n{tails}")


def _judged(c: Cluster, names: list[str], outcomes: list[Outcome], target: Path,
            r: redis.Redis, ns: str, recovered_ts: float, max_new: int = MAX_NEW,
            ) -> tuple[list[str], str]:
    """The failures of a bounded run (not the target's greedy output delivered once, or
    answered more than ``RECOVERY_S`` after the fault was over) and their evidence."""
    failures = lossless_failures(outcomes, target, max_new=max_new)
    failures += answered_late(outcomes, recovered_ts, RECOVERY_S)
    return failures, _evidence(c, names, outcomes, r, ns, failures) if failures else ""


_NOISE = ("broker unavailable", "heartbeat failed", "Loading weights", "FutureWarning",
          "forward_call(", "no verify-time model was profiled")


def _signal(log: str) -> str:
    """A service log without the lines every run has (reconnect retries, model loading)."""
    return "\n".join(line for line in log.splitlines() if line and not any(n in line for n in _NOISE))


def _pending_deliveries(r: redis.Redis, ns: str) -> list[int]:
    """Delivery counts of the rounds the scheduler group holds unacked (each self-reclaim by the
    sweeper bumps one)."""
    try:
        rows = r.xpending_range(f"{ns}:annotated", "scheduler", min="-", max="+", count=1000)
    except redis.ResponseError:
        return []
    return sorted(int(x["times_delivered"]) for x in rows)


def _where_is(r: redis.Redis, ns: str, rid: str) -> str:
    """Where a hung request's state is: its session record and terms (the scheduler drops a
    round whose session has no terms), and how many of its round blocks each stream holds."""
    streams = [f"{ns}:draft", f"{ns}:annotated",
               *(k.decode() for k in r.scan_iter(match=f"{ns}:batch:*"))]
    held = {s.removeprefix(ns + ":"): sum(rid.encode() in f.get(b"d", b"") for _i, f in r.xrange(s))
            for s in streams}
    return (f"{rid[:8]}: session record {bool(r.exists(f'{ns}:sess:{rid}'))}, terms "
            f"{bool(r.exists(f'{ns}:terms:{rid}'))}, its round blocks per stream {held}")


@pytest.mark.timeout(420)
# the standby variant (True) reproduces the same defect; it is left out of the suite to keep it
# near its time budget (a standby taking over is tested in test_server_faults.py)
@pytest.mark.parametrize("standby", [False], ids=["restarted"])
def test_verifier_outage_past_reclaim_then_kill_scheduler(
        redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path, standby: bool) -> None:
    """The only verifier is paused (SIGSTOP) for 10 s, several times the reclaim idle time, so the
    active scheduler's sweeper reclaims the rounds it is itself holding (queued, waiting for a
    verifier) again and again; then the active scheduler is killed -9 (a standby takes over, or
    the same scheduler is restarted) and the verifier resumes. The rounds the dead scheduler held
    must reach the new one: every request completes with the target's greedy ids.

    Why 10 s: the sweeper used to claim the rounds its own scheduler held, bumping their delivery
    count every ``reclaim_idle_ms`` (1.5 s here), and after ``max_deliveries`` (5) dead-lettered
    and acked them while still held: killed then, the scheduler lost them (7 of 8 requests on
    that code, rescued only by the drafter's 90 s re-send). Sweepers now claim only other
    consumers' entries for a consumer that holds entries on purpose (``Bus.reclaim``,
    ``others_only``)."""
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    settings = {"target_model": target, "draft_model": draft, "fault_delay_ms": 50, **FAST,
                "max_batch_size": 2, "reclaim_idle_ms": 1500}
    c = Cluster(redis_url, ns, tmp_path, settings=settings)
    r = redis.Redis.from_url(redis_url)
    names = ["e", "s1", "s2", "v", "d"] if standby else ["e", "s1", "v", "d"]
    seen: dict[str, object] = {}
    try:
        with c:
            for name in names:
                c.start({"e": "estimator", "v": "verifier", "d": "drafter"}.get(name, "scheduler"),
                        name)
            c.wait_ready(names)

            def outage_then_kill() -> None:
                wait_until(lambda: committed_tokens(r, ns) > 0, timeout=90)
                pause(c, "v")
                seen["open_sessions_at_pause"] = len(sessions_by_device(r, ns))
                try:
                    time.sleep(10.0)
                    seen["deliveries_before_kill"] = _pending_deliveries(r, ns)
                    leader = r.get(f"{ns}:lease:scheduler").decode()
                    seen["killed"] = leader
                    c.kill(leader, signal.SIGKILL)
                    if not standby:
                        t = time.time()
                        restart(c, "scheduler", leader)
                        wait_restarted(r, ns, leader, t, timeout=90)
                finally:
                    unpause(c, "v")
                    seen["recovered_ts"] = time.time()

            outcomes = run_bounded(redis_url, ns, [p.text for p in mixed_prompts(8, offset=100)],
                                   outage_then_kill, bound_s=BOUND_S)
            failures, evidence = _judged(c, names, outcomes, target, r, ns,
                                         float(seen["recovered_ts"]))
    finally:
        unpause_all(c)
        clean_namespace(redis_url, ns)
    print(f"\n{summarize(outcomes)} longest stall {longest_stall(outcomes)} "
          f"killed={seen.get('killed')} pending round delivery counts "
          f"before the kill: {seen.get('deliveries_before_kill')}, open sessions at the pause: "
          f"{seen.get('open_sessions_at_pause')}")
    assert seen.get("open_sessions_at_pause"), "the outage came after the work: nothing tested"
    assert not failures, evidence


@pytest.mark.timeout(420)
def test_paused_drafter_is_adopted_then_wakes(redis_url: str, tiny_pair: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    """A drafter serving sessions is paused (SIGSTOP) past its heartbeat TTL: the other drafter
    must adopt its sessions (the session records name it), and when the paused one wakes
    (SIGCONT) with its stale sessions in memory it must not emit anything for them. Checked on
    the raw output streams: no token index is ever emitted twice with different tokens, and every
    request is the target's greedy output, delivered once."""
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path, settings={"mode": "sled", "target_model": target,
                                                   "draft_model": draft, "fault_delay_ms": 120,
                                                   **FAST})
    r = redis.Redis.from_url(redis_url)
    names = ["e", "s", "v", "d1", "d2"]
    seen: dict[str, object] = {}
    max_new = 48

    def mid_generation() -> dict[str, list[str]]:
        """Drafter -> its sessions that have committed tokens (and are not finished)."""
        out: dict[str, list[str]] = {}
        for key in r.scan_iter(match=f"{ns}:sess:*"):
            raw = r.get(key)
            if raw and raw.startswith(b"{"):
                st = json.loads(raw)
                if 0 < len(st["generated"]) < max_new - 8:
                    out.setdefault(st["device"], []).append(key.decode().rsplit(":", 1)[-1])
        return out

    def pause_past_ttl() -> None:
        wait_until(lambda: any(len(v) >= 2 for v in mid_generation().values()), timeout=90)
        serving = mid_generation()
        victim = max(serving, key=lambda d: len(serving[d]))
        other = "d2" if victim == "d1" else "d1"
        victims = set(serving[victim])
        pause(c, victim)
        t0 = time.monotonic()
        try:
            # its heartbeat expires, then the other drafter's adopt loop takes every session
            # that is still open (some may have finished just before the pause)
            wait_until(lambda: victim not in heartbeats(r, ns), timeout=30)
            seen["hb_gone_s"] = round(time.monotonic() - t0, 2)
            wait_until(lambda: not any(d == victim for d in sessions_by_device(r, ns).values()),
                       timeout=30)
            seen["adopted_s"] = round(time.monotonic() - t0, 2)
            seen["adopted_by_other"] = sorted(
                rid[:8] for rid, d in sessions_by_device(r, ns).items() if d == other and rid in victims)
            time.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))  # > heartbeat TTL + reclaim interval
        finally:
            unpause(c, victim)
            seen["recovered_ts"] = time.time()
        seen.update(victim=victim, other=other, victims=len(victims))

    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                               ("drafter", "d1"), ("drafter", "d2")):
                c.start(role, name)
            c.wait_ready(names)
            outcomes = run_bounded(redis_url, ns, [p.text for p in mixed_prompts(6, offset=110)],
                                   pause_past_ttl, max_new=max_new, bound_s=BOUND_S)
            time.sleep(1.0)  # let the woken drafter act on its stale state before the logs are read
            failures, evidence = _judged(c, names, outcomes, target, r, ns,
                                         float(seen["recovered_ts"]), max_new)
            logs = {n: all_logs(c, n) for n in names}
    finally:
        unpause_all(c)
        clean_namespace(redis_url, ns)
    victim, other = str(seen["victim"]), str(seen["other"])
    print(f"\n{summarize(outcomes)} longest stall {longest_stall(outcomes)} {seen}; "
          f"woken drafter dropped adopted sessions: "
          f"{logs[victim].count('was adopted by another drafter')}")
    assert "resumed session" in logs[other], f"{other} adopted nothing:\n{logs[other][-3000:]}"
    assert not failures, evidence


@pytest.mark.timeout(420)
def test_drafter_restarted_under_its_name_while_paused_then_wakes(
        redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The only drafter is paused (SIGSTOP) mid-generation and its supervisor starts it again
    under the same name, as a device's init system would after a missed health check; the new
    process adopts the sessions. Then the old one wakes (SIGCONT) with its stale sessions and
    its open connections, reading the same streams as the new one. It must stop at once
    (exit, logging why) without handling, acking or adopting anything: a verdict the old
    process read and dropped is lost to the new one until the 90 s re-send (``answered_late``
    fails the request), and its adoption pass would take the new process's sessions back.
    Every request must be the target's greedy output, delivered once."""
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path, settings={"mode": "sled", "target_model": target,
                                                   "draft_model": draft, "fault_delay_ms": 120,
                                                   **FAST})
    r = redis.Redis.from_url(redis_url)
    names = ["e", "s", "v", "d1"]
    seen: dict[str, object] = {}
    max_new = 96

    def restart_while_paused() -> None:
        wait_until(lambda: committed_tokens(r, ns) >= 12, timeout=90)
        pause(c, "d1")
        c.procs["d1-old"] = c.procs.pop("d1")
        t0 = time.time()
        try:
            restart(c, "drafter", "d1")
            wait_restarted(r, ns, "d1", since=t0)
            seen["restarted_s"] = round(time.time() - t0, 2)
            seen["committed_at_wake"] = committed_tokens(r, ns)
        finally:
            unpause(c, "d1-old")
            seen["recovered_ts"] = time.time()
        with contextlib.suppress(Exception):
            c.procs["d1-old"].wait(20)  # a process that was superseded stops by itself

    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                               ("drafter", "d1")):
                c.start(role, name)
            c.wait_ready(names)
            outcomes = run_bounded(redis_url, ns, [p.text for p in mixed_prompts(6, offset=130)],
                                   restart_while_paused, max_new=max_new, bound_s=BOUND_S)
            old = c.procs["d1-old"]
            old_rc = old.poll()
            failures, evidence = _judged(c, names, outcomes, target, r, ns,
                                         float(seen["recovered_ts"]), max_new)
            logs = {n: all_logs(c, n) for n in names}
    finally:
        unpause_all(c)
        clean_namespace(redis_url, ns)
    print(f"\n{summarize(outcomes)} longest stall {longest_stall(outcomes)} {seen}; old process "
          f"exit code {old_rc}")
    assert not failures, evidence
    assert old_rc is not None, f"the superseded drafter still runs:\n{logs['d1'][-3000:]}"
    assert "took over; this one" in logs["d1"], logs["d1"][-3000:]


@pytest.mark.timeout(420)
def test_redis_kill9_with_aof_everysec(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Redis itself is killed -9 mid-run (no shutdown, so up to a second of acknowledged writes
    is not in the AOF) and started again on the same port and data within about a second.
    Every request must end before the bound: with the target's greedy ids, or with a clear
    error; none may hang, none may be wrong or carry conflicting tokens. The counts are printed
    (``-s``) since an error is an allowed answer here."""
    target, draft = tiny_pair
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis").start()
    ns = "wisp-aof9"
    # the drafter's re-send of a round lost with the unsynced second after 15 s, not 90: the
    # same designed recovery, sooner (a re-send of a round that was only slow is a harmless
    # duplicate)
    c = Cluster(server.url, ns, tmp_path, settings={"target_model": target, "draft_model": draft,
                                                    "fault_delay_ms": 100, "round_timeout_s": 15,
                                                    **FAST})
    names = ["e", "s", "v", "d"]
    r = redis.Redis.from_url(server.url)
    seen: dict[str, object] = {}
    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                               ("drafter", "d")):
                c.start(role, name)
            c.wait_ready(names)

            def kill9() -> None:
                wait_until(lambda: committed_tokens(r, ns) > 0, timeout=90)
                seen["committed_at_kill"] = committed_tokens(r, ns)
                server.kill(signal.SIGKILL)
                time.sleep(1.0)
                server.start()
                seen["committed_after_restart"] = committed_tokens(r, ns)

            outcomes = run_bounded(server.url, ns, [p.text for p in mixed_prompts(8, offset=120)],
                                   kill9, bound_s=AOF_BOUND_S)
            logs = "".join(c.log(n) for n in names)
            done = [o for o in outcomes if o.status == DONE]
            failures = lossless_failures(done, target)
            failures += [f"{o.request_id[:8]}: raw stream conflicts {stream_conflicts(o)}"
                         for o in outcomes if o.status != DONE and stream_conflicts(o)]
            failures += [f"{o.request_id[:8]}: LOST: {o.error}; {len(o.events)} events in its "
                         f"stream; {_where_is(r, ns, o.request_id)}"
                         for o in outcomes if o.status == LOST]
            evidence = _evidence(c, names, outcomes, r, ns, failures) if failures else ""
    finally:
        server.kill()
    counts = summarize(outcomes)
    errors = [o.error for o in outcomes if o.status == ERROR]
    print(f"\nredis kill -9: completed={counts[DONE]} errored={counts[ERROR]} hung={counts[LOST]} "
          f"longest stall {longest_stall(outcomes)} {seen} errors={errors}")
    assert "broker unavailable" in logs  # the services really lost the connection
    assert not failures, evidence
