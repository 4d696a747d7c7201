"""Bytes -> lines: every reader decodes itself, one line at a time, in bounded memory.

Inputs ending in ``.gz``, ``.bz2`` or ``.xz`` are decompressed on the fly. A line
(or field) that is not valid UTF-8 is one counted ``invalid_utf8`` drop naming
``file:line`` (:func:`decode_text`), never a crash of the whole read.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from alignment.data.cleaning import CleaningReport
from alignment.data.rows import CorpusError
from alignment.languages import LanguageCodeError, normalize_language

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_BOM = b"\xef\xbb\xbf"


def _open_binary(path: Path) -> BinaryIO:
    opener = _OPENERS.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")  # type: ignore[return-value]


def plain_name(path: Path) -> str:
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


def decode_text(
    raw: bytes, report: CleaningReport, source: str, *, language: str | None = None, level: str = "text"
) -> str | None:
    """UTF-8 decode one line or field; invalid bytes are a counted drop, not a crash."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.drop("invalid_utf8", source, language=language, level=level, detail=f"{exc.reason} at byte {exc.start}")
        return None


def language_or_error(code: str, where: str, what: str) -> str:
    """The canonical code, or a :class:`CorpusError` naming ``where`` and ``what`` the code is."""
    try:
        return normalize_language(code)
    except LanguageCodeError as exc:
        raise CorpusError(f"{where}: {what} {code!r} is not a language code ({exc})") from exc
