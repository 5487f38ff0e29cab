"""Logical-axis partitioning on 8 fake CPU devices (data=2, fsdp=2, tensor=2), and grad accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODERN_OVERRIDES, tiny_config
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cm3jax import config as config_lib
from cm3jax.data.pipeline import make_dataset
from cm3jax.models import transformer
from cm3jax.train import partitioning, tasks
from cm3jax.train import state as state_lib

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def _path(path) -> str:
    def part(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    return "/".join(part(k) for k in path)


def _flat(tree, is_leaf=None) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {_path(path): leaf for path, leaf in leaves}


def _mesh(config):
    assert jax.device_count() == 8, "conftest.py must give jax 8 CPU devices"
    return partitioning.make_mesh(config_lib.validate(config, jax.device_count(), 1))


@pytest.fixture(scope="module")
def mesh():
    mesh = _mesh(tiny_config(MESH))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    return mesh


class Built:
    def __init__(self, overrides: dict, mesh):
        self.config = tiny_config(MESH | overrides)
        self.spec = state_lib.build_state_spec(self.config, mesh)
        self.state = self.spec.init()
        abstract = state_lib.abstract_params(self.spec.model_config)[1]
        is_spec = lambda x: isinstance(x, P)  # noqa: E731
        self.logical_names = _flat(nnx.to_pure_dict(nnx.get_partition_spec(abstract)), is_spec)


@pytest.fixture(scope="module", params=["cm3leon", "modern"])
def built(request, mesh) -> Built:
    return Built({} if request.param == "cm3leon" else MODERN_OVERRIDES, mesh)


def _expected_spec(names) -> P:
    """The mesh axes the rules table gives each logical name (independent of logical_spec)."""
    rules = dict(partitioning.LOGICAL_RULES)
    return P(*(rules[name] for name in names))


def test_params_are_sharded_by_their_logical_names(built):
    params = _flat(built.state["params"])
    assert params.keys() == built.logical_names.keys()
    for where, array in params.items():
        expected = _expected_spec(built.logical_names[where])
        assert isinstance(array.sharding, NamedSharding), where
        assert array.sharding.spec == expected, (where, array.sharding.spec, expected)
        # The shards really are split that way.
        shard_shape = array.sharding.shard_shape(array.shape)
        for dim, axes in enumerate(expected):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            split = int(np.prod([2 for _ in axes]))
            assert shard_shape[dim] == array.shape[dim] // split, (where, dim)
        assert array.addressable_shards[0].data.shape == shard_shape


def test_known_parameter_specs(built):
    params = built.state["params"]
    assert params["embed"].sharding.spec == P("tensor", "fsdp")
    assert params["blocks"]["attention"]["query"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["blocks"]["attention"]["out"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert params["blocks"]["mlp"]["wi"].sharding.spec == P(None, "fsdp", "tensor")
    assert params["blocks"]["mlp"]["wo"].sharding.spec == P(None, "tensor", "fsdp")
    if "lm_head" in params:
        assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
        assert params["final_norm"]["scale"].sharding.spec == P(None)
        assert params["blocks"]["attention"]["query_norm"]["scale"].sharding.spec == P(None, "tensor", None)
    else:
        assert params["positions"].sharding.spec == P(None, "fsdp")


def test_state_shardings_match_spec(built):
    actual = _flat(jax.tree.map(lambda x: x.sharding, built.state))
    expected = _flat(built.spec.shardings)
    abstract = _flat(jax.tree.map(lambda x: x.sharding, built.spec.abstract))
    assert actual.keys() == expected.keys() == abstract.keys()
    for where in actual:
        assert actual[where] == expected[where] == abstract[where], where


def test_optimizer_moments_sharded_like_params(built):
    params = built.state["params"]
    adam = [s for s in jax.tree.leaves(built.state["opt_state"],
                                       is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    for moments in (adam[0].mu, adam[0].nu):
        flat_params, flat_moments = _flat(params), _flat(moments)
        assert flat_moments.keys() == flat_params.keys()
        for where, moment in flat_moments.items():
            assert moment.shape == flat_params[where].shape
            assert moment.sharding == flat_params[where].sharding, where
    assert adam[0].count.sharding.is_fully_replicated


def test_step_rng_and_counters_replicated(built):
    state = built.state
    for name in ("step", "rng"):
        assert state[name].sharding.spec == P(), name
        assert state[name].sharding.is_fully_replicated, name
    assert state["step"].dtype == jnp.int32 and int(state["step"]) == 0
    assert state["rng"].dtype == jnp.uint32 and state["rng"].shape == (2,)
    # Everything in the optimizer state that is not a parameter-shaped moment is replicated.
    params = _flat(state["params"])
    for where, leaf in _flat(state["opt_state"]).items():
        if leaf.ndim == 0:
            assert leaf.sharding.is_fully_replicated, where
        else:
            assert any(where.endswith(f"/mu/{p}") or where.endswith(f"/nu/{p}") for p in params), where


def test_sharded_init_equals_unsharded_init(built):
    """Creating the state sharded on the mesh must not change the initial values."""
    params_key, _ = jax.random.split(jax.random.key(built.config.seed))
    with jax.default_device(jax.devices()[0]):
        reference = nnx.to_pure_dict(nnx.state(transformer.create(built.spec.model_config, params_key)))
    reference, actual = _flat(reference), _flat(built.state["params"])
    assert reference.keys() == actual.keys()
    for where in actual:
        np.testing.assert_allclose(np.asarray(actual[where]), np.asarray(reference[where]),
                                   atol=1e-7, rtol=0, err_msg=where)


# --- logical names -> mesh axes -------------------------------------------------------------


def test_logical_spec():
    assert partitioning.logical_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert partitioning.logical_spec(("layers", "embed", "heads", "kv")) == P(None, "fsdp", "tensor", None)
    assert partitioning.logical_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    assert partitioning.logical_spec(("max_len", "embed")) == P(None, "fsdp")
    assert partitioning.logical_spec(("norm",)) == P(None)
    assert partitioning.logical_spec(
        ("activation_batch", "activation_length", "activation_embed")) == P(("data", "fsdp"), None, None)
    assert partitioning.logical_spec(
        ("activation_batch", "activation_length", "activation_vocab")) == P(("data", "fsdp"), None, "tensor")
    assert partitioning.logical_spec((None, "mlp")) == P(None, "tensor")
    with pytest.raises(KeyError, match="bogus"):
        partitioning.logical_spec(("embed", "bogus"))


def test_rules_name_only_mesh_axes():
    for name, axes in partitioning.LOGICAL_RULES:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        assert set(axes) <= set(config_lib.MESH_AXES), name
    names = [name for name, _ in partitioning.LOGICAL_RULES]
    assert len(names) == len(set(names))


class _Inner(nnx.Module):
    def __init__(self, names):
        kwargs = {} if names is None else {"out_sharding": names}
        self.w = nnx.Param(jnp.zeros((4, 8)), **kwargs)


class _Outer(nnx.Module):
    def __init__(self, names):
        self.ok = nnx.Param(jnp.zeros((8,)), out_sharding=("embed",))
        self.inner = _Inner(names)


def _abstract(names) -> nnx.State:
    with nnx.use_eager_sharding(False):
        return nnx.state(nnx.eval_shape(lambda: _Outer(names)))


def test_param_shardings_of_a_small_module(mesh):
    shardings = partitioning.param_shardings(_abstract(("embed", "mlp")), mesh)
    assert shardings["inner"]["w"] == NamedSharding(mesh, P("fsdp", "tensor"))
    assert shardings["ok"] == NamedSharding(mesh, P("fsdp"))


@pytest.mark.parametrize("names, match", [
    (None, "inner/w.*no logical axis names"),
    (("embed",), "inner/w.*no logical axis names"),  # fewer names than dimensions
    (("embed", "bogus"), "inner/w.*bogus"),
])
def test_param_shardings_rejects_unnamed_or_unknown(mesh, names, match):
    with pytest.raises(ValueError, match=match):
        partitioning.param_shardings(_abstract(names), mesh)


# --- the batch --------------------------------------------------------------------------------


def test_batch_sharding_splits_over_data_and_fsdp(mesh):
    sharding = partitioning.batch_sharding(mesh)
    assert sharding.spec == P(("data", "fsdp"), None)
    assert partitioning.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    rows, length = 16, 64
    batch = jax.device_put(np.arange(rows * length, dtype=np.int32).reshape(rows, length), sharding)
    per_shard = rows // 4
    devices = np.asarray(mesh.devices)
    seen = set()
    for shard in batch.addressable_shards:
        d, f, t = (int(i[0]) for i in np.nonzero(devices == shard.device))
        first = (d * 2 + f) * per_shard  # data-major, then fsdp; tensor holds replicas
        assert shard.data.shape == (per_shard, length)
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], (np.arange(per_shard) + first) * length)
        seen.add((d, f))
    assert len(seen) == 4
    assert partitioning.replicated(mesh).is_fully_replicated


# --- gradient accumulation --------------------------------------------------------------------


def _train_one_step(accum_steps: int, mesh, batch_np):
    # warmup 0: the first step has the peak learning rate, so the update is not trivially zero.
    config = tiny_config(MESH | {"optim.grad_accum_steps": accum_steps, "optim.warmup_steps": 0})
    task = tasks.create(config, mesh)
    train_step, _ = task.compile()
    batch = task.global_batch(batch_np)
    state = task.spec.init()  # fresh: the compiled step donates its state argument
    new_state, metrics = train_step(state, batch)
    return jax.device_get(new_state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def accumulation_results(mesh):
    config = tiny_config(MESH | {"optim.warmup_steps": 0})
    spec = state_lib.build_state_spec(config, mesh)
    batch = dict(next(iter(make_dataset(config, "train", 0, 1))))
    initial = jax.device_get(spec.init()["params"])
    return initial, {accum: _train_one_step(accum, mesh, batch) for accum in (1, 2)}


def test_grad_accumulation_matches_single_step(accumulation_results):
    initial, results = accumulation_results
    (state1, metrics1), (state2, metrics2) = results[1], results[2]
    for key in ("loss", "text_loss", "image_loss", "tokens", "grad_norm", "lr"):
        np.testing.assert_allclose(metrics2[key], metrics1[key], atol=1e-5, rtol=0, err_msg=key)
    assert metrics1["tokens"] > 16 * 64 * 0.9  # every row, not one microbatch
    assert metrics1["lr"] == pytest.approx(3e-3)
    assert int(state1["step"]) == int(state2["step"]) == 1
    params1, params2, params0 = _flat(state1["params"]), _flat(state2["params"]), _flat(initial)
    moved = 0.0
    for where in params1:
        np.testing.assert_allclose(params2[where], params1[where], atol=1e-5, rtol=0, err_msg=where)
        moved = max(moved, float(np.max(np.abs(params1[where] - params0[where]))))
    assert moved > 1e-3  # the step really updated the parameters
    # First Adam moments are (1 - b1) * clipped gradient: the gradients agree too.
    mu1, mu2 = (_flat(s["opt_state"][1][0].mu) for s in (state1, state2))
    for where in mu1:
        np.testing.assert_allclose(mu2[where], mu1[where], atol=1e-7, rtol=0, err_msg=where)
