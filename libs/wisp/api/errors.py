"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
and headers that go with them, so SDKs raise the exception their users already handle
(``BadRequestError``, ``AuthenticationError``, ``RateLimitError`` ...)."""

from __future__ import annotations

import math
from typing import Any


class ApiError(Exception):
    """An answer other than success. ``message`` says what to fix; ``param`` names the request
    parameter at fault (what an SDK shows next to the message); ``retry_after_s`` becomes a
    ``Retry-After`` header (429, and 503 when admission control refuses or no drafter runs)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def bad_param(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    """400 for one parameter; the message starts with its name."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)
