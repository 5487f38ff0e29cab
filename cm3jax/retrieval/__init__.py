"""Retrieval: dense index over document embeddings, retrieval policy, embed / neighbours jobs."""
