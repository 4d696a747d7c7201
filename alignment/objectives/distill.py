"""Teacher distillation: every translation of a row is pulled to a frozen teacher's embedding of its pivot.

Reimers & Gurevych (2020), "Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation" (sentence-transformers' multilingual distillation): a teacher (any encoder ``align eval``
loads: an export, a Hugging Face folder or hub name, a checkpoint; with its own tokenizer and pooling)
embeds the pivot sentence of each row once per step, without gradients; each sentence ``s`` of that row,
the pivot included, is pulled to it::

    distill_loss = weight * mean_s dist(e_s, teacher(pivot text of row(s)))
    dist = ||e_s - t||^2 (``mse``)  or  1 - cos(e_s, t) (``cosine``)

Rows without a pivot sentence have no target and no term. The teacher tokenises the batch's *texts*
(``Batch.texts``), so it may use any tokenizer; its embedding width must equal the student's (set
``--model.encoder.projection_dim`` to the teacher's width otherwise: a learned projection head on the
student, trained by this term). ``--model.distill.contrastive_weight 0`` trains on distillation alone,
as sentence-transformers does; the default keeps the contrastive loss beside it.

Distributed: rows never straddle ranks, so each rank embeds its own rows' pivots; the mean is over the
global number of sentences with a target (from the gathered row and language ids), times the world size.

Stored teacher embeddings (large runs): ``align embed-teacher --shards DIR --model TEACHER`` embeds every
row's pivot text once into the shard build (:mod:`alignment.data.teacher`); with
``--model.distill.teacher_embeddings stored`` (or ``auto``) the data stream carries each row's vector into the
batch (``Batch.teacher``) and the teacher model is never loaded: no teacher forward, no teacher in device
memory. The targets are the same rows with the same mask as the teacher's per-step ones
(:func:`stored_targets`); the entry must match the teacher's spec, pooling, max length, prefix, the student's
width and the pivot language (:func:`teacher_identity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from alignment.batch import Batch
from alignment.losses import GlobalCandidates
from alignment.model import Pooling

DistillKind = Literal["mse", "cosine"]
DISTILL_KINDS: tuple[str, ...] = get_args(DistillKind)
TeacherEmbeddings = Literal["off", "auto", "stored"]
TEACHER_EMBEDDINGS: tuple[str, ...] = get_args(TeacherEmbeddings)


@dataclass
class DistillConfig:
    """Distillation from a frozen teacher's embedding of each row's pivot sentence (``--model.distill.*``)."""

    teacher: str | None = None
    """Teacher encoder: an export or encoder folder, a Hugging Face folder or hub name, a Lightning .ckpt
    (as ``align eval --model``); None disables distillation."""
    weight: float = 1.0
    """Weight of the distillation term."""
    kind: DistillKind = "mse"
    """``mse`` (squared L2 distance, summed over the width) or ``cosine`` (1 - cosine)."""
    pooling: Pooling | None = None
    """The teacher's pooling; None = its saved setting, else mean."""
    max_length: int = 128
    """Teacher tokens per pivot sentence (truncation)."""
    text_prefix: str = ""
    """Prefix the teacher expects before each text (E5: ``query: ``)."""
    contrastive_weight: float = 1.0
    """Multiplier of the contrastive loss (``contrastive_loss``); 0 trains on the other terms alone
    (distillation alone, as sentence-transformers' multilingual distillation)."""
    teacher_embeddings: TeacherEmbeddings = "off"
    """Where the teacher's embeddings come from: ``off`` runs the teacher every step; ``stored`` reads the vectors
    `align embed-teacher` stored in the --data.train_shards build (the teacher is never loaded; no entry matching
    this teacher is an error); ``auto`` reads them when an entry matches, else runs the teacher (with a warning)."""

    def __post_init__(self) -> None:
        if self.teacher is not None and not self.teacher:
            raise ValueError("--model.distill.teacher must name an encoder or be null, got ''")
        if self.weight < 0:
            raise ValueError(f"--model.distill.weight must be >= 0, got {self.weight}")
        if self.kind not in DISTILL_KINDS:
            raise ValueError(f"--model.distill.kind must be one of {', '.join(DISTILL_KINDS)}, got {self.kind!r}")
        if self.max_length < 2:
            raise ValueError(f"--model.distill.max_length must be >= 2, got {self.max_length}")
        if self.contrastive_weight < 0:
            raise ValueError(f"--model.distill.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.teacher_embeddings not in TEACHER_EMBEDDINGS:
            raise ValueError(f"--model.distill.teacher_embeddings must be one of {', '.join(TEACHER_EMBEDDINGS)}, "
                             f"got {self.teacher_embeddings!r}")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


def load_teacher(config: DistillConfig, embedding_dim: int):
    """``(teacher DualEncoder, its tokenizer)``, frozen, on the CPU; its width checked against the student's."""
    from alignment.evaluate.encoder import ModelLoadError, load_encoder

    try:
        teacher, tokenizer, _ = load_encoder(config.teacher, device="cpu", pooling=config.pooling)
    except ModelLoadError as exc:
        raise ValueError(f"--model.distill.teacher {config.teacher!r} does not load: {exc}") from exc
    if teacher.embedding_dim != embedding_dim:
        raise ValueError(
            f"--model.distill.teacher {config.teacher!r} embeds in {teacher.embedding_dim} dimensions but the "
            f"student in {embedding_dim}: set --model.encoder.projection_dim {teacher.embedding_dim} (a learned "
            "projection head on the student) or choose a teacher of the student's width"
        )
    teacher.requires_grad_(False)
    teacher._frozen = True  # DualEncoder.train keeps a frozen copy in eval mode
    return teacher.eval(), tokenizer


def teacher_identity(config: DistillConfig, embedding_dim: int) -> dict:
    """What stored teacher embeddings must have been computed with (``alignment.data.teacher.differences``)."""
    return {"model": config.teacher, "pooling": config.pooling, "max_length": config.max_length,
            "prefix": config.text_prefix, "dim": embedding_dim}


def _pivot_sentences(batch: Batch) -> list[int]:
    """Indices of the batch's pivot-language sentences (a host sync): the rows that get a target."""
    return torch.nonzero(batch.lang_ids == batch.pivot_lang_id).flatten().tolist()


def stored_targets(batch: Batch, embedding_dim: int, device) -> tuple[Tensor, Tensor]:
    """``(targets (R, D), has_target (R,) bool)`` from the batch's stored teacher embeddings (``Batch.teacher``):
    the rows and mask :func:`teacher_targets` would give, without the teacher."""
    if batch.teacher is None and batch.num_rows:
        raise ValueError("--model.distill.teacher_embeddings: the batch carries no stored teacher embeddings and the "
                         "teacher is not loaded (a batch built without the data module's attach_teacher?)")
    targets = (batch.teacher if batch.teacher is not None else torch.zeros(0, embedding_dim)).to(device)
    has = torch.zeros(batch.num_rows, dtype=torch.bool, device=device)
    index = _pivot_sentences(batch)
    if index:
        has[batch.row_ids[index].to(device)] = True
    return targets, has


@torch.no_grad()
def teacher_targets(teacher, tokenizer, batch: Batch, config: DistillConfig, device) -> tuple[Tensor, Tensor]:
    """``(targets (R, D), has_target (R,) bool)``: the teacher's embedding of each local row's pivot text."""
    index = _pivot_sentences(batch)
    if len(batch.texts) != batch.num_sentences:
        raise ValueError(
            f"--model.distill.teacher needs the batch's texts, but the batch carries {len(batch.texts)} texts for "
            f"{batch.num_sentences} sentences (a batch built without alignment.data.collate?)"
        )
    dtype = next(p.dtype for p in teacher.parameters())
    targets = torch.zeros(batch.num_rows, teacher.embedding_dim, device=device,
                          dtype=dtype if dtype == torch.float64 else torch.float32)  # fmt: skip
    has = torch.zeros(batch.num_rows, dtype=torch.bool, device=device)
    if index:
        texts = [config.text_prefix + batch.texts[i] for i in index]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
        emb = teacher.encode(enc["input_ids"].to(device), enc["attention_mask"].to(device))  # (p, D)
        rows = batch.row_ids[index].to(device)
        targets[rows] = emb.to(targets.dtype)
        has[rows] = True
    return targets, has


def distill_loss(
    emb: Tensor, row_ids: Tensor, targets: Tensor, has_target: Tensor, candidates: GlobalCandidates,
    pivot_lang_id: int, *, weight: float, kind: str = "mse",
) -> dict[str, Tensor]:
    """The term for the local sentences ``emb`` (n, D) of rows ``row_ids`` (n,, batch-local).

    Args:
        targets, has_target: from :func:`teacher_targets` (per local row).
        candidates: the gathered global batch: its row and language ids give the global number of sentences
            whose row has a pivot (the normalisation).

    Returns:
        ``distill_loss`` (weighted, rank-local), ``distill`` (unweighted local mean distance) and
        ``distill_cos`` (mean cosine to the target).
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distill kind must be one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    target = targets[row_ids].to(emb.dtype)  # (n, D)
    mask = has_target[row_ids]  # (n,)
    cos = F.cosine_similarity(emb, target, dim=-1)  # (n,)
    dist = 1.0 - cos if kind == "cosine" else (emb - target).pow(2).sum(dim=-1)
    dist = torch.where(mask, dist, torch.zeros_like(dist))
    valid = candidates.valid
    pivot_rows = torch.zeros(max(candidates.num_rows, 1), dtype=torch.bool, device=emb.device)
    pivot_rows[candidates.row_ids[valid & (candidates.lang_ids == pivot_lang_id)]] = True
    total = int(pivot_rows[candidates.row_ids[valid]].sum())  # host sync
    loss = weight * candidates.world_size * dist.sum() / max(total, 1)
    count = mask.sum().clamp(min=1)
    return {"distill_loss": loss, "distill": dist.detach().sum() / count,
            "distill_cos": torch.where(mask, cos.detach(), torch.zeros_like(cos)).sum() / count}
