"""Stored teacher embeddings along the user's path: ``align shards build`` -> ``align embed-teacher`` -> ``align
shards verify`` -> the training stream (``Batch.teacher``, through the shuffle and a resume) -> the distillation
term with ``--model.distill.teacher_embeddings stored`` -> ``align fit`` without ever loading the teacher.

No gloo test: the stored vectors replace only the *source* of each local row's target (``stored_targets``);
rows never straddle ranks and the term's global normalisation reads the same gathered ids on both paths, which
``tests/distributed/test_objectives_ddp.py`` already checks for the distillation term at world size 2.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from alignment.cli import main
from alignment.data.manifest import iter_shard_rows
from alignment.data.teacher import decode_sidecar
from alignment.objectives import DistillConfig
from tests import _training as T


def _teacher(folder, vocab_size: int) -> str:
    """A tiny encoder folder with its own saved tokenizer: what ``--model.distill.teacher`` loads."""
    from alignment.model import DualEncoder
    from alignment.synthetic import tiny_tokenizer

    torch.manual_seed(123)
    DualEncoder.from_config(DualEncoder.tiny_config(vocab_size)).save_pretrained(folder)
    tiny_tokenizer(save_dir=folder)
    return str(folder)


def _embed(shards, teacher, *extra: str) -> int:
    return main(["embed-teacher", "--shards", str(shards), "--model", teacher, "--encode.quiet", "true", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    corpus = T.make_corpus(root / "data", rows=96, rows_per_shard=24)
    teacher = _teacher(root / "teacher", corpus.vocab_size)
    assert _embed(corpus.shards, teacher, "--dtype", "float32", "--encode.batch_size", "7") == 0
    return root, corpus, teacher


def _entries(shards) -> dict[str, dict]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return {rec["identity"]["dtype"]: rec for rec in manifest["teacher"].values()}


def _direct(teacher: str, texts: list[str]) -> torch.Tensor:
    """The distillation objective's own target: ``teacher_targets``' tokenisation and ``encode``, computed here."""
    from alignment.objectives.distill import load_teacher

    model, tokenizer = load_teacher(DistillConfig(teacher=teacher), 32)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return model.encode(enc["input_ids"], enc["attention_mask"])


def test_stored_vectors_are_the_teachers_embeddings_of_the_pivot_sentences(built, tmp_path, capsys):
    root, corpus, teacher = built
    half = tmp_path / "shards"  # a float16 entry, in a copy (training reads the newest matching entry)
    shutil.copytree(corpus.shards, half)
    assert _embed(half, teacher, "--dtype", "float16") == 0
    entries = _entries(half)
    ident = entries["float32"]["identity"]
    assert (ident["dim"], ident["pivot"], ident["prefix"], ident["pooling"], ident["split"]) == (32, "en", "", "mean",
                                                                                                 "train")
    assert ident["fingerprint"].startswith("sha256:") and ident["model_path"] == teacher
    for dtype, atol in (("float32", 1e-6), ("float16", 1e-3)):  # float16: 2^-11 relative on unit-norm components
        n = 0
        for f in entries[dtype]["splits"]["train"]["shards"]:
            keys, vectors, has = decode_sidecar((half / f["path"]).read_bytes())
            assert vectors.dtype == getattr(torch, dtype)
            rows = list(iter_shard_rows(half / f["text"]))
            assert keys == [k for k, _ in rows]
            with_en = [i for i, (_, row) in enumerate(rows) if row.texts.get("en", "").strip()]
            assert has.tolist() == [i in with_en for i in range(len(rows))]
            expected = _direct(teacher, [rows[i][1].texts["en"] for i in with_en])
            torch.testing.assert_close(vectors[with_en].float(), expected, atol=atol, rtol=0)
            assert not vectors[[i for i in range(len(rows)) if i not in with_en]].any()  # no pivot: zeros
            n += len(rows)
        assert n == entries[dtype]["splits"]["train"]["rows"] > 40
    assert main(["shards", "verify", str(half)]) == 0
    assert "2 teacher-embeddings entries" in capsys.readouterr().out


def test_verify_detects_a_corrupted_or_reordered_sidecar(built, tmp_path, capsys):
    from alignment.data.teacher import encode_sidecar

    _, corpus, _ = built
    copy = tmp_path / "shards"
    shutil.copytree(corpus.shards, copy)
    f = _entries(copy)["float32"]["splits"]["train"]["shards"][0]
    path = copy / f["path"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in a vector
    path.write_bytes(bytes(data))
    assert main(["shards", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"{f['path']}: teacher file changed after it was written" in err and "align embed-teacher" in err
    # a well-formed file whose manifest record was updated, but with the rows out of order
    keys, vectors, has = decode_sidecar(bytes(data))
    fresh = encode_sidecar(keys[::-1], vectors, has.tolist(), "float32")
    path.write_bytes(fresh)
    manifest = json.loads((copy / "manifest.json").read_text())
    for rec in manifest["teacher"].values():
        for g in rec["splits"]["train"]["shards"]:
            if g["path"] == f["path"]:
                import hashlib

                g.update(bytes=len(fresh), sha256=hashlib.sha256(fresh).hexdigest())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "verify", str(copy)]) == 1
    assert "row keys do not match" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the training path


def _module(corpus, teacher: str, mode: str, **distill):
    from alignment.losses import LossConfig
    from alignment.model import ModelConfig
    from alignment.module import AlignmentModule

    torch.manual_seed(0)
    return AlignmentModule(ModelConfig(name_or_path="tiny", vocab_size=corpus.vocab_size), LossConfig(),
                           distill=DistillConfig(teacher=teacher, teacher_embeddings=mode, weight=2.0, **distill))


def _datamodule(corpus, **data):
    dm = T.datamodule(corpus, batch_size=8, **data)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_stored_targets_give_the_teachers_loss_and_gradients(built, kind):
    """One step through the data module and the module's loss: stored vectors (float32 entry) against the
    teacher run on the batch's texts; float64 student in eval mode (no dropout)."""
    _, corpus, teacher = built
    dm = _datamodule(corpus)
    live, stored = _module(corpus, teacher, "off", kind=kind), _module(corpus, teacher, "stored", kind=kind)
    stored.objectives.setup_teacher(dm)
    assert stored.objectives.stored_teacher and stored.objectives._teacher is None  # never loaded
    batch = next(iter(dm.train_dataloader()))
    assert batch.teacher is not None and batch.teacher.shape == (batch.num_rows, 32)
    outs = []
    for module in (live, stored):
        module.double().eval()
        out = module._loss_terms(module._encode(batch), batch)
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
        outs.append((out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = outs
    assert float(a["distill_loss"].detach()) > 0
    for key in ("distill_loss", "distill", "distill_cos", "contrastive_loss"):
        assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6, abs=1e-9), key
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-9, msg=name)
    batch.teacher[0] += 0.05  # the stored path reads the batch's vectors (and nothing else)
    moved = stored._loss_terms(stored._encode(batch), batch)["distill_loss"]
    assert abs(float(moved.detach()) - float(b["distill_loss"].detach())) > 1e-6


def _stored_by_row_id(corpus, dtype: str = "float32") -> dict[str, torch.Tensor]:
    rec = _entries(corpus.shards)[dtype]
    out = {}
    for f in rec["splits"]["train"]["shards"]:
        keys, vectors, _ = decode_sidecar((corpus.shards / f["path"]).read_bytes())
        ids = {k: row.id for k, row in iter_shard_rows(corpus.shards / f["text"])}
        out.update({ids[k]: vectors[i].float() for i, k in enumerate(keys)})
    return out


def test_rows_keep_their_vectors_through_the_shuffle_and_a_resume(built):
    _, corpus, teacher = built
    stored = _stored_by_row_id(corpus)
    dm = _datamodule(corpus, language_policy="k", k=2)
    dm.attach_teacher({"model": teacher, "pooling": None, "max_length": 128, "prefix": "", "dim": 32})
    stream = dm.train_stream

    def epoch(start: int) -> list:
        stream.set_epoch(1, start)
        return list(stream)

    full, resumed = epoch(0), epoch(2)
    assert len(full) > 3 and [b.row_keys for b in resumed] == [b.row_keys for b in full[2:]]
    for batch in full + resumed:
        expected = torch.stack([stored[key] for key in batch.row_keys])
        assert torch.equal(batch.teacher, expected)


def test_a_mismatching_entry_is_refused_naming_the_flag_or_falls_back_under_auto(built, tmp_path):
    from alignment.data.plan import ShardRef
    from alignment.data.teacher import attach_teacher

    _, corpus, teacher = built
    dm = _datamodule(corpus)
    module = _module(corpus, teacher, "stored", text_prefix="query: ")
    with pytest.raises(ValueError, match=r"teacher_embeddings stored: no teacher embeddings in .*manifest\.json match"
                                         r".*prefix '' where --model\.distill\.text_prefix is 'query: '.*embed-teacher"):
        module.objectives.setup_teacher(dm)
    auto = _module(corpus, teacher, "auto", max_length=64)
    with pytest.warns(UserWarning, match=r"--model\.distill\.max_length is 64.*running the teacher every step"):
        auto.objectives.setup_teacher(dm)
    assert auto.objectives._teacher is not None and not auto.objectives.stored_teacher
    with pytest.raises(ValueError, match=r"--model\.distill\.teacher_embeddings must be one of off, auto, stored"):
        DistillConfig(teacher=teacher, teacher_embeddings="yes")
    # a teacher retrained in place (same folder, new weights): its stored vectors are stale
    shards, retrained = tmp_path / "shards", tmp_path / "teacher"
    shutil.copytree(corpus.shards, shards)
    shutil.copytree(teacher, retrained)
    assert _embed(shards, str(retrained)) == 0
    want = {"model": str(retrained), "pooling": None, "max_length": 128, "prefix": "", "dim": 32, "pivot": "en"}
    refs = [ShardRef(str(shards / f["text"])) for f in _entries(shards)["float16"]["splits"]["train"]["shards"]]
    assert all(ref.teacher for ref in attach_teacher(refs, str(shards), "train", want)[0])
    _teacher(retrained, corpus.vocab_size + 1)
    with pytest.raises(ValueError, match=r"the weight files of --model\.distill\.teacher .* changed since"):
        attach_teacher(refs, str(shards), "train", want)
    negatives = T.datamodule(corpus, hard_negatives=1)
    negatives.train_stream = dm.train_stream
    with pytest.raises(ValueError, match=r"--data\.hard_negatives 1 adds rows"):
        _module(corpus, teacher, "stored").objectives.setup_teacher(negatives)


def test_align_fit_with_stored_vectors_never_loads_the_teacher(built, monkeypatch, caplog):
    import logging

    import alignment.objectives as objectives

    root, corpus, teacher = built

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(objectives, "load_teacher", refuse)
    (root / "csv.yaml").write_text(T.CSV_ONLY)
    monkeypatch.chdir(root)
    with caplog.at_level(logging.INFO):
        code = main(["fit", "--config", str(T.DEBUG_YAML), "--config", "csv.yaml",
                     "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
                     "--model.encoder.vocab_size", str(corpus.vocab_size), "--data.batch_size", "8",
                     "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
                     "--checkpoint.every_n_train_steps", "100", "--model.distill.teacher", teacher,
                     "--model.distill.teacher_embeddings", "stored"])
    assert code == 0
    assert caplog.text.count("stored teacher embeddings") == 1 and "the teacher is not loaded" in caplog.text
    rows = [r for r in T.csv_metrics(next((root / "runs" / "debug").glob("csv/version_*/metrics.csv")))
            if "train/distill_loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/distill_loss"]) and r["train/distill_loss"] > 0
                                  for r in rows)
