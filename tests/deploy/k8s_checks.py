"""Checks over a rendered kustomization (a list of Kubernetes objects as dicts).

Each check returns a list of problems (human-readable strings); an empty list means the render
passes. The tests in ``test_k8s.py`` run them on every flavour and also feed them deliberately
broken renders, so a check that silently stopped looking would be noticed.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUBECTL_HINT = (
    "install kubectl >= 1.27 (its built-in `kubectl kustomize` renders the manifests offline), "
    "e.g. from https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl or the Kubernetes apt "
    "repository (pkgs.k8s.io); Debian 12's `kubernetes-client` is kubectl 1.20, which cannot "
    "render these kustomizations"
)
MIN_KUBECTL = (1, 27)

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
    "ClusterTriggerAuthentication",
}
# CRDs kubernetes-validate has no schema for; checked field by field instead.
CRD_GROUPS = {"keda.sh", "monitoring.coreos.com"}
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


# ------------------------------------------------------------------------------ rendering
def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def kubectl_version(exe: str) -> tuple[int, int]:
    """(major, minor) of the kubectl client."""
    done = subprocess.run([exe, "version", "--client", "-o", "json"], capture_output=True, text=True,
                          timeout=60, check=False)
    try:
        info = json.loads(done.stdout)["clientVersion"]
        return int(info["major"]), int(re.sub(r"\D.*", "", info["minor"]))
    except (ValueError, KeyError, TypeError):
        return (0, 0)


def render(path: Path) -> list[Obj]:
    """``kubectl kustomize path`` as a list of objects (fails, never skips, without a kubectl
    that can render them)."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError(f"kubectl not found: {KUBECTL_HINT}")
    if kubectl_version(exe) < MIN_KUBECTL:
        raise RuntimeError(f"kubectl {'.'.join(map(str, kubectl_version(exe)))} is too old: {KUBECTL_HINT}")
    done = subprocess.run(
        [exe, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# ------------------------------------------------------------------------------ accessors
def group_of(obj: Obj) -> str:
    api = obj.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def is_crd_object(obj: Obj) -> bool:
    return group_of(obj) in CRD_GROUPS


def name(obj: Obj) -> str:
    return obj["metadata"]["name"]


def ns(obj: Obj) -> str | None:
    return obj.get("metadata", {}).get("namespace")


def find(docs: list[Obj], kind: str, obj_name: str, namespace: str | None = None) -> Obj | None:
    for d in docs:
        if (
            d.get("kind") == kind
            and name(d) == obj_name
            and (namespace is None or kind in CLUSTER_SCOPED or ns(d) == namespace)
        ):
            return d
    return None


def of_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d.get("kind") == kind]


def pod_template(obj: Obj) -> Obj | None:
    if obj.get("kind") in WORKLOAD_KINDS:
        return obj["spec"]["template"]
    if obj.get("kind") == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    if obj.get("kind") == "Pod":
        return obj
    return None


def workloads(docs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) pairs."""
    for d in docs:
        tpl = pod_template(d)
        if tpl is not None:
            yield d, tpl


def all_containers(pod_spec: Obj) -> list[Obj]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def component(obj: Obj) -> str | None:
    """app.kubernetes.io/component of a WISP workload (name=wisp), else None."""
    labels = obj.get("metadata", {}).get("labels", {})
    if labels.get("app.kubernetes.io/name") != "wisp":
        return None
    return labels.get("app.kubernetes.io/component")


def wisp_workload(docs: list[Obj], comp: str) -> Obj:
    found = [w for w, _ in workloads(docs) if component(w) == comp]
    assert len(found) == 1, f"expected one WISP workload with component={comp}, got {len(found)}"
    return found[0]


def container(workload: Obj, cname: str, init: bool = False) -> Obj:
    spec = pod_template(workload)["spec"]
    for c in spec.get("initContainers" if init else "containers", []):
        if c["name"] == cname:
            return c
    raise AssertionError(f"{workload['kind']}/{name(workload)} has no container {cname!r}")


def env_value(c: Obj, var: str) -> Obj | None:
    for e in c.get("env", []):
        if e["name"] == var:
            return e
    return None


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def label_selector_matches(sel: Obj, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics (matchLabels + matchExpressions)."""
    if not selector_matches(sel.get("matchLabels", {}), labels):
        return False
    for expr in sel.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pods_in(docs: list[Obj], namespace: str | None) -> list[tuple[Obj, Obj]]:
    return [(w, t) for w, t in workloads(docs) if ns(w) == namespace]


def config_keys(docs: list[Obj], kind: str, obj_name: str, namespace: str | None) -> set[str] | None:
    obj = find(docs, kind, obj_name, namespace)
    if obj is None:
        return None
    return set(obj.get("data", {})) | set(obj.get("stringData", {})) | set(obj.get("binaryData", {}))


def container_env_names(docs: list[Obj], c: Obj, namespace: str | None) -> tuple[set[str], list[str]]:
    """(names from envFrom, names of env in order) as the kubelet would see them."""
    from_env: set[str] = set()
    for src in c.get("envFrom", []):
        prefix = src.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in src:
                keys = config_keys(docs, kind, src[key]["name"], namespace) or set()
                from_env |= {prefix + k for k in keys}
    return from_env, [e["name"] for e in c.get("env", [])]


# ------------------------------------------------------------------------------ checks
def dangling_references(docs: list[Obj]) -> list[str]:
    """Every name one object uses to point at another resolves inside the same render."""
    problems: list[str] = []
    namespaces = {name(d) for d in of_kind(docs, "Namespace")}

    def need(kind: str, ref: str | None, namespace: str | None, where: str) -> Obj | None:
        obj = find(docs, kind, ref or "", namespace) if ref else None
        if obj is None:
            problems.append(f"{where}: {kind} {ref!r} not in the render (namespace {namespace})")
        return obj

    def need_key(kind: str, ref: str, key: str, namespace: str | None, where: str) -> None:
        if need(kind, ref, namespace, where) is not None:
            if key not in (config_keys(docs, kind, ref, namespace) or set()):
                problems.append(f"{where}: {kind} {ref!r} has no key {key!r}")

    for d in docs:
        if d.get("kind") not in CLUSTER_SCOPED:
            if ns(d) is None:
                problems.append(f"{d['kind']}/{name(d)} has no namespace (would land in default)")
            elif ns(d) not in namespaces:
                problems.append(f"{d['kind']}/{name(d)}: namespace {ns(d)!r} is not in the render")

    # --- pods: service accounts, volumes, env, $(VAR), ports
    for w, tpl in workloads(docs):
        where0 = f"{w['kind']}/{name(w)}"
        n = ns(w)
        spec = tpl["spec"]
        if "serviceAccountName" in spec:
            need("ServiceAccount", spec["serviceAccountName"], n, f"{where0} serviceAccountName")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in w.get("spec", {}).get("volumeClaimTemplates", [])}
        for v in volumes.values():
            where = f"{where0} volume {v['name']}"
            if "configMap" in v and not v["configMap"].get("optional"):
                need("ConfigMap", v["configMap"]["name"], n, where)
            if "secret" in v and not v["secret"].get("optional"):
                need("Secret", v["secret"]["secretName"], n, where)
            if "persistentVolumeClaim" in v:
                need(
                    "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"], n, f"{where} claimName"
                )
            for src in v.get("projected", {}).get("sources", []):
                if "configMap" in src and not src["configMap"].get("optional"):
                    need("ConfigMap", src["configMap"]["name"], n, where)
                if "secret" in src and not src["secret"].get("optional"):
                    need("Secret", src["secret"]["name"], n, where)
        container_names = {c["name"] for c in all_containers(spec)}
        for c in all_containers(spec):
            where = f"{where0} container {c['name']}"
            for src in c.get("envFrom", []):
                if "configMapRef" in src and not src["configMapRef"].get("optional"):
                    need("ConfigMap", src["configMapRef"]["name"], n, f"{where} envFrom")
                if "secretRef" in src and not src["secretRef"].get("optional"):
                    need("Secret", src["secretRef"]["name"], n, f"{where} envFrom")
            for e in c.get("env", []):
                vf = e.get("valueFrom", {})
                if "configMapKeyRef" in vf and not vf["configMapKeyRef"].get("optional"):
                    ref = vf["configMapKeyRef"]
                    need_key("ConfigMap", ref["name"], ref["key"], n, f"{where} env {e['name']}")
                if "secretKeyRef" in vf and not vf["secretKeyRef"].get("optional"):
                    ref = vf["secretKeyRef"]
                    need_key("Secret", ref["name"], ref["key"], n, f"{where} env {e['name']}")
                if "resourceFieldRef" in vf:
                    target = vf["resourceFieldRef"].get("containerName", c["name"])
                    if target not in container_names:
                        problems.append(f"{where} env {e['name']}: no container {target!r}")
            # $(VAR): env values may use envFrom and *earlier* env entries; args/command any.
            from_env, env_names = container_env_names(docs, c, n)
            known = set(from_env)
            for e in c.get("env", []):
                for ref in VAR_REF.findall(e.get("value", "")):
                    if ref not in known:
                        problems.append(f"{where} env {e['name']}: $({ref}) is not defined before it")
                known.add(e["name"])
            for arg in list(c.get("command", [])) + list(c.get("args", [])):
                for ref in VAR_REF.findall(arg):
                    if ref not in from_env | set(env_names):
                        problems.append(f"{where} args: $({ref}) is not in the container's env")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_templates:
                    problems.append(f"{where}: volumeMount {m['name']!r} has no volume")
            port_names = {p.get("name") for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in port_names:
                    problems.append(f"{where} {probe}: no container port named {port!r}")

    # --- StatefulSet governing Service
    for s in of_kind(docs, "StatefulSet"):
        svc = need("Service", s["spec"].get("serviceName"), ns(s), f"StatefulSet/{name(s)} serviceName")
        if svc is not None and svc["spec"].get("clusterIP") != "None":
            problems.append(f"StatefulSet/{name(s)}: serviceName {name(svc)} is not headless")

    # --- Services select pods and name their ports
    for svc in of_kind(docs, "Service"):
        sel = svc["spec"].get("selector")
        if not sel:
            continue
        matched = [
            t for _, t in pods_in(docs, ns(svc)) if selector_matches(sel, t["metadata"].get("labels", {}))
        ]
        if not matched:
            problems.append(f"Service/{name(svc)}: selector {sel} matches no pod template")
            continue
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            ok = any(
                (cp.get("name") == target if isinstance(target, str) else cp["containerPort"] == target)
                for t in matched
                for c in t["spec"]["containers"]
                for cp in c.get("ports", [])
            )
            if not ok:
                problems.append(
                    f"Service/{name(svc)} port {p['port']}: targetPort {target!r} "
                    "is not a port of the selected pods"
                )

    # --- Ingress backends: a Service of the render, and one of its ports
    for ing in of_kind(docs, "Ingress"):
        backends = [ing["spec"]["defaultBackend"]] if "defaultBackend" in ing["spec"] else []
        backends += [
            path["backend"]
            for rule in ing["spec"].get("rules", [])
            for path in rule.get("http", {}).get("paths", [])
        ]
        for b in backends:
            if "service" not in b:
                continue
            where = f"Ingress/{name(ing)} backend"
            svc = need("Service", b["service"]["name"], ns(ing), where)
            port = b["service"].get("port", {})
            if svc is not None and not any(
                p.get("name") == port.get("name") if "name" in port else p["port"] == port.get("number")
                for p in svc["spec"].get("ports", [])
            ):
                problems.append(f"{where}: Service {name(svc)} has no port {port}")

    # --- selectors of PDBs and NetworkPolicies
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        if not any(
            label_selector_matches(pdb["spec"]["selector"], t["metadata"].get("labels", {}))
            for _, t in pods_in(docs, ns(pdb))
        ):
            problems.append(f"PodDisruptionBudget/{name(pdb)}: selector matches no pod template")
    for pol in of_kind(docs, "NetworkPolicy"):
        if not any(
            label_selector_matches(pol["spec"]["podSelector"], t["metadata"].get("labels", {}))
            for _, t in pods_in(docs, ns(pol))
        ):
            problems.append(f"NetworkPolicy/{name(pol)}: podSelector matches no pod template")

    # --- HPA targets
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        need(ref["kind"], ref["name"], ns(hpa), f"HorizontalPodAutoscaler/{name(hpa)} scaleTargetRef")

    # --- KEDA (CRDs: kustomize only follows these names with components/keda's configuration)
    for so in of_kind(docs, "ScaledObject"):
        where = f"ScaledObject/{name(so)}"
        ref = so["spec"]["scaleTargetRef"]
        target = need(ref.get("kind", "Deployment"), ref["name"], ns(so), f"{where} scaleTargetRef")
        target_env: set[str] = set()
        if target is not None:
            spec = pod_template(target)["spec"]
            cname = ref.get("envSourceContainerName", spec["containers"][0]["name"])
            cs = [c for c in spec["containers"] if c["name"] == cname]
            if not cs:
                problems.append(f"{where}: envSourceContainerName {cname!r} is not a container")
            else:
                from_env, env_names = container_env_names(docs, cs[0], ns(target))
                target_env = from_env | set(env_names)
        for i, trig in enumerate(so["spec"].get("triggers", [])):
            auth = trig.get("authenticationRef")
            if auth:
                need(
                    auth.get("kind", "TriggerAuthentication"),
                    auth["name"],
                    ns(so),
                    f"{where} trigger {i} authenticationRef",
                )
            for key, var in trig.get("metadata", {}).items():
                if key.endswith("FromEnv") and target is not None and var not in target_env:
                    problems.append(f"{where} trigger {i}: {key}={var} is not in the target's env")
    for ta in of_kind(docs, "TriggerAuthentication"):
        for ref in ta["spec"].get("secretTargetRef", []):
            need_key("Secret", ref["name"], ref["key"], ns(ta), f"TriggerAuthentication/{name(ta)}")

    # --- the Redis host string in the settings follows the Service (see `replacements:`)
    for cm in of_kind(docs, "ConfigMap"):
        host = cm.get("data", {}).get("REDIS_HOST")
        if host is None:
            continue
        parts = host.split(".")
        where = f"ConfigMap/{name(cm)} REDIS_HOST={host}"
        if len(parts) < 3 or parts[2] != "svc":
            problems.append(f"{where}: expected <service>.<namespace>.svc")
            continue
        svc = need("Service", parts[0], parts[1], where)
        port = cm["data"].get("REDIS_PORT")
        if svc is not None and not any(str(p["port"]) == str(port) for p in svc["spec"]["ports"]):
            problems.append(f"{where}: Service {parts[0]} does not expose REDIS_PORT={port}")
    return problems


def security_problems(docs: list[Obj]) -> list[str]:
    """Restricted Pod Security Standard plus our own rules (no SA token, read-only root)."""
    problems: list[str] = []
    for sa in of_kind(docs, "ServiceAccount"):
        if sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount/{name(sa)}: automountServiceAccountToken is not false")
    for w, tpl in workloads(docs):
        spec = tpl["spec"]
        where0 = f"{w['kind']}/{name(w)}"
        psc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where0}: automountServiceAccountToken is not false")
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{where0}: enableServiceLinks is not false (injects *_PORT variables)")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{where0}: {flag}")
        for v in spec.get("volumes", []):
            if "hostPath" in v:
                problems.append(f"{where0}: hostPath volume {v['name']}")
        if psc.get("runAsUser") == 0:
            problems.append(f"{where0}: pod runAsUser 0")
        for c in all_containers(spec):
            where = f"{where0} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if sc.get("runAsUser", psc.get("runAsUser")) in (0, None):
                problems.append(f"{where}: no non-zero runAsUser (the image's USER is not checked)")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            caps = sc.get("capabilities", {})
            if "ALL" not in caps.get("drop", []):
                problems.append(f"{where}: capabilities.drop lacks ALL")
            if caps.get("add"):
                problems.append(f"{where}: adds capabilities {caps['add']}")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile is {seccomp!r}, not RuntimeDefault")
    return problems


# ------------------------------------------------------------------------------ monitoring CRDs
# Fields of the Prometheus operator's objects (monitoring.coreos.com/v1) the manifests may use;
# anything else is reported (a typo there is silently ignored by nothing: the API server would
# reject it, or worse, a renamed field would drop the setting).
PODMONITOR_SPEC = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels",
                   "sampleLimit", "targetLimit"}
POD_ENDPOINT = {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                "honorTimestamps", "relabelings", "metricRelabelings", "params", "enableHttp2",
                "followRedirects", "filterRunning"}
RELABEL = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}
RULE_GROUP = {"name", "interval", "rules", "limit", "partial_response_strategy"}
RULE = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
SEVERITIES = {"critical", "warning", "info"}


def prom_label(name: str) -> str:
    """A Kubernetes label name as Prometheus's service discovery spells it."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def balanced(expr: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    quote = None
    for ch in expr:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and quote is None


def monitoring_problems(docs: list[Obj]) -> list[str]:
    """PodMonitors select pods of the render on a named port of theirs, and relabel from labels
    those pods carry; PrometheusRules are well formed (one of alert/record, an expression with
    balanced brackets, durations, a severity and a summary per alert); field names known."""
    problems: list[str] = []
    for pm in of_kind(docs, "PodMonitor"):
        where = f"PodMonitor/{name(pm)}"
        spec = pm.get("spec", {})
        if set(spec) - PODMONITOR_SPEC:
            problems.append(f"{where}: unknown spec fields {sorted(set(spec) - PODMONITOR_SPEC)}")
        if "namespaceSelector" in spec:
            problems.append(f"{where}: namespaceSelector set (it would not follow a namespace overlay)")
        matched = [t for _, t in pods_in(docs, ns(pm))
                   if label_selector_matches(spec.get("selector", {}), t["metadata"].get("labels", {}))]
        if not spec.get("selector") or not matched:
            problems.append(f"{where}: selector matches no pod template")
        if not spec.get("podMetricsEndpoints"):
            problems.append(f"{where}: no podMetricsEndpoints")
        for i, ep in enumerate(spec.get("podMetricsEndpoints", [])):
            w = f"{where} endpoint {i}"
            if set(ep) - POD_ENDPOINT:
                problems.append(f"{w}: unknown fields {sorted(set(ep) - POD_ENDPOINT)}")
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not DURATION.match(str(ep[key])):
                    problems.append(f"{w}: {key} {ep[key]!r} is not a duration")
            port = ep.get("port")
            if not isinstance(port, str):
                problems.append(f"{w}: port must name a container port")
            else:
                for t in matched:
                    ports = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                    if port not in ports:
                        labels = t["metadata"]["labels"]
                        problems.append(f"{w}: a selected pod ({labels}) has no port {port!r}")
            for r in ep.get("relabelings", []) + ep.get("metricRelabelings", []):
                if set(r) - RELABEL:
                    problems.append(f"{w}: unknown relabeling fields {sorted(set(r) - RELABEL)}")
                for src in r.get("sourceLabels", []):
                    label = src.removeprefix("__meta_kubernetes_pod_label_")
                    if label != src and not any(
                        label in {prom_label(k) for k in t["metadata"].get("labels", {})} for t in matched
                    ):
                        problems.append(f"{w}: no selected pod has a label for {src}")
    for pr in of_kind(docs, "PrometheusRule"):
        where = f"PrometheusRule/{name(pr)}"
        groups = pr.get("spec", {}).get("groups", [])
        if set(pr.get("spec", {})) - {"groups"}:
            problems.append(f"{where}: unknown spec fields")
        if not groups or len({g.get("name") for g in groups}) != len(groups):
            problems.append(f"{where}: no groups, or group names not unique")
        for g in groups:
            if set(g) - RULE_GROUP or not g.get("name") or not g.get("rules"):
                problems.append(f"{where} group {g.get('name')}: bad group {sorted(g)}")
            for r in g.get("rules", []):
                rid = r.get("alert") or r.get("record")
                w = f"{where} rule {rid}"
                if set(r) - RULE:
                    problems.append(f"{w}: unknown fields {sorted(set(r) - RULE)}")
                if ("alert" in r) == ("record" in r):
                    problems.append(f"{w}: exactly one of alert/record")
                expr = r.get("expr")
                if not isinstance(expr, str) or not expr.strip() or not balanced(expr):
                    problems.append(f"{w}: expr missing or unbalanced brackets: {expr!r}")
                for key in ("for", "keep_firing_for"):
                    if key in r and not DURATION.match(str(r[key])):
                        problems.append(f"{w}: {key} {r[key]!r} is not a duration")
                if "alert" in r:
                    if r.get("labels", {}).get("severity") not in SEVERITIES:
                        problems.append(f"{w}: severity not one of {sorted(SEVERITIES)}")
                    if not r.get("annotations", {}).get("summary"):
                        problems.append(f"{w}: no summary annotation")
    return problems


PROMQL_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "offset", "bool", "rate", "irate", "increase", "delta",
    "deriv", "histogram_quantile", "absent", "scalar", "vector", "min_over_time", "max_over_time",
    "avg_over_time", "sum_over_time", "count_over_time", "topk", "bottomk", "quantile", "clamp_min",
    "clamp_max", "le", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers that are not functions,
    keywords, or label names/values inside braces or by/on/without lists)."""
    text = re.sub(r"\{[^}]*\}", "{}", expr)            # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)          # ranges and subqueries
    text = re.sub(r"\"[^\"]*\"", "\"\"", text)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        tok = m.group(0)
        after = text[m.end():].lstrip()
        if tok.lower() in PROMQL_KEYWORDS or after.startswith("("):
            continue
        if re.fullmatch(r"\d+(ms|s|m|h|d|w|y)", tok):
            continue
        names.add(tok)
    return names
