"""Speculation traces: (draft features, verdict) rows, the training data of the controller.

With ``Settings.trace`` on, the drafter publishes, after each verdict it applies, one
:class:`~wisp.protocol.trace.TraceRow` per drafted token up to and including the first rejected
one to ``wisp:trace`` (:func:`trace_rows` builds them). :func:`record` drives a live system with
prompts and collects those rows per request; ``wisp-cli trace record`` writes them as JSONL,
plus a ``.meta.json`` sidecar with the configuration and, per request, the prompt and output ids
(what ``wisp-cli controller train`` needs to replay other policies on the same sequences).

Labels do not depend on timing: under greedy decoding a token is accepted iff it equals the
target's argmax after the committed prefix, so a trace recorded on a busy machine is the same
trace.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.protocol.trace import TraceRow

__all__ = [
    "TRACE_FIELDS",
    "RecordedRequest",
    "TraceSet",
    "meta_path",
    "read_traces",
    "record",
    "trace_rows",
    "write_traces",
]

TRACE_FIELDS = tuple(n for n in TraceRow.model_fields if n not in ("version", "kind"))


def trace_rows(
    *,
    request_id: str,
    round: int,
    features: Sequence[Any],
    recent_acceptance: float,
    drafted: int,
    accepted: int,
    context_len: int = 0,
    device: str = "",
    mode: str = "",
) -> list[TraceRow]:
    """The rows of one verified round: positions ``0 .. min(accepted, drafted - 1)``.

    ``features[i]`` holds ``top1_prob / entropy / margin / logit_spread`` of drafted token ``i``
    (a ``TokenFeatures``, a ``WireFeatures`` or anything with those attributes).
    """
    if drafted <= 0:
        return []
    if len(features) < drafted:
        raise ValueError(f"{len(features)} feature rows for {drafted} drafted tokens")
    last = min(accepted, drafted - 1)
    return [
        TraceRow(
            request_id=request_id, round=round, position=i,
            top1_prob=float(features[i].top1_prob), entropy=float(features[i].entropy),
            margin=float(features[i].margin), logit_spread=float(features[i].logit_spread),
            recent_acceptance=float(recent_acceptance), drafted=drafted, accepted=accepted,
            label=int(i == accepted), context_len=context_len, device=device, mode=mode,
        )
        for i in range(last + 1)
    ]


# ---------------------------------------------------------------------- files
@dataclass
class RecordedRequest:
    """One prompt as the live system answered it (greedy: the target's own output)."""

    request_id: str
    prompt_index: int
    source: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    rounds: int
    drafted: int
    accepted: int


@dataclass
class TraceSet:
    """Rows (each a dict of ``TRACE_FIELDS`` + ``prompt_index``) and the sidecar metadata."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> list[dict[str, Any]]:
        return list(self.meta.get("requests", []))

    def prompt_indices(self) -> list[int]:
        return sorted({int(r["prompt_index"]) for r in self.rows if r.get("prompt_index") is not None})


def meta_path(path: Path) -> Path:
    """``traces.jsonl`` -> ``traces.meta.json``."""
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(stem + ".meta.json")


def write_traces(path: Path, rows: Iterable[dict[str, Any]], meta: dict[str, Any]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    meta_path(path).write_text(json.dumps(meta, indent=1))
    return n


def read_traces(path: Path) -> TraceSet:
    """Read and validate a trace JSONL (every row must be a valid ``TraceRow`` plus an optional
    ``prompt_index``/``source``); the sidecar is read when present."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                core = {k: obj[k] for k in TRACE_FIELDS if k in obj}
                row = TraceRow(**core).model_dump(exclude={"version", "kind"})
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not a trace row ({str(err).splitlines()[0]})") from None
            row["prompt_index"] = obj.get("prompt_index")
            row["source"] = obj.get("source", "")
            rows.append(row)
    meta: dict[str, Any] = {}
    mp = meta_path(path)
    if mp.exists():
        meta = json.loads(mp.read_text())
    return TraceSet(rows=rows, meta=meta)


# ---------------------------------------------------------------------- recording
async def _last_id(bus: Any, stream: str) -> str:
    last = await bus.redis.xrevrange(stream, count=1)
    if not last:
        return "0-0"
    eid = last[0][0]
    return eid.decode() if isinstance(eid, bytes) else eid


async def _rows_since(bus: Any, stream: str, start: str, request_id: str) -> tuple[list[TraceRow], str]:
    """Rows of ``request_id`` after entry ``start`` (exclusive); returns them and the last id."""
    from wisp.bus import FIELD
    from wisp.protocol import ProtocolError, decode

    out: list[TraceRow] = []
    cursor = start
    while True:
        entries = await bus.redis.xrange(stream, min=f"({cursor}", max="+", count=1000)
        if not entries:
            return out, cursor
        for eid, fields in entries:
            cursor = eid.decode() if isinstance(eid, bytes) else eid
            try:
                row = decode(TraceRow, fields.get(FIELD) or fields.get(FIELD.decode()))
            except ProtocolError:
                continue
            if row.request_id == request_id:
                out.append(row)


async def record(
    bus: Any,
    prompts: Sequence[Any],
    *,
    k: int,
    max_new_tokens: int,
    first_index: int = 0,
    on_request: Callable[[int, RecordedRequest, list[TraceRow], list[dict[str, Any]]], None]
    | None = None,
    idle_timeout_s: float = 900.0,
) -> tuple[list[dict[str, Any]], list[RecordedRequest]]:
    """Submit ``prompts`` one at a time (greedy, fixed draft length ``k``) to the system behind
    ``bus`` and collect each request's trace rows. ``prompts`` are ``wisp.data.Prompt``s (or
    strings); ``first_index`` is the dataset index of the first one (stored with every row).
    ``on_request(j, request, rows, row_dicts)`` is called as each request finishes.

    Raises ``RuntimeError`` when a request drafted tokens but no row arrived (tracing is off on
    the drafter that served it).
    """
    from wisp.client import submit

    stream = bus.keys.trace
    rows: list[dict[str, Any]] = []
    done_reqs: list[RecordedRequest] = []
    for j, prompt in enumerate(prompts):
        text = getattr(prompt, "text", prompt)
        source = getattr(prompt, "source", "")
        start = await _last_id(bus, stream)
        done = await submit(bus, text, max_new_tokens=max_new_tokens, temperature=0.0,
                            speculation=k, idle_timeout_s=idle_timeout_s)
        got, _ = await _rows_since(bus, stream, start, done.request_id)
        if done.drafted_tokens and not got:
            # the verdict's rows are published before its token event; allow a slow broker
            await asyncio.sleep(0.5)
            got, _ = await _rows_since(bus, stream, start, done.request_id)
            if not got:
                raise RuntimeError(
                    "the drafter published no trace rows: start it with tracing on "
                    "(WISP_TRACE=1, or let `wisp-cli trace record` start its own system)"
                )
        got.sort(key=lambda r: (r.round, r.position))
        idx = first_index + j
        mine = [{**r.model_dump(exclude={"version", "kind"}), "prompt_index": idx, "source": source}
                for r in got]
        rows += mine
        req = RecordedRequest(
            request_id=done.request_id, prompt_index=idx, source=source,
            prompt_token_ids=list(done.prompt_token_ids), token_ids=list(done.token_ids),
            finish_reason=done.finish_reason, rounds=done.rounds, drafted=done.drafted_tokens,
            accepted=done.accepted_tokens,
        )
        done_reqs.append(req)
        if on_request is not None:
            on_request(j, req, got, mine)
    return rows, done_reqs
