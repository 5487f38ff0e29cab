"""VQGAN image tokenizer for the shapes benchmark: 48x48 images -> 6x6 codes, CPU-sized (~9 min).

    python -m cm3jax.train --config=experiments/shapes_vqgan.py --workdir=workdirs/shapes_vqgan

Trains on `shapes` scenes rendered on the fly (no prepare step). experiments/shapes_data.py
then tokenizes the LM data with it (`config.prepare.image_tokenizer=vqgan:workdirs/shapes_vqgan`).
"""

from cm3jax.config import SHAPES_VQGAN_CODES, base_config, use_shapes_benchmark
from cm3jax.models.vqgan import base_vqgan_config
from cm3jax.train.vqgan import base_vqgan_train_config


def get_config():
    """A small f8 VQGAN (CM3leon's factor) with a patch encoder, a 512-code EMA codebook and dead-code restarts."""
    c = use_shapes_benchmark(base_config())
    c.task = "vqgan"
    c.total_steps = 1500  # minutes on a 2-core CPU
    c.log_every = 50  # progress line
    c.eval_every = 500  # validation PSNR / codebook usage
    c.eval_steps = 4  # validation batches

    c.vqgan = base_vqgan_config()
    c.vqgan.resolution = 48  # shapes render size: 16 px grid cells
    c.vqgan.base_channels = 16  # first-level channels
    c.vqgan.channel_multipliers = (1, 2, 2, 2)  # downsample 8: 6x6 = 36 codes, 2x2 per grid cell
    c.vqgan.num_res_blocks = 1  # per level
    c.vqgan.attention = False  # no attention needed at 6x6 for flat-coloured shapes
    # Each code sees only its own 8x8 patch, a quarter of one grid cell: the same patch is
    # always the same code, so the background is one code and an object is 2x2 codes that do
    # not depend on its neighbours (taming encoder: codes depend on the whole scene and the
    # LM's image loss stays ~6x higher). Training scenes hold 369 distinct 8x8 patches
    # (an object's quarter x colour), ~70% of the codes (docs/benchmarks.md).
    c.vqgan.encoder = "patch"
    c.vqgan.norm_groups = 4  # GroupNorm groups
    c.vqgan.embed_dim = 16  # latent channels
    c.vqgan.codebook_size = SHAPES_VQGAN_CODES  # 512 codes
    c.vqgan.ema = True  # EMA codebook (VQ-VAE-2): 98% of codes in use by step 450
    c.vqgan.dead_code_threshold = 0.01  # restart codes unused in recent batches
    c.vqgan.disc_channels = 32  # patch discriminator width
    c.vqgan.disc_layers = 2  # 48 -> 10x10 logit map

    c.vqgan_train = base_vqgan_train_config()
    c.vqgan_train.l2_weight = 1.0  # L1 + L2: flat colours reward exact pixel values
    c.vqgan_train.disc_start = 100_000  # GAN off: flat shapes need pixel accuracy (set lower to switch it on)
    c.vqgan_train.disc_weight = 0.1  # a light GAN term: shapes need accuracy more than texture
    c.vqgan_train.restart_every = 50  # steps between dead-code restarts

    c.prepare.shapes_records.train = 20000  # training scenes
    c.prepare.shapes_records.validation = 512  # validation scenes
    c.data.global_batch_size = 32  # images per step
    c.optim.learning_rate = 1e-3  # Adam peak LR
    c.optim.warmup_steps = 100  # short warmup
    c.optim.b1 = 0.5  # taming's GAN betas
    c.optim.b2 = 0.9
    c.optim.weight_decay = 0.0  # no decay on conv weights / codebook
    c.checkpoint.every_steps = 500  # saves
    return c
