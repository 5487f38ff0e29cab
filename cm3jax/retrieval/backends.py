"""Optional search backends over the same rows and lists: FAISS and ScaNN adapters.

Each adapter has the searcher interface of the JAX ones (`sharding`, and `search(queries,
exclude_rows, k, nprobe)` returning top-k row positions, -1 for none), and needs its
package installed only when it is chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from cm3jax.errors import UserError
from cm3jax.retrieval.ivf import MAX_TRAIN_POINTS_PER_LIST, IvfLists

BACKEND_PACKAGES = {"faiss": "faiss-cpu", "scann": "scann"}


class FaissSearcher:
    """faiss IndexFlatIP (exact) or IndexIVFFlat over the index's own centroids (ivf)."""

    sharding = None

    def __init__(self, embeddings: np.ndarray, ivf: IvfLists | None):
        """Adds `embeddings` [N, D] (as float32) to a new faiss index."""
        faiss = _import_backend("faiss")
        dim = embeddings.shape[1]
        if ivf is None:
            self._index = faiss.IndexFlatIP(dim)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            quantizer.add(np.ascontiguousarray(ivf.centroids, np.float32))
            self._index = faiss.IndexIVFFlat(quantizer, dim, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
            self._index.is_trained = True  # the quantizer holds our k-means centroids
        self._index.add(np.ascontiguousarray(embeddings, np.float32))
        self._params = (lambda nprobe: faiss.SearchParametersIVF(nprobe=nprobe)) if ivf else None

    def search(
        self, queries: np.ndarray, exclude_rows: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """faiss search of k (+1 when a row is excluded) results, excluded rows dropped."""
        fetch = k + int((exclude_rows >= 0).any())
        params = self._params(nprobe) if self._params else None
        scores, rows = self._index.search(queries, fetch, params=params)
        return _drop_excluded(scores, rows, exclude_rows, k)


class ScannSearcher:
    """ScaNN brute force (exact) or a ScaNN tree with the index's nlist (ivf; ScaNN trains
    its own partition). Scores are recomputed in float32 from the rows ScaNN returns."""

    sharding = None

    def __init__(self, embeddings: np.ndarray, ivf: IvfLists | None):
        """Builds a ScaNN searcher over `embeddings` [N, D] (as float32)."""
        scann = _import_backend("scann")
        self._rows = np.ascontiguousarray(embeddings, np.float32)
        builder = scann.scann_ops_pybind.builder(self._rows, 10, "dot_product")
        if ivf is not None:
            builder = builder.tree(
                num_leaves=ivf.nlist,
                num_leaves_to_search=1,
                training_sample_size=min(len(self._rows), MAX_TRAIN_POINTS_PER_LIST * ivf.nlist),
                spherical=True,
            )
        self._tree = ivf is not None
        self._searcher = builder.score_brute_force().build()

    def search(
        self, queries: np.ndarray, exclude_rows: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """ScaNN search of k (+1 when a row is excluded) results, excluded rows dropped."""
        fetch = k + int((exclude_rows >= 0).any())
        extra = {"leaves_to_search": nprobe} if self._tree else {}
        found, _ = self._searcher.search_batched(queries, final_num_neighbors=fetch, **extra)
        rows = np.full((len(queries), fetch), -1, np.int64)
        rows[:, : np.shape(found)[1]] = found
        scores = np.einsum("qd,qkd->qk", queries, self._rows[np.maximum(rows, 0)])
        scores = np.where(rows >= 0, scores, -np.inf)
        order = np.lexsort((rows, -scores), axis=-1)
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        return _drop_excluded(scores, rows, exclude_rows, k)


def _import_backend(backend: str) -> Any:
    """The backend's module; UserError naming the package to install when it is missing."""
    try:
        return importlib.import_module(backend)
    except ImportError:
        package = BACKEND_PACKAGES[backend]
        raise UserError(
            f"index backend {backend!r} needs the {package!r} package, which is not installed "
            f"(pip install {package}), or use backend='jax'"
        ) from None


def _drop_excluded(
    scores: np.ndarray, rows: np.ndarray, exclude_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first k results of each query that are not its excluded row."""
    dropped = (rows == exclude_rows[:, None]) & (rows >= 0)
    order = np.argsort(dropped, axis=1, kind="stable")[:, :k]
    rows = np.where(np.take_along_axis(dropped, order, 1), -1, np.take_along_axis(rows, order, 1))
    return np.take_along_axis(scores, order, 1).astype(np.float32), rows.astype(np.int64)
