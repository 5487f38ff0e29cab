"""Dense index (CPU): cm3jax exact / IVF search vs FAISS IndexFlatIP / IndexIVFFlat.

    python benchmarks/index.py                                # 100k x 512, batch 256, k 10, ~1 min
    python benchmarks/index.py --rows 20000 --dim 256 --runs 3 # quick, ~10 s

Memory: `--rows` unit-norm float32 vectors of `--dim` dimensions drawn around `--clusters`
random centres (so IVF has structure to find); queries are `--batch` fresh draws from the
same mixture. Both sides run in this process on every device jax sees (one CPU device
unless XLA_FLAGS asks for more) and all host cores.

Exact search: `DenseIndex.search(queries, k)` (jax backend, float32 matmul, and the opt-in
bfloat16 matmul with float32 re-scoring) against a bare `faiss.IndexFlatIP` with its default
thread count and with 1 thread (on a busy 2-core host, FAISS's OpenMP spin-waiting can make
its 2-thread run slower than 1 thread; the faster FAISS setting is the baseline). Each
configuration is compiled / warmed up first, then `--runs` rounds time one batch of each
in turn, alternating the order; q/s = batch / median seconds (best-of also printed).
IVF: k-means build time, then q/s and recall@k against the exact results for each
`--nprobe`, for cm3jax and for faiss.IndexIVFFlat over the same k-means centroids
(`DenseIndex(..., options=SearchOptions(backend='faiss'))`, FAISS's faster thread count).

ratio = cm3jax exact float32 q/s / best FAISS IndexFlatIP q/s (both exact). The last line of
stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from cm3jax.retrieval.index import DenseIndex, SearchOptions


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="memory size N")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument(
        "--clusters", type=int, default=5000, help="mixture centres of the synthetic data"
    )
    parser.add_argument(
        "--noise", type=float, default=1.0, help="norm of the Gaussian noise added to a unit centre"
    )
    parser.add_argument("--batch", type=int, default=256, help="queries per search call")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--nlist", type=int, default=256, help="IVF lists")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32], help="IVF lists probed")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def around(centres: np.ndarray, rows: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-norm float32 rows, each a random centre plus Gaussian noise of norm ~`noise`."""
    x = centres[rng.integers(len(centres), size=rows)]
    return unit(x + rng.standard_normal(x.shape, dtype=np.float32) * (noise / np.sqrt(x.shape[1])))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k ids that were found."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def time_rounds(searches: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds of each search per round, after one untimed warm-up call each; the order of
    the searches alternates between rounds."""
    for search in searches.values():
        search()
    seconds: dict[str, list[float]] = {name: [] for name in searches}
    names = list(searches)
    for round_ in range(runs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            searches[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    args = parse_args()
    import faiss

    rng = np.random.default_rng(args.seed)
    centres = unit(rng.standard_normal((args.clusters, args.dim), dtype=np.float32))
    memory = around(centres, args.rows, args.noise, rng)
    queries = around(centres, args.batch, args.noise, rng)
    ids = np.arange(args.rows, dtype=np.int64)
    k = args.k
    threads = faiss.omp_get_max_threads()
    print(
        f"memory {args.rows} x {args.dim} float32, batch {args.batch}, k {k}, "
        f"{jax.device_count()} jax device(s), {os.cpu_count()} cores, faiss threads {threads}",
        flush=True,
    )

    exact = DenseIndex.build(memory, ids, encoder_checksum="benchmark")
    bf16 = DenseIndex.build(
        memory, ids, encoder_checksum="benchmark", options=SearchOptions(matmul_dtype="bfloat16")
    )
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(memory)

    def faiss_search(num_threads: int) -> Callable[[], object]:
        def search() -> object:
            faiss.omp_set_num_threads(num_threads)
            return flat.search(queries, k)

        return search

    searches = {
        "cm3jax exact f32": lambda: exact.search(queries, k),
        "cm3jax exact bf16+rescore": lambda: bf16.search(queries, k),
        f"faiss IndexFlatIP ({threads} threads)": faiss_search(threads),
        "faiss IndexFlatIP (1 thread)": faiss_search(1),
    }
    seconds = time_rounds(searches, args.runs)
    qps = {name: args.batch / statistics.median(s) for name, s in seconds.items()}
    best_qps = {name: args.batch / min(s) for name, s in seconds.items()}
    baseline = max(
        qps[f"faiss IndexFlatIP ({threads} threads)"], qps["faiss IndexFlatIP (1 thread)"]
    )
    ivf_threads = threads if baseline == qps[f"faiss IndexFlatIP ({threads} threads)"] else 1
    faiss.omp_set_num_threads(ivf_threads)  # IVF: FAISS's faster thread count from above
    truth_scores, truth = exact.search(queries, k)
    faiss_scores, faiss_ids = flat.search(queries, k)
    checks = {
        "cm3jax exact f32": 1.0,
        "cm3jax exact bf16+rescore": recall(bf16.search(queries, k)[1], truth),
        f"faiss IndexFlatIP ({threads} threads)": recall(faiss_ids, truth),
        "faiss IndexFlatIP (1 thread)": recall(faiss_ids, truth),
    }

    start = time.perf_counter()
    ivf = DenseIndex.build(memory, ids, encoder_checksum="benchmark", mode="ivf", nlist=args.nlist)
    build_seconds = time.perf_counter() - start
    ivf_faiss = DenseIndex(
        memory,
        ids,
        encoder_checksum="benchmark",
        ivf=ivf.ivf,
        options=SearchOptions(backend="faiss"),
    )
    ivf_rows = []
    for nprobe in args.nprobe:
        ivf_seconds = time_rounds(
            {
                "cm3jax": functools.partial(ivf.search, queries, k, nprobe=nprobe),
                "faiss": functools.partial(ivf_faiss.search, queries, k, nprobe=nprobe),
            },
            args.runs,
        )
        ivf_rows.append(
            {
                "nprobe": nprobe,
                "cm3jax_qps": args.batch / statistics.median(ivf_seconds["cm3jax"]),
                "cm3jax_recall": recall(ivf.search(queries, k, nprobe=nprobe)[1], truth),
                "faiss_qps": args.batch / statistics.median(ivf_seconds["faiss"]),
                "faiss_recall": recall(ivf_faiss.search(queries, k, nprobe=nprobe)[1], truth),
            }
        )

    print(f"\n{'exact search':<34} {'q/s (median)':>12} {'q/s (best)':>11} {'recall@k':>9}")
    for name in searches:
        print(f"{name:<34} {qps[name]:>12.0f} {best_qps[name]:>11.0f} {checks[name]:>9.3f}")
    print(f"max |score - faiss score|: {np.abs(truth_scores - faiss_scores).max():.2e}")
    print(
        f"\nIVF nlist {args.nlist}: k-means + lists built in {build_seconds:.1f} s; "
        f"faiss with {ivf_threads} thread(s)"
    )
    print(f"{'nprobe':>6} {'cm3jax q/s':>11} {'recall@k':>9} {'faiss q/s':>10} {'recall@k':>9}")
    for row in ivf_rows:
        print(
            f"{row['nprobe']:>6} {row['cm3jax_qps']:>11.0f} {row['cm3jax_recall']:>9.3f} "
            f"{row['faiss_qps']:>10.0f} {row['faiss_recall']:>9.3f}"
        )
    ratio = qps["cm3jax exact f32"] / baseline
    print(f"\nratio cm3jax exact f32 / best faiss IndexFlatIP: {ratio:.2f}x")
    print(
        json.dumps(
            {
                "ratio": round(ratio, 3),
                "ratio_bf16": round(qps["cm3jax exact bf16+rescore"] / baseline, 3),
                "cm3jax_exact_qps": round(qps["cm3jax exact f32"], 1),
                "cm3jax_bf16_qps": round(qps["cm3jax exact bf16+rescore"], 1),
                "cm3jax_bf16_recall": round(checks["cm3jax exact bf16+rescore"], 4),
                "faiss_flat_qps": round(qps[f"faiss IndexFlatIP ({threads} threads)"], 1),
                "faiss_flat_1thread_qps": round(qps["faiss IndexFlatIP (1 thread)"], 1),
                "faiss_flat_recall": round(checks["faiss IndexFlatIP (1 thread)"], 4),
                "ivf_build_s": round(build_seconds, 2),
                "ivf": [{key: round(value, 3) for key, value in row.items()} for row in ivf_rows],
                "rows": args.rows,
                "dim": args.dim,
                "batch": args.batch,
                "k": k,
                "nlist": args.nlist,
                "runs": args.runs,
                "jax_devices": jax.device_count(),
                "cpu_count": os.cpu_count(),
                "faiss_threads": threads,
                "faiss_ivf_threads": ivf_threads,
                "machine": platform.machine(),
                "jax": jax.__version__,
                "faiss": faiss.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
