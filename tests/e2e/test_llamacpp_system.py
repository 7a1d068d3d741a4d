"""Greedy losslessness through the four services with the llama.cpp drafter, on an edge drafter
prepared the way an edge node is (`wisp-cli models prepare --for drafter`).

The drafter runs as its own `wisp-cli serve drafter` process on a model cache that holds only the
packaged Qwen2.5-Coder-0.5B GGUF (Q4_K_M, joined and checked, not converted) and the target's
tokenizer (built from that GGUF's identical vocabulary, with the target's own chat template): no
safetensors, no fp32 conversion. The verifier, scheduler and estimator run as separate processes
on the full cache; the target is the same 0.5B's converted fp32 safetensors (torch), so drafts
are mostly accepted but not always (quantised vs dequantised arithmetic), and both accept and
reject paths run. Two requests are served at once, so the drafter drafts their rounds in one
llama.cpp batch. The reference is the target's own `generate(do_sample=False)` on the prompt
tokenized independently of WISP. (The 1.5B target's tokenizer-only preparation takes the same
path: ``PackagedModel.tokenizer_from``.)

Needs `wisp-cli models prepare` (the README's test command), which keeps the 0.5B's GGUF.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from wisp.models import MARKER, is_prepared, tokenizer_dir
from wisp.settings import Settings

from tests.harness import Cluster, clean_namespace, cli, collect, spawn_submit
from tests.reference import chat_prompt_ids, greedy_reference, load_target

MODEL = "qwen-coder-0.5b"
NEW = 12
PROMPTS = ["Write a Python function that reverses a string.", "What is a linked list? One sentence."]


@pytest.fixture(scope="module")
def edge_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache prepared for an edge drafter only."""
    if not is_prepared(MODEL, Settings().model_cache):
        pytest.fail(f"run `wisp-cli models prepare` first: {MODEL} is not prepared")
    cache = tmp_path_factory.mktemp("edge-cache")
    env = {**os.environ, "WISP_MODEL_CACHE": str(cache), "WISP_DRAFT_MODEL": MODEL,
           "WISP_TARGET_MODEL": MODEL}
    res = cli(["models", "prepare", "--for", "drafter"], env, timeout=600)
    assert res.returncode == 0, res.stderr
    return cache


def test_the_edge_cache_holds_only_the_gguf_and_a_tokenizer(edge_cache: Path) -> None:
    files = sorted(p.relative_to(edge_cache).as_posix() for p in edge_cache.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".safetensors", ".bin"))], files
    assert f"{MODEL}/{MODEL}.gguf" in files
    assert not is_prepared(MODEL, edge_cache)  # not a converted model
    info = json.loads((tokenizer_dir(MODEL, edge_cache) / MARKER).read_text())
    assert info["tokenizer_only"] is True
    # a verifier cannot run on this cache: refused in one line naming the fix, before any work
    env = {**os.environ, "WISP_MODEL_CACHE": str(edge_cache), "WISP_TARGET_MODEL": MODEL,
           "WISP_REDIS_URL": "redis://127.0.0.1:1"}
    res = cli(["serve", "verifier"], env, timeout=120)
    assert res.returncode != 0 and "wisp-cli models prepare" in res.stderr


def test_greedy_with_an_edge_llamacpp_drafter_is_the_targets_own_output(
        redis_url: str, edge_cache: Path, tmp_path: Path) -> None:
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path, settings={
        "mode": "sled", "target_model": MODEL, "draft_model": MODEL, "draft_k": 4,
        "ttft_slo_ms": 3_600_000, "tpot_slo_ms": 600_000})
    try:
        for role in ("estimator", "scheduler", "verifier"):
            c.start(role, role)
        c.start("drafter", "edge", model_cache=str(edge_cache), draft_backend="llamacpp")
        c.wait_ready(["estimator", "scheduler", "verifier", "edge"], timeout_s=300)
        procs = [spawn_submit(p, c.env(), "--via-redis", "--max-new-tokens", str(NEW)) for p in PROMPTS]
        done = [collect(p) for p in procs]
    finally:
        c.stop()
        clean_namespace(redis_url, ns)
    target_dir = Settings().model_cache / MODEL
    target = load_target(target_dir)
    for prompt, d in zip(PROMPTS, done, strict=True):
        ids = chat_prompt_ids(target_dir, prompt)
        assert d["prompt_token_ids"] == ids
        assert d["token_ids"] == greedy_reference(target, ids, NEW)[:len(d["token_ids"])]
        assert len(d["token_ids"]) == NEW or d["finish_reason"] == "stop"
        assert d["drafted_tokens"] > 0 and d["accepted_tokens"] > 0
