"""`python -m cm3jax.train --config=experiments/X.py --workdir=DIR [--config.key=value ...]`.

Trains (or resumes) the model the config names. `--dry_run` prints parameter count,
FLOPs/token and a per-device memory estimate for the configured mesh, and exits.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cm3jax import distributed, logs
from cm3jax.errors import exit_on_user_error
from cm3jax.train import dry_run, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Describe the model and its memory; train nothing.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", None, "With --dry_run: size the mesh for this many devices (default: the ones here)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


@exit_on_user_error
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required")
    logs.quiet_third_party_logs()
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DRY_RUN.value:
        report = dry_run.describe(config, _DRY_RUN_DEVICES.value or jax.device_count())
        dry_run.print_report(report)
        print(json.dumps(report))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    loop.train(config, _WORKDIR.value)
    logging.info("done")


if __name__ == "__main__":
    app.run(main)
