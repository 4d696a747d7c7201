"""Deployment variants of one encoder: retrieval quality, model size and encode speed side by side.

Runs what a user runs, in process: ``align fit-map`` (maps fitted on ``--calibration_split``) and ``align eval
--variants ... --maps ...`` on ``--split``; writes ``benchmarks/results/export_variants-<date>-<model>-<machine>
.{md,json}`` with the variants table (fp32, int8 torch dynamic, ONNX fp32, ONNX int8, binary and int8
embeddings) and the unmapped vs mapped retrieval.

    python benchmarks/export_variants.py --model runs/demo/export --data data/gettext \\
        --languages en,de,fr,es,ru,zh-Hans,ar --max_rows 352 --calibration_rows 1000

Sizes and quality are exact; speeds are wall clock of one pass on this machine (indicative when it is shared).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
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

PACKAGES = ("onnx", "onnxruntime", "sentence_transformers", "transformers")


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="export / saved encoder folder / checkpoint")
    p.add_argument("--data", required=True, help="shard build")
    p.add_argument("--split", default="test")
    p.add_argument("--calibration_split", default="train", help="split the maps are fitted on (not --split)")
    p.add_argument("--calibration_rows", type=int, default=1000)
    p.add_argument("--maps_kind", default="centring+procrustes", choices=["procrustes", "centring", "centring+procrustes"])
    p.add_argument("--languages", default=None)
    p.add_argument("--max_rows", type=int, default=None)
    p.add_argument("--variants", default="fp32,int8,onnx,onnx-int8,binary,emb-int8")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--tag", default=None, help="model name in the result file (default: the folder name)")
    p.add_argument("--note", default="", help="a sentence on what the model is, for the report")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> tuple:
    from alignment.commands.eval import EvalRunConfig, evaluate_data
    from alignment.commands.fit_map import FitMapConfig
    from alignment.commands.fit_map import run as fit_map
    from alignment.evaluate.encode import EncodeConfig

    encode = EncodeConfig(batch_size=args.batch_size, max_length=args.max_length, quiet=True)
    start = time.perf_counter()
    maps_dir, _ = fit_map(FitMapConfig(model=args.model, data=args.data, out=str(work / "maps"), kind=args.maps_kind,
                                       split=args.calibration_split, calibration_rows=args.calibration_rows,
                                       languages=args.languages, encode=encode))  # fmt: skip
    fit_seconds = time.perf_counter() - start
    config = EvalRunConfig(model=args.model, data=args.data, split=args.split, languages=args.languages,
                           max_rows=args.max_rows, variants=args.variants, maps=str(maps_dir), hubness_k=0,
                           diagnostics=False, out=str(work / "eval"), encode=encode)  # fmt: skip
    results, _ = evaluate_data(config)
    return results, fit_seconds, config.command_line()


def report(args, results, fit_seconds: float, eval_command: str, machine: dict, argv) -> tuple[str, dict]:
    keys = ("variant", "retrieval_acc", "xsim", "model_mb", "bytes_per_embedding", "sentences_per_s", "cosine_to_fp32")
    fmt = {"retrieval_acc": "{:.4f}", "xsim": "{:.4f}", "model_mb": "{:.1f}", "sentences_per_s": "{:.0f}",
           "cosine_to_fp32": "{:.5f}"}  # fmt: skip
    rows = [[("-" if row[k] is None else fmt.get(k, "{}").format(row[k])) for k in keys] for row in results.variants]
    maps = results.maps
    lines = [
        f"# Deployment variants: {args.tag or Path(args.model).name}",
        "",
        f"- model: {args.model}. {args.note}".rstrip(),
        f"- data: {args.data}, split {args.split}, {results.num_rows} rows, {results.num_sentences} sentences, "
        f"languages {', '.join(results.languages)} (pivot {results.pivot}); retrieval = mean top-1 accuracy over "
        "all ordered language pairs",
        f"- date: {now()}",
        *machine_lines(machine, PACKAGES),
        f"- command: `{command_line('export_variants.py', argv)}`; evaluation: `{eval_command}`",
        "",
        "## Quality / size / speed",
        "",
        markdown_table(("variant", "retrieval acc", "xSIM", "model MB", "bytes/embedding", "sentences/s",
                        "cosine to fp32"), rows),  # fmt: skip
        "",
        "int8 = PyTorch dynamic quantisation of every nn.Linear (CPU); onnx = `align export --format onnx` graph on "
        "onnxruntime (CPU); onnx-int8 = onnxruntime dynamic int8 quantisation of that graph; binary / emb-int8 = "
        "the fp32 model's embeddings through sentence-transformers' quantize_embeddings (ubinary / int8), model "
        "unchanged. Sizes and quality are exact; sentences/s is one wall-clock pass on a shared machine "
        "(indicative only).",
        "",
        f"## Post-hoc maps ({args.maps_kind}, fitted on {args.calibration_rows} {args.calibration_split} rows "
        f"in {fit_seconds:.0f} s)",
        "",
        markdown_table(("", "retrieval acc", "xSIM"), [
            ("unmapped", f"{maps.before.mean('accuracy'):.4f}", f"{maps.before.mean('xsim_error'):.4f}"),
            ("mapped", f"{maps.after.mean('accuracy'):.4f}", f"{maps.after.mean('xsim_error'):.4f}"),
        ]),  # fmt: skip
    ]
    data = {"date": now(), "machine": machine, "command": command_line("export_variants.py", argv),
            "eval_command": eval_command, "settings": {k: str(v) for k, v in vars(args).items()},
            "variants": results.variants, "num_rows": results.num_rows, "num_sentences": results.num_sentences,
            "maps": {"kind": args.maps_kind, "calibration_split": args.calibration_split,
                     "calibration_rows": args.calibration_rows, "fit_seconds": fit_seconds,
                     "before": maps.rows("accuracy"), "xsim": maps.rows("xsim_error"),
                     "mean_before": maps.before.mean("accuracy"), "mean_after": maps.after.mean("accuracy")}}  # fmt: skip
    return "\n".join(lines) + "\n", data


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    machine = machine_info(*PACKAGES)
    with tempfile.TemporaryDirectory(prefix="export-variants-") as tmp:
        results, fit_seconds, eval_command = run(args, Path(tmp))
    markdown, data = report(args, results, fit_seconds, eval_command, machine, argv)
    stem = result_stem("export_variants", data["date"], args.tag or Path(args.model).name, machine_tag(machine))
    md, js = write_results(args.out, stem, markdown, data)
    print(markdown)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
