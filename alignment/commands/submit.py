"""``align submit``: check a training config against a SLURM allocation, render ``slurm/train.sbatch``, submit it.

What it checks before anything reaches the queue (each problem names the flag to change):

* ``trainer.num_nodes`` equals ``--nodes`` and ``trainer.devices`` equals the tasks per node
  (Lightning under SLURM runs one process per task and refuses any mismatch, but only once the
  allocation has started);
* one task per GPU: ``--tasks_per_node`` equals ``--gpus_per_node`` on a GPU accelerator, and no GPU
  is requested for a CPU run;
* the global batch (``--data.batch_size`` x nodes x tasks) has negatives (>= 2 rows);
* a finite epoch has at least one training shard per reader (nodes x tasks x max(1, workers)) and one
  validation shard per rank;
* ``--checkpoint.dirpath`` is set, so a requeued job finds ``last.ckpt``;
* the signal lead time is shorter than the time limit.

Then it renders the template (``--template``, default the repository's ``slurm/train.sbatch``): the
``#SBATCH`` values of the allocation, absolute config paths, the per-run log folder, and the
``align fit`` overrides given after ``--``. ``--dry_run`` prints that script; otherwise it is saved
beside the logs and handed to ``sbatch``.

``--job translate`` renders ``slurm/translate.sbatch`` as an array job and its dependent merge instead
(:mod:`alignment.commands.submit_translate`). ``launch/submit.py`` runs the same :func:`main` without
the ``align`` entry point.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Literal

import yaml

from alignment.commands.common import add_config, new_parser, parse
from alignment.commands.slurm import Allocation, env_int, error, refuse, render, sbatch_script
from alignment.resources import sbatch_template

REPO_TEMPLATE = sbatch_template("train.sbatch")  # the installed package's copy, or the checkout's slurm/

EXAMPLES = """\
examples:
  # 2 nodes x 8 GPUs for a day; check and print the script only
  align submit --fit_config configs/recipes/labse-multiway.yaml --nodes 2 --gpus_per_node 8 \\
      --time 1-00:00:00 --partition gpu --account myproject --dry_run \\
      -- --trainer.num_nodes 2 --data.train_shards data/mw

  # submit it (my.yaml says num_nodes: 2, devices: 8); everything after -- goes to `align fit`
  align submit --fit_config my.yaml --nodes 2 --gpus_per_node 8 --time 24:00:00 \\
      --setup "source $PWD/.venv/bin/activate" -- --data.train_shards /shared/data/mw

  # CPU nodes (gloo): one task per node, no GPUs
  align submit --fit_config my-cpu.yaml --nodes 2 --gpus_per_node 0 --tasks_per_node 1 --time 30

  # the allocation from a file (keys as the flags: nodes, gpus_per_node, time, ...); flags after it override it
  align submit --config cluster.yaml --fit_config my.yaml --time 48:00:00

  # a translate job: 8 array tasks of `align translate run`, then `align translate merge` (afterok)
  align submit --job translate --array_tasks 8 --gpus_per_node 1 --time 04:00:00 \\
      -- news.en.txt --model /shared/models/nllb --targets de,fr --out /shared/data/syn

every default above can also come from the environment: ALIGN_NODES, ALIGN_GPUS_PER_NODE,
ALIGN_TASKS_PER_NODE, ALIGN_CPUS_PER_TASK, ALIGN_TIME, ALIGN_PARTITION, ALIGN_ACCOUNT,
ALIGN_SIGNAL_LEAD, ALIGN_SETUP, ALIGN_CMD, ALIGN_TEMPLATE, ALIGN_ARRAY_TASKS.
"""


# ---------------------------------------------------------------------------- checks


def _devices(value, accelerator: str, gpus_per_node: int) -> int | None:
    """``trainer.devices`` as a per-node process count; None when it cannot be known before the job runs."""
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            value = int(text)
        elif "," in text:
            return len([p for p in text.split(",") if p.strip()])
        elif text == "auto":
            value = -1
        else:
            return None
    if value == -1:  # "auto" / -1: every device the task sees
        return gpus_per_node if accelerator != "cpu" and gpus_per_node else 1
    return int(value)


def _accelerator(config) -> str:
    acc = config.trainer.accelerator
    if isinstance(acc, str):
        return acc
    return str(getattr(acc, "class_path", acc)).rsplit(".", 1)[-1].replace("Accelerator", "").lower()


def check_allocation(config, alloc: Allocation) -> list[str]:
    """Problems between a parsed ``align fit`` config and the allocation; empty when they agree.

    Shard specs are resolved relative to the current directory (the job's working directory).
    """
    from alignment.data.datamodule import resolve_shard_spec
    from alignment.module import check_global_batch

    problems = []
    trainer, data = config.trainer, config.data
    accelerator = _accelerator(config)
    tasks = alloc.tasks_per_node
    if trainer.num_nodes != alloc.nodes:
        problems.append(
            f"--nodes {alloc.nodes} but the config's trainer.num_nodes is {trainer.num_nodes}: "
            f"add `-- --trainer.num_nodes {alloc.nodes}` (or change --nodes)"
        )
    devices = _devices(trainer.devices, accelerator, alloc.gpus_per_node)
    if devices is None:
        problems.append(f"trainer.devices {trainer.devices!r} is not a device count: set --trainer.devices {tasks}")
    elif devices != tasks:
        problems.append(
            f"{tasks} task(s) per node but the config's trainer.devices is {trainer.devices!r}: Lightning under "
            f"SLURM runs one process per task and needs them equal; add `-- --trainer.devices {tasks}` "
            "(or change --tasks_per_node / --gpus_per_node)"
        )
    if alloc.gpus_per_node and accelerator == "cpu":
        problems.append(
            f"--gpus_per_node {alloc.gpus_per_node} requests GPUs for a run with trainer.accelerator cpu: "
            "use --gpus_per_node 0, or set --trainer.accelerator gpu"
        )
    if not alloc.gpus_per_node and accelerator in ("gpu", "cuda"):
        problems.append(
            f"trainer.accelerator {accelerator} but --gpus_per_node 0: request the GPUs (--gpus_per_node N)"
        )
    if alloc.gpus_per_node and tasks != alloc.gpus_per_node:
        problems.append(
            f"--tasks_per_node {tasks} with --gpus_per_node {alloc.gpus_per_node}: Lightning needs one task per GPU"
        )
    world = alloc.world_size
    try:
        check_global_batch(data.batch_size, world)
    except ValueError as exc:
        problems.append(str(exc))
    workers = max(1, data.num_workers)
    if data.train_shards is None:
        problems.append("--data.train_shards is not set: the job would have nothing to train on")
    else:
        try:
            shards = resolve_shard_spec(data.train_shards, "train")
        except (FileNotFoundError, ValueError) as exc:
            problems.append(f"--data.train_shards: {exc}")
        else:
            if not data.resampled and len(shards) < world * workers:
                problems.append(
                    f"--data.train_shards has {len(shards)} shard(s) but a finite epoch needs one per reader: "
                    f"{alloc.nodes} node(s) x {tasks} task(s) x {workers} worker(s) = {world * workers}; write more, "
                    "smaller shards (align shards build --rows_per_shard), lower --data.num_workers, "
                    "or set --data.resampled true"
                )
    if data.val_shards is not None:
        try:
            val = resolve_shard_spec(data.val_shards, "validation")
        except (FileNotFoundError, ValueError) as exc:
            problems.append(f"--data.val_shards: {exc}")
        else:
            if len(val) < world:
                problems.append(
                    f"--data.val_shards has {len(val)} shard(s) for {world} ranks: each rank needs one"
                )
    if not config.checkpoint.dirpath:
        problems.append(
            "--checkpoint.dirpath is not set: a requeued job could not find last.ckpt to resume from; "
            "set it to a folder inside the run (e.g. runs/<name>/checkpoints)"
        )
    return problems


def summary(config, alloc: Allocation) -> str:
    """A few lines on what the job will be: ranks, global batch, steps, folders."""
    data, trainer = config.data, config.trainer
    return "\n".join([
        f"allocation: {alloc.nodes} node(s) x {alloc.tasks_per_node} task(s) = {alloc.world_size} rank(s), "
        f"{alloc.gpus_per_node} GPU(s)/node, time limit {alloc.time}, USR1 {alloc.signal_lead} s before it",
        f"global batch: {data.batch_size} rows/rank x {alloc.world_size} = {data.batch_size * alloc.world_size} rows; "
        f"max_steps {trainer.max_steps}",
        f"checkpoints: {config.checkpoint.dirpath} (requeued attempts resume from last.ckpt)",
    ])


# ---------------------------------------------------------------------------- rendering


def default_template() -> Path:
    """``$ALIGN_TEMPLATE``, else the shipped ``slurm/train.sbatch``."""
    return Path(os.environ.get("ALIGN_TEMPLATE") or REPO_TEMPLATE)


# ---------------------------------------------------------------------------- the command


HELP = "check a training config against a SLURM allocation, render the sbatch script and submit it"


def parser():
    """``align submit``'s own flags (the ``align fit`` or ``align translate run`` arguments follow ``--``)."""
    p = new_parser(
        "submit",
        "Check a training config against a SLURM allocation, render slurm/train.sbatch for it, and submit it with "
        "sbatch (--dry_run: print it). --job translate: check `align translate run` arguments, render "
        "slurm/translate.sbatch as an array job and a dependent merge, submit both. Usage: align submit [flags] "
        "[-- ALIGN_FIT_OR_TRANSLATE_ARGS]",
        EXAMPLES,
    )
    p.add_argument("--job", type=Literal["train", "translate"], default="train",
                   help="train: `align fit` from --fit_config (slurm/train.sbatch); translate: an array job of "
                   "`align translate run` over --array_tasks tasks, then a dependent `align translate merge` "
                   "(slurm/translate.sbatch); the arguments after -- are that command's.")
    p.add_argument("--fit_config", action="append", type=str, default=[], metavar="YAML",
                   help="Training config(s), as for `align fit --config` (repeat for several); a shipped recipe "
                   "by name: recipe:xlm-roberta-base-multiway (--job train).")
    p.add_argument("--array_tasks", type=int, default=env_int("ALIGN_ARRAY_TASKS", 4), metavar="N",
                   help="--job translate: array tasks; task I translates parts I, I+N, ...")
    add_config(p, Allocation, skip={"extra"})
    p.set_defaults({"nodes": env_int("ALIGN_NODES", 1), "gpus_per_node": env_int("ALIGN_GPUS_PER_NODE", 1),
                    "tasks_per_node": env_int("ALIGN_TASKS_PER_NODE", None),
                    "cpus_per_task": env_int("ALIGN_CPUS_PER_TASK", None),
                    "time": os.environ.get("ALIGN_TIME") or "04:00:00",
                    "partition": os.environ.get("ALIGN_PARTITION") or None,
                    "account": os.environ.get("ALIGN_ACCOUNT") or None,
                    "signal_lead": env_int("ALIGN_SIGNAL_LEAD", 300)})  # fmt: skip
    p.add_argument("--sbatch_arg", action="append", type=str, default=[], metavar="OPTION",
                   help="An extra #SBATCH option, e.g. --sbatch_arg=--qos=high (repeat for several).")
    p.add_argument("--setup", type=str | None, default=os.environ.get("ALIGN_SETUP") or None, metavar="SHELL",
                   help="Shell code the job runs first (activate the environment), e.g. "
                   "'source /shared/.venv/bin/activate'.")
    p.add_argument("--align_cmd", type=str | None, default=os.environ.get("ALIGN_CMD") or None, metavar="CMD",
                   help="How the job runs align (default in the template: `align`), e.g. 'python -m alignment.cli'.")
    p.add_argument("--template", type=str | None, default=None,
                   help=f"The sbatch template (default: $ALIGN_TEMPLATE, else {REPO_TEMPLATE}; --job translate: "
                   "the shipped translate.sbatch).")
    p.add_argument("--log_dir", type=str | None, default=None,
                   help="Folder for the batch log, per-rank logs and the rendered script (default: "
                   "<trainer.default_root_dir>/slurm).")
    p.add_argument("--dry_run", type=bool, default=False, help="Check and print the script; submit nothing.")
    return p


def _list(value) -> list[str]:
    """An append flag's values; from a --config file they arrive as one YAML list."""
    if isinstance(value, str):
        loaded = yaml.safe_load(value)
        return [str(v) for v in loaded] if isinstance(loaded, list) else [value]
    return [str(v) for v in value or []]


def run(args, fit_args: list[str]) -> int:
    args.fit_config, args.sbatch_arg = _list(args.fit_config), _list(args.sbatch_arg)
    args.template = Path(args.template) if args.template else None
    if args.job == "translate":
        from alignment.commands.submit_translate import run_translate

        return run_translate(args, fit_args)
    if not args.fit_config:
        return error("--fit_config is required for --job train (the training config, as for `align fit --config`)")
    template = args.template or default_template()
    if not template.is_file():
        return error(f"sbatch template {template} not found: pass --template PATH (the repository's "
                      "slurm/train.sbatch) or set ALIGN_TEMPLATE")
    from alignment.resources import resolve_config

    try:
        args.fit_config = [resolve_config(c) for c in args.fit_config]  # recipe:NAME -> the shipped file
    except FileNotFoundError as exc:
        return error(str(exc))
    missing = [c for c in args.fit_config if not Path(c).is_file()]
    if missing:
        return error(f"--fit_config {missing[0]}: no such file")
    configs = [str(Path(c).resolve()) for c in args.fit_config]
    try:
        alloc = Allocation(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition, account=args.account,
            signal_lead=args.signal_lead, job_name=args.job_name or f"align-{Path(configs[0]).stem}",
            extra=list(args.sbatch_arg),
        )
    except ValueError as exc:
        return error(str(exc))

    from alignment.commands.fit import parse_config

    argv = [a for c in configs for a in ("--config", c)] + fit_args
    with warnings.catch_warnings():  # LightningCLI warns that these args are not sys.argv: on purpose here
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            config = parse_config(argv)  # a bad key, type or choice: the parser's one-line message, as `align fit`
        except SystemExit as stop:
            return int(stop.code or 2)
    problems = check_allocation(config, alloc)
    if problems:
        return refuse(problems)
    log_dir = Path(args.log_dir or Path(config.trainer.default_root_dir or ".") / "slurm").resolve()
    try:
        script = render(template.read_text(), alloc, configs=configs, fit_args=fit_args, log_dir=str(log_dir),
                        workdir=str(Path.cwd()), setup=args.setup, align_cmd=args.align_cmd,
                        template_name=str(template))
    except ValueError as exc:
        return error(str(exc))
    print(summary(config, alloc), file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        print(f"# dry run: would write {log_dir}/{alloc.job_name}-<time>.sbatch and run `sbatch` on it", file=sys.stderr)
        return 0
    path = log_dir / f"{alloc.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    try:
        job_id = sbatch_script(script, path)
    except RuntimeError as exc:
        return error(str(exc))
    print(f"submitted job {job_id}: {path}")
    print(f"logs: {log_dir}/{alloc.job_name}-{job_id}.out, ranks: {log_dir}/{alloc.job_name}-{job_id}-restart*-rank*.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``align submit [flags] [-- ARGS]`` (also ``launch/submit.py``, without the ``align`` entry point)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        args = parse(parser(), argv[:cut], "submit")
    except SystemExit as stop:
        return int(stop.code or 0) if isinstance(stop.code, int) or stop.code is None else 2
    return run(args, argv[cut + 1:])
