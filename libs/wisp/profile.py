"""Verifier profiles: measured wall times of batched verification over a grid of batch shapes.

A profile is what the learned verify-time estimator is fitted on (and what the simulator replays):
JSON with ``samples`` (one per measured batch: ``new_tokens`` and ``context_lens`` per row,
``measured_ms``), the ``hardware`` it was measured on, the grid and the time it took.

Measuring (``run_profile``) is written against a small ``Probe`` protocol, so this module needs
neither torch nor the verifier engine (``libs`` never imports ``services``); the CLI wraps the
real ``VerifierEngine`` in a probe. Every measured batch is a real *cache-hit* round per row, as
in serving: each row's session already holds ``ctx`` cached positions, and the row feeds its last
committed token plus ``d`` drafted tokens (``new_tokens = d + 1``). Rows are distinct sessions.
Filling a session's cache for a context is done before timing (once, by a real prefill of the
longest context on a master session, then copies of it, cropped by the engine to each row's
context); the prefill itself is recorded apart (``prefill``), not among the batch samples.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from wisp.policy.estimator import BatchShape

SCHEMA = 1
KIND = "verifier-profile"

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_DRAFT_TOKENS = (0, 1, 2, 3, 4, 6, 8)
DEFAULT_CONTEXTS = (32, 128, 384)
DEFAULT_REPEATS = 3
DEFAULT_MIXED = 16
DEFAULT_MAX_BATCH_TOKENS = 40
"""Grid cells with more padded tokens (``batch x (draft + 1)``) than this are measured at the
smallest and largest context only (see ``plan_grid``): big batches dominate the profile's time."""


@dataclass(frozen=True)
class ProfileSample:
    new_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]
    measured_ms: float
    forward_ms: float = 0.0
    kind: str = "grid"
    """``grid`` (a uniform cell of the grid), ``mixed`` (rows of different shapes) or ``prefill``."""
    contention: float = -1.0
    """Share of the machine's CPU time that *other* processes used while this batch ran (0..1;
    -1 = not measured). On a shared box a busy neighbour inflates wall times several-fold."""

    @property
    def shape(self) -> BatchShape:
        return BatchShape(self.new_tokens, self.context_lens)

    def to_obj(self) -> dict[str, Any]:
        return {"new_tokens": list(self.new_tokens), "context_lens": list(self.context_lens),
                "measured_ms": round(self.measured_ms, 3), "forward_ms": round(self.forward_ms, 3),
                "kind": self.kind, "contention": round(self.contention, 3)}

    @classmethod
    def from_obj(cls, obj: Any) -> ProfileSample:
        if not isinstance(obj, dict):
            raise ValueError("a profile sample must be an object")
        try:
            new = tuple(int(x) for x in obj["new_tokens"])
            ctx = tuple(int(x) for x in obj["context_lens"])
            ms = float(obj["measured_ms"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad profile sample {obj!r}: {err}") from err
        if not new or len(new) != len(ctx) or not ms > 0:
            raise ValueError(f"bad profile sample {obj!r}")
        return cls(new, ctx, ms, float(obj.get("forward_ms", 0.0) or 0.0), str(obj.get("kind", "grid")),
                   float(obj.get("contention", -1.0)))


@dataclass(frozen=True)
class GridSpec:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    draft_tokens: tuple[int, ...] = DEFAULT_DRAFT_TOKENS
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    repeats: int = DEFAULT_REPEATS
    mixed: int = DEFAULT_MIXED
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch sizes must be >= 1")
        if not self.draft_tokens or min(self.draft_tokens) < 0:
            raise ValueError("draft tokens must be >= 0")
        if not self.contexts or min(self.contexts) < 1:
            raise ValueError("contexts must be >= 1")
        if self.repeats < 1 or self.mixed < 0:
            raise ValueError("repeats must be >= 1 and mixed >= 0")


@dataclass
class Profile:
    samples: list[ProfileSample]
    hardware: dict[str, Any] = field(default_factory=dict)
    target_model: str = ""
    grid: dict[str, Any] = field(default_factory=dict)
    prefill: list[ProfileSample] = field(default_factory=list)
    created: str = ""
    duration_s: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def pairs(
        self, kinds: Sequence[str] = ("grid", "mixed"), max_contention: float | None = None
    ) -> list[tuple[BatchShape, float]]:
        """``(shape, ms)`` of the batch samples of the given kinds (what estimators fit on),
        optionally only those measured while other processes used at most ``max_contention``
        of the CPU (unmeasured contention counts as quiet)."""
        return [(s.shape, s.measured_ms) for s in self.samples if s.kind in kinds
                and (max_contention is None or s.contention <= max_contention)]

    def to_obj(self) -> dict[str, Any]:
        return {
            "kind": KIND, "schema": SCHEMA, "target_model": self.target_model,
            "created": self.created, "duration_s": round(self.duration_s, 1),
            "hardware": self.hardware, "grid": self.grid, "notes": self.notes,
            "samples": [s.to_obj() for s in self.samples],
            "prefill": [s.to_obj() for s in self.prefill],
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_obj(), indent=1) + "\n")

    @classmethod
    def from_obj(cls, obj: Any) -> Profile:
        if not isinstance(obj, dict) or not isinstance(obj.get("samples"), list):
            raise ValueError("not a verifier profile: expected a JSON object with a 'samples' list")
        if obj.get("kind", KIND) != KIND or obj.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"unsupported profile kind/schema {obj.get('kind')!r}/{obj.get('schema')!r}")
        samples = [ProfileSample.from_obj(s) for s in obj["samples"]]
        if not samples:
            raise ValueError("profile holds no samples")
        return cls(
            samples=samples, hardware=dict(obj.get("hardware") or {}),
            target_model=str(obj.get("target_model", "")), grid=dict(obj.get("grid") or {}),
            prefill=[ProfileSample.from_obj(s) for s in obj.get("prefill", []) or []],
            created=str(obj.get("created", "")), duration_s=float(obj.get("duration_s", 0.0) or 0.0),
            notes=dict(obj.get("notes") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        text = Path(path).read_text()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err
        return cls.from_obj(obj)


# ---------------------------------------------------------------------------- hardware
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def hardware_info(device: str = "cpu", dtype: str = "", threads: int | None = None) -> dict[str, Any]:
    """Where a profile was measured (torch is only imported when installed)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "device": device, "dtype": dtype,
    }
    import torch
    import transformers

    info["torch"] = torch.__version__
    info["threads"] = threads if threads is not None else torch.get_num_threads()
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    info["transformers"] = transformers.__version__
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["mem_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


class CpuMeter:
    """How much CPU *other* processes used over an interval: machine busy time from
    ``/proc/stat`` minus this process's own user+system time (all threads), over the machine's
    total. ``None`` where ``/proc/stat`` is unavailable."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def snap(self) -> tuple[float, float, float] | None:
        try:
            vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
        busy = total - vals[3] - (vals[4] if len(vals) > 4 else 0)
        t = os.times()
        return busy / self.hz, total / self.hz, t.user + t.system

    @staticmethod
    def others(a: tuple[float, float, float] | None, b: tuple[float, float, float] | None) -> float:
        if a is None or b is None or b[1] <= a[1]:
            return -1.0
        return min(1.0, max(0.0, (b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1]))


# ---------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class PlannedBatch:
    rows: tuple[tuple[int, int], ...]
    """(draft tokens, context) per row."""
    kind: str

    @property
    def max_ctx(self) -> int:
        return max(c for _, c in self.rows)

    @property
    def tokens(self) -> int:
        return len(self.rows) * max(d + 1 for d, _ in self.rows)


def plan_grid(spec: GridSpec) -> list[PlannedBatch]:
    """The measured batches, in the order to run them.

    Grid cells ``(batch, draft, context)`` with at most ``max_batch_tokens`` padded tokens are
    measured at every context; bigger ones (the slow corner) only at the smallest and largest
    context, which is where their context term shows. Each cell ``repeats`` times, plus ``mixed``
    batches whose rows differ in draft length and context (drawn uniformly between the smallest
    and largest context), since real batches mix. Grouped by context, longest first, shuffled
    within a group so slow drift (thermal, other load) spreads over the grid instead of biasing
    one corner."""
    rng = random.Random(spec.seed)
    ctxs = sorted(set(spec.contexts))
    by_ctx: dict[int, list[PlannedBatch]] = {c: [] for c in ctxs}
    for c in ctxs:
        for b in sorted(set(spec.batch_sizes)):
            for d in sorted(set(spec.draft_tokens)):
                if b * (d + 1) > spec.max_batch_tokens and c not in (ctxs[0], ctxs[-1]):
                    continue
                by_ctx[c] += [PlannedBatch(((d, c),) * b, "grid")] * spec.repeats
    mixed_sizes = [b for b in sorted(set(spec.batch_sizes)) if b >= 2] or [2]
    mixed = []
    for _ in range(spec.mixed):
        b = rng.choice(mixed_sizes)
        rows = tuple((rng.choice(spec.draft_tokens), rng.randint(ctxs[0], ctxs[-1])) for _ in range(b))
        mixed.append(PlannedBatch(rows, "mixed"))
    order: list[PlannedBatch] = []
    for c in reversed(ctxs):
        group = by_ctx[c]
        if c == ctxs[-1]:
            group = group + mixed
        rng.shuffle(group)
        order += group
    return order


# ---------------------------------------------------------------------------- measuring
class Probe(Protocol):
    """What ``run_profile`` needs from a verifier (the CLI wraps ``VerifierEngine``)."""

    vocab_size: int

    def verify(
        self, rows: Sequence[tuple[str, Sequence[int], Sequence[int]]]
    ) -> tuple[float, float, list[tuple[int, int, bool]]]:
        """Verify ``(session_id, committed, draft)`` rows in ONE batch; returns (wall ms, forward
        ms, per row (new tokens fed, cached context before them, cache hit))."""
        ...

    def clone(self, src: str, dst: str) -> bool:
        """Make session ``dst`` a copy of ``src`` (cache and ids); False if unsupported."""
        ...

    def drop(self, session_id: str) -> None: ...


Progress = Callable[[int, int, str], None]
"""(done, total, description of the batch just measured)."""

MASTER = "__profile_master__"


def run_profile(
    probe: Probe,
    spec: GridSpec,
    *,
    target_model: str = "",
    hardware: dict[str, Any] | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    max_contention: float | None = None,
    retries: int = 2,
    max_wait_s: float = 900.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Profile:
    """Measure every batch of ``plan_grid(spec)`` on ``probe``; see the module docstring.

    With ``max_contention``: when other processes used more than that share of the CPU while a
    batch ran, wait until the machine is quiet again (polled every 2 s, at most ``max_wait_s``
    over the whole profile) and measure it again, at most ``retries`` times; the last try is
    kept with its contention recorded, so the profile always covers the whole grid."""
    say = log or (lambda _m: None)
    started = time.monotonic()
    load_before = load_average()
    rng = random.Random(f"{spec.seed}:tokens")
    vocab = probe.vocab_size
    lo, hi = min(100, vocab // 4), vocab - 1
    ctxs = sorted(set(spec.contexts))
    max_ctx = ctxs[-1]
    master_ids = [rng.randint(lo, hi) for _ in range(max_ctx + 1)]
    plan = plan_grid(spec)
    slots = [f"__profile_row{i}__" for i in range(max(len(p.rows) for p in plan))]
    valid: dict[str, int] = {}
    """Per slot: how many leading ids of ``master_ids`` its cache holds (untracked = 0)."""
    prefill: list[ProfileSample] = []

    def do_prefill(sid: str, n: int) -> None:
        wall, fwd, _ = probe.verify([(sid, master_ids[:n], [])])
        prefill.append(ProfileSample((n,), (0,), round(wall, 3), round(fwd, 3), "prefill"))
        valid[sid] = n

    say(f"prefilling a {max_ctx + 1}-token master session (not part of the samples' timing)")
    do_prefill(MASTER, max_ctx + 1)
    can_clone = probe.clone(MASTER, slots[0])
    if can_clone:
        valid[slots[0]] = max_ctx + 1

    def ensure(sid: str, ctx: int) -> None:
        if valid.get(sid, 0) >= ctx + 1:
            return
        if can_clone and probe.clone(MASTER, sid):
            valid[sid] = max_ctx + 1
        else:
            do_prefill(sid, max_ctx + 1)

    def draft(d: int) -> list[int]:
        return [rng.randint(lo, hi) for _ in range(d)]

    # untimed warm-up: the first forwards of a process pay one-off allocations
    for b, d in ((1, 0), (1, max(spec.draft_tokens)), (len(slots), 1)):
        for sid in slots[:b]:
            ensure(sid, max_ctx)
        probe.verify([(sid, master_ids[: max_ctx + 1], draft(d)) for sid in slots[:b]])
        for sid in slots[:b]:
            valid[sid] = max_ctx + 1

    samples: list[ProfileSample] = []
    mismatched = retried = 0
    waited = 0.0
    meter = CpuMeter()

    def measure(pb: PlannedBatch) -> tuple[float, float, list, float]:
        rows = []
        for sid, (d, c) in zip(slots, pb.rows, strict=False):
            ensure(sid, c)
            rows.append((sid, master_ids[: c + 1], draft(d)))
        before = meter.snap()
        wall, fwd, got = probe.verify(rows)
        busy = meter.others(before, meter.snap())
        for sid, (_, c) in zip(slots, pb.rows, strict=False):
            valid[sid] = c + 1  # holds committed (+ any accepted random draft: not master's ids)
        return wall, fwd, got, busy

    def wait_quiet() -> None:
        nonlocal waited
        assert max_contention is not None
        while waited < max_wait_s:
            a = meter.snap()
            sleep(2.0)
            waited += 2.0
            if meter.others(a, meter.snap()) <= max_contention:
                return

    for i, pb in enumerate(plan):
        shape = (f"{len(pb.rows)}x(d{pb.rows[0][0]},c{pb.rows[0][1]})" if pb.kind == "grid"
                 else f"mixed {len(pb.rows)} rows")
        wall, fwd, got, busy = measure(pb)
        tries = 0
        while (max_contention is not None and busy > max_contention and tries < retries
               and waited < max_wait_s):
            if progress is not None:
                progress(i, len(plan), f"{shape}: {wall:.0f} ms with others at {busy:.0%} CPU; "
                         f"waiting for a quiet machine ({waited:.0f}/{max_wait_s:.0f} s used)")
            wait_quiet()
            wall, fwd, got, busy = measure(pb)
            tries += 1
            retried += 1
        planned = [(d + 1, c) for d, c in pb.rows]
        actual = [(n, c) for n, c, _ in got]
        if actual != planned or not all(h for _, _, h in got):
            mismatched += 1  # record what really ran (a cache miss is still a measured batch)
        samples.append(ProfileSample(tuple(n for n, _ in actual), tuple(c for _, c in actual),
                                     round(wall, 3), round(fwd, 3), pb.kind, round(busy, 3)))
        if progress is not None:
            progress(i + 1, len(plan),
                     f"{shape}: {wall:.0f} ms" + (f", others {busy:.0%} CPU" if busy >= 0 else ""))
    for sid in [MASTER, *slots]:
        probe.drop(sid)
    grid = asdict(spec)
    grid["planned_batches"] = len(plan)
    return Profile(
        samples=samples, hardware=dict(hardware or {}), target_model=target_model, grid=grid,
        prefill=prefill, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        duration_s=time.monotonic() - started,
        notes={"load_avg_before": load_before, "load_avg_after": load_average(),
               "cache_miss_batches": mismatched, "cloned_sessions": can_clone,
               "max_contention": max_contention, "retried_batches": retried,
               "waited_s": waited,
               "mean_contention": round(sum(max(s.contention, 0) for s in samples) / len(samples), 3),
               "contended_samples": sum(1 for s in samples if max_contention is not None
                                        and s.contention > max_contention)},
    )
