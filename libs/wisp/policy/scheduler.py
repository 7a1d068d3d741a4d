"""The verification batch scheduler: a pure object that turns queued rounds into batches.

It never touches tensors or Redis (vLLM v1's SchedulerOutput pattern): the scheduler service
feeds it ``RoundInfo``s, verifier liveness and batch completions, with the time passed in, and
executes the ``BatchPlan``s that ``tick`` returns. The simulator drives the very same object.

Placement: a session stays on the verifier that holds its KV cache (affinity); a new session goes
to the verifier with the least predicted backlog time (not the fewest sessions: verifiers may differ
in speed, see ``set_verifier_speed`` / ``estimator_for``); when that verifier disappears its
sessions move to the least-loaded live one and its in-flight rounds are re-queued (the verifier
recomputes the KV cache from the committed prefix).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wisp.policy.estimator import BatchShape, VerifyTimeEstimator, round_shape


@dataclass(frozen=True)
class RoundInfo:
    """One queued speculation round, as plain data."""

    key: str
    request_id: str
    round: int
    draft_len: int
    context_len: int
    arrival: float
    """When the scheduler received it (scheduler clock, seconds)."""
    deadline: float
    """When its tokens are due under the request's SLO (same clock)."""
    predicted_ms: float = 0.0
    """Its predicted time verified alone, by the model ``predicted_by`` (the estimator hop's
    annotation), so the policy need not predict it again under that same model."""
    predicted_by: str | None = None
    predicted_scale: float = 1.0
    """The predicting model's scale (``VerifyTimeEstimator.model_scale``) when it made it."""
    expected_commit: float = 1.0
    """Tokens this round is expected to commit (accepted drafts + the target's own). 1.0 is the
    "nobody estimated it" default; the SLO policy then assumes ``1 + acceptance x draft_len``."""
    generated_len: int | None = None
    """Tokens its request had generated before this round (None: unknown)."""
    max_new_tokens: int | None = None
    """Its request's generation budget (None: unknown)."""
    tpot_slo_ms: float | None = None
    """Its request's TPOT SLO. With the two above, lets the SLO policy tell a late round that can
    still catch up from one whose request has already lost its SLO."""
    prefill_len: int = 0
    """Uncached prompt tokens the verifier prefills with this round beyond the usual last
    committed one (a session's first round: the prompt less one; ``round_info_shape``)."""

    @property
    def new_tokens(self) -> int:
        return self.draft_len + 1 + self.prefill_len


def round_terms(
    draft_len: int, committed_len: int, generated_len: int, *, cached: bool = True
) -> dict[str, int]:
    """``RoundInfo``'s ``draft_len``, ``context_len`` and ``prefill_len`` for a round, from
    ``wisp.policy.estimator.round_shape`` (the one rule for what a round feeds), so the
    scheduler service and the simulator price first rounds as the prefills they are.

    ``cached=False``: the verifier holds none of this session's KV although tokens were
    generated (a session preempted for memory and readmitted, as vLLM's recompute preemption
    does): the round recomputes the whole committed context, so it is priced as the prefill of
    ``committed_len`` tokens plus the draft, like a first round."""
    new, ctx = round_shape(draft_len, committed_len, generated_len if cached else 0)
    return {"draft_len": draft_len, "context_len": ctx, "prefill_len": new - draft_len - 1}


@dataclass(frozen=True)
class BatchPlan:
    batch_id: str
    verifier: str
    keys: tuple[str, ...]
    predicted_ms: float
    policy: str
    reasons: tuple[str, ...] = ()
    late: tuple[str, ...] = ()
    """Keys of rounds dispatched although they were predicted to miss their deadline."""


@dataclass
class SchedulerOutput:
    batches: list[BatchPlan] = field(default_factory=list)
    wake_at: float | None = None
    """Tick again at this time even if nothing arrives (e.g. a max-wait expiring)."""
    requeued: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    """Keys, over all ``batches``, of rounds served best-effort past their deadline (SLO misses)."""


@dataclass(frozen=True)
class Selection:
    rounds: list[RoundInfo]
    predicted_ms: float
    reasons: list[str] = field(default_factory=list)
    """Either one reason for the whole batch (FCFS) or one per round, aligned with ``rounds``."""
    late: list[str] = field(default_factory=list)
    """Keys of chosen rounds predicted to miss their deadline (served best-effort)."""


class BatchPolicy(Protocol):
    name: str
    max_batch_size: int
    """Rounds per batch at most (the core also uses it to predict a verifier's backlog)."""

    def select(
        self, queue: list[RoundInfo], verifier: str, now: float, estimator: VerifyTimeEstimator
    ) -> tuple[Selection | None, float | None]:
        """Pick rounds for one idle verifier from its queue, or None and when to look again."""
        ...


@dataclass
class FcfsPolicy:
    """SLED's batching: first come first served, up to ``max_batch_size`` rounds; an idle
    verifier waits at most ``max_wait_ms`` for a batch to fill.

    ``padding_aware`` (default): in arrival order, a round joins the batch only while that
    costs no more than verifying it alone (``joined_cost``, the rule ``pack_batches`` packs by); the
    rest wait, in order, for the next batch. Why: this project's verifier pads every row of a
    forward to the longest row and the longest context, so a prefill batched with decode rounds
    makes each of them cost a prefill, and prefills of different lengths pad to the longest.
    Measured with the real pair on one verifier core (2026-12-01): three first rounds of 63, 51
    and 148 prompt tokens padded together took 8.2 s where one of 157 took 3.8 s. An operator
    of a padded engine would not batch that way, so the baselines (``sled``, ``centralized``)
    do not either: a baseline runs at its best. On an engine that does not pad (the
    simulator's ``ragged``) joining is never dearer and the batch is plain FCFS."""

    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    name: str = "fcfs"
    padding_aware: bool = True

    def select(
        self, queue: list[RoundInfo], verifier: str, now: float, estimator: VerifyTimeEstimator
    ) -> tuple[Selection | None, float | None]:
        if not queue:
            return None, None
        ordered = sorted(queue, key=lambda r: (r.arrival, r.key))
        oldest = ordered[0].arrival
        due = oldest + self.max_wait_ms / 1000.0
        if len(ordered) < self.max_batch_size and now < due:
            return None, due
        why = "full" if len(ordered) >= self.max_batch_size else "max-wait"
        if not self.padding_aware:
            chosen = ordered[: self.max_batch_size]
            shape = BatchShape.of([r.new_tokens for r in chosen], [r.context_len for r in chosen])
            return Selection(chosen, estimator.predict(shape), [f"fcfs:{why}"]), None
        chosen = [ordered[0]]
        new, ctx = [ordered[0].new_tokens], [ordered[0].context_len]
        cost = estimator.predict(BatchShape.of(new, ctx))
        left_out = False
        for r in ordered[1:]:
            if len(chosen) >= self.max_batch_size:
                break
            joined = joined_cost(estimator, new, ctx, cost, r.new_tokens, r.context_len)
            if joined is None:
                left_out = True
                continue
            chosen.append(r)
            new.append(r.new_tokens)
            ctx.append(r.context_len)
            cost = joined
        reasons = [f"fcfs:{why}"] + (["fcfs:padding"] if left_out else [])
        # rounds left out may go at once in a batch of their own where the verifier takes more
        # than one batch at a time (``max_inflight``): look again now
        return Selection(chosen, cost, reasons), (now if left_out else None)


def joined_cost(estimator: VerifyTimeEstimator, new: Sequence[int], ctx: Sequence[int],
                cost: float, n: int, c: int) -> float | None:
    """The predicted ms of the batch of rows ``new`` / ``ctx`` (predicted ``cost``) with a row of
    ``n`` new ids on ``c`` cached ones added, or None when adding it costs more than verifying
    it alone: on an engine that pads every row to the longest new input and the longest
    context, a decode round beside a prefill costs a prefill of its own."""
    joined = estimator.predict(BatchShape.of([*new, n], [*ctx, c]))
    return joined if join_pays(joined, cost, estimator.predict(BatchShape.of([n], [c]))) else None


def join_pays(joined_ms: float, batch_ms: float, alone_ms: float) -> bool:
    """The padding rule every batch policy shares: a row joins a batch of ``batch_ms`` (becoming
    ``joined_ms``) only when that adds no more than verifying the row alone (``alone_ms``)."""
    return joined_ms - batch_ms <= alone_ms


class ScaledEstimator:
    """A verifier whose batches take ``factor`` times what ``inner`` predicts (factor = 1/speed).

    Predictions are scaled up; measurements are scaled back before ``inner`` learns from them, so
    one shared model can serve verifiers of different speeds."""

    def __init__(self, inner: VerifyTimeEstimator, factor: float) -> None:
        if not factor > 0 or not math.isfinite(factor):
            raise ValueError(f"time factor must be a positive number, got {factor!r}")
        self.inner = inner
        self.factor = float(factor)

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def model_key(self) -> str:
        return self.inner.model_key

    @property
    def model_scale(self) -> float:
        return self.inner.model_scale * self.factor

    def predict(self, shape: BatchShape) -> float:
        return self.inner.predict(shape) * self.factor

    def annotated(self, model_key: str, model_scale: float, alone_ms: float) -> float | None:
        ms = self.inner.annotated(model_key, model_scale, alone_ms)
        return None if ms is None else ms * self.factor

    def observe(self, shape: BatchShape, measured_ms: float, now: float | None = None) -> None:
        self.inner.observe(shape, measured_ms / self.factor, now)

    def to_json(self) -> str:
        return self.inner.to_json()


@dataclass
class _Verifier:
    name: str
    inflight: dict[str, BatchPlan] = field(default_factory=dict)
    speed: float = 1.0
    started: dict[str, float] = field(default_factory=dict)
    """When each in-flight batch was dispatched (scheduler clock), for its predicted remainder."""


def pack_batches(estimator: VerifyTimeEstimator, shapes: Sequence[tuple[int, int]],
                 max_batch_size: int) -> list[BatchShape]:
    """Rounds of these (new_tokens, context_len) shapes packed into batches of at most
    ``max_batch_size``, longest first, a round joining the open batch only while that costs no
    more than verifying it alone (on an engine that pads every row to the longest, a decode
    round beside a prefill costs a prefill of its own). A prediction of the work a queue holds,
    not a plan: the batch policy decides the real batches."""
    size = max(1, max_batch_size)
    out: list[BatchShape] = []
    new: list[int] = []
    ctx: list[int] = []
    for n, c in sorted(shapes, key=lambda s: (-s[0], -s[1])):
        if new and len(new) < size:
            # a row as long as the open batch's last adds no padding: it joins without a
            # prediction (decode rounds have a handful of lengths, so a long queue costs a
            # few predictions per batch, not two per round)
            if n == new[-1]:
                new.append(n)
                ctx.append(c)
                continue
            cost = estimator.predict(BatchShape.of(new, ctx))
            if joined_cost(estimator, new, ctx, cost, n, c) is not None:
                new.append(n)
                ctx.append(c)
                continue
        if new:
            out.append(BatchShape.of(new, ctx))
        new, ctx = [n], [c]
    if new:
        out.append(BatchShape.of(new, ctx))
    return out


class SchedulerCore:
    """Queue + placement + in-flight tracking around a ``BatchPolicy``.

    Heterogeneous verifiers: ``estimator_for(name)`` gives a verifier its own estimator (e.g. one
    refitted on its own timings); otherwise the shared ``estimator`` is used, scaled by the speed
    set with ``set_verifier_speed`` (a verifier k times slower has speed 1/k). The policy always
    sees the estimator of the verifier it forms a batch for, so its predicted times scale."""

    def __init__(
        self,
        policy: BatchPolicy,
        estimator: VerifyTimeEstimator,
        max_inflight: int = 1,
        id_prefix: str = "b",
        *,
        estimator_for: Callable[[str], VerifyTimeEstimator | None] | None = None,
    ) -> None:
        self.policy = policy
        self.estimator = estimator
        self.estimator_for = estimator_for
        self.max_inflight = max_inflight
        self.queue: dict[str, RoundInfo] = {}
        self.latest_round: dict[str, int] = {}
        self.affinity: dict[str, str] = {}
        self.verifiers: dict[str, _Verifier] = {}
        self.inflight_rounds: dict[str, RoundInfo] = {}
        self.speeds: dict[str, float] = {}
        self.late_dispatched = 0
        """Rounds dispatched past their deadline so far (best-effort SLO violations)."""
        self._last_shape: dict[str, tuple[int, int]] = {}
        self._scaled: dict[str, ScaledEstimator] = {}
        self._ids = itertools.count()
        self._prefix = id_prefix

    # ------------------------------------------------------------------ inputs
    def add(self, r: RoundInfo) -> list[str]:
        """Queue a round; returns keys of rounds it supersedes (older rounds of its request),
        which the caller acks without verifying. A duplicate key is ignored."""
        if r.key in self.queue or r.key in self.inflight_rounds:
            return []
        last = self.latest_round.get(r.request_id, -1)
        if r.round < last:
            return [r.key]
        self.latest_round[r.request_id] = r.round
        self._last_shape[r.request_id] = (r.new_tokens, r.context_len)
        dropped = [k for k, q in self.queue.items() if q.request_id == r.request_id]
        for k in dropped:
            del self.queue[k]
        self.queue[r.key] = r
        return dropped

    def set_verifiers(self, live: Iterable[str]) -> list[str]:
        """Update the set of live verifiers; rounds in flight on a vanished one are re-queued.
        Returns the re-queued keys."""
        live = set(live)
        requeued: list[str] = []
        for name in list(self.verifiers):
            if name not in live:
                gone = self.verifiers.pop(name)
                for plan in gone.inflight.values():
                    for key in plan.keys:
                        r = self.inflight_rounds.pop(key, None)
                        if r is not None and key not in self.queue:
                            self.queue[key] = r
                            requeued.append(key)
                for sess, v in list(self.affinity.items()):
                    if v == name:
                        del self.affinity[sess]
        for name in sorted(live):
            self.verifiers.setdefault(name, _Verifier(name, speed=self.speeds.get(name, 1.0)))
        return requeued

    def is_inflight(self, batch_id: str) -> bool:
        """Whether a planned batch is still to be sent: False once its verifier was dropped
        (benched or gone) and its rounds re-queued. A shell that awaits while sending one
        tick's batches checks this before each, or it would send a stale plan to a verifier
        that was just benched, and those rounds would be verified twice."""
        return any(batch_id in v.inflight for v in self.verifiers.values())

    def set_verifier_speed(self, name: str, speed: float) -> None:
        """Declare a verifier's relative speed (1.0 = what ``estimator`` models; 0.25 = four times
        slower). May be called before the verifier is live; it sticks across restarts."""
        if not speed > 0 or not math.isfinite(speed):
            raise ValueError(f"verifier speed must be a positive number, got {speed!r}")
        self.speeds[name] = float(speed)
        self._scaled.pop(name, None)
        if name in self.verifiers:
            self.verifiers[name].speed = float(speed)

    def estimator_of(self, name: str) -> VerifyTimeEstimator:
        """The estimator that predicts batch times on verifier ``name``."""
        if self.estimator_for is not None:
            own = self.estimator_for(name)
            if own is not None:
                return own
        speed = self.speeds.get(name, 1.0)
        if speed == 1.0:
            return self.estimator
        scaled = self._scaled.get(name)
        if scaled is None or scaled.inner is not self.estimator:
            scaled = self._scaled[name] = ScaledEstimator(self.estimator, 1.0 / speed)
        return scaled

    def backlog_ms(self, name: str, now: float) -> float:
        """Predicted ms until verifier ``name`` has finished what it holds: the predicted remainder
        of its in-flight batches plus its queued rounds (in batches of the policy's size)."""
        if name not in self.verifiers:
            return math.inf
        queued = [(r.new_tokens, r.context_len) for r in self.queue.values()
                  if self.affinity.get(r.request_id) == name]
        return self._inflight_left_ms(name, now) + self._work_ms(name, queued)

    def sessions_per_verifier(self) -> dict[str, int]:
        """How many sessions are placed on each live verifier."""
        count = {n: 0 for n in sorted(self.verifiers)}
        for v in self.affinity.values():
            if v in count:
                count[v] += 1
        return count

    def complete(self, batch_id: str) -> BatchPlan | None:
        """A verifier finished ``batch_id`` (its timing sample arrived)."""
        for v in self.verifiers.values():
            plan = v.inflight.pop(batch_id, None)
            if plan is not None:
                v.started.pop(batch_id, None)
                for key in plan.keys:
                    self.inflight_rounds.pop(key, None)
                return plan
        return None

    def requeue_overdue(self, now: float, grace_s: float = 30.0, factor: float = 10.0) -> list[str]:
        """Re-queue the rounds of batches a live verifier has held far longer than predicted
        (``max(grace_s, factor x predicted)``): its answer was lost (e.g. a broker outage
        while it published), and waiting for it would idle the verifier forever. A late
        answer after all is harmless: the drafter applies a round's verdict once."""
        requeued: list[str] = []
        for v in self.verifiers.values():
            for batch_id, plan in list(v.inflight.items()):
                started = v.started.get(batch_id, now)
                if now - started <= max(grace_s, factor * plan.predicted_ms / 1000.0):
                    continue
                del v.inflight[batch_id]
                v.started.pop(batch_id, None)
                for key in plan.keys:
                    r = self.inflight_rounds.pop(key, None)
                    if r is not None and key not in self.queue:
                        self.queue[key] = r
                        requeued.append(key)
        return requeued

    def withdraw(self, key: str) -> RoundInfo | None:
        """Take a queued (not yet dispatched) round back out of the queue and return it (None
        if it is not queued: unknown, superseded or already in a batch). The engine's memory
        manager does this when it preempts the round's session to free KV memory: the round
        must not be verified now, and comes back later with ``add`` (the same key may be added
        again). Placement and the request's round history are kept."""
        return self.queue.pop(key, None)

    def finish_request(self, request_id: str) -> None:
        """Forget a finished request's placement."""
        self.affinity.pop(request_id, None)
        self.latest_round.pop(request_id, None)
        self._last_shape.pop(request_id, None)

    # ------------------------------------------------------------------ decisions
    def _inflight_left_ms(self, name: str, now: float) -> float:
        ver = self.verifiers[name]
        left = 0.0
        for bid, plan in ver.inflight.items():
            t0 = ver.started.get(bid, now)
            left += max(0.0, plan.predicted_ms - (now - t0) * 1000.0)
        return left

    def _work_ms(self, name: str, shapes: Sequence[tuple[int, int]]) -> float:
        """Predicted ms to verify rounds of these (new_tokens, context_len) shapes on ``name``,
        in batches of at most the policy's ``max_batch_size`` packed the way a padding-aware
        scheduler would (``pack_batches``): cutting them in arrival order priced a first round
        (a prefill) in one padded batch with every decode round queued beside it, several
        times what the rounds cost, and admission refused requests the system then served in
        a third of their SLO."""
        if not shapes:
            return 0.0
        est = self.estimator_of(name)
        return sum(est.predict(b) for b in pack_batches(est, shapes, self.policy.max_batch_size))

    def _placement_cost_ms(self, name: str, probe: tuple[int, int], now: float) -> float:
        """When a new session's round would be done on ``name``: what it has in flight, plus one
        round for every session already there (its queued round, or one like its last for a
        session whose round is elsewhere in the pipeline), plus the new round."""
        shapes: list[tuple[int, int]] = []
        queued = {r.request_id: r for r in self.queue.values()}
        busy = {r.request_id for r in self.inflight_rounds.values()}
        for sess in sorted(self.affinity):
            if self.affinity[sess] != name:
                continue
            if sess in queued:
                shapes.append((queued[sess].new_tokens, queued[sess].context_len))
            elif sess not in busy and sess in self._last_shape:
                shapes.append(self._last_shape[sess])
        shapes.append(probe)
        return self._inflight_left_ms(name, now) + self._work_ms(name, shapes)

    def _place(self, request_id: str, now: float | None = None) -> str | None:
        v = self.affinity.get(request_id)
        if v in self.verifiers:
            return v
        if not self.verifiers:
            return None
        t = 0.0 if now is None else now
        probe = self._last_shape.get(request_id, (1, 0))
        cost = {n: self._placement_cost_ms(n, probe, t) for n in sorted(self.verifiers)}
        choice = min(cost, key=lambda n: (cost[n], n))
        self.affinity[request_id] = choice
        return choice

    def tick(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        per_verifier: dict[str, list[RoundInfo]] = {}
        for r in self.queue.values():
            v = self._place(r.request_id, now)
            if v is not None:
                per_verifier.setdefault(v, []).append(r)
        for name in sorted(per_verifier):
            ver = self.verifiers[name]
            if len(ver.inflight) >= self.max_inflight:
                continue
            selection, wake = self.policy.select(per_verifier[name], name, now, self.estimator_of(name))
            if wake is not None:
                out.wake_at = wake if out.wake_at is None else min(out.wake_at, wake)
            if selection is None or not selection.rounds:
                continue
            plan = BatchPlan(
                batch_id=f"{self._prefix}{next(self._ids)}",
                verifier=name,
                keys=tuple(r.key for r in selection.rounds),
                predicted_ms=selection.predicted_ms,
                policy=self.policy.name,
                reasons=tuple(selection.reasons),
                late=tuple(selection.late),
            )
            for r in selection.rounds:
                del self.queue[r.key]
                self.inflight_rounds[r.key] = r
            ver.inflight[plan.batch_id] = plan
            ver.started[plan.batch_id] = now
            out.batches.append(plan)
            out.late.extend(plan.late)
            self.late_dispatched += len(plan.late)
        return out

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(v.inflight for v in self.verifiers.values())
