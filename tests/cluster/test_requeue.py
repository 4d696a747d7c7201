"""Preemption on a real SLURM: USR1 to the batch shell -> checkpoint between steps -> requeue -> resume, twice.

``scancel --signal=USR1 --batch JOB`` is what ``#SBATCH --signal=B:USR1@N``
does at ``N`` seconds before the time limit (here sent while the run is
mid-way, so the test does not wait for a time limit). The batch script
forwards it to both ranks, they agree at the next step boundary, write
``last.ckpt``, exit 75 and the script requeues the job. The job is preempted
twice and must end at ``max_steps``: three attempts, each resuming where the
previous one stopped, one wandb run id throughout, and no checkpoint from
Lightning's own auto-requeue (``hpc_ckpt_*.ckpt``).
"""

from __future__ import annotations

import math
import re
import subprocess
import time

import pytest
import torch

from tests import _training as T
from tests.cluster._slurm import job_logs, run_yaml, submit, submit_args

pytestmark = pytest.mark.cluster

MAX_STEPS = 14
PREEMPTIONS = 2


def _step(path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except (FileNotFoundError, EOFError, RuntimeError):
        return -1


def _wait(predicate, timeout: float, what: str, slurm, job, log_dir):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if slurm.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen; job {slurm.job(job)}\n{job_logs(log_dir, slurm)}")


def test_usr1_checkpoints_requeues_and_resumes_to_max_steps(slurm, tmp_path):
    corpus = T.make_corpus(tmp_path / "data", rows=400, rows_per_shard=20)
    (tmp_path / "run.yaml").write_text(run_yaml(MAX_STEPS, rows_per_rank=8, slow_down=0.5))
    run = tmp_path / "runs" / "debug"
    log_dir, last = run / "slurm", run / "checkpoints" / "last.ckpt"

    job = submit(slurm, tmp_path, *submit_args(corpus))
    stopped_at = []
    for attempt in range(PREEMPTIONS):
        # signal once this attempt is training: it has written a checkpoint past the previous stop
        previous = stopped_at[-1] if stopped_at else 0
        _wait(lambda a=attempt, p=previous: slurm.job(job).get("Restarts") == str(a) and _step(last) > p, 180,
              f"attempt {attempt} training past step {previous}", slurm, job, log_dir)
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm.env, check=True, timeout=30)
        _wait(lambda a=attempt: slurm.job(job).get("Restarts") == str(a + 1), 120, f"requeue {attempt + 1}",
              slurm, job, log_dir)
        stopped_at.append(_step(last))
    info = slurm.wait_job(job, timeout=240)
    logs = job_logs(log_dir, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs}"
    assert info["Restarts"] == str(PREEMPTIONS)

    # the batch script saw each checkpoint, requeued, and the last attempt ended normally
    batch_log = (log_dir / f"align-debug-{job}.out").read_text()
    written = [int(s) for s in re.findall(r"requeue requested: step=(\d+) ", batch_log)]
    assert written == stopped_at, batch_log
    assert 0 < written[0] < written[1] < MAX_STEPS, written
    assert batch_log.count("USR1: asking the training step to checkpoint and stop") == PREEMPTIONS
    assert batch_log.count("requeueing job") == PREEMPTIONS
    assert [int(r) for r in re.findall(r"restart (\d+):", batch_log)] == list(range(PREEMPTIONS + 1))
    assert "training step exited with 0" in batch_log

    # every attempt ran both ranks; the requeued ones resumed from last.ckpt
    for attempt in range(PREEMPTIONS + 1):
        for rank in (0, 1):
            assert (log_dir / f"align-debug-{job}-restart{attempt}-rank{rank}.log").is_file(), logs
        rank0 = (log_dir / f"align-debug-{job}-restart{attempt}-rank0.log").read_text()
        if attempt < PREEMPTIONS:
            assert f"checkpoint of global step {written[attempt]} written to {last}; stopping" in rank0
        if attempt:
            assert f"Restoring states from the checkpoint path at {last}" in rank0
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt")), "Lightning's auto-requeue wrote a checkpoint"

    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == MAX_STEPS
    assert not list(last.parent.glob(".*.partial-*"))
    assert (run / "export" / "config.json").is_file()

    # each attempt logged the steps from where the previous one stopped: none lost, none repeated
    versions = sorted((run / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    assert len(versions) == PREEMPTIONS + 1
    starts = [0, *written]
    ends = [*written, MAX_STEPS]
    for version, start, end in zip(versions, starts, ends):
        steps = [int(r["step"]) for r in T.csv_metrics(version / "metrics.csv") if "train/loss" in r]
        assert steps == list(range(start, end)), (version.name, steps)
    # one wandb run across the requeues
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == PREEMPTIONS + 1 and all(p.name.endswith(run_id) for p in offline)
    wandb_id, history = T.wandb_history(run)
    assert wandb_id == run_id
    losses = [r for r in history if "train/loss" in r]
    assert max(r["trainer/global_step"] for r in losses) == MAX_STEPS - 1
    assert all(math.isfinite(r["train/loss"]) for r in losses)
