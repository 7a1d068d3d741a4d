"""No request hangs on a lost round: a round that never reaches a verifier (dead-lettered on the
way, dropped in an upgrade, lost with Redis' last second of writes) is published again after
``round_timeout_s``, and a round lost every time ends its request with an error event instead
of the client's idle timeout. Real services with the null engines on an embedded Redis; the
loss is injected by making the scheduler drop rounds it is handed (acked, never queued)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from wisp.bus import Entry
from wisp.client import RequestFailed, new_request_id
from wisp.client import submit as do_submit
from wisp.protocol import AnnotatedBlock
from wisp.services.runner import with_services
from wisp.services.scheduler.service import GROUP, SchedulerService
from wisp.settings import Settings

SETTINGS = Settings(null_models=True, max_wait_ms=0.0, round_timeout_s=0.5, round_resends=2)


def _dropping(monkeypatch: pytest.MonkeyPatch, drop: Callable[[AnnotatedBlock], bool],
              with_session: bool = False) -> list[str]:
    """Make every scheduler lose the rounds ``drop`` picks (ack them, queue nothing); with
    ``with_session``, the session's record and terms are lost too (as when Redis dies before
    its last second of writes reached the AOF)."""
    lost: list[str] = []
    take = SchedulerService.take

    async def lossy(self: SchedulerService, e: Entry[AnnotatedBlock]) -> None:
        if drop(e.msg):
            lost.append(e.msg.block.key)
            await self.bus.ack(e.stream, GROUP, e.entry_id)
            if with_session:
                rid = e.msg.block.request_id
                await self.bus.redis.delete(self.keys.session(rid), self.keys.terms(rid))
                self.terms.forget(rid)
            return
        await take(self, e)

    monkeypatch.setattr(SchedulerService, "take", lossy)
    return lost


async def test_a_lost_round_is_sent_again_and_the_request_completes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = {"dropped": False}

    def once(ab: AnnotatedBlock) -> bool:  # the first round 2 anyone sends, once
        if ab.block.round == 2 and not first["dropped"]:
            first["dropped"] = True
            return True
        return False

    lost = _dropping(monkeypatch, once)
    async with with_services(SETTINGS) as system:
        done = await do_submit(system.bus, "x " * 30, max_new_tokens=24, idle_timeout_s=30)
        drafter = next(s for s in system.services if s.role == "drafter")
        assert len(done.token_ids) == 24
        assert len(lost) == 1 and drafter.counters.get("rounds_resent", 0) >= 1


async def test_a_round_lost_every_time_ends_the_request_with_an_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rid = new_request_id()
    _dropping(monkeypatch, lambda ab: ab.block.request_id == rid and ab.block.round >= 1)
    async with with_services(SETTINGS) as system:
        t0 = time.monotonic()
        with pytest.raises(RequestFailed, match="got no verdict"):
            await do_submit(system.bus, "x " * 30, request_id=rid, max_new_tokens=24,
                            idle_timeout_s=60)
        # (1 + round_resends) x round_timeout_s, plus the watch loop's period: not the 60 s
        assert time.monotonic() - t0 < 10
        # the others are served as before
        done = await do_submit(system.bus, "y " * 30, max_new_tokens=8, idle_timeout_s=30)
        assert len(done.token_ids) == 8


async def test_a_round_lost_with_its_session_record_is_recovered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis dies right after a session opens and its last second of writes is lost: the first
    round, the session record and its terms are gone. The re-send writes the record and terms
    again before the round, so the scheduler and the verifier can serve it."""
    first = {"dropped": False}

    def once(ab: AnnotatedBlock) -> bool:
        if ab.block.round == 0 and not first["dropped"]:
            first["dropped"] = True
            return True
        return False

    lost = _dropping(monkeypatch, once, with_session=True)
    async with with_services(SETTINGS) as system:
        done = await do_submit(system.bus, "z " * 30, max_new_tokens=12, idle_timeout_s=30)
        assert len(done.token_ids) == 12 and len(lost) == 1
