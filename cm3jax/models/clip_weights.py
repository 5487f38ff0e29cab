"""Import a CLIP checkpoint (the key layout of `transformers.CLIPModel`) into `DualEncoder`.

Sources: a state dict (torch tensors or arrays), a .safetensors / .bin / .pth file, or a
`save_pretrained` directory (config.json + single or sharded weights). The architecture is
read from the tensor shapes plus config.json (heads, activation, eps, eos); without one,
OpenAI CLIP is assumed. Nothing is ever downloaded. OpenAI / open_clip checkpoints are
converted to this layout first with transformers' convert_clip_original_pytorch_to_hf.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3jax.errors import ConfigError, UserError
from cm3jax.models.torch_state import read_torch_state_dict
from cm3jax.models.dual_encoder import DualEncoder, DualEncoderConfig, TowerDims, abstract_dual_encoder

# State-dict keys of a transformers.CLIPModel that carry no weights (older checkpoints store them).
_BUFFERS = frozenset({"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"})
_TEXT_LAYERS, _VISION_LAYERS = "text_model.encoder.layers", "vision_model.encoder.layers"
# transformers.CLIPTextConfig's eos_token_id default; 2 is its marker for "largest id" pooling.
_HF_DEFAULT_EOS, _HF_LEGACY_EOS = 49407, 2


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _linear(*shape: int):
    """torch Linear weight [out, in] -> kernel [in, out] reshaped to `shape`."""
    return lambda a: a.T.reshape(shape)


def _layer_layout(dims: TowerDims) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """Per-layer key suffix -> (path inside EncoderLayer, torch shape, torch -> cm3jax)."""
    w, h, m = dims.width, dims.heads, dims.mlp_dim
    layout = {}
    for torch_name, name in (("q", "query"), ("k", "key"), ("v", "value")):
        layout[f"self_attn.{torch_name}_proj.weight"] = (("attention", name, "kernel"), (w, w),
                                                         _linear(w, h, w // h))
        layout[f"self_attn.{torch_name}_proj.bias"] = (("attention", name, "bias"), (w,),
                                                       lambda a: a.reshape(h, w // h))
    layout["self_attn.out_proj.weight"] = (("attention", "out", "kernel"), (w, w),
                                           _linear(h, w // h, w))
    layout["self_attn.out_proj.bias"] = (("attention", "out", "bias"), (w,), _identity)
    for torch_name, name in (("layer_norm1", "attention_norm"), ("layer_norm2", "mlp_norm")):
        layout[f"{torch_name}.weight"] = ((name, "scale"), (w,), _identity)
        layout[f"{torch_name}.bias"] = ((name, "bias"), (w,), _identity)
    for fc, out, inp in (("fc1", m, w), ("fc2", w, m)):
        layout[f"mlp.{fc}.weight"] = ((fc, "kernel"), (out, inp), _linear(inp, out))
        layout[f"mlp.{fc}.bias"] = ((fc, "bias"), (out,), _identity)
    return layout


def _clip_layout(cfg: DualEncoderConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
    """Every non-layer key of a CLIPModel state dict -> (cm3jax path, torch shape, converter)."""
    tw, vw, p, proj = cfg.text_width, cfg.vision_width, cfg.patch_size, cfg.projection_dim
    layout = {
        "text_model.embeddings.token_embedding.weight": (("text", "token_embedding"),
                                                         (cfg.text_vocab_size, tw), _identity),
        "text_model.embeddings.position_embedding.weight": (("text", "position_embedding"),
                                                            (cfg.text_max_len, tw), _identity),
        "text_projection.weight": (("text", "projection", "kernel"), (proj, tw), _linear(tw, proj)),
        "vision_model.embeddings.class_embedding": (("vision", "class_embedding"), (vw,),
                                                    _identity),
        "vision_model.embeddings.patch_embedding.weight": (
            ("vision", "patch_embedding"), (vw, 3, p, p), lambda a: a.transpose(2, 3, 1, 0)),
        "vision_model.embeddings.position_embedding.weight": (("vision", "position_embedding"),
                                                              (cfg.grid**2 + 1, vw), _identity),
        "visual_projection.weight": (("vision", "projection", "kernel"), (proj, vw),
                                     _linear(vw, proj)),
        "logit_scale": (("logit_scale",), (), _identity),
    }
    norms = (("text_model.final_layer_norm", ("text", "final_norm"), tw),
             ("vision_model.pre_layrnorm", ("vision", "pre_norm"), vw),  # sic, as transformers
             ("vision_model.post_layernorm", ("vision", "post_norm"), vw))
    for key, path, width in norms:
        layout[f"{key}.weight"] = (path + ("scale",), (width,), _identity)
        layout[f"{key}.bias"] = (path + ("bias",), (width,), _identity)
    return layout


def _all_keys(cfg: DualEncoderConfig) -> dict[str, tuple[int, ...]]:
    """The torch shape of every key a CLIPModel of this architecture has."""
    shapes = {key: shape for key, (_, shape, _) in _clip_layout(cfg).items()}
    for prefix, dims in ((_TEXT_LAYERS, cfg.text_dims), (_VISION_LAYERS, cfg.vision_dims)):
        for i in range(dims.depth):
            shapes |= {f"{prefix}.{i}.{k}": s for k, (_, s, _) in _layer_layout(dims).items()}
    return shapes


def _listing(keys: list[str], limit: int = 6) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_keys(state: Mapping[str, np.ndarray], cfg: DualEncoderConfig, source: str) -> None:
    """UserError naming missing, unexpected or misshapen keys."""
    expected = _all_keys(cfg)
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"{source}: missing CLIP weights {_listing(missing)}")
    unexpected = [k for k in state if k not in expected and k not in _BUFFERS]
    if unexpected:
        raise UserError(f"{source}: unexpected keys {_listing(unexpected)} (expected the key "
                        "layout of transformers.CLIPModel; convert OpenAI / open_clip checkpoints "
                        "with transformers' convert_clip_original_pytorch_to_hf.py)")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(f"{source}: {key} has shape {tuple(state[key].shape)}, the "
                            f"configured architecture needs {shape}")


def _set_path(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _convert(state: Mapping[str, np.ndarray], cfg: DualEncoderConfig) -> dict:
    """A checked CLIPModel state dict -> DualEncoder parameters (nnx.to_pure_dict layout)."""
    dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    for key, (path, _, convert) in _clip_layout(cfg).items():
        _set_path(params, path, convert(state[key]).astype(dtype))
    for prefix, tower, dims in ((_TEXT_LAYERS, "text", cfg.text_dims),
                                (_VISION_LAYERS, "vision", cfg.vision_dims)):
        for suffix, (path, _, convert) in _layer_layout(dims).items():
            stacked = np.stack([convert(state[f"{prefix}.{i}.{suffix}"])
                                for i in range(dims.depth)])
            _set_path(params, (tower, "encoder", "layers") + path, stacked.astype(dtype))
    return params


def _shape(state: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise UserError(f"{source}: missing CLIP weight {key} (needed to infer the architecture)")
    return tuple(state[key].shape)


def _depth(state: Mapping[str, np.ndarray], prefix: str, source: str) -> int:
    found = [int(m[1]) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))]
    if not found:
        raise UserError(f"{source}: no {prefix}.N.* weights")
    return max(found) + 1


def _infer_config(state: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
                  source: str) -> DualEncoderConfig:
    """The architecture of a CLIPModel state dict; heads and the rest from config.json if any.

    Without a config.json: heads = width // 64, quick-GELU, eps 1e-5, largest-id pooling
    (OpenAI CLIP); pass an explicit config for anything else.
    """
    text, vision = hf_config.get("text_config") or {}, hf_config.get("vision_config") or {}
    vocab, text_width = _shape(state, "text_model.embeddings.token_embedding.weight", source)
    vision_width, _, patch, _ = _shape(state, "vision_model.embeddings.patch_embedding.weight",
                                       source)
    positions = _shape(state, "vision_model.embeddings.position_embedding.weight", source)[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise UserError(f"{source}: vision position embedding has {positions} rows, not a "
                        "square grid plus the class token")
    activations = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    eps = {text.get("layer_norm_eps", 1e-5), vision.get("layer_norm_eps", 1e-5)}
    if len(activations) > 1 or len(eps) > 1:
        raise UserError(f"{source}: text and vision towers differ in hidden_act or layer_norm_eps "
                        f"({activations}, {eps}); the dual encoder has one of each")
    eos = text.get("eos_token_id", _HF_DEFAULT_EOS) if hf_config else _HF_LEGACY_EOS
    values = dict(
        text_vocab_size=vocab,
        text_max_len=_shape(state, "text_model.embeddings.position_embedding.weight", source)[0],
        text_width=text_width,
        text_layers=text.get("num_hidden_layers") or _depth(state, _TEXT_LAYERS, source),
        text_heads=text.get("num_attention_heads") or max(text_width // 64, 1),
        text_mlp_dim=_shape(state, f"{_TEXT_LAYERS}.0.mlp.fc1.weight", source)[0],
        text_pooling="eos",
        eos_token_id=-1 if eos == _HF_LEGACY_EOS else eos,
        vision_input="pixels",
        image_size=grid * patch,
        patch_size=patch,
        vision_width=vision_width,
        vision_layers=vision.get("num_hidden_layers") or _depth(state, _VISION_LAYERS, source),
        vision_heads=vision.get("num_attention_heads") or max(vision_width // 64, 1),
        vision_mlp_dim=_shape(state, f"{_VISION_LAYERS}.0.mlp.fc1.weight", source)[0],
        projection_dim=_shape(state, "text_projection.weight", source)[0],
        activation=activations.pop(),
        norm_eps=float(eps.pop()),
    )
    try:
        return DualEncoderConfig(**values)
    except ConfigError as e:
        raise UserError(f"{source}: unsupported CLIP architecture: {e}") from e


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor (also bfloat16 / float16 ones)
        return value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


def _read_weights_file(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file (safetensors) or a torch.save'd state dict (torch, weights only)."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise UserError(f"reading {path} needs the safetensors package") from e
        try:
            return {k: _to_numpy(v) for k, v in load_file(path).items()}
        except Exception as e:  # safetensors raises its own error types on bad files
            raise UserError(f"{path}: not a readable .safetensors file ({e})") from e
    return read_torch_state_dict(path, "use a .safetensors file instead")


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _read_directory(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(weights, config.json) of a `save_pretrained` directory (single file or sharded)."""
    config_path = os.path.join(path, "config.json")
    hf_config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            hf_config = json.load(f)
    for name in _WEIGHT_FILES:
        index = os.path.join(path, f"{name}.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                state |= _read_weights_file(os.path.join(path, shard))
            return state, hf_config
        if os.path.isfile(os.path.join(path, name)):
            return _read_weights_file(os.path.join(path, name)), hf_config
    raise UserError(f"{path}: no {' or '.join(_WEIGHT_FILES)} (or a sharded index) "
                    "in the directory")


def _read_source(source: Mapping[str, Any] | str | os.PathLike) -> tuple[dict, dict, str]:
    """(float32 numpy state dict, HF config dict or {}, name for messages) of any source."""
    if isinstance(source, Mapping):
        return {str(k): _to_numpy(v) for k, v in source.items()}, {}, "CLIP state dict"
    path = os.fspath(source)
    if os.path.isdir(path):
        return (*_read_directory(path), path)
    if not os.path.isfile(path):
        raise UserError(f"CLIP weights {path} do not exist (a file or a save_pretrained directory)")
    return _read_weights_file(path), {}, path


def load_clip_state_dict(source: Mapping[str, Any] | str | os.PathLike,
                         cfg: DualEncoderConfig | None = None) -> tuple[DualEncoderConfig, dict]:
    """Converts a transformers.CLIPModel checkpoint into DualEncoder parameters.

    Args:
      source: a state dict (torch tensors or arrays, keys of `CLIPModel.state_dict()`), a
        .safetensors / .bin / .pth file of one, or a `save_pretrained` directory (config.json +
        model.safetensors / pytorch_model.bin, possibly sharded). Nothing is downloaded.
      cfg: the architecture; None infers it from the tensors and config.json (see
        `_infer_config`: without config.json, heads are width // 64).

    Returns:
      (config, parameters as a pure dict in `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
      layout, numpy arrays in cfg.param_dtype).

    Raises:
      UserError: unreadable source, missing or unexpected keys or wrong shapes (named).
    """
    state, hf_config, name = _read_source(source)
    cfg = cfg or _infer_config(state, hf_config, name)
    if cfg.vision_input != "pixels":
        raise UserError(f"{name}: CLIP weights need vision_input='pixels', "
                        f"got {cfg.vision_input!r}")
    _check_keys(state, cfg, name)
    return cfg, _convert(state, cfg)


def load_clip(source: Mapping[str, Any] | str | os.PathLike,
              cfg: DualEncoderConfig | None = None) -> DualEncoder:
    """A DualEncoder holding a transformers.CLIPModel checkpoint (see `load_clip_state_dict`)."""
    cfg, params = load_clip_state_dict(source, cfg)
    return nnx.merge(nnx.graphdef(abstract_dual_encoder(cfg)), jax.tree.map(jnp.asarray, params))
