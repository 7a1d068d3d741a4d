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


def test_a_verifier_that_is_quicker_in_raw_time_is_never_benched() -> None:
    """A model refitted on both verifiers' timings can under-predict the fast one's small batches
    and over-predict the slow one's big ones; the raw measured time vetoes benching the quicker."""
    h = VerifierHealth(degraded_ratio=3.0)
    for _ in range(5):
        h.observe("fast", 5.0, 60.0)      # small batches: predicted 5 ms, took 60 (ratio 12)
        h.observe("slow", 450.0, 470.0)   # big batches: predicted 450 ms, took 470 (ratio ~1)
    assert h.speeds(["fast", "slow"])["fast"] < 0.2  # by the model alone it looks slow...
    assert h.usable(["fast", "slow"], 0.0) == ["fast", "slow"]  # ...but it is not benched
    assert h.benched_until == {}


def test_speed_normalizer_keeps_a_slow_verifier_from_skewing_the_shared_model() -> None:
    from wisp.policy.estimator import BatchShape, LinearEstimator, SpeedNormalizer

    # the fast verifier runs 1-round batches in ~40 ms; the slow one, 8x slower, 3-round batches
    def true_ms(rounds: int) -> float:
        return 30.0 + 10.0 * rounds

    raw, norm = LinearEstimator(), LinearEstimator()
    sn = SpeedNormalizer()
    for i in range(120):
        for v, rounds, factor in (("fast", 1 + i % 2, 1.0), ("slow", 3 + i % 2, 8.0)):
            shape = BatchShape.of([5] * rounds, [100] * rounds)
            ms = true_ms(rounds) * factor
            raw.observe(shape, ms)
            norm.observe(shape, sn.normalize(v, norm.predict(shape), ms))
    three = BatchShape.of([5] * 3, [100] * 3)
    assert raw.predict(three) > 3 * true_ms(3)          # the raw mixture blames batch size
    assert abs(norm.predict(three) - true_ms(3)) < 0.15 * true_ms(3)  # normalized: the fast scale
    assert 6.0 < sn.factors["slow"] / sn.factors["fast"] < 10.0
    # one verifier alone is never rescaled, so its own slow-down is learned
    solo = SpeedNormalizer()
    assert solo.normalize("only", 50.0, 100.0) == 100.0
    # a verifier that stopped reporting is forgotten
    sn2 = SpeedNormalizer(stale_after=3)
    sn2.normalize("gone", 10.0, 5.0)
    for _ in range(4):
        sn2.normalize("left", 10.0, 20.0)
    assert "gone" not in sn2.factors and sn2.normalize("left", 10.0, 20.0) == 20.0
