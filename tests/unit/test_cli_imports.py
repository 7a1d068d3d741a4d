"""The command line and the model-free services start without torch or transformers.

Every ``wisp-cli`` invocation (``submit``, ``status``, each ``serve ROLE``) imports the command
line's module tree; when one command module imported torch at its top (``peers`` through
``wisp.kv``), every invocation paid about 4 s of CPU for it, and so did every test that starts a
service: the suite took 40 minutes instead of under 30. A scheduler, an estimator or a gateway
pod has no model, and a client has none either; the simulator and the controller's policy are
plain arithmetic (``TokenFeatures`` lives in the torch-free ``wisp.features`` for them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "sklearn", "llama_cpp")


@pytest.mark.parametrize("modules", [
    ["wisp.services.cli.main"],  # what every `wisp-cli ...` loads before it runs a command
    ["wisp.services.cli.main", "wisp.services.scheduler.service"],
    ["wisp.services.cli.main", "wisp.services.estimator.service"],
    ["wisp.services.cli.main", "wisp.services.gateway.service"],
    ["wisp.services.cli.main", "wisp.services.gateway.app"],  # loaded when the API starts
    ["wisp.services.cli.sim", "wisp.sim.simulator", "wisp.sim.grid"],  # `wisp-cli sim ...`
    ["wisp.services.cli.controller", "wisp.policy.controller"],  # `wisp-cli controller ...`
    ["wisp.client"],
], ids=["cli", "scheduler", "estimator", "gateway", "gateway-app", "sim", "controller", "client"])
def test_no_model_library_is_imported(modules: list[str]) -> None:
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], (
        f"importing {modules} loads a model library; import it inside the function that needs it")
