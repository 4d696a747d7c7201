"""``align mine-negatives``: store, per training row, its nearest non-translation rows under an encoder.

Every text of the split is embedded (``alignment.evaluate.encode``: the same
batching, truncation and prefix as ``align eval``); a row's vector is the
normalised mean of its texts' unit vectors (its language-independent meaning).
Each row's ``k`` nearest other rows by cosine (``alignment.evaluate.search.knn``:
exact chunked search, or FAISS when installed, ``--backend``) are stored into the
shard build as a sidecar with their texts (:mod:`alignment.data.hard_negatives`),
recorded in the manifest with the encoder's identity and checked by ``align
shards verify``. A row sharing a near-identical text with the query row
(:mod:`alignment.data.identity`: "Save" of Django and "Save" of Wagtail) is a
false negative and is never stored; the count of such rows skipped is reported.

``align fit --data.hard_negatives K`` then puts each drawn row's first ``K``
stored negatives in the same batch.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from alignment.commands.common import add_config, build, new_parser, parse
from alignment.commands.eval import USER_ERRORS, error
from alignment.data.hard_negatives import encode_lines, record_entry
from alignment.data.identity import text_ids
from alignment.data.manifest import load_manifest, manifest_file
from alignment.data.rows import MultiWayRow
from alignment.data.tokens import _text_samples
from alignment.evaluate.encode import EncodeConfig, encode_texts, quiet_library_bars, resolve_prefix
from alignment.evaluate.search import KNN_BACKENDS, KnnBackend, knn, resolve_backend
from alignment.model import Pooling

SEARCH_SLACK = 32
"""Extra neighbours searched beyond ``k`` so that rows dropped as false negatives can be replaced."""


@dataclass
class MineNegativesConfig:
    """What ``align mine-negatives`` does (one field per flag)."""

    shards: str
    """The shard build: its folder or its manifest.json (as written by align shards build)."""
    model: str
    """Encoder that ranks the rows: an align export folder, a sentence-transformers or Hugging Face folder or hub
    name, or a training checkpoint (as for align eval)."""
    k: int = 4
    """Negatives stored per row (training uses the first --data.hard_negatives of them)."""
    split: str = "train"
    """The split of the build to mine (negatives are drawn from the same split only)."""
    backend: KnnBackend = "auto"
    """k-NN search: exact (chunked torch matmul), faiss (needs faiss installed), auto (faiss for large searches when
    installed)."""
    chunk_size: int = 4096
    """Rows scored per matmul in the exact search."""
    pooling: Pooling | None = None
    """Override the pooling (default: the encoder meta's, else mean)."""
    device: str = "cpu"
    """Torch device to encode on."""
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    """Batching, truncation, prefix, seed, progress bars."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in KNN_BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(KNN_BACKENDS)}, got {self.backend!r}")


@dataclass
class SplitRows:
    """The rows of one split in shard order: keys, texts, the text shard (relative path) of each."""

    keys: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    texts: list[dict[str, str]] = field(default_factory=list)
    shard_of: list[str] = field(default_factory=list)


def read_split(shards: str, split: str, min_rows: int = 2) -> SplitRows:
    """Every row of ``split``; a missing build or split, or fewer than ``min_rows`` rows, is an error naming the
    flag (before any model loads)."""
    file = manifest_file(shards)
    manifest = load_manifest(file)
    if split not in manifest["splits"]:
        raise ValueError(f"--split {split!r}: {file} has the splits {', '.join(sorted(manifest['splits']))}")
    out = SplitRows()
    for shard in manifest["splits"][split]["shards"]:
        for key, payload in _text_samples(file.parent / shard["path"]):  # the keys the training stream reads
            row = MultiWayRow.from_json(json.loads(payload.decode("utf-8")), source=f"{shard['path']}:{key}")
            out.keys.append(key)
            out.ids.append(str(row.id))
            out.texts.append(dict(row.texts))
            out.shard_of.append(shard["path"])
    if len(out.keys) < min_rows:
        raise ValueError(f"--split {split!r}: {len(out.keys)} row(s) in {file}; at least {min_rows} needed")
    return out


def row_vectors(text_vectors: Tensor, rows: SplitRows) -> Tensor:
    """``(R, D)`` unit vectors: each row's normalised mean of its texts' unit vectors."""
    unit = torch.nn.functional.normalize(text_vectors.float(), dim=-1)  # (N, D)
    owner = torch.tensor([r for r, texts in enumerate(rows.texts) for _ in texts])  # (N,)
    sums = torch.zeros(len(rows.texts), unit.shape[1]).index_add_(0, owner, unit)  # (R, D)
    return torch.nn.functional.normalize(sums, dim=-1)


def nearest_rows(vectors: Tensor, identities: list[set[int]], k: int, *, backend: str, chunk_size: int
                 ) -> tuple[list[list[tuple[int, float]]], int]:
    """Each row's ``k`` nearest other rows ``(index, cosine)``, most similar first, skipping rows that share a text
    identity with it; and the number of such false negatives skipped."""
    scores, index = knn(vectors, vectors, min(k + 1 + SEARCH_SLACK, vectors.shape[0]), chunk_size=chunk_size,
                        backend=backend)  # (R, k'), (R, k')
    out, skipped = [], 0
    for r, (row_scores, row_index) in enumerate(zip(scores.tolist(), index.tolist())):
        chosen = []
        for score, j in zip(row_scores, row_index):
            if j == r:
                continue
            if identities[r] & identities[j]:
                skipped += 1
                continue
            chosen.append((j, score))
            if len(chosen) == k:
                break
        out.append(chosen)
    return out, skipped


def parameters_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes): the encoder's identity, whatever its path."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sidecars(rows: SplitRows, found: list[list[tuple[int, float]]]) -> dict[str, bytes]:
    """Text shard -> its sidecar bytes: one JSON line per row in shard order, negatives with their texts."""
    lines: dict[str, list[dict]] = {}
    for r, neighbours in enumerate(found):
        negatives = [{"id": rows.ids[j], "key": rows.keys[j], "texts": rows.texts[j], "score": round(s, 6)}
                     for j, s in neighbours]
        lines.setdefault(rows.shard_of[r], []).append({"key": rows.keys[r], "negatives": negatives})
    return {shard: encode_lines(shard_lines) for shard, shard_lines in lines.items()}


HELP = "store each training row's nearest non-translation rows (hard negatives) into the shards"
EXAMPLES = """\
examples:
  align mine-negatives --shards data/gettext --model runs/demo/export --k 4
  align mine-negatives --shards data/gettext/manifest.json --model intfloat/multilingual-e5-small --backend faiss
  align fit --config configs/debug.yaml --data.train_shards data/gettext --data.hard_negatives 2
"""


def parser():
    p = new_parser("mine-negatives", __doc__.split("\n\n")[1].replace("\n", " "), EXAMPLES)
    add_config(p, MineNegativesConfig)
    return p


def main(argv: Sequence[str]) -> int:
    p = parser()
    config = build(p, parse(p, argv, "mine-negatives"), MineNegativesConfig, "mine-negatives")
    try:
        quiet_library_bars(config.encode)
        rows = read_split(config.shards, config.split)  # errors before the model loads
        resolve_backend(config.backend, len(rows.keys) ** 2)  # faiss requested but missing: before compute
        model, tokenizer, info = load_encoder_for(config)
        prefix = resolve_prefix(info, config.encode.prefix)
        start = time.perf_counter()
        flat = [text for texts in rows.texts for text in texts.values()]
        vectors = row_vectors(encode_texts(model, tokenizer, flat, config.encode, prefix=prefix, desc=config.split),
                              rows)  # (R, D)
        identities = [set(text_ids(texts.values())) for texts in rows.texts]
        found, skipped = nearest_rows(vectors, identities, config.k, backend=config.backend,
                                      chunk_size=config.chunk_size)
        seconds = time.perf_counter() - start
        identity = {"model": config.model, "parameters_sha256": parameters_sha256(model), "pooling": model.pooling,
                    "prefix": prefix, "max_length": config.encode.max_length, "k": config.k, "split": config.split}
        scores = [s for neighbours in found for _, s in neighbours]
        stats = {"rows": len(found), "false_negatives_skipped": skipped,
                 "rows_short_of_k": sum(len(n) < config.k for n in found),
                 "mean_score": round(sum(scores) / max(len(scores), 1), 6),
                 "backend": resolve_backend(config.backend, len(rows.keys) ** 2), "seconds": round(seconds, 2)}
        key, _ = record_entry(config.shards, identity, sidecars(rows, found), stats)
    except (*USER_ERRORS, ImportError) as exc:
        return error("mine-negatives", exc)
    print(json.dumps(stats))
    print(f"wrote negatives {key} ({config.k} per row, {config.split}) into {manifest_file(config.shards)}")
    return 0


def load_encoder_for(config):
    """The encoder of a command's ``--model`` (with ``--device``, ``--pooling``): ``(model, tokenizer, info)``."""
    from alignment.evaluate.encoder import load_encoder

    return load_encoder(Path(config.model) if Path(config.model).exists() else config.model, device=config.device,
                        pooling=config.pooling)
