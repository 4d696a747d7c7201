"""The configs and SLURM templates shipped with the package, addressable by name.

In a wheel they live inside the package (``alignment/_configs``, ``alignment/_slurm``,
copied there by ``setup.py``'s build step); in a source checkout they are the
repository's ``configs/`` and ``slurm/``. ``align fit --config recipe:NAME`` and
``align submit --config recipe:NAME`` name a recipe without knowing where it is
installed::

    recipe:xlm-roberta-base-multiway   configs/recipes/xlm-roberta-base-multiway.yaml
    recipe:debug                       configs/debug.yaml
    recipe:deepspeed/zero2             configs/deepspeed/zero2.yaml
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "recipe:"
_PACKAGED = {"configs": "_configs", "slurm": "_slurm"}


def resource_dir(kind: str) -> Path:
    """The folder of shipped ``configs`` or ``slurm`` files: the installed copy, else the checkout's."""
    here = Path(__file__).resolve().parent
    installed = here / _PACKAGED[kind]
    return installed if installed.is_dir() else here.parent / kind


def config_names() -> list[str]:
    """Every name ``recipe:NAME`` accepts (recipes first, then top-level and DeepSpeed configs)."""
    root = resource_dir("configs")
    names = [p.stem for p in sorted((root / "recipes").glob("*.yaml")) if not p.name.startswith("_")]
    names += [p.stem for p in sorted(root.glob("*.yaml"))]
    names += [f"deepspeed/{p.stem}" for p in sorted((root / "deepspeed").glob("*.yaml"))]
    return names


def resolve_config(value: str) -> str:
    """A ``--config`` value with ``recipe:NAME`` replaced by the shipped file's path; other values unchanged.

    Raises:
        FileNotFoundError: no shipped config has that name (the message lists the names).
    """
    if not value.startswith(PREFIX):
        return value
    name = value[len(PREFIX):].strip().removesuffix(".yaml")
    root = resource_dir("configs")
    for candidate in (root / "recipes" / f"{name}.yaml", root / f"{name}.yaml"):
        if name and not name.startswith("_") and candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"--config {value}: no shipped config named {name!r}; known: {', '.join(config_names())}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config recipe:NAME`` (or ``--config=recipe:NAME``) resolved to a path."""
    out, expect = [], False
    for arg in argv:
        if expect:
            out.append(resolve_config(arg))
            expect = False
        elif arg == "--config":
            out.append(arg)
            expect = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg[len("--config="):]))
        else:
            out.append(arg)
    return out


def sbatch_template(name: str = "train.sbatch") -> Path:
    """A shipped SLURM template (``train.sbatch``, ``eval.sbatch``, ``shards.sbatch``)."""
    return resource_dir("slurm") / name
