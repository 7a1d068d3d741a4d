"""components/acl-users: every workload logs in to Redis as its role's ACL user.

Rendered with ``kubectl kustomize`` (a CPU overlay with the component), then the Redis
container's own start-up script is run with a real redis-server >= 7 (its paths pointed at a
temporary directory, a free port): the ACL lines it builds with sed must load, the default user
must be off, every role's user must log in with its password from the Secret, and the
``admin`` user must be able to load WISP's function library (the scheduler's init container
does that), after which the drafter user may FCALL it and may not EVAL."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from wisp.bus import LIBRARY_NAME, function_library
from wisp.services.runner import free_port

from tests.deploy import k8s_checks as kc
from tests.faults.test_security import ROLES, redis7_binary

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "acl-users"
OVERLAY = Path(__file__).resolve().parent / "overlays" / "cpu-acl"
WITH_EXTRAS = Path(__file__).resolve().parent / "overlays" / "cpu-acl-extras"
"""cpu + keda + monitoring + acl-users, in that order."""

pytestmark = pytest.mark.skipif(kc.kubectl() is None, reason=kc.KUBECTL_HINT)


def _objs() -> list[dict[str, Any]]:
    return kc.render(OVERLAY)


def _workloads(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "DaemonSet")}


def test_the_components_acl_file_is_the_shipped_one() -> None:
    assert (COMPONENT / "redis-acl.conf").read_text() == (ROOT / "deploy" / "redis-acl.conf").read_text(), (
        "copy deploy/redis-acl.conf to deploy/k8s/components/acl-users/redis-acl.conf")


def test_every_workload_logs_in_as_its_roles_user() -> None:
    expected = {"wisp-drafter": "drafter", "wisp-drafter-sim": "drafter", "wisp-estimator": "estimator",
                "wisp-scheduler": "scheduler", "wisp-verifier": "verifier", "wisp-gateway": "gateway"}
    work = _workloads(_objs())
    assert set(expected) <= set(work)
    for name, role in expected.items():
        spec = work[name]["spec"]["template"]["spec"]
        main = spec["containers"][0]
        env = {e["name"]: e for e in main["env"]}
        assert env["WISP_REDIS_URL"]["value"].startswith(f"redis://wisp-{role}@"), name
        assert env["WISP_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == f"{role}-password"
        for c in spec.get("initContainers", []):  # only the loader has the admin password
            for e in c.get("env", []):
                if e["name"] == "WISP_REDIS_PASSWORD":
                    assert (name, c["name"]) == ("wisp-scheduler", "load-functions"), (name, c["name"])
    loader = work["wisp-scheduler"]["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"] for c in loader if c["name"] == "load-functions"] == [["redis", "load-functions"]]


def test_the_redis_start_script_builds_working_users(tmp_path: Path) -> None:
    exe = redis7_binary()
    if exe is None:
        pytest.skip("needs redis-server >= 7")
    objs = _objs()
    secret = next(o for o in objs
                  if o["kind"] == "Secret" and o["metadata"]["name"].startswith("wisp-redis-auth"))
    pw = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    sts = next(o for o in objs if o["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    port = free_port()
    # the rendered redis.conf (what `CONFIG GET *` below reads), on a private port and folder
    [conf] = [o["data"]["redis.conf"] for o in objs if o["kind"] == "ConfigMap"
              and "redis.conf" in o.get("data", {})]
    conf, n = re.subn(r"(?m)^(port \d+|bind .*|dir .*)$", lambda m: {
        "port": f"port {port}", "bind": "bind 127.0.0.1", "dir": f"dir {tmp_path}"}[
        m.group(1).split()[0]], conf)
    assert n == 3, "redis.conf: expected one port, bind and dir line"
    (tmp_path / "redis.conf").write_text(conf)
    script = (script.replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
              .replace("/etc/redis-acl/", f"{COMPONENT}/")
              .replace("exec redis-server -", f"exec {exe} -"))
    env = {**os.environ, "PATH": f"{Path(exe).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            env[e["name"]] = pw[ref["key"]]
    log = open(tmp_path / "redis.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        admin = redis.Redis(port=port, username="admin", password=pw["password"])
        deadline = time.monotonic() + 20
        while True:
            try:
                admin.ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, (tmp_path / "redis.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.1)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port, password=pw["password"]).ping()  # the default user is off
        for role in ROLES:
            user = redis.Redis(port=port, username=f"wisp-{role}", password=pw[f"{role}-password"])
            assert user.ping(), role
        # the exporter reads every setting (CONFIG GET *): none of them may be a password
        exporter = redis.Redis(port=port, username="wisp-exporter", password=pw["exporter-password"])
        settings = " ".join(f"{k} {v}" for k, v in exporter.config_get("*").items())
        assert len(settings) > 1000  # it did read them
        leaked = [k for k, v in pw.items() if k.endswith("password") and v in settings]
        assert not leaked, f"CONFIG GET * shows {leaked}"
        admin.function_load(function_library(), replace=True)  # the scheduler's init container
        drafter = redis.Redis(port=port, username="wisp-drafter", password=pw["drafter-password"])
        assert drafter.fcall(f"{LIBRARY_NAME}_loaded", 0) == 1
        with pytest.raises(redis.exceptions.NoPermissionError):
            drafter.eval("return 1", 0)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_keda_logs_in_as_its_read_only_user() -> None:
    """With components/keda before acl-users, KEDA's triggers authenticate as ``wisp-keda`` (it
    may only count: XINFO GROUPS, XPENDING, XLEN), from keys of the same Secret, not as admin."""
    objs = kc.render(WITH_EXTRAS)
    secret = next(o for o in objs
                  if o["kind"] == "Secret" and o["metadata"]["name"].startswith("wisp-redis-auth"))
    auth = next(o for o in objs if o["kind"] == "TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"username", "password"}
    assert {r["name"] for r in refs.values()} == {secret["metadata"]["name"]}
    assert base64.b64decode(secret["data"][refs["username"]["key"]]).decode() == "wisp-keda"
    assert refs["password"]["key"] == "keda-password"
    triggers = [t for o in objs if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]
                if t["type"] == "redis-streams"]
    assert triggers and all(t["authenticationRef"]["name"] == auth["metadata"]["name"]
                            for t in triggers)


def test_the_redis_exporter_logs_in_as_its_own_user() -> None:
    """With components/monitoring before acl-users, the redis_exporter sidecar authenticates as
    ``wisp-exporter`` (server statistics only) from keys of the Redis Secret, not with the admin
    password; without monitoring, acl-users adds no exporter (its patch finds no sidecar)."""
    objs = kc.render(WITH_EXTRAS)
    secret = next(o for o in objs
                  if o["kind"] == "Secret" and o["metadata"]["name"].startswith("wisp-redis-auth"))
    [sts] = kc.of_kind(objs, "StatefulSet")
    containers = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    assert list(containers) == ["redis", "redis-exporter"]
    exporter = containers["redis-exporter"]
    assert exporter["image"].startswith("oliver006/redis_exporter:")
    env = {e["name"]: e for e in exporter["env"]}
    assert env["REDIS_USER"] == {"name": "REDIS_USER", "value": "wisp-exporter"}
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "exporter-password"}
    assert "exporter-password" in secret["data"]
    [redis_c] = [c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"]
    assert {"name": "EXPORTER_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"],
                                           "key": "exporter-password"}}} in redis_c["env"]
    [plain] = kc.of_kind(_objs(), "StatefulSet")
    assert [c["name"] for c in plain["spec"]["template"]["spec"]["containers"]] == ["redis"]


OWN_PASSWORDS = Path(__file__).resolve().parent / "overlays" / "cpu-acl-own-passwords"
"""docs/deploy.md's "Redis password" overlay: keda, monitoring, acl-users and one env file."""


def _documented_password_script() -> str:
    """The shell block of docs/deploy.md's "Redis password" section."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## Redis password", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_an_operators_overlay_replaces_every_password() -> None:
    """The documented overlay, in one kustomization with the components, leaves no placeholder
    in wisp-redis-auth and every reference to it finds its key. (The role passwords used to be
    merged in by components/acl-users, after the overlay's own generator: they kept their
    CHANGE-ME values whatever the operator wrote.)"""
    objs = kc.render(OWN_PASSWORDS)
    [secret] = [o for o in objs
                if o["kind"] == "Secret" and o["metadata"]["name"].startswith("wisp-redis-auth")]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    given = dict(line.split("=", 1) for line in
                 (OWN_PASSWORDS / "redis-password.env").read_text().splitlines() if line)
    assert data == given
    assert not [k for k, v in data.items() if "CHANGE-ME" in v]
    # the workloads and KEDA refer to that Secret, and every key they name is in it
    assert secret["metadata"]["name"] in json.dumps([o for o in objs if o["kind"] != "Secret"])
    assert not kc.dangling_references(objs)


def test_the_documented_password_file_has_every_key(tmp_path: Path) -> None:
    """The shell lines of docs/deploy.md write an env file with exactly the keys the rendered
    configuration refers to (the test overlay's), each a fresh 64-hex-digit password."""
    (tmp_path / "my-cluster").mkdir()
    subprocess.run(["bash", "-euc", _documented_password_script()], cwd=tmp_path, check=True)
    made = dict(line.split("=", 1) for line in
                (tmp_path / "my-cluster" / "redis-password.env").read_text().splitlines() if line)
    given = dict(line.split("=", 1) for line in
                 (OWN_PASSWORDS / "redis-password.env").read_text().splitlines() if line)
    assert set(made) == set(given)
    pw = [v for k, v in made.items() if k.endswith("password")]
    assert len(set(pw)) == len(pw) and all(len(v) == 64 and int(v, 16) >= 0 for v in pw)
    assert (tmp_path / "my-cluster" / ".gitignore").read_text().strip() == "redis-password.env"
