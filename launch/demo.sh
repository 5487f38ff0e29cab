#!/usr/bin/env bash
# The end-to-end demo a newcomer runs first (about 10 minutes on a 2-core CPU):
#   1. prepares the shapes benchmark: BPE text tokenizer, palette image tokenizer,
#      20k caption/image documents in ArrayRecord shards, and shows two training rows;
#   2. trains the tiny mixed-modal LM on it with the CM3 objective, sharded over 8 fake CPU
#      devices (data=2 x fsdp=2 x tensor=2), with checkpoints, eval loss and metrics;
#   3. pre-empts it half-way with SIGTERM and re-runs the same command, which resumes;
#   4. prints the loss summary and the CM3leon-350M dry run (parameters, FLOPs, memory).
#
#   launch/demo.sh [WORKDIR]      (default: workdirs/demo; the training run is removed first,
#                                  the prepared data in WORKDIR/shapes_data is reused)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-workdirs/demo}
data="$root/shapes_data"
workdir="$root/tiny_lm"
rm -rf "$workdir"
mkdir -p "$workdir"
log="$workdir/train.log"

echo "== 1. preparing the shapes benchmark into $data"
python -m cm3jax.data.prepare --config=experiments/shapes_data.py --workdir="$data" 2>"$root/prepare.log" \
  || { tail -n 20 "$root/prepare.log"; exit 1; }
python -m cm3jax.data.inspect --config=experiments/tiny_lm.py --workdir="$data" --n=2 2>>"$root/prepare.log"

export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
train=(python -m cm3jax.train --config=experiments/tiny_lm.py --workdir="$workdir"
       --config.data.source="prepared:$data" --config.total_steps=120
       --config.eval_every=60 --config.mesh.fsdp=2 --config.mesh.tensor=2)
echo "== 2. training the tiny LM (120 steps); pre-empting it with SIGTERM after step 50"
"${train[@]}" 2>"$log" &
pid=$!
until [[ -f "$workdir/metrics.jsonl" ]] && (( $(wc -l <"$workdir/metrics.jsonl") >= 50 )); do
  kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log"; exit 1; }
  sleep 0.5
done
kill -TERM "$pid"
wait "$pid" || { echo "pre-empted run did not exit cleanly"; tail -n 20 "$log"; exit 1; }
echo "   saved and exited 0 at step $(ls "$workdir/checkpoints" | sort -n | tail -1)"
echo "== 3. the same command again resumes from that checkpoint and trains to step 120"
"${train[@]}" 2>>"$log" || { tail -n 20 "$log"; exit 1; }
grep -E "resuming|step [0-9]+/" "$log" | sed 's/^.*\] //' | tail -n 6

echo "== 4. summary"
python - "$workdir" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
vocab = json.load(open(f"{sys.argv[1]}/vocab.json"))
first, last = rows[0], rows[-1]
print(f"steps {first['step']}..{last['step']}: loss {first['loss']:.3f} -> {last['loss']:.3f} "
      f"(a uniform guess over {vocab['size']} ids: {math.log(vocab['size']):.3f}); text {last['text_loss']:.3f}, image {last['image_loss']:.3f}; "
      f"eval loss {last.get('eval_loss', float('nan')):.3f}")
print(f"throughput {last['tokens_per_sec']:.0f} tokens/s, MFU {100 * last['mfu']:.1f}% of the measured CPU matmul peak")
PY
echo "== 5. CM3leon-350M as the paper trained it, on 256 GPUs (dry run: shapes only, nothing allocated)"
python -m cm3jax.train --config=experiments/cm3leon_350m.py --dry_run --dry_run_devices=256 2>/dev/null | grep -v '^{'
echo "demo finished: metrics in $workdir/metrics.jsonl, TensorBoard events in $workdir/tensorboard"
