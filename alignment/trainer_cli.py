"""``align fit|validate|test``: the Lightning CLI over AlignmentModule and AlignmentDataModule.

Every flag is a typed config field (``align fit --help``); ``--config`` takes the
YAML recipes under ``configs/``; ``--print_config`` shows the resolved config.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from alignment.callbacks import AtomicModelCheckpoint, ExportOnFitEnd, RunMetadata, ThroughputLogger
from alignment.data.datamodule import AlignmentDataModule
from alignment.module import AlignmentModule


class AlignCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(RunMetadata, "run_metadata")


def run_lightning_cli(argv: list[str]) -> int:
    AlignCLI(
        AlignmentModule,
        AlignmentDataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "align"},
        auto_configure_optimizers=False,
    )
    return 0
