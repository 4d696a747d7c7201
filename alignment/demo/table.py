"""Before/after table (and figure) of two ``align eval`` runs.

``python -m alignment.demo.table BEFORE/metrics.json AFTER/metrics.json [--ood OOD_BEFORE OOD_AFTER] [--out DIR]``

Per language: retrieval accuracy (mean over both directions with every other
language, ``retrieval_acc_by_lang``), then the summary metrics, with the change.
``--ood`` adds the same table for the out-of-domain held-out set
(:mod:`alignment.demo.ood`) under its own heading.
With ``--out`` it also writes ``before_after.md`` and ``before_after.png``
(per-language bars, never-trained languages hatched).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SUMMARY = ("retrieval_acc/mean", "retrieval_acc/seen_mean", "retrieval_acc/unseen_mean", "xsim/mean", "mrr/mean",
           "lang_id_acc", "cos_gap")
BY_LANG = "retrieval_acc_by_lang/"


def _languages(metrics: dict[str, float]) -> list[str]:
    return sorted(k[len(BY_LANG):] for k in metrics if k.startswith(BY_LANG))


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = [(f"retrieval_acc {lang}", f"{BY_LANG}{lang}") for lang in _languages(after)]
    rows += [(name, name) for name in SUMMARY if name in after]
    lines = ["| metric | before | after | change |", "| --- | ---: | ---: | ---: |"]
    for label, key in rows:
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.4f}" if a is not None and b is not None else ""
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {label} | {fmt(b)} | {fmt(a)} | {change} |")
    return "\n".join(lines)


def plot_before_after(before: dict[str, float], after: dict[str, float], path: Path,
                      trained: list[str] | None = None) -> Path:
    """Per-language retrieval accuracy before and after, never-trained languages hatched."""
    import numpy as np

    from alignment.evaluate.figures import new_figure

    langs = _languages(after)
    pos = np.arange(len(langs))
    fig = new_figure(max(5.0, 0.7 * len(langs) + 2), 4.0)
    ax = fig.subplots()
    for offset, metrics, label in ((-0.2, before, "zero-shot"), (0.2, after, "aligned")):
        bars = ax.bar(pos + offset, [metrics.get(f"{BY_LANG}{lang}", float("nan")) for lang in langs], width=0.4,
                      label=label)
        for bar, lang in zip(bars, langs):
            if trained is not None and lang not in trained:
                bar.set_hatch("//")
    names = [lang + ("*" if trained is not None and lang not in trained else "") for lang in langs]
    ax.set_xticks(pos, names, rotation=45, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="retrieval accuracy (mean over pairs)",
           xlabel="language (* hatched: never trained on)" if trained is not None else "language",
           title="Held-out bitext retrieval, before and after multi-way alignment")
    ax.legend(fontsize="small", loc="upper left")
    fig.savefig(path, dpi=110)
    return path


def _load(path: str) -> tuple[dict[str, float], list[str] | None]:
    data = json.loads(Path(path).read_text())
    if "metrics" not in data:
        raise SystemExit(f"{path}: not an `align eval` metrics.json (no 'metrics' key)")
    summary = data.get("summary", {})
    trained = summary.get("training_languages")
    # the pivot is trained on too (every training pair has it in En-X; every row has it in multi-way)
    return data["metrics"], None if trained is None else [*trained, summary.get("pivot", "en")]


def _title(path: str, what: str) -> str:
    """``what: N rows, data`` from the summary of an ``align eval`` metrics.json."""
    summary = json.loads(Path(path).read_text()).get("summary", {})
    return f"{what}: {summary.get('num_rows', '?')} rows ({str(summary.get('data', path)).split(' (')[0]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignment.demo.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="metrics.json of the zero-shot evaluation")
    parser.add_argument("after", help="metrics.json of the evaluation after training")
    parser.add_argument("--ood", nargs=2, metavar=("OOD_BEFORE", "OOD_AFTER"),
                        help="metrics.json of both evaluations on the out-of-domain set")
    parser.add_argument("--out", type=Path, help="folder for before_after.md and before_after.png")
    args = parser.parse_args(argv)
    (before, _), (after, trained) = _load(args.before), _load(args.after)
    table = before_after_table(before, after)
    if args.ood:
        (ood_before, _), (ood_after, _) = _load(args.ood[0]), _load(args.ood[1])
        table = (f"## {_title(args.before, 'held-out test rows')}\n\n{table}\n\n"
                 f"## {_title(args.ood[0], 'out-of-domain held-out rows')}\n\n{before_after_table(ood_before, ood_after)}")
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "before_after.md").write_text(table + "\n")
        plot_before_after(before, after, args.out / "before_after.png", trained)
    return 0


if __name__ == "__main__":
    sys.exit(main())
