"""The ``align`` command.

``align fit|validate|test`` go to the Lightning CLI (training application);
every other subcommand (``shards``, ``eval``, ``mine``, ``mine-negatives``, ``embed-teacher``, ``export``,
``offline-encoder``, ``submit``, ``translate``) is a module under ``alignment.commands``
exposing ``HELP`` (one line), ``parser()`` (its jsonargparse parser; ``alignment.commands.common``)
and ``main(argv)``.
"""

from __future__ import annotations

import importlib
import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test")

# subcommand -> module; a module that is not there yet is simply not listed.
COMMAND_MODULES = {
    "shards": "alignment.commands.shards",
    "offline-encoder": "alignment.commands.offline_encoder",
    "eval": "alignment.commands.eval",
    "mine": "alignment.commands.mine",
    "mine-negatives": "alignment.commands.mine_negatives",
    "embed-teacher": "alignment.commands.embed_teacher",
    "export": "alignment.commands.export",
    "fit-map": "alignment.commands.fit_map",
    "submit": "alignment.commands.submit",
    "translate": "alignment.commands.translate",
}


def command_module(name: str):
    """The module of ``align NAME``, or None when it is not there."""
    module_name = COMMAND_MODULES[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise


def usage() -> str:
    lines = ["usage: align COMMAND [--config FILE] [flags] (align COMMAND --help)", "",
             "Multi-way alignment of multilingual sentence encoders.", "", "commands:",
             "  fit | validate | test   train / evaluate with the Lightning CLI (align fit --config configs/demo.yaml)"]
    for name in COMMAND_MODULES:
        module = command_module(name)
        if module is not None:
            lines.append(f"  {name:<23} {module.HELP}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from alignment import quiet

    quiet.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from alignment.commands.fit import run_lightning_cli

        return run_lightning_cli(argv)
    module = command_module(argv[0]) if argv and argv[0] in COMMAND_MODULES else None
    if module is None:
        print(usage(), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"align: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from alignment.commands.common import ConfigError

    try:
        return int(module.main(argv[1:]) or 0)
    except ConfigError as exc:  # a failed value check; --help, --print_config and usage errors exit as argparse's
        return int(exc.code or 2)


if __name__ == "__main__":
    sys.exit(main())
