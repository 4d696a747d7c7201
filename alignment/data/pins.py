"""What a checkpoint pins of its training data, so that a resume reads the same rows (:mod:`alignment.runs`, :mod:`alignment.data.datamodule`).

A shard build's ``manifest.json`` holds the text shards (their paths, rows, sha256, splits, languages, the
cleaning and build settings) and, added later by other commands, sidecar sections: ``negatives`` (``align
mine-negatives``), ``teacher`` (``align embed-teacher``) and ``tokens`` (``align shards tokenize``). Adding a
sidecar changes no text row, so a checkpoint pins two things:

* ``data_rows_sha256`` (:func:`rows_checksum`): the sha256 of the manifest without its sidecar sections;
* ``data_sidecars`` (:func:`sidecar_pins`): for each sidecar the run actually reads (hard negatives,
  stored teacher embeddings, pre-tokenised ids), its entry key, identity and a digest of its files.

A resume is refused when the rows checksum differs, or when a sidecar the checkpoint's run read is gone or
was replaced (:func:`sidecar_changes` names it and what changed). Checkpoints written before this split
record only ``data_manifest_sha256``, the sha256 of the whole manifest file: they resume when that still
matches the manifest as it is, or as it was before sidecar entries were appended to it
(:func:`legacy_checksum_matches`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

SIDECARS = {
    # section: (what it is, the option that makes a run read it, the command that writes it)
    "negatives": ("hard negatives", "--data.hard_negatives", "align mine-negatives"),
    "teacher": ("stored teacher embeddings", "--model.distill.teacher_embeddings", "align embed-teacher"),
    "tokens": ("pre-tokenised ids", "--data.tokenizer", "align shards tokenize"),
}
"""Manifest sections that sidecar commands add; the ``ShardRef`` attribute of each has the same name."""
_LEGACY_TRIES = 256


def _manifest_path(spec: Any) -> Path | None:
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / "manifest.json"
    return path if path.is_file() and path.suffix == ".json" else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def rows_checksum(spec: Any) -> str | None:
    """sha256 of what decides the training rows: the manifest a shard spec names without its sidecar sections
    (canonical JSON); None when the spec names no manifest or it is not JSON."""
    path = _manifest_path(spec)
    if path is None:
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    return _sha256(_canonical({k: v for k, v in manifest.items() if k not in SIDECARS}))


def legacy_state(saved: str, spec: Any) -> dict[str, list[str]] | None:
    """The sidecar entries the manifest held when an old checkpoint recorded ``saved`` (its sha256 of the whole
    manifest file): ``{section: [entry keys]}``; None when neither the manifest as it is nor as it was before some
    of its sidecar entries were appended gives ``saved`` (each section's entries are in the order they were
    written; every command writes the manifest as ``json.dumps(indent=2, ensure_ascii=False)`` plus a newline)."""
    path = _manifest_path(spec)
    if path is None:
        return None
    data = path.read_bytes()
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    sections = [s for s in manifest if s in SIDECARS and isinstance(manifest[s], dict)]
    if _sha256(data) == saved:
        return {s: list(manifest[s]) for s in sections}
    choices = [range(len(manifest[s]) + 1) for s in sections]  # how many of each section's entries existed then
    for count, kept in enumerate(itertools.product(*choices)):
        if count >= _LEGACY_TRIES:
            return None
        earlier = {}
        for key, value in manifest.items():
            if key in sections:
                n = kept[sections.index(key)]
                if n == 0:
                    continue
                value = dict(itertools.islice(value.items(), n))
            earlier[key] = value
        if _sha256((json.dumps(earlier, indent=2, ensure_ascii=False) + "\n").encode("utf-8")) == saved:
            return {s: list(manifest[s])[:n] for s, n in zip(sections, kept)}
    return None


def legacy_checksum_matches(saved: str, spec: Any) -> bool:
    """Whether an old checkpoint's whole-manifest sha256 ``saved`` is the manifest's, now or before some sidecar
    entries were appended (:func:`legacy_state`)."""
    return legacy_state(saved, spec) is not None


def legacy_sidecar_changes(saved: str, current: dict[str, dict] | None, manifest: Any) -> list[str]:
    """For an old checkpoint (no pins): the hard negatives entry this run reads, when it was added after the
    checkpoint (``--data.hard_negatives`` reads the newest entry, whatever its settings, so the run would read
    other negatives). Pre-tokenised ids and teacher embeddings are matched by their settings: not refused."""
    if not current or "negatives" not in current:
        return []
    state = legacy_state(saved, manifest)
    key = current["negatives"].get("key")
    if state is None or key in state.get("negatives", []):
        return []
    what, _, command = SIDECARS["negatives"]
    entries = json.loads(_manifest_path(manifest).read_text(encoding="utf-8")).get("negatives") or {}
    before = sorted((entries[k].get("created", ""), k) for k in state.get("negatives", []) if k in entries)
    if before:
        ident = entries[before[-1][1]].get("identity") or {}
        fix = (f"re-run `{command} --k {ident.get('k')} --model {ident.get('model')}` (entry {before[-1][1]}, the "
               "one it read) so that it is the newest again")
    else:
        fix = "the checkpoint's run read no mined negatives then: resume with --data.hard_negatives 0"
    return [f"the {what} entry this run would read (negatives/{key}/ of {manifest}) was written after the checkpoint "
            f"(by `{command}`), so the checkpoint's run read other negatives; to resume, {fix}, or start a new run "
            "from these weights with --warm_start CKPT"]


def _entry_of(root: Path, sidecar: str, section: str) -> str | None:
    """The entry key of a sidecar path ``<root>/<section>/<key>/...``."""
    try:
        parts = Path(sidecar).relative_to(root).parts
    except ValueError:
        return None
    return parts[1] if len(parts) > 2 and parts[0] == section else None


def _pin(record: dict[str, Any], key: str, split: str) -> dict[str, Any]:
    files = [[f.get("path"), f.get("text"), f.get("rows"), f.get("sha256")]
             for f in ((record.get("splits") or {}).get(split) or {}).get("shards", [])]
    return {"key": key, "split": split, "identity": record.get("identity") or {},
            "files_sha256": _sha256(_canonical(files))}


def sidecar_pins(shards: list[Any], spec: Any, split: str) -> dict[str, dict[str, Any]]:
    """``{section: pin}`` of each sidecar the training ``shards`` (``ShardRef``) read, from the manifest ``spec``
    names (empty when there is none or they read no sidecar)."""
    path = _manifest_path(spec)
    if path is None:
        return {}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    root = path.parent.absolute()
    pins = {}
    for section in SIDECARS:
        keys = {_entry_of(root, getattr(ref, section, None), section) for ref in shards
                if getattr(ref, section, None)}
        keys.discard(None)
        if len(keys) == 1:
            key = keys.pop()
            record = (manifest.get(section) or {}).get(key)
            if isinstance(record, dict):
                pins[section] = _pin(record, key, split)
    return pins


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _what_changed(saved: dict[str, Any], now: dict[str, Any]) -> str:
    a, b = saved.get("identity") or {}, now.get("identity") or {}
    fields = [f"{name} {_short(a.get(name))} -> {_short(b.get(name))}" for name in sorted(set(a) | set(b))
              if a.get(name) != b.get(name)]
    if fields:
        return ", ".join(fields)
    return "same settings, but its files changed (rewritten)" if saved.get("files_sha256") != now.get(
        "files_sha256") else "unchanged"


def sidecar_changes(saved: dict[str, dict] | None, current: dict[str, dict] | None, manifest: Any) -> list[str]:
    """One line per sidecar the checkpoint's run read that this run would read differently (gone, another entry,
    or the same entry with other files), naming it, the manifest and what changed; empty when either side is
    unknown (a checkpoint without pins, or a data module not yet set up)."""
    if not isinstance(saved, dict) or current is None:
        return []
    out = []
    for section, pin in saved.items():
        what, option, command = SIDECARS.get(section, (section, "", ""))
        now = current.get(section)
        if now is not None and now.get("key") == pin.get("key") and now.get("files_sha256") == pin.get("files_sha256"):
            continue
        was = f"the {what} sidecar ({section}/{pin.get('key')}/ of {manifest})"
        if now is None:
            change = f"this run reads none now ({option} off, or the entry is gone from the manifest)"
        else:
            change = f"this run would read {section}/{now.get('key')}/: {_what_changed(pin, now)}"
        out.append(f"{was} changed since the checkpoint: {change}; to resume, make it the entry this run reads "
                   f"again (re-run `{command}` with the checkpoint's settings), or start a new run from these "
                   "weights with --warm_start CKPT")
    return out
