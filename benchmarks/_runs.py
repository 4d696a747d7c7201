"""What the benchmarks that train and evaluate through the CLI share: ``align`` in a subprocess, the run's
paths and flags, ``align eval``'s numbers grouped by language pair, and the monolingual structure check.

Used by ``benchmarks/ablation.py`` and ``benchmarks/demo_seeds.py`` (imported as ``from _runs import ...``,
``benchmarks/`` on ``sys.path`` as for :mod:`_common`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

ALIGN = [sys.executable, "-m", "alignment.cli"]
GROUPS = {"all": "all pairs", "trained": "trained ↔ trained", "x_y": "X ↔ Y (trained, no pivot)",
          "unseen": "unseen ↔ unseen", "mixed": "trained ↔ unseen"}  # fmt: skip


def run_align(argv: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """``align ARGV`` in a subprocess (output to ``log_path``): ``{"wall_s", "cpu_s"}`` (CPU: the children's user +
    system seconds); raises RuntimeError with the log's tail on failure."""
    before, start = os.times(), time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run([*ALIGN, *argv], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    after = os.times()
    if rc:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"align {shlex.join(argv)} failed (exit {rc}); log {log_path}:\n{tail}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1)}


def fit_args(config: str, run_dir: Path, *, seed: int, steps: int | None, freeze_layers: int | None,
             flags: Sequence[str], extra: Sequence[str]) -> list[str]:  # fmt: skip
    """``align fit`` of one run: the demo config, a paths file like scripts/demo.sh's, then budget and arm flags.

    Validation during training and checkpoints are off (the held-out evaluation runs on the export);
    a CSV log records every step.
    """
    logger = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "csv"}}
    ]
    budget = ["--trainer.max_steps", str(steps)] if steps else []
    budget += ["--model.encoder.freeze_layers", str(freeze_layers)] if freeze_layers is not None else []
    return ["fit", "--config", config, "--config", str(run_dir / "paths.yaml"), "--seed_everything", str(seed),
            "--data.seed", str(seed), *budget, "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", json.dumps(logger),
            "--data.val_shards", "null", "--checkpoint.every_n_train_steps", "0", "--checkpoint.save_last", "false",
            *flags, *extra]  # fmt: skip


def write_paths(run_dir: Path, encoder: Path, shards: Path) -> None:
    """Where the run reads and writes, as scripts/demo.sh's ``paths.yaml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"trainer": {"default_root_dir": str(run_dir)}, "model": {"encoder": {"name_or_path": str(encoder)}},
             "data": {"train_shards": str(shards), "tokenizer": str(encoder)},
             "export": {"dir": str(run_dir / "export")}, "checkpoint": {"dirpath": str(run_dir / "checkpoints")}}  # fmt: skip
    (run_dir / "paths.yaml").write_text(yaml.safe_dump(paths))


def eval_args(
    model: Path, data: str, out: Path, trained: Sequence[str], max_rows: int | None, languages: Sequence[str] | None
) -> list[str]:
    argv = ["eval", "--model", str(model), "--data", data, "--train_languages", ",".join(trained),
            "--out", str(out), "--encode.quiet", "true"]  # fmt: skip
    argv += ["--max_rows", str(max_rows)] if max_rows else []
    return argv + (["--languages", ",".join(languages)] if languages else [])


TRAIN_LOG = {"train/loss": "train_loss", "train/adv_accuracy": "disc_acc", "train/rows": "rows_per_step",
             "train/masked_negatives": "masked_negatives"}  # fmt: skip


def train_log(metrics_csv: Path, last: int = 5) -> dict:
    """Means of the last ``last`` logged steps of :data:`TRAIN_LOG` (rows per step, masked negatives: all steps)."""
    rows = list(csv.DictReader(open(metrics_csv))) if metrics_csv.exists() else []
    out = {}
    for key, name in TRAIN_LOG.items():
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        vals = vals if name in ("rows_per_step", "masked_negatives") else vals[-last:]
        out[name] = statistics.fmean(vals) if vals else None
    return out


def resolved_budget(config_yaml: Path) -> dict | None:
    """What a run trained with, from the config ``align fit`` saved in its run folder (None when absent)."""
    if not config_yaml.exists():
        return None
    c = yaml.safe_load(config_yaml.read_text())
    enc, data, optim = c["model"]["encoder"], c["data"], c["model"]["optim"]
    return {"max_steps": c["trainer"]["max_steps"], "batch_size": data["batch_size"], "max_length": data["max_length"],
            "freeze_layers": enc.get("freeze_layers"), "freeze_embeddings": enc.get("freeze_embeddings"),
            "lr": optim.get("lr"), "warmup_steps": optim.get("warmup_steps"), "languages": data.get("languages")}  # fmt: skip


def describe_budget(resolved: dict | None, max_rows: int | None, fit_args: str) -> str:
    """One line: the training budget as the runs resolved it, and the evaluation's size."""
    rows = f"evaluation on {'the first ' + str(max_rows) if max_rows else 'all'} held-out rows"
    if not resolved:
        return rows
    r = resolved
    return (f"{r['max_steps']} steps of {r['batch_size']} rows (all {len(r['languages'] or [])} training languages per row), "
            f"max_length {r['max_length']}, lr {r['lr']} (warm-up {r['warmup_steps']} steps), lower {r['freeze_layers']} "
            f"layers frozen, embeddings frozen: {r['freeze_embeddings']}; {rows}"
            + (f"; extra fit flags `{fit_args}`" if fit_args else ""))  # fmt: skip


# --------------------------------------------------------------------------- evaluation


def pair_groups(src: str, tgt: str, trained: Sequence[str], pivot: str) -> list[str]:
    """The :data:`GROUPS` an ordered evaluation pair belongs to."""
    seen = (src in trained) + (tgt in trained)
    groups = ["all", {2: "trained", 1: "mixed", 0: "unseen"}[seen]]
    return groups + (["x_y"] if seen == 2 and pivot not in (src, tgt) else [])


def summarize_eval(metrics: dict, trained: Sequence[str], pivot: str = "en") -> dict[str, float | None]:
    """``acc/<group>``, ``xsim/<group>`` means and ``lang_id_acc`` of one ``align eval`` ``metrics.json``."""
    acc: dict[str, list[float]] = {g: [] for g in GROUPS}
    xsim: dict[str, list[float]] = {g: [] for g in GROUPS}
    for pair in metrics["retrieval"]["pairs"]:
        for g in pair_groups(pair["src"], pair["tgt"], trained, pivot):
            acc[g].append(pair["accuracy"])
            xsim[g].append(pair["xsim_error"])
    out: dict[str, float | None] = {f"acc/{g}": statistics.fmean(v) if v else None for g, v in acc.items()}
    out.update({f"xsim/{g}": statistics.fmean(v) if v else None for g, v in xsim.items()})
    out["lang_id_acc"] = metrics["metrics"].get("lang_id_acc")
    return out


def _ranks(x):
    import numpy as np

    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    return ranks  # continuous similarities: ties have measure zero


def structure_spearman(start, trained) -> float:
    """Spearman correlation of the within-language pairwise cosine similarities of two embeddings of the same sentences.

    Args:
        start, trained: ``(n, D)`` and ``(n, D')`` embeddings of the same ``n`` sentences (one language), any norm.

    Returns: Spearman's rho over the ``n (n - 1) / 2`` unordered pairs (NaN when ``n < 3``).
    """
    import numpy as np

    def sims(x):
        x = np.asarray(x, dtype=np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        iu = np.triu_indices(len(x), k=1)
        return (x @ x.T)[iu]

    if len(start) != len(trained):
        raise ValueError(f"structure_spearman: {len(start)} vs {len(trained)} sentences")
    if len(start) < 3:
        return float("nan")
    a, b = _ranks(sims(start)), _ranks(sims(trained))
    return float(np.corrcoef(a, b)[0, 1])


def embed_by_language(model_dir: Path, data: str, max_rows: int | None, languages: Sequence[str] | None) -> dict:
    """Per language, the embeddings of the evaluation sentences as ``align eval`` encodes them (its loader, its
    prefix; a Router export, e.g. ``align fit-map --export``'s, through the language's route: ``task=<language>``)."""
    from alignment.evaluate.encode import EncodeConfig, encode_texts, resolve_prefix
    from alignment.evaluate.encoder import load_encoder
    from alignment.evaluate.readers import load_eval_data

    rows = load_eval_data(data, languages=languages, max_rows=max_rows).rows
    model, tokenizer, info = load_encoder(str(model_dir))
    prefix = resolve_prefix(info, None)
    texts: dict[str, list[str]] = {}
    for row in rows:
        for lang, text in row.texts.items():
            texts.setdefault(lang, []).append(text)
    cfg = EncodeConfig(quiet=True)
    return {lang: encode_texts(model, tokenizer, t, cfg, prefix=prefix, language=lang).numpy()
            for lang, t in sorted(texts.items())}  # fmt: skip


def monolingual(start: dict, trained: dict, trained_langs: Sequence[str]) -> dict[str, float | None]:
    """``mono/<lang>`` for every language, and the means ``mono/trained``, ``mono/unseen``, ``mono/all``."""
    per = {lang: structure_spearman(start[lang], trained[lang]) for lang in start}
    per = {k: v for k, v in per.items() if not math.isnan(v)}
    out: dict[str, float | None] = {f"mono/lang/{k}": v for k, v in per.items()}
    for group, keep in (("all", lambda k: True), ("trained", lambda k: k in trained_langs),
                        ("unseen", lambda k: k not in trained_langs)):  # fmt: skip
        vals = [v for k, v in per.items() if keep(k)]
        out[f"mono/{group}"] = statistics.fmean(vals) if vals else None
    return out


def stats(values: Sequence[float | None]) -> dict:
    """Mean, sample sd (None for one value), n and the values over seeds."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "sd": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}  # fmt: skip


def aggregate(runs: list[dict], set_name: str) -> dict:
    """Per arm, the stats of every column of ``set_name`` (and the training log) over seeds."""
    summary: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        cols = [dict(r["eval"].get(set_name, {}), **(r.get("train") or {})) for r in runs if r["arm"] == arm]
        keys = sorted({k for c in cols for k in c})
        summary[arm] = {k: stats([c.get(k) for c in cols]) for k in keys}
    return summary
