"""Multi-way parallel corpora: the row type, language codes, readers and cleaning.

A *multi-way row* is one sentence and its translations: an id plus texts keyed
by canonical BCP-47 language code. One language is the pivot (``en`` by
default); every reader yields :class:`MultiWayRow` objects and never holds a
whole corpus in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import langcodes

DEFAULT_PIVOT = "en"


class LanguageCodeError(ValueError):
    """A language code that is not a valid BCP-47 tag."""


@lru_cache(maxsize=4096)
def normalize_language(code: str) -> str:
    """Return the canonical BCP-47 form of a language code.

    Uses ``langcodes`` (the CLDR data) rather than a hand table:
    ``pt_BR`` -> ``pt-BR``, ``iw`` -> ``he``, ``sr_Latn`` / ``sr@latin`` -> ``sr-Latn``.
    Chinese is canonicalised by *script*, since that is what an encoder sees:
    ``zh``, ``zh_CN``, ``zh_SG``, ``zh_Hans`` -> ``zh-Hans`` and ``zh_TW``,
    ``zh_HK``, ``zh_Hant`` -> ``zh-Hant``.

    Raises:
        LanguageCodeError: the code is empty or not a valid tag.
    """
    raw = code.strip()
    if not raw:
        raise LanguageCodeError("empty language code")
    # gettext-style modifiers: sr@latin, be@tarask
    tag = raw.replace("@latin", "-Latn").replace("@cyrillic", "-Cyrl").replace("_", "-")
    try:
        std = langcodes.standardize_tag(tag, macro=True)
        lang = langcodes.Language.get(std)
    except (ValueError, langcodes.tag_parser.LanguageTagError) as exc:
        raise LanguageCodeError(f"invalid language code {code!r}: {exc}") from exc
    if not lang.is_valid() or lang.language is None:
        raise LanguageCodeError(f"unknown language code {code!r}")
    if lang.language == "zh":
        script = lang.script or lang.maximize().script
        return f"zh-{script}"
    return std


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

    @property
    def languages(self) -> list[str]:
        return sorted(self.texts)

    @property
    def pivot_text(self) -> str | None:
        return self.texts.get(self.pivot)

    def to_json(self) -> dict:
        """The payload stored in a shard sample."""
        return {"id": self.id, "pivot": self.pivot, "texts": dict(self.texts)}

    @classmethod
    def from_json(cls, obj: dict, source: str = "") -> "MultiWayRow":
        return cls(id=str(obj["id"]), texts=dict(obj["texts"]), pivot=obj.get("pivot", DEFAULT_PIVOT), source=source)
