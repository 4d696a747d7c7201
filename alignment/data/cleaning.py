"""Cleaning: the drop reasons, :class:`CleaningConfig`, :class:`CleaningReport` and the filters.

Cleaning (:func:`clean_rows` = :func:`check_rows` + :func:`drop_duplicates`)
drops empty texts, control characters, over-long texts, "translations"
identical to the pivot, duplicate rows by pivot text and rows under the minimum
language count; each drop is counted by reason in a :class:`CleaningReport`
(readers count what they cannot read into the same report), and ``strict``
turns the first bad item into a :class:`~alignment.data.rows.CorpusError`
naming ``file:line``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from alignment.data.rows import CorpusError, MultiWayRow, pivot_key, row_dedup_key, stable_hash64
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language, parse_languages

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
        DropReason("too_long", "more characters than --max_chars"),
        DropReason("same_as_pivot", "a 'translation' identical to the pivot text"),
        DropReason("duplicate_pivot", "a row whose pivot text was already seen"),
        DropReason("too_few_languages", "fewer valid languages than --min_languages"),
        DropReason(
            "too_few_selected_languages",
            "under --min_languages only because of --languages",
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


@dataclass
class CleaningConfig:
    """What :func:`clean_rows` keeps; filled from ``align shards build`` flags."""

    pivot: str = DEFAULT_PIVOT
    """Pivot language (``--pivot``): joins, duplicates and splits are keyed on its text."""
    languages: tuple[str, ...] | None = None
    """Languages to keep (``--languages en,de,fr``), all others dropped; unset keeps all."""
    min_languages: int = 2
    """Rows with fewer valid languages than this are dropped (``--min_languages``)."""
    max_chars: int = 1000
    """Texts longer than this many characters are dropped (``--max_chars``)."""
    deduplicate: bool = True
    """Drop rows whose pivot text was already seen (``--keep_duplicates`` turns it off)."""
    strict: bool = False
    """Stop at the first bad item with an error naming file and line (``--strict``)."""

    def __post_init__(self) -> None:
        try:
            self.pivot = normalize_language(self.pivot)
        except LanguageCodeError as exc:
            raise ValueError(f"--pivot: {exc}") from exc
        self.languages = parse_languages(self.languages, "--languages")
        if self.min_languages < 2:
            raise ValueError(f"--min_languages must be >= 2 (a multi-way row), got {self.min_languages}")
        if self.max_chars < 1:
            raise ValueError(f"--max_chars must be >= 1, got {self.max_chars}")
        if self.languages is not None:
            if self.pivot not in self.languages:
                raise ValueError(
                    f"--languages must include the pivot --pivot {self.pivot}, got {','.join(self.languages)}"
                )
            if len(self.languages) < self.min_languages:
                raise ValueError(
                    f"--languages names {len(self.languages)} languages, "
                    f"fewer than --min_languages {self.min_languages}"
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
        return "too_long", f"{len(stripped)} characters > --max_chars {max_chars}"
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
