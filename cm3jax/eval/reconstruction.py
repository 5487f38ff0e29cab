"""Reconstruction quality of an image tokenizer: PSNR, SSIM, LPIPS, codebook use, oracle.

`evaluate_reconstruction(tokenizer, images)` encodes and decodes uint8 images [N, R, R, 3]
with any image tokenizer (`PaletteTokenizer`, `VQGANTokenizer`: `encode`, `decode`,
`codebook_size`) and returns the mean metrics over images:

- psnr: 10 log10(255^2 / MSE) per image on [0, 255] pixels, in dB, capped at `PSNR_CAP_DB`
  (100 dB) so identical images give a finite 100 instead of inf; then the mean.
- ssim: Wang et al. 2004 SSIM per image, per channel, with an 11x11 Gaussian window
  (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, averaged over the
  window positions that fit inside the image (no padding) and over channels; this equals
  `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)`. Needs R >= 11.
- lpips: mean LPIPS distance (only with `lpips_net`, e.g. cm3jax.models.perceptual.LPIPS or
  any callable mapping two float [B, R, R, 3] batches in [-1, 1] to [B] distances).
- codebook_usage: fraction of the codebook used at least once over all images' codes.
- codebook_perplexity: exp(entropy) of the code histogram over all images.

`oracle_agreement` compares shapes-oracle readings of originals and reconstructions, and
`save_grid` writes a PNG of originals over reconstructions.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx

from cm3jax.data import shapes
from cm3jax.eval import grid

PSNR_CAP_DB = 100.0  # PSNR of (near-)identical images; an exact match would be inf
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0


class ImageTokenizer(Protocol):
    """What the evaluation needs from an image tokenizer."""

    codebook_size: int

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...


def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 images [N, H, W, 3], "
                         f"got {images.dtype} {images.shape}")
    return images


def _check_pair(originals: np.ndarray,
                reconstructions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    originals = _check_images(originals, "originals")
    reconstructions = _check_images(reconstructions, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions "
                         f"{reconstructions.shape} differ in shape")
    return originals, reconstructions


def psnr(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Per-image PSNR [N] in dB on [0, 255] pixels, capped at PSNR_CAP_DB."""
    a, b = _check_pair(originals, reconstructions)
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(DATA_RANGE**2 / mse)
    return np.minimum(values, PSNR_CAP_DB)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian of the SSIM window (the 2-D window is its outer product)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-0.5 * np.square(x / sigma))
    return w / w.sum()


def _filter(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """'Valid' separable correlation of x [N, H, W, C] with window over H and W."""
    k = len(window)
    rows = np.lib.stride_tricks.sliding_window_view(x, k, axis=1) @ window
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=2) @ window


def ssim(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Per-image SSIM [N] (Gaussian 11x11, sigma 1.5, mean over valid positions and channels)."""
    a, b = _check_pair(originals, reconstructions)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, "
                         f"got {a.shape[1]}x{a.shape[2]}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    w = gaussian_window()
    mu_x, mu_y = _filter(x, w), _filter(y, w)
    var_x = _filter(x * x, w) - mu_x**2
    var_y = _filter(y * y, w) - mu_y**2
    cov = _filter(x * y, w) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
         / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return s.mean(axis=(1, 2, 3))


def code_statistics(codes: np.ndarray, codebook_size: int) -> tuple[float, float]:
    """(usage fraction, perplexity) of the histogram of all `codes`."""
    counts = np.bincount(np.asarray(codes).reshape(-1), minlength=codebook_size)[:codebook_size]
    probs = counts / max(counts.sum(), 1)
    nonzero = probs[probs > 0]
    return float(np.mean(counts > 0)), float(np.exp(-np.sum(nonzero * np.log(nonzero))))


def reconstruct(tokenizer: ImageTokenizer, images: np.ndarray,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(codes, reconstructions uint8) of images [N, R, R, 3], in chunks of batch_size."""
    images = _check_images(images, "images")
    codes, reconstructions = [], []
    for start in range(0, len(images), batch_size):
        chunk_codes = np.asarray(tokenizer.encode(images[start:start + batch_size]))
        codes.append(chunk_codes)
        reconstructions.append(np.asarray(tokenizer.decode(chunk_codes), np.uint8))
    return np.concatenate(codes), np.concatenate(reconstructions)


def lpips_distance(lpips_net: Callable[[Any, Any], Any], originals: np.ndarray,
                   reconstructions: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Per-image LPIPS [N] of uint8 images (converted to [-1, 1]), in chunks of batch_size."""
    a, b = _check_pair(originals, reconstructions)
    call = _jitted(lpips_net)
    out = []
    for start in range(0, len(a), batch_size):
        x, y = (v[start:start + batch_size].astype(np.float32) / 127.5 - 1.0 for v in (a, b))
        out.append(np.asarray(call(x, y), np.float64).reshape(-1))
    return np.concatenate(out)


def _jitted(net: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """An NNX module's call jitted through split / merge; other callables as they are."""
    if not isinstance(net, nnx.Module):
        return net
    graphdef, state = nnx.split(net)
    jitted = jax.jit(lambda state, x, y: nnx.merge(graphdef, state)(x, y))
    return lambda x, y: jitted(state, x, y)


def evaluate_reconstruction(tokenizer: ImageTokenizer, images: np.ndarray,
                            lpips_net: Callable[[Any, Any], Any] | None = None,
                            batch_size: int = 64) -> dict[str, float]:
    """Mean reconstruction metrics of `tokenizer` on uint8 images [N, R, R, 3].

    Returns:
      {'num_images', 'psnr' (dB, capped at PSNR_CAP_DB), 'ssim', 'codebook_usage',
       'codebook_perplexity'} plus 'lpips' when `lpips_net` is given (see the module doc).
    """
    images = _check_images(images, "images")
    if len(images) == 0:
        raise ValueError("evaluate_reconstruction needs at least one image")
    codes, reconstructions = reconstruct(tokenizer, images, batch_size)
    usage, perplexity = code_statistics(codes, tokenizer.codebook_size)
    metrics = {
        "num_images": float(len(images)),
        "psnr": float(np.mean(psnr(images, reconstructions))),
        "ssim": float(np.mean(ssim(images, reconstructions))),
        "codebook_usage": usage,
        "codebook_perplexity": perplexity,
    }
    if lpips_net is not None:
        metrics["lpips"] = float(np.mean(lpips_distance(lpips_net, images, reconstructions,
                                                        batch_size)))
    return metrics


def oracle_agreement(originals: np.ndarray, reconstructions: np.ndarray) -> float:
    """Fraction of images whose `shapes.oracle` reading (objects, canonical order) is the
    same for the original and its reconstruction (R >= shapes.MIN_RESOLUTION)."""
    a, b = _check_pair(originals, reconstructions)
    if len(a) == 0:
        raise ValueError("oracle_agreement needs at least one image")
    return float(np.mean([shapes.oracle(x) == shapes.oracle(y) for x, y in zip(a, b)]))


def save_grid(originals: np.ndarray, reconstructions: np.ndarray, path: str | os.PathLike,
              columns: int = 8) -> tuple[int, int]:
    """Writes a PNG of `columns` originals over their reconstructions, per group of images.

    Image i sits in column i % columns of row pair i // columns (originals on top); empty
    cells are black. The PNG is min(N, columns) * W wide and 2 * ceil(N / columns) * H high.

    Returns:
      (width, height) of the PNG.
    """
    a, b = _check_pair(originals, reconstructions)
    if len(a) == 0 or columns < 1:
        raise ValueError(f"save_grid needs images and columns >= 1, got {len(a)} and {columns}")
    return grid.save_rows([a, b], path, columns)
