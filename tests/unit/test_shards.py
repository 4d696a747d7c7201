"""WebDataset shards: build, splits, shuffle, atomic output, resolve, verify, inspect, CLI (alignment.data.build etc.)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from alignment.cli import main
from alignment.data.build import _split_unit, build_shards
from alignment.data.cleaning import CleaningConfig
from alignment.data.manifest import (
    MANIFEST_FORMAT,
    ManifestError,
    ShardInfo,
    iter_shard_rows,
    load_manifest,
    resolve_shards,
    verify_shards,
)
from alignment.data.rows import CorpusError, MultiWayRow, split_key
from alignment.data.shards_write import (
    ShardBuildConfig,
    SplitSpec,
    SplitWriter,
    encode_sample,
    parse_size,
    sample_key,
    ustar_header,
)
from alignment.data.spill import bucket_of
from alignment.synthetic import synthetic_rows

SIX = "en,de,fr,es,ru,zh-Hans,ar"


def build(tmp_path: Path, rows, name: str = "out", **kwargs) -> tuple[dict, Path]:
    kwargs.setdefault("shuffle_buckets", 4)
    config = ShardBuildConfig(out=tmp_path / name, **kwargs)
    return build_shards(rows, config), config.out


def read_split(out: Path, split: str) -> list[tuple[str, MultiWayRow]]:
    try:
        shards = resolve_shards(out, split)
    except FileNotFoundError:
        return []
    return [item for info in shards for item in iter_shard_rows(info.url)]


def all_rows(out: Path) -> dict[str, list[MultiWayRow]]:
    return {s: [row for _, row in read_split(out, s)] for s in ("train", "validation", "test")}


def as_json(rows) -> list[str]:
    return sorted(json.dumps(r.to_json(), sort_keys=True) for r in rows)


def raising_after(rows, k: int):
    """A reader that fails on row ``k``, like a corrupt input discovered mid-build."""
    for i, row in enumerate(rows):
        if i == k:
            raise RuntimeError(f"input broke at row {k}")
        yield row


# --------------------------------------------------------------------------- round trip and format


def test_round_trip_returns_exactly_the_input_rows(tmp_path):
    rows = synthetic_rows(300, ("en", "de", "fr", "zh-Hans"), missing_prob=0.3)
    manifest, out = build(tmp_path, rows, rows_per_shard=50, split="0.8,0.1,0.1")
    got = all_rows(out)
    assert as_json(r for split in got.values() for r in split) == as_json(rows)
    assert manifest["format"] == MANIFEST_FORMAT and manifest["pivot"] == "en"
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {s: len(r) for s, r in got.items()}
    assert manifest["languages"]["en"] == 300
    assert manifest["languages"]["de"] == sum("de" in r.texts for r in rows)
    assert manifest["cleaning"]["rows"] == {"in": 300, "kept": 300, "dropped": {}}
    assert json.loads((out / "cleaning_report.json").read_text()) == manifest["cleaning"]
    assert sorted(p.name for p in out.iterdir()) == [
        "cleaning_report.json",
        "manifest.json",
        "test",
        "train",
        "validation",
    ]


def test_shards_read_with_webdataset_key_is_the_row_id(tmp_path):
    rows = synthetic_rows(40)
    _, out = build(tmp_path, rows, split="1,0,0")
    urls = [info.url for info in resolve_shards(out / "manifest.json", "train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 40
    by_id = {r.id: r for r in rows}
    for sample in samples:
        obj = json.loads(sample["json"].decode("utf-8"))
        assert set(obj) == {"id", "pivot", "texts"}
        assert sample["__key__"] == obj["id"]
        assert MultiWayRow.from_json(obj) == by_id[obj["id"]]


def test_sample_keys_are_safe_unique_and_ids_are_kept(tmp_path):
    ids = ["plain-id_1", "with.dot", "a/b/c", "spaces and ünïcödé", "x" * 200, "with.dot"]
    rows = [MultiWayRow(id=i, texts={"en": f"sentence {n}", "de": f"Satz {n}"}) for n, i in enumerate(ids)]
    _, out = build(tmp_path, rows, split="1,0,0")
    pairs = read_split(out, "train")
    keys = [k for k, _ in pairs]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys) and len(set(keys)) == len(ids)
    assert sorted(r.id for _, r in pairs) == sorted(ids)  # the original ids, repeats included
    assert "plain-id_1" in keys  # a clean, unique id is its own key
    assert sample_key("plain-id_1") == "plain-id_1"
    assert sample_key("with.dot") != sample_key("with_dot") and "." not in sample_key("with.dot")


# --------------------------------------------------------------------------- sizing


def test_sizing_by_rows(tmp_path):
    manifest, out = build(tmp_path, synthetic_rows(230), rows_per_shard=40, split="1,0,0")
    shards = manifest["splits"]["train"]["shards"]
    assert [s["rows"] for s in shards] == [40, 40, 40, 40, 40, 30]
    assert [s["path"] for s in shards] == [f"train/corpus-{i:06d}.tar" for i in range(6)]
    assert manifest["splits"]["validation"] == {"rows": 0, "languages": {}, "shards": []}
    assert not (out / "validation").exists()  # a split with zero rows has no shards


def test_sizing_by_bytes(tmp_path):
    limit = 30_000
    manifest, out = build(tmp_path, synthetic_rows(400), bytes_per_shard="30kB", split="1,0,0", prefix="mw")
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 3
    for shard in shards:
        size = (out / shard["path"]).stat().st_size
        assert size == shard["bytes"] <= limit
    assert sum(s["rows"] for s in shards) == 400
    # every shard but the last was closed because the next sample would not fit
    assert all(s["bytes"] > limit - 2 * 10240 for s in shards[:-1])


# --------------------------------------------------------------------------- shuffle and splits


def test_shuffle_is_deterministic_by_seed(tmp_path):
    rows = synthetic_rows(200)
    m1, out1 = build(tmp_path, rows, name="a", seed=3, rows_per_shard=64)
    m2, out2 = build(tmp_path, rows, name="b", seed=3, rows_per_shard=64)
    m3, out3 = build(tmp_path, rows, name="c", seed=4, rows_per_shard=64)
    digests = lambda m: [s["sha256"] for e in m["splits"].values() for s in e["shards"]]  # noqa: E731
    assert digests(m1) == digests(m2)  # byte-identical shards
    order1 = [r.id for r in all_rows(out1)["train"]]
    order3 = [r.id for r in all_rows(out3)["train"]]
    assert order1 != order3 and digests(m1) != digests(m3)
    input_order = [r.id for r in rows]
    assert order1 != [i for i in input_order if i in set(order1)]  # not the input order


def test_splits_never_share_a_pivot_text_even_with_duplicates(tmp_path):
    base = synthetic_rows(150, ("en", "de"))
    variants = []
    for i, row in enumerate(base[:60]):  # duplicates, whitespace and case variants of the same English
        en = row.texts["en"]
        for j, form in enumerate((en, "  " + en.upper(), en.replace(" ", "  "))):
            variants.append(MultiWayRow(id=f"v{i}-{j}", texts={"en": form, "de": f"Variante {j} {i}"}))
    rows = base + variants
    for dedupe in (False, True):
        cleaning = CleaningConfig(deduplicate=dedupe)
        _, out = build(tmp_path, rows, name=f"d{dedupe}", split="0.5,0.25,0.25", cleaning=cleaning)
        got = all_rows(out)
        keys = {s: {split_key(r.texts["en"]) for r in got[s]} for s in got}
        assert not keys["train"] & keys["validation"]
        assert not keys["train"] & keys["test"]
        assert not keys["validation"] & keys["test"]
        assert all(keys.values())
        total = sum(len(v) for v in got.values())
        assert total == (len(rows) if not dedupe else len(rows) - 60 - 60)  # exact + whitespace duplicates dropped


def test_fraction_splits_are_stable_when_the_corpus_grows(tmp_path):
    rows = synthetic_rows(1000)
    _, small = build(tmp_path, rows[:500], name="small", split="0.8,0.1,0.1")
    _, large = build(tmp_path, rows, name="large", split="0.8,0.1,0.1")
    split_of = lambda out: {r.id: s for s, rs in all_rows(out).items() for r in rs}  # noqa: E731
    a, b = split_of(small), split_of(large)
    assert all(b[i] == s for i, s in a.items())
    val = sum(s == "validation" for s in b.values())
    assert 60 <= val <= 140  # ~10% of 1000


def test_count_splits(tmp_path):
    manifest, _ = build(tmp_path, synthetic_rows(300), split="rest,30,20")
    assert {s: e["rows"] for s, e in manifest["splits"].items()} == {"train": 250, "validation": 30, "test": 20}
    assert manifest["build"]["split"] == "rest,30,20"


# --------------------------------------------------------------------------- atomic output


def test_interrupted_build_leaves_no_output_and_no_partial_files(tmp_path):
    rows = synthetic_rows(200)
    with pytest.raises(RuntimeError, match="input broke at row 150"):
        build(tmp_path, raising_after(rows, 150), rows_per_shard=10)
    assert list(tmp_path.iterdir()) == []  # no out, no staging directory, no buckets


def test_interrupted_overwrite_keeps_the_previous_build(tmp_path):
    first, out = build(tmp_path, synthetic_rows(100, seed=1), rows_per_shard=10)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError):
        build(tmp_path, raising_after(synthetic_rows(300, seed=2), 250), rows_per_shard=10, overwrite=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert verify_shards(out) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # a successful overwrite replaces it
    second, _ = build(tmp_path, synthetic_rows(300, seed=2), rows_per_shard=10, overwrite=True)
    assert sum(e["rows"] for e in second["splits"].values()) == 300
    assert verify_shards(out) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_while_writing_shards_leaves_nothing(tmp_path):
    """A strict duplicate found in the last spill bucket fails the build after earlier shards were written."""
    rows = synthetic_rows(200)
    last = next(r for r in rows if bucket_of(_split_unit(0, split_key(r.texts["en"])), 4) == 3)
    rows.append(MultiWayRow(id="dup", texts={"en": last.texts["en"], "de": "anders"}, source="more.jsonl:1"))
    with pytest.raises(CorpusError, match=r"more.jsonl:1: duplicate_pivot"):
        build(tmp_path, rows, rows_per_shard=5, shuffle_buckets=4, cleaning=CleaningConfig(strict=True))
    assert list(tmp_path.iterdir()) == []


def test_split_writer_gives_a_shard_its_final_name_only_when_complete(tmp_path):
    writer = SplitWriter(tmp_path, "train", "corpus", max_rows=10, max_bytes=None)
    rows = synthetic_rows(25)
    for row in rows:
        writer.write(row.id, row)
    names = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert len(names) == 3 and re.fullmatch(r"\.corpus-000002\.tar\.partial-[0-9a-f]{8}", names[0])
    assert names[1:] == ["corpus-000000.tar", "corpus-000001.tar"]
    assert [len(list(iter_shard_rows(tmp_path / "train" / n))) for n in names[1:]] == [10, 10]
    entry = writer.close()
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"corpus-00000{i}.tar" for i in range(3)]
    assert entry["rows"] == 25 and entry["languages"]["en"] == 25
    assert [s["path"] for s in entry["shards"]] == [f"train/corpus-00000{i}.tar" for i in range(3)]


def test_ustar_header_is_byte_identical_to_tarfile():
    for name, size in [("a.json", 0), ("row-0123456789abcdef.json", 511), ("x" * 95 + ".json", 10**7)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        ustar_header("y" * 101, 1)


def test_shard_bytes_equal_what_tarfile_writes(tmp_path):
    """The hand-written tar stream is exactly tarfile's (headers, padding, end blocks, record padding)."""
    rows = synthetic_rows(37)
    writer = SplitWriter(tmp_path, "train", "corpus", max_rows=None, max_bytes=None)
    for row in rows:
        writer.write(row.id, row)
    entry = writer.close()
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            payload = encode_sample(row)
            info = tarfile.TarInfo(f"{row.id}.json")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))
    assert (tmp_path / "train" / "corpus-000000.tar").read_bytes() == expected.getvalue()
    assert entry["shards"][0]["bytes"] == len(expected.getvalue())


def test_refuses_a_non_empty_output_without_overwrite_before_reading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--out .* already exists and is not empty; pass --overwrite"):
        build(tmp_path, raising_after([], 0))  # the reader would raise if it were read
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_no_rows_left_is_an_error_and_writes_nothing(tmp_path):
    rows = [MultiWayRow(id="a", texts={"en": "same", "de": "same"})]
    with pytest.raises(CorpusError, match="no rows left after cleaning"):
        build(tmp_path, rows)
    assert list(tmp_path.iterdir()) == []


def test_strict_build_names_file_and_line_and_writes_nothing(tmp_path):
    rows = synthetic_rows(20) + [MultiWayRow(id="bad", texts={"en": "x", "de": "y\x01"}, source="in.jsonl:21")]
    with pytest.raises(CorpusError, match=r"in.jsonl:21 \(de\): control_chars"):
        build(tmp_path, rows, cleaning=CleaningConfig(strict=True))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- resolve, manifest, verify


def test_resolve_shards_every_spec_form(tmp_path):
    manifest, out = build(tmp_path, synthetic_rows(120), rows_per_shard=25, split="1,0,0")
    train = [str(out / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    from_manifest = resolve_shards(out / "manifest.json", "train")
    assert from_manifest == resolve_shards(out) == resolve_shards(str(out), "train")
    assert [i.url for i in from_manifest] == train and [i.rows for i in from_manifest] == [25, 25, 25, 25, 20]
    assert all(i.sha256 and len(i.sha256) == 64 for i in from_manifest)
    globbed = resolve_shards(str(out / "train" / "*.tar"))
    assert [i.url for i in globbed] == train and all(i.rows is None for i in globbed)
    braced = resolve_shards(str(out / "train" / "corpus-{000000..000004}.tar"))
    assert [i.url for i in braced] == train
    assert resolve_shards(train[:2]) == [ShardInfo(train[0], None, None), ShardInfo(train[1], None, None)]
    assert resolve_shards(train[0]) == [ShardInfo(train[0], None, None)]
    for url in ("pipe:cat x.tar", "https://example.org/x.tar", "s3://bucket/x.tar"):  # never handed to an opener
        with pytest.raises(ValueError, match="only local shard files are read"):
            resolve_shards(url)


def test_resolve_shards_errors_name_the_spec(tmp_path):
    _, out = build(tmp_path, synthetic_rows(60), rows_per_shard=25, split="1,0,0")
    with pytest.raises(FileNotFoundError, match=r"nothing/\*\.tar: matches no shard files"):
        resolve_shards(str(tmp_path / "nothing" / "*.tar"))
    with pytest.raises(FileNotFoundError, match=r"corpus-000003.tar \(from the brace pattern\) does not exist"):
        resolve_shards(str(out / "train" / "corpus-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="split 'validation' has no shards"):
        resolve_shards(out, "validation")
    with pytest.raises(ValueError, match="no split 'dev'"):
        resolve_shards(out, "dev")
    with pytest.raises(FileNotFoundError, match="the shard list is empty"):
        resolve_shards([])
    with pytest.raises(FileNotFoundError, match="folder without manifest.json"):
        resolve_shards(out / "train")
    (out / "train" / "corpus-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"corpus-000001.tar listed in .*manifest.json is missing"):
        resolve_shards(out)


def test_load_manifest_rejects_what_is_not_a_v1_manifest(tmp_path):
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match=rf"{bad}: not valid JSON"):
        load_manifest(bad)
    bad.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ManifestError, match="format is 'something/else', expected 'multiway-align/shards/v1'"):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_manifest(tmp_path / "nowhere")
    manifest, out = build(tmp_path, synthetic_rows(30), split="1,0,0")
    manifest["splits"]["train"]["shards"][0]["path"] = "../escape.tar"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"splits.train.shards\[0\].path must be relative"):
        load_manifest(out)


def test_verify_catches_a_flipped_byte_a_missing_shard_and_a_stray_tar(tmp_path):
    manifest, out = build(tmp_path, synthetic_rows(120), rows_per_shard=25, split="1,0,0")
    assert verify_shards(out) == []
    first = out / "train" / "corpus-000000.tar"
    data = bytearray(first.read_bytes())
    data[700] ^= 0x01  # inside the first sample's JSON
    first.write_bytes(bytes(data))
    (out / "train" / "corpus-000003.tar").unlink()
    (out / "train" / "extra-000000.tar").write_bytes(b"")
    problems = verify_shards(out / "manifest.json")
    assert any(p.startswith("train/corpus-000000.tar: sha256 mismatch") and "rebuild" in p for p in problems)
    assert any(p.startswith("train/corpus-000003.tar: missing") for p in problems)
    assert any(p.startswith("train/extra-000000.tar: not listed") for p in problems)


def test_verify_catches_bad_sample_json_and_row_count(tmp_path):
    manifest, out = build(tmp_path, synthetic_rows(30), split="1,0,0")
    shard = out / "train" / "corpus-000000.tar"
    with tarfile.open(shard, "a") as tar:  # an appended sample changes the checksum (the size may stay: record padding)
        info = tarfile.TarInfo("broken.json")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"{oops"))
    problems = verify_shards(out)
    assert any(p.startswith("train/corpus-000000.tar: sample 'broken' is not a valid row JSON") for p in problems)
    assert any("sha256 mismatch" in p for p in problems)
    manifest["splits"]["train"]["shards"][0]["rows"] = 31
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any("30 readable samples, manifest says 31 rows" in p for p in verify_shards(out))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix": "my.corpus"}, "--prefix must be letters"),
        ({"rows_per_shard": 0}, "--rows_per_shard must be >= 1, got 0"),
        ({"bytes_per_shard": "1kB"}, "--bytes_per_shard must be >= 20480"),
        ({"bytes_per_shard": "lots"}, "--bytes_per_shard must be a size like 256MB"),
        ({"split": "0.9,0.2,0.05"}, "--split fractions must be >= 0 and sum to 1"),
        ({"split": "0.9,0.1"}, "--split needs three values"),
        ({"split": "rest,ten,5"}, "--split must be fractions like"),
        ({"seed": -1}, "--seed must be >= 0"),
        ({"shuffle_buckets": 0}, "--shuffle_buckets must be >= 1"),
    ],
)
def test_build_config_errors_name_the_flag(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShardBuildConfig(out=tmp_path / "x", **kwargs)


def test_parse_size_and_split_spec():
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30 and parse_size("500k") == 500_000
    assert parse_size("4096") == 4096 and parse_size("1.5 kB") == 1500
    assert SplitSpec.parse("0.9,0.05,0.05").values == (0.9, 0.05, 0.05)
    assert str(SplitSpec.parse("rest,10,5")) == "rest,10,5"


# --------------------------------------------------------------------------- CLI


def test_cli_build_inspect_verify_on_installed_django_and_wagtail_catalogs(tmp_path, capsys):
    out = tmp_path / "gettext"
    argv = ["shards", "build", "--format", "gettext", "--from_package", "django", "wagtail", "--out", str(out)]
    rc = main(argv + ["--languages", SIX, "--split", "0.9,0.05,0.05", "--rows_per_shard", "500"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "rows in" in printed and "same_as_pivot" in printed and "train" in printed
    manifest = load_manifest(out)
    assert set(manifest["languages"]) == set(SIX.split(","))
    assert manifest["languages"]["zh-Hans"] >= 1700 and manifest["languages"]["en"] >= 2000
    assert manifest["source"]["format"] == "gettext" and manifest["source"]["packages"] == ["django", "wagtail"]
    assert manifest["source"]["command"].startswith("align shards build --format gettext --from_package django wagtail")
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]][:2] == [500, 500]
    full = [r for rs in all_rows(out).values() for r in rs if len(r.texts) == 7]
    assert len(full) >= 1700

    assert main(["shards", "inspect", str(out), "--cleaning"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^train\s+\d+\s+\d+", table, re.M) and re.search(r"^zh-Hans(\s+\d+){4}$", table, re.M)
    assert "gettext_plural" in table

    assert main(["shards", "verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    shard = out / manifest["splits"]["test"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-10240])  # truncate
    assert main(["shards", "verify", str(out / "manifest.json")]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {manifest['splits']['test']['shards'][0]['path']}: size" in err

    assert main(argv) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_build_jsonl_strict_and_errors(tmp_path, capsys):
    good = tmp_path / "a.jsonl"
    good.write_text("".join(json.dumps({"id": f"r{i}", "en": f"s {i}", "de": f"S {i}"}) + "\n" for i in range(20)))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"en": "ok", "de": "gut"}\n{"en": "bad", "de": "\xff"}\n')
    out = tmp_path / "out"
    assert main(["shards", "build", "--format", "jsonl", str(good), str(bad), "--out", str(out), "--strict"]) == 1
    assert f"{bad}:2: invalid_utf8" in capsys.readouterr().err and not out.exists()
    assert (
        main(["shards", "build", "--format", "jsonl", str(good), str(bad), "--out", str(out), "--split", "1,0,0"]) == 0
    )
    assert load_manifest(out)["splits"]["train"]["rows"] == 21
    assert (
        main(["shards", "build", "--format", "jsonl", str(good), "--out", str(tmp_path / "o2"), "--max_chars", "0"])
        == 2  # a setting's own check: exit 2, as every command's flag checks
    )
    assert "--max_chars must be >= 1, got 0" in capsys.readouterr().err
    assert main(["shards", "inspect", str(tmp_path / "nowhere")]) == 1


def _tsv(tmp_path: Path) -> list[str]:
    lines = "".join(f"r{i}\tsentence {i}\tSatz {i}\tphrase {i}\n" for i in range(30))
    return [str(_write(tmp_path / "c.tsv", "id\ten\tde\tfr\n" + lines))]


def _aligned(tmp_path: Path) -> list[str]:
    texts = {"en": "sentence", "de": "Satz", "fr": "phrase"}
    return [str(_write(tmp_path / f"c.{lang}", "".join(f"{w} {i}\n" for i in range(30)))) for lang, w in texts.items()]


def _pairs(tmp_path: Path) -> list[str]:
    de = _write(tmp_path / "en-de.tsv", "en\tde\n" + "".join(f"sentence {i}\tSatz {i}\n" for i in range(30)))
    fr = _write(tmp_path / "fr.txt", "".join(f"phrase {i}\n" for i in range(30)))
    en = _write(tmp_path / "en.txt", "".join(f"sentence {i}\n" for i in range(30)))
    return [str(de), f"en={en},fr={fr}"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("fmt", "make"), [("tsv", _tsv), ("aligned", _aligned), ("pairs", _pairs)])
def test_cli_build_each_file_format(tmp_path, capsys, fmt, make):
    out = tmp_path / "out"
    assert main(["shards", "build", "--format", fmt, *make(tmp_path), "--out", str(out), "--split", "rest,3,3"]) == 0
    rows = [r for rs in all_rows(out).values() for r in rs]
    assert len(rows) == 30 and all(set(r.texts) == {"en", "de", "fr"} for r in rows)
    assert {r.texts["de"] for r in rows} == {f"Satz {i}" for i in range(30)}
    assert all(r.texts["de"].split()[1] == r.texts["en"].split()[1] == r.texts["fr"].split()[1] for r in rows)
    assert verify_shards(out) == []
    capsys.readouterr()


def test_cli_help_documents_formats_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["shards", "build", "--help"])
    text = capsys.readouterr().out
    for needle in ("--from_package", "--rows_per_shard", "--bytes_per_shard", "--split", "examples:", "en,fr=tatoeba"):
        assert needle in text
    assert main(["shards"]) == 2


def test_every_build_setting_is_documented_where_the_cli_reads_it():
    import dataclasses

    from alignment.commands.common import plain
    from alignment.commands.shards import build_parser
    from alignment.data.readers import CorpusSource

    docs = {a.dest: plain(a.help or "") for a in build_parser()._actions}  # as --help shows them
    docs |= {"packages": docs["from_package"], "deduplicate": docs["keep_duplicates"], "cleaning": "the flags above"}
    for cls in (CorpusSource, CleaningConfig, ShardBuildConfig):
        assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == [], cls.__name__
        assert not any("``" in docs[f.name] or ":func:" in docs[f.name] for f in dataclasses.fields(cls))
