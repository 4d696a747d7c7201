"""``align translate run | merge | codes``: a multi-way corpus from source-language text and an NMT model.

A thin layer: flags -> :class:`~alignment.translate.run.TranslateConfig` (its
field docstrings are the flags' help), then
:func:`~alignment.translate.run.run_rank` or :func:`~alignment.translate.parts.merge`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence

from alignment.commands.common import (
    add_config,
    fail,
    new_parser,
    parse,
    parse_error_message,
    with_bool_values,
)
from alignment.data.rows import CorpusError
from alignment.translate.codes import Family, LanguageNotSupported
from alignment.translate.filters import format_filter_report
from alignment.translate.parts import PartsError, format_manifest, merge
from alignment.translate.run import TranslateConfig, run_rank

EXAMPLES = """\
examples:
  # English sentences (one per line) into six languages with NLLB; then shards, then training
  align translate run news.en.txt --model facebook/nllb-200-distilled-600M --targets de,fr,es,ru,zh,ar --out data/syn
  align shards build --format jsonl data/syn/corpus.jsonl --out data/syn-shards

  # on 8 GPUs of one node (each rank takes every 8th part; the last one to finish merges)
  torchrun --nproc-per-node 8 -m alignment.cli translate run news.en.txt --model ... --targets ... --out data/syn

  # a killed run resumes where it stopped: the same command again (finished parts are kept)

  # with filters: language id, length ratio, round-trip chrF, embedding margin
  align translate run news.en.txt --model M --targets de,fr --out data/syn --filters.check_language \\
      --filters.max_length_ratio 3 --filters.min_roundtrip_chrf 30 \\
      --filters.similarity_model intfloat/multilingual-e5-small --filters.min_margin 1.02

  # beam 5, bf16, smaller batches; every flag from a YAML file
  align translate run news.en.txt --model M --targets de --out data/syn --generate.beams 5 --generate.dtype bf16
  align translate run --config translate.yaml --generate.batch_tokens 8192

  # back-translation of monolingual Swahili: sw -> en, then en -> de, fr; rows anchored on the Swahili
  align translate run sw.txt --source sw --via en --targets en,de,fr --model M --out data/bt-sw

  # which codes does a model know?
  align translate codes --model facebook/nllb-200-distilled-600M --languages de,zh,pt-BR

on a cluster: an array job of N tasks, then a dependent merge (slurm/translate.sbatch, rendered and submitted):
  align submit --job translate --array_tasks 8 --time 04:00:00 -- news.en.txt --model M --targets de,fr --out data/syn
"""


RUN_DESCRIPTION = (
    "Translate INPUT text into --targets with a seq2seq model, in deterministic parts that are published atomically "
    "(a rerun resumes), filter the outputs, and merge the parts into OUT/corpus.jsonl "
    "(rows for `align shards build --format jsonl`)."
)


def run_parser():
    """``align translate run``: INPUT... and every field of :class:`TranslateConfig` (``--generate.*``,
    ``--filters.*``)."""
    p = new_parser("translate run", RUN_DESCRIPTION, EXAMPLES)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="Input files: plain text (one sentence per line), "
                   "JSONL rows, or shards (a folder with manifest.json).")
    add_config(p, TranslateConfig, skip={"inputs", "targets"})
    p.add_argument("--targets", type=str, required=True, help="Target languages, comma-separated BCP-47 or the "
                   "model's own codes (de,fr,zh or deu_Latn,...).")
    return p


def _config(p, ns) -> TranslateConfig:
    values = p.instantiate(ns)
    kwargs = {f.name: values[f.name] for f in dataclasses.fields(TranslateConfig) if f.name in values}
    return TranslateConfig(**kwargs)


def parse_run_args(argv: list[str]) -> TranslateConfig:
    """``align translate run`` flags -> a checked :class:`TranslateConfig`, without running anything.

    ``align submit --job translate`` validates the job's arguments with this before sbatch.

    Raises:
        ValueError: an unknown or malformed flag (the parser's message, naming it) or a bad value.
    """
    p = run_parser()
    try:
        ns = p.parse_args(with_bool_values(p, list(argv)))
    except argparse.ArgumentError as exc:
        message = parse_error_message(exc, "align translate run").split("\n")[0]
        raise ValueError(message.removeprefix("align translate run: error: ")) from None
    except SystemExit as exc:  # --help / --print_config
        raise ValueError("--help and --print_config cannot be part of a submitted job") from exc
    return _config(p, ns)


def _error(command: str, exc: BaseException) -> int:
    print(f"align translate {command}: error: {exc}", file=sys.stderr)
    return 1


ERRORS = (ValueError, CorpusError, PartsError, LanguageNotSupported, FileNotFoundError)


def run(argv: Sequence[str]) -> int:
    from alignment.distributed import launcher_slot
    from alignment.evaluate.encode import EncodeConfig, quiet_library_bars

    p = run_parser()
    args = parse(p, argv, "translate run")
    quiet_library_bars(EncodeConfig())  # transformers' loading bars only on a terminal: batch logs stay clean
    start = time.perf_counter()
    try:
        config = _config(p, args)
        rank, world = (config.rank, config.world_size) if config.rank is not None else launcher_slot()
        summary = run_rank(config, rank, world, command=shlex.join(["align", "translate", "run", *sys.argv[3:]])
                           if sys.argv[1:3] == ["translate", "run"] else None)  # fmt: skip
    except ERRORS as exc:
        return _error("run", exc)
    thr = summary["throughput"]
    if thr:
        print(f"[rank {rank}/{world}] translated {thr['sentences']} sentences in {thr['seconds']:.1f} s: "
              f"{thr['sentences_per_second']:.1f} sentences/s ({summary['model']['model']}, "
              f"{summary['model']['family']})")
    if summary["skipped"]:
        print(f"[rank {rank}/{world}] {len(summary['skipped'])} part(s) already finished, kept")
    manifest = summary["manifest"]
    if manifest is not None:
        print(format_filter_report(manifest["filters"]))
        print(format_manifest(manifest))
        print(f"wrote {args.out}/corpus.jsonl in {time.perf_counter() - start:.1f} s; next: "
              f"align shards build --format jsonl {args.out}/corpus.jsonl --out SHARDS")
    return 0


def merge_parser():
    p = new_parser("translate merge", "Check that every part of the run in OUT is finished and intact, then write "
                   "OUT/corpus.jsonl (parts in order) and OUT/manifest.json (settings, filter report, provenance, "
                   "speed). Example: align translate merge data/syn (see slurm/translate.sbatch)")
    p.add_argument("out", metavar="OUT", help="the --out of the run")
    return p


def codes_parser():
    p = new_parser("translate codes", "The language codes a model knows, and how BCP-47 codes map to them. "
                   "Example: align translate codes --model DIR --languages de,zh,pt-BR")
    p.add_argument("--model", type=str, required=True, help="Any Hugging Face seq2seq model: folder or hub name.")
    p.add_argument("--family", type=Family | None, default=None, help="Language-code family; default: detected.")
    p.add_argument("--languages", type=str | None, default=None, help="BCP-47 codes to map, comma-separated.")
    return p


def run_merge(argv: Sequence[str]) -> int:
    args = parse(merge_parser(), argv, "translate merge")
    try:
        manifest = merge(args.out)
    except ERRORS as exc:
        return _error("merge", exc)
    print(format_filter_report(manifest["filters"]))
    print(format_manifest(manifest))
    print(f"wrote {args.out}/corpus.jsonl and {args.out}/manifest.json")
    return 0


def run_codes(argv: Sequence[str]) -> int:
    from transformers import AutoConfig, AutoTokenizer

    args = parse(codes_parser(), argv, "translate codes")
    from alignment.translate.codes import LanguageMap, detect_family, parse_language_list

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        family = args.family or detect_family(AutoConfig.from_pretrained(args.model).model_type, tokenizer)
        codes = LanguageMap.for_model(family, args.model, tokenizer)
        print(f"{args.model}: family {family}, {codes._describe()}")
        for lang in parse_language_list(args.languages, "--languages") if args.languages else []:
            print(f"  {lang:<10} -> {codes.code(lang, flag='--languages')}")
    except (OSError, *ERRORS) as exc:
        return _error("codes", exc)
    return 0


HELP = "build a multi-way corpus by translating text with an NMT model (NLLB, M2M100, mBART-50, Marian)"
SUBCOMMANDS = {  # name: (one-line help, parser, run)
    "run": ("translate text into target languages: multi-way JSONL rows with provenance", run_parser, run),
    "merge": ("merge a run's finished parts into OUT/corpus.jsonl and OUT/manifest.json", merge_parser, run_merge),
    "codes": ("the language codes a model knows, and how BCP-47 codes map to them", codes_parser, run_codes),
}


def parser():
    """``align translate`` itself: only --config/--print_config and the list of its subcommands."""
    return new_parser("translate", "Synthetic multi-way corpora from source-language text "
                      "(align translate run --help).",
                      "subcommands:\n" + "\n".join(f"  {k:<6} {v[0]}" for k, v in SUBCOMMANDS.items()))


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]][2](argv[1:])
    parse(parser(), argv, "translate")  # --help, --print_config
    raise fail("translate", f"expected a subcommand: {', '.join(SUBCOMMANDS)}")
