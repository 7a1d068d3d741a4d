"""Server runs through the real services (tiny pair, separate processes, a real Redis).

Centralized serving hands a whole request to the verifier, which decodes it in its continuous
batch and streams its tokens back as verdicts (those made in the last 200 ms each), with no
drafter round trip per token (``wisp.policy.server_run``). What must hold, and how each check
could fail:

* the output is the target's own greedy output (tokenized independently), with server runs and
  without (``server_run_rounds = 0``, the default: one round trip per token); a seeded sampled
  request draws what the run's position-seeded sampler draws; the client is streamed exactly
  the final tokens;
* the pipeline really was skipped: one draft block per request on the draft stream (without
  runs: one per token), fewer verdicts than tokens, and the verifier stepped the runs in
  forwards of its own;
* a verifier killed in the middle of a run (SIGKILL): the drafter re-sends the round in flight
  after ``round_timeout_s`` and another verifier finishes the request, output unchanged;
* a verifier stopped (SIGTERM, a rolling upgrade) in the middle of a run gives its runs back:
  the request finishes on another verifier with no re-send;
* a run whose session record is gone (given up, expired) is dropped within the verifier's sweep;
* wisp mode's adaptive site choice hands a slow device's sessions to the server and probes
  them again after each run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from wisp.data import mixed_prompts

from tests.harness import Cluster, clean_namespace, collect, spawn_submit, submit_json
from tests.reference import chat_prompt_ids, greedy_reference, load_target, mass_between

MAX_NEW = 24


def _draft_blocks(r: redis.Redis, ns: str) -> Counter[str]:
    """Draft blocks published per device."""
    return Counter(json.loads(f[b"d"])["device"] for _, f in r.xrange(f"{ns}:draft"))


def _run_steps(r: redis.Redis, ns: str) -> Counter[str]:
    """Forwards a verifier ran for its server runs alone, per verifier."""
    return Counter(s["verifier"] for s in (json.loads(f[b"d"]) for _, f in r.xrange(f"{ns}:stats"))
                   if ":run:" in s["batch_id"])


def _orphan_is_dropped(c: Cluster, r: redis.Redis, ns: str, device: str) -> float:
    """A session that ends otherwise than by EOS, length or cancel (its drafter gave it up, or
    its record expired) has no record: the verifier must drop its run within its sweep (2 s)
    instead of decoding for nobody until its last round. Returns how long that took."""
    p = spawn_submit("Tell me everything about lighthouses.", c.env(), "--max-new-tokens",
                     "2000", "--timeout", "60", "--device", device)
    try:
        def runs() -> int:
            return json.loads(r.get(f"{ns}:hb:verifier:v") or b"{}").get("server_runs", -1)

        deadline = time.monotonic() + 30
        while runs() != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runs() == 1, "the long request's run never showed in the verifier's heartbeat"
        keys = list(r.scan_iter(match=f"{ns}:sess:*"))
        assert len(keys) == 1, "the long request ended before its run could be orphaned"
        (key,) = keys
        r.delete(key)
        t0 = time.monotonic()
        while runs() != 0 and time.monotonic() - t0 < 15:
            time.sleep(0.1)
        assert runs() == 0, "a run whose session is gone went on"
        return time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_centralized_runs_on_the_server_lossless_and_without_round_trips(
        redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    target, _ = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    prompts = [p.text for p in mixed_prompts(6)]
    # every verifier forward sleeps 5 ms more (fault injection): a tiny target's run of 2,000
    # tokens then lasts long enough to be caught resident (the orphan check)
    c = Cluster(redis_url, ns, tmp_path, settings={"mode": "centralized", "target_model": target,
                                                   "max_wait_ms": 5, "fault_delay_ms": 5})
    r = redis.Redis.from_url(redis_url)
    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v")):
                c.start(role, name)
            c.start("drafter", "runs", server_run_rounds=32)
            c.start("drafter", "hops", server_run_rounds=0)
            c.wait_ready(["e", "s", "v", "runs", "hops"])
            env = c.env()

            def ask(device: str, *extra: str) -> list[dict]:
                with ThreadPoolExecutor(6) as pool:
                    return list(pool.map(lambda p: submit_json(
                        p, env, "--max-new-tokens", str(MAX_NEW), "--device", device, *extra),
                        prompts))

            runs, hops = ask("runs"), ask("hops")
            rids = [f"{ns}-s{i}" for i in range(len(prompts))]
            runs_s = _sampled(redis_url, ns, "runs", prompts, rids)
            blocks, steps = _draft_blocks(r, ns), _run_steps(r, ns)
            # the same seeded requests (new ids) a round trip per token: the same draws
            hops_s = _sampled(redis_url, ns, "hops", prompts[:3],
                              [f"{ns}-h{i}" for i in range(3)])
            print(f"\norphaned run dropped {_orphan_is_dropped(c, r, ns, 'runs'):.1f} s after "
                  "its session record was deleted")
        ref = load_target(target)
        for prompt, a, b in zip(prompts, runs, hops, strict=True):
            ids = chat_prompt_ids(target, prompt)
            assert a["prompt_token_ids"] == ids
            assert a["token_ids"] == greedy_reference(ref, ids, MAX_NEW) == b["token_ids"]
            assert a["mode"] == "centralized" and a["drafted_tokens"] == 0
            assert b["rounds"] == len(b["token_ids"])  # without runs: a round trip per token
            assert a["rounds"] < len(a["token_ids"])  # runs: verdicts of several tokens
        exact = 0
        sampled = [*zip(prompts, rids, runs_s, strict=True),
                   *zip(prompts[:3], [f"hops-{i}" for i in range(3)], hops_s, strict=True)]
        for prompt, rid, a in sampled:
            ids = chat_prompt_ids(target, prompt)
            want = _seeded_run(ref, ids, len(a["token_ids"]))
            got = a["token_ids"]
            # the run's seeded draws; a full-prefix forward rounds differently from the
            # verifier's cached, batched one, which can move a draw that falls on the boundary
            # between two tokens (inverse-CDF sampling in vocabulary order: the ids between
            # them hold next to no mass); a wrong sampler (another round's, or none) differs
            # from the first token on
            first = next((i for i, (x, y) in enumerate(zip(got, want, strict=True)) if x != y), None)
            if first is None:
                exact += 1
            else:
                between = mass_between(ref, ids + got[:first], got[first], want[first], TEMPERATURE)
                # (a flip may hit the first token too: a CI run flipped 14415 to 14418, 1.7e-9
                # of mass between them; a wrong sampler lands anywhere in a near-uniform vocab)
                assert between < 1e-3, (rid, first, between, got, want)
            assert a["streamed"] == got  # streamed token by token, nothing lost
        assert exact >= len(sampled) // 2, exact
        assert len({tuple(a["token_ids"]) for a in runs_s}) > 1  # really sampled
        tokens = sum(len(x["token_ids"]) for x in hops)
        # with runs: one block per request (the first round asks for the rest); without: a
        # block per token
        assert blocks["runs"] == 2 * len(prompts), blocks
        assert blocks["hops"] == tokens, (blocks, tokens)
        assert steps["v"] > 0, steps  # forwards of the runs alone, between batches
    finally:
        r.close()
        clean_namespace(redis_url, ns)


TEMPERATURE, SEED = 0.5, 1234


def _seeded_run(model: object, prompt_ids: list[int], n: int) -> list[int]:
    """What a centralized request samples: its first token in round 0 (an undrafted round), every
    later one in the server run, each with the "decode" sampler seeded by its prefix. The
    target's logits come from a plain forward over the whole prefix."""
    import torch
    from wisp.protocol import digest_ids
    from wisp.specdec import accept, round_generator

    ids = list(prompt_ids)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1:].float()  # type: ignore[operator]
            gen = round_generator(SEED, digest_ids(ids), "decode")
            _, tok = accept(logits, [], None, TEMPERATURE, gen)
            out.append(tok)
            ids.append(tok)
    return out


def _sampled(url: str, ns: str, device: str, prompts: list[str], rids: list[str]) -> list[dict]:
    """Seeded sampled requests with these request ids (the Python client, as `wisp-cli submit`
    uses it); each result with ``streamed``: the token ids the client received."""
    from wisp.bus import Bus, Keys, wait_for_redis
    from wisp.client import submit
    from wisp.protocol import TokenEvent

    async def main() -> list[dict]:
        client = await wait_for_redis(url)
        bus = Bus(client, Keys(ns))

        async def one(prompt: str, rid: str) -> dict:
            streamed: list[int] = []

            def on(ev: object) -> None:
                if isinstance(ev, TokenEvent):
                    streamed.extend(ev.token_ids)

            done = await submit(bus, prompt, device=device, on_event=on, idle_timeout_s=120,
                                max_new_tokens=MAX_NEW, temperature=TEMPERATURE, seed=SEED,
                                request_id=rid)
            return {**done.model_dump(), "streamed": streamed}

        try:
            return list(await asyncio.gather(*(one(p, q) for p, q in zip(prompts, rids, strict=True))))
        finally:
            await client.aclose()

    return asyncio.run(main())


def _stats_mark(r: redis.Redis, ns: str) -> str:
    last = r.xrevrange(f"{ns}:stats", count=1)
    return last[0][0].decode() if last else "0-0"


def _holder(r: redis.Redis, ns: str, since: str = "0-0", timeout_s: float = 60.0) -> str:
    """The verifier that runs a server run now (its own forwards on the stats stream, after
    entry ``since``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = Counter(s["verifier"] for s in (json.loads(f[b"d"]) for _, f in
                                                r.xrange(f"{ns}:stats", min=f"({since}"))
                        if ":run:" in s["batch_id"])
        if steps:
            return steps.most_common(1)[0][0]
        time.sleep(0.05)
    raise AssertionError("no verifier ran a server run")


def test_a_verifier_lost_in_the_middle_of_a_run_loses_nothing(
        redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Three verifiers; a long request's run is interrupted twice: its verifier is killed
    (SIGKILL: the drafter re-sends the round in flight after round_timeout_s), then the next
    holder is stopped (SIGTERM: it gives the run back at once, no re-send). Each verifier
    forward sleeps 40 ms more (fault injection) so a run lasts seconds. Output: the target's
    greedy tokens both times."""
    target, _ = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    long = 120
    c = Cluster(redis_url, ns, tmp_path, settings={
        "mode": "centralized", "target_model": target, "max_wait_ms": 5, "fault_delay_ms": 40,
        "round_timeout_s": 6.0, "heartbeat_ttl_s": 3, "server_run_rounds": 32})
    r = redis.Redis.from_url(redis_url)
    prompts = {"sigkill": "Write a long story about a lighthouse keeper.",
               "sigterm": "Write a long poem about the sea and its ships."}
    got: dict[str, dict] = {}
    try:
        with c:
            verifiers = ["v1", "v2", "v3"]
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("drafter", "d"),
                               *(("verifier", v) for v in verifiers)):
                c.start(role, name)
            c.wait_ready(["e", "s", "d", *verifiers])
            for how, sig in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
                log_from = len(c.log("d"))
                mark = _stats_mark(r, ns)
                p = spawn_submit(prompts[how], c.env(), "--max-new-tokens", str(long))
                holder = _holder(r, ns, since=mark)
                time.sleep(1.0)  # well into the run
                t0 = time.monotonic()
                c.kill(holder, sig)
                got[how] = collect(p, timeout=120)
                resent = "publishing it again" in c.log("d")[log_from:]
                print(f"\n{how}: {holder} stopped; the request finished "
                      f"{time.monotonic() - t0:.1f} s later; re-sent: {resent}")
                # SIGKILL: recovered by the re-send; SIGTERM: the run came back with no re-send
                assert resent == (how == "sigkill"), c.log("d")[log_from:][-2000:]
        ref = load_target(target)
        for how, res in got.items():
            ids = chat_prompt_ids(target, prompts[how])
            assert res["token_ids"] == greedy_reference(ref, ids, long), how
    finally:
        r.close()
        clean_namespace(redis_url, ns)


def test_a_slow_device_hands_its_sessions_to_the_server_and_stays_lossless(
        redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """wisp mode with the adaptive site choice (``WISP_SITE=adaptive``) on a device whose every
    draft forward takes 300 ms more (fault injection): once its draft speed is measured (round
    1) and the scheduler has published the server's costs, its sessions go to the server in
    server runs, probed with a drafted round after each. Output: the target's greedy tokens.
    (A device without the delay went to the server too, on a 2-core machine: a tiny target
    decodes a token faster than a round trip through the four services takes, so no test here
    shows a device that keeps drafting; the choice itself is tested in test_sim_site.py.)"""
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    n_new = 48
    prompts = [p.text for p in mixed_prompts(3)]
    c = Cluster(redis_url, ns, tmp_path, settings={
        "mode": "wisp", "target_model": target, "draft_model": draft, "max_wait_ms": 5,
        "site": "adaptive", "draft_k": 4})
    r = redis.Redis.from_url(redis_url)
    try:
        with c:
            for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v")):
                c.start(role, name)
            c.start("drafter", "slow", fault_draft_delay_ms=300)
            c.wait_ready(["e", "s", "v", "slow"])
            env = c.env()
            submit_json("warm up", env, "--max-new-tokens", "2", "--device", "slow")  # costs
            with ThreadPoolExecutor(6) as pool:
                res = {"slow": list(pool.map(lambda p: submit_json(
                    p, env, "--max-new-tokens", str(n_new), "--device", "slow"), prompts))}
            blocks = [json.loads(f[b"d"]) for _, f in r.xrange(f"{ns}:draft")]
        ref = load_target(target)
        for prompt, a in zip(prompts, res["slow"], strict=True):
            ids = chat_prompt_ids(target, prompt)
            assert a["token_ids"] == greedy_reference(ref, ids, n_new)
            assert a["mode"] == "wisp" and a["drafted_tokens"] > 0
        runs = Counter(b["device"] for b in blocks if b.get("server_rounds", 0) > 0)
        drafted = Counter(b["device"] for b in blocks if b["draft_tokens"])
        print(f"\nserver runs started: {dict(runs)}; drafted rounds: {dict(drafted)}")
        assert runs["slow"] >= len(prompts), (runs, drafted)  # every session went to the server
        # ... after its first drafted round measured the device, and was probed again with a
        # drafted round after its first run of 32 server-made tokens (48 = 1 + 2..5 + 32 + ...)
        assert drafted["slow"] >= 2 * len(prompts), (runs, drafted)
    finally:
        r.close()
        clean_namespace(redis_url, ns)
