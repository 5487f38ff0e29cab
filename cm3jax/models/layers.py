"""Transformer building blocks (Flax NNX): norms, attention, MLP, rotary embeddings.

Every parameter carries logical axis names (`out_sharding` metadata), which the trainer maps to
mesh axes with one rules table; no layer names a mesh axis. Parameters are stored in
`param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cm3jax.models.logical import constrain


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of the decoder (see cm3jax/config.py for the meaning of each field)."""

    vocab_size: int
    max_len: int
    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "gelu"
    position: str = "learned"
    rope_theta: float = 10000.0
    image_grid: int = 0
    norm: str = "layernorm"
    norm_params: bool = False
    norm_eps: float = 1e-5
    norm_placement: str = "pre"
    qk_norm: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.006
    pos_init_std: float = 0.0002
    zero_init_output: bool = True
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "full"
    attention_impl: str = "xla"

    @classmethod
    def from_config(cls, model_config, vocab_size: int) -> "TransformerConfig":
        """Builds the architecture from `config.model`, resolving -1 defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_config.to_dict().items() if k in fields}
        values["vocab_size"] = vocab_size
        if values["head_dim"] <= 0:
            values["head_dim"] = values["d_model"] // values["num_heads"]
        if values["mlp_dim"] <= 0:
            values["mlp_dim"] = 4 * values["d_model"]
        return cls(**values)


def truncated_normal(std: float) -> nnx.Initializer:
    """Truncated normal at +-3 std (CM3leon), std measured before truncation."""
    return lambda key, shape, dtype=jnp.float32: std * jax.random.truncated_normal(
        key, -3.0, 3.0, shape, dtype
    )


def make_param(rngs: nnx.Rngs, init, shape, names, cfg: TransformerConfig) -> nnx.Param:
    """A parameter of `shape` with logical axis `names`, in the config's param dtype."""
    assert len(shape) == len(names), (shape, names)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), out_sharding=names)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis; learned scale only when configured."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs, shape=None, names=("norm",),
                 kind: str | None = None, learned: bool | None = None, bias: bool = False):
        self.kind = kind or cfg.norm
        self.eps = cfg.norm_eps
        shape = shape or (cfg.d_model,)
        learned = cfg.norm_params if learned is None else learned
        self.scale = make_param(rngs, nnx.initializers.ones, shape, names, cfg) if learned else None
        self.bias = make_param(rngs, nnx.initializers.zeros, shape, names, cfg) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            x = x * self.scale[...]
        if self.bias is not None:
            x = x + self.bias[...]
        return x.astype(dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split convention (LLaMA / Chameleon in transformers).

    Args:
      x: [batch, length, heads, head_dim].
      positions: [batch, length] integer positions.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, l, half]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal mask restricted to equal segment ids: [batch, 1, q_len, kv_len] booleans.

    Packed documents never attend across each other; padding (segment 0) only sees padding.
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_segment)[:, None]


HEAD_NAMES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
CACHE_NAMES = ("activation_batch", "activation_heads", "activation_length", "activation_kv")
MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)  # dot_product_attention's masked logit


class KVCache(NamedTuple):
    """Keys and values of one layer for incremental decoding.

    Attributes:
      key, value: [batch, heads, cache_length, head_dim] in the compute dtype. Heads come
        before slots so that the attention dots read the cache as it lies: with a
        [batch, slots, heads, head_dim] cache XLA CPU transposed both arrays on every step.
      index: int32 scalar, the first slot the next call writes.
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array

    def write(self, key: jax.Array, value: jax.Array) -> "KVCache":
        """This cache with `key`/`value` [batch, length, heads, head_dim] written at `index`."""
        start = (0, 0, self.index, 0)

        def update(cache: jax.Array, new: jax.Array) -> jax.Array:
            new = jnp.swapaxes(new, 1, 2).astype(cache.dtype)
            return constrain(jax.lax.dynamic_update_slice(cache, new, start), CACHE_NAMES)

        return KVCache(update(self.key, key), update(self.value, value), self.index + key.shape[1])


def cached_attention(query: jax.Array, cache: KVCache, mask: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention` (its XLA formula) of `query` over a cache's slots.

    Args:
      query: [batch, length, heads, head_dim].
      cache: keys and values [batch, heads, slots, head_dim].
      mask: [batch, 1, length, slots] booleans, which slots each query sees.

    Returns:
      [batch, length, heads, head_dim].
    """
    scores = jnp.einsum("blhd,bhsd->bhls", query, cache.key, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * query.shape[-1] ** -0.5, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(cache.value.dtype)
    return jnp.einsum("bhls,bhsd->blhd", probs, cache.value)


class Attention(nnx.Module):
    """Multi-head causal self-attention without biases; optional QK-norm and RoPE."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        init = truncated_normal(cfg.init_std)
        out_init = nnx.initializers.zeros if cfg.zero_init_output else init
        qkv_shape, qkv_names = (cfg.d_model, cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv")
        self.query = make_param(rngs, init, qkv_shape, qkv_names, cfg)
        self.key = make_param(rngs, init, qkv_shape, qkv_names, cfg)
        self.value = make_param(rngs, init, qkv_shape, qkv_names, cfg)
        self.out = make_param(
            rngs, out_init, (cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "kv", "embed"), cfg
        )
        if cfg.qk_norm:
            # Chameleon: LayerNorm over head_dim with a learned (heads, head_dim) scale and bias.
            kwargs = dict(shape=(cfg.num_heads, cfg.head_dim), names=("heads", "kv"),
                          kind="layernorm", learned=True, bias=True)
            self.query_norm = Norm(cfg, rngs, **kwargs)
            self.key_norm = Norm(cfg, rngs, **kwargs)
        else:
            self.query_norm = self.key_norm = None

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Attends `x` [batch, length, embed] to itself, or to the cache it extends.

        With `cache`, this call's keys and values are written at slots
        [cache.index, cache.index + length) and the queries attend over every slot of the
        cache (`cached_attention`), `mask` being [batch, 1, length, cache_length]; the updated
        cache is returned.
        """
        cfg, dtype = self.cfg, x.dtype
        q, k, v = (
            constrain(jnp.einsum("ble,ehd->blhd", x, w[...].astype(dtype)), HEAD_NAMES)
            for w in (self.query, self.key, self.value)
        )
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        if cfg.position == "rope":
            q, k = rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)
        if cache is None:
            attended = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                    implementation=cfg.attention_impl)
            attended = constrain(attended, HEAD_NAMES)
            return jnp.einsum("blhd,hde->ble", attended, self.out[...].astype(dtype)), None
        cache = cache.write(k, v)
        attended = constrain(cached_attention(q, cache, mask), HEAD_NAMES)
        # One [b, l, h*d] x [h*d, e] matmul: with the einsum above XLA transposed the `out`
        # weight inside the decoding loop, on every step.
        batch, length = x.shape[:2]
        out = self.out[...].astype(dtype).reshape(-1, cfg.d_model)
        return attended.reshape(batch, length, -1) @ out, cache


def materialize(x: jax.Array) -> jax.Array:
    """`x` materialised as its own row-major array.

    XLA then neither fuses it into its consumer nor folds a transpose through it into a dot.
    """
    return jax.lax.optimization_barrier(x)


MLP_NAMES = ("activation_batch", "activation_length", "activation_mlp")


@jax.custom_vjp
def gelu_mlp(x: jax.Array, wi: jax.Array, wo: jax.Array) -> jax.Array:
    """`gelu(x @ wi) @ wo` (exact GELU) with a hand-written backward pass.

    Same values as autodiff (gradients equal to float32 rounding), but cheaper on XLA CPU:
    the backward saves only the pre-activation `x @ wi` (autodiff keeps three [tokens, mlp]
    GELU intermediates, stacked per layer under scan), recomputes GELU and its derivative
    in row-major elementwise passes, and contracts the weight gradients as `x^T @ dh` and
    `(dy^T @ gelu)^T`, transposing only [tokens, d_model] / [d_model, mlp] arrays. Autodiff
    made XLA write the GELU derivative transposed ([mlp, tokens], a slow strided loop) and
    compute it twice, and ran both weight-gradient dots outside YNNPACK.
    """
    return _gelu_mlp_fwd(x, wi, wo)[0]


def _gelu_mlp_fwd(x, wi, wo):
    h = constrain(x @ wi, MLP_NAMES)
    return jax.nn.gelu(h, approximate=False) @ wo, (x, wi, wo, h)


def _gelu_mlp_bwd(residuals, dy):
    x, wi, wo, h = residuals
    flat_x = x.reshape(-1, x.shape[-1])
    flat_dy = dy.reshape(-1, dy.shape[-1])
    flat_h = h.reshape(-1, h.shape[-1])
    h32 = flat_h.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(h32 * 0.7071067811865476))
    slope = cdf + h32 * 0.3989422804014327 * jnp.exp(-0.5 * jnp.square(h32))  # d gelu / dh
    dh = ((flat_dy @ wo.T).astype(jnp.float32) * slope).astype(h.dtype)
    dh = constrain(dh.reshape(h.shape), MLP_NAMES).reshape(dh.shape)
    dwo = materialize(materialize(flat_dy.T) @ jax.nn.gelu(flat_h, approximate=False)).T
    dwi = materialize(flat_x.T) @ dh
    dx = dh @ wi.T
    return dx.reshape(x.shape), dwi.astype(wi.dtype), dwo.astype(wo.dtype)


gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)


class Mlp(nnx.Module):
    """Feed-forward block: GELU (OPT/CM3leon) or SwiGLU (Chameleon), no biases."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.activation = cfg.activation
        init = truncated_normal(cfg.init_std)
        out_init = nnx.initializers.zeros if cfg.zero_init_output else init
        self.wi = make_param(rngs, init, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), cfg)
        self.wi_gate = (
            make_param(rngs, init, (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"), cfg)
            if cfg.activation == "swiglu"
            else None
        )
        self.wo = make_param(rngs, out_init, (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        if self.wi_gate is None:
            return gelu_mlp(x, self.wi[...].astype(dtype), self.wo[...].astype(dtype))
        h = constrain(x @ self.wi[...].astype(dtype), MLP_NAMES)
        h = jax.nn.silu(constrain(x @ self.wi_gate[...].astype(dtype), MLP_NAMES)) * h
        return h @ self.wo[...].astype(dtype)
