"""The retrieval build end to end: encoder service, `cm3jax.retrieval.build`, the LM pipeline join.

One module-scoped world: a tiny palette-tokenized shapes set (120 train / 24 validation
documents, 16x16 codes per image), a tiny dual encoder trained in process for 4 steps
(checkpoints at steps 2 and 4), and one CLI build over it in chunks of 50 documents (train
chunks 0, 50, 100: several chunks and a short last one). The build CLI runs share a
persistent XLA compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train_cli as cli
from conftest import (PALETTE_FLAGS, PALETTE_OVERRIDES, REPO_ROOT, TINY_RETRIEVER_OVERRIDES, experiment_config,
                      prepare_palette_shapes)
from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3
from cm3jax.data.pipeline import make_dataset
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import UserError
from cm3jax.retrieval import build as build_lib
from cm3jax.retrieval.encoder import RetrievalEncoder
from cm3jax.retrieval.index import DenseIndex
from cm3jax.train.loop import train

COUNTS = {"train": 120, "validation": 24}
CHUNK = 50
STEPS = 40  # enough to spread the embeddings: an untrained tower maps every document within 0.9
FIRST_CHECKPOINT = STEPS // 2
TEXT_VOCAB = 512  # vocab.text_size of the shapes benchmark = the retriever's text_vocab_size
GRID = 16  # palette codes per image side
RETRIEVER = {**TINY_RETRIEVER_OVERRIDES, "total_steps": STEPS, "log_every": STEPS,
             "checkpoint.every_steps": FIRST_CHECKPOINT}


# --- the world -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_palette_shapes(tmp_path_factory.mktemp("shapes"), COUNTS["train"], COUNTS["validation"],
                                  per_shard=60)


@pytest.fixture(scope="module")
def records(data):
    return {split: ArrayRecordDocuments(split_paths(str(data), split)) for split in COUNTS}


@pytest.fixture(scope="module")
def encoder_dir(data, tmp_path_factory):
    """A task='retriever' workdir with complete checkpoints at STEPS / 2 and STEPS (trained in process)."""
    workdir = tmp_path_factory.mktemp("retriever") / "run"
    train(experiment_config("shapes_retriever", {**RETRIEVER, "data.source": f"prepared:{data}"}), str(workdir))
    assert cli.checkpoint_steps(workdir) == [FIRST_CHECKPOINT, STEPS]
    return workdir


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return RetrievalEncoder.load(str(encoder_dir))


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """8 fake devices and a compilation cache shared by this module's build runs."""
    return cli.cpu_env() | {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _run_build(env, workdir, data, encoder_dir, *extra) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cm3jax.retrieval.build", f"--config={REPO_ROOT}/experiments/tiny_lm.py",
               f"--workdir={workdir}", f"--config.data.source=prepared:{data}",
               f"--config.retrieval.encoder={encoder_dir}", f"--config.retrieval.chunk_docs={CHUNK}",
               *PALETTE_FLAGS, *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def built(data, encoder_dir, cli_env, tmp_path_factory):
    """The build directory of one CLI run (tiny_lm's retrieval section: k=2, the 0.9 thresholds)."""
    workdir = tmp_path_factory.mktemp("build") / "index"
    result = _run_build(cli_env, workdir, data, encoder_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def _manifest(build_dir) -> dict:
    with open(os.path.join(build_dir, "build.json")) as f:
        return json.load(f)


def _embeddings(build_dir, split: str) -> dict[str, np.ndarray]:
    return build_lib.load_embeddings(str(build_dir), split, COUNTS[split], CHUNK)


def _neighbours(build_dir, split: str) -> np.ndarray:
    return np.load(os.path.join(build_dir, "neighbours", f"{split}.npy"))


def _texts_images(records, split: str, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    docs = [records[split][i] for i in range(n)]
    return [d["text"] for d in docs], np.stack([d["image"] for d in docs])


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line of a CLI that exited 2 (and printed no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# --- the encoder service -------------------------------------------------------------------


def test_embeddings_are_unit_norm_and_documents_their_normalised_mean(encoder, records):
    texts, images = _texts_images(records, "train", 7)
    assert encoder.dim == 32 and encoder.cfg.code_grid == GRID
    text, image = encoder.embed_texts(texts), encoder.embed_images(images)
    for embedding in (text, image):
        assert embedding.shape == (7, 32) and embedding.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
    mean = (text + image) / np.linalg.norm(text + image, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.embed_documents(texts, images), mean, atol=1e-6)
    # One-modality documents are that modality's embedding; empty text embeds to zeros.
    has_image = np.array([True, False] * 3 + [True])
    mixed = encoder.embed_documents(texts, images, has_image)
    np.testing.assert_allclose(mixed[~has_image], text[~has_image], atol=1e-6)
    no_text = [np.zeros(0, np.int32)] + texts[1:]
    np.testing.assert_allclose(encoder.embed_documents(no_text, images)[0], image[0], atol=1e-6)
    np.testing.assert_array_equal(encoder.embed_texts(no_text)[0], 0.0)
    with pytest.raises(UserError, match="neither text nor an image"):
        encoder.embed_documents(no_text, images, np.array([False] + [True] * 6))


def test_checksum_identifies_the_parameters(encoder, encoder_dir):
    again = RetrievalEncoder.load(str(encoder_dir))
    assert again.checksum == encoder.checksum and len(encoder.checksum) == 16
    assert encoder.source == f"{encoder_dir}@{STEPS}"
    earlier = RetrievalEncoder.load(str(encoder_dir), step=FIRST_CHECKPOINT)
    assert earlier.source == f"{encoder_dir}@{FIRST_CHECKPOINT}"
    assert earlier.checksum != encoder.checksum
    with pytest.raises(UserError, match="no checkpoint at step 3"):
        RetrievalEncoder.load(str(encoder_dir), step=3)


def test_bad_inputs_are_user_errors(encoder, records):
    texts, images = _texts_images(records, "train", 2)
    for shape in ((2, 8, 8), (2, GRID, GRID, 3), (GRID, GRID)):
        with pytest.raises(UserError, match=rf"images must be \[N, {GRID}, {GRID}\].*got shape"):
            encoder.embed_images(np.zeros(shape, np.int32))
    for bad in (TEXT_VOCAB, -1):
        wrong = [texts[0], np.concatenate([[bad], texts[1]])]  # first, so truncation keeps it
        with pytest.raises(UserError, match=rf"text 1 holds ids outside \[0, {TEXT_VOCAB}\)"):
            encoder.embed_texts(wrong)
        with pytest.raises(UserError, match="outside"):
            encoder.embed_documents(wrong, images)


def test_codes_outside_the_codebook_are_user_errors(encoder):
    for bad in (16, -1):
        codes = np.zeros((2, GRID, GRID), np.int32)
        codes[1, 0, 0] = bad
        try:
            encoder.embed_images(codes)
        except UserError as e:
            assert "[0, 16)" in str(e)
        else:
            raise AssertionError(f"code {bad} was embedded without an error")


def test_embeddings_do_not_depend_on_batch_size_or_padding(encoder, encoder_dir, records):
    texts, images = _texts_images(records, "train", 50)
    full = encoder.embed_documents(texts, images)  # one padded batch of 64
    for n in (1, 7):  # padded batches of 8
        np.testing.assert_allclose(encoder.embed_documents(texts[:n], images[:n]), full[:n], atol=1e-5)
    small = RetrievalEncoder.load(str(encoder_dir), batch_size=8)  # 6 full batches, then 2 rows padded to 8
    assert small.batch_size == 8 and small.checksum == encoder.checksum
    np.testing.assert_allclose(small.embed_documents(texts, images), full, atol=1e-5)


# --- the build -----------------------------------------------------------------------------


def test_build_writes_a_complete_manifest_chunks_and_neighbours(built, data, encoder, encoder_dir, records):
    manifest = _manifest(built)
    assert manifest["complete"] is True
    assert manifest["counts"] == COUNTS
    assert manifest["data"] == str(data) and manifest["encoder"] == f"{encoder_dir}@{STEPS}"
    assert manifest["encoder_checksum"] == encoder.checksum
    assert manifest["k"] == manifest["policy"]["k"] == 2 and manifest["policy"]["chunk_docs"] == CHUNK
    assert not set(build_lib.RUN_ONLY_FIELDS) & set(manifest["policy"])
    chunks = sorted(os.path.basename(p) for p in glob.glob(os.path.join(built, "embeddings", "*")))
    assert chunks == ["train-0000000000.npz", "train-0000000050.npz", "train-0000000100.npz",
                      "validation-0000000000.npz"]
    for split, count in COUNTS.items():
        neighbours = _neighbours(built, split)
        assert neighbours.shape == (count, 2) and neighbours.dtype == np.int64
        assert neighbours.min() >= -1 and neighbours.max() < COUNTS["train"]
        assert (neighbours >= 0).mean() > 0.5, "the default policy found almost no neighbours"
        embeddings = _embeddings(built, split)
        assert embeddings["memory"].shape == (count, 32)
        assert embeddings["has_text"].all() and embeddings["has_image"].all()
    train = _neighbours(built, "train")
    assert not np.any(train == np.arange(COUNTS["train"])[:, None]), "a document is its own neighbour"
    # The memory rows are the train documents in order, embedded as the encoder service does.
    texts, images = _texts_images(records, "train", CHUNK)
    np.testing.assert_allclose(_embeddings(built, "train")["memory"][:CHUNK],
                               encoder.embed_documents(texts, images), atol=1e-5)
    # Validation queries are not dropped out; train queries are (20% of their text tokens).
    validation = _embeddings(built, "validation")
    np.testing.assert_array_equal(validation["query"], validation["memory"])
    train_embeddings = _embeddings(built, "train")
    assert not np.allclose(train_embeddings["query"], train_embeddings["memory"])


def _policy_neighbours(query, memory, exclude_self: bool, policy: dict, slack: float) -> np.ndarray:
    """Greedy policy selection from scratch (float64, every memory row), thresholds moved by `slack`."""
    scores = query.astype(np.float64) @ memory.astype(np.float64).T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :policy["candidates"]]
    out = np.full((len(query), policy["k"]), -1, np.int64)
    for q, candidates in enumerate(order):
        chosen = []
        for j in candidates:
            if scores[q, j] == -np.inf or scores[q, j] > policy["near_duplicate"] + slack:
                continue
            if any(float(memory[j] @ memory[c]) > policy["diversity"] + slack for c in chosen):
                continue
            chosen.append(j)
            if len(chosen) == policy["k"]:
                break
        out[q, :len(chosen)] = chosen
    return out


def _check_policy(build_dir) -> int:
    """Asserts every split's neighbours follow the manifest's policy; returns rows recomputed exactly."""
    policy = _manifest(build_dir)["policy"]
    memory = _embeddings(build_dir, "train")
    exact = 0
    for split in COUNTS:
        query = _embeddings(build_dir, split)["query"]
        neighbours = _neighbours(build_dir, split)
        for q, row in enumerate(neighbours):
            chosen = row[row >= 0]
            assert np.all(row[len(chosen):] == -1), f"{split} {q}: -1 padding not at the end: {row}"
            assert len(set(chosen.tolist())) == len(chosen)
            # Relevance order, no near-duplicate of the query, no two chosen too alike.
            scores = memory["memory"][chosen] @ query[q]
            assert np.all(np.diff(scores) <= 1e-6), f"{split} {q}: not best first: {scores}"
            assert np.all(scores <= policy["near_duplicate"] + 1e-6), f"{split} {q}: {scores}"
            gram = memory["memory"][chosen] @ memory["memory"][chosen].T
            assert np.all(gram[np.triu_indices(len(chosen), 1)] <= policy["diversity"] + 1e-6), f"{split} {q}"
        # From scratch: rows whose choice does not flip when the thresholds move by 1e-5 must match.
        strict = _policy_neighbours(query, memory["memory"], split == "train", policy, -1e-5)
        loose = _policy_neighbours(query, memory["memory"], split == "train", policy, 1e-5)
        stable = np.all(strict == loose, axis=1)
        np.testing.assert_array_equal(neighbours[stable], strict[stable], err_msg=split)
        exact += int(stable.sum())
    return exact


def test_neighbours_follow_the_policy(built):
    assert _check_policy(built) >= 0.9 * sum(COUNTS.values())


def test_binding_thresholds_are_applied(built, data, encoder_dir, tmp_path):
    """The default thresholds (0.9) never bind on these embeddings: rebuild with ones that do."""
    train = _embeddings(built, "train")
    memory, scores = train["memory"], train["query"] @ train["memory"].T
    np.fill_diagonal(scores, -np.inf)
    gram = memory @ memory.T
    near_duplicate = float(np.median(scores.max(axis=1)))  # half the queries lose their best match
    diversity = float(np.median(gram[np.triu_indices(len(memory), 1)]))
    workdir = tmp_path / "tight"
    shutil.copytree(built / "embeddings", workdir / "embeddings")  # same encoder and data: reused
    config = experiment_config("tiny_lm", {
        **PALETTE_OVERRIDES, "data.source": f"prepared:{data}", "retrieval.encoder": str(encoder_dir),
        "retrieval.chunk_docs": CHUNK, "retrieval.near_duplicate": near_duplicate,
        "retrieval.diversity": diversity})
    manifest = build_lib.build(config, str(workdir))
    assert manifest["policy"]["near_duplicate"] == near_duplicate and _manifest(workdir)["complete"]
    assert _check_policy(workdir) >= 0.8 * sum(COUNTS.values())
    tight, default = _neighbours(workdir, "train"), _neighbours(built, "train")
    assert np.mean(np.any(tight != default, axis=1)) > 0.25, "the thresholds changed nothing"


def test_index_loads_with_the_encoder_checksum_only(built, encoder):
    index = DenseIndex.load(built / "index", encoder.checksum)
    assert index.count == COUNTS["train"] and index.dim == 32
    np.testing.assert_array_equal(index.ids, np.arange(COUNTS["train"]))
    # It holds the memory embeddings under their row numbers: every score is query . memory[id].
    memory, query = _embeddings(built, "train")["memory"], _embeddings(built, "validation")["query"]
    scores, ids = index.search(query, COUNTS["train"])
    assert sorted(ids[0].tolist()) == list(range(COUNTS["train"]))
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", query, memory[ids]), atol=1e-5)
    with pytest.raises(UserError, match="rebuild the index"):
        DenseIndex.load(built / "index", "0123456789abcdef")


def _files(directory) -> dict[str, int]:
    return {os.path.relpath(p, directory): os.stat(p).st_mtime_ns
            for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(p)}


@pytest.mark.slow
def test_rerunning_a_complete_build_changes_nothing(built, data, encoder_dir, cli_env):
    before, manifest = _files(built), _manifest(built)
    result = _run_build(cli_env, built, data, encoder_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {k: v for k, v in manifest.items()
                                                                    if k != "complete"}
    assert _manifest(built) == manifest
    after = _files(built)
    assert after.keys() == before.keys()
    # build.json is rewritten (same content); every array is left untouched.
    changed = [p for p in after if after[p] != before[p] and p != "build.json"]
    assert not changed, changed
    assert "embedded" not in result.stderr and "neighbours of" not in result.stderr


@pytest.mark.slow
def test_a_killed_build_resumes_to_identical_arrays(built, data, encoder_dir, cli_env, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(built, workdir)
    lost = ("embeddings/train-0000000050.npz", "neighbours/train.npy")
    for name in lost:
        os.remove(workdir / name)
    manifest = _manifest(workdir)
    (workdir / "build.json").write_text(json.dumps(manifest | {"complete": False}))
    kept = {p: t for p, t in _files(workdir).items() if p != "build.json"}
    result = _run_build(cli_env, workdir, data, encoder_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded train documents 50-100" in result.stderr
    assert "embedded train documents 0-50" not in result.stderr
    assert _manifest(workdir) == manifest
    after = _files(workdir)
    assert all(after[p] == t for p, t in kept.items()), "a finished file was rewritten"
    for name in lost:
        assert os.path.exists(workdir / name), name
    with np.load(built / lost[0]) as expected, np.load(workdir / lost[0]) as got:
        assert sorted(got.files) == ["has_image", "has_text", "memory", "query"]
        for key in expected.files:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    np.testing.assert_array_equal(_neighbours(workdir, "train"), _neighbours(built, "train"))


@pytest.mark.slow
def test_another_policy_into_the_same_workdir_is_refused(built, data, encoder_dir, cli_env):
    before = _files(built)
    line = _error_line(_run_build(cli_env, built, data, encoder_dir, "--config.retrieval.k=3"))
    # Names the policy and the old k (the whole old policy is printed; `retrieval.k` would be clearer).
    assert str(built) in line and "policy" in line and re.search(r"'k': 2\b|retrieval\.k\b", line), line
    assert "new --workdir" in line
    assert _files(built) == before, "a refused build touched the directory"


@pytest.mark.slow
def test_missing_encoder_workdir_is_a_one_line_error(data, cli_env, tmp_path):
    missing = tmp_path / "no_such_retriever"
    line = _error_line(_run_build(cli_env, tmp_path / "index", data, missing))
    assert str(missing) in line and "retriever" in line
    assert not (tmp_path / "index").exists()


# --- the join: retrieval-augmented LM rows -------------------------------------------------


def _lm_config(data, **overrides):
    return experiment_config("tiny_lm", {**PALETTE_OVERRIDES, "data.source": f"prepared:{data}",
                                         "data.global_batch_size": 4, **overrides})


def _packed_documents(batch, vocab) -> list[tuple[int, int, np.ndarray]]:
    """(row, start, tokens) of each packed document: tokens of the whole seq_len + 1 row."""
    found = []
    for row in range(len(batch["inputs"])):
        tokens = np.append(batch["inputs"][row], batch["targets"][row][-1])
        segments = batch["segment_ids"][row]
        # The last target is the rest of the last document, or padding (no document has 1 token).
        segments = np.append(segments, segments[-1] if tokens[-1] != vocab.pad_id else 0)
        for segment in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == segment)
            assert np.all(np.diff(where) == 1)
            found.append((row, int(where[0]), tokens[where]))
    return found


def _key(text, image_ids) -> tuple:
    return tuple(np.asarray(text).tolist()), tuple(np.asarray(image_ids).tolist())


def _document_key(document, vocab) -> tuple:
    types = vocab.token_type(document)
    return _key(document[types == vocab_lib.TEXT], document[types == vocab_lib.IMAGE])


@pytest.mark.parametrize("split, seq_len, retrieved_in_loss, expect_loss", [
    ("train", 1024, True, 1),  # CM3leon: both neighbours fit and are trained on
    ("train", 700, False, 0),  # room for one neighbour only; RA-CM3: not in the loss
    ("validation", 1024, True, 0),  # eval never counts retrieved tokens
])
def test_rows_prepend_exactly_the_neighbours_documents(built, data, records, split, seq_len,
                                                       retrieved_in_loss, expect_loss):
    config = _lm_config(data, **{"retrieval.enabled": True, "retrieval.neighbours": str(built),
                                 "data.seq_len": seq_len, "data.retrieved_in_loss": retrieved_in_loss})
    vocab = vocab_lib.from_config(config.vocab)
    positions = collections.defaultdict(list)  # document -> its rows (a few scenes repeat)
    for i in range(COUNTS[split]):
        positions[_key(records[split][i]["text"], vocab.image_id(records[split][i]["image"].ravel()))].append(i)
    neighbours = _neighbours(built, split)

    def expected(position: int, query: np.ndarray) -> list[list[np.ndarray]]:
        """Both layouts of each neighbour that fits: best first, the lowest-ranked dropped until the row fits."""
        memory = [records["train"][int(j)] for j in neighbours[position] if j >= 0]
        layouts = [[cm3.make_document(r["text"], vocab.image_id(r["image"].ravel()), vocab, first)
                    for first in (False, True)] for r in memory]
        fits = 0
        while fits < len(memory) and len(query) + sum(len(d[0]) + 1 for d in layouts[:fits + 1]) <= seq_len + 1:
            fits += 1
        return layouts[:fits]

    batch = next(iter(make_dataset(config, split, 0, 1)))
    assert batch["inputs"].shape == (4, seq_len)
    retrieved_counts = []
    for row, start, tokens in _packed_documents(batch, vocab):
        separators = np.flatnonzero(tokens == vocab.doc_id)
        parts = np.split(tokens, separators)  # r1, <doc> r2, ..., <doc> query
        retrieved = [parts[0]] + [p[1:] for p in parts[1:-1]] if len(separators) else []
        query = parts[-1][1:] if len(separators) else tokens
        assert query[-1] == vocab.eos_id
        candidates = positions[_document_key(cm3.cm3_invert(query, vocab), vocab)]
        assert candidates, "a row holds a document that is not in the split"
        assert any(len(retrieved) == len(layouts) and all(any(np.array_equal(got, d) for d in pair)
                                                          for got, pair in zip(retrieved, layouts))
                   for layouts in (expected(p, query) for p in candidates)), (candidates, len(retrieved))
        retrieved_counts.append(len(retrieved))
        # Loss: retrieved tokens and their <doc> separators (targets start+1 .. query start).
        query_start = start + len(tokens) - len(query)
        loss = batch["loss_mask"][row]
        if len(separators):  # (with none, query_start - 1 < start: nothing retrieved to check)
            np.testing.assert_array_equal(loss[start:query_start - 1], expect_loss)
        assert loss[max(query_start - 1, start):start + len(tokens) - 1].any()
    assert retrieved_counts and max(retrieved_counts) >= 1  # (the policy may leave a document without neighbours)
    assert max(retrieved_counts) == (2 if seq_len == 1024 else 1)


def test_disabled_retrieval_leaves_batches_bit_identical(built, data, encoder_dir):
    plain = _lm_config(data)
    ignored = _lm_config(data, **{"retrieval.enabled": False, "retrieval.neighbours": str(built),
                                  "retrieval.encoder": str(encoder_dir), "retrieval.k": 3,
                                  "data.retrieved_in_loss": False})
    enabled = _lm_config(data, **{"retrieval.enabled": True, "retrieval.neighbours": str(built)})
    vocab = vocab_lib.from_config(plain.vocab)
    for split in ("train", "validation"):
        expected, got = iter(make_dataset(plain, split, 0, 1)), iter(make_dataset(ignored, split, 0, 1))
        for _ in range(2):
            a, b = next(expected), next(got)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split} {key}")
            assert not np.any(a["inputs"] == vocab.doc_id)
    augmented = next(iter(make_dataset(enabled, "train", 0, 1)))
    assert np.any(augmented["inputs"] == vocab.doc_id)


@pytest.mark.parametrize("edit, message", [
    ({"complete": False}, "the build is incomplete"),
    ({"data": "/somewhere/else"}, "was built from /somewhere/else"),
    ({"counts": {"train": COUNTS["train"], "validation": 23}}, "neighbours for 23 validation documents"),
    (None, "no build.json"),
])
def test_neighbours_of_other_data_or_an_unfinished_build_are_refused(built, data, tmp_path, edit, message):
    copy = tmp_path / "copy"
    shutil.copytree(built / "neighbours", copy / "neighbours")
    if edit is not None:
        (copy / "build.json").write_text(json.dumps(_manifest(built) | edit))
    config = _lm_config(data, **{"retrieval.enabled": True, "retrieval.neighbours": str(copy)})
    where = re.escape(f"config.retrieval.neighbours={str(copy)!r}")
    for split in ("validation",) if edit and "counts" in edit else ("train", "validation"):
        with pytest.raises(UserError, match=rf"{where}.*{re.escape(message)}"):
            make_dataset(config, split, 0, 1)
