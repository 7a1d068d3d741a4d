"""A verify-time model of an engine that pads every row to the longest, shared by the batch
policies' unit tests."""

from __future__ import annotations

from wisp.policy.estimator import BatchShape, LinearEstimator


def padded_cost() -> LinearEstimator:
    """A verify time that pads every row to the longest: 200 ms + 10 ms per padded token."""
    est = LinearEstimator()
    shapes = [BatchShape.of([n] * b, [c] * b) for n in (1, 5, 50, 150) for b in (1, 2, 4)
              for c in (0, 100)]
    for sh in shapes:
        est.observe(sh, 200.0 + 10.0 * sh.rounds * max(sh.new_tokens))
    est.refit()
    return est
