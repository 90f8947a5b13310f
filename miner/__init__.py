"""Miner layer: embedding, FAISS indexes, scores, guards, strategies and negative tables."""
