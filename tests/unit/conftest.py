"""Fixtures shared by the unit tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.sim_sessions import tiny_assets


@pytest.fixture(scope="module")
def assets() -> Any:
    """The tiny scenario's simulator assets, truth-model noise off (``tests.unit.sim_sessions``)."""
    return tiny_assets()
