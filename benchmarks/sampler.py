"""Sampler (CPU, float32): cm3jax KV-cache decoding vs Hugging Face transformers `generate`.

    python benchmarks/sampler.py               # OPT-125m shapes (~25 min on 2 cores, more if busy)
    python benchmarks/sampler.py --shape demo  # the shapes demo LM (~30 s)
    python benchmarks/sampler.py --shape demo --new-tokens 64 --no-cache-tokens 16 --runs 1

Workload: text-to-image decoding of one 256x256 image, 32x32 = 1,024 image codes per row,
after a 16-token caption ending in `<break>` (every row its own random caption), greedy, for
batch 1 and batch 8, on random weights of the same shape in both frameworks:

- cm3jax: `Decoder` with `SamplingConfig(max_new_tokens=1024, greedy=True,
  image_tokens=1024, stop_at_image_end=False)`; the modality constraint allows only image
  codes until 1,024 are out, so every row generates exactly 1,024 tokens. One jitted call:
  prefill, then `lax.while_loop`s of KV-cache steps. (The decoder pads prompts to a
  multiple of 32 slots; the 16 padding slots are masked, extra work on cm3jax's side only.)
- transformers: `OPTForCausalLM.generate(input_ids, attention_mask, max_new_tokens=1024,
  min_new_tokens=1024, do_sample=False, use_cache=True)` (greedy, DynamicCache, sdpa
  attention) on the same prompts.

Both sides run prefill + decode, timed together (the same work), float32, in this process on
the host's cores. tokens/s = batch x 1,024 / seconds. Compilation is excluded: cm3jax is
warmed up with one untimed run of the same shapes, transformers with a short untimed
`generate`. torch then gets `torch.set_num_threads` with all cores (2 here) or with 1,
whichever generates faster in a 64-token calibration (`--torch-threads auto`; on a busy
shared host OpenMP's 2-thread barriers can make torch many times slower than 1 thread): the
baseline is the faster setting. Then `--runs` rounds time one run of each side, alternating the
order, so load from other jobs hits both alike; headline = median seconds.
ratio = cm3jax tokens/s / transformers tokens/s (batch 8; `ratio_batch1` for batch 1).

No cache: the same greedy, modality-constrained decoding where every new token re-runs the
model's full forward pass (`Transformer.__call__`, logits at every position) over a fixed
[batch, 16 + n] buffer, jitted as one `fori_loop` and compiled ahead of time, timed once on
n = `--no-cache-tokens` new tokens (fewer than 1,024: its cost per token grows with the
sequence, so the speed-up it shows is a lower bound for 1,024). cache_speedup = cached
tokens/s (1,024 tokens) / uncached tokens/s (n tokens), at batch 8. Its tokens are checked
against the cached decoder's first n tokens (`no_cache_tokens_match`).

Shapes (`--shape`):

- opt125m (default): OPT-125m, 12 layers, d_model 768, 12 heads, ffn 3072, vocab 50272,
  2048 positions (`OPTConfig()`); cm3jax's vocab laid out as 42060 text ids + 8192 image
  codes (CM3leon's codebook) + 4 specials + 16 masks = 50272. The default because at this
  size both sides do real work per token (~0.5 GB of float32 weights streamed per step,
  plus the cache), so the ratio compares the decoders; on the demo LM a cm3jax step takes a
  fraction of a millisecond and the ratio mostly measures transformers' Python / dispatch
  cost per token (~1 ms).
- demo: experiments/tiny_lm.py's LM, 2 layers, d_model 64, 4 heads of 16, mlp 256, vocab
  512 text + 512 codes + 4 specials + 8 masks = 1036 ids padded to 1152, learned positions
  (OPT's) instead of its RoPE; max_len 1088 for 16 + 1,024 tokens (the demo's own images are
  36 codes; the benchmark keeps the 1,024-token workload).

Model differences (kept: each side is its own architecture): OPT has biases on every linear
layer, affine LayerNorms, ReLU and a 2-row position offset; cm3jax (CM3leon) has no biases,
parameter-free LayerNorm and exact GELU. FLOPs per token differ by < 1%. Weights: normal
std 0.02 (OPT's init); cm3jax's output projections are not zero-initialised, so every
layer contributes to the logits.

The last line of stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from cm3jax.config import model_vocab_size
from cm3jax.models import transformer
from cm3jax.models.layers import TransformerConfig
from cm3jax.sampling import processors
from cm3jax.sampling.decode import Decoder, SamplingConfig, next_token_scores
from cm3jax.vocab import Vocab
from cm3jax.vocab import from_config as vocab_from_config

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 16  # a caption of 15 text tokens, then <break>
INIT_STD = 0.02  # OPT's init_std, for every weight of both models
BATCHES = (1, 8)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model shape, as a cm3jax config + vocab and the matching OPT config fields."""

    model: TransformerConfig
    vocab: Vocab

    def opt_fields(self) -> dict:
        """`OPTConfig` keyword arguments of the same shape."""
        m = self.model
        return dict(
            vocab_size=m.vocab_size,
            hidden_size=m.d_model,
            num_hidden_layers=m.num_layers,
            ffn_dim=m.mlp_dim,
            num_attention_heads=m.num_heads,
            max_position_embeddings=m.max_len,
            word_embed_proj_dim=m.d_model,
            init_std=INIT_STD,
        )

    def describe(self) -> dict:
        """The shape's sizes, for the printout and the JSON."""
        m = self.model
        return {
            "layers": m.num_layers,
            "d_model": m.d_model,
            "heads": m.num_heads,
            "head_dim": m.head_dim,
            "ffn": m.mlp_dim,
            "vocab": m.vocab_size,
            "max_len": m.max_len,
        }


def random_weights(cfg: TransformerConfig) -> TransformerConfig:
    """`cfg` in float32 with OPT-like random weights (no zero-initialised outputs), no remat."""
    return dataclasses.replace(
        cfg,
        init_std=INIT_STD,
        pos_init_std=INIT_STD,
        zero_init_output=False,
        dtype="float32",
        param_dtype="float32",
        remat_policy="none",
    )


def opt125m_shape() -> Shape:
    """OPT-125m's sizes, with a 50272-id CM3leon-style vocab (see the module doc)."""
    vocab = Vocab(text_size=50272 - 8192 - 4 - 16, image_codes=8192, num_masks=16)
    model = TransformerConfig(
        vocab_size=vocab.size,
        max_len=2048,
        num_layers=12,
        d_model=768,
        num_heads=12,
        head_dim=64,
        mlp_dim=3072,
    )
    return Shape(random_weights(model), vocab)


def demo_shape(new_tokens: int) -> Shape:
    """experiments/tiny_lm.py's LM, with positions for the prompt + `new_tokens` (64-rounded)."""
    path = REPO / "experiments" / "tiny_lm.py"
    spec = importlib.util.spec_from_file_location("experiments_tiny_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = TransformerConfig.from_config(config.model, model_vocab_size(config))
    max_len = max(model.max_len, -(-(PROMPT_TOKENS + new_tokens) // 64) * 64)
    # OPT has learned positions only: the tiny LM's RoPE is swapped for them (same cost).
    model = random_weights(dataclasses.replace(model, max_len=max_len, position="learned"))
    return Shape(model, vocab_from_config(config.vocab))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("opt125m", "demo"), default="opt125m", help="see doc")
    parser.add_argument("--new-tokens", type=int, default=1024, help="image codes per row (32x32)")
    parser.add_argument("--no-cache-tokens", type=int, default=128, help="new tokens, no cache")
    parser.add_argument("--runs", type=int, default=3, help="timed rounds per batch size")
    parser.add_argument(
        "--torch-threads",
        default="auto",
        help="'auto' (the faster of all cores and 1 in a calibration) or a thread count",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def import_reference():
    """(torch, transformers), or exits with a message when they are not installed."""
    try:
        import torch
        import transformers
    except ImportError as error:
        sys.exit(
            f"benchmarks/sampler.py needs torch and transformers for the reference side "
            f"({error}); install them with: pip install torch transformers"
        )
    return torch, transformers


def captions(vocab: Vocab, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`batch` random 15-token captions, each followed by `<break>` (an image comes next)."""
    text = rng.integers(0, vocab.text_size, size=(batch, PROMPT_TOKENS - 1))
    return [np.append(row, vocab.break_id).astype(np.int32) for row in text]


def cm3jax_decoder(shape: Shape, seed: int) -> tuple[Decoder, transformer.Transformer]:
    """A `Decoder` over random weights of `shape`, and the model itself."""
    model = transformer.create(shape.model, seed)
    graphdef, state = nnx.split(model)
    return Decoder(graphdef, nnx.to_pure_dict(state), shape.model, shape.vocab), model


def no_cache_generate(
    model: transformer.Transformer, vocab: Vocab, config: SamplingConfig, prompts: np.ndarray
) -> Callable[[], np.ndarray]:
    """Greedy decoding of `config.max_new_tokens` tokens after `prompts` [batch, p] without a
    cache: each token re-runs the full forward pass over the whole [batch, p + new] buffer.
    Compiled ahead of time; the returned function runs it and returns the new tokens."""
    graphdef, params = nnx.split(model)
    batch, prompt_len = prompts.shape
    length = prompt_len + config.max_new_tokens

    def generate(params, buffer):
        model = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        segments = jnp.ones((batch, length), jnp.int32)
        filled = positions < prompt_len
        modality = processors.modality_state(buffer, filled, vocab)

        def step(i, carry):
            buffer, modality = carry
            logits = model(buffer, positions, segments)
            slot = prompt_len + i
            last = jax.lax.dynamic_index_in_dim(logits, slot - 1, axis=1, keepdims=False)
            scores = next_token_scores(last[None], modality, buffer, filled, config, vocab)
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
            buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, slot, axis=1)
            return buffer, processors.advance_modality(modality, token, vocab)

        buffer, _ = jax.lax.fori_loop(0, config.max_new_tokens, step, (buffer, modality))
        return buffer[:, prompt_len:]

    buffer = np.full((batch, length), vocab.pad_id, np.int32)
    buffer[:, :prompt_len] = prompts
    compiled = jax.jit(generate).lower(params, buffer).compile()
    return lambda: np.asarray(compiled(params, buffer))


def opt_model(torch, transformers, shape: Shape, seed: int):
    """An `OPTForCausalLM` of `shape` with random weights, float32, in eval mode."""
    torch.manual_seed(seed)
    config = transformers.OPTConfig(**shape.opt_fields())
    model = transformers.OPTForCausalLM._from_config(config, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def hf_generate(
    torch, model, prompts: list[np.ndarray], new_tokens: int
) -> Callable[[], np.ndarray]:
    """A function running greedy `generate` of exactly `new_tokens` tokens per row."""
    input_ids = torch.from_numpy(np.stack(prompts).astype(np.int64))
    attention_mask = torch.ones_like(input_ids)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
            )
        return out[:, input_ids.shape[1] :].numpy()

    return run


def timed(run: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    """(wall seconds of `run()`, its result)."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def pick_torch_threads(
    torch, model, prompts: list[np.ndarray], setting: str
) -> tuple[int, dict[int, float]]:
    """The torch thread count to use and, for 'auto', the calibration: seconds per token of
    a 64-token `generate` with all cores and with 1 thread (the faster one wins)."""
    if setting != "auto":
        return int(setting), {}
    run = hf_generate(torch, model, prompts, 64)
    per_token = {}
    for threads in (os.cpu_count() or 2, 1):
        torch.set_num_threads(threads)
        per_token[threads] = timed(run)[0] / 64
    return min(per_token, key=per_token.get), per_token


def time_rounds(
    runs: dict[str, Callable[[], np.ndarray]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Seconds of each run per round, alternating the order between rounds; last results."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, np.ndarray] = {}
    names = list(runs)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            seconds, results[name] = timed(runs[name])
            times[name].append(seconds)
        report = ", ".join(f"{name} {times[name][-1]:.1f} s" for name in names)
        print(f"  round {round_}: {report}", flush=True)
    return times, results


def bench_batch(args, shape: Shape, decoder: Decoder, model, opt, torch, batch: int) -> dict:
    """Cached cm3jax vs transformers (alternating rounds), then cm3jax without a cache."""
    prompts = captions(shape.vocab, batch, np.random.default_rng(args.seed + batch))
    new = args.new_tokens
    config = SamplingConfig(
        max_new_tokens=new, greedy=True, image_tokens=new, stop_at_image_end=False
    )

    def cm3jax_run() -> np.ndarray:
        decoded = decoder([prompts], config)
        assert (decoded.lengths == new).all(), decoded.lengths
        return decoded.tokens

    warmup_s, cached = timed(cm3jax_run)
    hf_generate(torch, opt, prompts, 8)()
    threads, calibration = pick_torch_threads(torch, opt, prompts, args.torch_threads)
    torch.set_num_threads(threads)
    tried = "".join(f", {t} thread(s) {1e3 * s:.1f} ms/token" for t, s in calibration.items())
    print(f"batch {batch}: cm3jax warm-up (compile + run) {warmup_s:.1f} s; torch threads "
          f"{threads}{tried}", flush=True)
    runs = {"cm3jax": cm3jax_run, "transformers": hf_generate(torch, opt, prompts, new)}
    times, results = time_rounds(runs, args.runs)
    assert results["transformers"].shape == (batch, new), results["transformers"].shape

    no_cache_config = dataclasses.replace(config, max_new_tokens=args.no_cache_tokens)
    compile_s, no_cache = timed(
        lambda: no_cache_generate(model, shape.vocab, no_cache_config, np.stack(prompts))
    )
    no_cache_s, uncached = timed(no_cache)
    match = bool((uncached == cached[:, : args.no_cache_tokens]).all())
    print(f"  no cache: {args.no_cache_tokens} tokens per row in {no_cache_s:.1f} s (compiled in "
          f"{compile_s:.1f} s), tokens equal to the cached decoder's: {match}", flush=True)
    return {
        "cm3jax_tokens_per_sec": batch * new / statistics.median(times["cm3jax"]),
        "hf_tokens_per_sec": batch * new / statistics.median(times["transformers"]),
        "no_cache_tokens_per_sec": batch * args.no_cache_tokens / no_cache_s,
        "cm3jax_s": times["cm3jax"],
        "hf_s": times["transformers"],
        "no_cache_s": no_cache_s,
        "no_cache_tokens_match": match,
        "cm3jax_warmup_s": warmup_s,
        "torch_threads": threads,
        "torch_ms_per_token": {str(t): round(1e3 * s, 2) for t, s in calibration.items()},
    }


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(results: dict[int, dict], runs: int, no_cache_tokens: int) -> None:
    """tokens/s of each side and batch size, the ratios and the cache speed-ups."""
    threads = "/".join(str(r["torch_threads"]) for r in results.values())
    rows = [
        ("cm3jax, KV cache", "cm3jax_tokens_per_sec"),
        (f"transformers generate (torch threads {threads})", "hf_tokens_per_sec"),
        (f"cm3jax, no cache ({no_cache_tokens} tokens)", "no_cache_tokens_per_sec"),
    ]
    header = "".join(f"{f'batch {b}':>12}" for b in results)
    print(f"\n{f'tokens/s (median of {runs})':<48}{header}")
    for label, key in rows:
        print(f"{label:<48}" + "".join(f"{r[key]:>12.1f}" for r in results.values()))
    for label, numerator, denominator in (
        ("ratio cm3jax / transformers", "cm3jax_tokens_per_sec", "hf_tokens_per_sec"),
        ("cache speed-up (cached / no cache)", "cm3jax_tokens_per_sec", "no_cache_tokens_per_sec"),
    ):
        cells = (f"{r[numerator] / r[denominator]:.2f}x" for r in results.values())
        print(f"{label:<48}" + "".join(f"{cell:>12}" for cell in cells))


def main() -> None:
    args = parse_args()
    torch, transformers = import_reference()
    shape = opt125m_shape() if args.shape == "opt125m" else demo_shape(args.new_tokens)
    decoder, model = cm3jax_decoder(shape, args.seed)
    opt = opt_model(torch, transformers, shape, args.seed)
    device = (f"{cpu_name()}, {os.cpu_count()} cores, jax {jax.devices()[0].platform} "
              f"x{jax.device_count()}")
    params = sum(x.size for x in jax.tree.leaves(decoder.params))
    print(f"shape {args.shape}: {shape.describe()}; prompt {PROMPT_TOKENS} tokens, "
          f"{args.new_tokens} new tokens per row; cm3jax {params / 1e6:.1f}M params, OPT "
          f"{sum(p.numel() for p in opt.parameters()) / 1e6:.1f}M; {device}", flush=True)
    results = {b: bench_batch(args, shape, decoder, model, opt, torch, b) for b in BATCHES}
    print_table(results, args.runs, args.no_cache_tokens)

    one, eight = results[1], results[8]

    def per_batch(key: str) -> dict:
        return {f"batch{b}": r[key] for b, r in results.items()}

    def speedup(r: dict) -> float:
        return r["cm3jax_tokens_per_sec"] / r["no_cache_tokens_per_sec"]

    print(json.dumps({
        "ratio": round(eight["cm3jax_tokens_per_sec"] / eight["hf_tokens_per_sec"], 3),
        "ratio_batch1": round(one["cm3jax_tokens_per_sec"] / one["hf_tokens_per_sec"], 3),
        "cm3jax_tokens_per_sec": round(eight["cm3jax_tokens_per_sec"], 2),
        "hf_tokens_per_sec": round(eight["hf_tokens_per_sec"], 2),
        "cm3jax_tokens_per_sec_batch1": round(one["cm3jax_tokens_per_sec"], 2),
        "hf_tokens_per_sec_batch1": round(one["hf_tokens_per_sec"], 2),
        "no_cache_tokens_per_sec": round(eight["no_cache_tokens_per_sec"], 2),
        "no_cache_tokens_per_sec_batch1": round(one["no_cache_tokens_per_sec"], 2),
        "cache_speedup": round(speedup(eight), 2),
        "cache_speedup_batch1": round(speedup(one), 2),
        "no_cache_tokens_match": one["no_cache_tokens_match"] and eight["no_cache_tokens_match"],
        "shape": {"name": args.shape, **shape.describe()},
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "no_cache_tokens": args.no_cache_tokens,
        "runs": args.runs,
        "cm3jax_s": per_batch("cm3jax_s"),
        "hf_s": per_batch("hf_s"),
        "no_cache_s": per_batch("no_cache_s"),
        "cm3jax_warmup_s": per_batch("cm3jax_warmup_s"),
        "torch_threads": per_batch("torch_threads"),
        "torch_ms_per_token": per_batch("torch_ms_per_token"),
        "device": device,
        "dtype": "float32",
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
