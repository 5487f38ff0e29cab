"""Retrieval: dense index over document embeddings, retrieval policy, embed / neighbours jobs.

`Retriever.load(BUILD_DIR).search(text=..., image=..., k=...)` serves a retrieval build.
"""

from cm3jax.retrieval.retriever import Retrieved, Retriever

__all__ = ["Retrieved", "Retriever"]
