"""Evaluation of sentence encoders from embeddings.

Modules, from the data to the report:

* ``datasets`` / ``readers``: :class:`EvalData` containers and language selection / reading shards, TSV, JSONL;
* ``encoder`` / ``encode``: loading an encoder from any model spec / embedding text and eval data with it;
* ``embeddings``: :class:`MultiWayEmbeddings`, validity checks, dropping invalid vectors;
* ``search``: exact chunked and FAISS k-NN and margin scoring, shared by retrieval, hubness and mining;
* ``metrics``: ranks, accuracy, MRR, recall@k, xSIM, hubness, cosine gap;
* ``retrieval``: every language pair of a multi-way set into a :class:`RetrievalTable`;
* ``probes``, ``procrustes``: linear probes and STS; post-hoc orthogonal maps;
* ``suite``: :class:`EvalConfig` and :func:`evaluate_embeddings` (plus flat metrics for loggers);
* ``report`` / ``figures``: ``metrics.json`` and ``report.md`` / the PNG figures;
* ``mining``: margin-based bitext mining; ``mteb_bridge``: running MTEB on the same encoder.
"""
