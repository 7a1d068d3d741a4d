"""The ground truth for losslessness: the target model's own `generate(do_sample=False)`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch


def load_target(path: str | Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def greedy_reference(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return list(_cached(id(model), model, tuple(prompt_ids), max_new_tokens))


_MODELS: dict[int, Any] = {}


@lru_cache(maxsize=512)
def _key_generate(model_id: int, prompt: tuple[int, ...], max_new: int) -> tuple[int, ...]:
    model = _MODELS[model_id]
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new, pad_token_id=0)
    return tuple(int(t) for t in out[0, len(prompt):])


def _cached(model_id: int, model: Any, prompt: tuple[int, ...], max_new: int) -> tuple[int, ...]:
    _MODELS[model_id] = model
    return _key_generate(model_id, prompt, max_new)
