"""The paper's central comparison in miniature: multi-way versus En-X bilingual training.

multilingual-E5-small (the offline demo encoder: all 12 layers, full vocabulary; the demo config freezes the lower 8)
is fine-tuned on the gettext multi-way corpus of the Django and Wagtail wheels
(``make demo`` builds both into ``demo_out/``) on seven languages, en (the
pivot), de, fr, es, ru, zh-Hans, ar, and evaluated on the held-out test rows
for those and for languages never trained on (ja, ko, it, nl, pl, tr, uk,
pt-BR, where the shards have them). Arms, each over ``--seeds`` seeds:

- **zero-shot**: the starting encoder, no training;
- **En-X**: ``--model.loss.objective en_x`` with ``--data.language_policy
  pivot_pair``: each row gives English plus one sampled X, only En-X pairs are
  trained (the bilingual baseline, e.g. LaBSE-style bitext training);
- **multi-way**: ``--model.loss.objective multi_positive`` with
  ``--data.language_policy k``: each row gives ``k`` sampled languages,
  every sentence is an anchor and the row's other sentences its positives
  (Fazili & Goswami 2026);
- **En-X, equal sentences** (secondary): the En-X arm at the multi-way arm's
  sentences per step instead of its pairs.

"Equal number of training pairs and steps", precisely. A *translation pair*
is an unordered pair of sentences of the same row in the same batch: a row
that brings ``n`` sentences holds ``n (n - 1) / 2`` of them (both objectives
are bidirectional, so each pair is scored in both directions either way). A
multi-way row with ``k`` languages holds ``k (k - 1) / 2`` pairs, an En-X row
exactly one. The primary comparison gives both arms the same number of
optimiser steps and the same number of translation pairs per step: the
multi-way arm takes ``R`` rows of ``k`` languages, the En-X arm ``R k (k - 1)
/ 2`` rows (default ``R = 16, k = 3``: 48 pairs per step each). Hence the
same total pairs, and the same schedule, learning rate, temperature and
sequence length. What is *not* equal follows from that and is printed: En-X
encodes ``(k - 1)`` times the sentences per step and reads ``k (k - 1) / 2``
times the rows, so it spends more compute and passes over the corpus more
often (each pass pairing English with another X); the multi-way arm gets its
pairs from fewer rows. ``k = 3`` is the smallest sample in which an anchor
has more than one positive (the multi-positive case the method is about)
while keeping En-X's extra compute at 2x on a 2-core CPU (``k = 7``, every
training language, would need 21 En-X rows per multi-way row: 6x the
sentences). The other defensible budget, equal
*sentences encoded* per step (equal compute), is the secondary arm: En-X with
``R k / 2`` rows, which then trains ``(k - 1)`` times fewer pairs.

The accounting is measured, not assumed: before each run the script replays
that run's exact data pipeline (``AlignmentDataModule`` built from the run's
resolved config, same seed) for the run's steps and counts rows, sentences and
pairs per step (rows short of ``k`` training languages bring fewer pairs; the
finite epoch plan makes batches a row smaller here and there); after training
the per-step ``train/rows`` and ``train/num_terms`` of the run's CSV log are
checked against that replay.

The paper's own protocol (the same English source rows for every arm, the
multi-way corpus carrying all training languages of each row versus En-X with
one sampled X per row, equal epochs, a sweep of languages per row) is the third
design, in :mod:`paper_protocol` (``benchmarks/paper_protocol.py``), which runs
its arms with this module's runner, accounting and metrics.

Training is ``align fit --config configs/demo.yaml`` plus flags (the
framework's LightningCLI, AlignmentModule and AlignmentDataModule, run in this
process through ``alignment.cli.main``); evaluation is ``align eval`` on the
exported encoder. Every command is recorded. Missing demo assets are built
with the demo's own commands (``align shards build --format gettext
--from-package django wagtail ...``, ``align offline-encoder ...``).

    python benchmarks/paper_miniature.py                        # the 2026-11-24 result used the earlier 4-layer encoder
    python benchmarks/paper_miniature.py --steps 40 --seeds 0   # a quick look
    python benchmarks/paper_miniature.py --arms multiway enx    # primary comparison only
    python benchmarks/paper_miniature.py --render benchmarks/results/paper_miniature-....json  # re-write the .md

Run from the repository root (paths are relative to it). Results:
``benchmarks/results/paper_miniature-<date>-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
from _common import RESULTS, machine_info, machine_lines, machine_tag, now, result_stem  # noqa: E402
from _common import command_line as report_command  # noqa: E402
from _common import write_results as write_report  # noqa: E402

PACKAGES = ("lightning", "transformers")


TRAINED = ("en", "de", "fr", "es", "ru", "zh-Hans", "ar")
UNSEEN = ("ja", "ko", "it", "nl", "pl", "tr", "uk", "pt-BR")
ARM_NAMES = ("multiway", "enx", "enx_sentences")
GROUPS = {
    "all": "all pairs",
    "trained": "trained ↔ trained",
    "en_x": "en ↔ X (trained)",
    "x_y": "X ↔ Y (trained, no en)",
    "unseen": "unseen ↔ unseen",
    "mixed": "trained ↔ unseen",
}
"""Groups of ordered evaluation pairs (src, tgt); a table column each."""
DIAGNOSTICS = ("lang_id_acc", "cos_gap", "hub_share/mean")


# --------------------------------------------------------------------------- the arms


@dataclass(frozen=True)
class Arm:
    """One training recipe of the comparison: objective, language policy and rows per step."""

    name: str
    label: str
    objective: str
    policy: str
    rows: int
    """Rows per step (``--data.batch_size``; one rank)."""
    k: int | None = None
    """Languages sampled per row (policy ``k``)."""
    role: str = "primary"

    def flags(self) -> list[str]:
        out = ["--model.loss.objective", self.objective, "--data.language_policy", self.policy,
               "--data.batch_size", str(self.rows)]
        return out + (["--data.k", str(self.k)] if self.k is not None else [])

    @property
    def nominal_pairs_per_row(self) -> int:
        return self.k * (self.k - 1) // 2 if self.policy == "k" else 1

    @property
    def nominal_sentences_per_row(self) -> int:
        return self.k if self.policy == "k" else 2


def design_arms(rows: int, k: int, names: Sequence[str] = ARM_NAMES) -> list[Arm]:
    """The arms of the comparison for ``rows`` multi-way rows of ``k`` languages per step (see the docstring)."""
    if rows < 2:
        raise ValueError(f"--rows must be >= 2 (a contrastive batch needs negatives), got {rows}")
    if k < 2:
        raise ValueError(f"--k must be >= 2 (a row needs a translation pair), got {k}")
    pairs = k * (k - 1) // 2
    arms = {
        "multiway": Arm("multiway", f"multi-way (k={k})", "multi_positive", "k", rows, k),
        "enx": Arm("enx", "En-X, equal pairs", "en_x", "pivot_pair", rows * pairs),
        "enx_sentences": Arm("enx_sentences", "En-X, equal sentences", "en_x", "pivot_pair",
                             max(2, round(rows * k / 2)), role="secondary"),
    }
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(arms)}")
    return [arms[n] for n in ARM_NAMES if n in names]


# --------------------------------------------------------------------------- commands


def fit_args(arm: Arm, seed: int, *, base_config: str, encoder: str, shards: str, languages: Sequence[str],
             steps: int, run_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    """The ``align fit`` arguments of one run: the base config, then the arm's and the run's flags.

    Validation during training and checkpoints are off (the held-out evaluation
    runs afterwards on the export); the CSV log records every step.
    """
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "csv"}}]
    return [
        "--config", base_config,
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", json.dumps(logger),
        "--model.encoder.name_or_path", encoder,
        "--data.train_shards", shards,
        "--data.val_shards", "null",
        "--data.tokenizer", encoder,
        "--data.languages", json.dumps(list(languages)),
        "--data.seed", str(seed),
        *arm.flags(),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", "0",
        "--checkpoint.save_last", "false",
        "--export.dir", str(run_dir / "export"),
        *extra,
    ]  # fmt: skip


def eval_args(model: str, shards: str, languages: Sequence[str], trained: Sequence[str], out: Path) -> list[str]:
    return ["eval", "--model", model, "--data", shards, "--split", "test", "--languages", ",".join(languages),
            "--train_languages", ",".join(trained), "--out", str(out), "--encode.quiet"]


@contextlib.contextmanager
def command_line(argv: Sequence[str]):
    """``sys.argv`` as ``align ARGV`` sees it, for the duration (LightningCLI warns when args and sys.argv differ)."""
    saved, sys.argv = sys.argv, ["align", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def resolved_config(fit_argv: Sequence[str]):
    """The resolved ``align fit`` config of ``fit_argv`` (parse only: nothing is built)."""
    from alignment.commands.fit import parse_config

    with command_line(fit_argv):
        return parse_config(list(fit_argv))


def run_align(argv: list[str], what: str) -> float:
    """``align ARGV`` in this process (the real command); returns wall seconds, raises naming ``what`` on failure."""
    from alignment.cli import main

    start = time.perf_counter()
    try:
        with command_line(argv):
            rc = main(list(argv))
    except SystemExit as exc:  # LightningCLI and argparse exit on bad flags
        rc = exc.code if isinstance(exc.code, int) else 1
    if rc:
        raise RuntimeError(f"{what} failed (exit {rc}): align {shlex.join(argv)}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- demo assets


def check_languages(shards: Path, trained: Sequence[str], unseen: Sequence[str]) -> tuple[list[str], list[str]]:
    """The unseen languages the test split has, and those it lacks; every trained one must be there."""
    from alignment.data.manifest import load_manifest

    manifest = load_manifest(shards)
    test = manifest.get("splits", {}).get("test", {})
    present = {lang for lang, n in test.get("languages", {}).items() if n}
    if not test.get("rows"):
        raise ValueError(f"--shards {shards}: the manifest has no test split rows to evaluate on")
    missing = [lang for lang in trained if lang not in present]
    if missing:
        raise ValueError(
            f"--train-languages {','.join(trained)}: {', '.join(missing)} not in the test split of --shards {shards} "
            f"(it has {', '.join(sorted(present))})"
        )
    return [lang for lang in unseen if lang in present], [lang for lang in unseen if lang not in present]


def ensure_assets(shards: Path, encoder: Path, languages: Sequence[str]) -> list[str]:
    """Build the demo shards / encoder with the demo's commands (``scripts/demo.sh``) where missing.

    Returns the commands that ran. An existing folder without its manifest or
    config is an error (not overwritten).
    """
    ran = []
    if not shards.exists():
        argv = ["shards", "build", "--format", "gettext", "--from_package", "django", "wagtail",
                "--languages", ",".join(languages), "--min_languages", "7", "--rows_per_shard", "250",
                "--split", "0.8,0.05,0.15", "--seed", "0", "--out", str(shards)]  # fmt: skip
        run_align(argv, "building the gettext shards")
        ran.append("align " + shlex.join(argv))
    elif not (shards / "manifest.json").is_file():
        raise ValueError(f"--shards {shards} exists but holds no manifest.json (not a shard build)")
    if not encoder.exists():
        texts = encoder.parent / f"{encoder.name}-corpus_texts.jsonl"
        write_corpus_texts(shards, texts, prefix="query: ")
        argv = ["offline-encoder", str(encoder), "--layers", "4", "--vocab_from_texts", str(texts)]
        run_align(argv, "rebuilding the offline encoder")
        ran.append("align " + shlex.join(argv))
    elif not (encoder / "config.json").is_file():
        raise ValueError(f"--encoder {encoder} exists but holds no config.json (not a model folder)")
    return ran


def write_corpus_texts(shards: Path, out: Path, prefix: str) -> None:
    """Every text of every split as the encoder sees it (the demo's vocabulary source for pruning)."""
    from alignment.data.manifest import iter_shard_rows, resolve_shards

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for split in ("train", "validation", "test"):
            for shard in resolve_shards(shards, split):
                for _, row in iter_shard_rows(shard.url):
                    texts = {lang: prefix + text for lang, text in row.texts.items()}
                    fh.write(json.dumps({"texts": texts}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- accounting


def replay_batches(argv: Sequence[str], steps: int) -> dict:
    """Per-step rows, sentences, pairs and tokens of the first ``steps`` training batches of ``align fit ARGV``.

    Builds the run's ``AlignmentDataModule`` from its resolved config (parse
    only, nothing trained) and iterates its training loader epoch after epoch,
    as the fit loop does.
    """
    from alignment.data.datamodule import AlignmentDataModule, DataConfig

    cfg = resolved_config(argv)
    data = AlignmentDataModule(DataConfig(**cfg.data.as_dict()))
    data.setup("fit")
    pivot = data.train_stream.pivot_lang_id
    per_step: dict[str, list[int]] = {"rows": [], "sentences": [], "pairs": [], "pivot_pairs": [], "tokens": []}
    keys: set[str] = set()
    epoch = -1
    while len(per_step["rows"]) < steps:
        epoch += 1
        data.set_epoch(epoch)
        before = len(per_step["rows"])
        for batch in data.train_dataloader():
            sizes = batch.row_ids.bincount(minlength=batch.num_rows).tolist()  # sentences per row
            pivots = batch.row_ids[batch.lang_ids == pivot].bincount(minlength=batch.num_rows).tolist()
            per_step["rows"].append(batch.num_rows)
            per_step["sentences"].append(batch.num_sentences)
            per_step["pairs"].append(sum(n * (n - 1) // 2 for n in sizes))
            per_step["pivot_pairs"].append(sum(n - 1 for n, p in zip(sizes, pivots) if p))
            per_step["tokens"].append(batch.real_tokens)
            keys.update(batch.row_keys)
            if len(per_step["rows"]) == steps:
                break
        if len(per_step["rows"]) == before:
            raise RuntimeError(f"epoch {epoch} of --data.train_shards {data.config.train_shards} yielded no batch")
    totals = {name: sum(values) for name, values in per_step.items()}
    return {
        "steps": steps,
        "per_step_mean": {name: total / steps for name, total in totals.items()},
        "totals": totals,
        "distinct_rows": len(keys),
        "split_rows": sum(shard.rows or 0 for shard in data.train_stream.shards),
        "batches_per_epoch": len(data.train_stream),
        "epochs_touched": epoch + 1,
        "per_step": per_step,
    }


def expected_terms(objective: str, per_step: dict[str, list[int]]) -> list[int]:
    """Loss terms per step the log must show for these batches (``train/num_terms``).

    ``multi_positive``: one per sentence (every row has two or more);
    ``en_x`` (bidirectional): two per pivot pair.
    """
    if objective == "multi_positive":
        return list(per_step["sentences"])
    if objective == "en_x":
        return [2 * p for p in per_step["pivot_pairs"]]
    raise ValueError(f"no term count for objective {objective!r}")


def check_against_log(metrics_csv: Path, objective: str, replay: dict) -> dict:
    """Compare the run's logged per-step rows and loss terms with the replayed batches."""
    logged: dict[int, dict[str, float]] = {}
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            if row.get("train/rows"):
                logged[int(row["step"])] = {"rows": float(row["train/rows"]), "terms": float(row["train/num_terms"])}
    rows, terms = replay["per_step"]["rows"], expected_terms(objective, replay["per_step"])
    mismatches = [s for s in range(len(rows))
                  if s not in logged or logged[s]["rows"] != rows[s] or logged[s]["terms"] != terms[s]]
    return {"steps_logged": len(logged), "steps_checked": len(rows), "mismatched_steps": mismatches[:10],
            "matches": not mismatches}


def final_train_loss(metrics_csv: Path, last: int = 10) -> float | None:
    """Mean ``train/loss`` over the last ``last`` logged steps."""
    with open(metrics_csv) as fh:
        losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    return statistics.fmean(losses[-last:]) if losses else None


# --------------------------------------------------------------------------- metrics


def pair_group(src: str, tgt: str, trained: Sequence[str], pivot: str) -> list[str]:
    """The :data:`GROUPS` an ordered evaluation pair belongs to."""
    seen = (src in trained) + (tgt in trained)
    groups = ["all", {2: "trained", 1: "mixed", 0: "unseen"}[seen]]
    if seen == 2:
        groups.append("en_x" if pivot in (src, tgt) else "x_y")
    return groups


def summarize_eval(metrics: dict, trained: Sequence[str], pivot: str = "en") -> dict:
    """Group means of retrieval accuracy and xSIM error, per-language accuracy and diagnostics of one ``align eval``.

    Args:
        metrics: the parsed ``metrics.json`` of ``align eval``.
    """
    acc: dict[str, list[float]] = {g: [] for g in GROUPS}
    xsim: dict[str, list[float]] = {g: [] for g in GROUPS}
    for pair in metrics["retrieval"]["pairs"]:
        for group in pair_group(pair["src"], pair["tgt"], trained, pivot):
            acc[group].append(pair["accuracy"])
            xsim[group].append(pair["xsim_error"])
    flat = metrics["metrics"]
    prefix = "retrieval_acc_by_lang/"
    return {
        "accuracy": {g: statistics.fmean(v) if v else None for g, v in acc.items()},
        "xsim_error": {g: statistics.fmean(v) if v else None for g, v in xsim.items()},
        "pairs_per_group": {g: len(v) for g, v in acc.items()},
        "per_language": {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)},
        "diagnostics": {k: flat[k] for k in DIAGNOSTICS if k in flat},
    }


def stats(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (``None`` for one value), min, max over seeds."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "n": len(vals), "values": list(vals)}


def columns(summary: dict) -> dict[str, float | None]:
    """The flat per-run numbers the tables aggregate: ``acc/<group>``, ``xsim/<group>``, ``lang/<code>``, diagnostics."""
    out = {f"acc/{g}": v for g, v in summary["accuracy"].items()}
    out.update({f"xsim/{g}": v for g, v in summary["xsim_error"].items()})
    out.update({f"lang/{k}": v for k, v in summary["per_language"].items()})
    out.update(summary["diagnostics"])
    return out


def aggregate(runs: list[dict], arms: Sequence[Arm]) -> tuple[dict, dict]:
    """Per arm, stats of every column over seeds; and multi-way minus each En-X arm, paired by seed."""
    by_arm = {arm.name: {r["seed"]: columns(r["eval"]) for r in runs if r["arm"] == arm.name} for arm in arms}
    summary = {}
    for name, seeds in by_arm.items():
        keys = sorted({k for cols in seeds.values() for k in cols})
        summary[name] = {k: stats([cols.get(k) for cols in seeds.values()]) for k in keys}
    diffs = {}
    if "multiway" in by_arm:
        for other in (a.name for a in arms if a.name != "multiway"):
            common = sorted(set(by_arm["multiway"]) & set(by_arm[other]))
            keys = sorted(set.intersection(*(set(by_arm[n][s]) for n in ("multiway", other) for s in common))) if common else []
            diffs[other] = {
                k: stats([None if by_arm["multiway"][s][k] is None or by_arm[other][s][k] is None
                          else by_arm["multiway"][s][k] - by_arm[other][s][k] for s in common])
                for k in keys
            }
    return summary, diffs


# --------------------------------------------------------------------------- report


def _num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cell(s: dict, signed: bool = False) -> str:
    if not s or s["mean"] is None:
        return "-"
    return _num(s["mean"], signed=signed) + (f" ± {s['sd']:.3f}" if s["sd"] is not None else "")


MAIN_COLUMNS = [f"acc/{g}" for g in GROUPS] + ["xsim/all"]


def main_table(report: dict) -> list[str]:
    """The headline table: zero-shot, each arm (mean ± sd over seeds), multi-way minus En-X (paired)."""
    heads = [f"acc {GROUPS[k.split('/')[1]]}" if k.startswith("acc/") else "xSIM error, all pairs (↓)"
             for k in MAIN_COLUMNS]
    lines = ["| arm | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(heads)]
    zs = report.get("zero_shot")
    if zs:
        cols = columns(zs["eval"])
        lines.append("| zero-shot | " + " | ".join(_num(cols.get(k)) for k in MAIN_COLUMNS) + " |")
    for arm in report["arms"]:
        s = report["summary"].get(arm["name"], {})
        lines.append(f"| {arm['label']} | " + " | ".join(_cell(s.get(k, {})) for k in MAIN_COLUMNS) + " |")
    for other, d in report["paired_difference"].items():
        label = next(a["label"] for a in report["arms"] if a["name"] == other)
        lines.append(f"| multi-way − {label} (paired by seed) | "
                     + " | ".join(_cell(d.get(k, {}), signed=True) for k in MAIN_COLUMNS) + " |")
    return lines


def accounting_table(report: dict) -> list[str]:
    lines = ["| arm | objective | language policy | rows / step | sentences / step | translation pairs / step "
             "(en–X + X–Y) | steps | row samples seen | distinct rows seen | sentences encoded | pairs trained | "
             "log matches replay |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for arm in report["arms"]:
        runs = [r for r in report["runs"] if r["arm"] == arm["name"]]
        if not runs:
            continue
        def mean(f, runs=runs):
            return statistics.fmean(f(run) for run in runs)

        def per(key, mean=mean):
            return mean(lambda run: run["accounting"]["per_step_mean"][key])

        def tot(key, mean=mean):
            return mean(lambda run: run["accounting"]["totals"][key])

        pivot, pairs = per("pivot_pairs"), per("pairs")
        policy = f"k (k={arm['k']})" if arm["policy"] == "k" else arm["policy"]
        ok = sum(r["log_check"]["matches"] for r in runs)
        lines.append(
            f"| {arm['label']} | {arm['objective']} | {policy} | {per('rows'):.1f} (set {arm['rows']}) | "
            f"{per('sentences'):.1f} | {pairs:.1f} ({pivot:.1f} + {pairs - pivot:.1f}) | {runs[0]['steps']} | "
            f"{tot('rows'):.0f} | {mean(lambda r: r['accounting']['distinct_rows']):.0f} | {tot('sentences'):.0f} | "
            f"{tot('pairs'):.0f} | {ok}/{len(runs)} runs |"
        )
    return lines


def language_table(report: dict) -> list[str]:
    arms = [a for a in report["arms"] if a["name"] in report["summary"]]
    heads = ["zero-shot"] + [a["label"] for a in arms]
    if "enx" in report["paired_difference"]:
        heads.append("multi-way − En-X (paired)")
    lines = ["| language | group | " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * len(heads)]
    zs = columns(report["zero_shot"]["eval"]) if report.get("zero_shot") else {}
    trained, pivot = report["settings"]["train_languages"], report["settings"]["pivot"]
    for lang in report["settings"]["eval_languages"]:
        key = f"lang/{lang}"
        group = "pivot" if lang == pivot else "trained" if lang in trained else "unseen"
        cells = [_num(zs.get(key))] + [_cell(report["summary"][a["name"]].get(key, {})) for a in arms]
        if "enx" in report["paired_difference"]:
            cells.append(_cell(report["paired_difference"]["enx"].get(key, {}), signed=True))
        lines.append(f"| {lang} | {group} | " + " | ".join(cells) + " |")
    return lines


def diagnostics_table(report: dict) -> list[str]:
    names = {"lang_id_acc": "language-ID probe accuracy (↓ more language-agnostic)",
             "cos_gap": "translation − non-translation cosine", "hub_share/mean": "hub share (↓)",
             "train_loss": "train loss, last 10 steps"}
    arms = [a for a in report["arms"] if a["name"] in report["summary"]]
    lines = ["| | zero-shot | " + " | ".join(a["label"] for a in arms) + " |", "| --- |" + " ---: |" * (len(arms) + 1)]
    zs = columns(report["zero_shot"]["eval"]) if report.get("zero_shot") else {}
    for key, label in names.items():
        cells = [_num(zs.get(key))] + [_cell(report["summary"][a["name"]].get(key, {})) for a in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def outcome_lines(report: dict) -> list[str]:
    """One line per comparison: the paired difference on the headline columns and in how many seeds each arm led."""
    keys = [("acc/all", "all pairs"), ("acc/en_x", "en ↔ X"), ("acc/x_y", "X ↔ Y"), ("acc/unseen", "unseen ↔ unseen"),
            ("xsim/all", "xSIM error")]
    labels = {a["name"]: a["label"] for a in report["arms"]}
    lines = []
    for other, diff in report["paired_difference"].items():
        parts = []
        for key, name in keys:
            d = diff.get(key)
            if not d or d["mean"] is None:
                continue
            better = [v < 0 if key.startswith("xsim") else v > 0 for v in d["values"]]
            parts.append(f"{name} {d['mean']:+.3f} (multi-way ahead in {sum(better)}/{len(better)} seeds)")
        lines.append(f"- multi-way − {labels[other]}: " + "; ".join(parts))
    return lines


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [
        f"# Paper comparison in miniature: multi-way versus En-X at equal translation pairs and steps ({report['date'][:10]})",
        "",
        f"- Command: `{report['command']}`",
        *machine_lines(m, PACKAGES),
        f"- Date: {report['date']}; wall time {report['wall_seconds'] / 60:.1f} min",
        f"- Encoder: `{s['encoder']}` ({report['encoder_description']}); base config `{s['base_config']}` "
        f"(lr, schedule, temperature, max_length from there: {s['base_summary']})",
        f"- Data: `{s['shards']}`, gettext multi-way corpus of the Django + Wagtail wheels; trained on the train split, "
        f"languages {', '.join(s['train_languages'])} (pivot {s['pivot']}); evaluated on the test split "
        f"({report['test_rows']} held-out rows) in {', '.join(s['eval_languages'])}"
        + (f"; not in the shards: {', '.join(s['missing_unseen'])}" if s["missing_unseen"] else ""),
        f"- Seeds: {seeds} (`--seed_everything` and `--data.seed`: dropout, shuffling, language sampling); "
        f"{s['steps']} steps per run; spread = sample standard deviation over seeds",
        "",
        "## Design: equal translation pairs per step, equal steps",
        "",
        report["design"],
        "",
        "Accounting, measured by replaying each run's data pipeline (mean over seeds; per step unless a total); "
        "the last column checks each run's logged `train/rows` and `train/num_terms` at every step against the replay:",
        "",
        *accounting_table(report),
        "",
        f"## Held-out bitext retrieval, {report['test_rows']} test rows: accuracy (mean ± sd over seeds {seeds})",
        "",
        "Cosine nearest-neighbour accuracy per ordered language pair (src → tgt among all test rows having both), "
        "averaged over the pairs of each group; xSIM is the margin-based error rate (LASER), lower is better. "
        f"Trained: {', '.join(s['train_languages'])}; unseen: {', '.join(s['unseen_present'])}.",
        "",
        *main_table(report),
        "",
        "Paired by seed (a positive accuracy or a negative xSIM difference favours multi-way):",
        "",
        *outcome_lines(report),
        "",
        "## Per language (accuracy averaged over both directions with every other language)",
        "",
        *language_table(report),
        "",
        "## Diagnostics",
        "",
        *diagnostics_table(report),
        "",
        "## Commands",
        "",
        "Each run is `align fit` then `align eval` on its export (seed "
        f"{s['seeds'][0]} shown; other seeds change `--seed_everything` and `--data.seed`). "
        "Full resolved configs are in the JSON file next to this one.",
        "",
    ]
    if report.get("zero_shot"):
        lines += [f"- zero-shot: `{report['zero_shot']['eval_command']}`"]
    for arm in report["arms"]:
        run = next((r for r in report["runs"] if r["arm"] == arm["name"]), None)
        if run:
            lines += [f"- {arm['label']}: `{run['fit_command']}`", f"  then `{run['eval_command']}`"]
    if report["asset_commands"]:
        lines += ["", "Demo assets built by this run: " + "; ".join(f"`{c}`" for c in report["asset_commands"])]
    return "\n".join(lines) + "\n"


DESIGN = (
    "A translation pair is an unordered pair of sentences of one row in one batch: a row bringing n sentences "
    "holds n(n-1)/2. Both arms run the same number of optimiser steps with the same schedule, learning rate, "
    "temperature and max_length, and see the same number of translation pairs per step: the multi-way arm "
    "(`multi_positive`, policy `k`) takes R rows of k sampled training languages, k(k-1)/2 pairs each (every "
    "sentence an anchor, the row's other sentences its positives, all else in the batch negatives); the En-X arm "
    "(`en_x`, policy `pivot_pair`: English plus one sampled X per row, only En-X pairs scored) takes R·k(k-1)/2 "
    "rows, one pair each. Consequences, printed below: En-X encodes (k-1)x the sentences per step and reads "
    "k(k-1)/2 x the rows, i.e. more compute and more passes over the corpus (each pairing English with another X). k = 3 is the smallest sample "
    "giving an anchor more than one positive, at 2x En-X compute on this CPU (all 7 languages would need 21 En-X "
    "rows per multi-way row). Secondary arm: En-X at equal *sentences* per step (R·k/2 rows), which then trains "
    "(k-1)x fewer pairs. Language samples, shuffling and dropout follow the seed."
)


def base_summary(resolved: dict) -> str:
    model, data = resolved["model"], resolved["data"]
    optim, loss = model["optim"], model["loss"]
    return (f"AdamW lr {optim['lr']}, {optim['schedule']} schedule, warmup {optim['warmup_steps']} steps, "
            f"temperature {loss['temperature']}, max_length {data['max_length']}, "
            f"freeze_embeddings {model['encoder']['freeze_embeddings']}")


# --------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=Path("demo_out/shards"),
                   help="gettext shard build (built with the demo's command if missing; default: %(default)s)")
    p.add_argument("--encoder", type=Path, default=Path("demo_out/e5"),
                   help="starting encoder folder (rebuilt with `align offline-encoder` if missing; default: %(default)s)")
    p.add_argument("--base-config", default="configs/demo.yaml", help="align fit config the arms start from")
    p.add_argument("--train-languages", default=",".join(TRAINED), help="languages trained on, pivot included")
    p.add_argument("--unseen-languages", default=",".join(UNSEEN), help="evaluated, never trained (where present)")
    p.add_argument("--pivot", default="en", help="pivot language of En-X (must be a training language)")
    p.add_argument("--rows", type=int, default=16, help="multi-way rows per step, R (default: %(default)s)")
    p.add_argument("--k", type=int, default=3, help="languages sampled per multi-way row (default: %(default)s)")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps per run (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: %(default)s)")
    p.add_argument("--arms", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES, help="arms to train")
    p.add_argument("--fit-arg", action="append", default=[], metavar="FLAG",
                   help="extra `align fit` flag for every run, e.g. --fit-arg=--model.optim.lr=1e-4 (repeatable)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/paper_miniature"),
                   help="runs, exports and eval reports (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: benchmarks/results)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only re-write the Markdown report of a results JSON written by this script (no runs)")
    args = p.parse_args(argv)
    args.train = [lang.strip() for lang in args.train_languages.split(",") if lang.strip()]
    args.unseen = [lang.strip() for lang in args.unseen_languages.split(",") if lang.strip()]
    if args.pivot not in args.train:
        p.error(f"--pivot {args.pivot} must be one of --train-languages {args.train_languages}")
    if overlap := sorted(set(args.train) & set(args.unseen)):
        p.error(f"--unseen-languages overlaps --train-languages: {', '.join(overlap)}")
    if args.k > len(args.train):
        p.error(f"--k {args.k} exceeds the {len(args.train)} --train-languages")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def run_arm(arm: Arm, seed: int, args: argparse.Namespace, eval_langs: list[str], log) -> dict:
    run_dir = args.work_dir / f"{arm.name}-seed{seed}"
    argv = fit_args(arm, seed, base_config=args.base_config, encoder=str(args.encoder), shards=str(args.shards),
                    languages=args.train, steps=args.steps, run_dir=run_dir, extra=args.fit_arg)
    resolved = resolved_config(argv).as_dict()
    replay = replay_batches(argv, args.steps)
    log(f"[{arm.name} seed {seed}] replayed {args.steps} batches: "
        f"{replay['per_step_mean']['pairs']:.1f} pairs, {replay['per_step_mean']['sentences']:.1f} sentences per step")
    fit_s = run_align(["fit", *argv], f"training {arm.label}, seed {seed}")
    csv_path = next((run_dir / "csv").glob("version_*/metrics.csv"))
    check = check_against_log(csv_path, arm.objective, replay)
    ev = eval_args(str(run_dir / "export"), str(args.shards), eval_langs, args.train, run_dir / "eval")
    eval_s = run_align(ev, f"evaluating {arm.label}, seed {seed}")
    summary = summarize_eval(json.loads((run_dir / "eval" / "metrics.json").read_text()), args.train, args.pivot)
    summary["diagnostics"]["train_loss"] = final_train_loss(csv_path)
    log(f"[{arm.name} seed {seed}] fit {fit_s:.0f} s, eval {eval_s:.0f} s; acc all {summary['accuracy']['all']:.3f}, "
        f"trained {summary['accuracy']['trained']:.3f}, unseen {summary['accuracy']['unseen']}; "
        f"log matches replay: {check['matches']}")
    replay_public = {k: v for k, v in replay.items() if k != "per_step"}
    return {"arm": arm.name, "seed": seed, "steps": args.steps, "fit_command": "align fit " + shlex.join(argv),
            "eval_command": "align " + shlex.join(ev), "resolved_config": resolved, "accounting": replay_public,
            "rows_per_step": replay["per_step"]["rows"], "log_check": check, "fit_seconds": fit_s,
            "eval_seconds": eval_s, "eval": summary}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        md = markdown(json.loads(args.render.read_text()))
        args.render.with_suffix(".md").write_text(md)
        print(md)
        return 0
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    log = lambda msg: print(f"[paper_miniature {time.perf_counter() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    arms = design_arms(args.rows, args.k, args.arms)
    machine = machine_info(*PACKAGES)
    asset_commands = ensure_assets(args.shards, args.encoder, [*args.train, *args.unseen])
    unseen_present, missing = check_languages(args.shards, args.train, args.unseen)
    eval_langs = [*args.train, *unseen_present]
    args.work_dir.mkdir(parents=True, exist_ok=True)

    from alignment.data.manifest import load_manifest
    from alignment.evaluate.encoder import load_encoder

    test_rows = load_manifest(args.shards)["splits"]["test"]["rows"]
    encoder_description = load_encoder(str(args.encoder))[2].describe()

    zs_args = eval_args(str(args.encoder), str(args.shards), eval_langs, args.train, args.work_dir / "zero-shot")
    zs_seconds = run_align(zs_args, "the zero-shot evaluation")
    zero_shot = {"eval_command": "align " + shlex.join(zs_args), "eval_seconds": zs_seconds,
                 "eval": summarize_eval(json.loads((args.work_dir / "zero-shot" / "metrics.json").read_text()),
                                        args.train, args.pivot)}
    log(f"zero-shot: acc all {zero_shot['eval']['accuracy']['all']:.3f} ({zs_seconds:.0f} s)")

    runs = [run_arm(arm, seed, args, eval_langs, log) for seed in args.seeds for arm in arms]
    summary, diffs = aggregate(runs, arms)
    command = report_command("paper_miniature.py", argv)
    report = {
        "date": now(),
        "command": command,
        "machine": machine,
        "settings": {
            "shards": str(args.shards), "encoder": str(args.encoder), "base_config": args.base_config,
            "base_summary": base_summary(runs[0]["resolved_config"]), "train_languages": args.train,
            "unseen_requested": args.unseen, "unseen_present": unseen_present, "missing_unseen": missing,
            "eval_languages": eval_langs, "pivot": args.pivot, "rows": args.rows, "k": args.k, "steps": args.steps,
            "seeds": args.seeds, "fit_args": args.fit_arg,
        },  # fmt: skip
        "design": DESIGN,
        "encoder_description": encoder_description,
        "test_rows": test_rows,
        "asset_commands": asset_commands,
        "arms": [asdict(a) | {"nominal_pairs_per_step": a.rows * a.nominal_pairs_per_row,
                              "nominal_sentences_per_step": a.rows * a.nominal_sentences_per_row} for a in arms],
        "zero_shot": zero_shot,
        "runs": runs,
        "summary": summary,
        "paired_difference": diffs,
        "wall_seconds": time.perf_counter() - start,
    }
    md = markdown(report)
    print(md)
    md_path, js_path = write_report(args.out, result_stem("paper_miniature", report["date"], machine_tag(machine)),
                                    md, report)
    print(f"wrote {md_path} and {js_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
