"""Chameleon's VQ-VAE (Hugging Face transformers) <-> the cm3jax VQGAN: identical codes both ways.

A tiny `ChameleonVQVAE` with randomised weights (norm scales and every bias too) encodes
random images with transformers and with the converted cm3jax VQGAN; the codes must be
identical. The decoder, which Hugging Face lacks, is checked against taming's Decoder
(Meta's chameleon/inference/vqgan.py) written here from transformers' blocks.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3jax.errors import UserError
from cm3jax.interop import chameleon_vqvae as cv
from cm3jax.models.quantizer import CodebookStats
from cm3jax.models.vqgan import VQGAN, AttnBlock, VQGANConfig
from cm3jax.tokenizers.image import VQGANTokenizer, images_to_float

torch = pytest.importorskip("torch", reason="the Chameleon VQ-VAE tests need torch")
pytest.importorskip("transformers", reason="the Chameleon VQ-VAE tests need transformers")
from transformers import ChameleonVQVAEConfig  # noqa: E402
from transformers.models.chameleon import modeling_chameleon as hf_chameleon  # noqa: E402

TINY = dict(resolution=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
            embed_dim=32, latent_channels=32, num_embeddings=64, attn_resolutions=None)
LOWEST_ATTENTION = {**TINY, "attn_resolutions": [16]}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: torch-default convs, norm scales about 1, biases about 0.1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim == 4:
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / p[0].numel() ** 0.5)
            elif p.ndim == 1:
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def _hf_vqvae(vq_config: dict, seed: int = 0) -> hf_chameleon.ChameleonVQVAE:
    """A ChameleonVQVAE with random weights and a codebook drawn from its own latents."""
    torch.manual_seed(seed)
    model = hf_chameleon.ChameleonVQVAE(ChameleonVQVAEConfig(**vq_config)).eval()
    _randomise(model, seed)
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(_images(8, seed + 100)))
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        rows = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))
        model.quantize.embedding.weight.copy_(flat[rows[:model.quantize.num_embeddings]])
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    """Random NCHW images in [-1, 1]."""
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _vqgan(cfg: VQGANConfig, params: dict, stats: dict) -> VQGAN:
    """A cm3jax VQGAN holding a generator parameter tree and its stats."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: VQGAN(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, param_state, stat_state = nnx.split(abstract, nnx.Param, CodebookStats)
    nnx.replace_by_pure_dict(param_state, params)
    nnx.replace_by_pure_dict(stat_state, stats)
    return nnx.merge(graphdef, param_state, stat_state)


def _hf_encode(model, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(codes [B, g, g], quantised latents NHWC) of transformers' VQ-VAE."""
    with torch.no_grad():
        out = model.encode(images)
    quantized = out.quantized_last_hidden_state.numpy().transpose(0, 2, 3, 1)
    return out.image_tokens.numpy().reshape(quantized.shape[:3]), quantized


def _nhwc(images: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=[TINY, LOWEST_ATTENTION], ids=["mid_only", "lowest_level"])
def converted(request):
    """(vq_config, HF model, vqgan section, cfg, imported generator) for both attention layouts."""
    hf = _hf_vqvae(request.param)
    section = cv.vqgan_config_from_hf(request.param)
    cfg = VQGANConfig.from_config(section)
    return request.param, hf, section, cfg, cv.vqgan_params_from_hf(_state(hf), cfg, prefix="")


def test_config_maps_the_architecture(converted):
    vq_config, _, section, cfg, imported = converted
    shape = (cfg.resolution, cfg.base_channels, cfg.channel_multipliers, cfg.num_res_blocks)
    assert shape == (32, 32, (1, 2), 1)
    assert (cfg.embed_dim, cfg.codebook_size, cfg.attention) == (32, 64, True)
    assert cfg.level_attention == bool(vq_config["attn_resolutions"])
    model = _vqgan(cfg, imported.params, imported.stats)
    attention = [isinstance(m, AttnBlock) for m in model.encoder.down]
    assert any(attention) == cfg.level_attention
    assert sum(isinstance(m, AttnBlock) for m in model.decoder.up) == 2 * any(attention)
    assert not imported.decoder_imported
    back = cv.vqgan_config_to_hf(cfg)
    assert {k: back[k] for k in vq_config} == vq_config
    assert cv.vqgan_config_from_hf(back).to_dict() == section.to_dict()


def test_encode_gives_identical_codes(converted):
    _, hf, _, cfg, imported = converted
    images = _images(4, seed=1)
    codes, quantized = _hf_encode(hf, images)
    model = _vqgan(cfg, imported.params, imported.stats)
    ours_quantized, ours_codes, _ = model.encode(_nhwc(images))
    assert len(np.unique(codes)) > 16  # the weights are not trivial
    np.testing.assert_array_equal(np.asarray(ours_codes), codes)
    np.testing.assert_allclose(np.asarray(ours_quantized), quantized, atol=1e-4)


def test_export_loads_into_transformers_with_identical_codes(converted):
    vq_config, hf, _, cfg, imported = converted
    arrays = cv.vqgan_params_to_hf(imported.params, cfg, prefix="")
    fresh = hf_chameleon.ChameleonVQVAE(ChameleonVQVAEConfig(**cv.vqgan_config_to_hf(cfg))).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    images = _images(4, seed=2)
    np.testing.assert_array_equal(_hf_encode(fresh, images)[0], _hf_encode(hf, images)[0])
    prefixed = cv.vqgan_params_to_hf(imported.params, cfg)
    assert set(prefixed) == {cv.HF_PREFIX + k for k in arrays}


@pytest.mark.parametrize("converted", [LOWEST_ATTENTION], indirect=True, ids=["lowest_level"])
def test_saved_workdir_loads_as_tokenizer(converted, tmp_path):
    _, hf, section, cfg, imported = converted
    cv.save_vqgan_workdir(str(tmp_path / "vq"), section, imported.params, imported.stats)
    tokenizer = VQGANTokenizer.load(str(tmp_path / "vq"), batch_size=4)
    pixels = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images = images_to_float(pixels)
    model_codes = _vqgan(cfg, imported.params, imported.stats).encode(images)[1]
    hf_codes = _hf_encode(hf, torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()))[0]
    np.testing.assert_array_equal(tokenizer.encode(pixels), np.asarray(model_codes))
    np.testing.assert_array_equal(tokenizer.encode(pixels), hf_codes)
    with pytest.raises(UserError, match="already holds a run"):
        cv.save_vqgan_workdir(str(tmp_path / "vq"), section, imported.params, imported.stats)


@pytest.mark.parametrize("field, value", [
    ("double_latent", True), ("attn_type", "linear"), ("latent_channels", 16),
    ("attn_resolutions", [32]), ("attn_resolutions", [32, 16]), ("base_channels", 48),
])
def test_unsupported_hf_config_names_the_field(field, value):
    with pytest.raises(UserError, match=field):
        cv.vqgan_config_from_hf({**TINY, field: value})


@pytest.mark.parametrize("field, value", [
    ("encoder", "patch"), ("l2_normalize", True), ("code_dim", 8), ("ema", True),
    ("attention", False), ("norm_groups", 16), ("base_channels", 48),
])
def test_incompatible_cfg_names_the_field(field, value):
    cfg = VQGANConfig.from_config(cv.vqgan_config_from_hf(TINY))
    bad = dataclasses.replace(cfg, **{field: value})
    with pytest.raises(UserError, match=f"vqgan.{field}"):
        cv.vqgan_config_to_hf(bad)
    with pytest.raises(UserError, match=f"vqgan.{field}"):
        cv.vqgan_params_from_hf({}, bad)


@pytest.mark.parametrize("converted", [LOWEST_ATTENTION], indirect=True, ids=["lowest_level"])
def test_missing_or_misshapen_array_is_named(converted):
    _, hf, _, cfg, imported = converted
    state = _state(hf)
    del state["encoder.mid.block_1.conv1.weight"]
    with pytest.raises(UserError, match="encoder.mid.block_1.conv1.weight"):
        cv.vqgan_params_from_hf(state, cfg, prefix="")
    state = {**_state(hf), "quantize.embedding.weight": np.zeros((63, 32), np.float32)}
    with pytest.raises(UserError, match="quantize.embedding.weight has shape"):
        cv.vqgan_params_from_hf(state, cfg, prefix="")
    with pytest.raises(UserError, match="model.vqmodel.encoder.conv_in.weight"):
        cv.vqgan_params_from_hf(_state(hf), cfg)  # the default prefix is not in a bare state dict
    with pytest.raises(UserError, match="quantizer.codebook has shape"):
        cv.vqgan_params_to_hf({**imported.params, "quantizer": {"codebook": np.zeros((2, 2))}}, cfg)


class TamingDecoder(torch.nn.Module):
    """taming-transformers' Decoder (Meta's chameleon/inference/vqgan.py), temb-free, from
    transformers' Chameleon resnet / attention blocks (the same modules as taming's)."""

    def __init__(self, c: ChameleonVQVAEConfig):
        super().__init__()
        resnet = hf_chameleon.ChameleonVQVAEEncoderResnetBlock
        attn = hf_chameleon.ChameleonVQVAEEncoderAttnBlock
        levels, block_in = len(c.channel_multiplier), c.base_channels * c.channel_multiplier[-1]
        curr_res = c.resolution // 2 ** (levels - 1)
        self.conv_in = torch.nn.Conv2d(c.latent_channels, block_in, 3, padding=1)
        self.mid = torch.nn.Module()
        self.mid.block_1, self.mid.attn_1 = resnet(c, block_in, block_in), attn(block_in)
        self.mid.block_2 = resnet(c, block_in, block_in)
        self.up = torch.nn.ModuleList()
        for level in reversed(range(levels)):
            up = torch.nn.Module()
            up.block, up.attn = torch.nn.ModuleList(), torch.nn.ModuleList()
            block_out = c.base_channels * c.channel_multiplier[level]
            for _ in range(c.num_res_blocks + 1):
                up.block.append(resnet(c, block_in, block_out))
                block_in = block_out
                if curr_res in (c.attn_resolutions or []):
                    up.attn.append(attn(block_in))
            if level != 0:
                up.upsample = torch.nn.Module()
                up.upsample.conv = torch.nn.Conv2d(block_in, block_in, 3, padding=1)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = torch.nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = torch.nn.Conv2d(block_in, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                h = up.attn[i](h) if len(up.attn) else h
            if level != 0:
                h = torch.nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
                h = up.upsample.conv(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


@pytest.mark.parametrize("converted", [LOWEST_ATTENTION], indirect=True, ids=["lowest_level"])
def test_decoder_round_trips_through_taming_layout(converted):
    vq_config, _, _, cfg, imported = converted
    model = _vqgan(cfg, imported.params, imported.stats)  # the decoder is random, not imported
    params = imported.params
    decoder = cv.vqgan_decoder_to_taming(params, cfg)
    assert all(name.startswith("decoder.") for name in decoder)
    back = cv.vqgan_params_from_hf(cv.vqgan_params_to_hf(params, cfg), cfg, decoder_arrays=decoder)
    assert back.decoder_imported
    codes = np.random.default_rng(6).integers(0, cfg.codebook_size, (2, cfg.grid, cfg.grid))
    expected = np.asarray(model.decode_codes(jnp.asarray(codes)))
    decoded = _vqgan(cfg, back.params, back.stats).decode_codes(codes)
    np.testing.assert_array_equal(np.asarray(decoded), expected)

    taming = TamingDecoder(ChameleonVQVAEConfig(**vq_config)).eval()
    taming.load_state_dict({k[len("decoder."):]: torch.from_numpy(v) for k, v in decoder.items()},
                           strict=True)
    latents = model.post_quant_conv(model.quantizer.embed_codes(jnp.asarray(codes)))
    with torch.no_grad():
        images = taming(torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(images.numpy().transpose(0, 2, 3, 1), expected, atol=1e-4)
