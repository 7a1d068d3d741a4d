"""The OpenAI-compatible API's pure core (``wisp.api``): request parsing and its 400s, the
translation of WISP's events into OpenAI objects and chunks, stop strings, API keys, the rate
limiter; and the protocol additions it rides on (``GenerateRequest.messages``,
``CancelRequest``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from wisp.api import ApiError, ApiKeys, RateLimiter, Translation, error_for_event, generate_fields
from wisp.api.models import ChatCompletionRequest, CompletionRequest, parse_request
from wisp.api.translate import StopScanner, check_model, model_ids
from wisp.protocol import CancelRequest, ChatMessage, DoneEvent, ErrorEvent, GenerateRequest, TokenEvent
from wisp.settings import Settings

RID = "0123456789abcdef"


def _chat(**extra: Any) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    return json.dumps(body).encode()


def _param_of(kind: str, raw: bytes) -> tuple[int, str | None, str]:
    with pytest.raises(ApiError) as info:
        parse_request(kind, raw)  # type: ignore[arg-type]
    e = info.value
    return e.status, e.param, e.message


@pytest.mark.parametrize(("extra", "param"), [
    ({"top_p": 0.9}, "top_p"),
    ({"top_k": 40}, "top_k"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -0.5}, "frequency_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"n": 3}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"tools": []}, "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"speculation": "on"}, "speculation"),
    ({"ttft_slo_ms": 0}, "ttft_slo_ms"),
    ({"device": "no spaces allowed"}, "device"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"temperature": "hot"}, "temperature"),
])
def test_chat_parameters_are_refused_with_their_name(extra: dict[str, Any], param: str) -> None:
    status, got, message = _param_of("chat", _chat(**extra))
    assert status == 400 and got == param and message.startswith(param)


def test_lossy_sampling_parameters_say_why() -> None:
    _, _, message = _param_of("chat", _chat(top_p=0.5))
    assert "lossless" in message and "draft" in message and "target" in message


def test_neutral_values_of_refused_parameters_pass() -> None:
    req = parse_request("chat", _chat(top_p=1, top_k=-1, presence_penalty=0, frequency_penalty=0.0,
                                      logit_bias={}, logprobs=False, n=1))
    assert isinstance(req, ChatCompletionRequest)


def test_completions_take_one_string_prompt_only() -> None:
    body = {"model": "m", "prompt": ["a", "b"]}
    status, param, message = _param_of("text", json.dumps(body).encode())
    assert (status, param) == (400, "prompt") and "single string" in message
    assert _param_of("text", json.dumps({"model": "m", "prompt": [1, 2]}).encode())[1] == "prompt"
    assert _param_of("text", json.dumps({"model": "m"}).encode())[1] == "prompt"
    for extra, param in (({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
                         ({"suffix": "x"}, "suffix"), ({"logprobs": 1}, "logprobs")):
        raw = json.dumps({"model": "m", "prompt": "p", **extra}).encode()
        assert _param_of("text", raw)[1] == param
    assert isinstance(parse_request("text", b'{"model": "m", "prompt": "p"}'), CompletionRequest)


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    assert _param_of("chat", b"{nope")[0] == 400
    assert _param_of("chat", b"[1, 2]")[0] == 400


def _settings(**kw: Any) -> Settings:
    return Settings(target_model="/models/qwen-tiny", **kw)


def test_chat_becomes_a_conversation_for_the_drafter() -> None:
    req = parse_request("chat", json.dumps({
        "model": "qwen-tiny", "max_completion_tokens": 7, "seed": 3, "speculation": 2,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "two "},
                                                  {"type": "text", "text": "parts"}]},
                     {"role": "assistant", "content": ""}]}).encode())
    fields = generate_fields(req, _settings(), RID)
    assert [(m.role, m.content) for m in fields["messages"]] == [
        ("system", "be brief"), ("user", "two parts"), ("assistant", "")]
    assert fields["prompt"] == "two parts" and fields["chat_template"] is True
    assert fields["max_new_tokens"] == 7 and fields["seed"] == 3 and fields["speculation"] == 2
    assert fields["temperature"] == 1.0  # OpenAI's default, not WISP's greedy one
    GenerateRequest(request_id=RID, submitted_ts=0.0, **fields)


def test_clients_without_a_device_get_the_servers_speculation_default() -> None:
    """A cluster gateway (api_speculation=off) sends deviceless clients down the centralized
    path; a client's own choice, or a device it names, wins."""
    gw = _settings(api_speculation="off")
    plain = parse_request("text", b'{"model": "m", "prompt": "x"}')
    assert generate_fields(plain, gw, RID)["speculation"] == "off"
    assert generate_fields(plain, _settings(), RID)["speculation"] == "auto"
    own = parse_request("text", b'{"model": "m", "prompt": "x", "speculation": 3}')
    assert generate_fields(own, gw, RID)["speculation"] == 3
    named = parse_request("text", b'{"model": "m", "prompt": "x", "device": "phone"}')
    assert generate_fields(named, gw, RID)["speculation"] == "auto"


def test_completion_fields_and_limits() -> None:
    s = _settings(max_new_tokens_limit=100)
    req = parse_request("text", b'{"model": "m", "prompt": "x", "temperature": 0}')
    fields = generate_fields(req, s, RID)
    assert fields["chat_template"] is False and fields["max_new_tokens"] == 16
    assert fields["temperature"] == 0.0 and "messages" not in fields
    big = parse_request("text", b'{"model": "m", "prompt": "x", "max_tokens": 101}')
    with pytest.raises(ApiError) as info:
        generate_fields(big, s, RID)
    assert info.value.param == "max_tokens" and "100" in info.value.message


def test_a_client_cannot_buy_priority_with_a_tighter_slo_than_the_server_allows() -> None:
    """Deadlines order verification, so an SLO is a priority: API clients may loosen the
    server's floor (by default its own default SLOs), never tighten past it."""
    s = _settings(api_min_ttft_slo_ms=2_000.0, api_min_tpot_slo_ms=200.0)
    for body, param in ((b'{"model": "m", "prompt": "x", "ttft_slo_ms": 1}', "ttft_slo_ms"),
                        (b'{"model": "m", "prompt": "x", "tpot_slo_ms": 199.5}', "tpot_slo_ms")):
        with pytest.raises(ApiError) as info:
            generate_fields(parse_request("text", body), s, RID)
        assert info.value.status == 400 and info.value.param == param
        assert "tighter than this server allows" in info.value.message
    ok = parse_request("text", b'{"model": "m", "prompt": "x", "ttft_slo_ms": 2000, '
                       b'"tpot_slo_ms": 5000}')
    fields = generate_fields(ok, s, RID)
    assert (fields["ttft_slo_ms"], fields["tpot_slo_ms"]) == (2000, 5000)


def test_model_ids_are_the_target_alias_and_unknown_ones_are_404() -> None:
    s = _settings()
    assert model_ids(s) == ["/models/qwen-tiny", "qwen-tiny"]
    assert model_ids(Settings(target_model="qwen-coder-1.5b")) == ["qwen-coder-1.5b"]
    check_model(parse_request("text", b'{"model": "qwen-tiny", "prompt": "x"}'), s)
    with pytest.raises(ApiError) as info:
        check_model(parse_request("text", b'{"model": "gpt-4", "prompt": "x"}'), s)
    assert (info.value.status, info.value.code) == (404, "model_not_found")


def test_error_events_map_to_statuses() -> None:
    def of(code: str) -> ApiError:
        return error_for_event(ErrorEvent(request_id=RID, error="why", code=code))

    assert of("bad_request").status == 400
    overloaded = of("overloaded")
    assert overloaded.status == 503 and "Retry-After" in overloaded.headers()
    assert of("internal").status == 500
    body = of("bad_request").body()["error"]
    assert set(body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("pieces", "stops", "sent", "stopped"), [
    (["Hello wor", "ld"], [], "Hello world", False),
    (["Hello wor", "ld. Bye"], ["."], "Hello world", True),
    (["ab", "c", "XY", "Zd"], ["XYZ"], "abc", True),
    (["ab", "XY", "Wd"], ["XYZ"], "abXYWd", False),  # a held prefix that did not complete
    (["one\n\n", "two"], ["\n\n", "one"], "", True),  # the earliest stop wins
])
def test_stop_scanner(pieces: list[str], stops: list[str], sent: str, stopped: bool) -> None:
    sc = StopScanner(stops)
    out = "".join(sc.feed(p) for p in pieces) + sc.flush()
    assert out == sent and sc.stopped is stopped


def _done(text: str, ids: list[int], finish: str = "length") -> DoneEvent:
    return DoneEvent(request_id=RID, text=text, token_ids=ids, prompt_token_ids=[1, 2, 3],
                     finish_reason=finish, mode="sled", ttft_ms=5.0, tpot_ms=2.0, e2e_ms=9.0,  # type: ignore[arg-type]
                     rounds=2, drafted_tokens=4, accepted_tokens=3, ttft_slo_ms=1e4,
                     tpot_slo_ms=1e3, device="d1")


def _tok(index: int, ids: list[int], text: str) -> TokenEvent:
    return TokenEvent(request_id=RID, index=index, token_ids=ids, text=text, ts=1.0)


def test_chat_translation_streams_and_answers_whole() -> None:
    tr = Translation("chat", RID, "m", 123, include_usage=True, return_token_ids=True)
    chunks = tr.opening() + tr.on_token(_tok(0, [7, 8], "Hi")) + tr.on_token(_tok(2, [9], " there"))
    chunks += tr.on_done(_done("Hi there", [7, 8, 9]))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["Hi", " there"]
    last, usage = chunks[-2], chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["wisp"]["token_ids"] == [7, 8, 9] and last["wisp"]["rounds"] == 2
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                         "total_tokens": 6}
    assert all(c["id"] == f"chatcmpl-{RID}" and c["object"] == "chat.completion.chunk" for c in chunks)
    whole = tr.response()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hi there"}
    assert whole["wisp"]["accepted"] == 3 and whole["wisp"]["mode"] == "sled"


def test_text_translation_cuts_at_a_stop_string() -> None:
    tr = Translation("text", RID, "m", 1, stops=["\n"])
    assert tr.opening() == []
    sent = [c["choices"][0]["text"] for c in tr.on_token(_tok(0, [1], "line one\nline two"))]
    assert sent == ["line one"] and tr.stopped
    tr.on_done(_done("line one\nline two and more", [1, 2]))
    whole = tr.response()
    assert whole["choices"][0]["text"] == "line one" and whole["choices"][0]["finish_reason"] == "stop"
    assert "token_ids" not in whole["wisp"]  # only when asked (return_token_ids)


def test_text_held_back_by_the_token_events_comes_with_the_done_event() -> None:
    tr = Translation("text", RID, "m", 1)
    tr.on_token(_tok(0, [1], "caf"))
    tail = tr.on_done(_done("café", [1, 2]))
    assert tail[0]["choices"][0]["text"] == "é" and tr.response()["choices"][0]["text"] == "café"


def test_api_keys(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfile-key\n\n")
    keys = ApiKeys.from_settings(Settings(api_keys="a-key, b-key", api_keys_file=keys_file))
    assert keys.caller("Bearer b-key") == "key:1"
    assert keys.caller("bearer file-key") == "key:2"
    for bad in (None, "", "Bearer", "Bearer wrong", "Basic a-key", "a-key"):
        with pytest.raises(ApiError) as info:
            keys.caller(bad)
        assert info.value.status == 401 and info.value.code == "invalid_api_key"
    open_ = ApiKeys.from_settings(Settings())
    assert open_.open and open_.caller(None, "10.0.0.1") == "addr:10.0.0.1"
    with pytest.raises(OSError, match="WISP_API_KEYS_FILE"):
        ApiKeys.from_settings(Settings(api_keys_file=tmp_path / "missing"))


def test_rate_limiter_is_a_token_bucket_per_caller() -> None:
    rl = RateLimiter(per_min=60, burst=2)
    assert rl.take("a", 0.0) is None and rl.take("a", 0.0) is None
    wait = rl.take("a", 0.0)
    assert wait is not None and wait == pytest.approx(1.0)
    assert rl.take("b", 0.0) is None  # another caller has its own bucket
    assert rl.take("a", 0.5) is not None
    assert rl.take("a", 1.01) is None
    small = RateLimiter(per_min=6000, max_callers=10)
    for i in range(50):
        small.take(f"c{i}", float(i))
    assert len(small._buckets) <= 11


def test_generate_request_messages() -> None:
    msgs = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="u")]
    req = GenerateRequest(request_id=RID, prompt="u", messages=msgs, submitted_ts=0.0)
    assert GenerateRequest.model_validate_json(req.encode()) == req
    assert GenerateRequest(request_id=RID, prompt="u", submitted_ts=0.0).messages is None
    with pytest.raises(ValidationError):
        GenerateRequest(request_id=RID, prompt="u", messages=[], submitted_ts=0.0)
    with pytest.raises(ValidationError):
        GenerateRequest(request_id=RID, prompt="u", messages=msgs * 129, submitted_ts=0.0)
    with pytest.raises(ValidationError):
        GenerateRequest(request_id=RID, prompt="u", messages=msgs, chat_template=False,
                        submitted_ts=0.0)
    with pytest.raises(ValidationError):
        ChatMessage(role="tool", content="x")  # type: ignore[arg-type]


def test_cancel_request_is_a_strict_wire_model() -> None:
    c = CancelRequest(request_id=RID, ts=1.0)
    assert c.finish == "cancelled" and CancelRequest.model_validate_json(c.encode()) == c
    with pytest.raises(ValidationError):
        CancelRequest(request_id="bad id!", ts=1.0)
    with pytest.raises(ValidationError):
        CancelRequest(request_id=RID, ts=1.0, finish="later")  # type: ignore[arg-type]
