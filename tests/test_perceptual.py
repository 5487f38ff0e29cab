"""LPIPS-VGG16 (cm3jax/models/perceptual.py) against the PyTorch `lpips` package.

The reference tests need torch, torchvision and lpips (requirements-ref.txt) and skip with
the reason printed without them. Nothing downloads weights: the lpips trunk is randomly
initialised (`pnet_rand=True`) and its lin layers are random (`pretrained=False`) or the ones
shipped inside the lpips wheel (`pretrained=True`). The npz and gradient tests need no torch.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3jax.errors import UserError
from cm3jax.models import perceptual
from cm3jax.models.perceptual import (
    TAP_NAMES,
    create_lpips,
    load_lpips_weights,
    load_npz,
    save_npz,
)

TOLERANCE = 1e-4
# lpips calls torchvision's vgg16(pretrained=...), deprecated there.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision")


def _import_reference():
    """(torch, lpips), or a skip naming what is missing (torchvision may fail with any error)."""
    try:
        import torch
        import lpips
    except Exception as e:  # noqa: BLE001 - torchvision built for another torch: RuntimeError
        pytest.skip(f"needs torch + torchvision + lpips (requirements-ref.txt): "
                    f"{type(e).__name__}: {e}")
    return torch, lpips


def _reference_model(lpips, torch, pretrained: bool):
    torch.manual_seed(0)
    return lpips.LPIPS(net="vgg", pretrained=pretrained, pnet_rand=True, verbose=False).eval()


def _images(seed: int, batch: int = 2, size: int = 64) -> np.ndarray:
    """Random NHWC float32 images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def _nchw(torch, images: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _assert_matches_reference(torch, ref, module) -> None:
    """Same images -> same distances and the same five VGG taps, within TOLERANCE."""
    a, b = _images(1), _images(2)
    with torch.no_grad():
        expected = ref(_nchw(torch, a), _nchw(torch, b), normalize=False).numpy().reshape(-1)
        expected_taps = ref.net(ref.scaling_layer(_nchw(torch, a)))
    got = module(jnp.asarray(a), jnp.asarray(b))
    assert got.shape == (2,) and got.dtype == jnp.float32
    # Relative as well: random lin weights give distances of ~1e-2.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=TOLERANCE, atol=1e-6)
    for name, tap, ref_tap in zip(TAP_NAMES, module.features(jnp.asarray(a)), expected_taps):
        ref_tap = ref_tap.numpy().transpose(0, 2, 3, 1)
        assert tap.shape == ref_tap.shape, name
        np.testing.assert_allclose(np.asarray(tap), ref_tap, rtol=TOLERANCE, atol=TOLERANCE,
                                   err_msg=name)


def test_lpips_state_dict_matches_reference(tmp_path):
    torch, lpips = _import_reference()
    ref = _reference_model(lpips, torch, pretrained=False)  # random trunk and random lin layers
    path = str(tmp_path / "lpips_vgg.pth")
    torch.save(ref.state_dict(), path)
    _assert_matches_reference(torch, ref, load_lpips_weights(path))


def test_torchvision_vgg16_plus_lpips_lin_weights_match_reference(tmp_path):
    torch, lpips = _import_reference()
    ref = _reference_model(lpips, torch, pretrained=True)  # lin layers from the wheel's vgg.pth
    trunk = {f"features.{key.split('.', 2)[2]}": value
             for key, value in ref.state_dict().items() if key.startswith("net.")}
    trunk["classifier.0.weight"] = torch.zeros(4, 8)  # torchvision's head is ignored
    path = str(tmp_path / "vgg16.pth")
    torch.save(trunk, path)
    lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    _assert_matches_reference(torch, ref, load_lpips_weights(path, lin_path=lin_path))
    with pytest.raises(UserError, match=r"missing keys lin0\.model\.1\.weight, .*lin4\.model"):
        load_lpips_weights(path)


def test_truncated_state_dict_names_missing_keys(tmp_path):
    torch, lpips = _import_reference()
    state = _reference_model(lpips, torch, pretrained=False).state_dict()
    for key in ("net.slice5.28.bias", "lin3.model.1.weight", "lins.3.model.1.weight"):
        del state[key]
    path = str(tmp_path / "truncated.pth")
    torch.save(state, path)
    missing = r"missing keys net\.slice5\.28\.bias, lin3\.model\.1\.weight \("
    with pytest.raises(UserError, match=missing):
        load_lpips_weights(path)
    state["net.slice9.0.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(UserError, match=r"unexpected keys .*net\.slice9\.0\.weight"):
        load_lpips_weights(path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_npz(str(tmp_path / "absent.npz"))
    pytest.importorskip("torch", reason="reading .pth weights needs torch")
    with pytest.raises(UserError, match="does not exist"):
        load_lpips_weights(str(tmp_path / "absent.pth"))


def test_pth_without_torch_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(UserError, match="needs torch, which is not installed"):
        load_lpips_weights(str(tmp_path / "lpips_vgg.pth"))


def test_npz_round_trip(tmp_path):
    module = create_lpips(seed=3)
    path = str(tmp_path / "lpips.npz")
    save_npz(module, path)
    loaded = load_npz(path)
    original, restored = perceptual._variables(module), perceptual._variables(loaded)
    assert list(original) == list(restored)
    for name in original:
        np.testing.assert_array_equal(np.asarray(original[name][...]),
                                      np.asarray(restored[name][...]), err_msg=name)
        names = restored[name].get_metadata()["out_sharding"]
        assert names == (perceptual.CONV_KERNEL_NAMES if name.endswith("kernel") else ("conv_out",))
    a, b = jnp.asarray(_images(1, size=32)), jnp.asarray(_images(2, size=32))
    np.testing.assert_array_equal(np.asarray(module(a, b)), np.asarray(loaded(a, b)))
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "lin4.kernel"}
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=r"missing LPIPS weights lin4\.kernel"):
        load_npz(path)


def test_distance_properties_and_finite_gradients():
    module = create_lpips(seed=0)
    a, b = jnp.asarray(_images(1, size=32)), jnp.asarray(_images(2, size=32))
    distance = module(a, b)
    assert distance.shape == (2,) and bool(jnp.all(distance > 0))
    np.testing.assert_allclose(np.asarray(module(a, a)), 0.0, atol=1e-7)
    # Kill relu5_3 entirely: its unit normalisation must still give finite gradients.
    for conv in module.stages[-1]:
        conv.bias.set_value(jnp.full_like(conv.bias[...], -1e4))
    assert not bool(jnp.any(module.features(a)[-1]))
    graphdef, state = nnx.split(module)
    loss = lambda x, s: jnp.sum(nnx.merge(graphdef, s)(x, b))  # noqa: E731
    grad = jax.jit(jax.grad(loss))(a, state)
    assert grad.shape == a.shape
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0))


def test_load_dispatches_npz_without_torch(tmp_path):
    net = perceptual.create_lpips(0)
    path = str(tmp_path / "lpips.npz")
    perceptual.save_npz(net, path)
    loaded = perceptual.load(path)
    images = np.linspace(-1, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
    np.testing.assert_allclose(loaded(images, images[::-1]), net(images, images[::-1]), atol=1e-6)
