"""Supervised fine-tuning (SFT) task formats: an example's parts -> one token sequence + loss weights.

Each task is a fixed template over the unified vocab (cm3jax/vocab.py). An image part is
`<break> codes <break>` as in pretraining; every sequence ends with `<eos>`. The *prompt*
is everything the model is given, up to the point where generation starts: for an image
target that includes the target's opening `<break>` (as the sampler's prompts do); the
*target* is the rest: the target's tokens, the closing `<break>` of a target image, and
the final `<eos>`.

    task          prompt                                              target
    caption       <break> image <break>                            -> caption <eos>
    vqa           Question: question <break> image <break> Answer: -> answer <eos>
    edit          <break> source <break> instruction <break>       -> edited <break> <eos>
    grounded      layout <break>                                   -> image <break> <eos>
    layout        <break> layout_map <break> <break>               -> image <break> <eos>
    long_caption  description <break>                              -> image <break> <eos>
    text2image    caption <break>                                  -> image <break> <eos>

`caption` and `text2image` are exactly the image-first and caption-first documents of
pretraining (`cm3.make_document`), so fine-tuning starts from what the model already
does. `vqa` asks the question before the image, so a causal model reads the image knowing
what it is asked (measured on the shapes SFT: VQA accuracy 0.761 and 0.719 in two runs vs
0.710 and 0.701 with the question after the image; docs/benchmarks.md). `grounded`'s layout is the shapes benchmark's `shapes.grounded_layout` text
('small red circle [2,2,7,7]; ...'); `layout`'s layout_map is an image (codes) of the
coarse layout; `edit` matches the sampler's edit prompt (cm3jax/sampling/prompts.py).
`long_caption` and `text2image` share a template: they differ in their data, so a mixture
weighs and reports them apart.
Words of a template (`Question:`, `Answer:`) are encoded by the caller's text encoder
once, when the task is bound (`SftTask.bind`), each on its own.

An *example* maps each field name of the task to its part: text parts are int32 arrays
of text ids (the text tokenizer's output, all < vocab.text_size); image parts are VQGAN
code arrays (raw codes, [g, g] or flat; not yet offset into the vocab), never empty.
Text parts may be empty. A text part must not contain the template words that follow it
(they delimit it), so every example that encodes splits back exactly.

API for data preparation, mixtures, eval and sampling:

    task = get_task("vqa")                          # or TASKS["vqa"]; UserError naming the known tasks
    fmt = task.bind(vocab, text_tokenizer.encode)   # an SftFormat: picklable, template words encoded once
    out = fmt.encode({"image": codes, "question": q_ids, "answer": a_ids}, target_only=True)
    out["tokens"], out["weights"], out["code_positions"]   # int32, float32, int32 [n]
    fmt.prompt({"image": codes, "question": q_ids})        # what a sampler feeds the model
    task.target.kind                                # 'text': generate until <eos>; 'image': codes, <break>
    prompt_parts, target_parts = fmt.split(tokens)  # inverse of encode (images come back flat)

`weights` follow cm3.py's convention (weight[j] weights the prediction of tokens[j]), so
the packer and `ToSchema` of cm3jax/data/pipeline.py consume the output unchanged;
`code_positions` is `cm3.image_code_positions` of the tokens (no CM3 transform is applied
to SFT examples). With `target_only` the prompt's weights are 0 and the target's 1
(the loss is on the answer alone); without it every token weighs 1.
Malformed examples or token sequences raise `SftExampleError` (a UserError naming the
task and the field), which a data job can count as a bad record.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Union

import numpy as np

from cm3jax import vocab as vocab_lib
from cm3jax.data.cm3 import image_code_positions
from cm3jax.errors import UserError
from cm3jax.vocab import Vocab

TEXT, IMAGE = "text", "image"  # kinds of Field
TOKEN_TYPE = {TEXT: vocab_lib.TEXT, IMAGE: vocab_lib.IMAGE}  # the vocab token type of each kind
TextEncoder = Callable[[str], np.ndarray]


class SftExampleError(UserError):
    """An example (or token sequence) that does not fit its task's template."""


@dataclasses.dataclass(frozen=True)
class Field:
    """A part of the example, by name: text ids or image codes."""

    name: str
    kind: str  # TEXT or IMAGE

    def __post_init__(self):
        if self.kind not in (TEXT, IMAGE):
            raise ValueError(f"Field {self.name!r}: kind must be {TEXT!r} or {IMAGE!r}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Words:
    """Fixed words of a template, encoded by the caller's text encoder."""

    text: str


Segment = Union[Field, Words]


@dataclasses.dataclass(frozen=True, eq=False)
class Fixed:
    """Tokens every example has at this place: template words and `<break>` / `<eos>`."""

    ids: np.ndarray
    label: str  # for error messages, e.g. "<break> Answer:"


@dataclasses.dataclass(frozen=True)
class SftTask:
    """An SFT format: the prompt's segments in order and the target field (see the module docstring)."""

    name: str
    prompt: tuple[Segment, ...]
    target: Field

    def __post_init__(self):
        names = [s.name for s in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"SftTask {self.name!r}: field names repeat: {names}")
        segments = [*self.prompt, self.target]
        for before, after in zip(segments, segments[1:]):
            if all(isinstance(s, Field) and s.kind == TEXT for s in (before, after)):
                raise ValueError(f"SftTask {self.name!r}: text field {after.name!r} directly follows text "
                                 f"field {before.name!r}: where one ends could not be read back")

    @property
    def fields(self) -> tuple[Field, ...]:
        """Every field of an example, prompt fields first, the target last."""
        return tuple(s for s in self.prompt if isinstance(s, Field)) + (self.target,)

    def bind(self, vocab: Vocab, text_encoder: TextEncoder) -> "SftFormat":
        """The format in `vocab`, with the template's words encoded by `text_encoder` (str -> text ids)."""
        brk = Fixed(np.array([vocab.break_id], np.int32), "<break>")
        eos = Fixed(np.array([vocab.eos_id], np.int32), "<eos>")

        def pieces(segment: Segment) -> list[Fixed | Field]:
            if isinstance(segment, Words):
                return [Fixed(_encode_words(segment.text, text_encoder, vocab, self.name), segment.text)]
            return [segment] if segment.kind == TEXT else [brk, segment, brk]

        prompt = [piece for segment in self.prompt for piece in pieces(segment)]
        target = [self.target, eos]
        if self.target.kind == IMAGE:  # the opening <break> is given, the closing one generated
            prompt, target = prompt + [brk], [self.target, brk, eos]
        return SftFormat(self, vocab, _merge_fixed(prompt), _merge_fixed(target))


def _encode_words(text: str, text_encoder: TextEncoder, vocab: Vocab, task: str) -> np.ndarray:
    ids = np.asarray(text_encoder(text))
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) \
            or ids.min() < 0 or ids.max() >= vocab.text_size:
        raise UserError(f"SFT task {task!r}: the text encoder turned {text!r} into {ids.tolist()}, "
                        f"not a non-empty list of text ids < vocab.text_size={vocab.text_size}")
    return ids.astype(np.int32)


def _merge_fixed(pieces: list[Fixed | Field]) -> tuple[Fixed | Field, ...]:
    """Adjacent Fixed pieces as one (a field then runs until the whole next fixed run)."""
    merged: list[Fixed | Field] = []
    for piece in pieces:
        if isinstance(piece, Fixed) and merged and isinstance(merged[-1], Fixed):
            last = merged.pop()
            piece = Fixed(np.concatenate([last.ids, piece.ids]), f"{last.label} {piece.label}")
        merged.append(piece)
    return tuple(merged)


def _find(tokens: np.ndarray, pattern: np.ndarray, start: int) -> int:
    """Index of the first occurrence of `pattern` in tokens[start:], or -1."""
    n = len(pattern)
    if len(tokens) - start < n:
        return -1
    windows = np.lib.stride_tricks.sliding_window_view(tokens[start:], n)
    hits = np.flatnonzero((windows == pattern).all(axis=1))
    return start + int(hits[0]) if hits.size else -1


@dataclasses.dataclass(frozen=True, eq=False)
class SftFormat:
    """An SftTask bound to a vocab and its encoded template words: encodes, prompts and splits examples."""

    task: SftTask
    vocab: Vocab
    prompt_pieces: tuple[Fixed | Field, ...]  # Fixed runs and fields, in order, up to where generation starts
    target_pieces: tuple[Fixed | Field, ...]  # the target field, then its closing Fixed run (ends with <eos>)

    def encode(self, example: Mapping[str, np.ndarray], target_only: bool = True) -> dict[str, np.ndarray]:
        """`{'tokens': int32 [n], 'weights': float32 [n], 'code_positions': int32 [n]}` of one example.

        Raises:
          SftExampleError: a field is missing, holds ids of the wrong kind, or contains the
            template words that follow it.
        """
        prompt = self._tokens(self.prompt_pieces, example)
        target = self._tokens(self.target_pieces, example)
        tokens = np.concatenate([prompt, target])
        weights = np.concatenate([np.full(len(prompt), 0.0 if target_only else 1.0, np.float32),
                                  np.ones(len(target), np.float32)])
        return {"tokens": tokens, "weights": weights,
                "code_positions": image_code_positions(tokens, self.vocab)}

    def prompt(self, example: Mapping[str, np.ndarray]) -> np.ndarray:
        """The prompt tokens (int32) of an example; its target field is not needed."""
        return self._tokens(self.prompt_pieces, example)

    def split(self, tokens: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(prompt parts, target parts) of an encoded example; the inverse of `encode`.

        Text parts come back as text ids, image parts as flat codes (int32).

        Raises:
          SftExampleError: `tokens` do not follow the template.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise SftExampleError(f"SFT task {self.task.name!r}: tokens must be a 1-D integer array, "
                                  f"got {tokens.dtype} {tokens.shape}")
        tokens = tokens.astype(np.int32)
        prompt, cursor = self._read(self.prompt_pieces, tokens, 0)
        target, cursor = self._read(self.target_pieces, tokens, cursor)
        if cursor != len(tokens):
            raise self._error(f"{len(tokens) - cursor} tokens follow the final <eos>")
        return prompt, target

    # --- internals -----------------------------------------------------------------------

    def _error(self, message: str) -> SftExampleError:
        return SftExampleError(f"SFT task {self.task.name!r}: {message}")

    def _part(self, example: Mapping[str, np.ndarray], field: Field) -> np.ndarray:
        """The field's part as vocab ids, checked."""
        if field.name not in example:
            names = ", ".join(f.name for f in self.task.fields)
            raise self._error(f"the example has no {field.name!r} (fields: {names})")
        part = np.asarray(example[field.name])
        if part.size and not np.issubdtype(part.dtype, np.integer):
            raise self._error(f"{field.name!r} must hold integer ids, got dtype {part.dtype}")
        part = part.astype(np.int32).ravel()
        if field.kind == IMAGE and not part.size:
            raise self._error(f"image {field.name!r} is empty")
        limit, what = ((self.vocab.text_size, "vocab.text_size") if field.kind == TEXT
                       else (self.vocab.image_codes, "vocab.image_codes"))
        if part.size and (part.min() < 0 or part.max() >= limit):
            raise self._error(f"{field.kind} {field.name!r} holds ids in [{part.min()}, {part.max()}], "
                              f"outside [0, {what}={limit})")
        return self.vocab.image_id(part) if field.kind == IMAGE else part

    def _tokens(self, pieces: tuple[Fixed | Field, ...], example: Mapping[str, np.ndarray]) -> np.ndarray:
        out = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, Fixed):
                out.append(piece.ids)
                continue
            part = self._part(example, piece)
            delimiter = pieces[i + 1]  # a field is always followed by a Fixed run, which ends it
            if _find(np.concatenate([part, delimiter.ids]), delimiter.ids, 0) != len(part):
                raise self._error(f"{piece.name!r} contains the template's {delimiter.label!r} tokens, "
                                  "which end it")
            out.append(part)
        return np.concatenate(out).astype(np.int32)

    def _read(self, pieces: tuple[Fixed | Field, ...], tokens: np.ndarray,
              cursor: int) -> tuple[dict[str, np.ndarray], int]:
        """Parts of `pieces` read from tokens[cursor:], and the cursor after them."""
        parts = {}
        for i, piece in enumerate(pieces):
            if isinstance(piece, Fixed):
                if not np.array_equal(tokens[cursor: cursor + len(piece.ids)], piece.ids):
                    raise self._error(f"expected {piece.label!r} at position {cursor}")
                cursor += len(piece.ids)
                continue
            end = _find(tokens, pieces[i + 1].ids, cursor)
            if end < 0:
                raise self._error(f"{piece.name!r} at position {cursor} is not followed by "
                                  f"{pieces[i + 1].label!r}")
            part = tokens[cursor:end]
            empty_image = piece.kind == IMAGE and not part.size
            if empty_image or (self.vocab.token_type(part) != TOKEN_TYPE[piece.kind]).any():
                raise self._error(f"{piece.name!r} at positions {cursor}..{end} is not {piece.kind}")
            parts[piece.name] = part - self.vocab.image_offset if piece.kind == IMAGE else part
            cursor = end
        return parts, cursor


def _text(name: str) -> Field:
    return Field(name, TEXT)


def _image(name: str) -> Field:
    return Field(name, IMAGE)


TASKS: dict[str, SftTask] = {task.name: task for task in (
    SftTask("caption", (_image("image"),), _text("caption")),
    SftTask("vqa", (Words("Question:"), _text("question"), _image("image"), Words("Answer:")),
            _text("answer")),
    SftTask("edit", (_image("source"), _text("instruction")), _image("edited")),
    SftTask("grounded", (_text("layout"),), _image("image")),
    SftTask("layout", (_image("layout_map"),), _image("image")),
    SftTask("long_caption", (_text("description"),), _image("image")),
    SftTask("text2image", (_text("caption"),), _image("image")),
)}


def get_task(name: str) -> SftTask:
    """The registered task `name`; UserError listing the known tasks otherwise."""
    if name not in TASKS:
        raise UserError(f"unknown SFT task {name!r}: known tasks are {', '.join(TASKS)}")
    return TASKS[name]
