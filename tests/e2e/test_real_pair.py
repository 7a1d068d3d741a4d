"""Greedy losslessness on the packaged real pair (Qwen2.5-Coder 0.5B drafts for 1.5B), through
separate `wisp-cli serve` processes and a real Redis, in sled, wisp and centralized mode; the
requests go through `wisp.client.submit` (what `wisp-cli submit` runs), all at the same instant.

Four requests run at once, so the verifier verifies padded batches of several rounds (rows
with different cached lengths, left-padded); one request runs 128 new tokens (many rounds, long
KV caches, rollbacks deep into the context); one ends on the target's EOS well within its budget
(finish_reason "stop", EOS as its last token). The reference is the target's own
`generate(do_sample=False)` on the prompt tokenized independently of WISP (the HF tokenizer and
the target's chat template, `tests/reference.py`), and the prompt ids WISP reports must equal
those ids, so a tokenisation or chat-template bug fails here instead of feeding the reference.

Needs `wisp-cli models prepare` (the README's test command runs it). The 1.5B model on a 2-core
CPU is the expensive part (one target forward costs about a second there, whatever its few
tokens, and the reference is one forward per token): one verifier and one drafter at a time, and
centralized mode (one target forward per token) runs only the short requests, with 8 tokens,
compared with the first 8 of the same greedy reference.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from wisp.data import load_prompts
from wisp.models import is_prepared
from wisp.services.runner import free_port
from wisp.settings import Settings

from tests.harness import Cluster
from tests.reference import chat_prompt_ids, greedy_reference, load_target

pytestmark = pytest.mark.real

# losslessness does not depend on speed: SLOs loose enough that admission control (wisp mode)
# never refuses on a slow or busy machine
LOOSE = {"ttft_slo_ms": 3_600_000.0, "tpot_slo_ms": 600_000.0}
DRAFT, TARGET = "qwen-coder-0.5b", "qwen-coder-1.5b"
LONG = 128
EOS_PROMPT = "What does HTTP stand for? Answer in one short sentence."
"""The 1.5B target answers this in 9 tokens, the last one <|im_end|> (its EOS)."""


@dataclass(frozen=True)
class Req:
    prompt: str
    max_new: int
    kind: str  # "long", "eos" or "short"


@dataclass
class Served:
    """What the system answered, per mode, and what its verifier measured while it did."""

    requests: dict[str, list[Req]]
    """mode -> the requests served together in that mode."""
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    batches: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """mode -> the TimingSamples (one per verified batch) of that mode's run."""
    logs: dict[str, str] = field(default_factory=dict)
    api: dict[str, Any] = field(default_factory=dict)
    """The EOS prompt asked through the OpenAI-compatible API (the official client, sled mode):
    its ``wisp`` extension field, with the token ids."""


def _requests() -> dict[str, list[Req]]:
    data = [load_prompts(src, 1, offset=5)[0].text for src in ("humaneval", "mtbench")]
    speculative = [
        Req("Write a Python class for a binary search tree with insert, delete, search and an "
            "in-order traversal, each method with a docstring.", LONG, "long"),
        Req(EOS_PROMPT, 24, "eos"),
        Req(data[0], 16, "short"),
        Req(data[1], 16, "short"),
    ]
    central = [Req(EOS_PROMPT, 24, "eos"), Req(data[0], 8, "short"), Req(data[1], 8, "short")]
    return {"sled": speculative, "centralized": central, "wisp": speculative}


def _target_dir() -> Path:
    return Settings().model_cache / TARGET


def _stats_mark(r: redis.Redis, ns: str) -> str:
    last = r.xrevrange(f"{ns}:stats", count=1)
    return last[0][0].decode() if last else "0-0"


def _stats_since(r: redis.Redis, ns: str, mark: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"d"]) for _, f in r.xrange(f"{ns}:stats", min=f"({mark}")]


def _submit_together(url: str, ns: str, device: str, reqs: list[Req]) -> list[dict[str, Any]]:
    """Submit ``reqs`` at the same instant (one asyncio client, `wisp.client.submit`, as
    `wisp-cli submit` does) so their rounds are drafted and verified together from round 0.
    Each result is the DoneEvent plus ``streamed``: the token ids the client received."""
    from wisp.bus import Bus, Keys, wait_for_redis
    from wisp.client import submit
    from wisp.protocol import TokenEvent

    async def main() -> list[dict[str, Any]]:
        client = await wait_for_redis(url)
        bus = Bus(client, Keys(ns))

        async def one(q: Req) -> dict[str, Any]:
            streamed: list[int] = []

            def on(ev: object) -> None:
                if isinstance(ev, TokenEvent):
                    streamed.extend(ev.token_ids)

            done = await submit(bus, q.prompt, device=device, on_event=on, idle_timeout_s=600,
                                max_new_tokens=q.max_new, **LOOSE)
            return {**done.model_dump(), "streamed": streamed}

        try:
            return list(await asyncio.gather(*(one(q) for q in reqs)))
        finally:
            await client.aclose()

    return asyncio.run(main())


def _run_mode(c: Cluster, r: redis.Redis, device: str, reqs: list[Req]) -> tuple[list[dict], list[dict]]:
    """Serve ``reqs`` concurrently on ``device``; the results and the verifier's batches."""
    mark = _stats_mark(r, c.namespace)
    t0 = time.monotonic()
    results = _submit_together(c.redis_url, c.namespace, device, reqs)
    batches = _stats_since(r, c.namespace, mark)
    sizes = Counter(len(b["new_tokens"]) for b in batches)
    ms = sum(b["measured_ms"] for b in batches)
    print(f"\n{device}: {time.monotonic() - t0:.0f} s for {len(reqs)} requests, "
          f"{sum(r['rounds'] for r in results)} rounds, {len(batches)} batches (rows: count "
          f"{dict(sorted(sizes.items()))}), verifier busy {ms / 1000:.0f} s")
    return results, batches


def _ask_api(base_url: str) -> dict[str, Any]:
    """The EOS prompt as a chat completion through the gateway, with the official client."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    resp = client.chat.completions.create(
        model=TARGET, messages=[{"role": "user", "content": EOS_PROMPT}], max_tokens=24,
        temperature=0, extra_body={"return_token_ids": True, **LOOSE})
    extra = resp.model_extra or {}
    return {**extra["wisp"], "finish_reason": resp.choices[0].finish_reason,
            "text": resp.choices[0].message.content}


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Run every mode, then stop all services (their memory is needed for the reference)."""
    cache = Settings().model_cache
    missing = [m for m in (DRAFT, TARGET) if not is_prepared(m, cache)]
    if missing:
        pytest.fail(f"run `wisp-cli models prepare` first: {missing} not prepared in {cache}")
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    out = Served(_requests())
    r = redis.Redis.from_url(redis_url)
    # max_wait_ms: an idle verifier waits this long for more rounds; the batching under test
    # comes from rounds queueing while the verifier is busy (max_inflight_batches = 1)
    c = Cluster(redis_url, ns, tmp_path_factory.mktemp("real-logs"),
                settings={"draft_model": DRAFT, "target_model": TARGET, "max_wait_ms": 20,
                          "draft_k": 4})
    try:
        with c:
            c.start("estimator", "est")
            c.start("scheduler", "sch", mode="sled")
            c.start("verifier", "verifier-real", threads=2)
            c.start("drafter", "drafter-sled", threads=2, mode="sled")
            api_port = free_port()
            c.start("gateway", "gw", api_port=api_port)
            t0 = time.monotonic()
            c.wait_ready(["est", "sch", "verifier-real", "drafter-sled", "gw"], timeout_s=900)
            print(f"\nservices ready in {time.monotonic() - t0:.0f} s")
            out.results["sled"], out.batches["sled"] = _run_mode(c, r, "drafter-sled",
                                                                 out.requests["sled"])
            out.api = _ask_api(f"http://127.0.0.1:{api_port}/v1")
            c.kill("drafter-sled")

            # centralized: the target alone, one forward per token: short requests only
            c.start("drafter", "drafter-central", mode="centralized")
            c.wait_ready(["drafter-central"], timeout_s=900)
            out.results["centralized"], out.batches["centralized"] = _run_mode(
                c, r, "drafter-central", out.requests["centralized"])
            c.kill("drafter-central")

            # wisp: learned controller on the drafter, SLO-aware batching on the scheduler
            c.kill("sch")
            c.start("scheduler", "sch-wisp", mode="wisp")
            c.start("drafter", "drafter-wisp", threads=2, mode="wisp")
            c.wait_ready(["sch-wisp", "drafter-wisp"], timeout_s=900)
            out.results["wisp"], out.batches["wisp"] = _run_mode(c, r, "drafter-wisp",
                                                                 out.requests["wisp"])
            out.logs = {n: c.log(n) for n in ("drafter-wisp", "verifier-real")}
        # the with-block stopped every service process before the reference is loaded
        yield out
    finally:
        c.stop()
        keys = list(r.scan_iter(match=f"{ns}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


@pytest.fixture(scope="module")
def reference(served: Served) -> dict[str, tuple[list[int], list[int]]]:
    """Per prompt: (prompt ids, target greedy output for the largest budget it was served
    with), both computed without WISP's code. A smaller budget's output is a prefix of it
    (greedy decoding does not depend on the budget)."""
    t0 = time.monotonic()
    target = load_target(_target_dir())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the service processes have stopped: both cores are free
    try:
        budget: dict[str, int] = {}
        for q in (q for reqs in served.requests.values() for q in reqs):
            budget[q.prompt] = max(budget.get(q.prompt, 0), q.max_new)
        out = {}
        for prompt, n in budget.items():
            ids = chat_prompt_ids(_target_dir(), prompt)
            out[prompt] = (ids, greedy_reference(target, ids, n))
    finally:
        torch.set_num_threads(threads)
    print(f"\nreference: {time.monotonic() - t0:.0f} s")
    return out


@pytest.mark.parametrize("mode", ["sled", "wisp", "centralized"])
def test_real_pair_matches_target_greedy(served: Served, reference: dict, mode: str) -> None:
    reqs = served.requests[mode]
    results = served.results[mode]
    assert len(results) == len(reqs)
    for q, res in zip(reqs, results, strict=True):
        ids, want = reference[q.prompt]
        want = want[:q.max_new]
        assert res["prompt_token_ids"] == ids, f"{mode}/{q.kind}: prompt tokenized differently"
        assert res["token_ids"] == want, f"{mode}/{q.kind}: output differs from the target's greedy"
        assert res["streamed"] == want, f"{mode}/{q.kind}: the client was streamed other tokens"
        assert res["mode"] == mode
        if mode == "centralized":
            # server runs: tokens come back in verdicts of one or more (one per ~400 ms forward)
            assert res["drafted_tokens"] == 0 and 1 <= res["rounds"] <= len(res["token_ids"])
        else:
            assert res["drafted_tokens"] > 0


def test_the_openai_api_answers_with_the_targets_greedy_ids(served: Served, reference: dict) -> None:
    """The same EOS prompt through the HTTP API (a one-message chat) and the official client:
    the same prompt ids and the target's own greedy answer, ending on its EOS."""
    ids, want = reference[EOS_PROMPT]
    got = served.api
    assert got["prompt_token_ids"] == ids, "the API's chat prompt was tokenized differently"
    assert got["token_ids"] == want, "the API's answer differs from the target's greedy output"
    assert got["finish_reason"] == "stop" and got["mode"] == "sled" and got["text"]


def test_long_request_and_eos_request(served: Served, reference: dict) -> None:
    """The long request really ran its 128 tokens; the EOS one stopped on the target's EOS, well
    before its budget, in every mode (the same tokens: checked above)."""
    eos_id = json.loads((_target_dir() / "generation_config.json").read_text())["eos_token_id"]
    eos_ids = set(eos_id if isinstance(eos_id, list) else [eos_id])
    for mode in ("sled", "wisp", "centralized"):
        for q, res in zip(served.requests[mode], served.results[mode], strict=True):
            if q.kind == "long":
                assert len(res["token_ids"]) == LONG and res["finish_reason"] == "length", (mode, res)
                assert not eos_ids & set(res["token_ids"])
                assert res["rounds"] < LONG // 2, (mode, res["rounds"])  # speculation paid off
            if q.kind == "eos":
                assert res["finish_reason"] == "stop", (mode, res["finish_reason"])
                assert res["token_ids"][-1] in eos_ids and len(res["token_ids"]) <= q.max_new // 2
                assert reference[q.prompt][1] == res["token_ids"]  # the target stops there too


@pytest.mark.parametrize("mode", ["sled", "wisp", "centralized"])
def test_verifier_verified_padded_batches(served: Served, mode: str) -> None:
    """Concurrent requests were verified together: batches of several rounds whose rows have
    different cached lengths (the verifier left-pads their KV) or different numbers of new
    tokens (it right-pads them; first rounds of concurrent requests feed whole prompts of
    different lengths on an empty cache)."""
    batches = served.batches[mode]
    assert batches, f"{mode}: no TimingSample on the stats stream"
    multi = [b for b in batches if len(b["new_tokens"]) >= 2]
    padded = [b for b in multi if len(set(b["context_lens"])) > 1 or len(set(b["new_tokens"])) > 1]
    print(f"{mode}: {len(batches)} batches, {len(multi)} with >= 2 rounds, sizes "
          f"{sorted({len(b['new_tokens']) for b in batches})}")
    # measured: 2 to 5 such batches in sled and in wisp mode, 7 to 16 in centralized (the
    # requests are admitted one by one, then drafting and verifying alternate in two groups, and
    # the short ones end after a few rounds; the long one then runs alone). A run once had only
    # one batch with different cached lengths in wisp mode, beside a batch of three first rounds
    # (prompts of 41, 59 and 125 tokens): both are padded batches.
    # wisp mode's SLO-aware batcher sends a round alone when waiting would not help its (loose)
    # deadline, so how many rounds meet in a batch depends on how fast drafting is: with the
    # llama.cpp drafter on a machine at load 4-6, 27 of 28 batches held one round (one padded
    # batch of two first rounds). One padded batch still exercises the padding.
    want = 1 if mode == "wisp" else 2
    assert len(padded) >= want, (mode, [(b["new_tokens"], b["context_lens"]) for b in batches])
    if mode == "wisp":  # the SLO-aware batcher mixes drafts of different lengths
        assert any(len(set(b["new_tokens"])) > 1 for b in multi)  # ragged drafts in one batch
    else:
        # the baselines' FCFS is padding-aware: a prefill (a first round feeds its whole
        # prompt, 30+ ids here) never pads a decode round (<= 8 ids) to its length
        mixed = [b["new_tokens"] for b in multi
                 if max(b["new_tokens"]) > 16 and min(b["new_tokens"]) <= 8]
        assert not mixed, (mode, mixed)
    if mode != "centralized":
        assert any(max(b["new_tokens"]) >= 3 for b in multi)  # drafted tokens, not just decodes
    rounds = sum(r["rounds"] for r in served.results[mode])
    assert sum(len(b["new_tokens"]) for b in batches) >= rounds  # every round was verified


def test_wisp_used_the_shipped_controller_and_sled_accepts(served: Served) -> None:
    log = served.logs["drafter-wisp"]
    assert "learned speculation controller" in log  # the shipped one, not a fallback
    assert "falling back" not in log
    assert "Traceback" not in served.logs["verifier-real"]
    sled = served.results["sled"]
    accepted = sum(s["accepted_tokens"] for s in sled)
    drafted = sum(s["drafted_tokens"] for s in sled)
    assert accepted / drafted > 0.3  # the real pair agrees often (measured: ~0.6 at k=4)
