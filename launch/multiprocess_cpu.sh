#!/usr/bin/env bash
# Runs cm3jax.train as N local CPU processes that form one multi-host cluster
# (coordinator on localhost, gloo collectives), to exercise the multi-host path here.
#
#   launch/multiprocess_cpu.sh N --config=experiments/tiny_lm.py --workdir=/tmp/mp [--config.x=y ...]
#
# The CM3JAX_CPU_DEVICES fake CPU devices (default 8) are split evenly over the N
# processes, so the global mesh has the same shape as one process with all of them.
# If any process fails, the others are stopped and the script exits with its code.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ || $1 -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [cm3jax.train flags...]" >&2
  exit 2
fi
num_processes=$1
shift
total_devices=${CM3JAX_CPU_DEVICES:-8}
if (( total_devices % num_processes )); then
  echo "error: $total_devices devices do not split over $num_processes processes" >&2
  exit 2
fi
devices_per_process=$(( total_devices / num_processes ))
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
logdir=$(mktemp -d)

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for (( i = 0; i < num_processes; i++ )); do
  env XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" \
    python -m cm3jax.train "$@" \
      --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
      >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
# Wait for the first process to finish; a failure stops the rest instead of leaving them hanging.
for (( done = 0; done < num_processes; done++ )); do
  if ! wait -n "${pids[@]}"; then
    status=1
    break
  fi
done
if (( status )); then
  for (( i = 0; i < num_processes; i++ )); do
    echo "--- process $i log (last lines) ---" >&2
    tail -n 20 "$logdir/process_$i.log" >&2
  done
  exit 1
fi
cat "$logdir/process_0.log"
rm -rf "$logdir"
