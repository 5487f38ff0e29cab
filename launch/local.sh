#!/usr/bin/env bash
# Trains on this machine's devices (one process): all GPUs of a multi-GPU box, or the CPU.
#
#   launch/local.sh --config=experiments/tiny_lm.py --workdir=/tmp/run [--config.x=y ...]
#
# On a CPU-only machine set CM3JAX_CPU_DEVICES=8 to split the CPU into 8 fake devices
# (to try a sharded mesh); on GPUs the visible devices are used as they are.
set -euo pipefail
if [[ -n "${CM3JAX_CPU_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CM3JAX_CPU_DEVICES"
fi
exec python -m cm3jax.train "$@"
