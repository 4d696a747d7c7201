"""``align translate run | merge | codes``: a multi-way corpus from source-language text and an NMT model.

A thin layer: flags -> :class:`~alignment.translate.run.TranslateConfig` (its
field docstrings are the flags' help), then
:func:`~alignment.translate.run.run_rank` or :func:`~alignment.translate.parts.merge`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from alignment.commands.common import HelpFormatter, field_docs
from alignment.data.rows import CorpusError
from alignment.translate.codes import FAMILIES, LanguageNotSupported
from alignment.translate.filters import FilterConfig, format_filter_report
from alignment.translate.generate import GenerateConfig
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
  align translate run news.en.txt --model M --targets de,fr --out data/syn --check-language \\
      --max-length-ratio 3 --min-roundtrip-chrf 30 --similarity-model intfloat/multilingual-e5-small --min-margin 1.02

  # back-translation of monolingual Swahili: sw -> en, then en -> de, fr; rows anchored on the Swahili
  align translate run sw.txt --source sw --via en --targets en,de,fr --model M --out data/bt-sw

  # which codes does a model know?
  align translate codes --model facebook/nllb-200-distilled-600M --languages de,zh,pt-BR

on a cluster: an array job of N tasks, then a dependent merge (slurm/translate.sbatch, rendered and submitted):
  align submit --job translate --array-tasks 8 --time 04:00:00 -- news.en.txt --model M --targets de,fr --out data/syn
"""


def _defaults(cls: type) -> dict:
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


RUN_DESCRIPTION = (
    "Translate INPUT text into --targets with a seq2seq model, in deterministic parts that are published atomically "
    "(a rerun resumes), filter the outputs, and merge the parts into OUT/corpus.jsonl "
    "(rows for `align shards build --format jsonl`)."
)


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="translate text into target languages: multi-way JSONL rows with provenance",
                       description=RUN_DESCRIPTION, epilog=EXAMPLES, formatter_class=HelpFormatter)
    _run_arguments(p)


class _ArgumentError(ValueError):
    """A bad ``align translate run`` flag, raised instead of argparse's usage-and-exit."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _ArgumentError(message)


def parse_run_args(argv: list[str]) -> TranslateConfig:
    """``align translate run`` flags -> a checked :class:`TranslateConfig`, without running anything.

    ``align submit --job translate`` validates the job's arguments with this before sbatch.

    Raises:
        ValueError: an unknown or malformed flag (argparse's message, naming it) or a bad value.
    """
    parser = _RaisingParser(prog="align translate run", description=RUN_DESCRIPTION, add_help=False)
    _run_arguments(parser)
    return _config(parser.parse_args(argv))


def _run_arguments(p: argparse.ArgumentParser) -> None:
    doc, gen, flt = field_docs(TranslateConfig), field_docs(GenerateConfig), field_docs(FilterConfig)
    run_d, gen_d = _defaults(TranslateConfig), _defaults(GenerateConfig)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=doc["inputs"])
    p.add_argument("--model", required=True, help=doc["model"])
    p.add_argument("--targets", required=True, help=doc["targets"])
    p.add_argument("--out", required=True, help=doc["out"])
    p.add_argument("--source", default=run_d["source"], help=doc["source"])
    p.add_argument("--via", default=None, help=doc["via"])
    p.add_argument("--pivot", default=None, help=doc["pivot"])
    p.add_argument("--input-format", default=run_d["input_format"], choices=("auto", "lines", "jsonl", "shards"),
                   help=doc["input_format"])
    p.add_argument("--family", default=None, choices=FAMILIES, help=doc["family"])
    p.add_argument("--part-rows", type=int, default=run_d["part_rows"], help=doc["part_rows"])
    p.add_argument("--rank", type=int, default=None, help=doc["rank"])
    p.add_argument("--world-size", type=int, default=None, help=doc["world_size"])
    p.add_argument("--no-merge", action="store_true", help=doc["merge"])
    g = p.add_argument_group("decoding")
    g.add_argument("--beams", type=int, default=gen_d["beams"], help=gen["beams"])
    g.add_argument("--max-length", type=int, default=gen_d["max_length"], help=gen["max_length"])
    g.add_argument("--batch-tokens", type=int, default=gen_d["batch_tokens"], help=gen["batch_tokens"])
    g.add_argument("--max-batch", type=int, default=gen_d["max_batch"], help=gen["max_batch"])
    g.add_argument("--dtype", default=gen_d["dtype"], choices=("auto", "bf16", "fp16", "fp32"), help=gen["dtype"])
    g.add_argument("--device", default=gen_d["device"], help=gen["device"])
    f = p.add_argument_group("filters")
    f.add_argument("--keep-bad", action="store_true", help=flt["drop_bad"])
    f.add_argument("--max-length-ratio", type=float, default=None, help=flt["max_length_ratio"])
    f.add_argument("--check-language", action="store_true", help=flt["check_language"])
    f.add_argument("--min-roundtrip-chrf", type=float, default=None, help=flt["min_roundtrip_chrf"])
    f.add_argument("--similarity-model", default=None, metavar="SPEC", help=flt["similarity_model"])
    f.add_argument("--min-similarity", type=float, default=None, help=flt["min_similarity"])
    f.add_argument("--min-margin", type=float, default=None, help=flt["min_margin"])
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> TranslateConfig:
    return TranslateConfig(
        inputs=args.inputs, out=args.out, model=args.model, targets=args.targets, source=args.source, via=args.via,
        pivot=args.pivot, input_format=args.input_format, family=args.family, part_rows=args.part_rows,
        rank=args.rank, world_size=args.world_size, merge=not args.no_merge,
        generate=GenerateConfig(beams=args.beams, max_length=args.max_length, batch_tokens=args.batch_tokens,
                                max_batch=args.max_batch, dtype=args.dtype, device=args.device),
        filters=FilterConfig(drop_bad=not args.keep_bad, max_length_ratio=args.max_length_ratio,
                             check_language=args.check_language, min_roundtrip_chrf=args.min_roundtrip_chrf,
                             similarity_model=args.similarity_model, min_similarity=args.min_similarity,
                             min_margin=args.min_margin),
    )  # fmt: skip


def _error(command: str, exc: BaseException) -> int:
    print(f"align translate {command}: error: {exc}", file=sys.stderr)
    return 1


ERRORS = (ValueError, CorpusError, PartsError, LanguageNotSupported, FileNotFoundError)


def run(args: argparse.Namespace) -> int:
    from alignment.distributed import launcher_slot
    from alignment.evaluate.encode import EncodeConfig, quiet_library_bars

    quiet_library_bars(EncodeConfig())  # transformers' loading bars only on a terminal: batch logs stay clean
    start = time.perf_counter()
    try:
        config = _config(args)
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


def run_merge(args: argparse.Namespace) -> int:
    try:
        manifest = merge(args.out)
    except ERRORS as exc:
        return _error("merge", exc)
    print(format_filter_report(manifest["filters"]))
    print(format_manifest(manifest))
    print(f"wrote {args.out}/corpus.jsonl and {args.out}/manifest.json")
    return 0


def run_codes(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``align translate`` with ``run``, ``merge`` and ``codes``."""
    parser = subparsers.add_parser(
        "translate",
        help="build a multi-way corpus by translating text with an NMT model (NLLB, M2M100, mBART-50, Marian)",
        description="Synthetic multi-way corpora from source-language text (see `align translate run --help`).",
    )
    sub = parser.add_subparsers(dest="translate_command", metavar="{run,merge,codes}")
    _add_run(sub)
    merge_p = sub.add_parser(
        "merge",
        help="merge a run's finished parts into OUT/corpus.jsonl and OUT/manifest.json",
        description="Check that every part of the run in OUT is finished and intact, then write OUT/corpus.jsonl "
        "(parts in order) and OUT/manifest.json (settings, filter report, provenance, speed). "
        "Example: align translate merge data/syn (see slurm/translate.sbatch)",
    )
    merge_p.add_argument("out", metavar="OUT", help="the --out of the run")
    merge_p.set_defaults(func=run_merge)
    codes_p = sub.add_parser("codes", help="the language codes a model knows, and how BCP-47 codes map to them",
                             description="Example: align translate codes --model DIR --languages de,zh,pt-BR")
    codes_p.add_argument("--model", required=True)
    codes_p.add_argument("--family", default=None, choices=FAMILIES)
    codes_p.add_argument("--languages", default=None, help="BCP-47 codes to map, comma-separated")
    codes_p.set_defaults(func=run_codes)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
