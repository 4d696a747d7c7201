"""Metrics from embeddings: retrieval accuracy, MRR, recall@k, xSIM, hubness and the cosine gap.

Conventions
    * Retrieval ``src -> tgt`` (Tatoeba style, Artetxe & Schwenk 2019b): take the
      rows that have both languages; each ``src`` sentence queries *all* ``tgt``
      sentences of those rows; its gold answer is its own row's ``tgt`` sentence.
    * Ranks are 1-based and *pessimistic* on ties: the gold target ranks after
      every candidate scoring the same. A collapsed encoder (all embeddings
      equal) therefore scores at the bottom, not at 100 %.
    * xSIM (LASER's ``source/xsim.py``): the error rate of margin-based
      retrieval (:mod:`alignment.evaluate.search`), where each source picks the
      best-margin target among its ``k`` cosine nearest neighbours.
    * Hubness (Radovanović et al. 2010): skewness of the k-occurrence
      distribution ``N_k`` (how often each target is among the k nearest
      neighbours of a query); a few hubs near everything give a large positive skew.
    * Cosine gap: mean cosine of translation pairs minus mean cosine of
      non-translation pairs across languages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from alignment.evaluate.embeddings import ArrayLike, MultiWayEmbeddings, as_float_matrix, l2_normalize
from alignment.evaluate.search import chunked_scores, knn, margin_search


def xsim_error_rate(
    x: Tensor, y: Tensor, *, k: int = 4, margin: str = "ratio", chunk_size: int = 4096, backend: str = "auto"
) -> float:
    """LASER's xSIM: share of sources ``x[i]`` whose best margin-scored target is not ``y[i]``.

    ``x`` and ``y`` are row-aligned ``(n, D)`` unit-norm translations; the gold
    target of source ``i`` is target ``i``. With ``margin="absolute"`` this is
    1 - cosine nearest-neighbour accuracy (up to ties).
    """
    _check_aligned(x, y)
    best, _ = margin_search(x, y, k=k, margin=margin, chunk_size=chunk_size, backend=backend).best_forward()
    gold = torch.arange(x.shape[0], device=best.device)
    return float((best != gold).float().mean())


# --------------------------------------------------------------------------- retrieval metrics


def gold_ranks(queries: Tensor, keys: Tensor, gold: Tensor | None = None, *, chunk_size: int = 4096) -> Tensor:
    """1-based rank of each query's gold key by inner product, pessimistic on ties.

    Args:
        queries: ``(Q, D)``; keys: ``(M, D)``.
        gold: ``(Q,)`` long gold key index per query; default ``arange(Q)``
            (row-aligned translations).

    Returns:
        ``(Q,)`` long: ``1 + #{other keys scoring >= the gold key}``.
    Memory ``chunk_size x M`` floats.
    """
    if gold is None:
        _check_aligned(queries, keys)
        gold = torch.arange(queries.shape[0], device=queries.device)
    ranks = []
    for start, scores in chunked_scores(queries, keys, chunk_size):  # (c, M)
        gold_score = scores.gather(1, gold[start : start + chunk_size, None])  # (c, 1)
        ranks.append((scores >= gold_score).sum(dim=1))  # counts the gold itself: 1-based
    return torch.cat(ranks)  # (Q,)


def rank_metrics(ranks: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Accuracy (= recall@1), recall@k and MRR from 1-based gold ranks ``(Q,)``.

    With one relevant target per query, recall@k is the share of queries whose
    gold rank is <= k, and MRR the mean of 1 / rank.
    """
    ranks = ranks.double()
    out = {"accuracy": float((ranks == 1).double().mean()), "mrr": float((1.0 / ranks).mean())}
    for k in ks:
        out[f"recall@{k}"] = float((ranks <= k).double().mean())
    return out


def torchmetrics_rank_metrics(
    scores: Tensor, gold: Tensor | None = None, ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """The same metrics as :func:`rank_metrics`, computed by torchmetrics' retrieval metrics.

    ``scores`` is the full ``(Q, M)`` similarity matrix; torchmetrics flattens
    it with per-query ``indexes`` and loops over queries in Python, so this is
    for small sets (a Tatoeba pair, 1000 x 1000) and for cross-checking the
    chunked rank path. Ties are ordered by torchmetrics' sort, not pessimistically.

    Hazard: torchmetrics (1.9) counts a target with a score <= 0 as not
    retrieved at all (it reads scores as probabilities), which would zero the
    reciprocal rank of any gold translation with a negative cosine. Scores are
    therefore shifted to be positive first, in float64 so no ties appear.
    """
    from torchmetrics.retrieval import RetrievalMRR, RetrievalRecall

    q, m = scores.shape
    if gold is None:
        gold = torch.arange(q)
    target = torch.zeros(q, m, dtype=torch.bool)
    target[torch.arange(q), gold.cpu()] = True
    preds = scores.detach().cpu().double()
    preds = preds - preds.min() + 1.0  # order-preserving, all > 0
    flat = dict(preds=preds.flatten(), target=target.flatten(), indexes=torch.arange(q).repeat_interleave(m))
    out = {"accuracy": float(RetrievalRecall(top_k=1)(**flat)), "mrr": float(RetrievalMRR()(**flat))}
    for k in ks:
        out[f"recall@{k}"] = float(RetrievalRecall(top_k=k)(**flat))
    return out


def _check_aligned(x: Tensor, y: Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"row-aligned sets must have the same length, got {x.shape[0]} sources and {y.shape[0]} targets"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sources and targets differ in dimension: {x.shape[1]} vs {y.shape[1]}")


# --------------------------------------------------------------------------- hubness


@dataclass(frozen=True)
class HubnessResult:
    """Hubness of a key set under k-NN retrieval from a query set.

    ``skewness`` of the k-occurrence counts ``N_k`` (0 when every key occurs
    equally often), ``hub_share`` the share of keys occurring more than twice
    the mean ``k * Q / M`` (``N_k > 2k`` when there are as many queries as
    keys), ``max_occurrence`` the largest ``N_k``.
    """

    k: int
    skewness: float
    hub_share: float
    max_occurrence: int
    num_queries: int
    num_keys: int


def k_occurrence(
    queries: Tensor, keys: Tensor, k: int = 10, *, chunk_size: int = 4096, backend: str = "auto"
) -> Tensor:
    """``N_k``: for each key, how many queries have it among their ``k`` nearest keys.

    Returns ``(M,)`` long counts summing to ``Q * k``.
    """
    _, idx = knn(queries, keys, k, chunk_size=chunk_size, backend=backend)  # (Q, k)
    return torch.bincount(idx.flatten().cpu(), minlength=keys.shape[0])  # (M,)


def skewness(values: Tensor) -> float:
    """Population skewness ``E[(v - mu)^3] / sigma^3``; 0 for a constant distribution."""
    v = values.double()
    centred = v - v.mean()
    sigma = centred.pow(2).mean().sqrt()
    if sigma <= 1e-12:
        return 0.0
    return float(centred.pow(3).mean() / sigma**3)


def hubness(
    queries: ArrayLike, keys: ArrayLike, k: int = 10, *, chunk_size: int = 4096, backend: str = "auto"
) -> HubnessResult:
    """Hubness of ``keys`` ``(M, D)`` under cosine k-NN from ``queries`` ``(Q, D)``."""
    q, m = l2_normalize(as_float_matrix(queries, "queries")), l2_normalize(as_float_matrix(keys, "keys"))
    kk = min(k, m.shape[0])
    counts = k_occurrence(q, m, kk, chunk_size=chunk_size, backend=backend)  # (M,)
    mean_occurrence = kk * q.shape[0] / m.shape[0]
    return HubnessResult(
        k=kk,
        skewness=skewness(counts),
        hub_share=float((counts > 2 * mean_occurrence).double().mean()),
        max_occurrence=int(counts.max()),
        num_queries=int(q.shape[0]),
        num_keys=int(m.shape[0]),
    )


def hubness_by_language(emb: MultiWayEmbeddings, k: int = 10, *, chunk_size: int = 4096) -> dict[str, HubnessResult]:
    """Per language: hubness of its sentences as keys, queried by every other language's sentences.

    Cost ``O(N^2 D)`` over all languages together (chunked).
    """
    out = {}
    for pos, lang in enumerate(emb.language_codes):
        is_lang = emb.lang_index == pos  # (N,)
        if is_lang.all():
            continue
        dev = emb.embeddings.device
        out[lang] = hubness(
            emb.embeddings[(~is_lang).to(dev)], emb.embeddings[is_lang.to(dev)], k, chunk_size=chunk_size
        )
    return out


# --------------------------------------------------------------------------- cosine gap


@dataclass(frozen=True)
class CosGapResult:
    """Mean cosine of translation pairs vs non-translation pairs across languages.

    Both means are pooled over all unordered language pairs (every sentence
    pair counts once). ``gap = translation - non_translation``; larger is better aligned.
    """

    translation: float
    non_translation: float
    num_language_pairs: int
    num_translation_pairs: int

    @property
    def gap(self) -> float:
        return self.translation - self.non_translation


def cosine_gap(emb: MultiWayEmbeddings) -> CosGapResult:
    """Pooled translation and non-translation cosines over every unordered language pair.

    For a pair with row-aligned ``X, Y`` ``(n, D)`` (unit norm), the sum of all
    ``n^2`` cosines is ``X.sum(0) @ Y.sum(0)``, so the non-translation sum is that
    minus the trace: ``O(n D)`` per pair, no ``n x n`` matrix.

    Raises:
        ValueError: no language pair shares at least 2 rows.
    """
    trans_sum = non_sum = 0.0
    trans_n = non_n = pairs = 0
    langs = emb.language_codes
    for i, a in enumerate(langs):
        for b in langs[i + 1 :]:
            x, y = emb.pair(a, b)  # (n, D), (n, D)
            n = x.shape[0]
            if n < 2:
                continue
            diag = float((x.double() * y.double()).sum())
            total = float(x.double().sum(0) @ y.double().sum(0))
            trans_sum, non_sum = trans_sum + diag, non_sum + total - diag
            trans_n, non_n, pairs = trans_n + n, non_n + n * (n - 1), pairs + 1
    if not pairs:
        raise ValueError(f"cosine gap needs a language pair sharing at least 2 rows; languages: {', '.join(langs)}")
    return CosGapResult(trans_sum / trans_n, non_sum / non_n, pairs, trans_n)
