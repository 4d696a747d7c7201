"""Optimiser and learning-rate schedule for contrastive fine-tuning.

AdamW with no weight decay on norms, biases and the temperature; optional
layer-wise learning-rate decay (LLRD, as in ELECTRA / BEiT fine-tuning: layer
``i`` of ``L`` gets ``lr * decay ** (L - i)``, embeddings ``lr * decay ** (L + 1)``,
everything above the encoder the full ``lr``); linear warm-up then cosine or
linear decay to ``min_lr_ratio * lr``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe|word_embeddings)(?:\.|$)")


@dataclass
class OptimConfig:
    """AdamW and schedule settings (``--model.optim.*``)."""

    lr: float = 2e-5
    """Peak learning rate, reached at the end of warm-up."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases, norms or the temperature."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int | None = None
    """Linear warm-up steps; 0 turns warm-up off; null (the default) uses ``warmup_ratio``."""
    warmup_ratio: float = 0.05
    """Warm-up as a fraction of the total steps, when ``warmup_steps`` is null."""
    schedule: Schedule = "cosine"
    """Decay after warm-up: cosine, linear or constant."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    layer_decay: float = 1.0
    """Layer-wise LR decay factor in (0, 1]; 1.0 turns it off."""
    max_grad_norm: float | None = None
    """Clip the total gradient 2-norm to this before each optimiser step (null: no clipping); with and without
    GradCache, and under DeepSpeed (its ``gradient_clipping``). Lightning's ``--trainer.gradient_clip_val`` is
    refused: this is the one clipping knob."""
    fused: bool = False
    """Use the fused AdamW kernel (CUDA only)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        if self.lr <= 0:
            raise ValueError(f"--model.optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--model.optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--model.optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--model.optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--model.optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"--model.optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--model.optim.layer_decay must be in (0, 1], got {self.layer_decay}")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lname = name.lower()
    return param.ndim < 2 or "norm" in lname or "bias" in lname or "temperature" in lname or "logit_scale" in lname


def _layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, 1..L for encoder layers, L + 1 for everything above."""
    if _EMBED_RE.search(name):
        return 0
    match = _LAYER_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(module: nn.Module, cfg: OptimConfig, num_layers: int) -> list[dict]:
    """AdamW parameter groups: (decay | no decay) x (layer scale when LLRD is on).

    Frozen parameters (``requires_grad=False``) are left out, so freezing
    embeddings also frees their optimiser state (2 x the table in fp32).
    """
    groups: dict[tuple[bool, int], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = _no_decay(name, param)
        layer = _layer_id(name, num_layers) if cfg.layer_decay < 1.0 else num_layers + 1
        scale = cfg.layer_decay ** (num_layers + 1 - layer)
        group = groups.setdefault(
            (no_decay, layer),
            {"params": [], "names": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": scale},
        )
        group["params"].append(param)
        group["names"].append(name)
    for group in groups.values():
        group["lr"] = cfg.lr * group["lr_scale"]
    return [groups[k] for k in sorted(groups)]


def build_optimizer(module: nn.Module, cfg: OptimConfig, num_layers: int) -> torch.optim.AdamW:
    groups = param_groups(module, cfg, num_layers)
    if not groups:
        raise ValueError("no trainable parameters: check --model.encoder.freeze_* settings")
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(clean, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=cfg.fused or None)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of each group's base lr at optimiser step ``step``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A per-step ``LambdaLR`` (Lightning: ``interval='step'``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
