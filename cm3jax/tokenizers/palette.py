"""A palette (colour-quantisation) image tokenizer: the stand-in for the VQGAN until it lands.

Each `downsample` x `downsample` patch becomes one code: the index of the palette colour
nearest (in RGB) to the patch mean. Decoding paints each patch with its colour. With
`downsample=1` on images drawn only in palette colours (the shapes benchmark) encoding
is exact and decoding inverts it pixel for pixel; on natural images it is a real, lossy
colour quantiser. It shares the image-tokenizer interface the VQGAN service will have:
`encode(images) -> codes`, `decode(codes) -> images`, `codebook_size`, `grid`.
"""

from __future__ import annotations

import json

import numpy as np

from cm3jax.errors import UserError


class PaletteTokenizer:
    """uint8 [B, H, W, 3] images <-> int32 [B, H/f, W/f] palette codes."""

    kind = "palette"

    def __init__(self, palette, resolution: int, downsample: int = 1):
        self.palette = np.asarray(palette, np.uint8).reshape(-1, 3)
        if len(self.palette) < 2:
            raise UserError("palette tokenizer needs at least 2 colours")
        if resolution % downsample:
            raise UserError(f"image resolution {resolution} is not divisible by downsample={downsample}")
        self.resolution, self.downsample = resolution, downsample

    @property
    def codebook_size(self) -> int:
        return len(self.palette)

    @property
    def grid(self) -> int:
        """Codes per image side."""
        return self.resolution // self.downsample

    @property
    def codes_per_image(self) -> int:
        return self.grid**2

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images [B, R, R, 3] (or one [R, R, 3]) -> codes [B, g, g] (or [g, g])."""
        images = np.asarray(images)
        single = images.ndim == 3
        images = images[None] if single else images
        if images.shape[1:] != (self.resolution, self.resolution, 3):
            raise UserError(f"palette tokenizer expects {self.resolution}x{self.resolution} RGB images, "
                            f"got shape {images.shape[1:]}")
        f, g = self.downsample, self.grid
        patches = images.reshape(len(images), g, f, g, f, 3).astype(np.float32).mean(axis=(2, 4))
        distances = ((patches[..., None, :] - self.palette.astype(np.float32)) ** 2).sum(-1)
        codes = distances.argmin(-1).astype(np.int32)
        return codes[0] if single else codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [B, g, g] (or [g, g]) -> images [B, R, R, 3] uint8."""
        codes = np.clip(np.asarray(codes), 0, self.codebook_size - 1)
        images = self.palette[codes]
        f = self.downsample
        return images.repeat(f, axis=-3).repeat(f, axis=-2)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "palette": self.palette.tolist(),
                           "resolution": self.resolution, "downsample": self.downsample})

    @classmethod
    def from_json(cls, text: str) -> "PaletteTokenizer":
        d = json.loads(text)
        return cls(d["palette"], d["resolution"], d["downsample"])
