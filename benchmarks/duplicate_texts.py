"""How many false negatives a batch of a real corpus holds: rows sharing a near-identical text.

Reads the train split of a shard build (e.g. the gettext corpus: ``align shards build --format gettext
--from_package django wagtail --languages en,de,fr,es,ru,zh-Hans,ar --out data/gettext``), draws random batches
of ``--rows`` rows and counts, with the loss's own mask (``alignment.negatives.duplicate_mask``), the
(anchor, candidate) pairs of different rows that ``--model.loss.mask_duplicates texts`` and ``rows`` remove.

    python benchmarks/duplicate_texts.py data/gettext --rows 32 256 --out benchmarks/results/duplicate_texts-gettext.md
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch

from alignment.data.identity import text_id
from alignment.data.manifest import iter_shard_rows, load_manifest, manifest_file
from alignment.losses import GlobalCandidates
from alignment.negatives import duplicate_mask, shared_text_incidence


def batch_counts(rows: list[dict[str, str]]) -> dict[str, int]:
    row_ids = torch.tensor([i for i, row in enumerate(rows) for _ in row])
    texts = torch.tensor([text_id(t) for row in rows for t in row.values()])
    cands = replace(GlobalCandidates.single(torch.zeros(len(row_ids), 1), row_ids, torch.zeros_like(row_ids)),
                    text_ids=texts)
    out = {"sentences": len(row_ids), "candidate pairs": len(row_ids) * (len(row_ids) - 1)}
    for mode in ("texts", "rows"):
        mask = duplicate_mask(cands, mode)
        out[f"masked pairs ({mode})"] = int(mask.sum())
        out[f"rows with a masked pair ({mode})"] = len(set(row_ids[mask.any(dim=1)].tolist()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("--rows", type=int, nargs="+", default=[32])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    file = manifest_file(args.shards)
    rows = [dict(row.texts) for shard in load_manifest(file)["splits"]["train"]["shards"]
            for _, row in iter_shard_rows(file.parent / shard["path"])]
    row_ids = torch.tensor([i for i, row in enumerate(rows) for _ in row])
    texts = torch.tensor([text_id(t) for row in rows for t in row.values()])
    incidence = shared_text_incidence(texts, row_ids, len(rows))
    shared = 0 if incidence is None else incidence.shape[1]
    holding = 0 if incidence is None else int((incidence.sum(dim=1) > 0).sum())
    lines = [f"# Duplicate texts in random batches: {file}", "",
             f"train split: {len(rows)} rows, {len(texts)} texts; {shared} texts (by identity) are held by two rows "
             f"or more; {holding} rows ({holding / len(rows):.1%}) share a text with another row.", ""]
    rng = random.Random(0)
    for size in args.rows:
        samples = [batch_counts(rng.sample(rows, size)) for _ in range(args.batches)]
        lines += [f"## {args.batches} random batches of {size} rows", "",
                  "| quantity | mean | median | p90 | max | batches > 0 |", "| --- | --- | --- | --- | --- | --- |"]
        for key in samples[0]:
            values = sorted(s[key] for s in samples)
            lines.append(f"| {key} | {sum(values) / len(values):.2f} | {values[len(values) // 2]} | "
                         f"{values[int(len(values) * 0.9)]} | {values[-1]} | "
                         f"{sum(v > 0 for v in values) / len(values):.1%} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
