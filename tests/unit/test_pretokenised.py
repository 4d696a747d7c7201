"""Pre-tokenised shards along the user's path: ``align shards build``, ``align shards tokenize``, then the data
module's batches (identical to tokenising in the loader, resume included), ``align fit`` saying which path it
took, the fallback naming the field that differs, ``align shards verify`` on damaged token files, and an
interrupted tokenize leaving the build as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from tests import _training as T

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


def _tokenize(corpus: T.Corpus, *extra: str, tokenizer: Path | None = None) -> int:
    return main(["shards", "tokenize", "--shards", str(corpus.shards), "--tokenizer", str(tokenizer or corpus.tokenizer),
                 "--max_length", "32", *extra])


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> T.Corpus:
    """A build with the ids of the tiny tokenizer at max length 32, and a copy of it without them."""
    root = tmp_path_factory.mktemp("pretok")
    corpus = T.make_corpus(root)
    plain = root / "plain"
    shutil.copytree(corpus.shards, plain)  # the text-only build: the tokenising path reads the same shards
    assert _tokenize(corpus) == 0
    return corpus


def _plain(corpus: T.Corpus) -> T.Corpus:
    return T.Corpus(corpus.shards.parent / "plain", corpus.tokenizer, corpus.vocab_size)


@contextlib.contextmanager
def _data_log():
    """The lines the data module logs through Lightning's rank-zero logger."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def _batches(corpus: T.Corpus, resume: int | None = None, **data) -> list:
    dm = T.datamodule(corpus, **data)
    dm.setup("fit")
    if resume is not None:
        dm.resume(0, resume)
    return list(dm.train_dataloader())


def _no_tokenizing(monkeypatch) -> None:
    """Make any tokenizer call (and any text identity computed) in the loader fail: the batches then come from the
    stored ids and identities alone."""
    import alignment.data.collate as collate

    real, real_ids = collate.tokenize, collate.text_ids

    def refuse(tokenizer, texts, **kwargs):
        if texts:
            raise AssertionError(f"tokenised {len(texts)} texts although the ids are stored")
        return real(tokenizer, texts, **kwargs)

    def refuse_ids(texts):
        texts = list(texts)
        if texts:
            raise AssertionError(f"hashed {len(texts)} texts although their identities are stored")
        return real_ids(texts)

    monkeypatch.setattr(collate, "tokenize", refuse)
    monkeypatch.setattr(collate, "text_ids", refuse_ids)


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        for field in ("input_ids", "attention_mask", "row_ids", "lang_ids", "text_ids"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert a.row_keys == b.row_keys


def test_tokenize_records_the_entry_and_is_idempotent(corpus, capsys):
    manifest = _manifest(corpus.shards)
    (key, record), = manifest["tokens"].items()
    assert record["identity"]["max_length"] == 32 and record["identity"]["text_prefix"] == ""
    text_shards = [s for e in manifest["splits"].values() for s in e["shards"]]
    files = [f for e in record["splits"].values() for f in e["shards"]]
    assert sorted(f["text"] for f in files) == sorted(s["path"] for s in text_shards)
    assert all((corpus.shards / f["path"]).is_file() and f["path"].startswith(f"tokens/{key}/") for f in files)
    assert sum(f["rows"] for f in files) == sum(s["rows"] for s in text_shards)
    before = (corpus.shards / "manifest.json").read_bytes()
    capsys.readouterr()
    assert _tokenize(corpus) == 0
    assert "already there" in capsys.readouterr().out
    assert (corpus.shards / "manifest.json").read_bytes() == before
    assert main(["shards", "verify", str(corpus.shards)]) == 0
    assert main(["shards", "inspect", str(corpus.shards)]) == 0
    assert key in capsys.readouterr().out


@pytest.mark.parametrize("data", [
    {},
    {"bucketing": True, "bucket_buffer": 64},
    {"language_policy": "k", "k": 2},
    {"language_policy": "pivot_pair", "languages": "en,de,fr"},
    {"max_length": 32, "num_workers": 2},
], ids=["all", "bucketing", "k", "pivot_pair", "workers"])
def test_batches_equal_the_tokenising_path(corpus, monkeypatch, data):
    want = _batches(_plain(corpus), **data)
    _no_tokenizing(monkeypatch)
    with _data_log() as lines:
        got = _batches(corpus, **data)
    assert any(line.startswith("data: pre-tokenised ids for") for line in lines), lines
    _assert_same(got, want)


@pytest.mark.parametrize("bucketing", [False, True])
def test_resume_follows_the_token_sidecar(corpus, monkeypatch, bucketing):
    data = {"bucketing": bucketing, "bucket_buffer": 32}
    whole = _batches(_plain(corpus), **data)
    want = _batches(_plain(corpus), resume=3, **data)
    _no_tokenizing(monkeypatch)
    got = _batches(corpus, resume=3, **data)
    _assert_same(got, want)
    _assert_same(got, whole[3:])


@pytest.mark.parametrize("change, field", [
    ({"max_length": 16}, "max_length (--data.max_length)"),
    ({"text_prefix": "query: "}, "text_prefix (--data.text_prefix)"),
    ("other tokenizer", "vocab_sha256"),
])
def test_a_different_identity_falls_back_and_names_the_field(corpus, tmp_path, change, field):
    if change == "other tokenizer":
        from alignment.synthetic import tiny_tokenizer

        tiny_tokenizer(concepts=150, save_dir=tmp_path / "tok")
        other = T.Corpus(corpus.shards, tmp_path / "tok", corpus.vocab_size)
        plain = T.Corpus(_plain(corpus).shards, tmp_path / "tok", corpus.vocab_size)
        change = {}
    else:
        other, plain = corpus, _plain(corpus)
    with _data_log() as lines:
        got = _batches(other, **change)
    said = [line for line in lines if line.startswith("data: tokenising --data.train_shards")]
    assert len(said) == 1 and field in said[0] and "identity differs" in said[0], lines
    _assert_same(got, _batches(plain, **change))


def test_a_second_tokenizer_adds_a_second_entry(corpus, tmp_path):
    build = tmp_path / "shards"
    shutil.copytree(corpus.shards, build)
    copy = T.Corpus(build, corpus.tokenizer, corpus.vocab_size)
    assert main(["shards", "tokenize", "--shards", str(build), "--tokenizer", str(corpus.tokenizer),
                 "--max_length", "16", "--text_prefix", "query: "]) == 0
    entries = _manifest(build)["tokens"]
    assert sorted(e["identity"]["max_length"] for e in entries.values()) == [16, 32]
    assert main(["shards", "verify", str(build)]) == 0
    with _data_log() as lines:
        _batches(copy, max_length=16, text_prefix="query: ")
    assert any("pre-tokenised ids" in line for line in lines), lines


def test_an_entry_without_stored_identities_is_rewritten(corpus, tmp_path, capsys, monkeypatch):
    """A build tokenised before text identities were stored: its ids still serve (identities hashed in the
    loader, same batches); `align shards tokenize` again rewrites the entry with them."""
    from alignment.data import tokens

    build = tmp_path / "shards"
    shutil.copytree(corpus.shards, build)
    copy = T.Corpus(build, corpus.tokenizer, corpus.vocab_size)
    (key, record), = _manifest(build)["tokens"].items()
    for f in (f for e in record["splits"].values() for f in e["shards"]):  # the sidecars as written before
        old = [(k, tokens.encode_ids(tokens.decode_ids(p))) for k, p in tokens.iter_sidecar(str(build / f["path"]))]
        with tarfile.open(build / f["path"], "w", format=tarfile.USTAR_FORMAT) as tar:
            for k, payload in old:
                info = tarfile.TarInfo(k + tokens.IDS_EXT)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        data = (build / f["path"]).read_bytes()
        f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    del record["text_ids"]
    manifest = _manifest(build)
    manifest["tokens"][key] = record
    (build / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert main(["shards", "verify", str(build)]) == 0
    want = _batches(_plain(corpus))
    _assert_same(_batches(copy), want)  # identities hashed in the loader
    capsys.readouterr()
    assert _tokenize(copy) == 0
    assert "already there" not in capsys.readouterr().out
    assert _manifest(build)["tokens"][key]["text_ids"] == 1
    _no_tokenizing(monkeypatch)
    _assert_same(_batches(copy), want)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "missing", "swapped"])
def test_verify_names_a_damaged_token_file(corpus, tmp_path, capsys, damage):
    build = tmp_path / "shards"
    shutil.copytree(corpus.shards, build)
    files = [f["path"] for e in next(iter(_manifest(build)["tokens"].values()))["splits"].values()
             for f in e["shards"]]
    victim = build / files[1]
    if damage == "flip":
        _corrupt(victim)
    elif damage == "missing":
        victim.unlink()
    else:
        shutil.copyfile(build / files[0], victim)
    capsys.readouterr()
    assert main(["shards", "verify", str(build)]) == 1
    err = capsys.readouterr().err
    assert files[1] in err and "align shards tokenize" in err, err


@pytest.mark.parametrize("damage, said", [("swapped", "stands where the text shard has"),
                                          ("truncated", "truncated"), ("header", "checksum")])
def test_a_damaged_token_file_is_tokenised_instead(corpus, tmp_path, damage, said):
    """The loader does not trust a damaged sidecar: from the damage on its rows are tokenised, same batches."""
    build = tmp_path / "shards"
    shutil.copytree(corpus.shards, build)
    files = [f["path"] for f in next(iter(_manifest(build)["tokens"].values()))["splits"]["train"]["shards"]]
    victim = build / files[1]
    if damage == "swapped":
        shutil.copyfile(build / files[0], victim)  # another shard's keys
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2 // 512 * 512 + 100])
    else:
        data = bytearray(victim.read_bytes())
        data[5] ^= 0x01  # a byte of the first member's name
        victim.write_bytes(bytes(data))
    from alignment.data.samples import TokenSidecarWarning

    with pytest.warns(TokenSidecarWarning, match=said):
        got = _batches(T.Corpus(build, corpus.tokenizer, corpus.vocab_size))
    _assert_same(got, _batches(_plain(corpus)))


def test_an_interrupted_tokenize_leaves_the_build_intact(corpus, tmp_path, monkeypatch):
    build = tmp_path / "shards"
    shutil.copytree(_plain(corpus).shards, build)
    copy = T.Corpus(build, corpus.tokenizer, corpus.vocab_size)
    manifest_bytes = (build / "manifest.json").read_bytes()
    shard_hashes = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in build.rglob("*.tar")}
    import alignment.data.tokens as tokens

    real, calls = tokens.write_sidecar, []

    def killed_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return real(*args, **kwargs)

    monkeypatch.setattr(tokens, "write_sidecar", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _tokenize(copy)
    assert (build / "manifest.json").read_bytes() == manifest_bytes
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in build.rglob("*.tar")} == shard_hashes
    assert not [p for p in (build / "tokens").rglob("*") if p.is_file()] if (build / "tokens").exists() else True
    assert main(["shards", "verify", str(build)]) == 0
    monkeypatch.setattr(tokens, "write_sidecar", real)
    assert _tokenize(copy) == 0 and main(["shards", "verify", str(build)]) == 0
    assert len(_manifest(build)["tokens"]) == 1


def test_align_fit_says_it_reads_the_pre_tokenised_ids(corpus, tmp_path):
    argv = [sys.executable, "-m", "alignment.cli", "fit", "--config", str(T.DEBUG_YAML),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
            "--model.encoder.name_or_path", "tiny", "--model.encoder.vocab_size", str(corpus.vocab_size),
            "--data.tokenizer", str(corpus.tokenizer), "--data.train_shards", str(corpus.shards),
            "--data.batch_size", "8", "--data.num_workers", "0", "--data.max_length", "32",
            "--data.shuffle_buffer", "16", "--model.optim.warmup_steps", "1", "--trainer.max_steps", "2"]
    done = subprocess.run(argv, cwd=tmp_path, env=T.align_env(), capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    said = [line for line in out.splitlines() if "data: pre-tokenised ids for" in line]
    assert len(said) == 1 and str(corpus.shards / "manifest.json") in said[0], out[-3000:]


def test_sidecar_payload_round_trip_and_older_payloads():
    """A sample's payload holds its ids and, when written by this version, its texts' identities; a payload
    without them (written before they were stored) or of another identity version gives the ids and None (the
    loader then computes the identities), and a damaged one is refused."""
    from alignment.data import tokens
    from alignment.data.identity import IDENTITY_VERSION, text_id

    ids = {"en": [0, 5, 9, 2], "zh-Hans": [0, 7, 2], "de": []}
    identities = {code: text_id(text) for code, text in (("en", "Save"), ("zh-Hans", "保存"), ("de", "x"))}
    identities["de"] = -(2**63)  # the full int64 range survives
    assert tokens.decode_sample(tokens.encode_ids(ids, identities)) == (ids, identities)
    assert tokens.decode_sample(tokens.encode_ids(ids)) == (ids, None)
    assert tokens.decode_ids(tokens.encode_ids(ids, identities)) == ids
    other = tokens.encode_ids(ids, identities).replace(
        f'"{tokens.IDENTITY_KEY}": {IDENTITY_VERSION}'.encode(), f'"{tokens.IDENTITY_KEY}": 999'.encode())
    assert tokens.decode_sample(other) == (ids, None)
    for damaged in (tokens.encode_ids(ids, identities)[:-3], tokens.encode_ids(ids)[:-2], b"no header"):
        with pytest.raises(ValueError):
            tokens.decode_sample(damaged)
