"""Prompt templates of the generation tasks, with their guidance streams.

The conditional prompt of every task is the prompt of its supervised fine-tuning format
(`cm3jax.data.tasks`: image2text is the `caption` task), so the sampler and SFT training
cannot drift apart; `caption` and `text2image` are prefixes of the pretraining documents
(`cm3.make_document`), so a model that was never fine-tuned is prompted the way it was
trained. text2image and image2text may be preceded by retrieved documents laid out exactly
as in retrieval-augmented training (`r1 <doc> r2 <doc> ...`, `cm3.prepend_retrieved`). A
guidance stream replaces a condition by the CM3 sentinel `<mask:0>`, as CM3leon does: the
model saw whole masked regions in training, so "`<mask:0>` where the caption was" is its
unconditional distribution.

    text2image   cond    [R] caption <break>                       -> image codes <break>
                 uncond  [R] <mask:0> <break>
    image2text   cond    [R] <break> image <break>                 -> caption <eos>
                 uncond  [R] <break> <mask:0> <break>
    edit         full    <break> image <break> instruction <break> -> edited image codes <break>
                 image   <break> image <break> <mask:0> <break>
                 none    <break> <mask:0> <break> <mask:0> <break>
    grounded     cond    layout <break>                            -> image codes <break>
                 uncond  <mask:0> <break>
    vqa          Question: question <break> image <break> Answer:  -> answer <eos>
    generate     prompt text as is                                 -> free text / images until <eos>
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np

from cm3jax.data import cm3, tasks
from cm3jax.vocab import Vocab


def _ids(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int32).ravel() for p in parts]).astype(np.int32)


def _no_words(text: str) -> np.ndarray:
    raise ValueError(f"the template word {text!r} needs a text encoder: pass one to sft_format")


def sft_format(task: str, vocab: Vocab, text_encoder: tasks.TextEncoder = _no_words) -> tasks.SftFormat:
    """The SFT format `task` of cm3jax.data.tasks in `vocab` (`text_encoder` encodes its template
    words; only `vqa` has any)."""
    return tasks.get_task(task).bind(vocab, text_encoder)


def guided(fmt: tasks.SftFormat, example: Mapping[str, np.ndarray],
           masked: Sequence[Collection[str]] = ()) -> list[np.ndarray]:
    """`fmt`'s prompt of `example`, then one guidance stream per entry of `masked`: the same
    prompt with each of those fields replaced by `<mask:0>`."""
    return [fmt.prompt(example)] + [_masked(fmt, example, names) for names in masked]


def _masked(fmt: tasks.SftFormat, example: Mapping[str, np.ndarray], names: Collection[str]) -> np.ndarray:
    parts = []
    for piece in fmt.prompt_pieces:
        if isinstance(piece, tasks.Fixed):
            parts.append(piece.ids)
        elif piece.name in names:
            parts.append([fmt.vocab.mask_id(0)])
        elif piece.kind == tasks.IMAGE:
            parts.append(fmt.vocab.image_id(np.asarray(example[piece.name]).ravel()))
        else:
            parts.append(example[piece.name])
    return _ids(*parts)


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
    streams = guided(sft_format("text2image", vocab), {"caption": text_ids}, [{"caption"}])
    return [with_retrieved(s, retrieved, vocab) for s in streams]


def image2text(image_codes: np.ndarray, vocab: Vocab, retrieved: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """[conditional, unconditional] prompts for a caption of the image with `image_codes`."""
    streams = guided(sft_format("caption", vocab), {"image": image_codes}, [{"image"}])
    return [with_retrieved(s, retrieved, vocab) for s in streams]


def edit(image_codes: np.ndarray, instruction_ids: np.ndarray, vocab: Vocab) -> list[np.ndarray]:
    """[full, image-only, unconditional] prompts for editing an image by an instruction."""
    return guided(sft_format("edit", vocab), {"source": image_codes, "instruction": instruction_ids},
                  [{"instruction"}, {"source", "instruction"}])


def grounded(layout_ids: np.ndarray, vocab: Vocab) -> list[np.ndarray]:
    """[conditional, unconditional] prompts for an image of a grounded layout's text ids
    ('small red circle [2,2,7,7]; ...', `shapes.grounded_layout`)."""
    return guided(sft_format("grounded", vocab), {"layout": layout_ids}, [{"layout"}])


def vqa(fmt: tasks.SftFormat, image_codes: np.ndarray, question_ids: np.ndarray) -> list[np.ndarray]:
    """[prompt] for answering a question about the image with `image_codes`; `fmt` is
    `sft_format('vqa', vocab, text_encoder)`, bound once for a batch."""
    return guided(fmt, {"image": image_codes, "question": question_ids})
