"""Session records (``wisp:sess:<request>``) are read back by an adopting drafter and by a
verifier that lacks the KV cache. A record that parses must be one that can be true; anything
else is refused as unreadable (the reader treats the session as unknown) and never raises inside
the reader. Hypothesis feeds schema-shaped records with wrong values."""

from __future__ import annotations

import json
import math
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wisp.protocol.base import ProtocolError, decode
from wisp.protocol.request import GenerateRequest
from wisp.protocol.session import SessionState, SessionTerms
from wisp.services.drafter.session import spec_of

NOW = time.time()
INTS = st.integers(-5, 10) | st.integers(-2**40, 2**40)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1e4)


def _good() -> dict:
    """A record as a drafter writes one (built from the models, so it stays valid as they grow)."""
    req = GenerateRequest(request_id="req-0001", prompt="hi", max_new_tokens=8, submitted_ts=NOW)
    terms = SessionTerms(request_id="req-0001", prompt_len=3, max_new_tokens=8, ttft_slo_ms=1000.0,
                         tpot_slo_ms=100.0, arrival_ts=NOW)
    state = SessionState(request=req, device="d1", prompt_token_ids=[1, 2, 3], generated=[4], round=1,
                         started_ts=NOW, first_token_ts=NOW + 1, last_token_ts=NOW + 1, terms=terms,
                         rounds_done=1, drafted=4, accepted=2, recent_acceptance=0.5, draft_ms=10.0,
                         wasted_draft_ms=5.0, verify_ms=3.0)
    return json.loads(state.encode())


FIELDS = {
    "prompt_token_ids": st.lists(INTS, max_size=4),
    "generated": st.lists(INTS, max_size=12),
    "round": INTS, "rounds_done": INTS, "drafted": INTS, "accepted": INTS, "epoch": INTS,
    "recent_acceptance": FLOATS, "draft_ms": FLOATS, "wasted_draft_ms": FLOATS, "verify_ms": FLOATS,
    "started_ts": FLOATS, "first_token_ts": FLOATS | st.none(), "last_token_ts": FLOATS | st.none(),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=4).flatmap(
    lambda picked: st.fixed_dictionaries({k: FIELDS[k] for k in picked})))
def test_a_session_record_is_consistent_or_refused(changes: dict) -> None:
    raw = json.dumps({**_good(), **changes}, allow_nan=True).encode()
    try:
        st_ = decode(SessionState, raw)
    except ProtocolError:
        return
    assert all(0 <= t < 2**31 for t in st_.committed)
    assert len(st_.generated) <= st_.request.max_new_tokens
    assert 0 <= st_.accepted <= st_.drafted and st_.round >= 0
    for x in (st_.draft_ms, st_.wasted_draft_ms, st_.verify_ms, st_.recent_acceptance, st_.started_ts):
        assert math.isfinite(x) and x >= 0
    spec = spec_of(st_, frozenset({2}))  # an adopting drafter rebuilds its state from it
    assert spec.budget >= 0 and spec.context_len == len(st_.committed)


def test_the_unchanged_record_is_accepted() -> None:
    assert decode(SessionState, json.dumps(_good()).encode()).generated == [4]
