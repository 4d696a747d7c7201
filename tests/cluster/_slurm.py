"""A real SLURM (Debian's 22.05 packages) on one host acting as a two-node cluster.

:class:`LocalSlurm` writes a private ``slurm.conf`` (no munge: ``auth/none``;
no cgroups: ``proctrack/linuxproc``, ``task/none``) with two nodes that are
both this host, told apart by their slurmd ports, then starts ``slurmctld``
and one ``slurmd -N nodeK`` per node in the foreground (``-D``) as children of
this process: their pids are known from the start and :meth:`stop` ends
exactly those (and cancels every job of this cluster first, so no
``slurmstepd`` outlives it). Ports are picked free at start, so two clusters,
or another SLURM on the machine, do not collide. Clients find the cluster
through ``SLURM_CONF`` in :attr:`env`.

Node names ``node1``/``node2`` do not resolve on this host; batch scripts must
be given ``MASTER_ADDR=127.0.0.1`` (the tests pass it through the job's
environment; ``slurm/train.sbatch`` honours it).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests import _training as T

PACKAGES = ("slurmctld", "slurmd", "slurm-client")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (the reason is the message)."""


def ensure_installed(timeout: float = 300) -> None:
    """Install Debian's SLURM packages with apt-get when a binary is missing; raise SlurmUnavailable otherwise."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:  # a stale package index: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=timeout)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if result.returncode != 0 or missing:
        raise SlurmUnavailable(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}; missing {missing}): {result.stderr.strip()[-500:]}"
        )


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurm:
    """slurmctld + two slurmd on this host; ``with LocalSlurm(root) as cluster: ...`` starts and stops it.

    Args:
        root: private folder for the config, state, spool, logs and pid files.
        nodes: simulated nodes (``node1`` ...), each with ``cpus`` CPUs.
        partition: the one (default) partition's name.
    """

    def __init__(self, root: str | os.PathLike, nodes: int = 2, cpus: int = 1, partition: str = "debug") -> None:
        self.root = Path(root)
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, ...) of this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        for sub in ("state", "log", "pid"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=aligntest",
            # Job ids drive train.sbatch's default MASTER_PORT: a random start keeps two clusters on one
            # machine (two test sessions) from choosing the same port.
            f"FirstJobId={random.randint(1000, 60000)}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # A requeued job may start again only once its credential expired (cred_expire, default
            # 120 s): 5 s here keeps the requeue tests short; real clusters keep their default.
            "AuthInfo=cred_expire=5",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MinJobAge=600",  # keep finished jobs visible to scontrol for the tests' checks
            "KillWait=10",
            "InactiveLimit=0",
            # schedule pending jobs within seconds (defaults: 60 s main loop, 30 s backfill)
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/pid/slurmctld.pid",
            f"SlurmdPidFile={r}/pid/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN"
            )
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=60 State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> "LocalSlurm":
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        try:
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._run("scontrol", "ping").returncode == 0, timeout, "slurmctld to answer")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait(self._nodes_idle, timeout, f"nodes {self.nodes} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def _nodes_idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n, "").startswith("idle") for n in self.nodes)

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- jobs

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit with ``sbatch --parsable``; the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...); {} when unknown."""
        result = self._run("scontrol", "show", "job", "--oneliner", str(job_id))
        if result.returncode != 0:
            return {}
        fields = {}
        for token in result.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_job(self, job_id: int | str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                   "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                                   "DEADLINE", "PREEMPTED")) -> dict[str, str]:
        """Wait until the job reaches one of ``states``; its ``scontrol show job`` fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s (last: {info}):\n{self.logs()}")

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait until no job runs (their slurmstepd gone)."""
        self._run("scancel", "--full", "--partition", self.partition)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self._run("squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING,PENDING,REQUEUED,SUSPENDED",
                            "-o", "%i").stdout.split()
            if not out:
                return
            time.sleep(0.5)

    # -- teardown

    def stop(self, timeout: float = 20) -> None:
        """Cancel all jobs, then end the daemons this object started, by pid (SIGTERM, then SIGKILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (OSError, subprocess.SubprocessError):
                pass
        # slurmd first (they report to slurmctld on the way down), then the controller
        order = [n for n in self.procs if n != "slurmctld"] + [n for n in self.procs if n == "slurmctld"]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
        self.procs.clear()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- submitting the project's jobs


def job_env(cluster: LocalSlurm, **extra: str) -> dict[str, str]:
    """The environment a test submits with (sbatch exports it to the job).

    Offline, one thread per rank, this repository importable (the test-only
    ``tests._training.SlowDown`` callback), the cluster's ``SLURM_CONF`` (the
    job's own ``scontrol``/``scancel`` need it) and ``MASTER_ADDR=127.0.0.1``:
    the simulated node names do not resolve on this host.
    """
    bindir = str(Path(sys.executable).parent)
    env = T.align_env(SLURM_CONF=str(cluster.conf), MASTER_ADDR="127.0.0.1",
                      PATH=os.pathsep.join([bindir, os.environ.get("PATH", "")]))
    env.update(extra)
    return env


def submit(cluster: LocalSlurm, cwd: Path, *args: str, env: dict[str, str] | None = None) -> int:
    """``align submit ARGS`` in ``cwd``; the job id it printed."""
    result = subprocess.run([sys.executable, "-m", "alignment.cli", "submit", *args], cwd=cwd,
                            env=env or job_env(cluster), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"align submit failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout
    return int(match.group(1))


def job_logs(log_dir: Path, cluster: LocalSlurm | None = None, tail: int = 4000) -> str:
    """Every log under ``log_dir`` (batch and ranks), tails, for failure messages."""
    parts = []
    for path in sorted(Path(log_dir).glob("*.out")) + sorted(Path(log_dir).glob("*.log")):
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
    if cluster is not None:
        parts.append(cluster.logs(tail=1500))
    return "\n".join(parts)


def run_yaml(max_steps: int, rows_per_rank: int, slow_down: float | None = None) -> str:
    """The cluster tests' run config over ``configs/debug.yaml``: 2 nodes x 1 CPU task, DDP over gloo, export at
    the end; ``slow_down`` seconds of sleep after each step (``tests._training.SlowDown``)."""
    callbacks = (f"  callbacks:\n    - class_path: tests._training.SlowDown\n      init_args: {{seconds: {slow_down}}}\n"
                 if slow_down else "")
    return f"""\
trainer:
  num_nodes: 2
  devices: 1
  max_steps: {max_steps}
  val_check_interval: null
  limit_val_batches: 0
  strategy:
    class_path: lightning.pytorch.strategies.DDPStrategy
    init_args: {{process_group_backend: gloo}}
{callbacks}data:
  batch_size: {rows_per_rank}
  num_workers: 0
checkpoint:
  every_n_train_steps: 2
export:
  dir: runs/debug/export
"""


def submit_args(corpus: T.Corpus, *extra: str) -> list[str]:
    """``align submit`` flags for ``configs/debug.yaml`` + ``run.yaml`` (in the job's folder) on 2 CPU nodes,
    then the ``align fit`` overrides naming the generated corpus."""
    return ["--fit_config", str(T.DEBUG_YAML), "--fit_config", "run.yaml", "--nodes", "2", "--gpus_per_node", "0",
            "--time", "5", "--signal_lead", "60", "--align_cmd", f"{sys.executable} -m alignment.cli", "--",
            "--data.train_shards", str(corpus.shards), "--data.tokenizer", str(corpus.tokenizer),
            "--model.encoder.vocab_size", str(corpus.vocab_size), *extra]
