"""Tokenizers: SentencePiece BPE for text, and the image tokenizers mapping pixels to codes."""
