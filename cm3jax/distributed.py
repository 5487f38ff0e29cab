"""Multi-host start-up: `jax.distributed.initialize` when a run spans several processes.

Three ways in, checked in order:
  1. explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`), as
     `launch/multiprocess_cpu.sh` passes them;
  2. a cluster JAX detects by itself (TPU pod slices, SLURM with several tasks);
  3. otherwise a single process and nothing to do.
"""

from __future__ import annotations

import os

import jax
from absl import logging

# A dead host must give an error, not a hang: bound the time to form the cluster.
INITIALIZATION_TIMEOUT_S = 300


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """Joins the process group this run belongs to (no-op for a single process)."""
    if coordinator_address:
        # CPU processes need a collectives backend to form one mesh (GPU/TPU have their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address, num_processes=num_processes, process_id=process_id,
            initialization_timeout=INITIALIZATION_TIMEOUT_S,
        )
    elif _in_multi_host_cluster():
        jax.distributed.initialize(initialization_timeout=INITIALIZATION_TIMEOUT_S)
    else:
        return
    logging.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def _in_multi_host_cluster() -> bool:
    """True under SLURM with several tasks or on a multi-host TPU slice."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
