"""``align submit --job translate``: render ``slurm/translate.sbatch`` twice and submit an array job and its merge.

The arguments after ``--`` are ``align translate run``'s; they are parsed and checked with that
command's own parser (a typo'd flag or a missing INPUT is one line, exit 2, before sbatch). Then:

* the array job: ``--array=0-(N-1)`` of one task each (``--gpus_per_node`` GPUs, ``--cpus-per-task``),
  task I running ``align translate run ... --rank I --world_size N --merge false``;
* the merge job: one CPU, no GPU, ``--dependency=afterok:<array>`` (``--kill-on-invalid-dep=yes``: a
  failed task cancels it), running ``align translate merge OUT``.

Both scripts are the same template rendered by :func:`alignment.commands.slurm.render` (the
``#SBATCH`` values, ``--sbatch_arg`` extras, the log folder), differing in ``TRANSLATE_STAGE``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from alignment.commands.slurm import Allocation, error, refuse, render, sbatch_script
from alignment.resources import sbatch_template

TEMPLATE = sbatch_template("translate.sbatch")
MERGE_OPTIONS = ("--kill-on-invalid-dep=yes",)


def _allocations(args) -> tuple[Allocation, Allocation]:
    """The array task's allocation and the merge's (1 CPU, no GPU); ValueError naming the flag."""
    if args.nodes != 1 or args.tasks_per_node not in (None, 1):
        raise ValueError(
            f"--nodes {args.nodes} / --tasks_per_node {args.tasks_per_node}: a translate job runs one task per "
            "array element on one node; ask for more tasks with --array_tasks N"
        )
    if args.array_tasks < 1:
        raise ValueError(f"--array_tasks must be >= 1, got {args.array_tasks}")
    task = Allocation(
        nodes=1, gpus_per_node=args.gpus_per_node, tasks_per_node=1, cpus_per_task=args.cpus_per_task,
        time=args.time, partition=args.partition, account=args.account, signal_lead=1,  # no USR1 in this template
        job_name=args.job_name or "align-translate", extra=list(args.sbatch_arg),
    )  # fmt: skip
    return task, dataclasses.replace(task, gpus_per_node=0, cpus_per_task=1)


def _check(config, alloc: Allocation) -> list[str]:
    problems = []
    if config.rank is not None or not config.merge:
        problems.append("--rank / --world_size / --merge false are set by the array job (task I of --array_tasks N): "
                        "drop them from the translate arguments")
    device = config.generate.device
    if not alloc.gpus_per_node and device not in ("auto", "cpu"):
        problems.append(f"--generate.device {device} but --gpus_per_node 0: request a GPU or drop --generate.device")
    if not alloc.gpus_per_node and config.generate.dtype in ("bf16", "fp16"):
        problems.append(f"--generate.dtype {config.generate.dtype} on CPU tasks (--gpus_per_node 0): use --generate.dtype fp32 or auto")
    return problems


def run_translate(args, translate_args: list[str]) -> int:
    """``align submit --job translate``: check, render both scripts, print them (--dry_run) or sbatch them."""
    from alignment.commands.translate import parse_run_args

    if args.fit_config:
        return error("--fit_config is for --job train; a translate job takes `align translate run` arguments after --")
    template = args.template or TEMPLATE
    if not template.is_file():
        return error(f"sbatch template {template} not found: pass --template PATH (slurm/translate.sbatch)")
    try:
        task, merge = _allocations(args)
    except ValueError as exc:
        return error(str(exc))
    try:
        config = parse_run_args(translate_args)  # the translate command's own parser: a typo'd flag stops here
    except ValueError as exc:
        return error(f"align translate run: {exc}")
    problems = _check(config, task)
    if problems:
        return refuse(problems)
    log_dir = Path(args.log_dir or "logs").resolve()
    common = dict(configs=[], fit_args=translate_args, log_dir=str(log_dir), workdir=str(Path.cwd()),
                  setup=args.setup, align_cmd=args.align_cmd, template_name=str(template), signal=False)
    try:
        text = template.read_text()
        array_script = render(text, task, array=args.array_tasks,
                              exports={"TRANSLATE_STAGE": "run", "TRANSLATE_TASKS": str(args.array_tasks)}, **common)
        merge_script = render(text, merge, exports={"TRANSLATE_STAGE": "merge"}, **common)
    except ValueError as exc:
        return error(str(exc))
    print(f"translate: {args.array_tasks} array task(s) x {task.gpus_per_node} GPU(s), time limit {task.time} each; "
          f"then a merge job (afterok) -> {config.out}/corpus.jsonl", file=sys.stderr)
    if args.dry_run:
        print(array_script, end="")
        print(f"# ---- merge job: sbatch --dependency=afterok:<array job> {' '.join(MERGE_OPTIONS)} ----")
        print(merge_script, end="")
        print(f"# dry run: would write {log_dir}/{task.job_name}-<time>.sbatch and -merge.sbatch and sbatch them",
              file=sys.stderr)
        return 0
    stem = log_dir / f"{task.job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        array_id = sbatch_script(array_script, stem.with_name(stem.name + ".sbatch"))
    except RuntimeError as exc:
        return error(str(exc))
    try:
        merge_id = sbatch_script(merge_script, stem.with_name(stem.name + "-merge.sbatch"),
                                 f"--dependency=afterok:{array_id}", *MERGE_OPTIONS)
    except RuntimeError as exc:
        return error(f"{exc}; the array job {array_id} is queued: once it is done, `align translate merge "
                      f"{config.out}`, or scancel {array_id}")
    print(f"submitted array job {array_id} ({args.array_tasks} tasks) and merge job {merge_id}: {stem}.sbatch")
    print(f"logs: {log_dir}/{task.job_name}-{array_id}_<task>.out, {log_dir}/{task.job_name}-{merge_id}.out")
    return 0
