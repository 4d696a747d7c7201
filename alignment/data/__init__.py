"""Data: multi-way corpora, WebDataset shards, streamed batches."""
