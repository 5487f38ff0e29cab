"""`config.init_from` (fine-tune from another run's parameters) and `config.freeze`."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import train_cli as cli
from conftest import tiny_config
from cm3jax import runs
from cm3jax.config import validate
from cm3jax.data.pipeline import make_dataset
from cm3jax.errors import ConfigError
from cm3jax.train import init_from, partitioning, tasks
from cm3jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from cm3jax.train.loop import train

PRETRAIN_STEPS = 4


def _task(config) -> tasks.Task:
    return tasks.create(config, partitioning.make_mesh(validate(config, jax.device_count())))


def _final_state(workdir, config) -> dict:
    """The full train state of `workdir`'s newest checkpoint, restored with the trainer's Checkpointer."""
    task = _task(config)
    checkpointer = Checkpointer(str(workdir), config.checkpoint)
    try:
        return checkpointer.restore(checkpointer.latest_step(), task.spec.abstract,
                                    iter(make_dataset(config, "train", 0, 1)), task.meta())
    finally:
        checkpointer.close()


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _pretrain_config(**overrides):
    return tiny_config({"total_steps": PRETRAIN_STEPS, "checkpoint.every_steps": PRETRAIN_STEPS,
                        "eval_every": 0, "log_every": PRETRAIN_STEPS, "optim.warmup_steps": 1, **overrides})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(workdir, its final params): a tiny run trained PRETRAIN_STEPS steps on one mesh."""
    workdir = tmp_path_factory.mktemp("pretrained") / "run"
    config = _pretrain_config()
    train(config, str(workdir))
    return workdir, _final_state(workdir, config)["params"]


def _fine_tune_config(pretrained_dir, **overrides):
    # Another mesh than the pretraining run: the parameters are resharded as they are read.
    return _pretrain_config(**{"init_from": str(pretrained_dir), "mesh.fsdp": 2, "mesh.tensor": 2,
                               "optim.learning_rate": 5e-5, **overrides})


def _initial_state(config) -> tuple[tasks.Task, dict]:
    """What the trainer starts a fresh init_from run with."""
    task = _task(config)
    source = init_from.source(config, latest_step=None)
    return task, init_from.with_params(task.spec.init(), source, task.spec.abstract["params"])


def test_fresh_run_starts_from_the_final_params_with_a_fresh_optimizer(pretrained):
    workdir, params = pretrained
    task, state = _initial_state(_fine_tune_config(workdir))
    assert int(state["step"]) == 0
    want, got = _flat(params), _flat(state["params"])
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    for leaf, sharding in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(task.spec.param_shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    adam = state["opt_state"][1][0]
    assert int(adam.count) == 0
    for moment in jax.tree.leaves((adam.mu, adam.nu)):
        assert not np.asarray(moment).any()


def test_converted_checkpoint_with_params_only_works(pretrained, tmp_path):
    """What `cm3jax.interop.convert --from=hf` writes: config, vocab and checkpoints/0/state = {'params'}."""
    workdir, params = pretrained
    converted = tmp_path / "converted"
    converted.mkdir()
    for name in (runs.CONFIG_FILE, "vocab.json"):
        shutil.copyfile(workdir / name, converted / name)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(str(converted / runs.CHECKPOINT_DIR / "0" / runs.STATE_ITEM), {"params": params})
    _, state = _initial_state(_fine_tune_config(converted))
    restored = _flat(state["params"])
    for name, value in _flat(params).items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_resuming_wins_over_init_from(pretrained):
    assert init_from.source(_fine_tune_config(pretrained[0]), latest_step=3) is None


@pytest.mark.parametrize("overrides, expected", [
    ({"model.d_model": 128}, ["model.d_model is 64 there, 128 here"]),
    ({"model.num_layers": 3, "model.activation": "swiglu"},
     ["model.num_layers is 2 there, 3 here", "model.activation is gelu there, swiglu here"]),
    ({"vocab.text_size": 300},
     ["vocab.text_size is 200 there, 300 here", "model.vocab_size is 256 there, 384 here"]),
])
def test_another_model_or_vocab_is_refused_naming_every_field(pretrained, tmp_path, overrides, expected):
    config = _fine_tune_config(pretrained[0], **overrides)
    with pytest.raises(ConfigError, match=r"^config\.init_from: .* holds another model: ") as error:
        train(config, str(tmp_path / "run"))
    for difference in expected:
        assert difference in str(error.value)


def test_fields_that_keep_the_parameters_may_differ(pretrained):
    config = _fine_tune_config(pretrained[0], **{"model.dtype": "bfloat16", "model.remat_policy": "full",
                                                 "model.scan_layers": False, "model.init_std": 0.02})
    assert init_from.source(config, latest_step=None).step == PRETRAIN_STEPS


def _without_checkpoints(pretrained_dir, tmp_path):
    directory = tmp_path / "no_checkpoints"
    directory.mkdir()
    for name in (runs.CONFIG_FILE, "vocab.json"):
        shutil.copyfile(pretrained_dir / name, directory / name)
    return directory


def _vqgan_run(pretrained_dir, tmp_path):
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps({"task": "vqgan"}))
    return tmp_path


@pytest.mark.parametrize("make, expected", [
    (lambda pretrained_dir, tmp: tmp / "missing", "does not exist"),
    (lambda pretrained_dir, tmp: tmp, "config.json does not exist"),
    (_without_checkpoints, "has no complete checkpoint"),
    (_vqgan_run, "is a 'vqgan' run, not an LM"),
])
def test_missing_or_empty_init_from_is_named(pretrained, tmp_path, make, expected):
    directory = make(pretrained[0], tmp_path)
    with pytest.raises(ConfigError, match=rf"^config\.init_from: .*{expected}") as error:
        init_from.source(_fine_tune_config(directory), latest_step=None)
    assert str(directory) in str(error.value)


def test_init_from_is_refused_for_other_tasks(pretrained):
    config = tiny_config({"task": "vqgan", "init_from": str(pretrained[0])})
    with pytest.raises(ConfigError, match=r"^config\.init_from: only config\.task='lm'"):
        validate(config, jax.device_count())


def test_unknown_freeze_prefix_is_named(pretrained):
    with pytest.raises(ConfigError, match=r"^config\.freeze: 'embedding' matches no parameter \(parameters: "
                                          r"blocks/attention, blocks/mlp, embed, positions\)"):
        _task(_fine_tune_config(pretrained[0], freeze=("embed", "embedding")))


def test_frozen_parameters_keep_no_optimizer_moments(pretrained):
    spec = _task(_fine_tune_config(pretrained[0], freeze=("embed", "blocks/attention"))).spec
    leaves = jax.tree_util.tree_leaves_with_path(spec.abstract["opt_state"])
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    moments = [name for name in names if "'blocks'" in name or "'embed'" in name]
    assert moments and all("'mlp'" in name for name in moments), moments


def test_resuming_with_another_freeze_is_refused(pretrained):
    with pytest.raises(CheckpointMismatchError,
                       match=r"trained with config\.freeze=\[\], this run has \['embed'\]"):
        _final_state(pretrained[0], _pretrain_config(freeze=("embed",)))


@pytest.mark.slow
def test_cli_fine_tunes_with_frozen_embeddings(pretrained, tmp_path):
    """Through `python -m cm3jax.train`: the flags are wired, the run trains, `embed` stays bit-identical."""
    pretrained_dir, params = pretrained
    workdir = tmp_path / "sft"
    result = cli.run_train(workdir, f"--config.init_from={pretrained_dir}", "--config.freeze=embed",
                           "--config.total_steps=3", "--config.optim.schedule_steps=3",
                           "--config.checkpoint.every_steps=3",
                           "--config.optim.learning_rate=1e-2", "--config.optim.warmup_steps=1",
                           "--config.model.position=learned")  # as tiny_config (the CLI's tiny_lm uses RoPE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised parameters from {pretrained_dir} step {PRETRAIN_STEPS}" in result.stderr
    assert [row["step"] for row in cli.metrics(workdir)] == [1, 2, 3]
    assert json.loads((workdir / "config.json").read_text())["freeze"] == ["embed"]
    tuned = _flat(_final_state(workdir, _fine_tune_config(pretrained_dir, freeze=("embed",)))["params"])
    before = _flat(params)
    np.testing.assert_array_equal(tuned["['embed']"], before["['embed']"])
    for name in before:
        if name != "['embed']":
            assert not np.array_equal(tuned[name], before[name]), f"{name} did not train"
