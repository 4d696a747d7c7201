"""Evaluation figures: 2-D PCA projection by language, retrieval heatmap, per-language bars.

Figures use matplotlib's object API with the Agg canvas: no pyplot, no global
backend switch, safe inside a training process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from alignment.evaluate.embeddings import MultiWayEmbeddings
from alignment.evaluate.retrieval import RetrievalTable, language_group

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
