"""The life of one speculation session: plan a round, record its drafting, apply its verdict.

Why one object: the drafter service, the simulator, ``controller train`` (its replay of recorded
sequences), ``controller eval`` and ``trace record`` all run this loop. When each had its own
copy the copies drifted: wasted drafting was ``drafted - accepted`` in the drafter and
``drafted - accepted - 1`` in the simulator, the context length a cost-aware controller weighs
was set everywhere but in production, and the device's measured draft speed reached the
controller only in the simulator. Here each rule exists once:

* the draft budget of a round (the verifier adds one token of its own, so a round drafts at
  most ``max_new - generated - 1``), the context it builds on, and whether it is a draft-less
  prefill round (the controller says so in its plan);
* the measured draft speed, an exponential moving average of ms per draft forward, which the
  controller weighs against the verify time one more token costs;
* the verdict: the EOS and length cut, the speculation statistics, the first and last token
  times, and wasted drafting (``wasted_draft_ms``).

Time is passed in (``now``), never read, so the simulator's virtual clock and the services'
wall clock drive the same code. No Redis, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from wisp.metrics import wasted_tokens
from wisp.policy.controller import DraftLengthPolicy, SessionSpecStats, StopFn, measured

DRAFT_MS_ALPHA = 0.3
"""Weight of the newest round in the draft-speed EMA: a device that slows down (thermal
throttling, a busy phone) is followed within a few rounds, one slow round does not swing it."""


REPLAY_TOKEN = 0
"""Token id of a replayed round's committed tokens (replays know counts, not ids)."""
REPLAY_EOS = -1
"""Token id that ends a replayed output: a replay's ``SpecSession`` has ``eos={REPLAY_EOS}``."""


def replay_tokens(n: int, left: int) -> list[int]:
    """A verdict's tokens in a replay that knows how long each output is but not its ids (the
    simulator, the controller trainer's oracle replay): ``n`` committed tokens, cut at and ending
    in ``REPLAY_EOS`` when the output's natural end (``left`` tokens away) is reached, so the
    session's own EOS rule ends it."""
    if n < left:
        return [REPLAY_TOKEN] * n
    return [REPLAY_TOKEN] * (left - 1) + [REPLAY_EOS]


def expected_commit(top1_probs: Iterable[float]) -> float:
    """Tokens a round is expected to commit: the target's own token plus each drafted token
    weighted by the chance that it and all before it are accepted, taking the draft's own
    top-1 probability as that chance (a cheap, monotone proxy the scheduler ranks rounds by)."""
    total, alive = 1.0, 1.0
    for p in top1_probs:
        alive *= min(max(p, 0.0), 1.0)
        total += alive
    return total


def wasted_draft_ms(drafted: int, accepted: int, round_draft_ms: float) -> float:
    """Drafting time thrown away in a round: the share of the round's drafting time spent on
    drafted tokens the target did not accept (``wisp.metrics.wasted_tokens``)."""
    return wasted_tokens(drafted, accepted) * round_draft_ms / drafted if drafted else 0.0


@dataclass(frozen=True)
class RoundPlan:
    """What the next round does, as plain data."""

    round: int
    max_k: int
    """Draft at most this many tokens (0: send the round undrafted)."""
    stop: StopFn | None
    """The controller's stop rule, asked before each drafted token (None: draft ``max_k``)."""
    prefill: bool
    """A draft-less first round: the server's prefill makes the first token while the device
    prefills its draft model in the background."""
    context_len: int
    """Committed ids (prompt + generated) the round builds on."""
    server_rounds: int = 0
    """An undrafted round that starts a server run: the verifier goes on decoding this many
    more rounds by itself (``wisp.policy.server_run``); 0: the next round is planned here."""


@dataclass(frozen=True)
class Applied:
    """What one verdict did to the session."""

    tokens: tuple[int, ...]
    """Tokens committed by this verdict, after the EOS and length cut."""
    finish: str | None
    """``"stop"`` (EOS), ``"length"`` (max_new reached) or None (the session goes on)."""
    wasted_ms: float


@dataclass
class SpecSession:
    """One session's speculation state (the drafter persists it with the session record)."""

    prompt_len: int
    max_new: int
    eos: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)
    round: int = 0
    stats: SessionSpecStats = field(default_factory=SessionSpecStats)
    draft_ms: float = 0.0
    """Drafting time of all rounds so far (ms)."""
    wasted_ms: float = 0.0
    """Drafting time thrown away so far (ms)."""
    last_draft_ms: float = 0.0
    """Drafting time of the round in flight (ms)."""
    first_token_ts: float | None = None
    last_token_ts: float | None = None

    @property
    def context_len(self) -> int:
        return self.prompt_len + len(self.generated)

    @property
    def budget(self) -> int:
        """Tokens the next round may draft: the verifier adds one of its own."""
        return max(0, self.max_new - len(self.generated) - 1)

    @property
    def finish(self) -> str | None:
        """Why the session is over, read off what it generated (so a session rebuilt from its
        saved record knows it too): ``"stop"`` when its last token is an EOS, ``"length"`` when
        it reached ``max_new``, else None."""
        if self.generated and self.generated[-1] in self.eos:
            return "stop"
        if len(self.generated) >= self.max_new:
            return "length"
        return None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def plan(self, policy: DraftLengthPolicy, *, can_draft: bool = True,
             server_run: int = 0, round_trip_ms: float | None = None) -> RoundPlan:
        """The next round, as ``policy`` decides it from this session's statistics (which now
        carry the context length, the measured draft speed and ``round_trip_ms``: the caller's
        measured time per round outside drafting and verifying, ``LinkEstimate.rtt_ms``, None
        while unmeasured). ``can_draft`` is False where nothing can draft (centralized serving):
        the round is sent undrafted.

        ``server_run``: how many more rounds an undrafted round (that is not the prefill round,
        after which the device drafts) hands to the server, capped by the budget: the server
        decodes them in its continuous batch without a round trip each. 0: none (every round
        comes back here)."""
        self.stats.context_len = self.context_len
        self.stats.round_trip_ms = measured(round_trip_ms)
        p = policy.plan(self.stats, self.budget)
        k = p.max_k if can_draft else 0
        prefill = can_draft and p.prefill and self.round == 0 and self.budget > 0
        run = min(server_run, self.budget) if k == 0 and not prefill else 0
        return RoundPlan(self.round, k, p.stop if k else None, prefill=prefill,
                         context_len=self.context_len, server_rounds=max(0, run))

    def drafted(self, ms: float, passes: int) -> None:
        """Record the round's drafting: ``ms`` spent on ``passes`` draft forwards. The first
        round's time holds the prompt's prefill, so it does not teach the per-pass speed."""
        self.last_draft_ms = ms
        self.draft_ms += ms
        if passes > 0 and ms > 0 and self.round > 0:
            per = ms / passes
            old = self.stats.draft_ms_per_token
            self.stats.draft_ms_per_token = per if old is None else (
                (1 - DRAFT_MS_ALPHA) * old + DRAFT_MS_ALPHA * per)

    def apply(self, tokens: Sequence[int], drafted: int, accepted: int, now: float) -> Applied:
        """Apply the verdict of the round in flight: commit ``tokens`` up to the first EOS or
        the length limit, update the statistics and the waste, advance the round."""
        kept: list[int] = []
        for t in tokens:
            kept.append(t)
            if t in self.eos or len(self.generated) + len(kept) >= self.max_new:
                break
        wasted = wasted_draft_ms(drafted, accepted, self.last_draft_ms)
        self.stats.record(drafted, accepted)
        self.wasted_ms += wasted
        self.generated.extend(kept)
        self.round += 1
        if self.first_token_ts is None and kept:
            self.first_token_ts = now
        if kept:
            self.last_token_ts = now
        return Applied(tuple(kept), self.finish, wasted)

    def copy(self) -> SpecSession:
        """An independent copy: the drafter applies a verdict to a copy, makes it durable, then
        keeps it. Only the two lists are mutable (``eos`` is frozen and shared); a
        ``copy.deepcopy`` of the whole session took 71 us against 9 us (a 60-token session,
        loaded machine)."""
        stats = replace(self.stats, per_position_accepted=list(self.stats.per_position_accepted))
        return replace(self, generated=list(self.generated), stats=stats)
