"""Evaluation of sentence encoders from embeddings."""
