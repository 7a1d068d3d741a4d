"""Verification-time estimators: predict how long a candidate batch takes to verify.

Pure objects: ``predict`` is a function of the batch's composition; ``observe`` feeds a measured
sample (from the verifier's timing stream) and refits online over a sliding window, so a verifier
that slows down is tracked. The model is serialised as versioned JSON (never pickle) so the
estimator service can publish it and the scheduler reload it.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class BatchShape:
    """What a batch costs depends on: per round, tokens fed and cached context before them."""

    new_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.new_tokens) != len(self.context_lens):
            raise ValueError("new_tokens and context_lens must have one entry per round")

    @classmethod
    def of(cls, new_tokens: Sequence[int], context_lens: Sequence[int]) -> BatchShape:
        return cls(tuple(int(x) for x in new_tokens), tuple(int(x) for x in context_lens))

    def plus(self, new_tokens: int, context_len: int) -> BatchShape:
        return BatchShape(self.new_tokens + (new_tokens,), self.context_lens + (context_len,))

    @property
    def rounds(self) -> int:
        return len(self.new_tokens)


def round_shape(draft_len: int, committed_len: int, generated_len: int) -> tuple[int, int]:
    """(tokens fed, cached context) of one round verified alone.

    A round that builds on generated tokens feeds its draft plus the last committed token (whose
    KV the verifier computes with it) over the other ``committed_len - 1`` cached ones. A session's
    first round (nothing generated yet) finds no cache: the verifier prefills the whole prompt in
    that forward, so it feeds ``committed_len + draft_len`` tokens over none. Pricing it as
    ``draft_len + 1`` tokens on a prompt-long context (as this project once did) hid the prefill
    from the estimator hop, the batch policy and the simulator's scheduler alike."""
    if generated_len <= 0:
        return committed_len + draft_len, 0
    return draft_len + 1, committed_len - 1


FEATURE_NAMES = (
    "bias", "rounds", "sum_new", "max_new", "padded_new", "sum_ctx", "max_ctx",
    "padded_attn", "sum_new_ctx",
)


def batch_features(shape: BatchShape) -> np.ndarray:
    """Features of a batch. A padded batched forward costs roughly rounds x max_new token
    positions, each attending over max_ctx + max_new keys, hence the padded terms."""
    n = shape.rounds
    if n == 0:
        return np.zeros(len(FEATURE_NAMES))
    new = np.asarray(shape.new_tokens, dtype=float)
    ctx = np.asarray(shape.context_lens, dtype=float)
    max_new, max_ctx = new.max(), ctx.max()
    return np.array([
        1.0, n, new.sum(), max_new, n * max_new, ctx.sum(), max_ctx,
        n * max_new * (max_ctx + max_new) / 1000.0, float((new * ctx).sum()) / 1000.0,
    ])


@dataclass
class SpeedNormalizer:
    """Puts every verifier's measured times on the fastest one's scale before the shared model
    learns them. Pure: no I/O, no clock.

    Why: one model is fitted on the timing samples of every verifier. A verifier that is slower
    also collects bigger batches (rounds pile up while it works), so a model fitted on the raw
    mixture blames batch *size* for that verifier's slowness: it then over-predicts big batches and
    under-predicts small ones (measured on a loaded 2-core machine: a 3-round batch predicted at
    450 ms because the slow verifier took that long, so the fast verifier looked slow and was
    benched). Each verifier's factor is an EMA of measured / predicted; a sample is divided by its
    verifier's factor relative to the smallest live factor, so the model keeps predicting the
    fastest verifier, and the scheduler's health check sees the slow one as slow. With one
    verifier, or verifiers of one speed, samples pass through unchanged (a verifier that slows
    down on its own is still tracked by the model)."""

    alpha: float = 0.2
    stale_after: int = 500
    """A verifier with no sample among the last this many is forgotten (it left, or was replaced):
    the others must not stay scaled to a dead verifier's speed."""
    factors: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, int] = field(default_factory=dict)
    seen: int = 0

    def normalize(self, verifier: str, predicted_ms: float, measured_ms: float) -> float:
        """``measured_ms`` on the fastest verifier's scale (and update ``verifier``'s factor)."""
        if predicted_ms <= 0 or measured_ms <= 0 or not np.isfinite(measured_ms):
            return measured_ms
        self.seen += 1
        self.last_seen[verifier] = self.seen
        for v in [v for v, n in self.last_seen.items() if self.seen - n > self.stale_after]:
            del self.last_seen[v]
            self.factors.pop(v, None)
        ratio = measured_ms / predicted_ms
        prev = self.factors.get(verifier)
        self.factors[verifier] = ratio if prev is None else (1 - self.alpha) * prev + self.alpha * ratio
        rel = self.factors[verifier] / min(self.factors.values())
        return measured_ms / rel


class VerifyTimeEstimator(Protocol):
    version: int

    @property
    def model_key(self) -> str:
        """Names this model up to ``model_scale``: two estimators with the same key predict the
        same times once divided by their scales, so a prediction made by one (the estimator
        service's annotation of a round) can stand for the other's (the scheduler's)."""
        ...

    @property
    def model_scale(self) -> float:
        """The factor every prediction of this model carries (a learned model's level, which
        online refits move every few batches without changing the key)."""
        ...

    def predict(self, shape: BatchShape) -> float: ...

    def annotated(self, model_key: str, model_scale: float, alone_ms: float) -> float | None:
        """``alone_ms``, a round's predicted time alone made by the model ``model_key`` at
        ``model_scale``, brought to this estimator; None when another model made it (the caller
        predicts again)."""
        ...

    def observe(self, shape: BatchShape, measured_ms: float, now: float | None = None) -> None:
        """Learn from one measured batch; ``now`` (seconds) paces refits that go by time."""
        ...

    def to_json(self) -> str: ...


class LinearEstimator:
    """Least-squares (ridge) model over ``batch_features``, refitted every ``refit_every``
    samples on the last ``window`` samples. Before any sample it uses a rough prior."""

    KIND = "linear"

    def __init__(
        self,
        coef: Sequence[float] | None = None,
        window: int = 256,
        refit_every: int = 8,
        ridge: float = 1e-3,
    ) -> None:
        self.coef = np.asarray(coef if coef is not None else self.prior(), dtype=float)
        self.window = window
        self.refit_every = refit_every
        self.ridge = ridge
        self.samples: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self._since_fit = 0
        self.version = 0

    @staticmethod
    def prior() -> list[float]:
        """A deliberately rough start (ms): a fixed cost plus per-token and per-context terms."""
        return [20.0, 5.0, 2.0, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0]

    @property
    def coef(self) -> np.ndarray:
        return self._coef

    @coef.setter
    def coef(self, value: np.ndarray) -> None:
        self._coef = value
        self._key: str | None = None

    @property
    def model_key(self) -> str:
        """A hash of the coefficients, computed once per fit: the scheduler asks for it for
        every round it takes."""
        if self._key is None:
            digest = hashlib.blake2b(self._coef.astype(float).tobytes(), digest_size=8).hexdigest()
            self._key = f"linear/{digest}"
        return self._key

    @property
    def model_scale(self) -> float:
        return 1.0

    def predict(self, shape: BatchShape) -> float:
        if shape.rounds == 0:
            return 0.0
        return float(max(0.1, batch_features(shape) @ self.coef))

    def annotated(self, model_key: str, model_scale: float, alone_ms: float) -> float | None:
        return alone_ms if model_key == self.model_key else None

    def observe(self, shape: BatchShape, measured_ms: float, now: float | None = None) -> None:
        if shape.rounds == 0 or not np.isfinite(measured_ms) or measured_ms < 0:
            return
        self.samples.append((batch_features(shape), float(measured_ms)))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.refit()

    def refit(self) -> None:
        """Ridge regression on the window; features with no variation keep a zero weight."""
        self._since_fit = 0
        if len(self.samples) < 4:
            return
        x = np.stack([s[0] for s in self.samples])
        y = np.array([s[1] for s in self.samples])
        scale = np.maximum(np.abs(x).max(axis=0), 1e-9)
        xs = x / scale
        a = xs.T @ xs + self.ridge * np.eye(xs.shape[1])
        coef = np.linalg.solve(a, xs.T @ y) / scale
        self.coef = coef
        self.version += 1

    def to_json(self) -> str:
        return json.dumps({
            "kind": self.KIND, "schema": 1, "version": self.version,
            "features": list(FEATURE_NAMES), "coef": [float(c) for c in self.coef],
        })

    @classmethod
    def from_json(cls, text: str) -> LinearEstimator:
        obj = json.loads(text)
        if obj.get("kind") != cls.KIND or obj.get("schema") != 1:
            raise ValueError(f"not a linear estimator model: kind={obj.get('kind')!r}")
        if list(obj.get("features", [])) != list(FEATURE_NAMES):
            raise ValueError("estimator model was fitted on different features")
        est = cls(coef=obj["coef"])
        est.version = int(obj.get("version", 0))
        return est
