"""``SpecSession``: the one speculation-session state machine the drafter, the simulator and the
trainers share. Each rule is pinned here once."""

from __future__ import annotations

import pytest
from wisp.policy.controller import DraftPlan, FixedLength, SessionSpecStats
from wisp.policy.session import (
    DRAFT_MS_ALPHA,
    REPLAY_EOS,
    REPLAY_TOKEN,
    SpecSession,
    expected_commit,
    replay_tokens,
    wasted_draft_ms,
)


class _Records:
    """A policy that records what it was told and drafts ``k``."""

    name = "records"

    def __init__(self, k: int, prefill: bool = False) -> None:
        self.k, self.prefill = k, prefill
        self.seen: list[tuple[int, int, float | None, int]] = []

    def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan:
        self.seen.append((stats.context_len, budget, stats.draft_ms_per_token, stats.rounds))
        if self.prefill and stats.rounds == 0:
            return DraftPlan(max_k=0, prefill=True)
        return DraftPlan(max_k=min(self.k, budget))


def test_plan_gives_the_policy_the_context_budget_and_measured_speed() -> None:
    s = SpecSession(prompt_len=10, max_new=8)
    pol = _Records(4)
    p = s.plan(pol)
    assert (p.round, p.max_k, p.context_len, p.prefill) == (0, 4, 10, False)
    assert pol.seen[-1] == (10, 7, None, 0)  # the verifier adds one token: budget max_new - 1
    s.drafted(ms=500.0, passes=5)  # round 0 holds the prompt prefill: not a speed sample
    s.apply([1, 2, 3], drafted=4, accepted=2, now=1.0)
    s.plan(pol)
    assert pol.seen[-1] == (13, 4, None, 1)
    s.drafted(ms=40.0, passes=4)
    assert s.stats.draft_ms_per_token == pytest.approx(10.0)
    s.apply([4], drafted=4, accepted=0, now=2.0)
    s.drafted(ms=60.0, passes=3)  # 20 ms per pass: the EMA moves by DRAFT_MS_ALPHA
    assert s.stats.draft_ms_per_token == pytest.approx(10.0 + DRAFT_MS_ALPHA * 10.0)


def test_plan_gives_the_policy_the_caller_s_measured_round_trip() -> None:
    """The round trip is the caller's measurement (``LinkEstimate.rtt_ms``), handed over at each
    plan; what cannot be a measurement (not finite, negative) reaches the policy as None."""
    s = SpecSession(prompt_len=10, max_new=8)
    seen: list[float | None] = []

    class Sees:
        name = "sees"

        def plan(self, stats: SessionSpecStats, budget: int) -> DraftPlan:
            seen.append(stats.round_trip_ms)
            return DraftPlan(max_k=1)

    for trip in (None, 120.0, float("nan"), float("inf"), -1.0, 0.0):
        s.plan(Sees(), round_trip_ms=trip)
    assert seen == [None, 120.0, None, None, None, 0.0]


def test_budget_never_drafts_past_max_new() -> None:
    s = SpecSession(prompt_len=3, max_new=3)
    assert s.plan(FixedLength(8)).max_k == 2
    s.apply([7, 7], drafted=2, accepted=1, now=0.5)
    assert s.budget == 0 and s.plan(FixedLength(8)).max_k == 0 and not s.done


def test_prefill_round_is_the_policy_s_word_and_needs_a_drafter() -> None:
    pol = _Records(4, prefill=True)
    assert SpecSession(5, 16).plan(pol).prefill
    assert not SpecSession(5, 16).plan(pol, can_draft=False).prefill  # centralized: nothing drafts
    assert not SpecSession(5, 1).plan(pol).prefill  # one token: the server's prefill is all of it
    centralized = SpecSession(5, 16).plan(FixedLength(4), can_draft=False)
    assert centralized.max_k == 0 and centralized.stop is None


def test_apply_cuts_at_eos_and_at_the_length_limit() -> None:
    s = SpecSession(prompt_len=2, max_new=10, eos=frozenset({99}))
    a = s.apply([5, 99, 6], drafted=2, accepted=2, now=3.0)
    assert a.tokens == (5, 99) and a.finish == "stop" and s.done and s.generated == [5, 99]
    s = SpecSession(prompt_len=2, max_new=3)
    assert s.apply([1, 2], drafted=1, accepted=1, now=1.0).finish is None
    a = s.apply([3, 4, 5], drafted=2, accepted=2, now=2.0)
    assert a.tokens == (3,) and a.finish == "length" and s.generated == [1, 2, 3]
    assert (s.first_token_ts, s.last_token_ts, s.round) == (1.0, 2.0, 2)


def test_waste_is_every_drafted_token_the_target_did_not_accept() -> None:
    """One definition for the drafter, the simulator and the reports: ``drafted - accepted``
    tokens' share of the round's drafting time (the first rejected token included)."""
    assert wasted_draft_ms(4, 1, 100.0) == pytest.approx(75.0)
    assert wasted_draft_ms(4, 4, 100.0) == 0.0 and wasted_draft_ms(0, 0, 100.0) == 0.0
    s = SpecSession(prompt_len=4, max_new=64)
    s.drafted(ms=80.0, passes=4)
    assert s.apply([1, 2], drafted=4, accepted=1, now=0.0).wasted_ms == pytest.approx(60.0)
    assert s.wasted_ms == pytest.approx(60.0) and s.draft_ms == pytest.approx(80.0)
    assert (s.stats.drafted, s.stats.accepted, s.stats.rounds) == (4, 1, 1)


def test_replay_tokens_end_a_replayed_output_through_the_eos_rule() -> None:
    assert replay_tokens(3, 10) == [REPLAY_TOKEN] * 3
    assert replay_tokens(3, 2) == [REPLAY_TOKEN, REPLAY_EOS]
    s = SpecSession(prompt_len=1, max_new=100, eos=frozenset({REPLAY_EOS}))
    assert s.apply(replay_tokens(5, 5), drafted=4, accepted=4, now=0.0).finish == "stop"
    assert len(s.generated) == 5


def test_copy_is_deep_so_a_failed_save_leaves_the_session_as_it_was() -> None:
    s = SpecSession(prompt_len=1, max_new=10)
    new = s.copy()
    new.apply([1, 2], drafted=1, accepted=1, now=0.0)
    assert s.generated == [] and s.stats.rounds == 0 and new.stats.rounds == 1


def test_expected_commit_is_one_plus_the_survival_sum() -> None:
    assert expected_commit([]) == 1.0
    assert expected_commit([0.5, 0.5]) == pytest.approx(1.0 + 0.5 + 0.25)
    assert expected_commit([2.0, -1.0]) == pytest.approx(2.0)  # probabilities are clamped
