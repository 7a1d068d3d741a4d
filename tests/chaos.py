"""Chaos run: a whole WISP cluster (estimator, two schedulers, two verifiers, two drafters; real
processes, tiny model pair) under a steady greedy load from several concurrent clients, while
every few seconds a randomly chosen service process is killed -9 and started again under the same
name. At the end every request is checked against the target's own greedy output and the raw
output streams are read back; a table is printed and a JSON report written.

Why: the fault tests each inject one fault at a chosen moment. Faults in production overlap and
land at arbitrary points (a scheduler dies while a verifier is still restarting, a drafter dies
while adopting), and only a long random run finds the interleavings nobody wrote a test for. The
seed makes a run's fault schedule reproducible (the timing of the services is not).

Figures reported: ``lost`` (no done or error event by ``--bound`` seconds after the faults
stopped: the system silently dropped it; while faults go on a request may take long, which shows
as a stall instead), ``duplicated`` (a token index emitted twice with different tokens on the
raw output stream), ``wrong`` (final ids differ from the target's greedy ids, or the tokens the
client library delivered differ from the final ids), ``errored`` (a clear error: allowed, but
counted), and the longest stall (gap between consecutive token events of one request, the first
measured from submission) and the longest request.

    python -m tests.chaos --minutes 10                 # against the local Redis (or a private one)
    python -m tests.chaos --minutes 2 --fault-every 5 --seed 7 --out chaos.json

``tests/faults/test_chaos_short.py`` runs a short version of ``run_chaos`` in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from wisp.bus import Bus, Keys, wait_for_redis
from wisp.client import new_request_id
from wisp.data import mixed_prompts

from tests.faults.common import (
    DONE,
    ERROR,
    FAST,
    LOST,
    Outcome,
    all_logs,
    read_raw_outputs,
    restart,
    run_one,
    stream_conflicts,
    stream_gaps_ms,
)
from tests.harness import Cluster, clean_namespace, redis_answers
from tests.reference import greedy_reference, load_target

SERVICES: tuple[tuple[str, str], ...] = (
    ("estimator", "e"), ("scheduler", "s1"), ("scheduler", "s2"), ("verifier", "v1"),
    ("verifier", "v2"), ("drafter", "d1"), ("drafter", "d2"),
)
ROLE = dict((name, role) for role, name in SERVICES)


@dataclass
class ChaosConfig:
    """One run's knobs (the CLI flags)."""

    duration_s: float = 600.0
    """Load and faults run this long; then the requests in flight get ``bound_s`` to finish."""
    fault_every_s: float = 5.0
    """Mean time between faults (each gap uniform in [0.5, 1.5] x this)."""
    seed: int = 0
    clients: int = 4
    """Concurrent clients, each submitting one request after the other."""
    max_new: int = 32
    bound_s: float = 120.0
    """A request with no done/error event this long after the faults stopped is lost."""
    prompts: int = 24
    """Distinct prompts cycled through (the greedy reference is computed once per prompt)."""
    settings: dict[str, Any] = field(default_factory=lambda: {**FAST, "fault_delay_ms": 20})
    """WISP_* settings of every service (FAST: short TTLs so failover happens within the run)."""


@dataclass
class ChaosReport:
    """What a run found. ``bad`` names each lost / duplicated / wrong request and why."""

    config: dict[str, Any]
    requests: int = 0
    completed: int = 0
    errored: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    """Kill -9s injected, by role."""
    crashed: list[str] = field(default_factory=list)
    """Services that exited without being killed by the harness (restarted, and reported)."""
    dead_letters: dict[str, int] = field(default_factory=dict)
    """Entries dead-lettered, by stream (``annotated``: rounds a scheduler gave up on)."""
    longest_stall_ms: float = 0.0
    longest_stall_request: str = ""
    longest_request_s: float = 0.0
    wall_s: float = 0.0
    namespace: str = ""
    log_dir: str = ""
    fault_log: list[tuple[float, str]] = field(default_factory=list)
    """(seconds since the load started, service killed)."""
    bad: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """The first reasons given to errored requests."""
    log_tails: list[str] = field(default_factory=list)
    """Every service's log tail, when the run found something lost, duplicated or wrong."""

    @property
    def ok(self) -> bool:
        return self.lost == self.duplicated == self.wrong == 0

    def table(self) -> str:
        rows = [
            ("requests", self.requests), ("completed", self.completed),
            ("errored (clear error)", self.errored), ("lost", self.lost),
            ("duplicated", self.duplicated), ("wrong", self.wrong),
            ("faults injected", f"{sum(self.faults.values())} "
             + " ".join(f"{k}={v}" for k, v in sorted(self.faults.items()))),
            ("crashed on their own", ", ".join(self.crashed) or "none"),
            ("dead letters", " ".join(f"{k}={v}" for k, v in sorted(self.dead_letters.items()))
             or "none"),
            ("longest stall", f"{self.longest_stall_ms / 1000:.1f} s ({self.longest_stall_request})"),
            ("longest request", f"{self.longest_request_s:.1f} s"),
            ("wall time", f"{self.wall_s:.0f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines + [f"  ! {b}" for b in self.bad[:30]])

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class Chaos:
    """The cluster, the fault injector and the load of one run."""

    def __init__(self, redis_url: str, target: Path, draft: Path, log_dir: Path,
                 cfg: ChaosConfig, namespace: str | None = None) -> None:
        self.url = redis_url
        self.target, self.draft = target, draft
        self.cfg = cfg
        self.ns = namespace or f"wisp-chaos-{uuid.uuid4().hex[:10]}"
        self.cluster = Cluster(redis_url, self.ns, log_dir,
                               settings={"target_model": target, "draft_model": draft,
                                         **cfg.settings})
        self.report = ChaosReport(config={**asdict(cfg), "redis_url": redis_url,
                                          "target": str(target), "draft": str(draft)},
                                  namespace=self.ns, log_dir=str(log_dir))
        self.outcomes: list[Outcome] = []

    # ------------------------------------------------------------------ faults
    async def inject(self, stop_at: float, t0: float) -> None:
        """Until ``stop_at``: wait a seeded random gap, kill -9 a seeded random service and
        start it again under the same name (the new process finds its predecessor's state in
        Redis). A service found dead that we did not kill is reported and restarted."""
        rng = random.Random(self.cfg.seed)
        c = self.cluster
        while True:
            gap = rng.uniform(0.5, 1.5) * self.cfg.fault_every_s
            if time.monotonic() + gap >= stop_at:
                return
            await asyncio.sleep(gap)
            for name, p in list(c.procs.items()):
                if p.poll() is not None:
                    self.report.crashed.append(f"{name} (exit {p.returncode})")
                    c.procs.pop(name)
                    restart(c, ROLE[name], name)
            name = rng.choice([n for _, n in SERVICES])
            await asyncio.to_thread(c.kill, name, signal.SIGKILL)
            restart(c, ROLE[name], name)
            self.report.faults[ROLE[name]] = self.report.faults.get(ROLE[name], 0) + 1
            self.report.fault_log.append((round(time.monotonic() - t0, 1), name))

    # ------------------------------------------------------------------ load
    async def client(self, bus: Bus, i: int, prompts: list[str], stop_at: float) -> None:
        """One client: a request, then the next, until ``stop_at``. A request is not bounded by
        its own age while faults go on (a storm of kills may hold it up for long: that is a
        stall, reported), only by ``drive``'s deadline once the faults stopped."""
        rng = random.Random(self.cfg.seed * 1000 + i + 1)
        while time.monotonic() < stop_at:
            prompt = rng.choice(prompts)
            o = Outcome(prompt=prompt, request_id=new_request_id(), submitted_ts=time.time())
            self.outcomes.append(o)
            await run_one(bus, prompt, max_new=self.cfg.max_new, out=o,
                          bound_s=self.cfg.duration_s + 2 * self.cfg.bound_s)
            if o.status != DONE:  # e.g. refused while both drafters restart: no busy loop
                await asyncio.sleep(1.0)

    async def drive(self) -> None:
        """Load and faults for ``duration_s``; then every request still open gets ``bound_s``
        (with no more faults) to answer, else it is lost: it would never have answered."""
        prompts = [p.text for p in mixed_prompts(self.cfg.prompts, offset=200)]
        conn = await wait_for_redis(self.url)
        bus = Bus(conn, Keys(self.ns))
        try:
            t0 = time.monotonic()
            stop_at = t0 + self.cfg.duration_s
            clients = [asyncio.create_task(self.client(bus, i, prompts, stop_at))
                       for i in range(self.cfg.clients)]
            await self.inject(stop_at, t0)
            await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
            _done, late = await asyncio.wait(clients, timeout=self.cfg.bound_s)
            for task in late:
                task.cancel()
            for res in await asyncio.gather(*clients, return_exceptions=True):
                if isinstance(res, Exception):  # a harness bug, not a finding: say so
                    raise res
            for o in self.outcomes:
                if o.status == LOST and o.error is None:
                    o.elapsed_s = time.time() - o.submitted_ts
                    o.error = f"no answer {self.cfg.bound_s:.0f}s after the faults stopped"
            await read_raw_outputs(bus, self.outcomes)
        finally:
            await conn.aclose()

    # ------------------------------------------------------------------ the run
    def run(self) -> ChaosReport:
        t = time.monotonic()
        c = self.cluster
        try:
            with c:
                for role, name in SERVICES:
                    c.start(role, name)
                c.wait_ready([n for _, n in SERVICES], timeout_s=300)
                asyncio.run(self.drive())
                self.report.dead_letters = self._dead_letters()
                if not self._judge():
                    self.report.log_tails = self._tails()
        finally:
            clean_namespace(self.url, self.ns)
        self.report.wall_s = round(time.monotonic() - t, 1)
        return self.report

    def _judge(self) -> bool:
        """Fill the report from the outcomes; True when nothing was lost, duplicated or wrong."""
        rep, ref = self.report, load_target(self.target)
        rep.requests = len(self.outcomes)
        for o in self.outcomes:
            rid = o.request_id[:8]
            if o.status == LOST:
                rep.lost += 1
                rep.bad.append(f"lost {rid} after {o.elapsed_s:.0f}s ({len(o.events)} events): "
                               f"{o.error}")
            elif o.status == ERROR:
                rep.errored += 1
            conflicts = stream_conflicts(o)
            if conflicts:
                rep.duplicated += 1
                rep.bad.append(f"duplicated {rid}: {conflicts[:3]}")
            gaps = stream_gaps_ms(o)
            if gaps and max(gaps) > rep.longest_stall_ms:
                rep.longest_stall_ms, rep.longest_stall_request = round(max(gaps), 1), rid
            if o.status != DONE:
                continue
            rep.completed += 1
            rep.longest_request_s = max(rep.longest_request_s, round(o.elapsed_s, 1))
            assert o.prompt_ids is not None and o.done_ids is not None
            want = greedy_reference(ref, o.prompt_ids, self.cfg.max_new)
            if o.done_ids != want or o.delivered != o.done_ids:
                rep.wrong += 1
                rep.bad.append(f"wrong {rid}: final==greedy {o.done_ids == want}, "
                               f"delivered==final {o.delivered == o.done_ids}")
        rep.errors = [o.error or "" for o in self.outcomes if o.status == ERROR][:20]
        return rep.ok

    def _dead_letters(self) -> dict[str, int]:
        """What went to the dead-letter stream, by source stream: a round there was given up
        on, and only a drafter's own retry can still save its request."""
        r = redis.Redis.from_url(self.url)
        counts: dict[str, int] = {}
        try:
            for _eid, f in r.xrange(f"{self.ns}:dead"):
                try:
                    stream = str(json.loads(f[b"d"])["stream"]).removeprefix(f"{self.ns}:")
                except (KeyError, ValueError):
                    stream = "?"
                counts[stream] = counts.get(stream, 0) + 1
        finally:
            r.close()
        return counts

    def _tails(self) -> list[str]:
        """Log tails of every service (all their lives), for a failed run's report."""
        noise = ("broker unavailable", "heartbeat failed", "Loading weights", "FutureWarning",
                 "forward_call(")
        out = []
        for _, n in SERVICES:
            lines = [x for x in all_logs(self.cluster, n).splitlines()
                     if x and not any(k in x for k in noise)]
            out.append(f"--- {n} ---\n" + "\n".join(lines)[-3000:])
        return out


def run_chaos(redis_url: str, target: Path, draft: Path, log_dir: Path,
              cfg: ChaosConfig, namespace: str | None = None) -> ChaosReport:
    """One chaos run (what the CLI and the short CI test call)."""
    return Chaos(redis_url, target, draft, log_dir, cfg, namespace).run()


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Kill -9 random WISP service processes (and restart them) under a steady "
        "greedy load; report lost / duplicated / wrong / errored requests and the longest stall. "
        "Exit status 1 if any request was lost, duplicated or wrong.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long load and faults run")
    ap.add_argument("--fault-every", type=float, default=5.0,
                    help="mean seconds between kill -9s (each gap uniform in 0.5-1.5x this)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the fault schedule and the prompts")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--bound", type=float, default=120.0,
                    help="a request with no answer this many seconds after the faults stopped "
                    "counts as lost")
    ap.add_argument("--redis-url", default=os.environ.get("WISP_TEST_REDIS_URL",
                                                          "redis://127.0.0.1:6379/0"),
                    help="Redis to use (a fresh namespace; only its keys are deleted); if it does "
                    "not answer, a private redis-server is started")
    ap.add_argument("--models", type=Path, default=None,
                    help="a folder with target/ and draft/ (default: a tiny pair made in a temp dir)")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="service logs (default: a new temp dir, printed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON report (default: chaos-report.json in the log dir)")
    args = ap.parse_args(argv)

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="wisp-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.models is None:
        from wisp.models import make_tiny_pair
        from wisp.settings import Settings

        target, draft = make_tiny_pair(log_dir / "models", "qwen-coder-0.5b", seed=0,
                                       cache_dir=Settings().model_cache)
    else:
        target, draft = args.models / "target", args.models / "draft"
    cfg = ChaosConfig(duration_s=args.minutes * 60, fault_every_s=args.fault_every, seed=args.seed,
                      clients=args.clients, max_new=args.max_new_tokens, bound_s=args.bound)
    print(f"chaos: {args.minutes} min, a fault every ~{args.fault_every}s, seed {args.seed}; "
          f"logs in {log_dir}", flush=True)
    embedded = None
    url = args.redis_url
    if not redis_answers(url):
        from wisp.services.runner import EmbeddedRedis

        embedded = EmbeddedRedis().start()
        url = embedded.url
    try:
        rep = run_chaos(url, target, draft, log_dir, cfg)
    finally:
        if embedded is not None:
            embedded.cleanup()
    print(rep.table())
    out = args.out or log_dir / "chaos-report.json"
    out.write_text(json.dumps(rep.to_json(), indent=2))
    print(f"report: {out}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
