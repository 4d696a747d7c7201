"""Mining translation pairs between two sets of embeddings with margin scoring.

LASER's bitext mining (Artetxe & Schwenk 2019a; ``source/mine_bitexts.py``):
every source is scored against its ``k`` cosine nearest targets with the margin
of :mod:`alignment.evaluate.search`, and every target against its ``k``
nearest sources. The candidate pairs are then combined by a *mode*:

``forward``
    each source with its best-margin target (targets may repeat);
``backward``
    each target with its best-margin source (sources may repeat);
``intersection``
    pairs that are each other's best in both directions (one-to-one, high precision);
``max-score``
    the union of forward and backward candidates, taken greedily by descending
    score while neither side is used yet (one-to-one, higher recall). LASER's default.

Pairs scoring at or above ``threshold`` are returned, sorted by score
(descending), then source index, then target index: the output is
deterministic. The search is exact: chunked torch matmuls (a 10k x 10k search
never holds more than ``chunk_size x 10k`` scores), or FAISS ``IndexFlatIP``
when it is installed and the search is large (see
:func:`~alignment.evaluate.search.resolve_backend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from alignment.evaluate.embeddings import ArrayLike, as_float_matrix, check_vectors, l2_normalize
from alignment.evaluate.search import KNN_BACKENDS, MARGINS, KnnBackend, Margin, MarginSearch, margin_search

MiningMode = Literal["forward", "backward", "intersection", "max-score"]
MINING_MODES: tuple[str, ...] = get_args(MiningMode)
MARGIN_UPPER = {"distance": 2.0, "absolute": 1.0}  # largest reachable score; ratio is unbounded


@dataclass
class MiningConfig:
    """Margin-based mining settings (``--mining.*``)."""

    mode: MiningMode = "max-score"
    """How forward and backward candidates combine: forward, backward, intersection, max-score (LASER)."""
    k: int = 4
    """Neighbourhood size of the margin and number of candidates per sentence."""
    margin: Margin = "ratio"
    """Margin function: ratio, distance or absolute (plain cosine)."""
    threshold: float = 1.06
    """Keep pairs scoring at or above this; ~1.04-1.06 is usual for the ratio margin (WikiMatrix, CCMatrix)."""
    chunk_size: int = 4096
    """Queries scored per matmul; peak memory is chunk_size x set size floats."""
    backend: KnnBackend = "auto"
    """k-NN search: auto (FAISS if installed and the search is large), exact, faiss."""

    def __post_init__(self) -> None:
        if self.mode not in MINING_MODES:
            raise ValueError(f"--mining.mode must be one of {', '.join(MINING_MODES)}, got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"--mining.k must be >= 1, got {self.k}")
        if self.margin not in MARGINS:
            raise ValueError(f"--mining.margin must be one of {', '.join(MARGINS)}, got {self.margin!r}")
        upper = MARGIN_UPPER.get(self.margin)
        if upper is not None and self.threshold > upper:
            raise ValueError(
                f"--mining.threshold {self.threshold} can never be reached with --mining.margin {self.margin} "
                f"(scores are at most {upper}); pick a threshold for that margin"
            )
        if self.chunk_size < 1:
            raise ValueError(f"--mining.chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in KNN_BACKENDS:
            raise ValueError(f"--mining.backend must be one of {', '.join(KNN_BACKENDS)}, got {self.backend!r}")


@dataclass
class MinedPairs:
    """Mined pairs, sorted by descending score then source then target index.

    Attributes:
        src: ``(P,)`` long source indices.
        tgt: ``(P,)`` long target indices.
        scores: ``(P,)`` float margin scores.
    """

    src: Tensor
    tgt: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return int(self.src.numel())

    def as_list(self) -> list[tuple[int, int, float]]:
        return list(zip(self.src.tolist(), self.tgt.tolist(), self.scores.tolist()))


def _forward(search: MarginSearch) -> tuple[Tensor, Tensor, Tensor]:
    tgt, score = search.best_forward()  # (Nx,), (Nx,)
    return torch.arange(tgt.numel(), device=tgt.device), tgt, score


def _backward(search: MarginSearch) -> tuple[Tensor, Tensor, Tensor]:
    src, score = search.best_backward()  # (Ny,), (Ny,)
    return src, torch.arange(src.numel(), device=src.device), score


def _intersection(search: MarginSearch) -> tuple[Tensor, Tensor, Tensor]:
    src, tgt, score = _forward(search)
    bwd_src, _ = search.best_backward()  # (Ny,)
    mutual = bwd_src[tgt] == src  # (Nx,)
    return src[mutual], tgt[mutual], score[mutual]


def _max_score(search: MarginSearch) -> tuple[Tensor, Tensor, Tensor]:
    fs, ft, fscore = _forward(search)
    bs, bt, bscore = _backward(search)
    src, tgt, score = (torch.cat(p).cpu().numpy() for p in ((fs, bs), (ft, bt), (fscore, bscore)))
    order = _ranking(src, tgt, score)
    used_src, used_tgt, keep = set(), set(), []
    # greedy one-to-one assignment: a Python loop over Nx + Ny candidates (~1 s per million)
    for i in order:
        s, t = int(src[i]), int(tgt[i])
        if s in used_src or t in used_tgt:
            continue
        used_src.add(s)
        used_tgt.add(t)
        keep.append(i)
    keep = np.asarray(keep, dtype=np.int64)
    return torch.from_numpy(src[keep]), torch.from_numpy(tgt[keep]), torch.from_numpy(score[keep])


_MODES = {"forward": _forward, "backward": _backward, "intersection": _intersection, "max-score": _max_score}


def _ranking(src: np.ndarray, tgt: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Order by descending score, ties by source then target index: deterministic."""
    return np.lexsort((tgt, src, -score.astype(np.float64)))


def mine(source: ArrayLike, target: ArrayLike, config: MiningConfig | None = None) -> MinedPairs:
    """Mine translation pairs between ``source`` ``(Nx, D)`` and ``target`` ``(Ny, D)`` embeddings.

    Embeddings are L2-normalised here; they need not be row-aligned or of the
    same size. See the module docstring for the modes.

    Raises:
        InvalidEmbeddingsError: NaN/inf or zero vectors (count and indices named).
        ValueError: the two sets differ in dimension.
    """
    config = config or MiningConfig()
    x, y = as_float_matrix(source, "source embeddings"), as_float_matrix(target, "target embeddings")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"source and target embeddings differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    check_vectors(x, "source embeddings")
    check_vectors(y, "target embeddings")
    search = margin_search(
        l2_normalize(x),
        l2_normalize(y),
        k=config.k,
        margin=config.margin,
        chunk_size=config.chunk_size,
        backend=config.backend,
    )
    src, tgt, score = (t.cpu() for t in _MODES[config.mode](search))
    keep = score >= config.threshold
    src, tgt, score = src[keep].numpy(), tgt[keep].numpy(), score[keep].numpy()
    order = _ranking(src, tgt, score)
    return MinedPairs(
        torch.from_numpy(src[order]).long(), torch.from_numpy(tgt[order]).long(), torch.from_numpy(score[order])
    )
