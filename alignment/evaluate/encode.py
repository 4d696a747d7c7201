"""Embed text with a loaded encoder: batched, no gradients, deterministic.

Encoding (:func:`encode_texts`): the texts are tokenised in one fast-tokenizer
call, sorted by token length (longest first, ties by position) and cut into
batches, so each batch pads to nearly its own length; each batch runs under
``torch.inference_mode()`` in eval mode, fp32 on CPU, and the rows are put back
in input order. The result depends only on the texts and the settings, not on
their order. A tqdm bar shows progress on a terminal (never in logs or with ``quiet``).

:func:`encode_eval_data` and :func:`evaluate_encoded` carry an
:class:`~alignment.evaluate.datasets.EvalData` through encoding to
:class:`~alignment.evaluate.suite.EvalResults`; NaN/inf or zero-norm embeddings are
dropped, counted per language and shown in the report, never scored.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import Tensor

from alignment.data.collate import pad_sequences, tokenize
from alignment.evaluate.datasets import EvalData
from alignment.evaluate.embeddings import MultiWayEmbeddings, invalid_vectors
from alignment.evaluate.encoder import EncoderInfo, RouterEncoder, encoder_max_positions
from alignment.evaluate.retrieval import training_language_tuple
from alignment.evaluate.suite import EvalConfig, EvalResults, evaluate_embeddings
from alignment.languages import DEFAULT_PIVOT
from alignment.model import DualEncoder

# --------------------------------------------------------------------------- encoding


@dataclass
class EncodeConfig:
    """How text becomes embeddings (``--encode.*``: ``--encode.batch_size``, ``--encode.max_length``, ...)."""

    batch_size: int = 64
    """Sentences per forward pass; peak memory grows with batch_size x max_length."""
    max_length: int = 128
    """Longest input in tokens (specials included); longer sentences are truncated. Capped at the model's positions."""
    prefix: str | None = None
    """Text prepended to every sentence; unset takes the passage prefix recorded with the encoder
    (E5: 'passage: '), an empty string disables it."""
    seed: int = 0
    """Seed set before encoding (models in eval mode draw no random numbers; this pins anything that does)."""
    quiet: bool = False
    """No progress bars."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--encode.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"--encode.max_length must be >= 2 (room for the special tokens), got {self.max_length}")


def resolve_prefix(info: EncoderInfo, override: str | None) -> str:
    """The prefix to apply: ``override`` when given, else the query prefix.

    Every task here is symmetric (both sides are sentences of the same kind), and E5's card says to
    use ``"query: "`` on both sides for symmetric tasks (bitext mining, STS, paraphrase retrieval).
    It is also what ``configs/demo.yaml`` trains with, so before/after evaluations compare alike.
    """
    return info.query_prefix if override is None else override


def progress_enabled(quiet: bool, stream: IO | None = None) -> bool:
    """Progress bars only on an interactive terminal and when not ``quiet``: logs stay clean."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


def quiet_library_bars(config: EncodeConfig, stream: IO | None = None) -> None:
    """Turn off transformers' own progress bars (weight loading) when ours are off: logs stay clean.

    Process-wide (transformers keeps it in a module global); meant for the ``align`` commands.
    """
    if not progress_enabled(config.quiet, stream):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by descending length, ties by position: stable, so batching is deterministic.

    Longest first means the first batch is the most expensive one, so an
    out-of-memory error shows at once rather than at the end.
    """
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _model_device(model: DualEncoder) -> torch.device:
    return next(model.parameters()).device


def encode_texts(
    model: DualEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    config: EncodeConfig | None = None,
    *,
    prefix: str = "",
    pivot: bool = False,
    desc: str = "encoding",
    stream: IO | None = None,
    language: str | None = None,
) -> Tensor:
    """Embed ``texts``: ``(N, D)`` float32 on CPU, row ``i`` the embedding of ``texts[i]``.

    Args:
        prefix: prepended to every text before tokenisation (E5's ``"passage: "``).
        pivot: use the pivot tower of a non-shared encoder.
        desc, stream: the progress bar's label and output (stderr by default).
        language: the texts' language, for a :class:`~alignment.evaluate.encoder.RouterEncoder` (it picks
            the route; None: the Router's default route); ignored by a ``DualEncoder``.

    Cost: one tokenizer call for all texts, then ``ceil(N / batch_size)`` forward
    passes; each batch's embeddings are copied to the host (a device sync per batch).
    """
    from tqdm.auto import tqdm

    config = config or EncodeConfig()
    if isinstance(model, RouterEncoder):
        return model.encode_language(list(texts), language, batch_size=config.batch_size,
                                     max_length=config.max_length, prefix=prefix)
    out = torch.empty(len(texts), model.embedding_dim, dtype=torch.float32)  # (N, D)
    if not texts:
        return out
    limit = min(config.max_length, encoder_max_positions(model) or config.max_length)
    ids = tokenize(tokenizer, list(texts), max_length=limit, prefix=prefix)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way
    order = length_order([len(seq) for seq in ids])
    device = _model_device(model)
    was_training = model.training
    model.eval()
    torch.manual_seed(config.seed)
    show = progress_enabled(config.quiet, stream)
    bar = tqdm(total=len(texts), desc=desc, unit="sent", file=stream, disable=not show)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                input_ids, mask = pad_sequences([ids[i] for i in index], pad_id)  # (b, T), (b, T)
                emb = model.encode(input_ids.to(device), mask.to(device), pivot=pivot)  # (b, D)
                out[torch.tensor(index)] = emb.float().cpu()  # host copy: a sync point per batch
                bar.update(len(index))
    finally:
        bar.close()
        model.train(was_training)
    return out


def _encode_by_tower(
    model: DualEncoder,
    tokenizer: Any,
    texts: Sequence[str],
    languages: Sequence[str],
    config: EncodeConfig,
    *,
    prefix: str,
    pivot: str,
    desc: str,
) -> Tensor:
    """Embed mixed-language ``texts`` ``(N, D)``; pivot-language texts go through the pivot tower
    when the encoder has one, so every sentence is embedded as in training. A Router export encodes each
    language through its own route (every language is checked before anything is encoded)."""
    if isinstance(model, RouterEncoder):
        groups: dict[str, list[int]] = {}
        for i, lang in enumerate(languages):
            groups.setdefault(lang, []).append(i)
        for lang in groups:
            model.check_language(lang)
        out = torch.empty(len(texts), model.embedding_dim)  # (N, D)
        for lang, index in groups.items():
            out[torch.tensor(index)] = encode_texts(model, tokenizer, [texts[i] for i in index], config,
                                                    prefix=prefix, language=lang)
        return out
    if model.pivot_backbone is None:
        return encode_texts(model, tokenizer, texts, config, prefix=prefix, desc=desc)
    out = torch.empty(len(texts), model.embedding_dim)  # (N, D)
    for is_pivot in (True, False):
        index = [i for i, lang in enumerate(languages) if (lang == pivot) == is_pivot]
        if index:
            part = encode_texts(
                model, tokenizer, [texts[i] for i in index], config, prefix=prefix, pivot=is_pivot,
                desc=f"{desc} ({'pivot' if is_pivot else 'other'} tower)",
            )
            out[torch.tensor(index)] = part
    return out


# --------------------------------------------------------------------------- evaluation data -> results


@dataclass
class EncodedEvalData:
    """Embeddings of an :class:`~alignment.evaluate.datasets.EvalData`, ready for the metrics.

    Attributes:
        embeddings: the translation rows (invalid vectors dropped and counted), or None.
        sts_sets: name -> ``(a (n, D), b (n, D), gold (n,))`` per language pair of scored pairs.
        row_labels: row id -> label for classification transfer, or None.
        pair_embeddings: the scored pairs' sentences, each its own row, for the projection plot.
        invalid: NaN/inf and zero-norm counts per language (rows and pairs).
        num_pairs: scored pairs read.
        num_sentences: sentences encoded.
        seconds: wall time of the encoding.
    """

    embeddings: MultiWayEmbeddings | None
    sts_sets: dict[str, tuple[Tensor, Tensor, Tensor]]
    row_labels: dict[str, str] | None
    pair_embeddings: MultiWayEmbeddings | None
    invalid: dict[str, dict[str, int]]
    num_pairs: int
    num_sentences: int
    seconds: float

    @property
    def sentences_per_second(self) -> float:
        return self.num_sentences / self.seconds if self.seconds > 0 else float("nan")

    @property
    def num_invalid(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.invalid.values())


def _count_invalid(vectors: Tensor, languages: Sequence[str]) -> tuple[Tensor, dict[str, dict[str, int]]]:
    """``(valid mask (N,), per-language counts)`` of NaN/inf and zero-norm rows."""
    non_finite, zero = invalid_vectors(vectors)
    counts: dict[str, dict[str, int]] = {}
    for kind, idx in (("non_finite", non_finite), ("zero_norm", zero)):
        for i in idx.tolist():
            counts.setdefault(languages[i], {"non_finite": 0, "zero_norm": 0})[kind] += 1
    valid = torch.ones(len(languages), dtype=torch.bool)
    valid[torch.cat([non_finite, zero]).cpu()] = False
    return valid, counts


def _sts_sets(data: EvalData, vectors: Tensor, valid: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Scored pairs grouped by language pair; a pair with an invalid side is left out (it is counted).

    ``vectors`` ``(2P, D)`` holds pair ``i``'s sentences at rows ``2i`` (a) and ``2i + 1`` (b).
    """
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(data.pairs):
        groups.setdefault(pair.language_pair, []).append(i)
    sets = {}
    for lang_pair, index in groups.items():
        rows = torch.tensor(index)  # (n,)
        keep = valid[2 * rows] & valid[2 * rows + 1]  # (n,)
        gold = torch.tensor([data.pairs[i].score for i in index], dtype=torch.float64)[keep]
        sets[f"{data.name} {lang_pair}"] = (vectors[2 * rows[keep]], vectors[2 * rows[keep] + 1], gold)
    return sets


def encode_eval_data(
    model: DualEncoder,
    tokenizer: Any,
    data: EvalData,
    config: EncodeConfig | None = None,
    *,
    prefix: str = "",
    pivot: str = DEFAULT_PIVOT,
) -> EncodedEvalData:
    """Embed every sentence of ``data`` in one length-sorted pass (two with a separate pivot tower).

    Translation rows become a :class:`MultiWayEmbeddings` with ``on_invalid="drop"``;
    scored pairs become STS sets, one per language pair. Invalid embeddings
    (NaN/inf, zero norm) are never scored: they are dropped and counted in
    :attr:`EncodedEvalData.invalid`, which the report shows.
    """
    config = config or EncodeConfig()
    row_ids = [row.id for row in data.rows for _ in row.texts]
    langs = [lang for row in data.rows for lang in row.texts]
    texts = [text for row in data.rows for text in row.texts.values()]
    for i, pair in enumerate(data.pairs):  # pair i -> sentences 2i (a) and 2i + 1 (b) after the rows
        row_ids += [f"pair{i}:a", f"pair{i}:b"]
        langs += [pair.lang_a, pair.lang_b]
        texts += [pair.text_a, pair.text_b]
    start = time.perf_counter()
    vectors = _encode_by_tower(model, tokenizer, texts, langs, config, prefix=prefix, pivot=pivot, desc=data.name)
    seconds = time.perf_counter() - start  # (N, D) above; CPU tensors, so no pending device work
    valid, invalid = _count_invalid(vectors, langs)
    n_rows = sum(len(row.texts) for row in data.rows)
    emb = None
    if data.rows:
        emb = MultiWayEmbeddings(vectors[:n_rows], row_ids[:n_rows], langs[:n_rows], pivot, on_invalid="drop")
    sts, pair_emb = {}, None
    if data.pairs:
        sts = _sts_sets(data, vectors[n_rows:], valid[n_rows:])
        pair_emb = MultiWayEmbeddings(vectors[n_rows:], row_ids[n_rows:], langs[n_rows:], pivot, on_invalid="drop")
    return EncodedEvalData(
        embeddings=emb,
        sts_sets=sts,
        row_labels=data.labels,
        pair_embeddings=pair_emb,
        invalid=invalid,
        num_pairs=len(data.pairs),
        num_sentences=len(texts),
        seconds=seconds,
    )


def evaluate_encoded(
    encoded: EncodedEvalData,
    config: EvalConfig | None = None,
    *,
    training_languages: Iterable[str] | None = None,
    meta: Mapping | None = None,
) -> tuple[EvalResults, MultiWayEmbeddings | None]:
    """Run the evaluation suite; returns the results and the embeddings to project in the report.

    Translation rows get retrieval, xSIM, diagnostics, hubness, transfer (when
    labelled) and Procrustes (when configured); scored pairs get Spearman STS.
    A scored-pair-only set gets STS alone.
    """
    from alignment.evaluate.probes import sts_spearman

    emb = encoded.embeddings
    if emb is not None:
        res = evaluate_embeddings(
            emb,
            config,
            training_languages=training_languages,
            row_labels=encoded.row_labels,
            sts_sets=encoded.sts_sets or None,
            meta=meta,
        )
    else:
        pairs = encoded.pair_embeddings
        assert pairs is not None, "EncodedEvalData holds neither rows nor scored pairs"
        res = EvalResults(
            languages=pairs.language_codes,
            pivot=pairs.pivot,
            num_rows=encoded.num_pairs,
            num_sentences=encoded.num_sentences,
            training_languages=training_language_tuple(training_languages),
            meta=dict(meta or {}),
        )
        res.sts = [sts_spearman(a, b, gold, name=name) for name, (a, b, gold) in encoded.sts_sets.items()]
    res.invalid = dict(sorted(encoded.invalid.items()))
    return res, emb if emb is not None else encoded.pair_embeddings
