"""The unified id space: text, then image codes, then <pad> <eos> <break> <doc> <mask:i>."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cm3jax import vocab as vocab_lib
from cm3jax.vocab import IMAGE, SPECIAL, TEXT, Vocab, VocabMismatchError


@pytest.fixture
def vocab() -> Vocab:
    return Vocab(text_size=10, image_codes=5, num_masks=3)


def test_id_layout(vocab):
    assert vocab.image_offset == 10
    assert vocab.image_id(0) == 10
    assert vocab.image_id(4) == 14
    np.testing.assert_array_equal(vocab.image_id(np.arange(5)), np.arange(10, 15))
    assert vocab.special_offset == 15
    assert (vocab.pad_id, vocab.eos_id, vocab.break_id, vocab.doc_id) == (15, 16, 17, 18)
    assert [vocab.mask_id(i) for i in range(3)] == [19, 20, 21]
    assert vocab.size == 22
    # Every id is used exactly once.
    ids = (list(range(10)) + list(vocab.image_id(np.arange(5)))
           + [vocab.pad_id, vocab.eos_id, vocab.break_id, vocab.doc_id]
           + [vocab.mask_id(i) for i in range(3)])
    assert sorted(ids) == list(range(vocab.size))


def test_special_names(vocab):
    assert [vocab.special_name(i) for i in range(15, 22)] == [
        "<pad>", "<eos>", "<break>", "<doc>", "<mask:0>", "<mask:1>", "<mask:2>"]
    with pytest.raises(ValueError):
        vocab.special_name(14)  # an image code
    with pytest.raises(ValueError):
        vocab.special_name(22)  # past the end


@pytest.mark.parametrize("i", [-1, 3])
def test_mask_id_out_of_range(vocab, i):
    with pytest.raises(ValueError, match="mask"):
        vocab.mask_id(i)


@pytest.mark.parametrize("field", ["text_size", "image_codes", "num_masks"])
def test_rejects_empty_fields(field):
    kwargs = dict(text_size=10, image_codes=5, num_masks=3) | {field: 0}
    with pytest.raises(ValueError, match=field):
        Vocab(**kwargs)


def test_token_type(vocab):
    ids = np.array([[0, 9, 10, 14], [15, 18, 19, 21]])
    expected = np.array([[TEXT, TEXT, IMAGE, IMAGE], [SPECIAL, SPECIAL, SPECIAL, SPECIAL]])
    types = vocab.token_type(ids)
    np.testing.assert_array_equal(types, expected)
    assert types.dtype == np.int32
    assert types.shape == ids.shape
    assert len({TEXT, IMAGE, SPECIAL}) == 3


def test_token_type_accepts_jax_arrays(vocab):
    import jax.numpy as jnp

    np.testing.assert_array_equal(vocab.token_type(jnp.array([3, 12, 20])), [TEXT, IMAGE, SPECIAL])


def test_json_round_trip(vocab, tmp_path):
    path = str(tmp_path / "vocab.json")
    vocab.save(path)
    assert Vocab.load(path) == vocab
    with open(path) as f:
        data = json.load(f)
    assert data["size"] == 22
    assert data["special_ids"] == {"<pad>": 15, "<eos>": 16, "<break>": 17, "<doc>": 18}
    assert not (tmp_path / "vocab.json.tmp").exists()


def test_save_overwrites(tmp_path):
    path = str(tmp_path / "vocab.json")
    Vocab(10, 5, 3).save(path)
    Vocab(20, 5, 3).save(path)
    assert Vocab.load(path) == Vocab(20, 5, 3)


def test_check_same_passes_for_equal(vocab):
    vocab.check_same(Vocab(10, 5, 3))


def test_check_same_names_differing_field(vocab):
    with pytest.raises(VocabMismatchError) as info:
        vocab.check_same(Vocab(10, 7, 3), what="checkpoint")
    message = str(info.value)
    assert "image_codes" in message
    assert "7" in message and "5" in message
    assert "text_size" not in message and "num_masks" not in message


def test_check_same_names_every_differing_field(vocab):
    with pytest.raises(VocabMismatchError) as info:
        vocab.check_same(Vocab(11, 5, 4))
    message = str(info.value)
    assert "text_size" in message and "num_masks" in message
    assert "image_codes" not in message


def test_from_dict_rejects_inconsistent_size(vocab):
    data = vocab.to_dict()
    assert Vocab.from_dict(data) == vocab
    data["size"] = vocab.size + 1
    with pytest.raises(VocabMismatchError, match="size"):
        Vocab.from_dict(data)


def test_load_rejects_inconsistent_size(vocab, tmp_path):
    path = tmp_path / "vocab.json"
    data = vocab.to_dict() | {"size": 999}
    path.write_text(json.dumps(data))
    with pytest.raises(VocabMismatchError, match="999"):
        Vocab.load(str(path))


def test_vocab_errors_are_user_errors():
    from cm3jax.errors import UserError

    assert issubclass(VocabMismatchError, UserError)


def test_from_config(tiny_config):
    config = tiny_config()
    vocab = vocab_lib.from_config(config.vocab)
    assert vocab == Vocab(200, 48, 4)
    assert vocab.size == 200 + 48 + 4 + 4


def test_from_dict_rejects_inconsistent_special_ids(vocab):
    data = vocab.to_dict()
    data["special_ids"] = dict(data["special_ids"], **{"<pad>": 0})
    with pytest.raises(VocabMismatchError, match="special_ids"):
        Vocab.from_dict(data)
