"""The FID InceptionV3 of `pytorch-fid` (TF's 2015-12-05 Inception, pool3 features) in Flax NNX.

`InceptionV3(images)` maps NHWC float32 images in [0, 1] to the 2048-d pool3 features, like
`pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True,
use_fid_inception=True)` on the same images in NCHW: the input is resized to 299x299 with
torch's `F.interpolate(mode='bilinear', align_corners=False)` arithmetic (no antialiasing;
`jax.image.resize` antialiases by default when shrinking, so it is not used), mapped to
[-1, 1] by 2x - 1, run through torchvision's Inception3 trunk Conv2d_1a_3x3 .. Mixed_7c with
pytorch-fid's FID blocks (FIDInceptionA/C/E_1 average-pool without counting the padding,
FIDInceptionE_2 max-pools in its pool branch) and averaged over space. Every BasicConv2d is a
bias-free conv, an inference BatchNorm (eps 1e-3, running statistics) and a ReLU, in float32
at HIGHEST matmul precision. `activations` also returns every block's output.

The weights are a frozen metric: `load_inception_weights` reads a state dict in the layout of
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a path; nothing is ever downloaded; torch
is imported there only) or an `.npz` written by `save_npz`. Storage names are the torch keys
with `conv.weight` (OIHW) stored as `conv.kernel` (HWIO, logical axes CONV_KERNEL_NAMES);
BatchNorm vectors have the axis ('conv_out',).
"""

from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3jax.errors import UserError
from cm3jax.models import weight_files
from cm3jax.models.torch_state import read_torch_state_dict
from cm3jax.models.vqgan import CONV_KERNEL_NAMES

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
# Trunk blocks in order; a 3x3 stride-2 max-pool precedes Conv2d_3b_1x1 and Mixed_5b.
BLOCK_NAMES = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
)
_POOLED_BEFORE = ("Conv2d_3b_1x1", "Mixed_5b")
# State-dict entries the features do not use: the classifier and BatchNorm's step counters.
_IGNORED_KEYS = re.compile(r"fc\.|.*\.num_batches_tracked$")
_PRECISION = jax.lax.Precision.HIGHEST


class Conv(nnx.Module):
    """Bias-free convolution, NHWC input, HWIO kernel; padding 0 or 'same' (kernel // 2)."""

    def __init__(self, rngs: nnx.Rngs, in_channels: int, out_channels: int,
                 kernel: tuple[int, int], stride: int, same: bool):
        shape = (*kernel, in_channels, out_channels)
        init = nnx.initializers.he_normal()
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32),
                                out_sharding=CONV_KERNEL_NAMES)
        self.stride = stride
        self.padding = tuple((k // 2, k // 2) if same else (0, 0) for k in kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            x, self.kernel[...], window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISION)


class BatchNorm(nnx.Module):
    """Inference BatchNorm2d over the last axis: (x - running_mean) / sqrt(running_var + eps)."""

    def __init__(self, channels: int):
        names = CONV_KERNEL_NAMES[-1:]
        self.weight = nnx.Param(jnp.ones((channels,), jnp.float32), out_sharding=names)
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=names)
        self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32), out_sharding=names)
        self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32), out_sharding=names)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + BN_EPS)
        return (x - self.running_mean[...]) * scale + self.bias[...]


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias) + BatchNorm(eps=1e-3) + ReLU."""

    def __init__(self, rngs: nnx.Rngs, in_channels: int, out_channels: int,
                 kernel: tuple[int, int] = (1, 1), stride: int = 1, same: bool = False):
        self.conv = Conv(rngs, in_channels, out_channels, kernel, stride, same)
        self.bn = BatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _window(x: jax.Array, init: float, op, stride: int, pad: int) -> jax.Array:
    """A 3x3 window reduction over H and W with `stride` and `pad` on each side."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, init, op, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    """3x3 max-pool (torch MaxPool2d: padding never wins, odd edges dropped)."""
    return _window(x, -jnp.inf, jax.lax.max, stride, pad)


def avg_pool(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, count_include_pad=False (TF's average pool)."""
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    return _window(x, 0.0, jax.lax.add, 1, 1) / _window(ones, 0.0, jax.lax.add, 1, 1)


class InceptionA(nnx.Module):
    """FIDInceptionA (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, rngs: nnx.Rngs, cin: int, pool_features: int):
        self.branch1x1 = BasicConv2d(rngs, cin, 64)
        self.branch5x5_1 = BasicConv2d(rngs, cin, 48)
        self.branch5x5_2 = BasicConv2d(rngs, 48, 64, (5, 5), same=True)
        self.branch3x3dbl_1 = BasicConv2d(rngs, cin, 64)
        self.branch3x3dbl_2 = BasicConv2d(rngs, 64, 96, (3, 3), same=True)
        self.branch3x3dbl_3 = BasicConv2d(rngs, 96, 96, (3, 3), same=True)
        self.branch_pool = BasicConv2d(rngs, cin, pool_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """InceptionB (Mixed_6a): stride-2 3x3, double 3x3 and max-pool branches."""

    def __init__(self, rngs: nnx.Rngs, cin: int):
        self.branch3x3 = BasicConv2d(rngs, cin, 384, (3, 3), stride=2)
        self.branch3x3dbl_1 = BasicConv2d(rngs, cin, 64)
        self.branch3x3dbl_2 = BasicConv2d(rngs, 64, 96, (3, 3), same=True)
        self.branch3x3dbl_3 = BasicConv2d(rngs, 96, 96, (3, 3), stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x),
        ], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (Mixed_6b..e): 1x1, factorised 7x7, double 7x7 and average-pool branches."""

    def __init__(self, rngs: nnx.Rngs, cin: int, c7: int):
        row, col = (1, 7), (7, 1)
        self.branch1x1 = BasicConv2d(rngs, cin, 192)
        self.branch7x7_1 = BasicConv2d(rngs, cin, c7)
        self.branch7x7_2 = BasicConv2d(rngs, c7, c7, row, same=True)
        self.branch7x7_3 = BasicConv2d(rngs, c7, 192, col, same=True)
        self.branch7x7dbl_1 = BasicConv2d(rngs, cin, c7)
        self.branch7x7dbl_2 = BasicConv2d(rngs, c7, c7, col, same=True)
        self.branch7x7dbl_3 = BasicConv2d(rngs, c7, c7, row, same=True)
        self.branch7x7dbl_4 = BasicConv2d(rngs, c7, c7, col, same=True)
        self.branch7x7dbl_5 = BasicConv2d(rngs, c7, 192, row, same=True)
        self.branch_pool = BasicConv2d(rngs, cin, 192)

    def __call__(self, x: jax.Array) -> jax.Array:
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(avg_pool(x)),
        ], axis=-1)


class InceptionD(nnx.Module):
    """InceptionD (Mixed_7a): 1x1 + stride-2 3x3, 1x1 + 7x7 + stride-2 3x3 and max-pool branches."""

    def __init__(self, rngs: nnx.Rngs, cin: int):
        self.branch3x3_1 = BasicConv2d(rngs, cin, 192)
        self.branch3x3_2 = BasicConv2d(rngs, 192, 320, (3, 3), stride=2)
        self.branch7x7x3_1 = BasicConv2d(rngs, cin, 192)
        self.branch7x7x3_2 = BasicConv2d(rngs, 192, 192, (1, 7), same=True)
        self.branch7x7x3_3 = BasicConv2d(rngs, 192, 192, (7, 1), same=True)
        self.branch7x7x3_4 = BasicConv2d(rngs, 192, 192, (3, 3), stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch7x7x3 = x
        for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                     self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return jnp.concatenate([
            self.branch3x3_2(self.branch3x3_1(x)), branch7x7x3, max_pool(x)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (Mixed_7b, average pool) / FIDInceptionE_2 (Mixed_7c, `use_max_pool`)."""

    def __init__(self, rngs: nnx.Rngs, cin: int, use_max_pool: bool):
        self.branch1x1 = BasicConv2d(rngs, cin, 320)
        self.branch3x3_1 = BasicConv2d(rngs, cin, 384)
        self.branch3x3_2a = BasicConv2d(rngs, 384, 384, (1, 3), same=True)
        self.branch3x3_2b = BasicConv2d(rngs, 384, 384, (3, 1), same=True)
        self.branch3x3dbl_1 = BasicConv2d(rngs, cin, 448)
        self.branch3x3dbl_2 = BasicConv2d(rngs, 448, 384, (3, 3), same=True)
        self.branch3x3dbl_3a = BasicConv2d(rngs, 384, 384, (1, 3), same=True)
        self.branch3x3dbl_3b = BasicConv2d(rngs, 384, 384, (3, 1), same=True)
        self.branch_pool = BasicConv2d(rngs, cin, 192)
        self.use_max_pool = use_max_pool

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = max_pool(x, stride=1, pad=1) if self.use_max_pool else avg_pool(x)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], axis=-1)


def _resize_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Linear resampling of one axis to `size` as torch's bilinear, align_corners=False."""
    n = x.shape[axis]
    scale = np.float32(n) / np.float32(size)
    # torch's float32 kernel computes scale * (i + 0.5) - 0.5 as one fused multiply-add: exact
    # in float64, rounded once to float32.
    source = (np.float64(scale) * (np.arange(size) + 0.5) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0.0))
    floor = np.floor(source)
    frac = (source - floor).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    low = floor.astype(np.int32)
    high = np.minimum(low + 1, n - 1)
    return jnp.take(x, low, axis=axis) * (1 - frac) + jnp.take(x, high, axis=axis) * frac


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[N, H, W, C] -> [N, size, size, C] like F.interpolate(bilinear, align_corners=False)."""
    return _resize_axis(_resize_axis(images, 2, size), 1, size)  # torch's order: width first


class InceptionV3(nnx.Module):
    """pytorch-fid's FID InceptionV3 up to pool3: images [N, H, W, 3] in [0, 1] -> [N, 2048].

    A fresh module is randomly initialised; load the real weights with `load_inception_weights`.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(rngs, 3, 32, (3, 3), stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(rngs, 32, 32, (3, 3))
        self.Conv2d_2b_3x3 = BasicConv2d(rngs, 32, 64, (3, 3), same=True)
        self.Conv2d_3b_1x1 = BasicConv2d(rngs, 64, 80)
        self.Conv2d_4a_3x3 = BasicConv2d(rngs, 80, 192, (3, 3))
        self.Mixed_5b = InceptionA(rngs, 192, pool_features=32)
        self.Mixed_5c = InceptionA(rngs, 256, pool_features=64)
        self.Mixed_5d = InceptionA(rngs, 288, pool_features=64)
        self.Mixed_6a = InceptionB(rngs, 288)
        self.Mixed_6b = InceptionC(rngs, 768, c7=128)
        self.Mixed_6c = InceptionC(rngs, 768, c7=160)
        self.Mixed_6d = InceptionC(rngs, 768, c7=160)
        self.Mixed_6e = InceptionC(rngs, 768, c7=192)
        self.Mixed_7a = InceptionD(rngs, 768)
        self.Mixed_7b = InceptionE(rngs, 1280, use_max_pool=False)
        self.Mixed_7c = InceptionE(rngs, 2048, use_max_pool=True)

    def activations(self, images: jax.Array) -> dict[str, jax.Array]:
        """Every block's NHWC output (BLOCK_NAMES) and 'pool3' [N, 2048], all float32."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects images [batch, height, width, 3], "
                             f"got {images.shape}")
        x = 2.0 * resize_bilinear(images.astype(jnp.float32)) - 1.0
        out = {}
        for name in BLOCK_NAMES:
            if name in _POOLED_BEFORE:
                x = max_pool(x)
            x = out[name] = getattr(self, name)(x)
        out["pool3"] = jnp.mean(x, axis=(1, 2))
        return out

    def __call__(self, images: jax.Array) -> jax.Array:
        """pool3 features [N, 2048] of images [N, H, W, 3] in [0, 1]."""
        return self.activations(images)["pool3"]


def _abstract() -> InceptionV3:
    """An InceptionV3 of shape-only weights (nothing computed), to be filled by `_from_arrays`."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: InceptionV3(nnx.Rngs(params=0)))


def _from_arrays(arrays: Mapping[str, np.ndarray], source: str) -> InceptionV3:
    """An InceptionV3 holding `arrays` (storage names, HWIO); UserError on a missing or bad one."""
    module = _abstract()
    return weight_files.fill(module, weight_files.variables_by_name(module), arrays, source, "InceptionV3")


def create_inception(seed: int = 0) -> InceptionV3:
    """A random InceptionV3 (He-normal kernels, identity BatchNorm) for tests; numpy-drawn."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, variable in weight_files.variables_by_name(_abstract()).items():
        shape = tuple(variable.shape)
        if name.endswith("kernel"):
            std = np.sqrt(2.0 / np.prod(shape[:3]), dtype=np.float32)  # He normal, fan in
            arrays[name] = rng.standard_normal(shape, np.float32) * std
        elif name.endswith(("weight", "running_var")):
            arrays[name] = np.ones(shape, np.float32)
        else:
            arrays[name] = np.zeros(shape, np.float32)
    return _from_arrays(arrays, f"create_inception({seed})")


def save_npz(module: InceptionV3, path: str) -> None:
    """Stores the weights in an .npz (storage names, HWIO kernels) that `load_npz` reads."""
    weight_files.save_npz(weight_files.variables_by_name(module), path)


def load_npz(path: str) -> InceptionV3:
    """An InceptionV3 from a `save_npz` file (no torch needed); UserError on a bad file."""
    names = weight_files.variables_by_name(_abstract())
    return _from_arrays(weight_files.read_npz(path, names, "InceptionV3"), path)


def _torch_key(name: str) -> str:
    """The state-dict key of a storage name (a kernel is stored under `conv.weight`)."""
    return re.sub(r"conv\.kernel$", "conv.weight", name)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The state-dict shape of a weight: HWIO kernels are OIHW there."""
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def load_inception_weights(path: str) -> InceptionV3:
    """The FID InceptionV3 from pytorch-fid's weights file, or from a `save_npz` `.npz`.

    Args:
      path: `pt_inception-2015-12-05-6726825d.pth` (torchvision Inception3 keys such as
        `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_var`; `fc.*` and
        `num_batches_tracked` are ignored), any state dict of that layout, or an `.npz`.

    Raises:
      UserError: the file missing or unreadable, torch missing for a `.pth`, a key missing,
        unexpected or of the wrong shape (each named, with the file).
    """
    if path.endswith(".npz"):
        return load_npz(path)
    state = read_torch_state_dict(path, "convert them once elsewhere: load_inception_weights "
                                        "+ save_npz, then pass the .npz")
    expected = {_torch_key(name): (name, _torch_shape(tuple(v.shape)))
                for name, v in weight_files.variables_by_name(_abstract()).items()}
    unknown = [key for key in state if key not in expected and not _IGNORED_KEYS.match(key)]
    if unknown:
        raise UserError(f"{path}: unexpected keys for the FID InceptionV3: {', '.join(unknown)}")
    missing = [key for key in expected if key not in state]
    if missing:
        raise UserError(f"{path}: missing keys {', '.join(missing)} (expected the state dict of "
                        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    arrays = {}
    for key, (name, shape) in expected.items():
        value = state[key]
        if value.shape != shape:
            raise UserError(f"{path}: {key} has shape {value.shape}, "
                            f"the FID InceptionV3 needs {shape}")
        arrays[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
    return _from_arrays(arrays, path)
