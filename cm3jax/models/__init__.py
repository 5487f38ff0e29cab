"""Flax NNX models: the mixed-modal transformer (and later the VQGAN and the retriever)."""
