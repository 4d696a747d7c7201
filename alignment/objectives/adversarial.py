"""Language-adversarial training: a language discriminator behind a gradient-reversal layer (DANN).

A small MLP on the pooled embeddings predicts each sentence's language id; its cross-entropy is one
``*_loss`` term. The discriminator's parameters follow the gradient of that term (it learns to tell the
languages apart); the encoder receives the *reversed* gradient, scaled by ``lambda`` (Ganin & Lempitsky
2015, "Unsupervised Domain Adaptation by Backpropagation"), so it learns to remove language identity::

    adversarial_loss = weight * CE(D(GRL_lambda(e)), lang)         forward: GRL is the identity
    d adversarial_loss / d e = -lambda * weight * dCE/d(D input)   backward through GRL

``lambda`` follows DANN's ramp ``2 / (1 + exp(-gamma p)) - 1`` over ``p in [0, 1]`` (or a linear ramp, or
constant), after ``warmup_steps`` at 0: early on the discriminator learns while the encoder is left alone.

The discriminator is a registered submodule of the training module (``AlignmentModule.objectives``):
DDP synchronises its gradients, DeepSpeed partitions it, the optimiser receives its parameters (weight
decay on its matrices, as for the encoder's) and checkpoints hold it. Normalisation follows
``alignment.losses``: the sum over local sentences divided by the global number of sentences, times the
world size, so the mean over ranks of every gradient is the one-process gradient of the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Ramp = Literal["dann", "linear", "constant"]
RAMPS: tuple[str, ...] = get_args(Ramp)


@dataclass
class AdversarialConfig:
    """Language-adversarial term (``--model.adversarial.*``): a discriminator behind gradient reversal."""

    weight: float = 0.0
    """Weight of the discriminator's cross-entropy (scales what the discriminator and, reversed, the
    encoder receive); 0 disables the term and builds no discriminator."""
    hidden_dim: int = 256
    """Width of the discriminator's hidden layer (Linear -> ReLU -> Linear)."""
    dropout: float = 0.1
    """Dropout before the discriminator's output layer."""
    num_languages: int | None = None
    """Discriminator outputs; None = the data's language vocabulary size (read from the data module at
    set-up). Set it explicitly when the module is fitted without a data module."""
    ramp: Ramp = "dann"
    """Schedule of the reversal coefficient lambda: ``dann`` (2 / (1 + exp(-gamma p)) - 1), ``linear`` (p)
    or ``constant`` (1), with p = (step - warmup_steps) / ramp_steps clipped to [0, 1]."""
    ramp_steps: int = 1000
    """Optimiser steps over which lambda ramps up to 1 (after the warm-up)."""
    warmup_steps: int = 0
    """Steps with lambda = 0: the discriminator trains, the encoder gets no reversed gradient yet."""
    gamma: float = 10.0
    """Steepness of the ``dann`` ramp (DANN: 10)."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"--model.adversarial.weight must be >= 0 (0 disables), got {self.weight}")
        if self.hidden_dim < 1:
            raise ValueError(f"--model.adversarial.hidden_dim must be >= 1, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--model.adversarial.dropout must be in [0, 1), got {self.dropout}")
        if self.num_languages is not None and self.num_languages < 2:
            raise ValueError(f"--model.adversarial.num_languages must be >= 2 (or null), got {self.num_languages}")
        if self.ramp not in RAMPS:
            raise ValueError(f"--model.adversarial.ramp must be one of {', '.join(RAMPS)}, got {self.ramp!r}")
        if self.ramp_steps < 0 or self.warmup_steps < 0:
            raise ValueError("--model.adversarial.ramp_steps and --model.adversarial.warmup_steps must be >= 0, "
                             f"got {self.ramp_steps} and {self.warmup_steps}")
        if self.gamma <= 0:
            raise ValueError(f"--model.adversarial.gamma must be > 0, got {self.gamma}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def reversal_lambda(config: AdversarialConfig, step: int) -> float:
    """The gradient-reversal coefficient at optimiser step ``step`` (0 during the warm-up)."""
    if step < config.warmup_steps:
        return 0.0
    p = 1.0 if config.ramp_steps == 0 else min(1.0, (step - config.warmup_steps) / config.ramp_steps)
    if config.ramp == "constant":
        return 1.0
    if config.ramp == "linear":
        return p
    return 2.0 / (1.0 + math.exp(-config.gamma * p)) - 1.0


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coefficient: float) -> Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: Tensor, coefficient: float) -> Tensor:
    """Identity forward; the backward multiplies the gradient by ``-coefficient``."""
    return _GradientReversal.apply(x, coefficient)


class LanguageDiscriminator(nn.Module):
    """``(n, D)`` embeddings -> ``(n, L)`` language logits: Linear -> ReLU -> Dropout -> Linear."""

    def __init__(self, embedding_dim: int, num_languages: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_languages))  # fmt: skip

    def forward(self, emb: Tensor) -> Tensor:
        return self.net(emb)


def adversarial_loss(
    emb: Tensor, lang_ids: Tensor, discriminator: nn.Module, *, weight: float, coefficient: float,
    num_sentences: int, world_size: int = 1,
) -> dict[str, Tensor]:
    """The adversarial term of the local sentences ``emb`` (n, D) with languages ``lang_ids`` (n,).

    Args:
        num_sentences: sentences of the global batch (the normalisation; ``GlobalCandidates.num_sentences``).
        world_size: ranks (the gradient-averaging factor).

    Returns:
        ``adversarial_loss`` (weighted, rank-local), ``adv_accuracy`` (the discriminator's accuracy; its mean
        over ranks is the global batch's), ``adv_lambda``.
    """
    weight_dtype = next(discriminator.parameters()).dtype  # bf16-true / DeepSpeed bf16: the embeddings are fp32
    logits = discriminator(reverse_gradient(emb, coefficient).to(weight_dtype))  # (n, L)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the cross-entropy in at least float32 (autocast)
    ce = F.cross_entropy(logits, lang_ids, reduction="sum")  # a sum over local sentences
    scale = world_size / max(num_sentences, 1)
    # + 0 * logits.sum(): the discriminator is used on every rank, even one with an empty batch (DDP)
    loss = weight * scale * ce + 0.0 * logits.sum()
    correct = (logits.detach().argmax(dim=1) == lang_ids).sum().to(emb.dtype)
    return {"adversarial_loss": loss, "adv_accuracy": correct * scale, "adv_lambda": emb.new_tensor(coefficient)}
