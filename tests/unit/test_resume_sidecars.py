"""Resume vs sidecars, along the user's path: ``align fit`` (checkpoint) -> ``align shards tokenize`` /
``align mine-negatives`` on the same build -> ``align fit ... --ckpt_path last``.

Sidecars change ``manifest.json`` but no text row: a resume must go on from the checkpoint's step. A sidecar the
run reads (``--data.hard_negatives``) stays pinned: re-mined with another ``--k``, the resume is refused naming
it and what changed. A checkpoint written before the split (whole-manifest sha256 only) still resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from lightning.pytorch import Callback

from alignment.cli import main
from alignment.data.pins import legacy_checksum_matches
from alignment.model import DualEncoder
from alignment.runs import RunMismatchError, check_resume
from tests import _training as T


class RecordStart(Callback):
    """Appends the step each ``fit`` starts training at (0 fresh, the checkpoint's step when resumed) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        with open(self.path, "a") as fh:
            fh.write(f"{trainer.global_step}\n")


def _starts(root) -> list[int]:
    return [int(line) for line in (root / "starts.txt").read_text().split()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A shard build (60 rows, 3 train shards), its tiny tokenizer, and a tiny encoder to mine negatives with."""
    root = tmp_path_factory.mktemp("resume_sidecars")
    corpus = T.make_corpus(root / "data", rows=60, rows_per_shard=20)
    encoder = root / "encoder"
    from alignment.synthetic import tiny_tokenizer

    tiny_tokenizer(save_dir=encoder)
    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoder.tiny_config(corpus.vocab_size), projection_dim=16).save_pretrained(encoder)
    return corpus, encoder


def _copy(built, tmp_path) -> T.Corpus:
    corpus, _ = built
    shards = tmp_path / "shards"
    shutil.copytree(corpus.shards, shards)
    return T.Corpus(shards, corpus.tokenizer, corpus.vocab_size)


def _mine(corpus: T.Corpus, encoder, k: int) -> None:
    assert main(["mine-negatives", "--shards", str(corpus.shards), "--model", str(encoder), "--k", str(k),
                 "--encode.quiet"]) == 0


def _tokenize(corpus: T.Corpus) -> None:
    assert main(["shards", "tokenize", "--shards", str(corpus.shards), "--tokenizer", str(corpus.tokenizer),
                 "--max_length", "32"]) == 0


def _fit(root, corpus: T.Corpus, monkeypatch, steps: int, *extra: str) -> int:
    (root / "csv.yaml").write_text(T.CSV_ONLY)
    monkeypatch.chdir(root)
    return main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml",
                 "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
                 "--model.encoder.vocab_size", str(corpus.vocab_size), "--data.batch_size", "8",
                 "--data.val_shards", "null", "--trainer.limit_val_batches", "0", "--trainer.max_steps", str(steps),
                 "--checkpoint.every_n_train_steps", "100", "--export.dir", "", "--ckpt_path", "last",
                 "--trainer.callbacks+=test_resume_sidecars.RecordStart",
                 "--trainer.callbacks.init_args.path", str(root / "starts.txt"), *extra])


def _last(root):
    return root / "runs" / "debug" / "checkpoints" / "last.ckpt"


def test_sidecars_added_after_a_checkpoint_do_not_stop_its_resume_but_a_remined_one_it_reads_does(
        built, tmp_path, monkeypatch, capsys):
    corpus, encoder = _copy(built, tmp_path), built[1]
    _mine(corpus, encoder, k=3)
    assert _fit(tmp_path, corpus, monkeypatch, 2, "--data.hard_negatives", "2") == 0
    saved = torch.load(_last(tmp_path), map_location="cpu", weights_only=False)["alignment_run"]
    assert saved["data_sidecars"]["negatives"]["identity"]["k"] == 3 and "tokens" not in saved["data_sidecars"]
    key = saved["data_sidecars"]["negatives"]["key"]

    _tokenize(corpus)  # a sidecar the run did not read: the manifest changes, its rows do not
    assert _fit(tmp_path, corpus, monkeypatch, 4, "--data.hard_negatives", "2") == 0
    assert _starts(tmp_path) == [0, 2]  # resumed at the checkpoint's step
    assert torch.load(_last(tmp_path), map_location="cpu", weights_only=False)["global_step"] == 4

    _mine(corpus, encoder, k=2)  # the newest negatives entry, which --data.hard_negatives reads, is another now
    before = _last(tmp_path).read_bytes()
    capsys.readouterr()
    assert _fit(tmp_path, corpus, monkeypatch, 6, "--data.hard_negatives", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("align: error: refusing to resume") and str(_last(tmp_path)) in err, err
    assert f"hard negatives sidecar (negatives/{key}/" in err and "k 3 -> 2" in err, err
    assert "align mine-negatives" in err, err
    assert _starts(tmp_path) == [0, 2] and _last(tmp_path).read_bytes() == before


def test_a_checkpoint_of_the_old_format_resumes_after_a_sidecar_was_added(built, tmp_path, monkeypatch):
    corpus, encoder = _copy(built, tmp_path), built[1]
    _mine(corpus, encoder, k=3)  # an entry the old run could have read
    assert _fit(tmp_path, corpus, monkeypatch, 2) == 0
    # What a checkpoint written before the split records: the sha256 of the whole manifest file, nothing else.
    ckpt = torch.load(_last(tmp_path), map_location="cpu", weights_only=False)
    run = ckpt["alignment_run"]
    del run["data_rows_sha256"], run["data_sidecars"]
    old = hashlib.sha256((corpus.shards / "manifest.json").read_bytes()).hexdigest()
    assert run["data_manifest_sha256"] == old
    torch.save(ckpt, _last(tmp_path))

    _mine(corpus, encoder, k=2)
    _tokenize(corpus)
    assert hashlib.sha256((corpus.shards / "manifest.json").read_bytes()).hexdigest() != old
    assert _fit(tmp_path, corpus, monkeypatch, 4) == 0
    assert _starts(tmp_path) == [0, 2]
    assert torch.load(_last(tmp_path), map_location="cpu", weights_only=False)["global_step"] == 4
    # an old checksum that no earlier state of the manifest gives is still refused
    assert not legacy_checksum_matches(hashlib.sha256(b"another build").hexdigest(), corpus.shards)
    # with --data.hard_negatives the run now reads the k=2 entry, written after the old checkpoint: refused
    manifest = json.loads((corpus.shards / "manifest.json").read_text())
    (k3, e3), (k2, _) = sorted(manifest["negatives"].items(), key=lambda kv: -kv[1]["identity"]["k"])
    now = {"data": run["data"], "data_sidecars": {"negatives": {"key": k2}}}
    with pytest.raises(RunMismatchError, match=rf"negatives/{k2}/ .* was written after the checkpoint .*"
                       rf"--k 3 --model {e3['identity']['model']}` \(entry {k3}"):
        check_resume({"alignment_run": run}, now, "old.ckpt")
