"""Host memory of converting a Chameleon checkpoint: cm3jax.interop.convert vs transformers loading it.

    python benchmarks/convert_memory.py                      # ~0.44B params, f32, ~3 min
    python benchmarks/convert_memory.py --layers 4 --d_model 512 --vocab 16384   # quick

A random-weight `ChameleonForConditionalGeneration` (Chameleon's shape scaled down: SwiGLU,
QK-norm, a 65,536-id vocab with 8,192 image tokens, a small VQ-VAE) is saved with
`save_pretrained` in 1 GB safetensors shards. Three child processes then run one after
the other, each measured by its own peak resident memory (`os.wait4` rusage):

- baseline: imports jax, transformers and cm3jax (what every process pays before any weight);
- cm3jax: `python -m cm3jax.interop.convert --from=hf` into a fresh workdir (reads the
  shards tensor by tensor, places each parameter with its sharding, writes the Orbax
  checkpoint), on `--devices` fake CPU devices with --fsdp = that count;
- transformers: `ChameleonForConditionalGeneration.from_pretrained` of the same directory
  (the reference: what loading it for PyTorch inference costs).

copies = (peak - baseline) / checkpoint bytes: 1.0 is one full copy of the weights in
memory. The issue's target is a conversion in less than two copies. ratio = cm3jax's extra
memory / transformers' extra memory. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_checkpoint(directory: str, args: argparse.Namespace) -> None:
    """Writes the random model (run in a child: a forked child's peak memory counts the
    parent's pages, so the measuring parent never holds torch or the weights)."""
    import torch
    import transformers

    from cm3jax.interop.chameleon import chameleon_vocabulary_map

    torch.manual_seed(0)
    config = transformers.ChameleonConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=4096, vocabulary_map=chameleon_vocabulary_map(args.codes),
        vq_config=dict(resolution=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                       embed_dim=32, latent_channels=32, num_embeddings=args.codes))
    with torch.device("meta"):
        model = transformers.ChameleonForConditionalGeneration(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(directory, max_shard_size="1GB")


def peak_rss(command: list[str], env: dict) -> tuple[float, float]:
    """(peak resident GB, seconds) of one child process."""
    start = time.time()
    process = subprocess.Popen(command, env=env, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{command[:4]} failed with status {status}")
    return usage.ru_maxrss / 2**20, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--codes", type=int, default=8192)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--save_to", help="(internal) write the checkpoint here and exit")
    args = parser.parse_args()
    if args.save_to:
        return save_checkpoint(args.save_to, args)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "hf")
        subprocess.run([sys.executable, *sys.argv, f"--save_to={src}"], check=True)
        gb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors")) / 2**30
        print(f"checkpoint: {gb:.2f} GB of safetensors in {src}", flush=True)
        baseline, _ = peak_rss([sys.executable, "-c", "import jax, transformers, cm3jax.interop.convert; jax.devices()"],
                               env)
        ours, ours_s = peak_rss([sys.executable, "-m", "cm3jax.interop.convert", "--from=hf", f"--src={src}",
                                 f"--workdir={os.path.join(tmp, 'converted')}", f"--fsdp={args.devices}"], env)
        theirs, theirs_s = peak_rss([sys.executable, "-c", "import sys, transformers; transformers."
                                     "ChameleonForConditionalGeneration.from_pretrained(sys.argv[1])", src], env)
    result = {
        "params_gb": round(gb, 3), "baseline_gb": round(baseline, 3),
        "cm3jax_peak_gb": round(ours, 3), "cm3jax_copies": round((ours - baseline) / gb, 3),
        "cm3jax_seconds": round(ours_s, 1),
        "transformers_peak_gb": round(theirs, 3), "transformers_copies": round((theirs - baseline) / gb, 3),
        "transformers_seconds": round(theirs_s, 1),
        "ratio": round((ours - baseline) / max(theirs - baseline, 1e-9), 3),
    }
    print(f"baseline {baseline:.2f} GB | cm3jax convert peak {ours:.2f} GB ({result['cm3jax_copies']} copies, "
          f"{ours_s:.0f} s) | transformers from_pretrained peak {theirs:.2f} GB "
          f"({result['transformers_copies']} copies, {theirs_s:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
