"""Deliberately broken builds of the sampling path, to show that a test can fail.

``WISP_TEST_SABOTAGE=<kind>`` (read by the tests that use :func:`install`) puts a folder with a
``sitecustomize.py`` first on the PYTHONPATH of every service process the test starts; it patches
``wisp.specdec`` before any service imports it. Nothing here runs unless that variable is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_PATCHES = {
    # every drafted token is accepted and the next token comes from the target's last row
    "accept-always": '''
def _wrong(target_logits, draft, dists, temperature, generator):
    p = torch.softmax(target_logits.detach().to(torch.float64) / temperature, dim=-1)
    return len(draft), specdec._sample(p[len(draft)], generator)

specdec.accept_sampling = _wrong
''',
    # on a rejection, resample from p instead of normalise(max(0, p - q))
    "resample-from-p": '''
def _wrong(target_logits, draft, dists, temperature, generator):
    p = torch.softmax(target_logits.detach().to(torch.float64) / temperature, dim=-1)
    for i, (tok, dist) in enumerate(zip(draft, dists)):
        if specdec._uniform(generator) >= float(p[i, int(tok)]) / dist.prob_of(int(tok)):
            return i, specdec._sample(p[i], generator)
    return len(draft), specdec._sample(p[len(draft)], generator)

specdec.accept_sampling = _wrong
''',
    # the drafter's randomness depends on the process (as if seeded by consumer/process, or
    # carried across rounds): a session resumed by another drafter drafts different tokens
    "seed-by-process": '''
import os

_right = specdec.round_generator

def _wrong(seed, prefix, role):
    return _right(seed, prefix, role + (str(os.getpid()) if role == "draft" else ""))

specdec.round_generator = _wrong
''',
}

KINDS = tuple(_PATCHES)


def install(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Apply ``WISP_TEST_SABOTAGE`` (if set) to processes started from now on; returns it."""
    kind = os.environ.get("WISP_TEST_SABOTAGE")
    if not kind:
        return None
    if kind not in _PATCHES:
        raise ValueError(f"WISP_TEST_SABOTAGE={kind!r}: choose one of {', '.join(KINDS)}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import torch\nimport wisp.specdec as specdec\n" + _PATCHES[kind])
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{old}" if old else str(folder))
    return kind
