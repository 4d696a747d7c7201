"""Lightning callbacks: crash-safe checkpoints, throughput, export at the end of fit."""

from __future__ import annotations

import os
import time
from weakref import proxy

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from alignment import fsutil
from alignment.adapters import ExportAdapter
from alignment.strategies import full_parameters


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files (and ZeRO folders) appear complete or not at all.

    Every rank writes into ``.<name>.partial-step<N>`` (a DeepSpeed save is
    collective, so the name is the same on every rank); after a barrier rank 0
    publishes it with :func:`alignment.fsutil.commit` (a ZeRO folder replaces
    the old one only once in place). At setup rank 0 runs
    :func:`alignment.fsutil.recover_in` on the folder: a kill between the
    renames gets the old checkpoint back. Lightning's ``ckpt_path="last"``
    lookup only matches ``last*.ckpt``, so a leftover temporary is never resumed.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            for action in fsutil.recover_in(self.dirpath, grace_s=0):  # no save runs before the barrier
                rank_zero_info(f"[checkpoint] {action} in {self.dirpath}")
        trainer.strategy.barrier("atomic_ckpt_setup")

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        partial = str(fsutil.temp_path(filepath, token=f"step{trainer.global_step}"))
        trainer.save_checkpoint(partial, self.save_weights_only)
        trainer.strategy.barrier("atomic_ckpt_written")
        if trainer.is_global_zero:
            fsutil.commit(partial, filepath)
        trainer.strategy.barrier("atomic_ckpt_renamed")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _should_skip_saving_checkpoint(self, trainer: "pl.Trainer") -> bool:
        """Also no periodic or last save inside a streak of NaN/inf steps: ``last.ckpt`` keeps the last
        step whose loss was finite (the streak's own state goes to ``nonfinite-step<N>.ckpt``)."""
        streak = getattr(trainer.lightning_module, "nonfinite_steps", 0)
        return super()._should_skip_saving_checkpoint(trainer) or streak > 0

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``last.ckpt`` is the final step's model, also when ``max_steps`` is not a multiple of the interval
        (Lightning writes it at the end only when nothing was saved during the run)."""
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and trainer.state.fn == "fit"):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def save_last_now(self, trainer: "pl.Trainer") -> str:
        """Write ``last.ckpt`` of the current step now and return its path (every rank must call it).

        For a stop between steps (``alignment.preemption``): it is the file
        ``--ckpt_path last`` resumes, whether or not ``save_last`` is on. Not
        written again when this step is already saved there.
        """
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return self.last_model_path
        filepath = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        self.last_model_path = filepath  # before saving: it is part of the saved callback state
        self._save_checkpoint(trainer, filepath)
        return filepath


class ThroughputLogger(Callback):
    """Logs sentences/s, tokens/s (real, non-pad) and the padding ratio per logging step.

    Uses wall time between consecutive ``on_train_batch_end`` calls, so it
    covers data loading, forward, backward and the optimiser step. Real tokens
    are summed on the device (no sync); they are read once per logging step,
    the only device-to-host sync this callback makes.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._last: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._sentences = 0
        self._tokens = 0  # becomes a 0-d device tensor: summed without a host sync
        self._slots = 0  # token positions, real + pad (shapes only)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._last = now
            self._reset()
            return
        self._sentences += batch.num_sentences
        self._tokens = batch.attention_mask.sum() + self._tokens
        self._slots += int(batch.attention_mask.numel())
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if (trainer.global_step % every) != 0:
            return
        real = int(self._tokens)  # the host sync, on logging steps only
        dt = max(now - self._last, 1e-9)
        world = trainer.world_size
        pl_module.log_dict(
            {
                "throughput/sentences_per_s": self._sentences * world / dt,
                "throughput/tokens_per_s": real * world / dt,
                "throughput/padding_ratio": (self._slots - real) / self._slots if self._slots else 0.0,
            },
            on_step=True,
            on_epoch=False,
            rank_zero_only=True,
        )
        self._last = now
        self._reset()


class ExportOnFitEnd(Callback):
    """At the end of ``fit``, export the trained encoder (HF + sentence-transformers + model card) to ``dir``.

    ``align fit`` sets ``dir`` to ``<run folder>/export`` unless given; ``""`` turns the export off.
    """

    def __init__(self, dir: str | None = None, max_seq_length: int = 128, adapter: ExportAdapter = "merge") -> None:
        """``adapter``: an encoder trained with peft adapters is exported merged (``merge``) or as a peft
        adapter folder (``peft``), as ``align export --adapter``."""
        self.dir = dir
        self.max_seq_length = max_seq_length
        self.adapter = adapter

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.dir:
            return
        from alignment.export import export_encoder
        from alignment.runs import describe_run

        datamodule = getattr(trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        prefix = getattr(getattr(datamodule, "config", None), "text_prefix", "")
        # Under ZeRO-3 each rank holds a slice of every weight: all ranks gather them together
        # (a collective), and rank 0 writes the full weights while they are gathered.
        with full_parameters(pl_module.encoder):
            if trainer.is_global_zero:
                export_encoder(pl_module.encoder, self.dir, tokenizer=tokenizer, max_seq_length=self.max_seq_length,
                               prompts={"query": prefix, "document": prefix} if prefix else None,
                               run=describe_run(pl_module, trainer), adapter=self.adapter)
                rank_zero_info(f"[export] encoder written to {self.dir}")
        trainer.strategy.barrier("export")


class RunMetadata(Callback):
    """Records the git revision, the command line and the world size with the run (all loggers)."""

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        import subprocess
        import sys

        try:
            rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                 cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            rev = "unknown"
        meta = {"git_revision": rev, "command": " ".join(sys.argv), "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes}
        for logger in trainer.loggers:
            logger.log_hyperparams({"run": meta})
