"""Spill buckets: bounded-memory partitioning through files on disk.

Shared by the pair join (:mod:`alignment.data.readers.pairs`) and the shard
build's external shuffle (:mod:`alignment.data.build`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path


class SpillBuckets:
    """Append lines to ``n`` bucket files, buffered in memory up to ``buffer_bytes``.

    The partition step of every bounded-memory algorithm here (pivot join,
    external shuffle): rows go to ``bucket = f(key)``, then each bucket is read
    back and processed alone, so memory is one bucket plus the write buffer.
    Buffers are flushed by appending to the bucket's file and closing it, so
    only one file is open at a time whatever ``n`` is (no ``ulimit -n`` hazard).
    Lines keep their append order within a bucket.
    """

    def __init__(self, directory: str | os.PathLike, n: int, *, buffer_bytes: int = 32 << 20) -> None:
        if n < 1:
            raise ValueError(f"bucket count must be >= 1, got {n}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.n = n
        self.buffer_bytes = buffer_bytes
        self._buffers: dict[int, list[bytes]] = defaultdict(list)
        self._buffered = 0
        self.lines_written = 0

    def path(self, bucket: int) -> Path:
        return self.directory / f"bucket-{bucket:05d}.jsonl"

    def append(self, bucket: int, line: bytes) -> None:
        self._buffers[bucket].append(line)
        self._buffered += len(line) + 1
        self.lines_written += 1
        if self._buffered >= self.buffer_bytes:
            self.flush()

    def flush(self) -> None:
        for bucket in sorted(self._buffers):
            with open(self.path(bucket), "ab") as fh:
                fh.write(b"\n".join(self._buffers[bucket]) + b"\n")
        self._buffers.clear()
        self._buffered = 0

    def read(self, bucket: int) -> Iterator[bytes]:
        """The lines of one bucket, in append order (call :meth:`flush` first)."""
        path = self.path(bucket)
        if not path.exists():
            return
        with open(path, "rb") as fh:
            for line in fh:
                yield line.rstrip(b"\n")


def buckets_for(total_bytes: int, bucket_bytes: int = 64 << 20, *, max_buckets: int = 8192) -> int:
    """How many spill buckets keep one bucket near ``bucket_bytes`` of input."""
    return max(1, min(max_buckets, -(-int(total_bytes) // bucket_bytes)))


def bucket_of(hash64: int, n: int) -> int:
    """``floor(u * n)`` for ``u = hash64 / 2**64``: buckets are ordered ranges of the hash."""
    return (hash64 * n) >> 64
