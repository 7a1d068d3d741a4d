"""Verifier health from measured batch times: a pure object, time passed in.

Each timing sample gives measured / predicted time for one verifier; an EMA of that ratio is
the verifier's slowness. Relative to the fastest live verifier, a verifier slower than
``degraded_ratio`` is *degraded*: the scheduler stops sending it work (its sessions move to the
others) for ``cooldown_s``, then takes it back on probation with its history reset, so a
verifier that recovered is used again."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VerifierHealth:
    degraded_ratio: float = 3.0
    cooldown_s: float = 30.0
    alpha: float = 0.3
    min_samples: int = 3
    slowness: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    benched_until: dict[str, float] = field(default_factory=dict)

    def observe(self, verifier: str, predicted_ms: float, measured_ms: float) -> None:
        if predicted_ms <= 0 or measured_ms <= 0:
            return
        ratio = measured_ms / predicted_ms
        prev = self.slowness.get(verifier)
        self.slowness[verifier] = ratio if prev is None else (1 - self.alpha) * prev + self.alpha * ratio
        self.samples[verifier] = self.samples.get(verifier, 0) + 1

    def speeds(self, live: list[str]) -> dict[str, float]:
        """Relative speed per live verifier (1.0 = the fastest; 0.25 = four times slower)."""
        known = {v: self.slowness[v] for v in live
                 if v in self.slowness and self.samples.get(v, 0) >= self.min_samples}
        if not known:
            return {v: 1.0 for v in live}
        best = min(known.values())
        return {v: (best / known[v]) if v in known else 1.0 for v in live}

    def usable(self, live: list[str], now: float) -> list[str]:
        """The live verifiers to send work to: degraded ones are benched for ``cooldown_s``
        (never all of them: with no healthy verifier the least slow one is kept)."""
        for v, until in list(self.benched_until.items()):
            if now >= until:  # probation: forget the history, measure afresh
                del self.benched_until[v]
                self.slowness.pop(v, None)
                self.samples.pop(v, None)
        speeds = self.speeds(live)
        for v, s in speeds.items():
            if s < 1.0 / self.degraded_ratio and v not in self.benched_until:
                self.benched_until[v] = now + self.cooldown_s
        ok = [v for v in live if v not in self.benched_until]
        if not ok and live:
            ok = [max(live, key=lambda v: speeds.get(v, 1.0))]
        return ok
