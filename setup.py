"""Ship the repository's ``configs/`` and ``slurm/`` inside the package (``alignment/_configs``,
``alignment/_slurm``), so an installed ``align`` finds its recipes and sbatch templates by name
(``--config recipe:NAME``; see ``alignment/resources.py``). Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = {"configs": "_configs", "slurm": "_slurm"}
PATTERNS = ("*.yaml", "*.sbatch")


class BuildPyWithResources(build_py):
    def run(self):
        super().run()
        root = Path(__file__).resolve().parent
        for source, target in SHIPPED.items():
            dest = Path(self.build_lib) / "alignment" / target
            shutil.rmtree(dest, ignore_errors=True)
            for pattern in PATTERNS:
                for path in sorted((root / source).rglob(pattern)):
                    out = dest / path.relative_to(root / source)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out)


setup(cmdclass={"build_py": BuildPyWithResources})
