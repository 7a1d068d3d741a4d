"""Scenario files: every parameter of a simulated deployment in one TOML file.

A scenario is plain data (nested dataclasses below); ``load_scenario(name_or_path)`` reads a
packaged scenario (``libs/wisp/sim/scenarios/NAME.toml``) or any TOML file, rejects unknown
keys with the dotted path of the offender, and ``with_overrides`` applies ``section.key=value``
edits (the CLI's ``--set``). ``docs/simulator.md`` documents every field and where each number
comes from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
MODES = ("wisp", "sled", "centralized")
ENGINES = ("ragged", "padded")
"""``server.engine``: how a verifier executes a batch (docs/simulator.md, "Server engines")."""


class ScenarioError(ValueError):
    """A scenario file or override that cannot be used; the message says what to fix."""


# ---------------------------------------------------------------------- sections
@dataclass
class RunCfg:
    name: str = "unnamed"
    description: str = ""
    seed: int = 0
    duration_s: float = 600.0
    """Length of the measurement window (simulated seconds)."""
    warmup_s: float = 60.0
    """Simulated time before the window; requests submitted then are not recorded."""
    drain_s: float = 300.0
    """After the window, requests submitted inside it get this long to finish; the rest are
    recorded as failed (ok=False), so every recorded request either finishes or fails."""


@dataclass
class SloCfg:
    ttft_ms: float = 2500.0
    tpot_ms: float = 150.0


@dataclass
class WorkloadCfg:
    source: str = "sharegpt"
    """sharegpt: prompt/output lengths from the packaged ShareGPT data; mixed: the prompts of
    ``wisp-cli bench`` (HumanEval, MT-Bench, ShareGPT in turn); traces: replay the
    recorded requests of the acceptance traces (their prompt and output lengths); synthetic:
    log-normal lengths (``*_mean``/``*_cv``)."""
    prompts: int = 2000
    """How many ShareGPT conversations to draw lengths from."""
    chars_per_token: float = 4.0
    """ShareGPT lengths are characters; tokens = chars / this (the usual ~4 chars per BPE token)."""
    template_tokens: int = 20
    """Chat-template tokens added to every prompt."""
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    """The request's max_new_tokens (outputs longer than this are cut, as the drafter does)."""
    min_output_tokens: int = 1
    prompt_mean: float = 300.0
    prompt_cv: float = 1.0
    output_mean: float = 300.0
    output_cv: float = 0.8
    users: str = "closed"
    """closed: each device runs one user who submits, waits for the answer, thinks, repeats;
    poisson: each device receives requests as a Poisson process (queued on the device)."""
    think_s: float = 20.0
    """Mean of the exponential think time between a user's requests (closed loop)."""
    rate_per_device: float = 0.02
    """Requests per second per device (poisson)."""
    retry_s: float = 5.0
    """A closed-loop user whose request was refused (admission control) waits this long
    (exponential mean) before the next one."""
    stagger_s: float = -1.0
    """Closed-loop users start uniformly over [0, stagger_s]; -1: over one think time."""


@dataclass
class AcceptanceCfg:
    source: str = "auto"
    """auto: recorded traces if a file is found, else synthetic; traces; synthetic."""
    traces: str = "auto"
    """A trace JSONL (``wisp-cli trace record``); auto: the newest libs/wisp/assets/*trace*.jsonl."""
    synthetic_easy_accept: float = 0.90
    """Synthetic model: a two-state Markov chain of easy/hard stretches of text; a draft token
    matches the target with this probability in an easy stretch..."""
    synthetic_hard_accept: float = 0.50
    """... and this one in a hard stretch."""
    synthetic_stay: float = 0.90
    """Probability the next token stays in the same state (stretch length ~ 1 / (1 - stay))."""
    synthetic_easy_share: float = 0.80
    """Stationary share of easy tokens."""
    synthetic_sequences: int = 64
    synthetic_length: int = 1024
    target_rate: float = 0.0
    """0: replay the verdicts as recorded. A rate in (0, 1) below the bank's own match rate
    models a weaker draft/target pair: matched positions are turned into mismatches, the least
    confident first (``wisp.sim.workload.scale_acceptance``), until the bank's match rate is
    about this. A rate above the recorded one is refused (nothing invents agreement)."""


@dataclass
class DeviceClassCfg:
    draft_tokens_per_s: float = 50.0
    """Decode speed of the draft model on this device class (mean over devices)."""
    prefill_tokens_per_s: float = 500.0
    """Prompt prefill speed of the draft model (first round only)."""
    device_cv: float = 0.15
    """Spread of speeds between devices of the class (log-normal sigma)."""
    round_jitter_cv: float = 0.05
    """Round-to-round spread of one device's per-token time (log-normal sigma)."""
    network: str = "wifi"
    source: str = ""
    """Where the tokens/s figure comes from (documentation only)."""


@dataclass
class NetworkClassCfg:
    rtt_ms: float = 20.0
    """Median round-trip time between device and server."""
    rtt_cv: float = 0.3
    """Spread of the base RTT between devices (log-normal sigma)."""
    jitter_ms: float = 2.0
    """Mean extra one-way delay per message (exponential)."""
    uplink_mbps: float = 20.0
    downlink_mbps: float = 50.0
    source: str = ""


@dataclass
class DevicesCfg:
    mix: dict[str, float] = field(default_factory=lambda: {"laptop": 1.0})
    """Share of each device class (normalised)."""
    classes: dict[str, DeviceClassCfg] = field(default_factory=lambda: {"laptop": DeviceClassCfg()})
    drafter_hosts: int = 0
    """0: every device drafts on its own hardware (edge). N > 0: the devices are clients of N
    shared drafter processes (``wisp-cli bench`` runs one)."""
    drafter_batch: int = 1
    """With shared drafter hosts: how many queued rounds a host drafts together when it becomes
    free (the drafter service's batched drafting, ``DraftEngine.draft_many``, reads up to 64
    verdicts at once). 1 = one round at a time, FIFO."""
    drafter_batch_growth: float = 0.25
    """A batched step of n rows costs ``1 + growth x (n - 1)`` single-row steps. Measured on the
    2-core CPU (``draft_many``, 4-token rounds): the 0.5B draft 0.39 / 0.26 / 0.16 at n = 4 / 8
    / 16 (111 ms for one row, 371 ms for 16); the tiny test draft 0.40 / 0.33 at n = 8 / 16."""
    bytes_per_draft_token: int = 96
    """Wire size of one drafted token in a DraftBlock (id, probability, features, msgpack)."""
    block_header_bytes: int = 400
    verdict_bytes: int = 300


@dataclass
class NetworkCfg:
    classes: dict[str, NetworkClassCfg] = field(default_factory=lambda: {"wifi": NetworkClassCfg()})
    round_overhead_ms: float = 0.0
    """Fixed per-round software overhead outside drafting and verification (broker hops,
    (de)serialisation, tokenizer); added to the uplink."""


@dataclass
class RooflineCfg:
    """Analytic verify time of one batched target forward on a GPU (docs/simulator.md)."""

    params_b: float = 32.8
    """Target parameters (billions)."""
    weight_bytes_per_param: float = 2.0
    kv_bytes_per_token: float = 262144.0
    """Per cached token: 2 (K,V) x layers x kv_heads x head_dim x bytes."""
    hbm_gb_s: float = 2039.0
    mem_efficiency: float = 0.8
    peak_tflops: float = 312.0
    compute_efficiency: float = 0.6
    fixed_ms: float = 3.0
    """Per-forward overhead (kernel launches, sampling, scheduling)."""
    attn_flops_per_token_ctx: float = 0.0
    """Attention FLOPs per (new token x context token); 0: 4 x hidden x layers (derived)."""
    hidden: int = 5120
    layers: int = 64


@dataclass
class EstimatorCfg:
    kind: str = "linear"
    """The scheduler's verify-time model. linear: ``LinearEstimator`` fitted on the profile;
    learned: the project's ``LearnedEstimator`` fitted on the profile; default: exactly what the
    scheduler service starts with (``default_estimator(settings)``: the shipped model for the
    target on this device kind); prior: ``LinearEstimator``'s untrained prior; file: a model
    JSON (``estimator_file``)."""
    learned_trees: int = 200
    """Trees of a ``learned`` fit (fewer = faster predictions in big simulations)."""
    target_model: str = "qwen-coder-1.5b"
    device: str = "cpu"
    """Settings handed to ``default_estimator`` (kind = default)."""
    estimator_file: str = ""
    online_refit: bool = True
    """Feed every measured batch back (as the estimator service does)."""


@dataclass
class ServerCfg:
    verifiers: int = 1
    speeds: list[float] = field(default_factory=list)
    """Relative speed of each verifier (1.0 = the timing model); empty: all 1.0."""
    timing: str = "roofline"
    """roofline: ``[server.roofline]``; profile: a measured verifier profile (``profile``)."""
    profile: str = "auto"
    """A ``wisp-cli profile verifier`` JSON; auto: the newest libs/wisp/assets/*profile*.json."""
    noise_cv: float = 0.05
    """Batch-to-batch spread of the true verify time (log-normal sigma); a measured profile
    uses its own residual spread when this is negative."""
    truth_fit: str = "learned"
    """Profile timing: the estimator class fitted on the profile as the *true* verify time
    (learned: ``LearnedEstimator``, which also captures non-monotone kernel regimes such as BLAS's;
    linear: ``LinearEstimator``)."""
    prefill_ms_per_token: float = -1.0
    """Profile timing only: extra ms per uncached prompt token beyond what the profile's model
    predicts; -1: trust the profile's model for prefill shapes."""
    engine: str = "ragged"
    """How a verifier executes a batch (docs/simulator.md, "Server engines"). ragged (vLLM-like):
    the truth model prices the rows as they are, and prefill rows are chunked under
    ``max_num_batched_tokens``; padded (this project's HF verifier): every row is padded to the
    batch's longest fed input and longest context, and a prefill is fed whole. The same engine
    and KV model serve every mode."""
    kv_tokens: int = 0
    """KV cache capacity per verifier in tokens (0 = unlimited), paged in blocks of
    ``kv_block_tokens`` (``wisp.sim.kv.PagedKv``): a session holds the blocks of its cached
    context plus the tokens its current round feeds, allocated as they are produced (never from
    the true output length); a new session waits (FIFO) until its first round (prompt + draft)
    fits above the watermark; a running session that needs a block when none is free preempts
    the most recently admitted one (vLLM's recompute preemption)."""
    kv_block_tokens: int = 16
    """Tokens per KV block (vLLM's default block size, ``CacheConfig.DEFAULT_BLOCK_SIZE``)."""
    kv_watermark: float = 0.01
    """Share of the blocks a new session must leave free to be admitted (vLLM's
    ``BlockSpaceManager`` default watermark, 0.01)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one forward (0 = none). The ragged engine cuts prefill rows (first rounds,
    recomputes) to fit it and carries the rest to the next forward(s); verify rows are never cut.
    2048: vLLM's V1 default for the OpenAI API server on an A100-80GB (``EngineArgs.
    _set_default_args``; 8192 on other GPUs of >= 70 GiB such as the H100)."""
    max_num_seqs: int = 256
    """Rows per batch at most, in every mode (caps ``modes.*.max_batch_size``; 0 = no cap).
    256: vLLM's V1 default for the OpenAI API server on an A100-80GB (1024 on an H100)."""
    max_inflight: int = 1
    contention: float = 1.0
    """Shared-CPU slowdown: drafting and verification that overlap take this many times longer
    (1.0 = separate hardware)."""
    roofline: RooflineCfg = field(default_factory=RooflineCfg)
    estimator: EstimatorCfg = field(default_factory=EstimatorCfg)


@dataclass
class ModeCfg:
    draft_k: int = 4
    """Fixed draft length (sled) / maximum draft length handed to the controller (wisp)."""
    controller: str = "auto"
    """wisp only. auto: the drafter's own ``default_policy`` (the shipped learned controller,
    FixedLength fallback); fixed: FixedLength(draft_k)."""
    controller_costs: str = "deployment"
    """wisp with a learned controller: deployment: each device's controller weighs drafting by
    its own draft speed and the deployment's verify estimator; shipped: the costs it was
    trained with."""
    prefill_round: bool = True
    """wisp with a learned controller: round 0 goes undrafted (the first token from the target's
    prefill) while the device prefills its draft model in the background (the drafter's
    ``WISP_PREFILL_ROUND``)."""
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    admission: bool = False
    """Admission control (the drafter's AdmissionController on the scheduler's load snapshot)."""
    admission_headroom: float = 1.0
    site: str = "speculate"
    """wisp only. speculate: every round drafts (as long as the controller says); adaptive: per
    round, draft with a cap or let the server decode the session in its continuous batch
    (``wisp.policy.site.SiteChooser`` on each session's measured draft speed, round trip and
    acceptance and the server's published costs), returning to drafting when that pays again."""
    site_hysteresis: float = 0.1
    """adaptive: a site must be this much better (relative) to move a session."""
    server_run_rounds: int | None = None
    """wisp and sled: tokens the server decodes by itself after a round the controller leaves
    undrafted (k = 0, not the prefill round); None: the services' default
    (``WISP_SERVER_RUN_ROUNDS``), 0: every such round is a round trip."""
    loop: str = "round_trip"
    """centralized only. round_trip: as the services do it (each token is a round from the
    device through the broker); server: the target decodes in a server-side continuous-batching
    loop and streams tokens to the device (no per-token edge round trip)."""


@dataclass
class ModesCfg:
    wisp: ModeCfg = field(default_factory=lambda: ModeCfg(admission=True))
    sled: ModeCfg = field(default_factory=ModeCfg)
    centralized: ModeCfg = field(default_factory=lambda: ModeCfg(draft_k=0))


@dataclass
class SweepCfg:
    devices: list[int] = field(default_factory=lambda: [10, 20, 50, 100])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    breakdown_devices: int = 0
    """Device count of the time-breakdown plot; 0: WISP's capacity point."""


@dataclass
class Scenario:
    scenario: RunCfg = field(default_factory=RunCfg)
    slo: SloCfg = field(default_factory=SloCfg)
    workload: WorkloadCfg = field(default_factory=WorkloadCfg)
    acceptance: AcceptanceCfg = field(default_factory=AcceptanceCfg)
    devices: DevicesCfg = field(default_factory=DevicesCfg)
    network: NetworkCfg = field(default_factory=NetworkCfg)
    server: ServerCfg = field(default_factory=ServerCfg)
    modes: ModesCfg = field(default_factory=ModesCfg)
    sweep: SweepCfg = field(default_factory=SweepCfg)
    source_path: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    """Free-form documentation of the scenario (assumptions and their sources)."""

    @property
    def name(self) -> str:
        return self.scenario.name

    def mode(self, mode: str) -> ModeCfg:
        if mode not in MODES:
            raise ScenarioError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        return getattr(self.modes, mode)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        import hashlib

        return hashlib.blake2b(json.dumps(self.as_dict(), sort_keys=True, default=str).encode(),
                               digest_size=8).hexdigest()

    def validate(self) -> Scenario:
        s = self
        _check(s.scenario.duration_s > 0, "scenario.duration_s must be > 0")
        _check(s.scenario.warmup_s >= 0 and s.scenario.drain_s >= 0,
               "scenario.warmup_s and scenario.drain_s must be >= 0")
        _check(s.slo.ttft_ms > 0 and s.slo.tpot_ms > 0, "slo.ttft_ms and slo.tpot_ms must be > 0")
        _check(s.workload.source in ("sharegpt", "mixed", "traces", "synthetic"),
               f"workload.source {s.workload.source!r}: use sharegpt, mixed, traces or synthetic")
        _check(s.workload.users in ("closed", "poisson"),
               f"workload.users {s.workload.users!r}: use closed or poisson")
        _check(s.workload.max_new_tokens >= 1, "workload.max_new_tokens must be >= 1")
        _check(s.acceptance.source in ("auto", "traces", "synthetic"),
               f"acceptance.source {s.acceptance.source!r}: use auto, traces or synthetic")
        _check(bool(s.devices.mix), "devices.mix is empty: give at least one device class")
        for cls, share in s.devices.mix.items():
            _check(cls in s.devices.classes, f"devices.mix names {cls!r}, which has no "
                   f"[devices.classes.{cls}] section")
            _check(share >= 0 and math.isfinite(share), f"devices.mix.{cls} must be >= 0")
        _check(sum(s.devices.mix.values()) > 0, "devices.mix shares sum to 0")
        for name, c in s.devices.classes.items():
            _check(c.draft_tokens_per_s > 0 and c.prefill_tokens_per_s > 0,
                   f"devices.classes.{name}: tokens/s must be > 0")
            _check(c.network in s.network.classes, f"devices.classes.{name}.network = "
                   f"{c.network!r} has no [network.classes.{c.network}] section")
        for name, n in s.network.classes.items():
            _check(n.rtt_ms >= 0 and n.uplink_mbps > 0 and n.downlink_mbps > 0,
                   f"network.classes.{name}: rtt must be >= 0 and bandwidths > 0")
        _check(s.server.verifiers >= 1, "server.verifiers must be >= 1")
        _check(not s.server.speeds or len(s.server.speeds) == s.server.verifiers,
               "server.speeds must be empty or have one entry per verifier")
        _check(s.server.timing in ("roofline", "profile"),
               f"server.timing {s.server.timing!r}: use roofline or profile")
        _check(s.server.estimator.kind in ("linear", "learned", "default", "prior", "file"),
               f"server.estimator.kind {s.server.estimator.kind!r}: use linear, learned, default, "
               "prior or file")
        _check(s.server.truth_fit in ("learned", "linear"),
               f"server.truth_fit {s.server.truth_fit!r}: use learned or linear")
        _check(s.server.contention >= 1.0, "server.contention must be >= 1.0")
        _check(s.server.engine in ENGINES,
               f"server.engine {s.server.engine!r}: use {' or '.join(ENGINES)}")
        _check(s.server.kv_tokens >= 0, "server.kv_tokens must be >= 0 (0 = unlimited)")
        _check(s.server.kv_block_tokens >= 1, "server.kv_block_tokens must be >= 1")
        _check(0.0 <= s.server.kv_watermark < 1.0, "server.kv_watermark must be in [0, 1)")
        _check(s.server.max_num_batched_tokens >= 0,
               "server.max_num_batched_tokens must be >= 0 (0 = no budget)")
        _check(s.server.max_num_seqs >= 0, "server.max_num_seqs must be >= 0 (0 = no cap)")
        _check(s.devices.drafter_batch >= 1, "devices.drafter_batch must be >= 1")
        _check(s.devices.drafter_batch_growth >= 0.0, "devices.drafter_batch_growth must be >= 0")
        for m in MODES:
            mc = s.mode(m)
            _check(mc.max_batch_size >= 1, f"modes.{m}.max_batch_size must be >= 1")
            _check(mc.draft_k >= 0, f"modes.{m}.draft_k must be >= 0")
            _check(mc.server_run_rounds is None or mc.server_run_rounds >= 0,
                   f"modes.{m}.server_run_rounds must be >= 0")
            _check(mc.loop in ("round_trip", "server"), f"modes.{m}.loop: use round_trip or server")
            _check(mc.site in ("speculate", "adaptive"), f"modes.{m}.site: use speculate or adaptive")
            _check(0.0 <= mc.site_hysteresis < 1.0, f"modes.{m}.site_hysteresis: use a value in [0, 1)")
            _check(mc.controller in ("auto", "fixed"), f"modes.{m}.controller: use auto or fixed")
            _check(mc.controller_costs in ("deployment", "shipped"),
                   f"modes.{m}.controller_costs: use deployment or shipped")
        _check(all(m in MODES for m in s.sweep.modes), f"sweep.modes must be among {MODES}")
        _check(all(int(d) >= 1 for d in s.sweep.devices), "sweep.devices must be >= 1")
        return s


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ScenarioError(msg)


# ---------------------------------------------------------------------- loading
def _build(cls: type, data: Any, path: str) -> Any:
    """Instantiate dataclass ``cls`` from a TOML table, recursively; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{path or 'the file'} must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ScenarioError(f"unknown setting {where!r} (known here: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (types.UnionType, Union) and type(None) in args and len(args) == 2:
        # an optional setting (``int | None``): None (its default, or a scenario written back
        # from a dict) or a value of the type
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is dict:
        _, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ScenarioError(f"{where} must be a table")
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (et,) = get_args(tp)
        if not isinstance(value, list):
            raise ScenarioError(f"{where} must be a list")
        return [_coerce(et, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
            raise ScenarioError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    if tp is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{where} must be a string, got {value!r}")
        return value
    return value


def scenario_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p
    packaged = SCENARIO_DIR / f"{name_or_path}.toml"
    if packaged.exists():
        return packaged
    if p.exists():
        return p
    raise ScenarioError(
        f"no scenario {str(name_or_path)!r}: give a .toml path or one of {', '.join(list_scenarios())}"
    )


def list_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str | Path, overrides: list[str] | None = None) -> Scenario:
    path = scenario_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML ({err})") from None
    sc = from_dict(data)
    sc.source_path = str(path)
    if overrides:
        sc = with_overrides(sc, overrides)
    return sc.validate()


def from_dict(data: dict[str, Any]) -> Scenario:
    sc = _build(Scenario, data, "")
    # a class named in devices.classes inherits nothing; fill missing mix entries as 0
    return sc


def with_overrides(sc: Scenario, overrides: list[str]) -> Scenario:
    """Apply ``a.b.c=value`` edits; the value is parsed as TOML (numbers, booleans, lists,
    strings in quotes) and falls back to a bare string."""
    data = sc.as_dict()
    src = data.pop("source_path", "")
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"override {item!r}: use section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ScenarioError(f"override {key!r}: no section {p!r}")
            node = node[p]
        if not isinstance(node, dict) or (parts[-1] not in node and not _is_map(node)):
            raise ScenarioError(f"override {key!r}: unknown setting {parts[-1]!r}")
        node[parts[-1]] = value
    out = from_dict(data)
    out.source_path = src
    return out


def _is_map(node: dict[str, Any]) -> bool:
    """Free-form maps (devices.mix, notes) accept new keys."""
    return not any(isinstance(v, dict) for v in node.values()) and all(
        isinstance(v, int | float) for v in node.values()
    )
