"""Common random numbers: each device's own random streams, fixed per (seed, device).

The modes are compared on identical workloads only if a device asks the same things in every
mode. With shared streams consumed in event order (as the simulator used to draw), the k-th
request of device 7 got whatever draw was next when it happened to be submitted, so it differed
between wisp, sled and centralized (and between any two runs whose timing differed), adding
noise to every comparison. Here every random quantity a device needs has its own stream seeded
by (seed, device index, stream name), and a stream is read in that device's own order only:

* ``request``: the k-th request's shape (prompt and output length) and acceptance start;
* ``think`` / ``retry``: the k-th think time, the k-th back-off after a refusal;
* ``arrival``: the k-th Poisson inter-arrival gap; ``stagger``: the start offset;
* ``uplink`` / ``downlink``: the jitter of the k-th message each way; ``draft``: the k-th
  drafting round's jitter.

So the k-th request of a device is the same in every mode and at every device count that has
that device (a test checks it); what differs between modes is only what the modes do with it.
Message and drafting jitter are per device too, though the k-th round is a different round in
different modes. The batch-time noise of the server is the one shared stream (a batch has no
device); it is keyed on the seed alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from wisp.sim.workload import RequestShape

STREAMS = ("request", "think", "retry", "arrival", "stagger", "uplink", "downlink", "draft")


def stream(seed: int, device: int, name: str) -> random.Random:
    """The random stream ``name`` of device ``device`` under ``seed`` (independent of every
    other (seed, device, name); a string seed is hashed with SHA-512 by ``random.Random``)."""
    return random.Random(f"wisp-sim:{seed}:device:{device}:{name}")


def server_stream(seed: int) -> random.Random:
    """The server's batch-time noise stream."""
    return random.Random(f"wisp-sim:{seed}:server")


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request a device will submit: its shape and where its acceptance replay starts."""

    index: int
    shape: RequestShape
    seq_start: int


@dataclass(slots=True)
class DeviceStreams:
    """A device's random streams and the requests it has drawn so far (``requests``, in order;
    kept so a test can compare what a device asked across modes)."""

    seed: int
    device: int
    shapes: Sequence[RequestShape]
    starts: Sequence[int]
    request_rng: random.Random = field(init=False)
    think_rng: random.Random = field(init=False)
    retry_rng: random.Random = field(init=False)
    arrival_rng: random.Random = field(init=False)
    stagger_rng: random.Random = field(init=False)
    uplink: random.Random = field(init=False)
    downlink: random.Random = field(init=False)
    draft: random.Random = field(init=False)
    requests: list[PlannedRequest] = field(default_factory=list)
    thinks: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        s, d = self.seed, self.device
        self.request_rng = stream(s, d, "request")
        self.think_rng = stream(s, d, "think")
        self.retry_rng = stream(s, d, "retry")
        self.arrival_rng = stream(s, d, "arrival")
        self.stagger_rng = stream(s, d, "stagger")
        self.uplink = stream(s, d, "uplink")
        self.downlink = stream(s, d, "downlink")
        self.draft = stream(s, d, "draft")

    def next_request(self) -> PlannedRequest:
        """The device's next request (two draws from its request stream, always two, so the
        k-th request does not depend on the shape table's kind)."""
        rng = self.request_rng
        i = rng.randrange(len(self.shapes))
        j = rng.randrange(len(self.starts))
        shape = self.shapes[i]
        start = self.starts[shape.seq % len(self.starts)] if shape.seq >= 0 else self.starts[j]
        req = PlannedRequest(len(self.requests), shape, start)
        self.requests.append(req)
        return req

    def think(self, mean_s: float) -> float:
        """The next think time (exponential, mean ``mean_s``; 0 when the mean is 0)."""
        t = self.think_rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0
        self.thinks.append(t)
        return t

    def retry(self, mean_s: float) -> float:
        """The next back-off after a refusal (exponential, mean ``mean_s``)."""
        return self.retry_rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0

    def arrival_gap(self, rate: float) -> float:
        """The next Poisson inter-arrival gap at ``rate`` requests/s."""
        return self.arrival_rng.expovariate(rate)

    def stagger(self, span_s: float) -> float:
        """The user's start offset, uniform on [0, span_s)."""
        return self.stagger_rng.uniform(0.0, span_s) if span_s > 0 else 0.0
