"""Property-based bad input: malformed, truncated, oversized, wrong-version and wrong-type
messages thrown at every consumer of a running system (real processes, real Redis, tiny models).
Every invalid one lands in `wisp:dead` with its reason, and the good traffic around it is served."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wisp.protocol import (
    AnnotatedBlock,
    DeadLetter,
    DraftBlock,
    GenerateRequest,
    ProtocolError,
    TimingSample,
    Verdict,
    VerifyBatch,
    decode,
)
from wisp.protocol.base import MAX_PAYLOAD_BYTES

from tests.harness import Cluster, submit_json

BLOCK = {"request_id": "r" * 12, "device": "d", "round": 0, "base_committed_len": 3,
         "prompt_len": 3, "committed_digest": "0" * 16, "draft_tokens": [1, 2],
         "request_ts": 1.0, "sent_ts": 1.0, "ttft_slo_ms": 100.0, "tpot_slo_ms": 10.0}
VALID: dict[str, tuple[type, dict[str, Any]]] = {
    "req": (GenerateRequest, {"request_id": "x" * 16, "prompt": "hi", "submitted_ts": 1.0}),
    "draft": (DraftBlock, BLOCK),
    "annotated": (AnnotatedBlock, {"block": BLOCK, "predicted_verify_ms": 1.0,
                                   "estimator_version": 0, "annotated_ts": 1.0}),
    "batch:v": (VerifyBatch, {"batch_id": "b1", "verifier": "v", "created_ts": 1.0,
                              "items": [{"block": BLOCK, "predicted_verify_ms": 1.0,
                                         "estimator_version": 0, "annotated_ts": 1.0}]}),
    "verdict:d": (Verdict, {"request_id": "r" * 12, "round": 0, "base_committed_len": 3,
                            "drafted": 2, "accepted": 1, "tokens": [1, 5], "batch_id": "b",
                            "verifier": "v", "batch_size": 1, "verify_ms": 1.0}),
    "stats": (TimingSample, {"verifier": "v", "batch_id": "b", "new_tokens": [3],
                             "context_lens": [2], "draft_lens": [2], "measured_ms": 5.0, "ts": 1.0}),
}
WRONG_TYPES = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.floats(allow_nan=True),
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                             st.integers(), max_size=2))


@st.composite
def malformed(draw: st.DrawFn, stream: str) -> bytes:
    _, valid = VALID[stream]
    kind = draw(st.sampled_from(["bytes", "truncate", "drop", "retype", "version", "extra", "json"]))
    if kind == "bytes":
        return draw(st.binary(min_size=0, max_size=300))
    if kind == "json":
        return json.dumps(draw(st.one_of(WRONG_TYPES, st.lists(WRONG_TYPES, max_size=3)))).encode()
    obj = json.loads(json.dumps(valid))
    key = draw(st.sampled_from(sorted(obj)))
    if kind == "truncate":
        raw = json.dumps(obj).encode()
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "drop":
        obj.pop(key)
    elif kind == "retype":
        obj[key] = draw(WRONG_TYPES)
    elif kind == "version":
        obj["version"] = draw(st.integers(2, 10**6))
    else:
        obj[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in obj))] = 1
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def system(redis_url: str, tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Cluster]:
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    c = Cluster(redis_url, ns, tmp_path_factory.mktemp("fuzz"),
                settings={"target_model": target, "draft_model": draft, "max_wait_ms": 5})
    with c:
        for role, name in (("estimator", "e"), ("scheduler", "s"), ("verifier", "v"),
                           ("drafter", "d")):
            c.start(role, name)
        c.wait_ready(["e", "s", "v", "d"])
        yield c
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=f"{ns}:*"))
    if keys:
        r.delete(*keys)


SENT: dict[str, int] = {}


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_consumer_dead_letters_bad_input_and_keeps_serving(system: Cluster, data: st.DataObject
                                                                ) -> None:
    r = redis.Redis.from_url(system.redis_url)
    for stream, (model, _) in VALID.items():
        payload = data.draw(malformed(stream), label=stream)
        try:
            decode(model, payload)
            continue  # the mutation happened to stay valid: not bad input
        except ProtocolError:
            pass
        r.xadd(f"{system.namespace}:{stream}", {"d": payload})
        SENT[stream] = SENT.get(stream, 0) + 1


def test_dead_letters_have_reasons_and_good_traffic_flows(system: Cluster) -> None:
    r = redis.Redis.from_url(system.redis_url)
    ns = system.namespace
    r.xadd(f"{ns}:draft", {"d": b"{" + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}"})  # oversized
    r.xadd(f"{ns}:req", {"wrong-field": b"x"})  # no payload field at all
    # wisp:stats has two consumer groups (estimator, scheduler): each dead-letters its copy
    expected = sum(SENT.values()) + SENT.get("stats", 0) + 2
    assert sum(SENT.values()) >= 30  # hypothesis really sent bad input to the streams
    deadline = time.monotonic() + 60
    while r.xlen(f"{ns}:dead") < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    dead = [decode(DeadLetter, f[b"d"]) for _, f in r.xrange(f"{ns}:dead")]
    assert len(dead) == expected
    assert all(d.reason and d.stream.startswith(ns) for d in dead)
    by_stream = {s: sum(1 for d in dead if d.stream == f"{ns}:{s}") for s in VALID}
    for s, n in SENT.items():
        assert by_stream[s] == n * (2 if s == "stats" else 1) + (s in ("draft", "req")), (s, by_stream)
    assert any("exceeds" in d.reason for d in dead)
    assert any("unsupported protocol version" in d.reason for d in dead)
    # every service is still alive and serving
    out = submit_json("Name three colours.", system.env(), "--max-new-tokens", "8")
    assert len(out["token_ids"]) == 8
    for name in ("e", "s", "v", "d"):
        assert system.procs[name].poll() is None
        assert "Traceback" not in system.log(name)
