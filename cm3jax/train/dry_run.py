"""`cm3jax.train --dry_run`: parameter count, FLOPs/token and per-device memory, nothing trained.

Everything is derived from shapes (`jax.eval_shape`) on an abstract mesh, so a 7B config
is described in seconds on a laptop, for the mesh of a cluster it is not running on
(`--dry_run_devices=256`).
"""

from __future__ import annotations

import jax
import ml_collections

from cm3jax import config as config_lib
from cm3jax.errors import UserError
from cm3jax.models import accounting
from cm3jax.train.state import build_state_spec

GIB = 2**30


def describe(config: ml_collections.ConfigDict, num_devices: int) -> dict:
    """Model size, compute and per-device memory of `config` on `num_devices` devices."""
    mesh_shape = config_lib.validate(config, num_devices)
    if config.task != "lm":
        raise UserError(f"--dry_run describes the LM (config.task='lm'); this config trains "
                        f"config.task={config.task!r}")
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    spec = build_state_spec(config, mesh)
    params, cfg = spec.abstract["params"], spec.model_config
    param_bytes = accounting.sharded_bytes(params, spec.shardings["params"])
    opt_bytes = accounting.sharded_bytes(spec.abstract["opt_state"], spec.shardings["opt_state"])
    rows = config.data.global_batch_size // (mesh_shape["data"] * mesh_shape["fsdp"])
    rows //= config.optim.grad_accum_steps
    activation_bytes = accounting.activation_bytes_estimate(cfg, rows, config.data.seq_len, mesh_shape)
    return {
        "params": accounting.param_count(params),
        "params_by_group": {k: accounting.param_count(v) for k, v in params.items()},
        "flops_per_token": accounting.flops_per_token(cfg, config.data.seq_len),
        "tokens_per_step": config.data.global_batch_size * config.data.seq_len,
        "mesh": mesh_shape,
        "per_device_gib": {
            "params": param_bytes / GIB,
            "optimizer": opt_bytes / GIB,
            "gradients": param_bytes / GIB,
            "activations_estimate": activation_bytes / GIB,
            "total_estimate": (2 * param_bytes + opt_bytes + activation_bytes) / GIB,
        },
    }


def print_report(report: dict) -> None:
    """Human-readable summary of `describe()`."""
    print(f"parameters:       {report['params']:,} ({report['params'] / 1e6:.1f}M)")
    for group, n in report["params_by_group"].items():
        print(f"  {group:<16}{n:,}")
    print(f"FLOPs per token:  {report['flops_per_token']:.4g} (training, 6N + attention)")
    print(f"tokens per step:  {report['tokens_per_step']:,}")
    print(f"mesh:             {report['mesh']}")
    print("per-device memory (GiB):")
    for key, gib in report["per_device_gib"].items():
        print(f"  {key:<22}{gib:8.3f}")
