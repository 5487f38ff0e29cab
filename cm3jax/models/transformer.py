"""The CM3leon decoder-only transformer (Flax NNX), configurable to the Chameleon variant.

CM3leon (metaseq/OPT as the paper changed it): learned positions, GELU, no biases, no
dropout, parameter-free LayerNorm, truncated-normal init std 0.006, tied embeddings.
The modern variant switches on RoPE, SwiGLU, RMSNorm and QK-norm by config.

Blocks are created stacked (a leading 'layers' axis on every block parameter) and run
with `lax.scan` (or an unrolled loop over the same parameters), each wrapped in
`jax.checkpoint` with the configured remat policy. Incremental decoding (`extend`) always
runs them unrolled, over per-layer weights and per-layer cache arrays (see `extend`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cm3jax.models.layers import (
    Attention,
    KVCache,
    Mlp,
    Norm,
    TransformerConfig,
    attention_mask,
    make_param,
    materialize,
    truncated_normal,
)
from cm3jax.models.logical import constrain

EMBED_NAMES = ("activation_batch", "activation_length", "activation_embed")

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """One pre-norm (or Chameleon 'swin'-norm) transformer block."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.placement = cfg.norm_placement
        self.attention_norm = Norm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        if self.placement == "pre":
            attended, cache = self.attention(self.attention_norm(x), positions, mask, cache)
            x = x + attended
            x = x + self.mlp(self.mlp_norm(x))
        else:  # 'swin': normalise the branch output instead of its input
            attended, cache = self.attention(x, positions, mask, cache)
            x = x + self.attention_norm(attended)
            x = x + self.mlp_norm(self.mlp(x))
        return constrain(x, EMBED_NAMES), cache


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Rows of `table` for `ids`, gathered from a replicated copy of the (compute-dtype) table.

    XLA cannot partition a gather from a sharded table into a batch-sharded output and
    falls back to replicating the output ("involuntary full rematerialization"); an
    explicit all-gather of the table is cheaper and predictable.
    """
    table = constrain(table, (None, None))
    return constrain(jnp.take(table, ids, axis=0), EMBED_NAMES)


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """`x @ table.T` in float32 ([b, l, e] x [vocab, e] -> [b, l, vocab]): the tied LM head.

    Autodiff's table gradient `dlogits^T @ x` makes XLA write a transposed [vocab, tokens]
    copy of the float32 logit gradient (the step's largest array); here it is contracted
    as `(x^T @ dlogits)^T`, transposing only the [tokens, e] input and the [e, vocab] result.
    """
    return jnp.einsum("ble,ve->blv", x, table, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, table):
    return tied_logits(x, table), (x, table)


def _tied_logits_bwd(residuals, dlogits):
    x, table = residuals
    flat_x = x.reshape(-1, x.shape[-1])
    flat_d = dlogits.reshape(-1, dlogits.shape[-1]).astype(x.dtype)
    dx = (flat_d @ table).reshape(x.shape)
    dtable = materialize(materialize(flat_x.T) @ flat_d).T
    return dx.astype(x.dtype), dtable.astype(table.dtype)


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def _stacked_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
    """Creates `num_layers` blocks as one Block whose parameters have a leading 'layers' axis."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs)

    return create(rngs)


class Cache(NamedTuple):
    """Every layer's keys and values for incremental decoding (see `init_cache`).

    Attributes:
      key, value: one [batch, heads, cache_length, head_dim] array per layer (`KVCache`).
      index: int32 scalar, the first slot the next `extend` writes.
    """

    key: tuple[jax.Array, ...]
    value: tuple[jax.Array, ...]
    index: jax.Array

    def grow(self, length: int) -> Cache:
        """This cache with `length` slots: new empty slots after the existing ones."""
        extra = length - self.key[0].shape[2]
        if extra == 0:
            return self
        pad = ((0, 0), (0, 0), (0, extra), (0, 0))
        return Cache(tuple(jnp.pad(k, pad) for k in self.key),
                     tuple(jnp.pad(v, pad) for v in self.value), self.index)


class Transformer(nnx.Module):
    """Decoder-only transformer over the unified text + image-code vocabulary."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = make_param(
            rngs, truncated_normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg
        )
        self.positions = (
            make_param(rngs, truncated_normal(cfg.pos_init_std), (cfg.max_len, cfg.d_model),
                       ("max_len", "embed"), cfg)
            if cfg.position == "learned"
            else None
        )
        # 2-D positions of image codes (DALL-E's row / column embeddings), off in CM3leon.
        self.code_rows, self.code_cols = (
            (make_param(rngs, truncated_normal(cfg.init_std), (cfg.image_grid, cfg.d_model), ("image_grid", "embed"),
                        cfg) for _ in range(2))
            if cfg.image_grid > 0 else (None, None))
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else make_param(rngs, truncated_normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"), cfg)
        )

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 code_positions: jax.Array | None = None) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: [batch, length] int ids.
          positions: [batch, length] position of each token inside its document.
          segment_ids: [batch, length] packed-document ids (0 = padding).
          code_positions: [batch, length] 1 + an image code's index in its image, 0 for other
            tokens (cm3.cm3_code_positions); needed when `image_grid` > 0.

        Returns:
          [batch, length, vocab_size] logits in float32.
        """
        x = self._run_blocks(self._embed(tokens, positions, code_positions), positions, attention_mask(segment_ids))
        return self._logits(x)

    def extend(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: Cache,
               layers: Sequence[Block] | None = None,
               code_positions: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """Logits of `tokens` given everything already in `cache`, and the extended cache.

        Prefill and each decoding step are both one `extend` call. The layers run unrolled,
        each on its own weights and its own cache arrays, which XLA updates in place inside a
        decoding loop. (A stacked cache under `lax.scan` made XLA CPU copy every layer's
        slice in and out of the stack on every step: 6x slower at OPT-125m size, batch 8.)

        Args:
          tokens: [batch, length] int ids, written at cache slots [cache.index, cache.index + length).
          positions: [batch, length] position of each token inside its document.
          mask: [batch, 1, length, cache_length] booleans, which slots each token may attend to.
          cache: every layer's keys and values (see `init_cache`) and the scalar next-slot index.
          layers: `self.layers()`, taken once outside the loop when `extend` runs in one. XLA
            does not hoist the per-layer weight slices out of a while loop: taken inside, every
            layer's weights are copied on every step.
          code_positions: as in `__call__`, for `tokens`.

        Returns:
          ([batch, length, vocab_size] float32 logits, the cache with these tokens written).
        """
        x = self._embed(tokens, positions, code_positions)
        keys, values = [], []
        layers = self.layers() if layers is None else layers
        for block, key, value in zip(layers, cache.key, cache.value):
            x, written = block(x, positions, mask, KVCache(key, value, cache.index))
            keys.append(written.key)
            values.append(written.value)
        return self._logits(x), Cache(tuple(keys), tuple(values), cache.index + tokens.shape[1])

    def layers(self) -> list[Block]:
        """The blocks one by one, each on its layer's slice of the stacked parameters.

        Under jit the slices are copies: while they live, the block weights are held twice.
        """
        graphdef, stacked = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda p, i=i: p[i], stacked))
                for i in range(self.cfg.num_layers)]

    def _embed(self, tokens: jax.Array, positions: jax.Array, code_positions: jax.Array | None) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        x = lookup(self.embed[...].astype(dtype), tokens)
        if self.positions is not None:
            x = x + lookup(self.positions[...].astype(dtype), positions)
        if self.code_rows is not None:
            if code_positions is None:
                raise ValueError("model.image_grid > 0: the model needs code_positions for its inputs")
            row, col = jnp.divmod(jnp.maximum(code_positions - 1, 0), self.cfg.image_grid)
            grid = lookup(self.code_rows[...].astype(dtype), row) + lookup(self.code_cols[...].astype(dtype), col)
            x = x + jnp.where((code_positions > 0)[..., None], grid, 0).astype(dtype)
        return constrain(x, EMBED_NAMES)

    def _logits(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = tied_logits(x, self.embed[...].astype(dtype))
        else:
            logits = jnp.einsum("ble,ev->blv", x, self.lm_head[...].astype(dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def _run_blocks(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_params):
            x, _ = nnx.merge(graphdef, layer_params)(x, positions, mask)
            return x, None

        if self.cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat_policy],
                                   prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(layer, x, stacked)[0]
        for i in range(self.cfg.num_layers):
            x, _ = layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
        return x


def init_cache(cfg: TransformerConfig, batch: int, length: int) -> Cache:
    """An empty cache of `length` slots for `batch` rows: one array per layer, compute dtype."""
    zeros = tuple(jnp.zeros((batch, cfg.num_heads, length, cfg.head_dim), jnp.dtype(cfg.dtype))
                  for _ in range(cfg.num_layers))
    return Cache(zeros, zeros, jnp.zeros((), jnp.int32))


def create(cfg: TransformerConfig, seed: int | jax.Array) -> Transformer:
    """Builds a Transformer with parameters initialised from `seed` (no sharding applied)."""
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(params=seed))
