"""CPU lists for `--isolate-cores`: parsed strictly, split so each role gets its own cores."""

from __future__ import annotations

import os

import pytest
from wisp.cpus import CpuSetError, format_cpus, parse_cpus, split_cores
from wisp.settings import Settings


def test_parse_and_format_round_trip() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    text = format_cpus(cpus)
    assert parse_cpus(text) == frozenset(cpus)
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert parse_cpus("") == frozenset()


@pytest.mark.parametrize("bad", ["x", "3-1", "0,,a", "1-"])
def test_malformed_lists_are_refused(bad: str) -> None:
    with pytest.raises(CpuSetError, match="CPU list"):
        parse_cpus(bad)


def test_a_cpu_this_process_may_not_use_is_refused_in_settings() -> None:
    outside = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match="not available"):
        Settings(verifier_cpus=str(outside))


def test_split_gives_the_verifier_the_first_half_and_never_shares() -> None:
    assert split_cores([0, 1]) == (frozenset({0}), frozenset({1}))
    assert split_cores([0, 1, 2]) == (frozenset({0, 1}), frozenset({2}))
    v, d = split_cores(range(8))
    assert v == frozenset(range(4)) and d == frozenset(range(4, 8))
    with pytest.raises(CpuSetError, match="at least 2"):
        split_cores([3])
