"""What ``align translate`` reads (plain lines, JSONL rows, the pivot column of shards) and the rows it writes.

Every input becomes a stream of :class:`SourceRow` in a fixed order (inputs in
the order given, lines in file order; shards in manifest order), numbered from
0: the number decides the row's part (:mod:`alignment.translate.parts`), so
every rank sees the same numbering without talking to the others.

Output rows are the ``texts`` form of the JSONL that ``align shards build
--format jsonl`` reads, plus their provenance::

    {"id": "news-12", "pivot": "en",
     "texts": {"en": "Hello.", "de": "Hallo."},
     "provenance": {"en": {"origin": "original"},
                    "de": {"origin": "synthetic", "model": "facebook/nllb-200-distilled-600M", "from": "en"}}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignment.data.cleaning import CleaningConfig, CleaningReport
from alignment.data.readers.jsonl_tsv import read_jsonl
from alignment.data.readers.lines import iter_lines
from alignment.data.readers.lines import plain_name as _plain_name
from alignment.data.rows import CorpusError

InputFormat = Literal["auto", "lines", "jsonl", "shards"]
INPUT_FORMATS = ("auto", "lines", "jsonl", "shards")
ORIGINAL = {"origin": "original"}


@dataclass
class SourceRow:
    """One sentence to translate, with whatever texts its row already has."""

    id: str
    text: str | None
    """The text in the source language (None or blank: nothing to translate)."""
    where: str
    """``file:line`` or ``shard:key``, for messages."""
    texts: dict[str, str] = field(default_factory=dict)
    """Texts the input row already has (JSONL or shards), kept in the output as original."""
    provenance: dict[str, dict] = field(default_factory=dict)
    """Their provenance, when the input recorded one (a corpus that ``align translate`` wrote)."""


def detect_format(path: str) -> str:
    """``shards`` for a folder or a manifest or a .tar, ``jsonl`` for .jsonl/.json(.gz ...), else ``lines``."""
    p = Path(path)
    if p.is_dir() or p.name == "manifest.json" or _plain_name(p).endswith(".tar"):
        return "shards"
    if _plain_name(p).endswith((".jsonl", ".json")):
        return "jsonl"
    return "lines"


def _lines(path: str) -> Iterator[SourceRow]:
    stem = _plain_name(Path(path)).split(".")[0]
    for lineno, raw in iter_lines(path):
        where = f"{path}:{lineno}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        yield SourceRow(id=f"{stem}-{lineno}", text=text, where=where)


def _rows(rows, source: str) -> Iterator[SourceRow]:
    for row in rows:
        texts = dict(row.texts)
        text = texts.get(source)
        yield SourceRow(id=row.id, text=text, where=row.source, texts=texts, provenance=dict(row.provenance or {}))


def _shards(spec: str, source: str) -> Iterator[SourceRow]:
    from alignment.data.manifest import MANIFEST_NAME, iter_shard_rows, load_manifest, resolve_shards

    path = Path(spec)
    if path.is_dir() and (path / MANIFEST_NAME).is_file() or path.suffix == ".json":
        manifest = load_manifest(spec)  # every split with rows, in manifest order
        shards = [s for name, e in manifest["splits"].items() if e["shards"] for s in resolve_shards(spec, name)]
    else:
        shards = resolve_shards(spec)
    for shard in shards:
        yield from _rows((row for _, row in iter_shard_rows(shard.url)), source)


def read_sources(inputs: list[str], source: str, input_format: str = "auto") -> Iterator[SourceRow]:
    """All inputs' rows in order. JSONL and shards rows keep their other texts.

    Raises:
        CorpusError: an unreadable input (names the file and line).
    """
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {input_format!r}")
    for path in inputs:
        kind = detect_format(path) if input_format == "auto" else input_format
        if kind != "shards" and not Path(path).is_file():
            raise CorpusError(f"{path}: no such file")
        if kind == "lines":
            yield from _lines(path)
        elif kind == "jsonl":
            report = CleaningReport(CleaningConfig(pivot=source, strict=True))  # a broken line is an error here
            yield from _rows(read_jsonl(path, pivot=source, report=report), source)
        else:
            yield from _shards(path, source)


def input_fingerprint(inputs: list[str]) -> list[dict]:
    """Name, size and modification time of every input file, recorded with the run."""
    out = []
    for path in inputs:
        p = Path(path)
        stat = p.stat() if p.exists() else None
        out.append({"path": os.fspath(path), "bytes": stat.st_size if stat and p.is_file() else None})
    return out


def output_row(row: SourceRow, pivot: str, texts: dict[str, str], provenance: dict[str, dict]) -> str:
    """One output JSONL line (sorted keys inside ``texts`` follow insertion: source first)."""
    obj = {"id": row.id, "pivot": pivot, "texts": texts, "provenance": provenance}
    return json.dumps(obj, ensure_ascii=False) + "\n"
