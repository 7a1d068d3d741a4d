"""wisp-cli peers: one request on this machine, WISP against what a user could run instead.

Why a command of its own: a user choosing WISP for one box asks how it compares with the
single-process alternatives, measured side by side on the same prompt, machine and moment. Each
peer answers the same prompt ids (the target's chat template), greedily, up to the same number
of new tokens; the clock runs from the prompt to the last token (prefill included), after one
short untimed warm-up per peer (weights paged in), with model loading timed apart:

* ``hf-generate``: the target alone, ``transformers`` ``generate(do_sample=False)`` (torch fp32);
* ``hf-assisted``: the same with the draft model as ``assistant_model`` (transformers' assisted
  generation, its own default draft-length schedule);
* ``llamacpp``: the target's packaged Q4_K_M GGUF alone through llama.cpp, greedy (a quantized
  target: not token-identical to the fp32 target, so its ids are compared and the agreement is
  reported, never assumed);
* ``llamacpp-spec``: llama.cpp speculative decoding with the two GGUFs, the algorithm of
  llama.cpp's speculative example and server (greedy: the draft proposes up to ``--spec-n-max``
  tokens, stopping after the first whose probability is under ``--spec-p-min``; the target
  checks them in one batch and keeps the longest agreeing prefix plus its own next token;
  defaults 16 and 0.75 are llama-server's ``--draft-max`` / ``--draft-p-min`` defaults of its
  mid-2025 builds, b6000);
* ``wisp-<mode>``: WISP with one device in ``sled``, ``centralized`` and ``wisp`` mode, all four
  services in this process on an embedded Redis (as ``wisp-cli demo``), the draft backend as
  configured (llama.cpp on the packaged GGUF by default).

It prints a table (tokens/s, seconds, speed against ``hf-generate``, whether the ids equal the
fp32 target's greedy ids) and writes JSON with the machine and its load.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from wisp.prefix import common_prefix_len
from wisp.services.cli.common import (
    DraftBackendOpt,
    IsolateOpt,
    fail,
    fmt,
    isolate_cores,
    make_settings,
    output_path,
    preflight_models,
    print_table,
    quiet_logging,
    run_async,
    say,
)

app = typer.Typer()

PEERS = ("hf-generate", "hf-assisted", "llamacpp", "llamacpp-spec", "wisp-sled",
         "wisp-centralized", "wisp-wisp")
DEFAULT_PROMPT = ("Write a Python class for a binary search tree with insert, delete, search and "
                  "an in-order traversal, each method with a docstring.")
"""A code answer far longer than 64 tokens, so every peer runs the whole budget."""

Proposer = Callable[[Sequence[int], int], list[int]]
"""``(context ids, at most n) -> draft ids`` continuing the context."""


@dataclass
class Run:
    """One peer's answer and its timing."""

    peer: str
    engine: str
    token_ids: list[int]
    seconds: float
    load_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


# ------------------------------------------------------------------------------ llama.cpp loops
def _feed(model: Any, ids: Sequence[int], start: int, all_logits: bool) -> np.ndarray:
    """Decode ``ids`` at positions ``start..`` of sequence 0 in ``n_batch`` chunks; the logits
    of every fed id (``all_logits``) or of the last one only."""
    rows = []
    for lo in range(0, len(ids), model.n_batch):
        chunk = ids[lo:lo + model.n_batch]
        last = lo + len(chunk) == len(ids)
        rows.append(model.decode([(int(t), start + lo + j, 0,
                                   all_logits or (last and j == len(chunk) - 1))
                                  for j, t in enumerate(chunk)]))
    return np.concatenate([r for r in rows if len(r)])


def _cut(model: Any, start: int) -> None:
    """Drop sequence 0's positions ``>= start``; a model whose memory cannot cut part-way
    (recurrent) would keep rejected ids in its context, so it is an error, never ignored."""
    if not model.seq_rm(0, start):
        raise RuntimeError("this model's KV cache cannot be cut part-way: no speculative loop")


def llamacpp_greedy(model: Any, prompt: Sequence[int], max_new: int, eos: set[int]) -> list[int]:
    """The target alone through llama.cpp: one decode per token, argmax."""
    _cut(model, 0)
    out: list[int] = []
    logits = _feed(model, prompt, 0, all_logits=False)
    while True:
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        if len(out) >= max_new or tok in eos:
            return out
        logits = _feed(model, [tok], len(prompt) + len(out) - 1, all_logits=False)


def llamacpp_speculative(target: Any, propose: Proposer, prompt: Sequence[int], max_new: int,
                         eos: set[int], n_max: int) -> tuple[list[int], dict[str, int]]:
    """Greedy speculative decoding with a llama.cpp target: the target's first token from the
    prompt, then rounds of (draft up to ``n_max`` ids, one target batch over the last token and
    the draft, keep the agreeing prefix and the target's next token, cut the target's KV back).
    The output is the target's own greedy output whatever the proposer returns."""
    _cut(target, 0)
    out = [int(np.argmax(_feed(target, prompt, 0, all_logits=False)[-1]))]
    stats = {"rounds": 0, "drafted": 0, "accepted": 0}
    while len(out) < max_new and out[-1] not in eos:
        draft = [int(t) for t in propose([*prompt, *out], min(n_max, max_new - len(out)))]
        base = len(prompt) + len(out) - 1  # the position of out[-1], not yet in the target's KV
        logits = _feed(target, [out[-1], *draft], base, all_logits=True)
        want = [int(t) for t in np.argmax(logits, axis=1)]
        n = common_prefix_len(draft, want)  # want has one id more: the target's own next
        _cut(target, base + 1 + n)  # keep out[-1] and the accepted draft ids
        stats["rounds"] += 1
        stats["drafted"] += len(draft)
        stats["accepted"] += n
        for tok in [*draft[:n], want[n]]:
            out.append(tok)
            if len(out) >= max_new or tok in eos:
                return out, stats
    return out, stats


TOP_K = 10
"""llama.cpp's draft sampler keeps the top 10 candidates and ``p_min`` is compared with the
first one's probability among those (common/speculative.cpp), not over the whole vocabulary."""


class LlamaCppProposer:
    """llama.cpp's greedy draft: up to ``n`` ids, stopping after the first whose probability
    (softmax over the top ``TOP_K`` logits) is under ``p_min``; that id is kept, as llama.cpp
    keeps it. The draft model's KV keeps the longest prefix it shares with the next context, so
    a round feeds only what is new."""

    def __init__(self, model: Any, p_min: float) -> None:
        self.model, self.p_min = model, p_min
        self.cached: list[int] = []

    def __call__(self, context: Sequence[int], n: int) -> list[int]:
        # the last id is always fed: its logits are the first draft's
        keep = min(common_prefix_len(self.cached, context), len(context) - 1)
        if keep < len(self.cached):
            _cut(self.model, keep)
            del self.cached[keep:]
        logits = _feed(self.model, context[keep:], keep, all_logits=False)[-1]
        self.cached.extend(int(t) for t in context[keep:])
        draft: list[int] = []
        while len(draft) < n:
            tok = int(np.argmax(logits))
            draft.append(tok)
            top = np.partition(logits, -TOP_K)[-TOP_K:].astype(np.float64)
            p_top = 1.0 / float(np.exp(top - top.max()).sum())
            if len(draft) >= n or p_top < self.p_min:
                break
            logits = _feed(self.model, [tok], len(self.cached), all_logits=False)[-1]
            self.cached.append(tok)
        return draft


# ------------------------------------------------------------------------------ the peers
def _hf(settings: Any, prompt: list[int], max_new: int, assisted: bool) -> Run:
    import torch
    from wisp.models import load_model

    started = time.perf_counter()
    target = load_model(settings.target_model, settings)
    draft = load_model(settings.draft_model, settings) if assisted else None
    load_s = time.perf_counter() - started
    ids = torch.tensor([prompt])
    # plain greedy whatever the model's generation config asks (a repetition penalty would make
    # it another decoding rule than the one WISP is compared with)
    kwargs: dict[str, Any] = {"do_sample": False, "attention_mask": torch.ones_like(ids),
                              "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if draft is not None:
        kwargs["assistant_model"] = draft
    with torch.inference_mode():
        schedule = getattr(draft.generation_config, "num_assistant_tokens", None) if draft else None
        target.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        if draft is not None and schedule is not None:  # the heuristic schedule carries over
            draft.generation_config.num_assistant_tokens = schedule
        started = time.perf_counter()
        out = target.generate(ids, max_new_tokens=max_new, **kwargs)
        seconds = time.perf_counter() - started
    name = "hf-assisted" if assisted else "hf-generate"
    engine = (f"transformers {_version('transformers')}, torch fp32, {torch.get_num_threads()} threads, "
              f"{_linear(settings)} linear")
    return Run(name, engine, [int(t) for t in out[0, len(prompt):]], seconds, load_s)


def _llamacpp(settings: Any, prompt: list[int], max_new: int, eos: set[int], spec: bool,
              n_max: int, p_min: float, threads: int, work: Path) -> Run:
    from wisp import models
    from wisp.services.drafter.llamacpp_binding import LlamaModel, binding_version

    started = time.perf_counter()
    target_gguf = models.gguf_path(settings.target_model, work)  # joined once per run
    n_ctx = len(prompt) + max_new + n_max + 8
    target = LlamaModel(target_gguf, n_ctx=n_ctx, n_seq=1, n_threads=threads, n_batch=512)
    draft = None
    if spec:
        draft = LlamaModel(models.draft_gguf(settings.draft_model, settings.model_cache),
                           n_ctx=n_ctx, n_seq=1, n_threads=threads, n_batch=512)
    load_s = time.perf_counter() - started
    try:
        if draft is None:
            llamacpp_greedy(target, prompt, 2, eos)  # warm-up
            started = time.perf_counter()
            out, extra = llamacpp_greedy(target, prompt, max_new, eos), {}
        else:
            warm = LlamaCppProposer(draft, p_min)
            llamacpp_speculative(target, warm, prompt, 2, eos, n_max)  # warm-up
            _cut(draft, 0)
            propose = LlamaCppProposer(draft, p_min)
            started = time.perf_counter()
            out, stats = llamacpp_speculative(target, propose, prompt, max_new, eos, n_max)
            extra = {**stats, "n_max": n_max, "p_min": p_min,
                     "acceptance": stats["accepted"] / stats["drafted"] if stats["drafted"] else None}
        seconds = time.perf_counter() - started
    finally:
        target.close()
        if draft is not None:
            draft.close()
    engine = f"llama.cpp ({binding_version()}), Q4_K_M GGUF, {threads} threads"
    return Run("llamacpp-spec" if spec else "llamacpp", engine, out, seconds, load_s, extra)


def _wisp(settings: Any, mode: str, prompt_text: str, max_new: int) -> Run:
    from wisp.client import submit
    from wisp.services.drafter.llamacpp_engine import draft_backend
    from wisp.services.runner import with_services
    from wisp.settings import Mode

    s = settings.model_copy(update={"mode": Mode(mode)})  # model_copy does not validate

    async def main() -> tuple[Any, float, float]:
        started = time.perf_counter()
        async with with_services(s) as system:
            load_s = time.perf_counter() - started
            await submit(system.bus, prompt_text, max_new_tokens=2)  # warm-up
            started = time.perf_counter()
            done = await submit(system.bus, prompt_text, max_new_tokens=max_new)
            return done, time.perf_counter() - started, load_s

    done, seconds, load_s = run_async(main())
    backend = draft_backend(s) if mode != "centralized" else "none"
    engine = (f"WISP {mode}, one device, 4 services in one process, draft backend {backend}, "
              f"verifier {_linear(s)} linear"
              + (f", cores verifier {s.verifier_cpus} / drafter {s.drafter_cpus}"
                 if s.verifier_cpus else ""))
    extra = {"rounds": done.rounds, "drafted": done.drafted_tokens,
             "accepted": done.accepted_tokens, "ttft_ms": done.ttft_ms, "tpot_ms": done.tpot_ms,
             "prompt_token_ids": done.prompt_token_ids}
    return Run(f"wisp-{mode}", engine, list(done.token_ids), seconds, load_s, extra)


def _linear(settings: Any) -> str:
    """The linear kernels a torch model of these settings runs (``WISP_CPU_LINEAR``): the HF
    peers and WISP's verifier load through the same ``load_model``, so they always match."""
    from wisp.models import uses_onednn

    return "oneDNN" if uses_onednn(settings) else "default"


def _preflight(chosen: list[str], settings: Any) -> None:
    """One line naming what to prepare, before anything loads, when a chosen peer's models are
    missing: the torch weights of both models (HF peers; WISP's verifier and, with the torch
    backend, its drafter), the draft GGUF and the target's weight packages (llama.cpp peers)."""
    from wisp import models
    from wisp.services.runner import ALL_ROLES
    from wisp.settings import Mode

    needs_gguf = {"llamacpp", "llamacpp-spec"} & set(chosen)
    if needs_gguf and settings.target_model not in models.REGISTRY:
        fail(f"{', '.join(sorted(needs_gguf))} need the target's GGUF: {settings.target_model!r} is "
             "not a packaged alias (drop them with --only)")
    hf = {"hf-generate": [settings.target_model],
          "hf-assisted": [settings.target_model, settings.draft_model]}
    for name in dict.fromkeys(n for p in chosen for n in hf.get(p, [])):
        try:
            models.resolve(name, settings.model_cache)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
    for peer in chosen:
        if peer.startswith("wisp-"):
            preflight_models(settings.model_copy(update={"mode": Mode(peer.removeprefix("wisp-"))}),
                             ALL_ROLES)
    if "llamacpp-spec" in chosen:
        try:
            models.draft_gguf(settings.draft_model, settings.model_cache)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
    if needs_gguf:
        try:
            models.gguf_sources(settings.target_model)
        except (FileNotFoundError, ValueError) as err:
            fail(f"the GGUF packages of {settings.target_model!r} are not installed ({err}); run "
                 f"`wisp-cli models prepare {settings.target_model}`")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


@app.command()
def peers(
    prompt: Annotated[str, typer.Option(
        help="The request (the target's chat template wraps it).")] = DEFAULT_PROMPT,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="New tokens at most.")] = 64,
    only: Annotated[str, typer.Option(help="Comma-separated peers to run: " + ", ".join(PEERS) + ".")]
    = ",".join(PEERS),
    spec_n_max: Annotated[int, typer.Option(min=1, max=64, help="llamacpp-spec: draft tokens at "
                                            "most per round (llama-server --draft-max).")] = 16,
    spec_p_min: Annotated[float, typer.Option(min=0.0, max=1.0, help="llamacpp-spec: stop drafting "
                                              "after a token under this probability "
                                              "(llama-server --draft-p-min).")] = 0.75,
    threads: Annotated[int, typer.Option(min=0, help="llama.cpp threads (0: all cores); torch uses "
                                         "its default.")] = 0,
    draft_backend: DraftBackendOpt = None,
    isolate: IsolateOpt = False,
    out: Annotated[Path, typer.Option(help="JSON results.")] = Path("out/peers.json"),
) -> None:
    """One request on this machine: WISP in each mode against HF generate, HF assisted
    generation and llama.cpp (alone and speculative); prints tokens/s side by side and writes
    JSON. Models load before each peer's clock starts; each peer gets one untimed warm-up."""
    from wisp.models import load_tokenizer
    from wisp.tokens import encode_prompt, eos_token_ids

    quiet_logging()
    chosen = [p.strip() for p in only.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PEERS]
    if not chosen or unknown:
        fail(f"--only: choose from {', '.join(PEERS)}; got {', '.join(unknown) or only!r}")
    if not prompt.strip():
        fail("--prompt is empty")
    settings = isolate_cores(make_settings(draft_backend=draft_backend), isolate)
    _preflight(chosen, settings)
    output_path(out)
    tokenizer = load_tokenizer(settings.target_model, settings)
    ids = encode_prompt(tokenizer, prompt)
    eos = set(eos_token_ids(settings.target_model, settings))
    n_threads = threads or os.cpu_count() or 1
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="wisp-peers-") as work:
        for peer in chosen:
            say(f"{peer}: loading and answering ({max_new_tokens} tokens at most)")
            if peer in ("hf-generate", "hf-assisted"):
                runs.append(_hf(settings, ids, max_new_tokens, assisted=peer == "hf-assisted"))
            elif peer in ("llamacpp", "llamacpp-spec"):
                runs.append(_llamacpp(settings, ids, max_new_tokens, eos, peer == "llamacpp-spec",
                                      spec_n_max, spec_p_min, n_threads, Path(work)))
            else:
                runs.append(_wisp(settings, peer.removeprefix("wisp-"), prompt, max_new_tokens))
            say(f"{peer}: {len(runs[-1].token_ids)} tokens in {runs[-1].seconds:.1f} s")
    reference = next((r.token_ids for r in runs if r.peer == "hf-generate"), None)
    base = next((r.tokens_per_s for r in runs if r.peer == "hf-generate"), None)
    rows = []
    for r in runs:
        wisp_ids = r.extra.get("prompt_token_ids")
        same_prompt = wisp_ids is None or wisp_ids == ids
        rows.append({**asdict(r), "tokens": len(r.token_ids), "tokens_per_s": r.tokens_per_s,
                     "vs_hf_generate": r.tokens_per_s / base if base else None,
                     "same_prompt_ids": same_prompt,
                     "matching_prefix": common_prefix_len(r.token_ids, reference) if reference else None,
                     "same_as_target_greedy": (r.token_ids == reference) if reference else None})
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "prompt": prompt,
              "prompt_tokens": len(ids), "max_new_tokens": max_new_tokens,
              "draft_model": settings.draft_model, "target_model": settings.target_model,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "runs": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(f"One request, {len(ids)} prompt tokens, up to {max_new_tokens} new, greedy "
                f"({settings.draft_model} -> {settings.target_model})",
                ["peer", "tokens", "seconds", "tokens/s", "vs HF generate", "= target greedy",
                 "load s", "engine"],
                [[r["peer"], str(r["tokens"]), fmt(r["seconds"], "{:.1f}"),
                  fmt(r["tokens_per_s"], "{:.2f}"), fmt(r["vs_hf_generate"], "{:.2f}x"),
                  "n/a" if r["same_as_target_greedy"] is None else "reference"
                  if r["peer"] == "hf-generate" else
                  ("yes" if r["same_as_target_greedy"] else f"first {r['matching_prefix']}"),
                  fmt(r["load_s"], "{:.1f}"), r["engine"]] for r in rows],
                left=("peer", "engine"))
    print(f"(load average {result['load_avg_1m']:.1f} on {result['cores']} cores; JSON: {out})")
    if not all(r["same_prompt_ids"] for r in rows):
        fail("WISP encoded the prompt differently from the peers: the comparison is void")
