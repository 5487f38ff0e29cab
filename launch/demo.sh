#!/usr/bin/env bash
# The end-to-end demo a newcomer runs first (about 27 minutes on a 2-core CPU). Each stage is
# one cm3jax command writing a normal --workdir, so this script is also the tutorial:
#   1. trains the shapes VQGAN image tokenizer (48x48 scenes -> 6x6 codes, f8) and evaluates
#      its reconstructions (PSNR, codebook use, shapes-oracle agreement);
#   2. prepares the shapes benchmark with it: BPE text tokenizer + VQGAN image codes, 20k
#      caption/image documents in ArrayRecord shards;
#   3. trains the retriever (CLIP-style dual encoder over captions and codes), embeds the
#      memory, builds the dense index and every document's two neighbours, and shows a
#      search and a retrieval-augmented training row;
#   4. trains the tiny mixed-modal LM on retrieval-augmented documents with the CM3
#      objective for 2,500 steps on one CPU device, pre-empting it with SIGTERM after step
#      50 and resuming with the same command;
#   5. prints the loss summary;
#   6. samples from it: text -> image (retrieval, CFG + contrastive decoding, re-ranked by the
#      retriever) and image -> text, PNGs and JSON in WORKDIR/lm/samples;
#   7. only with --sft (about 11 more minutes): prepares the shapes SFT tasks (captioning, VQA,
#      editing, grounded generation) with the LM's own tokenizers and fine-tunes the LM on their
#      mixture (experiments/shapes_sft.py: parameters only from the LM, loss on the targets only);
#   8. evaluates every stage (`cm3jax.eval --task=all`): shapes-oracle accuracy of text -> image
#      with/without CFG and retrieval and of image -> text, CIDEr, FID over the retriever's
#      image features, VQGAN PSNR, retriever recall, stage wall times and, with --sft, every SFT
#      task before and after fine-tuning -> WORKDIR/eval.json and WORKDIR/report.md (with the
#      picture grids);
#   9. shows the CM3leon-350M dry run (parameters, FLOPs, memory).
#
#   launch/demo.sh [--sft] [WORKDIR]   (default: demo_run; stages write WORKDIR/vqgan, WORKDIR/data,
#                                       WORKDIR/retriever, WORKDIR/index and WORKDIR/lm; --sft also
#                                       WORKDIR/sft_data and WORKDIR/sft)
# A stage that is already complete is skipped when the demo runs again, and a killed demo
# resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
sft=0 root=demo_run
for arg in "$@"; do
  case "$arg" in
    --sft) sft=1 ;;
    -*) echo "usage: launch/demo.sh [--sft] [WORKDIR]  (unknown option $arg)"; exit 2 ;;
    *) root=$arg ;;
  esac
done
mkdir -p "$root"
vqgan="$root/vqgan" data="$root/data" retriever="$root/retriever" index="$root/index" lm="$root/lm"

fail() { echo "stage failed; the last lines of $1:"; tail -n 20 "$1"; exit 1; }
# stage NAME: writes the running stage's wall time into $root/stage_times.json (eval.json and
# report.md show them) and starts timing NAME ('' to stop timing).
current="" started=0
stage() {
  if [[ -n "$current" ]]; then
    python - "$root/stage_times.json" "$current" "$((SECONDS - started))" <<'PY'
import json, os, sys
path, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
times = json.load(open(path)) if os.path.exists(path) else {}
times[name] = seconds
with open(path, "w") as f:
    json.dump(times, f, indent=1)
PY
  fi
  current=$1 started=$SECONDS
}
progress() { grep -E "resuming|already trained|step [0-9]+/" "$1" | sed 's/^.*\] //' | tail -n "$2"; }

stage vqgan
echo "== 1. training the VQGAN image tokenizer into $vqgan (about 9 minutes; progress: $vqgan/train.log)"
mkdir -p "$vqgan"
python -m cm3jax.train --config=experiments/shapes_vqgan.py --workdir="$vqgan" 2>>"$vqgan/train.log" \
  || fail "$vqgan/train.log"
progress "$vqgan/train.log" 3
python -m cm3jax.eval --workdir="$vqgan" --task=reconstruction --n=512 >/dev/null 2>>"$vqgan/eval.log" \
  || fail "$vqgan/eval.log"
python - "$vqgan/eval/reconstruction.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   validation: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, codes used {100 * r['codebook_usage']:.0f}%; "
      f"the shapes oracle reads the same scene from {100 * r['oracle_agreement']:.1f}% of reconstructions")
PY

stage data
echo "== 2. preparing the shapes benchmark into $data with that tokenizer"
prepare=(python -m cm3jax.data.prepare --config=experiments/shapes_data.py --workdir="$data"
         --config.prepare.image_tokenizer="vqgan:$vqgan")
"${prepare[@]}" 2>"$root/prepare.log" || fail "$root/prepare.log"

stage retrieval
echo "== 3. training the retriever into $retriever, then the index and neighbours into $index"
mkdir -p "$retriever"
python -m cm3jax.train --config=experiments/shapes_retriever.py --workdir="$retriever" \
  --config.data.source="prepared:$data" 2>>"$retriever/train.log" || fail "$retriever/train.log"
progress "$retriever/train.log" 2
python -m cm3jax.retrieval.build --config=experiments/tiny_lm.py --workdir="$index" \
  --config.data.source="prepared:$data" --config.retrieval.encoder="$retriever" >/dev/null 2>"$root/build.log" \
  || fail "$root/build.log"
grep -E "neighbours of|nothing to do" "$root/build.log" | sed 's/^.*\] /   /'
python - "$index" 2>>"$root/build.log" <<'PY'
import sys
from cm3jax.retrieval import Retriever
query = "a large red circle in the centre"
print(f"   search {query!r}: " + " | ".join(f"{r.caption!r} ({r.score:.2f})" for r in Retriever.load(sys.argv[1]).search(text=[query], k=2)[0]))
PY
rag=(--config.data.source="prepared:$data" --config.retrieval.enabled=True --config.retrieval.neighbours="$index")
python -m cm3jax.data.inspect --config=experiments/tiny_lm.py --workdir="$data" --n=1 "${rag[@]}" 2>>"$root/build.log" \
  || fail "$root/build.log"

stage lm
# One CPU device: at 0.24M parameters, splitting the step over fake devices only adds overhead
# (8 devices, fsdp 2 x tensor 2: 8% fewer tokens/s). Sharded training is what the tests exercise.
train=(python -m cm3jax.train --config=experiments/tiny_lm.py --workdir="$lm" "${rag[@]}" --config.total_steps=2500
       --config.model.image_grid=6 --config.eval_every=500 --config.checkpoint.every_steps=100)
mkdir -p "$lm"
log="$lm/train.log"
if [[ ! -d "$lm/checkpoints" ]]; then
  echo "== 4. training the tiny LM on retrieval-augmented documents (2500 steps, about 14 minutes); SIGTERM after step 50"
  "${train[@]}" 2>>"$log" &
  pid=$!
  until [[ -f "$lm/metrics.jsonl" ]] && (( $(wc -l <"$lm/metrics.jsonl") >= 50 )); do
    kill -0 "$pid" 2>/dev/null || fail "$log"
    sleep 0.5
  done
  kill -TERM "$pid"
  wait "$pid" || { echo "pre-empted run did not exit cleanly"; fail "$log"; }
  echo "   saved and exited 0 at step $(ls "$lm/checkpoints" | sort -n | tail -1)"
  echo "   the same command again resumes from that checkpoint and trains to step 2500"
else
  echo "== 4. resuming the tiny LM from its newest checkpoint in $lm"
fi
"${train[@]}" 2>>"$log" || fail "$log"
progress "$log" 6

echo "== 5. summary"
python - "$lm" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
vocab = json.load(open(f"{sys.argv[1]}/vocab.json"))
first, last = rows[0], rows[-1]
print(f"steps {first['step']}..{last['step']}: loss {first['loss']:.3f} -> {last['loss']:.3f} "
      f"(a uniform guess over {vocab['size']} ids: {math.log(vocab['size']):.3f}); text {last['text_loss']:.3f}, image {last['image_loss']:.3f}; "
      f"eval loss {last.get('eval_loss', float('nan')):.3f}")
print(f"throughput {last['tokens_per_sec']:.0f} tokens/s, MFU {100 * last['mfu']:.1f}% of the measured CPU matmul peak")
PY
stage samples
echo "== 6. sampling from the LM: text -> image (retrieval, CFG + CD-K, re-ranked) and image -> text"
samples="$lm/samples"
python -m cm3jax.sample --workdir="$lm" --task=text2image --prompt="a large red circle in the centre" \
  --num_samples=4 --retrieve=2 --out="$samples" >/dev/null 2>"$root/sample.log" || fail "$root/sample.log"
python - "$data" "$samples/scene.png" <<'PY' 2>>"$root/sample.log"
import sys
from PIL import Image
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.tokenizers.image import load_image_tokenizer
record = ArrayRecordDocuments(split_paths(sys.argv[1], "validation"))[0]
from cm3jax.tokenizers.text import TextTokenizer
Image.fromarray(load_image_tokenizer(sys.argv[1]).decode(record["image"][None])[0]).save(sys.argv[2])
open(sys.argv[2].replace(".png", ".txt"), "w").write(TextTokenizer.load(f"{sys.argv[1]}/tokenizer.model").decode(record["text"]))
PY
python -m cm3jax.sample --workdir="$lm" --task=image2text --image="$samples/scene.png" --out="$samples" \
  --max_new_tokens=40 >/dev/null 2>>"$root/sample.log" || fail "$root/sample.log"
python - "$samples" <<'PY'
import json, sys
t2i = json.load(open(f"{sys.argv[1]}/text2image.json"))["results"][0]
i2t = json.load(open(f"{sys.argv[1]}/image2text.json"))["results"][0]
print(f"   {t2i['prompt']!r}: {len(t2i['candidates'])} candidates, best {sys.argv[1]}/{t2i['best']} "
      f"({t2i['candidates'][0]['method']}, score {t2i['candidates'][0]['score']:.3f}); retrieved {t2i['retrieved']}")
print(f"   caption of {i2t['image']}: {i2t['caption']!r}  (a 2500-step, 0.24M-parameter model)")
print(f"   its true caption: {open(i2t['image'].replace('.png', '.txt')).read()!r}")
PY
if (( sft )); then
  stage sft
  sft_data="$root/sft_data" sft_run="$root/sft"
  echo "== 7. fine-tuning $lm on captioning, VQA, editing and grounded generation into $sft_run (about 11 minutes)"
  tune=(--config=experiments/shapes_sft.py --config.init_from="$lm")
  python -m cm3jax.data.prepare "${tune[@]}" --workdir="$sft_data" 2>"$root/sft_prepare.log" \
    || fail "$root/sft_prepare.log"
  mkdir -p "$sft_run"
  python -m cm3jax.train "${tune[@]}" --workdir="$sft_run" --config.data.source="prepared:$sft_data" \
    2>>"$sft_run/train.log" || fail "$sft_run/train.log"
  progress "$sft_run/train.log" 2
  python - "$sft_run/metrics.jsonl" <<'PY'
import json, sys
last = [json.loads(line) for line in open(sys.argv[1])][-1]
print("   final loss per task: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(last.items()) if k.startswith("loss/")))
PY
fi
stage ""
echo "== 8. evaluating every stage into $root/eval.json and $root/report.md (picture grids linked there)"
python -m cm3jax.eval --workdir="$root" --task=all --n=1000 --prompts=64 --guidance=2 >/dev/null 2>"$root/eval.log" \
  || fail "$root/eval.log"
python - "$root/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t2i, i2t = r["text2image"], r["image2text"]
print(f"   VQGAN PSNR {r['vqgan']['psnr']:.2f} dB, codes used {100 * r['vqgan']['codebook_usage']:.0f}%; "
      f"retriever recall@1 {r['retrieval']['recall_at_1']:.3f}")
print(f"   text -> image, oracle accuracy on single objects: {t2i['oracle_accuracy']:.3f} with CFG "
      f"(without CFG {t2i['oracle_accuracy_no_cfg']:.3f}, without retrieval {t2i['oracle_accuracy_no_retrieval']:.3f}); "
      f"2-3 objects {t2i['oracle_accuracy_multi']:.3f}; held-out colour/shape pairs {t2i['heldout_oracle_accuracy']:.3f}")
print(f"   image -> text, oracle accuracy {i2t['oracle_accuracy']:.3f}, CIDEr-D {i2t['cider']:.3f}")
if "sft" in r:
    keys = {"vqa_accuracy": "VQA", "edit_success": "edits", "grounded_accuracy": "grounded images",
            "caption_oracle_accuracy": "captions"}
    print("   fine-tuning, before -> after: " + ", ".join(
        f"{label} {r['sft']['before'][key]:.3f} -> {r['sft']['after'][key]:.3f}" for key, label in keys.items()))
PY
echo "== 9. CM3leon-350M as the paper trained it, on 256 GPUs (dry run: shapes only, nothing allocated)"
python -m cm3jax.train --config=experiments/cm3leon_350m.py --dry_run --dry_run_devices=256 2>/dev/null | grep -v '^{'
echo "demo finished: the report is $root/report.md (eval.json beside it); VQGAN in $vqgan (reconstructions: $vqgan/eval/reconstruction.png), data in $data,"
echo "  retriever in $retriever, index + neighbours in $index, LM in $lm (metrics.jsonl, TensorBoard in $lm/tensorboard)"
