"""A drafter serves the OpenAI-compatible API for its own device (``wisp-cli serve drafter``
on an edge device), on loopback, the way Ollama does: an application there talks to it with
the official ``openai`` client and no Redis credential; every request runs on that device,
greedy output equals the target's own, and naming another device is a 400."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import openai
import pytest
import redis
from wisp.services.runner import free_port

from tests.harness import Cluster, clean_namespace
from tests.reference import chat_prompt_ids, greedy_reference, load_target


def test_a_drafter_serves_its_own_devices_api(redis_url: str, tiny_pair: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    c = Cluster(redis_url, ns, tmp_path, settings={"target_model": target, "draft_model": draft,
                                                   "max_wait_ms": 5})
    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v")):
                c.start(role, name)
            c.start("drafter", "phone-1", device_api="true", device_api_port=port)
            c.wait_ready(["e", "s", "v", "phone-1"])
            base = f"http://127.0.0.1:{port}/v1"
            deadline = time.monotonic() + 30
            r = redis.Redis.from_url(redis_url)
            while True:  # the drafter's heartbeat says where its API is, once it listens
                hb = r.get(f"{ns}:hb:drafter:phone-1")
                if hb and json.loads(hb).get("api_url") == base:
                    break
                assert time.monotonic() < deadline, c.log("phone-1")[-2000:]
                time.sleep(0.1)
            r.close()
            client = openai.OpenAI(base_url=base, api_key="unused-on-loopback", max_retries=0,
                                   timeout=120)
            model = client.models.list().data[0].id
            prompt = "Say something about the sea."
            resp = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8,
                temperature=0, extra_body={"return_token_ids": True})
            figures = (resp.model_extra or {})["wisp"]
            with pytest.raises(openai.BadRequestError) as other:
                client.completions.create(model=model, prompt="hi", max_tokens=2,
                                          extra_body={"device": "laptop-7"})
            log = c.log("phone-1")
    finally:
        clean_namespace(redis_url, ns)
    assert figures["device"] == "phone-1"  # ran on this device, not the shared queue
    ids = chat_prompt_ids(target, prompt)
    assert figures["prompt_token_ids"] == ids
    assert figures["token_ids"] == greedy_reference(load_target(target), ids, 8)
    assert "device" in str(other.value) and "phone-1" in str(other.value)
    assert "Traceback" not in log
