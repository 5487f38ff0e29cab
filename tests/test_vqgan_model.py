"""The VQGAN tokenizer model: shapes, quantiser maths, EMA / restart state, GAN losses, axes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3jax.errors import ConfigError
from cm3jax.models import discriminator, quantizer, vqgan
from cm3jax.models.logical import to_partition_spec
from cm3jax.models.quantizer import CodebookStats, VectorQuantizer
from cm3jax.train.partitioning import LOGICAL_RULES

TINY = vqgan.VQGANConfig(resolution=16, base_channels=16, channel_multipliers=(1, 2),
                         num_res_blocks=1, embed_dim=8, codebook_size=32, disc_channels=8,
                         disc_layers=2)


def _quantizer(**changes) -> VectorQuantizer:
    cfg = dataclasses.replace(TINY, **changes)
    return vqgan.jit_create(VectorQuantizer, cfg, 0)


def _set(variable: nnx.Variable, value) -> None:
    variable[...] = jnp.asarray(value, variable[...].dtype)


def _split_call(module: nnx.Module, fn):
    """jit of fn(module, *args) through nnx.split / merge: (result, new state of all variables)."""
    graphdef, params, stats = nnx.split(module, nnx.Param, CodebookStats)

    def run(params, stats, *args):
        m = nnx.merge(graphdef, params, stats)
        return fn(m, *args), nnx.state(m)

    return lambda *args: _fast_jit(run)(params, stats, *args)


# Cheaper LLVM code generation for these small programs (XLA graph passes are unchanged).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _fast_jit(fn):
    """jax.jit(fn), compiled with FAST_COMPILE."""
    jitted = jax.jit(fn)
    return lambda *args: jitted.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


# ---------------------------------------------------------------- full model


@pytest.fixture(scope="module", params=["f2", "f4"])
def model_case(request):
    """(model, outputs of one jitted pass): downsample 2 (plain), 4 (l2 + factorised codes)."""
    if request.param == "f2":
        cfg = TINY
    else:
        cfg = dataclasses.replace(TINY, channel_multipliers=(1, 1, 2), code_dim=4,
                                  l2_normalize=True, attention=False)
    model = vqgan.create_vqgan(cfg, 0)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1.0, maxval=1.0)

    def passes(m, images):
        reconstruction, out = m(images, train=False)
        return reconstruction, out, m.decode_codes(out.codes)

    outputs, _ = _split_call(model, passes)(images)
    # encode(): shapes only (abstract evaluation, nothing to compile).
    encoded = jax.eval_shape(lambda x: nnx.merge(*nnx.split(model)).encode(x), images)
    return model, (*outputs, encoded)


def test_shapes_for_two_downsample_factors(model_case):
    model, (reconstruction, out, _, (quantized, codes, encoded_out)) = model_case
    cfg = model.cfg
    g = 16 // cfg.downsample
    assert cfg.grid == g and g in (8, 4)
    assert reconstruction.shape == (2, 16, 16, 3) and reconstruction.dtype == jnp.float32
    assert out.codes.shape == codes.shape == encoded_out.codes.shape == (2, g, g)
    assert out.codes.dtype == codes.dtype == jnp.int32
    assert out.quantized.shape == quantized.shape == out.latents.shape == (2, g, g, cfg.embed_dim)
    assert model.quantizer.codebook.shape == (cfg.codebook_size, cfg.lookup_dim)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < cfg.codebook_size
    assert out.loss.shape == out.perplexity.shape == out.usage.shape == ()
    assert np.isfinite(np.asarray(reconstruction)).all() and float(out.loss) > 0


def test_decode_codes_matches_reconstruction_path(model_case):
    _, (reconstruction, _, decoded, _) = model_case
    np.testing.assert_allclose(decoded, reconstruction, atol=1e-5)


def test_wrong_image_or_code_shape_raises_with_expected_shape(model_case):
    model, _ = model_case
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]"):
        model.encode(jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]"):
        model(jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]"):
        model.encode(jnp.zeros((16, 16, 3)))
    g = model.cfg.grid
    with pytest.raises(ValueError, match=rf"\[batch, {g}, {g}\]"):
        model.decode_codes(jnp.zeros((1, g + 1, g), jnp.int32))
    assert model.last_decoder_layer is model.decoder.conv_out.kernel
    node = model
    for key in vqgan.LAST_DECODER_LAYER:
        node = getattr(node, key)
    assert node.shape == (3, 3, model.cfg.base_channels, 3)


@pytest.mark.parametrize("changes", [{}, {"ema": True, "code_dim": 4, "disc_norm": "none"}])
def test_every_variable_has_logical_axis_names(changes):
    cfg = dataclasses.replace(TINY, **changes)
    rules = LOGICAL_RULES
    for module_class in (vqgan.VQGAN, discriminator.PatchDiscriminator):
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: module_class(cfg, rngs=nnx.Rngs(params=0)))
        variables = list(nnx.to_flat_state(nnx.state(abstract)))
        assert len(variables) > 5
        for path, variable in variables:
            names = variable.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(variable.shape), (path, names)
            to_partition_spec(names, rules)  # every name has a proposed rule
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: VectorQuantizer(cfg, nnx.Rngs(params=0)))
    stats = nnx.state(abstract, CodebookStats)
    expected = {"usage"} | ({"codebook", "cluster_size", "embed_sum"} if cfg.ema else set())
    assert {str(path[0]) for path, _ in nnx.to_flat_state(stats)} == expected


def test_config_from_ml_collections_and_validation():
    config = vqgan.base_vqgan_config()
    cfg = vqgan.VQGANConfig.from_config(config)
    assert cfg == vqgan.VQGANConfig()
    assert (cfg.downsample, cfg.grid, cfg.codebook_size, cfg.lookup_dim) == (8, 32, 8192, 256)
    config.code_dim, config.channel_multipliers = 32, (1, 1, 2, 2, 4)
    cfg = vqgan.VQGANConfig.from_config(config)
    assert (cfg.lookup_dim, cfg.downsample, cfg.grid) == (32, 16, 16)
    with pytest.raises(ConfigError, match="vqgan.resolution"):
        dataclasses.replace(TINY, resolution=17)
    with pytest.raises(ConfigError, match="vqgan.disc_layers"):
        dataclasses.replace(TINY, disc_layers=3)


# ---------------------------------------------------------------- quantiser


def test_straight_through_and_codebook_gradients():
    q = _quantizer(embed_dim=4, codebook_size=8, commitment_beta=0.25, codebook_loss_weight=0.7)
    _set(q.codebook, jax.random.normal(jax.random.key(0), (8, 4)))
    z = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
    r = jax.random.normal(jax.random.key(2), z.shape)
    graphdef, params, stats = nnx.split(q, nnx.Param, CodebookStats)

    @_fast_jit
    def grads(params, z):
        def term(which):
            def f(params, z):
                out = nnx.merge(graphdef, params, stats)(z)
                return {"task": jnp.sum(out.quantized * r), "commit": out.commitment_loss,
                        "codebook": out.codebook_loss, "loss": out.loss}[which]
            return jax.grad(f, argnums=(0, 1))(params, z)
        return {k: term(k) for k in ("task", "commit", "codebook", "loss")}

    g = grads(params, z)
    out = q(z)
    codebook, codes = np.asarray(q.codebook[...]), np.asarray(out.codes).reshape(-1)
    np.testing.assert_allclose(out.quantized, codebook[np.asarray(out.codes)], atol=1e-6)
    # Identity Jacobian: d task / d z == d task / d quantized == r; the codebook gets nothing.
    np.testing.assert_allclose(g["task"][1], r, atol=1e-6)
    np.testing.assert_array_equal(g["task"][0]["codebook"][...], 0.0)
    np.testing.assert_array_equal(g["commit"][0]["codebook"][...], 0.0)
    # Codebook loss mean((sg(z) - e_c)^2): d/de_k = 2 sum_{i: c_i = k} (e_k - z_i) / (N d).
    flat = np.asarray(z).reshape(-1, 4)
    expected = np.zeros_like(codebook)
    np.add.at(expected, codes, 2.0 * (codebook[codes] - flat) / flat.size)
    np.testing.assert_allclose(g["codebook"][0]["codebook"][...], expected, atol=1e-6)
    np.testing.assert_allclose(g["loss"][0]["codebook"][...], 0.7 * expected, atol=1e-6)
    np.testing.assert_array_equal(g["codebook"][1], 0.0)  # the codebook loss does not move z
    commitment_grad = 0.25 * 2.0 * (z - out.quantized) / flat.size
    np.testing.assert_allclose(g["loss"][1], commitment_grad, atol=1e-6)


@pytest.mark.parametrize("l2", [False, True])
def test_lookup_equals_brute_force(l2):
    q = _quantizer(embed_dim=6, codebook_size=40, l2_normalize=l2)
    codebook = np.asarray(jax.random.normal(jax.random.key(3), (40, 6)))
    _set(q.codebook, codebook)
    z = np.asarray(jax.random.normal(jax.random.key(4), (256, 6)) * 2.0)
    codes = np.asarray(_fast_jit(lambda z: q.lookup(z))(z))
    if l2:
        cosine = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (
            codebook / np.linalg.norm(codebook, axis=1, keepdims=True)).T
        expected = cosine.argmax(1)
    else:
        expected = ((z[:, None, :].astype(np.float64) - codebook[None]) ** 2).sum(-1).argmin(1)
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, expected)
    raw = np.asarray(_fast_jit(quantizer.nearest_codes)(z, codebook))
    np.testing.assert_array_equal(raw, ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1))


@pytest.mark.parametrize("l2", [False, True])
def test_factorised_codes_are_looked_up_in_code_dim_space(l2):
    q = _quantizer(embed_dim=8, code_dim=3, codebook_size=16, l2_normalize=l2)
    assert q.codebook.shape == (16, 3) and q.in_proj.shape == (8, 3) and q.out_proj.shape == (3, 8)
    codebook = np.asarray(jax.random.normal(jax.random.key(5), (16, 3)))
    _set(q.codebook, codebook)
    _set(q.in_bias, [0.1, -0.2, 0.3])
    z = np.asarray(jax.random.normal(jax.random.key(6), (2, 4, 4, 8)))
    out = _fast_jit(lambda z: q(z))(z)
    w_in, b_in = np.asarray(q.in_proj[...]), np.asarray(q.in_bias[...])
    w_out, b_out = np.asarray(q.out_proj[...]), np.asarray(q.out_bias[...])
    low = z.reshape(-1, 8) @ w_in + b_in
    if l2:
        low /= np.linalg.norm(low, axis=1, keepdims=True)
        codebook = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    expected = ((low[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1), expected)
    np.testing.assert_allclose(np.asarray(out.quantized).reshape(-1, 8),
                               codebook[expected] @ w_out + b_out, atol=1e-5)
    np.testing.assert_allclose(out.commitment_loss, ((low - codebook[expected]) ** 2).mean(),
                               rtol=1e-5)


def test_ema_update_matches_numpy_for_one_step():
    decay, usage_decay, eps, k, d = 0.9, 0.8, 0.5, 6, 3  # large eps: smoothing visible
    q = _quantizer(embed_dim=d, codebook_size=k, ema=True, ema_decay=decay, usage_decay=usage_decay,
                   ema_epsilon=eps, commitment_beta=0.5)
    assert isinstance(q.codebook, CodebookStats)
    codebook = np.asarray(jax.random.normal(jax.random.key(7), (k, d)))
    _set(q.codebook, codebook)
    _set(q.embed_sum, codebook)
    z = np.asarray(jax.random.normal(jax.random.key(8), (20, d)))
    out, new = _split_call(q, lambda m, z: m(z, train=True))(z)
    frozen, unchanged = _split_call(q, lambda m, z: m(z, train=False))(z)

    codes = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(codes, minlength=k).astype(np.float64)
    sums = np.zeros((k, d))
    np.add.at(sums, codes, z)
    cluster = decay * 1.0 + (1 - decay) * counts
    embed_sum = decay * codebook + (1 - decay) * sums
    n = cluster.sum()
    updated = embed_sum / ((cluster + eps) / (n + k * eps) * n)[:, None]
    np.testing.assert_array_equal(out.codes, codes)
    np.testing.assert_allclose(new["cluster_size"][...], cluster, rtol=1e-5)
    np.testing.assert_allclose(new["embed_sum"][...], embed_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["codebook"][...], updated, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["usage"][...], (1 - usage_decay) * counts, rtol=1e-6)
    np.testing.assert_allclose(out.loss, 0.5 * out.commitment_loss, rtol=1e-6)  # no codebook term
    for name in ("codebook", "cluster_size", "embed_sum", "usage"):  # train=False changes nothing
        np.testing.assert_array_equal(unchanged[name][...], getattr(q, name)[...])
    np.testing.assert_array_equal(frozen.codes, out.codes)


@pytest.mark.parametrize("ema,l2,n", [(False, False, 20), (True, False, 20), (False, True, 5)])
def test_dead_code_restart_replaces_exactly_the_dead_codes(ema, l2, n):
    k, d = 8, 4
    q = _quantizer(embed_dim=d, codebook_size=k, ema=ema, l2_normalize=l2, dead_code_threshold=1.0)
    codebook = np.asarray(jax.random.normal(jax.random.key(9), (k, d)))
    usage = np.array([5.0, 0.5, 2.0, 0.0, 1.0, 0.99, 3.0, 1.0], np.float32)
    _set(q.codebook, codebook)
    _set(q.usage, usage)
    if ema:
        _set(q.cluster_size, usage + 2.0)
        _set(q.embed_sum, 2.0 * codebook)
    dead = usage < 1.0
    batch = np.asarray(jax.random.normal(jax.random.key(10), (n, d)))
    restart = _split_call(q, lambda m, z, key: m.restart_dead_codes(z, key))
    count, new = restart(batch, jax.random.key(11))
    assert int(count) == dead.sum() == 3
    candidates = batch / np.linalg.norm(batch, axis=1, keepdims=True) if l2 else batch
    restarted = np.asarray(new["codebook"][...])
    np.testing.assert_array_equal(restarted[~dead], codebook[~dead])
    matches = [np.flatnonzero(np.all(np.isclose(row, candidates, atol=1e-6), axis=1))
               for row in restarted[dead]]
    assert all(len(m) == 1 for m in matches), matches
    if n >= k:
        assert len({int(m[0]) for m in matches}) == 3  # distinct batch vectors
    np.testing.assert_array_equal(new["usage"][...], np.where(dead, 1.0, usage))
    if ema:
        np.testing.assert_array_equal(new["cluster_size"][...], np.where(dead, 1.0, usage + 2.0))
        np.testing.assert_allclose(new["embed_sum"][...][dead], restarted[dead])
        np.testing.assert_array_equal(new["embed_sum"][...][~dead], 2.0 * codebook[~dead])


def test_usage_and_perplexity_on_a_constructed_example():
    counts, perplexity, usage = quantizer.code_histogram(jnp.array([[0, 0], [1, 1]]), 4)
    np.testing.assert_array_equal(counts, [2, 2, 0, 0])
    np.testing.assert_allclose(perplexity, 2.0, rtol=1e-5)
    np.testing.assert_allclose(usage, 0.5)
    _, perplexity, usage = quantizer.code_histogram(jnp.array([0, 1, 2, 3, 0, 1, 2, 3]), 8)
    np.testing.assert_allclose((perplexity, usage), (4.0, 0.5), rtol=1e-5)

    q = _quantizer(embed_dim=4, codebook_size=4, usage_decay=0.5)
    _set(q.codebook, 3.0 * np.eye(4))
    z = 3.0 * np.eye(4)[[0, 0, 0, 2]] + 0.1  # three vectors at code 0, one at code 2
    out, stats = _split_call(q, lambda m, z: m(z, train=True))(z)
    np.testing.assert_array_equal(out.codes, [0, 0, 0, 2])
    p = np.array([0.75, 0.25])
    np.testing.assert_allclose(out.perplexity, np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    np.testing.assert_allclose(out.usage, 0.5)
    np.testing.assert_allclose(stats["usage"][...], [1.5, 0.0, 0.5, 0.0])


# ---------------------------------------------------------------- discriminator and GAN losses


def test_patch_discriminator_logit_map():
    disc = discriminator.create_discriminator(TINY, 0)
    images = jnp.zeros((3, 16, 16, 3))
    logits = _fast_jit(lambda x: nnx.merge(*nnx.split(disc))(x))(images)
    assert logits.shape == (3, 16 // 4 - 2, 16 // 4 - 2) and logits.dtype == jnp.float32
    assert len(disc.convs) == 3 and disc.norms[1] is not None
    with pytest.raises(ValueError, match=r"\[batch, 16, 16, 3\]"):
        disc(jnp.zeros((3, 8, 8, 3)))


def test_hinge_losses_and_adaptive_weight_hand_checked():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2] -> 1.
    np.testing.assert_allclose(discriminator.hinge_d_loss(real, fake), 2.5 / 3 + 1.0, rtol=1e-6)
    np.testing.assert_allclose(discriminator.hinge_g_loss(fake), 1.0 / 3, rtol=1e-6)
    nll, g = jnp.array([[3.0], [4.0]]), jnp.array([[6.0], [8.0]])
    weight = discriminator.adaptive_weight
    np.testing.assert_allclose(weight(nll, g), 5.0 / (10.0 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(weight(nll, jnp.zeros(2)), 1e4)  # 5 / 1e-4, clipped
    np.testing.assert_allclose(discriminator.adaptive_weight(nll, g, max_weight=0.1), 0.1)
    np.testing.assert_array_equal(jax.grad(lambda a: discriminator.adaptive_weight(a, g))(nll), 0.0)


def test_patch_encoder_codes_see_only_their_patch():
    """encoder='patch': changing one f x f patch changes that latent and no other."""
    cfg = dataclasses.replace(TINY, encoder="patch")
    model = vqgan.create_vqgan(cfg, 0)
    images = np.zeros((2, 16, 16, 3), np.float32)
    images[1, 4:6, 10:12] = 1.0  # the patch at latent (2, 5) for f = 2
    latents = np.asarray(jax.jit(lambda m, x: m.quant_conv(m.encoder(x)))(model, images))
    changed = np.argwhere(np.abs(latents[0] - latents[1]).sum(-1) > 0)
    np.testing.assert_array_equal(changed, [[2, 5]])


def test_unknown_encoder_names_the_field():
    with pytest.raises(ConfigError, match="vqgan.encoder"):
        dataclasses.replace(TINY, encoder="vit")
