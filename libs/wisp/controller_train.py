"""Training the learned speculation controller (``wisp.policy.controller``) from traces.

1. **Predictor.** Trace rows (one per judged drafted token, label 1 = rejected) become feature
   vectors (:data:`wisp.policy.controller.FEATURE_FUNCS`); a logistic regression (or a small
   MLP) is fitted with scikit-learn and exported as plain JSON weights. Held-out metrics use a
   split *by prompt* (rows of one request never sit on both sides).
2. **Threshold.** The risk threshold is chosen for a low false-stop rate: the fraction of
   *accepted* tokens whose risk exceeds it (each such stop shortens a round for nothing).
3. **Stop rule tuning (optional).** Under greedy decoding the rows of a trace pin down, for every
   position of the target's output, the draft's features and whether the draft's argmax matches
   the target's token (a *teacher-forced oracle sequence*). Any draft-length policy can be
   replayed on those sequences exactly (:func:`simulate`), so ``max_k``, the thresholds and the
   goodput rule are tuned on the TRAINING prompts by replay, with out-of-fold risk models (each
   prompt is replayed with a model that never saw it).

Nothing here touches Redis; the draft model is only needed to build oracle sequences.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wisp.features import TokenFeatures
from wisp.policy.controller import (
    DRAFT_MS,
    FEATURE_FUNCS,
    ROUND_TRIP_MS,
    VERIFY_COST,
    AffineVerifyCost,
    DraftLengthPolicy,
    FixedLength,
    LearnedController,
    RiskModel,
    VerifyCost,
    drafting_rule,
    round_ms,
)
from wisp.policy.session import REPLAY_EOS, SpecSession, replay_tokens

DEFAULT_FEATURES: tuple[str, ...] = (
    "top1_prob", "entropy", "margin", "logit_spread", "position", "recent_acceptance",
    "log1m_top1", "log_entropy", "log_margin",
)

OBJECTIVES = {
    "balanced": "balanced: largest slack over both targets vs replayed k={k} "
                "(slack = min(waste cut - 40%, committed/round change + 10%))",
    "max_round": "max_round: most committed/round with slack >= 5 points vs k={k}",
    "goodput": "goodput: most committed tokens per modeled second (round trip + verify + draft "
               "forwards) with slack >= 5 points vs k={k}",
}
"""How ``tune_stop_rule`` picks a grid point, as the metadata states it."""


# ====================================================================== data
def raw_rows(rows: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """``[n, 6]`` raw inputs (``BASE_FEATURES`` order) of trace rows."""
    return np.array([
        (r["top1_prob"], r["entropy"], r["margin"], r["logit_spread"], r["position"],
         r["recent_acceptance"]) for r in rows
    ], dtype=float).reshape(-1, 6)


def design(raw: np.ndarray, features: Sequence[str], position_cap: int | None = None) -> np.ndarray:
    """Derived feature matrix ``[n, len(features)]`` from raw inputs."""
    raw = np.asarray(raw, dtype=float)
    if position_cap is not None:
        raw = raw.copy()
        raw[:, 4] = np.minimum(raw[:, 4], position_cap)
    cols = []
    for name in features:
        fn = FEATURE_FUNCS[name]
        cols.append([fn(tuple(v)) for v in raw])
    return np.array(cols, dtype=float).T.reshape(len(raw), len(features))


def labels(rows: Iterable[Mapping[str, Any]]) -> np.ndarray:
    return np.array([int(r["label"]) for r in rows], dtype=int)


def split_by_prompt(
    rows: Sequence[Mapping[str, Any]], holdout: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Row indices (train, held-out), splitting whole prompts (by ``prompt_index``, else
    ``request_id``) at random with a fixed seed."""
    def key(r: Mapping[str, Any]) -> Any:
        return r.get("prompt_index") if r.get("prompt_index") is not None else r["request_id"]

    groups = sorted({key(r) for r in rows}, key=str)
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_hold = max(1, round(len(groups) * holdout)) if len(groups) > 1 else 0
    held = set(groups[:n_hold])
    train = [i for i, r in enumerate(rows) if key(r) not in held]
    test = [i for i, r in enumerate(rows) if key(r) in held]
    return train, test


# ====================================================================== fitting
def fit_risk_model(
    raw: np.ndarray,
    y: np.ndarray,
    features: Sequence[str] = DEFAULT_FEATURES,
    *,
    kind: str = "logistic",
    c: float = 1.0,
    hidden: int = 16,
    position_cap: int | None = None,
    seed: int = 0,
) -> RiskModel:
    """Fit P(reject) on raw inputs; standardisation is part of the exported model."""
    x = design(raw, features, position_cap)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    xs = (x - mean) / scale
    if len(set(y.tolist())) < 2:
        raise ValueError("the trace has only one label class: record more prompts")
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(xs, y)
        return RiskModel(
            features=tuple(features), mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
            coef=tuple(float(v) for v in clf.coef_[0]), intercept=float(clf.intercept_[0]),
            kind="logistic", position_cap=position_cap,
        )
    if kind == "mlp":
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", alpha=1.0 / c,
                            max_iter=3000, random_state=seed, early_stopping=False)
        clf.fit(xs, y)
        w1, w2 = clf.coefs_
        b1, b2 = clf.intercepts_
        layer = (tuple(tuple(float(w1[i, j]) for i in range(w1.shape[0])) for j in range(w1.shape[1])),
                 tuple(float(b) for b in b1))
        return RiskModel(
            features=tuple(features), mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
            coef=tuple(float(v) for v in w2[:, 0]), intercept=float(b2[0]), kind="mlp",
            hidden=(layer,), position_cap=position_cap,
        )
    raise ValueError(f"unknown model kind {kind!r} (logistic, mlp)")


def predict_raw(model: RiskModel, raw: np.ndarray) -> np.ndarray:
    return np.array([model.risk_raw(tuple(v)) for v in raw], dtype=float)


# ====================================================================== metrics
def auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(set(np.asarray(y).tolist())) == 2 else float("nan")


def classify_metrics(y: np.ndarray, risk: np.ndarray, threshold: float) -> dict[str, float]:
    """"reject" = positive. ``false_stop_rate`` = accepted tokens flagged / accepted tokens."""
    y = np.asarray(y).astype(int)
    flag = np.asarray(risk) > threshold
    tp = int(np.sum(flag & (y == 1)))
    fp = int(np.sum(flag & (y == 0)))
    fn = int(np.sum(~flag & (y == 1)))
    neg = int(np.sum(y == 0))
    return {
        "n": int(len(y)), "reject_rate": float(np.mean(y)) if len(y) else float("nan"),
        "threshold": float(threshold),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "false_stop_rate": fp / neg if neg else float("nan"),
        "flag_rate": float(np.mean(flag)) if len(y) else float("nan"),
        "auc": auc(y, np.asarray(risk)),
    }


def threshold_for_false_stop(y: np.ndarray, risk: np.ndarray, max_false_stop: float) -> float:
    """The lowest threshold whose false-stop rate on ``(y, risk)`` is <= ``max_false_stop``."""
    neg = np.sort(np.asarray(risk)[np.asarray(y) == 0])[::-1]
    if len(neg) == 0:
        return 0.5
    allowed = int(math.floor(max_false_stop * len(neg)))
    # flagged negatives are those with risk > threshold: put the threshold at the (allowed)-th
    # highest negative risk
    t = float(neg[min(allowed, len(neg) - 1)])
    return min(max(t, 1e-6), 1.0)


# ====================================================================== oracle sequences + replay
@dataclass
class OracleSequence:
    """One prompt's target output with the draft's view of every position.

    ``raw4[t]`` = (top1, entropy, margin, spread) of the draft's distribution for output token
    ``t`` given the target's prefix (``len(raw4) == len(reject) + 1``: the last entry follows the
    whole output); ``reject[t]`` = the draft's argmax differs from output token ``t``.
    """

    prompt_index: int
    prompt_len: int
    raw4: list[tuple[float, float, float, float]]
    reject: list[bool]
    max_new: int

    @property
    def length(self) -> int:
        return len(self.reject)


def oracle_sequences(
    draft_model: Any, requests: Sequence[Mapping[str, Any]], max_new: int
) -> list[OracleSequence]:
    """Teacher-force the draft model over each ``prompt_token_ids + token_ids`` (one forward per
    request) and read its features and argmax at every output position."""
    import torch

    from wisp.specdec import token_features

    out: list[OracleSequence] = []
    dev = next(draft_model.parameters()).device
    for req in requests:
        prompt = list(req["prompt_token_ids"])
        gen = list(req["token_ids"])
        ids = torch.tensor([prompt + gen], dtype=torch.long, device=dev)
        with torch.inference_mode():
            logits = draft_model(input_ids=ids).logits[0, len(prompt) - 1 :].float()
        raw4 = [token_features(row).as_tuple() for row in logits]
        arg = logits.argmax(dim=-1).tolist()
        reject = [int(arg[t]) != int(gen[t]) for t in range(len(gen))]
        out.append(OracleSequence(int(req.get("prompt_index", -1)), len(prompt), raw4, reject, max_new))
    return out


@dataclass
class LoopTotals:
    """Speculation totals of a policy over a set of sequences (replayed or real)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    draft_passes: int = 0
    stops: int = 0
    judged_stops: int = 0  # stops right after an all-accepted prefix (their token has a label)
    false_stops: int = 0  # ... of those, the draft's token would have been accepted
    modeled_ms: float = 0.0
    """The rounds' time under a cost model (``simulate``'s ``round_ms``; 0 without one)."""
    per_request: list[dict[str, Any]] = field(default_factory=list)

    def add_round(self, drafted: int, accepted: int, committed: int, passes: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.committed += committed
        self.draft_passes += passes

    def summary(self) -> dict[str, float]:
        c = max(self.committed, 1)
        return {
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
            "committed": self.committed,
            "committed_per_round": self.committed / max(self.rounds, 1),
            "waste_per_committed": (self.drafted - self.accepted) / c,
            "draft_passes_per_committed": self.draft_passes / c,
            "drafted_per_round": self.drafted / max(self.rounds, 1),
            "acceptance": self.accepted / max(self.drafted, 1),
            "stops": self.stops, "judged_stops": self.judged_stops, "false_stops": self.false_stops,
            "false_stop_share": self.false_stops / self.judged_stops if self.judged_stops else float("nan"),
            "committed_per_s": (self.committed * 1000.0 / self.modeled_ms if self.modeled_ms > 0
                                else float("nan")),
        }


RoundCost = Callable[[int, int, int], float]
"""``(drafted, draft_passes, context_len) -> ms``: what a replayed round takes end to end."""


def round_cost(verify: VerifyCost, draft_ms: float, round_trip_ms: float) -> RoundCost:
    """The goodput rule's own cost model (``round_ms``) for a replayed round, with every draft
    forward counted (a stop rule's look at one more token costs a forward too)."""

    def cost(drafted: int, passes: int, context_len: int) -> float:
        return round_ms(verify, draft_ms, round_trip_ms, drafted, passes, context_len)

    return cost


def simulate(policy: DraftLengthPolicy, seqs: Sequence[OracleSequence],
             round_ms: RoundCost | None = None) -> LoopTotals:
    """Replay ``policy`` on oracle sequences through the drafter's own ``SpecSession`` (same
    plan/stop calls, budget, EOS and length cut, statistics), with the verdicts read off the
    sequence instead of a target forward. A round cannot draft past the end of the output.
    With ``round_ms`` each round's time is modeled too (``LoopTotals.modeled_ms``)."""
    policy = drafting_rule(policy)
    tot = LoopTotals()
    for s in seqs:
        sess = SpecSession(s.prompt_len, s.max_new, eos=frozenset({REPLAY_EOS}))
        n_total = s.length
        while n_total and not sess.done:
            g = len(sess.generated)
            plan = sess.plan(policy)
            kmax = min(plan.max_k, n_total - g)
            n, stopped = 0, False
            for i in range(kmax):
                if plan.stop is not None and plan.stop(i, TokenFeatures(*s.raw4[g + i])):
                    stopped = True
                    break
                n += 1
            a = next((i for i in range(n) if s.reject[g + i]), n)
            applied = sess.apply(replay_tokens(a + 1, n_total - g), n, a, 0.0)
            passes = (n + int(stopped)) if plan.max_k > 0 else 0
            tot.add_round(n, a, len(applied.tokens), passes)
            if round_ms is not None:
                tot.modeled_ms += round_ms(n, passes, plan.context_len)
            if stopped:
                tot.stops += 1
                if a == n and g + n < n_total:
                    tot.judged_stops += 1
                    tot.false_stops += int(not s.reject[g + n])
    return tot


# ====================================================================== tuning
@dataclass(frozen=True)
class StopParams:
    threshold: float
    max_k: int
    min_k: int = 1
    cum_threshold: float | None = None
    goodput: bool = False


def _controller(
    model: RiskModel, p: StopParams, cost: AffineVerifyCost, draft_ms: float, round_trip_ms: float
) -> LearnedController:
    return LearnedController(model, p.threshold, max_k=p.max_k, min_k=p.min_k,
                             cum_threshold=p.cum_threshold, goodput=p.goodput, verify_ms=cost,
                             draft_ms_per_token=draft_ms, round_trip_ms=round_trip_ms)


def tune_stop_rule(
    fold_models: Sequence[tuple[RiskModel, Sequence[OracleSequence]]],
    grid: Iterable[StopParams],
    *,
    baseline_k: int = 4,
    waste_cut: float = 0.40,
    max_round_drop: float = 0.10,
    margin: float = 0.05,
    cost: AffineVerifyCost | None = None,
    draft_ms: float = DRAFT_MS,
    round_trip_ms: float = ROUND_TRIP_MS,
    objective: str = "balanced",
) -> tuple[StopParams, list[dict[str, Any]], dict[str, float]]:
    """Replay every grid point (each fold's sequences with that fold's out-of-fold model) and
    pick one against fixed ``baseline_k`` on the same sequences.

    A point's *slack* is its smaller margin over the two targets: ``waste cut - waste_cut`` and
    ``change in committed tokens per round + max_round_drop``. ``balanced`` (default) picks the
    largest slack, i.e. the point that stays above both targets by the widest margin (the most
    robust choice for unseen prompts); ``max_round`` picks the most committed tokens per round
    among points with ``slack >= margin``; ``goodput`` the most committed tokens per modeled
    second (``round_cost``: the round trip, the verify cost and every draft forward) among points
    with ``slack >= margin``, so what a round costs decides how long it drafts, within the waste
    target. Returns (best, every point's summary, baseline)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} ({', '.join(OBJECTIVES)})")
    cost = cost or AffineVerifyCost(*VERIFY_COST)
    rms = round_cost(cost, draft_ms, round_trip_ms)
    seqs_all = [s for _, seqs in fold_models for s in seqs]
    base = simulate(FixedLength(baseline_k), seqs_all, rms).summary()
    if objective == "goodput" and not math.isfinite(base["committed_per_s"]):
        raise ValueError("the goodput objective needs a round cost above 0 (the draft, verify and "
                         "round-trip costs are all 0)")
    results: list[dict[str, Any]] = []
    for p in grid:
        tot = LoopTotals()
        for model, seqs in fold_models:
            t = simulate(_controller(model, p, cost, draft_ms, round_trip_ms), seqs, rms)
            for k in ("rounds", "drafted", "accepted", "committed", "draft_passes", "stops",
                      "judged_stops", "false_stops", "modeled_ms"):
                setattr(tot, k, getattr(tot, k) + getattr(t, k))
        s = tot.summary()
        s["waste_cut"] = 1 - s["waste_per_committed"] / base["waste_per_committed"]
        s["round_change"] = s["committed_per_round"] / base["committed_per_round"] - 1
        results.append({"params": asdict(p), **s})
    for r in results:
        r["slack"] = min(r["waste_cut"] - waste_cut, r["round_change"] + max_round_drop)
    if objective == "balanced":
        best = max(results, key=lambda r: (round(r["slack"], 3), r["committed_per_round"]))
    else:
        ok = [r for r in results if r["slack"] >= margin] or results
        key = "committed_per_round" if objective == "max_round" else "committed_per_s"
        best = max(ok, key=lambda r: (round(r[key], 6), r["waste_cut"]))
    return StopParams(**best["params"]), results, base


def pareto(results: Sequence[Mapping[str, Any]], keep: int = 20) -> list[dict[str, Any]]:
    """The grid points no other point beats on both waste cut and committed tokens per round
    (thinned to ``keep``), most waste cut first."""
    front: list[dict[str, Any]] = []
    best_round = -math.inf
    for r in sorted(results, key=lambda r: (-r["waste_cut"], -r["committed_per_round"])):
        if r["committed_per_round"] > best_round:
            best_round = r["committed_per_round"]
            front.append({k: r[k] for k in ("params", "waste_cut", "round_change",
                                            "committed_per_round", "waste_per_committed",
                                            "draft_passes_per_committed", "drafted_per_round",
                                            "committed_per_s")})
    if len(front) > keep:
        step = len(front) / keep
        front = [front[int(i * step)] for i in range(keep)]
    return front


def default_grid(thresholds: Sequence[float]) -> list[StopParams]:
    grid = []
    for max_k in (6, 8, 10, 12, 14, 16):
        for t in thresholds:
            for min_k in (1, 2):
                for cum in (None, 0.5, 0.6, 0.75):
                    for goodput in (False, True):
                        grid.append(StopParams(float(t), max_k, min_k, cum, goodput))
    return grid


# ====================================================================== the whole recipe
@dataclass
class TrainConfig:
    features: tuple[str, ...] = DEFAULT_FEATURES
    kind: str = "logistic"
    c: float = 1.0
    hidden: int = 16
    max_false_stop: float = 0.10
    holdout: float = 0.2
    folds: int = 5
    seed: int = 0
    baseline_k: int = 4
    draft_ms_per_token: float = DRAFT_MS
    verify_cost: AffineVerifyCost = field(default_factory=lambda: AffineVerifyCost(*VERIFY_COST))
    round_trip_ms: float = ROUND_TRIP_MS
    grid_false_stop: tuple[float, ...] = (0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20)
    objective: str = "balanced"


def _prompt_key(r: Mapping[str, Any]) -> Any:
    return r.get("prompt_index") if r.get("prompt_index") is not None else r["request_id"]


def train_controller(
    rows: Sequence[Mapping[str, Any]],
    cfg: TrainConfig,
    *,
    seqs: Sequence[OracleSequence] | None = None,
    metadata: Mapping[str, Any] | None = None,
    default_max_k: int = 8,
) -> tuple[LearnedController, dict[str, Any]]:
    """Fit the predictor, report it on a held-out split of the training prompts, and (with
    ``seqs``, the oracle sequences of the same prompts) tune the stop rule by replay.

    The shipped model is refitted on every row; its threshold is the tuned one (or, without
    ``seqs``, the one whose false-stop rate on the training rows is ``cfg.max_false_stop``)."""
    if not rows:
        raise ValueError("no trace rows")
    raw = raw_rows(rows)
    y = labels(rows)
    cap = int(raw[:, 4].max())
    fit_kw = {"kind": cfg.kind, "c": cfg.c, "hidden": cfg.hidden, "position_cap": cap, "seed": cfg.seed}

    # 1. held-out split of the training prompts: how good is the predictor?
    tr, te = split_by_prompt(rows, cfg.holdout, cfg.seed)
    split_model = fit_risk_model(raw[tr], y[tr], cfg.features, **fit_kw)
    risk_tr = predict_raw(split_model, raw[tr])
    risk_te = predict_raw(split_model, raw[te])
    t_split = threshold_for_false_stop(y[tr], risk_tr, cfg.max_false_stop)

    # 2. the model to ship, fitted on all rows
    model = fit_risk_model(raw, y, cfg.features, **fit_kw)
    risk_all = predict_raw(model, raw)
    thresholds = sorted({round(threshold_for_false_stop(y, risk_all, f), 4) for f in cfg.grid_false_stop})
    threshold = threshold_for_false_stop(y, risk_all, cfg.max_false_stop)
    params = StopParams(threshold=threshold, max_k=default_max_k, min_k=1)
    tuning: dict[str, Any] = {}

    # 3. the stop rule, tuned by replay with out-of-fold models
    if seqs:
        keys = sorted({_prompt_key(r) for r in rows}, key=str)
        rng = random.Random(cfg.seed)
        rng.shuffle(keys)
        folds = max(2, min(cfg.folds, len(keys)))
        fold_of = {k: i % folds for i, k in enumerate(keys)}
        fold_models = []
        for f in range(folds):
            idx = [i for i, r in enumerate(rows) if fold_of[_prompt_key(r)] != f]
            m = fit_risk_model(raw[idx], y[idx], cfg.features, **fit_kw)
            fseqs = [s for s in seqs if fold_of.get(s.prompt_index, -1) == f]
            if fseqs:
                fold_models.append((m, fseqs))
        grid = default_grid(thresholds)
        rms = round_cost(cfg.verify_cost, cfg.draft_ms_per_token, cfg.round_trip_ms)
        params, results, base = tune_stop_rule(
            fold_models, grid, baseline_k=cfg.baseline_k, cost=cfg.verify_cost,
            draft_ms=cfg.draft_ms_per_token, round_trip_ms=cfg.round_trip_ms, objective=cfg.objective,
        )
        best = next(r for r in results if r["params"] == asdict(params))
        tuning = {
            "method": f"replay of {len(seqs)} training prompts (teacher-forced oracle sequences), "
                      f"{len(fold_models)}-fold out-of-fold risk models, {len(results)} grid points",
            "objective": OBJECTIVES[cfg.objective].format(k=cfg.baseline_k),
            "cost": {"draft_ms_per_token": cfg.draft_ms_per_token, "round_trip_ms": cfg.round_trip_ms,
                     "verify": cfg.verify_cost.to_dict()},
            "threshold_grid": {"false_stop_rates": list(cfg.grid_false_stop), "thresholds": thresholds},
            "baseline": base, "best": best, "pareto": pareto(results),
            "frontier_fixed_k": {k: simulate(FixedLength(k), seqs, rms).summary() for k in range(1, 9)},
        }
        threshold = params.threshold

    ctl = LearnedController(
        model, threshold, max_k=params.max_k, min_k=params.min_k, cum_threshold=params.cum_threshold,
        goodput=params.goodput, verify_ms=cfg.verify_cost, draft_ms_per_token=cfg.draft_ms_per_token,
        round_trip_ms=cfg.round_trip_ms,
    )
    heldout = classify_metrics(y[te], risk_te, threshold)
    report = {
        "rows": len(rows), "reject_rate": float(y.mean()),
        "prompts": len({_prompt_key(r) for r in rows}),
        "features": list(cfg.features), "kind": cfg.kind, "position_cap": cap,
        "heldout_split": {
            "train_rows": len(tr), "heldout_rows": len(te),
            "heldout_prompts": sorted({_prompt_key(rows[i]) for i in te}, key=str),
            "at_shipped_threshold": heldout,
            "at_false_stop_target": classify_metrics(y[te], risk_te, t_split),
            "false_stop_target": cfg.max_false_stop,
        },
        "train_fit": classify_metrics(y, risk_all, threshold),
        "stop": asdict(params),
        "tuning": tuning,
    }
    ctl.metadata = {**dict(metadata or {}), "training": report}
    return ctl, report
