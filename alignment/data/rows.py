"""Multi-way rows: :class:`MultiWayRow` (one sentence, its translations and their provenance) and its keys.

A *multi-way row* is one sentence and its translations: an id plus texts keyed
by canonical BCP-47 language code. One language is the pivot (``en`` by
default). Each text may record where it came from (``provenance``): an
original text, or a synthetic one with the model that produced it (written by
``align translate``, stored in shards). The keys here (pivot text for joins and
duplicates, case-folded for splits) and the seeded hashes are what every
bounded-memory step of the pipeline partitions on.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field

from alignment.languages import DEFAULT_PIVOT


class CorpusError(ValueError):
    """Bad corpus input: the message names the file (and line) and what is wrong."""


@dataclass
class MultiWayRow:
    """One sentence and its translations.

    Attributes:
        id: stable identifier of the row (unique within a corpus).
        texts: text per canonical language code; two or more languages.
        pivot: the pivot language code (``en`` by default). A row may lack the
            pivot (e.g. read from per-language files) but pivot-keyed
            operations (joins, splits, dedup) then fall back to the row id.
    """

    id: str
    texts: dict[str, str]
    pivot: str = DEFAULT_PIVOT
    source: str = field(default="", compare=False)
    """Where the row came from (``file:line``), for error messages."""
    text_sources: dict[str, str] | None = field(default=None, compare=False, repr=False)
    """Per-language ``file:line`` when texts come from different files (aligned
    files, joined pairs, gettext catalogs); not stored in shards."""
    provenance: dict[str, dict] | None = field(default=None, compare=False, repr=False)
    """Per language, where its text came from: ``{"origin": "original"}`` or ``{"origin": "synthetic",
    "model": .., "from": ..}`` (written by ``align translate``); stored in shards when present."""

    def source_of(self, language: str) -> str:
        """Where the text in ``language`` came from (falls back to :attr:`source`)."""
        return (self.text_sources or {}).get(language, self.source)

    @property
    def languages(self) -> list[str]:
        return sorted(self.texts)

    @property
    def pivot_text(self) -> str | None:
        return self.texts.get(self.pivot)

    def to_json(self) -> dict:
        """The payload stored in a shard sample."""
        out = {"id": self.id, "pivot": self.pivot, "texts": dict(self.texts)}
        if self.provenance:
            out["provenance"] = {lang: p for lang, p in self.provenance.items() if lang in self.texts}
        return out

    @classmethod
    def from_json(cls, obj: dict, source: str = "") -> "MultiWayRow":
        provenance = obj.get("provenance")
        return cls(id=str(obj["id"]), texts=dict(obj["texts"]), pivot=obj.get("pivot", DEFAULT_PIVOT), source=source,
                   provenance=provenance if isinstance(provenance, dict) else None)


# ---------------------------------------------------------------------------
# Keys and stable hashes
# ---------------------------------------------------------------------------


def pivot_key(text: str) -> str:
    """The pivot text as used for joins and duplicate detection.

    NFC-normalised, whitespace runs collapsed to one space, stripped; case and
    punctuation are kept (``May`` the month and ``may`` the verb stay apart).
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def split_key(text: str) -> str:
    """The pivot text as used to assign train / validation / test splits.

    :func:`pivot_key` case-folded, so that case variants of one English sentence
    can never land in two splits. Every pair of rows with equal ``pivot_key``
    has equal ``split_key``.
    """
    return pivot_key(text).casefold()


def row_dedup_key(row: MultiWayRow) -> str:
    """:func:`pivot_key` of the row's pivot text, or its id when the pivot is missing."""
    text = row.pivot_text
    return pivot_key(text) if text is not None else "\x00id:" + row.id


def row_split_key(row: MultiWayRow) -> str:
    """:func:`split_key` of the row's pivot text, or its id when the pivot is missing."""
    text = row.pivot_text
    return split_key(text) if text is not None else "\x00id:" + row.id


def stable_hash64(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is identical across runs and machines.

    Python's ``hash()`` is salted per process, so everything that must be
    reproducible from a seed (buckets, splits, shuffles, ids) goes through here.
    """
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(str(part).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "big")


def short_hash(*parts: object) -> str:
    """16 hex characters of :func:`stable_hash64`, for ids and sample keys."""
    return f"{stable_hash64(*parts):016x}"
