"""LPIPS perceptual distance (Zhang et al. 2018, the `lpips` package, VGG16 trunk) in Flax NNX.

`LPIPS(images, targets)` gives one distance per image, like `lpips.LPIPS(net='vgg')(a, b)`
with `normalize=False`: images are NHWC floats in [-1, 1], shifted and scaled per channel
(lpips's ScalingLayer), run through torchvision's VGG16 `features` trunk, tapped after
relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3; each tap is unit-normalised over channels,
the squared difference is weighted by that tap's 1x1 `lin` conv (no bias; lpips's dropout
only acts in training, so it is absent), averaged over space and summed over taps. Everything
is computed in float32 at HIGHEST matmul precision.

The weights are a frozen, pretrained metric: `load_lpips_weights` converts a PyTorch state
dict (an lpips `LPIPS(net='vgg')` one, or a torchvision `vgg16` one plus lpips's
`weights/v0.1/vgg.pth`) and needs torch, imported only there; `save_npz` / `load_npz` store a
converted net for later use without torch. Nothing downloads weights. Kernels are HWIO with
logical axis names CONV_KERNEL_NAMES (as the VQGAN), biases ('conv_out',).
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

# torchvision vgg16.features: (index of the conv in `features`, in channels, out channels) of
# each stage; a 2x2 max-pool precedes stages 2-5, every conv is 3x3 (padding 1) + ReLU, and
# the last ReLU of each stage is an lpips tap. lpips's `net.slice{s}.{index}` keeps the index.
VGG16_STAGES = (
    ((0, 3, 64), (2, 64, 64)),
    ((5, 64, 128), (7, 128, 128)),
    ((10, 128, 256), (12, 256, 256), (14, 256, 256)),
    ((17, 256, 512), (19, 512, 512), (21, 512, 512)),
    ((24, 512, 512), (26, 512, 512), (28, 512, 512)),
)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# lpips ScalingLayer (v0.1): x -> (x - SHIFT) / SCALE, per RGB channel.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor's eps
# State-dict keys that carry nothing LPIPS needs: lpips's aliases of lin0..4 and its constant
# scaling buffers, torchvision's classifier head.
_IGNORED_KEYS = re.compile(r"(lins\.\d+\.|scaling_layer\.|classifier\.)")
_PRECISION = jax.lax.Precision.HIGHEST


class Conv2d(nnx.Module):
    """Stride-1 'same' convolution, NHWC input, HWIO kernel, optional bias, float32."""

    def __init__(self, rngs: nnx.Rngs, in_channels: int, out_channels: int, kernel: int = 3,
                 bias: bool = True, init: nnx.Initializer | None = None):
        init = init or nnx.initializers.he_normal()
        shape = (kernel, kernel, in_channels, out_channels)
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32),
                                out_sharding=CONV_KERNEL_NAMES)
        zeros = jnp.zeros((out_channels,), jnp.float32)
        self.bias = nnx.Param(zeros, out_sharding=CONV_KERNEL_NAMES[-1:]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.kernel.shape[0] // 2
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_PRECISION)
        return y if self.bias is None else y + self.bias[...]


def _unit_normalize(x: jax.Array) -> jax.Array:
    """x / (||x||_channels + eps) as lpips.normalize_tensor, with finite gradients where x = 0."""
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sum_sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
    return x / (norm + NORM_EPS)


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2 (torch MaxPool2d(2, 2): odd edges are dropped)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
    """LPIPS-VGG16 distance between image batches: [B, H, W, 3] x2 in [-1, 1] -> [B] float32.

    A fresh module is randomly initialised (He-normal convs, zero biases, lin weights 1, which
    is lpips's `lpips=False` baseline); load real weights with `load_lpips_weights` / `load_npz`.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.stages = nnx.List(
            nnx.List(Conv2d(rngs, cin, cout) for _, cin, cout in stage) for stage in VGG16_STAGES)
        self.lins = nnx.List(
            Conv2d(rngs, stage[-1][2], 1, kernel=1, bias=False, init=nnx.initializers.ones)
            for stage in VGG16_STAGES)

    def features(self, images: jax.Array) -> tuple[jax.Array, ...]:
        """The five VGG16 taps (TAP_NAMES), NHWC float32, of images [B, H, W, 3] in [-1, 1]."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"LPIPS expects images [batch, height, width, 3], got {images.shape}")
        shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
        x = (images.astype(jnp.float32) - shift) / scale
        taps = []
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = _max_pool(x)
            for conv in stage:
                x = jax.nn.relu(conv(x))
            taps.append(x)
        return tuple(taps)

    def __call__(self, images: jax.Array, targets: jax.Array) -> jax.Array:
        """Per-image distance [B] (float32) between `images` and `targets` (same shape)."""
        if images.shape != targets.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {images.shape} vs {targets.shape}")
        batch = images.shape[0]
        taps = self.features(jnp.concatenate([images, targets], axis=0))
        total = jnp.zeros((batch,), jnp.float32)
        for tap, lin in zip(taps, self.lins):
            diff = jnp.square(_unit_normalize(tap[:batch]) - _unit_normalize(tap[batch:]))
            total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
        return total


def create_lpips(seed: int = 0) -> LPIPS:
    """A randomly initialised LPIPS (for tests and shapes; see `LPIPS`), no sharding applied.

    Drawn with numpy: one jitted init of 14.7M VGG parameters takes seconds to compile on CPU.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, variable in _variables(_abstract()).items():
        shape = tuple(variable.shape)
        if name.startswith("lin"):
            arrays[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            arrays[name] = np.zeros(shape, np.float32)
        else:
            std = np.sqrt(2.0 / np.prod(shape[:3]))  # He normal, fan in
            arrays[name] = rng.normal(0.0, std, shape).astype(np.float32)
    return _from_arrays(arrays, f"create_lpips({seed})")


def _variables(module: LPIPS) -> dict[str, nnx.Param]:
    """The module's parameters by storage name: features.{i}.kernel / .bias, lin{k}.kernel."""
    out = {}
    for stage_spec, stage in zip(VGG16_STAGES, module.stages):
        for (index, _, _), conv in zip(stage_spec, stage):
            out[f"features.{index}.kernel"], out[f"features.{index}.bias"] = conv.kernel, conv.bias
    for k, lin in enumerate(module.lins):
        out[f"lin{k}.kernel"] = lin.kernel
    return out


def _abstract() -> LPIPS:
    """An LPIPS of shape-only parameters (nothing computed), to be filled by `_from_arrays`."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: LPIPS(nnx.Rngs(params=0)))


def _from_arrays(arrays: Mapping[str, np.ndarray], source: str) -> LPIPS:
    """An LPIPS holding `arrays` (storage names, HWIO); UserError on a missing or misshapen one."""
    module = _abstract()
    return weight_files.fill(module, _variables(module), arrays, source, "LPIPS")


def save_npz(module: LPIPS, path: str) -> None:
    """Stores the weights in an .npz (np.savez; HWIO, storage names) that `load_npz` reads."""
    weight_files.save_npz(_variables(module), path)


def load_npz(path: str) -> LPIPS:
    """An LPIPS from a `save_npz` file (no torch needed); UserError on a bad file."""
    return _from_arrays(weight_files.read_npz(path, _variables(_abstract()), "LPIPS"), path)


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict file as float32 numpy arrays."""
    return read_torch_state_dict(path, "convert them once elsewhere: load_lpips_weights + save_npz")


def _storage_name(key: str) -> str | None:
    """Storage name of a torch key ('' to ignore it, None if unknown); the value stays OIHW."""
    if _IGNORED_KEYS.match(key):
        return ""
    match = re.fullmatch(r"(?:net\.slice[1-5]\.|features\.)(\d+)\.(weight|bias)", key)
    if match:
        return f"features.{match[1]}.{'kernel' if match[2] == 'weight' else 'bias'}"
    match = re.fullmatch(r"lin(\d)\.model\.[01]\.weight", key)  # model.0 without dropout
    return f"lin{match[1]}.kernel" if match else None


def _torch_name(name: str, lpips_layout: bool) -> str:
    """The state-dict key a storage name comes from, in the file's layout (for messages)."""
    if name.startswith("lin"):
        return f"{name.split('.')[0]}.model.1.weight"
    index, kind = name.split(".")[1:]
    kind = "weight" if kind == "kernel" else "bias"
    if not lpips_layout:
        return f"features.{index}.{kind}"
    stage = next(s for s, spec in enumerate(VGG16_STAGES, 1) if int(index) in [c[0] for c in spec])
    return f"net.slice{stage}.{index}.{kind}"


def load_lpips_weights(path: str, lin_path: str | None = None) -> LPIPS:
    """An LPIPS from PyTorch weights; needs torch (imported here only).

    Args:
      path: `torch.save(lpips.LPIPS(net='vgg').state_dict(), path)` (keys `net.slice1.0.weight`,
        ..., `lin0.model.1.weight`, ...), or a torchvision `vgg16` state dict (`features.0.weight`,
        ...; the classifier is ignored) for the trunk only.
      lin_path: a state dict with `lin0.model.1.weight` ... `lin4.model.1.weight`, e.g. the
        lpips package's `lpips/weights/v0.1/vgg.pth`; needed with a torchvision `path`, and
        overrides the lin weights of an lpips one.

    Raises:
      UserError: torch missing, a file missing or unreadable, keys missing (named) or unknown,
        or a shape that is not LPIPS-VGG16's.
    """
    arrays, lpips_layout, sources = {}, False, [path] + ([lin_path] if lin_path else [])
    for source in sources:
        state = _read_state_dict(source)
        lpips_layout |= any(k.startswith("net.slice") for k in state)
        unknown = [k for k in state if _storage_name(k) is None]
        if unknown:
            raise UserError(f"{source}: unexpected keys for LPIPS-VGG16: {', '.join(unknown)}")
        for key, value in state.items():
            name = _storage_name(key)
            if name:  # OIHW -> HWIO
                arrays[name] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    missing = [name for name in _variables(_abstract()) if name not in arrays]
    if missing:
        keys = ", ".join(_torch_name(name, lpips_layout) for name in missing)
        raise UserError(f"{' + '.join(sources)}: missing keys {keys} (expected an lpips "
                        "LPIPS(net='vgg') state dict, or a torchvision vgg16 one plus lpips's "
                        "weights/v0.1/vgg.pth as lin_path)")
    return _from_arrays(arrays, " + ".join(sources))


def load(path: str) -> LPIPS:
    """LPIPS from a converted `.npz` (no torch needed) or an lpips / torchvision `.pth` state dict."""
    return load_npz(path) if path.endswith(".npz") else load_lpips_weights(path)
