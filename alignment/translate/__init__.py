"""NMT synthesis of multi-way corpora: ``align translate``.

==================  ==========================================================
:mod:`.codes`       model families' language codes <-> canonical BCP-47
:mod:`.generate`    the model, loaded once; length-sorted token-budget batches
:mod:`.io`          inputs (lines, JSONL, shards) and output rows with provenance
:mod:`.parts`       deterministic parts, atomic publish, resume, merge, manifest
:mod:`.filters`     optional filters of synthetic pairs and their report
:mod:`.backtranslate`  the plan of directions, through a pivot for monolingual text
:mod:`.run`         one rank of a run
==================  ==========================================================
"""
