"""Training logs a person reads (``align fit``).

* :class:`ProgressLine` (``--progress.*``): when the run shows no progress bar (the GPU recipes turn it
  off), one line every N optimiser steps on rank 0, so a SLURM ``.out`` file shows progress:
  ``[train] step 40/20000 (0.2%) loss 2.3012 lr 2.00e-05 812 sentences/s elapsed 0:01:10 ETA 9:40:02``.
* :class:`LearningRateLogger` (``--lr_monitor.*``): Lightning's ``LearningRateMonitor`` (``lr-AdamW``
  every step, per parameter group), silent instead of failing when the run has no logger.
"""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.callbacks import Callback, LearningRateMonitor

from alignment.progress import _clock


class LearningRateLogger(LearningRateMonitor):
    """``LearningRateMonitor`` that logs every step's learning rate; a run without loggers logs nothing
    (Lightning's own raises there)."""

    def __init__(self, logging_interval: str | None = "step", log_momentum: bool = False,
                 log_weight_decay: bool = False) -> None:
        super().__init__(logging_interval=logging_interval, log_momentum=log_momentum,
                         log_weight_decay=log_weight_decay)

    def on_train_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class ProgressLine(Callback):
    """A plain-text progress line every ``every_n_steps`` optimiser steps, when no progress bar is shown.

    Rank 0 prints ``[train] step S/MAX (P%) loss L lr LR N sentences/s elapsed T ETA T`` to stdout,
    flushed, so a SLURM ``.out`` file shows how far the run is; sentences/s counts all ranks. ``0``
    turns it off; with a progress bar it prints nothing (the bar shows the same).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 0:
            raise ValueError(f"--progress.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._start: float | None = None
        self._start_step = 0
        self._window: tuple[float, int] | None = None
        self._sentences = 0

    def _active(self, trainer) -> bool:
        return bool(self.every_n_steps) and trainer.progress_bar_callback is None and trainer.is_global_zero

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.monotonic(), trainer.global_step
        self._window, self._sentences = (self._start, trainer.global_step), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active(trainer):
            return
        self._sentences += int(getattr(batch, "num_sentences", 0)) * trainer.world_size
        step = trainer.global_step
        if step == self._window[1] or step % self.every_n_steps:
            return
        now = time.monotonic()
        since, at = self._window
        rate = self._sentences / max(now - since, 1e-9)
        per_step = (now - self._start) / max(step - self._start_step, 1)
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        loss = trainer.callback_metrics.get("train/loss")
        lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        parts = [f"[train] step {step}" + (f"/{max_steps} ({100 * step / max_steps:.1f}%)" if max_steps else "")]
        parts.append(f"loss {float(loss):.4f}" if loss is not None else "loss -")
        parts.append(f"lr {max(lrs):.2e}" if lrs else "lr -")
        parts.append(f"{rate:.0f} sentences/s")
        parts.append(f"elapsed {_clock(now - self._start)}")
        if max_steps:
            parts.append(f"ETA {_clock((max_steps - step) * per_step)}")
        print(" ".join(parts), flush=True)
        self._window, self._sentences = (now, step), 0
