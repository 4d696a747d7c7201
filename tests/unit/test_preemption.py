"""``alignment.preemption`` in one process: a real SIGUSR1 mid-fit -> checkpoint, exit 75, resume to max_steps.

``align fit`` runs in-process on the tiny debug config, with the SLURM
variables ``srun`` sets for one task, so Lightning picks its
``SLURMEnvironment`` with auto-requeue on, as on a cluster. A test callback
sends SIGUSR1 to the process after a known step. What must hold: Lightning's
own requeue handler never acts (no ``hpc_ckpt_*``), our checkpoint is
``last.ckpt`` at a step boundary, ``$ALIGN_REQUEUE_FILE`` names it, the
logs hold every step before the stop, and ``--ckpt_path last`` resumes to
``max_steps`` with the optimiser, LR schedule and data position of an
uninterrupted run (same final weights). The cluster tier runs the same path
through ``slurm/train.sbatch`` on two nodes.
"""

from __future__ import annotations

import signal
import sys

import pytest
import torch

from alignment import preemption
from alignment.cli import main
from tests import _training as T

MAX_STEPS = 6
SIGNAL_AT = 2


@pytest.fixture
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=200, rows_per_shard=25)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["align"])  # LightningCLI compares its args with sys.argv
    previous = signal.getsignal(preemption.REQUEUE_SIGNAL)
    preemption.clear()
    yield
    preemption.clear()
    signal.signal(preemption.REQUEUE_SIGNAL, previous)


def _srun_env(monkeypatch, requeue_file):
    for key, value in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0",
                           SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_ID="4242", SLURM_JOB_NAME="align").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(preemption.REQUEUE_FILE_ENV, str(requeue_file))




def _fit(root, corpus, monkeypatch, *extra) -> int:
    """``align fit`` of the debug config in ``root`` (its runs/debug/...), CSV logs only, checkpoints only at the end."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "csv.yaml").write_text(T.CSV_ONLY)
    monkeypatch.chdir(root)
    return main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml",
                 "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
                 "--model.encoder.vocab_size", str(corpus.vocab_size), "--data.batch_size", "8",
                 "--trainer.max_steps", str(MAX_STEPS), "--trainer.limit_val_batches", "0",
                 "--checkpoint.every_n_train_steps", "100", "--trainer.callbacks+=tests._training.NoDropout", *extra])


def test_usr1_stops_at_a_step_boundary_and_the_resume_matches_an_uninterrupted_run(tmp_path, corpus, monkeypatch):
    requeue_file = tmp_path / "requeue"
    _srun_env(monkeypatch, requeue_file)

    assert _fit(tmp_path / "straight", corpus, monkeypatch) == 0
    straight = torch.load(tmp_path / "straight" / "runs" / "debug" / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)
    assert straight["global_step"] == MAX_STEPS and not requeue_file.exists()

    run = tmp_path / "preempted"
    rc = _fit(run, corpus, monkeypatch, "--trainer.callbacks+=tests._training.SendSignal",
              f"--trainer.callbacks.init_args.step={SIGNAL_AT}")
    assert rc == preemption.EXIT_REQUEUE
    last = (run / "runs" / "debug" / "checkpoints" / "last.ckpt").resolve()
    stopped = torch.load(last, map_location="cpu", weights_only=False)
    # the signal came after step SIGNAL_AT; the stop is at the first check after it
    assert stopped["global_step"] in (SIGNAL_AT, SIGNAL_AT + 1)
    assert requeue_file.read_text() == f"step={stopped['global_step']} checkpoint={last}\n"
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt")), "Lightning's auto-requeue handler acted"
    assert not list(last.parent.glob(".*.partial-*"))
    steps = [int(r["step"]) for r in T.csv_metrics(run / "runs" / "debug" / "csv" / "version_0" / "metrics.csv")
             if "train/loss" in r]
    assert steps == list(range(stopped["global_step"])), "the logs lost a step before the stop"

    requeue_file.unlink()
    assert _fit(run, corpus, monkeypatch, "--ckpt_path", "last") == 0
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == MAX_STEPS and not requeue_file.exists()
    # the same training as without the interruption: schedule, optimiser state, data order, weights
    assert final["lr_schedulers"][0]["last_epoch"] == straight["lr_schedulers"][0]["last_epoch"]
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, msg=name)


def test_auto_requeue_is_switched_off_and_the_handler_only_sets_a_flag(tmp_path, corpus, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from tests._training import trainer as make_trainer

    _srun_env(monkeypatch, tmp_path / "requeue")
    from alignment.callbacks import AtomicModelCheckpoint

    env = SLURMEnvironment(auto_requeue=True)
    trainer = make_trainer(tmp_path, max_steps=2, plugins=[env], enable_checkpointing=True,
                           callbacks=[preemption.PreemptionCheckpoint(), AtomicModelCheckpoint(dirpath=tmp_path)])
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    assert env.auto_requeue is False
    handler = signal.getsignal(preemption.REQUEUE_SIGNAL)
    assert handler is preemption._handler
    handler(preemption.REQUEUE_SIGNAL, None)  # what a signal does: set the flag, nothing else
    assert preemption.requested()


def test_preemption_needs_the_atomic_checkpoint(tmp_path, corpus):
    from tests._training import trainer as make_trainer

    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[preemption.PreemptionCheckpoint()])
    with pytest.raises(ValueError, match="needs an AtomicModelCheckpoint"):
        trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    with pytest.raises(ValueError, match="check_every_n_steps must be >= 1"):
        preemption.PreemptionCheckpoint(check_every_n_steps=0)
