"""The simulator's acceptance axis: a recorded bank scaled down to a weaker pair's match rate."""

from __future__ import annotations

import pytest
from wisp.sim.scenario import ScenarioError, load_scenario, with_overrides
from wisp.sim.workload import load_acceptance, scale_acceptance


@pytest.fixture(scope="module")
def recorded():
    return load_acceptance(load_scenario("paper").acceptance, 0)


def test_scaled_bank_hits_the_target_rate(recorded) -> None:
    assert recorded.acceptance_rate() > 0.8  # the recorded pair agrees far more than 0.6
    sc = with_overrides(load_scenario("paper"), ["acceptance.target_rate=0.6"])
    bank = load_acceptance(sc.acceptance, 0)
    assert abs(bank.acceptance_rate() - 0.6) < 0.02
    assert bank.describe()["scaled_to"] == 0.6
    assert bank.size == recorded.size and bank.starts == recorded.starts


def test_scaling_only_removes_agreement_and_the_unsure_go_first(recorded) -> None:
    seqs = scale_acceptance(recorded.seqs, 0.6, seed=3)
    kept, dropped = [], []
    for old, new in zip(recorded.seqs, seqs, strict=True):
        assert new.features == old.features
        for f, a, b in zip(old.features, old.match, new.match, strict=True):
            assert not (b and not a), "a recorded mismatch turned into a match"
            if a:
                (kept if b else dropped).append(f.top1_prob)
    assert dropped and kept
    # the recorded features keep predicting the verdicts in the same direction
    assert sum(dropped) / len(dropped) < sum(kept) / len(kept) - 0.05


def test_scaling_is_deterministic_per_seed(recorded) -> None:
    a = [s.match for s in scale_acceptance(recorded.seqs, 0.6, seed=1)]
    b = [s.match for s in scale_acceptance(recorded.seqs, 0.6, seed=1)]
    c = [s.match for s in scale_acceptance(recorded.seqs, 0.6, seed=2)]
    assert a == b and a != c


@pytest.mark.parametrize("rate", [0.95, 1.0, -0.1, 1.5])
def test_a_rate_that_would_invent_agreement_is_refused(recorded, rate: float) -> None:
    with pytest.raises(ScenarioError, match="target_rate"):
        scale_acceptance(recorded.seqs, rate)
