"""The deployment inventory: every problem reported at once, hosts merged, bash-safe output."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flq.inventory import InventoryError, read_inventory, shell_assignments

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "m.toml").write_text("")
    (tmp_path / "w.toml").write_text("")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


def test_the_example_inventory_reads_master_first_one_target_per_host() -> None:
    plan = read_inventory(REPO / "inventory.example.toml")
    assert [t.master for t in plan.targets] == [True, False, False]
    assert [t.workers for t in plan.targets] == [["w0"], ["w1"], ["w2"]]
    assert plan.master["M_ARGS"].startswith("--host 0.0.0.0 --port 50051")


def test_master_and_worker_on_one_host_share_a_target(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [defaults]
        ssh_user = "root"
        config = "w.toml"
        [master]
        host = "board1"
        config = "m.toml"
        grpc_port = 6000
        [[workers]]
        id = "w0"
        host = "board1"
        extras = "worker,llm"
        [[workers]]
        id = "w1"
        host = "board2"
        """,
    )
    plan = read_inventory(path)
    assert [(t.host, t.master, t.workers) for t in plan.targets] == [
        ("board1", True, ["w0"]),
        ("board2", False, ["w1"]),
    ]
    assert plan.targets[0].extras == {"worker", "llm"}
    assert plan.targets[0].settings["sudo"] is False  # root needs no sudo
    assert plan.master["M_ADDRESS"] == "board1:6000"
    assert plan.worker_configs == [str(tmp_path / "w.toml")] * 2  # relative to the inventory


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        colour = "blue"
        [[workers]]
        id = "w 0"
        host = "a"
        config = "missing.toml"
        [[workers]]
        id = "w1"
        host = "a"
        ssh_port = 2222
        config = "w.toml"
        """,
    )
    with pytest.raises(InventoryError) as raised:
        read_inventory(path)
    message = str(raised.value)
    for expected in (
        "top level: unknown key(s) colour",
        "[[workers]] #1: id 'w 0' must be letters",
        "[[workers]] #1: config missing.toml not found",
        "[[workers]] #2: ssh_port differs from another entry for host a",
        "workers need the master's address",
    ):
        assert expected in message, message


def test_a_file_that_is_not_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[master\n")
    with pytest.raises(InventoryError, match=f"inventory {path}"):
        read_inventory(path)


def test_bash_reads_back_exactly_the_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [master]
        host = "m"
        config = "m.toml"
        args = "--resume --name 'it''s; rm -rf /'"
        [[workers]]
        id = "w0"
        host = "m"
        config = "w.toml"
        args = "$(touch pwned) `x`"
        """,
    )
    plan = read_inventory(path)
    script = shell_assignments(plan) + 'printf "%s\\n" "$M_ARGS" "${W_ARGS[0]}" "${T_HOST[@]}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [plan.master["M_ARGS"], "$(touch pwned) `x`", "m"]
    assert not (tmp_path / "pwned").exists()
