"""`wisp-cli peers`' llama.cpp speculative loop, on the smallest packaged GGUF (SmolLM2-135M).

The peer comparison quotes llama.cpp speculative decoding beside WISP, so its loop must be what it
claims: whatever the draft proposes (the model itself, garbage, nothing), the output is the
llama.cpp target's own greedy output, token for token, and it stops on the budget and on EOS as
the plain loop does. The plain loop is checked against the engine's own greedy decode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from wisp import models
from wisp.services.cli.peers import LlamaCppProposer, llamacpp_greedy, llamacpp_speculative
from wisp.services.drafter.llamacpp_binding import LlamaModel
from wisp.settings import Settings

ALIAS = "smollm2-135m"


@pytest.fixture(scope="module")
def gguf() -> Path:
    models.pip_install_missing(models.REGISTRY[ALIAS].requirements)
    return models.draft_gguf(ALIAS, Settings().model_cache)


@pytest.fixture(scope="module")
def target(gguf: Path) -> Iterator[LlamaModel]:
    m = LlamaModel(gguf, n_ctx=512, n_seq=1, n_threads=1, n_batch=512)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompt(target: LlamaModel) -> list[int]:
    return target.tokenize("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")


@pytest.fixture(scope="module")
def greedy(target: LlamaModel, prompt: list[int]) -> list[int]:
    return llamacpp_greedy(target, prompt, 24, set())


def test_the_plain_loop_is_the_models_greedy_continuation(target: LlamaModel, prompt: list[int],
                                                          greedy: list[int]) -> None:
    """Feeding prompt + greedy[:i] afresh gives greedy[i] as the argmax, at every i."""
    import numpy as np

    for i in (0, 5, 23):
        target.seq_rm(0, 0)
        ids = [*prompt, *greedy[:i]]
        logits = target.decode([(t, j, 0, j == len(ids) - 1) for j, t in enumerate(ids)])
        assert int(np.argmax(logits[-1])) == greedy[i]


def _wrong(context: Sequence[int], n: int) -> list[int]:
    return [(int(context[-1]) + 7 + i) % 1000 for i in range(n)]


def _right_then_wrong(answer: list[int], n_prompt: int) -> object:
    def propose(context: Sequence[int], n: int) -> list[int]:
        done = len(context) - n_prompt
        return [*answer[done:done + 2], 3][:n]  # two right, then one wrong
    return propose


@pytest.mark.parametrize("kind", ["self", "wrong", "empty", "partly"])
def test_speculation_gives_the_targets_own_output(kind: str, gguf: Path, target: LlamaModel,
                                                  prompt: list[int], greedy: list[int]) -> None:
    draft = None
    if kind == "self":
        draft = LlamaModel(gguf, n_ctx=512, n_seq=1, n_threads=1, n_batch=512)
        propose = LlamaCppProposer(draft, p_min=0.0)
    elif kind == "wrong":
        propose = _wrong
    elif kind == "empty":
        def propose(context: Sequence[int], n: int) -> list[int]:
            return []
    else:
        propose = _right_then_wrong(greedy, len(prompt))
    try:
        out, stats = llamacpp_speculative(target, propose, prompt, 24, set(), n_max=5)
    finally:
        if draft is not None:
            draft.close()
    assert out == greedy, kind
    if kind == "self":  # the model drafting for itself: every draft id is accepted
        assert stats["accepted"] == stats["drafted"] > 0 and stats["rounds"] < 24 // 2
    if kind in ("wrong", "empty"):
        assert stats["accepted"] == 0 and stats["rounds"] == 23
    if kind == "partly":
        assert stats["accepted"] > 0 and stats["accepted"] < stats["drafted"]


def test_budget_and_eos_end_it_as_the_plain_loop_does(target: LlamaModel, prompt: list[int],
                                                      greedy: list[int]) -> None:
    eos = {greedy[9]}
    first = greedy.index(greedy[9]) + 1
    assert llamacpp_greedy(target, prompt, 24, eos) == greedy[:first]
    out, _ = llamacpp_speculative(target, _right_then_wrong(greedy, len(prompt)), prompt, 24, eos, 5)
    assert out == greedy[:first]
    for budget in (1, 2, 7):
        out, _ = llamacpp_speculative(target, _right_then_wrong(greedy, len(prompt)), prompt,
                                      budget, set(), 5)
        assert out == greedy[:budget]


def test_the_proposer_stops_after_an_unsure_token(gguf: Path, prompt: list[int]) -> None:
    """p_min = 1 keeps one token per round (llama.cpp keeps the token that fell under p_min);
    p_min = 0 drafts the full n."""
    draft = LlamaModel(gguf, n_ctx=512, n_seq=1, n_threads=1, n_batch=512)
    try:
        assert len(LlamaCppProposer(draft, p_min=1.0)(prompt, 6)) == 1
        draft.seq_rm(0, 0)
        full = LlamaCppProposer(draft, p_min=0.0)
        first = full(prompt, 6)
        assert len(first) == 6
        assert full([*prompt, *first[:3]], 6)[:3] == first[3:6]  # cached prefix reused, same ids
    finally:
        draft.close()

