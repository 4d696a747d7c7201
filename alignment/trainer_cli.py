"""``align fit|validate|test``: the Lightning CLI over AlignmentModule and AlignmentDataModule.

Every flag is a typed config field (``align fit --help``); ``--config`` takes the
YAML recipes under ``configs/``; ``--print_config`` shows the resolved config.
"""

from __future__ import annotations

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


def run_lightning_cli(argv: list[str]) -> int:
    """Run ``align fit|validate|test``; exit code 75 (``EXIT_REQUEUE``) after a preemption stop."""
    install_handler()  # before model and data set-up: an unhandled USR1 would kill the process
    try:
        AlignCLI(AlignmentModule, AlignmentDataModule, args=_args(argv), **_cli_kwargs())
    except Preempted as stop:
        print(f"align: {stop}", flush=True)
        return EXIT_REQUEUE
    return 0
