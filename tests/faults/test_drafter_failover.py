"""kill -9 a drafter mid-generation: its sessions resume (on a surviving drafter, or on the
same drafter restarted) and every request completes with the target's own greedy ids, with no
token delivered twice."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
import redis
from wisp.data import mixed_prompts

from tests.faults.common import FAST, assert_lossless, run_with_fault
from tests.harness import Cluster, clean_namespace


@pytest.mark.parametrize("restart_same_name", [False, True], ids=["survivor-adopts", "restarted"])
def test_kill_drafter_mid_generation(redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path,
                                     restart_same_name: bool) -> None:
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path, settings={"mode": "sled", "target_model": target,
                                                   "draft_model": draft, "fault_delay_ms": 120,
                                                   **FAST})
    prompts = [p.text for p in mixed_prompts(6, offset=40)]
    r = redis.Redis.from_url(redis_url)

    def kill_d1_once_it_serves() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for key in r.scan_iter(match=f"{ns}:sess:*"):
                raw = r.get(key)
                if raw and b'"device":"d1"' in raw and b'"generated":[]' not in raw \
                        and b'"generated":[' in raw:
                    c.kill("d1", signal.SIGKILL)
                    if restart_same_name:
                        c.start("drafter", "d1")
                    return
            time.sleep(0.05)
        raise AssertionError("d1 never served a session")

    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                               ("drafter", "d1"), ("drafter", "d2")):
                c.start(role, name)
            c.wait_ready(["e", "s", "v", "d1", "d2"])
            results = run_with_fault(redis_url, ns, prompts, kill_d1_once_it_serves)
            logs = c.log("d2") + (c.log("d1") if restart_same_name else "")
    finally:
        clean_namespace(redis_url, ns)
    assert "resumed session" in logs
    assert_lossless(results, target)
