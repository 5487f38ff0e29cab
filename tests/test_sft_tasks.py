"""SFT task templates (cm3jax/data/tasks.py): layout, target-only weights, round trip, packing, errors."""

from __future__ import annotations

import pickle

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3jax import vocab as vocab_lib
from cm3jax.data import cm3, tasks
from cm3jax.data.pipeline import ExampleTransform, ToSchema
from cm3jax.errors import UserError
from cm3jax.vocab import Vocab

VOCAB = Vocab(text_size=50, image_codes=16, num_masks=4)
B, E = VOCAB.break_id, VOCAB.eos_id
WORD_IDS = 40  # the toy text encoder writes template words with ids >= 40; examples use ids < 40


def encode_words(text: str) -> np.ndarray:
    """A toy text tokenizer: one id in [40, 50) per character."""
    return np.array([WORD_IDS + ord(c) % 10 for c in text], np.int32)


Q, A = encode_words("Question:").tolist(), encode_words("Answer:").tolist()


def img(*codes: int) -> list[int]:
    """Vocab ids of image codes."""
    return [VOCAB.image_id(c) for c in codes]


def fmt(name: str) -> tasks.SftFormat:
    return tasks.get_task(name).bind(VOCAB, encode_words)


# task -> (example, expected tokens, number of prompt tokens): one small hand-made case each.
CASES = {
    "caption": ({"image": [[1, 2], [3, 4]], "caption": [5, 6, 7]},
                [B, *img(1, 2, 3, 4), B, 5, 6, 7, E], 6),
    "vqa": ({"image": [1, 2, 3, 4], "question": [8, 9], "answer": [10]},
            [*Q, 8, 9, B, *img(1, 2, 3, 4), B, *A, 10, E], len(Q) + 2 + 6 + len(A)),
    "edit": ({"source": [1, 2, 3, 4], "instruction": [11, 12], "edited": [4, 3, 2, 1]},
             [B, *img(1, 2, 3, 4), B, 11, 12, B, *img(4, 3, 2, 1), B, E], 9),
    "grounded": ({"layout": [13, 14, 15], "image": [0, 1, 2, 3]},
                 [13, 14, 15, B, *img(0, 1, 2, 3), B, E], 4),
    "layout": ({"layout_map": [5, 5, 5, 5], "image": [6, 7, 8, 9]},
               [B, *img(5, 5, 5, 5), B, B, *img(6, 7, 8, 9), B, E], 7),
    "long_caption": ({"description": [1, 2, 3, 4, 5, 6], "image": [15, 0, 15, 0]},
                     [1, 2, 3, 4, 5, 6, B, *img(15, 0, 15, 0), B, E], 7),
    "text2image": ({"caption": [7, 8], "image": [9, 10, 11, 12]},
                   [7, 8, B, *img(9, 10, 11, 12), B, E], 3),
}


def test_every_registered_task_has_a_case():
    assert set(CASES) == set(tasks.TASKS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_template_layout_and_target_only_weights(name):
    example, expected, prompt_len = CASES[name]
    out = fmt(name).encode(example)
    np.testing.assert_array_equal(out["tokens"], expected)
    assert out["tokens"].dtype == np.int32 and out["weights"].dtype == np.float32
    want = np.array([0.0] * prompt_len + [1.0] * (len(expected) - prompt_len), np.float32)
    np.testing.assert_array_equal(out["weights"], want)
    np.testing.assert_array_equal(out["code_positions"], cm3.image_code_positions(out["tokens"], VOCAB))


@pytest.mark.parametrize("name", sorted(CASES))
def test_target_only_false_weights_every_token(name):
    example, expected, _ = CASES[name]
    np.testing.assert_array_equal(fmt(name).encode(example, target_only=False)["weights"],
                                  np.ones(len(expected), np.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_is_where_generation_starts(name):
    example, expected, prompt_len = CASES[name]
    task = tasks.get_task(name)
    prompt_only = {k: v for k, v in example.items() if k != task.target.name}
    np.testing.assert_array_equal(fmt(name).prompt(prompt_only), expected[:prompt_len])
    # Generation starts with the target itself: an image target's opening <break> is in the prompt.
    first = vocab_lib.IMAGE if task.target.kind == tasks.IMAGE else vocab_lib.TEXT
    assert VOCAB.token_type(expected[prompt_len]) == first


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_inverts_encode(name):
    example, _, _ = CASES[name]
    task = tasks.get_task(name)
    prompt, target = fmt(name).split(fmt(name).encode(example)["tokens"])
    assert list(prompt) == [f.name for f in task.fields[:-1]] and list(target) == [task.target.name]
    for field, part in {**prompt, **target}.items():
        np.testing.assert_array_equal(part, np.ravel(example[field]), err_msg=field)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokens_have_the_kind_of_their_part(name):
    example, expected, _ = CASES[name]
    tokens = fmt(name).encode(example)["tokens"]
    assert tokens.min() >= 0 and tokens.max() < VOCAB.size
    kinds = VOCAB.token_type(tokens)
    special = kinds == vocab_lib.SPECIAL
    assert set(tokens[special].tolist()) <= {B, E} and tokens[-1] == E and (tokens == E).sum() == 1
    images = [f.name for f in tasks.get_task(name).fields if f.kind == tasks.IMAGE]
    assert (kinds == vocab_lib.IMAGE).sum() == sum(np.size(example[f]) for f in images)


def test_caption_and_text2image_are_the_pretraining_documents():
    image, text = np.array([3, 1, 4, 1]), np.array([5, 9, 2])
    for name, image_first in (("caption", True), ("text2image", False)):
        tokens = fmt(name).encode({"image": image, "caption": text})["tokens"]
        document = cm3.make_document(text, VOCAB.image_id(image), VOCAB, image_first)
        np.testing.assert_array_equal(tokens, document)


def test_packed_rows_weigh_exactly_the_targets():
    """The pipeline's ExampleTransform, packer and ToSchema keep exactly the targets' weights."""
    names = sorted(CASES)
    seq_len = 40
    transform = ExampleTransform({name: fmt(name) for name in names}, target_only=True, max_tokens=seq_len + 1)
    examples = [transform.map({"task": name, "parts": CASES[name][0]}) for name in names]
    fields = ("tokens", "weights", "code_positions", "task_ids")
    rows = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(examples).to_iter_dataset(),
        length_struct={field: seq_len + 1 for field in fields},
        num_packing_bins=2, shuffle_bins=False,
        padding_struct={"tokens": VOCAB.pad_id, "weights": 0, "code_positions": 0, "task_ids": 0},
    ).map(ToSchema(VOCAB))
    counted, expected = 0, sum(len(CASES[n][1]) - CASES[n][2] for n in names)
    for row in rows:
        weighted = row["targets"][row["loss_mask"] == 1]
        assert VOCAB.pad_id not in weighted.tolist()
        assert (row["task_ids"][row["loss_mask"] == 1] > 0).all()
        counted += len(weighted)
    assert counted == expected


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError, match=r"unknown SFT task 'captioning': known tasks are caption, vqa, edit"):
        tasks.get_task("captioning")


@pytest.mark.parametrize("name, example, message", [
    ("vqa", {"image": [1], "answer": [2]},
     r"the example has no 'question' \(fields: question, image, answer\)"),
    ("caption", {"image": [1], "caption": [50]},
     r"text 'caption' holds ids in \[50, 50\], outside \[0, vocab.text_size=50\)"),
    ("caption", {"image": [16], "caption": [1]},
     r"image 'image' holds ids in \[16, 16\], outside \[0, vocab.image_codes=16\)"),
    ("edit", {"source": [], "instruction": [1], "edited": [2]}, r"image 'source' is empty"),
    ("caption", {"image": [1.5], "caption": [1]}, r"'image' must hold integer ids"),
])
def test_bad_examples_are_named(name, example, message):
    with pytest.raises(tasks.SftExampleError, match=rf"^SFT task '{name}': {message}"):
        fmt(name).encode(example)


def test_a_part_whose_end_reads_as_the_next_words_is_refused():
    """With words '::' after it, a part ending in ':' would split back one token short."""
    form = tasks.SftTask("colons", (tasks.Field("q", tasks.TEXT), tasks.Words("::")),
                         tasks.Field("a", tasks.TEXT)).bind(VOCAB, encode_words)
    colon = encode_words(":").tolist()
    with pytest.raises(tasks.SftExampleError, match=r"'q' contains the template's '::' tokens"):
        form.encode({"q": [1, *colon], "a": [2]})
    prompt, target = form.split(form.encode({"q": [1, 2], "a": colon})["tokens"])
    assert prompt["q"].tolist() == [1, 2] and target["a"].tolist() == colon


@pytest.mark.parametrize("tokens, message", [
    ([B, *img(1), B, 5, 6], r"'caption' at position 3 is not followed by '<eos>'"),
    ([*img(1), B, 5, E], r"expected '<break>' at position 0"),
    ([B, *img(1), 7, B, 5, E], r"'image' at positions 1..3 is not image"),
    ([B, B, 5, E], r"'image' at positions 1..1 is not image"),
    ([B, *img(1), B, 5, E, 6], r"1 tokens follow the final <eos>"),
])
def test_tokens_off_the_template_are_named(tokens, message):
    with pytest.raises(tasks.SftExampleError, match=rf"^SFT task 'caption': {message}"):
        fmt("caption").split(np.array(tokens))


def test_ambiguous_templates_and_bad_word_encoders_are_refused():
    with pytest.raises(ValueError, match=r"text field 'b' directly follows text field 'a'"):
        tasks.SftTask("bad", (tasks.Field("a", tasks.TEXT),), tasks.Field("b", tasks.TEXT))
    with pytest.raises(UserError, match=r"SFT task 'vqa': the text encoder turned 'Question:' into \[\]"):
        tasks.get_task("vqa").bind(VOCAB, lambda text: np.zeros(0, np.int32))


def test_bound_formats_pickle_for_grain_workers():
    restored = pickle.loads(pickle.dumps(fmt("vqa")))
    example, expected, _ = CASES["vqa"]
    np.testing.assert_array_equal(restored.encode(example)["tokens"], expected)


def _parts(draw, task: tasks.SftTask, text_high: int) -> dict[str, np.ndarray]:
    parts = {}
    for field in task.fields:
        if field.kind == tasks.TEXT:
            parts[field.name] = np.array(draw(st.lists(st.integers(0, text_high - 1), max_size=12)), np.int32)
        else:
            codes = draw(st.lists(st.integers(0, VOCAB.image_codes - 1), min_size=1, max_size=12))
            parts[field.name] = np.array(codes, np.int32)
    return parts


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(tasks.TASKS)), target_only=st.booleans())
def test_random_parts_round_trip(data, name, target_only):
    """Any example that encodes splits back exactly; with text ids unlike the template's words, all encode."""
    task, form = tasks.get_task(name), fmt(name)
    parts = _parts(data.draw, task, text_high=data.draw(st.sampled_from([WORD_IDS, VOCAB.text_size])))
    try:
        out = form.encode(parts, target_only=target_only)
    except tasks.SftExampleError as e:
        assert "contains the template's" in str(e)
        assert max(p.max(initial=0) for p in parts.values()) >= WORD_IDS
        return
    prompt, target = form.split(out["tokens"])
    assert {**prompt, **target}.keys() == parts.keys()
    for field, part in {**prompt, **target}.items():
        np.testing.assert_array_equal(part, parts[field])
    n_prompt = len(form.prompt(parts))
    n_target = len(out["tokens"]) - n_prompt
    np.testing.assert_array_equal(out["weights"], np.r_[np.full(n_prompt, 0.0 if target_only else 1.0),
                                                        np.ones(n_target)])
    assert n_target == len(parts[task.target.name]) + (2 if task.target.kind == tasks.IMAGE else 1)
