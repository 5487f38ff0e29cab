"""Helpers for end-to-end tests that run `python -m cm3jax.train` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny_lm.py")
# The synthetic source at small shapes, 20 steps with a checkpoint every 5 and a cosine
# schedule over the 20 steps; the mesh exercises all three axes on 8 fake devices.
BASE_FLAGS = (
    f"--config={TINY}",
    "--config.data.source=synthetic",
    "--config.data.seq_len=64",
    "--config.data.global_batch_size=16",
    "--config.model.max_len=128",
    "--config.vocab.text_size=200",
    "--config.vocab.image_codes=48",
    "--config.vocab.num_masks=4",
    "--config.total_steps=20",
    "--config.optim.schedule_steps=20",
    "--config.checkpoint.every_steps=5",
    "--config.eval_every=0",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
)


def cpu_env(devices: int = 8) -> dict:
    """Environment for a child process with `devices` fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_command(workdir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "cm3jax.train", *BASE_FLAGS, f"--workdir={workdir}", *overrides]


def run_train(workdir, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the trainer to completion; returns the finished process (not checked)."""
    return subprocess.run(train_command(workdir, *overrides), env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def start_train(workdir, *overrides: str) -> subprocess.Popen:
    """Starts the trainer in the background (stdout/stderr to WORKDIR.log)."""
    log = open(f"{workdir}.log", "w")
    return subprocess.Popen(train_command(workdir, *overrides), env=cpu_env(), stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)


def metrics(workdir) -> list[dict]:
    """Rows of WORKDIR/metrics.jsonl (empty if absent)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):  # a line still being written is skipped
            rows.append(json.loads(line))
    return rows


def losses(workdir) -> dict[int, float]:
    """step -> loss, checking that no step appears twice."""
    rows = metrics(workdir)
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {row["step"]: row["loss"] for row in rows}


def wait_for_step(process: subprocess.Popen, workdir, step: int, timeout: float = 300) -> None:
    """Blocks until metrics.jsonl reaches `step` (fails if the process dies first)."""
    deadline = time.monotonic() + timeout
    while not metrics(workdir) or metrics(workdir)[-1]["step"] < step:
        assert process.poll() is None, f"trainer exited early: {Path(f'{workdir}.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout}s"
        time.sleep(0.05)


def checkpoint_steps(workdir) -> list[int]:
    """Complete checkpoint steps in WORKDIR/checkpoints."""
    directory = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []
