"""Sampling (temperature > 0) through the real services keeps the TARGET's distribution.

``tests/unit/test_specdec.py`` checks the acceptance rule as a pure function. Here the whole
pipeline does the work: estimator, scheduler, verifier and drafter run as separate
``wisp-cli serve`` processes on a real Redis with a tiny random model pair loaded through
``from_pretrained``; 2,000 (sled) / 1,000 (wisp) seeded requests for one prompt are sent through
the in-Python client (bounded concurrency), and the first ``DEPTH`` generated tokens of all of
them are compared with the exact distribution of the target model itself by a chi-square
goodness-of-fit test (``tests/e2e/sampling_stats.py``: cells are prefixes of the output with
expected count >= 5; the rest of each node's mass is pooled into one "other" cell). Request ids
and seeds are fixed, so a rerun draws the same tokens (up to float rounding in batched forwards,
which moved one or two draws between runs: p = 0.9863 vs 0.9856 in sled, 0.473 twice in wisp).

Why it has something to detect:
- random tiny models are near-uniform over the 152k vocabulary, so the requests sample at
  ``TEMPERATURE = 0.25`` (logits x 4; T != 1 also catches a side that ignores the temperature):
  the target then puts most of its mass on a few tokens per step, and the joint of three tokens
  fits in 74 (sled, n = 2000) / 35 (wisp, n = 1000) cells of >= 5 expected samples;
- the prompt's first token is peaked (top-1 probability 0.76), so second-token contexts are few
  and well populated: a wrong rule at draft position 1 (the only one wisp mode drafts here) is
  detected with power 0.995 at n = 1000 (non-central chi-square), against 0.09 for a prompt whose
  top-1 is 0.16;
- draft = target + 5 % weight noise: the draft's own distribution is far from the target's (the
  test asserts that comparing the observations against it, or against the target at 1.25 x the
  temperature, is rejected at p < 1e-9), and rejections really happen (acceptance well inside
  (0, 1), from the DoneEvents' drafted/accepted figures);
- ``DEPTH = 3`` (max_new_tokens=3): in sled mode round 0 drafts two tokens (budget 3 - 1), so a
  rejection at position 0 or 1, the residual draw and the bonus token all occur; in wisp mode
  round 0 is the undrafted prefill round and round 1 drafts one token (learned controller).

It can fail: with ``WISP_TEST_SABOTAGE=accept-always`` (every drafted token accepted) or
``=resample-from-p`` (on a rejection, draw from p instead of norm(max(0, p - q))) the services
start with a ``sitecustomize`` that swaps the acceptance rule (``tests/sabotage.py``), and the
goodness-of-fit assertion fails (measured: resample-from-p p = 6e-56 sled, 1.3e-8 wisp;
accept-always p = 0 sled, 7e-239 wisp; unsabotaged p = 0.986 sled, 0.473 wisp).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import sabotage
from tests.e2e.sampling_stats import CellTree, model_conditional
from tests.harness import Cluster, clean_namespace

PROMPT = "import numpy as np"
TEMPERATURE = 0.25
DEPTH = 3
N_REQUESTS = {"sled": 2000, "wisp": 1000}
"""wisp mode differs from sled only around the verifier (prefill round, learned draft length,
SLO-aware batching), so it gets half the samples to keep the pair of runs near 3 minutes."""
CONCURRENCY = 24
MIN_EXPECTED = 5.0
ALPHA = 1e-3
"""False-alarm rate of the goodness-of-fit assertion (per mode)."""
POWER_ALPHA = 1e-9
"""A wrong distribution must be rejected far more strongly than ALPHA."""
DRAFT_NOISE = 0.05
PAIR_SEED = 0
DRAFT_TOP_K = 64  # the system's default (Settings.draft_top_k)
SEED_BASE = 1_000_000
TINY_CONTROLLER = Path(__file__).resolve().parents[2] / "docs" / "results" / "tiny-controller.json"
"""The controller trained for the tiny pair (results.md): wisp mode then really uses a learned
draft length and the undrafted prefill round, not the fixed-k fallback."""


@pytest.fixture(scope="module")
def peaked_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target, draft): tiny random Qwen2 models on the real Qwen tokenizer, draft = target with
    5 % relative weight noise (``make_tiny_pair``), loaded by the services via their paths."""
    from wisp.models import make_tiny_pair
    from wisp.settings import Settings

    out = tmp_path_factory.mktemp("peaked")
    return make_tiny_pair(out, "qwen-coder-0.5b", seed=PAIR_SEED, noise=DRAFT_NOISE,
                          cache_dir=Settings().model_cache)


def run_requests(redis_url: str, ns: str, n: int, concurrency: int, label: str,
                 **fields: Any) -> list[Any]:
    """Submit ``n`` requests (request id ``sampling-<label>-<i>``, seed ``SEED_BASE + i``: the
    system's randomness is a function of both, so a rerun draws the same tokens) through
    ``wisp.client.submit`` with at most ``concurrency`` in flight; returns their DoneEvents."""
    from wisp.bus import Bus, Keys, wait_for_redis
    from wisp.client import submit

    async def main() -> list[Any]:
        client = await wait_for_redis(redis_url)
        bus = Bus(client, Keys(ns))
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> Any:
            async with gate:
                return await submit(bus, PROMPT, check_drafters=False, idle_timeout_s=120,
                                    request_id=f"sampling-{label}-{i:05d}", seed=SEED_BASE + i,
                                    **fields)

        try:
            return list(await asyncio.gather(*(one(i) for i in range(n))))
        finally:
            await client.aclose()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def references(peaked_pair: tuple[Path, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from wisp.settings import Settings
    from wisp.tokens import eos_token_ids

    target, draft = peaked_pair
    models = {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
              for name, path in (("target", target), ("draft", draft))}
    return {**models, "tokenizer": AutoTokenizer.from_pretrained(str(target)),
            "eos": frozenset(eos_token_ids(str(target), Settings()))}


def check_distribution(done: list[Any], refs: dict[str, Any], label: str) -> dict[str, float]:
    """The goodness-of-fit assertion plus the power checks; returns the p-values."""
    # the prompt as a user would tokenize it (no chat template), independently of WISP's code
    prompt_ids = list(refs["tokenizer"](PROMPT)["input_ids"])
    assert all(d.prompt_token_ids == prompt_ids for d in done)
    tree = CellTree(model_conditional(refs["target"], prompt_ids, TEMPERATURE), DEPTH,
                    len(done), refs["eos"], MIN_EXPECTED)
    outputs = [d.token_ids for d in done]
    p_target, stat, dof = tree.pvalue(outputs)
    wrong = {
        "draft": model_conditional(refs["draft"], prompt_ids, TEMPERATURE, DRAFT_TOP_K),
        "target_T*1.25": model_conditional(refs["target"], prompt_ids, TEMPERATURE * 1.25),
    }
    p_wrong = {k: tree.pvalue(outputs, tree.probs_under(c))[0] for k, c in wrong.items()}
    drafted = sum(d.drafted_tokens for d in done)
    accepted = sum(d.accepted_tokens for d in done)
    print(f"\n[{label}] {len(done)} requests, {len(tree.probs)} cells (dof {dof}), "
          f"chi2={stat:.1f}, p(target)={p_target:.4g}; wrong distributions: "
          + ", ".join(f"p({k})={v:.3g}" for k, v in p_wrong.items())
          + f"; drafted={drafted} accepted={accepted} acceptance={accepted / max(drafted, 1):.3f}")
    # every output is complete: DEPTH tokens, or fewer ending in EOS
    assert all(len(o) == DEPTH or (o and o[-1] in refs["eos"]) for o in outputs)
    assert len({d.request_id for d in done}) == len(done)
    assert p_target > ALPHA, (
        f"{label}: the first {DEPTH} sampled tokens do not follow the target's distribution "
        f"(chi2={stat:.1f}, dof={dof}, p={p_target:.3g})")
    # speculation really happened, with rejections
    assert drafted >= len(done) // 2, (drafted, len(done))
    assert 0.1 < accepted / drafted < 0.9, (accepted, drafted)
    # the test has power: the draft's distribution and a different temperature are rejected
    assert all(p < POWER_ALPHA for p in p_wrong.values()), p_wrong
    return {"target": p_target, **p_wrong}


@pytest.fixture
def sabotage_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    return sabotage.install(tmp_path / "sabotage", monkeypatch)


@pytest.mark.parametrize("mode", ["sled", "wisp"])
def test_sampling_through_the_services_matches_the_target(
    redis_url: str, peaked_pair: tuple[Path, Path], references: dict[str, Any], tmp_path: Path,
    mode: str, sabotage_env: str | None,
) -> None:
    target, draft = peaked_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    extra: dict[str, Any] = {"controller": TINY_CONTROLLER} if mode == "wisp" else {}
    c = Cluster(redis_url, ns, tmp_path, settings={
        "mode": mode, "draft_model": draft, "target_model": target, "draft_k": 4,
        "draft_top_k": DRAFT_TOP_K, "max_wait_ms": 2, "max_batch_size": 32, **extra})
    names = [("estimator", "e"), ("scheduler", "s"), ("verifier", "v"), ("drafter", "d")]
    try:
        with c:
            for role, name in names:
                c.start(role, name)
            c.wait_ready([n for _, n in names])
            started = time.monotonic()
            done = run_requests(redis_url, ns, N_REQUESTS[mode], CONCURRENCY, mode,
                                max_new_tokens=DEPTH, temperature=TEMPERATURE, chat_template=False,
                                ttft_slo_ms=600_000, tpot_slo_ms=600_000)
            elapsed = time.monotonic() - started
            logs = {n: c.log(n) for _, n in names}
    finally:
        clean_namespace(redis_url, ns)
    print(f"\n[{mode}] {len(done)} requests in {elapsed:.1f} s")
    assert all("Traceback" not in log for log in logs.values()), logs
    if mode == "wisp":  # the learned controller drafted (not a fixed-k fallback)
        assert "learned speculation controller" in logs["d"], logs["d"][-2000:]
        assert all(d.mode == "wisp" for d in done)
    check_distribution(done, references, f"{mode}{' sabotage=' + sabotage_env if sabotage_env else ''}")
