"""The fixed batch schema every LM step consumes, and packing of documents into it.

Fields (all int32, [seq_len] per row): `inputs`, `targets` (inputs shifted by one),
`segment_ids` (1.. per packed document, 0 = padding), `positions` (restart at 0 in
each document), `loss_mask` (1 where the target belongs to the same document as the
input), `token_type` (of the target: TEXT / IMAGE / SPECIAL, see cm3jax.vocab),
`code_positions` (of the input: 1 + its index inside its image for an image code, else 0;
cm3.cm3_code_positions — models with `model.image_grid` embed it), `task_ids` (of the target:
1 + the index of its fine-tuning task in `config.sft.mixture`, 0 for pretraining data and
padding; the step's `loss/<task>` metrics).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3jax.data.cm3 import image_code_positions
from cm3jax.vocab import Vocab

FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "token_type", "code_positions",
          "task_ids")


def pack_documents(documents: Sequence[np.ndarray], seq_len: int, vocab: Vocab) -> dict[str, np.ndarray]:
    """Concatenates documents (in reading order, no CM3 sentinels) into one row of `seq_len`
    (+1 for the shifted targets).

    The last document is truncated; a short row is padded with `<pad>` in segment 0.
    """
    tokens = np.full(seq_len + 1, vocab.pad_id, np.int32)
    segments = np.zeros(seq_len + 1, np.int32)
    positions = np.zeros(seq_len + 1, np.int32)
    cursor = 0
    for segment, doc in enumerate(documents, start=1):
        n = min(len(doc), seq_len + 1 - cursor)
        if n <= 0:
            break
        tokens[cursor : cursor + n] = doc[:n]
        segments[cursor : cursor + n] = segment
        positions[cursor : cursor + n] = np.arange(n)
        cursor += n
    targets = tokens[1:]
    loss_mask = (segments[:-1] == segments[1:]) & (segments[1:] > 0)
    return {
        "inputs": tokens[:-1],
        "targets": targets,
        "segment_ids": segments[:-1],
        "positions": positions[:-1],
        "loss_mask": loss_mask.astype(np.int32),
        "token_type": vocab.token_type(targets),
        "code_positions": image_code_positions(tokens[:-1], vocab),
        "task_ids": np.zeros(seq_len, np.int32),
    }
