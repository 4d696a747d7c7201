"""Per-row sidecars stored beside a shard build under ``<section>/<key>/``, one file per text shard.

What ``align mine-negatives`` (:mod:`alignment.data.hard_negatives`, section ``negatives``) and ``align
embed-teacher`` (:mod:`alignment.data.teacher`, section ``teacher``) share: a sidecar entry is keyed by the
first 16 hex digits of the sha256 of its identity (the encoder that wrote it and its settings), its files are
published as one folder and then recorded in the manifest's ``<section>`` object (path, text shard, rows,
bytes, sha256 per file), both through :mod:`alignment.fsutil`; ``align shards verify`` re-checks every file
(:func:`verify_entries`) and the training stream reads the newest matching entry (:func:`entries_of`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignment.data.manifest import load_manifest, manifest_file, plain_relative_path
from alignment.staging import inside_folder


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def identity_key(identity: dict[str, Any]) -> str:
    return sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8"))[:16]


def record_sidecars(shards: str | Path, section: str, identity: dict[str, Any], files: dict[str, tuple[bytes, int]],
                    stats: dict[str, Any], *, suffix: str) -> tuple[str, dict[str, Any]]:
    """Publish the sidecars (``files``: text shard path relative to the build -> ``(bytes, rows)``) under
    ``<section>/<key>/<split>/<shard stem><suffix>`` as one folder, then the manifest entry; ``identity`` holds
    ``split``."""
    from alignment import fsutil

    file = manifest_file(shards)
    root = file.parent
    key = identity_key(identity)
    if (root / section).is_dir():
        fsutil.recover_in(root / section)
    split = identity["split"]
    entries = []
    with fsutil.publish_folder(root / section / key) as staging:
        for text, (data, rows) in files.items():
            rel = f"{split}/{Path(text).stem}{suffix}"
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
            entries.append({"path": f"{section}/{key}/{rel}", "text": text, "rows": rows, "bytes": len(data),
                            "sha256": sha256(data)})
    record = {"identity": identity, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "splits": {split: {"shards": entries, "rows": sum(e["rows"] for e in entries)}}, "stats": stats}
    manifest = load_manifest(file)  # as it is now
    manifest.setdefault(section, {})[key] = record
    fsutil.publish_file(file, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return key, record


def verify_entries(root: Path, manifest: dict, section: str, fix: str,
                   check: Callable[[dict, bytes, list[str]], str | None]) -> list[str]:
    """Problems of the manifest's ``section`` entries: every file present, inside the folder, of the recorded
    size and sha256, then ``check(file record, its bytes, the text shard's sample keys)`` (a problem or None)."""
    from alignment.data.tokens import _text_samples

    entries = manifest.get(section, {})
    if not isinstance(entries, dict):
        return [f"manifest: {section!r} must be an object"]
    problems: list[str] = []
    for key, record in entries.items():
        try:
            files = [f for entry in record["splits"].values() for f in entry["shards"]]
        except (KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{section} {key}: malformed manifest entry ({exc}); {fix}")
            continue
        for f in files:
            rel = str(f.get("path", ""))
            path = root / rel
            if not plain_relative_path(rel) or not rel.startswith(f"{section}/{key}/"):
                problems.append(f"{section} {key}: {rel!r} is not a path under {section}/{key}/; {fix}")
            elif not path.is_file() or not inside_folder(path, root):
                problems.append(f"{rel}: {section} file missing or outside the shard folder; {fix}")
            elif (data := path.read_bytes()) and (len(data) != f.get("bytes") or sha256(data) != f.get("sha256")):
                problems.append(f"{rel}: {section} file changed after it was written (size {len(data)}, manifest "
                                f"{f.get('bytes')}); {fix}")
            elif (problem := check(f, data, [k for k, _ in _text_samples(root / f["text"])])) is not None:
                problems.append(f"{rel}: {problem}; {fix}")
    return problems


def format_entries(manifest: dict, section: str, key_title: str, columns: list[tuple[str, str, str]]) -> str:
    """The ``section`` entries as a table: key, encoder, ``columns`` (identity field, title, format spec), split,
    rows, created; empty string when there are none."""
    entries = manifest.get(section) or {}
    if not entries:
        return ""
    extra = "".join(f"{title:{spec}} " for _, title, spec in columns)
    lines = ["", f"{key_title:<18} {'encoder':<30} {extra}{'split':<10} {'rows':>8} {'created':<20}"]
    for key, rec in entries.items():
        ident = rec.get("identity", {})
        rows = sum(e.get("rows", 0) for e in rec.get("splits", {}).values())
        values = "".join(f"{str(ident.get(name, '?')):{spec}} " for name, _, spec in columns)
        lines.append(f"{key:<18} {str(ident.get('model'))[-30:]:<30} {values}{str(ident.get('split')):<10} {rows:>8} "
                     f"{rec.get('created', ''):<20}")
    return "\n".join(lines)


def entries_of(spec: Any, section: str, split: str) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    """``(manifest file, [(key, record)] of ``section`` entries covering ``split``, newest first)``."""
    file = manifest_file(spec)
    found = [(rec.get("created", ""), key, rec) for key, rec in (load_manifest(file).get(section) or {}).items()
             if split in rec.get("splits", {})]
    return file, [(key, rec) for _, key, rec in sorted(found, key=lambda e: (e[0], e[1]), reverse=True)]


def sidecar_paths(file: Path, record: dict[str, Any], split: str) -> dict[str, str]:
    """Text shard path -> sidecar path (absolute) of one entry's ``split``."""
    root = file.parent.absolute()
    return {str(root / f["text"]): str(root / f["path"]) for f in record["splits"][split]["shards"]
            if plain_relative_path(str(f["path"])) and plain_relative_path(str(f["text"]))}
