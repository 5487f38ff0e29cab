"""Exact maximum-inner-product search in JAX, with the rows sharded over a device mesh.

Rows are padded to (devices x block) and sharded over every axis of the mesh, so the memory
may exceed one device. Each device scans its rows in blocks (one matmul + `lax.top_k` per
block, merged into a running top-k inside `lax.scan`), then the per-device top-k are
all-gathered and merged. Padded rows are masked to -inf and never returned.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cm3jax.retrieval.batching import round_up, search_bucketed

MATMUL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# bfloat16 matmul: each device re-scores in float32 its best k + max(k, RESCORE_EXTRA).
RESCORE_EXTRA = 32


class ExactSearcher:
    """Exact search: rows sharded over a mesh, blocked matmul + running top-k per device."""

    def __init__(
        self,
        embeddings: np.ndarray,
        mesh: Mesh,
        *,
        block_rows: int,
        query_batch: int,
        matmul_dtype: str,
    ):
        """Shards `embeddings` [N, D] over every axis of `mesh`, padded to whole blocks.

        Args:
          block_rows: rows scored per matmul block on each device (at most).
          query_batch: the largest query batch compiled (see `search_bucketed`).
          matmul_dtype: a key of MATMUL_DTYPES.
        """
        count = embeddings.shape[0]
        per_device = -(-count // mesh.size)
        block = min(block_rows, round_up(per_device, 8))
        rows_per_device = round_up(per_device, block)
        self._count = count
        self.sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), None))
        self._rows = _put_rows(embeddings, self.sharding, rows_per_device * mesh.size)
        self._query_batch = query_batch
        self._bf16 = matmul_dtype == "bfloat16"
        self._search = jax.jit(
            functools.partial(
                _exact_search,
                mesh=mesh,
                block=block,
                count=count,
                matmul_dtype=MATMUL_DTYPES[matmul_dtype],
            ),
            static_argnames=("k", "pool"),
            out_shardings=NamedSharding(mesh, PartitionSpec()),  # results on every host
        )

    def search(
        self, queries: np.ndarray, exclude_rows: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows of every query (nprobe is ignored: every row is scored)."""
        pool = min(k + max(k, RESCORE_EXTRA), self._count) if self._bf16 else k

        def run(padded: np.ndarray, exclude: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
            return self._search(self._rows, padded, exclude, k=k, pool=pool)

        return search_bucketed(run, queries, exclude_rows, self._query_batch)


def _put_rows(embeddings: np.ndarray, sharding: NamedSharding, total_rows: int) -> jax.Array:
    """The rows zero-padded to `total_rows`, sharded; each device's slice is read from the host
    array on its own (no padded host copy, and memory-mapped files are read piecewise)."""
    count, dim = embeddings.shape

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(total_rows)
        out = np.zeros((stop - start, dim), embeddings.dtype)
        out[: max(0, min(stop, count) - start)] = embeddings[start:stop]
        return out

    return jax.make_array_from_callback((total_rows, dim), sharding, shard)


def _exact_search(
    rows: jax.Array,
    queries: jax.Array,
    exclude: jax.Array,
    *,
    mesh: Mesh,
    block: int,
    count: int,
    matmul_dtype: Any,
    k: int,
    pool: int,
) -> tuple[jax.Array, jax.Array]:
    """Top-k (scores, rows) of every query over all devices' rows; rows -1 where none.

    Each device returns its own top-k ([devices, Q, k] in all); the merge of those small
    arrays concatenates them in device order, which is row order, so the stable top_k keeps
    the lower row first on ties.
    """
    axes = tuple(mesh.axis_names)

    def device_top_k(
        shard: jax.Array, queries: jax.Array, exclude: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """One device's top-k [1, Q, k]: blocks of `block` rows, each a matmul + top-k merged
        into a running top-`pool` (then re-scored in float32 down to k when the matmul is bf16).
        """
        rows_here, dim = shard.shape
        first_row = lax.axis_index(axes) * rows_here
        num_queries = queries.shape[0]
        q = queries.astype(matmul_dtype)
        block_start = first_row + block * jnp.arange(rows_here // block, dtype=jnp.int32)

        def scan_block(
            best: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array]
        ) -> tuple[tuple[jax.Array, jax.Array], None]:
            data, start = xs
            scores = lax.dot_general(
                q,
                data.astype(matmul_dtype),
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            row = start + jnp.arange(block, dtype=jnp.int32)
            keep = (row < count)[None, :] & (row[None, :] != exclude[:, None])
            top, at = lax.top_k(jnp.where(keep, scores, -jnp.inf), min(pool, block))
            merged = (jnp.concatenate([best[0], top], 1), jnp.concatenate([best[1], start + at], 1))
            return _top_k_rows(*merged, pool), None

        # The carry varies across devices (each scans its own rows), so the initial one must too.
        empty = lax.pcast(
            (
                jnp.full((num_queries, pool), -jnp.inf, jnp.float32),
                jnp.full((num_queries, pool), -1, jnp.int32),
            ),
            axes,
            to="varying",
        )
        best, _ = lax.scan(scan_block, empty, (shard.reshape(-1, block, dim), block_start))
        if matmul_dtype != jnp.float32:
            best = _rescore(shard, queries, *best, first_row, k)
        return best[0][None], best[1][None]

    per_device = jax.shard_map(
        device_top_k,
        mesh=mesh,
        in_specs=(PartitionSpec(axes, None), PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(axes), PartitionSpec(axes)),
    )(rows, queries, exclude)
    scores, rows = (jnp.moveaxis(x, 0, 1).reshape(queries.shape[0], -1) for x in per_device)
    scores, rows = _top_k_rows(scores, rows, k)
    return scores, jnp.where(scores > -jnp.inf, rows, -1)


def _rescore(
    shard: jax.Array,
    queries: jax.Array,
    scores: jax.Array,
    rows: jax.Array,
    first_row: jax.Array,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Float32 scores of the candidate rows (from this device's shard), top-k by row order."""
    local = jnp.clip(rows - first_row, 0, shard.shape[0] - 1)
    exact = jnp.einsum("qd,qpd->qp", queries, shard[local].astype(jnp.float32))
    exact = jnp.where(scores > -jnp.inf, exact, -jnp.inf)
    rows, exact = lax.sort((rows, exact), num_keys=1)
    return _top_k_rows(exact, rows, k)


def _top_k_rows(scores: jax.Array, rows: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of `scores` along the last axis with the matching `rows` (stable: ties keep order)."""
    top, at = lax.top_k(scores, k)
    return top, jnp.take_along_axis(rows, at, axis=-1)
