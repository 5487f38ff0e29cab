"""Dense index over document embeddings: maximum-inner-product search, exact or IVF.

    index = DenseIndex.build(embeddings, ids, encoder_checksum=encoder_hash)    # [N, D], [N]
    scores, ids = index.search(queries, k=2, exclude_ids=query_doc_ids)        # [Q, k] each
    index.save(workdir / "index")
    index = DenseIndex.load(workdir / "index", expected_encoder_checksum=encoder_hash)

Results: scores float32 in descending order, ids int64 (the caller's ids, not row numbers);
equal scores keep the lower row first. When fewer than k rows qualify (k > N, an excluded
row, an IVF probe that reaches fewer rows) the tail is padded with score -inf and id -1, so
batch shapes never depend on the data. `exclude_ids` ([Q], one id per query, -1 or any id
not in the index for none) removes a query's own document before the top-k is taken.

Modes (stored with the index):
- exact: rows sharded over every axis of a mesh (default: 1-D over `jax.devices()`), so the
  memory may exceed one device; a blocked matmul + running top-k per device (exact.py).
- ivf: spherical k-means trained in JAX into `nlist` inverted lists; a search probes the
  `nprobe` lists whose centroids score highest, and nprobe >= nlist returns the exact
  results (ivf.py). IVF data lives on one device.

Backends (chosen at build / load time, not stored): 'jax' (default), 'faiss'
(IndexFlatIP / IndexIVFFlat on the same centroids) and 'scann' (brute force / its own tree
with the same nlist), the last two only when installed (backends.py). The files on disk are
the same for every backend (index_io.py): plain .npy arrays and a JSON manifest that
records the checksum of the encoder that made the embeddings; loading refuses an index from
another encoder, and a search refuses queries of another dimension.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from cm3jax.errors import UserError
from cm3jax.retrieval.backends import FaissSearcher, ScannSearcher
from cm3jax.retrieval.exact import MATMUL_DTYPES, ExactSearcher
from cm3jax.retrieval.index_io import (
    MODES,
    STORAGE_DTYPES,
    make_manifest,
    read_arrays,
    read_manifest,
    write_index,
)
from cm3jax.retrieval.ivf import IvfLists, IvfSearcher, build_ivf, spherical_kmeans

__all__ = [
    "BACKENDS",
    "MODES",
    "DenseIndex",
    "IvfLists",
    "SearchOptions",
    "build_ivf",
    "spherical_kmeans",
]

BACKENDS = ("jax", "faiss", "scann")
ROW_AXIS = "rows"


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How an index is searched; not stored with it, chosen again at every build or load.

    Attributes:
      backend: 'jax', 'faiss' or 'scann' (the last two need their package installed).
      nprobe: IVF lists probed per query (values above nlist probe every list).
      mesh: jax exact mode: rows are sharded over all axes of this mesh
        (default: a 1-D mesh over `jax.devices()`). IVF uses its first device.
      block_rows: jax exact mode: rows scored per matmul block on each device.
      query_batch: jax: the largest query batch compiled; larger batches are split, smaller
        ones padded to one of four sizes per doubling (>= 8, at most 25% padding), so
        about 4 x log2(query_batch / 8) shapes at most compile per k.
      matmul_dtype: jax exact mode: 'float32' (exact) or 'bfloat16' (about 1.4x faster on
        a CPU with AVX512-BF16: scores in bf16, then each device re-scores its best
        k + max(k, 32) rows in float32; returned scores are float32-exact, but a true
        top-k row whose bf16 score falls below that pool is missed).
    """

    backend: str = "jax"
    nprobe: int = 8
    mesh: Mesh | None = None
    block_rows: int = 4096
    query_batch: int = 1024
    matmul_dtype: str = "float32"

    def check(self, mode: str) -> None:
        """Raises UserError for an unknown backend, a bad size, or bf16 outside jax exact."""
        if self.backend not in BACKENDS:
            raise UserError(f"index backend {self.backend!r}: expected one of {BACKENDS}")
        for name in ("nprobe", "block_rows", "query_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"index option {name}={value!r}: expected a positive integer")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise UserError(
                f"index option matmul_dtype={self.matmul_dtype!r}: expected one of "
                f"{tuple(MATMUL_DTYPES)}"
            )
        if self.matmul_dtype != "float32" and (self.backend != "jax" or mode != "exact"):
            raise UserError(
                f"index option matmul_dtype={self.matmul_dtype!r} applies to the jax "
                f"backend's exact mode only (this index: backend {self.backend!r}, mode {mode!r})"
            )


class _Searcher(Protocol):
    """A backend: top-k row positions (-1 for none) for float32 queries."""

    sharding: jax.sharding.Sharding | None

    def search(
        self, queries: np.ndarray, exclude_rows: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


def default_nlist(count: int) -> int:
    """IVF lists for `count` rows: the power of two nearest 4 sqrt(count), at most `count`.

    On CLIP-like embeddings (benchmarks/index.py) this reached recall@10 0.95 scanning 2.8%
    of 100k rows; sqrt(N) lists needed far more rows scanned for the same recall.
    """
    target = 4.0 * np.sqrt(max(count, 1))
    return int(min(count, max(1, 2 ** round(np.log2(target)))))


class DenseIndex:
    """Maximum-inner-product index over [N, D] embeddings with int64 ids.

    Create one with `DenseIndex.build` or `DenseIndex.load`; the constructor wraps existing
    parts (for example another backend over the same IVF lists) and checks them again.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: np.ndarray,
        *,
        encoder_checksum: str,
        ivf: IvfLists | None = None,
        options: SearchOptions = SearchOptions(),
        created: str | None = None,
    ):
        """Wraps checked embeddings [N, D] (float32/float16), ids [N] and optional IVF lists."""
        embeddings, ids = _check_rows(embeddings, ids)
        if not isinstance(encoder_checksum, str) or not encoder_checksum:
            raise UserError("encoder_checksum must be a non-empty string (a hash of the encoder)")
        if ivf is not None:
            ivf.check(*embeddings.shape)
        options.check("exact" if ivf is None else "ivf")
        self._embeddings = embeddings
        self._ids = ids
        self._id_order = np.argsort(ids, kind="stable")
        self._ivf = ivf
        self._options = options
        self._encoder_checksum = encoder_checksum
        self._created = created or datetime.datetime.now(datetime.UTC).isoformat()
        self._searcher = _make_searcher(embeddings, ivf, options)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: np.ndarray,
        *,
        encoder_checksum: str,
        mode: str = "exact",
        nlist: int | None = None,
        kmeans_iterations: int = 20,
        seed: int = 0,
        options: SearchOptions = SearchOptions(),
    ) -> DenseIndex:
        """Builds an index; embeddings are stored in the dtype given (float32 or float16).

        Args:
          embeddings: [N, D] finite float32 or float16 rows.
          ids: [N] distinct non-negative integers (the caller's document ids).
          encoder_checksum: a hash of the encoder that made the embeddings (manifest).
          mode: 'exact' or 'ivf'.
          nlist: IVF lists (default `default_nlist(N)`: the power of two nearest 4 sqrt(N)); <= N.
          kmeans_iterations: Lloyd iterations of the IVF k-means.
          seed: seed of the k-means sample and initialisation.
          options: how to search (backend, nprobe, mesh, ...).

        Raises:
          UserError: on a bad dtype/shape, non-finite values, duplicate or negative ids,
            an unknown mode or an nlist outside [1, N].
        """
        embeddings, ids = _check_rows(embeddings, ids)
        if not np.isfinite(embeddings).all():
            raise UserError("embeddings contain NaN or infinite values")
        if mode not in MODES:
            raise UserError(f"index mode {mode!r}: expected one of {MODES}")
        ivf = None
        if mode == "ivf":
            nlist = default_nlist(len(ids)) if nlist is None else nlist
            if not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= len(ids):
                raise UserError(f"nlist={nlist!r}: expected an integer in [1, {len(ids)}]")
            ivf = build_ivf(embeddings, int(nlist), iterations=kmeans_iterations, seed=seed)
        return cls(embeddings, ids, encoder_checksum=encoder_checksum, ivf=ivf, options=options)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self._embeddings.shape[1]

    @property
    def count(self) -> int:
        """Number of rows N."""
        return self._embeddings.shape[0]

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype of the embeddings (float32 or float16)."""
        return self._embeddings.dtype

    @property
    def mode(self) -> str:
        """'exact' or 'ivf'."""
        return "exact" if self._ivf is None else "ivf"

    @property
    def nlist(self) -> int:
        """Number of IVF lists (0 in exact mode)."""
        return 0 if self._ivf is None else self._ivf.nlist

    @property
    def ivf(self) -> IvfLists | None:
        """The inverted lists (None in exact mode)."""
        return self._ivf

    @property
    def ids(self) -> np.ndarray:
        """The ids, int64 [N], in row order (read-only)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def encoder_checksum(self) -> str:
        """Checksum of the encoder that made the embeddings."""
        return self._encoder_checksum

    @property
    def sharding(self) -> jax.sharding.Sharding | None:
        """Where the jax backend keeps the rows it scans (None for faiss / scann)."""
        return self._searcher.sharding

    @property
    def manifest(self) -> dict[str, Any]:
        """The JSON manifest `save` writes."""
        return make_manifest(self._embeddings, self._ivf, self._encoder_checksum, self._created)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude_ids: np.ndarray | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product for each query.

        Args:
          queries: [Q, D] finite floats (cast to float32).
          k: results per query; k > N pads with score -inf and id -1.
          exclude_ids: optional [Q]: the id each query must not get back (its own
            document); -1 or an id not in the index excludes nothing.
          nprobe: IVF lists to probe (default: the options' nprobe).

        Returns:
          scores float32 [Q, k] descending (ties: lower row first), ids int64 [Q, k].

        Raises:
          UserError: queries of the wrong shape or dimension, non-finite queries, k < 1,
            nprobe < 1, or exclude_ids of the wrong shape.
        """
        queries = self._check_queries(queries)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"k={k!r}: expected a positive integer")
        nprobe = self._options.nprobe if nprobe is None else nprobe
        if not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
            raise UserError(f"nprobe={nprobe!r}: expected a positive integer")
        exclude_rows = self._rows_of(exclude_ids, len(queries))
        found = min(int(k), self.count)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if len(queries):
            top, rows = self._searcher.search(
                queries, exclude_rows, found, min(int(nprobe), max(self.nlist, 1))
            )
            hit = rows >= 0
            scores[:, :found] = np.where(hit, top, -np.inf)
            ids[:, :found] = np.where(hit, self._ids[np.maximum(rows, 0)], -1)
        return scores, ids

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the index to `directory` atomically (a temporary directory, then renames).

        An existing index (or empty directory) there is replaced; a killed save leaves
        either the old index or none, never a half-written one that loads.

        Raises:
          UserError: if `directory` exists and is not an index directory.
        """
        return write_index(Path(directory), self._embeddings, self._ids, self._ivf, self.manifest)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected_encoder_checksum: str | None = None,
        *,
        options: SearchOptions = SearchOptions(),
    ) -> DenseIndex:
        """Loads an index `save` wrote (embeddings memory-mapped, allow_pickle=False).

        Raises:
          UserError: a missing or corrupt file (named), a manifest of another format, or an
            encoder checksum other than `expected_encoder_checksum` (both named).
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        found = manifest["encoder_checksum"]
        if expected_encoder_checksum is not None and found != expected_encoder_checksum:
            raise UserError(
                f"index {directory} was built by encoder {found!r}, but the current encoder is "
                f"{expected_encoder_checksum!r}: rebuild the index with the current encoder"
            )
        embeddings, ids, ivf = read_arrays(directory, manifest)
        return cls(
            embeddings,
            ids,
            encoder_checksum=found,
            ivf=ivf,
            options=options,
            created=manifest["created"],
        )

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        """Queries as contiguous float32 [Q, D]; UserError on a bad shape or non-finite values."""
        queries = np.asarray(queries)
        if queries.ndim != 2:
            raise UserError(f"queries have shape {queries.shape}: expected [Q, {self.dim}]")
        if queries.shape[1] != self.dim:
            raise UserError(
                f"query dimension {queries.shape[1]} does not match the index dimension "
                f"{self.dim} (encoder {self._encoder_checksum!r})"
            )
        queries = np.ascontiguousarray(queries, np.float32)
        if not np.isfinite(queries).all():
            raise UserError("queries contain NaN or infinite values")
        return queries

    def _rows_of(self, exclude_ids: np.ndarray | None, num_queries: int) -> np.ndarray:
        """Row of each excluded id, -1 where none (int64 [Q])."""
        if exclude_ids is None:
            return np.full(num_queries, -1, np.int64)
        wanted = np.asarray(exclude_ids)
        if wanted.shape != (num_queries,) or not np.issubdtype(wanted.dtype, np.integer):
            raise UserError(
                f"exclude_ids has shape {wanted.shape} and dtype {wanted.dtype}: expected "
                f"integers [{num_queries}], one per query"
            )
        sorted_ids = self._ids[self._id_order]
        at = np.minimum(np.searchsorted(sorted_ids, wanted), self.count - 1)
        return np.where(sorted_ids[at] == wanted, self._id_order[at], -1)


def _check_rows(embeddings: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [N, D] float32/float16 and distinct non-negative ids [N] (as int64)."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or 0 in embeddings.shape:
        raise UserError(f"embeddings have shape {embeddings.shape}: expected [N, D] with N, D > 0")
    if embeddings.dtype.name not in STORAGE_DTYPES:
        raise UserError(
            f"embeddings have dtype {embeddings.dtype}: expected one of {STORAGE_DTYPES} "
            "(cast them first)"
        )
    if embeddings.shape[0] >= 2**31:
        raise UserError(f"{embeddings.shape[0]} rows: at most 2**31 - 1 rows per index")
    ids = np.asarray(ids)
    if ids.shape != embeddings.shape[:1] or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(
            f"ids have shape {ids.shape} and dtype {ids.dtype}: expected integers "
            f"[{embeddings.shape[0]}], one per embedding row"
        )
    ids = ids.astype(np.int64, copy=False)
    if (ids < 0).any():
        raise UserError("ids must be non-negative (-1 marks 'no result')")
    if len(np.unique(ids)) != len(ids):
        raise UserError("ids must be distinct")
    return embeddings, ids


def _make_searcher(
    embeddings: np.ndarray, ivf: IvfLists | None, options: SearchOptions
) -> _Searcher:
    """The searcher of `options.backend` over the rows (and lists, in ivf mode)."""
    if options.backend == "faiss":
        return FaissSearcher(embeddings, ivf)
    if options.backend == "scann":
        return ScannSearcher(embeddings, ivf)
    mesh = options.mesh or Mesh(np.asarray(jax.devices()), (ROW_AXIS,))
    if ivf is None:
        return ExactSearcher(
            embeddings,
            mesh,
            block_rows=options.block_rows,
            query_batch=options.query_batch,
            matmul_dtype=options.matmul_dtype,
        )
    return IvfSearcher(embeddings, ivf, mesh.devices.flat[0], options.query_batch)
