"""Reading shards back: the manifest (load, validate), shard lists (:func:`resolve_shards`), verification, tables.

A build folder holds::

    DIR/manifest.json
    DIR/cleaning_report.json
    DIR/train/<prefix>-000000.tar ...
    DIR/validation/<prefix>-000000.tar ...
    DIR/test/<prefix>-000000.tar ...        (a split with zero rows has no shards)

Everything here only reads; nothing here imports the writer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.data.cleaning import format_cleaning_report
from alignment.data.rows import MultiWayRow
from alignment.progress import progress
from alignment.staging import inside_folder

MANIFEST_FORMAT = "multiway-align/shards/v1"
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "cleaning_report.json"
TAR_BLOCK = tarfile.BLOCKSIZE  # 512: the least a sample takes in a tar, besides its header


class ManifestError(ValueError):
    """A manifest that is missing, not JSON, or not a v1 shard manifest (names the file)."""


def is_shard_build(folder: Path) -> bool:
    """``folder`` holds a ``manifest.json`` of this project's format (what ``--overwrite`` may replace)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT

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
    inputs = " ".join(list(src.get("inputs", [])) + (["--from_package", *packages] if packages else []))
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


def manifest_languages(spec: Any) -> list[str] | None:
    """The top-level ``languages`` of the manifest a spec names (a manifest file or its folder), else None."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = Path(spec)
    if not ((path.is_dir() and (path / MANIFEST_NAME).is_file()) or (path.is_file() and path.suffix == ".json")):
        return None
    return sorted(load_manifest(path)["languages"]) or None
