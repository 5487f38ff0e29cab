"""Synthetic source, batch schema, document packing and the per-host Grain pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.data.pipeline import make_dataset
from cm3jax.data.schema import FIELDS, pack_documents
from cm3jax.data.synthetic import SyntheticDocuments
from cm3jax.vocab import IMAGE, SPECIAL, TEXT, Vocab

SEQ_LEN = 64


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(text_size=200, image_codes=48, num_masks=4)


def _rows_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _assert_rows_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- synthetic source --------------------------------------------------------------------


def test_synthetic_is_deterministic(vocab):
    source = SyntheticDocuments(vocab, SEQ_LEN, seed=0)
    again = SyntheticDocuments(vocab, SEQ_LEN, seed=0)
    for index in (0, 7, 123456):
        _assert_rows_equal(source[index], source[index])
        _assert_rows_equal(source[index], again[index])
    # Reading in another order gives the same rows (no hidden iteration state).
    forward = [source[i] for i in range(4)]
    backward = [again[i] for i in reversed(range(4))][::-1]
    for a, b in zip(forward, backward):
        _assert_rows_equal(a, b)


def test_synthetic_rows_differ_by_index_seed_and_split(vocab):
    base = SyntheticDocuments(vocab, SEQ_LEN, seed=0, split="train")
    other_seed = SyntheticDocuments(vocab, SEQ_LEN, seed=1, split="train")
    other_split = SyntheticDocuments(vocab, SEQ_LEN, seed=0, split="validation")
    for index in range(3):
        assert not _rows_equal(base[index], base[index + 1])
        assert not _rows_equal(base[index], other_seed[index])
        assert not _rows_equal(base[index], other_split[index])


def test_synthetic_unknown_split(vocab):
    with pytest.raises(ValueError, match="split"):
        SyntheticDocuments(vocab, SEQ_LEN, seed=0, split="test")


def test_synthetic_row_schema(vocab):
    source = SyntheticDocuments(vocab, SEQ_LEN, seed=0)
    saw_text = saw_image = False
    for index in range(8):
        row = source[index]
        assert set(row) == set(FIELDS)
        for name in FIELDS:
            assert row[name].dtype == np.int32, name
            assert row[name].shape == (SEQ_LEN,), name
        np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
        assert row["inputs"].min() >= 0 and row["inputs"].max() < vocab.size
        assert row["targets"].min() >= 0 and row["targets"].max() < vocab.size
        np.testing.assert_array_equal(row["token_type"], vocab.token_type(row["targets"]))
        assert set(np.unique(row["loss_mask"])) <= {0, 1}
        assert row["segment_ids"][0] == 1
        assert np.all(np.diff(row["segment_ids"]) >= 0)  # documents in order
        assert row["positions"][0] == 0
        # Positions count up inside a segment and restart where a new one begins.
        starts = np.flatnonzero(np.diff(row["segment_ids"])) + 1
        assert np.all(row["positions"][starts] == 0)
        inside = np.ones(SEQ_LEN, bool)
        inside[0] = False
        inside[starts] = False
        np.testing.assert_array_equal(row["positions"][inside], row["positions"][np.flatnonzero(inside) - 1] + 1)
        # Every document ends in <eos>, so the loss is masked where the next document starts.
        assert np.all(row["loss_mask"][starts - 1] == 0)
        assert np.all(row["inputs"][starts - 1] == vocab.eos_id)
        saw_text |= bool(np.any(row["token_type"] == TEXT))
        saw_image |= bool(np.any(row["token_type"] == IMAGE))
    assert saw_text and saw_image


# --- packing ------------------------------------------------------------------------------


def test_pack_documents_with_padding(vocab):
    a = np.array([1, 2, 3], np.int32)
    b = np.array([4, 201, vocab.eos_id, 5], np.int32)
    row = pack_documents([a, b], seq_len=10, vocab=vocab)
    pad = vocab.pad_id
    np.testing.assert_array_equal(row["inputs"], [1, 2, 3, 4, 201, vocab.eos_id, 5, pad, pad, pad])
    np.testing.assert_array_equal(row["targets"], [2, 3, 4, 201, vocab.eos_id, 5, pad, pad, pad, pad])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 2, 3, 0, 0, 0])
    # 0 where the target is the next document's first token, and on / into padding.
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(
        row["token_type"],
        [TEXT, TEXT, TEXT, IMAGE, SPECIAL, TEXT, SPECIAL, SPECIAL, SPECIAL, SPECIAL],
    )
    for name in FIELDS:
        assert row[name].dtype == np.int32 and row[name].shape == (10,), name


def test_pack_documents_truncates_last_document(vocab):
    a = np.arange(10, 14, dtype=np.int32)  # 4 tokens
    b = np.arange(20, 30, dtype=np.int32)  # 10 tokens, only 4 fit (+1 for the last target)
    c = np.arange(40, 45, dtype=np.int32)  # does not fit at all
    row = pack_documents([a, b, c], seq_len=8, vocab=vocab)
    np.testing.assert_array_equal(row["inputs"], [10, 11, 12, 13, 20, 21, 22, 23])
    np.testing.assert_array_equal(row["targets"], [11, 12, 13, 20, 21, 22, 23, 24])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 2, 3])
    # The last target (24) still belongs to document 2, so it is trained on.
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 0, 1, 1, 1, 1])
    assert vocab.pad_id not in row["inputs"] and 40 not in row["inputs"]


def test_pack_documents_exact_fit_has_no_padding(vocab):
    doc = np.arange(9, dtype=np.int32)  # seq_len + 1 tokens
    row = pack_documents([doc], seq_len=8, vocab=vocab)
    np.testing.assert_array_equal(row["inputs"], np.arange(8))
    np.testing.assert_array_equal(row["targets"], np.arange(1, 9))
    np.testing.assert_array_equal(row["loss_mask"], np.ones(8))
    np.testing.assert_array_equal(row["segment_ids"], np.ones(8))


# --- Grain pipeline -----------------------------------------------------------------------


def _batches(dataset, n: int) -> list[dict]:
    return [dict(batch) for batch in itertools.islice(iter(dataset), n)]


def _synthetic_source(config, split):
    return SyntheticDocuments(vocab_lib.from_config(config.vocab), config.data.seq_len, config.seed, split)


def test_dataset_batches(tiny_config):
    config = tiny_config()
    (batch,) = _batches(make_dataset(config, "train", 0, 1), 1)
    assert set(batch) == set(FIELDS)
    for name in FIELDS:
        assert batch[name].shape == (16, 64), name
        assert batch[name].dtype == np.int32, name
    # Global batch 0 is rows 0..15 of the source, in order.
    source = _synthetic_source(config, "train")
    for i in (0, 5, 15):
        _assert_rows_equal({k: v[i] for k, v in batch.items()}, source[i])


def test_per_host_slices_assemble_the_global_batch(tiny_config):
    config = tiny_config()
    steps = 3
    single = _batches(make_dataset(config, "train", 0, 1), steps)
    host0 = _batches(make_dataset(config, "train", 0, 2), steps)
    host1 = _batches(make_dataset(config, "train", 1, 2), steps)
    for k in range(steps):
        assert host0[k]["inputs"].shape == (8, 64)
        assert not np.array_equal(host0[k]["inputs"], host1[k]["inputs"])
        for name in FIELDS:
            np.testing.assert_array_equal(
                np.concatenate([host0[k][name], host1[k][name]]), single[k][name],
                err_msg=f"step {k} field {name}",
            )
    assert not np.array_equal(single[0]["inputs"], single[1]["inputs"])


def test_iterator_state_round_trip(tiny_config):
    config = tiny_config()
    dataset = make_dataset(config, "train", 0, 1)
    iterator = iter(dataset)
    first = next(iterator)
    next(iterator)
    state = iterator.get_state()
    expected = next(iterator)
    after = next(iterator)
    assert not np.array_equal(expected["inputs"], first["inputs"])

    resumed = iter(make_dataset(config, "train", 0, 1))
    resumed.set_state(state)
    _assert_rows_equal(dict(next(resumed)), dict(expected))
    _assert_rows_equal(dict(next(resumed)), dict(after))


def test_iterator_state_from_fresh_iterator_restarts(tiny_config):
    config = tiny_config()
    dataset = make_dataset(config, "validation", 0, 1)
    fresh = iter(dataset)
    state = fresh.get_state()
    first = next(fresh)
    advanced = iter(dataset)
    for _ in range(3):
        next(advanced)
    advanced.set_state(state)
    _assert_rows_equal(dict(next(advanced)), dict(first))


def test_vocab_of_tiny_config(tiny_config, vocab):
    assert vocab_lib.from_config(tiny_config().vocab) == vocab
