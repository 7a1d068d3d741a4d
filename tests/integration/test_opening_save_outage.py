"""A request whose session record could not be written when it was opened (the broker dropped
the connection: a restart, a failover) is served as soon as the request is read again, not
after ``round_timeout_s``.

The drafter keeps the session in memory before the opening save so a request delivered again
after an outage continues it instead of opening it twice. Before this was mended the re-read
request published round 0 without ever writing the record and its terms: the scheduler dropped
the round as belonging to no session, and the request stalled until the round was re-sent 90 s
later (seen in CI: the Redis-restart fault test taking 106 s instead of ~20). Real services with
the null engines on an embedded Redis; the outage is injected into the drafter's first opening
save (it raises the error a dropped connection raises, without writing anything)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from wisp.bus import SessionStore
from wisp.client import submit as do_submit
from wisp.services.runner import with_services
from wisp.settings import Settings

SETTINGS = Settings(null_models=True, max_wait_ms=0.0, round_timeout_s=30.0)
"""A round timeout far above the bound asserted below: only serving the request again on its
re-delivery can finish it in time."""


async def test_a_request_whose_opening_save_failed_is_served_when_read_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    failed: list[str] = []
    save = SessionStore.save_if_owner

    async def flaky(self: SessionStore, state: Any, emit: Any = None, *,
                    opening: bool = False) -> bool:
        if opening and not failed:
            failed.append(state.request.request_id)
            raise RedisConnectionError("Connection closed by server.")
        return await save(self, state, emit, opening=opening)

    monkeypatch.setattr(SessionStore, "save_if_owner", flaky)
    async with with_services(SETTINGS) as system:
        t0 = time.monotonic()
        done = await do_submit(system.bus, "x " * 30, max_new_tokens=16, idle_timeout_s=45)
        took = time.monotonic() - t0
        drafter = next(s for s in system.services if s.role == "drafter")
        scheduler = next(s for s in system.services if s.role == "scheduler")
    assert failed == [done.request_id]
    assert len(done.token_ids) == 16
    assert drafter.counters.get("rounds_resent", 0) == 0
    assert scheduler.counters.get("rounds_without_session", 0) == 0
    assert took < 20, f"served after {took:.0f} s: it waited for the round timeout"
