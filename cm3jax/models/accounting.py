"""Parameter counts, FLOPs per token and a per-device memory estimate, from shapes alone."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from cm3jax.models.layers import TransformerConfig


def param_count(abstract_params) -> int:
    """Number of parameters in a (possibly abstract) parameter tree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params)))


def matmul_params(cfg: TransformerConfig) -> int:
    """Parameters that take part in a matmul per token (blocks + output projection)."""
    attention = 4 * cfg.d_model * cfg.num_heads * cfg.head_dim
    mlp = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.mlp_dim
    return cfg.num_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * matmul params + attention (PaLM appendix B convention).

    Attention adds 12 * layers * heads * head_dim * seq_len (QK^T and AV, forward and
    backward), counted over the full square as PaLM does, not halved for causality.
    """
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params(cfg) + attention


def sharded_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree placed with `shardings` (NamedShardings)."""

    def per_device(x, sharding: NamedSharding) -> int:
        shard = sharding.shard_shape(x.shape)
        return math.prod(shard) * np.dtype(x.dtype).itemsize

    return int(sum(jax.tree.leaves(jax.tree.map(per_device, abstract_tree, shardings))))


def activation_bytes_estimate(cfg: TransformerConfig, rows_per_device: int, seq_len: int,
                              mesh_shape: dict[str, int]) -> int:
    """Rough peak activation memory of one device for a train step.

    With remat the residual stream is kept per layer and one block's intermediates are
    live at a time; without it every block's intermediates are kept. Logits and their
    gradient are f32 over the vocab shard.
    """
    tensor = mesh_shape["tensor"]
    itemsize = np.dtype(cfg.dtype).itemsize
    tokens = rows_per_device * seq_len
    residual = tokens * cfg.d_model * itemsize
    block = tokens * itemsize * (
        6 * cfg.d_model + (4 * cfg.num_heads * cfg.head_dim + 3 * cfg.mlp_dim) // tensor
    ) + rows_per_device * (cfg.num_heads // tensor) * seq_len * seq_len * 4 * 2
    per_layer = residual if cfg.remat_policy != "none" else residual + block
    logits = 3 * tokens * (cfg.vocab_size // tensor) * 4
    return int(cfg.num_layers * per_layer + block + logits)


def describe_params(abstract_params: nnx.State) -> dict[str, int]:
    """Parameter counts by top-level group (embed, positions, blocks, ...)."""
    tree = nnx.to_pure_dict(abstract_params)
    return {name: param_count(sub) for name, sub in tree.items()}
