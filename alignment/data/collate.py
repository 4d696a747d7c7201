"""Language selection, tokenising and collation: selected rows -> :class:`~alignment.batch.Batch`."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignment.batch import Batch
from alignment.data.identity import text_ids


@dataclass
class SelectedRow:
    """A row after language selection: sentences and their language ids, in vocabulary order, and the
    sentences' pre-tokenised ids when the shard has them."""

    key: str
    lang_ids: list[int]
    texts: list[str]
    ids: list[list[int]] | None = None
    negatives: list[dict] | None = None
    """Its mined hard negatives (``alignment.data.hard_negatives``), when read with them."""
    teacher: Tensor | None = None
    """Its stored teacher embedding ``(D,)`` of its pivot text (``alignment.data.teacher``), when read with them."""
    text_ids: list[int] | None = None
    """Its sentences' text identities, when the token sidecar stores them (else computed in :func:`collate`)."""


def select_languages(
    available: Sequence[str], *, policy: str, k: int, pivot: str, rng: random.Random
) -> list[str] | None:
    """The languages of one row that go into the batch, sorted; ``None`` if the row cannot serve the policy.

    Args:
        available: the row's usable languages (sorted canonical codes, at least two).
        policy: ``all`` keeps every language (multi-way training: every language is an
            anchor, the row's other languages its positives); ``k`` samples ``k`` of them
            uniformly without replacement (all of them if the row has fewer); ``pivot_pair``
            keeps the pivot and one uniformly sampled other language (the En-X bilingual
            baseline), and needs the pivot.
    """
    if policy == "all":
        return list(available)
    if policy == "k":
        return sorted(rng.sample(list(available), k)) if len(available) > k else list(available)
    if policy == "pivot_pair":
        if pivot not in available:
            return None
        other = rng.choice([lang for lang in available if lang != pivot])
        return sorted([pivot, other])
    raise ValueError(f"unknown language policy {policy!r}")


# --------------------------------------------------------------------------- tokenisation and collation


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int, prefix: str = "") -> list[list[int]]:
    """Token ids of every text, unpadded, in one batched fast-tokenizer call.

    One call per batch is what makes the Rust tokenizer fast; padding is done by
    :func:`pad_sequences`, which is cheaper than asking the tokenizer for padded
    tensors (fewer Python ints cross the boundary).
    """
    if not texts:
        return []
    inputs = [prefix + text for text in texts] if prefix else list(texts)
    encoded = tokenizer(
        inputs,
        add_special_tokens=True,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return encoded["input_ids"]


def row_sequences(tokenizer: Any, rows: Sequence[SelectedRow], *, max_length: int, prefix: str = ""
                  ) -> list[list[int]]:
    """Every sentence's token ids, row-major: pre-tokenised ones as read, the others in one :func:`tokenize` call."""
    missing = [text for row in rows if row.ids is None for text in row.texts]
    fresh = iter(tokenize(tokenizer, missing, max_length=max_length, prefix=prefix))
    out: list[list[int]] = []
    for row in rows:
        out.extend(row.ids if row.ids is not None else itertools.islice(fresh, len(row.texts)))
    return out


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, both ``(N, T)`` long, T = longest."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))  # (N,)
    width = int(lengths.max()) if len(lengths) else 0
    flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    mask = np.arange(width)[None, :] < lengths[:, None]  # (N, T) bool
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)  # (N, T)
    ids[mask] = flat  # row-major fill: each row's tokens land left-aligned
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def collate(
    rows: Sequence[SelectedRow],
    sequences: Sequence[Sequence[int]],
    *,
    languages: tuple[str, ...],
    pivot_lang_id: int,
    pad_id: int,
    skip_counts: dict[str, int] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> Batch:
    """Build a :class:`Batch` from selected rows and their sentences' token ids (row-major, as in the rows).

    ``sequences`` has one entry per sentence of ``rows`` in order; sentence ``i``
    gets the batch-local index of its row, its language id and its text identity
    (``alignment.data.identity``: read from a token sidecar that stores it, else computed, about 3 us per
    sentence in the loader's workers).
    """
    per_row = np.fromiter((len(row.texts) for row in rows), dtype=np.int64, count=len(rows))  # (R,)
    if int(per_row.sum()) != len(sequences):
        raise ValueError(f"{len(sequences)} token sequences for {int(per_row.sum())} sentences")
    input_ids, attention_mask = pad_sequences(sequences, pad_id)  # (N, T), (N, T)
    row_ids = torch.from_numpy(np.repeat(np.arange(len(rows), dtype=np.int64), per_row))  # (N,)
    lang_ids = torch.tensor([lang for row in rows for lang in row.lang_ids], dtype=torch.long)  # (N,)
    stored = [row.teacher for row in rows]
    teacher = torch.stack(stored) if stored and all(t is not None for t in stored) else None  # (R, D)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        row_ids=row_ids,
        lang_ids=lang_ids,
        languages=languages,
        pivot_lang_id=pivot_lang_id,
        row_keys=tuple(row.key for row in rows),
        skip_counts=dict(skip_counts or {}),
        origin=origin,
        text_ids=torch.tensor(_identities(rows), dtype=torch.long),  # (N,)
        texts=tuple(text for row in rows for text in row.texts),
        teacher=teacher,
    )


def _identities(rows: Sequence[SelectedRow]) -> list[int]:
    """Every sentence's text identity, row-major: stored ones as read, the others computed."""
    return [i for row in rows for i in (row.text_ids if row.text_ids is not None else text_ids(row.texts))]


def collate_rows(
    rows: Sequence[SelectedRow],
    tokenizer: Any,
    *,
    languages: tuple[str, ...],
    pivot_lang_id: int,
    max_length: int,
    prefix: str = "",
) -> Batch:
    """Tokenise (one call) and collate selected rows: the whole worker-side batch step."""
    texts = [text for row in rows for text in row.texts]
    sequences = tokenize(tokenizer, texts, max_length=max_length, prefix=prefix)
    return collate(rows, sequences, languages=languages, pivot_lang_id=pivot_lang_id, pad_id=tokenizer.pad_token_id)
