"""What every ``align`` subcommand that is not a Lightning command shares: one flag dialect.

Each command builds a jsonargparse parser from the config dataclasses the library validates with
(:func:`new_parser`, then ``add_class_arguments``), so a flag is the field path exactly as jsonargparse
spells it (``--encode.batch_size``, ``--mining.margin``, ``--rows_per_shard``), the field docstrings are
the help, and every command takes ``--config FILE`` and ``--print_config``. :func:`parse` turns every
parse or validation failure into one line, ``align CMD: error: ...``, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)

TRUE_FALSE = ("true", "false", "True", "False", "yes", "no")


def plain(doc: str) -> str:
    """A field docstring as CLI help: no reST markup (````x````, ``:func:`x```), no self-referencing ``(--flag)``."""
    text = re.sub(r" \(``--[\w.-]+``\)", "", doc)
    text = re.sub(r":\w+:`~?([\w.]+)`", r"\1()", text)
    return text.replace("``", "")


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (types, defaults, field docs) with the description and examples kept as written,
    and field docstrings shown as plain text (:func:`plain`)."""

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))


class UsageError(Exception):
    """A command-line problem found after parsing; printed as ``align CMD: error: ...``, exit code 2."""


def new_parser(command: str, description: str, epilog: str | None = None) -> ArgumentParser:
    """An ``align COMMAND`` parser with ``--config FILE`` and ``--print_config``."""
    parser = ArgumentParser(prog=f"align {command}", description=description, epilog=epilog,
                            formatter_class=HelpFormatter, exit_on_error=False)  # fmt: skip
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of any of these flags (nested keys "
                        "for dotted flags); flags after it override it.")  # fmt: skip
    return parser


def parse_error_message(exc: BaseException, command: str = "align fit") -> str:
    """A parser error as the user reads it: the flag as typed (``--model.loss.objective``) and what is wrong;
    a typo in a closed choice lists the allowed values."""
    text = str(exc).strip()
    choice = re.search(r"Expected a typing\.Literal\[(.*?)\]", text)
    got = re.search(r"(?:Got|Given) value: (\S*)", text)
    if choice and got:  # the keys of the nested parsers down to the failing choice: data + language_policy
        key = ".".join(re.findall(r'Parser key "([^"]+)"', text[:choice.start()]))
        allowed = ", ".join(v.strip().strip("'\"") for v in choice.group(1).split(","))
        optional = " or null" if "NoneType" in text else ""
        text = f"--{key}: must be one of {allowed}{optional}, got {got.group(1).strip()!r}"
    else:
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', text, re.S)
        if match:
            text = f"--{match.group(1)}: {match.group(2).strip()}"
    return f"{command}: error: {text}\n(run `{command} --help` for every flag and its allowed values)"


def _bool_flags(parser: ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        if getattr(action, "_typehint", None) is bool or isinstance(action, argparse._StoreTrueAction):
            flags.update(s for s in action.option_strings if s.startswith("--"))
    return flags


def with_bool_values(parser: ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--gold`` alone means ``--gold true``: a boolean flag keeps working as a switch."""
    flags, out = _bool_flags(parser), []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--":
            out.extend(argv[i + 1:])
            break
        if arg in flags and (i + 1 == len(argv) or argv[i + 1] not in TRUE_FALSE):
            out.append("true")
    return out


class ConfigError(SystemExit):
    """A setting's own check failed (printed already); ``align`` returns its exit code 2 instead of exiting."""


def fail(command: str, message: object) -> ConfigError:
    """Print ``align COMMAND: error: MESSAGE`` on stderr; the :class:`ConfigError` (exit code 2) to raise."""
    print(f"align {command}: error: {message}", file=sys.stderr, flush=True)
    return ConfigError(2)


def parse(parser: ArgumentParser, argv: Sequence[str], command: str) -> Namespace:
    """Parse ``argv``; a bad flag, type, choice or value is one line on stderr and ``SystemExit(2)``."""
    try:
        return parser.parse_args(with_bool_values(parser, list(argv)))
    except argparse.ArgumentError as exc:
        print(parse_error_message(exc, f"align {command}"), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (ValueError, TypeError) as exc:  # a nested dataclass's __post_init__, run during the parse
        raise fail(command, exc) from None


def build(parser: ArgumentParser, ns: Namespace, cls: type, command: str, **extra: Any) -> Any:
    """``cls`` from the parsed flags (its nested dataclasses built too); a failed check is ``SystemExit(2)``."""
    try:
        values = parser.instantiate(ns)
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values and f.init}
        return cls(**(kwargs | extra))
    except (ValueError, TypeError) as exc:
        raise fail(command, exc) from None


def add_config(parser: ArgumentParser, cls: type, *, skip: set[str] | None = None) -> None:
    """Every field of ``cls`` as a top-level flag (nested dataclasses as ``--field.x``)."""
    parser.add_class_arguments(cls, nested_key=None, skip=skip or set(), fail_untyped=True, sub_configs=True)
