"""Gateway replicas enforce ONE rate limit per API key: each replica's token bucket smooths
bursts, and the count they share in Redis per caller and clock minute caps them together (two
replicas used to grant a key twice its limit). Real Redis; the gateways as objects, the
requests as ASGI requests."""

from __future__ import annotations

import pytest
from starlette.requests import Request
from wisp.api import ApiError, SharedWindow
from wisp.bus import Bus
from wisp.services.gateway.app import Gateway
from wisp.settings import Settings


def _request(key: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "client": ("10.0.0.1", 1),
                    "headers": [(b"authorization", f"Bearer {key}".encode())]})


async def test_two_replicas_share_one_limit_per_key(bus: Bus) -> None:
    settings = Settings(api_keys="k-one,k-two", api_rate_per_min=4)
    a, b = Gateway(settings, bus), Gateway(settings, bus)
    frozen = 1_700_000_010.0  # the same clock minute for every call
    for gw in (a, b):
        gw.wall_clock = lambda: frozen
    for gw in (a, b, a, b):  # 4 requests of one key across two replicas: within the limit
        await gw.admit(_request("k-one"))
    with pytest.raises(ApiError) as err:  # each replica's own bucket still holds 2 of 4 ...
        await b.admit(_request("k-one"))
    assert err.value.status == 429  # ... but the key's shared count is spent
    assert 0 < (err.value.retry_after_s or 0) <= 60
    await a.admit(_request("k-two"))  # another key has its own count
    for gw in (a, b):  # the next minute starts a new window
        gw.wall_clock = lambda: frozen + 60
    await a.admit(_request("k-one"))


def test_shared_window_arithmetic() -> None:
    w = SharedWindow(per_min=10)
    assert w.window(119.9) == 1 and w.window(120.0) == 2
    assert w.retry_after(10, 125.0) is None
    assert w.retry_after(11, 125.0) == pytest.approx(55.0)
    with pytest.raises(ValueError):
        SharedWindow(0)
