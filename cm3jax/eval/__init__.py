"""Evaluation: reconstruction, retrieval, generation (shapes oracle, captioning, FID) and the demo report;
`suite.py` holds what `python -m cm3jax.eval` runs."""
