"""Shared by the simulator's KV and engine tests: a tiny-scenario simulation with the truth
model's noise off, and hand-made sessions placed in it (their ``assets`` fixture is in
``tests/unit/conftest.py``)."""

from __future__ import annotations

from typing import Any

from wisp.policy.session import REPLAY_TOKEN
from wisp.sim.scenario import load_scenario
from wisp.sim.simulator import KV_RUNNING, Session, Simulation, load_assets
from wisp.sim.workload import RequestShape

SHORT = ["scenario.duration_s=30", "scenario.warmup_s=5", "scenario.drain_s=60"]


def tiny_assets() -> Any:
    return load_assets(load_scenario("tiny", [*SHORT, "server.noise_cv=0"]))  # the truth model: no noise


def make_sim(assets: Any, *overrides: str, mode: str = "sled") -> Simulation:
    sc = load_scenario("tiny", [*SHORT, "server.noise_cv=0", "modes.sled.max_wait_ms=0", *overrides])
    return Simulation(sc, mode, 2, assets=assets)


def make_session(sim: Simulation, i: int, prompt: int, *, generated: int = 0, drafted: int = 4,
                 running: bool = False) -> Session:
    """A session of the simulation that has generated ``generated`` tokens and drafted
    ``drafted`` for its next round (not yet at the server); ``running``: already in KV memory."""
    s = Session(f"t{i}", sim.devs[0], RequestShape(prompt, 400), 0, 0.0, False, sim.max_new)
    if generated:
        s.spec.apply([REPLAY_TOKEN] * generated, 0, 0, 0.0)
    if running:
        put_running(sim, s)
    s.r_drafted = drafted
    sim.active.add(s)
    return s


def put_running(sim: Simulation, s: Session) -> None:
    """Put ``s`` in KV memory as an already running session holding its context."""
    sim.kv.admit(s, s.prompt_len + s.pos)
    s.kv_state = KV_RUNNING
