"""The device mesh and the one table mapping logical axis names to mesh axes.

Changing data / FSDP / tensor parallelism is a config change (`config.mesh`), never a
code change: parameters and activations name logical axes, and `LOGICAL_RULES` below
decides where each goes. A parameter whose logical axis has no rule is an error.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.config import MESH_AXES
from cm3jax.models.logical import to_partition_spec

BATCH_AXES = ("data", "fsdp")

# Weights: 'embed' is sharded over fsdp (ZeRO-3 style, gathered per layer by XLA),
# the Megatron dimensions (heads, mlp, vocab) over tensor. Activations: the batch over
# every data-parallel axis, heads / mlp / vocab over tensor, length and embed replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),
    ("max_len", None),
    ("image_grid", None),
    # VQGAN / LPIPS convolutions and codebooks: at most ~10^8 parameters, replicated; data
    # parallelism carries the scale.
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", None),
    ("codebook", None),
    ("code_dim", None),
    ("projection", None),  # the dual encoder's shared text/image embedding dimension
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'tensor') of the given sizes.

    Devices come in `jax.devices()` order (process by process), so each host's devices
    hold a contiguous slice of the batch and `make_array_from_process_local_data`
    assembles the global batch in the same order for any number of hosts. The tensor
    axis is innermost so tensor-parallel collectives stay within a host.
    """
    devices = jax.devices() if devices is None else devices
    sizes = tuple(shape[axis] for axis in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_spec(names) -> PartitionSpec:
    """PartitionSpec of a tensor with the given logical axis names."""
    return to_partition_spec(names, LOGICAL_RULES)


def param_shardings(abstract_state: nnx.State, mesh: Mesh) -> dict:
    """NamedShardings (as a pure dict) for every parameter, from its logical axis names.

    Raises:
      ValueError: naming a parameter that has no logical axis names or no matching rule.
    """
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(abstract_state)

    def to_sharding(path, names, shape):
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        if not isinstance(names, PartitionSpec) or len(names) != len(shape.shape):
            raise ValueError(f"parameter {where} {shape.shape} has no logical axis names")
        try:
            return NamedSharding(mesh, logical_spec(tuple(names)))
        except KeyError as e:
            raise ValueError(f"parameter {where}: {e.args[0]}") from None

    return jax.tree_util.tree_map_with_path(to_sharding, specs, shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays: leading axis over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, RNG keys, step counters)."""
    return NamedSharding(mesh, PartitionSpec())
