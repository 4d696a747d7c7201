"""``align fit|validate|test``: the Lightning CLI over AlignmentModule and AlignmentDataModule.

Every flag is a typed config field (``align fit --help``); ``--config`` takes the
YAML recipes under ``configs/``; ``--print_config`` shows the resolved config.
"""

from __future__ import annotations

import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from alignment.callbacks import AtomicModelCheckpoint, ExportOnFitEnd, RunMetadata, ThroughputLogger
from alignment.data.datamodule import AlignmentDataModule
from alignment.module import AlignmentModule
from alignment.preemption import EXIT_REQUEUE, Preempted, PreemptionCheckpoint, install_handler


class AlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(RunMetadata, "run_metadata")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")


class _ParseOnlyCLI(AlignCLI):
    """Parses and type-checks a configuration without building anything (no hub download, no Trainer)."""

    def instantiate_classes(self) -> None:
        return None


def _cli_kwargs() -> dict[str, Any]:
    return dict(
        subclass_mode_model=False,
        subclass_mode_data=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "align"},
        auto_configure_optimizers=False,
    )


def _args(argv: list[str]) -> list[str] | None:
    import sys

    # LightningCLI warns when handed args that merely repeat sys.argv.
    return None if list(argv) == sys.argv[1:] else list(argv)


def parse_config(argv: list[str]):
    """The resolved ``align fit`` configuration of ``argv`` (``--config`` files then flags), parse only.

    Unknown keys, wrong types and bad ``class_path`` values are rejected exactly as
    ``align fit`` rejects them (usage and the offending key on stderr, ``SystemExit(2)``);
    nothing is instantiated, so hub models are not loaded and the dataclasses'
    value checks (``__post_init__``) do not run. Returns a ``jsonargparse.Namespace``
    with ``trainer``, ``model``, ``data``, ``checkpoint``, ... groups.
    """
    return _ParseOnlyCLI(AlignmentModule, AlignmentDataModule, run=False, args=_args(argv), **_cli_kwargs()).config


_PACKAGE = str(Path(__file__).resolve().parent)


def _raised_here(exc: BaseException) -> bool:
    """The exception was raised by a check in this package (its innermost frame is ours), not by a library."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE)


def user_error(exc: BaseException) -> str | None:
    """The message of a configuration or input check behind ``exc``, or None for anything else (a bug keeps its
    traceback). jsonargparse wraps the checks of the config dataclasses in its own errors: the outermost one
    raised by this package is the message the user needs."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for item in chain:  # the outermost of ours: a re-raise adds the flag to the message
        if isinstance(item, (ValueError, OSError)) and _raised_here(item):
            return str(item)
    if isinstance(chain[0], ArgumentError) or type(chain[0]).__module__.startswith("jsonargparse"):
        return str(chain[0]).strip()
    return None


def run_lightning_cli(argv: list[str]) -> int:
    """Run ``align fit|validate|test``; exit code 75 (``EXIT_REQUEUE``) after a preemption stop.

    A failed configuration or input check (a bad value, a missing shard folder or tokenizer, a model that
    does not fit the data) is one line on stderr, exit 2; ``ALIGN_TRACEBACK=1`` shows the traceback instead.
    """
    install_handler()  # before model and data set-up: an unhandled USR1 would kill the process
    kwargs = _cli_kwargs()
    kwargs["parser_kwargs"] = {**kwargs["parser_kwargs"], "exit_on_error": False}
    try:
        AlignCLI(AlignmentModule, AlignmentDataModule, args=_args(argv), **kwargs)
    except Preempted as stop:
        print(f"align: {stop}", flush=True)
        return EXIT_REQUEUE
    except (ValueError, OSError, ArgumentError, TypeError) as exc:
        message = user_error(exc)
        if message is None or os.environ.get("ALIGN_TRACEBACK"):
            raise
        command = argv[0] if argv else "fit"
        print(f"align {command}: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0
