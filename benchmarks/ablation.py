"""Ablation of the objectives beyond the paper's loss (issue 18): the demo's run, each addition alone, the best combination.

Starting point: the demo (``configs/demo.yaml``, read at run time, plus the
encoder and shards that ``scripts/demo.sh`` builds in ``--demo_out``: ``e5/``
and ``shards/``). Arms, each ``align fit --config configs/demo.yaml --config
paths.yaml`` plus its flags, in a subprocess as a user runs it:

* ``baseline``: the demo config as it is;
* ``adversarial``: ``--model.adversarial.weight`` (language discriminator, gradient reversal);
* ``neighbourhood``: ``--model.neighbourhood.weight`` (within-language structure of the starting model);
* ``distill``: ``--model.distill.teacher`` = the starting encoder itself (translations pulled to its
  embedding of the English sentence; ``--teacher`` picks another offline encoder);
* ``matryoshka``: ``--model.matryoshka.dims`` (the contrastive loss on nested prefixes too);
* ``drift``: ``--model.loss.drift_weight`` (pointwise pull towards the starting model);
* ``mask_duplicates`` / ``hard_negatives``: only when ``align fit --help`` offers
  ``--model.loss.mask_duplicates`` / ``--data.hard_negatives`` (``--extra_arm`` adds any other);
* ``combined``: the flags of every addition whose mean all-pairs retrieval accuracy beat the
  baseline's (run only when at least two did; ``--combine a,b`` names them instead).

Every run is evaluated with ``align eval`` on the held-out split of the shards
(``--max_rows`` of them), and on an out-of-domain set when there is one
(``--ood``, else ``<demo_out>/ood.jsonl`` or ``<demo_out>/ood/`` when present):
retrieval accuracy grouped trained ↔ trained / unseen ↔ unseen / X ↔ Y (trained,
no pivot) / trained ↔ unseen, xSIM error, the language-ID probe accuracy; and
a monolingual check computed here, :func:`structure_spearman`: per language,
the Spearman correlation between the pairwise cosine similarities of that
language's held-out sentences under the trained model and under the starting
model (1 = the monolingual neighbourhood structure is untouched; what alignment
costs monolingually). Mean ± sd over ``--seeds`` per arm.

    python benchmarks/ablation.py --demo_out demo_out                         # demo budget, 3 seeds
    python benchmarks/ablation.py --demo_out demo_out --steps 40 --seeds 0 \\
        --freeze_layers 10 --max_rows 150                                       # a budget a shared CPU affords
    python benchmarks/ablation.py --render benchmarks/results/ablation-....json  # re-write the .md

Run from the repository root. Results: ``benchmarks/results/ablation-<date>-<tag>-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
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

from alignment import fsutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import RESULTS, machine_info, machine_lines, machine_tag, markdown_table, now, result_stem  # noqa: E402
from _common import command_line as report_command  # noqa: E402
from _common import write_results as write_report  # noqa: E402

PACKAGES = ("lightning", "transformers")
ALIGN = [sys.executable, "-m", "alignment.cli"]
BASE_ARMS = ("baseline", "adversarial", "neighbourhood", "distill", "matryoshka", "drift")
OPTIONAL_FLAGS = {"mask_duplicates": "--model.loss.mask_duplicates", "hard_negatives": "--data.hard_negatives"}
"""Additions built elsewhere (issue 18 item 5): an arm only when ``align fit --help`` offers the flag."""
GROUPS = {"all": "all pairs", "trained": "trained ↔ trained", "x_y": "X ↔ Y (trained, no pivot)",
          "unseen": "unseen ↔ unseen", "mixed": "trained ↔ unseen"}  # fmt: skip
SELECT = "acc/all"
"""The number that decides which additions enter the combination (held-out set)."""


# --------------------------------------------------------------------------- the arms


def matryoshka_dims(width: int) -> list[int]:
    """Nested prefixes below the full ``width``: 64/128/256 where they fit, else a quarter and a half."""
    dims = [d for d in (64, 128, 256) if d < width]
    return dims or sorted({max(1, width // 4), max(1, width // 2)} - {width})


def arm_flags(name: str, *, steps: int, teacher: str, width: int) -> list[str]:
    """The ``align fit`` flags of one built-in addition (the recipes' weights, schedules scaled to ``steps``)."""
    if name == "baseline":
        return []
    if name == "adversarial":  # discriminator alone for the first fifth, lambda ramps over the next half
        return ["--model.adversarial.weight", "0.1", "--model.adversarial.warmup_steps", str(max(1, steps // 5)),
                "--model.adversarial.ramp_steps", str(max(1, steps // 2))]  # fmt: skip
    if name == "neighbourhood":
        return ["--model.neighbourhood.weight", "1.0"]
    if name == "distill":
        return ["--model.distill.teacher", teacher, "--model.distill.weight", "1.0"]
    if name == "matryoshka":
        return ["--model.matryoshka.dims", json.dumps(matryoshka_dims(width))]
    if name == "drift":
        return ["--model.loss.drift_weight", "1.0"]
    if name == "mask_duplicates":
        return ["--model.loss.mask_duplicates", "true"]
    if name == "hard_negatives":
        return ["--data.hard_negatives", "true"]
    raise ValueError(f"unknown arm {name!r}")


def available_optional_arms(help_text: str) -> list[str]:
    """The optional additions whose flag ``align fit --help`` lists."""
    return [name for name, flag in OPTIONAL_FLAGS.items() if flag + " " in help_text or flag + "\n" in help_text]


def combined_flags(names: Sequence[str], flags: dict[str, list[str]]) -> list[str]:
    """The flags of several arms, in order (a later arm's flag overrides an earlier one, as on a command line)."""
    return [f for name in names for f in flags[name]]


def choose_combination(summary: dict, additions: Sequence[str], metric: str = SELECT) -> list[str]:
    """Additions whose mean ``metric`` beat the baseline's (held-out), best first."""
    base = summary.get("baseline", {}).get(metric, {}).get("mean")
    if base is None:
        return []
    better = [
        (summary[a][metric]["mean"], a)
        for a in additions
        if summary.get(a, {}).get(metric, {}).get("mean") is not None and summary[a][metric]["mean"] > base
    ]
    return [a for _, a in sorted(better, reverse=True)]


# --------------------------------------------------------------------------- commands


def run_align(argv: list[str], log_path: Path, env: dict) -> float:
    """``align ARGV`` in a subprocess (output to ``log_path``); wall seconds; raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run([*ALIGN, *argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"align {shlex.join(argv)} failed (exit {rc}); log {log_path}:\n{tail}")
    return time.perf_counter() - start


def fit_args(
    config: str,
    run_dir: Path,
    *,
    seed: int,
    steps: int | None,
    freeze_layers: int | None,
    flags: Sequence[str],
    extra: Sequence[str],
) -> list[str]:
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


def train_log(metrics_csv: Path, last: int = 5) -> dict:
    """Means of the last ``last`` logged steps: the train loss and, with the adversary, its discriminator's accuracy."""
    rows = list(csv.DictReader(open(metrics_csv))) if metrics_csv.exists() else []
    out = {}
    for key, name in (("train/loss", "train_loss"), ("train/adv_accuracy", "disc_acc")):
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        out[name] = statistics.fmean(vals[-last:]) if vals else None
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
    """Per language, the embeddings of the evaluation sentences (as ``align eval`` encodes them: its loader, prefix)."""
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
    return {lang: encode_texts(model, tokenizer, t, cfg, prefix=prefix).numpy() for lang, t in sorted(texts.items())}


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


class StartEmbeddings(dict):
    """The starting encoder's embeddings per evaluation set, computed when first needed (not at all on a full reuse)."""

    def __init__(self, args, sets: dict[str, str]):
        super().__init__()
        self.args, self.sets = args, sets

    def __missing__(self, name: str) -> dict:
        a = self.args
        self[name] = embed_by_language(a.encoder, self.sets[name], a.max_rows, a.eval_languages)
        return self[name]


def evaluate(
    model: Path,
    sets: dict[str, str],
    out: Path,
    args,
    trained: Sequence[str],
    start_emb: StartEmbeddings,
    env: dict,
    timings: dict,
) -> dict:
    """``align eval`` and the monolingual check on every evaluation set; ``{set: {column: value}}``."""
    result = {}
    for name, data in sets.items():
        argv = eval_args(model, data, out / f"eval-{name}", trained, args.max_rows, args.eval_languages)
        if not (args.reuse and (out / f"eval-{name}" / "metrics.json").exists()):
            timings[f"eval_{name}_s"] = run_align(argv, out / f"eval-{name}.log", env)
        cols = summarize_eval(json.loads((out / f"eval-{name}" / "metrics.json").read_text()), trained, args.pivot)
        emb = (
            start_emb[name]
            if model == args.encoder
            else embed_by_language(model, data, args.max_rows, args.eval_languages)
        )
        cols.update(monolingual(start_emb[name], emb, trained))
        result[name] = cols
    return result


# --------------------------------------------------------------------------- aggregation and report


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
        cols = [dict(r["eval"].get(set_name, {}), **r.get("train", {})) for r in runs if r["arm"] == arm]
        keys = sorted({k for c in cols for k in c})
        summary[arm] = {k: stats([c.get(k) for c in cols]) for k in keys}
    return summary


COLUMNS = [("acc/trained", "acc trained"), ("acc/unseen", "acc unseen"), ("acc/x_y", "acc X↔Y"),
           ("acc/mixed", "acc trained↔unseen"), ("acc/all", "acc all"), ("xsim/all", "xSIM err (↓)"),
           ("lang_id_acc", "lang-ID probe (↓)"), ("mono/trained", "mono ρ trained"),
           ("mono/unseen", "mono ρ unseen")]  # fmt: skip


def _cell(s: dict | None, signed: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    return text + (f" ± {s['sd']:.3f}" if s.get("sd") is not None else "")


def table(summary: dict, labels: dict) -> str:
    rows = [[labels.get(arm, arm), *(_cell(cols.get(k)) for k, _ in COLUMNS)] for arm, cols in summary.items()]
    return markdown_table(["arm", *(h for _, h in COLUMNS)], rows)


def deltas(summary: dict) -> dict:
    """Each arm minus the baseline, per column (difference of the means)."""
    base = summary.get("baseline", {})
    out = {}
    for arm, cols in summary.items():
        if arm in ("baseline", "zero-shot"):
            continue
        out[arm] = {k: (cols[k]["mean"] - base[k]["mean"]) if k in base and cols[k]["mean"] is not None
                    and base[k]["mean"] is not None else None for k, _ in COLUMNS if k in cols}  # fmt: skip
    return out


def outcome_lines(summary: dict, n_seeds: int) -> list[str]:
    """What helps and what does not, as measured: each addition against the baseline."""
    base = summary.get("baseline")
    if not base:
        return []
    lines = []
    for arm, d in deltas(summary).items():
        acc, mono, xy = d.get("acc/all"), d.get("mono/trained"), d.get("acc/x_y")
        if acc is None:
            continue
        sds = [s for s in (summary[arm]["acc/all"]["sd"], base["acc/all"]["sd"]) if s is not None]
        noise = max(sds) if sds else None
        verdict = (
            ("within seed noise" if noise is not None and abs(acc) <= noise else "helps" if acc > 0 else "hurts")
            if noise is not None
            else ("higher" if acc > 0 else "lower")
        )
        lines.append(
            f"- **{arm}**: all-pairs retrieval {acc:+.3f} vs baseline ({verdict}"
            + ("" if noise is not None else f", {n_seeds} seed: no noise estimate")
            + (f"), X↔Y {xy:+.3f}" if xy is not None else ")")
            + (f", monolingual structure ρ (trained languages) {mono:+.3f}" if mono is not None else "")
            + "."
        )
    return lines


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Ablation: objectives beyond the paper's loss (issue 18)", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             *machine_lines(report["machine"], PACKAGES),
             f"- base config: `{s['config']}` (read at run time) with the encoder `{s['encoder']}` and shards "
             f"`{s['shards']}`; trained languages {', '.join(s['trained'])}; pivot {s['pivot']}",
             f"- budget: {s['budget']}", f"- seeds: {', '.join(map(str, s['seeds']))}; mean ± sd over seeds "
             "(sd only with 2 or more seeds)", f"- a full run: {s['full_run']}", "",
             "Columns: retrieval accuracy (P@1, both directions) averaged over ordered language pairs of each group; "
             "xSIM error (margin, all pairs; lower is better); language-ID linear-probe accuracy (lower = less "
             "language identity left in the embeddings); mono ρ: per language, Spearman correlation between the "
             "pairwise cosine similarities of its held-out sentences under the trained and the starting model "
             "(1 = monolingual structure untouched), averaged over trained / unseen languages.", ""]  # fmt: skip
    for name, summary in report["summary"].items():
        lines += [f"## {name} set ({s['eval_sets'][name]})", "", table(summary, report["labels"]), ""]
    lines += ["## Arms", ""]
    lines += [f"- `{a}`: `{' '.join(f) or '(demo config as is)'}`" for a, f in report["arm_flags"].items()]
    lines += ["", f"Combination: {report['combination_note']}", ""]
    if report.get("skipped_arms"):
        lines += [f"Not run: {'; '.join(report['skipped_arms'])}", ""]
    lines += ["## What helps (held-out set, as measured at this budget)", "",
              *outcome_lines(report["summary"].get("held-out", {}), len(s["seeds"])), "",
              f"Total wall time {report['wall_s']:.0f} s."]  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--demo_out", type=Path, default=Path("demo_out"), help="folder with e5/ and shards/ (scripts/demo.sh)"
    )
    p.add_argument("--encoder", type=Path, help="starting encoder (default: <demo_out>/e5)")
    p.add_argument("--shards", type=Path, help="shards (default: <demo_out>/shards)")
    p.add_argument("--config", default="configs/demo.yaml", help="the base config (the demo's)")
    p.add_argument("--arms", help="comma-separated arms (default: baseline, every addition offered, combined)")
    p.add_argument("--combine", help="comma-separated additions to combine (default: those that beat the baseline)")
    p.add_argument(
        "--extra_arm",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="another arm: its name and its align fit flags, e.g. 'hn=--data.hard_negatives path'",
    )
    p.add_argument("--teacher", help="distillation teacher (default: the starting encoder)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, help="--trainer.max_steps (default: the config's)")
    p.add_argument("--freeze_layers", type=int, help="--model.encoder.freeze_layers (default: the config's)")
    p.add_argument("--max_rows", type=int, help="evaluate the first N held-out rows (default: all)")
    p.add_argument(
        "--eval_languages", type=lambda s: s.split(","), help="languages to evaluate (default: all in the data)"
    )
    p.add_argument("--ood", help="out-of-domain evaluation data (default: <demo_out>/ood.jsonl or ood/ when present)")
    p.add_argument("--pivot", default="en")
    p.add_argument("--fit_args", default="", help="extra align fit flags for every run (one string)")
    p.add_argument("--work_dir", type=Path, default=Path("ablation_runs"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="a word for the result's name (e.g. the budget)")
    p.add_argument("--full_run_estimate", default="not measured", help="what a full run would take, for the report")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take runs a previous invocation finished in --work_dir (their run.json; a finished fit's export)",
    )
    p.add_argument("--render", type=Path, help="re-write the Markdown of a result JSON and exit")
    args = p.parse_args(argv)
    args.encoder = args.encoder or args.demo_out / "e5"
    args.shards = args.shards or args.demo_out / "shards"
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    return args


def eval_sets(args) -> dict[str, str]:
    sets = {"held-out": str(args.shards)}
    ood = args.ood or next((str(p) for p in (args.demo_out / "ood.jsonl", args.demo_out / "ood") if p.exists()), None)
    return sets | ({"out-of-domain": ood} if ood else {})


def plan_arms(args, help_text: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """The arms to run (``combined`` last), the flags of each known arm, what is skipped and why."""
    config = yaml.safe_load(open(args.config))
    steps = args.steps or config["trainer"]["max_steps"]
    width = json.loads((args.encoder / "config.json").read_text()).get("hidden_size", 384)
    teacher = str(args.teacher or args.encoder)
    optional = available_optional_arms(help_text)
    known = [*BASE_ARMS, *optional]
    flags = {a: arm_flags(a, steps=steps, teacher=teacher, width=width) for a in known}
    for spec in args.extra_arm:
        name, _, text = spec.partition("=")
        flags[name] = shlex.split(text)
        known.append(name)
    arms = args.arms.split(",") if args.arms else [*known, "combined"]
    skipped = [
        f"{a} (align fit --help has no {f})"
        for a, f in OPTIONAL_FLAGS.items()
        if a not in optional and (not args.arms or a in arms)
    ]
    unknown = [a for a in arms if a not in flags and a != "combined"]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join([*flags, 'combined'])}")
    return arms, flags, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        return 0
    started = time.perf_counter()
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    named = args.arms.split(",") if args.arms else None
    probe_help = named is None or any(a in OPTIONAL_FLAGS for a in named)  # one subprocess less when not needed
    help_text = (
        subprocess.run([*ALIGN, "fit", "--help"], capture_output=True, text=True, env=env).stdout if probe_help else ""
    )
    arms, flags, skipped = plan_arms(args, help_text)
    config = yaml.safe_load(open(args.config))
    trained = list(config["data"]["languages"])
    sets = eval_sets(args)
    log = lambda msg: print(f"[ablation {time.perf_counter() - started:6.0f} s] {msg}", flush=True)  # noqa: E731

    log(f"arms {arms}; seeds {args.seeds}; eval sets {sets}")
    start_emb = StartEmbeddings(args, sets)
    runs: list[dict] = []

    def finished(run_dir: Path) -> bool:
        """A run a previous invocation completed (``--reuse``): its record is taken as it is."""
        if args.reuse and (run_dir / "run.json").exists():
            runs.append(json.loads((run_dir / "run.json").read_text()))
            log(f"{run_dir.name}: reused {run_dir / 'run.json'}")
            return True
        return False

    def record(run_dir: Path, entry: dict) -> None:
        runs.append(entry)
        fsutil.publish_file(run_dir / "run.json", json.dumps(entry, indent=1) + "\n")

    zero = args.work_dir / "zero-shot"
    zero.mkdir(parents=True, exist_ok=True)
    if not finished(zero):
        timings: dict = {}
        result = evaluate(args.encoder, sets, zero, args, trained, start_emb, env, timings)
        record(zero, {"arm": "zero-shot", "seed": None, "eval": result, "timings": timings, "fit_command": None})
    combination_note = "not requested"

    def run(arm: str, arm_flags_: list[str], seed: int) -> None:
        run_dir = args.work_dir / f"{arm}-seed{seed}"
        if finished(run_dir):
            return
        write_paths(run_dir, args.encoder, args.shards)
        argv = fit_args(args.config, run_dir, seed=seed, steps=args.steps, freeze_layers=args.freeze_layers,
                        flags=arm_flags_, extra=shlex.split(args.fit_args))  # fmt: skip
        log(f"{arm} seed {seed}: align {shlex.join(argv)}")
        trained_before = args.reuse and (run_dir / "export").is_dir()  # exports are published complete or not at all
        timings = {} if trained_before else {"fit_s": run_align(argv, run_dir / "fit.log", env)}
        result = evaluate(run_dir / "export", sets, run_dir, args, trained, start_emb, env, timings)
        record(run_dir, {"arm": arm, "seed": seed, "fit_command": "align " + shlex.join(argv), "flags": arm_flags_,
                     "eval": result, "train": train_log(run_dir / "csv" / "version_0" / "metrics.csv"),
                     "resolved": resolved_budget(run_dir / "config.yaml"),
                     "timings": timings})  # fmt: skip
        log(
            f"{arm} seed {seed}: {json.dumps({k: round(v, 3) for k, v in result['held-out'].items() if v is not None and '/lang/' not in k})}"
        )

    for arm in (a for a in arms if a != "combined"):
        for seed in args.seeds:
            run(arm, flags[arm], seed)
    if "combined" in arms:
        additions = [a for a in arms if a not in ("baseline", "combined")]
        chosen = args.combine.split(",") if args.combine else choose_combination(aggregate(runs, "held-out"), additions)
        if len(chosen) >= 2:
            flags["combined"] = combined_flags(chosen, flags)
            combination_note = (f"{' + '.join(chosen)} ("
                                + ("named by --combine" if args.combine else f"the additions whose mean {SELECT} beat the baseline")
                                + ")")  # fmt: skip
            for seed in args.seeds:
                run("combined", flags["combined"], seed)
        else:
            combination_note = (f"not run: {len(chosen)} addition(s) ({', '.join(chosen) or 'none'}) beat the baseline's "
                                f"mean {SELECT} on the held-out set, so there is nothing to combine")  # fmt: skip

    first = next((r["resolved"] for r in runs if r.get("resolved")), None)
    budget = describe_budget(first, args.max_rows, args.fit_args)
    date = now()
    machine = machine_info(*PACKAGES)
    report = {
        "name": "ablation", "date": date, "command": report_command("ablation.py", argv), "machine": machine,
        "settings": {"config": args.config, "encoder": str(args.encoder), "shards": str(args.shards),
                     "trained": trained, "pivot": args.pivot, "seeds": args.seeds, "resolved": first,
                     "max_rows": args.max_rows, "budget": budget, "eval_sets": sets,
                     "full_run": args.full_run_estimate, "select_metric": SELECT},
        "arm_flags": {a: flags[a] for a in dict.fromkeys(r["arm"] for r in runs) if a in flags},
        "labels": {"zero-shot": "zero-shot (starting encoder)"},
        "combination_note": combination_note, "skipped_arms": skipped,
        "summary": {name: aggregate(runs, name) for name in sets},
        "runs": runs, "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    report["deltas"] = {name: deltas(s) for name, s in report["summary"].items()}
    md = markdown(report)
    print(md)
    md_path, _ = write_report(args.out, result_stem("ablation", date, args.tag, machine_tag(machine)), md, report)
    log(f"wrote {md_path} and its .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
