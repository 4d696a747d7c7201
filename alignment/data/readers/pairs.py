"""Bilingual pivot-X pairs (Tatoeba / OPUS exports) joined on the pivot text into multi-way rows."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from alignment.data.cleaning import CleaningReport
from alignment.data.readers.aligned import parse_language_file, read_aligned
from alignment.data.readers.lines import decode_text, iter_lines, language_or_error
from alignment.data.rows import CorpusError, MultiWayRow, pivot_key, short_hash, stable_hash64
from alignment.data.spill import SpillBuckets, bucket_of, buckets_for
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language


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
        langs = tuple(language_or_error(n, f"{path}:1", "header column") for n in names)
        return Bitext(languages=langs, paths=(path,), header=True)  # type: ignore[arg-type]
    left, sep, right = text.partition(",")
    if not sep:
        raise CorpusError(f"{text}: no such file (a pairs input is FILE.tsv, en,de=FILE.tsv or FILE.en,FILE.de)")
    if "=" in right and "=" not in left:  # en,de=pairs.tsv
        code2, _, file = right.partition("=")
        langs = (language_or_error(left, file, "language"), language_or_error(code2, file, "language"))
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
        texts = tuple(decode_text(f, report, source, language=lang) for f, lang in zip(fields, bitext.languages))
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
