"""``align validate`` and ``align test`` on a trained run: the evaluation hook on the validation / test split,
each written as its own wandb run (grouped with the training run, job type validate / test) and its own CSV
folder, never appended to the training run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import _training as T


def _align(cwd, command, corpus, *extra):
    argv = [sys.executable, "-m", "alignment.cli", command, "--config", "recipe:debug",
            "--data.train_shards", str(corpus.shards), "--data.val_shards", str(corpus.shards),
            "--data.tokenizer", str(corpus.tokenizer), "--model.encoder.vocab_size", str(corpus.vocab_size),
            *extra]
    return subprocess.run(argv, cwd=cwd, env=T.align_env(), capture_output=True, text=True, timeout=300)


def _wandb_run(folder):
    (path,) = T.wandb_files(folder, "run-*.wandb")
    T._wait_for_exit_record(path)
    runs = [r.run for r in T.wandb_records(path) if r.WhichOneof("record_type") == "run"]
    history = [r for r in T.wandb_records(path) if r.WhichOneof("record_type") == "history"]
    return runs[0], len(history)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcmd")
    corpus = T.make_corpus(root / "data", rows=160, rows_per_shard=20)
    result = _align(root, "fit", corpus, "--trainer.max_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, corpus


def test_align_test_evaluates_the_test_split(trained):
    root, corpus = trained
    result = _align(root, "test", corpus, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rows = T.csv_metrics(root / "runs" / "debug" / "test" / "version_0" / "metrics.csv")
    assert rows and 0.0 <= rows[-1]["test/retrieval_acc/mean"] <= 1.0 and "test/xsim/mean" in rows[-1]
    assert (root / "runs" / "debug" / "config-test.yaml").is_file()


def test_align_validate_is_a_separate_wandb_run_in_the_training_group(trained):
    root, corpus = trained
    run_dir = root / "runs" / "debug"
    train_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (train_folder,) = [f.parent for f in T.wandb_files(run_dir, f"wandb/offline-run-*-{train_id}/run-*.wandb")]
    _, train_history = _wandb_run(train_folder)
    result = _align(root, "validate", corpus, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    folders = [f.parent for f in T.wandb_files(run_dir, "wandb/offline-run-*-validate-*/run-*.wandb")]
    assert len(folders) == 1, sorted(p.name for p in run_dir.glob("wandb/*"))
    run, history = _wandb_run(folders[0])
    assert run.run_id != train_id and run.job_type == "validate" and run.run_group == train_id
    assert history >= 1
    assert _wandb_run(train_folder)[1] == train_history, "validate appended to the training run"
    assert len(list(run_dir.glob(f"wandb/offline-run-*-{train_id}"))) == 1
    rows = T.csv_metrics(run_dir / "validate" / "version_0" / "metrics.csv")
    assert "val/retrieval_acc/mean" in rows[-1]
