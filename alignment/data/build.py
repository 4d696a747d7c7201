"""The shard build: rows -> cleaned, split, shuffled WebDataset shards and a manifest (one process or many).

A build turns a stream of :class:`~alignment.data.rows.MultiWayRow` into::

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

1. **Partition** (streaming): rows pass :func:`~alignment.data.cleaning.check_rows`,
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

Parallel builds (:func:`build_part` per task, then :func:`merge_parts`) run
pass 1 in many processes and pass 2 in one; they share the passes' private
helpers with :func:`build_shards`, which is why both live in this module. The
shard writer and the split sizes are in :mod:`alignment.data.shards_write`,
reading back and verifying in :mod:`alignment.data.manifest`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from alignment import fsutil
from alignment.data.cleaning import CleaningConfig, CleaningReport, check_rows, drop_duplicates
from alignment.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, REPORT_NAME, ManifestError, is_shard_build
from alignment.data.readers import input_paths
from alignment.data.rows import CorpusError, MultiWayRow, row_split_key, stable_hash64
from alignment.data.shards_write import SPLITS, ShardBuildConfig, SplitSpec, SplitWriter, provenance_summary, sample_key
from alignment.data.spill import SpillBuckets, bucket_of, buckets_for
from alignment.progress import progress
from alignment.staging import check_replaceable

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
    """:func:`~alignment.data.cleaning.drop_duplicates` within one bucket (duplicates always share a bucket)."""
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
    try:
        for bucket in progress(range(n), "shards: writing buckets", total=n, unit="bucket"):
            loaded = [item for spill in spills for item in _load_bucket(spill, bucket, config.cleaning.pivot)]
            spilled = _drop_duplicates(loaded, config, report)
            _write_bucket(spilled, bucket, config, writers, assign, repeated_ids, occurrences)
            if consume:
                for spill in spills:
                    spill.path(bucket).unlink(missing_ok=True)  # free disk as we go
        splits = {s: w.close() for s, w in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()  # close and drop the open temporaries; the staging folder goes with the build
        raise
    if report.rows_kept == 0:
        raise CorpusError(
            f"no rows left after cleaning {' '.join(map(str, (source or {}).get('inputs') or [])) or 'the input'}"
            "; nothing was written.\n"
            + report.format_table()
            + "\nCheck --languages, --min_languages, --max_chars and the input format."
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
        rows: any row stream (a reader from :mod:`alignment.data.readers`); read once.
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
    fsutil.recover(config.out)  # what a killed build of the same --out left
    with fsutil.publish_folder(config.out) as staging:
        manifest = _build_into(staging, rows, config, report, source, size_hint)
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
    fsutil.recover(final)  # what a killed run of this task left
    with fsutil.building(final) as staging:
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
        fsutil.commit(staging, final)  # an older part stays until this one is in place
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
    fsutil.recover(out)
    with fsutil.publish_folder(out) as staging:
        manifest = _write_build(staging, spills, _repeated(ids), config, report, meta["source"], consume=False)
    shutil.rmtree(root, ignore_errors=True)
    return manifest
