"""Following the cancel broadcast (``wisp:cancel``), shared by every role that acts on cancels.

A cancel is a broadcast, not a group message: any drafter may be serving the request, or open
or adopt it later, and every verifier may hold its KV. Each follower remembers recent cancels
(``RecentCancels``, a plain bounded object) so a request cancelled before it reached it ends
as soon as it does, and starts reading ``replay_s`` back so a restarted process knows what was
cancelled while it was down.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

from redis.exceptions import NoPermissionError

from wisp.bus import FIELD, Bus
from wisp.protocol import CancelRequest, ProtocolError, decode

log = logging.getLogger(__name__)

CANCELS_KEPT = 4096
"""Recent cancels each follower remembers."""
CANCEL_REPLAY_S = 60.0
"""How far back a starting follower reads the cancel stream."""


class RecentCancels:
    """The latest ``kept`` cancels by request id (oldest forgotten first)."""

    def __init__(self, kept: int = CANCELS_KEPT) -> None:
        self.kept = kept
        self._by_id: OrderedDict[str, CancelRequest] = OrderedDict()

    def add(self, c: CancelRequest) -> None:
        self._by_id[c.request_id] = c
        self._by_id.move_to_end(c.request_id)
        while len(self._by_id) > self.kept:
            self._by_id.popitem(last=False)

    def get(self, request_id: str) -> CancelRequest | None:
        return self._by_id.get(request_id)

    def __getitem__(self, request_id: str) -> CancelRequest:
        return self._by_id[request_id]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)


async def follow_cancels(bus: Bus, recent: RecentCancels,
                         on_cancel: Callable[[CancelRequest], Awaitable[None]],
                         stopping: asyncio.Event, *, now_s: float, block_ms: int,
                         role: str, replay_s: float = CANCEL_REPLAY_S) -> None:
    """Read ``wisp:cancel`` from ``replay_s`` before ``now_s`` until ``stopping``: remember each
    cancel, then call ``on_cancel``. An entry that does not parse is logged and skipped (there
    is no group to dead-letter it from). A Redis user without read access to the stream (an
    ACL file from before cancels) is logged once and the loop ends: the role serves on, and
    cancelled requests run to their end."""
    stream = bus.keys.cancel
    last = f"{max(0, int((now_s - replay_s) * 1000))}-0"
    while not stopping.is_set():
        try:
            resp = await bus.redis.xread({stream: last}, count=64, block=block_ms)
        except NoPermissionError:
            log.warning("this %s's Redis user may not read %s: cancelled requests run to their "
                        "end (grant it XREAD on that stream)", role, stream)
            return
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                raw = fields.get(FIELD) if isinstance(fields, Mapping) else None  # as Bus.read
                try:
                    msg = decode(CancelRequest, raw)
                except ProtocolError as err:
                    log.warning("cancel %s unreadable, skipped: %s", last, err.reason)
                    continue
                recent.add(msg)
                await on_cancel(msg)
