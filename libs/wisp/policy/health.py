"""Verifier health from measured batch times: a pure object, time passed in.

Each timing sample gives measured / predicted time for one verifier; an EMA of that ratio is
the verifier's slowness. Relative to the fastest live verifier, a verifier slower than
``degraded_ratio`` is *degraded*: the scheduler stops sending it work (its sessions move to the
others) for ``cooldown_s``, then takes it back on probation with its history reset, so a
verifier that recovered is used again.

The ratio is only as fair as the shared model: a slow verifier collects bigger batches (rounds
pile up while it works), and a model refitted on everyone's timings can then blame batch *size*
for that verifier's slowness and under-predict the fast one's small batches, making the fast one
look slow (seen on a loaded 2-core CI machine: the fast verifier was benched and the slow one
got all the work). So a verifier is benched only if its raw measured batch time is also above the
fastest one's: a verifier that really is slower is slower on both counts (slow, and bigger
batches), while a model artefact cannot make the quicker one lose on raw time."""

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
    raw_ms: dict[str, float] = field(default_factory=dict)
    """EMA of each verifier's measured batch time (the veto on benching, see the module doc)."""

    def observe(self, verifier: str, predicted_ms: float, measured_ms: float) -> None:
        if predicted_ms <= 0 or measured_ms <= 0:
            return
        ratio = measured_ms / predicted_ms
        prev = self.slowness.get(verifier)
        self.slowness[verifier] = ratio if prev is None else (1 - self.alpha) * prev + self.alpha * ratio
        raw = self.raw_ms.get(verifier)
        a = self.alpha
        self.raw_ms[verifier] = measured_ms if raw is None else (1 - a) * raw + a * measured_ms
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
                self.raw_ms.pop(v, None)
        speeds = self.speeds(live)
        fastest = max(speeds, key=lambda v: (speeds[v], v in self.raw_ms), default=None)
        best_raw = self.raw_ms.get(fastest, 0.0) if fastest is not None else 0.0
        for v, s in speeds.items():
            if (s < 1.0 / self.degraded_ratio and v not in self.benched_until
                    and self.raw_ms.get(v, 0.0) > best_raw):
                self.benched_until[v] = now + self.cooldown_s
        ok = [v for v in live if v not in self.benched_until]
        if not ok and live:
            ok = [max(live, key=lambda v: speeds.get(v, 1.0))]
        return ok
