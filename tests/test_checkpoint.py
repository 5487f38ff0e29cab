"""Checkpoint round trip (state + data iterator + meta) and restore onto another mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import train_cli as cli
from conftest import tiny_config
from cm3jax.config import validate
from cm3jax.data.pipeline import make_dataset
from cm3jax.train import partitioning
from cm3jax.train import tasks
from cm3jax.train.checkpoint import CheckpointMismatchError, Checkpointer


def _task(config):
    return tasks.create(config, partitioning.make_mesh(validate(config, jax.device_count())))


def test_round_trip_restores_state_and_iterator_onto_another_mesh(tmp_path):
    saved_config = tiny_config({"mesh.fsdp": 4, "mesh.tensor": 1})
    saved_task = _task(saved_config)
    state = saved_task.spec.init()
    iterator = iter(make_dataset(saved_config, "train", 0, 1))
    for _ in range(3):
        next(iterator)
    reference = iter(make_dataset(saved_config, "train", 0, 1))
    expected_next = [next(reference) for _ in range(4)][-1]

    checkpointer = Checkpointer(str(tmp_path), saved_config.checkpoint)
    checkpointer.save(3, state, iterator, saved_task.meta())
    checkpointer.close()

    new_config = tiny_config({"mesh.fsdp": 2, "mesh.tensor": 2})
    new_task = _task(new_config)
    new_spec = new_task.spec
    new_iterator = iter(make_dataset(new_config, "train", 0, 1))
    restorer = Checkpointer(str(tmp_path), new_config.checkpoint)
    assert restorer.latest_step() == 3
    restored = restorer.restore(3, new_spec.abstract, new_iterator, new_task.meta())
    restorer.close()

    for old, new, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(restored),
                                  jax.tree.leaves(new_spec.shardings)):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
        assert new.sharding.is_equivalent_to(sharding, new.ndim)
    query = restored["params"]["blocks"]["attention"]["query"]
    assert query.sharding.spec == partitioning.logical_spec(("layers", "embed", "heads", "kv"))
    assert query.sharding.mesh.shape["tensor"] == 2
    # The data iterator continues where the saved one was.
    np.testing.assert_array_equal(next(new_iterator)["inputs"], expected_next["inputs"])


def test_restore_refuses_another_model_shape(tmp_path):
    config = tiny_config()
    task = _task(config)
    checkpointer = Checkpointer(str(tmp_path), config.checkpoint)
    checkpointer.save(1, task.spec.init(), iter(make_dataset(config, "train", 0, 1)), task.meta())
    checkpointer.close()

    wider = _task(tiny_config({"model.d_model": 128}))
    with pytest.raises(CheckpointMismatchError, match=r"model.d_model: 64 in checkpoint vs 128 here"):
        Checkpointer(str(tmp_path), wider.config.checkpoint).restore(
            1, wider.spec.abstract, iter(make_dataset(wider.config, "train", 0, 1)), wider.meta())


@pytest.mark.slow
def test_cli_resume_on_another_mesh_continues_the_same_run(tmp_path):
    """Saved with fsdp=4, resumed with tensor=2 x fsdp=2: same losses up to float reordering."""
    fsdp4 = ("--config.mesh.fsdp=4", "--config.mesh.tensor=1")
    straight, resharded = tmp_path / "straight", tmp_path / "resharded"
    assert cli.run_train(straight, *fsdp4).returncode == 0
    assert cli.run_train(resharded, *fsdp4, "--config.total_steps=10").returncode == 0
    result = cli.run_train(resharded, "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint step 10" in result.stderr
    a, b = cli.losses(straight), cli.losses(resharded)
    assert a.keys() == b.keys()
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-4)
