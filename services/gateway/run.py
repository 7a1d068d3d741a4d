"""One API request on the bus: ``wisp.client.submit`` in a task, its events in a queue, and its
cancel (``CancelRequest`` on ``wisp:cancel``) when the client goes away or a stop string ends it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

from wisp.bus import Bus, RequestFailed
from wisp.bus import OutputEvent as Event
from wisp.client import submit
from wisp.protocol import CancelRequest

log = logging.getLogger(__name__)

_BACKGROUND: set[asyncio.Task[Any]] = set()
"""Requests left to end on their own after their client went (kept referenced until done)."""


class RunningRequest:
    """A submitted request whose events are read one at a time (``next``)."""

    def __init__(self, bus: Bus, request_id: str, fields: dict[str, Any], *, device: str | None,
                 idle_timeout_s: float) -> None:
        self.bus = bus
        self.request_id = request_id
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.failure: BaseException | None = None
        """Why the request ended without a final event (no answer in time, a broker error)."""
        self.cancel_sent = False
        fields = dict(fields)
        prompt = fields.pop("prompt")
        self.task = asyncio.create_task(self._run(prompt, device, idle_timeout_s, fields),
                                        name=f"api:{request_id}")

    async def _run(self, prompt: str, device: str | None, idle_timeout_s: float,
                   fields: dict[str, Any]) -> None:
        try:
            await submit(self.bus, prompt, device=device, on_event=self.queue.put_nowait,
                         idle_timeout_s=idle_timeout_s, check_drafters=False,
                         request_id=self.request_id, **fields)
        except RequestFailed as err:  # an error event (already queued) or no answer in time
            self.failure = err
        except Exception as err:  # noqa: BLE001 - the HTTP answer says what happened
            log.warning("request %s failed: %r", self.request_id, err)
            self.failure = err
        finally:
            self.queue.put_nowait(None)

    async def next(self, timeout_s: float | None = None) -> Event | None:
        """The next event; None once the request ended (``failure`` says why if no final
        event came) or ``timeout_s`` passed."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None

    async def cancel(self, finish: Literal["cancelled", "stop"] = "cancelled",
                     reason: str = "the client disconnected") -> None:
        """Tell every drafter to end the request (once)."""
        if self.cancel_sent:
            return
        self.cancel_sent = True
        msg = CancelRequest(request_id=self.request_id, finish=finish,
                            reason=reason, ts=time.time())
        await self.bus.publish(self.bus.keys.cancel, msg)

    def abandon(self, grace_s: float = 10.0) -> None:
        """The client is gone: cancel the request and let it end in the background (its final
        event read, so ``submit`` deletes the output stream), for at most ``grace_s``."""

        async def wind_down() -> None:
            with contextlib.suppress(Exception):
                await self.cancel()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), grace_s)
            self.task.cancel()

        t = asyncio.get_running_loop().create_task(wind_down(), name=f"api-cancel:{self.request_id}")
        _BACKGROUND.add(t)
        t.add_done_callback(_BACKGROUND.discard)
