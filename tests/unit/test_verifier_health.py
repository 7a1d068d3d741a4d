from wisp.policy.health import VerifierHealth


def test_a_verifier_three_times_slower_is_benched_then_taken_back() -> None:
    h = VerifierHealth(degraded_ratio=3.0, cooldown_s=10.0)
    for _ in range(5):
        h.observe("fast", 100.0, 105.0)
        h.observe("slow", 100.0, 420.0)
    assert h.speeds(["fast", "slow"])["slow"] < 0.3
    assert h.usable(["fast", "slow"], now=0.0) == ["fast"]
    assert h.usable(["fast", "slow"], now=9.9) == ["fast"]
    assert h.usable(["fast", "slow"], now=10.0) == ["fast", "slow"]  # probation, history reset
    assert h.speeds(["fast", "slow"])["slow"] == 1.0


def test_moderately_slower_is_kept_and_never_all_benched() -> None:
    h = VerifierHealth()
    for _ in range(5):
        h.observe("a", 100.0, 100.0)
        h.observe("b", 100.0, 200.0)
    assert h.usable(["a", "b"], 0.0) == ["a", "b"]
    assert abs(h.speeds(["a", "b"])["b"] - 0.5) < 0.05
    solo = VerifierHealth()
    for _ in range(5):
        solo.observe("only", 100.0, 1000.0)
    assert solo.usable(["only"], 0.0) == ["only"]


def test_too_few_samples_change_nothing() -> None:
    h = VerifierHealth(min_samples=3)
    h.observe("a", 100.0, 100.0)
    h.observe("b", 100.0, 900.0)
    assert h.usable(["a", "b"], 0.0) == ["a", "b"]
