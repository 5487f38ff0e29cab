"""`--dry_run`: the paper's model shapes, FLOPs/token and per-device memory, from shapes only."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, experiment_config
from cm3jax.train import dry_run


@pytest.mark.parametrize(
    "name, params, layers, d_model",
    [("cm3leon_350m", 372_375_552, 24, 1024), ("cm3leon_760m", 785_055_744, 24, 1536),
     ("cm3leon_7b", 6_723_993_600, 32, 4096)],
)
def test_paper_shapes(name, params, layers, d_model):
    config = experiment_config(name)
    assert (config.model.num_layers, config.model.d_model, config.data.seq_len) == (layers, d_model, 4096)
    report = dry_run.describe(config, num_devices=256)
    assert report["params"] == params
    # Blocks: 12 d^2 per layer (4 attention + 8 MLP); embed: padded vocab x d; positions: 4096 x d.
    assert report["params_by_group"]["blocks"] == 12 * layers * d_model**2
    assert report["params_by_group"]["positions"] == 4096 * d_model
    assert report["flops_per_token"] > 6 * params * 0.9
    assert report["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
    # Params are fully sharded over 256 devices: f32 bytes / 256 (up to padding of small dims).
    assert report["per_device_gib"]["params"] == pytest.approx(params * 4 / 256 / 2**30, rel=0.02)
    assert report["per_device_gib"]["optimizer"] == pytest.approx(2 * report["per_device_gib"]["params"], rel=0.01)


def test_cli_dry_run_prints_report_and_json():
    result = subprocess.run(
        [sys.executable, "-m", "cm3jax.train", f"--config={REPO_ROOT}/experiments/cm3leon_350m.py",
         "--dry_run", "--dry_run_devices=16", "--config.mesh.tensor=2"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "parameters:       372,375,552" in result.stdout
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 2}
