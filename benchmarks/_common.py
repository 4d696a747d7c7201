"""What every benchmark report shares: the machine, the result's name, Markdown tables, the ``.md``/``.json`` pair.

A benchmark writes ``benchmarks/results/<name>-<date>-<what>-<machine>.{md,json}``
(:func:`result_stem`): the Markdown for a reader, the JSON with every number,
setting, version and the exact command for a rerun or a comparison.
Benchmarks import it as ``from _common import ...`` (``benchmarks/`` is on
``sys.path`` when a benchmark runs as a script; each one puts it there when
loaded by path, as the unit tests do).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alignment import fsutil
from alignment.hostinfo import cpu_model, package_version

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(*packages: str, device: Any = None) -> dict:
    """CPU, cores, memory, load, platform, Python, torch, the GPU (of ``device``, else CUDA device 0
    when there is one) and the versions of ``packages`` (None when not installed)."""
    import torch

    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device if device is not None else 0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
    }  # fmt: skip
    info.update({name: package_version(name) for name in packages})
    return info


def machine_lines(machine: dict, packages: Sequence[str] = ()) -> list[str]:
    """The report's machine and versions lines (Markdown bullets)."""
    m = machine  # .get: a report rendered again from an older JSON may lack a field
    where = f"{m['gpu']} (CUDA {m.get('cuda')}), host {m['cpu']}" if m.get("gpu") else m["cpu"]
    versions = ", ".join([f"python {m['python']}", f"torch {m['torch']}",
                          *(f"{p} {m.get(p) or 'not installed'}" for p in packages)])
    return [
        f"- machine: {where}, {m['cores']} cores ({m.get('usable_cores', '?')} usable, torch threads "
        f"{m.get('torch_threads', '?')}), {m.get('memory_gib', '?')} GiB RAM, {m.get('platform', m.get('os'))}; "
        f"1-minute load average at start {m.get('load_avg_1m_at_start')} (other jobs on the machine slow every number)",
        f"- versions: {versions}",
    ]


def now() -> str:
    """The report's date: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """``python benchmarks/<script> ARGS`` as it was run (``argv`` when called from a test)."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")[:40]


def machine_tag(machine: dict) -> str:
    """The GPU's name, or the CPU's and its core count: what the numbers depend on most."""
    return slug(machine["gpu"]) if machine.get("gpu") else f"{slug(machine['cpu'])}-{machine['cores']}cores"


def result_stem(name: str, date: str, *tags: str) -> str:
    """``<name>-<YYYY-MM-DD>-<tag>-...``, each tag slugged (empty tags dropped)."""
    return "-".join([name, date[:10], *(slug(t) for t in tags if t)])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: first left, others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """Publish ``<out>/<stem>.md`` and ``.json`` (atomically: a killed run leaves no torn report)."""
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    fsutil.publish_file(js, json.dumps(data, indent=2, default=str) + "\n")
    fsutil.publish_file(md, markdown if markdown.endswith("\n") else markdown + "\n")
    return md, js
