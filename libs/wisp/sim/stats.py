"""Intervals over seeds: per-point t-intervals and the capacity crossing with its interval.

Pure functions (no simulation), so the arithmetic a comparison rests on is tested on hand-made
numbers (``tests/unit/test_sim_stats.py``).

**Per point.** Each (mode, device count) is run with S seeds; the point's value is the mean over
seeds and its 95% interval the Student t-interval ``mean +- t(0.975, S-1) * sd / sqrt(S)``. The
t-interval, not a bootstrap, because S is small (5 by default): a percentile bootstrap over 5
seeds has only 126 distinct resamples and is known to be too narrow at that size, while the
t-interval widens with the small sample as it should.

**Capacity** is where the *mean* attainment curve first drops below the target (90%), linearly
interpolated between the swept counts. Its 95% interval is the inversion of the pointwise test:
the set of device counts ``x`` at which the t-interval of attainment contains the target, i.e.
where "attainment(x) = 90%" is not rejected at 5%. If attainment falls with load, that set runs
from where the band's *lower* edge first drops below the target (``lo``) to where its *upper*
edge does (``hi``); at the true capacity the hypothesis is true, so the set covers it with the
t-test's 95%. It is what the plots show: the capacity interval is where the shaded band meets
the 90% line. A t-interval of per-seed crossings was not used because a seed whose curve never
crosses in the sweep (or crosses below its first count) has no crossing to average, and the
mean of per-seed crossings is not the crossing of the mean curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)
"""Student t 0.975 quantiles for 1..30 degrees of freedom (scipy is not a dependency)."""

INTERVAL_METHOD = ("95% Student t-interval over seeds per point; capacity = first interpolated "
                   "crossing of the mean attainment curve with the target, its interval = where "
                   "the per-point t-band crosses the target (test inversion)")


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1); past 30 the
    Cornish-Fisher expansion to second order (error < 1e-4 there)."""
    if df < 1:
        raise ValueError("a t-interval needs at least two values")
    return T975[df - 1] if df <= len(T975) else 1.959964 + 2.3724 / df + 2.8226 / (df * df)


def finite(values: Sequence[Any]) -> list[float]:
    """The finite numbers of ``values`` (a point with no request has a NaN attainment)."""
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def mean_ci(values: Sequence[Any],
            bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the finite values and its 95% t-interval, clipped to
    ``bounds`` when the quantity has them (an attainment is in [0, 1], so is its mean). One value
    has no spread to estimate: lo = hi = mean (the summary says how many seeds a point had).
    No value: three NaNs."""
    v = finite(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = sum(v) / n
    if n == 1:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    h = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = m - h, m + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return m, lo, hi


Status = Literal["crossed", "above", "below", "empty"]


@dataclass(frozen=True)
class Crossing:
    """Where a curve first drops below a target.

    ``crossed``: ``value`` is the interpolated device count; ``above``: the curve never drops
    below the target in the sweep (capacity is at least the largest swept count, censored);
    ``below``: it is already below at the smallest swept count (capacity is under the sweep);
    ``empty``: no point has a value (no request finished in the window)."""

    value: float | None
    status: Status


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> Crossing:
    """First downward crossing of ``target`` by the piecewise-linear curve through (xs, ys):
    the largest x such that the curve is >= target on [xs[0], x] (so a lucky point past the
    knee does not count, as in ``wisp.metrics.capacity``). NaN points are skipped."""
    pts = sorted((float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(float(y)))
    if not pts:
        return Crossing(None, "empty")
    if pts[0][1] < target:
        return Crossing(None, "below")
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if y1 < target:  # y0 >= target > y1
            return Crossing(x0 + (y0 - target) / (y0 - y1) * (x1 - x0), "crossed")
    return Crossing(None, "above")


def capacity_interval(xs: Sequence[float], per_seed: Sequence[Sequence[Any]],
                      target: float) -> dict[str, Any]:
    """Capacity {mean, lo, hi} from the per-seed attainments at each swept count.

    ``per_seed[i]`` holds the seeds' attainments at ``xs[i]``. ``mean`` is the first crossing
    of the mean curve, ``lo`` that of the band's lower edge, ``hi`` that of its upper edge (see
    the module docstring). A bound is None where its curve does not cross inside the sweep;
    ``censored`` says which way: ``above`` (the sweep ended before the mean curve, or the upper
    edge, fell below the target: capacity may be larger) or ``below`` (the mean is under the
    target at the first count)."""
    if len(xs) != len(per_seed):
        raise ValueError("one list of per-seed values per swept count")
    stats = [mean_ci(v, (0.0, 1.0)) for v in per_seed]
    m = first_crossing(xs, [s[0] for s in stats], target)
    lo = first_crossing(xs, [s[1] for s in stats], target)
    hi = first_crossing(xs, [s[2] for s in stats], target)
    censored: str | None = None
    if m.status == "below":
        censored = "below"
    elif m.status == "above" or hi.status == "above":
        censored = "above"
    seeds = [len(finite(v)) for v in per_seed]
    return {
        "mean": m.value,
        "lo": lo.value,
        "hi": hi.value,
        "status": {"mean": m.status, "lo": lo.status, "hi": hi.status},
        "censored": censored,
        "swept": [min(xs), max(xs)] if len(xs) else None,
        "seeds": min(seeds) if seeds else 0,
    }


def ratio_range(num: dict[str, Any], den: dict[str, Any]) -> list[float | None]:
    """A conservative range of num/den from two capacity intervals: [num.lo / den.hi,
    num.hi / den.lo] (each end None when a bound is missing). Wider than a 95% interval of the
    ratio, since both ends are taken at once; it says whether the ratio is clearly off 1."""
    def div(a: Any, b: Any) -> float | None:
        if a is None or b is None or b <= 0:
            return None
        return float(a) / float(b)

    return [div(num.get("lo"), den.get("hi")), div(num.get("hi"), den.get("lo"))]
