"""Evaluation: image-tokenizer reconstruction quality (`reconstruction.py`)."""
