"""One flag dialect: every flag a library message names is a flag of the command that can raise it, and every
``align`` subcommand takes ``--config FILE`` and ``--print_config``.

The flags are collected from the source: every ``--name[.name]*`` inside a string literal under ``alignment/``
(docstrings and help-text expressions excluded, they are not messages). :data:`RAISED_BY` maps each module to
the command(s) whose run can reach it; a module missing there fails the test, so a new module must say which
command a user would have typed.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from functools import lru_cache
from pathlib import Path

import pytest

from alignment.cli import COMMAND_MODULES, command_module, main

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "alignment"
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*(?:\.[a-z0-9_*-]+)*)")

FIT = ("fit",)
SHARDS = ("shards build", "shards inspect", "shards verify", "shards merge", "shards tokenize")
TRANSLATE = ("translate run", "translate merge", "translate codes")
RAISED_BY: dict[str, tuple[str, ...]] = {  # path under alignment/ (a file, or a folder ending in /) -> commands
    "cli.py": (),
    "commands/common.py": (),
    "commands/eval.py": ("eval",),
    "commands/mine.py": ("mine",),
    "commands/mine_negatives.py": ("mine-negatives", *FIT),  # its examples go on to align fit
    "negatives.py": FIT,  # --model.loss.mask_duplicates
    "data/hard_negatives.py": ("mine-negatives", "shards verify", "shards inspect", *FIT),
    "data/pins.py": ("mine-negatives", *FIT),  # a resume refusal names the mine-negatives command to re-run
    "commands/embed_teacher.py": ("embed-teacher", *FIT),  # its messages go on to align fit
    "data/teacher.py": ("embed-teacher", "shards verify", "shards inspect", *FIT),
    "commands/shards.py": (*SHARDS, *FIT),  # tokenize's help names the --data.* flags its ids must match
    "commands/export.py": ("export", *FIT),  # names the --data.tokenizer recorded by align fit
    "commands/offline_encoder.py": ("offline-encoder",),
    "commands/fit_map.py": ("fit-map", "eval"),  # its examples go on to align eval --maps
    "deploy/": ("fit-map", "export", "eval"),
    "deploy/onnx_export.py": ("export", "eval", *FIT),  # names the --model.encoder.* flag of align fit
    "commands/translate.py": (*TRANSLATE, "submit", "shards build"),  # its examples go on to those
    "commands/submit.py": ("submit", *FIT, "translate run", "shards build"),  # the jobs' checks name those flags
    "commands/submit_translate.py": ("submit", "translate run"),
    "commands/slurm.py": ("submit",),
    "translate/": ("translate run", "translate merge", "translate codes", "submit"),
    "export.py": ("export", *FIT),  # align export, and the export at the end of align fit
    "data/": (*FIT, "shards build", "shards merge", "shards inspect", "shards verify", "eval"),
    "evaluate/": ("eval", "mine", *FIT, "export"),  # a checkpoint without a tokenizer: align export --tokenizer
    "data/tokens.py": ("shards tokenize", "shards verify", "shards inspect", *FIT),  # FIT: the fallback's flags
    "demo/": ("offline-encoder",),
    "demo/table.py": ("python -m alignment.demo.table",),
    "demo/ood.py": ("python -m alignment.demo.ood", "eval"),  # its output is `align eval --data` input
    "staging.py": (*FIT, "shards build", "eval"),
    "fsutil.py": (*FIT, *SHARDS, "export", "offline-encoder"),
    "adapters.py": ("export", *FIT),  # align export --adapter, and the --model.encoder.adapter.* checks of align fit
    "objectives/": FIT,
}
FIT_MODULES = ("module.py", "optim.py", "model.py", "losses.py", "gradcache.py", "strategies.py", "callbacks.py",
               "runs.py", "commands/fit.py", "loading.py", "preemption.py", "resources.py", "loggers.py", "train_logging.py",
               "distributed.py", "model_card.py", "progress.py", "batch.py", "languages.py", "quiet.py",
               "hostinfo.py", "synthetic.py", "encode.py", "packing.py")
RAISED_BY.update({name: FIT for name in FIT_MODULES})


EXTERNAL = {  # flags of other tools, inside rendered scripts or commands the messages suggest
    "gpus-per-node", "ntasks-per-node", "cpus-per-task", "job-name", "array", "chdir", "output", "signal",
    "partition", "account", "parsable", "dependency", "kill-on-invalid-dep", "nodes", "time", "constraint", "mem",
    "qos", "nproc-per-node", "no-deps", "no-index", "find-links",
}


FIT_SUBCOMMAND_FLAGS = {"ckpt_path"}
"""``align fit``'s own arguments (Trainer.fit's), which LightningCLI adds per subcommand."""


def _messages(path: Path) -> list[str]:
    """String literals of a module that are not docstrings or bare string statements (field docs, comments)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and id(node) not in bare:
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare:
            out.append(node.value)
    return out


def _commands_of(rel: str) -> tuple[str, ...] | None:
    if rel in RAISED_BY:
        return RAISED_BY[rel]
    for key, commands in sorted(RAISED_BY.items(), key=lambda kv: -len(kv[0])):  # the longest folder wins
        if key.endswith("/") and rel.startswith(key):
            return commands
    return None


def _dataclass_of(hint) -> type | None:
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _with_fields(prefix: str, cls: type, out: set[str]) -> None:
    for f in dataclasses.fields(cls):
        out.add(f"{prefix}.{f.name}")
        inner = _dataclass_of(typing.get_type_hints(cls).get(f.name))
        if inner is not None:
            _with_fields(f"{prefix}.{f.name}", inner, out)


def _parser_flags(parser) -> set[str]:
    """Every option a jsonargparse parser accepts, optional nested dataclasses' fields included."""
    flags = set()
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                flags.add(option[2:])
                cls = _dataclass_of(getattr(action, "_typehint", None))
                if cls is not None:
                    _with_fields(option[2:], cls, flags)
    return flags


SCRIPTS = {"python -m alignment.demo.table": frozenset({"out", "ood"}),
           "python -m alignment.demo.ood": frozenset({"shards", "out", "packages", "languages", "min_languages"})}
"""Scripts (not align subcommands) whose own argparse flags a module's messages name."""


@lru_cache(maxsize=None)
def accepted(command: str) -> frozenset[str]:
    """The flags ``align COMMAND`` accepts (``command`` may be ``shards build``)."""
    if command in SCRIPTS:
        return SCRIPTS[command]
    if command == "fit":
        from alignment.commands.fit import _cli_kwargs, _ParseOnlyCLI
        from alignment.module import AlignmentModule

        cli = _ParseOnlyCLI(AlignmentModule, None, run=False, args=["--config", str(REPO / "configs" / "debug.yaml")],
                            **_cli_kwargs())
        return frozenset(_parser_flags(cli.parser) | FIT_SUBCOMMAND_FLAGS)
    name, _, sub = command.partition(" ")
    module = command_module(name)
    parser = module.SUBCOMMANDS[sub][1]() if sub else module.parser()
    return frozenset(_parser_flags(parser))


def _ok(flag: str, commands: tuple[str, ...]) -> bool:
    if flag.replace("_", "-") in EXTERNAL or flag in EXTERNAL:
        return True
    if flag.endswith(("_", ".", "*")):  # a family in prose: --model.encoder.freeze_*
        stem = flag.rstrip("*")
        return any(f.startswith(stem) for c in commands for f in accepted(c))
    return any(flag in accepted(c) for c in commands)


def _sources() -> list[tuple[str, Path]]:
    return sorted((str(p.relative_to(PACKAGE)), p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_names_the_commands_that_can_raise_its_messages():
    unmapped = [rel for rel, _ in _sources() if _commands_of(rel) is None]
    assert not unmapped, f"add these modules to RAISED_BY: {unmapped}"


@pytest.mark.parametrize("rel", [rel for rel, _ in _sources()])
def test_every_flag_in_a_message_is_accepted_by_its_command(rel):
    commands = _commands_of(rel)
    if commands is None:
        pytest.fail(f"add {rel} to RAISED_BY")
    flags = {m.group(1) for text in _messages(PACKAGE / rel) for m in FLAG.finditer(text)}
    wrong = sorted(f for f in flags if not _ok(f, commands) and f not in ("help", "config", "print_config"))
    assert not wrong, f"alignment/{rel} names flags that {', '.join(commands) or 'no command'} does not accept: {wrong}"


SUBCOMMANDS = ["fit", *[n for n in COMMAND_MODULES if n not in ("shards", "translate")], "shards", *SHARDS,
               "translate", *TRANSLATE]


def _probe(command: str) -> tuple[str, str]:
    """A setting of ``command`` and a YAML value for it: a string option, else a switch, else a positional."""
    name, _, sub = command.partition(" ")
    module = command_module(name)
    parser = module.SUBCOMMANDS[sub][1]() if sub else module.parser()
    actions = [a for a in parser._actions if a.dest not in ("help", "config", "print_config")]
    for wanted, value in ((str, "probe-value"), (str | None, "probe-value"), (bool, "true")):
        for action in actions:
            if action.option_strings and "." not in action.dest and getattr(action, "_typehint", action.type) == wanted:
                return action.dest, value
    positional = [a.dest for a in actions if not a.option_strings]
    return (positional[0], "probe-value") if positional else (None, None)  # align shards / translate: no setting


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_takes_config_and_print_config(command, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys, "argv", ["align"])
    argv = command.split()
    setting, value = ("seed_everything", "7") if command == "fit" else _probe(command)
    if command == "fit":
        argv += ["--config", str(REPO / "configs" / "debug.yaml")]
    config = tmp_path / "c.yaml"
    config.write_text(f"{setting}: {value}\n" if setting else "{}\n")
    with pytest.raises(SystemExit) as stop:
        raise SystemExit(main([*argv, "--config", str(config), "--print_config"]))
    assert stop.value.code in (0, None), capsys.readouterr().err
    if setting:
        assert f"{setting}: {value}" in capsys.readouterr().out
