"""The stream bus against a real Redis: typed round trip, dead letters, restart recovery."""

from __future__ import annotations

import json

import pytest
from wisp.bus import FIELD, Bus
from wisp.protocol import DeadLetter, GenerateRequest, SessionTerms, decode


def _req(i: int) -> GenerateRequest:
    return GenerateRequest(request_id=f"req-{i:08d}", prompt=f"p{i}", submitted_ts=1.0)


def _terms(request_id: str) -> SessionTerms:
    return SessionTerms(request_id=request_id, prompt_len=2, max_new_tokens=8, ttft_slo_ms=1000.0,
                        tpot_slo_ms=100.0, arrival_ts=1.0)


async def test_publish_read_ack(bus: Bus) -> None:
    s = bus.keys.requests
    for i in range(3):
        await bus.publish(s, _req(i))
    got = await bus.read(s, "g", "c1", GenerateRequest, count=10, block_ms=10)
    got += await bus.read(s, "g", "c1", GenerateRequest, count=10, block_ms=10)
    assert [e.msg.request_id for e in got] == [f"req-{i:08d}" for i in range(3)]
    info = await bus.redis.xpending(s, "g")
    assert info["pending"] == 3  # nothing acked yet
    await bus.ack(s, "g", *[e.entry_id for e in got])
    assert (await bus.redis.xpending(s, "g"))["pending"] == 0


async def test_malformed_entries_are_dead_lettered_and_good_ones_flow(bus: Bus) -> None:
    s = bus.keys.requests
    await bus.redis.xadd(s, {FIELD: b"{not json"})
    await bus.redis.xadd(s, {FIELD: json.dumps({"version": 7, "kind": "request"})})
    await bus.redis.xadd(s, {b"other": b"x"})
    await bus.publish(s, _req(1))
    got = []
    for _ in range(3):
        got += await bus.read(s, "g", "c", GenerateRequest, count=10, block_ms=10)
    assert [e.msg.request_id for e in got] == ["req-00000001"]
    dead = [decode(DeadLetter, f[FIELD]) for _, f in await bus.redis.xrange(bus.keys.dead)]
    reasons = [d.reason for d in dead]
    assert len(dead) == 3
    assert any("undecodable" in r or "invalid" in r for r in reasons)
    assert any("unsupported protocol version 7" in r for r in reasons)
    assert any("missing payload" in r for r in reasons)
    assert all(d.stream == s and d.group == "g" for d in dead)
    # dead-lettered entries were acked: only the good one is pending
    assert (await bus.redis.xpending(s, "g"))["pending"] == 1


async def test_restarted_consumer_rereads_its_pending_entries(bus: Bus) -> None:
    s = bus.keys.draft
    await bus.publish(s, _req(5))
    first = await bus.read(s, "g", "worker", GenerateRequest, block_ms=10)
    first += await bus.read(s, "g", "worker", GenerateRequest, block_ms=10)
    assert len(first) == 1
    # the process dies before acking; a new Bus with the same consumer name starts up
    again = Bus(bus.redis, bus.keys)
    got = await again.read(s, "g", "worker", GenerateRequest, block_ms=10)
    assert [e.entry_id for e in got] == [first[0].entry_id]


async def test_group_recreated_after_stream_deleted(bus: Bus) -> None:
    s = bus.keys.stats
    await bus.publish(s, _req(1))
    assert len(await bus.read(s, "g", "c", GenerateRequest, block_ms=10)) == 1
    await bus.redis.delete(s)
    assert await bus.read(s, "g", "c", GenerateRequest, block_ms=10) == []  # NOGROUP recovered
    await bus.publish(s, _req(2))
    got = await bus.read(s, "g", "c", GenerateRequest, block_ms=10)
    assert [e.msg.request_id for e in got] == ["req-00000002"]


async def test_streams_are_trimmed(bus: Bus) -> None:
    small = Bus(bus.redis, bus.keys, maxlen=100)
    for i in range(1000):
        await small.publish(bus.keys.annotated, _req(i))
    assert await bus.redis.xlen(bus.keys.annotated) < 300


async def test_lease_has_one_holder(bus: Bus) -> None:
    assert await bus.acquire_lease("scheduler", "a", 5)
    assert not await bus.acquire_lease("scheduler", "b", 5)
    assert await bus.acquire_lease("scheduler", "a", 5)  # renew
    await bus.release_lease("scheduler", "a")
    assert await bus.acquire_lease("scheduler", "b", 5)


async def test_reclaim_takes_over_idle_entries_and_dead_letters_poison(bus: Bus) -> None:
    s = bus.keys.requests
    await bus.publish(s, _req(1))
    await bus.publish(s, _req(2))
    taken = await bus.read(s, "g", "dead-consumer", GenerateRequest, count=10, block_ms=10)
    assert len(taken) == 2  # read, never acked: its consumer died
    assert await bus.reclaim(s, "g", "rescuer", GenerateRequest, min_idle_ms=10_000) == []
    import asyncio

    await asyncio.sleep(0.05)
    got = await bus.reclaim(s, "g", "rescuer", GenerateRequest, min_idle_ms=20, max_deliveries=5)
    assert sorted(e.msg.request_id for e in got) == ["req-00000001", "req-00000002"]
    await bus.ack(s, "g", got[0].entry_id)
    # the other keeps failing: after max_deliveries it is dead-lettered, not cycled forever
    for _ in range(6):
        await asyncio.sleep(0.03)
        bus._cursors.clear()
        await bus.reclaim(s, "g", "rescuer", GenerateRequest, min_idle_ms=20, max_deliveries=3)
    assert (await bus.redis.xpending(s, "g"))["pending"] == 0
    dead = [decode(DeadLetter, f[FIELD]) for _, f in await bus.redis.xrange(bus.keys.dead)]
    assert len(dead) == 1 and "without being acked" in dead[0].reason


async def test_one_client_serves_more_blocking_readers_than_redis_py_default(bus: Bus) -> None:
    """The load generator follows one output stream per simulated device on one client, each
    follow a blocking XREAD holding a connection; redis-py's default pool (100) raised
    MaxConnectionsError at the 101st. 150 concurrent blocking reads on the client that
    ``wait_for_redis`` makes all get their entry."""
    import asyncio

    n = 150
    streams = [f"{bus.keys.ns}:out:many-{i}" for i in range(n)]
    readers = [asyncio.create_task(bus.redis.xread({s: "0-0"}, count=1, block=5000))
               for s in streams]
    await asyncio.sleep(0.3)  # every reader is blocked on its own connection
    pipe = bus.redis.pipeline(transaction=False)
    for s in streams:
        pipe.xadd(s, {FIELD: b"x"})
    await pipe.execute()
    got = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert all(r and r[0][1] for r in got)


async def test_read_acks_the_given_entries_in_the_same_round_trip(bus: Bus) -> None:
    s = bus.keys.draft
    for i in range(2):
        await bus.publish(s, _req(i))
    first = await bus.read(s, "g", "c", GenerateRequest, count=1, block_ms=10)
    assert (await bus.redis.xpending(s, "g"))["pending"] == 1
    second = await bus.read(s, "g", "c", GenerateRequest, count=1, block_ms=10,
                            ack=[first[0].entry_id])
    assert [e.msg.request_id for e in first + second] == ["req-00000000", "req-00000001"]
    pending = await bus.redis.xpending_range(s, "g", min="-", max="+", count=10)
    assert [p["message_id"].decode() for p in pending] == [second[0].entry_id]
    # a restarted consumer re-reads its pending entries: the acked one is not among them
    again = Bus(bus.redis, bus.keys)
    got = await again.read(s, "g", "c", GenerateRequest, block_ms=10, ack=[second[0].entry_id])
    assert got == [] and (await bus.redis.xpending(s, "g"))["pending"] == 0


async def test_session_save_with_an_event_emits_only_for_the_owner(bus: Bus) -> None:
    """The drafter saves a session and streams its new tokens in one script: the record is
    written first, and a drafter whose session was adopted elsewhere writes neither."""
    from wisp.bus import OutputStream, SessionStore
    from wisp.protocol import SessionState, TokenEvent

    store, out = SessionStore(bus, ttl_s=60), OutputStream(bus, ttl_s=60)
    req = _req(7)
    st = SessionState(request=req, device="d1", prompt_token_ids=[1, 2], started_ts=1.0,
                      terms=_terms(req.request_id))
    ev = TokenEvent(request_id=req.request_id, index=0, token_ids=[5, 6], text="ab", ts=2.0)
    assert not await store.save_if_owner(st, ev)  # no record yet: only the opening save writes
    assert await store.save_if_owner(st, opening=True)
    assert await store.save_if_owner(st.model_copy(update={"generated": [5, 6]}), ev)
    saved = await store.get(req.request_id)
    assert saved is not None and saved.generated == [5, 6] and saved.device == "d1"
    assert await out.progress(req.request_id) == (2, False)
    assert 0 < await bus.redis.ttl(bus.keys.output(req.request_id)) <= 60
    # adopted by d2: d1's next save writes nothing, neither the record nor the event
    assert await store.adopt(saved.model_copy(update={"device": "d2", "epoch": 1}), saved)
    ev2 = TokenEvent(request_id=req.request_id, index=2, token_ids=[7], text="c", ts=3.0)
    assert not await store.save_if_owner(st.model_copy(update={"generated": [5, 6, 7]}), ev2)
    assert await out.progress(req.request_id) == (2, False)
    saved = await store.get(req.request_id)
    assert saved is not None and saved.device == "d2" and saved.generated == [5, 6]


async def test_sessions_saved_together_in_one_round_trip(bus: Bus) -> None:
    """The verdicts a drafter read together are saved (and their tokens streamed) in one
    pipeline, each session by its own check-and-set: one adopted elsewhere is not written."""
    from wisp.bus import OutputStream, SessionStore
    from wisp.protocol import SessionState, TokenEvent

    store, out = SessionStore(bus, ttl_s=60), OutputStream(bus, ttl_s=60)
    reqs = [_req(20), _req(21)]
    states = [SessionState(request=r, device="d1", prompt_token_ids=[1], started_ts=1.0,
                           terms=_terms(r.request_id)) for r in reqs]
    for st in states:
        assert await store.save_if_owner(st, opening=True)
    assert await store.adopt(states[1].model_copy(update={"device": "d2", "epoch": 1}), states[1])
    events = [TokenEvent(request_id=r.request_id, index=0, token_ids=[9], text="x", ts=2.0) for r in reqs]
    saved = await store.save_many_if_owner(
        [(st.model_copy(update={"generated": [9]}), ev) for st, ev in zip(states, events, strict=True)])
    assert saved == [True, False]
    assert await out.progress(reqs[0].request_id) == (1, False)
    assert await out.progress(reqs[1].request_id) == (0, False)
    other = await store.get(reqs[1].request_id)
    assert other is not None and other.device == "d2" and other.generated == []


async def test_adoption_fences_out_every_earlier_owner_even_one_of_the_same_name(bus: Bus) -> None:
    """Each adoption bumps the session's epoch (a fencing token) with a check-and-set: of two
    adopters only the first wins, and an owner paused past its heartbeat (or a restarted
    drafter's old process under the same name) can no longer save or stream once adopted."""
    from wisp.bus import OutputStream, SessionStore
    from wisp.protocol import SessionState, TokenEvent

    store, out = SessionStore(bus, ttl_s=60), OutputStream(bus, ttl_s=60)
    req = _req(30)
    st = SessionState(request=req, device="d1", prompt_token_ids=[1], started_ts=1.0,
                      terms=_terms(req.request_id))
    assert await store.save_if_owner(st, opening=True)
    # d1 (paused) is adopted by a new process under the SAME name: epoch 1
    assert await store.adopt(st.model_copy(update={"epoch": 1, "generated": [4]}), st)
    assert not await store.adopt(st.model_copy(update={"device": "d2", "epoch": 1}), st)  # too late
    ev = TokenEvent(request_id=req.request_id, index=0, token_ids=[9], text="x", ts=2.0)
    assert not await store.save_if_owner(st.model_copy(update={"generated": [9]}), ev)  # old d1
    assert await out.progress(req.request_id) == (0, False)
    saved = await store.get(req.request_id)
    assert saved is not None and saved.epoch == 1 and saved.generated == [4]
    ev2 = TokenEvent(request_id=req.request_id, index=0, token_ids=[4], text="y", ts=2.0)
    assert await store.save_if_owner(saved, ev2)  # the adopter goes on
    assert await out.progress(req.request_id) == (1, False)


async def test_an_adoption_never_rolls_back_a_save_made_since_the_record_was_read(bus: Bus) -> None:
    """The adopter reads the record, then (its check-and-set) writes the next epoch. If the
    owner, paused past its heartbeat, wakes up in between and saves a round (and streams its
    tokens), the adoption must fail: writing the record as read would roll the session back and
    make the adopter stream that round's text again. Nor may it bring back a finished session."""
    from wisp.bus import SessionStore
    from wisp.protocol import SessionState

    store = SessionStore(bus, ttl_s=60)
    req = _req(31)
    st = SessionState(request=req, device="d1", prompt_token_ids=[1], started_ts=1.0,
                      terms=_terms(req.request_id))
    assert await store.save_if_owner(st, opening=True)
    read = await store.get(req.request_id)
    assert read is not None
    assert await store.save_if_owner(st.model_copy(update={"round": 1, "generated": [5]}))  # d1 wakes
    assert not await store.adopt(read.model_copy(update={"device": "d2", "epoch": 1}), read)
    now = await store.get(req.request_id)
    assert now is not None and now.generated == [5] and now.device == "d1"
    await store.delete(req.request_id)  # d1 finishes
    assert not await store.adopt(now.model_copy(update={"device": "d2", "epoch": 1}), now)
    assert await store.get(req.request_id) is None


async def test_a_message_no_consumer_would_accept_is_refused_before_it_is_written(bus: Bus) -> None:
    """A writer checks the size before XADD: a 1M-character prompt of control characters is
    valid but 6 MB as JSON, over the 4 MiB every consumer accepts (and the 512 KiB a request
    stream takes); it must fail at the writer, not sit in Redis until a consumer dead-letters it."""
    from wisp.protocol import ProtocolError

    s = bus.keys.requests
    before = await bus.redis.xlen(s)
    big = GenerateRequest(request_id="req-big-0001", prompt="\x01" * 1_000_000, submitted_ts=1.0)
    with pytest.raises(ProtocolError, match="exceeds the 524288 byte limit"):  # wisp:req's own
        await bus.publish(s, big)
    with pytest.raises(ProtocolError, match="exceeds the 4194304 byte limit"):  # any stream's
        await bus.publish(bus.keys.draft, big)
    with pytest.raises(ProtocolError, match="not sent"):
        await bus.publish_many([(s, _req(1)), (s, big)])
    assert await bus.redis.xlen(s) == before


async def test_a_departed_readers_stream_expires_and_a_present_one_recreates_its_group(bus: Bus) -> None:
    """Per-device and per-verifier streams expire ``pod_stream_ttl_s`` after their last write
    (``publish_many(expire_ms=...)``), so the streams of departed pods and devices do not pile
    up; a reader that is still there recreates its group and misses nothing written after."""
    import asyncio

    s = bus.keys.verdict("dev-expiring")
    other = bus.keys.stats
    await bus.ensure_group(s, "g")
    await bus.publish_many([(s, _req(1)), (other, _req(2))], expire_ms={s: 200})
    assert 0 < await bus.redis.pttl(s) <= 200 and await bus.redis.pttl(other) == -1
    got = await bus.read(s, "g", "c", GenerateRequest, block_ms=10)
    assert [e.msg.request_id for e in got] == [_req(1).request_id]
    await asyncio.sleep(0.3)
    assert not await bus.redis.exists(s)  # reaped with its group
    assert await bus.read(s, "g", "c", GenerateRequest, block_ms=10) == []  # group recreated
    await bus.publish_many([(s, _req(3))], expire_ms={s: 60_000})
    got = await bus.read(s, "g", "c", GenerateRequest, block_ms=10)
    assert [e.msg.request_id for e in got] == [_req(3).request_id]
    await bus.redis.delete(other)


async def test_rereading_held_entries_moves_on_to_new_ones(bus: Bus) -> None:
    """A consumer that keeps entries pending on purpose (the scheduler holds rounds until their
    batch is written) re-reads its pending list after an outage from a cursor: it gets each held
    entry once, then new entries; it used to get the same first ``count`` for ever (and their
    delivery counts climbed until the sweeper dead-lettered them)."""
    s = bus.keys.annotated
    for i in range(70):
        await bus.publish(s, _req(i))
    first = await bus.read(s, "g", "c", GenerateRequest, count=64, block_ms=10)
    rest = await bus.read(s, "g", "c", GenerateRequest, count=64, block_ms=10)
    assert len(first) + len(rest) == 70  # all held (never acked)
    bus.after_outage()
    await bus.publish(s, _req(99))
    seen: list[str] = []
    for _ in range(4):
        seen += [e.msg.request_id for e in await bus.read(s, "g", "c", GenerateRequest, count=64,
                                                          block_ms=10)]
    assert seen.count(_req(0).request_id) == 1 and len(seen) == 71
    assert seen[-1] == _req(99).request_id


async def test_an_output_refused_by_redis_acks_nothing() -> None:
    """The scheduler writes a batch and acks the rounds in it together. Under ``noeviction``
    (the shipped Redis config) a full Redis refuses the XADD but would still run a plain
    pipeline's XACK: the rounds would be acked without a batch holding them. In one MULTI,
    Redis runs neither, and the rounds stay pending."""
    import pytest
    from redis.exceptions import ResponseError
    from wisp.bus import Keys, wait_for_redis
    from wisp.services.runner import EmbeddedRedis

    with EmbeddedRedis() as server:
        r = await wait_for_redis(server.url)
        b = Bus(r, Keys("oom"))
        try:
            src = b.keys.annotated
            await b.publish(src, _req(1))
            got = await b.read(src, "g", "c", GenerateRequest, block_ms=10)
            await r.config_set("maxmemory-policy", "noeviction")
            await r.config_set("maxmemory", "1")
            with pytest.raises(ResponseError):
                await b.publish_many([(b.keys.batch("v"), _req(2))],
                                     ack=(src, "g", [got[0].entry_id]))
            await r.config_set("maxmemory", "0")
            assert (await r.xpending(src, "g"))["pending"] == 1
            assert not await r.exists(b.keys.batch("v"))
        finally:
            await r.aclose()


async def test_a_holder_does_not_sweep_its_own_held_entries(bus: Bus) -> None:
    """The scheduler keeps a round pending until its batch is written, for as long as no
    verifier is free. Its sweeper must claim only a dead scheduler's entries, not its own held
    ones: every claim counted as a delivery, and after ``max_deliveries`` the held rounds were
    dead-lettered and acked while still held (lost when the scheduler then died)."""
    import asyncio

    s = bus.keys.annotated
    for i in range(3):
        await bus.publish(s, _req(i))
    mine = await bus.read(s, "g", "s1", GenerateRequest, count=2, block_ms=10)
    theirs = await bus.read(s, "g", "s0", GenerateRequest, count=1, block_ms=10)
    assert len(mine) == 2 and len(theirs) == 1
    await asyncio.sleep(0.05)
    for _ in range(8):  # more sweeps than max_deliveries
        got = await bus.reclaim(s, "g", "s1", GenerateRequest, 10, max_deliveries=3,
                                others_only=True)
        await asyncio.sleep(0.02)
        if got:
            assert [e.entry_id for e in got] == [theirs[0].entry_id]
    pending = await bus.redis.xpending_range(s, "g", min="-", max="+", count=10)
    assert len(pending) == 3  # nothing dead-lettered, nothing acked
    own = {p["message_id"].decode(): int(p["times_delivered"]) for p in pending}
    assert all(own[e.entry_id] == 1 for e in mine)
    assert await bus.redis.xlen(bus.keys.dead) == 0


async def test_a_flood_of_large_poison_entries_cannot_fill_redis_through_dead_letters(bus: Bus) -> None:
    """1,200 garbage entries of 64 KiB each (77 MB) all go to the dead-letter stream, which
    must stay small: entries capped (``DEAD_MAXLEN``), payloads cut to an excerpt with their
    size and hash. Before the caps it kept 10,000 entries of 64 KiB (640 MB)."""
    from wisp.bus import DEAD_EXCERPT_BYTES, DEAD_MAXLEN, TRACE_MAXLEN

    s = bus.keys.draft
    junk = b"\xff" + b"x" * (64 * 1024)
    pipe = bus.redis.pipeline(transaction=False)
    for _ in range(1_200):
        pipe.xadd(s, {FIELD: junk})
    await pipe.execute()
    seen = 0
    while seen < 1_200:
        got = await bus.read(s, "g", "c", GenerateRequest, count=500, block_ms=10)
        assert got == []
        seen = (await bus.redis.xinfo_groups(s))[0]["entries-read"] or 0
    await bus.redis.delete(s)
    assert await bus.redis.xlen(bus.keys.dead) <= DEAD_MAXLEN + 100  # MAXLEN ~ trims by node
    mem = await bus.redis.memory_usage(bus.keys.dead, samples=0)
    assert mem is not None and mem < 8 * 1024 * 1024, mem
    last = decode(DeadLetter, (await bus.redis.xrevrange(bus.keys.dead, count=1))[0][1][FIELD])
    assert len(last.payload.encode()) < DEAD_EXCERPT_BYTES + 200
    assert "bytes in all, sha256" in last.payload
    # a caller asking for more than a capped stream's MAXLEN gets the cap
    assert bus.maxlen_for(bus.keys.trace, 1_000_000) == TRACE_MAXLEN
    assert bus.maxlen_for(bus.keys.draft, 50) == 50


async def test_a_full_request_queue_refuses_new_requests_instead_of_trimming_waiting_ones(
        bus: Bus) -> None:
    """Acked requests are deleted, so a request stream's length is its backlog; a client finds
    the queue full (nothing sent) rather than having a waiting request trimmed away unread. A
    request over the stream's entry limit is refused before it is written, and one forged past
    that check is dead-lettered (and deleted) by the reader."""
    from wisp.bus import REQUEST_ENTRY_BYTES, QueueFull, RequestTooLarge

    s = bus.keys.device_requests("dev1")
    for i in range(5):
        await bus.publish_request(s, _req(i), backlog_max=5)
    with pytest.raises(QueueFull) as full:
        await bus.publish_request(s, _req(5), backlog_max=5)
    assert "5 requests waiting" in str(full.value) and full.value.retry_after_s > 0
    assert await bus.redis.xlen(s) == 5
    got = await bus.read(s, "drafters", "d1", GenerateRequest, count=2, block_ms=10)
    got += await bus.read(s, "drafters", "d1", GenerateRequest, count=2, block_ms=10)
    await bus.ack(s, "drafters", *[e.entry_id for e in got[:2]])
    assert await bus.redis.xlen(s) == 3  # the two handled requests are gone
    await bus.publish_request(s, _req(6), backlog_max=5)  # room again
    big = GenerateRequest(request_id="req-big00001", prompt="x" * (REQUEST_ENTRY_BYTES + 1),
                          submitted_ts=1.0)
    with pytest.raises(RequestTooLarge):
        await bus.publish_request(s, big)
    assert await bus.redis.xlen(s) == 4
    # forged around the writer's check: the reader dead-letters it and deletes it
    await bus.redis.xadd(s, {FIELD: big.encode()})
    for _ in range(3):
        await bus.read(s, "drafters", "d1", GenerateRequest, count=10, block_ms=10)
    dead = [decode(DeadLetter, f[FIELD]) for _, f in await bus.redis.xrange(bus.keys.dead)]
    assert any("byte limit" in d.reason for d in dead)
    assert big.encode() not in [f[FIELD] for _, f in await bus.redis.xrange(s)]


async def test_session_scripts_survive_their_function_library_going_away(bus: Bus) -> None:
    """On Redis 7 the session scripts run as a function library, loaded on first use; a Redis
    restart that kept nothing loses it, and the next save (alone or batched) loads it again."""
    from wisp.bus import LIBRARY_NAME, SessionStore
    from wisp.protocol import SessionState

    store = SessionStore(bus, 60)
    req = _req(1)
    st = SessionState(request=req, device="d1", prompt_token_ids=[1, 2], started_ts=1.0,
                      terms=_terms(req.request_id))
    assert await store.save_if_owner(st, opening=True)
    assert bus.scripts.mode == "fcall"
    await bus.redis.function_delete(LIBRARY_NAME)  # what a restart without persistence does
    assert await store.save_if_owner(st)
    await bus.redis.function_delete(LIBRARY_NAME)
    assert await store.save_many_if_owner([(st, None), (st, None)]) == [True, True]
    assert await bus.redis.function_list(library=LIBRARY_NAME)  # loaded again
