"""Output folders: who may replace what.

Every command that writes a folder (``align shards build|merge``, ``align export``)
publishes it with :mod:`alignment.fsutil` (written beside, renamed into place
when complete, recovered after a kill). This module holds the policy around that:

* :func:`check_replaceable`: ``--overwrite`` replaces only a folder the project
  wrote (recognised by its marker file: a shard ``manifest.json``, an export's
  ``alignment_encoder.json``) and never one that holds an input of the command;
* :func:`inside_folder`: whether a path lies inside a folder, symlinks followed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path


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

