"""Who may call the API, and how often: API keys as bearer tokens, and a token bucket per key.

Plain objects with the time passed in (the HTTP shell reads the clock), so both are tested
without a server or a sleep."""

from __future__ import annotations

import hmac
from pathlib import Path

from wisp.api.errors import ApiError
from wisp.settings import Settings


class ApiKeys:
    """The configured API keys (``WISP_API_KEYS``, comma-separated, and ``WISP_API_KEYS_FILE``,
    one a line). None configured: the API is open (the loopback default of ``wisp-cli up``)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in dict.fromkeys(keys) if k]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """Keys from the settings and the key file; an unreadable file is an error at start
        (``OSError`` with its path), never an open API by accident."""
        keys = [k.strip() for k in (settings.api_keys or "").split(",")]
        if settings.api_keys_file is not None:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text()
            except OSError as err:
                raise OSError(f"cannot read WISP_API_KEYS_FILE ({path}): {err.strerror}") from None
            keys += [line.strip() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        return cls([k for k in keys if k])

    @property
    def open(self) -> bool:
        return not self._keys

    def caller(self, authorization: str | None, address: str = "") -> str:
        """Who is calling (the rate limit's bucket): ``key:<n>`` for the n-th configured key,
        or, with the API open, the client's address. Raises a 401 ``ApiError`` for a missing
        or wrong key. Every key is compared (``hmac.compare_digest``), so the time taken says
        nothing about which key, or how much of one, matched."""
        if self.open:
            return f"addr:{address}"
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send it as 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")
        given = token.strip().encode()
        found = -1
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(given, key) and found < 0:
                found = i
        if found < 0:
            raise ApiError(401, "incorrect API key provided", type="invalid_request_error",
                           code="invalid_api_key")
        return f"key:{found}"


class RateLimiter:
    """A token bucket per caller: ``per_min`` requests a minute, bursts up to ``burst`` (a
    minute's worth by default). Buckets that have refilled are forgotten once more than
    ``max_callers`` are held, so memory stays bounded whoever calls."""

    def __init__(self, per_min: float, burst: float | None = None, max_callers: int = 100_000) -> None:
        if per_min <= 0:
            raise ValueError("per_min must be positive")
        self.rate = per_min / 60.0
        self.burst = max(1.0, burst if burst is not None else per_min)
        self.max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, caller: str, now: float) -> float | None:
        """Spend one request of ``caller``'s at ``now`` (seconds, any monotonic origin): None
        when allowed, else the seconds until one is (the ``Retry-After``)."""
        tokens, last = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[caller] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_callers:
            self._forget_full(now)
        return None

    def _forget_full(self, now: float) -> None:
        full = [c for c, (t, last) in self._buckets.items()
                if t + (now - last) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]


class SharedWindow:
    """The limit every gateway replica enforces together: at most ``per_min`` requests per
    caller per clock minute, counted in Redis (``Bus.count_in_window``). The local
    ``RateLimiter`` smooths bursts per replica; without this, N replicas let a key make N times
    its limit. Pure: it names the window and judges a count."""

    window_s = 60.0

    def __init__(self, per_min: float) -> None:
        if per_min <= 0:
            raise ValueError("per_min must be positive")
        self.limit = per_min

    def window(self, unix_now: float) -> int:
        return int(unix_now // self.window_s)

    def ttl_ms(self) -> int:
        return int(self.window_s * 2 * 1000)

    def retry_after(self, count: int, unix_now: float) -> float | None:
        """None when ``count`` (this request included) is within the limit, else the seconds
        until the next window."""
        if count <= self.limit:
            return None
        return max(0.001, self.window_s - (unix_now % self.window_s))
