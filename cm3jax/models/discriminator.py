"""Patch discriminator and GAN losses of the VQGAN (taming-transformers, Flax NNX).

`PatchDiscriminator` is taming's NLayerDiscriminator (pix2pix PatchGAN): 4x4 convolutions,
`disc_layers` of them with stride 2, LeakyReLU(0.2), then a stride-1 layer and a 1-channel
stride-1 output conv, so each logit judges one receptive-field patch. BatchNorm is replaced
by GroupNorm (`disc_norm='group'`) or nothing (`'none'`): no running batch statistics, so the
discriminator is a pure function of its parameters. Weights are N(0, 0.02), norm scales
N(1, 0.02) (taming's weights_init).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cm3jax.models.vqgan import Conv, GroupNorm, VQGANConfig, jit_create


def _normal(mean: float, std: float) -> nnx.Initializer:
    return lambda key, shape, dtype=jnp.float32: mean + std * jax.random.normal(key, shape, dtype)


class PatchDiscriminator(nnx.Module):
    """Images [B, R, R, C] in [-1, 1] -> patch logits [B, s, s], s = R / 2^disc_layers - 2."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        ndf, n = cfg.disc_channels, cfg.disc_layers
        init, norm_init = _normal(0.0, 0.02), _normal(1.0, 0.02)
        use_norm = cfg.disc_norm == "group"
        convs = [Conv(cfg, rngs, cfg.in_channels, ndf, kernel=4, stride=2, padding=1, init=init)]
        norms = [None]
        mult = 1
        for i in range(1, n + 1):
            previous, mult = mult, min(2**i, 8)
            convs.append(Conv(cfg, rngs, ndf * previous, ndf * mult, kernel=4,
                              stride=2 if i < n else 1, padding=1, bias=not use_norm, init=init))
            norms.append(GroupNorm(cfg, rngs, ndf * mult, eps=1e-5, scale_init=norm_init)
                         if use_norm else None)
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.conv_out = Conv(cfg, rngs, ndf * mult, 1, kernel=4, stride=1, padding=1, init=init)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Patch logits (float32) of images [B, R, R, C]; raises ValueError on another shape."""
        r, c = self.cfg.resolution, self.cfg.in_channels
        if images.ndim != 4 or tuple(images.shape[1:]) != (r, r, c):
            raise ValueError(f"discriminator expects images of shape [batch, {r}, {r}, {c}], "
                             f"got shape {tuple(images.shape)}")
        x = images
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = jax.nn.leaky_relu(x if norm is None else norm(x), negative_slope=0.2)
        return self.conv_out(x)[..., 0].astype(jnp.float32)


def create_discriminator(cfg: VQGANConfig, seed: int | jax.Array) -> PatchDiscriminator:
    """Builds a PatchDiscriminator initialised from `seed` (no sharding applied)."""
    return jit_create(PatchDiscriminator, cfg, seed)


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Discriminator hinge loss: mean(relu(1 - real)) + mean(relu(1 + fake)).

    (taming's hinge_d_loss is half of this; the brief's unhalved form is used here.)
    """
    real, fake = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
    return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
    """Generator loss against a hinge discriminator: -mean(fake)."""
    return -jnp.mean(fake_logits.astype(jnp.float32))


def adaptive_weight(nll_grads_last_layer: jax.Array, g_grads_last_layer: jax.Array,
                    max_weight: float = 1e4) -> jax.Array:
    """taming's calculate_adaptive_weight (before the discriminator_weight factor).

    ||grad nll|| / (||grad g|| + 1e-4), clipped to [0, max_weight], gradient stopped. Both
    arguments are gradients w.r.t. the decoder's last layer (`VQGAN.last_decoder_layer`).
    """
    nll_norm = jnp.linalg.norm(jnp.ravel(nll_grads_last_layer).astype(jnp.float32))
    g_norm = jnp.linalg.norm(jnp.ravel(g_grads_last_layer).astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, max_weight))
