"""The paper's own protocol in miniature: the same English rows, multi-way with all languages versus En-X, equal epochs.

Fazili & Goswami (2026) translate each English sentence of one corpus into
several languages and compare two trainings over those rows: **multi-way**,
every row carrying all its languages (each sentence an anchor, the row's other
sentences its positives, the rest of the global batch negatives), and the
**En-X** bilingual baseline, each English row paired with one sampled X. Both
run for the same number of epochs over the same English source rows. That is
this design (the third beside :mod:`paper_miniature`'s equal-pairs and
equal-sentences budgets):

- **same rows, same steps**: every arm takes ``--rows`` rows per step
  (``--data.batch_size``) from the same train split, for ``--epochs`` passes
  (steps = epochs x batches per epoch, measured from the run's own data
  pipeline), with the same schedule, learning rate, temperature, max_length
  and frozen depth (``configs/demo.yaml``: the demo's full-depth
  multilingual-E5-small, word embeddings and lower 8 layers frozen);
- **En-X** (``--model.loss.objective en_x``, ``--data.language_policy
  pivot_pair``): English plus one X sampled per row and per epoch, one
  translation pair per row;
- **multi-way, k languages per row** for each ``--k`` (default 2, 3, 5 and 7):
  ``multi_positive`` with ``language_policy k`` (k training languages sampled
  per row, English not forced; k = 7 is every training language, policy
  ``all``). k = 2 is bilingual too, but over every language pair rather than
  only pairs with English: it separates "any pair" from "more languages".

What differs between arms is what the paper's design implies: at equal rows a
multi-way row encodes k sentences and holds k(k-1)/2 translation pairs, an
En-X row two sentences and one pair; so multi-way arms encode more sentences
per step (more compute; measured and printed). Every arm is evaluated with
``align eval`` on the held-out test rows (trained languages, X ↔ Y without
English, never-trained ↔ never-trained, trained ↔ never-trained, xSIM, the
language-ID probe) and on the out-of-domain set the demo builds
(``demo_out/ood.jsonl``: rows from other installed packages' gettext catalogs,
no English string shared with the training corpus).

    python benchmarks/paper_protocol.py                            # 3 seeds, 1 epoch, k = 2 3 5 7 (~1 h, idle 2-core CPU)
    python benchmarks/paper_protocol.py --seeds 0 --k 7 --epochs 0.1   # a quick look
    python benchmarks/paper_protocol.py --render benchmarks/results/paper_protocol-....json

Runs are kept in ``--work-dir``; a run whose ``run.json`` is there is reused
(``--fresh`` retrains). Results: ``benchmarks/results/paper_protocol-<date>-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
import paper_miniature as pm  # noqa: E402
from _common import RESULTS, machine_info, machine_lines, machine_tag, markdown_table, now, result_stem  # noqa: E402
from _common import command_line as report_command  # noqa: E402
from _common import write_results as write_report  # noqa: E402

PAPER = {"bitext_mining": 21.3, "sts": 5.3, "classification": 28.4}
"""Relative gains of multi-way over En-X the paper reports on MTEB (%)."""
HEAD = [("acc/trained", "trained ↔ trained"), ("acc/en_x", "en ↔ X"), ("acc/x_y", "X ↔ Y (no en)"),
        ("acc/unseen", "unseen ↔ unseen"), ("acc/mixed", "trained ↔ unseen"), ("xsim/all", "xSIM error, all (↓)"),
        ("lang_id_acc", "lang-ID probe (↓)")]  # fmt: skip


def design_arms(rows: int, ks: list[int], n_train: int) -> list[pm.Arm]:
    """En-X and one multi-way arm per k, all at ``rows`` rows per step."""
    if rows < 2:
        raise ValueError(f"--rows must be >= 2 (a contrastive batch needs negatives), got {rows}")
    bad = [k for k in ks if not 2 <= k <= n_train]
    if bad:
        raise ValueError(f"--k {bad}: each k must be between 2 and the {n_train} --train-languages")
    arms = [pm.Arm("enx", "En-X (one sampled X per row)", "en_x", "pivot_pair", rows)]
    for k in sorted(set(ks)):
        if k == n_train:
            arms.append(pm.Arm(f"mw{k}", f"multi-way, all {k} languages", "multi_positive", "all", rows))
        else:
            arms.append(pm.Arm(f"mw{k}", f"multi-way, k={k} per row", "multi_positive", "k", rows, k))
    return arms


def batches_per_epoch(argv: list[str]) -> int:
    """Training batches in one epoch of ``align fit ARGV``'s data pipeline (built from its resolved config)."""
    from alignment.data.datamodule import AlignmentDataModule, DataConfig

    data = AlignmentDataModule(DataConfig(**pm.resolved_config(argv).data.as_dict()))
    data.setup("fit")
    return len(data.train_stream)


def ood_args(model: str, ood: str, trained: list[str], out: Path) -> list[str]:
    return ["eval", "--model", model, "--data", ood, "--train_languages", ",".join(trained), "--out", str(out),
            "--encode.quiet", "true"]  # fmt: skip


def evaluate(model: str, args, eval_langs: list[str], out: Path) -> dict:
    """Held-out and out-of-domain ``align eval`` of one model: commands, seconds, grouped summaries."""
    result = {}
    held = pm.eval_args(model, str(args.shards), eval_langs, args.train, out / "eval")
    result["held_out"] = {
        "command": "align " + shlex.join(held),
        "seconds": pm.run_align(held, f"evaluating {model}"),
        "eval": pm.summarize_eval(json.loads((out / "eval" / "metrics.json").read_text()), args.train),
    }
    if args.ood and args.ood.exists():
        ood = ood_args(model, str(args.ood), args.train, out / "eval-ood")
        result["ood"] = {
            "command": "align " + shlex.join(ood),
            "seconds": pm.run_align(ood, f"evaluating {model} (ood)"),
            "eval": pm.summarize_eval(json.loads((out / "eval-ood" / "metrics.json").read_text()), args.train),
        }
    return result


def run_arm(arm: pm.Arm, seed: int, args, eval_langs: list[str], log) -> dict:
    run_dir = args.work_dir / f"{arm.name}-seed{seed}"
    record = run_dir / "run.json"
    if record.exists() and not args.fresh:
        log(f"[{arm.name} seed {seed}] reused {record}")
        return json.loads(record.read_text())

    def fit_argv(steps: int) -> list[str]:
        return pm.fit_args(arm, seed, base_config=args.base_config, encoder=str(args.encoder),
                           shards=str(args.shards), languages=args.train, steps=steps, run_dir=run_dir,
                           extra=args.fit_arg)  # fmt: skip

    per_epoch = batches_per_epoch(fit_argv(1))
    steps = max(1, math.ceil(args.epochs * per_epoch))
    argv = fit_argv(steps)
    replay = pm.replay_batches(argv, steps)
    log(
        f"[{arm.name} seed {seed}] {steps} steps ({args.epochs} epoch(s) of {per_epoch} batches); "
        f"{replay['per_step_mean']['sentences']:.1f} sentences, {replay['per_step_mean']['pairs']:.1f} pairs per step"
    )
    fit_s = pm.run_align(["fit", *argv], f"training {arm.label}, seed {seed}")
    csv_path = next((run_dir / "csv").glob("version_*/metrics.csv"))
    check = pm.check_against_log(csv_path, arm.objective, replay)
    result = evaluate(str(run_dir / "export"), args, eval_langs, run_dir)
    result["held_out"]["eval"]["diagnostics"]["train_loss"] = pm.final_train_loss(csv_path)
    entry = {
        "arm": arm.name,
        "seed": seed,
        "steps": steps,
        "batches_per_epoch": per_epoch,
        "fit_command": "align fit " + shlex.join(argv),
        "fit_seconds": fit_s,
        "accounting": {k: v for k, v in replay.items() if k != "per_step"},
        "log_check": check,
        **result,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(entry, indent=1) + "\n")
    held = result["held_out"]["eval"]["accuracy"]
    log(
        f"[{arm.name} seed {seed}] fit {fit_s:.0f} s; held-out trained {held['trained']:.3f}, x_y {held['x_y']:.3f}, "
        f"unseen {held['unseen']}; log matches replay: {check['matches']}"
    )
    return entry


# --------------------------------------------------------------------------- aggregation and report


def aggregate(runs: list[dict], arms: list[pm.Arm], which: str) -> tuple[dict, dict]:
    """Per arm, stats over seeds of every column of set ``which``; each multi-way arm minus En-X, paired by seed."""
    cols = {a.name: {r["seed"]: pm.columns(r[which]["eval"]) for r in runs if r["arm"] == a.name and which in r}
            for a in arms}  # fmt: skip
    summary = {name: {k: pm.stats([c.get(k) for c in seeds.values()]) for k in sorted({k for c in seeds.values() for k in c})}
               for name, seeds in cols.items()}  # fmt: skip
    diffs = {}
    for name, seeds in cols.items():
        if name == "enx":
            continue
        common = sorted(set(seeds) & set(cols.get("enx", {})))
        keys = sorted({k for s in common for k in seeds[s]})
        diffs[name] = {
            k: pm.stats(
                [
                    None
                    if seeds[s].get(k) is None or cols["enx"][s].get(k) is None
                    else seeds[s][k] - cols["enx"][s][k]
                    for s in common
                ]
            )
            for k in keys
        }
    return summary, diffs


def relative_gain(summary: dict, name: str, key: str) -> float | None:
    """100 (arm - En-X) / En-X of the seed means (the paper reports relative gains)."""
    base, arm = summary.get("enx", {}).get(key, {}).get("mean"), summary.get(name, {}).get(key, {}).get("mean")
    return None if base in (None, 0) or arm is None else 100 * (arm - base) / base


def result_table(report: dict, which: str) -> str:
    summary, diffs = report["summary"][which], report["paired"][which]
    zs = pm.columns(report["zero_shot"][which]["eval"]) if which in report["zero_shot"] else {}
    rows = [["zero-shot (starting encoder)", *(pm._num(zs.get(k)) for k, _ in HEAD), "-"]]
    for arm in report["arms"]:
        s = summary.get(arm["name"], {})
        gain = relative_gain(summary, arm["name"], "acc/trained")
        rows.append(
            [
                arm["label"],
                *(pm._cell(s.get(k, {})) for k, _ in HEAD),
                "-" if arm["name"] == "enx" or gain is None else f"{gain:+.1f}%",
            ]
        )
    for name, d in diffs.items():
        label = next(a["label"] for a in report["arms"] if a["name"] == name)
        rows.append([f"{label} − En-X (paired)", *(pm._cell(d.get(k, {}), signed=True) for k, _ in HEAD), ""])
    return markdown_table(["arm", *(h for _, h in HEAD), "trained vs En-X (relative)"], rows)


def accounting_table(report: dict) -> str:
    rows = []
    for arm in report["arms"]:
        runs = [r for r in report["runs"] if r["arm"] == arm["name"]]
        if not runs:
            continue
        acc = runs[0]["accounting"]
        rows.append([arm["label"], arm["objective"], arm["policy"] + (f" (k={arm['k']})" if arm["k"] else ""),
                     f"{acc['per_step_mean']['rows']:.1f}", f"{acc['per_step_mean']['sentences']:.1f}",
                     f"{acc['per_step_mean']['pairs']:.1f}", runs[0]["steps"], acc["distinct_rows"],
                     f"{sum(r['fit_seconds'] for r in runs) / len(runs):.0f}",
                     f"{sum(r['log_check']['matches'] for r in runs)}/{len(runs)}"])  # fmt: skip
    return markdown_table(["arm", "objective", "language policy", "rows / step", "sentences / step",
                           "translation pairs / step", "steps", "distinct rows seen", "fit s (mean)",
                           "log matches replay"], rows)  # fmt: skip


def design_lines() -> list[str]:
    """The docstring's design paragraphs (intro, bullets, what differs) as Markdown lines."""
    out = []
    for para in __doc__.split("\n\n")[1:4]:
        text = para.replace(":mod:`paper_miniature`", "`benchmarks/paper_miniature.py`").replace("``", "`")
        items = text.split("\n- ") if text.startswith("- ") else [text]
        out += [" ".join(line.strip() for line in item.splitlines()) for item in items]
        out[-len(items) :] = [("- " + x.removeprefix("- ")) if len(items) > 1 else x for x in out[-len(items) :]]
        out.append("")
    return out


def markdown(report: dict) -> str:
    s, z = report["settings"], report["zero_shot"]
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [
        f"# The paper's protocol in miniature: same English rows, multi-way vs En-X, equal epochs ({report['date'][:10]})",
        "", f"- Command: `{report['command']}`", *machine_lines(report["machine"], pm.PACKAGES),
        f"- Date: {report['date']}; wall time {report['wall_seconds'] / 60:.1f} min",
        f"- Encoder: `{s['encoder']}` ({report['encoder_description']}); base config `{s['base_config']}` "
        f"({s['base_summary']})",
        f"- Training: train split of `{s['shards']}` (Django + Wagtail gettext, {report['train_rows']} rows), "
        f"languages {', '.join(s['train_languages'])} (pivot en); {s['rows']} rows per step, {s['epochs']} epoch(s), "
        f"seeds {seeds} (`--seed_everything`, `--data.seed`); mean ± sample sd over seeds",
        f"- Held-out: {report['test_rows']} test rows in {', '.join(s['eval_languages'])} "
        f"(never trained: {', '.join(s['unseen_present'])}); out-of-domain: `{s['ood']}`",
        "", "## Design", "", *design_lines(), "",
        "Measured per-step accounting (seed 0's replay of its data pipeline; the last column checks every run's "
        "logged rows and loss terms at every step against the replay):", "", accounting_table(report), "",
        f"## Held-out test rows ({report['test_rows']}): retrieval accuracy by pair group", "",
        result_table(report, "held_out"), "",
    ]  # fmt: skip
    if "ood" in z:
        lines += [
            "## Out-of-domain rows (other packages' catalogs, no English string shared with training)",
            "",
            result_table(report, "ood"),
            "",
        ]
    lines += ["## Outcome", "", *report["outcome"], "", "## Commands", ""]
    lines += [f"- zero-shot: `{z['held_out']['command']}`" + (f"; `{z['ood']['command']}`" if "ood" in z else "")]
    for arm in report["arms"]:
        run = next((r for r in report["runs"] if r["arm"] == arm["name"]), None)
        if run:
            lines += [f"- {arm['label']} (seed {run['seed']}): `{run['fit_command']}`"]
    return "\n".join(lines) + "\n"


def outcome(report: dict) -> list[str]:
    """Measured statements: each multi-way arm against En-X on the headline groups, seeds ahead, the paper's number."""
    out = []
    for which, title in (("held_out", "held-out"), ("ood", "out-of-domain")):
        for name, d in report["paired"].get(which, {}).items():
            parts = []
            for key, label in HEAD[:5]:
                v = d.get(key)
                if v and v["mean"] is not None:
                    parts.append(
                        f"{label} {v['mean']:+.3f} ({sum(x > 0 for x in v['values'])}/{len(v['values'])} seeds ahead)"
                    )
            label = next(a["label"] for a in report["arms"] if a["name"] == name)
            out.append(f"- {title}, {label} − En-X: " + "; ".join(parts))
    top = max((a["name"] for a in report["arms"] if a["name"] != "enx"), key=lambda n: int(n[2:]), default=None)
    gain = relative_gain(report["summary"]["held_out"], top, "acc/trained") if top else None
    if gain is not None:
        out.append(
            f"- Paper: +{PAPER['bitext_mining']}% bitext mining (MTEB) for multi-way over En-X; here, "
            f"{top} vs En-X on held-out trained-language retrieval accuracy: {gain:+.1f}% (relative, seed means)."
        )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", type=Path, default=Path("demo_out/shards"), help="gettext shard build (make demo)")
    p.add_argument("--encoder", type=Path, default=Path("demo_out/e5"), help="starting encoder (make demo)")
    p.add_argument("--ood", type=Path, default=Path("demo_out/ood.jsonl"), help="out-of-domain rows (make demo)")
    p.add_argument("--base-config", default="configs/demo.yaml", help="align fit config every arm starts from")
    p.add_argument("--train-languages", default=",".join(pm.TRAINED))
    p.add_argument("--unseen-languages", default=",".join(pm.UNSEEN))
    p.add_argument("--rows", type=int, default=16, help="rows per step, every arm (default: %(default)s)")
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 5, 7], help="languages per multi-way row to sweep")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the train split, every arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fit-arg", action="append", default=[], metavar="FLAG", help="extra align fit flag (repeatable)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/paper_protocol"))
    p.add_argument("--fresh", action="store_true", help="retrain runs whose run.json is in --work-dir")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", type=Path, metavar="JSON", help="re-write the .md of a result JSON and exit")
    args = p.parse_args(argv)
    args.train, args.unseen = args.train_languages.split(","), args.unseen_languages.split(",")
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    for key, value in (("WANDB_MODE", "offline"), ("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    start = time.perf_counter()
    log = lambda msg: print(f"[paper_protocol {time.perf_counter() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    arms = design_arms(args.rows, args.k, len(args.train))
    machine = machine_info(*pm.PACKAGES)
    assets = pm.ensure_assets(args.shards, args.encoder, [*args.train, *args.unseen])
    unseen, _ = pm.check_languages(args.shards, args.train, args.unseen)
    eval_langs = [*args.train, *unseen]

    from alignment.data.manifest import load_manifest
    from alignment.evaluate.encoder import load_encoder

    splits = load_manifest(args.shards)["splits"]
    zs_dir = args.work_dir / "zero-shot"
    zs_record = zs_dir / "run.json"
    if zs_record.exists() and not args.fresh:
        zero_shot = json.loads(zs_record.read_text())
    else:
        zero_shot = evaluate(str(args.encoder), args, eval_langs, zs_dir)
        zs_record.write_text(json.dumps(zero_shot, indent=1) + "\n")
    log(f"zero-shot: held-out trained {zero_shot['held_out']['eval']['accuracy']['trained']:.3f}")
    runs = [run_arm(arm, seed, args, eval_langs, log) for seed in args.seeds for arm in arms]
    first = pm.resolved_config(shlex.split(runs[0]["fit_command"])[2:]).as_dict()
    report = {
        "date": now(), "command": report_command("paper_protocol.py", argv), "machine": machine,
        "settings": {"shards": str(args.shards), "encoder": str(args.encoder), "ood": str(args.ood),
                     "base_config": args.base_config, "base_summary": pm.base_summary(first),
                     "train_languages": args.train, "unseen_present": unseen, "eval_languages": eval_langs,
                     "rows": args.rows, "k": args.k, "epochs": args.epochs, "seeds": args.seeds,
                     "fit_args": args.fit_arg},
        "encoder_description": load_encoder(str(args.encoder))[2].describe(),
        "train_rows": splits["train"]["rows"], "test_rows": splits["test"]["rows"], "asset_commands": assets,
        "arms": [asdict(a) for a in arms], "zero_shot": zero_shot, "runs": runs,
    }  # fmt: skip
    report["summary"], report["paired"] = {}, {}
    for which in ("held_out", "ood"):
        report["summary"][which], report["paired"][which] = aggregate(runs, arms, which)
    report["outcome"] = outcome(report)
    report["wall_seconds"] = time.perf_counter() - start
    md = markdown(report)
    print(md)
    paths = write_report(args.out, result_stem("paper_protocol", report["date"], machine_tag(machine)), md, report)
    log(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
