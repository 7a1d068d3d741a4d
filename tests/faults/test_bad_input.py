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
         "committed_digest": "0" * 16, "draft_tokens": [1, 2], "sent_ts": 1.0}
VALID: dict[str, tuple[type, dict[str, Any]]] = {
    "req": (GenerateRequest, {"request_id": "x" * 16, "prompt": "hi", "submitted_ts": 1.0}),
    "draft": (DraftBlock, BLOCK),
    "annotated": (AnnotatedBlock, {"block": BLOCK, "predicted_verify_ms": 1.0,
                                   "model_key": "m", "annotated_ts": 1.0}),
    "batch:v": (VerifyBatch, {"batch_id": "b1", "verifier": "v", "created_ts": 1.0,
                              "items": [{"block": BLOCK, "predicted_verify_ms": 1.0,
                                         "model_key": "m", "annotated_ts": 1.0}]}),
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


GROUPS = {"stats": 2}
"""Consumer groups per stream: wisp:stats has two (estimator, scheduler), each dead-letters its
own copy of a bad entry; every other stream has one."""


def _dead_mark(r: redis.Redis, ns: str) -> str:
    """The id of the last dead letter so far (what came before belongs to other tests)."""
    last = r.xrevrange(f"{ns}:dead", count=1)
    return last[0][0].decode() if last else "0-0"


def _dead_letters_for(r: redis.Redis, ns: str, sent: dict[tuple[str, str], str], mark: str,
                      timeout_s: float = 60.0) -> dict[tuple[str, str], list[DeadLetter]]:
    """The dead letters of exactly the entries this test wrote (``sent``: (stream, entry id) ->
    short stream name), waiting until every group has dead-lettered its copy. Matching on the
    entry id makes each test independent of what other tests put into wisp:dead; every dead
    letter since ``mark`` must be one of them (bad input must not cause others)."""
    want = {key: GROUPS.get(short, 1) for key, short in sent.items()}
    deadline = time.monotonic() + timeout_s
    while True:
        mine: dict[tuple[str, str], list[DeadLetter]] = {}
        others = []
        for _, f in r.xrange(f"{ns}:dead", min=f"({mark}"):
            d = decode(DeadLetter, f[b"d"])
            if (d.stream, d.entry_id) in sent:
                mine.setdefault((d.stream, d.entry_id), []).append(d)
            else:
                others.append(d)
        if all(len(mine.get(k, [])) >= n for k, n in want.items()) or time.monotonic() > deadline:
            assert not others, f"dead letters for entries this test did not write: {others}"
            return mine
        time.sleep(0.2)


def _check_dead(mine: dict[tuple[str, str], list[DeadLetter]], sent: dict[tuple[str, str], str]) -> None:
    missing = {sent[k]: 0 for k in sent}
    for key, short in sent.items():
        got = mine.get(key, [])
        if len(got) != GROUPS.get(short, 1):
            missing[short] += 1
        assert len({d.group for d in got}) == len(got), ("dead-lettered twice by one group", got)
        assert all(d.reason and d.consumer for d in got), got
    assert not any(missing.values()), f"bad entries not dead-lettered (per stream): {missing}"


def _still_serving(system: Cluster) -> None:
    out = submit_json("Name three colours.", system.env(), "--max-new-tokens", "8")
    assert len(out["token_ids"]) == 8
    for name in ("e", "s", "v", "d"):
        assert system.procs[name].poll() is None, f"{name} died"
        assert "Traceback" not in system.log(name), system.log(name)[-3000:]


def test_every_consumer_dead_letters_bad_input_and_keeps_serving(system: Cluster) -> None:
    r = redis.Redis.from_url(system.redis_url)
    ns = system.namespace
    mark = _dead_mark(r, ns)
    sent: dict[tuple[str, str], str] = {}

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def throw(data: st.DataObject) -> None:
        for stream, (model, _) in VALID.items():
            payload = data.draw(malformed(stream), label=stream)
            try:
                decode(model, payload)
                continue  # the mutation happened to stay valid: not bad input
            except ProtocolError:
                pass
            eid = r.xadd(f"{ns}:{stream}", {"d": payload}).decode()
            sent[(f"{ns}:{stream}", eid)] = stream

    throw()
    assert len(sent) >= 30  # hypothesis really sent bad input to the streams
    assert set(sent.values()) == set(VALID)  # to every consumer
    _check_dead(_dead_letters_for(r, ns, sent, mark), sent)
    _still_serving(system)


def test_dead_letters_have_reasons_and_good_traffic_flows(system: Cluster) -> None:
    r = redis.Redis.from_url(system.redis_url)
    ns = system.namespace
    mark = _dead_mark(r, ns)
    cases = {  # what each bad entry is, and the reason its dead letter must give
        "draft": (b"{" + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}", "exceeds"),  # oversized
        "stats": (json.dumps({**VALID["stats"][1], "version": 999}).encode(),
                  "unsupported protocol version"),
        "verdict:d": (b'{"kind": "verdict", "request_id": ', "json"),  # truncated
    }
    sent: dict[tuple[str, str], str] = {}
    reasons: dict[tuple[str, str], str] = {}
    for stream, (payload, reason) in cases.items():
        eid = r.xadd(f"{ns}:{stream}", {"d": payload}).decode()
        sent[(f"{ns}:{stream}", eid)] = stream
        reasons[(f"{ns}:{stream}", eid)] = reason
    eid = r.xadd(f"{ns}:req", {"wrong-field": b"x"}).decode()  # no payload field at all
    sent[(f"{ns}:req", eid)] = "req"
    reasons[(f"{ns}:req", eid)] = "missing payload"
    mine = _dead_letters_for(r, ns, sent, mark)
    _check_dead(mine, sent)
    for key, reason in reasons.items():
        assert all(reason in d.reason.lower() for d in mine[key]), (reason, mine[key])
    assert all(d.stream.startswith(ns) for ds in mine.values() for d in ds)
    _still_serving(system)


def _with(stream: str, **changes: Any) -> bytes:
    return json.dumps({**VALID[stream][1], **changes}).encode()


POISON = {  # schema-shaped messages that are still wrong, and the reason their dead letter gives
    "NaN probability": ("draft", _with("draft", draft_tokens=[1], draft_dists=[
        {"token_ids": [1], "probs": [float("nan")]}]), "finite"),
    "token twice in a distribution": ("draft", _with("draft", draft_tokens=[1], draft_dists=[
        {"token_ids": [1, 1], "probs": [0.5, 0.5]}]), "twice"),
    "mass 5e-4 off": ("draft", _with("draft", draft_tokens=[1], draft_dists=[
        {"token_ids": [1, 2], "probs": [0.5, 0.5005]}]), "sum to"),
    "draft token outside its distribution": ("draft", _with("draft", draft_tokens=[3], draft_dists=[
        {"token_ids": [1, 2], "probs": [0.5, 0.5]}]), "no probability"),
    "negative token id": ("draft", _with("draft", draft_tokens=[-1]), "greater than or equal"),
    "accepted more than drafted": ("verdict:d", _with("verdict:d", drafted=1, accepted=2,
                                                      tokens=[1, 2, 3]), "accepted 2 of only 1"),
    "a number as a string": ("req", _with("req", ttft_slo_ms="100"), "valid number"),
    "huge speculation": ("req", _with("req", speculation=10**9), "less than or equal to 64"),
    "infinite SLO": ("req", _with("req", tpot_slo_ms=float("inf")), "finite"),
    "NaN measured time": ("stats", _with("stats", measured_ms=float("nan")), "finite"),
}


def test_schema_shaped_poison_is_dead_lettered_with_its_reason(system: Cluster) -> None:
    """Messages that parse as JSON of the right shape but are wrong (NaN or infinite numbers,
    a distribution naming a token twice or summing off 1, a verdict accepting more than was
    drafted, a number sent as a string, an unbounded draft length) are refused where they enter,
    with a reason, instead of failing inside a handler (a poisoned distribution used to pass the
    verifier's check, raise in rejection sampling and be retried for ever)."""
    r = redis.Redis.from_url(system.redis_url)
    ns = system.namespace
    mark = _dead_mark(r, ns)
    sent: dict[tuple[str, str], str] = {}
    reasons: dict[tuple[str, str], tuple[str, str]] = {}
    for what, (stream, payload, reason) in POISON.items():
        eid = r.xadd(f"{ns}:{stream}", {"d": payload}).decode()
        sent[(f"{ns}:{stream}", eid)] = stream
        reasons[(f"{ns}:{stream}", eid)] = (what, reason)
    mine = _dead_letters_for(r, ns, sent, mark)
    _check_dead(mine, sent)
    for key, (what, reason) in reasons.items():
        assert all(reason in d.reason for d in mine[key]), (what, reason, mine[key])
    _still_serving(system)
