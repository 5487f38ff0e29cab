"""Checkpoint round trip (state + data iterator + meta) and restore onto another mesh."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import train_cli as cli
from conftest import tiny_config
from cm3jax import vocab as vocab_lib
from cm3jax.config import validate
from cm3jax.data.pipeline import make_dataset
from cm3jax.train import partitioning
from cm3jax.train.checkpoint import CheckpointMismatchError, Checkpointer, make_meta
from cm3jax.train.state import build_state_spec


def _spec(config):
    mesh = partitioning.make_mesh(validate(config, jax.device_count()))
    return build_state_spec(config, mesh)


def test_round_trip_restores_state_and_iterator_onto_another_mesh(tmp_path):
    saved_config = tiny_config({"mesh.fsdp": 4, "mesh.tensor": 1})
    vocab = vocab_lib.from_config(saved_config.vocab)
    spec = _spec(saved_config)
    state = spec.init()
    iterator = iter(make_dataset(saved_config, "train", 0, 1))
    for _ in range(3):
        next(iterator)
    reference = iter(make_dataset(saved_config, "train", 0, 1))
    expected_next = [next(reference) for _ in range(4)][-1]

    checkpointer = Checkpointer(str(tmp_path), saved_config.checkpoint)
    checkpointer.save(3, state, iterator, make_meta(saved_config, vocab, spec.model_config.vocab_size))
    checkpointer.close()

    new_config = tiny_config({"mesh.fsdp": 2, "mesh.tensor": 2})
    new_spec = _spec(new_config)
    new_iterator = iter(make_dataset(new_config, "train", 0, 1))
    restorer = Checkpointer(str(tmp_path), new_config.checkpoint)
    assert restorer.latest_step() == 3
    restored = restorer.restore(3, new_spec.abstract, new_iterator, new_config, vocab)
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
    vocab = vocab_lib.from_config(config.vocab)
    spec = _spec(config)
    checkpointer = Checkpointer(str(tmp_path), config.checkpoint)
    checkpointer.save(1, spec.init(), iter(make_dataset(config, "train", 0, 1)),
                      make_meta(config, vocab, spec.model_config.vocab_size))
    checkpointer.close()

    wider = tiny_config({"model.d_model": 128})
    with pytest.raises(CheckpointMismatchError, match=r"model.d_model: 64 in checkpoint vs 128 here"):
        Checkpointer(str(tmp_path), wider.checkpoint).restore(
            1, _spec(wider).abstract, iter(make_dataset(wider, "train", 0, 1)), wider, vocab)


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
