"""The NNX decoder: shapes, scan/unrolled and remat equivalence, packing, causality, init."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import MODERN_OVERRIDES, tiny_config
from flax import nnx
from jax.sharding import PartitionSpec

from cm3jax.models import transformer
from cm3jax.train import partitioning
from cm3jax.train.state import model_config

BATCH, LENGTH = 2, 16
VARIANTS = {"cm3leon": {}, "modern": MODERN_OVERRIDES}
# Non-zero output projections and a larger init, so every block visibly changes the logits.
BEHAVIOUR_OVERRIDES = {"model.zero_init_output": False, "model.init_std": 0.05,
                       "model.pos_init_std": 0.05}


def _cfg(variant: str, **changes):
    config = tiny_config(VARIANTS[variant] | BEHAVIOUR_OVERRIDES)
    return dataclasses.replace(model_config(config), **changes)


# Faster LLVM code generation for these many small programs (the XLA graph passes, and so
# what is computed, are unchanged; every comparison is between programs built the same way).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED: dict = {}


def _graphdef(cfg) -> nnx.GraphDef:
    """Graph of a model with architecture `cfg`, without initialising anything."""
    return nnx.split(nnx.eval_shape(lambda: transformer.create(cfg, 0)))[0]


def _make(kind: str, graphdef):
    def forward(params, tokens, positions, segment_ids):
        return nnx.merge(graphdef, params)(tokens, positions, segment_ids)

    def loss_and_grad(params, tokens, positions, segment_ids):
        def loss(params):
            logits = forward(params, tokens, positions, segment_ids)
            targets = jnp.roll(tokens, -1, axis=1)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, logits, grads

    return {"forward": forward, "grad": loss_and_grad}[kind]


def _run(kind: str, cfg, params, tokens, positions, segment_ids):
    """Runs the model of architecture `cfg` with `params` (compiled once per cfg and shape)."""
    args = (params, tokens, positions, segment_ids)
    key = (kind, cfg, tokens.shape)
    if key not in _COMPILED:
        lowered = jax.jit(_make(kind, _graphdef(cfg))).lower(*args)
        _COMPILED[key] = lowered.compile(compiler_options=FAST_COMPILE)
    out = _COMPILED[key](*args)
    return np.asarray(out) if kind == "forward" else out


class Setup:
    """One variant's model parameters, example inputs and their (scanned) logits."""

    def __init__(self, variant: str):
        self.cfg = _cfg(variant, remat_policy="none", scan_layers=True)
        self.params = nnx.to_pure_dict(nnx.state(transformer.create(self.cfg, 1)))
        rng = np.random.default_rng(0)
        self.tokens = jnp.asarray(rng.integers(0, self.cfg.vocab_size, (BATCH, LENGTH)), jnp.int32)
        self.positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))
        self.segment_ids = jnp.ones((BATCH, LENGTH), jnp.int32)
        self.logits = self.forward(self.tokens, self.positions, self.segment_ids)

    def forward(self, tokens, positions, segment_ids, cfg=None, params=None):
        return _run("forward", cfg or self.cfg, self.params if params is None else params,
                    tokens, positions, segment_ids)

    def grad(self, cfg):
        return _run("grad", cfg, self.params, self.tokens, self.positions, self.segment_ids)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def setup(request) -> Setup:
    return Setup(request.param)


def _flat(tree) -> list:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in leaves]


def test_output_shape_and_dtype(setup):
    assert setup.logits.shape == (BATCH, LENGTH, setup.cfg.vocab_size)
    assert setup.logits.dtype == np.float32
    assert np.all(np.isfinite(setup.logits))
    # The model is not degenerate: logits depend on the token and position.
    assert np.std(setup.logits) > 1e-3
    assert not np.allclose(setup.logits[0], setup.logits[1], atol=1e-3)


def test_bfloat16_compute_returns_float32_logits(setup):
    cfg = dataclasses.replace(setup.cfg, dtype="bfloat16")
    logits = setup.forward(setup.tokens, setup.positions, setup.segment_ids, cfg=cfg)
    assert logits.dtype == np.float32
    assert logits.shape == setup.logits.shape
    # Close to the float32 result, but computed in bfloat16 (so not identical).
    np.testing.assert_allclose(logits, setup.logits, atol=0.1)
    assert not np.array_equal(logits, setup.logits)


def test_parameter_shapes(setup):
    cfg, params = setup.cfg, setup.params
    assert params["embed"].shape == (cfg.vocab_size, cfg.d_model)
    attention = params["blocks"]["attention"]
    assert attention["query"].shape == (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim)
    assert attention["out"].shape == (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model)
    assert params["blocks"]["mlp"]["wo"].shape == (cfg.num_layers, cfg.mlp_dim, cfg.d_model)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.float32
    if cfg.position == "learned":
        assert params["positions"].shape == (cfg.max_len, cfg.d_model)
    else:
        assert "positions" not in params
    if cfg.tie_embeddings:
        assert "lm_head" not in params
    else:
        assert params["lm_head"].shape == (cfg.d_model, cfg.vocab_size)
    if cfg.activation == "swiglu":
        assert params["blocks"]["mlp"]["wi_gate"].shape == (cfg.num_layers, cfg.d_model, cfg.mlp_dim)
    else:
        assert "wi_gate" not in params["blocks"]["mlp"]


def test_scan_equals_unrolled(setup):
    cfg = dataclasses.replace(setup.cfg, scan_layers=False)
    unrolled = setup.forward(setup.tokens, setup.positions, setup.segment_ids, cfg=cfg)
    np.testing.assert_allclose(unrolled, setup.logits, atol=1e-5, rtol=0)
    # Guard: the unrolled loop uses every layer (zeroing the last one changes the logits).
    params = jax.tree.map(lambda x: x, setup.params)
    params["blocks"]["mlp"]["wo"] = params["blocks"]["mlp"]["wo"].at[-1].set(0.0)
    for c in (cfg, setup.cfg):
        changed = setup.forward(setup.tokens, setup.positions, setup.segment_ids, cfg=c, params=params)
        assert np.max(np.abs(changed - setup.logits)) > 1e-4


@pytest.fixture(scope="module")
def reference_grads(setup):
    value, logits, grads = setup.grad(dataclasses.replace(setup.cfg, remat_policy="none"))
    return float(value), np.asarray(logits), _flat(grads)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_matches_no_remat(setup, reference_grads, policy):
    ref_value, ref_logits, ref_grads = reference_grads
    np.testing.assert_allclose(ref_logits, setup.logits, atol=1e-5, rtol=0)
    value, logits, grads = setup.grad(dataclasses.replace(setup.cfg, remat_policy=policy))
    np.testing.assert_allclose(float(value), ref_value, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)
    grads = _flat(grads)
    assert [path for path, _ in grads] == [path for path, _ in ref_grads]
    for (path, g), (_, g_ref) in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=0, err_msg=path)
    # Every parameter receives a gradient (nothing silently detached).
    for path, g in ref_grads:
        assert np.any(np.asarray(g) != 0), path


# --- masking -------------------------------------------------------------------------------

DOC1, DOC2 = 7, 9  # lengths of two documents packed into one row of 16


def _packed_inputs(tokens):
    positions = np.concatenate([np.arange(DOC1), np.arange(DOC2)])[None].repeat(BATCH, 0)
    segment_ids = np.array([1] * DOC1 + [2] * DOC2)[None].repeat(BATCH, 0)
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids, jnp.int32)


def test_packed_documents_do_not_attend_across(setup):
    tokens, positions, segment_ids = _packed_inputs(setup.tokens)
    logits = setup.forward(tokens, positions, segment_ids)
    changed = tokens.at[:, :DOC1].set((tokens[:, :DOC1] + 17) % setup.cfg.vocab_size)
    changed_logits = setup.forward(changed, positions, segment_ids)
    # Document 1 sees its own change ...
    assert np.max(np.abs(changed_logits[:, :DOC1] - logits[:, :DOC1])) > 1e-3
    # ... document 2 does not.
    np.testing.assert_allclose(changed_logits[:, DOC1:], logits[:, DOC1:], atol=1e-6, rtol=0)


def test_packed_document_equals_document_alone(setup):
    tokens, positions, segment_ids = _packed_inputs(setup.tokens)
    packed = setup.forward(tokens, positions, segment_ids)
    # Document 2 alone at the start of a row (positions from 0), followed by padding.
    pad = LENGTH - DOC2
    alone_tokens = jnp.concatenate([tokens[:, DOC1:], jnp.zeros((BATCH, pad), jnp.int32)], axis=1)
    alone_positions = jnp.asarray(np.r_[np.arange(DOC2), np.zeros(pad)][None].repeat(BATCH, 0),
                                  jnp.int32)
    alone_segments = jnp.asarray(np.r_[np.ones(DOC2), np.zeros(pad)][None].repeat(BATCH, 0), jnp.int32)
    alone = setup.forward(alone_tokens, alone_positions, alone_segments)[:, :DOC2]
    np.testing.assert_allclose(packed[:, DOC1:], alone, atol=1e-5, rtol=0)
    # Without segment masking (one segment for the whole row) document 2 would see document 1.
    unmasked = setup.forward(tokens, positions, jnp.ones_like(segment_ids))
    assert np.max(np.abs(unmasked[:, DOC1:] - alone)) > 1e-3


def test_causality(setup):
    t = 10
    changed = setup.tokens.at[:, t].set((setup.tokens[:, t] + 1) % setup.cfg.vocab_size)
    logits = setup.forward(changed, setup.positions, setup.segment_ids)
    np.testing.assert_allclose(logits[:, :t], setup.logits[:, :t], atol=1e-6, rtol=0)
    for later in range(t, LENGTH):
        assert np.max(np.abs(logits[:, later] - setup.logits[:, later])) > 1e-4, later


# --- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_parameter_has_logical_axis_names(variant):
    known = {name for name, _ in partitioning.LOGICAL_RULES}
    abstract = nnx.split(nnx.eval_shape(lambda: transformer.create(_cfg(variant), 0)))[1]
    specs = dict(_flat(nnx.to_pure_dict(nnx.get_partition_spec(abstract))))
    shapes = dict(_flat(nnx.to_pure_dict(abstract)))
    assert specs.keys() == shapes.keys() and len(specs) >= 8
    for where, spec in specs.items():
        assert isinstance(spec, PartitionSpec), where
        assert len(spec) == len(shapes[where].shape), where
        for name in spec:
            assert isinstance(name, str) and name in known, (where, name)
        # Stacked block parameters carry the 'layers' axis first, and only they do.
        assert (spec[0] == "layers") == where.startswith("blocks/"), where
    assert specs["embed"] == PartitionSpec("vocab", "embed")
    assert specs["blocks/attention/query"] == PartitionSpec("layers", "embed", "heads", "kv")
    assert specs["blocks/mlp/wo"] == PartitionSpec("layers", "mlp", "embed")


def _flat_params(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    return {path: np.asarray(v)
            for path, v in _flat(nnx.to_pure_dict(nnx.state(transformer.create(cfg, seed))))}


@pytest.fixture(scope="module")
def default_params() -> dict[str, np.ndarray]:
    """Parameters of the CM3leon variant as initialised by default (tiny sizes)."""
    cfg = model_config(tiny_config())
    assert cfg.zero_init_output and not cfg.norm_params and cfg.init_std == 0.006
    return _flat_params(cfg)


def test_cm3leon_has_no_biases_or_norm_scales(default_params):
    leaf_names = {path.split("/")[-1] for path in default_params}
    assert leaf_names == {"embed", "positions", "query", "key", "value", "out", "wi", "wo"}
    assert "bias" not in leaf_names and "scale" not in leaf_names


def test_modern_variant_has_norm_parameters():
    abstract = nnx.split(nnx.eval_shape(
        lambda: transformer.create(model_config(tiny_config(MODERN_OVERRIDES)), 0)))[1]
    paths = set(dict(_flat(nnx.to_pure_dict(abstract))))
    assert {"final_norm/scale", "blocks/attention_norm/scale", "blocks/mlp_norm/scale",
            "blocks/attention/query_norm/scale", "blocks/attention/query_norm/bias",
            "lm_head", "blocks/mlp/wi_gate"} <= paths
    assert "positions" not in paths


def test_zero_initialised_output_projections(default_params):
    for name in ("blocks/attention/out", "blocks/mlp/wo"):
        assert not np.any(default_params[name]), name
    for name in ("blocks/attention/query", "blocks/mlp/wi", "embed"):
        assert np.any(default_params[name]), name


def test_output_projections_not_zero_when_disabled():
    params = _flat_params(model_config(tiny_config({"model.zero_init_output": False})))
    for name in ("blocks/attention/out", "blocks/mlp/wo"):
        assert np.std(params[name]) == pytest.approx(0.006, rel=0.1), name


@pytest.mark.parametrize("name, std", [("embed", 0.006), ("blocks/mlp/wi", 0.006),
                                       ("blocks/attention/query", 0.006), ("positions", 0.0002)])
def test_init_std(default_params, name, std):
    values = default_params[name]
    assert values.size >= 8192
    assert abs(float(np.mean(values))) < 0.1 * std
    assert np.std(values) == pytest.approx(std, rel=0.1)
    # Truncated at 3 std.
    assert np.max(np.abs(values)) <= 3 * std * (1 + 1e-6)


def test_layers_are_initialised_independently(default_params):
    wi = default_params["blocks/mlp/wi"]
    assert wi.shape[0] == 2
    assert not np.allclose(wi[0], wi[1])


def test_init_is_deterministic_in_seed(default_params):
    cfg = model_config(tiny_config())
    again, other = _flat_params(cfg, 0), _flat_params(cfg, 1)
    for name, value in default_params.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    assert not np.array_equal(other["embed"], default_params["embed"])


# --- hand-written backward passes ---------------------------------------------------------------


def test_gelu_mlp_and_tied_logits_gradients_match_autodiff():
    from cm3jax.models.layers import gelu_mlp
    from cm3jax.models.transformer import tied_logits

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 5, 8))
    wi = jax.random.normal(keys[1], (8, 16)) * 0.5
    wo = jax.random.normal(keys[2], (16, 8)) * 0.5
    table = jax.random.normal(keys[3], (12, 8))

    def reference_mlp(x, wi, wo):
        return jax.nn.gelu(x @ wi, approximate=False) @ wo

    def reference_logits(x, table):
        return jnp.einsum("ble,ve->blv", x, table)

    for fast, slow, args in ((gelu_mlp, reference_mlp, (x, wi, wo)), (tied_logits, reference_logits, (x, table))):
        np.testing.assert_allclose(fast(*args), slow(*args), atol=1e-6)
        loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
        got = jax.grad(loss(fast), argnums=tuple(range(len(args))))(*args)
        want = jax.grad(loss(slow), argnums=tuple(range(len(args))))(*args)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_image_grid_adds_sharded_row_and_column_embeddings():
    cfg = dataclasses.replace(model_config(tiny_config()), image_grid=4)
    abstract = nnx.split(nnx.eval_shape(lambda: transformer.create(cfg, 0)))[1]
    shapes = nnx.to_pure_dict(abstract)
    assert shapes["code_rows"].shape == shapes["code_cols"].shape == (4, cfg.d_model)
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = partitioning.param_shardings(abstract, mesh)
    assert shardings["code_rows"].spec == PartitionSpec(None, "fsdp")
