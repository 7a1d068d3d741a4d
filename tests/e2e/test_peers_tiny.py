"""`wisp-cli peers` with the tiny pair: WISP (`wisp` mode) beside HF `generate`, in one command.

What the comparison's table rests on: every WISP row answers the prompt ids the HF peer answers
(the same chat template) with exactly HF `generate`'s greedy ids (one mode here: the other
modes' rows are built by the same code), the JSON holds what the table
prints, and a peer that needs a GGUF refuses a model that is not a packaged alias in one line.
(The llama.cpp loops are tested on a real GGUF in tests/unit/test_peers.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.harness import cli


def test_wisp_beside_hf_generate_is_the_same_greedy_answer(tiny_pair: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    target, draft = tiny_pair
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update(OMP_NUM_THREADS="1", WISP_TARGET_MODEL=str(target), WISP_DRAFT_MODEL=str(draft))
    out = tmp_path / "peers.json"
    res = cli(["peers", "--only", "hf-generate,wisp-wisp", "--max-new-tokens", "8",
               "--out", str(out)], env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["peer"]: r for r in data["runs"]}
    assert list(rows) == ["hf-generate", "wisp-wisp"]
    hf = rows["hf-generate"]
    assert hf["tokens"] == len(hf["token_ids"]) >= 1
    for peer in ("wisp-wisp",):
        r = rows[peer]
        assert r["same_prompt_ids"] and len(r["extra"]["prompt_token_ids"]) == data["prompt_tokens"]
        assert r["token_ids"] == hf["token_ids"] and r["same_as_target_greedy"], (peer, r)
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0
    assert "wisp-wisp" in res.stdout and "vs HF generate" in res.stdout  # the table

    bad = cli(["peers", "--only", "llamacpp", "--out", str(tmp_path / "x.json")], env, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "packaged alias" in lines[0], bad.stderr
