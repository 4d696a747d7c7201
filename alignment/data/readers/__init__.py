"""Corpus readers, one module per input format, and :func:`read_corpus`, the one entry point.

Every reader yields :class:`~alignment.data.rows.MultiWayRow` objects and never
holds a whole corpus in memory (the gettext reader holds the catalogs' table,
which is catalog-sized; the pair join holds one hash bucket at a time).
Readers (all take a :class:`~alignment.data.cleaning.CleaningReport` that counts what they drop):

==============================================  ====================================================
:func:`~.jsonl_tsv.read_jsonl`                  ``{"id": .., "en": .., "de": ..}`` or ``{"id": .., "texts": {..}}``
:func:`~.jsonl_tsv.read_tsv`                    header row of language codes, optional ``id`` column
:func:`~.aligned.read_aligned`                  one file per language, aligned lines (``corpus.en``, ``corpus.de``)
:func:`~.pairs.read_pairs`                      pivot-X bitexts (TSV or file pairs) joined on the pivot text
:func:`~.gettext.read_gettext`                  ``.po`` / ``.mo`` catalogs keyed on the English msgid
==============================================  ====================================================

Every reader decodes bytes itself, line by line (:mod:`.lines`). Rows carry
``file:line`` in :attr:`MultiWayRow.source`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignment.data.cleaning import CleaningReport
from alignment.data.readers.aligned import read_aligned
from alignment.data.readers.gettext import read_gettext
from alignment.data.readers.jsonl_tsv import read_jsonl, read_tsv
from alignment.data.readers.pairs import read_pairs
from alignment.data.rows import MultiWayRow
from alignment.languages import DEFAULT_PIVOT

FORMATS = ("jsonl", "tsv", "aligned", "pairs", "gettext")
"""Input formats understood by :func:`read_corpus` (``align shards build --format``)."""


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
    """Installed Python packages to read gettext catalogs from (``--from_package django wagtail``)."""
    catalogs: str = "auto"
    """Which gettext files to read (``--catalogs``): po, mo, or auto (.po, else the .mo)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        self.inputs = [str(i) for i in self.inputs]
        self.packages = list(self.packages)
        if self.packages and self.format != "gettext":
            raise ValueError(f"--from_package applies only to --format gettext, got --format {self.format}")
        if self.catalogs not in ("auto", "po", "mo"):
            raise ValueError(f"--catalogs must be auto, po or mo, got {self.catalogs!r}")
        if not self.inputs and not self.packages:
            hint = " or --from_package NAME" if self.format == "gettext" else ""
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
