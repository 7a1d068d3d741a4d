"""The learned verification-time estimator: a physical base model times a boosted correction.

Why not a plain linear model: on a CPU with torch's default (BLAS) linear kernels the cost of a
batched forward is *not* monotone in its tokens. One query row runs matrix-vector kernels; two to
six rows switch to GEMM kernels that pack the weights on every call (on the 2-core dev box
verifying 2-3 tokens cost as much as 4-6, and 1 token a third of that); bigger batches turn
compute bound. A linear model averages these regimes away. (With the oneDNN kernels the CPU
verifier now runs by default the shipped profile is nearly linear and the two models tie; this
one still fits a machine with such regimes.) The model here is

    predict(shape) = level x base(shape) x exp(residual(shape))

* ``base``: non-negative least squares on a few physical terms (a fixed cost, per-row work,
  padded token positions ``rounds x max_new``, the padded KV that is assembled ``rounds x
  max_ctx`` and the padded attention ``rounds x max_new x (max_ctx + max_new)``), fitted for
  *relative* error. Non-negative weights make it grow with every term, so it extrapolates
  sensibly to batches larger than any profiled.
* ``residual``: a small gradient-boosted tree ensemble (scikit-learn at fit time, exported as
  plain arrays) on ``log(measured / base)``: it learns the non-monotone kernel regimes. Trees
  predict a constant outside the profiled range, so the correction stays bounded there.
* ``level``: one multiplicative factor tracked online (median of ``log(measured / model)`` over
  the most recent samples), so a verifier that slows down or speeds up is followed within a
  bounded number of batches. Every ``full_refit_every`` samples the shape model itself is refitted
  on the profile blended with the measured window (rescaled to profile units), so serving shapes
  the profile did not cover are learned too.

Evaluation is pure numpy (the scheduler never imports scikit-learn); the model is versioned JSON
(never pickle) so the estimator service publishes it under ``wisp:estimator:model`` and the
scheduler reloads it. ``load_estimator`` reads either kind (``learned`` or ``linear``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing
import statistics
import time
import uuid
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wisp.policy.estimator import BatchShape, LinearEstimator, VerifyTimeEstimator
from wisp.settings import Settings

KIND = "learned"
SCHEMA = 1

LEARNED_FEATURES = (
    "rounds", "sum_new", "max_new", "min_new", "padded_new", "sum_ctx", "max_ctx", "min_ctx",
    "padded_ctx", "padded_attn", "sum_new_ctx",
)
"""Features of a batch seen by the residual trees (``padded_*`` are what a padded batched forward
really computes: ``rounds x max_new`` query positions, ``rounds x max_ctx`` cached positions
assembled into the padded past, ``rounds x max_new x (max_ctx + max_new)`` attention scores)."""

BASE_TERMS = ("bias", "rounds", "padded_new", "padded_ctx", "padded_attn", "sum_new_ctx")
"""Terms of the non-negative base model (each a column of ``_base_matrix``)."""

ASSETS = Path(__file__).resolve().parent.parent / "assets"

Sample = tuple[BatchShape, float]
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- features
def learned_features(shape: BatchShape) -> np.ndarray:
    """``LEARNED_FEATURES`` of one batch (zeros for an empty batch)."""
    if shape.rounds == 0:
        return np.zeros(len(LEARNED_FEATURES))
    return _features(shape.new_tokens, shape.context_lens)


def _features(new_t: Sequence[int], ctx_t: Sequence[int]) -> np.ndarray:
    n = len(new_t)
    max_new, max_ctx = max(new_t), max(ctx_t)
    return np.array([
        n, sum(new_t), max_new, min(new_t), n * max_new, sum(ctx_t), max_ctx, min(ctx_t),
        n * max_ctx / 1000.0, n * max_new * (max_ctx + max_new) / 1000.0,
        sum(a * b for a, b in zip(new_t, ctx_t, strict=True)) / 1000.0,
    ], dtype=float)


def feature_matrix(shapes: Sequence[BatchShape]) -> np.ndarray:
    if not shapes:
        return np.zeros((0, len(LEARNED_FEATURES)))
    return np.stack([learned_features(s) for s in shapes])


_F = {name: i for i, name in enumerate(LEARNED_FEATURES)}


def _base_matrix(x: np.ndarray) -> np.ndarray:
    """Columns ``BASE_TERMS`` from a feature matrix."""
    return np.column_stack([
        np.ones(len(x)), x[:, _F["rounds"]], x[:, _F["padded_new"]], x[:, _F["padded_ctx"]],
        x[:, _F["padded_attn"]], x[:, _F["sum_new_ctx"]],
    ])


# ---------------------------------------------------------------------------- trees
@dataclass
class TreeEnsemble:
    """Regression trees as arrays, evaluated in numpy: sum over trees of the leaf reached, times
    ``learning_rate``. Node ``i`` of tree ``t`` goes left when ``x[feature] <= threshold`` (the
    scikit-learn rule, on float32 features as scikit-learn compares them); ``feature < 0`` marks
    a leaf."""

    feature: np.ndarray  # (T, N) int
    threshold: np.ndarray  # (T, N) float
    left: np.ndarray  # (T, N) int
    right: np.ndarray  # (T, N) int
    value: np.ndarray  # (T, N) float
    learning_rate: float
    depth: int

    @classmethod
    def empty(cls) -> TreeEnsemble:
        z = np.zeros((0, 1))
        return cls(z.astype(int), z, z.astype(int), z.astype(int), z, 0.0, 0)

    @property
    def n_trees(self) -> int:
        return int(self.feature.shape[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if self.n_trees == 0 or n == 0:
            return np.zeros(n)
        xf = x.astype(np.float32).astype(np.float64)
        trees = np.arange(self.n_trees)[None, :]
        rows = np.arange(n)[:, None]
        node = np.zeros((n, self.n_trees), dtype=np.int64)
        for _ in range(self.depth):
            f = self.feature[trees, node]
            leaf = f < 0
            v = xf[rows, np.where(leaf, 0, f)]
            nxt = np.where(v <= self.threshold[trees, node], self.left[trees, node],
                           self.right[trees, node])
            node = np.where(leaf, node, nxt)
        return self.learning_rate * self.value[trees, node].sum(axis=1)

    def eval_one(self, x32: Sequence[float]) -> float:
        """The same sum for one sample in plain Python (no numpy per-call overhead: the scheduler
        predicts many candidate batches per tick). ``x32``: features rounded to float32."""
        py = self.__dict__.get("_py")
        if py is None:
            py = self.__dict__["_py"] = [
                (f.tolist(), t.tolist(), lf.tolist(), r.tolist(), v.tolist())
                for f, t, lf, r, v in zip(self.feature, self.threshold, self.left, self.right,
                                          self.value, strict=True)
            ]
        total = 0.0
        for feat, thr, left, right, val in py:
            i = 0
            f = feat[0]
            while f >= 0:
                i = left[i] if x32[f] <= thr[i] else right[i]
                f = feat[i]
            total += val[i]
        return self.learning_rate * total

    @classmethod
    def from_sklearn(cls, gbr: Any) -> TreeEnsemble:
        trees = [est[0].tree_ for est in gbr.estimators_]
        width = max(t.node_count for t in trees)
        t_n = len(trees)
        feature = np.full((t_n, width), -2, dtype=np.int64)
        threshold = np.zeros((t_n, width))
        left = np.zeros((t_n, width), dtype=np.int64)
        right = np.zeros((t_n, width), dtype=np.int64)
        value = np.zeros((t_n, width))
        for i, t in enumerate(trees):
            k = t.node_count
            feature[i, :k] = t.feature
            threshold[i, :k] = t.threshold
            left[i, :k] = np.maximum(t.children_left, 0)
            right[i, :k] = np.maximum(t.children_right, 0)
            value[i, :k] = t.value.reshape(k, -1)[:, 0]
        feature[feature < 0] = -1
        depth = max(int(t.max_depth) for t in trees)
        return cls(feature, threshold, left, right, value, float(gbr.learning_rate), depth)

    def to_obj(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate, "depth": self.depth,
            "feature": self.feature.tolist(), "threshold": self.threshold.tolist(),
            "left": self.left.tolist(), "right": self.right.tolist(), "value": self.value.tolist(),
        }

    def to_json(self) -> str:
        """``to_obj`` as compact JSON, computed once per ensemble: the estimator service
        publishes its model after every level refit (every few batches) while the trees change
        only at a shape refit, and dumping 200 trees cost ~5-15 ms of the event loop each time.
        The arrays are never modified after construction (a refit builds a new ensemble)."""
        text = self.__dict__.get("_json")
        if text is None:
            text = self.__dict__["_json"] = json.dumps(self.to_obj(), separators=(",", ":"))
        return text

    @classmethod
    def from_obj(cls, obj: dict[str, Any], n_features: int) -> TreeEnsemble:
        try:
            feature = np.asarray(obj["feature"], dtype=np.int64).reshape(len(obj["feature"]), -1)
            shape = feature.shape
            arrays = {k: np.asarray(obj[k], dtype=float).reshape(shape)
                      for k in ("threshold", "value")}
            left = np.asarray(obj["left"], dtype=np.int64).reshape(shape)
            right = np.asarray(obj["right"], dtype=np.int64).reshape(shape)
            lr, depth = float(obj["learning_rate"]), int(obj["depth"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad residual trees: {err}") from err
        if feature.size and (feature.max() >= n_features or left.min() < 0 or right.min() < 0
                             or left.max() >= shape[1] or right.max() >= shape[1]):
            raise ValueError("residual trees index outside their arrays or features")
        if not (np.isfinite(arrays["threshold"]).all() and np.isfinite(arrays["value"]).all()
                and math.isfinite(lr) and 0 <= depth <= 64):
            raise ValueError("residual trees hold non-finite numbers")
        return cls(feature, arrays["threshold"], left, right, arrays["value"], lr, depth)


# ---------------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class FitConfig:
    n_trees: int = 200
    depth: int = 3
    learning_rate: float = 0.08
    subsample: float = 0.8
    min_leaf: int = 3
    seed: int = 0


def fit_base(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Non-negative weights of ``BASE_TERMS`` minimising the weighted *relative* squared error,
    with one re-fit after dropping gross outliers (contention spikes)."""
    from scipy.optimize import nnls

    a = _base_matrix(x)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=float)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)
    keep = np.ones(len(y), dtype=bool)
    coef = np.zeros(a.shape[1])
    for _ in range(2):
        sw = np.sqrt(w[keep]) / y[keep]
        sol, _ = nnls((a[keep] / scale) * sw[:, None], y[keep] * sw, maxiter=50 * a.shape[1])
        coef = sol / scale
        rel = np.log(y / np.maximum(a @ coef, 1e-9))
        med = np.median(rel)
        mad = np.median(np.abs(rel - med)) * 1.4826 + 1e-9
        keep = np.abs(rel - med) <= max(4 * mad, 0.05)
    if not np.any(coef > 0):  # degenerate data: a constant model at the median
        coef = np.zeros(a.shape[1])
        coef[0] = float(np.median(y))
    return coef


def fit_residual(x: np.ndarray, target: np.ndarray, w: np.ndarray | None, cfg: FitConfig) -> TreeEnsemble:
    """Boosted trees on ``log(measured / base)`` (Huber loss: a few contention spikes do not
    bend the model)."""
    if cfg.n_trees <= 0 or len(target) < 8:
        return TreeEnsemble.empty()
    from sklearn.ensemble import GradientBoostingRegressor

    gbr = GradientBoostingRegressor(
        loss="huber", alpha=0.9, n_estimators=cfg.n_trees, max_depth=cfg.depth,
        learning_rate=cfg.learning_rate, subsample=cfg.subsample,
        min_samples_leaf=cfg.min_leaf, init="zero", random_state=cfg.seed,
    )
    gbr.fit(x.astype(np.float32), target, sample_weight=w)
    return TreeEnsemble.from_sklearn(gbr)


# ---------------------------------------------------------------------------- the estimator
_POOL: ProcessPoolExecutor | None = None


def _refit_pool() -> ProcessPoolExecutor:
    """One worker process for shape refits. A process, not a thread: scikit-learn's fit holds
    the GIL for most of its up to seconds, and on a thread it stalled every coroutine of the
    process (all four services share one in `wisp-cli up` and the benchmarks). Spawned, not
    forked: forking a process that runs threads and an event loop is unsafe."""
    global _POOL
    if _POOL is None:
        _POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _POOL


def _fit_parts_json(x: np.ndarray, y: np.ndarray, w: np.ndarray | None, cfg: FitConfig) -> str:
    """``_fit_parts`` in the refit process, answered as the model's own JSON pieces."""
    base, residual = _fit_parts(x, y, w, cfg)
    return json.dumps({"base": [float(c) for c in base], "residual": residual.to_obj()})


def _parts_of(text: str) -> tuple[np.ndarray, TreeEnsemble]:
    obj = json.loads(text)
    return (np.asarray(obj["base"], dtype=float),
            TreeEnsemble.from_obj(obj["residual"], len(LEARNED_FEATURES)))


class LearnedEstimator:
    """``predict = level x base x exp(residual)``; see the module docstring.

    Online (``observe``): samples go into a sliding ``window``; every ``refit_every`` samples the
    ``level`` becomes the median ratio measured/model over the last ``level_window`` samples
    (so after a uniform change of speed, predictions follow once half of that window saw it: at
    most ``level_window // 2 + refit_every`` samples); every ``full_refit_every`` samples (0 =
    never, and given the time, not within ``min_full_refit_s`` of the last) the shape model is
    refitted on the profile blended with the window. Each refit bumps
    ``version``. The shape refit (scikit-learn, up to seconds on a busy CPU) runs on a background
    process when ``background_refit`` (so the estimator service's event loop never stalls) and is
    swapped in at the next ``refit``; ``background_refit=False`` makes it synchronous.
    """

    KIND = KIND

    def __init__(
        self,
        base_coef: Sequence[float],
        residual: TreeEnsemble | None = None,
        *,
        level: float = 1.0,
        train: Sequence[Sample] = (),
        window: int = 256,
        refit_every: int = 4,
        level_window: int = 16,
        full_refit_every: int = 64,
        min_full_refit_s: float = 30.0,
        window_weight: float = 2.0,
        fit_config: FitConfig | None = None,
        meta: dict[str, Any] | None = None,
        background_refit: bool = True,
    ) -> None:
        coef = np.asarray(base_coef, dtype=float)
        if coef.shape != (len(BASE_TERMS),) or not np.all(np.isfinite(coef)):
            raise ValueError(f"base model needs {len(BASE_TERMS)} finite weights")
        self._set_model(coef, residual or TreeEnsemble.empty())
        self.level = float(level)
        self.train = list(train)
        self.window_size = window
        self.refit_every = max(1, refit_every)
        self.level_window = max(1, level_window)
        self.full_refit_every = max(0, full_refit_every)
        self.min_full_refit_s = max(0.0, float(min_full_refit_s))
        self._last_full_at: float | None = None
        self.window_weight = window_weight
        self.fit_config = fit_config or FitConfig()
        self.meta: dict[str, Any] = dict(meta or {})
        self.window: deque[Sample] = deque(maxlen=window)
        self.version = 0
        self.model_id = self.meta.get("model_id") or uuid.uuid4().hex[:12]
        self._since_fit = 0
        self._since_full = 0
        self.background_refit = background_refit
        self._pending: Future[tuple[np.ndarray, TreeEnsemble]] | None = None

    def _set_model(self, base_coef: np.ndarray, residual: TreeEnsemble,
                   shape_id: str | None = None) -> None:
        self.base_coef = base_coef
        self._coef_list = [float(v) for v in base_coef]
        self.residual = residual
        self.shape_id = shape_id or uuid.uuid4().hex[:12]
        """Names this shape model (base + residual; a new one at every shape refit), so a
        reader whose copy has the same ``shape_id`` can follow a level refit from the head of
        the published JSON (``PublishedModel.update``) instead of parsing the whole model."""
        self._cache: dict[BatchShape, float] = {}

    # ---------------------------------------------------------------- prediction
    def _shape_ms(self, x: np.ndarray) -> np.ndarray:
        """Model without ``level`` (profile units)."""
        base = np.maximum(_base_matrix(x) @ self.base_coef, 1e-3)
        return base * np.exp(self.residual(x))

    def _shape_ms_one(self, shape: BatchShape) -> float:
        """``_shape_ms`` of one shape in plain Python (bit-compatible up to float rounding)."""
        new_t, ctx_t = shape.new_tokens, shape.context_lens
        n = len(new_t)
        max_new, max_ctx = max(new_t), max(ctx_t)
        padded_new = n * max_new
        padded_ctx = n * max_ctx / 1000.0
        padded_attn = padded_new * (max_ctx + max_new) / 1000.0
        sum_new_ctx = sum(a * b for a, b in zip(new_t, ctx_t, strict=True)) / 1000.0
        c = self._coef_list
        base = max(c[0] + c[1] * n + c[2] * padded_new + c[3] * padded_ctx + c[4] * padded_attn
                   + c[5] * sum_new_ctx, 1e-3)
        if self.residual.n_trees == 0:
            return base
        x = array("f", (n, sum(new_t), max_new, min(new_t), padded_new, sum(ctx_t), max_ctx,
                        min(ctx_t), padded_ctx, padded_attn, sum_new_ctx))
        return base * math.exp(self.residual.eval_one(x))

    @property
    def model_key(self) -> str:
        return f"{self.model_id}/{self.shape_id}"

    @property
    def model_scale(self) -> float:
        return self.level

    def annotated(self, model_key: str, model_scale: float, alone_ms: float) -> float | None:
        """The same shape model predicts ``level x shape``: a level refit since the annotation
        only rescales it (prediction's 0.1 ms floor aside)."""
        if model_key != self.model_key or not model_scale > 0:
            return None
        return max(0.1, alone_ms * self.level / model_scale)

    def predict(self, shape: BatchShape) -> float:
        if shape.rounds == 0:
            return 0.0
        return max(0.1, self.level * self._shape_ms_cached(shape))

    def _shape_ms_cached(self, shape: BatchShape) -> float:
        """``_shape_ms_one``, remembered per shape until the shape model changes: it holds no
        ``level``, so the level refit every few batches keeps it (clearing it there made most of
        the scheduler's and the estimator's predictions walk 200 trees again)."""
        hit = self._cache.get(shape)
        if hit is not None:
            return hit
        ms = self._shape_ms_one(shape)
        if len(self._cache) >= 8192:
            self._cache.clear()
        self._cache[shape] = ms
        return ms

    def predict_many(self, shapes: Sequence[BatchShape]) -> np.ndarray:
        if not shapes:
            return np.zeros(0)
        out = np.maximum(0.1, self.level * self._shape_ms(feature_matrix(shapes)))
        out[[s.rounds == 0 for s in shapes]] = 0.0
        return out

    # ---------------------------------------------------------------- online
    def observe(self, shape: BatchShape, measured_ms: float, now: float | None = None) -> None:
        """Take one measured batch. ``now`` (seconds, any clock; None: no clock) holds the shape
        refit back until ``min_full_refit_s`` after the last one."""
        if shape.rounds == 0 or not np.isfinite(measured_ms) or measured_ms <= 0:
            return
        self.window.append((shape, float(measured_ms)))
        self._since_fit += 1
        self._since_full += 1
        if self._since_fit >= self.refit_every:
            self.refit(now)

    def refit(self, now: float | None = None) -> None:
        """Re-estimate ``level`` from the recent window (and, when due, the shape model from the
        profile blended with the window). No-op before 4 samples.

        A shape refit is due every ``full_refit_every`` samples, but (given ``now``) not within
        ``min_full_refit_s`` of the last one: on a fast verifier 64 batches take under a second,
        and refitting 200 trees that often kept a core busy with scikit-learn and made every
        reader parse a new ~100 kB model each second, for a shape that drifts over minutes (the
        level, refitted every few batches, follows a change of speed)."""
        self._since_fit = 0
        if len(self.window) < 4:
            return
        self._collect_shape_refit()
        if (self.full_refit_every and self._since_full >= self.full_refit_every and self.train
                and self._pending is None and self._shape_refit_allowed(now)):
            self._since_full = 0
            self._last_full_at = now
            self._refit_shape()
        recent = list(self.window)[-self.level_window:]
        ratios = [ms / self._shape_ms_cached(s) for s, ms in recent]
        self.level = float(math.exp(statistics.median(math.log(r) for r in ratios)))
        self.version += 1

    def _shape_refit_allowed(self, now: float | None) -> bool:
        # a clock that went back (not a monotonic one) must not stop shape refits for good
        return (now is None or self._last_full_at is None or now < self._last_full_at
                or now - self._last_full_at >= self.min_full_refit_s)

    def _refit_shape(self) -> None:
        """Refit base + residual on the profile plus the window brought to profile units
        (divided by the current level), the window weighted ``window_weight`` per sample."""
        shapes = [s for s, _ in self.train] + [s for s, _ in self.window]
        y = np.array([ms for _, ms in self.train] + [ms / self.level for _, ms in self.window])
        w = np.array([1.0] * len(self.train) + [self.window_weight] * len(self.window))
        args = (feature_matrix(shapes), y, w, self.fit_config)
        if self.background_refit:
            global _POOL
            try:
                self._pending = _refit_pool().submit(_fit_parts_json, *args)
            except BrokenProcessPool:  # the worker died (killed, out of memory): a new one next time
                log.warning("the estimator's refit process died; the shape refit is skipped")
                _POOL = None
        else:
            self._set_model(*_fit_parts(*args))

    def _collect_shape_refit(self) -> None:
        """Swap in a finished background shape refit (a failed one keeps the current model)."""
        fut = self._pending
        if fut is None or not fut.done():
            return
        self._pending = None
        try:
            self._set_model(*_parts_of(fut.result()))
        except Exception:  # a degenerate window must never take the estimator down
            log.exception("background refit of the estimator's shape model failed")

    def wait_for_refit(self, timeout_s: float | None = None) -> None:
        """Block until a background shape refit has finished, then apply it (tests, tools)."""
        if self._pending is not None:
            wait([self._pending], timeout=timeout_s)
            self._collect_shape_refit()

    # ---------------------------------------------------------------- JSON
    def _head_obj(self) -> dict[str, Any]:
        """What a level refit changes (``version``, ``level``) and which model and shape model
        it applies to; first in the JSON, so a reader takes it without parsing the rest."""
        return {"model_id": self.model_id, "shape_id": self.shape_id, "version": self.version,
                "level": self.level}

    def _small_obj(self) -> dict[str, Any]:
        """Everything of ``to_obj`` but the two big, rarely changing parts (trees, profile)."""
        return {
            "head": self._head_obj(),
            "kind": KIND, "schema": SCHEMA, "version": self.version, "model_id": self.model_id,
            "shape_id": self.shape_id,
            "features": list(LEARNED_FEATURES), "base_terms": list(BASE_TERMS),
            "base_coef": [float(c) for c in self.base_coef], "level": self.level,
            "online": {"window": self.window_size, "refit_every": self.refit_every,
                       "level_window": self.level_window, "full_refit_every": self.full_refit_every,
                       "min_full_refit_s": self.min_full_refit_s,
                       "window_weight": self.window_weight},
            "fit": {"n_trees": self.fit_config.n_trees, "depth": self.fit_config.depth,
                    "learning_rate": self.fit_config.learning_rate,
                    "subsample": self.fit_config.subsample, "min_leaf": self.fit_config.min_leaf,
                    "seed": self.fit_config.seed},
            "meta": self.meta,
        }

    def _train_obj(self) -> list[list[Any]]:
        return [[list(s.new_tokens), list(s.context_lens), round(ms, 3)] for s, ms in self.train]

    def to_obj(self) -> dict[str, Any]:
        return {**self._small_obj(), "residual": self.residual.to_obj(), "train": self._train_obj()}

    def to_json(self) -> str:
        """The model as compact JSON (the same object as ``to_obj``). The trees and the profile
        are dumped once and reused (the service publishes after every level refit, every few
        batches, and re-dumping them cost the shared event loop ~5-15 ms each time)."""
        train = self.__dict__.get("_train_json")
        if train is None or train[0] is not self.train or train[1] != len(self.train):
            train = self.__dict__["_train_json"] = (
                self.train, len(self.train), json.dumps(self._train_obj(), separators=(",", ":")))
        small = json.dumps(self._small_obj(), separators=(",", ":"))
        return f'{small[:-1]},"residual":{self.residual.to_json()},"train":{train[2]}}}'

    def with_level(self, level: float, version: int) -> LearnedEstimator:
        """A copy predicting with ``level`` (a reader following a level refit; the copy shares
        the immutable shape model and profile, and must not be refitted)."""
        if not math.isfinite(level) or level <= 0:
            raise ValueError(f"bad level {level!r}")
        est = copy.copy(self)
        est.level, est.version = float(level), int(version)  # the shape cache holds no level
        return est

    @classmethod
    def from_json(cls, text: str | bytes) -> LearnedEstimator:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"estimator model is not JSON: {err}") from err
        return cls.from_obj(obj)

    @classmethod
    def from_obj(cls, obj: Any) -> LearnedEstimator:
        if not isinstance(obj, dict):
            raise ValueError("estimator model must be a JSON object")
        if obj.get("kind") != KIND or obj.get("schema") != SCHEMA:
            raise ValueError(
                f"not a learned estimator model (kind={obj.get('kind')!r}, schema={obj.get('schema')!r}; "
                f"expected kind={KIND!r}, schema={SCHEMA})"
            )
        if list(obj.get("features", [])) != list(LEARNED_FEATURES):
            raise ValueError("estimator model was fitted on different features")
        if list(obj.get("base_terms", [])) != list(BASE_TERMS):
            raise ValueError("estimator model has a different base model")
        level = obj.get("level", 1.0)
        if not isinstance(level, int | float) or not math.isfinite(level) or level <= 0:
            raise ValueError(f"bad level {level!r}")
        online = obj.get("online", {}) or {}
        fit = obj.get("fit", {}) or {}
        try:
            train = [(BatchShape.of(n, c), float(ms)) for n, c, ms in obj.get("train", [])]
            cfg = FitConfig(**{k: fit[k] for k in FitConfig.__dataclass_fields__ if k in fit})
        except (TypeError, ValueError) as err:
            raise ValueError(f"bad estimator model: {err}") from err
        est = cls(
            obj.get("base_coef", []),
            TreeEnsemble.from_obj(obj.get("residual", {}), len(LEARNED_FEATURES)),
            level=float(level), train=train,
            window=int(online.get("window", 256)), refit_every=int(online.get("refit_every", 4)),
            level_window=int(online.get("level_window", 16)),
            full_refit_every=int(online.get("full_refit_every", 64)),
            min_full_refit_s=float(online.get("min_full_refit_s", 30.0)),
            window_weight=float(online.get("window_weight", 2.0)), fit_config=cfg,
            meta=dict(obj.get("meta", {}) or {}),
        )
        est.version = int(obj.get("version", 0))
        est.model_id = str(obj.get("model_id") or est.model_id)
        est.shape_id = str(obj.get("shape_id") or est.shape_id)
        return est

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_obj(), indent=None, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LearnedEstimator:
        return cls.from_json(Path(path).read_text())


def _fit_parts(
    x: np.ndarray, y: np.ndarray, w: np.ndarray | None, cfg: FitConfig
) -> tuple[np.ndarray, TreeEnsemble]:
    base = fit_base(x, y, w)
    pred = np.maximum(_base_matrix(x) @ base, 1e-3)
    return base, fit_residual(x, np.log(y / pred), w, cfg)


def fit(
    samples: Sequence[Sample],
    cfg: FitConfig | None = None,
    *,
    meta: dict[str, Any] | None = None,
    **online: Any,
) -> LearnedEstimator:
    """Fit a ``LearnedEstimator`` on measured ``(shape, ms)`` samples (needs scikit-learn)."""
    samples = [(s, float(ms)) for s, ms in samples if s.rounds > 0 and ms > 0 and math.isfinite(ms)]
    if len(samples) < 4:
        raise ValueError(f"need at least 4 measured batches to fit, got {len(samples)}")
    cfg = cfg or FitConfig()
    x = feature_matrix([s for s, _ in samples])
    y = np.array([ms for _, ms in samples])
    started = time.perf_counter()
    base, resid = _fit_parts(x, y, None, cfg)
    m = {"fitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_train": len(samples),
         "fit_s": round(time.perf_counter() - started, 3), **(meta or {})}
    m["model_id"] = uuid.uuid4().hex[:12]
    return LearnedEstimator(base, resid, train=samples, fit_config=cfg, meta=m, **online)


# ---------------------------------------------------------------------------- evaluation
def abs_pct_errors(est: VerifyTimeEstimator, samples: Iterable[Sample]) -> np.ndarray:
    """|predicted - measured| / measured per sample."""
    samples = list(samples)
    if not samples:
        return np.zeros(0)
    if isinstance(est, LearnedEstimator):
        pred = est.predict_many([s for s, _ in samples])
    else:
        pred = np.array([est.predict(s) for s, _ in samples])
    y = np.array([ms for _, ms in samples])
    return np.abs(pred - y) / y


def error_summary(errs: np.ndarray) -> dict[str, float]:
    if errs.size == 0:
        return {"n": 0, "mape": float("nan"), "p50": float("nan"), "p90": float("nan"), "max": float("nan")}
    return {"n": int(errs.size), "mape": float(errs.mean()), "p50": float(np.percentile(errs, 50)),
            "p90": float(np.percentile(errs, 90)), "max": float(errs.max())}


def split_by_shape(
    samples: Sequence[Sample], heldout: float = 0.25, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, held-out) by *shape*: every repeat of a held-out batch shape is held
    out, so the held-out error measures batches the model never saw."""
    keys = sorted({(s.new_tokens, s.context_lens) for s, _ in samples})
    rng = np.random.default_rng(seed)
    n_out = max(1, int(round(heldout * len(keys)))) if len(keys) > 1 else 0
    out_keys = {keys[i] for i in rng.permutation(len(keys))[:n_out]}
    train = [(s, ms) for s, ms in samples if (s.new_tokens, s.context_lens) not in out_keys]
    test = [(s, ms) for s, ms in samples if (s.new_tokens, s.context_lens) in out_keys]
    return train, test


def noise_floor(samples: Sequence[Sample]) -> float:
    """MAPE of every sample against the median of its own shape's repeats: what even a perfect
    model cannot beat on these measurements (nan when no shape was repeated)."""
    groups: dict[tuple, list[float]] = {}
    for s, ms in samples:
        groups.setdefault((s.new_tokens, s.context_lens), []).append(ms)
    errs = [abs(ms - float(np.median(v))) / ms for v in groups.values() if len(v) > 1 for ms in v]
    return float(np.mean(errs)) if errs else float("nan")


def fit_linear(samples: Sequence[Sample]) -> LinearEstimator:
    """The baseline: ``LinearEstimator`` (ridge over ``batch_features``) fitted on all samples,
    then refitting online as the estimator service's does (every ``refit_every`` batches)."""
    est = LinearEstimator(window=max(256, len(samples)), refit_every=10**9)
    for s, ms in samples:
        est.observe(s, ms)
    est.refit()
    # no refit per sample while fitting; afterwards the default cadence. Left at 10**9, the
    # simulator's estimator stayed frozen at the profile (a -23.5% bias after 1,168 batches)
    est.refit_every = LinearEstimator().refit_every
    return est


# ---------------------------------------------------------------------------- loading
def load_estimator(text: str | bytes) -> LearnedEstimator | LinearEstimator:
    """An estimator from its JSON, of either kind (what the scheduler reloads)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"estimator model is not JSON: {err}") from err
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == KIND:
        return LearnedEstimator.from_obj(obj)
    if kind == LinearEstimator.KIND:
        return LinearEstimator.from_json(text)
    raise ValueError(f"unknown estimator model kind {kind!r} (expected {KIND!r} or 'linear')")


_PROBES = (BatchShape.of([1], [16]), BatchShape.of([5, 5, 5, 5], [4096] * 4))
"""Batches a usable model must price with finite, positive times."""


def _sane(est: VerifyTimeEstimator) -> bool:
    """Whether ``est`` prices the probe batches with finite, positive times (a published level
    of NaN or 1e306 must not reach the batch policy and admission control)."""
    try:
        return all(math.isfinite(ms := est.predict(shape)) and ms > 0 for shape in _PROBES)
    except (ValueError, ArithmeticError, TypeError):
        return False


class PublishedModel:
    """Follows the verify-time model the estimator service publishes (``wisp:estimator:model``).

    One object for every reader (the scheduler's batching, the drafter's admission control), so
    they read the model the same way: ``update(raw)`` parses the bytes only when they changed,
    keeps the last good model when new bytes do not parse (the reason is in ``error``), and
    falls back to this service's own starting model (``fallback``) until a model is published.
    It used to be re-implemented by each reader; one of those copies imported a function that
    did not exist, swallowed the ImportError and silently admitted with an untrained model."""

    def __init__(self, fallback: VerifyTimeEstimator) -> None:
        self.fallback = fallback
        self.current: VerifyTimeEstimator = fallback
        self.raw: bytes | None = None
        self.error: str | None = None
        """Why the last published bytes were not used (None when they were)."""

    def update(self, raw: bytes | str | None) -> bool:
        """Take the published bytes (None: nothing published). True when the model changed."""
        if raw is None:
            return False
        raw = raw.encode() if isinstance(raw, str) else raw
        if raw == self.raw:
            return False
        self.raw = raw
        # the estimator service republishes after every level refit (every few batches) and
        # parsing the whole model cost the event loop ~7-18 ms: only the head changed then
        held = self.current
        quick = self._follow_head(raw)
        if quick is not None:
            if quick and not _sane(self.current):
                self.current = held
                return self._refuse("its level makes predictions that are not finite and positive")
            self.error = None
            return quick
        try:
            est = load_estimator(raw)
        except (ValueError, KeyError, TypeError) as err:
            return self._refuse(str(err))
        if not _sane(est):
            return self._refuse("it predicts times that are not finite and positive")
        self.current, self.error = est, None
        return True

    def _refuse(self, why: str) -> bool:
        """Keep the model held; say why the published bytes were not used."""
        self.error = f"ignoring the published estimator model: {why}"
        log.warning("%s", self.error)
        return False

    def _follow_head(self, raw: bytes) -> bool | None:
        """Take a level refit from the head that starts the published JSON (``{"head":{...}``,
        written by ``LearnedEstimator.to_json``) without parsing the ~100 kB rest: True when
        the level or version changed, False when neither did, None when the whole model must be
        parsed (no head, or one naming another model or shape model than the one held)."""
        cur = self.current
        if not isinstance(cur, LearnedEstimator) or not raw.startswith(_HEAD_PREFIX):
            return None
        end = raw.find(b"}", len(_HEAD_PREFIX))  # the head holds no nested object
        try:
            h = json.loads(raw[len(_HEAD_PREFIX) - 1:end + 1])
            if h.get("model_id") != cur.model_id or h.get("shape_id") != cur.shape_id:
                return None
            version, level = int(h["version"]), float(h["level"])
            if version == cur.version and level == cur.level:
                return False
            self.current = cur.with_level(level, version)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            return None  # an unreadable head: the whole model says what to use
        return True


_HEAD_PREFIX = b'{"head":{'


def device_kind(device: str) -> str:
    """``cpu`` / ``cuda`` / ... from a torch device string (``cuda:1`` -> ``cuda``)."""
    return device.split(":", 1)[0].lower()


def shipped_model_path(target_model: str, device: str) -> Path:
    """Where the model fitted on the shipped profile of ``target_model`` on ``device`` lives."""
    return ASSETS / f"estimator_model_{target_model}_{device_kind(device)}.json"


def default_estimator(settings: Settings) -> VerifyTimeEstimator:
    """The estimator a service starts with: ``settings.estimator_model`` (a model JSON path) when
    set; else the shipped learned model when it was profiled for ``settings.target_model`` on the
    same kind of device; else the untrained ``LinearEstimator`` (logged: it is a poor guess)."""
    if settings.estimator_model is not None:
        return load_estimator(Path(settings.estimator_model).expanduser().read_text())
    path = shipped_model_path(str(settings.target_model), settings.device)
    if path.is_file():
        est = LearnedEstimator.load(path)
        if est.meta.get("target_model") in (None, settings.target_model):
            return est
    log.info("no verify-time model was profiled for %s on %s: starting from the untrained linear "
             "estimator (the estimator service refits it from measured batches)",
             settings.target_model, device_kind(settings.device))
    return LinearEstimator()
