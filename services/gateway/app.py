"""The ASGI app of the OpenAI-compatible API: a thin shell over ``wisp.api`` (parsing, checks,
translation, keys, rate limit) and ``RunningRequest`` (the request on the bus).

A client that disconnects cancels its request, streaming or not: the response races a listener
on the connection, and the first to end decides (``_EventStream`` for streams, ``_until_gone``
otherwise). A refusal that comes as the request's first event is answered with its status
(400, 503 + Retry-After) before any byte of a stream is sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from redis.exceptions import NoPermissionError, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from wisp.api import (
    ApiError,
    ApiKeys,
    RateLimiter,
    SharedWindow,
    Translation,
    error_for_event,
    generate_fields,
)
from wisp.api.models import parse_request
from wisp.api.translate import SSE_DONE, check_model, model_ids, sse
from wisp.bus import Bus, QueueFull, RequestTooLarge
from wisp.client import new_request_id
from wisp.protocol import DoneEvent, ErrorEvent, TokenEvent
from wisp.services.gateway.run import RunningRequest
from wisp.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
NO_DRAFTER_RETRY_S = 5.0
LIVE_CACHE_S = 1.0
"""How long the list of live drafters is reused (finding it scans the heartbeat keys)."""
STOP_GRACE_S = 10.0
"""How long a request ended by its stop string waits for the drafter's final event (usage)."""
CLIENT_CLOSED = 499
"""The status logged for a request whose client went away (nginx's convention; no one reads it)."""


class Gateway:
    """What the routes share: settings, the bus, keys, the rate limiter, live drafters."""

    def __init__(self, settings: Settings, bus: Bus, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.bus = bus
        self.keys = ApiKeys.from_settings(settings)
        self.limiter = RateLimiter(settings.api_rate_per_min)
        self.shared = SharedWindow(settings.api_rate_per_min)
        self.clock = clock
        self.wall_clock = time.time
        self._live: tuple[float, set[str]] | None = None

    async def admit(self, request: Request) -> None:
        """Authenticate (401) and rate-limit (429 with Retry-After) one call: this replica's
        token bucket first (bursts), then the count every replica shares in Redis for the
        caller's current minute, so N replicas do not grant N times the limit. Without Redis
        the shared count is skipped (the request then fails on its own, with its reason)."""
        address = request.client.host if request.client else ""
        caller = self.keys.caller(request.headers.get("authorization"), address)
        wait = self.limiter.take(caller, self.clock())
        if wait is None:
            unix = self.wall_clock()
            key = self.bus.keys.rate_window(caller, self.shared.window(unix))
            try:
                count = await self.bus.count_in_window(key, self.shared.ttl_ms())
            except RedisError as err:
                log.warning("shared rate limit unavailable (%s); this replica's own applies", err)
            else:
                wait = self.shared.retry_after(count, unix)
        if wait is not None:
            raise ApiError(429, f"rate limit of {self.settings.api_rate_per_min:g} requests per "
                           "minute reached; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", retry_after_s=wait)

    async def check_drafters(self, device: str | None) -> None:
        """503 when no drafter runs; 400 when the named device does not (or may not be named)."""
        if device is not None and not self.settings.api_allow_devices:
            raise ApiError(400, "device: this server does not forward requests to named devices",
                           param="device", code="unsupported_parameter")
        now = self.clock()
        stale = self._live is None or now - self._live[0] > LIVE_CACHE_S
        if stale or (device is not None and self._live is not None and device not in self._live[1]):
            try:
                self._live = (now, set(await self.bus.live("drafter")))
            except NoPermissionError:
                # the gateway's ACL user (deploy/redis-acl.conf) has no SCAN, which would list
                # every request id: the request goes unchecked and a missing drafter shows as
                # its timeout
                return
        live = self._live[1] if self._live is not None else set()
        if not live:
            raise ApiError(503, "no drafter is running; retry when one is", type="server_error",
                           code="no_drafter", retry_after_s=NO_DRAFTER_RETRY_S)
        if device is not None and device not in live:
            raise ApiError(400, f"device: {device!r} is not running (live: "
                           f"{', '.join(sorted(live))})", param="device", code="device_not_found")


def create_app(settings: Settings, bus: Bus) -> FastAPI:
    """The API on ``bus``: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""
    gw = Gateway(settings, bus)
    app = FastAPI(title="WISP", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(ApiError(err.status_code, str(err.detail), code=code).body(),
                            status_code=err.status_code)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        await gw.admit(request)
        return {"object": "list", "data": [_model(m) for m in model_ids(settings)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        await gw.admit(request)
        if model not in model_ids(settings):
            raise ApiError(404, f"the model {model!r} does not exist", param="model",
                           code="model_not_found")
        return _model(model)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(gw, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(gw, request, "text")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "wisp"}


async def _complete(gw: Gateway, request: Request, kind: Literal["chat", "text"]) -> Response:
    await gw.admit(request)
    req = parse_request(kind, await request.body())
    check_model(req, gw.settings)
    rid = new_request_id()
    fields = generate_fields(req, gw.settings, rid)
    device = req.device
    if gw.settings.api_device is not None:  # a drafter's own API: its device, no other
        if device not in (None, gw.settings.api_device):
            raise ApiError(400, f"device: this API serves device {gw.settings.api_device!r} only",
                           param="device", code="unsupported_parameter")
        device = gw.settings.api_device
    await gw.check_drafters(device)
    run = RunningRequest(gw.bus, rid, fields, device=device,
                         idle_timeout_s=gw.settings.api_idle_timeout_s)
    tr = Translation(kind, rid, req.model, int(time.time()), stops=req.stops(),
                     include_usage=bool(req.stream_options and req.stream_options.include_usage),
                     return_token_ids=req.return_token_ids)
    if not req.stream:
        result = await _until_gone(request, _collect(run, tr), run)
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(result)
    first = await _until_gone(request, run.next(), run)
    if first is None:
        if run.failure is None:  # the client went away before the first event
            return Response(status_code=CLIENT_CLOSED)
        raise _failure(run)
    if isinstance(first, ErrorEvent):
        raise error_for_event(first)
    return _EventStream(_stream(run, tr, first), on_disconnect=run.abandon)


async def _until_gone(request: Request, work: Awaitable[T], run: RunningRequest) -> T | None:
    """``work``'s result, or None (the request abandoned: cancelled on every service) if the
    client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.create_task(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    run.abandon()
    return None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _failure(run: RunningRequest) -> ApiError:
    """The answer to a request that ended without a final event (it is cancelled too: it may
    still be running, only unheard of)."""
    run.abandon()
    err = run.failure
    if isinstance(err, QueueFull):
        return ApiError(503, str(err), type="server_error", code="queue_full",
                        retry_after_s=err.retry_after_s)
    if isinstance(err, RequestTooLarge):
        return ApiError(400, f"prompt: {err}; shorten it", param="prompt", code="too_large")
    if err is not None and "no answer" in str(err):
        return ApiError(504, str(err), type="server_error", code="timeout")
    return ApiError(502, f"the request failed: {err}", type="server_error", code="upstream_error")


async def _collect(run: RunningRequest, tr: Translation) -> dict[str, Any]:
    """The whole answer of a non-streamed request."""
    while True:
        ev = await run.next(STOP_GRACE_S if tr.stopped else None)
        if isinstance(ev, TokenEvent):
            tr.on_token(ev)
            if tr.stopped:
                await run.cancel("stop", "a stop string appeared")
        elif isinstance(ev, DoneEvent):
            tr.on_done(ev)
            return tr.response()
        elif tr.stopped:  # its final event did not come (in time): finish with what we have
            tr.close("stop")
            return tr.response()
        elif isinstance(ev, ErrorEvent):
            raise error_for_event(ev)
        else:
            raise _failure(run)


async def _stream(run: RunningRequest, tr: Translation, first: Any) -> AsyncIterator[str]:
    """The server-sent events of a streamed request, ending in ``data: [DONE]``. An error
    after the first byte is an ``{"error": ...}`` event (what OpenAI's SDKs raise from)."""
    for chunk in tr.opening():
        yield sse(chunk)
    ev = first
    while True:
        if isinstance(ev, TokenEvent):
            for chunk in tr.on_token(ev):
                yield sse(chunk)
            if tr.stopped:
                await run.cancel("stop", "a stop string appeared")
        elif isinstance(ev, DoneEvent):
            for chunk in tr.on_done(ev):
                yield sse(chunk)
            break
        elif tr.stopped:
            for chunk in tr.close("stop"):
                yield sse(chunk)
            break
        else:
            err = error_for_event(ev) if isinstance(ev, ErrorEvent) else _failure(run)
            yield sse(err.body())
            break
        ev = await run.next(STOP_GRACE_S if tr.stopped else None)
    yield SSE_DONE


class _EventStream(StreamingResponse):
    """A server-sent-event response that listens for the client's disconnect while it streams
    (whatever ASGI version the server speaks: with 2.4 Starlette would notice only at the next
    write, and a request waiting in a queue writes nothing) and calls ``on_disconnect`` if the
    client went before the stream ended."""

    def __init__(self, content: AsyncIterator[str], on_disconnect: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False

        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                nonlocal finished
                with contextlib.suppress(OSError):
                    await self.stream_response(send)
                    finished = True
                tg.cancel_scope.cancel()

            async def listen() -> None:
                await _disconnected(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(listen)
        if not finished:
            self.on_disconnect()
