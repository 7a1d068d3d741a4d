"""`wisp-cli sim grid`'s arithmetic without simulating: the capacity search on synthetic
attainment curves whose crossing is known, and the bound/regime formulas on hand-made numbers
(``wisp.sim.grid``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from wisp.policy.session import SessionSpecStats
from wisp.sim.grid import (
    MIXES,
    CapacitySearch,
    Cell,
    GridError,
    GridParams,
    PrefillFixed,
    Roofline,
    bound_and_regime,
    capacity_point,
    cell_scenario,
    check_axes,
    classify,
    device_round_ms,
    kv_lifetime_bound,
    run_search,
    tau_of,
    throughput_bound,
)
from wisp.sim.scenario import RooflineCfg, Scenario, load_scenario
from wisp.sim.server import RooflineModel

OFFSETS = (-0.02, -0.01, 0.0, 0.01, 0.02)
"""Five seeds around the true curve: sd 0.0158, 95% half-width 2.776 x 0.0158 / sqrt(5) = 0.0196."""
HALF = 2.776 * math.sqrt(sum(o * o for o in OFFSETS) / 4) / math.sqrt(5)


def knee(at: float = 100.0, slope: float = 0.01) -> Callable[[int], list[float]]:
    """Attainment 1.0 up to ``at`` devices, then down ``slope`` per device (0.9 at at + 10)."""
    def f(n: int) -> list[float]:
        a = 1.0 if n <= at else 1.0 - slope * (n - at)
        return [a + o for o in OFFSETS]
    return f


def counting(f: Callable[[int], list[float]]) -> tuple[Callable[[int], list[float]], list[int]]:
    seen: list[int] = []

    def g(n: int) -> list[float]:
        seen.append(n)
        return f(n)
    return g, seen


@pytest.mark.parametrize(("guess", "most"), [(40, 14), (110, 12), (400, 14), (1, 22)])
def test_search_finds_a_known_crossing_from_any_guess(guess: int, most: int) -> None:
    f, seen = counting(knee())
    s = CapacitySearch(guess, factor=1.5, bisect=4, edge_steps=2, tol=0.01)
    cap = run_search(s, f)
    # the curve is linear past 100, so once the bracket is on the slope the interpolation is exact:
    # mean 110; the band's lower edge crosses 90% where the curve is 0.9 + HALF, the upper where 0.9 - HALF
    assert cap["status"]["mean"] == "crossed"
    assert cap["mean"] == pytest.approx(110.0, abs=0.5)
    assert cap["lo"] == pytest.approx(110.0 - HALF / 0.01, abs=1.0)
    assert cap["hi"] == pytest.approx(110.0 + HALF / 0.01, abs=1.0)
    # no count twice; a handful of points from a fair guess (x1.5 steps: ~12 from a guess of 1)
    assert len(seen) == len(set(seen)) and len(seen) <= most, seen
    assert capacity_point(cap) == 109 or capacity_point(cap) == 110


def test_search_brackets_geometrically_then_bisects() -> None:
    f, seen = counting(knee(at=300))
    cap = run_search(CapacitySearch(40, factor=2.0, bisect=3, edge_steps=0, edge_extend=0), f)
    # up by x2 while above the target: 40, 80, 160, 320 (0.8 < 0.9), then bisect (160, 320) 3 times
    assert seen[:4] == [40, 80, 160, 320]
    assert seen[4:] == [240, 280, 300]
    assert cap["mean"] == pytest.approx(300 + (1.0 - 0.9) / (1.0 - 0.8) * 20, abs=1e-6)


def test_search_steps_down_from_a_high_guess() -> None:
    f, seen = counting(knee(at=20, slope=0.02))  # crossing at 25
    cap = run_search(CapacitySearch(200, factor=2.0, bisect=3, edge_steps=0, edge_extend=0), f)
    assert seen[:4] == [200, 100, 50, 25]  # 25 is exactly 0.9: attained
    assert cap["mean"] == pytest.approx(25.0, abs=1.0)


def test_search_stops_at_its_limits_and_says_so() -> None:
    always = run_search(CapacitySearch(100, max_devices=500, edge_extend=0),
                        lambda n: [0.99, 0.98, 1.0])
    assert always["status"]["mean"] == "above" and always["censored"] == "above"
    assert always["swept"][1] == 500 and capacity_point(always) == 500
    never = run_search(CapacitySearch(100), lambda n: [0.2, 0.3])
    assert never["status"]["mean"] == "below" and never["swept"][0] == 1
    assert capacity_point(never) is None
    with pytest.raises(ValueError):
        CapacitySearch(10, factor=1.0)


def test_search_reuses_points_it_was_told() -> None:
    s = CapacitySearch(40, factor=2.0, bisect=0, edge_steps=0, edge_extend=0)
    s.tell(80, [0.8, 0.8])
    assert s.next_points() == [40]  # 80 known and below; the guess is new
    s.tell(40, [1.0, 1.0])
    assert s.next_points() == [] and s.done


# ---------------------------------------------------------------------- analytic parts
def hand_roofline() -> Roofline:
    # W = 2e9 bytes at 1e9 bytes/ms = 2 ms; 1e11 flops/ms; 1e6 bytes and 1e6 attention flops per token
    return Roofline(RooflineCfg(params_b=1.0, weight_bytes_per_param=2.0, kv_bytes_per_token=1e6,
                                hbm_gb_s=1000.0, mem_efficiency=1.0, peak_tflops=100.0,
                                compute_efficiency=1.0, fixed_ms=1.0, attn_flops_per_token_ctx=1e6))


def test_roofline_parts_on_hand_made_numbers() -> None:
    p = hand_roofline().parts(10, 10, 90)
    assert p["weights_ms"] == pytest.approx(2.0)
    assert p["kv_ms"] == pytest.approx(10 * 100 * 1e6 / 1e9)  # 1 ms
    assert p["compute_ms"] == pytest.approx((2e9 * 100 + 1e6 * 100 * 95) / 1e11)  # 2.095 ms
    assert p["total_ms"] == pytest.approx(1.0 + 3.0)  # memory (3 ms) beats compute


def test_roofline_equals_the_simulators_truth_model() -> None:
    cfg = RooflineCfg()  # the paper's A100 / 32B numbers
    rl, model = Roofline(cfg), RooflineModel(cfg, 0.0)
    for rows, new, ctx in ((1, 1, 100), (16, 5, 400), (64, 9, 2000)):
        assert rl.ms(rows, new, ctx) == pytest.approx(model.mean_ms([new] * rows, [ctx] * rows))


def test_throughput_bound_is_tau_when_memory_bound_and_less_when_compute_bound() -> None:
    rl = hand_roofline()
    tb = throughput_bound(rl, 1, 100, 3.0)  # one row: weights dominate
    t1, t3 = 1.0 + 2.0 + 101e6 / 1e9, 1.0 + 2.0 + 103e6 / 1e9
    assert tb["ratio"] == pytest.approx(3.0 * t1 / t3)
    assert 2.9 < tb["ratio"] < 3.0
    big = throughput_bound(rl, 500, 10, 3.0)  # 500 rows on short contexts: compute dominates
    assert big["verify"]["compute_ms"] > big["verify"]["memory_ms"]
    assert big["ratio"] < 0.75 * 3.0


def test_tau_counts_the_matched_run_capped_at_k_around_the_ring() -> None:
    m = [True, True, False, True]
    # runs from each position, wrapping: 2 (TT), 1 (T), 0, 2 (T then the ring's first T)
    assert tau_of(m, 2) == pytest.approx(1 + (2 + 1 + 0 + 2) / 4)
    assert tau_of(m, 1) == pytest.approx(1 + 3 / 4)
    assert tau_of(m, 0) == 1.0 and tau_of([], 4) == 1.0
    assert tau_of([True] * 5, 3) == 4.0


def test_kv_lifetime_bound_on_hand_made_numbers() -> None:
    # 100 tokens: 5 s at 50 ms/token (baseline), 2.5 s at 25 ms/token; think 20 s
    assert kv_lifetime_bound(20.0, 100.0, 50.0, 25.0) == pytest.approx((22.5 / 2.5) / (25.0 / 5.0))
    assert kv_lifetime_bound(20.0, 100.0, 50.0, 50.0) == pytest.approx(1.0)


def test_classify_order_and_thresholds() -> None:
    kw = {"compute_ms": 1.0, "memory_ms": 2.0}
    assert classify(device_share_over=0.5, kv_fill=1.0, **kw) == "device"
    assert classify(device_share_over=0.1, kv_fill=1.0, **kw) == "kv"  # exactly 1 - target: not device
    assert classify(device_share_over=0.0, kv_fill=0.95, **kw) == "kv"
    assert classify(device_share_over=0.0, kv_fill=0.9, **kw) == "memory"
    assert classify(device_share_over=0.0, kv_fill=None, compute_ms=3.0, memory_ms=2.0) == "compute"


def hand_scenario() -> Scenario:
    sc = load_scenario("paper", [
        "devices.mix={fast = 0.75, slow = 0.25}",
        "devices.classes={fast = {draft_tokens_per_s = 50.0, network = 'n'}, "
        "slow = {draft_tokens_per_s = 5.0, network = 'n'}}",
        "network.classes={n = {rtt_ms = 20.0, jitter_ms = 2.0, uplink_mbps = 8.0, downlink_mbps = 24.0}}",
        "network.round_overhead_ms=1.0", "devices.block_header_bytes=400",
        "devices.bytes_per_draft_token=100", "devices.verdict_bytes=300", "slo.tpot_ms=100.0"])
    return sc


def test_device_round_on_hand_made_numbers() -> None:
    r = device_round_ms(hand_scenario(), 2)
    # 2 drafts at 50 tok/s + RTT + 2 x jitter + overhead + 600 B up at 8 Mb/s + 300 B down at 24 Mb/s
    assert r["fast"] == pytest.approx(40.0 + 20.0 + 4.0 + 1.0 + 0.6 + 0.1)
    assert r["slow"] == pytest.approx(400.0 + 20.0 + 4.0 + 1.0 + 0.6 + 0.1)


def test_bound_and_regime_from_a_hand_made_baseline_point() -> None:
    from wisp.sim.grid import CellModel

    sc = hand_scenario()
    cm = CellModel(tau_k=2.0, tau_max=3.0, k=2, k_max=4, prompt_mean=200.0, out_mean=100.0)
    point = {"throughput_tokens_per_s": 400.0, "tpot_mean_ms": 50.0, "kv_peak_tokens": 10000}
    b = bound_and_regime(sc, cm, point, "centralized", 80)
    rl = Roofline(sc.server.roofline)
    # Little's law: 400 tok/s x 0.05 s per token = 20 sessions decoding, on 200 + 100 / 2 tokens
    assert b["rows"] == pytest.approx(20.0) and b["context_tokens"] == pytest.approx(250.0)
    assert b["throughput_ratio"] == pytest.approx(3.0 * rl.ms(20, 1, 250) / rl.ms(20, 3.0, 250))
    # the slow class (25% of devices) needs 425.7 ms per round, over 2 x 100 ms: device-bound
    assert b["device_share_over_budget"] == pytest.approx(0.25) and b["regime"] == "device"
    assert b["kv_fill"] == pytest.approx(10000 / sc.server.kv_tokens)
    # without the slow class and with a full KV pool: KV-bound, bounded by the lifetime ratio too
    sc.devices.mix = {"fast": 1.0}
    full = bound_and_regime(sc, cm, {**point, "kv_peak_tokens": sc.server.kv_tokens}, "centralized", 80)
    assert full["regime"] == "kv" and full["kv_lifetime_ratio"] is not None
    assert full["ratio"] == pytest.approx(min(full["throughput_ratio"], full["kv_lifetime_ratio"]))
    per_tok = (device_round_ms(sc, 2.0)["fast"] + rl.ms(20, 3.0, 250)) / 3.0
    assert full["kv_lifetime_ratio"] == pytest.approx(kv_lifetime_bound(sc.workload.think_s, 100.0, 50.0,
                                                                        per_tok))
    # a small batch on a half-empty pool: memory-bound, the bound is about tau
    light = bound_and_regime(sc, cm, {**point, "throughput_tokens_per_s": 20.0, "kv_peak_tokens": 100},
                             "centralized", 5)
    assert light["regime"] == "memory" and 2.8 < light["ratio"] <= 3.0


# ---------------------------------------------------------------------- cells and the ablation
def test_prefill_fixed_sends_round_zero_undrafted_then_k() -> None:
    pol = PrefillFixed(4)
    st = SessionSpecStats()
    first = pol.plan(st, 100)
    assert first.max_k == 0 and first.prefill
    st.rounds = 1
    assert pol.plan(st, 100).max_k == 4 and not pol.plan(st, 100).prefill
    assert pol.plan(st, 2).max_k == 2


def test_a_cell_is_the_base_scenario_with_its_axis_values() -> None:
    base = load_scenario("paper")
    sc = cell_scenario(base, Cell(50000, "slow", 0.6, "ragged"))
    assert sc.server.kv_tokens == 50000 and sc.devices.mix == MIXES["slow"]
    assert sc.acceptance.target_rate == 0.6
    assert cell_scenario(base, Cell(30000, "fast", 0.0, "ragged")).devices.mix == {"jetson_agx_orin": 1.0}
    if hasattr(base.server, "engine"):
        assert cell_scenario(base, Cell(30000, "paper", 0.0, "padded")).server.engine == "padded"


def test_axes_are_checked_with_what_to_fix() -> None:
    sc = load_scenario("paper")
    with pytest.raises(GridError, match="unknown device mix"):
        check_axes(sc, GridParams(mixes=["medium"]))
    with pytest.raises(GridError, match="acceptance"):
        check_axes(sc, GridParams(acceptance=[1.5]))
    with pytest.raises(GridError, match="unknown mode"):
        check_axes(sc, GridParams(modes=["wisp", "eagle"]))
    with pytest.raises(GridError, match="jetson_agx_orin"):
        check_axes(load_scenario("local"), GridParams(mixes=["fast"]))
    p = check_axes(sc, GridParams())
    assert len(p.cells()) == 3 * 3 * 2 * len(p.engines)


def test_the_adaptive_wisp_mode_runs_wisp_with_the_site_choice() -> None:
    from wisp.sim.grid import ADAPTIVE, DEFAULT_MODES, simulate_mode
    from wisp.sim.scenario import load_scenario, with_overrides
    from wisp.sim.simulator import load_assets

    assert ADAPTIVE not in DEFAULT_MODES
    sc = with_overrides(load_scenario("paper"), ["scenario.duration_s=20", "scenario.warmup_s=5",
                                                 "devices.mix={raspberry_pi_5 = 1.0}"])
    assets = load_assets(sc)
    adaptive = simulate_mode(sc, ADAPTIVE, 12, assets, 0)
    plain = simulate_mode(sc, "wisp", 12, assets, 0)
    assert adaptive.info["site"] == "adaptive" and adaptive.info["server_decoded_tokens"] > 0
    assert plain.info["site"] == "speculate" and plain.info["server_decoded_tokens"] == 0
