"""The training loop: validate, build the mesh and state, compile once, train, checkpoint.

A run always auto-resumes from the newest complete checkpoint in its workdir, so the
same command starts, resumes after a crash, and resumes after pre-emption. SIGTERM
makes the loop save at the next step boundary and return cleanly (exit code 0). A run
with `config.init_from` and no checkpoint yet starts from another run's parameters
(cm3jax/train/init_from.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cm3jax import config as config_lib
from cm3jax import vocab as vocab_lib
from cm3jax.data.pipeline import check_image_grid, check_prepared_vocab, prepared_dir
from cm3jax.data.prepare import prepare
from cm3jax.models import accounting
from cm3jax.train import init_from, partitioning, tasks
from cm3jax.train import metrics as metrics_lib
from cm3jax.tokenizers.text import TEXT_TOKENIZER_FILES
from cm3jax.train.checkpoint import Checkpointer


class PreemptionFlag:
    """Set by SIGTERM; every host agrees on it before acting (so all save together)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: will save a checkpoint and stop after this step")
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def restore_handler(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


# Files of a prepared data directory that sampling and eval need next to the checkpoints.
TOKENIZER_FILES = (*TEXT_TOKENIZER_FILES, "image_tokenizer.json")


def write_run_files(workdir: str, config: ml_collections.ConfigDict, vocab: vocab_lib.Vocab) -> None:
    """WORKDIR/config.json, vocab.json and the data's tokenizers: the workdir is self-contained."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    vocab.save(os.path.join(workdir, "vocab.json"))
    data_dir = prepared_dir(config)
    for name in TOKENIZER_FILES if data_dir else ():
        if os.path.exists(os.path.join(data_dir, name)):
            shutil.copyfile(os.path.join(data_dir, name), os.path.join(workdir, name))


def ensure_prepared(config: ml_collections.ConfigDict) -> None:
    """Runs cm3jax.data.prepare into an empty 'prepared:DIR' when the config asks for it."""
    directory = prepared_dir(config)
    if not config.data.prepare_if_missing or os.path.exists(os.path.join(directory, "prepare_report.json")):
        return
    if jax.process_index() == 0:
        logging.info("preparing %s first (data.prepare_if_missing)", directory)
        prepare(config, directory)
    multihost_utils.sync_global_devices("cm3jax: prepared data ready")


def _log_memory(compiled, what: str) -> None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return
    gib = 1 / 2**30
    logging.info(
        "%s per-device memory: arguments %.3f GiB, outputs %.3f GiB, temporaries %.3f GiB",
        what, analysis.argument_size_in_bytes * gib, analysis.output_size_in_bytes * gib,
        analysis.temp_size_in_bytes * gib,
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the run in `workdir` until `config.total_steps`; returns last metrics."""
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    vocab = vocab_lib.from_config(config.vocab)
    if prepared_dir(config):
        ensure_prepared(config)
        check_prepared_vocab(prepared_dir(config), vocab)
        if config.task == "lm":
            check_image_grid(prepared_dir(config), config.model.image_grid)
    os.makedirs(workdir, exist_ok=True)
    write_run_files(workdir, config, vocab)
    checkpointer = Checkpointer(workdir, config.checkpoint)
    latest = checkpointer.latest_step()
    if latest is not None and latest >= config.total_steps:
        logging.info("%s is already trained to step %d (config.total_steps=%d): nothing to do",
                     workdir, latest, config.total_steps)
        checkpointer.close()
        return {}
    start_from = init_from.source(config, latest)  # checked before anything compiles
    if start_from is not None:
        init_from.carry_id_map(start_from, workdir)
    mesh = partitioning.make_mesh(mesh_shape)
    logging.info("mesh %s over %d devices, %d process(es)", mesh_shape, jax.device_count(),
                 jax.process_count())

    task = tasks.create(config, mesh)
    train_step, eval_step = task.compile()
    _log_memory(train_step, "train step")
    n_params = accounting.param_count(task.spec.abstract["params"])
    flops_per_unit = task.flops_per_unit()
    peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device) * jax.device_count()
    logging.info("%s task: %.2fM parameters, %.3g FLOPs/%s, peak %.3g FLOP/s", config.task,
                 n_params / 1e6, flops_per_unit, task.unit[:-1], peak)

    data_iterator = iter(task.dataset("train", jax.process_index(), jax.process_count()))
    bad_records = task.bad_records()
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    meta = task.meta()
    if latest is None:
        state = task.spec.init()
        if start_from is not None:
            state = init_from.with_params(state, start_from, task.spec.abstract["params"])
    else:
        logging.info("resuming from checkpoint step %d", latest)
        state = checkpointer.restore(latest, task.spec.abstract, data_iterator, meta)
    # Rows past the restored step belong to steps this run redoes (or to a killed run).
    writer.truncate_after(latest or 0)
    last_saved = latest

    preemption = PreemptionFlag()
    step = int(state["step"])
    pending: list[tuple[int, dict]] = []
    interval_start, data_wait, last_row = time.perf_counter(), 0.0, {}
    units_per_step, rate_key = task.units_per_step(), f"{task.unit}_per_sec"
    try:
        while step < config.total_steps:
            wait_start = time.perf_counter()
            batch = task.global_batch(next(data_iterator))
            data_wait += time.perf_counter() - wait_start
            state, step_metrics = train_step(state, batch)
            step += 1
            pending.append((step, step_metrics))

            stop = preemption.agreed()
            final = step == config.total_steps
            save = final or stop or step % config.checkpoint.every_steps == 0
            evaluate = config.eval_every > 0 and (step % config.eval_every == 0 or final)
            if not (save or evaluate or step % config.log_every == 0):
                continue

            # Host sync point: fetch every pending step's metrics, check them, write them.
            rows = [{"step": s} | metrics_lib.to_host(m) for s, m in pending]
            elapsed = time.perf_counter() - interval_start
            rate = units_per_step * len(rows) / elapsed
            for row in rows:
                metrics_lib.check_finite(row["step"], row, last_saved)
                row.update({rate_key: rate, "mfu": rate * flops_per_unit / peak, "bad_records": bad_records,
                            "data_wait_fraction": data_wait / elapsed})
            if evaluate:
                rows[-1].update(task.evaluate(eval_step, state))
            writer.write(rows)
            last_row = rows[-1]
            logging.info("step %d/%d | %s | %.0f %s/s | mfu %.1f%% | lr %.3g", step, config.total_steps,
                         task.progress(last_row), rate, task.unit, 100 * last_row["mfu"], last_row["lr"])
            pending, data_wait, interval_start = [], 0.0, time.perf_counter()

            if save and checkpointer.save(step, state, data_iterator, meta, force=final or stop):
                last_saved = step
            if stop:
                logging.warning("pre-emption: checkpoint of step %d written, exiting", step)
                break
    finally:
        preemption.restore_handler()
        checkpointer.close()
        writer.close()
    return last_row
