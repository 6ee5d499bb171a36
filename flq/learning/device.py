"""Device caps for a worker: GPU memory limit or growth, mixed precision.

TensorFlow only accepts memory settings before its runtime initialises (afterwards they raise
RuntimeError), and a CPU-only machine has no GPU to apply them to. Neither is fatal for a worker:
every setting that could not be applied becomes a note in the report and a log line, and the
worker trains anyway. Call `apply_device_caps` once, before building any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from flq.learning.tfimport import keras, quiet_tensorflow_env, tf

__all__ = ["DeviceReport", "apply_device_caps", "quiet_tensorflow_env"]

MIXED_POLICY = "mixed_float16"


@dataclass(frozen=True)
class DeviceReport:
    """What was actually applied (not what was asked for) and why anything was not."""

    gpus: int
    memory_limit_mb: int
    memory_growth: bool
    mixed_precision: bool
    notes: tuple[str, ...]


def apply_device_caps(
    *, gpu_memory_limit_mb: int = 0, memory_growth: bool = True, mixed_precision: bool = False
) -> DeviceReport:
    """Apply what can be applied; never raises for an unavailable GPU or a started runtime."""
    if gpu_memory_limit_mb < 0:
        raise ValueError(
            f"gpu_memory_limit_mb: got {gpu_memory_limit_mb}, expected >= 0 (0 = none)"
        )
    gpus = tf().config.list_physical_devices("GPU")
    notes: list[str] = []
    limit_applied = _apply_memory_limit(gpus, gpu_memory_limit_mb, notes)
    growth_applied = _apply_memory_growth(gpus, memory_growth, limit_applied > 0, notes)
    mixed_applied = _apply_mixed_precision(gpus, mixed_precision, notes)
    _log_notes(notes, on_gpu=bool(gpus))
    return DeviceReport(
        gpus=len(gpus),
        memory_limit_mb=limit_applied,
        memory_growth=growth_applied,
        mixed_precision=mixed_applied,
        notes=tuple(notes),
    )


def _log_notes(notes: list[str], *, on_gpu: bool) -> None:
    # On a CPU-only machine an unapplied GPU cap is expected; on a GPU it deserves attention.
    log = structlog.get_logger("flq.learning.device")
    emit = log.warning if on_gpu else log.info
    for note in notes:
        emit("device cap not applied", note=note)


def _apply_memory_limit(gpus: list[Any], limit_mb: int, notes: list[str]) -> int:
    if limit_mb == 0:
        return 0
    if not gpus:
        notes.append(f"no GPU: memory limit of {limit_mb} MB not applied")
        return 0
    config = tf().config
    try:
        for gpu in gpus:
            config.set_logical_device_configuration(
                gpu, [config.LogicalDeviceConfiguration(memory_limit=limit_mb)]
            )
    except (RuntimeError, ValueError) as exc:
        notes.append(f"memory limit of {limit_mb} MB not applied: {exc}")
        return 0
    return limit_mb


def _apply_memory_growth(
    gpus: list[Any], wanted: bool, limit_applied: bool, notes: list[str]
) -> bool:
    if not wanted:
        return False
    if not gpus:
        notes.append("no GPU: memory growth not applicable")
        return False
    if limit_applied:
        # TensorFlow refuses growth on a GPU that has a fixed logical memory limit.
        notes.append("memory growth skipped: a fixed memory limit is set")
        return False
    try:
        for gpu in gpus:
            tf().config.experimental.set_memory_growth(gpu, True)
    except (RuntimeError, ValueError) as exc:
        notes.append(f"memory growth not applied: {exc}")
        return False
    return True


def _apply_mixed_precision(gpus: list[Any], wanted: bool, notes: list[str]) -> bool:
    if not wanted:
        return False
    if not gpus:
        # float16 on a CPU is slower than float32, not faster.
        notes.append("no GPU: mixed precision skipped")
        return False
    keras().mixed_precision.set_global_policy(MIXED_POLICY)
    return True
