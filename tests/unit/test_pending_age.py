"""The pending-age gauge's source (``wisp.services.runner._oldest_pending_s``) on a real Redis:
an entry delivered and never acked is as old as its stream id says; none pending is 0."""

from __future__ import annotations

import time

from wisp.bus import Bus
from wisp.services.runner import _oldest_pending_s


async def test_the_oldest_unacked_entry_is_as_old_as_its_id(bus: Bus) -> None:
    stream, group = bus.keys.ns + ":age-test", "g"
    await bus.redis.xgroup_create(stream, group, id="0", mkstream=True)
    assert await _oldest_pending_s(bus, stream, group) == 0.0  # nothing pending
    added_ms = int(time.time() * 1000) - 90_000  # an entry added 90 s ago
    await bus.redis.xadd(stream, {"d": "x"}, id=f"{added_ms}-0")
    await bus.redis.xadd(stream, {"d": "y"})  # a newer one
    got = await bus.redis.xreadgroup(group, "c1", {stream: ">"}, count=10)
    assert await _oldest_pending_s(bus, stream, group) >= 90.0  # both delivered, none acked
    first_id = got[0][1][0][0]
    await bus.redis.xack(stream, group, first_id)
    assert await _oldest_pending_s(bus, stream, group) < 5.0  # the newer one is the oldest now
    await bus.redis.delete(stream)
