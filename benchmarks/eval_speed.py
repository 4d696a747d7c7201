"""Throughput of ``align eval`` / ``align mine``: sentences/s encoded and pairs/s scored in margin mining.

    python benchmarks/eval_speed.py                          # tiny debug encoder, 10k x 10k mining
    python benchmarks/eval_speed.py --model /tmp/e5-small    # any encoder spec `align eval` takes
    python benchmarks/eval_speed.py --mine-size 2000 --quiet # a quick look

Encoding: ``--sentences`` synthetic sentences (``alignment.synthetic``), encoded
by :func:`alignment.evaluate.encode.encode_texts` exactly as ``align eval``
does (length-sorted batches, inference mode, fp32 on CPU), after one warm-up
batch; reported as sentences/s and real (unpadded) tokens/s.

Mining: :func:`alignment.evaluate.mining.mine` (ratio margin, k=4, max-score)
on ``--mine-size`` x ``--mine-size`` unit vectors of width ``--dim``, half of
the targets noisy copies of sources (planted pairs, so recall is a sanity
check). pairs/s = Nx * Ny / wall seconds of the whole ``mine`` call: two k-NN
searches, the margins and the one-to-one selection. Exact (chunked torch
matmul) always; FAISS ``IndexFlatIP`` when ``faiss`` imports.

A table is printed and written as Markdown + JSON to ``--out`` (default
``benchmarks/results/``), named by date, CPU and core count, with the machine,
the library versions and the exact command in the body.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

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
)
from _common import write_results as write_report  # noqa: E402

# --------------------------------------------------------------------------- encoding


def tiny_model(folder: Path) -> str:
    """The debug encoder (2-layer BERT, hidden 32, projection 16) with random weights, saved to ``folder``."""
    from alignment.model import DualEncoder
    from alignment.synthetic import tiny_tokenizer

    tokenizer = tiny_tokenizer(save_dir=folder)
    torch.manual_seed(0)
    DualEncoder.from_config(DualEncoder.tiny_config(len(tokenizer)), projection_dim=16).save_pretrained(folder)
    return str(folder)


def bench_encoding(
    spec: str, sentences: int, batch_size: int, max_length: int, repeats: int, quiet: bool, label: str | None = None
) -> dict:
    from alignment.evaluate.encode import EncodeConfig, encode_texts, resolve_prefix
    from alignment.evaluate.encoder import load_encoder
    from alignment.synthetic import SYNTHETIC_LANGUAGES, synthetic_rows

    model, tokenizer, info = load_encoder(spec)
    rows = synthetic_rows(sentences // 4 + 1, SYNTHETIC_LANGUAGES[:4], seed=0, max_words=24)
    texts = [t for r in rows for t in r.texts.values()][:sentences]
    config = EncodeConfig(batch_size=batch_size, max_length=max_length, quiet=quiet)
    prefix = resolve_prefix(info, None)
    encode_texts(model, tokenizer, texts[:batch_size], config, prefix=prefix, desc="warm-up")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode_texts(model, tokenizer, texts, config, prefix=prefix, desc="encoding")
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = sum(
        len(ids) for ids in tokenizer([prefix + t for t in texts], truncation=True, max_length=max_length)["input_ids"]
    )
    return {
        "model": label or info.describe(),
        "sentences": len(texts),
        "batch_size": batch_size,
        "max_length": max_length,
        "mean_tokens": tokens / len(texts),
        "seconds": seconds,
        "sentences_per_s": len(texts) / seconds,
        "tokens_per_s": tokens / seconds,
    }


# --------------------------------------------------------------------------- mining


def planted_vectors(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources ``(n, D)``, targets ``(n, D)`` (the first half noisy copies of permuted sources), and the
    ``(n // 2,)`` source index of each planted target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    planted = torch.randperm(n, generator=g)[: n // 2]
    noise = 0.5 * torch.randn(n // 2, dim, generator=g) / dim**0.5  # norm ~0.5: copies keep cosine ~0.9
    y[: n // 2] = torch.nn.functional.normalize(x[planted] + noise, dim=1)
    return x, y, planted


def bench_mining(n: int, dim: int, backend: str, repeats: int) -> dict:
    from alignment.evaluate.mining import MiningConfig, mine

    x, y, planted = planted_vectors(n, dim)
    config = MiningConfig(backend=backend, threshold=1.06)
    times, found = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        found = mine(x, y, config)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    gold = {(int(s), t) for t, s in enumerate(planted.tolist())}
    pairs = {(s, t) for s, t, _ in found.as_list()}
    return {
        "backend": backend,
        "size": f"{n} x {n}",
        "dim": dim,
        "seconds": seconds,
        "pairs_per_s": n * n / seconds,
        "mined": len(found),
        "planted_recall": len(pairs & gold) / len(gold),
        "precision": len(pairs & gold) / len(pairs) if pairs else float("nan"),
        "mined_pairs": sorted(pairs),
    }


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    m, enc = results["machine"], results["encoding"]
    lines = [
        f"# Evaluation speed, {results['date'][:10]}",
        "",
        *machine_lines(m, ("transformers", "faiss")),
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        "",
        "## Encoding (`align eval` / `align mine` path: length-sorted batches, inference mode, fp32)",
        "",
        markdown_table(
            ["model", "sentences", "batch", "max_length", "mean tokens", "seconds", "sentences/s", "tokens/s"],
            [[enc["model"], enc["sentences"], enc["batch_size"], enc["max_length"], f"{enc['mean_tokens']:.1f}",
              f"{enc['seconds']:.2f}", f"{enc['sentences_per_s']:.0f}", f"{enc['tokens_per_s']:.0f}"]],
        ),
        "",
        "## Margin mining (ratio margin, k = 4, max-score, threshold 1.06)",
        "",
        markdown_table(
            ["backend", "size", "dim", "seconds", "pairs/s", "mined", "planted recall", "precision"],
            [[r["backend"], r["size"], r["dim"], f"{r['seconds']:.2f}", f"{r['pairs_per_s']:.3g}", r["mined"],
              f"{r['planted_recall']:.4f}", f"{r['precision']:.4f}"] for r in results["mining"]],
        ),
    ]
    if results.get("exact_faiss_identical") is not None:
        lines += ["", f"Exact and FAISS mined identical pairs: {results['exact_faiss_identical']}."]
    lines += [
        "",
        "pairs/s = Nx x Ny / wall seconds of one `mine()` call (both k-NN searches, margins, one-to-one "
        "selection); median of the repeats.",
    ]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    stem = result_stem("eval_speed", results["date"], results["model_tag"], machine_tag(results["machine"]))
    return write_report(out, stem, markdown(results), results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="encoder spec (default: the tiny debug encoder, built in a temp dir)")
    p.add_argument("--sentences", type=int, default=4000, help="sentences to encode (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=128, help="token limit (default: %(default)s)")
    p.add_argument("--encode-repeats", type=int, default=1, help="timed encoding passes, median (default: %(default)s)")
    p.add_argument("--mine-size", type=int, default=10_000, help="sentences per side for mining (default: %(default)s)")
    p.add_argument("--dim", type=int, default=384, help="embedding width for mining (default: %(default)s, E5-small)")
    p.add_argument("--mine-repeats", type=int, default=3, help="timed mining runs, median (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "HF_HUB_OFFLINE") if k in os.environ)
    command = command_line("eval_speed.py", argv)
    command = f"{env} {command}" if env else command
    results = {"date": now(), "command": command, "model_tag": Path(args.model).name if args.model else "tiny",
               "machine": machine_info("transformers", "faiss")}
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.model or tiny_model(Path(tmp) / "tiny")
        label = None if args.model else "tiny debug encoder (2-layer BERT, hidden 32, random weights), dim 16"
        results["encoding"] = bench_encoding(
            spec, args.sentences, args.batch_size, args.max_length, args.encode_repeats, args.quiet, label
        )
    backends = ["exact"] + (["faiss"] if results["machine"]["faiss"] else [])
    results["mining"] = [bench_mining(args.mine_size, args.dim, b, args.mine_repeats) for b in backends]
    if len(results["mining"]) == 2:
        results["exact_faiss_identical"] = results["mining"][0]["mined_pairs"] == results["mining"][1]["mined_pairs"]
    for r in results["mining"]:
        r.pop("mined_pairs")
    print(markdown(results))
    md, js = write_results(results, args.out)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
