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
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from wisp.bus import RequestFailed, SessionStore
from wisp.client import new_request_id
from wisp.client import submit as do_submit
from wisp.services.drafter.service import REQUEST_GROUP
from wisp.services.runner import with_services
from wisp.settings import Settings

SETTINGS = Settings(null_models=True, max_wait_ms=0.0, round_timeout_s=30.0)
"""A round timeout far above the bound asserted below: only serving the request again on its
re-delivery can finish it in time."""


def _fail_first_opening(monkeypatch: pytest.MonkeyPatch,
                        before: Callable[[SessionStore, Any], Awaitable[None]] | None = None,
                        ) -> list[str]:
    """Make the drafter's first opening save fail as in an outage (the error a dropped
    connection raises, nothing written), after ``before`` ran; returns the request id it
    failed for (in a list, once it has)."""
    failed: list[str] = []
    save = SessionStore.save_if_owner

    async def flaky(self: SessionStore, state: Any, emit: Any = None, *,
                    opening: bool = False) -> bool:
        if opening and not failed:
            failed.append(state.request.request_id)
            if before is not None:
                await before(self, state)
            raise RedisConnectionError("Connection closed by server.")
        return await save(self, state, emit, opening=opening)

    monkeypatch.setattr(SessionStore, "save_if_owner", flaky)
    return failed


async def test_a_request_whose_opening_save_failed_is_served_when_read_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    failed = _fail_first_opening(monkeypatch)
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


def _taken_elsewhere(monkeypatch: pytest.MonkeyPatch, opened_by: str | None) -> list[str]:
    """The first opening save fails as in an outage, and the request is gone from this
    drafter's pending entries, as when another drafter reclaimed it during a long outage (it
    is never read here again). ``opened_by``: that other drafter opened the session (its
    record names it); None: nobody did."""
    save = SessionStore.save_if_owner

    async def reclaimed(store: SessionStore, state: Any) -> None:
        bus, group = store.bus, REQUEST_GROUP
        for p in await bus.redis.xpending_range(bus.keys.requests, group, "-", "+", 100):
            await bus.redis.xack(bus.keys.requests, group, p["message_id"])
        if opened_by is not None:  # a live drafter (its heartbeat), so nobody adopts it
            await bus.heartbeat("drafter", opened_by, {"ready": True}, 120)
            other = state.model_copy(update={"device": opened_by})
            assert await save(store, other, opening=True)

    return _fail_first_opening(monkeypatch, reclaimed)


async def test_a_session_whose_request_never_comes_back_is_opened_by_the_round_watch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody else opened it: the round watch opens it after ``round_timeout_s`` and serves
    it (before, it gave the request up with an error event)."""
    failed = _taken_elsewhere(monkeypatch, opened_by=None)
    async with with_services(Settings(null_models=True, max_wait_ms=0.0,
                                      round_timeout_s=1.0)) as system:
        done = await do_submit(system.bus, "x " * 30, max_new_tokens=16, idle_timeout_s=30)
        drafter = next(s for s in system.services if s.role == "drafter")
    assert failed == [done.request_id] and len(done.token_ids) == 16
    assert drafter.counters.get("sessions_given_up", 0) == 0


async def test_a_session_opened_by_another_drafter_is_left_to_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another drafter opened it: the round watch forgets it without deleting that drafter's
    record or writing to its client's stream (before, it deleted the record and sent an
    error event, killing the session the other drafter serves)."""
    failed = _taken_elsewhere(monkeypatch, opened_by="drafter-elsewhere")
    async with with_services(Settings(null_models=True, max_wait_ms=0.0,
                                      round_timeout_s=1.0)) as system:
        bus = system.bus
        rid = new_request_id()
        with pytest.raises(RequestFailed, match="no answer"):
            await do_submit(bus, "x " * 30, request_id=rid, max_new_tokens=16, idle_timeout_s=4)
        drafter = next(s for s in system.services if s.role == "drafter")
        record = await SessionStore(bus, 600).get(rid)
        events = await bus.redis.xlen(bus.keys.output(rid))
    assert failed == [rid]
    assert record is not None and record.device == "drafter-elsewhere"
    assert events == 0
    assert drafter.counters.get("sessions_opened_elsewhere", 0) == 1
    assert drafter.counters.get("sessions_given_up", 0) == 0
