"""A sensitivity grid of the serving modes' capacity (``wisp-cli sim grid``, docs/sim-grid.md).

One sweep (``wisp.sim.sweep``) answers "how many devices does each mode serve at 90% SLO
attainment" for one setting. Whether WISP's advantage holds depends on the setting, so the grid
repeats the question over the axes that decide it: the KV budget (``server.kv_tokens``), the device
mix (``devices.mix``), the draft/target acceptance (``acceptance.target_rate``) and the verifier
engine (``server.engine``). Each (cell, mode) gets a **capacity search** instead of a fixed sweep:
a fixed list of counts that suits the paper cell wastes most points in a cell whose capacity is
3x larger or smaller.

**Capacity search** (``CapacitySearch``; every evaluated point runs all seeds, statistics from
``wisp.sim.stats``): start at an analytic guess (``analytic_guess``); step geometrically (x
``factor``) up while the mean attainment is at or above the target, down while it is below,
until one count above and one below bracket the crossing; bisect the bracket ``bisect`` times
(or until it is narrower than ``max(1, tol x count)``); then make sure the 95% band's edges cross
inside the evaluated counts (one geometric step out per edge when they do not, at most twice) and
bisect each edge's bracket ``edge_steps`` times. The capacity and its interval are then
``stats.capacity_interval`` over every evaluated count, exactly as in a sweep. The searches of all
modes of a cell run at once, each seed of a point is its own task in the process pool, and a count
evaluated once is reused (the goodput comparison point, a bracket end).

**Bound and regime** (``throughput_bound``, ``kv_lifetime_bound``, ``classify``), at the better
baseline's capacity ``n_b`` (centralized or sled, whichever serves more devices), with the
scenario's roofline ``T(B, q) = fixed + max(mem, comp)`` for ``B`` rows feeding ``q`` tokens each
on ``c`` cached tokens (``mem = (W + B (c + q) kv) / bw``, ``comp = (2 P B q + a B q (c + q/2)) /
flops``, as ``wisp.sim.server.RooflineModel``):

* ``tau = 1 + E[min(run, k)]``: tokens one verify commits per session, from the acceptance bank
  (``run`` = the matched run from a position, ``k`` the longest draft any mode may plan);
* ``B`` = sessions decoding at ``n_b`` (Little's law on the baseline's measured point: committed
  tokens/s x mean TPOT), ``c`` = mean prompt + half the mean output (the mean cached context);
* **throughput bound** ``tau x T(B, 1) / T(B, tau)``: with the verifier the bottleneck, one
  forward of a speculative batch commits ``tau`` tokens per row where a decode step commits one,
  and costs ``T(B, tau)`` instead of ``T(B, 1)`` (an oracle drafter that drafts exactly the
  accepted run; any real drafter feeds more). Memory-bound: ``~ tau``; compute-bound: ``~ 1``;
* **KV lifetime bound** (KV-bound cells): a session holds its KV for its whole life ``L``, so
  every mode holds the same ``S`` sessions and serves ``n = S (think + L) / L`` devices; the
  ratio is at most ``[(think + L_w) / L_w] / [(think + L_b) / L_b]`` with ``L_b = out x TPOT_b``
  (measured) and ``L_w >= out x (t_dev + T(B, tau)) / tau`` (the device's unloaded round with an
  oracle draft). The cell's ``bound`` is the throughput bound, or the smaller of the two when
  KV-bound;
* **regime**, first that applies: ``device`` (D) when more than ``1 - target`` of the devices
  (mix-weighted, class medians) need longer than ``tau_k x TPOT SLO`` for a round's drafting of
  ``k`` tokens plus the round trip, so no verifier can bring attainment to the target; ``kv`` (K)
  when the KV in use at ``n_b`` (peak, mean over seeds) is at least ``KV_BOUND_FILL`` of the
  budget; ``compute`` (C) when ``comp >= mem`` for the speculative batch ``T(B, tau)``, else
  ``memory`` (M).

The grid writes ``grid.json`` after every cell (``--resume`` skips finished cells), then
``grid.png`` (heatmap of the capacity ratio) and ``report.md``. Nothing here prints.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.metrics import ATTAINMENT_TARGET
from wisp.policy.controller import DraftPlan, default_policy
from wisp.policy.session import SessionSpecStats
from wisp.settings import Settings
from wisp.sim.scenario import RooflineCfg, Scenario, ScenarioError, with_overrides
from wisp.sim.simulator import Assets, SimResult, Simulation, load_assets
from wisp.sim.stats import capacity_interval, first_crossing, mean_ci, ratio_range
from wisp.sim.sweep import _cap_ratio, _cap_value, pooled_point
from wisp.sim.workload import load_acceptance

# ---------------------------------------------------------------------- axes
ABLATION = "sled+prefill"
"""SLED with a prefill round (round 0 undrafted while the device prefills its draft model): the
one WISP part that SLED could adopt alone, so WISP's other parts (the learned controller, the
SLO-aware batch policy, admission control) are credited with what is left."""
ADAPTIVE = "wisp+adaptive"
"""WISP with the adaptive site choice (``modes.wisp.site = "adaptive"``: per round, draft or let
the server decode the session; ``wisp.policy.site``). Not in the default modes (it costs about
3x the simulation time); reported beside ``wisp`` with its own ratio when asked for."""
GRID_MODES = ("wisp", "sled", "centralized", ABLATION, ADAPTIVE)
DEFAULT_MODES = ("wisp", "sled", "centralized", ABLATION)
BASELINES = ("centralized", "sled")
"""The ratio is WISP's capacity over the better of these (the ablation is reported, not compared)."""

MIXES: dict[str, dict[str, float]] = {
    "slow": {"raspberry_pi_5": 0.5, "phone": 0.5},
    "paper": {"jetson_orin_nano": 0.25, "raspberry_pi_5": 0.25, "laptop": 0.25, "phone": 0.25},
    "fast": {"jetson_agx_orin": 1.0},
}
"""Named device mixes (classes of ``scenarios/paper.toml``): the slowest two classes, the paper
scenario's own four in equal shares, and a Jetson AGX Orin-class device at 300 draft tok/s."""
ENGINES = ("ragged", "padded")
DEFAULT_KV = (30000, 50000, 100000)
DEFAULT_MIXES = ("slow", "paper", "fast")
DEFAULT_ACCEPTANCE = (0.0, 0.6)
DEFAULT_ENGINES = ENGINES
NEUTRAL_ENGINE = "ragged"
"""What the simulator does when ``server.engine`` does not exist: each row feeds its own tokens
(``RooflineModel`` sums the rows' real shapes), a ragged batch."""

DEFAULT_DURATION_S = 300.0
"""Simulated window per point: half the paper scenario's 600 s, so the 36-cell grid fits in a few
hours on 2 cores (docs/sim-grid.md gives the measured times); 5 seeds make up the shorter window."""
KV_BOUND_FILL = 0.95
"""A cell is KV-bound when the peak KV in use at the baseline's capacity reaches this share of
the budget (reservations are whole-life, so a pool that full turns sessions away)."""
KV_EFFICIENCY = 0.6
"""Share of the KV budget the analytic guess counts as usable: bursty arrivals, block rounding
and the watermark leave part of it idle. Measured on the paper cell (KV 30000, 300 s window,
5 seeds): the capacities, 102-107 devices for wisp, centralized and sled+prefill, are what
0.6 x 30,000 tokens of mean-size sessions give (the guess: 107-111). A guess only: the search
brackets whatever it is."""
REGIME_LETTERS = {"device": "D", "kv": "K", "compute": "C", "memory": "M"}
REGIME_TEXT = {
    "device": "device-bound: the devices' drafting + round trip per round exceeds what the TPOT SLO "
              "allows for the tokens a round commits, for more than 1 - target of the devices",
    "kv": "KV-bound: the KV cache in use at the baseline's capacity is (nearly) the whole budget; "
          "more devices wait for memory whatever the verifier's speed",
    "compute": "compute-bound: the speculative batch's FLOPs exceed its memory traffic, so the "
               "drafted tokens cost verifier time (the gain tends to 1)",
    "memory": "memory-bound: a forward reads the weights and KV whatever the tokens fed, so the "
              "drafted tokens are nearly free (the gain tends to tau)",
}


class GridError(ValueError):
    """A grid that cannot run as asked; the message says what to fix."""


@dataclass(frozen=True)
class Cell:
    """One setting of the grid's axes."""

    kv_tokens: int
    device_mix: str
    acceptance: float
    engine: str

    @property
    def key(self) -> str:
        return f"kv={self.kv_tokens}|mix={self.device_mix}|acc={self.acceptance:g}|engine={self.engine}"

    def overrides(self) -> list[str]:
        """The ``--set`` edits that make this cell out of the base scenario."""
        mix = ", ".join(f"{k} = {v!r}" for k, v in MIXES[self.device_mix].items())
        return [f"server.kv_tokens={self.kv_tokens}", f"devices.mix={{{mix}}}",
                f"acceptance.target_rate={self.acceptance!r}", f'server.engine="{self.engine}"']


@dataclass
class GridParams:
    """Every run parameter of a grid (all recorded in grid.json)."""

    kv: list[int] = field(default_factory=lambda: list(DEFAULT_KV))
    mixes: list[str] = field(default_factory=lambda: list(DEFAULT_MIXES))
    acceptance: list[float] = field(default_factory=lambda: list(DEFAULT_ACCEPTANCE))
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    seeds: int = 5
    duration_s: float = DEFAULT_DURATION_S
    warmup_s: float | None = None
    """None: the scenario's warm-up."""
    overrides: list[str] = field(default_factory=list)
    jobs: int = 2
    factor: float = 1.5
    bisect: int = 3
    edge_steps: int = 1
    edge_extend: int = 2
    tol: float = 0.03
    min_devices: int = 1
    max_devices: int = 2000
    quick: bool = False
    skipped: list[str] = field(default_factory=list)
    """Default axis values left out because the scenario lacks their field (said in grid.json)."""

    @classmethod
    def quick_form(cls) -> GridParams:
        """A grid for tests: one cell, 2 seeds, a 40 s window, a coarse search."""
        return cls(kv=[30000], mixes=["paper"], acceptance=[0.0], engines=[NEUTRAL_ENGINE], seeds=2,
                   duration_s=40.0, warmup_s=10.0, factor=2.0, bisect=1, edge_steps=0, edge_extend=0,
                   tol=0.1, quick=True)

    def cells(self) -> list[Cell]:
        return [Cell(kv, mix, acc, eng) for kv in self.kv for mix in self.mixes
                for acc in self.acceptance for eng in self.engines]

    def as_dict(self) -> dict[str, Any]:
        return {"kv_tokens": list(self.kv), "device_mixes": {m: MIXES[m] for m in self.mixes},
                "acceptance": list(self.acceptance), "engines": list(self.engines),
                "modes": list(self.modes), "seeds": self.seeds, "duration_s": self.duration_s,
                "warmup_s": self.warmup_s, "overrides": list(self.overrides), "jobs": self.jobs,
                "search": {"factor": self.factor, "bisect": self.bisect, "edge_steps": self.edge_steps,
                           "edge_extend": self.edge_extend, "tol": self.tol, "min_devices": self.min_devices,
                           "max_devices": self.max_devices},
                "attainment_target": ATTAINMENT_TARGET, "quick": self.quick,
                "skipped": list(self.skipped), "baselines": list(BASELINES),
                "kv_bound_fill": KV_BOUND_FILL}

    def identity(self) -> dict[str, Any]:
        """What a resumed grid must share with the one it continues (not the axes: a resumed run
        may add or drop cells; not ``jobs``)."""
        d = self.as_dict()
        return {k: d[k] for k in ("modes", "seeds", "duration_s", "warmup_s", "overrides", "search",
                                  "attainment_target")}


def check_axes(sc: Scenario, params: GridParams) -> GridParams:
    """Refuse axis values the scenario cannot express, with what to fix."""
    for m in params.mixes:
        if m not in MIXES:
            raise GridError(f"unknown device mix {m!r}: use {', '.join(MIXES)}")
        missing = [c for c in MIXES[m] if c not in sc.devices.classes]
        if missing:
            raise GridError(f"device mix {m!r} needs the class(es) {', '.join(missing)}, which scenario "
                            f"{sc.name!r} does not define ([devices.classes.NAME]); use the paper scenario")
    for a in params.acceptance:
        if not (0.0 <= a < 1.0):
            raise GridError(f"acceptance {a}: use 0 (as recorded) or a rate in (0, 1)")
    for e in params.engines:
        if e not in ENGINES:
            raise GridError(f"unknown engine {e!r}: use {', '.join(ENGINES)}")
    for m in params.modes:
        if m not in GRID_MODES:
            raise GridError(f"unknown mode {m!r}: use {', '.join(GRID_MODES)}")
    if params.seeds < 1:
        raise GridError("seeds must be >= 1")
    return params


def base_scenario(sc: Scenario, params: GridParams) -> Scenario:
    """The scenario every cell starts from: the run's window, warm-up and ``--set`` edits."""
    ov = [f"scenario.duration_s={params.duration_s!r}", *params.overrides]
    if params.warmup_s is not None:
        ov.append(f"scenario.warmup_s={params.warmup_s!r}")
    return _validated(with_overrides(sc, ov), sc.source_path)


def cell_scenario(base: Scenario, cell: Cell) -> Scenario:
    """``base`` with the cell's axis values (``Cell.overrides``)."""
    return _validated(with_overrides(base, cell.overrides()), base.source_path)


def preflight(base: Scenario, params: GridParams) -> None:
    """Build every cell's scenario and load each acceptance value's bank once, so a value that
    cannot run (a target rate above the recorded match rate, a class a mix lacks) is an error
    before hours of other cells, not when its cell comes."""
    seen: set[float] = set()
    for cell in params.cells():
        sc = cell_scenario(base, cell)
        if cell.acceptance in seen:
            continue
        seen.add(cell.acceptance)
        try:
            load_acceptance(sc.acceptance, sc.scenario.seed)
        except ScenarioError as err:
            raise GridError(str(err)) from None


def _validated(sc: Scenario, src: str) -> Scenario:
    sc.source_path = src
    try:
        return sc.validate()
    except ScenarioError as err:
        raise GridError(str(err)) from None


# ---------------------------------------------------------------------- the ablation's policy
@dataclass(frozen=True)
class PrefillFixed:
    """SLED's ``FixedLength(k)`` with WISP's prefill round: round 0 goes undrafted (the first token
    comes from the target's prefill) while the device prefills its draft model, as the learned
    controller does with ``prefill_round``. ``modes.sled.prefill_round`` cannot express it: the
    drafter's ``default_policy`` gives sled a plain ``FixedLength`` whatever that setting says."""

    k: int
    name: str = "fixed+prefill"

    def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan:
        if stats.rounds == 0 and budget > 0:
            return DraftPlan(max_k=0, prefill=True)
        return DraftPlan(max_k=max(0, min(self.k, budget)))


def simulate_mode(sc: Scenario, mode: str, n: int, assets: Assets, seed: int) -> SimResult:
    """One run of a grid mode (``sled+prefill``: sled with ``PrefillFixed``)."""
    if mode == ABLATION:
        return Simulation(sc, "sled", n, assets=assets, seed=seed,
                          policy=PrefillFixed(sc.modes.sled.draft_k)).run()
    if mode == ADAPTIVE:
        return Simulation(with_overrides(sc, ["modes.wisp.site=adaptive"]), "wisp", n, assets=assets,
                          seed=seed).run()
    return Simulation(sc, mode, n, assets=assets, seed=seed).run()


# ---------------------------------------------------------------------- capacity search
def _down(n: int, factor: float, lo: int) -> int:
    return max(lo, min(n - 1, math.floor(n / factor)))


def _up(n: int, factor: float, hi: int) -> int:
    return min(hi, max(n + 1, math.ceil(n * factor)))


def _around(ns: Sequence[int], x: float) -> tuple[int, int] | None:
    """The evaluated counts on either side of ``x`` (None at the ends)."""
    below = [n for n in ns if n <= x]
    above = [n for n in ns if n > x]
    return (max(below), min(above)) if below and above else None


@dataclass
class CapacitySearch:
    """The capacity search of one (cell, mode) as an ask/tell object (module docstring):
    ``next_points()`` says which device counts to run now ([] when done), ``tell(n, per_seed)``
    takes a point's per-seed attainments. Points already told are never asked again."""

    guess: int
    target: float = ATTAINMENT_TARGET
    factor: float = 1.5
    bisect: int = 3
    edge_steps: int = 1
    tol: float = 0.03
    min_devices: int = 1
    max_devices: int = 2000
    edge_extend: int = 2
    """At most this many geometric steps out per band edge that does not cross inside."""
    points: dict[int, list[float]] = field(default_factory=dict)
    done: bool = False
    _bisected: int = 0
    _edges: dict[str, int] = field(default_factory=lambda: {"lo": 0, "hi": 0, "lo_out": 0, "hi_out": 0})

    def __post_init__(self) -> None:
        if self.factor <= 1.0:
            raise ValueError("the geometric step factor must be > 1")
        self.guess = min(self.max_devices, max(self.min_devices, int(self.guess)))

    def tell(self, n: int, per_seed: Sequence[Any]) -> None:
        self.points[int(n)] = [float(v) if v is not None else math.nan for v in per_seed]

    def _narrow(self, a: int, b: int) -> bool:
        return b - a <= max(1, self.tol * a)

    def next_points(self) -> list[int]:
        out = self._next()
        out = sorted({n for n in out if n not in self.points})
        if not out:
            self.done = True
        return out

    def _next(self) -> list[int]:
        if self.done:
            return []
        if not self.points:
            return [self.guess]
        ns = sorted(self.points)
        means = [mean_ci(self.points[n])[0] for n in ns]
        m = first_crossing(ns, means, self.target)
        if m.status == "empty":
            return []
        if m.status == "below":
            return [] if ns[0] <= self.min_devices else [_down(ns[0], self.factor, self.min_devices)]
        if m.status == "above" and ns[-1] < self.max_devices:
            return [_up(ns[-1], self.factor, self.max_devices)]
        if m.status == "crossed" and self._bisected < self.bisect:
            br = _around(ns, float(m.value or 0.0))
            if br is not None and not self._narrow(*br):
                self._bisected += 1
                return [(br[0] + br[1]) // 2]
        # the band's edges: out until they cross, then bisect their brackets
        cap = capacity_interval(ns, [self.points[n] for n in ns], self.target)
        asks: list[int] = []
        st = cap["status"]
        if st["lo"] == "below" and ns[0] > self.min_devices and self._edges["lo_out"] < self.edge_extend:
            self._edges["lo_out"] += 1
            asks.append(_down(ns[0], self.factor, self.min_devices))
        elif st["lo"] == "crossed" and self._edges["lo"] < self.edge_steps:
            br = _around(ns, float(cap["lo"]))
            if br is not None and not self._narrow(*br):
                self._edges["lo"] += 1
                asks.append((br[0] + br[1]) // 2)
        if st["hi"] == "above" and ns[-1] < self.max_devices and self._edges["hi_out"] < self.edge_extend:
            self._edges["hi_out"] += 1
            asks.append(_up(ns[-1], self.factor, self.max_devices))
        elif st["hi"] == "crossed" and self._edges["hi"] < self.edge_steps:
            br = _around(ns, float(cap["hi"]))
            if br is not None and not self._narrow(*br):
                self._edges["hi"] += 1
                asks.append((br[0] + br[1]) // 2)
        return asks

    def result(self) -> dict[str, Any]:
        """``stats.capacity_interval`` over every evaluated count, plus how many were run."""
        ns = sorted(self.points)
        if not ns:
            return {"mean": None, "lo": None, "hi": None, "status": {"mean": "empty", "lo": "empty",
                    "hi": "empty"}, "censored": None, "swept": None, "seeds": 0, "evaluated": 0}
        cap = capacity_interval(ns, [self.points[n] for n in ns], self.target)
        cap["evaluated"] = len(ns)
        return cap


def run_search(search: CapacitySearch, evaluate: Callable[[int], Sequence[float]]) -> dict[str, Any]:
    """Drive ``search`` to the end with a serial ``evaluate(n) -> per-seed attainments``."""
    while True:
        asks = search.next_points()
        if not asks:
            return search.result()
        for n in asks:
            search.tell(n, evaluate(n))


def capacity_point(cap: dict[str, Any]) -> int | None:
    """The whole device count at a capacity (as ``SweepResult.capacity_point``): the largest count
    under the mean crossing; the largest evaluated count when the search ended above the target;
    None below it."""
    st = cap["status"]["mean"]
    if st == "crossed":
        return max(1, math.floor(cap["mean"]))
    if st == "above" and cap.get("swept"):
        return int(cap["swept"][1])
    return None


# ---------------------------------------------------------------------- analytic model
@dataclass(frozen=True)
class Roofline:
    """``RooflineModel``'s arithmetic with its parts exposed, for fractional shapes (``B`` rows
    each feeding ``q`` tokens on ``c`` cached ones)."""

    cfg: RooflineCfg

    def parts(self, rows: float, new: float, ctx: float) -> dict[str, float]:
        c = self.cfg
        bw = c.hbm_gb_s * 1e9 * c.mem_efficiency / 1000.0  # bytes per ms
        fl = c.peak_tflops * 1e12 * c.compute_efficiency / 1000.0  # flops per ms
        attn = c.attn_flops_per_token_ctx or 4.0 * c.hidden * c.layers
        weights = c.params_b * 1e9 * c.weight_bytes_per_param / bw
        kv = rows * (ctx + new) * c.kv_bytes_per_token / bw
        comp = (2.0 * c.params_b * 1e9 * rows * new + attn * rows * new * (ctx + new * 0.5)) / fl
        mem = weights + kv
        return {"weights_ms": weights, "kv_ms": kv, "memory_ms": mem, "compute_ms": comp,
                "fixed_ms": c.fixed_ms, "total_ms": c.fixed_ms + max(mem, comp)}

    def ms(self, rows: float, new: float, ctx: float) -> float:
        return self.parts(rows, new, ctx)["total_ms"]


def tau_of(match: Sequence[bool], k: int) -> float:
    """Tokens one verify commits per session with up to ``k`` drafted: ``1 + E[min(run, k)]`` over
    every position of the acceptance ring (``run`` = matched positions from there on; the ring
    wraps as the simulator reads it)."""
    n = len(match)
    if n == 0 or k <= 0:
        return 1.0
    run = [0] * n
    nxt = 0
    # two passes backwards: the second sees the wrap-around run
    for _ in range(2):
        for i in range(n - 1, -1, -1):
            nxt = (nxt + 1) if match[i] else 0
            run[i] = min(nxt, k)
    return 1.0 + sum(run) / n


def device_round_ms(sc: Scenario, drafted: float) -> dict[str, float]:
    """Each device class's unloaded round without the verify: ``drafted`` draft forwards at the
    class's median speed, the median RTT plus the mean jitter both ways, the per-round software
    overhead and the block's bytes on the uplink and the verdict's on the downlink."""
    out: dict[str, float] = {}
    d = sc.devices
    for cls in d.mix:
        c = d.classes[cls]
        net = sc.network.classes[c.network]
        up = (d.block_header_bytes + drafted * d.bytes_per_draft_token) * 8.0 / (net.uplink_mbps * 1e3)
        down = d.verdict_bytes * 8.0 / (net.downlink_mbps * 1e3)
        out[cls] = (drafted * 1000.0 / c.draft_tokens_per_s + net.rtt_ms + 2.0 * net.jitter_ms
                    + sc.network.round_overhead_ms + up + down)
    return out


def _shares(sc: Scenario) -> dict[str, float]:
    tot = sum(sc.devices.mix.values())
    return {c: v / tot for c, v in sc.devices.mix.items()}


def throughput_bound(rl: Roofline, rows: float, ctx: float, tau: float) -> dict[str, Any]:
    """``tau x T(B, 1) / T(B, tau)`` (module docstring) with both batches' parts."""
    dec = rl.parts(rows, 1.0, ctx)
    ver = rl.parts(rows, tau, ctx)
    return {"decode": dec, "verify": ver, "ratio": tau * dec["total_ms"] / ver["total_ms"]}


def kv_lifetime_bound(think_s: float, out_tokens: float, tpot_base_ms: float,
                      per_token_wisp_ms: float) -> float:
    """``[(think + L_w) / L_w] / [(think + L_b) / L_b]`` with ``L = out x per-token time``: with KV
    the limit, every mode holds the same sessions, and a mode serves more devices only by holding
    each for less of the device's cycle (module docstring)."""
    lb = out_tokens * tpot_base_ms / 1000.0
    lw = out_tokens * per_token_wisp_ms / 1000.0
    if lb <= 0 or lw <= 0:
        return math.inf
    return ((think_s + lw) / lw) / ((think_s + lb) / lb)


def classify(*, device_share_over: float, kv_fill: float | None, compute_ms: float,
             memory_ms: float, target: float = ATTAINMENT_TARGET) -> str:
    """The regime name (module docstring): device, kv, compute or memory, first that applies."""
    if device_share_over > 1.0 - target + 1e-12:
        return "device"
    if kv_fill is not None and kv_fill >= KV_BOUND_FILL:
        return "kv"
    return "compute" if compute_ms >= memory_ms else "memory"


@dataclass(frozen=True)
class CellModel:
    """The numbers of a cell the analytic parts need, read once from its scenario and assets."""

    tau_k: float
    """tau with the baseline's draft length (sled's ``draft_k``): the device-bound rule's."""
    tau_max: float
    """tau with the longest draft any mode plans (WISP's controller ``max_k``): the bounds'."""
    k: int
    k_max: int
    prompt_mean: float
    out_mean: float

    @classmethod
    def of(cls, sc: Scenario, assets: Assets) -> CellModel:
        k = max(1, sc.modes.sled.draft_k)
        pol = default_policy(Settings(mode="wisp", draft_k=sc.modes.wisp.draft_k))
        # the longest round the policy drafts for a session past its (possibly undrafted) first
        k_max = max(k, pol.plan(SessionSpecStats(rounds=1), 1 << 20).max_k, sc.modes.wisp.draft_k)
        shapes = assets.shapes
        cap = sc.workload.max_new_tokens
        pm = sum(s.prompt_len for s in shapes) / len(shapes)
        om = sum(min(s.output_len, cap) for s in shapes) / len(shapes)
        m = assets.bank.match
        return cls(tau_of(m, k), tau_of(m, k_max), k, k_max, pm, om)


def analytic_guess(sc: Scenario, mode: str, cm: CellModel, *, max_devices: int = 2000) -> int:
    """A first device count for the search: ``S (think + L) / L`` with ``S`` the sessions the
    server can hold (``KV_EFFICIENCY`` x budget / mean KV held per session, and the most whose per-token
    time stays within the TPOT SLO) and ``L`` their life at that load. Within a factor of ~2 is
    all the search needs."""
    rl = Roofline(sc.server.roofline)
    tpot = sc.slo.tpot_ms
    ctx = cm.prompt_mean + cm.out_mean / 2.0
    # paged KV: a session holds its context, on average prompt + half the output
    foot = ctx
    kv = sc.server.kv_tokens * sc.server.verifiers
    s_kv = KV_EFFICIENCY * kv / foot if kv > 0 else math.inf
    base = mode if mode in ("wisp", "sled", "centralized") else ("wisp" if mode == ADAPTIVE else "sled")
    mc = sc.mode(base)
    shares = _shares(sc)
    if base == "centralized":
        dev = 0.0 if mc.loop == "server" else sum(
            shares[c] * v for c, v in device_round_ms(sc, 0).items())
        q, tau = 1.0, 1.0
    else:
        dev = sum(shares[c] * v for c, v in device_round_ms(sc, cm.k).items())
        q, tau = cm.k + 1.0, cm.tau_k

    def per_token(s: float) -> float:
        return (dev + rl.ms(max(1.0, s) / sc.server.verifiers, q, ctx)) / tau

    s_lat = 0
    limit = min(mc.max_batch_size * sc.server.verifiers * 4, 20000)
    while s_lat < limit and per_token(s_lat + 1) <= tpot:
        s_lat += 1
    s = min(s_kv, float(s_lat))
    if s < 1:
        return 2
    life = cm.out_mean * per_token(s) / 1000.0
    n = s * (sc.workload.think_s + life) / life
    return int(min(max_devices, max(2, round(n))))


def bound_and_regime(sc: Scenario, cm: CellModel, baseline_point: dict[str, Any] | None,
                     baseline: str | None, devices: int | None,
                     target: float = ATTAINMENT_TARGET) -> dict[str, Any]:
    """The cell's analytical bound of WISP's capacity ratio and its regime (module docstring),
    from the better baseline's point at its capacity (analytic stand-ins where it is missing)."""
    rl = Roofline(sc.server.roofline)
    tpot = sc.slo.tpot_ms
    ctx = cm.prompt_mean + cm.out_mean / 2.0
    p = baseline_point or {}
    x = p.get("throughput_tokens_per_s")
    tp = p.get("tpot_mean_ms")
    measured = _num(x) and _num(tp)
    rows = max(1.0, float(x) * float(tp) / 1000.0) if measured else 1.0
    rows_per_verifier = rows / sc.server.verifiers
    tb = throughput_bound(rl, rows_per_verifier, ctx, cm.tau_max)
    budget = sc.server.kv_tokens * sc.server.verifiers
    peak = p.get("kv_peak_tokens")
    if budget <= 0:
        kv_fill: float | None = 0.0
    elif _num(peak):
        kv_fill = float(peak) / budget
    else:
        kv_fill = None
    dev_k = device_round_ms(sc, cm.k)
    round_budget = cm.tau_k * tpot
    shares = _shares(sc)
    over = sum(shares[c] for c, v in dev_k.items() if v > round_budget)
    regime = classify(device_share_over=over, kv_fill=kv_fill, compute_ms=tb["verify"]["compute_ms"],
                      memory_ms=tb["verify"]["memory_ms"], target=target)
    dev_oracle = sum(shares[c] * v for c, v in device_round_ms(sc, cm.tau_max - 1.0).items())
    per_token_w = (dev_oracle + tb["verify"]["total_ms"]) / cm.tau_max
    kv_ratio = (kv_lifetime_bound(sc.workload.think_s, cm.out_mean, float(tp), per_token_w)
                if regime == "kv" and _num(tp) else None)
    ratio = tb["ratio"] if kv_ratio is None else min(tb["ratio"], kv_ratio)
    return {
        "ratio": ratio,
        "throughput_ratio": tb["ratio"],
        "kv_lifetime_ratio": kv_ratio,
        "regime": regime,
        "regime_letter": REGIME_LETTERS[regime],
        "baseline": baseline,
        "devices": devices,
        "measured": bool(measured),
        "tau": cm.tau_max,
        "k": cm.k_max,
        "tau_k": cm.tau_k,
        "draft_k": cm.k,
        "rows": rows,
        "context_tokens": ctx,
        "decode": tb["decode"],
        "verify": tb["verify"],
        "kv_in_use": float(peak) if _num(peak) else None,
        "kv_budget": budget,
        "kv_fill": kv_fill,
        "device_round_ms": dev_k,
        "round_budget_ms": round_budget,
        "device_share_over_budget": over,
        "wisp_per_token_ms_min": per_token_w,
        "baseline_tpot_ms": float(tp) if _num(tp) else None,
    }


def _num(v: Any) -> bool:
    return v is not None and not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


# ---------------------------------------------------------------------- running
_CACHE: dict[str, tuple[Scenario, Assets]] = {}


def _assets_for(sc: Scenario) -> Assets:
    """A worker's assets for a cell's scenario, loaded once per cell (a few per worker)."""
    key = sc.digest()
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        hit = (sc, load_assets(sc))
        _CACHE[key] = hit
    return hit[1]


def _seed_task(sc: Scenario, mode: str, n: int, seed: int) -> SimResult:
    """One seed of one point (a pool task: the seeds of a point run in parallel)."""
    import logging

    logging.getLogger("wisp").setLevel(logging.ERROR)
    return simulate_mode(sc, mode, n, _assets_for(sc), seed)


class _Inline(Executor):
    """``--jobs 1``: run each task when it is submitted."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as err:  # handed to the caller through the future
            f.set_exception(err)
        return f


POINT_FIELDS = ("devices", "seeds", "slo_attainment", "slo_attainment_ci", "slo_attainment_seeds",
                "goodput_tokens_per_s", "goodput_tokens_per_s_ci", "throughput_tokens_per_s",
                "tpot_mean_ms", "ttft_p90_ms", "acceptance_rate", "mean_accepted_per_round",
                "kv_peak_tokens", "kv_waits", "refused", "mean_batch_rounds", "verifier_utilisation",
                "wall_s", "draft_policy")
"""What grid.json keeps of each evaluated point (``sweep.pooled_point``'s fields)."""

PointCallback = Callable[[Cell, str, int, dict[str, Any]], None]


def run_cell(base: Scenario, cell: Cell, params: GridParams, executor: Executor, *,
             on_point: PointCallback | None = None,
             on_plan: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Every mode's capacity search in one cell, then each mode at the better baseline's
    capacity, the ratio, the bound and the regime: the cell's entry of grid.json."""
    t0 = time.perf_counter()
    sc = cell_scenario(base, cell)
    try:
        assets = load_assets(sc)
    except ScenarioError as err:
        raise GridError(f"cell {cell.key}: {err}") from None
    cm = CellModel.of(sc, assets)
    seeds = [sc.scenario.seed + i for i in range(params.seeds)]
    searches = {m: CapacitySearch(analytic_guess(sc, m, cm, max_devices=params.max_devices),
                                  factor=params.factor, bisect=params.bisect,
                                  edge_steps=params.edge_steps, edge_extend=params.edge_extend,
                                  tol=params.tol,
                                  min_devices=params.min_devices, max_devices=params.max_devices)
                for m in params.modes}
    guesses = {m: s.guess for m, s in searches.items()}
    points: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in params.modes}
    pending: dict[tuple[str, int], list[Future[Any]]] = {}

    def launch(m: str, n: int) -> None:
        if n in points[m] or (m, n) in pending:
            return
        pending[(m, n)] = [executor.submit(_seed_task, sc, m, n, s) for s in seeds]
        if on_plan:
            on_plan(1)

    def collect() -> None:
        futs = [f for fs in pending.values() for f in fs]
        if futs and not all(f.done() for f in futs):
            wait(futs, return_when=FIRST_COMPLETED)
        for (m, n), fs in list(pending.items()):
            if all(f.done() for f in fs):
                del pending[(m, n)]
                p = pooled_point([f.result() for f in fs])
                pt = {k: p.get(k) for k in POINT_FIELDS}
                points[m][n] = pt
                if m in searches:
                    searches[m].tell(n, pt["slo_attainment_seeds"])
                if on_point:
                    on_point(cell, m, n, pt)

    while True:
        for m, s in searches.items():
            if s.done or any(k[0] == m for k in pending):
                continue
            for n in s.next_points():
                launch(m, n)
        if not pending:
            break
        collect()
    caps = {m: s.result() for m, s in searches.items()}
    base_modes = [m for m in BASELINES if m in caps]
    best = max(base_modes, key=lambda m: _cap_value(caps[m])) if base_modes else None
    n_b = capacity_point(caps[best]) if best else None
    if n_b:
        for m in params.modes:
            launch(m, n_b)
        while pending:
            collect()
        # the goodput point is one more evaluated count: every capacity uses it, as a sweep does
        caps = {m: s.result() for m, s in searches.items()}
    goodput: dict[str, Any] = {"devices": n_b, "baseline": best}
    if base_modes:
        best = max(base_modes, key=lambda m: _cap_value(caps[m]))
    for m in params.modes:
        pt = points[m].get(n_b) if n_b else None
        ci = (pt or {}).get("goodput_tokens_per_s_ci") or [None, None]
        goodput[m] = ({"mean": pt.get("goodput_tokens_per_s"), "lo": ci[0], "hi": ci[1]}
                      if pt else None)
    ratio, ratio_bound, rr = None, None, None
    if best and "wisp" in caps:
        ratio, ratio_bound = _cap_ratio(caps["wisp"], caps[best])
        rr = ratio_range(caps["wisp"], caps[best])
    adaptive = None
    if best and ADAPTIVE in caps:
        a_ratio, a_bound = _cap_ratio(caps[ADAPTIVE], caps[best])
        adaptive = {"ratio": a_ratio, "censored": a_bound, "range": ratio_range(caps[ADAPTIVE], caps[best])}
    model = bound_and_regime(sc, cm, points[best].get(n_b) if best and n_b else None, best, n_b)
    return {
        "key": cell.key,
        "kv_tokens": cell.kv_tokens,
        "device_mix": cell.device_mix,
        "device_mix_shares": MIXES[cell.device_mix],
        "acceptance": cell.acceptance,
        "engine": cell.engine,
        "acceptance_match_rate": assets.bank.acceptance_rate(),
        "capacity": caps,
        "best_baseline": best,
        "goodput_at_baseline_capacity": goodput,
        "ratio_vs_best_baseline": ratio,
        "ratio_censored": ratio_bound,
        "ratio_range": rr,
        "adaptive_ratio_vs_best_baseline": adaptive,
        "regime": model["regime"],
        "bound": model,
        "guesses": guesses,
        "points": {m: [points[m][n] for n in sorted(points[m])] for m in params.modes},
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def grid_identity(doc: dict[str, Any]) -> dict[str, Any]:
    """What must match for ``--resume``: the scenario (after the run's edits) and the run's
    parameters that change a cell's numbers."""
    return {"scenario_digest": doc.get("scenario_digest"),
            "parameters": {k: doc.get("parameters", {}).get(k) for k in (
                "modes", "seeds", "duration_s", "warmup_s", "overrides", "search", "attainment_target")}}


def load_finished(out: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished cells of an earlier run in ``out`` with the same identity (``--resume``);
    an earlier run with other parameters is an error (its cells would not compare)."""
    path = out / "grid.json"
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GridError(f"{path} cannot be resumed ({err}); remove it or use another --out") from None
    if grid_identity(doc) != identity:
        raise GridError(f"{path} was made with other settings (scenario or seeds, duration, modes, "
                        "search); use another --out, or drop --resume to start over")
    return list(doc.get("cells") or [])


def save_grid(out: Path, doc: dict[str, Any]) -> Path:
    """Write grid.json atomically (an interrupted write leaves the previous file)."""
    from wisp.sim.report import clean_json

    out.mkdir(parents=True, exist_ok=True)
    path = out / "grid.json"
    tmp = out / f".grid.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(clean_json(doc), indent=1, default=str))
    tmp.replace(path)
    return path


def run_grid(sc: Scenario, params: GridParams, out: Path, *, command: str = "", resume: bool = False,
             on_point: PointCallback | None = None, on_plan: Callable[[int], None] | None = None,
             on_cell: Callable[[Cell, dict[str, Any], bool], None] | None = None) -> dict[str, Any]:
    """Run every cell of ``params`` on ``sc`` (already checked with ``check_axes``), writing
    ``out/grid.json`` after each; with ``resume``, cells finished by an earlier run with the same
    identity are kept and skipped (``on_cell(cell, result, skipped)`` says which)."""
    t0 = time.perf_counter()
    base = base_scenario(sc, params)
    doc: dict[str, Any] = {"command": command, "scenario": base.as_dict(), "scenario_name": base.name,
                           "scenario_path": base.source_path, "scenario_digest": base.digest(),
                           "parameters": params.as_dict(), "cells": [], "wall_s": 0.0}
    done = {c["key"]: c for c in load_finished(out, grid_identity(doc))} if resume else {}
    preflight(base, params)
    executor: Executor = (ProcessPoolExecutor(params.jobs) if params.jobs > 1 else _Inline())
    try:
        for cell in params.cells():
            prior = done.get(cell.key)
            if prior is not None:
                doc["cells"].append(prior)
                if on_cell:
                    on_cell(cell, prior, True)
                continue
            res = run_cell(base, cell, params, executor, on_point=on_point, on_plan=on_plan)
            doc["cells"].append(res)
            doc["wall_s"] = round(time.perf_counter() - t0, 2)
            save_grid(out, doc)
            if on_cell:
                on_cell(cell, res, False)
    finally:
        executor.shutdown(cancel_futures=True)
    doc["wall_s"] = round(time.perf_counter() - t0, 2)
    save_grid(out, doc)
    return doc


# ---------------------------------------------------------------------- report
def _cap_text(cap: dict[str, Any] | None) -> str:
    from wisp.sim.report import capacity_text

    return capacity_text(cap, "{:.1f}")


def _f(v: Any, spec: str = "{:.2f}") -> str:
    return spec.format(float(v)) if _num(v) else ("inf" if v == math.inf else "n/a")


def _acc_label(a: float) -> str:
    return "as recorded" if not a else f"acc {a:g}"


def write_heatmap(doc: dict[str, Any], out: Path) -> Path:
    """grid.png: WISP / best baseline capacity ratio, rows kv x mix, columns acceptance x engine,
    each cell annotated with the ratio and the regime letter (blue > 1 > red)."""
    from wisp.sim.report import _plt

    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    cells = doc["cells"]
    rows = sorted({(c["kv_tokens"], c["device_mix"]) for c in cells},
                  key=lambda r: (r[0], list(MIXES).index(r[1]) if r[1] in MIXES else 99))
    cols = sorted({(c["acceptance"], c["engine"]) for c in cells},
                  key=lambda x: (x[0], ENGINES.index(x[1]) if x[1] in ENGINES else 99))
    grid = [[math.nan] * len(cols) for _ in rows]
    text = [[""] * len(cols) for _ in rows]
    for c in cells:
        i = rows.index((c["kv_tokens"], c["device_mix"]))
        j = cols.index((c["acceptance"], c["engine"]))
        r = c.get("ratio_vs_best_baseline")
        grid[i][j] = float(r) if _num(r) else math.nan
        letter = REGIME_LETTERS.get(c.get("regime") or "", "?")
        flag = {"at_least": ">=", "at_most": "<="}.get(c.get("ratio_censored") or "", "")
        text[i][j] = f"{flag}{_f(r)}\n{letter}"
    finite = [v for row in grid for v in row if math.isfinite(v)]
    lo = min(finite + [1.0]) if finite else 0.5
    hi = max(finite + [1.0]) if finite else 2.0
    # at least 0.5 .. 2 so that a ratio near 1 reads pale whatever the grid's spread
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.5), vmax=max(hi, 2.0))
    fig, ax = plt.subplots(figsize=(1.9 * len(cols) + 3.0, 0.65 * len(rows) + 2.0))
    im = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = grid[i][j]
            dark = math.isfinite(v) and (v < 0.65 or v > 1.6)
            ax.text(j, i, text[i][j] or "n/a", ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), [f"{_acc_label(a)}\n{e}" for a, e in cols])
    ax.set_yticks(range(len(rows)), [f"KV {kv // 1000}k / {mix}" for kv, mix in rows])
    ax.set_title("WISP capacity / best baseline (letter: regime D/K/C/M)")
    fig.colorbar(im, ax=ax, label="capacity ratio")
    fig.tight_layout()
    path = out / "grid.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_grid_report(doc: dict[str, Any]) -> str:
    """report.md: the command, a summary table, the heatmap, a table per cell, the regimes."""
    p = doc["parameters"]
    lines = [f"# Capacity sensitivity grid ({doc.get('scenario_name')})", "",
             f"- Command: `{doc.get('command') or 'n/a'}`",
             f"- Scenario: `{doc.get('scenario_path')}` (digest `{doc.get('scenario_digest')}`), "
             f"{p['seeds']} seed(s) per point, {_f(p['duration_s'], '{:.0f}')} s window per run"
             + (f", {_f(p['warmup_s'], '{:.0f}')} s warm-up" if p.get("warmup_s") is not None else ""),
             f"- Axes: KV {p['kv_tokens']}; mixes {', '.join(p['device_mixes'])}; acceptance "
             f"{', '.join(_acc_label(a) for a in p['acceptance'])}; engines {', '.join(p['engines'])}; "
             f"modes {', '.join(p['modes'])}"
             + (f"; overrides {' '.join(p['overrides'])}" if p.get("overrides") else ""),
             f"- Capacity: the device count where the mean SLO attainment over seeds crosses "
             f"{p['attainment_target']:.0%} (interpolated), [95% interval] where the t-band crosses it; "
             f"search: geometric x{p['search']['factor']} from an analytic guess, {p['search']['bisect']} "
             f"bisections, {p['search']['edge_steps']} per band edge",
             f"- Wall time: {_f(sum(c.get('wall_s') or 0.0 for c in doc['cells']), '{:.0f}')} s "
             f"over the cells (this run {_f(doc.get('wall_s'), '{:.0f}')} s, {p['jobs']} worker(s))",
             ]
    if p.get("skipped"):
        lines.append(f"- Skipped: {'; '.join(p['skipped'])}")
    shown = [m for m in GRID_MODES if m in (p.get("modes") or DEFAULT_MODES)]
    lines += ["", "## Summary", "",
              "| KV | mix | acceptance | engine | " + " | ".join(shown) + " | "
              "ratio [range] | bound | regime |",
              "|---:|---|---|---|" + "---:|" * len(shown) + "---:|---:|:---:|"]
    for c in doc["cells"]:
        caps = c["capacity"]
        rr = c.get("ratio_range") or [None, None]
        flag = {"at_least": ">= ", "at_most": "<= "}.get(c.get("ratio_censored") or "", "")
        lines.append(
            f"| {c['kv_tokens']} | {c['device_mix']} | {_acc_label(c['acceptance'])} | {c['engine']} | "
            + " | ".join(_cap_text(caps.get(m)) if m in caps else "-" for m in shown)
            + f" | {flag}{_f(c.get('ratio_vs_best_baseline'))} [{_f(rr[0])}, {_f(rr[1])}] | "
            f"{_f(c['bound'].get('ratio'))} | {REGIME_LETTERS.get(c['regime'], '?')} |")
    lines += ["", "![capacity ratio heatmap](grid.png)", "",
              "Colour: WISP's capacity over the better baseline's (centralized or sled); blue above 1 "
              "(WISP serves more devices), red below. `>=`/`<=`: a capacity was censored by the "
              "search's device limit, so the ratio is a bound. Letter: the regime.", "",
              "## Regimes", ""]
    for name, txt in REGIME_TEXT.items():
        lines.append(f"- **{REGIME_LETTERS[name]}** {txt}.")
    lines += ["", "The bound is `tau x T(B, 1) / T(B, tau)` from the scenario's roofline at the "
              "baseline's batch `B` (the most a verify forward can gain over a decode step), the "
              "smaller of it and the KV lifetime bound in KV-bound cells (docs/sim-grid.md).", "",
              "## Cells", ""]
    for c in doc["cells"]:
        b = c["bound"]
        g = c["goodput_at_baseline_capacity"]
        lines += [f"### KV {c['kv_tokens']}, mix {c['device_mix']}, {_acc_label(c['acceptance'])}, "
                  f"engine {c['engine']}", "",
                  f"Match rate of the acceptance bank {_f(c.get('acceptance_match_rate'), '{:.3f}')}; "
                  f"cell wall time {_f(c.get('wall_s'), '{:.0f}')} s.", "",
                  f"| mode | capacity (devices) [95%] | points run | goodput at {g.get('devices') or 'n/a'} "
                  f"devices (tok/s) [95%] |", "|---|---:|---:|---:|"]
        for m, cap in c["capacity"].items():
            gm = g.get(m) or {}
            gtxt = (f"{_f(gm.get('mean'), '{:.1f}')} [{_f(gm.get('lo'), '{:.1f}')}, "
                    f"{_f(gm.get('hi'), '{:.1f}')}]" if gm else "n/a")
            lines.append(f"| {m} | {_cap_text(cap)} | {cap.get('evaluated', 0)} | {gtxt} |")
        rr = c.get("ratio_range") or [None, None]
        lines += ["", f"- Ratio WISP / {c.get('best_baseline') or 'n/a'}: "
                  f"{_f(c.get('ratio_vs_best_baseline'))} (conservative range {_f(rr[0])} to {_f(rr[1])})"
                  + (f", {c['ratio_censored'].replace('_', ' ')}" if c.get("ratio_censored") else ""),
                  f"- Regime **{b['regime']}**; bound {_f(b['ratio'])} "
                  f"(throughput {_f(b['throughput_ratio'])}"
                  + (f", KV lifetime {_f(b['kv_lifetime_ratio'])}" if b.get("kv_lifetime_ratio") else "")
                  + f"); tau {_f(b['tau'])} (k {b['k']}), tau_{b['draft_k']} {_f(b['tau_k'])}; "
                  f"B {_f(b['rows'], '{:.1f}')} rows on {_f(b['context_tokens'], '{:.0f}')} tokens: "
                  f"decode {_f(b['decode']['total_ms'], '{:.1f}')} ms (weights "
                  f"{_f(b['decode']['weights_ms'], '{:.1f}')}, KV {_f(b['decode']['kv_ms'], '{:.1f}')}, "
                  f"compute {_f(b['decode']['compute_ms'], '{:.1f}')}), verify "
                  f"{_f(b['verify']['total_ms'], '{:.1f}')} ms (compute "
                  f"{_f(b['verify']['compute_ms'], '{:.1f}')}); KV in use "
                  f"{_f(b.get('kv_in_use'), '{:.0f}')} of {b['kv_budget']} "
                  f"({_f(b.get('kv_fill'))}); device round {_f(max(b['device_round_ms'].values()), '{:.0f}')}"
                  f" ms at worst vs {_f(b['round_budget_ms'], '{:.0f}')} ms allowed "
                  f"({_f(b['device_share_over_budget'])} of devices over)", ""]
    return "\n".join(lines)


def write_grid_report(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """grid.png and report.md next to grid.json."""
    out.mkdir(parents=True, exist_ok=True)
    png = write_heatmap(doc, out)
    md = out / "report.md"
    md.write_text(render_grid_report(doc))
    return {"grid": out / "grid.json", "heatmap": png, "report": md}
