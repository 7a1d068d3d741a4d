"""What every wisp-cli command module shares: the one-line error, the shared flags, settings,
the checks of prerequisites, output folders and printing.

Why one public module: each command group lives in its own module, and all of them need the same
error type and checks; importing them from here (never from the module that assembles the app)
keeps the package free of import circles. A prerequisite is checked before any long work
(loading a model, a benchmark) and a missing one is one line naming the command that makes it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import sys
from collections.abc import Callable, Coroutine, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast

import typer
from pydantic import ValidationError
from redis.exceptions import NoPermissionError
from wisp.data import SOURCES, Prompt, Source, load_prompts, mixed_prompts
from wisp.models import ModelLoadError, resolve, resolve_tokenizer
from wisp.services.runner import BrokerUnavailable, ServicesStopped, resolve_url
from wisp.settings import Mode, Settings

T = TypeVar("T")
log = logging.getLogger(__name__)

SAMPLE_PROMPT = ("Write a short Python function that checks whether a number is prime. "
                 "Reply with only the code.")
"""The demo's prompt: a complete answer (it ends on the model's own stop) in about 60 tokens."""


class CliError(Exception):
    """A failure to report as one line on stderr and exit 1."""


def fail(msg: str) -> NoReturn:
    raise CliError(msg)


# ---------------------------------------------------------------------- shared options
RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL; default: WISP_REDIS_URL, else what `up` recorded."),
]
ModeOpt = Annotated[
    Mode | None,
    typer.Option("--mode", help="wisp | sled (fixed k, FCFS) | centralized (target alone). "
                 "Env WISP_MODE; default sled."),
]
DraftOpt = Annotated[
    str | None,
    typer.Option("--draft-model", help="Alias, local path or hub id (env WISP_DRAFT_MODEL)."),
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target-model", help="Alias, local path or hub id (env WISP_TARGET_MODEL)."),
]
TorchDeviceOpt = Annotated[
    str | None, typer.Option("--torch-device", help="cpu, cuda, cuda:1 ... (env WISP_DEVICE).")
]
class DraftBackend(StrEnum):
    """``--draft-backend`` values (``Settings.draft_backend``)."""

    auto = "auto"
    llamacpp = "llamacpp"
    torch = "torch"


DraftBackendOpt = Annotated[DraftBackend | None, typer.Option(
    "--draft-backend", help="What runs the draft model: llamacpp (the packaged GGUF as shipped), "
    "torch, or auto (llamacpp for a packaged alias on CPU, else torch). Env WISP_DRAFT_BACKEND.")]
IsolateOpt = Annotated[bool, typer.Option(
    "--isolate-cores", help="Pin the verifier and the drafters to disjoint CPU sets (the first "
    "half of the cores, rounded up, for the verifier; the rest for the drafters) with thread "
    "counts to match, so simulated edge devices do not take the server's compute, as on real "
    "hardware. Prints which cores each role got. Env WISP_VERIFIER_CPUS / WISP_DRAFTER_CPUS set "
    "them by hand.")]
DraftKOpt = Annotated[
    int | None, typer.Option("--draft-k", min=0, max=64, help="Fixed draft length (env WISP_DRAFT_K).")
]
PromptSet = Annotated[str, typer.Option(
    "--source", help="mixed (humaneval/mtbench/sharegpt round-robin) | humaneval | mtbench | sharegpt")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def make_settings(**overrides: Any) -> Settings:
    """``Settings`` from the environment with the flags that were given (None = not given);
    a bad value is one line naming the flag or variable."""
    clean = {k: (v.value if isinstance(v, StrEnum) else v) for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e.get("loc", ()))
        fail(f"bad setting {loc!r}: {e.get('msg')} (check the flag or the WISP_{loc.upper()} variable)")


def isolate_cores(settings: Settings, isolate: bool) -> Settings:
    """``settings`` with the verifier and the drafters on disjoint CPUs (``--isolate-cores``),
    announced on stderr; unchanged without the flag. Fails in one line on a 1-CPU machine."""
    if not isolate:
        return settings
    from wisp.cpus import CpuSetError, format_cpus, split_cores

    try:
        verifier, drafters = split_cores()
    except CpuSetError as err:
        fail(str(err))
    say(f"cores: verifier {format_cpus(verifier)} ({len(verifier)} thread(s)), drafters "
        f"{format_cpus(drafters)} ({len(drafters)} thread(s))")
    return settings.model_copy(update={"verifier_cpus": format_cpus(verifier),
                                       "drafter_cpus": format_cpus(drafters)})


def setup_logging(verbose: bool = False) -> None:
    from wisp.logs import configure

    configure(logging.DEBUG if verbose else logging.INFO)


def quiet_logging() -> None:
    """Warnings only: for commands whose own output is a table or streamed text."""
    setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)


def say(msg: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- prerequisites
def preflight_models(settings: Settings, roles: Sequence[str]) -> None:
    """Refuse to start with a model that cannot be found, before loading anything: the error
    names `wisp-cli models prepare ALIAS` for a packaged model that is not prepared."""
    if settings.null_models:
        return

    drafting = "drafter" in roles and settings.mode != Mode.centralized
    checks: list[tuple[str, Callable[[str, Path], str]]] = []
    if "verifier" in roles:
        checks.append((settings.target_model, resolve))
    elif "drafter" in roles:  # a drafter needs only the target's tokenizer (edge preparation)
        checks.append((settings.target_model, resolve_tokenizer))
    if drafting and _backend(settings) == "torch":  # llama.cpp needs only the GGUF (below)
        checks.append((settings.draft_model, resolve))
    for name, check in checks:
        try:
            check(name, settings.model_cache)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err))
    if drafting:
        _preflight_draft_backend(settings)
    if "drafter" in roles and settings.controller is not None:
        from wisp.policy.controller import default_policy

        try:
            default_policy(settings)  # the error the drafter would hit, as one line
        except ValueError as err:
            fail(str(err))


def _backend(settings: Settings) -> str:
    from wisp.services.drafter.llamacpp_engine import draft_backend

    return draft_backend(settings)


def _preflight_draft_backend(settings: Settings) -> None:
    """The llama.cpp drafter needs its binding and the draft model's GGUF: say so in one line
    before any model loads."""
    from wisp.models import REGISTRY, draft_gguf
    from wisp.services.drafter.llamacpp_binding import LlamaCppError, binding_version
    from wisp.services.drafter.llamacpp_engine import draft_backend

    if draft_backend(settings) != "llamacpp":
        return
    if settings.draft_model not in REGISTRY:
        fail(f"--draft-backend llamacpp runs a packaged GGUF; {settings.draft_model!r} is not a "
             "packaged alias (use --draft-backend torch for paths and hub ids)")
    try:
        binding_version()
        draft_gguf(settings.draft_model, settings.model_cache)
    except (LlamaCppError, FileNotFoundError) as err:
        fail(str(err))


def preflight_prompts(source: str, n: int, offset: int = 0) -> list[Prompt]:
    """Load the prompts a command will run, before any long work; missing prompt packages are
    one line naming `wisp-cli data prepare`."""
    try:
        if source == "mixed":
            return mixed_prompts(n, offset)
        if source not in SOURCES:
            raise ValueError(f"unknown prompt source {source!r}: use mixed, {', '.join(SOURCES)}")
        return load_prompts(cast(Source, source), n, offset)
    except FileNotFoundError as err:
        fail(f"the prompt data sets are not installed ({err}); run `wisp-cli data prepare`")
    except (ValueError, OSError) as err:
        fail(f"cannot load prompts: {err}")


def require_file(path: Path, what: str, made_by: str) -> Path:
    """``path`` must be an existing file; else one line saying which command makes it."""
    if not path.is_file():
        fail(f"{what} {path} does not exist; make one with `{made_by}`")
    return path


def output_path(path: Path) -> Path:
    """Create ``path``'s folder (defaults like ``out/bench.json`` work from an empty directory)
    and check it can be written, before the work whose result goes there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"cannot create the folder for {path}: {err}")
    if path.is_dir():
        fail(f"{path} is a folder; give a file name")
    probe = path.parent / f".{path.name}.wisp-write-check"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        fail(f"cannot write to {path.parent}: {err}")
    return path


def output_dir(path: Path) -> Path:
    """Create a results folder (and its parents) before the work whose results go there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"cannot create the folder {path}: {err}")
    return path


def broker_url(settings: Settings, explicit: str | None) -> str:
    """--redis-url, else WISP_REDIS_URL, else the one `wisp-cli up` recorded; none is one line
    naming `wisp-cli up`."""
    try:
        return resolve_url(settings, explicit)
    except BrokerUnavailable as err:
        fail(str(err))


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop (where it exists: not on Windows); a model that cannot be
    loaded, an unreachable broker or services that stopped under the work are one line.

    Why uvloop: a round crosses four services and about thirty Redis commands, and with null
    engines the event loop's own work is most of a round's time (``wisp-cli bench
    --null-models``; docs/results.md section 6 measures uvloop together with the frozen
    start-up heap and the estimator's refit interval)."""
    try:
        return _event_loop_runner()(coro)
    except (ModelLoadError, BrokerUnavailable, ServicesStopped, ConnectionError) as err:
        fail(str(err))
    except NoPermissionError as err:
        fail(f"Redis refused a command to this user ({err}); check WISP_REDIS_URL's user and "
             "the role's rights in deploy/redis-acl.conf")


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, T]], T]:
    if sys.platform == "win32":  # uvloop does not build there
        return asyncio.run
    try:
        import uvloop
    except ImportError:  # installed without its dependencies: slower, not broken
        log.warning("uvloop is not installed (a dependency of wisp); running on asyncio's loop")
        return asyncio.run
    return uvloop.run


# ---------------------------------------------------------------------- printing
def fmt(value: Any, spec: str = "{:.2f}") -> str:
    """A number for a table: ``spec``-formatted; None and NaN read "n/a"; anything else as is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "n/a" if value is None else str(value)
    return "n/a" if math.isnan(value) else spec.format(float(value))


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                left: Sequence[str] = ()) -> None:
    """A table on stdout; not on a terminal (CI logs, files) wide enough that no column is cut."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h, justify="left" if h in left else "right")
    for r in rows:
        t.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 240).print(t)
