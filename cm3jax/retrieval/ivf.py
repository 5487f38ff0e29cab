"""Inverted lists (IVF): spherical k-means training in JAX, and IVF search on one device.

Spherical k-means (Lloyd, inner-product assignment, unit-norm centroids) splits the rows
into `nlist` inverted lists, stored CSR-style (`offsets` [nlist + 1], `rows` [N]). A search
probes the `nprobe` lists whose centroids score highest; nprobe >= nlist scans every row and
returns the exact results.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cm3jax.errors import UserError
from cm3jax.retrieval.batching import bucket_size, round_up, search_bucketed

# k-means trains on at most this many sampled points per list (FAISS's default cap).
MAX_TRAIN_POINTS_PER_LIST = 256
# Rows per assignment matmul in k-means (bounds the [chunk, nlist] score block).
ASSIGN_CHUNK = 4096
# Rows per jitted call when assigning every row to its list after training.
ASSIGN_ROWS = 65536
# IVF: queries per work item, and bytes of tile data gathered per step of the scoring loop
# (both measured best on a 2-core AVX-512 CPU at 100k x 512, nlist 256, nprobe 8 and 32:
# fewer, fuller items re-read less tile data; small steps keep the gathered tiles in cache).
IVF_GROUP = 16
IVF_GATHER_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class IvfLists:
    """Inverted lists: rows of list i are `rows[offsets[i]:offsets[i + 1]]` (row positions).

    Attributes:
      centroids: float32 [nlist, D], unit norm.
      offsets: int64 [nlist + 1], offsets[0] == 0, offsets[-1] == N.
      rows: int64 [N], a permutation of range(N) grouped by list, ascending within a list.
      iterations: k-means iterations used to train the centroids (recorded in the manifest).
      seed: k-means seed (recorded in the manifest).
    """

    centroids: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    iterations: int
    seed: int

    @property
    def nlist(self) -> int:
        """Number of inverted lists."""
        return len(self.centroids)

    def check(self, count: int, dim: int) -> None:
        """Raises UserError unless the lists partition range(count) and the centroids are
        [nlist, dim]."""
        offsets, rows = self.offsets, self.rows
        problems = []
        if self.centroids.shape != (self.nlist, dim) or self.nlist < 1:
            problems.append(f"centroids have shape {self.centroids.shape}, expected [nlist, {dim}]")
        if offsets.shape != (self.nlist + 1,) or offsets[0] != 0 or offsets[-1] != count:
            problems.append(f"offsets must be [nlist + 1] from 0 to {count}")
        elif (np.diff(offsets) < 0).any():
            problems.append("offsets must not decrease")
        if rows.shape != (count,) or (np.bincount(rows, minlength=count) != 1).any():
            problems.append(f"rows must be a permutation of range({count})")
        if problems:
            raise UserError("inverted lists are inconsistent: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------
# Training.


def build_ivf(
    embeddings: np.ndarray, nlist: int, *, iterations: int = 20, seed: int = 0
) -> IvfLists:
    """Trains `nlist` spherical k-means centroids and assigns every row to its best list.

    Returns:
      IvfLists with rows ascending within each list (CSR: offsets + row order).
    """
    centroids = spherical_kmeans(embeddings, nlist, iterations=iterations, seed=seed)
    assignment = _assign_rows(embeddings, centroids)
    sizes = np.bincount(assignment, minlength=nlist)
    return IvfLists(
        centroids=centroids,
        offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        rows=np.argsort(assignment, kind="stable").astype(np.int64),
        iterations=iterations,
        seed=seed,
    )


def spherical_kmeans(
    points: np.ndarray, nlist: int, *, iterations: int = 20, seed: int = 0
) -> np.ndarray:
    """Spherical k-means in JAX: Lloyd iterations with inner-product assignment and unit-norm
    centroids (the right partition for maximum inner product over normalised embeddings).

    Trains on at most 256 x nlist points sampled with `numpy.random.default_rng(seed)`,
    starting from `nlist` distinct sample points; a list that empties keeps its centroid.
    Deterministic for a given input and seed.

    Returns:
      float32 [nlist, D] centroids.
    """
    if not isinstance(iterations, int) or iterations < 0:
        raise UserError(f"kmeans_iterations={iterations!r}: expected a non-negative integer")
    rng = np.random.default_rng(seed)
    n = len(points)
    sample = np.sort(rng.choice(n, size=min(n, MAX_TRAIN_POINTS_PER_LIST * nlist), replace=False))
    train = np.asarray(points[sample], np.float32)
    init = train[rng.choice(len(train), size=nlist, replace=False)]
    chunk = min(ASSIGN_CHUNK, round_up(len(train), 8))
    padded = np.zeros((round_up(len(train), chunk), train.shape[1]), np.float32)
    padded[: len(train)] = train
    weights = (np.arange(len(padded)) < len(train)).astype(np.float32)
    return np.asarray(_lloyd(padded, weights, init, iterations=iterations, chunk=chunk))


@functools.partial(jax.jit, static_argnames=("iterations", "chunk"))
def _lloyd(
    points: jax.Array, weights: jax.Array, init: jax.Array, *, iterations: int, chunk: int
) -> jax.Array:
    """`iterations` Lloyd steps from `init`; zero-weight (padding) rows count for no list."""
    nlist = init.shape[0]

    def step(_: jax.Array, centroids: jax.Array) -> jax.Array:
        assignment = _assign(points, centroids, chunk)
        sums = jax.ops.segment_sum(points, assignment, nlist)  # padding points are zero
        counts = jax.ops.segment_sum(weights, assignment, nlist)
        return jnp.where(counts[:, None] > 0, _unit(sums), centroids)

    return lax.fori_loop(0, iterations, step, _unit(init))


def _unit(x: jax.Array) -> jax.Array:
    """Rows of `x` scaled to unit norm (zero rows stay zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _assign(points: jax.Array, centroids: jax.Array, chunk: int) -> jax.Array:
    """Index of each point's highest-inner-product centroid (the first on ties)."""
    blocks = points.reshape(-1, chunk, points.shape[1])
    return lax.map(lambda b: jnp.argmax(b @ centroids.T, axis=1), blocks).reshape(-1)


_assign_jit = jax.jit(_assign, static_argnames="chunk")


def _assign_rows(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """List of every row, computed in fixed-size jitted chunks (one compile)."""
    count, dim = embeddings.shape
    chunk = min(ASSIGN_CHUNK, round_up(count, 8))
    size = round_up(min(ASSIGN_ROWS, count), chunk)
    centroids = jnp.asarray(centroids)
    out = []
    for start in range(0, count, size):
        rows = np.zeros((size, dim), np.float32)
        part = embeddings[start : start + size]
        rows[: len(part)] = part
        out.append(np.asarray(_assign_jit(rows, centroids, chunk=chunk))[: len(part)])
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------
# Search.


class IvfSearcher:
    """IVF search on one device.

    Each list is cut into fixed-size tiles ([T, tile, D], padded slots have row -1). A batch
    probes its lists in JAX, then numpy groups the (query, tile) pairs into work items of one
    tile and up to IVF_GROUP queries, and one jitted call scores all items (an
    [IVF_GROUP, tile] matmul each) and keeps each item's top-k; numpy merges each query's
    candidates.
    """

    def __init__(self, embeddings: np.ndarray, ivf: IvfLists, device: jax.Device, query_batch: int):
        """Tiles the lists of `embeddings` [N, D] onto `device`; `query_batch` as in
        `search_bucketed`."""
        count, dim = embeddings.shape
        self._tile = int(np.clip(round_up(-(-count // ivf.nlist), 8), 8, 1024))
        tiles, tile_rows, self._first_tile, self._tiles_per_list = _make_tiles(
            embeddings, ivf, self._tile
        )
        self._tiles = jax.device_put(tiles, device)
        self._tile_rows = jax.device_put(tile_rows, device)
        self._centroids = jax.device_put(ivf.centroids, device)
        self.sharding = self._tiles.sharding
        self._query_batch = query_batch
        self._items_per_step = max(2, IVF_GATHER_BYTES // (self._tile * dim * embeddings.itemsize))
        self._probe = jax.jit(_probe, static_argnames="nprobe")
        self._score = jax.jit(_score_items, static_argnames=("k", "batch"))

    def search(
        self, queries: np.ndarray, exclude_rows: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows among the `nprobe` best lists of every query."""

        def run(padded: np.ndarray, exclude: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            probes = np.asarray(self._probe(padded, self._centroids, nprobe=nprobe))[:n]
            item_tile, item_queries = _dispatch(probes, self._first_tile, self._tiles_per_list)
            scores, rows = self._score(
                self._tiles,
                self._tile_rows,
                padded,
                exclude,
                item_tile,
                item_queries,
                k=min(k, self._tile),
                batch=min(self._items_per_step, len(item_tile)),
            )
            return _merge_candidates(np.asarray(scores), np.asarray(rows), item_queries, n, k)

        return search_bucketed(run, queries, exclude_rows, self._query_batch)


def _make_tiles(
    embeddings: np.ndarray, ivf: IvfLists, tile: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tiles [T, tile, D], their rows [T, tile] (-1 = empty slot), and per list its first
    tile and its number of tiles."""
    sizes = np.diff(ivf.offsets)
    tiles_per_list = -(-sizes // tile)
    first_tile = np.cumsum(tiles_per_list) - tiles_per_list
    list_of = np.repeat(np.arange(ivf.nlist), sizes)
    position = np.arange(len(ivf.rows)) - ivf.offsets[list_of]
    which, slot = first_tile[list_of] + position // tile, position % tile
    tiles = np.zeros((tiles_per_list.sum(), tile, embeddings.shape[1]), embeddings.dtype)
    tile_rows = np.full((tiles_per_list.sum(), tile), -1, np.int32)
    tiles[which, slot] = embeddings[ivf.rows]
    tile_rows[which, slot] = ivf.rows
    return tiles, tile_rows, first_tile, tiles_per_list


def _probe(queries: jax.Array, centroids: jax.Array, *, nprobe: int) -> jax.Array:
    """The `nprobe` lists with the highest centroid inner product, per query."""
    return lax.top_k(queries @ centroids.T, nprobe)[1]


def _dispatch(
    probes: np.ndarray, first_tile: np.ndarray, tiles_per_list: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Work items: item_tile [I] and item_queries [I, IVF_GROUP] (-1 = empty slot); I is
    padded by `bucket_size` (padding items score tile 0 for no query).
    """
    num_queries, nprobe = probes.shape
    lists = probes.reshape(-1)
    counts = tiles_per_list[lists]
    query = np.repeat(np.repeat(np.arange(num_queries), nprobe), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    tile = np.repeat(first_tile[lists], counts) + within
    order = np.lexsort((query, tile))
    tile, query = tile[order], query[order]
    per_tile = np.bincount(tile, minlength=int(tiles_per_list.sum()))
    items_per_tile = -(-per_tile // IVF_GROUP)
    first_item = np.cumsum(items_per_tile) - items_per_tile
    rank = np.arange(len(tile)) - np.repeat(np.cumsum(per_tile) - per_tile, per_tile)
    item = first_item[tile] + rank // IVF_GROUP
    num_items = bucket_size(max(1, items_per_tile.sum()))
    item_tile = np.zeros(num_items, np.int32)
    item_queries = np.full((num_items, IVF_GROUP), -1, np.int32)
    item_tile[item] = tile
    item_queries[item, rank % IVF_GROUP] = query
    return item_tile, item_queries


def _score_items(
    tiles: jax.Array,
    tile_rows: jax.Array,
    queries: jax.Array,
    exclude: jax.Array,
    item_tile: jax.Array,
    item_queries: jax.Array,
    *,
    k: int,
    batch: int,
) -> tuple[jax.Array, jax.Array]:
    """Per item: the top-k (scores, rows) of each of its queries within its tile."""

    def score(item: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        tile, query = item
        who = jnp.maximum(query, 0)
        rows = tile_rows[tile]
        scores = queries[who] @ tiles[tile].astype(jnp.float32).T
        keep = (rows >= 0)[None, :] & (rows[None, :] != exclude[who][:, None])
        top, at = lax.top_k(jnp.where(keep, scores, -jnp.inf), k)
        return top, jnp.where(top > -jnp.inf, rows[at], -1)

    return lax.map(score, (item_tile, item_queries), batch_size=batch)


def _merge_candidates(
    scores: np.ndarray, rows: np.ndarray, owners: np.ndarray, num_queries: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the top-k of its candidates (score descending, then row ascending).

    Args:
      scores, rows: [I, G, c] candidates of every item slot (row -1 = none).
      owners: [I, G] the query of each item slot (-1 = empty slot).
    """
    owner = np.broadcast_to(owners[..., None], rows.shape)
    valid = (owner >= 0) & (rows >= 0)
    scores, rows, owner = scores[valid], rows[valid], owner[valid]
    order = np.lexsort((rows, -scores, owner))
    scores, rows, owner = scores[order], rows[order], owner[order]
    rank = np.arange(len(owner)) - np.searchsorted(owner, owner)
    keep = rank < k
    top = np.full((num_queries, k), -np.inf, np.float32)
    top_rows = np.full((num_queries, k), -1, np.int64)
    top[owner[keep], rank[keep]] = scores[keep]
    top_rows[owner[keep], rank[keep]] = rows[keep]
    return top, top_rows
