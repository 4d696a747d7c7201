"""Pre-tokenised shards: token ids stored beside the text of a shard build, keyed by the tokenizer's identity.

``align shards tokenize --shards DIR --tokenizer T`` writes, for every text shard
``DIR/<split>/<name>.tar``, a sidecar ``DIR/tokens/<key>/<split>/<name>.tar``
holding one member ``<sample key>.ids`` per text sample, in the text shard's
order: a JSON header line ``{"<code>": n, ...}`` (the sample's text languages
as its JSON spells them, in order) then the ids as little-endian int32, the
languages one after another, then each text's identity (``alignment.data.identity``, the
duplicate mask's key) as little-endian int64, announced by ``"#identity": IDENTITY_VERSION``
in the header (the loader then hashes no text; payloads without it, written before, are
read as before and their texts hashed). A reader walks the text shard and its sidecar in
lockstep (one sequential read each), so shuffling, language selection, epoch
plans and exact resume see the same samples in the same order as without it.

``key`` is the first 16 hex digits of the sha256 of the identity: everything that
changes the ids (vocabulary, the tokenizer's whole pipeline, special tokens,
truncation side, max length, text prefix). The tokenizer's name or path is
recorded but is not part of the key: the same tokenizer under another path
gives the same ids. The manifest's ``tokens`` object lists each entry with its
identity, the files, their samples, token counts, sizes and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignment.data.identity import IDENTITY_VERSION, text_id
from alignment.data.manifest import load_manifest, manifest_file, plain_relative_path
from alignment.data.tario import iter_json_samples, iter_tar
from alignment.staging import inside_folder

TOKENS_DIR = "tokens"
IDS_EXT = ".ids"
IDENTITY_FLAGS = {"max_length": "--data.max_length", "text_prefix": "--data.text_prefix"}
"""Identity fields the training config sets, and the flag that sets them (for the fallback message)."""


@dataclass
class TokenizeConfig:
    """``align shards tokenize``: which build, which tokenizer, and the training's max length and prefix."""

    shards: str
    """The shard build: its folder or its manifest.json (every split is tokenised)."""
    tokenizer: str
    """Tokenizer name or local path (`AutoTokenizer.from_pretrained`), the one training uses as
    `--data.tokenizer`."""
    max_length: int = 128
    """Tokens per sentence, special tokens included, as training's `--data.max_length` (ids are used only when
    it matches)."""
    text_prefix: str = ""
    """Prepended to every sentence before tokenising, as training's `--data.text_prefix` (e.g. `query: `)."""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"--max_length must be >= 2 tokens, got {self.max_length}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pipeline(tokenizer: Any) -> str:
    """The fast tokenizer's pipeline (normalizer, pre-tokenizer, model, post-processor, added tokens) as
    canonical JSON, without the truncation and padding state the last call left on it; "" for slow ones."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ""
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return json.dumps(spec, sort_keys=True, ensure_ascii=False)


def tokenizer_identity(tokenizer: Any, *, max_length: int, text_prefix: str) -> dict[str, Any]:
    """What decides the ids :func:`alignment.data.collate.tokenize` gives (the key is this dict's hash)."""
    vocab = tokenizer.get_vocab()
    special = {name: value for name, value in sorted(tokenizer.special_tokens_map.items())}
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "vocab_sha256": _sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")),
        "pipeline_sha256": _sha256(_pipeline(tokenizer).encode("utf-8")),
        "special_tokens": special,
        "special_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "add_special_tokens": True,
        "truncation_side": str(getattr(tokenizer, "truncation_side", "right")),
        "padding_side": str(getattr(tokenizer, "padding_side", "right")),
        "max_length": int(max_length),
        "text_prefix": text_prefix,
    }


def identity_key(identity: dict[str, Any]) -> str:
    return _sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8"))[:16]


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# --------------------------------------------------------------------------- sidecar members


IDENTITY_KEY = "#identity"
"""Header key announcing the texts' identities after the ids (its value: ``IDENTITY_VERSION``)."""


def encode_ids(ids: dict[str, list[int]], text_ids: dict[str, int] | None = None) -> bytes:
    """One sample's member payload: a JSON header of languages and lengths, then the int32 ids; with
    ``text_ids`` (each text's :func:`alignment.data.identity.text_id`, same languages) the header also holds
    ``"#identity": IDENTITY_VERSION`` and the identities follow the ids as int64, in the header's order."""
    lengths: dict[str, int] = {code: len(seq) for code, seq in ids.items()}
    tail = b""
    if text_ids is not None:
        lengths[IDENTITY_KEY] = IDENTITY_VERSION
        tail = np.asarray([text_ids[code] for code in ids], dtype="<i8").tobytes()
    header = json.dumps(lengths, ensure_ascii=False).encode("utf-8")
    flat = [i for seq in ids.values() for i in seq]
    return header + b"\n" + np.asarray(flat, dtype="<i4").tobytes() + tail


def decode_sample(payload: bytes) -> tuple[dict[str, list[int]], dict[str, int] | None]:
    """The inverse of :func:`encode_ids`: ``(ids, text identities)``; the identities are None when the payload
    has none or they were computed by another ``IDENTITY_VERSION`` (raises ValueError on a damaged payload)."""
    head, sep, body = payload.partition(b"\n")
    if not sep:
        raise ValueError("no header line")
    lengths = json.loads(head)
    if not isinstance(lengths, dict):
        raise ValueError("header is not an object of lengths")
    version = lengths.pop(IDENTITY_KEY, None)
    identities = 8 * len(lengths) if version is not None else 0
    if (len(body) - identities) % 4 or len(body) < identities:
        raise ValueError(f"{len(body)} bytes of ids, not whole int32 values")
    ids_bytes = len(body) - identities
    flat = np.frombuffer(body, dtype="<i4", count=ids_bytes // 4).tolist()  # one conversion, then list slices
    out, start = {}, 0
    for code, n in lengths.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"length {n!r} of {code!r} is not a count")
        out[code] = flat[start : start + n]
        start += n
    if start != len(flat):
        raise ValueError(f"{len(flat)} ids for {start} announced")
    if version != IDENTITY_VERSION:
        return out, None
    stored = np.frombuffer(body, dtype="<i8", offset=ids_bytes).tolist()
    return out, dict(zip(lengths, stored))


def decode_ids(payload: bytes) -> dict[str, list[int]]:
    """The ids of :func:`decode_sample`."""
    return decode_sample(payload)[0]


def iter_sidecar(path: str) -> Iterator[tuple[str, bytes]]:
    """``(sample key, payload)`` of every ``<key>.ids`` member of a sidecar, streaming (raises on damage).

    Read with :func:`~alignment.data.tario.iter_tar` (Python's ``tarfile`` spends more time parsing headers
    than the stream spends on the ids); raises ``tarfile.ReadError`` on damage.
    """
    with open(path, "rb", buffering=1 << 20) as fh:
        for name, data in iter_tar(fh, path):
            if name.endswith(IDS_EXT):
                yield name[: -len(IDS_EXT)], data


# --------------------------------------------------------------------------- writing (align shards tokenize)


def _sample_ids(tokenizer: Any, samples: list[tuple[str, bytes]], *, max_length: int, text_prefix: str
                ) -> list[tuple[dict[str, list[int]], dict[str, int]]]:
    """Ids and text identities of every string text of each sample (``{}`` for a sample whose JSON is bad), one
    tokenizer call."""
    from alignment.data.collate import tokenize

    texts_of: list[list[tuple[str, str]]] = []
    for _, payload in samples:
        try:
            raw = json.loads(payload)["texts"]
            texts_of.append([(str(c), t) for c, t in raw.items() if isinstance(t, str)] if isinstance(raw, dict)
                            else [])
        except (ValueError, KeyError, TypeError):
            texts_of.append([])
    flat = tokenize(tokenizer, [t for texts in texts_of for _, t in texts], max_length=max_length, prefix=text_prefix)
    out, start = [], 0
    for texts in texts_of:
        out.append(({code: list(flat[start + i]) for i, (code, _) in enumerate(texts)},
                    {code: text_id(text) for code, text in texts}))
        start += len(texts)
    return out


def _text_samples(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(sample key, JSON payload)`` of a text shard, read as the training stream reads it."""
    with open(path, "rb", buffering=1 << 20) as fh:
        yield from iter_json_samples(fh, str(path))


def write_sidecar(text: Path, out: Path, tokenizer: Any, *, max_length: int, text_prefix: str,
                  chunk: int = 512) -> dict[str, int]:
    """Tokenise one text shard into the sidecar ``out`` (a plain write: the caller publishes the folder)."""
    samples = tokens = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        pending: list[tuple[str, bytes]] = []

        def flush() -> None:
            nonlocal samples, tokens
            for (key, _), (ids, identities) in zip(pending, _sample_ids(tokenizer, pending, max_length=max_length,
                                                                        text_prefix=text_prefix)):
                payload = encode_ids(ids, identities)
                info = tarfile.TarInfo(key + IDS_EXT)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))
                samples += 1
                tokens += sum(map(len, ids.values()))
            pending.clear()

        for sample in _text_samples(text):
            pending.append(sample)
            if len(pending) >= chunk:
                flush()
        flush()
    return {"rows": samples, "tokens": tokens}


def tokenize_build(shards: str | os.PathLike, tokenizer: Any, *, max_length: int, text_prefix: str,
                   log: Any = print) -> tuple[str, dict[str, Any], bool]:
    """Write (or find) the sidecars of every split of a build and record them in its manifest.

    Returns ``(key, entry, written)``; ``written`` is False when an entry with this
    key whose files all verify and store the texts' identities of this ``IDENTITY_VERSION`` is already there
    (a re-run changes nothing; an entry written before identities were stored is rewritten). The
    sidecar folder ``tokens/<key>`` is published as a whole, then the manifest,
    both through :mod:`alignment.fsutil`: an interrupted run leaves the manifest
    and the text shards as they were.
    """
    from alignment import fsutil

    file = manifest_file(shards)
    manifest = load_manifest(file)
    root = file.parent
    identity = tokenizer_identity(tokenizer, max_length=max_length, text_prefix=text_prefix)
    key = identity_key(identity)
    existing = manifest.get("tokens", {}).get(key)
    if existing is not None and existing.get("text_ids") == IDENTITY_VERSION and not verify_tokens(root, manifest,
                                                                                                   only=key):
        return key, existing, False
    fsutil.recover_in(root / TOKENS_DIR) if (root / TOKENS_DIR).is_dir() else None
    splits: dict[str, Any] = {}
    with fsutil.publish_folder(root / TOKENS_DIR / key) as staging:
        for split, entry in manifest["splits"].items():
            files = []
            for shard in entry["shards"]:
                rel = f"{split}/{Path(shard['path']).name}"
                counts = write_sidecar(root / shard["path"], staging / rel, tokenizer, max_length=max_length,
                                       text_prefix=text_prefix)
                data = (staging / rel).read_bytes()
                files.append({"path": f"{TOKENS_DIR}/{key}/{rel}", "text": shard["path"], "rows": counts["rows"],
                              "tokens": counts["tokens"], "bytes": len(data), "sha256": _sha256(data)})
                log(f"tokens: {rel}: {counts['rows']} samples, {counts['tokens']} tokens")
            splits[split] = {"shards": files, "rows": sum(f["rows"] for f in files),
                             "tokens": sum(f["tokens"] for f in files)}
    record = {"tokenizer": tokenizer_name(tokenizer), "identity": identity, "text_ids": IDENTITY_VERSION,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "splits": splits}
    manifest = load_manifest(file)  # as it is now: another entry may have been added meanwhile
    manifest.setdefault("tokens", {})[key] = record
    fsutil.publish_file(file, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return key, record, True


# --------------------------------------------------------------------------- verify, inspect, match


def verify_tokens(root: Path, manifest: dict, only: str | None = None) -> list[str]:
    """Problems of the manifest's token entries (all, or ``only`` one): each file present, inside the
    folder, of the recorded size and sha256, its members the text shard's sample keys in order."""
    problems: list[str] = []
    fix = "re-run `align shards tokenize` with the same tokenizer (it rewrites the entry)"
    entries = manifest.get("tokens", {})
    if not isinstance(entries, dict):
        return ["manifest: 'tokens' must be an object"]
    for key, record in entries.items():
        if only is not None and key != only:
            continue
        try:
            splits = record["splits"]
            files = [f for entry in splits.values() for f in entry["shards"]]
            texts = {s["path"] for e in manifest["splits"].values() for s in e["shards"]}
        except (KeyError, TypeError, AttributeError) as exc:
            problems.append(f"tokens {key}: malformed manifest entry ({exc}); {fix}")
            continue
        for missing in sorted(texts - {f.get("text") for f in files}):
            problems.append(f"tokens {key}: no token file for text shard {missing}; {fix}")
        for f in files:
            problems += _verify_sidecar(root, key, f, fix)
    return problems


def _verify_sidecar(root: Path, key: str, f: dict, fix: str) -> list[str]:
    rel = str(f.get("path", ""))
    if not plain_relative_path(rel) or not rel.startswith(f"{TOKENS_DIR}/{key}/"):
        return [f"tokens {key}: {rel!r} is not a path under {TOKENS_DIR}/{key}/; {fix}"]
    path = root / rel
    if not path.is_file():
        return [f"{rel}: token file missing (tokens {key}); {fix}"]
    if not inside_folder(path, root):
        return [f"{rel}: a link to {path.resolve()}, outside the shard folder; {fix}"]
    data = path.read_bytes()
    if len(data) != f.get("bytes") or _sha256(data) != f.get("sha256"):
        return [f"{rel}: token file changed after it was written (size {len(data)}, manifest {f.get('bytes')}; "
                f"sha256 {_sha256(data)[:12]}..., manifest {str(f.get('sha256'))[:12]}...); {fix}"]
    try:
        keys = [k for k, payload in iter_sidecar(str(path)) if decode_ids(payload) is not None]
        text_keys = [k for k, _ in _text_samples(root / f["text"])]
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        return [f"{rel}: unreadable ({' '.join(str(exc).split())}); {fix}"]
    if keys != text_keys:
        return [f"{rel}: its {len(keys)} sample keys do not match the {len(text_keys)} of {f['text']} in order; {fix}"]
    return []


def format_tokens(manifest: dict) -> str:
    """The token entries as a table (empty string when there are none)."""
    entries = manifest.get("tokens") or {}
    if not entries:
        return ""
    lines = ["", f"{'tokens key':<18} {'tokenizer':<30} {'max_len':>7} {'prefix':<10} {'files':>6} {'tokens':>10}"]
    for key, rec in entries.items():
        ident, splits = rec.get("identity", {}), rec.get("splits", {})
        files = sum(len(e.get("shards", [])) for e in splits.values())
        tokens = sum(e.get("tokens", 0) for e in splits.values())
        lines.append(f"{key:<18} {str(rec.get('tokenizer'))[-30:]:<30} {ident.get('max_length', '?'):>7} "
                     f"{json.dumps(ident.get('text_prefix', ''), ensure_ascii=False):<10} {files:>6} {tokens:>10}")
    return "\n".join(lines)


def match_tokens(manifest: dict, identity: dict[str, Any]) -> tuple[str | None, dict | None, str]:
    """``(key, record, "")`` for the entry of ``identity``, else ``(None, None, why not)``."""
    entries = manifest.get("tokens") or {}
    key = identity_key(identity)
    if key in entries:
        return key, entries[key], ""
    if not entries:
        return None, None, "the manifest has no pre-tokenised ids (write them with `align shards tokenize`)"
    reasons = []
    for other_key, rec in entries.items():
        theirs = rec.get("identity", {})
        fields = [f for f in sorted(set(identity) | set(theirs)) if identity.get(f) != theirs.get(f)]
        shown = ", ".join(
            f"{f}{' (' + IDENTITY_FLAGS[f] + ')' if f in IDENTITY_FLAGS else ''}: shards {theirs.get(f)!r}, "
            f"configured {identity.get(f)!r}" if f in IDENTITY_FLAGS else f for f in fields
        )
        reasons.append((len(fields), f"entry {other_key} ({rec.get('tokenizer')}) differs in {shown}"))
    return None, None, "identity differs: " + min(reasons)[1]


def sidecar_paths(spec: Any, split: str, key: str) -> dict[str, str]:
    """Absolute text shard path -> absolute sidecar path, for the split of entry ``key`` of a manifest."""
    file = manifest_file(spec)
    root = file.parent.absolute()
    record = load_manifest(file)["tokens"][key]
    out = {}
    for f in record["splits"].get(split, {}).get("shards", []):
        if plain_relative_path(str(f["path"])) and plain_relative_path(str(f["text"])):
            out[str(root / f["text"])] = str(root / f["path"])
    return out


