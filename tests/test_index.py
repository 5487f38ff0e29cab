"""Dense index: exact search vs a numpy reference on 8 fake devices, IVF, FAISS, persistence."""

from __future__ import annotations

import importlib.util
import json
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from cm3jax.errors import UserError
from cm3jax.retrieval import index as index_lib
from cm3jax.retrieval import index_io
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
