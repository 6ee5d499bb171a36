"""FLQ's images (deploy/container/Containerfile) built and run for real with podman, and the
master and worker pods of deploy/k8s played by `podman kube play` (`make test-containers`).

No image registry is reachable here: the base is a Debian root file system from mmdebstrap
(deploy/container/test-base.sh), passed as BASE_IMAGE; pip reaches PyPI from the build. Podman
runs with runc (crun refuses this machine's cgroup layout) and with ulimits below the machine's
hard limits (podman's defaults exceed them), both through a containers.conf of the test's own.

`podman kube play` (Debian 12's podman 4.3) runs Pods, not StatefulSets or DaemonSets, and knows
no Secret objects; what the test changes to play the rendered manifests is listed in
`podman_pods` and in docs/kubernetes.md.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flq.demo import free_port

pytestmark = [pytest.mark.containers, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/flq-test-base:bookworm"
MASTER_IMAGE = "localhost/flq-master:test"
WORKER_IMAGE = "localhost/flq-worker:test"
FLQ_UID = 10001  # the images' user
# The base image and both builds together, from nothing (tensorflow-cpu downloaded and
# installed): ~20 min on a quiet 2-core box. A build still running after this fails with the
# step it was in, well before CI's own 90-minute stop, which would say nothing.
BUILD_BUDGET_S = 2700
# Builds yield to other work on the machine; as nice as that, not nicer (a build at 19 beside
# jobs at raised priority all but stops).
BUILD_NICENESS = 10
# A private CA the build host's pip trusts (a TLS-inspecting proxy): the build's pip trusts it too.
BUILD_CA = "/run/flq-build-ca.crt"


def _containers_conf(directory: Path) -> Path:
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    nproc = min(32768, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    conf = directory / "containers.conf"
    conf.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    return conf


class Podman:
    """podman with this test's containers.conf; every call checked, output kept for errors."""

    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        nice: bool = False,
        what: str = "",
    ) -> subprocess.CompletedProcess[str]:
        """`podman ARGS` (`nice`: at least BUILD_NICENESS); with `check`, a failure or timeout
        fails the test naming `what` (or the podman command) with the tail of podman's output,
        where its error is."""
        command = ["podman", *args]
        if nice and os.nice(0) < BUILD_NICENESS:  # `nice -n 10 make ...` is nice enough
            command = ["nice", "-n", str(BUILD_NICENESS - os.nice(0)), *command]
        step = what or f"podman {' '.join(args[:3])}"
        return run_step(command, self.env, timeout, step, check)

    def logs_tail(self, container: str) -> str:
        """What a container wrote (`podman logs` gives its stdout and stderr as such)."""
        return f"container {container}:" + _tails(self.run("logs", container, check=False))

    def mountpoint(self, volume: str) -> Path:
        out = self.run("volume", "inspect", volume, "--format", "{{.Mountpoint}}").stdout
        return Path(out.strip())

    def exit_code(self, container: str, timeout: float) -> int:
        done = self.run("wait", container, timeout=timeout)
        return int(done.stdout.strip().splitlines()[-1])


def run_step(
    command: list[str], env: dict[str, str], timeout: float, step: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `command`; a timeout (or, with `check`, a failure) fails the test naming `step`,
    with the tail of the command's output, where its error is."""
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{step}: no result after {timeout:.0f} s{_tails(expired)}")
    if check and done.returncode != 0:
        pytest.fail(f"{step}: exited {done.returncode}{_tails(done)}")
    return done


def _tails(done: subprocess.CompletedProcess[str] | subprocess.TimeoutExpired) -> str:
    """The last lines of a command's stdout (a build's steps, pip's complaint) and stderr
    (podman's own error)."""
    parts = []
    for name, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        if isinstance(text, bytes):  # TimeoutExpired keeps what it read as bytes
            text = text.decode(errors="replace")
        if text and text.strip():
            parts.append(f"\n--- {name} (last lines) ---\n{text[-3000:]}")
    return "".join(parts)


def _build_ca_args() -> list[str]:
    for name in ("PIP_CERT", "SSL_CERT_FILE"):
        bundle = os.environ.get(name, "")
        if bundle and Path(bundle).is_file():
            return ["-v", f"{bundle}:{BUILD_CA}:ro", "--build-arg", f"PIP_CERT={BUILD_CA}"]
    return []


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """The base image (once per machine), then the master and worker images of this tree."""
    tool = Podman(_containers_conf(tmp_path_factory.mktemp("podman")))
    deadline = time.monotonic() + BUILD_BUDGET_S
    run_step(
        [str(ROOT / "deploy/container/test-base.sh"), BASE_IMAGE],
        tool.env,
        BUILD_BUDGET_S,
        f"the base image {BASE_IMAGE} (deploy/container/test-base.sh)",
    )
    for target, image in (("master", MASTER_IMAGE), ("worker", WORKER_IMAGE)):
        tool.run(
            "build",
            "--network=host",  # pip reaches PyPI from the build
            "-f",
            str(ROOT / "deploy/container/Containerfile"),
            "--target",
            target,
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            *_build_ca_args(),
            "-t",
            image,
            str(ROOT),
            timeout=max(1.0, deadline - time.monotonic()),
            nice=True,
            what=f"podman build --target {target} ({image}, the build budget {BUILD_BUDGET_S} s)",
        )
    yield tool


@pytest.fixture
def cleanup(podman: Podman) -> Iterator[list[tuple[str, str]]]:
    """(kind, name) of what a test created: containers, pods, volumes; removed afterwards."""
    created: list[tuple[str, str]] = []
    yield created
    for kind, name in reversed(created):
        if kind == "container":
            # --volumes: the anonymous volume the image's VOLUME /var/lib/flq gives a container
            # run without one of ours would otherwise outlive it, one per test run.
            podman.run("rm", "--force", "--volumes", "--time", "0", name, check=False)
        elif kind == "pod":
            podman.run("pod", "rm", "--force", "--time", "0", name, check=False)
        else:
            podman.run("volume", "rm", "--force", name, check=False)


def flq_health(address: str, *tls: str) -> bool:
    """Whether `flq health` says SERVING; one that has not answered in 30 s (a loaded machine)
    says not yet, as a probe's timeout does."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "flq.cli.main", "health", "--master", address, *tls],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(1.0)


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


def rounds_in(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "rounds.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- the images, run by hand

DIGITS_RUN = """
[system]
total_workers = 2
min_workers = 2
max_rounds = 3
master_url = "http://127.0.0.1:{port}"
round_timeout_s = 60.0
seed = 0
[dataset]
name = "digits"
batch_size = 32
[model]
name = "mlp"
lr = 0.05
[flq_algorithm]
mode = "bbit"
b_up = 4
b_down = 8
"""


def test_master_and_two_worker_containers_complete_rounds_into_the_state_volume(
    podman: Podman, cleanup: list[tuple[str, str]], tmp_path: Path
) -> None:
    port, tag = free_port(), uuid.uuid4().hex[:8]
    config = tmp_path / "flq.toml"
    config.write_text(DIGITS_RUN.format(port=port))
    config.chmod(0o644)
    volume, master = f"flq-test-state-{tag}", f"flq-test-master-{tag}"
    podman.run("volume", "create", volume)
    cleanup.append(("volume", volume))
    common = ["run", "--detach", "--network=host", "-v", f"{config}:/etc/flq/flq.toml:ro"]
    podman.run(
        *common,
        "--name",
        master,
        "-v",
        f"{volume}:/var/lib/flq",
        MASTER_IMAGE,
        "--config=/etc/flq/flq.toml",
        "--host=127.0.0.1",
        f"--port={port}",
    )
    cleanup.append(("container", master))
    # the gRPC health service answers once the model is built and the port serves (TensorFlow
    # and the test set first: the manifests' startup probe allows 5 minutes too)
    wait_until(lambda: flq_health(f"127.0.0.1:{port}"), 300, "the master's health service")
    workers = [f"flq-test-worker{i}-{tag}" for i in range(2)]
    for index, name in enumerate(workers):
        podman.run(
            *common,
            "--name",
            name,
            WORKER_IMAGE,
            f"--master=127.0.0.1:{port}",
            f"--worker-id=w{index}",
            "--config=/etc/flq/flq.toml",
        )
        cleanup.append(("container", name))

    assert podman.exit_code(master, timeout=600) == 0, podman.logs_tail(master)
    for name in workers:  # told by the master that the federation is over
        assert podman.exit_code(name, timeout=120) == 0, podman.logs_tail(name)

    run_dir = podman.mountpoint(volume) / "run"
    assert [int(row["round"]) for row in rounds_in(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoint.npz").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["state"] == "finished"
    assert (run_dir / "rounds.csv").stat().st_uid == FLQ_UID  # written by the image's user
    # JSON lines on stdout/stderr, nothing else (`podman logs` merges the two streams)
    logs = podman.run("logs", master)
    events = [entry["event"] for entry in json_lines(logs.stdout + logs.stderr)]
    assert "master listening" in events and "master stopped" in events
    worker_logs = podman.run("logs", workers[0])
    assert json_lines(worker_logs.stdout + worker_logs.stderr)


# ---------------------------------------------------------------- deploy/k8s under kube play


def render_overlay(name: str) -> list[dict[str, Any]]:
    kubectl = Path(sys.executable).parent / "kubectl"
    command = [str(kubectl) if kubectl.exists() else "kubectl", "kustomize"]
    done = subprocess.run(
        [*command, str(ROOT / "deploy/k8s/overlays" / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def secret_directory(directory: Path, files: dict[str, bytes]) -> Path:
    """A Secret as kubelet lays it out for this pod: root-owned files of group fsGroup, 0440."""
    directory.mkdir(mode=0o750)
    os.chown(directory, 0, FLQ_UID)
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        os.chown(path, 0, FLQ_UID)
        path.chmod(0o440)
    return directory


def pod_from(workload: dict[str, Any], name: str) -> dict[str, Any]:
    template = workload["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": name, "namespace": "flq"},
        "spec": json.loads(json.dumps(template["spec"])),  # a deep copy
    }


def podman_pods(
    docs: list[dict[str, Any]], secrets: dict[str, Path], ports: dict[int, int], node: str
) -> tuple[list[dict[str, Any]], str]:
    """The rendered objects as podman 4.3 can play them, changed only where it must be:
    - StatefulSet and DaemonSet become one Pod each (their pod templates as rendered); the
      volume claim template becomes a podman volume made beforehand, owned by the pod's
      fsGroup as kubelet would make it (podman ignores fsGroup);
    - Secret volumes become host directories laid out as kubelet lays out a Secret;
    - host network (without the containers' port lists, which podman refuses there), the ports
      moved to free ones (other tests share this machine's loopback);
      no cluster DNS, and podman ignores hostAliases on the host network: the worker dials the
      master as localhost, a name the master's certificate also carries;
    - the worker's node name (downward API spec.nodeName, which podman does not fill in) is
      given as the value it would have on a node called `node`, and $(FLQ_WORKER_ID) in its
      arguments expanded as kubelet expands it;
    - the images are the ones built here."""
    text = yaml.safe_dump_all(docs)
    for old, new in ports.items():
        text = text.replace(str(old), str(new))
    docs = list(yaml.safe_load_all(text))
    by_kind = {doc["kind"]: doc for doc in docs}
    master = pod_from(by_kind["StatefulSet"], "flq-master-0")
    worker = pod_from(by_kind["DaemonSet"], f"flq-worker-{node}")
    service = by_kind["Service"]["metadata"]["name"]
    claim_name = f"state-{master['metadata']['name']}"
    claim = by_kind["StatefulSet"]["spec"]["volumeClaimTemplates"][0]
    master["spec"]["volumes"].append(
        {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name}}
    )
    for pod, image in ((master, MASTER_IMAGE), (worker, WORKER_IMAGE)):
        spec = pod["spec"]
        spec["hostNetwork"] = True
        spec.pop("nodeSelector", None)
        container = spec["containers"][0]
        container["image"] = image
        # podman refuses port mappings on the host network; probes name the port by number
        numbers = {port["name"]: port["containerPort"] for port in container.pop("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            http = container.get(probe, {}).get("httpGet")
            if http is not None:
                http["port"] = numbers.get(http["port"], http["port"])
        for volume in spec["volumes"]:
            secret = volume.pop("secret", None)
            if secret is not None:
                path = str(secrets[secret["secretName"]])
                volume["hostPath"] = {"path": path, "type": "Directory"}
    worker_container = worker["spec"]["containers"][0]
    for variable in worker_container["env"]:
        if variable["name"] == "FLQ_WORKER_ID":
            assert variable.pop("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}
            variable["value"] = node
    # kubelet expands $(NAME) in args from the container's variables; podman 4.3 does not
    values = {v["name"]: v["value"] for v in worker_container["env"] if "value" in v}
    args = [a.replace(f"{service}.flq.svc:", "localhost:") for a in worker_container["args"]]
    for name, value in values.items():
        args = [arg.replace(f"$({name})", value) for arg in args]
    assert not any("$(" in arg for arg in args), args
    worker_container["args"] = args
    return [by_kind["ConfigMap"], master, worker], claim_name


def test_kube_play_runs_the_rendered_master_and_worker_pods_and_stops_gracefully(
    podman: Podman, cleanup: list[tuple[str, str]], tmp_path: Path
) -> None:
    from flq.certs import init_directory

    docs = render_overlay("x86")
    config_map = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    config_map["data"]["flq.toml"] = config_map["data"]["flq.toml"].replace(
        "min_workers = 2",
        "min_workers = 1",  # one worker pod plays here: rounds need one
    )
    # What an operator runs before applying: `flq certs init` with the Service's name.
    node = "node-0"
    certs = tmp_path / "certs"
    init_directory(certs, "flq-master.flq.svc", [node])
    digest = (certs / "master.env").read_text().strip().partition("=")[2]
    master_files = ["ca.pem", "server.pem", "server.key", "tokens.txt", "admin.pem", "admin.key"]
    worker_files = ["ca.pem", f"{node}.pem", f"{node}.key", f"{node}.token"]
    secrets = {
        "flq-master-secrets": secret_directory(
            tmp_path / "master-secrets",
            {name: (certs / name).read_bytes() for name in master_files},
        ),
        "flq-worker-secrets": secret_directory(
            tmp_path / "worker-secrets",
            {name: (certs / name).read_bytes() for name in worker_files},
        ),
    }
    # the admin token's digest, an environment variable from a Secret: a podman secret holding
    # the Secret's data as podman 4.3 reads it (JSON, key -> base64)
    admin_secret = f"flq-master-secrets-{uuid.uuid4().hex[:8]}"
    secret_data = tmp_path / "admin-secret.json"
    secret_data.write_text(json.dumps({"admin-digest": base64.b64encode(digest.encode()).decode()}))
    podman.run("secret", "create", admin_secret, str(secret_data))
    try:
        _play_and_stop(podman, cleanup, tmp_path, docs, secrets, node, admin_secret)
    finally:
        podman.run("secret", "rm", admin_secret, check=False)


def assert_probe_passes(podman: Podman, container: str, failure_threshold: int) -> None:
    """The container's health check passes within `failure_threshold` tries in a row: kubelet
    restarts a container only after that many consecutive failures (a try may time out on a
    loaded machine: the Python start of `flq health` alone takes seconds)."""
    failures = []
    for _ in range(failure_threshold):
        health = podman.run("healthcheck", "run", container, check=False, timeout=60)
        if health.returncode == 0:
            return
        failures.append((health.stdout + health.stderr).strip())
        time.sleep(2.0)
    pytest.fail(f"liveness probe of {container}: {failure_threshold} failures: {failures}")


def _play_and_stop(
    podman: Podman,
    cleanup: list[tuple[str, str]],
    tmp_path: Path,
    docs: list[dict[str, Any]],
    secrets: dict[str, Path],
    node: str,
    admin_secret: str,
) -> None:
    grpc, metrics, worker_metrics = free_port(), free_port(), free_port()
    ports = {50051: grpc, 9100: metrics, 9101: worker_metrics}
    objects, claim = podman_pods(docs, secrets, ports, node)
    master_pod = next(o for o in objects if o["metadata"]["name"] == "flq-master-0")
    for variable in master_pod["spec"]["containers"][0]["env"]:
        variable["valueFrom"]["secretKeyRef"]["name"] = admin_secret
    grace = master_pod["spec"]["terminationGracePeriodSeconds"]
    played = tmp_path / "pods.yaml"
    played.write_text(yaml.safe_dump_all(objects))
    podman.run("volume", "create", claim)
    os.chown(podman.mountpoint(claim), FLQ_UID, FLQ_UID)  # what fsGroup does on a cluster
    config_volume = objects[0]["metadata"]["name"]  # kube play keeps a ConfigMap as a volume
    cleanup.extend([("volume", claim), ("volume", config_volume)])
    cleanup.extend([("pod", "flq-master-0"), ("pod", f"flq-worker-{node}")])
    podman.run("kube", "play", str(played), timeout=300)

    run_dir = podman.mountpoint(claim) / "run"
    wait_until(lambda: len(rounds_in(run_dir)) >= 2, 600, "two rounds in the volume claim")
    # the liveness probe as podman runs it: `flq health` over mutual TLS in the master's pod
    master_container = "flq-master-0-master"
    liveness = master_pod["spec"]["containers"][0]["livenessProbe"]
    assert_probe_passes(podman, master_container, liveness.get("failureThreshold", 3))

    started = time.monotonic()
    podman.run("pod", "stop", "--time", str(grace), "flq-master-0", timeout=grace + 60)
    stopped_in = time.monotonic() - started
    state = json.loads(
        podman.run("inspect", master_container, "--format", "{{json .State}}").stdout
    )
    assert state["ExitCode"] == 0, state  # 137 would be kill after the grace period
    assert stopped_in < grace
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "stopping" and summary["rounds"] >= 2
    assert (run_dir / "checkpoint.npz").stat().st_size > 0
    logs = podman.run("logs", master_container)
    events = [entry["event"] for entry in json_lines(logs.stdout + logs.stderr)]
    assert "master listening" in events and "master stopped" in events
