"""The client side: submit a prompt and stream its committed tokens.

A request goes to ``wisp:req`` (any drafter) or ``wisp:req:<device>``; its events come back on
``wisp:out:<request_id>``, read from the start so nothing is missed however late the client
starts reading. The request id is random (128 bits): the output stream is readable only by
someone who knows it.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import NoPermissionError

from wisp.bus import Bus, OutputStream, RequestFailed
from wisp.bus import OutputEvent as Event
from wisp.protocol import DoneEvent, GenerateRequest

__all__ = ["Event", "RequestFailed", "follow", "live_drafters", "new_request_id", "submit"]


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
    event arrives for ``idle_timeout_s``; its ``QueueFull`` (too many requests waiting) and
    ``RequestTooLarge`` kinds when the request was not sent at all.
    """
    if check_drafters:
        try:
            live: dict[str, dict[str, Any]] | None = await live_drafters(bus)
        except NoPermissionError:
            # the ACL's client user (deploy/redis-acl.conf) sees no heartbeats: finding them
            # takes SCAN, which would list every request id. The request is sent unchecked.
            live = None
        if live is not None and not live:
            raise RequestFailed(
                "no drafter is running: start `wisp-cli up` (or `wisp-cli serve drafter`)"
            )
        if live is not None and device is not None and device not in live:
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
    await bus.publish_request(stream, req)  # QueueFull / RequestTooLarge: nothing was sent
    try:
        return await follow(bus, req.request_id, on_event=on_event, idle_timeout_s=idle_timeout_s)
    finally:
        if not keep_output:  # the submitter read it all: free it now rather than at its TTL
            # (the ACL's client user may not delete outputs: then it expires after
            # WISP_OUTPUT_TTL_S, as the drafter renews it on every event)
            with contextlib.suppress(NoPermissionError):
                await OutputStream(bus).delete(req.request_id)


async def follow(
    bus: Bus,
    request_id: str,
    *,
    on_event: Callable[[Event], Awaitable[None] | None] | None = None,
    idle_timeout_s: float = 600.0,
) -> DoneEvent:
    """Read ``request_id``'s output stream from its start until done or error."""
    return await OutputStream(bus).follow(request_id, on_event=on_event, idle_timeout_s=idle_timeout_s)
