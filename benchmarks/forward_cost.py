"""Calibration of the chunk plan's per-forward charge (``alignment.encode.FORWARD_COST``).

The length-grouped encoder (``alignment/encode.py``) cuts a step's sentences into chunks; its plan
minimises ``processed token positions + forward_cost * forwards``. ``forward_cost`` is the fixed cost of one
more encoder forward (+ backward) expressed in token positions: ``a / b`` where a training forward+backward
of ``r`` rows padded to ``w`` takes ``t = a + b * r * w`` seconds. This script measures ``t`` (CPU time of
forward + mean pooling + backward, the median of ``--repeats``) over a grid of shapes for BERT-shaped
encoders with random weights, fits ``a`` and ``b`` by least squares and prints ``a / b``::

    python benchmarks/forward_cost.py --threads 1

Results: ``benchmarks/results/forward_cost-<date>-<machine>.md`` (the numbers behind FORWARD_COST).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import RESULTS, command_line, machine_info, machine_lines, machine_tag, now, result_stem  # noqa: E402
from _common import write_results as write_report  # noqa: E402

SHAPES = {  # name -> (layers, hidden, heads, intermediate)
    "tiny": (2, 32, 2, 64),  # DualEncoder.tiny_config: tests, smoke runs, the tiny benchmark
    "e5-small": (12, 384, 12, 1536),  # multilingual-E5-small
    "xlmr-base": (12, 768, 12, 3072),
}
GRID = ((1, 8), (8, 16), (16, 32), (32, 32), (64, 16), (32, 64), (64, 32))
"""(rows, width) of the timed forwards: 8 to 2048 token positions."""


def step_seconds(model, rows: int, width: int, repeats: int) -> float:
    ids = torch.randint(5, 100, (rows, width))
    mask = torch.ones_like(ids)
    times = []
    for i in range(repeats + 1):
        t0 = time.process_time()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden.mean(1).sum().backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first call warms up
            times.append(time.process_time() - t0)
    return statistics.median(times)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``t = a + b * positions``."""
    n = len(points)
    mx = sum(p for p, _ in points) / n
    my = sum(t for _, t in points) / n
    b = sum((p - mx) * (t - my) for p, t in points) / sum((p - mx) ** 2 for p, _ in points)
    return my - b * mx, b


def measure(name: str, repeats: int) -> dict:
    from transformers import AutoModel, BertConfig

    layers, hidden, heads, inter = SHAPES[name]
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, intermediate_size=inter,
                                             max_position_embeddings=128)).train()
    points = [(r * w, step_seconds(model, r, w, repeats)) for r, w in GRID]
    a, b = fit(points)
    return {"model": name, "layers": layers, "hidden": hidden, "points": points, "a_s": a, "b_s": b,
            "forward_cost": a / b if b > 0 else float("inf")}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Per-forward cost of the chunk plan, {meta['date'][:10]}", ""]
    lines += machine_lines(meta["machine"])
    lines += [f"- command: `{meta['command']}`", f"- date: {meta['date']}", "",
              "CPU seconds of one training forward + backward (mean pooling) of `rows x width` positions, "
              "median of the repeats; fit `t = a + b * positions`; forward cost = `a / b` token positions.", "",
              "| model | " + " | ".join(f"{r}x{w}" for r, w in GRID) + " | a (ms) | b (us/position) | a / b |",
              "| --- | " + " | ".join("---:" for _ in GRID) + " | ---: | ---: | ---: |"]
    for r in rows:
        cells = " | ".join(f"{t * 1000:.2f}" for _, t in r["points"])
        lines.append(f"| {r['model']} (L{r['layers']}, H{r['hidden']}) | {cells} | {r['a_s'] * 1000:.2f} | "
                     f"{r['b_s'] * 1e6:.2f} | {r['forward_cost']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(measure(name, args.repeats))
        print(f"[forward_cost] {name}: a/b = {rows[-1]['forward_cost']:.0f} positions", flush=True)
    meta = {"date": now(), "command": command_line("forward_cost.py", argv), "machine": machine_info("transformers")}
    text = markdown(rows, meta)
    print(text)
    stem = result_stem("forward_cost", meta["date"], machine_tag(meta["machine"]))
    write_report(args.out, stem, text, {**meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
