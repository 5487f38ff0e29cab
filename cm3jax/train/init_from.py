"""`config.init_from=DIR`: start an LM run from another LM run's parameters (fine-tuning).

The new run gets a fresh optimizer (step 0, zero moments, its own LR schedule) and the
parameters of DIR's newest complete checkpoint, restored straight into this run's
shardings with an Orbax partial restore (`runs.restore_arrays`): DIR's optimizer state
and data iterator are never read, so a converted checkpoint holding only `{"params"}`
(`cm3jax.interop.convert --from=hf`) works as well as a cm3jax training run.

Before anything compiles, DIR's vocab.json and config.json `model` section are compared
with this config's; every field that differs is named in one ConfigError. Only fields
that change neither the parameters nor the function they compute may differ
(`FREE_MODEL_FIELDS`: compute dtype, remat, scan, attention kernel, init). Once this
workdir holds a checkpoint, resuming it wins and init_from is ignored.

CM3leon's supervised fine-tuning uses peak LR 5e-5 with 150 warmup steps: experiment
files set `optim.learning_rate=5e-5` and `optim.warmup_steps=150` themselves.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import ml_collections
from absl import logging

from cm3jax import runs
from cm3jax import vocab as vocab_lib
from cm3jax.errors import ConfigError, UserError
from cm3jax.interop.convert import CHAMELEON_CONFIG, CHAMELEON_VOCAB
from cm3jax.train.state import model_config

WHAT = "cm3jax LM"
# Architecture fields that may differ between DIR and this run: they only choose how the same
# function is computed, or how fresh parameters would have been initialised.
# Everything else must match, max_len included (even with RoPE, where it sizes no parameter).
FREE_MODEL_FIELDS = ("init_std", "pos_init_std", "zero_init_output", "dtype", "param_dtype", "scan_layers",
                     "remat_policy", "attention_impl")


@dataclasses.dataclass(frozen=True)
class Source:
    """The checkpoint a run starts from."""

    workdir: str
    step: int
    state_path: str  # DIR/checkpoints/<step>/state


def source(config: ml_collections.ConfigDict, latest_step: int | None) -> Source | None:
    """The checkpoint `config.init_from` names, checked against this config; None when there is
    nothing to initialise from (no init_from, or this workdir resumes from `latest_step`).

    Raises:
      ConfigError: init_from is not an LM workdir with a checkpoint, or holds another vocab or model.
    """
    if not config.init_from:
        return None
    if latest_step is not None:
        logging.info("config.init_from=%s ignored: resuming this workdir's checkpoint step %d",
                     config.init_from, latest_step)
        return None
    directory = config.init_from
    if not os.path.isdir(directory):
        raise ConfigError("init_from", f"{directory} does not exist")
    vocab_path = os.path.join(directory, "vocab.json")
    try:
        theirs = ml_collections.ConfigDict(runs.read_config(directory, WHAT))
        if theirs.get("task", "lm") != "lm":
            raise UserError(f"{directory} is a '{theirs.task}' run, not an LM (config.task='lm')")
        if not os.path.isfile(vocab_path):
            raise UserError(f"{vocab_path} does not exist: not a {WHAT} workdir")
        their_vocab = vocab_lib.Vocab.load(vocab_path)
        step, path = runs.state_path(directory, None, WHAT)
    except UserError as e:
        raise ConfigError("init_from", str(e)) from None
    differences = mismatches(config, theirs, their_vocab)
    if differences:
        raise ConfigError("init_from", f"{directory} holds another model: " + "; ".join(differences))
    return Source(directory, step, path)


def mismatches(config: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict,
               their_vocab: vocab_lib.Vocab) -> list[str]:
    """'section.field is X there, Y here' for every vocab field and non-free model field that differs."""
    ours_vocab = vocab_lib.from_config(config.vocab)
    return (_differences("vocab", dataclasses.asdict(their_vocab), dataclasses.asdict(ours_vocab))
            + _differences("model", _architecture(theirs), _architecture(config)))


def _architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The resolved model fields (-1 defaults filled in) that parameters depend on."""
    fields = dataclasses.asdict(model_config(config))
    return {k: v for k, v in fields.items() if k not in FREE_MODEL_FIELDS}


def _differences(section: str, theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    return [f"{section}.{k} is {theirs[k]} there, {v} here" for k, v in ours.items() if theirs[k] != v]


def with_params(state: dict, source: Source, abstract_params: Any) -> dict:
    """A fresh train `state` whose params are replaced by `source`'s, restored into `abstract_params`'
    shapes, dtypes and shardings. `state`'s own parameter arrays are deleted first.

    Raises:
      ConfigError: the checkpoint lacks a parameter or holds one of another shape.
    """
    for array in jax.tree.leaves(state["params"]):
        array.delete()  # the fresh parameters are replaced: free them before the restore allocates
    try:
        params = runs.restore_arrays(source.state_path, {"params": abstract_params}, WHAT, "model")["params"]
    except UserError as e:
        raise ConfigError("init_from", str(e)) from None
    logging.info("initialised parameters from %s step %d", source.workdir, source.step)
    return {**state, "params": params}


def carry_id_map(source: Source, workdir: str) -> None:
    """Copies what `source` knows about where its ids came from (a converted Chameleon's id map
    and config) into `workdir`, so the fine-tuned model exports back to Chameleon's ids."""
    if jax.process_index() != 0:
        return
    for name in (CHAMELEON_VOCAB, CHAMELEON_CONFIG):
        if os.path.isfile(os.path.join(source.workdir, name)):
            shutil.copyfile(os.path.join(source.workdir, name), os.path.join(workdir, name))
