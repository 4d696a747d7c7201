"""Unlucky input meets a real run: skipped rows, long sentences, foreign tokenizers, odd save intervals.

Each test reproduces a failure as a user met it, through a ``Trainer`` over the
streaming datamodule or the ``align`` command, on the tiny synthetic corpus.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment.cli import main
from tests import _training as T


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=120, rows_per_shard=30)


def _train_shards(corpus) -> list[dict]:
    return json.loads((corpus.shards / "manifest.json").read_text())["splits"]["train"]["shards"]


def _lines(err: str) -> list[str]:
    """stderr without the progress lines (``[shards: ...]``) that commands print while they work."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[")]


# ---------------------------------------------------------------------------- item 1: empty batches on every rank


def _fit_one_epoch(corpus, root, gradcache=None, **data):
    module = T.module(corpus, gradcache=gradcache)
    datamodule = T.datamodule(corpus, **data)
    trainer = T.trainer(root, max_steps=-1, max_epochs=1)
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    trainer.fit(module, datamodule=datamodule)
    return trainer, module, before


def test_truncated_shard_gives_skipped_steps_not_a_crash(corpus, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(corpus.shards, shards)
    first = shards / _train_shards(corpus)[0]["path"]
    first.write_bytes(first.read_bytes()[: 6 * 512])  # 2 of its 30 samples survive (header + payload each)
    trainer, module, _ = _fit_one_epoch(corpus, tmp_path / "run", train_shards=str(shards))
    assert module.empty_steps_total >= 1, "the truncated shard left no empty batch (nothing tested)"
    assert trainer.global_step == len(trainer.train_dataloader), "the epoch did not run to its end"


@pytest.mark.parametrize("gradcache", [None, {"chunk_size": 4}], ids=["plain", "gradcache"])
def test_language_with_no_rows_gives_skipped_steps_not_a_crash(corpus, tmp_path, gradcache):
    # 'ja' is in no row: every row has at most one text in [en, ja], so every batch is empty
    trainer, module, before = _fit_one_epoch(corpus, tmp_path / "run", gradcache, languages=["en", "ja"])
    assert module.empty_steps_total == len(trainer.train_dataloader) >= 1  # every batch a counted, skipped step
    for name, p in module.encoder.state_dict().items():  # skipped steps never touch the weights
        torch.testing.assert_close(p, before[name], atol=0, rtol=0, msg=name)


def test_subset_of_languages_runs_past_the_end_of_the_epoch(corpus, tmp_path):
    trainer, module, _ = _fit_one_epoch(corpus, tmp_path / "run", languages=["en", "de"])
    assert trainer.global_step == len(trainer.train_dataloader)


# ---------------------------------------------------------------------------- item 2: max_length vs the position table


def test_max_length_over_the_models_positions_fails_before_any_step(corpus, tmp_path):
    from alignment.cli import main as align

    rows = tmp_path / "long.jsonl"
    long_en = " ".join(["hi"] * 200)  # 200 tokens: past the tiny model's 128 positions
    rows.write_text("".join(json.dumps({"id": f"r{i}", "en": f"{long_en} {i}", "de": f"hallo {i}", "fr": f"salut {i}"})
                            + "\n" for i in range(40)))
    assert align(["shards", "build", "--format", "jsonl", str(rows), "--out", str(tmp_path / "shards"),
                  "--split", "1,0,0"]) == 0
    module = T.module(corpus)
    trainer = T.trainer(tmp_path / "run", max_steps=2)
    with pytest.raises(ValueError, match=r"--data.config.max_length 250 is longer than the model's 128 positions"):
        trainer.fit(module, datamodule=T.datamodule(corpus, train_shards=str(tmp_path / "shards"), max_length=250))
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------- item 3: export with another model's tokenizer


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    trainer = T.trainer(root, max_steps=2)
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    trainer.save_checkpoint(root / "trained.ckpt")
    return root / "trained.ckpt"


def test_export_refuses_another_models_tokenizer(corpus, checkpoint, tmp_path, capsys):
    from alignment.synthetic import tiny_tokenizer

    other = tmp_path / "other-tok"
    bigger = tiny_tokenizer(concepts=2000, save_dir=other)  # ten times the words: ids past the embedding table
    assert len(bigger) > corpus.vocab_size
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), str(out), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(_lines(err)) == 1, err
    assert f"--tokenizer {other} has {len(bigger)} tokens but the model's embedding table has" in err, err
    assert not out.exists(), "an export that crashes every encode was written"
    # a tokenizer path that does not exist is named as such, not as a malformed hub id
    assert main(["export", str(checkpoint), str(out), "--tokenizer", str(tmp_path / "no-such-tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--tokenizer {tmp_path / 'no-such-tok'}: no such tokenizer folder" in err, err


# ---------------------------------------------------------------------------- item 4: last.ckpt is the final model


def test_last_ckpt_is_the_final_step_when_max_steps_is_off_the_save_interval(corpus, tmp_path, capsys):
    from alignment.callbacks import AtomicModelCheckpoint

    ckpts = tmp_path / "ckpt"
    saver = AtomicModelCheckpoint(dirpath=str(ckpts), every_n_train_steps=3, save_last=True, save_top_k=0)
    module = T.module(corpus)
    trainer = T.trainer(tmp_path / "run", max_steps=5, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(module, datamodule=T.datamodule(corpus))
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5, f"last.ckpt holds step {last['global_step']}, the run ended at step 5"
    for name, p in module.state_dict().items():
        torch.testing.assert_close(last["state_dict"][name], p, atol=0, rtol=0, msg=name)
    # what the README's EVAL_MODEL=.../last.ckpt evaluates: the exported final model
    assert main(["export", str(ckpts / "last.ckpt"), str(tmp_path / "export")]) == 0
    assert "exported" in capsys.readouterr().out


# ---------------------------------------------------------------------------- item 5: resume with changed settings


@pytest.fixture(scope="module")
def interrupted(corpus, tmp_path_factory):
    """A run stopped at step 2 of 4 with its last.ckpt (as a kill after a save leaves it)."""
    from alignment.callbacks import AtomicModelCheckpoint

    root = tmp_path_factory.mktemp("interrupted")
    saver = AtomicModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=2, save_last=True, save_top_k=0)
    trainer = T.trainer(root, max_steps=2, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    return root / "ckpt" / "last.ckpt"


@pytest.mark.parametrize(
    "change, message",
    [({"data": {"batch_size": 8}}, r"resuming with --data.batch_size = 8, but the checkpoint was trained "
                                   r"with 16"),
     ({"loss": {"objective": "pairwise"}}, r"--model.loss.objective: checkpoint 'multi_positive', config 'pairwise'")],
    ids=["batch_size", "objective"],
)
def test_resume_with_changed_settings_is_refused(corpus, interrupted, tmp_path, change, message):
    module = T.module(corpus, loss=change.get("loss"))
    trainer = T.trainer(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, datamodule=T.datamodule(corpus, **change.get("data", {})), ckpt_path=str(interrupted))
    assert trainer.global_step <= 2, "training went on from a wrong data position"


def test_resume_with_the_same_settings_still_works(corpus, interrupted, tmp_path):
    trainer = T.trainer(tmp_path, max_steps=4)
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus), ckpt_path=str(interrupted))
    assert trainer.global_step == 4


# ---------------------------------------------------------------------------- item 9: errors a person can read


def _fit_args(corpus, tmp_path, *extra) -> list[str]:
    return ["fit", "--config", str(T.DEBUG_YAML), "--data.config.train_shards", str(corpus.shards),
            "--data.config.tokenizer", str(corpus.tokenizer), "--model.encoder.vocab_size", str(corpus.vocab_size),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
            "--trainer.logger", "false", "--trainer.max_steps", "1", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [(["--data.config.batch_size", "0"], "--data.batch_size must be >= 1 (rows per rank), got 0"),
     (["--model.loss.temperature", "-1"], "--model.loss.temperature must be between"),
     (["--data.config.tokenizer", "./no-such-tokenizer"],
      "--data.tokenizer ./no-such-tokenizer: no such tokenizer folder"),
     (["--data.config.train_shards", "./no-such-shards"], "--data.train_shards: ./no-such-shards")],
    ids=["batch_size", "temperature", "tokenizer-path", "shards-path"],
)
def test_align_fit_config_checks_are_one_line(corpus, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(_fit_args(corpus, tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("align fit: error:")]
    assert len(lines) == 1 and message in lines[0], err


def _shards_build(inputs, out, *extra) -> list[str]:
    return ["shards", "build", "--format", "jsonl", *map(str, inputs), "--out", str(out), *extra]


def _rows_text(n: int = 30, start: int = 0) -> str:
    return "".join(json.dumps({"id": f"r{i}", "en": f"sentence {i}", "de": f"Satz {i}"}) + "\n"
                   for i in range(start, start + n))


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".bz2"])
def test_shards_build_on_a_truncated_compressed_input_is_one_line(tmp_path, capsys, suffix):
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}[suffix]
    data = opener(_rows_text(2000).encode())
    path = tmp_path / f"corpus.jsonl{suffix}"
    path.write_bytes(data[: len(data) // 2])
    assert main(_shards_build([path], tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(_lines(err)) == 1, err
    assert f"{path}: unreadable after line" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_shards_build_on_a_read_only_folder_is_one_line(tmp_path, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(_rows_text())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(_shards_build([corpus], locked / "out")) == 1
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(_lines(err)) == 1 and str(locked) in err, err


def test_shards_build_out_of_space_is_one_line(tmp_path):
    """A real write failure: the build runs with a 64 kB file-size limit (RLIMIT_FSIZE, as a quota or a full
    disk stops writes), so writing its shuffle buckets fails with an OSError."""
    import resource
    import signal
    import subprocess
    import sys

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(_rows_text(4000))  # ~250 kB

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run([sys.executable, "-m", "alignment.cli", *_shards_build([corpus], tmp_path / "out")],
                          env=T.align_env(), capture_output=True, text=True, timeout=120, preexec_fn=limit)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err and len(_lines(err)) == 1, err
    assert "align shards build: error: File too large while writing the build of --out" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_shards_build_unknown_key_duplicate_key_and_missing_pivot(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    lines = _rows_text(30).splitlines()
    lines[3] = '{"id": "r3", "en": "sentence 3", "de": "Satz 3", "source": "http://example.org"}'
    lines[5] = '{"id": "r5", "en": "sentence 5", "de": "Satz 5", "de": "Falsch"}'
    corpus.write_text("\n".join(lines) + "\n")
    # one unknown key is a counted drop without --strict, not an aborted build
    assert main(_shards_build([corpus], tmp_path / "out")) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    cleaning = manifest["cleaning"]
    assert cleaning["texts"]["dropped"]["unknown_language"] == 1
    assert cleaning["rows"]["dropped"]["malformed"] == 1  # the row with 'de' twice: which one is right is unknown
    assert sum(e["rows"] for e in manifest["splits"].values()) == 29
    assert any("key 'de' appears twice" in e for e in cleaning["examples"]["malformed"])
    capsys.readouterr()
    # with --strict the unknown key stops the build, naming file and line
    assert main(_shards_build([corpus], tmp_path / "strict", "--strict")) == 1
    assert f"{corpus}:4" in capsys.readouterr().err
    # a --pivot that is in no row: built, with a warning
    assert main(_shards_build([corpus], tmp_path / "fr", "--pivot", "fr")) == 0
    assert "warning: the pivot --pivot fr is in no row" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 10: memory on a giant line


def test_giant_line_is_dropped_in_bounded_memory(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as fh:
        fh.write(_rows_text(20))
        fh.write('{"id": "giant", "en": "')  # a 105 MB line, written in pieces
        for _ in range(50):
            fh.write("x " * (1 << 20))
        fh.write('", "de": "y"}\n')
        fh.write(_rows_text(20, start=20))
    # peak resident memory of the build process itself (VmHWM starts afresh at exec, unlike ru_maxrss)
    script = ("import re, sys; from alignment.cli import main; rc = main(sys.argv[1:]); "
              "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
              "print('PEAK_MB', int(hwm) // 1024); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", script, *_shards_build([corpus], tmp_path / "out")],
                          env=T.align_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.rsplit("PEAK_MB", 1)[1].split()[0])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["cleaning"]["rows"]["dropped"]["too_long"] == 1
    assert sum(e["rows"] for e in manifest["splits"].values()) == 40
    # measured: 273 MB here (225 MB for the same build without the line), 1126 MB before the fix
    assert peak < 400, f"peak memory {peak} MB for one 105 MB line"


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_export_of_a_damaged_checkpoint_is_one_line(checkpoint, tmp_path, capsys, damage):
    data = checkpoint.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes({"empty": b"", "garbage": bytes(range(256)) * 64, "truncated": data[: len(data) // 2]}[damage])
    assert main(["export", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(_lines(err)) == 1 and str(bad) in err, err
    assert not (tmp_path / "out").exists()


def test_checkpoint_from_a_relative_tokenizer_path_exports_from_another_directory(corpus, tmp_path, monkeypatch,
                                                                                    capsys):
    import os

    monkeypatch.chdir(corpus.tokenizer.parent)  # the run is started with --data.config.tokenizer tok
    trainer = T.trainer(tmp_path / "run", max_steps=1)
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus, tokenizer=os.path.relpath(corpus.tokenizer)))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    monkeypatch.chdir(tmp_path)  # export from elsewhere, without --tokenizer
    assert main(["export", str(tmp_path / "run.ckpt"), str(tmp_path / "export")]) == 0, capsys.readouterr().err
    assert (tmp_path / "export" / "tokenizer.json").is_file()
