"""The client side: submit a prompt and stream its committed tokens.

A request goes to ``wisp:req`` (any drafter) or ``wisp:req:<device>``; its events come back on
``wisp:out:<request_id>``, read from the start so nothing is missed however late the client
starts reading. The request id is random (128 bits): the output stream is readable only by
someone who knows it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wisp.bus import Bus
from wisp.protocol import OUTPUT_ADAPTER, DoneEvent, ErrorEvent, GenerateRequest, TokenEvent

Event = TokenEvent | DoneEvent | ErrorEvent


class RequestFailed(RuntimeError):
    """The system answered with an error event, or never answered."""


def new_request_id() -> str:
    return secrets.token_hex(16)


async def live_drafters(bus: Bus) -> dict[str, dict[str, Any]]:
    return await bus.live("drafter")


async def submit(
    bus: Bus,
    prompt: str,
    *,
    device: str | None = None,
    on_event: Callable[[Event], Awaitable[None] | None] | None = None,
    idle_timeout_s: float = 600.0,
    check_drafters: bool = True,
    keep_output: bool = False,
    **fields: Any,
) -> DoneEvent:
    """Submit ``prompt`` and wait for its DoneEvent, calling ``on_event`` on every event.

    ``fields`` are ``GenerateRequest`` fields (max_new_tokens, temperature, seed, ...).
    Raises ``RequestFailed`` with the system's one-line reason on an error event, and when no
    event arrives for ``idle_timeout_s``.
    """
    if check_drafters:
        live = await live_drafters(bus)
        if not live:
            raise RequestFailed(
                "no drafter is running: start `wisp-cli up` (or `wisp-cli serve drafter`)"
            )
        if device is not None and device not in live:
            raise RequestFailed(
                f"device {device!r} is not running; live drafters: {', '.join(sorted(live))}"
            )
    req = GenerateRequest(
        request_id=fields.pop("request_id", None) or new_request_id(),
        prompt=prompt,
        submitted_ts=time.time(),
        **fields,
    )
    stream = bus.keys.device_requests(device) if device else bus.keys.requests
    await bus.publish(stream, req)
    try:
        return await follow(bus, req.request_id, on_event=on_event, idle_timeout_s=idle_timeout_s)
    finally:
        if not keep_output:  # the submitter read it all: free it now rather than at its TTL
            await bus.redis.delete(bus.keys.output(req.request_id))


async def follow(
    bus: Bus,
    request_id: str,
    *,
    on_event: Callable[[Event], Awaitable[None] | None] | None = None,
    idle_timeout_s: float = 600.0,
) -> DoneEvent:
    """Read ``request_id``'s output stream from its start until done or error."""
    out = bus.keys.output(request_id)
    last_id = "0-0"
    received = 0  # generated tokens delivered so far: a resumed session may re-send some
    last_seen = time.monotonic()
    delay = 0.1
    while True:
        try:
            resp = await bus.redis.xread({out: last_id}, count=256, block=500)
            delay = 0.1
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # the broker restarts: keep our place in the stream and retry with backoff
            if time.monotonic() - last_seen > idle_timeout_s:
                raise RequestFailed("lost the connection to Redis and it did not come back") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        if not resp:
            if time.monotonic() - last_seen > idle_timeout_s:
                raise RequestFailed(
                    f"no answer for {idle_timeout_s:.0f}s: are the verifier and scheduler running? "
                    "(`wisp-cli status`)"
                )
            continue
        last_seen = time.monotonic()
        for _stream, entries in resp:
            for entry_id, fields in entries:
                last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                raw = fields.get(b"d") or fields.get("d")
                event = OUTPUT_ADAPTER.validate_json(raw)
                if isinstance(event, TokenEvent):
                    if event.index + len(event.token_ids) <= received:
                        continue  # already delivered (re-emitted after a drafter takeover)
                    received = event.index + len(event.token_ids)
                if on_event is not None:
                    r = on_event(event)
                    if r is not None:
                        await r
                if isinstance(event, ErrorEvent):
                    raise RequestFailed(event.error)
                if isinstance(event, DoneEvent):
                    return event
