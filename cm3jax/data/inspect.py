"""Look at what the model will see: decoded training rows and the pipeline's throughput.

    python -m cm3jax.data.inspect --config=experiments/tiny_lm.py --workdir=workdirs/shapes_data --n=4

`--workdir` is the prepared-data directory (as given to cm3jax.data.prepare); rows come
from the same pipeline training uses (CM3 transform, packing, batching), each packed
document shown on its own line: text decoded by the BPE tokenizer, each run of image
codes as `[IMG n codes]`, special tokens by name (`<break>`, `<mask:0>`, `<eos>`, ...).
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.data.pipeline import PREPARED, make_dataset
from cm3jax.tokenizers.text import TextTokenizer
from cm3jax.vocab import IMAGE, SPECIAL, TEXT


def render_tokens(ids: np.ndarray, vocab: vocab_lib.Vocab, text: TextTokenizer) -> str:
    """Human-readable form of a token sequence (text decoded, image runs summarised)."""
    ids = np.asarray(ids)
    types = vocab.token_type(ids)
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and types[end] == types[start] and types[start] != SPECIAL:
            continue
        run = ids[start:end]
        if types[start] == TEXT:
            parts.append(repr(text.decode(run)))
        elif types[start] == IMAGE:
            parts.append(f"[IMG {len(run)} codes]")
        else:
            parts.append(vocab.special_name(int(run[0])))
        start = end
    return " ".join(parts)


def inspect(config: ml_collections.ConfigDict, data_dir: str, n: int, timed_batches: int = 10) -> dict:
    """Prints `n` decoded rows and returns pipeline throughput figures."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.source = PREPARED + data_dir
    vocab = vocab_lib.from_config(config.vocab)
    text = TextTokenizer.load(os.path.join(data_dir, "tokenizer.model"), vocab)
    iterator = iter(make_dataset(config, "train", 0, 1))
    batch = next(iterator)
    for row in range(min(n, len(batch["inputs"]))):
        segments = batch["segment_ids"][row]
        print(f"--- row {row}: {int(segments.max())} documents, "
              f"{int((segments > 0).sum())}/{len(segments)} tokens used, "
              f"{int(batch['loss_mask'][row].sum())} in the loss")
        for segment in np.unique(segments[segments > 0]):
            print(f"  [{segment}] " + render_tokens(batch["inputs"][row][segments == segment], vocab, text))
    start = time.perf_counter()
    for _ in range(timed_batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    tokens = timed_batches * config.data.global_batch_size * config.data.seq_len
    stats = {"batches_per_sec": timed_batches / elapsed, "tokens_per_sec": tokens / elapsed}
    print(f"pipeline: {stats['batches_per_sec']:.1f} batches/s, {stats['tokens_per_sec']:,.0f} tokens/s "
          f"(batch {config.data.global_batch_size} x {config.data.seq_len}, one host)")
    return stats


if __name__ == "__main__":
    from absl import flags

    from cm3jax.cli import run_job

    flags.DEFINE_integer("n", 4, "Rows to print.")
    run_job(lambda config, workdir: inspect(config, workdir, flags.FLAGS.n),
            "Experiment file (pipeline settings).", "the prepared-data directory written by cm3jax.data.prepare")
