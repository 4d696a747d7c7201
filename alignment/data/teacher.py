"""Teacher embeddings of every row's pivot sentence, stored beside a shard build (``align embed-teacher``).

``align embed-teacher --shards DIR --model TEACHER`` writes, for every text shard
``DIR/<split>/<name>.tar`` of the split, a sidecar ``DIR/teacher/<key>/<split>/<name>.safetensors``:
the tensor ``embeddings`` ``(R, D)`` (float16 or float32) holds, in the shard's order, the
teacher's embedding of each row's pivot text (the text ``--model.distill.teacher`` would embed in
training: the row's text in the pivot language, with the teacher's prefix, max length and pooling),
``has_pivot`` ``(R,)`` uint8 marks the rows that have a pivot text (the others hold zeros and are never
a target), and the metadata ``keys`` (a JSON list) names each row's sample key. Cost: ``R x D x 2``
bytes in float16 (768 wide: 1.5 kB a row).

The entry is recorded in the manifest's ``teacher`` object (:mod:`alignment.data.sidecar`) with the
teacher's identity: its spec as given and resolved, a sha256 fingerprint of its parameters
(``alignment.deploy.maps.model_fingerprint``) and of a local teacher's weight files (checked again by ``align
fit``: a teacher retrained in place is refused), pooling, prefix, max length, width, pivot language,
split and dtype; ``align shards verify`` checks every file. ``align fit
--model.distill.teacher_embeddings auto|stored`` reads the newest entry matching the configured teacher
(:func:`attach_teacher`): each row then carries its vector through the shuffle buffer, the batch cut and a
resume (``Batch.teacher``), and the teacher model is never loaded.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from alignment.data.sidecar import entries_of, format_entries, record_sidecars, sidecar_paths, verify_entries
from alignment.languages import LanguageCodeError, normalize_language

TEACHER_DIR = "teacher"
FIX = "re-run `align embed-teacher` (it rewrites the entry)"
TeacherDtype = Literal["float16", "float32"]
TEACHER_DTYPES: tuple[str, ...] = get_args(TeacherDtype)
MATCHED = {  # identity field -> the align fit flag that must agree with it
    "model": "--model.distill.teacher", "pooling": "--model.distill.pooling",
    "max_length": "--model.distill.max_length", "prefix": "--model.distill.text_prefix",
    "dim": "the student's width (--model.encoder.projection_dim)", "pivot": "--data.pivot",
}


def pivot_text(texts: dict[str, Any], pivot: str) -> str | None:
    """The row's text in the ``pivot`` language as the training stream reads it (``parse_payload``: codes
    canonicalised, blank and non-string texts dropped, the last of two spellings of one code kept), or None."""
    found = None
    for code, text in texts.items():
        try:
            lang = normalize_language(str(code))
        except LanguageCodeError:
            return None  # the stream skips the whole row
        if lang == pivot and isinstance(text, str) and text.strip():
            found = text
    return found


def encode_sidecar(keys: list[str], vectors: Tensor, has_pivot: list[bool], dtype: str) -> bytes:
    """One shard's sidecar bytes (safetensors): ``embeddings`` ``(R, D)``, ``has_pivot`` ``(R,)``, metadata keys."""
    from safetensors.torch import save

    if vectors.shape[0] != len(keys) or len(has_pivot) != len(keys):
        raise ValueError(f"{len(keys)} keys for {vectors.shape[0]} vectors and {len(has_pivot)} pivot flags")
    tensors = {"embeddings": vectors.to(getattr(torch, dtype)).contiguous(),
               "has_pivot": torch.tensor(has_pivot, dtype=torch.uint8)}
    return save(tensors, metadata={"keys": json.dumps(keys, ensure_ascii=False)})


def decode_sidecar(data: bytes) -> tuple[list[str], Tensor, Tensor]:
    """``(keys, embeddings (R, D), has_pivot (R,) bool)`` of a sidecar's bytes."""
    from safetensors.torch import load

    tensors = load(data)
    keys = json.loads(_metadata(data).get("keys", "[]"))
    return keys, tensors["embeddings"], tensors["has_pivot"].bool()


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (an 8-byte little-endian length, then the JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + size].decode("utf-8")).get("__metadata__") or {})


def read_teacher_sidecar(path: str | Path) -> dict[str, Tensor]:
    """Sample key -> its stored teacher embedding ``(D,)`` float32, for one shard's sidecar."""
    keys, vectors, _ = decode_sidecar(Path(path).read_bytes())
    vectors = vectors.float()
    return {key: vectors[i] for i, key in enumerate(keys)}


def record_teacher(shards: str | Path, identity: dict[str, Any], files: dict[str, tuple[bytes, int]],
                   stats: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Publish the sidecars (text shard -> ``(bytes, rows)``) and the manifest entry."""
    return record_sidecars(shards, TEACHER_DIR, identity, files, stats, suffix=".safetensors")


def _check_sidecar(f: dict, data: bytes, text_keys: list[str]) -> str | None:
    try:
        keys, vectors, has = decode_sidecar(data)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is a problem to report, not a crash
        return f"not a readable teacher sidecar ({type(exc).__name__}: {exc})"
    if keys != text_keys:
        return f"its {len(keys)} row keys do not match the {len(text_keys)} of {f['text']} in order"
    if vectors.ndim != 2 or vectors.shape[0] != len(keys) or has.shape != (len(keys),):
        return f"embeddings of shape {tuple(vectors.shape)} for {len(keys)} rows"
    if not bool(torch.isfinite(vectors.float()).all()):
        return "non-finite teacher embeddings"
    return None


def verify_teacher(root: Path, manifest: dict) -> list[str]:
    """Problems of the manifest's teacher entries: every file present, of the recorded size and sha256, one
    finite vector per row of its text shard, keys in order."""
    return verify_entries(root, manifest, TEACHER_DIR, FIX, _check_sidecar)


def format_teacher(manifest: dict) -> str:
    """The teacher entries as a table (empty string when there are none)."""
    return format_entries(manifest, TEACHER_DIR, "teacher key", [("dim", "dim", ">5"), ("dtype", "dtype", "<8")])


def resolved_model(spec: str) -> str | None:
    """A local teacher's absolute path (how two spellings of one folder compare), else None."""
    return str(Path(spec).resolve()) if Path(spec).exists() else None


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_sha256(spec: str) -> str | None:
    """sha256 over a local teacher's weight files (a folder's top-level ``*.safetensors`` / ``*.bin``, names and
    bytes; a checkpoint file's bytes), or None (a hub name, a folder without such files): what tells stored
    vectors from a teacher retrained in place. Cost: one read of the weights (about 1 s per GB on a local
    disk), by ``align embed-teacher`` and by every rank when ``align fit`` matches an entry."""
    import hashlib

    path = Path(spec)
    files = ([path] if path.is_file() else
             sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else [])
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def differences(stored: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """What differs between a stored entry's identity and the configured teacher ``want`` (``model``, ``pooling``
    (None: the teacher's saved setting), ``max_length``, ``prefix``, ``dim``, ``pivot``; ``weights_sha256`` of a
    local teacher), flag by flag."""
    out = []
    for name, flag in MATCHED.items():
        have, need = stored.get(name), want.get(name)
        if name == "model":
            local = resolved_model(str(need))
            same = (local == stored.get("model_path")) if local is not None else need == have
            if same and stored.get("weights_sha256") and want.get("weights_sha256") != stored["weights_sha256"]:
                out.append(f"the weight files of {flag} {need!r} changed since `align embed-teacher` read them")
                continue
        elif name == "pooling":
            same = stored.get("pooling_option") is None if need is None else need == have
            have = have if stored.get("pooling_option") is not None else f"{have} (the teacher's saved setting)"
        else:
            same = need == have
        if not same:
            out.append(f"{name} {have!r} where {flag} is {need!r}")
    return out


def attach_teacher(shards: list, spec: Any, split: str, want: dict[str, Any]) -> tuple[list, str]:
    """``shards`` (``ShardRef``) with the sidecars of the newest entry matching ``want``, and a line for the log.

    Raises:
        ValueError: no manifest, no entry for the split, no matching entry (each difference named with its
            flag), or a training shard the entry does not cover.
    """
    from alignment.data.manifest import MANIFEST_NAME

    if not isinstance(spec, str) or not (Path(spec).suffix == ".json" or (Path(spec) / MANIFEST_NAME).is_file()):
        raise ValueError(f"--data.train_shards must be a shard build (its folder or manifest.json) with stored teacher "
                         f"embeddings, got {spec!r}")
    file, entries = entries_of(spec, TEACHER_DIR, split)
    write = (f"write them with `align embed-teacher --shards {file.parent} --model {want.get('model')} --split {split}"
             f" --pivot {want.get('pivot')}`")
    if not entries:
        raise ValueError(f"{file} has no teacher embeddings for the {split} split; {write}")
    reasons = []
    local = resolved_model(str(want.get("model")))
    want = {**want, "weights_sha256": weights_sha256(local) if local is not None else None}
    for key, record in entries:
        diff = differences(record.get("identity", {}), want)
        if diff:
            reasons.append(f"entry {key}: {'; '.join(diff)}")
            continue
        paths = sidecar_paths(file, record, split)
        missing = [ref.url for ref in shards if ref.url not in paths]
        if missing:
            reasons.append(f"entry {key} does not cover {len(missing)} training shard(s), e.g. {missing[0]}")
            continue
        line = (f"data: stored teacher embeddings (entry {key} of {file}, {record['identity'].get('dtype')}) for "
                f"{len(shards)} {split} shards: the teacher is not loaded")
        return [replace(ref, teacher=paths[ref.url]) for ref in shards], line
    raise ValueError(f"no teacher embeddings in {file} match the configured teacher: {' | '.join(reasons)}; {write}")


def stored_vector(stored: dict[str, Tensor], key: str, shard: Any) -> Tensor:
    """The stored vector of sample ``key`` of ``shard`` (a ``ShardRef``); a missing one is an error naming both
    files (a sidecar that no longer matches its shard)."""
    try:
        return stored[key]
    except KeyError:
        raise ValueError(f"{shard.teacher} has no teacher embedding for sample {key!r} of {shard.url}: the sidecar "
                         f"does not match its shard; run `align shards verify`, then {FIX}") from None
