"""``align embed-teacher``: store a distillation teacher's embedding of every row's pivot sentence into the shards.

Each row's pivot text (its text in ``--pivot``, exactly as the training stream reads it) is embedded once by the
teacher (``alignment.evaluate.encode``: the batching, truncation, prefix and pooling of ``align eval``), and the
vectors are stored per text shard beside the build (:mod:`alignment.data.teacher`: safetensors, float16 by
default, keyed by the row's sample key), recorded in the manifest with the teacher's identity (spec, weights
fingerprint, pooling, prefix, max length, width, pivot) and checked by ``align shards verify``.

``align fit --model.distill.teacher TEACHER --model.distill.teacher_embeddings stored`` then reads them with the
rows and never loads the teacher (no teacher forward per step, no teacher in device memory); ``--encode.prefix``,
``--encode.max_length`` and ``--pooling`` must equal ``--model.distill.text_prefix``, ``.max_length`` and
``.pooling`` (the entry is refused otherwise, naming the flag).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from alignment.commands.common import add_config, build, new_parser, parse
from alignment.commands.eval import USER_ERRORS, error
from alignment.commands.mine_negatives import SplitRows, load_encoder_for, read_split
from alignment.data.manifest import manifest_file
from alignment.data.teacher import (
    TEACHER_DTYPES,
    TeacherDtype,
    encode_sidecar,
    pivot_text,
    record_teacher,
    resolved_model,
    weights_sha256,
)
from alignment.evaluate.encode import EncodeConfig, encode_texts, quiet_library_bars, resolve_prefix
from alignment.languages import DEFAULT_PIVOT, LanguageCodeError, normalize_language
from alignment.model import Pooling


@dataclass
class EmbedTeacherConfig:
    """What ``align embed-teacher`` does (one field per flag)."""

    shards: str
    """The shard build: its folder or its manifest.json (as written by align shards build)."""
    model: str
    """The teacher: an align export folder, a sentence-transformers or Hugging Face folder or hub name, or a
    training checkpoint (what --model.distill.teacher names in align fit)."""
    split: str = "train"
    """The split of the build to embed (align fit reads the train split)."""
    pivot: str = DEFAULT_PIVOT
    """The language whose text the teacher embeds (align fit's --data.pivot)."""
    dtype: TeacherDtype = "float16"
    """Stored precision: float16 (half the bytes; rounding within 2^-11 = 4.9e-4 relative) or float32 (the
    teacher's own)."""
    pooling: Pooling | None = None
    """Override the teacher's pooling (default: its saved setting, else mean); as --model.distill.pooling."""
    device: str = "cpu"
    """Torch device to encode on."""
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    """Batching, truncation (as --model.distill.max_length), prefix (unset: the teacher's recorded query prefix;
    as --model.distill.text_prefix), seed, progress bars."""

    def __post_init__(self) -> None:
        if self.dtype not in TEACHER_DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.dtype!r}")
        try:
            self.pivot = normalize_language(self.pivot)
        except LanguageCodeError as exc:
            raise ValueError(f"--pivot {self.pivot!r}: {exc}") from exc


def pivot_vectors(model, tokenizer, rows: SplitRows, config: EmbedTeacherConfig, prefix: str
                  ) -> tuple[torch.Tensor, list[bool]]:
    """``(R, D)`` the teacher's embedding of each row's pivot text (zeros where a row has none), and which rows
    have one."""
    texts = [pivot_text(t, config.pivot) for t in rows.texts]
    index = [r for r, text in enumerate(texts) if text is not None]
    out = torch.zeros(len(texts), model.embedding_dim)
    if index:
        out[torch.tensor(index)] = encode_texts(model, tokenizer, [texts[r] for r in index], config.encode,
                                                prefix=prefix, desc=config.split, language=config.pivot)
    return out, [text is not None for text in texts]


def sidecars(rows: SplitRows, vectors: torch.Tensor, has: list[bool], dtype: str) -> dict[str, tuple[bytes, int]]:
    """Text shard -> ``(its sidecar bytes, rows)``: the shard's rows in shard order."""
    by_shard: dict[str, list[int]] = {}
    for r, shard in enumerate(rows.shard_of):
        by_shard.setdefault(shard, []).append(r)
    return {shard: (encode_sidecar([rows.keys[r] for r in index], vectors[index], [has[r] for r in index], dtype),
                    len(index)) for shard, index in by_shard.items()}


HELP = "store a distillation teacher's embedding of each row's pivot sentence into the shards"
EXAMPLES = """\
examples:
  align embed-teacher --shards data/gettext --model sentence-transformers/all-mpnet-base-v2 --encode.prefix ''
  align embed-teacher --shards data/gettext/manifest.json --model runs/teacher/export --dtype float32
  align fit --config configs/recipes/objectives/distill-stored.yaml --data.train_shards data/gettext
"""


def parser():
    p = new_parser("embed-teacher", __doc__.split("\n\n")[1].replace("\n", " "), EXAMPLES)
    add_config(p, EmbedTeacherConfig)
    return p


def main(argv: Sequence[str]) -> int:
    from alignment.deploy.maps import model_fingerprint

    p = parser()
    config = build(p, parse(p, argv, "embed-teacher"), EmbedTeacherConfig, "embed-teacher")
    try:
        quiet_library_bars(config.encode)
        rows = read_split(config.shards, config.split, min_rows=1)  # errors before the model loads
        model, tokenizer, info = load_encoder_for(config)
        prefix = resolve_prefix(info, config.encode.prefix)
        start = time.perf_counter()
        vectors, has = pivot_vectors(model, tokenizer, rows, config, prefix)  # (R, D)
        seconds = time.perf_counter() - start
        identity = {"model": config.model, "model_path": resolved_model(config.model),
                    "fingerprint": model_fingerprint(model), "weights_sha256": weights_sha256(config.model),
                    "pooling": model.pooling, "pooling_option": config.pooling,
                    "prefix": prefix, "max_length": config.encode.max_length, "dim": int(model.embedding_dim),
                    "normalize": bool(info.normalize), "pivot": config.pivot, "split": config.split,
                    "dtype": config.dtype}
        files = sidecars(rows, vectors, has, config.dtype)
        stats = {"rows": len(has), "rows_without_pivot": has.count(False), "dim": int(model.embedding_dim),
                 "bytes": sum(len(data) for data, _ in files.values()), "seconds": round(seconds, 2)}
        key, _ = record_teacher(config.shards, identity, files, stats)
    except (*USER_ERRORS, ImportError) as exc:
        return error("embed-teacher", exc)
    print(json.dumps(stats))
    print(f"wrote teacher embeddings {key} ({config.split}, {config.dtype}, prefix {prefix!r}) into "
          f"{manifest_file(config.shards)}; train with --model.distill.teacher {config.model} "
          f"--model.distill.teacher_embeddings stored")
    return 0

