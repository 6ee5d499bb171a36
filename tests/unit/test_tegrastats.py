"""tegrastats parsing on lines in the formats real boards print, and the reader around it.

tegrastats is NVIDIA's tool and does not run off a Jetson, so the reader is tested against a
stand-in script that prints captured lines the way tegrastats does (one per interval).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from flq.worker.tegrastats import (
    TegraSample,
    export_board_stats,
    parse_tegrastats_line,
    read_tegrastats,
)

# Jetson Nano, JetPack 4.6 (L4T 32.7): POM_ rails without units, GPU frequency after '@'.
NANO = (
    "RAM 2341/3964MB (lfb 127x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [3%@102,2%@102,0%@102,0%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@22.5C "
    "CPU@25C PMIC@100C GPU@23.5C AO@31C thermal@24C POM_5V_IN 2563/2563 POM_5V_GPU 0/0 "
    "POM_5V_CPU 371/371"
)
# Jetson TX2, JetPack 3/4: no SWAP field, VDD_ rails without units.
TX2 = (
    "RAM 2135/7855MB (lfb 1057x4MB) CPU [2%@2035,0%@2035,0%@2035,2%@2035,2%@2036,2%@2035] "
    "EMC_FREQ 1%@1866 GR3D_FREQ 0%@1300 APE 150 MTS fg 0% bg 0% BCPU@30C MCPU@30C GPU@29C "
    "PLL@30C Tboard@28C Tdiode@28.25C PMIC@100C thermal@29.4C VDD_IN 3104/4029 VDD_CPU 291/730 "
    "VDD_GPU 145/207 VDD_SOC 727/746 VDD_WIFI 0/180 VDD_DDR 1248/1375"
)
# Jetson AGX Xavier, JetPack 4.4: bare rail names, the board input is SYS5V.
XAVIER_JP4 = (
    "RAM 1430/31919MB (lfb 7002x4MB) SWAP 0/15959MB (cached 0MB) "
    "CPU [0%@1190,0%@1190,0%@1190,0%@1190,off,off,off,off] EMC_FREQ 0% GR3D_FREQ 0% AO@32C "
    "GPU@32C Tdiode@33.25C PMIC@100C AUX@31.5C CPU@33.5C thermal@32.3C Tboard@32C GPU 0/0 "
    "CPU 311/311 SOC 1244/1244 CV 0/0 VDDRQ 155/155 SYS5V 1425/1425"
)
# Xavier NX, JetPack 5: mW units, GPU frequency in brackets, two cores off.
XAVIER_NX_JP5 = (
    "RAM 2690/6854MB (lfb 6x1MB) SWAP 479/3427MB (cached 3MB) "
    "CPU [3%@1904,7%@1906,1%@1905,0%@1907,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 12%@[510] "
    "VIC_FREQ 601 APE 150 AUX@39C CPU@39.5C AO@37.5C GPU@37.5C PMIC@50C VDD_IN 5079mW/5079mW "
    "VDD_CPU_GPU_CV 696mW/696mW VDD_SOC 1104mW/1104mW"
)
# Orin Nano 8 GB, JetPack 6 (L4T 36): a leading timestamp, lower-case sensors, GPU zone off.
ORIN_JP6 = (
    "08-30-2023 10:21:54 RAM 3035/7620MB (lfb 1135x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [1%@729,0%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 47%@[305] "
    "NVDEC off NVJPG off NVJPG1 off VIC off OFA off NVENC off NVENC1 off NVDEC1 off APE 174 "
    "cpu@41.5C soc2@39.5C soc0@40.093C gpu@-256C tj@41.5C soc1@40.093C "
    "VDD_IN 4361mW/4361mW VDD_CPU_GPU_CV 517mW/517mW VDD_SOC 1432mW/1432mW"
)
# Orin, as quoted in the operations issue: no GPU frequency, CPU@ in capitals.
ORIN_ISSUE = (
    "RAM 3035/7620MB (lfb 1135x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@1510,off,1%@1510] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0% VDD_IN 4361mW/4361mW VDD_CPU_GPU_CV 517mW/400mW CPU@41.5C"
)


def test_nano_jetpack4() -> None:
    s = parse_tegrastats_line(NANO)
    assert s is not None
    assert (s.ram_used_mb, s.ram_total_mb, s.swap_used_mb, s.swap_total_mb) == (2341, 3964, 0, 1982)
    assert s.cpu_load_percent == (3.0, 2.0, 0.0, 0.0)
    assert (s.gpu_load_percent, s.gpu_freq_mhz, s.emc_load_percent) == (0.0, 76, 0.0)
    assert s.temperature_c == {
        "pll": 22.5,
        "cpu": 25.0,
        "pmic": 100.0,
        "gpu": 23.5,
        "ao": 31.0,
        "thermal": 24.0,
    }
    assert s.power_mw == {"POM_5V_IN": 2563.0, "POM_5V_GPU": 0.0, "POM_5V_CPU": 371.0}
    assert s.board_power_mw == 2563.0
    assert s.timestamp is None


def test_tx2_without_swap_and_with_averages() -> None:
    s = parse_tegrastats_line(TX2)
    assert s is not None
    assert (s.ram_used_mb, s.swap_used_mb) == (2135, None)
    assert len(s.cpu_load_percent) == 6
    assert (s.gpu_load_percent, s.gpu_freq_mhz) == (0.0, 1300)
    assert s.temperature_c["tdiode"] == 28.25 and s.temperature_c["bcpu"] == 30.0
    assert s.power_mw["VDD_IN"] == 3104.0 and s.power_avg_mw["VDD_IN"] == 4029.0
    assert set(s.power_mw) == {"VDD_IN", "VDD_CPU", "VDD_GPU", "VDD_SOC", "VDD_WIFI", "VDD_DDR"}
    assert s.board_power_mw == 3104.0


def test_xavier_jetpack4_bare_rail_names() -> None:
    s = parse_tegrastats_line(XAVIER_JP4)
    assert s is not None
    assert s.cpu_load_percent == (0.0, 0.0, 0.0, 0.0, None, None, None, None)
    assert s.cpu_load_mean == 0.0
    assert (s.gpu_load_percent, s.gpu_freq_mhz, s.emc_load_percent) == (0.0, None, 0.0)
    assert s.power_mw == {
        "GPU": 0.0,
        "CPU": 311.0,
        "SOC": 1244.0,
        "CV": 0.0,
        "VDDRQ": 155.0,
        "SYS5V": 1425.0,
    }
    assert s.board_power_mw == 1425.0
    assert s.temperature_c["gpu"] == 32.0 and s.temperature_c["tboard"] == 32.0


def test_xavier_nx_jetpack5_milliwatts_and_bracketed_gpu_clock() -> None:
    s = parse_tegrastats_line(XAVIER_NX_JP5)
    assert s is not None
    assert (s.swap_used_mb, s.swap_total_mb) == (479, 3427)
    assert s.cpu_load_percent == (3.0, 7.0, 1.0, 0.0, None, None)
    assert s.cpu_load_mean == pytest.approx(2.75)
    assert (s.gpu_load_percent, s.gpu_freq_mhz) == (12.0, 510)
    assert s.power_mw == {"VDD_IN": 5079.0, "VDD_CPU_GPU_CV": 696.0, "VDD_SOC": 1104.0}
    assert s.temperature_c["aux"] == 39.0


def test_orin_jetpack6_timestamp_lowercase_sensors_and_a_sensor_that_is_off() -> None:
    s = parse_tegrastats_line(ORIN_JP6)
    assert s is not None
    assert s.timestamp == "08-30-2023 10:21:54"
    assert (s.ram_used_mb, s.ram_total_mb) == (3035, 7620)
    assert (s.gpu_load_percent, s.gpu_freq_mhz) == (47.0, 305)
    assert "gpu" not in s.temperature_c  # gpu@-256C: the zone is off
    assert s.temperature_c == {
        "cpu": 41.5,
        "soc2": 39.5,
        "soc0": 40.093,
        "tj": 41.5,
        "soc1": 40.093,
    }
    assert s.board_power_mw == 4361.0
    assert s.power_avg_mw["VDD_SOC"] == 1432.0


def test_orin_line_from_the_issue() -> None:
    s = parse_tegrastats_line(ORIN_ISSUE)
    assert s is not None
    assert s.cpu_load_percent == (2.0, None, 1.0)
    assert (s.gpu_load_percent, s.gpu_freq_mhz) == (0.0, None)
    assert s.temperature_c == {"cpu": 41.5}
    assert s.power_mw == {"VDD_IN": 4361.0, "VDD_CPU_GPU_CV": 517.0}
    assert s.power_avg_mw["VDD_CPU_GPU_CV"] == 400.0


@pytest.mark.parametrize(
    "line", ["", "\n", "tegrastats: command not found", "NVDEC off VIC off", "RAM lots"]
)
def test_lines_that_are_not_samples(line: str) -> None:
    assert parse_tegrastats_line(line) is None


# ---------------------------------------------------------------- the reader


def _stand_in(tmp_path: Path, lines: list[str], then: str = "exec sleep 60") -> Path:
    """An executable named tegrastats printing captured lines, then `then`."""
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    script = tmp_path / "bin" / "tegrastats"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{tmp_path}/args"\n'
        f'echo $$ > "{tmp_path}/pid"\n'
        f'cat "{tmp_path}/lines.txt"\n'
        f"{then}\n"
    )
    script.chmod(0o755)
    return script


async def test_no_tegrastats_means_no_samples_and_no_error(tmp_path: Path) -> None:
    samples = [s async for s in read_tegrastats(0.1, command=str(tmp_path / "tegrastats"))]
    assert samples == []


async def test_reader_runs_tegrastats_with_the_interval_and_stops_it(tmp_path: Path) -> None:
    script = _stand_in(tmp_path, [NANO, "some noise", ORIN_JP6])
    reader = read_tegrastats(0.25, command=str(script))
    first = await anext(reader)
    second = await anext(reader)
    assert isinstance(first, TegraSample) and first.ram_total_mb == 3964
    assert second.timestamp == "08-30-2023 10:21:54"  # the noise line was skipped
    assert (tmp_path / "args").read_text().split() == ["--interval", "250"]
    await reader.aclose()  # the caller is done: the child must go
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_export_feeds_the_worker_board_gauges(tmp_path: Path) -> None:
    from flq.metrics import WorkerMetrics

    script = _stand_in(tmp_path, [NANO, ORIN_JP6], then="exit 0")
    metrics = WorkerMetrics("w0")
    await export_board_stats(metrics, 0.1, command=str(script))  # returns when tegrastats ends
    value = metrics.registry.get_sample_value
    assert value("flq_board_ram_used_bytes") == 3035 * 1024 * 1024  # the last line wins
    assert value("flq_board_ram_total_bytes") == 7620 * 1024 * 1024
    assert value("flq_board_gpu_load_ratio") == pytest.approx(0.47)
    assert value("flq_board_power_watts", {"rail": "VDD_IN"}) == pytest.approx(4.361)
    assert value("flq_board_power_watts", {"rail": "POM_5V_IN"}) == pytest.approx(2.563)
    assert value("flq_board_temperature_celsius", {"zone": "tj"}) == 41.5


async def test_cancelling_the_export_stops_tegrastats(tmp_path: Path) -> None:
    from flq.metrics import WorkerMetrics

    script = _stand_in(tmp_path, [XAVIER_NX_JP5])  # then keeps running, as tegrastats does
    metrics = WorkerMetrics("w0")
    task = asyncio.create_task(export_board_stats(metrics, 0.1, command=str(script)))
    while not metrics.registry.get_sample_value("flq_board_ram_total_bytes"):  # 0 until a sample
        assert not task.done()
        await asyncio.sleep(0.01)
    assert metrics.registry.get_sample_value("flq_board_gpu_load_ratio") == pytest.approx(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid").read_text()), 0)
