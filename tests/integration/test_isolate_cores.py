"""`--isolate-cores` really pins each role's model thread: the verifier's and the drafter's
worker threads run on disjoint CPUs (read back from /proc, not from our own bookkeeping), and
the threads the model libraries start from them inherit that."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from wisp.services.runner import with_services
from wisp.settings import Settings

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")


def _allowed(native_id: int) -> set[int]:
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
    out: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _where() -> tuple[int, set[int]]:
    return threading.get_native_id(), os.sched_getaffinity(0)


def _child_affinity() -> set[int]:
    seen: list[set[int]] = []
    child = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    child.start()
    child.join()
    return seen[0]


async def test_verifier_and_drafter_model_threads_are_pinned_apart(tiny_pair: tuple[Path, Path]) -> None:
    target, draft = tiny_pair
    cpus = sorted(os.sched_getaffinity(0))
    v, d = cpus[:1], cpus[1:2]
    settings = Settings(target_model=str(target), draft_model=str(draft), draft_backend="torch",
                        verifier_cpus=str(v[0]), drafter_cpus=str(d[0]), mode="sled")
    async with with_services(settings, ("drafter", "verifier")) as system:
        roles = {s.role: s for s in system.services}
        # one more job on each model thread, which reports where it runs from the inside
        seen = {role: await roles[role].in_worker(_where) for role in roles}
        for role, want in (("verifier", set(v)), ("drafter", set(d))):
            tid, inside = seen[role]
            assert inside == want and _allowed(tid) == want, role
            # what a library starts from the model thread stays there
            assert await roles[role].in_worker(_child_affinity) == want
        assert _allowed(threading.get_native_id()) == set(cpus)  # the event loop is not pinned
