"""Write evaluation results: ``metrics.json``, a Markdown report and PNG figures.

:func:`write_report` writes ``metrics.json``, ``report.md`` and
``figures/*.png`` (2-D PCA projection coloured by language, a
language-by-language retrieval heatmap, per-language bars; drawn by
:mod:`alignment.evaluate.figures`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.figures import plot_per_language, plot_projection, plot_retrieval_heatmap
from alignment.evaluate.retrieval import RetrievalTable, language_group
from alignment.evaluate.suite import EvalResults, flat_metrics

FIGURES = ("projection.png", "retrieval_heatmap.png", "per_language.png")


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
    if results.maps is not None:
        out["maps"] = {"accuracy": results.maps.rows("accuracy"), "xsim_error": results.maps.rows("xsim_error")}
    if results.variants:
        out["variants"] = list(results.variants)
    if results.mteb:
        out["mteb"] = [asdict(m) for m in results.mteb]
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
    if results.maps is not None or results.variants:
        from alignment.deploy.variants import deploy_sections

        sections += deploy_sections(results, _fmt, markdown_table)
    if results.mteb:
        rows = [(m.task, m.subset, m.split, m.metric, m.score, f"mteb/{m.file}") for m in results.mteb]
        sections += [
            "## MTEB (MTEB's own evaluators and result files)",
            markdown_table(("task", "subset", "split", "main score", "value", "result file"), rows),
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
    ] if results.languages else []  # an MTEB-only run (align eval --mteb without --data) has no data of its own
    lines.append("")
    flat = flat_metrics(results)
    summary = [(k, v) for k, v in flat.items() if k.count("/") == 1 and (k.endswith("/mean") or _is_group_mean(k))]
    summary += [(k, v) for k, v in flat.items() if "/" not in k]
    sections = ["## Summary", markdown_table(("metric", "value"), summary)] if summary else []
    if results.retrieval is not None and results.retrieval.results:
        sections += _retrieval_sections(results.retrieval)
    sections += _diagnostic_sections(results) + _other_sections(results)
    if figures:
        sections += ["## Figures"] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n" + "\n\n".join(sections) + "\n"


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
