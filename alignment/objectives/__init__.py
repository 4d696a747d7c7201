"""Extra training objectives computed from embeddings, beside the contrastive loss (``alignment.losses``).

One module per objective, each with its typed config (a group of ``align fit`` flags):

============================  =========================  ==================================================
module                        flags                      term(s) added to the loss dict
============================  =========================  ==================================================
:mod:`.adversarial`           ``--model.adversarial.*``  ``adversarial_loss``; ``adv_accuracy``, ``adv_lambda``
:mod:`.neighbourhood`         ``--model.neighbourhood.*`` ``neighbourhood_loss``; ``neighbourhood_kl``
:mod:`.distill`               ``--model.distill.*``      ``distill_loss``; ``distill``, ``distill_cos``
:mod:`.matryoshka`            ``--model.matryoshka.*``   ``matryoshka_loss``; ``matryoshka_<d>``, ``..._acc``
============================  =========================  ==================================================

:class:`Objectives` is what the training module holds (a registered submodule, so the discriminator's
parameters are trained, synchronised and checkpointed; the teacher is deliberately *not* registered, like
the drift reference). Its :meth:`Objectives.add_terms` runs inside ``AlignmentModule._loss_terms``, so
the plain step and the GradCache step (which calls the same function on cached embeddings) both get every
term; GradCache averages the discriminator's gradients as it does a learned temperature's.

Every term follows the normalisation of ``alignment.losses``: a sum over local sentences divided by a
count over the *global* batch (known on every rank from the gathered ids), times the world size.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignment import distributed
from alignment.batch import Batch
from alignment.losses import GlobalCandidates
from alignment.objectives.adversarial import (
    AdversarialConfig,
    LanguageDiscriminator,
    adversarial_loss,
    reversal_lambda,
)
from alignment.objectives.distill import (
    DistillConfig,
    distill_loss,
    load_teacher,
    stored_targets,
    teacher_identity,
    teacher_targets,
)
from alignment.objectives.matryoshka import MatryoshkaConfig, matryoshka_loss
from alignment.objectives.neighbourhood import NeighbourhoodConfig, neighbourhood_loss

__all__ = ["AdversarialConfig", "DistillConfig", "MatryoshkaConfig", "NeighbourhoodConfig", "Objectives"]


class Objectives(nn.Module):
    """The configured extra objectives of one training module.

    Args:
        embedding_dim: the student's embedding width (checked against Matryoshka widths and the teacher).
    """

    def __init__(self, adversarial: AdversarialConfig, neighbourhood: NeighbourhoodConfig,
                 distill: DistillConfig, matryoshka: MatryoshkaConfig, *, embedding_dim: int) -> None:
        super().__init__()
        self.adversarial, self.neighbourhood, self.distill, self.matryoshka = (
            adversarial, neighbourhood, distill, matryoshka)
        self.embedding_dim = embedding_dim
        if distill.contrastive_weight == 0 and not (distill.enabled or matryoshka.enabled):
            raise ValueError("--model.distill.contrastive_weight 0 leaves no alignment objective: set "
                             "--model.distill.teacher (or --model.matryoshka.dims)")
        matryoshka.check_width(embedding_dim)
        self.discriminator: LanguageDiscriminator | None = None
        if adversarial.enabled and adversarial.num_languages is not None:
            self.build_discriminator(adversarial.num_languages)
        # not a registered submodule: never trained, checkpointed, or handed to DDP/DeepSpeed; with stored teacher
        # embeddings it is loaded (auto's fallback) or not at all in setup_teacher
        per_step = distill.enabled and distill.teacher_embeddings == "off"
        object.__setattr__(self, "_teacher", load_teacher(distill, embedding_dim) if per_step else None)
        self.stored_teacher = False
        """Whether the distillation targets are the batches' stored teacher embeddings (``setup_teacher``)."""

    def record_in(self, card: dict) -> None:
        """Note what an export must tell its users in the encoder's ``alignment_encoder.json`` (``card_extra``):
        ``matryoshka_dims``, the widths it was trained to be truncated to (``SentenceTransformer(folder,
        truncate_dim=d)``, ``align eval --dims``). A stale note from the starting folder is dropped."""
        card.pop("matryoshka_dims", None)
        if self.matryoshka.enabled:
            card["matryoshka_dims"] = list(self.matryoshka.dims)

    @property
    def needs_reference(self) -> bool:
        """Whether a term reads the frozen starting encoder (``AlignmentModule._reference``)."""
        return self.neighbourhood.enabled

    def build_discriminator(self, num_languages: int) -> None:
        cfg = self.adversarial
        self.discriminator = LanguageDiscriminator(self.embedding_dim, num_languages, cfg.hidden_dim, cfg.dropout)

    def setup_languages(self, num_languages: int | None) -> None:
        """At ``setup`` (every rank, before the strategy wraps the module and the optimiser is built): size the
        discriminator by the data's language vocabulary."""
        if not self.adversarial.enabled:
            return
        if self.discriminator is None:
            if num_languages is None:
                raise ValueError("--model.adversarial.num_languages is needed when fitting without a data module")
            self.build_discriminator(max(num_languages, 2))
        elif num_languages is not None and num_languages > self.discriminator.net[-1].out_features:
            raise ValueError(
                f"--model.adversarial.num_languages {self.discriminator.net[-1].out_features} is below the data's "
                f"{num_languages} languages; raise it or leave it null (the data's vocabulary)"
            )

    def setup_teacher(self, datamodule) -> None:
        """At ``setup`` (every rank, after the data module's): with ``--model.distill.teacher_embeddings
        stored|auto``, have the data module read the stored vectors matching the teacher with every row; ``auto``
        without a match loads the teacher instead (a warning), ``stored`` raises."""
        cfg = self.distill
        if not cfg.enabled or cfg.teacher_embeddings == "off" or self._teacher is not None or self.stored_teacher:
            return
        try:
            if not callable(getattr(datamodule, "attach_teacher", None)):
                raise ValueError("fitting without the alignment data module (nothing reads the stored vectors)")
            line = datamodule.attach_teacher(teacher_identity(cfg, self.embedding_dim))
        except ValueError as exc:
            if cfg.teacher_embeddings == "stored":
                raise ValueError(f"--model.distill.teacher_embeddings stored: {exc}") from exc
            warnings.warn(f"--model.distill.teacher_embeddings auto: {exc}; running the teacher every step instead",
                          stacklevel=2)
            object.__setattr__(self, "_teacher", load_teacher(cfg, self.embedding_dim))
            return
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(line)
        self.stored_teacher = True

    def teacher_to(self, device: torch.device, dtype: torch.dtype) -> None:
        """The teacher on the student's device and in its precision (as the drift reference)."""
        if self._teacher is not None:
            self._teacher[0].to(device=device, dtype=dtype)

    def add_terms(self, out: dict[str, Tensor], emb: Tensor, batch: Batch, candidates: GlobalCandidates,
                  loss_fn: nn.Module, *, reference: Tensor | None, step: int) -> None:
        """Add every enabled term (and its metrics) to ``out``, the contrastive loss dict."""
        if self.distill.contrastive_weight != 1.0:
            out["contrastive_loss"] = self.distill.contrastive_weight * out["contrastive_loss"]
        if self.matryoshka.enabled:
            out.update(matryoshka_loss(loss_fn, emb, candidates, self.matryoshka, batch.pivot_lang_id))
        if self.adversarial.enabled:
            out.update(adversarial_loss(
                emb, batch.lang_ids, self.discriminator, weight=self.adversarial.weight,
                coefficient=reversal_lambda(self.adversarial, step), num_sentences=candidates.num_sentences,
                world_size=candidates.world_size))  # fmt: skip
        if self.neighbourhood.enabled:
            out.update(neighbourhood_loss(
                emb, reference, candidates, self._gather_reference(reference, candidates),
                weight=self.neighbourhood.weight, temperature=self.neighbourhood.temperature))  # fmt: skip
        if self.distill.enabled:
            if self._teacher is not None:
                targets, has = teacher_targets(*self._teacher, batch, self.distill, emb.device)
            else:  # stored teacher embeddings, or an error naming the flag
                targets, has = stored_targets(batch, self.embedding_dim, emb.device)
            out.update(distill_loss(emb, batch.row_ids, targets, has, candidates, batch.pivot_lang_id,
                                    weight=self.distill.weight, kind=self.distill.kind))  # fmt: skip

    @staticmethod
    def _gather_reference(reference: Tensor, candidates: GlobalCandidates) -> Tensor:
        """``(M, D)`` the reference's embeddings in the candidates' layout: one all-gather, no gradient."""
        max_n = candidates.emb.shape[0] // max(candidates.world_size, 1)
        padded = F.pad(reference.detach(), (0, 0, 0, max_n - reference.shape[0]))  # (max_n, D)
        return distributed.all_gather_fixed(padded).reshape(-1, reference.shape[1])  # (W * max_n, D)
