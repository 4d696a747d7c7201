"""Bitext retrieval over a multi-way set: every ordered language pair, aggregated into a table.

``align eval``, ``align mine`` and the training module's validation hook are thin
wrappers around these functions and :mod:`alignment.evaluate.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.metrics import gold_ranks, rank_metrics, torchmetrics_rank_metrics, xsim_error_rate
from alignment.evaluate.search import KNN_BACKENDS, MARGINS, KnnBackend, Margin
from alignment.languages import normalize_language

PairMode = Literal["all", "pivot"]
PAIR_MODES: tuple[str, ...] = get_args(PairMode)
"""Which language pairs to evaluate: every ordered pair, or each language to and from the pivot."""
MetricBackend = Literal["rank", "torchmetrics"]
METRIC_BACKENDS: tuple[str, ...] = get_args(MetricBackend)
"""How retrieval metrics are computed: from the gold rank (chunked) or torchmetrics' retrieval metrics."""


# --------------------------------------------------------------------------- config, pairs, tables


@dataclass
class RetrievalConfig:
    """Bitext retrieval and xSIM settings (``--retrieval.*``)."""

    ks: tuple[int, ...] = (1, 5, 10)
    """Cut-offs for recall@k (accuracy is recall@1 and is always reported)."""
    margin: Margin = "ratio"
    """Margin function for xSIM: ratio, distance or absolute (Artetxe & Schwenk 2019)."""
    margin_k: int = 4
    """Neighbourhood size k of the margin (LASER uses 4)."""
    pairs: PairMode = "all"
    """Language pairs: 'all' ordered pairs of distinct languages, or 'pivot' (each language to and from the pivot)."""
    chunk_size: int = 4096
    """Queries scored per matmul; memory is chunk_size x candidates floats."""
    backend: KnnBackend = "auto"
    """k-NN backend for margin search: auto, exact, faiss."""
    metrics_backend: MetricBackend = "rank"
    """'rank' (chunked, any size) or 'torchmetrics' (full score matrix per pair; small sets)."""

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"--retrieval.ks must be a non-empty list of integers >= 1, got {list(self.ks)}")
        if self.margin not in MARGINS:
            raise ValueError(f"--retrieval.margin must be one of {', '.join(MARGINS)}, got {self.margin!r}")
        if self.margin_k < 1:
            raise ValueError(f"--retrieval.margin_k must be >= 1, got {self.margin_k}")
        if self.pairs not in PAIR_MODES:
            raise ValueError(f"--retrieval.pairs must be one of {', '.join(PAIR_MODES)}, got {self.pairs!r}")
        if self.chunk_size < 1:
            raise ValueError(f"--retrieval.chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in KNN_BACKENDS:
            raise ValueError(f"--retrieval.backend must be one of {', '.join(KNN_BACKENDS)}, got {self.backend!r}")
        if self.metrics_backend not in METRIC_BACKENDS:
            raise ValueError(
                f"--retrieval.metrics_backend must be one of {', '.join(METRIC_BACKENDS)}, got {self.metrics_backend!r}"
            )


def language_group(lang: str, training_languages: Iterable[str] | None) -> str:
    """``"seen"`` if ``lang`` was a training language, ``"unseen"`` if not, ``"all"`` when unknown."""
    if training_languages is None:
        return "all"
    return "seen" if normalize_language(lang) in {normalize_language(t) for t in training_languages} else "unseen"


def pair_group(src: str, tgt: str, training_languages: Iterable[str] | None) -> str:
    """``"seen"`` (both trained), ``"unseen"`` (neither), ``"mixed"`` (one), or ``"all"`` when unknown."""
    if training_languages is None:
        return "all"
    groups = {language_group(src, training_languages), language_group(tgt, training_languages)}
    return groups.pop() if len(groups) == 1 else "mixed"


@dataclass(frozen=True)
class PairResult:
    """Retrieval of ``tgt`` translations for ``src`` queries over ``num_queries`` aligned rows.

    ``accuracy`` is cosine nearest-neighbour accuracy (Tatoeba; error = 1 - accuracy),
    ``recall`` maps k to recall@k, ``mrr`` is the mean reciprocal rank and
    ``xsim_error`` the margin-based error rate.
    """

    src: str
    tgt: str
    num_queries: int
    accuracy: float
    mrr: float
    xsim_error: float
    recall: dict[int, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.src}-{self.tgt}"

    def value(self, metric: str) -> float:
        """``accuracy``, ``mrr``, ``xsim_error`` or ``recall@k``."""
        if metric.startswith("recall@"):
            return self.recall[int(metric.split("@", 1)[1])]
        if metric in ("accuracy", "mrr", "xsim_error"):
            return getattr(self, metric)
        raise KeyError(f"unknown retrieval metric {metric!r}")

    def to_dict(self) -> dict:
        out = {
            "src": self.src,
            "tgt": self.tgt,
            "num_queries": self.num_queries,
            "accuracy": self.accuracy,
            "mrr": self.mrr,
        }
        out.update({f"recall@{k}": v for k, v in sorted(self.recall.items())})
        out["xsim_error"] = self.xsim_error
        return out


@dataclass
class RetrievalTable:
    """Per-pair results plus the aggregations the report and logger need.

    Attributes:
        results: one :class:`PairResult` per evaluated ordered pair.
        skipped: generated pairs with no row holding both languages.
        training_languages: when known, splits means into seen/unseen/mixed groups.
    """

    results: list[PairResult]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    training_languages: tuple[str, ...] | None = None

    @property
    def languages(self) -> list[str]:
        return sorted({r.src for r in self.results} | {r.tgt for r in self.results})

    @property
    def metric_names(self) -> list[str]:
        """Metrics to tabulate; recall@1 is left out because it equals accuracy."""
        ks = sorted(self.results[0].recall) if self.results else []
        return ["accuracy", "mrr", *(f"recall@{k}" for k in ks if k != 1), "xsim_error"]

    def mean(self, metric: str, group: str | None = None) -> float:
        """Unweighted mean over pairs (each pair counts once), optionally within a seen/unseen/mixed group."""
        values = [r.value(metric) for r in self.results if group is None or self.group(r) == group]
        return float(np.mean(values)) if values else math.nan

    def group(self, result: PairResult) -> str:
        return pair_group(result.src, result.tgt, self.training_languages)

    def groups(self) -> list[str]:
        """Groups present, in a fixed order (empty when training languages are unknown)."""
        if self.training_languages is None:
            return []
        present = {self.group(r) for r in self.results}
        return [g for g in ("seen", "mixed", "unseen") if g in present]

    def matrix(self, metric: str = "accuracy") -> tuple[list[str], Tensor]:
        """``(languages, (L, L))``: ``[i, j]`` is ``metric`` for ``languages[i] -> languages[j]`` (NaN: not run)."""
        langs = self.languages
        pos = {lang: i for i, lang in enumerate(langs)}
        mat = torch.full((len(langs), len(langs)), math.nan, dtype=torch.float64)
        for r in self.results:
            mat[pos[r.src], pos[r.tgt]] = r.value(metric)
        return langs, mat

    def per_language(self, metric: str = "accuracy") -> dict[str, dict[str, float]]:
        """Per language: mean ``metric`` as source, as target, and over both."""
        out = {}
        for lang in self.languages:
            as_src = [r.value(metric) for r in self.results if r.src == lang]
            as_tgt = [r.value(metric) for r in self.results if r.tgt == lang]
            out[lang] = {
                "as_source": float(np.mean(as_src)) if as_src else math.nan,
                "as_target": float(np.mean(as_tgt)) if as_tgt else math.nan,
                "mean": float(np.mean(as_src + as_tgt)),
            }
        return out


def language_pairs(emb: MultiWayEmbeddings, pairs: str | Sequence[tuple[str, str]] = "all") -> list[tuple[str, str]]:
    """Ordered ``(src, tgt)`` pairs: ``"all"``, ``"pivot"``, or an explicit list (each language checked)."""
    if isinstance(pairs, str):
        if pairs == "all":
            return [(s, t) for s in emb.language_codes for t in emb.language_codes if s != t]
        if pairs == "pivot":
            pivot = emb.require_language(emb.pivot)
            others = [lang for lang in emb.language_codes if lang != pivot]
            return [p for lang in others for p in ((lang, pivot), (pivot, lang))]
        raise ValueError(f"pairs must be one of {PAIR_MODES} or a list of (src, tgt), got {pairs!r}")
    out = []
    for src, tgt in pairs:
        src, tgt = emb.require_language(src), emb.require_language(tgt)
        if src == tgt:
            raise ValueError(f"pair {src}-{tgt}: source and target must differ")
        out.append((src, tgt))
    return out


def evaluate_pair(emb: MultiWayEmbeddings, src: str, tgt: str, config: RetrievalConfig | None = None) -> PairResult:
    """Retrieval accuracy, recall@k, MRR and xSIM for ``src -> tgt`` over the rows having both.

    Raises:
        ValueError: a language is absent, or no row has both languages (both named).
    """
    config = config or RetrievalConfig()
    x, y = emb.pair(src, tgt)  # (n, D), (n, D)
    if x.shape[0] == 0:
        raise ValueError(f"pair {src}-{tgt}: no row has both languages, so there is nothing to retrieve")
    if config.metrics_backend == "torchmetrics":
        metrics = torchmetrics_rank_metrics(x @ y.T, ks=config.ks)  # (n, n) scores: small sets only
    else:
        metrics = rank_metrics(gold_ranks(x, y, chunk_size=config.chunk_size), config.ks)
    xsim = xsim_error_rate(
        x, y, k=config.margin_k, margin=config.margin, chunk_size=config.chunk_size, backend=config.backend
    )
    return PairResult(
        src=emb.require_language(src),
        tgt=emb.require_language(tgt),
        num_queries=int(x.shape[0]),
        accuracy=metrics["accuracy"],
        mrr=metrics["mrr"],
        xsim_error=xsim,
        recall={k: metrics[f"recall@{k}"] for k in config.ks},
    )


def evaluate_retrieval(
    emb: MultiWayEmbeddings,
    config: RetrievalConfig | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    training_languages: Iterable[str] | None = None,
) -> RetrievalTable:
    """Evaluate every pair of ``config.pairs`` (or the explicit ``pairs``).

    Generated pairs ("all"/"pivot") without a shared row are listed in
    ``skipped``; an explicit pair without one raises.
    """
    config = config or RetrievalConfig()
    explicit = pairs is not None
    todo = language_pairs(emb, pairs if explicit else config.pairs)
    results, skipped = [], []
    for src, tgt in todo:
        if not explicit and emb.aligned(src, tgt)[0].numel() == 0:
            skipped.append((src, tgt))
            continue
        results.append(evaluate_pair(emb, src, tgt, config))
    return RetrievalTable(results, skipped, training_language_tuple(training_languages))


def training_language_tuple(languages: Iterable[str] | None) -> tuple[str, ...] | None:
    """Canonical training languages, or None when unknown."""
    return None if languages is None else tuple(normalize_language(lang) for lang in languages)
