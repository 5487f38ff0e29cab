"""VQGANTokenizer: partial restore from a train checkpoint, exact encode / decode, errors."""

from __future__ import annotations

import dataclasses
import json

import grain
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from cm3jax.data.images import to_rgb_square
from cm3jax.errors import UserError
from cm3jax.models.discriminator import create_discriminator
from cm3jax.models.quantizer import CodebookStats
from cm3jax.models.vqgan import VQGANConfig, create_vqgan
from cm3jax.tokenizers.image import VQGANTokenizer, load_image_tokenizer
from cm3jax.tokenizers.palette import PaletteTokenizer
from cm3jax.train.checkpoint import Checkpointer

TINY = VQGANConfig(resolution=16, base_channels=16, channel_multipliers=(1, 2),
                   num_res_blocks=1, embed_dim=8, codebook_size=32, disc_channels=8,
                   disc_layers=2)


def write_workdir(workdir, cfg: VQGANConfig, steps=(5,), seed: int = 0):
    """A fake `task='vqgan'` workdir: config.json + Checkpointer saves in the trainer's layout.

    Returns the model saved at the last step.
    """
    ckpt_cfg = ml_collections.ConfigDict({"keep": 3, "async_save": False})
    checkpointer = Checkpointer(str(workdir), ckpt_cfg)
    for i, step in enumerate(steps):
        model = create_vqgan(cfg, seed + i)
        # Non-trivial stats, so a restore that drops them would show.
        model.quantizer.usage[...] = jax.numpy.arange(cfg.codebook_size, dtype=np.float32) + i
        disc = create_discriminator(cfg, 100 + i)
        params = {"generator": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                  "discriminator": nnx.to_pure_dict(nnx.state(disc, nnx.Param))}
        adam = optax.adam(1e-3)
        state = {"step": np.int32(step), "rng": np.array([0, step], np.uint32), "params": params,
                 "stats": nnx.to_pure_dict(nnx.state(model, CodebookStats)),
                 "opt_state": {k: adam.init(v) for k, v in params.items()}}
        iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
        checkpointer.save(step, state, iterator, {"task": "vqgan"})
    checkpointer.close()
    config = {"task": "vqgan", "vqgan": {**dataclasses.asdict(cfg), "unknown_key": 1}}
    (workdir / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vqgan_workdir")
    model = write_workdir(workdir, TINY, steps=(3, 5))
    return workdir, model, VQGANTokenizer.load(str(workdir), batch_size=4)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_encode_decode_match_the_module_exactly(saved):
    _, model, tokenizer = saved
    assert (tokenizer.kind, tokenizer.step, tokenizer.resolution) == ("vqgan", 5, 16)
    assert (tokenizer.grid, tokenizer.codes_per_image, tokenizer.codebook_size) == (8, 64, 32)
    images = _images(6)  # a full chunk of 4 and a remainder of 2
    codes = tokenizer.encode(images)
    assert codes.dtype == np.int32 and codes.shape == (6, 8, 8)
    x = images.astype(np.float32) / 127.5 - 1.0
    _, expected, _ = model.encode(jax.numpy.asarray(x))
    np.testing.assert_array_equal(codes, np.asarray(expected))
    decoded = tokenizer.decode(codes)
    assert decoded.dtype == np.uint8 and decoded.shape == (6, 16, 16, 3)
    reference = np.asarray(model.decode_codes(jax.numpy.asarray(codes)))
    reference = np.round(np.clip((reference + 1.0) * 127.5, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(decoded, reference)
    # Restored stats (usage) are the saved ones, not a fresh model's zeros.
    np.testing.assert_array_equal(np.asarray(tokenizer._state["quantizer"]["usage"][...]),
                                  np.arange(32, dtype=np.float32) + 1)
    # One image in, one out; chunking does not change results.
    np.testing.assert_array_equal(tokenizer.encode(images[2]), codes[2])
    np.testing.assert_array_equal(tokenizer.decode(codes[5]), decoded[5])


def test_older_step_and_json_round_trip(saved, tmp_path):
    workdir, model, tokenizer = saved
    older = VQGANTokenizer.load(str(workdir), step=3)
    images = _images(2, seed=1)
    assert not np.array_equal(older.decode(tokenizer.encode(images)),
                              tokenizer.decode(tokenizer.encode(images)))
    again = VQGANTokenizer.from_json(tokenizer.to_json())
    assert again.step == 5 and again.batch_size == 4
    np.testing.assert_array_equal(again.encode(images), tokenizer.encode(images))
    (tmp_path / "image_tokenizer.json").write_text(tokenizer.to_json())
    assert isinstance(load_image_tokenizer(str(tmp_path)), VQGANTokenizer)
    assert isinstance(load_image_tokenizer(tmp_path / "image_tokenizer.json"), VQGANTokenizer)
    palette = PaletteTokenizer([[0, 0, 0], [255, 255, 255]], 16)
    assert isinstance(load_image_tokenizer(palette.to_json()), PaletteTokenizer)
    with pytest.raises(UserError, match="unknown image tokenizer kind"):
        load_image_tokenizer('{"kind": "dalle"}')


def test_real_photo_round_trip(saved):
    _, _, tokenizer = saved
    yy, xx = np.mgrid[0:200, 0:300]
    photo = np.stack([xx * 255 // 299, yy * 255 // 199, (xx + yy) % 256], -1).astype(np.uint8)
    square = to_rgb_square(Image.fromarray(photo), tokenizer.resolution)
    codes = tokenizer.encode(square)
    assert codes.shape == (8, 8) and codes.min() >= 0 and codes.max() < 32
    image = tokenizer.decode(codes)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


@pytest.mark.parametrize("shape, dtype", [((2, 16, 16, 4), np.uint8), ((2, 32, 32, 3), np.uint8),
                                          ((16, 16), np.uint8), ((2, 16, 16, 3), np.float32)])
def test_bad_images_raise_user_error(saved, shape, dtype):
    with pytest.raises(UserError, match=r"16, 16, 3"):
        saved[2].encode(np.zeros(shape, dtype))


def test_bad_codes_raise_user_error(saved):
    with pytest.raises(UserError, match=r"\[batch, 8, 8\]"):
        saved[2].decode(np.zeros((2, 4, 4), np.int32))


def test_missing_workdir_or_checkpoint_raises_user_error(saved, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        VQGANTokenizer.load(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="config.json"):
        VQGANTokenizer.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"vqgan": dataclasses.asdict(TINY)}))
    with pytest.raises(UserError, match="no complete checkpoint"):
        VQGANTokenizer.load(str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint at step 4"):
        VQGANTokenizer.load(str(saved[0]), step=4)


def test_checkpoint_of_another_shape_raises_user_error(saved, tmp_path):
    workdir = saved[0]
    other = dataclasses.replace(TINY, codebook_size=16)
    (tmp_path / "checkpoints").symlink_to(workdir / "checkpoints")
    (tmp_path / "config.json").write_text(json.dumps({"vqgan": dataclasses.asdict(other)}))
    with pytest.raises(UserError, match=r"params\.generator\.quantizer\.codebook has shape "
                       r"\(32, 8\), config\.vqgan needs \(16, 8\)"):
        VQGANTokenizer.load(str(tmp_path))
