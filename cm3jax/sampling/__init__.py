"""Sampling: logits processors (`processors.py`) and the decoding loop (`decode.py`)."""
