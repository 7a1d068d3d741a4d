"""The request bodies of ``/v1/chat/completions`` and ``/v1/completions``: strict pydantic v2
models with bounds, and ``parse_request``, which turns any body into a model or a 400 that
names the parameter and says what to fix.

Sampling parameters that transform the distribution (``top_p``, ``top_k``, penalties,
``logit_bias``, ``min_p``) are refused unless neutral: speculative rejection sampling is
lossless only when the draft's and the target's distributions get the same transform, and
neither side applies them today. ``logprobs`` is refused too (not computed)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from wisp.api.errors import ApiError, bad_param
from wisp.protocol.request import MAX_CHAT_CHARS, MAX_MESSAGES, MAX_SPECULATION

MAX_STOPS = 16
"""Stop strings one request may give (OpenAI allows 4; a few more cost nothing)."""
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body read (a full conversation of ``MAX_CHAT_CHARS`` fits)."""

StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]
SloMs = Annotated[float, Field(gt=0, le=86_400_000)]
Tokens = Annotated[int, Field(ge=1, le=1_000_000)]


class ApiModel(BaseModel):
    """Strict like the wire models: unknown fields, a string where a number belongs and NaN
    are refused (``parse_request`` words the refusal)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(ApiModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CHAT_CHARS)


class ChatMessageIn(ApiModel):
    """One message as OpenAI clients send it: text content (a string, or text parts)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: (Annotated[str, StringConstraints(max_length=MAX_CHAT_CHARS)]
              | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)])
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(ApiModel):
    include_usage: bool = False


class _Common(ApiModel):
    """What both endpoints take."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: Tokens | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=512)
    # refused unless neutral (see the module's docstring); typed loosely so the refusal, not a
    # type error, is what the client reads
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None
    # WISP's own (extra body parameters)
    speculation: Literal["auto", "off"] | Annotated[int, Field(ge=0, le=MAX_SPECULATION)] = "auto"
    ttft_slo_ms: SloMs | None = None
    tpot_slo_ms: SloMs | None = None
    device: str | None = Field(default=None, min_length=1, max_length=100,
                               pattern=r"^[A-Za-z0-9_.\-]+$")
    return_token_ids: bool = False

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Common):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Tokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name), else ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1, max_length=MAX_CHAT_CHARS)
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


Request = ChatCompletionRequest | CompletionRequest

_WHY_LOSSY = ("is not supported: speculative decoding stays lossless only if the draft's and "
              "the target's distributions are transformed the same way, and WISP applies no such "
              "transform; leave it out (or at its neutral value {neutral})")
_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "top_p": ((None, 1, 1.0), "1"),
    "top_k": ((None, 0, -1), "-1"),
    "presence_penalty": ((None, 0, 0.0), "0"),
    "frequency_penalty": ((None, 0, 0.0), "0"),
    "repetition_penalty": ((None, 1, 1.0), "1"),
    "min_p": ((None, 0, 0.0), "0"),
}


def refusal(req: Request) -> ApiError | None:
    """The first parameter this server will not honour, as a 400 naming it; None when all
    can be served."""
    for name, (neutral, shown) in _NEUTRAL.items():
        if getattr(req, name) not in neutral:
            return bad_param(name, _WHY_LOSSY.format(neutral=shown), code="unsupported_parameter")
    if req.logit_bias:
        return bad_param("logit_bias", _WHY_LOSSY.format(neutral="{}"), code="unsupported_parameter")
    if req.n not in (None, 1):
        return bad_param("n", "only n=1 is supported: send one request per completion",
                         code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        return bad_param("stream_options", "only allowed with stream=true")
    if req.logprobs not in (None, False):
        return bad_param("logprobs", "log-probabilities are not computed by this server; leave "
                         "it out", code="unsupported_parameter")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs not in (None, 0):
            return bad_param("top_logprobs", "log-probabilities are not computed by this server; "
                             "leave it out", code="unsupported_parameter")
        if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
            return bad_param("max_tokens", "max_tokens and max_completion_tokens disagree: give one")
        if not any(m.text().strip() for m in req.messages):
            return bad_param("messages", "every message is empty: give some text")
    else:
        if req.echo:
            return bad_param("echo", "echoing the prompt is not supported; leave it out",
                             code="unsupported_parameter")
        if req.suffix:
            return bad_param("suffix", "insertion (suffix) is not supported; leave it out",
                             code="unsupported_parameter")
        if req.best_of not in (None, 1):
            return bad_param("best_of", "only best_of=1 is supported", code="unsupported_parameter")
        if not req.prompt.strip():
            return bad_param("prompt", "the prompt is only whitespace: give some text")
    return None


def _param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as OpenAI writes a parameter: ``messages[1].role``. Union
    branch tags (``str``, ``list[...]``, ``function-after``) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "bool")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def parse_request(kind: Literal["chat", "text"], raw: bytes) -> Request:
    """The body of a chat (``chat``) or completion (``text``) request as its model, or a 400
    ``ApiError`` that names the parameter at fault and says what to fix."""
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes",
                       code="request_too_large")
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    model: type[Request] = ChatCompletionRequest if kind == "chat" else CompletionRequest
    unknown = [k for k in obj if k not in model.model_fields]
    if unknown:
        k = str(unknown[0])
        raise bad_param(k, "unknown or unsupported parameter for this endpoint; leave it out",
                        code="unsupported_parameter")
    if kind == "text" and isinstance(obj.get("prompt"), list):
        raise bad_param("prompt", "only a single string prompt is supported (not an array of "
                        "prompts or of token ids): send one request per prompt",
                        code="unsupported_parameter")
    try:
        req = model.model_validate(obj)
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "missing":
            raise bad_param(_param(loc), "this parameter is required",
                            code="missing_required_parameter") from None
        raise bad_param(_param(loc), str(first.get("msg", "invalid value"))) from None
    why = refusal(req)
    if why is not None:
        raise why
    return req
