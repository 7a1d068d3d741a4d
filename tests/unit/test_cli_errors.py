"""Bad flags, absurd SLOs and unknown models are refused with one line saying what to fix."""

from __future__ import annotations

import os

import pytest

from tests.harness import cli

ENV = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["submit", "hi", "--ttft-slo-ms", "0"], 2, "--ttft-slo-ms"),
    (["submit", "hi", "--tpot-slo-ms", "-5"], 2, "--tpot-slo-ms"),
    (["submit", "hi", "--tpot-slo-ms", "1e12"], 2, "--tpot-slo-ms"),
    (["submit", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["submit", "hi", "--temperature", "nan"], 2, "--temperature"),
    (["serve", "gpu-thing"], 2, "not a service"),
    (["serve", "drafter", "--target-model", "qwen-coder-7b", "--redis-url", "redis://127.0.0.1:1"],
     1, "unknown model 'qwen-coder-7b'"),
    (["serve", "verifier", "--mode", "turbo"], 2, "--mode"),
    (["bench", "--mode", "wisp,fast"], 2, "unknown mode"),
    (["bench", "--devices", "1,0"], 2, "--devices"),
    (["bench", "--null-models", "--redis-url", "redis://127.0.0.1:1"], 2, "--redis-url"),
    (["models", "prepare", "llama-70b"], 1, "unknown model alias"),
])
def test_refused_with_one_line(args: list[str], code: int, needle: str) -> None:
    res = cli(args, ENV, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert lines[0].startswith("wisp-cli: error:")


def test_bench_runs_pool_into_one_row_per_mode() -> None:
    """`wisp-cli bench --repeat`: alternating runs of a mode pool their requests and durations."""
    from wisp.bench import BenchConfig, BenchResult, table_rows
    from wisp.metrics import RequestRecord

    cfg = BenchConfig(devices=1, duration_s=1.0, prompts=("p",))

    def rec(tpot: float) -> RequestRecord:
        return RequestRecord(ttft_ms=100.0, tpot_ms=tpot, e2e_ms=1000.0, tokens=10,
                             ttft_slo_ms=1000.0, tpot_slo_ms=200.0)

    a = BenchResult("wisp", cfg, records=[rec(100.0), rec(300.0)], duration_s=10.0)
    b = BenchResult("wisp", cfg, records=[rec(150.0), rec(120.0)], duration_s=30.0, stream_mismatches=1)
    m = a.merged(b)
    assert len(m.records) == 4 and m.duration_s == 40.0 and m.stream_mismatches == 1
    assert m.summary.slo_attainment == 0.75
    header, body = table_rows([{**m.as_dict(), "run": "all"}], with_run=True)
    assert header[:2] == ["mode", "run"] and body[0][:2] == ["wisp", "all"]
    assert table_rows([m.as_dict()])[0][1] == "devices"


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """Ports handed to services are never ones the kernel may give a client socket meanwhile."""
    import socket

    from wisp.services.runner import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    assert len(ports) > 10  # random, so parallel pickers rarely collide
    with socket.socket() as s:
        s.bind(("0.0.0.0", ports.pop()))  # and really free


def test_free_port_never_hands_out_the_same_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that picks every pod's ports before starting any (the rendered-deployment test)
    must get distinct ports even when the random draw repeats itself; CI once gave a gateway's
    API port to a second pod this way."""
    from wisp.services import runner

    draws = iter([21_000, 21_000, 21_000, 21_001])

    class Repeating:
        def randrange(self, start: int, stop: int) -> int:
            return next(draws)

    monkeypatch.setattr(runner.random, "SystemRandom", Repeating)
    monkeypatch.setattr(runner, "_ISSUED", set())
    first, second = runner.free_port(), runner.free_port()
    assert first == 21_000 and second == 21_001


def test_a_named_controller_that_does_not_load_is_one_line() -> None:
    res = cli(["serve", "drafter", "--mode", "wisp", "--redis-url", "redis://127.0.0.1:1"],
              {**ENV, "WISP_CONTROLLER": "/nonexistent/controller.json"}, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stderr
    assert len(lines) == 1 and lines[0].startswith("wisp-cli: error:"), res.stderr
    assert "WISP_CONTROLLER" in lines[0] and "/nonexistent/controller.json" in lines[0]
