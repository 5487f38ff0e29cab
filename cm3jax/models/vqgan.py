"""The taming-transformers VQGAN image tokenizer (Flax NNX): conv encoder, quantiser, decoder.

Images are NHWC floats in [-1, 1] of the configured resolution. The encoder (taming's
`Encoder`, no double_z) downsamples by 2 ** (len(channel_multipliers) - 1) with residual
blocks, stride-2 convolutions and attention at the lowest resolution (`level_attention=False`:
only in the mid block, as Chameleon); `encoder='patch'` instead embeds each f x f patch on its
own (`PatchEncoder`: codes are local); `quant_conv` maps to the `embed_dim` latent the quantiser
(cm3jax/models/quantizer.py) turns into int32 codes; `post_quant_conv` and the decoder map
codes back to images (no tanh, like taming).

Conv kernels are (kh, kw, in, out) with logical axis names CONV_KERNEL_NAMES, biases
('conv_out',), GroupNorm scale / bias ('norm',); cm3jax/train/partitioning.py maps them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cm3jax.errors import ConfigError
from cm3jax.models.layers import make_param
from cm3jax.models.quantizer import QuantizerOutput, VectorQuantizer

CONV_KERNEL_NAMES = ("conv_height", "conv_width", "conv_in", "conv_out")
# Path of the decoder's last conv kernel inside a VQGAN state (taming's adaptive GAN weight).
LAST_DECODER_LAYER = ("decoder", "conv_out", "kernel")


def base_vqgan_config() -> ml_collections.ConfigDict:
    """Defaults of `config.vqgan`: a 256x256 -> 32x32, 8192-code tokenizer (CM3leon)."""
    c = ml_collections.ConfigDict()
    c.resolution = 256  # image side in pixels; only this size is accepted
    c.in_channels = 3  # image channels
    c.base_channels = 128  # channels of the first level
    c.channel_multipliers = (1, 2, 2, 4)  # per level; downsample = 2 ** (levels - 1)
    c.num_res_blocks = 2  # residual blocks per level (decoder: one more)
    c.attention = True  # self-attention at the lowest resolution and in the mid block
    c.level_attention = True  # also after each lowest-level resnet block (False: mid only)
    c.encoder = "taming"  # 'taming' (3x3 convs, GroupNorm) or 'patch' (each code sees only its f x f patch)
    c.norm_groups = 32  # GroupNorm groups (gcd with the channel count)
    c.embed_dim = 256  # latent channels (quantiser input / decoder input)
    c.codebook_size = 8192  # number of codes
    c.code_dim = -1  # lookup dimension; -1 = embed_dim (no factorisation), e.g. 32 (ViT-VQGAN)
    c.l2_normalize = False  # cosine lookup on l2-normalised latents and codes
    c.ema = False  # codebook by EMA updates instead of the codebook loss
    c.ema_decay = 0.99  # EMA decay of cluster sizes and sums
    c.ema_epsilon = 1e-5  # Laplace smoothing of the EMA cluster sizes
    c.commitment_beta = 0.25  # weight of the commitment loss
    c.codebook_loss_weight = 1.0  # weight of the codebook loss (ignored with ema)
    c.dead_code_threshold = 0.0  # restart codes whose usage EMA is below this; 0 = never
    c.usage_decay = 0.99  # EMA decay of per-step code counts (the usage counter)
    c.disc_channels = 64  # first-layer channels of the patch discriminator
    c.disc_layers = 3  # stride-2 layers of the patch discriminator
    c.disc_norm = "group"  # 'group' (GroupNorm) or 'none'
    c.dtype = "float32"  # compute dtype (the quantiser always computes in float32)
    c.param_dtype = "float32"  # parameter dtype
    return c


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Architecture and quantiser options of the VQGAN (fields as in `base_vqgan_config`)."""

    resolution: int = 256
    in_channels: int = 3
    base_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attention: bool = True
    level_attention: bool = True
    encoder: str = "taming"
    norm_groups: int = 32
    embed_dim: int = 256
    codebook_size: int = 8192
    code_dim: int = -1
    l2_normalize: bool = False
    ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    commitment_beta: float = 0.25
    codebook_loss_weight: float = 1.0
    dead_code_threshold: float = 0.0
    usage_decay: float = 0.99
    disc_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "group"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        multipliers = tuple(int(m) for m in self.channel_multipliers)
        object.__setattr__(self, "channel_multipliers", multipliers)
        checks = {
            "channel_multipliers": (len(multipliers) >= 1 and min(multipliers) >= 1,
                                    "needs at least one positive multiplier"),
            "resolution": (self.resolution % self.downsample == 0,
                           f"{self.resolution} is not divisible by the downsample factor "
                           f"{self.downsample}"),
            "codebook_size": (self.codebook_size >= 2, "needs at least 2 codes"),
            "ema_decay": (0.0 <= self.ema_decay < 1.0, "must be in [0, 1)"),
            "usage_decay": (0.0 <= self.usage_decay < 1.0, "must be in [0, 1)"),
            "encoder": (self.encoder in ("taming", "patch"), "must be 'taming' or 'patch'"),
            "disc_norm": (self.disc_norm in ("group", "none"), "must be 'group' or 'none'"),
            "disc_layers": (self.resolution // 2**self.disc_layers - 2 >= 1,
                            f"{self.disc_layers} layers leave no patch logits at resolution "
                            f"{self.resolution}"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ConfigError(f"vqgan.{name}", message)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def attends(self, level: int) -> bool:
        """Whether each resnet block of `level` (0 = full resolution) is followed by attention."""
        lowest = level == len(self.channel_multipliers) - 1
        return self.attention and self.level_attention and lowest

    @property
    def lookup_dim(self) -> int:
        """Dimension of the code lookup: code_dim, or embed_dim when code_dim <= 0."""
        return self.embed_dim if self.code_dim <= 0 else self.code_dim

    @property
    def grid(self) -> int:
        """Codes per image side."""
        return self.resolution // self.downsample

    @classmethod
    def from_config(cls, vqgan_config: ml_collections.ConfigDict) -> "VQGANConfig":
        """Builds the config from `config.vqgan` (unknown keys are ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vqgan_config.to_dict().items() if k in fields})


def _torch_default_init() -> nnx.Initializer:
    """PyTorch's default conv init (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nnx.Module):
    """2-D convolution, NHWC activations, (kh, kw, in, out) kernel, optional bias."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs, in_channels: int, out_channels: int,
                 kernel: int = 3, stride: int = 1, padding=None, bias: bool = True, init=None):
        self.dtype = cfg.dtype
        shape = (kernel, kernel, in_channels, out_channels)
        self.kernel = make_param(rngs, init or _torch_default_init(), shape, CONV_KERNEL_NAMES, cfg)
        zeros = nnx.initializers.zeros
        self.bias = make_param(rngs, zeros, (out_channels,), ("conv_out",), cfg) if bias else None
        self.stride = stride
        pad = kernel // 2 if padding is None else padding
        self.padding = ((pad, pad), (pad, pad)) if isinstance(pad, int) else tuple(map(tuple, pad))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), self.kernel[...].astype(dtype), (self.stride, self.stride),
            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y if self.bias is None else y + self.bias[...].astype(dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over channels (gcd(norm_groups, channels) groups), statistics in float32.

    `per_pixel` normalises each pixel's channels on their own (a LayerNorm over channels), so
    the output at a pixel depends on nothing else in the image.
    """

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs, channels: int, eps: float = 1e-6,
                 scale_init=nnx.initializers.ones, per_pixel: bool = False):
        self.groups, self.eps = (1 if per_pixel else math.gcd(cfg.norm_groups, channels)), eps
        self.axes = (4,) if per_pixel else (1, 2, 4)
        self.scale = make_param(rngs, scale_init, (channels,), ("norm",), cfg)
        self.bias = make_param(rngs, nnx.initializers.zeros, (channels,), ("norm",), cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=self.axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=self.axes, keepdims=True)
        g = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        g = g * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return g.astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm-swish-conv3x3 twice plus a (1x1-projected when channels change) shortcut.

    `pointwise` makes it local to each pixel: 1x1 convs and per-pixel norms.
    """

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs, in_channels: int, out_channels: int,
                 pointwise: bool = False):
        kernel = 1 if pointwise else 3
        self.norm1 = GroupNorm(cfg, rngs, in_channels, per_pixel=pointwise)
        self.conv1 = Conv(cfg, rngs, in_channels, out_channels, kernel=kernel)
        self.norm2 = GroupNorm(cfg, rngs, out_channels, per_pixel=pointwise)
        self.conv2 = Conv(cfg, rngs, out_channels, out_channels, kernel=kernel)
        self.shortcut = (Conv(cfg, rngs, in_channels, out_channels, kernel=1)
                         if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = self.conv2(jax.nn.swish(self.norm2(h)))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1-conv q / k / v / output, residual."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs, channels: int):
        self.norm = GroupNorm(cfg, rngs, channels)
        self.q, self.k, self.v, self.proj_out = (
            Conv(cfg, rngs, channels, channels, kernel=1) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
        scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * c**-0.5
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v).reshape(b, h, w, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding right / bottom by one (taming)."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs, channels: int):
        self.conv = Conv(cfg, rngs, channels, channels, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs, channels: int):
        self.conv = Conv(cfg, rngs, channels, channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _mid(cfg: VQGANConfig, rngs: nnx.Rngs, channels: int) -> nnx.List:
    blocks = [ResnetBlock(cfg, rngs, channels, channels)]
    blocks += [AttnBlock(cfg, rngs, channels)] if cfg.attention else []
    return nnx.List(blocks + [ResnetBlock(cfg, rngs, channels, channels)])


def _run(modules: nnx.List, x: jax.Array) -> jax.Array:
    for module in modules:
        x = module(x)
    return x


def _resnet_stage(cfg: VQGANConfig, rngs: nnx.Rngs, channels: int, out_channels: int, count: int,
                  attend: bool) -> tuple[list[nnx.Module], int]:
    """`count` ResnetBlocks to `out_channels`, each followed by an AttnBlock if `attend`."""
    blocks = []
    for _ in range(count):
        blocks.append(ResnetBlock(cfg, rngs, channels, out_channels))
        channels = out_channels
        if attend:
            blocks.append(AttnBlock(cfg, rngs, channels))
    return blocks, channels


class Encoder(nnx.Module):
    """Images [B, R, R, C] -> latents [B, R/f, R/f, embed_dim] (before quant_conv)."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        ch, levels = cfg.base_channels, len(cfg.channel_multipliers)
        self.conv_in = Conv(cfg, rngs, cfg.in_channels, ch)
        blocks, channels = [], ch
        for level, mult in enumerate(cfg.channel_multipliers):
            stage, channels = _resnet_stage(cfg, rngs, channels, ch * mult, cfg.num_res_blocks,
                                            cfg.attends(level))
            blocks += stage
            if level != levels - 1:
                blocks.append(Downsample(cfg, rngs, channels))
        self.down = nnx.List(blocks)
        self.mid = _mid(cfg, rngs, channels)
        self.norm_out = GroupNorm(cfg, rngs, channels)
        self.conv_out = Conv(cfg, rngs, channels, cfg.embed_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _run(self.mid, _run(self.down, self.conv_in(x)))
        return self.conv_out(jax.nn.swish(self.norm_out(x)))


class PatchEncoder(nnx.Module):
    """Images -> latents where each code's latent is a function of its own f x f patch only.

    A stride-f f x f convolution cuts the image into patches, then `num_res_blocks` per
    level of pointwise residual blocks (1x1 convs, per-pixel norms) embed each patch. The
    same patch always gets the same code wherever it is and whatever surrounds it, which
    keeps the code stream simple for the LM on flat-coloured data (e.g. shapes).
    """

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        channels = cfg.base_channels * cfg.channel_multipliers[-1]
        self.conv_in = Conv(cfg, rngs, cfg.in_channels, channels, kernel=cfg.downsample,
                            stride=cfg.downsample, padding=0)
        count = cfg.num_res_blocks * len(cfg.channel_multipliers)
        self.blocks = nnx.List([ResnetBlock(cfg, rngs, channels, channels, pointwise=True)
                                for _ in range(count)])
        self.norm_out = GroupNorm(cfg, rngs, channels, per_pixel=True)
        self.conv_out = Conv(cfg, rngs, channels, cfg.embed_dim, kernel=1)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _run(self.blocks, self.conv_in(x))
        return self.conv_out(jax.nn.swish(self.norm_out(x)))


class Decoder(nnx.Module):
    """Latents [B, g, g, embed_dim] -> images [B, R, R, C] (no output nonlinearity)."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        ch, levels = cfg.base_channels, len(cfg.channel_multipliers)
        channels = ch * cfg.channel_multipliers[-1]
        self.conv_in = Conv(cfg, rngs, cfg.embed_dim, channels)
        self.mid = _mid(cfg, rngs, channels)
        blocks = []
        for level in reversed(range(levels)):
            stage, channels = _resnet_stage(cfg, rngs, channels, ch * cfg.channel_multipliers[level],
                                            cfg.num_res_blocks + 1, cfg.attends(level))
            blocks += stage
            if level != 0:
                blocks.append(Upsample(cfg, rngs, channels))
        self.up = nnx.List(blocks)
        self.norm_out = GroupNorm(cfg, rngs, channels)
        self.conv_out = Conv(cfg, rngs, channels, cfg.in_channels)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = _run(self.up, _run(self.mid, self.conv_in(z)))
        return self.conv_out(jax.nn.swish(self.norm_out(x)))


class VQGAN(nnx.Module):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder."""

    def __init__(self, cfg: VQGANConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = PatchEncoder(cfg, rngs) if cfg.encoder == "patch" else Encoder(cfg, rngs)
        self.quant_conv = Conv(cfg, rngs, cfg.embed_dim, cfg.embed_dim, kernel=1)
        self.quantizer = VectorQuantizer(cfg, rngs)
        self.post_quant_conv = Conv(cfg, rngs, cfg.embed_dim, cfg.embed_dim, kernel=1)
        self.decoder = Decoder(cfg, rngs)

    @property
    def last_decoder_layer(self) -> nnx.Param:
        """The decoder's output conv kernel (taming's adaptive GAN weight uses its gradients)."""
        return self.decoder.conv_out.kernel

    def check_images(self, images: jax.Array) -> None:
        """Raises ValueError unless images are [batch, R, R, in_channels]."""
        r, c = self.cfg.resolution, self.cfg.in_channels
        if images.ndim != 4 or tuple(images.shape[1:]) != (r, r, c):
            raise ValueError(f"VQGAN expects images of shape [batch, {r}, {r}, {c}] "
                             f"(resolution {r}, {c} channels), got shape {tuple(images.shape)}")

    def encode_latents(self, images: jax.Array) -> jax.Array:
        """Images [B, R, R, C] in [-1, 1] -> latents [B, g, g, embed_dim] (quantiser input)."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def encode(self, images: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array, QuantizerOutput]:
        """Images -> (quantised latents [B, g, g, embed_dim], codes int32 [B, g, g], output)."""
        out = self.quantizer(self.encode_latents(images), train=train)
        return out.quantized, out.codes, out

    def decode(self, quantized: jax.Array) -> jax.Array:
        """Quantised latents [B, g, g, embed_dim] -> images [B, R, R, C] float32 (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(quantized)).astype(jnp.float32)

    def decode_codes(self, codes: jax.Array) -> jax.Array:
        """Codes int [B, g, g] -> images [B, R, R, C] float32."""
        g = self.cfg.grid
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (g, g):
            raise ValueError(f"VQGAN expects codes of shape [batch, {g}, {g}], "
                             f"got shape {tuple(codes.shape)}")
        return self.decode(self.quantizer.embed_codes(codes))

    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Images -> (reconstruction [B, R, R, C] float32, quantiser output).

        With `train`, the quantiser updates its CodebookStats (usage, EMA codebook).
        """
        quantized, _, out = self.encode(images, train=train)
        return self.decode(quantized), out


def create_vqgan(cfg: VQGANConfig, seed: int | jax.Array) -> VQGAN:
    """Builds a VQGAN with parameters initialised from `seed` (no sharding applied).

    Initialisation runs as one jitted program (eager init of ~100 random tensors is slow).
    """
    return jit_create(VQGAN, cfg, seed)


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_create(module_class, cfg, seed: int | jax.Array) -> nnx.Module:
    """`module_class(cfg, rngs=nnx.Rngs(params=seed))`, initialised by one compiled program."""
    with nnx.use_eager_sharding(False):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: module_class(cfg, rngs=nnx.Rngs(params=0))))
        key = seed
        if not (isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)):
            key = jax.random.key(seed) if jnp.ndim(seed) == 0 else jax.random.wrap_key_data(seed)
        init = jax.jit(lambda k: nnx.state(module_class(cfg, rngs=nnx.Rngs(params=k)))).lower(key)
        # A one-shot program: on CPU, cheap codegen beats optimised code (4x faster compile).
        options = _FAST_COMPILE if jax.default_backend() == "cpu" else {}
        state = init.compile(compiler_options=options)(key)
        return nnx.merge(graphdef, state)
