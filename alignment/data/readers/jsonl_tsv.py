"""JSON Lines and TSV readers: one row per line, the languages named by keys or by a header row."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignment.data.cleaning import CleaningReport
from alignment.data.readers.lines import decode_text, iter_lines, language_or_error, overlong_detail, plain_name
from alignment.data.rows import CorpusError, MultiWayRow
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language

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
    stem = plain_name(path).split(".")[0]
    for lineno, raw in iter_lines(path):
        source = f"{path}:{lineno}"
        too_long = overlong_detail(raw)
        if too_long:
            report.drop("too_long", source, level="row", detail=too_long)
            continue
        line = decode_text(raw, report, source, level="row")
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
    return {language_or_error(k, source, "provenance key"): v for k, v in raw.items() if isinstance(v, dict)}


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
        lang = language_or_error(name, f"{path}:1", "header column")
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
    stem = plain_name(path).split(".")[0]
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
            text = decode_text(value, report, source, language=lang or None, level="text" if lang else "row")
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
