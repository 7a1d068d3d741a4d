"""``SiteChooser``: drafting where it pays, server-side decoding where it does not."""

from __future__ import annotations

import math

import pytest
from wisp.policy.site import LinkEstimate, ServerCosts, SiteChooser, expected_commit_geometric

MEMORY_BOUND = ServerCosts(step_ms=40.0, row_ms=0.2, token_ms=0.05)
"""A big model on a GPU: a forward costs its weight reads, a fed token almost nothing."""
COMPUTE_BOUND = ServerCosts(step_ms=120.0, row_ms=0.5, token_ms=0.8, compute_bound=True)


def link(acceptance: float, rtt_ms: float) -> LinkEstimate:
    est = LinkEstimate()
    for _ in range(30):
        n = 10
        acc = round(acceptance * n)
        est.accepted, est.judged = acc, n  # steady state of the EMA
        est.observe_round(0, 0, rtt_ms)
    return est


def test_expected_commit_geometric() -> None:
    assert expected_commit_geometric(0.0, 4) == 1.0
    assert expected_commit_geometric(1.0, 4) == 5.0
    assert math.isclose(expected_commit_geometric(0.5, 2), 1 + 0.5 + 0.25)
    assert expected_commit_geometric(0.9, 0) == 1.0


def test_fast_device_good_pair_memory_bound_server_drafts() -> None:
    c = SiteChooser().choose(draft_ms=3.0, link=link(0.85, 30.0), server=MEMORY_BOUND, tpot_slo_ms=150.0)
    assert not c.server_decode and c.k >= 4
    assert c.latency_ms_per_token < MEMORY_BOUND.step_ms


def test_slow_device_decodes_on_the_server() -> None:
    # a Pi drafting at 45 ms/token over cellular: a round trip plus drafts is slower than decoding
    c = SiteChooser().choose(draft_ms=45.0, link=link(0.5, 120.0), server=MEMORY_BOUND, tpot_slo_ms=150.0)
    assert c.server_decode and c.k == 0


def test_compute_bound_server_minimises_its_own_time_per_token() -> None:
    chooser = SiteChooser()
    low = chooser.choose(draft_ms=5.0, link=link(0.3, 30.0), server=COMPUTE_BOUND, tpot_slo_ms=1000.0)
    assert low.server_decode  # rejected drafts are compute the server could have decoded with
    good = link(0.9, 30.0)
    high = chooser.choose(draft_ms=5.0, link=good, server=COMPUTE_BOUND, tpot_slo_ms=1000.0)
    assert not high.server_decode
    opts = chooser.options(5.0, 30.0, good.acceptance_with_prior(chooser.default_acceptance), COMPUTE_BOUND)
    assert high.server_ms_per_token == min(o.server_ms_per_token for o in opts)


def test_an_slo_only_drafting_meets_is_met_even_when_decoding_is_cheaper_for_the_server() -> None:
    server = ServerCosts(step_ms=200.0, row_ms=0.5, token_ms=0.8, compute_bound=True)
    c = SiteChooser().choose(draft_ms=2.0, link=link(0.8, 20.0), server=server, tpot_slo_ms=150.0)
    assert not c.server_decode and c.latency_ms_per_token <= 150.0


def test_hysteresis_keeps_a_session_where_it_is_on_a_near_tie() -> None:
    lk = link(0.6, 60.0)
    args = {"draft_ms": 12.0, "link": lk, "server": MEMORY_BOUND, "tpot_slo_ms": 500.0}
    opts = SiteChooser().options(12.0, 60.0, lk.acceptance_with_prior(0.7), MEMORY_BOUND)
    srv, best_draft = opts[0], min(opts[1:], key=lambda o: o.latency_ms_per_token)
    gap = abs(srv.latency_ms_per_token / best_draft.latency_ms_per_token - 1.0)
    assert gap < 0.5  # a near tie
    free = SiteChooser(hysteresis=0.0).choose(**args)
    for was_server in (True, False):  # without hysteresis the site does not depend on the past
        assert SiteChooser(hysteresis=0.0).choose(**args, currently_server=was_server).server_decode \
            == free.server_decode
    sticky = SiteChooser(hysteresis=0.9)
    assert sticky.choose(**args, currently_server=True).server_decode
    assert not sticky.choose(**args, currently_server=False).server_decode


def test_no_measurements_yet_means_speculate() -> None:
    c = SiteChooser(max_k=6).choose(draft_ms=None, link=LinkEstimate(), server=MEMORY_BOUND,
                                    tpot_slo_ms=150.0)
    assert not c.server_decode and c.k == 6


@pytest.mark.parametrize(("drafted", "accepted", "judged"), [(4, 4, 4), (4, 2, 3), (4, 0, 1), (0, 0, 0)])
def test_link_estimate_counts_judged_drafts(drafted: int, accepted: int, judged: int) -> None:
    est = LinkEstimate()
    est.observe_round(drafted, accepted, None)
    assert est.rtt_ms is None
    if judged:
        assert est.acceptance == pytest.approx(accepted / judged)
    else:
        assert est.acceptance is None


def test_one_early_rejection_does_not_exile_a_session_and_the_server_probes_it_again() -> None:
    est = LinkEstimate()
    est.observe_round(4, 0, 30.0)  # its first drafted round: rejected at once
    assert est.acceptance == 0.0 and est.acceptance_with_prior(0.7) > 0.4
    chooser = SiteChooser(probe_every=16)
    args = {"draft_ms": 3.0, "link": est, "server": MEMORY_BOUND, "tpot_slo_ms": 150.0,
            "currently_server": True}
    assert not chooser.choose(**args, tokens_on_server=16).server_decode  # a probe round
    assert "probe" in chooser.choose(**args, tokens_on_server=40).reason


def test_cost_tracker_tells_a_busy_compute_bound_server_from_a_busy_memory_bound_one() -> None:
    from wisp.policy.site import CostTracker

    def memory_bound(new, ctx) -> float:  # a forward costs its weight reads; tokens ride free
        return 40.0 + 0.01 * sum(new)

    def compute_bound(new, ctx) -> float:
        return 5.0 + 0.5 * sum(new)

    for predict, want in ((memory_bound, False), (compute_bound, True)):
        t = CostTracker()
        assert t.costs(0.0, predict) is None  # nothing observed yet
        new, ctx = [5] * 40, [300] * 40
        for _ in range(10):  # back-to-back forwards over one second: busy
            t.observe(new, ctx, predict(new, ctx) * (1000.0 / 10) / predict(new, ctx))
        c = t.costs(1.0, predict)
        assert c is not None and c.compute_bound is want
        assert c.step_ms == pytest.approx(100.0)
        idle = t.costs(2.0, predict)  # a second with no forward: not busy
        assert idle is not None and not idle.compute_bound


def test_published_costs_travel_on_wisp_load_and_are_left_out_while_unknown() -> None:
    import json

    from wisp.protocol.base import decode
    from wisp.protocol.load import LoadSnapshot, ServerCostsWire

    bare = json.loads(LoadSnapshot(ts=1.0, scheduler="s", verifiers=[]).encode())
    assert "costs" not in bare  # a drafter of the previous version forbids unknown fields
    costs = ServerCosts(step_ms=40.0, row_ms=0.2, token_ms=0.05, compute_bound=True)
    raw = LoadSnapshot(ts=1.0, scheduler="s", verifiers=[], costs=ServerCostsWire(**vars(costs))).encode()
    got = decode(LoadSnapshot, raw).costs
    assert got is not None and ServerCosts(**got.model_dump(exclude={"version", "kind"})) == costs
