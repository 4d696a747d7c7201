"""Multi-way parallel corpora: the row type, language codes, readers and cleaning.

A *multi-way row* is one sentence and its translations: an id plus texts keyed
by canonical BCP-47 language code. One language is the pivot (``en`` by
default); every reader yields :class:`MultiWayRow` objects and never holds a
whole corpus in memory (the gettext reader holds the catalogs' table, which is
catalog-sized; the pair join holds one hash bucket at a time).

Readers (all take a :class:`CleaningReport` that counts what they drop):

==========================  ====================================================
:func:`read_jsonl`          ``{"id": .., "en": .., "de": ..}`` or ``{"id": .., "texts": {..}}``
:func:`read_tsv`            header row of language codes, optional ``id`` column
:func:`read_aligned`        one file per language, aligned lines (``corpus.en``, ``corpus.de``)
:func:`read_pairs`          pivot-X bitexts (TSV or file pairs) joined on the pivot text
:func:`read_gettext`        ``.po`` / ``.mo`` catalogs keyed on the English msgid
==========================  ====================================================

Every reader decodes bytes itself, line by line: a line (or field) that is not
valid UTF-8 is one counted ``invalid_utf8`` drop naming ``file:line``, never a
crash of the whole read. Rows carry ``file:line`` in :attr:`MultiWayRow.source`.
Inputs ending in ``.gz``, ``.bz2`` or ``.xz`` are decompressed on the fly.

Cleaning (:func:`clean_rows` = :func:`check_rows` + :func:`drop_duplicates`)
drops empty texts, control characters, over-long texts, "translations"
identical to the pivot, duplicate rows by pivot text and rows under the minimum
language count; each drop is counted by reason in a :class:`CleaningReport`,
and ``strict`` turns the first bad item into a :class:`CorpusError` naming
``file:line``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import tempfile
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import langcodes

DEFAULT_PIVOT = "en"
FORMATS = ("jsonl", "tsv", "aligned", "pairs", "gettext")
"""Input formats understood by :func:`read_corpus` (``align shards build --format``)."""


class LanguageCodeError(ValueError):
    """A language code that is not a valid BCP-47 tag."""


class CorpusError(ValueError):
    """Bad corpus input: the message names the file (and line) and what is wrong."""


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


# ---------------------------------------------------------------------------
# Drop reasons, cleaning config and report
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DropReason:
    """Why a text, a row or a whole file was dropped."""

    name: str
    description: str
    fatal_in_strict: bool = True
    """Whether ``--strict`` stops at it. Format-level filters (gettext fuzzy
    entries, language selection) are normal and never stop a build."""


DROP_REASONS: dict[str, DropReason] = {
    r.name: r
    for r in (
        DropReason("invalid_utf8", "bytes that are not valid UTF-8 (or lone surrogates)"),
        DropReason("malformed", "a line or catalog the reader cannot parse"),
        DropReason("unknown_language", "a key that is not a language code (JSONL)"),
        DropReason("empty", "empty or whitespace-only text"),
        DropReason("control_chars", "control characters (other than tab and newline)"),
        DropReason("too_long", "more characters than --max-chars"),
        DropReason("same_as_pivot", "a 'translation' identical to the pivot text"),
        DropReason("duplicate_pivot", "a row whose pivot text was already seen"),
        DropReason("too_few_languages", "fewer valid languages than --min-languages"),
        DropReason(
            "too_few_selected_languages",
            "under --min-languages only because of --languages",
            fatal_in_strict=False,
        ),
        DropReason("language_not_selected", "language not in --languages", fatal_in_strict=False),
        DropReason(
            "alternative_translation",
            "a second, different translation of one pivot text into one language (the first is kept)",
            fatal_in_strict=False,
        ),
        DropReason("gettext_fuzzy", "gettext entry flagged fuzzy", fatal_in_strict=False),
        DropReason("gettext_plural", "gettext plural entry", fatal_in_strict=False),
        DropReason("gettext_obsolete", "gettext obsolete (#~) entry", fatal_in_strict=False),
        DropReason("gettext_untranslated", "gettext entry with an empty translation", fatal_in_strict=False),
    )
}

DROP_LEVELS = ("row", "text", "file")


def parse_languages(value: str | Sequence[str] | None, flag: str,
                     normalize: Callable[[str], str] = normalize_language) -> tuple[str, ...] | None:
    """``"de,fr,zh"`` (or a list) -> canonical codes, in order, without repeats; errors name ``flag``.

    ``normalize`` maps one code (default :func:`normalize_language`; ``align translate`` also
    accepts model-family spellings such as ``deu_Latn``).
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        if not str(item).strip():
            continue
        try:
            code = normalize(str(item).strip())
        except LanguageCodeError as exc:
            raise ValueError(f"{flag}: {exc}") from exc
        if code not in out:
            out.append(code)
    if not out:
        raise ValueError(f"{flag} must name at least one language, got {value!r}")
    return tuple(out)


@dataclass
class CleaningConfig:
    """What :func:`clean_rows` keeps; filled from ``align shards build`` flags."""

    pivot: str = DEFAULT_PIVOT
    """Pivot language (``--pivot``): joins, duplicates and splits are keyed on its text."""
    languages: tuple[str, ...] | None = None
    """Languages to keep (``--languages en,de,fr``), all others dropped; unset keeps all."""
    min_languages: int = 2
    """Rows with fewer valid languages than this are dropped (``--min-languages``)."""
    max_chars: int = 1000
    """Texts longer than this many characters are dropped (``--max-chars``)."""
    deduplicate: bool = True
    """Drop rows whose pivot text was already seen (``--keep-duplicates`` turns it off)."""
    strict: bool = False
    """Stop at the first bad item with an error naming file and line (``--strict``)."""

    def __post_init__(self) -> None:
        try:
            self.pivot = normalize_language(self.pivot)
        except LanguageCodeError as exc:
            raise ValueError(f"--pivot: {exc}") from exc
        self.languages = parse_languages(self.languages, "--languages")
        if self.min_languages < 2:
            raise ValueError(f"--min-languages must be >= 2 (a multi-way row), got {self.min_languages}")
        if self.max_chars < 1:
            raise ValueError(f"--max-chars must be >= 1, got {self.max_chars}")
        if self.languages is not None:
            if self.pivot not in self.languages:
                raise ValueError(
                    f"--languages must include the pivot --pivot {self.pivot}, got {','.join(self.languages)}"
                )
            if len(self.languages) < self.min_languages:
                raise ValueError(
                    f"--languages names {len(self.languages)} languages, "
                    f"fewer than --min-languages {self.min_languages}"
                )


class CleaningReport:
    """Counts every dropped item by reason; in strict mode raises at the first bad one.

    Readers call :meth:`drop` for what they cannot read (invalid UTF-8, broken
    lines, gettext fuzzy entries); :func:`check_rows` and
    :func:`drop_duplicates` for what they reject; the last stage calls
    :meth:`keep` for each row it passes on. ``rows in`` is derived as kept +
    dropped rows, so each input row is counted exactly once.

    Args:
        config: the cleaning config (its ``strict`` decides whether drops raise).
        max_examples: ``file:line`` examples remembered per reason.
    """

    def __init__(self, config: CleaningConfig | None = None, *, max_examples: int = 5) -> None:
        self.config = config if config is not None else CleaningConfig()
        self.max_examples = max_examples
        self.dropped: dict[str, Counter] = {level: Counter() for level in DROP_LEVELS}
        self.dropped_by_language: dict[str, Counter] = defaultdict(Counter)
        self.kept_by_language: Counter = Counter()
        self.rows_kept = 0
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.skipped_locales: Counter = Counter()
        self.counts: Counter = Counter()

    @classmethod
    def strict_for(cls, pivot: str = DEFAULT_PIVOT) -> "CleaningReport":
        """A report that raises at the first bad item: what readers use when given none."""
        return cls(CleaningConfig(pivot=pivot, strict=True))

    def drop(
        self, reason: str, source: str, *, language: str | None = None, level: str = "text", detail: str = ""
    ) -> None:
        """Count one dropped item.

        Args:
            reason: a key of :data:`DROP_REASONS`.
            source: ``file:line`` of the item.
            language: the text's language, for text drops.
            level: ``"text"``, ``"row"`` or ``"file"``.
            detail: what exactly was wrong, for the strict error and examples.

        Raises:
            CorpusError: in strict mode, for reasons that are ``fatal_in_strict``.
        """
        spec = DROP_REASONS[reason]
        where = f"{source} ({language})" if language else source
        if self.config.strict and spec.fatal_in_strict:
            what = f": {detail}" if detail else ""
            raise CorpusError(
                f"{where}: {reason} - {spec.description}{what}. "
                "Fix the input, or run without --strict to drop and count such items."
            )
        self.dropped[level][reason] += 1
        if language is not None and level == "text":
            self.dropped_by_language[language][reason] += 1
        examples = self.examples[reason]
        if len(examples) < self.max_examples:
            examples.append(f"{where}: {detail}" if detail else where)

    def keep(self, row: MultiWayRow) -> None:
        """Count a row (and its texts) that made it through every stage."""
        self.rows_kept += 1
        self.kept_by_language.update(row.texts.keys())

    def skip_locale(self, locale: str) -> None:
        """Count a gettext catalog whose locale folder ``langcodes`` cannot parse."""
        self.skipped_locales[locale] += 1

    def count(self, name: str, n: int = 1) -> None:
        """A free-form counter (catalogs read, catalogs skipped ...), reported as is."""
        self.counts[name] += n

    @property
    def rows_in(self) -> int:
        return self.rows_kept + sum(self.dropped["row"].values())

    @property
    def texts_kept(self) -> int:
        return sum(self.kept_by_language.values())

    def to_dict(self) -> dict:
        """The JSON report (``cleaning_report.json`` and the manifest's ``cleaning``)."""
        reasons = sorted({r for counter in self.dropped.values() for r in counter})
        return {
            "config": asdict(self.config) | {"languages": list(self.config.languages or []) or None},
            "rows": {"in": self.rows_in, "kept": self.rows_kept, "dropped": dict(sorted(self.dropped["row"].items()))},
            "texts": {"kept": self.texts_kept, "dropped": dict(sorted(self.dropped["text"].items()))},
            "files": {"dropped": dict(sorted(self.dropped["file"].items()))},
            "languages": {
                lang: {
                    "kept": self.kept_by_language.get(lang, 0),
                    "dropped": dict(sorted(self.dropped_by_language[lang].items())),
                }
                for lang in sorted(set(self.kept_by_language) | set(self.dropped_by_language))
            },
            "skipped_locales": dict(sorted(self.skipped_locales.items())),
            "counts": dict(sorted(self.counts.items())),
            "examples": {r: list(self.examples[r]) for r in reasons},
            "reasons": {r: DROP_REASONS[r].description for r in reasons},
        }

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def format_table(self) -> str:
        """The report as a plain-text table, for the terminal."""
        return format_cleaning_report(self.to_dict())


def format_cleaning_report(report: dict) -> str:
    """Render a :meth:`CleaningReport.to_dict` report (also one read back from a manifest)."""
    rows, texts, files = report["rows"], report["texts"], report.get("files", {"dropped": {}})
    lines = [
        f"Cleaning: {rows['in']} rows in, {rows['kept']} kept, {rows['in'] - rows['kept']} dropped; "
        f"{texts['kept']} texts kept",
    ]
    reasons = sorted(set(rows["dropped"]) | set(texts["dropped"]) | set(files["dropped"]))
    if reasons:
        lines.append(f"  {'reason':<28} {'rows':>8} {'texts':>8} {'files':>6}  description")
        for r in reasons:
            desc = report.get("reasons", {}).get(r, "")
            lines.append(
                f"  {r:<28} {rows['dropped'].get(r, 0):>8} {texts['dropped'].get(r, 0):>8} "
                f"{files['dropped'].get(r, 0):>6}  {desc}"
            )
        for r in reasons:
            for example in report.get("examples", {}).get(r, [])[:2]:
                lines.append(f"    e.g. {r}: {example}")
    if report.get("skipped_locales"):
        skipped = ", ".join(f"{k} ({v})" for k, v in report["skipped_locales"].items())
        lines.append(f"  skipped locales (not a language code; catalogs): {skipped}")
    for name, n in report.get("counts", {}).items():
        lines.append(f"  {name}: {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Bytes -> lines: every reader decodes itself, one line at a time
# ---------------------------------------------------------------------------

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BOM = b"\xef\xbb\xbf"


def _open_binary(path: Path) -> BinaryIO:
    opener = _OPENERS.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")  # type: ignore[return-value]


def _plain_name(path: Path) -> str:
    """The file name without a compression suffix: ``corpus.de.gz`` -> ``corpus.de``."""
    return path.stem if path.suffix.lower() in _OPENERS else path.name


LINE_LIMIT = 16 << 20
"""Bytes of one input line held in memory; a longer line is read through in 1 MiB pieces and handed on as
:class:`Overlong` (its first ``LINE_LIMIT`` bytes), so readers stay in bounded memory on any input."""


class Overlong(bytes):
    """The first :data:`LINE_LIMIT` bytes of a longer line; ``size`` is the whole line's length in bytes."""

    size: int = 0


def _overlong(head: bytes, rest: BinaryIO) -> Overlong:
    size = len(head)
    while True:
        piece = rest.readline(1 << 20)
        size += len(piece)
        if not piece or piece.endswith(b"\n"):
            break
    line = Overlong(head[:LINE_LIMIT])
    line.size = size
    return line


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number from 1, raw bytes without the line ending)``.

    Bounded memory: a line over :data:`LINE_LIMIT` bytes is never held whole (see
    :class:`Overlong`); a UTF-8 byte order mark on the first line and ``\\r\\n``
    endings are removed.

    Raises:
        CorpusError: no such file, or it breaks off (a truncated or corrupt ``.gz``/``.bz2``/``.xz``, a read
            error), naming the file and the last line read.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    lineno = 0
    try:
        with _open_binary(path) as fh:
            while True:
                raw = fh.readline(LINE_LIMIT + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > LINE_LIMIT and not raw.endswith(b"\n"):
                    yield lineno, _overlong(raw, fh)
                    continue
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                yield lineno, raw
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise CorpusError(
            f"{path}: unreadable after line {lineno} ({type(exc).__name__}: {exc}); "
            "a truncated or corrupt compressed file? Re-download or re-compress it"
        ) from None


def overlong_detail(raw: bytes) -> str | None:
    """For a reader: why an :class:`Overlong` line is dropped (None for a normal line)."""
    if isinstance(raw, Overlong):
        return f"a line of {raw.size} bytes, over the {LINE_LIMIT} bytes read per line"
    return None


def _decode(
    raw: bytes, report: CleaningReport, source: str, *, language: str | None = None, level: str = "text"
) -> str | None:
    """UTF-8 decode one line or field; invalid bytes are a counted drop, not a crash."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.drop("invalid_utf8", source, language=language, level=level, detail=f"{exc.reason} at byte {exc.start}")
        return None


def _language_or_error(code: str, where: str, what: str) -> str:
    try:
        return normalize_language(code)
    except LanguageCodeError as exc:
        raise CorpusError(f"{where}: {what} {code!r} is not a language code ({exc})") from exc


# ---------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------


def read_jsonl(
    path: str | os.PathLike, *, pivot: str = DEFAULT_PIVOT, report: CleaningReport | None = None
) -> Iterator[MultiWayRow]:
    """Stream rows from a JSON Lines file.

    Each line is ``{"id": "r1", "en": "Hello", "de": "Hallo"}`` or
    ``{"id": "r1", "texts": {"en": "Hello", "de": "Hallo"}}``; ``id`` is
    optional (default ``<file stem>-<line>``) and may be a number. In the flat
    form every other key must be a language code (``id`` is the row id, so
    Indonesian goes under ``texts`` or as ``ind``). Hazard: a metadata key that
    happens to be an ISO 639-3 code (``url`` is Urali) would be read as a text;
    use the ``texts`` form for rows that carry metadata. Blank lines are skipped.

    Drops (counted in ``report``): a line that is not valid UTF-8 or not a JSON
    object (row, ``invalid_utf8`` / ``malformed``), a text that is not a string
    (``malformed``) or null (``empty``).

    Raises:
        CorpusError: a key is not a language code (names file:line), or a drop in
            strict mode (the default when ``report`` is None).
    """
    path = Path(path)
    report = report if report is not None else CleaningReport.strict_for(pivot)
    stem = _plain_name(path).split(".")[0]
    for lineno, raw in iter_lines(path):
        source = f"{path}:{lineno}"
        too_long = overlong_detail(raw)
        if too_long:
            report.drop("too_long", source, level="row", detail=too_long)
            continue
        line = _decode(raw, report, source, level="row")
        if line is None or not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            report.drop("malformed", source, level="row", detail=f"key {exc.args[0]!r} appears twice in one object")
            continue
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deep"
            report.drop("malformed", source, level="row", detail=f"not JSON ({detail})")
            continue
        if not isinstance(obj, dict):
            report.drop("malformed", source, level="row", detail=f"expected a JSON object, got {type(obj).__name__}")
            continue
        row = _jsonl_row(obj, source, f"{stem}-{lineno}", pivot, report)
        if row is not None:
            yield row


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads`` hook: an object repeating a key is an error (JSON keeps the last value silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _jsonl_row(obj: dict, source: str, default_id: str, pivot: str, report: CleaningReport) -> MultiWayRow | None:
    row_id = obj.get("id", default_id)
    if "texts" in obj:
        raw_texts = obj["texts"]
        if not isinstance(raw_texts, dict):
            report.drop("malformed", source, level="row", detail='"texts" must be an object of language -> text')
            return None
    else:
        raw_texts = {k: v for k, v in obj.items() if k not in ("id", "pivot", "provenance")}
    texts: dict[str, str] = {}
    for key, value in raw_texts.items():
        try:
            lang = normalize_language(key)
        except LanguageCodeError as exc:
            report.drop("unknown_language", source, detail=f"key {key!r} is not a language code ({exc})")
            continue
        if value is None:
            report.drop("empty", source, language=lang, detail="null text")
        elif not isinstance(value, str):
            report.drop("malformed", source, language=lang, detail=f"text must be a string, got {type(value).__name__}")
        elif lang in texts:
            report.drop("alternative_translation", source, language=lang, detail=f"key {key!r} repeats {lang}")
        else:
            texts[lang] = value
    return MultiWayRow(id=str(row_id), texts=texts, pivot=pivot, source=source, provenance=_provenance(obj, source))


def _provenance(obj: dict, source: str) -> dict[str, dict] | None:
    """The optional ``"provenance"`` of a JSONL row (``align translate``), keyed by canonical language."""
    raw = obj.get("provenance")
    if not isinstance(raw, dict):
        return None
    return {_language_or_error(k, source, "provenance key"): v for k, v in raw.items() if isinstance(v, dict)}


# ---------------------------------------------------------------------------
# TSV
# ---------------------------------------------------------------------------


def _tsv_header(path: Path, header: str) -> tuple[int | None, list[str]]:
    """``(index of the id column or None, language per column)`` from a header row."""
    id_col: int | None = None
    languages: list[str] = []
    for i, name in enumerate(header.split("\t")):
        if name.strip().lower() == "id":
            if id_col is not None:
                raise CorpusError(f"{path}:1: two 'id' columns in the header")
            id_col = i
            languages.append("")
            continue
        lang = _language_or_error(name, f"{path}:1", "header column")
        if lang in languages:
            raise CorpusError(f"{path}:1: header names {lang} twice ({name!r}); keep one column per language")
        languages.append(lang)
    if sum(1 for lang in languages if lang) < 2:
        raise CorpusError(f"{path}:1: the header must name at least two language columns, got {header!r}")
    return id_col, languages


def read_tsv(
    path: str | os.PathLike, *, pivot: str = DEFAULT_PIVOT, report: CleaningReport | None = None
) -> Iterator[MultiWayRow]:
    """Stream rows from a tab-separated file whose header row names the languages.

    Example header: ``id<TAB>en<TAB>de<TAB>zh_Hans`` (``id`` optional, default
    ``<file stem>-<line>``; codes are normalised). No quoting: a field is the
    bytes between tabs. Each field is decoded separately, so invalid UTF-8 in
    one field drops only that text.

    Raises:
        CorpusError: a header column is not a language code (names file:1), or a
            drop in strict mode (the default when ``report`` is None).
    """
    path = Path(path)
    report = report if report is not None else CleaningReport.strict_for(pivot)
    stem = _plain_name(path).split(".")[0]
    lines = iter_lines(path)
    first = next(lines, None)
    if first is None:
        raise CorpusError(f"{path}: empty file, expected a header row of language codes")
    header = first[1].decode("utf-8", errors="replace")
    id_col, languages = _tsv_header(path, header)
    for lineno, raw in lines:
        source = f"{path}:{lineno}"
        fields = raw.split(b"\t")  # safe on bytes: 0x09 never occurs inside a UTF-8 sequence
        if len(fields) != len(languages):
            report.drop(
                "malformed",
                source,
                level="row",
                detail=f"expected {len(languages)} tab-separated fields, got {len(fields)}",
            )
            continue
        row_id = f"{stem}-{lineno}"
        texts: dict[str, str] = {}
        for lang, value in zip(languages, fields):
            text = _decode(value, report, source, language=lang or None, level="text" if lang else "row")
            if text is None:
                if not lang:
                    break  # an undecodable id drops the row (counted above)
                continue
            if lang:
                texts[lang] = text
            elif text.strip():
                row_id = text.strip()
        else:
            yield MultiWayRow(id=row_id, texts=texts, pivot=pivot, source=source)


# ---------------------------------------------------------------------------
# Aligned per-language files (Moses / OPUS)
# ---------------------------------------------------------------------------


def parse_language_file(spec: str | os.PathLike) -> tuple[str, Path]:
    """``"de=path"`` or ``"corpus.de"`` (language from the suffix) -> ``("de", Path)``.

    Raises:
        CorpusError: the language cannot be told or is not a code (names the file).
    """
    text = str(spec)
    if "=" in text and not Path(text).exists():
        code, _, file = text.partition("=")
        return _language_or_error(code, file, "language"), Path(file)
    path = Path(text)
    name = _plain_name(path)
    if "." not in name:
        raise CorpusError(f"{path}: cannot tell the language: name the file like corpus.de or pass de={path}")
    suffix = name.rsplit(".", 1)[1]
    try:
        return normalize_language(suffix), path
    except LanguageCodeError as exc:
        raise CorpusError(
            f"{path}: file name suffix {suffix!r} is not a language code ({exc}); "
            f"name the file like corpus.de or pass LANG={path}"
        ) from exc


def _aligned_stem(paths: Sequence[Path]) -> str:
    names = [_plain_name(p) for p in paths]
    stems = {n.rsplit(".", 1)[0] if "." in n else n for n in names}
    return stems.pop() if len(stems) == 1 else names[0].split(".")[0]


def read_aligned(
    files: Sequence[str | os.PathLike], *, pivot: str = DEFAULT_PIVOT, report: CleaningReport | None = None
) -> Iterator[MultiWayRow]:
    """Stream rows from one plain-text file per language with aligned lines.

    ``files`` are ``corpus.en``, ``corpus.de`` ... (language from the suffix,
    compression suffixes ignored) or explicit ``en=path`` pairs. Line ``i`` of
    every file forms row ``<stem>-<i>``; ``source`` is ``<first file>:<i>``.
    Reads all files in lockstep: memory is one line per file.

    Raises:
        CorpusError: fewer than two files, a language given twice, an unknown
            language suffix, or files with different line counts (alignment is
            lost, so this is an error even without strict; names both files).
    """
    specs = [parse_language_file(f) for f in files]
    if len(specs) < 2:
        raise CorpusError(f"aligned input needs at least two language files, got {[str(f) for f in files]}")
    seen: dict[str, Path] = {}
    for lang, path in specs:
        if lang in seen:
            raise CorpusError(f"{path}: language {lang} is already read from {seen[lang]}")
        seen[lang] = path
    report = report if report is not None else CleaningReport.strict_for(pivot)
    specs.sort(key=lambda s: (s[0] != pivot, s[0]))  # pivot file first: it names the row's source
    stem = _aligned_stem([p for _, p in specs])
    readers = [iter_lines(p) for _, p in specs]
    lineno = 0
    while True:
        lines = [next(r, None) for r in readers]
        ended = [spec for spec, line in zip(specs, lines) if line is None]
        if len(ended) == len(specs):
            return
        if ended:
            longer = next(spec for spec, line in zip(specs, lines) if line is not None)
            raise CorpusError(
                f"{ended[0][1]} has {lineno} lines but {longer[1]} has more (line {lineno + 1}): "
                "aligned files must have the same number of lines"
            )
        lineno += 1
        source = f"{specs[0][1]}:{lineno}"
        texts: dict[str, str] = {}
        sources = {lang: f"{path}:{lineno}" for lang, path in specs}
        for (lang, _), (_, raw) in zip(specs, lines):  # type: ignore[misc]
            text = _decode(raw, report, sources[lang], language=lang)
            if text is not None:
                texts[lang] = text
        yield MultiWayRow(id=f"{stem}-{lineno}", texts=texts, pivot=pivot, source=source, text_sources=sources)


# ---------------------------------------------------------------------------
# Spill buckets: bounded-memory partitioning through files on disk
# ---------------------------------------------------------------------------


class SpillBuckets:
    """Append lines to ``n`` bucket files, buffered in memory up to ``buffer_bytes``.

    The partition step of every bounded-memory algorithm here (pivot join,
    external shuffle): rows go to ``bucket = f(key)``, then each bucket is read
    back and processed alone, so memory is one bucket plus the write buffer.
    Buffers are flushed by appending to the bucket's file and closing it, so
    only one file is open at a time whatever ``n`` is (no ``ulimit -n`` hazard).
    Lines keep their append order within a bucket.
    """

    def __init__(self, directory: str | os.PathLike, n: int, *, buffer_bytes: int = 32 << 20) -> None:
        if n < 1:
            raise ValueError(f"bucket count must be >= 1, got {n}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.buffer_bytes = buffer_bytes
        self._buffers: dict[int, list[bytes]] = defaultdict(list)
        self._buffered = 0
        self.lines_written = 0

    def path(self, bucket: int) -> Path:
        return self.directory / f"bucket-{bucket:05d}.jsonl"

    def append(self, bucket: int, line: bytes) -> None:
        self._buffers[bucket].append(line)
        self._buffered += len(line) + 1
        self.lines_written += 1
        if self._buffered >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for bucket in sorted(self._buffers):
            with open(self.path(bucket), "ab") as fh:
                fh.write(b"\n".join(self._buffers[bucket]) + b"\n")
        self._buffers.clear()
        self._buffered = 0

    def read(self, bucket: int) -> Iterator[bytes]:
        """The lines of one bucket, in append order (call :meth:`flush` first)."""
        path = self.path(bucket)
        if not path.exists():
            return
        with open(path, "rb") as fh:
            for line in fh:
                yield line.rstrip(b"\n")


def buckets_for(total_bytes: int, bucket_bytes: int = 64 << 20, *, max_buckets: int = 8192) -> int:
    """How many spill buckets keep one bucket near ``bucket_bytes`` of input."""
    return max(1, min(max_buckets, -(-int(total_bytes) // bucket_bytes)))


def bucket_of(hash64: int, n: int) -> int:
    """``floor(u * n)`` for ``u = hash64 / 2**64``: buckets are ordered ranges of the hash."""
    return (hash64 * n) >> 64


# ---------------------------------------------------------------------------
# Bilingual pairs joined on the pivot text
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bitext:
    """One pivot-X bilingual input for :func:`read_pairs`.

    Attributes:
        languages: the two languages, in column (or file) order.
        paths: one TSV file of two columns, or two aligned files.
        header: whether the TSV's first line is a header row to skip.
    """

    languages: tuple[str, str]
    paths: tuple[Path, ...]
    header: bool = False


def parse_bitext(spec: str | os.PathLike) -> Bitext:
    """Parse one ``--format pairs`` input.

    Forms:
        ``pairs.tsv``                 TSV whose header row names the two languages (``en<TAB>de``)
        ``en,de=pairs.tsv``           TSV without header (a first row ``en<TAB>de`` is skipped)
        ``corpus.en,corpus.de``       two aligned files, languages from the suffixes
        ``en=a.txt,de=b.txt``         two aligned files, explicit languages

    Raises:
        CorpusError: the languages cannot be told (names the file).
    """
    text = str(spec)
    if Path(text).is_file():
        path = Path(text)
        first = next(iter_lines(path), (1, b""))[1].decode("utf-8", errors="replace")
        names = first.split("\t")
        if len(names) != 2:
            raise CorpusError(
                f"{path}:1: expected a header row of two language codes like 'en<TAB>de', got {first[:80]!r}; "
                f"or name the columns: en,de={path}"
            )
        langs = tuple(_language_or_error(n, f"{path}:1", "header column") for n in names)
        return Bitext(languages=langs, paths=(path,), header=True)  # type: ignore[arg-type]
    left, sep, right = text.partition(",")
    if not sep:
        raise CorpusError(f"{text}: no such file (a pairs input is FILE.tsv, en,de=FILE.tsv or FILE.en,FILE.de)")
    if "=" in right and "=" not in left:  # en,de=pairs.tsv
        code2, _, file = right.partition("=")
        langs = (_language_or_error(left, file, "language"), _language_or_error(code2, file, "language"))
        return Bitext(languages=langs, paths=(Path(file),), header=False)
    (l1, p1), (l2, p2) = parse_language_file(left), parse_language_file(right)
    return Bitext(languages=(l1, l2), paths=(p1, p2))


def _bitext_pairs(bitext: Bitext, report: CleaningReport) -> Iterator[tuple[str, tuple[str | None, str | None]]]:
    """Yield ``(source, (text_lang0, text_lang1))``, None for an undecodable field."""
    if len(bitext.paths) == 2:
        rows = read_aligned([f"{lang}={path}" for lang, path in zip(bitext.languages, bitext.paths)], report=report)
        for row in rows:
            yield row.source, (row.texts.get(bitext.languages[0]), row.texts.get(bitext.languages[1]))
        return
    path = bitext.paths[0]
    for lineno, raw in iter_lines(path):
        source = f"{path}:{lineno}"
        fields = raw.split(b"\t")
        if len(fields) != 2:
            report.drop("malformed", source, level="row", detail=f"expected 2 tab-separated fields, got {len(fields)}")
            continue
        texts = tuple(_decode(f, report, source, language=lang) for f, lang in zip(fields, bitext.languages))
        if lineno == 1 and (bitext.header or _is_header(texts, bitext.languages)):
            continue
        yield source, texts  # type: ignore[misc]


def _is_header(texts: tuple[str | None, ...], languages: tuple[str, str]) -> bool:
    try:
        return tuple(normalize_language(t or "") for t in texts) == languages
    except LanguageCodeError:
        return False


def _spill_bitext(bitext: Bitext, pivot: str, buckets: SpillBuckets, report: CleaningReport) -> None:
    if pivot not in bitext.languages or bitext.languages[0] == bitext.languages[1]:
        raise CorpusError(
            f"{bitext.paths[0]}: a pair file needs the pivot {pivot} and one other language, "
            f"got {', '.join(bitext.languages)} (set --pivot or name the columns)"
        )
    p = bitext.languages.index(pivot)
    other = bitext.languages[1 - p]
    for source, texts in _bitext_pairs(bitext, report):
        pivot_text, text = texts[p], texts[1 - p]
        if pivot_text is None or text is None:
            continue  # counted as invalid_utf8 by the decoder
        key = pivot_key(pivot_text)
        if not key:
            report.drop("empty", source, language=pivot, detail="empty pivot text: the pair cannot be joined")
            continue
        line = json.dumps([key, pivot_text, other, text, source], ensure_ascii=False)
        buckets.append(bucket_of(stable_hash64("join", key), buckets.n), line.encode("utf-8"))


def _join_bucket(lines: Iterable[bytes], pivot: str, report: CleaningReport) -> Iterator[MultiWayRow]:
    table: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for line in lines:
        key, pivot_text, lang, text, source = json.loads(line)
        if key not in table:
            table[key] = ({pivot: pivot_text}, {pivot: source})
        texts, sources = table[key]
        if lang not in texts:
            texts[lang], sources[lang] = text, source
        elif texts[lang] != text:
            report.drop("alternative_translation", source, language=lang, detail=f"pivot {key[:60]!r}")
    for key, (texts, sources) in table.items():
        yield MultiWayRow(
            id=f"{pivot}-{short_hash('pivot', key)}",
            texts=texts,
            pivot=pivot,
            source=sources[pivot],
            text_sources=sources,
        )


def read_pairs(
    bitexts: Sequence[Bitext | str | os.PathLike],
    *,
    pivot: str = DEFAULT_PIVOT,
    report: CleaningReport | None = None,
    tmp_dir: str | os.PathLike | None = None,
    buckets: int | None = None,
    bucket_bytes: int = 64 << 20,
) -> Iterator[MultiWayRow]:
    """Join pivot-X bitexts (Tatoeba / OPUS exports) on the pivot text into multi-way rows.

    ``en-de`` and ``en-fr`` pairs sharing the English ``"Good morning."`` become one
    row ``{en, de, fr}``; the join key is :func:`pivot_key` (NFC, whitespace
    collapsed, case kept). The row id is ``<pivot>-<hash of the key>``, stable
    across builds; ``source`` is the first pair's ``file:line``. A second,
    different translation into one language is counted as
    ``alternative_translation`` (the first is kept); exact repeats are merged.

    Memory: the join is a hash partition. Pass 1 streams every pair into one of
    ``buckets`` files under ``tmp_dir`` (default: the system temp dir), chosen
    by a hash of the key, with at most 32 MiB buffered; pass 2 loads one bucket
    at a time into a dict. Peak memory is therefore about one bucket (input
    bytes / ``buckets``, times ~4 for Python objects) plus 32 MiB, and disk is
    about the input size. ``buckets`` defaults to one per ``bucket_bytes``
    (64 MiB) of input. Rows come out in bucket order, not input order.

    Args:
        bitexts: :class:`Bitext` objects or strings for :func:`parse_bitext`.
    """
    specs = [b if isinstance(b, Bitext) else parse_bitext(b) for b in bitexts]
    if not specs:
        raise CorpusError("pairs input needs at least one bitext")
    for spec in specs:
        for path in spec.paths:
            if not path.is_file():
                raise CorpusError(f"{path}: no such file")
    report = report if report is not None else CleaningReport.strict_for(pivot)
    n = buckets or buckets_for(sum(p.stat().st_size for s in specs for p in s.paths), bucket_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="align-join-", dir=tmp_dir))
    try:
        spill = SpillBuckets(workdir, n)
        for spec in specs:
            _spill_bitext(spec, pivot, spill, report)
        spill.flush()
        for b in range(n):
            yield from _join_bucket(spill.read(b), pivot, report)
    finally:  # also runs when the consumer stops early (generator close)
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# gettext catalogs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """One ``<root>/<locale>/LC_MESSAGES/<domain>.po|.mo`` file."""

    path: Path
    locale: str
    language: str


def package_locale_roots(packages: Sequence[str]) -> list[Path]:
    """The installed folders of Python packages, found without importing them."""
    roots = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise CorpusError(f"--from-package {name}: no installed package of that name (pip install {name})")
        roots.extend(Path(p) for p in spec.submodule_search_locations)
    return roots


def _catalog_files(root: Path, kind: str) -> list[Path]:
    """``.po`` / ``.mo`` files under ``LC_MESSAGES`` folders; ``auto`` prefers .po over a .mo beside it."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise CorpusError(f"{root}: no such file or folder (expected a tree with <locale>/LC_MESSAGES/*.po)")
    files = sorted(p for p in root.rglob("*") if p.parent.name == "LC_MESSAGES" and p.suffix in (".po", ".mo"))
    if kind == "po":
        return [p for p in files if p.suffix == ".po"]
    if kind == "mo":
        return [p for p in files if p.suffix == ".mo"]
    po = {p.with_suffix("") for p in files if p.suffix == ".po"}
    return [p for p in files if p.suffix == ".po" or p.with_suffix("") not in po]


def find_catalogs(
    roots: Sequence[str | os.PathLike],
    packages: Sequence[str] = (),
    *,
    kind: str = "auto",
    pivot: str = DEFAULT_PIVOT,
    languages: Collection[str] | None = None,
    report: CleaningReport | None = None,
) -> list[Catalog]:
    """Every translation catalog under ``roots`` and the installed ``packages``.

    The locale folder (``de``, ``zh_Hans``, ``pt_BR``, ``sr_Latn`` ...) gives
    the language, normalised with :func:`normalize_language`. Folders that are
    not a language code are skipped and counted in ``report.skipped_locales``;
    catalogs in ``pivot`` (here: the msgid language, whose catalogs hold the
    source strings with empty msgstr) and languages not in ``languages`` are
    skipped and counted in ``report.counts``.

    Args:
        kind: ``"po"``, ``"mo"`` or ``"auto"`` (.po, or the .mo where no .po is beside it).
    """
    if kind not in ("auto", "po", "mo"):
        raise ValueError(f"--catalogs must be auto, po or mo, got {kind!r}")
    report = report if report is not None else CleaningReport.strict_for(pivot)
    all_roots = [Path(r) for r in roots] + package_locale_roots(packages)
    catalogs = []
    for root in all_roots:
        for path in _catalog_files(root, kind):
            locale = path.parent.parent.name
            try:
                lang = normalize_language(locale)
            except LanguageCodeError:
                report.skip_locale(locale)
                continue
            if lang == pivot:
                report.count("gettext catalogs skipped: msgid language (source strings)")
            elif languages is not None and lang not in languages:
                report.count("gettext catalogs skipped: language not selected")
            else:
                catalogs.append(Catalog(path=path, locale=locale, language=lang))
    report.count("gettext catalogs read", len(catalogs))
    return catalogs


def _load_catalog(catalog: Catalog, report: CleaningReport):
    """Parse one catalog with polib, or count it as dropped (``file`` level) and return None.

    ``.po`` bytes are decoded with ``surrogateescape`` so invalid UTF-8 stays
    inside the affected entry (dropped later as ``invalid_utf8`` at its line)
    instead of failing the whole file.
    """
    import polib

    path = catalog.path
    try:
        if path.suffix == ".mo":
            return polib.mofile(str(path))
        encoding = polib.detect_encoding(str(path))
        text = path.read_bytes().decode(encoding, errors="surrogateescape")
        return polib.pofile(text, encoding=encoding)
    except UnicodeDecodeError as exc:
        report.drop("invalid_utf8", str(path), level="file", detail=f"{exc.reason} at byte {exc.start}")
    except (OSError, ValueError, LookupError) as exc:  # polib raises OSError("Syntax error in po file (line N)")
        report.drop("malformed", str(path), level="file", detail=str(exc))
    return None


def _entry_drop_reason(entry) -> str | None:
    if getattr(entry, "obsolete", False):
        return "gettext_obsolete"
    if entry.msgid_plural:
        return "gettext_plural"
    if "fuzzy" in getattr(entry, "flags", ()):
        return "gettext_fuzzy"
    if not entry.msgstr.strip():
        return "gettext_untranslated"
    return None


def iter_catalog_entries(catalog: Catalog, report: CleaningReport) -> Iterator[tuple[str, str, str, str]]:
    """Yield ``(key, msgid, msgstr, source)`` for usable entries; drops the rest by reason.

    ``key`` is ``msgctxt + "\\x04" + msgid`` (gettext's own convention) when the
    entry has a context, else the msgid. ``source`` is ``file:line`` for .po and
    ``file#entry-index`` for .mo (which has no lines).
    """
    po = _load_catalog(catalog, report)
    if po is None:
        return
    for index, entry in enumerate(po):
        if not entry.msgid:
            continue  # the header entry
        line = getattr(entry, "linenum", None)
        source = f"{catalog.path}:{line}" if line else f"{catalog.path}#{index}"
        reason = _entry_drop_reason(entry)
        if reason:
            report.drop(reason, source, language=catalog.language)
            continue
        key = f"{entry.msgctxt}\x04{entry.msgid}" if entry.msgctxt else entry.msgid
        yield key, entry.msgid, entry.msgstr, source


def read_gettext(
    roots: Sequence[str | os.PathLike] = (),
    packages: Sequence[str] = (),
    *,
    pivot: str = DEFAULT_PIVOT,
    languages: Collection[str] | None = None,
    kind: str = "auto",
    msgid_language: str = "en",
    report: CleaningReport | None = None,
) -> Iterator[MultiWayRow]:
    """Rows from gettext catalogs: the English msgid and its translations.

    Catalogs are found by :func:`find_catalogs` under folder ``roots`` and
    installed ``packages`` (e.g. ``["django", "wagtail"]``: Django's
    ``conf/locale`` and contrib ``locale`` folders, Wagtail's per-app ones).
    Entries are keyed on ``msgctxt + msgid`` across every catalog and domain
    (``django.po`` and ``djangojs.po`` merge); the msgid is the text in
    ``msgid_language`` (English for Django and Wagtail), usually the pivot.
    Fuzzy, plural, obsolete and untranslated entries are dropped and counted.
    A differing second translation of one key into one language (two apps
    translating "Save" differently) is counted as ``alternative_translation``.

    Row ids are ``po-<hash of the key>``; rows come in first-seen order over
    sorted catalog paths, so the output is deterministic. Memory: the whole
    key -> translations table (catalog-sized: a few MB for Django + Wagtail).

    Args:
        languages: skip catalogs of other languages without parsing them.
        kind: ``"po"``, ``"mo"`` or ``"auto"`` (see :func:`find_catalogs`).
        msgid_language: the language of the msgids; its own catalogs (source
            strings with empty msgstr) are skipped.
    """
    if not roots and not packages:
        raise CorpusError("gettext input needs catalog folders or --from-package names")
    report = report if report is not None else CleaningReport.strict_for(pivot)
    source_lang = normalize_language(msgid_language)
    catalogs = find_catalogs(roots, packages, kind=kind, pivot=source_lang, languages=languages, report=report)
    table: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    for catalog in catalogs:
        for key, msgid, msgstr, source in iter_catalog_entries(catalog, report):
            if key not in table:
                table[key] = ({source_lang: msgid}, {source_lang: source})
            texts, sources = table[key]
            existing = texts.get(catalog.language)
            if existing is None:
                texts[catalog.language], sources[catalog.language] = msgstr, source
            elif existing != msgstr:
                report.drop(
                    "alternative_translation", source, language=catalog.language, detail=f"msgid {msgid[:60]!r}"
                )
    for key, (texts, sources) in table.items():
        yield MultiWayRow(
            id=f"po-{short_hash('gettext', key)}",
            texts=texts,
            pivot=pivot,
            source=sources[source_lang],
            text_sources=sources,
        )


# ---------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------

# C0 and C1 controls except tab and newline; \r is included (a stray CR from CRLF data).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def text_problem(text: str, max_chars: int) -> tuple[str, str] | None:
    """``(reason, detail)`` when a text must be dropped, else None.

    Checks, in order: lone surrogates (``invalid_utf8``: what ``surrogateescape``
    decoding or a JSON ``\\ud800`` escape leaves), control characters, empty or
    whitespace-only, longer than ``max_chars`` characters (after stripping).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return "invalid_utf8", f"undecodable byte or lone surrogate at character {exc.start}"
    bad = _CONTROL.search(text)
    if bad:
        return "control_chars", f"U+{ord(bad.group()):04X} at character {bad.start()}"
    stripped = text.strip()
    if not stripped:
        return "empty", ""
    if len(stripped) > max_chars:
        return "too_long", f"{len(stripped)} characters > --max-chars {max_chars}"
    return None


def _clean_texts(row: MultiWayRow, config: CleaningConfig, report: CleaningReport) -> tuple[dict[str, str], int]:
    """The row's valid, selected texts (stripped), and how many were only unselected."""
    pivot_text = row.texts.get(config.pivot)
    pivot_norm = pivot_key(pivot_text) if pivot_text is not None else None
    kept: dict[str, str] = {}
    unselected = 0
    for lang in sorted(row.texts, key=lambda lang: (lang != config.pivot, lang)):
        text = row.texts[lang]
        if config.languages is not None and lang not in config.languages:
            report.drop("language_not_selected", row.source_of(lang), language=lang)
            unselected += 1
            continue
        problem = text_problem(text, config.max_chars)
        if problem is None and lang != config.pivot and pivot_norm is not None and pivot_key(text) == pivot_norm:
            problem = ("same_as_pivot", f"{text.strip()[:60]!r}")
        if problem is not None:
            report.drop(problem[0], row.source_of(lang), language=lang, detail=problem[1])
            continue
        kept[lang] = text.strip()
    return kept, unselected


def check_rows(rows: Iterable[MultiWayRow], config: CleaningConfig, report: CleaningReport) -> Iterator[MultiWayRow]:
    """Per-text and per-row checks, streaming (no duplicate detection, no :meth:`CleaningReport.keep`).

    Each text is dropped by :func:`text_problem` or when identical (after
    :func:`pivot_key` normalisation) to the pivot text; kept texts are stripped.
    A row left with fewer than ``config.min_languages`` languages is dropped as
    ``too_few_languages`` (or ``too_few_selected_languages`` when only
    ``--languages`` took it under). Yields new rows with ``pivot = config.pivot``.
    """
    for row in rows:
        texts, unselected = _clean_texts(row, config, report)
        if len(texts) < config.min_languages:
            reason = (
                "too_few_selected_languages" if len(texts) + unselected >= config.min_languages else "too_few_languages"
            )
            detail = f"{len(texts)} valid of {len(row.texts)} ({', '.join(sorted(texts)) or 'none'})"
            report.drop(reason, row.source, level="row", detail=detail)
            continue
        yield MultiWayRow(id=row.id, texts=texts, pivot=config.pivot, source=row.source, text_sources=row.text_sources,
                          provenance=row.provenance)


def drop_duplicates(
    rows: Iterable[MultiWayRow], config: CleaningConfig, report: CleaningReport
) -> Iterator[MultiWayRow]:
    """Keep the first row per :func:`row_dedup_key` and :meth:`CleaningReport.keep` it.

    Memory: a set of 8-byte hashes, about 100 bytes per distinct pivot text in
    CPython (1 GB per 10M rows). The shard build avoids that by calling this
    once per hash bucket (duplicates always share a bucket). With
    ``config.deduplicate`` off every row is kept.
    """
    seen: set[int] = set()
    for row in rows:
        if config.deduplicate:
            digest = stable_hash64("dedup", row_dedup_key(row))
            if digest in seen:
                report.drop("duplicate_pivot", row.source, level="row", detail=f"pivot {(row.pivot_text or '')[:60]!r}")
                continue
            seen.add(digest)
        report.keep(row)
        yield row


def clean_rows(
    rows: Iterable[MultiWayRow], config: CleaningConfig, report: CleaningReport | None = None
) -> Iterator[MultiWayRow]:
    """:func:`check_rows` then :func:`drop_duplicates`: the whole cleaning, streaming.

    Example::

        report = CleaningReport(CleaningConfig(max_chars=200))
        rows = list(clean_rows(read_jsonl("corpus.jsonl", report=report), report.config, report))
        report.write("cleaning_report.json"); print(report.format_table())
    """
    report = report if report is not None else CleaningReport(config)
    return drop_duplicates(check_rows(rows, config, report), config, report)


# ---------------------------------------------------------------------------
# One entry point for every format
# ---------------------------------------------------------------------------


def input_paths(inputs: Sequence[str]) -> list[Path]:
    """The files and folders named by ``INPUT`` arguments of every form (``FILE``, ``LANG=FILE``,
    ``A,B``, ``L1,L2=FILE``), those that exist."""
    paths = []
    for item in inputs:
        if Path(item).exists():
            paths.append(Path(item))
            continue
        for part in str(item).split(","):
            path = Path(part.split("=", 1)[-1])
            if path.exists():
                paths.append(path)
    return paths


@dataclass
class CorpusSource:
    """Where rows come from; filled from ``align shards build`` flags."""

    format: str
    """Input format (``--format``): one of jsonl, tsv, aligned, pairs, gettext."""
    inputs: list[str] = field(default_factory=list)
    """Input files or folders (``INPUT ...``); the forms per format are in :func:`read_corpus`."""
    packages: list[str] = field(default_factory=list)
    """Installed Python packages to read gettext catalogs from (``--from-package django wagtail``)."""
    catalogs: str = "auto"
    """Which gettext files to read (``--catalogs``): po, mo, or auto (.po, else the .mo)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        self.inputs = [str(i) for i in self.inputs]
        self.packages = list(self.packages)
        if self.packages and self.format != "gettext":
            raise ValueError(f"--from-package applies only to --format gettext, got --format {self.format}")
        if self.catalogs not in ("auto", "po", "mo"):
            raise ValueError(f"--catalogs must be auto, po or mo, got {self.catalogs!r}")
        if not self.inputs and not self.packages:
            hint = " or --from-package NAME" if self.format == "gettext" else ""
            raise ValueError(f"--format {self.format} needs at least one INPUT{hint}")

    def input_bytes(self) -> int:
        """Total size of the input files (0 for what cannot be sized), to size spill buckets."""
        return sum(path.stat().st_size for path in input_paths(self.inputs) if path.is_file())

    def describe(self) -> dict:
        """The manifest's ``source`` (without the command line)."""
        return {"format": self.format, "inputs": list(self.inputs), "packages": list(self.packages)}


def read_corpus(
    source: CorpusSource,
    *,
    pivot: str = DEFAULT_PIVOT,
    languages: Collection[str] | None = None,
    report: CleaningReport | None = None,
    tmp_dir: str | os.PathLike | None = None,
) -> Iterator[MultiWayRow]:
    """Stream the rows of ``source`` with the reader of its format.

    ``jsonl`` / ``tsv``: each input is a file, read one after another.
    ``aligned``: all inputs form one corpus (``corpus.en corpus.de`` or ``en=path``).
    ``pairs``: each input is a bitext (:func:`parse_bitext`), all joined on the pivot.
    ``gettext``: inputs are catalog folders, plus ``source.packages``.

    Args:
        languages: gettext only: skip catalogs of languages not selected.
        tmp_dir: where the pair join spills its buckets (default: system temp).
    """
    report = report if report is not None else CleaningReport.strict_for(pivot)
    if source.format == "jsonl":
        for path in source.inputs:
            yield from read_jsonl(path, pivot=pivot, report=report)
    elif source.format == "tsv":
        for path in source.inputs:
            yield from read_tsv(path, pivot=pivot, report=report)
    elif source.format == "aligned":
        yield from read_aligned(source.inputs, pivot=pivot, report=report)
    elif source.format == "pairs":
        yield from read_pairs(source.inputs, pivot=pivot, report=report, tmp_dir=tmp_dir)
    else:
        yield from read_gettext(
            source.inputs, source.packages, pivot=pivot, languages=languages, kind=source.catalogs, report=report
        )
