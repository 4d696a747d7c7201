"""Loggers: wandb (offline unless configured) with a run id that survives resumes and requeues."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger

RUN_ID_FILE = "wandb_run_id.txt"


def wandb_mode() -> str:
    """``online`` only when the user configured it (WANDB_MODE=online or an API key), else ``offline``."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def persistent_run_id(save_dir: str | os.PathLike) -> str:
    """The run id stored in ``save_dir`` (created once): a requeued or resumed job logs to the same run."""
    path = Path(save_dir) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            with open(path, "x") as fh:  # exclusive create: the first process wins
                fh.write(uuid.uuid4().hex[:12] + "\n")
        except FileExistsError:
            pass
    return path.read_text().strip()


class ResumableWandbLogger(WandbLogger):
    """``WandbLogger`` whose run id is kept in ``save_dir`` and reused with ``resume="allow"``.

    Lightning only creates the experiment on rank 0, so only rank 0 talks to wandb.
    """

    def __init__(self, save_dir: str | None = None, project: str = "multiway-align", name: str | None = None,
                 id: str | None = None, **kwargs) -> None:
        """``save_dir``: the run folder (``align fit`` fills it from ``--trainer.default_root_dir``; default
        the current directory); its ``wandb_run_id.txt`` keeps the run id across resumes."""
        save_dir = save_dir or "."
        run_id = id or persistent_run_id(save_dir)
        # Lightning's own ``offline=True`` sets WANDB_MODE=dryrun, which wandb 0.31 no
        # longer honours (it then asks for a login): pass the mode to wandb.init instead.
        # (jsonargparse passes every wandb.init argument, None when unset.)
        if kwargs.get("mode") is None:
            kwargs["mode"] = wandb_mode()
        if kwargs.get("resume") is None:
            kwargs["resume"] = "allow"
        super().__init__(save_dir=save_dir, project=project, name=name, id=run_id, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns that the (deprecated) setting was passed
            self._wandb_init.pop("anonymous", None)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``save_dir`` may be left out: ``align fit`` fills it with the run folder
    (``--trainer.default_root_dir``); metrics go to ``<run>/<name>/version_N/metrics.csv``."""

    def __init__(self, save_dir: str | None = None, name: str | None = "csv", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir or ".", name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
