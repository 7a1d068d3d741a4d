"""The simulator's adaptive site choice (``modes.wisp.site = "adaptive"``): the drafter service's
``SiteChooser`` decides per round whether a session drafts or the server decodes it."""

from __future__ import annotations

import pytest
from wisp.sim.scenario import ScenarioError, load_scenario, with_overrides
from wisp.sim.simulator import simulate

SHORT = ["scenario.duration_s=40", "scenario.warmup_s=10", "scenario.drain_s=60"]


def run(mix: str, site: str, devices: int = 24, seed: int = 0):
    sc = with_overrides(load_scenario("paper"), [*SHORT, f"devices.mix={mix}", f"modes.wisp.site={site}"])
    return simulate(sc, "wisp", devices, seed=seed)


def test_speculate_never_hands_a_session_to_the_server() -> None:
    r = run("{raspberry_pi_5 = 1.0}", "speculate")
    assert r.info["server_decoded_tokens"] == 0 and r.info["site_moves"] == 0


def test_slow_devices_are_decoded_by_the_server_fast_ones_draft_more() -> None:
    slow = run("{raspberry_pi_5 = 1.0}", "adaptive")
    fast = run("{jetson_agx_orin = 1.0}", "adaptive")
    share = {}
    for name, r in (("slow", slow), ("fast", fast)):
        tokens = sum(x.tokens for x in r.records)
        assert tokens > 0 and r.info["site_moves"] > 0
        share[name] = r.info["server_decoded_tokens"] / tokens
    assert share["slow"] > 0.5
    assert share["fast"] < share["slow"]
    # the server decodes slow devices' tokens faster than they could draft and send them
    spec = run("{raspberry_pi_5 = 1.0}", "speculate")
    assert slow.summary["tpot_p50_ms"] < spec.summary["tpot_p50_ms"]


def test_adaptive_runs_are_deterministic_per_seed() -> None:
    a, b = run("{phone = 1.0}", "adaptive", seed=3), run("{phone = 1.0}", "adaptive", seed=3)
    assert a.summary == b.summary and a.info["server_decoded_tokens"] == b.info["server_decoded_tokens"]


def test_a_bad_site_is_refused_in_one_line() -> None:
    with pytest.raises(ScenarioError, match="site"):
        with_overrides(load_scenario("paper"), ["modes.wisp.site=sometimes"]).validate()


def test_an_undrafted_round_hands_a_run_to_the_server_as_in_the_drafter() -> None:
    """A controller that leaves rounds undrafted (k = 0 after the prefill round) hands
    ``server_run_rounds`` tokens to the server, the drafter service's rule
    (``SpecSession.plan(server_run=)``); with 0, every such token is a round trip."""
    def go(rounds: int):
        sc = with_overrides(load_scenario("paper"), [
            *SHORT, "devices.mix={phone = 1.0}", "modes.wisp.controller='fixed'",
            "modes.wisp.draft_k=0", f"modes.wisp.server_run_rounds={rounds}"])
        return simulate(sc, "wisp", 8, seed=1)

    runs, hops = go(32), go(0)
    tokens = sum(x.tokens for x in runs.records)
    assert runs.info["server_runs"] > 0 and runs.info["server_run_tokens"] > tokens / 2
    assert hops.info["server_runs"] == 0 and hops.info["server_run_tokens"] == 0
    # no edge round trip per token: the tokens come faster
    assert runs.summary["tpot_p50_ms"] < hops.summary["tpot_p50_ms"]
