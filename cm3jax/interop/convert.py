"""`python -m cm3jax.interop.convert`: Hugging Face Chameleon / Anole <-> a cm3jax workdir.

    python -m cm3jax.interop.convert --from=hf --src=HF_DIR --workdir=DIR [--fsdp=4 --tensor=2]
        [--param_dtype=bfloat16]
    python -m cm3jax.interop.convert --to=hf --workdir=DIR --dst=HF_DIR [--step=N]

`--from=hf` reads a `ChameleonForConditionalGeneration` directory (config.json and
safetensors shards, e.g. what `save_pretrained` writes; nothing is downloaded) and writes
a normal LM workdir: config.json (the Chameleon-style architecture as cm3jax config
switches), vocab.json, checkpoints/0/state (the parameters), the Chameleon id map
(chameleon_vocab.json) and the original config (chameleon_config.json); its VQ-VAE becomes
a VQGAN workdir DIR/vqgan named by DIR/image_tokenizer.json; a tokenizer.json is copied.
Parameters are placed with their training shardings on a (data, fsdp, tensor) mesh of all
devices as they are read. `--to=hf` writes the reverse, loadable by `from_pretrained`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from cm3jax import runs
from cm3jax.config import base_config, model_vocab_size
from cm3jax.errors import UserError, exit_on_user_error
from cm3jax.interop import chameleon, chameleon_vqvae
from cm3jax.interop.chameleon_vqvae import HF_PREFIX as VQ_PREFIX
from cm3jax.interop.tensor_files import TensorReader, write_checkpoint
from cm3jax.models.layers import TransformerConfig
from cm3jax.models.torch_state import read_torch_state_dict
from cm3jax.models.vqgan import VQGANConfig
from cm3jax.tokenizers import hf_text
from cm3jax.tokenizers.image import VQGANTokenizer, load_image_tokenizer, read_vqgan_config, restore_generator
from cm3jax.train import partitioning
from cm3jax.train.state import abstract_params
from cm3jax.vocab import Vocab

HF_CONFIG = "config.json"
CHAMELEON_VOCAB = "chameleon_vocab.json"
CHAMELEON_CONFIG = "chameleon_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_hf_config(directory: str) -> dict:
    """DIRECTORY/config.json of a Hugging Face checkpoint; UserError if missing or unreadable."""
    path = os.path.join(directory, HF_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: --src must be a Hugging Face model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON config ({e})") from e


def converted_config(hf: dict, vocab: Vocab, param_dtype: str, fsdp: int, tensor: int) -> ml_collections.ConfigDict:
    """The cm3jax experiment config of a converted checkpoint (LM task, Chameleon switches)."""
    c = chameleon.chameleon_model_config(base_config(), hf)
    c.vocab.text_size, c.vocab.image_codes, c.vocab.num_masks = vocab.text_size, vocab.image_codes, vocab.num_masks
    c.model.param_dtype = param_dtype
    c.data.seq_len = c.model.max_len
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, fsdp, tensor
    return c


def conversion_mesh(fsdp: int, tensor: int) -> jax.sharding.Mesh:
    """All devices as (data, fsdp, tensor); UserError if fsdp x tensor does not divide them."""
    n = jax.device_count()
    if fsdp < 1 or tensor < 1 or n % (fsdp * tensor):
        raise UserError(f"--fsdp={fsdp} x --tensor={tensor} must divide the {n} devices")
    return partitioning.make_mesh({"data": n // (fsdp * tensor), "fsdp": fsdp, "tensor": tensor})


def from_hf(src: str, workdir: str, fsdp: int = 1, tensor: int = 1, param_dtype: str = "float32",
            vqgan_ckpt: str = "") -> dict:
    """Converts the Hugging Face Chameleon checkpoint in `src` into the LM workdir `workdir`.

    `vqgan_ckpt`: Meta's original `vqgan.ckpt`, whose decoder Hugging Face checkpoints lack.
    Returns the parameter tree (sharded on the conversion mesh). Raises UserError on a
    missing shard or tensor, an unsupported config, a vocab that does not match, or a
    `workdir` that already holds a run.
    """
    if os.path.exists(os.path.join(workdir, runs.CONFIG_FILE)) or runs.checkpoint_steps(workdir):
        raise UserError(f"{workdir} already holds a run: convert into a new directory")
    hf = read_hf_config(src)
    chameleon.check_hf_config(hf)
    ids = chameleon.ChameleonVocab.from_hf(hf.get("vocabulary_map"), int(hf["vocab_size"]))
    codes = int((hf.get("vq_config") or {}).get("num_embeddings", len(ids.image_ids)))
    if codes != len(ids.image_ids):
        raise UserError(f"{src}/config.json: vq_config.num_embeddings={codes} but the vocabulary_map has "
                        f"{len(ids.image_ids)} image tokens: the vocab does not match the image tokenizer")
    vocab = ids.vocab(num_masks=base_config().vocab.num_masks)
    config = converted_config(hf, vocab, param_dtype, fsdp, tensor)
    cfg = TransformerConfig.from_config(config.model, model_vocab_size(config))
    reader = TensorReader(src)
    vq_section = _vq_section(reader, hf, vqgan_ckpt)  # checked before the long import
    params = chameleon.import_transformer(reader, cfg, ids.rows(vocab, cfg.vocab_size), conversion_mesh(fsdp, tensor))
    workdir = os.path.abspath(workdir)
    # At most 1 GB in flight between devices, host and disk: Orbax's default (96 GB) would copy
    # a 7B model to host memory whole while saving.
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(os.path.join(workdir, runs.CHECKPOINT_DIR, "0", runs.STATE_ITEM),
                          args=ocp.args.PyTreeSave({"params": params}))
    if jax.process_index() == 0:
        _write_run_files(src, workdir, config, vocab, ids, hf)
        if vq_section is not None:
            _write_image_tokenizer(reader, vq_section, workdir, vqgan_ckpt)
    return params


def _write_run_files(src: str, workdir: str, config: ml_collections.ConfigDict, vocab: Vocab,
                     ids: chameleon.ChameleonVocab, hf: dict) -> None:
    with open(os.path.join(workdir, runs.CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    vocab.save(os.path.join(workdir, "vocab.json"))
    with open(os.path.join(workdir, CHAMELEON_VOCAB), "w") as f:
        f.write(ids.to_json())
    with open(os.path.join(workdir, CHAMELEON_CONFIG), "w") as f:
        json.dump(hf, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(workdir, name))
    with open(os.path.join(workdir, hf_text.IDS_FILE), "w") as f:
        json.dump(ids.text_ids.tolist(), f)  # cm3jax text id -> Chameleon id, for tokenizer.json


def _vq_section(reader: TensorReader, hf: dict, vqgan_ckpt: str) -> ml_collections.ConfigDict | None:
    """The `config.vqgan` section of the checkpoint's VQ-VAE, or None (with a warning) when it
    has none; UserError for a VQ-VAE cm3jax cannot hold or a missing --vqgan_ckpt file."""
    if vqgan_ckpt and not os.path.isfile(vqgan_ckpt):
        raise UserError(f"--vqgan_ckpt={vqgan_ckpt} does not exist")
    if not any(n.startswith(VQ_PREFIX) for n in reader.names()):
        logging.warning("%s has no VQ-VAE (model.vqmodel.*): no image tokenizer written", reader.directory)
        return None
    return chameleon_vqvae.vqgan_config_from_hf(hf.get("vq_config") or {})


def _write_image_tokenizer(reader: TensorReader, section: ml_collections.ConfigDict, workdir: str,
                           vqgan_ckpt: str) -> None:
    """DIR/vqgan from the checkpoint's VQ-VAE and DIR/image_tokenizer.json naming it."""
    names = {n for n in reader.names() if n.startswith(VQ_PREFIX)}
    decoder = read_torch_state_dict(vqgan_ckpt, "pip install -r requirements-ref.txt") if vqgan_ckpt else None
    imported = chameleon_vqvae.vqgan_params_from_hf(dict(reader.by_shard(names)), VQGANConfig.from_config(section),
                                                    decoder_arrays=decoder)
    if not imported.decoder_imported:
        logging.warning("Hugging Face checkpoints hold only the VQ-VAE encoder: images can be tokenized but "
                        "not drawn until --vqgan_ckpt names Meta's vqgan.ckpt (its decoder)")
    vqgan_dir = os.path.join(workdir, "vqgan")
    chameleon_vqvae.save_vqgan_workdir(vqgan_dir, section, imported.params, imported.stats)
    with open(os.path.join(workdir, "image_tokenizer.json"), "w") as f:
        f.write(VQGANTokenizer.load(vqgan_dir).to_json())


def to_hf(workdir: str, dst: str, step: int | None = None, max_shard_bytes: int = 4 << 30) -> None:
    """Writes the LM in `workdir` as a Hugging Face Chameleon directory `dst`, one safetensors
    shard in memory at a time: a workdir made by `from_hf` (possibly trained since) goes back
    to Chameleon's ids, a model trained in cm3jax with the Chameleon-style config keeps its own.

    Raises:
      UserError: not an LM workdir, a model that is not Chameleon-style, or a `dst` that
        already holds a model.
    """
    if os.path.exists(os.path.join(dst, HF_CONFIG)):
        raise UserError(f"{dst} already holds a model ({HF_CONFIG}): export into a new directory")
    config = ml_collections.ConfigDict(runs.read_config(workdir, "LM"))
    vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
    cfg = TransformerConfig.from_config(config.model, model_vocab_size(config))
    chameleon.check_chameleon_style(cfg)
    base, rows = _export_vocab(workdir, vocab, cfg)
    _, path = runs.state_path(workdir, step, "LM")
    _, abstract = abstract_params(cfg)
    target = runs.on_first_device(nnx.to_pure_dict(abstract))
    params = runs.restore_arrays(path, {"params": target}, "LM", "model")["params"]
    hf = chameleon.hf_text_config(base, cfg)
    tensors = itertools.chain(chameleon.export_transformer(params, cfg, rows),
                              _export_image_tokenizer(workdir, hf))  # also sets hf["vq_config"]
    write_checkpoint(dst, tensors, max_shard_bytes)
    with open(os.path.join(dst, HF_CONFIG), "w") as f:
        json.dump(hf, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(workdir, name)):
            shutil.copyfile(os.path.join(workdir, name), os.path.join(dst, name))


def _export_vocab(workdir: str, vocab: Vocab, cfg: TransformerConfig) -> tuple[dict, chameleon.RowMap]:
    """(base config.json, row map) of the export: the imported Chameleon's (its config and id
    map, checked against `vocab`), or, for a model trained in cm3jax, cm3jax's own ids."""
    ids_path, base_path = os.path.join(workdir, CHAMELEON_VOCAB), os.path.join(workdir, CHAMELEON_CONFIG)
    if not os.path.isfile(ids_path):
        base = {"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"],
                "vocab_size": vocab.size, "vocabulary_map": chameleon.native_vocabulary_map(vocab),
                "bos_token_id": None, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
                "vq_config": {"num_embeddings": vocab.image_codes}}
        return base, chameleon.native_rows(vocab, cfg.vocab_size)
    if not os.path.isfile(base_path):
        raise UserError(f"{base_path} is missing: a workdir converted with --from=hf keeps Chameleon's config there")
    with open(ids_path) as f:
        ids = chameleon.ChameleonVocab.from_json(f.read())
    with open(base_path) as f:
        base = json.load(f)
    ids.vocab(vocab.num_masks).check_same(vocab, f"{workdir}'s Chameleon id map")
    return base, ids.rows(vocab, cfg.vocab_size)


def _export_image_tokenizer(workdir: str, hf: dict) -> list[tuple[str, np.ndarray]]:
    """model.vqmodel.* tensors of the workdir's VQGAN (vq_config set in `hf`), or none."""
    path = os.path.join(workdir, "image_tokenizer.json")
    if not os.path.isfile(path):
        return []
    vqgan_dir = getattr(load_image_tokenizer(path), "workdir", None)
    if vqgan_dir is None:
        logging.warning("%s: the image tokenizer is not a VQGAN; the export has no image tokenizer weights", workdir)
        return []
    cfg = read_vqgan_config(vqgan_dir)
    try:
        chameleon_vqvae.check_chameleon_compatible(cfg)
    except UserError as e:
        logging.warning("%s: the VQGAN is not Chameleon's VQ-VAE (%s); the export has no image tokenizer weights",
                        workdir, e)
        return []
    _, state = runs.state_path(vqgan_dir, None, "VQGAN")
    params = nnx.to_pure_dict(nnx.state(restore_generator(state, cfg), nnx.Param))
    hf["vq_config"] = chameleon_vqvae.vqgan_config_to_hf(cfg)
    return sorted(chameleon_vqvae.vqgan_params_to_hf(params, cfg).items())


def main() -> None:
    """The command line (flags are defined here, so importing this module defines none)."""
    from absl import app, flags

    flags.DEFINE_enum("from", None, ["hf"], "Convert from this format into --workdir.")
    flags.DEFINE_enum("to", None, ["hf"], "Convert --workdir into this format, written to --dst.")
    flags.DEFINE_string("src", None, "--from=hf: the Hugging Face model directory.")
    flags.DEFINE_string("dst", None, "--to=hf: the directory to write.")
    flags.DEFINE_string("workdir", None, "The cm3jax LM workdir (written by --from, read by --to).")
    flags.DEFINE_integer("fsdp", 1, "--from: devices the parameters are sharded over (ZeRO-3 axis).")
    flags.DEFINE_integer("tensor", 1, "--from: tensor-parallel devices (heads / mlp / vocab).")
    flags.DEFINE_string("vqgan_ckpt", "", "--from: Meta's vqgan.ckpt, for the VQ-VAE decoder HF checkpoints lack.")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "--from: stored parameter dtype.")
    flags.DEFINE_integer("step", None, "--to: checkpoint step (default: the newest).")
    flags.DEFINE_integer("max_shard_mb", 4096, "--to: safetensors shard size.")
    FLAGS = flags.FLAGS

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
        source, target = FLAGS["from"].value, FLAGS["to"].value
        if (source is None) == (target is None):
            raise UserError("give exactly one of --from=hf or --to=hf")
        if not FLAGS.workdir:
            raise UserError("--workdir is required")
        if source and not FLAGS.src:
            raise UserError("--from=hf needs --src=HF_DIR")
        if target and not FLAGS.dst:
            raise UserError("--to=hf needs --dst=DIR")
        if source:
            from_hf(FLAGS.src, FLAGS.workdir, FLAGS.fsdp, FLAGS.tensor, FLAGS.param_dtype, FLAGS.vqgan_ckpt)
            print(f"converted {FLAGS.src} -> {FLAGS.workdir}: python -m cm3jax.sample --workdir={FLAGS.workdir}")
        else:
            to_hf(FLAGS.workdir, FLAGS.dst, FLAGS.step, FLAGS.max_shard_mb << 20)
            print(f"exported {FLAGS.workdir} -> {FLAGS.dst} (ChameleonForConditionalGeneration.from_pretrained)")

    app.run(exit_on_user_error(run))


if __name__ == "__main__":
    main()
