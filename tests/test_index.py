"""Dense index: exact search vs a numpy reference on 8 fake devices, IVF, FAISS, persistence."""

from __future__ import annotations

import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from cm3jax.errors import UserError
from cm3jax.retrieval import index as index_lib
from cm3jax.retrieval import index_io
from cm3jax.retrieval import ivf as ivf_lib
from cm3jax.retrieval.index import DenseIndex, SearchOptions

COUNT, DIM, NUM_QUERIES, K = 1003, 32, 24, 10  # 1003: not a multiple of 8 devices x 64 rows
CHECKSUM = "encoder-sha256:1234"
SMALL_BLOCKS = SearchOptions(block_rows=64)  # 2 blocks of 64 per device, 21 padding rows


def reference(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force numpy top-k: scores descending, lower row first on ties."""
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, 1).astype(np.float32), rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def clustered(rng: np.random.Generator, centres: np.ndarray, rows: int, noise: float) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=rows)]
    x = x + rng.standard_normal(x.shape) * noise / np.sqrt(x.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embeddings": rng.standard_normal((COUNT, DIM)).astype(np.float32),
        "ids": (10**12 + rng.permutation(10 * COUNT)[:COUNT]).astype(np.int64),
        "queries": rng.standard_normal((NUM_QUERIES, DIM)).astype(np.float32),
    }


@pytest.fixture(scope="module")
def exact(data) -> DenseIndex:
    return DenseIndex.build(
        data["embeddings"], data["ids"], encoder_checksum=CHECKSUM, options=SMALL_BLOCKS
    )


@pytest.fixture(scope="module")
def ivf(data) -> DenseIndex:
    return DenseIndex.build(
        data["embeddings"], data["ids"], encoder_checksum=CHECKSUM, mode="ivf", nlist=16
    )


@pytest.fixture(scope="module")
def saved(exact, tmp_path_factory):
    return exact.save(tmp_path_factory.mktemp("index") / "exact")


def test_exact_matches_numpy_reference_on_8_devices(exact, data):
    assert jax.device_count() == 8, "conftest.py must give jax 8 CPU devices"
    assert len(exact.sharding.device_set) == 8
    assert not exact.sharding.is_fully_replicated  # rows split over the devices, not copied
    scores, ids = exact.search(data["queries"], K)
    want_scores, want_rows = reference(data["embeddings"], data["queries"], K)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, data["ids"][want_rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_one_device_gives_the_same_results(exact, data):
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("rows",))
    single = DenseIndex.build(
        data["embeddings"],
        data["ids"],
        encoder_checksum=CHECKSUM,
        options=SearchOptions(mesh=mesh, block_rows=128),
    )
    assert len(single.sharding.device_set) == 1
    scores, ids = single.search(data["queries"], K)
    want_scores, want_ids = exact.search(data["queries"], K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)


def test_query_batches_of_any_size_agree(data):
    index = DenseIndex.build(
        data["embeddings"],
        data["ids"],
        encoder_checksum=CHECKSUM,
        options=SearchOptions(block_rows=64, query_batch=16),
    )
    _, all_ids = index.search(data["queries"], K)  # 24 queries: chunks of 16 + 8
    for n in (1, 3, 13):
        np.testing.assert_array_equal(index.search(data["queries"][:n], K)[1], all_ids[:n])
    # Padded batch sizes 16, 8 (also for 1 and 3) and 14: three compiles, not one per size.
    assert index._searcher._search._cache_size() == 3
    scores, ids = index.search(np.zeros((0, DIM), np.float32), K)
    assert scores.shape == ids.shape == (0, K)


def test_padding_rows_are_never_returned():
    # Every real score is negative, so a zero padding row (score 0) would win if unmasked.
    rng = np.random.default_rng(1)
    embeddings = rng.uniform(0.1, 1.0, (13, 8)).astype(np.float32)
    ids = np.arange(100, 113)
    query = -np.ones((2, 8), np.float32)
    index = DenseIndex.build(embeddings, ids, encoder_checksum=CHECKSUM, options=SMALL_BLOCKS)
    scores, found = index.search(query, 20)  # k > N: 13 results, then -inf / -1
    want_scores, want_rows = reference(embeddings, query, 13)
    np.testing.assert_array_equal(found[:, :13], ids[want_rows])
    np.testing.assert_allclose(scores[:, :13], want_scores, rtol=1e-6)
    assert (found[:, 13:] == -1).all() and np.isneginf(scores[:, 13:]).all()


def test_ties_keep_the_lower_row_first():
    # Small integers: every inner product is exact in float32, so duplicate rows tie exactly.
    base = np.random.default_rng(2).integers(-3, 4, (40, 8)).astype(np.float32)
    embeddings = np.concatenate([base, base, base])  # rows r, r + 40, r + 80 tie
    ids = np.arange(120)[::-1].copy()
    index = DenseIndex.build(embeddings, ids, encoder_checksum=CHECKSUM, options=SMALL_BLOCKS)
    queries = base[:4]
    _, found = index.search(queries, 9)
    _, want_rows = reference(embeddings, queries, 9)
    np.testing.assert_array_equal(found, ids[want_rows])


def test_exclude_ids_drops_the_query_document(exact, data):
    _, ids = exact.search(data["queries"], K)
    exclude = ids[:, 0].copy()
    exclude[0] = -1  # nothing excluded
    exclude[1] = 7  # an id that is not in the index
    _, kept = exact.search(data["queries"], K, exclude_ids=exclude)
    np.testing.assert_array_equal(kept[:2], ids[:2])
    np.testing.assert_array_equal(kept[2:, : K - 1], ids[2:, 1:])
    assert not (kept[2:] == exclude[2:, None]).any()
    with pytest.raises(UserError, match="exclude_ids has shape"):
        exact.search(data["queries"], K, exclude_ids=exclude[:3])


def test_float16_storage(data, tmp_path):
    half = data["embeddings"].astype(np.float16)
    index = DenseIndex.build(half, data["ids"], encoder_checksum=CHECKSUM, options=SMALL_BLOCKS)
    assert index.dtype == np.float16
    scores, ids = index.search(data["queries"], K)
    want_scores, want_rows = reference(half.astype(np.float32), data["queries"], K)
    np.testing.assert_array_equal(ids, data["ids"][want_rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    loaded = DenseIndex.load(index.save(tmp_path / "half"), options=SMALL_BLOCKS)
    assert loaded.dtype == np.float16 and loaded.manifest["dtype"] == "float16"
    np.testing.assert_array_equal(loaded.search(data["queries"], K)[1], ids)


def test_bfloat16_matmul_rescores_in_float32(exact, data):
    fast = DenseIndex.build(
        data["embeddings"],
        data["ids"],
        encoder_checksum=CHECKSUM,
        options=SearchOptions(block_rows=64, matmul_dtype="bfloat16"),
    )
    scores, ids = fast.search(data["queries"], K)
    want_scores, want_ids = exact.search(data["queries"], K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_ivf_lists_are_a_csr_partition_and_kmeans_is_deterministic(ivf, data):
    lists = ivf.ivf
    assert lists.nlist == 16 and lists.offsets[0] == 0 and lists.offsets[-1] == COUNT
    np.testing.assert_array_equal(np.sort(lists.rows), np.arange(COUNT))
    np.testing.assert_allclose(np.linalg.norm(lists.centroids, axis=1), 1.0, rtol=1e-5)
    again = index_lib.spherical_kmeans(data["embeddings"], 16, iterations=20, seed=0)
    np.testing.assert_array_equal(again, lists.centroids)


def test_ivf_with_every_list_probed_equals_exact(ivf, exact, data):
    scores, ids = ivf.search(data["queries"], K, nprobe=16)
    want_scores, want_ids = exact.search(data["queries"], K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    exclude = want_ids[:, 0]
    np.testing.assert_array_equal(
        ivf.search(data["queries"], K, nprobe=16, exclude_ids=exclude)[1],
        exact.search(data["queries"], K, exclude_ids=exclude)[1],
    )


def test_ivf_recall_on_clustered_data():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((64, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    embeddings = clustered(rng, centres, 4000, noise=1.0)
    queries = clustered(rng, centres, 64, noise=1.0)
    index = DenseIndex.build(
        embeddings,
        np.arange(4000),
        encoder_checksum=CHECKSUM,
        mode="ivf",
        nlist=32,
        options=SearchOptions(nprobe=4),
    )
    _, truth = reference(embeddings, queries, 10)
    _, found = index.search(queries, 10)
    assert recall(found, truth) >= 0.9


def test_ivf_probed_lists_give_their_exact_top_k_and_pad_the_rest(ivf, data):
    # nprobe 1, k larger than any list: every row of the probed list, in exact order, then -1.
    k = 200
    scores, ids = ivf.search(data["queries"], k, nprobe=1)
    lists = ivf.ivf
    probed = np.argmax(data["queries"] @ lists.centroids.T, axis=1)
    for q, best in enumerate(probed):
        members = lists.rows[lists.offsets[best] : lists.offsets[best + 1]]
        query = data["queries"][q : q + 1]
        want_scores, want_at = reference(data["embeddings"][members], query, len(members))
        np.testing.assert_array_equal(ids[q, : len(members)], data["ids"][members[want_at[0]]])
        np.testing.assert_allclose(scores[q, : len(members)], want_scores[0], rtol=1e-5, atol=1e-5)
        assert (ids[q, len(members) :] == -1).all() and np.isneginf(scores[q, len(members) :]).all()


def test_ivf_float32_fallback_when_the_bf16_pool_is_not_certified(ivf, exact, data):
    # An infinite error bound certifies no bf16 pool: every query is searched again in float32.
    fallback = DenseIndex(data["embeddings"], data["ids"], encoder_checksum=CHECKSUM, ivf=ivf.ivf)
    fallback._searcher._error = np.inf
    scans = []
    scan = fallback._searcher._scan
    fallback._searcher._scan = lambda *args: scans.append(args[-1]) or scan(*args)
    exclude = exact.search(data["queries"], K)[1][:, 0]
    for nprobe in (16, 3):
        scores, ids = fallback.search(data["queries"], K, nprobe=nprobe, exclude_ids=exclude)
        want_scores, want_ids = ivf.search(data["queries"], K, nprobe=nprobe, exclude_ids=exclude)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    assert scans == [False, True, False, True]  # each bf16 scan re-run in float32


def test_ivf_ties_keep_the_lower_row_first():
    base = np.random.default_rng(2).integers(-3, 4, (40, 8)).astype(np.float32)
    embeddings = np.concatenate([base, base, base])  # rows r, r + 40, r + 80 tie exactly
    ids = np.arange(120)[::-1].copy()
    index = DenseIndex.build(embeddings, ids, encoder_checksum=CHECKSUM, mode="ivf", nlist=4)
    _, found = index.search(base[:4], 9, nprobe=4)
    np.testing.assert_array_equal(found, ids[reference(embeddings, base[:4], 9)[1]])


def test_ivf_float16_storage_with_every_list_probed_equals_exact(data):
    half = data["embeddings"].astype(np.float16)
    index = DenseIndex.build(half, data["ids"], encoder_checksum=CHECKSUM, mode="ivf", nlist=8)
    scores, ids = index.search(data["queries"], K, nprobe=8)
    want_scores, want_rows = reference(half.astype(np.float32), data["queries"], K)
    np.testing.assert_array_equal(ids, data["ids"][want_rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_ivf_query_batches_compile_few_shapes(ivf, data):
    index = DenseIndex(
        data["embeddings"],
        data["ids"],
        encoder_checksum=CHECKSUM,
        ivf=ivf.ivf,
        options=SearchOptions(query_batch=16),
    )
    _, all_ids = index.search(data["queries"], K, nprobe=3)
    for n in (1, 3, 13):
        found = index.search(data["queries"][:n], K, nprobe=3)[1]
        np.testing.assert_array_equal(found, all_ids[:n])
    np.testing.assert_array_equal(all_ids, ivf.search(data["queries"], K, nprobe=3)[1])
    # Work items and slots are padded to bucket sizes: 20 batches of 16 queries compile a
    # handful of shapes, not one per batch.
    compiled = index._searcher._search._cache_size()
    rng = np.random.default_rng(8)
    for _ in range(20):
        index.search(rng.standard_normal((16, DIM)).astype(np.float32), K, nprobe=3)
    assert index._searcher._search._cache_size() - compiled <= 6


def test_ivf_plan_scores_every_probed_tile_once_per_query():
    rng = np.random.default_rng(5)
    tiles_per_list = np.array([2, 0, 1, 3, 1])
    first_tile = np.cumsum(tiles_per_list) - tiles_per_list
    probes = np.stack([rng.choice(5, 3, replace=False) for _ in range(21)])
    query_ids = np.arange(21) * 2  # queries 0, 2, 4, ... of 42
    item_tile, item_queries, query_slots, used = ivf_lib._plan(
        probes, query_ids, 42, first_tile, tiles_per_list
    )
    group = item_queries.shape[1]
    assert (np.diff(item_tile[:used]) >= 0).all()  # items in tile order, padding after them
    assert (item_queries[used:] == -1).all() and (item_queries[:used, 0] >= 0).all()
    for q in range(42):
        slots = query_slots[q][query_slots[q] < len(item_tile) * group]
        want = set()
        if q % 2 == 0:
            for lst in probes[q // 2]:
                want |= set(range(first_tile[lst], first_tile[lst] + tiles_per_list[lst]))
        assert sorted(item_tile[slots // group]) == sorted(want)  # each probed tile once
        assert (item_queries[slots // group, slots % group] == q).all()
    filled = item_queries[item_queries >= 0]
    assert len(filled) == sum(len(s[s < len(item_tile) * group]) for s in query_slots)


def test_bf16_score_error_bounds_the_rounding():
    rng = np.random.default_rng(6)
    for dim in (8, 512):
        q = rng.standard_normal((64, dim)).astype(np.float32)
        x = (rng.standard_normal((256, dim)) * rng.uniform(0.1, 3, (256, 1))).astype(np.float32)
        exact_scores = q @ x.T
        bf16 = jnp.dot(
            jnp.asarray(q, jnp.bfloat16),
            jnp.asarray(x, jnp.bfloat16).T,
            preferred_element_type=jnp.float32,
        )
        bound = ivf_lib.bf16_score_error(dim) * np.outer(
            np.linalg.norm(q, axis=1), np.linalg.norm(x, axis=1)
        )
        assert (np.abs(np.asarray(bf16) - exact_scores) <= bound).all()


def test_kmeans_argmax_matches_argmax_with_ties():
    scores = np.random.default_rng(7).integers(0, 5, (64, 37)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(
        np.asarray(ivf_lib._argmax_rows(jnp.asarray(scores))), np.argmax(scores, axis=1)
    )


def test_faiss_backend_agrees_with_jax(exact, ivf, data):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed: FAISS backend not tested")
    flat = DenseIndex.build(
        data["embeddings"],
        data["ids"],
        encoder_checksum=CHECKSUM,
        options=SearchOptions(backend="faiss"),
    )
    assert flat.sharding is None
    want_scores, want_ids = exact.search(data["queries"], K)
    scores, ids = flat.search(data["queries"], K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    exclude = want_ids[:, 0]
    np.testing.assert_array_equal(
        flat.search(data["queries"], K, exclude_ids=exclude)[1],
        exact.search(data["queries"], K, exclude_ids=exclude)[1],
    )
    faiss_ivf = DenseIndex(
        data["embeddings"],
        data["ids"],
        encoder_checksum=CHECKSUM,
        ivf=ivf.ivf,
        options=SearchOptions(backend="faiss"),
    )
    np.testing.assert_array_equal(faiss_ivf.search(data["queries"], K, nprobe=16)[1], want_ids)
    np.testing.assert_array_equal(
        faiss_ivf.search(data["queries"], K, nprobe=3)[1],
        ivf.search(data["queries"], K, nprobe=3)[1],
    )


def test_missing_backend_names_the_package(data):
    if importlib.util.find_spec("scann") is not None:
        pytest.skip("scann is installed")
    with pytest.raises(UserError, match="'scann' package"):
        DenseIndex.build(
            data["embeddings"],
            data["ids"],
            encoder_checksum=CHECKSUM,
            options=SearchOptions(backend="scann"),
        )


def test_save_load_round_trip(saved, exact, data):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["metric"] == "ip"
    assert (manifest["dim"], manifest["count"], manifest["dtype"]) == (DIM, COUNT, "float32")
    assert (manifest["mode"], manifest["nlist"], manifest["encoder_checksum"]) == (
        "exact",
        0,
        CHECKSUM,
    )
    assert sorted(p.name for p in saved.iterdir()) == ["embeddings.npy", "ids.npy", "manifest.json"]
    loaded = DenseIndex.load(saved, expected_encoder_checksum=CHECKSUM, options=SMALL_BLOCKS)
    assert loaded.manifest == exact.manifest
    for got, want in zip(loaded.search(data["queries"], K), exact.search(data["queries"], K)):
        np.testing.assert_array_equal(got, want)


def test_ivf_save_load_round_trip(ivf, data, tmp_path):
    loaded = DenseIndex.load(ivf.save(tmp_path / "ivf"), CHECKSUM, options=SearchOptions(nprobe=3))
    assert loaded.mode == "ivf" and loaded.manifest == ivf.manifest
    np.testing.assert_array_equal(loaded.ivf.rows, ivf.ivf.rows)
    np.testing.assert_array_equal(
        loaded.search(data["queries"], K)[1], ivf.search(data["queries"], K, nprobe=3)[1]
    )


def test_query_of_the_wrong_dimension(exact, data):
    with pytest.raises(
        UserError, match=f"query dimension {DIM - 1} does not match the index dimension {DIM}"
    ):
        exact.search(data["queries"][:, 1:], K)


def test_wrong_encoder_checksum(saved):
    with pytest.raises(UserError) as error:
        DenseIndex.load(saved, expected_encoder_checksum="encoder-sha256:9999")
    for text in (str(saved), CHECKSUM, "encoder-sha256:9999"):
        assert text in str(error.value)


@pytest.mark.parametrize("name", ["manifest.json", "ids.npy", "embeddings.npy"])
def test_missing_or_corrupt_file(saved, tmp_path, name):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / name).unlink()
    with pytest.raises(UserError, match=f"{name}: missing"):
        DenseIndex.load(broken)
    (broken / name).write_bytes((saved / name).read_bytes()[:-100])  # truncated
    with pytest.raises(UserError, match=name):
        DenseIndex.load(broken)


def test_killed_save_keeps_the_old_index(saved, exact, data, monkeypatch):
    def crash(path, value):
        raise KeyboardInterrupt  # a kill after the arrays, before the manifest

    monkeypatch.setattr(index_io, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        exact.save(saved)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    DenseIndex.load(saved, CHECKSUM)
    with pytest.raises(KeyboardInterrupt):
        exact.save(saved.parent / "new")
    with pytest.raises(UserError, match="manifest.json: missing"):
        DenseIndex.load(saved.parent / "new")


def test_save_refuses_to_replace_other_directories(exact, tmp_path):
    (tmp_path / "notes.txt").write_text("not an index")
    with pytest.raises(UserError, match="refusing to replace"):
        exact.save(tmp_path)


@pytest.mark.parametrize(
    "embeddings, ids, message",
    [
        (np.zeros((4, 3), np.float64), np.arange(4), "dtype float64"),
        (np.zeros((4, 3), np.float32), np.array([0, 1, 1, 2]), "distinct"),
        (np.zeros((4, 3), np.float32), np.array([0, 1, -1, 2]), "non-negative"),
        (np.zeros((4, 3), np.float32), np.arange(3), "one per embedding row"),
        (np.full((4, 3), np.nan, np.float32), np.arange(4), "NaN"),
    ],
)
def test_bad_build_inputs(embeddings, ids, message):
    with pytest.raises(UserError, match=message):
        DenseIndex.build(embeddings, ids, encoder_checksum=CHECKSUM)


def test_bad_search_arguments(exact, ivf, data):
    with pytest.raises(UserError, match="k=0"):
        exact.search(data["queries"], 0)
    with pytest.raises(UserError, match="NaN"):
        exact.search(np.full((1, DIM), np.nan, np.float32), K)
    with pytest.raises(UserError, match="nprobe=0"):
        ivf.search(data["queries"], K, nprobe=0)
    with pytest.raises(UserError, match="exact mode only"):
        DenseIndex(
            data["embeddings"],
            data["ids"],
            encoder_checksum=CHECKSUM,
            ivf=ivf.ivf,
            options=SearchOptions(matmul_dtype="bfloat16"),
        )
