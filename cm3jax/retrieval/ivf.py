"""Inverted lists (IVF): spherical k-means training in JAX, and IVF search on one device.

Spherical k-means (Lloyd, inner-product assignment, unit-norm centroids) splits the rows
into `nlist` inverted lists, stored CSR-style (`offsets` [nlist + 1], `rows` [N]). A search
probes the `nprobe` lists whose centroids score highest; nprobe >= nlist scans every row and
returns the exact results.

Search, list-major (the FAISS IVF strategy): every list is cut into tiles of at most
IVF_TILE_ROWS rows, stored in bfloat16. For a batch, numpy groups the (query, tile) pairs by
tile into work items of one tile and up to IVF_GROUP queries, items of a tile next to each
other (so a tile is read from memory about once per batch, however many queries probe it);
one jitted call scores every item ([IVF_GROUP, D] x [D, tile], bf16 in, float32 out), then
gathers each query's candidate scores, keeps its best k + max(k, RESCORE_EXTRA), re-scores
those in float32 from the float32 rows and returns the top k (ties: lower row first).

Exactness: bf16 rounding moves a score by at most `bf16_score_error(D)` |q| |x| (~0.8% for
D = 512). A query whose float32 k-th score beats its pool's lowest bf16 score by more than
that bound provably has its exact top k in the pool; any other query (rare: it needs about
RESCORE_EXTRA rows that close to its k-th score) is searched again over the same probed tiles
in float32. So nprobe >= nlist returns exactly the exact-mode results, and a smaller nprobe
the exact top k of the rows it probes.

Why this shape (measured on a 2-core AVX-512 CPU, 100k x 512, nlist 1024, nprobe 16, batch
256; see benchmarks/index.py): a batch of 256 queries touches most tiles, so the scan is
bound by the bytes read (bf16 halves them) and by the per-item overhead of small matmuls
(one loop over items in tile order, IVF_ITEM_BATCH items per step, and only the steps that
hold real items; 8 queries per item beat 4 or 16, tiles of 64 rows beat 32, 48 or 128); the
per-query top-k runs once over gathered scores, not once per item.
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
# IVF search: rows per tile (at most), queries per work item, work items per step of the
# scoring loop, and queries per step of the merge (bounds its [queries, candidates] block).
IVF_TILE_ROWS = 64
IVF_GROUP = 8
IVF_ITEM_BATCH = 32
IVF_MERGE_QUERIES = 32
# Each query re-scores in float32 its best k + max(k, RESCORE_EXTRA) bf16-scored candidates
# (a small pool is safe: a query it cannot certify is searched again in float32).
RESCORE_EXTRA = 16


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
    return lax.map(lambda b: _argmax_rows(b @ centroids.T), blocks).reshape(-1)


def _argmax_rows(scores: jax.Array) -> jax.Array:
    """jnp.argmax(scores, axis=1) (the first column on ties) as a max, then the lowest column
    index (as float32, exact below 2**24 columns) that reaches it: two plain reductions, about
    5x faster on CPU than argmax's variadic (value, index) reduce at [4096, 1024]."""
    if scores.shape[1] >= 2**24:
        return jnp.argmax(scores, axis=1).astype(jnp.int32)
    best = scores.max(axis=1, keepdims=True)
    column = lax.broadcasted_iota(jnp.float32, scores.shape, 1)
    return jnp.min(jnp.where(scores == best, column, jnp.inf), axis=1).astype(jnp.int32)


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
    """IVF search on one device: bf16 list-major scoring, float32 re-scoring (module doc).

    Tiles [T, tile, D] hold the rows of each list in bfloat16 (stored as uint16: XLA's CPU
    gather of a bfloat16 array converts the whole array first), padded slots have row -1.
    """

    def __init__(self, embeddings: np.ndarray, ivf: IvfLists, device: jax.Device, query_batch: int):
        """Tiles the lists of `embeddings` [N, D] onto `device`; `query_batch` as in
        `search_bucketed`."""
        count, dim = embeddings.shape
        self._tile = int(min(IVF_TILE_ROWS, round_up(-(-count // ivf.nlist), 8)))
        tiles, tile_rows, self._first_tile, self._tiles_per_list = _make_tiles(
            embeddings, ivf, self._tile
        )
        self._tiles = jax.device_put(tiles, device)
        self._tile_rows = jax.device_put(tile_rows, device)
        self._rows = jax.device_put(np.asarray(embeddings), device)  # float32 re-scoring
        self._centroids = jax.device_put(ivf.centroids, device)
        # |bf16 score - float32 score| <= self._error * |q| for every row.
        self._error = bf16_score_error(dim) * float(np.sqrt(_max_squared_norm(embeddings)))
        self.sharding = self._tiles.sharding
        self._query_batch = query_batch
        self._probe = jax.jit(_probe, static_argnames="nprobe")
        self._search = jax.jit(_search_items, static_argnames=("k", "pool", "exact"))

    def search(
        self, queries: np.ndarray, exclude_rows: np.ndarray, k: int, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows among the `nprobe` best lists of every query."""
        pool = k + max(k, RESCORE_EXTRA)

        def run(padded: np.ndarray, exclude: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
            probes = np.asarray(self._probe(padded, self._centroids, nprobe=nprobe))[:n]
            found = self._scan(padded, exclude, probes, np.arange(n), k, pool, False)
            top, rows, floor = (np.array(x) for x in found)
            # Certified: no row outside the pool (bf16 score <= floor) can reach the k-th.
            bound = self._error * np.linalg.norm(padded[:n].astype(np.float64), axis=1)
            redo = np.flatnonzero(~((floor[:n] == -np.inf) | (top[:n, -1] > floor[:n] + bound)))
            if len(redo):  # float32 over the same probed tiles
                exact = self._scan(padded, exclude, probes[redo], redo, k, pool, True)
                top[redo], rows[redo] = np.asarray(exact[0])[redo], np.asarray(exact[1])[redo]
            return top, rows

        return search_bucketed(run, queries, exclude_rows, self._query_batch)

    def _scan(
        self,
        queries: np.ndarray,
        exclude: np.ndarray,
        probes: np.ndarray,
        query_ids: np.ndarray,
        k: int,
        pool: int,
        exact: bool,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Top-k (scores, rows, pool floor) of `queries[query_ids]` over their probed lists."""
        item_tile, item_queries, query_slots, num_items = _plan(
            probes, query_ids, len(queries), self._first_tile, self._tiles_per_list
        )
        return self._search(
            self._tiles,
            self._tile_rows,
            self._rows,
            queries,
            exclude,
            item_tile,
            item_queries,
            query_slots,
            np.int32(num_items),
            k=k,
            pool=pool,
            exact=exact,
        )


def bf16_score_error(dim: int) -> float:
    """c with |bf16 score - float32 score| <= c * |q| * |x| for D = `dim`.

    Both operands are rounded to bfloat16 (unit roundoff u = 2**-8 each, so each product is
    off by at most (2u + u**2) |q_i x_i|, and a product of two bf16 values is exact in
    float32); float32 accumulation of D terms adds at most gamma_D = D 2**-24 / (1 - D 2**-24)
    times sum |q_i x_i| on each side (the bf16 sum and the float32 re-score), and
    sum |q_i x_i| <= |q| |x| (Cauchy-Schwarz). Rounded up by 1% and a tiny absolute term.
    """
    u, gamma = 2.0**-8, dim * 2.0**-24 / max(1e-9, 1 - dim * 2.0**-24)
    return (2 * u + u * u + 2.02 * gamma) * 1.01 + 1e-12


def _max_squared_norm(embeddings: np.ndarray) -> float:
    """Largest squared row norm, in float64, read in chunks (the rows may be memory-mapped)."""
    best = 0.0
    for start in range(0, len(embeddings), ASSIGN_ROWS):
        part = np.asarray(embeddings[start : start + ASSIGN_ROWS], np.float64)
        best = max(best, float(np.einsum("nd,nd->n", part, part).max(initial=0.0)))
    return best


def _make_tiles(
    embeddings: np.ndarray, ivf: IvfLists, tile: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tiles [T, tile, D] (bfloat16 bits as uint16), their rows [T, tile] (-1 = empty slot),
    and per list its first tile and its number of tiles."""
    sizes = np.diff(ivf.offsets)
    tiles_per_list = -(-sizes // tile)
    first_tile = np.cumsum(tiles_per_list) - tiles_per_list
    list_of = np.repeat(np.arange(ivf.nlist), sizes)
    position = np.arange(len(ivf.rows)) - ivf.offsets[list_of]
    which, slot = first_tile[list_of] + position // tile, position % tile
    tiles = np.zeros((tiles_per_list.sum(), tile, embeddings.shape[1]), np.uint16)
    tile_rows = np.full((tiles_per_list.sum(), tile), -1, np.int32)
    for start in range(0, len(ivf.rows), ASSIGN_ROWS):  # bounded float32 temporaries
        part = slice(start, start + ASSIGN_ROWS)
        rows = np.asarray(embeddings[ivf.rows[part]], np.float32)
        tiles[which[part], slot[part]] = rows.astype(jnp.bfloat16).view(np.uint16)
    tile_rows[which, slot] = ivf.rows
    return tiles, tile_rows, first_tile, tiles_per_list


def _probe(queries: jax.Array, centroids: jax.Array, *, nprobe: int) -> jax.Array:
    """The `nprobe` lists with the highest centroid inner product, per query."""
    return lax.top_k(queries @ centroids.T, nprobe)[1]


def _plan(
    probes: np.ndarray,
    query_ids: np.ndarray,
    num_queries: int,
    first_tile: np.ndarray,
    tiles_per_list: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Work items of one tile and up to IVF_GROUP queries, and each query's slots.

    Args:
      probes: [P, nprobe] lists probed by query `query_ids[p]` (of `num_queries`).

    Returns:
      item_tile [I] and item_queries [I, IVF_GROUP] (-1 = empty slot), items in tile order; I
      is padded by `bucket_size` (then to whole IVF_ITEM_BATCH steps) and the padding items
      come last (tile 0, no query).
      query_slots [num_queries, C]: the slots (item * IVF_GROUP + position) that score each
      query, I * IVF_GROUP for none; C is the largest count, padded by `bucket_size`.
      The number of items before the padding.
    """
    nprobe = probes.shape[1]
    lists = probes.reshape(-1)
    counts = tiles_per_list[lists]
    query = np.repeat(np.repeat(query_ids, nprobe), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    tile = np.repeat(first_tile[lists], counts) + within
    order = np.lexsort((query, tile))
    tile, query = tile[order], query[order]
    per_tile = np.bincount(tile, minlength=int(tiles_per_list.sum()))
    items_per_tile = -(-per_tile // IVF_GROUP)
    first_item = np.cumsum(items_per_tile) - items_per_tile
    rank = np.arange(len(tile)) - np.repeat(np.cumsum(per_tile) - per_tile, per_tile)
    item = first_item[tile] + rank // IVF_GROUP
    used = int(items_per_tile.sum())
    num_items = bucket_size(max(1, used))
    if num_items > IVF_ITEM_BATCH:  # whole steps of the scoring loop
        num_items = round_up(num_items, IVF_ITEM_BATCH)
    item_tile = np.zeros(num_items, np.int32)
    item_queries = np.full((num_items, IVF_GROUP), -1, np.int32)
    item_tile[item] = tile
    item_queries[item, rank % IVF_GROUP] = query
    slot = item * IVF_GROUP + rank % IVF_GROUP
    by_query = np.argsort(query, kind="stable")
    per_query = np.bincount(query, minlength=num_queries)
    position = np.arange(len(query)) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    query_slots = np.full(
        (num_queries, bucket_size(max(1, int(per_query.max(initial=0))))),
        num_items * IVF_GROUP,
        np.int32,
    )
    query_slots[query[by_query], position] = slot[by_query]
    return item_tile, item_queries, query_slots, used


def _search_items(
    tiles: jax.Array,
    tile_rows: jax.Array,
    rows: jax.Array,
    queries: jax.Array,
    exclude: jax.Array,
    item_tile: jax.Array,
    item_queries: jax.Array,
    query_slots: jax.Array,
    num_items: jax.Array,
    *,
    k: int,
    pool: int,
    exact: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k (scores, rows, floor) of every query over the slots `_plan` gave it.

    exact=False scores the bf16 tiles, keeps each query's best `pool` and re-scores them in
    float32 from `rows`; floor is the lowest bf16 score in the pool (-inf when the pool holds
    every candidate), the most any row outside it scored. exact=True scores float32 rows
    gathered from `rows` (floor -inf).
    """
    tile = tile_rows.shape[1]
    scored = queries if exact else queries.astype(jnp.bfloat16)  # converted once, not per item

    def score(item: tuple[jax.Array, jax.Array]) -> jax.Array:
        which, query = item
        group = scored[jnp.maximum(query, 0)]
        if exact:
            return group @ rows[jnp.maximum(tile_rows[which], 0)].astype(jnp.float32).T
        data = lax.bitcast_convert_type(tiles[which], jnp.bfloat16)
        return jnp.einsum("gd,td->gt", group, data, preferred_element_type=jnp.float32)

    # Steps of IVF_ITEM_BATCH items, only as many as hold real items (`num_items`, traced):
    # the padding items that make the shapes few are never scored (no slot refers to them).
    batch = min(IVF_ITEM_BATCH, item_tile.shape[0])
    steps = item_tile.shape[0] // batch  # `_plan` pads to whole steps
    blocks = (item_tile.reshape(steps, batch), item_queries.reshape(steps, batch, -1))

    def step(i: jax.Array, out: jax.Array) -> jax.Array:
        items = (blocks[0][i], blocks[1][i])
        return lax.dynamic_update_index_in_dim(out, jax.vmap(score)(items), i, 0)

    group = item_queries.shape[1]
    scores = jnp.zeros((steps, batch, group, tile), jnp.float32)
    scores = lax.fori_loop(0, jnp.minimum(-(-num_items // batch), steps), step, scores)
    none = steps * batch * group  # the slot index of "no slot"
    scores = jnp.concatenate([scores.reshape(-1, tile), jnp.full((1, tile), -jnp.inf)])
    slot_tile = jnp.concatenate(
        [jnp.repeat(item_tile, item_queries.shape[1]), jnp.zeros(1, jnp.int32)]
    )

    def merge(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
        slots, query, excluded = xs
        found = tile_rows[slot_tile[slots]]  # [C, tile]
        keep = (found >= 0) & (found != excluded) & (slots < none)[:, None]
        candidates = jnp.where(keep, scores[slots], -jnp.inf).reshape(-1)
        found = found.reshape(-1)
        width = max(pool, k)
        if candidates.shape[0] < width:  # fewer candidate slots than the pool: pad
            missing = (0, width - candidates.shape[0])
            candidates = jnp.pad(candidates, missing, constant_values=-jnp.inf)
            found = jnp.pad(found, missing, constant_values=-1)
        top, at = lax.top_k(candidates, width)
        found = jnp.where(top > -jnp.inf, found[at], -1)
        if exact:
            rescored = top
        else:
            data = rows[jnp.maximum(found, 0)].astype(jnp.float32)
            rescored = jnp.where(top > -jnp.inf, data @ query, -jnp.inf)
        found, rescored = lax.sort((found, rescored), num_keys=1)  # ties: lower row first
        best, at = lax.top_k(rescored, k)
        # top.min(), not top[-1]: slicing the top_k output makes XLA:CPU replace its TopK
        # call by a full sort of the candidates (the whole search ran ~5x slower).
        floor = jnp.full((), -jnp.inf) if exact else top.min()
        return best, jnp.where(best > -jnp.inf, found[at], -1), floor

    return lax.map(merge, (query_slots, queries, exclude), batch_size=IVF_MERGE_QUERIES)
