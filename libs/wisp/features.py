"""The speculation controller's per-token features, as plain data.

Kept apart from ``wisp.specdec`` (which computes them from logits with torch) so that the
controller, the simulator and the command line that runs them import no torch: ``wisp-cli sim``
and ``wisp-cli controller show`` cost about 4 s of CPU less per invocation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenFeatures"]


@dataclass(frozen=True)
class TokenFeatures:
    """Cheap statistics of the draft's next-token distribution at temperature 1.

    They are what the speculation controller reads to predict a rejection; they are computed at
    T=1 (not the sampling temperature) so the controller sees the model's own confidence, which
    does not change with the request's sampling settings.
    """

    top1_prob: float
    entropy: float  # nats
    margin: float  # top1_prob - top2_prob
    logit_spread: float  # max logit - mean logit

    def as_tuple(self) -> tuple[float, float, float, float]:
        """Field values in declaration order (a stable feature-vector layout)."""
        return (self.top1_prob, self.entropy, self.margin, self.logit_spread)
