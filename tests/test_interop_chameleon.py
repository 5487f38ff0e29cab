"""Chameleon (Hugging Face transformers) <-> cm3jax: logits, greedy tokens, export, sharding, errors.

A tiny random-weight `ChameleonForConditionalGeneration` is built with transformers (no
download) and saved with `save_pretrained` in several safetensors shards; every test
converts it and compares against transformers running the same weights. Needs torch and
transformers (requirements-ref.txt); skipped with the reason when they are missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="the Chameleon reference needs torch (requirements-ref.txt)")
transformers = pytest.importorskip("transformers", reason="the Chameleon reference needs transformers")

from cm3jax.errors import UserError  # noqa: E402
from cm3jax.interop import chameleon  # noqa: E402
from cm3jax.interop.convert import conversion_mesh, from_hf, to_hf  # noqa: E402
from cm3jax import runs  # noqa: E402
from cm3jax.config import base_config, model_vocab_size  # noqa: E402
from cm3jax.models.layers import TransformerConfig  # noqa: E402
from cm3jax.sampling.decode import Decoder, SamplingConfig  # noqa: E402
from cm3jax.tokenizers.text import load_text_tokenizer  # noqa: E402
from cm3jax.train import partitioning  # noqa: E402
from cm3jax.train.state import abstract_params  # noqa: E402
from cm3jax.vocab import Vocab  # noqa: E402

from conftest import MODERN_OVERRIDES, REPO_ROOT, experiment_config, tiny_config  # noqa: E402

CODES = 64  # image tokens (VQ codebook)
IMAGE_START = 4  # Chameleon puts its image tokens right after <unk> <s> </s> <pad>
VOCAB = 112
BOI, EOI = IMAGE_START + CODES, IMAGE_START + CODES + 1
FSDP, TENSOR = 4, 2


def tiny_chameleon_config(**overrides) -> "transformers.ChameleonConfig":
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                  vocabulary_map=chameleon.chameleon_vocabulary_map(CODES),
                  vq_config=dict(resolution=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                                 embed_dim=32, latent_channels=32, num_embeddings=CODES))
    return transformers.ChameleonConfig(**(fields | overrides))


def randomised(model):
    """Norm scales and QK-norm biases away from their 1 / 0 init, so a mix-up shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "vqmodel" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model.eval()


WORDS = ("a", "red", "blue", "circle", "square", "on", "the", "left")


def save(model, directory) -> str:
    """save_pretrained in several shards, plus a word-level tokenizer.json over Chameleon text ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model.save_pretrained(directory, max_shard_size="40KB")
    words = {"<unk>": 0} | {w: EOI + 2 + i for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return randomised(transformers.ChameleonForConditionalGeneration(tiny_chameleon_config()))


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return save(hf_model, tmp_path_factory.mktemp("chameleon_hf"))


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("converted"))
    params = from_hf(hf_dir, workdir, fsdp=FSDP, tensor=TENSOR)
    return workdir, params


def cm3jax_model(workdir: str, params: dict):
    """The converted transformer, computing in float32."""
    config = json.load(open(os.path.join(workdir, "config.json")))
    vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
    cfg = TransformerConfig.from_config(ml_collections.ConfigDict(config["model"]), params["embed"].shape[0])
    cfg = dataclasses.replace(cfg, dtype="float32")
    graphdef, _ = abstract_params(cfg)
    return cfg, vocab, graphdef


def chameleon_ids(workdir: str) -> chameleon.ChameleonVocab:
    return chameleon.ChameleonVocab.from_json(open(os.path.join(workdir, "chameleon_vocab.json")).read())


def mixed_tokens(batch: int = 2, length: int = 24) -> np.ndarray:
    """Text, begin-image, image tokens, end-image, text (Chameleon ids)."""
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(EOI + 2, VOCAB, (batch, n))  # noqa: E731
    image = rng.integers(IMAGE_START, IMAGE_START + CODES, (batch, 8))
    marks = lambda t: np.full((batch, 1), t)  # noqa: E731
    tokens = np.concatenate([text(6), marks(BOI), image, marks(EOI), text(length - 16)], axis=1)
    return tokens


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Unmasked next-token logits (transformers sets image-token columns to -inf in forward)."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.as_tensor(tokens)).last_hidden_state
        return (hidden @ model.lm_head.weight.T).numpy()


def chameleon_order_logits(workdir: str, graphdef, params: dict, tokens: np.ndarray) -> np.ndarray:
    """cm3jax logits of Chameleon-id `tokens`, columns in Chameleon's id order."""
    ids = chameleon_ids(workdir)
    ours_ids = ids.to_cm3jax(tokens)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    forward = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
    logits = np.asarray(forward(params, jnp.asarray(ours_ids), jnp.asarray(positions), jnp.ones_like(ours_ids)))
    return logits[:, :, ids.to_cm3jax(np.arange(VOCAB))]


def test_logits_match_transformers(hf_model, converted):
    workdir, params = converted
    _, _, graphdef = cm3jax_model(workdir, params)
    tokens = mixed_tokens()
    np.testing.assert_allclose(chameleon_order_logits(workdir, graphdef, params, tokens), hf_logits(hf_model, tokens),
                               atol=1e-4, rtol=1e-4)


def test_special_rows_start_from_chameleon_rows(hf_model, converted):
    workdir, params = converted
    vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
    embed = np.asarray(params["embed"])
    theirs = hf_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(embed[vocab.break_id], theirs[BOI])
    np.testing.assert_array_equal(embed[vocab.eos_id], theirs[2])
    np.testing.assert_allclose(embed[vocab.doc_id], theirs.mean(axis=0), atol=1e-6)
    assert vocab.text_size == VOCAB - CODES and vocab.image_codes == CODES


def test_text_tokenizer_maps_chameleon_ids(converted):
    workdir, _ = converted
    tokenizer = load_text_tokenizer(workdir, Vocab.load(os.path.join(workdir, "vocab.json")))
    ids = tokenizer.encode("a red circle")
    expected = chameleon_ids(workdir).to_cm3jax(np.asarray([EOI + 2, EOI + 3, EOI + 5]))
    np.testing.assert_array_equal(ids, expected)
    assert tokenizer.decode(ids) == "a red circle"


def test_parameters_placed_with_training_shardings(converted):
    workdir, params = converted
    cfg, _, _ = cm3jax_model(workdir, params)
    _, abstract = abstract_params(cfg)
    wanted = partitioning.param_shardings(abstract, conversion_mesh(FSDP, TENSOR))
    placed = jax.tree_util.tree_leaves_with_path(params)
    assert len(placed) == len(jax.tree_util.tree_leaves(wanted))
    for path, array in placed:
        want = wanted
        for key in path:
            want = want[key.key]
        assert array.sharding.is_equivalent_to(want, array.ndim), jax.tree_util.keystr(path)
    assert params["embed"].sharding.spec == partitioning.logical_spec(("vocab", "embed"))
    assert len({d for s in params["blocks"]["mlp"]["wi"].addressable_shards for d in [s.device]}) == 8


def test_greedy_generation_matches_transformers(hf_model, converted):
    workdir, params = converted
    cfg, vocab, graphdef = cm3jax_model(workdir, params)
    ids = chameleon_ids(workdir)
    prompt = mixed_tokens(batch=4, length=16)[:, -6:]  # text only
    hf_model.generation_config.eos_token_id = None  # run all steps, as the cm3jax decoder does here
    hf_model.generation_config.pad_token_id = 3
    with torch.no_grad():
        expected = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=8, do_sample=False)[:, 6:].numpy()
    decoder = Decoder(graphdef, params, cfg, vocab, conversion_mesh(FSDP, TENSOR))
    # image_tokens > 0: no image codes in text, as transformers forbids them
    decoded = decoder([[row for row in ids.to_cm3jax(prompt)]], SamplingConfig(max_new_tokens=8, greedy=True,
                                                                                image_tokens=CODES), seed=0)
    back = np.argsort(ids.to_cm3jax(np.arange(VOCAB)))  # cm3jax id -> Chameleon id (text and images)
    np.testing.assert_array_equal(back[decoded.tokens], expected)


def test_export_loads_in_transformers_with_the_same_logits(hf_model, converted, tmp_path):
    workdir, _ = converted
    to_hf(workdir, str(tmp_path / "hf"), max_shard_bytes=30_000)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    reloaded = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    tokens = mixed_tokens()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=1e-6)
    for name, value in hf_model.state_dict().items():
        np.testing.assert_allclose(reloaded.state_dict()[name].numpy(), value.numpy(), atol=1e-6, err_msg=name)


def test_model_trained_in_cm3jax_exports_with_its_own_ids(tmp_path):
    from cm3jax.train.loop import train

    config = tiny_config({**MODERN_OVERRIDES, "total_steps": 2, "checkpoint.async_save": False})
    workdir = str(tmp_path / "native")
    train(config, workdir)
    to_hf(workdir, str(tmp_path / "hf"))
    reloaded = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
    cfg = dataclasses.replace(TransformerConfig.from_config(config.model, model_vocab_size(config)), dtype="float32")
    graphdef, abstract = abstract_params(cfg)
    state = runs.restore_arrays(runs.state_path(workdir, None, "LM")[1],
                                {"params": runs.on_first_device(nnx.to_pure_dict(abstract))}, "LM", "model")
    tokens = np.random.default_rng(0).integers(0, vocab.size, (2, 12))
    positions = np.broadcast_to(np.arange(12), tokens.shape)
    ours = nnx.merge(graphdef, state["params"])(jnp.asarray(tokens), jnp.asarray(positions), jnp.ones_like(tokens))
    np.testing.assert_allclose(np.asarray(ours)[:, :, :vocab.size], hf_logits(reloaded, tokens), atol=1e-4, rtol=1e-4)
    assert reloaded.config.vocabulary_map[chameleon.image_token_name(3)] == vocab.image_id(3)


def test_fine_tuned_from_converted_exports_to_chameleon_ids(hf_model, converted, tmp_path):
    from cm3jax.train.loop import train

    source, _ = converted
    config = ml_collections.ConfigDict(json.load(open(os.path.join(source, "config.json"))))
    config.update({"init_from": source, "total_steps": 2, "eval_every": 0})
    config.data.update(source="synthetic", seq_len=32, global_batch_size=8)
    config.checkpoint.async_save = False
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.model.dtype = "float32"
    workdir = str(tmp_path / "tuned")
    train(config, workdir)
    to_hf(workdir, str(tmp_path / "hf"))
    reloaded = transformers.ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.vocabulary_map == hf_model.config.vocabulary_map
    cfg, _, graphdef = cm3jax_model(workdir, converted[1])
    _, abstract = abstract_params(cfg)
    params = runs.restore_arrays(runs.state_path(workdir, None, "LM")[1],
                                 {"params": runs.on_first_device(nnx.to_pure_dict(abstract))}, "LM", "model")["params"]
    tokens = mixed_tokens()
    np.testing.assert_allclose(chameleon_order_logits(workdir, graphdef, params, tokens), hf_logits(reloaded, tokens),
                               atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.asarray(params["embed"]), np.asarray(converted[1]["embed"]))  # it trained


def test_experiment_file_is_the_7b_architecture():
    experiment = experiment_config("chameleon_7b").model
    hf_7b = transformers.ChameleonConfig().to_dict()  # the defaults are Chameleon-7B's
    converted = chameleon.chameleon_model_config(base_config(), hf_7b).model
    for field in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_len", "activation", "position", "norm",
                  "norm_params", "qk_norm", "norm_placement", "tie_embeddings", "rope_theta", "norm_eps"):
        assert experiment[field] == converted[field], field


# --- errors -------------------------------------------------------------------------------

def test_missing_shard_is_named(hf_dir, tmp_path):
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    index = json.load(open(copy / "model.safetensors.index.json"))
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(copy / shard)
    with pytest.raises(UserError, match=f"missing: .*{shard}"):
        from_hf(str(copy), str(tmp_path / "out"))


def _with_config(hf_dir, tmp_path, **changes) -> str:
    copy = shutil.copytree(hf_dir, tmp_path / "copy")
    config = json.load(open(copy / "config.json"))
    config.update(changes)
    json.dump(config, open(copy / "config.json", "w"))
    return str(copy)


@pytest.mark.parametrize("field, value", [("num_key_value_heads", 2), ("hidden_act", "gelu"),
                                          ("attention_bias", True), ("rms_norm_eps", 1e-6)])
def test_unsupported_config_names_the_field(hf_dir, tmp_path, field, value):
    with pytest.raises(UserError, match=f"config.json {field}="):
        from_hf(_with_config(hf_dir, tmp_path, **{field: value}), str(tmp_path / "out"))


def test_unsupported_image_tokenizer_is_refused_before_anything_is_written(hf_dir, tmp_path):
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    with pytest.raises(UserError, match="double_latent"):
        from_hf(_with_config(hf_dir, tmp_path, vq_config=config["vq_config"] | {"double_latent": True}),
                str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_vocab_that_does_not_match_is_refused(hf_dir, tmp_path):
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    fewer = {k: v for k, v in config["vocabulary_map"].items() if k != chameleon.image_token_name(CODES - 1)}
    with pytest.raises(UserError, match="vocabulary_map has 63 image tokens"):
        from_hf(_with_config(hf_dir, tmp_path, vocabulary_map=fewer), str(tmp_path / "out"))


def test_misshapen_tensor_is_named(tmp_path):
    torch.manual_seed(0)
    wider = transformers.ChameleonForConditionalGeneration(tiny_chameleon_config(intermediate_size=96))
    directory = save(wider, tmp_path / "wider")
    config = json.load(open(os.path.join(directory, "config.json")))
    config["intermediate_size"] = 64  # config.json no longer describes the weights
    json.dump(config, open(os.path.join(directory, "config.json"), "w"))
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight has shape"):
        from_hf(directory, str(tmp_path / "out"))


def test_cli_converts_both_ways_and_reports_errors(hf_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "cm3jax.interop.convert", *args],  # noqa: E731
                                       capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    workdir, out = tmp_path / "workdir", tmp_path / "hf"
    done = run("--from=hf", f"--src={hf_dir}", f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr
    assert os.path.isdir(workdir / "checkpoints" / "0" / "state")
    done = run("--to=hf", f"--workdir={workdir}", f"--dst={out}")
    assert done.returncode == 0, done.stderr
    assert transformers.ChameleonConfig.from_pretrained(out).num_hidden_layers == 2
    sampled = subprocess.run([sys.executable, "-m", "cm3jax.sample", f"--workdir={workdir}", "--task=generate",
                              "--prompt=a red circle", "--max_new_tokens=6", f"--out={tmp_path / 'samples'}"],
                             capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert sampled.returncode == 0, sampled.stderr
    result = json.load(open(tmp_path / "samples" / "generate.json"))["results"][0]
    assert result["prompt"] == "a red circle" and isinstance(result["output"], list)
    bad = run("--from=hf", f"--src={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'other'}")
    assert bad.returncode == 2 and "error:" in bad.stderr and "config.json does not exist" in bad.stderr
    again = run("--from=hf", f"--src={hf_dir}", f"--workdir={workdir}")  # never overwrites a run
    assert again.returncode == 2 and "already holds a run" in again.stderr
