"""Query batches padded to a few bucketed sizes, so that a jitted search compiles few shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# Smallest padded query batch (batches compile at the sizes `bucket_size` allows, from here up).
MIN_QUERY_BUCKET = 8


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def bucket_size(n: int) -> int:
    """Smallest size >= n of the form m * 2**e with m in 4..7 (or n itself below 8): at most
    25% padding, and four sizes per doubling, so padded shapes (and compiles) stay few."""
    step = max(1, (1 << max(0, int(n) - 1).bit_length()) // 8)
    return round_up(n, step)


def search_bucketed(
    search: Callable[[np.ndarray, np.ndarray, int], tuple[Any, Any]],
    queries: np.ndarray,
    exclude_rows: np.ndarray,
    max_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `search(padded_queries, padded_exclude, n)` on chunks padded to `bucket_size` sizes.

    Every chunk is dispatched before any result is read back, so host-side padding overlaps
    device work.

    Returns:
      The first n (scores, rows) of every chunk, concatenated; rows as int64.
    """
    results = []
    for start in range(0, len(queries), max_batch):
        chunk = queries[start : start + max_batch]
        n = len(chunk)
        size = min(max_batch, bucket_size(max(MIN_QUERY_BUCKET, n)))
        padded = np.zeros((size, queries.shape[1]), np.float32)
        padded[:n] = chunk
        exclude = np.full(size, -1, np.int32)
        exclude[:n] = exclude_rows[start : start + n]
        results.append((n, search(padded, exclude, n)))
    scores = np.concatenate([np.asarray(s)[:n] for n, (s, _) in results])
    rows = np.concatenate([np.asarray(r)[:n] for n, (_, r) in results])
    return scores, rows.astype(np.int64)
