"""Bitext retrieval from embeddings: the container, k-NN search, margin scoring, xSIM.

Everything here takes embeddings (``torch.Tensor`` or ``numpy.ndarray``) plus
labels; nothing depends on Lightning or on how the embeddings were made, so
``align eval``, ``align mine`` and the training module's validation hook are
thin wrappers around these functions.

Conventions
    * Similarity is cosine: every embedding is L2-normalised once, in
      :class:`MultiWayEmbeddings` (or by :func:`l2_normalize`), and scores are
      inner products.
    * Retrieval ``src -> tgt`` (Tatoeba style, Artetxe & Schwenk 2019b): take the
      rows that have both languages; each ``src`` sentence queries *all* ``tgt``
      sentences of those rows; its gold answer is its own row's ``tgt`` sentence.
    * Ranks are 1-based and *pessimistic* on ties: the gold target ranks after
      every candidate scoring the same. A collapsed encoder (all embeddings
      equal) therefore scores at the bottom, not at 100 %.
    * Margin scoring (Artetxe & Schwenk 2019a, "Margin-based parallel corpus
      mining with multilingual sentence embeddings", ACL)::

          margin(x, y) = cos(x, y)  (op)  [ sum_{z in NN_k(x)} cos(x, z) / 2k
                                          + sum_{z in NN_k(y)} cos(y, z) / 2k ]

      where ``NN_k(x)`` are the ``k`` nearest targets of a source ``x`` and
      ``NN_k(y)`` the ``k`` nearest sources of a target ``y``; ``op`` is ``/``
      for the *ratio* margin, ``-`` for the *distance* margin, and the
      *absolute* margin is plain cosine. It penalises hubs: a target close to
      everything has a large neighbourhood mean and loses its advantage.
    * xSIM (LASER's ``source/xsim.py``): the error rate of margin-based
      retrieval, where each source picks the best-margin target among its ``k``
      cosine nearest neighbours.

Invalid embeddings (NaN, inf, or zero norm) are never turned into accuracy:
:class:`MultiWayEmbeddings` raises :class:`InvalidEmbeddingsError` naming how
many per language and which rows, or, with ``on_invalid="drop"``, drops them
and records the counts in :attr:`MultiWayEmbeddings.invalid` so reports show
them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from alignment.languages import DEFAULT_PIVOT, normalize_language

ArrayLike = Tensor | np.ndarray

MARGINS = ("ratio", "distance", "absolute")
"""Margin functions: ratio and distance margins (Artetxe & Schwenk 2019a) and plain cosine."""
PAIR_MODES = ("all", "pivot")
"""Which language pairs to evaluate: every ordered pair, or each language to and from the pivot."""
KNN_BACKENDS = ("auto", "exact", "faiss")
"""k-NN search: exact chunked torch matmul, FAISS ``IndexFlatIP`` (also exact), or auto."""
METRIC_BACKENDS = ("rank", "torchmetrics")
"""How retrieval metrics are computed: from the gold rank (chunked) or torchmetrics' retrieval metrics."""
FAISS_MIN_PAIRS = 50_000_000
"""``backend="auto"`` uses FAISS (when installed) once queries x keys reaches this many scores."""
ZERO_NORM_EPS = 1e-12
"""An embedding whose L2 norm is at or below this is a zero vector (cosine undefined)."""
_EXAMPLES = 3  # row ids quoted per language in error messages


class InvalidEmbeddingsError(ValueError):
    """Embeddings contain NaN/inf values or zero vectors, for which cosine is undefined."""


# --------------------------------------------------------------------------- tensors


def as_float_matrix(x: ArrayLike, name: str = "embeddings") -> Tensor:
    """``x`` as a detached float32 ``(N, D)`` tensor on its own device (numpy shares memory).

    Raises:
        TypeError: ``x`` is neither a tensor nor an array.
        ValueError: ``x`` is not 2-D or has no columns.
    """
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, Tensor):
        t = x.detach()
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has zero columns (shape {tuple(t.shape)})")
    return t.to(torch.float32)


def invalid_vectors(x: Tensor, eps: float = ZERO_NORM_EPS) -> tuple[Tensor, Tensor]:
    """Indices of non-finite rows and of zero-norm rows of ``x`` (N, D).

    A row with any NaN/inf counts as non-finite only (not also as zero-norm).
    """
    finite = torch.isfinite(x).all(dim=1)  # (N,)
    zero = finite & (x.norm(dim=1) <= eps)  # (N,)
    return torch.nonzero(~finite).flatten(), torch.nonzero(zero).flatten()


def check_vectors(x: Tensor, name: str) -> None:
    """Raise :class:`InvalidEmbeddingsError` naming how many rows of ``x`` are NaN/inf or zero, and which."""
    bad_nonfinite, bad_zero = invalid_vectors(x)
    problems = []
    for kind, idx in (("NaN/inf", bad_nonfinite), ("zero-norm", bad_zero)):
        if idx.numel():
            shown = ", ".join(str(int(i)) for i in idx[:_EXAMPLES])
            more = ", ..." if idx.numel() > _EXAMPLES else ""
            problems.append(f"{idx.numel()} {kind} (rows {shown}{more})")
    if problems:
        raise InvalidEmbeddingsError(
            f"{name}: {' and '.join(problems)} of {x.shape[0]} vectors; cosine is undefined for them"
        )


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (N, D) scaled to unit L2 norm; callers check for zero rows first."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(ZERO_NORM_EPS)


# --------------------------------------------------------------------------- container


class MultiWayEmbeddings:
    """Embeddings of a multi-way parallel set: one vector per (row, language) sentence.

    Args:
        embeddings: ``(N, D)`` tensor or array, one per sentence; stored
            L2-normalised as float32 on the input's device.
        row_ids: ``(N,)`` the row each sentence belongs to: a tensor/array of
            ints (e.g. ``Batch.row_ids``) or a sequence of row keys (str/int).
            Sentences sharing a row id translate one another.
        languages: ``(N,)`` language code of each sentence (canonicalised with
            :func:`alignment.data.corpus.normalize_language`).
        pivot: the pivot language (``en`` by default); needed by the probes
            and Procrustes, not by retrieval.
        on_invalid: ``"raise"`` (default) raises :class:`InvalidEmbeddingsError`
            naming how many NaN/inf and zero-norm vectors each language has and
            example rows; ``"drop"`` removes those sentences and records the
            counts in :attr:`invalid` (``{lang: {"non_finite": n, "zero_norm": m}}``)
            so a report shows them.

    Attributes:
        embeddings: ``(N, D)`` float32, unit norm.
        row_index: ``(N,)`` long, index into :attr:`row_keys`.
        lang_index: ``(N,)`` long, index into :attr:`language_codes`.
        row_keys: row ids as strings, in order of first appearance.
        language_codes: sorted codes of the languages present.
        languages: canonical language code of each sentence, ``(N,)``.
        pivot: canonical pivot code.
        grid: ``(R, L)`` long, sentence index of (row, language) or ``-1``.

    Raises:
        ValueError: length mismatch, a duplicated (row, language) sentence, or
            an invalid language code (named).

    Example::

        emb = MultiWayEmbeddings(vectors, row_ids=["r0", "r0", "r1", "r1"], languages=["en", "de", "en", "de"])
        x, y = emb.pair("de", "en")   # (2, D) each, row-aligned
    """

    def __init__(
        self,
        embeddings: ArrayLike,
        row_ids: Sequence | ArrayLike,
        languages: Sequence[str],
        pivot: str = DEFAULT_PIVOT,
        *,
        on_invalid: str = "raise",
    ) -> None:
        if on_invalid not in ("raise", "drop"):
            raise ValueError(f"on_invalid must be 'raise' or 'drop', got {on_invalid!r}")
        emb = as_float_matrix(embeddings)
        keys = _row_key_list(row_ids, emb.shape[0])
        langs = _language_list(languages, emb.shape[0])
        self.pivot = normalize_language(pivot)
        self.invalid: dict[str, dict[str, int]] = {}
        emb, keys, langs = self._screen(emb, keys, langs, on_invalid)
        if emb.shape[0] == 0:
            raise ValueError("no embeddings to evaluate (N = 0)")
        self.embeddings = l2_normalize(emb)  # (N, D)
        self.row_keys, self.row_index = _index(keys)
        self.language_codes, self.lang_index = _index(sorted(set(langs)), langs)
        self.languages = tuple(langs)
        self.grid = self._build_grid()  # (R, L)

    # ---- construction helpers

    @classmethod
    def from_ids(
        cls,
        embeddings: ArrayLike,
        row_ids: ArrayLike,
        lang_ids: ArrayLike,
        vocabulary: Sequence[str],
        pivot: str = DEFAULT_PIVOT,
        **kwargs,
    ) -> "MultiWayEmbeddings":
        """Build from integer language ids into ``vocabulary`` (the :class:`~alignment.data.stream.Batch` layout)."""
        ids = torch.as_tensor(lang_ids).flatten().tolist()
        bad = [i for i in ids if not 0 <= i < len(vocabulary)]
        if bad:
            raise ValueError(
                f"lang_ids contain {len(bad)} ids outside the vocabulary of {len(vocabulary)} languages (e.g. {bad[0]})"
            )
        return cls(embeddings, row_ids, [vocabulary[i] for i in ids], pivot, **kwargs)

    def _screen(self, emb: Tensor, keys: list[str], langs: list[str], on_invalid: str):
        bad_nonfinite, bad_zero = invalid_vectors(emb)
        if not (bad_nonfinite.numel() or bad_zero.numel()):
            return emb, keys, langs
        report: dict[str, dict[str, list[str]]] = {}
        for kind, idx in (("non_finite", bad_nonfinite), ("zero_norm", bad_zero)):
            for i in idx.tolist():
                report.setdefault(langs[i], {"non_finite": [], "zero_norm": []})[kind].append(keys[i])
        if on_invalid == "raise":
            raise InvalidEmbeddingsError(_invalid_message(report, emb.shape[0]))
        self.invalid = {lang: {k: len(v) for k, v in kinds.items()} for lang, kinds in sorted(report.items())}
        keep = torch.ones(emb.shape[0], dtype=torch.bool)
        keep[torch.cat([bad_nonfinite, bad_zero]).cpu()] = False
        kept = keep.nonzero().flatten().tolist()
        return emb[keep.to(emb.device)], [keys[i] for i in kept], [langs[i] for i in kept]

    def _build_grid(self) -> Tensor:
        num_langs = len(self.language_codes)
        flat = self.row_index * num_langs + self.lang_index  # (N,)
        uniq, counts = torch.unique(flat, return_counts=True)
        if (counts > 1).any():
            dup, times = int(uniq[counts > 1][0]), int(counts[counts > 1][0])
            row, lang = self.row_keys[dup // num_langs], self.language_codes[dup % num_langs]
            raise ValueError(
                f"row {row!r} has {times} sentences in language {lang!r}; "
                f"expected at most one per (row, language) ({int((counts > 1).sum())} duplicated pairs in all)"
            )
        grid = torch.full((len(self.row_keys) * num_langs,), -1, dtype=torch.long)
        grid[flat] = torch.arange(flat.numel())
        return grid.view(len(self.row_keys), num_langs)  # (R, L)

    # ---- sizes

    @property
    def num_sentences(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def num_rows(self) -> int:
        return len(self.row_keys)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __repr__(self) -> str:
        return (
            f"MultiWayEmbeddings(sentences={self.num_sentences}, rows={self.num_rows}, dim={self.dim}, "
            f"languages={list(self.language_codes)}, pivot={self.pivot!r})"
        )

    # ---- lookups

    def require_language(self, lang: str) -> str:
        """The canonical code of ``lang``; raises ValueError naming it if it has no sentences here."""
        code = normalize_language(lang)
        if code not in self.language_codes:
            raise ValueError(
                f"language {code!r} has no sentences in these embeddings (present: {', '.join(self.language_codes)})"
            )
        return code

    def language_position(self, lang: str) -> int:
        return self.language_codes.index(self.require_language(lang))

    def sentences(self, lang: str) -> Tensor:
        """Sentence indices of ``lang``, in row order: ``(N_lang,)`` long."""
        col = self.grid[:, self.language_position(lang)]
        return col[col >= 0]

    def aligned(self, src: str, tgt: str) -> tuple[Tensor, Tensor]:
        """Sentence indices ``(n,), (n,)`` of the rows having both ``src`` and ``tgt``, row-aligned."""
        s, t = self.grid[:, self.language_position(src)], self.grid[:, self.language_position(tgt)]
        both = (s >= 0) & (t >= 0)  # (R,)
        return s[both], t[both]

    def pair(self, src: str, tgt: str) -> tuple[Tensor, Tensor]:
        """Row-aligned embeddings ``(n, D), (n, D)``: row ``i`` of each translates the other."""
        s, t = self.aligned(src, tgt)
        return self.embeddings[s.to(self.embeddings.device)], self.embeddings[t.to(self.embeddings.device)]

    def rows_with(self, lang: str) -> Tensor:
        """Boolean ``(R,)`` mask of rows that have a sentence in ``lang``."""
        return self.grid[:, self.language_position(lang)] >= 0

    # ---- derived sets

    def select_rows(self, row_mask: Tensor) -> "MultiWayEmbeddings":
        """The sentences of the rows where ``row_mask`` ``(R,)`` is true (e.g. a held-out split)."""
        if row_mask.shape != (self.num_rows,) or row_mask.dtype != torch.bool:
            raise ValueError(
                f"row_mask must be a bool tensor of shape ({self.num_rows},), "
                f"got {row_mask.dtype} {tuple(row_mask.shape)}"
            )
        keep = row_mask[self.row_index]  # (N,)
        if not keep.any():
            raise ValueError("row selection is empty: no rows selected")
        return self._subset(keep, self.embeddings)

    def with_embeddings(self, embeddings: Tensor) -> "MultiWayEmbeddings":
        """The same rows and languages with new ``(N, D')`` vectors (e.g. after a Procrustes map)."""
        if embeddings.shape[0] != self.num_sentences:
            raise ValueError(f"expected {self.num_sentences} embeddings, got {embeddings.shape[0]}")
        return self._subset(torch.ones(self.num_sentences, dtype=torch.bool), embeddings)

    def _subset(self, keep: Tensor, embeddings: Tensor) -> "MultiWayEmbeddings":
        idx = keep.nonzero().flatten().tolist()
        out = MultiWayEmbeddings(
            embeddings[keep.to(embeddings.device)],
            [self.row_keys[r] for r in self.row_index[keep].tolist()],
            [self.languages[i] for i in idx],
            self.pivot,
        )
        out.invalid = dict(self.invalid)
        return out


def _row_key_list(row_ids: Sequence | ArrayLike, n: int) -> list[str]:
    if isinstance(row_ids, (Tensor, np.ndarray)):
        values = row_ids.flatten().tolist() if isinstance(row_ids, Tensor) else row_ids.reshape(-1).tolist()
    else:
        values = list(row_ids)
    if len(values) != n:
        raise ValueError(f"row_ids has {len(values)} entries but there are {n} embeddings")
    return [str(v) for v in values]


def _language_list(languages: Sequence[str], n: int) -> list[str]:
    if isinstance(languages, str):
        raise TypeError("languages must be a sequence of codes, one per sentence, not a single string")
    langs = list(languages)
    if len(langs) != n:
        raise ValueError(f"languages has {len(langs)} entries but there are {n} embeddings")
    return [normalize_language(lang) for lang in langs]


def _index(vocabulary: Sequence[str], values: Sequence[str] | None = None) -> tuple[tuple[str, ...], Tensor]:
    """(vocabulary in first-appearance order, index of each value); ``values`` defaults to ``vocabulary``."""
    if values is None:
        vocab = tuple(dict.fromkeys(vocabulary))
        values = vocabulary
    else:
        vocab = tuple(vocabulary)
    position = {v: i for i, v in enumerate(vocab)}
    return vocab, torch.tensor([position[v] for v in values], dtype=torch.long)


def _quote(keys: Sequence[str]) -> str:
    """The first few keys, quoted, with an ellipsis when there are more."""
    shown = ", ".join(repr(k) for k in keys[:_EXAMPLES])
    return shown + (", ..." if len(keys) > _EXAMPLES else "")


def _invalid_message(report: dict[str, dict[str, list[str]]], total: int) -> str:
    parts = []
    for kind, label in (("non_finite", "NaN/inf"), ("zero_norm", "zero-norm")):
        per_lang = [(lang, kinds[kind]) for lang, kinds in sorted(report.items()) if kinds[kind]]
        if not per_lang:
            continue
        count = sum(len(rows) for _, rows in per_lang)
        detail = "; ".join(f"{lang}: {len(rows)} (rows {_quote(rows)})" for lang, rows in per_lang)
        parts.append(f"{count} {label} embeddings [{detail}]")
    return (
        f"{' and '.join(parts)} out of {total}; cosine is undefined for them, so they are not scored. "
        "The encoder diverged or pooled an empty input: fix it, or pass on_invalid='drop' to evaluate without them "
        "(the counts then appear in the report)."
    )


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
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T  # (c, M)
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
    for start in range(0, queries.shape[0], chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T  # (c, M)
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


# --------------------------------------------------------------------------- config, pairs, tables


@dataclass
class RetrievalConfig:
    """Bitext retrieval and xSIM settings (``--retrieval.*``)."""

    ks: tuple[int, ...] = (1, 5, 10)
    """Cut-offs for recall@k (accuracy is recall@1 and is always reported)."""
    margin: str = "ratio"
    """Margin function for xSIM: ratio, distance or absolute (Artetxe & Schwenk 2019)."""
    margin_k: int = 4
    """Neighbourhood size k of the margin (LASER uses 4)."""
    pairs: str = "all"
    """Language pairs: 'all' ordered pairs of distinct languages, or 'pivot' (each language to and from the pivot)."""
    chunk_size: int = 4096
    """Queries scored per matmul; memory is chunk_size x candidates floats."""
    backend: str = "auto"
    """k-NN backend for margin search: auto, exact, faiss."""
    metrics_backend: str = "rank"
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


def row_mask_from_keys(emb: MultiWayEmbeddings, keys: Iterable[str] | Mapping) -> Tensor:
    """Boolean ``(R,)`` mask of the rows whose key is in ``keys``; unknown keys raise, naming up to three."""
    wanted = {str(k) for k in keys}
    known = set(emb.row_keys)
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(
            f"{len(unknown)} row ids are not in the embeddings (e.g. {', '.join(map(repr, unknown[:_EXAMPLES]))})"
        )
    return torch.tensor([k in wanted for k in emb.row_keys], dtype=torch.bool)
