"""A verifier engine that loads no model, for measuring the pipeline's own cost.

``wisp-cli bench --null-models`` runs the real verifier service with this in place of
``VerifierEngine``: every round is accepted whole and one token of the "target's" own is added,
at once, so the verdicts are valid protocol (the drafter applies them as any other) and the
batch's measured time is only the service's own handling.
"""

from __future__ import annotations

from wisp.services.verifier.engine import VerifyItem, VerifyResult

__all__ = ["NULL_NEXT_TOKEN", "NULL_VOCAB_SIZE", "NullVerifierEngine", "null_verifier"]

NULL_NEXT_TOKEN = 33
"""The token the null verifier adds after the accepted draft."""
NULL_VOCAB_SIZE = 1 << 17
"""Token ids below this are valid, as for a real target's vocabulary (~150k)."""


class NullVerifierEngine:
    """``VerifierEngine`` without a model: ``verify`` accepts every drafted token and appends
    ``NULL_NEXT_TOKEN``; nothing is cached, every row counts as a cache hit."""

    last_forward_ms = 0.0

    def verify(self, items: list[VerifyItem], *, return_logits: bool = False) -> list[VerifyResult]:
        return [
            VerifyResult(
                session_id=it.session_id,
                accepted=len(it.draft),
                tokens=[int(t) for t in it.draft] + [NULL_NEXT_TOKEN],
                cache_hit=True,
                new_tokens=1 + len(it.draft),
                context_len=len(it.committed) + len(it.draft),
            )
            for it in items
        ]

    def drop(self, session_id: str) -> None:
        """Nothing is cached per session."""

    def sessions(self) -> dict[str, int]:
        return {}

    def ids_to_feed(self, items: list[VerifyItem]) -> list[int]:
        """As if every session were cached (every row is a cache hit): the last committed id
        and the draft, so the server runs' steps ride in every batch, as with a warm cache."""
        return [1 + len(it.draft) for it in items]


def null_verifier() -> tuple[int, NullVerifierEngine]:
    """What ``VerifierService.setup`` loads under ``settings.null_models``, in the shape it keeps
    them: (vocabulary size, engine)."""
    return NULL_VOCAB_SIZE, NullVerifierEngine()
