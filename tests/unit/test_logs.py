"""Logs a person reads: what a SLURM ``.out`` file and the loggers show of a real ``align fit`` (progress
lines, learning rate, the full config, no known-irrelevant warnings), ``align fit --help`` with the fields'
docstrings, ``--data.languages en,de``, and progress of ``align shards build`` / ``verify``."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
import torch
import yaml

from alignment.cli import main
from alignment.progress import progress
from tests import _training as T

NOISE = ("LeafSpec", "`IterableDataset` has `__len__`", "litlogger", "Setting accelerator to CPU", "anonymous",
         "LightningCLI's args parameter")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("logs")
    corpus = T.make_corpus(root / "data", rows=160, rows_per_shard=20)
    argv = [sys.executable, "-m", "alignment.cli", "fit", "--config", "recipe:debug",
            "--data.train_shards", str(corpus.shards), "--data.val_shards", str(corpus.shards),
            "--data.tokenizer", str(corpus.tokenizer), "--model.encoder.vocab_size", str(corpus.vocab_size),
            "--data.languages", "en,de,fr,es", "--trainer.max_steps", "4", "--trainer.val_check_interval", "4",
            "--progress.every_n_steps", "2"]
    result = subprocess.run(argv, cwd=root, env=T.align_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / "debug", result


def test_progress_lines_without_a_progress_bar(fitted):
    _, result = fitted
    lines = [line for line in result.stdout.splitlines() if line.startswith("[train]")]
    assert len(lines) == 2, result.stdout[-2000:]
    pattern = r"\[train\] step {}/4 \({}%\) loss \d+\.\d{{4}} lr \d\.\d\de[-+]\d\d \d+ sentences/s elapsed \S+ ETA \S+"
    assert re.fullmatch(pattern.format(2, "50.0"), lines[0]) and re.fullmatch(pattern.format(4, "100.0"), lines[1])


def test_learning_rate_and_full_config_reach_the_loggers(fitted):
    run, _ = fitted
    rows = T.csv_metrics(next(run.glob("csv/version_*/metrics.csv")))
    lrs = [r["lr-AdamW/pg1"] for r in rows if "lr-AdamW/pg1" in r]
    assert len(lrs) == 4 and lrs[0] < lrs[1], lrs  # every step, warm-up rising (debug: 2 warm-up steps)
    _, history = T.wandb_history(run)
    assert any("lr-AdamW/pg1" in row for row in history)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 4 and saved["data"]["batch_size"] == 16
    assert saved["checkpoint"]["dirpath"] == str(run / "checkpoints") or saved["checkpoint"]["dirpath"].endswith(
        "runs/debug/checkpoints")
    (wandb_file,) = T.wandb_files(run)
    T._wait_for_exit_record(wandb_file)
    config = {}
    for rec in T.wandb_records(wandb_file):
        if rec.WhichOneof("record_type") == "config":
            config.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.config.update})
    sent = config["config"]
    sent = sent.get("value", sent) if isinstance(sent, dict) else sent
    assert sent["data"]["batch_size"] == 16 and sent["trainer"]["max_steps"] == 4
    assert sent["model"]["loss"]["objective"] == "multi_positive"


def test_no_known_irrelevant_warnings_and_comma_languages(fitted):
    run, result = fitted
    output = result.stdout + result.stderr
    assert not [n for n in NOISE if n in output], [n for n in NOISE if n in output]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["alignment_run"]["languages"] == ["de", "en", "es", "fr"]


def test_fit_help_shows_the_field_docstrings(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["align"])
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "``multi_positive`` (the multi-way method)" in out  # --model.loss.objective
    assert "Peak learning rate, reached at the end of warm-up." in out  # --model.optim.lr
    assert "--data.help DataConfig`` lists every field" in out
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--data.help", "DataConfig"])
    assert stop.value.code == 0
    assert "comma-separated (`en,de,fr`)" in " ".join(capsys.readouterr().out.split())  # --data.languages


def test_shard_commands_print_progress_lines_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ALIGN_PROGRESS_SECONDS", "0")  # a line per item: the end of each loop is always printed
    T.make_corpus(tmp_path, rows=40, rows_per_shard=10)
    err = capsys.readouterr().err
    assert "[shards: reading rows] 40 rows" in err and re.search(r"\[shards: writing buckets\] \d+/\d+ buckets", err)
    assert main(["shards", "verify", str(tmp_path / "shards")]) == 0
    assert re.search(r"\[shards: verifying train\] \d+/\d+ shards", capsys.readouterr().err)


def test_progress_is_a_tqdm_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    assert list(progress(range(5), "work", total=5, unit="item", stream=stream)) == list(range(5))
    assert "work: 100%" in stream.getvalue() and "5/5" in stream.getvalue()
