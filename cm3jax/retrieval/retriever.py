"""`Retriever`: the served retrieval path — encoder, index and memory loaded once, batched search.

`Retriever.load(BUILD_DIR)` opens what `cm3jax.retrieval.build` wrote: the dense index, the
memory's embeddings and modality flags, the prepared memory documents and their text /
image tokenizers, and the retriever checkpoint named in build.json (its checksum must be
the index's). `search(text=[...], image=[...], k=2)` embeds a batch of queries (text,
images, or both — a text+image query is the mean of its two embeddings, as documents
are), fetches `policy.candidates` from the index and applies the same policy as training
(modality and diversity filters; near-duplicates only on request). The sampler uses it for
retrieval-augmented generation and re-ranking.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import ml_collections
import numpy as np

from cm3jax.data.neighbours import read_build_manifest
from cm3jax.data.records import ArrayRecordDocuments, split_paths
from cm3jax.errors import UserError
from cm3jax.retrieval.build import load_embeddings, search_memory
from cm3jax.retrieval.encoder import RetrievalEncoder
from cm3jax.retrieval.index import DenseIndex
from cm3jax.retrieval.policy import RetrievalPolicy
from cm3jax.tokenizers.image import load_image_tokenizer
from cm3jax.tokenizers.text import TextTokenizer


@dataclasses.dataclass(frozen=True)
class Retrieved:
    """One retrieved memory document."""

    id: int  # row of the memory (the prepared train split)
    score: float  # inner product with the query
    text_ids: np.ndarray  # caption token ids
    image_codes: np.ndarray  # image codes [g, g] (empty for a text-only document)
    caption: str  # the caption, decoded


class Retriever:
    """Answers batched text / image queries from a retrieval build."""

    def __init__(self, encoder: RetrievalEncoder, index: DenseIndex, memory: dict, documents,
                 text_tokenizer: TextTokenizer, image_tokenizer, policy: RetrievalPolicy):
        self.encoder, self.index, self.memory, self.documents = encoder, index, memory, documents
        self.text_tokenizer, self.image_tokenizer, self.policy = text_tokenizer, image_tokenizer, policy

    @classmethod
    def load(cls, build_dir: str) -> "Retriever":
        """Loads a complete `cm3jax.retrieval.build` output directory.

        Raises:
          UserError: the build is missing or incomplete, or its encoder changed since.
        """
        manifest = read_build_manifest(build_dir, build_dir)
        workdir, step = manifest["encoder"].rsplit("@", 1)
        encoder = RetrievalEncoder.load(workdir, int(step))
        index = DenseIndex.load(os.path.join(build_dir, "index"), encoder.checksum)
        policy_config = ml_collections.ConfigDict(manifest["policy"])
        count = manifest["counts"]["train"]
        memory = load_embeddings(build_dir, "train", count, policy_config.chunk_docs)
        data = manifest["data"]
        documents = ArrayRecordDocuments(split_paths(data, "train"))
        text = TextTokenizer.load(os.path.join(data, "tokenizer.model"))
        image = load_image_tokenizer(data)
        return cls(encoder, index, memory, documents, text, image, RetrievalPolicy.from_config(policy_config))

    def embed_queries(self, text: Sequence[str] | None = None, image: np.ndarray | None = None) -> np.ndarray:
        """Query embeddings [Q, dim] from captions, uint8 images [Q, R, R, 3], or both."""
        if text is None and image is None:
            raise UserError("a retrieval query needs text, an image, or both")
        ids = None if text is None else [self.text_tokenizer.encode(t) for t in text]
        codes = None if image is None else self.image_tokenizer.encode(np.asarray(image, np.uint8))
        if ids is not None and codes is not None:
            if len(ids) != len(codes):
                raise UserError(f"{len(ids)} texts but {len(codes)} images in one retrieval batch")
            return self.encoder.embed_documents(ids, codes)
        return self.encoder.embed_texts(ids) if codes is None else self.encoder.embed_images(codes)

    def search(self, text: Sequence[str] | None = None, image: np.ndarray | None = None,
               k: int | None = None, skip_near_duplicates: bool = False) -> list[list[Retrieved]]:
        """The (up to) k policy-filtered documents of each query, best first.

        Near-duplicates of the query are kept unless asked: the training policy skips them so
        the LM cannot copy its target, but at generation time they are the best evidence.
        """
        k = self.policy.k if k is None else k
        policy = dataclasses.replace(self.policy, k=k, candidates=max(self.policy.candidates, k),
                                     near_duplicate=self.policy.near_duplicate if skip_near_duplicates else 1.0)
        chosen, chosen_scores = search_memory(self.index, self.memory, self.embed_queries(text, image), policy)
        return [[self._retrieved(int(i), float(s)) for i, s in zip(row, row_scores) if i >= 0]
                for row, row_scores in zip(chosen, chosen_scores)]

    def _retrieved(self, row: int, score: float) -> Retrieved:
        record = self.documents[row]
        return Retrieved(row, score, record["text"], record["image"], self.text_tokenizer.decode(record["text"]))
