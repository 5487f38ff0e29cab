"""Prepare the shapes benchmark: 20k train / 1k validation scenes -> tokenizers + ArrayRecord shards.

    python -m cm3jax.train --config=experiments/shapes_vqgan.py --workdir=workdirs/shapes_vqgan
    python -m cm3jax.data.prepare --config=experiments/shapes_data.py --workdir=workdirs/shapes_data

Images become 36 codes of the shapes VQGAN (`--config.prepare.image_tokenizer=vqgan:DIR`
to use one trained elsewhere).

Then train on it with experiments/tiny_lm.py (same vocab).
"""

from cm3jax.config import base_config, use_shapes_benchmark


def get_config():
    """Shapes benchmark preparation settings."""
    c = use_shapes_benchmark(base_config())
    c.prepare.records_per_shard = 2000  # 10 train shards, 1 validation shard
    c.prepare.num_workers = 2  # one per core here
    return c
