"""The simulated server: how long a verification batch really takes, what the scheduler
believes it takes, and how the engine executes a batch (``EngineModel``: ragged or padded rows,
chunked prefill). The paged KV memory that bounds concurrent sessions is ``wisp.sim.kv``.

Two "truth" timing models, both functions of a batch's composition (per row: tokens fed and
cached context before them, exactly ``BatchShape``):

* ``RooflineModel``: an analytic roofline of one batched forward of a dense decoder on a GPU
  (weights + KV read from HBM vs. matmul FLOPs), for the paper-scale scenario;
* ``ProfileModel``: a measured verifier profile (``wisp-cli profile verifier``), fitted with the
  *same* ``LinearEstimator`` the services use, plus the profile's own residual spread.

The scheduler's own estimator is a separate ``LinearEstimator`` (fitted on a profile of the
truth model, refitted online from the batches it observes, as the estimator service does).
``FastLinear`` evaluates a ``LinearEstimator``'s fitted model in plain Python (bit-for-bit the
same formula; checked on construction, falls back to the estimator itself if not), because the
SLO policy calls ``predict`` thousands of times per batch and numpy's per-call overhead would
dominate a 1,000-device run.
"""

from __future__ import annotations

import glob
import json
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.policy import learned_estimator as le
from wisp.policy.estimator import FEATURE_NAMES, BatchShape, LinearEstimator, VerifyTimeEstimator
from wisp.sim.scenario import RooflineCfg, ScenarioError

ASSETS = Path(__file__).resolve().parent.parent / "assets"

_KNOWN_FEATURES = (
    "bias", "rounds", "sum_new", "max_new", "padded_new", "sum_ctx", "max_ctx",
    "padded_attn", "sum_new_ctx",
)


# ---------------------------------------------------------------------- fast linear
class FastLinear:
    """A ``VerifyTimeEstimator`` that evaluates ``inner`` (a ``LinearEstimator``) without numpy.

    ``observe`` goes to ``inner`` (which refits online); the coefficients are re-read whenever
    ``inner.version`` changes. If ``inner`` is not a ``LinearEstimator`` over the known
    features, or the plain-Python formula disagrees with ``inner.predict`` on probe shapes,
    every call is delegated (correct, only slower)."""

    def __init__(self, inner: VerifyTimeEstimator) -> None:
        self.inner = inner
        self._c: list[float] | None = None
        self._seen = -1
        self._alone: dict[tuple[int, int], float] = {}
        self.exact = (
            isinstance(inner, LinearEstimator) and tuple(FEATURE_NAMES) == _KNOWN_FEATURES
        )
        if self.exact:
            self._sync()
            self.exact = self._agrees()

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def model_key(self) -> str:
        return self.inner.model_key

    @property
    def model_scale(self) -> float:
        return self.inner.model_scale

    def annotated(self, model_key: str, model_scale: float, alone_ms: float) -> float | None:
        return self.inner.annotated(model_key, model_scale, alone_ms)

    def _sync(self) -> None:
        self._c = [float(x) for x in self.inner.coef]  # type: ignore[attr-defined]
        self._seen = self.inner.version
        self._alone.clear()

    def _agrees(self) -> bool:
        probes = [BatchShape.of([5], [100]), BatchShape.of([1, 9, 3], [0, 2000, 37]),
                  BatchShape.of([300, 2], [0, 5])]
        for s in probes:
            a, b = self.predict(s), self.inner.predict(s)
            if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9):
                return False
        return True

    def predict(self, shape: BatchShape) -> float:
        if not self.exact:
            return self.inner.predict(shape)
        new = shape.new_tokens
        if len(new) == 1:  # "this round alone": asked for every queued round at every batch
            if self._seen != self.inner.version:
                self._sync()
            key = (new[0], shape.context_lens[0])
            v = self._alone.get(key)
            if v is None:
                v = self._alone[key] = self.predict_rows(new, shape.context_lens)
            return v
        return self.predict_rows(new, shape.context_lens)

    def predict_rows(self, new: Sequence[int], ctx: Sequence[int]) -> float:
        n = len(new)
        if n == 0:
            return 0.0
        if not self.exact:
            return self.inner.predict(BatchShape.of(new, ctx))
        if self._seen != self.inner.version:
            self._sync()
        c = self._c
        assert c is not None
        mn = max(new)
        mc = max(ctx)
        snc = 0
        for a, b in zip(new, ctx, strict=True):
            snc += a * b
        # same features, same order as wisp.policy.estimator.batch_features
        v = (c[0] + c[1] * n + c[2] * sum(new) + c[3] * mn + c[4] * (n * mn) + c[5] * sum(ctx)
             + c[6] * mc + c[7] * (n * mn * (mc + mn) / 1000.0) + c[8] * (snc / 1000.0))
        return v if v > 0.1 else 0.1

    def observe(self, shape: BatchShape, measured_ms: float, now: float | None = None) -> None:
        self.inner.observe(shape, measured_ms, now)

    def to_json(self) -> str:
        return self.inner.to_json()


# ---------------------------------------------------------------------- truth models
class TimeModel:
    """Mean verify time (ms) of a batch whose rows feed ``new`` tokens on ``ctx`` cached ones."""

    name = "model"
    noise_cv = 0.0
    hardware: dict[str, Any] = {}

    def mean_ms(self, new: Sequence[int], ctx: Sequence[int]) -> float:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "noise_cv": self.noise_cv, "hardware": self.hardware}


class RooflineModel(TimeModel):
    """T = fixed + max(memory time, compute time) for one batched forward.

    memory: the weights once plus every row's KV cache (context + new tokens) read from HBM at
    ``hbm_gb_s x mem_efficiency``; compute: 2 x params FLOPs per fed token plus attention
    (4 x hidden x layers per new-token x context-token pair) at ``peak_tflops x
    compute_efficiency``. A decode step of a 32B bf16 model on an A100-80GB is then ~43 ms
    (memory bound) up to ~115 fed tokens per batch, then grows ~0.35 ms per token."""

    name = "roofline"

    def __init__(self, cfg: RooflineCfg, noise_cv: float) -> None:
        self.cfg = cfg
        self.noise_cv = max(0.0, noise_cv)
        self._w = cfg.params_b * 1e9 * cfg.weight_bytes_per_param
        self._bw = cfg.hbm_gb_s * 1e9 * cfg.mem_efficiency / 1000.0  # bytes per ms
        self._fl = cfg.peak_tflops * 1e12 * cfg.compute_efficiency / 1000.0  # flops per ms
        self._attn = cfg.attn_flops_per_token_ctx or 4.0 * cfg.hidden * cfg.layers
        self.hardware = {"model": "roofline", **{k: getattr(cfg, k) for k in (
            "params_b", "weight_bytes_per_param", "hbm_gb_s", "peak_tflops", "mem_efficiency",
            "compute_efficiency", "fixed_ms")}}

    def mean_ms(self, new: Sequence[int], ctx: Sequence[int]) -> float:
        if not new:
            return 0.0
        cfg = self.cfg
        tokens = 0
        kv = 0
        attn = 0.0
        for a, b in zip(new, ctx, strict=True):
            tokens += a
            kv += a + b
            attn += a * (b + a * 0.5)
        mem = (self._w + kv * cfg.kv_bytes_per_token) / self._bw
        comp = (2.0 * cfg.params_b * 1e9 * tokens + self._attn * attn) / self._fl
        return cfg.fixed_ms + (mem if mem > comp else comp)


class ProfileModel(TimeModel):
    """A measured profile (batch and prefill samples) fitted with one of the services'
    estimator classes (``truth_fit``: the ``LearnedEstimator`` by default, else
    ``LinearEstimator``); the batch-to-batch spread is the profile's own residual spread."""

    name = "profile"

    def __init__(self, profile: VerifierProfile, noise_cv: float, prefill_ms_per_token: float,
                 truth_fit: str = "learned") -> None:
        self.profile = profile
        samples = profile.samples + profile.prefill
        self.fit_kind = truth_fit
        est: Any = None
        if truth_fit == "learned":
            est = fit_learned(samples)
        if est is None:
            self.fit_kind = "linear"
            est = FastLinear(fit_linear(samples))
        self.est = est
        self.noise_cv = profile_residual_cv(est, profile.samples) if noise_cv < 0 else noise_cv
        self.prefill_ms_per_token = prefill_ms_per_token
        self.hardware = dict(profile.hardware)
        self.fit_mape = profile_mape(est, samples)

    def mean_ms(self, new: Sequence[int], ctx: Sequence[int]) -> float:
        return self.est.predict(BatchShape.of(new, ctx))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "profile": self.profile.path, "samples": len(self.profile.samples),
                "prefill_samples": len(self.profile.prefill), "fit": self.fit_kind,
                "fit_mape": self.fit_mape}


def fit_learned(samples: Sequence[ProfileSample], trees: int = 200) -> le.LearnedEstimator | None:
    """The project's ``LearnedEstimator`` fitted on ``samples`` (None when there are too few
    samples to fit one)."""
    cfg = le.FitConfig(n_trees=trees) if trees != le.FitConfig().n_trees else None
    try:
        return le.fit([(BatchShape.of(s.new_tokens, s.context_lens), s.measured_ms) for s in samples], cfg)
    except ValueError:
        return None


def lognormal_unit(rng: random.Random, cv: float) -> float:
    """A multiplicative noise factor with mean 1 and log-sd ``cv`` (1.0 when cv = 0)."""
    if cv <= 0:
        return 1.0
    return rng.lognormvariate(-0.5 * cv * cv, cv)


# ---------------------------------------------------------------------- profiles
@dataclass
class ProfileSample:
    new_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]
    measured_ms: float


@dataclass
class VerifierProfile:
    samples: list[ProfileSample]
    hardware: dict[str, Any] = field(default_factory=dict)
    prefill: list[ProfileSample] = field(default_factory=list)
    """Single-row prefill timings (``wisp-cli profile verifier`` records them apart)."""
    path: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _sample_of(obj: Any) -> ProfileSample | None:
    """One batch timing from the many shapes a profile row may take (profile JSON rows,
    TimingSample dicts, {"shape": {...}, "ms": x})."""
    if not isinstance(obj, dict):
        return None
    src = obj.get("shape") if isinstance(obj.get("shape"), dict) else obj
    new = src.get("new_tokens", src.get("new"))
    ctx = src.get("context_lens", src.get("context", src.get("ctx")))
    ms = obj.get("measured_ms", obj.get("ms", obj.get("verify_ms", obj.get("mean_ms"))))
    if isinstance(ms, list):
        ms = sum(ms) / len(ms) if ms else None
    if isinstance(new, int | float) and isinstance(ctx, int | float):
        rows = int(obj.get("rows", obj.get("batch_size", 1)))
        new, ctx = [int(new)] * rows, [int(ctx)] * rows
    if not isinstance(new, list) or not isinstance(ctx, list) or len(new) != len(ctx) or not new:
        return None
    try:
        msf = float(ms)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not math.isfinite(msf) or msf <= 0:
        return None
    return ProfileSample(tuple(int(x) for x in new), tuple(int(x) for x in ctx), msf)


def load_profile(path: str | Path) -> VerifierProfile:
    """Read a verifier profile: a JSON object with ``samples`` (or ``batches``/``rows``/
    ``timings``) and ``hardware``, a bare JSON list of samples, or JSONL of samples. Rows that
    do not parse are skipped; no usable row is an error."""
    p = Path(path)
    text = p.read_text()
    meta: dict[str, Any] = {}
    rows: list[Any]
    obj: Any = None
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            meta = {k: v for k, v in obj.items() if not isinstance(v, list) or k == "hardware"}
            rows = next((obj[k] for k in ("samples", "batches", "rows", "timings", "data")
                         if isinstance(obj.get(k), list)), [])
        elif isinstance(obj, list):
            rows = obj
        else:
            rows = []
    except json.JSONDecodeError:
        rows = []
        for line in text.splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    samples = [s for s in (_sample_of(r) for r in rows) if s is not None]
    prefill: list[ProfileSample] = []
    if isinstance(obj, dict) and isinstance(obj.get("prefill"), list):
        prefill = [s for s in (_sample_of(r) for r in obj["prefill"]) if s is not None]
    if not samples:
        raise ScenarioError(f"{p}: no usable verify timings (expected samples with new_tokens, "
                            "context_lens and measured_ms)")
    hw = meta.get("hardware") if isinstance(meta.get("hardware"), dict) else {}
    if not hw and isinstance(meta.get("device"), str):
        hw = {"device": meta["device"]}
    return VerifierProfile(samples=samples, hardware=hw or {}, prefill=prefill, path=str(p), meta=meta)


def find_asset(pattern: str) -> Path | None:
    """The newest file under libs/wisp/assets matching ``pattern`` (None if none)."""
    found = [Path(x) for x in glob.glob(str(ASSETS / "**" / pattern), recursive=True)]
    found = [f for f in found if f.is_file()]
    if not found:
        return None
    return max(found, key=lambda f: (f.stat().st_mtime, str(f)))


def fit_linear(samples: Sequence[ProfileSample]) -> LinearEstimator:
    """``learned_estimator.fit_linear`` on profile samples (it refits online afterwards)."""
    from wisp.policy.learned_estimator import fit_linear as fit

    return fit([(BatchShape.of(s.new_tokens, s.context_lens), s.measured_ms) for s in samples])


def _pred(est: Any, s: ProfileSample) -> float:
    return float(est.predict(BatchShape.of(s.new_tokens, s.context_lens)))


def profile_mape(est: Any, samples: Sequence[ProfileSample]) -> float:
    errs = [abs(_pred(est, s) - s.measured_ms) / s.measured_ms for s in samples]
    return sum(errs) / len(errs) if errs else float("nan")


def profile_residual_cv(est: Any, samples: Sequence[ProfileSample]) -> float:
    logs = [math.log(s.measured_ms / max(_pred(est, s), 1e-6)) for s in samples]
    if len(logs) < 2:
        return 0.0
    mu = sum(logs) / len(logs)
    return math.sqrt(sum((x - mu) ** 2 for x in logs) / (len(logs) - 1))


def synthetic_profile(model: TimeModel, seed: int = 0, n: int = 400) -> list[ProfileSample]:
    """Profile ``model`` the way ``wisp-cli profile verifier`` profiles a real verifier: a grid
    of batch sizes, draft lengths and contexts (plus some first-round prefill shapes), each
    measured once with the model's noise."""
    rng = random.Random(f"{seed}:profile")
    out: list[ProfileSample] = []
    sizes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    for i in range(n):
        rows = sizes[i % len(sizes)]
        new = [rng.randint(1, 9) for _ in range(rows)]
        ctx = [int(rng.uniform(16, 2048)) for _ in range(rows)]
        if i % 10 == 0:  # a first round: its prompt is uncached
            j = rng.randrange(rows)
            new[j] += rng.randint(16, 1024)
            ctx[j] = 0
        ms = model.mean_ms(new, ctx) * lognormal_unit(rng, model.noise_cv)
        out.append(ProfileSample(tuple(new), tuple(ctx), ms))
    return out


# ---------------------------------------------------------------------- engines
@dataclass(frozen=True)
class EngineModel:
    """How a verifier executes one forward (``server.engine``, docs/simulator.md "Server
    engines"): what shape the truth model prices, and how much of each prefill a forward feeds.

    * ``ragged`` (vLLM-like): rows are priced as they are; under a token budget
      (``max_num_batched_tokens`` > 0) the verify rows go whole and first (vLLM schedules its
      running requests first and never splits a decode), then the prefills, oldest first, each
      cut to what is left of the budget (chunked prefill); what is left of a prefill waits for
      the next forward.
    * ``padded`` (this project's HF verifier): every row is padded to the batch's longest fed
      input and longest context, and a prefill is fed whole (no chunked prefill, no budget)."""

    kind: str = "ragged"
    token_budget: int = 0
    """Tokens per forward (0 = none); only the ragged engine chunks prefills under it."""

    @property
    def chunked(self) -> bool:
        return self.kind == "ragged" and self.token_budget > 0

    def chunks(self, fixed_tokens: int, prefill_left: Sequence[int]) -> list[int]:
        """Tokens of each prefill (in order: oldest first) fed in a forward whose verify rows
        feed ``fixed_tokens``; a prefill that gets 0 waits whole for the next forward."""
        if not self.chunked:
            return list(prefill_left)
        left = self.token_budget - fixed_tokens
        out: list[int] = []
        for rem in prefill_left:
            c = rem if rem <= left else max(0, left)
            out.append(c)
            left -= c
        return out

    def priced(self, new: list[int], ctx: list[int]) -> tuple[list[int], list[int]]:
        """The shape the truth model is asked to price for rows (``new``, ``ctx``)."""
        if self.kind != "padded" or len(new) < 2:
            return new, ctx
        n = len(new)
        return [max(new)] * n, [max(ctx)] * n


# ---------------------------------------------------------------------- KV memory
class KvPool:
    """Static KV reservation (the simulator's model before ``wisp.sim.kv.PagedKv``; kept for
    comparison and its tests, no longer used by the simulator): capacity in tokens (0 =
    unlimited); a session reserves its whole footprint (prompt + output) when its first round
    reaches the server; sessions that do not fit wait first-come-first-served."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = int(capacity_tokens)
        self.used = 0
        self.waiting: deque[Any] = deque()
        self.peak = 0
        self.waits = 0

    @property
    def unlimited(self) -> bool:
        return self.capacity <= 0

    def try_reserve(self, tokens: int) -> bool:
        if self.unlimited:
            return True
        if self.waiting:  # FIFO: nobody jumps the queue
            return False
        need = min(tokens, self.capacity)
        if self.used + need <= self.capacity:
            self.used += need
            self.peak = max(self.peak, self.used)
            return True
        return False

    def release(self, tokens: int) -> None:
        if not self.unlimited:
            self.used -= min(tokens, self.capacity)

    def admit_waiting(self, footprint: Any) -> list[Any]:
        """Pop waiters (FIFO) that now fit; ``footprint(w)`` gives a waiter's tokens."""
        out = []
        while self.waiting:
            need = min(footprint(self.waiting[0]), self.capacity)
            if self.used + need > self.capacity:
                break
            w = self.waiting.popleft()
            self.used += need
            self.peak = max(self.peak, self.used)
            out.append(w)
        return out
