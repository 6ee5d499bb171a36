"""The command-line tools as a user types them (subprocesses, real files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flq.log import QUIET_ENV
from flq.master.results import FIXED_COLUMNS, read_rounds

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def flq(
    *args: str, module: str = "flq.cli.main", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **QUIET_ENV, "COLUMNS": "120"},
        timeout=timeout,
    )


def test_config_check_accepts_the_original_flq_file() -> None:
    result = flq("config", "check", str(EXAMPLES / "original-flq.json"))
    assert result.returncode == 0, result.stderr
    assert "ok (mode=laq8" in result.stdout


def test_config_check_names_the_bad_key_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[flq_algorithm]\nmod = "bbit"\n')
    result = flq("config", "check", str(bad))
    assert result.returncode == 2
    assert "unknown key 'mod'" in result.stderr and "did you mean 'mode'" in result.stderr
    assert "Traceback" not in result.stderr
    out_of_range = tmp_path / "range.toml"
    out_of_range.write_text("[flq_algorithm]\nb_up = 17\n")
    result = flq("config", "check", str(out_of_range))
    assert result.returncode == 2 and "b_up" in result.stderr and "17" in result.stderr


def test_config_check_warns_when_the_fleet_outgrows_one_llm_prompt(tmp_path: Path) -> None:
    cfg = tmp_path / "llm.toml"
    cfg.write_text(
        '[system]\ntotal_workers = 8\nmin_workers = 8\n[flq_algorithm]\nweighting = "llm"\n'
        '[llm]\nmax_clients_in_prompt = 5\n[llm.features]\ntraffic_mbps = "uplink, Mbit/s"\n'
    )
    result = flq("config", "check", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "ok (mode=" in result.stdout
    assert "warning: llm.max_clients_in_prompt = 5 < system.total_workers = 8" in result.stderr
    shown = flq("config", "show", str(cfg))
    assert 'features = { "traffic_mbps" = "uplink, Mbit/s" }' in shown.stdout


def test_config_errors_name_the_section_as_written(tmp_path: Path) -> None:
    # "[dataset]" in a message is rich markup unless escaped: it used to print as "section  ".
    bad_key = tmp_path / "key.toml"
    bad_key.write_text('[dataset]\nloadr = "data.py:load"\n')
    result = flq("config", "check", str(bad_key))
    assert result.returncode == 2
    assert "unknown key 'loadr' in section [dataset]; did you mean 'loader'?" in result.stderr
    bad_section = tmp_path / "section.toml"
    bad_section.write_text("[datasets]\nname = 'digits'\n")
    result = flq("config", "check", str(bad_section))
    assert result.returncode == 2 and "unknown section [datasets]" in result.stderr


def test_config_check_warns_about_lora_without_a_base(tmp_path: Path) -> None:
    config = tmp_path / "lora.toml"
    config.write_text("[lora]\nrank = 4\n")
    result = flq("config", "check", str(config))
    assert result.returncode == 0 and "ok (mode=" in result.stdout
    assert "warning: lora.rank = 4 without lora.base" in result.stderr
    config.write_text('[lora]\nrank = 4\nbase = "base.keras"\n')
    assert "warning" not in flq("config", "check", str(config)).stderr


def test_config_show_fills_in_defaults() -> None:
    result = flq("config", "show", str(EXAMPLES / "original-flq.json"))
    assert result.returncode == 0
    assert "[lazy_selection]" in result.stdout and "round_timeout_s" in result.stdout


def test_simulate_then_report(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(
        '[system]\ntotal_workers = 4\nmax_rounds = 6\n[dataset]\nname = "synthetic"\n'
        '[flq_algorithm]\nmode = "bin"\nb_up = 1\n'
    )
    result = flq("simulate", "--config", str(config), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_rounds(tmp_path / "run" / "rounds.csv")
    assert len(rows) == 6 and tuple(rows[0])[: len(FIXED_COLUMNS)] == FIXED_COLUMNS
    assert (tmp_path / "run" / "rounds.xlsx").exists()
    plot = tmp_path / "plot.png"
    result = flq("report", str(tmp_path / "run"), "-o", str(plot))
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_missing_run_is_a_usage_error(tmp_path: Path) -> None:
    result = flq("report", str(tmp_path / "nothing"), "-o", str(tmp_path / "p.png"))
    assert result.returncode == 2 and "rounds.csv" in result.stderr


def test_daemons_refuse_bad_input_with_a_clear_message(tmp_path: Path) -> None:
    missing = flq("run", "--config", str(tmp_path / "nope.toml"), module="flq.cli.master")
    assert missing.returncode == 2 and "nope.toml" in missing.stderr
    bad_master = flq(
        "run",
        "--master",
        "nohost",
        "--worker-id",
        "w0",
        "--config",
        str(EXAMPLES / "digits-bbit.toml"),
        module="flq.cli.worker",
    )
    assert bad_master.returncode == 2 and "HOST:PORT" in bad_master.stderr
    long_id = flq(
        "run",
        "--master",
        "127.0.0.1:50051",
        "--worker-id",
        "w" * 200,
        "--config",
        str(EXAMPLES / "digits-bbit.toml"),
        module="flq.cli.worker",
    )
    assert long_id.returncode == 2 and "--worker-id" in long_id.stderr, long_id.stderr
    assert "200 bytes" in long_id.stderr and "w" * 100 not in long_id.stderr


def test_help_is_fast_to_reach_and_lists_the_commands() -> None:
    result = flq("--help")
    assert result.returncode == 0
    for command in ("demo", "simulate", "report", "config"):
        assert command in result.stdout
    for module in ("flq.cli.master", "flq.cli.worker"):
        assert flq("run", "--help", module=module).returncode == 0
