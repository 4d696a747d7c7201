"""Read evaluation data for ``align eval`` and ``align mine``: held-out shards, TSV, JSONL.

Three inputs give an :class:`EvalData`, told apart by the spec (:func:`detect_format`):

``shards``
    a shard build's folder or ``manifest.json`` (the rows of ``--split``,
    ``test`` by default), a glob, a brace pattern or a single ``.tar``;
    resolved with :func:`alignment.data.manifest.resolve_shards` and read with
    webdataset's tar iterator, one ``<key>.json`` member per row
    (``{"id", "pivot", "texts"}``, plus an optional ``"label"``).
``tsv``
    a header row naming the columns, then one row per line, tab-separated, no
    quoting. Columns: language codes, plus the reserved names ``id``,
    ``score`` and ``label`` (case-insensitive)::

        id    en            de              fr            label      <- multi-way rows, labelled
        id    en            de              score                    <- cross-lingual STS pairs
        en    en            score                                    <- monolingual STS pairs

    Without ``score`` the language columns are translations of each other (at
    least two distinct languages; an empty field is a missing translation).
    With ``score`` there are exactly two text columns, which may share a
    language, and each line is a *scored pair* (STS), not a translation.
``jsonl``
    one object per line, ``{"id": .., "en": .., "de": .., "label": ..}`` or
    ``{"id": .., "texts": {"en": .., "de": ..}, "score": 4.2}``; the reserved
    keys are ``id``, ``pivot``, ``texts``, ``score`` and ``label``. A row with
    a score must have exactly two texts and is a scored pair.

A file holds either translation rows or scored pairs, never both, and either
every row carries a label or none does: a half-labelled file is an error that
names the first line without one. ``.gz``, ``.bz2`` and ``.xz`` files are read
compressed. Every error is an :class:`EvalDataError` naming the file (and
line, or shard and sample) and what is wrong.

The containers (:class:`~alignment.evaluate.datasets.EvalData`) and language
selection live in :mod:`alignment.evaluate.datasets`.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from alignment.data.rows import MultiWayRow
from alignment.evaluate.datasets import EvalData, EvalDataError, ScoredPair, numbered_lines, select_languages
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language

DATA_FORMATS = ("shards", "tsv", "jsonl")
"""Evaluation data formats (``--data``), see the module docstring."""
RESERVED_COLUMNS = ("id", "score", "label")
"""TSV header names that are not languages."""
RESERVED_KEYS = ("id", "pivot", "texts", "score", "label")
"""JSONL keys that are not languages."""
_COMPRESSED = (".gz", ".bz2", ".xz")
_TSV_SUFFIXES = (".tsv", ".tab")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


# --------------------------------------------------------------------------- format detection


def _plain_suffix(path: Path) -> str:
    """The suffix under any compression suffix: ``x.tsv.gz`` -> ``.tsv``."""
    name = path.name.lower()
    for comp in _COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).suffix


def detect_format(spec: str | os.PathLike) -> str:
    """``shards``, ``tsv`` or ``jsonl`` for a ``--data`` spec.

    Raises:
        EvalDataError: the format cannot be told from the spec (names it and the accepted forms).
    """
    text = os.fspath(spec)
    path = Path(text)
    suffix = _plain_suffix(path)
    if suffix == ".json" and path.is_file() and path.name != "manifest.json":
        _require_manifest(path)
    if path.is_dir() or suffix in (".json", ".tar") or glob.has_magic(text) or "{" in text or "://" in text:
        return "shards"
    if suffix in _TSV_SUFFIXES:
        return "tsv"
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    raise EvalDataError(
        f"{text}: cannot tell the data format; pass a shard folder or manifest.json (held-out shards), "
        "a .tsv file (header row of language codes, optional id/score/label columns) "
        "or a .jsonl file (one multi-way row per line, optional score/label)"
    )


def _require_manifest(path: Path) -> None:
    """A ``.json`` --data must be a shard manifest; JSON Lines files are told apart by their suffix."""
    from alignment.data.manifest import MANIFEST_FORMAT

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        obj = None
    if not (isinstance(obj, dict) and obj.get("format") == MANIFEST_FORMAT):
        raise EvalDataError(
            f"{path}: a .json --data must be a shard manifest ({MANIFEST_FORMAT}); "
            "name a JSON Lines file of rows .jsonl"
        )


def _name_of(spec: str) -> str:
    path = Path(spec)
    if path.is_dir():
        return path.name
    if path.name == "manifest.json":
        return path.parent.name
    name = path.name
    for comp in _COMPRESSED:
        name = name.removesuffix(comp)
    return Path(name).stem or name


def load_eval_data(
    spec: str | os.PathLike,
    *,
    split: str = "test",
    languages: Sequence[str] | None = None,
    max_rows: int | None = None,
) -> EvalData:
    """Read evaluation data from ``spec`` and keep ``languages`` (all when None).

    Args:
        spec: see the module docstring.
        split: the manifest split to read for shard folders (ignored otherwise).
        languages: languages to keep; each must have at least one row.
        max_rows: read at most this many rows or pairs (the first ones in file order;
            shards are shuffled at build time, so that is a random sample).

    Raises:
        EvalDataError: unreadable or malformed input, or a requested language with no rows.
    """
    text = os.fspath(spec)
    fmt = detect_format(text)
    if fmt != "shards" and not Path(text).is_file():
        raise EvalDataError(f"{text}: no such file")
    data = read_shards(text, split) if fmt == "shards" else read_tsv(text) if fmt == "tsv" else read_jsonl(text)
    if max_rows is not None:
        data = _truncate(data, max_rows)
    if not data.rows and not data.pairs:
        raise EvalDataError(f"{text}: no evaluation rows found")
    return select_languages(data, languages) if languages else data


def _truncate(data: EvalData, max_rows: int) -> EvalData:
    rows, pairs = data.rows[:max_rows], data.pairs[:max_rows]
    labels = {r.id: data.labels[r.id] for r in rows} if data.labels is not None else None
    return replace(data, rows=rows, pairs=pairs, labels=labels)


# --------------------------------------------------------------------------- shared row checks


class _RowCollector:
    """Accumulates rows or pairs from one file and enforces the file-level rules."""

    def __init__(self, spec: str, name: str, fmt: str) -> None:
        self.data = EvalData(name=name, spec=spec, format=fmt)
        self._seen: dict[str, str] = {}
        self._labels: dict[str, str] = {}
        self._labelled: bool | None = None
        self._scored: bool | None = None

    def _consistent(self, attr: str, value: bool, source: str, what: str) -> None:
        first = getattr(self, attr)
        if first is None:
            setattr(self, attr, value)
        elif first != value:
            has = f"has a {what}" if value else f"has no {what}"
            others = "the rows before it do not" if value else "the rows before it do"
            raise EvalDataError(f"{source}: this row {has} but {others}; every row must have a {what}, or none")

    def add_row(self, row: MultiWayRow, label: str | None) -> None:
        self._consistent("_scored", False, row.source, "score")
        self._consistent("_labelled", label is not None, row.source, "label")
        if row.id in self._seen:
            first = self._seen[row.id]
            raise EvalDataError(f"{row.source}: row id {row.id!r} repeats (first at {first}); ids must be unique")
        self._seen[row.id] = row.source
        if len(row.texts) < 2:
            return  # a row with one language translates nothing; nothing to evaluate
        self.data.rows.append(row)
        if label is not None:
            self._labels[row.id] = label

    def add_pair(self, pair: ScoredPair, label: str | None) -> None:
        self._consistent("_scored", True, pair.source, "score")
        if label is not None:
            raise EvalDataError(f"{pair.source}: a scored pair (STS) cannot also carry a label")
        self.data.pairs.append(pair)

    def finish(self) -> EvalData:
        if self._labelled:
            self.data.labels = self._labels
        return self.data


def _score(value: object, source: str) -> float:
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EvalDataError(f"{source}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise EvalDataError(f"{source}: score {value!r} is not finite")
    return score


def _label(value: object, source: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise EvalDataError(f"{source}: label must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def _language(code: str, source: str, what: str) -> str:
    try:
        return normalize_language(code)
    except LanguageCodeError as exc:
        raise EvalDataError(f"{source}: {what} {code!r} is not a language code ({exc})") from None


# --------------------------------------------------------------------------- TSV


@dataclass(frozen=True)
class _TsvLayout:
    names: tuple[str, ...]
    id_col: int | None
    score_col: int | None
    label_col: int | None
    text_cols: tuple[int, ...]
    languages: tuple[str, ...]
    """Language of each text column (parallel to ``text_cols``)."""


def _tsv_layout(path: str, header: str) -> _TsvLayout:
    names = tuple(header.split("\t"))
    special: dict[str, int] = {}
    text_cols, languages = [], []
    for i, name in enumerate(names):
        key = name.strip().lower()
        if key in RESERVED_COLUMNS:
            if key in special:
                raise EvalDataError(f"{path}:1: the header has two {key!r} columns")
            special[key] = i
            continue
        text_cols.append(i)
        languages.append(_language(name, f"{path}:1", "header column"))
    scored = "score" in special
    if scored and len(text_cols) != 2:
        raise EvalDataError(
            f"{path}:1: a TSV with a 'score' column holds scored pairs and needs exactly two text columns "
            f"(language codes), got {len(text_cols)}: {header!r}"
        )
    if not scored:
        if len(set(languages)) != len(languages):
            dup = next(lang for lang, n in Counter(languages).items() if n > 1)
            raise EvalDataError(f"{path}:1: the header names {dup} twice; translation columns need distinct languages")
        if len(languages) < 2:
            raise EvalDataError(
                f"{path}:1: the header must name at least two language columns (translations of each other), "
                f"got {header!r}"
            )
    return _TsvLayout(
        names, special.get("id"), special.get("score"), special.get("label"), tuple(text_cols), tuple(languages)
    )


def read_tsv(path: str | os.PathLike) -> EvalData:
    """Read a TSV of translation rows or scored pairs (see the module docstring).

    Raises:
        EvalDataError: empty file, a bad header, a line with the wrong number of
            fields (a missing column), a bad score or label, or an empty side of a
            scored pair; each names the file and line.
    """
    path = os.fspath(path)
    lines = numbered_lines(path)
    first = next(lines, None)
    if first is None:
        raise EvalDataError(f"{path}: empty file, expected a header row of language codes")
    layout = _tsv_layout(path, first[1])
    collect = _RowCollector(path, _name_of(path), "tsv")
    stem = _name_of(path)
    for lineno, line in lines:
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        fields = line.split("\t")
        if len(fields) != len(layout.names):
            raise EvalDataError(
                f"{source}: expected {len(layout.names)} tab-separated fields "
                f"({', '.join(layout.names)}), got {len(fields)}: a column is missing or a text contains a tab"
            )
        label = _label(fields[layout.label_col], source) if layout.label_col is not None else None
        if layout.score_col is not None:
            collect.add_pair(_tsv_pair(fields, layout, source), label)
            continue
        row_id = fields[layout.id_col].strip() if layout.id_col is not None else ""
        texts = {
            lang: fields[col] for col, lang in zip(layout.text_cols, layout.languages) if fields[col].strip()
        }
        collect.add_row(MultiWayRow(id=row_id or f"{stem}-{lineno}", texts=texts, source=source), label)
    return collect.finish()


def _tsv_pair(fields: list[str], layout: _TsvLayout, source: str) -> ScoredPair:
    (col_a, col_b), (lang_a, lang_b) = layout.text_cols, layout.languages
    for col in (col_a, col_b):
        if not fields[col].strip():
            raise EvalDataError(f"{source}: column {layout.names[col]!r} is empty; a scored pair needs both sentences")
    return ScoredPair(fields[col_a], fields[col_b], lang_a, lang_b, _score(fields[layout.score_col], source), source)


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | os.PathLike) -> EvalData:
    """Read a JSONL file of multi-way rows, optionally labelled, or of scored pairs.

    Raises:
        EvalDataError: a line that is not a JSON object, a key that is not a
            language code, a text that is not a string, a scored row without
            exactly two texts, a bad score or label; each names the file and line.
    """
    path = os.fspath(path)
    stem = _name_of(path)
    collect = _RowCollector(path, stem, "jsonl")
    for lineno, line in numbered_lines(path):
        if not line.strip():
            continue
        source = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{source}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        texts = _jsonl_texts(obj, source)
        label = _label(obj["label"], source) if obj.get("label") is not None else None
        if obj.get("score") is not None:
            if len(texts) != 2:
                raise EvalDataError(
                    f"{source}: a row with a score is a scored pair and needs exactly two texts, "
                    f"got {len(texts)} ({', '.join(texts) or 'none'})"
                )
            (lang_a, text_a), (lang_b, text_b) = texts.items()
            collect.add_pair(ScoredPair(text_a, text_b, lang_a, lang_b, _score(obj["score"], source), source), label)
            continue
        row_id = str(obj.get("id", f"{stem}-{lineno}"))
        collect.add_row(MultiWayRow(id=row_id, texts=texts, source=source), label)
    return collect.finish()


def _jsonl_texts(obj: dict, source: str) -> dict[str, str]:
    if "texts" in obj:
        raw = obj["texts"]
        if not isinstance(raw, dict):
            raise EvalDataError(f'{source}: "texts" must be an object of language -> text, got {type(raw).__name__}')
    else:
        raw = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    texts: dict[str, str] = {}
    for key, value in raw.items():
        lang = _language(key, source, "key")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # a missing translation
        if not isinstance(value, str):
            raise EvalDataError(f"{source}: text of {key!r} must be a string, got {type(value).__name__}")
        if lang in texts:
            raise EvalDataError(f"{source}: key {key!r} repeats language {lang}")
        texts[lang] = value
    return texts


# --------------------------------------------------------------------------- shards


def iter_shard_samples(url: str) -> Iterator[tuple[str, dict]]:
    """``(sample key, JSON object)`` for each ``<key>.json`` member of one shard, streaming.

    Only a local file is opened (``resolve_shards`` returns absolute paths); a
    URL or ``pipe:`` command is never handed to an opener.

    Raises:
        EvalDataError: the shard cannot be opened, is not a valid tar, or a
            sample is not a JSON object (names the shard and the sample key).
    """
    import tarfile

    from webdataset.tariterators import tar_file_iterator

    try:
        stream = open(url, "rb")  # a plain file: never webdataset's gopen, which runs 'pipe:' names in a shell
    except OSError as exc:
        raise EvalDataError(f"{url}: cannot open shard: {exc}") from None
    last = None
    try:
        with stream:
            for member in tar_file_iterator(stream, select_files=lambda name: name.endswith(".json")):
                key = member["fname"][: -len(".json")]
                try:
                    obj = json.loads(member["data"])
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise EvalDataError(f"{url}: sample {key!r} is not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise EvalDataError(f"{url}: sample {key!r} is not a JSON object")
                last = key
                yield key, obj
    except (tarfile.TarError, EOFError, OSError) as exc:
        after = f"after sample {last!r}" if last else "before the first sample"
        raise EvalDataError(f"{url}: not a readable tar shard ({after}): {exc}") from None


def read_shards(spec: str, split: str = "test") -> EvalData:
    """Rows of held-out shards (see :func:`alignment.data.manifest.resolve_shards` for ``spec``).

    Raises:
        EvalDataError: no shards, an unreadable shard, or a bad sample (shard and key named).
    """
    from alignment.data.manifest import ManifestError, resolve_shards

    try:
        shards = resolve_shards(spec, split)
    except (FileNotFoundError, ManifestError, ValueError) as exc:
        raise EvalDataError(str(exc)) from None
    collect = _RowCollector(spec, _name_of(spec), "shards")
    for shard in shards:
        for key, obj in iter_shard_samples(shard.url):
            source = f"{shard.url}:{key}"
            texts = obj.get("texts")
            if not isinstance(texts, dict) or "id" not in obj:
                raise EvalDataError(f"{source}: a shard sample needs 'id' and a 'texts' object")
            clean = {}
            for code, text in texts.items():
                if isinstance(text, str) and text.strip():
                    clean[_language(str(code), source, "language")] = text
            label = _label(obj["label"], source) if obj.get("label") is not None else None
            # the sample key, not the JSON id, names the row: a build makes keys unique even when input ids repeat
            row = MultiWayRow(id=key, texts=clean, pivot=obj.get("pivot", DEFAULT_PIVOT), source=source)
            collect.add_row(row, label)
    return collect.finish()
