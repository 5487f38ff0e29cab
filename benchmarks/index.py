"""Dense index (CPU): cm3jax exact / IVF search vs FAISS IndexFlatIP / IndexIVFFlat.

    python benchmarks/index.py                                # 100k x 512, batch 256, k 10, ~3 min
    python benchmarks/index.py --rows 20000 --dim 256 --runs 3 # quick, ~30 s
    python benchmarks/index.py --data blobs --nlist 256        # the earlier, isotropic-cluster data

Memory (`--data`, both unit-norm float32, queries are fresh draws from the same distribution,
never memory rows):

- clip (default): a CLIP-like mixture. Each vector is the unit-normalised sum of a shared
  mean direction (weight 0.6: CLIP embeddings are anisotropic), one of `--clusters` 2000
  cluster centres (norm 1; picked with Zipf-like frequency ~ rank**-0.7, so there are head and
  tail concepts; the centres themselves lie around 100 topic directions, cosine 0.36 between
  clusters of a topic), an offset in the cluster's own random 8-dimensional subspace (norm
  0.8, so a cluster is a continuum, not equidistant points), a global Gaussian with a
  power-law spectrum (variance of component i ~ 1/i over all D dimensions, norm 1.15:
  fine-grained variation shared across clusters) and isotropic noise (norm 0.5). At 100k x
  512 the mean cosine of a query's 1st / 10th / 100th neighbour is about 0.59 / 0.50 / 0.37
  and of a random pair 0.10 +- 0.08; IVF with nlist 1024 needs about 2.5% of the rows
  scanned for recall@10 0.95: between the easy image-descriptor sets (SIFT / Deep: ~1%) and
  the hard word-vector sets (GloVe: ~10%). The script prints these statistics.
- blobs: the earlier memory, `--clusters` 5000 isotropic Gaussian clusters (noise norm 1.0,
  20 rows per cluster). A query's 10 neighbours are 10 of its cluster's 20 rows, with nothing
  else near, so IVF is hard while lists mix many clusters (nlist 256: recall@10 0.94 at 12%
  scanned) and trivial once nlist nears the number of clusters (nlist 1024: 0.97 at 0.4%).
  Uniform random data would be IVF's worst case; neither extreme is representative.

Both sides run in this process on every device jax sees (one CPU device unless XLA_FLAGS
asks for more) and all host cores. Each configuration is compiled / warmed up first, then
`--runs` rounds time one batch of each in turn, alternating the order; q/s = batch / median
seconds (best-of also printed for exact search).

Exact search: `DenseIndex.search(queries, k)` (jax backend, float32 matmul, and the opt-in
bfloat16 matmul with float32 re-scoring) against a bare `faiss.IndexFlatIP` with its default
thread count and with 1 thread (on a busy 2-core host, FAISS's OpenMP spin-waiting can make
its 2-thread run slower than 1 thread; the faster FAISS setting is the baseline).
ratio = cm3jax exact float32 q/s / best FAISS IndexFlatIP q/s, and exact_recall_identical
says whether cm3jax's ids equal FAISS's for every query up to the order of tied scores.

IVF: `--nlist` lists (default: the power of two nearest 4 sqrt(N), FAISS's rule of thumb;
1024 at 100k), k-means build time, then for each `--nprobe` cm3jax IVF, cm3jax exact and
faiss.IndexIVFFlat over the same centroids (faster FAISS thread count) timed in the same
rounds; recall@k against the exact results. speed-up = IVF q/s / exact q/s of the same rounds.
The reported operating point (approx_*) is the sweep point with the highest speed-up among
those with recall@k >= `--target-recall` (0.95); if none reaches it, the highest recall.

The last line of stdout is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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

# clip data: weights of the mean direction, cluster centre, within-cluster offset, power-law
# Gaussian and isotropic noise; topic count, within-cluster rank, cluster frequency exponent.
CLIP_MEAN, CLIP_CENTRE, CLIP_OFFSET, CLIP_GLOBAL, CLIP_NOISE = 0.6, 1.0, 0.8, 1.15, 0.5
CLIP_TOPICS, CLIP_TOPIC_WEIGHT, CLIP_RANK, CLIP_ZIPF = 100, 0.6, 8, 0.7
DEFAULT_CLUSTERS = {"clip": 2000, "blobs": 5000}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="memory size N")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--data", choices=("clip", "blobs"), default="clip", help="see the doc")
    parser.add_argument(
        "--clusters", type=int, default=None, help="clusters (default 2000 clip, 5000 blobs)"
    )
    parser.add_argument("--batch", type=int, default=256, help="queries per search call")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: see doc)")
    parser.add_argument("--kmeans-iterations", type=int, default=20, help="IVF k-means iterations")
    parser.add_argument(
        "--nprobe",
        type=int,
        nargs="+",
        default=[8, 12, 16, 20, 24, 32, 48, 64],
        help="IVF lists probed (the sweep)",
    )
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def blobs(
    rng: np.random.Generator, rows: int, queries: int, dim: int, clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Memory and queries: a random unit centre plus Gaussian noise of norm ~1 each."""
    centres = unit(rng.standard_normal((clusters, dim), dtype=np.float32))

    def draw(n: int) -> np.ndarray:
        x = centres[rng.integers(clusters, size=n)]
        return unit(x + rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(dim))

    return draw(rows), draw(queries)


def clip_like(
    rng: np.random.Generator, rows: int, queries: int, dim: int, clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Memory and queries of the CLIP-like mixture described in the module doc."""
    mean = unit(rng.standard_normal((1, dim), dtype=np.float32))
    topics = unit(rng.standard_normal((CLIP_TOPICS, dim), dtype=np.float32))
    own = unit(rng.standard_normal((clusters, dim), dtype=np.float32))
    centres = unit(
        CLIP_TOPIC_WEIGHT * topics[rng.integers(CLIP_TOPICS, size=clusters)]
        + math.sqrt(1 - CLIP_TOPIC_WEIGHT**2) * own
    )
    frequency = (np.arange(clusters) + 1.0) ** -CLIP_ZIPF
    frequency /= frequency.sum()
    rank = min(CLIP_RANK, dim)
    bases = np.linalg.qr(rng.standard_normal((clusters, dim, rank), dtype=np.float32))[0]
    spectrum = 1.0 / np.arange(1, dim + 1)
    spectrum /= spectrum.sum()
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    global_map = (rotation * np.sqrt(spectrum)[None, :]).T.astype(np.float32)

    def draw(n: int) -> np.ndarray:
        out = np.empty((n, dim), np.float32)
        for start in range(0, n, 8192):  # bounded [chunk, D, rank] temporaries
            m = min(8192, n - start)
            who = rng.choice(clusters, size=m, p=frequency)
            offset = rng.standard_normal((m, rank), dtype=np.float32)
            offset *= CLIP_OFFSET / math.sqrt(rank)
            x = CLIP_MEAN * mean + CLIP_CENTRE * centres[who]
            x += np.einsum("mdr,mr->md", bases[who], offset)
            x += CLIP_GLOBAL * (rng.standard_normal((m, dim), dtype=np.float32) @ global_map)
            x += rng.standard_normal((m, dim), dtype=np.float32) * (CLIP_NOISE / math.sqrt(dim))
            out[start : start + m] = unit(x)
        return out

    return draw(rows), draw(queries)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k ids that were found."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def identical_up_to_ties(
    ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray, scores_b: np.ndarray, tol: float
) -> tuple[bool, int]:
    """(whether two top-k results agree up to the order of tied scores, queries whose ids
    differ at all). Scores must agree rank by rank within `tol`; an id found by one side only
    must score within `tol` of the k-th score (a tie at the cut)."""
    if not np.allclose(scores_a, scores_b, rtol=0, atol=tol):
        return False, int((ids_a != ids_b).any(axis=1).sum())
    differing = 0
    for a, sa, b, sb in zip(ids_a, scores_a, ids_b, scores_b):
        if (a == b).all():
            continue
        differing += 1
        score_of = dict(zip(a.tolist(), sa.tolist())) | dict(zip(b.tolist(), sb.tolist()))
        cut = min(sa[-1], sb[-1])
        if any(score_of[i] > cut + tol for i in set(a.tolist()) ^ set(b.tolist())):
            return False, differing
    return True, differing


def neighbour_stats(memory: np.ndarray, queries: np.ndarray, rng: np.random.Generator) -> dict:
    """Mean cosine of the 1st / 10th / 100th neighbour (64 queries) and of random pairs."""
    scores = queries[:64] @ memory.T
    top = -np.sort(-np.partition(scores, scores.shape[1] - 100, axis=1)[:, -100:], axis=1)
    a, b = rng.integers(len(memory), size=(2, 4096))
    pairs = np.einsum("nd,nd->n", memory[a], memory[b])
    return {
        "top1": float(top[:, 0].mean()),
        "top10": float(top[:, 9].mean()),
        "top100": float(top[:, 99].mean()),
        "random": float(pairs.mean()),
        "random_std": float(pairs.std()),
    }


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
    clusters = args.clusters or DEFAULT_CLUSTERS[args.data]
    make = clip_like if args.data == "clip" else blobs
    memory, queries = make(rng, args.rows, args.batch, args.dim, clusters)
    ids = np.arange(args.rows, dtype=np.int64)
    k = args.k
    nlist = args.nlist or 2 ** round(math.log2(4 * math.sqrt(args.rows)))
    threads = faiss.omp_get_max_threads()
    stats = neighbour_stats(memory, queries, rng)
    print(
        f"memory {args.rows} x {args.dim} float32 ({args.data}, {clusters} clusters), batch "
        f"{args.batch}, k {k}, {jax.device_count()} jax device(s), {os.cpu_count()} cores, "
        f"faiss threads {threads}\nmean cosine: 1st neighbour {stats['top1']:.3f}, 10th "
        f"{stats['top10']:.3f}, 100th {stats['top100']:.3f}, random pair {stats['random']:.3f}"
        f" +- {stats['random_std']:.3f}",
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
    identical, differing = identical_up_to_ties(truth, truth_scores, faiss_ids, faiss_scores, 1e-5)
    checks = {
        "cm3jax exact f32": 1.0,
        "cm3jax exact bf16+rescore": recall(bf16.search(queries, k)[1], truth),
        f"faiss IndexFlatIP ({threads} threads)": recall(faiss_ids, truth),
        "faiss IndexFlatIP (1 thread)": recall(faiss_ids, truth),
    }

    start = time.perf_counter()
    ivf = DenseIndex.build(
        memory,
        ids,
        encoder_checksum="benchmark",
        mode="ivf",
        nlist=nlist,
        kmeans_iterations=args.kmeans_iterations,
    )
    build_seconds = time.perf_counter() - start
    ivf_faiss = DenseIndex(
        memory,
        ids,
        encoder_checksum="benchmark",
        ivf=ivf.ivf,
        options=SearchOptions(backend="faiss"),
    )
    sizes = np.diff(ivf.ivf.offsets)
    ivf_rows = []
    for nprobe in args.nprobe:
        ivf_seconds = time_rounds(
            {
                "cm3jax": functools.partial(ivf.search, queries, k, nprobe=nprobe),
                "exact": functools.partial(exact.search, queries, k),
                "faiss": functools.partial(ivf_faiss.search, queries, k, nprobe=nprobe),
            },
            args.runs,
        )
        probes = np.argsort(-(queries @ ivf.ivf.centroids.T), axis=1)[:, :nprobe]
        median = {name: statistics.median(s) for name, s in ivf_seconds.items()}
        ivf_rows.append(
            {
                "nprobe": nprobe,
                "scanned": float(sizes[probes].sum(axis=1).mean() / args.rows),
                "cm3jax_qps": args.batch / median["cm3jax"],
                "cm3jax_recall": recall(ivf.search(queries, k, nprobe=nprobe)[1], truth),
                "speedup": median["exact"] / median["cm3jax"],
                "exact_qps": args.batch / median["exact"],
                "faiss_qps": args.batch / median["faiss"],
                "faiss_recall": recall(ivf_faiss.search(queries, k, nprobe=nprobe)[1], truth),
            }
        )
        print(
            f"  nprobe {nprobe}: recall {ivf_rows[-1]['cm3jax_recall']:.3f}, "
            f"speed-up {ivf_rows[-1]['speedup']:.2f}x",
            flush=True,
        )
    reaching = [row for row in ivf_rows if row["cm3jax_recall"] >= args.target_recall]
    point = (
        max(reaching, key=lambda row: row["speedup"])
        if reaching
        else max(ivf_rows, key=lambda row: (row["cm3jax_recall"], row["speedup"]))
    )

    print(f"\n{'exact search':<34} {'q/s (median)':>12} {'q/s (best)':>11} {'recall@k':>9}")
    for name in searches:
        print(f"{name:<34} {qps[name]:>12.0f} {best_qps[name]:>11.0f} {checks[name]:>9.3f}")
    print(
        f"max |score - faiss score|: {np.abs(truth_scores - faiss_scores).max():.2e}; ids equal "
        f"to faiss up to tie order: {identical} ({differing} queries differ only in tied ids)"
    )
    print(
        f"\nIVF nlist {nlist}: k-means ({args.kmeans_iterations} iterations) + lists built in "
        f"{build_seconds:.1f} s; list sizes {sizes.min()}..{sizes.max()}; faiss with "
        f"{ivf_threads} thread(s); speed-up vs cm3jax exact timed in the same rounds"
    )
    print(
        f"{'nprobe':>6} {'scanned':>8} {'cm3jax q/s':>11} {'recall@k':>9} {'speed-up':>9} "
        f"{'exact q/s':>10} {'faiss q/s':>10} {'recall@k':>9}"
    )
    for row in ivf_rows:
        print(
            f"{row['nprobe']:>6} {row['scanned']:>8.1%} {row['cm3jax_qps']:>11.0f} "
            f"{row['cm3jax_recall']:>9.3f} {row['speedup']:>8.2f}x {row['exact_qps']:>10.0f} "
            f"{row['faiss_qps']:>10.0f} {row['faiss_recall']:>9.3f}"
        )
    ratio = qps["cm3jax exact f32"] / baseline
    print(f"\nratio cm3jax exact f32 / best faiss IndexFlatIP: {ratio:.2f}x")
    print(
        f"IVF operating point (best speed-up at recall@{k} >= {args.target_recall}): nprobe "
        f"{point['nprobe']}, recall {point['cm3jax_recall']:.3f}, {point['speedup']:.2f}x exact"
    )
    print(
        json.dumps(
            {
                "ratio": round(ratio, 3),
                "exact_recall_identical": identical,
                "approx_recall_at_10" if k == 10 else f"approx_recall_at_{k}": round(
                    point["cm3jax_recall"], 4
                ),
                "approx_speedup": round(point["speedup"], 2),
                "approx_nprobe": point["nprobe"],
                "approx_target_met": point["cm3jax_recall"] >= args.target_recall
                and point["speedup"] >= 5.0,
                "ratio_bf16": round(qps["cm3jax exact bf16+rescore"] / baseline, 3),
                "cm3jax_exact_qps": round(qps["cm3jax exact f32"], 1),
                "cm3jax_bf16_qps": round(qps["cm3jax exact bf16+rescore"], 1),
                "cm3jax_bf16_recall": round(checks["cm3jax exact bf16+rescore"], 4),
                "faiss_flat_qps": round(qps[f"faiss IndexFlatIP ({threads} threads)"], 1),
                "faiss_flat_1thread_qps": round(qps["faiss IndexFlatIP (1 thread)"], 1),
                "faiss_flat_recall": round(checks["faiss IndexFlatIP (1 thread)"], 4),
                "exact_queries_differing_in_ties": differing,
                "ivf_build_s": round(build_seconds, 2),
                "ivf": [{key: round(value, 4) for key, value in row.items()} for row in ivf_rows],
                "data": args.data,
                "neighbour_cosines": {key: round(value, 3) for key, value in stats.items()},
                "rows": args.rows,
                "dim": args.dim,
                "clusters": clusters,
                "batch": args.batch,
                "k": k,
                "nlist": nlist,
                "kmeans_iterations": args.kmeans_iterations,
                "target_recall": args.target_recall,
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
