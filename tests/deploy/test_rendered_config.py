"""Run the rendered Kubernetes configuration, not just validate it.

``kubectl kustomize`` and strict schema validation passed while every WISP pod crash-looped on
Redis authentication: nothing ran what the manifests configure. This test renders an overlay
and starts what it describes as local processes (``tests/deploy/local_pods.py`` builds each
container's environment the way the kubelet does):

* Redis from the rendered StatefulSet: its own start-up script (``sh -c``, config on stdin with
  the password from the Secret; with ``components/acl-users`` the default user off, ``admin``
  and every role's user), the rendered ``redis.conf`` (AOF on, ``noeviction``...), checked by
  its own exec probes;
* every WISP workload's container (scheduler, estimator, verifier, the edge drafter DaemonSet,
  the simulated drafters, the gateway), one pod each, with its rendered ``args`` run by the
  image's ENTRYPOINT and its rendered environment (``envFrom`` ConfigMaps, ``secretKeyRef`` from
  the rendered Secrets, ``fieldRef``, ``resourceFieldRef``), after the init containers that
  matter (``load-functions``, which loads WISP's Redis functions as ``admin``);

then it asserts what a user of the cluster would see:

* the pods may start before Redis (its volume still provisioning): every one whose init
  containers do not need Redis starts first, and its endpoint must answer the rendered liveness
  probe while its readiness probe answers 503 naming Redis (no exit, no crash loop; the
  drafters, whose endpoint comes up only after ``serve drafter``'s ~10 s of model checks, are
  not waited for); Redis then
  starts, from the rendered StatefulSet, and must pass its own exec probes, with AOF on;
* every process's rendered readiness probe (path and port) then passes, and its liveness and
  startup probes too;
* a chat completion through the gateway's OpenAI API with the key from the rendered Secret
  (and a 401 without it), and the documented ``kubectl exec deploy/... -- wisp-cli submit ...``
  and ``... status`` lines of docs/deploy.md (run locally with that pod's environment, plus
  ``--json`` and a short ``--max-new-tokens``), return the target's own greedy token ids and
  list every service; with ``components/acl-users`` the lines the docs give for it must work and
  the others must fail the way the docs say;
* SIGTERM to every process at once (as a ``kubectl delete``): none turns ready again, each exits
  with 0 within its ``terminationGracePeriodSeconds`` less its preStop pause, no traceback or
  NOPERM in any log; Redis then exits within its own and leaves its append-only file.

It prints, per process, the time from start to its probe endpoint answering, to ready, from
Redis up to ready, and from SIGTERM to exit.

Substitutions, only for what cannot exist on a test machine:

* the Redis Service's host name (``REDIS_HOST`` in wisp-config) -> ``127.0.0.1``, and
  ``REDIS_PORT`` -> the private Redis's free port (both checked first to name the rendered
  Service and its port); in ``redis.conf`` ``port 6379`` -> that port and ``bind * -::*`` ->
  ``bind 127.0.0.1`` (no test Redis with a placeholder password on the machine's interfaces);
  the Redis probes' ``redis-cli`` -> ``redis-cli -p PORT`` (in the pod its default port is
  Redis's own; here it would be the shared Redis);
* the image ``redis:7.2-alpine`` -> the local redis-server >= 7 (``/usr/bin``) on the Redis
  container's PATH; the image ``wisp`` -> this checkout's venv (``/opt/venv`` -> ``sys.prefix``);
* ``WISP_DRAFT_MODEL`` / ``WISP_TARGET_MODEL`` -> the tiny random test pair (the cpu overlay's
  ``smollm2-135m`` is not prepared offline, and would cost minutes on two shared cores); so the
  ``models`` init containers (``wisp-cli models prepare <alias>``, which pip-installs the
  weights) are not run;
* the gpu overlay (CUDA image, one GPU per verifier) runs on CPU torch: ``WISP_DEVICE=cuda`` of
  its verifier -> ``cpu`` (``ENV``); its GPU limit, toleration and ``/dev/shm`` volume are as
  rendered (a limit and a toleration mean nothing to a local process, the volume is a folder);
* every mount path (``/models``, ``/tmp``, ``/home/wisp/.cache``, ``/etc/wisp/api-keys``,
  ``/data``, ``/etc/redis``...) and the image's ``/home/wisp`` -> folders under ``tmp_path``,
  filled from the rendered ConfigMaps and Secrets; a claim (``wisp-models``) is one folder
  shared by the pods that mount it;
* container ports (9090 metrics, 8000 API, 6379 Redis) -> free ports, with the ``*_PORT``
  variables that carry them; a drafter's own API (pod-local ``127.0.0.1:8000``, no variable in
  the render) -> ``WISP_DEVICE_API_PORT`` = a free port;
* one pod per workload (the scheduler's and gateway's second replicas, and the second simulated
  device, add nothing to what is checked here), and with ``components/acl-users`` one drafter
  process for both drafter workloads (the gpu render has only the edge one), whose rendered
  containers are compared instead (``SAME_DRAFTERS``); the preStop ``sleep 5`` is not slept:
  the drain bound is the grace period less it.

``WISP_TEST_RENDERED_DROP_ENV=WISP_REDIS_PASSWORD`` (comma-separated) removes variables from
every WISP container's environment: run it so to see this test fail when the rendered
environment cannot log in.

Cost on a quiet 2-core VM: about 30 s for the cpu render (seven processes, three requests),
20 s for cpu-acl and 25 s for gpu (its two ``models`` init containers about 1 s each on the
seeded cache), plus the tiny pair (~10 s, shared with the other tests of the session).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from wisp.settings import Settings

from tests.deploy import k8s_checks as kc
from tests.deploy import local_pods as lp
from tests.faults.test_security import redis7_binary
from tests.reference import chat_prompt_ids, greedy_reference, load_target

REPO = Path(__file__).resolve().parents[2]
RENDERS = {
    "cpu": REPO / "deploy" / "k8s" / "overlays" / "cpu",
    "cpu-acl": Path(__file__).resolve().parent / "overlays" / "cpu-acl",
    "gpu": REPO / "deploy" / "k8s" / "overlays" / "gpu",
}
ENV = {"gpu": {"WISP_DEVICE": "cpu"}}
"""Per render, variables set over the rendered ones: the gpu overlay's verifier asks for cuda,
and runs here on CPU torch (the one substitution for that render)."""
MODEL_INITS = {"gpu"}
"""Renders whose ``models`` init containers run, with the rendered model aliases: the gpu
overlay's are the packaged Qwen pair, which the README's test command prepares; the cache they
prepare into (the ``wisp-models`` claim, an edge node's own volume) is seeded with that
preparation, as every pod start after the first finds it."""
MODEL_KEYS = ("WISP_DRAFT_MODEL", "WISP_TARGET_MODEL")
MAX_NEW = 16
READY_TIMEOUT_S = 120.0
ROLE_ORDER = ("scheduler", "estimator", "verifier", "drafter", "drafter-sim", "gateway")
SAME_DRAFTERS = {"cpu-acl"}
"""Renders run with one drafter process for both drafter workloads (the edge DaemonSet and the
simulated devices), their rendered environments compared instead: a process less on two
shared cores. The cpu render runs both."""
DOCS_EXEC = re.compile(r"kubectl -n wisp exec deploy/(\S+) -- wisp-cli (.*)$")
DOCS_ADMIN_EXEC = re.compile(
    r"\| kubectl -n wisp exec -i deploy/(\S+) -- env ((?:\w+=\S+ )+)wisp-cli (.+)$", re.M)
"""docs/deploy.md's admin lines (loading the Redis functions by hand, ACL users): the admin
password piped in from the Secret (stdin, never a command line), variables set for the one
command, ``wisp-redis:6379`` standing for the Service."""

pytestmark = pytest.mark.skipif(kc.kubectl() is None, reason=kc.KUBECTL_HINT)


@dataclass
class Timing:
    """What the lead's note reports per process (seconds)."""

    pod: str
    ready_s: float
    """From the process's start to its readiness probe's first pass."""
    after_redis_s: float | None
    """From Redis answering to that pass (the pods started before Redis wait for it)."""
    up_s: float | None
    """From the start to the probe endpoint answering (before Redis: alive, not ready)."""
    drain_s: float | None = None
    """From SIGTERM to the exit."""
    bound_s: float | None = None
    """terminationGracePeriodSeconds less the preStop pause."""


def _redis_host_and_port(objs: list[dict[str, Any]]) -> tuple[str, str]:
    """REDIS_HOST / REDIS_PORT of wisp-config, checked to name the rendered Redis Service
    (``<service>.<namespace>.svc``) and its port, which targets the Redis container's port."""
    conf = next(m for m in kc.of_kind(objs, "ConfigMap") if "WISP_MODE" in m.get("data", {}))
    host, port = conf["data"]["REDIS_HOST"], conf["data"]["REDIS_PORT"]
    svc_name, svc_ns, *rest = host.split(".")
    assert rest in (["svc"], ["svc", "cluster", "local"]), host
    svc = kc.find(objs, "Service", svc_name, svc_ns)
    assert svc is not None, f"REDIS_HOST={host}: no Service {svc_name} in namespace {svc_ns}"
    sts = next(s for s in kc.of_kind(objs, "StatefulSet"))
    assert kc.selector_matches(svc["spec"]["selector"], kc.pod_template(sts)["metadata"]["labels"])
    [sp] = [p for p in svc["spec"]["ports"] if str(p["port"]) == port]
    redis_ports = {p.get("name"): p["containerPort"] for p in sts["spec"]["template"]["spec"]
                   ["containers"][0]["ports"]}
    assert sp["targetPort"] in redis_ports or sp["targetPort"] in redis_ports.values()
    return host, port


def _edit_redis_conf(port: int) -> Any:
    def edit(text: str) -> str:
        out, n1 = re.subn(r"(?m)^port 6379$", f"port {port}", text)
        out, n2 = re.subn(r"(?m)^bind .*$", "bind 127.0.0.1", out)
        assert (n1, n2) == (1, 1), "redis.conf: expected one `port 6379` and one `bind` line"
        return out

    return edit


def _pod_name(w: dict[str, Any]) -> str:
    return f"{kc.name(w)}-7f9c6d5b8-x2k4q" if w["kind"] == "Deployment" else f"{kc.name(w)}-9tz4m"


def _api(api_port: int, key: str | None, path: str, body: dict[str, Any] | None = None
         ) -> tuple[int, dict[str, Any]]:
    """GET (or POST ``body``) ``/v1/<path>`` with the bearer key, as any OpenAI client would."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/{path}", data=data,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _chat(api_port: int, key: str | None, model: str, prompt: str) -> tuple[int, dict[str, Any]]:
    return _api(api_port, key, "chat/completions", {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_NEW, "temperature": 0, "return_token_ids": True})


@dataclass(frozen=True)
class DocExec:
    """A ``kubectl -n NS exec deploy/X -- wisp-cli CMD ...`` line of docs/deploy.md."""

    deploy: str
    args: tuple[str, ...]
    acl: bool
    """Written for components/acl-users (in its section)."""


def _documented_execs() -> list[DocExec]:
    found: list[DocExec] = []
    section = ""
    for line in (REPO / "docs" / "deploy.md").read_text().splitlines():
        if line.startswith("#"):
            section = line
        m = DOCS_EXEC.match(line.strip())
        if m:
            found.append(DocExec(m.group(1), tuple(shlex.split(m.group(2))),
                                 "ACL users" in section))
    assert {d.args[0] for d in found} >= {"submit", "status"}, found
    return found


def _documented_admin_execs() -> list[tuple[str, dict[str, str], list[str]]]:
    """(deployment, variables, wisp-cli arguments) of each DOCS_ADMIN_EXEC line."""
    found = []
    for m in DOCS_ADMIN_EXEC.finditer((REPO / "docs" / "deploy.md").read_text()):
        env = dict(kv.split("=", 1) for kv in m.group(2).split())
        found.append((m.group(1), env, shlex.split(m.group(3))))
    assert any(args[:2] == ["redis", "load-functions"] for _, _, args in found), found
    return found


def run_rendered(key: str, root: Path, tiny_pair: tuple[Path, Path]) -> list[Timing]:
    """Everything the module docstring says, for render ``key``; the timings."""
    exe = redis7_binary()
    if exe is None:
        pytest.skip("needs redis-server >= 7 (the manifests run redis:7; ACL key patterns)")
    target, draft = tiny_pair
    objs = kc.render(RENDERS[key])
    _redis_host_and_port(objs)
    redis_port = lp.free_port()
    dropped = [v for v in os.environ.get("WISP_TEST_RENDERED_DROP_ENV", "").split(",") if v]
    subs = lp.Substitutions(
        config={"REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_port),
                "WISP_DRAFT_MODEL": str(draft), "WISP_TARGET_MODEL": str(target),
                "redis.conf": _edit_redis_conf(redis_port)},
        ports={6379: redis_port},
        commands={"redis-cli": f"{Path(exe).parent / 'redis-cli'} -p {redis_port}"},
    )
    wisp_subs = lp.Substitutions(config=subs.config,
                                 env={**ENV.get(key, {}), **dict.fromkeys(dropped)})
    shared: dict[str, Path] = {}
    started: list[lp.LocalContainer] = []
    timings: list[Timing] = []
    try:
        # ---- the WISP pods start first, as they may in a cluster while Redis's volume is still
        # provisioned: their probe endpoints must answer (alive, not ready) and they must wait
        sts = next(s for s in kc.of_kind(objs, "StatefulSet") if kc.name(s).endswith("redis"))
        rc = lp.build(objs, sts, sts["spec"]["template"]["spec"]["containers"][0],
                      pod=f"{kc.name(sts)}-0", root=root, subs=subs, shared=shared,
                      base_env={"PATH": f"{Path(exe).parent}:/usr/bin:/bin"})
        pods: dict[str, lp.LocalContainer] = {}
        inits: dict[str, list[lp.LocalContainer]] = {}
        model_inits: list[lp.LocalContainer] = []
        init_subs = lp.Substitutions(
            config={k: v for k, v in subs.config.items() if k not in MODEL_KEYS}, env=ENV.get(key, {}))
        present = {kc.component(w) for w, _ in kc.workloads(objs)}
        for role in (r for r in ROLE_ORDER if r in present):
            w = kc.wisp_workload(objs, role)
            spec = kc.pod_template(w)["spec"]
            pod = _pod_name(w)
            # `models prepare` pip-installs packaged weights: the tiny pair stands in for them,
            # but for MODEL_INITS, whose init containers prepare the rendered aliases
            inits[role] = [lp.build(objs, w, ic, pod=pod, root=root, subs=wisp_subs, shared=shared)
                           for ic in spec.get("initContainers", []) if ic["args"][0] != "models"]
            if key in MODEL_INITS and role != "drafter-sim":
                model_inits += [lp.build(objs, w, ic, pod=pod, root=root, subs=init_subs,
                                         shared=shared)
                                for ic in spec.get("initContainers", []) if ic["args"][0] == "models"]
            [main] = spec["containers"]
            c = lp.build(objs, w, main, pod=pod, root=root, subs=wisp_subs, shared=shared)
            if role.startswith("drafter") and "WISP_DEVICE_API_PORT" not in c.env:
                c.env["WISP_DEVICE_API_PORT"] = str(lp.free_port())
            pods[role] = c
        if key in SAME_DRAFTERS:
            # one drafter process stands for both drafter workloads: their rendered commands and
            # environments must then be the same but for the device's identity
            sim, edge = pods.pop("drafter-sim").container, pods["drafter"].container
            assert not inits.pop("drafter-sim")
            assert (sim["args"], sim["envFrom"]) == (edge["args"], edge["envFrom"])
            assert ([e for e in sim["env"] if e["name"] != "WISP_NAME"]
                    == [e for e in edge["env"] if e["name"] != "WISP_NAME"]), \
                "the two drafter workloads are configured differently"
        # ---- the model caches, before anything (no Redis needed): each `models` init
        # container as rendered, against a cache seeded with this machine's preparation
        for c in model_inits:
            cache = Path(c.env["WISP_MODEL_CACHE"])
            for alias in (c.env[k] for k in MODEL_KEYS):
                prepared = Settings().model_cache / alias
                assert (prepared / "wisp-model.json").is_file(), \
                    f"{alias} is not prepared here: run `wisp-cli models prepare {alias}`"
                if not (cache / alias).exists():
                    (cache / alias).symlink_to(prepared, target_is_directory=True)
            begun = time.monotonic()
            started.append(c.start())
            assert c.proc is not None
            assert c.proc.wait(120) == 0, f"{c.pod} init {c.name} failed:\n{c.output()[-3000:]}"
            said = c.output()
            assert "Traceback" not in said, said[-3000:]
            want = MODEL_KEYS if "--for" in c.argv else ("WISP_TARGET_MODEL",)
            assert all(c.env[k] in said for k in want), (c.argv, said[-2000:])
            timings.append(Timing(f"{c.pod} (init {c.name})", time.monotonic() - begun, None, None))
        early = {role: c for role, c in pods.items() if not inits[role]}
        for c in early.values():
            started.append(c.start())
        up: dict[str, float] = {}
        deadline = time.monotonic() + READY_TIMEOUT_S
        # Redis starts once these answered without it; the drafters, whose endpoint comes up
        # only after `serve drafter`'s model checks (~10 s of imports here), are not waited for
        before_redis = {r: c for r, c in early.items() if not r.startswith("drafter")}
        while len(up) < len(before_redis):
            for role, c in before_redis.items():
                if role in up:
                    continue
                if not c.running():
                    raise AssertionError(f"{c.pod} exited with {c.proc.returncode} while Redis was "
                                         f"not up yet:\n{c.output()[-3000:]}")
                if c.probe("livenessProbe")[0]:
                    ok, said = c.probe("readinessProbe")
                    assert not ok and '"redis":' in said, f"{c.pod} without Redis: {said}"
                    up[role] = time.monotonic() - c.started
            assert time.monotonic() < deadline, {c.pod: c.output()[-1500:] for c in early.values()}
            time.sleep(0.1)

        # ---- Redis, from its StatefulSet
        started.append(rc.start())
        ready = {rc.pod: rc.wait_probe("readinessProbe", 30)}
        redis_up = time.monotonic()
        assert rc.probe("livenessProbe")[0] and rc.probe("startupProbe")[0]
        admin_user = "admin" if "--user admin" in json.dumps(rc.container["readinessProbe"]) else None
        admin = redis.Redis(port=redis_port, username=admin_user,
                            password=rc.env["REDIS_PASSWORD"])
        assert admin.config_get("appendonly") == {"appendonly": "yes"}
        assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert admin.config_get("bind")["bind"] == "127.0.0.1"

        # ---- the pods whose init containers need Redis (load-functions): those, then the server
        for role, cs in inits.items():
            for init in cs:
                started.append(init.start())
                assert init.proc is not None
                assert init.proc.wait(60) == 0, f"{init.pod} init {init.name} failed:\n" \
                                                 f"{init.output()[-3000:]}"
            if role not in early:
                started.append(pods[role].start())
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = dict(pods)
        after_redis: dict[str, float] = {}
        while waiting:
            for role, c in list(waiting.items()):
                if role not in up and c.probe("livenessProbe")[0]:
                    up[role] = time.monotonic() - c.started
                ok, _ = c.probe("readinessProbe")
                if ok:
                    ready[c.pod] = time.monotonic() - c.started
                    after_redis[c.pod] = time.monotonic() - redis_up
                    del waiting[role]
                elif not c.running():
                    raise AssertionError(f"{c.pod} exited with {c.proc.returncode} before it was "
                                         f"ready:\n{c.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError({c.pod: c.output()[-1500:] for c in waiting.values()})
            time.sleep(0.1)
        for c in pods.values():
            for probe in ("livenessProbe", "startupProbe"):
                ok, said = c.probe(probe)
                assert ok, f"{c.pod}: {probe} fails once ready: {said}"

        # ---- requests, as the docs tell a user
        reference = load_target(target)
        gw = pods["gateway"]
        keys_file = Path(gw.env["WISP_API_KEYS_FILE"])
        api_key = next(k.strip() for k in keys_file.read_text().splitlines()
                       if k.strip() and not k.startswith("#"))
        api_port = gw.ports["http"]
        assert _api(api_port, None, "models")[0] == 401, "the API answered without a key"
        status, models = _api(api_port, api_key, "models")
        assert status == 200, models
        model = models["data"][0]["id"]
        prompt = "Write a haiku about Redis."
        status, answer = _chat(api_port, api_key, model, prompt)
        assert status == 200, answer
        want = greedy_reference(reference, chat_prompt_ids(target, prompt), MAX_NEW)
        assert answer["wisp"]["token_ids"] == want, "the API's output is not the target's greedy"

        # the documented `kubectl exec` lines, one per target and command, run together
        acl = key.endswith("acl")
        by_role = {kc.name(kc.wisp_workload(objs, r)): r for r in pods}
        execs = {(d.deploy, d.args[0], d.acl): d for d in reversed(_documented_execs())}
        running = {}
        for doc in execs.values():
            c = pods[by_role[doc.deploy]]
            extra = ["--max-new-tokens", str(MAX_NEW)] if doc.args[0] == "submit" else []
            running[doc] = subprocess.Popen([c.argv[0], *doc.args, "--json", *extra], env=c.env,
                                            cwd=c.cwd, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
        for doc, proc in running.items():
            stdout, stderr = proc.communicate(timeout=180)
            what = f"kubectl exec deploy/{doc.deploy} -- wisp-cli {shlex.join(doc.args)}"
            if acl and not doc.acl:
                # the docs say so: the scheduler's ACL user may not submit nor read stream lengths
                assert proc.returncode == 1, (what, stdout)
                assert "Redis refused a command to this user" in stderr, (what, stderr)
                continue
            assert proc.returncode == 0, f"{what}: {stderr}"
            if doc.args[0] == "submit":
                out = json.loads(stdout.strip().splitlines()[-1])
                assert out["token_ids"] == greedy_reference(
                    reference, chat_prompt_ids(target, doc.args[1]), MAX_NEW), what
            else:
                live = {s["name"] for s in json.loads(stdout)["services"]}
                assert {c.env["WISP_NAME"] for c in pods.values()} <= live, (what, stdout)

        # the documented admin line (ACL users: loading WISP's functions by hand as `admin`)
        if acl:
            host, port = _redis_host_and_port(objs)
            for deploy, extra, args in _documented_admin_execs():
                c = pods[by_role[deploy]]
                env = {**c.env}
                for k, v in extra.items():
                    assert "wisp-redis:6379" not in v or host.split(".")[0] == "wisp-redis" \
                        and port == "6379", (host, port)
                    env[k] = v.replace("wisp-redis:6379", f"127.0.0.1:{redis_port}")
                assert "--password-stdin" in args, args  # never a password in a command line
                assert rc.env["REDIS_PASSWORD"] not in json.dumps([extra, args])
                done = subprocess.run([c.argv[0], *args], env=env, cwd=c.cwd, capture_output=True,
                                      text=True, timeout=120, input=rc.env["REDIS_PASSWORD"] + "\n")
                what = f"kubectl exec deploy/{deploy} -- env ... wisp-cli {shlex.join(args)}"
                assert done.returncode == 0, (what, done.stderr[-2000:])

        # ---- SIGTERM, as when the pods are deleted (after their preStop pause)
        sent = {role: c.terminate() for role, c in pods.items()}
        exited: dict[str, float] = {}
        ready_after_term: dict[str, str] = {}
        deadline = time.monotonic() + max(c.grace_s for c in pods.values())
        while len(exited) < len(pods) and time.monotonic() < deadline:
            for role, c in pods.items():
                if role in exited:
                    continue
                if not c.running():
                    exited[role] = time.monotonic() - sent[role]
                    continue
                ok, said = c.probe("readinessProbe", timeout=1.0)
                if ok:
                    ready_after_term[role] = said
            time.sleep(0.05)
        for role, c in pods.items():
            bound = c.grace_s - c.prestop_s
            timings.append(Timing(c.pod, ready[c.pod], after_redis[c.pod], up.get(role),
                                  exited.get(role), bound))
            assert role in exited and exited[role] <= bound, (
                f"{c.pod} did not exit within {bound:.0f} s of SIGTERM:\n{c.output()[-2000:]}")
            assert c.proc.returncode == 0, f"{c.pod} exited with {c.proc.returncode}:\n" \
                                           f"{c.output()[-2000:]}"
            for line in c.output().splitlines():
                assert "Traceback" not in line and "NOPERM" not in line, c.output()[-3000:]
        assert not ready_after_term, f"ready after SIGTERM: {ready_after_term}"
        t = rc.terminate()
        assert rc.proc is not None
        rc.proc.wait(rc.grace_s)
        timings.insert(0, Timing(rc.pod, ready[rc.pod], None, None, time.monotonic() - t,
                                 rc.grace_s))
        assert rc.proc.returncode == 0, rc.output()[-2000:]
        aof = next(p for p in (root / rc.pod / "volumes").iterdir() if (p / "appendonlydir").is_dir())
        assert any((aof / "appendonlydir").iterdir()), "Redis wrote no append-only file"
    finally:
        for c in reversed(started):
            c.kill()
    print(f"\n{key}: seconds from start to probe endpoint up (before Redis) / ready, from Redis "
          "up to ready, from SIGTERM to exit (bound: grace - preStop)")
    for tm in timings:
        def f(x: float | None) -> str:
            return "    -" if x is None else f"{x:5.2f}"
        if tm.bound_s is None:  # an init container: from its start to its exit
            print(f"  {tm.pod:34s} ran {f(tm.ready_s)}")
            continue
        print(f"  {tm.pod:34s} up {f(tm.up_s)}  ready {f(tm.ready_s)}  after Redis "
              f"{f(tm.after_redis_s)}  drain {f(tm.drain_s)} (<= {tm.bound_s:.0f})")
    return timings


@pytest.mark.parametrize("key", sorted(RENDERS))
def test_the_rendered_configuration_runs(key: str, tmp_path: Path,
                                         tiny_pair: tuple[Path, Path]) -> None:
    run_rendered(key, tmp_path, tiny_pair)
