"""Jetson board readings from NVIDIA's `tegrastats`: RAM, CPU and GPU load, temperatures, power.

tegrastats prints one line per interval; its fields changed across boards and JetPack releases:

  Nano/TX1 (JetPack 4)  RAM 2341/3964MB (lfb 127x4MB) SWAP 0/1982MB (cached 0MB) CPU [3%@102,...]
                        EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@22.5C CPU@25C GPU@23.5C ...
                        POM_5V_IN 2563/2563 POM_5V_GPU 0/0 POM_5V_CPU 371/371
  TX2/Xavier            ... GR3D_FREQ 0%@[510] ... VDD_IN 3104/4029 VDD_CPU 291/730 ...
  Orin (JetPack 5/6)    [08-30-2023 10:21:54] RAM 3035/7620MB ... CPU [1%@729,off,...] GR3D_FREQ 0%
                        ... cpu@41.5C soc2@39.5C gpu@39.968C tj@41.5C VDD_IN 4361mW/4361mW ...

so the parser reads each field on its own and leaves out what a board does not print. Power rails
are "current/average" in mW (the unit suffix came with JetPack 5). A sensor that is off reads
-256C on some boards: left out. Nothing here needs a Jetson: the reader yields nothing where
tegrastats is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from flq.metrics import WorkerMetrics

log = structlog.get_logger("flq.worker.tegrastats")

_TIMESTAMP = re.compile(r"^\s*(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"(\d+)%(?:@(\d+))?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_TEMPERATURE = re.compile(r"(?<![\w%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
# The rail that measures the whole board's input, by board family.
_INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "SYS5V")
_SENSOR_OFF_C = -100.0  # -256C: thermal zone not available


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line. Sizes in MB, loads in percent, temperatures in °C, power in mW."""

    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_load_percent: tuple[float | None, ...] = ()  # per core; None = core off
    emc_load_percent: float | None = None
    gpu_load_percent: float | None = None
    gpu_freq_mhz: int | None = None
    temperature_c: dict[str, float] = field(default_factory=dict)  # sensor (lower case) -> °C
    power_mw: dict[str, float] = field(default_factory=dict)  # rail -> current mW
    power_avg_mw: dict[str, float] = field(default_factory=dict)  # rail -> average mW
    timestamp: str | None = None  # as printed by JetPack 5+ ("MM-DD-YYYY HH:MM:SS")

    @property
    def cpu_load_mean(self) -> float | None:
        online = [load for load in self.cpu_load_percent if load is not None]
        return sum(online) / len(online) if online else None

    @property
    def board_power_mw(self) -> float | None:
        """The board's input power (VDD_IN on Orin/TX2, POM_5V_IN on Nano, SYS5V on Xavier)."""
        return next((self.power_mw[r] for r in _INPUT_RAILS if r in self.power_mw), None)


def parse_tegrastats_line(line: str) -> TegraSample | None:
    """The sample on one line of tegrastats output; None for a line that is not one."""
    ram = _RAM.search(line)
    if ram is None:
        return None
    swap = _SWAP.search(line)
    cpu = _CPU.search(line)
    emc = _EMC.search(line)
    gpu = _GPU.search(line)
    stamp = _TIMESTAMP.match(line)
    temperatures = {
        name.lower(): float(value)
        for name, value in _TEMPERATURE.findall(line)
        if float(value) > _SENSOR_OFF_C
    }
    power = {rail: (float(now), float(avg)) for rail, now, avg in _POWER.findall(line)}
    return TegraSample(
        ram_used_mb=int(ram[1]),
        ram_total_mb=int(ram[2]),
        swap_used_mb=None if swap is None else int(swap[1]),
        swap_total_mb=None if swap is None else int(swap[2]),
        cpu_load_percent=() if cpu is None else _cpu_loads(cpu[1]),
        emc_load_percent=None if emc is None else float(emc[1]),
        gpu_load_percent=None if gpu is None else float(gpu[1]),
        gpu_freq_mhz=None if gpu is None or gpu[2] is None else int(gpu[2]),
        temperature_c=temperatures,
        power_mw={rail: now for rail, (now, _) in power.items()},
        power_avg_mw={rail: avg for rail, (_, avg) in power.items()},
        timestamp=None if stamp is None else stamp[1],
    )


def _cpu_loads(cores: str) -> tuple[float | None, ...]:
    loads: list[float | None] = []
    for core in cores.split(","):
        match = _CPU_CORE.fullmatch(core.strip())
        loads.append(None if match is None else float(match[1]))  # "off"
    return tuple(loads)


async def read_tegrastats(
    interval_s: float = 1.0, command: str = "tegrastats"
) -> AsyncGenerator[TegraSample, None]:
    """Samples from `tegrastats --interval MS` while it runs; nothing where it is not installed.

    The child process is stopped when the caller stops iterating (or is cancelled).
    """
    path = shutil.which(command)
    if path is None:
        log.info("tegrastats not found: no board readings", command=command)
        return
    try:
        process = await asyncio.create_subprocess_exec(
            path,
            "--interval",
            str(max(1, round(interval_s * 1000))),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as error:
        log.warning("cannot start tegrastats", command=path, error=str(error))
        return
    try:
        assert process.stdout is not None
        async for raw in process.stdout:
            sample = parse_tegrastats_line(raw.decode(errors="replace"))
            if sample is not None:
                yield sample
        log.info("tegrastats ended", returncode=await process.wait())
    finally:
        await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 2.0)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def export_board_stats(
    metrics: WorkerMetrics, interval_s: float = 5.0, command: str = "tegrastats"
) -> None:
    """Feed every sample into a worker's board gauges (flq.metrics) until cancelled."""
    from flq.metrics import record_board_stats

    async with contextlib.aclosing(read_tegrastats(interval_s, command)) as samples:
        async for sample in samples:
            record_board_stats(
                metrics,
                power_mw=sample.power_mw,
                temperature_c=sample.temperature_c,
                gpu_load_percent=sample.gpu_load_percent,
                ram_used_mb=sample.ram_used_mb,
                ram_total_mb=sample.ram_total_mb,
            )
