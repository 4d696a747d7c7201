"""Run a function on every rank of a real gloo process group on CPU.

``run_world(fn, world_size, *args)`` starts ``world_size`` processes,
initialises ``torch.distributed`` over TCP on a free port chosen at run time
and calls ``fn(rank, world_size, *args)`` on each. A rank that raises fails the
call with its traceback; a world that does not finish in ``timeout`` seconds
(a collective hang) is killed and raises ``TimeoutError``, so a bug shows up
as a failed test, never as a stuck test session.

Processes come from a ``forkserver``: one clean process (it never ran torch
code, so no OpenMP or gloo threads exist to break a fork) imports the
``preload`` modules once, and every rank is forked from it. Importing torch,
torch._dynamo (DDP imports it) and transformers costs about 6 s of CPU per
process; paying it once instead of once per rank keeps the distributed tests
within their time budget on 2 cores. Plain ``fork`` of the test process is
not safe (it has run torch code); ``spawn`` would re-import everything per rank.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free right now (a tiny race with other processes is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)  # world_size processes share 2 cores
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),  # a mismatched collective errors out instead of hanging forever
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_world(fn, world_size: int, *args, timeout: float = 120.0, preload: tuple[str, ...] = ()) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise on any failure.

    ``preload``: modules the forkserver imports once for all ranks (e.g. the
    module defining ``fn``). The preload list is fixed when the forkserver
    first starts, for the rest of the session.
    """
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch._dynamo", *preload])
    context = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"world of {world_size} ranks did not finish in {timeout:.0f} s (a collective hang?)"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
