"""`align` subcommands that are not Lightning trainer commands.

Each module exposes ``register(subparsers)`` which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning
an exit code.
"""
