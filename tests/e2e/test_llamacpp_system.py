"""Greedy losslessness through the four services with the llama.cpp drafter.

The drafter runs the packaged Qwen2.5-Coder-0.5B GGUF as shipped (Q4_K_M, llama.cpp); the target
is the same model's converted fp32 safetensors (torch), so drafts are mostly accepted but not
always (quantised vs dequantised arithmetic), and both accept and reject paths run. Two requests
are served at once, so the drafter drafts their rounds in one llama.cpp batch. The reference is
the target's own `generate(do_sample=False)` on the prompt tokenized independently of WISP.

Needs `wisp-cli models prepare` (the README's test command), which keeps the 0.5B's GGUF.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
from wisp.client import submit
from wisp.models import draft_gguf, is_prepared
from wisp.services.drafter.llamacpp_engine import LlamaCppDraftEngine
from wisp.services.runner import with_services
from wisp.settings import Settings

from tests.reference import chat_prompt_ids, greedy_reference, load_target

MODEL = "qwen-coder-0.5b"
NEW = 12
PROMPTS = ["Write a Python function that reverses a string.", "What is a linked list? One sentence."]


@pytest.fixture(scope="module")
def settings(redis_url: str) -> Settings:
    base = Settings()
    if not is_prepared(MODEL, base.model_cache):
        pytest.fail(f"run `wisp-cli models prepare` first: {MODEL} is not prepared in {base.model_cache}")
    try:
        draft_gguf(MODEL, base.model_cache)
    except FileNotFoundError as err:
        pytest.fail(str(err))
    return Settings(redis_url=redis_url, namespace=f"wisp-test-{uuid.uuid4().hex[:10]}",
                    draft_model=MODEL, target_model=MODEL, draft_backend="llamacpp", mode="sled",
                    draft_k=4, ttft_slo_ms=3_600_000.0, tpot_slo_ms=600_000.0, torch_threads=1)


async def test_greedy_with_the_llamacpp_drafter_is_the_targets_own_output(settings: Settings) -> None:
    try:
        async with with_services(settings, redis_url=settings.redis_url) as system:
            drafter = next(s for s in system.services if s.role == "drafter")
            assert isinstance(drafter.engine, LlamaCppDraftEngine)
            done = await asyncio.gather(*(submit(system.bus, p, max_new_tokens=NEW, temperature=0.0)
                                          for p in PROMPTS))
    finally:
        r = redis.Redis.from_url(str(settings.redis_url))
        keys = list(r.scan_iter(match=f"{settings.namespace}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
    target_dir = settings.model_cache / MODEL
    target = load_target(target_dir)
    for prompt, d in zip(PROMPTS, done, strict=True):
        ids = chat_prompt_ids(target_dir, prompt)
        assert d.prompt_token_ids == ids
        assert d.token_ids == greedy_reference(target, ids, NEW)[:len(d.token_ids)]
        assert len(d.token_ids) == NEW or d.finish_reason == "stop"
        assert d.drafted_tokens > 0 and d.accepted_tokens > 0
