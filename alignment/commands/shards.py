"""``align shards build | inspect | verify | tokenize | merge``: WebDataset shards from multi-way corpora.

A thin layer: flags -> :class:`~alignment.data.readers.CorpusSource`,
:class:`~alignment.data.cleaning.CleaningConfig` and
:class:`~alignment.data.shards_write.ShardBuildConfig` (whose field docstrings are
the flags' help), then :func:`~alignment.data.build.build_shards`.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import closing

from jsonargparse import Namespace

from alignment.commands.common import add_config, build, fail, new_parser, parse
from alignment.data.build import SPLITTABLE_FORMATS, PartSpec, build_part, build_shards, merge_parts, parts_dir
from alignment.data.cleaning import CleaningConfig, CleaningReport
from alignment.data.hard_negatives import format_negatives, verify_negatives
from alignment.data.manifest import (
    ManifestError,
    format_cleaning,
    format_manifest,
    load_manifest,
    manifest_file,
    verify_shards,
)
from alignment.data.readers import CorpusSource, read_corpus
from alignment.data.rows import CorpusError
from alignment.data.shards_write import ShardBuildConfig
from alignment.data.teacher import format_teacher, verify_teacher
from alignment.data.tokens import TokenizeConfig, format_tokens, verify_tokens

BUILD_EXAMPLES = """\
examples:
  # the offline demo corpus: Django + Wagtail translation catalogs
  align shards build --format gettext --from_package django wagtail --out data/gettext \\
      --languages en,de,fr,es,ru,zh-Hans,ar --split 0.9,0.05,0.05

  # JSONL / TSV files, 50k rows per shard, fixed-size validation and test
  align shards build --format jsonl part-*.jsonl --out data/mw --rows_per_shard 50000 --split rest,2000,2000

  # one file per language (Moses/OPUS), or explicit LANG=PATH
  align shards build --format aligned corpus.en corpus.de corpus.fr --out data/aligned
  align shards build --format aligned en=train.src de=train.tgt --out data/aligned

  # En-X bitexts joined on the English text into multi-way rows
  align shards build --format pairs en-de.tsv en,fr=tatoeba-fr.tsv opus.en,opus.ja --out data/joined

input forms by --format:
  jsonl    FILE.jsonl ...      {"id": .., "en": .., "de": ..} or {"id": .., "texts": {..}} per line
  tsv      FILE.tsv ...        header row of language codes, optional id column
  aligned  FILE.LANG ... | LANG=FILE ...   one file per language, line i of each = row i
  pairs    FILE.tsv | L1,L2=FILE.tsv | FILE.L1,FILE.L2 | L1=A,L2=B   (each INPUT one bitext)
  gettext  FOLDER ... and/or --from_package NAME ...   <locale>/LC_MESSAGES/*.po|*.mo
  (.gz, .bz2 and .xz inputs are read compressed)

every flag from a YAML file (keys as the flags, without --), flags after it override it:
  align shards build --config build.yaml --seed 1
"""


def build_parser():
    """``align shards build``: the fields of CorpusSource, CleaningConfig and ShardBuildConfig as flags."""
    p = new_parser(
        "shards build",
        "Read a multi-way corpus, clean it (report printed and saved), split it by pivot text, shuffle it "
        "deterministically and write WebDataset tar shards plus manifest.json.",
        BUILD_EXAMPLES,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="input files or folders; the forms per --format are below")
    add_config(p, CorpusSource, skip={"inputs", "packages"})
    p.add_argument("--from_package", nargs="+", default=[], metavar="NAME",
                   help="Installed Python packages whose gettext catalogs to read (--format gettext).")
    add_config(p, ShardBuildConfig, skip={"cleaning"})
    add_config(p, CleaningConfig, skip={"languages", "deduplicate"})
    p.add_argument("--languages", type=str | None, default=None,
                   help="Comma-separated languages to keep (default: all); rows keep their other texts dropped.")
    p.add_argument("--keep_duplicates", type=bool, default=False,
                   help="Keep rows whose pivot text was already seen (default: drop them); duplicates still share "
                   "one split.")
    p.add_argument("--part", type=str | None, default=None, metavar="I/N",
                   help="Parallel build, task I of N (e.g. $SLURM_ARRAY_TASK_ID/8): read, clean and partition the "
                   "I-th slice of the INPUT files into <out>.parts; `align shards merge OUT` then writes the shards "
                   "(jsonl and tsv only; see slurm/shards.sbatch).")
    return p


def _command_line(ns: Namespace) -> str:
    """The build as one explicit command line, every setting spelled out, for the manifest."""
    parts = ["align", "shards", "build", "--format", ns.format, *ns.inputs]
    if ns.from_package:
        parts += ["--from_package", *ns.from_package]
    for flag in ("catalogs", "out", "pivot", "languages", "min_languages", "max_chars", "rows_per_shard",
                 "bytes_per_shard", "split", "seed", "prefix", "shuffle_buckets", "tmp_dir"):  # fmt: skip
        value = ns.get(flag)
        if value is not None:
            parts += ["--" + flag, str(value)]
    parts += [f"--{f}" for f in ("keep_duplicates", "strict", "overwrite") if ns.get(f)]
    return shlex.join(parts)


def _configs(p, ns: Namespace) -> tuple[CorpusSource, ShardBuildConfig]:
    source = build(p, ns, CorpusSource, "shards build", inputs=list(ns.inputs), packages=list(ns.from_package))
    cleaning = build(p, ns, CleaningConfig, "shards build", languages=ns.languages,
                     deduplicate=not ns.keep_duplicates)  # fmt: skip
    return source, build(p, ns, ShardBuildConfig, "shards build", cleaning=cleaning)


def _error(command: str, exc: BaseException, out: object = None) -> int:
    if isinstance(exc, OSError) and not exc.filename and out is not None:  # a failed write names no file
        exc = OSError(f"{exc.strerror or exc} while writing the build of --out {out} (full disk or quota?)")
    print(f"align shards {command}: error: {exc}", file=sys.stderr)
    return 1


def run_build(argv: Sequence[str]) -> int:
    start = time.perf_counter()
    p = build_parser()
    args = parse(p, argv, "shards build")
    source, config = _configs(p, args)
    try:
        report = CleaningReport(config.cleaning)
        if args.part is not None:
            return _run_part(args, source, config, report, start)
        rows = read_corpus(
            source,
            pivot=config.cleaning.pivot,
            languages=config.cleaning.languages,
            report=report,
            tmp_dir=config.tmp_dir,
        )
        with closing(rows):  # a failed build still removes the pair join's spill files now
            manifest = build_shards(
                rows,
                config,
                report=report,
                source=source.describe() | {"command": _command_line(args)},
                size_hint=source.input_bytes() or None,
            )
    except (CorpusError, ValueError, OSError) as exc:  # OSError: a read-only or full disk, names the path
        return _error("build", exc, args.out)
    _warn_missing_pivot(manifest, config.cleaning.pivot)
    print(report.format_table())
    print()
    print(format_manifest(manifest, manifest_file(config.out)))
    print(f"\nwrote {config.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _warn_missing_pivot(manifest: dict, pivot: str) -> None:
    if pivot not in manifest.get("languages", {}):
        print(f"align shards build: warning: the pivot --pivot {pivot} is in no row that was kept (languages: "
              f"{', '.join(manifest.get('languages', {})) or 'none'}): splits are then by row id, and the "
              "En-X baseline and evaluation have no pivot; check --pivot", file=sys.stderr)


def _run_part(args, source: CorpusSource, config: ShardBuildConfig, report: CleaningReport, start: float) -> int:
    """``--part I/N``: pass 1 over this task's slice of the inputs (errors raise to run_build's handler)."""
    part = PartSpec.parse(args.part)
    if source.format not in SPLITTABLE_FORMATS:
        raise ValueError(
            f"--part splits the INPUT files between tasks, but --format {source.format} joins rows across files; "
            f"build it in one process (parallel builds support --format {', '.join(SPLITTABLE_FORMATS)})"
        )
    inputs = part.inputs(source.inputs)
    if inputs:
        rows = read_corpus(dataclasses.replace(source, inputs=inputs), pivot=config.cleaning.pivot, report=report)
    else:
        rows = iter(())  # more tasks than files: this task writes an empty part
    path = build_part(rows, config, part, report=report,
                      source=source.describe() | {"command": _command_line(args)},  # the whole build's command
                      size_hint=source.input_bytes() or None)  # all inputs: every task picks the same buckets
    print(report.format_table())
    print(f"\nwrote part {part.index + 1} of {part.count} ({len(inputs)} input file(s)) to {path} "
          f"in {time.perf_counter() - start:.1f} s; when every part is there: align shards merge {config.out}")
    return 0


def _path_parser(command: str, description: str, name: str, metavar: str, help: str):
    p = new_parser(f"shards {command}", description)
    p.add_argument(name, metavar=metavar, help=help)
    return p


def merge_parser():
    return _path_parser(
        "merge",
        "Pass 2 of a parallel build: read the parts every `align shards build ... --part I/N` task left in "
        "OUT.parts, drop duplicates across them, split, shuffle and write the shards and manifest.json to OUT (the "
        "same bytes as one `align shards build` over all inputs), then delete the parts. "
        "Example: align shards merge data/mw (see slurm/shards.sbatch)",
        "out", "OUT", "the --out of the build tasks",
    )


def inspect_parser():
    p = _path_parser("inspect", "Print a manifest: per split shards/rows/bytes, per language counts. "
                     "Example: align shards inspect data/gettext", "path", "DIR|manifest.json", "a build or its manifest")
    p.add_argument("--cleaning", type=bool, default=False, help="Also print the cleaning report.")
    return p


def verify_parser():
    return _path_parser(
        "verify",
        "Re-hash every shard, re-count its samples and parse their JSON against the manifest. Exit 0 when all "
        "good, 1 otherwise (each problem names the shard). Example: align shards verify data/gettext",
        "path", "DIR|manifest.json", "a build or its manifest",
    )


def tokenize_parser():
    p = new_parser(
        "shards tokenize",
        "Store the token ids of every text of a shard build beside it (tokens/<key>/<split>/<shard>.tar, recorded in "
        "manifest.json), keyed by the tokenizer's identity (vocabulary and pipeline hashes, special tokens, "
        "--max_length, --text_prefix). Training reads them instead of tokenising when --data.tokenizer, "
        "--data.max_length and --data.text_prefix give the same identity, and says so in its log. Re-running is a "
        "no-op; another tokenizer adds another entry.",
        "examples:\n  align shards tokenize --shards data/gettext --tokenizer intfloat/multilingual-e5-small "
        "--max_length 128 --text_prefix 'query: '",
    )
    add_config(p, TokenizeConfig)
    return p


def run_tokenize(argv: Sequence[str]) -> int:
    p = tokenize_parser()
    config = build(p, parse(p, argv, "shards tokenize"), TokenizeConfig, "shards tokenize")
    start = time.perf_counter()
    try:
        from alignment.data.tokens import tokenize_build
        from alignment.loading import load_tokenizer

        tokenizer = load_tokenizer(config.tokenizer, "--tokenizer")
        key, record, written = tokenize_build(config.shards, tokenizer, max_length=config.max_length,
                                              text_prefix=config.text_prefix)
    except (ManifestError, ValueError, OSError) as exc:
        return _error("tokenize", exc)
    tokens = sum(e["tokens"] for e in record["splits"].values())
    what = "wrote" if written else "already there (verified; nothing written):"
    print(f"{what} tokens {key} for {record['tokenizer']}: {tokens} tokens in "
          f"{sum(len(e['shards']) for e in record['splits'].values())} files, recorded in "
          f"{manifest_file(config.shards)} ({time.perf_counter() - start:.1f} s)")
    return 0


def run_merge(argv: Sequence[str]) -> int:
    args = parse(merge_parser(), argv, "shards merge")
    start = time.perf_counter()
    try:
        manifest = merge_parts(args.out)
    except (CorpusError, ManifestError, ValueError, OSError) as exc:
        return _error("merge", exc)
    print(format_cleaning(manifest))
    print()
    print(format_manifest(manifest, manifest_file(args.out)))
    print(f"\nmerged {parts_dir(args.out)} into {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def run_inspect(argv: Sequence[str]) -> int:
    args = parse(inspect_parser(), argv, "shards inspect")
    try:
        manifest = load_manifest(args.path)
    except (OSError, ManifestError) as exc:
        return _error("inspect", exc)
    print(format_manifest(manifest, manifest_file(args.path)) + format_tokens(manifest) + format_negatives(manifest)
          + format_teacher(manifest))
    if args.cleaning:
        print()
        print(format_cleaning(manifest))
    return 0


def run_verify(argv: Sequence[str]) -> int:
    args = parse(verify_parser(), argv, "shards verify")
    problems = verify_shards(args.path)
    if not problems:  # the text is sound: check the token files against it
        root, manifest = manifest_file(args.path).parent, load_manifest(args.path)
        problems = verify_tokens(root, manifest) + verify_negatives(root, manifest) + verify_teacher(root, manifest)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        print(f"align shards verify: {len(problems)} problem(s) in {manifest_file(args.path)}", file=sys.stderr)
        return 1
    manifest = load_manifest(args.path)
    shards = sum(len(e["shards"]) for e in manifest["splits"].values())
    rows = sum(e["rows"] for e in manifest["splits"].values())
    entries = manifest.get("tokens") or {}
    tokens = f", {len(entries)} pre-tokenised entr{'y' if len(entries) == 1 else 'ies'}" if entries else ""
    mined = len(manifest.get("negatives") or {})
    tokens += f", {mined} mined-negatives entr{'y' if mined == 1 else 'ies'}" if mined else ""
    taught = len(manifest.get("teacher") or {})
    tokens += f", {taught} teacher-embeddings entr{'y' if taught == 1 else 'ies'}" if taught else ""
    print(f"OK {manifest_file(args.path)}: {shards} shards, {rows} rows{tokens}, checksums and samples verified")
    return 0


HELP = "build, inspect and verify WebDataset shards of multi-way corpora"
SUBCOMMANDS = {  # name: (one-line help, parser, run)
    "build": ("clean a corpus and write train/validation/test WebDataset shards with a manifest",
              build_parser, run_build),
    "inspect": ("print a build's manifest as tables", inspect_parser, run_inspect),
    "verify": ("re-check checksums, row counts and sample JSON; exit 1 on any mismatch", verify_parser, run_verify),
    "tokenize": ("store token ids beside the text, keyed by the tokenizer; training reads them when they match",
                 tokenize_parser, run_tokenize),
    "merge": ("finish a parallel build: write the shards and manifest from the parts of `build --part I/N`",
              merge_parser, run_merge),
}


def parser():
    """``align shards`` itself: only --config/--print_config and the list of its subcommands."""
    return new_parser("shards", "WebDataset shards of multi-way parallel corpora (align shards build --help).",
                      "subcommands:\n" + "\n".join(f"  {k:<9} {v[0]}" for k, v in SUBCOMMANDS.items()))


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]][2](argv[1:])
    parse(parser(), argv, "shards")  # --help, --print_config
    raise fail("shards", f"expected a subcommand: {', '.join(SUBCOMMANDS)}")
