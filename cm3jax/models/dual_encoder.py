"""CLIP-style dual encoder (Flax NNX): the retriever's text and image towers, contrastive loss.

A text transformer over token ids and a ViT over pixels (or over VQGAN codes) each end in a
linear projection to a shared space; `contrastive_loss` is CLIP's symmetric InfoNCE with a
learned temperature. The towers follow `transformers.CLIPTextModel` / `CLIPVisionModel`
exactly, so `cm3jax.models.clip_weights.load_clip` imports a real CLIP (the key layout of
`transformers.CLIPModel`) and gives its embeddings to float32 rounding.

Text: token + learned position embeddings, causal pre-LN layers (with key padding from the
mask), final LayerNorm, pooled at the eos position (the largest id, as the original CLIP, or
the first `eos_token_id`) or at the last unmasked position. Vision: a bias-free stride-`patch`
convolution (or, with `vision_input='codes'`, a code embedding table) plus a class token and
learned positions, `pre_layrnorm`, bidirectional pre-LN layers, LayerNorm of the class token.

Why not `layers.Attention` / `layers.Mlp`: CLIP has a bias on every attention and MLP linear
and uses quick-GELU; CM3leon's layers are bias-free and their MLP is a custom-VJP exact GELU.
`layers.Norm` (LayerNorm with learned scale and bias) and `make_param` are reused.

Layers are stacked on a leading 'layers' axis and run with `lax.scan` (as the decoder).
Logical axis names: those of cm3jax/train/partitioning.py plus 'projection' (the shared
embedding dimension of the two output projections).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cm3jax.errors import ConfigError
from cm3jax.models.layers import MLP_NAMES, Norm, make_param
from cm3jax.models.logical import constrain
from cm3jax.models.transformer import EMBED_NAMES, REMAT_POLICIES, lookup
from cm3jax.models.vqgan import CONV_KERNEL_NAMES, jit_create

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
HEAD_NAMES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) to at most 100
# Leaves kept out of weight decay (open_clip: gains, biases, the class token, the temperature).
NO_DECAY = frozenset({"bias", "scale", "class_embedding", "logit_scale"})


def base_dual_encoder_config() -> ml_collections.ConfigDict:
    """Defaults of `config.retriever`: the architecture of OpenAI CLIP ViT-B/32."""
    c = ml_collections.ConfigDict()
    c.text_vocab_size = 49408  # text token ids the text tower embeds (>= the tokenizer's text ids)
    c.text_max_len = 77  # longest text (size of the text position table)
    c.text_width = 512  # text transformer width
    c.text_layers = 12  # text transformer layers
    c.text_heads = 8  # text attention heads
    c.text_mlp_dim = 2048  # text MLP hidden size
    c.text_pooling = "eos"  # 'eos' (CLIP: state at the eos token) or 'last' (last unmasked token)
    c.eos_token_id = -1  # with 'eos': id to pool at; -1 = the largest id (original CLIP's eot)
    c.vision_input = "pixels"  # 'pixels' (ViT, CLIP-normalised RGB) or 'codes' (VQGAN code grid)
    c.image_size = 224  # image side in pixels ('pixels')
    c.patch_size = 32  # ViT patch side in pixels ('pixels')
    c.code_grid = 32  # codes per image side ('codes'): the VQGAN's grid
    c.code_patch = 1  # codes per token side ('codes'): 2 = one token per 2x2 codes (4x fewer)
    c.codebook_size = 8192  # VQGAN codebook size ('codes')
    c.vision_width = 768  # vision transformer width
    c.vision_layers = 12  # vision transformer layers
    c.vision_heads = 12  # vision attention heads
    c.vision_mlp_dim = 3072  # vision MLP hidden size
    c.projection_dim = 512  # shared embedding size
    c.activation = "quick_gelu"  # MLP activation: 'quick_gelu' (CLIP) or 'gelu' (exact)
    c.norm_eps = 1e-5  # LayerNorm epsilon
    c.init_logit_scale = math.log(1 / 0.07)  # initial log inverse temperature (CLIP)
    c.dtype = "float32"  # compute dtype; embeddings and the loss are float32
    c.param_dtype = "float32"  # parameter dtype
    c.remat_policy = "none"  # 'none' or a transformer REMAT_POLICIES name, per layer
    return c


@dataclasses.dataclass(frozen=True)
class TowerDims:
    """Shape of one transformer tower."""

    width: int
    depth: int
    heads: int
    mlp_dim: int


_DEFAULTS = base_dual_encoder_config()


@dataclasses.dataclass(frozen=True)
class DualEncoderConfig:
    """Architecture of the dual encoder (fields and defaults as in `base_dual_encoder_config`)."""

    text_vocab_size: int = _DEFAULTS.text_vocab_size
    text_max_len: int = _DEFAULTS.text_max_len
    text_width: int = _DEFAULTS.text_width
    text_layers: int = _DEFAULTS.text_layers
    text_heads: int = _DEFAULTS.text_heads
    text_mlp_dim: int = _DEFAULTS.text_mlp_dim
    text_pooling: str = _DEFAULTS.text_pooling
    eos_token_id: int = _DEFAULTS.eos_token_id
    vision_input: str = _DEFAULTS.vision_input
    image_size: int = _DEFAULTS.image_size
    patch_size: int = _DEFAULTS.patch_size
    code_grid: int = _DEFAULTS.code_grid
    code_patch: int = _DEFAULTS.code_patch
    codebook_size: int = _DEFAULTS.codebook_size
    vision_width: int = _DEFAULTS.vision_width
    vision_layers: int = _DEFAULTS.vision_layers
    vision_heads: int = _DEFAULTS.vision_heads
    vision_mlp_dim: int = _DEFAULTS.vision_mlp_dim
    projection_dim: int = _DEFAULTS.projection_dim
    activation: str = _DEFAULTS.activation
    norm_eps: float = _DEFAULTS.norm_eps
    init_logit_scale: float = _DEFAULTS.init_logit_scale
    dtype: str = _DEFAULTS.dtype
    param_dtype: str = _DEFAULTS.param_dtype
    remat_policy: str = _DEFAULTS.remat_policy

    def __post_init__(self):
        positive = ("text_vocab_size", "text_max_len", "text_width", "text_layers", "text_heads",
                    "text_mlp_dim", "image_size", "patch_size", "code_grid", "code_patch", "codebook_size",
                    "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim",
                    "projection_dim")
        checks = {name: (getattr(self, name) >= 1, "must be >= 1") for name in positive}
        float_dtypes = ("float32", "bfloat16", "float16")
        checks |= {
            "text_heads": (checks["text_heads"][0] and self.text_width % self.text_heads == 0,
                           f"must be >= 1 and divide text_width={self.text_width}"),
            "vision_heads": (checks["vision_heads"][0]
                             and self.vision_width % self.vision_heads == 0,
                             f"must be >= 1 and divide vision_width={self.vision_width}"),
            "image_size": (checks["image_size"][0] and checks["patch_size"][0]
                           and self.image_size % self.patch_size == 0,
                           f"must be >= 1 and a multiple of patch_size={self.patch_size}"),
            "code_patch": (checks["code_patch"][0] and self.code_grid % self.code_patch == 0
                           and self.vision_width % self.code_patch**2 == 0,
                           f"must be >= 1, divide code_grid={self.code_grid}, and its square must "
                           f"divide vision_width={self.vision_width}"),
            "text_pooling": (self.text_pooling in ("eos", "last"), "must be 'eos' or 'last'"),
            "eos_token_id": (-1 <= self.eos_token_id < self.text_vocab_size,
                             f"must be -1 (largest id) or an id below text_vocab_size="
                             f"{self.text_vocab_size}"),
            "vision_input": (self.vision_input in ("pixels", "codes"),
                             "must be 'pixels' or 'codes'"),
            "activation": (self.activation in ACTIVATIONS, f"must be one of {sorted(ACTIVATIONS)}"),
            "norm_eps": (self.norm_eps > 0, "must be > 0"),
            "dtype": (self.dtype in float_dtypes, f"must be one of {float_dtypes}"),
            "param_dtype": (self.param_dtype in float_dtypes, f"must be one of {float_dtypes}"),
            "remat_policy": (self.remat_policy in ("none", *REMAT_POLICIES),
                             f"must be 'none' or one of {sorted(REMAT_POLICIES)}"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ConfigError(f"retriever.{name}", f"{message}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, retriever_config: ml_collections.ConfigDict) -> "DualEncoderConfig":
        """Builds the config from `config.retriever` (keys that are not fields are ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in retriever_config.to_dict().items() if k in fields})

    @property
    def text_dims(self) -> TowerDims:
        return TowerDims(self.text_width, self.text_layers, self.text_heads, self.text_mlp_dim)

    @property
    def vision_dims(self) -> TowerDims:
        return TowerDims(self.vision_width, self.vision_layers, self.vision_heads,
                         self.vision_mlp_dim)

    @property
    def grid(self) -> int:
        """Vision tokens per image side: pixel patches, or patches of code_patch x code_patch codes."""
        if self.vision_input == "pixels":
            return self.image_size // self.patch_size
        return self.code_grid // self.code_patch


# ------------------------------------------------------------------------------ model


def _normal(std: float) -> nnx.Initializer:
    return nnx.initializers.normal(std)


class Dense(nnx.Module):
    """`x @ kernel (+ bias)`, contracting the trailing `len(in_shape)` axes of x."""

    def __init__(self, cfg: DualEncoderConfig, rngs: nnx.Rngs, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], names: tuple[str, ...], std: float, bias: bool = True):
        self.kernel = make_param(rngs, _normal(std), in_shape + out_shape, names, cfg)
        self.bias = (make_param(rngs, nnx.initializers.zeros, out_shape, names[len(in_shape):], cfg)
                     if bias else None)
        self.contract = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.contract
        y = jnp.tensordot(x, self.kernel[...].astype(x.dtype),
                          axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def _layer_norm(cfg: DualEncoderConfig, rngs: nnx.Rngs, width: int) -> Norm:
    """LayerNorm with learned scale and bias (torch.nn.LayerNorm), statistics in float32."""
    return Norm(cfg, rngs, shape=(width,), names=("norm",), kind="layernorm", learned=True,
                bias=True)


class SelfAttention(nnx.Module):
    """CLIPAttention: multi-head attention with biased q/k/v/out projections."""

    def __init__(self, cfg: DualEncoderConfig, dims: TowerDims, rngs: nnx.Rngs):
        w, h = dims.width, dims.heads
        in_std = w**-0.5 * (2 * dims.depth) ** -0.5  # CLIP's init
        qkv = (lambda: Dense(cfg, rngs, (w,), (h, w // h), ("embed", "heads", "kv"), in_std))
        self.query, self.key, self.value = qkv(), qkv(), qkv()
        self.out = Dense(cfg, rngs, (h, w // h), (w,), ("heads", "kv", "embed"), w**-0.5)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None, causal: bool) -> jax.Array:
        q, k, v = (constrain(p(x), HEAD_NAMES) for p in (self.query, self.key, self.value))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
        return self.out(constrain(attended, HEAD_NAMES))


class EncoderLayer(nnx.Module):
    """CLIPEncoderLayer: x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x))))."""

    def __init__(self, cfg: DualEncoderConfig, dims: TowerDims, rngs: nnx.Rngs):
        w, m = dims.width, dims.mlp_dim
        self.activation = cfg.activation
        self.attention_norm = _layer_norm(cfg, rngs, w)
        self.attention = SelfAttention(cfg, dims, rngs)
        self.mlp_norm = _layer_norm(cfg, rngs, w)
        self.fc1 = Dense(cfg, rngs, (w,), (m,), ("embed", "mlp"), (2 * w) ** -0.5)
        out_std = w**-0.5 * (2 * dims.depth) ** -0.5
        self.fc2 = Dense(cfg, rngs, (m,), (w,), ("mlp", "embed"), out_std)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None, causal: bool) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), key_mask, causal)
        hidden = ACTIVATIONS[self.activation](constrain(self.fc1(self.mlp_norm(x)), MLP_NAMES))
        return constrain(x + self.fc2(hidden), EMBED_NAMES)


class Encoder(nnx.Module):
    """`depth` EncoderLayers, parameters stacked on a leading 'layers' axis, run by lax.scan."""

    def __init__(self, cfg: DualEncoderConfig, dims: TowerDims, rngs: nnx.Rngs):
        self.remat_policy = cfg.remat_policy

        @nnx.split_rngs(splits=dims.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs: nnx.Rngs) -> EncoderLayer:
            return EncoderLayer(cfg, dims, rngs)

        self.layers = create(rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None, causal: bool) -> jax.Array:
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, params):
            return nnx.merge(graphdef, params)(x, key_mask, causal), None

        if self.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat_policy])
        return jax.lax.scan(layer, x, stacked)[0]


class TextTower(nnx.Module):
    """CLIPTextModel + text_projection: ids [B, L] -> unnormalised features [B, projection]."""

    def __init__(self, cfg: DualEncoderConfig, rngs: nnx.Rngs):
        w = cfg.text_width
        self.cfg = cfg
        self.token_embedding = make_param(rngs, _normal(0.02), (cfg.text_vocab_size, w),
                                          ("vocab", "embed"), cfg)
        self.position_embedding = make_param(rngs, _normal(0.01), (cfg.text_max_len, w),
                                             ("max_len", "embed"), cfg)
        self.encoder = Encoder(cfg, cfg.text_dims, rngs)
        self.final_norm = _layer_norm(cfg, rngs, w)
        self.projection = Dense(cfg, rngs, (w,), (cfg.projection_dim,), ("embed", "projection"),
                                w**-0.5, bias=False)

    def __call__(self, ids: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if ids.ndim != 2 or ids.shape[1] > cfg.text_max_len:
            raise ValueError(f"text ids must be [batch, length <= {cfg.text_max_len}], "
                             f"got {ids.shape}")
        mask = None if mask is None else mask.astype(jnp.bool_)
        x = lookup(self.token_embedding[...].astype(dtype), ids)
        x = x + self.position_embedding[: ids.shape[1]].astype(dtype)
        x = self.final_norm(self.encoder(x, mask, causal=True))
        pooled = jnp.take_along_axis(x, self._pool_index(ids, mask)[:, None, None], axis=1)[:, 0]
        return self.projection(pooled).astype(jnp.float32)

    def _pool_index(self, ids: jax.Array, mask: jax.Array | None) -> jax.Array:
        """[B] position whose state is the text's feature (see `text_pooling`)."""
        cfg = self.cfg
        if cfg.text_pooling == "last":
            if mask is None:
                return jnp.full(ids.shape[:1], ids.shape[1] - 1, jnp.int32)
            return ids.shape[1] - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)
        if cfg.eos_token_id < 0:
            return jnp.argmax(ids, axis=1)
        return jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=1)


class VisionTower(nnx.Module):
    """CLIPVisionModel + visual_projection: images (or codes) -> features [B, projection]."""

    def __init__(self, cfg: DualEncoderConfig, rngs: nnx.Rngs):
        w, p = cfg.vision_width, cfg.patch_size
        self.cfg = cfg
        pixels = cfg.vision_input == "pixels"
        self.patch_embedding = (
            make_param(rngs, _normal(0.02), (p, p, 3, w), CONV_KERNEL_NAMES, cfg) if pixels
            else None)
        self.code_embedding = (
            None if pixels
            else make_param(rngs, _normal(0.02), (cfg.codebook_size, w // cfg.code_patch**2),
                            ("codebook", "embed"), cfg))
        self.class_embedding = make_param(rngs, _normal(w**-0.5), (w,), ("embed",), cfg)
        self.position_embedding = make_param(rngs, _normal(0.02), (cfg.grid**2 + 1, w),
                                             ("max_len", "embed"), cfg)
        self.pre_norm = _layer_norm(cfg, rngs, w)
        self.encoder = Encoder(cfg, cfg.vision_dims, rngs)
        self.post_norm = _layer_norm(cfg, rngs, w)
        self.projection = Dense(cfg, rngs, (w,), (cfg.projection_dim,), ("embed", "projection"),
                                w**-0.5, bias=False)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self._tokens(images)
        batch, _, width = x.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (batch, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        x = self.encoder(self.pre_norm(constrain(x, EMBED_NAMES)), None, causal=False)
        return self.projection(self.post_norm(x[:, 0])).astype(jnp.float32)

    def _tokens(self, images: jax.Array) -> jax.Array:
        """Patch (or code) embeddings [B, grid * grid, width] in row-major grid order."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if self.code_embedding is not None:
            g, p = cfg.code_grid, cfg.code_patch
            if images.shape[1:] != (g, g):
                raise ValueError(f"codes must be [batch, {g}, {g}], got {images.shape}")
            # A token is the concatenated embeddings of a p x p patch of codes (row-major).
            patches = images.reshape(-1, g // p, p, g // p, p).transpose(0, 1, 3, 2, 4)
            x = lookup(self.code_embedding[...].astype(dtype), patches.reshape(images.shape[0], -1))
            return x.reshape(images.shape[0], (g // p) ** 2, cfg.vision_width)
        if images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"images must be [batch, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {images.shape}")
        patches = jax.lax.conv_general_dilated(
            images.astype(dtype), self.patch_embedding[...].astype(dtype),
            (cfg.patch_size, cfg.patch_size), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return patches.reshape(patches.shape[0], -1, patches.shape[-1])


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's per-channel pixel mean on [0, 1]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # and standard deviation


def clip_pixels(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 RGB images [B, R, R, 3] -> CLIP-normalised float32 [B, S, S, 3] (bicubic resize)."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), "bicubic")
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis (finite gradient at 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


class DualEncoder(nnx.Module):
    """Text and image towers projecting into one space, plus CLIP's learned `logit_scale`."""

    def __init__(self, cfg: DualEncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.text = TextTower(cfg, rngs)
        self.vision = VisionTower(cfg, rngs)
        self.logit_scale = make_param(rngs, nnx.initializers.constant(cfg.init_logit_scale), (),
                                      (), cfg)

    def text_features(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Unnormalised projections [B, projection_dim] float32 (CLIPModel.get_text_features).

        Args:
          ids: [B, L] int token ids, L <= text_max_len.
          mask: [B, L], true / 1 on real tokens (keys outside it are not attended to, and
            'last' pooling reads the last one); None = every token is real.
        """
        return self.text(ids, mask)

    def image_features(self, images: jax.Array) -> jax.Array:
        """Unnormalised projections [B, projection_dim] float32 (CLIPModel.get_image_features).

        Args:
          images: 'pixels': [B, image_size, image_size, 3] floats, CLIP-normalised (NHWC);
            'codes': [B, code_grid, code_grid] int codes in [0, codebook_size).
        """
        return self.vision(images)

    def encode_text(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """L2-normalised text embeddings [B, projection_dim] float32 (see `text_features`)."""
        return l2_normalize(self.text_features(ids, mask))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """L2-normalised image embeddings [B, projection_dim] float32 (see `image_features`)."""
        return l2_normalize(self.image_features(images))

    def __call__(self, ids: jax.Array, mask: jax.Array | None,
                 images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(text embeddings, image embeddings) of paired inputs, both L2-normalised."""
        return self.encode_text(ids, mask), self.encode_image(images)


def create_dual_encoder(cfg: DualEncoderConfig, seed: int | jax.Array) -> DualEncoder:
    """A DualEncoder with CLIP's initialisation drawn from `seed` (no sharding applied)."""
    return jit_create(DualEncoder, cfg, seed)


def abstract_dual_encoder(cfg: DualEncoderConfig) -> DualEncoder:
    """A DualEncoder of shape-only parameters (nothing computed): its graphdef, shapes and axes."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: DualEncoder(cfg, rngs=nnx.Rngs(params=0)))


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools over `params` (pure dict): False for gains, biases, class token, scale."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) not in NO_DECAY, params)


# ------------------------------------------------------------------------------- loss


def contrastive_logits(text_emb: jax.Array, image_emb: jax.Array,
                       logit_scale: jax.Array) -> jax.Array:
    """logits_per_text [T, I] = min(exp(logit_scale), 100) * text_emb @ image_emb.T, float32.

    `logit_scale` is the stored parameter (log inverse temperature); logits_per_image is the
    transpose.
    """
    scale = jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), MAX_LOGIT_SCALE)
    return scale * jnp.einsum("tp,ip->ti", text_emb.astype(jnp.float32),
                              image_emb.astype(jnp.float32))


def contrastive_loss(text_emb: jax.Array, image_emb: jax.Array,
                     logit_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CLIP's symmetric InfoNCE over a batch of matched pairs (row i of each is one pair).

    Returns:
      (mean of the text->image and image->text cross-entropies, metrics: both losses, both
      retrieval accuracies (top-1 within the batch), and the clamped `logit_scale`).
      Batch-sharded inputs work as they are: under jit XLA gathers what the [B, B] logits need.
    """
    logits = contrastive_logits(text_emb, image_emb, logit_scale)
    labels = jnp.arange(logits.shape[0])

    def direction(logits):
        loss = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
        return loss, jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(jnp.float32))

    t2i_loss, t2i_accuracy = direction(logits)
    i2t_loss, i2t_accuracy = direction(logits.T)
    loss = 0.5 * (t2i_loss + i2t_loss)
    return loss, {
        "loss": loss,
        "text_to_image_loss": t2i_loss,
        "image_to_text_loss": i2t_loss,
        "text_to_image_accuracy": t2i_accuracy,
        "image_to_text_accuracy": i2t_accuracy,
        "logit_scale": jnp.minimum(jnp.exp(logit_scale.astype(jnp.float32)), MAX_LOGIT_SCALE),
    }
