"""The Dockerfiles agree with the project and with the manifests (no Docker engine needed).

Images cannot be built here, so this reads the Dockerfiles as text and checks the contract the
manifests rely on: entrypoint, non-root uid, model cache, port, torch pin, and a build context
that carries the code but nothing else.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage's and earlier stages' lines, continuations
    joined, comments dropped."""
    text = (REPO / dockerfile).read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def arg_default(dockerfile: str, arg: str) -> str:
    for word, rest in instructions(dockerfile):
        if word == "ARG" and rest.startswith(arg + "="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"{dockerfile}: no ARG {arg}=...")


def torch_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [pin] = [d for d in deps if re.match(r"torch\s*==", d)]
    return pin.split("==")[1].strip()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_stage_contract(dockerfile: str) -> None:
    stage = final_stage(dockerfile)
    words = dict(stage[::-1])  # first occurrence wins
    assert words["FROM"].startswith("python:${PYTHON_VERSION}-slim")
    assert arg_default(dockerfile, "PYTHON_VERSION") == "3.11"
    assert words["USER"] == "10001:10001"  # == runAsUser/runAsGroup in deploy/k8s
    assert words["ENTRYPOINT"] == '["wisp-cli"]'
    assert words["VOLUME"] == '["/models"]'
    assert words["EXPOSE"] == "9090 8000"
    env = " ".join(rest for word, rest in stage if word == "ENV")
    assert "WISP_MODEL_CACHE=/models" in env
    assert "WISP_HTTP_PORT=9090" in env
    assert "HF_HOME=/home/wisp/.cache/huggingface" in env  # under the cache emptyDir
    assert "PATH=/opt/venv/bin:$PATH" in env
    # USER comes after everything that needs root
    order = [word for word, _ in stage]
    assert order.index("USER") > max(i for i, w in enumerate(order) if w in ("RUN", "COPY"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_torch_matches_the_project_pin(dockerfile: str) -> None:
    assert arg_default(dockerfile, "TORCH_VERSION") == torch_pin()
    runs = " ".join(rest for word, rest in instructions(dockerfile) if word == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs


def test_cpu_image_uses_the_cpu_wheel_and_cuda_image_a_cuda_one() -> None:
    assert arg_default("Dockerfile", "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    cuda_index = arg_default("Dockerfile.cuda", "TORCH_INDEX_URL")
    assert "whl/cpu" not in cuda_index
    env = " ".join(rest for word, rest in final_stage("Dockerfile.cuda") if word == "ENV")
    assert "WISP_DEVICE=cuda" in env and "NVIDIA_VISIBLE_DEVICES=all" in env


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used (Go filepath.Match plus `**`; a pattern
    that matches a directory drops everything under it; no `!` exceptions)."""
    conv = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    prefixes = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    for pat in patterns:
        tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pat.strip("/"))
        rx = "".join(conv.get(t, t if t.startswith("[") else re.escape(t)) for t in tokens)
        if any(re.fullmatch(rx, pre) for pre in prefixes):
            return True
    return False


def test_dockerignore_keeps_the_code_and_drops_the_rest() -> None:
    patterns = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)
    for needed in (
        "pyproject.toml",
        "README.md",
        "libs/wisp/settings.py",
        "libs/wisp/data/x.json",
        "services/cli/main.py",
    ):
        assert not _ignored(needed, patterns), needed
    for dropped in (
        ".git/HEAD",
        "tests/unit/test_x.py",
        "deploy/k8s/base/wisp.env",
        "libs/wisp/__pycache__/a.pyc",
        "wisp.egg-info/PKG-INFO",
        "model.gguf",
    ):
        assert _ignored(dropped, patterns), dropped
