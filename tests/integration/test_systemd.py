"""The systemd units: `systemd-analyze verify` on them, and their ExecStart lines run for real.

systemd itself does not run here, so the tests do what it would do with a unit: expand the
specifiers and the environment (Environment=, EnvironmentFile=) the way systemd documents it, start
the command line with $NOTIFY_SOCKET and $WATCHDOG_USEC pointing at a datagram socket we bound, and
read what the daemon tells systemd: READY=1 once serving or connected, STATUS= per round, WATCHDOG=1
pings, STOPPING=1 on SIGTERM. The daemons are real master and worker processes (dataset
"synthetic": no TensorFlow).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flq.config import default_config
from flq.demo import free_port
from flq.log import QUIET_ENV
from flq.master.daemon import STOP_GRACE_S
from flq.master.results import read_rounds

UNITS = Path(__file__).resolve().parents[2] / "systemd"
VENV_BIN = Path(sys.executable).parent  # the venv's real flq-master / flq-worker entry points
INSTALLED_BIN = "/opt/flq/venv/bin/"


def _directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    section, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _values(text: str, key: str) -> list[str]:
    return [value for _, k, value in _directives(text) if k == key]


def _seconds(value: str) -> float:
    if value == "infinity":
        return float("inf")
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


def _render(text: str) -> str:
    """The unit as deployed on this machine: ExecStart points at this venv's entry points."""
    return text.replace(INSTALLED_BIN, f"{VENV_BIN}/")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("units")
    for unit in UNITS.glob("*.service"):
        (out / unit.name).write_text(_render(unit.read_text()))
    (out / "flq-worker@w0.service").write_text((out / "flq-worker@.service").read_text())
    return out


def test_the_units_exist_and_point_at_the_venv_entry_points() -> None:
    names = sorted(p.name for p in UNITS.glob("*.service"))
    assert names == ["flq-master.service", "flq-worker@.service"]
    for name, entry in (
        ("flq-master.service", "flq-master"),
        ("flq-worker@.service", "flq-worker"),
    ):
        (exec_start,) = _values((UNITS / name).read_text(), "ExecStart")
        assert f"{INSTALLED_BIN}{entry} run" in exec_start
        assert (VENV_BIN / entry).exists()


@pytest.mark.parametrize(
    "name", ["flq-master.service", "flq-worker@.service", "flq-worker@w0.service"]
)
def test_systemd_analyze_verify_is_clean(rendered: Path, name: str) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make system-deps` installs Debian's systemd"
    result = subprocess.run(
        [tool, "verify", f"./{name}"],
        cwd=rendered,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    # Warnings are failures: verify exits 0 on e.g. an unknown key and only says so on stderr.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("name", ["flq-master.service", "flq-worker@.service"])
def test_units_say_what_the_operations_issue_asks(name: str) -> None:
    text = (UNITS / name).read_text()
    one = {key: value for _, key, value in _directives(text)}  # the last one counts
    assert one["Type"] == "notify"
    assert one["Restart"] == "on-failure"
    assert one["StateDirectory"] == "flq"
    assert one["SupplementaryGroups"] == "video"
    assert "PrivateDevices" not in one and "DevicePolicy" not in one  # the GPU stays reachable
    assert "MemoryDenyWriteExecute" not in one  # CUDA/XLA write code at run time
    assert _seconds(one["WatchdogSec"]) > 0
    assert "--log-format json" in one["ExecStart"]
    role = "master" if name.startswith("flq-master") else "worker-%i"
    assert _values(text, "EnvironmentFile") == [f"/etc/flq/{role}.env"]
    # Graceful shutdown: up to one round deadline for the round in flight + the streams' grace.
    graceful = default_config().system.round_timeout_s + STOP_GRACE_S
    assert _seconds(one["TimeoutStopSec"]) > graceful


# ---------------------------------------------------------------- running the ExecStart lines


def _environment(unit: str, specifiers: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _values(unit, "Environment"):
        key, _, val = _expand_specifiers(value, specifiers).partition("=")
        env[key] = val
    for path in _values(unit, "EnvironmentFile"):
        for line in Path(_expand_specifiers(path, specifiers)).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, val = line.partition("=")
                env[key.strip()] = shlex.split(val)[0] if val.strip() else ""
    return env


def _expand_specifiers(text: str, specifiers: dict[str, str]) -> str:
    return re.sub(r"%(.)", lambda m: specifiers[m[1]], text)


def _argv(unit: str, specifiers: dict[str, str], env: dict[str, str]) -> list[str]:
    """ExecStart as systemd runs it: `$VAR` splits into words, `${VAR}` stays one, `$$` is `$`."""
    (line,) = _values(unit, "ExecStart")
    argv: list[str] = []
    for word in shlex.split(_expand_specifiers(line, specifiers)):
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            argv.extend(env.get(word[1:], "").split())
            continue
        word = re.sub(r"\$\{(\w+)\}", lambda m: env.get(m[1], ""), word.replace("$$", "\0"))
        argv.append(word.replace("\0", "$"))
    return argv


class Notifications:
    """A datagram socket standing in for systemd's notify socket; remembers what arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.received.append(message)
            if predicate(message):
                return message
        raise AssertionError(f"no {what} within {timeout}s; got {self.received[-10:]}")


class Service:
    """One unit, started the way systemd starts it."""

    def __init__(
        self, unit_file: Path, state: Path, instance: str, tmp: Path, path: str = ""
    ) -> None:
        self.unit = _render(unit_file.read_text())
        self.path = path or os.environ["PATH"]
        self.specifiers = {"S": str(state), "i": instance, "%": "%"}
        self.notifications = Notifications(tmp / f"notify-{instance or 'master'}.sock")
        self.log = tmp / f"{unit_file.stem.rstrip('@')}{instance}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        unit_env = _environment(self.unit, self.specifiers)
        workdir = Path(
            _expand_specifiers(_values(self.unit, "WorkingDirectory")[0], self.specifiers)
        )
        workdir.mkdir(parents=True, exist_ok=True)  # systemd creates StateDirectory=
        env = {
            "PATH": self.path,
            **QUIET_ENV,
            **unit_env,
            "NOTIFY_SOCKET": str(self.notifications.path),
            "WATCHDOG_USEC": "1000000",  # WatchdogSec=1s: pings every 0.5 s
        }
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                _argv(self.unit, self.specifiers, unit_env),
                cwd=workdir,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


def _ended(pid: int, timeout: float = 10) -> bool:
    """True once `pid` is gone or a zombie (dead, not yet reaped: when the worker exits before
    reaping it, the orphan waits for this machine's init, which may be slow to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _scrape_until(port: int, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            text = ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no {needle} on :{port}/metrics within {timeout}s:\n{text[-2000:]}")


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        if service.process is not None and service.process.poll() is None:
            service.process.kill()
            service.process.wait()
        service.notifications.sock.close()


@pytest.mark.slow
def test_the_units_start_daemons_that_talk_to_systemd(
    tmp_path: Path, services: list[Service]
) -> None:
    port = free_port()
    etc = tmp_path / "etc" / "flq"
    etc.mkdir(parents=True)
    (etc / "flq.toml").write_text(f"""
[system]
total_workers = 2
min_workers = 1
max_rounds = 100000
round_timeout_s = 5.0
master_url = "http://127.0.0.1:{port}"
[dataset]
name = "synthetic"
synthetic_train_s = 0.05
""")
    # The env files as deploy_jetson.sh writes them.
    (etc / "master.env").write_text(f'FLQ_MASTER_ARGS="--config {etc}/flq.toml"\n')
    metrics_port = free_port()
    (etc / "worker-w1.env").write_text(
        f'FLQ_WORKER_ARGS="--master 127.0.0.1:{port} --config {etc}/flq.toml --heartbeat 0.5 '
        f'--metrics-port {metrics_port}"\n'
    )
    # A stand-in for NVIDIA's tegrastats on the worker's PATH, printing an Orin line each 0.2 s.
    board_bin = tmp_path / "board-bin"
    board_bin.mkdir()
    tegrastats = board_bin / "tegrastats"
    tegrastats.write_text(
        f'#!/bin/sh\necho $$ > "{tmp_path}/tegrastats.pid"\n'
        "while :; do echo 'RAM 3035/7620MB (lfb 1135x4MB) CPU [1%@729,off] GR3D_FREQ 47%@[305] "
        "cpu@41.5C tj@43C VDD_IN 4361mW/4361mW'; sleep 0.2; done\n"
    )
    tegrastats.chmod(0o755)
    state = tmp_path / "var-lib"
    units = {}
    for unit in UNITS.glob("*.service"):  # point EnvironmentFile= at our etc
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/etc/flq/", f"{etc}/"))
        units[unit.name] = copy

    master = Service(units["flq-master.service"], state, "", tmp_path)
    services.append(master)
    master.start()
    ready = master.notifications.wait_for(lambda m: m.startswith("READY=1"), "master READY=1")
    assert ready == f"READY=1\nSTATUS=listening on 127.0.0.1:{port}"
    master.notifications.wait_for(lambda m: m == "WATCHDOG=1", "a watchdog ping")

    worker = Service(
        units["flq-worker@.service"], state, "w1", tmp_path, f"{board_bin}:{os.environ['PATH']}"
    )
    services.append(worker)
    worker.start()
    ready = worker.notifications.wait_for(lambda m: m.startswith("READY=1"), "worker READY=1")
    assert ready == f"READY=1\nSTATUS=connected to 127.0.0.1:{port}"
    master.notifications.wait_for(lambda m: m.startswith("STATUS=round 2/"), "round 2's STATUS")
    # The worker exports the board's readings (tegrastats) on its /metrics.
    metrics = _scrape_until(metrics_port, "flq_board_power_watts")
    assert 'flq_board_power_watts{rail="VDD_IN"} 4.361' in metrics
    assert 'flq_board_temperature_celsius{zone="tj"} 43.0' in metrics

    assert worker.stop() == 0
    # The worker stopped tegrastats on its way out.
    assert _ended(int((tmp_path / "tegrastats.pid").read_text()))
    worker.notifications.wait_for(lambda m: m.startswith("STOPPING=1"), "worker STOPPING=1")
    assert master.stop() == 0
    master.notifications.wait_for(lambda m: m == "STOPPING=1", "master STOPPING=1")
    run_dir = state / "flq" / "master"
    assert (run_dir / "checkpoint.npz").exists() and (run_dir / "rounds.csv").exists()
    rounds = read_rounds(run_dir / "rounds.csv")
    assert (rounds[0]["participants"], rounds[0]["fresh"]) == ("1", "w1")

    # A restart (Restart=on-failure, a reboot) continues from the checkpoint: --resume is added.
    (tmp_path / "again").mkdir()
    again = Service(units["flq-master.service"], state, "", tmp_path / "again")
    services.append(again)
    again.start()
    again.notifications.wait_for(lambda m: m.startswith("READY=1"), "READY=1 after a restart")
    assert again.stop() == 0
    log = again.log.read_text()
    assert "resumed from checkpoint" in log
