"""Exact k-NN and margin-scored search over unit-norm embeddings: one implementation for retrieval and mining.

Retrieval (:mod:`alignment.evaluate.metrics`, xSIM and gold ranks), hubness,
and bitext mining (:mod:`alignment.evaluate.mining`) all score queries against
keys through :func:`chunked_scores` (exact torch matmuls, at most
``chunk_size`` queries at a time) or FAISS ``IndexFlatIP`` (also exact) when it
is installed and the search is large (:func:`resolve_backend`).

Margin scoring (Artetxe & Schwenk 2019a, "Margin-based parallel corpus mining
with multilingual sentence embeddings", ACL)::

    margin(x, y) = cos(x, y)  (op)  [ sum_{z in NN_k(x)} cos(x, z) / 2k
                                    + sum_{z in NN_k(y)} cos(y, z) / 2k ]

where ``NN_k(x)`` are the ``k`` nearest targets of a source ``x`` and
``NN_k(y)`` the ``k`` nearest sources of a target ``y``; ``op`` is ``/`` for
the *ratio* margin, ``-`` for the *distance* margin, and the *absolute* margin
is plain cosine. It penalises hubs: a target close to everything has a large
neighbourhood mean and loses its advantage.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

Margin = Literal["ratio", "distance", "absolute"]
MARGINS: tuple[str, ...] = get_args(Margin)
"""Margin functions: ratio and distance margins (Artetxe & Schwenk 2019a) and plain cosine."""
KnnBackend = Literal["auto", "exact", "faiss"]
KNN_BACKENDS: tuple[str, ...] = get_args(KnnBackend)
"""k-NN search: exact chunked torch matmul, FAISS ``IndexFlatIP`` (also exact), or auto."""
FAISS_MIN_PAIRS = 50_000_000
"""``backend="auto"`` uses FAISS (when installed) once queries x keys reaches this many scores."""


def chunked_scores(queries: Tensor, keys: Tensor, chunk_size: int = 4096) -> Iterator[tuple[int, Tensor]]:
    """``(start, queries[start : start + chunk_size] @ keys.T)`` for consecutive chunks of queries.

    The one exact scoring loop: peak memory is ``chunk_size x M`` floats
    (4096 x 10k = 160 MB), never ``Q x M``.
    """
    for start in range(0, queries.shape[0], chunk_size):
        yield start, queries[start : start + chunk_size] @ keys.T  # (c, M)


# --------------------------------------------------------------------------- k-NN search


def _faiss():
    """The ``faiss`` module, or None: FAISS is an optional accelerator, never required."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def resolve_backend(backend: str, num_scores: int) -> str:
    """``"exact"`` or ``"faiss"`` for a search of ``num_scores`` = queries x keys inner products.

    ``auto`` picks FAISS only when it is installed and the search is large
    (>= :data:`FAISS_MIN_PAIRS`); both are exact inner-product searches.
    """
    if backend not in KNN_BACKENDS:
        raise ValueError(f"k-NN backend must be one of {KNN_BACKENDS}, got {backend!r}")
    if backend == "faiss":
        if _faiss() is None:
            raise ImportError("k-NN backend 'faiss' requested but faiss is not installed (pip install faiss-cpu)")
        return "faiss"
    if backend == "auto" and num_scores >= FAISS_MIN_PAIRS and _faiss() is not None:
        return "faiss"
    return "exact"


def knn(
    queries: Tensor, keys: Tensor, k: int, *, chunk_size: int = 4096, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest inner products of each query against ``keys``.

    Args:
        queries: ``(Q, D)``; keys: ``(M, D)``; unit-norm rows make scores cosines.
        k: neighbours per query, clipped to ``M``.
        chunk_size: queries scored per matmul; peak memory is
            ``chunk_size x M`` floats (4096 x 10k = 160 MB), never ``Q x M``.
        backend: see :func:`resolve_backend`.

    Returns:
        ``(Q, k)`` scores, descending, and ``(Q, k)`` long key indices. The
        exact path is deterministic for a given input (``torch.topk`` on CPU).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, keys.shape[0])
    if resolve_backend(backend, queries.shape[0] * keys.shape[0]) == "faiss":
        return _knn_faiss(queries, keys, k)
    sims, idx = [], []
    for _, scores in chunked_scores(queries, keys, chunk_size):  # (c, M)
        top = scores.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)  # (Q, k), (Q, k)


def _knn_faiss(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    faiss = _faiss()
    device = queries.device
    # host copies: FAISS CPU indexes take float32 numpy arrays
    q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
    kv = np.ascontiguousarray(keys.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(kv.shape[1])
    index.add(kv)
    sims, idx = index.search(q, k)
    return torch.from_numpy(sims).to(device), torch.from_numpy(idx).long().to(device)


# --------------------------------------------------------------------------- margin


def apply_margin(cos: Tensor, neighbourhood: Tensor, kind: str) -> Tensor:
    """Margin score from cosines and the matching ``(mean_k(x) + mean_k(y)) / 2`` (broadcast)."""
    if kind == "ratio":
        # hazard: the ratio flips sign when the neighbourhood mean is negative (LASER ignores this too)
        return cos / neighbourhood
    if kind == "distance":
        return cos - neighbourhood
    if kind == "absolute":
        return cos
    raise ValueError(f"margin must be one of {MARGINS}, got {kind!r}")


@dataclass
class MarginSearch:
    """Margin-scored candidates in both directions (LASER's ``score_candidates``).

    Attributes:
        fwd_scores: ``(Nx, k)`` margin of each source with its ``k`` cosine nearest targets.
        fwd_index: ``(Nx, k)`` those targets' indices.
        bwd_scores: ``(Ny, k)`` margin of each target with its ``k`` cosine nearest sources.
        bwd_index: ``(Ny, k)`` those sources' indices.
        fwd_mean: ``(Nx,)`` mean cosine of each source's ``k`` nearest targets.
        bwd_mean: ``(Ny,)`` mean cosine of each target's ``k`` nearest sources.
    """

    fwd_scores: Tensor
    fwd_index: Tensor
    bwd_scores: Tensor
    bwd_index: Tensor
    fwd_mean: Tensor
    bwd_mean: Tensor

    def best_forward(self) -> tuple[Tensor, Tensor]:
        """Each source's best-margin target: indices ``(Nx,)`` and scores ``(Nx,)``."""
        return _best(self.fwd_scores, self.fwd_index)

    def best_backward(self) -> tuple[Tensor, Tensor]:
        """Each target's best-margin source: indices ``(Ny,)`` and scores ``(Ny,)``."""
        return _best(self.bwd_scores, self.bwd_index)


def _best(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    # argmax returns the first maximum: ties go to the closer cosine neighbour
    pos = scores.argmax(dim=1, keepdim=True)  # (N, 1)
    return index.gather(1, pos).squeeze(1), scores.gather(1, pos).squeeze(1)


def margin_search(
    x: Tensor, y: Tensor, *, k: int = 4, margin: str = "ratio", chunk_size: int = 4096, backend: str = "auto"
) -> MarginSearch:
    """Margin-score each source's and each target's ``k`` cosine nearest neighbours.

    Args:
        x: ``(Nx, D)`` unit-norm sources; y: ``(Ny, D)`` unit-norm targets.
        k: neighbourhood size for both the means and the candidates (LASER: 4).
        margin: one of :data:`MARGINS`.

    Cost: two chunked k-NN searches, ``O(Nx * Ny * D)`` flops and
    ``O(chunk_size * max(Nx, Ny))`` memory.
    """
    if margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    cos_xy, idx_xy = knn(x, y, k, chunk_size=chunk_size, backend=backend)  # (Nx, k)
    cos_yx, idx_yx = knn(y, x, k, chunk_size=chunk_size, backend=backend)  # (Ny, k)
    fwd_mean, bwd_mean = cos_xy.mean(dim=1), cos_yx.mean(dim=1)  # (Nx,), (Ny,)
    fwd = apply_margin(cos_xy, (fwd_mean[:, None] + bwd_mean[idx_xy]) / 2, margin)  # (Nx, k)
    bwd = apply_margin(cos_yx, (bwd_mean[:, None] + fwd_mean[idx_yx]) / 2, margin)  # (Ny, k)
    return MarginSearch(fwd, idx_xy, bwd, idx_yx, fwd_mean, bwd_mean)


def margin_matrix(x: Tensor, y: Tensor, *, k: int = 4, margin: str = "ratio") -> Tensor:
    """The full ``(Nx, Ny)`` margin matrix: for small sets, plots and reference checks (O(Nx * Ny) memory)."""
    cos = x @ y.T  # (Nx, Ny)
    kk_x, kk_y = min(k, y.shape[0]), min(k, x.shape[0])
    fwd_mean = cos.topk(kk_x, dim=1).values.mean(dim=1)  # (Nx,)
    bwd_mean = cos.topk(kk_y, dim=0).values.mean(dim=0)  # (Ny,)
    return apply_margin(cos, (fwd_mean[:, None] + bwd_mean[None, :]) / 2, margin)


def score_aligned(x: Tensor, y: Tensor, *, k: int, margin: str, chunk_size: int, backend: str) -> Tensor:
    """Margin score of each aligned pair ``(x[i], y[i])``: ``(n,)``.

    ``x`` and ``y`` are ``(n, D)`` unit-norm; the neighbourhood means are over
    all of ``y`` (for ``x[i]``) and all of ``x`` (for ``y[i]``), exactly as in
    mining, so paired scores and mined scores share one scale.
    """
    search = margin_search(x, y, k=k, margin=margin, chunk_size=chunk_size, backend=backend)
    cos = (x * y).sum(dim=1)  # (n,)
    return apply_margin(cos, (search.fwd_mean + search.bwd_mean) / 2, margin)  # (n,)
