"""Common prefixes of token-id sequences: how much of a cache a round can keep.

Pure Python and free of torch on purpose: the command line (``wisp-cli``, every service's
entry point) uses these, and importing torch and transformers there cost every invocation
about 4 s of CPU (``wisp-cli submit`` included) and every test that starts a service as much."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["common_prefix_len", "reusable"]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences (how much of a cache is reusable)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable(cached: Sequence[int], committed: Sequence[int]) -> int:
    """How many cached positions a round on ``committed`` can keep: the common prefix, capped so
    that the last committed id is always fed again (its logits predict the next token)."""
    return min(common_prefix_len(cached, committed), len(committed) - 1)
