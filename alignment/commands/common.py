"""What every ``align`` subcommand parser shares: the help formatter and flag help from field docstrings."""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import textwrap
from functools import lru_cache


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; a flag's default appended to its help when it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            help_text += " (default: %(default)s)"
        return help_text


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after it), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = _plain(nxt.value.value)
    return docs


def _plain(doc: str) -> str:
    """A field docstring as CLI help: one line, no reST markup, no self-referencing ``(--flag)``."""
    text = " ".join(doc.split())
    text = re.sub(r" \(``--[a-z-]+``\)", "", text)
    text = re.sub(r":\w+:`~?([\w.]+)`", r"\1()", text)
    return text.replace("``", "").replace("%", "%%")
