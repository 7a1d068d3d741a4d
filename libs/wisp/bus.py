"""Typed publish/consume over Redis streams (redis.asyncio).

What it guarantees to the services:
- consumer groups are created on demand (also after the stream was deleted: NOGROUP recovery);
- a consumer first re-reads its own pending entries (what it took before a restart), then new ones;
- an entry that does not parse is moved to the dead-letter stream with the reason and acked, so
  it never blocks the group and no consumer ever sees it;
- entries are acked only by the caller, after it has written its output (``ack``);
- every XADD trims the stream with ``MAXLEN ~`` so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wisp.protocol import (
    OUTPUT_ADAPTER,
    DeadLetter,
    DoneEvent,
    ErrorEvent,
    ProtocolError,
    SessionState,
    SessionTerms,
    TokenEvent,
    WireModel,
    decode,
)
from wisp.protocol.base import MAX_PAYLOAD_BYTES

OutputEvent = TokenEvent | DoneEvent | ErrorEvent

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
FIELD = b"d"
"""The single field of every stream entry; its value is the JSON message."""
OUTPUT_MAXLEN = 100_000
"""Entries kept in a request's output stream (``wisp:out:<request>``)."""
DEAD_MAXLEN = 1_000
"""Entries kept in the dead-letter stream: the latest thousand are enough to diagnose a poison
source, and with ``DEAD_EXCERPT_BYTES`` the stream stays under about 6 MB however much garbage
arrives (it kept 10,000 entries of up to 64 KiB: 640 MB, most of a Redis pod's memory)."""
DEAD_EXCERPT_BYTES = 4_096
"""Bytes of a dead-lettered payload kept verbatim; its full size and sha256 go with them."""
TRACE_MAXLEN = 50_000
"""Rows kept on ``wisp:trace``. The recorder reads each request's rows as soon as it finishes
(one row per drafted token up to the first rejection, well under a thousand a request), so
this bounds a forgotten ``WISP_TRACE=1`` to about 25 MB instead of growing to a million rows."""
REQUEST_BACKLOG_MAX = 500
"""Requests that may wait on one request stream (``wisp:req``, ``wisp:req:<device>``): a
client finds the queue full beyond this (``QueueFull``, the API's 503) instead of its request
being trimmed away unread. Acked request entries are deleted (``DELETE_ON_ACK``), so a request
stream's length is its backlog."""
REQUEST_ENTRY_BYTES = 512 * 1024
"""Largest request entry: with ``REQUEST_MAXLEN`` a request stream holds at most 512 MB even if
every waiting request were this large (a 4 MiB limit let 10,000 of them reach 40 GB, far past
any Redis ``maxmemory``: then every write of every service fails under ``noeviction``)."""
REQUEST_MAXLEN = 1_000
"""MAXLEN of a request stream: twice the backlog a client may fill, so concurrent clients that
all found room never trim a waiting request."""
STREAM_MAXLEN_CAPS = {"dead": DEAD_MAXLEN, "trace": TRACE_MAXLEN, "req": REQUEST_MAXLEN}
"""Per-stream-kind caps on MAXLEN (the kind is the key's first part after the namespace);
every ``publish`` to such a stream is trimmed to at most this, whatever its caller asks."""
STREAM_ENTRY_CAPS = {"req": REQUEST_ENTRY_BYTES}
"""Per-stream-kind limits on one entry's bytes, below ``MAX_PAYLOAD_BYTES``."""
DELETE_ON_ACK = frozenset({"req"})
"""Stream kinds read by one group, whose entries are deleted once acked: their length is then
what waits, which a writer can check before adding more."""


class Keys:
    """Every Redis key WISP uses, under one namespace (so tests and deployments can share a
    server without touching each other's data)."""

    def __init__(self, namespace: str = "wisp") -> None:
        self.ns = namespace

    # streams
    @property
    def requests(self) -> str:
        return f"{self.ns}:req"

    def device_requests(self, device: str) -> str:
        return f"{self.ns}:req:{device}"

    @property
    def draft(self) -> str:
        return f"{self.ns}:draft"

    @property
    def annotated(self) -> str:
        return f"{self.ns}:annotated"

    def batch(self, verifier: str) -> str:
        return f"{self.ns}:batch:{verifier}"

    def verdict(self, device: str) -> str:
        return f"{self.ns}:verdict:{device}"

    @property
    def stats(self) -> str:
        return f"{self.ns}:stats"

    def output(self, request_id: str) -> str:
        return f"{self.ns}:out:{request_id}"

    @property
    def dead(self) -> str:
        return f"{self.ns}:dead"

    @property
    def cancel(self) -> str:
        """Cancels of requests (``CancelRequest``), read by every drafter (a broadcast)."""
        return f"{self.ns}:cancel"

    @property
    def trace(self) -> str:
        return f"{self.ns}:trace"

    # plain keys
    def session(self, request_id: str) -> str:
        return f"{self.ns}:sess:{request_id}"

    def terms(self, request_id: str) -> str:
        """A session's constants (``SessionTerms``), written once when it opens."""
        return f"{self.ns}:terms:{request_id}"

    def heartbeat(self, role: str, name: str) -> str:
        return f"{self.ns}:hb:{role}:{name}"

    def heartbeat_pattern(self, role: str = "*") -> str:
        return f"{self.ns}:hb:{role}:*"

    def lease(self, what: str) -> str:
        return f"{self.ns}:lease:{what}"

    @property
    def load(self) -> str:
        """The scheduler's latest per-verifier load snapshot (for admission control)."""
        return f"{self.ns}:load"

    def rate_window(self, caller: str, window: int) -> str:
        """The gateways' shared request count of one API caller in one rate-limit window (the
        caller hashed: its name may be a client address)."""
        digest = hashlib.sha256(caller.encode()).hexdigest()[:20]
        return f"{self.ns}:rl:{digest}:{window}"

    @property
    def estimator_model(self) -> str:
        return f"{self.ns}:estimator:model"

    def all_pattern(self) -> str:
        return f"{self.ns}:*"


@dataclass(frozen=True)
class Entry(Generic[M]):
    """One parsed stream entry."""

    stream: str
    entry_id: str
    msg: M

    def added_ts(self, now: float) -> float:
        """When Redis added this entry (unix s, from the ``<ms>-<seq>`` id Redis stamps), never
        later than ``now``: a writer may choose an id itself, but only a larger one than the
        stream's last, so the earliest time this can give is the true one."""
        try:
            ms = int(self.entry_id.split("-", 1)[0])
        except ValueError:
            return now
        return min(ms / 1000.0, now)


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


LIFE_SEP = "@"
"""A service's consumer name is ``<name>@<instance>``: its name plus a token drawn at each
process start, so two processes of one name (a restart while the old one was paused) are told
apart in every consumer group."""


def consumer_of(name: str, instance: str) -> str:
    """The consumer name of one life (process) of service ``name``."""
    return f"{name}{LIFE_SEP}{instance}"


def is_life_of(consumer: str, name: str) -> bool:
    """Whether ``consumer`` is a life of service ``name`` (or its consumer from before
    instances had tokens: the bare name)."""
    return consumer == name or (consumer.startswith(name + LIFE_SEP)
                                and LIFE_SEP not in consumer[len(name) + 1:])


def _json_dict(raw: bytes | str | None) -> dict[str, Any] | None:
    """A stored JSON object, or None (absent, or not an object)."""
    if raw is None:
        return None
    try:
        out = json.loads(raw)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def payload_of(msg: WireModel, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """``msg``'s bytes for the wire, refused before they are written when no consumer would
    accept them (``MAX_PAYLOAD_BYTES``, or the stream's own ``STREAM_ENTRY_CAPS``): the writer
    gets the error, not a dead letter later."""
    raw = msg.encode()
    if len(raw) > limit:
        raise ProtocolError(f"{type(msg).__name__} of {len(raw)} bytes exceeds the "
                            f"{limit} byte limit; it was not sent")
    return raw


def stream_kind(ns: str, stream: str) -> str:
    """``req`` for ``<ns>:req`` and ``<ns>:req:<device>``, ``batch`` for ``<ns>:batch:<v>``..."""
    return stream.removeprefix(ns + ":").split(":", 1)[0]


class Bus:
    """Typed access to WISP's streams for one process."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, maxlen: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self._groups: set[tuple[str, str]] = set()
        self._pending_drained: set[tuple[str, str, str]] = set()
        self._history: dict[tuple[str, str, str], str] = {}
        """Where each consumer's re-read of its own pending entries has got to."""
        self._cursors: dict[tuple[str, str], str] = {}
        self.scripts = Scripts(redis)
        """WISP's Lua scripts on this connection (functions or EVAL, found once)."""

    # ------------------------------------------------------------------ publish
    async def publish(self, stream: str, msg: WireModel, maxlen: int | None = None) -> str:
        """XADD ``msg`` as JSON, trimming the stream approximately to ``maxlen`` (never above
        the stream kind's cap in ``STREAM_MAXLEN_CAPS``)."""
        entry_id = await self.redis.xadd(
            stream, {FIELD: payload_of(msg, self.entry_limit(stream))},
            maxlen=self.maxlen_for(stream, maxlen), approximate=True,
        )
        return _s(entry_id)

    def entry_limit(self, stream: str) -> int:
        """The most bytes one entry of ``stream`` may have."""
        return STREAM_ENTRY_CAPS.get(stream_kind(self.keys.ns, stream), MAX_PAYLOAD_BYTES)

    async def publish_request(self, stream: str, req: WireModel,
                              backlog_max: int = REQUEST_BACKLOG_MAX) -> str:
        """Add a request unless ``backlog_max`` requests already wait on ``stream``
        (``QueueFull``). The check and the write are two commands, so clients racing for the
        last places may overshoot by their number; ``REQUEST_MAXLEN`` leaves room for that."""
        waiting = int(await self.redis.xlen(stream))
        if waiting >= backlog_max:
            raise QueueFull(f"the request queue is full ({waiting} requests waiting); retry in a "
                            "few seconds", retry_after_s=5.0)
        try:
            return await self.publish(stream, req)
        except ProtocolError as err:
            raise RequestTooLarge(f"the request is too large: {err.reason}") from None

    def maxlen_for(self, stream: str, asked: int | None = None) -> int:
        """The MAXLEN a write to ``stream`` trims to: what was asked (else the bus default),
        capped for the stream kinds in ``STREAM_MAXLEN_CAPS``."""
        kind = stream_kind(self.keys.ns, stream)
        want = asked or self.maxlen
        cap = STREAM_MAXLEN_CAPS.get(kind)
        return min(want, cap) if cap is not None else want

    async def publish_many(self, messages: list[tuple[str, WireModel]],
                           ack: tuple[str, str, Sequence[str]] | None = None,
                           expire_ms: Mapping[str, int] | None = None) -> None:
        """XADD several messages in one round trip (a verifier's verdicts and timing sample),
        and with ``ack`` (stream, group, entry ids) ack the input they came from in the same
        round trip, after them, in one MULTI: if Redis refuses a write (out of memory under
        ``noeviction``, read-only) the ack does not happen either and the input stays pending.
        ``expire_ms``: streams whose expiry each write pushes back (a per-device or
        per-verifier stream is reaped once its reader has gone for that long; a reader that is
        still there recreates its group on demand, see ``read``)."""
        pipe = self.redis.pipeline(transaction=ack is not None)
        for stream, msg in messages:
            pipe.xadd(stream, {FIELD: payload_of(msg, self.entry_limit(stream))},
                      maxlen=self.maxlen_for(stream), approximate=True)
        for stream, ms in (expire_ms or {}).items():
            pipe.pexpire(stream, ms)
        if ack is not None and ack[2]:
            self._queue_ack(pipe, ack[0], ack[1], ack[2])
        await pipe.execute()

    # ------------------------------------------------------------------ groups
    async def ensure_group(self, stream: str, group: str, start: str = "0") -> None:
        """Create ``group`` on ``stream`` (and the stream) unless it exists."""
        if (stream, group) in self._groups:
            return
        try:
            await self.redis.xgroup_create(stream, group, id=start, mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        self._groups.add((stream, group))

    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        model: type[M],
        count: int = 16,
        block_ms: int | None = 200,
        ack: Sequence[str] = (),
    ) -> list[Entry[M]]:
        """Read entries for ``consumer``: its own pending ones first (after a restart), then new.

        Unparseable entries are dead-lettered (with the reason) and acked here; the caller only
        ever sees valid messages, and must ack each after writing what it produced: with
        ``Bus.ack``, or by passing the ids to its next read (``ack``: acked in that read's round
        trip, before the read).
        """
        await self.ensure_group(stream, group)
        tag = (stream, group, consumer)
        if tag not in self._pending_drained:
            # our own pending entries, from a cursor that moves past what was returned: a
            # consumer that keeps entries pending on purpose (the scheduler holds rounds until
            # their batch is written) would otherwise get the same first ``count`` again and
            # again, never reach new entries, and inflate their delivery counts
            cursor = self._history.get(tag, "0")
            out, got = await self._read_once(stream, group, consumer, model, cursor, count, None,
                                             ack, tag)
            ack = ()
            if got < count:
                self._pending_drained.add(tag)
                self._history.pop(tag, None)
            if got:
                return out
        out, _ = await self._read_once(stream, group, consumer, model, ">", count, block_ms, ack)
        return out

    async def _xreadgroup(self, stream: str, group: str, consumer: str, start: str, count: int,
                          block_ms: int | None, ack: Sequence[str]) -> Any:
        """XREADGROUP, preceded by XACK of ``ack`` in the same round trip when there are any
        (a consumer acks what it handled as part of its next read: one round trip per read
        instead of two; Redis runs the two in order, so the ack precedes the read)."""
        if not ack:
            return await self.redis.xreadgroup(group, consumer, {stream: start}, count=count,
                                               block=block_ms)
        pipe = self.redis.pipeline(transaction=False)
        self._queue_ack(pipe, stream, group, ack)
        pipe.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
        *acked, resp = await pipe.execute(raise_on_error=False)
        for res in (*acked, resp):
            if isinstance(res, Exception):
                raise res
        return resp

    async def _read_once(
        self, stream: str, group: str, consumer: str, model: type[M], start: str, count: int,
        block_ms: int | None, ack: Sequence[str] = (), history: tuple[str, str, str] | None = None,
    ) -> tuple[list[Entry[M]], int]:
        """One XREADGROUP; with ``history`` (a re-read of our pending entries), the cursor of
        that re-read moves to the last entry returned."""
        try:
            resp = await self._xreadgroup(stream, group, consumer, start, count, block_ms, ack)
        except ResponseError as err:
            if "NOGROUP" in str(err):  # stream or group deleted under us: recreate, retry later
                self._groups.discard((stream, group))
                await self.ensure_group(stream, group)
                return [], 0
            raise
        out: list[Entry[M]] = []
        got = 0
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                got += 1
                eid = _s(entry_id)
                if history is not None:
                    self._history[history] = eid
                if not fields:  # pending entry trimmed away from the stream
                    await self.ack(stream, group, eid)
                    continue
                raw = fields.get(FIELD) if isinstance(fields, Mapping) else None
                try:
                    if raw is not None and len(raw) > self.entry_limit(stream):
                        raise ProtocolError(f"payload of {len(raw)} bytes exceeds this stream's "
                                            f"{self.entry_limit(stream)} byte limit")
                    msg = decode(model, raw)
                except ProtocolError as err:
                    await self.dead_letter(stream, eid, group, consumer, err.reason, fields)
                    await self.ack(stream, group, eid)
                    continue
                out.append(Entry(stream, eid, msg))
        return out, got

    async def reclaim(
        self,
        stream: str,
        group: str,
        consumer: str,
        model: type[M],
        min_idle_ms: int,
        count: int = 64,
        max_deliveries: int = 5,
        others_only: bool = False,
    ) -> list[Entry[M]]:
        """Claim entries of ``group`` idle for ``min_idle_ms`` (their consumer died or hung)
        for ``consumer``, continuing from the cursor of the previous call. An entry delivered
        more than ``max_deliveries`` times is dead-lettered (a poison message must not cycle
        forever); entries trimmed from the stream are acked.

        ``others_only``: leave ``consumer``'s own pending entries alone. A consumer that holds
        entries on purpose (the scheduler keeps a round pending until its batch is written,
        for as long as no verifier is free) must not claim them from itself: each claim counts
        as a delivery, and after ``max_deliveries`` they were dead-lettered while still held,
        and lost with the scheduler."""
        await self.ensure_group(stream, group)
        cursor = self._cursors.get((stream, group), "0-0")

        async def claim() -> tuple[list[Any], list[Any]]:
            if others_only:
                return await self._claim_from_others(stream, group, consumer, min_idle_ms,
                                                     cursor, count)
            res = await self.redis.xautoclaim(stream, group, consumer, min_idle_ms,
                                              start_id=cursor, count=count)
            self._cursors[(stream, group)] = _s(res[0])
            return res[1], (res[2] if len(res) > 2 else [])

        got = await self._on_group(stream, group, claim())
        if got is None:
            return []
        claimed, deleted = got
        if deleted:
            await self.ack(stream, group, *[_s(d) for d in deleted])
        return await self._decode_claimed(stream, group, consumer, model, claimed, max_deliveries)

    async def _claim_from_others(self, stream: str, group: str, consumer: str, min_idle_ms: int,
                                 cursor: str, count: int) -> tuple[list[Any], list[Any]]:
        """XCLAIM the entries idle for ``min_idle_ms`` in other consumers' pending lists, from
        ``cursor`` on (XPENDING with IDLE, then XCLAIM of those ids)."""
        start = "-" if cursor == "0-0" else f"({cursor}"
        pending = await self.redis.xpending_range(stream, group, min=start, max="+", count=count,
                                                  idle=min_idle_ms)
        self._cursors[(stream, group)] = (
            _s(pending[-1]["message_id"]) if len(pending) >= count else "0-0")
        ids = [_s(p["message_id"]) for p in pending if _s(p["consumer"]) != consumer]
        if not ids:
            return [], []
        # an id not returned was handled meanwhile (no longer idle) or trimmed (Redis drops it
        # from the pending list itself): neither is ours to ack
        return await self.redis.xclaim(stream, group, consumer, min_idle_ms, ids), []

    async def _on_group(self, stream: str, group: str, call: Awaitable[T]) -> T | None:
        """Await a command on ``group``; None if the stream or group was deleted under us
        (NOGROUP: forgotten, so the next read recreates it)."""
        try:
            return await call
        except ResponseError as err:
            if "NOGROUP" in str(err):
                self._groups.discard((stream, group))
                return None
            raise

    async def claim_earlier_lives(self, stream: str, group: str, consumer: str, name: str,
                                  model: type[M], current: str | None,
                                  max_deliveries: int = 5) -> list[Entry[M]]:
        """Claim for ``consumer`` (``name@<instance>``) every entry pending for an earlier life
        of ``name`` in ``group``: a consumer called ``name`` or ``name@<other instance>``. Such
        a life is dead or superseded (a later process of the same name took over its
        heartbeat), so its entries are claimed at once, not after ``reclaim_idle_ms``: a device
        restarted under its own name resumes its verdicts without a wait, and a paused earlier
        life that wakes finds them gone. ``current``: the consumer the name's heartbeat names
        right now (read by the caller just before), never claimed from even if it is not
        ``consumer``: a life that has not yet learnt it was superseded must not take a later
        life's entries. Only consumers holding entries are looked at (XPENDING's summary);
        emptied ones are left to ``reap_departed``."""
        await self.ensure_group(stream, group)
        summary = await self._on_group(stream, group, self.redis.xpending(stream, group))
        if summary is None:
            return []
        out: list[Entry[M]] = []
        for info in summary.get("consumers") or []:
            other = _s(info["name"])
            if other in (consumer, current) or not is_life_of(other, name):
                continue
            for _ in range(1000):  # 100 per pass; bounded in case the list does not shrink
                rows = await self.redis.xpending_range(stream, group, min="-", max="+",
                                                       count=100, consumername=other)
                if not rows:
                    break
                ids = [_s(r["message_id"]) for r in rows]
                claimed = [c for c in await self.redis.xclaim(stream, group, consumer, 0, ids)
                           if c[0] is not None]  # Redis 6.2 answers nil for a trimmed entry
                got = {_s(eid) for eid, _ in claimed}
                gone = [i for i in ids if i not in got]  # trimmed from the stream meanwhile
                if gone:
                    await self.ack(stream, group, *gone)
                out += await self._decode_claimed(stream, group, consumer, model, claimed,
                                                  max_deliveries)
        return out

    async def reap_departed(self, stream: str, group: str, role: str,
                            min_idle_ms: int) -> list[str]:
        """Delete the consumers of ``group`` that no live process reads with: nothing pending,
        idle for ``min_idle_ms``, and either no heartbeat of their name (role ``role``: a pod
        replaced in a rollout, a device that never came back) or a heartbeat of another life
        of that name (a restart). Each left its consumer in every group it read, for ever.

        Not atomic: a consumer that reads in the moment between the listing and the delete
        would lose what it read from the group's pending list. ``min_idle_ms`` is long
        (minutes) so that only a process paused that long can be caught, in a window of one
        round trip; the delete's reply (entries dropped) is logged so it would not go unseen.
        Returns the names deleted."""
        consumers = await self._on_group(stream, group, self.redis.xinfo_consumers(stream, group))
        if consumers is None:
            return []
        idle = [_s(c["name"]) for c in consumers
                if int(c.get("pending", 0)) == 0 and int(c.get("idle", 0)) >= min_idle_ms]
        if not idle:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for c in idle:
            pipe.get(self.keys.heartbeat(role, c.split(LIFE_SEP, 1)[0]))
        beats = await pipe.execute()
        gone = []
        for c, raw in zip(idle, beats, strict=True):
            hb = _json_dict(raw)
            if hb is not None:
                base, inst = c.split(LIFE_SEP, 1)[0], hb.get("instance")
                # the live process's own consumer (a process from before lives reads as ``base``)
                if c == (base if not isinstance(inst, str) else consumer_of(base, inst)):
                    continue
            dropped = int(await self.redis.xgroup_delconsumer(stream, group, c) or 0)
            if dropped:
                log.warning("deleted consumer %s of %s/%s while it held %d entries (it read "
                            "them just now); they are in the stream but no longer pending",
                            c, stream, group, dropped)
            gone.append(c)
        return gone

    async def _decode_claimed(self, stream: str, group: str, consumer: str, model: type[M],
                              claimed: Sequence[Any], max_deliveries: int) -> list[Entry[M]]:
        """Claimed entries as messages: an empty (trimmed) one is acked, one delivered more
        than ``max_deliveries`` times or unparseable is dead-lettered and acked."""
        out: list[Entry[M]] = []
        for entry_id, fields in claimed:
            if entry_id is None:  # Redis 6.2: nil for an entry trimmed from the stream
                continue
            eid = _s(entry_id)
            if not fields:
                await self.ack(stream, group, eid)
                continue
            info = await self.redis.xpending_range(stream, group, min=eid, max=eid, count=1)
            times = int(info[0]["times_delivered"]) if info else 1
            if times > max_deliveries:
                await self.dead_letter(stream, eid, group, consumer,
                                       f"delivered {times} times without being acked", fields)
                await self.ack(stream, group, eid)
                continue
            try:
                out.append(Entry(stream, eid, decode(model, fields.get(FIELD))))
            except ProtocolError as err:
                await self.dead_letter(stream, eid, group, consumer, err.reason, fields)
                await self.ack(stream, group, eid)
        return out

    def reread_pending(self, stream: str, group: str, consumer: str) -> None:
        """The next ``read`` of ``consumer`` starts again from its own pending entries (one whose
        handler failed is delivered again, and counted: XREADGROUP of history bumps its
        delivery count)."""
        self._pending_drained.discard((stream, group, consumer))
        self._history.pop((stream, group, consumer), None)

    def after_outage(self) -> None:
        """After a broker error, re-read our own pending entries first: a message whose output
        write failed was never acked and must be processed again."""
        self._pending_drained.clear()
        self._history.clear()
        self._groups.clear()

    async def ack(self, stream: str, group: str, *entry_ids: str) -> None:
        """XACK; on the stream kinds in ``DELETE_ON_ACK`` the entries are deleted too, in the
        same round trip."""
        if not entry_ids:
            return
        if stream_kind(self.keys.ns, stream) not in DELETE_ON_ACK:
            await self.redis.xack(stream, group, *entry_ids)
            return
        pipe = self.redis.pipeline(transaction=False)
        self._queue_ack(pipe, stream, group, entry_ids)
        await pipe.execute()

    def _queue_ack(self, pipe: Any, stream: str, group: str, entry_ids: Sequence[str]) -> None:
        pipe.xack(stream, group, *entry_ids)
        if stream_kind(self.keys.ns, stream) in DELETE_ON_ACK:
            pipe.xdel(stream, *entry_ids)

    async def dead_letter(
        self,
        stream: str,
        entry_id: str,
        group: str,
        consumer: str,
        reason: str,
        fields: Any,
    ) -> None:
        """Record an entry that could not be processed, with why. The payload is kept as text,
        its first ``DEAD_EXCERPT_BYTES`` only, with its size and sha256 (enough to find the
        writer; a flood of 4 MiB garbage must not fill Redis through the dead-letter stream)."""
        from wisp.telemetry import DEAD_LETTERS, reason_label

        DEAD_LETTERS.labels(reason_label(reason)).inc()
        log.warning("dead-lettered %s %s: %s", stream, entry_id, reason[:300])
        await self.publish(
            self.keys.dead,
            DeadLetter(
                stream=stream[:256], entry_id=entry_id[:64], group=group[:128],
                consumer=consumer[:128], reason=reason[:1_000],
                payload=dead_excerpt(_render_fields(fields)), ts=time.time(),
            ),
        )

    # ------------------------------------------------------------------ plain values
    async def set_value(self, key: str, value: str | bytes, ttl_ms: int | None = None) -> None:
        """A published value (the estimator's model, the scheduler's load snapshot)."""
        await self.redis.set(key, value, px=ttl_ms)

    async def get_values(self, *keys: str) -> list[bytes | None]:
        return list(await self.redis.mget(keys))

    async def count_in_window(self, key: str, ttl_ms: int) -> int:
        """Add one to ``key``'s count and return it; the key expires ``ttl_ms`` after its window
        began (one round trip: INCR and PEXPIRE in a transaction)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.pexpire(key, ttl_ms)
            count, _ = await pipe.execute()
        return int(count)

    async def exists_many(self, keys: list[str]) -> list[bool]:
        """Which of ``keys`` exist (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(x) for x in await pipe.execute()]

    # ------------------------------------------------------------------ heartbeats
    async def heartbeat(self, role: str, name: str, info: dict[str, Any],
                        ttl_s: float) -> dict[str, Any] | None:
        """Write ``name``'s heartbeat; returns the heartbeat it replaced (None: there was none,
        it had expired), read in the same command (``SET ... GET``), so a process can tell
        that another life of its name (a restart while it was paused) has taken over."""
        info = {**info, "role": role, "name": name, "ts": time.time()}
        prev = await self.redis.set(self.keys.heartbeat(role, name), json.dumps(info),
                                    px=int(ttl_s * 1000), get=True)
        return _json_dict(prev)

    async def heartbeat_of(self, role: str, name: str) -> dict[str, Any] | None:
        """``name``'s heartbeat (None: none, or it expired)."""
        return _json_dict(await self.redis.get(self.keys.heartbeat(role, name)))

    async def put_back_heartbeat(self, role: str, name: str, info: dict[str, Any],
                                 ttl_s: float) -> None:
        """Write ``info`` back as it was (a superseded life undoing its own last heartbeat)."""
        await self.redis.set(self.keys.heartbeat(role, name), json.dumps(info),
                             px=int(ttl_s * 1000))

    async def live(self, role: str) -> dict[str, dict[str, Any]]:
        """Services of ``role`` whose heartbeat has not expired, by name."""
        out: dict[str, dict[str, Any]] = {}
        keys = [k async for k in self.redis.scan_iter(match=self.keys.heartbeat_pattern(role))]
        if not keys:
            return out
        for raw in await self.redis.mget(keys):
            if raw is None:
                continue
            try:
                info = json.loads(raw)
            except ValueError:
                continue
            if isinstance(info, dict) and "name" in info:
                out[str(info["name"])] = info
        return out

    async def clear_heartbeat(self, role: str, name: str) -> None:
        await self.redis.delete(self.keys.heartbeat(role, name))

    # ------------------------------------------------------------------ leases
    async def acquire_lease(self, what: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a lease; True while ``holder`` holds it (one active scheduler)."""
        key = self.keys.lease(what)
        ms = int(ttl_s * 1000)
        if await self.redis.set(key, holder, nx=True, px=ms):
            return True
        cur = await self.redis.get(key)
        if cur is not None and _s(cur) == holder:
            await self.redis.pexpire(key, ms)
            return True
        return False

    async def release_lease(self, what: str, holder: str) -> None:
        key = self.keys.lease(what)
        cur = await self.redis.get(key)
        if cur is not None and _s(cur) == holder:
            await self.redis.delete(key)


_SAVE_IF_OWNER = """
local cur = redis.call('GET', KEYS[1])
if not cur and ARGV[4] == '' then return 0 end
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and (rec['device'] ~= ARGV[2] or (tonumber(rec['epoch']) or 0) ~= tonumber(ARGV[8])) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', tonumber(ARGV[3]))
else
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
if KEYS[3] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', ARGV[7], ARGV[5])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[3]))
end
return 1
"""
"""Save a session record unless another drafter owns it (another device, or a later epoch:
an adoption since, even by a drafter of the same name) or, unless opening, it is gone (the
session ended: a late save must not bring it back); write its terms (when opening) or
keep them alive as long as the record; append the output event that the record makes true."""


_ADOPT = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, rec = pcall(cjson.decode, cur)
if ok and ((tonumber(rec['epoch']) or 0) ~= tonumber(ARGV[4])
           or rec['device'] ~= ARGV[5]
           or tonumber(rec['round']) ~= tonumber(ARGV[6])
           or #rec['generated'] ~= tonumber(ARGV[7])) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[3]))
redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""
"""Adopt a session: write its record (at the next epoch) and terms only if the stored record is
still the one the adopter read (same epoch, owner, round and generated length): not if it was
adopted, saved by its owner (a paused owner waking up) or deleted (finished) since."""


SCRIPTS = {"save_if_owner": _SAVE_IF_OWNER, "adopt": _ADOPT}
LIBRARY_NAME = "wisp_" + hashlib.sha256("\0".join(
    f"{k}\0{v}" for k, v in sorted(SCRIPTS.items())).encode()).hexdigest()[:12]
"""The Redis function library holding ``SCRIPTS``, named after their content: a build with
changed scripts loads a new library beside the old one (a rolling upgrade keeps both working),
and loading it again is harmless."""


def function_library() -> str:
    """WISP's scripts as one Redis 7 function library (``FUNCTION LOAD``), each registered as
    ``wisp_v1_<name>``. Why functions: the drafter's ACL user may then ``FCALL`` these and
    nothing else; with ``EVAL`` it could run any script at all."""
    parts = [f"#!lua name={LIBRARY_NAME}"]
    for name, body in SCRIPTS.items():
        parts.append(f"local function {name}(KEYS, ARGV)\n{body.strip()}\nend")
        parts.append(f"redis.register_function('{LIBRARY_NAME}_{name}', {name})")
    parts.append(f"redis.register_function('{LIBRARY_NAME}_loaded', function() return 1 end)")
    return "\n".join(parts) + "\n"


class ScriptsUnavailable(RuntimeError):
    """This Redis user may neither call WISP's functions nor run scripts; the message says what
    an operator must do."""


class Scripts:
    """Runs WISP's Lua scripts: as Redis functions (``FCALL``) where the server has them,
    loading the library itself when it may (``FUNCTION LOAD``: a default or admin user), else
    as ``EVAL`` (Redis before 7, e.g. the embedded one). Under the least-privilege ACL the
    library is loaded once by an admin (``wisp-cli redis load-functions``; it persists in the
    AOF) and the drafter has ``+fcall`` only."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.mode: str | None = None
        """"fcall" or "eval", found on first use."""

    async def _resolve(self) -> str:
        try:
            await self.redis.fcall(f"{LIBRARY_NAME}_loaded", 0)
        except NoPermissionError:
            self.mode = "eval"  # may not FCALL: EVAL is all this user might have
            return self.mode
        except ResponseError as err:
            msg = str(err).lower()
            if "function not found" not in msg:  # Redis < 7 (unknown command): no functions
                self.mode = "eval"
                return self.mode
            try:
                await self.redis.function_load(function_library(), replace=True)
                self.mode = "fcall"
            except NoPermissionError:
                self.mode = "eval"
        else:
            self.mode = "fcall"
        return self.mode

    async def run(self, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run script ``name`` (a key of ``SCRIPTS``) once."""
        for attempt in (0, 1):
            mode = self.mode or await self._resolve()
            try:
                if mode == "fcall":
                    return await self.redis.fcall(f"{LIBRARY_NAME}_{name}", len(keys), *keys, *args)
                return await self.redis.eval(SCRIPTS[name], len(keys), *keys, *args)
            except NoPermissionError as err:
                raise ScriptsUnavailable(_no_scripts(err)) from None
            except ResponseError as err:
                # the library went with a Redis restart that kept nothing: find out again
                if attempt == 0 and self.forget_if_gone(err):
                    continue
                raise
        raise AssertionError("unreachable")

    def forget_if_gone(self, err: Exception) -> bool:
        """``err`` says the library is not loaded (any more): find the mode again next time."""
        if self.mode == "fcall" and "function not found" in str(err).lower():
            self.mode = None
            return True
        return False

    async def queue(self, pipe: Any, name: str, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add script ``name`` to ``pipe`` (the mode is found first, outside the pipeline)."""
        mode = self.mode or await self._resolve()
        if mode == "fcall":
            pipe.fcall(f"{LIBRARY_NAME}_{name}", len(keys), *keys, *args)
        else:
            pipe.eval(SCRIPTS[name], len(keys), *keys, *args)


def _no_scripts(err: Exception) -> str:
    return (f"this Redis user may not run WISP's session scripts ({err}): load them once as an "
            "admin with `wisp-cli redis load-functions` (Redis >= 7) and give the user +fcall "
            "(deploy/redis-acl.conf)")


class TermsCache:
    """The terms of the sessions a scheduler or verifier is serving, read from Redis once per
    session (and again after a failover, by whoever replaces the reader); bounded, least
    recently used first out."""

    def __init__(self, store: SessionStore, size: int = 65_536) -> None:
        self.store = store
        self.size = size
        self._terms: OrderedDict[str, SessionTerms] = OrderedDict()

    async def get_many(self, request_ids: Sequence[str]) -> dict[str, SessionTerms]:
        """The terms of every session here that has them (one round trip for those not cached)."""
        missing = [r for r in dict.fromkeys(request_ids) if r not in self._terms]
        for rid, terms in zip(missing, await self.store.terms(missing), strict=True):
            if terms is not None:
                self._terms[rid] = terms
        out: dict[str, SessionTerms] = {}
        for rid in request_ids:
            t = self._terms.get(rid)
            if t is not None:
                self._terms.move_to_end(rid)
                out[rid] = t
        while len(self._terms) > self.size:
            self._terms.popitem(last=False)
        return out

    async def get(self, request_id: str) -> SessionTerms | None:
        return (await self.get_many([request_id])).get(request_id)

    def cached(self, request_id: str) -> SessionTerms | None:
        return self._terms.get(request_id)

    def forget(self, request_id: str) -> None:
        self._terms.pop(request_id, None)


class SessionStore:
    """The session records (``wisp:sess:<request>``), each the whole truth of one session: the
    drafter that owns it saves it after every applied verdict, a verifier that lacks the KV
    cache reads the committed prefix from it, and a drafter that takes over a dead one's
    sessions adopts them from it."""

    def __init__(self, bus: Bus, ttl_s: int) -> None:
        self.bus = bus
        self.scripts = bus.scripts
        self.ttl_s = ttl_s
        """Seconds a record (and the output stream written with it) lives unless written again."""

    def key(self, request_id: str) -> str:
        return self.bus.keys.session(request_id)

    async def get(self, request_id: str) -> SessionState | None:
        """The record, or None when there is none (finished, expired) or it does not parse
        (logged: a corrupt record must not take its reader down)."""
        raw = await self.bus.redis.get(self.key(request_id))
        if raw is None:
            return None
        try:
            return decode(SessionState, raw)
        except ProtocolError as err:
            log.warning("session %s unreadable: %s", request_id, err.reason)
            return None

    async def exists(self, request_id: str) -> bool:
        return bool(await self.bus.redis.exists(self.key(request_id)))

    async def known(self, request_id: str) -> bool:
        """Whether this request was ever opened (its record, or the terms a finished session
        leaves behind until they expire): a request delivered again (its ack lost in an
        outage, or a reclaim race) must not be served twice."""
        return bool(await self.bus.redis.exists(self.key(request_id), self.bus.keys.terms(request_id)))

    async def save_if_owner(self, state: SessionState, emit: WireModel | None = None, *,
                            opening: bool = False) -> bool:
        """Write ``state`` unless the stored record names another drafter (atomically): False
        means the session was adopted elsewhere and ``state.device`` must stop serving it.

        ``emit``: an event for the session's output stream (``OutputStream.emit``), written in
        the same script right after the record, so the record is durable before the client
        sees the tokens it holds, and a drafter that lost the session emits nothing; one round
        trip instead of three (the drafter saves and streams once per round).

        ``opening``: also write the session's terms (``wisp:terms:<id>``), which the scheduler
        and the verifiers read instead of finding them on every block; later saves only keep
        the terms alive as long as the record."""
        keys, args = self._save_args(state, emit, opening)
        return bool(await self.scripts.run("save_if_owner", keys, args))

    async def save_many_if_owner(self, saves: Sequence[tuple[SessionState, WireModel | None]],
                                 ) -> list[bool]:
        """``save_if_owner`` of several sessions in one round trip (the verdicts a drafter read
        together), run by Redis in the given order; whether each was saved."""
        if len(saves) == 1:
            return [await self.save_if_owner(*saves[0])]
        for attempt in (0, 1):
            pipe = self.bus.redis.pipeline(transaction=False)
            for state, emit in saves:
                await self.scripts.queue(pipe, "save_if_owner", *self._save_args(state, emit))
            try:
                return [bool(x) for x in await pipe.execute()]
            except ResponseError as err:
                # the library went with a Redis restart that kept nothing: the scripts are
                # idempotent per record (compare-and-set), so running them again is safe
                if attempt == 1 or not self.scripts.forget_if_gone(err):
                    raise
        raise AssertionError("unreachable")

    def _save_args(self, state: SessionState, emit: WireModel | None,
                   opening: bool = False) -> tuple[list[Any], list[Any]]:
        """``_SAVE_IF_OWNER``'s keys and arguments."""
        rid = state.request.request_id
        keys = [self.key(rid), self.bus.keys.terms(rid)]
        if emit is not None:
            keys.append(self.bus.keys.output(rid))
        terms = state.terms.encode() if opening else b""
        args: list[Any] = [state.encode(), state.device, self.ttl_s, terms]
        args += [emit.encode(), OUTPUT_MAXLEN, FIELD] if emit is not None else [b"", 0, FIELD]
        args.append(state.epoch)
        return keys, args

    async def adopt(self, state: SessionState, read: SessionState) -> bool:
        """Take the session over with ``state`` (``epoch`` one above ``read``, the record it was
        built from): written (record and terms) only if the stored record is still ``read``
        (same epoch, owner, round and generated length), so of two adopters only one wins, a
        save by the owner since (a paused owner that woke up) is never rolled back, a finished
        session is not brought back, and every later save of an earlier owner
        (``save_if_owner`` checks the epoch too) fails, even one under the same name (a
        restarted drafter adopting its own sessions while the old process still runs). False
        when the record changed or went since it was read."""
        rid = state.request.request_id
        keys = [self.key(rid), self.bus.keys.terms(rid)]
        args = [state.encode(), state.terms.encode(), self.ttl_s, read.epoch, read.device,
                read.round, len(read.generated)]
        return bool(await self.scripts.run("adopt", keys, args))

    async def lock_adoption(self, request_id: str, who: str, ms: int = 30_000) -> bool:
        """One adopter per session: True for the first caller within ``ms``."""
        return bool(await self.bus.redis.set(self.key(request_id) + ":adopt", who, nx=True, px=ms))

    async def delete(self, request_id: str) -> None:
        """End a session: its record goes; its terms stay until they expire (``known``)."""
        await self.bus.redis.delete(self.key(request_id))

    async def terms(self, request_ids: Sequence[str]) -> list[SessionTerms | None]:
        """The terms of these sessions in one round trip; None where a session has none (it
        ended or expired) or they do not parse (logged)."""
        if not request_ids:
            return []
        raws = await self.bus.redis.mget([self.bus.keys.terms(r) for r in request_ids])
        out: list[SessionTerms | None] = []
        for rid, raw in zip(request_ids, raws, strict=True):
            try:
                out.append(None if raw is None else decode(SessionTerms, raw))
            except ProtocolError as err:
                log.warning("terms of session %s unreadable: %s", rid, err.reason)
                out.append(None)
        return out

    async def all(self) -> AsyncIterator[SessionState]:
        """Every readable record (a scan: for adoption, not for a hot path)."""
        async for key in self.bus.redis.scan_iter(match=self.bus.keys.session("*"), count=500):
            k = _s(key)
            if k.endswith(":adopt"):
                continue
            st = await self.get(k.rsplit(":", 1)[-1])
            if st is not None:
                yield st


REFUSAL_CODES = frozenset({"overloaded", "queue_full"})
"""Error codes that mean the system declined a request it could not serve in time (admission
control, a full queue), as opposed to failing one it took. Admission control also refuses,
as ``overloaded``, while no verifier is live: a benchmark's refusals include those."""


class RequestFailed(RuntimeError):
    """The system answered with an error event, or never answered. ``code``: the error
    event's code (``overloaded``: refused by admission control; ``queue_full``: never sent),
    None when there was no answer."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def refused(self) -> bool:
        """The system declined the request (overload) rather than failing it."""
        return self.code in REFUSAL_CODES


class QueueFull(RequestFailed):
    """The request stream already holds ``REQUEST_BACKLOG_MAX`` waiting requests: nothing was
    sent; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, code="queue_full")
        self.retry_after_s = retry_after_s


class RequestTooLarge(RequestFailed):
    """The request is over its stream's entry limit (``REQUEST_ENTRY_BYTES``): nothing was sent."""


class OutputStream:
    """Each request's output (``wisp:out:<request>``): the drafter emits committed tokens and
    the final event, the client follows it from its start, so nothing is missed however late it
    starts reading. The request id is random (128 bits): the stream is readable only by someone
    who knows it."""

    def __init__(self, bus: Bus, ttl_s: int = 3600) -> None:
        self.bus = bus
        self.ttl_s = ttl_s

    async def emit(self, request_id: str, event: WireModel) -> None:
        """Append ``event`` and renew the stream's TTL (one round trip; not a MULTI, which the
        drafter's ACL user may not run, and the TTL needs no atomicity)."""
        stream = self.bus.keys.output(request_id)
        pipe = self.bus.redis.pipeline(transaction=False)
        pipe.xadd(stream, {FIELD: event.encode()}, maxlen=OUTPUT_MAXLEN, approximate=True)
        pipe.expire(stream, self.ttl_s)
        await pipe.execute()

    async def progress(self, request_id: str) -> tuple[int, bool]:
        """How many generated tokens the stream already holds, and whether it is finished (a
        drafter that adopts a session re-emits only what is missing)."""
        entries = await self.bus.redis.xrevrange(self.bus.keys.output(request_id), count=50)
        for _eid, fields in entries:
            try:
                ev = OUTPUT_ADAPTER.validate_json(fields.get(FIELD) or fields.get(_s(FIELD)))
            except ValueError:
                continue
            if isinstance(ev, DoneEvent):
                return len(ev.token_ids), True
            if isinstance(ev, ErrorEvent):
                return 0, True
            if isinstance(ev, TokenEvent):
                return ev.index + len(ev.token_ids), False
        return 0, False

    async def delete(self, request_id: str) -> None:
        await self.bus.redis.delete(self.bus.keys.output(request_id))

    async def follow(
        self,
        request_id: str,
        *,
        on_event: Callable[[OutputEvent], Awaitable[None] | None] | None = None,
        idle_timeout_s: float = 600.0,
    ) -> DoneEvent:
        """Read the stream from its start until the DoneEvent (returned) or an ErrorEvent
        (``RequestFailed``), calling ``on_event`` on each event. Tokens re-emitted after a
        drafter takeover are delivered once. Survives broker restarts (keeps its place)."""
        out = self.bus.keys.output(request_id)
        last_id = "0-0"
        received = 0
        last_seen = time.monotonic()
        delay = 0.1
        while True:
            try:
                resp = await self.bus.redis.xread({out: last_id}, count=256, block=500)
                delay = 0.1
            except (RedisConnectionError, RedisTimeoutError, OSError):
                if time.monotonic() - last_seen > idle_timeout_s:
                    raise RequestFailed("lost the connection to Redis and it did not come back") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if not resp:
                if time.monotonic() - last_seen > idle_timeout_s:
                    raise RequestFailed(
                        f"no answer for {idle_timeout_s:.0f}s: are the verifier and scheduler "
                        "running? (`wisp-cli status`)"
                    )
                continue
            last_seen = time.monotonic()
            for _stream, entries in resp:
                for entry_id, fields in entries:
                    last_id = _s(entry_id)
                    event = OUTPUT_ADAPTER.validate_json(fields.get(FIELD) or fields.get(_s(FIELD)))
                    if isinstance(event, TokenEvent):
                        if event.index + len(event.token_ids) <= received:
                            continue  # already delivered (re-emitted after a drafter takeover)
                        received = event.index + len(event.token_ids)
                    if on_event is not None:
                        r = on_event(event)
                        if r is not None:
                            await r
                    if isinstance(event, ErrorEvent):
                        raise RequestFailed(event.error, code=event.code)
                    if isinstance(event, DoneEvent):
                        return event


def dead_excerpt(payload: str) -> str:
    """``payload`` itself when short, else its first ``DEAD_EXCERPT_BYTES`` (whole characters)
    followed by its full size and sha256."""
    raw = payload.encode("utf-8", "replace")
    if len(raw) <= DEAD_EXCERPT_BYTES:
        return payload
    head = raw[:DEAD_EXCERPT_BYTES].decode("utf-8", "ignore")
    return f"{head}... [{len(raw)} bytes in all, sha256 {hashlib.sha256(raw).hexdigest()}]"


def _render_fields(fields: Any) -> str:
    if not isinstance(fields, Mapping):
        return repr(fields)
    parts = {}
    for k, v in fields.items():
        key = _s(k) if isinstance(k, bytes | str) else repr(k)
        try:
            parts[key] = _s(v) if isinstance(v, bytes | str) else repr(v)
        except UnicodeDecodeError:
            parts[key] = repr(v)
    return json.dumps(parts)


MAX_CONNECTIONS = 10_000
"""Connections one client may open. Every blocking read (XREADGROUP/XREAD with BLOCK) holds a
connection until it returns, so a client shared by N concurrent readers needs N: the benchmark's
load generator follows one output stream per simulated device on one client (up to 4096), where
redis-py's default of 100 raised MaxConnectionsError at the 101st device. Connections are opened
only when needed, so the limit costs nothing below it (Redis itself accepts 10,000 clients by
default)."""


async def wait_for_redis(url: str, timeout_s: float = 10.0, *,
                         max_connections: int = MAX_CONNECTIONS, username: str | None = None,
                         password: str | None = None, tls_ca_file: str | None = None,
                         tls_cert_file: str | None = None, tls_key_file: str | None = None,
                         tls_verify: bool = True, tls_check_hostname: bool = True,
                         ) -> aioredis.Redis:
    """Connect and PING, retrying with backoff while Redis is unreachable or still loading;
    raise ``ConnectionError`` with a one-line message that never holds a password.

    ``username`` / ``password``: credentials applied to the *first* connection and every later
    one, overriding those in the URL. Why here and not after: the Kubernetes manifests give
    the password only in ``WISP_REDIS_PASSWORD`` (from a Secret) and a bare URL, so a PING with
    the URL alone gets NOAUTH and no pod could ever start. A refused login (wrong password,
    unknown or disabled user, a user without PING) is not retried: no retry makes it right,
    and a service should exit at once with the reason rather than after ``timeout_s``.

    ``tls_*``: for ``rediss://`` URLs (the ``redis_tls_*`` settings): the CA bundle that
    verifies the server (trusted besides the system store; unset: the system store only), the
    client certificate and key for a server with ``tls-auth-clients yes``, and ``False`` to skip
    verifying the certificate or its host name. Applied to every connection for the same reason
    as the password; those given override ``ssl_*`` parameters in the URL. A file that cannot
    be loaded (checked once, before connecting), a server
    certificate this client does not trust and a handshake the server refuses are not
    retried either: each is a one-line error that names the setting to change. TLS files
    with a URL that is not ``rediss://`` are an error, not ignored: TLS was asked for, and
    plain text would carry the password in clear.
    ``max_connections``: see ``MAX_CONNECTIONS``."""
    import ssl

    from redis.exceptions import AuthenticationError

    credentials = {k: v for k, v in (("username", username), ("password", password)) if v is not None}
    is_tls = url.startswith("rediss://")
    files = {"WISP_REDIS_TLS_CA_FILE": tls_ca_file, "WISP_REDIS_TLS_CERT_FILE": tls_cert_file,
             "WISP_REDIS_TLS_KEY_FILE": tls_key_file}
    if not is_tls and any(files.values()):
        named = [k for k, v in files.items() if v]
        raise ConnectionError(f"{', '.join(named)} set, but {redact(url)} does not use TLS: use "
                              f"a rediss:// URL (or unset {'it' if len(named) == 1 else 'them'})")
    tls: dict[str, Any] = {}
    if is_tls:
        if tls_key_file and not tls_cert_file:
            raise ConnectionError("WISP_REDIS_TLS_KEY_FILE set without WISP_REDIS_TLS_CERT_FILE, "
                                  "the client certificate it belongs to")
        # load the files once here, so a wrong path is one line now, not a retry per connection
        probe = ssl.create_default_context()
        setting, path = "", ""
        try:
            if tls_ca_file:
                setting, path = "WISP_REDIS_TLS_CA_FILE", tls_ca_file
                probe.load_verify_locations(cafile=tls_ca_file)
            if tls_cert_file:
                setting, path = "WISP_REDIS_TLS_CERT_FILE / WISP_REDIS_TLS_KEY_FILE", tls_cert_file
                # a pass-phrase callback, so an encrypted key fails here instead of prompting
                probe.load_cert_chain(tls_cert_file, tls_key_file, password=lambda: b"")
        except (OSError, ValueError) as err:  # ssl.SSLError is an OSError
            reason = str(getattr(err, "strerror", None) or err)
            if "PEM lib" in reason:  # what OpenSSL says of a key it could not decrypt
                reason += " (an encrypted key? WISP needs it unencrypted)"
            raise ConnectionError(f"cannot load {setting} ({path}): {reason}") from None
        tls = {k: v for k, v in (("ssl_ca_certs", tls_ca_file), ("ssl_certfile", tls_cert_file),
                                 ("ssl_keyfile", tls_key_file)) if v}
        if not tls_verify:
            tls.update(ssl_cert_reqs="none", ssl_check_hostname=False)
        elif not tls_check_hostname:
            tls["ssl_check_hostname"] = False

    def causes(err: BaseException | None) -> list[BaseException]:
        """``err`` and what lies under it (redis-py re-raises OSErrors as its own, with the
        original as cause or context), at most 8 deep."""
        chain: list[BaseException] = []
        while err is not None and len(chain) < 8:
            chain.append(err)
            err = err.__cause__ or err.__context__
        return chain

    def ssl_error(err: BaseException) -> ssl.SSLError | None:
        """The TLS error under redis-py's ``ConnectionError``, if any."""
        return next((e for e in causes(err) if isinstance(e, ssl.SSLError)), None)

    def was_reset(err: BaseException | None) -> bool:
        """The server closed or reset the connection: redis-py words it several ways ("reset by
        peer", "Error 104 connecting ... Connect call failed", "closed by server")."""
        return any(isinstance(e, ConnectionResetError) or getattr(e, "errno", None) == errno.ECONNRESET
                   or "reset by peer" in str(e) or "closed by server" in str(e)
                   or f"Error {errno.ECONNRESET} " in str(e) for e in causes(err))

    deadline = time.monotonic() + timeout_s
    delay = 0.05
    last: Exception | None = None
    while True:
        try:
            client = aioredis.from_url(url, socket_connect_timeout=2, health_check_interval=10,
                                       max_connections=max_connections)
        except ValueError as err:  # the message names the problem, never the URL's password
            raise ConnectionError(f"bad Redis URL {redact(url)}: {err}") from None
        # the URL's own credentials win over from_url's keywords, so override them in the
        # pool's connection arguments (used for the first connection and every reconnect)
        client.connection_pool.connection_kwargs.update(credentials, **tls)
        user = client.connection_pool.connection_kwargs.get("username")
        who = f" as user {user!r}" if user else ""
        try:
            await client.ping()
            return client
        except (AuthenticationError, ResponseError) as err:  # checked first: AuthenticationError
            await client.aclose()  # is a ConnectionError, but retrying cannot fix a login
            hint = (" (check the user and password: WISP_REDIS_PASSWORD, else the URL's)"
                    if isinstance(err, AuthenticationError) else "")
            raise ConnectionError(
                f"Redis at {redact(url)} refused the login{who}: {err}{hint}") from None
        except Exception as err:  # noqa: BLE001 - any other failure means "not reachable yet"
            last = err
            await client.aclose()
            bad = ssl_error(err)
            if isinstance(bad, ssl.SSLCertVerificationError):  # retrying cannot make it trusted
                if bad.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH / IP_ADDRESS_...
                    hint = ("connect by a name the certificate lists, or set "
                            "WISP_REDIS_TLS_CHECK_HOSTNAME=false")
                elif tls_ca_file:
                    hint = (f"WISP_REDIS_TLS_CA_FILE ({tls_ca_file}) does not hold the CA that "
                            "signed it: point it at that CA's bundle")
                else:
                    hint = ("set WISP_REDIS_TLS_CA_FILE to the CA bundle that signed it; without "
                            "it only the system's trusted CAs are accepted")
                raise ConnectionError(
                    f"Redis at {redact(url)} presented a TLS certificate this client does not "
                    f"trust: {bad.verify_message} ({hint})") from None
            if bad is not None and "ALERT" in (bad.reason or ""):  # the server refused us
                hint = ("it wants a client certificate: set WISP_REDIS_TLS_CERT_FILE and "
                        "WISP_REDIS_TLS_KEY_FILE" if "CERTIFICATE_REQUIRED" in bad.reason else
                        "check WISP_REDIS_TLS_CERT_FILE / WISP_REDIS_TLS_KEY_FILE: the server's "
                        "tls-ca-cert-file must have signed the client certificate")
                raise ConnectionError(f"Redis at {redact(url)} refused the TLS handshake: "
                                      f"{bad.reason.lower()} ({hint})") from None
        if time.monotonic() >= deadline:
            reset = was_reset(last)
            if is_tls and isinstance(last, TimeoutError | RedisTimeoutError):
                # a plain-text server leaves the TLS handshake unanswered
                hint = " (if that port does not speak TLS, use a redis:// URL)"
            elif reset and is_tls:
                # TLS 1.3: a server that wants a client certificate may close the connection
                # after the handshake instead of sending its alert first (timing-dependent)
                hint = (" (a TLS server that closes the connection wants a client certificate: "
                        "set WISP_REDIS_TLS_CERT_FILE and WISP_REDIS_TLS_KEY_FILE)"
                        if not tls_cert_file else
                        " (the server may refuse this client certificate: its tls-ca-cert-file "
                        "must have signed WISP_REDIS_TLS_CERT_FILE)")
            elif reset:
                hint = " (if that port speaks TLS, use a rediss:// URL)"
            else:
                hint = ""
            raise ConnectionError(f"cannot reach Redis at {redact(url)}: {last}{hint}") from last
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and errors: the one in the
    userinfo (``redis://user:PASSWORD@host``) and a ``password=`` query parameter (how
    ``unix://`` URLs carry it). The user name stays: it says which ACL user was tried."""
    import re

    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, qmark, query = rest.partition("?")
    if qmark:
        query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2***", query)
    if "@" in rest:  # everything before the last "@" counts as userinfo: mask too much, never
        cred, rest = rest.rsplit("@", 1)  # too little (a password may hold "/" or "@")
        if ":" in cred:
            cred = f"{cred.split(':', 1)[0]}:***"
        rest = f"{cred}@{rest}"
    return f"{scheme}://{rest}{qmark}{query}"
