"""Edge devices and their network links, drawn once per simulation from the scenario.

Each device gets a class by the scenario's mix (exact proportions, largest remainder, shuffled
with the seed), a per-token draft time around its class's median (log-normal spread between
devices), and a link: base round-trip time (log-normal spread around the class median), a
per-message one-way jitter (exponential) and up/down bandwidths.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from wisp.sim.scenario import Scenario


@dataclass(slots=True)
class DeviceSpec:
    index: int
    cls: str
    draft_ms: float
    """Median ms per draft forward pass on this device."""
    prefill_ms_per_token: float
    round_jitter_cv: float
    network: str
    rtt_ms: float
    jitter_ms: float
    up_bytes_per_ms: float
    down_bytes_per_ms: float


def allocate(mix: dict[str, float], n: int) -> list[str]:
    """Exactly ``n`` class names in proportion to ``mix`` (largest remainder, ties by name)."""
    total = sum(mix.values())
    names = sorted(k for k, v in mix.items() if v > 0)
    quotas = {k: mix[k] / total * n for k in names}
    counts = {k: int(math.floor(q)) for k, q in quotas.items()}
    left = n - sum(counts.values())
    for k in sorted(names, key=lambda k: (-(quotas[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return [k for k in names for _ in range(counts[k])]


def make_devices(sc: Scenario, n: int, seed: int) -> list[DeviceSpec]:
    rng = random.Random(f"{seed}:devices")
    classes = allocate(sc.devices.mix, n)
    rng.shuffle(classes)
    out = []
    for i, cname in enumerate(classes):
        c = sc.devices.classes[cname]
        net = sc.network.classes[c.network]
        speed = rng.lognormvariate(0.0, c.device_cv) if c.device_cv > 0 else 1.0
        rtt = net.rtt_ms * (rng.lognormvariate(0.0, net.rtt_cv) if net.rtt_cv > 0 else 1.0)
        out.append(DeviceSpec(
            index=i, cls=cname,
            draft_ms=1000.0 / c.draft_tokens_per_s * speed,
            prefill_ms_per_token=1000.0 / c.prefill_tokens_per_s * speed,
            round_jitter_cv=c.round_jitter_cv,
            network=c.network,
            rtt_ms=rtt,
            jitter_ms=net.jitter_ms,
            up_bytes_per_ms=net.uplink_mbps * 1e6 / 8.0 / 1000.0,
            down_bytes_per_ms=net.downlink_mbps * 1e6 / 8.0 / 1000.0,
        ))
    return out
