"""``align fit|validate|test``: the Lightning CLI over AlignmentModule and AlignmentDataModule.

The data options are :class:`~alignment.data.datamodule.DataConfig`'s fields directly under ``data``
(``--data.batch_size``); the datamodule is built from that config after parsing.

Every flag is a typed config field (``align fit --help``); ``--config`` takes the
YAML recipes under ``configs/``; ``--print_config`` shows the resolved config.
"""

from __future__ import annotations

import argparse
import os
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from alignment import strategies
from alignment.callbacks import AtomicModelCheckpoint, ExportOnFitEnd, RunMetadata, ThroughputLogger
from alignment.commands.common import parse_error_message
from alignment.data.datamodule import AlignmentDataModule, DataConfig
from alignment.module import AlignmentModule
from alignment.preemption import EXIT_REQUEUE, Preempted, PreemptionCheckpoint, install_handler
from alignment.resources import resolve_config_args
from alignment.runs import (
    RunMismatchError,
    check_resume_file,
    default_run_dir,
    derive_run_paths,
    describe_run,
    load_warm_start,
    resolve_ckpt_path,
)
from alignment.train_logging import LearningRateLogger, ProgressLine

# `align fit --help` shows each config field's docstring (the string under it in the dataclass).
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class RunConfig(SaveConfigCallback):
    """Saves the full resolved config as ``<run>/config.yaml`` (``config-<stage>.yaml`` for validate/test)
    and sends it to every logger (wandb's run config, the CSV logger's hparams.yaml) under ``config``."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            stage = str(getattr(stage, "value", stage))  # TrainerFn or str
            name = self.config_filename if stage == "fit" else f"config-{stage}.yaml"
            self.parser.save(self.config, str(root / name), skip_none=False, overwrite=True, multifile=False)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
        resolved.pop("config", None)  # the --config file paths: the resolved values are all here
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": resolved})


class _DataHelp(argparse.Action):
    """``align fit --data.help [DataConfig]``: the data fields and their documentation, as Lightning's class help."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from jsonargparse import ArgumentParser

        from alignment.commands.common import HelpFormatter

        help_parser = ArgumentParser(prog="align fit", formatter_class=HelpFormatter, add_help=False,
                                     description=AlignmentDataModule.__doc__)  # fmt: skip
        help_parser.add_class_arguments(DataConfig, "data")
        help_parser.print_help()
        parser.exit(0)


class AlignCLI(LightningCLI):
    """``align fit|validate|test``. ``run_dir_default``: the default ``--trainer.default_root_dir``
    (``runs/<first --config's stem>``); a config file or the flag overrides it."""

    def __init__(self, *args, run_dir_default: str | None = None, **kwargs) -> None:
        self._run_dir_default = run_dir_default
        super().__init__(*args, **kwargs)

    def add_core_arguments_to_parser(self, parser) -> None:
        """Trainer and model as Lightning adds them; ``data`` is :class:`DataConfig` itself (``--data.x``)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_class_arguments(DataConfig, "data", fail_untyped=True, sub_configs=True)
        parser.add_argument("--data.help", action=_DataHelp, nargs="?", metavar="DataConfig",
                            help="``--data.help DataConfig`` lists every field of the data config (``--data.*``) "
                            "with its documentation, then exits.")

    def add_arguments_to_parser(self, parser) -> None:
        if self._run_dir_default:
            parser.set_defaults({"trainer.default_root_dir": self._run_dir_default})
        parser.add_lightning_class_args(AtomicModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(ExportOnFitEnd, "export")
        parser.add_lightning_class_args(ThroughputLogger, "throughput")
        parser.add_lightning_class_args(RunMetadata, "run_metadata")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(LearningRateLogger, "lr_monitor")
        parser.add_lightning_class_args(ProgressLine, "progress")
        parser.add_argument(
            "--warm_start", type=str | None, default=None,
            help="Start this run from the encoder weights of another run's checkpoint (a .ckpt file or a DeepSpeed "
            "folder): weights only, from step 0 with a fresh optimiser, schedule and data position. Ignored when "
            "--ckpt_path finds this run's own checkpoint (a requeued warm-started run resumes normally).",
        )

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if isinstance(self.datamodule, DataConfig):  # `data` holds the config; the datamodule is built from it
            self.datamodule = AlignmentDataModule(self.datamodule)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        strategies.check_clipping(cfg.get("trainer"))  # before anything is built: one clipping knob
        derive_run_paths(cfg, self.subcommand)

    def before_fit(self) -> None:
        warm = self.config["fit"].get("warm_start")
        kwargs = self.config_init["fit"]
        own = resolve_ckpt_path(kwargs.get("ckpt_path"), getattr(self.trainer.checkpoint_callback, "dirpath", None))
        if own is not None:  # refuse another run's checkpoint before any logger starts (wandb would join its run)
            check_resume_file(own, describe_run(self.model, datamodule=self.datamodule))
        if not warm:
            return
        if own is not None:
            rank_zero_info(f"[run] resuming this run's checkpoint {own}; --warm_start {warm} is not applied again")
            return
        step = load_warm_start(self.model, warm)
        kwargs["ckpt_path"] = None
        rank_zero_info(f"[run] warm start: encoder weights of {warm} (its step {step}); this run starts at step 0")


class _ParseOnlyCLI(AlignCLI):
    """Parses and type-checks a configuration without building anything (no hub download, no Trainer)."""

    def instantiate_classes(self) -> None:
        return None


def _cli_kwargs() -> dict[str, Any]:
    return dict(
        subclass_mode_model=False,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "align", "exit_on_error": False},  # errors reach parse_error_message
        auto_configure_optimizers=False,
    )


def _args(argv: list[str]) -> list[str] | None:
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
    try:
        argv = resolve_config_args(list(argv))
        return _ParseOnlyCLI(AlignmentModule, None, run=False, args=_args(argv),
                             run_dir_default=default_run_dir(argv), **_cli_kwargs()).config
    except (ArgumentError, FileNotFoundError) as exc:
        print(parse_error_message(exc), file=sys.stderr)
        raise SystemExit(2) from None


_PACKAGE = str(Path(__file__).resolve().parents[1])  # alignment/: a check raised anywhere in the package


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
    return None


def run_lightning_cli(argv: list[str]) -> int:
    """Run ``align fit|validate|test``; exit code 75 (``EXIT_REQUEUE``) after a preemption stop.

    A failed configuration or input check (a bad value, a missing shard folder or tokenizer, a model that
    does not fit the data) is one line on stderr, exit 2; ``ALIGN_TRACEBACK=1`` shows the traceback instead.
    """
    try:
        argv = resolve_config_args(list(argv))
    except FileNotFoundError as exc:
        print(f"align: error: {exc}", file=sys.stderr)
        return 2
    install_handler()  # before model and data set-up: an unhandled USR1 would kill the process
    try:
        AlignCLI(AlignmentModule, None, args=_args(argv), run_dir_default=default_run_dir(argv),
                 **_cli_kwargs())
    except Preempted as stop:
        print(f"align: {stop}", flush=True)
        return EXIT_REQUEUE
    except RunMismatchError as exc:
        print(f"align: error: {exc}", file=sys.stderr)
        return 2
    except ArgumentError as exc:
        command = f"align {argv[0]}" if argv and not argv[0].startswith("-") else "align"
        print(parse_error_message(exc, command), file=sys.stderr)
        return 2
    except (ValueError, OSError, TypeError) as exc:
        message = user_error(exc)
        if message is None or os.environ.get("ALIGN_TRACEBACK"):
            raise
        command = argv[0] if argv and not argv[0].startswith("-") else "fit"
        print(f"align {command}: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0
