"""Mined hard negatives stored beside a shard build, keyed by the encoder that mined them.

``align mine-negatives --shards DIR --model M --k K`` writes, for every text shard
``DIR/<split>/<name>.tar`` of the mined split, a sidecar
``DIR/negatives/<key>/<split>/<name>.jsonl``: one line per row of the shard, in
the shard's order, ``{"key": <sample key>, "negatives": [{"id", "texts", "score"}, ...]}``,
the row's ``K`` nearest *other* rows under the encoder, most similar first, each
with its texts. The texts travel with the row so that a streaming loader (which
reads shards in order, with no random access) can put a row and its hard
negatives in the same batch. Cost: the sidecar holds about ``K`` copies of the
split's text (gettext train split, K = 4: 3.7 MB beside 2.5 MB of shards).

Rows whose text identity (:mod:`alignment.data.identity`) matches any text of the
query row are never stored as its negatives: they are false negatives ("Save" of
Django and "Save" of Wagtail).

``key`` is the first 16 hex digits of the sha256 of the identity: the encoder's
identity (its spec, a sha256 over its parameters, pooling, prefix, max length),
``k`` and the split. The manifest's ``negatives`` object lists each entry with
that identity, the files (rows, bytes, sha256) and mining statistics; ``align
shards verify`` checks every file; ``align fit --data.hard_negatives K`` reads
the newest entry (see :func:`negatives_paths`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from alignment.data.manifest import manifest_file
from alignment.data.sidecar import entries_of, format_entries, record_sidecars, sidecar_paths, verify_entries

NEGATIVES_DIR = "negatives"
FIX = "re-run `align mine-negatives` (it rewrites the entry)"


def encode_lines(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in lines).encode("utf-8")


def read_sidecar(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Sample key -> its stored negatives (``id``, ``texts``, ``score``), for one shard's sidecar."""
    out: dict[str, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            out[str(obj["key"])] = list(obj["negatives"])
    return out


def record_entry(shards: str | Path, identity: dict[str, Any], files: dict[str, bytes], stats: dict[str, Any]
                 ) -> tuple[str, dict[str, Any]]:
    """Publish the sidecars (``files``: text shard path relative to the build -> sidecar bytes) under
    ``negatives/<key>/`` as one folder, then the manifest entry (:func:`alignment.data.sidecar.record_sidecars`)."""
    return record_sidecars(shards, NEGATIVES_DIR, identity,
                           {text: (data, data.count(b"\n")) for text, data in files.items()}, stats, suffix=".jsonl")


def _check_keys(f: dict, data: bytes, text_keys: list[str]) -> str | None:
    keys = [json.loads(line)["key"] for line in data.decode("utf-8").splitlines()]
    if keys != text_keys:
        return f"its {len(keys)} row keys do not match the {len(text_keys)} of {f['text']} in order"
    return None


def verify_negatives(root: Path, manifest: dict) -> list[str]:
    """Problems of the manifest's negatives entries: every file present, inside the folder, of the recorded size
    and sha256, one line per row of its text shard, in order."""
    return verify_entries(root, manifest, NEGATIVES_DIR, FIX, _check_keys)


def format_negatives(manifest: dict) -> str:
    """The negatives entries as a table (empty string when there are none)."""
    return format_entries(manifest, NEGATIVES_DIR, "negatives key", [("k", "k", ">3")])


def negatives_paths(spec: Any, split: str) -> tuple[str, dict[str, str], int]:
    """``(key, text shard path -> sidecar path, k)`` of the newest entry of ``split``, absolute paths.

    Raises:
        ValueError: the manifest has no entry for the split (names the command that writes one).
    """
    file, entries = entries_of(spec, NEGATIVES_DIR, split)
    if not entries:
        raise ValueError(f"--data.hard_negatives: {file} has no mined negatives for the {split} split; write them "
                         f"with `align mine-negatives --shards {file.parent} --model M --split {split}`")
    key, record = entries[0]
    return key, sidecar_paths(file, record, split), int(record["identity"].get("k", 0))


def attach_negatives(shards: list, spec: Any, split: str, k: int) -> tuple[list, str]:
    """``shards`` (``ShardRef``) with their negatives sidecars, and a line for the log.

    Raises:
        ValueError: no manifest, no entry for the split, or fewer stored negatives than ``k`` (before compute).
    """
    from dataclasses import replace

    from alignment.data.manifest import MANIFEST_NAME

    if not isinstance(spec, str) or not (Path(spec).suffix == ".json" or (Path(spec) / MANIFEST_NAME).is_file()):
        raise ValueError(f"--data.hard_negatives {k} needs --data.train_shards to be a shard build (its folder or "
                         f"manifest.json) with mined negatives, got {spec!r}")
    key, paths, stored = negatives_paths(spec, split)
    if stored < k:
        raise ValueError(f"--data.hard_negatives {k}: entry {key} of {manifest_file(spec)} stores {stored} per row; "
                         f"lower it or re-run `align mine-negatives --k {k}`")
    covered = [replace(ref, negatives=paths.get(ref.url)) for ref in shards]
    have = sum(ref.negatives is not None for ref in covered)
    return covered, f"data: {k} hard negatives per row from entry {key} ({have} of {len(covered)} shards)"


def hard_negative_rows(rows: list, config: Any, languages: tuple[str, ...]) -> list:
    """The extra ``SelectedRow`` of a batch: each row's first ``config.hard_negatives`` stored negatives, in row
    order, skipping rows already in the batch (by row id) and rows with fewer than two texts in ``languages``."""
    from alignment.data.collate import SelectedRow, select_languages

    k = config.hard_negatives
    if not k:
        return []
    lang_index = {lang: i for i, lang in enumerate(languages)}
    seen = {row.key for row in rows}
    extras = []
    for row in rows:
        for negative in (row.negatives or [])[:k]:
            texts = {lang: t for lang, t in negative["texts"].items() if lang in lang_index and t.strip()}
            key = str(negative["id"])
            if key in seen or len(texts) < 2:
                continue
            rng = random.Random(f"{config.seed}/negative/{row.key}/{key}")
            chosen = select_languages(sorted(texts), policy=config.language_policy, k=config.k, pivot=config.pivot,
                                      rng=rng)
            if chosen is None:
                continue
            seen.add(key)
            extras.append(SelectedRow(key, [lang_index[lang] for lang in chosen], [texts[lang] for lang in chosen]))
    return extras
