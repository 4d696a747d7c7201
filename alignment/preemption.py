"""Preemption: on SIGUSR1, checkpoint at the next step boundary, stop, and exit asking to be requeued.

The whole path on SLURM (``slurm/train.sbatch``):

1. SLURM signals the batch shell ``N`` seconds before the time limit
   (``#SBATCH --signal=B:USR1@N``); an operator or a preemption script does
   the same with ``scancel --signal=USR1 --batch JOBID``.
2. The batch shell traps USR1 and forwards it to the training step's tasks
   (``scancel --signal=USR1 JOBID``: every step, not the batch shell).
3. On every rank, :func:`install_handler`'s handler only sets a flag. Nothing
   else may happen inside a signal handler: it interrupts the rank anywhere,
   possibly inside a collective or a half-done optimiser step.
4. At the end of the next optimiser step, :class:`PreemptionCheckpoint` asks
   every rank whether any of them saw the signal (the signal reaches ranks at
   different steps): ``AlignmentModule`` answers from its step guard, the one
   small all-reduce of every step (``module.py``); another module costs one
   boolean all-reduce through the strategy. If one
   did, all ranks write ``last.ckpt`` together, atomically
   (:meth:`~alignment.callbacks.AtomicModelCheckpoint.save_last_now`). At the
   start of the next batch (once Lightning has logged the step) rank 0 writes
   ``$ALIGN_REQUEUE_FILE`` (:func:`write_requeue_file`) and flushes the
   loggers, and every rank raises :class:`Preempted`. No validation, no
   export: the run is not over.
5. ``align fit`` exits with :data:`EXIT_REQUEUE` (75, ``EX_TEMPFAIL``); the
   batch shell finds the requeue file and runs ``scontrol requeue $SLURM_JOB_ID``.
6. The requeued job runs ``align fit ... --ckpt_path last``: it resumes the
   step count, the optimiser, the LR schedule and the data position, and logs
   to the same wandb run (its id is stored beside the logs,
   :mod:`alignment.loggers`). However often it is requeued it stops at
   ``trainer.max_steps``.

Why not Lightning's own auto-requeue (``SLURMEnvironment(auto_requeue=True)``,
the default under ``srun``): its USR1 handler saves an "hpc" checkpoint
*inside* the signal handler, i.e. at an arbitrary point of a step (under DDP
a collective started from a signal handler while the rank is inside another
collective deadlocks or pairs up the wrong tensors), then requeues from rank 0
while the other ranks keep training, and it has a history of silently doing
nothing. :class:`PreemptionCheckpoint` switches it off (``auto_requeue =
False``) and installs the flag-only handler before Lightning registers its own.

Costs: with ``AlignmentModule``, nothing beyond its step guard; otherwise one
boolean all-reduce (and on GPU one device-to-host sync) per
``check_every_n_steps`` optimiser steps. The preemption checkpoint is one
ordinary ``last.ckpt`` save.
"""

from __future__ import annotations

import os
import signal
import threading

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from alignment import fsutil

REQUEUE_SIGNAL = signal.SIGUSR1
"""The signal that asks for a checkpoint and a requeue (``--signal=B:USR1@N`` in ``slurm/train.sbatch``)."""
EXIT_REQUEUE = 75
"""``align fit``'s exit code after a preemption stop (``EX_TEMPFAIL``): checkpoint written, run me again."""

REQUEUE_FILE_ENV = "ALIGN_REQUEUE_FILE"
"""Environment variable naming the file written after a preemption checkpoint (set by ``slurm/train.sbatch``)."""

# A plain bool: assigning it is atomic between bytecodes, where Python runs signal handlers
# (a threading.Event would take a lock inside the handler, and could deadlock with the main thread).
_requested = False


def requested() -> bool:
    """Whether a preemption stop was asked for in this process (by the signal, since the last :func:`clear`)."""
    return _requested


def clear() -> None:
    """Forget a request (a new ``fit`` in the same process starts clean)."""
    global _requested
    _requested = False


def _handler(signum, frame) -> None:  # noqa: ARG001 - the signal.signal signature
    # Only set a flag: the rank may be anywhere (inside a collective, an optimiser step, I/O).
    global _requested
    _requested = True


def install_handler(signum: int = REQUEUE_SIGNAL) -> bool:
    """Make ``signum`` set the preemption flag in this process; False where it cannot (not the main thread).

    Install it early (``align fit`` does so before building anything): a USR1
    that arrives before any handler exists kills the process, the default
    action, and the job is then not requeued.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signum) is not _handler:
        signal.signal(signum, _handler)
    return True


def write_requeue_file(step: int, checkpoint: str) -> None:
    """Tell the batch script the stop is a clean preemption stop: write ``$ALIGN_REQUEUE_FILE`` if set.

    ``slurm/train.sbatch`` requeues the job when that file exists after the
    training step ended, whatever srun's exit code (with ``--kill-on-bad-exit``
    the first rank to exit 75 gets the others terminated, and srun reports 143).
    """
    target = os.environ.get(REQUEUE_FILE_ENV)
    if target:
        fsutil.publish_file(target, f"step={step} checkpoint={checkpoint}\n")


class Preempted(Exception):
    """Raised on every rank after the preemption checkpoint was written; ``align fit`` exits with 75."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"preempted at global step {step}: checkpoint written to {checkpoint}; "
                         f"resume with `align fit ... --ckpt_path last` (exit code {EXIT_REQUEUE} asks for a requeue)")
        self.step = step
        self.checkpoint = checkpoint


class PreemptionCheckpoint(Callback):
    """Checkpoint and stop at a step boundary once any rank received :data:`REQUEUE_SIGNAL`.

    Args:
        check_every_n_steps: optimiser steps between two checks. With ``AlignmentModule`` a check
            is free (the flag rides on its step guard's all-reduce, taken at the start of a step);
            otherwise each check is one boolean all-reduce (on GPU a device-to-host sync). The stop
            comes at most this many steps plus one after the signal; keep the signal's lead time
            (``--signal=B:USR1@N``) above that many steps plus one checkpoint save.

    Needs the run's :class:`~alignment.callbacks.AtomicModelCheckpoint` (``align fit``
    always has one): the preemption checkpoint is its ``last.ckpt``, which
    ``--ckpt_path last`` resumes.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"--preemption.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._last_checked_step = -1
        self._pending: tuple[int, str] | None = None  # (step, checkpoint) once the stop is decided

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        # The object Lightning's signal connector reads (single-device strategies have no cluster_environment).
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # Lightning registers its signal handlers after the setup hooks: switched off here, it never does.
            environment.auto_requeue = False
            rank_zero_info("[preemption] Lightning's SLURM auto-requeue is off; USR1 -> checkpoint at the next "
                           f"step, exit {EXIT_REQUEUE}, requeue by the batch script")
        install_handler()
        self._checkpoint(trainer)  # fail now, not at the first preemption

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._last_checked_step = trainer.global_step

    @staticmethod
    def _checkpoint(trainer: "pl.Trainer"):
        from alignment.callbacks import AtomicModelCheckpoint

        found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, AtomicModelCheckpoint)]
        if not found:
            raise ValueError(
                "PreemptionCheckpoint needs an AtomicModelCheckpoint callback (align fit adds one as --checkpoint.*): "
                "without it a preemption would stop the run with nothing to resume from"
            )
        return found[0]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # Only between optimiser steps (not inside gradient accumulation), and only every n steps.
        # global_step is the same on every rank, so every rank takes the collective below or none does.
        if self._pending or step == self._last_checked_step or step % self.check_every_n_steps:
            return
        self._last_checked_step = step
        # AlignmentModule agrees on the flag inside its step's one small all-reduce (its collective
        # budget); any other module pays one boolean all-reduce here.
        agreed = getattr(pl_module, "preemption_agreed", None)
        if agreed is None:
            agreed = trainer.strategy.reduce_boolean_decision(requested(), all=False)
        if not agreed:
            return
        path = self._checkpoint(trainer).save_last_now(trainer)  # ends with a barrier: complete on every rank
        self._pending = (step, path)
        rank_zero_info(f"[preemption] signal received: checkpoint of global step {step} written to {path}; stopping")

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch,
                             batch_idx: int) -> None:
        # The stop comes here, at the start of the next batch, not right after the checkpoint: Lightning
        # hands a step's metrics to the loggers only after on_train_batch_end (measured: raising there lost
        # every preempted attempt's last step from the logs). A run that reaches max_steps meanwhile just ends.
        if not self._pending:
            return
        step, path = self._pending
        if trainer.is_global_zero:
            write_requeue_file(step, path)  # first: the checkpoint alone is worth a requeue
            _flush_loggers(trainer)
        # Nobody leaves before rank 0 has flushed its logs: once one rank exits with 75,
        # srun --kill-on-bad-exit terminates the others (measured: rank 0's wandb run was cut short).
        trainer.strategy.barrier("preempted")
        self._pending = None
        clear()
        raise Preempted(step, path)


def _flush_loggers(trainer: "pl.Trainer") -> None:
    """Put every logged step on disk now (rank 0), before the process may be terminated."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.mark_preempting()  # with a non-zero exit code the run shows as "preempted", then resumes
            run.finish(exit_code=EXIT_REQUEUE)  # Lightning's finalize("failed") later leaves wandb alone
        else:
            logger.save()
