"""Before/after table of two ``align eval`` runs: ``python -m alignment.demo_table BEFORE AFTER``.

Per language: retrieval accuracy (mean over both directions with every other
language, ``retrieval_acc_by_lang``), then the summary metrics, with the change.
"""

from __future__ import annotations

import json
import sys

SUMMARY = ("retrieval_acc/mean", "retrieval_acc/seen_mean", "retrieval_acc/unseen_mean", "xsim/mean", "mrr/mean",
           "lang_id_acc", "cos_gap")


def before_after_table(before: dict[str, float], after: dict[str, float]) -> str:
    langs = sorted(k.split("/", 1)[1] for k in after if k.startswith("retrieval_acc_by_lang/"))
    rows = [(f"retrieval_acc {lang}", f"retrieval_acc_by_lang/{lang}") for lang in langs]
    rows += [(name, name) for name in SUMMARY if name in after]
    lines = ["| metric | before | after | change |", "| --- | ---: | ---: | ---: |"]
    for label, key in rows:
        b, a = before.get(key), after.get(key)
        change = f"{a - b:+.4f}" if a is not None and b is not None else ""
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {label} | {fmt(b)} | {fmt(a)} | {change} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m alignment.demo_table BEFORE/metrics.json AFTER/metrics.json", file=sys.stderr)
        return 2
    before, after = (json.load(open(path))["metrics"] for path in argv)
    print(before_after_table(before, after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
