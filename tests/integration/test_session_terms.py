"""A session's constants travel once, when it opens (``SessionTerms``), not on every draft
block; the scheduler and the verifier read them from Redis; and the arrival that orders
earliest-deadline-first is stamped by Redis, not claimed by the client. Real services with the
null engines (no model to load) on an embedded Redis."""

from __future__ import annotations

import asyncio
import json
import time

from wisp.bus import FIELD, OutputStream
from wisp.client import Event, new_request_id
from wisp.protocol import GenerateRequest, SessionTerms, TokenEvent, decode
from wisp.services.runner import with_services
from wisp.settings import Settings

PER_REQUEST = {"prompt_len", "temperature", "seed", "mode", "request_ts", "ttft_slo_ms",
               "tpot_slo_ms", "max_new_tokens"}


async def test_terms_travel_once_and_arrival_is_stamped_by_redis() -> None:
    settings = Settings(null_models=True, mode="wisp", max_wait_ms=0.0)
    async with with_services(settings) as system:
        bus = system.bus
        scheduler = next(s for s in system.services if s.role == "scheduler")
        rid = new_request_id()
        # a client that claims to have submitted in 1970, to jump the earliest-deadline queue
        req = GenerateRequest(request_id=rid, prompt="x " * 40, max_new_tokens=40, submitted_ts=1.0,
                              ttft_slo_ms=5000.0, tpot_slo_ms=500.0)
        seen: dict[str, SessionTerms | None] = {}

        async def on_event(ev: Event) -> None:
            if isinstance(ev, TokenEvent) and "stored" not in seen:
                raw = await bus.redis.get(bus.keys.terms(rid))
                seen["stored"] = decode(SessionTerms, raw) if raw else None
                seen["scheduler"] = scheduler.terms.cached(rid)

        t0 = time.time()
        await bus.publish(bus.keys.requests, req)
        done = await OutputStream(bus).follow(rid, on_event=on_event, idle_timeout_s=60)
        assert len(done.token_ids) == 40
        stored = seen["stored"]
        assert stored is not None and stored == seen["scheduler"]  # what the scheduler works from
        assert t0 - 1.0 <= stored.arrival_ts <= time.time()       # Redis' clock, not the client's
        assert (stored.ttft_slo_ms, stored.tpot_slo_ms, stored.max_new_tokens) == (5000.0, 500.0, 40)
        # no draft block of the session carries its constants again
        blocks = [json.loads(f[FIELD]) for _, f in await bus.redis.xrange(bus.keys.draft)]
        mine = [b for b in blocks if b["request_id"] == rid]
        assert len(mine) >= 2 and all(not (PER_REQUEST & b.keys()) for b in mine)
        # the estimator hop's predictions were made under the model the scheduler holds
        assert scheduler.counters.get("annotated_by_current_model", 0) >= len(mine) - 1
        # the record ends with the session (deleted right after the done event); the terms stay
        # until they expire, so a delivery of the same request again is not served twice
        for _ in range(100):
            if not await bus.redis.exists(bus.keys.session(rid)):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the session's record outlived it")
        assert 0 < await bus.redis.ttl(bus.keys.terms(rid)) <= settings.output_ttl_s
        await bus.publish(bus.keys.requests, req)  # the same request again
        await asyncio.sleep(1.0)
        events = await bus.redis.xrange(bus.keys.output(rid))
        kinds = [json.loads(f[FIELD])["kind"] for _, f in events]
        assert kinds.count("done") == 1 and "error" not in kinds, kinds
