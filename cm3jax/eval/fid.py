"""Fréchet distance between image sets in a feature space: FID and a dual-encoder variant.

Features come from a `FeatureExtractor` (`name`, images -> float32 [N, D]):

- `InceptionFeatures`: pool3 of pytorch-fid's FID InceptionV3 (cm3jax/models/inception.py) on
  uint8 RGB [N, H, W, 3] (each image / 255, resized to 299x299 inside the net). With the real
  weights (`load_inception_weights`) this is FID as pytorch-fid computes it ("inception_v3_pool3").
- `DualEncoderFeatures`: image embeddings of a trained retrieval dual encoder
  ("dual_encoder_image"). A different metric from FID, never comparable to it.

`FeatureStats` accumulates count, sum and sum of outer products (float64) over any number of
batches, merges, and saves to / loads from .npz, so reference statistics are computed once.
Its mean and unbiased covariance (ddof=1, as numpy.cov in pytorch-fid) give the distance

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(sqrt(S1) S2 sqrt(S1)))

computed with symmetric eigendecompositions in float64 (`frechet_distance`); it equals
pytorch-fid's tr(sqrtm(S1 S2)) form, which is not symmetric and needs SciPy.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.errors import UserError
from cm3jax.models.inception import FEATURE_DIM, InceptionV3

if TYPE_CHECKING:
    from cm3jax.retrieval.encoder import RetrievalEncoder

DATA_AXIS = "data"
_STATS_ARRAYS = ("count", "sum", "sum_outer", "features")


class FeatureExtractor(Protocol):
    """Maps a batch of images to features; `name` says which features (and so which metric)."""

    name: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Images [N, ...] -> float32 features [N, D]."""
        ...


class FeatureStats:
    """Streaming count, sum and sum of outer products (float64) of features [N, D].

    `features` names the extractor, so statistics of different features are never compared.
    """

    def __init__(self, features: str = ""):
        self.features = features
        self.count = 0
        self.sum = np.zeros((0,), np.float64)
        self.sum_outer = np.zeros((0, 0), np.float64)

    @property
    def dim(self) -> int:
        """Feature size (0 before the first update)."""
        return self.sum.shape[0]

    def _add(self, count: int, total: np.ndarray, outer: np.ndarray) -> None:
        if self.count == 0 and self.dim == 0:
            self.sum, self.sum_outer = np.zeros_like(total), np.zeros_like(outer)
        elif total.shape != self.sum.shape:
            raise ValueError(f"features of size {total.shape[0]} added to statistics of size "
                             f"{self.dim}")
        self.count += count
        self.sum += total
        self.sum_outer += outer

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features [N, D]."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {features.shape}")
        self._add(len(features), features.sum(axis=0), features.T @ features)

    def merge(self, other: FeatureStats) -> None:
        """Adds another accumulator's features (same `features` name)."""
        if other.features != self.features:
            raise ValueError(f"cannot merge {other.features!r} statistics into {self.features!r}")
        if other.count:
            self._add(other.count, other.sum, other.sum_outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (ddof=1, as numpy.cov), float64."""
        if self.count < 2:
            raise UserError(f"a covariance needs features of at least 2 images, got {self.count}")
        mean = self.sum / self.count
        cov = (self.sum_outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov

    def save(self, path: str) -> None:
        """Writes the statistics to an .npz (no pickles) that `load` reads."""
        np.savez(path, count=np.int64(self.count), sum=self.sum, sum_outer=self.sum_outer,
                 features=np.str_(self.features))

    @classmethod
    def load(cls, path: str) -> FeatureStats:
        """Statistics written by `save`; UserError on a missing or malformed file."""
        if not os.path.isfile(path):
            raise UserError(f"feature statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in _STATS_ARRAYS}
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: not an .npz of feature statistics "
                            f"({', '.join(_STATS_ARRAYS)}): {e}") from e
        dim = arrays["sum"].shape[0] if arrays["sum"].ndim == 1 else -1
        if dim < 0 or arrays["sum_outer"].shape != (dim, dim):
            raise UserError(f"{path}: sum {arrays['sum'].shape} and sum_outer "
                            f"{arrays['sum_outer'].shape} are not [D] and [D, D]")
        stats = cls(str(arrays["features"]))
        stats.count = int(arrays["count"])
        stats.sum = arrays["sum"].astype(np.float64)
        stats.sum_outer = arrays["sum_outer"].astype(np.float64)
        return stats


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative
    eigenvalues from rounding are taken as 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, >= 0.

    tr(sqrt(S1 S2)) is computed as tr(sqrt(sqrt(S1) S2 sqrt(S1))), a symmetric PSD matrix, so
    it works for singular covariances (fewer samples than dimensions) without SciPy.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shapes differ: mu {mu1.shape} {mu2.shape}, "
                         f"sigma {sigma1.shape} {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_covmean = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean
    return max(float(value), 0.0)


class InceptionFeatures:
    """pool3 features [N, 2048] of uint8 RGB images [N, H, W, 3] (any H, W) with the FID Inception.

    Runs in batches of `batch_size` rounded down to a multiple of the local device count
    (at least one image per device), each batch split over all local devices on a 1-D 'data'
    mesh with the weights replicated; the last batch is zero-padded and the padding dropped.
    """

    name = "inception_v3_pool3"

    def __init__(self, module: InceptionV3, batch_size: int = 50):
        devices = jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
        self.batch_size = max(len(devices), batch_size - batch_size % len(devices))
        graphdef, state = nnx.split(module)
        self._state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

        def forward(state: nnx.State, images: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(images.astype(jnp.float32) / 255.0)

        self._forward = jax.jit(forward)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] -> float32 pool3 features [N, 2048]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, 3], "
                             f"got {images.dtype} {images.shape}")
        out = np.zeros((len(images), FEATURE_DIM), np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start: start + self.batch_size]
            padding = np.zeros((self.batch_size - len(chunk), *chunk.shape[1:]), np.uint8)
            batch = jax.device_put(np.concatenate([chunk, padding]), self._batch_sharding)
            features = self._forward(self._state, batch)
            out[start: start + len(chunk)] = np.asarray(features)[:len(chunk)]
        return out


class DualEncoderFeatures:
    """Image embeddings of a trained retrieval dual encoder (`RetrievalEncoder.embed_images`).

    Takes uint8 pixels [N, R, R, 3] like every extractor; an encoder that reads VQGAN codes
    (`vision_input='codes'`) gets them from `image_tokenizer` first. Returns L2-normalised
    float32 [N, projection_dim], batched over the local devices by the encoder. The distance
    over these features is not FID: results name the features.
    """

    name = "dual_encoder_image"

    def __init__(self, encoder: RetrievalEncoder, image_tokenizer=None):
        if encoder.cfg.vision_input == "codes" and image_tokenizer is None:
            raise ValueError("a dual encoder over codes needs the image tokenizer that made them")
        self.encoder, self.image_tokenizer = encoder, image_tokenizer

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 pixels [N, R, R, 3] -> float32 embeddings [N, dim]."""
        if self.encoder.cfg.vision_input == "codes":
            images = self.image_tokenizer.encode(images)
        return self.encoder.embed_images(images)


def image_stats(extractor: FeatureExtractor,
                images: Iterable[np.ndarray] | np.ndarray) -> FeatureStats:
    """Statistics of the extractor's features over an iterable of image batches (or one array)."""
    stats = FeatureStats(extractor.name)
    for batch in [images] if isinstance(images, np.ndarray) else images:
        stats.update(extractor(batch))
    return stats


def fid(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """Fréchet distance between two sets' feature statistics (FID for Inception pool3 ones).

    Raises:
      UserError: statistics of different features or sizes, or of fewer than 2 images.
    """
    if stats_a.features != stats_b.features or stats_a.dim != stats_b.dim:
        raise UserError(f"cannot compare {stats_a.features!r} features (size {stats_a.dim}) with "
                        f"{stats_b.features!r} features (size {stats_b.dim})")
    return frechet_distance(*stats_a.mean_cov(), *stats_b.mean_cov())


def _stats_of(extractor: FeatureExtractor, images: FeatureStats | Iterable[np.ndarray] | np.ndarray,
              role: str) -> FeatureStats:
    """`images` as statistics of the extractor's features (given ones must be of those)."""
    if not isinstance(images, FeatureStats):
        return image_stats(extractor, images)
    if images.features != extractor.name:
        raise UserError(f"the {role} statistics are of {images.features!r} features, "
                        f"not {extractor.name!r}")
    return images


def fid_result(extractor: FeatureExtractor,
               generated: FeatureStats | Iterable[np.ndarray] | np.ndarray,
               reference: FeatureStats | Iterable[np.ndarray] | np.ndarray) -> dict:
    """{'fid', 'features', 'n_generated', 'n_reference'} for two image sets, each given as
    image batches or as precomputed `FeatureStats` of the same extractor."""
    stats_generated = _stats_of(extractor, generated, "generated")
    stats_reference = _stats_of(extractor, reference, "reference")
    return {"fid": fid(stats_generated, stats_reference), "features": extractor.name,
            "n_generated": stats_generated.count, "n_reference": stats_reference.count}
