"""metrics.jsonl and TensorBoard writing, peak FLOP/s for MFU, and the non-finite-loss guard.

Only process 0 writes. Metrics stay on device until a log step, when the pending steps
are fetched together (one host sync per log interval, not per step).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.errors import UserError

# Dense bf16 peak per chip, from vendor data sheets.
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
}


class NonFiniteLossError(UserError):
    """Training produced a NaN/Inf loss or gradient norm."""


def measure_cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted f32 matmul on this host (the CPU 'peak' MFU is measured against)."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(configured: float) -> float:
    """Peak FLOP/s of one device: configured, looked up by device kind, or measured (CPU).

    On CPU the fake devices share the host's cores, so the measured host peak is divided
    among the local devices.
    """
    if configured > 0:
        return configured
    device = jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak_flops() / jax.local_device_count()
    for kind, flops in PEAK_FLOPS_BY_DEVICE_KIND.items():
        if device.device_kind.startswith(kind):
            return flops
    raise UserError(
        f"unknown peak FLOP/s for device kind {device.device_kind!r}: set --config.peak_flops_per_device"
    )


def check_finite(step: int, metrics: dict, last_good_checkpoint: int | None) -> None:
    """Raises NonFiniteLossError naming the step if the loss or gradient norm is NaN/Inf."""
    for key in ("loss", "grad_norm"):
        if key in metrics and not math.isfinite(metrics[key]):
            kept = "none saved" if last_good_checkpoint is None else f"step {last_good_checkpoint}"
            raise NonFiniteLossError(
                f"{key} is {metrics[key]} at step {step}; stopping (last good checkpoint: {kept})"
            )


class MetricsWriter:
    """Appends one JSON object per step to WORKDIR/metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops lines past `step` (steps a resumed run will redo), keeping everything else."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if _complete_row_at_or_before(line, step)]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.path)

    def write(self, rows: Iterable[dict], tensorboard: bool = True) -> None:
        """Appends rows (each with a 'step'); scalar fields also go to TensorBoard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
                if tensorboard:
                    for key, value in row.items():
                        if key != "step" and isinstance(value, (int, float)):
                            self._tb.add_scalar(key, value, row["step"])
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _complete_row_at_or_before(line: str, step: int) -> bool:
    """True for a whole JSON row with step <= `step` (a kill mid-write leaves a partial line)."""
    try:
        return line.endswith("\n") and json.loads(line)["step"] <= step
    except json.JSONDecodeError:
        return False


def to_host(metrics: dict) -> dict:
    """Device scalars -> Python floats."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
