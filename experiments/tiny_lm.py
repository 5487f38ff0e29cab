"""Tiny mixed-modal LM on the synthetic token source: smoke runs, tests and the demo.

    python -m cm3jax.train --config=experiments/tiny_lm.py --workdir=/tmp/tiny \
        --config.total_steps=40 --config.mesh.fsdp=2 --config.mesh.tensor=2
"""

from cm3jax.config import base_config


def get_config():
    """2-layer, d=64 CM3leon-style decoder; trains in seconds on a CPU."""
    c = base_config()
    c.total_steps = 200  # a few hundred steps show the loss falling well below log(vocab)
    c.log_every = 10  # progress line every 10 steps
    c.eval_every = 100  # eval loss twice per default run
    c.eval_steps = 2  # eval batches per pass

    c.vocab.text_size = 200  # tiny text vocab for the synthetic source
    c.vocab.image_codes = 48  # tiny codebook
    c.vocab.num_masks = 4  # CM3 sentinels

    c.model.max_len = 128  # position table
    c.model.num_layers = 2  # blocks
    c.model.d_model = 64  # width
    c.model.num_heads = 4  # heads of 16
    c.model.dtype = "float32"  # CPU: f32 compute is faster than emulated bf16
    c.model.remat_policy = "none"  # tiny: no memory pressure

    c.data.seq_len = 64  # tokens per row
    c.data.global_batch_size = 16  # rows per step (divisible by 8 devices)

    c.optim.learning_rate = 3e-3  # high LR for a tiny model
    c.optim.warmup_steps = 10  # short warmup
    c.optim.schedule = "cosine"  # decay to 10% of the peak

    c.checkpoint.every_steps = 20  # frequent saves for resume tests
    c.checkpoint.keep = 2  # newest two kept
    return c
