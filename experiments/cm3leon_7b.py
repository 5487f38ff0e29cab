"""CM3leon-7b (CM3leon paper, Appendix B.2, Table 3): 32 layers, d_model 4096, seq 4096.

Parameters, FLOPs/token and per-device memory on the paper's cluster size:

    python -m cm3jax.train --config=experiments/cm3leon_7b.py --dry_run --dry_run_devices=256

Train (on the cluster a launcher starts; re-running the command resumes):

    launch/slurm_gpu.sbatch --config=experiments/cm3leon_7b.py --workdir=/shared/runs/cm3leon_7b
"""

from cm3jax.config import cm3leon_config


def get_config():
    """CM3leon-7b: metaseq/OPT-style decoder as the paper changed it."""
    return cm3leon_config(num_layers=32, d_model=4096, num_heads=32, learning_rate=1.2e-4)
