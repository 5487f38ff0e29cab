"""The CM3leon decoder-only transformer (Flax NNX), configurable to the Chameleon variant.

CM3leon (metaseq/OPT as the paper changed it): learned positions, GELU, no biases, no
dropout, parameter-free LayerNorm, truncated-normal init std 0.006, tied embeddings.
The modern variant switches on RoPE, SwiGLU, RMSNorm and QK-norm by config.

Blocks are created stacked (a leading 'layers' axis on every block parameter) and run
with `lax.scan` (or an unrolled loop over the same parameters), each wrapped in
`jax.checkpoint` with the configured remat policy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cm3jax.models.layers import (
    Attention,
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

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        if self.placement == "pre":
            x = x + self.attention(self.attention_norm(x), positions, mask)
            x = x + self.mlp(self.mlp_norm(x))
        else:  # 'swin': normalise the branch output instead of its input
            x = x + self.attention_norm(self.attention(x, positions, mask))
            x = x + self.mlp_norm(self.mlp(x))
        return constrain(x, EMBED_NAMES)


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
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = Norm(cfg, rngs)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else make_param(rngs, truncated_normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"), cfg)
        )

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: [batch, length] int ids.
          positions: [batch, length] position of each token inside its document.
          segment_ids: [batch, length] packed-document ids (0 = padding).

        Returns:
          [batch, length, vocab_size] logits in float32.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = lookup(self.embed[...].astype(dtype), tokens)
        if self.positions is not None:
            x = x + lookup(self.positions[...].astype(dtype), positions)
        x = constrain(x, EMBED_NAMES)
        x = self._run_blocks(x, positions, attention_mask(segment_ids))
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
            return nnx.merge(graphdef, layer_params)(x, positions, mask), None

        if self.cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.cfg.remat_policy],
                                   prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, stacked)
            return x
        for i in range(self.cfg.num_layers):
            x, _ = layer(x, jax.tree.map(lambda p, i=i: p[i], stacked))
        return x


def create(cfg: TransformerConfig, seed: int | jax.Array) -> Transformer:
    """Builds a Transformer with parameters initialised from `seed` (no sharding applied)."""
    with nnx.use_eager_sharding(False):
        return Transformer(cfg, rngs=nnx.Rngs(params=seed))
