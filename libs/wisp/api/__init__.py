"""The OpenAI-compatible HTTP API, as plain objects (no web framework here): the request shapes
and their checks (``models``), WISP's output events translated into OpenAI responses and
server-sent-event chunks (``translate``), OpenAI-style errors (``errors``), API keys and the
per-key rate limit (``access``). The HTTP shell is ``wisp.services.gateway``; docs/api.md says
what the API accepts and answers."""

from wisp.api.access import ApiKeys, RateLimiter, SharedWindow
from wisp.api.errors import ApiError
from wisp.api.models import ChatCompletionRequest, CompletionRequest, parse_request
from wisp.api.translate import Translation, error_for_event, generate_fields, model_ids

__all__ = [
    "ApiError",
    "ApiKeys",
    "ChatCompletionRequest",
    "CompletionRequest",
    "RateLimiter",
    "SharedWindow",
    "Translation",
    "error_for_event",
    "generate_fields",
    "model_ids",
    "parse_request",
]
