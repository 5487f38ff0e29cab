"""Train-step throughput: cm3jax (JAX, real compiled train step) vs Hugging Face OPT (PyTorch), CPU f32.

    python benchmarks/train_step.py                       # OPT-125m shapes, seq 256, batch 8 (~3.5 min on 2 cores)
    python benchmarks/train_step.py --layers 2 --d-model 256 --heads 4 --seq 128 --batch 4 --steps 3   # quick (~30 s)

Both sides train the same shapes (layers, d_model, heads, ffn, vocab, batch, seq) in
float32 on all host cores: cm3jax runs the jitted train step of the 'lm' task (`tasks.create(...).compile()`) on
ONE CPU device (mesh data=1, whatever XLA_FLAGS says about fake devices); PyTorch runs
`OPTForCausalLM` (GELU, no dropout, pre-LayerNorm, tied embeddings) with the same loss
(mean token cross-entropy) and the same optimizer (global-norm clip 1.0, then AdamW
betas 0.9/0.98, eps 1e-8, weight decay 0.1). Each side is warmed up (compile + steps),
then `--steps` rounds each measure the peak and time one step of each side (block_until_ready /
synchronous torch), alternating the order, so load from other jobs hits both alike. Headline
numbers are best-of (least-disturbed) step times and the highest peak; medians are reported too.

MFU = tokens/s * cm3jax `flops_per_token` (6 * matmul params + attention, PaLM) /
peak, where peak is the jitted f32 2048^3 matmul rate (`measure_cpu_peak_flops`):
the same FLOP count and peak for both sides. ratio = cm3jax tokens/s / torch tokens/s.

Known differences (OPT keeps its architecture): OPT has biases on every linear, affine
LayerNorms, and a 2-row position offset; cm3jax (CM3leon) has neither biases nor norm
parameters. Those are O(d_model) per token and are not counted in the FLOPs.

The last line of stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=-1, help="MLP width (-1 = 4 * d_model)")
    p.add_argument("--vocab", type=int, default=50304, help="model vocab (both sides; OPT's 50272 padded to 128)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed rounds (one step per side each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compiling (+1)")
    p.add_argument("--remat", default="none", help="cm3jax model.remat_policy")
    p.add_argument("--scan-layers", type=int, default=1, help="cm3jax model.scan_layers (1/0)")
    p.add_argument("--torch-attn", default="sdpa", help="OPT attn_implementation ('sdpa' or 'eager')")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--only", choices=("both", "cm3jax", "torch"), default="both")
    return p.parse_args(argv)


def cm3jax_config(args):
    from cm3jax.config import base_config

    c = base_config()
    c.total_steps = 10_000
    c.seed = 0
    c.peak_flops_per_device = 1.0  # unused here: the benchmark measures the peak itself
    # A ~50k vocab laid out like cm3jax's (text + image codes + specials); the model vocab is explicit.
    c.vocab.text_size = args.vocab - 8192 - 64
    c.vocab.image_codes = 8192
    c.vocab.num_masks = 16
    c.model.vocab_size = args.vocab
    c.model.max_len = max(args.seq, 2048)
    c.model.num_layers = args.layers
    c.model.d_model = args.d_model
    c.model.num_heads = args.heads
    c.model.mlp_dim = args.ffn if args.ffn > 0 else 4 * args.d_model
    c.model.activation = "gelu"
    c.model.tie_embeddings = True
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat_policy = args.remat
    c.model.scan_layers = bool(args.scan_layers)
    c.data.seq_len = args.seq
    c.data.global_batch_size = args.batch
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.optim.grad_accum_steps = 1
    return c


def synthetic_tokens(args) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, args.vocab - 100, size=(args.batch, args.seq + 1), dtype=np.int64)


def make_cm3jax_step(args, config, tokens: np.ndarray):
    """The compiled cm3jax train step on one CPU device: returns (run_one_step, info)."""
    import jax

    from cm3jax import config as config_lib
    from cm3jax.models import accounting
    from cm3jax.train import partitioning, tasks

    devices = jax.devices()[:1]  # one device, even under --xla_force_host_platform_device_count
    mesh_shape = config_lib.validate(config, len(devices))
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    task = tasks.create(config, mesh)
    spec = task.spec
    start = time.perf_counter()
    train_step, _ = task.compile()
    compile_s = time.perf_counter() - start

    b, l = args.batch, args.seq
    host = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, l)),
        "positions": np.broadcast_to(np.arange(l), (b, l)),
        "loss_mask": np.ones((b, l)),
        "token_type": np.zeros((b, l)),  # TEXT
    }
    sharding = partitioning.batch_sharding(mesh)
    batch = {k: jax.device_put(np.ascontiguousarray(v, np.int32), sharding) for k, v in host.items()}
    holder = {"state": spec.init()}

    def run() -> float:
        state, metrics = train_step(holder["state"], batch)  # the state is donated
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return float(metrics["loss"])

    info = {
        "compile_s": compile_s,
        "params": accounting.param_count(spec.abstract["params"]),
        "flops_per_token": accounting.flops_per_token(spec.model_config, args.seq),
    }
    return run, info


def make_torch_step(args, tokens: np.ndarray):
    """One OPTForCausalLM train step (forward, loss, backward, clip, AdamW): returns (run_one_step, info)."""
    import torch
    import torch.nn.functional as F
    from transformers import OPTConfig, OPTForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        num_hidden_layers=args.layers,
        ffn_dim=args.ffn if args.ffn > 0 else 4 * args.d_model,
        num_attention_heads=args.heads,
        max_position_embeddings=max(args.seq, 2048),
        word_embed_proj_dim=args.d_model,
        do_layer_norm_before=True,
        activation_function="gelu",
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        tie_word_embeddings=True,
        use_cache=False,
        init_std=0.006,
    )
    model = OPTForCausalLM._from_config(cfg, attn_implementation=args.torch_attn, dtype=torch.float32)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]  # like cm3jax: no decay on norms / biases
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-8,
    )
    inputs = torch.from_numpy(tokens[:, :-1].copy())
    targets = torch.from_numpy(tokens[:, 1:].copy())

    def run() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    info = {"params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
            "version": torch.__version__}
    return run, info


def timed(run) -> tuple[float, float]:
    start = time.perf_counter()
    loss = run()
    return time.perf_counter() - start, loss


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from cm3jax.models import accounting
    from cm3jax.train.metrics import measure_cpu_peak_flops
    from cm3jax.train.state import model_config

    config = cm3jax_config(args)
    tokens = synthetic_tokens(args)
    fpt = accounting.flops_per_token(model_config(config), args.seq)
    sides = {}
    if args.only in ("both", "cm3jax"):
        sides["cm3jax"] = make_cm3jax_step(args, config, tokens)
    if args.only in ("both", "torch"):
        sides["torch"] = make_torch_step(args, tokens)
    for name, (run, info) in sides.items():
        losses = [run() for _ in range(args.warmup + 1)]  # + 1: the first torch step allocates Adam state
        info["first_loss"] = losses[0]
        print(f"{name}: {info['params'] / 1e6:.1f}M params, warmed up ({args.warmup + 1} steps)"
              + (f", compiled in {info['compile_s']:.1f} s" if "compile_s" in info else ""), flush=True)

    # Interleaved rounds (peak, then one step of each side, alternating the order) so that load from
    # other processes on the host hits both sides alike; best-of is the headline, median is reported too.
    peaks, times = [], {name: [] for name in sides}
    for r in range(args.steps):
        peaks.append(measure_cpu_peak_flops(repeats=3))
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            seconds, sides[name][1]["last_loss"] = timed(sides[name][0])
            times[name].append(seconds)
        print(f"round {r}: peak {peaks[-1] / 1e9:.0f} GFLOP/s, "
              + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in sides), flush=True)
    peaks.append(measure_cpu_peak_flops(repeats=3))
    peak = max(peaks)
    tokens_per_step = args.batch * args.seq

    result: dict = {
        "benchmark": "train_step",
        "layers": args.layers, "d_model": args.d_model, "heads": args.heads,
        "ffn": args.ffn if args.ffn > 0 else 4 * args.d_model, "vocab": args.vocab,
        "seq": args.seq, "batch": args.batch, "steps": args.steps, "remat": args.remat,
        "scan_layers": bool(args.scan_layers), "flops_per_token": fpt,
        "peak_flops": peak, "peak_flops_median": float(np.median(peaks)),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
    }
    for name, (run, info) in sides.items():
        prefix = "cm3jax" if name == "cm3jax" else "torch"
        best, median = min(times[name]), float(np.median(times[name]))
        tps = tokens_per_step / best
        result.update({
            f"{prefix}_tokens_per_sec": tps,
            f"{prefix}_tokens_per_sec_median": tokens_per_step / median,
            f"{prefix}_step_s": best,
            f"{prefix}_step_s_all": times[name],
            f"{prefix}_params": info["params"],
            f"{prefix}_loss": info["last_loss"],
            ("mfu" if name == "cm3jax" else "torch_mfu"): tps * fpt / peak,
        })
        if name == "cm3jax":
            result["cm3jax_compile_s"] = info["compile_s"]
        else:
            result.update(torch_threads=info["threads"], torch=info["version"], torch_attn=args.torch_attn)
        mfu = result["mfu" if name == "cm3jax" else "torch_mfu"]
        print(f"{name}: {tps:.1f} tok/s (best of {args.steps}; median {tokens_per_step / median:.1f}), "
              f"{best:.2f} s/step, MFU {100 * mfu:.1f}%, loss {info['first_loss']:.3f} -> {info['last_loss']:.3f}",
              flush=True)
    if len(sides) == 2:
        result["ratio"] = result["cm3jax_tokens_per_sec"] / result["torch_tokens_per_sec"]
        paired = [t / j for j, t in zip(times["cm3jax"], times["torch"])]
        result["ratio_median_paired"] = float(np.median(paired))
        print(f"peak {peak / 1e9:.0f} GFLOP/s; ratio cm3jax/torch {result['ratio']:.2f}x "
              f"(median of per-round ratios {result['ratio_median_paired']:.2f}x)", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
