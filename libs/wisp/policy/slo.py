"""WISP's SLO-aware verification batching and admission control.

Both are plain deterministic objects: no I/O, the time is passed in, and every prediction comes
from a ``VerifyTimeEstimator``. The scheduler service and the discrete-event simulator drive the
same objects, so a plan is a function of (queue, now, estimator) alone.

Batch formation (``SloAwarePolicy.select``), for one idle verifier, in four phases (with the
default ``late_first``, phase 3 runs right after phase 0: see below). With
``alone(r)`` the predicted time of ``r`` verified by itself and ``budget(r) = deadline - now``:

* a round is **late** if ``budget(r) < alone(r)``: not even an empty batch can make its deadline;
* its **slack** is ``budget(r) - alone(r)``; it is **urgent** if slack < the urgency horizon
  ``urgency_ms + urgency_batches x T_ref``, where ``T_ref`` is the predicted time of the batch the
  verifier would run next (the earliest-deadline rounds up to the size caps): an urgent round
  cannot afford to sit out one more batch;
* a batch is **feasible** if ``now + predict(batch) <= deadline`` for every on-time member
  (late members are already lost and do not constrain it). Every admission must keep it feasible;
* with ``padding_aware`` (the default) a round joins a non-empty batch only if that costs no
  more than verifying it alone (``joined_cost``'s rule): on an engine that pads every row to the
  longest, a decode round beside a prefill would cost a prefill of its own.

0. ``aged``: rounds queued for ``starvation_ms`` or longer, oldest first (the starvation guard);
1. ``urgent``: urgent rounds by earliest deadline (EDF);
2. ``density``: the other on-time rounds greedily by value density, expected committed tokens per
   ms of predicted *marginal* verify time ``predict(batch + r) - predict(batch)``, re-evaluated
   after every admission (the marginal cost depends on what is already in: padding, context);
3. ``late-best-effort``: late rounds, most overdue first, into the room left, as long as the
   batch stays feasible for its on-time members. They are reported in ``Selection.late``.
4. ``lost-best-effort``: late rounds whose request can no longer meet its SLOs (``catchup``: a
   first round past the TTFT deadline, or a request further behind than its remaining tokens can
   make up), most overdue first, into the room left after everything that can still attain.
   Under overload, serving them ahead of others only makes more requests miss; they still ride
   along when there is room, fill an otherwise idle verifier, and the starvation guard bounds
   their wait. Also reported in ``Selection.late``.

With ``late_first`` (the default) the late rounds that are not lost are admitted right after the
aged ones, most overdue first, and the on-time phases then add only what keeps the batch within
each on-time member's deadline. The
TPOT SLO is a per-request *mean*, so a late round is not a lost cause: it is its request falling
behind, and serving it at once lets the request catch up (under overload, deferring late rounds
behind on-time ones kept them waiting batch after batch). ``late_first=False`` restores
late-rounds-last.

Rounds not chosen wait for a later batch. Starvation freedom: an on-time round's slack shrinks
until it is urgent; a late round rides along whenever there is harmless room and fills the batch
when nothing on time is waiting; and any round queued for ``starvation_ms`` goes first, so every
round is dispatched at most ``starvation_ms`` plus one batch per older aged round after arriving.
Work conservation: an on-time round alone is feasible by definition, and a late one is always
admissible into an empty batch, so a non-empty queue always yields a non-empty batch, except
during the short hold ``max_wait_ms`` (0 = never hold; the services use ``WISP_MAX_WAIT_MS``),
which ends at ``wake_at`` and is skipped when any round is late or due within the hold.

Admission control (``AdmissionController.decide``) is documented on the class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from wisp.policy.estimator import BatchShape, VerifyTimeEstimator, round_shape
from wisp.policy.scheduler import (
    BatchPolicy,
    FcfsPolicy,
    RoundInfo,
    SchedulerCore,
    Selection,
    join_pays,
)
from wisp.settings import Mode, Settings

DEFAULT_ACCEPTANCE = 0.62
"""Greedy acceptance of the Qwen2.5-Coder 0.5B -> 1.5B pair at k = 4, measured over HumanEval,
MT-Bench and ShareGPT prompts on the packaged weights: the value of a round nobody has estimated."""

REASON_AGED = "aged"
REASON_URGENT = "urgent"
REASON_DENSITY = "density"
REASON_LATE = "late-best-effort"
REASON_LOST = "lost-best-effort"

_MIN_MARGINAL_MS = 1e-3
"""Floor on a marginal cost so a free (or, with a non-monotone model, negative) one ranks first
instead of dividing by zero."""


def expected_tokens(r: RoundInfo, acceptance: float | None = DEFAULT_ACCEPTANCE) -> float:
    """Tokens ``r`` is expected to commit. ``RoundInfo.expected_commit`` is taken as given unless
    it is the unset default (1.0) on a round that carries drafts: then ``1 + acceptance x k``
    (each drafted token passes with probability ``acceptance``, plus the target's own token,
    ignoring that acceptance stops at the first rejection: a ranking value, not a forecast).
    ``acceptance=None`` takes ``expected_commit`` literally."""
    if acceptance is None or r.draft_len <= 0 or r.expected_commit != 1.0:
        return max(0.0, float(r.expected_commit))
    return 1.0 + acceptance * r.draft_len


def deadline_at(generated_len: int, request_ts: float, ttft_slo_ms: float, tpot_slo_ms: float,
                first_token_ts: float | None = None) -> float:
    """When a request's next round is due (s, the clock of ``request_ts``): the TTFT SLO for the
    first token, then one TPOT per token already generated plus the one the round commits at
    least, counted from the first token (the TPOT SLO is the mean gap after it: counting from the
    TTFT *deadline* instead lent a request that started early its unused TTFT budget, and such
    requests met every round deadline yet missed their TPOT SLO). Before the first token's time
    is known, from the TTFT deadline. The scheduler, the simulator and the drafter's
    ``drafting_order`` all use this one formula."""
    if generated_len == 0:
        return request_ts + ttft_slo_ms / 1000.0
    if first_token_ts is not None:
        return first_token_ts + tpot_slo_ms * generated_len / 1000.0
    return request_ts + (ttft_slo_ms + tpot_slo_ms * generated_len) / 1000.0


def request_lost(
    generated_len: int | None,
    max_new_tokens: int | None,
    tpot_slo_ms: float | None,
    lateness_ms: float,
    catchup: float | None = 0.5,
) -> bool:
    """Whether a request ``lateness_ms`` behind its schedule can no longer meet its SLOs: late on
    its first token (the TTFT SLO is missed whatever comes next), or later so far behind that
    its remaining tokens would have to come more than ``1 / (1 - catchup)`` times faster than
    the TPOT SLO (lateness > ``catchup x tpot_slo x tokens left``). Unknown progress: never."""
    if catchup is None or generated_len is None or lateness_ms <= 0:
        return False
    if generated_len == 0:
        return True
    if max_new_tokens is None or tpot_slo_ms is None:
        return False
    left = max(0, max_new_tokens - generated_len - 1)
    return lateness_ms > catchup * tpot_slo_ms * left


@dataclass(frozen=True)
class DraftJob:
    """A session waiting for its drafter to draft its next round, as plain numbers."""

    key: str
    deadline: float
    """When the next round's first token is due (``round_deadline`` of that round; same clock as
    ``now``)."""
    generated_len: int | None = None
    max_new_tokens: int | None = None
    tpot_slo_ms: float | None = None


def drafting_order(jobs: Sequence[DraftJob], now: float, catchup: float | None = 0.5) -> list[str]:
    """The order a drafter shared by several sessions should draft them in (wisp mode): sessions
    that can still meet their SLOs first, earliest deadline first; then those that cannot
    (``request_lost``), most overdue first. A drafter that drafts one session at a time is a
    queue like the verifier's, and under overload first-come-first-served lets the sessions
    that are already lost delay the ones that could still make it. Stable for equal keys."""
    def key(j: DraftJob) -> tuple[int, float]:
        lost = request_lost(j.generated_len, j.max_new_tokens, j.tpot_slo_ms,
                            (now - j.deadline) * 1000.0, catchup)
        return (1 if lost else 0, j.deadline)

    return [j.key for j in sorted(jobs, key=key)]


def _shape(rounds: Sequence[RoundInfo]) -> BatchShape:
    return BatchShape.of([r.new_tokens for r in rounds], [r.context_len for r in rounds])


def alone_ms(r: RoundInfo, estimator: VerifyTimeEstimator) -> float:
    """``r`` verified by itself: the estimator hop's annotation when this very model made it,
    else predicted here (a model published since, or no annotation)."""
    if r.predicted_by is not None:
        ms = estimator.annotated(r.predicted_by, r.predicted_scale, r.predicted_ms)
        if ms is not None:
            return ms
    return estimator.predict(_shape([r]))


@dataclass
class SloAwarePolicy:
    """WISP's batching: aged, then urgent by EDF, then dense, then late rounds best-effort, each
    kept only if the predicted batch still meets every on-time member's deadline and (with
    ``padding_aware``) joining costs no more than verifying the round alone (module doc).

    ``max_new_tokens`` caps the tokens fed per batch (sum of ``draft_len + 1``); a single round
    above the cap is still served, alone, so it cannot starve."""

    max_batch_size: int = 16
    max_new_tokens: int | None = None
    urgency_ms: float = 0.0
    """Fixed part of the urgency horizon (e.g. to absorb estimator error)."""
    urgency_batches: float = 1.0
    """How many next batches (``T_ref``) an urgent round could not afford to wait out."""
    default_acceptance: float | None = DEFAULT_ACCEPTANCE
    starvation_ms: float | None = 5000.0
    """A round queued this long goes first whatever its value (None: no guard; then a late round
    can starve under a sustained overload of on-time work)."""
    density_window: int | None = 64
    """Re-evaluate marginal costs after each admission only for this many candidates, the best by
    their density at the start of the fill (None: all). Keeps a long queue's batch formation at
    O(queue + window x batch) predictions instead of O(queue x batch); exact when the queue is
    no longer than the window."""
    max_wait_ms: float = 0.0
    """Hold an idle verifier's batch up to this long after the oldest round arrived while the
    batch is not full and no round is late (FCFS's ``max_wait_ms``). On a CPU a forward's fixed
    cost dominates small batches, so dispatching every round the moment it lands cut throughput
    against FCFS, which waits 2 ms for company."""
    late_first: bool = True
    """Serve late rounds first, most overdue first (module doc)."""
    catchup: float | None = 0.5
    """A late round is *lost* when its request can no longer meet its SLOs: its first round (the
    TTFT SLO is already missed), or later, when it is so far behind that the tokens it may still
    generate would have to come more than ``1 / (1 - catchup)`` times faster than the TPOT SLO
    to make the mean (lateness > ``catchup x tpot_slo x tokens left``). Lost rounds are served
    after everything that can still attain, best effort (None: no round is ever lost)."""
    padding_aware: bool = True
    """A round joins a non-empty batch only while that costs no more than verifying it alone (the
    rule ``FcfsPolicy`` and ``pack_batches`` use, ``joined_cost``). The deadline check alone let a
    prefill and the decode rounds around it share a forward on an engine that pads every row to
    the longest: each decode round then cost a prefill of its own and the batch took a multiple of
    the prefill, which the deadline check allowed whenever the budgets were loose. Rounds refused
    this way wait for the next batch, and the verifier is asked to look again at once (``wake_at
    = now``) in case it takes more than one batch at a time. False: deadlines alone decide."""
    name: str = "slo"

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1 (or None for no cap)")
        if self.density_window is not None and self.density_window < 1:
            raise ValueError("density_window must be at least 1 (or None for no window)")

    # ------------------------------------------------------------------ the policy
    def select(
        self, queue: list[RoundInfo], verifier: str, now: float, estimator: VerifyTimeEstimator
    ) -> tuple[Selection | None, float | None]:
        if not queue:
            return None, None
        # a canonical order makes the plan independent of how the queue was handed over
        edf = sorted(queue, key=lambda r: (r.deadline, r.arrival, r.key))
        alone = {r.key: alone_ms(r, estimator) for r in edf}
        budget = {r.key: (r.deadline - now) * 1000.0 for r in edf}
        late = {r.key for r in edf if budget[r.key] < alone[r.key]}
        if self.max_wait_ms > 0 and len(edf) < self.max_batch_size and not late:
            due = min(r.arrival for r in edf) + self.max_wait_ms / 1000.0
            if now < due and all(budget[r.key] - alone[r.key] > self.max_wait_ms for r in edf):
                return None, due
        horizon = self.urgency_ms + (
            self.urgency_batches * estimator.predict(_shape(self._take(edf))) if self.urgency_batches else 0.0
        )

        b = _Batch(self, estimator, budget, late, alone)
        lost = {r.key for r in edf if r.key in late and self.is_lost(r, alone[r.key] - budget[r.key])}
        late_rounds = [r for r in edf if r.key in late and r.key not in lost]  # most overdue first
        # the starvation guard first: the oldest aged round always gets in (a late round admitted
        # before it could otherwise keep an aged prefill out for good under the padding rule)
        if self.starvation_ms is not None:
            aged = [r for r in edf if (now - r.arrival) * 1000.0 >= self.starvation_ms]
            for r in sorted(aged, key=lambda r: (r.arrival, r.deadline, r.key)):
                b.try_add(r, REASON_AGED)
        if self.late_first:
            for r in late_rounds:
                b.try_add(r, REASON_LATE)
        for r in edf:
            if r.key not in late and budget[r.key] - alone[r.key] < horizon:
                b.try_add(r, REASON_URGENT)
        self._fill_by_density([r for r in edf if r.key not in late], b)
        if not self.late_first:
            for r in late_rounds:
                b.try_add(r, REASON_LATE)
        for r in edf:
            if r.key in lost:
                b.try_add(r, REASON_LOST)

        if not b.rounds:  # unreachable by construction (module doc); never hand back nothing
            first = edf[0]
            b.force(first, REASON_LOST if first.key in lost else REASON_LATE if first.key in late
                    else REASON_URGENT)
        sel = Selection(
            rounds=list(b.rounds),
            predicted_ms=b.ms,
            reasons=list(b.reasons),
            late=[r.key for r in b.rounds if r.key in late],
        )
        # rounds refused as too dear to pad may go at once in a batch of their own where the
        # verifier takes more than one batch at a time (``max_inflight``): look again now
        return sel, (now if b.padded_out - b.keys else None)

    def is_lost(self, r: RoundInfo, lateness_ms: float) -> bool:
        """Whether late round ``r`` (predicted ``lateness_ms`` past its deadline even alone) belongs
        to a request that can no longer meet its SLOs (``catchup``)."""
        return request_lost(r.generated_len, r.max_new_tokens, r.tpot_slo_ms, lateness_ms, self.catchup)

    # ------------------------------------------------------------------ helpers
    def _take(self, ordered: Sequence[RoundInfo]) -> list[RoundInfo]:
        """The first rounds of ``ordered`` that fit the size and token caps."""
        out: list[RoundInfo] = []
        tokens = 0
        for r in ordered:
            if len(out) >= self.max_batch_size:
                break
            if self.max_new_tokens is not None and out and tokens + r.new_tokens > self.max_new_tokens:
                continue
            out.append(r)
            tokens += r.new_tokens
        return out

    def _fill_by_density(self, candidates: list[RoundInfo], b: _Batch) -> None:
        """Greedy fill: admit the feasible candidate with the most expected tokens per marginal
        ms, then re-evaluate. A candidate that is infeasible or over the token cap now stays so
        as the batch grows (for a monotone estimator), so it is dropped for this batch. One
        refused by the padding rule might fit later (a wider row that joined meanwhile has
        paid its padding); it is dropped all the same and waits for the next look, which the
        policy asks for at once."""
        pool = [r for r in candidates if r.key not in b.keys]
        if self.density_window is not None and len(pool) > self.density_window:
            ranked = self._rank(pool, b)
            pool = [r for _, r, _ in ranked]
        while pool and b.room():
            window = pool if self.density_window is None else pool[: self.density_window]
            ranked = self._rank(window, b)
            if not ranked:
                pool = pool[len(window):]
                continue
            _, pick, ms = ranked[0]
            b.admit(pick, REASON_DENSITY, ms)
            feasible = {r.key for _, r, _ in ranked if r is not pick}
            pool = [r for r in window if r.key in feasible] + pool[len(window):]

    def _rank(
        self, pool: Sequence[RoundInfo], b: _Batch
    ) -> list[tuple[tuple[float, float, float, str], RoundInfo, float]]:
        """The admissible rounds of ``pool`` best first: (rank, round, batch ms with it)."""
        base = b.ms
        out = []
        for r in pool:
            ms = b.cost_with(r)
            if ms is None:
                continue
            density = expected_tokens(r, self.default_acceptance) / max(ms - base, _MIN_MARGINAL_MS)
            out.append(((-density, r.deadline, r.arrival, r.key), r, ms))
        out.sort(key=lambda x: x[0])
        return out


class _Batch:
    """The batch being formed, with the constraints every admission must respect."""

    def __init__(
        self,
        policy: SloAwarePolicy,
        estimator: VerifyTimeEstimator,
        budget: Mapping[str, float],
        late: set[str],
        alone: Mapping[str, float],
    ) -> None:
        self.policy = policy
        self.alone = alone
        self.padded_out: set[str] = set()
        """Rounds refused because joining would cost more than verifying them alone."""
        self.estimator = estimator
        self.budget = budget
        self.late = late
        self.rounds: list[RoundInfo] = []
        self.reasons: list[str] = []
        self.keys: set[str] = set()
        self.shape = BatchShape((), ())
        """``_shape(self.rounds)``, kept as rounds are admitted: ``cost_with`` is asked for every
        candidate at every step, and rebuilding the shape each time made batch formation
        quadratic in Python objects (most of a busy simulation's time)."""
        self.tokens = 0
        self.ms = 0.0
        self.limit_ms = math.inf
        """The tightest on-time member's budget: the batch must finish within it."""

    def room(self) -> bool:
        return len(self.rounds) < self.policy.max_batch_size

    def cost_with(self, r: RoundInfo) -> float | None:
        """Predicted batch ms with ``r`` added, or None if the caps or a deadline forbid it."""
        if r.key in self.keys or not self.room():
            return None
        cap = self.policy.max_new_tokens
        if cap is not None and self.rounds and self.tokens + r.new_tokens > cap:
            return None
        ms = self.estimator.predict(self.shape.plus(r.new_tokens, r.context_len))
        if self.policy.padding_aware and self.rounds and not join_pays(ms, self.ms, self.alone[r.key]):
            self.padded_out.add(r.key)
            return None
        limit = self.limit_ms if r.key in self.late else min(self.limit_ms, self.budget[r.key])
        return ms if ms <= limit else None

    def try_add(self, r: RoundInfo, reason: str) -> bool:
        ms = self.cost_with(r)
        if ms is None:
            return False
        self.admit(r, reason, ms)
        return True

    def admit(self, r: RoundInfo, reason: str, ms: float) -> None:
        self.rounds.append(r)
        self.shape = self.shape.plus(r.new_tokens, r.context_len)
        self.reasons.append(reason)
        self.keys.add(r.key)
        self.tokens += r.new_tokens
        self.ms = ms
        if r.key not in self.late:
            self.limit_ms = min(self.limit_ms, self.budget[r.key])

    def force(self, r: RoundInfo, reason: str) -> None:
        self.admit(r, reason, self.estimator.predict(self.shape.plus(r.new_tokens, r.context_len)))


# ---------------------------------------------------------------------- admission control
@dataclass(frozen=True)
class VerifierLoad:
    """What admission control needs to know about one live verifier, as plain numbers."""

    name: str
    backlog_ms: float
    """Predicted ms until it has finished the work it already holds (in flight + queued)."""
    sessions: int = 0
    """Sessions placed on it (each keeps sending one round at a time)."""
    speed: float = 1.0
    """Relative speed (0.25 = four times slower than the estimator's model)."""
    tightest_tpot_slo_ms: float | None = None
    """The smallest TPOT SLO among its running sessions, if known: a new session must not push
    them over it."""
    kv_free_tokens: int | None = None
    """KV cache tokens free on it (None: not reported, KV not considered)."""
    kv_waiting: int = 0
    """Sessions already waiting for KV memory on it (preempted or not yet admitted)."""


@dataclass(frozen=True)
class Admission:
    admit: bool
    reason: str
    verifier: str | None = None
    """The verifier the prediction was made for (where the session fits best)."""
    predicted_ttft_ms: float | None = None
    predicted_tpot_ms: float | None = None


@dataclass
class AdmissionController:
    """Refuses a new request when the system cannot meet its SLOs at the current load.

    For each live verifier ``v`` with ``n = sessions + 1`` (the newcomer included), batches of
    ``m = min(n, max_batch_size)`` rounds and ``T(shape) = estimator.predict(shape) / speed``:

    * predicted TTFT = ``backlog_ms + T(first round) + round_overhead_ms``, the first round (a
      prefill of its prompt plus its draft, ``round_shape``) priced alone: the batch policy does
      not pad a prefill with decode rounds (their marginal cost on a padded engine is a prefill
      each, so they go in batches of their own) but serves it by its TTFT deadline. Pricing it
      in a batch with ``m - 1`` typical rounds, as this controller once did, predicted 15-55 s
      for requests that the real system (1.5B target on one CPU core, 4 devices) then answered
      in 4.7 s (p50), and refused 21 of 47 of them;
    * predicted TPOT = ``max(ceil(n / max_batch_size) x T(m typical rounds),
      round_overhead_ms + T(m typical rounds)) / (1 + acceptance x draft_len)``: every session on
      ``v`` gets one round per verifier cycle, and a round commits that many tokens on average.

    ``v`` can take the request if it is under ``max_sessions_per_verifier``, predicted TTFT <=
    ``ttft_slo_ms x headroom``, predicted TPOT <= ``tpot_slo_ms x headroom`` and predicted TPOT
    <= its tightest running TPOT SLO (the newcomer slows everyone on ``v`` down). The request is
    admitted on the fitting verifier with the least predicted TTFT (ties by name); if none fits,
    it is refused with the reason of the verifier with the least predicted TTFT.

    Where a verifier reports its KV cache (``kv_free_tokens``), a request is also refused while
    sessions are waiting there for memory or the newcomer's prompt does not fit: admitting it
    would only lengthen that queue, whose wait no SLO prediction above can see.
    """

    estimator: VerifyTimeEstimator
    max_batch_size: int = 16
    draft_len: int = 4
    context_len: int = 256
    """Typical context of a running session's round."""
    acceptance: float = DEFAULT_ACCEPTANCE
    round_overhead_ms: float = 0.0
    """Per-round time outside the verifier (drafting on the device, network)."""
    headroom: float = 1.0
    """Admit while predicted <= SLO x headroom (< 1 keeps a safety margin)."""
    max_sessions_per_verifier: int | None = None

    def decide(
        self,
        loads: Sequence[VerifierLoad],
        ttft_slo_ms: float,
        tpot_slo_ms: float,
        prompt_len: int = 0,
    ) -> Admission:
        if not loads:
            return Admission(False, "no live verifier to serve the request; retry later")
        verdicts = [self._judge(v, ttft_slo_ms, tpot_slo_ms, prompt_len) for v in loads]
        verdicts.sort(key=lambda a: (a.predicted_ttft_ms or 0.0, a.verifier or ""))
        for a in verdicts:
            if a.admit:
                return a
        return verdicts[0]

    def _judge(self, v: VerifierLoad, ttft_slo_ms: float, tpot_slo_ms: float, prompt_len: int) -> Admission:
        n = max(0, v.sessions) + 1
        m = min(n, self.max_batch_size)
        k1 = self.draft_len + 1
        speed = v.speed if v.speed > 0 else 1e-9

        def t(new: list[int], ctx: list[int]) -> float:
            return self.estimator.predict(BatchShape.of(new, ctx)) / speed

        p_new, p_ctx = round_shape(self.draft_len, max(prompt_len, 1), 0)  # a prefill
        ttft = max(0.0, v.backlog_ms) + t([p_new], [p_ctx]) + self.round_overhead_ms
        typical = t([k1] * m, [self.context_len] * m)
        cycle = math.ceil(n / self.max_batch_size) * typical
        tpot = max(cycle, self.round_overhead_ms + typical) / (1.0 + self.acceptance * self.draft_len)
        out = dict(verifier=v.name, predicted_ttft_ms=ttft, predicted_tpot_ms=tpot)

        if v.kv_free_tokens is not None:
            need = max(prompt_len, 1) + k1
            if v.kv_waiting > 0 or v.kv_free_tokens < need:
                return Admission(False, f"verifier {v.name}'s KV cache is full ({v.kv_free_tokens} tokens "
                                        f"free, {v.kv_waiting} sessions already waiting for memory); "
                                        f"retry later or add verifiers", **out)
        cap = self.max_sessions_per_verifier
        if cap is not None and v.sessions >= cap:
            return Admission(False, f"verifier {v.name} already serves {v.sessions} sessions (the cap is "
                                    f"{cap}); retry later or add verifiers", **out)
        if ttft > ttft_slo_ms * self.headroom:
            return Admission(False, f"predicted time to first token {ttft:.0f} ms exceeds the "
                                    f"{ttft_slo_ms:.0f} ms SLO at the current load; retry later or "
                                    f"relax --ttft-slo-ms", **out)
        if tpot > tpot_slo_ms * self.headroom:
            return Admission(False, f"predicted time per output token {tpot:.0f} ms exceeds the "
                                    f"{tpot_slo_ms:.0f} ms SLO with {n} sessions on verifier {v.name}; "
                                    f"retry later or relax --tpot-slo-ms", **out)
        if v.tightest_tpot_slo_ms is not None and tpot > v.tightest_tpot_slo_ms:
            tight = v.tightest_tpot_slo_ms
            return Admission(False, f"admitting would slow the sessions running on {v.name} to "
                                    f"{tpot:.0f} ms per token, above their tightest {tight:.0f} ms "
                                    f"TPOT SLO; retry later", **out)
        return Admission(True, f"predicted TTFT {ttft:.0f} ms <= {ttft_slo_ms:.0f} ms and TPOT {tpot:.0f} ms "
                               f"<= {tpot_slo_ms:.0f} ms on {v.name}", **out)


def snapshot(
    core: SchedulerCore,
    now: float,
    tpot_slo_of: Callable[[str], float | None] | None = None,
) -> list[VerifierLoad]:
    """The live verifiers' load as ``SchedulerCore`` sees it, for ``AdmissionController``.
    ``tpot_slo_of(request_id)`` gives a running session's TPOT SLO (None: unknown).

    With per-verifier estimators (``estimator_for``) the backlog is already in that verifier's
    time, but the speed reported is the one set with ``set_verifier_speed`` (1.0 by default)."""
    sessions = core.sessions_per_verifier()
    tightest: dict[str, float] = {}
    if tpot_slo_of is not None:
        for sess in sorted(core.affinity):
            v, slo = core.affinity[sess], tpot_slo_of(sess)
            if slo is not None and v in sessions:
                tightest[v] = min(tightest.get(v, math.inf), slo)
    return [
        VerifierLoad(
            name=n,
            backlog_ms=core.backlog_ms(n, now),
            sessions=sessions[n],
            speed=core.speeds.get(n, 1.0),
            tightest_tpot_slo_ms=tightest.get(n),
        )
        for n in sorted(core.verifiers)
    ]


def batch_policy(settings: Settings) -> BatchPolicy:
    """The scheduler's batch policy for its mode (the scheduler service and the simulator both
    take it from here): wisp -> SLO-aware batching; sled and centralized -> first come first
    served up to ``max_batch_size``. In every mode a round joins a batch only while that costs
    no more than verifying it alone (``padding_aware``)."""
    if settings.mode == Mode.wisp:
        return SloAwarePolicy(max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms)
    return FcfsPolicy(settings.max_batch_size, settings.max_wait_ms)
