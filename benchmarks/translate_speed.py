"""Throughput of ``align translate``: sentences/s and generated tokens/s of its generation path.

    python benchmarks/translate_speed.py                 # tiny random-weight model of every family (CPU: ~1 min)
    python benchmarks/translate_speed.py --big           # + NLLB-200-distilled-600M's architecture (GPU: bf16)

Each arm builds its model from a config with random weights
(:mod:`alignment.translate.tiny`), loads it through
:class:`~alignment.translate.generate.Translator` exactly as ``align translate
run`` does (length-sorted token-budget batches, bf16 on GPU, fp32 on CPU, beam
search), warms up on a few sentences, then translates ``--sentences`` synthetic
English sentences into each of ``--targets``. Random weights decide when a
sentence stops, so generated tokens/s is the comparable number across arms;
sentences/s is reported as measured. The big arm (615M parameters, 256k
vocabulary) runs by default only where CUDA is available; it reports peak GPU
memory too.

A table is printed and written as Markdown + JSON to ``--out`` (default
``benchmarks/results/``), named by date and machine, with the machine, the
library versions and the exact command in the body.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignment.translate import tiny
from alignment.translate.generate import GenerateConfig, Translator

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


def bench_arm(name: str, folder: Path, texts: list[str], targets: list[str], config: GenerateConfig) -> dict:
    load = time.perf_counter()
    translator = Translator(str(folder), config)
    load = time.perf_counter() - load
    translator.translate(texts[:8], "en", targets[0])  # warm-up: kernels, allocator, tokenizer caches
    if translator.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    translator.throughput = type(translator.throughput)()
    for target in targets:
        translator.translate(texts, "en", target)
    thr = translator.throughput  # generate() returns host tensors: each batch ends in a device sync
    params = sum(p.numel() for p in translator.model.parameters())
    return {
        "arm": name, "family": translator.family, "parameters": params, "device": str(translator.device),
        "dtype": str(translator.dtype).replace("torch.", ""), "load_seconds": round(load, 2),
        "sentences": thr.sentences, "batches": thr.batches, "seconds": round(thr.seconds, 3),
        "sentences_per_second": round(thr.sentences_per_second, 1),
        "generated_tokens_per_second": round(thr.generated_tokens / thr.seconds, 1) if thr.seconds else 0.0,
        "source_tokens_per_second": round(thr.source_tokens / thr.seconds, 1) if thr.seconds else 0.0,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if translator.device.type == "cuda" else None,
    }


def markdown(results: dict) -> str:
    m, g = results["machine"], results["generate"]
    lines = [f"# Translation speed, {results['date'][:10]}", "",
             *machine_lines(m, ("transformers",)),
             f"- command: `{results['command']}`", f"- date: {results['date']}",
             f"- decoding: beams {g['beams']}, max length {g['max_length']}, batch tokens {g['batch_tokens']}; "
             f"{results['sentences']} sentences x targets {','.join(results['targets'])}", "",
             markdown_table(
                 ["arm", "family", "params", "device", "dtype", "sentences/s", "generated tok/s", "source tok/s",
                  "batches", "peak GPU GiB"],
                 [[r["arm"], r["family"], f"{r['parameters'] / 1e6:.2f}M", r["device"], r["dtype"],
                   r["sentences_per_second"], r["generated_tokens_per_second"], r["source_tokens_per_second"],
                   r["batches"], r["peak_gpu_memory_gib"] or "-"] for r in results["arms"]],
                 align="lllllrrrrr",
             )]
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=64, help="English sentences per target")
    p.add_argument("--targets", default="de,zh", help="target languages (every tiny arm knows de and zh)")
    p.add_argument("--families", default=",".join(tiny.FAMILIES), help="tiny arms to run")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                   help="the NLLB-600M-architecture arm (default: on when CUDA is available)")
    p.add_argument("--big-sentences", type=int, default=1024)
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    command = command_line("translate_speed.py", argv)
    config = GenerateConfig(beams=args.beams, max_length=args.max_length, batch_tokens=args.batch_tokens,
                            device=args.device)
    targets = args.targets.split(",")  # canonicalised by the Translator's code map
    texts = tiny.sentences(args.sentences, seed=7)
    results = {"date": now(), "command": command, "machine": machine_info("transformers"), "generate": vars(config) | {}, "sentences": args.sentences,
               "targets": targets, "arms": []}
    big = (torch.cuda.is_available() and args.device != "cpu") if args.big is None else args.big
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            folder = tiny.BUILDERS[family](Path(tmp))  # Marian: opus-mt-en-de, one pair
            arm = bench_arm(f"tiny-{family}", folder, texts, targets if family != "marian" else ["de"], config)
            results["arms"].append(arm)
            print(f"{arm['arm']}: {arm['sentences_per_second']} sentences/s", file=sys.stderr)
        if big:
            folder = tiny.build_nllb(Path(tmp), size=tiny.NLLB_600M, vocab_rows=256206, name="nllb-600m-random")
            big_texts = tiny.sentences(args.big_sentences, seed=8)
            results["arms"].append(bench_arm("nllb-600m-arch (random)", folder, big_texts, targets, config))
        else:
            results["note"] = ("The NLLB-600M-architecture arm did not run (no CUDA here; --big forces it on CPU, "
                               "which takes many minutes on few cores).")
    print(markdown(results))
    stem = result_stem("translate_speed", results["date"], machine_tag(results["machine"]))
    md, js = write_results(args.out, stem, markdown(results), results)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
