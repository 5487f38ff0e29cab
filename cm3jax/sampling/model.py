"""A trained LM workdir loaded for generation: parameters, vocab, tokenizers, decoder.

An LM workdir is self-contained (the trainer writes config.json, vocab.json and copies of
the data's tokenizer.model and image_tokenizer.json next to the checkpoints), so this
needs nothing but the directory. Only the parameters are restored (Orbax partial
restore), already sharded on the sampling mesh.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from cm3jax import runs
from cm3jax.config import MESH_AXES, mesh_shape
from cm3jax.errors import UserError
from cm3jax.sampling.decode import Decoder
from cm3jax.tokenizers.image import load_image_tokenizer
from cm3jax.tokenizers.hf_text import HFTextTokenizer
from cm3jax.tokenizers.text import TextTokenizer, load_text_tokenizer
from cm3jax.train import partitioning
from cm3jax.train.state import abstract_params, model_config
from cm3jax.vocab import Vocab

WHAT = "cm3jax LM"


@dataclasses.dataclass
class LoadedModel:
    """Everything generation needs from one LM run."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict  # the run's training config
    vocab: Vocab
    text_tokenizer: TextTokenizer | HFTextTokenizer
    image_tokenizer: object  # VQGANTokenizer or PaletteTokenizer: encode/decode/grid/resolution
    decoder: Decoder

    @property
    def image_tokens(self) -> int:
        """Codes per image (grid x grid)."""
        return int(self.image_tokenizer.grid) ** 2

    @property
    def context(self) -> int:
        """Longest prompt + continuation the model's positions allow."""
        return int(self.decoder.model_config.max_len)


def load_model(workdir: str, step: int | None = None, tensor: int = 1) -> LoadedModel:
    """Loads WORKDIR's newest (or `step`) checkpoint onto a (data x tensor) mesh of all devices.

    Raises:
      UserError: not an LM workdir, no checkpoint, a missing tokenizer file, or a mesh that
        does not fit the devices or the model.
    """
    config = ml_collections.ConfigDict(runs.read_config(workdir, WHAT))
    if config.get("task", "lm") != "lm":
        raise UserError(f"{workdir} is a '{config.task}' run, not an LM (config.task='lm')")
    for name in ("vocab.json", "image_tokenizer.json"):
        if not os.path.isfile(os.path.join(workdir, name)):
            raise UserError(f"{os.path.join(workdir, name)} is missing: the LM workdir needs the "
                            "vocab and tokenizers its trainer copies there")
    vocab = Vocab.load(os.path.join(workdir, "vocab.json"))
    text_tokenizer = load_text_tokenizer(workdir, vocab)  # before the restore: a missing file fails fast
    step, path = runs.state_path(workdir, step, WHAT)
    cfg = model_config(config)
    if tensor < 1 or jax.device_count() % tensor or cfg.num_heads % tensor:
        raise UserError(f"--tensor={tensor} must divide the {jax.device_count()} devices and the "
                        f"model's {cfg.num_heads} heads")
    mesh = sampling_mesh(tensor)
    graphdef, abstract_state = abstract_params(cfg)
    shardings = partitioning.param_shardings(abstract_state, mesh)
    shapes = nnx.to_pure_dict(abstract_state)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    params = runs.restore_arrays(path, {"params": target}, WHAT, "model")["params"]
    image_tokenizer = load_image_tokenizer(workdir)
    if cfg.image_grid and cfg.image_grid != image_tokenizer.grid:
        raise UserError(f"{workdir}: model.image_grid={cfg.image_grid} but its image tokenizer makes "
                        f"{image_tokenizer.grid}x{image_tokenizer.grid} codes")
    return LoadedModel(
        workdir=workdir,
        step=step,
        config=config,
        vocab=vocab,
        text_tokenizer=text_tokenizer,
        image_tokenizer=image_tokenizer,
        decoder=Decoder(graphdef, params, cfg, vocab, mesh),
    )


def sampling_mesh(tensor: int) -> Mesh:
    """All devices as data x tensor (fsdp 1): heads over `tensor`, rows over the rest."""
    shape = mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": tensor}),
                       jax.device_count())
    return partitioning.make_mesh({axis: shape[axis] for axis in MESH_AXES})
