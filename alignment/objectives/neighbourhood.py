"""Neighbourhood-preserving regulariser: keep each language's similarity structure of the starting model.

Relational knowledge distillation (Park et al. 2019) within each language: for an anchor sentence ``i``
of language ``l``, its neighbours ``N(i)`` are the *other* sentences of language ``l`` in the global batch
(all ranks: the gathered candidates). The frozen starting encoder (the drift reference,
``DualEncoder.frozen_copy``) and the trained encoder each give a distribution over them::

    p_i(j) = softmax_{j in N(i)}(cos_ref(i, j) / t)      q_i(j) = softmax_{j in N(i)}(cos(i, j) / t)
    neighbourhood_loss = weight * mean_i KL(p_i || q_i)

The pointwise drift term (``--model.loss.drift_weight``) pins each embedding to where it started; this
term only asks that, within a language, what was near stays near, leaving the space free to move (and
rotate) so that translations can meet. Anchors whose language has a single sentence in the global batch
have no neighbour and no term.

Distributed: the candidates are the gathered global batch (with gradients, as the contrastive loss's),
the reference's candidates are gathered without gradients (one extra all-gather per step); the mean is
over the global number of anchors, times the world size (the convention of ``alignment.losses``), so the
mean over ranks of the gradients is the one-process gradient over the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.losses import GlobalCandidates


@dataclass
class NeighbourhoodConfig:
    """Within-language similarity structure of the starting model (``--model.neighbourhood.*``)."""

    weight: float = 0.0
    """Weight of the KL between the starting and trained models' within-language neighbour distributions;
    0 disables. Uses the frozen reference the drift term uses (one more forward per step, no gradients)."""
    temperature: float = 0.05
    """Softmax temperature of both neighbour distributions (lower: only the nearest neighbours matter)."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"--model.neighbourhood.weight must be >= 0 (0 disables), got {self.weight}")
        if not self.temperature > 0:
            raise ValueError(f"--model.neighbourhood.temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def neighbourhood_loss(
    emb: Tensor, ref_emb: Tensor, candidates: GlobalCandidates, ref_candidates: Tensor, *, weight: float,
    temperature: float,
) -> dict[str, Tensor]:
    """The term for the local anchors.

    Args:
        emb: ``(n, D)`` local embeddings of the trained encoder (``candidates.local_index`` order).
        ref_emb: ``(n, D)`` the frozen reference's embeddings of the same sentences.
        candidates: the gathered global batch of the trained encoder (``candidates.emb`` with gradients).
        ref_candidates: ``(M, D)`` the reference's embeddings in the candidates' layout (padding anywhere).
        weight, temperature: see :class:`NeighbourhoodConfig`.

    Returns:
        ``neighbourhood_loss`` (weighted, rank-local) and ``neighbourhood_kl`` (the unweighted mean KL over
        the local anchors that have neighbours).
    """
    cols = torch.arange(candidates.lang_ids.shape[0], device=emb.device)  # (M,)
    anchor_lang = candidates.lang_ids[candidates.local_index]  # (n,)
    neighbour = (candidates.valid[None, :] & (candidates.lang_ids[None, :] == anchor_lang[:, None])
                 & (cols[None, :] != candidates.local_index[:, None]))  # (n, M) fmt: skip
    has = neighbour.any(dim=1)  # (n,)
    # global anchors with a neighbour: sentences whose language has >= 2 sentences in the global batch
    langs = candidates.lang_ids[candidates.valid]
    per_lang = torch.bincount(langs, minlength=max(candidates.num_languages, 1)) if langs.numel() else langs
    num_anchors = int((per_lang[per_lang >= 2]).sum()) if per_lang.numel() else 0  # host sync
    student = (emb @ candidates.emb.T) / temperature  # (n, M)
    with torch.no_grad():
        teacher = (ref_emb.to(ref_candidates.dtype) @ ref_candidates.T) / temperature  # (n, M)
    fill = torch.finfo(student.dtype).min
    log_q = F.log_softmax(student.masked_fill(~neighbour, fill), dim=1)  # (n, M)
    log_p = F.log_softmax(teacher.to(student.dtype).masked_fill(~neighbour, fill), dim=1)  # (n, M)
    kl = torch.where(neighbour, log_p.exp() * (log_p - log_q), torch.zeros_like(log_q)).sum(dim=1)  # (n,)
    kl = torch.where(has, kl, torch.zeros_like(kl))
    loss = weight * candidates.world_size * kl.sum() / max(num_anchors, 1)
    mean = kl.detach().sum() / has.sum().clamp(min=1)
    return {"neighbourhood_loss": loss, "neighbourhood_kl": mean}
