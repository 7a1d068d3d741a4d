"""Draft-length policies (the speculation controller's interface).

The drafter asks the policy, before each round, how far it may draft; the plan's stop callback
is consulted before drafting token i, with the features of the distribution token i would be
drawn from, and ends the round (without token i) when it returns True. A fixed policy is SLED;
the learned controller of the WISP mode (:class:`LearnedController`) implements the same
interface.

The learned controller
----------------------
A small model (logistic regression, or a one-hidden-layer MLP) predicts, from the draft's own
statistics of token ``i`` (top-1 probability, entropy, top-1 - top-2 margin, logit spread), its
position ``i`` in the round and the session's recent acceptance, the probability ``r_i`` that the
target rejects token ``i`` given that every earlier token of the round was accepted (that is the
conditional the traces label: rows stop at the first rejection). Before token ``i`` the plan's
stop callback ends the round when, after at least ``min_k`` tokens,

* ``r_i > threshold`` (the per-token risk rule), or
* ``1 - prod_{j<=i}(1 - r_j) > cum_threshold`` (optional: the chance that some token so far is
  rejected, SpecDec++'s rule), or
* one more token lowers the expected goodput (optional): with ``p_j = 1 - r_j``, drafting ``n``
  tokens commits ``E(n) = 1 + sum_{m<n} prod_{j<=m} p_j`` tokens in expectation (the ``+1`` is the
  target's own correction/bonus token) and costs
  ``round_trip_ms + verify_ms(n + 1, context) + n * draft_ms``; the round ends when
  ``E(i+1) / cost(i+1) < E(i) / cost(i)``. ``round_trip_ms`` is what every round pays whatever its
  length (network, queues, the services): the larger it is, the more one more drafted token pays,
  so a device behind a slow link or a busy server drafts longer rounds.

Everything is pure python (a handful of multiply-adds per drafted token) and deterministic.
The model is stored as plain JSON (schema ``wisp.controller`` v1, never pickle) and validated on
load; :func:`default_policy` gives the wisp mode the controller shipped for its draft model.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from wisp.features import TokenFeatures

if TYPE_CHECKING:
    from wisp.policy.estimator import VerifyTimeEstimator
    from wisp.settings import Settings

log = logging.getLogger(__name__)

StopFn = Callable[[int, TokenFeatures], bool]


@dataclass
class SessionSpecStats:
    """What a policy may know about a session's speculation so far (kept by
    ``wisp.policy.session.SpecSession``).

    ``context_len``: committed ids (prompt + generated) the next round builds on.
    ``draft_ms_per_token``: the device's measured time per draft forward (an EMA; None until a
    round has been measured, when a controller uses the speed it was trained with).
    ``round_trip_ms``: the session's measured time per round outside drafting and verifying
    (network, queues, the services), as its caller's EMA (``LinkEstimate.rtt_ms``) stood when
    this round was planned (``SpecSession.plan`` sets it each time); None until measured, when a
    controller uses the figure in its file.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    recent_acceptance: float = 1.0
    per_position_accepted: list[int] = field(default_factory=list)
    context_len: int = 0
    draft_ms_per_token: float | None = None
    round_trip_ms: float | None = None

    def record(self, drafted: int, accepted: int, alpha: float = 0.3) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            rate = accepted / drafted
            self.recent_acceptance = (1 - alpha) * self.recent_acceptance + alpha * rate
        while len(self.per_position_accepted) < drafted:
            self.per_position_accepted.append(0)
        for i in range(accepted):
            self.per_position_accepted[i] += 1


@dataclass(frozen=True)
class DraftPlan:
    max_k: int
    stop: StopFn | None = None
    prefill: bool = False
    """Round 0 is sent undrafted on purpose: the device prefills its draft model meanwhile."""


class DraftLengthPolicy(Protocol):
    name: str

    def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan: ...


@dataclass(frozen=True)
class FixedLength:
    """SLED: always draft ``k`` tokens (fewer only when the token budget ends sooner);
    ``k = 0`` is centralized decoding (the drafter only relays)."""

    k: int
    name: str = "fixed"

    def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan:
        return DraftPlan(max_k=max(0, min(self.k, budget)))


# ====================================================================== features
BASE_FEATURES: tuple[str, ...] = (
    "top1_prob", "entropy", "margin", "logit_spread", "position", "recent_acceptance",
)
"""The controller's raw inputs for drafted token ``i``."""

_EPS = 1e-4


def _log(x: float) -> float:
    return math.log(max(x, 0.0) + _EPS)


FEATURE_FUNCS: dict[str, Callable[[Sequence[float]], float]] = {
    # raw inputs: v = (top1_prob, entropy, margin, logit_spread, position, recent_acceptance)
    "top1_prob": lambda v: v[0],
    "entropy": lambda v: v[1],
    "margin": lambda v: v[2],
    "logit_spread": lambda v: v[3],
    "position": lambda v: v[4],
    "recent_acceptance": lambda v: v[5],
    # fixed transforms (a linear model on logs separates the confident tail much better)
    "log1m_top1": lambda v: _log(1.0 - v[0]),
    "log_entropy": lambda v: _log(v[1]),
    "log_margin": lambda v: _log(v[2]),
    "log1m_margin": lambda v: _log(1.0 - v[2]),
    "log1m_recent": lambda v: _log(1.0 - v[5]),
    "first": lambda v: 1.0 if v[4] == 0 else 0.0,
}
"""Every feature a controller file may name: the raw inputs and a closed set of transforms of
them (no expression is ever evaluated from a file)."""


def raw_vector(feats: Any, position: int, recent_acceptance: float) -> tuple[float, ...]:
    """The six raw inputs, in ``BASE_FEATURES`` order."""
    return (
        float(feats.top1_prob), float(feats.entropy), float(feats.margin),
        float(feats.logit_spread), float(position), float(recent_acceptance),
    )


# ====================================================================== the risk model
CONTROLLER_SCHEMA = "wisp.controller"
CONTROLLER_SCHEMA_VERSION = 1
MODEL_KINDS = ("logistic", "mlp")


class ControllerFormatError(ValueError):
    """A controller file that is not a valid ``wisp.controller`` v1 JSON document."""


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@dataclass(frozen=True)
class RiskModel:
    """P(the target rejects this token | every earlier token of the round was accepted).

    ``features`` name entries of :data:`FEATURE_FUNCS`; inputs are standardised with
    ``mean``/``scale`` and fed to a logistic model (``coef``, ``intercept``) or to an MLP
    (``hidden``: list of ``(weight[out][in], bias[out])`` layers with ReLU, then ``coef`` /
    ``intercept`` on the last hidden layer). ``position_cap`` clips the position input to the
    largest position seen in training.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    kind: str = "logistic"
    hidden: tuple[tuple[tuple[tuple[float, ...], ...], tuple[float, ...]], ...] = ()
    position_cap: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ControllerFormatError(f"model kind {self.kind!r} is not one of {MODEL_KINDS}")
        unknown = [f for f in self.features if f not in FEATURE_FUNCS]
        if unknown:
            raise ControllerFormatError(f"unknown feature(s) {unknown}; known: {sorted(FEATURE_FUNCS)}")
        n = len(self.features)
        if n == 0 or len(self.mean) != n or len(self.scale) != n:
            raise ControllerFormatError("features, mean and scale must be non-empty and equally long")
        if any(not (s > 0) for s in self.scale):
            raise ControllerFormatError("every scale must be > 0")
        width = n
        for li, (w, b) in enumerate(self.hidden):
            if len(w) != len(b) or not w or any(len(row) != width for row in w):
                raise ControllerFormatError(f"hidden layer {li}: weight must be [{len(b)}][{width}]")
            width = len(b)
        if self.kind == "logistic" and self.hidden:
            raise ControllerFormatError("a logistic model has no hidden layers")
        if self.kind == "mlp" and not self.hidden:
            raise ControllerFormatError("an mlp model needs at least one hidden layer")
        if len(self.coef) != width:
            raise ControllerFormatError(f"coef has {len(self.coef)} entries, expected {width}")
        nums = [*self.mean, *self.scale, *self.coef, self.intercept]
        for w, b in self.hidden:
            nums += [x for row in w for x in row] + list(b)
        if not all(isinstance(x, int | float) and math.isfinite(x) for x in nums):
            raise ControllerFormatError("every weight must be a finite number")
        if self.position_cap is not None and self.position_cap < 0:
            raise ControllerFormatError("position_cap must be >= 0")

    # -- inference ----------------------------------------------------------------------------
    def _inputs(self, raw: Sequence[float]) -> list[float]:
        if self.position_cap is not None and raw[4] > self.position_cap:
            raw = (*raw[:4], float(self.position_cap), *raw[5:])
        return [
            (FEATURE_FUNCS[name](raw) - m) / s
            for name, m, s in zip(self.features, self.mean, self.scale, strict=True)
        ]

    def risk_raw(self, raw: Sequence[float]) -> float:
        x = self._inputs(raw)
        for w, b in self.hidden:
            x = [max(0.0, bi + sum(wi * xi for wi, xi in zip(row, x, strict=True)))
                 for row, bi in zip(w, b, strict=True)]
        z = self.intercept + sum(c * xi for c, xi in zip(self.coef, x, strict=True))
        return _sigmoid(z)

    def risk(self, feats: Any, position: int, recent_acceptance: float) -> float:
        """Predicted rejection probability of drafted token ``position``."""
        return self.risk_raw(raw_vector(feats, position, recent_acceptance))

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "features": list(self.features), "mean": list(self.mean),
            "scale": list(self.scale), "coef": list(self.coef), "intercept": self.intercept,
            "position_cap": self.position_cap,
        }
        if self.hidden:
            out["hidden"] = [{"weight": [list(r) for r in w], "bias": list(b)} for w, b in self.hidden]
        return out

    @classmethod
    def from_dict(cls, obj: Any) -> RiskModel:
        if not isinstance(obj, Mapping):
            raise ControllerFormatError("model must be an object")
        allowed = {"kind", "features", "mean", "scale", "coef", "intercept", "position_cap", "hidden"}
        extra = set(obj) - allowed
        if extra:
            raise ControllerFormatError(f"unknown model field(s) {sorted(extra)}")
        try:
            hidden = tuple(
                (tuple(tuple(float(x) for x in row) for row in layer["weight"]),
                 tuple(float(x) for x in layer["bias"]))
                for layer in obj.get("hidden", [])
            )
            cap = obj.get("position_cap")
            return cls(
                features=tuple(str(f) for f in obj["features"]),
                mean=tuple(float(x) for x in obj["mean"]),
                scale=tuple(float(x) for x in obj["scale"]),
                coef=tuple(float(x) for x in obj["coef"]),
                intercept=float(obj["intercept"]),
                kind=str(obj.get("kind", "logistic")),
                hidden=hidden,
                position_cap=None if cap is None else int(cap),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ControllerFormatError):
                raise
            raise ControllerFormatError(f"bad model field: {err!r}") from None


# ====================================================================== cost model
VerifyCost = Callable[[int, int], float]
"""``verify_ms(new_tokens_fed, context_len)``: predicted time of verifying one round that feeds
``new_tokens_fed`` tokens (the last committed token + the draft) on ``context_len`` cached ids."""


@dataclass(frozen=True)
class AffineVerifyCost:
    """``base_ms + per_token_ms * new_tokens + per_ctx_ms * context_len`` (JSON-serialisable)."""

    base_ms: float = 750.0
    per_token_ms: float = 10.0
    per_ctx_ms: float = 0.0

    def __call__(self, new_tokens: int, context_len: int) -> float:
        return self.base_ms + self.per_token_ms * new_tokens + self.per_ctx_ms * context_len

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "affine", "base_ms": self.base_ms, "per_token_ms": self.per_token_ms,
                "per_ctx_ms": self.per_ctx_ms}


DRAFT_MS = 45.0
"""``controller train``'s draft time per token (ms), written into the controller file and used
until a session has measured its own: the packaged 0.5B drafting one sequence through llama.cpp
with 2 threads on the 2-core CPU this project is measured on (``docs/results/drafter-speed.json``).
(``LearnedController``'s own default stays 141 ms, the figure older files were trained with.)"""
VERIFY_COST = (210.0, 14.0, 0.0)
"""``controller train``'s verify cost ``base + per_token * fed tokens`` (ms): the packaged 1.5B target with
oneDNN kernels on that CPU (``docs/estimator.md``: 210 ms for 1 fed token, 323 ms for 9): a
round's cost barely grows with its length."""
ROUND_TRIP_MS = 50.0
"""``controller train``'s time per round outside drafting and verifying (ms): the services, the
broker hops and the wait for a batch on a lightly loaded server. A session replaces it with its
own measured EMA after its first drafted verdict (a prefill round or a server run's verdicts
measure nothing). A file without the field reads 0, the rule older files were tuned with."""


def round_ms(verify: VerifyCost, draft_ms: float, round_trip_ms: float, drafted: int, passes: int,
             context_len: int) -> float:
    """What one round costs in the goodput rule's model: the round trip, verifying the drafted
    tokens plus the target's own, and ``passes`` draft forwards. The rule itself and the trainer's
    replay (``controller_train.round_cost``) both price rounds with it."""
    return round_trip_ms + verify(drafted + 1, context_len) + passes * draft_ms


def measured(ms: float | None) -> float | None:
    """``ms`` when it can be a measurement (finite, >= 0), else None: what a session hands the
    controller as its measured round trip, so a broken clock never reaches the rule."""
    return ms if ms is not None and math.isfinite(ms) and ms >= 0 else None


def estimator_cost(est: VerifyTimeEstimator) -> VerifyCost:
    """A verify-time estimator as the controller's cost function (a batch of this one round)."""
    from wisp.policy.estimator import BatchShape

    def cost(new_tokens: int, context_len: int) -> float:
        return est.predict(BatchShape.of([new_tokens], [max(0, context_len)]))

    return cost


def _cost_from_dict(obj: Any) -> tuple[VerifyCost, dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise ControllerFormatError("cost.verify must be an object")
    kind = obj.get("kind")
    if kind == "affine":
        try:
            c = AffineVerifyCost(float(obj["base_ms"]), float(obj["per_token_ms"]),
                                 float(obj.get("per_ctx_ms", 0.0)))
        except (KeyError, TypeError, ValueError) as err:
            raise ControllerFormatError(f"bad affine cost: {err!r}") from None
        if not all(math.isfinite(x) and x >= 0 for x in (c.base_ms, c.per_token_ms, c.per_ctx_ms)):
            raise ControllerFormatError("affine cost terms must be finite and >= 0")
        return c, c.to_dict()
    if kind == "linear_estimator":
        from wisp.policy.estimator import LinearEstimator

        try:
            est = LinearEstimator.from_json(json.dumps(obj["model"]))
        except (KeyError, ValueError) as err:
            raise ControllerFormatError(f"bad estimator cost: {err}") from None
        return estimator_cost(est), {"kind": kind, "model": obj["model"]}
    raise ControllerFormatError(f"cost kind {kind!r} is not affine or linear_estimator")


# ====================================================================== the controller
class LearnedController:
    """The WISP mode's draft-length policy: draft up to ``max_k`` tokens, stop early when the
    risk model says a rejection is likely or one more token no longer pays (module doc).

    ``verify_ms`` is a :data:`VerifyCost` callable or a ``LinearEstimator``; ``draft_ms_per_token``
    and ``round_trip_ms`` are the time per draft forward and per round outside drafting and
    verifying it assumes until the session has measured its own (``SessionSpecStats``: the
    drafter's EMAs), so decisions stay a pure function of their inputs.
    """

    name = "learned"

    def __init__(
        self,
        model: RiskModel,
        threshold: float,
        *,
        max_k: int = 10,
        min_k: int = 1,
        cum_threshold: float | None = None,
        goodput: bool = True,
        verify_ms: VerifyCost | VerifyTimeEstimator | None = None,
        draft_ms_per_token: float = 141.0,
        round_trip_ms: float = 0.0,
        prefill_round: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ControllerFormatError(f"threshold must be in (0, 1], got {threshold!r}")
        if cum_threshold is not None and not 0.0 < cum_threshold <= 1.0:
            raise ControllerFormatError(f"cum_threshold must be in (0, 1], got {cum_threshold!r}")
        if not 0 <= min_k <= max_k <= 256:
            raise ControllerFormatError(f"need 0 <= min_k <= max_k <= 256 (got {min_k}, {max_k})")
        if not (math.isfinite(draft_ms_per_token) and draft_ms_per_token >= 0):
            raise ControllerFormatError("draft_ms_per_token must be finite and >= 0")
        if not (math.isfinite(round_trip_ms) and round_trip_ms >= 0):
            raise ControllerFormatError("round_trip_ms must be finite and >= 0")
        self.model = model
        self.threshold = float(threshold)
        self.cum_threshold = None if cum_threshold is None else float(cum_threshold)
        self.max_k = int(max_k)
        self.min_k = int(min_k)
        self.goodput = bool(goodput)
        self.draft_ms_per_token = float(draft_ms_per_token)
        self.round_trip_ms = float(round_trip_ms)
        self.prefill_round = bool(prefill_round)
        """Round 0 drafts nothing: the prompt goes to the server at once and the first token
        comes from the target's own prefill, while the device prefills its draft model in the
        background. Without it the first round waits for the device's prefill of the whole
        prompt, which on a slow device (a Raspberry Pi prefills ~150 tokens/s) alone breaks a
        2.5 s TTFT SLO for a 400-token prompt."""
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._cost_dict: dict[str, Any] | None
        if verify_ms is None:
            verify_ms = AffineVerifyCost()
        if isinstance(verify_ms, AffineVerifyCost):
            self._cost_dict = verify_ms.to_dict()
            self.verify_ms: VerifyCost = verify_ms
        elif callable(verify_ms):  # a plain cost function: usable, not saveable
            self._cost_dict = None
            self.verify_ms = verify_ms
        else:  # an estimator (estimators are objects with predict(), never callables)
            self._cost_dict = {"kind": "linear_estimator", "model": json.loads(verify_ms.to_json())}
            self.verify_ms = estimator_cost(verify_ms)

    def replace(self, **changes: Any) -> LearnedController:
        """A copy with some stop parameters changed (``threshold``, ``max_k`` ...)."""
        kw: dict[str, Any] = {
            "threshold": self.threshold, "max_k": self.max_k, "min_k": self.min_k,
            "cum_threshold": self.cum_threshold, "goodput": self.goodput,
            "verify_ms": self.verify_ms, "draft_ms_per_token": self.draft_ms_per_token,
            "round_trip_ms": self.round_trip_ms, "prefill_round": self.prefill_round,
            "metadata": self.metadata, "model": self.model,
        }
        kw.update(changes)
        model = kw.pop("model")
        threshold = kw.pop("threshold")
        out = LearnedController(model, threshold, **kw)
        if "verify_ms" not in changes:
            out._cost_dict = self._cost_dict
        return out

    # -- the rule -----------------------------------------------------------------------------
    def goodput_gain(self, accept_probs: Sequence[float], context_len: int,
                     draft_ms: float | None = None, round_trip_ms: float | None = None) -> float:
        """Relative change of expected goodput from drafting the last of ``accept_probs``
        (positive = worth it): ``E(n+1)/cost(n+1) / (E(n)/cost(n)) - 1``, ``n = len - 1``;
        ``draft_ms`` per draft forward and ``round_trip_ms`` per round (default: the
        controller's own)."""
        n = len(accept_probs) - 1
        expected = 1.0
        prod = 1.0
        for p in accept_probs[:n]:
            prod *= p
            expected += prod
        gain = prod * accept_probs[n]
        t = self.draft_ms_per_token if draft_ms is None else draft_ms
        trip = self.round_trip_ms if round_trip_ms is None else round_trip_ms
        cost_n = round_ms(self.verify_ms, t, trip, n, n, context_len)
        cost_next = round_ms(self.verify_ms, t, trip, n + 1, n + 1, context_len)
        if cost_n <= 0 or cost_next <= 0:
            return gain
        return ((expected + gain) / cost_next) / (expected / cost_n) - 1.0

    def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan:
        max_k = max(0, min(self.max_k, budget))
        if max_k == 0:
            return DraftPlan(max_k=0)
        if self.prefill_round and stats.rounds == 0:
            return DraftPlan(max_k=0, prefill=True)
        min_k = min(self.min_k, max_k)
        recent = float(stats.recent_acceptance)
        context = stats.context_len
        draft_ms = stats.draft_ms_per_token
        trip = measured(stats.round_trip_ms)  # None: the file's figure stands in
        probs: list[float] = []
        risk_of = self.model.risk
        threshold, cum, goodput = self.threshold, self.cum_threshold, self.goodput

        def stop(i: int, feats: TokenFeatures) -> bool:
            del probs[i:]  # a re-asked position replaces its old estimate
            risk = risk_of(feats, i, recent)
            probs.append(1.0 - risk)
            if i < min_k:
                return False
            if risk > threshold:
                return True
            if cum is not None and 1.0 - math.prod(probs) > cum:
                return True
            return goodput and self.goodput_gain(probs, context, draft_ms, trip) < 0.0

        return DraftPlan(max_k=max_k, stop=stop)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        cost = self._cost_dict
        if cost is None:
            raise ValueError("this controller's verify cost is a plain callable; it cannot be saved")
        return {
            "schema": CONTROLLER_SCHEMA,
            "schema_version": CONTROLLER_SCHEMA_VERSION,
            "model": self.model.to_dict(),
            "threshold": self.threshold,
            "stop": {"min_k": self.min_k, "max_k": self.max_k, "cum_threshold": self.cum_threshold,
                     "goodput": self.goodput, "prefill_round": self.prefill_round},
            "cost": {"draft_ms_per_token": self.draft_ms_per_token,
                     "round_trip_ms": self.round_trip_ms, "verify": cost},
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, obj: Any) -> LearnedController:
        if not isinstance(obj, Mapping):
            raise ControllerFormatError("a controller file holds one JSON object")
        if obj.get("schema") != CONTROLLER_SCHEMA:
            raise ControllerFormatError(
                f"not a WISP controller (schema {obj.get('schema')!r}, expected {CONTROLLER_SCHEMA!r})"
            )
        if obj.get("schema_version") != CONTROLLER_SCHEMA_VERSION:
            raise ControllerFormatError(
                f"controller schema_version {obj.get('schema_version')!r} is not supported "
                f"(this build reads {CONTROLLER_SCHEMA_VERSION})"
            )
        extra = set(obj) - {"schema", "schema_version", "model", "threshold", "stop", "cost", "metadata"}
        if extra:
            raise ControllerFormatError(f"unknown controller field(s) {sorted(extra)}")
        model = RiskModel.from_dict(obj.get("model"))
        stop = obj.get("stop", {})
        cost = obj.get("cost", {})
        meta = obj.get("metadata", {})
        if not isinstance(stop, Mapping) or not isinstance(cost, Mapping) or not isinstance(meta, Mapping):
            raise ControllerFormatError("stop, cost and metadata must be objects")
        for name, part, known in (("stop", stop, _STOP_FIELDS), ("cost", cost, _COST_FIELDS)):
            if set(part) - known:
                raise ControllerFormatError(f"unknown {name} field(s) {sorted(set(part) - known)}")
        verify, verify_dict = _cost_from_dict(cost.get("verify", AffineVerifyCost().to_dict()))
        try:
            cum = stop.get("cum_threshold")
            return cls(
                model,
                float(obj["threshold"]),
                max_k=int(stop.get("max_k", 10)),
                min_k=int(stop.get("min_k", 1)),
                cum_threshold=None if cum is None else float(cum),
                goodput=bool(stop.get("goodput", True)),
                prefill_round=bool(stop.get("prefill_round", False)),
                verify_ms=verify,
                draft_ms_per_token=float(cost.get("draft_ms_per_token", 141.0)),
                round_trip_ms=float(cost.get("round_trip_ms", 0.0)),
                metadata=meta,
            )._with_cost(verify_dict)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ControllerFormatError):
                raise
            raise ControllerFormatError(f"bad controller field: {err!r}") from None

    def _with_cost(self, cost: Mapping[str, Any]) -> LearnedController:
        self._cost_dict = dict(cost)
        return self

    @classmethod
    def from_json(cls, text: str | bytes) -> LearnedController:
        raw = text.encode() if isinstance(text, str) else bytes(text)
        if raw[:1] == b"\x80" or raw[:2] in (b"(d", b"(l", b"}q", b"]q"):
            raise ControllerFormatError("this looks like a pickle; controllers are JSON only (refused)")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ControllerFormatError(f"not JSON: {err}") from None
        return cls.from_dict(obj)


_STOP_FIELDS = frozenset({"min_k", "max_k", "cum_threshold", "goodput", "prefill_round"})
_COST_FIELDS = frozenset({"draft_ms_per_token", "round_trip_ms", "verify"})


def drafting_rule(policy: DraftLengthPolicy) -> DraftLengthPolicy:
    """``policy`` without its prefill round: what judges the drafting rule alone (waste per
    committed token, committed tokens per round) against a fixed k. The prefill round is a TTFT
    device that commits one token with no draft; counted there it would lower tokens per round
    for a reason that has nothing to do with when to stop drafting."""
    if isinstance(policy, LearnedController) and policy.prefill_round:
        return policy.replace(prefill_round=False)
    return policy


def load_controller(path: str | Path) -> LearnedController:
    """Read and validate a controller JSON file (``ControllerFormatError`` when it is not one)."""
    return LearnedController.from_json(Path(path).read_bytes())


# ====================================================================== shipped controllers
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def controller_filename(draft_model: str, target_model: str) -> str:
    return f"controller-{_slug(draft_model)}--{_slug(target_model)}.json"


def assets_dir() -> Path:
    return Path(str(importlib.resources.files("wisp"))) / "assets"


def shipped_controller_path(draft_model: str, target_model: str | None = None) -> Path | None:
    """The packaged controller of a draft model: for exactly this pair when shipped, else any
    trained for the draft model (the risk model reads only the draft's statistics; its labels
    came from the recorded target)."""
    folder = assets_dir()
    if target_model is not None:
        exact = folder / controller_filename(draft_model, target_model)
        if exact.is_file():
            return exact
    matches = sorted(folder.glob(f"controller-{_slug(draft_model)}--*.json"))
    return matches[0] if matches else None


def default_policy(settings: Settings) -> DraftLengthPolicy:
    """The drafter's policy for its mode: wisp -> ``settings.controller`` when set, else the
    shipped learned controller of the draft model (a logged FixedLength(draft_k) fallback when
    none is shipped; a named controller that does not load is an error, not a silent fallback);
    sled -> FixedLength(draft_k); centralized -> FixedLength(0) (never drafts)."""
    fallback = FixedLength(settings.draft_k)
    if str(settings.mode) == "centralized":
        return FixedLength(0)
    if str(settings.mode) != "wisp":
        return fallback
    if settings.controller is not None:
        try:
            ctl = load_controller(settings.controller)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"controller {settings.controller} (WISP_CONTROLLER) does not load: {err}") from err
        return _with_prefill(ctl, settings, settings.controller)
    path = shipped_controller_path(settings.draft_model, settings.target_model)
    if path is None:
        log.warning(
            "wisp mode: no learned speculation controller is shipped for draft model %r; "
            "falling back to a fixed draft length k=%d (train one: `wisp-cli controller train`)",
            settings.draft_model, settings.draft_k,
        )
        return fallback
    try:
        ctl = load_controller(path)
    except (OSError, ValueError) as err:
        log.error("wisp mode: controller %s does not load (%s); falling back to fixed k=%d",
                  path, err, settings.draft_k)
        return fallback
    return _with_prefill(ctl, settings, path)


def _with_prefill(ctl: LearnedController, settings: Settings, path: Path) -> LearnedController:
    if settings.prefill_round != ctl.prefill_round:
        ctl = ctl.replace(prefill_round=settings.prefill_round)
    log.info("wisp mode: learned speculation controller %s (max_k=%d, threshold=%.2f, prefill round %s)",
             path.name, ctl.max_k, ctl.threshold, "on" if ctl.prefill_round else "off")
    return ctl
