"""Converters between cm3jax and other checkpoint formats (Hugging Face Chameleon / Anole)."""
