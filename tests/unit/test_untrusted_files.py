"""Files from elsewhere are data, never code, and ``--overwrite`` never deletes what the project did not write.

Each test is a hostile but realistic input met through the command a user runs
(``align export`` / ``eval`` / ``mine`` / ``shards`` or a ``Trainer`` over the
datamodule): a checkpoint whose pickle runs a command, a shard manifest naming
``pipe:`` or a symlink out of its folder, ``--out`` / ``OUT`` pointing at the
user's corpus or an unrelated folder, the hidden folder a killed build leaves.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from tests import _training as T


class _RunsCommand:
    """Pickles as ``os.system(command)``: what a crafted checkpoint carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return T.make_corpus(tmp_path_factory.mktemp("corpus"), rows=120)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    trainer = T.trainer(root, max_steps=2)
    trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus))
    ckpt = root / "trained.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


# ---------------------------------------------------------------------------- item 6: checkpoints run no code


@pytest.fixture
def crafted(checkpoint, tmp_path):
    """A real training checkpoint plus one object whose unpickling runs `touch <marker>`."""
    marker = tmp_path / "PWNED"
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["callbacks"] = {"x": _RunsCommand(f"touch {marker}")}
    path = tmp_path / "crafted.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_align_export_refuses_a_checkpoint_that_runs_code(crafted, tmp_path, capsys):
    path, marker = crafted
    assert main(["export", str(path), str(tmp_path / "out")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert not marker.exists(), "unpickling the checkpoint ran its command"
    assert str(path) in err and "refusing to load" in err and "system" in err, err
    assert not (tmp_path / "out").exists()


def test_align_eval_and_mine_refuse_a_checkpoint_that_runs_code(crafted, corpus, tmp_path, capsys):
    path, marker = crafted
    rc = main(["eval", "--model", str(path), "--data", str(corpus.shards), "--split", "test", "--out",
               str(tmp_path / "eval"), "--encode.quiet"])
    err = _one_line(capsys.readouterr().err)
    assert rc != 0 and not marker.exists(), "align eval --model ran the checkpoint's command"
    assert "refusing to load" in err, err
    (tmp_path / "a.txt").write_text("Hello world\nGood morning\n")
    (tmp_path / "b.txt").write_text("Hallo Welt\nGuten Morgen\n")
    rc = main(["mine", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--model", str(path), "--out",
               str(tmp_path / "pairs.tsv"), "--encode.quiet"])
    err = _one_line(capsys.readouterr().err)
    assert rc != 0 and not marker.exists(), "align mine --model ran the checkpoint's command"
    assert "refusing to load" in err, err


def test_own_checkpoint_still_exports(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- item 7: shard names are file names


def _hostile_folder(corpus, tmp_path: Path, name: str) -> Path:
    """A copy of a real shard build whose manifest names its first test and train shards ``name`` (a file that
    exists under that name in the folder, so the old existence check passes)."""
    folder = tmp_path / "hostile"
    shutil.copytree(corpus.shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for split in ("train", "test"):
        shard = manifest["splits"][split]["shards"][0]
        shutil.copy(folder / shard["path"], folder / name)
        shard["path"] = name
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_pipe_shard_name_runs_nothing_in_fit(corpus, tmp_path, monkeypatch):
    folder = _hostile_folder(corpus, tmp_path, "pipe:touch PWNED")
    monkeypatch.chdir(folder)  # `align fit --data.train_shards .` from inside the folder
    trainer = T.trainer(tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match=r"--data.train_shards: .*must be relative inside the folder"):
        trainer.fit(T.module(corpus), datamodule=T.datamodule(corpus, train_shards="."))
    assert not (folder / "PWNED").exists(), "the manifest's 'pipe:' shard name ran as a shell command"


def test_pipe_shard_name_runs_nothing_in_eval(corpus, checkpoint, tmp_path, monkeypatch, capsys):
    folder = _hostile_folder(corpus, tmp_path, "pipe:touch PWNED")
    monkeypatch.chdir(folder)
    rc = main(["eval", "--model", str(checkpoint), "--data", ".", "--split", "test", "--out", str(tmp_path / "ev"),
               "--encode.quiet"])
    err = _one_line(capsys.readouterr().err)
    assert not (folder / "PWNED").exists(), "the manifest's 'pipe:' shard name ran as a shell command"
    assert rc != 0 and "must be relative inside the folder" in err, err
    assert main(["shards", "verify", "."]) == 1
    assert "must be relative inside the folder" in capsys.readouterr().err


def test_symlinked_shard_out_of_the_folder_is_not_read(corpus, checkpoint, tmp_path, capsys):
    folder = tmp_path / "linked"
    shutil.copytree(corpus.shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    inside = folder / manifest["splits"]["test"]["shards"][0]["path"]
    outside = tmp_path / "elsewhere.tar"  # same bytes: the checksum still matches, only the location is wrong
    shutil.move(inside, outside)
    inside.symlink_to(outside)
    assert main(["shards", "verify", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "outside the shard folder" in err, err
    rc = main(["eval", "--model", str(checkpoint), "--data", str(folder), "--split", "test", "--out",
               str(tmp_path / "ev"), "--encode.quiet"])
    err = _one_line(capsys.readouterr().err)
    assert rc != 0 and "outside the shard folder" in err, err


# ---------------------------------------------------------------------------- item 8: --overwrite deletes only our folders


def _jsonl(path: Path, rows: int = 40) -> Path:
    from alignment.synthetic import synthetic_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in synthetic_rows(rows, T.LANGUAGES, seed=3):
            fh.write(json.dumps({"id": r.id, "texts": r.texts}) + "\n")
    return path


def _build(inputs, out, *extra) -> list[str]:
    return ["shards", "build", "--format", "jsonl", *map(str, inputs), "--out", str(out), *extra]


def test_shards_overwrite_never_deletes_the_input_corpus(tmp_path, capsys):
    data = tmp_path / "data"
    corpus = _jsonl(data / "corpus.jsonl")
    before = corpus.read_bytes()
    assert main(_build([corpus], data, "--overwrite")) == 1
    err = _one_line(capsys.readouterr().err)
    assert corpus.read_bytes() == before, "--overwrite deleted the input corpus"
    assert f"--out {data} holds the input {corpus}" in err, err
    # even a real shard build that holds an input is not replaced
    assert main(_build([corpus], tmp_path / "shards")) == 0
    inside = _jsonl(tmp_path / "shards" / "more.jsonl")
    assert main(_build([inside], tmp_path / "shards", "--overwrite")) == 1
    assert inside.is_file() and "holds the input" in capsys.readouterr().err


def test_shards_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    corpus = _jsonl(tmp_path / "corpus.jsonl")
    mine = tmp_path / "thesis"
    (mine / "chapters").mkdir(parents=True)
    (mine / "chapters" / "1.tex").write_text("years of work")
    assert main(_build([corpus], mine, "--overwrite")) == 1
    err = _one_line(capsys.readouterr().err)
    assert (mine / "chapters" / "1.tex").read_text() == "years of work", "--overwrite deleted an unrelated folder"
    assert "is not a shard build" in err and "--out" in err, err
    # a folder the project built is still replaced
    assert main(_build([corpus], tmp_path / "shards")) == 0
    assert main(_build([corpus], tmp_path / "shards", "--overwrite", "--seed", "1")) == 0
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["seed"] == 1


def test_a_killed_build_leaves_nothing_after_the_next_build(tmp_path, capsys):
    import subprocess
    import sys
    import time

    corpus = _jsonl(tmp_path / "corpus.jsonl", rows=40)
    out = tmp_path / "shards"
    # a real build killed with SIGKILL while it reads a large input (seconds of parsing)
    big = tmp_path / "big.jsonl"
    with open(big, "w") as fh:
        fh.writelines(f'{{"id": {i}, "en": "sentence number {i}", "de": "Satz Nummer {i}"}}\n' for i in range(300_000))
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", *_build([big], out)], env=T.align_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [p for p in tmp_path.glob(".shards.partial-*") if p.is_dir()] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=30)
    left = [p for p in tmp_path.glob(".shards.partial-*") if p.is_dir()]
    assert left, "the killed build left no build folder (nothing to test)"
    assert main(_build([corpus], out)) == 0
    capsys.readouterr()
    assert not list(tmp_path.glob(".shards.*")), f"stale build folders kept: {list(tmp_path.glob('.shards.*'))}"


def test_export_overwrite_never_deletes_a_folder_it_did_not_write(checkpoint, tmp_path, capsys):
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["export", str(checkpoint), str(mine), "--overwrite"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert (mine / "notes.txt").read_text() == "keep me", "align export --overwrite deleted an unrelated folder"
    assert "is not an export" in err, err
    # the checkpoint inside OUT: refused even when OUT is an export
    out = tmp_path / "export"
    assert main(["export", str(checkpoint), str(out)]) == 0
    inside = out / "trained.ckpt"
    shutil.copy(checkpoint, inside)
    assert main(["export", str(inside), str(out), "--overwrite"]) == 2
    assert inside.is_file() and "holds the input" in capsys.readouterr().err
    inside.unlink()
    assert main(["export", str(checkpoint), str(out), "--overwrite"]) == 0
