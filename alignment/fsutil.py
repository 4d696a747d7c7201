"""Publishing files and folders atomically: the one implementation every writer uses.

A reader (a resume, a loader, a merge) must see the old version of a file or
folder or the new one, never a torn one, also after a kill or a power loss.
Every publish here:

* **writes beside** the target, under ``.<name>.partial-<id>`` in the same
  folder (the same file system, so the final rename is atomic);
* **fsyncs** what it wrote (each file, then the folders) before the rename,
  and the parent folder after it, so the rename itself survives a crash
  (cost: one fsync per file plus one per folder);
* **honours the umask**: ``mkstemp``/``mkdtemp``-style creation and
  safetensors give 0600/0700; published files get ``0o666 & ~umask``, folders
  ``0o777 & ~umask`` (executable bits of a file are kept), as a plain
  ``open``/``mkdir`` would;
* **rolls back on failure**: a temporary is removed, and a folder being
  replaced is first moved aside to ``.<name>.old-<id>`` and only deleted once
  the new one is in place (it is put back when the rename fails);
* is **recovered** at the next start by :func:`recover` / :func:`recover_in`:
  an aside whose target is missing (a kill between the two renames) is
  restored, and temporaries no live writer holds are deleted.

A folder build holds an ``fcntl`` lock on ``.<name>.partial-<id>.lock`` while
it runs, so :func:`recover` never deletes a live build (of this or another
process on a file system with working ``flock``); a temporary without a lock
(a file, a collective checkpoint folder) counts as stale only once older than
``grace_s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TEMP_TAG, ASIDE_TAG, LOCK_SUFFIX = "partial", "old", ".lock"
GRACE_S = 120.0
"""A temporary without a lock file is stale only when older than this (its writer may have begun a moment ago)."""
_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{TEMP_TAG}|{ASIDE_TAG})-(?P<id>[A-Za-z0-9_]+)(?P<lock>{LOCK_SUFFIX})?$")


def temp_path(path: str | os.PathLike, token: str | None = None) -> Path:
    """The temporary sibling ``.<name>.partial-<token>`` of ``path`` (a random token unless given).

    Give a ``token`` where several processes must write the same temporary (a collective checkpoint).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{TEMP_TAG}-{token or uuid.uuid4().hex[:8]}")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` and, for a folder, everything under it the mode plain ``open``/``mkdir`` would."""
    umask, root = current_umask(), Path(path)
    for item in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if item.is_symlink():
            continue
        if item.is_dir():
            item.chmod(0o777 & ~umask)
        else:
            item.chmod((0o777 if item.stat().st_mode & 0o111 else 0o666) & ~umask)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes the renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under ``root``, then every folder, deepest first."""
    root = Path(root)
    if not root.is_dir():
        fsync_path(root)
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit(temp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished ``temp`` (file or folder) onto ``path``: fsync, umask, rename, fsync the parent.

    A file replaces ``path`` in one ``os.replace``. A folder cannot be swapped
    atomically: an existing ``path`` (an empty folder is simply removed) is
    renamed to ``.<name>.old-<id>``, ``temp`` renamed in, and the aside deleted
    only then; if the second rename fails the aside is put back. A kill between
    the two renames leaves the aside complete for :func:`recover`.
    """
    temp, path = Path(temp), Path(path)
    apply_umask(temp)
    fsync_tree(temp)
    if not temp.is_dir():
        os.replace(temp, path)
    elif path.is_dir() and not path.is_symlink() and any(path.iterdir()):
        aside = path.with_name(f".{path.name}.{ASIDE_TAG}-{uuid.uuid4().hex[:8]}")
        os.rename(path, aside)
        try:
            os.rename(temp, path)
        except BaseException:
            os.rename(aside, path)
            raise
        fsync_path(path.parent)
        _remove(aside)
    else:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.rename(temp, path)  # fails (never merges) if a non-empty folder appeared meanwhile
    fsync_path(path.parent)


class AtomicFile:
    """A file written under its temporary name and published by :meth:`commit` (or dropped by :meth:`abort`).

    For writers that keep a file open across many calls (a shard writer);
    otherwise use :func:`publishing` or :func:`publish_file`.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> None:
        if mode not in ("w", "wb"):
            raise ValueError(f"AtomicFile writes a new file: mode 'w' or 'wb', not {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = temp_path(self.path)
        self.file: IO = open(self.temp, mode, encoding=encoding if mode == "w" else None)

    def commit(self) -> Path:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:
            commit(self.temp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


@contextlib.contextmanager
def publishing(path: str | os.PathLike, mode: str = "wb", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yield a file open on ``path``'s temporary; publish it when the block ends, drop it on an exception."""
    atomic = AtomicFile(path, mode, encoding)
    try:
        yield atomic.file
    except BaseException:
        atomic.abort()
        raise
    atomic.commit()


def publish_file(path: str | os.PathLike, content: bytes | str | Callable[[IO], object]) -> Path:
    """Publish ``content`` (bytes, UTF-8 text, or a function writing to a binary file) as ``path``."""
    with publishing(path, "w" if isinstance(content, str) else "wb") as fh:
        content(fh) if callable(content) else fh.write(content)
    return Path(path)


@contextlib.contextmanager
def building(path: str | os.PathLike) -> Iterator[Path]:
    """Create ``path``'s temporary folder and hold its lock while the block runs; remove what is left at exit.

    The caller publishes it with :func:`commit` inside the block (to publish at a point of its
    choosing); :func:`publish_folder` does that on a normal exit.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path(path)
    lock_path = staging.with_name(staging.name + LOCK_SUFFIX)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            staging.mkdir()
            yield staging
        finally:
            _remove(staging)
            lock_path.unlink(missing_ok=True)


@contextlib.contextmanager
def publish_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; on a normal exit publish it as ``path`` (:func:`commit`).

    On an exception the staging folder is removed and ``path`` (old content included) is untouched.
    """
    with building(path) as staging:
        yield staging
        commit(staging, path)


def _held(lock_path: Path) -> bool:
    """Another live process holds this lock file (false when it cannot be opened)."""
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


def recover(path: str | os.PathLike, *, grace_s: float = GRACE_S) -> list[str]:
    """Finish or undo what an interrupted publish of ``path`` left; returns what it did.

    An aside ``.<name>.old-*`` is restored when ``path`` is missing and deleted otherwise;
    a temporary ``.<name>.partial-*`` is deleted unless its lock is held by a live writer
    or, without a lock, it is younger than ``grace_s`` (pass 0 where no writer can be running).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    actions = []
    for item in sorted(path.parent.iterdir()):
        match = _LEFTOVER.match(item.name)
        if not match or match["name"] != path.name:
            continue
        if match["tag"] == ASIDE_TAG and not match["lock"]:
            if path.exists() or path.is_symlink():
                _remove(item)
                actions.append(f"removed {item.name}")
            else:
                os.rename(item, path)
                actions.append(f"restored {path.name} from {item.name}")
        elif match["tag"] == TEMP_TAG and not match["lock"]:
            lock_path = item.with_name(item.name + LOCK_SUFFIX)
            if lock_path.exists():
                if _held(lock_path):
                    continue
            elif time.time() - item.lstat().st_mtime < grace_s:
                continue
            _remove(item)
            lock_path.unlink(missing_ok=True)
            actions.append(f"removed {item.name}")
        elif match["lock"] and not item.with_name(item.name[: -len(LOCK_SUFFIX)]).exists() and not _held(item):
            item.unlink(missing_ok=True)  # a lock whose build folder is gone
    if actions:
        fsync_path(path.parent)
    return actions


def recover_in(folder: str | os.PathLike, *, grace_s: float = GRACE_S) -> list[str]:
    """:func:`recover` every target in ``folder`` that has leftovers (a checkpoint folder, a parts folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted({m["name"] for item in folder.iterdir() if (m := _LEFTOVER.match(item.name))})
    return [action for name in names for action in recover(folder / name, grace_s=grace_s)]
