"""Tiny mixed-modal LM on the prepared shapes benchmark: smoke runs and the demo.

    python -m cm3jax.train --config=experiments/shapes_vqgan.py --workdir=workdirs/shapes_vqgan
    python -m cm3jax.data.prepare --config=experiments/shapes_data.py --workdir=workdirs/shapes_data
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m cm3jax.train \
        --config=experiments/tiny_lm.py --workdir=workdirs/tiny \
        --config.mesh.fsdp=2 --config.mesh.tensor=2

The first run prepares workdirs/shapes_data itself if it is missing
(`data.prepare_if_missing`; it needs the trained shapes VQGAN). `--config.data.source=synthetic`
trains on deterministic synthetic tokens instead (no prepare step), as the loop tests do.

Retrieval-augmented (CM3leon's two neighbours before every document):

    python -m cm3jax.train --config=experiments/shapes_retriever.py --workdir=workdirs/shapes_retriever
    python -m cm3jax.retrieval.build --config=experiments/tiny_lm.py --workdir=workdirs/shapes_index
    python -m cm3jax.train --config=experiments/tiny_lm.py --workdir=workdirs/tiny_rag \
        --config.retrieval.enabled=True
"""

from cm3jax.config import base_config, use_shapes_benchmark


def get_config():
    """2-layer, d=64 CM3leon-style decoder over 6x6-code shapes scenes; a fraction of a second per step on a CPU."""
    c = use_shapes_benchmark(base_config())
    c.total_steps = 200  # a few hundred steps show the loss falling well below log(vocab)
    c.log_every = 10  # progress line every 10 steps
    c.eval_every = 100  # eval loss twice per default run
    c.eval_steps = 2  # eval batches per pass

    c.model.max_len = 512  # longest row: a document and its two neighbours is ~60-200 tokens
    c.model.num_layers = 2  # blocks
    c.model.d_model = 64  # width
    c.model.num_heads = 4  # heads of 16
    # Small-model init and RoPE: CM3leon's init (std 0.006, zero-initialised residual
    # outputs) is sized for d=4096; at d=64 it leaves attention uniform for hundreds of steps
    # and the LM reads only the position words of a caption, never its colours or shapes
    # (docs/benchmarks.md, "48x48 scenes at f=8, small-model init").
    c.model.position = "rope"  # measured together with the init below (alone it changed nothing)
    c.model.init_std = 0.02  # GPT-2's init for small widths
    c.model.zero_init_output = False
    c.model.dtype = "float32"  # CPU: f32 compute is faster than emulated bf16
    c.model.remat_policy = "none"  # tiny: no memory pressure

    c.data.source = "prepared:workdirs/shapes_data"  # written by experiments/shapes_data.py
    c.data.prepare_if_missing = True  # prepares the shapes set (~1 min) on first use
    c.data.seq_len = 512  # tokens per packed row
    c.data.global_batch_size = 8  # rows per step (divisible by 8 devices)

    c.retrieval.encoder = "workdirs/shapes_retriever"  # experiments/shapes_retriever.py
    c.retrieval.neighbours = "workdirs/shapes_index"  # cm3jax.retrieval.build --config=experiments/tiny_lm.py
    c.retrieval.chunk_docs = 5000  # 4 embedding chunks of the 20k-document memory

    c.optim.learning_rate = 3e-3  # high LR for a tiny model
    c.optim.warmup_steps = 10  # short warmup
    c.optim.schedule = "cosine"  # decay to 10% of the peak

    c.checkpoint.every_steps = 20  # frequent saves for resume tests
    c.checkpoint.keep = 2  # newest two kept
    return c
