"""CPU sets for the roles that run models, so simulated edge devices do not take the server's
compute (`--isolate-cores`).

On real hardware a drafter runs on the device and the verifier on the server: they never compete
for a core. When one machine runs both (``wisp-cli bench``, ``up``, ``demo``), an unpinned drafter
steals the verifier's cores and every mode is measured on a server slower than it is. Pinning
each role's model thread to its own cores (``os.sched_setaffinity`` on that thread: Linux
affinity is per thread, and the threads a model library starts from it, torch's OpenMP team and
llama.cpp's workers, inherit it) with thread counts to match keeps the two apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class CpuSetError(ValueError):
    """A CPU list that cannot be used; the message says what to fix."""


def parse_cpus(text: str) -> frozenset[int]:
    """``"0-3,6"`` -> {0, 1, 2, 3, 6}; ``""`` -> empty (no pinning). Every CPU must be one this
    process may run on."""
    text = text.strip()
    if not text:
        return frozenset()
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise CpuSetError(f"{text!r} is not a CPU list: use numbers and ranges like 0-3,6") from None
    allowed = available()
    missing = sorted(out - allowed)
    if missing:
        raise CpuSetError(f"CPU(s) {format_cpus(missing)} are not available to this process "
                          f"(available: {format_cpus(allowed)})")
    return frozenset(out)


def available() -> frozenset[int]:
    """The CPUs this process may run on."""
    return frozenset(os.sched_getaffinity(0))


def format_cpus(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> ``"0-2,5"``."""
    xs = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(parts)


def split_cores(cpus: Iterable[int] | None = None) -> tuple[frozenset[int], frozenset[int]]:
    """(verifier, drafters): the first half of the CPUs (rounded up) for the verifier, the rest
    for the drafters; at least one each, so it needs two CPUs."""
    xs = sorted(set(available() if cpus is None else cpus))
    if len(xs) < 2:
        raise CpuSetError(f"--isolate-cores needs at least 2 CPUs; this process may use "
                          f"{format_cpus(xs) or 'none'}")
    half = (len(xs) + 1) // 2
    return frozenset(xs[:half]), frozenset(xs[half:])


def pin_current_thread(cpus: frozenset[int]) -> None:
    """Pin the calling thread (and the threads it starts from now on) to ``cpus``."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def pin_model_thread(cpus_text: str, torch_threads: bool) -> frozenset[int]:
    """Run ON a service's model thread: pin it to ``cpus_text`` and, where torch runs there, size
    torch's threads to match (``torch.set_num_threads`` sets the calling thread's OpenMP team
    size). Returns the CPUs (empty: nothing pinned)."""
    cpus = parse_cpus(cpus_text)
    if not cpus:
        return cpus
    pin_current_thread(cpus)
    if torch_threads:
        import torch

        torch.set_num_threads(len(cpus))
    return cpus
