"""Image retargeting from a user's overlay, GPU placement options, components/monitoring and
Redis's memory headroom (deploy/k8s, docs/deploy.md "Images", "GPU cluster with edge nodes",
"Metrics", "Redis: sizing and high availability").
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy import k8s_checks as kc
from tests.deploy.test_k8s import ALL, CUDA_REPO, IMAGE_REPO, K8S, REDIS_EXPORTER_PORT, REPO, docs

pytestmark = pytest.mark.skipif(kc.kubectl() is None, reason=kc.KUBECTL_HINT)

DOCS = REPO / "docs" / "deploy.md"


# ------------------------------------------------------------------------------ images
def _documented_images_stanza() -> list[dict]:
    """The `images:` entries docs/deploy.md tells a user's overlay to carry (the yaml block of
    "Images" that retargets both flavours)."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)
    found = [yaml.safe_load(b) for b in blocks if "registry.example.com/wisp-cuda" in b]
    found = [b for b in found if isinstance(b, dict) and set(b) == {"images"}]
    assert len(found) == 1, "docs/deploy.md: expected one block holding only the images stanza"
    return found[0]["images"]


def _user_overlay(tmp_path: Path, flavour: str, images: list[dict], components: list[str] = ()) -> Path:
    """An overlay in a folder outside deploy/k8s, on top of a shipped overlay (relative paths, as
    a user's repository next to a checkout would have them)."""
    root = tmp_path / f"my-cluster-{flavour}"
    root.mkdir()
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    root.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [rel(K8S / "overlays" / flavour)],
        **({"components": [rel(K8S / "components" / c) for c in components]} if components else {}),
        "images": images,
    }))
    assert not root.resolve().is_relative_to(K8S.resolve())
    return root


@pytest.mark.parametrize(("flavour", "components"), [("cpu", []), ("gpu", []), ("cpu", ["acl-users"])])
def test_a_users_overlay_retargets_each_flavour_with_the_documented_stanza(
    tmp_path: Path, flavour: str, components: list[str]
) -> None:
    stanza = _documented_images_stanza()
    new = {e["name"]: f"{e['newName']}:{e['newTag']}" for e in stanza}
    cpu_new, cuda_new = new[IMAGE_REPO], new[CUDA_REPO]
    assert cpu_new.rpartition(":")[0] != cuda_new.rpartition(":")[0], "flavours apart"
    shipped = kc.render(K8S / "overlays" / flavour)
    ours = kc.render(_user_overlay(tmp_path, flavour, stanza, components))
    shipped_images = {(w["kind"], kc.name(w), c["name"]): c["image"]
                      for w, t in kc.workloads(shipped) for c in kc.all_containers(t["spec"])}
    seen = {"cpu": 0, "cuda": 0}
    for w, tpl in kc.workloads(ours):
        spec = tpl["spec"]
        for c in kc.all_containers(spec):
            key = (w["kind"], kc.name(w), c["name"])
            if kc.component(w) is None:  # Redis (and its sidecars): not ours to retarget
                assert c["image"] == shipped_images[key]
                continue
            cuda = flavour == "gpu" and kc.component(w) == "verifier"
            want = cuda_new if cuda else cpu_new
            assert c["image"] == want, (key, c["image"])
            if key in shipped_images:  # the same container shipped with the same flavour
                assert shipped_images[key].startswith((CUDA_REPO if cuda else IMAGE_REPO) + ":")
            seen["cuda" if cuda else "cpu"] += 1
    # init containers count: models-init everywhere, load-functions with acl-users
    assert seen["cpu"] >= 5 and (seen["cuda"] == 2) == (flavour == "gpu"), seen


def test_retargeting_the_cpu_image_leaves_the_cuda_image_alone(tmp_path: Path) -> None:
    """What used to go wrong: both flavours in one repository, so an entry for the CPU image
    moved the GPU verifier too (or, by the logical name, nothing at all)."""
    d = kc.render(_user_overlay(tmp_path, "gpu", [{"name": IMAGE_REPO, "newName": "r.example/wisp",
                                                  "newTag": "9"}]))
    verifier = kc.wisp_workload(d, "verifier")
    for c in kc.all_containers(kc.pod_template(verifier)["spec"]):
        assert c["image"].startswith(CUDA_REPO + ":"), c["image"]
    assert kc.container(kc.wisp_workload(d, "scheduler"), "scheduler")["image"] == "r.example/wisp:9"


# ------------------------------------------------------------------------------ GPU placement
def _verifier_spec(d: list[dict]) -> dict:
    return kc.pod_template(kc.wisp_workload(d, "verifier"))["spec"]


def test_gpu_overlay_places_the_verifier_by_resource_and_taint_only() -> None:
    """Stock managed GPU node pools: the device plugin's resource and the nvidia.com/gpu taint,
    no label that only NVIDIA's feature discovery sets, no runtime class."""
    spec = _verifier_spec(docs("gpu"))
    [c] = [x for x in spec["containers"] if x["name"] == "verifier"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "nvidia.com" not in json.dumps(spec.get("nodeSelector", {}))
    assert "nvidia.com" not in json.dumps(spec.get("affinity", {}))
    assert "runtimeClassName" not in spec


def test_gpu_components_add_the_feature_discovery_label_and_the_runtime_class() -> None:
    d = docs("gpu-extras")
    spec = _verifier_spec(d)
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    for w, tpl in kc.workloads(d):  # the verifier only
        if kc.component(w) != "verifier":
            assert "runtimeClassName" not in tpl["spec"] and "nodeSelector" not in tpl["spec"], kc.name(w)


# ------------------------------------------------------------------------------ monitoring
EXTERNAL_METRICS = {"up", "redis_up", "redis_memory_used_bytes", "redis_memory_max_bytes"}
"""Names from Prometheus itself (`up`) and from the redis_exporter sidecar."""


def exported_metric_names() -> set[str]:
    """Every sample name the services expose: the families of libs/wisp/telemetry.py with the
    suffixes prometheus_client gives them (counters _total, histograms _bucket/_sum/_count)."""
    from prometheus_client.metrics import MetricWrapperBase
    from wisp import telemetry

    names = set()
    for obj in vars(telemetry).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        for fam in obj.describe():
            suffixes = {"counter": ["_total", "_created"],
                        "histogram": ["_bucket", "_sum", "_count", "_created"],
                        "gauge": [""], "summary": ["", "_sum", "_count"]}[fam.type]
            names |= {fam.name + s for s in suffixes}
    return names


def _monitoring(d: list[dict]) -> tuple[dict, dict, dict]:
    [pm] = kc.of_kind(d, "PodMonitor")
    [rule] = kc.of_kind(d, "PrometheusRule")
    [cm] = [c for c in kc.of_kind(d, "ConfigMap") if c["metadata"].get("labels", {}).get("grafana_dashboard")]
    return pm, rule, cm


def _exprs(rule: dict, cm: dict) -> dict[str, str]:
    out = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for key, text in cm["data"].items():
        for panel in json.loads(text)["panels"]:
            for t in panel["targets"]:
                out[f"{key}: {panel['title']} {t['refId']}"] = t["expr"]
    return out


def _unknown_metrics(exprs: dict[str, str]) -> list[str]:
    known = exported_metric_names() | EXTERNAL_METRICS
    return [f"{where}: {m}" for where, e in exprs.items() for m in sorted(kc.metric_names(e) - known)]


@pytest.mark.parametrize("key", ALL)
def test_monitoring_objects_pass_their_field_checks(key: str) -> None:
    assert kc.monitoring_problems(docs(key)) == []


def test_exported_metric_names_follow_telemetry() -> None:
    names = exported_metric_names()
    assert {"wisp_stream_lag", "wisp_dead_letters_total", "wisp_ttft_seconds_bucket"} <= names
    assert "wisp_dead_letters" not in names  # a counter is only exposed with _total


def test_alerts_and_dashboard_read_only_exported_metrics() -> None:
    pm, rule, cm = _monitoring(docs("gpu-extras"))
    exprs = _exprs(rule, cm)
    assert _unknown_metrics(exprs) == []
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    used = {a: kc.metric_names(r["expr"]) for a, r in alerts.items()}
    # the alerts the brief names: lag, pending, dead letters, SLO attainment, verifier down
    for metric in ("wisp_stream_lag", "wisp_stream_pending_oldest_seconds", "wisp_dead_letters_total",
                   "wisp_slo_attained_total", "wisp_requests_finished_total"):
        assert any(metric in u for u in used.values()), metric
    assert 'up{component="verifier"}' in alerts["WispVerifierDown"]["expr"]
    assert alerts["WispVerifierDown"]["labels"]["severity"] == "critical"
    # every panel of the dashboard reads something; every exported family shows up in it
    dashboard = json.loads(cm["data"]["wisp.json"])
    assert dashboard["uid"] and all(p["targets"] for p in dashboard["panels"])
    panel_metrics = set().union(*(kc.metric_names(e) for w, e in exprs.items() if ": " in w))
    families = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in panel_metrics}
    from wisp import telemetry
    source = Path(telemetry.__file__).read_text()
    declared = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(wisp_\w+)"', source))
    assert declared <= families, declared - families
    # the check bites: a misspelt family or a counter without _total is reported
    for bad in ("wisp_dead_letter_total", "wisp_dead_letters"):
        broken = {**exprs, "x": f"sum(rate({bad}[5m]))"}
        assert _unknown_metrics(broken) == [f"x: {bad}"]


def test_podmonitor_scrapes_every_wisp_pod_and_the_redis_exporter() -> None:
    d = docs("gpu-extras")
    pm, _, cm = _monitoring(d)
    [ep] = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"
    selected = [w for w, t in kc.workloads(d)
                if kc.label_selector_matches(pm["spec"]["selector"], t["metadata"]["labels"])]
    comps = {kc.component(w) for w, _ in kc.workloads(d)} - {None}
    assert comps <= {kc.component(w) for w in selected}
    [sts] = kc.of_kind(d, "StatefulSet")
    assert sts in selected
    redis, exporter = kc.pod_template(sts)["spec"]["containers"]
    assert redis["name"] == "redis", "Redis stays the first container (kubectl exec, probes)"
    assert exporter["name"] == "redis-exporter"
    repo, _, tag = exporter["image"].rpartition(":")
    assert repo.endswith("redis_exporter") and re.fullmatch(r"v\d+\.\d+\.\d+", tag), exporter["image"]
    assert {"name": "metrics", "containerPort": REDIS_EXPORTER_PORT, "protocol": "TCP"} in exporter["ports"]
    assert "secretKeyRef" in kc.env_value(exporter, "REDIS_PASSWORD")["valueFrom"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    # Prometheus reaches the exporter's port, and only that port
    pols = [p for p in kc.of_kind(d, "NetworkPolicy")
            if any(port["port"] == REDIS_EXPORTER_PORT for r in p["spec"]["ingress"] for port in r["ports"])]
    assert [[port["port"] for port in r["ports"]] for p in pols for r in p["spec"]["ingress"]] == [[9121]]


def test_monitoring_follows_a_renaming_overlay(tmp_path: Path) -> None:
    """namePrefix and another namespace: the PodMonitor still selects the pods (by label, in its
    own namespace), the exporter's NetworkPolicy still selects Redis, nothing dangles."""
    root = tmp_path / "renamed"
    root.mkdir()
    root.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namePrefix": "acme-",
        "namespace": "wisp-test",
        "resources": [os.path.relpath(K8S / "overlays" / "cpu", root)],
        "components": [os.path.relpath(K8S / "components" / "monitoring", root)],
    }))
    d = kc.render(root)
    assert kc.monitoring_problems(d) == []
    assert kc.security_problems(d) == []
    pm, rule, cm = _monitoring(d)
    assert {kc.ns(pm), kc.ns(rule), kc.ns(cm)} == {"wisp-test"}
    [sts] = kc.of_kind(d, "StatefulSet")
    [pol] = [p for p in kc.of_kind(d, "NetworkPolicy") if kc.name(p) == "acme-wisp-redis-exporter"]
    assert kc.label_selector_matches(pol["spec"]["podSelector"], kc.pod_template(sts)["metadata"]["labels"])
    problems = [p for p in kc.dangling_references(d) if "REDIS_HOST" not in p]  # no replacements here
    assert problems == []


def test_monitoring_checks_bite() -> None:
    good = docs("gpu-extras")

    def problems(mutate) -> str:
        d = copy.deepcopy(good)
        mutate(d)
        return "\n".join(kc.monitoring_problems(d))

    pm = lambda d: kc.of_kind(d, "PodMonitor")[0]  # noqa: E731
    rule = lambda d: kc.of_kind(d, "PrometheusRule")[0]["spec"]["groups"][0]["rules"][0]  # noqa: E731
    ep = lambda d: pm(d)["spec"]["podMetricsEndpoints"][0]  # noqa: E731
    assert "no port 'metricz'" in problems(lambda d: ep(d).update(port="metricz"))
    assert "matches no pod" in problems(lambda d: pm(d)["spec"]["selector"]["matchLabels"].update(x="y"))
    assert "unknown fields" in problems(lambda d: ep(d).update(intervall="1m"))
    assert "no selected pod has a label" in problems(
        lambda d: pm(d)["spec"]["podMetricsEndpoints"][0]["relabelings"][0].update(
            sourceLabels=["__meta_kubernetes_pod_label_app_kubernetes_io_role"]))
    assert "unbalanced" in problems(lambda d: rule(d).update(expr="sum(rate(wisp_stream_lag[5m])"))
    assert "not a duration" in problems(lambda d: rule(d).update({"for": "10 minutes"}))
    assert "severity" in problems(lambda d: rule(d)["labels"].pop("severity"))
    # a sidecar without the port the PodMonitor scrapes on a selected pod
    def drop_exporter_port(d: list[dict]) -> None:
        [sts] = kc.of_kind(d, "StatefulSet")
        kc.pod_template(sts)["spec"]["containers"][1]["ports"] = []
    assert "no port 'metrics'" in problems(drop_exporter_port)


# ------------------------------------------------------------------------------ Redis memory
_UNITS = {"k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3, "": 1}
_K8S_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1000, "M": 1000**2, "G": 1000**3, "": 1}


def redis_bytes(value: str) -> int:
    """A redis.conf memory size (`768mb`, `1gb`, `100000`)."""
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", value.strip())
    assert m, value
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def k8s_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([a-zA-Z]*)", str(value))
    assert m, value
    return int(m.group(1)) * _K8S_UNITS[m.group(2)]


def test_size_parsers() -> None:
    assert redis_bytes("768mb") == 768 * 2**20 and redis_bytes("1g") == 10**9
    assert k8s_bytes("2Gi") == 2 * 2**30 and k8s_bytes("512M") == 512 * 10**6


@pytest.mark.parametrize("key", ALL)
def test_redis_maxmemory_leaves_room_for_a_fork(key: str) -> None:
    """An AOF rewrite / save forks Redis; under writes its copy-on-write pages grow towards a
    second copy of the data. maxmemory must leave that room inside the container's limit."""
    d = docs(key)
    [sts] = kc.of_kind(d, "StatefulSet")
    spec = kc.pod_template(sts)["spec"]
    redis = spec["containers"][0]
    conf_vol = next(v for v in spec["volumes"] if v["name"] == "config")
    conf = kc.find(d, "ConfigMap", conf_vol["configMap"]["name"], kc.ns(sts))["data"]["redis.conf"]
    settings = dict(line.split(None, 1) for line in conf.splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    assert settings["maxmemory-policy"].strip() == "noeviction"
    assert settings["appendonly"].strip() == "yes"
    maxmemory = redis_bytes(settings["maxmemory"])
    limit = k8s_bytes(redis["resources"]["limits"]["memory"])
    assert 0 < maxmemory <= 0.6 * limit, (settings["maxmemory"], redis["resources"]["limits"]["memory"])


def test_docs_say_how_to_run_a_highly_available_redis() -> None:
    text = DOCS.read_text()
    section = text.split("## Redis: sizing and high availability", 1)[1].split("\n## ", 1)[0]
    for needle in ("Sentinel", "managed Redis", "Redis >= 7", "noeviction", "AOF", "WISP_REDIS_URL",
                   "Redis over TLS", "ACL", "functions", "fork"):
        assert needle in section, needle
    assert "components/gpu-node-feature-discovery" in text and "components/gpu-runtime-class" in text
    assert "components/monitoring" in text
    for comp in ("gpu-node-feature-discovery", "gpu-runtime-class", "monitoring"):
        assert (K8S / "components" / comp / "kustomization.yaml").is_file()
