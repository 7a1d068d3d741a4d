"""A short chaos run in CI (``tests/chaos.py``): 28 s of steady greedy load while a random
service process is killed -9 and restarted every ~3 s. Nothing may be lost, duplicated or
wrong; clear errors are allowed (and printed). The long run is ``python -m tests.chaos``.

The first test checks the detectors themselves on hand-made streams, so a chaos run that reports
zero duplicates means the streams were clean, not that the check could not see them."""

from __future__ import annotations

from pathlib import Path

import pytest
from wisp.protocol import DoneEvent, TokenEvent

from tests.chaos import ChaosConfig, run_chaos
from tests.faults.common import DONE, Outcome, stream_conflicts, stream_gaps_ms


def _tok(index: int, ids: list[int]) -> TokenEvent:
    return TokenEvent(request_id="r", index=index, token_ids=ids, text="", ts=0.0)


def _done(ids: list[int]) -> DoneEvent:
    return DoneEvent(request_id="r", text="", token_ids=ids, prompt_token_ids=[1], finish_reason="length",
                     mode="sled", ttft_ms=0, tpot_ms=0, e2e_ms=0, rounds=1, drafted_tokens=0,
                     accepted_tokens=0, ttft_slo_ms=1, tpot_slo_ms=1, device="d")


def test_conflict_detector_is_not_vacuous() -> None:
    o = Outcome(prompt="p", request_id="r", submitted_ts=1.0, status=DONE)
    # a re-emission of the same tokens after a takeover is fine (the client drops it by index)
    o.events = [(1000, _tok(0, [5, 6])), (1100, _tok(0, [5, 6])), (1200, _tok(2, [7])),
                (3200, _done([5, 6, 7]))]
    assert stream_conflicts(o) == []
    assert max(stream_gaps_ms(o)) == 2000
    # two drafters serving one session: index 1 emitted with two different tokens
    o.events = [(1000, _tok(0, [5, 6])), (1100, _tok(1, [9, 7])), (1200, _done([5, 6, 7]))]
    assert any("index 1" in c for c in stream_conflicts(o))
    # a DoneEvent that disagrees with what was streamed
    o.events = [(1000, _tok(0, [5, 6])), (1200, _done([5, 8]))]
    assert stream_conflicts(o)


@pytest.mark.timeout(600)
def test_chaos_short(redis_url: str, tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    target, draft = tiny_pair
    cfg = ChaosConfig(duration_s=28.0, fault_every_s=3.0, seed=1, clients=3)
    rep = run_chaos(redis_url, target, draft, tmp_path, cfg)
    print("\n" + rep.table() + f"\nfaults: {rep.fault_log}\nerrors: {rep.errors[:5]}")
    assert sum(rep.faults.values()) >= 5, "too few faults injected for the run to mean anything"
    assert rep.completed > 0
    assert (rep.lost, rep.duplicated, rep.wrong) == (0, 0, 0), (
        rep.table() + "\n" + "\n".join(rep.log_tails))
