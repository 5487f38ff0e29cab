"""CM3leon-760m (CM3leon paper, Appendix B.2, Table 3): 24 layers, d_model 1536, seq 4096.

Parameters, FLOPs/token and per-device memory on the paper's cluster size:

    python -m cm3jax.train --config=experiments/cm3leon_760m.py --dry_run --dry_run_devices=256

Train (on the cluster a launcher starts; re-running the command resumes):

    launch/slurm_gpu.sbatch --config=experiments/cm3leon_760m.py --workdir=/shared/runs/cm3leon_760m
"""

from cm3jax.config import cm3leon_config


def get_config():
    """CM3leon-760m: metaseq/OPT-style decoder as the paper changed it."""
    return cm3leon_config(num_layers=24, d_model=1536, num_heads=16, learning_rate=5e-4)
