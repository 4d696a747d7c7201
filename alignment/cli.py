"""The ``align`` command.

``align fit|validate|test`` go to the Lightning CLI (training application);
every other subcommand (``shards``, ``eval``, ``mine``, ``export``,
``offline-encoder``, ``submit``, ``translate``) is a module under ``alignment.commands``
exposing ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")

# subcommand -> module; a module that is not there yet is simply not listed.
COMMAND_MODULES = {
    "shards": "alignment.commands.shards",
    "offline-encoder": "alignment.commands.offline_encoder",
    "eval": "alignment.commands.eval",
    "mine": "alignment.commands.mine",
    "export": "alignment.commands.export",
    "submit": "alignment.commands.submit",
    "translate": "alignment.commands.translate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        description="Multi-way alignment of multilingual sentence encoders. "
        "Training: `align fit --config configs/demo.yaml` (Lightning CLI; `align fit --help`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignment import quiet

    quiet.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from alignment.trainer_cli import run_lightning_cli

        return run_lightning_cli(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
