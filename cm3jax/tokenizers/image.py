"""The VQGAN image tokenizer service, loaded from a `task='vqgan'` training workdir.

`VQGANTokenizer.load(workdir, step=None)` reads WORKDIR/config.json (the VQGAN architecture
is `config['vqgan']`), builds the model abstractly (no parameter is initialised) and restores
only `params['generator']` and `stats` from WORKDIR/checkpoints/<step>/state, the newest
complete checkpoint unless `step` is given. The restore is an Orbax *partial* restore
(`PyTreeRestore(item=..., partial_restore=True)`): the discriminator, the optimiser states
and the data iterator in the checkpoint are never read, so their structure need not be known.

It has the image-tokenizer interface of `PaletteTokenizer`: `encode(uint8 images) -> int32
codes`, `decode(codes) -> uint8 images`, `codebook_size`, `grid`, `codes_per_image`,
`to_json` / `from_json` and `kind`. Pixels map to the model's [-1, 1] as x / 127.5 - 1 and
back by clipping to [0, 255] and rounding. Images are processed in chunks of `batch_size`;
a smaller remainder is padded to the next power of two (at most `batch_size`), so at most
log2(batch_size) + 1 programs are compiled per direction and any number of images works.

`load_image_tokenizer(path_or_json)` reads an `image_tokenizer.json` of either kind.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3jax import runs
from cm3jax.errors import UserError
from cm3jax.models.quantizer import CodebookStats
from cm3jax.models.vqgan import VQGAN, VQGANConfig
from cm3jax.tokenizers.palette import PaletteTokenizer

def images_to_float(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 pixels [..., 3] -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def float_to_images(x: jax.Array) -> jax.Array:
    """Model output in about [-1, 1] -> uint8 pixels (scaled to [0, 255], clipped, rounded)."""
    return jnp.round(jnp.clip((x.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def read_vqgan_config(workdir: str) -> VQGANConfig:
    """The VQGANConfig of WORKDIR/config.json (`config['vqgan']`); UserError if absent."""
    section = runs.read_section(workdir, "vqgan", "VQGAN training")
    fields = VQGANConfig.__dataclass_fields__
    return VQGANConfig(**{k: v for k, v in section.items() if k in fields})


def abstract_vqgan(cfg: VQGANConfig) -> VQGAN:
    """A VQGAN of `cfg` holding shapes only (`nnx.eval_shape`: nothing initialised)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: VQGAN(cfg, rngs=nnx.Rngs(params=0)))


def restore_generator(state_path: str, cfg: VQGANConfig) -> VQGAN:
    """A VQGAN holding `params['generator']` and `stats` of an Orbax train-state directory.

    The model is built with `nnx.eval_shape` (nothing initialised); Orbax reads only those
    arrays (`runs.restore_arrays`) onto the first local device.
    """
    graphdef, params, stats = nnx.split(abstract_vqgan(cfg), nnx.Param, CodebookStats)
    item = {"params": {"generator": runs.on_first_device(nnx.to_pure_dict(params))},
            "stats": runs.on_first_device(nnx.to_pure_dict(stats))}
    restored = runs.restore_arrays(state_path, item, "VQGAN generator", "vqgan")
    nnx.replace_by_pure_dict(params, restored["params"]["generator"])
    nnx.replace_by_pure_dict(stats, restored["stats"])
    return nnx.merge(graphdef, params, stats)


class VQGANTokenizer:
    """uint8 [B, R, R, 3] images <-> int32 [B, g, g] VQGAN codes (g = R / downsample)."""

    kind = "vqgan"

    def __init__(self, model: VQGAN, workdir: str, step: int, batch_size: int = 64):
        if batch_size < 1:
            raise UserError(f"VQGAN tokenizer batch_size must be positive, got {batch_size}")
        self.cfg: VQGANConfig = model.cfg
        self.workdir, self.step, self.batch_size = workdir, int(step), int(batch_size)
        graphdef, state = nnx.split(model)

        def encode(state, images):
            return nnx.merge(graphdef, state).encode(images_to_float(images))[1].astype(jnp.int32)

        def decode(state, codes):
            return float_to_images(nnx.merge(graphdef, state).decode_codes(codes))

        self._state = state
        self._encode, self._decode = jax.jit(encode), jax.jit(decode)

    @classmethod
    def load(cls, workdir: str, step: int | None = None, batch_size: int = 64) -> "VQGANTokenizer":
        """The generator of WORKDIR's newest complete checkpoint (or of `step`).

        Raises:
          UserError: no config.json with a 'vqgan' section, no such checkpoint, or a
            checkpoint that does not match the config.
        """
        workdir = os.path.abspath(os.fspath(workdir))
        cfg = read_vqgan_config(workdir)
        step, path = runs.state_path(workdir, step, "VQGAN")
        return cls(restore_generator(path, cfg), workdir, step, batch_size)

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def grid(self) -> int:
        """Codes per image side."""
        return self.cfg.grid

    @property
    def codes_per_image(self) -> int:
        return self.grid**2

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images uint8 [B, R, R, 3] (or one [R, R, 3]) -> int32 codes [B, g, g] (or [g, g])."""
        images = np.asarray(images)
        r, c = self.resolution, self.cfg.in_channels
        single = images.ndim == 3
        batch = images[None] if single else images
        if batch.ndim != 4 or batch.shape[1:] != (r, r, c):
            raise UserError(f"VQGAN tokenizer expects uint8 images of shape [batch, {r}, {r}, {c}] "
                            f"or [{r}, {r}, {c}], got shape {images.shape}")
        if batch.dtype != np.uint8:
            raise UserError(f"VQGAN tokenizer expects uint8 images [batch, {r}, {r}, {c}], "
                            f"got dtype {images.dtype}")
        codes = self._batched(self._encode, batch, np.int32, (self.grid, self.grid))
        return codes[0] if single else codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [B, g, g] (or [g, g]) -> uint8 images [B, R, R, 3] (out-of-range codes clip)."""
        codes = np.asarray(codes)
        g = self.grid
        single = codes.ndim == 2
        batch = codes[None] if single else codes
        integer = np.issubdtype(batch.dtype, np.integer)
        if batch.ndim != 3 or batch.shape[1:] != (g, g) or not integer:
            raise UserError(f"VQGAN tokenizer expects integer codes of shape [batch, {g}, {g}] "
                            f"or [{g}, {g}], got {codes.dtype} {codes.shape}")
        batch = np.clip(batch, 0, self.codebook_size - 1).astype(np.int32)
        r = self.resolution
        images = self._batched(self._decode, batch, np.uint8, (r, r, self.cfg.in_channels))
        return images[0] if single else images

    def _batched(self, fn: Callable, inputs: np.ndarray, dtype, item_shape: tuple) -> np.ndarray:
        """fn(state, chunk) over chunks of batch_size, the last padded to a power of two."""
        out = np.empty((len(inputs), *item_shape), dtype)
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            n = len(chunk)
            padded = min(self.batch_size, 1 << (n - 1).bit_length())
            if padded > n:
                pad = np.zeros((padded - n, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out[start:start + n] = np.asarray(fn(self._state, chunk))[:n]
        return out

    def to_json(self) -> str:
        """{"kind": "vqgan", "workdir", "step", ...}; the checkpoint is read back by from_json."""
        return json.dumps({"kind": self.kind, "workdir": self.workdir, "step": self.step,
                           "batch_size": self.batch_size, "resolution": self.resolution,
                           "grid": self.grid, "codebook_size": self.codebook_size})

    @classmethod
    def from_json(cls, text: str) -> "VQGANTokenizer":
        """Reloads the checkpoint a `to_json` names; UserError if it changed shape."""
        d = json.loads(text)
        tokenizer = cls.load(d["workdir"], d["step"], d.get("batch_size", 64))
        for key in ("resolution", "grid", "codebook_size"):
            if key in d and d[key] != getattr(tokenizer, key):
                raise UserError(f"VQGAN checkpoint {d['workdir']} step {d['step']} has {key}="
                                f"{getattr(tokenizer, key)}, the tokenizer JSON says {d[key]}")
        return tokenizer


def load_image_tokenizer(path_or_json: str | os.PathLike) -> PaletteTokenizer | VQGANTokenizer:
    """The image tokenizer of an `image_tokenizer.json`: its text, its path, or its directory.

    Dispatches on the JSON's 'kind' ('palette' or 'vqgan'); UserError otherwise.
    """
    text = os.fspath(path_or_json)
    if not text.lstrip().startswith("{"):
        path = os.path.join(text, "image_tokenizer.json") if os.path.isdir(text) else text
        if not os.path.isfile(path):
            raise UserError(f"image tokenizer file {path} does not exist")
        with open(path) as f:
            text = f.read()
    try:
        kind = json.loads(text).get("kind")
    except (ValueError, AttributeError) as e:
        raise UserError(f"not an image tokenizer JSON: {text[:80]!r}") from e
    classes = {PaletteTokenizer.kind: PaletteTokenizer, VQGANTokenizer.kind: VQGANTokenizer}
    if kind not in classes:
        raise UserError(f"unknown image tokenizer kind {kind!r} (known: {', '.join(classes)})")
    return classes[kind].from_json(text)
