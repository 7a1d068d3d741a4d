"""The whole system with tiny models: separate service processes, a real Redis, the real CLI.

- greedy losslessness: `wisp-cli submit --json` token ids equal the target's own
  `generate(do_sample=False)` for prompts from HumanEval, MT-Bench and ShareGPT, in sled and in
  centralized mode; the reference prompt ids come from the HF tokenizer and chat template
  directly (tests/reference.py), never from the ids the system reports, and the reported ids
  must equal them;
- two verifiers and three drafters complete 30 concurrent requests, every one equal to the
  target's greedy output, and leave nothing pending;
- bad prompts get a one-line error and a non-zero exit.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from wisp.data import mixed_prompts

from tests.harness import Cluster, clean_namespace, cli, collect, spawn_submit, submit_json
from tests.reference import chat_prompt_ids, greedy_reference, load_target

ROLES = [("estimator", "est"), ("scheduler", "sch"), ("verifier", "v1"), ("verifier", "v2"),
         ("drafter", "d1"), ("drafter", "d2"), ("drafter", "d3")]
PORTS: dict[str, int] = {}
"""Each service's HTTP port, as it bound it (``http_port=0``, read from its log): ports picked
in advance were taken by something else before the service bound them, in two CI runs."""
MAX_NEW = 20
N_PROMPTS = 24  # 8 from each of HumanEval, MT-Bench, ShareGPT


@pytest.fixture(scope="module")
def cluster(redis_url: str, tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    """sled mode: estimator, scheduler, 2 verifiers, 3 drafters, each its own process."""
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path_factory.mktemp("logs"),
                settings={"mode": "sled", "draft_model": draft, "target_model": target,
                          "max_wait_ms": 5, "draft_k": 4})
    with c:
        PORTS.clear()
        for role, name in ROLES:
            c.start(role, name, http_port=0)  # the kernel picks a free port at bind time
        c.wait_ready([name for _, name in ROLES])
        PORTS.update({name: c.http_port(name) for _, name in ROLES})
        yield c
    clean_namespace(redis_url, ns)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [p.text for p in mixed_prompts(N_PROMPTS)]


@pytest.fixture(scope="module")
def reference(tiny_pair: tuple[Path, Path]) -> object:
    return load_target(tiny_pair[0])


def _check_lossless(prompts: list[str], results: list[dict], ref_model: object, target: Path,
                    mode: str, max_new: int = MAX_NEW) -> None:
    """Every result equals the target's greedy output for its prompt, tokenized independently."""
    assert len(results) == len(prompts)
    for i, (prompt, res) in enumerate(zip(prompts, results, strict=True)):
        ids = chat_prompt_ids(target, prompt)
        assert res["prompt_token_ids"] == ids, f"{mode}: request {i} was tokenized differently"
        want = greedy_reference(ref_model, ids, max_new)
        assert res["token_ids"] == want, f"{mode}: request {i} differs from the target's greedy output"
        assert res["mode"] == mode


def _submit_all(prompts: list[str], env: dict[str, str], *args: str) -> list[dict]:
    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(
            lambda p: submit_json(p, env, "--max-new-tokens", str(MAX_NEW), *args), prompts))


def test_sled_is_lossless_through_the_cli(cluster: Cluster, prompts: list[str], reference: object,
                                          tiny_pair: tuple[Path, Path]) -> None:
    results = _submit_all(prompts, cluster.env())
    _check_lossless(prompts, results, reference, tiny_pair[0], "sled")
    drafted = sum(r["drafted_tokens"] for r in results)
    accepted = sum(r["accepted_tokens"] for r in results)
    assert drafted > 0 and 0 < accepted < drafted  # speculation really happened, with rejections
    assert all(r["rounds"] >= 1 and r["ttft_ms"] > 0 for r in results)
    assert {"text", "token_ids", "prompt_token_ids", "ttft_ms", "tpot_ms", "rounds",
            "drafted_tokens", "accepted_tokens", "mode"} <= set(results[0])


def test_thirty_concurrent_requests_two_verifiers_three_drafters(
        cluster: Cluster, reference: object, tiny_pair: tuple[Path, Path]) -> None:
    env = cluster.env()
    texts = [f"Count to {i} in words, please." for i in range(30)]
    procs = [spawn_submit(t, env, "--max-new-tokens", "12") for t in texts]
    results = [collect(p) for p in procs]
    _check_lossless(texts, results, reference, tiny_pair[0], "sled", max_new=12)
    devices = {r["device"] for r in results}
    assert devices == {"d1", "d2", "d3"}  # every drafter served some
    verifiers = [cluster.log(v) for v in ("v1", "v2")]
    assert all("Traceback" not in log for log in verifiers)
    # both verifiers did work: their heartbeats count batches
    status = {}
    for _ in range(50):
        res = cli(["status", "--json"], env)
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)
        if status["pending_total"] == 0:
            break
        time.sleep(0.1)
    assert status["pending_total"] == 0, status
    batches = {s["name"]: s.get("batches", 0) for s in status["services"] if s["role"] == "verifier"}
    assert set(batches) == {"v1", "v2"} and all(b > 0 for b in batches.values()), batches
    human = cli(["status"], env)
    assert human.returncode == 0, human.stderr
    assert "0 entries pending in all groups" in human.stdout, human.stdout
    rows = human.stdout.splitlines()  # the live-services table lists every service by role and name
    for role, name in (("verifier", "v1"), ("verifier", "v2"), ("drafter", "d1"), ("drafter", "d2"),
                       ("drafter", "d3")):
        assert any(role in row and f" {name} " in row for row in rows), (role, name, human.stdout)


def test_bad_prompts_get_one_line_errors(cluster: Cluster) -> None:
    env = cluster.env()
    empty = cli(["submit", "   "], env)
    assert empty.returncode == 2 and "prompt is empty" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1
    huge = cli(["submit", "word " * 6000, "--max-new-tokens", "8"], env)
    assert huge.returncode == 1 and "context limit" in huge.stderr, huge.stderr
    assert len(huge.stderr.strip().splitlines()) == 1
    over = cli(["submit", "hi", "--max-new-tokens", "100000"], env)
    assert over.returncode == 1 and "max_new_tokens" in over.stderr
    bad_flag = cli(["submit", "hi", "--temperature", "-3"], env)
    assert bad_flag.returncode == 2 and "--temperature" in bad_flag.stderr
    assert len(bad_flag.stderr.strip().splitlines()) == 1
    bad_spec = cli(["submit", "hi", "--speculation", "lots"], env)
    assert bad_spec.returncode == 2 and "--speculation" in bad_spec.stderr


def test_unreachable_redis_is_one_line_and_nonzero(tmp_path: Path) -> None:
    env = {**cluster_free_env(), "WISP_REDIS_URL": "redis://127.0.0.1:1/0"}
    for args in (["status"], ["submit", "hello"]):
        res = cli(args, env, timeout=60)
        assert res.returncode == 1, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach Redis" in lines[0]


def cluster_free_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}


def test_centralized_is_lossless(redis_url: str, tiny_pair: tuple[Path, Path], prompts: list[str],
                                 reference: object, tmp_path: Path) -> None:
    target, _ = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path, settings={"mode": "centralized", "target_model": target,
                                                   "max_wait_ms": 5})
    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                               ("drafter", "d")):
                c.start(role, name)
            c.wait_ready(["e", "s", "v", "d"])
            results = _submit_all(prompts, c.env())
            _check_lossless(prompts, results, reference, target, "centralized")
            # server runs: the tokens come back in verdicts of one or more, never more rounds
            assert all(r["drafted_tokens"] == 0 and 1 <= r["rounds"] <= len(r["token_ids"])
                       for r in results)
    finally:
        clean_namespace(redis_url, ns)


def _get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_every_service_serves_health_ready_and_metrics(cluster: Cluster) -> None:
    submit_json("Say hello.", cluster.env(), "--max-new-tokens", "8")
    for _, name in ROLES:
        port = PORTS[name]
        assert _get(port, "/healthz") == (200, "ok\n")
        status, body = _get(port, "/readyz")
        assert status == 200 and '"ready": true' in body
        status, metrics = _get(port, "/metrics")
        assert status == 200 and "wisp_stream_lag" in metrics and "wisp_dead_letters_total" in metrics
        assert _get(port, "/nope")[0] == 404
    verifier_metrics = _get(PORTS["v1"], "/metrics")[1] + _get(PORTS["v2"], "/metrics")[1]
    drafts = [float(line.split()[-1]) for line in verifier_metrics.splitlines()
              if line.startswith("wisp_spec_decode_num_drafts_total")]
    assert sum(drafts) > 0
    assert "wisp_verify_seconds_bucket" in verifier_metrics
    drafter_metrics = "".join(_get(PORTS[d], "/metrics")[1] for d in ("d1", "d2", "d3"))
    finished = [float(line.split()[-1]) for line in drafter_metrics.splitlines()
                if line.startswith("wisp_requests_finished_total")]
    assert sum(finished) >= 1
