"""Prompt templates of the generation tasks, with their guidance streams.

Every template is a prefix of a training document (`cm3.make_document`), optionally
preceded by retrieved documents laid out exactly as in retrieval-augmented training
(`r1 <doc> r2 <doc> ...`, `cm3.prepend_retrieved`). A guidance stream replaces a condition
by the CM3 sentinel `<mask:0>`, as CM3leon does: the model saw whole masked regions in
training, so "`<mask:0>` where the caption was" is its unconditional distribution.

    text2image   cond    [R] caption <break>                       -> image codes <break>
                 uncond  [R] <mask:0> <break>
    image2text   cond    [R] <break> image <break>                 -> caption <eos>
                 uncond  [R] <break> <mask:0> <break>
    edit         full    <break> image <break> instruction <break> -> edited image codes <break>
                 image   <break> image <break> <mask:0> <break>
                 none    <break> <mask:0> <break> <mask:0> <break>
    generate     prompt text as is                                 -> free text / images until <eos>

(The supervised fine-tuning templates of VQA, editing and grounding replace these when a
fine-tuned model is used; see cm3jax.data.tasks once it lands.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3jax.data import cm3
from cm3jax.vocab import Vocab


def _ids(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int32).ravel() for p in parts]).astype(np.int32)


def with_retrieved(prompt: np.ndarray, retrieved: Sequence[np.ndarray], vocab: Vocab) -> np.ndarray:
    """`r1 <doc> ... rk <doc> prompt` (the retrieved documents are full `make_document` layouts)."""
    if not retrieved:
        return prompt
    tokens, _ = cm3.prepend_retrieved(prompt, np.ones(len(prompt), np.float32), list(retrieved), vocab, True)
    return tokens


def retrieved_document(text_ids: np.ndarray, image_codes: np.ndarray, vocab: Vocab, image_first: bool) -> np.ndarray:
    """One retrieved memory document as tokens, in the orientation of the task it helps."""
    return cm3.make_document(text_ids, vocab.image_id(np.asarray(image_codes).ravel()), vocab, image_first)


def text2image(text_ids: np.ndarray, vocab: Vocab, retrieved: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """[conditional, unconditional] prompts for an image of `text_ids`."""
    brk, mask = [vocab.break_id], [vocab.mask_id(0)]
    return [with_retrieved(_ids(text_ids, brk), retrieved, vocab),
            with_retrieved(_ids(mask, brk), retrieved, vocab)]


def image2text(image_codes: np.ndarray, vocab: Vocab, retrieved: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """[conditional, unconditional] prompts for a caption of the image with `image_codes`."""
    brk, mask = [vocab.break_id], [vocab.mask_id(0)]
    return [with_retrieved(_ids(brk, vocab.image_id(np.asarray(image_codes).ravel()), brk), retrieved, vocab),
            with_retrieved(_ids(brk, mask, brk), retrieved, vocab)]


def edit(image_codes: np.ndarray, instruction_ids: np.ndarray, vocab: Vocab) -> list[np.ndarray]:
    """[full, image-only, unconditional] prompts for editing an image by an instruction."""
    brk, mask = [vocab.break_id], [vocab.mask_id(0)]
    image = vocab.image_id(np.asarray(image_codes).ravel())
    return [_ids(brk, image, brk, instruction_ids, brk),
            _ids(brk, image, brk, mask, brk),
            _ids(brk, mask, brk, mask, brk)]
