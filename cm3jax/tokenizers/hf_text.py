"""A Hugging Face `tokenizers` tokenizer.json as cm3jax's text tokenizer (e.g. Chameleon's BPE).

Its ids need not be cm3jax text ids: `tokenizer_ids[t]` is the tokenizer id of cm3jax text
id t (Chameleon's image tokens sit inside its BPE range, cm3jax's text range has no gaps),
stored as WORKDIR/tokenizer_ids.json by the converter that wrote the workdir. Same
interface as the SentencePiece `TextTokenizer`: `size`, `encode`, `decode`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from cm3jax.errors import UserError
from cm3jax.vocab import Vocab

TOKENIZER_FILE = "tokenizer.json"
IDS_FILE = "tokenizer_ids.json"


class HFTextTokenizer:
    """Encodes text with a tokenizer.json and maps its ids to cm3jax text ids (and back)."""

    def __init__(self, tokenizer_json: str, tokenizer_ids: np.ndarray, vocab: Vocab | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise UserError("a tokenizer.json needs the `tokenizers` package (pip install -r requirements.txt)") from e
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer_ids = np.asarray(tokenizer_ids, np.int64)
        self._to_text = np.full(int(self.tokenizer_ids.max()) + 1, -1, np.int64)
        self._to_text[self.tokenizer_ids] = np.arange(len(self.tokenizer_ids))
        if vocab is not None and self.size > vocab.text_size:
            raise UserError(f"config.vocab.text_size={vocab.text_size} is smaller than the tokenizer's {self.size} "
                            "text ids")

    @property
    def size(self) -> int:
        """Number of cm3jax text ids the tokenizer maps to."""
        return len(self.tokenizer_ids)

    @classmethod
    def load(cls, workdir: str, vocab: Vocab | None = None) -> "HFTextTokenizer":
        """WORKDIR/tokenizer.json with WORKDIR/tokenizer_ids.json; UserError naming a missing file."""
        paths = [os.path.join(workdir, name) for name in (TOKENIZER_FILE, IDS_FILE)]
        for path in paths:
            if not os.path.isfile(path):
                raise UserError(f"text tokenizer file {path} is missing")
        with open(paths[0]) as f, open(paths[1]) as g:
            return cls(f.read(), np.asarray(json.load(g)), vocab)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 cm3jax text ids (tokenizer ids with no cm3jax text id, e.g. an
        image token written out as text, are dropped)."""
        ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
        ids = self._to_text[ids[ids < len(self._to_text)]]
        return ids[ids >= 0].astype(np.int32)

    def decode(self, ids) -> str:
        """cm3jax text ids -> text (ids outside the text range are dropped)."""
        ids = np.asarray(ids, np.int64).ravel()
        return self._tokenizer.decode(self.tokenizer_ids[ids[(ids >= 0) & (ids < self.size)]].tolist())
