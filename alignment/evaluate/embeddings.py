"""Embeddings of a multi-way parallel set: the container, validity checks, dropping invalid rows.

Everything in :mod:`alignment.evaluate` takes embeddings (``torch.Tensor`` or
``numpy.ndarray``) plus labels; nothing depends on Lightning or on how the
embeddings were made. Similarity is cosine: every embedding is L2-normalised
once, in :class:`MultiWayEmbeddings` (or by :func:`l2_normalize`), and scores
are inner products.

Invalid embeddings (NaN, inf, or zero norm) are never turned into accuracy:
:class:`MultiWayEmbeddings` raises :class:`InvalidEmbeddingsError` naming how
many per language and which rows, or, with ``on_invalid="drop"``, drops them
and records the counts in :attr:`MultiWayEmbeddings.invalid` so reports show
them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from alignment.languages import DEFAULT_PIVOT, normalize_language

ArrayLike = Tensor | np.ndarray

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
            :func:`alignment.languages.normalize_language`).
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
