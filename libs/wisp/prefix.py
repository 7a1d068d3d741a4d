"""Prefixes of token-id sequences: how much of a cache a round can keep, and their digests.

Pure Python and free of torch on purpose: the command line (``wisp-cli``, every service's
entry point) uses these, and importing torch and transformers there cost every invocation
about 4 s of CPU (``wisp-cli submit`` included) and every test that starts a service as much."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["PrefixDigest", "common_prefix_len", "reusable"]


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


class PrefixDigest:
    """``digest_ids`` of a prefix that grows: each appended id costs O(1), where digesting the
    whole prefix again costs O(length) (a server run samples every step under its prefix's
    digest)."""

    def __init__(self, ids: Sequence[int] = ()) -> None:
        self._h = hashlib.blake2b(digest_size=8)
        self._empty = True
        self.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        text = ",".join(map(str, ids))
        self._h.update((text if self._empty else "," + text).encode())
        self._empty = False

    def hexdigest(self) -> str:
        return self._h.hexdigest()
