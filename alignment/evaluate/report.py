"""Run the evaluation suite on embeddings and write ``metrics.json``, a Markdown report and PNG figures.

Three entry points, all independent of Lightning and of how the embeddings
were made:

* :func:`evaluate_embeddings` runs retrieval, diagnostics, transfer, STS and
  Procrustes on a :class:`~alignment.evaluate.retrieval.MultiWayEmbeddings`
  and returns :class:`EvalResults`;
* :func:`flat_metrics` turns results into a flat ``{name: float}`` dict for a
  logger (``retrieval_acc/mean``, ``retrieval_acc/de-en``, ``xsim/mean``,
  ``lang_id_acc``, ``cos_gap`` ...);
* :func:`validation_metrics` is the hook the training module calls on a
  held-out multi-way set: embeddings, row ids, languages, pivot in; flat
  ``val/...`` metrics out;
* :func:`write_report` writes ``metrics.json``, ``report.md`` and
  ``figures/*.png`` (2-D PCA projection coloured by language, a
  language-by-language retrieval heatmap, per-language bars).

Figures use matplotlib's object API with the Agg canvas: no pyplot, no global
backend switch, safe inside a training process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from alignment.evaluate.probes import (
    CosGapResult,
    HubnessResult,
    LanguageIdResult,
    ProbeConfig,
    StsResult,
    TransferResult,
    classification_transfer,
    cosine_gap,
    hubness_by_language,
    language_id_probe,
    sts_spearman,
)
from alignment.evaluate.procrustes import ProcrustesConfig, ProcrustesReport, evaluate_procrustes
from alignment.evaluate.retrieval import (
    ArrayLike,
    MultiWayEmbeddings,
    RetrievalConfig,
    RetrievalTable,
    evaluate_retrieval,
    language_group,
    training_language_tuple,
)
from alignment.languages import DEFAULT_PIVOT

METRIC_NAMES = {"accuracy": "retrieval_acc", "mrr": "mrr", "xsim_error": "xsim"}
"""Flat-metric names of the retrieval metrics; ``recall@k`` keeps its name."""
FIGURES = ("projection.png", "retrieval_heatmap.png", "per_language.png")


@dataclass
class EvalConfig:
    """What :func:`evaluate_embeddings` runs (``--eval.*``).

    Nested sections keep their own flag prefixes: ``--retrieval.*``, ``--probe.*``, ``--procrustes.*``.
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

    def __post_init__(self) -> None:
        if self.hubness_k < 0:
            raise ValueError(f"--eval.hubness_k must be >= 0 (0 disables hubness), got {self.hubness_k}")


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
    invalid: dict[str, dict[str, int]] = field(default_factory=dict)
    """Embeddings dropped as NaN/inf or zero-norm, per language (``on_invalid="drop"``)."""
    meta: dict = field(default_factory=dict)
    """Free-form provenance (model, checkpoint, data) copied into the report."""


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
    ``procrustes/<metric>_before|after/mean|<pair>``, ``invalid_embeddings``.
    """
    out: dict[str, float] = {}
    if results.retrieval is not None and results.retrieval.results:
        out.update(_retrieval_flat(results.retrieval))
    out.update(_diagnostics_flat(results))
    out.update(_transfer_flat(results))
    out.update(_procrustes_flat(results.procrustes))
    out.update({f"sts_spearman/{s.name}": s.spearman for s in results.sts})
    if results.invalid:
        out["invalid_embeddings"] = sum(sum(kinds.values()) for kinds in results.invalid.values())
    return {f"{prefix}{k}": float(v) for k, v in out.items() if not math.isnan(float(v))}


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


# --------------------------------------------------------------------------- JSON


def _clean(value):
    """JSON-safe copy: tensors to lists, NaN/inf to None, tuple keys to strings."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Tensor):
        return _clean(value.tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def results_to_dict(results: EvalResults) -> dict:
    """The structured content of ``metrics.json`` (``metrics`` holds :func:`flat_metrics`)."""
    out = {
        "summary": {
            "languages": list(results.languages),
            "pivot": results.pivot,
            "num_rows": results.num_rows,
            "num_sentences": results.num_sentences,
            "training_languages": list(results.training_languages) if results.training_languages is not None else None,
            **results.meta,
        },
        "metrics": flat_metrics(results),
        "invalid_embeddings": results.invalid,
    }
    if results.retrieval is not None:
        table = results.retrieval
        out["retrieval"] = {
            "pairs": [dict(r.to_dict(), group=table.group(r)) for r in table.results],
            "skipped": [f"{s}-{t}" for s, t in table.skipped],
            "per_language": {
                lang: dict(row, group=language_group(lang, table.training_languages))
                for lang, row in table.per_language("accuracy").items()
            },
            "groups": {g: {m: table.mean(m, g) for m in table.metric_names} for g in table.groups()},
        }
    for name in ("language_id", "transfer"):
        part = getattr(results, name)
        if part is not None:
            out[name] = asdict(part)
    if results.cos_gap is not None:
        out["cos_gap"] = dict(asdict(results.cos_gap), gap=results.cos_gap.gap)
    if results.hubness:
        out["hubness"] = {lang: asdict(h) for lang, h in results.hubness.items()}
    if results.sts:
        out["sts"] = [asdict(s) for s in results.sts]
    if results.procrustes is not None:
        pr = results.procrustes
        out["procrustes"] = {
            "fit_pairs": pr.fit_pairs,
            "num_heldout_rows": pr.num_heldout_rows,
            "accuracy": pr.rows("accuracy"),
            "xsim_error": pr.rows("xsim_error"),
        }
    return _clean(out)


# --------------------------------------------------------------------------- Markdown


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-flavoured Markdown table; floats get 4 decimals, NaN/None print as ``-``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _retrieval_sections(table: RetrievalTable) -> list[str]:
    metrics = table.metric_names
    pair_rows = [(r.key, table.group(r), r.num_queries, *(r.value(m) for m in metrics)) for r in table.results]
    sections = [
        "## Retrieval by pair",
        "Nearest-neighbour retrieval by cosine (accuracy, recall@k, MRR) and margin-based xSIM error.",
        markdown_table(("pair", "group", "queries", *metrics), pair_rows),
    ]
    acc, xsim = table.per_language("accuracy"), table.per_language("xsim_error")
    lang_rows = [
        (
            lang,
            language_group(lang, table.training_languages),
            acc[lang]["as_source"],
            acc[lang]["as_target"],
            acc[lang]["mean"],
            xsim[lang]["mean"],
        )
        for lang in table.languages
    ]
    sections += [
        "## Retrieval by language",
        markdown_table(("language", "group", "acc as source", "acc as target", "acc mean", "xSIM mean"), lang_rows),
    ]
    if table.groups():
        group_rows = [
            (g, sum(table.group(r) == g for r in table.results), *(table.mean(m, g) for m in metrics))
            for g in table.groups()
        ]
        sections += [
            "## Seen vs unseen languages",
            "A pair is *seen* when both languages were trained on, *unseen* when neither was, *mixed* otherwise.",
            markdown_table(("group", "pairs", *metrics), group_rows),
        ]
    if table.skipped:
        sections.append("Pairs skipped (no row has both languages): " + ", ".join(f"{s}-{t}" for s, t in table.skipped))
    return sections


def _diagnostic_sections(results: EvalResults) -> list[str]:
    rows = []
    if results.language_id is not None:
        lid = results.language_id
        rows += [
            ("language-ID probe accuracy (lower = more language-agnostic)", lid.accuracy),
            ("language-ID majority baseline", lid.majority_baseline),
            ("language-ID chance", lid.chance),
        ]
    if results.cos_gap is not None:
        gap = results.cos_gap
        rows += [
            ("mean translation cosine", gap.translation),
            ("mean non-translation cosine", gap.non_translation),
            ("cosine gap", gap.gap),
        ]
    sections = ["## Alignment diagnostics", markdown_table(("diagnostic", "value"), rows)] if rows else []
    if results.hubness:
        hub_rows = [(lang, h.k, h.skewness, h.hub_share, h.max_occurrence) for lang, h in results.hubness.items()]
        sections += [
            "### Hubness (keys: each language; queries: all other languages)",
            markdown_table(("language", "k", "N_k skewness", "hub share (N_k > 2 mean)", "max N_k"), hub_rows),
        ]
    return sections


def _other_sections(results: EvalResults) -> list[str]:
    sections = []
    if results.transfer is not None:
        t = results.transfer
        rows = [(f"{t.pivot} (in-language)", t.num_test.get(t.pivot, 0), t.pivot_accuracy)]
        rows += [(lang, t.num_test[lang], acc) for lang, acc in t.accuracy.items()]
        sections += [
            "## Cross-lingual classification transfer",
            f"Linear probe trained on {t.pivot} embeddings ({len(t.classes)} classes; "
            f"majority baseline {_fmt(t.majority_baseline)}).",
            markdown_table(("language", "test sentences", "accuracy"), rows),
        ]
    if results.sts:
        sections += [
            "## STS (Spearman of cosine vs gold)",
            markdown_table(("set", "pairs", "spearman"), [(s.name, s.num_pairs, s.spearman) for s in results.sts]),
        ]
    if results.procrustes is not None:
        pr = results.procrustes
        acc, xs = pr.rows("accuracy"), pr.rows("xsim_error")
        rows = [(a["pair"], a["before"], a["after"], a["delta"], x["before"], x["after"]) for a, x in zip(acc, xs)]
        fitted = ", ".join(f"{lang} {n}" for lang, n in pr.fit_pairs.items())
        sections += [
            "## Post-hoc Procrustes (held-out rows)",
            f"Orthogonal maps onto the pivot, fitted per language on its rows shared with the pivot ({fitted}); "
            f"{pr.num_heldout_rows} held-out rows. Mean accuracy change {_fmt(pr.mean_delta('accuracy'))}.",
            markdown_table(("pair", "acc before", "acc after", "acc delta", "xSIM before", "xSIM after"), rows),
        ]
    if results.invalid:
        rows = [(lang, c["non_finite"], c["zero_norm"]) for lang, c in results.invalid.items()]
        sections += [
            "## Invalid embeddings (dropped, not scored)",
            markdown_table(("language", "NaN/inf", "zero-norm"), rows),
        ]
    return sections


def _is_group_mean(key: str) -> bool:
    name, _, tail = key.partition("/")
    return name in ("retrieval_acc", "xsim") and tail in ("seen_mean", "mixed_mean", "unseen_mean")


def markdown_report(results: EvalResults, figures: Sequence[str] = (), title: str = "Evaluation report") -> str:
    """The Markdown report: summary, retrieval tables, diagnostics, transfer, STS, Procrustes, figures."""
    trained = ", ".join(results.training_languages) if results.training_languages is not None else "unknown"
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in results.meta.items()]
    lines += [
        f"- languages: {', '.join(results.languages)} (pivot {results.pivot})",
        f"- training languages: {trained}",
        f"- rows: {results.num_rows}, sentences: {results.num_sentences}",
        "",
    ]
    flat = flat_metrics(results)
    summary = [(k, v) for k, v in flat.items() if k.count("/") == 1 and (k.endswith("/mean") or _is_group_mean(k))]
    summary += [(k, v) for k, v in flat.items() if "/" not in k]
    sections = ["## Summary", markdown_table(("metric", "value"), summary)]
    if results.retrieval is not None and results.retrieval.results:
        sections += _retrieval_sections(results.retrieval)
    sections += _diagnostic_sections(results) + _other_sections(results)
    if figures:
        sections += ["## Figures"] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n" + "\n\n".join(sections) + "\n"


# --------------------------------------------------------------------------- figures


def pca_2d(x: Tensor, max_points: int | None = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Project ``x`` ``(N, D)`` on its top two principal components.

    Exact SVD of the centred data (deterministic; a subsample of ``max_points``
    rows, seeded, bounds the cost). Component signs are fixed so that each
    component's largest-magnitude loading is positive.

    Returns:
        ``(n, 2)`` coordinates and the ``(n,)`` row indices of ``x`` they belong to.
    """
    n = x.shape[0]
    idx = torch.arange(n)
    if max_points is not None and n > max_points:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points].sort().values
    data = x[idx.to(x.device)].double().cpu()
    centred = data - data.mean(dim=0)  # (n, D)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:2]  # (2, D)
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))  # (2, 1)
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = centred @ comps.T  # (n, 2)
    if coords.shape[1] < 2:  # D == 1: pad a zero axis
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], dim=1)
    return coords.float(), idx


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot state), constrained layout, size in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _language_colours(languages: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(languages) <= 10 else "tab20"]
    return {lang: cmap(i % cmap.N) for i, lang in enumerate(languages)}


def plot_projection(emb: MultiWayEmbeddings, path: Path, max_points: int = 2000) -> Path:
    """Scatter of the 2-D PCA projection of ``emb``, one colour per language."""
    coords, idx = pca_2d(emb.embeddings, max_points)
    langs = emb.lang_index[idx]
    colours = _language_colours(emb.language_codes)
    fig = new_figure(6.5, 5.5)
    ax = fig.subplots()
    for pos, lang in enumerate(emb.language_codes):
        sel = langs == pos
        if sel.any():
            pts = coords[sel]
            ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=8, alpha=0.7, color=colours[lang], label=lang)
    ax.set(title="Embeddings, first two principal components", xlabel="PC 1", ylabel="PC 2")
    ax.legend(markerscale=2, fontsize="small", loc="best")
    fig.savefig(path, dpi=110)
    return path


def plot_retrieval_heatmap(table: RetrievalTable, path: Path, metric: str = "accuracy") -> Path:
    """Language-by-language heatmap of ``metric`` (rows: source, columns: target)."""
    langs, mat = table.matrix(metric)
    size = max(4.0, 0.6 * len(langs) + 2)
    fig = new_figure(size + 1, size)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(mat.numpy()), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(langs)), langs, rotation=45, ha="right")
    ax.set_yticks(range(len(langs)), langs)
    ax.set(xlabel="target", ylabel="source", title=f"Retrieval {metric} (source -> target)")
    if len(langs) <= 16:
        for i in range(len(langs)):
            for j in range(len(langs)):
                if not math.isnan(mat[i, j]):
                    value = float(mat[i, j])
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value < 0.6 else "black",
                    )
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110)
    return path


def plot_per_language(table: RetrievalTable, path: Path) -> Path:
    """Per-language bars: retrieval accuracy as source and as target; unseen languages hatched."""
    per = table.per_language("accuracy")
    langs = table.languages
    pos = np.arange(len(langs))
    fig = new_figure(max(5.0, 0.7 * len(langs) + 2), 4.0)
    ax = fig.subplots()
    for offset, key, label in ((-0.2, "as_source", "as source"), (0.2, "as_target", "as target")):
        values = [per[lang][key] for lang in langs]
        bars = ax.bar(pos + offset, values, width=0.4, label=label)
        for bar, lang in zip(bars, langs):
            if language_group(lang, table.training_languages) == "unseen":
                bar.set_hatch("//")
    names = [lang + ("*" if language_group(lang, table.training_languages) == "unseen" else "") for lang in langs]
    ax.set_xticks(pos, names, rotation=45, ha="right")
    xlabel = "language (* hatched: unseen in training)" if table.training_languages is not None else "language"
    ax.set(
        ylim=(0, 1.18),
        ylabel="retrieval accuracy (mean over pairs)",
        xlabel=xlabel,
        title="Per-language retrieval accuracy",
    )
    ax.legend(fontsize="small", loc="upper center", ncol=2)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class ReportPaths:
    """What :func:`write_report` wrote."""

    metrics_json: Path
    markdown: Path
    figures: tuple[Path, ...]


def write_report(
    results: EvalResults,
    out_dir: str | Path,
    *,
    embeddings: MultiWayEmbeddings | None = None,
    title: str = "Evaluation report",
    max_points: int = 2000,
) -> ReportPaths:
    """Write ``metrics.json``, ``report.md`` and ``figures/*.png`` under ``out_dir``.

    The projection needs ``embeddings``; the heatmap and bars need retrieval
    results. Figures that cannot be drawn are simply not written.
    """
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if embeddings is not None:
        figures.append(plot_projection(embeddings, fig_dir / "projection.png", max_points))
    if results.retrieval is not None and results.retrieval.results:
        figures.append(plot_retrieval_heatmap(results.retrieval, fig_dir / "retrieval_heatmap.png"))
        figures.append(plot_per_language(results.retrieval, fig_dir / "per_language.png"))
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(results_to_dict(results), indent=2, allow_nan=False) + "\n")
    md_path = out / "report.md"
    md_path.write_text(markdown_report(results, [str(f.relative_to(out)) for f in figures], title))
    return ReportPaths(metrics_path, md_path, tuple(figures))
