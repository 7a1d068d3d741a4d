"""Run a rendered pod's containers as local processes, the way the kubelet would start them.

``kubectl kustomize`` and schema validation say that the manifests are well formed, not that
the processes they describe can run: once every WISP pod crash-looped on Redis authentication
and no test noticed. This module turns a rendered container into a local process with the
environment the kubelet would give it, so a test can run the rendered configuration itself:

* the image's own ``ENV`` (the runtime stage of the Dockerfile), then ``envFrom``
  (ConfigMaps and Secrets, with their ``prefix``), then ``env`` in order, with ``$(VAR)``
  expanded against what is defined before it (as the kubelet does; the image's ENV is not
  visible to ``$(VAR)`` there either) and ``valueFrom`` resolved from the rendered objects:
  ``secretKeyRef`` / ``configMapKeyRef`` (Secrets' base64 ``data`` and ``stringData``),
  ``fieldRef`` (pod name, namespace, node name) and ``resourceFieldRef`` (ceil(quantity /
  divisor)); a missing key without ``optional`` is an error, as it is for the kubelet
  (``CreateContainerConfigError``);
* ``args`` with ``$(VAR)`` expanded, run by the image's ``ENTRYPOINT`` (``wisp-cli``) or the
  container's ``command``;
* every volume mount as a local folder filled from its source (ConfigMap and Secret files with
  ``items`` and ``defaultMode``; emptyDirs and claims empty, a claim shared by every pod that
  mounts it).

Only what cannot exist on a test machine is replaced, through ``Substitutions`` (every test
lists its own): container paths (mount paths and image paths such as ``/home/wisp`` or
``/opt/venv``) become folders under a temporary root; a container port becomes a free local
port, together with every ``*_PORT`` variable whose value is that port; and whatever the test
maps explicitly (the Redis host, the models).
"""

from __future__ import annotations

import base64
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wisp.services.runner import free_port

from tests.deploy import k8s_checks as kc

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


# ------------------------------------------------------------------------------ image
def image_env(dockerfile: Path = REPO / "Dockerfile") -> dict[str, str]:
    """The ``ENV`` of the Dockerfile's last stage (what the image's processes start with),
    ``$VAR`` expanded against what that stage defined before (an unknown one, such as the base
    image's ``$PATH``, is left for the caller)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    stages = re.split(r"(?m)^FROM\s", text)
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        line = line.strip()
        if not line.upper().startswith("ENV "):
            continue
        for word in shlex.split(line[4:], comments=True):
            key, _, value = word.partition("=")
            env[key] = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                              lambda m: env.get(m.group(1), m.group(0)), value)
    return env


def entrypoint(dockerfile: Path = REPO / "Dockerfile") -> list[str]:
    """The image's ``ENTRYPOINT`` (exec form)."""
    import json

    for line in reversed(dockerfile.read_text().splitlines()):
        if line.startswith("ENTRYPOINT"):
            return list(json.loads(line.split(None, 1)[1]))
    raise AssertionError(f"{dockerfile} has no ENTRYPOINT")


# ------------------------------------------------------------------------------ objects
def secret_data(objs: list[Obj]) -> dict[str, dict[str, str]]:
    """Every rendered Secret's keys, decoded: base64 ``data`` and plain ``stringData`` (which
    wins, as the API server merges it)."""
    out: dict[str, dict[str, str]] = {}
    for s in kc.of_kind(objs, "Secret"):
        data = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
        data.update(s.get("stringData") or {})
        out[kc.name(s)] = data
    return out


def configmap_data(objs: list[Obj]) -> dict[str, dict[str, str]]:
    return {kc.name(c): dict(c.get("data") or {}) for c in kc.of_kind(objs, "ConfigMap")}


def quantity(q: str | int | float) -> float:
    """A Kubernetes resource quantity as a number (``500m`` -> 0.5, ``1Gi`` -> 2**30)."""
    s = str(q)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3,
                "M": 1e6, "G": 1e9, "T": 1e12}
    for suf, mult in suffixes.items():
        if s.endswith(suf):
            return float(s[: -len(suf)]) * mult
    return float(s)


def expand(value: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` as the kubelet expands it: a defined variable is replaced, an undefined
    reference stays as written, ``$$`` is a literal ``$``."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return VAR_REF.sub(sub, value)


# ------------------------------------------------------------------------------ substitutions
@dataclass
class Substitutions:
    """What a test replaces because it cannot exist locally; everything else is as rendered.

    ``paths``: container path prefix -> local path (the longest prefix wins; only whole path
    components match), applied to the environment, the arguments, probe commands and the
    files of ConfigMap volumes. ``config``: ConfigMap key -> its local value, or a function of
    the rendered one, applied to every ConfigMap before any container reads it (the Redis
    host and port, the model ids, redis.conf's port). ``ports``: container port -> local port
    (others get a free port). ``commands``: a word of a probe's command -> what runs instead
    (``redis-cli`` -> ``redis-cli -p PORT``: inside the pod the default port is its own).
    ``env``: variables set after the rendered ones (``None`` removes one: how a test checks
    that a missing variable is noticed)."""

    paths: dict[str, str] = field(default_factory=dict)
    config: dict[str, str | Callable[[str], str]] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)
    env: dict[str, str | None] = field(default_factory=dict)

    def path(self, text: str) -> str:
        """``text`` with every container path replaced, in one pass (a local folder may itself
        lie under a container path such as /tmp)."""
        if not self.paths:
            return text
        alternatives = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        pattern = rf"(?<![\w.~/-])({alternatives})(?=/|$|[\s\"',;:])"
        return re.sub(pattern, lambda m: self.paths[m.group(1)], text)

    def command(self, text: str) -> str:
        """``text`` (a probe's command) with ``commands`` and ``paths`` applied. Every
        occurrence of a command word must be replaced: one left as it was (a full path such as
        /usr/local/bin/redis-cli) would run against what the word stands for on this machine
        (the shared Redis on 6379), so it is an error."""
        for word, instead in self.commands.items():
            text = re.sub(rf"(?<![\w./-]){re.escape(word)}(?![\w./-])", instead, text)
            assert word not in text.replace(instead, ""), (
                f"{word!r} in a probe's command is not replaced everywhere: {text}")
        return self.path(text)

    def configmaps(self, objs: list[Obj], relocate: bool = False) -> dict[str, dict[str, str]]:
        """Every rendered ConfigMap's data with ``config`` applied (after ``paths``, with
        ``relocate``: a local value is never relocated again, even when it lies under a
        container path such as /tmp)."""
        maps = configmap_data(objs)
        for m in maps.values():
            for k in m:
                m[k] = self.path(m[k]) if relocate else m[k]
            for k, v in self.config.items():
                if k in m:
                    m[k] = v(m[k]) if callable(v) else v
        return maps


# ------------------------------------------------------------------------------ containers
@dataclass
class LocalContainer:
    """One rendered container, ready to start as a local process."""

    pod: str
    workload: Obj
    container: Obj
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    """Port name (and number, as a string) -> the local port standing in for it."""
    cwd: Path
    log: Path
    subs: Substitutions
    """This container's substitutions (its mounts included)."""
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def name(self) -> str:
        return self.container["name"]

    @property
    def pod_spec(self) -> Obj:
        tpl = kc.pod_template(self.workload)
        assert tpl is not None
        return tpl["spec"]

    @property
    def grace_s(self) -> float:
        """terminationGracePeriodSeconds (the API's default is 30)."""
        return float(self.pod_spec.get("terminationGracePeriodSeconds", 30))

    @property
    def prestop_s(self) -> float:
        """How long the preStop hook runs before SIGTERM (a ``sleep N`` exec; 0 without one)."""
        hook = self.container.get("lifecycle", {}).get("preStop")
        if hook is None:
            return 0.0
        cmd = hook.get("exec", {}).get("command", [])
        assert cmd[:1] == ["sleep"], f"{self.pod}: a preStop hook the test cannot time: {hook}"
        return float(cmd[1])

    def start(self) -> LocalContainer:
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it; closed with the process
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def probe(self, kind: str, timeout: float = 3.0) -> tuple[bool, str]:
        """Run the rendered ``readinessProbe`` / ``livenessProbe`` / ``startupProbe`` once:
        (passed, what it answered)."""
        p = self.container.get(kind)
        assert p is not None, f"{self.pod}/{self.name} has no {kind}"
        if "httpGet" in p:
            return self.http_get(p["httpGet"]["path"], p["httpGet"]["port"], timeout)
        if "exec" in p:
            cmd = [self.subs.command(a) for a in p["exec"]["command"]]
            try:
                done = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                      timeout=timeout, cwd=self.cwd)
            except subprocess.TimeoutExpired:
                return False, "timed out"
            return done.returncode == 0, (done.stdout + done.stderr).strip()
        raise AssertionError(f"{self.pod}/{self.name}: unsupported {kind}: {p}")

    def http_get(self, path: str, port: str | int, timeout: float = 3.0) -> tuple[bool, str]:
        local = self.ports[str(port)]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{local}{path}", timeout=timeout) as r:
                return 200 <= r.status < 400, f"{r.status} {r.read().decode(errors='replace')}"
        except urllib.error.HTTPError as err:
            return False, f"{err.code} {err.read().decode(errors='replace')}"
        except (OSError, urllib.error.URLError) as err:
            return False, f"no answer: {err}"

    def wait_probe(self, kind: str, timeout_s: float, period_s: float = 0.1) -> float:
        """Seconds from start until ``kind`` first passes; fails at once if the process exits."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            ok, last = self.probe(kind)
            if ok:
                return time.monotonic() - self.started
            if not self.running():
                raise AssertionError(f"{self.pod}/{self.name} exited with {self.proc.returncode} "
                                     f"before its {kind} passed:\n{self.output()[-3000:]}")
            time.sleep(period_s)
        raise AssertionError(f"{self.pod}/{self.name}: {kind} still failing after {timeout_s:.0f}"
                             f" s ({last}):\n{self.output()[-3000:]}")

    def terminate(self) -> float:
        """SIGTERM; returns the time of sending it (monotonic)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def pod_env(objs: list[Obj], spec: Obj, c: Obj, pod: str, node: str, subs: Substitutions,
            base: Mapping[str, str]) -> dict[str, str]:
    """The environment the kubelet gives container ``c`` of pod ``pod`` (see module doc),
    over ``base`` (the image's ENV), with ``subs`` applied to what the render says."""
    secrets, maps = secret_data(objs), subs.configmaps(objs, relocate=True)
    namespace = kc.ns(objs[0]) if objs else None
    declared: dict[str, str] = {}
    for src in c.get("envFrom", []):
        prefix = src.get("prefix", "")
        for key, store in (("configMapRef", maps), ("secretRef", secrets)):
            if key in src:
                ref = src[key]
                if ref["name"] not in store:
                    assert ref.get("optional"), f"{pod}: {key} {ref['name']} is not in the render"
                    continue
                declared.update({prefix + k: v for k, v in store[ref["name"]].items()})
    for e in c.get("env", []):
        if "value" in e:
            declared[e["name"]] = expand(subs.path(str(e["value"])), declared)
            continue
        vf = e.get("valueFrom", {})
        value: str | None = None
        for key, store in (("secretKeyRef", secrets), ("configMapKeyRef", maps)):
            if key in vf:
                ref = vf[key]
                value = store.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise AssertionError(f"{pod}/{c['name']}: {e['name']} needs {key} "
                                         f"{ref['name']}/{ref['key']}, which is not in the render")
        if "fieldRef" in vf:
            path = vf["fieldRef"]["fieldPath"]
            value = {"metadata.name": pod, "metadata.namespace": namespace or "default",
                     "spec.nodeName": node, "status.podIP": "127.0.0.1",
                     "spec.serviceAccountName": spec.get("serviceAccountName", "default")}[path]
        if "resourceFieldRef" in vf:
            ref = vf["resourceFieldRef"]
            target = next(x for x in kc.all_containers(spec)
                          if x["name"] == ref.get("containerName", c["name"]))
            kind, _, res = ref["resource"].partition(".")
            raw = target.get("resources", {}).get(kind, {}).get(res)
            if raw is None:
                raw = target.get("resources", {}).get("limits", {}).get(res)
            assert raw is not None, f"{pod}: {ref} resolves to the node's allocatable"
            value = str(math.ceil(quantity(raw) / quantity(ref.get("divisor", "1"))))
        if value is not None:
            declared[e["name"]] = value
    env = dict(base)
    env.update(declared)
    return env


def build(objs: list[Obj], workload: Obj, c: Obj, *, pod: str, root: Path, subs: Substitutions,
          node: str = "edge-node-1", shared: dict[str, Path] | None = None,
          argv0: list[str] | None = None, base_env: Mapping[str, str] | None = None
          ) -> LocalContainer:
    """Container ``c`` of ``workload`` as a local process under ``root`` (its volumes, its
    home, its log), not started yet. ``shared``: claim name -> folder, for claims several pods
    mount; ``argv0``: what runs the args when the container has no ``command`` (the image's
    ENTRYPOINT, made local)."""
    tpl = kc.pod_template(workload)
    assert tpl is not None
    spec = tpl["spec"]
    pod_root = root / pod
    pod_root.mkdir(parents=True, exist_ok=True)
    secrets, maps = secret_data(objs), subs.configmaps(objs)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for claim in workload.get("spec", {}).get("volumeClaimTemplates", []):
        volumes.setdefault(claim["metadata"]["name"], {"name": claim["metadata"]["name"],
                                                       "emptyDir": {}})
    shared = shared if shared is not None else {}
    paths = dict(subs.paths)
    files: list[Path] = []
    for m in c.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            local = shared.setdefault(claim, root / "claims" / claim)
        else:
            local = pod_root / "volumes" / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        source = None
        if "configMap" in vol:
            source, data = vol["configMap"], maps.get(vol["configMap"]["name"])
        elif "secret" in vol:
            source, data = vol["secret"], secrets.get(vol["secret"]["secretName"])
        if source is not None:
            assert data is not None, f"{pod}: volume {m['name']} refers to an object not rendered"
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                f = local / it["path"]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(data[it["key"]])
                f.chmod(it.get("mode", source.get("defaultMode", 0o644)))
                if "configMap" in vol:
                    files.append(f)
        paths[m["mountPath"]] = str(local / m["subPath"]) if m.get("subPath") else str(local)
    # the image's own paths (read-only root filesystem: nothing is written there but $HOME's
    # mounts; a folder per pod keeps them apart)
    paths.setdefault("/home/wisp", str(pod_root / "home"))
    paths.setdefault("/opt/venv", sys.prefix)
    Path(paths["/home/wisp"]).mkdir(parents=True, exist_ok=True)
    local_subs = Substitutions(paths=paths, config=subs.config, ports=subs.ports,
                               commands=subs.commands, env=subs.env)
    for f in files:  # a config file names container paths too (redis.conf's `dir /data`)
        mode = f.stat().st_mode
        f.chmod(0o644)
        f.write_text(local_subs.path(f.read_text()))
        f.chmod(mode)
    image = {k: local_subs.path(v) for k, v in (base_env or image_env()).items()}
    if "$PATH" in image.get("PATH", ""):
        image["PATH"] = image["PATH"].replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
    env = pod_env(objs, spec, c, pod, node, local_subs, image)
    ports: dict[str, int] = {}
    for p in c.get("ports", []):
        local = subs.ports.get(int(p["containerPort"])) or free_port()
        ports[str(p["containerPort"])] = local
        if "name" in p:
            ports[p["name"]] = local
        for k, v in list(env.items()):
            if k.endswith("_PORT") and v == str(p["containerPort"]):
                env[k] = str(local)
    for k, v in subs.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    args = [expand(local_subs.path(a), env) for a in c.get("args", [])]
    if "command" in c:
        cmd = [expand(local_subs.path(a), env) for a in c["command"]]
    else:
        cmd = list(argv0 or entrypoint())
    exe = shutil.which(cmd[0], path=env.get("PATH"))
    assert exe is not None, f"{pod}/{c['name']}: {cmd[0]!r} is not on the container's PATH " \
                            f"({env.get('PATH')})"
    return LocalContainer(pod=pod, workload=workload, container=c, argv=[exe, *cmd[1:], *args],
                          env=env, ports=ports, cwd=Path(paths["/home/wisp"]),
                          log=pod_root / f"{c['name']}.log", subs=local_subs)
