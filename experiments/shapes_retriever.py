"""Retriever (CLIP-style dual encoder) for the shapes benchmark, over captions and VQGAN codes.

    python -m cm3jax.train --config=experiments/shapes_retriever.py --workdir=workdirs/shapes_retriever

Trains on the caption/code pairs of the prepared shapes data (experiments/shapes_data.py),
so its text tower reads the LM's own text ids. `cm3jax.retrieval.build` then embeds the
memory with it and writes the index and every training document's neighbours.
"""

from cm3jax.config import base_config, use_shapes_benchmark
from cm3jax.models.dual_encoder import base_dual_encoder_config


def get_config():
    """Two 2-layer, width-64 towers; the image tower reads the 6x6 code grid."""
    c = use_shapes_benchmark(base_config())
    c.task = "retriever"
    c.total_steps = 400  # a few minutes on a 2-core CPU
    c.log_every = 50  # progress line
    c.eval_every = 200  # validation loss / recall@1
    c.eval_steps = 4  # validation batches

    c.retriever = base_dual_encoder_config()
    c.retriever.text_vocab_size = c.vocab.text_size  # the LM's BPE ids
    c.retriever.text_max_len = 48  # longest shapes caption is ~40 pieces
    c.retriever.text_pooling = "last"  # our captions carry no eos id
    c.retriever.text_width = 64
    c.retriever.text_layers = 2
    c.retriever.text_heads = 4
    c.retriever.text_mlp_dim = 256
    c.retriever.vision_input = "codes"  # the prepared VQGAN codes, no pixels decoded
    c.retriever.code_grid = 6  # the shapes VQGAN's grid
    c.retriever.code_patch = 1  # one image token per code: 36 tokens
    c.retriever.codebook_size = c.vocab.image_codes
    c.retriever.vision_width = 64
    c.retriever.vision_layers = 2
    c.retriever.vision_heads = 4
    c.retriever.vision_mlp_dim = 256
    c.retriever.projection_dim = 64  # embedding size of the index
    c.retriever.activation = "gelu"

    c.data.source = "prepared:workdirs/shapes_data"  # written by experiments/shapes_data.py
    c.data.global_batch_size = 64  # pairs per step: 63 negatives each
    c.optim.learning_rate = 1e-3  # small towers
    c.optim.warmup_steps = 40
    c.optim.weight_decay = 0.1
    c.checkpoint.every_steps = 200
    return c
