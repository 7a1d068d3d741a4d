"""From an API request to WISP's ``GenerateRequest`` fields, and from WISP's output events
(``TokenEvent``, ``DoneEvent``, ``ErrorEvent``) to OpenAI responses and server-sent-event chunks.

Pure: no I/O, no clock (``created`` is passed in), so the HTTP shell only moves bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Literal

from pydantic import ValidationError

from wisp.api.errors import ApiError, bad_param
from wisp.api.models import ChatCompletionRequest, Request
from wisp.protocol import ChatMessage, DoneEvent, ErrorEvent, GenerateRequest, TokenEvent
from wisp.settings import Settings

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default of ``max_tokens`` for ``/v1/completions`` (chat defaults to the
server's ``max_new_tokens_default``)."""
OPENAI_DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default: an API client that sends no temperature samples (``wisp-cli submit``, whose
users expect greedy output, keeps 0)."""
OVERLOADED_RETRY_S = 2.0
"""Retry-After of a request admission control refused (the load changes within seconds)."""
SSE_DONE = "data: [DONE]\n\n"


def model_ids(settings: Settings) -> list[str]:
    """The ids ``/v1/models`` lists: the target model's alias (its name as configured), and
    for a target given as a path, also the path's last part."""
    target = settings.target_model
    ids = [target]
    name = PurePath(target).name
    if name and name != target:
        ids.append(name)
    return ids


def check_model(req: Request, settings: Settings) -> None:
    if req.model not in model_ids(settings):
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                       f"{', '.join(repr(m) for m in model_ids(settings))} (GET /v1/models)",
                       param="model", code="model_not_found")


def _speculation(req: Request, settings: Settings) -> Any:
    """The request's own ``speculation`` if it set one; else, for a client with no device (it
    names none, at a gateway, not a drafter's own API), the server's ``api_speculation``: a
    cluster gateway sets ``off`` so such clients get the centralized path (the target decodes
    them in server runs) rather than speculation on some device's drafter."""
    if "speculation" in req.model_fields_set or req.device is not None or settings.api_device:
        return req.speculation
    return settings.api_speculation


def generate_fields(req: Request, settings: Settings, request_id: str) -> dict[str, Any]:
    """The ``GenerateRequest`` fields of ``req`` (``wisp.client.submit``'s ``prompt`` and
    keyword arguments), checked by building the request once here, so a value WISP refuses is
    a 400 naming the API parameter rather than an error event later."""
    if isinstance(req, ChatCompletionRequest):
        turns = [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                 for m in req.messages]
        last = next(t.content for t in reversed(turns) if t.content.strip())
        fields: dict[str, Any] = {"prompt": last, "messages": turns, "chat_template": True}
        default_max = settings.max_new_tokens_default
        max_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    else:
        fields = {"prompt": req.prompt, "chat_template": False}
        default_max = COMPLETIONS_DEFAULT_MAX_TOKENS
        max_param = "max_tokens"
    max_new = req.requested_tokens() or default_max
    if max_new > settings.max_new_tokens_limit:
        raise bad_param(max_param, f"{max_new} is over this server's limit of "
                        f"{settings.max_new_tokens_limit} tokens; lower it")
    for name, asked, floor in (("ttft_slo_ms", req.ttft_slo_ms, settings.api_min_ttft_slo_ms),
                               ("tpot_slo_ms", req.tpot_slo_ms, settings.api_min_tpot_slo_ms)):
        # deadlines order the batches (earliest first): a client that could name any SLO
        # would jump every queue by asking for 1 ms
        if asked is not None and asked < floor:
            raise bad_param(name, f"{asked:g} ms is tighter than this server allows API clients "
                            f"({floor:g} ms); ask for {floor:g} or more, or leave it out")
    fields.update(
        max_new_tokens=max_new,
        temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else float(req.temperature),
        seed=req.seed, ttft_slo_ms=req.ttft_slo_ms, tpot_slo_ms=req.tpot_slo_ms,
        speculation=_speculation(req, settings),
    )
    try:
        GenerateRequest(request_id=request_id, submitted_ts=0.0, **fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where,
                       code="invalid_value") from None
    return fields


def error_for_event(ev: ErrorEvent) -> ApiError:
    """The HTTP answer to an error event: the drafter refused the request (400), admission
    control refused it for now (503 with Retry-After), it was cancelled, or it failed (500)."""
    if ev.code == "bad_request":
        return ApiError(400, ev.error, code="bad_request")
    if ev.code == "overloaded":
        return ApiError(503, f"the system is at capacity for this request's SLOs: {ev.error}",
                        type="server_error", code="overloaded", retry_after_s=OVERLOADED_RETRY_S)
    if ev.code == "cancelled":
        return ApiError(409, ev.error, code="cancelled")
    return ApiError(500, ev.error, type="server_error", code=ev.code or "internal")


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class StopScanner:
    """Applies stop strings to text arriving in pieces: passes on what can no longer be the
    start of a stop string, holds back the rest, and cuts the text at the first stop string
    (``stopped``). Without stop strings it passes everything at once."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The part of the text so far that is safe to send now."""
        if self.stopped:
            return ""
        buf = self.held + delta
        if not self.stops:
            self.held = ""
            return buf
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of the text: what was held back (it never was a stop string)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


@dataclass
class Translation:
    """One request's output as OpenAI shapes it: ``kind`` ``chat`` (``/v1/chat/completions``)
    or ``text`` (``/v1/completions``). Feed it the request's events in order; each call
    returns the chunks to stream (ignored when not streaming); ``response()`` is the whole
    object at the end."""

    kind: Literal["chat", "text"]
    request_id: str
    model: str
    created: int
    stops: list[str] = field(default_factory=list)
    include_usage: bool = False
    return_token_ids: bool = False
    text: str = ""
    """The text sent so far (cut at a stop string)."""
    raw_text: str = ""
    """The text the system produced so far (past a stop string too)."""
    tokens: int = 0
    finish_reason: str | None = None
    done: DoneEvent | None = None
    scanner: StopScanner = field(init=False)

    def __post_init__(self) -> None:
        self.scanner = StopScanner(self.stops)

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.request_id}"

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the request should end now (the shell cancels it)."""
        return self.scanner.stopped

    def opening(self) -> list[dict[str, Any]]:
        """Chunks before any text: the chat role."""
        if self.kind == "chat":
            return [self._chunk({"role": "assistant", "content": ""})]
        return []

    def on_token(self, ev: TokenEvent) -> list[dict[str, Any]]:
        self.tokens = ev.index + len(ev.token_ids)
        self.raw_text += ev.text
        return self._text(self.scanner.feed(ev.text))

    def on_done(self, ev: DoneEvent) -> list[dict[str, Any]]:
        """The last chunks: text still held back, the finish reason with WISP's figures, and
        the usage when asked for (``stream_options.include_usage``)."""
        self.done = ev
        out: list[dict[str, Any]] = []
        if not self.stopped and ev.text.startswith(self.raw_text) and len(ev.text) > len(self.raw_text):
            # text the token events held back (a character split across tokens at the end)
            out += self._text(self.scanner.feed(ev.text[len(self.raw_text):]))
            self.raw_text = ev.text
        return out + self.close("stop" if self.stopped else ev.finish_reason)

    def close(self, finish_reason: str) -> list[dict[str, Any]]:
        """The last chunks without (or after) a ``DoneEvent``: a request ended by its stop
        string whose final event did not come in time still finishes, with the usage known."""
        out = self._text(self.scanner.flush())
        self.finish_reason = finish_reason
        last = self._chunk({} if self.kind == "chat" else "", self.finish_reason)
        last["wisp"] = self.figures()
        out.append(last)
        if self.include_usage:
            out.append({"id": self.id, "object": self._chunk_object, "created": self.created,
                        "model": self.model, "choices": [], "usage": self.usage()})
        return out

    def usage(self) -> dict[str, int]:
        prompt = len(self.done.prompt_token_ids) if self.done is not None else 0
        completion = len(self.done.token_ids) if self.done is not None else self.tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def figures(self) -> dict[str, Any]:
        """WISP's own figures of the request (the ``wisp`` extension field)."""
        d = self.done
        out: dict[str, Any] = {"request_id": self.request_id}
        if d is not None:
            out.update(mode=d.mode, device=d.device, rounds=d.rounds, drafted=d.drafted_tokens,
                       accepted=d.accepted_tokens, ttft_ms=round(d.ttft_ms, 3),
                       tpot_ms=round(d.tpot_ms, 3), e2e_ms=round(d.e2e_ms, 3))
            if self.return_token_ids:
                out.update(prompt_token_ids=list(d.prompt_token_ids), token_ids=list(d.token_ids))
        return out

    def response(self) -> dict[str, Any]:
        """The whole (non-streamed) answer."""
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason,
                                      "logprobs": None,
                                      "message": {"role": "assistant", "content": self.text}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "finish_reason": self.finish_reason,
                      "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage(), "wisp": self.figures()}

    # ------------------------------------------------------------------ helpers
    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _text(self, delta: str) -> list[dict[str, Any]]:
        if not delta:
            return []
        self.text += delta
        return [self._chunk({"content": delta} if self.kind == "chat" else delta)]

    def _chunk(self, delta: dict[str, Any] | str, finish_reason: str | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                                      "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"id": self.id, "object": self._chunk_object, "created": self.created,
                "model": self.model, "choices": [choice]}
