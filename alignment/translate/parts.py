"""Parts of a translation run: deterministic split, atomic publish, resume, merge.

A run's folder ``OUT``::

    OUT/run.json                 settings every rank must share (model, languages, decoding, filters, part size)
    OUT/parts/part-000000.jsonl  the rows of part 0 ...
    OUT/parts/part-000000.json   ... and its manifest entry (rows, sha256, filter report, speed, who, when)
    OUT/inputs.json              rows in the input and number of parts (written by every rank that read it all)
    OUT/corpus.jsonl             the merged corpus (``align shards build --format jsonl OUT/corpus.jsonl``)
    OUT/manifest.json            the merge's manifest: settings, parts, filter report, provenance, speed

Row ``i`` of the input (in :func:`~alignment.translate.io.read_sources` order)
belongs to part ``i // part_rows``, and part ``p`` to rank ``p % world_size``:
the split depends on the input and ``--part-rows`` only, never on the number of
ranks, so a run on 1, 2 or 64 ranks writes the same parts, byte for byte
(decoding is deterministic and batches are made within a part).

A part is *finished* when its entry exists: the rows file is published with
:func:`alignment.fsutil.publish_file` first, then the entry the same way, so a killed process leaves either nothing or a complete part (plus at most
a temporary file that the next run of that part removes). A rerun skips
finished parts, so nothing is redone and no row is written twice; a finished
part whose input rows changed since is an error, not a silent mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from alignment import fsutil

RUN_FORMAT = "multiway-align/translate-run/v1"
PART_FORMAT = "multiway-align/translate-part/v1"
MANIFEST_FORMAT = "multiway-align/translate/v1"
RUN_NAME, INPUTS_NAME, PARTS_DIR = "run.json", "inputs.json", "parts"
CORPUS_NAME, MANIFEST_NAME = "corpus.jsonl", "manifest.json"


class PartsError(ValueError):
    """A run folder that does not fit this run (other settings, changed input, missing parts)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def publish_json(path: Path, obj: dict) -> None:
    fsutil.publish_file(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunFolder:
    """The files of one run folder (see the module docstring)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.root = Path(out)
        if self.root.exists() and not self.root.is_dir():
            raise PartsError(f"--out {self.root} is a file; give a folder for the run")
        self.parts = self.root / PARTS_DIR

    def rows_file(self, part: int) -> Path:
        return self.parts / f"part-{part:06d}.jsonl"

    def entry_file(self, part: int) -> Path:
        return self.parts / f"part-{part:06d}.json"

    # -------------------------------------------------------------- settings

    def claimed(self) -> bool:
        return (self.root / RUN_NAME).is_file()

    def claim(self, settings: dict) -> None:
        """Record the run's settings, or check them against those already recorded.

        Raises:
            PartsError: the folder holds a run with other settings (names each one that differs).
        """
        path = self.root / RUN_NAME
        if path.is_file():
            recorded = json.loads(path.read_text(encoding="utf-8"))["settings"]
            diff = [k for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]
            if diff:
                shown = "; ".join(f"{k}: {recorded.get(k)!r} recorded, {settings.get(k)!r} now" for k in diff[:4])
                raise PartsError(
                    f"--out {self.root} holds a run with other settings ({shown}); resume it with the same flags, "
                    "or give a new --out"
                )
            return
        publish_json(path, {"format": RUN_FORMAT, "created": now(), "settings": settings})

    def settings(self) -> dict:
        path = self.root / RUN_NAME
        if not path.is_file():
            raise PartsError(f"{self.root}: no {RUN_NAME}; not the --out of an `align translate run`")
        return json.loads(path.read_text(encoding="utf-8"))["settings"]

    # -------------------------------------------------------------- parts

    def finished(self, part: int, input_sha: str | None = None) -> bool:
        """Whether ``part`` is finished (its entry and rows are there); checks it was made from the same rows."""
        entry_path = self.entry_file(part)
        if not entry_path.is_file():
            return False
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        rows = self.rows_file(part)
        if not rows.is_file() or rows.stat().st_size != entry["bytes"]:
            return False  # the entry outlived its rows (removed by hand): redo the part
        if input_sha is not None and entry["input_sha256"] != input_sha:
            raise PartsError(
                f"{entry_path}: part {part} was translated from other input rows than the INPUT files hold now "
                f"(rows {entry['first_row']}..{entry['first_row'] + entry['rows_in'] - 1} changed); "
                "restore the input, or give a new --out"
            )
        return True

    def clear_stale(self, part: int) -> None:
        """Remove what a killed run of ``part`` left (temporary files; rows without an entry)."""
        if self.parts.is_dir():
            for name in (self.rows_file(part), self.entry_file(part)):
                fsutil.recover(name, grace_s=0)  # part p has one writer: this rank

    def publish_part(self, part: int, rows: bytes, entry: dict) -> dict:
        """Publish a finished part: rows first, then the entry that marks it finished."""
        entry = {"format": PART_FORMAT, "part": part, "bytes": len(rows), "sha256": sha256(rows),
                 "host": socket.gethostname(), "finished": now(), **entry}
        fsutil.publish_file(self.rows_file(part), rows)
        publish_json(self.entry_file(part), entry)
        return entry

    def record_inputs(self, rows: int, parts: int, fingerprint: list[dict]) -> None:
        """What the input holds, once a rank has read all of it (identical from every rank)."""
        path = self.root / INPUTS_NAME
        record = {"rows": rows, "parts": parts, "inputs": fingerprint}
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            if (old["rows"], old["parts"]) != (rows, parts):
                raise PartsError(
                    f"{path}: the input had {old['rows']} rows ({old['parts']} parts) when this run began and "
                    f"has {rows} ({parts} parts) now; restore it, or give a new --out"
                )
            return
        publish_json(path, record)

    def inputs(self) -> dict | None:
        path = self.root / INPUTS_NAME
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def missing_parts(self) -> list[int] | None:
        """Parts without an entry, or None when no rank has read the whole input yet."""
        inputs = self.inputs()
        if inputs is None:
            return None
        return [p for p in range(inputs["parts"]) if not self.finished(p)]


def merge(out: str | os.PathLike, *, command: str | None = None) -> dict:
    """Concatenate the finished parts, in part order, into ``OUT/corpus.jsonl``; write ``OUT/manifest.json``.

    Idempotent and safe to run concurrently (each writer publishes atomically the same bytes).
    Every part's rows are checked against the sha256 of its entry.

    Raises:
        PartsError: a part is missing or damaged (names it and the ranks to rerun).
    """
    from alignment.translate.filters import FilterReport

    folder = RunFolder(out)
    settings = folder.settings()
    inputs = folder.inputs()
    if inputs is None:
        raise PartsError(f"{folder.root}: no rank has finished reading the input yet; run `align translate run` first")
    missing = folder.missing_parts()
    if missing:
        raise PartsError(
            f"{folder.root}: {len(missing)} of {inputs['parts']} parts unfinished (parts "
            f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}); rerun `align translate run` "
            "with the same flags (finished parts are kept), then merge"
        )
    entries, chunks = [], []
    for part in range(inputs["parts"]):
        entry = json.loads(folder.entry_file(part).read_text(encoding="utf-8"))
        data = folder.rows_file(part).read_bytes()
        if sha256(data) != entry["sha256"]:
            raise PartsError(f"{folder.rows_file(part)}: sha256 differs from its entry; delete "
                             f"{folder.entry_file(part).name} and rerun the run to redo part {part}")
        entries.append(entry)
        chunks.append(data)
    corpus = b"".join(chunks)
    report = FilterReport.merged([e["report"] for e in entries])
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": now(),
        "command": command,
        "settings": settings,
        "inputs": inputs,
        "corpus": {"path": CORPUS_NAME, "rows": sum(e["rows_out"] for e in entries), "bytes": len(corpus),
                   "sha256": sha256(corpus)},
        "languages": _sum_dicts(e["languages"] for e in entries),
        "provenance": _sum_provenance(e["provenance"] for e in entries),
        "filters": report.to_dict(),
        "throughput": _throughput(entries),
        "parts": [{k: e[k] for k in ("part", "first_row", "rows_in", "rows_out", "sha256", "rank", "host",
                                      "finished")} for e in entries],
    }
    fsutil.publish_file(folder.root / CORPUS_NAME, corpus)
    publish_json(folder.root / MANIFEST_NAME, manifest)
    return manifest


def _sum_dicts(dicts) -> dict:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def _sum_provenance(items) -> dict:
    """``{lang: {"original": n, "synthetic": {model: n}}}`` summed over parts."""
    out: dict[str, dict] = {}
    for prov in items:
        for lang, origins in prov.items():
            entry = out.setdefault(lang, {})
            for origin, value in origins.items():
                if isinstance(value, dict):
                    models = entry.setdefault(origin, {})
                    for model, n in value.items():
                        models[model] = models.get(model, 0) + n
                else:
                    entry[origin] = entry.get(origin, 0) + value
    return dict(sorted(out.items()))


def _throughput(entries: list[dict]) -> dict:
    sentences = sum(e["throughput"]["sentences"] for e in entries)
    seconds = sum(e["throughput"]["seconds"] for e in entries)
    generated = sum(e["throughput"]["generated_tokens"] for e in entries)
    return {"sentences": sentences, "generated_tokens": generated, "seconds": round(seconds, 3),
            "sentences_per_second_per_rank": round(sentences / seconds, 2) if seconds else 0.0}


def format_manifest(manifest: dict) -> str:
    """A few lines for the terminal: rows, languages with origins, speed."""
    corpus, thr = manifest["corpus"], manifest["throughput"]
    lines = [f"Corpus: {corpus['rows']} rows, {corpus['bytes']} bytes, {len(manifest['parts'])} part(s)"]
    lines.append(f"  {'language':<10} {'texts':>8} {'original':>9} {'synthetic':>10}")
    for lang, n in manifest["languages"].items():
        prov = manifest["provenance"].get(lang, {})
        synthetic = sum(prov.get("synthetic", {}).values())
        lines.append(f"  {lang:<10} {n:>8} {prov.get('original', 0):>9} {synthetic:>10}")
    lines.append(f"Speed: {thr['sentences']} sentences translated in {thr['seconds']:.1f} s of generation "
                 f"({thr['sentences_per_second_per_rank']:.1f} sentences/s per rank)")
    return "\n".join(lines)
