"""A small typed wrapper over llama.cpp's C API, as ``llama-cpp-py-sync`` exposes it (CFFI, ABI mode).

Why a wrapper: the binding is generated from llama.cpp's headers and is untyped (every call is
``Any``), and its high-level ``Llama`` class has one sequence per context, so it cannot hold
several sessions' KV caches or batch them. The draft engine needs exactly five things of the C
API — load a GGUF, read its vocabulary, decode a ``llama_batch`` whose tokens carry sequence ids,
read the logits of chosen rows, and remove a sequence's positions past a point — and this module
gives those five a typed, checked surface, so a change in the binding's generated API breaks here,
in one place, with a clear error.

Loading on glibc < 2.38: the binding's wheels are tagged manylinux2014 but are built on a newer
distribution; their libraries need four ``__isoc23_*`` functions (``strtol``, ``strtoul``,
``strtoull``, ``sscanf`` in their C23 form, which only adds ``0b`` binary literals) from glibc
2.38, so they do not load on Debian 12 (glibc 2.36). When (and only when) the libraries fail to
load for that reason, :func:`_patched_copy` writes a copy of them once into the WISP cache in
which those four imports name the classic functions instead (ELF dynamic-symbol and version
tables edited in place; nothing else changes) and loads that. See docs/drafting.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from wisp.models import ModelLoadError

__all__ = ["LlamaCppError", "LlamaModel", "binding_version"]

log = logging.getLogger(__name__)

_DIST = "llama-cpp-py-sync"
_LOAD_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}
"""The loaded ``ffi`` and ``lib`` and the log callback (kept alive for the process)."""

_GGML_LOG_ERROR = 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


class LlamaCppError(ModelLoadError):
    """llama.cpp could not be loaded or refused a call; the message says which and why (a
    ``ModelLoadError``, so the CLI reports it as one line)."""


def binding_version() -> str:
    """The installed ``llama-cpp-py-sync`` version (its number is llama.cpp's build number)."""
    try:
        return importlib.metadata.version(_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise LlamaCppError(f"the llama.cpp draft backend needs `pip install {_DIST}`") from err


# ------------------------------------------------------------------------------ loading
def _bindings() -> Any:
    try:
        return importlib.import_module("llama_cpp_py_sync._cffi_bindings")
    except ImportError as err:
        raise LlamaCppError(f"the llama.cpp draft backend needs `pip install {_DIST}` ({err})") from err


def _api() -> tuple[Any, Any]:
    """``(ffi, lib)``, loaded once per process; llama.cpp's own logging below errors is dropped
    (it prints hundreds of lines per model load)."""
    with _LOAD_LOCK:
        if "lib" not in _STATE:
            b = _bindings()
            ffi = b.get_ffi()
            lib_dir = Path(b.__file__).parent
            try:
                lib = ffi.dlopen(str(lib_dir / "libllama.so"))
            except OSError as err:
                if "GLIBC_2.38" not in str(err):
                    raise LlamaCppError(f"cannot load llama.cpp: {str(err)[:300]}") from err
                lib = ffi.dlopen(str(_patched_copy(lib_dir) / "libllama.so"))

            @ffi.callback("void(enum ggml_log_level, const char *, void *)")
            def _log(level: int, text: Any, _user: Any) -> None:
                if level == _GGML_LOG_ERROR and text != ffi.NULL:
                    log.error("llama.cpp: %s", ffi.string(text).decode(errors="replace").rstrip())

            lib.llama_log_set(_log, ffi.NULL)
            lib.llama_backend_init()
            _STATE.update(ffi=ffi, lib=lib, log=_log)
    return _STATE["ffi"], _STATE["lib"]


def _cache_root() -> Path:
    from wisp.settings import default_home

    return default_home() / "llamacpp"


def _patched_copy(lib_dir: Path) -> Path:
    """The binding's libraries with their glibc-2.38-only imports retargeted (see the module
    doc); written once per binding version, atomically, and reused."""
    out = _cache_root() / f"{binding_version()}-glibc-compat"
    if (out / "libllama.so").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        for f in sorted(lib_dir.glob("lib*.so*")):
            data = bytearray(f.read_bytes())
            _retarget_isoc23(data)
            (tmp / f.name).write_bytes(data)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race: use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("llama.cpp: using a glibc-2.36-compatible copy of the binding's libraries in %s", out)
    return out


def _retarget_isoc23(data: bytearray) -> int:
    """Make an ELF64 shared library's ``__isoc23_X@GLIBC_2.38`` imports plain ``X`` imports.

    The symbol's name is pointed 9 bytes further into the string table (``"__isoc23_strtol"``
    holds ``"strtol"``), its version index becomes global (binds to libc's default ``strtol``),
    and the now unused ``GLIBC_2.38`` requirement is renamed to another libc version the library
    already requires, so the loader's version check passes. Returns how many imports changed.
    """
    if data[:6] != b"\x7fELF\x02\x01":
        raise LlamaCppError("not a little-endian ELF64 library")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    by_type = {s[1]: s for s in secs}
    if 11 not in by_type or 0x6FFFFFFF not in by_type or 0x6FFFFFFE not in by_type:
        return 0
    dynsym, versym, verneed = by_type[11], by_type[0x6FFFFFFF], by_type[0x6FFFFFFE]
    strtab = secs[dynsym[6]][4]

    def name(off: int) -> str:
        return bytes(data[strtab + off:data.index(b"\0", strtab + off)]).decode()

    target: int | None = None
    other: tuple[int, int] | None = None  # (hash, name offset) of another libc requirement
    off = verneed[4]
    while True:
        _, cnt, file_off, aux_off, nxt = struct.unpack_from("<HHIII", data, off)
        aux = off + aux_off
        for _ in range(cnt):
            h, _flags, _other, name_off, aux_next = struct.unpack_from("<IHHII", data, aux)
            if name(file_off) == "libc.so.6":
                if name(name_off) == "GLIBC_2.38":
                    target = aux
                elif other is None:
                    other = (h, name_off)
            if not aux_next:
                break
            aux += aux_next
        if not nxt:
            break
        off += nxt
    if target is None:
        return 0
    if other is None:
        raise LlamaCppError("cannot retarget GLIBC_2.38: the library needs no other libc version")
    changed = 0
    for i in range(dynsym[5] // 24):
        entry = dynsym[4] + i * 24
        st_name = struct.unpack_from("<I", data, entry)[0]
        if name(st_name).startswith("__isoc23_"):
            struct.pack_into("<I", data, entry, st_name + len("__isoc23_"))
            struct.pack_into("<H", data, versym[4] + 2 * i, 1)
            changed += 1
    left = [name(struct.unpack_from("<I", data, dynsym[4] + i * 24)[0]) for i in range(dynsym[5] // 24)
            if struct.unpack_from("<H", data, versym[4] + 2 * i)[0]
            == struct.unpack_from("<H", data, target + 6)[0]]
    if left:
        raise LlamaCppError(f"more GLIBC_2.38 imports than the __isoc23_ ones: {left[:5]}")
    struct.pack_into("<I", data, target, other[0])
    struct.pack_into("<I", data, target + 8, other[1])
    return changed


# ------------------------------------------------------------------------------ the model
class LlamaModel:
    """One GGUF model with one context whose KV cache is shared by up to ``n_seq`` sequences.

    ``n_ctx`` is the KV budget in tokens across *all* sequences (a unified cache: a long session
    and many short ones fit the same budget). ``n_batch`` tokens go through one ``llama_decode``
    (also the micro-batch, so a failed decode changed nothing). Not thread-safe: one caller at a
    time, as the drafter's single model thread is.
    """

    def __init__(self, path: str | Path, n_ctx: int, n_seq: int, n_threads: int,
                 n_batch: int = 512) -> None:
        self.ffi, self.lib = _api()
        path = Path(path)
        if not path.is_file():
            raise LlamaCppError(f"GGUF file not found: {path}")
        lib, ffi = self.lib, self.ffi
        mparams = lib.llama_model_default_params()
        self._model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if self._model == ffi.NULL:
            raise LlamaCppError(f"llama.cpp could not load {path}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = max(1, n_threads)
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if self._ctx == ffi.NULL:
            lib.llama_model_free(self._model)
            raise LlamaCppError(f"llama.cpp could not create a context (n_ctx={n_ctx}, n_seq={n_seq})")
        self._mem = lib.llama_get_memory(self._ctx)
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_seq = int(lib.llama_n_seq_max(self._ctx))
        self.n_batch = n_batch
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self.path = path

    def close(self) -> None:
        """Free the context, model and batch (idempotent)."""
        if getattr(self, "_ctx", None) is not None:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._ctx)
            self.lib.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    # -- vocabulary ------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        """The token's text as stored in the GGUF (byte-level BPE form, e.g. ``'Ġthe'``)."""
        return self.ffi.string(self.lib.llama_vocab_get_text(self._vocab, token)).decode(errors="replace")

    def tokenize(self, text: str, parse_special: bool = False) -> list[int]:
        """``text`` as llama.cpp tokenizes it, without BOS/EOS."""
        raw = text.encode()
        cap = len(raw) + 16
        buf = self.ffi.new("llama_token[]", cap)
        n = int(self.lib.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, parse_special))
        if n < 0:
            raise LlamaCppError(f"tokenize needs {-n} tokens, more than {cap}")
        return [int(t) for t in buf[0:n]]

    # -- KV cache --------------------------------------------------------------------------
    def seq_rm(self, seq: int, start: int) -> bool:
        """Remove sequence ``seq``'s positions ``>= start`` (``start=0``: all of them).
        False when the model's memory cannot cut a sequence part-way (recurrent models)."""
        return bool(self.lib.llama_memory_seq_rm(self._mem, seq, start, -1))

    # -- decoding --------------------------------------------------------------------------
    def decode(self, tokens: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode ``(token, position, sequence, want_logits)`` entries in one batch (at most
        ``n_batch``); returns the logits ``[n_wanted, n_vocab]`` (float32) in entry order.

        Raises :class:`KVFullError` when the KV cache has no room (nothing was decoded then)."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a decode takes 1..{self.n_batch} tokens, got {n}")
        b = self._batch
        b.n_tokens = n
        rows = []
        for i, (tok, pos, seq, out) in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
            if out:
                rows.append(i)
        rc = int(self.lib.llama_decode(self._ctx, b))
        if rc == 1:
            raise KVFullError("llama.cpp's KV cache is full")
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed ({rc})")
        logits = np.empty((len(rows), self.n_vocab), dtype=np.float32)
        nbytes = self.n_vocab * 4
        for j, i in enumerate(rows):
            ptr = self.lib.llama_get_logits_ith(self._ctx, i)
            if ptr == self.ffi.NULL:
                raise LlamaCppError(f"no logits for batch row {i}")
            logits[j] = np.frombuffer(self.ffi.buffer(ptr, nbytes), dtype=np.float32)
        return logits


class KVFullError(LlamaCppError):
    """The shared KV cache has no free cells for a batch."""
