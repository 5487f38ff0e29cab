"""Retrieval: dense index over document embeddings, retrieval policy, embed / neighbours jobs.

`Retriever.load(BUILD_DIR).search(text=..., image=..., k=...)` serves a retrieval build.
"""

__all__ = ["Retrieved", "Retriever"]


def __getattr__(name: str):
    """`Retriever` / `Retrieved`, imported on first use (so `python -m cm3jax.retrieval.build`
    does not import the build module twice)."""
    if name in __all__:
        from cm3jax.retrieval import retriever

        return getattr(retriever, name)
    raise AttributeError(f"module 'cm3jax.retrieval' has no attribute {name!r}")
