"""Orbax checkpoints: train state, every host's Grain iterator state, config and vocab.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Saves are asynchronous and
atomic (Orbax writes to a temporary directory and renames it when complete), so a
process killed mid-save leaves only a temporary directory that restore ignores. The
state is restored onto whatever mesh the new run has: Orbax reads each array straight
into the target sharding.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from cm3jax.errors import UserError
from cm3jax.vocab import Vocab


class CheckpointMismatchError(UserError):
    """The checkpoint in the workdir was written by an incompatible config or vocab."""


class Checkpointer:
    """Saves and restores train checkpoints in WORKDIR/checkpoints."""

    def __init__(self, workdir: str, ckpt_config: ml_collections.ConfigDict):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_config.keep,
            enable_async_checkpointing=ckpt_config.async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """Newest complete checkpoint step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, meta: dict, force: bool = False) -> bool:
        """Starts an (async) save of the state, the data iterator and the meta JSON."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iterator, meta: dict) -> Any:
        """Restores step `step` into `abstract_state`'s shardings and `data_iterator` in place.

        Raises:
          CheckpointMismatchError: if the checkpoint's vocab or model shapes differ from `meta`'s.
        """
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_compatible(saved, meta, os.path.join(self.directory, str(step)))
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored["state"]

    def wait(self) -> None:
        """Blocks until pending async saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def make_meta(config: ml_collections.ConfigDict, vocab: Vocab, shapes: dict) -> dict:
    """The JSON item saved with every checkpoint.

    Args:
      shapes: the config values that fix parameter shapes (from the task), e.g.
        {"model.d_model": 1024, ...}; a checkpoint whose values differ cannot be restored.
    """
    return {"config": config.to_dict(), "vocab": vocab.to_dict(), "shapes": shapes}


def check_compatible(saved: dict, current: dict, where: str) -> None:
    """Raises CheckpointMismatchError naming what differs between a checkpoint and this run."""
    try:
        Vocab.from_dict(current["vocab"]).check_same(Vocab.from_dict(saved["vocab"]), what=f"checkpoint {where}")
    except UserError as e:
        raise CheckpointMismatchError(str(e)) from None
    ours = json.loads(json.dumps(current["shapes"]))  # as saved: tuples become lists
    diffs = [
        f"{k}: {saved['shapes'].get(k)} in checkpoint vs {v} here"
        for k, v in ours.items()
        if saved["shapes"].get(k) != v
    ]
    if diffs:
        raise CheckpointMismatchError(f"checkpoint {where} has another model shape: " + "; ".join(diffs))
    # Frozen parameters keep no optimizer state (cm3jax.train.optim), so the state's layout depends on them.
    theirs, ours = (list(meta["config"].get("freeze", ())) for meta in (saved, current))
    if theirs != ours:
        raise CheckpointMismatchError(
            f"checkpoint {where} was trained with config.freeze={theirs}, this run has {ours}: its optimizer "
            "state does not fit; keep config.freeze, or fine-tune in a new workdir with config.init_from")
