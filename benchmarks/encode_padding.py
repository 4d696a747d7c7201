"""Padding share of the training step's encoder forwards, by ``--model.step.token_budget``.

Streams the real training batches (``AlignmentDataModule``: shards -> multi-way rows -> tokenised, collated
``Batch``) and hands each to ``alignment.encode.encode_grouped`` with a recording stand-in for the model:
every forward the step would run is counted (rows x padded width), nothing is encoded. Deterministic:
token positions and chunk counts, no clock. Budget 0 is the single forward padded to the batch's longest
sentence (the step before length grouping).

    python benchmarks/encode_padding.py --tokenizer demo_out/e5 --shards demo_out/shards

Optionally (``--time_model DIR``) a short forward + backward timing of the grouped encoder on the first
batches, per budget: an indication of the per-forward overhead of many small chunks only (CPU time of one
process on a shared machine), never a proof.

Writes ``benchmarks/results/encode_padding-<date>-<tokenizer>-<machine>.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by path
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

PACKAGES = ("transformers", "tokenizers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. demo_out/e5)")
    p.add_argument("--shards", required=True, help="shard folder with manifest.json (e.g. demo_out/shards)")
    p.add_argument("--languages", default=None, help="comma-separated; default: the manifest's")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--forward-costs", type=int, nargs="+", default=[0, 64, 256, 512],
                   help="forward costs (token positions) also tried at --cost-budget, beside the default")
    p.add_argument("--cost-budget", type=int, default=8192)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--text-prefix", default="query: ")
    p.add_argument("--batches", type=int, default=0, help="batches per setting (0: the whole epoch)")
    p.add_argument("--time_model", default=None, help="a Hugging Face encoder folder for the timing indication")
    p.add_argument("--time-batches", type=int, default=2)
    p.add_argument("--time-batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def stream(args, tokenizer, batch_size: int, bucketing: bool) -> list:
    from alignment.data.datamodule import AlignmentDataModule, DataConfig

    config = DataConfig(train_shards=args.shards, tokenizer=args.tokenizer,
                        batch_size=batch_size, languages=args.languages, max_length=args.max_length,
                        text_prefix=args.text_prefix, num_workers=0, bucketing=bucketing, seed=0)
    dm = AlignmentDataModule(config, tokenizer=tokenizer)
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if args.batches and len(batches) == args.batches:
            break
    return batches


def count(batches: list, budget: int, forward_cost: int | None = None) -> dict:
    """Token positions and forwards the step's encoder runs on ``batches`` under ``budget``."""
    import torch

    from alignment.encode import FORWARD_COST, PaddingStats, encode_grouped

    forward_cost = FORWARD_COST if forward_cost is None else forward_cost

    shapes: list[tuple[int, int]] = []

    def record(batch):
        shapes.append(tuple(batch.input_ids.shape))
        return torch.zeros(batch.num_sentences, 1)

    stats = PaddingStats()
    forwards = []
    for batch in batches:
        before = len(shapes)
        encode_grouped(record, batch, budget, stats, forward_cost)
        forwards.append(len(shapes) - before)
    processed = sum(n * w for n, w in shapes)
    real = int(stats.real)
    assert processed == stats.processed
    return {"budget": budget, "forward_cost": forward_cost if budget else None, "steps": len(batches),
            "sentences": sum(b.num_sentences for b in batches),
            "real_tokens": real, "processed_positions": processed, "padding_share": 1 - real / processed,
            "forwards_per_step": sum(forwards) / len(forwards), "max_forwards_per_step": max(forwards),
            "widest_forward": max(w for _, w in shapes)}  # fmt: skip


def timing(args, batches: list) -> list[dict]:
    """CPU seconds of forward + backward of the grouped encoder: the padded forward, then the default plan and
    each ``--forward-costs`` at ``--cost-budget`` (an indication only)."""
    from alignment.encode import FORWARD_COST, encode_grouped
    from alignment.model import DualEncoder

    model = DualEncoder.from_pretrained(args.time_model).train()
    rows = []
    for budget, cost in [(0, None), (args.cost_budget, FORWARD_COST)] + [(args.cost_budget, c)
                                                                        for c in args.forward_costs]:
        cpu, wall = 0.0, 0.0
        for i, batch in enumerate(batches):
            t0, c0 = time.perf_counter(), time.process_time()
            emb = encode_grouped(model, batch, budget, forward_cost=FORWARD_COST if cost is None else cost)
            emb.sum().backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first batch warms up the allocator and kernels
                wall += time.perf_counter() - t0
                cpu += time.process_time() - c0
        steps = max(len(batches) - 1, 1)
        rows.append({"budget": budget, "forward_cost": cost, "wall_s_per_step": wall / steps,
                     "cpu_s_per_step": cpu / steps})
    return rows


def run(args) -> dict:
    from alignment.loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    table = []
    for bucketing in (False, True):
        for batch_size in args.batch_sizes:
            batches = stream(args, tokenizer, batch_size, bucketing)
            for budget in args.budgets:
                table.append({"batch_size": batch_size, "bucketing": bucketing, **count(batches, budget)})
            for cost in args.forward_costs:
                table.append({"batch_size": batch_size, "bucketing": bucketing,
                              **count(batches, args.cost_budget, cost)})
    times = None
    if args.time_model:
        batches = stream(args, tokenizer, args.time_batch_size, False)[: args.time_batches + 1]
        times = timing(args, batches)
    return {"tokenizer": Path(args.tokenizer).name, "padding_side": tokenizer.padding_side, "table": table,
            "timing": times}


def markdown(report: dict, meta: dict, args) -> str:
    rows = [(r["batch_size"], "yes" if r["bucketing"] else "no", r["budget"] or "none (one padded forward)",
             "-" if r["forward_cost"] is None else r["forward_cost"],
             f"{r['padding_share']:.1%}", f"{r['processed_positions']:,}", f"{r['real_tokens']:,}",
             f"{r['forwards_per_step']:.1f}", r["max_forwards_per_step"], r["steps"])
            for r in report["table"]]  # fmt: skip
    lines = [
        f"# Padding share of the step's encoder forwards, {meta['date'][:10]}",
        "",
        *machine_lines(meta["machine"], PACKAGES),
        f"- data: {args.shards} split train, tokenizer {report['tokenizer']} "
        f"(padding side {report['padding_side']}), max_length {args.max_length}, text prefix {args.text_prefix!r}, "
        f"language policy all, {'whole epoch' if not args.batches else f'{args.batches} batches'} per setting",
        f"- command: `{meta['command']}`",
        "- counted, not timed: every forward `alignment.encode.encode_grouped` runs (rows x padded width); "
        "padding share = 1 - real tokens / processed positions; forward cost = the token positions the chunk "
        "plan charges per forward (`alignment.encode.FORWARD_COST`, default 128)",
        "",
        markdown_table(["rows/batch", "row bucketing", "token budget", "forward cost", "padding",
                        "processed positions", "real tokens", "forwards/step", "max forwards", "steps"], rows,
                       "lllrrrrrrr"),
        "",
    ]
    if report["timing"]:
        lines += [
            f"Timing indication (forward + backward of the grouped encoder {args.time_model}, "
            f"{args.time_batch_size} rows/batch, mean of {args.time_batches} batches after one warm-up; one "
            "process on a shared, loaded machine: an indication of per-forward overhead, not a measurement):",
            "",
            markdown_table(["token budget", "forward cost", "CPU s/step", "wall s/step"],
                           [(t["budget"] or "none", "-" if t["forward_cost"] is None else t["forward_cost"],
                             f"{t['cpu_s_per_step']:.2f}", f"{t['wall_s_per_step']:.2f}")
                            for t in report["timing"]]),  # fmt: skip
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    report = run(args)
    meta = {"date": now(), "command": command_line("encode_padding.py", argv), "machine": machine_info(*PACKAGES),
            "settings": {k: str(v) for k, v in vars(args).items()}}
    text = markdown(report, meta, args)
    print(text)
    stem = result_stem("encode_padding", meta["date"], report["tokenizer"], machine_tag(meta["machine"]))
    md, _ = write_results(args.out, stem, text, {**meta, **report})
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
