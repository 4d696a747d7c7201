"""``slurm/shards.sbatch`` on a real SLURM: an array job builds the parts, a dependent job merges them.

Submitted the way a user does (``bash slurm/shards.sbatch ...`` on the login
node submits both jobs). The result must be the manifest of the single-process
``align shards build`` with the same flags (checksums included; only
``created`` and the ``--out`` named in the recorded command differ), and it
must verify.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from alignment.synthetic import synthetic_rows
from tests import _training as T
from tests.cluster._slurm import job_env, job_logs

pytestmark = pytest.mark.cluster

TASKS = 3
FLAGS = ["--rows_per_shard", "20", "--split", "0.8,0.1,0.1"]


def _manifest(path):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.pop("created")
    manifest["source"].pop("command")
    return manifest


def test_shards_array_job_equals_the_single_process_build(slurm, tmp_path):
    rows = synthetic_rows(240, ("en", "de", "fr", "es"), seed=5, missing_prob=0.2)
    inputs = [tmp_path / f"raw-{i}.jsonl" for i in range(5)]
    for i, path in enumerate(inputs):
        mine = rows[i::5]
        again = rows[(i - 1) % 5::5][::10]  # sentences of the previous file, under new ids: duplicates across tasks
        path.write_text("".join(json.dumps({"id": r.id, "texts": r.texts}) + "\n" for r in mine)
                        + "".join(json.dumps({"id": f"{r.id}-again", "texts": r.texts}) + "\n" for r in again))

    env = job_env(slurm, SHARDS_TASKS=str(TASKS), SHARDS_LOG_DIR=str(tmp_path / "logs"), SBATCH_TIMELIMIT="10")
    single = subprocess.run(["align", "shards", "build", "--format", "jsonl", *map(str, inputs),
                             "--out", "single", *FLAGS], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr

    submitted = subprocess.run(["bash", str(T.REPO / "slurm" / "shards.sbatch"), "--format", "jsonl",
                                *map(str, inputs), "--out", "array", *FLAGS],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    array_id, merge_id = map(int, re.search(r"array job (\d+) .* merge job (\d+)", submitted.stdout).groups())

    info = slurm.wait_job(merge_id, timeout=240)
    logs = job_logs(tmp_path / "logs", slurm)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    tasks = [slurm.job(f"{array_id}_{i}") for i in range(TASKS)]
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * TASKS, tasks

    for i in range(TASKS):  # every task did its slice
        assert f"wrote part {i + 1} of {TASKS}" in (tmp_path / "logs" / f"align-shards-{array_id}_{i}.out").read_text()
    merge_log = (tmp_path / "logs" / f"align-shards-{merge_id}.out").read_text()
    assert "OK " in merge_log and "checksums and samples verified" in merge_log
    assert _manifest(tmp_path / "array") == _manifest(tmp_path / "single")
    assert _manifest(tmp_path / "array")["cleaning"]["rows"]["dropped"]["duplicate_pivot"] > 0
    assert not (tmp_path / "array.parts").exists()
