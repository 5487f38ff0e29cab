"""Reading a training run's workdir from outside the trainer: config, checkpoints, parameters.

Services that use a trained model (the VQGAN tokenizer, the retrieval encoder, later the
sampler) read WORKDIR/config.json for the architecture and restore only the arrays they
need from WORKDIR/checkpoints/<step>/state with an Orbax *partial* restore
(`PyTreeRestore(item=..., partial_restore=True)`): optimiser states, other models and the
data iterator in the checkpoint are never read, so their structure need not be known.
The target is checked against the checkpoint's metadata first, so a checkpoint of another
architecture fails in one clear line instead of deep inside Orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from cm3jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"  # the train-state item of a cm3jax.train.checkpoint.Checkpointer step


def checkpoint_steps(workdir: str) -> list[int]:
    """Complete checkpoint steps in WORKDIR/checkpoints, ascending.

    Orbax writes a step into a temporary directory and renames it to `<step>` when it is
    complete, so only all-digit directory names holding a `state` item count.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name, STATE_ITEM)))


def read_config(workdir: str, what: str) -> dict:
    """WORKDIR/config.json as a dict; UserError naming `what` the run should be."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: not a {what} workdir")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON config object")
    return config


def read_section(workdir: str, section: str, what: str) -> dict:
    """`config[section]` of WORKDIR/config.json; UserError naming `what` the run should be."""
    config = read_config(workdir, what)
    if not isinstance(config.get(section), dict):
        raise UserError(f"{os.path.join(workdir, CONFIG_FILE)} has no '{section}' section: not a {what} workdir")
    return config[section]


def state_path(workdir: str, step: int | None, what: str) -> tuple[int, str]:
    """(step, WORKDIR/checkpoints/<step>/state) of the newest complete checkpoint, or of `step`."""
    if not os.path.isdir(workdir):
        raise UserError(f"{what} workdir {workdir} does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise UserError(f"{workdir} has no complete checkpoint in {CHECKPOINT_DIR}/")
    if step is None:
        step = steps[-1]
    elif int(step) not in steps:
        raise UserError(f"{workdir} has no checkpoint at step {step} (steps: {steps})")
    return int(step), os.path.join(workdir, CHECKPOINT_DIR, str(int(step)), STATE_ITEM)


def restore_arrays(path: str, item: dict, what: str, section: str) -> dict:
    """The arrays of `item` (nested dicts of ShapeDtypeStructs with shardings) from a state dir.

    `what` names the model in errors and `section` the config section its shapes come from.

    Raises:
      UserError: an array of `item` is missing from the checkpoint or has another shape,
        or the checkpoint cannot be read.
    """
    path = os.path.abspath(path)  # Orbax's OCDBT reader refuses relative paths
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            _check_against_metadata(item, checkpointer.metadata(path), path, what, section)
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot restore the {what} ({type(e).__name__}: {e})") from e


def on_first_device(tree: Any) -> Any:
    """Abstract arrays like `tree`'s leaves, placed on the first local device."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _flat(tree: Any) -> dict[str, Any]:
    """Nested dicts -> {'a.b.0.c': leaf} (keys as strings, like Orbax's parameter names)."""
    if not isinstance(tree, dict):
        return {"": tree}
    return {f"{k}.{sub}" if sub else str(k): leaf
            for k, v in tree.items() for sub, leaf in _flat(v).items()}


def _check_against_metadata(item: Any, metadata: Any, where: str, what: str, section: str) -> None:
    """UserError naming the arrays of `item` missing from the checkpoint or of another shape."""
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    saved = _flat(tree) if isinstance(tree, dict) else {}
    problems = []
    for name, want in _flat(item).items():
        if name not in saved:
            problems.append(f"{name} missing")
        elif tuple(saved[name].shape) != tuple(want.shape):
            problems.append(f"{name} has shape {tuple(saved[name].shape)}, "
                            f"config.{section} needs {tuple(want.shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{where} does not hold this config.{section}'s {what}: "
                        + "; ".join(problems[:3]) + more)
