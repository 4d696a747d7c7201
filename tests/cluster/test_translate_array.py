"""``align submit --job translate`` on a real SLURM: an array job translates the parts, a dependent job merges them.

Submitted the way a user does (``align submit --job translate ... -- <align translate run flags>``
on the login node renders ``slurm/translate.sbatch`` twice and submits both jobs), on CPU
(``--gpus_per_node 0``) with a tiny random-weight NLLB-architecture model built here. The merged
corpus must be the bytes of one ``align translate run`` with the same flags, each part made by the
task the round-robin assigns, and the merge must leave the manifest. ``bash slurm/translate.sbatch``
hands its arguments to the same command (``tests/unit/test_submit.py`` checks that without SLURM).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests import _translate as X
from tests.cluster._slurm import job_env, job_logs

pytestmark = pytest.mark.cluster

TASKS = 3


def test_translate_array_job_equals_the_single_process_run(slurm, tmp_path):
    model = X.build_nllb(tmp_path / "models")
    text = tmp_path / "news.en.txt"
    text.write_text("\n".join(X.sentences(20)) + "\n", encoding="utf-8")
    flags = [str(text), "--model", str(model), "--targets", "de,fr", "--part_rows", "3", "--generate.beams", "2",
             "--generate.max_length", "12"]
    env = job_env(slurm)
    single = subprocess.run(["align", "translate", "run", *flags, "--out", "single"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr

    submit = ["align", "submit", "--job", "translate", "--array_tasks", str(TASKS), "--gpus_per_node", "0",
              "--cpus_per_task", "1", "--time", "10", "--log_dir", "logs"]
    submitted = subprocess.run([*submit, "--", *flags, "--out", "array"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    array_id, merge_id = map(int, re.search(r"array job (\d+) .* merge job (\d+)", submitted.stdout).groups())
    script = re.search(r": (\S+\.sbatch)$", submitted.stdout.splitlines()[0]).group(1)  # the two scripts submitted
    assert sorted((tmp_path / "logs").glob("*.sbatch")) == sorted([Path(script), Path(script[:-7] + "-merge.sbatch")])

    info = slurm.wait_job(merge_id, timeout=300)
    logs = job_logs(tmp_path / "logs", slurm)
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs}"
    tasks = [slurm.job(f"{array_id}_{i}") for i in range(TASKS)]
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * TASKS
    assert info["StartTime"] >= max(t["EndTime"] for t in tasks)  # afterok: the merge waited for every task
    assert (tmp_path / "array" / "corpus.jsonl").read_bytes() == (tmp_path / "single" / "corpus.jsonl").read_bytes()
    manifest = json.loads((tmp_path / "array" / "manifest.json").read_text())
    assert [(p["part"], p["rank"]) for p in manifest["parts"]] == [(i, i % TASKS) for i in range(7)]
    merge_log = (tmp_path / "logs" / f"align-translate-{merge_id}.out").read_text()
    assert "wrote array/corpus.jsonl and array/manifest.json" in merge_log
