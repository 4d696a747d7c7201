"""`align` subcommands that are not Lightning trainer commands.

Each module exposes ``HELP`` (the one-line summary ``align --help`` lists), ``parser()`` (a jsonargparse
parser built from the command's config dataclasses with :func:`alignment.commands.common.new_parser`) and
``main(argv) -> int``.
"""
