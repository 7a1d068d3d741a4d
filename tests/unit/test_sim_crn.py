"""Common random numbers: a device asks the same request sequence (shapes, acceptance starts,
think times) in wisp, sled and centralized, at any device count, whatever the event order; a
different seed changes it. The requests are read off the sessions the simulator actually
created, not off the random streams, so a mode that drew an extra request would fail here."""

from __future__ import annotations

from typing import Any

import pytest
import wisp.sim.simulator as simulator
from wisp.sim.scenario import load_scenario
from wisp.sim.simulator import Simulation, load_assets

SHORT = ["scenario.duration_s=30", "scenario.warmup_s=5", "scenario.drain_s=60"]
MODES = ("wisp", "sled", "centralized")


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    sc = load_scenario("tiny", SHORT)
    return sc, load_assets(sc)


def _run(sc: Any, assets: Any, mode: str, devices: int, seed: int,
         monkeypatch: pytest.MonkeyPatch) -> tuple[Simulation, dict[int, list[tuple[Any, ...]]]]:
    """Run one simulation; per device, the (request index, prompt, output, acceptance start)
    of every session it opened, in submission order."""
    opened: dict[int, list[tuple[Any, ...]]] = {}

    class Spy(simulator.Session):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            opened.setdefault(self.dev.index, []).append(
                (self.req_index, self.prompt_len, self.out_len, self.seq_start))

    with monkeypatch.context() as m:
        m.setattr(simulator, "Session", Spy)
        sim = Simulation(sc, mode, devices, assets=assets, seed=seed)
        sim.run()
    return sim, opened


def _distinct(reqs: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """A device's requests without the retries of a refused one (same index, same request)."""
    out: list[tuple[Any, ...]] = []
    for r in reqs:
        if out and out[-1][0] == r[0]:
            assert out[-1] == r, "a retry must resubmit the same request"
            continue
        out.append(r)
    return out


def _common_prefix_equal(seqs: list[list[Any]]) -> int:
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        assert s[:n] == seqs[0][:n]
    return n


def test_a_device_asks_the_same_requests_in_every_mode(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    sc, assets = tiny
    runs = {mode: _run(sc, assets, mode, 12, 0, monkeypatch) for mode in MODES}
    compared = 0
    for dev in range(12):
        per_mode = [_distinct(runs[mode][1][dev]) for mode in MODES]
        for reqs in per_mode:  # the k-th session of a device is its k-th planned request
            assert [r[0] for r in reqs] == list(range(len(reqs)))
        compared += _common_prefix_equal(per_mode)
        thinks = [runs[mode][0].streams[dev].thinks for mode in MODES]
        _common_prefix_equal(thinks)
        assert min(len(t) for t in thinks) >= 1
    assert compared >= 12 * 3  # several requests per device were compared
    # and the modes did run differently on them (else the test would compare nothing)
    ttft = {mode: [r.ttft_ms for r in runs[mode][0].records] for mode in MODES}
    assert ttft["wisp"] != ttft["sled"] != ttft["centralized"]


def test_the_sequence_does_not_depend_on_the_other_devices(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Device i's requests are keyed on (seed, i): adding devices (other event orders, other
    batches) leaves them as they were."""
    sc, assets = tiny
    _, small = _run(sc, assets, "sled", 6, 0, monkeypatch)
    _, large = _run(sc, assets, "sled", 20, 0, monkeypatch)
    for dev in range(6):
        assert _common_prefix_equal([_distinct(small[dev]), _distinct(large[dev])]) >= 2


def test_a_refused_request_is_retried_without_shifting_the_sequence(
        tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission control (wisp only) refuses; the user retries the same request, so the
    device's later requests stay those of the other modes."""
    sc, assets = tiny
    tight = load_scenario("tiny", [*SHORT, "slo.ttft_ms=5", "slo.tpot_ms=1"])  # every request refused
    wisp_sim, wisp_reqs = _run(tight, assets, "wisp", 6, 0, monkeypatch)
    _, sled_reqs = _run(tight, assets, "sled", 6, 0, monkeypatch)
    assert wisp_sim.refused > 6
    for dev in range(6):
        attempts = wisp_reqs[dev]
        assert len(attempts) > 1 and {r[0] for r in attempts} == {0}  # request 0, again and again
        assert _distinct(attempts) == _distinct(sled_reqs[dev])[:1]


def test_another_seed_changes_the_requests(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    sc, assets = tiny
    a_sim, a = _run(sc, assets, "sled", 8, 0, monkeypatch)
    b_sim, b = _run(sc, assets, "sled", 8, 1, monkeypatch)
    assert [_distinct(a[d])[:2] for d in range(8)] != [_distinct(b[d])[:2] for d in range(8)]
    assert [s.thinks[:1] for s in a_sim.streams] != [s.thinks[:1] for s in b_sim.streams]
