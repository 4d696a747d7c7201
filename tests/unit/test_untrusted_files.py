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
               str(tmp_path / "eval"), "--quiet"])
    err = _one_line(capsys.readouterr().err)
    assert rc != 0 and not marker.exists(), "align eval --model ran the checkpoint's command"
    assert "refusing to load" in err, err
    (tmp_path / "a.txt").write_text("Hello world\nGood morning\n")
    (tmp_path / "b.txt").write_text("Hallo Welt\nGuten Morgen\n")
    rc = main(["mine", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--model", str(path), "--out",
               str(tmp_path / "pairs.tsv"), "--quiet"])
    err = _one_line(capsys.readouterr().err)
    assert rc != 0 and not marker.exists(), "align mine --model ran the checkpoint's command"
    assert "refusing to load" in err, err


def test_own_checkpoint_still_exports(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()
