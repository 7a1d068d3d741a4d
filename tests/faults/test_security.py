"""Redis with a password, and with one ACL user per role (the lines in deploy/redis-acl.conf):
the services work with exactly those rights, and a wrong password is a one-line error."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import redis
from wisp.services.runner import EmbeddedRedis

from tests.harness import Cluster, cli, submit_json

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis-acl.conf"
ROLES = ("drafter", "estimator", "scheduler", "verifier", "client")


def _load_acl(r: redis.Redis, passwords: dict[str, str]) -> None:
    for line in ACL_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        assert words[0] == "user"
        rules = [f">{passwords[w[1:-9].lower()]}" if w.endswith("_PASSWORD") else w for w in words[2:]]
        r.execute_command("ACL", "SETUSER", words[1], *rules)


def test_every_service_runs_as_its_acl_user(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    target, draft = tiny_pair
    admin_pw = "admin-pw"
    with EmbeddedRedis(password=admin_pw) as server:
        admin = redis.Redis(port=server.port, password=admin_pw)
        passwords = {role: f"{role}-pw" for role in ROLES}
        admin.execute_command("ACL", "SETUSER", "admin", "on", f">{admin_pw}", "~*", "&*", "+@all")
        _load_acl(admin, passwords)  # turns the default user off
        url = {role: f"redis://wisp-{role}:{passwords[role]}@127.0.0.1:{server.port}/0" for role in ROLES}
        c = Cluster(url["client"], "wisp", tmp_path,
                    settings={"target_model": target, "draft_model": draft, "max_wait_ms": 5})
        with c:
            for role in ("estimator", "scheduler", "verifier", "drafter"):
                c.start(role, role[0], redis_url=url[role])
            _wait_ready(admin, ["e", "s", "v", "d"], c)
            out = submit_json("Say something nice.", c.env(redis_url=url["client"]),
                              "--max-new-tokens", "8")
            assert len(out["token_ids"]) == 8
            for n in ("e", "s", "v", "d"):
                assert "NOPERM" not in c.log(n) and "Traceback" not in c.log(n), c.log(n)
        # the client user cannot read another request's data by listing keys or sessions
        client = redis.Redis.from_url(url["client"])
        try:
            client.get("wisp:sess:anything")
            raise AssertionError("the client user must not read session records")
        except redis.exceptions.NoPermissionError:
            pass
        bad = cli(["status"], {**os.environ, "WISP_REDIS_URL":
                               f"redis://wisp-client:wrong@127.0.0.1:{server.port}/0"}, timeout=60)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
        assert "cannot reach Redis" in bad.stderr and "wrong" not in bad.stderr  # password redacted


def _wait_ready(admin: redis.Redis, names: list[str], c: Cluster, timeout: float = 120.0) -> None:
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = set()
        for key in admin.scan_iter(match="wisp:hb:*"):
            raw = admin.get(key)
            if raw and json.loads(raw).get("ready"):
                ready.add(json.loads(raw)["name"])
        if set(names) <= ready:
            return
        for n, p in c.procs.items():
            assert p.poll() is None, c.log(n)[-2000:]
        time.sleep(0.2)
    raise AssertionError({n: c.log(n)[-1500:] for n in c.procs})
