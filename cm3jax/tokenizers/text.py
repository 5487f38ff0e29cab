"""SentencePiece BPE text tokenizer, trained on a source's captions, mapped into the Vocab.

Text ids are SentencePiece ids, so they occupy [0, piece_size) of the unified vocab's
text range [0, vocab.text_size). Byte fallback means every caption is encodable: a
character never seen in training becomes its UTF-8 bytes instead of `<unk>`. SentencePiece's
own BOS/EOS/PAD are disabled; the unified vocab's `<eos>`, `<pad>` etc. are used instead.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

import numpy as np
import sentencepiece as spm

from cm3jax.errors import UserError
from cm3jax.tokenizers.hf_text import IDS_FILE, TOKENIZER_FILE, HFTextTokenizer
from cm3jax.vocab import Vocab

TEXT_TOKENIZER_FILES = ("tokenizer.model", TOKENIZER_FILE, IDS_FILE)  # the files a run's text tokenizer may be

# SentencePiece needs the 256 byte pieces plus <unk> and a few characters at least.
MIN_VOCAB_SIZE = 260


class TextTokenizer:
    """Encodes captions to text ids of the unified vocab and decodes them back."""

    def __init__(self, model_proto: bytes, vocab: Vocab | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        if vocab is not None and self.size > vocab.text_size:
            raise UserError(
                f"config.vocab.text_size={vocab.text_size} is smaller than the text tokenizer's "
                f"{self.size} pieces"
            )

    @property
    def size(self) -> int:
        """Number of SentencePiece pieces (text ids used)."""
        return self._sp.get_piece_size()

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int) -> "TextTokenizer":
        """Trains a BPE model with byte fallback on `captions` (at most `vocab_size` pieces).

        A small corpus may support fewer merges than asked for; the model then has fewer
        pieces (never more), and the unified vocab keeps `vocab_size` text ids regardless.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(f"config.vocab.text_size={vocab_size}: BPE with byte fallback needs "
                            f">= {MIN_VOCAB_SIZE}")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str, vocab: Vocab | None = None) -> "TextTokenizer":
        """Loads a model written by `save`."""
        if not os.path.exists(path):
            raise UserError(f"text tokenizer not found: {path}")
        with open(path, "rb") as f:
            return cls(f.read(), vocab)

    def save(self, path: str) -> None:
        """Writes the SentencePiece model (atomically)."""
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, path)

    def encode(self, text: str) -> np.ndarray:
        """Caption -> int32 text ids."""
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids) -> str:
        """Text ids -> caption (ids outside the tokenizer's range are dropped)."""
        ids = [int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < self.size]
        return self._sp.decode(ids)


def load_text_tokenizer(workdir: str, vocab: Vocab | None = None) -> TextTokenizer | HFTextTokenizer:
    """The text tokenizer a workdir carries: SentencePiece `tokenizer.model` (cm3jax's own
    data), else a Hugging Face `tokenizer.json` (a converted checkpoint, see hf_text.py)."""
    sentencepiece = os.path.join(workdir, "tokenizer.model")
    if os.path.isfile(sentencepiece):
        return TextTokenizer.load(sentencepiece, vocab)
    if os.path.isfile(os.path.join(workdir, TOKENIZER_FILE)):
        return HFTextTokenizer.load(workdir, vocab)
    raise UserError(f"{sentencepiece} is missing: the workdir needs the text tokenizer its trainer copies "
                    f"there (or a converted checkpoint's {TOKENIZER_FILE})")
