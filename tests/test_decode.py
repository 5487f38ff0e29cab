"""The KV-cache decoder: cache == full forward pass, stopping, streams, sharding, determinism."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3jax.data import cm3
from cm3jax.errors import UserError
from cm3jax.models import transformer
from cm3jax.models.layers import TransformerConfig
from cm3jax.sampling import decode
from cm3jax.sampling.decode import Decoder, SamplingConfig, attention_slots
from cm3jax.train import partitioning
from cm3jax.vocab import Vocab

VOCAB = Vocab(text_size=40, image_codes=16, num_masks=4)
IMAGE_TOKENS = 6


def model_config(**overrides) -> TransformerConfig:
    """A random transformer whose logits depend on context (no zero-initialised outputs)."""
    fields = dict(vocab_size=VOCAB.size, max_len=96, num_layers=2, d_model=32, num_heads=4, head_dim=8,
                  mlp_dim=64, init_std=0.3, pos_init_std=0.3, zero_init_output=False, dtype="float32",
                  remat_policy="none")
    fields.update(overrides)
    return TransformerConfig(**fields)


def build(cfg: TransformerConfig, mesh=None) -> tuple[Decoder, nnx.Module]:
    model = transformer.create(cfg, 0)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    if mesh is not None:
        shardings = partitioning.param_shardings(nnx.state(model), mesh)
        params = jax.device_put(params, shardings)
    return Decoder(graphdef, params, cfg, VOCAB, mesh), model


def full_forward_argmax(model, tokens: np.ndarray) -> np.ndarray:
    """Argmax of the no-cache forward pass at every position of one unpadded row."""
    ids = jnp.asarray(tokens, jnp.int32)[None]
    logits = model(ids, jnp.arange(len(tokens))[None], jnp.ones_like(ids))
    return np.asarray(jnp.argmax(logits[0], axis=-1))


PROMPTS = [np.array([3, 7, 11, 2], np.int32), np.array([5, 1], np.int32), np.arange(10, 23, dtype=np.int32)]


@pytest.fixture(scope="module")
def decoder_and_model():
    return build(model_config())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_logits_equal_full_forward(scan_layers):
    cfg = model_config(scan_layers=scan_layers)
    model = transformer.create(cfg, 0)
    tokens = jnp.asarray(PROMPTS[2])[None]
    length = tokens.shape[1]
    full = model(tokens, jnp.arange(length)[None], jnp.ones_like(tokens))
    cache = transformer.init_cache(cfg, 1, length + 4)
    slot_valid = jnp.ones((1, length + 4), bool)
    prefill, cache = model.extend(tokens[:, :-3], jnp.arange(length - 3)[None],
                                  attention_slots(slot_valid, 0, length - 3), cache)
    rest, cache = model.extend(tokens[:, -3:], jnp.arange(length - 3, length)[None],
                               attention_slots(slot_valid, cache.index, 3), cache)
    np.testing.assert_allclose(jnp.concatenate([prefill, rest], axis=1), full, atol=1e-5)
    assert int(cache.index) == length


def assert_greedy_equals_full_forward_argmax(decoder: Decoder, model, new_tokens: int) -> None:
    decoded = decoder([PROMPTS], SamplingConfig(max_new_tokens=new_tokens, greedy=True))
    for prompt, row in zip(PROMPTS, decoded.rows()):
        sequence = np.concatenate([prompt, row])
        expected = full_forward_argmax(model, sequence)[len(prompt) - 1 : -1]
        stop = np.flatnonzero(row == VOCAB.eos_id)
        assert len(row) == (stop[0] + 1 if len(stop) else new_tokens)
        np.testing.assert_array_equal(row, expected[: len(row)])


def test_greedy_with_cache_equals_full_forward_argmax(decoder_and_model):
    assert_greedy_equals_full_forward_argmax(*decoder_and_model, new_tokens=24)


def test_segmented_decoding_equals_full_forward_argmax(decoder_and_model, monkeypatch):
    """Several decoding loops, the cache growing between them, give the same tokens."""
    monkeypatch.setattr(decode, "MIN_SEGMENT_TOKENS", 8)
    assert decode.segment_ends(40) == [10, 20, 30, 40]
    assert_greedy_equals_full_forward_argmax(*decoder_and_model, new_tokens=40)


def test_rows_stop_at_eos_and_pad_after(decoder_and_model):
    decoder, model = decoder_and_model
    # Make <eos> the argmax after token 3 by decoding greedily from a model biased towards it.
    biased = dict(decoder.params)
    embed = np.array(biased["embed"])
    embed[VOCAB.eos_id] *= 8.0
    stopper = Decoder(decoder.graphdef, {**biased, "embed": jnp.asarray(embed)}, decoder.model_config, VOCAB)
    decoded = stopper([PROMPTS], SamplingConfig(max_new_tokens=16, greedy=True))
    assert (decoded.lengths < 16).any(), "the biased model never stopped; pick another bias"
    for row, n in zip(decoded.tokens, decoded.lengths):
        if n < 16:
            assert row[n - 1] == VOCAB.eos_id
            assert (row[n:] == VOCAB.pad_id).all()


def test_same_seed_same_tokens_and_seeds_differ(decoder_and_model):
    decoder, _ = decoder_and_model
    config = SamplingConfig(max_new_tokens=12, top_p=0.9)
    a = decoder([PROMPTS], config, seed=3)
    b = decoder([PROMPTS], config, seed=3)
    c = decoder([PROMPTS], config, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_guidance_scale_one_equals_no_guidance(decoder_and_model):
    decoder, _ = decoder_and_model
    unconditional = [np.array([VOCAB.mask_id(0)], np.int32)] * len(PROMPTS)
    plain = decoder([PROMPTS], SamplingConfig(max_new_tokens=12, top_k=20), seed=1)
    guided = decoder([PROMPTS, unconditional],
                     SamplingConfig(max_new_tokens=12, top_k=20, guidance_scales=(1.0,)), seed=1)
    np.testing.assert_array_equal(plain.tokens, guided.tokens)
    stronger = decoder([PROMPTS, unconditional],
                       SamplingConfig(max_new_tokens=12, top_k=20, guidance_scales=(4.0,)), seed=1)
    assert not np.array_equal(plain.tokens, stronger.tokens)


def test_modality_constraint_gives_exactly_one_image(decoder_and_model):
    decoder, _ = decoder_and_model
    prompts = [np.array([3, 4, VOCAB.break_id], np.int32), np.array([9, VOCAB.break_id], np.int32)]
    config = SamplingConfig(max_new_tokens=IMAGE_TOKENS + 1, image_tokens=IMAGE_TOKENS, stop_at_image_end=True)
    decoded = decoder([prompts], config, seed=0)
    for row in decoded.rows():
        assert len(row) == IMAGE_TOKENS + 1
        assert row[-1] == VOCAB.break_id
        assert (VOCAB.token_type(row[:-1]) == 1).all()


def test_contrastive_decoding_runs_two_streams(decoder_and_model):
    decoder, _ = decoder_and_model
    unconditional = [np.array([VOCAB.mask_id(0)], np.int32)] * len(PROMPTS)
    decoded = decoder([PROMPTS, unconditional],
                      SamplingConfig(max_new_tokens=8, contrastive_alpha=0.1, contrastive_k=3), seed=0)
    assert decoded.tokens.shape == (len(PROMPTS), 8)


def test_sharded_decoding_matches_unsharded(decoder_and_model):
    decoder, _ = decoder_and_model
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded, _ = build(model_config(), mesh)
    config = SamplingConfig(max_new_tokens=10, greedy=True)
    np.testing.assert_array_equal(sharded([PROMPTS], config).tokens, decoder([PROMPTS], config).tokens)


def test_bad_requests_are_user_errors(decoder_and_model):
    decoder, _ = decoder_and_model
    with pytest.raises(UserError, match="context of 96"):
        decoder([[np.arange(90, dtype=np.int32) % 40]], SamplingConfig(max_new_tokens=10))
    with pytest.raises(UserError, match="streams"):
        decoder([PROMPTS], SamplingConfig(max_new_tokens=4, guidance_scales=(2.0,)))
    with pytest.raises(UserError, match="temperature"):
        decoder([PROMPTS], SamplingConfig(max_new_tokens=4, temperature=0.0))
    with pytest.raises(UserError, match="empty prompt"):
        decoder([[np.array([], np.int32)]], SamplingConfig(max_new_tokens=4))


def test_sampling_config_is_hashable():
    config = SamplingConfig(max_new_tokens=4, guidance_scales=(2.0, 1.5))
    assert hash(config) == hash(dataclasses.replace(config))
    assert config.streams == 3


def test_code_positions_in_the_cache_equal_full_forward():
    """With 2-D code positions (model.image_grid): the decoder gives every code it feeds back
    the position the full forward pass gives it, from a prompt that is inside an image."""
    cfg = model_config(image_grid=3)
    decoder, model = build(cfg)
    prompt = np.concatenate([[3, 7, VOCAB.break_id], VOCAB.image_id(np.array([1, 2]))]).astype(np.int32)
    config = SamplingConfig(max_new_tokens=8, greedy=True, image_tokens=9, stop_at_image_end=True)
    row = decoder([[prompt]], config).rows()[0]
    assert len(row) == 8 and row[-1] == VOCAB.break_id  # the image's 7 remaining codes, then <break>
    ids = jnp.asarray(np.concatenate([prompt, row]))[None]
    code_positions = jnp.asarray(cm3.image_code_positions(np.asarray(ids), VOCAB))
    np.testing.assert_array_equal(code_positions[0, 3:12], np.arange(1, 10))
    logits = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids), code_positions)
    codes = logits[0, len(prompt) - 1:len(prompt) + 6, VOCAB.image_offset:VOCAB.special_offset]
    np.testing.assert_array_equal(row[:-1], np.asarray(jnp.argmax(codes, axis=-1)) + VOCAB.image_offset)
    shifted = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids), jnp.roll(code_positions, 1, axis=1))
    assert not np.allclose(shifted, logits, atol=1e-3)  # the positions do reach the logits
    with pytest.raises(ValueError, match="needs code_positions"):
        model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
