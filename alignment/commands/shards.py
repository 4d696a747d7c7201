"""``align shards build | inspect | verify``: WebDataset shards from multi-way corpora.

A thin layer: flags -> :class:`~alignment.data.readers.CorpusSource`,
:class:`~alignment.data.cleaning.CleaningConfig` and
:class:`~alignment.data.shards_write.ShardBuildConfig` (whose field docstrings are
the flags' help), then :func:`~alignment.data.build.build_shards`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from contextlib import closing

from alignment.commands.common import HelpFormatter, field_docs
from alignment.data.build import SPLITTABLE_FORMATS, PartSpec, build_part, build_shards, merge_parts, parts_dir
from alignment.data.cleaning import CleaningConfig, CleaningReport
from alignment.data.manifest import (
    ManifestError,
    format_cleaning,
    format_manifest,
    load_manifest,
    manifest_file,
    verify_shards,
)
from alignment.data.readers import FORMATS, CorpusSource, read_corpus
from alignment.data.rows import CorpusError
from alignment.data.shards_write import ShardBuildConfig

BUILD_EXAMPLES = """\
examples:
  # the offline demo corpus: Django + Wagtail translation catalogs
  align shards build --format gettext --from-package django wagtail --out data/gettext \\
      --languages en,de,fr,es,ru,zh-Hans,ar --split 0.9,0.05,0.05

  # JSONL / TSV files, 50k rows per shard, fixed-size validation and test
  align shards build --format jsonl part-*.jsonl --out data/mw --rows-per-shard 50000 --split rest,2000,2000

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
  gettext  FOLDER ... and/or --from-package NAME ...   <locale>/LC_MESSAGES/*.po|*.mo
  (.gz, .bz2 and .xz inputs are read compressed)
"""


def _defaults(cls: type) -> dict[str, object]:
    """Field defaults of a config dataclass: the CLI's defaults come from the config, never a second copy."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _add_build(sub: argparse._SubParsersAction) -> None:
    src, clean, build = field_docs(CorpusSource), field_docs(CleaningConfig), field_docs(ShardBuildConfig)
    src_d, clean_d, build_d = _defaults(CorpusSource), _defaults(CleaningConfig), _defaults(ShardBuildConfig)
    p = sub.add_parser(
        "build",
        help="clean a corpus and write train/validation/test WebDataset shards with a manifest",
        description="Read a multi-way corpus, clean it (report printed and saved), split it by pivot text, "
        "shuffle it deterministically and write WebDataset tar shards plus manifest.json.",
        epilog=BUILD_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="input files or folders; the forms per --format are below"
    )
    p.add_argument("--format", required=True, choices=FORMATS, help=src["format"])
    p.add_argument("--from-package", nargs="+", default=[], metavar="NAME", dest="packages", help=src["packages"])
    p.add_argument("--catalogs", default=src_d["catalogs"], choices=("auto", "po", "mo"), help=src["catalogs"])
    p.add_argument("--out", required=True, help=build["out"])
    p.add_argument("--pivot", default=clean_d["pivot"], help=clean["pivot"])
    p.add_argument("--languages", default=None, help=clean["languages"])
    p.add_argument("--min-languages", type=int, default=clean_d["min_languages"], help=clean["min_languages"])
    p.add_argument("--max-chars", type=int, default=clean_d["max_chars"], help=clean["max_chars"])
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="keep rows whose pivot text was already seen (default: drop them); duplicates still share one split",
    )
    p.add_argument("--strict", action="store_true", help=clean["strict"])
    p.add_argument("--rows-per-shard", type=int, default=None, help=build["rows_per_shard"])
    p.add_argument(
        "--bytes-per-shard", default=build_d["bytes_per_shard"], metavar="SIZE", help=build["bytes_per_shard"]
    )
    p.add_argument("--split", default=build_d["split"], help=build["split"])
    p.add_argument("--seed", type=int, default=build_d["seed"], help=build["seed"])
    p.add_argument("--prefix", default=build_d["prefix"], help=build["prefix"])
    p.add_argument("--overwrite", action="store_true", help=build["overwrite"])
    p.add_argument("--shuffle-buckets", type=int, default=None, metavar="N", help=build["shuffle_buckets"])
    p.add_argument("--tmp-dir", default=None, help=build["tmp_dir"])
    p.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="parallel build, task I of N (e.g. $SLURM_ARRAY_TASK_ID/8): read, clean and partition the I-th "
        "slice of the INPUT files into <out>.parts; `align shards merge OUT` then writes the shards "
        "(jsonl and tsv only; see slurm/shards.sbatch)",
    )
    p.set_defaults(func=run_build)


def _command_line(args: argparse.Namespace) -> str:
    """The build as one explicit command line, every setting spelled out, for the manifest."""
    parts = ["align", "shards", "build", "--format", args.format, *args.inputs]
    if args.packages:
        parts += ["--from-package", *args.packages]
    for flag in ("catalogs", "out", "pivot", "languages", "min_languages", "max_chars", "rows_per_shard",
                 "bytes_per_shard", "split", "seed", "prefix", "shuffle_buckets", "tmp_dir"):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    parts += [f"--{f}" for f in ("keep-duplicates", "strict", "overwrite") if getattr(args, f.replace("-", "_"))]
    return shlex.join(parts)


def _configs(args: argparse.Namespace) -> tuple[CorpusSource, ShardBuildConfig]:
    source = CorpusSource(format=args.format, inputs=args.inputs, packages=args.packages, catalogs=args.catalogs)
    cleaning = CleaningConfig(
        pivot=args.pivot,
        languages=args.languages,
        min_languages=args.min_languages,
        max_chars=args.max_chars,
        deduplicate=not args.keep_duplicates,
        strict=args.strict,
    )
    config = ShardBuildConfig(
        out=args.out,
        prefix=args.prefix,
        rows_per_shard=args.rows_per_shard,
        bytes_per_shard=args.bytes_per_shard,
        split=args.split,
        seed=args.seed,
        overwrite=args.overwrite,
        shuffle_buckets=args.shuffle_buckets,
        tmp_dir=args.tmp_dir,
        cleaning=cleaning,
    )
    return source, config


def _error(command: str, exc: BaseException, out: object = None) -> int:
    if isinstance(exc, OSError) and not exc.filename and out is not None:  # a failed write names no file
        exc = OSError(f"{exc.strerror or exc} while writing the build of --out {out} (full disk or quota?)")
    print(f"align shards {command}: error: {exc}", file=sys.stderr)
    return 1


def run_build(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        source, config = _configs(args)
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


def run_merge(args: argparse.Namespace) -> int:
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


def run_inspect(args: argparse.Namespace) -> int:
    try:
        manifest = load_manifest(args.path)
    except (OSError, ManifestError) as exc:
        return _error("inspect", exc)
    print(format_manifest(manifest, manifest_file(args.path)))
    if args.cleaning:
        print()
        print(format_cleaning(manifest))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_shards(args.path)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        print(f"align shards verify: {len(problems)} problem(s) in {manifest_file(args.path)}", file=sys.stderr)
        return 1
    manifest = load_manifest(args.path)
    shards = sum(len(e["shards"]) for e in manifest["splits"].values())
    rows = sum(e["rows"] for e in manifest["splits"].values())
    print(f"OK {manifest_file(args.path)}: {shards} shards, {rows} rows, checksums and samples verified")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``align shards`` with its ``build``, ``inspect`` and ``verify`` subcommands."""
    parser = subparsers.add_parser(
        "shards",
        help="build, inspect and verify WebDataset shards of multi-way corpora",
        description="WebDataset shards of multi-way parallel corpora (see `align shards build --help`).",
    )
    sub = parser.add_subparsers(dest="shards_command", metavar="{build,inspect,verify,merge}")
    _add_build(sub)
    inspect_p = sub.add_parser(
        "inspect",
        help="print a build's manifest as tables",
        description="Print a manifest: "
        "per split shards/rows/bytes, per language counts. Example: align shards inspect data/gettext",
    )
    inspect_p.add_argument("path", metavar="DIR|manifest.json")
    inspect_p.add_argument("--cleaning", action="store_true", help="also print the cleaning report")
    inspect_p.set_defaults(func=run_inspect)
    verify_p = sub.add_parser(
        "verify",
        help="re-check checksums, row counts and sample JSON; exit 1 on any mismatch",
        description="Re-hash every shard, re-count its samples and parse their JSON against "
        "the manifest. Exit 0 when all good, 1 otherwise (each problem names the shard). "
        "Example: align shards verify data/gettext",
    )
    verify_p.add_argument("path", metavar="DIR|manifest.json")
    verify_p.set_defaults(func=run_verify)
    merge_p = sub.add_parser(
        "merge",
        help="finish a parallel build: write the shards and manifest from the parts of `build --part I/N`",
        description="Pass 2 of a parallel build: read the parts every `align shards build ... --part I/N` task left "
        "in OUT.parts, drop duplicates across them, split, shuffle and write the shards and manifest.json to OUT "
        "(the same bytes as one `align shards build` over all inputs), then delete the parts. "
        "Example: align shards merge data/mw (see slurm/shards.sbatch)",
    )
    merge_p.add_argument("out", metavar="OUT", help="the --out of the build tasks")
    merge_p.set_defaults(func=run_merge)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
