"""The retrieval encoder service: a trained dual encoder embedding documents and queries.

`RetrievalEncoder.load(workdir)` reads a `task='retriever'` run (architecture from
`config['retriever']`, parameters by a partial restore of its newest checkpoint) and embeds
in batches, the batch split over this host's devices (so each host of a multi-host job
embeds its own documents with no cross-host traffic). Embeddings are L2-normalised per
modality; a document holding text and an image is the mean of its two embeddings
(CM3leon / RA-CM3), a one-modality document is that modality's embedding.

Text is the LM's own text ids (right-padded, truncated to `text_max_len`); images are
VQGAN codes [N, g, g] for a `vision_input='codes'` encoder or uint8 RGB [N, R, R, 3]
for `'pixels'`. `checksum` identifies the parameters, so an index refuses queries from
another encoder.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax import runs
from cm3jax.errors import UserError
from cm3jax.models import dual_encoder as de

BATCH_AXIS = "batch"


def params_checksum(params: dict) -> str:
    """A short hash of a parameter tree's names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda p: str(p[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class RetrievalEncoder:
    """Embeds texts, images and text+image documents with a trained dual encoder."""

    def __init__(self, model: de.DualEncoder, source: str, batch_size: int = 256):
        self.cfg: de.DualEncoderConfig = model.cfg
        self.source = source
        graphdef, params = nnx.split(model, nnx.Param)
        self.checksum = params_checksum(nnx.to_pure_dict(params))
        devices = jax.local_devices()
        self.mesh = Mesh(np.asarray(devices), (BATCH_AXIS,))
        # Chunks are a multiple of the device count, so every device gets an equal slice.
        self.batch_size = max(len(devices), batch_size - batch_size % len(devices))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._params = jax.device_put(params, replicated)
        image_input = ((lambda x: x) if self.cfg.vision_input == "codes"
                       else (lambda x: de.clip_pixels(x, self.cfg.image_size)))

        def text(params, ids, mask):
            return nnx.merge(graphdef, params).encode_text(ids, mask)

        def image(params, images):
            return nnx.merge(graphdef, params).encode_image(image_input(images))

        self._text, self._image = jax.jit(text), jax.jit(image)

    @classmethod
    def load(cls, workdir: str, step: int | None = None, batch_size: int = 256) -> "RetrievalEncoder":
        """The dual encoder of a `task='retriever'` run's newest complete checkpoint (or `step`).

        Raises:
          UserError: not a retriever workdir, no such checkpoint, or one of another shape.
        """
        workdir = os.path.abspath(os.fspath(workdir))
        section = runs.read_section(workdir, "retriever", "retriever training")
        cfg = de.DualEncoderConfig.from_config(ml_collections.ConfigDict(section))
        step, path = runs.state_path(workdir, step, "retriever")
        graphdef, params = nnx.split(de.abstract_dual_encoder(cfg), nnx.Param)
        item = {"params": runs.on_first_device(nnx.to_pure_dict(params))}
        restored = runs.restore_arrays(path, item, "dual encoder", "retriever")
        nnx.replace_by_pure_dict(params, restored["params"])
        return cls(nnx.merge(graphdef, params), f"{workdir}@{step}", batch_size)

    @property
    def dim(self) -> int:
        """Embedding size."""
        return self.cfg.projection_dim

    # --- embedding ------------------------------------------------------------------------

    def text_arrays(self, texts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Token id sequences -> right-padded ids and mask [N, text_max_len] (truncated)."""
        n, length = len(texts), self.cfg.text_max_len
        ids, mask = np.zeros((n, length), np.int32), np.zeros((n, length), np.int32)
        for row, text in enumerate(texts):
            text = np.asarray(text, np.int64)[:length]
            if text.size and (text.min() < 0 or text.max() >= self.cfg.text_vocab_size):
                raise UserError(f"text {row} holds ids outside [0, {self.cfg.text_vocab_size}) "
                                "(the retriever embeds text ids of the LM's vocab only)")
            ids[row, : text.size], mask[row, : text.size] = text, 1
        return ids, mask

    def embed_texts(self, texts: Sequence[np.ndarray]) -> np.ndarray:
        """Token id sequences -> L2-normalised float32 embeddings [N, dim] (empty text -> 0)."""
        ids, mask = self.text_arrays(texts)
        embeddings = self._batched(lambda p, i, m: self._text(p, i, m), ids, mask)
        return np.where(mask.any(axis=1, keepdims=True), embeddings, 0.0).astype(np.float32)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Codes [N, g, g] or uint8 pixels [N, R, R, 3] -> L2-normalised float32 [N, dim]."""
        images = np.asarray(images)
        cfg = self.cfg
        expected = ((cfg.code_grid, cfg.code_grid) if cfg.vision_input == "codes"
                    else (cfg.image_size, cfg.image_size, 3))
        if images.ndim != len(expected) + 1 or (cfg.vision_input == "codes" and images.shape[1:] != expected):
            raise UserError(f"images must be [N, {', '.join(map(str, expected))}] for this retriever "
                            f"(vision_input={cfg.vision_input!r}), got shape {images.shape}")
        if cfg.vision_input == "codes":
            if not np.issubdtype(images.dtype, np.integer):
                raise UserError(f"codes must be integers, got dtype {images.dtype}")
            if images.size and (images.min() < 0 or images.max() >= cfg.codebook_size):
                raise UserError(f"codes outside [0, {cfg.codebook_size}) (this retriever's codebook_size)")
        return self._batched(lambda p, x: self._image(p, x), images)

    def embed_documents(self, texts: Sequence[np.ndarray], images: np.ndarray,
                        has_image: np.ndarray | None = None) -> np.ndarray:
        """Mean of the text and image embeddings of each document, re-normalised ([N, dim] float32).

        `has_image[i]=False` marks a text-only document (its image row is ignored); a
        document with empty text is its image embedding. See `document_embeddings`.
        """
        has_text = np.asarray([len(t) > 0 for t in texts])
        has_image = np.ones(len(texts), bool) if has_image is None else np.asarray(has_image, bool)
        return document_embeddings(self.embed_texts(texts), self.embed_images(images), has_text, has_image)

    def _batched(self, fn: Callable, *arrays: np.ndarray) -> np.ndarray:
        """Runs `fn(params, *chunk)` over chunks of `batch_size` rows, the last one padded."""
        n = len(arrays[0])
        out = np.zeros((n, self.dim), np.float32)
        sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        for start in range(0, n, self.batch_size):
            chunk = [a[start: start + self.batch_size] for a in arrays]
            rows = len(chunk[0])
            size = self.batch_size if rows > self.batch_size // 2 else _bucket(rows, len(self.mesh.devices))
            padded = [jax.device_put(np.concatenate([c, np.zeros((size - rows, *c.shape[1:]), c.dtype)]), sharding)
                      for c in chunk]
            out[start: start + rows] = np.asarray(fn(self._params, *padded))[:rows]
        return out


def _bucket(rows: int, multiple: int) -> int:
    """The smallest power-of-two multiple of `multiple` holding `rows` (bounded recompiles)."""
    size = multiple
    while size < rows:
        size *= 2
    return size


def document_embeddings(text: np.ndarray, image: np.ndarray, has_text: np.ndarray,
                        has_image: np.ndarray) -> np.ndarray:
    """Documents from their text and image embeddings [N, dim]: the re-normalised mean of both,
    or the one a document has.

    Re-normalising keeps every score a cosine, so the policy's thresholds (0.9) mean the same
    for documents, texts and images.
    """
    if not np.all(has_text | has_image):
        raise UserError("a document with neither text nor an image cannot be embedded")
    mean = text + image
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    both = (has_text & has_image)[:, None]
    return np.where(both, mean, np.where(has_text[:, None], text, image)).astype(np.float32)

