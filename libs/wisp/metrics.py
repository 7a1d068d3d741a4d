"""Serving metrics, defined once and used by the CLI, the benchmark and the simulator.

- TTFT: submit → first committed token reaches the client.
- TPOT: mean time between committed tokens after the first: (t_last - t_first) / (n - 1).
- SLO attained: TTFT <= its SLO and TPOT <= its SLO (a one-token answer has TPOT 0).
- Goodput: tokens/s (and requests/s) of requests that attained their SLO, over the run's duration.
- Capacity: the largest load (devices) at which SLO attainment stays >= 90%.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

ATTAINMENT_TARGET = 0.9


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request measured; all times in milliseconds."""

    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    tokens: int
    ttft_slo_ms: float
    tpot_slo_ms: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    wasted_draft_ms: float = 0.0
    ok: bool = True
    """False for a request that failed (error event, timeout)."""

    @property
    def attained(self) -> bool:
        return self.ok and self.ttft_ms <= self.ttft_slo_ms and self.tpot_ms <= self.tpot_slo_ms


def wasted_tokens(drafted: int, accepted: int) -> int:
    """Drafted tokens thrown away in a round: all that the target did not accept (the first
    rejected one included, as in the fixed-k frontier measured on the packaged pair)."""
    return max(0, drafted - accepted)


def tpot_ms(token_times_ms: Sequence[float]) -> float:
    """Mean gap between committed tokens after the first (0 for fewer than two tokens)."""
    if len(token_times_ms) < 2:
        return 0.0
    return (token_times_ms[-1] - token_times_ms[0]) / (len(token_times_ms) - 1)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass(frozen=True)
class Summary:
    requests: int
    failed: int
    slo_attainment: float
    goodput_tokens_per_s: float
    goodput_requests_per_s: float
    throughput_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    tpot_p99_ms: float
    acceptance_rate: float
    mean_accepted_per_round: float
    wasted_draft_ms_per_request: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(records: Iterable[RequestRecord], duration_s: float) -> Summary:
    recs = list(records)
    ok = [r for r in recs if r.ok]
    good = [r for r in recs if r.attained]
    dur = max(duration_s, 1e-9)
    ttft = [r.ttft_ms for r in ok]
    tpot = [r.tpot_ms for r in ok]
    drafted = sum(r.drafted for r in ok)
    accepted = sum(r.accepted for r in ok)
    rounds = sum(r.rounds for r in ok)
    return Summary(
        requests=len(recs),
        failed=len(recs) - len(ok),
        slo_attainment=len(good) / len(recs) if recs else float("nan"),
        goodput_tokens_per_s=sum(r.tokens for r in good) / dur,
        goodput_requests_per_s=len(good) / dur,
        throughput_tokens_per_s=sum(r.tokens for r in ok) / dur,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p90_ms=percentile(ttft, 90),
        ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50),
        tpot_p90_ms=percentile(tpot, 90),
        tpot_p99_ms=percentile(tpot, 99),
        acceptance_rate=accepted / drafted if drafted else float("nan"),
        mean_accepted_per_round=accepted / rounds if rounds else float("nan"),
        wasted_draft_ms_per_request=(
            sum(r.wasted_draft_ms for r in ok) / len(ok) if ok else float("nan")
        ),
    )


def capacity(attainment_by_load: dict[int, float], target: float = ATTAINMENT_TARGET) -> int:
    """Largest load whose attainment is >= target, with every smaller swept load also meeting
    it (a lucky point past the knee does not count). 0 when even the smallest load misses."""
    best = 0
    for load in sorted(attainment_by_load):
        if attainment_by_load[load] >= target:
            best = load
        else:
            break
    return best
