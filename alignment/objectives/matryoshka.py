"""Matryoshka representation learning: the contrastive loss on nested prefixes of the embedding.

Kusupati et al. (2022), "Matryoshka Representation Learning". For each configured width ``d`` the
first ``d`` coordinates of every embedding -- the local anchors and the gathered candidates alike, so
the same sentences are compared in the same truncated space -- are L2-renormalised and scored with the
configured contrastive objective (same temperature, margin and global normalisation)::

    matryoshka_loss = sum_d w_d * contrastive(normalise(e[:, :d]), normalise(candidates[:, :d]))

The full width keeps its own ``contrastive_loss`` term. At inference, truncating an exported model's
embeddings to one of these widths (sentence-transformers' ``truncate_dim``, ``align eval --dims``) then
loses little retrieval quality. The candidates are the same gathered tensor sliced (no extra collective).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.nn.functional as F
from torch import Tensor, nn

from alignment.losses import GlobalCandidates


@dataclass
class MatryoshkaConfig:
    """Nested-prefix contrastive terms (``--model.matryoshka.*``)."""

    dims: list[int] = field(default_factory=list)
    """Prefix widths, increasing, each below the embedding width (e.g. [64, 128, 256]); empty disables."""
    weights: list[float] | None = None
    """Weight of each prefix's contrastive loss, one per width; None = 1 for every width."""

    def __post_init__(self) -> None:
        dims = list(self.dims)
        if any(d < 1 for d in dims) or dims != sorted(set(dims)):
            raise ValueError(f"--model.matryoshka.dims must be increasing widths >= 1, got {self.dims}")
        if self.weights is not None:
            if len(self.weights) != len(dims):
                raise ValueError(f"--model.matryoshka.weights needs one weight per --model.matryoshka.dims entry "
                                 f"({len(dims)}), got {len(self.weights)}")
            if any(w < 0 for w in self.weights):
                raise ValueError(f"--model.matryoshka.weights must be >= 0, got {self.weights}")

    @property
    def enabled(self) -> bool:
        return bool(self.dims)

    def check_width(self, embedding_dim: int) -> None:
        """Before any step: every prefix must be narrower than the embedding."""
        too_wide = [d for d in self.dims if d >= embedding_dim]
        if too_wide:
            raise ValueError(
                f"--model.matryoshka.dims {too_wide} must be below the embedding width {embedding_dim} (the full "
                "width already has its contrastive_loss term); see --model.encoder.projection_dim"
            )


def truncate(emb: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates, L2-renormalised (zero padding rows stay zero)."""
    return F.normalize(emb[:, :dim], dim=-1)


def matryoshka_loss(
    loss_fn: nn.Module, emb: Tensor, candidates: GlobalCandidates, config: MatryoshkaConfig,
    pivot_lang_id: int | None = None,
) -> dict[str, Tensor]:
    """``matryoshka_loss`` (the weighted sum) plus, per width ``d``, ``matryoshka_{d}`` (its unweighted
    contrastive loss) and ``matryoshka_{d}_acc`` (in-batch retrieval accuracy at that width).

    ``loss_fn`` is the training module's :class:`~alignment.losses.MultiWayContrastiveLoss` (its
    objective, margin and, when learned, temperature)."""
    weights = config.weights if config.weights is not None else [1.0] * len(config.dims)
    out: dict[str, Tensor] = {}
    total = None
    for dim, weight in zip(config.dims, weights):
        sliced = replace(candidates, emb=truncate(candidates.emb, dim))
        terms = loss_fn(truncate(emb, dim), sliced, pivot_lang_id=pivot_lang_id)
        term = weight * terms["contrastive_loss"]
        total = term if total is None else total + term
        out[f"matryoshka_{dim}"] = terms["contrastive_loss"].detach()
        out[f"matryoshka_{dim}_acc"] = terms["retrieval_acc"]
    out["matryoshka_loss"] = total
    return out
