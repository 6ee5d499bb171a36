"""deploy_jetson.sh against a real sshd on 127.0.0.1 and 127.0.0.2, the way a user runs it.

The "boards" are this machine seen through sshd, each with its own install prefix in a temp dir.
What a board has and we do not: systemd (a `systemctl`/`journalctl` stand-in placed first on the
PATH that sshd gives sessions records every call), and the project's dependencies installed
system-wide the way NVIDIA's TensorFlow is (here: the user site of the board's Python, pointing at
this venv's packages minus flq itself). So the venv the script creates with --system-site-packages
sees them, `pip_args = "--no-deps"` installs just the wheel, and `flq-worker --help` runs from it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flq.demo import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy_jetson.sh"
CHECKOUT_FILES = ("deploy_jetson.sh", "pyproject.toml", "README.md", "systemd", "flq")
SYSTEMCTL_STATUS_TEXT = "round 3/30, accuracy 0.8120"


@dataclass
class Boards:
    dir: Path
    port: int
    key: Path
    known_hosts: Path
    calls: Path  # what the systemctl stand-in was asked: "working directory|arguments" lines

    def systemctl_calls(self, board: Path | None = None) -> list[str]:
        """Every call, or those made while installing to `board` (hosts deploy in parallel)."""
        lines = self.calls.read_text().splitlines() if self.calls.exists() else []
        return [
            call
            for cwd, _, call in (line.partition("|") for line in lines)
            if board is None or cwd.startswith(f"{board}/")
        ]

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ssh",
                "-p",
                str(self.port),
                "-i",
                str(self.key),
                "-o",
                "BatchMode=yes",
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                f"root@{host}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else "")
    assert path, f"{name} is missing: `make system-deps` installs openssh-server and rsync"
    return path


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _board_site_packages(userbase: Path) -> None:
    """The board's user site: this venv's packages, except flq (the deploy brings that)."""
    site = Path(sysconfig.get_path("purelib", "posix_user", vars={"userbase": str(userbase)}))
    site.mkdir(parents=True)
    ours = Path(sysconfig.get_path("purelib"))
    for entry in ours.iterdir():
        if entry.name.startswith(("flq", "__editable__", "_virtualenv")):
            continue
        (site / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boards]:
    sshd, keygen = _tool("sshd"), _tool("ssh-keygen")
    _tool("rsync")
    d = tmp_path_factory.mktemp("boards")
    for name in ("host_key", "user_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = free_port()
    host_key = " ".join((d / "host_key.pub").read_text().split()[:2])
    (d / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {host_key}\n[127.0.0.2]:{port} {host_key}\n"
    )
    shim = d / "shim"
    shim.mkdir()
    calls = d / "systemctl.calls"
    _write_executable(
        shim / "systemctl",
        f"""#!/bin/sh
echo "$PWD|$*" >> "{calls}"
case "$1" in
  is-active) echo active ;;
  show) echo "{SYSTEMCTL_STATUS_TEXT}" ;;
esac
""",
    )
    _write_executable(
        shim / "journalctl",
        '#!/bin/sh\necho \'{"event": "round", "round": 3, "unit": "\'"$2"\'"}\'\n',
    )
    _board_site_packages(d / "board-user")
    (d / "sshd_config").write_text(f"""
Port {port}
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
SetEnv PATH={shim}:/usr/local/bin:/usr/bin:/bin PYTHONUSERBASE={d}/board-user
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = (d / "sshd.log").open("wb")
    process = subprocess.Popen(
        [sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (d / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.2", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not start listening"
                time.sleep(0.1)
        yield Boards(d, port, d / "user_key", d / "known_hosts", calls)
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _config(path: Path, rounds: int) -> Path:
    path.write_text(f'[system]\nmax_rounds = {rounds}\n[dataset]\nname = "synthetic"\n')
    return path


def _inventory(boards: Boards, tmp: Path, *, unreachable: bool = False, w0: bool = True) -> Path:
    closed = free_port()  # nothing listens there: ssh gets "connection refused"
    text = f"""
[defaults]
ssh_user = "root"
ssh_port = {boards.port}
ssh_key = "{boards.key}"
known_hosts = "{boards.known_hosts}"
python = "{sys.executable}"
pip_args = "--no-deps"
config = "{_config(tmp / "flq.toml", 30)}"

[master]
host = "127.0.0.1"
prefix = "{tmp}/board-a"
args = "--metrics-port 9100"

[[workers]]
host = "127.0.0.2"
id = "w1"
prefix = "{tmp}/board-b"
config = "{_config(tmp / "w1.toml", 30)}"
env_file = "{tmp / "w1.env"}"
"""
    (tmp / "w1.env").write_text("FLQ_WORKER_TOKEN=token-of-w1\n")
    if w0:  # the master's board trains too
        text += f"""
[[workers]]
host = "127.0.0.1"
id = "w0"
prefix = "{tmp}/board-a"
"""
    if unreachable:
        text += f"""
[[workers]]
host = "localhost"
id = "w2"
ssh_port = {closed}
prefix = "{tmp}/board-c"
"""
    path = tmp / "inventory.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of this tree to deploy from: edits made meanwhile cannot change the wheel."""
    out = tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, out / name)
    return out


def _deploy(checkout: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(checkout / SCRIPT.name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )


def _summary(output: str) -> dict[str, str]:
    """HOST -> RESULT from the table at the end."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("HOST "))
    rows = {}
    for line in lines[start + 1 :]:
        if line.strip() and not line.endswith("host(s) failed"):
            rows[line[:24].strip()] = line[54:].strip()  # printf '%-24s %-28s %s'
    return rows


def test_deploy_status_update_and_uninstall_over_real_ssh(
    boards: Boards, checkout: Path, tmp_path: Path
) -> None:
    a, b = tmp_path / "board-a", tmp_path / "board-b"
    inventory = _inventory(boards, tmp_path, unreachable=True)

    # 1. First deploy: two boards install, the third cannot be reached; the others still deploy.
    first = _deploy(checkout, "-i", inventory)
    out = first.stdout + first.stderr
    assert first.returncode == 1, out
    assert _summary(first.stdout) == {
        "127.0.0.1": "installed",
        "127.0.0.2": "installed",
        "localhost": "unreachable",
    }, out
    assert "1 host(s) failed" in first.stdout

    # The files landed where the prefix says, with the paths of that prefix inside them.
    etc_a = a / "etc" / "flq"
    assert (etc_a / "master.env").read_text().splitlines()[-1] == (
        f'FLQ_MASTER_ARGS="--config {etc_a}/master.toml --host 0.0.0.0 --port 50051 '
        '--metrics-port 9100"'
    )
    assert (etc_a / "worker-w0.env").read_text().splitlines()[-1] == (
        f'FLQ_WORKER_ARGS="--master 127.0.0.1:50051 --config {etc_a}/worker-w0.toml"'
    )
    assert stat.S_IMODE((etc_a / "master.env").stat().st_mode) == 0o600
    w1_env = (b / "etc" / "flq" / "worker-w1.env").read_text().splitlines()
    assert w1_env[-1] == "FLQ_WORKER_TOKEN=token-of-w1"  # the env_file, for the service only
    assert stat.S_IMODE((b / "etc" / "flq" / "worker-w1.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((b / "opt" / "flq" / "incoming").stat().st_mode) == 0o700
    assert (b / "etc" / "flq" / "worker-w1.toml").read_text() == (tmp_path / "w1.toml").read_text()
    master_unit = (a / "etc" / "systemd" / "system" / "flq-master.service").read_text()
    assert f"exec {a}/opt/flq/venv/bin/flq-master run" in master_unit
    assert f"EnvironmentFile={etc_a}/master.env" in master_unit
    assert (a / "etc" / "systemd" / "system" / "flq-worker@.service").exists()
    assert not (b / "etc" / "systemd" / "system" / "flq-master.service").exists()
    assert not (tmp_path / "board-c").exists()

    # The venv works on the board and runs the deployed flq, not this checkout.
    venv = a / "opt" / "flq" / "venv"
    helped = boards.ssh("127.0.0.1", f"{venv}/bin/flq-worker run --help")
    assert helped.returncode == 0 and "--worker-id" in helped.stdout, helped.stderr
    where = boards.ssh(
        "127.0.0.2", f"{b}/opt/flq/venv/bin/python -c 'import flq; print(flq.__file__)'"
    )
    assert where.stdout.startswith(f"{b}/opt/flq/venv/lib/"), where.stdout + where.stderr
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()

    # systemd was asked for exactly this: master first and waited for, workers without blocking.
    assert boards.systemctl_calls(a) == [
        "daemon-reload",
        "enable --now flq-master.service",
        "enable --now --no-block flq-worker@w0.service",
    ]
    assert boards.systemctl_calls(b) == [
        "daemon-reload",
        "enable --now --no-block flq-worker@w1.service",
    ]
    assert len(boards.systemctl_calls()) == 5

    # 2. Again, with a freshly built wheel, w0 dropped from the inventory and w1's config changed:
    # w0 stops and its files go, w1's config reaches its board and restarts only w1.
    inventory = _inventory(boards, tmp_path, unreachable=True, w0=False)
    _config(tmp_path / "w1.toml", 40)
    reachable = ("--only", "127.0.0.1", "--only", "127.0.0.2")
    second = _deploy(checkout, "-i", inventory, *reachable)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _summary(second.stdout) == {"127.0.0.1": "updated", "127.0.0.2": "updated"}
    assert "[127.0.0.2] changed since the last deploy: etc/worker-w1.toml" in second.stdout
    assert "max_rounds = 40" in (b / "etc" / "flq" / "worker-w1.toml").read_text()
    assert boards.systemctl_calls(a)[3:] == ["disable --now flq-worker@w0.service", "daemon-reload"]
    assert boards.systemctl_calls(b)[2:] == ["restart --no-block flq-worker@w1.service"]
    assert not (etc_a / "worker-w0.env").exists()
    assert not (a / "etc" / "systemd" / "system" / "flq-worker@.service").exists()
    assert (a / "etc" / "systemd" / "system" / "flq-master.service").exists()

    # 3. And again: nothing changes anywhere, and the script says so.
    third = _deploy(checkout, "-i", inventory, *reachable)
    assert third.returncode == 0, third.stdout + third.stderr
    assert _summary(third.stdout) == {"127.0.0.1": "unchanged", "127.0.0.2": "unchanged"}
    assert len(boards.systemctl_calls()) == 8

    # 4. --status: each service's state, its STATUS= line and its last log lines.
    status = _deploy(checkout, "-i", inventory, "--status", "--only", "127.0.0.1")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"flq-master.service: active ({SYSTEMCTL_STATUS_TEXT})" in status.stdout
    assert '"unit": "flq-master.service"' in status.stdout
    assert _summary(status.stdout) == {"127.0.0.1": "active"}

    # 5. --dry-run prints every command and runs none of them.
    calls_before = boards.systemctl_calls()
    dry = _deploy(checkout, "-i", inventory, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "+ rsync -rlt --checksum --delete" in dry.stdout
    assert "target_install" in dry.stdout and "pip wheel" in dry.stdout
    assert set(_summary(dry.stdout).values()) == {"dry run"}
    assert boards.systemctl_calls() == calls_before

    # 6. --uninstall one board: its services stop, its files go; the other board is untouched.
    gone = _deploy(checkout, "-i", inventory, "--uninstall", "--only", "127.0.0.2")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert _summary(gone.stdout) == {"127.0.0.2": "uninstalled"}
    assert boards.systemctl_calls()[len(calls_before) :] == [
        "disable --now flq-worker@w1.service",
        "daemon-reload",
    ]
    assert not (b / "opt" / "flq").exists()
    assert not (b / "etc" / "flq").exists()
    assert not (b / "etc" / "systemd" / "system" / "flq-worker@.service").exists()
    assert (venv / "bin" / "flq-worker").exists()


def test_a_bad_inventory_is_refused_with_the_reason(checkout: Path, tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.toml"
    inventory.write_text('[master]\nhost = "10.0.0.5"\nconfg = "x.toml"\n')
    result = _deploy(checkout, "-i", inventory, "--dry-run")
    assert result.returncode == 2
    assert "[master]: unknown key(s) confg" in result.stderr
    assert "no config" in result.stderr


def test_shell_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `make system-deps` installs it"
    scripts = [SCRIPT, ROOT / "jetson" / "setup.sh"]
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
