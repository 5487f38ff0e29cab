"""The train state, its shardings, and its creation directly sharded on the mesh.

The state is a plain pytree (so Orbax and optax see ordinary dicts):
`{'step': int32, 'params': <pure dict>, 'opt_state': <optax state>, 'rng': uint32[2]}`.
Its shardings are worked out from shapes alone (`jax.eval_shape`), then the state is
created by `jax.jit(init, out_shardings=...)`: no full copy ever sits on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from cm3jax.config import model_vocab_size
from cm3jax.models import transformer
from cm3jax.models.layers import TransformerConfig
from cm3jax.train import partitioning
from cm3jax.train.optim import make_optimizer

TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything static about a train state: model graph, optimizer, shapes, shardings."""

    model_config: TransformerConfig
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    abstract: TrainState  # ShapeDtypeStructs carrying their target shardings
    shardings: TrainState
    init: Callable[[], TrainState]  # jitted, creates the state sharded

    @property
    def param_shardings(self) -> dict:
        return self.shardings["params"]


def schedule_steps(config: ml_collections.ConfigDict) -> int:
    """Steps the LR schedule spans: `optim.schedule_steps`, or `total_steps` when -1."""
    return config.optim.schedule_steps if config.optim.schedule_steps > 0 else config.total_steps


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """The transformer architecture described by `config.model`."""
    return TransformerConfig.from_config(config.model, model_vocab_size(config))


def abstract_params(cfg: TransformerConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Model graph and parameter shapes (with logical axis metadata), allocating nothing."""
    abstract_model = nnx.eval_shape(lambda: transformer.create(cfg, 0))
    return nnx.split(abstract_model)


def sharded_state_spec(model_config: Any, graphdef: nnx.GraphDef, abstract_param_state: nnx.State,
                       make_params: Callable[[jax.Array], dict], optimizer: optax.GradientTransformation,
                       mesh: Mesh, seed: int) -> StateSpec:
    """The StateSpec of a one-model task: `make_params(key)` -> pure param dict, one optimizer.

    Parameter shardings come from the logical axes of `abstract_param_state`; optimizer
    moments follow their parameters, everything else is replicated.
    """
    param_sh = partitioning.param_shardings(abstract_param_state, mesh)
    replicated = partitioning.replicated(mesh)

    def init() -> TrainState:
        params_key, state_key = jax.random.split(jax.random.key(seed))
        params = make_params(params_key)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": optimizer.init(params),
            "rng": jax.random.key_data(state_key),
        }

    shapes = jax.eval_shape(init)
    shardings = {
        "step": replicated,
        "params": param_sh,
        "opt_state": opt_state_shardings(shapes["opt_state"], shapes["params"], param_sh, replicated),
        "rng": replicated,
    }
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return StateSpec(model_config, graphdef, optimizer, abstract, shardings,
                     jax.jit(init, out_shardings=shardings))


def opt_state_shardings(opt_state: Any, params: dict, param_shardings: dict,
                        replicated: jax.sharding.Sharding) -> Any:
    """Shardings of an optimizer state: a leaf whose key path ends with a parameter's path and
    which has that parameter's shape (one of its moments) is sharded like it; the rest is replicated.

    Unlike `optax.tree_map_params` this also maps partitioned states (`optax.multi_transform`,
    used by `config.freeze`), where the moments exist for some parameters only.
    """
    by_path = {tuple(path): (leaf.shape, sharding) for (path, leaf), sharding in
               zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))}

    def sharding(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.sharding.Sharding:
        for start in range(len(path)):  # longest suffix first
            shape, param_sharding = by_path.get(tuple(path[start:]), (None, None))
            if shape == leaf.shape:
                return param_sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, opt_state)


def build_state_spec(config: ml_collections.ConfigDict, mesh: Mesh) -> StateSpec:
    """Derives shapes and shardings of the LM train state for `config` on `mesh`."""
    cfg = model_config(config)
    graphdef, abstract_param_state = abstract_params(cfg)
    return sharded_state_spec(
        cfg, graphdef, abstract_param_state,
        lambda key: nnx.to_pure_dict(nnx.state(transformer.create(cfg, key))),
        make_optimizer(config.optim, schedule_steps(config), freeze=config.freeze), mesh, config.seed)
