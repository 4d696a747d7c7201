"""One folder per run: the recipes' runs never share checkpoints, wandb runs or exports, and a resume refuses
another run's checkpoint.

Real ``align fit`` subprocesses of the shipped recipes (``recipe:NAME``) in one working directory, with a
tiny model and CPU settings, each with ``--ckpt_path last`` exactly as ``launch/local.sh`` and
``slurm/train.sbatch`` run them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from sentence_transformers import SentenceTransformer

from alignment.synthetic import synthetic_rows
from tests import _training as T

CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
       "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
       "--checkpoint.every_n_train_steps", "2", "--trainer.log_every_n_steps", "1"]


def _fit(cwd, recipe, corpus, *extra, steps=2):
    argv = [sys.executable, "-m", "alignment.cli", "fit", "--config", f"recipe:{recipe}", *CPU,
            "--model.encoder.name_or_path", "tiny", "--model.encoder.vocab_size", str(corpus.vocab_size),
            "--data.tokenizer", str(corpus.tokenizer), "--data.train_shards", str(corpus.shards),
            "--data.batch_size", "8", "--data.num_workers", "0", "--data.max_length", "32",
            "--data.shuffle_buffer", "16", "--model.optim.warmup_steps", "1",
            "--trainer.max_steps", str(steps), "--ckpt_path", "last", *extra]
    return subprocess.run(argv, cwd=cwd, env=T.align_env(), capture_output=True, text=True, timeout=300)


def _encode(folder, texts):
    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The multi-way recipe, then the En-X recipe, in the same working directory."""
    root = tmp_path_factory.mktemp("runs")
    corpus = T.make_corpus(root / "data", rows=120, rows_per_shard=20)
    for recipe in ("xlm-roberta-base-multiway", "xlm-roberta-base-enx"):
        result = _fit(root, recipe, corpus)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Restoring states" not in result.stderr + result.stdout, f"{recipe} resumed another run"
    return root, corpus


def test_two_recipes_give_two_runs_two_wandb_ids_two_exports(two_runs):
    root, _ = two_runs
    mw, enx = root / "runs" / "xlm-roberta-base-multiway", root / "runs" / "xlm-roberta-base-enx"
    ids = []
    for run, objective in ((mw, "multi_positive"), (enx, "en_x")):
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == 2  # each run trained its own 2 steps from step 0
        assert ckpt["alignment_run"]["objective"] == objective
        run_id = (run / "wandb_run_id.txt").read_text().strip()
        wandb_id, history = T.wandb_history(run)
        assert wandb_id == run_id and history  # the wandb run of this folder's id file, written under this folder
        ids.append(run_id)
        assert (run / "csv" / "version_0" / "metrics.csv").is_file()
        assert "objective: " + objective in (run / "config.yaml").read_text()
    assert ids[0] != ids[1]
    texts = [t for r in synthetic_rows(4, T.LANGUAGES, seed=3) for t in r.texts.values()]
    a, b = _encode(mw / "export", texts), _encode(enx / "export", texts)
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-4), "the two exports are the same model"
    assert not (root / "runs" / "recipe").exists() and not (root / "checkpoints").exists()


def test_resume_refuses_another_runs_checkpoint_naming_both_values(two_runs):
    root, corpus = two_runs
    last = root / "runs" / "xlm-roberta-base-multiway" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    T.wandb_history(last.parent.parent)  # the first run's wandb files are complete
    wandb_runs = sorted((last.parent.parent / "wandb").glob("offline-run-*"))
    result = _fit(root, "xlm-roberta-base-enx", corpus, "--trainer.default_root_dir", "runs/xlm-roberta-base-multiway",
                  steps=4)
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("align: error: refusing to resume") and str(last) in err
    assert "--model.loss.objective: checkpoint 'multi_positive', config 'en_x'" in err
    assert "--warm_start" in err
    assert last.read_bytes() == before, "the refused run wrote into the other run's checkpoint"
    assert sorted((last.parent.parent / "wandb").glob("offline-run-*")) == wandb_runs, "it joined the wandb run"
    assert "Restoring states" not in result.stderr + result.stdout  # refused before anything was loaded


def test_warm_start_takes_weights_only(two_runs):
    root, corpus = two_runs
    source = root / "runs" / "xlm-roberta-base-multiway"
    result = _fit(root, "xlm-roberta-base-enx", corpus, "--trainer.default_root_dir", "runs/warm",
                  "--warm_start", str(source / "checkpoints" / "last.ckpt"), "--model.optim.lr", "1e-12", steps=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm start: encoder weights of" in result.stderr + result.stdout
    ckpt = torch.load(root / "runs" / "warm" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1  # step, schedule and optimiser start afresh
    assert ckpt["alignment_run"]["objective"] == "en_x"
    texts = [t for r in synthetic_rows(4, T.LANGUAGES, seed=3) for t in r.texts.values()]
    torch.testing.assert_close(_encode(root / "runs" / "warm" / "export", texts), _encode(source / "export", texts),
                               atol=1e-5, rtol=0)  # one step at lr 1e-12 from the multi-way weights
