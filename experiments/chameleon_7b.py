"""Chameleon-7B (Chameleon Team 2024; Hugging Face `facebook/chameleon-7b`) as a cm3jax config.

The architecture of the released weights, as cm3jax transformer switches: SwiGLU, RoPE,
RMSNorm with learned scales, per-head QK LayerNorm, untied output, pre-norm (the 34B uses
Chameleon's 'swin' norm placement). Its 65,536 ids are 57,344 text ids (BPE and
Chameleon's specials) and 8,192 image codes. Weights come from a converted checkpoint:

    python -m cm3jax.interop.convert --from=hf --src=/path/to/chameleon-7b-hf --workdir=runs/chameleon_7b

which writes this architecture into runs/chameleon_7b/config.json (from the checkpoint's own
config.json). Memory on a cluster (see docs/interop.md):

    python -m cm3jax.train --config=experiments/chameleon_7b.py --dry_run --dry_run_devices=8
"""

from cm3jax.config import base_config


def get_config():
    """Chameleon-7B: 32 layers, d_model 4096, 32 heads, SwiGLU 11008, context 4096."""
    c = base_config()
    c.vocab.text_size = 65536 - 8192  # Chameleon's non-image ids (BPE + its special tokens)
    c.vocab.image_codes = 8192  # Make-A-Scene VQ-VAE codebook
    c.model.num_layers = 32
    c.model.d_model = 4096
    c.model.num_heads = 32
    c.model.head_dim = 128
    c.model.mlp_dim = 11008  # SwiGLU hidden size
    c.model.max_len = 4096
    c.model.activation = "swiglu"
    c.model.position = "rope"
    c.model.rope_theta = 10000.0
    c.model.norm = "rmsnorm"
    c.model.norm_params = True
    c.model.norm_eps = 1e-5
    c.model.norm_placement = "pre"  # 'swin' for Chameleon-34B
    c.model.qk_norm = True
    c.model.tie_embeddings = False
    c.model.init_std = 0.02
    c.model.zero_init_output = False
    c.data.seq_len = 4096
    c.mesh.data = 1  # parameters and optimizer state sharded over every device
    c.mesh.fsdp = -1
    return c
