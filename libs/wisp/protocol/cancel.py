"""client or gateway → every drafter: ``wisp:cancel``, a broadcast stream (plain ``XREAD``, no
consumer group: every drafter must see every cancel, and only the one serving the request acts).

Why a message and not a key: the request may not be opened yet (still queued in ``wisp:req``),
or its owner may die and another drafter adopt it; every drafter remembers recent cancels, so
whichever one opens or adopts the request later ends it at once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from wisp.protocol.base import WireModel


class CancelRequest(WireModel):
    """End ``request_id`` on every service: no more rounds drafted, its session and draft KV
    dropped (its terms stay as the tombstone of a finished session).

    ``finish``: ``cancelled`` (the client went away): the request ends with an ``ErrorEvent``
    of code ``cancelled``; ``stop`` (the client's stop string appeared in the text): it ends
    with a ``DoneEvent`` of what was committed so far, ``finish_reason`` ``stop``, so the
    client still gets its usage and figures."""

    KIND = "cancel"
    kind: Literal["cancel"] = "cancel"
    request_id: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")
    finish: Literal["cancelled", "stop"] = "cancelled"
    reason: str = Field(default="the client disconnected", max_length=256)
    ts: float = Field(ge=0.0, le=1e10, description="When the cancel was sent (unix s).")
