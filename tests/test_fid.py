"""FID: the Fréchet distance, streaming feature statistics, the FID InceptionV3 against
pytorch-fid, and sharded feature extraction.

The reference tests need torch, torchvision and pytorch-fid (requirements-ref.txt) and skip
with the reason printed without them; pytorch-fid's weight download is replaced by the state
dict of a random torchvision Inception3, so nothing is ever downloaded. The distance tests
need SciPy only as their reference.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3jax.errors import UserError
from cm3jax.eval.fid import (
    DualEncoderFeatures,
    FeatureStats,
    InceptionFeatures,
    fid,
    fid_result,
    frechet_distance,
    image_stats,
)
from cm3jax.models import dual_encoder as de
from cm3jax.models import inception, weight_files
from cm3jax.retrieval.encoder import RetrievalEncoder
from cm3jax.tokenizers.palette import PaletteTokenizer

TOLERANCE = 1e-4  # of each activation's largest magnitude (float32 through ~50 layers)
# Outputs compared with pytorch-fid: the trunk blocks and the pool, in forward order.
LAYERS = (*inception.BLOCK_NAMES, "pool3")


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's calculate_frechet_distance: tr(sqrtm(S1 S2)) with SciPy."""
    linalg = pytest.importorskip("scipy.linalg", reason="the reference distance needs SciPy")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def _gaussian_set(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """n correlated samples [n, dim] around a random mean."""
    return rng.normal(size=dim) + rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) / 4


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=0), np.cov(x, rowvar=False)


# --- Fréchet distance and statistics ---------------------------------------------------------

@pytest.mark.parametrize("n", [200, 20], ids=["full_rank", "rank_deficient"])
def test_frechet_distance_matches_scipy_sqrtm(n):
    rng = np.random.default_rng(n)
    a, b = _mean_cov(_gaussian_set(rng, n, 32)), _mean_cov(_gaussian_set(rng, n, 32))
    assert np.linalg.matrix_rank(a[1]) == min(n - 1, 32)
    np.testing.assert_allclose(frechet_distance(*a, *b), _scipy_frechet(*a, *b), rtol=1e-6)


def test_frechet_distance_to_itself_and_to_shifted_or_scaled_copies():
    x = _gaussian_set(np.random.default_rng(0), 100, 16)
    assert frechet_distance(*_mean_cov(x), *_mean_cov(x)) < 1e-9
    shifts = np.array([0.1, 0.5, 1.0, 2.0])
    shifted = [frechet_distance(*_mean_cov(x), *_mean_cov(x + s)) for s in shifts]
    scaled = [frechet_distance(*_mean_cov(x), *_mean_cov(x * s)) for s in (1.1, 1.5, 2.0, 4.0)]
    assert np.all(np.diff(shifted) > 0) and np.all(np.diff(scaled) > 0)
    np.testing.assert_allclose(shifted, 16 * shifts**2, rtol=1e-6)  # |shift|^2 over 16 dims


def test_feature_stats_stream_merge_and_npz(tmp_path):
    x = np.random.default_rng(1).normal(3.0, 2.0, (37, 6)).astype(np.float32)
    stream, first, second = FeatureStats("f"), FeatureStats("f"), FeatureStats("f")
    for start, stop in ((0, 1), (1, 11), (11, 11), (11, 37)):  # uneven, one empty
        stream.update(x[start:stop])
    first.update(x[:15])
    second.update(x[15:])
    first.merge(second)
    mean, cov = _mean_cov(x.astype(np.float64))
    for stats in (stream, first):
        assert stats.count == 37 and stats.dim == 6
        np.testing.assert_allclose(stats.mean_cov()[0], mean, rtol=1e-12)
        np.testing.assert_allclose(stats.mean_cov()[1], cov, rtol=1e-10, atol=1e-12)
    path = str(tmp_path / "stats.npz")
    stream.save(path)
    loaded = FeatureStats.load(path)
    assert (loaded.features, loaded.count, loaded.dim) == ("f", 37, 6)
    np.testing.assert_array_equal(loaded.sum, stream.sum)
    np.testing.assert_array_equal(loaded.sum_outer, stream.sum_outer)
    assert fid(loaded, first) < 1e-9

    single = FeatureStats("f")
    single.update(x[:1])
    with pytest.raises(UserError, match="at least 2 images, got 1"):
        fid(single, stream)
    with pytest.raises(UserError, match="cannot compare 'f' features .* with 'g' features"):
        fid(stream, FeatureStats("g"))
    with pytest.raises(ValueError, match="features of size 5 added to statistics of size 6"):
        stream.update(x[:, :5])
    with pytest.raises(UserError, match="does not exist"):
        FeatureStats.load(str(tmp_path / "absent.npz"))
    np.savez(path, count=np.int64(3))
    with pytest.raises(UserError, match="not an .npz of feature statistics"):
        FeatureStats.load(path)


class _Projection:
    """A toy extractor: a fixed random projection of the flattened pixels."""

    name = "projection"

    def __init__(self, pixels: int):
        self.weights = np.random.default_rng(0).normal(size=(pixels, 8)).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) @ self.weights


def test_fid_result_from_batches_and_precomputed_stats():
    images = np.random.default_rng(2).integers(0, 256, (30, 4, 4, 3), np.uint8)
    extractor = _Projection(4 * 4 * 3)
    reference = image_stats(extractor, [images[:10], images[10:]])
    result = fid_result(extractor, images[:12], reference)
    assert result["features"] == "projection"
    assert (result["n_generated"], result["n_reference"]) == (12, 30)
    assert result["fid"] > 0
    assert fid_result(extractor, [images], reference)["fid"] < 1e-6 * result["fid"]
    with pytest.raises(UserError, match="reference statistics are of 'other' features"):
        fid_result(extractor, images, FeatureStats("other"))


def test_dual_encoder_features_are_the_encoder_image_embeddings():
    cfg = de.DualEncoderConfig(
        text_vocab_size=32, text_max_len=8, text_width=32, text_layers=1, text_heads=2,
        text_mlp_dim=64, vision_input="codes", code_grid=4, code_patch=2, codebook_size=16,
        vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64, projection_dim=16)
    encoder = RetrievalEncoder(de.create_dual_encoder(cfg, seed=0), "test", batch_size=8)
    palette = np.random.default_rng(2).integers(0, 256, (16, 3), np.uint8)
    tokenizer = PaletteTokenizer(palette, resolution=8, downsample=2)  # 8x8 pixels -> 4x4 codes
    codes = np.random.default_rng(3).integers(0, 16, (11, 4, 4), np.int32)
    pixels = tokenizer.decode(codes)
    with pytest.raises(ValueError, match="needs the image tokenizer"):
        DualEncoderFeatures(encoder)
    features = DualEncoderFeatures(encoder, tokenizer)
    assert features.name == "dual_encoder_image"
    np.testing.assert_array_equal(features(pixels), encoder.embed_images(codes))
    result = fid_result(features, pixels, pixels)
    assert result["features"] == "dual_encoder_image" and result["fid"] < 1e-6


# --- InceptionV3 --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_inception() -> inception.InceptionV3:
    return inception.create_inception(seed=0)


def test_npz_round_trip_and_import_errors(tmp_path, random_inception):
    path = str(tmp_path / "inception.npz")
    inception.save_npz(random_inception, path)
    loaded = inception.load_inception_weights(path)
    original, restored = weight_files.variables_by_name(random_inception), weight_files.variables_by_name(loaded)
    assert list(original) == list(restored) and len(original) == 470
    for name in original:
        np.testing.assert_array_equal(np.asarray(original[name][...]),
                                      np.asarray(restored[name][...]), err_msg=name)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    key = "Mixed_6e.branch7x7dbl_4.conv.kernel"
    np.savez(path, **{**arrays, key: arrays[key][:, :, :, :5]})
    with pytest.raises(UserError, match=re.escape(f"{path}: {key} has shape (7, 1, 192, 5)")):
        inception.load_inception_weights(path)
    del arrays["Mixed_7c.branch_pool.bn.running_var"]
    np.savez(path, **arrays)
    missing = r"missing InceptionV3 weights Mixed_7c\.branch_pool\.bn\.running_var"
    with pytest.raises(UserError, match=missing):
        inception.load_inception_weights(path)
    with pytest.raises(UserError, match="does not exist"):
        inception.load_inception_weights(str(tmp_path / "absent.npz"))


def test_sharded_features_equal_unsharded_on_an_odd_batch(random_inception):
    assert jax.local_device_count() == 8  # tests/conftest.py
    images = np.random.default_rng(4).integers(0, 256, (5, 40, 40, 3), np.uint8)
    features = InceptionFeatures(random_inception, batch_size=8)
    assert features.name == "inception_v3_pool3" and features.batch_size == 8
    sharded = features(images)
    graphdef, state = nnx.split(random_inception)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    unsharded = np.asarray(forward(state, jnp.asarray(images, jnp.float32) / 255.0))
    assert sharded.shape == (5, inception.FEATURE_DIM) and sharded.dtype == np.float32
    np.testing.assert_allclose(sharded, unsharded, rtol=1e-5, atol=1e-5 * np.abs(unsharded).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch, pytorch-fid InceptionV3 with random weights, path of those weights as a
    pt_inception-2015-12-05 state dict)."""
    torch = pytest.importorskip("torch", reason="the Inception reference needs torch")
    torchvision = pytest.importorskip("torchvision", reason="pytorch-fid needs torchvision")
    fid_inception = pytest.importorskip(
        "pytorch_fid.inception", reason="needs pytorch-fid (requirements-ref.txt)")
    torch.manual_seed(0)
    # What fid_inception_v3 builds before loading the FID weights, with random weights.
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=True)
    # Non-trivial BatchNorm: running statistics of one batch like the test's, a random affine.
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one batch's statistics
    net.train()
    with torch.no_grad():
        calibration = torch.randint(0, 256, (2, 3, 61, 83)) / 255.0
        net(torch.nn.functional.interpolate(calibration, size=(299, 299), mode="bilinear",
                                            align_corners=False) * 2 - 1)
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
    state = net.state_dict()
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception.pth")
    torch.save(state, path)
    with pytest.MonkeyPatch.context() as patch:  # the FID weights "download" returns `state`
        patch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
        ref = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True,
                                        use_fid_inception=True).eval()
    return torch, ref, path


def test_resize_matches_torch_interpolate(reference):
    torch = reference[0]
    for shape in ((2, 61, 83, 3), (1, 400, 512, 3)):  # up and down
        x = np.random.default_rng(5).uniform(size=shape).astype(np.float32)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
            align_corners=False).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(inception.resize_bilinear(jnp.asarray(x))),
                                   expected, atol=1e-6)


def test_inception_matches_pytorch_fid_layer_by_layer(reference):
    torch, ref, path = reference
    module = inception.load_inception_weights(path)
    images = np.random.default_rng(6).integers(0, 256, (2, 61, 83, 3), np.uint8)
    x = images.astype(np.float32) / 255.0  # pytorch-fid's ToTensor
    hooked = [m for block in ref.blocks for m in block if not isinstance(m, torch.nn.MaxPool2d)]
    assert len(hooked) == len(LAYERS)
    expected = {}
    hooks = [layer.register_forward_hook(
        lambda _, __, out, name=name: expected.__setitem__(name, out.detach().numpy()))
        for name, layer in zip(LAYERS, hooked)]
    with torch.no_grad():
        (pool,) = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    for hook in hooks:
        hook.remove()
    np.testing.assert_array_equal(pool.numpy(), expected["pool3"])
    graphdef, state = nnx.split(module)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s).activations(x))(state, x)
    for name in LAYERS:
        want = expected[name]
        want = want[:, :, 0, 0] if name == "pool3" else want.transpose(0, 2, 3, 1)
        have = np.asarray(got[name])
        assert have.shape == want.shape, name
        scale = np.abs(want).max()
        error = np.abs(have - want).max()
        print(f"{name}: max |diff| {error:.3g}, relative to max |activation| {error / scale:.3g}")
        assert error <= TOLERANCE * scale, name


def test_pth_import_errors_name_the_key(reference, tmp_path):
    torch, _, path = reference
    state = torch.load(path, weights_only=True)
    bad = str(tmp_path / "bad.pth")
    key = "Mixed_5b.branch5x5_2.conv.weight"
    torch.save({**state, key: torch.zeros(64, 48, 3, 3)}, bad)
    shape = f"{bad}: {key} has shape (64, 48, 3, 3), the FID InceptionV3 needs (64, 48, 5, 5)"
    with pytest.raises(UserError, match=re.escape(shape)):
        inception.load_inception_weights(bad)
    del state["Mixed_6c.branch7x7_3.bn.running_mean"]
    torch.save(state, bad)
    with pytest.raises(UserError, match=r"missing keys Mixed_6c\.branch7x7_3\.bn\.running_mean \("):
        inception.load_inception_weights(bad)
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match=r"unexpected keys .*: AuxLogits\.fc\.weight"):
        inception.load_inception_weights(bad)
