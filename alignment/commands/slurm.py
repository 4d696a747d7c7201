"""SLURM pieces shared by ``align submit``'s jobs (training, translate array): the allocation, the time
limit, rendering an sbatch template's ``#SBATCH`` values, refusing with every problem, and ``sbatch``."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "# @align-submit@"



def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None



@dataclass
class Allocation:
    """What ``align submit`` asks SLURM for (the ``#SBATCH`` values of the rendered script)."""

    nodes: int = 1
    """Nodes; must equal the config's trainer.num_nodes (``--nodes``)."""
    gpus_per_node: int = 1
    """GPUs per node; 0 for CPU nodes (``--gpus_per_node``)."""
    tasks_per_node: int | None = None
    """Tasks per node, one per device; must equal trainer.devices. Default: the GPUs per node, 1 without GPUs
    (``--tasks_per_node``)."""
    cpus_per_task: int | None = None
    """CPU cores per task, for DataLoader workers and tokenisation; default: the cluster's (``--cpus_per_task``)."""
    time: str = "04:00:00"
    """Time limit per attempt in a SLURM time format: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    (``--time``)."""
    partition: str | None = None
    """Partition; default: the cluster's default partition (``--partition``)."""
    account: str | None = None
    """Account to charge; default: the user's default account (``--account``)."""
    signal_lead: int = 300
    """Seconds before the time limit at which USR1 asks the run to checkpoint and requeue (``--signal_lead``)."""
    job_name: str | None = None
    """Job name; default: align-<first config's file stem> (``--job_name``)."""
    extra: list[str] = field(default_factory=list)
    """More sbatch options, one per flag, e.g. ``--sbatch_arg=--constraint=a100 --sbatch_arg=--mem=0``."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is None:
            self.tasks_per_node = self.gpus_per_node or 1
        if self.tasks_per_node < 1:
            raise ValueError(f"--tasks_per_node must be >= 1, got {self.tasks_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus_per_task must be >= 1, got {self.cpus_per_task}")
        if self.signal_lead < 1:
            raise ValueError(f"--signal_lead must be >= 1 second, got {self.signal_lead}")
        limit = time_limit_seconds(self.time)
        if self.signal_lead >= limit:
            raise ValueError(
                f"--signal_lead {self.signal_lead} s is not shorter than --time {self.time} ({limit} s): "
                "the checkpoint signal would come at once; lower --signal_lead or raise --time"
            )
        for arg in self.extra:
            if not arg.startswith("--") or "\n" in arg:
                raise ValueError(f"--sbatch_arg must be one long sbatch option like --constraint=a100, got {arg!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node  # type: ignore[operator]


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")



def time_limit_seconds(text: str) -> int:
    """Seconds of a SLURM ``--time`` value: ``30`` (minutes), ``30:00``, ``04:00:00``, ``1-12``, ``1-12:30:00``."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ValueError(f"--time must be a SLURM time like 30, 04:00:00 or 1-12:00:00, got {text!r}")
    days, a, b, c = match.groups()
    a, b, c = int(a), b and int(b), c and int(c)
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"--time must be positive, got {text!r}")
    return seconds



def _sbatch_value(line: str) -> tuple[str, str] | None:
    match = re.match(r"^#SBATCH\s+(--[a-z-]+)(?:[= ](.*))?$", line.strip())
    return (match.group(1), (match.group(2) or "").strip()) if match else None



def render(
    template: str,
    alloc: Allocation,
    *,
    configs: list[str],
    fit_args: list[str],
    log_dir: str,
    workdir: str,
    setup: str | None = None,
    align_cmd: str | None = None,
    template_name: str = "slurm/train.sbatch",
    signal: bool = True,
    array: int | None = None,
    exports: dict[str, str] | None = None,
) -> str:
    """The template with this submission's ``#SBATCH`` values and settings filled in.

    ``#SBATCH`` lines the allocation decides are rewritten in place (``--gpus_per_node``
    is dropped for 0 GPUs); partition, account, cpus per task, ``--chdir`` and the
    ``--sbatch_arg`` extras, then ``export`` lines for the config, the log folder and
    (when given) the setup and align command, and the ``align fit`` overrides, go at
    the ``# @align-submit@`` marker. ``signal=False`` for a template without ``--signal`` (the
    translate job: a killed task loses only its part), ``array=N`` adds ``--array=0-(N-1)`` with one
    log per task, ``exports`` more ``export`` lines (``configs`` may then be empty).

    Raises:
        ValueError: the template lacks the marker or a ``#SBATCH`` line this needs.
    """
    lines = template.splitlines()
    if not any(line.strip().startswith(MARKER) for line in lines):
        raise ValueError(f"{template_name}: no `{MARKER}` line: not an align training template (see slurm/train.sbatch)")
    values = {
        "--job-name": alloc.job_name or "align",
        "--nodes": str(alloc.nodes),
        "--ntasks-per-node": str(alloc.tasks_per_node),
        "--gpus-per-node": str(alloc.gpus_per_node),
        "--time": alloc.time,
        "--signal": f"B:USR1@{alloc.signal_lead}",
        "--output": f"{log_dir}/%x-%A_%a.out" if array else f"{log_dir}/%x-%j.out",
    }
    if not signal:
        del values["--signal"]
    seen, out = set(), []
    for line in lines:
        parsed = _sbatch_value(line)
        if parsed and parsed[0] in values:
            key = parsed[0]
            seen.add(key)
            if key == "--gpus-per-node" and alloc.gpus_per_node == 0:
                continue
            out.append(f"#SBATCH {key}={values[key]}")
        elif line.strip().startswith(MARKER):
            out.append(f"# rendered by align submit on {time.strftime('%Y-%m-%d %H:%M:%S')} from {template_name}")
            extra = [f"--chdir={workdir}"] + ([f"--array=0-{array - 1}"] if array else [])
            extra += [f"--partition={alloc.partition}"] if alloc.partition else []
            extra += [f"--account={alloc.account}"] if alloc.account else []
            extra += [f"--cpus-per-task={alloc.cpus_per_task}"] if alloc.cpus_per_task else []
            out += [f"#SBATCH {arg}" for arg in [*extra, *alloc.extra]]
            if configs:
                out.append(f"export ALIGN_CONFIG={shlex.quote(configs[0])}")
            out.append(f"export ALIGN_LOG_DIR={shlex.quote(log_dir)}")
            out += [f"export {key}={shlex.quote(value)}" for key, value in (exports or {}).items()]
            if setup:
                out.append(f"export ALIGN_SETUP={shlex.quote(setup)}")
            if align_cmd:
                out.append(f"export ALIGN_CMD={shlex.quote(align_cmd)}")
            args = [a for c in configs[1:] for a in ("--config", c)] + list(fit_args)
            if args:
                out.append(f'set -- {shlex.join(args)} "$@"')
        else:
            out.append(line)
    missing = sorted(set(values) - seen)
    if missing:
        raise ValueError(f"{template_name}: no #SBATCH line for {', '.join(missing)} to fill in")
    return "\n".join(out) + "\n"



def refuse(problems: list[str]) -> int:
    """Print each problem found before submitting as one ``align submit: error:`` line; exit status 2."""
    for problem in problems:
        print(f"align submit: error: {problem}", file=sys.stderr)
    print(f"align submit: {len(problems)} problem(s); nothing submitted", file=sys.stderr)
    return 2



def error(message: str) -> int:
    print(f"align submit: error: {message}", file=sys.stderr)
    return 2



def sbatch_script(script: str, path: Path, *options: str) -> str:
    """Save ``script`` at ``path`` (its folder is the log folder: created, SLURM does not) and sbatch it; the job id.

    Raises:
        RuntimeError: no sbatch on PATH, or sbatch refused the script (its message).
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError("sbatch not found on PATH: run this on a SLURM login node, or use --dry_run")
    path.parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder: a missing one fails the job
    path.write_text(script)
    result = subprocess.run([sbatch, "--parsable", *options, str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
