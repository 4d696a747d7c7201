"""Kill a 2-rank DDP ``align fit`` after a checkpoint, resume it with ``--ckpt_path last``.

Real processes, as a user runs them: ``align fit`` with ``trainer.devices=2``
and DDP over gloo on CPU (Lightning's launcher starts the second rank), the
tiny debug model on synthetic shards. The first run is SIGKILLed (its whole
process group: both ranks) once a checkpoint exists; the second run resumes
from ``last.ckpt``, ends at ``max_steps`` with a finite loss, logs to the
same wandb run, and its end-of-fit export reproduces the trained model's embeddings.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests import _training as T
from tests.distributed._spawn import free_port

pytestmark = pytest.mark.distributed

MAX_STEPS = 10
CKPT_EVERY = 2
TEXTS = ["en_w1 en_w2 en_w3", "de_w4 de_w5", "fr_w7 fr_w8 fr_w9 fr_w10"]

RUN_YAML = f"""\
trainer:
  devices: 2
  max_steps: {MAX_STEPS}
  val_check_interval: null
  limit_val_batches: 0
  strategy:
    class_path: lightning.pytorch.strategies.DDPStrategy
    init_args: {{process_group_backend: gloo}}
  callbacks:
    - class_path: tests._training.SlowDown
      init_args: {{seconds: 0.4}}
    - class_path: tests._training.EmbedAtTrainEnd
      init_args: {{out: trained.pt, texts: {json.dumps(TEXTS)}}}
data:
  batch_size: 8
  num_workers: 0
checkpoint:
  every_n_train_steps: {CKPT_EVERY}
"""


def _launch(root, corpus, *extra):
    cmd = [sys.executable, "-m", "alignment.cli", "fit", "--config", str(T.DEBUG_YAML), "--config", str(root / "run.yaml"),
           "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
           "--model.encoder.vocab_size", str(corpus.vocab_size), *extra]
    log = open(root / f"log-{len(list(root.glob('log-*')))}.txt", "w")
    # own session: the kill reaches both ranks (Lightning's launcher forks rank 1 from rank 0)
    return subprocess.Popen(cmd, cwd=root, env=T.align_env(MASTER_PORT=str(free_port())), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True), log.name


def _wait_for(predicate, proc, timeout, what, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    raise AssertionError(f"{what} did not happen (exit {proc.poll()}); log:\n{open(log).read()[-4000:]}")


def test_killed_ddp_fit_resumes_to_max_steps(tmp_path):
    corpus = T.make_corpus(tmp_path / "data", rows=400, rows_per_shard=25)
    (tmp_path / "run.yaml").write_text(RUN_YAML)
    ckpt_dir = tmp_path / "runs" / "debug" / "checkpoints"
    last = ckpt_dir / "last.ckpt"

    proc, log = _launch(tmp_path, corpus)
    _wait_for(last.is_file, proc, 90, "a first checkpoint", log)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert CKPT_EVERY <= killed_at < MAX_STEPS, f"killed at step {killed_at}: the kill came too late to test a resume"
    run_id = (tmp_path / "runs" / "debug" / "wandb_run_id.txt").read_text().strip()

    assert not (tmp_path / "export").exists(), "a killed run must not export"
    proc, log = _launch(tmp_path, corpus, "--ckpt_path", "last", "--export.dir", str(tmp_path / "export"))
    assert proc.wait(timeout=120) == 0, open(log).read()[-4000:]
    text = open(log).read()
    assert f"Restoring states from the checkpoint path at {last}" in text
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text, "the run was not on two ranks"

    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == MAX_STEPS
    assert not list(ckpt_dir.glob(".*.partial-*")), "a partial checkpoint was left behind"
    for name, tensor in final["state_dict"].items():
        assert torch.isfinite(tensor).all(), name

    # the end-of-fit export, loaded as a user does, reproduces the trained model (DDP: rank 0's weights)
    from sentence_transformers import SentenceTransformer

    trained = torch.load(tmp_path / "trained.pt", map_location="cpu")
    assert trained["global_step"] == MAX_STEPS
    exported = SentenceTransformer(str(tmp_path / "export"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(exported.double(), trained["emb"].double(), dim=-1)
    assert cos.min() >= 0.9999, cos.tolist()

    # the resumed run's CSV starts after the checkpoint and ends at max_steps with a finite loss
    versions = sorted((tmp_path / "runs" / "debug" / "csv").glob("version_*"))
    assert len(versions) == 2
    resumed = [r for r in T.csv_metrics(versions[-1] / "metrics.csv") if "train/loss" in r]
    steps = [int(r["step"]) for r in resumed]
    assert steps[0] == killed_at and steps[-1] == MAX_STEPS - 1
    assert math.isfinite(resumed[-1]["train/loss"])

    # one wandb run id across the kill: both offline runs log to it
    runs = sorted((tmp_path / "runs" / "debug" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    wandb_id, history = T.wandb_history(tmp_path / "runs" / "debug")
    assert wandb_id == run_id
    assert max(r["trainer/global_step"] for r in history if "train/loss" in r) == MAX_STEPS - 1
