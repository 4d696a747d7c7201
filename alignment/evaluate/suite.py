"""Run the evaluation suite on embeddings: the :class:`EvalConfig`, the results, and flat metrics for loggers.

Entry points, all independent of Lightning and of how the embeddings were made:

* :func:`evaluate_embeddings` runs retrieval, diagnostics, transfer, STS and
  Procrustes on a :class:`~alignment.evaluate.embeddings.MultiWayEmbeddings`
  and returns :class:`EvalResults`;
* :func:`flat_metrics` turns results into a flat ``{name: float}`` dict for a
  logger (``retrieval_acc/mean``, ``retrieval_acc/de-en``, ``xsim/mean``,
  ``lang_id_acc``, ``cos_gap`` ...);
* :func:`validation_metrics` is the hook the training module calls on a
  held-out multi-way set: embeddings, row ids, languages, pivot in; flat
  ``val/...`` metrics out.

:mod:`alignment.evaluate.report` writes the results out (``metrics.json``,
``report.md``, figures).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from alignment.evaluate.embeddings import ArrayLike, MultiWayEmbeddings
from alignment.evaluate.metrics import CosGapResult, HubnessResult, cosine_gap, hubness_by_language
from alignment.evaluate.probes import (
    LanguageIdResult,
    ProbeConfig,
    StsResult,
    TransferResult,
    classification_transfer,
    language_id_probe,
    sts_spearman,
)
from alignment.evaluate.procrustes import ProcrustesConfig, ProcrustesReport, evaluate_procrustes
from alignment.evaluate.retrieval import RetrievalConfig, RetrievalTable, evaluate_retrieval, training_language_tuple
from alignment.languages import DEFAULT_PIVOT

METRIC_NAMES = {"accuracy": "retrieval_acc", "mrr": "mrr", "xsim_error": "xsim"}
"""Flat-metric names of the retrieval metrics; ``recall@k`` keeps its name."""


@dataclass
class EvalConfig:
    """What :func:`evaluate_embeddings` runs.

    ``align eval``'s run config inherits these fields, so they are top-level flags:
    ``--hubness_k``, ``--diagnostics``, ``--retrieval.*``, ``--probe.*``, ``--procrustes.*``.
    """

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """Bitext retrieval and xSIM settings."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Linear-probe settings (language ID and classification transfer)."""
    diagnostics: bool = True
    """Run the language-identity probe and the cosine gap."""
    hubness_k: int = 10
    """k of the k-occurrence for hubness; 0 skips hubness (cost O(N^2 D))."""
    procrustes: ProcrustesConfig | None = None
    """Post-hoc Procrustes before/after on held-out rows; None skips it."""
    dims: str | None = None
    """Comma-separated widths (e.g. 64,128,256): retrieval is also reported on the embeddings truncated to
    their first d coordinates and renormalised (Matryoshka; sentence-transformers' ``truncate_dim``)."""

    def __post_init__(self) -> None:
        if self.hubness_k < 0:
            raise ValueError(f"--hubness_k must be >= 0 (0 disables hubness), got {self.hubness_k}")
        self.truncation_dims  # noqa: B018 - checks --dims

    @property
    def truncation_dims(self) -> tuple[int, ...]:
        """``--dims`` as increasing integers (empty when not given)."""
        if not self.dims:
            return ()
        try:
            dims = tuple(int(d) for d in str(self.dims).split(",") if d.strip())
        except ValueError:
            raise ValueError(f"--dims must be comma-separated integers, e.g. 64,128,256; got {self.dims!r}") from None
        if not dims or any(d < 1 for d in dims):
            raise ValueError(f"--dims must be widths >= 1, e.g. 64,128,256; got {self.dims!r}")
        return tuple(sorted(set(dims)))


@dataclass
class EvalResults:
    """Everything one evaluation produced; ``None`` / empty where a part was not run."""

    languages: tuple[str, ...]
    pivot: str
    num_rows: int
    num_sentences: int
    retrieval: RetrievalTable | None = None
    language_id: LanguageIdResult | None = None
    cos_gap: CosGapResult | None = None
    hubness: dict[str, HubnessResult] = field(default_factory=dict)
    transfer: TransferResult | None = None
    sts: list[StsResult] = field(default_factory=list)
    procrustes: ProcrustesReport | None = None
    training_languages: tuple[str, ...] | None = None
    truncated: dict[int, RetrievalTable] = field(default_factory=dict)
    """Retrieval on the embeddings truncated to each ``--dims`` width (renormalised)."""
    invalid: dict[str, dict[str, int]] = field(default_factory=dict)
    """Embeddings dropped as NaN/inf or zero-norm, per language (``on_invalid="drop"``)."""
    meta: dict = field(default_factory=dict)
    """Free-form provenance (model, checkpoint, data) copied into the report."""
    maps: ProcrustesReport | None = None
    """Retrieval without / with saved language maps (``align eval --maps``; :mod:`alignment.deploy.variants`)."""
    variants: list[dict] = field(default_factory=list)
    """Quality / size / speed per deployment variant (``align eval --variants``)."""
    mteb: list = field(default_factory=list)
    """MTEB main scores, one per task and subset (``align eval --mteb`` / ``--mteb_local``;
    :class:`~alignment.evaluate.mteb_bridge.MtebScore`)."""


def evaluate_embeddings(
    emb: MultiWayEmbeddings,
    config: EvalConfig | None = None,
    *,
    training_languages: Iterable[str] | None = None,
    row_labels: Mapping | Sequence | None = None,
    sts_sets: Mapping[str, tuple[ArrayLike, ArrayLike, ArrayLike]] | None = None,
    meta: Mapping | None = None,
) -> EvalResults:
    """Run the configured evaluations on ``emb``.

    Args:
        training_languages: when known, tables split seen / unseen languages.
        row_labels: class label per row (key -> label, or aligned with
            ``emb.row_keys``) for classification transfer; None skips it.
        sts_sets: name -> ``(a (n, D), b (n, D), gold (n,))`` scored pairs; None skips STS.
        meta: provenance copied into the report.
    """
    config = config or EvalConfig()
    trained = training_language_tuple(training_languages)
    res = EvalResults(
        languages=emb.language_codes,
        pivot=emb.pivot,
        num_rows=emb.num_rows,
        num_sentences=emb.num_sentences,
        training_languages=trained,
        invalid=dict(emb.invalid),
        meta=dict(meta or {}),
    )
    res.retrieval = evaluate_retrieval(emb, config.retrieval, training_languages=trained)
    for dim in config.truncation_dims:
        res.truncated[dim] = evaluate_retrieval(truncated(emb, dim), config.retrieval, training_languages=trained)
    if config.diagnostics:
        res.language_id = language_id_probe(emb, config.probe)
        res.cos_gap = cosine_gap(emb)
    if config.hubness_k:
        res.hubness = hubness_by_language(emb, config.hubness_k, chunk_size=config.retrieval.chunk_size)
    if row_labels is not None:
        res.transfer = classification_transfer(emb, row_labels, config.probe)
    for name, (a, b, gold) in (sts_sets or {}).items():
        res.sts.append(sts_spearman(a, b, gold, name=name))
    if config.procrustes is not None:
        res.procrustes, _ = evaluate_procrustes(emb, config.procrustes, config.retrieval, training_languages=trained)
    return res


def truncated(emb: MultiWayEmbeddings, dim: int) -> MultiWayEmbeddings:
    """``emb`` with every vector cut to its first ``dim`` coordinates and renormalised (a Matryoshka prefix)."""
    width = int(emb.embeddings.shape[1])
    if dim >= width:
        raise ValueError(f"--dims {dim} must be below the embedding width {width}")
    out = copy.copy(emb)
    prefix = emb.embeddings[:, :dim]
    out.embeddings = prefix / prefix.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return out


# --------------------------------------------------------------------------- flat metrics


def _metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def _retrieval_flat(table: RetrievalTable) -> dict[str, float]:
    out = {}
    for metric in table.metric_names:
        name = _metric_name(metric)
        out[f"{name}/mean"] = table.mean(metric)
        for group in table.groups():
            out[f"{name}/{group}_mean"] = table.mean(metric, group)
        for r in table.results:
            out[f"{name}/{r.key}"] = r.value(metric)
    for lang, row in table.per_language("accuracy").items():
        out[f"retrieval_acc_by_lang/{lang}"] = row["mean"]
    return out


def flat_metrics(results: EvalResults, prefix: str = "") -> dict[str, float]:
    """A flat ``{name: float}`` view for loggers; parts not run and undefined (NaN) values are left out.

    Names: ``retrieval_acc|mrr|recall@k|xsim / mean|seen_mean|unseen_mean|mixed_mean|<src>-<tgt>``,
    ``retrieval_acc_by_lang/<lang>``, ``lang_id_acc``, ``lang_id_majority``, ``lang_id_chance``,
    ``cos_gap``, ``cos_translation``, ``cos_non_translation``, ``hubness_skew/<lang>|mean``,
    ``hub_share/mean``, ``transfer_acc/<lang>|mean|pivot``, ``sts_spearman/<name>``,
    ``procrustes/<metric>_before|after/mean|<pair>``, ``dim<d>/<retrieval metric>/...`` (``--dims``),
    ``mteb/<task>/<subset>`` (MTEB's main score), ``invalid_embeddings``.
    """
    out: dict[str, float] = {}
    if results.retrieval is not None and results.retrieval.results:
        out.update(_retrieval_flat(results.retrieval))
    for dim, table in results.truncated.items():
        out.update({f"dim{dim}/{k}": v for k, v in _retrieval_flat(table).items() if "_by_lang/" not in k})
    out.update(_diagnostics_flat(results))
    out.update(_transfer_flat(results))
    out.update(_procrustes_flat(results.procrustes))
    out.update({f"sts_spearman/{s.name}": s.spearman for s in results.sts})
    if results.maps is not None or results.variants:
        from alignment.deploy.variants import deploy_flat

        out.update(deploy_flat(results))
    out.update({mteb_metric_name(m): m.score for m in results.mteb})
    if results.invalid:
        out["invalid_embeddings"] = sum(sum(kinds.values()) for kinds in results.invalid.values())
    return {f"{prefix}{k}": float(v) for k, v in out.items() if not math.isnan(float(v))}


def mteb_metric_name(score) -> str:
    """``mteb/<task>/<subset>`` (``/<split>`` added for a split other than test) of an MTEB main score."""
    return f"mteb/{score.task}/{score.subset}" + ("" if score.split == "test" else f"/{score.split}")


def _diagnostics_flat(results: EvalResults) -> dict[str, float]:
    out = {}
    if results.language_id is not None:
        lid = results.language_id
        out.update(lang_id_acc=lid.accuracy, lang_id_majority=lid.majority_baseline, lang_id_chance=lid.chance)
    if results.cos_gap is not None:
        gap = results.cos_gap
        out.update(cos_gap=gap.gap, cos_translation=gap.translation, cos_non_translation=gap.non_translation)
    if results.hubness:
        out.update({f"hubness_skew/{lang}": h.skewness for lang, h in results.hubness.items()})
        out["hubness_skew/mean"] = float(np.mean([h.skewness for h in results.hubness.values()]))
        out["hub_share/mean"] = float(np.mean([h.hub_share for h in results.hubness.values()]))
    return out


def _transfer_flat(results: EvalResults) -> dict[str, float]:
    if results.transfer is None:
        return {}
    t = results.transfer
    out = {f"transfer_acc/{lang}": acc for lang, acc in t.accuracy.items()}
    out.update({"transfer_acc/mean": t.mean_accuracy, "transfer_acc/pivot": t.pivot_accuracy})
    return out


def _procrustes_flat(report: ProcrustesReport | None) -> dict[str, float]:
    out = {}
    if report is None:
        return out
    for metric in ("accuracy", "xsim_error"):
        for side, table in (("before", report.before), ("after", report.after)):
            name = f"procrustes/{_metric_name(metric)}_{side}"
            out[f"{name}/mean"] = table.mean(metric)
            out.update({f"{name}/{r.key}": r.value(metric) for r in table.results})
    return out


def validation_metrics(
    embeddings: ArrayLike,
    row_ids: Sequence | ArrayLike,
    languages: Sequence[str] | ArrayLike,
    pivot: str = DEFAULT_PIVOT,
    *,
    vocabulary: Sequence[str] | None = None,
    prefix: str = "val/",
    config: EvalConfig | None = None,
    training_languages: Iterable[str] | None = None,
) -> dict[str, float]:
    """Flat metrics of a held-out multi-way set, for the training module's logger.

    Args:
        embeddings: ``(N, D)``, one per sentence (gathered from all ranks by the caller).
        row_ids: ``(N,)`` row of each sentence; equal ids translate one another.
            They must be unique across the whole held-out set: ``Batch.row_ids``
            are batch-local and repeat from batch to batch, so pass the dataset
            keys (``Batch.row_keys`` expanded per sentence) or offset them per
            batch, or unrelated rows are merged (and raise as duplicates).
        languages: ``(N,)`` language codes, or integer ids into ``vocabulary``
            (the :class:`~alignment.data.stream.Batch` layout).
        pivot: the pivot language.
        config: defaults to retrieval over all ordered pairs plus the
            language-ID probe and cosine gap, without hubness (``O(N^2 D)``).

    Returns:
        e.g. ``{"val/retrieval_acc/mean": 0.93, "val/retrieval_acc/de-en": 0.95,
        "val/xsim/mean": 0.04, "val/lang_id_acc": 0.41, "val/cos_gap": 0.52, ...}``.

    Raises:
        InvalidEmbeddingsError: NaN/inf or zero-norm embeddings (count and
            languages named): a diverged model must not log a plausible accuracy.

    Safe to call under ``torch.no_grad()`` / ``torch.inference_mode()``.
    """
    if vocabulary is not None:
        emb = MultiWayEmbeddings.from_ids(embeddings, row_ids, languages, vocabulary, pivot)
    else:
        emb = MultiWayEmbeddings(embeddings, row_ids, languages, pivot)
    config = config or EvalConfig(hubness_k=0)
    return flat_metrics(evaluate_embeddings(emb, config, training_languages=training_languages), prefix)
