"""Every wisp-cli command, discovered from the typer app (a new command is covered at once):
its --help works, and its smallest real invocation from an empty working directory either
does its job or fails at once with one line naming the command that makes the missing
prerequisite. Also: the CLI package has no import circle, not even behind a late import."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup
from typer.main import get_command

from tests.harness import CLI

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"wisp": REPO / "libs" / "wisp", "wisp.services": REPO / "services"}


# ---------------------------------------------------------------------- import graph
def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project (both package roots)."""
    out: dict[str, Path] = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere (module level or inside a function; not under
    ``if TYPE_CHECKING``), with the packages whose ``__init__`` each import runs."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for stmt in node.body for n in ast.walk(stmt)}
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{base}" if base else pkg
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            parts = t.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    found.discard(name)
    return found


def _cycle(graph: dict[str, set[str]], among: set[str]) -> list[str] | None:
    """A cycle through a module of ``among``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cyc = stack[stack.index(m):] + [m]
                if among & set(cyc):
                    return cyc
            elif m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cli_package_has_no_import_circle() -> None:
    mods = _modules()
    known = set(mods)
    graph = {n: _imports(n, p, known) for n, p in mods.items()}
    cli = {n for n in mods if n == "wisp.services.cli" or n.startswith("wisp.services.cli.")}
    assert {"wisp.services.cli.main", "wisp.services.cli.common", "wisp.services.cli.__main__"} <= cli
    assert _cycle(graph, cli) is None, " -> ".join(_cycle(graph, cli) or [])
    assert not any(m.startswith("wisp.services") for n in mods if not n.startswith("wisp.services")
                   for m in graph[n]), "libs/ must not import services/"
    # the check itself finds a circle hidden behind a late import
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert _cycle(toy, {"b"}) == ["a", "b", "c", "a"]


# ---------------------------------------------------------------------- the commands
def _app() -> typer.Typer:
    from wisp.services.cli.main import app

    return app


def command_paths() -> list[tuple[str, ...]]:
    """Every runnable command and sub-command of the app, as argv prefixes."""
    out: list[tuple[str, ...]] = []

    def walk(cmd: object, path: tuple[str, ...]) -> None:
        if isinstance(cmd, TyperGroup):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            out.append(path)

    walk(get_command(_app()), ())
    return sorted(out)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """wisp-cli ``args`` in this process: (exit code, stdout, stderr). The root logger is put
    back afterwards (commands configure logging for themselves)."""
    from wisp.services.cli.main import main

    root, ours = logging.getLogger(), logging.getLogger("wisp")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        root.handlers[:], root.level = handlers, level
        ours.setLevel(our_level)  # `sim` quiets the project's loggers for its progress bar
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory, an empty cache (no prepared model, no recorded `up`) and no
    WISP_* variables: what a user has on a fresh machine."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for k in list(os.environ):
        if k.startswith("WISP_"):
            monkeypatch.delenv(k)
    yield work


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*path, "--help"], capsys)
    assert code == 0 and "Usage:" in out
    assert out.split("Usage:", 1)[1].strip(), "the command says what it does"


def _prepare(cmd: str) -> str:
    return f"`wisp-cli {cmd}"


# The smallest real invocation of each command from an empty directory, and what it must do:
# exit code, and a text its output (0) or its one error line (1) holds.
CHEAP: dict[tuple[str, ...], tuple[list[str], int, str]] = {
    ("up",): ([], 1, _prepare("models prepare")),
    ("serve",): (["verifier"], 1, _prepare("models prepare")),
    ("submit",): (["hi"], 1, _prepare("up")),
    ("status",): (["--json"], 0, '"streams"'),  # against the test Redis, in its own namespace
    ("models", "list"): ([], 0, "not prepared"),
    ("data",): (["prepare"], 0, "sharegpt: ok"),
    ("bench",): ([], 1, _prepare("models prepare")),
    ("trace", "record"): ([], 1, _prepare("models prepare")),
    ("controller", "train"): (["out/traces.jsonl"], 1, _prepare("trace record")),
    ("controller", "eval"): ([], 1, _prepare("models prepare")),
    ("controller", "show"): ([], 0, '"threshold"'),
    ("redis", "load-functions"): (["--show"], 0, "redis.register_function"),
    ("bench-api",): (["--concurrency", "1", "--requests", "1", "--rounds", "1",
                      "--max-new-tokens", "2", "--prompts", "1"], 0, "added (api - redis)"),
    ("peers",): (["--max-new-tokens", "2"], 1, _prepare("models prepare")),
    ("drafter", "speed"): (["--sessions", "1", "--tokens", "1", "--reps", "1"], 1,
                           _prepare("models prepare")),
    ("profile", "verifier"): (["--out", "out/profile.json"], 1, _prepare("models prepare")),
    ("estimator", "fit"): (["out/profile.json", "--out", "out/est.json"], 1, _prepare("profile verifier")),
    ("estimator", "eval"): (["out/profile.json"], 1, _prepare("profile verifier")),
    ("estimator", "reuse"): (["--queued", "4", "--reps", "10"], 0, "saved"),
    ("sim", "run"): (["--scenario", "tiny", "--devices", "2", "--duration", "2", "--json"], 0, '"mode"'),
    ("sim", "sweep"): (["--out", "out/sweep", "--scenario", "tiny", "--modes", "sled", "--devices", "2",
                        "--duration", "2", "--refine", "0"], 0, "capacity"),
    ("sim", "validate"): ([], 1, _prepare("models prepare")),
    ("sim", "scenarios"): ([], 0, "tiny"),
    ("sim", "calibrate"): ([], 1, _prepare("models prepare")),
}
HELP_ONLY = {
    ("demo",): "prepares the real model pair (a 1.5 GB download) and answers with it",
    ("models", "prepare"): "downloads and converts the weight packages",
    ("sim", "grid"): "minutes of simulation even with --quick; tests/e2e/test_sim_grid.py runs --quick",
}


def test_every_command_has_a_cheap_invocation_or_a_reason() -> None:
    assert set(command_paths()) == set(CHEAP) | set(HELP_ONLY), (
        "a new command needs its smallest real invocation in CHEAP (or a reason in HELP_ONLY)")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", sorted(CHEAP), ids=" ".join)
def test_smallest_invocation_from_an_empty_directory(
    path: tuple[str, ...], empty_dir: Path, redis_url: str, namespace: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    args, want, needle = CHEAP[path]
    if path == ("status",):
        monkeypatch.setenv("WISP_NAMESPACE", namespace)
        args = [*args, "--redis-url", redis_url]
    code, out, err = run([*path, *args], capsys)
    if want == 0:
        assert code == 0, err[-2000:]
        assert needle in out, out[-2000:]
    else:
        lines = err.strip().splitlines()
        assert code == want and len(lines) == 1, err[-2000:]
        assert lines[0].startswith("wisp-cli: error:") and needle in lines[0], lines[0]
        # a prerequisite is checked before any work: nothing was written
        assert not any(empty_dir.iterdir()), sorted(empty_dir.rglob("*"))


def test_missing_prompt_packages_name_data_prepare(tmp_path: Path) -> None:
    """`controller eval` with models in place but the prompt packages missing (shadowed here by
    empty packages of the same names) stops before loading anything, naming `wisp-cli data
    prepare` rather than a Python function."""
    from wisp.data import DATA_PACKAGES
    from wisp.policy.controller import shipped_controller_path

    fake = tmp_path / "fake"
    for mod in DATA_PACKAGES:
        (fake / mod).mkdir(parents=True)
        (fake / mod / "__init__.py").write_text("")
    models = tmp_path / "models"
    models.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(PYTHONPATH=str(fake), XDG_CACHE_HOME=str(tmp_path / "cache"))
    ctl = shipped_controller_path("qwen-coder-0.5b", "qwen-coder-1.5b")
    res = subprocess.run([*CLI, "controller", "eval", "--controller", str(ctl), "--draft-model",
                          str(models), "--target-model", str(models)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr[-2000:]
    assert "`wisp-cli data prepare`" in lines[0] and "ensure_data_packages" not in lines[0]
    assert not any(work.iterdir())


@pytest.mark.timeout(300)
def test_controller_eval_writes_its_default_output_from_an_empty_directory(
    tiny_pair: tuple[Path, Path], empty_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The default --out lives in a folder that does not exist yet: it is made before the first
    prompt (the checkpoint is appended to after it), not discovered missing after minutes."""
    from wisp.policy.controller import shipped_controller_path

    target, draft = tiny_pair
    ctl = shipped_controller_path("qwen-coder-0.5b", "qwen-coder-1.5b")
    code, _, err = run(["controller", "eval", "--controller", str(ctl), "--draft-model", str(draft),
                        "--target-model", str(target), "--prompts", "1", "--max-new-tokens", "4",
                        "--allow-overlap", "--threads", "1"], capsys)
    # 1 only when the tiny pair's outputs tie within float noise (reported as NOT lossless)
    assert code == 0 or "NOT lossless" in err, err[-2000:]
    report = json.loads((empty_dir / "out" / "controller-eval.json").read_text())
    assert report["prompts"]["n"] == 1
    assert (empty_dir / "out" / "controller-eval.partial.jsonl").exists()
    # the rule is given the device drafter's speed from the controller's file (not this machine's
    # torch drafter's), and every policy's rounds are priced with the controller's cost model
    from wisp.policy.controller import load_controller

    assert report["cost"]["draft_ms_fed"] == load_controller(ctl).draft_ms_per_token
    assert all(r["committed_per_s"] > 0 for r in report["results"].values())


def test_python_dash_m_and_the_console_script_entry_point() -> None:
    res = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "wisp-cli demo" in res.stdout
    import tomllib

    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["wisp-cli"]
    module, func = script.split(":")
    assert module == "wisp.services.cli.main" and func == "main"
    pkgs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "wisp.services.cli" in pkgs


def test_commands_run_their_event_loop_on_uvloop() -> None:
    """Every command's loop (``run_async``) is uvloop's (the pipeline's own cost per round is
    most of it event-loop work: docs/results.md section 6)."""
    import asyncio

    from wisp.services.cli.common import run_async

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_async(loop_module()).startswith("uvloop")
