"""The interval arithmetic of `wisp-cli sim sweep` on hand-made numbers (no simulation):
per-point t-intervals over seeds, the interpolated capacity crossing and its interval."""

from __future__ import annotations

import math

import pytest
from wisp.sim.report import capacity_text
from wisp.sim.stats import capacity_interval, first_crossing, mean_ci, ratio_range, t975


def test_t_quantiles_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30, 31, 60, 200):
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=2e-3)
    with pytest.raises(ValueError):
        t975(0)


def test_mean_ci_is_the_student_t_interval() -> None:
    m, lo, hi = mean_ci([0.8, 0.9, 1.0])
    h = 4.303 * 0.1 / math.sqrt(3)  # sd 0.1, t(0.975, 2) = 4.303
    assert (m, lo, hi) == pytest.approx((0.9, 0.9 - h, 0.9 + h))
    assert mean_ci([0.8, 0.9, 1.0], (0.0, 1.0))[2] == 1.0  # clipped to what the quantity can be
    assert mean_ci([0.7]) == (0.7, 0.7, 0.7)  # one seed: no spread to estimate
    assert mean_ci([0.5, None, math.nan, 0.5]) == (0.5, 0.5, 0.5)  # a point without requests is skipped
    assert all(math.isnan(x) for x in mean_ci([]))


def test_crossing_between_two_points_is_interpolated() -> None:
    c = first_crossing([10, 20, 30], [0.95, 0.93, 0.85], 0.9)
    assert c.status == "crossed" and c.value == pytest.approx(20 + 10 * 0.03 / 0.08)
    # a lucky point past the knee does not count (as wisp.metrics.capacity)
    c = first_crossing([10, 20, 30, 40], [0.95, 0.5, 0.95, 0.1], 0.9)
    assert c.value == pytest.approx(10 + 10 * 0.05 / 0.45)
    # exactly at the target is still attained
    assert first_crossing([10, 20], [0.9, 0.8], 0.9).value == pytest.approx(10.0)


def test_a_curve_that_never_crosses_is_censored() -> None:
    above = first_crossing([10, 20, 40], [1.0, 0.97, 0.91], 0.9)
    assert above.value is None and above.status == "above"
    below = first_crossing([10, 20], [0.85, 0.5], 0.9)
    assert below.value is None and below.status == "below"
    cap = capacity_interval([10, 20, 40], [[1.0] * 5, [0.97] * 5, [0.91] * 5], 0.9)
    assert cap["mean"] is None and cap["censored"] == "above" and cap["swept"] == [10, 40]
    assert capacity_text(cap) == ">= 40 [>= 40, >= 40]"
    cap = capacity_interval([10, 20], [[0.8, 0.85], [0.5, 0.6]], 0.9)
    assert cap["censored"] == "below" and capacity_text(cap).startswith("< 10")
    empty = capacity_interval([2], [[float("nan")]], 0.9)  # no request finished
    assert empty["status"]["mean"] == "empty" and empty["censored"] is None
    assert capacity_text(empty).startswith("n/a")


def test_seeds_that_disagree_widen_the_capacity_interval() -> None:
    xs = [10, 20, 30]
    agree = capacity_interval(xs, [[0.95] * 5, [0.92] * 5, [0.80] * 5], 0.9)
    mean_cross = 20 + 10 * 0.02 / 0.12
    assert agree["mean"] == pytest.approx(mean_cross)
    assert agree["lo"] == pytest.approx(mean_cross) and agree["hi"] == pytest.approx(mean_cross)

    spread = [1.0, 0.84, 1.0, 0.84, 0.92]  # mean 0.92, sd 0.08
    cap = capacity_interval(xs, [[0.95] * 5, spread, [0.80] * 5], 0.9)
    h = 2.776 * 0.08 / math.sqrt(5)  # t(0.975, 4) = 2.776
    lo20, hi20 = 0.92 - h, min(1.0, 0.92 + h)  # an attainment band is clipped to [0, 1]
    assert cap["mean"] == pytest.approx(mean_cross)  # the mean curve is the same
    # lower edge: 0.95 -> 0.92 - h crosses 0.9 between 10 and 20
    assert cap["lo"] == pytest.approx(10 + 10 * (0.95 - 0.9) / (0.95 - lo20), rel=1e-3)
    # upper edge: 0.92 + h -> 0.80 crosses between 20 and 30
    assert cap["hi"] == pytest.approx(20 + 10 * (hi20 - 0.9) / (hi20 - 0.80), rel=1e-3)
    assert cap["lo"] < cap["mean"] < cap["hi"] and cap["seeds"] == 5 and cap["censored"] is None
    assert capacity_text(cap, "{:.1f}") == f"{cap['mean']:.1f} [{cap['lo']:.1f}, {cap['hi']:.1f}]"

    # the upper edge may stay above the target through the sweep: hi is censored
    cap = capacity_interval([10, 20], [[0.95] * 5, [1.0, 0.7, 1.0, 0.7, 0.9]], 0.9)
    assert cap["mean"] is not None and cap["hi"] is None and cap["censored"] == "above"
    assert cap["status"]["hi"] == "above"


def test_ratio_range_takes_opposite_ends() -> None:
    w = {"mean": 80.0, "lo": 75.0, "hi": 90.0}
    c = {"mean": 85.0, "lo": 80.0, "hi": 100.0}
    assert ratio_range(w, c) == pytest.approx([0.75, 90.0 / 80.0])
    assert ratio_range(w, {"mean": None, "lo": 80.0, "hi": None}) == [None, pytest.approx(90 / 80)]
