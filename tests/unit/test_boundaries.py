"""Import boundaries of ``alignment/`` (the layering in docs/architecture.md), read from the source with ``ast``.

Module-level and function-level imports count alike (a lazy import is still a
dependency). What must hold:

* ``model.py`` and ``losses.py`` import neither Lightning nor ``torch.distributed``
  (architecture apart from training and parallelism);
* nothing under ``data/`` imports the model side (``model``, ``module``, ``gradcache``, ``losses``);
* only ``distributed.py`` imports ``torch.distributed`` or calls its collectives;
* only ``alignment/commands/`` (and the demo package itself) imports ``alignment.demo``
  (scripts, benchmarks and tests may);
* ``batch.py`` and ``languages.py`` are leaves: they import nothing from ``alignment``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "alignment"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv",
    "isend", "irecv", "init_process_group", "destroy_process_group", "new_group",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` imports, anywhere in it; ``from a import b`` gives ``a`` and ``a.b``."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def collective_calls(source: str) -> list[str]:
    """Calls of a ``torch.distributed`` collective, as ``torch.distributed.X(...)`` or through an alias of it."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.name == "torch.distributed" and a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases.update(a.asname or a.name for a in node.names if a.name == "distributed")
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                calls.append(ast.unparse(node.func))
    return calls


def _sources() -> dict[str, tuple[Path, set[str]]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        out[name] = (path, imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"))
    return out


SOURCES = _sources()


def _hits(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


def _violations(modules, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {m: _hits(SOURCES[m][1], forbidden) for m in modules if m in SOURCES}
    return {m: hits for m, hits in found.items() if hits}


def test_model_and_losses_know_no_trainer_and_no_process_group():
    assert _violations(["alignment.model", "alignment.losses"],
                       ("lightning", "pytorch_lightning", "torch.distributed")) == {}


def test_data_never_imports_the_model_side():
    data = [m for m in SOURCES if m == "alignment.data" or m.startswith("alignment.data.")]
    assert data, "no alignment/data modules found"
    side = ("alignment.model", "alignment.module", "alignment.gradcache", "alignment.losses")
    assert _violations(data, side) == {}


def test_only_distributed_py_touches_torch_distributed():
    others = [m for m in SOURCES if m != "alignment.distributed"]
    assert _violations(others, ("torch.distributed",)) == {}
    calls = {m: collective_calls(SOURCES[m][0].read_text(encoding="utf-8")) for m in others}
    assert {m: c for m, c in calls.items() if c} == {}


def test_only_commands_import_the_demo():
    allowed = ("alignment.commands", "alignment.demo")
    others = [m for m in SOURCES if not any(m == a or m.startswith(a + ".") for a in allowed)]
    assert _violations(others, ("alignment.demo",)) == {}


@pytest.mark.parametrize("leaf", ["alignment.batch", "alignment.languages"])
def test_leaf_modules_import_nothing_from_alignment(leaf):
    if leaf not in SOURCES:
        pytest.skip(f"{leaf} does not exist in this tree")
    assert _violations([leaf], ("alignment",)) == {}


def test_the_checks_see_lazy_relative_and_aliased_imports():
    """Negative controls: each way of writing a forbidden import or collective is caught."""
    src = (
        "from __future__ import annotations\n"
        "def f():\n"
        "    from ..model import DualEncoder\n"
        "    from .. import losses\n"
        "    import torch.distributed as dist\n"
        "    from torch import distributed as d2\n"
        "    dist.all_reduce(x)\n"
        "    d2.barrier()\n"
        "    torch.distributed.broadcast(x, 0)\n"
        "    trainer.strategy.barrier()\n"
    )
    names = imports(src, "alignment.data.stream")
    assert _hits(names, ("alignment.model",)) == ["alignment.model", "alignment.model.DualEncoder"]
    assert _hits(names, ("alignment.losses",)) == ["alignment.losses"]
    assert _hits(names, ("torch.distributed",)) == ["torch.distributed"]
    assert collective_calls(src) == ["dist.all_reduce", "d2.barrier", "torch.distributed.broadcast"]
    assert _hits(imports("from . import demo\n", "alignment", is_package=True), ("alignment.demo",)) == ["alignment.demo"]
