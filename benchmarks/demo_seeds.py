"""The demo's fine-tune over several seeds: zero-shot vs fine-tuned full-depth E5-small, mean +- sd.

    python benchmarks/demo_seeds.py --demo-out demo_out --seeds 0 1 2

Reads what ``make demo`` built in ``--demo-out`` (``shards/``, ``e5/``, ``ood.jsonl``), evaluates the
zero-shot encoder once on both held-out sets (the test split of the gettext shards, and the
out-of-domain catalogs of :mod:`alignment.demo.ood`; encoding is deterministic), then for each seed
runs ``align fit --config configs/demo.yaml --seed_everything SEED`` exactly as the demo does and
evaluates the export on the same rows. Every command is the user's (``align fit`` / ``align eval``
in a subprocess). Writes ``benchmarks/results/demo_seeds-<date>-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    command_line,
    machine_info,
    machine_lines,
    machine_tag,
    markdown_table,
    now,
    result_stem,
    write_results,
)
from _runs import run_align  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LANGS = "en,de,fr,es,ru,zh-Hans,ar,ja,ko,it,nl,pl,tr,uk,pt-BR"
TRAINED = "en,de,fr,es,ru,zh-Hans,ar"
METRICS = ("retrieval_acc/mean", "retrieval_acc/seen_mean", "retrieval_acc/mixed_mean", "retrieval_acc/unseen_mean",
           "xsim/mean", "lang_id_acc")
SETS = {"test": "held-out test rows (gettext: Django + Wagtail)", "ood": "out-of-domain rows (other packages)"}


def _run(argv: list[str], log: Path) -> dict:
    """Run ``align ARGV`` (:func:`_runs.run_align`); returns wall and CPU seconds (children's user + system)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    return run_align(argv, log, env, cwd=ROOT)


def _eval(model: Path, data_set: str, demo: Path, out: Path, trained: bool) -> dict:
    data = ["--data", str(demo / "shards"), "--split", "test", "--languages", LANGS] if data_set == "test" \
        else ["--data", str(demo / "ood.jsonl")]
    argv = ["eval", "--model", str(model), *data, "--out", str(out)]
    if trained:
        argv += ["--train_languages", TRAINED]  # the fine-tuned export carries them itself
    timing = _run(argv, out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": {k: metrics["metrics"][k] for k in METRICS if k in metrics["metrics"]},
            "rows": metrics["summary"]["num_rows"], **timing}


def _fit(seed: int, demo: Path, runs: Path, extra: list[str]) -> tuple[Path, dict]:
    run = runs / f"seed{seed}"
    paths = runs / f"paths-seed{seed}.yaml"
    paths.write_text(
        f"trainer:\n  default_root_dir: {run}\n  logger: null\nmodel:\n  encoder: {{name_or_path: {demo / 'e5'}}}\n"
        f"data: {{train_shards: {demo / 'shards'}, val_shards: {demo / 'shards'}, tokenizer: {demo / 'e5'}}}\n"
        f"export: {{dir: {run / 'export'}}}\n"
    )
    argv = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(paths),
            "--seed_everything", str(seed), *extra]
    runs.mkdir(parents=True, exist_ok=True)
    return run / "export", _run(argv, runs / f"fit-seed{seed}.log")


def _encoder(folder: Path) -> str:
    card = json.loads((folder / "alignment_encoder.json").read_text())
    return f"{card['num_layers']} layers, vocabulary {card['vocab_size']}" + (" (pruned)" if card.get("vocab_pruned") else "")


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def report(data: dict) -> str:
    seeds = data["seeds"]
    lines = [f"# The demo's fine-tune over {len(seeds)} seed(s): zero-shot vs fine-tuned", "",
             f"- command: `{data['command']}`", f"- date: {data['date']}", *machine_lines(data["machine"]),
             f"- fine-tune: `configs/demo.yaml` (+ `{' '.join(data['fit_args']) or 'no extra flags'}`), "
             f"multilingual-E5-small rebuilt by `align offline-encoder`: {data.get('encoder', '?')}",
             "- seen = pairs of trained languages (en, de, fr, es, ru, zh-Hans, ar; the pivot included), unseen = "
             "pairs of never-trained languages; retrieval accuracy averaged over both directions", ""]
    for key, title in SETS.items():
        before = data["before"][key]["metrics"]
        rows = []
        for name in METRICS:
            after = [run["eval"][key]["metrics"][name] for run in data["runs"]]
            deltas = [a - before[name] for a in after]
            rows.append([name, f"{before[name]:.3f}", _mean_sd(after), _mean_sd(deltas),
                         " ".join(f"{d:+.3f}" for d in deltas)])
        lines += [f"## {title}: {data['before'][key]['rows']} rows", "",
                  markdown_table(["metric", "zero-shot", "fine-tuned (mean ± sd)", "change (mean ± sd)",
                                  "change per seed"], rows), ""]
    fits = [run["fit"] for run in data["runs"]]
    lines += [f"Fit per seed: wall {', '.join(str(f['wall_s']) for f in fits)} s, CPU "
              f"{', '.join(str(f['cpu_s']) for f in fits)} s (shared machine: wall times are indicative only)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-out", type=Path, default=ROOT / "demo_out", help="what `make demo` built")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default: DEMO_OUT/seeds)")
    parser.add_argument("--fit-args", default="", help="extra `align fit` flags, e.g. '--trainer.max_steps 40'")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    demo = args.demo_out.resolve()
    missing = [p for p in ("shards", "e5", "ood.jsonl") if not (demo / p).exists()]
    if missing:
        raise SystemExit(f"{demo}: missing {', '.join(missing)}; run `make demo` (or scripts/demo.sh) first")
    runs = (args.runs or demo / "seeds").resolve()
    runs.mkdir(parents=True, exist_ok=True)
    extra = args.fit_args.split()
    data = {"command": command_line("demo_seeds.py", argv), "date": now(), "machine": machine_info("transformers"),
            "fit_args": extra, "before": {}, "runs": [], "encoder": _encoder(demo / "e5")}
    for key in SETS:
        data["before"][key] = _eval(demo / "e5", key, demo, runs / f"eval-before-{key}", trained=True)
    for seed in args.seeds:
        export, fit = _fit(seed, demo, runs, extra)
        evals = {key: _eval(export, key, demo, runs / f"eval-seed{seed}-{key}", trained=False) for key in SETS}
        data["runs"].append({"seed": seed, "fit": fit, "eval": evals})
        print(f"seed {seed}: fit {fit['wall_s']} s; " + "; ".join(
            f"{key} mean {evals[key]['metrics']['retrieval_acc/mean']:.3f}" for key in SETS), flush=True)
    data["seeds"] = args.seeds
    markdown = report(data)
    md, js = write_results(args.out, result_stem("demo_seeds", data["date"], machine_tag(data["machine"])), markdown,
                           data)
    print(markdown)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
