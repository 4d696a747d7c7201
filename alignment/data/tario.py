"""Streaming reader of uncompressed tar archives: ``(name, bytes)`` of each regular member.

Python's ``tarfile`` (what WebDataset's ``tar_file_iterator`` runs) builds a
``TarInfo`` per member, re-parses every header field and keeps a member list;
for shards of small JSON samples that costs more than the samples themselves
(about a third of the training stream's time on a tiny model, measured with
``benchmarks/train_throughput.py`` under cProfile). This reader takes from each
512-byte header only what a sample stream needs: name, size, type, checksum.

It reads the formats ``tarfile`` writes and GNU/BSD tar produce: ustar (name
prefix field included), GNU long names (``L``) and base-256 sizes, pax extended
headers (``x``: ``path`` and ``size`` override the next header; ``g`` global
headers are skipped). Non-regular members (directories, links, devices) are
skipped. Damage raises ``tarfile.ReadError`` naming the archive and what is wrong
(a truncated header or member, a bad checksum, a malformed number), where the
stream reader of ``tarfile`` ends silently at a damaged header; members before the
damage have been yielded. Compressed archives are not read here
(:func:`compressed`): :func:`iter_json_samples`, what every reader of shard samples
calls, hands those to ``tarfile``.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular, contiguous file
_HEADER_ONLY = (b"L", b"x", b"g", b"K")  # headers that describe the next member or the archive
_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def compressed(head: bytes) -> bool:
    """Whether an archive starting with ``head`` (its first 6 bytes or more) is gzip, bzip2 or xz compressed."""
    return head.startswith(_MAGIC)


def _number(field: bytes, what: str, path: str) -> int:
    """An octal header number, or GNU base-256 (first byte 0x80 / 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"{path}: malformed tar header ({what} {text[:16]!r} is not a number)") from None


def _pax(data: bytes, path: str) -> dict[str, str]:
    """``key=value`` records of a pax extended header (``"%d %s=%s\\n"``, length first)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        if space < 0 or length <= space - pos or pos + length > len(data):  # also: no progress would loop
            raise tarfile.ReadError(f"{path}: malformed pax header record at byte {pos}")
        record = data[space + 1:pos + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar(fh: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular member of the uncompressed tar stream ``fh``, in archive order.

    ``path`` only names the archive in errors. Raises ``tarfile.ReadError`` on
    damage (after yielding the members before it); ends at the first all-zero
    header block (the end-of-archive marker) or cleanly at end of file.
    """
    read = fh.read
    long_name: str | None = None
    pax: dict[str, str] = {}
    first = True
    while True:
        header = read(BLOCK)
        if not header and first:
            raise tarfile.ReadError(f"{path}: empty file")
        if not header:
            return  # no end-of-archive blocks: tarfile accepts that too
        first = False
        if len(header) < BLOCK:
            raise tarfile.ReadError(f"{path}: truncated tar header ({len(header)} of {BLOCK} bytes)")
        if header == bytes(BLOCK):
            return  # the end-of-archive blocks
        stored = _number(header[148:156], "checksum", path)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as 8 spaces
            raise tarfile.ReadError(f"{path}: bad tar header checksum (not a tar, or damaged)")
        size = _number(header[124:136], "size", path)
        kind = header[156:157]
        if "size" in pax and kind not in _HEADER_ONLY:
            if not pax["size"].isdigit():
                raise tarfile.ReadError(f"{path}: malformed pax size {pax['size'][:16]!r}")
            size = int(pax["size"])
        if size < 0:
            raise tarfile.ReadError(f"{path}: negative member size")
        data = read(size)
        if len(data) < size:
            raise tarfile.ReadError(f"{path}: truncated member ({len(data)} of {size} bytes)")
        read(-size % BLOCK)  # the member's zero padding (a short read here loses no data)
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax header of the next member
            pax = _pax(data, path)
            continue
        if kind in (b"g", b"K"):  # pax global header; GNU long link name
            continue
        if kind in _REGULAR:
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar" and header[345:346] != b"\0":
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    name = f"{prefix}/{name}"
            yield name, data
        long_name, pax = None, {}


_WDS_META = re.compile(r"__[^/]*__($|/)")
"""Member names WebDataset skips as metadata (its ``tar_file_iterator``'s ``skip_meta``)."""


def iter_json_samples(fh: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """``(sample key, JSON payload)`` of every ``<key>.json`` member of a shard, by WebDataset's rules (metadata
    names skipped): :func:`iter_tar` for a plain tar, tarfile's stream reader (through WebDataset) for a
    gzip/bzip2/xz-compressed one. ``fh`` must be buffered (``peek``). The training stream, ``align shards
    tokenize``, ``mine-negatives``, ``embed-teacher`` and ``shards verify`` all read samples through it, so they
    agree on which samples a shard holds and in which order."""
    if compressed(fh.peek(8)[:8]):
        from webdataset.tariterators import tar_file_iterator

        members = ((m["fname"], m["data"]) for m in tar_file_iterator(fh, skip_meta=None))
    else:
        members = iter_tar(fh, path)
    for name, data in members:
        if name.endswith(".json") and not _WDS_META.match(name):
            yield name[: -len(".json")], data
