"""The CLIP-style dual encoder (cm3jax/models/dual_encoder.py) against transformers.CLIPModel.

The reference tests need torch and transformers (requirements-ref.txt) and skip with the
reason printed without them; their CLIP is tiny and randomly initialised (nothing is
downloaded), with every parameter perturbed so that biases and LayerNorm gains are not the
trivial 0 / 1. Loss, 'codes' input, gradients, config and sharding tests need no torch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cm3jax.errors import ConfigError, UserError
from cm3jax.models import clip_weights
from cm3jax.models import dual_encoder as de
from cm3jax.models.logical import activate, to_partition_spec
from cm3jax.train.partitioning import LOGICAL_RULES, make_mesh

TOLERANCE = 1e-4
TINY = de.DualEncoderConfig(
    text_vocab_size=100, text_max_len=16, text_width=64, text_layers=2, text_heads=4,
    text_mlp_dim=128, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
    vision_heads=4, vision_mlp_dim=128, projection_dim=32, code_grid=4, codebook_size=48)
# The logical-axis rules table of the trainer.
RULES = dict(LOGICAL_RULES)
LENGTHS = (12, 7, 4)  # real tokens per text row; the rest is padding (id 0, mask 0)


def _hf_config(transformers, **text_changes):
    """A tiny transformers.CLIPConfig of TINY's shape (text fields overridable)."""
    tower = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    text = dict(tower, vocab_size=100, max_position_embeddings=16, eos_token_id=2) | text_changes
    vision = dict(tower, image_size=32, patch_size=8)
    for key in ("hidden_act", "layer_norm_eps"):
        if key in text_changes:
            vision[key] = text_changes[key]
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def _random_clip(torch, transformers, seed: int, **text_changes):
    """A CLIPModel with seeded random weights, every parameter (but logit_scale) perturbed."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(_hf_config(transformers, **text_changes)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "logit_scale":
                param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def reference():
    """(torch, transformers, reference CLIPModel, the same weights imported into cm3jax)."""
    torch = pytest.importorskip(
        "torch", reason="the CLIP reference needs torch (requirements-ref.txt)")
    transformers = pytest.importorskip(
        "transformers", reason="the CLIP reference needs transformers (requirements-ref.txt)")
    ref = _random_clip(torch, transformers, seed=0)
    return torch, transformers, ref, clip_weights.load_clip(ref.state_dict(), TINY)


def _texts(eos: int = 99, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [3, 12], mask): random ids in [10, 99) with `eos` closing each row, then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 99, (len(LENGTHS), max(LENGTHS)))
    mask = np.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, length - 1], ids[row, length:], mask[row, :length] = eos, 0, 1
    return ids, mask


def _pixels(seed: int = 0, batch: int = 3) -> np.ndarray:
    """CLIP-normalised-like NHWC float32 images."""
    return np.random.default_rng(seed).normal(size=(batch, 32, 32, 3)).astype(np.float32)


def _features(model: de.DualEncoder, ids, mask, pixels) -> dict[str, np.ndarray]:
    """Unnormalised and normalised features and logits_per_image, in one jit."""

    @jax.jit
    def run(ids, mask, pixels):
        text, image = model.text_features(ids, mask), model.image_features(pixels)
        text_emb, image_emb = model(ids, mask, pixels)
        logits = de.contrastive_logits(text_emb, image_emb, model.logit_scale[...])
        return dict(text_features=text, image_features=image, text_embeds=text_emb,
                    image_embeds=image_emb, logits_per_image=logits.T)

    return jax.tree.map(np.asarray, run(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels)))


def _torch_features(torch, ref, ids, mask, pixels) -> dict[str, np.ndarray]:
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    pixels = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        return dict(
            text_features=ref.get_text_features(input_ids=ids, attention_mask=mask).pooler_output,
            image_features=ref.get_image_features(pixel_values=pixels).pooler_output,
            text_embeds=out.text_embeds, image_embeds=out.image_embeds,
            logits_per_image=out.logits_per_image)


def _assert_close(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        value = np.asarray(value)
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


# ---------------------------------------------------------------- against transformers


def test_matches_transformers_clip(reference):
    torch, _, ref, model = reference
    ids, mask = _texts()
    pixels = _pixels()
    _assert_close(_features(model, ids, mask, pixels),
                  _torch_features(torch, ref, ids, mask, pixels))


@pytest.mark.parametrize("pooling", ["eos_id", "last"])
def test_text_pooling_matches_transformers(reference, pooling):
    """'eos' at a configured id (transformers' first-eos rule) and 'last' (last unmasked token)."""
    torch, _, ref, model = reference
    eos = 7  # below the other ids: the largest-id rule would pool elsewhere
    ids, mask = _texts(eos=eos, seed=1)
    if pooling == "eos_id":
        cfg = dataclasses.replace(TINY, eos_token_id=eos)
    else:
        cfg = dataclasses.replace(TINY, text_pooling="last")
    pooled_model = nnx.merge(nnx.graphdef(de.abstract_dual_encoder(cfg)), nnx.state(model))
    with torch.no_grad():
        hidden = ref.text_model(input_ids=torch.from_numpy(ids),
                                attention_mask=torch.from_numpy(mask)).last_hidden_state
        expected = ref.text_projection(hidden[torch.arange(len(LENGTHS)),
                                              torch.tensor(LENGTHS) - 1]).numpy()
    got = jax.jit(pooled_model.text_features)(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=TOLERANCE, atol=TOLERANCE)


def test_import_from_saved_directory(reference, tmp_path):
    """config.json decides heads (not width // 64), activation, eps and the eos id."""
    torch, transformers, _, _ = reference
    ref = _random_clip(torch, transformers, seed=1, num_attention_heads=2, hidden_act="gelu",
                       layer_norm_eps=1e-6, eos_token_id=7)
    ref.save_pretrained(tmp_path)
    model = clip_weights.load_clip(tmp_path)
    cfg = model.cfg
    assert (cfg.text_heads, cfg.activation, cfg.norm_eps, cfg.eos_token_id) == (2, "gelu", 1e-6, 7)
    assert (cfg.image_size, cfg.patch_size, cfg.text_max_len, cfg.projection_dim) == (32, 8, 16, 32)
    ids, mask = _texts(eos=7, seed=2)
    pixels = _pixels(seed=2)
    _assert_close(_features(model, ids, mask, pixels),
                  _torch_features(torch, ref, ids, mask, pixels))


def test_import_from_torch_file_equals_state_dict(reference, tmp_path):
    torch, _, ref, model = reference
    path = tmp_path / "clip.pth"
    torch.save(ref.state_dict(), path)
    cfg, params = clip_weights.load_clip_state_dict(path, TINY)
    assert cfg == TINY
    expected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, expected))


def test_bare_state_dict_infers_openai_defaults(reference):
    """Without config.json: heads = width // 64, largest-id pooling, shapes from the tensors."""
    _, _, ref, _ = reference
    cfg, _ = clip_weights.load_clip_state_dict(ref.state_dict())
    assert (cfg.text_heads, cfg.vision_heads, cfg.eos_token_id) == (1, 1, -1)
    vision_only = dict(code_grid=TINY.code_grid, codebook_size=TINY.codebook_size)
    assert dataclasses.replace(cfg, text_heads=4, vision_heads=4, **vision_only) == TINY


@pytest.mark.parametrize("change, message", [
    ("drop", "missing CLIP weights text_model.encoder.layers.1.mlp.fc2.bias"),
    ("reshape", "visual_projection.weight has shape (32, 63), the configured architecture "
                "needs (32, 64)"),
    ("extra", "unexpected keys text_model.pooler.weight"),
])
def test_bad_checkpoint_names_the_key(reference, tmp_path, change, message):
    torch, _, ref, _ = reference
    state = dict(ref.state_dict())
    if change == "drop":
        del state["text_model.encoder.layers.1.mlp.fc2.bias"]
    elif change == "reshape":
        state["visual_projection.weight"] = state["visual_projection.weight"][:, :63]
    else:
        state["text_model.pooler.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        clip_weights.load_clip_state_dict(path, TINY)


def test_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        clip_weights.load_clip_state_dict(tmp_path / "nothing.safetensors")
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        clip_weights.load_clip_state_dict(tmp_path)


# ---------------------------------------------------------------- contrastive loss


def _numpy_loss(text: np.ndarray, image: np.ndarray, scale: float) -> tuple[float, float, float]:
    """(loss, text->image accuracy, image->text accuracy), float64."""
    logits = scale * text.astype(np.float64) @ image.T.astype(np.float64)

    def cross_entropy(z):
        z = z - z.max(axis=1, keepdims=True)
        return -np.mean(np.diag(z) - np.log(np.exp(z).sum(axis=1)))

    labels = np.arange(len(text))
    return (0.5 * (cross_entropy(logits) + cross_entropy(logits.T)),
            np.mean(logits.argmax(1) == labels), np.mean(logits.T.argmax(1) == labels))


def _embeddings(seed: int, batch: int = 8, dim: int = 16) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(batch, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(1000.0)])
def test_contrastive_loss_matches_numpy(log_scale):
    text, image = _embeddings(0), _embeddings(1)
    image[:4] = text[:4] + 0.1 * image[:4]  # some pairs match, some do not
    loss, metrics = de.contrastive_loss(jnp.asarray(text), jnp.asarray(image),
                                        jnp.float32(log_scale))
    scale = min(math.exp(log_scale), 100.0)  # clamped as CLIP
    expected, t2i, i2t = _numpy_loss(text, image, scale)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["text_to_image_accuracy"]) == pytest.approx(t2i)
    assert float(metrics["image_to_text_accuracy"]) == pytest.approx(i2t)
    assert float(metrics["logit_scale"]) == pytest.approx(scale, rel=1e-6)
    assert float(metrics["loss"]) == float(loss)


def test_matched_pairs_minimise_the_loss():
    emb = jnp.asarray(_embeddings(2))
    scale = jnp.float32(math.log(1 / 0.07))
    matched, metrics = de.contrastive_loss(emb, emb, scale)
    shuffled, _ = de.contrastive_loss(emb, jnp.roll(emb, 1, axis=0), scale)
    assert float(matched) < float(shuffled)
    assert float(metrics["text_to_image_accuracy"]) == 1.0
    assert float(metrics["image_to_text_accuracy"]) == 1.0


def test_contrastive_loss_with_a_sharded_batch():
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    text, image = jnp.asarray(_embeddings(3)), jnp.asarray(_embeddings(4))
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    sharded = jax.jit(de.contrastive_loss)(
        jax.device_put(text, batch), jax.device_put(image, batch), jnp.float32(2.0))
    plain = de.contrastive_loss(text, image, jnp.float32(2.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), sharded, plain)


# ---------------------------------------------------------------- from scratch: codes, grads


def test_code_patches_concatenate_the_embeddings_of_each_patch_row_major():
    cfg = dataclasses.replace(TINY, vision_input="codes", code_patch=2)
    tower = de.create_dual_encoder(cfg, seed=0).vision
    codes = np.random.default_rng(1).integers(0, cfg.codebook_size, (2, 4, 4))
    table = np.asarray(tower.code_embedding[...])
    tokens = np.asarray(tower._tokens(jnp.asarray(codes)))
    assert tokens.shape == (2, 4, cfg.vision_width) and table.shape[1] == cfg.vision_width // 4
    expected = np.concatenate([table[codes[1, 2, 0]], table[codes[1, 2, 1]],
                               table[codes[1, 3, 0]], table[codes[1, 3, 1]]])
    np.testing.assert_array_equal(tokens[1, 2], expected)  # patch (row 1, column 0)


@pytest.mark.parametrize("code_patch", [1, 2])
def test_codes_input_trains_every_parameter(code_patch):
    """'codes' vision input: shapes, unit norms, finite gradients reaching logit_scale (remat)."""
    cfg = dataclasses.replace(TINY, vision_input="codes", remat_policy="full", text_pooling="last",
                              code_patch=code_patch)
    model = de.create_dual_encoder(cfg, seed=0)
    assert model.vision.patch_embedding is None
    graphdef, params = nnx.split(model, nnx.Param)
    ids, mask = _texts()
    codes = np.random.default_rng(0).integers(0, cfg.codebook_size, (3, 4, 4))

    @jax.jit
    def loss_and_grads(params, ids, mask, codes):
        def loss_fn(params):
            m = nnx.merge(graphdef, params)
            text, image = m(ids, mask, codes)
            return de.contrastive_loss(text, image, m.logit_scale[...])[0], (text, image)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, (text, image)), grads = loss_and_grads(params, ids, mask, codes)
    assert text.shape == image.shape == (3, cfg.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(text), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(image), axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(float(loss))
    grads = nnx.to_pure_dict(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(grads["logit_scale"]) != 0.0
    assert np.abs(np.asarray(grads["vision"]["code_embedding"])).sum() > 0
    with pytest.raises(ValueError, match=r"codes must be \[batch, 4, 4\]"):
        model.encode_image(jnp.zeros((1, 5, 5), jnp.int32))


def test_weight_decay_mask():
    params = nnx.to_pure_dict(nnx.state(de.abstract_dual_encoder(TINY), nnx.Param))
    mask = de.weight_decay_mask(params)
    assert mask["text"]["token_embedding"] and mask["vision"]["encoder"]["layers"]["fc1"]["kernel"]
    assert not (mask["logit_scale"] or mask["vision"]["class_embedding"]
                or mask["text"]["final_norm"]["scale"]
                or mask["text"]["encoder"]["layers"]["attention"]["query"]["bias"])


# ---------------------------------------------------------------- config and sharding


def test_base_config_round_trip():
    assert de.DualEncoderConfig.from_config(de.base_dual_encoder_config()) == de.DualEncoderConfig()


@pytest.mark.parametrize("field, value, message", [
    ("vision_input", "latents", "config.retriever.vision_input: must be 'pixels' or 'codes'"),
    ("text_heads", 5, "config.retriever.text_heads: must be >= 1 and divide text_width=512"),
    ("image_size", 200, "config.retriever.image_size: must be >= 1 and a multiple of patch_size"),
    ("remat_policy", "some", "config.retriever.remat_policy"),
])
def test_config_errors_name_the_field(field, value, message):
    config = de.base_dual_encoder_config()
    config[field] = value
    with pytest.raises(ConfigError, match=message):
        de.DualEncoderConfig.from_config(config)


def test_parameters_have_logical_axes_and_shard():
    """Every parameter resolves under the rules table; a sharded pass matches."""
    model = de.create_dual_encoder(TINY, seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    fc1 = specs["text"]["encoder"]["layers"]["fc1"]["kernel"]
    assert fc1 == PartitionSpec("layers", "embed", "mlp")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, to_partition_spec(tuple(s), RULES)),
                             specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
    sharded_params = jax.device_put(nnx.to_pure_dict(params), shardings)
    ids, mask = _texts()
    ids, mask, pixels = ids[:2], mask[:2], _pixels(batch=2)

    def embed(pure_params, ids, mask, pixels):
        return nnx.merge(graphdef, pure_params)(ids, mask, pixels)

    with activate(mesh, RULES):
        sharded = jax.jit(embed)(sharded_params, ids, mask, pixels)
    plain = jax.jit(embed)(nnx.to_pure_dict(params), ids, mask, pixels)
    for got, expected in zip(sharded, plain):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
