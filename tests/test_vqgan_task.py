"""The 'vqgan' task in the shared loop: GAN switch-on, code restarts, shardings, exact resume."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_cli as cli
from conftest import REPO_ROOT, experiment_config
from cm3jax.config import validate
from cm3jax.train import partitioning, tasks

VQGAN_EXPERIMENT = str(REPO_ROOT / "experiments" / "shapes_vqgan.py")
TINY = {
    "vqgan.resolution": 32, "prepare.resolution": 32, "vqgan.channel_multipliers": (1, 2),  # 16x16 codes
    "vqgan.base_channels": 8, "vqgan.embed_dim": 8, "vqgan.codebook_size": 32, "vqgan.code_dim": 4,
    "vqgan.norm_groups": 4, "vqgan.disc_channels": 8, "vqgan.disc_layers": 1,
    "vqgan_train.disc_start": 2, "vqgan_train.restart_every": 2,
    "data.global_batch_size": 8, "prepare.shapes_records.train": 64, "prepare.shapes_records.validation": 16,
    "optim.warmup_steps": 0,
}


def _config(**extra):
    return experiment_config("shapes_vqgan", TINY | extra)


def _codebook(state) -> np.ndarray:
    """The codebook: a parameter, or (EMA codebooks) a codebook statistic."""
    quantizer = state["params"]["generator"]["quantizer"]
    return np.asarray(quantizer["codebook"] if "codebook" in quantizer else state["stats"]["quantizer"]["codebook"])


@pytest.fixture(scope="module")
def task_and_steps():
    config = _config()
    mesh = partitioning.make_mesh(validate(config, jax.device_count()))
    task = tasks.create(config, mesh)
    train_step, _ = task.compile()
    return task, train_step


def test_discriminator_waits_for_disc_start_and_codes_restart(task_and_steps):
    task, train_step = task_and_steps
    state = task.spec.init()
    batches = iter(task.dataset("train", 0, 1))
    disc_before = jax.device_get(state["params"]["discriminator"])
    codebook_before = _codebook(state)
    history = []
    for _ in range(4):
        state, metrics = train_step(state, task.global_batch(next(batches)))
        history.append(jax.device_get(metrics))
        if int(state["step"]) == 2:  # steps 0 and 1 ran: before disc_start
            for a, b in zip(jax.tree.leaves(disc_before), jax.tree.leaves(jax.device_get(state["params"]["discriminator"]))):
                np.testing.assert_array_equal(a, b)
    assert history[0]["d_loss"] == 0 and history[1]["g_loss"] == 0
    assert history[2]["d_loss"] > 0 and history[3]["gan_weight"] > 0
    assert all(np.isfinite(h["loss"]) and 0 < h["psnr"] < 100 for h in history)
    # Usage starts at 0, so the first restart (after step 2) re-seeds every code from the batch.
    assert not np.allclose(_codebook(state), codebook_before)


def test_state_shardings_on_8_devices(task_and_steps):
    task, _ = task_and_steps
    state = task.spec.init()
    kernel = state["params"]["generator"]["decoder"]["conv_out"]["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
    batch = task.global_batch(next(iter(task.dataset("train", 0, 1))))
    assert batch["images"].dtype == np.uint8 and batch["images"].shape == (8, 32, 32, 3)
    assert batch["images"].sharding.spec[0] == partitioning.BATCH_AXES


@pytest.mark.slow
def test_cli_trains_evaluates_and_resumes_exactly(tmp_path):
    flags = [f"--config={VQGAN_EXPERIMENT}", "--config.total_steps=4", "--config.optim.schedule_steps=4",
             "--config.checkpoint.every_steps=2", "--config.eval_every=4", "--config.eval_steps=1",
             "--config.log_every=1"] + [f"--config.{k}={v}" for k, v in TINY.items()]

    def run(workdir, *extra):
        result = subprocess.run([sys.executable, "-m", "cm3jax.train", *flags, f"--workdir={workdir}", *extra],
                                env=cli.cpu_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run(tmp_path / "straight")
    run(tmp_path / "resumed", "--config.total_steps=2")
    assert "resuming from checkpoint step 2" in run(tmp_path / "resumed").stderr
    assert cli.losses(tmp_path / "straight") == cli.losses(tmp_path / "resumed")
    last = cli.metrics(tmp_path / "straight")[-1]
    for key in ("psnr", "codebook_usage", "d_loss", "g_loss", "l1", "perplexity", "images_per_sec", "mfu",
                "eval_psnr", "eval_codebook_usage", "eval_codebook_perplexity"):
        assert key in last, key

    # The trained tokenizer is evaluated from its workdir alone.
    result = subprocess.run([sys.executable, "-m", "cm3jax.eval", f"--workdir={tmp_path / 'straight'}",
                             "--task=reconstruction", "--n=16"], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "straight" / "eval" / "reconstruction.json").read_text())
    assert report["num_images"] == 16 and report["step"] == 4
    assert 0 < report["psnr"] < 100 and -1 <= report["ssim"] <= 1 and 0 <= report["oracle_agreement"] <= 1
    assert 0 < report["codebook_usage"] <= 1
    assert (tmp_path / "straight" / "eval" / "reconstruction.png").exists()
