"""Text identity: one 64-bit hash per sentence, equal for identical or near-identical texts.

Real multi-way corpora repeat short strings in many rows (the gettext corpus has
"Save", "Cancel", "Delete" in Django and in Wagtail, each its own row). Scored
as negatives of one another, such rows are *false negatives*: the loss pushes
apart sentences that mean the same. The data path gives every sentence a text
identity (:attr:`alignment.batch.Batch.text_ids`) so the loss can mask them
(:mod:`alignment.negatives`), and ``align mine-negatives`` excludes them from
mined hard negatives.

"Near-identical", exactly: two texts are the same identity when their
:func:`normalise` forms are equal:

1. Unicode NFKC (full-width and compatibility forms fold: "Ｓａｖｅ" = "Save");
2. casefold ("SAVE" = "save", "Straße" = "strasse");
3. every character of a Unicode punctuation category (P*: ``. , ! ? : ; " ' _ - & ( ) …``)
   removed ("Save..." = "save", "_Save" = "Save", "Don't" = "dont", "100%" = "100");
4. every run of whitespace collapsed to one space, leading and trailing removed.

Symbols (S*: ``$ + = < > ^``), digits and letters are kept, so "$5" and "5"
differ. A text that is empty after step 3 (only punctuation, e.g. "...") keeps
its whitespace-collapsed original instead, so "..." and "!" stay distinct.
The identity ignores the language: an untranslated "OK" in German is the same
text as the English "OK" (the encoder cannot tell them apart either).

The hash is the first 8 bytes of BLAKE2b over the UTF-8 normal form, read as a
signed little-endian int64: stable across processes, Python versions and
machines (unlike ``hash()``), so ranks and resumed runs agree. Collisions of
distinct texts have probability about ``k^2 / 2^65`` for ``k`` distinct texts.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import unicodedata
from collections.abc import Iterable

IDENTITY_VERSION = 1
"""Version of :func:`text_id`'s definition. Stored text identities (``align shards tokenize`` sidecars) carry it
and are used only when it matches: change it whenever :func:`normalise` or the hash changes."""


@functools.cache
def _punctuation() -> dict[int, None]:
    """``str.translate`` table deleting every Unicode punctuation character (general category P*): built once
    per process (about 0.2 s over all code points), then C-speed where a per-character Python test cost 1.5 ms
    for a 64-sentence batch."""
    return {c: None for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}


def prepare_identity() -> None:
    """Build the per-process table :func:`normalise` needs now (a data stream calls it before its workers fork,
    so that they inherit the table instead of each building it)."""
    _punctuation()


def normalise(text: str) -> str:
    """The form two texts share when they are the same identity (see the module docstring)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    stripped = folded.translate(_punctuation())
    out = " ".join(stripped.split())  # str.split and re's \s agree on Unicode whitespace; twice as fast
    return out if out else " ".join(folded.split())


def text_id(text: str) -> int:
    """The signed 64-bit identity of ``text`` (BLAKE2b-64 of :func:`normalise`)."""
    digest = hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def text_ids(texts: Iterable[str]) -> list[int]:
    """:func:`text_id` of every text, in order."""
    return [text_id(text) for text in texts]
