"""One folder per run, and what a checkpoint records about the run that wrote it.

``trainer.default_root_dir`` is the run folder. Unless set explicitly, every
path of the run derives from it (:func:`derive_run_paths`, called by ``align
fit|validate|test`` before anything is built)::

    <run>/checkpoints/      --checkpoint.dirpath (last.ckpt, periodic checkpoints)
    <run>/export/           --export.dir (the end-of-fit export; "" turns it off)
    <run>/csv/, <run>/wandb/ every logger's save_dir
    <run>/wandb_run_id.txt  the wandb run id (a resumed or requeued run logs to the same wandb run)
    <run>/config.yaml       the full resolved config

The run folder's default is ``runs/<stem of the first --config>`` (:func:`default_run_dir`), so
each recipe has its own (``runs/xlm-roberta-base-multiway``); a config file or
``--trainer.default_root_dir`` overrides it.

Every checkpoint records the run's identity (:func:`describe_run`): model,
objective, languages, tokenizer, data (the rows and the sidecars the run reads:
:mod:`alignment.data.pins`). Resuming (``--ckpt_path``) refuses a
checkpoint whose identity differs from the new config (:func:`check_resume`),
naming both values; ``--warm_start CKPT`` deliberately starts a new run from
another run's encoder weights (no step, optimiser or data position).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

CKPT_RUN = "alignment_run"
TRAINING_RECORD = "alignment_training.json"
"""In an export: what the run trained on (languages with the pivot, objective, data, steps), for ``align eval``."""
IDENTITY = ("model", "objective", "languages", "tokenizer", "data")
_FLAGS = {
    "model": "--model.encoder.name_or_path",
    "objective": "--model.loss.objective",
    "languages": "--data.languages",
    "tokenizer": "--data.tokenizer",
    "data": "--data.train_shards",
}


class RunMismatchError(ValueError):
    """A checkpoint of another run was handed to ``--ckpt_path``."""


# --------------------------------------------------------------------------- paths


def _get(ns: Any, key: str, default: Any = None) -> Any:
    getter = getattr(ns, "get", None)
    return getter(key, default) if getter is not None else getattr(ns, key, default)


def _loggers(trainer_cfg: Any) -> list[Any]:
    loggers = _get(trainer_cfg, "logger")
    if loggers is None or isinstance(loggers, bool):
        return []
    return list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]


def _is_wandb(class_path: str) -> bool:
    return class_path.rsplit(".", 1)[-1] in ("WandbLogger", "ResumableWandbLogger")


def derive_run_paths(cfg: Any, subcommand: str | None = None) -> Path:
    """Fill every unset run path of a parsed ``align fit|validate|test`` config from its run folder.

    ``cfg`` is the subcommand's ``jsonargparse.Namespace`` (``trainer``,
    ``checkpoint``, ``export``...); it is changed in place. Under ``validate``
    and ``test`` a wandb logger writes a new run in the training run's group,
    with that job type, instead of appending to the training run. Returns the
    run folder.
    """
    from alignment.loggers import persistent_run_id

    trainer = cfg.trainer
    root = Path(_get(trainer, "default_root_dir") or os.getcwd())
    trainer.default_root_dir = str(root)
    checkpoint = _get(cfg, "checkpoint")
    if checkpoint is not None and not _get(checkpoint, "dirpath"):
        checkpoint.dirpath = str(root / "checkpoints")
    export = _get(cfg, "export")
    if export is not None and _get(export, "dir") is None:
        export.dir = str(root / "export") if subcommand in (None, "fit") else ""
    for logger in _loggers(trainer):
        init_args = _get(logger, "init_args")
        if init_args is None:
            continue
        if _get(init_args, "save_dir") is None:
            init_args.save_dir = str(root)
        if _is_wandb(str(_get(logger, "class_path", ""))):
            if _get(init_args, "name") is None:
                init_args.name = root.name
            if subcommand not in (None, "fit"):
                import uuid

                # A separate wandb run for the evaluation, grouped with the training run it evaluates.
                init_args.group = _get(init_args, "group") or persistent_run_id(init_args.save_dir)
                init_args.job_type = _get(init_args, "job_type") or subcommand
                init_args.id = _get(init_args, "id") or f"{subcommand}-{uuid.uuid4().hex[:8]}"
                init_args.name = f"{init_args.name}-{subcommand}"
        elif subcommand not in (None, "fit") and _get(init_args, "name") in (None, "csv", "lightning_logs"):
            init_args.name = subcommand  # <run>/validate/version_N, not the training run's csv/ folder
    return root


def default_run_dir(argv: list[str]) -> str | None:
    """``runs/<stem of the first --config file>``, the default run folder of an ``align fit`` command line."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg[len("--config="):] if arg.startswith("--config=") else None)
        if value:
            return f"runs/{Path(value).stem}"
    return None


def resolve_ckpt_path(ckpt_path: str | None, dirpath: str | None) -> Path | None:
    """The checkpoint ``--ckpt_path`` names, when it exists (``last``: ``<dirpath>/last.ckpt``)."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        if not dirpath:
            return None
        path = Path(dirpath) / "last.ckpt"
    elif ckpt_path in ("best", "hpc", "registry"):
        return None
    else:
        path = Path(ckpt_path)
    return path if path.exists() else None


# --------------------------------------------------------------------------- identity


def manifest_checksum(spec: Any) -> str | None:
    """sha256 of the ``manifest.json`` a shard spec names (the file, or the folder holding one); else None."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    path = Path(spec)
    if path.is_dir():
        path = path / "manifest.json"
    if not (path.is_file() and path.suffix == ".json"):
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_spec(spec: Any) -> Any:
    """A shard spec with local paths made absolute (so ``data/x`` and ``./data/x`` compare equal)."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return [_data_spec(s) for s in spec]
    text = str(spec)
    return text if "://" in text else os.path.abspath(text)


def describe_run(module: Any, trainer: Any = None, datamodule: Any = None) -> dict[str, Any]:
    """What a checkpoint and an export record about the run: identity, step, last evaluation, source.

    ``module`` is the ``AlignmentModule``; the data side comes from ``datamodule``
    (default: the trainer's). Before the datamodule is set up, the languages are
    the configured ones or the training manifest's.
    """
    from alignment.data.manifest import manifest_languages
    from alignment.data.pins import rows_checksum

    enc, loss = module.encoder_config, module.loss_config
    if datamodule is None and trainer is not None:
        datamodule = getattr(trainer, "datamodule", None)
    data = getattr(datamodule, "config", None)
    languages = None
    if datamodule is not None:
        try:
            languages = list(datamodule.languages)
        except (RuntimeError, AttributeError):
            configured = getattr(data, "languages", None)
            languages = list(configured) if configured else manifest_languages(getattr(data, "train_shards", None))
    spec = getattr(data, "train_shards", None)
    return {
        "model": enc.name_or_path,
        "objective": loss.objective,
        "languages": languages,
        "pivot": getattr(data, "pivot", None),
        "language_policy": getattr(data, "language_policy", None),
        "tokenizer": getattr(data, "tokenizer", None),
        "text_prefix": getattr(data, "text_prefix", ""),
        "data": _data_spec(spec),
        "data_manifest_sha256": manifest_checksum(spec),
        "data_rows_sha256": rows_checksum(spec),
        "data_sidecars": getattr(datamodule, "sidecar_pins", None),
        "global_step": int(getattr(trainer, "global_step", 0) or 0) if trainer is not None else None,
        "last_eval": dict(getattr(module, "last_eval", {}) or {}),
        "source": dict(getattr(module.encoder, "card_extra", {}) or {}),
    }


def _data_differs(saved: dict, current: dict) -> tuple[Any, Any] | None:
    """``(checkpoint, config)`` values of ``data`` when the training rows differ, else None: the paths, then the
    rows checksum (sidecar sections left out), or for a checkpoint that records only the whole manifest's
    sha256 (written before the split) that checksum against the manifest as it is or was before sidecars."""
    from alignment.data.pins import legacy_checksum_matches

    a, b = saved.get("data"), current.get("data")
    if a != b:
        return a, b
    ra, rb = saved.get("data_rows_sha256"), current.get("data_rows_sha256")
    if ra and rb:
        return None if ra == rb else (f"{a} (rows sha256 {ra[:12]})", f"{b} (rows sha256 {rb[:12]})")
    sa = saved.get("data_manifest_sha256")
    if sa and current.get("data_manifest_sha256") and not legacy_checksum_matches(sa, b):
        return (f"{a} (manifest sha256 {sa[:12]})",
                f"{b} (manifest sha256 {current['data_manifest_sha256'][:12]}, and no earlier state of it without "
                "some sidecar entries matches)")
    return None


def _differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    out = []
    for key in IDENTITY:
        a, b = saved.get(key), current.get(key)
        if key == "data":
            differs = _data_differs(saved, current)
            if differs:
                out.append((key, *differs))
            continue
        if a is None or b is None:  # unknown on one side (e.g. languages before set-up): nothing to compare
            continue
        if a != b:
            out.append((key, a, b))
    return out


def check_resume(checkpoint: dict, current: dict, ckpt_name: str = "the checkpoint") -> None:
    """Refuse to resume a checkpoint written by a different run (model, objective, languages, tokenizer, data).

    A checkpoint that records nothing (written before this check existed) is
    resumed with a warning.
    """
    saved = checkpoint.get(CKPT_RUN)
    if not saved:
        warnings.warn(f"{ckpt_name} records no run identity: resuming without checking that it is this run's",
                      stacklevel=2)
        return
    from alignment.data.pins import legacy_sidecar_changes, sidecar_changes

    diffs = _differences(saved, current)
    if diffs:
        lines = "; ".join(f"{_FLAGS[k]}: checkpoint {a!r}, config {b!r}" for k, a, b in diffs)
        raise RunMismatchError(
            f"refusing to resume {ckpt_name}: it belongs to another run ({lines}). Give this run its own folder "
            "(--trainer.default_root_dir runs/NAME), or start it deliberately from those weights with "
            "--warm_start CKPT (weights only: no step, optimiser or data position)"
        )
    changed = sidecar_changes(saved.get("data_sidecars"), current.get("data_sidecars"), current.get("data"))
    if "data_sidecars" not in saved and saved.get("data_manifest_sha256"):  # written before the pins
        changed += legacy_sidecar_changes(saved["data_manifest_sha256"], current.get("data_sidecars"),
                                          current.get("data"))
    if changed:
        raise RunMismatchError(f"refusing to resume {ckpt_name}: its rows would differ: {'; '.join(changed)}")


def check_resume_file(path: Path, current: dict) -> None:
    """:func:`check_resume` on a ``.ckpt`` file before anything is built or logged (memory-mapped: cheap).
    A DeepSpeed folder is checked later, when Lightning loads it."""
    if not path.is_file():
        return
    import torch

    try:  # tensors and plain containers only: a checkpoint is data, never code
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "objects beyond tensors and plain containers"
        raise ValueError(f"--ckpt_path {path}: refusing to load it: unpickling it would need {what}, which can run "
                         "code (load only checkpoints from sources you trust)") from None
    check_resume(ckpt, current, str(path))


# --------------------------------------------------------------------------- warm start


def load_warm_start(module: Any, path: str | os.PathLike) -> int:
    """Load another run's encoder weights (``--warm_start CKPT``) into ``module.encoder``; returns its step.

    Only weights: the new run starts at step 0 with a fresh optimiser, schedule
    and data position. The encoder architecture must match (strict load). A checkpoint holding only the
    adapters (``--model.encoder.adapter.checkpoint_adapter_only``) loads them onto the base this run built
    from --model.encoder.name_or_path, as at training; its adapter config must equal this run's.
    """
    from alignment.loading import load_checkpoint_file

    ckpt = load_checkpoint_file(path)
    state = {k[len("encoder."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("encoder.")}
    if not state:
        raise ValueError(f"--warm_start {path}: no encoder weights in it (not a multiway-align checkpoint)")
    adapter_only = _check_warm_adapters(module, ckpt, path)
    missing, unexpected = module.encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".pooler." not in f".{k}"]
    if adapter_only:  # the frozen base is this run's, loaded from --model.encoder.name_or_path
        trainable = {n for n, p in module.encoder.named_parameters() if p.requires_grad}
        missing = [k for k in missing if k in trainable]
    if missing or unexpected:
        raise ValueError(f"--warm_start {path}: its encoder does not match --model.encoder "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return int(ckpt.get("global_step") or 0)


WARM_ADAPTER_FIELDS = ("method", "r", "alpha", "target_modules", "language_groups")
"""Adapter settings a warm start from an adapter-only checkpoint must share with the new run."""


def _check_warm_adapters(module: Any, ckpt: dict, path: str | os.PathLike) -> bool:
    """Whether ``ckpt`` holds only adapters; refuses one whose adapter config differs from this run's."""
    from alignment.adapters import ADAPTER_ONLY, as_config

    if not ckpt.get(ADAPTER_ONLY):
        return False
    enc = (ckpt.get("hyper_parameters") or {}).get("encoder") or {}
    saved, current = as_config(enc.get("adapter")), module.encoder_config.adapter
    diffs = [f"--model.encoder.adapter.{f}: checkpoint {getattr(saved, f)!r}, config {getattr(current, f)!r}"
             for f in WARM_ADAPTER_FIELDS if getattr(saved, f) != getattr(current, f)]
    if diffs:
        raise ValueError(f"--warm_start {path} holds only adapters (--model.encoder.adapter.checkpoint_adapter_only), "
                         f"and they do not fit this run's: {'; '.join(diffs)}. Use the checkpoint's adapter settings")
    base = enc.get("name_or_path")
    if base and base != module.encoder_config.name_or_path:
        warnings.warn(f"--warm_start {path}: its adapters were trained on {base!r}; this run's base is "
                      f"--model.encoder.name_or_path {module.encoder_config.name_or_path!r}", stacklevel=3)
    return True


# --------------------------------------------------------------------------- what a model was trained on


def training_record(run: dict[str, Any]) -> dict[str, Any]:
    """The part of a run description an export keeps in :data:`TRAINING_RECORD`."""
    keys = ("model", "objective", "languages", "pivot", "language_policy", "data", "data_manifest_sha256",
            "data_rows_sha256", "global_step")
    return {k: run.get(k) for k in keys}


def recorded_training(spec: str | os.PathLike) -> tuple[dict[str, Any], str] | None:
    """``(record, where)`` of what the model at ``spec`` was trained on, when it records it: an export
    folder's :data:`TRAINING_RECORD`, or a Lightning checkpoint's run description. None otherwise."""
    import json

    path = Path(spec)
    if path.is_dir() and (path / TRAINING_RECORD).is_file():
        return json.loads((path / TRAINING_RECORD).read_text()), str(path / TRAINING_RECORD)
    if path.is_file():
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # data, never code
        except Exception:  # noqa: BLE001  (not a checkpoint: the loader reports that, not this)
            return None
        if isinstance(ckpt, dict) and ckpt.get(CKPT_RUN):
            return training_record(ckpt[CKPT_RUN]), f"{path} (checkpoint)"
    return None
