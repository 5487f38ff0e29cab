"""Reconstruction metrics: PSNR / SSIM against hand values and skimage, codebook use, grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cm3jax.data import shapes
from cm3jax.eval import reconstruction as rec
from cm3jax.tokenizers.palette import PaletteTokenizer

SHAPES_PALETTE = [shapes.BACKGROUND, *shapes.COLORS.values()]


def _noisy_pair(seed: int = 0, n: int = 3, size: int = 24):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    noise = rng.normal(0, 20, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    return a, b


def _scenes(n: int, resolution: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([shapes.render(shapes.sample_scene(rng, "train"), resolution)
                     for _ in range(n)])


def test_psnr_hand_values_and_cap():
    a = np.zeros((2, 16, 16, 3), np.uint8)
    b = np.full_like(a, 10)  # MSE 100
    np.testing.assert_allclose(rec.psnr(a, b), 10 * math.log10(255**2 / 100))
    c = a.copy()
    c[0, 3, 4, 1] = 255  # one of 768 values off by 255: MSE 255^2 / 768
    np.testing.assert_allclose(rec.psnr(a, c), [10 * math.log10(768), rec.PSNR_CAP_DB])
    assert rec.psnr(b, b).tolist() == [100.0, 100.0]


def test_ssim_identical_is_one_and_constant_images_match_the_formula():
    a, _ = _noisy_pair()
    np.testing.assert_allclose(rec.ssim(a, a), 1.0, atol=1e-12)
    # Constant images: variances and covariance vanish, SSIM = (2xy + C1) / (x^2 + y^2 + C1).
    x, y = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(rec.ssim(x, y), (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    # Inverted contrast is strongly dissimilar; SSIM is symmetric.
    inverted = 255 - a
    assert rec.ssim(a, inverted).max() < 0
    np.testing.assert_allclose(rec.ssim(a, inverted), rec.ssim(inverted, a))
    with pytest.raises(ValueError, match="at least 11x11"):
        rec.ssim(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8))


def test_ssim_matches_skimage():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (SSIM reference) "
                                  "is not installed")
    for seed in range(3):
        a, b = _noisy_pair(seed, size=24 + 8 * seed)
        ours = rec.ssim(a, b)
        reference = [metrics.structural_similarity(
            x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255, channel_axis=-1) for x, y in zip(a, b)]
        np.testing.assert_allclose(ours, reference, atol=1e-3)
        np.testing.assert_allclose(ours, reference, atol=1e-9)  # same maths in float64


def test_code_statistics_hand_values():
    codes = np.array([[0, 0], [1, 1]])
    assert rec.code_statistics(codes, 4) == pytest.approx((0.5, 2.0))
    assert rec.code_statistics(np.zeros((3, 2, 2), np.int32), 8) == pytest.approx((0.125, 1.0))


def test_evaluate_exact_tokenizer_on_shapes():
    images = _scenes(5)
    tokenizer = PaletteTokenizer(SHAPES_PALETTE, 32)
    calls = []

    def fake_lpips(x, y):  # any callable: float batches in [-1, 1] -> [B]
        calls.append(len(x))
        assert x.min() >= -1 and x.max() <= 1
        return np.abs(np.asarray(x) - np.asarray(y)).mean(axis=(1, 2, 3))

    metrics = rec.evaluate_reconstruction(tokenizer, images, lpips_net=fake_lpips, batch_size=2)
    used = len(np.unique(images.reshape(-1, 3), axis=0))
    assert metrics == pytest.approx({"num_images": 5, "psnr": 100.0, "ssim": 1.0, "lpips": 0.0,
                                     "codebook_usage": used / 11,
                                     "codebook_perplexity": metrics["codebook_perplexity"]})
    assert calls == [2, 2, 1]
    codes = tokenizer.encode(images)
    assert metrics["codebook_perplexity"] == pytest.approx(rec.code_statistics(codes, 11)[1])
    _, reconstructions = rec.reconstruct(tokenizer, images)
    assert rec.oracle_agreement(images, reconstructions) == 1.0
    blanked = reconstructions.copy()
    blanked[:2] = 0  # every scene has an object: a black picture reads differently
    assert rec.oracle_agreement(images, blanked) == pytest.approx(3 / 5)


def test_evaluate_lossy_tokenizer_matches_direct_metrics():
    images = _noisy_pair(n=3, size=16)[1]
    tokenizer = PaletteTokenizer([[0, 0, 0], [255, 255, 255], [128, 128, 128]], 16, downsample=2)
    metrics = rec.evaluate_reconstruction(tokenizer, images)
    reconstructions = tokenizer.decode(tokenizer.encode(images))
    assert metrics["psnr"] == pytest.approx(rec.psnr(images, reconstructions).mean())
    assert metrics["psnr"] < 20 and metrics["ssim"] < 0.5
    assert metrics["ssim"] == pytest.approx(rec.ssim(images, reconstructions).mean())
    assert "lpips" not in metrics


def test_lpips_module_is_zero_on_identical_images():
    from cm3jax.models.perceptual import create_lpips

    a, b = _noisy_pair(n=2, size=16)
    distances = rec.lpips_distance(create_lpips(0), np.concatenate([a, a]), np.concatenate([a, b]))
    assert distances.shape == (4,)
    np.testing.assert_allclose(distances[:2], 0.0, atol=1e-6)
    assert (distances[2:] > 0).all()


def test_save_grid_layout(tmp_path):
    originals = np.stack([np.full((16, 12, 3), 10 * i, np.uint8) for i in range(10)])
    reconstructions = 255 - originals
    path = tmp_path / "sub" / "grid.png"
    assert rec.save_grid(originals, reconstructions, path, columns=4) == (48, 96)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (96, 48, 3)
    assert (grid[0, 0] == 0).all() and (grid[16, 0] == 255).all()  # image 0 over its recon
    assert (grid[32, 12] == 50).all() and (grid[48, 12] == 205).all()  # image 5: pair 1, col 1
    assert (grid[64:, 24:] == 0).all()  # cells after image 9 stay black
    assert rec.save_grid(originals[:3], reconstructions[:3], tmp_path / "g.png") == (36, 32)
