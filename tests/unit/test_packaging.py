"""``pip install`` gives a working ``align``: the wheel carries the recipes, the sbatch templates and the
licence, and an installed ``align`` runs ``fit --print_config`` and ``submit --dry_run`` with a recipe by
name from a directory that is not the checkout.

The wheel is built from a copy of the package sources (nothing is written into the checkout) with the
installed setuptools (no build isolation: no download); the fresh virtual environment gets the wheel alone
(``--no-deps``) and sees the test interpreter's dependencies through a ``.pth`` line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests import _training as T

SOURCES = ("alignment", "configs", "slurm", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")


def _run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = T.REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (whl,) = out.glob("multiway_align-*.whl")
    return whl


def test_wheel_ships_recipes_templates_and_licence(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {p.relative_to(T.REPO / "configs").as_posix() for p in (T.REPO / "configs").rglob("*.yaml")}
    assert recipes and {f"alignment/_configs/{r}" for r in recipes} <= names
    assert {f"alignment/_slurm/{p.name}" for p in (T.REPO / "slurm").glob("*.sbatch")} <= names
    assert "alignment/resources.py" in names and "alignment/commands/submit.py" in names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "Apache License" in zipfile.ZipFile(wheel).read(license_file).decode()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text


def test_installed_align_works_from_any_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, lightning, ... of this interpreter
    # --ignore-installed: the interpreter's own (editable) multiway-align is visible through deps.pth
    result = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                   "--ignore-installed", "--no-index", str(wheel)])
    assert result.returncode == 0, result.stderr[-2000:]
    corpus = T.make_corpus(tmp_path / "data", rows=120, rows_per_shard=20)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in T.align_env().items() if k != "PYTHONPATH"}
    align = str(venv / "bin" / "align")

    where = _run([str(venv / "bin" / "python"), "-c", "import alignment; print(alignment.__file__)"], cwd=work, env=env)
    # the installed copy, not the checkout
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr

    shown = _run([align, "fit", "--config", "recipe:xlm-roberta-base-multiway", "--print_config"], cwd=work, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "default_root_dir: runs/xlm-roberta-base-multiway" in shown.stdout
    assert "objective: multi_positive" in shown.stdout and "process_group_backend: nccl" in shown.stdout

    script = _run([align, "submit", "--fit_config", "recipe:xlm-roberta-base-enx", "--nodes", "1", "--gpus_per_node", "2",
                   "--dry_run", "--", "--trainer.devices", "2", "--data.num_workers", "2",
                   "--data.train_shards", str(corpus.shards)],
                  cwd=work, env=env)
    assert script.returncode == 0, script.stderr[-2000:]
    assert script.stdout.startswith("#!/usr/bin/env bash") and "#SBATCH --gpus-per-node=2" in script.stdout
    assert f"export ALIGN_CONFIG={site}/alignment/_configs/recipes/xlm-roberta-base-enx.yaml" in script.stdout
    assert f"#SBATCH --output={work}/runs/xlm-roberta-base-enx/slurm/%x-%j.out" in script.stdout
    assert not (work / "runs").exists()
