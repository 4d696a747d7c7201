"""Output folders written beside their final name: who may replace what, and what a killed build leaves.

Every command that writes a folder (``align shards build|merge``, ``align export``)
writes it under a hidden sibling name and renames it into place when complete.
This module holds the rules around that:

* :func:`check_replaceable`: ``--overwrite`` replaces only a folder the project
  wrote (recognised by its marker file: a shard ``manifest.json``, an export's
  ``alignment_encoder.json``) and never one that holds an input of the command;
* :func:`building_dir`: the hidden build folder, with a lock held while the
  build runs (``.<name>.building-<id>.lock`` beside it);
* :func:`clean_stale`: at the next build, the build folders whose builder is
  gone (a killed build's ``.<name>.building-*``, and ``.<name>.old-*`` once the
  new folder is in place) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

LOCK_SUFFIX = ".lock"
UNLOCKED_GRACE_S = 120.0
"""A build folder without a lock file is stale only when older than this (it may have been created a moment ago)."""


def inside_folder(path: Path, folder: Path) -> bool:
    """``path`` (symlinks followed) lies inside ``folder`` (symlinks followed)."""
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def check_replaceable(
    out: Path,
    *,
    overwrite: bool,
    flag: str,
    is_ours: Callable[[Path], bool],
    what: str,
    inputs: Iterable[Path] = (),
) -> None:
    """Refuse to write ``out`` where that could lose something not written by the project.

    Raises:
        FileExistsError: ``out`` is a file; ``out`` is non-empty and ``overwrite`` is off;
            ``overwrite`` is on but ``out`` is not ``what`` (``is_ours`` is false), or it
            holds one of ``inputs`` (each message names ``flag`` and the path).
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{flag} {out} is a file; choose a directory path")
    for item in inputs:
        if out.exists() and inside_folder(Path(item), out):
            raise FileExistsError(
                f"{flag} {out} holds the input {item}: writing there would delete it; choose another {flag}"
            )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{flag} {out} already exists and is not empty; pass --overwrite to replace it "
            f"(the old folder is replaced only after the new one is complete) or choose another {flag}"
        )
    if not is_ours(out):
        raise FileExistsError(
            f"{flag} {out} is not {what}, so --overwrite will not delete it; choose another {flag} "
            "or remove the folder yourself"
        )


@contextlib.contextmanager
def building_dir(out: Path, tag: str = "building") -> Iterator[Path]:
    """Create ``.<out.name>.<tag>-<id>`` beside ``out`` and hold its lock while the block runs.

    The folder is the caller's to fill and rename; whatever is left of it when the block
    exits (an error, or not renamed) is removed, and the lock file with it.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"
    lock_path = staging.with_name(staging.name + LOCK_SUFFIX)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            staging.mkdir()
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock_path.unlink()


def _held(lock_path: Path) -> bool:
    """Another live process holds this lock file (always false when it cannot be opened)."""
    try:
        with open(lock_path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def clean_stale(out: Path, tag: str = "building") -> list[Path]:
    """Remove the build folders of ``out`` that no live build owns; returns what was removed.

    ``.<name>.<tag>-*`` whose lock is not held (or, without a lock file, older than
    :data:`UNLOCKED_GRACE_S`: a build of an older version); ``.<name>.old-*`` only
    when ``out`` itself exists (otherwise an ``.old`` folder may be the only copy).
    """
    parent = out.parent
    if not parent.is_dir():
        return []
    removed = []
    for path in sorted(parent.glob(f".{glob.escape(out.name)}.{tag}-*")):
        if path.name.endswith(LOCK_SUFFIX) or not path.is_dir() or path.is_symlink():
            continue
        lock_path = path.with_name(path.name + LOCK_SUFFIX)
        if lock_path.exists():
            if _held(lock_path):
                continue
        elif time.time() - path.stat().st_mtime < UNLOCKED_GRACE_S:
            continue
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock_path.unlink()
        removed.append(path)
    if out.is_dir():
        for path in sorted(parent.glob(f".{glob.escape(out.name)}.old-*")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    for lock_path in parent.glob(f".{glob.escape(out.name)}.{tag}-*{LOCK_SUFFIX}"):  # locks whose folder is gone
        folder = lock_path.with_name(lock_path.name[: -len(LOCK_SUFFIX)])
        if not folder.exists() and not _held(lock_path):
            with contextlib.suppress(OSError):
                lock_path.unlink()
    return removed


def replace_dir(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` to ``out``; an existing ``out`` is moved aside and removed only then."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(staging, out)  # fails (never merges) if someone created a non-empty out meanwhile
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
