"""``slurm/train.sbatch`` through ``align submit`` on a real two-node SLURM: 2 nodes x 1 task, gloo on CPU.

The job runs the project's real template, rendered by ``align submit`` from the
tiny debug config on generated shards. Checked afterwards: the job completed,
both ranks ran (one log per rank, Lightning's rank banner in each, and the
global batch logged by rank 0 is twice its local batch: rank 1's rows were
gathered), the final ``last.ckpt`` sits at ``max_steps``, and the export
written at the end of fit loads and embeds exactly as the checkpoint does.
Then ``slurm/eval.sbatch`` evaluates that checkpoint on the held-out split.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests import _training as T
from tests.cluster._slurm import job_env, job_logs, run_yaml, submit, submit_args

pytestmark = pytest.mark.cluster

MAX_STEPS = 6
ROWS_PER_RANK = 8


def test_train_sbatch_runs_two_nodes_and_writes_checkpoint_and_export(slurm, tmp_path):
    corpus = T.make_corpus(tmp_path / "data", rows=300, rows_per_shard=20)
    (tmp_path / "run.yaml").write_text(run_yaml(MAX_STEPS, ROWS_PER_RANK))
    run = tmp_path / "runs" / "debug"
    log_dir = run / "slurm"

    job = submit(slurm, tmp_path, *submit_args(corpus))
    info = slurm.wait_job(job, timeout=300)
    logs = job_logs(log_dir, slurm)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs}"
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info

    # both ranks took part: one log each, each with its own rank banner
    batch_log = (log_dir / f"align-debug-{job}.out").read_text()
    assert "2 node(s) (node[1-2]) x 1 task(s), MASTER_ADDR=127.0.0.1" in batch_log, batch_log
    for rank in (0, 1):
        text = (log_dir / f"align-debug-{job}-restart0-rank{rank}.log").read_text()
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in text, logs
    rank0 = (log_dir / f"align-debug-{job}-restart0-rank0.log").read_text()
    assert "Lightning's SLURM auto-requeue is off" in rank0  # our preemption path is the one in charge

    # rank 1's rows were gathered into every step: the global batch is twice the local one (the last
    # batches of a finite epoch may be a row short on one rank: ranks balance their rows, never drop them)
    versions = sorted((run / "csv").glob("version_*"))
    assert len(versions) == 1
    rows = [r for r in T.csv_metrics(versions[0] / "metrics.csv") if "train/rows" in r]
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS))
    assert all(r["train/global_rows"] > r["train/rows"] for r in rows), rows
    assert rows[0]["train/rows"] == ROWS_PER_RANK and rows[0]["train/global_rows"] == 2 * ROWS_PER_RANK, rows[0]
    assert max(r["train/global_rows"] for r in rows) == 2 * ROWS_PER_RANK
    assert all(math.isfinite(r["train/loss"]) for r in rows)

    # checkpoint at max_steps, and the export written at the end of fit is that model
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    export = run / "export"
    assert (export / "config.json").is_file() and (export / "modules.json").is_file()
    from transformers import AutoTokenizer

    from alignment.export import encoder_from_checkpoint
    from alignment.model import DualEncoder

    texts = ["ein kleiner test", "a small test", "un petit essai"]
    exported = DualEncoder.from_pretrained(export)
    trained, _, _ = encoder_from_checkpoint(last)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    torch.testing.assert_close(T.encode_texts(exported, tokenizer, texts), T.encode_texts(trained, tokenizer, texts))

    # slurm/eval.sbatch on the checkpoint, CPU, held-out split
    eval_out = tmp_path / "eval"
    eval_job = slurm.sbatch(
        "--gpus-per-node=0", "--cpus-per-task=1", "--time=5", f"--output={log_dir}/%x-%j.out",
        str(T.REPO / "slurm" / "eval.sbatch"), "--max_rows", "40",
        env=job_env(slurm, EVAL_MODEL=str(last), EVAL_DATA=str(corpus.shards), EVAL_OUT=str(eval_out),
                    EVAL_SPLIT="validation", EVAL_DEVICE="cpu", ALIGN_CMD=f"{sys.executable} -m alignment.cli"),
        cwd=tmp_path,
    )
    info = slurm.wait_job(eval_job, timeout=240)
    assert info["JobState"] == "COMPLETED", f"{info}\n{job_logs(log_dir, slurm)}"
    metrics = json.loads((eval_out / "metrics.json").read_text())
    assert (eval_out / "report.md").is_file() and metrics
