"""The 'retriever' task end to end: CLI training on a 2x2x2 mesh, exact resume, shardings, errors.

Everything runs on a tiny palette-tokenized shapes set (16x16 codes per image, 16 codes), so
no trained VQGAN is needed. The two CLI trainings share a persistent XLA compilation cache
(a fresh one per module), so only the first one compiles.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import train_cli as cli
from conftest import PALETTE_RETRIEVER_OVERRIDES, REPO_ROOT, experiment_config, prepare_palette_shapes
from cm3jax.config import validate
from cm3jax.errors import ConfigError
from cm3jax.train import partitioning, tasks

RETRIEVER_EXPERIMENT = str(REPO_ROOT / "experiments" / "shapes_retriever.py")
BATCH = 16
STEPS = 40
# experiments/shapes_retriever.py's towers (2 layers, width 64) on the palette codes, 16 pairs per
# step on a data=2 x fsdp=2 x tensor=2 mesh; eval (both validation batches) and a checkpoint
# every 20 steps. The LR schedule is pinned to STEPS so a shorter run is a prefix of a longer one.
TINY = {
    **PALETTE_RETRIEVER_OVERRIDES,
    "data.global_batch_size": BATCH,
    "total_steps": STEPS,
    "optim.schedule_steps": STEPS,
    "optim.warmup_steps": 5,
    "optim.learning_rate": 3e-3,
    "eval_every": 20,
    "eval_steps": 2,
    "log_every": 10,
    "checkpoint.every_steps": 20,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """96 train / 32 validation palette shapes records."""
    return prepare_palette_shapes(tmp_path_factory.mktemp("shapes"), 96, 32, per_shard=32)


def _config(prepared, **overrides):
    return experiment_config("shapes_retriever", {**TINY, "data.source": f"prepared:{prepared}", **overrides})


# --- in process: shardings and config errors ---------------------------------------------


def test_parameters_and_state_are_sharded_by_the_rules_table(prepared):
    config = _config(prepared)
    mesh_shape = validate(config, jax.device_count())
    assert mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
    task = tasks.create(config, partitioning.make_mesh(mesh_shape))

    # The text tower's MLP fc1 kernel [layers, embed, mlp]: embed over fsdp, mlp over tensor.
    fc1 = ("text", "encoder", "layers", "fc1", "kernel")
    expected = {
        fc1: PartitionSpec(None, "fsdp", "tensor"),
        ("vision", "encoder", "layers", "fc2", "kernel"): PartitionSpec(None, "tensor", "fsdp"),
        ("text", "token_embedding"): PartitionSpec("tensor", "fsdp"),  # vocab over tensor
        ("logit_scale",): PartitionSpec(),
    }

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    for path, spec in expected.items():
        assert at(task.spec.shardings["params"], path).spec == spec, path
    assert partitioning.logical_spec(("layers", "embed", "mlp")) == expected[fc1]

    state = task.spec.init()
    kernel = at(state["params"], fc1)
    assert kernel.shape == (2, 64, 256)
    assert kernel.sharding == NamedSharding(task.mesh, expected[fc1])
    assert len(kernel.addressable_shards) == 8
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(2, 32, 128)}
    # Every parameter and Adam moment lands on the sharding the spec promises.
    for array, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(task.spec.shardings)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), (array.shape, array.sharding, sharding)
    adam = next(s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda s: hasattr(s, "mu"))
                if hasattr(s, "mu"))
    assert at(adam.mu, fc1).sharding == kernel.sharding and at(adam.nu, fc1).sharding == kernel.sharding

    # A batch: caption ids, their mask and the 16x16 code grid, split over data x fsdp.
    batch = task.global_batch(next(iter(task.dataset("train", 0, 1))))
    assert batch["codes"].shape == (BATCH, 16, 16) and batch["text_ids"].shape == (BATCH, 48)
    assert batch["text_mask"].shape == (BATCH, 48)
    codes, ids, mask = (np.asarray(batch[k]) for k in ("codes", "text_ids", "text_mask"))
    assert 0 <= codes.min() and codes.max() < 16 and 0 <= ids.min() and ids.max() < 512
    assert np.all(mask.sum(1) > 0) and np.all(ids[mask == 0] == 0)
    assert all(batch[k].sharding.spec[0] == partitioning.BATCH_AXES for k in batch)


@pytest.mark.parametrize("overrides, field, message", [
    pytest.param({"optim.grad_accum_steps": 2}, "optim.grad_accum_steps", "must be 1 for the retriever",
                 id="grad_accum"),
    pytest.param({"retriever.code_grid": 32}, "retriever.code_grid",
                 "32 but the prepared images in .* are 16x16 codes", id="code_grid"),
    pytest.param({"retriever.text_vocab_size": 100}, "retriever.text_vocab_size",
                 "100 is smaller than vocab.text_size=512", id="text_vocab_size"),
    pytest.param({"retriever.codebook_size": 8}, "retriever.codebook_size",
                 "8 is smaller than vocab.image_codes=16", id="codebook_size"),
])
def test_config_errors_name_the_field(prepared, overrides, field, message):
    config = _config(prepared, **overrides)
    mesh = partitioning.make_mesh(validate(config, jax.device_count()))
    with pytest.raises(ConfigError, match=f"^config\\.{field}: {message}") as error:
        tasks.create(config, mesh)
    assert error.value.field == field


def test_dimension_that_does_not_divide_the_mesh_names_the_field(prepared):
    config = _config(prepared, **{"retriever.text_vocab_size": 513})  # (vocab, embed) -> (tensor, fsdp)
    mesh = partitioning.make_mesh(validate(config, jax.device_count()))
    with pytest.raises(ConfigError, match=r"^config\.retriever\.text_vocab_size: 513 is not divisible by "
                                          r"mesh\.tensor=2"):
        tasks.create(config, mesh)


def test_missing_retriever_section_is_refused_by_validate(prepared):
    config = _config(prepared)  # a fresh copy
    del config["retriever"]
    with pytest.raises(ConfigError, match=r"^config\.retriever: missing: config\.task='retriever' needs"):
        validate(config, jax.device_count())


# --- the CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """8 fake devices, and a compilation cache shared by this module's runs (every entry kept)."""
    return cli.cpu_env() | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _train(env, workdir, source, *extra) -> subprocess.CompletedProcess:
    flags = [f"--config.{key}={value}" for key, value in TINY.items()]
    return subprocess.run(
        [sys.executable, "-m", "cm3jax.train", f"--config={RETRIEVER_EXPERIMENT}", f"--workdir={workdir}",
         *flags, f"--config.data.source={source}", *extra],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def straight_run(prepared, cli_env, tmp_path_factory):
    """The reference: STEPS steps in one go."""
    workdir = tmp_path_factory.mktemp("retriever") / "run"
    result = _train(cli_env, workdir, f"prepared:{prepared}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_cli_trains_evaluates_and_loss_falls(straight_run):
    rows = cli.metrics(straight_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "text_to_image_loss", "image_to_text_loss", "text_to_image_accuracy",
                "image_to_text_accuracy", "logit_scale", "grad_norm", "lr", "pairs_per_sec", "mfu",
                "bad_records"):
        assert all(key in r for r in rows), key
    eval_keys = ("eval_loss", "eval_text_to_image_recall_at_1", "eval_image_to_text_recall_at_1")
    assert [r["step"] for r in rows if "eval_loss" in r] == [20, 40]
    for row in (rows[19], rows[39]):
        assert all(key in row for key in eval_keys)
        assert np.isfinite(row["eval_loss"]) and all(0 <= row[k] <= 1 for k in eval_keys[1:])
    assert all(0 < r["logit_scale"] <= 100 and r["pairs_per_sec"] > 0 for r in rows)
    assert all(0 <= r["text_to_image_accuracy"] <= 1 for r in rows)

    # Chance is log(16) = 2.77 nats; 40 steps take the training loss ~1 nat below the first steps
    # (first 5 ~2.94, last 5 ~1.98) and the held-out loss below chance (~2.30).
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.4 and last < math.log(BATCH) - 0.3, (first, last)
    assert rows[-1]["eval_loss"] < math.log(BATCH), rows[-1]["eval_loss"]

    assert cli.checkpoint_steps(straight_run) == [20, 40]
    # The workdir is self-contained for cm3jax.retrieval.build: config, vocab, the text tokenizer.
    for name in ("config.json", "vocab.json", "tokenizer.model"):
        assert (straight_run / name).exists(), name


@pytest.mark.slow
def test_resume_from_the_middle_is_bit_identical(straight_run, prepared, cli_env, tmp_path):
    # What a run killed after its step-20 checkpoint leaves; the rerun must redo 21..40 exactly.
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "40")
    result = _train(cli_env, workdir, f"prepared:{prepared}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint step 20" in result.stderr
    assert cli.losses(workdir) == cli.losses(straight_run)
    resumed, straight = cli.metrics(workdir)[-1], cli.metrics(straight_run)[-1]
    for key in ("eval_loss", "eval_text_to_image_recall_at_1", "logit_scale", "grad_norm"):
        assert resumed[key] == straight[key], key
    assert cli.checkpoint_steps(workdir) == [20, 40]


@pytest.mark.slow
def test_cli_refuses_synthetic_data_in_one_line(tmp_path, cli_env):
    result = _train(cli_env, tmp_path / "run", "synthetic")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: config.data.source: the retriever trains on caption/image pairs of prepared data: "
        "set it to prepared:DIR (written by cm3jax.data.prepare)")
