"""CM3leon-350m shapes (CM3leon paper, Appendix B.2, Table 3): 24 layers, d_model 1024, seq 4096.

Print the parameter count, FLOPs/token and per-device memory for a mesh:

    python -m cm3jax.train --config=experiments/cm3leon_350m.py --dry_run \
        --config.mesh.fsdp=-1 --config.mesh.data=1

Train (on the cluster the launcher starts):

    python -m cm3jax.train --config=experiments/cm3leon_350m.py --workdir=gs://BUCKET/cm3leon_350m
"""

from cm3jax.config import base_config


def get_config():
    """CM3leon-350m: metaseq/OPT-style decoder as the paper changed it."""
    c = base_config()
    c.total_steps = 200_000  # 8M-token steps; the paper trained 1.4T-2.4T tokens
    c.model.num_layers = 24  # Table 3
    c.model.d_model = 1024  # Table 3
    c.model.num_heads = 16  # not stated in the paper; the GPT-3/OPT shape of this size
    c.model.max_len = 4096  # Table 3 sequence length
    c.data.seq_len = 4096  # Table 3
    c.data.global_batch_size = 2048  # 2048 x 4096 = 8M tokens per step (Table 3)
    c.optim.learning_rate = 6e-4  # Table 3 peak LR
    c.optim.warmup_steps = 1500  # Table 3
    c.mesh.data = 1  # shard parameters and optimizer state over every device by default
    c.mesh.fsdp = -1  # ZeRO-3 over all devices; add mesh.tensor for the 7B on GPUs
    return c
