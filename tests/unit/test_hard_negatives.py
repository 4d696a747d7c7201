"""Hard negatives along the user's path: ``align shards build`` -> ``align mine-negatives`` -> ``align shards
verify`` -> the training stream (``--data.hard_negatives K``) and ``align fit``.

The corpus is synthetic multi-way rows plus rows that share a German text with another row (a duplicate,
not a translation of it): mining must never store those as negatives of one another.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.data.identity import text_id
from alignment.model import DualEncoder
from alignment.synthetic import synthetic_rows, tiny_tokenizer
from tests import _training as T


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _mine(shards: Path, encoder: Path, *extra: str) -> int:
    return main(["mine-negatives", "--shards", str(shards), "--model", str(encoder), "--k", "3", "--encode.quiet",
                 *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(corpus, encoder folder)``: shards of 110 rows (10 of them duplicating another row's German text),
    mined with a tiny random encoder."""
    root = tmp_path_factory.mktemp("hardneg")
    rows = [{"id": r.id, "texts": dict(r.texts)} for r in synthetic_rows(100, T.LANGUAGES, seed=0, missing_prob=0.2)]
    with_de = [r for r in rows if "de" in r["texts"]][:10]
    dups = [{"id": f"dup-{i}", "texts": {"en": f"{r['texts']['en']} {r['texts']['en']}", "de": r["texts"]["de"] + "!"}}
            for i, r in enumerate(with_de)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + dups))
    shards = root / "shards"
    assert main(["shards", "build", "--format", "jsonl", str(root / "rows.jsonl"), "--out", str(shards),
                 "--rows_per_shard", "25", "--split", "1,0,0"]) == 0
    tokenizer = tiny_tokenizer(save_dir=root / "tok")
    encoder = root / "encoder"
    tiny_tokenizer(save_dir=encoder)
    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=16).save_pretrained(encoder)
    assert _mine(shards, encoder) == 0
    return T.Corpus(shards, root / "tok", len(tokenizer)), encoder


def _stored(shards: Path) -> tuple[str, dict, dict[str, list[dict]]]:
    manifest = _manifest(shards)
    (key, entry), = manifest["negatives"].items()
    stored = {}
    for f in entry["splits"]["train"]["shards"]:
        for line in (shards / f["path"]).read_text().splitlines():
            obj = json.loads(line)
            stored[obj["key"]] = obj["negatives"]
    return key, entry, stored


def _rows(shards: Path) -> dict[str, dict]:
    from alignment.data.manifest import iter_shard_rows

    return {key: dict(row.texts) for p in sorted((shards / "train").glob("*.tar")) for key, row in iter_shard_rows(p)}


def test_mined_negatives_are_stored_recorded_and_verified(built, capsys):
    corpus, encoder = built
    key, entry, stored = _stored(corpus.shards)
    rows = _rows(corpus.shards)
    assert stored.keys() == rows.keys() and len(rows) == 110
    identity = entry["identity"]
    assert (identity["k"], identity["split"], identity["model"]) == (3, "train", str(encoder))
    assert len(identity["parameters_sha256"]) == 64
    for query, negatives in stored.items():
        assert len(negatives) == 3 and query not in {n["id"] for n in negatives}
        assert [n["score"] for n in negatives] == sorted((n["score"] for n in negatives), reverse=True)
        own = {text_id(t) for t in rows[query].values()}
        for n in negatives:
            assert n["texts"] == rows[n["key"]]  # the negative's texts travel with it
            assert not own & {text_id(t) for t in n["texts"].values()}, (query, n["id"])  # never a false negative
    assert entry["stats"]["false_negatives_skipped"] > 0  # the duplicates were near and were dropped
    assert main(["shards", "verify", str(corpus.shards)]) == 0
    assert "1 mined-negatives entry" in capsys.readouterr().out
    assert main(["shards", "inspect", str(corpus.shards)]) == 0
    assert key in capsys.readouterr().out


def test_faiss_finds_the_same_neighbours_as_the_exact_search(built, tmp_path):
    pytest.importorskip("faiss")
    corpus, encoder = built
    copy = tmp_path / "copy"
    shutil.copytree(corpus.shards, copy)
    shutil.rmtree(copy / "negatives")
    manifest = _manifest(copy)
    del manifest["negatives"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert _mine(copy, encoder, "--backend", "faiss") == 0
    exact, faiss = _stored(corpus.shards)[2], _stored(copy)[2]
    assert _stored(copy)[1]["stats"]["backend"] == "faiss"
    for query, negatives in exact.items():
        got = faiss[query]
        assert [n["id"] for n in got] == [n["id"] for n in negatives] or \
            [n["score"] for n in got] == pytest.approx([n["score"] for n in negatives], abs=1e-5)


def test_verify_names_a_damaged_negatives_file(built, tmp_path, capsys):
    corpus, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(corpus.shards, copy)
    _, entry, _ = _stored(copy)
    damaged = copy / entry["splits"]["train"]["shards"][1]["path"]
    damaged.write_text(damaged.read_text().replace('"score": 0.', '"score": 1.', 1))
    assert main(["shards", "verify", str(copy)]) == 1
    err = capsys.readouterr().err
    assert entry["splits"]["train"]["shards"][1]["path"] in err and "align mine-negatives" in err


def test_errors_name_the_flag_before_compute(built, capsys):
    corpus, encoder = built
    assert _mine(corpus.shards, encoder, "--split", "nope") == 1
    assert "--split 'nope'" in capsys.readouterr().err
    assert main(["mine-negatives", "--shards", str(corpus.shards), "--model", str(encoder), "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err
    assert _mine(corpus.shards, corpus.shards / "no-model") == 1
    with pytest.raises(ValueError, match="stores 3 per row"):
        T.datamodule(corpus, hard_negatives=4).setup("fit")


def _batches(corpus: T.Corpus, resume: int | None = None, **data) -> list:
    dm = T.datamodule(corpus, **{"batch_size": 8, "shuffle_buffer": 16, **data})
    dm.setup("fit")
    if resume is not None:
        dm.resume(0, resume)
    return list(dm.train_dataloader())


@pytest.mark.parametrize("bucketing", [False, True])
def test_batches_hold_each_drawn_rows_mined_negatives_and_resume_is_exact(built, bucketing):
    corpus, _ = built
    _, _, stored = _stored(corpus.shards)
    data = {"bucketing": bucketing, "bucket_buffer": 16}
    plain = _batches(corpus, **data)
    mined = _batches(corpus, hard_negatives=2, **data)
    assert len(mined) == len(plain) > 3
    extra_rows = 0
    for with_k, without in zip(mined, plain):
        drawn = without.row_keys
        assert with_k.row_keys[: len(drawn)] == drawn  # the same drawn rows, in order, then the negatives
        wanted = list(dict.fromkeys(n["id"] for key in drawn for n in stored[key][:2] if n["id"] not in drawn))
        assert list(with_k.row_keys[len(drawn):]) == wanted
        extra_rows += len(wanted)
        rows = with_k.row_ids.tolist()
        assert sorted(set(rows)) == list(range(with_k.num_rows)) and len(with_k.text_ids) == len(rows)
    assert extra_rows > len(plain)
    resumed = _batches(corpus, resume=3, hard_negatives=2, **data)
    assert len(resumed) == len(mined) - 3
    for a, b in zip(resumed, mined[3:]):
        assert a.row_keys == b.row_keys
        for field in ("input_ids", "attention_mask", "row_ids", "lang_ids", "text_ids"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_align_fit_trains_with_hard_negatives(built, tmp_path):
    corpus, _ = built
    argv = [sys.executable, "-m", "alignment.cli", "fit", "--config", str(T.DEBUG_YAML),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
            "--model.encoder.name_or_path", "tiny", "--model.encoder.vocab_size", str(corpus.vocab_size),
            "--data.tokenizer", str(corpus.tokenizer), "--data.train_shards", str(corpus.shards),
            "--data.batch_size", "8", "--data.num_workers", "0", "--data.max_length", "32", "--data.val_shards", "null",
            "--data.shuffle_buffer", "16", "--model.optim.warmup_steps", "1", "--trainer.max_steps", "2",
            "--data.hard_negatives", "2"]
    done = subprocess.run(argv, cwd=tmp_path, env=T.align_env(), capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    said = [line for line in out.splitlines() if "data: 2 hard negatives per row from entry" in line]
    assert len(said) == 1, out[-3000:]
    logged = [r for r in T.csv_metrics(next(tmp_path.glob("runs/debug/csv/version_*/metrics.csv")))
              if "train/masked_negatives" in r]
    assert len(logged) == 2 and all(r["train/masked_negatives"] >= 0 for r in logged)  # the false-negative count
    assert all(r["train/rows"] > 8 for r in logged)  # 8 drawn rows plus their mined negatives
