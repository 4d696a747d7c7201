"""WebDataset shards of multi-way rows: build, resolve, inspect, verify.

A build turns a stream of :class:`~alignment.data.corpus.MultiWayRow` into::

    DIR/manifest.json
    DIR/cleaning_report.json
    DIR/train/<prefix>-000000.tar ...
    DIR/validation/<prefix>-000000.tar ...
    DIR/test/<prefix>-000000.tar ...        (a split with zero rows has no shards)

One tar member per row: ``<key>.json`` holding ``MultiWayRow.to_json()``
(``{"id", "pivot", "texts"}``, UTF-8). WebDataset cuts the key at the first
dot of the member name, so the key is the row id restricted to
``[A-Za-z0-9_-]`` (plus a 16-hex hash of the id when that changed it, or when
the id repeats in the input); the original id stays inside the JSON.

How a build works, and what it costs (:func:`build_shards`):

1. **Partition** (streaming): rows pass :func:`~alignment.data.corpus.check_rows`,
   then go to one of ``B`` spill bucket files chosen by
   ``u = hash(seed, split_key(pivot text))`` (``bucket = floor(u * B)``).
   Rows with the same pivot text, and its case variants, share ``u`` and so a
   bucket. Memory: 32 MiB of write buffers plus 8 bytes per row (a hash of
   each row id, to make sample keys unique); disk: about the cleaned corpus.
2. **Split, dedup, shuffle, write** (one bucket at a time, in ``u`` order):
   duplicates are dropped within the bucket; each row's split follows from
   ``u`` (fractions: ``[0, f_val)`` validation, ``[f_val, f_val + f_test)``
   test, the rest train; counts: the first rows in ``u`` order); the rows of
   each split are shuffled with a seeded RNG and appended to that split's
   shards. Memory: one bucket (about input / ``B``, times ~4 in Python).

Because ``u`` is a seeded pseudo-random function of the pivot text, the
bucket-major order is a uniform shuffle (the classic two-pass external
shuffle), a given English sentence lands in exactly one split, and the same
seed gives byte-identical shards. Shards are written under a temporary name
and renamed when complete, inside a temporary sibling of ``DIR`` that is
renamed into place only when everything succeeded; a failed build leaves
no trace under the final names and never touches an existing ``DIR``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import tarfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from alignment.data.corpus import (
    CleaningConfig,
    CleaningReport,
    CorpusError,
    MultiWayRow,
    SpillBuckets,
    bucket_of,
    buckets_for,
    check_rows,
    drop_duplicates,
    format_cleaning_report,
    input_paths,
    row_split_key,
    short_hash,
    stable_hash64,
)
from alignment.progress import progress
from alignment.staging import building_dir, check_replaceable, clean_stale, inside_folder, replace_dir

MANIFEST_FORMAT = "multiway-align/shards/v1"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "cleaning_report.json"
SPLITS = ("train", "validation", "test")
TAR_BLOCK = tarfile.BLOCKSIZE  # 512
TAR_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads a closed archive to a multiple of this
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_MAX = 64
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ManifestError(ValueError):
    """A manifest that is missing, not JSON, or not a v1 shard manifest (names the file)."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def parse_size(text: str | int, flag: str = "--bytes-per-shard") -> int:
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
    """Close a shard after this many rows (``--rows-per-shard``); unset: no row limit."""
    bytes_per_shard: int | str | None = "256MB"
    """Close a shard before it would exceed this size (``--bytes-per-shard 256MB``); a single
    larger sample gets a shard of its own."""
    split: SplitSpec | str = "0.9,0.05,0.05"
    """Split sizes (``--split``): fractions ``0.9,0.05,0.05`` or counts ``rest,500,500``, by pivot text."""
    seed: int = 0
    """Seed of the split assignment and of the shuffle (``--seed``): same seed, same bytes."""
    overwrite: bool = False
    """Replace an existing non-empty ``--out`` (``--overwrite``), only after the new build succeeded."""
    shuffle_buckets: int | None = None
    """Spill buckets of the external shuffle (``--shuffle-buckets``), i.e. memory ~ input / N;
    unset: one per 64 MiB of input files (64 when the input cannot be sized)."""
    tmp_dir: Path | None = None
    """Where the pair join spills its buckets (``--tmp-dir``); unset: the system temp dir.
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
            raise ValueError(f"--rows-per-shard must be >= 1, got {self.rows_per_shard}")
        if self.bytes_per_shard is not None:
            self.bytes_per_shard = parse_size(self.bytes_per_shard)
            if self.bytes_per_shard < 2 * TAR_RECORD:
                raise ValueError(
                    f"--bytes-per-shard must be >= {2 * TAR_RECORD} (two tar records), got {self.bytes_per_shard}"
                )
        self.split = SplitSpec.parse(self.split)
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.shuffle_buckets is not None and self.shuffle_buckets < 1:
            raise ValueError(f"--shuffle-buckets must be >= 1, got {self.shuffle_buckets}")


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
    """One tar being written under a temporary name; :meth:`finish` renames it into place.

    Writes the ustar stream itself (header, payload, NUL padding per member;
    two zero blocks and padding to a 10240-byte record at the end, as
    ``tarfile`` does) and hashes it on the way, so no second read is needed.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.partial = final.with_name(f".{final.name}.partial")
        self.file = open(self.partial, "wb")
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
        self.file.close()
        os.replace(self.partial, self.final)  # atomic: a final name always holds a complete shard
        return {"rows": self.rows, "bytes": self.data_bytes, "sha256": self.sha256.hexdigest()}


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


# ---------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------


def _split_unit(seed: int, key: str) -> int:
    """The 64-bit hash ``u`` that orders buckets and decides splits."""
    return stable_hash64("split", seed, key)


class _Spilled(NamedTuple):
    """A checked row in a spill bucket, with the hashes computed once in pass 1."""

    u: int
    id_hash: int
    row: MultiWayRow


def _partition(
    rows: Iterable[MultiWayRow], config: ShardBuildConfig, report: CleaningReport, spill: SpillBuckets
) -> array:
    """Pass 1: checked rows -> spill buckets by ``u``; returns the 64-bit hashes of all row ids."""
    id_hashes = array("Q")  # 8 bytes per row: the price of unique sample keys
    for row in progress(check_rows(rows, config.cleaning, report), "shards: reading rows", unit="row"):
        u = _split_unit(config.seed, row_split_key(row))
        id_hash = stable_hash64("id", row.id)
        line = json.dumps([u, id_hash, row.id, row.source, row.texts, *([row.provenance] if row.provenance else [])],
                          ensure_ascii=False)
        spill.append(bucket_of(u, spill.n), line.encode("utf-8"))
        id_hashes.append(id_hash)
    spill.flush()
    return id_hashes


def _repeated(hashes: array) -> set[int]:
    """Values that occur more than once (sorting a copy: 8 more bytes per row, briefly)."""
    values = np.sort(np.frombuffer(hashes, dtype=np.uint64)) if len(hashes) else np.zeros(0, np.uint64)
    return set(values[1:][values[1:] == values[:-1]].tolist())


def _load_bucket(spill: SpillBuckets, bucket: int, pivot: str) -> list[_Spilled]:
    spilled = []
    for line in spill.read(bucket):
        u, id_hash, row_id, source, texts, *provenance = json.loads(line)
        row = MultiWayRow(id=row_id, texts=texts, pivot=pivot, source=source, provenance=(provenance or [None])[0])
        spilled.append(_Spilled(u, id_hash, row))
    return spilled


def _drop_duplicates(spilled: list[_Spilled], config: ShardBuildConfig, report: CleaningReport) -> list[_Spilled]:
    """:func:`~alignment.data.corpus.drop_duplicates` within one bucket (duplicates always share a bucket)."""
    kept = {id(row) for row in drop_duplicates((s.row for s in spilled), config.cleaning, report)}
    return [s for s in spilled if id(s.row) in kept]


class _SplitAssigner:
    """Decides a row's split from its ``u``, walking rows in increasing ``u`` (bucket order)."""

    def __init__(self, spec: SplitSpec) -> None:
        self.spec = spec
        self.taken = Counter()
        self._last: tuple[int, str] | None = None

    def __call__(self, u: int) -> str:
        _, f_val, f_test = self.spec.values
        if self.spec.kind == "fractions":
            x = u / 2**64
            return "validation" if x < f_val else "test" if x < f_val + f_test else "train"
        if self._last is not None and self._last[0] == u:  # same pivot text: same split
            split = self._last[1]
        elif self.taken["validation"] < f_val:
            split = "validation"
        elif self.taken["test"] < f_test:
            split = "test"
        else:
            split = "train"
        self.taken[split] += 1
        self._last = (u, split)
        return split


def _write_bucket(
    spilled: list[_Spilled],
    bucket: int,
    config: ShardBuildConfig,
    writers: dict[str, SplitWriter],
    assign: _SplitAssigner,
    repeated_ids: set[int],
    occurrences: Counter,
) -> None:
    """Pass 2 for one bucket: split by ``u``, shuffle each split with a seeded RNG, write."""
    by_split: dict[str, list[_Spilled]] = {s: [] for s in SPLITS}
    for item in sorted(spilled, key=lambda s: s.u):  # stable: ties keep input order
        by_split[assign(item.u)].append(item)
    for split, items in by_split.items():
        random.Random(stable_hash64("shuffle", config.seed, split, bucket)).shuffle(items)
        for item in items:
            occurrence = None
            if item.id_hash in repeated_ids:
                occurrence = occurrences[item.id_hash]
                occurrences[item.id_hash] += 1
            writers[split].write(sample_key(item.row.id, occurrence), item.row)


def is_shard_build(folder: Path) -> bool:
    """``folder`` holds a ``manifest.json`` of this project's format (what ``--overwrite`` may replace)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


def _check_out(config: ShardBuildConfig, source: dict | None = None) -> None:
    check_replaceable(config.out, overwrite=config.overwrite, flag="--out", is_ours=is_shard_build,
                      what=f"a shard build (no {MANIFEST_NAME} of format {MANIFEST_FORMAT})",
                      inputs=input_paths((source or {}).get("inputs") or []))


def _manifest(
    config: ShardBuildConfig, report: CleaningReport, splits: dict[str, dict], source: dict | None, n_buckets: int
) -> dict:
    languages: Counter = Counter()
    for entry in splits.values():
        languages.update(entry["languages"])
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pivot": config.cleaning.pivot,
        "seed": config.seed,
        "source": source or {"format": "rows", "inputs": [], "command": None},
        "build": {
            "prefix": config.prefix,
            "rows_per_shard": config.rows_per_shard,
            "bytes_per_shard": config.bytes_per_shard,
            "split": str(config.split),
            "shuffle_buckets": n_buckets,
        },
        "cleaning": report.to_dict(),
        "languages": dict(sorted(languages.items())),
        "splits": splits,
    } | _manifest_provenance(splits)


def _manifest_provenance(splits: dict[str, dict]) -> dict:
    """The whole build's provenance (the splits' summed), when any row recorded one."""
    counts: Counter = Counter()
    for entry in splits.values():
        for lang, origins in entry.get("provenance", {}).items():
            for origin, value in origins.items():
                for model, n in (value.items() if isinstance(value, dict) else [("", value)]):
                    counts[(lang, origin, model)] += n
    return {"provenance": provenance_summary(counts)} if counts else {}


def _bucket_count(config: ShardBuildConfig, size_hint: int | None) -> int:
    return config.shuffle_buckets or (buckets_for(size_hint) if size_hint else 64)


def _build_into(
    staging: Path,
    rows: Iterable[MultiWayRow],
    config: ShardBuildConfig,
    report: CleaningReport,
    source: dict | None,
    size_hint: int | None,
) -> dict:
    n = _bucket_count(config, size_hint)
    spill = SpillBuckets(staging / ".buckets", n)
    repeated_ids = _repeated(_partition(rows, config, report, spill))
    manifest = _write_build(staging, [spill], repeated_ids, config, report, source, consume=True)
    shutil.rmtree(spill.directory, ignore_errors=True)
    return manifest


def _write_build(
    staging: Path,
    spills: Sequence[SpillBuckets],
    repeated_ids: set[int],
    config: ShardBuildConfig,
    report: CleaningReport,
    source: dict | None,
    *,
    consume: bool,
) -> dict:
    """Pass 2 over the buckets of ``spills`` (read in order, bucket by bucket), then the manifest.

    ``consume`` deletes each bucket file once written (frees disk; only for spills this build owns).
    """
    n = spills[0].n
    writers = {
        s: SplitWriter(staging, s, config.prefix, max_rows=config.rows_per_shard, max_bytes=config.bytes_per_shard)  # type: ignore[arg-type]
        for s in SPLITS
    }
    assign, occurrences = _SplitAssigner(config.split), Counter()  # type: ignore[arg-type]
    for bucket in progress(range(n), "shards: writing buckets", total=n, unit="bucket"):
        loaded = [item for spill in spills for item in _load_bucket(spill, bucket, config.cleaning.pivot)]
        spilled = _drop_duplicates(loaded, config, report)
        _write_bucket(spilled, bucket, config, writers, assign, repeated_ids, occurrences)
        if consume:
            for spill in spills:
                spill.path(bucket).unlink(missing_ok=True)  # free disk as we go
    splits = {s: w.close() for s, w in writers.items()}
    if report.rows_kept == 0:
        raise CorpusError(
            f"no rows left after cleaning {' '.join(map(str, (source or {}).get('inputs') or [])) or 'the input'}"
            "; nothing was written.\n"
            + report.format_table()
            + "\nCheck --languages, --min-languages, --max-chars and the input format."
        )
    manifest = _manifest(config, report, splits, source, n)
    report.write(staging / REPORT_NAME)
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def build_shards(
    rows: Iterable[MultiWayRow],
    config: ShardBuildConfig,
    *,
    report: CleaningReport | None = None,
    source: dict | None = None,
    size_hint: int | None = None,
) -> dict:
    """Clean, split, shuffle and write ``rows`` as WebDataset shards under ``config.out``.

    Args:
        rows: any row stream (a reader from :mod:`alignment.data.corpus`); read once.
        config: output, sizing, split, seed, cleaning.
        report: the report the reader already counts into (pass the same one, so
            reader drops and cleaning drops land in one report); created from
            ``config.cleaning`` when None.
        source: the manifest's ``source`` (``format``, ``inputs``, ``command``).
        size_hint: input bytes, to choose one spill bucket per 64 MiB when
            ``config.shuffle_buckets`` is None (64 buckets without a hint).

    Returns:
        The manifest (also written to ``<out>/manifest.json``).

    Raises:
        FileExistsError: ``out`` is non-empty and ``overwrite`` is off (checked
            before reading anything).
        CorpusError: no row survived cleaning, or a strict-mode drop.
        Any error of ``rows``: the build directory is removed and ``out`` is
        left exactly as it was.
    """
    report = report if report is not None else CleaningReport(config.cleaning)
    _check_out(config, source)
    clean_stale(config.out)  # what a killed build of the same --out left
    with building_dir(config.out) as staging:
        manifest = _build_into(staging, rows, config, report, source, size_hint)
        replace_dir(staging, config.out)
    return manifest


# ---------------------------------------------------------------------------
# Parallel builds: pass 1 in many processes (array job tasks), pass 2 in one
# ---------------------------------------------------------------------------

PART_FORMAT = "multiway-align/shards-part/v1"
PART_META = "part.json"
PART_IDS = "ids.u64"
PARTS_SUFFIX = ".parts"
SPLITTABLE_FORMATS = ("jsonl", "tsv")
"""Formats whose inputs are independent files (``aligned``, ``pairs`` and ``gettext`` join rows across files)."""


@dataclass(frozen=True)
class PartSpec:
    """Task ``index`` of ``count`` in a parallel build (``--part I/N``, e.g. ``$SLURM_ARRAY_TASK_ID/N``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: "str | PartSpec", flag: str = "--part") -> "PartSpec":
        if isinstance(text, PartSpec):
            return text
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
            raise ValueError(f"{flag} must be I/N with 0 <= I < N (e.g. $SLURM_ARRAY_TASK_ID/8), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def inputs(self, inputs: Sequence[str]) -> list[str]:
        """This task's contiguous slice of the inputs, in order (possibly empty when there are fewer than N)."""
        n = len(inputs)
        return list(inputs[self.index * n // self.count : (self.index + 1) * n // self.count])

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"


def parts_dir(out: str | os.PathLike) -> Path:
    """Where the tasks of a parallel build of ``out`` leave their parts: ``<out>.parts``."""
    out = Path(out)
    return out.with_name(out.name + PARTS_SUFFIX)


def _settings(config: ShardBuildConfig) -> dict:
    """Everything of a build config but ``out``, as JSON: a part records it, the merge rebuilds it."""
    cleaning = asdict(config.cleaning)
    cleaning["languages"] = list(cleaning["languages"]) if cleaning["languages"] else None
    return {
        "prefix": config.prefix,
        "rows_per_shard": config.rows_per_shard,
        "bytes_per_shard": config.bytes_per_shard,
        "split": str(config.split),
        "seed": config.seed,
        "overwrite": config.overwrite,
        "shuffle_buckets": config.shuffle_buckets,
        "cleaning": cleaning,
    }


def build_part(
    rows: Iterable[MultiWayRow],
    config: ShardBuildConfig,
    part: PartSpec,
    *,
    report: CleaningReport | None = None,
    source: dict | None = None,
    size_hint: int | None = None,
) -> Path:
    """Pass 1 of :func:`build_shards` for one task of a parallel build; :func:`merge_parts` does pass 2.

    ``rows`` are this task's rows (its :meth:`PartSpec.inputs`, read in order);
    ``source`` and ``size_hint`` describe the *whole* build (all inputs), so
    every task picks the same number of spill buckets. The rows are cleaned
    (reader and per-row drops go into the part's report) and partitioned into
    buckets by the seeded hash of their pivot text, exactly as a single
    process would. Written to ``<out>.parts/part-I-of-N`` under a temporary
    name and renamed when complete; a rerun of the same task replaces it.

    Returns the part folder.
    """
    report = report if report is not None else CleaningReport(config.cleaning)
    _check_out(config, source)  # fail in the tasks, not only in the merge
    root = parts_dir(config.out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / part.name
    clean_stale(final)  # what a killed run of this task left
    with building_dir(final) as staging:
        spill = SpillBuckets(staging / "buckets", _bucket_count(config, size_hint))
        ids = _partition(rows, config, report, spill)
        (staging / PART_IDS).write_bytes(ids.tobytes())
        meta = {
            "format": PART_FORMAT,
            "part": part.index,
            "parts": part.count,
            "buckets": spill.n,
            "rows": len(ids),
            "source": source or {"format": "rows", "inputs": [], "command": None},
            "settings": _settings(config),
            "report": report.to_dict(),
        }
        (staging / PART_META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    return final


def _merged_report(cleaning: CleaningConfig, parts: Sequence[dict]) -> CleaningReport:
    """One report from the parts' pass-1 reports, as a single process would have counted them.

    Parts are contiguous slices of the inputs, so their examples, concatenated
    in part order and cut at ``max_examples``, are the single run's examples.
    """
    report = CleaningReport(cleaning)
    for meta in parts:
        d = meta["report"]
        for level, key in (("row", "rows"), ("text", "texts"), ("file", "files")):
            report.dropped[level].update(d[key]["dropped"])
        for lang, entry in d["languages"].items():
            report.dropped_by_language[lang].update(entry["dropped"])
        report.skipped_locales.update(d["skipped_locales"])
        report.counts.update(d["counts"])
        for reason, examples in d["examples"].items():
            kept = report.examples[reason]
            kept.extend(examples[: max(0, report.max_examples - len(kept))])
    return report


def _load_parts(root: Path) -> list[tuple[Path, dict]]:
    """The parts under ``root``, checked: one build, every task of it present and complete."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root}: no parts of a parallel build; run `align shards build ... --part I/N` for every I first"
        )
    found = []
    for path in sorted(root.glob("part-*-of-*")):
        meta_file = path / PART_META
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{meta_file}: unreadable part metadata ({exc}); rerun that task") from exc
        if meta.get("format") != PART_FORMAT:
            raise ManifestError(f"{meta_file}: format {meta.get('format')!r}, expected {PART_FORMAT!r}")
        found.append((path, meta))
    if not found:
        raise FileNotFoundError(f"{root}: no part-I-of-N folders; run the build tasks (--part I/N) first")
    counts = {meta["parts"] for _, meta in found}
    if len(counts) != 1:
        raise ManifestError(
            f"{root}: parts of different builds (of {sorted(counts)} tasks); remove the stale ones and rerun"
        )
    count = counts.pop()
    missing = sorted(set(range(count)) - {meta["part"] for _, meta in found})
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} of {count} parts missing (tasks {', '.join(map(str, missing[:10]))}"
            f"{' ...' if len(missing) > 10 else ''}); rerun those tasks, then merge"
        )
    reference = found[0][1]
    for path, meta in found[1:]:
        for key in ("buckets", "source", "settings"):
            if meta[key] != reference[key]:
                raise ManifestError(
                    f"{path}: its {key} differs from {found[0][0].name}'s: the tasks ran different builds "
                    f"({meta[key]!r} vs {reference[key]!r}); rerun every task with the same flags"
                )
    return found


def merge_parts(out: str | os.PathLike) -> dict:
    """Pass 2 of a parallel build: the parts under ``<out>.parts`` -> shards and manifest in ``out``.

    Reads every part's buckets in task order, bucket by bucket, so duplicates
    across tasks are dropped and the splits, shuffles, shards and manifest are
    those of one ``align shards build`` over all inputs with the same flags
    (byte for byte; the manifest differs only in ``created``). Written beside
    ``out`` and renamed into place when complete; the parts are deleted only
    then. Memory: one bucket of every part at a time.

    Raises:
        FileNotFoundError: no parts, or some task's part is missing.
        ManifestError: parts of different builds or settings.
        FileExistsError: ``out`` exists and the build did not ask for ``--overwrite``.
    """
    out = Path(out)
    root = parts_dir(out)
    found = _load_parts(root)
    meta = found[0][1]
    settings = dict(meta["settings"])
    cleaning = CleaningConfig(**settings.pop("cleaning"))
    config = ShardBuildConfig(out=out, cleaning=cleaning, **settings)
    report = _merged_report(cleaning, [m for _, m in found])
    ids = array("Q")
    for path, _ in found:
        ids.frombytes((path / PART_IDS).read_bytes())
    spills = [SpillBuckets(path / "buckets", meta["buckets"]) for path, _ in found]
    _check_out(config, meta["source"])
    clean_stale(out)
    with building_dir(out) as staging:
        manifest = _write_build(staging, spills, _repeated(ids), config, report, meta["source"], consume=False)
        replace_dir(staging, out)
    shutil.rmtree(root, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------------------
# Reading back: manifest, shard lists, verification
# ---------------------------------------------------------------------------


def manifest_file(path: str | os.PathLike) -> Path:
    """``DIR`` or ``DIR/manifest.json`` -> the manifest file path."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ManifestError(
            f"{path}: not a valid {MANIFEST_FORMAT} manifest: {what}; rebuild it with `align shards build`"
        )


def _validate_split(path: Path, name: str, entry: object) -> None:
    _require(isinstance(entry, dict), path, f"splits.{name} must be an object")
    assert isinstance(entry, dict)
    _require(isinstance(entry.get("rows"), int), path, f"splits.{name}.rows must be an integer")
    _require(isinstance(entry.get("languages"), dict), path, f"splits.{name}.languages must be an object")
    _require(isinstance(entry.get("shards"), list), path, f"splits.{name}.shards must be a list")
    for i, shard in enumerate(entry["shards"]):
        where = f"splits.{name}.shards[{i}]"
        _require(isinstance(shard, dict), path, f"{where} must be an object")
        rel = shard.get("path")
        _require(isinstance(rel, str) and bool(rel), path, f"{where}.path must be a string")
        _require(plain_relative_path(rel), path, f"{where}.path must be relative inside the folder, a plain file path "
                 f"(got {rel!r}; no '..', no URL scheme or 'pipe:', no ':' or '\\')")
        for key in ("rows", "bytes"):
            value = shard.get(key)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, path,
                     f"{where}.{key} must be a non-negative integer")
        _require(shard["rows"] * 2 * TAR_BLOCK <= shard["bytes"], path,
                 f"{where}.rows ({shard['rows']}) cannot fit in its {shard['bytes']} bytes (a sample takes at least "
                 f"{2 * TAR_BLOCK} bytes of tar)")
        _require(
            isinstance(shard.get("sha256"), str) and len(shard["sha256"]) == 64,
            path,
            f"{where}.sha256 must be 64 hex digits",
        )


def plain_relative_path(rel: str) -> bool:
    """A manifest's shard path as the builder writes it (``train/shards-000000.tar``): relative, no ``..``,
    no URL scheme or ``pipe:`` (no ``:`` at all), no backslash, no control characters, no leading ``-``,
    names the file system can hold (255 bytes a part, 1024 in all)."""
    parts = rel.split("/")
    return (
        len(rel.encode("utf-8", "surrogatepass")) <= 1024
        and all(len(part.encode("utf-8", "surrogatepass")) <= 255 for part in parts)
        and not rel.startswith("/")
        and ":" not in rel
        and "\\" not in rel
        and not any(ord(c) < 32 or c == "\x7f" for c in rel)
        and all(part not in ("", ".", "..") and not part.startswith("-") for part in parts)
    )


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and validate a v1 manifest (``DIR`` or ``DIR/manifest.json``).

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ManifestError: not JSON or not a v1 manifest (names the file and the field).
    """
    file = manifest_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no manifest (build one with `align shards build ... --out {file.parent}`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: not valid JSON ({exc}); rebuild it with `align shards build`") from exc
    _require(isinstance(manifest, dict), file, "top level must be an object")
    _require(
        manifest.get("format") == MANIFEST_FORMAT,
        file,
        f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}",
    )
    for key in ("created", "pivot", "seed", "source", "cleaning", "languages", "splits"):
        _require(key in manifest, file, f"missing key {key!r}")
    _require(isinstance(manifest["splits"], dict), file, "splits must be an object")
    _require(isinstance(manifest["languages"], dict), file, "languages must be an object")
    for name, entry in manifest["splits"].items():
        _validate_split(file, name, entry)
    return manifest


def _shards_from_manifest(spec: str | os.PathLike, split: str | None) -> list[ShardInfo]:
    file = manifest_file(spec)
    manifest = load_manifest(file)
    split = split or "train"
    if split not in manifest["splits"]:
        raise ValueError(f"{file}: no split {split!r}; it has {', '.join(manifest['splits'])}")
    entry = manifest["splits"][split]
    if not entry["shards"]:
        raise FileNotFoundError(
            f"{spec}: split {split!r} has no shards (0 rows); rebuild with a --split that gives it rows"
        )
    infos = []
    root = file.parent.absolute()
    for shard in entry["shards"]:
        url = root / shard["path"]
        if not url.is_file():
            raise FileNotFoundError(
                f"{spec}: shard {url} listed in {file} is missing; run `align shards verify {file.parent}`"
            )
        if not inside_folder(url, root):
            raise ManifestError(
                f"{file}: shard {shard['path']} is a link to {url.resolve()}, outside the shard folder; "
                "only files inside the folder are read (copy the shard in, or rebuild)"
            )
        infos.append(ShardInfo(url=str(url), rows=shard["rows"], sha256=shard["sha256"]))
    return infos


@dataclass(frozen=True)
class ShardInfo:
    """One shard for the stream reader: its path or URL, and what the manifest knows of it."""

    url: str
    rows: int | None
    sha256: str | None


_REMOTE = re.compile(r"^([a-z][a-z0-9+.-]*://|pipe:)", re.IGNORECASE)


def _expand_pattern(pattern: str, spec: object) -> list[str]:
    import braceexpand

    found: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if _REMOTE.match(item):
            raise ValueError(
                f"{spec}: {item!r} is a URL or a 'pipe:' command; only local shard files are read "
                "(copy the shards to a local or mounted folder)"
            )
        if glob.has_magic(item):
            found.extend(_local_file(match, spec) for match in sorted(glob.glob(item)))
        elif Path(item).is_file():
            found.append(_local_file(item, spec))
        elif "{" in pattern:
            raise FileNotFoundError(f"{spec}: shard {item} (from the brace pattern) does not exist")
        elif Path(item).is_dir():
            raise FileNotFoundError(
                f"{spec}: folder without {MANIFEST_NAME}; pass the manifest's folder or a glob like {item}/*.tar"
            )
        else:
            raise FileNotFoundError(f"{spec}: no such shard file")
    return found


def _local_file(item: str, spec: object) -> str:
    """An absolute path (never read as a URL or ``pipe:``) that does not link out of its folder."""
    path = Path(item).absolute()
    if not inside_folder(path, path.parent):
        raise ValueError(f"{spec}: shard {item} is a link to {path.resolve()}, outside its folder; it is not read")
    return str(path)


def resolve_shards(spec: str | os.PathLike | Sequence[str], split: str | None = None) -> list[ShardInfo]:
    """Turn a shard specification into the list of shards to read.

    ``spec`` may be a manifest file or a folder holding ``manifest.json`` (the
    shards of ``split``, default ``"train"``, with rows and sha256 from the
    manifest), a glob (``data/*.tar``), a WebDataset brace pattern
    (``data/corpus-{000000..000009}.tar``, expanded with ``braceexpand``), a
    single shard path, or a list of any of those. ``split`` is ignored for
    everything but manifests; ``rows`` and ``sha256`` are None there. Only
    local files are returned, as absolute paths, each inside its folder (a
    symlink out of it is refused); URLs and ``pipe:`` commands are refused.

    Raises:
        FileNotFoundError: the spec matches no files, or a listed shard is missing
            (the message names the spec).
        ManifestError: the manifest is not a valid v1 manifest, or lists a shard linking out of its folder.
        ValueError: a URL or ``pipe:`` spec, or a shard linking out of its folder.
    """
    if isinstance(spec, (list, tuple)):
        infos = [info for item in spec for info in resolve_shards(item, split)]
        if not infos:
            raise FileNotFoundError(f"{list(spec)!r}: the shard list is empty")
        return infos
    text = os.fspath(spec)  # type: ignore[arg-type]
    path = Path(text)
    if (path.is_dir() and (path / MANIFEST_NAME).is_file()) or path.suffix == ".json":
        return _shards_from_manifest(text, split)
    urls = _expand_pattern(text, spec)
    if not urls:
        raise FileNotFoundError(f"{text}: matches no shard files")
    return [ShardInfo(url=u, rows=None, sha256=None) for u in urls]


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scan_tar(path: Path) -> tuple[int, Counter, list[str]]:
    """``(samples, languages, problems)`` of one shard: every member must be ``<key>.json`` holding a row."""
    rows, languages, problems, keys = 0, Counter(), [], set()
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                key, dot, ext = member.name.partition(".")
                if not member.isfile() or ext != "json" or "/" in key:
                    problems.append(f"member {member.name!r} is not <key>.json")
                    continue
                if key in keys:
                    problems.append(f"sample key {key!r} appears twice")
                keys.add(key)
                try:
                    obj = json.loads(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
                    row = MultiWayRow.from_json(obj)
                    if not all(isinstance(t, str) for t in row.texts.values()):
                        raise ValueError("texts must be strings")
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    problems.append(f"sample {key!r} is not a valid row JSON ({exc})")
                    continue
                rows += 1
                languages.update(row.texts.keys())
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append(f"not a readable tar ({' '.join(str(exc).split())})")
    return rows, languages, problems


def _verify_shard(root: Path, shard: dict) -> tuple[Counter, list[str]]:
    rel, path = shard["path"], root / shard["path"]
    fix = "rebuild with `align shards build ... --overwrite` or restore the file from the original build"
    if not path.is_file():
        return Counter(), [f"{rel}: missing; {fix}"]
    if not inside_folder(path, root):
        return Counter(), [f"{rel}: a link to {path.resolve()}, outside the shard folder (not read); {fix}"]
    problems = []
    size = path.stat().st_size
    if size != shard["bytes"]:
        problems.append(f"{rel}: size {size} bytes, manifest says {shard['bytes']}; {fix}")
    digest = _sha256_of(path)
    if digest != shard["sha256"]:
        problems.append(
            f"{rel}: sha256 mismatch (manifest {shard['sha256'][:12]}..., file {digest[:12]}...): "
            f"the file changed after the build; {fix}"
        )
    rows, languages, tar_problems = _scan_tar(path)
    problems += [f"{rel}: {p}" for p in tar_problems]
    if rows != shard["rows"]:
        problems.append(f"{rel}: {rows} readable samples, manifest says {shard['rows']} rows; {fix}")
    return languages, problems


def verify_shards(manifest_path: str | os.PathLike) -> list[str]:
    """Re-check a build against its manifest; returns the problems (empty when all good).

    Per shard: present, size, sha256, every member a ``<key>.json`` whose JSON
    parses as a row, unique keys, sample count. Per split: rows and language
    counts add up, and no ``.tar`` in the split folder is missing from the
    manifest (a stray tar would be picked up by a glob). Each problem names the
    shard and says what to change. Reads every byte once (plus the tar parse).
    """
    try:
        file = manifest_file(manifest_path)
        manifest = load_manifest(file)
    except (FileNotFoundError, ManifestError) as exc:
        return [str(exc)]
    root, problems = file.parent, []
    for name, entry in manifest["splits"].items():
        languages: Counter = Counter()
        for shard in progress(entry["shards"], f"shards: verifying {name}", total=len(entry["shards"]), unit="shard"):
            shard_languages, shard_problems = _verify_shard(root, shard)
            languages.update(shard_languages)
            problems += shard_problems
        if sum(s["rows"] for s in entry["shards"]) != entry["rows"]:
            problems.append(
                f"{name}: shard rows add up to {sum(s['rows'] for s in entry['shards'])}, manifest says {entry['rows']}"
            )
        if not problems and dict(languages) != entry["languages"]:
            problems.append(
                f"{name}: language counts in the shards {dict(sorted(languages.items()))} "
                f"differ from the manifest's {entry['languages']}"
            )
        listed = {root / s["path"] for s in entry["shards"]}
        for stray in sorted((root / name).glob("*.tar")) if (root / name).is_dir() else []:
            if stray not in listed:
                problems.append(
                    f"{stray.relative_to(root)}: not listed in {file.name}; "
                    "remove it (a glob over the folder would read it)"
                )
    return problems


# ---------------------------------------------------------------------------
# Tables for the terminal
# ---------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def format_manifest(manifest: dict, location: str | os.PathLike = "") -> str:
    """The manifest as tables: header, per split shards/rows/bytes, per language counts per split."""
    src = manifest.get("source", {})
    packages = src.get("packages") or []
    inputs = " ".join(list(src.get("inputs", [])) + (["--from-package", *packages] if packages else []))
    lines = [
        f"{location or 'manifest'}: {manifest['format']}, created {manifest['created']}, "
        f"pivot {manifest['pivot']}, seed {manifest['seed']}",
        f"source: {src.get('format', '?')} {inputs}".rstrip(),
    ]
    if src.get("command"):
        lines.append(f"command: {src['command']}")
    splits = manifest["splits"]
    lines += ["", f"{'split':<12} {'shards':>7} {'rows':>10} {'bytes':>10}"]
    for name, entry in splits.items():
        size = sum(s["bytes"] for s in entry["shards"])
        lines.append(f"{name:<12} {len(entry['shards']):>7} {entry['rows']:>10} {_human_bytes(size):>10}")
    total_rows = sum(e["rows"] for e in splits.values())
    total_shards = sum(len(e["shards"]) for e in splits.values())
    total_bytes = sum(s["bytes"] for e in splits.values() for s in e["shards"])
    lines.append(f"{'total':<12} {total_shards:>7} {total_rows:>10} {_human_bytes(total_bytes):>10}")
    names = list(splits)
    lines += ["", f"{'language':<12} " + " ".join(f"{n:>10}" for n in names) + f" {'total':>10}"]
    for lang, total in manifest["languages"].items():
        counts = " ".join(f"{splits[n]['languages'].get(lang, 0):>10}" for n in names)
        lines.append(f"{lang:<12} {counts} {total:>10}")
    return "\n".join(lines)


def format_cleaning(manifest: dict) -> str:
    """The manifest's cleaning report as a table."""
    return format_cleaning_report(manifest["cleaning"])


def iter_shard_rows(url: str | os.PathLike) -> Iterator[tuple[str, MultiWayRow]]:
    """``(key, row)`` for every sample of one local shard, in file order (for tests and tools)."""
    with tarfile.open(url, "r") as tar:
        for member in tar:
            key = member.name.partition(".")[0]
            payload = tar.extractfile(member).read()  # type: ignore[union-attr]
            yield key, MultiWayRow.from_json(json.loads(payload.decode("utf-8")), source=f"{url}:{key}")
