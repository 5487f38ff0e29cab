"""Vector quantiser of the VQGAN image tokenizer (Flax NNX).

Taming-transformers' VectorQuantizer plus the options of modern tokenizers, all from the
config (`VQGANConfig`, see cm3jax/models/vqgan.py):

- factorised codes (ViT-VQGAN): latents are projected from `embed_dim` to a small `code_dim`
  for the lookup and back afterwards (`code_dim` <= 0 or == `embed_dim` disables both);
- l2-normalised codes: latents and codebook rows are unit vectors, so the nearest code
  by squared L2 is the code of maximum cosine similarity;
- codebook training either by gradients (codebook loss, weight `codebook_loss_weight`) or by
  exponential moving averages (`ema=True`, VQ-VAE-2), plus the commitment loss with
  `commitment_beta` in both cases;
- dead-code restart from batch encoder outputs (`restart_dead_codes`);
- the straight-through estimator: `z + stop_gradient(q - z)`.

State that is not trained by gradients (EMA statistics, the usage counter and, with
`ema=True`, the codebook itself) lives in `CodebookStats` variables. `__call__(z, train=True)`
and `restart_dead_codes` update them by mutation, NNX style. Under `jax.jit`, split the
model with `nnx.split(model, nnx.Param, CodebookStats)`, merge inside the jitted function,
and return `nnx.state(model, CodebookStats)` so the caller keeps the updated statistics
(`nnx.jit` does this automatically). Inside `jax.grad`, merge with
`nnx.merge(graphdef, params, stats, copy=True)`: NNX refuses to mutate a variable created
at an outer trace level. `restart_dead_codes` also writes the codebook, which is an
`nnx.Param` unless `ema`, so return both states from a jitted restart.

The usage counter is an EMA (decay `usage_decay`) of per-step assignment counts, starting
at 0: call `restart_dead_codes` every ~1 / (1 - usage_decay) steps, not every step (a
restart before the first training step seeds the whole codebook from data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from cm3jax.models.layers import make_param

if TYPE_CHECKING:  # vqgan.py imports this module
    from cm3jax.models.vqgan import VQGANConfig

# Logical axis names of the quantiser's variables.
CODEBOOK_NAMES = ("codebook", "code_dim")
PROJECTION_NAMES = ("conv_in", "conv_out")


class CodebookStats(nnx.Variable):
    """Quantiser state updated outside the optimiser: EMA statistics, usage, EMA codebook."""


@flax.struct.dataclass
class QuantizerOutput:
    """What the quantiser returns (a pytree, so it can leave `jax.jit`).

    Attributes:
      quantized: [..., embed_dim] straight-through quantised latents (the decoder's input);
        its value is the (projected-back) codebook vector, its gradient flows to the latents.
      codes: [...] int32 code indices.
      latents: [..., embed_dim] the quantiser input (encoder output), float32.
      loss: commitment_beta * commitment_loss (+ codebook_loss_weight * codebook_loss unless ema).
      commitment_loss: mean((z - stop_gradient(q))^2) in code space.
      codebook_loss: mean((stop_gradient(z) - q)^2) in code space (reported also with ema).
      perplexity: exp(entropy) of the batch code histogram.
      usage: fraction of the codebook used at least once by this batch.
    """

    quantized: jax.Array
    codes: jax.Array
    latents: jax.Array
    loss: jax.Array
    commitment_loss: jax.Array
    codebook_loss: jax.Array
    perplexity: jax.Array
    usage: jax.Array


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis (zero vectors stay zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Exact nearest codebook row by squared L2: argmin ||z||^2 - 2 z.e + ||e||^2.

    Args:
      z: [N, d] float vectors.
      codebook: [K, d].

    Returns:
      [N] int32 indices.
    """
    z, codebook = z.astype(jnp.float32), codebook.astype(jnp.float32)
    dots = jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
    distances = (jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * dots
                 + jnp.sum(jnp.square(codebook), -1)[None, :])
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def code_histogram(codes: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(counts [K], perplexity, usage fraction) of a batch of codes."""
    counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return counts, perplexity, jnp.mean((counts > 0).astype(jnp.float32))


class VectorQuantizer(nnx.Module):
    """Nearest-neighbour vector quantiser with straight-through gradients."""

    def __init__(self, cfg: "VQGANConfig", rngs: nnx.Rngs):
        self.cfg = cfg
        k, d, e = cfg.codebook_size, cfg.lookup_dim, cfg.embed_dim
        dtype = jnp.dtype(cfg.param_dtype)
        # taming: uniform(-1/K, 1/K); l2-normalised codes are rescaled by the lookup anyway.
        init = jax.random.uniform(rngs.params(), (k, d), dtype, -1.0 / k, 1.0 / k)
        kind = CodebookStats if cfg.ema else nnx.Param
        self.codebook = kind(init, out_sharding=CODEBOOK_NAMES)
        self.usage = CodebookStats(jnp.zeros((k,), jnp.float32), out_sharding=CODEBOOK_NAMES[:1])
        if cfg.ema:
            self.cluster_size = CodebookStats(jnp.ones((k,), jnp.float32),
                                              out_sharding=CODEBOOK_NAMES[:1])
            self.embed_sum = CodebookStats(init.astype(jnp.float32), out_sharding=CODEBOOK_NAMES)
        else:
            self.cluster_size = self.embed_sum = None
        if d != e:
            lecun = nnx.initializers.lecun_normal()
            zeros = nnx.initializers.zeros
            self.in_proj = make_param(rngs, lecun, (e, d), PROJECTION_NAMES, cfg)
            self.in_bias = make_param(rngs, zeros, (d,), PROJECTION_NAMES[1:], cfg)
            self.out_proj = make_param(rngs, lecun, (d, e), PROJECTION_NAMES, cfg)
            self.out_bias = make_param(rngs, zeros, (e,), PROJECTION_NAMES[1:], cfg)
        else:
            self.in_proj = self.in_bias = self.out_proj = self.out_bias = None

    def project(self, z: jax.Array) -> jax.Array:
        """Latents [..., embed_dim] -> lookup space [..., code_dim] (projected, normalised), f32."""
        z = z.astype(jnp.float32)
        if self.in_proj is not None:
            z = z @ self.in_proj[...].astype(jnp.float32) + self.in_bias[...].astype(jnp.float32)
        return l2_normalize(z) if self.cfg.l2_normalize else z

    def unproject(self, q: jax.Array) -> jax.Array:
        """Lookup space [..., code_dim] -> latent space [..., embed_dim]."""
        if self.out_proj is None:
            return q
        return q @ self.out_proj[...].astype(jnp.float32) + self.out_bias[...].astype(jnp.float32)

    def codebook_vectors(self) -> jax.Array:
        """The codebook as the lookup sees it: [K, code_dim] float32 (normalised if l2)."""
        codebook = self.codebook[...].astype(jnp.float32)
        return l2_normalize(codebook) if self.cfg.l2_normalize else codebook

    def lookup(self, z: jax.Array) -> jax.Array:
        """Codes [...] int32 of latents [..., embed_dim] (no state change)."""
        flat = self.project(z).reshape(-1, self.cfg.lookup_dim)
        return nearest_codes(flat, self.codebook_vectors()).reshape(z.shape[:-1])

    def embed_codes(self, codes: jax.Array) -> jax.Array:
        """Codes [...] -> quantised latents [..., embed_dim] float32 (out-of-range codes clip)."""
        return self.unproject(jnp.take(self.codebook_vectors(), codes, axis=0, mode="clip"))

    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantises latents z [..., embed_dim]; with `train`, updates usage (and EMA) stats."""
        cfg = self.cfg
        latents = z.astype(jnp.float32)
        zc = self.project(latents)
        flat = zc.reshape(-1, cfg.lookup_dim)
        codebook = self.codebook_vectors()
        codes = nearest_codes(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(codebook))
        q = jnp.take(codebook, codes, axis=0).reshape(zc.shape)
        commitment = jnp.mean(jnp.square(zc - jax.lax.stop_gradient(q)))
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zc) - q))
        loss = cfg.commitment_beta * commitment
        if not cfg.ema:
            loss = loss + cfg.codebook_loss_weight * codebook_loss
        quantized = self.unproject(zc + jax.lax.stop_gradient(q - zc))  # straight-through
        counts, perplexity, usage = code_histogram(codes, cfg.codebook_size)
        if train:
            self._update_stats(jax.lax.stop_gradient(flat), codes, counts)
        return QuantizerOutput(quantized=quantized, codes=codes.reshape(zc.shape[:-1]),
                               latents=latents, loss=loss, commitment_loss=commitment,
                               codebook_loss=codebook_loss, perplexity=perplexity, usage=usage)

    def _update_stats(self, flat: jax.Array, codes: jax.Array, counts: jax.Array) -> None:
        """Usage EMA always; with ema, VQ-VAE-2 cluster-size / sum EMAs and the codebook."""
        cfg = self.cfg
        self.usage[...] = cfg.usage_decay * self.usage[...] + (1.0 - cfg.usage_decay) * counts
        if not cfg.ema:
            return
        decay, k = cfg.ema_decay, cfg.codebook_size
        sums = jax.ops.segment_sum(flat, codes, num_segments=k)
        cluster = decay * self.cluster_size[...] + (1.0 - decay) * counts
        embed_sum = decay * self.embed_sum[...] + (1.0 - decay) * sums
        total = jnp.sum(cluster)
        smoothed = (cluster + cfg.ema_epsilon) / (total + k * cfg.ema_epsilon) * total  # Laplace
        self.cluster_size[...] = cluster
        self.embed_sum[...] = embed_sum
        self.codebook[...] = (embed_sum / smoothed[:, None]).astype(self.codebook[...].dtype)

    def restart_dead_codes(self, encoder_outputs_flat: jax.Array, rng: jax.Array) -> jax.Array:
        """Replaces every code with usage < dead_code_threshold by a random batch encoder output.

        The batch vectors are projected / normalised into lookup space first. Restarted codes
        get usage = threshold (a grace period) and, with ema, cluster_size 1 and embed_sum
        = the new vector. Other codes and stats are untouched. Pure and jittable (state is
        mutated NNX style); with gradient-trained codebooks the optimiser moments of the
        restarted rows are left as they are. Usage starts at 0, so a restart before any
        training step seeds the whole codebook from data.

        Args:
          encoder_outputs_flat: [N, embed_dim] encoder outputs (e.g. `QuantizerOutput.latents`).
          rng: PRNG key choosing the replacement vectors (distinct rows when N >= K).

        Returns:
          int32 scalar, the number of restarted codes.
        """
        cfg, k = self.cfg, self.cfg.codebook_size
        z = jax.lax.stop_gradient(self.project(encoder_outputs_flat.reshape(-1, cfg.embed_dim)))
        n = z.shape[0]
        if n >= k:
            index = jax.random.permutation(rng, n)[:k]
        else:
            index = jax.random.randint(rng, (k,), 0, n)
        new = z[index]
        dead = self.usage[...] < cfg.dead_code_threshold
        old = self.codebook[...]
        self.codebook[...] = jnp.where(dead[:, None], new.astype(old.dtype), old)
        self.usage[...] = jnp.where(dead, jnp.float32(cfg.dead_code_threshold), self.usage[...])
        if cfg.ema:
            self.cluster_size[...] = jnp.where(dead, 1.0, self.cluster_size[...])
            self.embed_sum[...] = jnp.where(dead[:, None], new, self.embed_sum[...])
        return jnp.sum(dead).astype(jnp.int32)
