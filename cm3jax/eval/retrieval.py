"""Retrieval quality of a trained dual encoder: text->image and image->text recall@k.

The memory is N validation documents. A text query (a caption) is answered by ranking
the N image embeddings by inner product; it is a hit at k when one of the top k images
is the query's own image or an identical one (the same codes: two documents with the
same picture cannot be told apart by any retriever). Image->text is the same with the
roles swapped (a hit is a caption equal to the query's own).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3jax.retrieval.encoder import RetrievalEncoder

RECALL_AT = (1, 5, 10)


def recall_at(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """Fraction of rows whose top-k columns (by score) include a relevant one, for each k.

    `scores` [Q, N]; `relevant` [Q, N] bool (each row has at least one True).
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), scores.shape[1])
    return {k: float(np.mean(first < k)) for k in ks}


def _same(items: Sequence[np.ndarray]) -> np.ndarray:
    """[N, N] bool: items i and j are equal arrays."""
    keys = [np.asarray(x).tobytes() for x in items]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    groups = np.asarray([index[key] for key in keys])
    return groups[:, None] == groups[None, :]


def evaluate_retrieval(encoder: RetrievalEncoder, records: Sequence[dict]) -> dict:
    """Recall@{1,5,10} both ways over `records` (dicts with 'text' ids and 'image' codes)."""
    texts = [r["text"] for r in records]
    images = np.stack([r["image"] for r in records])
    scores = encoder.embed_texts(texts) @ encoder.embed_images(images).T
    text_to_image = recall_at(scores, _same(list(images)))
    image_to_text = recall_at(scores.T, _same(texts))
    result = {"num_documents": len(records), "encoder": encoder.source}
    result |= {f"text_to_image_recall_at_{k}": v for k, v in text_to_image.items()}
    result |= {f"image_to_text_recall_at_{k}": v for k, v in image_to_text.items()}
    return result
