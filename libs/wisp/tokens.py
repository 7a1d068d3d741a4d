"""Prompt encoding and stop tokens, shared by the drafter, the tests and the benchmarks.

The prompt is encoded once, with the *target's* tokenizer and chat template, and both models
get the same ids (the Qwen 0.5B and 1.5B templates differ slightly).
"""

from __future__ import annotations

from typing import Any

from wisp.settings import Settings


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = True) -> list[int]:
    """Token ids of ``prompt``; with ``chat_template`` the tokenizer's template (when it has
    one) wraps it as a user turn and adds the assistant prefix."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def eos_token_ids(name: str, settings: Settings) -> list[int]:
    """The ids that end generation for the target model: its generation config's
    ``eos_token_id`` (what ``generate`` stops on), else the tokenizer's EOS."""
    from transformers import GenerationConfig

    from wisp.models import load_tokenizer, resolve_tokenizer

    path = resolve_tokenizer(name, settings.model_cache)
    ids: list[int] = []
    try:
        cfg = GenerationConfig.from_pretrained(path)
        eos = cfg.eos_token_id
        if eos is not None:
            ids = [eos] if isinstance(eos, int) else list(eos)
    except (OSError, ValueError):
        pass
    if not ids:
        tok = load_tokenizer(name, settings)
        if tok.eos_token_id is not None:
            ids = [int(tok.eos_token_id)]
    return ids
