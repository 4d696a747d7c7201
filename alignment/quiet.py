"""Known-irrelevant warnings and log lines, filtered in one place (``align`` installs this at start-up).

Each entry is a message every run printed that says nothing about *this* run:

* Lightning's pytree deprecation (``isinstance(treespec, LeafSpec)``), raised inside Lightning itself;
* Lightning's "IterableDataset has __len__" warning: our streams define ``__len__`` on purpose and
  split shards per worker themselves (alignment/data/stream.py);
* LightningCLI's "args parameter" warning: ``align`` hands the CLI its (resolved) arguments on purpose;
* Lightning's advert for litlogger at every Trainer start;
* DeepSpeed's "Setting accelerator to CPU" line on machines without a GPU.

wandb's deprecation warning about ``anonymous`` is avoided at the source (``alignment.loggers``).
"""

from __future__ import annotations

import logging
import warnings

WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"Your `IterableDataset` has `__len__` defined",
    r"LightningCLI's args parameter is intended to run from within Python",
)
LOG_LINES = {
    "lightning.pytorch.utilities.rank_zero": ("seamless cloud logging",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


_installed = False


def install() -> None:
    """Filter the known-irrelevant warnings and log lines (idempotent)."""
    global _installed
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if _installed:
        return
    _installed = True
    for name, fragments in LOG_LINES.items():
        logging.getLogger(name).addFilter(_DropMessages(fragments))
