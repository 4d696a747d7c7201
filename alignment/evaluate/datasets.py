"""Evaluation data for ``align eval`` and ``align mine``: the containers, language selection, plain text.

:class:`EvalData` holds multi-way translation rows or scored pairs, read by
:func:`alignment.evaluate.readers.load_eval_data` from held-out shards, TSV or
JSONL (the formats are described there). Every error is an
:class:`EvalDataError` naming the file (and line, or shard and sample) and
what is wrong.

:func:`read_text_file` reads the monolingual, one-sentence-per-line files of
``align mine``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from alignment.data.readers.lines import iter_lines
from alignment.data.rows import CorpusError, MultiWayRow
from alignment.languages import parse_languages


class EvalDataError(ValueError):
    """Bad evaluation data: the message names the file (and line or sample) and what is wrong."""


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True)
class ScoredPair:
    """Two sentences and a gold similarity (an STS item); the languages may be equal."""

    text_a: str
    text_b: str
    lang_a: str
    lang_b: str
    score: float
    source: str = ""
    """``file:line`` of the pair, for error messages."""

    @property
    def language_pair(self) -> str:
        return f"{self.lang_a}-{self.lang_b}"


@dataclass
class EvalData:
    """Evaluation rows read from one ``--data`` spec.

    Attributes:
        name: short name for reports (file stem or folder name).
        spec: the spec as given.
        format: one of :data:`~alignment.evaluate.readers.DATA_FORMATS`.
        rows: translation rows (multi-way; empty for a scored-pair file).
        labels: row id -> class label when the rows are labelled, else None.
        pairs: scored pairs (STS; empty for a translation file).
    """

    name: str
    spec: str
    format: str
    rows: list[MultiWayRow] = field(default_factory=list)
    labels: dict[str, str] | None = None
    pairs: list[ScoredPair] = field(default_factory=list)

    @property
    def languages(self) -> list[str]:
        """Sorted languages present (rows or pairs)."""
        return sorted(self.language_counts())

    def language_counts(self) -> dict[str, int]:
        """Sentences per language."""
        counts: Counter = Counter()
        for row in self.rows:
            counts.update(row.texts.keys())
        for pair in self.pairs:
            counts[pair.lang_a] += 1
            counts[pair.lang_b] += 1
        return dict(sorted(counts.items()))

    @property
    def num_sentences(self) -> int:
        return sum(len(row.texts) for row in self.rows) + 2 * len(self.pairs)

    def describe(self) -> str:
        """One line: what was read."""
        what = f"{len(self.rows)} rows" if self.rows else f"{len(self.pairs)} scored pairs"
        labelled = ", labelled" if self.labels else ""
        counts = ", ".join(f"{lang} {n}" for lang, n in self.language_counts().items())
        return f"{self.spec} ({self.format}): {what}{labelled}, {self.num_sentences} sentences [{counts}]"


def select_languages(data: EvalData, languages: Sequence[str]) -> EvalData:
    """Keep only ``languages``: texts of other languages are removed, rows left with
    fewer than two languages are dropped, pairs need both sides in ``languages``.

    Raises:
        EvalDataError: a requested language has no rows in ``data`` (names it and
            the languages present).
    """
    wanted = set(parse_languages(languages, "--languages") or ())
    present = data.language_counts()
    missing = sorted(wanted - set(present))
    if missing:
        raise EvalDataError(
            f"{data.spec}: --languages {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no rows "
            f"in this data (languages present: {', '.join(present) or 'none'})"
        )
    rows = []
    for row in data.rows:
        texts = {lang: text for lang, text in row.texts.items() if lang in wanted}
        if len(texts) >= 2:
            rows.append(replace(row, texts=texts))
    pairs = [p for p in data.pairs if p.lang_a in wanted and p.lang_b in wanted]
    labels = {r.id: data.labels[r.id] for r in rows} if data.labels is not None else None
    out = replace(data, rows=rows, pairs=pairs, labels=labels)
    left = out.language_counts()
    empty = sorted(wanted - set(left))
    if empty:
        raise EvalDataError(
            f"{data.spec}: --languages {', '.join(empty)}: no row pairs {'it' if len(empty) == 1 else 'them'} "
            f"with another selected language (selected: {', '.join(sorted(wanted))})"
        )
    return out


# --------------------------------------------------------------------------- plain text (align mine)


@dataclass(frozen=True)
class TextLine:
    """One sentence of a monolingual file and its 1-based line number."""

    lineno: int
    text: str


def read_text_file(path: str | os.PathLike, *, keep_empty: bool = False) -> list[TextLine]:
    """Lines of a UTF-8 text file, one sentence per line (``.gz``/``.bz2``/``.xz`` read compressed).

    Line endings and a byte order mark are removed; blank lines are skipped
    unless ``keep_empty`` (aligned files must keep them so line ``i`` stays line ``i``).

    Raises:
        EvalDataError: no such file, or a line that is not UTF-8 (file and line named).
    """
    path = os.fspath(path)
    if not Path(path).is_file():
        raise EvalDataError(f"{path}: no such file")
    return [TextLine(n, text) for n, text in numbered_lines(path) if keep_empty or text.strip()]


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file; an undecodable line is an error naming it."""
    try:
        for lineno, raw in iter_lines(path):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise EvalDataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except CorpusError as exc:
        raise EvalDataError(str(exc)) from None
    except OSError as exc:  # a corrupt .gz / .xz, a permission error
        raise EvalDataError(f"{path}: cannot read: {exc}") from None
