"""The OpenAI-compatible HTTP API with the official `openai` client against a running system:
the four services and the gateway in one process (``with_services``, in a thread of its own),
on a private namespace of the test Redis, with the tiny models.

- chat and completion, streamed and not: greedy token ids equal the target's own
  ``generate(do_sample=False)`` on prompt ids built with the HF tokenizer directly (a
  multi-message chat goes through the target's chat template whole);
- a stop string cuts the text and ends the request;
- bad parameters get a 400 that names the parameter; a wrong key a 401; an unknown model a 404;
- a client that disconnects mid-stream cancels its request: the drafter ends the session (its
  record gone, its terms kept), and no round of it is drafted or verified afterwards (but the
  one in flight at the cancel).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from wisp.protocol import DraftBlock, Verdict
from wisp.services.runner import ALL_ROLES, free_port, with_services
from wisp.settings import Settings

from tests.harness import clean_namespace
from tests.reference import greedy_reference, load_target

KEY = "sk-test-" + uuid.uuid4().hex
MAX_NEW = 12


@dataclass
class Running:
    base_url: str
    namespace: str
    services: list[Any]
    loop: asyncio.AbstractEventLoop

    def drafter(self) -> Any:
        return next(s for s in self.services if s.role == "drafter")

    def verifier(self) -> Any:
        return next(s for s in self.services if s.role == "verifier")


@pytest.fixture(scope="module")
def system(redis_url: str, tiny_pair: tuple[Path, Path]) -> Iterator[Running]:
    """sled mode (draft k = 4), API keys on, in a thread with its own event loop."""
    target, draft = tiny_pair
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    settings = Settings(namespace=ns, mode="sled", draft_model=str(draft), target_model=str(target),
                        max_wait_ms=2, draft_k=4, api_host="127.0.0.1", api_port=port,
                        api_keys=f"other-key,{KEY}", redis_password=None, http_port=None)
    started: Future[Running] = Future()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with with_services(settings, (*ALL_ROLES, "gateway"), redis_url=redis_url) as sys_:
                started.set_result(Running(f"http://127.0.0.1:{port}/v1", ns, sys_.services,
                                           asyncio.get_running_loop()))
                await stop.wait()
        except BaseException as err:
            if not started.done():
                started.set_exception(err)
            raise

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        running = started.result(timeout=120)
        yield running
    finally:
        if started.done() and started.exception() is None:
            running.loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        clean_namespace(redis_url, ns)


@pytest.fixture(scope="module")
def client(system: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=system.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_pair: tuple[Path, Path]) -> Any:
    return load_target(tiny_pair[0])


def _tokenizer(target: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target))


def _chat_ids(target: Path, messages: list[dict[str, str]]) -> list[int]:
    """The conversation through the target's chat template in one HF call (not WISP's path)."""
    out = _tokenizer(target).apply_chat_template(messages, add_generation_prompt=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def _wisp(obj: Any) -> dict[str, Any]:
    """The ``wisp`` extension field of a response or chunk (kept by the client as an extra)."""
    extra = getattr(obj, "model_extra", None) or {}
    return dict(extra.get("wisp") or {})


MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one, please."},
]


def test_models_lists_the_target(client: openai.OpenAI, tiny_pair: tuple[Path, Path]) -> None:
    ids = [m.id for m in client.models.list()]
    assert str(tiny_pair[0]) in ids


def test_chat_greedy_equals_the_target_streamed_and_not(
        client: openai.OpenAI, tiny_pair: tuple[Path, Path], reference: Any) -> None:
    target = tiny_pair[0]
    model = str(target)
    want_prompt = _chat_ids(target, MESSAGES)
    want = greedy_reference(reference, want_prompt, MAX_NEW)
    resp = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_NEW, temperature=0,  # type: ignore[arg-type]
        extra_body={"return_token_ids": True})
    w = _wisp(resp)
    assert w["prompt_token_ids"] == want_prompt, "the conversation was templated differently"
    assert w["token_ids"] == want, "chat output differs from the target's greedy output"
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(want_prompt)
    assert resp.usage.completion_tokens == len(want)
    assert w["mode"] == "sled" and w["rounds"] >= 1 and w["drafted"] >= w["accepted"] >= 0

    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=MAX_NEW, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == resp.choices[0].finish_reason
    assert _wisp(finals[0])["token_ids"] == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(want)


def test_completion_greedy_equals_the_target_streamed_and_not(
        client: openai.OpenAI, tiny_pair: tuple[Path, Path], reference: Any) -> None:
    target = tiny_pair[0]
    prompt = "def fibonacci(n):"
    want_prompt = [int(t) for t in _tokenizer(target)(prompt)["input_ids"]]
    want = greedy_reference(reference, want_prompt, MAX_NEW)
    resp = client.completions.create(model=target.name, prompt=prompt, max_tokens=MAX_NEW,
                                     temperature=0, extra_body={"return_token_ids": True})
    w = _wisp(resp)
    assert w["prompt_token_ids"] == want_prompt
    assert w["token_ids"] == want, "completion differs from the target's greedy output"
    assert resp.object == "text_completion"
    assert resp.usage is not None and resp.usage.prompt_tokens == len(want_prompt)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=target.name, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == resp.choices[0].text


def test_a_stop_string_cuts_the_text_and_ends_the_request(
        client: openai.OpenAI, tiny_pair: tuple[Path, Path]) -> None:
    model = str(tiny_pair[0])
    full = client.completions.create(model=model, prompt="Once upon a time", max_tokens=40,
                                     temperature=0).choices[0].text
    assert len(full) > 8
    stop = full[4:7]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop],
                stream=True) if c.choices)
        else:
            r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=40,
                                          temperature=0, stop=stop)
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
            assert r.usage is not None and 0 < r.usage.completion_tokens
        assert text == cut


@pytest.mark.parametrize(("params", "param"), [
    ({"top_p": 0.5}, "top_p"),
    ({"frequency_penalty": 0.3}, "frequency_penalty"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"n": 2}, "n"),
    ({"temperature": 3.0}, "temperature"),
    ({"logprobs": True}, "logprobs"),
    ({"extra_body": {"speculation": "sometimes"}}, "speculation"),
])
def test_bad_parameters_get_a_400_that_names_them(client: openai.OpenAI, system: Running,
                                                   tiny_pair: tuple[Path, Path],
                                                   params: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=str(tiny_pair[0]), max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}], **params)
    err = info.value
    assert err.status_code == 400
    assert isinstance(err.body, dict) and err.body.get("param") == param, err.body
    assert param in str(err.body.get("message"))


def test_a_prompt_array_gets_a_400_naming_prompt(client: openai.OpenAI,
                                                 tiny_pair: tuple[Path, Path]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=str(tiny_pair[0]), prompt=["a", "b"], max_tokens=4)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "prompt"


def test_a_wrong_key_gets_a_401_and_an_unknown_model_a_404(system: Running,
                                                           tiny_pair: tuple[Path, Path]) -> None:
    bad = openai.OpenAI(base_url=system.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model=str(tiny_pair[0]), max_tokens=4,
                                    messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=system.base_url, api_key="other-key", max_retries=0)
    with pytest.raises(openai.NotFoundError) as nf:
        good.chat.completions.create(model="gpt-4o", max_tokens=4,
                                     messages=[{"role": "user", "content": "hi"}])
    assert isinstance(nf.value.body, dict) and nf.value.body["code"] == "model_not_found"


def _entry_ms(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def _rounds(r: redis.Redis, stream: str, model: Any, rid: str) -> list[tuple[int, Any]]:
    """(Redis time in ms, message) of the entries of ``stream`` that belong to ``rid``."""
    out = []
    for eid, fields in r.xrange(stream):
        msg = model.model_validate_json(fields[b"d"])
        if msg.request_id == rid:
            out.append((_entry_ms(eid), msg))
    return out


def test_a_disconnect_mid_stream_cancels_the_request(client: openai.OpenAI, system: Running,
                                                     redis_url: str,
                                                     tiny_pair: tuple[Path, Path]) -> None:
    drafter = system.drafter()
    before = drafter.counters.get("cancelled", 0)
    stream = client.completions.create(model=str(tiny_pair[0]), prompt="Once upon a time",
                                       max_tokens=1500, temperature=0, stream=True)
    got = 0
    rid = ""
    for chunk in stream:
        rid = chunk.id.removeprefix("cmpl-")
        got += 1
        if got >= 3:
            break
    stream.close()  # the client goes away mid-stream
    assert rid
    deadline = time.monotonic() + 10
    while drafter.counters.get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the drafter never cancelled the request"
        time.sleep(0.02)
    cancelled_ms = int(time.time() * 1000)
    time.sleep(1.5)  # long enough for dozens of rounds of the tiny models had it gone on
    r = redis.Redis.from_url(redis_url)
    keys = drafter.keys
    try:
        drafts = _rounds(r, keys.draft, DraftBlock, rid)
        verdicts = _rounds(r, keys.verdict(drafter.name), Verdict, rid)
        assert drafts and verdicts, "the request never ran"
        assert not [d for ms, d in drafts if ms > cancelled_ms + 50], "rounds drafted after the cancel"
        late = [v for ms, v in verdicts if ms > cancelled_ms + 50]
        assert len(late) <= 1, f"{len(late)} rounds verified after the cancel (1 may be in flight)"
        assert len(verdicts) < 1500 // 5, "the request ran to its end"
        assert not r.exists(keys.session(rid)), "its session record is still there"
        assert r.exists(keys.terms(rid)), "its terms (the tombstone of an ended session) are gone"
    finally:
        r.close()
    assert rid not in drafter.sessions
    assert rid not in drafter.engine.sessions(), "its draft KV cache was not freed"
    verifier = system.verifier()
    assert rid in verifier.cancelled, "the verifier never heard of the cancel"
    assert rid not in verifier.engine.sessions(), "its target KV cache was not freed"


def test_a_client_that_gives_up_on_a_plain_request_cancels_it(system: Running,
                                                              tiny_pair: tuple[Path, Path]) -> None:
    """Not streamed: the client's timeout closes the connection; the request is cancelled too."""
    drafter = system.drafter()
    before = drafter.counters.get("cancelled", 0)
    impatient = openai.OpenAI(base_url=system.base_url, api_key=KEY, max_retries=0, timeout=0.6)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=str(tiny_pair[0]), prompt="Once upon a time",
                                     max_tokens=1500, temperature=0)
    deadline = time.monotonic() + 10
    while drafter.counters.get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the drafter never cancelled the request"
        time.sleep(0.02)
    assert not drafter.sessions


def _xadd(r: redis.Redis, stream: str, msg: Any) -> None:
    r.xadd(stream, {"d": msg.encode()})


def _last_event(r: redis.Redis, out: str, timeout_s: float = 10.0) -> Any:
    from wisp.protocol import OUTPUT_ADAPTER

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries = r.xrevrange(out, count=1)
        if entries:
            ev = OUTPUT_ADAPTER.validate_json(entries[0][1][b"d"])
            if ev.kind != "token":
                return ev
        time.sleep(0.02)
    raise AssertionError(f"no final event on {out}")


def test_cancels_of_unknown_finished_and_unopened_requests(system: Running, redis_url: str,
                                                           client: openai.OpenAI,
                                                           tiny_pair: tuple[Path, Path]) -> None:
    """A cancel for a request no drafter knows, or one that finished, changes nothing; one sent
    before its request reached a drafter ends it there, unopened."""
    from wisp.protocol import CancelRequest, GenerateRequest

    drafter = system.drafter()
    keys = drafter.keys
    r = redis.Redis.from_url(redis_url)
    try:
        ignored = drafter.counters.get("cancels_ignored", 0)
        finished = client.completions.create(model=str(tiny_pair[0]), prompt="Hi", max_tokens=3,
                                             temperature=0)
        for rid in (uuid.uuid4().hex, finished.id.removeprefix("cmpl-")):
            _xadd(r, keys.cancel, CancelRequest(request_id=rid, ts=time.time()))
        deadline = time.monotonic() + 10
        while drafter.counters.get("cancels_ignored", 0) < ignored + 2:
            assert time.monotonic() < deadline, "the drafter did not read the cancels"
            time.sleep(0.02)
        early = uuid.uuid4().hex
        _xadd(r, keys.cancel, CancelRequest(request_id=early, ts=time.time()))
        time.sleep(0.5)  # the drafter reads the cancel before the request arrives
        _xadd(r, keys.requests, GenerateRequest(request_id=early, prompt="Hello", max_new_tokens=50,
                                                submitted_ts=time.time()))
        ev = _last_event(r, keys.output(early))
        assert ev.kind == "error" and ev.code == "cancelled"
        assert not r.exists(keys.session(early)) and not r.exists(keys.terms(early))
        r.delete(keys.output(early))
    finally:
        r.close()
    again = client.completions.create(model=str(tiny_pair[0]), prompt="Hi", max_tokens=3,
                                      temperature=0)
    assert again.choices[0].finish_reason in ("length", "stop")
