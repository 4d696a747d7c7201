"""What the benchmarks record about the machine they ran on (standard library only: cheap to import)."""

from __future__ import annotations

import importlib
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(module: str) -> str | None:
    """``module.__version__`` (``"unknown"`` when it has none), or None when it is not installed."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None
