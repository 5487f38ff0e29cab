"""A deterministic synthetic mixed-modal token source for smoke runs, tests and benchmarks.

Row i is a function of (seed, split, i) only, so any host can read any row and a
resumed run sees exactly the rows it would have seen. Each document is a text run
(an arithmetic progression over text ids) optionally followed by an "image": a
`<break>`-delimited run of image codes determined by the text, then `<eos>`. The
patterns are learnable, so a few dozen steps show a falling loss, and both the text
and the image loss are exercised. Documents are packed greedily into rows of
`seq_len` tokens with segment ids and per-document positions (the batch schema of
`cm3jax.data.schema`).
"""

from __future__ import annotations

import numpy as np

from cm3jax.data.schema import pack_documents
from cm3jax.vocab import Vocab

SPLIT_SEEDS = {"train": 0, "validation": 1}
_STEPS = (1, 2, 3, 5)


class SyntheticDocuments:
    """Grain random-access source of packed rows (dicts of int32 [seq_len] arrays)."""

    def __init__(self, vocab: Vocab, seq_len: int, seed: int, split: str = "train",
                 image_tokens: int = 16, num_rows: int = 2**31 - 1):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
        self.vocab, self.seq_len, self.image_tokens = vocab, seq_len, image_tokens
        self.seed, self.split_seed, self.num_rows = seed, SPLIT_SEEDS[split], num_rows

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"SyntheticDocuments(seed={self.seed}, split={self.split_seed}, seq_len={self.seq_len})"

    def _document(self, rng: np.random.Generator) -> np.ndarray:
        vocab = self.vocab
        start = int(rng.integers(vocab.text_size))
        step = int(rng.choice(_STEPS))
        text = (start + step * np.arange(int(rng.integers(4, 33)))) % vocab.text_size
        parts = [text]
        if rng.random() < 0.5:
            codes = (7 * start + step * np.arange(self.image_tokens)) % vocab.image_codes
            parts += [[vocab.break_id], vocab.image_id(codes), [vocab.break_id]]
        parts.append([vocab.eos_id])
        return np.concatenate(parts).astype(np.int32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_seed, int(index)])
        documents, total = [], 0
        while total < self.seq_len + 1:
            documents.append(self._document(rng))
            total += len(documents[-1])
        return pack_documents(documents, self.seq_len, self.vocab)
