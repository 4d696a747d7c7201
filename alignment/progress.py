"""Progress of long loops (``align shards build/merge/verify``) that a person can read, on a terminal and in
a SLURM ``.out`` file: a tqdm bar on a terminal, a plain line every ``ALIGN_PROGRESS_SECONDS`` (default 30)
otherwise, so a batch log shows the work moving without carriage-return noise. No Lightning import here
(the shard commands stay quick to start); the training-side lines are in :mod:`alignment.train_logging`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")


def _interval() -> float:
    try:
        return max(float(os.environ.get("ALIGN_PROGRESS_SECONDS", "30")), 0.0)
    except ValueError:
        return 30.0


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


def progress(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it",
             stream: Any = None) -> Iterator[T]:
    """``items``, reporting progress on ``stream`` (default stderr): tqdm on a terminal, periodic lines otherwise.

    The lines name the step (``desc``), the count (of ``total`` when known), the rate and the elapsed time;
    a last line is printed when the loop ends.
    """
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, file=stream)
        return
    start = last = time.monotonic()
    every, count = _interval(), 0

    def line(now: float) -> None:
        of = f"/{total}" if total is not None else ""
        rate = count / max(now - start, 1e-9)
        print(f"[{desc}] {count}{of} {unit}s, {rate:.0f} {unit}/s, elapsed {_clock(now - start)}", file=stream,
              flush=True)

    for item in items:
        yield item
        count += 1
        now = time.monotonic()
        if now - last >= every:
            line(now)
            last = now
    line(time.monotonic())
