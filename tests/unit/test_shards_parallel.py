"""Parallel shard builds: ``align shards build --part I/N`` tasks + ``align shards merge`` == one build.

The equivalence is byte for byte: the same shards (sha256 included) and the
same manifest but for ``created``, also with duplicates and bad lines spread
over the files of different tasks, and with more tasks than files. The merge
refuses incomplete or mixed parts, naming what to rerun.
"""

from __future__ import annotations

import json

import pytest

from alignment.cli import main
from alignment.data.build import PartSpec, parts_dir
from alignment.synthetic import synthetic_rows

ARGS = ["--rows_per_shard", "15", "--shuffle_buckets", "4", "--split", "0.8,0.1,0.1"]


@pytest.fixture
def inputs(tmp_path):
    """Five JSONL files; some rows repeat (new id, same texts) in a later file, some lines are broken."""
    rows = synthetic_rows(160, ("en", "de", "fr"), seed=3, missing_prob=0.2)
    paths = [tmp_path / f"part{i}.jsonl" for i in range(5)]
    handles = [open(p, "w") for p in paths]
    for k, row in enumerate(rows):
        handles[k % 5].write(json.dumps({"id": row.id, "texts": row.texts}) + "\n")
        if k % 23 == 0:
            handles[(k + 2) % 5].write(json.dumps({"id": f"{row.id}-again", "texts": row.texts}) + "\n")
            handles[(k + 3) % 5].write("{broken json\n")
    for h in handles:
        h.close()
    return [str(p) for p in paths]


def _manifest(path):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("created")
    manifest["source"].pop("command")  # names --out, which differs by construction
    return manifest


@pytest.mark.parametrize("tasks", [1, 3, 7])  # 7 tasks for 5 files: two tasks read nothing
def test_parts_then_merge_equal_one_build(tmp_path, inputs, tasks, capsys):
    assert main(["shards", "build", "--format", "jsonl", *inputs, "--out", str(tmp_path / "single"), *ARGS]) == 0
    out = tmp_path / "parallel"
    for i in reversed(range(tasks)):  # task order does not matter
        assert main(["shards", "build", "--format", "jsonl", *inputs, "--out", str(out), *ARGS,
                     "--part", f"{i}/{tasks}"]) == 0
    assert not out.exists()
    assert main(["shards", "merge", str(out)]) == 0
    single, parallel = _manifest(tmp_path / "single"), _manifest(out)
    assert parallel == single
    dropped = single["cleaning"]["rows"]["dropped"]
    assert dropped["duplicate_pivot"] > 0 and dropped["malformed"] > 0  # counted across tasks, examples too
    for split in single["splits"].values():
        for shard in split["shards"]:
            assert (out / shard["path"]).read_bytes() == (tmp_path / "single" / shard["path"]).read_bytes()
    assert not parts_dir(out).exists(), "the merge leaves the parts behind"
    assert main(["shards", "verify", str(out)]) == 0


def test_merge_refuses_missing_and_mixed_parts(tmp_path, inputs, capsys):
    out = tmp_path / "mw"
    build = ["shards", "build", "--format", "jsonl", *inputs, "--out", str(out), *ARGS]
    assert main(build + ["--part", "0/3"]) == 0
    assert main(build + ["--part", "2/3"]) == 0
    capsys.readouterr()
    assert main(["shards", "merge", str(out)]) == 1
    assert "1 of 3 parts missing (tasks 1); rerun those tasks, then merge" in capsys.readouterr().err
    assert main(build[:-len(ARGS)] + ["--rows_per_shard", "99", "--shuffle_buckets", "4", "--part", "1/3"]) == 0
    capsys.readouterr()
    assert main(["shards", "merge", str(out)]) == 1
    assert "the tasks ran different builds" in capsys.readouterr().err
    assert main(build + ["--part", "1/2"]) == 0
    capsys.readouterr()
    assert main(["shards", "merge", str(out)]) == 1
    assert "parts of different builds (of [2, 3] tasks)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["shards", "merge", str(tmp_path / "none")]) == 1
    assert "no parts of a parallel build" in capsys.readouterr().err


def test_part_flag_errors(tmp_path, inputs, capsys):
    base = ["shards", "build", "--out", str(tmp_path / "x")]
    assert main(base + ["--format", "jsonl", *inputs, "--part", "3/3"]) == 1
    assert "--part must be I/N with 0 <= I < N" in capsys.readouterr().err
    assert main(base + ["--format", "aligned", "a.en", "a.de", "--part", "0/2"]) == 1
    assert "--format aligned joins rows across files" in capsys.readouterr().err


def test_part_slices_are_contiguous_and_cover_the_inputs():
    files = [f"f{i}" for i in range(5)]
    slices = [PartSpec.parse(f"{i}/3").inputs(files) for i in range(3)]
    assert sum(slices, []) == files and all(slices)
    assert [PartSpec(i, 7).inputs(files) for i in range(7)].count([]) == 2
