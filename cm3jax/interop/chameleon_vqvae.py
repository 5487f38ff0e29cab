"""Chameleon's VQ-VAE (Hugging Face `ChameleonVQVAE`) <-> the cm3jax VQGAN.

Hugging Face's `ChameleonVQVAE` (`model.vqmodel.*` of a Chameleon / Anole checkpoint) holds
taming's encoder, `quant_conv`, the codebook (`quantize.embedding.weight`) and
`post_quant_conv`, but no decoder. Decoding needs the `decoder.*` arrays of Meta's
original `vqgan.ckpt` (taming layout), passed as `decoder_arrays`; without them the
decoder stays randomly initialised and `ImportedVQGAN.decoder_imported` is False.

Architecture (`vqgan_config_from_hf`): the same taming module family, with
- attention blocks at `attn_resolutions` (None in the released config: mid block only)
  -> `level_attention`; attention at any resolution above the lowest is refused;
- `latent_channels` (encoder output) == `embed_dim`: cm3jax's encoder emits embed_dim;
- 32-group GroupNorms with eps 1e-6, so every level's channels are multiples of 32;
- nearest code by squared L2 (`l2_normalize=False`, `code_dim=-1`, `ema=False`).

Names: cm3jax's flat `down` / `mid` / `up` lists are taming's `down.{level}.block.{i}`,
`down.{level}.attn.{i}`, `down.{level}.downsample`, `mid.block_1` / `attn_1` / `block_2`
and `up.{level}.block.{i}` / `attn.{i}` / `upsample` (`up` is indexed by level, 0 = full
resolution, and run from the lowest level up); `shortcut` is `nin_shortcut`, GroupNorm
`scale` is `weight`, conv kernels (kh, kw, in, out) are torch weights (out, in, kh, kw).

`save_vqgan_workdir` writes a directory `VQGANTokenizer.load` reads unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cm3jax import runs
from cm3jax.config import base_config
from cm3jax.errors import ConfigError, UserError
from cm3jax.models.quantizer import CodebookStats
from cm3jax.models.vqgan import VQGAN, Decoder, VQGANConfig, base_vqgan_config, jit_create
from cm3jax.models.weight_files import fill
from cm3jax.tokenizers.image import abstract_vqgan

HF_PREFIX = "model.vqmodel."  # the VQ-VAE's names inside ChameleonForConditionalGeneration
# ChameleonVQVAEConfig's defaults: a vq_config may leave any of them out.
HF_DEFAULTS = {"embed_dim": 256, "num_embeddings": 8192, "double_latent": False,
               "latent_channels": 256, "resolution": 512, "in_channels": 3, "base_channels": 128,
               "channel_multiplier": (1, 1, 2, 2, 4), "num_res_blocks": 2,
               "attn_resolutions": None, "attn_type": "vanilla"}
NORM_GROUPS = 32  # every GroupNorm of Chameleon's VQ-VAE
CODEBOOK = ("quantizer", "codebook")
# cm3jax names that taming spells differently (the codebook is handled on its own).
RENAMES = {"kernel": "weight", "scale": "weight", "shortcut": "nin_shortcut"}

Path = tuple  # the keys of one parameter in a nested parameter dict


class ImportedVQGAN(NamedTuple):
    """A cm3jax VQGAN generator imported from Chameleon weights."""

    params: dict  # nnx.Param tree, as nnx.to_pure_dict(nnx.state(vqgan, nnx.Param))
    stats: dict  # CodebookStats tree (usage counter at zero)
    decoder_imported: bool  # False: no decoder arrays, the decoder is randomly initialised


def _refuse(field: str, value: Any, why: str) -> NoReturn:
    raise UserError(f"Chameleon vq_config.{field}={value!r} is not supported: {why}")


def _level_attention(resolution: int, levels: int, attn_resolutions: Iterable[int] | None) -> bool:
    """Whether Chameleon's encoder attends at its lowest level; UserError at any other."""
    wanted = set(attn_resolutions or ())
    sides = [resolution // 2**level for level in range(levels)]
    higher = [side for side in sides[:-1] if side in wanted]
    if higher:
        _refuse("attn_resolutions", list(attn_resolutions), f"cm3jax attends only in the mid "
                f"block and at the lowest resolution ({sides[-1]}), not at {higher}")
    return sides[-1] in wanted


def vqgan_config_from_hf(vq_config: Mapping) -> ml_collections.ConfigDict:
    """A full `config.vqgan` section for a Hugging Face Chameleon `vq_config` (config.json).

    Raises:
      UserError: naming the vq_config field the cm3jax VQGAN cannot reproduce
        (double_latent, attn_type, latent_channels, attn_resolutions, channel counts).
    """
    hf = {**HF_DEFAULTS, **vq_config}
    if hf["double_latent"]:
        _refuse("double_latent", hf["double_latent"], "cm3jax's encoder emits one latent")
    if hf["attn_type"] != "vanilla":
        _refuse("attn_type", hf["attn_type"], "only 'vanilla' attention blocks exist in cm3jax")
    if hf["latent_channels"] != hf["embed_dim"]:
        _refuse("latent_channels", hf["latent_channels"], "cm3jax's encoder emits embed_dim "
                f"channels, so latent_channels must equal embed_dim ({hf['embed_dim']})")
    c = base_vqgan_config()
    c.resolution, c.in_channels = int(hf["resolution"]), int(hf["in_channels"])
    c.base_channels, c.num_res_blocks = int(hf["base_channels"]), int(hf["num_res_blocks"])
    c.channel_multipliers = tuple(int(m) for m in hf["channel_multiplier"])
    c.attention, c.encoder, c.norm_groups = True, "taming", NORM_GROUPS
    c.level_attention = _level_attention(c.resolution, len(c.channel_multipliers),
                                         hf["attn_resolutions"])
    c.embed_dim, c.codebook_size = int(hf["embed_dim"]), int(hf["num_embeddings"])
    c.code_dim, c.l2_normalize, c.ema = -1, False, False
    check_chameleon_compatible(VQGANConfig.from_config(c))
    return c


def check_chameleon_compatible(cfg: VQGANConfig) -> None:
    """ConfigError naming the first `config.vqgan` field Chameleon's VQ-VAE cannot express."""
    channels = [cfg.base_channels * m for m in cfg.channel_multipliers]
    checks = {
        "encoder": (cfg.encoder == "taming", "Chameleon's VQ-VAE has the 'taming' encoder"),
        "attention": (cfg.attention, "Chameleon's VQ-VAE always attends in the mid block"),
        "norm_groups": (cfg.norm_groups == NORM_GROUPS,
                        f"Chameleon's GroupNorms have {NORM_GROUPS} groups"),
        "base_channels": (all(c % NORM_GROUPS == 0 for c in channels),
                          f"every level's channels {channels} must be multiples of {NORM_GROUPS} "
                          "(Chameleon's GroupNorm groups)"),
        "code_dim": (cfg.lookup_dim == cfg.embed_dim,
                     "Chameleon looks codes up in embed_dim: no factorised codes (set -1)"),
        "l2_normalize": (not cfg.l2_normalize, "Chameleon's code lookup is plain squared L2"),
        "ema": (not cfg.ema, "Chameleon's codebook is a parameter, not an EMA statistic"),
    }
    for name, (ok, message) in checks.items():
        if not ok:
            raise ConfigError(f"vqgan.{name}", message)


def vqgan_config_to_hf(cfg: VQGANConfig) -> dict:
    """The Hugging Face `vq_config` dict of a Chameleon-compatible VQGAN config.

    Raises:
      ConfigError: the config is not Chameleon-compatible (`check_chameleon_compatible`).
    """
    check_chameleon_compatible(cfg)
    return {"embed_dim": cfg.embed_dim, "num_embeddings": cfg.codebook_size,
            "double_latent": False, "latent_channels": cfg.embed_dim,
            "resolution": cfg.resolution, "in_channels": cfg.in_channels,
            "base_channels": cfg.base_channels, "channel_multiplier": list(cfg.channel_multipliers),
            "num_res_blocks": cfg.num_res_blocks,
            "attn_resolutions": [cfg.grid] if cfg.level_attention else None,
            "dropout": 0.0, "attn_type": "vanilla"}


def _stage_names(cfg: VQGANConfig, part: str, level: int, count: int) -> list[str]:
    """Taming names of one level's resnet blocks, each followed by its attention if any."""
    attention = ["attn"] if cfg.attends(level) else []
    return [f"{part}.{level}.{kind}.{i}" for i in range(count) for kind in ["block", *attention]]


def _list_names(cfg: VQGANConfig) -> dict[Path, list[str]]:
    """Taming names of the entries of the encoder's / decoder's module lists, in order."""
    levels = len(cfg.channel_multipliers)
    down, up = [], []
    for level in range(levels):
        down += _stage_names(cfg, "down", level, cfg.num_res_blocks)
        down += [f"down.{level}.downsample"] if level != levels - 1 else []
    for level in reversed(range(levels)):
        up += _stage_names(cfg, "up", level, cfg.num_res_blocks + 1)
        up += [f"up.{level}.upsample"] if level != 0 else []
    mid = ["mid.block_1", "mid.attn_1", "mid.block_2"]
    return {("encoder", "down"): down, ("encoder", "mid"): mid, ("decoder", "mid"): mid,
            ("decoder", "up"): up}


def _taming_names(cfg: VQGANConfig, paths: Iterable[Path]) -> dict[Path, str]:
    """{parameter path: taming / Hugging Face name without prefix} (cfg Chameleon-compatible)."""
    lists, names = _list_names(cfg), {}
    for path in paths:
        parts = list(path)
        if tuple(parts[:2]) in lists:
            parts[1:3] = [lists[tuple(parts[:2])][parts[2]]]
        names[path] = ("quantize.embedding.weight" if path == CODEBOOK
                       else ".".join(RENAMES.get(str(p), str(p)) for p in parts))
    return names


def _params_by_path(module: nnx.Module) -> dict[Path, nnx.Param]:
    return {tuple(path): v for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


def _from_torch(array: np.ndarray) -> np.ndarray:
    """A torch conv weight (out, in, kh, kw) -> (kh, kw, in, out); other arrays as they are."""
    array = np.asarray(array, np.float32)
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array


def _to_torch(array: Any) -> np.ndarray:
    """Inverse of `_from_torch`, as a writable C-contiguous copy (what torch.from_numpy wants)."""
    array = np.array(array, np.float32)
    return np.ascontiguousarray(array.transpose(3, 2, 0, 1) if array.ndim == 4 else array)


def _fill_from(model: VQGAN, variables: Mapping[str, nnx.Param],
               arrays: Mapping[str, np.ndarray], source: str) -> None:
    """Sets `variables` (by source name) of `model` from torch-layout `arrays`; UserError naming
    a missing or misshapen array (shapes in cm3jax's layout: conv kernels (kh, kw, in, out))."""
    converted = {name: _from_torch(arrays[name]) for name in variables if name in arrays}
    fill(model, variables, converted, f"{source} (conv kernels shown as kh, kw, in, out)", "VQGAN")


def vqgan_params_from_hf(arrays: Mapping[str, np.ndarray], cfg: VQGANConfig,
                         prefix: str = HF_PREFIX,
                         decoder_arrays: Mapping[str, np.ndarray] | None = None,
                         seed: int = 0) -> ImportedVQGAN:
    """The cm3jax VQGAN generator of Chameleon's VQ-VAE weights.

    Args:
      arrays: Hugging Face names -> arrays (torch layout); `prefix` + `encoder.*`,
        `quantize.embedding.weight`, `quant_conv.*`, `post_quant_conv.*` are read.
      cfg: a Chameleon-compatible config, e.g. from `vqgan_config_from_hf`.
      decoder_arrays: taming `decoder.*` arrays (Meta's vqgan.ckpt state dict; other keys are
        ignored). None: the decoder is initialised from `seed` and not imported.

    Raises:
      UserError: the config is not Chameleon-compatible, or an array is missing or misshapen
        (named).
    """
    check_chameleon_compatible(cfg)
    model = abstract_vqgan(cfg)
    variables = _params_by_path(model)
    names = _taming_names(cfg, variables)
    _fill_from(model, {prefix + names[p]: v for p, v in variables.items() if p[0] != "decoder"},
               arrays, "Chameleon VQ-VAE weights")
    if decoder_arrays is not None:
        _fill_from(model, {names[p]: v for p, v in variables.items() if p[0] == "decoder"},
                   decoder_arrays, "taming decoder weights")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if decoder_arrays is None:
        params["decoder"] = nnx.to_pure_dict(nnx.state(jit_create(Decoder, cfg, seed), nnx.Param))
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         nnx.to_pure_dict(nnx.state(model, CodebookStats)))
    return ImportedVQGAN(params, stats, decoder_imported=decoder_arrays is not None)


def _dotted(path: Path) -> str:
    return ".".join(map(str, path))


def _named_arrays(params: dict, cfg: VQGANConfig, decoder: bool) -> dict[str, np.ndarray]:
    """{taming name: torch-layout array} of the decoder's (or all other) parameters.

    Raises:
      UserError: the config is not Chameleon-compatible, or `params` is not the generator
        parameter tree of a VQGAN of `cfg` (differences named).
    """
    check_chameleon_compatible(cfg)
    want = {p: tuple(v.shape) for p, v in _params_by_path(abstract_vqgan(cfg)).items()}
    have = {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"{_dotted(p)} unexpected" for p in have if p not in want]
    problems += [f"{_dotted(p)} has shape {np.shape(have[p]) if p in have else 'missing'}, "
                 f"needs {shape}" for p, shape in want.items() if np.shape(have.get(p)) != shape]
    if problems:
        raise UserError("the parameters are not this config.vqgan's VQGAN: "
                        + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
    names = _taming_names(cfg, want)
    return {names[p]: _to_torch(have[p]) for p in want if (p[0] == "decoder") == decoder}


def vqgan_params_to_hf(params: dict, cfg: VQGANConfig,
                       prefix: str = HF_PREFIX) -> dict[str, np.ndarray]:
    """Hugging Face `ChameleonVQVAE` arrays (torch layout, under `prefix`) of a generator tree:
    encoder, quant_conv, codebook, post_quant_conv (Hugging Face has no decoder).

    Raises:
      UserError: the config is not Chameleon-compatible or the tree does not match it.
    """
    arrays = _named_arrays(params, cfg, decoder=False)
    return {prefix + name: array for name, array in arrays.items()}


def vqgan_decoder_to_taming(params: dict, cfg: VQGANConfig) -> dict[str, np.ndarray]:
    """The decoder of a generator tree as taming `decoder.*` arrays (Meta's vqgan.ckpt layout).

    Raises:
      UserError: the config is not Chameleon-compatible or the tree does not match it.
    """
    return _named_arrays(params, cfg, decoder=True)


def save_vqgan_workdir(workdir: str, vqgan_section: ml_collections.ConfigDict, params: dict,
                       stats: dict) -> None:
    """Writes a workdir `VQGANTokenizer.load` accepts: WORKDIR/config.json (task 'vqgan', this
    vqgan section) and an Orbax checkpoint at checkpoints/0/state holding
    {"params": {"generator": params}, "stats": stats}.

    Raises:
      UserError: WORKDIR already holds a config.json or checkpoints, or the section is invalid.
    """
    workdir = os.path.abspath(os.fspath(workdir))  # Orbax refuses relative paths
    config_path = os.path.join(workdir, runs.CONFIG_FILE)
    if os.path.exists(config_path) or os.path.exists(os.path.join(workdir, runs.CHECKPOINT_DIR)):
        raise UserError(f"{workdir} already holds a run (config.json or checkpoints/): "
                        "choose an empty directory")
    cfg = VQGANConfig.from_config(vqgan_section)
    config = base_config()
    config.task = "vqgan"
    config.vqgan = ml_collections.ConfigDict(vqgan_section.to_dict())
    config.vocab.image_codes = cfg.codebook_size
    state = os.path.join(workdir, runs.CHECKPOINT_DIR, "0", runs.STATE_ITEM)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(state, args=ocp.args.PyTreeSave({"params": {"generator": params},
                                                            "stats": stats}))
    with open(config_path, "w") as f:
        json.dump(config.to_dict(), f, indent=2)
