"""Writing shards: the build's sizes and splits (:class:`ShardBuildConfig`, :class:`SplitSpec`) and the tar writer.

One tar member per row: ``<key>.json`` holding ``MultiWayRow.to_json()``
(``{"id", "pivot", "texts"}``, UTF-8). WebDataset cuts the key at the first
dot of the member name, so the key is the row id restricted to
``[A-Za-z0-9_-]`` (plus a 16-hex hash of the id when that changed it, or when
the id repeats in the input); the original id stays inside the JSON. A split's
shards are ``<out>/<split>/<prefix>-000000.tar ...`` (a split with zero rows
has no shards); :mod:`alignment.data.build` drives the writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignment import fsutil
from alignment.data.cleaning import CleaningConfig
from alignment.data.rows import MultiWayRow, short_hash

SPLITS = ("train", "validation", "test")
TAR_BLOCK = tarfile.BLOCKSIZE  # 512
TAR_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads a closed archive to a multiple of this
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_MAX = 64
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def parse_size(text: str | int, flag: str = "--bytes_per_shard") -> int:
    """``"256MB"`` -> 256000000, ``"1GiB"`` -> 1073741824, ``"500k"`` -> 500000, ``4096`` -> 4096."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{flag} must be a size like 256MB, 1GiB or 500000, got {text!r}")
    number, unit = match.groups()
    unit = unit.lower().rstrip("b")
    return int(float(number) * _UNITS[unit])


@dataclass(frozen=True)
class SplitSpec:
    """Train / validation / test sizes: fractions, or row counts for validation and test.

    ``"0.9,0.05,0.05"`` (fractions summing to 1) assigns by thresholds on a
    seeded hash of the pivot text: stable when the corpus grows.
    ``"rest,1000,1000"`` takes the 1000 + 1000 pivot texts with the smallest
    hashes for validation and test (a few more when case variants of one
    sentence must stay together) and the rest for train.
    """

    kind: str
    """``"fractions"`` or ``"counts"``."""
    values: tuple[float, float, float]
    """(train, validation, test); for counts train is ``inf`` ("rest")."""

    @classmethod
    def parse(cls, text: "str | SplitSpec", flag: str = "--split") -> "SplitSpec":
        if isinstance(text, SplitSpec):
            return text
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 3:
            raise ValueError(
                f"{flag} needs three values train,validation,test (e.g. 0.9,0.05,0.05 or rest,500,500), got {text!r}"
            )
        try:
            if parts[0].lower() == "rest":
                val, test = int(parts[1]), int(parts[2])
                if val < 0 or test < 0:
                    raise ValueError
                return cls("counts", (math.inf, float(val), float(test)))
            fractions = tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"{flag} must be fractions like 0.9,0.05,0.05 or counts like rest,500,500, got {text!r}"
            ) from None
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"{flag} fractions must be >= 0 and sum to 1, got {text!r} (sum {sum(fractions):g})")
        return cls("fractions", fractions)  # type: ignore[arg-type]

    def __str__(self) -> str:
        if self.kind == "counts":
            return f"rest,{int(self.values[1])},{int(self.values[2])}"
        return ",".join(f"{v:g}" for v in self.values)


@dataclass
class ShardBuildConfig:
    """Everything ``align shards build`` decides besides the input; the CLI fills it from flags."""

    out: Path
    """Output directory (``--out``): built beside it and renamed into place at the end."""
    prefix: str = "corpus"
    """Shard file prefix (``--prefix``): ``<prefix>-000000.tar``."""
    rows_per_shard: int | None = None
    """Close a shard after this many rows (``--rows_per_shard``); unset: no row limit."""
    bytes_per_shard: int | str | None = "256MB"
    """Close a shard before it would exceed this size (``--bytes_per_shard 256MB``); a single
    larger sample gets a shard of its own."""
    split: SplitSpec | str = "0.9,0.05,0.05"
    """Split sizes (``--split``): fractions ``0.9,0.05,0.05`` or counts ``rest,500,500``, by pivot text."""
    seed: int = 0
    """Seed of the split assignment and of the shuffle (``--seed``): same seed, same bytes."""
    overwrite: bool = False
    """Replace an existing non-empty ``--out`` (``--overwrite``), only after the new build succeeded."""
    shuffle_buckets: int | None = None
    """Spill buckets of the external shuffle (``--shuffle_buckets``), i.e. memory ~ input / N;
    unset: one per 64 MiB of input files (64 when the input cannot be sized)."""
    tmp_dir: Path | None = None
    """Where the pair join spills its buckets (``--tmp_dir``); unset: the system temp dir.
    The shuffle's buckets always live in the build directory beside ``--out``."""
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    """The cleaning applied before sharding."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.tmp_dir is not None:
            self.tmp_dir = Path(self.tmp_dir)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise ValueError(f"--prefix must be letters, digits, '_' or '-' (no dots), got {self.prefix!r}")
        if self.rows_per_shard is not None and self.rows_per_shard < 1:
            raise ValueError(f"--rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.bytes_per_shard is not None:
            self.bytes_per_shard = parse_size(self.bytes_per_shard)
            if self.bytes_per_shard < 2 * TAR_RECORD:
                raise ValueError(
                    f"--bytes_per_shard must be >= {2 * TAR_RECORD} (two tar records), got {self.bytes_per_shard}"
                )
        self.split = SplitSpec.parse(self.split)
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.shuffle_buckets is not None and self.shuffle_buckets < 1:
            raise ValueError(f"--shuffle_buckets must be >= 1, got {self.shuffle_buckets}")


# ---------------------------------------------------------------------------
# Sample keys and tar writing
# ---------------------------------------------------------------------------


def sample_key(row_id: str, occurrence: int | None = None) -> str:
    """The tar member key for a row id: ``[A-Za-z0-9_-]``, at most 81 characters.

    A clean id is its own key; otherwise (dots, slashes, spaces, too long) the
    sanitised id gets ``-<16 hex of the id>``. ``occurrence`` (for ids that
    repeat within a build) is hashed in too, which keeps keys unique.
    """
    clean = _KEY_SAFE.sub("_", row_id).strip("_")[:_KEY_MAX] or "row"
    if clean == row_id and occurrence is None:
        return clean
    return f"{clean}-{short_hash('key', row_id, occurrence)}"


def encode_sample(row: MultiWayRow) -> bytes:
    """The member payload: ``MultiWayRow.to_json()`` as UTF-8 JSON with sorted keys (deterministic bytes)."""
    return json.dumps(row.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8")


def _tar_member_bytes(payload_size: int) -> int:
    """Bytes a member takes in a ustar archive: one header block plus the data padded to blocks."""
    return TAR_BLOCK + -(-payload_size // TAR_BLOCK) * TAR_BLOCK


def _tar_closed_size(data_bytes: int) -> int:
    """Size of the archive after close: two zero blocks, padded to a full record."""
    return -(-(data_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file ``name`` (ASCII, <= 100 bytes) of ``size`` bytes.

    Byte-identical to ``tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT)`` with
    ``size``, ``mode=0o644`` and ``mtime=0`` (a test pins that), but about 10x
    cheaper: ``tarfile.addfile`` copies and re-validates every ``TarInfo`` and
    was half of the build time at 100k rows. Fixed metadata (mtime 0, uid 0)
    makes shards byte-reproducible.
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(TAR_BLOCK)
    header[0 : len(raw)] = raw
    header[100:148] = b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"  # mode uid gid size mtime
    header[148:156] = b"        "  # the checksum is computed with its own field as spaces
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class _Shard:
    """One tar being written under a temporary name; :meth:`finish` publishes it (:class:`fsutil.AtomicFile`).

    Writes the ustar stream itself (header, payload, NUL padding per member;
    two zero blocks and padding to a 10240-byte record at the end, as
    ``tarfile`` does) and hashes it on the way, so no second read is needed.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self._out = fsutil.AtomicFile(final)
        self.file = self._out.file
        self.sha256 = hashlib.sha256()
        self.rows = 0
        self.data_bytes = 0

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.data_bytes += len(data)

    def add(self, key: str, payload: bytes) -> None:
        self._write(ustar_header(f"{key}.json", len(payload)))
        self._write(payload + bytes(-len(payload) % TAR_BLOCK))
        self.rows += 1

    def finish(self) -> dict:
        end = 2 * TAR_BLOCK
        self._write(bytes(end + (-(self.data_bytes + end) % TAR_RECORD)))
        self._out.commit()  # atomic: a final name always holds a complete shard
        return {"rows": self.rows, "bytes": self.data_bytes, "sha256": self.sha256.hexdigest()}

    def abort(self) -> None:
        """Drop the unfinished shard (its temporary file)."""
        self._out.abort()


class SplitWriter:
    """Appends samples to ``<directory>/<prefix>-NNNNNN.tar`` shards of one split.

    A shard is closed when it has ``max_rows`` rows, or before a sample would
    take it over ``max_bytes`` (its exact closed tar size; a lone sample larger
    than that still gets a shard of its own). The directory is created with the
    first shard, so a split without rows has neither.
    """

    def __init__(self, root: Path, split: str, prefix: str, *, max_rows: int | None, max_bytes: int | None) -> None:
        self.root = root
        self.split = split
        self.prefix = prefix
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.shards: list[dict] = []
        self.languages: Counter = Counter()
        self.provenance: Counter = Counter()  # (language, origin, model) of texts from `align translate`
        self._open: _Shard | None = None

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards) + (self._open.rows if self._open else 0)

    def _fits(self, shard: _Shard, payload_size: int) -> bool:
        if shard.rows == 0:
            return True
        if self.max_rows is not None and shard.rows >= self.max_rows:
            return False
        if self.max_bytes is not None:
            return _tar_closed_size(shard.data_bytes + _tar_member_bytes(payload_size)) <= self.max_bytes
        return True

    def write(self, key: str, row: MultiWayRow) -> None:
        payload = encode_sample(row)
        if self._open is not None and not self._fits(self._open, len(payload)):
            self._finish()
        if self._open is None:
            directory = self.root / self.split
            directory.mkdir(parents=True, exist_ok=True)
            self._open = _Shard(directory / f"{self.prefix}-{len(self.shards):06d}.tar")
        self._open.add(key, payload)
        self.languages.update(row.texts.keys())
        for lang, p in (row.provenance or {}).items():
            if lang in row.texts:
                self.provenance[(lang, str(p.get("origin", "unknown")), str(p.get("model", "")))] += 1

    def _finish(self) -> None:
        assert self._open is not None
        record = self._open.finish()
        self.shards.append({"path": f"{self.split}/{self._open.final.name}", **record})
        self._open = None

    def abort(self) -> None:
        """Drop the open shard, if any (a failed build); the finished ones stay where they are."""
        if self._open is not None:
            self._open.abort()
            self._open = None

    def close(self) -> dict:
        """Finish the open shard; the split's manifest entry."""
        if self._open is not None:
            self._finish()
        entry = {
            "rows": sum(s["rows"] for s in self.shards),
            "languages": dict(sorted(self.languages.items())),
            "shards": self.shards,
        }
        if self.provenance:  # texts per language by origin (original / synthetic by model), only when recorded
            entry["provenance"] = provenance_summary(self.provenance)
        return entry


def provenance_summary(counts: Counter) -> dict:
    """``{(lang, origin, model): n}`` -> ``{lang: {"original": n, "synthetic": {model: n}}}``."""
    out: dict[str, dict] = {}
    for (lang, origin, model), n in sorted(counts.items()):
        entry = out.setdefault(lang, {})
        if origin == "synthetic":
            entry.setdefault("synthetic", {})[model or "unknown"] = n
        else:
            entry[origin] = entry.get(origin, 0) + n
    return out
