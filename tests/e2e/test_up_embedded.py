"""`wisp-cli up` with no Redis URL: embedded redis-server, all four services and the HTTP API in
one process, the URLs recorded so `wisp-cli submit` and `wisp-cli status` find them with no
flags; the API answers; Ctrl-C stops it cleanly and removes the record."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from wisp.services.runner import free_port

from tests.harness import CLI, api_completion, api_get, cli


def test_up_serves_on_embedded_redis_and_submit_finds_it(tiny_pair: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    target, draft = tiny_pair
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env.update({"XDG_CACHE_HOME": str(tmp_path / "cache"), "WISP_TARGET_MODEL": str(target),
                "WISP_DRAFT_MODEL": str(draft), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    log = open(tmp_path / "up.log", "w+")  # noqa: SIM115
    port = free_port()  # not 8000: a developer's own `wisp-cli up` may hold it
    up = subprocess.Popen([*CLI, "up", "--api-port", str(port)], env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while "WISP is up" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, "up did not become ready"
            time.sleep(0.2)
        text = (tmp_path / "up.log").read_text()
        url = text.split("WISP is up (sled mode) on ", 1)[1].split()[0]
        assert url.startswith("redis://127.0.0.1:") and not url.endswith(":6379/0")
        state = json.loads((tmp_path / "cache" / "wisp" / "up.json").read_text())
        assert state["redis_url"] == url
        # submit goes through the API `up` serves (no broker credential), or straight to Redis
        # with --via-redis: the same greedy answer either way
        res = cli(["submit", "Write a short poem about streams.", "--json", "--max-new-tokens", "10"], env)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert len(out["token_ids"]) == 10 and out["mode"] == "sled"
        assert out["via"] == f"http://127.0.0.1:{port}/v1"
        direct = cli(["submit", "Write a short poem about streams.", "--json", "--max-new-tokens",
                      "10", "--via-redis"], env)
        assert direct.returncode == 0, direct.stderr
        assert json.loads(direct.stdout)["token_ids"] == out["token_ids"]
        assert "via" not in json.loads(direct.stdout)
        streamed = cli(["submit", "Say hi.", "--max-new-tokens", "6"], env)
        assert streamed.returncode == 0 and "6 tokens" in streamed.stderr
        status = cli(["status", "--json"], env)
        assert status.returncode == 0
        roles = {s["role"] for s in json.loads(status.stdout)["services"]}
        assert roles == {"drafter", "verifier", "scheduler", "estimator", "gateway"}
        api = f"http://127.0.0.1:{port}/v1"
        assert json.loads(status.stdout)["api_url"] == api and api in text
        models = api_get(f"{api}/models")
        assert [m["id"] for m in models["data"]] and models["object"] == "list"
        answer = api_completion(api, models["data"][0]["id"], "Say hi.", 4, timeout=60)
        assert answer["usage"]["completion_tokens"] == 4, answer
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        log.close()
    assert not (tmp_path / "cache" / "wisp" / "up.json").exists()
    after = cli(["status"], env, timeout=60)
    assert after.returncode == 1 and "wisp-cli up" in after.stderr
