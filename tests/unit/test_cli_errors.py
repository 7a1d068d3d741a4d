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
    (["models", "prepare", "llama-70b"], 1, "unknown model alias"),
])
def test_refused_with_one_line(args: list[str], code: int, needle: str) -> None:
    res = cli(args, ENV, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert lines[0].startswith("wisp-cli: error:")
