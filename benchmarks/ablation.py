"""Ablation of the objectives beyond the paper's loss (issue 18): the demo's run, each addition alone, the best combination.

Starting point: the demo (``configs/demo.yaml``, read at run time, plus the
encoder and shards that ``scripts/demo.sh`` builds in ``--demo_out``: ``e5/``
and ``shards/``). Arms, each ``align fit --config configs/demo.yaml --config
paths.yaml`` plus its flags, in a subprocess as a user runs it:

* ``baseline``: the demo config as it is. Note that it already masks false negatives: the default
  ``--model.loss.mask_duplicates rows`` drops, as negatives, every pair of rows sharing a
  near-identical text ("Save" of Django and "Save" of Wagtail);
* additions (each enters the ``combined`` selection when it beats the baseline):
  ``adversarial`` (``--model.adversarial.weight``: language discriminator, gradient reversal),
  ``neighbourhood`` (``--model.neighbourhood.weight``: within-language structure of the starting model),
  ``distill`` (``--model.distill.teacher`` = the starting encoder itself, or ``--teacher``),
  ``matryoshka`` (``--model.matryoshka.dims``: the contrastive loss on nested prefixes too),
  ``drift`` (``--model.loss.drift_weight``: pointwise pull towards the starting model),
  ``hard_negatives``: ``align mine-negatives --shards COPY --model ENCODER --k 4`` first, once, with
  the starting encoder, into a copy of the shard build in ``--work_dir`` (the demo's own shards are
  never written), then ``--data.train_shards COPY --data.hard_negatives 2`` (``--hard_negatives K``):
  each drawn row's first K mined negatives join its batch, so a step holds up to ``batch_size x
  (1 + K)`` rows (the report shows the logged rows per step: the arm buys its negatives with compute);
* controls of a default (never an addition, never combined): ``no_duplicate_mask``
  (``--model.loss.mask_duplicates off``: what the baseline's false-negative control is worth, read
  with the sign reversed) and, by name only, ``mask_texts`` (``texts``: only the pairs of the same
  text masked, the rest of the two rows stay negatives);
* post-hoc rows (no training): ``baseline+centring`` / ``baseline+procrustes``: ``align fit-map
  --model <baseline export> --data SHARDS --split validation --kind centring|procrustes --export OUT``
  on each baseline seed's export, then the routed export (a sentence-transformers Router,
  ``task=<language>``) evaluated like every run;
* ``combined``: the flags of every addition whose mean all-pairs retrieval accuracy beat the
  baseline's (run only when at least two did; ``--combine a,b`` names them instead).
  ``--extra_arm NAME=FLAGS`` adds another addition.

Every run is evaluated with ``align eval`` on the held-out split of the shards
(``--max_rows`` of them), and on an out-of-domain set when there is one
(``--ood``, else ``<demo_out>/ood.jsonl`` or ``<demo_out>/ood/`` when present):
retrieval accuracy grouped trained ↔ trained / unseen ↔ unseen / X ↔ Y (trained,
no pivot) / trained ↔ unseen, xSIM error, the language-ID probe accuracy; and
a monolingual check, :func:`_runs.structure_spearman`: per language,
the Spearman correlation between the pairwise cosine similarities of that
language's held-out sentences under the trained model and under the starting
model (1 = the monolingual neighbourhood structure is untouched; what alignment
costs monolingually; a Router export encodes through its route). Mean ± sd over ``--seeds`` per arm.

    python benchmarks/ablation.py --demo_out demo_out                         # demo budget, 3 seeds
    python benchmarks/ablation.py --demo_out demo_out --steps 40 --seeds 0 \\
        --freeze_layers 10 --max_rows 150                                       # a budget a shared CPU affords
    python benchmarks/ablation.py --render benchmarks/results/ablation-....json  # re-write the .md

Run from the repository root. Results: ``benchmarks/results/ablation-<date>-<tag>-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
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
from _runs import (  # noqa: E402,F401 - structure_spearman: this script's documented check
    aggregate,
    describe_budget,
    embed_by_language,
    eval_args,
    fit_args,
    monolingual,
    resolved_budget,
    run_align,
    structure_spearman,
    summarize_eval,
    train_log,
    write_paths,
)

PACKAGES = ("lightning", "transformers")
ADDITIONS = ("adversarial", "neighbourhood", "distill", "matryoshka", "drift", "hard_negatives")
CONTROLS = {"no_duplicate_mask": "off", "mask_texts": "texts"}
"""Arms that change a default of the baseline (``--model.loss.mask_duplicates``, default ``rows``): not additions."""
POSTHOC = {"baseline+centring": "centring", "baseline+procrustes": "procrustes"}
"""Rows fitted after training on each baseline export (``align fit-map --kind``): no training of their own."""
DEFAULT_ARMS = ("baseline", *ADDITIONS, "no_duplicate_mask", *POSTHOC, "combined")
MINE_K = 4
"""Negatives mined per row (``align mine-negatives --k``); training uses the first ``--hard_negatives``."""
SELECT = "acc/all"
"""The number that decides which additions enter the combination (held-out set)."""
LABELS = {"zero-shot": "zero-shot (starting encoder)",
          "no_duplicate_mask": "baseline − duplicate mask (off: removes a default)",
          "mask_texts": "baseline, duplicate mask texts (not rows): changes a default",
          "baseline+centring": "baseline + centring (post-hoc, no training)",
          "baseline+procrustes": "baseline + Procrustes (post-hoc, no training)"}  # fmt: skip


# --------------------------------------------------------------------------- the arms


def matryoshka_dims(width: int) -> list[int]:
    """Nested prefixes below the full ``width``: 64/128/256 where they fit, else a quarter and a half."""
    dims = [d for d in (64, 128, 256) if d < width]
    return dims or sorted({max(1, width // 4), max(1, width // 2)} - {width})


def arm_flags(name: str, *, steps: int, teacher: str, width: int, mined: Path | None = None, k: int = 2) -> list[str]:
    """The ``align fit`` flags of one built-in arm (the recipes' weights, schedules scaled to ``steps``).

    ``hard_negatives`` trains on ``mined`` (the copy of the shards that ``align mine-negatives`` wrote into)."""
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
    if name in CONTROLS:
        return ["--model.loss.mask_duplicates", CONTROLS[name]]
    if name == "hard_negatives":
        if mined is None:
            raise ValueError("hard_negatives: no mined shard copy")
        return ["--data.train_shards", str(mined), "--data.hard_negatives", str(k)]
    raise ValueError(f"unknown arm {name!r}")


def combined_flags(names: Sequence[str], flags: dict[str, list[str]]) -> list[str]:
    """The flags of several arms, in order (a later arm's flag overrides an earlier one, as on a command line)."""
    return [f for name in names for f in flags[name]]


def choose_combination(summary: dict, additions: Sequence[str], metric: str = SELECT) -> list[str]:
    """Additions whose mean ``metric`` beat the baseline's (held-out), best first. Controls of a default and post-hoc
    rows are never candidates, whatever ``additions`` holds."""
    base = summary.get("baseline", {}).get(metric, {}).get("mean")
    if base is None:
        return []
    better = [
        (summary[a][metric]["mean"], a)
        for a in additions
        if a not in CONTROLS and a not in POSTHOC and a not in ("baseline", "combined")
        and summary.get(a, {}).get(metric, {}).get("mean") is not None and summary[a][metric]["mean"] > base
    ]  # fmt: skip
    return [a for _, a in sorted(better, reverse=True)]


def mine_args(mined: Path, encoder: Path, max_length: int) -> list[str]:
    """``align mine-negatives`` into the shard copy with the starting encoder (the training's truncation)."""
    return ["mine-negatives", "--shards", str(mined), "--model", str(encoder), "--k", str(MINE_K),
            "--encode.max_length", str(max_length), "--encode.quiet", "true"]  # fmt: skip


def fit_map_args(export: Path, shards: Path, kind: str, run_dir: Path, split: str = "validation") -> list[str]:
    """``align fit-map`` on ``split`` (the evaluation reads the test split) and its routed export. A Procrustes map
    fitted on fewer rows than the embedding has dimensions (the demo's validation split: 114 rows, 384 dims) is
    underdetermined: ``--map_split train`` calibrates on the training rows instead."""
    return ["fit-map", "--model", str(export), "--data", str(shards), "--split", split, "--kind", kind,
            "--out", str(run_dir / "maps"), "--export", str(run_dir / "export"), "--overwrite", "true",
            "--encode.quiet", "true"]  # fmt: skip


# --------------------------------------------------------------------------- evaluation


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
            timings[f"eval_{name}_s"] = run_align(argv, out / f"eval-{name}.log", env)["wall_s"]
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
    """What helps and what does not, as measured: each arm against the baseline, read by its kind (an addition, the
    removal or change of a default, a post-hoc map)."""
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
            else ("no change at 3 decimals" if abs(acc) < 5e-4 else "higher" if acc > 0 else "lower")
        )
        kind = (
            f"removes the default mask: the mask itself is worth {-acc:+.3f}; "
            if arm == "no_duplicate_mask"
            else "changes a default; "
            if arm in CONTROLS
            else "post-hoc, no training; "
            if arm in POSTHOC
            else ""
        )
        lines.append(
            f"- **{arm}** ({kind or 'addition; '}{'this arm ' if kind else ''}{verdict}"
            + ("" if noise is not None else f", {n_seeds} seed: no noise estimate")
            + f"): all-pairs retrieval {acc:+.3f} vs baseline"
            + (f", X↔Y {xy:+.3f}" if xy is not None else "")
            + (f", monolingual structure ρ (trained languages) {mono:+.3f}" if mono is not None else "")
            + "."
        )  # fmt: skip
    return lines


def train_table(summary: dict, labels: dict) -> str:
    """The training log per arm: loss, discriminator accuracy, rows per step, masked negatives (means over seeds)."""
    cols = [("train_loss", "train loss (last 5)"), ("disc_acc", "discriminator acc"),
            ("rows_per_step", "rows / step"), ("masked_negatives", "masked negatives / step")]  # fmt: skip
    rows = [[labels.get(a, a), *(_cell(c.get(k)) for k, _ in cols)] for a, c in summary.items() if "train_loss" in c]
    return markdown_table(["arm", *(h for _, h in cols)], rows)


def markdown(report: dict) -> str:
    s = report["settings"]
    mined = report.get("mined")
    lines = ["# Ablation: objectives beyond the paper's loss (issue 18)", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             *machine_lines(report["machine"], PACKAGES),
             f"- base config: `{s['config']}` (read at run time) with the encoder `{s['encoder']}` and shards "
             f"`{s['shards']}`; trained languages {', '.join(s['trained'])}; pivot {s['pivot']}",
             f"- budget: {s['budget']}", f"- seeds: {', '.join(map(str, s['seeds']))}; mean ± sd over seeds "
             "(sd only with 2 or more seeds)", f"- a full run: {s['full_run']}",
             *([f"- hard negatives mined once ({mined['wall_s']:.0f} s) with the starting encoder into a copy of the "
                f"shards: `{mined['command']}`; the arm trains with the first {mined['k_used']} per row, so a step "
                f"holds up to {mined['k_used'] + 1}× the batch's rows (rows / step below)"] if mined else []), "",
             "Columns: retrieval accuracy (P@1, both directions) averaged over ordered language pairs of each group; "
             "xSIM error (margin, all pairs; lower is better); language-ID linear-probe accuracy (lower = less "
             "language identity left in the embeddings); mono ρ: per language, Spearman correlation between the "
             "pairwise cosine similarities of its held-out sentences under the trained and the starting model "
             "(1 = monolingual structure untouched), averaged over trained / unseen languages. The baseline masks "
             "duplicate-row negatives (the default); `no_duplicate_mask` removes that mask (read its change with "
             "the sign reversed); post-hoc rows are maps fitted on the "
             f"{s.get('map_split', 'validation')} split of each baseline export.", ""]  # fmt: skip
    for name, summary in report["summary"].items():
        lines += [f"## {name} set ({s['eval_sets'][name]})", "", table(summary, report["labels"]), ""]
    held = report["summary"].get("held-out", {})
    if any("train_loss" in c for c in held.values()):
        lines += ["## Training log", "", train_table(held, report["labels"]), ""]
    lines += ["## Arms", ""]
    lines += [f"- `{a}`: `{' '.join(f) or '(demo config as is)'}`" for a, f in report["arm_flags"].items()]
    lines += ["", f"Combination: {report['combination_note']}", ""]
    if report.get("skipped_arms"):
        lines += [f"Not run: {'; '.join(report['skipped_arms'])}", ""]
    lines += ["## What helps (held-out set, as measured at this budget)", "",
              *outcome_lines(held, len(s["seeds"])), "", f"Total wall time {report['wall_s']:.0f} s."]  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo_out", type=Path, default=Path("demo_out"), help="folder with e5/ and shards/")
    p.add_argument("--encoder", type=Path, help="starting encoder (default: <demo_out>/e5)")
    p.add_argument("--shards", type=Path, help="shards (default: <demo_out>/shards)")
    p.add_argument("--config", default="configs/demo.yaml", help="the base config (the demo's)")
    p.add_argument("--arms", help=f"comma-separated arms (default: {','.join(DEFAULT_ARMS)}; also: mask_texts)")
    p.add_argument("--combine", help="comma-separated additions to combine (default: those that beat the baseline)")
    p.add_argument("--extra_arm", action="append", default=[], metavar="NAME=FLAGS",
                   help="another addition: its name and its align fit flags, e.g. 'lr=--model.optim.lr 1e-4'")  # fmt: skip
    p.add_argument("--teacher", help="distillation teacher (default: the starting encoder)")
    p.add_argument("--hard_negatives", type=int, default=2, help=f"K of --data.hard_negatives (<= {MINE_K} mined)")
    p.add_argument("--map_split", default="validation", help="the split the post-hoc maps calibrate on")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, help="--trainer.max_steps (default: the config's)")
    p.add_argument("--freeze_layers", type=int, help="--model.encoder.freeze_layers (default: the config's)")
    p.add_argument("--max_rows", type=int, help="evaluate the first N held-out rows (default: all)")
    p.add_argument("--eval_languages", type=lambda s: s.split(","), help="languages to evaluate (default: all)")
    p.add_argument("--ood", help="out-of-domain evaluation data (default: <demo_out>/ood.jsonl or ood/ when present)")
    p.add_argument("--pivot", default="en")
    p.add_argument("--fit_args", default="", help="extra align fit flags for every run (one string)")
    p.add_argument("--work_dir", type=Path, default=Path("ablation_runs"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="a word for the result's name (e.g. the budget)")
    p.add_argument("--full_run_estimate", default="not measured", help="what a full run would take, for the report")
    p.add_argument("--reuse", action="store_true",
                   help="take runs a previous invocation finished in --work_dir (their run.json; a finished fit's export)")  # fmt: skip
    p.add_argument("--prune_exports", action="store_true",
                   help="delete each run's export once evaluated (and used by the post-hoc rows): about 0.5 GB each")  # fmt: skip
    p.add_argument("--render", type=Path, help="re-write the Markdown of a result JSON and exit")
    args = p.parse_args(argv)
    args.encoder = args.encoder or args.demo_out / "e5"
    args.shards = args.shards or args.demo_out / "shards"
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if not 1 <= args.hard_negatives <= MINE_K:
        raise SystemExit(
            f"--hard_negatives {args.hard_negatives}: between 1 and {MINE_K} (the mined negatives per row)"
        )
    return args


def eval_sets(args) -> dict[str, str]:
    sets = {"held-out": str(args.shards)}
    ood = args.ood or next((str(p) for p in (args.demo_out / "ood.jsonl", args.demo_out / "ood") if p.exists()), None)
    return sets | ({"out-of-domain": ood} if ood else {})


def plan_arms(args) -> tuple[list[str], dict[str, list[str]]]:
    """The arms to run, in order (post-hoc rows after the baseline, ``combined`` last) and the flags of each arm."""
    config = yaml.safe_load(open(args.config))
    steps = args.steps or config["trainer"]["max_steps"]
    width = json.loads((args.encoder / "config.json").read_text()).get("hidden_size", 384)
    teacher, mined = str(args.teacher or args.encoder), args.work_dir / "shards-mined"
    known = ["baseline", *ADDITIONS, *CONTROLS]
    flags = {a: arm_flags(a, steps=steps, teacher=teacher, width=width, mined=mined, k=args.hard_negatives)
             for a in known}  # fmt: skip
    flags.update({a: [] for a in POSTHOC})
    for spec in args.extra_arm:
        name, _, text = spec.partition("=")
        flags[name] = shlex.split(text)
    arms = args.arms.split(",") if args.arms else [*DEFAULT_ARMS[:-1], *(s.partition("=")[0] for s in args.extra_arm),
                                                     "combined"]  # fmt: skip
    unknown = [a for a in arms if a not in flags and a != "combined"]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join([*flags, 'combined'])}")
    if any(a in POSTHOC for a in arms) and "baseline" not in arms:
        raise SystemExit(f"--arms: {', '.join(a for a in arms if a in POSTHOC)} need the baseline arm (its exports)")
    return sorted(arms, key=lambda a: (a == "combined", a in POSTHOC)), flags


def mine_negatives(args, env: dict, log) -> dict:
    """Copy the shard build into ``--work_dir`` and mine it with the starting encoder (once; the demo's own shards
    are never written). The command, its time and where the copy lies."""
    mined, record_path = args.work_dir / "shards-mined", args.work_dir / "mined.json"
    if args.reuse and record_path.exists():
        return json.loads(record_path.read_text())
    if mined.exists():
        shutil.rmtree(mined)  # an earlier, unfinished copy
    shutil.copytree(args.shards, mined)
    max_length = yaml.safe_load(open(args.config))["data"]["max_length"]
    argv = mine_args(mined, args.encoder, max_length)
    log(f"hard negatives: align {shlex.join(argv)}")
    timing = run_align(argv, args.work_dir / "mine-negatives.log", env)
    entry = {"command": "align " + shlex.join(argv), "copy_of": str(args.shards), "k_mined": MINE_K,
             "k_used": args.hard_negatives, **timing}  # fmt: skip
    fsutil.publish_file(record_path, json.dumps(entry, indent=1) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(report))
        return 0
    started = time.perf_counter()
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    arms, flags = plan_arms(args)
    config = yaml.safe_load(open(args.config))
    trained = list(config["data"]["languages"])
    sets = eval_sets(args)
    log = lambda msg: print(f"[ablation {time.perf_counter() - started:6.0f} s] {msg}", flush=True)  # noqa: E731

    log(f"arms {arms}; seeds {args.seeds}; eval sets {sets}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    wanted = [*arms, *(args.combine or "").split(",")]
    mined = mine_negatives(args, env, log) if "hard_negatives" in wanted else None
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
        log(f"{entry['arm']} seed {entry['seed']}: "
            + json.dumps({k: round(v, 3) for k, v in entry["eval"]["held-out"].items() if v is not None and "/lang/" not in k}))  # fmt: skip

    def prune(run_dir: Path) -> None:
        if args.prune_exports and (run_dir / "export").is_dir():
            shutil.rmtree(run_dir / "export")

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
        timings = {} if trained_before else {"fit_s": run_align(argv, run_dir / "fit.log", env)["wall_s"]}
        result = evaluate(run_dir / "export", sets, run_dir, args, trained, start_emb, env, timings)
        record(run_dir, {"arm": arm, "seed": seed, "fit_command": "align " + shlex.join(argv), "flags": arm_flags_,
                         "eval": result, "train": train_log(run_dir / "csv" / "version_0" / "metrics.csv"),
                         "resolved": resolved_budget(run_dir / "config.yaml"), "timings": timings})  # fmt: skip
        if arm != "baseline":
            prune(run_dir)

    def posthoc(arm: str, seed: int) -> None:
        run_dir, base = args.work_dir / f"{arm}-seed{seed}", args.work_dir / f"baseline-seed{seed}" / "export"
        if finished(run_dir):
            return
        if not base.is_dir():
            raise SystemExit(f"{arm} seed {seed}: no baseline export at {base} (pruned? rerun without --reuse)")
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = fit_map_args(base, args.shards, POSTHOC[arm], run_dir, args.map_split)
        log(f"{arm} seed {seed}: align {shlex.join(argv)}")
        timings = {"fit_map_s": run_align(argv, run_dir / "fit-map.log", env)["wall_s"]}
        result = evaluate(run_dir / "export", sets, run_dir, args, trained, start_emb, env, timings)
        record(run_dir, {"arm": arm, "seed": seed, "fit_command": "align " + shlex.join(argv), "flags": [],
                         "eval": result, "timings": timings})  # fmt: skip
        prune(run_dir)

    for arm in (a for a in arms if a != "combined" and a not in POSTHOC):
        for seed in args.seeds:
            run(arm, flags[arm], seed)
            if arm == "baseline":
                for extra in (a for a in arms if a in POSTHOC):
                    posthoc(extra, seed)
                prune(args.work_dir / f"baseline-seed{seed}")
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
                     "full_run": args.full_run_estimate, "select_metric": SELECT, "map_split": args.map_split},
        "arm_flags": {a: flags[a] for a in dict.fromkeys(r["arm"] for r in runs) if a in flags and a not in POSTHOC},
        "labels": LABELS | ({"hard_negatives": f"hard negatives (K={args.hard_negatives} of {MINE_K} mined)"} if mined else {}),
        "mined": mined, "combination_note": combination_note,
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
