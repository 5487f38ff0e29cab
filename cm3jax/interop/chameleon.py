"""Chameleon / Anole (Hugging Face `ChameleonForConditionalGeneration`) <-> cm3jax transformer.

Architecture: Chameleon is the cm3jax transformer with `activation='swiglu'`,
`position='rope'`, `norm='rmsnorm'` with learned scales, `qk_norm=True` (LayerNorm over
head_dim with a per-head scale and bias), untied output projection, and
`norm_placement='swin'` when `swin_norm` (Chameleon-34B). `chameleon_model_config` sets
those switches from a Hugging Face config.json; anything else (grouped-query attention,
biases, scaled RoPE, another activation) is refused with the field named.

Vocabulary: Chameleon's 65,536 ids put the 8,192 image tokens (`IMGIMG...` names) inside
the BPE range. cm3jax's Vocab is text ids, then image codes, then its own specials, so
`ChameleonVocab` maps Chameleon ids one to one: non-image ids keep their order as cm3jax
text ids, image token of code c becomes cm3jax image id `text_size + c`. cm3jax's
`<pad>`, `<eos>` and `<break>` start as copies of Chameleon's `<pad>`, `</s>` and
`<racm3:break>` (begin-image) rows; `<doc>` and the CM3 sentinels, which Chameleon lacks,
start as the mean embedding. Export writes the rows cm3jax trains back to Chameleon's ids
(`<break>` -> begin-image, `<eos>` -> `</s>`, `<pad>` -> `<pad>`).

Import streams the checkpoint tensor by tensor (`tensor_files.TensorReader`) into
per-shard host buffers (`ShardedAssembler`) laid out by each parameter's target
sharding, so a host holds only its devices' shards, never a second full copy.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from cm3jax.errors import UserError
from cm3jax.interop.chameleon_vqvae import HF_PREFIX as VQ_PREFIX
from cm3jax.interop.tensor_files import TensorReader
from cm3jax.models.layers import TransformerConfig
from cm3jax.train import partitioning
from cm3jax.train.state import abstract_params
from cm3jax.vocab import SPECIAL_TOKENS, Vocab

IMAGE_PREFIX = "IMGIMG"
# cm3jax special token -> the Chameleon token whose row it starts from (and is exported to).
SPECIAL_SOURCES = {"<pad>": "<pad>", "<eos>": "</s>", "<break>": "<racm3:break>"}
QK_NORM_EPS = 1e-5  # Chameleon's per-head LayerNorm epsilon (fixed in its code)


def image_code(name: str) -> int:
    """The VQ code of a Chameleon image-token name: IMGIMG + digits spelt A-J + one end letter."""
    return int("".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len(IMAGE_PREFIX):-1]))


def image_token_name(code: int) -> str:
    """Inverse of `image_code` (Chameleon ends every image-token name with 'Z')."""
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def chameleon_vocabulary_map(codes: int) -> dict[str, int]:
    """Chameleon's id layout with `codes` image tokens, as a config.json `vocabulary_map`:
    <unk> <s> </s> <pad>, the image tokens, begin-image, end-image, <image>; text ids follow."""
    names = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    names |= {image_token_name(c): 4 + c for c in range(codes)}
    return names | {"<racm3:break>": 4 + codes, "<eoss>": 5 + codes, "<image>": 6 + codes}


@dataclasses.dataclass(frozen=True)
class ChameleonVocab:
    """One-to-one map between Chameleon ids and cm3jax ids (see the module doc).

    Attributes:
      size: Chameleon's vocab size (rows of its embedding).
      image_ids: Chameleon id of image code c, for c in [0, codes).
      special_ids: cm3jax special name -> the Chameleon id it is copied from / exported to.
    """

    size: int
    image_ids: tuple[int, ...]
    special_ids: Mapping[str, int]

    @classmethod
    def from_hf(cls, vocabulary_map: Mapping[str, int] | None, size: int) -> "ChameleonVocab":
        """From config.json's `vocabulary_map` and `vocab_size`.

        Raises:
          UserError: no map, ids outside the vocab, or image codes that are not 0..n-1.
        """
        if not vocabulary_map:
            raise UserError("config.json has no vocabulary_map: cannot tell Chameleon's image tokens")
        outside = sorted(name for name, i in vocabulary_map.items() if not 0 <= int(i) < size)
        if outside:
            raise UserError(f"config.json vocabulary_map has ids outside vocab_size={size}: {outside[:5]}")
        images = {image_code(name): int(i) for name, i in vocabulary_map.items() if name.startswith(IMAGE_PREFIX)}
        if not images or sorted(images) != list(range(len(images))):
            raise UserError(f"config.json vocabulary_map: the {len(images)} {IMAGE_PREFIX} image tokens must be "
                            "codes 0..n-1")
        specials = {ours: int(vocabulary_map[theirs]) for ours, theirs in SPECIAL_SOURCES.items()
                    if theirs in vocabulary_map}
        return cls(size, tuple(images[c] for c in range(len(images))), specials)

    @property
    def text_ids(self) -> np.ndarray:
        """Chameleon ids that are not image tokens, ascending: cm3jax text id t is text_ids[t]."""
        keep = np.ones(self.size, bool)
        keep[list(self.image_ids)] = False
        return np.flatnonzero(keep)

    def vocab(self, num_masks: int) -> Vocab:
        """The cm3jax Vocab of the converted model."""
        return Vocab(len(self.text_ids), len(self.image_ids), num_masks)

    def to_cm3jax(self, ids: np.ndarray) -> np.ndarray:
        """Chameleon ids -> cm3jax ids (one to one; specials stay in the text range)."""
        table = np.empty(self.size, np.int64)
        text = self.text_ids
        table[text] = np.arange(len(text))
        table[list(self.image_ids)] = len(text) + np.arange(len(self.image_ids))
        return table[np.asarray(ids)]

    def rows(self, vocab: Vocab, model_rows: int) -> "RowMap":
        """How embedding rows move between this Chameleon vocab and `vocab` (`model_rows`
        cm3jax rows: the vocab padded to the model's size)."""
        return RowMap(self.source_rows(vocab, model_rows), self.export_rows(vocab))

    def source_rows(self, vocab: Vocab, rows: int) -> np.ndarray:
        """For each of `rows` cm3jax ids, the Chameleon row it starts from (-1: the mean row)."""
        source = np.full(rows, -1, np.int64)
        source[:vocab.text_size] = self.text_ids
        source[vocab.image_offset:vocab.special_offset] = self.image_ids
        for name, chameleon_id in self.special_ids.items():
            source[vocab.special_offset + SPECIAL_TOKENS.index(name)] = chameleon_id
        return source

    def export_rows(self, vocab: Vocab) -> np.ndarray:
        """For each Chameleon id, the cm3jax row exported to it (cm3jax specials win)."""
        rows = self.to_cm3jax(np.arange(self.size))
        for name, chameleon_id in self.special_ids.items():
            rows[chameleon_id] = vocab.special_offset + SPECIAL_TOKENS.index(name)
        return rows

    def to_json(self) -> str:
        """JSON for the converted workdir (chameleon_vocab.json)."""
        return json.dumps({"size": self.size, "image_ids": list(self.image_ids),
                           "special_ids": dict(self.special_ids)})

    @classmethod
    def from_json(cls, text: str) -> "ChameleonVocab":
        """Inverse of `to_json`."""
        d = json.loads(text)
        return cls(int(d["size"]), tuple(int(i) for i in d["image_ids"]),
                   {k: int(v) for k, v in d["special_ids"].items()})


@dataclasses.dataclass(frozen=True)
class RowMap:
    """Embedding / output rows between Chameleon and cm3jax ids.

    Attributes:
      source: for each cm3jax row, the Chameleon row it is imported from (-1: the mean row).
      export: for each Chameleon id, the cm3jax row exported to it.
    """

    source: np.ndarray
    export: np.ndarray


def native_rows(vocab: Vocab, model_rows: int) -> RowMap:
    """A model trained in cm3jax: Chameleon ids are cm3jax ids (padding rows are dropped)."""
    return RowMap(np.arange(model_rows), np.arange(vocab.size))


def native_vocabulary_map(vocab: Vocab) -> dict[str, int]:
    """config.json `vocabulary_map` of a model trained in cm3jax: its image codes as
    Chameleon image tokens, `<break>` as begin- and end-image, `<eos>`, `<pad>`."""
    names = {image_token_name(c): vocab.image_id(c) for c in range(vocab.image_codes)}
    return names | {"<pad>": vocab.pad_id, "</s>": vocab.eos_id, "<racm3:break>": vocab.break_id,
                    "<eoss>": vocab.break_id}


def _unsupported(field: str, value, why: str) -> UserError:
    return UserError(f"config.json {field}={value!r}: {why}; cm3jax converts Chameleon checkpoints without it")


def check_hf_config(hf: Mapping) -> None:
    """Raises UserError naming the first config.json field cm3jax's transformer cannot express."""
    heads = int(hf["num_attention_heads"])
    rope = hf.get("rope_parameters") or {"rope_type": (hf.get("rope_scaling") or {}).get("rope_type", "default")}
    checks = [
        ("model_type", hf.get("model_type"), hf.get("model_type") == "chameleon", "not a Chameleon checkpoint"),
        ("hidden_act", hf.get("hidden_act"), hf.get("hidden_act") == "silu", "only SwiGLU (silu) MLPs"),
        ("num_key_value_heads", hf.get("num_key_value_heads"),
         hf.get("num_key_value_heads") in (None, heads), "grouped-query attention is not supported"),
        ("attention_bias", hf.get("attention_bias"), not hf.get("attention_bias"), "attention biases are not supported"),
        ("mlp_bias", hf.get("mlp_bias"), not hf.get("mlp_bias"), "MLP biases are not supported"),
        ("rope_parameters.rope_type", rope.get("rope_type"), rope.get("rope_type", "default") == "default",
         "only unscaled RoPE"),
        ("rms_norm_eps", hf.get("rms_norm_eps"), float(hf.get("rms_norm_eps", QK_NORM_EPS)) == QK_NORM_EPS,
         f"cm3jax's QK LayerNorm shares the model's norm epsilon, which Chameleon fixes at {QK_NORM_EPS}"),
        ("hidden_size", hf.get("hidden_size"), int(hf["hidden_size"]) % heads == 0,
         f"must be divisible by num_attention_heads={heads}"),
    ]
    for field, value, ok, why in checks:
        if not ok:
            raise _unsupported(field, value, why)


def rope_theta(hf: Mapping) -> float:
    """RoPE base of a config.json (transformers >= 5 `rope_parameters`, older `rope_theta`)."""
    return float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))


def chameleon_model_config(c: ml_collections.ConfigDict, hf: Mapping) -> ml_collections.ConfigDict:
    """`c` with `c.model` set to the architecture of a Chameleon config.json (checked first)."""
    check_hf_config(hf)
    m = c.model
    m.num_layers = int(hf["num_hidden_layers"])
    m.d_model = int(hf["hidden_size"])
    m.num_heads = int(hf["num_attention_heads"])
    m.head_dim = m.d_model // m.num_heads
    m.mlp_dim = int(hf["intermediate_size"])
    m.max_len = int(hf["max_position_embeddings"])
    m.activation, m.position, m.rope_theta = "swiglu", "rope", rope_theta(hf)
    m.norm, m.norm_params, m.norm_eps, m.qk_norm = "rmsnorm", True, float(hf.get("rms_norm_eps", QK_NORM_EPS)), True
    m.norm_placement = "swin" if hf.get("swin_norm") else "pre"
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.image_grid = 0
    m.init_std, m.zero_init_output = float(hf.get("initializer_range", 0.02)), False
    return c


def check_chameleon_style(cfg: TransformerConfig) -> None:
    """Raises UserError naming a cm3jax model field a Chameleon checkpoint cannot hold."""
    wanted = {"activation": "swiglu", "position": "rope", "norm": "rmsnorm", "norm_params": True,
              "qk_norm": True, "image_grid": 0, "norm_eps": QK_NORM_EPS}
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise UserError(f"config.model.{field}={getattr(cfg, field)!r}: a Chameleon checkpoint needs "
                            f"{value!r} (export takes models trained with the Chameleon-style config)")
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
        raise UserError(f"config.model.head_dim={cfg.head_dim}: Chameleon needs d_model / num_heads")


# --- parameter layout ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and where it goes in the cm3jax parameter tree.

    `to_ours` maps the HF array to the cm3jax array (one layer's slice for stacked
    parameters), `to_hf` the other way; `layer` is None for unstacked parameters.
    """

    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _linear_in(heads: int | None) -> tuple[Callable, Callable]:
    """torch Linear weight [out, in] <-> cm3jax [in, out] (or [in, heads, head_dim])."""
    if heads is None:
        return (lambda w: w.T), (lambda w: w.T)
    return (lambda w: w.T.reshape(w.shape[1], heads, -1)), (lambda w: w.reshape(w.shape[0], -1).T)


def tensor_layout(cfg: TransformerConfig, rows: RowMap) -> list[Tensor]:
    """Every Hugging Face tensor of the transformer (not the VQ-VAE) and its cm3jax place."""
    same = (lambda w: w), (lambda w: w)
    heads_in = _linear_in(cfg.num_heads)
    out = (lambda w: w.T.reshape(cfg.num_heads, cfg.head_dim, -1)), (lambda w: w.reshape(-1, w.shape[-1]).T)
    embedding = (lambda w: _gather_rows(w, rows.source)), (lambda w: w[rows.export])
    per_layer = {
        "self_attn.q_proj.weight": (("attention", "query"), heads_in),
        "self_attn.k_proj.weight": (("attention", "key"), heads_in),
        "self_attn.v_proj.weight": (("attention", "value"), heads_in),
        "self_attn.o_proj.weight": (("attention", "out"), out),
        "self_attn.q_norm.weight": (("attention", "query_norm", "scale"), same),
        "self_attn.q_norm.bias": (("attention", "query_norm", "bias"), same),
        "self_attn.k_norm.weight": (("attention", "key_norm", "scale"), same),
        "self_attn.k_norm.bias": (("attention", "key_norm", "bias"), same),
        "mlp.up_proj.weight": (("mlp", "wi"), _linear_in(None)),
        "mlp.gate_proj.weight": (("mlp", "wi_gate"), _linear_in(None)),
        "mlp.down_proj.weight": (("mlp", "wo"), _linear_in(None)),
        "input_layernorm.weight": (("attention_norm", "scale"), same),
        "post_attention_layernorm.weight": (("mlp_norm", "scale"), same),
    }
    layout = [Tensor("model.embed_tokens.weight", ("embed",), None, *embedding),
              Tensor("model.norm.weight", ("final_norm", "scale"), None, *same)]
    if not cfg.tie_embeddings:
        layout.append(Tensor("lm_head.weight", ("lm_head",), None,
                             lambda w: _gather_rows(w, rows.source).T, lambda w: w.T[rows.export]))
    for i in range(cfg.num_layers):
        layout += [Tensor(f"model.layers.{i}.{name}", ("blocks",) + path, i, *fns)
                   for name, (path, fns) in per_layer.items()]
    return layout


def _gather_rows(table: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Rows of `table` picked by `source` (-1: the mean of the table's rows); one copy."""
    rows = table[np.maximum(source, 0)]
    rows[source < 0] = table.mean(axis=0, dtype=np.float32).astype(table.dtype)
    return rows


# --- import -------------------------------------------------------------------------------

class ShardedAssembler:
    """Builds one global array from host slices, holding only this host's device shards.

    Devices whose shard covers the same index share one host buffer. `write` copies a
    value (or one layer of a stacked parameter) into every buffer it overlaps; `finish`
    moves the buffers to their devices and frees them.
    """

    def __init__(self, shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding):
        self.shape, self.dtype, self.sharding = shape, np.dtype(dtype), sharding
        self.groups: dict[tuple, tuple[list, np.ndarray]] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if bounds not in self.groups:
                self.groups[bounds] = ([], np.empty([b - a for a, b in bounds], self.dtype))
            self.groups[bounds][0].append(device)

    def write(self, value: np.ndarray, layer: int | None) -> None:
        """Places `value` (the whole array, or layer `layer` of a stacked one)."""
        for bounds, (_, buffer) in self.groups.items():
            if layer is None:
                buffer[...] = value[tuple(slice(a, b) for a, b in bounds)]
            elif bounds[0][0] <= layer < bounds[0][1]:
                buffer[layer - bounds[0][0]] = value[tuple(slice(a, b) for a, b in bounds[1:])]

    def finish(self) -> jax.Array:
        """The global array (this host's shards on their devices); the host buffers are dropped."""
        shards = [jax.device_put(buffer, device, may_alias=True)
                  for devices, buffer in self.groups.values() for device in devices]
        self.groups = {}
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, shards)


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def import_transformer(reader: TensorReader, cfg: TransformerConfig, rows: RowMap, mesh: jax.sharding.Mesh) -> dict:
    """The cm3jax parameter tree (pure dict of arrays sharded on `mesh` by their logical
    axes) read from a Hugging Face Chameleon checkpoint, one tensor at a time.

    Raises:
      UserError: a tensor missing, of an unexpected shape, or one cm3jax has no place for.
    """
    _, abstract = abstract_params(cfg)
    shapes = nnx.to_pure_dict(abstract)
    shardings = partitioning.param_shardings(abstract, mesh)
    layout = tensor_layout(cfg, rows)
    _check_names(reader, {t.hf_name for t in layout})
    assemblers: dict[tuple[str, ...], ShardedAssembler] = {}
    by_name = {t.hf_name: t for t in layout}
    for name, array in reader.by_shard(set(by_name)):
        tensor = by_name[name]
        target = _at(shapes, tensor.path)
        want = target.shape[1:] if tensor.layer is not None else target.shape
        value = tensor.to_ours(array)
        if tuple(value.shape) != tuple(want):
            raise UserError(f"{reader.directory}: {name} has shape {array.shape}, which does not fit the "
                            f"model its config.json describes (cm3jax expects {tuple(want)} after conversion)")
        if tensor.path not in assemblers:
            assemblers[tensor.path] = ShardedAssembler(target.shape, target.dtype, _at(shardings, tensor.path))
        assemblers[tensor.path].write(value.astype(target.dtype, copy=False), tensor.layer)
    params: dict = {}
    for path, assembler in assemblers.items():
        _set(params, path, assembler.finish())
    return params


def _check_names(reader: TensorReader, expected: set[str]) -> None:
    """UserError naming tensors the layout needs but the checkpoint lacks, or the reverse."""
    names = {n for n in reader.names() if not n.startswith(VQ_PREFIX)}
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing:
        raise UserError(f"{reader.directory}: the checkpoint lacks {len(missing)} tensors its config.json "
                        f"implies, e.g. {', '.join(missing[:5])}")
    if extra:
        raise UserError(f"{reader.directory}: tensors cm3jax does not know how to convert (an unsupported "
                        f"architecture?): {', '.join(extra[:5])}")


# --- export -------------------------------------------------------------------------------

def export_transformer(params: dict, cfg: TransformerConfig, rows: RowMap) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array) of every transformer tensor, from a cm3jax parameter tree."""
    check_chameleon_style(cfg)
    host = jax.tree.map(np.asarray, params)  # once per parameter, not once per layer of a stacked one
    for tensor in tensor_layout(cfg, rows):
        value = _at(host, tensor.path)
        yield tensor.hf_name, tensor.to_hf(value if tensor.layer is None else value[tensor.layer])


def hf_text_config(base: Mapping, cfg: TransformerConfig) -> dict:
    """config.json of the exported model: `base` (the imported config.json) with the
    architecture fields of `cfg`."""
    check_chameleon_style(cfg)
    hf = dict(base)
    hf.update(num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
              max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
              swin_norm=cfg.norm_placement == "swin", tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=False, mlp_bias=False,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hf.pop("rope_theta", None)
    return hf
