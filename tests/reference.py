"""The ground truth for losslessness: the target model's own `generate(do_sample=False)` on the
prompt as a user would tokenize it (the HF tokenizer saved beside the target and its chat
template), computed without any of WISP's code, so a tokenisation or template bug in WISP shows
up as a mismatch instead of being fed to the reference too."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch


def load_target(path: str | Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def chat_prompt_ids(model_dir: str | Path, prompt: str) -> list[int]:
    """``prompt`` as a user turn in the target's chat template, with the assistant prefix, in
    one `apply_chat_template` call (WISP's `wisp.tokens.encode_prompt` renders the text and
    tokenizes it separately: a different path to the same ids)."""
    tok = _tokenizer(str(model_dir))
    out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
    return [int(t) for t in ids]


@lru_cache(maxsize=8)
def _tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def greedy_reference(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The target's own greedy ids for ``prompt_ids``, cached per model object for as long as
    the model lives (a weak key: the cache neither keeps a model alive, which held the 6 GB
    target in the test process for the rest of the suite, nor can it answer for another model
    that later gets the same ``id``)."""
    cache = _CACHE.setdefault(model, {})
    key = (tuple(prompt_ids), max_new_tokens)
    if key not in cache:
        ids = torch.tensor([list(prompt_ids)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=0)
        cache[key] = tuple(int(t) for t in out[0, len(prompt_ids):])
    return list(cache[key])


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[tuple[int, ...], int], tuple[int, ...]]] = (
    weakref.WeakKeyDictionary())


def mass_between(model: Any, ctx: list[int], a: int, b: int, temperature: float) -> float:
    """The target's probability (at ``temperature``) of the ids strictly between ``a`` and
    ``b`` after ``ctx``: next to nothing when a seeded draw fell on the inverse-CDF boundary
    between them (float rounding of a cached against an uncached forward can move it), real
    mass when a wrong sampler drew elsewhere in a near-uniform vocabulary."""
    lo, hi = sorted((a, b))
    with torch.inference_mode():
        logits = model(torch.tensor([ctx])).logits[0, -1].float()
    return float(torch.softmax(logits / temperature, dim=0)[lo + 1:hi].sum())
