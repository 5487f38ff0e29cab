"""The unified CM3leon vocabulary: text ids, then image codes, then special tokens.

One id space serves the whole token stream:

    [0, text_size)                              text (BPE) ids
    [text_size, text_size + image_codes)        VQGAN image codes, offset after the text
    then                                        <pad> <eos> <break> <doc> <mask:0> ... <mask:M-1>

The vocab is saved as JSON next to every checkpoint and checked on restore, so a
checkpoint is never silently paired with a tokenizer of another shape.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from cm3jax.errors import UserError

SPECIAL_TOKENS = ("<pad>", "<eos>", "<break>", "<doc>")

# Token types used to split the loss (and, later, to constrain decoding).
TEXT, IMAGE, SPECIAL = 0, 1, 2


class VocabMismatchError(UserError):
    """Raised when two vocabularies that must agree do not."""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Layout of the shared text + image-code + special-token id space.

    Attributes:
      text_size: number of text (BPE) ids.
      image_codes: VQGAN codebook size; image code c has id `text_size + c`.
      num_masks: number of CM3 sentinels `<mask:0>` .. `<mask:num_masks-1>`.
    """

    text_size: int
    image_codes: int
    num_masks: int = 16

    def __post_init__(self):
        for name in ("text_size", "image_codes", "num_masks"):
            if getattr(self, name) < 1:
                raise ValueError(f"Vocab.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.text_size

    @property
    def special_offset(self) -> int:
        """Id of the first special token (`<pad>`)."""
        return self.text_size + self.image_codes

    @property
    def pad_id(self) -> int:
        return self.special_offset + SPECIAL_TOKENS.index("<pad>")

    @property
    def eos_id(self) -> int:
        return self.special_offset + SPECIAL_TOKENS.index("<eos>")

    @property
    def break_id(self) -> int:
        return self.special_offset + SPECIAL_TOKENS.index("<break>")

    @property
    def doc_id(self) -> int:
        return self.special_offset + SPECIAL_TOKENS.index("<doc>")

    def mask_id(self, i: int) -> int:
        """Id of the CM3 sentinel `<mask:i>`."""
        if not 0 <= i < self.num_masks:
            raise ValueError(f"<mask:{i}> out of range: this vocab has {self.num_masks} masks")
        return self.special_offset + len(SPECIAL_TOKENS) + i

    @property
    def size(self) -> int:
        """Total number of ids (the minimum model vocab size)."""
        return self.special_offset + len(SPECIAL_TOKENS) + self.num_masks

    def image_id(self, code):
        """Maps VQGAN codes (int or array) to vocab ids."""
        return code + self.image_offset

    def token_type(self, ids: np.ndarray) -> np.ndarray:
        """Per-id type: TEXT, IMAGE or SPECIAL (works on numpy and jax arrays)."""
        ids = np.asarray(ids)
        return np.where(
            ids < self.image_offset, TEXT, np.where(ids < self.special_offset, IMAGE, SPECIAL)
        ).astype(np.int32)

    def special_name(self, token_id: int) -> str:
        """Name of a special id, e.g. `<mask:3>`."""
        k = token_id - self.special_offset
        if 0 <= k < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[k]
        if 0 <= k - len(SPECIAL_TOKENS) < self.num_masks:
            return f"<mask:{k - len(SPECIAL_TOKENS)}>"
        raise ValueError(f"id {token_id} is not a special token")

    # --- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready description, including the derived ids for human readers."""
        return {
            "text_size": self.text_size,
            "image_codes": self.image_codes,
            "num_masks": self.num_masks,
            "size": self.size,
            "special_ids": {name: self.special_offset + i for i, name in enumerate(SPECIAL_TOKENS)},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        """Inverse of `to_dict` (derived fields are recomputed and checked)."""
        try:
            vocab = cls(int(d["text_size"]), int(d["image_codes"]), int(d["num_masks"]))
        except (KeyError, TypeError, ValueError) as e:
            raise VocabMismatchError(f"vocab JSON is malformed: {e!r}") from None
        derived = vocab.to_dict()
        for key in ("size", "special_ids"):
            if key in d and d[key] != derived[key]:
                raise VocabMismatchError(f"vocab JSON says {key}={d[key]} but its layout gives {derived[key]}")
        return vocab

    def save(self, path: str) -> None:
        """Writes the vocab as JSON (atomically: temp file + rename)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        """Reads a vocab written by `save`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def check_same(self, other: "Vocab", what: str = "checkpoint") -> None:
        """Raises VocabMismatchError naming every field where `other` differs from self."""
        diffs = [
            f"{field.name}: {getattr(other, field.name)} in {what} vs {getattr(self, field.name)} here"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]
        if diffs:
            raise VocabMismatchError(f"vocab of the {what} differs: " + "; ".join(diffs))


def from_config(vocab_config) -> Vocab:
    """Builds the Vocab described by `config.vocab`."""
    return Vocab(int(vocab_config.text_size), int(vocab_config.image_codes), int(vocab_config.num_masks))
