"""Aligned per-language files (Moses / OPUS): line ``i`` of every file is one row."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from alignment.data.cleaning import CleaningReport
from alignment.data.readers.lines import decode_text, iter_lines, language_or_error, plain_name
from alignment.data.rows import CorpusError, MultiWayRow
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language


def parse_language_file(spec: str | os.PathLike) -> tuple[str, Path]:
    """``"de=path"`` or ``"corpus.de"`` (language from the suffix) -> ``("de", Path)``.

    Raises:
        CorpusError: the language cannot be told or is not a code (names the file).
    """
    text = str(spec)
    if "=" in text and not Path(text).exists():
        code, _, file = text.partition("=")
        return language_or_error(code, file, "language"), Path(file)
    path = Path(text)
    name = plain_name(path)
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
    names = [plain_name(p) for p in paths]
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
            text = decode_text(raw, report, sources[lang], language=lang)
            if text is not None:
                texts[lang] = text
        yield MultiWayRow(id=f"{stem}-{lineno}", texts=texts, pivot=pivot, source=source, text_sources=sources)
