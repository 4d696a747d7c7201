"""DeepSpeed ZeRO-3 ``align fit`` on 2 CPU ranks: preempted (USR1), resumed, killed (SIGKILL), resumed again.

The user's path: ``align fit`` with ``devices: 2`` and :class:`tests._training.CPUDeepSpeedStrategy`
(Lightning's real ``DeepSpeedStrategy`` on gloo, ZeRO-3 with every parameter partitioned,
``param_persistence_threshold: 0``); Lightning's launcher starts the second rank. Checkpoints are the
project's own (``AtomicModelCheckpoint``: ZeRO folders ``step=K.ckpt`` / ``last.ckpt``).

One chain, compared with a straight run of the same config to ``MAX_STEPS``:

1. a run receives a real SIGUSR1 after step ``SIGNAL_AT`` (both ranks): the preemption path writes
   ``last.ckpt`` at a step boundary (that one or the next) and ``align fit`` exits 75;
2. ``--ckpt_path last`` resumes it; once it has written a later checkpoint, the whole job (both ranks)
   is SIGKILLed;
3. ``--ckpt_path last`` resumes again and finishes at ``MAX_STEPS``.

Every step's ``train/loss`` of every segment equals the straight run's, and the final weights
(the ZeRO folder consolidated, as ``align export`` does) equal the straight run's. Dropout is off
(Lightning does not checkpoint the RNG that draws dropout masks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import _training as T
from tests.distributed._spawn import free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
MAX_STEPS = 8
CKPT_EVERY = 2
SIGNAL_AT = 3

RUN_YAML = f"""\
trainer:
  devices: 2
  max_steps: {MAX_STEPS}
  val_check_interval: null
  limit_val_batches: 0
  logger:
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args: {{save_dir: runs/debug, name: csv, flush_logs_every_n_steps: 1}}
  strategy:
    class_path: tests._training.CPUDeepSpeedStrategy
    init_args: {{stage: 3, param_persistence_threshold: 0}}
  callbacks:
    - class_path: tests._training.NoDropout
data:
  batch_size: 8
  num_workers: 0
checkpoint:
  every_n_train_steps: {CKPT_EVERY}
"""


def _launch(root: Path, corpus, *extra: str):
    cmd = [sys.executable, "-m", "alignment.cli", "fit", "--config", str(T.DEBUG_YAML), "--config", str(root / "run.yaml"),
           "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
           "--model.encoder.vocab_size", str(corpus.vocab_size), *extra]
    log = open(root / f"log-{len(list(root.glob('log-*')))}.txt", "w")
    env = T.align_env(MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=EXTENSIONS)
    # own session: a kill reaches both ranks (Lightning's launcher starts rank 1 from rank 0)
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log.name


def _finish(proc, log: str, timeout: float = 240) -> int:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"align fit did not finish in {timeout} s; log:\n{Path(log).read_text()[-4000:]}") from None
    time.sleep(0.5)
    try:  # rank 1 is in the same session: make sure nothing is left running
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def _step_of(ckpt: Path) -> int:
    state = torch.load(ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    return int(state["global_step"])


def _wait_for_row(run_root: Path, step: int, proc, timeout: float = 30) -> None:
    """Wait until the newest CSV version of ``run_root`` holds the ``train/loss`` row of ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if step in _losses(run_root)[-1]:
                return
        except (OSError, ValueError, IndexError, KeyError):  # the file is being written
            pass
        time.sleep(0.02)


def _losses(run_root: Path) -> list[dict[int, float]]:
    """Per CSV version (one per ``align fit``), ``{step: train/loss}``."""
    versions = sorted((run_root / "runs" / "debug" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return [{int(r["step"]): r["train/loss"] for r in T.csv_metrics(v / "metrics.csv") if "train/loss" in r}
            for v in versions]


def test_zero3_preempted_killed_and_resumed_equals_a_straight_run(tmp_path):
    corpus = T.make_corpus(tmp_path / "data", rows=400, rows_per_shard=25)
    straight, chain = tmp_path / "straight", tmp_path / "chain"
    for root in (straight, chain):
        root.mkdir()
        (root / "run.yaml").write_text(RUN_YAML)

    proc, log = _launch(straight, corpus)
    assert _finish(proc, log) == 0, Path(log).read_text()[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in Path(log).read_text(), "the run was not on two ranks"
    last = chain / "runs" / "debug" / "checkpoints" / "last.ckpt"

    # 1. SIGUSR1 after step SIGNAL_AT -> last.ckpt at that step, exit 75
    proc, log = _launch(chain, corpus, "--trainer.callbacks+=tests._training.SendSignal",
                        f"--trainer.callbacks.init_args.step={SIGNAL_AT}")
    assert _finish(proc, log) == 75, Path(log).read_text()[-4000:]
    # the flag is agreed in the next step's guard: the stop is at the step boundary after the signal, or the next
    preempted_at = _step_of(last)
    assert last.is_dir() and preempted_at in (SIGNAL_AT, SIGNAL_AT + 1)

    # 2. resume; SIGKILL the job once it has saved a later checkpoint
    inode = last.stat().st_ino
    proc, log = _launch(chain, corpus, "--ckpt_path", "last", "--trainer.callbacks+=tests._training.SlowDown",
                        "--trainer.callbacks.init_args.seconds=0.6")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and last.stat().st_ino != inode:
            break
        time.sleep(0.05)
    # Lightning saves a step's checkpoint (a callback) just before it logs and flushes that step's CSV
    # row: kill once the row of the checkpoint's last step is on disk, or the segment's log misses it.
    _wait_for_row(chain, _step_of(last) - 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert f"Restoring states from the checkpoint path at {last}" in Path(log).read_text()
    killed_at = _step_of(last)
    assert preempted_at < killed_at < MAX_STEPS, f"checkpoint at step {killed_at}: the kill came too late"

    # 3. resume again, to the end
    proc, log = _launch(chain, corpus, "--ckpt_path", "last")
    assert _finish(proc, log) == 0, Path(log).read_text()[-4000:]
    assert _step_of(last) == MAX_STEPS
    assert not list(last.parent.glob(".*.partial-*")), "a partial checkpoint was left behind"

    # Every step of every segment has the straight run's loss.
    (reference,) = _losses(straight)
    assert sorted(reference) == list(range(MAX_STEPS))
    preempted, resumed, finished = _losses(chain)
    assert sorted(preempted) == list(range(preempted_at))
    assert min(resumed) == preempted_at and max(resumed) >= killed_at - 1
    assert sorted(finished) == list(range(killed_at, MAX_STEPS))
    for segment in (preempted, resumed, finished):
        for step, loss in segment.items():
            assert loss == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (step, segment, reference)

    # The final weights (ZeRO folders consolidated) equal the straight run's.
    from alignment.export import encoder_from_checkpoint

    got, _, _ = encoder_from_checkpoint(last)
    expected, _, _ = encoder_from_checkpoint(straight / "runs" / "debug" / "checkpoints" / "last.ckpt")
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
