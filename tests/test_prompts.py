"""Sampler prompt templates (cm3jax/sampling/prompts.py): the documented layouts, equal to the SFT
formats of cm3jax/data/tasks.py, with `<mask:0>` guidance streams."""

from __future__ import annotations

import numpy as np
import pytest

from cm3jax.data import tasks
from cm3jax.sampling import prompts
from cm3jax.vocab import Vocab

VOCAB = Vocab(text_size=50, image_codes=16, num_masks=4)
B, M = VOCAB.break_id, VOCAB.mask_id(0)
CODES = np.array([[1, 2], [3, 4]])
IMAGE = [VOCAB.image_id(c) for c in (1, 2, 3, 4)]
TEXT = np.array([5, 6, 7])


def encode_words(text: str) -> np.ndarray:
    """A toy text encoder: one id in [40, 50) per character."""
    return np.array([40 + ord(c) % 10 for c in text], np.int32)


def as_lists(streams: list[np.ndarray]) -> list[list[int]]:
    return [s.tolist() for s in streams]


def sft_prompt(task: str, example: dict) -> list[int]:
    return tasks.get_task(task).bind(VOCAB, encode_words).prompt(example).tolist()


@pytest.mark.parametrize("name, streams, expected, task, example", [
    ("text2image", prompts.text2image(TEXT, VOCAB), [[5, 6, 7, B], [M, B]], "text2image", {"caption": TEXT}),
    ("image2text", prompts.image2text(CODES, VOCAB), [[B, *IMAGE, B], [B, M, B]], "caption", {"image": CODES}),
    ("edit", prompts.edit(CODES, TEXT, VOCAB), [[B, *IMAGE, B, 5, 6, 7, B], [B, *IMAGE, B, M, B], [B, M, B, M, B]],
     "edit", {"source": CODES, "instruction": TEXT}),
    ("grounded", prompts.grounded(TEXT, VOCAB), [[5, 6, 7, B], [M, B]], "grounded", {"layout": TEXT}),
])
def test_templates_are_the_sft_prompts_with_masked_streams(name, streams, expected, task, example):
    assert as_lists(streams) == expected, name
    assert as_lists(streams)[0] == sft_prompt(task, example)


def test_vqa_prompt_is_the_sft_vqa_prompt():
    fmt = prompts.sft_format("vqa", VOCAB, encode_words)
    streams = prompts.vqa(fmt, CODES, TEXT)
    question, answer = encode_words("Question:").tolist(), encode_words("Answer:").tolist()
    assert as_lists(streams) == [[*question, 5, 6, 7, B, *IMAGE, B, *answer]]
    assert streams[0].tolist() == sft_prompt("vqa", {"image": CODES, "question": TEXT})


def test_retrieved_documents_precede_both_streams():
    document = prompts.retrieved_document(np.array([8, 9]), np.array([5, 6, 7, 8]), VOCAB, image_first=False)
    plain = prompts.text2image(TEXT, VOCAB)
    for with_doc, without in zip(prompts.text2image(TEXT, VOCAB, [document]), plain):
        assert with_doc.tolist() == [*document, VOCAB.doc_id, *without]


def test_vqa_needs_a_text_encoder_and_a_question_of_text_ids():
    with pytest.raises(ValueError, match="text encoder"):
        prompts.sft_format("vqa", VOCAB)
    fmt = prompts.sft_format("vqa", VOCAB, encode_words)
    with pytest.raises(tasks.SftExampleError, match="text 'question' holds ids"):
        prompts.vqa(fmt, CODES, np.array([VOCAB.text_size]))
